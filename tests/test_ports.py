"""router/ports.py against real sockets: who listens on a backend's port, said like `ss -ltnp`."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from router import ports

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def listening() -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen()
    try:
        yield s
    finally:
        s.close()


def _listen6(address: str) -> socket.socket:
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    try:
        s.bind((address, 0))
    except OSError as e:
        s.close()
        pytest.skip(f"no IPv6 here: {e}")
    s.listen()
    return s


def test_host_port_of_backend_urls() -> None:
    assert ports.host_port("http://127.0.0.1:8085") == ("127.0.0.1", 8085)
    assert ports.host_port("http://127.0.0.1:8085/v1") == ("127.0.0.1", 8085)
    assert ports.host_port("http://localhost") == ("localhost", 80)
    assert ports.host_port("https://gpu-box/") == ("gpu-box", 443)
    assert ports.host_port("http://[::1]:9000") == ("::1", 9000)
    for bad in ("http://", "ftp://host", "http://host:99999", "127.0.0.1:8085"):
        with pytest.raises(ValueError):
            ports.host_port(bad)


def test_finds_our_own_listening_socket(listening: socket.socket) -> None:
    port = listening.getsockname()[1]
    holder = ports.listener("127.0.0.1", port)
    assert holder is not None
    assert (holder.address, holder.port, holder.pid, holder.uid) == ("127.0.0.1", port, os.getpid(), os.getuid())
    own = open("/proc/self/cmdline", "rb").read().rstrip(b"\0").replace(b"\0", b" ").decode()
    assert holder.command == own  # this very process's command line, as ss -ltnp would show it
    assert ports.listener("localhost", port) == holder


def test_finds_another_process_and_says_who(tmp_path: Path) -> None:
    server = subprocess.Popen([sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1"],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert server.stdout is not None
        line = server.stdout.readline()  # "Serving HTTP on 127.0.0.1 port 41234 (http://...) ..."
        port = int(line.split(" port ")[1].split()[0])
        holder = ports.listener("127.0.0.1", port)
        assert holder is not None and holder.pid == server.pid
        assert ports.in_use("127.0.0.1", port, holder) == (
            f"127.0.0.1:{port} is already in use by pid {server.pid} "
            f"({sys.executable} -u -m http.server 0 --bind 127.0.0.1)")
    finally:
        server.kill()
        server.wait(5)


def test_nothing_listening_is_none(listening: socket.socket) -> None:
    port = listening.getsockname()[1]
    listening.close()
    assert ports.listener("127.0.0.1", port) is None


def test_a_bound_or_connected_socket_is_not_a_listener(listening: socket.socket) -> None:
    bound = socket.socket()
    bound.bind(("127.0.0.1", 0))  # bound, never listen()ed
    client = socket.create_connection(listening.getsockname())
    try:
        assert ports.listener("127.0.0.1", bound.getsockname()[1]) is None
        assert ports.listener("127.0.0.1", client.getsockname()[1]) is None
    finally:
        bound.close()
        client.close()


def test_another_address_on_the_same_port_does_not_count(listening: socket.socket) -> None:
    port = listening.getsockname()[1]
    assert ports.listener("127.0.0.2", port) is None
    assert ports.listener("::1", port) is None


def test_wildcard_listeners_count_for_every_address() -> None:
    s = socket.socket()
    s.bind(("0.0.0.0", 0))
    s.listen()
    try:
        port = s.getsockname()[1]
        holder = ports.listener("127.0.0.1", port)
        assert holder is not None and holder.address == "0.0.0.0" and holder.pid == os.getpid()
        assert ports.in_use("127.0.0.1", port, holder).endswith(", listening on 0.0.0.0")
    finally:
        s.close()
    s6 = _listen6("::")
    try:
        port = s6.getsockname()[1]
        holder = ports.listener("127.0.0.1", port)
        assert holder is not None and holder.address == "::"
        assert ports.in_use("127.0.0.1", port, holder).endswith(", listening on [::]")
    finally:
        s6.close()


def test_ipv6_loopback() -> None:
    s6 = _listen6("::1")
    try:
        port = s6.getsockname()[1]
        holder = ports.listener("::1", port)
        assert holder is not None and holder.address == "::1" and holder.pid == os.getpid()
        assert ports.listener("localhost", port) == holder
        assert ports.listener("127.0.0.1", port) is None
        assert ports.in_use("::1", port, holder).startswith(f"[::1]:{port} is already in use by pid {os.getpid()} (")
    finally:
        s6.close()


def test_holder_not_visible_says_unknown_process(listening: socket.socket, tmp_path: Path) -> None:
    """Without root the router cannot read other users' /proc/PID/fd: it still says who owns the socket."""
    (tmp_path / "net").mkdir()
    for name in ("tcp", "tcp6"):
        if Path("/proc/net", name).exists():
            shutil.copy(Path("/proc/net", name), tmp_path / "net" / name)
    port = listening.getsockname()[1]
    holder = ports.listener("127.0.0.1", port, proc=tmp_path)
    assert holder is not None and holder.pid is None and holder.command is None
    assert ports.in_use("127.0.0.1", port, holder) == (
        f"127.0.0.1:{port} is already in use by a process of user {holder.user} "
        "(its PID is not visible to the router)")


def test_url_in_use(listening: socket.socket) -> None:
    port = listening.getsockname()[1]
    holder = ports.listener("127.0.0.1", port)
    assert holder is not None
    assert ports.url_in_use(f"http://127.0.0.1:{port}/v1") == (
        f"127.0.0.1:{port} is already in use by pid {os.getpid()} ({holder.command})")
    assert ports.url_in_use(f"http://localhost:{port}") == (
        f"localhost:{port} is already in use by pid {os.getpid()} ({holder.command}), listening on 127.0.0.1")
    listening.close()
    assert ports.url_in_use(f"http://127.0.0.1:{port}") is None

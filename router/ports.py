"""Who listens on a TCP port: LISTEN sockets from /proc/net/tcp{,6}, their processes from /proc/*/fd.

Before the router starts a backend's unit it asks whether something already holds the backend's
port; if so, the engine would fail to bind while the health check passed against the stray
server. `listener()` answers like `ss -ltnp` would, without a subprocess, and `in_use()` says it in
words for an error message; `url_in_use()` does both for a backend URL.
"""

from __future__ import annotations

import ipaddress
import os
import pwd
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's "st" column
DEFAULT_PORTS = {"http": 80, "https": 443}
COMMAND_LIMIT = 200  # characters of a command line shown in a message

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Listener:
    """A TCP socket in LISTEN state, and the process holding it when it could be found."""

    address: str  # the address the socket is bound to ("0.0.0.0" and "::" are wildcards)
    port: int
    inode: int
    uid: int
    pid: int | None = None  # None: no process of ours holds it, or /proc/PID/fd is not readable
    command: str | None = None  # the holder's command line, words joined by spaces

    @property
    def user(self) -> str:
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return str(self.uid)


def host_port(url: str) -> tuple[str, int]:
    """The host and TCP port a backend URL points at (http defaults to 80, https to 443)."""
    parts = urlsplit(url)
    if not parts.hostname:
        raise ValueError(f"{url!r} has no host")
    try:
        port = parts.port
    except ValueError as e:
        raise ValueError(f"{url!r} has an invalid port: {e}") from None
    if port is None:
        if parts.scheme not in DEFAULT_PORTS:
            raise ValueError(f"{url!r} has no port and its scheme {parts.scheme!r} has no default port")
        port = DEFAULT_PORTS[parts.scheme]
    return parts.hostname, port


def listener(host: str, port: int, proc: Path = Path("/proc")) -> Listener | None:
    """The socket listening on host:port (or on a wildcard address at that port), or None.

    Addresses are compared after resolving `host` ("localhost" -> 127.0.0.1 and ::1); a socket
    bound to 0.0.0.0 or :: takes connections for every address, so it counts; a host that does not
    resolve matches any listener on the port.
    """
    wanted = _addresses(host)
    for sock in _listening(proc):
        if sock.port == port and _overlaps(ipaddress.ip_address(sock.address), wanted):
            pid, command = _holder(sock.inode, proc)
            return Listener(sock.address, sock.port, sock.inode, sock.uid, pid, command)
    return None


def in_use(host: str, port: int, holder: Listener) -> str:
    """`host:port is already in use by pid 1234 (python3 -m http.server 8085)`, ss-style."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if holder.pid is None:
        who = f"a process of user {holder.user} (its PID is not visible to the router)"
    else:
        who = f"pid {holder.pid} ({holder.command or '?'})"
    bound = "" if holder.address in (host, _literal(host)) else f", listening on {_show(holder.address)}"
    return f"{where} is already in use by {who}{bound}"


def url_in_use(url: str) -> str | None:
    """What already listens on a backend URL's host and port, in words (see in_use), or None.

    Reads /proc (about 15 ms on a host with ~800 TCP sockets): call it off the event loop."""
    host, port = host_port(url)
    holder = listener(host, port)
    return None if holder is None else in_use(host, port, holder)


# --- /proc ---------------------------------------------------------------------------------------


def _listening(proc: Path) -> list[Listener]:
    """Every LISTEN socket of this network namespace, without its process."""
    found: list[Listener] = []
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        try:
            lines = (proc / "net" / name).read_text(encoding="ascii").splitlines()[1:]
        except OSError:  # no IPv6 in this kernel, or no /proc
            continue
        for line in lines:
            f = line.split()
            if len(f) < 10 or f[3] != LISTEN:
                continue
            hex_addr, hex_port = f[1].split(":")
            found.append(Listener(_decode(hex_addr, family), int(hex_port, 16), int(f[9]), int(f[7])))
    return found


def _decode(hex_addr: str, family: int) -> str:
    """/proc/net/tcp's address: 32-bit words in host byte order, written as hex."""
    raw = bytes.fromhex(hex_addr)
    words = b"".join(int.from_bytes(raw[i:i + 4], "big").to_bytes(4, sys.byteorder) for i in range(0, len(raw), 4))
    return socket.inet_ntop(family, words)


def _holder(inode: int, proc: Path) -> tuple[int | None, str | None]:
    """The lowest PID with this socket among its open files, and its command line."""
    target = f"socket:[{inode}]"
    pids = sorted(int(p.name) for p in _iterdir(proc) if p.name.isdigit())
    for pid in pids:
        fd_dir = proc / str(pid) / "fd"
        for fd in _iterdir(fd_dir):
            try:
                if os.readlink(fd) == target:
                    return pid, _command(proc / str(pid))
            except OSError:  # the fd closed meanwhile
                continue
    return None, None


def _iterdir(path: Path) -> list[Path]:
    try:
        return list(path.iterdir())
    except OSError:  # gone, or not ours to read
        return []


def _command(pid_dir: Path) -> str:
    try:
        words = (pid_dir / "cmdline").read_bytes().split(b"\0")
        text = " ".join(" ".join(w.decode("utf-8", "replace").split()) for w in words if w)
    except OSError:
        text = ""
    if not text:
        try:
            text = "[" + (pid_dir / "comm").read_text(encoding="utf-8", errors="replace").strip() + "]"
        except OSError:
            text = "?"
    return text if len(text) <= COMMAND_LIMIT else text[:COMMAND_LIMIT - 1] + "…"


# --- addresses -----------------------------------------------------------------------------------


def _addresses(host: str) -> set[IPAddress] | None:
    """The addresses host stands for; None when it does not resolve (then any address matches)."""
    literal = _literal(host)
    if literal is not None:
        return {_unmapped(ipaddress.ip_address(literal))}
    if host == "localhost":
        return {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return None
    return {_unmapped(ipaddress.ip_address(str(info[4][0]).split("%")[0])) for info in infos}


def _literal(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return None


def _unmapped(addr: IPAddress) -> IPAddress:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _overlaps(bound: IPAddress, wanted: set[IPAddress] | None) -> bool:
    bound = _unmapped(bound)
    if wanted is None or bound.is_unspecified:
        return True
    return bound in wanted or any(w.is_unspecified for w in wanted)


def _show(address: str) -> str:
    return f"[{address}]" if ":" in address else address

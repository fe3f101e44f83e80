"""Unit tests for router.atomicfile: atomic replace keeps mode and owner, leaves no temp file, skips no-ops."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from router import atomicfile
from router.atomicfile import read_text, remove_file, write_atomic


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_new_file_gets_0644_and_parents(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "x.conf.d" / "50.conf"
    old_umask = os.umask(0o077)
    try:
        assert write_atomic(path, "hello ünï\n") is True
    finally:
        os.umask(old_umask)
    assert path.read_text(encoding="utf-8") == "hello ünï\n"
    assert mode(path) == 0o644
    assert os.listdir(path.parent) == ["50.conf"]


def test_replaces_content_and_keeps_mode(tmp_path: Path) -> None:
    path = tmp_path / "config.yml"
    path.write_text("old\n")
    path.chmod(0o640)
    inode = path.stat().st_ino
    assert write_atomic(path, "new\n") is True
    assert path.read_text() == "new\n"
    assert mode(path) == 0o640
    assert path.stat().st_ino != inode  # replaced, not rewritten in place
    assert os.listdir(tmp_path) == ["config.yml"]


def test_identical_content_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "config.yml"
    path.write_text("same\n")
    before = path.stat()
    assert write_atomic(path, "same\n") is False
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert write_atomic(path, "same\nplus\n") is True
    assert write_atomic(path, "same") is True  # a prefix of the old content is a change too


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_keeps_owner(tmp_path: Path) -> None:
    path = tmp_path / "tabby.yml"
    path.write_text("old\n")
    os.chown(path, 65534, 65534)
    assert write_atomic(path, "new\n") is True
    st = path.stat()
    assert (st.st_uid, st.st_gid) == (65534, 65534)


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_no_temp_file_left_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    path = tmp_path / "config.yml"
    path.write_text("old\n")

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomicfile.os, failing, boom)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(path, "new\n")
    monkeypatch.undo()
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["config.yml"]


def test_remove_file(tmp_path: Path) -> None:
    path = tmp_path / "50-llm-router.conf"
    path.write_text("x")
    assert remove_file(path) is True
    assert not path.exists()
    assert remove_file(path) is False


def test_refuses_a_symlink_and_names_it(tmp_path: Path) -> None:
    real = tmp_path / "real.yml"
    real.write_text("old\n")
    link = tmp_path / "link.yml"
    link.symlink_to(real)
    with pytest.raises(OSError) as info:
        write_atomic(link, "new\n")
    assert info.value.errno == errno.ELOOP
    assert str(link) in str(info.value) and str(real) in str(info.value)
    assert "never writes through a symlink" in str(info.value)
    assert link.is_symlink() and real.read_text() == "old\n"
    assert sorted(os.listdir(tmp_path)) == ["link.yml", "real.yml"]


def test_refuses_a_dangling_symlink(tmp_path: Path) -> None:
    link = tmp_path / "50-llm-router.conf"
    link.symlink_to(tmp_path / "elsewhere.conf")
    with pytest.raises(OSError, match="is a symbolic link"):
        write_atomic(link, "x\n")
    assert not (tmp_path / "elsewhere.conf").exists()


def test_refuses_a_symlinked_directory(tmp_path: Path) -> None:
    real = tmp_path / "real.d"
    real.mkdir()
    (tmp_path / "llamacpp.service.d").symlink_to(real)
    path = tmp_path / "llamacpp.service.d" / "50-llm-router.conf"
    with pytest.raises(OSError) as info:
        write_atomic(path, "x\n")
    assert str(tmp_path / "llamacpp.service.d") in str(info.value)
    assert os.listdir(real) == []
    (real / "50-llm-router.conf").write_text("x")
    with pytest.raises(OSError, match="is a symbolic link"):
        remove_file(path)
    assert os.listdir(real) == ["50-llm-router.conf"]


def test_refuses_a_directory_or_device_in_place_of_the_file(tmp_path: Path) -> None:
    (tmp_path / "config.yml").mkdir()
    with pytest.raises(OSError, match="not a regular file"):
        write_atomic(tmp_path / "config.yml", "x\n")


def test_read_text_refuses_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real.yml"
    real.write_text("model:\n  model_name: x\n")
    assert read_text(real) == "model:\n  model_name: x\n"
    link = tmp_path / "config.yml"
    link.symlink_to(real)
    with pytest.raises(OSError, match=f"{link} is a symbolic link"):
        read_text(link)
    with pytest.raises(FileNotFoundError):
        read_text(tmp_path / "missing.yml")


def test_directories_it_creates_are_0755_whatever_the_umask(tmp_path: Path) -> None:
    """The router runs with UMask=0077; the drop-in directories it creates in /etc/systemd/system must
    still be readable by everyone (`systemctl cat` as a user), like the drop-ins themselves."""
    old = os.umask(0o077)
    try:
        path = tmp_path / "llamacpp.service.d" / "sub" / "50-llm-router.conf"
        write_atomic(path, "[Service]\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "llamacpp.service.d").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644

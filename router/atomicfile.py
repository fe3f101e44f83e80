"""Replace files atomically and durably (same-directory temp file, fsync, rename), or remove them.

Never through a symlink: the file and the directory that holds it are opened without following
one (O_NOFOLLOW, then *at() calls on that directory), so a link planted there cannot redirect a
write by the router (root) to another file; the error names the link.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

NEW_FILE_MODE = 0o644
NEW_DIR_MODE = 0o755  # drop-in directories: `systemctl cat` as any user must see them (they hold no secrets)


def write_atomic(path: Path, data: str, *, dir_mode: int = NEW_DIR_MODE) -> bool:
    """Make `path` hold `data` (UTF-8); False, with nothing written, when it already does.

    Readers see the old file or the new one, never a mix. The file keeps its mode and owner (new files
    get 0644). Missing parent directories are created with `dir_mode`, whatever the process's umask
    (the router runs with UMask=0077). A symlink as the file or as its directory is refused (OSError
    ELOOP naming the link); so is anything but a regular file.
    """
    target = Path(path)
    content = data.encode("utf-8")
    _make_dirs(target.parent, dir_mode)
    with _directory(target.parent) as dfd:
        old = _regular_or_none(target, dfd)
        if old is not None:
            with os.fdopen(_open_nofollow(target, os.O_RDONLY, dfd), "rb") as f:
                if f.read(len(content) + 1) == content:
                    return False
        fd, tmp = _temp_file(target.name, dfd)
        try:
            with os.fdopen(fd, "wb") as f:
                if old is not None:
                    _copy_owner(f.fileno(), old)
                os.fchmod(f.fileno(), stat.S_IMODE(old.st_mode) if old is not None else NEW_FILE_MODE)
                f.write(content)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dfd)
            raise
        os.fsync(dfd)
    return True


def remove_file(path: Path) -> bool:
    """Delete `path` durably; False when it did not exist. Refuses a symlinked directory (ELOOP)."""
    target = Path(path)
    try:
        with _directory(target.parent) as dfd:
            os.unlink(target.name, dir_fd=dfd)
            os.fsync(dfd)
    except FileNotFoundError:
        return False
    return True


def read_text(path: Path) -> str:
    """The UTF-8 text of `path`, refusing a symlink (OSError ELOOP naming it) as the file or its directory."""
    target = Path(path)
    with _directory(target.parent) as dfd, os.fdopen(_open_nofollow(target, os.O_RDONLY, dfd), "rb") as f:
        return f.read().decode("utf-8")


# --- no symlinks: the directory is opened once without following a link, then used through *at() calls ---


def _symlink_error(link: Path, what: str) -> OSError:
    try:
        to = f" (to {os.readlink(link)})"
    except OSError:
        to = ""
    return OSError(errno.ELOOP, f"{what} {link} is a symbolic link{to}; the router never writes through a "
                                "symlink (a link could send its write to any file): point the configuration at the "
                                "real path, or replace the link with the real file or directory")


@contextlib.contextmanager
def _directory(directory: Path) -> Iterator[int]:
    """A file descriptor of `directory`, which must not itself be a symlink."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(directory):
            raise _symlink_error(directory, "the directory") from None
        raise
    try:
        yield fd
    finally:
        os.close(fd)


def _regular_or_none(target: Path, dfd: int) -> os.stat_result | None:
    """The file's stat; None when it does not exist; OSError when it is a symlink or not a regular file."""
    try:
        st = os.stat(target.name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        raise _symlink_error(target, "the file")
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, f"{target} is not a regular file; the router only replaces regular files")
    return st


def _open_nofollow(target: Path, flags: int, dfd: int) -> int:
    try:
        return os.open(target.name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _symlink_error(target, "the file") from None
        raise


def _temp_file(name: str, dfd: int) -> tuple[int, str]:
    """A new, empty, private file next to `name` (the same directory, so that rename is atomic)."""
    while True:
        tmp = f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                           dir_fd=dfd), tmp
        except FileExistsError:
            continue


def _make_dirs(directory: Path, mode: int) -> None:
    """Create `directory` and its missing parents, each with exactly `mode`."""
    if directory.is_dir():
        return
    _make_dirs(directory.parent, mode)
    try:
        os.mkdir(directory, mode)
    except FileExistsError:
        return
    os.chmod(directory, mode)  # mkdir's mode is masked by the umask


def _copy_owner(fd: int, old: os.stat_result) -> None:
    """Give the temp file the old file's owner, or at least its group when only that is allowed.

    A router that is not root cannot give a file away; the rewrite then proceeds with the
    router's own user as owner (the mode is still copied), rather than failing the switch.
    """
    mine = os.fstat(fd)
    if (mine.st_uid, mine.st_gid) == (old.st_uid, old.st_gid):
        return
    try:
        os.fchown(fd, old.st_uid, old.st_gid)
    except PermissionError:
        with contextlib.suppress(PermissionError):
            os.fchown(fd, -1, old.st_gid)


"""Replace files atomically and durably (same-directory temp file, fsync, rename), or remove them."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

NEW_FILE_MODE = 0o644
NEW_DIR_MODE = 0o755  # drop-in directories: `systemctl cat` as any user must see them (they hold no secrets)


def write_atomic(path: Path, data: str, *, dir_mode: int = NEW_DIR_MODE) -> bool:
    """Make `path` hold `data` (UTF-8); False, with nothing written, when it already does.

    Readers see the old file or the new one, never a mix. The file keeps its mode and owner (new files
    get 0644); a symlink is written through to its target. Missing parent directories are created with
`dir_mode`, whatever the process's umask (the router runs with UMask=0077).
    """
    target = Path(os.path.realpath(path))
    content = data.encode("utf-8")
    try:
        with open(target, "rb") as f:
            if f.read(len(content) + 1) == content:
                return False
    except FileNotFoundError:
        pass
    try:
        old: os.stat_result | None = os.stat(target)
    except FileNotFoundError:
        old = None

    _make_dirs(target.parent, dir_mode)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if old is not None:
                _copy_owner(f.fileno(), old)
            os.fchmod(f.fileno(), stat.S_IMODE(old.st_mode) if old is not None else NEW_FILE_MODE)
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)
    return True


def remove_file(path: Path) -> bool:
    """Delete `path` durably; False when it did not exist."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    _fsync_dir(Path(path).parent)
    return True


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


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

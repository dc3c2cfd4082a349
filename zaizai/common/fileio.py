"""Atomic file writes: readers (and a crash at any moment) see the old file or the complete new one."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; once the block has written it, fsync it and rename it over
    ``path``. If the block fails, the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # Some writers (safetensors) create their file 0600; give every output the mode a plain open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def temp_name(path: str | os.PathLike) -> Path:
    """``.NAME.PID.HEX.tmp`` next to ``path``: where a file or folder is written before it is renamed into place.
    The writer's process id in the name lets :func:`remove_stale_temps` tell a live writer's from a killed one's."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


_TEMP = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}\.tmp$")


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and folders (:func:`temp_name`) in ``folder`` that a killed process left:
    those whose writer's process id is not a live process. A live process's (ours or another's) are kept, and
    so is everything where liveness cannot be told (not POSIX). Returns what was removed."""
    folder = Path(folder)
    if os.name != "posix" or not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        match = _TEMP.match(entry.name)
        if match is None or _alive(int(match.group(1))):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            continue  # gone already, or not ours to remove: leave it
        removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (POSIX: signal 0 checks without sending anything)."""
    if pid == os.getpid():
        return True
    if pid <= 0 or pid > 2**22:  # no such process id on Linux or macOS (and kill(0) would mean our group)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # it exists (another user's), or we cannot tell: keep its files
    return True


def atomic_write(path: str | os.PathLike, data) -> None:
    """Write ``data`` (bytes, or anything with the buffer protocol such as a contiguous numpy array)."""
    with atomic_path(path) as tmp, open(tmp, "xb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, text.encode("utf-8"))


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it, so set it straight back
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

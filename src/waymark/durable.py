"""Durable file writes (temp file + fsync + rename + directory fsync), and file checksums."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_data(path: Path) -> None:
    """Make a file's data written by someone else durable (not its name: see fsync_file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Make a file written by someone else (qemu-img, a copy) durable, with its directory."""
    fsync_data(path)
    fsync_dir(path.parent)


def write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically: readers see the old or the new content, never a mix."""
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError:
        remove(tmp)
        raise
    fsync_dir(path.parent)


def temp_path(path: Path) -> Path:
    """Where :func:`write_bytes` stages ``path`` (left behind only by a killed process)."""
    return path.with_name(f".{path.name}.tmp")


def remove(path: Path) -> None:
    """Remove ``path`` if it exists (idempotent) and make the removal durable."""
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        path.unlink()
        fsync_dir(path.parent)


def sha256(path: Path) -> str:
    """The file's sha256, hex."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def link_or_copy(src: Path, dst: Path, on_progress: Callable[[float], None] | None = None,
                 *, fd: int | None = None) -> None:
    """``dst`` becomes a durable copy of ``src``: a hard link when both share a file system
    (for files never written in place, such as memory states, sharing the inode is safe), else
    a copy (reporting its fraction done); made under a temporary name and renamed, so ``dst``
    is whole or absent. With ``fd`` (``src`` opened and checked already), that open file is
    linked or copied, whatever ``src`` names now."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(dst)
    remove(tmp)
    try:
        if fd is None:
            os.link(src, tmp)
        else:
            _link_open(fd, tmp)
    except OSError:
        _copy(src if fd is None else Path(f"/proc/self/fd/{fd}"), tmp, on_progress)
    fsync_file(tmp)
    os.replace(tmp, dst)
    remove(tmp)  # (a rename does nothing when both names are links to one file: a re-run)
    fsync_dir(dst.parent)


def _link_open(fd: int, dst: Path) -> None:
    """A hard link to the open file ``fd`` (linkat following its ``/proc/self/fd`` entry)."""
    fds = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.link(str(fd), dst, src_dir_fd=fds, follow_symlinks=True)
    finally:
        os.close(fds)


COPY_CHUNK = 8 << 20


def _copy(src: Path, dst: Path, on_progress: Callable[[float], None] | None) -> None:
    """A copy of ``src`` that keeps its holes (qcow2 files are sparse), reporting progress."""
    total = src.stat().st_size
    done = 0
    with open(src, "rb") as source, open(dst, "wb") as target:
        while chunk := source.read(COPY_CHUNK):
            if chunk.count(0) == len(chunk):
                target.seek(len(chunk), os.SEEK_CUR)
            else:
                target.write(chunk)
            done += len(chunk)
            if on_progress is not None and total:
                on_progress(done / total)
        target.truncate(done)

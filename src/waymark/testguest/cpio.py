"""A newc cpio archive writer, enough for a Linux initramfs.

Written here rather than calling ``cpio`` because the format is a few lines and the tool is often
not installed. The output is reproducible: entries are sorted, owned by root, with mtime 0.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import PurePosixPath

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class _Entry:
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


class Archive:
    """Files, directories, symlinks and device nodes; missing parent directories are added."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        self._put(path, _Entry(stat.S_IFDIR | mode))

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._put(path, _Entry(stat.S_IFREG | mode, data))

    def add_symlink(self, path: str, target: str) -> None:
        self._put(path, _Entry(stat.S_IFLNK | 0o777, target.encode()))

    def add_char_device(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._put(path, _Entry(stat.S_IFCHR | mode, rdev=(major, minor)))

    def __contains__(self, path: str) -> bool:
        return _clean(path) in self._entries

    def pack(self) -> bytes:
        """The archive bytes; sorted order puts every directory before its content."""
        chunks = [_record(ino, name, entry)
                  for ino, (name, entry) in enumerate(sorted(self._entries.items()), start=1)]
        chunks.append(_record(0, _TRAILER, _Entry(0)))
        return b"".join(chunks)

    def _put(self, path: str, entry: _Entry) -> None:
        name = _clean(path)
        for parent in reversed(PurePosixPath(name).parents[:-1]):
            self._entries.setdefault(str(parent), _Entry(stat.S_IFDIR | 0o755))
        self._entries[name] = entry


def _clean(path: str) -> str:
    name = str(PurePosixPath("/", path))[1:]
    if not name:
        raise ValueError("an archive entry needs a name")
    return name


def _record(ino: int, name: str, entry: _Entry) -> bytes:
    encoded = name.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    fields = (ino, entry.mode, 0, 0, nlink, 0, len(entry.data), 0, 0,
              entry.rdev[0], entry.rdev[1], len(encoded), 0)
    header = _MAGIC + b"".join(b"%08X" % value for value in fields)
    return _padded(header + encoded) + _padded(entry.data)


def _padded(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)

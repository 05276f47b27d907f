"""The files a VM needs beyond its disks, carried by backup points and export bundles (and
copied into templates): today the kernel and initrd of a VM that boots one directly. This is
the one place that says which they are (:data:`KEYS`); a VM's UEFI variables or TPM state
belong here too.

Carried, each is copied read-only into the point's or bundle's own folder, and the manifest
records it under ``vm_files``::

    "vm_files": {"kernel": {"file": "<path relative to the share>", "bytes": N,
                            "sha256": "<hex>"}, ...}

A VM restored or imported from it gets copies in its own folder (``vms/<id>/boot/<key>``,
where a deployed VM's boot files go too) and its configuration names those, so it boots on a
host that never had the original files.

Read back, an entry is hostile (others may write the storage): :func:`read` accepts only the
keys of :data:`KEYS`, each a file inside the folder given (no absolute path, no ``..``, no
link out), a size of at most :data:`MAX_BYTES` and a sha256; :func:`problems` says what of it
does not match the files. Nothing is copied before both pass.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from waymark import durable
from waymark.external import shares
from waymark.model.hardware import HardwareConfig

KEYS = ("kernel", "initrd")  # the HardwareConfig fields naming a file the VM needs
MAX_BYTES = 1 << 30  # a kernel or an initrd is megabytes; anything this big is not one
SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Carried:
    """One file a manifest carries: ``path`` inside ``root`` (checked), its size and sha256."""

    key: str
    path: Path
    size: int
    sha256: str
    root: Path


def named(hardware: HardwareConfig) -> dict[str, Path]:
    """The files ``hardware`` names that exist, by key (one that is gone is left out: what
    needs it could not boot here either)."""
    found = {key: getattr(hardware, key) for key in KEYS}
    return {key: Path(path) for key, path in found.items() if path and Path(path).is_file()}


def store(source: Path, folder: Path, name: str | None = None) -> Carried:
    """A durable, read-only copy of ``source`` in ``folder`` under ``name`` (None: its
    sha256, so points that carry the same file share one copy; an identical file already
    there is kept, and then nothing is copied: a backup run carries the same kernel each
    time)."""
    if name is None:
        digest = durable.sha256(source)
        kept = folder / digest
        if _holds(kept, digest):
            return Carried("", kept, kept.stat().st_size, digest, folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{uuid.uuid4().hex}.tmp"
    try:
        shutil.copyfile(source, tmp)
        os.chmod(tmp, stat.S_IRUSR)
        durable.fsync_file(tmp)
        digest = durable.sha256(tmp)
        target = folder / (name or digest)
        if not _holds(target, digest):
            os.replace(tmp, target)
            durable.fsync_dir(folder)
    finally:
        durable.remove(tmp)
    return Carried(name or "", target, target.stat().st_size, digest, folder)


def _holds(target: Path, digest: str) -> bool:
    """Whether ``target`` is a plain file holding ``digest``; a symbolic link is not followed
    (the folder may be on untrusted storage: a link planted there is replaced, never read)."""
    try:
        fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    with os.fdopen(fd, "rb") as handle:
        return stat.S_ISREG(os.fstat(fd).st_mode) and \
            hashlib.file_digest(handle, "sha256").hexdigest() == digest


def carry(files: dict[str, Path], folder: Path, root: Path, *, by_content: bool = False
          ) -> dict[str, dict[str, Any]]:
    """Each of ``files`` stored in ``folder`` (named by key, or ``by_content``); the manifest's
    ``vm_files``, its paths relative to ``root``."""
    carried = {}
    for key, source in files.items():
        stored = store(source, folder, None if by_content else key)
        carried[key] = {"file": str(stored.path.relative_to(root)), "bytes": stored.size,
                        "sha256": stored.sha256}
    return carried


def read(entries: Any, folder: Path, *, base: Path, where: str) -> list[Carried]:
    """A manifest's ``vm_files`` (None: it carries none), refused naming ``where`` unless each
    key is one of :data:`KEYS` and each entry names a file inside ``folder`` (relative to
    ``base``) with a plausible size and a sha256."""
    if entries is None:
        return []
    if not isinstance(entries, dict):
        raise shares.refused(where, f"its vm_files are {type(entries).__name__}, not a mapping")
    carried = []
    for key, entry in entries.items():
        if key not in KEYS:
            raise shares.refused(where, f"it carries {key!r}, not one of the files a VM has "
                                        f"beyond its disks ({', '.join(KEYS)})")
        if not isinstance(entry, dict):
            raise shares.refused(where, f"its {key} entry is {entry!r}")
        path = shares.inside(folder, entry.get("file"), where=where, base=base)
        size, digest = entry.get("bytes"), entry.get("sha256")
        if type(size) is not int or not 0 <= size <= MAX_BYTES:
            raise shares.refused(where, f"its {key} has the size {size!r}, not 0 to "
                                        f"{MAX_BYTES} bytes")
        if not isinstance(digest, str) or not SHA256.fullmatch(digest):
            raise shares.refused(where, f"its {key} has the checksum {digest!r}, not a sha256")
        carried.append(Carried(key, path, size, digest, folder))
    return carried


def problems(carried: list[Carried], root: Path) -> list[str]:
    """What of the carried files is missing or does not match its manifest entry (named
    relative to ``root``)."""
    found = []
    for entry in carried:
        rel = entry.path.relative_to(root)
        if not entry.path.is_file():
            found.append(f"{rel}: missing")
        elif entry.path.stat().st_size != entry.size:
            found.append(f"{rel}: {entry.path.stat().st_size} bytes, not {entry.size}")
        elif durable.sha256(entry.path) != entry.sha256:
            found.append(f"{rel}: sha256 does not match the manifest (damaged)")
    return found


def unknown(folder: Path, kept: set[Path]) -> list[Path]:
    """Files in ``folder`` (carried files' folder) that ``kept`` does not hold: what a killed
    run or a removed point left."""
    return sorted(p for p in folder.glob("*") if p.is_file() and p not in kept) \
        if folder.is_dir() else []

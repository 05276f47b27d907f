"""Folders on shared or external storage that Waymark owns (a backup repository, a library):
each is marked by a small JSON file naming its format, version and id, so a folder is never
mistaken for one, nor used by a Waymark that does not know its version."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from waymark import durable, modes
from waymark.errors import Conflict, NotFound, StorageError


def create(path: Path, marker: str, fmt: str, version: int, *, what: str,
           use_hint: str) -> str:
    """Make the empty (or new) folder ``path`` a ``what``: its ``vms/`` folder and the marker
    file, written durably; returns its new id."""
    if (path / marker).exists():
        raise Conflict(f"{path} is already a {what}.", hint=use_hint)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise Conflict(f"{path} exists and is not an empty folder.",
                       hint="Give a new or empty folder on that storage.")
    folder_id = uuid.uuid4().hex
    try:
        (path / "vms").mkdir(parents=True, exist_ok=True)
        modes.tighten(path)  # an empty folder someone else made may be open to all
        durable.write_bytes(path / marker, json.dumps(
            {"format": fmt, "version": version, "id": folder_id,
             "created_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")},
            indent=2).encode())
    except OSError as err:
        raise StorageError(f"cannot create a {what} in {path}: {err.strerror}.",
                           hint="Check that the storage is mounted and writable.") from err
    return folder_id


def read(path: Path, marker: str, fmt: str, version: int, *, what: str,
         create_hint: str) -> dict[str, Any]:
    """The marker of the ``what`` at ``path``; NotFound when it is none, Conflict when it is
    of another format or version."""
    try:
        data: dict[str, Any] = json.loads((path / marker).read_text())
    except FileNotFoundError as err:
        raise NotFound(f"{path} is not a {what}.",
                       hint=f"{create_hint} (or check that the storage is mounted)") from err
    except (OSError, ValueError) as err:
        raise StorageError(f"cannot read {path / marker}: {err}.") from err
    modes.tighten(path)  # one an older Waymark made is owner-only from now on
    if data.get("format") != fmt or data.get("version") != version:
        raise Conflict(f"{path} holds an unknown {what} format {data.get('format')!r} "
                       f"version {data.get('version')!r}.",
                       hint="Use a Waymark version that knows it.")
    return data

"""The catalog's read path: what the read models (``list``, ``show``, and the API's GETs of them)
read, as a few set-based SQL queries on a DB-API 2 connection, without SQLAlchemy.

Why not the ORM: a command that only reads would spend most of its life importing it (on the
2-core test host ``import sqlalchemy`` alone takes ~190 ms of CPU, its ORM ~40 ms more, the
stdlib ``sqlite3`` ~10 ms; ``waymark checkpoint list`` must answer within 150 ms), and a
listing of 1,000 VMs would build 1,000 ORM objects (and decode two JSON columns each) per
request. So this module imports no SQLAlchemy: the CLI opens its own connection
(:func:`connect`), a server lends one from its pool (:meth:`waymark.catalog.db.Catalog.reading`),
and both read through :class:`Reader`, one consistent snapshot per view.

The SQL is portable (plain ``SELECT`` s, no SQLite-only function), written with ``?``
placeholders, which :class:`Reader` turns into ``%s`` for a driver whose paramstyle is
``format``/``pyformat`` (PostgreSQL's psycopg). Values come back as the driver gives them: JSON
columns as text (decoded here), times as ISO text on SQLite (parsed here, UTC) or as datetimes.
The rows are plain frozen dataclasses with the ORM classes' attribute names
(:mod:`waymark.catalog.models` stays the schema's one definition; ``tests/unit/test_reads.py``
checks that every column read here exists there).
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from waymark.errors import StorageError

HEAD = "0017"  # the schema revision these queries (and catalog/db.py's migrations) are at
FILE_NAME = "catalog.db"
UNFINISHED_JOBS = ("queued", "running")
_NAME = re.compile(r"[a-z_][a-z0-9_]*")


class Cursor(Protocol):
    def execute(self, sql: str, params: Any = ..., /) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def close(self) -> Any: ...


class Connection(Protocol):
    """What a DB-API 2 connection (PEP 249) offers that the read path uses."""

    def cursor(self) -> Cursor: ...
    def rollback(self) -> Any: ...


class Reader:
    """Reads on one DB-API connection, inside one read transaction (:func:`snapshot`)."""

    def __init__(self, conn: Connection | None, paramstyle: str = sqlite3.paramstyle) -> None:
        if conn is None:  # SQLAlchemy's pool gives its connections' driver one as Optional
            raise StorageError("the catalog's connection is closed.",
                               hint="Run the command again.")
        self._conn = conn
        self._format = paramstyle in ("format", "pyformat")
        self._sqlite = isinstance(conn, sqlite3.Connection)

    def rows(self, sql: str, *params: object) -> list[tuple[Any, ...]]:
        cursor = self._conn.cursor()
        try:
            cursor.execute(sql.replace("?", "%s") if self._format else sql, params)
            return cursor.fetchall()  # tuples: sqlite3's and psycopg's default rows
        finally:
            cursor.close()

    def json_number(self, column: str, key: str) -> str:
        """The SQL of one number in a JSON column (so a listing needs not decode the whole
        document of every row): SQLite's ``json_extract``, PostgreSQL's ``->>``."""
        if not (_NAME.fullmatch(column) and _NAME.fullmatch(key)):
            raise ValueError(f"not a column or key name: {column!r}, {key!r}")
        if self._sqlite:
            return f"json_extract({column}, '$.{key}')"
        return f"CAST({column} ->> '{key}' AS BIGINT)"

    def begin(self) -> None:
        """Start the read transaction every later query sees (on SQLite an explicit deferred
        BEGIN: pysqlite begins none for a SELECT, and a reader never waits for a writer in WAL
        mode)."""
        if isinstance(self._conn, sqlite3.Connection) and not self._conn.in_transaction:
            self._conn.execute("BEGIN")
        # other drivers (psycopg) begin a transaction with the first statement themselves

    def end(self) -> None:
        self._conn.rollback()  # nothing was written: let the snapshot go


@contextmanager
def snapshot(conn: Connection | None, paramstyle: str = sqlite3.paramstyle) -> Iterator[Reader]:
    """A :class:`Reader` whose queries all see one committed state of the catalog."""
    reader = Reader(conn, paramstyle)
    reader.begin()
    try:
        yield reader
    finally:
        reader.end()


def connect(home: Path) -> sqlite3.Connection | None:
    """A connection to the catalog of ``home`` for reading, or None when it has no catalog
    yet. No transaction is begun implicitly (:func:`snapshot` begins one)."""
    path = home / FILE_NAME
    if not path.is_file():
        return None
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


# --- values ---------------------------------------------------------------------------------

def moment(value: object) -> datetime:
    """A stored time as an aware datetime in UTC (SQLite keeps it as naive ISO text)."""
    when = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def decoded(value: object) -> Any:
    """A JSON column's value (text on SQLite; already decoded by some drivers)."""
    return json.loads(value) if isinstance(value, str | bytes) else value


# --- the catalog's state ----------------------------------------------------------------------

def revision(reader: Reader) -> str | None:
    """The schema revision alembic recorded (None: no schema yet)."""
    try:
        found = reader.rows("SELECT version_num FROM alembic_version")
    except sqlite3.OperationalError:  # no such table: a catalog never migrated
        return None
    return str(found[0][0]) if found else None


def unfinished_work(reader: Reader) -> bool:
    """Whether a pending intent or an unfinished job may need settling (what opening a full
    context does: :func:`waymark.engine.settle.settle_all`)."""
    return bool(reader.rows(
        "SELECT 1 FROM intents WHERE status = 'pending' UNION ALL "
        f"SELECT 1 FROM jobs WHERE status IN ({', '.join('?' * len(UNFINISHED_JOBS))})",
        *UNFINISHED_JOBS))


# --- VMs --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VmRow:
    id: str
    name: str
    created_at: datetime
    state: str
    config: dict[str, Any]
    checkpoint_type: str
    checkpoint_dir: str
    max_checkpoints: int
    current_checkpoint_id: str | None
    automatic_checkpoints: bool
    automatic_checkpoint_id: str | None
    origin: dict[str, Any] | None
    owner_id: str | None


VM_COLUMNS = ("id, name, created_at, state, config, checkpoint_type, checkpoint_dir, "
              "max_checkpoints, current_checkpoint_id, automatic_checkpoints, "
              "automatic_checkpoint_id, origin, owner_id")


def _vm(row: tuple[Any, ...]) -> VmRow:
    (vm_id, name, created, state, config, kind, folder, most, current, automatic,
     automatic_id, origin, owner) = row
    return VmRow(vm_id, name, moment(created), state, decoded(config), kind, folder, most,
                 current, bool(automatic), automatic_id, decoded(origin), owner)


def vm(reader: Reader, vm_id: str) -> VmRow | None:
    found = reader.rows(f"SELECT {VM_COLUMNS} FROM vms WHERE id = ?", vm_id)
    return _vm(found[0]) if found else None


def vms_named(reader: Reader, name: str) -> list[VmRow]:
    return [_vm(r) for r in reader.rows(f"SELECT {VM_COLUMNS} FROM vms WHERE name = ?", name)]


def vms_with_prefix(reader: Reader, prefix: str) -> list[VmRow]:
    """The VMs whose id starts with ``prefix`` (lower-case hex: no LIKE wildcard in it)."""
    found = reader.rows(f"SELECT {VM_COLUMNS} FROM vms WHERE id LIKE ?", _prefix(prefix))
    return [_vm(r) for r in found]


def _prefix(text: str) -> str:
    escaped = text.replace("%", "").replace("_", "")
    return f"{escaped}%" if escaped == text else "\0"  # a wildcard matches no id


@dataclass(frozen=True)
class VmEntry:
    """A VM as ``vm list`` shows it: what the listing needs, for every VM in one query."""

    id: str
    name: str
    state: str
    memory_mib: int
    cpus: int
    checkpoint_type: str
    owner_id: str | None
    checkpoint_count: int


def vm_entries(reader: Reader) -> list[VmEntry]:
    """Every VM by name, with its checkpoints counted: two queries whatever the number, and
    of each VM's configuration only the two numbers shown."""
    counts = dict(reader.rows("SELECT vm_id, COUNT(*) FROM checkpoints GROUP BY vm_id"))
    memory, cpus = reader.json_number("config", "memory_mib"), reader.json_number("config", "cpus")
    return [VmEntry(vm_id, name, state, int(mib), int(count), kind, owner,
                    counts.get(vm_id, 0))
            for vm_id, name, state, mib, count, kind, owner in reader.rows(
                f"SELECT id, name, state, {memory}, {cpus}, checkpoint_type, owner_id FROM vms "
                "ORDER BY name, id")]


def vm_names(reader: Reader) -> list[tuple[str, str, str | None]]:
    """(id, name, owner id) of every VM."""
    return [(i, n, o) for i, n, o in reader.rows("SELECT id, name, owner_id FROM vms")]


def stored_vm(reader: Reader, ref: str) -> tuple[str, str] | None:
    """(name, library) of a VM this host stored in a library that ``ref`` names (its name or
    an id prefix)."""
    found = reader.rows("SELECT name, library FROM stored_vms WHERE name = ? OR vm_id LIKE ?",
                        ref, _prefix(ref.lower() or "-"))
    return (str(found[0][0]), str(found[0][1])) if found else None


# --- checkpoints ------------------------------------------------------------------------------

@dataclass(frozen=True)
class CheckpointRow:
    id: str
    name: str
    parent_id: str | None
    created_at: datetime
    kind: str
    requested_type: str
    fallback_reason: str | None
    config: dict[str, Any]
    memory_path: str | None
    skipped_disks: list[Any]
    pause_seconds: float | None
    freeze_seconds: float | None
    notes: str | None


def checkpoints(reader: Reader, vm_id: str) -> list[CheckpointRow]:
    """A VM's checkpoints, oldest first (one query)."""
    return [CheckpointRow(c, name, parent, moment(at), kind, wanted, reason, decoded(config),
                          memory, decoded(skipped), pause, freeze, notes)
            for c, name, parent, at, kind, wanted, reason, config, memory, skipped, pause,
            freeze, notes in reader.rows(
                "SELECT id, name, parent_id, created_at, kind, requested_type, "
                "fallback_reason, config, memory_path, skipped_disks, pause_seconds, "
                "freeze_seconds, notes FROM checkpoints WHERE vm_id = ? "
                "ORDER BY created_at, id", vm_id)]


def checkpoint_count(reader: Reader, vm_id: str) -> int:
    return int(reader.rows("SELECT COUNT(*) FROM checkpoints WHERE vm_id = ?", vm_id)[0][0])


def checkpoint_name(reader: Reader, checkpoint_id: str) -> str | None:
    found = reader.rows("SELECT name FROM checkpoints WHERE id = ?", checkpoint_id)
    return str(found[0][0]) if found else None


def vm_ids_by_name(reader: Reader) -> list[str]:
    return [str(r[0]) for r in reader.rows("SELECT id FROM vms ORDER BY name, id")]


# --- the image graph --------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageRow:
    id: str
    path: str
    parent_id: str | None
    pinned: bool
    virtual_size: int
    chain_length: int


def images(reader: Reader, vm_id: str) -> dict[str, ImageRow]:
    return {i: ImageRow(i, path, parent, bool(pinned), size, length)
            for i, path, parent, pinned, size, length in reader.rows(
                "SELECT id, path, parent_id, pinned, virtual_size, chain_length FROM images "
                "WHERE vm_id = ?", vm_id)}


@dataclass(frozen=True)
class DiskRow:
    id: str
    active_image_id: str | None
    passthrough_path: str | None


def disks(reader: Reader, vm_id: str) -> dict[str, DiskRow]:
    return {d: DiskRow(d, active, passthrough) for d, active, passthrough in reader.rows(
        "SELECT id, active_image_id, passthrough_path FROM disks WHERE vm_id = ?", vm_id)}


def frozen_by_checkpoint(reader: Reader, vm_id: str) -> dict[str, dict[str, str]]:
    """checkpoint id -> (disk id -> frozen image id) of every checkpoint of a VM (one query)."""
    found: dict[str, dict[str, str]] = {}
    for checkpoint_id, disk_id, image_id in reader.rows(
            "SELECT f.checkpoint_id, f.disk_id, f.image_id FROM frozen_images f "
            "JOIN checkpoints c ON f.checkpoint_id = c.id WHERE c.vm_id = ?", vm_id):
        found.setdefault(checkpoint_id, {})[disk_id] = image_id
    return found


@dataclass(frozen=True)
class Consolidations:
    """A VM's consolidation switch and its disks' consolidated copies (path, whether Now reads
    through it): engine/consolidation.py keeps them."""

    enabled: bool
    copies: list[tuple[str, bool]]


def consolidations(reader: Reader, vm_id: str) -> Consolidations:
    switch = reader.rows("SELECT consolidation FROM vms WHERE id = ?", vm_id)
    return Consolidations(bool(switch[0][0]) if switch else False, [
        (str(path), bool(linked)) for path, linked in reader.rows(
            "SELECT path, linked FROM consolidations WHERE vm_id = ?", vm_id)])


# --- backups ----------------------------------------------------------------------------------

def backup_bases(reader: Reader) -> list[tuple[str, datetime]]:
    """(VM id, when) of every backup base that has a point (what a VM's last backup was)."""
    return [(vm_id, moment(at)) for vm_id, at in reader.rows(
        "SELECT vm_id, updated_at FROM backup_bases WHERE point_id IS NOT NULL")]

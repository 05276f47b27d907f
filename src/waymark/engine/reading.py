"""The read path: what a command that only reads opens instead of a full
:class:`~waymark.engine.context.Context`, and the VM lookup both share.

Opening a full context imports the ORM, the journal, the executor and (through live merges)
the QMP stack, migrates the catalog and settles what dead commands left; ``waymark checkpoint
list`` needs none of that when the catalog is at the schema's head and nothing is unfinished.
:func:`open_home` checks exactly that, in one read transaction on the stdlib's ``sqlite3``
(:mod:`waymark.catalog.reads`), and gives a :class:`Home` to read from, or None: then the
caller opens the full context, which migrates and settles first. A read model
(:mod:`waymark.usecases.views`) takes any :class:`Source`: a :class:`Home`, or a full context
(whose reads borrow a connection from its pool: :meth:`waymark.catalog.db.Catalog.reading`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from waymark import modes
from waymark.catalog import reads
from waymark.catalog.reads import Reader, VmRow
from waymark.config import Settings
from waymark.errors import Ambiguous, NotFound, WaymarkError
from waymark.model import names

ID_LENGTH = 32  # a VM's id: uuid4().hex


class Source(Protocol):
    """What a read model reads from: the home's files and a catalog snapshot."""

    @property
    def home(self) -> Path: ...

    def reading(self) -> AbstractContextManager[Reader]: ...


@dataclass
class Home:
    """A Waymark home opened for reading only (:func:`open_home`)."""

    settings: Settings
    connection: sqlite3.Connection

    @property
    def home(self) -> Path:
        return self.settings.home

    def reading(self) -> AbstractContextManager[Reader]:
        return reads.snapshot(self.connection)

    def close(self) -> None:
        self.connection.close()


def open_home(settings: Settings) -> Home | None:
    """The home for reading, or None when a full context must open it first: no catalog
    yet, a schema to migrate, or unfinished work to settle (a pending intent, an unfinished
    job). That check and the reads after it are separate snapshots: work a command starts in
    between is what a reader racing that command sees anyway."""
    connection = reads.connect(settings.home)
    if connection is None:
        return None
    modes.tighten(settings.home)  # as opening a context does
    try:
        with reads.snapshot(connection) as reader:
            ready = reads.revision(reader) == reads.HEAD and not reads.unfinished_work(reader)
    except WaymarkError:
        ready = False  # the full context opens it, or says why it cannot
    if not ready:
        connection.close()
        return None
    return Home(settings, connection)


# --- resolving what a person typed --------------------------------------------------------

class Owned(Protocol):
    """A VM as a scope check sees it (a catalog row of either read path)."""

    @property
    def id(self) -> str: ...

    @property
    def owner_id(self) -> str | None: ...


Visible = Callable[[Owned], bool]


def everything(_row: Owned) -> bool:
    return True


def vm(reader: Reader, ref: str, visible: Visible = everything) -> VmRow:
    """Resolve a reference a person typed (for a face: the CLI as root, the API with the
    caller's scope as ``visible``), in this order, only among the VMs ``visible`` accepts:

    1. an exact full id: always that VM, whatever any VM is named;
    2. a name (names are unique per owner: several matches are ambiguous);
    3. an id prefix matching one VM.

    Use cases never resolve again: they take the id this returns."""
    exact = reads.vm(reader, ref.lower()) if len(ref) == ID_LENGTH else None
    if exact is not None and visible(exact):
        return exact
    named = [v for v in reads.vms_named(reader, ref) if visible(v)]
    if len(named) == 1:
        return named[0]
    if len(named) > 1:
        raise _ambiguous(ref, named, "Name one by its id.")
    matches = [v for v in reads.vms_with_prefix(reader, ref.lower()) if visible(v)] \
        if ref else []
    if not matches:
        raise _stored(reader, ref) or NotFound(
            f"no VM is named {ref!r} or has an id starting with it.",
            hint=names.did_you_mean(ref, visible_names(reader, visible),
                                    "List them with: waymark vm list"))
    if len(matches) > 1:
        raise _ambiguous(ref, matches, "Name one by its name or a longer id prefix.")
    return matches[0]


@dataclass(frozen=True)
class _Named:
    id: str
    name: str
    owner_id: str | None


def visible_names(reader: Reader, visible: Visible = everything) -> list[str]:
    """The names of the VMs ``visible`` accepts (what a "did you mean" may offer)."""
    return [row.name for row in (_Named(*found) for found in reads.vm_names(reader))
            if visible(row)]


def _ambiguous(ref: str, rows: Sequence[VmRow], hint: str) -> Ambiguous:
    listing = "\n".join(f"  {m.id[:12]}  {m.name}" for m in rows)
    return Ambiguous(f"{len(rows)} VMs match {ref!r}:\n{listing}", hint=hint)


def _stored(reader: Reader, ref: str) -> NotFound | None:
    """The error for a VM this host stored in a library: it cannot be used until deployed."""
    found = reads.stored_vm(reader, ref)
    if found is None:
        return None
    name, library = found
    return NotFound(f"VM {name!r} is stored in the library {library}: it cannot be "
                    "started, changed or checkpointed until it is deployed.",
                    hint=f"Deploy it: waymark vm deploy {name} --library {library}")


def vm_by_id(reader: Reader, vm_id: str) -> VmRow:
    """The VM with this id (a face resolved the reference once, :func:`vm`); never a name."""
    found = reads.vm(reader, vm_id)
    if found is None:
        raise NotFound(f"no VM has the id {vm_id!r} (it was deleted meanwhile).",
                       hint="List them with: waymark vm list")
    return found

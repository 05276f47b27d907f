"""The journal's file steps: one frozen dataclass per op, plain data the journal stores.

Each step is idempotent: running it again after a crash (before, during or after its first run)
leaves the same files. :mod:`waymark.engine.executor` runs the ones the engine does itself; the
``qmp_*`` ones are done through a running QEMU by :mod:`waymark.engine.running.live_merge`,
registered with the executor by the composition root (:mod:`waymark.wiring`).

One JSON form (:mod:`waymark.engine.jsonform`): :meth:`StepBase.to_json` is ``{"op": ...,
fields}``, the shape the journal has always stored, and :func:`from_json` reads it back checked
(an unknown op: :class:`~waymark.errors.UnknownKind`; a missing, ill-typed or unknown field:
:class:`~waymark.errors.MalformedRecord`).

Each class marks the fields that are file paths (``metadata=FILE``): :meth:`StepBase.paths`
lists every file or folder a step makes, reads or names (``waymark check`` never calls them
stray while the intent is unfinished). A step is ``undoable`` when it only makes a new file
(:class:`NewFile`): a *prepare* intent consists of such steps only. ``abandonable`` (a
:class:`MergeStep`): a cancelled job may stop in it.
"""

from __future__ import annotations

import typing
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from waymark.engine import jsonform
from waymark.errors import MalformedRecord, UnknownKind

HINT = ("This Waymark does not know that step (a newer Waymark wrote it?). Run the Waymark "
        "that wrote it, or report a bug.")
FILE = {"file": True}  # the metadata of a field that is a file (or folder) path


@dataclass(frozen=True, kw_only=True)
class StepBase:
    """What every step has: its op (the JSON ``"op"``) and its one JSON form."""

    op: ClassVar[str]
    undoable: ClassVar[bool] = False

    def paths(self) -> tuple[str, ...]:
        """Every file or folder the step makes, reads or names, the one it changes first."""
        return tuple(str(getattr(self, f.name)) for f in fields(self)
                     if f.metadata.get("file") and getattr(self, f.name) is not None)

    def to_json(self) -> dict[str, Any]:
        return {"op": self.op, **jsonform.dump(self)}

    @classmethod
    def from_json(cls, data: Any) -> StepBase:
        """Any step (:func:`from_json`): how a record that holds steps reads them."""
        return from_json(data)


@dataclass(frozen=True, kw_only=True)
class NewFile(StepBase):
    """A step that only makes ``path`` (undo: delete it, and its temporary file)."""

    undoable: ClassVar[bool] = True
    path: str = field(metadata=FILE)


@dataclass(frozen=True, kw_only=True)
class MergeStep(StepBase):
    """A step of a merge; ``abandonable``: a cancelled job may stop in it, since its partial work
    changes no content anyone reads (the journal closes the intent ``cancelled``)."""

    abandonable: bool = False


# --- the steps the executor runs --------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class MakeDir(NewFile):
    """A new VM's folder (undo: remove it and what is under it if all empty)."""

    op: ClassVar[str] = "make_dir"


@dataclass(frozen=True, kw_only=True)
class CreateImage(NewFile):
    """A new qcow2 (undo: delete it): a base of ``size`` bytes or an overlay on ``backing``;
    ``unsafe`` overlays a backing file a running QEMU holds locked; ``bitmaps_from``: the image
    whose change-tracking bitmaps it takes over (a checkpoint)."""

    op: ClassVar[str] = "create_image"
    size: int | None = None
    backing: str | None = field(default=None, metadata=FILE)
    backing_fmt: str | None = None
    unsafe: bool = False
    bitmaps_from: str | None = field(default=None, metadata=FILE)


@dataclass(frozen=True, kw_only=True)
class ClaimFile(NewFile):
    """Nothing yet: a file the operation's live part writes (QEMU's memory state), removed with
    its temporary file on undo."""

    op: ClassVar[str] = "claim_file"


@dataclass(frozen=True, kw_only=True)
class WriteFile(NewFile):
    """A durable small file (undo: delete it)."""

    op: ClassVar[str] = "write_file"
    text: str


@dataclass(frozen=True, kw_only=True)
class Convert(NewFile):
    """A standalone qcow2 copy of ``src``'s chain (undo: delete); with ``confined_to`` (a folder
    on untrusted storage) the chain is checked again and copied from the very files checked
    (:func:`waymark.external.shares.pinned_chain`), each run."""

    op: ClassVar[str] = "convert"
    src: str = field(metadata=FILE)
    src_fmt: str
    confined_to: str | None = field(default=None, metadata=FILE)


@dataclass(frozen=True, kw_only=True)
class CopyFile(NewFile):
    """A durable copy (or hard link) of ``src`` (undo: delete); with ``confined_to``, of the
    regular file opened (no link followed) inside it."""

    op: ClassVar[str] = "copy_file"
    src: str = field(metadata=FILE)
    confined_to: str | None = field(default=None, metadata=FILE)


@dataclass(frozen=True, kw_only=True)
class WriteManifest(NewFile):
    """``doc`` plus the sha256 and size of every file under ``root`` (by relative path), written
    durably (undo: delete)."""

    op: ClassVar[str] = "write_manifest"
    root: str = field(metadata=FILE)
    doc: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class DeleteFile(StepBase):
    op: ClassVar[str] = "delete_file"
    path: str = field(metadata=FILE)


@dataclass(frozen=True, kw_only=True)
class PruneDirs(StepBase):
    """Remove the empty folders of a tree."""

    op: ClassVar[str] = "prune_dirs"
    path: str = field(metadata=FILE)


@dataclass(frozen=True, kw_only=True)
class Commit(MergeStep):
    """``top``'s own clusters into ``base``; ``top`` unchanged."""

    op: ClassVar[str] = "commit"
    base: str = field(metadata=FILE)  # (first: the file it changes)
    top: str = field(metadata=FILE)


@dataclass(frozen=True, kw_only=True)
class Rebase(MergeStep):
    """``path`` now backed by ``backing`` (None: standalone): content-preserving unless
    ``unsafe``."""

    op: ClassVar[str] = "rebase"
    path: str = field(metadata=FILE)
    backing: str | None = field(default=None, metadata=FILE)
    backing_fmt: str | None = None
    unsafe: bool = False


@dataclass(frozen=True, kw_only=True)
class CarryBitmaps(StepBase):
    """``path``'s change-tracking bitmaps become copies of ``src``'s
    (:func:`waymark.qemu.bitmaps.carry_files`; the image becoming a disk's active one)."""

    op: ClassVar[str] = "carry_bitmaps"
    src: str = field(metadata=FILE)
    path: str = field(metadata=FILE)

    def paths(self) -> tuple[str, ...]:
        return self.path, self.src  # the one it changes first


# --- the steps done through a running QEMU (engine.running.live_merge) ------------------------

@dataclass(frozen=True, kw_only=True)
class LiveStep(StepBase):
    """A merge step on the images VM ``name``'s QEMU (its run folder ``run``) has open; redone
    with qemu-img when that QEMU is gone."""

    run: str
    name: str

    def paths(self) -> tuple[str, ...]:
        return *super().paths(), self.run  # the run folder is named, never changed


@dataclass(frozen=True, kw_only=True)
class QmpCommit(LiveStep, MergeStep):
    """K (``top``, node ``top_node``) into U (``base``, node ``base_node``) by QEMU's
    ``block-commit`` job ``job``; ``root`` is the disk's active node (a node name, no file);
    ``active``: K is the active image (QEMU pivots the disk onto U)."""

    op: ClassVar[str] = "qmp_commit"
    root: str
    base: str = field(metadata=FILE)  # (first: the file it changes)
    top: str = field(metadata=FILE)
    top_node: str
    base_node: str
    active: bool
    job: str


@dataclass(frozen=True, kw_only=True)
class QmpStream(LiveStep, MergeStep):
    """``gone``'s clusters into ``path`` (node ``node``) by QEMU's ``block-stream`` job ``job``;
    ``path``'s backing becomes ``backing`` (node ``base_node``; None: standalone)."""

    op: ClassVar[str] = "qmp_stream"
    path: str = field(metadata=FILE)
    node: str
    gone: str = field(metadata=FILE)
    base_node: str | None
    backing: str | None = field(metadata=FILE)
    backing_fmt: str | None
    job: str


@dataclass(frozen=True, kw_only=True)
class QmpRelink(LiveStep):
    """``path`` (in a live chain) now backed by ``backing``: QEMU's commit already wrote the link
    when QEMU runs; when it is gone the commit was redone by qemu-img, and so is this."""

    op: ClassVar[str] = "qmp_relink"
    path: str = field(metadata=FILE)
    backing: str = field(metadata=FILE)
    backing_fmt: str


@dataclass(frozen=True, kw_only=True)
class QmpRelease(LiveStep):
    """QEMU lets go of node ``node`` (``blockdev-del``), if it still holds it."""

    op: ClassVar[str] = "qmp_release"
    node: str


Step = (MakeDir | CreateImage | ClaimFile | WriteFile | Convert | CopyFile | WriteManifest
        | DeleteFile | PruneDirs | Commit | Rebase | CarryBitmaps
        | QmpCommit | QmpStream | QmpRelink | QmpRelease)
KINDS: dict[str, type[StepBase]] = {cls.op: cls for cls in typing.get_args(Step)}


def from_json(data: Any) -> Step:
    """The step the journal stored as ``data`` (see :meth:`StepBase.to_json`), checked."""
    if not isinstance(data, dict):
        raise MalformedRecord(f"a journal step is {data!r}, not an object.", hint=jsonform.HINT)
    op = data.get("op")
    cls = KINDS.get(op) if isinstance(op, str) else None
    if cls is None:
        raise UnknownKind(f"the journal has no step {op!r} ({data!r}).", hint=HINT)
    body = {key: value for key, value in data.items() if key != "op"}
    step: Step = jsonform.load(cls, body, f"the journal's {op} step")  # type: ignore[assignment]
    return step


def to_json_list(steps: Iterable[StepBase]) -> list[dict[str, Any]]:
    return [step.to_json() for step in steps]


def from_json_list(data: Any) -> list[Step]:
    if not isinstance(data, list):
        raise MalformedRecord(f"a journal's steps are {data!r}, not a list.", hint=jsonform.HINT)
    return [from_json(item) for item in data]

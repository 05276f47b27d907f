"""The journal's file steps: one frozen record (:class:`msgspec.Struct`) per op, plain data the
journal stores.

Each step is idempotent: running it again after a crash (before, during or after its first run)
leaves the same files. :mod:`waymark.engine.executor` runs the ones the engine does itself; the
``qmp_*`` ones are done through a running QEMU by :mod:`waymark.engine.running.live_merge`,
registered with the executor by the composition root (:mod:`waymark.wiring`).

One JSON form (:mod:`waymark.engine.records`): the steps are a tagged union on ``"op"`` (each
class's ``tag``, also its ``op``), so :meth:`StepBase.to_json` is ``{"op": ..., fields}``, the
shape the journal has always stored, and :func:`from_json` reads it back checked (an unknown op:
:class:`~waymark.errors.UnknownKind`; a missing, ill-typed or unknown field:
:class:`~waymark.errors.MalformedRecord`).

Each class lists the fields that are file paths in ``files``, the one it changes first:
:meth:`StepBase.paths` lists every file or folder a step makes, reads or names (``waymark
check`` never calls them stray while the intent is unfinished). A step is ``undoable`` when it
only makes a new file (:class:`NewFile`): a *prepare* intent consists of such steps only.
``abandonable`` (a :class:`MergeStep` or :class:`LiveMergeStep`): a cancelled job may stop in it.
"""

from __future__ import annotations

import typing
from collections.abc import Iterable
from typing import Any, ClassVar

from waymark.engine import records
from waymark.engine.records import Record
from waymark.errors import MalformedRecord

HINT = records.UNKNOWN_STEP_HINT


class StepBase(Record, frozen=True, kw_only=True, tag_field=records.TAG):
    """What every step has: its op (the JSON ``"op"``, the class's msgspec ``tag``), the fields
    that are file (or folder) paths (``files``) and its one JSON form."""

    op: ClassVar[str]
    undoable: ClassVar[bool] = False
    files: ClassVar[tuple[str, ...]] = ()

    def paths(self) -> tuple[str, ...]:
        """Every file or folder the step makes, reads or names, the one it changes first."""
        return tuple(str(path) for path in (getattr(self, name) for name in self.files)
                     if path is not None)

    def to_json(self) -> dict[str, Any]:
        return records.dump(self)

    @classmethod
    def from_json(cls, data: Any) -> StepBase:
        """Any step (:func:`from_json`); a record holding steps has msgspec read them."""
        return from_json(data)


class NewFile(StepBase, frozen=True, kw_only=True):
    """A step that only makes ``path`` (undo: delete it, and its temporary file)."""

    undoable: ClassVar[bool] = True
    files: ClassVar[tuple[str, ...]] = ("path",)
    path: str


class MergeStep(StepBase, frozen=True, kw_only=True):
    """A step of a merge; ``abandonable``: a cancelled job may stop in it, since its partial work
    changes no content anyone reads (the journal closes the intent ``cancelled``)."""

    abandonable: bool = False


# --- the steps the executor runs --------------------------------------------------------------

class MakeDir(NewFile, frozen=True, kw_only=True, tag="make_dir"):
    """A new VM's folder (undo: remove it and what is under it if all empty)."""


class CreateImage(NewFile, frozen=True, kw_only=True, tag="create_image"):
    """A new qcow2 (undo: delete it): a base of ``size`` bytes or an overlay on ``backing``;
    ``unsafe`` overlays a backing file a running QEMU holds locked; ``bitmaps_from``: the image
    whose change-tracking bitmaps it takes over (a checkpoint)."""

    files: ClassVar[tuple[str, ...]] = ("path", "backing", "bitmaps_from")
    size: int | None = None
    backing: str | None = None
    backing_fmt: str | None = None
    unsafe: bool = False
    bitmaps_from: str | None = None


class MakeTpm(NewFile, frozen=True, kw_only=True, tag="make_tpm"):
    """A new VM's TPM in the folder ``path``: manufactured, or with ``state`` (base64: an
    imported or restored VM's) (undo: remove the folder)."""

    state: str | None = None


class WriteTpmState(StepBase, frozen=True, kw_only=True, tag="write_tpm_state"):
    """Now's TPM state in the folder ``path`` replaced by ``state`` (base64; a checkpoint's,
    on apply). Redone whole after a crash."""

    files: ClassVar[tuple[str, ...]] = ("path",)
    path: str
    state: str


class ClaimFile(NewFile, frozen=True, kw_only=True, tag="claim_file"):
    """Nothing yet: a file the operation's live part writes (QEMU's memory state), removed with
    its temporary file on undo."""


class WriteFile(NewFile, frozen=True, kw_only=True, tag="write_file"):
    """A durable small file (undo: delete it)."""

    text: str


class Convert(NewFile, frozen=True, kw_only=True, tag="convert"):
    """A standalone qcow2 copy of ``src``'s chain (undo: delete); with ``confined_to`` (a folder
    on untrusted storage) the chain is checked again and copied from the very files checked
    (:func:`waymark.external.shares.pinned_chain`), each run."""

    files: ClassVar[tuple[str, ...]] = ("path", "src", "confined_to")
    src: str
    src_fmt: str
    confined_to: str | None = None


class CopyFile(NewFile, frozen=True, kw_only=True, tag="copy_file"):
    """A durable copy (or hard link) of ``src`` (undo: delete); with ``confined_to``, of the
    regular file opened (no link followed) inside it."""

    files: ClassVar[tuple[str, ...]] = ("path", "src", "confined_to")
    src: str
    confined_to: str | None = None


class WriteManifest(NewFile, frozen=True, kw_only=True, tag="write_manifest"):
    """``doc`` plus the sha256 and size of every file under ``root`` (by relative path), written
    durably (undo: delete)."""

    files: ClassVar[tuple[str, ...]] = ("path", "root")
    root: str
    doc: dict[str, Any]


class DeleteFile(StepBase, frozen=True, kw_only=True, tag="delete_file"):
    files: ClassVar[tuple[str, ...]] = ("path",)
    path: str


class DeleteFiles(StepBase, frozen=True, kw_only=True, tag="delete_files"):
    """Every file of ``targets`` (nothing references any of them: removed in parallel, in no
    order), then one directory fsync per folder: one journal point for a whole run of layers
    (or a delete's checkpoint files), not one each. Redone whole after a crash (a file already
    gone is skipped)."""

    targets: list[str]

    def paths(self) -> tuple[str, ...]:
        return tuple(self.targets)


def removal(targets: list[str]) -> DeleteFile | DeleteFiles:
    """The step that removes ``targets`` (at least one): one file keeps the ``delete_file``
    form the journal has always stored, several are one ``delete_files``."""
    return DeleteFile(path=targets[0]) if len(targets) == 1 else DeleteFiles(targets=targets)


class PruneDirs(StepBase, frozen=True, kw_only=True, tag="prune_dirs"):
    """Remove the empty folders of a tree."""

    files: ClassVar[tuple[str, ...]] = ("path",)
    path: str


class Commit(MergeStep, frozen=True, kw_only=True, tag="commit"):
    """``top``'s own clusters into ``base``; ``top`` unchanged."""

    files: ClassVar[tuple[str, ...]] = ("base", "top")  # (first: the file it changes)
    base: str
    top: str


class Rebase(MergeStep, frozen=True, kw_only=True, tag="rebase"):
    """``path`` now backed by ``backing`` (None: standalone): content-preserving unless
    ``unsafe``."""

    files: ClassVar[tuple[str, ...]] = ("path", "backing")
    path: str
    backing: str | None = None
    backing_fmt: str | None = None
    unsafe: bool = False


class CarryBitmaps(StepBase, frozen=True, kw_only=True, tag="carry_bitmaps"):
    """``path``'s change-tracking bitmaps become copies of ``src``'s
    (:func:`waymark.qemu.bitmaps.carry_files`; the image becoming a disk's active one)."""

    files: ClassVar[tuple[str, ...]] = ("path", "src")  # (first: the one it changes)
    src: str
    path: str


# --- the steps done through a running QEMU (engine.running.live_merge) ------------------------

class LiveStep(StepBase, frozen=True, kw_only=True):
    """A merge step on the images VM ``name``'s QEMU (its run folder ``run``, last in each
    class's ``files``: named, never changed) has open; redone with qemu-img when that QEMU is
    gone."""

    run: str
    name: str


class LiveMergeStep(LiveStep, frozen=True, kw_only=True):
    """A live step of a merge, ``abandonable`` as a :class:`MergeStep` is (a msgspec Struct has
    one base with fields: the field is declared again here)."""

    abandonable: bool = False


class QmpCommit(LiveMergeStep, frozen=True, kw_only=True, tag="qmp_commit"):
    """K (``top``, node ``top_node``) into U (``base``, node ``base_node``) by QEMU's
    ``block-commit`` job ``job``; ``root`` is the disk's active node (a node name, no file);
    ``active``: K is the active image (QEMU pivots the disk onto U)."""

    files: ClassVar[tuple[str, ...]] = ("base", "top", "run")  # (first: the file it changes)
    root: str
    base: str
    top: str
    top_node: str
    base_node: str
    active: bool
    job: str


class QmpStream(LiveMergeStep, frozen=True, kw_only=True, tag="qmp_stream"):
    """``gone``'s clusters into ``path`` (node ``node``) by QEMU's ``block-stream`` job ``job``;
    ``path``'s backing becomes ``backing`` (node ``base_node``; None: standalone)."""

    files: ClassVar[tuple[str, ...]] = ("path", "gone", "backing", "run")
    path: str
    node: str
    gone: str
    base_node: str | None
    backing: str | None
    backing_fmt: str | None
    job: str


class QmpRelink(LiveStep, frozen=True, kw_only=True, tag="qmp_relink"):
    """``path`` (in a live chain) now backed by ``backing``: QEMU's commit already wrote the link
    when QEMU runs; when it is gone the commit was redone by qemu-img, and so is this."""

    files: ClassVar[tuple[str, ...]] = ("path", "backing", "run")
    path: str
    backing: str
    backing_fmt: str


class QmpRelease(LiveStep, frozen=True, kw_only=True, tag="qmp_release"):
    """QEMU lets go of node ``node`` (``blockdev-del``), if it still holds it."""

    files: ClassVar[tuple[str, ...]] = ("run",)
    node: str


# --- consolidation (waymark.engine.consolidation) ---------------------------------------------

class CommitOnto(StepBase, frozen=True, kw_only=True, tag="commit_onto"):
    """``top``'s own clusters into ``into``, a consolidation holding the view of ``top``'s real
    backing file (:func:`waymark.images.qemu_img.commit_onto`): ``into`` then holds ``top``'s
    view; ``top`` (a frozen image) is unchanged. Redone whole after a crash (``top``'s clusters
    win, so a second run writes the same)."""

    files: ClassVar[tuple[str, ...]] = ("into", "top")  # (first: the file it changes)
    into: str
    top: str


class QmpLink(LiveStep, frozen=True, kw_only=True, tag="qmp_link"):
    """Active image ``path`` (QEMU's node ``node`` over file node ``file_node``) now backed by
    ``backing`` (format ``backing_fmt``): its consolidation, or its real parent. While QEMU
    runs, the backing's nodes (``layers``: node, file node, file, format, pinned; top first, the one
    ``backing`` names first) are added where missing, ``node`` is reopened onto the top one,
    its header rewritten by QEMU (``change-backing-file``) and the ``release`` nodes QEMU no
    longer reads deleted; when QEMU is gone, the header only (``qemu-img rebase -u``). Each
    part is idempotent (:mod:`waymark.engine.running.live_consolidation`)."""

    files: ClassVar[tuple[str, ...]] = ("path", "backing", "run")
    path: str
    node: str
    file_node: str
    backing: str
    backing_fmt: str
    layers: list[tuple[str, str, str, str, bool]]
    release: list[str]

    def paths(self) -> tuple[str, ...]:
        return (*super().paths(), *(layer[2] for layer in self.layers))


Step = (MakeDir | CreateImage | ClaimFile | WriteFile | Convert | CopyFile | WriteManifest
        | DeleteFile | DeleteFiles | PruneDirs | Commit | Rebase | CarryBitmaps | MakeTpm
        | WriteTpmState | QmpCommit | QmpStream | QmpRelink | QmpRelease | CommitOnto | QmpLink)
ABANDONABLE = (MergeStep, LiveMergeStep)  # the classes with ``abandonable``


def _op(cls: type[StepBase]) -> type[StepBase]:
    """``cls`` with its ``op``: its msgspec tag, the one place the op is spelled."""
    cls.op = str(cls.__struct_config__.tag)
    return cls


KINDS: dict[str, type[StepBase]] = {_op(cls).op: cls for cls in typing.get_args(Step)}


def from_json(data: Any) -> Step:
    """The step the journal stored as ``data`` (see :meth:`StepBase.to_json`), checked."""
    if not isinstance(data, dict):
        raise MalformedRecord(f"a journal step is {data!r}, not an object.", hint=records.HINT)
    op = data.get(records.TAG)
    cls = KINDS.get(op) if isinstance(op, str) else None
    if cls is None:
        raise records.unknown_step(op, data)
    step: Step = records.load(cls, data, f"the journal's {op} step")
    return step


def to_json_list(steps: Iterable[StepBase]) -> list[dict[str, Any]]:
    return [step.to_json() for step in steps]


def from_json_list(data: Any) -> list[Step]:
    if not isinstance(data, list):
        raise MalformedRecord(f"a journal's steps are {data!r}, not a list.", hint=records.HINT)
    return [from_json(item) for item in data]


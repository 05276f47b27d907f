"""Runs the journal's file steps. Each step is idempotent: running it again after a crash
(whether the crash came before, during or after its first run) leaves the same files.

Steps are plain JSON dicts, so the journal can store them:

- ``make_dir {path}``: a new VM's folder (undo: remove it and what is under it if all empty)
- ``create_image {path, size?, backing?, backing_fmt?, unsafe?, bitmaps_from?}``: a new qcow2
  (undo: delete it); ``unsafe`` overlays a backing file a running QEMU holds locked;
  ``bitmaps_from``: the image whose change-tracking bitmaps it takes over (a checkpoint)
- ``claim_file {path}``: nothing yet; a file the operation's live part writes (QEMU's memory
  state), removed with its temporary file on undo
- ``write_file {path, text}``: a durable small file (undo: delete it)
- ``convert {path, src, src_fmt, confined_to?}``: a standalone qcow2 copy of ``src``'s chain
  (undo: delete); with ``confined_to`` (a folder on untrusted storage) the chain is checked
  again and copied from the very files checked (:func:`waymark.external.shares.pinned_chain`), each
  run
- ``copy_file {path, src, confined_to?}``: a durable copy (or hard link) of ``src`` (undo:
  delete); with ``confined_to``, of the regular file opened (no link followed) inside it
- ``write_manifest {path, root, doc}``: ``doc`` plus the sha256 and size of every file under
  ``root`` (by relative path), written durably (undo: delete)
- ``delete_file {path}``
- ``prune_dirs {path}``: remove the empty folders of a tree
- ``commit {top, base}``: ``top``'s own clusters into ``base``; ``top`` unchanged
- ``rebase {path, backing, backing_fmt, unsafe}``: content-preserving unless ``unsafe``
- ``carry_bitmaps {src, path}``: ``path``'s change-tracking bitmaps become copies of ``src``'s
  (:func:`waymark.qemu.bitmaps.carry_files`; the image becoming a disk's active one)
- ``qmp_commit``, ``qmp_stream``, ``qmp_release``: the same through a running QEMU
  (:mod:`waymark.engine.running.live_merge`)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from waymark import durable
from waymark.errors import StorageError, UnknownKind
from waymark.external import shares
from waymark.images import qemu_img
from waymark.qemu import bitmaps

Step = dict[str, Any]
StepFn = Callable[[Step, qemu_img.Progress], None]
# Steps done by a running QEMU (``qmp_commit``, ``qmp_stream``, ``qmp_relink``,
# ``qmp_release``, :mod:`waymark.engine.running.live_merge`), registered by the composition root
# (:mod:`waymark.wiring`); each falls back to qemu-img when that QEMU is gone.
LIVE_OPS: dict[str, StepFn] = {}
# The steps this module runs itself (the live ones above are registered)
BUILT_IN = frozenset({"make_dir", "create_image", "claim_file", "write_file", "delete_file",
                      "prune_dirs", "copy_file", "write_manifest", "commit", "rebase", "convert",
                      "carry_bitmaps"})
UNDOABLE = frozenset({"make_dir", "create_image", "write_file", "convert", "copy_file",
                      "claim_file", "write_manifest"})


def register_steps(steps: dict[str, StepFn]) -> None:
    """Make the steps done through a running QEMU known (the composition root calls this)."""
    LIVE_OPS.update(steps)


def kinds() -> frozenset[str]:
    """Every step op this executor can run."""
    return BUILT_IN | frozenset(LIVE_OPS)


def _opt_path(value: Any) -> Path | None:
    return None if value is None else Path(value)


def _prune_empty(root: Path) -> None:
    """Remove ``root`` and the folders below it that are empty; keep anything with a file."""
    if not root.is_dir():
        return
    for folder in sorted((p for p in root.rglob("*") if p.is_dir()), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()
    if not any(root.iterdir()):
        root.rmdir()
        durable.fsync_dir(root.parent)


def run(step: Step, on_progress: qemu_img.Progress = None) -> None:
    """Run one step; long ones report their fraction done to ``on_progress``."""
    try:
        _run(step, on_progress)
    except OSError as err:
        raise StorageError(f"could not {step['op'].replace('_', ' ')} "
                           f"{err.filename or step.get('path', '')}: {err.strerror}",
                           hint="Fix the folder (space, permissions, path), then run the "
                                "command again.") from err


def _run(step: Step, on_progress: qemu_img.Progress) -> None:
    op = step["op"]
    path = Path(step["path"]) if "path" in step else None
    if op == "make_dir" and path is not None:
        path.mkdir(parents=True, exist_ok=True)
    elif op == "create_image" and path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        qemu_img.create(path, size=step.get("size"), backing=_opt_path(step.get("backing")),
                        backing_fmt=step.get("backing_fmt"), unsafe=bool(step.get("unsafe")))
        if step.get("bitmaps_from"):  # (a re-run re-creates the file: never a stale bitmap)
            bitmaps.onto_new_file(Path(step["bitmaps_from"]), path)
        durable.fsync_file(path)
    elif op == "claim_file" and path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    elif op == "write_file" and path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        durable.write_bytes(path, str(step["text"]).encode())
    elif op == "delete_file" and path is not None:
        durable.remove(path)
    elif op == "prune_dirs" and path is not None:
        _prune_empty(path)
    elif op == "copy_file" and path is not None:
        _copy_file(step, path, on_progress)
    elif op == "write_manifest" and path is not None:
        _write_manifest(path, Path(step["root"]), step["doc"])
    elif op in LIVE_OPS:
        LIVE_OPS[op](step, on_progress)
    elif not _run_image(step, path, on_progress):
        raise UnknownKind(f"the journal has no step {op!r} ({step!r}).",
                          hint="This Waymark does not know that step (a newer Waymark wrote "
                               "it?). Run the Waymark that wrote it, or report a bug.")


def _write_manifest(path: Path, root: Path, doc: dict[str, Any]) -> None:
    files = {str(p.relative_to(root.parent)): {"sha256": durable.sha256(p),
                                               "size": p.stat().st_size}
             for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(".")}
    path.parent.mkdir(parents=True, exist_ok=True)
    durable.write_bytes(path, json.dumps({**doc, "files": files}, indent=2).encode())


def _run_image(step: Step, path: Path | None, on_progress: qemu_img.Progress) -> bool:
    """The steps that change images; False for an op that is not one of them."""
    op = step["op"]
    if op == "commit":
        qemu_img.commit(Path(step["top"]), Path(step["base"]), on_progress)
        durable.fsync_file(Path(step["base"]))
    elif op == "rebase" and path is not None:
        qemu_img.rebase(path, _opt_path(step.get("backing")), step.get("backing_fmt"),
                        unsafe=bool(step.get("unsafe")), on_progress=on_progress)
        durable.fsync_file(path)
    elif op == "convert" and path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        _convert(step, path, on_progress)
        durable.fsync_file(path)
    elif op == "carry_bitmaps" and path is not None:
        bitmaps.carry_files(Path(step["src"]), path)
    else:
        return False
    return True


def _convert(step: Step, path: Path, on_progress: qemu_img.Progress) -> None:
    src = Path(step["src"])
    if step.get("confined_to") is None:
        qemu_img.convert(src, step["src_fmt"], path, on_progress=on_progress)
        return
    with shares.pinned_chain(Path(step["confined_to"]), src, where=str(src)) as layers:
        qemu_img.convert_pinned([layer.fd for layer in layers], path, on_progress)


def _copy_file(step: Step, path: Path, on_progress: qemu_img.Progress) -> None:
    src = Path(step["src"])
    if step.get("confined_to") is None:
        durable.link_or_copy(src, path, on_progress)
        return
    with shares.opened_inside(Path(step["confined_to"]), src, where=str(src)) as fd:
        durable.link_or_copy(src, path, on_progress, fd=fd)


def undo(step: Step) -> None:
    """Remove what an undoable step made (it may have been only half made)."""
    if step["op"] == "make_dir":
        _prune_empty(Path(step["path"]))
    elif step["op"] in UNDOABLE:
        durable.remove(Path(step["path"]))
        durable.remove(durable.temp_path(Path(step["path"])))

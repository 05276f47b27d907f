"""Runs the journal's file steps (:mod:`waymark.engine.steps`, where each op is described).
Each step is idempotent: running it again after a crash (whether the crash came before, during
or after its first run) leaves the same files.

Dispatch is by the step's class through a table: the steps this module runs itself
(:data:`BUILT_IN`), and those done by a running QEMU (``qmp_*``,
:mod:`waymark.engine.running.live_merge`), registered by the composition root
(:mod:`waymark.wiring`, :func:`register_steps`).
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from waymark import durable
from waymark.engine import steps
from waymark.errors import StorageError, UnknownKind
from waymark.external import shares
from waymark.images import qemu_img
from waymark.qemu import bitmaps, tpm

Step = steps.Step
# A step's runner: the step (of the class it is registered for), the progress callback
StepFn = Callable[[Any, qemu_img.Progress], None]
# Steps done by a running QEMU (:mod:`waymark.engine.running.live_merge`), registered by the
# composition root (:mod:`waymark.wiring`); each falls back to qemu-img when that QEMU is gone.
LIVE: dict[type[steps.StepBase], StepFn] = {}


def register_steps(runners: Mapping[type[steps.StepBase], StepFn]) -> None:
    """Make the steps done through a running QEMU known (the composition root calls this)."""
    LIVE.update(runners)


def kinds() -> frozenset[str]:
    """Every step op this executor can run."""
    return frozenset(cls.op for cls in {**BUILT_IN, **LIVE})


def _opt_path(value: str | None) -> Path | None:
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
    runner = LIVE.get(type(step)) or BUILT_IN.get(type(step))
    if runner is None:
        raise UnknownKind(f"the journal has no runner for step {step.op!r} ({step!r}).",
                          hint=steps.HINT)
    try:
        runner(step, on_progress)
    except OSError as err:
        raise StorageError(f"could not {step.op.replace('_', ' ')} "
                           f"{err.filename or next(iter(step.paths()), '')}: {err.strerror}",
                           hint="Fix the folder (space, permissions, path), then run the "
                                "command again.") from err


def _make_dir(step: steps.MakeDir, on_progress: qemu_img.Progress) -> None:
    Path(step.path).mkdir(parents=True, exist_ok=True)


def _create_image(step: steps.CreateImage, on_progress: qemu_img.Progress) -> None:
    path = Path(step.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    qemu_img.create(path, size=step.size, backing=_opt_path(step.backing),
                    backing_fmt=step.backing_fmt, unsafe=step.unsafe)
    if step.bitmaps_from:  # (a re-run re-creates the file: never a stale bitmap)
        bitmaps.onto_new_file(Path(step.bitmaps_from), path)
    durable.fsync_file(path)


def _claim_file(step: steps.ClaimFile, on_progress: qemu_img.Progress) -> None:
    Path(step.path).parent.mkdir(parents=True, exist_ok=True)


def _make_tpm(step: steps.MakeTpm, on_progress: qemu_img.Progress) -> None:
    if step.state is not None:
        tpm.write_state(Path(step.path), base64.b64decode(step.state))
    elif not tpm.state_file(Path(step.path)).is_file():
        tpm.manufacture(Path(step.path))


def _write_tpm_state(step: steps.WriteTpmState, on_progress: qemu_img.Progress) -> None:
    tpm.write_state(Path(step.path), base64.b64decode(step.state))


def _write_file(step: steps.WriteFile, on_progress: qemu_img.Progress) -> None:
    path = Path(step.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    durable.write_bytes(path, step.text.encode())


def _delete_file(step: steps.DeleteFile, on_progress: qemu_img.Progress) -> None:
    durable.remove(Path(step.path))


# Files removed at once by a delete_files step: ext4 frees a file's blocks after it has let go
# of the folder, so removals in parallel overlap (200 small images: 0.56 s one by one, 0.04 s
# so, on a loaded host). Their order does not matter: nothing references any of them.
UNLINKERS = 8


def _unlink(target: Path) -> None:
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        target.unlink()


def _delete_files(step: steps.DeleteFiles, on_progress: qemu_img.Progress) -> None:
    targets = [Path(target) for target in step.targets]
    with ThreadPoolExecutor(max(1, min(UNLINKERS, len(targets)))) as pool:
        list(pool.map(_unlink, targets))
    # the removals made durable once per folder (also on a re-run that found them gone: the
    # first run may have been killed before its fsync)
    for folder in dict.fromkeys(target.parent for target in targets):
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            durable.fsync_dir(folder)


def _prune_dirs(step: steps.PruneDirs, on_progress: qemu_img.Progress) -> None:
    _prune_empty(Path(step.path))


def _write_manifest(step: steps.WriteManifest, on_progress: qemu_img.Progress) -> None:
    path, root = Path(step.path), Path(step.root)
    files = {str(p.relative_to(root.parent)): {"sha256": durable.sha256(p),
                                               "size": p.stat().st_size}
             for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(".")}
    path.parent.mkdir(parents=True, exist_ok=True)
    durable.write_bytes(path, json.dumps({**step.doc, "files": files}, indent=2).encode())


def _commit(step: steps.Commit, on_progress: qemu_img.Progress) -> None:
    qemu_img.commit(Path(step.top), Path(step.base), on_progress)
    durable.fsync_file(Path(step.base))


def _rebase(step: steps.Rebase, on_progress: qemu_img.Progress) -> None:
    qemu_img.rebase(Path(step.path), _opt_path(step.backing), step.backing_fmt,
                    unsafe=step.unsafe, on_progress=on_progress)
    durable.fsync_file(Path(step.path))


def _carry_bitmaps(step: steps.CarryBitmaps, on_progress: qemu_img.Progress) -> None:
    bitmaps.carry_files(Path(step.src), Path(step.path))


def _convert(step: steps.Convert, on_progress: qemu_img.Progress) -> None:
    src, path = Path(step.src), Path(step.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if step.confined_to is None:
        qemu_img.convert(src, step.src_fmt, path, on_progress=on_progress)
    else:
        with shares.pinned_chain(Path(step.confined_to), src, where=str(src)) as layers:
            qemu_img.convert_pinned([layer.fd for layer in layers], path, on_progress)
    durable.fsync_file(path)


def _copy_file(step: steps.CopyFile, on_progress: qemu_img.Progress) -> None:
    src, path = Path(step.src), Path(step.path)
    if step.confined_to is None:
        durable.link_or_copy(src, path, on_progress)
        return
    with shares.opened_inside(Path(step.confined_to), src, where=str(src)) as fd:
        durable.link_or_copy(src, path, on_progress, fd=fd)


def _commit_onto(step: steps.CommitOnto, on_progress: qemu_img.Progress) -> None:
    qemu_img.commit_onto(Path(step.top), Path(step.into), on_progress)
    durable.fsync_file(Path(step.into))


# The steps this module runs itself (the live ones are registered: :data:`LIVE`)
BUILT_IN: dict[type[steps.StepBase], StepFn] = {
    steps.MakeDir: _make_dir, steps.CreateImage: _create_image, steps.ClaimFile: _claim_file,
    steps.WriteFile: _write_file, steps.Convert: _convert, steps.CopyFile: _copy_file,
    steps.WriteManifest: _write_manifest, steps.DeleteFile: _delete_file,
    steps.DeleteFiles: _delete_files,
    steps.PruneDirs: _prune_dirs, steps.Commit: _commit, steps.Rebase: _rebase,
    steps.CarryBitmaps: _carry_bitmaps, steps.MakeTpm: _make_tpm,
    steps.WriteTpmState: _write_tpm_state, steps.CommitOnto: _commit_onto}


def undo(step: Step) -> None:
    """Remove what an undoable step made (it may have been only half made)."""
    if isinstance(step, steps.MakeDir):
        _prune_empty(Path(step.path))
    elif isinstance(step, steps.MakeTpm):
        for folder in (Path(step.path), Path(step.path + ".new")):
            shutil.rmtree(folder, ignore_errors=True)
    elif isinstance(step, steps.NewFile):
        durable.remove(Path(step.path))
        durable.remove(durable.temp_path(Path(step.path)))

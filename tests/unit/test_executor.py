"""The executor's file steps, one by one, against a fake image tool (tests/unit/fake_images.py).

Every step is idempotent: run a second time (as recovery does after a crash that came before,
during or after its first run) it leaves the same files as one run. Every undoable step's undo
removes what it made, also when it was only half made (its temporary file left behind). An
OS error becomes a StorageError naming the step and the file.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.unit.fake_images import FakeImages, read, view, write
from waymark import durable
from waymark.engine import executor, steps
from waymark.errors import StorageError

StepOf = Callable[[Path], executor.Step]


def given(folder: Path) -> None:
    """A VM folder: base <- top, a checkpoint's files, an empty tree of folders."""
    (folder / "disks").mkdir(parents=True)
    write(folder / "disks" / "base.qcow2", {"backing": None, "data": {"0": "a", "1": "a"},
                                            "bitmaps": ["b1"]})
    write(folder / "disks" / "top.qcow2", {"backing": str(folder / "disks" / "base.qcow2"),
                                           "data": {"1": "b"}})
    (folder / "memory.state").write_bytes(b"M" * 4096)
    (folder / "old" / "a" / "b").mkdir(parents=True)
    (folder / "old" / "keep").mkdir()
    (folder / "old" / "keep" / "file").write_text("kept")


STEPS: dict[str, StepOf] = {
    "make_dir": lambda f: steps.MakeDir(path=str(f / "new" / "vm")),
    "create_image": lambda f: steps.CreateImage(path=str(f / "new" / "next.qcow2"),
                                                backing=str(f / "disks" / "top.qcow2"),
                                                backing_fmt="qcow2",
                                                bitmaps_from=str(f / "disks" / "base.qcow2")),
    "claim_file": lambda f: steps.ClaimFile(path=str(f / "new" / "memory.state")),
    "write_file": lambda f: steps.WriteFile(path=str(f / "new" / "config.json"),
                                            text='{"cpus": 2}'),
    "convert": lambda f: steps.Convert(path=str(f / "new" / "copy.qcow2"),
                                       src=str(f / "disks" / "top.qcow2"), src_fmt="qcow2"),
    "copy_file": lambda f: steps.CopyFile(path=str(f / "new" / "memory.state"),
                                          src=str(f / "memory.state")),
    "write_manifest": lambda f: steps.WriteManifest(path=str(f / "manifest.json"),
                                                    root=str(f / "disks"), doc={"point": "p1"}),
    "make_tpm": lambda f: steps.MakeTpm(path=str(f / "new" / "tpm"), state="AAEC"),
    "write_tpm_state": lambda f: steps.WriteTpmState(path=str(f / "tpm"), state="AAEC"),
    "delete_file": lambda f: steps.DeleteFile(path=str(f / "memory.state")),
    "delete_files": lambda f: steps.DeleteFiles(targets=[str(f / "disks" / "top.qcow2"),
                                                         str(f / "memory.state"),
                                                         str(f / "never-made")]),
    "prune_dirs": lambda f: steps.PruneDirs(path=str(f / "old")),
    "commit": lambda f: steps.Commit(top=str(f / "disks" / "top.qcow2"),
                                     base=str(f / "disks" / "base.qcow2")),
    "rebase": lambda f: steps.Rebase(path=str(f / "disks" / "top.qcow2"), backing=None,
                                     backing_fmt=None, unsafe=True),
    "carry_bitmaps": lambda f: steps.CarryBitmaps(src=str(f / "disks" / "base.qcow2"),
                                                  path=str(f / "disks" / "top.qcow2")),
    "commit_onto": lambda f: steps.CommitOnto(into=str(f / "disks" / "base.qcow2"),
                                              top=str(f / "disks" / "top.qcow2")),
}
# the steps a running QEMU does (qmp_*: engine.running.live_merge) are not the executor's own
BUILT_IN = {cls.op for cls in executor.BUILT_IN}
UNDOABLE = sorted(op for op, cls in steps.KINDS.items() if cls.undoable)


def tree(folder: Path) -> dict[str, str | None]:
    """Every file (its content, paths made relative) and folder (None) under ``folder``."""
    return {str(p.relative_to(folder)): p.read_text().replace(str(folder), "<vm>")
            if p.is_file() else None for p in sorted(folder.rglob("*"))}


def test_every_step_the_executor_knows_is_checked_here() -> None:
    assert set(STEPS) == BUILT_IN
    assert set(UNDOABLE) < BUILT_IN
    assert {op for op, of in STEPS.items() if isinstance(of(Path("/x")), steps.NewFile)} == \
        set(UNDOABLE)


@pytest.mark.parametrize("op", sorted(STEPS))
def test_a_step_run_twice_leaves_what_one_run_leaves(op: str, tmp_path: Path,
                                                     images: FakeImages) -> None:
    given(tmp_path)
    before = tree(tmp_path)
    executor.run(STEPS[op](tmp_path))
    once = tree(tmp_path)
    executor.run(STEPS[op](tmp_path))
    assert tree(tmp_path) == once
    assert once != before, f"{op} changed nothing"


def test_the_image_steps_do_what_they_say(tmp_path: Path, images: FakeImages) -> None:
    given(tmp_path)
    disks = tmp_path / "disks"
    executor.run(STEPS["create_image"](tmp_path))
    assert read(tmp_path / "new" / "next.qcow2") == {
        "backing": str(disks / "top.qcow2"), "data": {}, "bitmaps": ["b1"]}
    executor.run(STEPS["convert"](tmp_path))
    assert read(tmp_path / "new" / "copy.qcow2")["data"] == {"0": "a", "1": "b"}
    executor.run(STEPS["commit"](tmp_path))
    executor.run(STEPS["rebase"](tmp_path))
    assert view(disks / "top.qcow2") == {"1": "b"} and view(disks / "base.qcow2") == {
        "0": "a", "1": "b"}
    assert images.calls == [("create", "next.qcow2"), ("onto_new_file", "next.qcow2"),
                            ("convert", "copy.qcow2"), ("commit", "top.qcow2"),
                            ("rebase", "top.qcow2")]


def test_commit_onto_gives_the_target_the_layers_view_and_leaves_the_layer(
        tmp_path: Path, images: FakeImages) -> None:
    """A consolidation advancing by one layer: ``into`` (a copy of the layer's backing view)
    ends with the layer's view, the layer (a frozen image) unchanged."""
    given(tmp_path)
    disks = tmp_path / "disks"
    executor.run(steps.Convert(path=str(disks / "s.qcow2"), src=str(disks / "base.qcow2"),
                               src_fmt="qcow2"))
    layer = read(disks / "top.qcow2")
    executor.run(steps.CommitOnto(into=str(disks / "s.qcow2"), top=str(disks / "top.qcow2")))
    assert view(disks / "s.qcow2") == view(disks / "top.qcow2") == {"0": "a", "1": "b"}
    assert read(disks / "top.qcow2") == layer and read(disks / "s.qcow2")["backing"] is None


def test_a_manifest_lists_the_files_under_its_root_with_their_hashes(tmp_path: Path) -> None:
    given(tmp_path)
    (tmp_path / "disks" / ".hidden.tmp").write_text("left by a killed copy")
    executor.run(STEPS["write_manifest"](tmp_path))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["point"] == "p1"
    assert sorted(manifest["files"]) == ["disks/base.qcow2", "disks/top.qcow2"]
    top = tmp_path / "disks" / "top.qcow2"
    assert manifest["files"]["disks/top.qcow2"] == {"sha256": durable.sha256(top),
                                                    "size": top.stat().st_size}


def test_prune_dirs_keeps_every_folder_with_a_file(tmp_path: Path) -> None:
    given(tmp_path)
    executor.run(STEPS["prune_dirs"](tmp_path))
    assert sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "old").rglob("*")) == [
        "old/keep", "old/keep/file"]
    shutil.rmtree(tmp_path / "old" / "keep")
    executor.run(STEPS["prune_dirs"](tmp_path))
    assert not (tmp_path / "old").exists()


@pytest.mark.parametrize("op", UNDOABLE)
def test_undo_removes_what_a_step_made_even_half_made(op: str, tmp_path: Path,
                                                      images: FakeImages) -> None:
    given(tmp_path)
    before = tree(tmp_path)
    step = STEPS[op](tmp_path)
    assert isinstance(step, steps.NewFile)
    executor.run(step)
    half_made = durable.temp_path(Path(step.path))  # a killed write or copy leaves this
    half_made.parent.mkdir(parents=True, exist_ok=True)
    if op not in ("make_dir", "make_tpm"):
        half_made.write_text("partial")
    executor.undo(step)
    executor.undo(step)  # undo is idempotent too
    after = tree(tmp_path)
    assert {name: after[name] for name in before} == before
    assert {name: content for name, content in after.items() if name not in before} == \
        ({} if op == "write_manifest" else {"new": None})  # at most an empty parent folder
    assert not Path(step.path).exists() and not half_made.exists()


def test_undo_leaves_a_folder_someone_put_a_file_in(tmp_path: Path) -> None:
    step = steps.MakeDir(path=str(tmp_path / "new" / "vm"))
    executor.run(step)
    (Path(step.path) / "theirs").write_text("not ours")
    executor.undo(step)
    assert (Path(step.path) / "theirs").read_text() == "not ours"


def test_an_os_error_is_a_storage_error_naming_the_step_and_the_file(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    target = tmp_path / "a-file" / "config.json"
    with pytest.raises(StorageError) as caught:
        executor.run(steps.WriteFile(path=str(target), text="{}"))
    assert caught.value.message.startswith("could not write file ")
    assert "a-file" in caught.value.message
    assert "Fix the folder" in (caught.value.hint or "")

"""The journal's typed steps (waymark.engine.steps) and their one JSON form.

Checked: every step class survives a round trip through JSON; the dicts the journal stored
before the steps were typed (copied from the construction sites of that code) still load, to
the step they meant, and are written back with the same keys and values; an unknown op is an
UnknownKind and a malformed step a MalformedRecord (never a KeyError); ``paths()`` names every
file a step makes, reads or names, ``backing``, ``gone`` and a manifest's ``root`` included.
"""

from __future__ import annotations

import typing
from typing import Any

import msgspec
import pytest

from waymark.engine import steps
from waymark.errors import MalformedRecord, UnknownKind

D = "/home/wm/vms/" + "v" * 32  # a VM's folder
RUN = f"{D}/run"

# One example of every op as the code before typed steps wrote it into the catalog (the keys it
# left out are optional), and the step it means.
WRITTEN_BEFORE: list[tuple[dict[str, Any], steps.Step]] = [
    ({"op": "make_dir", "path": D}, steps.MakeDir(path=D)),
    ({"op": "create_image", "path": f"{D}/disks/a.qcow2", "size": 2097152},
     steps.CreateImage(path=f"{D}/disks/a.qcow2", size=2097152)),
    ({"op": "create_image", "path": f"{D}/disks/b.qcow2", "backing": f"{D}/disks/a.qcow2",
      "backing_fmt": "qcow2", "unsafe": True, "size": 2097152},
     steps.CreateImage(path=f"{D}/disks/b.qcow2", backing=f"{D}/disks/a.qcow2",
                       backing_fmt="qcow2", unsafe=True, size=2097152)),
    ({"op": "create_image", "path": f"{D}/disks/c.qcow2", "backing": f"{D}/disks/b.qcow2",
      "backing_fmt": "qcow2", "bitmaps_from": f"{D}/disks/b.qcow2"},
     steps.CreateImage(path=f"{D}/disks/c.qcow2", backing=f"{D}/disks/b.qcow2",
                       backing_fmt="qcow2", bitmaps_from=f"{D}/disks/b.qcow2")),
    ({"op": "make_tpm", "path": f"{D}/tpm"}, steps.MakeTpm(path=f"{D}/tpm")),
    ({"op": "make_tpm", "path": f"{D}/tpm", "state": "AAEC"},
     steps.MakeTpm(path=f"{D}/tpm", state="AAEC")),
    ({"op": "write_tpm_state", "path": f"{D}/tpm", "state": "AAEC"},
     steps.WriteTpmState(path=f"{D}/tpm", state="AAEC")),
    ({"op": "claim_file", "path": f"{D}/checkpoints/k.state"},
     steps.ClaimFile(path=f"{D}/checkpoints/k.state")),
    ({"op": "write_file", "path": f"{D}/checkpoints/k.json", "text": '{"checkpoint": "k"}'},
     steps.WriteFile(path=f"{D}/checkpoints/k.json", text='{"checkpoint": "k"}')),
    ({"op": "convert", "path": f"{D}/disks/d.qcow2", "src": "/srv/base.img", "src_fmt": "raw"},
     steps.Convert(path=f"{D}/disks/d.qcow2", src="/srv/base.img", src_fmt="raw")),
    ({"op": "convert", "path": f"{D}/disks/e.qcow2", "src": "/mnt/share/x.qcow2",
      "src_fmt": "qcow2", "confined_to": None},
     steps.Convert(path=f"{D}/disks/e.qcow2", src="/mnt/share/x.qcow2", src_fmt="qcow2")),
    ({"op": "copy_file", "src": "/lib/v/files/saved.state", "path": f"{D}/saved/state.bin",
      "confined_to": "/lib/v"},
     steps.CopyFile(src="/lib/v/files/saved.state", path=f"{D}/saved/state.bin",
                    confined_to="/lib/v")),
    ({"op": "write_manifest", "path": "/lib/v/manifest.json", "root": "/lib/v/files",
      "doc": {"vm": {"id": "v", "name": "web"}, "images": [], "saved": None}},
     steps.WriteManifest(path="/lib/v/manifest.json", root="/lib/v/files",
                         doc={"vm": {"id": "v", "name": "web"}, "images": [], "saved": None})),
    ({"op": "delete_file", "path": f"{D}/disks/a.qcow2"},
     steps.DeleteFile(path=f"{D}/disks/a.qcow2")),
    ({"op": "delete_files", "targets": [f"{D}/disks/b.qcow2", f"{D}/disks/a.qcow2"]},
     steps.DeleteFiles(targets=[f"{D}/disks/b.qcow2", f"{D}/disks/a.qcow2"])),
    ({"op": "prune_dirs", "path": D}, steps.PruneDirs(path=D)),
    ({"op": "commit", "top": f"{D}/disks/b.qcow2", "base": f"{D}/disks/a.qcow2",
      "abandonable": True},
     steps.Commit(top=f"{D}/disks/b.qcow2", base=f"{D}/disks/a.qcow2", abandonable=True)),
    ({"op": "rebase", "path": f"{D}/disks/c.qcow2", "backing": f"{D}/disks/a.qcow2",
      "backing_fmt": "qcow2", "unsafe": True},
     steps.Rebase(path=f"{D}/disks/c.qcow2", backing=f"{D}/disks/a.qcow2",
                  backing_fmt="qcow2", unsafe=True)),
    ({"op": "rebase", "path": f"{D}/disks/c.qcow2", "backing": None, "backing_fmt": None,
      "unsafe": False, "abandonable": True},
     steps.Rebase(path=f"{D}/disks/c.qcow2", abandonable=True)),
    ({"op": "carry_bitmaps", "src": f"{D}/disks/b.qcow2", "path": f"{D}/disks/a.qcow2"},
     steps.CarryBitmaps(src=f"{D}/disks/b.qcow2", path=f"{D}/disks/a.qcow2")),
    ({"op": "qmp_commit", "run": RUN, "name": "web", "root": "wm-0123456789ab",
      "top": f"{D}/disks/b.qcow2", "base": f"{D}/disks/a.qcow2", "top_node": "wm-bbbb",
      "base_node": "wm-aaaa", "active": True, "job": "wm-commit-bbbb", "abandonable": True},
     steps.QmpCommit(run=RUN, name="web", root="wm-0123456789ab", top=f"{D}/disks/b.qcow2",
                     base=f"{D}/disks/a.qcow2", top_node="wm-bbbb", base_node="wm-aaaa",
                     active=True, job="wm-commit-bbbb", abandonable=True)),
    ({"op": "qmp_stream", "run": RUN, "name": "web", "path": f"{D}/disks/c.qcow2",
      "node": "wm-cccc", "gone": f"{D}/disks/b.qcow2", "base_node": None, "backing": None,
      "backing_fmt": None, "job": "wm-stream-cccc", "abandonable": True},
     steps.QmpStream(run=RUN, name="web", path=f"{D}/disks/c.qcow2", node="wm-cccc",
                     gone=f"{D}/disks/b.qcow2", base_node=None, backing=None, backing_fmt=None,
                     job="wm-stream-cccc", abandonable=True)),
    ({"op": "qmp_relink", "run": RUN, "name": "web", "path": f"{D}/disks/c.qcow2",
      "backing": f"{D}/disks/a.qcow2", "backing_fmt": "qcow2"},
     steps.QmpRelink(run=RUN, name="web", path=f"{D}/disks/c.qcow2",
                     backing=f"{D}/disks/a.qcow2", backing_fmt="qcow2")),
    ({"op": "qmp_release", "run": RUN, "name": "web", "node": "wm-bbbb"},
     steps.QmpRelease(run=RUN, name="web", node="wm-bbbb")),
    ({"op": "commit_onto", "into": f"{D}/disks/d.consolidated-1.qcow2",
      "top": f"{D}/disks/b.qcow2"},
     steps.CommitOnto(into=f"{D}/disks/d.consolidated-1.qcow2", top=f"{D}/disks/b.qcow2")),
    ({"op": "qmp_link", "run": RUN, "name": "web", "path": f"{D}/disks/c.qcow2",
      "node": "ncccc", "file_node": "fcccc", "backing": f"{D}/disks/d.consolidated-1.qcow2",
      "backing_fmt": "qcow2",
      "layers": [["cdddd", "gdddd", f"{D}/disks/d.consolidated-1.qcow2", "qcow2", False]],
      "release": ["nbbbb", "naaaa"]},
     steps.QmpLink(run=RUN, name="web", path=f"{D}/disks/c.qcow2", node="ncccc",
                   file_node="fcccc", backing=f"{D}/disks/d.consolidated-1.qcow2",
                   backing_fmt="qcow2",
                   layers=[("cdddd", "gdddd", f"{D}/disks/d.consolidated-1.qcow2", "qcow2",
                            False)],
                   release=["nbbbb", "naaaa"])),
]


def test_every_op_has_an_example_written_before() -> None:
    assert {data["op"] for data, _ in WRITTEN_BEFORE} == set(steps.KINDS)
    assert set(steps.KINDS.values()) == set(typing.get_args(steps.Step))


@pytest.mark.parametrize(("data", "step"), WRITTEN_BEFORE,
                         ids=[f"{d['op']}-{i}" for i, (d, _) in enumerate(WRITTEN_BEFORE)])
def test_a_step_written_before_loads_and_is_written_back_the_same(
        data: dict[str, Any], step: steps.Step) -> None:
    loaded = steps.from_json(dict(data))
    assert loaded == step and type(loaded) is type(step)
    again = loaded.to_json()
    assert {key: again[key] for key in data} == data  # every key it had, the same value
    defaults = {f.name: f.default for f in msgspec.structs.fields(step)}
    assert all(again[key] == defaults[key] for key in set(again) - set(data))
    assert steps.from_json(again) == step


def test_the_json_form_is_the_op_then_every_field() -> None:
    step = steps.Commit(top="/t", base="/b")
    assert step.to_json() == {"op": "commit", "top": "/t", "base": "/b", "abandonable": False}
    assert steps.to_json_list([step]) == [step.to_json()]
    assert steps.from_json_list([step.to_json()]) == [step]


def test_an_unknown_op_is_an_unknown_kind_naming_it() -> None:
    with pytest.raises(UnknownKind, match=r"no step 'teleport'") as caught:
        steps.from_json({"op": "teleport", "path": "/nowhere"})
    assert not isinstance(caught.value, MalformedRecord)
    assert "newer Waymark" in (caught.value.hint or "")
    with pytest.raises(UnknownKind, match="no step None"):
        steps.from_json({"path": "/no/op"})


@pytest.mark.parametrize(("data", "says"), [
    ({"op": "write_file", "path": "/a"}, r"write_file step has no 'text'"),
    ({"op": "commit", "top": "/t"}, r"commit step has no 'base'"),
    ({"op": "write_file", "path": 3, "text": "x"}, r"field 'path' is 3, not str"),
    ({"op": "create_image", "path": "/a", "size": "2G"}, r"field 'size' is '2G', not int or null"),
    ({"op": "create_image", "path": "/a", "size": True}, r"field 'size' is True"),
    ({"op": "rebase", "path": "/a", "unsafe": "yes"}, r"field 'unsafe' is 'yes', not bool"),
    ({"op": "write_manifest", "path": "/m", "root": "/r", "doc": []}, r"field 'doc' is \[\]"),
    ({"op": "delete_file", "path": "/a", "mode": 7}, r"does not know: mode"),
], ids=["missing", "missing-2", "ill-typed", "ill-typed-size", "bool-is-no-int", "ill-typed-bool",
        "ill-typed-dict", "unknown-field"])
def test_a_malformed_step_is_refused_saying_what_is_wrong(data: dict[str, Any],
                                                          says: str) -> None:
    with pytest.raises(MalformedRecord, match=says) as caught:
        steps.from_json(data)
    assert caught.value.exit_code == UnknownKind.exit_code  # the same family: exit 70
    assert caught.value.hint
    assert "msgspec: " in str(caught.value)  # its own words too (the place as `$.field`)


@pytest.mark.parametrize("data", [None, "make_dir", ["op", "make_dir"]])
def test_a_step_that_is_no_object_is_malformed(data: Any) -> None:
    with pytest.raises(MalformedRecord, match="not an object"):
        steps.from_json(data)
    with pytest.raises(MalformedRecord, match="not a list"):
        steps.from_json_list({"op": "make_dir", "path": "/a"})


def test_paths_name_every_file_a_step_makes_reads_or_names() -> None:
    by_op: dict[str, steps.Step] = {}
    for data, step in WRITTEN_BEFORE:
        by_op.setdefault(data["op"], step)  # the first example of each op
    assert by_op["create_image"].paths() == (f"{D}/disks/a.qcow2",)
    assert steps.CreateImage(path="/n", backing="/b", bitmaps_from="/m").paths() == (
        "/n", "/b", "/m")
    assert by_op["write_manifest"].paths() == ("/lib/v/manifest.json", "/lib/v/files")
    assert by_op["rebase"].paths() == (f"{D}/disks/c.qcow2", f"{D}/disks/a.qcow2")
    assert by_op["delete_files"].paths() == (f"{D}/disks/b.qcow2", f"{D}/disks/a.qcow2")
    assert steps.Rebase(path="/c").paths() == ("/c",)  # no backing: standalone
    stream = steps.QmpStream(run=RUN, name="web", path="/c", node="n", gone="/g",
                             base_node="m", backing="/a", backing_fmt="qcow2", job="j")
    assert set(stream.paths()) == {RUN, "/c", "/g", "/a"}
    commit = by_op["qmp_commit"]
    assert set(commit.paths()) == {RUN, f"{D}/disks/b.qcow2", f"{D}/disks/a.qcow2"}
    assert "wm-0123456789ab" not in commit.paths()  # its root is a QEMU node, no file
    assert by_op["carry_bitmaps"].paths()[0] == f"{D}/disks/a.qcow2"  # the one it changes
    assert by_op["commit"].paths() == (f"{D}/disks/a.qcow2", f"{D}/disks/b.qcow2")
    assert commit.paths()[0] == f"{D}/disks/a.qcow2" and stream.paths()[0] == "/c"
    assert by_op["copy_file"].paths() == (f"{D}/saved/state.bin", "/lib/v/files/saved.state",
                                          "/lib/v")
    assert steps.QmpRelease(run=RUN, name="web", node="n").paths() == (RUN,)


FILE_NAMES = {"path", "top", "base", "src", "backing", "gone", "bitmaps_from", "confined_to",
              "root", "run", "into"}  # the names a step's file (or folder) fields have
NOT_FILES = {(steps.QmpCommit, "root")}  # a QEMU node name


@pytest.mark.parametrize("cls", list(steps.KINDS.values()), ids=list(steps.KINDS))
def test_every_file_field_of_a_step_is_in_its_files(cls: type[steps.StepBase]) -> None:
    fields = {f.name: f.type for f in msgspec.structs.fields(cls)}
    named_files = {name for name, of in fields.items() if name in FILE_NAMES
                   and of in (str, str | None) and (cls, name) not in NOT_FILES}
    assert set(cls.files) == named_files
    assert len(cls.files) == len(set(cls.files))


def test_a_step_undoable_is_one_that_only_makes_a_new_file() -> None:
    undoable = {op for op, cls in steps.KINDS.items() if cls.undoable}
    assert undoable == {"make_dir", "create_image", "claim_file", "write_file", "convert",
                        "copy_file", "write_manifest", "make_tpm"}
    assert all(issubclass(steps.KINDS[op], steps.NewFile) for op in undoable)


def test_steps_are_frozen() -> None:
    step = steps.DeleteFile(path="/a")
    with pytest.raises(AttributeError, match="immutable"):
        step.path = "/b"  # type: ignore[misc]


def test_one_file_is_removed_in_the_form_the_journal_always_stored() -> None:
    assert steps.removal(["/a"]) == steps.DeleteFile(path="/a")
    assert steps.removal(["/a", "/b"]) == steps.DeleteFiles(targets=["/a", "/b"])

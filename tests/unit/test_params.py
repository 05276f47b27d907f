"""Intent parameters (waymark.engine.params): one class per intent kind, one JSON form.

Checked: for every registered kind, the parameters as the code before typed parameters wrote
them into the catalog (copied from its construction sites) load, to the class of that kind, and
are written back with the same keys and values, then survive another round trip; steps held in
parameters (a store's or deploy's finish, an apply's saved-state install) come back as steps;
malformed parameters are refused with MalformedRecord (never a KeyError); a pending intent whose
parameters are malformed stays pending, no step run. (A handler of another kind's parameters
does not type-check: ``journal.intent_kind`` ties them, and mypy checks the wiring.)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from waymark import wiring
from waymark.catalog.db import Catalog
from waymark.catalog.models import Intent
from waymark.engine import compaction, journal, steps
from waymark.engine.journal import Journal
from waymark.engine.params import Params
from waymark.errors import MalformedRecord, UnknownKind
from waymark.usecases.checkpoints import lifecycle
from waymark.usecases.library import store_deploy

V = "v" * 32
D = f"/home/wm/vms/{V}"
IMAGE = {"id": "i" * 32, "vm_id": V, "path": f"{D}/disks/{'i' * 32}.qcow2", "format": "qcow2",
         "parent_id": None, "pinned": False, "virtual_size": 2097152, "chain_length": 1}
DISK = {"id": "d" * 32, "vm_id": V, "active_image_id": "i" * 32, "passthrough_path": None}
CONFIG = {"memory": 256, "cpus": 1, "disks": ["d" * 32], "nics": []}
RECORD = {"id": "c" * 32, "vm_id": V, "name": "before patch", "parent_id": None,
          "kind": "disk-only", "requested_type": "standard", "fallback_reason": None,
          "config": CONFIG, "memory_path": None, "memory_sha256": None, "skipped_disks": []}
LIVE = {"run": f"{D}/run", "name": "web", "paused": False,
        "switch": [{"top": "wm-a", "overlay": "wm-b", "file_node": "wm-b-file",
                    "path": f"{D}/disks/b.qcow2"}],
        "memory": f"{D}/checkpoints/{'c' * 32}.state", "route": "standard"}
DELETE = {"op": "delete_file", "path": f"{D}/disks/a.qcow2"}
PRUNE = {"op": "prune_dirs", "path": D}

# every kind, with parameters as the code before typed parameters wrote them
WRITTEN_BEFORE: dict[str, dict[str, Any]] = {
    "vm_create": {"vm": {"id": V, "name": "web", "state": "off", "config": CONFIG,
                         "checkpoint_type": "standard", "max_checkpoints": 50,
                         "checkpoint_dir": f"{D}/checkpoints", "automatic_checkpoints": False,
                         "origin": None, "owner_id": None},
                  "disks": [DISK], "images": [IMAGE]},
    "disk_add": {"disk": DISK, "images": [IMAGE]},
    "vm_delete": {},
    "checkpoint_create": {"checkpoint": RECORD, "frozen": [{"disk_id": "d" * 32,
                                                            "image_id": "i" * 32}],
                          "overlays": [{**IMAGE, "id": "o" * 32, "disk_id": "d" * 32}],
                          "live": LIVE},
    "checkpoint_apply": {"vm": V, "checkpoint": "c" * 32, "config": CONFIG, "overlays": [],
                         "kept": [DISK], "state": "saved", "discard": [],
                         "install": [{"op": "copy_file", "src": f"{D}/checkpoints/c.state",
                                      "path": f"{D}/saved/state.bin"},
                                     {"op": "write_file", "path": f"{D}/saved/saved.json",
                                      "text": "{}"}]},
    "saved_state_discard": {},
    "saved_state_install": {},
    "tpm_state_install": {},
    "checkpoint_files_delete": {"checkpoints": ["c" * 32, "e" * 32]},
    "automatic_checkpoint_delete": {"vm": V, "checkpoint": "c" * 32},
    "compact": {},
    "drop": {"image": "i" * 32, "child": None, "direction": "drop"},
    "commit_down": {"image": "i" * 32, "child": "k" * 32, "direction": "commit_down"},
    "pull_up": {"image": "i" * 32, "child": "k" * 32, "direction": "pull_up"},
    "backup_restore": {"vm": V, "checkpoint": RECORD, "images": [IMAGE],
                       "frozen": [{"disk_id": "d" * 32, "image_id": "i" * 32,
                                   "active": "o" * 32}],
                       "new_disks": [], "config": CONFIG},
    "vm_store": {"vm_id": V, "name": "web", "library": "/lib", "finish": [DELETE, PRUNE]},
    "vm_store_finish": {},
    "vm_deploy": {"vm": {"id": V, "name": "web", "config": CONFIG}, "images": [IMAGE],
                  "disks": [DISK], "frozen": [], "checkpoints": [RECORD],
                  "finish": [{"op": "rebase", "path": f"{D}/disks/b.qcow2",
                              "backing": f"{D}/disks/a.qcow2", "backing_fmt": "qcow2",
                              "unsafe": True}, PRUNE]},
    "vm_deploy_finish": {},
    "consolidation_unlink": {"disks": ["d" * 32]},
    "consolidation_advance": {"disk": "d" * 32, "image": "i" * 32, "active": "o" * 32},
    "consolidation_build": {"vm": V, "disk": "d" * 32,
                            "path": f"{D}/disks/{'d' * 32}.consolidated-0a1b2c3d.qcow2",
                            "image": "i" * 32, "old": None},
    "consolidation_drop": {},
}


@pytest.fixture(autouse=True)
def wired() -> None:
    wiring.wire()


def with_steps_written(value: Any) -> Any:
    """``value`` with each step in it as the step writes itself (all its fields: the steps'
    own round trip is tests/unit/test_steps.py)."""
    if isinstance(value, dict):
        if "op" in value:
            return steps.from_json(value).to_json()
        return {k: with_steps_written(v) for k, v in value.items()}
    if isinstance(value, list):
        return [with_steps_written(v) for v in value]
    return value


def params_class(kind: str) -> type[Params]:
    cls: type[Params] = journal.kind_of(kind).params
    return cls


def test_every_kind_has_an_example_written_before() -> None:
    assert set(WRITTEN_BEFORE) == journal.kinds()


@pytest.mark.parametrize("kind", sorted(WRITTEN_BEFORE))
def test_parameters_written_before_load_and_are_written_back_the_same(kind: str) -> None:
    data = WRITTEN_BEFORE[kind]
    params = params_class(kind).from_json(data)
    assert type(params) is params_class(kind) and params.kind == kind
    again = params.to_json()
    assert {key: again[key] for key in data} == with_steps_written(data)
    # an offline checkpoint wrote no "live"; an apply or restore before TPMs no "tpm"
    assert set(again) - set(data) <= {"live", "tpm"}
    assert params_class(kind).from_json(again) == params


def test_parameters_holding_steps_hold_step_objects() -> None:
    store = params_class("vm_store").from_json(WRITTEN_BEFORE["vm_store"])
    assert isinstance(store, store_deploy.VmStore)
    assert list(store.finish) == [steps.DeleteFile(path=f"{D}/disks/a.qcow2"),
                                  steps.PruneDirs(path=D)]
    apply = params_class("checkpoint_apply").from_json(WRITTEN_BEFORE["checkpoint_apply"])
    assert isinstance(apply, lifecycle.CheckpointApply)
    assert [step.op for step in apply.install] == ["copy_file", "write_file"]
    offline = params_class("checkpoint_create").from_json(
        {k: v for k, v in WRITTEN_BEFORE["checkpoint_create"].items() if k != "live"})
    assert offline.to_json()["live"] is None


@pytest.mark.parametrize(("kind", "data", "says"), [
    ("drop", {"image": "i", "direction": "drop"}, r"drop intent has no 'child'"),
    ("commit_down", {"image": 7, "child": "k", "direction": "commit_down"},
     r"field 'image' is 7, not str"),
    ("checkpoint_files_delete", {"checkpoints": "c"}, r"field 'checkpoints' is 'c'"),
    ("checkpoint_files_delete", {"checkpoints": ["c", 3]}, r"'checkpoints'\[1\] is 3"),
    ("vm_delete", {"vm": V}, r"does not know: vm"),
    ("vm_store", {**WRITTEN_BEFORE["vm_store"], "finish": [{"op": "delete_file"}]},
     r"delete_file step has no 'path'"),
    ("vm_store", {**WRITTEN_BEFORE["vm_store"], "finish": [DELETE, {**PRUNE, "path": 3}]},
     r"vm_store intent, 'finish'\[1\]: the prune_dirs step: field 'path' is 3, not str"),
    ("vm_create", [], r"vm_create intent is \[\], not an object"),
])
def test_malformed_parameters_are_refused_saying_what_is_wrong(kind: str, data: Any,
                                                               says: str) -> None:
    with pytest.raises(MalformedRecord, match=says) as caught:
        params_class(kind).from_json(data)
    assert caught.value.hint


def test_a_step_of_an_unknown_op_in_parameters_is_an_unknown_kind() -> None:
    data = {**WRITTEN_BEFORE["vm_store"], "finish": [{"op": "teleport"}]}
    with pytest.raises(UnknownKind, match="no step 'teleport'"):
        params_class("vm_store").from_json(data)


def test_the_kind_is_the_parameters_class_attribute() -> None:
    drop = compaction.DropIntent(image="i", child=None, direction="drop")
    assert drop.kind == "drop" and "kind" not in drop.to_json()
    assert journal.kind_of("drop").commit is compaction.commit_drop


# --- through the journal ------------------------------------------------------------------------

@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    opened = Catalog.open(tmp_path)
    yield opened
    opened.engine.dispose()


def test_the_catalog_holds_the_parameters_json_form(catalog: Catalog) -> None:
    drop = compaction.DropIntent(image="i", child=None, direction="drop")
    with catalog.session() as session:
        intent_id = journal.add(session, V, drop, []).id
    intent = Journal(catalog).intent(intent_id)
    assert (intent.kind, intent.params) == ("drop", WRITTEN_BEFORE["drop"] | {"image": "i"})
    assert journal.params_of(intent) == drop
    run = compaction.DropIntent(image="i", child=None, direction="drop", then=("p", "q"))
    assert run.to_json()["then"] == ["p", "q"]
    assert compaction.DropIntent.from_json(run.to_json()) == run


def test_a_pending_intent_with_malformed_parameters_stays_pending(catalog: Catalog,
                                                                  tmp_path: Path) -> None:
    target = tmp_path / "kept"
    target.write_text("not deleted")
    with catalog.session() as session:
        intent_id = journal.add(session, V, compaction.DropIntent(image="i", child=None,
                                                            direction="drop"),
                                [steps.DeleteFile(path=str(target))]).id
    with catalog.session() as session:
        session.get_one(Intent, intent_id).params = {"image": "i"}
    with pytest.raises(MalformedRecord, match="no 'child'"):
        Journal(catalog).finish(Journal(catalog).intent(intent_id))
    assert Journal(catalog).intent(intent_id).status == "pending"
    assert target.read_text() == "not deleted"  # no step ran on parameters it cannot read

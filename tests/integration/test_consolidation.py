"""Consolidation (docs/engine.md, "Consolidation"; :mod:`waymark.engine.consolidation`): Now
reads through two files whatever the number of checkpoints, and every checkpoint keeps its exact
content through create, apply, delete, check and the background job. Real qemu-img, through the
CLI; the content model is test_content's (every checkpoint's flattened content, Now's, and Now's
own clusters)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import httpx

from tests.helpers import Waymark, query, served
from tests.integration.test_content import CLUSTER, Vm

DEEP = 7  # checkpoints: deeper than the threshold (4 layers under Now)


def chain(path: str) -> list[str]:
    """The files a read of ``path`` may pass through, as its headers name them."""
    out = subprocess.run(["qemu-img", "info", "-U", "--backing-chain", "--output=json", path],
                         check=True, capture_output=True, text=True).stdout
    return [entry["filename"] for entry in json.loads(out)]


def record(wm: Waymark, vm: Vm) -> tuple[str, bool] | None:
    """The VM's one consolidation: its file and whether Now is linked to it."""
    rows = query(wm.home, "SELECT path, linked FROM consolidations WHERE vm_id = ?", vm.id)
    return (str(rows[0][0]), bool(rows[0][1])) if rows else None


def deep_vm(wm: Waymark, name: str, count: int = DEEP) -> Vm:
    vm = Vm(wm, name, ["4M"])
    for i in range(count):
        vm.write(0, i * CLUSTER, CLUSTER, 0x10 + i)
        vm.checkpoint(f"c{i}")
    return vm


def consolidated(wm: Waymark, vm: Vm) -> list[dict[str, Any]]:
    done: list[dict[str, Any]] = wm.json("vm", "consolidate", vm.name)["disks"]
    now = vm.active()[vm.disk_ids[0]]
    found = record(wm, vm)
    assert found is not None and found[1], done
    assert chain(now) == [now, found[0]], done  # two hops: Now, then the consolidation
    return done


def assert_clean(wm: Waymark) -> None:
    check = wm.run("check", "--json")
    assert check.returncode == 0 and check.json()["findings"] == [], check.stdout


def test_a_deep_chain_reads_through_two_hops_and_keeps_every_checkpoint(wm: Waymark) -> None:
    vm = deep_vm(wm, "deep")
    assert len(chain(vm.active()[vm.disk_ids[0]])) == DEEP + 1
    assert consolidated(wm, vm)[0]["action"] == "built"
    vm.verify()
    assert_clean(wm)
    shown = wm.json("vm", "show", vm.name)["consolidation"]
    assert shown["enabled"] and shown["linked_disks"] == 1 and shown["bytes"] > 0
    built = record(wm, vm)
    assert built is not None

    # one more checkpoint: unlinked before it froze Now, then advanced by that one layer
    vm.write(0, 2 * CLUSTER, CLUSTER, 0x41)
    vm.checkpoint("after")
    assert record(wm, vm) == (built[0], False)
    done = consolidated(wm, vm)
    assert (done[0]["action"], done[0]["layers"]) == ("advanced", 1)
    assert record(wm, vm) == (built[0], True)  # the same file, advanced in place
    vm.verify()

    # an apply elsewhere: a new consolidation of that checkpoint's view, the old file gone
    target = next(iter(vm.checkpoints))  # c0: too shallow under it
    vm.apply(list(vm.checkpoints)[4], "discard-current")
    vm.verify()
    assert consolidated(wm, vm)[0]["action"] == "built"
    assert not Path(built[0]).exists()
    vm.verify()

    # deletes merge under Now (unlinked first); it consolidates again afterwards
    middle = list(vm.checkpoints)[2]
    wm("checkpoint", "delete", vm.name, middle, "--yes")
    vm.checkpoints.pop(middle)
    vm.parents = {c: (vm.parents[middle] if p == middle else p) for c, p in vm.parents.items()
                  if c != middle}
    vm.write(0, 3 * CLUSTER, CLUSTER, 0x42)
    vm.checkpoint("more")
    consolidated(wm, vm)
    vm.verify()
    vm.apply(target, "discard-current")
    vm.verify()
    assert_clean(wm)


def test_a_shallow_chain_is_left_and_a_vm_turned_off_keeps_no_copy(wm: Waymark) -> None:
    shallow = deep_vm(wm, "shallow", 2)
    done = wm.json("vm", "consolidate", shallow.name)["disks"]
    assert done[0]["action"] == "skipped" and "layer" in done[0]["reason"]
    assert record(wm, shallow) is None

    vm = deep_vm(wm, "off")
    consolidated(wm, vm)
    found = record(wm, vm)
    assert found is not None
    shown = wm.json("vm", "set", vm.name, "--consolidate", "off")["consolidation"]
    assert shown == {"enabled": False, "bytes": 0, "linked_disks": 0}
    assert record(wm, vm) is None and not Path(found[0]).exists()
    assert len(chain(vm.active()[vm.disk_ids[0]])) == DEEP + 1
    done = wm.json("vm", "consolidate", vm.name)["disks"]
    assert done[0]["action"] == "skipped" and "turned off" in done[0]["reason"]
    vm.verify()
    assert_clean(wm)
    wm("vm", "set", vm.name, "--consolidate", "on")
    consolidated(wm, vm)
    vm.verify()


class Background(Waymark):
    """Commands as a host runs them: a deep chain leaves a ``consolidate`` job behind."""

    def env(self, **extra: str) -> dict[str, str]:
        return super().env(WAYMARK_BACKGROUND_CONSOLIDATION="on", **extra)


def test_the_background_job_consolidates_after_a_checkpoint(wm: Waymark) -> None:
    vm = deep_vm(wm, "bg")  # (no job: the suite's default)
    assert wm.json("job", "list", "--all") == []
    vm.wm = Background(wm.home)
    vm.write(0, 10 * CLUSTER, CLUSTER, 0x56)
    vm.checkpoint("bg")
    vm.wm = wm
    jobs = wm.json("job", "list", "--all")
    assert [j["kind"] for j in jobs] == ["consolidate"], jobs
    waited = wm.json("job", "wait", jobs[0]["id"])
    assert waited["status"] == "completed", waited
    assert waited["result"]["disks"][0]["action"] == "built"
    found = record(wm, vm)
    now = vm.active()[vm.disk_ids[0]]
    assert found is not None and chain(now) == [now, found[0]]
    vm.verify()
    assert_clean(wm)


def test_check_falls_back_to_the_real_chain_when_the_copy_is_gone(wm: Waymark) -> None:
    vm = deep_vm(wm, "lost")
    consolidated(wm, vm)
    found = record(wm, vm)
    assert found is not None
    Path(found[0]).unlink()
    check = wm.run("check", "--json")
    assert check.returncode == 1
    kinds = {(f["kind"], f["path"]) for f in check.json()["findings"]}
    assert ("missing-consolidation", found[0]) in kinds, kinds
    repaired = wm.json("check", "--repair")
    assert any(f["kind"] == "missing-consolidation" and f["repaired"]
               for f in repaired["findings"]), repaired
    assert record(wm, vm) is None
    assert len(chain(vm.active()[vm.disk_ids[0]])) == DEEP + 1
    vm.verify()
    assert_clean(wm)


def test_deleting_the_vm_deletes_its_consolidation(wm: Waymark) -> None:
    vm = deep_vm(wm, "gone")
    consolidated(wm, vm)
    wm("vm", "delete", vm.name, "--yes")
    assert not (wm.home / "vms" / vm.id).exists()
    assert query(wm.home, "SELECT count(*) FROM consolidations") == [(0,)]
    assert_clean(wm)


def test_a_merge_into_the_image_whose_view_the_copy_holds_forgets_the_copy(wm: Waymark
                                                                           ) -> None:
    """Deleting the checkpoint whose frozen image the consolidation holds lets the merge
    change that image's view (its child committed into it) or remove it: the copy is
    forgotten and its file deleted, never advanced from a view no image has any more."""
    vm = deep_vm(wm, "merged")
    consolidated(wm, vm)
    held = record(wm, vm)
    assert held is not None
    holder = vm.current
    assert holder is not None
    vm.write(0, 12 * CLUSTER, CLUSTER, 0x61)
    vm.checkpoint("child")
    wm("checkpoint", "delete", vm.name, holder, "--yes")
    vm.checkpoints.pop(holder)
    vm.parents = {c: (vm.parents[holder] if p == holder else p) for c, p in vm.parents.items()
                  if c != holder}
    assert record(wm, vm) is None and not Path(held[0]).exists()
    vm.verify()
    assert consolidated(wm, vm)[0]["action"] == "built"
    vm.verify()
    assert_clean(wm)


def test_the_portals_space_chart_shows_the_consolidation_and_whether_it_is_on(
        wm: Waymark) -> None:
    """The VM page's Space section (through a real ``waymark serve``): the consolidation's
    extra bytes as a row of the chart and whether Now reads through it; off, it says so and
    how to turn it on."""
    vm = deep_vm(wm, "page", 8)  # 9 layers: the chart's depth warning, until consolidated
    with served(wm) as (url, _), httpx.Client(base_url=url) as http:
        http.post("/api/auth/login", json={"name": "root-admin", "password": "test-password"})
        before = http.get("/vms/page").text
        assert "deep enough to slow disk reads" in before
        assert 'data-linked="0"' in before and "Consolidation (extra)" not in before
        consolidated(wm, vm)
        shown = wm.json("vm", "show", "page")["consolidation"]
        page = http.get("/vms/page")
        assert page.status_code == 200
        space = page.text[page.text.index('id="panel-space"'):]
        assert 'data-enabled="1" data-linked="1"' in space
        assert "Now reads through two layers on 1" in space
        assert "deep enough to slow disk reads" not in space
        row = space[space.index("Consolidation (extra)"):]
        assert shown["bytes"] > 0 and 'class="bar consolidation-bar"' in row
        wm("vm", "set", "page", "--consolidate", "off")
        off = http.get("/vms/page").text
        assert 'data-enabled="0"' in off and "Consolidation (extra)" not in off
        assert "waymark vm set page --consolidate on" in off

"""A consolidated VM that boots (docs/engine.md, "Consolidation": offline only, for now): it boots
on its real chain (the boot unlinks Now first), so a live checkpoint freezes no image backed by
the consolidation; consolidation waits while it runs and continues once it is off."""

from __future__ import annotations

import json
import subprocess

from tests.guest.guests import create
from tests.helpers import Waymark, query


def backing(path: str) -> str | None:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", path], check=True,
                         capture_output=True, text=True).stdout
    info = json.loads(out)
    found = info.get("full-backing-filename") or info.get("backing-filename")
    return str(found) if found else None


def parent_path(wm: Waymark, active: str) -> str:
    ((path,),) = query(wm.home, "SELECT p.path FROM images i JOIN images p ON p.id = i.parent_id"
                                " WHERE i.path = ?", active)
    return str(path)


def test_a_consolidated_vm_boots_on_its_real_chain(home: Waymark, image: dict[str, str]) -> None:
    vm = create(home, "cons", image)
    for i in range(5):
        home("checkpoint", "create", vm.name, "--name", f"c{i}")
    assert home.json("vm", "consolidate", vm.name)["disks"][0]["action"] == "built"
    ((shadow,),) = query(home.home, "SELECT path FROM consolidations")
    assert backing(vm.active_image()) == shadow

    vm.boot()
    active = vm.active_image()
    assert backing(active) == parent_path(home, active)  # unlinked before QEMU opened it
    assert home.json("vm", "show", vm.name)["consolidation"]["linked_disks"] == 0
    live = home.json("checkpoint", "create", vm.name, "--name", "live")
    assert backing(live["disks"][0]["frozen_image"]) == parent_path(
        home, live["disks"][0]["frozen_image"])  # a frozen image never names the copy
    done = home.json("vm", "consolidate", vm.name)["disks"]
    assert done[0]["action"] == "skipped" and "running" in done[0]["reason"], done

    vm.ensure_off()
    assert home.json("vm", "consolidate", vm.name)["disks"][0]["action"] in ("advanced",
                                                                             "built")
    assert backing(vm.active_image()) == query(home.home, "SELECT path FROM consolidations")[0][0]
    checked = home.run("check", "--json")
    assert checked.returncode == 0 and checked.json()["clean"], checked.stdout

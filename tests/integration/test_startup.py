"""What a command loads: the composition root plugs the use cases in by name
(:class:`waymark.wiring.Deferred`), so a command imports only the use cases it runs and
``waymark checkpoint list`` stays as fast as it was before the engine layer (bench/run.py,
``list:``). Each command runs in a fresh interpreter, where nothing was imported before it."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import Waymark
from waymark import wiring
from waymark.catalog.db import Catalog
from waymark.engine import journal
from waymark.usecases.checkpoints.automatic import AutomaticCheckpointDelete

# Run one command line as the entry point does, then print the waymark modules it imported
LOADED = """
import json, sys
from waymark.cli.main import run
code = run(sys.argv[1:])
print(json.dumps([code, sorted(m for m in sys.modules if m.startswith("waymark."))]))
"""
# Use case modules only an intent, a job or a VM's power cycle of their own kind needs
PLUGGED_IN = {"waymark.usecases.backups.points", "waymark.usecases.library.store_deploy",
              "waymark.usecases.checkpoints.automatic"}
# What only the commands that change checkpoints need (waymark.cli.checkpoint_change)
CHANGING = {"waymark.cli.checkpoint_change", "waymark.usecases.checkpoints.lifecycle",
            "waymark.usecases.checkpoints.deletion", "waymark.usecases.vms.export_job",
            "waymark.usecases.vms.definitions"}
# The code of a running VM's power cycle and live checkpoints: a listing only reads
RUNNING = {"waymark.engine.running.power", "waymark.engine.running.live_checkpoint",
           "waymark.guest.agent"}


def loaded_by(wm: Waymark, *args: str) -> set[str]:
    proc = subprocess.run([sys.executable, "-c", LOADED, *args], env=wm.env(),
                          capture_output=True, text=True, check=True, timeout=120)
    code, modules = json.loads(proc.stdout.splitlines()[-1])
    assert code == 0, proc.stderr
    return set(modules)


def test_listing_checkpoints_loads_no_use_case_it_does_not_run(wm: Waymark) -> None:
    wm("vm", "create", "b", "--disk", "16M")
    wm("checkpoint", "create", "b", "--name", "one")
    loaded = loaded_by(wm, "checkpoint", "list", "b")
    assert "waymark.usecases.views" in loaded
    unneeded = PLUGGED_IN | CHANGING | RUNNING
    assert not loaded & unneeded, loaded & unneeded
    assert not {m for m in loaded if m.startswith(("waymark.api", "waymark.web"))}


def test_a_kind_plugged_in_by_name_loads_its_use_case_when_one_is_settled(wm: Waymark) -> None:
    """A clean stop leaves an automatic checkpoint's deletion to be journalled (its commit is
    :func:`waymark.usecases.checkpoints.automatic.commit_delete`); a command that knows nothing
    of automatic checkpoints, a listing, settles it through the module the root names."""
    wm("vm", "create", "b", "--disk", "16M")
    wm("checkpoint", "create", "b", "--name", "kept")
    wm("checkpoint", "create", "b", "--name", "automatic")
    listing = wm.json("checkpoint", "list", "b")
    automatic = next(c["id"] for c in listing["checkpoints"] if c["name"] == "automatic")
    wiring.wire()  # the kind is known (this process ran commands in-process anyway)
    catalog = Catalog.open(wm.home)
    with catalog.session() as session:
        journal.add(session, listing["vm_id"],
                    AutomaticCheckpointDelete(vm=listing["vm_id"], checkpoint=automatic), [])
    catalog.close()
    assert "waymark.usecases.checkpoints.automatic" in loaded_by(wm, "checkpoint", "list", "b")
    assert [c["name"] for c in wm.json("checkpoint", "list", "b")["checkpoints"]] == ["kept"]


def test_the_checkpoint_group_lists_every_command_and_runs_the_ones_loaded_later(
        wm: Waymark) -> None:
    helped = wm("checkpoint", "--help").stdout
    listed = {line.split()[0] for line in helped.split("Commands:")[1].splitlines() if line}
    assert listed == {"create", "list", "show", "apply", "revert", "rename", "notes", "delete",
                      "export"}
    assert "Usage: waymark checkpoint revert [OPTIONS] VM" in wm("checkpoint", "revert",
                                                                  "--help").stdout
    assert "Usage: waymark checkpoint create [OPTIONS] VM" in wm("checkpoint", "create",
                                                                  "--help").stdout
    assert wm.run("checkpoint", "nosuch").returncode == 2

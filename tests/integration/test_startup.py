"""What a command loads: the composition root plugs the use cases in by name
(:class:`waymark.wiring.Deferred`), so a command imports only the use cases it runs and
``waymark checkpoint list`` stays as fast as it was before the engine layer (bench/run.py,
``list:``). Each command runs in a fresh interpreter, where nothing was imported before it."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
from contextlib import closing
from typing import Any

import click
import pytest
from sqlalchemy import text

from tests.helpers import Waymark
from waymark import wiring
from waymark.catalog.db import Catalog
from waymark.cli import power, status, vm, vm_change
from waymark.config import Settings
from waymark.engine import journal
from waymark.engine.running import power as machines
from waymark.usecases.checkpoints.automatic import AutomaticCheckpointDelete

# Run one command line as the entry point does, then print the waymark modules it imported
LOADED = """
import json, sys
from waymark.cli.main import run
code = run(sys.argv[1:])
print(json.dumps([code, sorted(m for m in sys.modules if m.startswith(("waymark.", "sqlalchemy",
                                                                         "alembic", "qemu",
                                                                         "asyncio")))]))
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
# What only a full context needs (docs/architecture.md, "The read path"): the ORM, the
# migrations, the journal and what settles, the QMP stack
HEAVY = ("sqlalchemy", "alembic", "waymark.catalog.models", "waymark.catalog.db",
         "waymark.engine.context", "waymark.engine.journal", "waymark.engine.settle",
         "waymark.wiring", "waymark.qemu.qmp", "qemu", "asyncio")


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


def heavy(loaded: set[str]) -> set[str]:
    """What of :data:`HEAVY` (or of the packages it names) was loaded."""
    return {m for m in loaded if m in HEAVY or m.split(".")[0] in HEAVY}


def test_commands_that_only_read_load_no_orm_migrations_or_qmp(wm: Waymark) -> None:
    """The read path (waymark.engine.reading): a home at the schema's head with nothing
    unfinished is read through the stdlib's sqlite3, so these load neither SQLAlchemy nor
    alembic, the engine's context, the journal, or the QMP stack; and they answer as before."""
    wm("vm", "create", "b", "--disk", "16M")
    wm("checkpoint", "create", "b", "--name", "one")
    wm("checkpoint", "create", "b", "--name", "two")
    for command in (("checkpoint", "list", "b"), ("checkpoint", "show", "b", "one"),
                    ("checkpoint", "list", "--most-recent"), ("checkpoint", "list")):
        loaded = loaded_by(wm, *command)
        assert "waymark.catalog.reads" in loaded, command
        assert not heavy(loaded), (command, heavy(loaded))
    listing = wm.json("checkpoint", "list", "b")
    assert [(c["name"], c["chain_depth"]) for c in listing["checkpoints"]] == [("one", 1),
                                                                               ("two", 2)]
    shown = wm.json("checkpoint", "show", "b", "one")
    assert shown["child_ids"] == [listing["checkpoints"][1]["id"]]
    assert not shown["is_current"] and shown["disks"][0]["chain_depth"] == 1


def test_a_home_that_needs_settling_or_migrating_is_opened_in_full(wm: Waymark) -> None:
    """A home without a catalog yet, or with unfinished work (here a job that did not end),
    makes even a listing open the full context, which migrates or settles first."""
    assert "alembic" in loaded_by(wm, "checkpoint", "list")  # the catalog is made
    assert not heavy(loaded_by(wm, "checkpoint", "list"))
    wm("vm", "create", "b", "--disk", "16M")
    catalog = Catalog.open(wm.home)
    with catalog.session() as session:
        session.execute(text("INSERT INTO jobs (id, kind, params, status, progress, "
                             "cancel_requested, created_at) VALUES ('j1', 'merge', '{}', "
                             "'queued', 0, 0, '2026-01-01 00:00:00')"))
    catalog.close()
    assert "waymark.engine.settle" in loaded_by(wm, "checkpoint", "list", "b")
    with closing(sqlite3.connect(wm.home / "catalog.db")) as db, db:
        db.execute("DELETE FROM jobs")
    assert not heavy(loaded_by(wm, "checkpoint", "list", "b"))


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


def test_vm_list_and_show_read_without_the_orm_and_vm_runs_every_command(wm: Waymark) -> None:
    """``waymark vm``'s group loads the commands that change VMs (:mod:`waymark.cli.vm_change`)
    and the power commands (:mod:`waymark.cli.power`) only when one runs; its table names
    every one of them, and each name loads the command of that name."""
    wm("vm", "create", "b", "--disk", "16M")
    for command in (("vm", "list"), ("vm", "show", "b")):
        loaded = loaded_by(wm, *command)
        assert not heavy(loaded) and "waymark.cli.vm_change" not in loaded, heavy(loaded)
    assert wm.json("vm", "list")[0]["checkpoint_count"] == 0
    helped = wm("vm", "--help").stdout
    listed = {line.split()[0] for line in helped.split("Commands:")[1].splitlines() if line}
    commands = {c.name for c in power.COMMANDS} | {status.status.name} | {
        c.name for c in vars(vm_change).values() if isinstance(c, click.Command)} - {
        c for g in (vm_change.disk, vm_change.media) for c in g.commands}
    assert listed == commands | {"list", "show"} == {*vm.VmCommands.COMMANDS, "list", "show"}
    group = vm.VmCommands()
    for name in vm.VmCommands.COMMANDS:
        found = group.get_command(click.Context(group), name)
        assert found is not None and found.name == name
    assert "Usage: waymark vm disk add [OPTIONS] VM" in wm("vm", "disk", "add", "--help").stdout


def settled_status(wm: Waymark, vm: str) -> dict[str, Any]:
    """``vm status`` as the full path answers it (settled under the VM's lock, the agent
    asked: what the API answers), in this process."""
    ctx = wiring.open_context(Settings(home=wm.home))
    try:
        vm_id = next(row["id"] for row in wm.json("vm", "list") if row["name"] == vm)
        answer: dict[str, Any] = asyncio.run(machines.status(ctx, vm_id))
        return answer
    finally:
        ctx.catalog.close()


def test_vm_status_of_a_vm_that_is_off_reads_without_the_orm_or_the_power_commands(
        wm: Waymark) -> None:
    """``vm status`` of a VM that is off answers through the read path (no ORM, no asyncio,
    not the power commands' module), exactly as the full path does."""
    wm("vm", "create", "b", "--disk", "16M")
    loaded = loaded_by(wm, "vm", "status", "b")
    assert "waymark.engine.running.observe" in loaded
    assert not heavy(loaded) and "waymark.cli.power" not in loaded, heavy(loaded)
    assert wm.json("vm", "status", "b") == settled_status(wm, "b")


@pytest.mark.guest  # starts qemu-system-x86_64 (SeaBIOS only, no guest OS)
def test_vm_status_of_a_running_vm_without_an_agent_reads_without_the_orm_or_qmp_stack(
        wm: Waymark) -> None:
    """A running VM whose guest holds no agent port open (SeaBIOS, nothing booted): its status
    comes from the read path, two QMP queries on a plain socket, none of the ORM, asyncio or
    ``qemu.qmp``, and says what the full path says (the uptime moves on in between)."""
    wm("vm", "create", "quiet", "--memory", "64M", "--nic", "none")
    try:
        wm.run("vm", "start", "quiet", env=wm.env(WAYMARK_ACCEL="tcg")).ok()
        loaded = loaded_by(wm, "vm", "status", "quiet")
        assert "waymark.qemu.monitor" in loaded
        assert not heavy(loaded) and "waymark.cli.power" not in loaded, heavy(loaded)
        seen = wm.json("vm", "status", "quiet")
        settled = settled_status(wm, "quiet")
        assert seen["state"] == "running" and seen["pid"] and seen["agent"] is False, seen
        assert abs(seen.pop("uptime_seconds") - settled.pop("uptime_seconds")) < 30
        assert seen == settled
    finally:
        wm.run("vm", "stop", "quiet", "--force")


def test_the_entry_point_ends_with_the_commands_code_and_all_of_its_output(
        wm: Waymark) -> None:
    """The real entry point (``python -m waymark``) ends the process without Python's teardown
    (:func:`waymark.cli.main.ended`): the exit code is the command's, and everything it
    printed to a pipe arrives, on stdout and on stderr."""
    wm("vm", "create", "b", "--disk", "16M")
    for number in range(12):
        wm("checkpoint", "create", "b", "--name", f"c{number}")
    listed = wm.run("checkpoint", "list", "b", "--json", separate=True)
    assert listed.returncode == 0, listed.stderr
    assert len(listed.json()["checkpoints"]) == 12
    missing = wm.run("vm", "show", "nosuch", separate=True)
    assert missing.returncode == 3, missing
    assert missing.stderr.startswith("error: no VM is named 'nosuch'"), missing.stderr
    assert missing.stderr.rstrip().endswith("List them with: waymark vm list"), missing.stderr
    created = wm.run("checkpoint", "create", "b", "--name", "last", separate=True)
    assert created.returncode == 0 and "Created checkpoint 'last'" in created.stdout, created
    assert wm.json("checkpoint", "show", "b", "last")["name"] == "last"

"""``waymark vm status``: a VM's state, process, accelerator, uptime and guest agent.

It answers through the read path when it can (:func:`waymark.engine.running.observe.status`: the
catalog through the stdlib's sqlite3, two QMP queries on a plain socket: no ORM, no asyncio QMP
stack), and otherwise through the power commands' module (:mod:`waymark.cli.power`, loaded
then, by name, like :class:`waymark.cli.main.LazyGroup` loads a command), which settles what it
sees under the VM's lock and asks the guest agent."""

from __future__ import annotations

import importlib
from typing import Any, cast

import click

from waymark.cli.main import face
from waymark.cli.output import emit, json_option
from waymark.engine import reading
from waymark.engine.running import observe
from waymark.text import printable

SETTLED = "waymark.cli.power"  # its ``settled_status``: the full path


@click.command("status")
@click.argument("vm_ref", metavar="VM")
@json_option
def status(vm_ref: str, as_json: bool) -> None:
    """State, process, accelerator, uptime, and whether the guest agent answers."""
    d = _answer(vm_ref)
    lines = [f"{d['name']}: {d['state']}"]
    if d["pid"]:
        lines.append(f"  pid {d['pid']}, {d['accelerator']}, up {d['uptime_seconds']} s, "
                     f"guest agent {'answers' if d['agent'] else 'does not answer'}")
        if d["accelerator_reason"]:
            lines.append(f"  accelerator: {d['accelerator']} ({d['accelerator_reason']})")
    if d["silence"]:
        lines += [f"  warning: {d['silence']['message']}", f"  hint: {d['silence']['hint']}"]
    if d.get("last_exit"):
        lines.append(f"  last stop: {d['last_exit']['reason']} at {d['last_exit']['at']}")
        # the guest wrote these: shown, never obeyed (escape sequences, bidi controls)
        lines += [f"    | {printable(line)}" for line in d["last_exit"]["log"]]
    if d.get("serial_log"):  # a host path: the API shows it to administrators only
        lines.append(f"  serial log: {d['serial_log']}")
    emit(as_json, d, lines)


def _answer(vm_ref: str) -> dict[str, Any]:
    """The status from the --server, else as seen through the read path, else settled."""
    remote = face().remote
    if remote is not None:
        return remote.vm_status(vm_ref)
    source = face().reading
    if isinstance(source, reading.Home):
        with source.reading() as reader:
            row = reading.vm(reader, vm_ref)
        seen = observe.status(source.home, row.id, row.name, row.state,
                              source.settings.silent_seconds)
        if seen is not None:
            return seen
    settled = importlib.import_module(SETTLED).settled_status
    return cast("dict[str, Any]", settled(face().vm_id(vm_ref)))

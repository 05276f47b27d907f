"""Live checkpoints: a running or paused VM's disks switch to new overlays in one QMP
``transaction``, with the guest's memory (standard) or with its file systems frozen (production).

The order, each step a journal failpoint:

1. The journal's file steps: every disk's overlay, made with ``qemu-img create -u`` (QEMU holds
   the active image locked, so qemu-img must not open it), the memory file claimed, the
   checkpoint's description written.
2. The overlays join QEMU's block graph as nodes (``blockdev-add``) while the guest runs.
3. *production*: a guard process freezes the guest's file systems (:mod:`waymark.guest.guard`:
   it thaws by itself if Waymark dies), the disks switch, thaw. *standard*: QEMU migrates memory
   and device state live into a pipe that Waymark copies into the state file; at the end of the
   migration QEMU stops the guest (``postmigrate``); once the stream has ended, the file takes its
   final name (so a complete stream is recognisable after a crash), the disks switch, ``cont``.
   The guest's pause is the time between QEMU's STOP and RESUME events.
4. The catalog commit.

Why a pipe and not the file itself: if Waymark dies mid-migration the pipe breaks, the
migration fails, and QEMU resumes the guest on its own; nothing waits for the next command.

Recovery (:func:`resolve`) asks QEMU whether the disks switched (``query-block``; the nodes it
added are found with ``query-named-block-nodes``):

- switched: forward. The memory is kept when its final name exists; otherwise the checkpoint
  holds the disks only and says why.
- not switched: a migration still running is cancelled, the added nodes are removed, a guest the
  migration left stopped is resumed, and the intent rolls back.
- QEMU gone: the disks had switched exactly when an overlay holds data (only QEMU writes to it,
  and only after the switch).

A paused VM is checkpointed without running it. Production cannot quiesce a paused guest (its
agent is stopped with it): it falls back to standard. After the migration QEMU stays in
``postmigrate``, where QEMU 7.2 refuses any further migration; as a paused guest's memory does not
change, the state is kept as ``run/paused.state`` and the next save or checkpoint before the VM
resumes reuses it.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import fcntl
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

from waymark import durable
from waymark.engine.journal import LiveIntent
from waymark.engine.params import Params
from waymark.engine.running import presence
from waymark.errors import Conflict, ToolError, WaymarkError
from waymark.failpoints import failpoint
from waymark.guest import agent, guard
from waymark.images import qemu_img
from waymark.qemu import bitmaps, blockjobs, cmdline, confine, qmp, tpm

MIGRATION_TIMEOUT = 600.0
STREAM_END_TIMEOUT = 60.0
RESUME_TIMEOUT = 10.0
CANCEL_TIMEOUT = 10.0
CLOCK_PAUSE = 1.0  # a standard checkpoint that paused the guest this long corrects its clock
FD_NAME = "waymark-checkpoint"
# the guest's final pause QEMU aims for (ms), raised every DOWNTIME_PATIENCE seconds of a
# migration that does not converge (QEMU's own default is 300 ms)
DOWNTIME_STEPS = (20, 100, 300, 1000, 5000)
DOWNTIME_PATIENCE = 5.0
PIPE_SIZE = 1 << 20
CHUNK = 1 << 20
MIGRATING = ("setup", "active", "pre-switchover", "device", "cancelling")
PRODUCTION = ("production", "productiononly")
DISK_ONLY = "disk-only"


class CheckpointCreate(Params, frozen=True, kw_only=True):
    """A checkpoint's intent: its catalog ``checkpoint`` record, the images it freezes
    (``frozen``: disk_id, image_id) and the new active images (``overlays``: catalog rows and
    disk_id); ``live`` (a running or paused VM, see :func:`plan`) is the live part's plan and
    progress (``route``), which the live part amends in place, as it amends the record."""

    kind: ClassVar[str] = "checkpoint_create"
    checkpoint: dict[str, Any]
    frozen: list[dict[str, Any]]
    overlays: list[dict[str, Any]]
    live: dict[str, Any] | None = None


@dataclass(frozen=True)
class Switch:
    """One disk's switch: its active node ``top`` gets the new ``overlay`` on top of it."""

    top: str
    overlay: str
    file_node: str
    path: str


def plan(run: cmdline.RunFiles, vm_name: str, state: str, frozen: list[dict[str, Any]],
         overlays: list[dict[str, Any]], memory: Path, tpm_folder: Path | None
         ) -> dict[str, Any]:
    """The live part of a checkpoint's intent parameters (``tpm_folder``: where the VM's TPM
    keeps Now's state, when it has one)."""
    switches = [Switch(cmdline.node_name(f["image_id"]), cmdline.node_name(o["id"]),
                       cmdline.file_node_name(o["id"]), o["path"])
                for f, o in zip(frozen, overlays, strict=True)]
    return {"run": str(run.folder), "name": vm_name, "paused": state == "paused",
            "switch": [asdict(s) for s in switches], "memory": str(memory), "route": None,
            "tpm": None if tpm_folder is None else str(tpm_folder)}


def _switches(live: dict[str, Any]) -> list[Switch]:
    return [Switch(**s) for s in live["switch"]]


# --- taking it --------------------------------------------------------------------------------

def _live(params: CheckpointCreate) -> dict[str, Any]:
    if params.live is None:
        raise ValueError("a checkpoint of a VM that is off has no live part")
    return params.live


async def capture(intent: LiveIntent[CheckpointCreate], wanted: str) -> None:
    """The live part of a checkpoint; amends the intent's checkpoint record."""
    live, record = _live(intent.params), intent.params.checkpoint
    run, name = cmdline.RunFiles(Path(live["run"])), live["name"]
    async with qmp.connect(run.qmp, name) as machine:
        if _reuses_paused_state(live, run):
            await _carry_inactive(machine, live, None)  # before QEMU opens the overlays
        for switch in _switches(live):  # handed over open: QEMU's user cannot open paths
            opened = await confine.open_image(machine, switch.path, writable=True)
            await machine.command("blockdev-add", driver="qcow2", backing=None, **{
                "node-name": switch.overlay,
                "file": cmdline.file_node(opened, False, **{"node-name": switch.file_node})})
        failpoint("nodes-added")
        reason = None
        if wanted in PRODUCTION:
            reason = ("the VM is paused, so its guest agent cannot quiesce it" if live["paused"]
                      else await _production(intent, run, machine))
            if reason is None:
                return
            reason = reason.rstrip(".")
            if wanted == "productiononly":
                fix = (f"Resume it first (waymark vm resume {name})" if live["paused"]
                       else "Make sure qemu-guest-agent runs in the guest")
                raise Conflict(f"a production checkpoint of {name!r} is not possible: {reason}. "
                               "Nothing was created (the type is productiononly).",
                               hint=f"{fix}, or take a standard one: waymark checkpoint create "
                                    f"{name} --type standard")
        record["fallback_reason"] = reason
        await _standard(intent, run, machine)


async def _production(intent: LiveIntent[CheckpointCreate], run: cmdline.RunFiles,
                      machine: qmp.Qmp) -> str | None:
    """Freeze, switch, thaw; the reason it could not freeze (nothing changed), or None."""
    live, record = _live(intent.params), intent.params.checkpoint
    live["route"] = "production"  # stored while the guard process starts
    switched = False
    tracked = await bitmaps.on_nodes(machine)  # read before the freeze: not inside it
    try:
        async with guard.frozen(run.agent, live["name"], machine=machine,
                                meanwhile=intent.save) as held:
            await _switch_with_tpm(intent, machine, tracked)
            switched = True
            failpoint("frozen-switched")
    except guard.FreezeFailed as err:
        if not switched:
            live["route"] = None
            intent.save()  # (a standard checkpoint follows: see _standard)
            return err.message
        held.seconds = None  # switched while frozen; the guard thaws by itself
    record.update(kind="production", freeze_seconds=_rounded(held.seconds))
    return None


async def _standard(intent: LiveIntent[CheckpointCreate], run: cmdline.RunFiles,
                    machine: qmp.Qmp) -> None:
    live, record = _live(intent.params), intent.params.checkpoint
    # not stored (a catalog transaction less): recovery takes a memory state under its final
    # name for this route's, the only one that writes one (:func:`_forward`)
    live["route"] = "standard"
    memory = Path(live["memory"])
    pause = None
    if _reuses_paused_state(live, run):  # memory unchanged since that migration
        durable.link_or_copy(run.paused_state, memory)
        _keep_tpm_state(intent)
        # bitmaps of tops QEMU opened since that migration (active) follow in the transaction;
        # those of inactive tops were copied from their files before the overlays were opened
        await _switch(machine, live)
    else:
        tracked = await bitmaps.on_nodes(machine)
        stopped = await _migrate(machine, memory, live["name"])
        failpoint("migrated")
        state = _tpm_copy(live)  # the guest is stopped: the stream's TPM state is this one
        await _switch(machine, live, carry=False)
        await _carry_inactive(machine, live, tracked)
        failpoint("switched")
        if not live["paused"]:
            pause = await _resume(machine) - stopped
        _keep(intent, state)  # durable after the guest runs again: not inside its pause
        if pause is not None:
            await _correct_clock(run, live["name"], pause)
    digest = _seal(memory)
    if live["paused"]:
        keep_paused_state(run, memory, digest)
    record.update(kind="standard", memory_path=str(memory), memory_sha256=digest,
                  pause_seconds=_rounded(pause))


async def _switch(machine: qmp.Qmp, live: dict[str, Any], carry: bool = True,
                  tracked: dict[str, list[bitmaps.Bitmap]] | None = None) -> None:
    """Every disk onto its overlay at one instant; with ``carry`` the change-tracking bitmaps
    of backups follow onto the overlays in the same transaction (:mod:`waymark.qemu.bitmaps`;
    ``tracked``: those read already, while the VM's lock is held)."""
    switches = _switches(live)
    actions = [{"type": "blockdev-snapshot", "data": {"node": s.top, "overlay": s.overlay}}
               for s in switches]
    if carry:
        if tracked is None:
            tracked = await bitmaps.on_nodes(machine)
        for s in switches:
            actions += bitmaps.onto_overlay(tracked, s.top, s.overlay)
    await machine.command("transaction", actions=actions)


async def _switch_with_tpm(intent: LiveIntent[CheckpointCreate], machine: qmp.Qmp,
                           tracked: dict[str, list[bitmaps.Bitmap]]) -> None:
    """:func:`_switch`, and for a VM with a TPM its state copied at the same instant: the
    guest's CPUs stop around both (a few milliseconds), so no TPM command completes between the
    copy and the disks' switch."""
    live = _live(intent.params)
    if live.get("tpm") is None:
        await _switch(machine, live, tracked=tracked)
        return
    await machine.command("stop")
    try:
        _keep_tpm_state(intent)
        failpoint("tpm-copied")  # killed here, recovery continues the guest (_settle_qemu)
        await _switch(machine, live, tracked=tracked)
    finally:
        await machine.command("cont")


def _keep_tpm_state(intent: LiveIntent[CheckpointCreate]) -> None:
    """Now's TPM state into the checkpoint's record, made durable before the disks switch (a
    checkpoint recovery commits always has its TPM state); the guest is stopped."""
    _keep(intent, _tpm_copy(_live(intent.params)))


def _tpm_copy(live: dict[str, Any]) -> bytes | None:
    """Now's TPM state, for a VM with a TPM (read while the guest is stopped)."""
    return None if live.get("tpm") is None else tpm.read_state(Path(live["tpm"]))


def _keep(intent: LiveIntent[CheckpointCreate], state: bytes | None) -> None:
    """``state`` into the checkpoint's record, made durable in the journal."""
    if state is not None:
        intent.params.checkpoint["tpm_state"] = base64.b64encode(state).decode()
        intent.save()


def _reuses_paused_state(live: dict[str, Any], run: cmdline.RunFiles) -> bool:
    """A paused VM already migrated into ``paused.state``: QEMU's block layer is inactive."""
    return bool(live["paused"]) and run.paused_state.is_file()


async def _carry_inactive(machine: qmp.Qmp, live: dict[str, Any],
                          tracked: dict[str, list[bitmaps.Bitmap]] | None) -> None:
    """The bitmaps onto the overlay files while QEMU's nodes are inactive (after a migration
    into a memory state; the guest is stopped): their bitmaps are in the files (QEMU dropped
    them from memory) and the files are unlocked, so qemu-img copies them, and QEMU reads them
    when it opens or reactivates the overlays. ``tracked``: the bitmaps seen before the
    migration (one qemu-img run per bitmap, inside the guest's pause); None: read them from
    the files (a paused VM whose memory was saved earlier: done before the overlays are
    opened)."""
    if tracked is not None and not any(tracked.get(s.top) for s in _switches(live)):
        return  # no backup tracks these disks: nothing to add to the pause
    nodes = await machine.command("query-named-block-nodes", flat=True)
    real = await confine.real_paths(machine)
    files = {n["node-name"]: Path(confine.path_of(n["file"], real)) for n in nodes}
    for s in _switches(live):
        if tracked is None:  # (an active top's bitmaps are in-use in its file: skipped here)
            bitmaps.onto_new_file(files[s.top], Path(s.path), shared=True)
        else:
            bitmaps.copy_files(files[s.top], Path(s.path), tracked.get(s.top, []))


async def _resume(machine: qmp.Qmp) -> float:
    async with machine.events("RESUME") as listener:
        await machine.command("cont")
        return qmp.event_time(await machine.wait_event(listener, RESUME_TIMEOUT,
                                                       "the guest's resume"))


async def _correct_clock(run: cmdline.RunFiles, name: str, pause: float) -> None:
    """A guest paused long enough for its clock to be visibly behind (its clock stands still
    while it is paused) gets the host's time through its agent (best effort)."""
    if pause >= CLOCK_PAUSE:
        await agent.set_clock(run.agent, name)


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 4)


# --- the memory stream ------------------------------------------------------------------------

class _Drain:
    """Copies QEMU's migration stream from a pipe into a file, on the event loop (splice)."""

    def __init__(self, read_fd: int, out_fd: int) -> None:
        self.read_fd, self.out_fd = read_fd, out_fd
        self.loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = self.loop.create_future()
        os.set_blocking(read_fd, False)
        self.loop.add_reader(read_fd, self._ready)

    def _ready(self) -> None:
        try:
            while os.splice(self.read_fd, self.out_fd, CHUNK, flags=os.SPLICE_F_MOVE):
                pass
        except BlockingIOError:
            return
        except OSError as err:
            self._finish(err)
            return
        self._finish(None)  # end of stream: QEMU closed its end

    def _finish(self, err: OSError | None) -> None:
        self.loop.remove_reader(self.read_fd)
        if not self.done.done():
            if err is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(err)

    def close(self) -> None:
        self.loop.remove_reader(self.read_fd)
        os.close(self.read_fd)


def _migration_done(event: dict[str, Any]) -> bool:
    return event["event"] == "MIGRATION" and \
        event.get("data", {}).get("status") in ("completed", "failed", "cancelled")


async def _migrate(machine: qmp.Qmp, memory: Path, name: str) -> float:
    """Migrate the guest into ``memory`` (complete when this returns); the STOP event's time."""
    await machine.command("migrate-set-capabilities",
                          capabilities=[{"capability": "events", "state": True}])
    await machine.command("migrate-set-parameters", **{"max-bandwidth": 1 << 40,
                                                        "downtime-limit": DOWNTIME_STEPS[0]})
    tmp = durable.temp_path(memory)
    read_fd, write_fd = os.pipe()
    with contextlib.suppress(OSError):
        fcntl.fcntl(read_fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    with open(tmp, "wb") as out:
        drain = _Drain(read_fd, out.fileno())
        try:
            try:
                await machine.send_fd(FD_NAME, write_fd)
            finally:
                os.close(write_fd)
            stopped = await _stream(machine, drain, name)
        finally:
            drain.close()
    os.replace(tmp, memory)  # the whole stream is in (durable later, before the commit)
    return stopped


async def _stream(machine: qmp.Qmp, drain: _Drain, name: str) -> float:
    seen: list[dict[str, Any]] = []

    def note(event: dict[str, Any]) -> bool:
        seen.append(event)
        return _migration_done(event)

    try:
        async with machine.events("MIGRATION", "STOP") as listener:
            await machine.command("migrate", uri=f"fd:{FD_NAME}")
            patience = asyncio.ensure_future(_converge(machine))
            try:
                event = await machine.wait_event(listener, MIGRATION_TIMEOUT,
                                                 "writing the memory state", note)
            finally:
                patience.cancel()
    except WaymarkError:
        with contextlib.suppress(ToolError):
            await machine.command("closefd", fdname=FD_NAME)  # the pipe ends: no reader waits
        raise
    if event["data"]["status"] != "completed":
        raise ToolError(f"QEMU could not write the memory state of {name} "
                        f"({event['data']['status']}).")
    await asyncio.wait_for(drain.done, STREAM_END_TIMEOUT)
    stops = [qmp.event_time(e) for e in seen if e["event"] == "STOP"]
    return stops[0] if stops else qmp.event_time(event)


async def _converge(machine: qmp.Qmp) -> None:
    """Allow a longer final pause the longer the guest keeps dirtying memory faster than it is
    written: QEMU stops the guest only once the rest fits in the downtime limit."""
    for limit in DOWNTIME_STEPS[1:]:
        await asyncio.sleep(DOWNTIME_PATIENCE)
        with contextlib.suppress(ToolError):  # the migration may just have ended
            await machine.command("migrate-set-parameters", **{"downtime-limit": limit})


def _seal(memory: Path) -> str:
    """Make the memory state durable and hash it, both at once: the hash reads the page cache
    the stream just filled while the kernel writes it back (each alone took 70-250 ms for a
    100 MiB state of the 256 MiB test guest, one after the other their sum)."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="state-sha256") as pool:
        digest = pool.submit(durable.sha256, memory)
        durable.fsync_file(memory)
        return digest.result()


def keep_paused_state(run: cmdline.RunFiles, memory: Path, digest: str) -> None:
    """A paused VM left in ``postmigrate`` keeps its state for the next save or checkpoint."""
    durable.link_or_copy(memory, run.paused_state)
    durable.write_bytes(run.paused_meta, json.dumps({"sha256": digest}).encode())


# --- recovery ---------------------------------------------------------------------------------

def resolve(params: CheckpointCreate) -> CheckpointCreate | None:
    """Settle a live checkpoint whose Waymark died: the parameters to commit, or None."""
    live = params.live
    if live is None:
        return None  # an offline checkpoint: it did not happen
    run = cmdline.RunFiles(Path(live["run"]))
    if presence.find(run) is None:
        switched = any(_holds_data(s.path) for s in _switches(live))
    else:
        switched = qmp.run_sync(_settle_qemu(run, live))
    if not switched:
        return None
    return _forward(params, run)


def _holds_data(path: str) -> bool:
    """Whether QEMU wrote into the overlay: data, or zeroes and discards (which a qcow2 overlay
    records as zero clusters of its own). When that cannot be read, assume it did: going forward
    keeps the file, going back would delete what might be the guest's writes."""
    try:
        return any(e.depth == 0 and e.present and (e.data or e.zero)
                   for e in qemu_img.allocation_map(Path(path), "qcow2"))
    except WaymarkError:
        return Path(path).exists()


async def _settle_qemu(run: cmdline.RunFiles, live: dict[str, Any]) -> bool:
    """Whether the disks switched; leaves QEMU as if the checkpoint had been taken or not."""
    switches = _switches(live)
    async with qmp.connect(run.qmp, live["name"]) as machine:
        tops = {d["inserted"]["node-name"] for d in await machine.command("query-block")
                if "inserted" in d}
        switched = any(s.overlay in tops for s in switches)
        await _stop_migration(machine)
        if not switched:
            await blockjobs.delete_nodes(machine, [s.overlay for s in switches])
        status = (await machine.command("query-status"))["status"]
        # postmigrate: a standard checkpoint's stream ended; paused: a production checkpoint
        # of a VM with a TPM stopped its CPUs around the switch (_switch_with_tpm)
        stopped_here = status == "postmigrate" or (
            status == "paused" and live.get("route") == "production" and live.get("tpm"))
        if stopped_here and not live["paused"]:
            await machine.command("cont")
    return switched


async def _stop_migration(machine: qmp.Qmp) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CANCEL_TIMEOUT
    while (await machine.command("query-migrate")).get("status") in MIGRATING:
        if loop.time() > deadline:
            raise ToolError(f"the migration of {machine.label} did not stop.")
        await machine.command("migrate_cancel")
        await asyncio.sleep(0.05)


def _forward(params: CheckpointCreate, run: cmdline.RunFiles) -> CheckpointCreate:
    live, record = _live(params), params.checkpoint
    memory = Path(live["memory"])
    if live.get("route") == "production":
        record.update(kind="production")
    elif memory.is_file():  # the standard route's (not stored), complete: see _standard
        digest = _seal(memory)
        record.update(kind="standard", memory_path=str(memory), memory_sha256=digest)
        if record.get("tpm_state") is None and live.get("tpm") is not None:
            # killed before the copy taken in its pause was saved: the memory state restores
            # the TPM's state whenever it is applied, so Now's state serves the other uses
            record["tpm_state"] = base64.b64encode(tpm.read_state(Path(live["tpm"]))).decode()
        if live["paused"] and presence.find(run) is not None:
            keep_paused_state(run, memory, digest)
    else:
        durable.remove(durable.temp_path(memory))
        record.update(kind=DISK_ONLY, fallback_reason=(
            "Waymark was interrupted before the memory state was stored: the checkpoint "
            "holds the disks only"))
    return params

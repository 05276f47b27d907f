"""Running VMs: start, stop, save, pause, resume, status. Async inside (QMP), one QEMU per VM.

Saved state (Hyper-V's "Save"): ``vms/<id>/saved/state.bin`` is QEMU's migration stream written
through an ``fd:`` (QEMU 7.2 has no ``file:`` URI) while the guest is stopped, and
``saved/saved.json`` holds its sha256 and the exact hardware configuration it needs; both are
written durably before the catalog says ``saved`` and before QEMU quits.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from waymark import durable
from waymark.catalog.models import Image, Vm
from waymark.engine import context, locks, lookup
from waymark.engine.context import Context
from waymark.engine.running import observe, presence
from waymark.errors import Conflict, ImageError, NotFound, ToolError, WaymarkError
from waymark.guest import agent
from waymark.images import iso, qemu_img
from waymark.model.hardware import HardwareConfig
from waymark.qemu import accel, cmdline, confine, cpus, firmware, qmp, tpm

MIGRATION_TIMEOUT = 600.0
INCOMING_TIMEOUT = 60.0
CHECK_CHUNK = 4 << 20  # reads of a saved state hashed while QEMU loads it
QUIT_TIMEOUT = 10.0
ALREADY_OFF = "already off"  # stop's answer for a VM that was off: nothing was done
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SavedState:
    folder: Path

    @property
    def state(self) -> Path:
        return self.folder / "state.bin"

    @property
    def meta(self) -> Path:
        return self.folder / "saved.json"

    def load(self, name: str) -> dict[str, Any]:
        try:
            meta: dict[str, Any] = json.loads(self.meta.read_text())
        except (OSError, ValueError) as err:
            raise ImageError(f"the saved state's description {self.meta} is missing or "
                             "damaged.", hint=discard_hint(name)) from err
        return meta


def discard_hint(name: str) -> str:
    return f"Start it fresh, losing the saved memory: waymark vm start {name} --discard-saved-state"


def saved_state(ctx: Context, vm_id: str) -> SavedState:
    return SavedState(ctx.vm_folder(vm_id) / "saved")


def disk_chains(ctx: Context, vm_id: str, hardware: HardwareConfig
                ) -> tuple[cmdline.DiskChain, ...]:
    """Each attached disk's chain from the catalog; a missing file is a clear error here."""
    with ctx.catalog.session() as session:
        disks, images = lookup.disks(session, vm_id), lookup.images(session, vm_id)
    chains = []
    for disk_id in hardware.disks:
        disk = disks[disk_id]
        if disk.active_image_id is None:
            chains.append(cmdline.DiskChain(disk_id, passthrough=disk.passthrough_path))
            continue
        layers: list[cmdline.Layer] = []
        image: Image | None = images[disk.active_image_id]
        while image is not None:
            if not Path(image.path).exists():
                raise NotFound(f"disk image {image.path} is missing.",
                               hint="Run: waymark check (it says what needs the file)")
            layers.append(cmdline.Layer(image.id, image.path, image.format, image.pinned))
            if image.pinned and image.chain_length > 1:
                layers += _user_chain(image)
            image = images[image.parent_id] if image.parent_id else None
        chains.append(cmdline.DiskChain(disk_id, tuple(layers)))
    return tuple(chains)


def _user_chain(image: Image) -> list[cmdline.Layer]:
    """The files below a user's pinned image (its own backing chain), each a read-only node of
    its own: QEMU is handed every file open and never looks a backing file up by path."""
    chain = qemu_img.chain(Path(image.path), image.format)
    return [cmdline.Layer(f"{image.id[:20]}u{depth}", str(above.full_backing_filename),
                          below.format, pinned=True)
            for depth, (above, below) in enumerate(itertools.pairwise(chain), start=1)]


def _check_boot_files(hardware: HardwareConfig, name: str) -> None:
    for option, value in (("--kernel", hardware.kernel), ("--initrd", hardware.initrd)):
        if value and not Path(value).is_file():
            raise NotFound(f"the VM's {option} file {value} does not exist.",
                           hint=f"Restore it, or give it another: waymark vm set {name} "
                                f"{option} FILE (--no-kernel: boot from its disk)")
    if hardware.media and not iso.is_iso(hardware.media):
        raise NotFound(f"the ISO {hardware.media} in the VM's CD drive is gone (or is no ISO "
                       "any more).", hint="Put it back, or empty the drive: waymark vm media "
                                          "eject VM (a saved VM: after discarding its saved "
                                          "state, waymark vm stop VM --force).")


def _accelerator(ctx: Context, name: str, hardware: HardwareConfig,
                 owner: confine.Identity | None) -> accel.Choice:
    """What the VM runs under here (:func:`waymark.qemu.accel.choose`), its pinned CPU model
    checked against this host's QEMU and that accelerator: a clear error, never QEMU's."""
    chosen = accel.choose(ctx.home / "run", name, vm_accel=hardware.accel,
                          host_accel=ctx.settings.accel, kernel=hardware.kernel,
                          probe_kernel=ctx.settings.probe_kernel, owner=owner)
    cpus.require(hardware.cpu_model, chosen.accelerator, ctx.home / "run", name)
    return chosen


def _spawn(ctx: Context, vm_id: str, name: str, hardware: HardwareConfig, incoming: bool
           ) -> tuple[cmdline.RunFiles, subprocess.Popen[bytes], accel.Choice]:
    """QEMU started for the VM (its run files, its process, its accelerator)."""
    _check_boot_files(hardware, name)
    chains = disk_chains(ctx, vm_id, hardware)
    run = presence.run_files(ctx, vm_id)
    run.folder.mkdir(parents=True, exist_ok=True)
    presence.clean(run)
    durable.remove(run.last_exit)
    owner = confine.identity(ctx.settings.qemu_user)
    chosen = _accelerator(ctx, name, hardware, owner)
    if hardware.uefi:
        firmware.build(hardware.firmware)  # installed, or a clear error
    with open(run.serial_log, "ab") as log:
        log.write(f"\n--- waymark: starting {name} ({chosen.accelerator}: {chosen.reason}; "
                  f"CPU {hardware.cpu_model}) ---\n".encode())
    given = confine.handoff(owner, run, hardware, chains)
    try:
        with _tpm(ctx, vm_id, hardware, owner) as tpm_end:
            launch = cmdline.Launch(name, str(uuid.UUID(hex=vm_id)), hardware, chains, run,
                                    chosen.accelerator, incoming=incoming, extra=tuple(given.args),
                                    files=given.files, sockets=given.sockets, taps=given.taps,
                                    tpm=tpm_end, display=given.display)
            daemon = confine.spawn(cmdline.argv(launch), given, run.errors,
                                   what=f"starting VM {name!r}", more_fds=tpm_end)
    finally:
        given.close()  # QEMU holds its own copies now
    return run, daemon, chosen


def tpm_folder(ctx: Context, vm_id: str) -> Path:
    """Where Now's TPM state lives (:mod:`waymark.qemu.tpm`)."""
    return ctx.vm_folder(vm_id) / "tpm"


def tpm_files(ctx: Context, vm_id: str, hardware: HardwareConfig) -> list[Path]:
    """Every file of the VM's TPM folder, when it has a TPM (deleted with the VM)."""
    return tpm.files(tpm_folder(ctx, vm_id)) if hardware.tpm else []


@contextlib.contextmanager
def _tpm(ctx: Context, vm_id: str, hardware: HardwareConfig, owner: confine.Identity | None
         ) -> Iterator[int | None]:
    """The VM's swtpm started (when it has a TPM): QEMU's end of their socket, or None."""
    if not hardware.tpm:
        yield None
        return
    with tpm.started(tpm_folder(ctx, vm_id), (owner.uid, owner.gid) if owner else None) as end:
        yield end


@contextlib.asynccontextmanager
async def _launched(ctx: Context, vm_id: str, name: str, hardware: HardwareConfig,
                    incoming: bool) -> AsyncIterator[tuple[cmdline.RunFiles, qmp.Qmp]]:
    """QEMU started for the VM, and the QMP session that got its greeting (it runs then); a
    QEMU that does not greet is killed and its run files cleared."""
    run, daemon, chosen = _spawn(ctx, vm_id, name, hardware, incoming)
    async with contextlib.AsyncExitStack() as stack:
        try:
            machine = await stack.enter_async_context(qmp.greeted(
                daemon, run.qmp, name, timeout=confine.START_TIMEOUT,
                exited=lambda: _exited(ctx, vm_id, name, hardware, run)))
        except WaymarkError:
            if daemon.poll() is None:
                daemon.kill()
            presence.clean(run)
            raise
        _write_run_file(run.pidfile, str(daemon.pid).encode())
        _write_run_file(run.runtime, json.dumps(
            {"pid": daemon.pid, "accelerator": chosen.accelerator,
             "accelerator_reason": chosen.reason, "started_at": time.time()}).encode())
        yield run, machine


def _write_run_file(path: Path, data: bytes) -> None:
    """A file that describes the running QEMU, replaced atomically (a reader sees the old or
    the new content) but not fsynced: it is worth nothing once the host restarts (no QEMU runs
    then, and :func:`presence.find` takes a missing or garbled file for none), and a Waymark
    that dies leaves it in the page cache for the next. (Two fsyncs and two of its folder were
    5-25 ms of every start.)"""
    staged = durable.temp_path(path)
    staged.write_bytes(data)
    os.replace(staged, path)


def _exited(ctx: Context, vm_id: str, name: str, hardware: HardwareConfig,
            run: cmdline.RunFiles) -> WaymarkError:
    """Why QEMU exited before it greeted: a TPM state swtpm cannot load, or QEMU's last words."""
    error = confine.exited(name, run.errors)
    if hardware.tpm:
        return tpm.damaged(tpm_folder(ctx, vm_id), error.message) or error
    return error


async def _kill(run: cmdline.RunFiles, label: str) -> None:
    """Power the QEMU off now (QMP quit, else SIGKILL) and forget its sockets."""
    found = presence.find(run)
    if found is None:
        presence.clean(run)
        return
    with contextlib.suppress(ToolError):
        async with qmp.connect(run.qmp, label, may_be_exiting=True) as machine:
            await machine.command("quit")
    if not presence.wait_gone(found.pid, QUIT_TIMEOUT):
        os.kill(found.pid, signal.SIGKILL)
        presence.wait_gone(found.pid, QUIT_TIMEOUT)
    presence.clean(run)


def _clean_stop(ctx: Context, vm_id: str) -> None:
    context.installed().after_clean_stop(ctx, vm_id)  # the root's: automatic checkpoints


def _set_state(ctx: Context, vm_id: str, state: str) -> None:
    with ctx.catalog.session() as session:
        session.get_one(Vm, vm_id).state = state


async def start(ctx: Context, vm_id: str, *, fresh: bool = False) -> str:
    """Boot the VM, or resume it exactly where it was saved (``fresh``: boot, discarding the
    saved state). Returns the accelerator used."""
    with ctx.locked(vm_id) as (_, name):
        return await start_locked(ctx, vm_id, name, fresh=fresh)


async def start_locked(ctx: Context, vm_id: str, name: str, *, fresh: bool = False) -> str:
    """:func:`start`, for a caller that holds the VM's lock."""
    state = await settle(ctx, vm_id, name)
    if state in presence.LIVE_STATES:
        raise Conflict(f"VM {name!r} is already {state}.",
                       hint=f"See it with: waymark vm status {name}")
    if state == "saved" and fresh:
        discard_saved(ctx, vm_id)
        state = "off"
    if state == "saved":
        return await _resume_saved(ctx, vm_id, name)
    if (warning := context.installed().before_boot(ctx, vm_id)) is not None:
        log.warning("%s", warning)  # the composition root's hook (automatic checkpoints)
    with ctx.catalog.session() as session:
        hardware = lookup.hardware(session.get_one(Vm, vm_id))
    async with _launched(ctx, vm_id, name, hardware, incoming=False) as (run, _greeted):
        pass  # it runs: later commands make their own connections
    _set_state(ctx, vm_id, "running")
    return str(json.loads(run.runtime.read_text())["accelerator"])


async def power_off(ctx: Context, vm_id: str, name: str, reason: str) -> None:
    """Turn a running or paused VM off at once (its lock held by the caller)."""
    run = presence.run_files(ctx, vm_id)
    await _kill(run, name)
    presence.record_exit(run, reason)
    _set_state(ctx, vm_id, "off")


def discard_saved(ctx: Context, vm_id: str) -> None:
    """Hyper-V's "Delete Saved State": the VM is off; its saved memory is gone."""
    saved = saved_state(ctx, vm_id)
    _set_state(ctx, vm_id, "off")
    for path in (saved.state, saved.meta):
        durable.remove(path)


def _saved_for_resume(ctx: Context, vm_id: str, name: str
                      ) -> tuple[SavedState, str, HardwareConfig]:
    """The saved state to resume, its sha256 (checked while QEMU loads it: :func:`_incoming`)
    and the hardware it needs."""
    saved = saved_state(ctx, vm_id)
    meta = saved.load(name)
    if not saved.state.is_file():
        raise ImageError(f"the saved memory state {saved.state} is missing.",
                         hint=discard_hint(name))
    return saved, str(meta.get("sha256")), HardwareConfig.load(meta["hardware"])


async def _resume_saved(ctx: Context, vm_id: str, name: str) -> str:
    saved, digest, hardware = _saved_for_resume(ctx, vm_id, name)
    # read and hashed from now on, while QEMU starts: the file is in the page cache when QEMU
    # loads it (a state written long ago is read from the disk once, not after QEMU's start)
    checker = _Checker(saved.state)
    checker.start()
    try:
        async with _launched(ctx, vm_id, name, hardware, incoming=True) as (run, machine):
            await _incoming(machine, checker, digest, name)
            await machine.command("cont")
    except WaymarkError:
        await _kill(presence.run_files(ctx, vm_id), name)  # its session closed: quit it
        raise
    # its clock stood still since it was saved: set while the state is recorded (the agent of
    # a guest just resumed under TCG may take a few hundred ms to answer)
    await asyncio.gather(agent.set_clock(run.agent, name),
                         asyncio.to_thread(_resumed, ctx, vm_id, saved))
    return str(json.loads(run.runtime.read_text())["accelerator"])


def _resumed(ctx: Context, vm_id: str, saved: SavedState) -> None:
    _set_state(ctx, vm_id, "running")
    for path in (saved.state, saved.meta):  # consumed: the VM runs on from here
        durable.remove(path)


def _migration_done(event: dict[str, Any]) -> bool:
    return event.get("data", {}).get("status") in ("completed", "failed", "cancelled")


class _Checker(threading.Thread):
    """Hashes a saved state on a thread of its own while QEMU loads the same file (the page
    cache serves whichever of the two reads a part second): the check costs no time of its own
    where it used to read the whole file before QEMU could start."""

    def __init__(self, state: Path) -> None:
        super().__init__(name="state-sha256", daemon=True)
        self.state = state
        self.source = os.open(state, os.O_RDONLY)
        with contextlib.suppress(OSError):
            os.posix_fadvise(self.source, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        self.digest = hashlib.sha256()

    def run(self) -> None:
        try:
            while chunk := os.read(self.source, CHECK_CHUNK):
                self.digest.update(chunk)
        finally:
            os.close(self.source)

    def sha256(self) -> str:
        self.join()
        return self.digest.hexdigest()


async def _incoming(machine: qmp.Qmp, checker: _Checker, digest: str, name: str) -> None:
    """Load the saved state into QEMU (started with ``-incoming defer``) while ``checker``
    (started) checks its sha256 against ``digest``; the guest does not run before it matched,
    and a damaged file is named as the cause also when QEMU failed to load it."""
    state = checker.state
    await machine.command("migrate-set-capabilities",
                          capabilities=[{"capability": "events", "state": True}])
    try:
        with open(state, "rb") as handle:
            await machine.send_fd("waymark-state", handle.fileno())
        async with machine.events("MIGRATION") as listener:
            await machine.command("migrate-incoming", uri="fd:waymark-state")
            event = await machine.wait_event(listener, INCOMING_TIMEOUT,
                                             "loading the saved state", _migration_done)
    finally:
        if await asyncio.to_thread(checker.sha256) != digest:
            raise ImageError(f"the saved memory state {state} is damaged (its checksum does "
                             "not match).", hint=discard_hint(name))
    if event["data"]["status"] != "completed":
        raise ImageError(f"QEMU could not load the saved state {state} "
                         f"({event['data']['status']}).", hint=discard_hint(name))


async def settle(ctx: Context, vm_id: str, name: str) -> str:
    """Reconcile, and notice a guest that powered itself off: QEMU runs with -no-shutdown, so
    it waits in the ``shutdown`` run state; that is a clean stop, not a crash."""
    state = presence.reconcile(ctx, vm_id)
    run = presence.run_files(ctx, vm_id)
    if state not in presence.LIVE_STATES:
        return state
    with contextlib.suppress(ToolError):
        async with qmp.connect(run.qmp, name) as machine:
            status = (await machine.command("query-status"))["status"]
        if status == "shutdown":
            await _kill(run, name)
            presence.record_exit(run, "shut down by the guest")
            _set_state(ctx, vm_id, "off")
            _clean_stop(ctx, vm_id)
            return "off"
    return state


async def _live(ctx: Context, vm_id: str, *allowed: str) -> tuple[str, str, cmdline.RunFiles]:
    """The VM (its lock held by the caller) when its state is one of ``allowed``."""
    _, name = ctx.identify(vm_id)
    state = await settle(ctx, vm_id, name)
    if state not in allowed:
        verb = "start" if state in ("off", "saved") else "resume"
        raise Conflict(f"VM {name!r} is {state}.", hint=f"Try: waymark vm {verb} {name}")
    return vm_id, name, presence.run_files(ctx, vm_id)


async def _cpus(ctx: Context, vm_id: str, before: str, command: str, after: str) -> bool:
    """Stop or restart the guest's CPUs (QMP ``stop``/``cont``); memory stays in QEMU. False:
    the VM already was ``after`` (pausing a paused VM, resuming a running one), nothing done."""
    with ctx.locked(vm_id) as (_, name):
        if await settle(ctx, vm_id, name) == after:
            return False
        _, _, run = await _live(ctx, vm_id, before)
        async with qmp.connect(run.qmp, name) as machine:
            await machine.command(command)
        _set_state(ctx, vm_id, after)
        for path in (run.paused_state, run.paused_meta):  # the guest runs: its memory changes
            durable.remove(path)
        if command == "cont":
            await agent.set_clock(run.agent, name)  # its clock stood still while paused
        return True


async def pause(ctx: Context, vm_id: str) -> bool:
    """Pause the guest's CPUs; False: it already was paused (nothing done)."""
    return await _cpus(ctx, vm_id, "running", "stop", "paused")


async def resume(ctx: Context, vm_id: str) -> bool:
    """Resume a paused guest; False: it already ran (nothing done)."""
    return await _cpus(ctx, vm_id, "paused", "cont", "running")


async def save(ctx: Context, vm_id: str) -> dict[str, Any]:
    """Hyper-V's Save: memory and device state to a file, then QEMU exits."""
    with ctx.locked(vm_id) as (_, name):
        _, _, run = await _live(ctx, vm_id, "running", "paused")
        with ctx.catalog.session() as session:
            hardware = lookup.hardware(session.get_one(Vm, vm_id))
        saved = saved_state(ctx, vm_id)
        saved.folder.mkdir(parents=True, exist_ok=True)
        async with qmp.connect(run.qmp, name) as machine:
            paused_at = time.monotonic()
            await machine.command("stop")
            if run.paused_state.is_file():  # a checkpoint already wrote this paused memory
                durable.link_or_copy(run.paused_state, saved.state.with_suffix(".tmp"))
            else:
                await _outgoing(machine, saved.state.with_suffix(".tmp"))
            pause = time.monotonic() - paused_at  # stop until QEMU has written the state
            digest = _commit_state(saved, hardware)
            _set_state(ctx, vm_id, "saved")
        await _kill(run, name)
        return {"state_file": str(saved.state), "sha256": digest,
                "bytes": saved.state.stat().st_size, "seconds": round(pause, 3)}


async def _outgoing(machine: qmp.Qmp, target: Path) -> None:
    await machine.command("migrate-set-capabilities",
                          capabilities=[{"capability": "events", "state": True}])
    await machine.command("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
    with open(target, "wb") as handle:
        await machine.send_fd("waymark-state", handle.fileno())
        async with machine.events("MIGRATION") as listener:
            await machine.command("migrate", uri="fd:waymark-state")
            event = await machine.wait_event(listener, MIGRATION_TIMEOUT,
                                             "writing the memory state", _migration_done)
        if event["data"]["status"] != "completed":
            raise ToolError(f"QEMU could not write the memory state ({event['data']['status']}).")
        handle.flush()


def _commit_state(saved: SavedState, hardware: HardwareConfig) -> str:
    """Make the written state durable, then describe it; the description is written last."""
    tmp = saved.state.with_suffix(".tmp")
    durable.fsync_file(tmp)
    digest = durable.sha256(tmp)
    tmp.replace(saved.state)
    durable.fsync_dir(saved.folder)
    meta = {"sha256": digest, "hardware": hardware.dump(),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    durable.write_bytes(saved.meta, json.dumps(meta, indent=2).encode())
    return digest


async def stop(ctx: Context, vm_id: str, *, force: bool, timeout: float = 60.0) -> str:
    """Shut the guest down (agent, else ACPI power button) or, with ``force``, power off. A VM
    that is already off is left alone (:data:`ALREADY_OFF`): stopping is idempotent, as
    Hyper-V's Stop-VM."""
    with ctx.locked(vm_id) as (_, name):
        if force and presence.reconcile(ctx, vm_id) == "saved":
            discard_saved(ctx, vm_id)  # Hyper-V's "Delete Saved State"
            return "saved state discarded"
        if await settle(ctx, vm_id, name) == "off":
            return ALREADY_OFF
        _, _, run = await _live(ctx, vm_id, "running", "paused")
        how = "powered off"
        if not force:
            if presence.reconcile(ctx, vm_id) == "paused":
                raise Conflict(f"VM {name!r} is paused: a paused guest cannot shut down.",
                               hint=f"Resume it first, or: waymark vm stop {name} --force")
            how = await _shutdown(run, name, timeout)
        await power_off(ctx, vm_id, name, how)
        if not force:
            _clean_stop(ctx, vm_id)
            ctx.settle(vm_id)  # we hold the lock: finish what the hooks left
        return how


async def _shutdown(run: cmdline.RunFiles, name: str, timeout: float) -> str:
    async with qmp.connect(run.qmp, name) as machine, machine.events("SHUTDOWN") as listener:
        how = "shut down by the guest agent"
        try:
            async with agent.connect(run.agent, name) as guest:
                await guest.shutdown()
        except agent.AgentUnavailable:
            how = "shut down by the ACPI power button"
            await machine.command("system_powerdown")
        try:
            await machine.wait_event(listener, timeout, "the guest's shutdown")
        except ToolError as err:
            raise Conflict(f"VM {name!r} did not shut down within {timeout:g} s.",
                           hint=f"Power it off: waymark vm stop {name} --force") from err
    return how


async def _settle_if_free(ctx: Context, vm_id: str, name: str) -> str:
    """:func:`settle` under the VM's lock when it is free; while a command holds it, the state
    as seen, writing nothing (that command settles it)."""
    fd = locks.try_hold(ctx.home, vm_id)
    if fd is None:
        with ctx.catalog.snapshot() as session:
            recorded = session.get_one(Vm, vm_id).state
        return presence.observed_state(ctx, vm_id, recorded)
    try:
        return await settle(ctx, vm_id, name)
    finally:
        os.close(fd)


async def status(ctx: Context, vm_id: str, *, ask_agent: bool = True) -> dict[str, Any]:
    """``vm status`` after settling what it sees (the read path's
    :func:`waymark.engine.running.observe.status` answers alone when nothing needs settling and
    no agent needs asking)."""
    _, name = ctx.identify(vm_id)
    state = await _settle_if_free(ctx, vm_id, name)
    run = presence.run_files(ctx, vm_id)
    found = presence.find(run)
    agent = await _agent_answers(run, name) if found is not None and state == "running" \
        and ask_agent else None
    out = observe.described(run, vm_id, name, state, found, agent, ctx.settings.silent_seconds)
    if state == "saved":
        out["saved_state"] = str(saved_state(ctx, vm_id).state)
    return out


async def _agent_answers(run: cmdline.RunFiles, name: str) -> bool:
    """Whether the guest agent answers (:func:`waymark.guest.agent.answers`: no wait for a
    guest that runs none, :data:`~waymark.guest.agent.PROBE_TIMEOUT` for one that does)."""
    try:
        async with qmp.connect(run.qmp, name) as machine:
            return await agent.answers(machine, run.agent, name)
    except WaymarkError:
        return False


POWER_ACTIONS = ("start", "stop", "save", "pause", "resume")


async def act(ctx: Context, vm_id: str, action: str, *, force: bool = False,
              timeout: float = 60.0, fresh: bool = False) -> dict[str, Any]:
    """One power action; what ``vm <action> --json`` and the API answer."""
    if action == "start":
        await start(ctx, vm_id, fresh=fresh)
        return await status(ctx, vm_id, ask_agent=False)
    if action == "stop":
        how = await stop(ctx, vm_id, force=force, timeout=timeout)
        return {"state": "off", "how": how, "changed": how != ALREADY_OFF}
    if action == "save":
        return await save(ctx, vm_id)
    if action == "pause":
        return {"state": "paused", "changed": await pause(ctx, vm_id)}
    if action == "resume":
        return {"state": "running", "changed": await resume(ctx, vm_id)}
    raise ValueError(f"unknown power action {action!r}")

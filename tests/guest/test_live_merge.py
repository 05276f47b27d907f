"""Live merges on a real guest under real QEMU (TCG here): deleting checkpoints of a running VM,
merge jobs (progress, --no-wait, wait, cancel), the VM lock while a merge runs, crashes of
Waymark and of QEMU in the middle of a merge, and automatic checkpoints.

One VM of the test guest with two disks, created once for the module and carried through its
tests in file order; each test first puts it in the state it needs (off, no checkpoints: see
:func:`reset`), so any single test also runs alone. Its first disk is the guest's data disk (the
guest appends ``LINE <n>`` to ``/data/log.txt`` with ``sync`` about once a second, so the active
image of that disk is written while merges run); its second is an empty 300 MiB scratch disk the
guest never touches. The guest writes little, so the big layers that make merges observable are
written into the scratch disk's *active* image with ``qemu-io`` while the VM is off (never into
an image a running QEMU holds), then frozen by a checkpoint taken while it is off. Each
checkpoint's expected content is the sha256 of its flattened frozen chain, taken right then.

The planner merges in the cheaper direction by allocated bytes, so each layout below is chosen
to make a particular QEMU job happen on the scratch disk (an image K no larger than its
unreferenced parent U is committed down into it; a larger one gets U streamed into it); the
journal's intents record which job ran, and the tests check that every merge step of a running
VM was one of QEMU's (``qmp_commit``, ``qmp_stream``, ``qmp_relink``, ``qmp_release``), never
qemu-img.

What the running QEMU has open is read through its own QMP socket (``query-block``,
``query-jobs``), only while no Waymark command talks to it (the monitor takes one client); the
guest's kernel log through its agent (``guest-exec dmesg``: the guest prints only emergency
kernel messages on its serial port).

A 256 MiB commit takes QEMU about 0.3 s on this machine, less than one CLI command takes to
start; so to act in the middle of a merge, a test watches the job's row in the catalog (what
``job show`` prints) until its progress moves inside the big step, and where it needs longer it
holds QEMU there with ``SIGSTOP`` (its block job stands still and the Waymark worker waits on
QMP, holding the VM, as behind a very slow disk), then ``SIGCONT``. No image is touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.guest.guests import (
    Guest,
    agent_exec,
    assert_clear_error,
    counters,
    gone,
    processes_naming,
    wait_for,
)
from tests.helpers import Waymark, qemu_io_write, query

MIB = 1 << 20
NAME = "lm"
SCRATCH_MIB = 300
LOCK_TIMEOUT = "2"  # WAYMARK_LOCK_TIMEOUT of the commands that must not wait long
FINISHED = ("completed", "failed", "cancelled")
LIVE_STEP_OPS = {"qmp_commit", "qmp_stream", "qmp_relink", "qmp_release", "delete_file",
                 "delete_files"}
MERGE_KINDS = ("commit_down", "pull_up", "drop")
GUEST_ERRORS = ("I/O error", "EXT4-fs error", "Buffer I/O", "Read-only file system",
                "EXT4-fs warning", "blk_update_request")
KILLED = -signal.SIGKILL

Shas = dict[str, str]  # disk id -> sha256 of the flattened chain


CREATE: list[str] = []  # the arguments of vm create, kept for reset
REPLACED: list[Waymark] = []  # homes of the new VMs made after a failing test broke one


@pytest.fixture(scope="module")
def vm(home: Waymark, image: dict[str, str]) -> Iterator[Guest]:
    """The guest's data disk plus an empty scratch disk (256 MiB of memory). At the end, the
    homes of replacement VMs (see :func:`reset`) are powered off like the module's."""
    CREATE[:] = ["vm", "create", NAME, "--kernel", image["kernel"], "--initrd", image["initrd"],
                 "--disk", image["disk"], "--disk", f"{SCRATCH_MIB}M", "--memory", "256M",
                 "--append", image["append"]]
    home(*CREATE)
    yield Guest(home, NAME)
    for other in REPLACED:
        other.run("vm", "stop", NAME, "--force")
        for pid in processes_naming(str(other.home)):
            os.kill(pid, signal.SIGKILL)


# --- the catalog, read directly (the CLI does not print frozen images or chains) -------------

def images(vm: Guest) -> dict[str, tuple[str, str | None, bool]]:
    """image id -> (path, parent id, pinned)"""
    rows = query(vm.wm.home, "SELECT id, path, parent_id, pinned FROM images WHERE vm_id = ?",
                 vm.id)
    return {i: (path, parent, bool(pinned)) for i, path, parent, pinned in rows}


def frozen(vm: Guest) -> dict[str, dict[str, str]]:
    """checkpoint id -> disk id -> path of its frozen image"""
    found: dict[str, dict[str, str]] = {}
    for ckpt, disk, path in query(
            vm.wm.home, "SELECT f.checkpoint_id, f.disk_id, i.path FROM frozen_images f "
                        "JOIN images i ON i.id = f.image_id WHERE i.vm_id = ?", vm.id):
        found.setdefault(ckpt, {})[disk] = path
    return found


def actives(vm: Guest) -> dict[str, str]:
    """disk id -> path of its active image"""
    known = images(vm)
    return {disk: known[image][0] for disk, image in query(
        vm.wm.home, "SELECT id, active_image_id FROM disks WHERE vm_id = ? "
                    "AND active_image_id IS NOT NULL", vm.id)}


def scratch_disk(vm: Guest) -> str:
    """The id of the VM's second disk (its configuration lists them in order)."""
    (config,), = query(vm.wm.home, "SELECT config FROM vms WHERE id = ?", vm.id)
    return str(json.loads(config)["disks"][1])


def catalog_chains(vm: Guest) -> list[list[str]]:
    """Each disk's chain as the catalog records it, active image first."""
    known = images(vm)
    chains = []
    for (active,) in query(vm.wm.home, "SELECT active_image_id FROM disks WHERE vm_id = ? "
                                       "AND active_image_id IS NOT NULL", vm.id):
        chain, current = [], active
        while current is not None:
            chain.append(known[current][0])
            current = known[current][1]
        chains.append(chain)
    return sorted(chains)


def job_row(vm: Guest, job_id: str) -> dict[str, Any]:
    (status, progress, step, pid, error), = query(
        vm.wm.home, "SELECT status, progress, step, worker_pid, error FROM jobs WHERE id = ?",
        job_id)
    return {"status": status, "progress": progress, "step": step, "worker_pid": pid,
            "error": error}


def unfinished_job(vm: Guest) -> str:
    """The VM's one unfinished merge job (a killed command printed nothing)."""
    rows = query(vm.wm.home, "SELECT id FROM jobs WHERE vm_id = ? AND kind = 'merge' "
                             "AND status IN ('queued', 'running')", vm.id)
    assert len(rows) == 1, rows
    return str(rows[0][0])


def last_intent(vm: Guest) -> int:
    rows = query(vm.wm.home, "SELECT max(id) FROM intents")
    return int(rows[0][0] or 0)


def merge_steps(vm: Guest, since: int) -> list[dict[str, Any]]:
    """The file steps of the merge intents journaled after intent ``since``."""
    steps: list[dict[str, Any]] = []
    for kind, text in query(vm.wm.home, "SELECT kind, steps FROM intents WHERE vm_id = ? "
                                        "AND id > ? ORDER BY id", vm.id, since):
        if kind in MERGE_KINDS:
            steps += json.loads(text)
    return steps


def assert_only_live_steps(steps: list[dict[str, Any]]) -> None:
    """Every merge step was done by QEMU (or removed a file it had let go)."""
    offline = [s for s in steps if s["op"] not in LIVE_STEP_OPS]
    assert not offline, f"qemu-img steps on a running VM: {offline}"


# --- the running QEMU and the guest -----------------------------------------------------------

def qmp(vm: Guest, command: str, **arguments: Any) -> Any:
    """One QMP command on the VM's monitor (only while no Waymark command is connected)."""
    return vm.qmp_command(command, **arguments)


def qemu_chains(vm: Guest) -> list[list[str]]:
    """Each disk's chain as the running QEMU has it open, active image first."""
    path = vm.qemu_file()
    chains = []
    for device in qmp(vm, "query-block"):
        image, chain = device.get("inserted", {}).get("image"), []
        while image:
            chain.append(path(image["filename"]))
            image = image.get("backing-image")
        if chain:
            chains.append(chain)
    return sorted(chains)


def assert_qemu_matches_catalog(vm: Guest) -> None:
    assert qmp(vm, "query-jobs") == [], "a QEMU block job is left over"
    assert qemu_chains(vm) == catalog_chains(vm)


def assert_guest_without_io_errors(vm: Guest, mark: int) -> None:
    """Neither its kernel log (while it runs) nor its serial log since ``mark`` shows an I/O or
    file system error."""
    if vm.qemus():
        kernel = [line for line in agent_exec(vm, "/bin/dmesg").splitlines()
                  if any(e in line for e in GUEST_ERRORS)]
        assert kernel == [], kernel
    serial = [line for line in vm.since(mark).splitlines() if any(e in line for e in GUEST_ERRORS)]
    assert serial == [], serial


def qemu_pid(vm: Guest) -> int:
    pids = vm.qemus()
    assert len(pids) == 1, pids
    return pids[0]


def clean_stop(vm: Guest) -> None:
    out = vm.wm.json("vm", "stop", vm.name)
    assert out["state"] == "off" and "shut down" in out["how"], out
    assert vm.qemus() == []


def crash(vm: Guest) -> None:
    """kill -9 of QEMU; the next command must notice."""
    pid = qemu_pid(vm)
    os.kill(pid, signal.SIGKILL)
    wait_for("QEMU to die", lambda: gone(pid), 10.0)
    status = vm.status()
    assert status["state"] == "off", status


def log_lines(image: str, tmp: Path) -> list[str]:
    """/data/log.txt of a disk chain (VM off), its journal replayed on a flat copy first."""
    raw = tmp / f"{Path(image).stem}.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", image, str(raw)], check=True,
                   capture_output=True)
    fsck = subprocess.run(["e2fsck", "-fy", str(raw)], capture_output=True, text=True,
                          check=False)
    assert fsck.returncode in (0, 1), fsck.stdout + fsck.stderr
    text = subprocess.run(["debugfs", "-R", "cat /log.txt", str(raw)], capture_output=True,
                          text=True, check=True).stdout
    raw.unlink()
    return text.splitlines()


def assert_numbered(lines: list[str]) -> None:
    assert lines and lines == [f"LINE {n}" for n in range(1, len(lines) + 1)], lines[-5:]


# --- building layers while the VM is off ------------------------------------------------------

def _reset(vm: Guest) -> None:
    vm.ensure_off()
    vm.wm("vm", "set", vm.name, "--automatic-checkpoints", "off", "--max-checkpoints", "50")
    if vm.wm.json("vm", "show", vm.name)["checkpoint_count"]:
        vm.wm.run("checkpoint", "delete", vm.name, "*", "--yes", "--json", timeout=600).ok()
    assert vm.wm.json("vm", "show", vm.name)["checkpoint_count"] == 0
    checked = vm.wm.run("check", vm.name, "--json")
    assert checked.returncode == 0, checked


def reset(vm: Guest) -> None:
    """Off, with no checkpoint (their merges done offline), automatic checkpoints off. When an
    earlier failing test left the VM so broken that this fails (that test's failure says how),
    the module goes on with a new VM, leaving the broken one as it is."""
    try:
        _reset(vm)
        return
    except AssertionError as err:
        print(f"going on with a new VM in a new home: {vm.name} is broken: {err}")
    vm.wm.run("vm", "stop", vm.name, "--force")
    # a new home: the broken VM's recovery warnings would reach every command's stderr
    fresh = Waymark(vm.wm.home.with_name(f"{vm.wm.home.name}-{len(REPLACED) + 2}"))
    REPLACED.append(fresh)
    fresh(*CREATE)
    vm.__init__(fresh, NAME)  # type: ignore[misc]
    _reset(vm)


def write(vm: Guest, offset_mib: int, length_mib: int, pattern: int) -> None:
    """A pattern into the scratch disk's active image; the VM must be off."""
    assert vm.state() == "off" and vm.qemus() == [], "never write an image QEMU holds"
    qemu_io_write(Path(actives(vm)[scratch_disk(vm)]), "qcow2", offset_mib * MIB,
                  length_mib * MIB, pattern)


def content_sha256(image: str) -> str:
    """sha256 of the disk as the guest sees it (the whole chain, flattened to raw; ``-U``),
    like :func:`tests.helpers.content_sha256`, through memory (/dev/shm) for speed."""
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(dir=shm if shm.is_dir() else None) as tmp:
        flat = Path(tmp) / "flat.raw"
        subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", image, str(flat)],
                       check=True, capture_output=True)
        digest = hashlib.sha256()
        with flat.open("rb") as data:
            while chunk := data.read(4 * MIB):
                digest.update(chunk)
        return digest.hexdigest()


def content(paths: dict[str, str]) -> Shas:
    return {disk: content_sha256(path) for disk, path in paths.items()}


def take(vm: Guest, name: str, record: dict[str, Shas]) -> str:
    """A checkpoint of the VM (off); its content recorded under its id."""
    assert vm.state() == "off"
    ckpt = vm.wm.json("checkpoint", "create", vm.name, "--name", name)
    assert ckpt["kind"] == "disk-only", ckpt
    record[ckpt["id"]] = content({d["disk_id"]: d["frozen_image"] for d in ckpt["disks"]})
    return str(ckpt["id"])


def names(vm: Guest) -> set[str]:
    return {c["name"] for c in vm.wm.json("checkpoint", "list", vm.name)["checkpoints"]}


def assert_exact(vm: Guest, record: dict[str, Shas]) -> None:
    """Every remaining checkpoint holds exactly what it held when it was taken (read with -U:
    frozen images never change, so this is also safe while the VM runs)."""
    remaining = frozen(vm)
    assert set(remaining) <= set(record), "a checkpoint nobody recorded"
    for ckpt, paths in remaining.items():
        assert content(paths) == record[ckpt], f"checkpoint {ckpt} changed"


def assert_clean(vm: Guest) -> None:
    """check finds nothing; no pending intent or unfinished job; the VM's folders hold exactly
    the files the catalog names (no orphan image, no stray description)."""
    checked = vm.wm.run("check", vm.name, "--json")
    assert checked.returncode == 0 and checked.json()["clean"], checked.stdout + checked.stderr
    assert query(vm.wm.home, "SELECT id, kind FROM intents WHERE vm_id = ? "
                             "AND status = 'pending'", vm.id) == []
    assert query(vm.wm.home, "SELECT id, status FROM jobs WHERE vm_id = ? "
                             "AND status IN ('queued', 'running')", vm.id) == []
    owned = {path for path, _, pinned in images(vm).values() if not pinned}
    disks = {str(p) for p in (vm.wm.home / "vms" / vm.id / "disks").iterdir()}
    assert disks == owned, f"stray {disks - owned}, missing {owned - disks}"
    rows = query(vm.wm.home, "SELECT id, memory_path FROM checkpoints WHERE vm_id = ?", vm.id)
    wanted = {f"{c}.json" for c, _ in rows} | {Path(m).name for _, m in rows if m}
    folder = vm.wm.home / "vms" / vm.id / "checkpoints"
    found = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    assert found == wanted, f"stray {found - wanted}, missing {wanted - found}"


# --- jobs -------------------------------------------------------------------------------------

def delete(vm: Guest, ckpt: str, *, no_wait: bool = False, env: dict[str, str] | None = None
           ) -> str:
    args = ["checkpoint", "delete", vm.name, ckpt, "--json"] + (["--no-wait"] if no_wait else [])
    result = vm.wm.run(*args, env=env, timeout=300).ok()
    return str(result.json()["job_id"])


def wait_job(vm: Guest, job_id: str) -> dict[str, Any]:
    """``job wait``: it must end completed."""
    waited = vm.wm.run("job", "wait", job_id, "--json", timeout=300)
    shown: dict[str, Any] = vm.wm.json("job", "show", job_id)
    assert waited.returncode == 0 and shown["status"] == "completed", \
        f"job wait: {waited}\njob show: {shown}"
    assert shown["progress"] == 1.0, shown
    return shown


def merges_scratch_of(step: str | None, checkpoint: str) -> bool:
    """Whether a merge job's step merges the scratch disk's (the second's) layer of the deleted
    ``checkpoint``: ``VM disk 2/2: merging 'x' into deleted 'p1'`` (steps name the VM, its disk
    and the checkpoints, never an image file)."""
    return bool(step) and " disk 2/" in str(step) and ": merging " in str(step) \
        and f"deleted {checkpoint!r}" in str(step)


def wait_mid_step(vm: Guest, job_id: str, checkpoint: str, timeout: float = 60.0
                  ) -> dict[str, Any]:
    """Until the job reports progress inside its merge step of the scratch disk's layer of the
    deleted ``checkpoint`` (QEMU's job copies): a progress value above the one the step
    started with."""
    needle, start = checkpoint, None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = job_row(vm, job_id)
        assert row["status"] not in FINISHED, f"the job ended before its merge of {needle}: {row}"
        if row["status"] == "running" and merges_scratch_of(row["step"], checkpoint):
            if start is None:
                start = row["progress"]
            elif row["progress"] > start:
                return row
        time.sleep(0.003)
    raise AssertionError(f"no progress of job {job_id} inside the merge of {needle}")


def worker_of(vm: Guest, job_id: str) -> int:
    pid = job_row(vm, job_id)["worker_pid"]
    assert pid is not None
    assert f"job\0run\0{job_id}".encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    return int(pid)


class Held:
    """QEMU stopped (SIGSTOP) for the block: its block job does not move, and the Waymark worker
    that follows it waits on QMP, holding the VM. Always continued afterwards."""

    def __init__(self, pid: int, already: bool = False) -> None:
        self.pid, self.already = pid, already

    def __enter__(self) -> Held:
        if not self.already:
            os.kill(self.pid, signal.SIGSTOP)
        return self

    def __exit__(self, *exc: object) -> None:
        os.kill(self.pid, signal.SIGCONT)


class Throttled(threading.Thread):
    """QEMU run in short bursts (``burst`` seconds of every ``burst + rest``) from SIGSTOP and
    SIGCONT, so a 256 MiB copy of 0.2-0.5 s lasts seconds and a poller surely sees a value
    inside it however loaded the host is; :meth:`hold` ends the bursts with QEMU stopped."""

    def __init__(self, pid: int, burst: float = 0.02, rest: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pid, self.burst, self.rest = pid, burst, rest
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            os.kill(self.pid, signal.SIGSTOP)
            if self.done.wait(self.rest):
                return  # left stopped: hold() continues from here
            os.kill(self.pid, signal.SIGCONT)
            time.sleep(self.burst)

    def hold(self) -> Held:
        """Stop the bursts, QEMU stopped (as :class:`Held`, which continues it at the end)."""
        self.done.set()
        self.join(10.0)
        os.kill(self.pid, signal.SIGSTOP)
        return Held(self.pid, already=True)


def held_mid_merge(vm: Guest, checkpoint: str) -> tuple[str, Held]:
    """``delete --no-wait`` of ``checkpoint``, its job id and QEMU stopped (a :class:`Held`)
    once the job reported progress inside its merge (:func:`wait_mid_step`; QEMU run in bursts
    until then: :class:`Throttled`)."""
    throttle = Throttled(qemu_pid(vm))
    throttle.start()
    try:
        job = delete(vm, checkpoint, no_wait=True)
        wait_mid_step(vm, job, checkpoint)
    except BaseException:
        with throttle.hold():
            raise
    return job, throttle.hold()


def assert_nothing_lost(vm: Guest, record: dict[str, Shas], now_scratch: str) -> None:
    """VM off: check clean, every checkpoint exact, the scratch disk's Now as it was."""
    vm.ensure_off()
    assert_clean(vm)
    assert_exact(vm, record)
    assert content_sha256(actives(vm)[scratch_disk(vm)]) == now_scratch



# --- 1. live deletes --------------------------------------------------------------------------

def data_disk_lines(vm: Guest, tmp: Path) -> list[str]:
    """/data/log.txt of Now's data disk (VM off)."""
    scratch = scratch_disk(vm)
    return log_lines(next(p for d, p in actives(vm).items() if d != scratch), tmp)


def branched_tree(vm: Guest, record: dict[str, Shas]) -> dict[str, str]:
    """Off, from no checkpoint (scratch-disk layers in MiB; the guest runs before c3, so its
    data-disk layer holds what it wrote)::

        c0 [256,288) ─ c1 [0,64) ─┬─ c2 [0,8)
                                  └─ c3 [32,48) ─ c4 [0,128) ─ c5 [64,72) ─ Now

    Returns the scratch images of c3, c4, c5 and Now ("now")."""
    reset(vm)
    for ckpt, (offset, length), boot in (("c0", (256, 32), False), ("c1", (0, 64), False),
                                         ("c2", (0, 8), False), ("c3", (32, 16), True),
                                         ("c4", (0, 128), False), ("c5", (64, 8), False)):
        if ckpt == "c3":
            vm.wm("checkpoint", "apply", vm.name, "c1", "--discard-current")
        write(vm, offset, length, 0x10 + int(ckpt[1]))
        if boot:
            mark = vm.boot()
            vm.wait_counter_above(mark, 10)  # two LINE records
            clean_stop(vm)
        take(vm, ckpt, record)
    scratch = scratch_disk(vm)
    ids = {c["name"]: c["id"] for c in vm.wm.json("checkpoint", "list", vm.name)["checkpoints"]}
    held = {name: frozen(vm)[ids[name]][scratch] for name in ("c3", "c4", "c5")}
    return {**held, "now": actives(vm)[scratch]}


def live_delete(vm: Guest, ckpt: str) -> list[dict[str, Any]]:
    """Delete ``ckpt`` of the running VM; the merge steps it took, each one of QEMU's; QEMU's
    open chains are then the catalog's."""
    since = last_intent(vm)
    delete(vm, ckpt)
    steps = merge_steps(vm, since)
    assert_only_live_steps(steps)
    assert_qemu_matches_catalog(vm)
    return steps


def test_live_deletes_of_branch_point_middle_and_current_checkpoints(vm: Guest, tmp_path: Path
                                                                     ) -> None:
    """The tree of :func:`branched_tree`; then, the guest running and writing: delete c1
    (branch point: its layer stays, shared by its two children), c3 (middle: its small layer
    streamed into c4's larger one), c4 (middle: c5's small layer committed into it below the
    active image), c5 (current: the active image committed into its parent, QEMU pivots).
    Every remaining checkpoint is exact, the guest never saw an I/O error, the files match the
    catalog, and the one left on the other branch applies and boots."""
    record: dict[str, Shas] = {}
    held = branched_tree(vm, record)
    now_scratch = content_sha256(held["now"])
    lines_before = len(data_disk_lines(vm, tmp_path))
    mark = vm.boot()
    assert_qemu_matches_catalog(vm)

    assert live_delete(vm, "c1") == []  # two children: its layer is kept, shared
    assert names(vm) == {"c0", "c2", "c3", "c4", "c5"}
    steps = live_delete(vm, "c3")
    assert any(s["op"] == "qmp_stream" and s["gone"] == held["c3"] and s["path"] == held["c4"]
               for s in steps), steps
    steps = live_delete(vm, "c4")
    assert any(s["op"] == "qmp_commit" and not s["active"] and s["top"] == held["c5"]
               and s["base"] == held["c4"] for s in steps), steps
    steps = live_delete(vm, "c5")
    assert any(s["op"] == "qmp_commit" and s["active"] and s["top"] == held["now"]
               and s["base"] == held["c4"] for s in steps), steps
    assert actives(vm)[scratch_disk(vm)] == held["c4"], "QEMU pivoted onto the merged parent"
    assert names(vm) == {"c0", "c2"}

    vm.wait_counter_above(mark, counters(vm.since(mark))[-1] + 10)  # two more LINE records
    assert vm.state() == "running"
    assert_guest_without_io_errors(vm, mark)
    clean_stop(vm)
    assert_nothing_lost(vm, record, now_scratch)  # off: check compares every backing file
    lines = data_disk_lines(vm, tmp_path)
    assert_numbered(lines)
    assert len(lines) > lines_before + 2

    vm.wm("checkpoint", "apply", vm.name, "c2", "--discard-current")
    mark = vm.boot()
    vm.wait_counter_above(mark, 5)
    assert_guest_without_io_errors(vm, mark)
    vm.ensure_off()
    assert_clean(vm)
    assert_exact(vm, record)


def test_live_deletes_of_runs_of_layers_take_one_block_job_a_run(vm: Guest, tmp_path: Path
                                                                 ) -> None:
    """Off, from no checkpoint (scratch-disk layers in MiB)::

        k0 [256,288) ─ r1 [0,64) ─ r2 [64,72) ─ r3 [72,80) ─ k4 [80,88) ─ s5 [0,8) ─ s6 [8,16)
        ─ k7 [0,96) ─ t8 [96,160) ─ t9 [160,168) ─ Now [168,176)

    then, the guest running and writing, one delete of r*, s* and t* leaves three runs of
    layers, each merged by one QEMU block job into its largest file: k4's layer with r3's and
    r2's into r1's (an intermediate block-commit across three layers), s5's and s6's into k7's
    (one block-stream whose base is two layers down), Now with t9's into t8's (an active
    block-commit across two layers: QEMU pivots onto t8's file). Every remaining checkpoint
    and Now are exact, the guest saw no I/O error, the files match the catalog."""
    record: dict[str, Shas] = {}
    reset(vm)
    layout = [("k0", 256, 32), ("r1", 0, 64), ("r2", 64, 8), ("r3", 72, 8), ("k4", 80, 8),
              ("s5", 0, 8), ("s6", 8, 8), ("k7", 0, 96), ("t8", 96, 64), ("t9", 160, 8)]
    for number, (ckpt, offset, length) in enumerate(layout):
        write(vm, offset, length, 0x40 + number)
        take(vm, ckpt, record)
    write(vm, 168, 8, 0x4f)
    scratch = scratch_disk(vm)
    ids = {c["name"]: c["id"] for c in vm.wm.json("checkpoint", "list", vm.name)["checkpoints"]}
    held = {name: frozen(vm)[ids[name]][scratch] for name, _, _ in layout}
    now = actives(vm)[scratch]
    now_scratch = content_sha256(now)
    mark = vm.boot()
    assert_qemu_matches_catalog(vm)

    since = last_intent(vm)
    vm.wm.run("checkpoint", "delete", vm.name, "[rst]*", "--yes", "--json", timeout=600).ok()
    steps = merge_steps(vm, since)
    assert_only_live_steps(steps)
    assert_qemu_matches_catalog(vm)
    ours = set(held.values()) | {now}
    jobs = [s for s in steps if s["op"] in ("qmp_commit", "qmp_stream")
            and {s.get("top"), s.get("path")} & ours]
    assert len(jobs) == 3, jobs  # one block job a run, not one a layer
    assert any(s["op"] == "qmp_commit" and not s["active"] and s["top"] == held["k4"]
               and s["base"] == held["r1"] for s in jobs), jobs
    assert any(s["op"] == "qmp_stream" and s["path"] == held["k7"] and s["gone"] == held["s5"]
               and s["backing"] in (held["k4"], held["r1"]) for s in jobs), jobs  # (k4's role
    # is r1's file once its run is merged: the runs are merged in either order)
    assert any(s["op"] == "qmp_commit" and s["active"] and s["top"] == now
               and s["base"] == held["t8"] for s in jobs), jobs
    assert actives(vm)[scratch] == held["t8"], "QEMU pivoted onto the run's largest file"
    assert names(vm) == {"k0", "k4", "k7"}

    vm.wait_counter_above(mark, counters(vm.since(mark))[-1] + 10)  # two more LINE records
    assert vm.state() == "running"
    assert_guest_without_io_errors(vm, mark)
    clean_stop(vm)
    assert_nothing_lost(vm, record, now_scratch)
    assert_numbered(data_disk_lines(vm, tmp_path))


# --- 2. Waymark or QEMU killed in the middle of a merge ----------------------------------------

def big_chain(vm: Guest, prefix: str, record: dict[str, Shas]) -> tuple[list[str], str]:
    """Off: ``<p>0`` [256,288) ─ ``<p>1`` [0,64) ─ ``<p>2`` [0,256) ─ ``<p>3`` [0,256) ─ Now
    [0,240) on the scratch disk; then booted. Returns the checkpoints and Now's scratch sha."""
    reset(vm)
    layout = [(256, 32), (0, 64), (0, 256), (0, 256)]
    made = []
    for n, (offset, length) in enumerate(layout):
        write(vm, offset, length, 0x20 + n)
        made.append(take(vm, f"{prefix}{n}", record))
    write(vm, 0, 240, 0x2f)
    now_scratch = content_sha256(actives(vm)[scratch_disk(vm)])
    vm.boot()
    return made, now_scratch


def test_waymark_killed_mid_merge_is_carried_on_by_the_next_command(vm: Guest, tmp_path: Path
                                                                    ) -> None:
    """The --no-wait worker SIGKILLed while QEMU's active commit copies: QEMU's job goes on to
    READY and waits there; ``job wait`` completes it (QEMU pivots). Then the waiting delete
    SIGKILLed at journal points, QEMU still running: before QEMU's job (``step:qmp_commit``)
    and after a merge committed (``step:qmp_release``); the next command finishes live."""
    mark = vm.mark()
    record: dict[str, Shas] = {}
    made, now_scratch = big_chain(vm, "w", record)
    scratch = scratch_disk(vm)
    held = {c: frozen(vm)[c][scratch] for c in made}
    active = actives(vm)[scratch]

    job = delete(vm, "w3", no_wait=True)  # Now's 240 MiB committed into w3's 256 MiB
    wait_mid_step(vm, job, "w3")
    worker = worker_of(vm, job)
    with Held(qemu_pid(vm)):
        os.kill(worker, signal.SIGKILL)
        wait_for("the worker to die", lambda: gone(worker), 10.0)
    orphan = f"wm-commit-{Path(active).stem[:12]}"
    seen = wait_for(f"QEMU's job {orphan} at READY", lambda: [
        j for j in qmp(vm, "query-jobs") if j["id"] == orphan and j["status"] == "ready"],
        30.0, interval=0.2)
    print(f"after the worker died, QEMU holds {seen}")
    wait_job(vm, job)
    assert actives(vm)[scratch] == held[made[3]], "QEMU pivoted onto w3's file"
    assert_qemu_matches_catalog(vm)
    assert_exact(vm, record)

    for ckpt, point in (("w1", "step:qmp_commit"), ("w2", "step:qmp_release")):
        log = tmp_path / f"{point}.log"
        since = last_intent(vm)
        killed = vm.wm.run("checkpoint", "delete", vm.name, ckpt, env=vm.wm.env(
            WAYMARK_FAILPOINT=point, WAYMARK_FAILPOINT_LOG=str(log)))
        assert killed.returncode == KILLED, killed
        points = [line.split(" ", 1)[1] for line in log.read_text().splitlines()]
        assert points[-1] == point, points
        assert all(p == "commit" or p.removeprefix("step:") in LIVE_STEP_OPS
                   for p in points), points
        job = unfinished_job(vm)
        wait_job(vm, job)
        assert_only_live_steps(merge_steps(vm, since))
        assert_qemu_matches_catalog(vm)
        assert_exact(vm, record)
    assert names(vm) == {"w0"}

    vm.wait_counter_above(mark, counters(vm.since(mark))[-1] + 5)  # it still writes
    assert_guest_without_io_errors(vm, mark)
    clean_stop(vm)
    assert_nothing_lost(vm, record, now_scratch)
    assert_numbered(log_lines(next(p for d, p in actives(vm).items() if d != scratch),
                              tmp_path))


def assert_job_completes_losing_nothing(vm: Guest, job: str, record: dict[str, Shas],
                                        now_scratch: str, left: set[str]) -> None:
    """``job wait`` carries the merge job on to completed; every checkpoint's content and
    Now's are intact, and the checkpoints ``left`` remain."""
    waited = vm.wm.run("job", "wait", job, "--json", timeout=300)
    assert_nothing_lost(vm, record, now_scratch)
    assert names(vm) == left
    shown = vm.wm.json("job", "show", job)
    assert waited.returncode == 0 and shown["status"] == "completed", (waited, shown)


def test_qemu_crash_after_waymark_was_killed_the_merge_is_redone_offline(vm: Guest) -> None:
    """The waiting delete SIGKILLed before its first live commit (an intermediate commit of the
    data disk, whose child is in the live chain), then QEMU SIGKILLed: the next command redoes
    the merges with qemu-img; nothing is lost, the chains on disk match the catalog, the job
    completes, and the VM boots on the merged chain."""
    record: dict[str, Shas] = {}
    _, now_scratch = big_chain(vm, "q", record)
    since = last_intent(vm)
    killed = vm.wm.run("checkpoint", "delete", vm.name, "q1",
                       env=vm.wm.env(WAYMARK_FAILPOINT="step:qmp_commit"))
    assert killed.returncode == KILLED, killed
    job = unfinished_job(vm)
    assert any(s["op"] == "qmp_commit" and not s["active"] for s in merge_steps(vm, since))
    crash(vm)
    assert_job_completes_losing_nothing(vm, job, record, now_scratch, {"q0", "q2", "q3"})
    mark = vm.boot()
    vm.wait_counter_above(mark, 5)
    assert_guest_without_io_errors(vm, mark)
    vm.ensure_off()


def test_qemu_killed_mid_merge_the_merge_is_redone_offline(vm: Guest) -> None:
    """QEMU SIGKILLed while its active commit copies (the --no-wait worker alive): the merge is
    redone with qemu-img, nothing is lost, and the job ends completed. The kill may leave
    leaked clusters in the image QEMU was writing (it does in some runs): ``check`` reports
    them as a notice, not an error, and ``check --repair`` frees them."""
    record: dict[str, Shas] = {}
    _, now_scratch = big_chain(vm, "k", record)
    job = delete(vm, "k3", no_wait=True)
    wait_mid_step(vm, job, "k3")
    crash(vm)
    assert_job_completes_losing_nothing(vm, job, record, now_scratch, {"k0", "k1", "k2"})
    repaired = vm.wm.json("check", vm.name, "--repair")["findings"]
    assert all(f["kind"] == "leaked-clusters" and f["repaired"] for f in repaired), repaired
    for path in (path for path, _, pinned in images(vm).values() if not pinned):
        checked = subprocess.run(["qemu-img", "check", "-f", "qcow2", path],
                                 capture_output=True, text=True, check=False)
        assert checked.returncode == 0, checked.stdout + checked.stderr


# --- 3. jobs: progress, --no-wait, wait, cancel -------------------------------------------------

def pairs(vm: Guest, prefix: str, count: int, record: dict[str, Shas]
          ) -> tuple[dict[str, str], str]:
    """Off: ``count`` checkpoints alternately over 288 MiB and 256 MiB layers of the scratch
    disk (so each 256 MiB layer is committed down into the 288 MiB one below it); returns each
    checkpoint's scratch image and Now's scratch content. Then booted."""
    reset(vm)
    made = {}
    for n in range(count):
        write(vm, 0, 256 if n % 2 else 288, 0x40 + n)
        made[f"{prefix}{n + 1}"] = take(vm, f"{prefix}{n + 1}", record)
    scratch = scratch_disk(vm)
    held = {name: frozen(vm)[ckpt][scratch] for name, ckpt in made.items()}
    now_scratch = content_sha256(actives(vm)[scratch])
    vm.boot()
    return held, now_scratch


class Sampler(threading.Thread):
    """Reads a job's row (what ``job show`` prints) every few milliseconds until it ends."""

    def __init__(self, vm: Guest, job_id: str) -> None:
        super().__init__(daemon=True)
        self.vm, self.job_id = vm, job_id
        self.rows: list[tuple[str, float, str | None]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            row = job_row(self.vm, self.job_id)
            entry = (row["status"], row["progress"], row["step"])
            if not self.rows or self.rows[-1] != entry:
                self.rows.append(entry)
            if row["status"] in FINISHED:
                return
            time.sleep(0.002)


def test_merge_job_progress_wait_and_cancel(vm: Guest) -> None:
    """``delete --no-wait`` of a checkpoint whose 256 MiB child layer is committed into it:
    progress only increases, through at least five values; ``job wait`` ends ``completed``.
    Then ``job cancel`` in the middle of another 256 MiB commit, after the job reported a value
    fed by QEMU's job offsets inside that copy (:func:`wait_mid_step`, QEMU run in bursts by
    :class:`Throttled` so the copy lasts long enough on any host; the cancel landing mid-copy
    proves the value was not the copy's end): every checkpoint exact, ``check``
    reports ``uncompacted``, ``check --repair`` merges (live).

    The values are counted by a reader of the job's row (what ``job show`` prints) every few
    milliseconds: QEMU commits 256 MiB in 0.2 to 0.5 s here and the row is written at most
    every 0.1 s, so 0 to 5 values fall inside the first copy (besides its start and end: the
    first half cannot demand one, the second half holds the copy to see one), while ``job
    show`` itself, about 0.8 s per command, sees only two (one running, then completed).
    Both counts are printed."""
    record: dict[str, Shas] = {}
    held, now_scratch = pairs(vm, "p", 4, record)

    job = delete(vm, "p1", no_wait=True)
    sampler = Sampler(vm, job)
    sampler.start()
    shown: list[tuple[str, float]] = []
    try:
        while not shown or shown[-1][0] not in FINISHED:
            d = vm.wm.json("job", "show", job)
            shown.append((d["status"], d["progress"]))
        wait_job(vm, job)
    finally:
        sampler.stop.set()
        sampler.join(10.0)
    progress = [p for _, p, _ in sampler.rows]
    in_copy = sorted({p for _, p, step in sampler.rows
                      if merges_scratch_of(step, "p1")})
    print(f"job rows: {sampler.rows}\njob show: {shown}\n{len(set(progress))} distinct values, "
          f"{len(in_copy)} seen inside the 256 MiB copy {in_copy}, "
          f"{len({p for _, p in shown})} seen by job show")
    assert progress == sorted(progress), sampler.rows
    assert [p for _, p in shown] == sorted(p for _, p in shown), shown
    assert len(set(progress)) >= 5, sampler.rows
    assert in_copy, f"the merge step of {held['p1']} was not seen: {sampler.rows}"
    assert sampler.rows[-1][:2] == ("completed", 1.0)
    assert_qemu_matches_catalog(vm)

    since = last_intent(vm)
    job, stopped = held_mid_merge(vm, "p3")
    with stopped:  # its worker waits on QMP: the cancel lands inside the copy
        asked = vm.wm.json("job", "cancel", job)
    assert asked["status"] == "running", asked
    waited = vm.wm.run("job", "wait", job)
    assert waited.returncode == 10, waited
    assert vm.wm.json("job", "show", job)["status"] == "cancelled"
    assert_only_live_steps(merge_steps(vm, since))
    assert_qemu_matches_catalog(vm)
    assert_exact(vm, record)
    checked = vm.wm.run("check", vm.name, "--json")
    assert checked.returncode == 1, checked
    assert [f["kind"] for f in checked.json()["findings"]] == ["uncompacted"], checked.stdout

    repaired = vm.wm.run("check", vm.name, "--repair", "--json", timeout=300)
    assert repaired.returncode == 0, repaired
    assert [(f["kind"], f["repaired"]) for f in repaired.json()["findings"]] == \
        [("uncompacted", "merged")], repaired.stdout
    assert_only_live_steps(merge_steps(vm, since))
    assert_qemu_matches_catalog(vm)
    assert names(vm) == {"p2", "p4"}
    assert_nothing_lost(vm, record, now_scratch)


# --- 4. the VM's lock while a merge runs --------------------------------------------------------

def test_a_running_merge_holds_the_vm_but_not_reads_or_renames(vm: Guest) -> None:
    """While a live merge runs (held mid-copy), ``checkpoint create`` waits
    WAYMARK_LOCK_TIMEOUT, then fails with exit 75 naming the job; ``checkpoint list``,
    ``checkpoint rename`` and ``job list`` answer at once. Once the job ends, a live
    checkpoint is taken."""
    record: dict[str, Shas] = {}
    _, now_scratch = pairs(vm, "b", 2, record)
    job = delete(vm, "b1", no_wait=True)
    wait_mid_step(vm, job, "b1")
    env = vm.wm.env(WAYMARK_LOCK_TIMEOUT=LOCK_TIMEOUT)
    with Held(qemu_pid(vm)):
        started = time.monotonic()
        refused = vm.wm.run("checkpoint", "create", vm.name, "--name", "during", env=env)
        waited = time.monotonic() - started
        listed = vm.wm.run("checkpoint", "list", vm.name, "--json", env=env)
        renamed = vm.wm.run("checkpoint", "rename", vm.name, "b2", "b2 renamed", "--json",
                            env=env)
        running = vm.wm.run("job", "list", "--json", env=env)
        row = job_row(vm, job)
    assert refused.returncode == 75, refused
    assert_clear_error(refused, job[:12], f"job wait {job[:12]}")
    assert waited >= float(LOCK_TIMEOUT), waited
    assert listed.returncode == 0, listed
    assert [c["name"] for c in listed.json()["checkpoints"]] == ["b2"]
    assert renamed.returncode == 0 and renamed.json()["name"] == "b2 renamed", renamed
    assert running.returncode == 0, running
    assert [(j["id"], j["status"]) for j in running.json()][-1:] == [(job, "running")]
    assert row["status"] == "running" and 0 < row["progress"] < 1, row

    wait_job(vm, job)
    assert_qemu_matches_catalog(vm)
    after = vm.wm.json("checkpoint", "create", vm.name, "--name", "after")
    record[after["id"]] = content({d["disk_id"]: d["frozen_image"] for d in after["disks"]})
    assert names(vm) == {"b2 renamed", "after"}
    assert_qemu_matches_catalog(vm)
    assert_nothing_lost(vm, record, now_scratch)  # Now's scratch disk: the guest never writes it


# --- 5. automatic checkpoints -----------------------------------------------------------------

def automatic(vm: Guest) -> tuple[int, str | None]:
    shown = vm.wm.json("vm", "show", vm.name)
    return shown["checkpoint_count"], shown["automatic_checkpoint_id"]


def test_automatic_checkpoints(vm: Guest) -> None:
    """Taken at each start from off; deleted after a clean shutdown; kept, holding the disks as
    they were before that run, after a crash (kill -9 of QEMU) and after ``vm stop --force``;
    at the limit the start goes on without one, with a warning, and that run's clean shutdown
    deletes nothing."""
    reset(vm)
    record: dict[str, Shas] = {}
    vm.wm("vm", "set", vm.name, "--automatic-checkpoints", "on")

    mark = vm.mark()
    started = vm.wm.run("vm", "start", vm.name, "--json").ok()
    assert "warning" not in started.stderr, started.stderr
    count, auto = automatic(vm)
    assert count == 1 and auto is not None
    (listed,) = vm.wm.json("checkpoint", "list", vm.name)["checkpoints"]
    assert listed["id"] == auto and listed["kind"] == "disk-only", listed
    assert listed["name"].startswith(f"Automatic Checkpoint - {vm.name} - ("), listed
    vm.wait_ready(mark)
    clean_stop(vm)
    assert automatic(vm) == (0, None)
    assert_clean(vm)

    kept: list[str] = []
    for how in ("crash", "force"):
        before = content(actives(vm))
        mark = vm.mark()
        vm.wm("vm", "start", vm.name)
        count, auto = automatic(vm)
        assert count == len(kept) + 1 and auto is not None and auto not in kept
        if how == "crash":
            vm.wait_counter_above(mark, 5)  # the guest runs, and Now moves on from the checkpoint
            crash(vm)
        else:
            vm.wm("vm", "stop", vm.name, "--force")
        record[auto] = before
        kept.append(auto)
        assert set(frozen(vm)) == set(kept), how
        assert_exact(vm, record)

    vm.wm("vm", "set", vm.name, "--max-checkpoints", str(len(kept)))
    mark = vm.mark()
    started = vm.wm.run("vm", "start", vm.name, "--json").ok()
    assert started.stderr.startswith("warning: "), started.stderr
    assert "no automatic checkpoint" in started.stderr and "limit" in started.stderr, \
        started.stderr
    assert automatic(vm)[0] == len(kept)
    vm.wait_ready(mark)
    clean_stop(vm)
    assert set(frozen(vm)) == set(kept), "the clean stop of a run without one deleted one"
    assert_clean(vm)
    assert_exact(vm, record)

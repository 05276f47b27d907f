"""Disk content through real qemu-img/qemu-io: checkpoints keep what they froze, Now holds what
was written since the last apply, pinned files stay byte-identical, and no image file is orphaned.

Every test keeps a model of what the guest would see on each disk (a bytearray per disk), writes
into the active images with qemu-io, and compares flattened chains against the model.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from tests.helpers import Waymark, content_sha256, file_sha256, qemu_io_write, query

MIB = 1 << 20
CLUSTER = 64 * 1024  # qcow2's default cluster size: every write below is cluster-aligned


def sha(data: bytes | bytearray) -> str:
    return hashlib.sha256(bytes(data)).hexdigest()


def flat_bytes(path: Path, fmt: str) -> bytes:
    """The guest-visible bytes of an image chain."""
    with tempfile.TemporaryDirectory() as tmp:
        flat = Path(tmp) / "flat.raw"
        subprocess.run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", str(path),
                        str(flat)], check=True, capture_output=True)
        return flat.read_bytes()


def own_clusters(path: str) -> set[int]:
    """Indexes of the clusters the image file itself holds (not its backing chain)."""
    out = subprocess.run(["qemu-img", "map", "-U", "--output=json", "-f", "qcow2", path],
                         check=True, capture_output=True, text=True).stdout
    owned: set[int] = set()
    for extent in json.loads(out):
        if extent["depth"] == 0 and extent.get("present", extent["data"]):
            owned |= set(range(extent["start"] // CLUSTER,
                               (extent["start"] + extent["length"]) // CLUSTER))
    return owned


def assert_no_orphans(home: Path, vm_id: str) -> None:
    """Files on disk and image rows (and consolidation rows) match, and every owned image is
    still needed."""
    rows = query(home, "SELECT id, path, pinned, parent_id FROM images WHERE vm_id = ?", vm_id)
    owned = {path for _, path, pinned, _ in rows if not pinned}
    owned |= {p for (p,) in query(home, "SELECT path FROM consolidations WHERE vm_id = ?", vm_id)}
    on_disk = {str(p) for p in (home / "vms" / vm_id / "disks").glob("*.qcow2")}
    assert on_disk == owned, f"stray files {on_disk - owned}, missing files {owned - on_disk}"
    for _, path, _, _ in rows:
        assert Path(path).exists(), f"the catalog names {path}, which does not exist"
    active = {i for (i,) in query(home, "SELECT active_image_id FROM disks WHERE vm_id = ?",
                                  vm_id)}
    frozen = {i for (i,) in query(
        home, "SELECT f.image_id FROM frozen_images f JOIN checkpoints c "
              "ON c.id = f.checkpoint_id WHERE c.vm_id = ?", vm_id)}
    children: dict[str, int] = {}
    for _, _, _, parent in rows:
        if parent is not None:
            children[parent] = children.get(parent, 0) + 1
    for image_id, path, pinned, _ in rows:
        needed = pinned or image_id in active or image_id in frozen or children.get(image_id, 0) > 1
        assert needed, f"image {path} is neither active, frozen, pinned nor shared"


class Vm:
    """One VM driven through the CLI, with the content model of each of its disks."""

    def __init__(self, wm: Waymark, name: str, disk_args: list[str],
                 initial: list[bytes] | None = None) -> None:
        self.wm, self.name = wm, name
        args = [a for d in disk_args for a in ("--disk", d)]
        shown = wm.json("vm", "create", name, *args)
        self.id: str = shown["id"]
        self.disk_ids: list[str] = [d["id"] for d in shown["disks"]]
        self.now: dict[str, bytearray] = {}
        for index, disk in enumerate(shown["disks"]):
            self.now[disk["id"]] = bytearray(initial[index] if initial else
                                             bytes(disk["virtual_size"]))
        # clusters written into each disk's active image since it was made
        self.dirty: dict[str, set[int]] = {d: set() for d in self.disk_ids}
        self.checkpoints: dict[str, dict[str, str]] = {}  # id -> disk id -> content sha256
        self.frozen: dict[str, dict[str, str]] = {}  # id -> disk id -> frozen image path
        self.current: str | None = None
        self.parents: dict[str, str | None] = {}
        self._active: dict[str, str] | None = None

    def active(self) -> dict[str, str]:
        """disk id -> active image path, as ``vm show --json`` gives it."""
        if self._active is None:
            shown = self.wm.json("vm", "show", self.name)
            self._active = {d["id"]: d["active_image"] for d in shown["disks"]}
        return self._active

    def write(self, disk: int, offset: int, length: int, pattern: int) -> None:
        assert offset % CLUSTER == 0 and length % CLUSTER == 0
        disk_id = self.disk_ids[disk]
        qemu_io_write(Path(self.active()[disk_id]), "qcow2", offset, length, pattern)
        self.now[disk_id][offset:offset + length] = bytes([pattern]) * length
        self.dirty[disk_id] |= set(range(offset // CLUSTER, (offset + length) // CLUSTER))

    def _record(self, ckpt_id: str, content: dict[str, str], data: dict[str, Any]) -> None:
        self.checkpoints[ckpt_id] = content
        self.frozen[ckpt_id] = {d["disk_id"]: d["frozen_image"] for d in data["disks"]}
        assert set(self.frozen[ckpt_id]) == set(self.disk_ids)
        self.parents[ckpt_id] = self.current

    def checkpoint(self, name: str) -> str:
        before = {d: content_sha256(p) for d, p in self.active().items()}
        assert before == {d: sha(c) for d, c in self.now.items()}
        data = self.wm.json("checkpoint", "create", self.name, "--name", name)
        self._record(data["id"], before, data)
        # the checkpoint froze the images that were active; a new empty overlay is Now
        assert self.frozen[data["id"]] == self.active()
        self.current, self._active = data["id"], None
        for disk_id in self.disk_ids:
            self.dirty[disk_id] = set()
        return str(data["id"])

    def apply(self, ckpt_id: str, mode: str) -> dict[str, Any]:
        saved = {d: sha(c) for d, c in self.now.items()}
        result: dict[str, Any] = self.wm.json("checkpoint", "apply", self.name, ckpt_id,
                                              f"--{mode}")
        assert result["checkpoint_id"] == ckpt_id
        if mode == "checkpoint-first":
            safety = result["safety_checkpoint_id"]
            assert safety is not None
            self._record(safety, saved, self.wm.json("checkpoint", "show", self.name, safety))
        else:
            assert result["safety_checkpoint_id"] is None
        self.current, self._active = ckpt_id, None
        for disk_id in self.disk_ids:
            self.now[disk_id] = bytearray(flat_bytes(Path(self.frozen[ckpt_id][disk_id]),
                                                     "qcow2"))
            assert sha(self.now[disk_id]) == self.checkpoints[ckpt_id][disk_id]
            self.dirty[disk_id] = set()
        return result

    def verify(self) -> None:
        """Every checkpoint holds its content; Now holds exactly what was written since."""
        listing = self.wm.json("checkpoint", "list", self.name)
        assert {c["id"] for c in listing["checkpoints"]} == set(self.checkpoints)
        assert listing["current_checkpoint_id"] == self.current
        assert {c["id"]: c["parent_id"] for c in listing["checkpoints"]} == self.parents
        in_catalog: dict[str, dict[str, str]] = {}
        for ckpt_id, disk_id, path in query(
                self.wm.home, "SELECT f.checkpoint_id, f.disk_id, i.path FROM frozen_images f "
                "JOIN images i ON i.id = f.image_id WHERE i.vm_id = ?", self.id):
            in_catalog.setdefault(ckpt_id, {})[disk_id] = path
        # compaction may move a frozen role to another file; the catalog says where it is now
        assert {c: set(d) for c, d in in_catalog.items()} == \
            {c: set(self.disk_ids) for c in self.checkpoints}
        self.frozen = in_catalog
        for ckpt_id, expected in self.checkpoints.items():
            got = {d: content_sha256(p) for d, p in self.frozen[ckpt_id].items()}
            assert got == expected, f"checkpoint {ckpt_id} changed content"
        for disk_id, path in self.active().items():
            assert content_sha256(path) == sha(self.now[disk_id]), f"disk {disk_id} content"
            assert own_clusters(path) == self.dirty[disk_id], \
                f"disk {disk_id}: the active image holds other clusters than those written"
        assert_no_orphans(self.wm.home, self.id)


def test_checkpoints_keep_their_content_across_branches(wm: Waymark) -> None:
    vm = Vm(wm, "branchy", ["2M"])
    vm.write(0, 0, CLUSTER, 0x11)
    a = vm.checkpoint("A")
    vm.write(0, CLUSTER, 2 * CLUSTER, 0x22)
    vm.write(0, 0, CLUSTER, 0x23)  # overwrites what A froze: A must not see it
    b = vm.checkpoint("B")
    vm.verify()
    vm.write(0, MIB, CLUSTER, 0x33)  # lost by the apply below
    vm.apply(a, "discard-current")
    vm.verify()
    assert vm.now[vm.disk_ids[0]][MIB] == 0 and vm.now[vm.disk_ids[0]][0] == 0x11
    # a second branch below A
    vm.write(0, 4 * CLUSTER, CLUSTER, 0x44)
    c = vm.checkpoint("C")
    vm.write(0, 5 * CLUSTER, CLUSTER, 0x55)
    vm.verify()
    result = vm.apply(b, "checkpoint-first")  # the safety checkpoint D holds C + 0x55
    d = result["safety_checkpoint_id"]
    vm.verify()
    assert vm.parents == {a: None, b: a, c: a, d: c}
    wm("checkpoint", "rename", vm.name, a, "renamed A")
    assert wm.json("checkpoint", "show", vm.name, "renamed A")["id"] == a
    vm.write(0, 7 * CLUSTER, CLUSTER, 0x77)
    vm.verify()
    vm.apply(d, "discard-current")
    vm.verify()
    disk = vm.now[vm.disk_ids[0]]
    assert disk[0] == 0x11 and disk[4 * CLUSTER] == 0x44 and disk[5 * CLUSTER] == 0x55
    assert disk[CLUSTER] == 0 and disk[7 * CLUSTER] == 0
    # applying twice in a row, then checkpointing the re-applied state
    vm.apply(a, "discard-current")
    vm.apply(a, "discard-current")
    vm.write(0, 3 * CLUSTER, CLUSTER, 0x99)
    vm.checkpoint("E")
    vm.verify()


def test_two_disks_keep_separate_content(wm: Waymark) -> None:
    vm = Vm(wm, "twin", ["1M", "3M"])
    first, second = vm.disk_ids
    assert len(vm.now[first]) == MIB and len(vm.now[second]) == 3 * MIB
    vm.write(0, 0, CLUSTER, 0x01)
    vm.write(1, 2 * MIB, CLUSTER, 0x02)
    a = vm.checkpoint("A")
    vm.write(1, 0, 2 * CLUSTER, 0x03)
    b = vm.checkpoint("B")
    vm.write(0, CLUSTER, CLUSTER, 0x04)
    vm.verify()
    frozen_a, frozen_b = vm.frozen[a], vm.frozen[b]
    assert set(frozen_a) == set(frozen_b) == {first, second}
    assert len(set(frozen_a.values()) | set(frozen_b.values())) == 4  # one file per disk each
    vm.apply(a, "discard-current")
    vm.verify()
    assert vm.now[second][0] == 0 and vm.now[second][2 * MIB] == 0x02
    vm.write(1, MIB, CLUSTER, 0x05)  # only disk 2 changes on this branch
    c = vm.checkpoint("C")
    assert vm.checkpoints[c][first] == vm.checkpoints[a][first]
    vm.apply(b, "checkpoint-first")
    vm.verify()
    vm.apply(c, "discard-current")
    vm.verify()
    assert vm.now[second][MIB] == 0x05 and vm.now[first][CLUSTER] == 0


def _pinned_qcow2_chain(folder: Path) -> tuple[str, list[Path], bytes]:
    base, top = folder / "user-base.qcow2", folder / "user-top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "2M"], check=True)
    qemu_io_write(base, "qcow2", 0, 3 * CLUSTER, 0xB0)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base),
                    str(top)], check=True)
    qemu_io_write(top, "qcow2", CLUSTER, CLUSTER, 0x70)
    return str(top), [base, top], flat_bytes(top, "qcow2")


def _pinned_raw(folder: Path) -> tuple[str, list[Path], bytes]:
    raw = folder / "user-disk.img"
    data = bytearray(MIB)
    data[0:CLUSTER] = b"\xa5" * CLUSTER
    data[5 * CLUSTER:6 * CLUSTER] = b"\x5a" * CLUSTER
    raw.write_bytes(bytes(data))
    return str(raw), [raw], bytes(data)


def _pinned_case(tmp_path: Path, kind: str) -> tuple[str, list[Path], bytes]:
    folder = tmp_path / "user"
    folder.mkdir()
    return _pinned_qcow2_chain(folder) if kind == "qcow2" else _pinned_raw(folder)


def _assert_identical(files: list[Path], before: dict[Path, str]) -> None:
    for path in files:
        assert file_sha256(path) == before[path], f"pinned file {path} was modified"


def _pinned_sequence(wm: Waymark, tmp_path: Path, kind: str) -> None:
    spec, files, content = _pinned_case(tmp_path, kind)
    before = {p: file_sha256(p) for p in files}
    vm = Vm(wm, f"pinned-{kind}", [spec, "1M"], initial=[content, bytes(MIB)])
    vm.verify()
    shown = wm.json("vm", "show", vm.name)
    assert shown["disks"][0]["base_image"] == spec and shown["disks"][0]["base_pinned"]
    vm.write(0, 0, CLUSTER, 0x01)  # over the user's data: goes into Waymark's overlay
    vm.write(1, 0, CLUSTER, 0x02)
    _assert_identical(files, before)
    a = vm.checkpoint("A")
    vm.write(0, 5 * CLUSTER, 2 * CLUSTER, 0x03)
    vm.apply(a, "checkpoint-first")
    _assert_identical(files, before)
    vm.write(0, CLUSTER, CLUSTER, 0x04)
    vm.checkpoint("B")
    wm("checkpoint", "rename", vm.name, a, "first")
    vm.apply(a, "discard-current")
    vm.verify()
    assert vm.now[vm.disk_ids[0]][CLUSTER:2 * CLUSTER] == content[CLUSTER:2 * CLUSTER]
    _assert_identical(files, before)
    wm("vm", "delete", vm.name, "--yes")
    _assert_identical(files, before)
    assert not (wm.home / "vms" / vm.id).exists()
    assert query(wm.home, "SELECT count(*) FROM images WHERE vm_id = ?", vm.id) == [(0,)]
    assert flat_bytes(files[-1], "qcow2" if kind == "qcow2" else "raw") == content


def test_pinned_qcow2_with_backing_file_is_never_written(wm: Waymark, tmp_path: Path) -> None:
    _pinned_sequence(wm, tmp_path, "qcow2")


def test_pinned_raw_file_is_never_written(wm: Waymark, tmp_path: Path) -> None:
    _pinned_sequence(wm, tmp_path, "raw")


def test_one_file_pinned_by_two_vms_survives_deleting_both(wm: Waymark, tmp_path: Path) -> None:
    spec, files, content = _pinned_case(tmp_path, "raw")
    before = {p: file_sha256(p) for p in files}
    one = Vm(wm, "one", [spec], initial=[content])
    two = Vm(wm, "two", [spec], initial=[content])
    one.write(0, 0, CLUSTER, 0x10)
    two.write(0, CLUSTER, CLUSTER, 0x20)
    a = one.checkpoint("A")
    one.apply(a, "discard-current")
    two.checkpoint("B")
    one.verify()
    two.verify()
    wm("vm", "delete", "one", "--yes")
    two.verify()
    _assert_identical(files, before)
    wm("vm", "delete", "two", "--yes")
    _assert_identical(files, before)


def test_checkpoint_create_and_apply_leave_no_orphan_images(wm: Waymark) -> None:
    vm = Vm(wm, "tidy", ["1M", "1M"])
    disks = wm.home / "vms" / vm.id / "disks"
    assert_no_orphans(wm.home, vm.id)
    assert len(list(disks.glob("*.qcow2"))) == 2
    ids = []
    for round_ in range(3):
        vm.write(0, round_ * CLUSTER, CLUSTER, 0x30 + round_)
        ids.append(vm.checkpoint(f"c{round_}"))
        assert_no_orphans(wm.home, vm.id)
        # one frozen file per disk per checkpoint, plus the two active overlays
        assert len(list(disks.glob("*.qcow2"))) == 2 * (round_ + 1) + 2
    assert len(list((wm.home / "vms" / vm.id / "checkpoints").glob("*.json"))) == 3
    vm.write(1, 0, CLUSTER, 0x40)
    replaced = set(vm.active().values())
    vm.apply(ids[0], "discard-current")
    # the active images the apply replaced held no checkpoint: they are gone
    for path in replaced:
        assert not Path(path).exists(), f"{path} outlived the apply that replaced it"
    assert_no_orphans(wm.home, vm.id)
    assert len(list(disks.glob("*.qcow2"))) == 2 * 3 + 2
    replaced = set(vm.active().values())
    vm.apply(ids[2], "discard-current")
    vm.apply(ids[1], "checkpoint-first")  # the safety checkpoint keeps the active images
    for path in replaced:
        assert not Path(path).exists()
    assert_no_orphans(wm.home, vm.id)
    assert len(list(disks.glob("*.qcow2"))) == 2 * 4 + 2
    vm.verify()
    rows = query(wm.home, "SELECT count(*) FROM images WHERE vm_id = ?", vm.id)
    assert rows == [(2 * 4 + 2,)]
    assert query(wm.home, "SELECT count(*) FROM intents WHERE status = 'pending'") == [(0,)]


def test_apply_detaches_and_reattaches_a_later_disk_keeping_its_data(wm: Waymark) -> None:
    """A disk added after checkpoint A is detached by applying A (its data kept); applying B
    (which has it) re-attaches it with B's content, and keeps the data it had as a detached
    disk."""
    vm = Vm(wm, "grow", ["1M"])
    vm.write(0, 0, CLUSTER, 0x01)
    a = vm.checkpoint("A")
    added = wm.json("vm", "disk", "add", vm.name, "2M")
    late = added["id"]
    qemu_io_write(Path(added["active_image"]), "qcow2", 0, CLUSTER, 0x02)
    in_b = content_sha256(added["active_image"])
    b = wm.json("checkpoint", "create", vm.name, "--name", "B")
    assert {d["disk_id"] for d in b["disks"]} == {vm.disk_ids[0], late}
    late_active = wm.json("vm", "show", vm.name)["disks"][1]["active_image"]
    qemu_io_write(Path(late_active), "qcow2", MIB, CLUSTER, 0x03)  # after B: only Now has it
    unsaved = content_sha256(late_active)
    assert unsaved != in_b

    result = wm.json("checkpoint", "apply", vm.name, a, "--discard-current")
    assert result["detached_disk_ids"] == [late]
    shown = wm.json("vm", "show", vm.name)
    assert [d["id"] for d in shown["disks"]] == [vm.disk_ids[0]]
    assert [d["id"] for d in shown["detached_disks"]] == [late]
    assert shown["detached_disks"][0]["active_image"] == late_active
    assert content_sha256(late_active) == unsaved
    assert content_sha256(shown["disks"][0]["active_image"]) == vm.checkpoints[a][vm.disk_ids[0]]
    assert_no_orphans(wm.home, vm.id)

    result = wm.json("checkpoint", "apply", vm.name, b["id"], "--discard-current")
    assert result["detached_disk_ids"] == [] and len(result["kept_disk_ids"]) == 1
    shown = wm.json("vm", "show", vm.name)
    assert [d["id"] for d in shown["disks"]] == [vm.disk_ids[0], late]
    assert content_sha256(shown["disks"][1]["active_image"]) == in_b
    kept = {d["id"]: d for d in shown["detached_disks"]}
    assert set(kept) == set(result["kept_disk_ids"])
    assert content_sha256(kept[result["kept_disk_ids"][0]]["active_image"]) == unsaved
    for frozen in b["disks"]:
        expected = in_b if frozen["disk_id"] == late else vm.checkpoints[a][vm.disk_ids[0]]
        assert content_sha256(frozen["frozen_image"]) == expected
    assert_no_orphans(wm.home, vm.id)

"""Library shares: ``library init``, ``vm store``, ``vm deploy`` and ``library list``, through the
real CLI on real qcow2 files (:mod:`waymark.usecases.library.store_deploy`,
:mod:`waymark.external.library_share`).

The VM is a linked clone of a template (its base, pinned, holds data) plus, but in the kill
sweeps, a disk of its own, with a branched checkpoint tree made offline: ``a`` <- ``b``, and
``a`` <- ``c`` <- Now (``c`` taken after applying ``a``; the faster tests leave ``c`` out:
``a`` <- Now), each checkpoint and Now with different data on every disk. What each disk holds
is hashed as it is written (``content_sha256``), so every later check compares with the content
the user made, not with what Waymark reports; a library copy's content is read through its
manifest's image graph.

What is checked:

- a store moves everything into the library (hard links on the same file system, the pinned
  template base flattened into a file of its own): the VM is gone from ``vm list`` and from the
  home's ``vms/`` folder, ``vm start`` and ``checkpoint create`` fail with exit 3 naming the
  library and ``vm deploy``, ``library list`` shows it stored with its tree and current
  checkpoint, ``check`` is clean and the template may now be deleted; a deploy brings it back
  with the same id, name and tree, Now and every checkpoint (applied) hold exactly what they
  held, ``check`` is clean and the library is empty again;
- the same across file systems (the library on a tmpfs: real copies), and ``check`` clean;
- a store and a deploy SIGKILLed at each of their journal points (the starting state restored
  each time): once the next command has run recovery, the VM is in exactly one place (here,
  in ``vm list`` with its tree, content and files, no other, and no library folder; or stored
  in ``library list`` with its tree, content and files, no other, and nothing left here), and
  which place depends only on whether the kill came after the operation's commit;
- refusals (exit code, message) change nothing in the home or the library: a folder that is
  not a library, a name the library or this host already holds, a name the library does not
  hold, a damaged library copy (a flipped byte: ImageError; the copy stays listed and deploys
  once the byte is back), ``library init`` on a folder that is not empty or already a library.

The kill sweeps make a run that ``WAYMARK_FAILPOINT=N`` SIGKILLs at its N-th journal point, for
N = 0, 1, ... until a run ends unkilled; ``WAYMARK_FAILPOINT_LOG`` says which point each was.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Waymark, content_sha256, qemu_io_write, query, tmpfs
from tests.integration.test_backups import assert_clean, flip_middle_byte, tree_files
from tests.integration.test_profiles_templates import (
    assert_error,
    catalog_rows,
    home_entries,
    image,
)

KIB, MIB = 1 << 10, 1 << 20
EXIT_NOT_FOUND, EXIT_CONFLICT, EXIT_IMAGE = 3, 5, 8
VM = "shelved"
MAX_POINTS = 100  # a sweep that goes on longer is broken
NOW = "(Now)"  # the key of Now's content next to the checkpoints' names
Content = dict[str, dict[str, str]]  # checkpoint name (or NOW) -> disk id -> content sha256
# what a checkpoint is, as ``checkpoint list`` shows it, that a store and deploy must keep
KEPT = ("id", "name", "parent_id", "created_at", "kind", "has_memory", "requested_type",
        "fallback_reason", "skipped_disks")


@dataclass
class Built:
    """The VM as it was made: its id, checkpoint ids, tree (by name) and disk contents."""

    vm_id: str
    ids: dict[str, str] = field(default_factory=dict)
    parents: dict[str, str | None] = field(default_factory=dict)
    current: str = ""
    content: Content = field(default_factory=dict)


# --- the VM -----------------------------------------------------------------------------------

def active_images(home: Path, vm_id: str) -> dict[str, str]:
    """Disk id -> path of its active image, read from the catalog."""
    rows = query(home, "SELECT d.id, i.path FROM disks d JOIN images i "
                       "ON i.id = d.active_image_id WHERE d.vm_id = ?", vm_id)
    return {disk: path for disk, path in rows}


def now_content(home: Path, vm_id: str) -> dict[str, str]:
    return {disk: content_sha256(path) for disk, path in active_images(home, vm_id).items()}


def build(wm: Waymark, tmp_path: Path, disk: str | None, c: bool = True) -> Built:
    """VM from template ``golden`` (4 MiB, with data), plus a new disk of size ``disk`` if one
    is given, and the tree a <- b, a <- c <- Now (without ``c``: a <- Now), each with its own
    writes on every disk."""
    golden = image(tmp_path / "golden.qcow2", "4M", (0, 64 * KIB, 0x5A), (MIB, 64 * KIB, 0x5B))
    wm("template", "create", "golden", "--disk", str(golden))
    made = wm.json("vm", "create", VM, "--template", "golden", *(["--disk", disk] if disk else []))
    assert [d["base_pinned"] for d in made["disks"]] == [True, False][:len(made["disks"])]
    vm = Built(made["id"])

    def write(offset: int, pattern: int) -> None:
        for path in active_images(wm.home, vm.vm_id).values():
            qemu_io_write(Path(path), "qcow2", offset, 64 * KIB, pattern)

    def checkpoint(name: str) -> None:
        vm.content[name] = now_content(wm.home, vm.vm_id)
        made = wm.json("checkpoint", "create", VM, "--name", name)
        vm.ids[name], vm.parents[name], vm.current = made["id"], vm.current or None, name

    write(32 * KIB, 0x01)  # over the template's data at 0
    checkpoint("a")
    write(256 * KIB, 0x02)
    checkpoint("b")
    wm("checkpoint", "apply", VM, "a", "--discard-current")
    vm.current = "a"
    write(512 * KIB, 0x03)
    if c:
        checkpoint("c")
        write(48 * KIB, 0x04)
    vm.content[NOW] = now_content(wm.home, vm.vm_id)
    assert vm.parents == ({"a": None, "b": "a", "c": "a"} if c else {"a": None, "b": "a"})
    for disk_id in vm.content[NOW]:  # every state differs from every other, on each disk
        assert len({held[disk_id] for held in vm.content.values()}) == len(vm.content)
    return vm


def tree(wm: Waymark) -> dict[str, Any]:
    """The checkpoint tree as ``checkpoint list`` shows it (the kept fields, by id)."""
    listed = wm.json("checkpoint", "list", VM)
    return {"current_checkpoint_id": listed["current_checkpoint_id"],
            "checkpoints": {c["id"]: {k: c[k] for k in KEPT} for c in listed["checkpoints"]}}


def catalog_content(home: Path, vm: Built) -> Content:
    """What each checkpoint's frozen images and Now's active images hold."""
    rows = query(home, "SELECT c.name, f.disk_id, i.path FROM frozen_images f "
                       "JOIN checkpoints c ON c.id = f.checkpoint_id "
                       "JOIN images i ON i.id = f.image_id WHERE c.vm_id = ?", vm.vm_id)
    found: Content = {NOW: now_content(home, vm.vm_id)}
    for name, disk, path in rows:
        found.setdefault(name, {})[disk] = content_sha256(path)
    return found


# --- the library ------------------------------------------------------------------------------

def init_library(wm: Waymark, path: Path) -> Path:
    made = wm.json("library", "init", str(path))
    assert made["library"] == str(path)
    assert sorted(p.name for p in path.iterdir()) == ["vms", "waymark-library.json"]
    return path


def chain(folder: Path, images: dict[str, Any], image_id: str) -> dict[str, Any]:
    """A qemu ``json:`` spec of a library image and its parents, by the manifest's graph (the
    files keep the backing links they had on the host, which may be gone)."""
    parent = images[image_id]["parent_id"]
    return {"driver": "qcow2",
            "file": {"driver": "file", "filename": str(folder / images[image_id]["file"])},
            "backing": None if parent is None else chain(folder, images, parent)}


def library_content(library: Path, vm: Built) -> Content:
    """What each checkpoint and Now hold in the library copy, read through its manifest."""
    folder = library / "vms" / vm.vm_id
    manifest = json.loads((folder / "manifest.json").read_text())
    images = {i["id"]: i for i in manifest["images"]}
    names = {c["id"]: c["name"] for c in manifest["checkpoints"]}

    def held(image_id: str) -> str:
        return content_sha256("json:" + json.dumps(chain(folder, images, image_id)))

    found: Content = {NOW: {d["id"]: held(d["active_image_id"]) for d in manifest["disks"]}}
    for f in manifest["frozen"]:
        found.setdefault(names[f["checkpoint_id"]], {})[f["disk_id"]] = held(f["image_id"])
    return found


def listed_entries(wm: Waymark, library: Path) -> list[dict[str, Any]]:
    held = wm.json("library", "list", "--library", str(library))
    assert held["library"] == str(library)
    entries: list[dict[str, Any]] = held["vms"]
    return entries


# --- where the VM is --------------------------------------------------------------------------

def assert_tree(rows: list[tuple[Any, ...]], current: str | None, vm: Built, label: str) -> None:
    """(id, name, parent id) of every checkpoint, and the current one's id: the tree made."""
    names = {ckpt: name for ckpt, name, _ in rows}
    assert {name: names.get(parent) for _, name, parent in rows} == vm.parents, label
    assert {name: ckpt for ckpt, name, _ in rows} == vm.ids, label
    assert current == vm.ids[vm.current], label


def assert_here(wm: Waymark, library: Path, vm: Built, label: str) -> None:
    """The VM is on this host with its whole tree and content, its files and no other, and the
    library has no folder for it."""
    assert_tree(query(wm.home, "SELECT id, name, parent_id FROM checkpoints WHERE vm_id = ?",
                      vm.vm_id),
                query(wm.home, "SELECT current_checkpoint_id FROM vms WHERE id = ?",
                      vm.vm_id)[0][0], vm, label)
    assert catalog_content(wm.home, vm) == vm.content, f"{label}: content changed"
    assert query(wm.home, "SELECT kind FROM intents WHERE status = 'pending'") == [], label
    assert query(wm.home, "SELECT * FROM stored_vms") == [], label
    here = wm.home / "vms" / vm.vm_id
    owned = {p for (p,) in query(wm.home, "SELECT path FROM images WHERE vm_id = ? AND pinned = 0",
                                 vm.vm_id)}
    assert {str(p) for p in (here / "disks").iterdir()} == owned, f"{label}: stray or missing"
    assert {p.name for p in (here / "checkpoints").iterdir()} == \
        {f"{ckpt}.json" for ckpt in vm.ids.values()}, label
    assert not (library / "vms" / vm.vm_id).exists(), f"{label}: a library folder is left"


def assert_stored(wm: Waymark, library: Path, vm: Built, label: str) -> dict[str, Any]:
    """The VM is stored in the library with its whole tree and content, and its files and no
    other; nothing of it is left here but the note of where it went. Its ``library list``
    entry."""
    entries = listed_entries(wm, library)
    assert len(entries) == 1, f"{label}: the library holds {entries}"
    (entry,) = entries
    assert (entry["id"], entry["name"], entry["status"], entry["claim"], entry["clash"]) == \
        (vm.vm_id, VM, "stored", None, None), f"{label}: {entry}"
    assert_tree([(c["id"], c["name"], c["parent_id"]) for c in entry["checkpoints"]],
                entry["current_checkpoint_id"], vm, label)
    assert library_content(library, vm) == vm.content, f"{label}: content changed"
    folder = library / "vms" / vm.vm_id
    manifest = json.loads((folder / "manifest.json").read_text())
    assert {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} == \
        {*manifest["files"], "manifest.json"}, f"{label}: stray or missing library files"
    assert query(wm.home, "SELECT count(*) FROM vms WHERE id = ?", vm.vm_id) == [(0,)], label
    assert query(wm.home, "SELECT vm_id, name, library FROM stored_vms") == \
        [(vm.vm_id, VM, str(library))], label
    assert query(wm.home, "SELECT kind FROM intents WHERE status = 'pending'") == [], label
    assert not (wm.home / "vms" / vm.vm_id).exists(), f"{label}: files are left here"
    return entry


# --- 1. store and deploy ----------------------------------------------------------------------

def test_store_then_deploy_keeps_the_tree_and_every_checkpoints_content(
        wm: Waymark, tmp_path: Path) -> None:
    vm = build(wm, tmp_path, "32M")
    before = tree(wm)
    disks_here = wm.home / "vms" / vm.vm_id / "disks"
    inodes = {p.name: p.stat().st_ino for p in disks_here.iterdir()}
    library = init_library(wm, tmp_path / "share" / "lib")  # its parent did not exist

    stored = wm.json("vm", "store", VM, "--library", str(library))
    assert {k: stored[k] for k in ("vm_name", "vm_id", "library", "checkpoint_count")} == \
        {"vm_name": VM, "vm_id": vm.vm_id, "library": str(library), "checkpoint_count": 3}
    assert wm.json("vm", "list") == []
    assert not (wm.home / "vms" / vm.vm_id).exists()
    for args in (("vm", "start", VM), ("checkpoint", "create", VM, "--name", "d")):
        assert_error(wm.run(*args), EXIT_NOT_FOUND, "stored in the library", str(library),
                     f"waymark vm deploy {VM} --library {library}")
    entry = assert_stored(wm, library, vm, "stored")
    assert_clean(wm)
    assert (entry["state"], entry["checkpoint_type"]) == ("off", "production"), entry
    assert entry["source"]["home"] == str(wm.home), entry
    # the VM's own images moved as hard links (the same inodes); the template's image, which it
    # only pinned, was flattened into one more file
    there = {p.name: p for p in (library / "vms" / vm.vm_id / "files" / "disks").iterdir()}
    assert {name: there[name].stat().st_ino for name in inodes} == inodes
    (flat,) = set(there) - set(inodes)
    assert content_sha256(there[flat]) == content_sha256(tmp_path / "golden.qcow2")
    assert stored["files"] == len(there)

    # nothing links to the template any more
    assert wm.json("template", "delete", "golden") == \
        {"deleted": [{"kind": "template", "id": None, "name": "golden"}]}

    deployed = wm.json("vm", "deploy", VM, "--library", str(library))
    assert deployed == {"vm_name": VM, "vm_id": vm.vm_id, "library": str(library),
                        "state": "off", "checkpoint_count": 3}
    shown = wm.json("vm", "show", VM)
    assert (shown["id"], shown["name"], shown["state"]) == (vm.vm_id, VM, "off")
    assert not any(d["base_pinned"] for d in shown["disks"]), shown["disks"]
    assert tree(wm) == before
    checked = wm.run("check")
    assert checked.returncode == 0 and "All clean" in checked.stdout, checked
    assert now_content(wm.home, vm.vm_id) == vm.content[NOW]
    assert not (library / "vms" / vm.vm_id).exists()
    assert listed_entries(wm, library) == []
    assert sorted(p.name for p in library.iterdir()) == ["lock", "vms", "waymark-library.json"]
    for name in ("b", "c", "a"):
        wm("checkpoint", "apply", VM, name, "--discard-current")
        assert now_content(wm.home, vm.vm_id) == vm.content[name], f"checkpoint {name}"


# --- 2. a library on another file system ------------------------------------------------------

# Folders that are often on another file system than the temporary folder, for a test not run
# as root: memory (tmpfs), then the disk's usual places
ELSEWHERE = (Path("/dev/shm"), Path("/var/tmp"), Path(f"/run/user/{os.getuid()}"), Path.home(),
             Path.cwd())


def elsewhere(near: Path, candidates: tuple[Path, ...] = ELSEWHERE) -> Path | None:
    """The first writable candidate folder on another file system than ``near``."""
    for folder in candidates:
        try:
            if folder.stat().st_dev != near.stat().st_dev and os.access(folder, os.W_OK):
                return folder
        except OSError:
            continue
    return None


@pytest.fixture
def share(tmp_path: Path) -> Iterator[Path]:
    """A folder on another file system than the home: what the test proves is the copy a
    rename across file systems cannot do (the same file system moves files by renaming them,
    which the other library tests cover). A 64 MiB tmpfs when this runs as root; otherwise a
    temporary folder in the first of :data:`ELSEWHERE` on another file system. Neither: the
    test fails saying so (it never skips silently)."""
    with ExitStack() as stack:
        try:
            yield stack.enter_context(tmpfs(tmp_path / "share", "64m"))
            return
        except (subprocess.CalledProcessError, OSError):  # not root, or no mount(8)
            other = elsewhere(tmp_path)
        if other is None:
            pytest.fail(f"no folder on another file system than {tmp_path}: run this test as "
                        f"root (it mounts a tmpfs) or with one of {[str(p) for p in ELSEWHERE]} "
                        "on another file system", pytrace=False)
        yield Path(stack.enter_context(tempfile.TemporaryDirectory(dir=other)))


def test_store_and_deploy_across_file_systems_copy_every_byte(
        wm: Waymark, tmp_path: Path, share: Path) -> None:
    vm = build(wm, tmp_path, "4M", c=False)
    library = init_library(wm, share / "lib")
    wm("vm", "store", VM, "--library", str(library))
    assert_stored(wm, library, vm, "stored on another file system")
    files = [p for p in (library / "vms" / vm.vm_id).rglob("*") if p.is_file()]
    assert files and all(p.stat().st_dev != wm.home.stat().st_dev for p in files)

    wm("vm", "deploy", VM, "--library", str(library))
    assert_here(wm, library, vm, "deployed from another file system")
    assert_clean(wm)
    assert listed_entries(wm, library) == []


# --- 3. and 4. SIGKILL at every journal point -------------------------------------------------

def saved(tmp_path: Path, *folders: Path) -> Callable[[], None]:
    """Copies of ``folders`` now; the function that puts them back (same paths: the catalog and
    the claims hold absolute paths)."""
    copies = [(folder, tmp_path / "saved" / str(number)) for number, folder in enumerate(folders)]
    for folder, copy in copies:
        shutil.copytree(folder, copy, symlinks=True)

    def restore() -> None:
        for folder, copy in copies:
            shutil.rmtree(folder)
            shutil.copytree(copy, folder, symlinks=True)

    return restore


def assert_settled(wm: Waymark, library: Path, vm: Built, here: bool, label: str) -> None:
    """After a killed command, the next one (which runs recovery first) finds the VM in one
    place: here (``vm list`` lists it) or in the library (``library list`` shows it stored)."""
    if here:
        assert [v["id"] for v in wm.json("vm", "list")] == [vm.vm_id], f"{label}: not here"
        assert_here(wm, library, vm, label)
    else:
        assert_stored(wm, library, vm, label)


def kill_at_every_point(wm: Waymark, library: Path, vm: Built, args: tuple[str, ...],
                        restore: Callable[[], None], here_once_committed: bool) -> int:
    """Kill ``waymark ARGS`` at each journal point in turn (N = 0, 1, ... until a run ends
    unkilled), from the state ``restore`` brings back: once recovery has run, the VM must be
    where the operation's commit puts it if the kill came after that commit, and where it was
    before otherwise. The number of points a whole run passes."""
    log = wm.home.parent / "points.log"
    for n in range(MAX_POINTS):
        restore()
        log.unlink(missing_ok=True)
        run = wm.run(*args, env=wm.env(WAYMARK_FAILPOINT=str(n),
                                       WAYMARK_FAILPOINT_LOG=str(log)))
        passed = [line.split(" ", 1)[1] for line in log.read_text().splitlines()]
        if run.returncode == 0:
            assert len(passed) == n, f"not killed at point {n}, yet it passed {len(passed)}"
            break
        label = f"{' '.join(args[:2])} killed at journal point {n} ({passed[-1]})"
        assert run.returncode == -signal.SIGKILL, f"{label}: {run}"
        assert len(passed) == n + 1, label
        committed = "commit" in passed[:-1]  # the operation's own commit is its first
        assert_settled(wm, library, vm, committed == here_once_committed, label)
    else:
        raise AssertionError(f"{args[:2]} was still killed at journal point {MAX_POINTS}")
    assert_settled(wm, library, vm, here_once_committed, "not killed")
    assert_clean(wm)
    return n


@pytest.mark.slow
def test_store_killed_at_every_journal_point_leaves_the_vm_in_one_place(
        wm: Waymark, tmp_path: Path) -> None:
    vm = build(wm, tmp_path, None, c=False)
    library = init_library(wm, tmp_path / "lib")
    restore = saved(tmp_path, wm.home, library)
    points = kill_at_every_point(wm, library, vm, ("vm", "store", VM, "--library", str(library)),
                                 restore, here_once_committed=False)
    assert points > 10  # every file copied, the manifest, the commit, every local file deleted


@pytest.mark.slow
def test_deploy_killed_at_every_journal_point_leaves_the_vm_in_one_place(
        wm: Waymark, tmp_path: Path) -> None:
    vm = build(wm, tmp_path, None, c=False)
    library = init_library(wm, tmp_path / "lib")
    wm("vm", "store", VM, "--library", str(library))
    restore = saved(tmp_path, wm.home, library)
    points = kill_at_every_point(wm, library, vm, ("vm", "deploy", VM, "--library", str(library)),
                                 restore, here_once_committed=True)
    assert points > 10  # every file copied, the commit, every library file deleted


# --- 5. refusals ------------------------------------------------------------------------------

def test_refusals_change_nothing(wm: Waymark, tmp_path: Path) -> None:
    library = init_library(wm, tmp_path / "lib")
    stored_id = wm.json("vm", "create", "twin", "--disk", "1M")["id"]
    (active,) = active_images(wm.home, stored_id).values()
    qemu_io_write(Path(active), "qcow2", 0, 4 * KIB, 0x71)
    wm("checkpoint", "create", "twin", "--name", "one")
    wm("vm", "store", "twin", "--library", str(library))
    wm("vm", "create", "twin", "--disk", "1M")  # another VM, the same name
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "keep.txt").write_text("mine")

    def state() -> dict[str, Any]:
        return {"rows": catalog_rows(wm.home), "home": home_entries(wm.home),
                "stored": query(wm.home, "SELECT * FROM stored_vms"),
                "library": tree_files(library), "plain": tree_files(plain)}

    def refused(code: int, *args: str, says: tuple[str, ...]) -> None:
        before = state()
        assert_error(wm.run(*args), code, *says)
        assert state() == before, args

    refused(EXIT_NOT_FOUND, "vm", "store", "twin", "--library", str(plain),
            says=(f"{plain} is not a Waymark library", f"waymark library init {plain}"))
    refused(EXIT_CONFLICT, "vm", "store", "twin", "--library", str(library),
            says=("already holds a VM named 'twin'", "vm rename twin"))
    refused(EXIT_CONFLICT, "vm", "deploy", "twin", "--library", str(library),
            says=("another VM here is named 'twin'", "vm rename twin"))
    refused(EXIT_NOT_FOUND, "vm", "deploy", "ghost", "--library", str(library),
            says=("holds no VM named 'ghost'", "waymark library list"))
    refused(EXIT_CONFLICT, "library", "init", str(plain), says=("not an empty folder",))
    refused(EXIT_CONFLICT, "library", "init", str(library), says=("already a Waymark library",))

    wm("vm", "rename", "twin", "other")  # the name is free here now: only the damage stops it
    damaged = sorted((library / "vms" / stored_id / "files" / "disks").glob("*.qcow2"))[0]
    flip_middle_byte(damaged)
    refused(EXIT_IMAGE, "vm", "deploy", "twin", "--library", str(library),
            says=(damaged.name, "checksum", "Nothing was deployed"))
    assert not (wm.home / "vms" / stored_id).exists()
    (entry,) = listed_entries(wm, library)
    assert (entry["name"], entry["status"], len(entry["checkpoints"])) == ("twin", "stored", 1)

    flip_middle_byte(damaged)  # the byte back: the copy was kept whole, it deploys
    wm("vm", "deploy", "twin", "--library", str(library))
    assert sorted(v["name"] for v in wm.json("vm", "list")) == ["other", "twin"]
    assert not (library / "vms" / stored_id).exists()
    assert_clean(wm)

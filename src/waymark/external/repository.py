"""A backup repository: a folder on external storage (NFS, a USB disk) that outlives the host.

Layout (every path relative, so the folder can be moved or mounted elsewhere)::

    waymark-repository.json              what this folder is (format, version, id)
    lock                                 held by a run, so two runs never interleave
    vms/<vm-id>/disks/<disk-id>/<point-id>.qcow2
    vms/<vm-id>/files/<sha256>           a file the VM needs beyond its disks (its kernel,
                                         initrd: :mod:`waymark.external.vm_files`), one copy
                                         per content, named by points' ``vm_files``
    vms/<vm-id>/points/<point-id>.json   the point's manifest

A point's disk file is plain qcow2: a full backup has no backing file; an incremental's backing
file is the previous point's file of the same disk, named relatively (``<point-id>.qcow2`` in the
same folder). So a disk restores with stock qemu-img and no Waymark::

    qemu-img convert -O qcow2 vms/<vm-id>/disks/<disk-id>/<point-id>.qcow2 restored.qcow2

A point exists once its manifest does: its files are written under temporary names, fsynced,
checksummed and renamed first (:class:`Sealing`), and the manifest (sha256 of every file, the
VM's configuration, consistency, why a full backup was taken) is written last, durably. Files
no manifest names are what a killed run left; the next run removes them under the lock.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from waymark import durable
from waymark.errors import Ambiguous, InvalidInput, NotFound, StorageError, WaymarkError
from waymark.external import shares, vm_files
from waymark.failpoints import failpoint
from waymark.images import qemu_img
from waymark.model import timing
from waymark.qemu import tpm

FORMAT, VERSION = "waymark-backup-repository", 1
MARKER = "waymark-repository.json"
POINT_FORMAT = "waymark-backup-point"
LOCK_POLL = 0.1
SEAL_THREADS = 4  # a file's fsync and its sha256 at once, a second file's meanwhile


def new_point_id() -> str:
    """Sorts by time, to the millisecond: ``20261130T021500123Z-1a2b3c4d``."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")[:-3]
    return f"{stamp}Z-{uuid.uuid4().hex[:8]}"


def tpm_state(manifest: dict[str, Any], where: str) -> bytes | None:
    """The TPM state a point holds (base64 in its manifest), or None; refused unless it can be
    one (swtpm checks the rest when it loads it)."""
    text = manifest.get("tpm_state")
    if text is None:
        return None
    state = tpm.decoded(text)
    if state is None:
        raise shares.refused(where, "its TPM state is not one")
    return state


@dataclass(frozen=True)
class Repository(shares.Share):
    """A backup repository; :attr:`id` names the VMs' change-tracking bitmaps for it."""

    MARKING = shares.Marking(
        MARKER, FORMAT, VERSION, "Waymark backup repository",
        create_hint="Create one with: waymark backup repo init {path}",
        use_hint="Use it: waymark backup run VM --repo {path}",
        busy="another backup run holds the repository {path}.")

    # --- paths --------------------------------------------------------------------------------

    def disk_file(self, vm_id: str, disk_id: str, point_id: str) -> Path:
        return self.root / "vms" / vm_id / "disks" / disk_id / f"{point_id}.qcow2"

    def manifest_file(self, vm_id: str, point_id: str) -> Path:
        return self.root / "vms" / vm_id / "points" / f"{point_id}.json"

    def merge_file(self, vm_id: str) -> Path:
        return self.root / "vms" / vm_id / "merging.json"

    def files_folder(self, vm_id: str) -> Path:
        return self.root / "vms" / vm_id / "files"

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.root))

    def writable(self, folder: Path) -> Path:
        """``folder``, made where missing and checked to be no symbolic link, nor any folder on
        the way down from the root (:func:`shares.plain_folder`): call before writing in it."""
        return shares.plain_folder(self.root, folder, where=self.relative(folder))
    def new_file(self, path: Path) -> None:
        """An empty new file at ``path`` (a name no one used: a new point's), for a writer to
        fill. Refused (:func:`~waymark.external.shares.refused`) unless it really is inside the
        repository: neither it nor a folder on its way may lead elsewhere (a symbolic link
        planted by whoever else writes the storage); a file made outside is removed at once."""
        where = self.relative(path)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o644)
        except OSError as err:
            raise shares.refused(where, f"cannot create it as a new file ({err.strerror})"
                                 ) from err
        try:
            real = Path(os.readlink(f"/proc/self/fd/{fd}"))
        finally:
            os.close(fd)
        if self.root.resolve() not in real.parents:
            durable.remove(real)
            raise shares.refused(where, f"it leads outside {self.root}, to {real}")

    # --- points -------------------------------------------------------------------------------

    def _manifests(self, vm_id: str | None) -> Iterator[Path]:
        folders = [self.root / "vms" / vm_id] if vm_id else sorted((self.root / "vms").iterdir())
        for folder in folders:
            yield from sorted((folder / "points").glob("*.json"))

    def points(self, vm_id: str | None = None) -> list[dict[str, Any]]:
        """Every readable point's manifest (of one VM), oldest first (an unreadable one is
        left out here and reported by :meth:`unreadable`; one naming a file outside the
        repository is refused, :meth:`checked`)."""
        found = []
        for path in self._manifests(vm_id):
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            found.append(self.checked(data, path.parent.parent.name, path.stem,
                                      self.relative(path)))
        return sorted(found, key=lambda m: (m["created_at"], m["id"]))

    def checked(self, manifest: Any, vm_id: str, point_id: str, where: str) -> dict[str, Any]:
        """A manifest as read from the storage, refused (ImageError naming ``where``) unless
        it is the point it is filed as (``vms/<vm_id>/points/<point_id>.json``) and every disk
        file it names is a plain name inside the repository."""
        try:
            ok = (manifest["id"] == point_id and manifest["vm"]["id"] == vm_id
                  and _is_moment(manifest["created_at"])
                  and isinstance(manifest["parent"], str | None)
                  and isinstance(manifest["disks"], list))
        except (KeyError, TypeError):
            ok = False
        if not ok:
            raise shares.refused(where, f"it is not the manifest of point {point_id} of VM "
                                        f"{vm_id}")
        shares.component(vm_id, where=where, what="the VM id")
        shares.component(point_id, where=where, what="the point id")
        for disk in manifest["disks"]:
            if not isinstance(disk, dict):
                raise shares.refused(where, f"a disk entry is {disk!r}")
            shares.component(disk.get("disk_id"), where=where, what="the disk id")
            shares.inside(self.root, disk.get("file"), where=where)
            size = disk.get("virtual_size")  # the catalog, the restore and quotas count on it
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise shares.refused(where, f"a disk's virtual size is {size!r}, not a size "
                                            "in bytes")
        tpm_state(manifest, where)
        self.carried(manifest, where)
        return dict(manifest)

    def carried(self, manifest: dict[str, Any], where: str) -> list[vm_files.Carried]:
        """The files the point carries beyond its disks, each inside its VM's ``files``
        folder (:func:`waymark.external.vm_files.read`)."""
        return vm_files.read(manifest.get("vm_files"), self.files_folder(manifest["vm"]["id"]),
                             base=self.root, where=where)

    def carry(self, vm_id: str, files: dict[str, Path]) -> dict[str, dict[str, Any]]:
        """A point's ``vm_files``: each file stored once per content in the VM's folder."""
        folder = self.writable(self.files_folder(vm_id))
        return vm_files.carry(files, folder, self.root, by_content=True)

    def _drop_uncarried(self, vm_id: str) -> list[Path]:
        """Remove the VM's carried files no point names any more."""
        kept = {c.path for m in self.points(vm_id) for c in self.carried(m, m["id"])}
        gone = vm_files.unknown(self.files_folder(vm_id), kept)
        for path in gone:
            durable.remove(path)
        return gone

    def unreadable(self, vm_id: str | None = None) -> list[str]:
        """Manifests that cannot be read (damaged storage): their points are lost."""
        bad = []
        for path in self._manifests(vm_id):
            try:
                json.loads(path.read_text())
            except (OSError, ValueError) as err:
                bad.append(f"{self.relative(path)}: unreadable ({err})")
        return bad

    def point(self, ref: str, vm_id: str | None = None) -> dict[str, Any]:
        """One point by id or id prefix; with ``vm_id`` and ``ref`` ``latest``, its newest."""
        points = self.points(vm_id)
        if ref == "latest":
            if not points:
                raise NotFound(f"no backup point in {self.root} for that VM.",
                               hint=f"Take one: waymark backup run VM --repo {self.root}")
            return points[-1]
        matches = [p for p in points if p["id"].startswith(ref)]
        if not matches:
            raise NotFound(f"no backup point {ref!r} in {self.root}.",
                           hint=f"List them: waymark backup list --repo {self.root}")
        if len(matches) > 1:
            raise Ambiguous(f"{ref!r} names {len(matches)} points.",
                            hint="Give more of the id: " + ", ".join(p["id"] for p in matches))
        return matches[0]

    def chain(self, manifest: dict[str, Any], *, missing_ok: bool = False
              ) -> list[dict[str, Any]]:
        """The point and every point it needs, newest first; a missing one is a StorageError,
        or with ``missing_ok`` where the chain ends."""
        by_id = {p["id"]: p for p in self.points(manifest["vm"]["id"])}
        chain = [manifest]
        while chain[-1].get("parent"):
            parent = by_id.get(chain[-1]["parent"])
            if parent is None and missing_ok:
                break
            if parent is None:
                raise StorageError(f"point {chain[-1]['id']} needs point "
                                   f"{chain[-1]['parent']}, which is missing.",
                                   hint="Restore an older full point, or the missing files.")
            chain.append(parent)
        return chain

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        path = self.manifest_file(manifest["vm"]["id"], manifest["id"])
        self.writable(path.parent)
        durable.write_bytes(path, json.dumps({"format": POINT_FORMAT, **manifest},
                                             indent=2).encode())

    def sealing(self) -> Sealing:
        """Seal a point's disk files as each is written (:class:`Sealing`)."""
        return Sealing(self)

    def remove_partial(self) -> list[Path]:
        """Finish an interrupted merge, then remove disk files no manifest names (a killed
        run's); call under the lock. A symbolic link anywhere in the repository stops it first:
        these walks delete by pattern, and a planted link would lead them into a host folder."""
        shares.no_links(self.root / "vms", what="backup repository")
        for intent in sorted((self.root / "vms").glob("*/merging.json")):
            self._merge(self._intent(intent))
        named = {p_file["file"] for m in self.points() for p_file in m["disks"]}
        removed = []
        for path in sorted((self.root / "vms").glob("*/disks/*/*")):
            if self.relative(path) not in named:
                durable.remove(path)
                removed.append(path)
        for folder in sorted((self.root / "vms").glob("*/files")):
            removed += self._drop_uncarried(folder.parent.name)
        return removed

    def _intent(self, path: Path) -> dict[str, Any]:
        """An interrupted merge's intent file, checked as strictly as a manifest."""
        where, vm_id = self.relative(path), path.parent.name
        try:
            intent = json.loads(path.read_text())
            gone, child = intent["gone"], intent["child"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise shares.refused(where, f"the merge intent cannot be read ({err})") from err
        point_id = shares.component(gone.get("id") if isinstance(gone, dict) else None,
                                    where=where, what="the merged point id")
        shares.component(child, where=where, what="the child point id")
        return {"gone": self.checked(gone, vm_id, point_id, where), "child": child}

    def remove_point(self, manifest: dict[str, Any]) -> None:
        """The manifest first (the point stops existing), then its files; call under the
        lock, and only for a point no other point needs."""
        durable.remove(self.manifest_file(manifest["vm"]["id"], manifest["id"]))
        for disk in manifest["disks"]:
            durable.remove(self.root / disk["file"])
        self._drop_uncarried(manifest["vm"]["id"])

    def merge_away(self, gone: dict[str, Any], child: dict[str, Any]) -> None:
        """Remove point ``gone``, whose ``child`` (an incremental) needs it: the child's files
        take gone's place in the chain, so the child ends self-sufficient (full when gone was).

        Crash-safe through an intent file (``vms/<vm>/merging.json``, finished by
        :meth:`remove_partial`): gone's manifest goes first (it stops being a point), then
        per disk the child's clusters are committed into gone's file (``qemu-img commit -d``:
        the child's file is untouched, so repeating it is harmless) and that file is renamed
        over the child's, atomically; the child's manifest is rewritten last. Call under the
        lock.
        """
        intent = {"gone": gone, "child": child["id"]}
        durable.write_bytes(self.merge_file(gone["vm"]["id"]), json.dumps(intent).encode())
        self._merge(intent)

    def _merge(self, intent: dict[str, Any]) -> None:
        gone, vm_id = intent["gone"], intent["gone"]["vm"]["id"]
        failpoint("merge-intent")
        durable.remove(self.manifest_file(vm_id, gone["id"]))
        child_file = self.manifest_file(vm_id, intent["child"])
        child = self.checked(json.loads(child_file.read_text()), vm_id, intent["child"],
                             self.relative(child_file))
        below = {d["disk_id"]: self.root / d["file"] for d in gone["disks"]}
        disks = []
        for disk in child["disks"]:
            mine, under = self.root / disk["file"], below.pop(disk["disk_id"], None)
            if under is not None and under.exists():
                qemu_img.commit(mine, under)
                durable.fsync_file(under)
                failpoint("merge-committed")
                os.replace(under, mine)
                durable.fsync_dir(mine.parent)
            disks.append({**disk, "bytes": mine.stat().st_size, "sha256": durable.sha256(mine)})
        merged = {**child, "parent": gone["parent"], "disks": disks,
                  "merged": [*child.get("merged", []), gone["id"]]}
        if gone["parent"] is None:
            merged.update(kind="full", reason=f"{child['reason']}; made full by retention, "
                                              f"which merged point {gone['id']} into it")
        failpoint("merge-renamed")
        self.write_manifest(merged)
        for leftover in below.values():
            durable.remove(leftover)
        self._drop_uncarried(vm_id)
        durable.remove(self.merge_file(vm_id))

    # --- checking -----------------------------------------------------------------------------

    def problems(self, manifest: dict[str, Any]) -> list[str]:
        """What is wrong with a point's own files (its checksums, then qemu-img check)."""
        found = vm_files.problems(self.carried(manifest, manifest["id"]), self.root)
        for disk in manifest["disks"]:
            path = self.root / disk["file"]
            if not path.is_file():
                found.append(f"{disk['file']}: missing")
                continue
            if durable.sha256(path) != disk["sha256"]:
                found.append(f"{disk['file']}: sha256 does not match the manifest (damaged)")
                continue
            try:  # its backing chain stays in the repository before qemu-img follows it
                shares.image_chain(self.root, path, where=disk["file"])
            except WaymarkError as err:
                found.append(err.message)
                continue
            try:
                qemu_img.check(path, "qcow2")
            except WaymarkError as err:
                found.append(f"{disk['file']}: {err.message}")
        return found


@dataclass
class _Sealed:
    tmp: Path
    final: Path
    synced: Future[None]
    digest: Future[str]


@dataclass
class Sealing:
    """A point's disk files made durable under their final names, each started as soon as it
    is written (:meth:`add`), while the copy of the others goes on: its ``fsync`` on one thread
    and its sha256 on another, at once, so the hash reads the data from the page cache the
    copy just filled (no second read from the disk) while the disk writes it. :meth:`finish`
    renames them, then fsyncs each folder once. A context manager: on leaving, nothing still
    reads or syncs a file (the caller may remove them).

    QEMU writes the files without flushing them (``cache.no-flush``): this one ``fsync`` per
    file is what makes them durable, before the manifest names them."""

    repo: Repository
    _pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(SEAL_THREADS, "seal"))
    _files: list[_Sealed] = field(default_factory=list)

    def __enter__(self) -> Sealing:
        return self

    def __exit__(self, *_: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def add(self, tmp: Path, final: Path) -> None:
        """Start sealing ``tmp`` (written completely, closed by its writer), to become
        ``final``."""
        self._files.append(_Sealed(tmp, final, self._pool.submit(durable.fsync_data, tmp),
                                   self._pool.submit(durable.sha256, tmp)))

    def finish(self) -> dict[Path, dict[str, Any]]:
        """Every file added, durable under its final name: by its temporary path, its
        manifest entry (``file``, ``bytes``, ``sha256``)."""
        sealed = {}
        for one in self._files:
            one.synced.result()
            digest = one.digest.result()
            os.replace(one.tmp, one.final)
            sealed[one.tmp] = {"file": self.repo.relative(one.final),
                               "bytes": one.final.stat().st_size, "sha256": digest}
        for folder in sorted({one.final.parent for one in self._files}):
            durable.fsync_dir(folder)
        return sealed


def _is_moment(value: object) -> bool:
    try:
        timing.parse_rfc3339(value)
    except InvalidInput:
        return False
    return True


def now() -> str:
    """The time stamp manifests use (UTC, RFC 3339, microseconds: points sort by it). Answers
    show it in whole seconds (:func:`waymark.model.timing.moment`), as every other moment;
    manifests keep the fractions, which older Waymark wrote too and this one reads."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

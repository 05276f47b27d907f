"""Read models: what ``list``/``show`` print and ``--json`` returns. Read-only.

They read through the read path (:mod:`waymark.engine.reading`, :mod:`waymark.catalog.reads`):
a few set-based queries per view (a VM's checkpoints, images, disks and frozen images: one
query each, whatever their number), no ORM object per row, so a command that only reads
imports neither the ORM nor the engine, and a server's listing of 1,000 VMs costs two queries.
Every function takes a :class:`~waymark.engine.reading.Source`: a full context, or a home
opened for reading (:func:`waymark.engine.reading.open_home`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from waymark.catalog import reads
from waymark.catalog.reads import CheckpointRow, DiskRow, Reader, VmRow
from waymark.engine import reading
from waymark.engine.reading import Source
from waymark.engine.running import observe
from waymark.images.qemu_img import allocated
from waymark.model import planner, timing, tree
from waymark.model.hardware import HardwareConfig
from waymark.model.timing import rfc3339

KIND_HAS_MEMORY = "standard"


class Space:
    """Per-image sizes and chain depths of one VM's image graph, and the images each of its
    checkpoints froze (read once for the VM, not once a checkpoint)."""

    def __init__(self, reader: Reader, vm_id: str) -> None:
        self.images = reads.images(reader, vm_id)
        self.disks = reads.disks(reader, vm_id)
        self.frozen = reads.frozen_by_checkpoint(reader, vm_id)
        referenced = {d.active_image_id for d in self.disks.values()} | {
            image for disks in self.frozen.values() for image in disks.values()}
        self.nodes = {i.id: planner.ImageNode(i.id, i.parent_id, i.id in referenced or i.pinned,
                                              i.pinned, 0 if i.pinned else allocated(i.path))
                      for i in self.images.values()}
        self.shared = planner.shared(list(self.nodes.values()))
        self._depths: dict[str, int] = {}

    def depth(self, image_id: str) -> int:
        """Layers a read of this image may cross (down to a pinned image: its own chain's
        length). Each image's depth is worked out once for the whole view."""
        path: list[str] = []  # the images above the first one whose depth is known
        below, current = 0, self.images.get(image_id)
        while current is not None:
            if current.id in self._depths:
                below = self._depths[current.id]
                break
            if current.pinned:
                below = self._depths[current.id] = current.chain_length
                break
            path.append(current.id)
            current = self.images.get(current.parent_id) if current.parent_id else None
        for above in reversed(path):
            below = self._depths[above] = below + 1
        return below

    def allocated(self, image_id: str) -> int:
        return self.nodes[image_id].allocated

    def shared_below(self, image_id: str) -> int:
        """Bytes of shared images between this image and the next referenced one below."""
        total, parent = 0, self.images[image_id].parent_id
        while parent is not None and parent in self.shared:
            total += self.nodes[parent].allocated
            parent = self.images[parent].parent_id
        return total


def _checkpoint(row: CheckpointRow, space: Space) -> dict[str, Any]:
    frozen = space.frozen.get(row.id, {})
    return {
        "id": row.id, "name": row.name, "parent_id": row.parent_id,
        "created_at": rfc3339(row.created_at), "kind": row.kind,
        "has_memory": row.memory_path is not None, "requested_type": row.requested_type,
        "fallback_reason": row.fallback_reason, "skipped_disks": row.skipped_disks,
        "notes": row.notes,
        "pause_seconds": row.pause_seconds, "freeze_seconds": row.freeze_seconds,
        "allocated_bytes": sum(space.allocated(i) for i in frozen.values()),
        "shared_bytes": sum(space.shared_below(i) for i in frozen.values()),
        "chain_depth": max((space.depth(i) for i in frozen.values()), default=0),
    }


def checkpoint_list(source: Source, vm_id: str) -> dict[str, Any]:
    with source.reading() as reader:
        vm_row = reading.vm_by_id(reader, vm_id)
        space = Space(reader, vm_row.id)
        rows = reads.checkpoints(reader, vm_row.id)
        return {"vm_id": vm_row.id, "vm_name": vm_row.name,
                "current_checkpoint_id": vm_row.current_checkpoint_id,
                "checkpoints": [_checkpoint(c, space) for c in rows]}


def checkpoint_tree(listing: dict[str, Any], columns: int = 100) -> list[str]:
    """The listing's tree as text lines within ``columns`` (the terminal's width)."""
    nodes = [tree.Node(c["id"], c["name"], c["parent_id"],
                       timing.parse_rfc3339(c["created_at"], what="checkpoint's time"),
                       c["has_memory"], c.get("notes")) for c in listing["checkpoints"]]
    return tree.draw(nodes, listing["current_checkpoint_id"], columns)


def checkpoint_show(source: Source, vm_id: str, ckpt_ref: str) -> dict[str, Any]:
    with source.reading() as reader:
        vm_row = reading.vm_by_id(reader, vm_id)
        rows = reads.checkpoints(reader, vm_row.id)
        nodes = [tree.Node(c.id, c.name, c.parent_id, c.created_at, c.memory_path is not None)
                 for c in rows]
        found = tree.resolve(nodes, ckpt_ref, owner=vm_row.name)
        row = next(c for c in rows if c.id == found.id)
        space = Space(reader, vm_row.id)
    out = _checkpoint(row, space)
    out["vm_id"], out["vm_name"] = vm_row.id, vm_row.name
    out["is_current"] = vm_row.current_checkpoint_id == row.id
    out["configuration"] = row.config
    out["memory_state"] = row.memory_path
    out["media_name"] = _media_name(row.config.get("media"))
    out["disks"] = [{"disk_id": disk_id, "frozen_image": space.images[image_id].path,
                     "virtual_size": space.images[image_id].virtual_size,
                     "allocated_bytes": space.allocated(image_id),
                     "chain_depth": space.depth(image_id)}
                    for disk_id, image_id in space.frozen.get(row.id, {}).items()]
    out["child_ids"] = [c.id for c in rows if c.parent_id == row.id]
    return out


def _disk(disk: DiskRow, space: Space, attached: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"id": disk.id, "attached": attached,
                           "passthrough": disk.passthrough_path is not None}
    if disk.active_image_id is None:
        out.update(active_image=None, path=disk.passthrough_path)
        return out
    image = space.images[disk.active_image_id]
    base = image
    while base.parent_id is not None:
        base = space.images[base.parent_id]
    out.update(active_image=image.path, virtual_size=image.virtual_size,
               allocated_bytes=space.allocated(image.id), chain_depth=space.depth(image.id),
               base_image=base.path, base_pinned=base.pinned)
    return out


def vm_show(source: Source, vm_id: str) -> dict[str, Any]:
    """The VM as it is: a QEMU that died shows as off, with nothing written (reconciling is
    for commands that hold the VM's lock: :func:`waymark.engine.running.presence.reconcile`)."""
    with source.reading() as reader:
        row = reading.vm_by_id(reader, vm_id)
        state = observe.observed_state(source.home, row.id, row.state)
        shown = _vm(reader, row, state)
    # the accelerator its QEMU runs under (its configured one is ``accel``)
    found = observe.find(observe.run_files(source.home, vm_id))
    shown["accelerator"] = (found.runtime.get("accelerator")
                            if found is not None and state in observe.LIVE_STATES else None)
    return shown


def _vm(reader: Reader, row: VmRow, state: str) -> dict[str, Any]:
    space = Space(reader, row.id)
    hardware = HardwareConfig.load(row.config)
    disks = space.disks
    active = {d.active_image_id for d in disks.values()}
    held = sum(n.allocated for n in space.nodes.values() if not n.pinned and n.id not in active)
    return {
        "id": row.id, "name": row.name, "state": state, "created_at": rfc3339(row.created_at),
        **{k: v for k, v in hardware.dump().items() if k not in ("disks", "nvram")},
        "media_name": _media_name(hardware.media),
        "checkpoint_type": row.checkpoint_type, "checkpoint_dir": row.checkpoint_dir,
        "max_checkpoints": row.max_checkpoints,
        "automatic_checkpoints": row.automatic_checkpoints,
        "automatic_checkpoint_id": row.automatic_checkpoint_id,
        "template": (row.origin or {}).get("template"),
        "profile": (row.origin or {}).get("profile"),
        # where each setting came from at creation: vm | profile P | template T | default
        "settings_source": (row.origin or {}).get("sources", {}),
        "current_checkpoint_id": row.current_checkpoint_id,
        "checkpoint_count": reads.checkpoint_count(reader, row.id),
        "checkpoint_space_bytes": held,
        "consolidation": _consolidation(reads.consolidations(reader, row.id)),
        "disks": [_disk(disks[d], space, True) for d in hardware.guest_disks],
        "firmware_variables": None if hardware.nvram is None
        else _disk(disks[hardware.nvram], space, True),
        "detached_disks": [_disk(d, space, False) for d in disks.values()
                           if d.id not in hardware.disks],
    }


def _consolidation(found: reads.Consolidations) -> dict[str, Any]:
    """Whether it is on, the bytes its copies take on disk and how many disks read through
    one (engine/consolidation.py)."""
    return {"enabled": found.enabled, "bytes": sum(allocated(p) for p, _ in found.copies),
            "linked_disks": sum(1 for _, linked in found.copies if linked)}


def _media_name(media: object) -> str | None:
    """The ISO's file name (no host path), or None for an empty CD drive."""
    return Path(media).name if isinstance(media, str) and media else None


SUMMARY_DISK_KEYS = ("id", "passthrough", "virtual_size", "allocated_bytes", "chain_depth")


def vm_summary(source: Source, vm_id: str, sample: float = observe.USAGE_INTERVAL
               ) -> dict[str, Any]:
    """Hyper-V Manager's Summary pane: the hardware, where the checkpoint type comes from
    (``vm``: the VM's own, also for a VM made without a template; ``template T``, ``profile
    P``, ``default``), the disks with size, space used and chain depth, the CD drive, and for
    a running VM its uptime and what its QEMU uses (CPU measured over ``sample`` seconds)."""
    with source.reading() as reader:  # one state of the catalog
        row = reading.vm_by_id(reader, vm_id)
        shown = _vm(reader, row, observe.observed_state(source.home, row.id, row.state))
        current_name = reads.checkpoint_name(reader, row.current_checkpoint_id) \
            if row.current_checkpoint_id else None
    found = observe.find(observe.run_files(source.home, vm_id))
    live = found is not None and shown["state"] in observe.LIVE_STATES
    return {
        **{k: shown[k] for k in ("id", "name", "state", "memory_mib", "cpus", "firmware",
                                 "tpm", "cpu_model", "accel", "media_name", "boot_order",
                                 "checkpoint_type", "checkpoint_count",
                                 "checkpoint_space_bytes", "consolidation")},
        "accelerator": found.runtime.get("accelerator") if live and found else None,
        "secure_boot": shown["firmware"] == "uefi-secure",
        "checkpoint_type_source": shown["settings_source"].get("checkpoint_type", "vm"),
        "current_checkpoint": current_name,
        "disks": [{k: d.get(k) for k in SUMMARY_DISK_KEYS} for d in shown["disks"]],
        "uptime_seconds": observe.uptime(found) if live and found else None,
        "usage": observe.usage(found, sample) if live and found else None,
    }


def vm_list(source: Source, visible: reading.Visible = reading.everything,
            entries: VmEntries | None = None) -> list[dict[str, Any]]:
    """Every VM ``visible`` accepts, as it is (see :func:`vm_show`), by name; writes nothing.
    Two queries whatever the number of VMs, or none when ``entries`` still holds them."""
    rows = entries() if entries is not None else _vm_entries(source)
    home = source.home
    return [{"id": r.id, "name": r.name, "state": observe.observed_state(home, r.id, r.state),
             "memory_mib": r.memory_mib, "cpus": r.cpus, "checkpoint_type": r.checkpoint_type,
             "checkpoint_count": r.checkpoint_count}
            for r in rows if visible(r)]


def _vm_entries(source: Source) -> list[reads.VmEntry]:
    with source.reading() as reader:
        return reads.vm_entries(reader)


class VmEntries:
    """The catalog's part of :func:`vm_list` (every VM's row, whoever asks), read again only
    when something was committed to the catalog since (``changed``: a
    :class:`waymark.catalog.db.CatalogWatch`'s, SQLite's ``PRAGMA data_version``, which any
    commit of any connection or process moves). A server keeps one: a listing of 1,000 VMs
    then costs no query while nothing changes. What is not in the catalog (whether a live
    VM's QEMU still runs) and the caller's scope are applied on every call by
    :func:`vm_list`. Thread-safe: callers that find it stale at once read it once."""

    def __init__(self, source: Source, changed: Callable[[], bool]) -> None:
        self.source, self.changed = source, changed
        self._lock = threading.Lock()
        self._rows: list[reads.VmEntry] | None = None

    def __call__(self) -> list[reads.VmEntry]:
        with self._lock:
            # the look comes first: rows read after it are at least that new
            if self.changed() or self._rows is None:
                self._rows = _vm_entries(self.source)
            return self._rows


def last_backups(source: Source) -> dict[str, str]:
    """Each VM's newest backup point time (VMs with none are left out)."""
    latest: dict[str, str] = {}
    with source.reading() as reader:
        for vm_id, updated in reads.backup_bases(reader):
            latest[vm_id] = max(latest.get(vm_id, ""), rfc3339(updated))
    return latest


# --- checkpoints across VMs (``checkpoint list`` without a VM, --type, --most-recent) ----------

CHECKPOINT_TYPES = {
    "standard": "holds the memory state (▶): applying it resumes the VM running",
    "production": "holds the disks only (■): production checkpoints and disk-only ones",
    "disk-only": "disks only, taken while the VM was off (or its memory was not stored)",
}
"""What ``--type`` matches, by what a checkpoint holds (Get-VMSnapshot's -SnapshotType)."""


def checkpoint_lists(source: Source) -> list[dict[str, Any]]:
    """:func:`checkpoint_list` of every VM, by name."""
    with source.reading() as reader:
        ids = reads.vm_ids_by_name(reader)
    return [checkpoint_list(source, vm_id) for vm_id in ids]


def of_type(entry: dict[str, Any], wanted: str) -> bool:
    """Whether a checkpoint's view matches ``--type wanted`` (:data:`CHECKPOINT_TYPES`)."""
    if wanted == "standard":
        return bool(entry["has_memory"])
    if wanted == "production":
        return not entry["has_memory"]
    return str(entry["kind"]) == wanted


def checkpoint_rows(listings: list[dict[str, Any]], wanted: str | None = None,
                    most_recent: bool = False) -> list[dict[str, Any]]:
    """The checkpoints of ``listings`` (:func:`checkpoint_list`'s, here or from a server) as
    one flat list, each with its VM and whether it is current (Now's parent); only those of
    type ``wanted``, and with ``most_recent`` only each VM's current one (SCVMM's
    ``Get-SCVMCheckpoint -MostRecent``)."""
    rows = []
    for listing in listings:
        current = listing["current_checkpoint_id"]
        for entry in listing["checkpoints"]:
            if (most_recent and entry["id"] != current) or \
                    (wanted is not None and not of_type(entry, wanted)):
                continue
            rows.append({**entry, "vm_id": listing["vm_id"], "vm_name": listing["vm_name"],
                         "is_current": entry["id"] == current})
    return rows

"""Change tracking for incremental backups: persistent dirty bitmaps that follow a disk's active
image.

Each backup repository has its own bitmap on every disk, named :func:`name` (``wm-`` and the
first 12 characters of the repository's id). QEMU records in it every cluster written since the
bitmap was last cleared by a backup; the next incremental point copies exactly those. A bitmap
proves something only on the disk's **active** image, so whatever gives a disk a new active
image carries the bitmaps along:

- a checkpoint: the overlay gets a copy of each bitmap of the old active image, live in the
  same ``transaction`` as ``blockdev-snapshot`` (:func:`onto_overlay`), offline with
  ``qemu-img bitmap`` (:func:`carry_files`);
- an active commit (the top merged into its base, which becomes active): the base's bitmaps
  become exactly the top's (:func:`replace_live` before ``job-complete``, :func:`carry_files`
  offline). A bitmap left on the base from when it was active is stale and goes.
- anything else that gives a disk a new active image (an apply, a restore, a new disk) leaves it
  without bitmaps, so the next backup is full: a missing bitmap is always safe.

The old image keeps its copy: a frozen image's bitmaps are never read, and they are replaced when
the image becomes active again. An inconsistent bitmap (its QEMU was killed) is never carried.
Every function here is idempotent, or at worst drops a bitmap when repeated after a crash.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from waymark.images import qemu_img
from waymark.qemu import qmp

PREFIX = "wm-"
GRANULARITY = 65536
Bitmap = dict[str, Any]  # QEMU's BlockDirtyInfo: name, count, granularity, inconsistent, ...


def name(repo_id: str) -> str:
    return f"{PREFIX}{repo_id[:12]}"


def _ours(found: list[Bitmap]) -> list[Bitmap]:
    return [b for b in found if str(b.get("name", "")).startswith(PREFIX)]


async def on_nodes(machine: qmp.Qmp) -> dict[str, list[Bitmap]]:
    """Waymark's bitmaps on every block node QEMU has, by node name."""
    nodes = await machine.command("query-named-block-nodes", flat=True)
    return {n["node-name"]: _ours(n.get("dirty-bitmaps", [])) for n in nodes}


def add_action(node: str, bitmap: str, granularity: int = GRANULARITY) -> dict[str, Any]:
    return {"type": "block-dirty-bitmap-add", "data": {
        "node": node, "name": bitmap, "persistent": True, "granularity": granularity}}


def copy_actions(src_node: str, found: list[Bitmap], dst_node: str) -> list[dict[str, Any]]:
    """Transaction actions giving ``dst_node`` a copy of each consistent bitmap in ``found``
    (those of ``src_node``); ``dst_node`` must not have them yet."""
    actions = []
    for bitmap in found:
        if bitmap.get("inconsistent"):
            continue
        actions += [add_action(dst_node, bitmap["name"], bitmap["granularity"]),
                    {"type": "block-dirty-bitmap-merge", "data": {
                        "node": dst_node, "target": bitmap["name"],
                        "bitmaps": [{"node": src_node, "name": bitmap["name"]}]}}]
    return actions


def onto_overlay(tracked: dict[str, list[Bitmap]], top: str, overlay: str
                 ) -> list[dict[str, Any]]:
    """For a checkpoint's ``transaction``, after the ``blockdev-snapshot`` of ``top``: QEMU keeps
    the guest's requests drained from that action to the end, so no write falls between. A
    bitmap the overlay already has (copied from the file before QEMU opened it) is left."""
    present = {b["name"] for b in tracked.get(overlay, [])}
    return copy_actions(top, [b for b in tracked.get(top, []) if b["name"] not in present],
                        overlay)


async def replace_live(machine: qmp.Qmp, src_node: str, dst_node: str) -> None:
    """``dst_node``'s bitmaps become copies of ``src_node``'s (an active commit, before its
    ``job-complete``: the commit's own writes to the base then only add to them)."""
    tracked = await on_nodes(machine)
    for stale in tracked.get(dst_node, []):
        await machine.command("block-dirty-bitmap-remove", node=dst_node, name=stale["name"])
    actions = copy_actions(src_node, tracked.get(src_node, []), dst_node)
    if actions:
        await machine.command("transaction", actions=actions)


def carry_files(src: Path, dst: Path) -> None:
    """Offline: ``dst``'s bitmaps become copies of ``src``'s consistent ones (no process may
    have either open)."""
    for stale in _ours(qemu_img.bitmaps(dst)):
        qemu_img.bitmap(dst, stale["name"], remove=True)
    onto_new_file(src, dst)


def onto_new_file(src: Path, dst: Path, *, shared: bool = False) -> None:
    """``dst`` just created (it has no bitmap): copies of ``src``'s bitmaps that are stored
    whole in the file. ``in-use`` means a QEMU has ``src`` open (with ``shared``: its bitmaps
    live in that QEMU's memory) or was killed (inconsistent): not copied."""
    copy_files(src, dst, [b for b in _ours(qemu_img.bitmaps(src, shared=shared))
                          if "in-use" not in b.get("flags", [])])


def copy_files(src: Path, dst: Path, found: list[Bitmap]) -> None:
    """Copy the bitmaps ``found`` (consistent ones of ``src``) into ``dst``, which has none of
    them: one qemu-img run each. Also for QEMU's *inactive* nodes (after a migration to a memory
    state): QEMU has then written their bitmaps into the files and released the files' locks,
    and it reads the copies when the guest is resumed."""
    for bitmap in found:
        if not bitmap.get("inconsistent"):
            qemu_img.bitmap(dst, bitmap["name"], add=int(bitmap["granularity"]), merge_from=src)

"""The backups across VMs (the portal's Backups page, as Proxmox's backup view): every
registered repository with its usage, every backup point in it, and each VM's last result (its
newest point, and the newest failure a schedule recorded for it). Read-only.

A backup run by hand (``backup run``, "Back up now") that fails answers its caller and is not
recorded: the failures shown are the schedules' (each schedule keeps its last run's result).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from waymark.engine.context import Context
from waymark.errors import WaymarkError
from waymark.usecases.access import locations
from waymark.usecases.backups import points as backups
from waymark.usecases.backups import schedules


def overview(ctx: Context) -> dict[str, Any]:
    """``repositories`` (name, ``available``, ``error`` when it cannot be read, ``points``,
    ``bytes``), ``points`` (newest first, each with its ``repository``'s name), ``results``
    (each schedule's last run per VM) and ``vms`` (per VM: its last success and last
    failure)."""
    repositories, points = _repositories(ctx)
    results = _schedule_results(schedules.listing(ctx))
    return {"repositories": repositories, "points": points, "results": results,
            "vms": _per_vm(points, results)}


def _repositories(ctx: Context) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    shown, points = [], []
    for loc in locations.listing(ctx):
        if loc["kind"] != "repository":
            continue
        try:
            held = backups.listing(Path(loc["path"]))
        except WaymarkError as err:  # unmounted, or not a repository any more
            shown.append({"name": loc["name"], "path": loc["path"], "available": False,
                          "error": err.message, "points": 0, "bytes": 0})
            continue
        shown.append({"name": loc["name"], "path": loc["path"], "available": True,
                      "error": None, "points": len(held),
                      "bytes": sum(p["bytes"] for p in held)})
        points += [{**p, "repository": loc["name"]} for p in held]
    return shown, sorted(points, key=lambda p: p["created_at"], reverse=True)


def _schedule_results(listed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per VM of each schedule's last run (a run that failed before any VM: one row
    without a VM), newest first."""
    rows = []
    for schedule in listed:
        result = schedule["last_result"]
        if not isinstance(result, dict):
            continue
        base = {"schedule": schedule["name"], "at": schedule["last_run_at"]}
        for outcome in result.get("vms") or []:
            rows.append({**base, "vm_id": outcome.get("vm_id"), "vm_name": outcome.get("vm_name"),
                         "point_id": outcome.get("point_id"), "error": outcome.get("error")})
        if result.get("error"):
            rows.append({**base, "vm_id": None, "vm_name": None, "point_id": None,
                         "error": result["error"]})
    return sorted(rows, key=lambda r: r["at"] or "", reverse=True)


def _per_vm(points: list[dict[str, Any]], results: list[dict[str, Any]]
            ) -> list[dict[str, Any]]:
    """Each VM with points or schedule results: its newest point and its newest failure."""
    vms: dict[str, dict[str, Any]] = {}
    for point in points:  # newest first: the first seen is the last success
        vms.setdefault(point["vm_id"], {"vm_id": point["vm_id"], "vm_name": point["vm_name"],
                                        "last_success": point, "last_failure": None})
    for row in results:
        if row["vm_id"] is None or not row["error"]:
            continue
        entry = vms.setdefault(row["vm_id"], {"vm_id": row["vm_id"], "vm_name": row["vm_name"],
                                              "last_success": None, "last_failure": None})
        if entry["last_failure"] is None:
            entry["last_failure"] = row
    return sorted(vms.values(), key=lambda v: str(v["vm_name"]))

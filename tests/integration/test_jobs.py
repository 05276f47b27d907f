"""Jobs nobody runs are carried on: a --no-wait command killed between creating its job and
starting the worker leaves a queued job without a worker; the next command restarts an export
in a new worker (a merge is adopted by the next command on its VM)."""

from __future__ import annotations

import json
import sqlite3
import uuid
from pathlib import Path

from tests.helpers import Waymark


def orphan_export(wm: Waymark, vm: str, checkpoint: str, dest: Path) -> str:
    """The row a killed `checkpoint export --no-wait` leaves: queued, no worker, a while ago."""
    vm_id = wm.json("vm", "show", vm)["id"]
    ckpt_id = wm.json("checkpoint", "show", vm, checkpoint)["id"]
    job_id = uuid.uuid4().hex
    with sqlite3.connect(wm.home / "catalog.db") as db:
        db.execute(
            "INSERT INTO jobs (id, vm_id, kind, params, status, progress, worker_pid,"
            " worker_start, cancel_requested, created_at) VALUES (?, ?, 'export', ?, 'queued',"
            " 0, NULL, NULL, 0, '2026-01-01 00:00:00.000000')",
            (job_id, vm_id, json.dumps({"vm_id": vm_id, "checkpoint_id": ckpt_id,
                                        "dest": str(dest)})))
    return job_id


def test_a_workerless_queued_export_is_restarted(wm: Waymark, tmp_path: Path) -> None:
    wm("vm", "create", "w", "--disk", "16M")
    wm("checkpoint", "create", "w", "--name", "one")
    dest = tmp_path / "bundle"
    job_id = orphan_export(wm, "w", "one", dest)
    done = wm.json("job", "wait", job_id[:12])  # opening the home starts a worker for it
    assert done["status"] == "completed" and done["progress"] == 1.0
    assert (dest / "manifest.json").is_file()
    wm("vm", "import", str(dest), "--name", "w2")  # the bundle is whole (checksums verified)
    assert wm.run("check").returncode == 0

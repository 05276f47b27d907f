"""A compaction's intents follow each other without a transaction of their own: each merge step
after the first is planned and journaled in the commit of the one before it, and the ``compact``
marker is cleared in the last one's (:class:`waymark.engine.compaction._Ahead`). A merge job
writes its progress between steps, not around each one. A job cancelled just as a step is
about to start leaves that step's intent, already written, unstarted: closed ``cancelled``,
nothing changed, and the rest of the compaction waits for the next delete or ``check
--repair`` as before."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from tests.helpers import Waymark, active_image_of, content_sha256, qemu_io_write, query
from waymark import wiring
from waymark.config import Settings
from waymark.engine import compaction, jobs, locks
from waymark.engine.context import Context
from waymark.errors import Cancelled
from waymark.usecases.checkpoints import deletion

MIB = 1 << 20
VM = "v"


@pytest.fixture
def deleted(tmp_path: Path) -> Iterator[tuple[Waymark, Context, str]]:
    """base (frozen by A) <- U (written, frozen by C) <- K (written, Now); C deleted with its
    compaction left to do (the marker and the merge job): a commit of K into U, then the drop
    of K. Yields the CLI, a context and the VM's id."""
    wm = Waymark(tmp_path / "home")
    vm_id = wm.json("vm", "create", VM, "--disk", "64M")["id"]
    wm("checkpoint", "create", VM, "--name", "A")
    qemu_io_write(Path(active_image_of(wm.home, VM)), "qcow2", 0, 4 * MIB, 7)
    wm("checkpoint", "create", VM, "--name", "C")
    qemu_io_write(Path(active_image_of(wm.home, VM)), "qcow2", 0, MIB, 9)
    ctx = wiring.open_context(Settings(home=wm.home))
    try:
        deletion.delete_checkpoints(ctx, vm_id, "C", subtree=False, yes=True, user="test",
                                    wait=False)
        yield wm, ctx, vm_id
    finally:
        ctx.catalog.close()


def merge_intents(home: Path) -> list[tuple[str, str, int]]:
    return [(kind, status, len(steps.split('"op"')) - 1) for kind, status, steps in query(
        home, "SELECT kind, status, steps FROM intents WHERE kind IN "
              "('commit_down', 'pull_up', 'drop') ORDER BY id")]


def pending(home: Path) -> list[str]:
    return [kind for (kind,) in query(home, "SELECT kind FROM intents WHERE status = 'pending'")]


def written_transactions(ctx: Context) -> list[int]:
    """A list that grows by one at each commit of a transaction that wrote something (a
    reading session commits too, and is no fsynced transaction)."""
    writes: list[int] = []

    @event.listens_for(ctx.catalog.engine, "before_cursor_execute")
    def wrote(conn: Any, _cursor: object, statement: str, *_args: object) -> None:
        if not statement.lstrip().upper().startswith(("SELECT", "PRAGMA")):
            conn.info["wrote"] = True

    @event.listens_for(ctx.catalog.engine, "commit")
    def committed(conn: Any) -> None:
        if conn.info.pop("wrote", False):
            writes.append(1)

    return writes


def test_each_merge_intent_is_written_in_the_commit_of_the_one_before(
        deleted: tuple[Waymark, Context, str]) -> None:
    wm, ctx, vm_id = deleted
    now = content_sha256(active_image_of(wm.home, VM))
    writes = written_transactions(ctx)
    assert compaction.run(ctx, vm_id) == 2
    intents = merge_intents(wm.home)
    assert intents == [("commit_down", "committed", 2), ("drop", "committed", 1)], intents
    # the first intent written on its own, then each intent's commit (which writes the next,
    # or clears the marker), and the step a multi-step intent records between its steps: one
    # transaction a step less than an intent, its commit and a marker of their own each
    advances = sum(steps - 1 for _, _, steps in intents)
    assert len(writes) == 1 + len(intents) + advances, writes
    assert pending(wm.home) == ["merge"] or pending(wm.home) == []
    assert not [k for k in pending(wm.home) if k == compaction.MARKER]
    assert content_sha256(active_image_of(wm.home, VM)) == now
    assert wm.run("check").returncode == 0


def test_a_job_cancelled_as_a_step_starts_leaves_it_unstarted_and_changes_nothing(
        deleted: tuple[Waymark, Context, str]) -> None:
    wm, ctx, vm_id = deleted
    now = content_sha256(active_image_of(wm.home, VM))
    (job_id,) = [j for (j,) in query(wm.home, "SELECT id FROM jobs WHERE kind = 'merge'")]
    files = {p for (p,) in query(wm.home, "SELECT path FROM images")}

    def cancel_at_the_second_step(number: int, total: int, what: str, fraction: float,
                                  size: int | None = None) -> None:
        if (number, fraction) == (2, 0.0):
            jobs.cancel(ctx, job_id)

    # the lock alone (ctx.locked would settle the VM: run the compaction first)
    with locks.held(ctx.home, vm_id, label=VM, timeout=30), pytest.raises(Cancelled):
        compaction.compact_as_job(ctx, vm_id, cancel_at_the_second_step)
    assert merge_intents(wm.home) == [("commit_down", "committed", 2), ("drop", "cancelled", 1)]
    assert pending(wm.home) == []  # the marker cleared too: the rest waits, as before
    assert query(wm.home, "SELECT status FROM jobs WHERE id = ?", job_id) == [("cancelled",)]
    remaining = {p for (p,) in query(wm.home, "SELECT path FROM images")}
    assert remaining == files and all(Path(p).is_file() for p in remaining)  # K not dropped
    assert content_sha256(active_image_of(wm.home, VM)) == now

    repaired = wm.run("check", "--repair")  # carries the compaction on
    assert repaired.returncode == 0, repaired
    assert len({p for (p,) in query(wm.home, "SELECT path FROM images")}) == 2
    assert content_sha256(active_image_of(wm.home, VM)) == now
    assert wm.run("check").returncode == 0


def test_a_merge_job_writes_its_progress_once_between_steps_and_not_around_them(
        tmp_path: Path) -> None:
    """Its claim says it started, its finish that it ended, the next step's start that the
    last one ended; steps shorter than the progress interval have nothing to add (each write is
    an fsynced transaction). A command's own progress bar still sees every report."""
    wm = Waymark(tmp_path / "home")
    vm_id = wm.json("vm", "create", VM, "--disk", "1M")["id"]
    wm("checkpoint", "create", VM, "--name", "A")
    wm("checkpoint", "create", VM, "--name", "B")
    ctx = wiring.open_context(Settings(home=wm.home))
    written: list[tuple[float, str | None]] = []
    seen: list[tuple[int, float]] = []

    def echoed(number: int, total: int, what: str, fraction: float,
               size: int | None = None) -> None:
        seen.append((number, fraction))
    real = jobs.Reporter.steps

    def steps(self: jobs.Reporter, number: int, total: int, what: str, fraction: float,
              size: int | None = None) -> None:
        written.append((fraction, what))
        real(self, number, total, what, fraction, size)

    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(jobs.Reporter, "steps", steps)
            patch.setattr(jobs, "PROGRESS_EVERY", 3600.0)
            deletion.delete_checkpoints(ctx, vm_id, "A", subtree=False, yes=True, user="test",
                                        report=echoed)
    finally:
        ctx.catalog.close()
    job = wm.json("job", "list")[-1]
    assert (job["kind"], job["status"], job["progress"]) == ("merge", "completed", 1.0), job
    assert job["result"]["merge_steps"] == 2, job  # (a merge, then the drop of a layer)
    assert written == [(0.0, "v: removing a merged layer")], written
    assert {n for n, f in seen if f == 0.0} == {1, 2} and seen[-1] == (2, 1.0), seen

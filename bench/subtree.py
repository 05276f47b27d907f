"""`checkpoint delete --subtree` of 200 checkpoints on Now's path (layers nearly empty).

    .venv/bin/python bench/run.py --only subtree [--runs N]
    .venv/bin/python bench/subtree.py [--runs N] [--layers N]

Each run makes a VM (`vm create b --disk 64M`, `--max-checkpoints` LAYERS), then LAYERS
checkpoints in one line through the library (no interpreter per checkpoint: the delete is what
is measured), 4 KiB written into each layer first with qemu-io, so no layer is quite empty;
then times the whole command

    waymark checkpoint delete b c0 --subtree --yes

(interpreter start-up included). Printed: the median of the runs (target <= 5 s), the journal
intents and file steps the delete wrote, and the time per layer.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import tempfile
from pathlib import Path

from run import Home, sh, timed

from waymark.config import Settings
from waymark.engine import lookup
from waymark.usecases.checkpoints import lifecycle
from waymark.wiring import open_context

LAYERS = 200


def _subtree_setup(home: Home, layers: int) -> None:
    """A VM with ``layers`` checkpoints in one line (c0 <- c1 <- ... <- Now), made through the
    library (no interpreter per checkpoint: the delete is what is measured); 4 KiB written into
    every layer, so no layer is quite empty."""
    home.reset()
    home.wm("vm", "create", "b", "--disk", "64M")
    home.wm("vm", "set", "b", "--max-checkpoints", str(max(layers, 1)))
    active = home.active("b")
    ctx = open_context(Settings(home=home.path))
    with ctx.catalog.session() as session:
        vm_id = lookup.vm(session, "b").id
    for i in range(layers):
        sh("qemu-io", "-f", "qcow2", "-c", f"write -P {i % 250 + 1} {i * 4}k 4k", active)
        lifecycle.create(ctx, vm_id, f"c{i}")
        with ctx.catalog.session() as session:
            disk = next(iter(lookup.disks(session, vm_id).values()))
            active = lookup.images(session, vm_id)[str(disk.active_image_id)].path
    ctx.catalog.engine.dispose()


def _journal_steps(home: Home, after: int) -> tuple[int, int]:
    """(intents, file steps) the catalog's journal holds past intent ``after``."""
    con = sqlite3.connect(home.path / "catalog.db")
    try:
        rows = con.execute("SELECT steps FROM intents WHERE id > ?", (after,)).fetchall()
    finally:
        con.close()
    return len(rows), sum(len(json.loads(steps)) for (steps,) in rows)


def _last_intent(home: Home) -> int:
    con = sqlite3.connect(home.path / "catalog.db")
    try:
        return int(con.execute("SELECT coalesce(max(id), 0) FROM intents").fetchone()[0])
    finally:
        con.close()


def run_bench(root: Path, runs: int, layers: int = LAYERS) -> None:
    """`checkpoint delete --subtree` of ``layers`` checkpoints on Now's path, whole command."""
    home = Home(root)
    samples: list[float] = []
    counts: list[tuple[int, int]] = []
    for _ in range(runs):
        _subtree_setup(home, layers)
        before = _last_intent(home)
        samples.append(timed(lambda: home.wm("checkpoint", "delete", "b", "c0", "--subtree",
                                             "--yes")))
        counts.append(_journal_steps(home, before))
        left = json.loads(home.wm("checkpoint", "list", "b", "--json"))["checkpoints"]
        assert left == [], left
    took = statistics.median(samples)
    intents, steps = counts[len(counts) // 2]
    print(f"subtree: delete --subtree of {layers} checkpoints on Now's path {took:.2f} s "
          f"(runs {', '.join(f'{s:.2f}' for s in samples)}; target <= 5 s): {intents} journal "
          f"intents, {steps} file steps, {took / layers * 1000:.1f} ms a layer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--layers", type=int, default=LAYERS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as tmp:
        run_bench(Path(tmp), args.runs, args.layers)


if __name__ == "__main__":
    main()

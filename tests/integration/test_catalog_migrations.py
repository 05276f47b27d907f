"""Catalog migrations on homes that hold data: every revision upgrades to head with its rows
intact, and a migration that fails changes nothing (SQLite DDL runs inside one transaction)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine

from tests.helpers import Waymark
from waymark.catalog.db import HEAD, MIGRATIONS


def revision(home: Path) -> str:
    with sqlite3.connect(home / "catalog.db") as db:
        return str(db.execute("SELECT version_num FROM alembic_version").fetchone()[0])


def downgrade(home: Path, to: str) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    engine = create_engine(f"sqlite:///{home / 'catalog.db'}")
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, to)
    engine.dispose()


@pytest.fixture
def populated(wm: Waymark) -> Waymark:
    wm("vm", "create", "keep", "--disk", "16M")
    wm("checkpoint", "create", "keep", "--name", "one")
    wm("checkpoint", "create", "keep", "--name", "two")
    return wm


@pytest.mark.parametrize("start", ["0001", "0002", "0003", "0004"])
def test_upgrade_from_every_revision_keeps_the_rows(populated: Waymark, start: str) -> None:
    before = populated.json("checkpoint", "list", "keep")
    downgrade(populated.home, start)
    assert revision(populated.home) == start
    after = populated.json("checkpoint", "list", "keep")  # any command migrates to head
    assert revision(populated.home) == HEAD
    assert [c["name"] for c in after["checkpoints"]] == ["one", "two"]
    assert [c["id"] for c in after["checkpoints"]] == [c["id"] for c in before["checkpoints"]]
    assert populated.run("check").returncode == 0


def test_a_failing_migration_changes_nothing(populated: Waymark) -> None:
    downgrade(populated.home, "0003")
    # 0004 will run whole (a table and two columns), then 0005 fails on this table
    with sqlite3.connect(populated.home / "catalog.db") as db:
        db.execute("CREATE TABLE schedules (name TEXT)")
    failed = populated.run("vm", "list")
    assert failed.returncode == 73 and "Traceback" not in failed.stderr, failed.stderr
    assert revision(populated.home) == "0003"
    with sqlite3.connect(populated.home / "catalog.db") as db:
        columns = {row[1] for row in db.execute("PRAGMA table_info(vms)")}
        assert "automatic_checkpoints" not in columns  # 0004's work was rolled back too
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        assert "jobs" not in tables
        db.execute("DROP TABLE schedules")
    assert populated.json("vm", "list")[0]["name"] == "keep"
    assert revision(populated.home) == HEAD

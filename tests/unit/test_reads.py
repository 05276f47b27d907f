"""The catalog's read path (:mod:`waymark.catalog.reads`): every query runs against the schema
the migrations make, its rows name the ORM's columns, and its SQL is written once for SQLite
and PostgreSQL's driver."""

from __future__ import annotations

from dataclasses import fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from waymark.catalog import reads
from waymark.catalog.db import Catalog
from waymark.catalog.models import (
    BackupBase,
    Checkpoint,
    Disk,
    FrozenImage,
    Image,
    Intent,
    StoredVm,
    Vm,
)

AT = datetime(2026, 12, 7, 3, 12, 21, 500000, tzinfo=UTC)
CONFIG = {"memory_mib": 512, "cpus": 2, "disks": ["d1"]}


def test_its_rows_name_the_orm_columns() -> None:
    for row, model in ((reads.VmRow, Vm), (reads.CheckpointRow, Checkpoint),
                       (reads.ImageRow, Image), (reads.DiskRow, Disk)):
        named = {f.name for f in fields(row)}
        assert named <= set(model.__table__.columns.keys()), (row, model)
    entry = {f.name for f in fields(reads.VmEntry)} - {"memory_mib", "cpus", "checkpoint_count"}
    assert entry <= set(Vm.__table__.columns.keys())


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    """A catalog at the schema's head with VM ``v`` (one disk, a base image and an active one),
    a checkpoint ``c`` that froze the base, a backup base, a stored VM and a pending intent."""
    made = Catalog.open(tmp_path)
    with made.session() as session:
        session.add(Vm(id="a" * 32, name="v", created_at=AT, state="off", config=CONFIG,
                       checkpoint_type="production", checkpoint_dir="/c", max_checkpoints=50,
                       current_checkpoint_id="c1", origin={"template": "t"}, owner_id="u1"))
        session.flush()
        session.add_all([Image(id="i1", vm_id="a" * 32, path="/i1", format="qcow2", pinned=False,
                               virtual_size=1 << 20, chain_length=1, created_at=AT),
                         Image(id="i2", vm_id="a" * 32, path="/i2", format="qcow2",
                               parent_id="i1", pinned=False, virtual_size=1 << 20,
                               chain_length=1, created_at=AT)])
        session.flush()
        session.add(Disk(id="d1", vm_id="a" * 32, active_image_id="i2", created_at=AT))
        session.add(Checkpoint(id="c1", vm_id="a" * 32, name="c", created_at=AT, kind="disk-only",
                               requested_type="production", config=CONFIG, skipped_disks=[]))
        session.flush()
        session.add(FrozenImage(checkpoint_id="c1", disk_id="d1", image_id="i1"))
        session.add(BackupBase(vm_id="a" * 32, repo_id="r", point_id="p", updated_at=AT))
        session.add(StoredVm(vm_id="b" * 32, name="away", library="/lib", stored_at=AT))
    return made


def test_every_query_reads_the_schema_the_migrations_make(catalog: Catalog) -> None:
    with catalog.reading() as reader:
        assert reads.revision(reader) == reads.HEAD
        assert not reads.unfinished_work(reader)
        vm = reads.vm(reader, "a" * 32)
        assert vm is not None and (vm.name, vm.config, vm.origin, vm.owner_id, vm.created_at) \
            == ("v", CONFIG, {"template": "t"}, "u1", AT)
        assert reads.vms_named(reader, "v") == [vm] == reads.vms_with_prefix(reader, "aaa")
        assert reads.vm_entries(reader) == [reads.VmEntry("a" * 32, "v", "off", 512, 2,
                                                          "production", "u1", 1)]
        [checkpoint] = reads.checkpoints(reader, "a" * 32)
        assert (checkpoint.name, checkpoint.created_at, checkpoint.skipped_disks) == \
            ("c", AT, [])
        assert reads.checkpoint_count(reader, "a" * 32) == 1
        assert reads.checkpoint_name(reader, "c1") == "c"
        assert reads.images(reader, "a" * 32)["i2"].parent_id == "i1"
        assert reads.disks(reader, "a" * 32)["d1"].active_image_id == "i2"
        assert reads.frozen_by_checkpoint(reader, "a" * 32) == {"c1": {"d1": "i1"}}
        assert reads.backup_bases(reader) == [("a" * 32, AT)]
        assert reads.stored_vm(reader, "away") == ("away", "/lib") == \
            reads.stored_vm(reader, "bbb")
        assert reads.vm_ids_by_name(reader) == ["a" * 32]
    catalog.close()


def test_unfinished_work_is_a_pending_intent_or_an_unfinished_job(catalog: Catalog) -> None:
    with catalog.session() as session:
        session.add(Intent(vm_id="a" * 32, kind="x", params={}, steps=[], status="pending",
                           created_at=AT, updated_at=AT))
    with catalog.reading() as reader:
        assert reads.unfinished_work(reader)
    catalog.close()


def test_an_id_prefix_with_a_like_wildcard_matches_no_vm(catalog: Catalog) -> None:
    with catalog.reading() as reader:
        assert reads.vms_with_prefix(reader, "%") == reads.vms_with_prefix(reader, "a_") == []
        assert reads.stored_vm(reader, "%") is None
    catalog.close()


class Recording:
    """A DB-API connection of another driver (paramstyle ``format``): what it was sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []
        self.rolled_back = False

    def cursor(self) -> Recording:
        return self

    def execute(self, sql: str, params: Any = ()) -> None:
        self.sent.append((sql, params))

    def fetchall(self) -> list[Any]:
        return [("x",)]

    def close(self) -> None:
        pass

    def rollback(self) -> None:
        self.rolled_back = True


def test_the_sql_is_written_once_for_sqlite_and_postgresql() -> None:
    conn = Recording()
    with reads.snapshot(conn, "format") as reader:
        assert reader.rows("SELECT name FROM vms WHERE id = ?", "v1") == [("x",)]
        assert reader.json_number("config", "cpus") == "CAST(config ->> 'cpus' AS BIGINT)"
        with pytest.raises(ValueError, match="not a column or key name"):
            reader.json_number("config", "cpus') OR 1=1 --")
    assert conn.sent == [("SELECT name FROM vms WHERE id = %s", ("v1",))]
    assert conn.rolled_back  # a reader writes nothing: its snapshot is let go

"""Sealing a backup point's disk files (:class:`waymark.external.repository.Sealing`): each
file durable under its final name with its size and sha256, started as it is added."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from waymark.external.repository import Repository


def written(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_every_added_file_ends_under_its_final_name_with_its_size_and_sha256(
        tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo")
    contents = {"a": b"\x01" * 3_000_000, "b": b"", "c": bytes(range(256)) * 99}
    files = {key: (written(repo.root / "vms" / "v" / "disks" / key / ".p.qcow2.tmp", data),
                   repo.disk_file("v", key, "p")) for key, data in contents.items()}
    with repo.sealing() as sealing:
        for tmp, final in files.values():
            sealing.add(tmp, final)
        sealed = sealing.finish()
    for key, (tmp, final) in files.items():
        assert not tmp.exists() and final.read_bytes() == contents[key]
        assert sealed[tmp] == {"file": f"vms/v/disks/{key}/p.qcow2",
                               "bytes": len(contents[key]),
                               "sha256": hashlib.sha256(contents[key]).hexdigest()}


def test_a_file_that_cannot_be_sealed_fails_the_finish_and_renames_nothing_after_it(
        tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo")
    gone = repo.root / "vms" / "v" / "disks" / "a" / ".p.qcow2.tmp"
    kept = written(repo.root / "vms" / "v" / "disks" / "b" / ".p.qcow2.tmp", b"data")
    with pytest.raises(FileNotFoundError), repo.sealing() as sealing:
        sealing.add(gone, repo.disk_file("v", "a", "p"))
        sealing.add(kept, repo.disk_file("v", "b", "p"))
        sealing.finish()
    assert kept.exists() and not repo.disk_file("v", "b", "p").exists()

"""``qemu_img.has_bitmaps_extension`` reads a qcow2 header without running qemu-img: a file it
calls bitmap-free must be one qemu-img lists no bitmap of (the merge and checkpoint paths skip
two qemu-img runs on that answer)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from waymark.images import qemu_img


def qemu_img_bitmaps(path: Path) -> list[str]:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", "-f", "qcow2", str(path)],
                         check=True, capture_output=True, text=True).stdout
    data = json.loads(out).get("format-specific", {}).get("data", {})
    return [b["name"] for b in data.get("bitmaps", [])]


def make(path: Path, *options: str) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *options, str(path), "4M"],
                   check=True)
    return path


def bitmap(path: Path, *args: str) -> None:
    subprocess.run(["qemu-img", "bitmap", "-f", "qcow2", *args, str(path), "b1"], check=True)


def test_the_header_tells_a_file_without_bitmaps_from_one_with(tmp_path: Path) -> None:
    plain = make(tmp_path / "plain.qcow2")
    old = make(tmp_path / "v2.qcow2", "-o", "compat=0.10")
    marked = make(tmp_path / "marked.qcow2")
    bitmap(marked, "--add")
    overlay = make(tmp_path / "overlay.qcow2", "-F", "qcow2", "-b", str(marked))
    emptied = make(tmp_path / "emptied.qcow2")
    bitmap(emptied, "--add")
    bitmap(emptied, "--remove")
    answers = {p.name: qemu_img.has_bitmaps_extension(p)
               for p in (plain, old, marked, overlay, emptied)}
    assert answers == {"plain.qcow2": False, "v2.qcow2": False, "marked.qcow2": True,
                       "overlay.qcow2": False, "emptied.qcow2": False}
    for path in (plain, old, marked, overlay, emptied):
        assert [b["name"] for b in qemu_img.bitmaps(path)] == qemu_img_bitmaps(path), path


def test_a_file_it_cannot_read_as_qcow2_is_left_to_qemu_img(tmp_path: Path) -> None:
    raw = tmp_path / "raw.img"
    raw.write_bytes(b"\0" * 4096)
    short = tmp_path / "short.qcow2"
    short.write_bytes(qemu_img.QCOW2_MAGIC + b"\0\0\0\3")
    assert qemu_img.has_bitmaps_extension(raw)
    assert qemu_img.has_bitmaps_extension(short)
    assert qemu_img.has_bitmaps_extension(tmp_path / "missing.qcow2")

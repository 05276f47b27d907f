"""A fake image tool for unit tests of the journal and its executor: qemu-img and the bitmap
tool as :mod:`waymark.engine.executor` calls them (monkeypatched by the ``images`` fixture of
tests/unit/conftest.py).

Each "image" is a small JSON file: its backing file and its own clusters. Every call is
recorded in order; the fake can kill the command (:class:`Killed`, which nothing in Waymark
catches, as nothing survives a SIGKILL) just before or just after the N-th call, or make a call
fail as qemu-img would.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from waymark.errors import ImageError
from waymark.images import qemu_img
from waymark.qemu import bitmaps

Image = dict[str, Any]


class Killed(BaseException):
    """The command died here (a SIGKILL): no ``except`` in Waymark runs."""


def read(path: Path) -> Image:
    image: Image = json.loads(path.read_text())
    return image


def write(path: Path, image: Image) -> None:
    path.write_text(json.dumps(image, sort_keys=True))


def view(path: Path) -> dict[str, str]:
    """What a guest reads from the image: its clusters over its backing chain's."""
    image = read(path)
    below = view(Path(image["backing"])) if image["backing"] else {}
    return {**below, **image["data"]}


@dataclass
class FakeImages:
    """qemu-img and the bitmap tool, as the executor calls them: each call recorded, and the
    command killed ``before`` or ``after`` the call numbered ``kill_at[0]`` (from 0)."""

    calls: list[tuple[str, str]] = field(default_factory=list)
    kill_at: tuple[int, str] | None = None
    fail_at: int | None = None  # this call fails as qemu-img would (an ImageError)

    def _call(self, op: str, path: Path, work: Callable[[], None]) -> None:
        number = len(self.calls)
        self.calls.append((op, path.name))
        if self.kill_at == (number, "before"):
            raise Killed(f"{op} {path.name}")
        if self.fail_at == number:
            raise ImageError(f"qemu-img {op} failed on {path.name}")
        work()
        if self.kill_at == (number, "after"):
            raise Killed(f"{op} {path.name}")

    def create(self, path: Path, *, size: int | None = None, backing: Path | None = None,
               backing_fmt: str | None = None, unsafe: bool = False) -> None:
        self._call("create", path, lambda: write(path, {"backing": backing and str(backing),
                                                        "data": {}}))

    def commit(self, top: Path, base: Path, on_progress: qemu_img.Progress = None) -> None:
        def work() -> None:
            merged = read(base)
            merged["data"].update(read(top)["data"])
            write(base, merged)
            if on_progress is not None:
                on_progress(1.0)
        self._call("commit", top, work)

    def commit_onto(self, top: Path, into: Path, on_progress: qemu_img.Progress = None
                    ) -> None:
        """``top``'s own clusters into ``into`` (``top``'s header is not read); ``top`` kept."""
        def work() -> None:
            merged = read(into)
            merged["data"].update(read(top)["data"])
            write(into, merged)
        self._call("commit_onto", top, work)

    def rebase(self, path: Path, backing: Path | None, backing_fmt: str | None, *,
               unsafe: bool, on_progress: qemu_img.Progress = None) -> None:
        assert unsafe, "a merge rebases onto a base that already holds the merged clusters"

        def work() -> None:
            write(path, {**read(path), "backing": backing and str(backing)})
        self._call("rebase", path, work)

    def convert(self, src: Path, src_fmt: str, dst: Path, dst_fmt: str = "qcow2",
                on_progress: qemu_img.Progress = None) -> None:
        self._call("convert", dst, lambda: write(dst, {"backing": None, "data": view(src)}))

    def carry_bitmaps(self, src: Path, path: Path) -> None:
        """``path``'s bitmaps become ``src``'s (a list under the image's ``bitmaps`` key)."""
        def work() -> None:
            write(path, {**read(path), "bitmaps": read(src).get("bitmaps", [])})
        self._call("carry_bitmaps", path, work)

    def onto_new_file(self, src: Path, dst: Path, *, shared: bool = False) -> None:
        def work() -> None:
            write(dst, {**read(dst), "bitmaps": read(src).get("bitmaps", [])})
        self._call("onto_new_file", dst, work)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeImages:
        """Replace the tool functions the executor calls with this fake's, for one test."""
        for name in ("create", "commit", "commit_onto", "rebase", "convert"):
            monkeypatch.setattr(qemu_img, name, getattr(self, name))
        monkeypatch.setattr(bitmaps, "carry_files", self.carry_bitmaps)
        monkeypatch.setattr(bitmaps, "onto_new_file", self.onto_new_file)
        return self

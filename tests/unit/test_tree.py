from datetime import UTC, datetime, timedelta

import pytest

from waymark.errors import Ambiguous, NotFound
from waymark.model import tree

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def node(id_: str, name: str, parent: str | None, minute: int) -> tree.Node:
    return tree.Node(id_, name, parent, T0 + timedelta(minutes=minute))


NODES = [node("aa11", "base", None, 0), node("aa22", "left", "aa11", 1),
         node("bb33", "right", "aa11", 2), node("cc44", "dup", "bb33", 3),
         node("cc55", "dup", "bb33", 4)]


def test_default_name_is_hyper_v_style_and_fits() -> None:
    name = tree.default_name("web", T0)
    assert name.startswith("web - (") and name.endswith(")")
    assert len(tree.default_name("v" * 99, T0)) == 99


def test_resolve_by_name_then_id_prefix() -> None:
    assert tree.resolve(NODES, "left").id == "aa22"
    assert tree.resolve(NODES, "bb").id == "bb33"
    with pytest.raises(Ambiguous, match="cc44"):
        tree.resolve(NODES, "dup")
    with pytest.raises(Ambiguous):
        tree.resolve(NODES, "aa")
    with pytest.raises(NotFound):
        tree.resolve(NODES, "zz")


def test_descendants_and_depth() -> None:
    assert sorted(tree.descendants(NODES, "bb33")) == ["bb33", "cc44", "cc55"]
    assert tree.depth(NODES, "cc55") == 3
    assert tree.depth(NODES, None) == 0


def test_draw_puts_now_last_under_current() -> None:
    lines = tree.draw(NODES, "bb33")
    assert lines[0].startswith(f"{tree.DISK_ONLY} base")
    right = next(i for i, line in enumerate(lines) if " right " in line)
    now = next(i for i, line in enumerate(lines) if line.endswith("Now"))
    assert now > right and all("dup" in line for line in lines[right + 1:now])
    assert lines[now].strip().startswith("└─")


def test_draw_without_current_puts_now_at_the_root() -> None:
    lines = tree.draw(NODES[:1], None)
    assert lines[-1] == "Now"

from waymark.model.planner import (
    CommitDown,
    Drop,
    ImageNode,
    PullUp,
    after,
    next_step,
    plan,
    shared,
)


def img(id_: str, parent: str | None, *, ref: bool = False, pinned: bool = False,
        alloc: int = 0) -> ImageNode:
    return ImageNode(id_, parent, ref or pinned, pinned, alloc)


def test_compact_graph_needs_nothing() -> None:
    assert next_step([img("a", None, ref=True), img("b", "a", ref=True)]) is None


def test_childless_unreferenced_image_is_dropped() -> None:
    assert next_step([img("a", None, ref=True), img("b", "a")]) == Drop("b")


def test_only_child_merges_in_the_cheaper_direction() -> None:
    small_child = [img("u", None, alloc=1000), img("k", "u", ref=True, alloc=10)]
    assert next_step(small_child) == CommitDown("u", "k")
    big_child = [img("u", None, alloc=10), img("k", "u", ref=True, alloc=1000)]
    assert next_step(big_child) == PullUp("u", "k")


def test_shared_image_and_pinned_image_are_kept() -> None:
    graph = [img("p", None, pinned=True), img("u", "p", alloc=5),
             img("k1", "u", ref=True), img("k2", "u", ref=True)]
    assert next_step(graph) is None
    assert shared(graph) == {"u"}


def test_plan_ends_compact_and_keeps_referenced_images() -> None:
    graph = [img("p", None, pinned=True), img("a", "p", alloc=50), img("b", "a", alloc=5),
             img("c", "b", ref=True, alloc=1), img("d", "c", alloc=0), img("e", "c", ref=True)]
    steps = plan(graph)
    final = graph
    for step in steps:
        final = after(final, step)
    assert next_step(final) is None
    assert {n.id for n in final if n.referenced} >= {"p"}
    assert len([n for n in final if n.referenced]) == 3  # pinned + the two referenced roles
    assert all(n.referenced or n.pinned for n in final)


def test_unreferenced_only_child_is_dropped_not_merged_forever() -> None:
    graph = [img("a", None, ref=True, alloc=100), img("b", "a", alloc=100),
             img("c", "b", alloc=100)]
    assert next_step(graph) == Drop("c")
    assert [type(s) for s in plan(graph)] == [Drop, Drop]


def test_chain_of_shared_images_collapses() -> None:
    graph = [img("a", None, ref=True), img("u", "a", alloc=10), img("k", "u", alloc=5),
             img("r1", "k", ref=True), img("r2", "k", ref=True)]
    final = graph
    for step in plan(graph):
        final = after(final, step)
    assert sorted(n.id for n in final if not n.referenced) == ["u"]
    assert shared(final) == {"u"}

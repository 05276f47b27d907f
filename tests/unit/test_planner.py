from waymark.checkpoints.planner import CommitDown, Drop, ImageNode, PullUp, next_step, shared


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

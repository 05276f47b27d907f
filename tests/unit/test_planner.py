import itertools

from waymark.model.planner import (
    CommitDown,
    Drop,
    ImageNode,
    PullUp,
    after,
    moved,
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
    assert next_step(graph) == Drop("c", ("b",))  # the dead branch goes in one step
    assert plan(graph) == [Drop("c", ("b",))]


def test_drop_stops_at_a_shared_or_referenced_ancestor() -> None:
    graph = [img("a", None, ref=True), img("s", "a"), img("x", "s", ref=True),
             img("y", "s"), img("z", "y")]
    assert next_step(graph) == Drop("z", ("y",))  # s keeps x below it


def line(*allocs: int, child_ref: bool = True) -> list[ImageNode]:
    """ref base <- u1 <- ... <- un <- k (referenced): the allocs of u1..un, k."""
    *run, last = allocs
    nodes = [img("base", None, ref=True, alloc=10**9)]
    for i, alloc in enumerate(run, 1):
        nodes.append(img(f"u{i}", nodes[-1].id, alloc=alloc))
    nodes.append(img("k", nodes[-1].id, ref=child_ref, alloc=last))
    return nodes


def test_a_run_of_layers_is_one_commit_and_one_drop() -> None:
    graph = line(100, 1, 1, 1, 1)
    assert plan(graph) == [CommitDown("u1", "k", ("u2", "u3", "u4")),
                           Drop("k", ("u4", "u3", "u2"))]
    assert moved(graph, plan(graph)[0]) == 4


def test_a_run_is_pulled_into_a_bigger_child() -> None:
    graph = line(1, 2, 3, 100)
    assert plan(graph) == [PullUp("u1", "k", ("u2", "u3")), Drop("u3", ("u2", "u1"))]
    assert moved(graph, plan(graph)[0]) == 6


def test_a_run_merges_into_its_largest_file_even_in_its_middle() -> None:
    graph = line(1, 2, 100, 3, 4)
    steps = plan(graph)
    assert steps == [PullUp("u1", "u3", ("u2",)), Drop("u2", ("u1",)),
                     CommitDown("u3", "k", ("u4",)), Drop("k", ("u4",))]
    assert sum(moved(graph, s) for s in steps) == 1 + 2 + 3 + 4  # all but the largest


def test_a_tie_goes_to_the_lowest_file() -> None:
    assert next_step(line(5, 5, 5)) == CommitDown("u1", "k", ("u2",))


def test_every_line_compacts_to_its_referenced_images() -> None:
    for allocs in itertools.product((1, 5, 9), repeat=4):
        graph = line(*allocs)
        final = graph
        steps = plan(graph)
        for step in steps:
            final = after(final, step)
        assert [n.id for n in final if n.referenced] == ["base", next(
            n.id for n in final if n.referenced and n.id != "base")], allocs
        assert len(final) == 2 and len(steps) <= 4, (allocs, steps)


def test_chain_of_shared_images_collapses() -> None:
    graph = [img("a", None, ref=True), img("u", "a", alloc=10), img("k", "u", alloc=5),
             img("r1", "k", ref=True), img("r2", "k", ref=True)]
    final = graph
    for step in plan(graph):
        final = after(final, step)
    assert sorted(n.id for n in final if not n.referenced) == ["u"]
    assert shared(final) == {"u"}

"""The composition root (waymark.wiring): every kind the code can write has a handler, and the
journal refuses a kind nobody registered instead of committing it blindly."""

from __future__ import annotations

import ast
import importlib
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

import waymark
from waymark import wiring
from waymark.catalog.db import Catalog
from waymark.catalog.models import Intent
from waymark.engine import executor, jobs, journal
from waymark.engine.journal import Journal
from waymark.errors import UnknownKind

SRC = Path(waymark.__file__).parent
# (the call's attribute name, the receiver's name, the index of its kind argument)
KIND_ARGUMENT = {("add", "journal"): 2, ("run", "journal"): 1, ("prepared", "journal"): 1}


def _modules() -> Iterator[tuple[Any, ast.Module]]:
    for path in sorted(SRC.rglob("*.py")):
        if "migrations" in path.parts or path.name == "__main__.py":
            continue
        name = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
        module = importlib.import_module(name.removesuffix(".__init__"))
        yield module, ast.parse(path.read_text())


def _receiver(call: ast.Call) -> tuple[str, str] | None:
    func = call.func
    if not isinstance(func, ast.Attribute):
        return None
    owner = func.value
    name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
    return func.attr, name


def _values(module: Any, node: ast.expr) -> set[str]:
    """The kinds an argument expression can be: a literal, a module constant, or any value of
    a module-level table indexed by it (compaction's ``_KINDS[type(step)]``)."""
    if isinstance(node, ast.Constant):
        return {node.value}
    if isinstance(node, ast.Subscript):
        return set(eval(ast.unparse(node.value), vars(module)).values())
    return {eval(ast.unparse(node), vars(module))}


def _written_intent_kinds() -> set[str]:
    kinds: set[str] = set()
    for module, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and (where := _receiver(node)) in KIND_ARGUMENT:
                kinds |= _values(module, node.args[KIND_ARGUMENT[where]])
    return kinds


def _written_job_kinds() -> set[str]:
    kinds: set[str] = set()
    for module, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _receiver(node) == ("submit", "jobs"):
                kinds |= _values(module, node.args[2])
    return kinds


def _written_step_ops() -> set[str]:
    ops: set[str] = set()
    for _module, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values, strict=True):
                    if isinstance(key, ast.Constant) and key.value == "op" \
                            and isinstance(value, ast.Constant):
                        ops.add(value.value)
    return ops


def test_every_intent_kind_the_code_writes_has_a_handler() -> None:
    wiring.wire()
    written = _written_intent_kinds()
    assert {"vm_create", "checkpoint_files_delete", "compact", "drop", "backup_restore"} <= written
    assert written <= journal.kinds(), written - journal.kinds()
    assert written == set(wiring.INTENT_KINDS), "a registered kind nothing writes, or the reverse"


def test_every_job_kind_and_step_the_code_writes_has_a_runner() -> None:
    wiring.wire()
    assert _written_job_kinds() == {"merge", "export"} == jobs.kinds()
    ops = _written_step_ops()
    assert {"create_image", "commit", "qmp_commit", "qmp_stream"} <= ops
    assert ops <= executor.kinds(), ops - executor.kinds()


def test_a_live_intent_kind_has_its_resolver() -> None:
    wiring.wire()
    assert journal.kind_of("checkpoint_create").resolve is not None


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    wiring.wire()
    return Catalog.open(tmp_path)


def test_an_intent_of_an_unknown_kind_is_refused_before_it_is_written(catalog: Catalog,
                                                                       tmp_path: Path) -> None:
    target = tmp_path / "new.txt"
    with pytest.raises(UnknownKind, match="no_such_kind"):
        Journal(catalog).run("vm1", "no_such_kind", {}, [{"op": "write_file",
                                                          "path": str(target), "text": "x"}])
    assert not target.exists()
    with catalog.session() as session:
        assert list(session.scalars(select(Intent))) == []


def test_a_pending_intent_of_an_unknown_kind_is_never_committed(catalog: Catalog,
                                                                tmp_path: Path) -> None:
    """A row a newer Waymark wrote: driving it fails with UnknownKind, and it stays pending."""
    target = tmp_path / "new.txt"
    with catalog.session() as session:
        journal.add(session, "vm1", "drop", {"image": "none"},
                    [{"op": "write_file", "path": str(target), "text": "x"}])
    with catalog.session() as session:
        row = session.scalars(select(Intent)).one()
        row.kind = "from_a_newer_waymark"
    pending = Journal(catalog).pending("vm1")
    with pytest.raises(UnknownKind, match="from_a_newer_waymark"):
        Journal(catalog).finish(pending[0])
    assert [i.status for i in Journal(catalog).pending("vm1")] == ["pending"]


def test_an_unknown_step_is_an_error() -> None:
    with pytest.raises(UnknownKind, match="no_such_step"):
        executor.run({"op": "no_such_step"})


def test_every_use_case_function_the_root_names_exists_and_takes_the_engines_arguments() -> None:
    """The root names a use case's function by module and name (:class:`wiring.Deferred`),
    which mypy cannot follow: each resolves to a function that takes the two arguments every
    engine seam passes (a commit: session, params; a job: ctx, job id; a hook: ctx, vm id)."""
    named = [ref for ref in [*wiring.INTENT_KINDS.values(), *wiring.JOB_KINDS.values(),
                             wiring.BOOT_HOOK, wiring.CLEAN_STOP_HOOK]
             if isinstance(ref, wiring.Deferred)]
    assert len(named) == 11
    for ref in named:
        target = ref.target()
        assert target.__module__ == ref.module and target.__name__ == ref.name, ref
        inspect.signature(target).bind("first", "second")


def test_a_deferred_function_is_called_with_what_it_was_given() -> None:
    ref: wiring.Deferred[[str, str], str] = wiring.Deferred("os.path", "join")
    assert ref("a", "b") == "a/b"

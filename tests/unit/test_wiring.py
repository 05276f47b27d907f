"""The composition root (waymark.wiring): every kind the code can write has a handler, and the
journal refuses a kind nobody registered instead of committing it blindly."""

from __future__ import annotations

import ast
import importlib
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from sqlalchemy import select

import waymark
from waymark import wiring
from waymark.catalog.db import Catalog
from waymark.catalog.models import Intent
from waymark.engine import compaction, executor, jobs, journal, steps
from waymark.engine.journal import Journal
from waymark.engine.params import Params
from waymark.errors import UnknownKind

SRC = Path(waymark.__file__).parent
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
    """The kinds an argument expression can be: a literal or a module constant."""
    if isinstance(node, ast.Constant):
        return {node.value}
    return {eval(ast.unparse(node), vars(module))}


def _params_classes() -> set[type[Params]]:
    """Every intent parameters class the product defines (each names one kind)."""
    for _module in _modules():
        pass  # import every module, so that every class is defined
    found: set[type[Params]] = set()
    todo = list(Params.__subclasses__())
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if cls.__module__.startswith("waymark.") and "kind" in vars(cls):
            found.add(cls)
    return found


def _written_job_kinds() -> set[str]:
    kinds: set[str] = set()
    for module, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _receiver(node) == ("submit", "jobs"):
                kinds |= _values(module, node.args[2])
    return kinds


def test_every_intent_kind_the_code_writes_has_a_handler() -> None:
    """The journal writes an intent from its parameters (their class names the kind): every
    parameters class is registered, with its own kind, and nothing else is."""
    wiring.wire()
    classes = _params_classes()
    written = {cls.kind for cls in classes}
    assert {"vm_create", "checkpoint_files_delete", "compact", "drop", "backup_restore"} <= written
    assert len(written) == len(classes), "two parameters classes name the same kind"
    assert written == journal.kinds(), written ^ journal.kinds()
    assert {load().params for load in wiring.INTENT_KINDS.values()} == classes
    assert all(journal.kind_of(cls.kind).params is cls for cls in classes)


def test_every_job_kind_and_step_the_code_writes_has_a_runner() -> None:
    wiring.wire()
    assert _written_job_kinds() == {"merge", "export", "consolidate"} == jobs.kinds()
    # every step class the journal can hold has a runner (the qmp_* ones registered)
    assert {"create_image", "commit", "qmp_commit", "qmp_stream"} <= set(steps.KINDS)
    assert set(steps.KINDS) == executor.kinds()


def test_a_live_intent_kind_has_its_resolver() -> None:
    wiring.wire()
    assert journal.kind_of("checkpoint_create").resolve is not None


class NoSuchKind(Params, frozen=True, kw_only=True):
    kind: ClassVar[str] = "no_such_kind"


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    wiring.wire()
    return Catalog.open(tmp_path)


def test_an_intent_of_an_unknown_kind_is_refused_before_it_is_written(catalog: Catalog,
                                                                       tmp_path: Path) -> None:
    target = tmp_path / "new.txt"
    with pytest.raises(UnknownKind, match="no_such_kind"):
        Journal(catalog).run("vm1", NoSuchKind(), [steps.WriteFile(path=str(target), text="x")])
    assert not target.exists()
    with catalog.session() as session:
        assert list(session.scalars(select(Intent))) == []


def test_a_pending_intent_of_an_unknown_kind_is_never_committed(catalog: Catalog,
                                                                tmp_path: Path) -> None:
    """A row a newer Waymark wrote: driving it fails with UnknownKind, and it stays pending."""
    target = tmp_path / "new.txt"
    with catalog.session() as session:
        drop = compaction.DropIntent(image="none", child=None, direction="drop")
        journal.add(session, "vm1", drop, [steps.WriteFile(path=str(target), text="x")])
    with catalog.session() as session:
        row = session.scalars(select(Intent)).one()
        row.kind = "from_a_newer_waymark"
    pending = Journal(catalog).pending("vm1")
    with pytest.raises(UnknownKind, match="from_a_newer_waymark"):
        Journal(catalog).finish(pending[0])
    assert [i.status for i in Journal(catalog).pending("vm1")] == ["pending"]


def test_an_unknown_step_is_an_error() -> None:
    with pytest.raises(UnknownKind, match="no_such_step"):
        steps.from_json({"op": "no_such_step"})


def test_every_use_case_function_the_root_names_exists_and_takes_the_engines_arguments() -> None:
    """The root names a use case's function by module and name (:class:`wiring.Deferred`, an
    intent kind's loader), which mypy cannot follow: each resolves to a function that takes the
    two arguments every engine seam passes (a commit: session, params; a job: ctx, job id; a
    hook: ctx, vm id), and a commit takes its own kind's parameters."""
    named = [ref for ref in [*wiring.JOB_KINDS.values(), wiring.BOOT_HOOK,
                             wiring.CLEAN_STOP_HOOK, wiring.COMMIT_CHECKPOINT]
             if isinstance(ref, wiring.Deferred)]
    assert len(named) == 5
    for ref in named:
        target = ref.target()
        assert target.__module__ == ref.module and target.__name__ == ref.name, ref
        inspect.signature(target).bind("first", "second")
    for name, load in wiring.INTENT_KINDS.items():
        kind = load()
        assert kind.params.kind == name
        commit = kind.commit.target() if isinstance(kind.commit, wiring.Deferred) else kind.commit
        if commit is not None:
            _session, params = inspect.signature(commit, eval_str=True).parameters.values()
            assert params.annotation is kind.params, (name, params.annotation)


def test_a_kind_registered_under_another_kinds_name_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A wiring mistake (a loader giving another kind's parameters) is an error, never a commit
    of the wrong kind."""
    monkeypatch.setattr(journal._KINDS, "known", dict(journal._KINDS.known))
    journal.register_deferred("vm_create_typo", wiring.INTENT_KINDS["vm_create"])
    with pytest.raises(UnknownKind, match="vm_create_typo"):
        journal.kind_of("vm_create_typo")


def test_a_deferred_function_is_called_with_what_it_was_given() -> None:
    ref: wiring.Deferred[[str, str], str] = wiring.Deferred("os.path", "join")
    assert ref("a", "b") == "a/b"

"""The intent journal driving its steps through the executor, against a fake qemu-img.

The image tool is a recording fake that can kill the command before or after any call
(tests/unit/fake_images.py); the catalog is a real SQLite one in the test's folder.

What is checked: steps run in order and report their progress; a *commit, then finish* intent
killed at any step is finished by recovery, which re-runs the interrupted step, and ends with
the same files as a run that was never killed (also when recovery itself is killed); a
*prepare* intent killed at any step is rolled back to the files before it; a failed step undoes
a prepare intent and leaves a finish intent pending with its error; a live intent's resolver
decides between commit and roll back; an intent whose kind has no commit handler.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import msgspec
import pytest
from sqlalchemy import event, select
from sqlalchemy.orm import Session

from tests.unit.fake_images import FakeImages, Killed, read, view, write
from waymark.catalog.db import Catalog
from waymark.catalog.models import Intent
from waymark.engine import executor, journal, steps
from waymark.engine.journal import Journal
from waymark.engine.params import Params
from waymark.errors import ImageError, MalformedRecord, UnknownKind

VM = "v" * 32
KIND = "test_merge"


class MergeParams(Params, frozen=True, kw_only=True):
    kind: ClassVar[str] = KIND
    checkpoint: str


class CreateParams(Params, frozen=True, kw_only=True):
    kind: ClassVar[str] = "test_create"
    name: str = ""


class LiveParams(Params, frozen=True, kw_only=True):
    kind: ClassVar[str] = "test_live"
    vm: str
    amended: int = 0
    switched: bool = False


class NoResolver(Params, frozen=True, kw_only=True):
    kind: ClassVar[str] = "no_resolver"


class NoSuchKind(Params, frozen=True, kw_only=True):
    kind: ClassVar[str] = "no_such_kind"


MIDDLE = MergeParams(checkpoint="middle")


# --- a catalog, and commit handlers of the test's own kinds ----------------------------------

@pytest.fixture(scope="module")
def migrated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A catalog at the head revision, made once (migrations take a while) and copied."""
    home = tmp_path_factory.mktemp("migrated")
    Catalog.open(home).engine.dispose()
    return home / "catalog.db"


@pytest.fixture
def catalog(migrated: Path, tmp_path: Path) -> Iterator[Catalog]:
    home = tmp_path / "home"
    home.mkdir()
    shutil.copyfile(migrated, home / "catalog.db")
    opened = Catalog.open(home)
    yield opened
    opened.engine.dispose()


@pytest.fixture
def committed(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Params]]:
    """The commit handlers run (kind, params), for the kinds this module registers."""
    monkeypatch.setattr(journal._KINDS, "known", dict(journal._KINDS.known))
    ran: list[tuple[str, Params]] = []

    def handler(session: Session, params: Params) -> None:
        assert isinstance(session, Session)  # the commit's own transaction
        ran.append((params.kind, params))

    for kind in (MergeParams, CreateParams, LiveParams):
        journal.register(journal.intent_kind(kind, handler))
    return ran


def status(catalog: Catalog, intent_id: int) -> tuple[str, int]:
    intent = Journal(catalog).intent(intent_id)
    return intent.status, intent.next_step


def recover(catalog: Catalog) -> None:
    """What the next command does first (waymark.engine.settle): finish every pending intent."""
    book = Journal(catalog)
    for intent in book.pending(VM):
        book.finish(intent)


def files(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.iterdir()) if p.is_file()}


# --- a merge: commit, then finish -------------------------------------------------------------

@dataclass
class Chain:
    """base <- middle <- top: deleting the checkpoint whose layer is ``middle``."""

    folder: Path

    @property
    def base(self) -> Path:
        return self.folder / "base.qcow2"

    @property
    def middle(self) -> Path:
        return self.folder / "middle.qcow2"

    @property
    def top(self) -> Path:
        return self.folder / "top.qcow2"

    def make(self) -> Chain:
        self.folder.mkdir()
        write(self.base, {"backing": None, "data": {"0": "a", "1": "a", "2": "a"}})
        write(self.middle, {"backing": str(self.base), "data": {"1": "b", "2": "b"}})
        write(self.top, {"backing": str(self.middle), "data": {"2": "c"}})
        return self

    def merge_steps(self) -> list[executor.Step]:
        """The steps of a delete's merge (the cheaper direction: middle into base)."""
        return [steps.Commit(top=str(self.middle), base=str(self.base)),
                steps.Rebase(path=str(self.top), backing=str(self.base), backing_fmt="qcow2",
                             unsafe=True),
                steps.DeleteFile(path=str(self.middle)),
                steps.WriteFile(path=str(self.folder / "merged.json"), text="{}")]


def start_merge(catalog: Catalog, chain: Chain) -> int:
    """Journal the merge as a delete does: the catalog change is already made."""
    with catalog.session() as session:
        return journal.add(session, VM, MIDDLE, chain.merge_steps()).id


def merged_cleanly(tmp_path: Path, catalog: Catalog, images: FakeImages) -> dict[str, str]:
    chain = Chain(tmp_path / "clean").make()
    Journal(catalog).drive(start_merge(catalog, chain))
    images.calls.clear()
    return files(chain.folder)


def test_steps_run_in_order_and_report_which_step(
        tmp_path: Path, catalog: Catalog, images: FakeImages,
        committed: list[tuple[str, Params]]) -> None:
    chain = Chain(tmp_path / "vm").make()
    reported: list[tuple[int, int, str, float]] = []
    intent_id = Journal(catalog).run(
        VM, MIDDLE, chain.merge_steps(), shape="finish",
        report=lambda n, total, step, done: reported.append((n, total, step.op, done)))
    assert images.calls == [("commit", "middle.qcow2"), ("rebase", "top.qcow2")]
    assert [(n, total, op) for n, total, op, done in reported if done == 0.0] == [
        (1, 4, "commit"), (2, 4, "rebase"), (3, 4, "delete_file"), (4, 4, "write_file")]
    assert (1, 4, "commit", 1.0) in reported  # the long step's own progress
    assert status(catalog, intent_id) == ("committed", 4)
    assert committed == [(KIND, MIDDLE)]
    assert sorted(files(chain.folder)) == ["base.qcow2", "merged.json", "top.qcow2"]
    assert view(chain.top) == {"0": "a", "1": "b", "2": "c"}
    assert Journal(catalog).pending() == []


# each call of the fake, killed before it ran or after it ran (before the journal recorded it)
KILLS = [(call, when) for call in range(2) for when in ("before", "after")]


def kill_id(kill_at: tuple[int, str]) -> str:
    return f"killed-{kill_at[1]}-call-{kill_at[0]}"


@pytest.mark.parametrize("kill_at", KILLS, ids=kill_id)
def test_a_merge_killed_at_any_step_is_finished_by_recovery_as_if_never_killed(
        tmp_path: Path, catalog: Catalog, images: FakeImages,
        committed: list[tuple[str, Params]], kill_at: tuple[int, str]) -> None:
    clean = merged_cleanly(tmp_path, catalog, images)
    committed.clear()
    chain = Chain(tmp_path / "vm").make()
    intent_id = start_merge(catalog, chain)
    images.kill_at = kill_at
    with pytest.raises(Killed):
        Journal(catalog).drive(intent_id)
    assert status(catalog, intent_id) == ("pending", kill_at[0])  # the step to run again
    assert view(chain.top) == {"0": "a", "1": "b", "2": "c"}  # the guest's disk, unchanged

    images.kill_at = None
    recover(catalog)

    assert files(chain.folder) == {name: text.replace(str(tmp_path / "clean"),
                                                      str(chain.folder))
                                   for name, text in clean.items()}
    assert status(catalog, intent_id) == ("committed", 4)
    assert committed == [(KIND, MIDDLE)]
    recover(catalog)  # nothing left: a second recovery changes nothing
    assert committed == [(KIND, MIDDLE)]


def test_a_merge_killed_again_during_its_recovery_is_still_finished(
        tmp_path: Path, catalog: Catalog, images: FakeImages,
        committed: list[tuple[str, Params]]) -> None:
    chain = Chain(tmp_path / "vm").make()
    intent_id = start_merge(catalog, chain)
    images.kill_at = (0, "after")  # the commit ran, the journal did not record it
    with pytest.raises(Killed):
        Journal(catalog).drive(intent_id)
    images.kill_at = (2, "after")  # recovery re-ran the commit, then the rebase: killed again
    with pytest.raises(Killed):
        recover(catalog)
    assert status(catalog, intent_id) == ("pending", 1)
    images.kill_at = None
    recover(catalog)
    assert images.calls == [("commit", "middle.qcow2"), ("commit", "middle.qcow2"),
                            ("rebase", "top.qcow2"), ("rebase", "top.qcow2")]
    assert status(catalog, intent_id) == ("committed", 4)
    assert view(chain.top) == {"0": "a", "1": "b", "2": "c"}
    assert not chain.middle.exists() and read(chain.top)["backing"] == str(chain.base)


def test_a_failed_step_leaves_a_finish_intent_pending_with_its_error(
        tmp_path: Path, catalog: Catalog, images: FakeImages,
        committed: list[tuple[str, Params]]) -> None:
    chain = Chain(tmp_path / "vm").make()
    intent_id = start_merge(catalog, chain)
    images.fail_at = 1  # the rebase
    with pytest.raises(ImageError):
        Journal(catalog).drive(intent_id)
    intent = Journal(catalog).intent(intent_id)
    assert (intent.status, intent.next_step) == ("pending", 1)
    assert intent.error == "qemu-img rebase failed on top.qcow2"
    assert chain.middle.exists() and committed == []
    images.fail_at = None
    recover(catalog)
    assert status(catalog, intent_id) == ("committed", 4)
    assert view(chain.top) == {"0": "a", "1": "b", "2": "c"} and not chain.middle.exists()


# --- a checkpoint's new files: prepare, then commit -------------------------------------------

def create_steps(folder: Path, top: Path) -> list[executor.Step]:
    new = folder / "new"
    return [steps.MakeDir(path=str(new)),
            steps.CreateImage(path=str(new / "next.qcow2"), backing=str(top),
                              backing_fmt="qcow2"),
            steps.CreateImage(path=str(new / "second.qcow2")),
            steps.WriteFile(path=str(new / "config.json"), text='{"cpus": 1}')]


@pytest.mark.parametrize("kill_at", KILLS, ids=kill_id)
def test_a_prepare_intent_killed_at_any_step_is_rolled_back_by_recovery(
        tmp_path: Path, catalog: Catalog, images: FakeImages,
        committed: list[tuple[str, Params]], kill_at: tuple[int, str]) -> None:
    chain = Chain(tmp_path / "vm").make()
    before = files(chain.folder)
    images.kill_at = kill_at
    with pytest.raises(Killed):
        Journal(catalog).run(VM, CreateParams(), create_steps(chain.folder, chain.top))
    (intent,) = Journal(catalog).pending(VM)

    images.kill_at = None
    recover(catalog)

    # a prepare intent records no progress between its steps: its rollback undoes them all
    assert status(catalog, intent.id) == ("rolled_back", 0)
    assert Journal(catalog).intent(intent.id).error == "interrupted before it committed"
    assert sorted(p.name for p in chain.folder.iterdir()) == sorted(before)  # no "new" folder
    assert files(chain.folder) == before and committed == []


def test_a_prepare_intent_writes_the_catalog_twice_whatever_its_steps(
        tmp_path: Path, catalog: Catalog, images: FakeImages,
        committed: list[tuple[str, Params]]) -> None:
    """Written before any file is made, committed after the last: no fsynced transaction
    between its steps (a finish intent records each one, see the merge tests above)."""
    chain = Chain(tmp_path / "vm").make()
    statements: list[str] = []
    event.listen(catalog.engine, "before_cursor_execute",
                 lambda _conn, _cursor, statement, *_rest: statements.append(statement))
    intent_id = Journal(catalog).run(VM, CreateParams(name="n"),
                                     create_steps(chain.folder, chain.top))
    writes = [s.split()[:3] for s in statements if not s.startswith(("SELECT", "PRAGMA"))]
    assert writes == [["INSERT", "INTO", "intents"], ["UPDATE", "intents", "SET"]]
    assert status(catalog, intent_id) == ("committed", 4)


def test_a_prepare_intent_commits_after_its_last_step(
        tmp_path: Path, catalog: Catalog, images: FakeImages,
        committed: list[tuple[str, Params]]) -> None:
    chain = Chain(tmp_path / "vm").make()
    intent_id = Journal(catalog).run(VM, CreateParams(name="n"),
                                     create_steps(chain.folder, chain.top))
    assert images.calls == [("create", "next.qcow2"), ("create", "second.qcow2")]
    assert status(catalog, intent_id) == ("committed", 4)
    assert committed == [("test_create", CreateParams(name="n"))]
    assert read(chain.folder / "new" / "next.qcow2")["backing"] == str(chain.top)
    assert (chain.folder / "new" / "config.json").read_text() == '{"cpus": 1}'


def test_a_failed_step_undoes_a_prepare_intent_and_nothing_changed(
        tmp_path: Path, catalog: Catalog, images: FakeImages,
        committed: list[tuple[str, Params]]) -> None:
    chain = Chain(tmp_path / "vm").make()
    before = files(chain.folder)
    images.fail_at = 1
    with pytest.raises(ImageError):
        Journal(catalog).run(VM, CreateParams(), create_steps(chain.folder, chain.top))
    assert not (chain.folder / "new").exists() and files(chain.folder) == before
    assert Journal(catalog).pending() == [] and committed == []


def test_a_prepare_intent_may_only_make_new_files(
        tmp_path: Path, catalog: Catalog, images: FakeImages) -> None:
    chain = Chain(tmp_path / "vm").make()
    with pytest.raises(ValueError, match="may only make new files"):
        Journal(catalog).run(VM, CreateParams(), chain.merge_steps())
    assert Journal(catalog).pending() == [] and images.calls == []
    assert chain.middle.exists()


# --- a live intent: the resolver decides -------------------------------------------------------

@pytest.mark.parametrize("took_effect", [True, False])
def test_a_live_intent_whose_body_fails_is_settled_by_its_resolver(
        tmp_path: Path, catalog: Catalog, images: FakeImages,
        committed: list[tuple[str, Params]], took_effect: bool) -> None:
    chain = Chain(tmp_path / "vm").make()
    asked: list[LiveParams] = []

    def resolve(params: LiveParams) -> LiveParams | None:
        asked.append(params)
        return msgspec.structs.replace(params, switched=True) if took_effect else None

    journal.register(journal.intent_kind(LiveParams, journal.kind_of("test_live").commit,
                                         resolve))
    steps = create_steps(chain.folder, chain.top)
    started: list[int] = []
    with pytest.raises(ImageError), \
            Journal(catalog).prepared(VM, LiveParams(vm=VM), steps) as live:
        started.append(live.intent_id)
        live.params = msgspec.structs.replace(live.params, amended=1)
        live.save()
        raise ImageError("QEMU did not answer")
    assert asked == [LiveParams(vm=VM, amended=1)]  # what the body saved
    intent = Journal(catalog).intent(started[0])
    if took_effect:
        assert intent.status == "committed"
        assert committed == [("test_live", LiveParams(vm=VM, amended=1, switched=True))]
        assert (chain.folder / "new" / "next.qcow2").exists()
    else:
        assert intent.status == "rolled_back" and committed == []
        assert not (chain.folder / "new").exists()


def test_a_live_intent_needs_a_resolver(tmp_path: Path, catalog: Catalog, images: FakeImages,
                                        committed: list[tuple[str, Params]]) -> None:
    chain = Chain(tmp_path / "vm").make()
    journal.register(journal.intent_kind(NoResolver, journal.kind_of(KIND).commit))
    with pytest.raises(ValueError, match="needs a resolver"), \
            Journal(catalog).prepared(VM, NoResolver(), create_steps(chain.folder,
                                                                          chain.top)):
        pass
    assert Journal(catalog).pending() == [] and images.calls == []


# --- kinds and steps nobody handles -----------------------------------------------------------

def test_an_unknown_step_is_refused_naming_it(images: FakeImages) -> None:
    with pytest.raises(UnknownKind, match=r"no step 'teleport'"):
        executor.run(steps.from_json({"op": "teleport", "path": "/nowhere"}))
    assert images.calls == []


def test_an_intent_whose_kind_has_no_handler_is_an_error_not_a_silent_commit(
        tmp_path: Path, catalog: Catalog, images: FakeImages,
        committed: list[tuple[str, Params]]) -> None:
    chain = Chain(tmp_path / "vm").make()
    with pytest.raises(UnknownKind, match="no_such_kind"):
        Journal(catalog).run(VM, NoSuchKind(), create_steps(chain.folder, chain.top))
    with catalog.session() as session:
        statuses = set(session.scalars(select(Intent.status)))
    assert "committed" not in statuses and committed == []


# --- steps as the catalog stores them ----------------------------------------------------------

def test_a_pending_intent_an_earlier_waymark_wrote_as_plain_dicts_is_finished(
        tmp_path: Path, catalog: Catalog, images: FakeImages,
        committed: list[tuple[str, Params]]) -> None:
    """The steps column holds the dicts the code wrote before steps were typed: recovery reads
    them as steps and finishes the merge."""
    chain = Chain(tmp_path / "vm").make()
    written = [{"op": "commit", "top": str(chain.middle), "base": str(chain.base),
                "abandonable": True},
               {"op": "rebase", "path": str(chain.top), "backing": str(chain.base),
                "backing_fmt": "qcow2", "unsafe": True},
               {"op": "delete_file", "path": str(chain.middle)}]
    with catalog.session() as session:
        row = Intent(vm_id=VM, kind=KIND, params={"checkpoint": "middle"}, steps=written,
                     next_step=1, shape="finish", status="pending", created_at=journal.now(),
                     updated_at=journal.now())
        session.add(row)
        session.flush()
        intent_id = row.id
    assert journal.steps_of(Journal(catalog).intent(intent_id))[0] == steps.Commit(
        top=str(chain.middle), base=str(chain.base), abandonable=True)
    recover(catalog)
    assert status(catalog, intent_id) == ("committed", 3)
    assert images.calls == [("rebase", "top.qcow2")]  # from next_step on
    assert not chain.middle.exists() and read(chain.top)["backing"] == str(chain.base)


def test_a_pending_intent_with_a_malformed_step_stays_pending_and_says_why(
        tmp_path: Path, catalog: Catalog, images: FakeImages,
        committed: list[tuple[str, Params]]) -> None:
    chain = Chain(tmp_path / "vm").make()
    intent_id = start_merge(catalog, chain)
    with catalog.session() as session:
        session.get_one(Intent, intent_id).steps = [{"op": "commit", "top": str(chain.middle)}]
    with pytest.raises(MalformedRecord, match="commit step has no 'base'"):
        recover(catalog)
    assert status(catalog, intent_id) == ("pending", 0)
    assert images.calls == [] and committed == [] and chain.middle.exists()


def test_the_catalog_holds_the_steps_json_form(
        tmp_path: Path, catalog: Catalog, committed: list[tuple[str, Params]]) -> None:
    chain = Chain(tmp_path / "vm").make()
    intent_id = start_merge(catalog, chain)
    stored = Journal(catalog).intent(intent_id).steps
    assert stored == [step.to_json() for step in chain.merge_steps()]
    assert stored[0] == {"op": "commit", "top": str(chain.middle), "base": str(chain.base),
                         "abandonable": False}

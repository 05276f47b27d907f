"""The intent journal: write what you will do, do it step by step, then commit.

An intent is a row of ``intents``: a kind, its parameters, a list of file steps
(:mod:`waymark.engine.steps`, run by :mod:`waymark.engine.executor`) and ``next_step``. The row
holds the steps' JSON form; the journal converts at that boundary only (:func:`add` writes
them, :func:`steps_of` reads them back, checked), everything else handles step objects.
Its ``shape`` says which of two kinds it is:

- *prepare, then commit* (checkpoint create, apply, VM create): every step makes a new file
  nobody references yet; the catalog change is the kind's commit handler, run in the same
  transaction that marks the intent committed. A failure undoes the new files: nothing changed.
- *commit, then finish* (compaction, VM delete): the catalog change is made in the transaction
  that writes the intent; the steps then only remove or merge files nothing needs any more, and
  a failure leaves the intent pending, to be finished by the next command.

The process may be killed at any point. Recovery (the next command) rolls a *prepare* intent
back — an operation that did not commit did not happen — and drives any other intent from
``next_step`` to its end (its steps are idempotent).

An intent's parameters are an object of its kind's class (:class:`waymark.engine.params.Params`,
whose ``kind`` names the kind): :func:`add` and :meth:`Journal.run` take them and write their
JSON form, :func:`params_of` reads them back for the commit handler and the resolver. Every
kind is registered by the composition root (:mod:`waymark.wiring`, :func:`register`, each with
its parameters' class: :func:`intent_kind`); writing or committing an intent of an unknown kind
raises :class:`~waymark.errors.UnknownKind`.

A *live* prepare intent (:meth:`Journal.prepared`) has a part outside the files: after its
steps, QEMU is told to use the new files (a live checkpoint's disk switch). Once QEMU writes
to them, rolling back would lose data, so such a kind is registered with a resolver that asks
QEMU what happened and either amends the parameters to commit (forward) or says roll back.

``WAYMARK_FAILPOINT=N`` (tests only: with ``WAYMARK_TEST_SUITE=1``) SIGKILLs this process just
before the N-th journal point (each step and each commit is one point, counted from 0 across the
whole command, and so is each stage of a live part); see :func:`failpoint`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from waymark.catalog.db import Catalog
from waymark.catalog.models import Intent
from waymark.engine import executor
from waymark.engine import steps as journal_steps
from waymark.engine.kinds import Kinds
from waymark.engine.params import Params
from waymark.errors import Cancelled, StorageError, UnknownKind, WaymarkError
from waymark.failpoints import failpoint
from waymark.images import qemu_img

log = logging.getLogger(__name__)

P = TypeVar("P", bound=Params)
# Progress of a multi-step intent: (step number from 1, steps, the step, fraction of that step)
StepReport = Callable[[int, int, journal_steps.Step, float], None]


@dataclass(frozen=True)
class Kind(Generic[P]):
    """What the journal knows about an intent kind: its parameters' class (whose ``kind`` is
    the kind's name), the catalog change that commits it (None: a kind whose catalog change was
    made when it was written, *commit, then finish*) and, for a *live* kind, how recovery
    settles it: ``resolve`` returns the parameters to commit with, or None to roll back."""

    params: type[P]
    commit: Callable[[Session, P], None] | None = None
    resolve: Callable[[P], P | None] | None = None


def intent_kind(params: type[P], commit: Callable[[Session, P], None] | None = None,
                resolve: Callable[[P], P | None] | None = None) -> Kind[Any]:
    """An intent kind for :func:`register`, its handlers checked against its parameters' class
    (a handler of another kind's parameters is a type error)."""
    return Kind(params, commit, resolve)


KindLoader = Callable[[], Kind[Any]]
_KINDS: Kinds[KindLoader] = Kinds("the journal has no handler for intents of kind {kind}.")


def register(kind: Kind[Any]) -> None:
    """Make an intent kind known. Called by the composition root (:mod:`waymark.wiring`)
    only."""
    _KINDS.register(kind.params.kind, lambda: kind)


def register_deferred(name: str, load: KindLoader) -> None:
    """Make the intent kind ``name`` known now; ``load`` gives its :class:`Kind` when an intent
    of it is first written, read back or settled. The composition root registers a use case's
    kind so, and imports the use case only then: a command that writes none (a listing) never
    loads it."""
    _KINDS.register(name, load)


def kinds() -> frozenset[str]:
    """Every registered intent kind."""
    return _KINDS.names()


def kind_of(kind: str) -> Kind[Any]:
    """The registration of ``kind``; an unknown kind is an error, never a silent commit."""
    found = _KINDS.of(kind)()
    if found.params.kind != kind:
        raise UnknownKind(f"the journal's kind {kind!r} was registered with the parameters of "
                          f"{found.params.kind!r}.", hint="This is a bug: report it.")
    return found


def params_of(intent: Intent) -> Params:
    """The intent's parameters, read back from the catalog's JSON as its kind's class (an
    unknown kind: :class:`~waymark.errors.UnknownKind`; malformed: ``MalformedRecord``)."""
    params: Params = kind_of(intent.kind).params.from_json(intent.params)
    return params


BeforeIntent = Callable[["Journal", str, Params], None]
# Called before :meth:`Journal.run` writes an intent (the journal, the VM's id, its parameters):
# the composition root adds consolidation's unlink here (waymark.engine.consolidation), so
# every operation that changes a VM's images finds its active images on their real parents.
BEFORE_INTENT: list[BeforeIntent] = []


def now() -> datetime:
    return datetime.now(UTC)


def add(session: Session, vm_id: str, params: Params,
        steps: Sequence[journal_steps.StepBase], shape: str = "finish") -> Intent:
    """Write an intent of the parameters' kind in the caller's transaction (by default *commit,
    then finish*); its kind must be registered."""
    kind_of(params.kind)
    intent = Intent(vm_id=vm_id, kind=params.kind, params=params.to_json(),
                    steps=journal_steps.to_json_list(steps), next_step=0,
                    shape=shape, status="pending", created_at=now(), updated_at=now())
    session.add(intent)
    session.flush()
    return intent


def steps_of(intent: Intent) -> list[journal_steps.Step]:
    """The intent's steps, read back from the catalog's JSON (checked: see
    :func:`waymark.engine.steps.from_json`)."""
    return journal_steps.from_json_list(intent.steps)


def _abandonable(step: journal_steps.Step) -> bool:
    return isinstance(step, journal_steps.ABANDONABLE) and step.abandonable


def _step_progress(report: StepReport | None, index: int, steps: list[journal_steps.Step]
                   ) -> qemu_img.Progress:
    if report is None:
        return None
    number, step = index + 1, steps[index]
    report(number, len(steps), step, 0.0)
    return lambda fraction: report(number, len(steps), step, fraction)


@dataclass
class LiveIntent(Generic[P]):
    """The body's handle on a live intent: its parameters, which it may amend (replace, or
    change a record they hold) and save."""

    journal: Journal
    intent_id: int
    params: P

    def save(self) -> None:
        self.journal.store_params(self.intent_id, self.params)


class Journal:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def run(self, vm_id: str, params: Params,
            steps: Sequence[journal_steps.Step], on_progress: qemu_img.Progress = None,
            shape: str = "prepare", commit: bool = True, report: StepReport | None = None
            ) -> int:
        """Journal an intent (by default *prepare, then commit*) and drive it to the end (or,
        without ``commit``, through its steps only). Progress goes to ``on_progress`` (each
        step's fraction) or ``report`` (which step, and its fraction)."""
        if shape == "prepare" and not all(step.undoable for step in steps):
            raise ValueError(f"{params.kind}: a prepare intent may only make new files")
        for hook in BEFORE_INTENT:
            hook(self, vm_id, params)
        try:
            with self.catalog.session() as session:
                intent_id = add(session, vm_id, params, steps, shape).id
        except SQLAlchemyError as err:
            raise StorageError(f"cannot write to the catalog: {err}") from err
        self.drive(intent_id, on_progress, commit, report)
        return intent_id

    def store_params(self, intent_id: int, params: Params) -> None:
        try:
            with self.catalog.session() as session:
                intent = session.get_one(Intent, intent_id)
                intent.params, intent.updated_at = params.to_json(), now()
        except SQLAlchemyError as err:
            raise StorageError(f"cannot write to the catalog: {err}") from err

    def intent(self, intent_id: int) -> Intent:
        with self.catalog.session() as session:
            return session.get_one(Intent, intent_id)

    @contextlib.contextmanager
    def prepared(self, vm_id: str, params: P,
                 steps: Sequence[journal_steps.Step]) -> Iterator[LiveIntent[P]]:
        """A *live* prepare intent: its file steps run, then the body does the live part and may
        amend the parameters (:meth:`LiveIntent.save` makes an amendment durable for
        recovery's resolver), then the intent commits with them.

        If the body fails, the intent is settled as recovery would settle it (the kind's
        resolver asks QEMU whether the live part took effect), then the error goes on.
        """
        if kind_of(params.kind).resolve is None:
            raise ValueError(f"{params.kind}: a live intent needs a resolver")
        intent_id = self.run(vm_id, params, steps, commit=False)
        self._advance(intent_id, len(steps))  # the live part may begin: resolve, not undo
        live = LiveIntent(self, intent_id, params)
        try:
            yield live
        except BaseException:
            try:
                self.finish(self.intent(intent_id))
            except WaymarkError as err:  # still pending: the next command settles it
                log.warning("could not settle live intent %s yet: %s", intent_id, err)
            raise
        failpoint("commit")
        self._commit(intent_id, live.params)

    def pending(self, vm_id: str | None = None) -> list[Intent]:
        with self.catalog.session() as session:
            query = select(Intent).where(Intent.status == "pending").order_by(Intent.id)
            if vm_id is not None:
                query = query.where(Intent.vm_id == vm_id)
            return list(session.scalars(query))

    def finish_pending(self, vm_id: str, *, skip: str) -> bool:
        """Finish (:meth:`finish`) the VM's pending intents in order, but those of kind
        ``skip`` (the compaction marker, which compaction clears); False when none was
        pending. The caller holds the VM's lock."""
        pending = self.pending(vm_id)
        for intent in pending:
            if intent.kind != skip:
                log.info("finishing %s (journal intent %s)", intent.kind, intent.id)
                self.finish(intent)
        return bool(pending)

    def drive(self, intent_id: int, on_progress: qemu_img.Progress = None,
              commit: bool = True, report: StepReport | None = None) -> None:
        """Run the intent's remaining steps, then its commit.

        A *commit, then finish* intent records each step done (``next_step``, one catalog
        transaction each), so recovery resumes after it. A *prepare* intent records none: its
        recovery undoes every step whatever ran (:meth:`roll_back`; a live one's resolver is
        asked only once :meth:`prepared` recorded them all), so its steps cost no transaction
        between the one that writes it and the one that commits it."""
        with self.catalog.session() as session:
            intent = session.get_one(Intent, intent_id)
            params, steps, done = params_of(intent), steps_of(intent), intent.next_step
            resumable = intent.shape != "prepare"
        index = done
        try:
            for index in range(done, len(steps)):
                failpoint(f"step:{steps[index].op}")
                executor.run(steps[index], _step_progress(report, index, steps) or on_progress)
                if resumable and index + 1 < len(steps):  # the commit records the last one
                    self._advance(intent_id, index + 1)
            if commit:
                failpoint("commit")
                self._commit(intent_id, params)
        except Cancelled as err:
            if index < len(steps) and _abandonable(steps[index]):
                self._close(intent_id, "cancelled", err.message)
            else:
                self._failed(intent_id, err)
            raise
        except WaymarkError as err:
            self._failed(intent_id, err)
            raise

    def _advance(self, intent_id: int, next_step: int) -> None:
        try:
            with self.catalog.session() as session:
                intent = session.get_one(Intent, intent_id)
                intent.next_step, intent.updated_at = next_step, now()
        except SQLAlchemyError as err:
            raise StorageError(f"cannot write to the catalog: {err}") from err

    def _commit(self, intent_id: int, params: Params) -> None:
        handler = kind_of(params.kind).commit
        try:
            with self.catalog.session() as session:
                if handler is not None:
                    handler(session, params)
                intent = session.get_one(Intent, intent_id)
                intent.status, intent.next_step, intent.updated_at = "committed", \
                    len(intent.steps), now()
        except SQLAlchemyError as err:
            raise StorageError(f"cannot write to the catalog: {err}") from err

    def _failed(self, intent_id: int, err: WaymarkError) -> None:
        """Undo a *prepare* intent's new files; leave any other intent pending for retry.

        The files go first: recording the failure may itself fail (a full disk), and then
        recovery rolls the intent back again (undo is idempotent).
        """
        with self.catalog.session() as session:
            intent = session.get_one(Intent, intent_id)
            kind, steps, shape = intent.kind, steps_of(intent), intent.shape
        if shape == "prepare":
            self.roll_back(intent_id, kind, steps, err.message)
            return
        with contextlib.suppress(StorageError), self.catalog.session() as session:
            intent = session.get_one(Intent, intent_id)
            intent.error, intent.updated_at = err.message, now()

    def roll_back(self, intent_id: int, kind: str, steps: list[journal_steps.Step],
                  reason: str) -> None:
        for step in reversed(steps):
            executor.undo(step)
        self._close(intent_id, "rolled_back", reason)
        log.info("rolled back intent %s (%s): %s", intent_id, kind, reason)

    def _close(self, intent_id: int, status: str, reason: str) -> None:
        """End an intent that will not commit: ``rolled_back``, or ``cancelled`` (stopped in an
        ``abandonable`` step, one whose partial work changes no content anyone reads)."""
        with self.catalog.session() as session:
            intent = session.get_one(Intent, intent_id)
            intent.status, intent.error, intent.updated_at = status, reason, now()

    def finish(self, intent: Intent) -> None:
        """Recovery of a dead command's intent: a *prepare* intent that did not commit did not
        happen (its new files are removed); any other intent is driven to its end."""
        resolve = kind_of(intent.kind).resolve
        if intent.shape == "prepare" and resolve is not None \
                and intent.next_step == len(intent.steps):
            amended = resolve(params_of(intent))
            if amended is not None:
                log.info("completing live intent %s (%s)", intent.id, intent.kind)
                self._commit(intent.id, amended)
                return
        if intent.shape == "prepare":
            self.roll_back(intent.id, intent.kind, steps_of(intent),
                           "interrupted before it committed")
        else:
            self.drive(intent.id)

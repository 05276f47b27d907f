"""The context every use case runs in: settings, catalog, journal, and the VM lock.

Opening a context and taking a VM's lock settle unfinished work (:mod:`waymark.engine.settle`);
those and the "who holds this VM" question are hooks the composition root (:mod:`waymark.wiring`)
installs with :func:`install`, so this foundation imports nothing above it. Opening a context
before the root installed them is an error: open one with :func:`waymark.wiring.open_context`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from waymark import modes
from waymark.catalog.db import Catalog
from waymark.catalog.reads import Reader
from waymark.config import Settings
from waymark.engine import locks, lookup
from waymark.engine.journal import Journal
from waymark.errors import Busy, StorageError, UnknownKind


@dataclass(frozen=True)
class Hooks:
    """What the composition root plugs into every context."""

    # on open: settle the unfinished work of every VM whose lock is free
    opened: Callable[[Context], None]
    # under a VM's freshly taken lock: settle that VM's unfinished work
    locked: Callable[[Context, str], None]
    # the job (id, kind, progress) whose live process holds the VM busy, if any
    holder: Callable[[Context, str], tuple[str, str, float] | None]
    # under the VM's lock, before a VM that is off boots (automatic checkpoints); a returned
    # text is a warning
    before_boot: Callable[[Context, str], str | None]
    # after a guest shut down cleanly (not a crash, not a forced power-off)
    after_clean_stop: Callable[[Context, str], None]
    # when a command that held a VM's lock ends well, the lock still held (consolidation's
    # background job, waymark.engine.consolidation.schedule)
    released: Callable[[Context, str], None] = lambda _ctx, _vm_id: None


_hooks: list[Hooks] = []


def install(hooks: Hooks) -> None:
    """Plug the composition root's hooks in (:mod:`waymark.wiring`; once per process)."""
    _hooks[:] = [hooks]


def installed() -> Hooks:
    """The composition root's hooks (an error when the engine was not wired)."""
    if not _hooks:
        raise UnknownKind("the engine was not wired: no settle hooks are installed.",
                          hint="Open the context with waymark.wiring.open_context (a bug).")
    return _hooks[0]


@dataclass
class Context:
    settings: Settings
    catalog: Catalog
    journal: Journal

    @classmethod
    def open(cls, settings: Settings) -> Context:
        """Open the home folder (created if missing) and finish what dead commands left."""
        hooks = installed()
        home = settings.home
        try:
            home.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StorageError(f"cannot create the Waymark home {home}: {err.strerror}.",
                               hint="Pick a writable folder with --home or WAYMARK_HOME.") from err
        modes.tighten(home)  # a home made before Waymark kept it owner-only
        if not os.access(home, os.W_OK | os.X_OK):
            raise StorageError(f"the Waymark home {home} is not writable.",
                               hint="Pick a writable folder with --home or WAYMARK_HOME.")
        catalog = Catalog.open(home)
        ctx = cls(settings, catalog, Journal(catalog))
        hooks.opened(ctx)
        return ctx

    @property
    def home(self) -> Path:
        return self.settings.home

    def reading(self) -> AbstractContextManager[Reader]:
        """A snapshot for the read path (a :class:`waymark.engine.reading.Source`)."""
        return self.catalog.reading()

    def vm_folder(self, vm_id: str) -> Path:
        return self.home / "vms" / vm_id

    def disk_folder(self, vm_id: str) -> Path:
        return self.vm_folder(vm_id) / "disks"

    def identify(self, vm_id: str) -> tuple[str, str]:
        """(id, name) of the VM with this id: use cases take ids, never a name (the faces
        resolve what a person typed once, :func:`waymark.engine.lookup.vm`)."""
        with self.catalog.session() as session:
            row = lookup.vm_by_id(session, vm_id)
            return row.id, row.name

    @contextmanager
    def locked(self, vm_id: str) -> Iterator[tuple[str, str]]:
        """Hold the lock of the VM with this id and finish its unfinished intents; yields
        (id, name)."""
        vm_id, name = self.identify(vm_id)
        with self.vm_locked(vm_id, name):
            yield vm_id, name

    @contextmanager
    def vm_locked(self, vm_id: str, vm_name: str, timeout: float | None = None
                  ) -> Iterator[None]:
        """Hold the VM's lock and finish its unfinished intents first. When it stays busy, the
        error names the job that holds it, if a job does."""
        with ExitStack() as stack:
            try:
                stack.enter_context(locks.held(
                    self.home, vm_id, label=f"VM {vm_name!r}",
                    timeout=self.settings.lock_timeout if timeout is None else timeout))
            except Busy as err:
                raise self._busy(vm_id, vm_name, err) from None
            installed().locked(self, vm_id)
            yield
            installed().released(self, vm_id)

    def settle(self, vm_id: str) -> None:
        """Finish the VM's unfinished work now (the caller holds its lock): what
        :meth:`vm_locked` does when it takes the lock."""
        installed().locked(self, vm_id)

    def _busy(self, vm_id: str, vm_name: str, err: Busy) -> Busy:
        job = installed().holder(self, vm_id)
        if job is None:
            return err
        job_id, kind, progress = job
        return Busy(f"VM {vm_name!r} is busy: job {job_id[:12]} ({kind}, "
                    f"{progress:.0%}) holds it.",
                    hint=f"Wait for it: waymark job wait {job_id[:12]} (or cancel it: "
                         f"waymark job cancel {job_id[:12]})")

"""The context every use case runs in: settings, catalog, journal, and the VM lock."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from waymark.catalog.db import Catalog
from waymark.config import Settings
from waymark.errors import StorageError
from waymark.ops import locks
from waymark.ops.journal import Journal


@dataclass
class Context:
    settings: Settings
    catalog: Catalog
    journal: Journal

    @classmethod
    def open(cls, settings: Settings) -> Context:
        """Open the home folder (created if missing) and finish what dead commands left."""
        home = settings.home
        try:
            home.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StorageError(f"cannot create the Waymark home {home}: {err.strerror}.",
                               hint="Pick a writable folder with --home or WAYMARK_HOME.") from err
        if not os.access(home, os.W_OK | os.X_OK):
            raise StorageError(f"the Waymark home {home} is not writable.",
                               hint="Pick a writable folder with --home or WAYMARK_HOME.")
        catalog = Catalog.open(home)
        ctx = cls(settings, catalog, Journal(catalog))
        from waymark.ops import recovery, registry

        registry.load()
        recovery.recover_all(ctx)
        return ctx

    @property
    def home(self) -> Path:
        return self.settings.home

    def vm_folder(self, vm_id: str) -> Path:
        return self.home / "vms" / vm_id

    def disk_folder(self, vm_id: str) -> Path:
        return self.vm_folder(vm_id) / "disks"

    def identify(self, vm_ref: str) -> tuple[str, str]:
        """(id, name) of the VM ``vm_ref`` names."""
        from waymark.ops import lookup

        with self.catalog.session() as session:
            row = lookup.vm(session, vm_ref)
            return row.id, row.name

    @contextmanager
    def locked(self, vm_ref: str) -> Iterator[tuple[str, str]]:
        """Resolve ``vm_ref``, hold its lock and finish its unfinished intents; yields
        (id, name)."""
        vm_id, name = self.identify(vm_ref)
        with self.vm_locked(vm_id, name):
            yield vm_id, name

    @contextmanager
    def vm_locked(self, vm_id: str, vm_name: str) -> Iterator[None]:
        """Hold the VM's lock and finish its unfinished intents first."""
        with locks.held(self.home, vm_id, timeout=self.settings.lock_timeout,
                        label=f"VM {vm_name!r}"):
            from waymark.ops import recovery

            recovery.recover_vm(self, vm_id)
            yield

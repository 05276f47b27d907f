"""Open the catalog: an engine, migrations to head, and sessions.

SQLite in WAL mode with a busy timeout is the default (``$WAYMARK_HOME/catalog.db``); the SQL is
kept portable so a URL can later point several hosts at one PostgreSQL catalog.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from waymark.errors import NotFound, StorageError

HEAD = "0017"
MIGRATIONS = Path(__file__).with_name("migrations")


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _nearly_full(folder: Path) -> bool:
    """Less than 1 MiB free for us: SQLite then fails with vaguer errors (disk I/O error)."""
    try:
        stats = os.statvfs(folder)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < (1 << 20)


class Catalog:
    """The catalog of one Waymark home."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.home: Path | None = None
        self.engine: Engine = create_engine(url)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @classmethod
    def open(cls, home: Path) -> Catalog:
        catalog = cls(f"sqlite:///{home / 'catalog.db'}")
        catalog.home = home
        try:
            catalog.migrate()
        except (OperationalError, sqlite3.Error) as err:
            if _nearly_full(home):
                raise StorageError(f"cannot open the catalog in {home}: its file system is full.",
                                   hint="Free space there, then run the command again.") from err
            raise StorageError(f"cannot open the catalog in {home}: {err}",
                               hint="Check that the folder is writable, or pick another "
                                    "--home.") from err
        return catalog

    def close(self) -> None:
        """Close the pooled connections (a process that opens many catalogs, such as the test
        suite running commands in-process, would otherwise keep their files open)."""
        self.engine.dispose()

    def revision(self) -> str | None:
        with self.engine.connect() as conn:
            if not inspect(conn).has_table("alembic_version"):
                return None
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()

    def migrate(self) -> None:
        """Bring the schema to head (a cheap revision read when it already is)."""
        if self.revision() == HEAD:
            return
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with self.engine.begin() as conn:
            # pysqlite runs DDL outside any transaction unless told BEGIN itself: without this,
            # a migration that fails halfway would leave half a schema behind
            dbapi = conn.connection.dbapi_connection
            if isinstance(dbapi, sqlite3.Connection):
                dbapi.isolation_level = None
                conn.exec_driver_sql("BEGIN IMMEDIATE")
                dbapi.isolation_level = ""
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    @contextmanager
    def snapshot(self) -> Iterator[Session]:
        """A session for reading only, whose reads all see one committed state. (pysqlite
        begins no transaction for SELECTs, so without this two reads of one view may see
        different commits: a disk whose new active image is not among the images read just
        before.) On SQLite an explicit deferred BEGIN: readers never wait for writers in WAL
        mode, and a reader never writes, so it never needs to upgrade its snapshot."""
        with self.session() as session:
            conn = session.connection()
            dbapi = conn.connection.dbapi_connection
            if isinstance(dbapi, sqlite3.Connection) and not dbapi.in_transaction:
                conn.exec_driver_sql("BEGIN")
            yield session

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction: committed on success, rolled back on any exception.

        Database failures (a full disk, a lock held too long) become StorageError.
        """
        try:
            with self._sessions.begin() as session:
                yield session
        except OperationalError as err:
            full = self.home is not None and _nearly_full(self.home)
            raise StorageError("the catalog could not be written: "
                               + ("its file system is full" if full else str(err.orig)),
                               hint="Free space on the file system of the Waymark home, then "
                                    "run the command again: an interrupted operation resumes "
                                    "where it stopped.") from err


Row = TypeVar("Row")


def required(session: Session, model: type[Row], key: Any, missing: str, hint: str) -> Row:
    """The row of ``model`` whose primary key is ``key``; :class:`NotFound` (``missing``, with
    ``hint``) when there is none."""
    row = session.get(model, key)
    if row is None:
        raise NotFound(missing, hint=hint)
    return row

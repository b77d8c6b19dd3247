"""The sandbox's SQLite file: one engine for writes (serialised) and one for reads (concurrent).

Writes begin with ``BEGIN IMMEDIATE`` so that search-then-insert (conditional create, transaction
Bundles) is atomic: two identical conditional creates can never both create. Reads use WAL's
snapshot isolation and never wait for a writer, so a dashboard's parallel page reads stay fast.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session

from fhir_bridge.sandbox.models import SandboxBase

# Bump when a table changes: an older data folder is then refused with a clear message.
SCHEMA_VERSION = 1


def _engine(path: Path, *, immediate: bool) -> Engine:
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 30, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


class SandboxDatabase:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with suppress(FileExistsError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        self.write_engine = _engine(path, immediate=True)
        self.read_engine = _engine(path, immediate=False)

    def create_all(self) -> None:
        """Create the tables in a new file; refuse, saying what to do, a file from another schema version.

        The sandbox has no migrations (it is not the product): its data is synthetic and re-creatable.
        """
        with self.write_engine.connect() as conn:
            found = conn.exec_driver_sql("PRAGMA user_version").scalar() or 0
            tables = conn.exec_driver_sql("SELECT count(*) FROM sqlite_master WHERE type = 'table'").scalar()
        if tables and found != SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.path} was made by another version of the sandbox (schema {found}, this one is "
                f"{SCHEMA_VERSION}); delete its data folder to start a fresh sandbox."
            )
        SandboxBase.metadata.create_all(self.write_engine)
        with self.write_engine.connect() as conn:
            conn.exec_driver_sql(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.commit()

    @contextmanager
    def write(self) -> Iterator[Session]:
        """One serialised transaction: committed on success, rolled back on any exception."""
        with Session(self.write_engine, expire_on_commit=False) as session, session.begin():
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A consistent snapshot for reading; never blocks on, or blocks, a writer."""
        with Session(self.read_engine, expire_on_commit=False) as session, session.begin():
            yield session

    def dispose(self) -> None:
        self.write_engine.dispose()
        self.read_engine.dispose()

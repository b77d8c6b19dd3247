"""Engine and sessions: the one place that knows how we talk to SQLite and PostgreSQL."""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

# Execution option for a connection that only reads (one statement): on SQLite it takes no write lock.
READ_ONLY = "fhir_bridge_read_only"


def make_engine(url: str, **kwargs: Any) -> Engine:
    """Create an engine with the settings each backend needs to be safe for us.

    SQLite: WAL (readers never block the writer), foreign keys on (off by default in SQLite), a
    busy timeout, and ``BEGIN IMMEDIATE`` so a transaction takes the write lock up front instead of
    failing with "database is locked" when it upgrades from reading to writing.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            _create_private_file(Path(parsed.database))
        # A pool, not a fresh connection per session: closing the last connection to a WAL database
        # checkpoints it (an fsync), which made every single-record push pay ~1.5 ms of CPU.
        engine = create_engine(
            url,
            connect_args={"timeout": 30, "check_same_thread": False},
            pool_size=5,
            max_overflow=10,
            **kwargs,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
            # Take over transaction control from the sqlite3 module (it would BEGIN lazily, deferred).
            dbapi_conn.isolation_level = None
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA synchronous=NORMAL")
            # Page cache of up to 8 MiB per connection (SQLite's default is 2 MiB): a batch push
            # inserts into random places of the UUID-keyed indexes, and with the default cache most
            # of those pages were read back from the file on every batch (outbox inserts of a
            # 1,000-record push: ~14 -> ~10 us CPU per row once the database outgrows 2 MiB; 16 and
            # 64 MiB gained nothing more, and each connection of the pool may hold this much).
            cursor.execute("PRAGMA cache_size=-8192")
            # Checkpoint the WAL every 8,000 pages (32 MiB with 4 KiB pages) instead of 1,000: a page
            # changed by several pushes between two checkpoints is copied back once, and the copying
            # was a sixth of a 1,000-record push's CPU (+~10 % records per CPU second, SQLite, 30
            # batches, alternated runs). Crash recovery replays at most that much WAL.
            cursor.execute("PRAGMA wal_autocheckpoint=8000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            if conn.get_execution_options().get(READ_ONLY):
                return  # one read in autocommit mode: no write lock, nothing to commit
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10, **kwargs)


def _create_private_file(path: Path) -> None:
    """Create the SQLite file readable by its owner only (it holds queued PHI); WAL files inherit this."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


class WriterLock:
    """One SQLite writer at a time across this machine's processes, handed over without sleeping.

    Why: SQLite already serialises writers, but a writer that finds the lock taken sleeps in
    SQLite's busy handler (1, 2, 5, 10 ... ms) and retries. Under concurrent single-record pushes
    (2 gunicorn workers x 4 threads) most of the wall time went to those sleeps: about 280 pushes/s
    with the cores half idle, and a p99 in the hundreds of milliseconds. Here the threads of a
    process queue on a lock and the processes on ``flock`` of a file beside the database, so the
    next writer starts the moment the previous one commits. Reentrant per thread (a nested
    ``transaction()`` takes nothing more; it would wait on SQLite's own lock as before).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._depth = 0
        self._fd = -1
        self._pid = 0

    def _file(self) -> int:
        # Per process: a descriptor inherited across fork shares its flock with the parent.
        if self._pid != os.getpid():
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._pid = os.getpid()
        return self._fd

    @contextmanager
    def hold(self) -> Iterator[None]:
        if self._pid != os.getpid() and self._pid:
            # A forked child: the parent's lock state (maybe held by a thread that is not here) is void.
            self._lock, self._depth = threading.RLock(), 0
        with self._lock:
            fd = self._file()
            if self._depth == 0:
                fcntl.flock(fd, fcntl.LOCK_EX)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    fcntl.flock(fd, fcntl.LOCK_UN)


class Database:
    """An engine plus a session factory. Built once per process by the app factory or the CLI."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        parsed = make_url(url)
        self._writer: WriterLock | None = None
        if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
            self._writer = WriterLock(Path(parsed.database + "-writer.lock"))

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session inside one transaction: committed on success, rolled back on any error.

        On SQLite every transaction writes (``BEGIN IMMEDIATE``), so it starts only once it holds
        the :class:`WriterLock`.
        """
        if self._writer is None:
            with self.sessions.begin() as session:
                yield session
            return
        with self._writer.hold(), self.sessions.begin() as session:
            yield session

    def dispose(self) -> None:
        self.engine.dispose()

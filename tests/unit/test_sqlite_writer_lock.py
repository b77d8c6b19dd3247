"""SQLite writers queue on the WriterLock (threads, processes), not in SQLite's sleeping busy handler."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

from sqlalchemy import text

from fhir_bridge.storage import Database
from fhir_bridge.storage.database import WriterLock

TRY_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
    print("held")
else:
    print("free")
"""


def other_process_sees(path: Path) -> str:
    done = subprocess.run([sys.executable, "-c", TRY_LOCK, str(path)], capture_output=True, text=True)
    return done.stdout.strip()


def test_a_transaction_holds_the_lock_for_other_processes_and_threads(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'w.db'}")
    lock_file = tmp_path / "w.db-writer.lock"
    entered = threading.Event()
    order: list[str] = []

    def second_writer() -> None:
        entered.set()
        with db.transaction() as session:
            session.execute(text("SELECT 1"))
            order.append("second")

    with db.transaction() as session:
        session.execute(text("CREATE TABLE t (x INTEGER)"))
        assert other_process_sees(lock_file) == "held"
        thread = threading.Thread(target=second_writer)
        thread.start()
        entered.wait(5)
        thread.join(0.3)
        assert thread.is_alive()  # waits on the lock, not on SQLite
        order.append("first")
    thread.join(10)
    assert order == ["first", "second"]
    assert other_process_sees(lock_file) == "free"
    db.dispose()


def test_the_lock_is_reentrant_within_a_thread(tmp_path: Path) -> None:
    lock = WriterLock(tmp_path / "x.lock")
    with lock.hold():
        with lock.hold():
            assert other_process_sees(tmp_path / "x.lock") == "held"
        assert other_process_sees(tmp_path / "x.lock") == "held"
    assert other_process_sees(tmp_path / "x.lock") == "free"


def test_postgresql_has_no_writer_lock() -> None:
    db = Database("postgresql+psycopg://nobody@127.0.0.1:1/none")  # never connects
    assert db._writer is None
    db.dispose()

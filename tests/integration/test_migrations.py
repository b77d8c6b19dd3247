"""Every migration runs up and down on SQLite and PostgreSQL, and the models agree with the schema."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.exc import DBAPIError

from fhir_bridge.storage import Base, Database, migrate


def test_every_migration_up_and_down(database_url: str) -> None:
    db = Database(database_url)
    try:
        revisions = migrate.revisions()
        for revision in revisions:
            migrate.upgrade(db, revision)
            assert migrate.current_revision(db) == revision
        migrate.upgrade(db)  # idempotent at head
        assert migrate.is_current(db)
        for revision in reversed(revisions[:-1]):
            migrate.downgrade(db, revision)
            assert migrate.current_revision(db) == revision
        migrate.downgrade(db, "base")
        assert set(inspect(db.engine).get_table_names()) <= {"alembic_version"}
        migrate.upgrade(db)
        assert migrate.is_current(db)
    finally:
        db.dispose()


def test_models_match_the_migrated_schema(database_url: str) -> None:
    db = Database(database_url)
    try:
        migrate.upgrade(db)
        with db.engine.connect() as conn:
            diff = compare_metadata(
                MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata
            )
        assert diff == []
    finally:
        db.dispose()


def test_audit_log_is_append_only(database_url: str) -> None:
    db = Database(database_url)
    try:
        migrate.upgrade(db)
        with db.engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO audit_log"
                    " (at, actor_type, actor_id, action, outcome, detail, prev_hash, hash)"
                    " VALUES (CURRENT_TIMESTAMP, 'system', 'test', 'test', 'success', '{}', '0', 'h1')"
                )
            )
        for statement in ("UPDATE audit_log SET action = 'changed'", "DELETE FROM audit_log"):
            with pytest.raises(DBAPIError, match="append-only"), db.engine.begin() as conn:
                conn.execute(text(statement))
        with db.engine.connect() as conn:
            assert conn.execute(text("SELECT action FROM audit_log")).scalar_one() == "test"
    finally:
        db.dispose()


def test_sqlite_runs_in_wal_with_foreign_keys(sqlite_url: str) -> None:
    db = Database(sqlite_url)
    try:
        with db.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        db.dispose()

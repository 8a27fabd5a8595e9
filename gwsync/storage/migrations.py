"""Schema versions: each database is made and upgraded by one ordered list of migrations.

A database records the version of its schema in PRAGMA user_version (0 for a new file). On open,
`upgrade` runs, in order and in ONE transaction, every step whose version is above the recorded
one, then records the last step's version:
  1. read the version; at the latest, done (the usual case costs one PRAGMA);
  2. newer than the code knows: StoreError, the file untouched;
  3. switch foreign keys off (SQLite ignores this inside a transaction; rebuilding a table needs it);
  4. BEGIN IMMEDIATE, read the version again: a second process that found the same old version
     waits here, then finds the work done and does nothing;
  5. the steps, then user_version, then COMMIT. An exception or a crash before COMMIT leaves the
     database at its old version, untouched; the next start runs the steps again.

A new database runs every step from the first, so a schema comes to be in one way only. Several
steps may share a version: they were added before versions were recorded, so a database at the
version before them may hold any of their results, and these steps check what is there.

PostgreSQL databases keep their versions in a table and upgrade under an advisory lock
(gwsync/storage/database.py, pg_upgrade).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from ..errors import StoreError
from .sqlite import transaction


@dataclass(frozen=True)
class Migration:
    version: int  # the schema version the database has once this step (and those before it) ran
    description: str
    apply: Callable[[sqlite_utils.Database], None]
    # The same step on PostgreSQL (a SQLAlchemy Connection in the upgrade's transaction); needed
    # by every step above the version a store's PostgreSQL databases are first made at.
    postgres: Callable[[Any], None] | None = None


def postgres_steps(migrations: Sequence[Migration], first: int) -> list[tuple[int, Callable[[Any], None]]]:
    """The PostgreSQL steps of the migrations after `first`, the version a new PostgreSQL
    database is made at (the steps up to it are SQLite's history). Each later migration must
    have one: a missing step is a programming error, found at the first open."""
    steps = []
    for migration in migrations:
        if migration.version > first:
            if migration.postgres is None:
                raise RuntimeError(f"migration {migration.description!r} has no PostgreSQL step")
            steps.append((migration.version, migration.postgres))
    return steps


def schema_version(conn: sqlite3.Connection) -> int:
    return conn.execute("PRAGMA user_version").fetchone()[0]


def latest(migrations: Sequence[Migration]) -> int:
    return migrations[-1].version


def upgrade(db: sqlite_utils.Database, migrations: Sequence[Migration]) -> int:
    """Bring the database to the last migration's version; returns that version."""
    versions = [m.version for m in migrations]
    if versions != sorted(versions):
        raise ValueError(f"migrations out of order: {versions}")
    conn, target = db.conn, latest(migrations)
    found = schema_version(conn)
    _refuse_newer(conn, found, target)
    if found == target:
        return target
    conn.execute("PRAGMA foreign_keys=OFF")
    try:
        with transaction(conn):
            found = schema_version(conn)  # again, under the write lock
            _refuse_newer(conn, found, target)
            for migration in migrations:
                if migration.version > found:
                    migration.apply(db)
            if found < target:
                conn.execute(f"PRAGMA user_version = {int(target)}")
    finally:
        conn.execute("PRAGMA foreign_keys=ON")
    return target


def _refuse_newer(conn: sqlite3.Connection, found: int, known: int) -> None:
    """Exit 1, not 2: the config and the command are right, the installed gwsync is too old."""
    if found > known:
        path: Path = getattr(conn, "path", Path("database"))  # the files of open_private_db know theirs
        what: str = getattr(conn, "what", "database")
        raise StoreError(f"the {what} {path} was written by a newer gwsync (schema {found}, this one knows "
                         f"{known}): upgrade gwsync", path)


def add_column(db: sqlite_utils.Database, table: str, column: str, kind: type) -> None:
    """For the steps from before versions were recorded: the column may be there already."""
    if column not in db.table(table).columns_dict:
        db.table(table).add_column(column, kind)

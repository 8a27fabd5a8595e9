"""Opening SQLite databases safely: owner-only files, WAL, explicit transactions.

Every connection opened here translates the errors that the environment causes (disk full,
read-only, locked, corrupt, not a database) into StoreError naming the file, on every
statement and every row fetched, so that no caller needs its own try/except for them.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast

from ..errors import StoreError, database_fault, file_fault

# How long a statement waits for another program's lock before giving up with one line.
LOCK_TIMEOUT = 30.0


def ensure_private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)


class _Cursor(sqlite3.Cursor):
    """A cursor whose environment errors are StoreErrors naming the database."""

    def _fault(self, exc: sqlite3.Error) -> BaseException:
        return cast(_Connection, self.connection).fault(exc)  # _Connection makes its cursors of this class

    def execute(self, *args):
        try:
            return super().execute(*args)
        except sqlite3.Error as exc:
            raise self._fault(exc) from exc

    def executemany(self, *args):
        try:
            return super().executemany(*args)
        except sqlite3.Error as exc:
            raise self._fault(exc) from exc

    def executescript(self, *args):
        try:
            return super().executescript(*args)
        except sqlite3.Error as exc:
            raise self._fault(exc) from exc

    def fetchone(self):
        try:
            return super().fetchone()
        except sqlite3.Error as exc:
            raise self._fault(exc) from exc

    def fetchmany(self, *args):
        try:
            return super().fetchmany(*args)
        except sqlite3.Error as exc:
            raise self._fault(exc) from exc

    def fetchall(self):
        try:
            return super().fetchall()
        except sqlite3.Error as exc:
            raise self._fault(exc) from exc

    def __next__(self):
        try:
            return super().__next__()
        except sqlite3.Error as exc:
            raise self._fault(exc) from exc


class _Connection(sqlite3.Connection):
    """Knows its file and what it is ("CRM database"), for the messages of its errors."""

    path: Path
    what: str

    def cursor(self, factory=_Cursor):
        return super().cursor(factory)

    # Connection.execute would make a plain cursor: these make a translating one.
    def execute(self, *args):
        return self.cursor().execute(*args)

    def executemany(self, *args):
        return self.cursor().executemany(*args)

    def executescript(self, *args):
        return self.cursor().executescript(*args)

    def fault(self, exc: sqlite3.Error) -> BaseException:
        return database_fault(exc, self.path, self.what) or exc


def open_private_db(path: Path, what: str = "database") -> sqlite3.Connection:
    """Open (creating owner-only, 0600) a SQLite file in autocommit mode with WAL journaling.

    SQLite gives its -wal and -shm files the permissions of the database file, so creating the
    main file 0600 first keeps all three private. `what` names the file in error messages.
    """
    try:
        ensure_private_dir(path.parent)
        if not path.exists():
            fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)
    except OSError as exc:
        raise (file_fault(exc, path, what) or exc) from exc
    try:
        conn = sqlite3.connect(path, isolation_level=None, timeout=LOCK_TIMEOUT, check_same_thread=False,
                               factory=_Connection)
    except sqlite3.Error as exc:
        raise (database_fault(exc, path, what) or exc) from exc
    conn.path, conn.what = path, what
    try:
        _use_wal(conn)
        # FULL: a commit survives power loss too; mail is moved to the archive only after it.
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
    except BaseException:
        conn.close()
        raise
    return conn


def _use_wal(conn: sqlite3.Connection) -> None:
    """Switch a file in rollback mode (new, or a restored backup) to WAL; WAL files stay so.

    Of two processes converting a file at once, the loser gets "database is locked" at once,
    not after the busy timeout (its shared lock would deadlock with the winner's): it tries
    again, as a busy statement would wait."""
    deadline = time.monotonic() + LOCK_TIMEOUT
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except StoreError as exc:
            if not exc.transient or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        # SQLite may have rolled back already (disk full, I/O error); and a failing ROLLBACK
        # must not hide the error that says what happened.
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except (sqlite3.Error, StoreError):
                pass
        raise

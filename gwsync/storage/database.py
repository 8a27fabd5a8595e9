"""Where the stores keep their tables: an embedded SQLite file, or one shared PostgreSQL.

Both are reached through SQLAlchemy Core engines made here, so that the stores build each
statement once and SQLAlchemy compiles it for either (psycopg 3 is the PostgreSQL driver):

- `sqlite_engine(path, what)`: connections come from `open_private_db` (an owner-only file in
  WAL mode whose environment errors are one-line StoreErrors naming the file);
- `postgres_engine(url, what, password)`: the URL as libpq reads it
  (`postgresql://USER@HOST:PORT/DB`, also `?host=/socket/dir`); a password from the config's
  password source, else the URL's, libpq's PGPASSWORD or ~/.pgpass. Refused connections, a
  server gone away, a full disk there: one-line StoreErrors naming the URL (without password).

Both engines run in autocommit; a store's writes are explicit transactions (`write`): BEGIN
IMMEDIATE on SQLite (the read and the write of a step are one, and a second process waits its
turn), BEGIN on PostgreSQL, where the statements that need it lock rows (SELECT ... FOR UPDATE)
or let the database decide (INSERT ... ON CONFLICT DO NOTHING). Reads take a connection kept
per thread (`Readers`), or a pooled one (`read`).

The fence (`fencing`): while a run holds an account's lock on PostgreSQL, every write
transaction of that run (of this thread) first calls the lock's fence with its connection,
right after BEGIN: it checks, under a row lock held until COMMIT, that no other run took the
account since (gwsync.accountlock), and refuses the whole transaction otherwise. A fenced
transaction that fails after the run lost the lock (the server ended its session: idle past
[database] lock_timeout, or ended by the next holder) raises the fence's error, not the server's.

Schema versions on PostgreSQL (`pg_upgrade`): table `gwsync_schema` holds one row per store;
the upgrade runs in one transaction under an advisory lock, so of two processes starting at
once one upgrades and the other finds it done. DDL is transactional there: a crash leaves the
old version whole.
"""

from __future__ import annotations

import json
import threading
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

import sqlalchemy as sa
from sqlalchemy.pool import QueuePool

from ..errors import ConfigError, StoreError

SCHEMES = ("postgresql", "postgres")
AGAIN = "then run gwsync again"


def check_url(url: str, where: str = "[database] url") -> str:
    """The URL if it names a PostgreSQL database; else a one-line ConfigError."""
    scheme = urlsplit(url).scheme if "://" in url else ""
    if scheme not in SCHEMES:
        raise ConfigError(f"{where} must be a postgresql:// URL (postgresql://USER@HOST:PORT/DATABASE), "
                          f"got {shown(url)!r}")
    parts = urlsplit(url)
    if not parts.path.strip("/"):
        raise ConfigError(f"{where} names no database: write postgresql://USER@HOST:PORT/DATABASE")
    return url


def shown(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False)


# -- SQLite -----------------------------------------------------------------------------------------

def sqlite_engine(path: Path, what: str, functions: dict[str, Callable] | None = None) -> sa.Engine:
    """An engine whose connections are `open_private_db(path, what)`, in autocommit.

    A small pool: each thread (the web view's) gets its own connection; in WAL mode readers never
    wait for the writer."""
    from .sqlite import open_private_db

    def connect():
        conn = open_private_db(path, what)
        for name, function in (functions or {}).items():
            conn.create_function(name, 1, function, deterministic=True)
        return conn

    return sa.create_engine("sqlite://", creator=connect, poolclass=QueuePool, pool_size=4, max_overflow=16,
                            isolation_level="AUTOCOMMIT", json_serializer=_json)


# -- PostgreSQL -------------------------------------------------------------------------------------

def postgres_engine(url: str, what: str, password: Callable[[], str | None] | None = None) -> sa.Engine:
    """An engine on the PostgreSQL database at `url` (libpq's form), in autocommit.

    `password` is called at each new connection (a password command runs then, not at startup);
    None, or it returning None, leaves the password to the URL, PGPASSWORD or ~/.pgpass."""
    import psycopg

    check_url(url)
    label = shown(url)

    def connect():
        from . import sqlite as files  # read at each connection: the tests shorten it

        secret = password() if password else None
        try:
            if secret is None:  # libpq finds it: the URL, PGPASSWORD, ~/.pgpass
                conn = psycopg.connect(url, autocommit=True)
            else:
                conn = psycopg.connect(url, autocommit=True, password=secret)
            # A table another program locked (LOCK TABLE, a long ALTER TABLE) is waited for as
            # long as an SQLite file's lock, then LockNotAvailable, not for ever.
            conn.execute("SELECT set_config('lock_timeout', %s, false)", (f"{round(files.LOCK_TIMEOUT * 1000)}ms",))
            return conn
        except psycopg.OperationalError as exc:
            raise unreachable(what, label, exc) from exc
        except psycopg.ProgrammingError as exc:  # a malformed URL (an unknown parameter, a bad port)
            raise StoreError(f"the {what} {label} cannot be used: {_first_line(exc)}: fix [database] url",
                             Path(label), exit_code=2) from exc

    engine = sa.create_engine("postgresql+psycopg://", creator=connect, poolclass=QueuePool, pool_size=4,
                              max_overflow=16, pool_pre_ping=True, isolation_level="AUTOCOMMIT",
                              json_serializer=_json)

    @sa.event.listens_for(engine, "handle_error")
    def _translate(context: sa.engine.ExceptionContext) -> None:
        exc = context.original_exception
        if isinstance(exc, psycopg.OperationalError):
            raise unreachable(what, label, exc) from exc
        if isinstance(exc, psycopg.errors.ReadOnlySqlTransaction):  # a standby, or set read-only
            raise read_only(what, label, exc) from exc

    return engine


def read_only(what: str, label: str, exc: BaseException) -> StoreError:
    """A database that takes no writes (a standby server, default_transaction_read_only)."""
    return StoreError(f"the {what} {label} is read-only ({_first_line(exc)}): point [database] url at "
                      f"a server and database that take writes, {AGAIN}", Path(label))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def unreachable(what: str, label: str, exc: BaseException) -> StoreError:
    """The server refused us, went away, or failed (disk full, shut down): the environment's fault.
    A refused password is a config matter (exit 2); the rest may pass (transient)."""
    import psycopg

    detail = _first_line(exc)
    sqlstate = getattr(exc, "sqlstate", None) or ""
    if "password authentication failed" in detail or sqlstate == "28P01" or "no password supplied" in detail:
        return StoreError(f"the {what} {label} refused the login ({detail}): check the [database] password "
                          "source, PGPASSWORD or ~/.pgpass", Path(label), exit_code=2)
    if sqlstate == "53100":
        return StoreError(f"disk full on the server of the {what} {label}: free space there, {AGAIN}", Path(label))
    if isinstance(exc, psycopg.errors.LockNotAvailable):
        return StoreError(f"the {what} {label} is locked by another program ({detail}): wait until it is done, "
                          f"{AGAIN}", Path(label), transient=True)
    return StoreError(f"cannot use the {what} {label} ({detail}): check that PostgreSQL runs there and "
                      f"[database] url, {AGAIN}", Path(label), transient=True)


# -- transactions ------------------------------------------------------------------------------------

def is_sqlite(engine: sa.Engine) -> bool:
    return engine.dialect.name == "sqlite"


class Fence(Protocol):
    """gwsync.accountlock's TokenFence: called right after BEGIN (raises to refuse the
    transaction); `lost()` after the transaction failed: the error to tell instead, if the run
    lost its account's lock meanwhile, else None."""

    def __call__(self, conn: sa.Connection) -> None: ...

    def lost(self) -> Exception | None: ...


_fence: ContextVar[Fence | None] = ContextVar("gwsync_fence", default=None)


@contextmanager
def fencing(fence: Fence | None) -> Iterator[None]:
    """Within the block, this thread's write transactions on PostgreSQL begin with `fence(conn)`,
    which raises to refuse the transaction. None: no fence (a file lock, a dry run)."""
    token = _fence.set(fence)
    try:
        yield
    finally:
        _fence.reset(token)


@contextmanager
def write(engine: sa.Engine) -> Iterator[sa.Connection]:
    """One explicit transaction on a pooled connection (see the module doc)."""
    with engine.connect() as conn:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if is_sqlite(engine) else "BEGIN")
        try:
            fence = _fence.get()
            if fence is not None and not is_sqlite(engine):
                fence(conn)
            yield conn
            conn.exec_driver_sql("COMMIT")
        except BaseException as exc:
            _roll_back(conn)
            lost = fence.lost() if fence is not None and isinstance(exc, Exception) and not is_sqlite(engine) \
                else None
            if lost is not None and not isinstance(exc, type(lost)):
                raise lost from exc
            raise


def _roll_back(conn: sa.Connection) -> None:
    """SQLite may have rolled back already (disk full, I/O error); a failing ROLLBACK must not
    hide the error that says what happened."""
    try:
        raw = conn.connection.dbapi_connection
        if is_sqlite(conn.engine) and raw is not None and not raw.in_transaction:
            return
        conn.exec_driver_sql("ROLLBACK")
    except Exception:
        pass


@contextmanager
def read(engine: sa.Engine) -> Iterator[sa.Connection]:
    """A pooled connection for reads (autocommit: each statement sees the latest commit)."""
    with engine.connect() as conn:
        yield conn


class Readers:
    """A connection per thread kept for a store's reads: a pool checkout and return for each
    lookup cost as much as SQLite's lookup itself (the mail import makes several per mail).

    In autocommit a connection holds nothing between statements (every result is read to its
    end, which ends SQLite's read snapshot). After an error the thread's connection is closed
    and a new one taken next time (a PostgreSQL session that died is not used again)."""

    def __init__(self, engine: sa.Engine):
        self.engine = engine
        self._local = threading.local()
        self._open: list[sa.Connection] = []
        self._lock = threading.Lock()

    @contextmanager
    def __call__(self) -> Iterator[sa.Connection]:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self.engine.connect()
            with self._lock:
                self._open.append(conn)
        try:
            yield conn
        except BaseException:
            self._drop(conn)
            raise

    def _drop(self, conn: sa.Connection) -> None:
        self._local.conn = None
        with self._lock:
            if conn in self._open:
                self._open.remove(conn)
        try:
            conn.close()
        except Exception:
            pass  # the error that got us here says what happened

    def close(self) -> None:
        with self._lock:
            conns, self._open = self._open, []
        for conn in conns:
            try:
                conn.close()
            except Exception:
                pass


# -- schema versions on PostgreSQL -------------------------------------------------------------------

SCHEMA_TABLE = "gwsync_schema"


def pg_upgrade(engine: sa.Engine, store: str, target: int, what: str, label: str,
               create: Callable[[sa.Connection], None],
               steps: list[tuple[int, Callable[[sa.Connection], None]]]) -> int:
    """Bring `store`'s tables on PostgreSQL to version `target`.

    A new database runs `create`, which makes the tables at `target`; an older one runs the
    `steps` above its version. Returns the version. A newer one than `target`: StoreError,
    nothing touched. `label` names the database in messages (its URL without password)."""
    found = _pg_version(engine, store)
    _refuse_newer(found, target, what, label)
    if found == target:
        return target  # the usual case: one query
    with write(engine) as conn:
        # Every store and process on this database waits here for the one upgrading.
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _lock_key(SCHEMA_TABLE)})
        conn.exec_driver_sql(f'CREATE TABLE IF NOT EXISTS "{SCHEMA_TABLE}" '
                             '("store" TEXT PRIMARY KEY, "version" INTEGER NOT NULL)')
        recorded = conn.execute(sa.text(f'SELECT version FROM "{SCHEMA_TABLE}" WHERE store = :store'),
                                {"store": store}).scalar()
        _refuse_newer(recorded or 0, target, what, label)
        if recorded is None:
            create(conn)
        else:
            for version, step in steps:
                if version > recorded:
                    step(conn)
        conn.execute(sa.text(f'INSERT INTO "{SCHEMA_TABLE}" (store, version) VALUES (:store, :version) '
                             "ON CONFLICT (store) DO UPDATE SET version = excluded.version"),
                     {"store": store, "version": target})
    return target


def _pg_version(engine: sa.Engine, store: str) -> int:
    with read(engine) as conn:
        if conn.execute(sa.text("SELECT to_regclass(:name)"), {"name": SCHEMA_TABLE}).scalar() is None:
            return 0
        version = conn.execute(sa.text(f'SELECT version FROM "{SCHEMA_TABLE}" WHERE store = :store'),
                               {"store": store}).scalar()
        return int(version or 0)


def _refuse_newer(found: int, known: int, what: str, label: str) -> None:
    """Exit 1, not 2: the config and the command are right, the installed gwsync is too old."""
    if found > known:
        raise StoreError(f"the {what} {label} was written by a newer gwsync (schema {found}, this one knows "
                         f"{known}): upgrade gwsync", Path(label))


def _lock_key(name: str) -> int:
    """A stable 32-bit advisory lock key for a name."""
    return zlib.crc32(name.encode())

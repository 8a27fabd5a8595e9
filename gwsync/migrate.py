"""`gwsync migrate-store`: copy the embedded SQLite files into one empty PostgreSQL database.

The source is the config's `[crm] database` and `[state] database` files (whether or not
`[database] url` is set already); the target is `--to URL`, else `[database] url`. Everything is
copied as it is: every table of both stores, every column, the ids (calendar links and mail
records point at activity ids), and the counters, so that PostgreSQL never gives out an id the
files gave out (nor one of a deleted activity: SQLite's AUTOINCREMENT counter goes over too).

Order of work:
  1. the files must be there (the CRM's; a missing state file copies as an empty state);
  2. `watch`'s instance lock: a running watch (or another migrate-store) is refused;
  3. each file opened: an old schema is upgraded in place (as any gwsync command does), a newer
     one refused; then every table and column of the file must be one the stores' table
     definitions know, and the other way round: nothing is left behind unnoticed;
  4. every account's run lock (as `sync`, `review`, `push` take them; a running sync is waited
     for, [state] lock_wait), then a write transaction on each file, held to the end: whatever
     else would write them (`activity edit`, the web view) waits, and the copy is their last state;
  5. on the target, ONE transaction: the schema upgrade's advisory lock, refuse a database that
     holds any gwsync table (exit 2, nothing written), make the tables, copy each table in
     batches (foreign keys in order), move the identity sequences past the copied ids, record
     the schema versions, COMMIT. A crash or Ctrl-C before COMMIT leaves the target empty;
  6. release the files (ROLLBACK: nothing is ever written to them, nor are they deleted).

A dry run does 1 and 3, counts the rows in one read transaction and checks the target (reachable,
no gwsync tables), taking no locks.

A database holding gwsync tables is always refused, also an earlier copy of the same files
(told apart by the CRM's store id): the files may have changed since, and an older copy must
not pass for a current one. Drop and create the database to copy again.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import sqlite_utils

from .config import Config
from .errors import ConfigError, StoreError, UsageError
from .storage.database import (
    SCHEMA_TABLE,
    _first_line,
    _lock_key,
    check_url,
    postgres_engine,
    shown,
    sqlite_engine,
    write,
)
from .storage.migrations import Migration, upgrade

BATCH = 2000  # rows per read and per INSERT
log = logging.getLogger("gwsync")


@dataclass
class Store:
    """One of the two stores, as the copy sees it."""

    name: str  # its row in gwsync_schema
    what: str  # for messages: "CRM database"
    path: Path
    metadata: sa.MetaData
    migrations: list[Migration]
    version: int
    create: Callable[[sa.Connection], None]  # its tables on a new PostgreSQL database
    functions: dict[str, Callable] | None = None


def stores(config: Config) -> list[Store]:
    from .crm import embedded
    from .storage import state

    def create_crm(conn: sa.Connection) -> None:
        embedded._create_postgres(conn)  # the tables and indexes as a new database gets them
        conn.execute(sa.delete(embedded.meta))  # its new store id: the files' own comes with the copy

    return [Store("crm", "CRM database", config.crm.database, embedded.metadata, embedded.MIGRATIONS,
                  embedded.SCHEMA_VERSION, create_crm, {"unicode_lower": embedded._lower}),
            Store("state", "state database", config.state_database, state.metadata, state.MIGRATIONS,
                  state.SCHEMA_VERSION, state.metadata.create_all)]


@dataclass
class Target:
    url: str
    password: Callable[[], str | None] | None

    @property
    def label(self) -> str:
        return shown(self.url)


def target_of(config: Config, url: str | None) -> Target | None:
    """--to, else [database] url; the config's password source goes with its own URL."""
    database = config.database
    secret = database.secret if database is not None else None
    password = secret.resolve if secret is not None else None
    if url is not None:
        try:
            check_url(url, "--to")
        except ConfigError as exc:  # a usage error here, not the config file's
            raise UsageError(exc.message) from None
        return Target(url, password if database is not None and database.url == url else None)
    if database is None:
        return None
    return Target(database.url, password)


# -- the source ------------------------------------------------------------------------------------

class Source:
    """The files of one store, opened, upgraded and checked; `hold` keeps writers out."""

    def __init__(self, store: Store):
        self.store = store
        self.present = store.path.exists()
        self.engine: sa.Engine | None = None
        self.conn: sa.Connection | None = None

    def open(self) -> None:
        if not self.present:
            return
        self.engine = sqlite_engine(self.store.path, self.store.what, self.store.functions)
        self.conn = self.engine.connect()
        raw = self.conn.connection.dbapi_connection
        assert isinstance(raw, sqlite3.Connection)  # sqlite_engine's, from open_private_db
        upgrade(sqlite_utils.Database(raw), self.store.migrations)
        self.check()

    def check(self) -> None:
        """Every table and column of the file is in the table definitions, and the other way round."""
        assert self.conn is not None
        inspector = sa.inspect(self.conn)
        found = set(inspector.get_table_names())
        known = set(self.store.metadata.tables)
        where = f"the {self.store.what} {self.store.path}"
        if found - known:
            raise StoreError(f"{where} has tables this gwsync does not know ({', '.join(sorted(found - known))}): "
                             "nothing was copied; upgrade gwsync, or move those tables away", self.store.path)
        if known - found:
            raise StoreError(f"{where} lacks tables of schema {self.store.version} "
                             f"({', '.join(sorted(known - found))}): it is damaged; nothing was copied",
                             self.store.path)
        for table in self.store.metadata.sorted_tables:
            columns = {column["name"] for column in inspector.get_columns(table.name)}
            if columns != set(table.columns.keys()):
                extra, missing = columns - set(table.columns.keys()), set(table.columns.keys()) - columns
                raise StoreError(f"{where}: table {table.name} does not match schema {self.store.version} "
                                 f"(unknown columns: {', '.join(sorted(extra)) or 'none'}; missing: "
                                 f"{', '.join(sorted(missing)) or 'none'}): nothing was copied", self.store.path)

    @contextmanager
    def hold(self, writers_wait: bool = True) -> Iterator[None]:
        """A transaction on the file for the block, rolled back after it: we read one
        consistent state, and (`writers_wait`, a write transaction) nobody else writes meanwhile."""
        if self.conn is None:
            yield
            return
        self.conn.exec_driver_sql("BEGIN IMMEDIATE" if writers_wait else "BEGIN")
        try:
            yield
        finally:
            try:
                self.conn.exec_driver_sql("ROLLBACK")
            except Exception:
                pass  # the error that got us here says what happened

    def counts(self) -> dict[str, int]:
        tables = self.store.metadata.sorted_tables
        if self.conn is None:
            return {table.name: 0 for table in tables}
        return {table.name: self.conn.execute(sa.select(sa.func.count()).select_from(table)).scalar() or 0
                for table in tables}

    def rows(self, table: sa.Table) -> Iterator[list[dict]]:
        assert self.conn is not None
        names = list(table.columns.keys())
        fix = [_converter(column) for column in table.columns]
        result = self.conn.execute(sa.select(*table.columns).order_by(*table.primary_key.columns))
        while batch := result.fetchmany(BATCH):
            yield [{name: f(value) for name, f, value in zip(names, fix, row, strict=True)} for row in batch]

    def counter(self, table: sa.Table) -> int:
        """The highest id the file gave out in `table`: its rows' and SQLite's AUTOINCREMENT
        counter's (which remembers deleted rows)."""
        assert self.conn is not None
        top = self.conn.execute(sa.select(sa.func.max(table.c.id))).scalar() or 0
        if self.conn.exec_driver_sql("SELECT 1 FROM sqlite_master WHERE name = 'sqlite_sequence'").first():
            seq = self.conn.exec_driver_sql("SELECT seq FROM sqlite_sequence WHERE name = ?",
                                            (table.name,)).scalar()
            top = max(top, int(seq or 0))
        return top

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        if self.engine is not None:
            self.engine.dispose()


def _converter(column: sa.Column) -> Callable[[Any], Any]:
    """SQLite keeps what it is given; PostgreSQL wants the column's type. Text loses NUL
    characters, which PostgreSQL cannot hold (imported mail has none already)."""
    kind = getattr(column.type, "impl_instance", column.type)
    if isinstance(kind, sa.Integer):
        def integer(value):
            if isinstance(value, (str, float)) and not isinstance(value, bool):
                try:
                    return int(value)
                except ValueError:
                    return value  # PostgreSQL refuses it, naming the table: better than a guess
            return value
        return integer

    def text(value):
        if value is None:
            return None
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        elif not isinstance(value, str):
            value = str(value)
        return value.replace("\x00", "") if "\x00" in value else value
    return text


# -- the target ------------------------------------------------------------------------------------

def _gwsync_tables(conn: sa.Connection, names: list[str]) -> list[str]:
    rows = conn.execute(sa.text("SELECT tablename FROM pg_tables WHERE schemaname = current_schema() "
                                "AND tablename = ANY(:names) ORDER BY tablename"), {"names": names})
    return [row[0] for row in rows]


def refuse_used(conn: sa.Connection, target: Target, all_stores: list[Store], source_id: str | None) -> None:
    """Exit 2 when the target holds any of gwsync's tables."""
    names = [SCHEMA_TABLE, *(name for store in all_stores for name in store.metadata.tables)]
    found = _gwsync_tables(conn, names)
    if not found:
        return
    shown_tables = ", ".join(found[:6]) + (f" and {len(found) - 6} more" if len(found) > 6 else "")
    same = False
    if "meta" in found and source_id is not None:
        same = conn.execute(sa.text("SELECT value FROM meta WHERE name = 'store_id'")).scalar() == source_id
    if same:
        raise UsageError(f"the database {target.label} holds a copy of these files already (the same CRM store id; "
                          f"tables {shown_tables}): nothing was written. If it is current, set [database] url to it; "
                          "to copy again, drop and create that database first")
    raise UsageError(f"the database {target.label} holds gwsync data already (tables {shown_tables}): "
                      "migrate-store copies into an empty database only, nothing was written; give it a new one "
                      "(createdb -E UTF8 --locale=C.UTF-8 NAME)")


def _record_version(conn: sa.Connection, store: Store) -> None:
    """As pg_upgrade records it (gwsync/storage/database.py)."""
    conn.exec_driver_sql(f'CREATE TABLE IF NOT EXISTS "{SCHEMA_TABLE}" '
                         '("store" TEXT PRIMARY KEY, "version" INTEGER NOT NULL)')
    conn.execute(sa.text(f'INSERT INTO "{SCHEMA_TABLE}" (store, version) VALUES (:store, :version)'),
                 {"store": store.name, "version": store.version})


def _move_sequences(conn: sa.Connection, source: Source, table: sa.Table) -> None:
    """The table's identity sequence past every id the file gave out: the next is one above."""
    if "id" not in table.c or table.c.id.identity is None:
        return
    top = source.counter(table) if source.conn is not None else 0
    sequence = conn.execute(sa.text("SELECT pg_get_serial_sequence(:table, 'id')"),
                            {"table": f'"{table.name}"'}).scalar()
    if top > 0:
        conn.execute(sa.text("SELECT setval(:sequence, :top, true)"), {"sequence": sequence, "top": top})


def copy(target_conn: sa.Connection, source: Source, target: Target) -> dict[str, int]:
    """Every table of the store into the target (in its transaction); rows copied per table."""
    store = source.store
    store.create(target_conn)
    copied: dict[str, int] = {}
    for table in store.metadata.sorted_tables:  # parents before the tables that refer to them
        copied[table.name] = 0
        if source.conn is None:
            continue
        for rows in source.rows(table):
            try:
                target_conn.execute(sa.insert(table), rows)
            except sa.exc.StatementError as exc:  # a value PostgreSQL refuses (the server's faults are StoreErrors)
                raise StoreError(f"the {store.what} {store.path}: a row of table {table.name} cannot be stored in "
                                 f"{target.label} ({_first_line(exc.orig or exc)}): nothing was copied; fix or "
                                 "remove that row, then run migrate-store again", store.path) from exc
            copied[table.name] += len(rows)
        _move_sequences(target_conn, source, table)
        log.info("%s: copied %d rows of %s", store.what, copied[table.name], table.name)
    _record_version(target_conn, store)
    return copied


# -- the command -----------------------------------------------------------------------------------

@dataclass
class Outcome:
    target: Target | None
    counts: dict[str, dict[str, int]]  # store -> table -> rows
    missing: list[str]  # the stores without a file: their tables are made empty


def migrate(config: Config, url: str | None, dry_run: bool, started: Callable[[], None] = lambda: None) -> Outcome:
    """See the module doc. `started` is called when the copy into the target begins."""
    from .accountlock import FileAccountLocks
    from .cli.watcher import AlreadyRunning, InstanceLock

    target = target_of(config, url)
    if target is None and not dry_run:
        raise UsageError("no database to copy into: give --to postgresql://USER@HOST:PORT/DATABASE, or set "
                          "[database] url in the config")
    all_stores = stores(config)
    sources = [Source(store) for store in all_stores]
    crm = sources[0]
    if not crm.present:
        raise UsageError(f"no CRM database at {crm.store.path} ([crm] database): nothing to copy; check the config")
    with ExitStack() as stack:
        if not dry_run:
            # No `watch` and no run of any account (sync, review, push) writes the files meanwhile.
            try:
                stack.enter_context(InstanceLock(config.state_database))
            except AlreadyRunning as exc:
                raise exc.reworded(f"gwsync watch or another migrate-store ({_pid(config.state_database)}) is using "
                                   f"{config.state_database}: stop it first, then run migrate-store again") from None
        for source in sources:
            stack.callback(source.close)
            source.open()
        if not dry_run:
            locks = FileAccountLocks(config.state_database, config.state.lock_wait)
            names = sorted(set(config.accounts) | set(_stored_accounts(sources[1])))
            _enough_files(len(names))
            for name in names:
                stack.enter_context(locks.hold(name, "migrate-store"))
        for source in sources:
            stack.enter_context(source.hold(writers_wait=not dry_run))
        source_id = crm.conn.execute(sa.text("SELECT value FROM meta WHERE name = 'store_id'")).scalar() \
            if crm.conn is not None else None
        missing = [source.store.name for source in sources if not source.present]
        if dry_run:
            if target is not None:
                _check_target(target, all_stores, source_id)
            return Outcome(target, {source.store.name: source.counts() for source in sources}, missing)
        assert target is not None
        engine = postgres_engine(target.url, "target database", target.password)
        stack.callback(engine.dispose)
        counts: dict[str, dict[str, int]] = {}
        stack.enter_context(_quiet_driver())
        with write(engine) as conn:
            # The lock of the schema upgrade: a gwsync starting on this database now waits for us,
            # then finds the tables made.
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _lock_key(SCHEMA_TABLE)})
            refuse_used(conn, target, all_stores, source_id)
            started()
            for source in sources:
                counts[source.store.name] = copy(conn, source, target)
        return Outcome(target, counts, missing)


def _check_target(target: Target, all_stores: list[Store], source_id: str | None) -> None:
    engine = postgres_engine(target.url, "target database", target.password)
    try:
        with engine.connect() as conn:
            refuse_used(conn, target, all_stores, source_id)
    finally:
        engine.dispose()


@contextmanager
def _quiet_driver() -> Iterator[None]:
    """psycopg logs a warning of its own when a session dies in the middle of a batch (its
    pipeline cannot be closed); the error that follows says what happened, in one line."""
    logger = logging.getLogger("psycopg")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _pid(state_database: Path) -> str:
    try:
        return "pid " + (Path(str(state_database) + ".watch.lock").read_text().strip() or "?")
    except OSError:
        return "pid ?"


def _enough_files(locks: int) -> None:
    """A lock file per account is open at once: raise the open-file limit to what that takes."""
    import resource

    need = locks + 256  # the databases, the connections, Python's own
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            raise UsageError(f"{locks} accounts to hold still need {need} open files, and this process may open "
                             f"{hard}: raise the limit (ulimit -n {need}), then run migrate-store again")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def _stored_accounts(state: Source) -> list[str]:
    if state.conn is None:
        return []
    return [row[0] for row in state.conn.exec_driver_sql("SELECT name FROM accounts")]


def report_lines(config: Config, outcome: Outcome, dry_run: bool) -> list[str]:
    """What was (or would be) copied, per store and table, and the next step."""
    where = f"into {outcome.target.label}" if outcome.target else "(no target yet: --to URL or [database] url)"
    checked = " (reachable, no gwsync tables yet)" if dry_run and outcome.target else ""
    lines = [f"{'would copy' if dry_run else 'copied'} {where}{checked}:"]
    for store in stores(config):
        counts = outcome.counts[store.name]
        rows = ", ".join(f"{table} {count}" for table, count in counts.items())
        absent = " (no file: its tables stay empty)" if store.name in outcome.missing else ""
        lines.append(f"  the {store.what} {store.path}{absent}: {rows}")
    if dry_run or outcome.target is None:
        return lines
    lines.append(f"The files are left as they were: keep them as a backup. Documents stay files under "
                 f"{config.crm.documents} ([crm] documents).")
    if config.database is not None and config.database.url == outcome.target.url:
        lines.append("Next: the config's [database] url names this database already: gwsync works on it from now on.")
    else:
        lines.append(f"Next: set [database] url in {config.path or 'the config file'} to it, then run gwsync as "
                     "before (nothing is imported again):")
        lines.append("  [database]")
        lines.append(f'  url = "{outcome.target.label}"')
        if outcome.target.label != outcome.target.url:
            lines.append("  (and its password in password_env, password_command or password_keyring, "
                         "not in the URL)")
    return lines

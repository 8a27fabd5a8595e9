"""`gwsync migrate-store`: the embedded SQLite files copied into an empty PostgreSQL database, and
`gwsync sync` going on from it with nothing imported twice, against real Dovecot, Radicale and
PostgreSQL. Also: every table of both stores copied row for row, a target that is not empty,
the errors (one line each), Ctrl-C in the middle, a dry run, an old schema, a running watch."""

from __future__ import annotations

import json
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa

from gwsync.accountlock import FileAccountLocks
from gwsync.cli.watcher import InstanceLock
from gwsync.crm import embedded
from gwsync.crm.embedded import EmbeddedCRM
from gwsync.demo.localservers import free_port
from gwsync.storage import state
from gwsync.storage.database import postgres_engine, sqlite_engine
from gwsync.storage.state import StateStore

FOLDER = "INBOX/CRM Kunde [E]"
DATABASES = Path(__file__).resolve().parent.parent / "fixtures" / "databases"
STORES = (("crm", embedded.metadata, "crm.db"), ("state", state.metadata, "state.db"))


def on_sqlite(env):
    """The env's config without [database] (the suite may run on PostgreSQL): the files."""
    env.config_path.write_text(re.sub(r'\A\[database\]\nurl = "[^"]*"\n\n', "", env.config_path.read_text()))
    return env


def use_database(env, url: str) -> None:
    env.config_path.write_text(f'[database]\nurl = "{url}"\n\n' + env.config_path.read_text())


def event(uid: str, summary: str) -> str:
    return (f"BEGIN:VCALENDAR\nVERSION:2.0\nPRODID:-//Phone//EN\nBEGIN:VEVENT\nUID:{uid}\nDTSTAMP:20261120T100000Z\n"
            f"DTSTART:20261201T090000Z\nDTEND:20261201T100000Z\nSUMMARY:{summary}\nEND:VEVENT\nEND:VCALENDAR\n")


def mail(n: int, subject: str) -> bytes:
    return (f"From: Erika <erika@acme.example>\r\nTo: alice@example.com\r\nCc: bob@example.com\r\n"
            f"Subject: {subject}\r\nMessage-ID: <mig{n}@example.org>\r\n\r\nBody {n} \u00e4\u00f6\u00fc.\r\n").encode()


def _normal(column: sa.Column, value):
    """JSON columns are text on SQLite and jsonb (decoded) on PostgreSQL: compare the values."""
    if isinstance(column.type, embedded._JsonText) and isinstance(value, str):
        return json.loads(value)
    return value


def dump(engine: sa.Engine, metadata: sa.MetaData) -> dict[str, list[tuple]]:
    with engine.connect() as conn:
        return {table.name: [tuple(_normal(c, v) for c, v in zip(table.columns, row, strict=True)) for row in
                             conn.execute(sa.select(*table.columns).order_by(*table.primary_key.columns))]
                for table in metadata.sorted_tables}


def file_dump(path: Path, metadata: sa.MetaData) -> dict[str, list[tuple]]:
    engine = sqlite_engine(path, "test")
    try:
        return dump(engine, metadata)
    finally:
        engine.dispose()


def pg_dump(url: str, metadata: sa.MetaData) -> dict[str, list[tuple]]:
    engine = postgres_engine(url, "test")
    try:
        return dump(engine, metadata)
    finally:
        engine.dispose()


def pg_tables(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        return [r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
                                           "ORDER BY 1")]


def sqlite_tables(path: Path) -> set[str]:
    conn = sqlite3.connect(path)
    try:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                           "AND name NOT LIKE 'sqlite_%'")}
    finally:
        conn.close()


def logical(path: Path) -> list[str]:
    """The file's content as SQL (the bytes may change when SQLite checkpoints its WAL)."""
    conn = sqlite3.connect(path)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def one_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gwsync: ") and "Traceback" not in result.stderr, result.stderr
    return lines[0]


# -- the whole way: files, migrate, switch, sync on ----------------------------------------------

def test_sync_goes_on_from_postgresql_with_nothing_imported_twice(make_env, pg_url):
    env = on_sqlite(make_env(areas=("mail", "events")))
    env.append(FOLDER, *(mail(n, f"Anfrage {n}") for n in range(1, 4)))
    env.dav_put("events", "planung.ics", event("planung-1", "Planung"))
    code, out = env.cli_json("sync")
    assert code == 0, out
    assert out["accounts"]["alice"]["mail"]["imported"] == 3
    assert out["accounts"]["alice"]["events"]["created_crm"] == 1
    # An activity made and deleted in the CRM: its id must never come back.
    code, added = env.cli_json("activity", "add", "--kind", "TERMIN", "--subject", "Weg damit",
                               "--start", "2026-12-03T10:00")
    assert code == 0
    assert env.cli("sync").exit_code == 0  # pushed to the calendar, then deleted there by the next sync
    assert env.cli("activity", "delete", str(added["id"])).exit_code == 0
    assert env.cli("sync").exit_code == 0
    before = {name: file_dump(env.dir / file, metadata) for name, metadata, file in STORES}
    files_before = {file: logical(env.dir / file) for _, _, file in STORES}
    items_before = env.dav_items("events")
    assert len(before["crm"]["activities"]) == 4 and len(before["state"]["folders"]) == 1
    assert len(before["state"]["links"]) == 1 and len(items_before) == 1

    result = env.cli("migrate-store", "--to", pg_url)

    assert result.exit_code == 0, result.output
    assert "Next: set [database] url in" in result.stdout and f'url = "{pg_url}"' in result.stdout
    assert "activities 4" in result.stdout and "links 1" in result.stdout
    # Every table of both stores, row for row; and the files hold no table the stores do not know.
    for name, metadata, file in STORES:
        assert pg_dump(pg_url, metadata) == before[name], name
        assert sqlite_tables(env.dir / file) == set(metadata.tables)
    assert set(pg_tables(pg_url)) == {"gwsync_schema", *embedded.metadata.tables, *state.metadata.tables}
    assert {file: logical(env.dir / file) for _, _, file in STORES} == files_before  # the files untouched

    use_database(env, pg_url)
    env.append(FOLDER, mail(1, "Anfrage 1"))  # imported before: its key is in the copied CRM
    code, out = env.cli_json("sync")
    assert code == 0, out
    assert out["accounts"]["alice"]["mail"]["imported"] == 0
    events = out["accounts"]["alice"]["events"]
    assert (events["created_crm"], events["created_groupware"], events["updated_groupware"]) == (0, 0, 0), events
    assert pg_dump(pg_url, embedded.metadata)["activities"] == before["crm"]["activities"]
    assert env.dav_items("events") == items_before

    # New mail gets an id above every id the files gave out, the deleted one's included.
    env.append(FOLDER, mail(9, "Nach dem Umzug"))
    code, out = env.cli_json("sync")
    assert code == 0 and out["accounts"]["alice"]["mail"]["imported"] == 1
    (new,) = out["accounts"]["alice"]["mail"]["activities"]
    assert new["id"] > added["id"] > max(row[0] for row in before["crm"]["activities"])
    # A CRM edit of the calendar-linked activity reaches its item (the link came along).
    linked_id = before["state"]["links"][0][2]
    assert env.cli("activity", "edit", str(linked_id), "--subject", "Planung 2027").exit_code == 0
    code, out = env.cli_json("sync")
    assert code == 0 and out["accounts"]["alice"]["events"]["updated_groupware"] == 1, out
    ((_, text),) = env.dav_items("events").values()
    assert "SUMMARY:Planung 2027" in text and "UID:planung-1" in text
    with env.engine() as engine:
        assert len(engine.crm.list_activities(embedded.ActivityFilter())) == 5  # the four and the new mail


# -- every table, every column ------------------------------------------------------------------------

def _value(column: sa.Column, n: int):
    if column.foreign_keys or column.name == "id":
        return 1
    if isinstance(column.type, embedded._JsonText):
        return json.dumps([f"{column.name}-{n}", {"email": "erika@acme.example"}])
    if isinstance(column.type, sa.BigInteger):
        return 4_000_000_000 + n  # UIDs reach 2**32 - 1
    if isinstance(column.type, sa.Integer):
        return 6 + n
    return f"{column.table.name}.{column.name} \u00e4 {n}"


def filled(tmp_path: Path) -> Path:
    """A config whose two files have a row in every table, every column set."""
    EmbeddedCRM(tmp_path / "crm.db", tmp_path / "documents", {"O": "Offen"}, "x{id}").close()
    StateStore(tmp_path / "state.db").close()
    for _, metadata, file in STORES:
        conn = sqlite3.connect(tmp_path / file)
        for table in metadata.sorted_tables:
            columns = list(table.columns)
            names = ", ".join(f'"{c.name}"' for c in columns)
            conn.execute(f'INSERT INTO "{table.name}" ({names}) VALUES ({", ".join("?" for _ in columns)})',
                         [_value(c, 1) for c in columns])
        conn.commit()
        conn.close()
    config = tmp_path / "config.toml"
    config.write_text(f'[crm]\ndatabase = "{tmp_path}/crm.db"\n\n[state]\ndatabase = "{tmp_path}/state.db"\n')
    return config


def cli(config: Path, *args: str):
    from click.testing import CliRunner

    from gwsync.cli import main

    return CliRunner().invoke(main, ["--config", str(config), *args], catch_exceptions=False)


def test_every_table_and_column_of_both_stores_is_copied(tmp_path, pg_url):
    config = filled(tmp_path)
    before = {name: file_dump(tmp_path / file, metadata) for name, metadata, file in STORES}
    assert all(rows for tables in before.values() for rows in tables.values())  # no empty table

    result = cli(config, "migrate-store", "--to", pg_url)

    assert result.exit_code == 0, result.output
    for name, metadata, _ in STORES:
        assert pg_dump(pg_url, metadata) == before[name], name
        for table in metadata.tables:
            assert re.search(rf"\b{table} \d+", result.stdout), table  # each table named in the report
    with psycopg.connect(pg_url) as conn:
        versions = dict(conn.execute("SELECT store, version FROM gwsync_schema").fetchall())
        # The sequences moved past the copied ids: the next id is 2 in every table with one.
        nexts = {t: conn.execute(f"SELECT nextval(pg_get_serial_sequence('\"{t}\"', 'id'))").fetchone()[0]
                 for t in ("partners", "partner_addresses", "contacts", "communications", "activities", "documents")}
    assert versions == {"crm": embedded.SCHEMA_VERSION, "state": state.SCHEMA_VERSION}
    assert nexts == dict.fromkeys(nexts, 2)
    # The stores open it as theirs, at their versions, without an upgrade step or a new store id.
    crm = EmbeddedCRM(pg_url, tmp_path / "documents", {"O": "Offen"}, "x{id}")
    try:
        assert crm.store_id() == dict(before["crm"]["meta"])["store_id"]
    finally:
        crm.close()
    assert pg_dump(pg_url, embedded.metadata) == before["crm"]


def test_a_column_the_stores_do_not_know_is_refused_not_left_behind(tmp_path, pg_url):
    config = filled(tmp_path)
    conn = sqlite3.connect(tmp_path / "crm.db")
    conn.execute('ALTER TABLE activities ADD COLUMN "later" TEXT')
    conn.close()

    result = cli(config, "migrate-store", "--to", pg_url)

    assert result.exit_code == 1
    assert "table activities" in one_line(result) and "later" in result.stderr and "nothing was copied" in result.stderr
    assert pg_tables(pg_url) == []


# -- safety ------------------------------------------------------------------------------------------

def test_a_database_with_gwsync_data_is_refused_and_left_as_it_is(tmp_path, pg_url, postgres):
    config = filled(tmp_path)
    assert cli(config, "migrate-store", "--to", pg_url).exit_code == 0
    copied = pg_dump(pg_url, embedded.metadata)

    again = cli(config, "migrate-store", "--to", pg_url)

    assert again.exit_code == 2
    assert "holds a copy of these files already" in one_line(again) and "nothing was written" in again.stderr
    assert pg_dump(pg_url, embedded.metadata) == copied
    # A database another gwsync has used (its own store id): refused as well.
    other = postgres.url(postgres.new_database())
    StateStore(other).close()
    result = cli(config, "migrate-store", "--to", other)
    assert result.exit_code == 2
    assert "holds gwsync data already" in one_line(result) and "empty database" in result.stderr


def test_errors_are_one_line(tmp_path, pg_url, postgres):
    config = filled(tmp_path)
    closed = f"postgresql://gwsync@127.0.0.1:{free_port()}/gwsync"
    result = cli(config, "migrate-store", "--to", closed)
    assert result.exit_code == 1 and "cannot use the target database" in one_line(result)

    # A wrong password: a role that must give one (the test cluster trusts everyone else).
    hba = postgres.directory / "data" / "pg_hba.conf"
    hba.write_text("host all mover 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
    postgres.execute("CREATE ROLE mover LOGIN PASSWORD 'right'", "SELECT pg_reload_conf()")
    time.sleep(0.5)
    wrong = pg_url.replace("gwsync@", "mover:wrong@")
    result = cli(config, "migrate-store", "--to", wrong)
    assert result.exit_code == 2 and "refused the login" in one_line(result) and "wrong" not in result.stderr

    result = cli(config, "migrate-store", "--to", "mysql://db/gwsync")
    assert result.exit_code == 2 and "--to must be a postgresql:// URL" in one_line(result)
    result = cli(config, "migrate-store")
    assert result.exit_code == 2 and "no database to copy into" in one_line(result)

    gone = tmp_path / "gone.toml"
    gone.write_text(f'[crm]\ndatabase = "{tmp_path}/nothing/crm.db"\n')
    result = cli(gone, "migrate-store", "--to", pg_url)
    assert result.exit_code == 2 and "no CRM database at" in one_line(result)
    assert not (tmp_path / "nothing" / "crm.db").exists()

    (tmp_path / "crm.db").write_bytes(b"this is not a database" * 100)
    for name in ("crm.db-wal", "crm.db-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    result = cli(config, "migrate-store", "--to", pg_url)
    assert result.exit_code == 1 and "is not an SQLite database" in one_line(result)
    assert pg_tables(pg_url) == []


def big(tmp_path: Path) -> Path:
    """A config whose state file holds 100,000 mail records: a copy of some seconds."""
    config = filled(tmp_path)
    conn = sqlite3.connect(tmp_path / "state.db")
    conn.executemany("INSERT INTO messages (account, folder, uidvalidity, uid, outcome, key, activity_id) "
                     "VALUES ('alice', 'INBOX/CRM x [E]', 1, ?, 'imported', ?, 1)",
                     ((uid, f"k{uid}") for uid in range(100_000)))
    conn.commit()
    conn.close()
    return config


def copying(config: Path, url: str) -> subprocess.Popen:
    """migrate-store in a process of its own, once it has begun to copy."""
    proc = subprocess.Popen([sys.executable, "-m", "gwsync.cli", "--config", str(config), "-v", "migrate-store",
                             "--to", url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    assert "copying" in proc.stderr.readline()
    time.sleep(0.3)
    return proc


def test_ctrl_c_in_the_middle_leaves_the_target_empty_and_a_rerun_copies(tmp_path, pg_url):
    config = big(tmp_path)
    proc = copying(config, pg_url)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)

    assert proc.returncode == 130, (out, err)
    # -v's progress, and the empty line click writes after ^C on a terminal
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("INFO ")]
    assert len(lines) == 1 and lines[0].startswith("gwsync: interrupted") and "Traceback" not in err
    assert pg_tables(pg_url) == []

    result = cli(config, "migrate-store", "--to", pg_url)
    assert result.exit_code == 0, result.output
    assert "messages 100001" in result.stdout


def test_the_database_session_lost_in_the_middle_leaves_the_target_empty(tmp_path, pg_url, postgres):
    config = big(tmp_path)
    database = pg_url.rsplit("/", 1)[1]
    proc = copying(config, pg_url)
    postgres.execute(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{database}'")
    out, err = proc.communicate(timeout=60)

    assert proc.returncode == 1, (out, err)
    # -v's progress, and the empty line click writes after ^C on a terminal
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("INFO ")]
    assert len(lines) == 1 and lines[0].startswith("gwsync: cannot use the target database") and "Traceback" not in err
    assert pg_tables(pg_url) == []
    assert cli(config, "migrate-store", "--to", pg_url).exit_code == 0


def test_a_dry_run_counts_and_writes_nothing(tmp_path, pg_url):
    config = filled(tmp_path)
    files = {file: logical(tmp_path / file) for _, _, file in STORES}

    result = cli(config, "migrate-store", "--to", pg_url, "--dry-run")

    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"would copy into {pg_url} (reachable, no gwsync tables yet):")
    assert "activities 1" in result.stdout and "messages 1" in result.stdout and "Next" not in result.stdout
    assert pg_tables(pg_url) == []
    assert {file: logical(tmp_path / file) for _, _, file in STORES} == files
    assert cli(config, "migrate-store", "--dry-run").exit_code == 0  # no target yet: the counts alone


def test_an_old_schema_is_upgraded_then_copied(tmp_path, pg_url):
    shutil.copyfile(DATABASES / "crm-v0.sqlite", tmp_path / "crm.db")
    shutil.copyfile(DATABASES / "state-v0.sqlite", tmp_path / "state.db")
    config = tmp_path / "config.toml"
    config.write_text(f'[crm]\ndatabase = "{tmp_path}/crm.db"\n\n[state]\ndatabase = "{tmp_path}/state.db"\n')

    result = cli(config, "migrate-store", "--to", pg_url)

    assert result.exit_code == 0, result.output
    for _, metadata, file in STORES:
        assert pg_dump(pg_url, metadata) == file_dump(tmp_path / file, metadata)
    subjects = [row[4] for row in pg_dump(pg_url, embedded.metadata)["activities"]]
    assert subjects == ["Kundentermin", "Angebot", "Vom Handy"]
    # Upgraded in place first, as any gwsync command does (the data kept: test_store_upgrade.py).
    for (_, _, file), version in zip(STORES, (embedded.SCHEMA_VERSION, state.SCHEMA_VERSION), strict=True):
        assert sqlite3.connect(tmp_path / file).execute("PRAGMA user_version").fetchone()[0] == version


def test_a_running_watch_or_sync_keeps_the_files_and_nothing_is_copied(tmp_path, pg_url):
    config = filled(tmp_path)
    config.write_text(config.read_text() + "lock_wait = 0.2\n\n[accounts.alice]\n[accounts.alice.imap]\n"
                      'host = "127.0.0.1"\nusername = "alice"\npassword = "x"\n')
    with InstanceLock(tmp_path / "state.db"):
        result = cli(config, "migrate-store", "--to", pg_url)
    assert result.exit_code == 1 and "gwsync watch or another migrate-store (pid " in one_line(result)
    with FileAccountLocks(tmp_path / "state.db").hold("alice", "sync"):
        result = cli(config, "migrate-store", "--to", pg_url)
    assert result.exit_code == 1 and "account alice is busy" in one_line(result)
    assert pg_tables(pg_url) == []


def test_a_value_postgresql_refuses_is_one_line_and_nothing_is_copied(tmp_path, pg_url):
    config = filled(tmp_path)
    conn = sqlite3.connect(tmp_path / "crm.db")
    conn.execute("UPDATE activities SET participants = '[\"alice\"'")  # cut off: jsonb takes no such text
    conn.commit()
    conn.close()

    result = cli(config, "migrate-store", "--to", pg_url)

    assert result.exit_code == 1
    line = one_line(result)
    assert "a row of table activities cannot be stored" in line and "nothing was copied" in line, line
    assert pg_tables(pg_url) == []


def test_the_configs_database_url_is_the_target_by_default(tmp_path, pg_url):
    config = filled(tmp_path)
    config.write_text(f'[database]\nurl = "{pg_url}"\n\n' + config.read_text())

    result = cli(config, "migrate-store")

    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"copied into {pg_url}:")
    assert "the config's [database] url names this database already" in result.stdout
    assert pg_dump(pg_url, state.metadata) == file_dump(tmp_path / "state.db", state.metadata)


def test_a_missing_state_file_copies_as_an_empty_state(tmp_path, pg_url):
    config = filled(tmp_path)
    for name in ("state.db", "state.db-wal", "state.db-shm"):
        (tmp_path / name).unlink(missing_ok=True)

    result = cli(config, "migrate-store", "--to", pg_url)

    assert result.exit_code == 0, result.output
    assert f"the state database {tmp_path}/state.db (no file: its tables stay empty): accounts 0" in result.stdout
    assert not (tmp_path / "state.db").exists()
    assert all(rows == [] for rows in pg_dump(pg_url, state.metadata).values())
    assert pg_dump(pg_url, embedded.metadata) == file_dump(tmp_path / "crm.db", embedded.metadata)


def test_while_the_copy_runs_nobody_writes_the_files(tmp_path):
    """The copy holds a write transaction on each file: `activity edit`, the web view and any
    other writer wait for it (then stop with one line), so the copy is the files' last state."""
    from gwsync.config import load_config
    from gwsync.migrate import Source, stores

    filled(tmp_path)
    config = load_config(tmp_path / "config.toml")
    for store in stores(config):
        source = Source(store)
        source.open()
        try:
            with source.hold():
                other = sqlite3.connect(store.path, timeout=0.1)
                try:
                    with pytest.raises(sqlite3.OperationalError, match="locked"):
                        other.execute("DELETE FROM meta" if store.name == "crm" else "DELETE FROM runs")
                    assert other.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] > 0  # reads go on
                finally:
                    other.close()
            other = sqlite3.connect(store.path, timeout=0.1)  # released after the copy
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
            other.close()
        finally:
            source.close()

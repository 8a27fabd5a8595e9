"""The CRM store shared by several processes, on SQLite and on PostgreSQL alike: writes of one key
at once make one activity, participants added at once all count, two processes making a new
PostgreSQL database make it once; the `[database] url` and its one-line errors; the tables the
statements are built on are the tables the SQLite migrations make."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gwsync.crm import ActivityDraft, ActivityFilter
from gwsync.crm import embedded as crmstore
from gwsync.crm.embedded import EmbeddedCRM
from gwsync.errors import ConfigError, StoreError

ROOT = Path(__file__).resolve().parent.parent
STATUSES = {"I": "Importiert", "O": "Offen", "E": "Erledigt"}
LINK = "https://crm.example.com/activities/{id}"


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path):
    """Where the store lives: an SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return tmp_path / "crm.db"
    return request.getfixturevalue("pg_url")


def open_store(database, tmp_path: Path) -> EmbeddedCRM:
    return EmbeddedCRM(database, tmp_path / "documents", STATUSES, LINK)


def at_once(count: int, work) -> list:
    """Run work(i) in `count` threads released together; their results, or the first error."""
    barrier = threading.Barrier(count)
    results: list = [None] * count
    errors: list[BaseException] = []

    def run(i):
        try:
            barrier.wait()
            results[i] = work(i)
        except BaseException as exc:
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    if errors:
        raise errors[0]
    return results


def test_stores_writing_the_same_keys_at_once_make_each_activity_once(database, tmp_path):
    stores = [open_store(database, tmp_path) for _ in range(6)]
    keys = [f"mail:{n}" for n in range(40)]
    try:
        for round_ in range(3):  # several rounds: the threads meet at different points each time
            batch = [f"{key}:{round_}" for key in keys]
            results = at_once(len(stores), lambda i, batch=batch: stores[i].create_activities_marked(
                [ActivityDraft(key=key, kind="MAILEIN", status="E", subject=key) for key in batch]))
            for n in range(len(batch)):
                marks = [result[n] for result in results]
                assert len({activity_id for activity_id, _ in marks}) == 1, marks  # one activity per key
                assert sum(created for _, created in marks) == 1, marks  # exactly one call made it
        assert stores[0].count_activities(ActivityFilter()) == 3 * len(keys)
    finally:
        for store in stores:
            store.close()


def test_participants_added_at_once_all_count(database, tmp_path):
    stores = [open_store(database, tmp_path) for _ in range(5)]
    try:
        (activity_id,) = stores[0].create_activities([ActivityDraft(key="meeting", kind="TERMIN", status="O",
                                                                    subject="Weekly", participants=["alice"])])

        def add(i):
            return [stores[i].add_participant(activity_id, f"user{i}-{n}") for n in range(8)]
        assert all(all(added) for added in at_once(len(stores), add))
        names = stores[0].get_activity(activity_id).participants
        assert sorted(names) == sorted(["alice"] + [f"user{i}-{n}" for i in range(5) for n in range(8)])

        def remove(i):
            return [stores[i].remove_participant(activity_id, f"user{i}-{n}") for n in range(8)]
        assert all(all(removed) for removed in at_once(len(stores), remove))
        assert stores[0].get_activity(activity_id).participants == ["alice"]
        assert stores[0].list_activities(ActivityFilter(involving="alice"))[0].id == activity_id
        assert stores[0].list_activities(ActivityFilter(involving="user1-1")) == []
    finally:
        for store in stores:
            store.close()


OPENER = """
import sys, time
from pathlib import Path
from gwsync.crm.embedded import EmbeddedCRM
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
store = EmbeddedCRM(sys.argv[1], Path(sys.argv[3]), {"O": "Offen"}, "x{id}")
print(store.store_id())
store.close()
"""


def test_processes_opening_a_new_postgresql_database_at_once_make_its_tables_once(pg_url, tmp_path):
    start = time.time() + 1.5
    procs = [subprocess.Popen([sys.executable, "-c", OPENER, pg_url, str(start), str(tmp_path / "documents")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}) for _ in range(4)]
    results = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 4, [err for _, err in results]
    assert len({out for out, _ in results}) == 1 and len(results[0][0].strip()) == 36  # one store id
    store = open_store(pg_url, tmp_path)
    try:
        assert store.store_id() == results[0][0].strip()
    finally:
        store.close()
    import psycopg

    with psycopg.connect(pg_url) as conn:  # `involving` has its index there
        assert conn.execute("SELECT indexdef FROM pg_indexes WHERE indexname = 'idx_activities_participants'"
                            ).fetchone()[0].endswith("USING gin (participants)")


def test_a_unix_socket_url_reaches_the_same_database(postgres, tmp_path):
    name = postgres.new_database()
    try:
        store = open_store(postgres.url(name), tmp_path)
        (activity_id,) = store.create_activities([ActivityDraft(key="k", kind="NOTIZ", status="O", subject="über")])
        store.close()
        store = open_store(postgres.url(name, socket=True), tmp_path)
        try:
            assert store.get_activity(activity_id).subject == "über"
        finally:
            store.close()
    finally:
        postgres.drop_database(name)


def test_a_postgresql_database_from_a_newer_gwsync_is_one_line(pg_url, tmp_path):
    open_store(pg_url, tmp_path).close()
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE gwsync_schema SET version = version + 3 WHERE store = 'crm'")
    with pytest.raises(StoreError) as caught:
        open_store(pg_url, tmp_path)
    known = crmstore.SCHEMA_VERSION
    assert str(caught.value) == (f"the CRM database {pg_url} was written by a newer gwsync "
                                 f"(schema {known + 3}, this one knows {known}): upgrade gwsync")


def test_an_unreachable_postgresql_is_one_line_naming_the_url_without_its_password(tmp_path):
    from gwsync.demo.localservers import free_port

    url = f"postgresql://gwsync:secret@127.0.0.1:{free_port()}/crm"
    with pytest.raises(StoreError) as caught:
        open_store(url, tmp_path)
    message = str(caught.value)
    assert message.startswith("cannot use the CRM database postgresql://gwsync:***@127.0.0.1:")
    assert "secret" not in message and "\n" not in message and "check that PostgreSQL runs" in message
    assert caught.value.transient


def test_a_refused_password_is_a_config_error_line(postgres, tmp_path):
    name = postgres.new_database()
    postgres.execute("CREATE ROLE clerk LOGIN PASSWORD 'right'")
    hba = postgres.directory / "data" / "pg_hba.conf"
    original = hba.read_text()
    try:
        # clerk must give a password over TCP; everyone else stays trusted.
        hba.write_text("host all clerk 127.0.0.1/32 scram-sha-256\n" + original)
        postgres.execute("SELECT pg_reload_conf()")
        url = f"postgresql://clerk@127.0.0.1:{postgres.port}/{name}"
        with pytest.raises(StoreError) as caught:
            EmbeddedCRM(url, tmp_path / "documents", STATUSES, LINK, password=lambda: "wrong")
        assert caught.value.exit_code == 2 and "refused the login" in str(caught.value)
        assert "wrong" not in str(caught.value)
        postgres.execute(f'ALTER DATABASE "{name}" OWNER TO clerk')  # PostgreSQL 15: the owner may create
        store = EmbeddedCRM(url, tmp_path / "documents", STATUSES, LINK, password=lambda: "right")
        store.close()
    finally:
        hba.write_text(original)
        postgres.execute("SELECT pg_reload_conf()")
        postgres.drop_database(name)
        postgres.execute("DROP ROLE IF EXISTS clerk")


@pytest.mark.parametrize("url, message", [
    ("mysql://u@h/db", "must be a postgresql:// URL"),
    ("/var/lib/gwsync/crm.db", "must be a postgresql:// URL"),
    ("postgresql://u@h:5432", "names no database"),
])
def test_a_database_url_that_is_not_postgresql_is_a_config_error(url, message):
    from gwsync.storage.database import check_url

    with pytest.raises(ConfigError, match=message):
        check_url(url)


def test_the_tables_the_statements_use_are_the_tables_the_sqlite_migrations_make(tmp_path):
    open_store(tmp_path / "crm.db", tmp_path).close()
    conn = sqlite3.connect(tmp_path / "crm.db")
    try:
        for table in crmstore.metadata.sorted_tables:
            columns = [row[1] for row in conn.execute(f'PRAGMA table_info("{table.name}")')]
            assert sorted(columns) == sorted(c.name for c in table.columns), table.name
            indexes = {row[1] for row in conn.execute(f'PRAGMA index_list("{table.name}")') if row[3] == "c"}
            assert {i.name for i in table.indexes} == indexes, table.name
    finally:
        conn.close()


def test_a_later_schema_step_runs_once_on_an_existing_postgresql_database(pg_url, tmp_path, monkeypatch):
    from gwsync.storage.migrations import Migration

    open_store(pg_url, tmp_path).close()  # made at today's version
    ran = []

    def step(conn):
        ran.append(1)
        conn.exec_driver_sql('ALTER TABLE activities ADD COLUMN "mood" TEXT')

    later = crmstore.SCHEMA_VERSION + 1
    monkeypatch.setattr(crmstore, "MIGRATIONS", [*crmstore.MIGRATIONS,
                                                 Migration(later, "activities: mood", lambda db: None, step)])
    monkeypatch.setattr(crmstore, "SCHEMA_VERSION", later)
    for _ in range(2):
        open_store(pg_url, tmp_path).close()
    import psycopg

    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT version FROM gwsync_schema WHERE store = 'crm'").fetchone() == (later,)
        assert conn.execute("SELECT count(*) FROM information_schema.columns WHERE table_name = 'activities' "
                            "AND column_name = 'mood'").fetchone() == (1,)
    assert ran == [1]


# -- [database] url: the command line on PostgreSQL ---------------------------------------------------

def use_postgres(env, url: str, extra: str = "") -> None:
    """env's config on the database at `url` (in place of the PostgreSQL pass's own, if any)."""
    text = env.config_path.read_text()
    if env.database_url is not None:
        text = text.replace(f'[database]\nurl = "{env.database_url}"\n', "", 1)
    env.config_path.write_text(text + f'\n[database]\nurl = "{url}"\n{extra}')


def test_sync_imports_mail_into_the_postgresql_database_and_no_database_file_is_made(env, pg_url):
    from conftest import make_mail

    use_postgres(env, pg_url)
    env.append("INBOX/CRM Erledigt [E]", make_mail(1), make_mail(2))

    code, out = env.cli_json("sync")

    assert code == 0, out
    assert out["accounts"]["alice"]["mail"]["imported"] == 2
    assert env.messages("INBOX/CRM Erledigt [E]") == {}
    import psycopg

    with psycopg.connect(pg_url) as conn:
        assert sorted(r[0] for r in conn.execute("SELECT subject FROM activities")) == ["Test mail 1", "Test mail 2"]
        assert conn.execute("SELECT count(*) FROM messages").fetchone() == (0,)  # archived: no record left
        assert conn.execute("SELECT area, ok FROM runs").fetchall() == [("mail", 1)]
    assert not (env.dir / "crm.db").exists() and not (env.dir / "state.db").exists()
    code, listed = env.cli_json("activities")
    assert code == 0 and sorted(a["subject"] for a in listed) == ["Test mail 1", "Test mail 2"]
    code, again = env.cli_json("sync")  # nothing new, nothing twice
    assert code == 0 and again["accounts"]["alice"]["mail"]["imported"] == 0


def test_the_database_password_comes_from_its_password_source(env, postgres, monkeypatch):
    name = postgres.new_database()
    postgres.execute("CREATE ROLE teller LOGIN PASSWORD 'from-env'", f'ALTER DATABASE "{name}" OWNER TO teller')
    hba = postgres.directory / "data" / "pg_hba.conf"
    original = hba.read_text()
    try:
        hba.write_text("host all teller 127.0.0.1/32 scram-sha-256\n" + original)
        postgres.execute("SELECT pg_reload_conf()")
        use_postgres(env, f"postgresql://teller@127.0.0.1:{postgres.port}/{name}", 'password_env = "GW_DB_PW"\n')
        monkeypatch.setenv("GW_DB_PW", "from-env")
        result = env.cli("activity", "add", "--kind", "NOTIZ", "--subject", "Über PostgreSQL")
        assert result.exit_code == 0, result.stderr
        monkeypatch.setenv("GW_DB_PW", "wrong")
        result = env.cli("activities")
        assert result.exit_code == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("gwsync: the CRM database postgresql://teller@") and \
            "refused the login" in lines[0], result.stderr
    finally:
        hba.write_text(original)
        postgres.execute("SELECT pg_reload_conf()")
        postgres.drop_database(name)
        postgres.execute("DROP ROLE IF EXISTS teller")


def test_an_unreachable_database_is_one_line_from_the_command_line(env):
    from gwsync.demo.localservers import free_port

    use_postgres(env, f"postgresql://gwsync@127.0.0.1:{free_port()}/crm")
    proc = env.subprocess("sync")
    _, err = proc.communicate(timeout=60)
    lines = err.decode().strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, err
    assert lines[0].startswith("gwsync: cannot use the CRM database postgresql://gwsync@127.0.0.1:")


# -- faults of the database, as test_faults.py makes them for the SQLite files ------------------------

DONE = "INBOX/CRM Erledigt [E]"


def synced_then_one_more(env, url: str) -> None:
    """env on `url`, one mail imported (the tables made), a second waiting in DONE."""
    from conftest import make_mail

    use_postgres(env, url)
    env.append(DONE, make_mail(1))
    assert env.cli("sync").exit_code == 0
    env.append(DONE, make_mail(2))


def waiting_subjects(env) -> list[str]:
    return sorted(m["raw"].split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode() for m in env.messages(DONE).values())


def test_a_read_only_database_is_one_line_and_the_mail_is_imported_once_writable(env, postgres, pg_url):
    """A database that takes no writes (default_transaction_read_only, as on a standby server):
    one line naming it, exit 1, the mail stays; once writable the next run imports it once."""
    from gwsync.storage.database import shown

    synced_then_one_more(env, pg_url)
    name = pg_url.rsplit("/", 1)[1]
    postgres.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')  # new sessions
    proc = env.subprocess("sync")
    _, err = proc.communicate(timeout=60)
    lines = err.decode().strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, err
    assert lines[0].startswith("gwsync: ") and shown(pg_url) in lines[0] and "read-only" in lines[0], lines
    assert waiting_subjects(env) == ["Test mail 2"]

    postgres.execute(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
    code, out = env.cli_json("sync")
    assert code == 0 and out["accounts"]["alice"]["mail"]["imported"] == 1, out
    assert sorted(a["subject"] for a in env.cli_json("activities")[1]) == ["Test mail 1", "Test mail 2"]


def test_a_database_locked_by_another_program_is_one_line_within_the_timeout(env, pg_url, monkeypatch):
    """Another program holds a lock on the activities table (LOCK TABLE, a long ALTER TABLE):
    the sync waits the lock timeout that SQLite's busy timeout has, then says so in one line."""
    import psycopg

    from gwsync.storage import sqlite as dbfiles

    synced_then_one_more(env, pg_url)
    monkeypatch.setattr(dbfiles, "LOCK_TIMEOUT", 1.0)  # 30 s in real use
    holder = psycopg.connect(pg_url)  # its transaction holds the lock until it ends
    holder.execute("LOCK TABLE activities IN ACCESS EXCLUSIVE MODE")
    release = threading.Timer(30, holder.close)  # should the sync wait for ever: let it go, and fail below
    release.start()
    try:
        started = time.monotonic()
        result = env.cli("sync")
        assert time.monotonic() - started < 20
        assert result.exit_code == 1, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "locked by another program" in lines[0], result.stderr
        assert waiting_subjects(env) == ["Test mail 2"]
    finally:
        release.cancel()
        holder.close()
    assert env.cli("sync").exit_code == 0
    assert sorted(a["subject"] for a in env.cli_json("activities")[1]) == ["Test mail 1", "Test mail 2"]
    assert env.messages(DONE) == {}


def test_an_sqlite_store_loads_neither_psycopg_nor_the_postgresql_dialect(tmp_path):
    code = ("import sys; from pathlib import Path; from gwsync.crm.embedded import EmbeddedCRM; "
            "from gwsync.crm import ActivityFilter; "
            f"s = EmbeddedCRM(Path({str(tmp_path / 'crm.db')!r}), Path({str(tmp_path / 'docs')!r}), {{'O': 'Offen'}}, "
            "'x{id}'); s.list_activities(ActivityFilter(involving='bob')); s.unassigned_senders(); s.close(); "
            "print(sorted(m for m in sys.modules if m.startswith(('psycopg', 'sqlalchemy.dialects.postgresql'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"

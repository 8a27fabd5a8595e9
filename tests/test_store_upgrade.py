"""Databases written by earlier versions open with today's code and are upgraded by the stores'
migrations (gwsync/migrations.py): data kept, ids never reused afterwards, the schema of a new
database, and calendar links that never rewrite another activity's item.

fixtures/databases/*-v0.sqlite come from before schema versions (make_v0.py), *-v1.sqlite from
schema version 1 (make_v1.py). Also: two processes upgrading at once, an upgrade interrupted by an
exception or a kill, and a database from a newer gwsync."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlite_utils

from gwsync.calendar.icalmap import EVENT, Link, new_item
from gwsync.crm import ActivityDraft, ActivityFilter
from gwsync.crm import embedded as crmstore
from gwsync.crm.embedded import EmbeddedCRM
from gwsync.errors import StoreError
from gwsync.storage import state as state_module
from gwsync.storage.database import SCHEMA_TABLE, shown
from gwsync.storage.state import StateStore

ROOT = Path(__file__).resolve().parent.parent
DATABASES = ROOT / "fixtures" / "databases"
STATUSES = {"I": "Importiert", "O": "Offen", "E": "Erledigt"}
LINK = "https://crm.example.com/activities/{id}"


def rows(path: Path, table: str) -> list[tuple]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
    finally:
        conn.close()


def open_crm(path: Path, tmp_path: Path) -> EmbeddedCRM:
    return EmbeddedCRM(path, tmp_path / "documents", STATUSES, LINK)


def test_a_crm_database_from_before_is_upgraded_keeping_its_data_and_never_reuses_ids(tmp_path):
    path = tmp_path / "crm.db"
    shutil.copyfile(DATABASES / "crm-v0.sqlite", path)
    old = {table: rows(path, table) for table in ("activities", "documents", "partners", "contacts",
                                                  "communications", "partner_addresses")}

    crm = open_crm(path, tmp_path)
    acts = crm.list_activities(ActivityFilter())
    store = crm.store_id()
    uuids = {a.id: a.uuid for a in acts}
    new_id = crm.create_activities([ActivityDraft(key="crm:after-upgrade", kind="TERMIN", status="O",
                                                  subject="Nach dem Update")])[0]
    crm.delete_activity(new_id)
    newer_id = crm.create_activities([ActivityDraft(key="crm:after-delete", kind="TERMIN", status="O",
                                                    subject="Danach")])[0]
    crm.close()

    assert [a.id for a in acts] == [1, 2, 3]
    assert [a.subject for a in acts] == ["Kundentermin", "Angebot", "Vom Handy"]
    mail = acts[1]
    assert [(d.filename, d.category, d.keyword) for d in mail.documents] == [
        ("angebot.pdf", "Angebot", "2026"), ("logo.png", None, None)]
    assert (mail.contact_id, mail.partner_id, mail.sender) == (1, 1, "erika@acme.example")
    assert len(set(uuids.values())) == 3 and all(len(u) == 36 for u in uuids.values())
    assert len(store) == 36
    # Every old row is still there, column for column (the columns added since aside, empty but the uuid).
    new_columns = [c[1] for c in sqlite3.connect(path).execute("PRAGMA table_info(activities)")]
    added = ("uuid", "sender_name", "recipients_to", "recipients_cc", "participants", "delegated_to", "request",
             "project", "attendees", "private")
    kept = [tuple(v for c, v in zip(new_columns, row, strict=True) if c not in added)
            for row in rows(path, "activities")]
    assert kept[:3] == old["activities"]
    assert all(row[new_columns.index(c)] == (0 if c == "private" else None)
               for row in rows(path, "activities")[:3] for c in added[1:])
    assert (mail.sender_name, mail.recipients_to, mail.recipients_cc) == (None, [], [])
    for table in ("documents", "partners", "contacts", "communications", "partner_addresses"):
        assert rows(path, table) == old[table], table
    assert new_id == 4 and newer_id == 5  # after the upgrade, a deleted id is never given out again

    conn = sqlite3.connect(path)
    assert "AUTOINCREMENT" in conn.execute("SELECT sql FROM sqlite_master WHERE name = 'activities'").fetchone()[0]
    assert conn.execute("PRAGMA user_version").fetchone()[0] >= 1
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    indexes = {r[1] for r in conn.execute("PRAGMA index_list(activities)")}
    assert {"idx_activities_key", "idx_activities_sender", "idx_activities_partner_id"} <= indexes
    conn.close()

    crm = open_crm(path, tmp_path)  # opening again changes nothing
    try:
        assert crm.store_id() == store
        assert {a.id: a.uuid for a in crm.list_activities(ActivityFilter()) if a.id in uuids} == uuids
        assert crm.create_activities([ActivityDraft(key="f" * 64, kind="MAILEIN", status="E", subject="x")]) == [2]
        assert crm.create_activities([ActivityDraft(key="crm:third", kind="TERMIN", status="O",
                                                    subject="Dritte")]) == [6]
    finally:
        crm.close()


def test_a_state_database_from_before_keeps_its_links_memberships_and_records(tmp_path):
    path = tmp_path / "state.db"
    shutil.copyfile(DATABASES / "state-v0.sqlite", path)

    state = StateStore(path)
    try:
        events = state.links("alice", "events")
        tasks = state.links("alice", "tasks")
        assert sorted(l.activity_id for l in events) == [1, 4] and [l.activity_id for l in tasks] == [3]
        assert all(l.identity is None for l in events + tasks)  # unknown until the next sync checks them
        assert events[0].base["subject"] in ("Kundentermin", "Board meeting")
        assert state.memberships("alice", "tasks") == {2: True}
        (record,) = state.by_outcome("imported")
        assert record.activity_id == 2 and record.key == "f" * 64
        assert [r["area"] for r in state.runs()] == ["events"]
    finally:
        state.close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] >= 1


@pytest.mark.sqlite_files
def test_old_links_never_rewrite_another_activitys_item_after_the_upgrade(make_env):
    """The fixture's board meeting (id 4) was deleted before the upgrade, its link is still in
    the state. The upgraded store gives id 4 out once more: the next sync must delete the board
    meeting's item (unchanged there), not fill it with the new activity."""
    env = make_env(areas=("events",))
    crm_db, state_db = env.dir / "crm.db", env.dir / "state.db"
    shutil.copyfile(DATABASES / "crm-v0.sqlite", crm_db)
    shutil.copyfile(DATABASES / "state-v0.sqlite", state_db)
    path = env.collection_url("events").split(str(env.radicale.port), 1)[1]
    conn = sqlite3.connect(state_db)
    links = conn.execute("SELECT activity_id, uid, href, base FROM links WHERE area = 'events'").fetchall()
    for activity_id, uid, href, base in links:  # put the fixture's items on this test's server
        name = href.rsplit("/", 1)[-1]
        etag = env.dav_put("events", name, new_item(uid, EVENT, json.loads(base), "E",
                                                    Link(LINK.format(id=activity_id), activity_id)))
        conn.execute("UPDATE links SET href = ?, etag = ? WHERE activity_id = ? AND area = 'events'",
                     (path + name, etag, activity_id))
    conn.commit()
    conn.close()
    before = env.dav_items("events")

    result = env.cli("activity", "add", "--kind", "TERMIN", "--subject", "Salary review (confidential)",
                     "--start", "2026-12-12T10:00")
    assert result.exit_code == 0, result.stderr
    code, out = env.cli_json("sync", "--only", "events")

    after = env.dav_items("events")
    assert not any("Salary review" in text for name, (etag, text) in after.items() if name in before)
    board = next(name for name, (etag, text) in before.items() if "Board meeting" in text)
    kunde = next(name for name, (etag, text) in before.items() if "Kundentermin" in text)
    assert board not in after and after[kunde] == before[kunde]
    assert code == 0, out
    assert sorted(text.split("SUMMARY:", 1)[1].split("\n", 1)[0].strip() for _, text in after.values()) == [
        "Kundentermin", "Salary review (confidential)"]


# -- schema versions: every earlier database reaches the schema of a new one ----------------------
#
# Fixtures: *-v0.sqlite from before schema versions (make_v0.py), *-v1.sqlite from schema
# version 1 (make_v1.py; state-v1-mail.sqlite is a mail-only setup whose state never made the
# tables that version 1 made on first use). Older shapes still are derived from them below.

def schema(path: Path) -> dict:
    """The schema as SQLite understands it: tables with their columns in order, foreign keys,
    AUTOINCREMENT and indexes (not the CREATE statements' spelling, which ALTER TABLE rewrites)."""
    conn = sqlite3.connect(path)
    try:
        found = {}
        for kind, name, sql in conn.execute("SELECT type, name, sql FROM sqlite_master WHERE type != 'index'"):
            found[name] = {
                "type": kind,
                "columns": [tuple(r[1:]) for r in conn.execute(f'PRAGMA table_xinfo("{name}")')],
                "foreign_keys": sorted(tuple(r[2:]) for r in conn.execute(f'PRAGMA foreign_key_list("{name}")')),
                "autoincrement": "AUTOINCREMENT" in (sql or "").upper(),
                "indexes": sorted((r[1], r[2], r[3], r[4], tuple(c[2] for c in conn.execute(
                    f'PRAGMA index_info("{r[1]}")'))) for r in conn.execute(f'PRAGMA index_list("{name}")')),
            }
        return found
    finally:
        conn.close()


def version(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("PRAGMA user_version").fetchone()[0]
    finally:
        conn.close()


def all_rows(path: Path) -> dict[str, tuple[list[str], list[tuple]]]:
    """Every table's columns and rows (sorted), to tell whether a file's data changed."""
    conn = sqlite3.connect(path)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: ([c[1] for c in conn.execute(f'PRAGMA table_info("{t}")')],
                    sorted(conn.execute(f'SELECT * FROM "{t}"').fetchall(), key=repr)) for t in tables}
    finally:
        conn.close()


def kept(old: dict, path: Path) -> None:
    """Every row of every table of `old` is in the database at `path`, column for column."""
    new = all_rows(path)
    for table, (columns, rows) in old.items():
        new_columns, new_rows = new[table]
        at = [new_columns.index(c) for c in columns]
        assert sorted((tuple(r[i] for i in at) for r in new_rows), key=repr) == rows, table


def fresh_crm(tmp_path: Path) -> Path:
    path = tmp_path / "fresh" / "crm.db"
    open_crm(path, tmp_path / "fresh").close()
    return path


def fresh_state(tmp_path: Path) -> Path:
    path = tmp_path / "fresh" / "state.db"
    StateStore(path).close()
    return path


def _first_release_crm(conn) -> None:
    """A CRM of the first release: no owner, rrule, updated_at, body_html, no partner and contact indexes."""
    conn.execute("DROP INDEX idx_activities_partner_id")
    conn.execute("DROP INDEX idx_activities_contact_id")
    for column in ("owner", "rrule", "updated_at", "body_html"):
        conn.execute(f'ALTER TABLE activities DROP COLUMN "{column}"')


def _first_calendar_state(conn) -> None:
    """A state of the first calendar release: calendar tables without dav_cache, no runs.last_success."""
    conn.execute("DROP TABLE dav_cache")
    conn.execute("ALTER TABLE runs DROP COLUMN last_success")


def _first_release_state(conn) -> None:
    for table in ("links", "collections", "dav_cache", "membership", "item_failures"):
        conn.execute(f"DROP TABLE {table}")
    conn.execute("ALTER TABLE runs DROP COLUMN last_success")


def earlier(tmp_path: Path, fixture: str, change=None) -> Path:
    path = tmp_path / fixture.replace(".sqlite", ".db")
    shutil.copyfile(DATABASES / fixture, path)
    if change is not None:
        conn = sqlite3.connect(path)
        change(conn)
        conn.commit()
        conn.close()
    return path


CRM_EARLIER = [("crm-v0.sqlite", None), ("crm-v0.sqlite", _first_release_crm), ("crm-v1.sqlite", None)]
STATE_EARLIER = [("state-v0.sqlite", None), ("state-v0.sqlite", _first_calendar_state),
                 ("state-v0.sqlite", _first_release_state), ("state-v1.sqlite", None),
                 ("state-v1-mail.sqlite", None)]


def _id(value) -> str:
    return value if isinstance(value, str) else (value.__name__.strip("_") if value else "as committed")


@pytest.mark.parametrize("fixture, change", CRM_EARLIER, ids=_id)
def test_every_earlier_crm_database_reaches_the_schema_of_a_new_one_keeping_its_data(tmp_path, fixture, change):
    path = earlier(tmp_path, fixture, change)
    old = all_rows(path)
    top = max(r[0] for r in old["activities"][1])

    crm = open_crm(path, tmp_path)
    crm.close()

    assert schema(path) == schema(fresh_crm(tmp_path))
    assert version(path) == version(fresh_crm(tmp_path)) == crmstore.SCHEMA_VERSION
    kept(old, path)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    crm = open_crm(path, tmp_path)
    try:  # the ids there were, and the highest ever given out (crm-v1's deleted 5), are not given again
        new_id = crm.create_activities([ActivityDraft(key="crm:upgraded", kind="TERMIN", status="O", subject="Neu")])[0]
        assert new_id == (5 if fixture == "crm-v1.sqlite" else top) + 1
        assert len(crm.store_id()) == 36
    finally:
        crm.close()


@pytest.mark.parametrize("fixture, change", STATE_EARLIER, ids=_id)
def test_every_earlier_state_database_reaches_the_schema_of_a_new_one_keeping_its_data(tmp_path, fixture, change):
    path = earlier(tmp_path, fixture, change)
    old = all_rows(path)

    StateStore(path).close()

    assert schema(path) == schema(fresh_state(tmp_path))
    assert version(path) == version(fresh_state(tmp_path)) == state_module.SCHEMA_VERSION
    kept(old, path)
    state = StateStore(path)
    try:  # every table answers, also those an earlier version made on first use only
        assert [lock["account"] for lock in state.locks()] == (["bob"] if fixture == "state-v1.sqlite" else [])
        state.lock("dave", "caldav", "login refused", credential="caldav dave@dav.example")
        assert state.lock_of("caldav dave@dav.example")["reason"] == "login refused"
        assert state.lock_of("other", users=[("dave", "caldav")]) is None  # keyed: found by its credential
        state.save_dav_cache("dave", "events", "src", "https://dav.example/dave/", "basic")
        assert state.dav_cache("dave", "events", "src") == ("https://dav.example/dave/", "basic")
        state.record_run("dave", "events", True, {}, None)
        state.record_run("dave", "events", False, {}, "failed")
        assert next(r for r in state.runs() if r["account"] == "dave")["last_success"] is not None
        assert state.links("dave", "events") == [] and state.item_failures("dave", "events") == {}
    finally:
        state.close()


def test_the_version_1_state_keeps_its_lock_links_tokens_and_last_success(tmp_path):
    path = earlier(tmp_path, "state-v1.sqlite")
    state = StateStore(path)
    try:
        assert [(l["account"], l["service"]) for l in state.locks()] == [("bob", "imap")]
        # A lock from before locks had credentials still stops the service that set it.
        assert state.lock_of("imap bob@mail.example", users=[("bob", "imap")])["account"] == "bob"
        assert state.lock_of("imap bob@mail.example", users=[("alice", "imap")]) is None
        assert sorted(l.activity_id for l in state.links("alice", "events")) == [1, 5]
        assert all(l.identity and len(l.identity) == 36 for l in state.links("alice", "events"))
        assert state.sync_token("alice", "events", "https://dav.example/alice/calendar/") == "token-17"
        assert state.dav_cache("alice", "events", "https://dav.example/") == (
            "https://dav.example/alice/calendar/", "basic")
        assert list(state.item_failures("alice", "events")) == ["/alice/calendar/broken.ics"]
        mail_run = next(r for r in state.runs() if r["area"] == "mail")
        assert (mail_run["ok"], mail_run["error"]) == (0, "IMAP connection dropped") and mail_run["last_success"]
        assert [r.subject for r in state.not_imported()] == ["Wer bin ich", "Kaputt"]
    finally:
        state.close()


# -- a database from a newer gwsync -----------------------------------------------------------------

@pytest.mark.parametrize("which", ["crm", "state"])
def test_a_database_from_a_newer_gwsync_is_one_line_and_stays_untouched(tmp_path, which):
    path = fresh_crm(tmp_path) if which == "crm" else fresh_state(tmp_path)
    known = crmstore.SCHEMA_VERSION if which == "crm" else state_module.SCHEMA_VERSION
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {known + 3}")
    conn.close()
    before = all_rows(path)

    with pytest.raises(StoreError) as caught:
        open_crm(path, tmp_path) if which == "crm" else StateStore(path)

    what = "CRM database" if which == "crm" else "state database"
    assert str(caught.value) == (f"the {what} {path} was written by a newer gwsync "
                                 f"(schema {known + 3}, this one knows {known}): upgrade gwsync")
    assert caught.value.exit_code == 1
    assert all_rows(path) == before and version(path) == known + 3


@pytest.mark.parametrize("which", ["crm", "state"])
def test_the_command_line_says_a_newer_database_in_one_line(env, which):
    assert env.cli("activities").exit_code == 0  # makes both databases
    if env.database_url is None:
        path = str(env.dir / f"{which}.db")
        conn = sqlite3.connect(path)
        conn.execute("PRAGMA user_version = 99")
        conn.close()
    else:  # on PostgreSQL both stores' versions are rows of one table
        path = shown(env.database_url)
        env.state_sql(f"UPDATE {SCHEMA_TABLE} SET version = 99 WHERE store = :store", store=which)
    for command in ("sync", "status"):
        proc = env.subprocess(command)
        _, err = proc.communicate(timeout=60)
        lines = err.decode().strip().splitlines()
        assert proc.returncode == 1, err
        assert len(lines) == 1 and lines[0].startswith(f"gwsync: the {'CRM' if which == 'crm' else 'state'} "
                                                       f"database {path} was written by a newer gwsync (schema 99")
        assert lines[0].endswith("upgrade gwsync"), lines


# -- the migration mechanism ------------------------------------------------------------------------

def test_migrations_run_once_in_order_from_the_version_the_database_has(tmp_path):
    from gwsync.storage.migrations import Migration, upgrade
    from gwsync.storage.sqlite import open_private_db

    ran = []

    def step(name):
        def apply(db):
            ran.append(name)
            db.conn.execute(f'CREATE TABLE "{name}" (x)')
        return apply

    steps = [Migration(1, "a", step("a")), Migration(1, "b", step("b")), Migration(2, "c", step("c")),
             Migration(3, "d", step("d"))]
    conn = open_private_db(tmp_path / "toy.db", "toy database")
    db = sqlite_utils.Database(conn)
    assert upgrade(db, steps) == 3 and ran == ["a", "b", "c", "d"]
    assert upgrade(db, steps) == 3 and ran == ["a", "b", "c", "d"]  # nothing left to do
    conn.execute("DROP TABLE d")
    conn.execute("PRAGMA user_version = 2")
    assert upgrade(db, steps) == 3 and ran == ["a", "b", "c", "d", "d"]
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 3
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1  # switched off for the steps only
    with pytest.raises(ValueError, match="out of order"):
        upgrade(db, [steps[2], steps[0]])
    conn.close()


CHILD = """
import dataclasses, os, sys, time
from pathlib import Path
from gwsync.crm import embedded as crmstore
from gwsync.storage import migrations, state

which, path, log_path, start = sys.argv[1], Path(sys.argv[2]), sys.argv[3], float(sys.argv[4])
module = crmstore if which == "crm" else state
log = open(log_path, "a")

def note(line):
    log.write(f"{os.getpid()} {line}\\n")
    log.flush()

read = migrations.schema_version
def logged_read(conn):
    found = read(conn)
    note(f"read {found}")
    return found
migrations.schema_version = logged_read

def slowed(step, first):
    def apply(db):
        note(f"step {step.description}")
        step.apply(db)
        time.sleep(0.5 if first else 0.05)  # keep the other process waiting for the lock
        if os.environ.get("DIE_IN_STEP") == step.description:
            os._exit(9)
    return dataclasses.replace(step, apply=apply)
module.MIGRATIONS = [slowed(step, i == 0) for i, step in enumerate(module.MIGRATIONS)]

time.sleep(max(0.0, start - time.time()))
if which == "crm":
    store = crmstore.EmbeddedCRM(path, path.parent / "documents", {"O": "Offen"}, "x{id}")
    print(store.store_id(), len(store.list_activities(crmstore.ActivityFilter())))
else:
    store = state.StateStore(path)
    print(len(store.runs()))
store.close()
"""


def child(which: str, path: Path, log: Path, start: float, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, which, str(path), str(log), str(start)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **env})


@pytest.mark.parametrize("journal", ["wal", "delete"], ids=["as gwsync leaves it", "a restored backup"])
@pytest.mark.parametrize("which, fixture", [("crm", "crm-v0.sqlite"), ("state", "state-v1-mail.sqlite")])
def test_two_processes_opening_an_old_database_at_once_upgrade_it_once(tmp_path, which, fixture, journal):
    """gwsync leaves its databases in WAL mode; a backup (sqlite3 .backup, VACUUM INTO) is in
    rollback mode, and the two processes race to convert it first."""
    path = earlier(tmp_path, fixture, lambda conn: conn.execute(f"PRAGMA journal_mode={journal}"))
    old = all_rows(path)
    log = tmp_path / "log"
    start = time.time() + 1.5
    procs = [child(which, path, log, start) for _ in range(2)]
    results = [proc.communicate(timeout=120) for proc in procs]

    assert [proc.returncode for proc in procs] == [0, 0], [err for out, err in results]
    assert results[0][0] == results[1][0] and results[0][0].strip()  # one store id, the same data
    lines = [line.split(" ", 2) for line in log.read_text().splitlines()]
    pids = {str(proc.pid) for proc in procs}
    first_read = {pid: next(text for p, kind, text in lines if p == pid and kind == "read") for pid in pids}
    assert first_read == {pid: str(version(DATABASES / fixture)) for pid in pids}  # both found it old
    steps = [(p, text) for p, kind, text in lines if kind == "step"]
    module = crmstore if which == "crm" else state_module
    assert len({p for p, _ in steps}) == 1  # one process upgraded, the other found it done
    assert [text for _, text in steps] == [m.description for m in module.MIGRATIONS
                                           if m.version > version(DATABASES / fixture)]
    assert version(path) == module.SCHEMA_VERSION
    kept(old, path)


def _unchanged(path: Path, fixture: str, old: dict, old_schema: dict) -> None:
    assert version(path) == version(DATABASES / fixture)
    assert schema(path) == old_schema
    assert all_rows(path) == old


@pytest.mark.parametrize("which, fixture", [("crm", "crm-v0.sqlite"), ("state", "state-v1-mail.sqlite")])
def test_an_upgrade_failing_in_its_last_step_leaves_the_database_as_it_was(tmp_path, monkeypatch, which, fixture):
    from gwsync.storage.migrations import Migration

    module = crmstore if which == "crm" else state_module
    path = earlier(tmp_path, fixture)
    old, old_schema = all_rows(path), schema(path)
    *before, last = module.MIGRATIONS

    def fails_after_its_work(db):
        last.apply(db)
        raise RuntimeError("interrupted")

    monkeypatch.setattr(module, "MIGRATIONS", [*before, Migration(last.version, last.description,
                                                                  fails_after_its_work)])
    with pytest.raises(RuntimeError, match="interrupted"):
        open_crm(path, tmp_path) if which == "crm" else StateStore(path)
    _unchanged(path, fixture, old, old_schema)

    monkeypatch.undo()  # the next start upgrades it
    (open_crm(path, tmp_path) if which == "crm" else StateStore(path)).close()
    assert version(path) == module.SCHEMA_VERSION
    kept(old, path)


@pytest.mark.parametrize("which, fixture", [("crm", "crm-v0.sqlite"), ("state", "state-v1-mail.sqlite")])
def test_a_process_killed_in_the_last_step_of_an_upgrade_leaves_the_database_as_it_was(tmp_path, which, fixture):
    module = crmstore if which == "crm" else state_module
    path = earlier(tmp_path, fixture)
    old, old_schema = all_rows(path), schema(path)

    proc = child(which, path, tmp_path / "log", 0, DIE_IN_STEP=module.MIGRATIONS[-1].description)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 9, err
    assert f"step {module.MIGRATIONS[-1].description}" in (tmp_path / "log").read_text()
    _unchanged(path, fixture, old, old_schema)

    (open_crm(path, tmp_path) if which == "crm" else StateStore(path)).close()
    assert version(path) == module.SCHEMA_VERSION
    kept(old, path)


@pytest.mark.parametrize("module", [crmstore, state_module], ids=["crm", "state"])
def test_each_store_has_one_ordered_list_and_a_new_database_is_made_by_it(tmp_path, module):
    """No second way for the schema to come to be: a new database runs every step from 0."""
    from gwsync.storage.migrations import Migration

    versions = [m.version for m in module.MIGRATIONS]
    assert versions == sorted(versions) and versions[0] >= 1 and versions[-1] == module.SCHEMA_VERSION
    assert len({m.description for m in module.MIGRATIONS}) == len(module.MIGRATIONS)
    assert all(isinstance(m, Migration) for m in module.MIGRATIONS)
    path = fresh_crm(tmp_path) if module is crmstore else fresh_state(tmp_path)
    log = tmp_path / "log"
    proc = child("crm" if module is crmstore else "state", tmp_path / "new.db", log, 0)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert [line.split(" ", 2)[2] for line in log.read_text().splitlines() if " step " in line] == [
        m.description for m in module.MIGRATIONS]
    assert schema(tmp_path / "new.db") == schema(path)

"""Databases written by the code before never-reused ids (fixtures/databases/*-v0.sqlite, made by
fixtures/databases/make_v0.py) open with today's code: data kept, ids never reused afterwards,
and their calendar links keep working without ever rewriting another activity's item."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

from gwsync.crm import ActivityDraft, ActivityFilter
from gwsync.crmstore import EmbeddedCRM
from gwsync.icalmap import EVENT, Link, new_item
from gwsync.state import StateStore

DATABASES = Path(__file__).resolve().parent.parent / "fixtures" / "databases"
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
    # Every old row is still there, column for column (the new uuid column aside).
    new_columns = [c[1] for c in sqlite3.connect(path).execute("PRAGMA table_info(activities)")]
    kept = [tuple(v for c, v in zip(new_columns, row) if c != "uuid") for row in rows(path, "activities")]
    assert kept[:3] == old["activities"]
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

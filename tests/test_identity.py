"""Identities that are never reused: a server item is never rewritten for an activity other than
the one it was linked to, whatever happened to the CRM (deletes, a restored backup, a replaced
store), and gwsync's own properties are trusted only from items this store wrote.

Real Dovecot and Radicale, as in test_calendar_sync.py.
"""

from __future__ import annotations

import shutil

import pytest

from conftest import make_mail
from gwsync.crm import ActivityFilter

AREAS = ("mail", "events", "tasks")
INBOX_FOLDER = "INBOX/CRM Eingang [O]"
SALARY = "Salary list (confidential)"
REVIEW = "Salary review (confidential)"


def sync(env, *args):
    code, out = env.cli_json("sync", *args)
    return code, out["accounts"]["alice"]


def add(env, subject: str, start: str = "2026-12-09T10:00", kind: str = "TERMIN") -> int:
    result = env.cli("activity", "add", "--kind", kind, "--subject", subject, "--start", start)
    assert result.exit_code == 0, result.stderr
    return int(result.stdout.strip())


def activities(env):
    with env.engine() as engine:
        return engine.crm.list_activities(ActivityFilter())


def subjects(env, area: str) -> dict[str, str]:
    """Item name -> the SUMMARY line of every item in the collection."""
    return {name: next(l for l in text.replace("\r\n", "\n").split("\n") if l.startswith("SUMMARY"))
            for name, (etag, text) in env.dav_items(area).items()}


def import_mail(env, n: int, subject: str, body: str) -> int:
    env.append(INBOX_FOLDER, make_mail(n, subject=subject, body=body))
    code, out = sync(env, "--only", "mail")
    assert code == 0 and out["mail"]["imported"] == 1, out
    (new,) = [a for a in activities(env) if a.subject == subject]
    return new.id


def with_phone_extras(text: str) -> str:
    """What a phone adds: an attendee and an alarm (no mapped field changes)."""
    component = "VEVENT" if "END:VEVENT" in text else "VTODO"
    return text.replace(f"END:{component}", "ATTENDEE;CN=Board:mailto:board@example.com\nBEGIN:VALARM\nACTION:DISPLAY\n"
                                      f"DESCRIPTION:Reminder\nTRIGGER:-PT15M\nEND:VALARM\nEND:{component}")


def copy_db(src, dst) -> None:
    """Copy a CRM database file as a backup tool would (no process has it open)."""
    for suffix in ("-wal", "-shm"):
        (dst.parent / (dst.name + suffix)).unlink(missing_ok=True)
    shutil.copyfile(src, dst)
    for suffix in ("-wal", "-shm"):
        extra = src.parent / (src.name + suffix)
        if extra.exists():
            shutil.copyfile(extra, dst.parent / (dst.name + suffix))


@pytest.mark.parametrize("area, kind", [("events", "TERMIN"), ("tasks", "AUFGABE")])
def test_a_deleted_activitys_id_is_never_taken_by_a_new_mail_and_its_item_is_deleted_not_rewritten(
        make_env, area, kind):
    env = make_env(areas=AREAS)
    board = add(env, "Board meeting", kind=kind)
    code, out = sync(env, "--only", area)
    assert code == 0 and out[area]["created_groupware"] == 1
    (name, (etag, text)), = env.dav_items(area).items()
    env.dav_put(area, name, with_phone_extras(text), etag)  # the phone invites the board
    assert sync(env, "--only", area)[0] == 0
    assert env.cli("activity", "delete", str(board)).exit_code == 0

    salary = import_mail(env, 1, SALARY, "Names and salaries of everyone.")
    code, out = sync(env, "--only", area)

    assert SALARY not in " ".join(text for _, text in env.dav_items(area).values())
    assert env.dav_items(area) == {}  # the delete reached the server; nothing was rewritten
    assert code == 0 and out[area]["deleted_groupware"] == 1 and out[area]["updated_groupware"] == 0, out
    assert salary != board  # the id of a deleted activity is never given out again
    assert [a.subject for a in activities(env)] == [SALARY]


@pytest.mark.sqlite_files
def test_after_restoring_an_older_crm_backup_new_activities_never_rewrite_the_lost_ones_items(make_env):
    env = make_env(areas=AREAS)
    crm_db, backup = env.dir / "crm.db", env.dir / "crm-backup.db"
    add(env, "Alt eins", "2026-12-07T10:00")
    add(env, "Alt zwei", "2026-12-07T12:00")
    assert sync(env, "--only", "events")[0] == 0
    copy_db(crm_db, backup)  # the nightly backup
    add(env, "Board meeting", "2026-12-09T10:00")
    add(env, "Strategy", "2026-12-10T10:00")
    assert sync(env, "--only", "events")[0] == 0
    before = env.dav_items("events")
    board_name = next(n for n, s in subjects(env, "events").items() if s == "SUMMARY:Board meeting")
    strategy_name = next(n for n, s in subjects(env, "events").items() if s == "SUMMARY:Strategy")
    # The strategy meeting is moved on the phone after the last sync: that edit must survive.
    etag, text = before[strategy_name]
    env.dav_put("events", strategy_name, text.replace("SUMMARY:Strategy", "SUMMARY:Strategy (moved)"), etag)

    copy_db(backup, crm_db)  # the CRM is restored: Board meeting and Strategy are lost
    import_mail(env, 2, SALARY, "Names and salaries of everyone.")
    add(env, "Lunch", "2026-12-11T12:00")
    code, out = sync(env, "--only", "events")

    after = subjects(env, "events")
    assert SALARY not in " ".join(after.values())  # no item was rewritten with the mail
    assert code == 0, out
    assert board_name not in after  # unchanged on the server, its activity gone: deleted
    assert after[strategy_name] == "SUMMARY:Strategy (moved)"  # edited there: kept, back in the CRM
    assert sorted(after.values()) == ["SUMMARY:Alt eins", "SUMMARY:Alt zwei", "SUMMARY:Lunch",
                                      "SUMMARY:Strategy (moved)"]
    for name in ("Alt eins", "Alt zwei"):  # the restored activities' items are untouched
        item = next(n for n, s in after.items() if s == f"SUMMARY:{name}")
        assert env.dav_items("events")[item] == before[item]
    assert sorted(a.subject for a in activities(env)) == sorted(
        ["Alt eins", "Alt zwei", SALARY, "Lunch", "Strategy (moved)"])
    code, out = sync(env, "--only", "events")  # settled
    assert code == 0 and out["events"]["requests"] == 1


@pytest.mark.sqlite_files
def test_after_restoring_both_databases_new_activities_never_claim_items_made_since_the_backup(make_env):
    env = make_env(areas=AREAS)
    add(env, "Alt", "2026-12-07T10:00")
    assert sync(env, "--only", "events")[0] == 0
    for name in ("crm.db", "state.db"):
        copy_db(env.dir / name, env.dir / f"{name}.bak")
    add(env, "Board meeting", "2026-12-09T10:00")
    assert sync(env, "--only", "events")[0] == 0
    board = {name: item for name, item in env.dav_items("events").items() if "Board meeting" in item[1]}
    assert len(board) == 1

    for name in ("crm.db", "state.db"):  # the machine is restored from its backup
        copy_db(env.dir / f"{name}.bak", env.dir / name)
    add(env, REVIEW, "2026-12-12T10:00")  # takes the board meeting's id again
    code, out = sync(env, "--only", "events")

    items = env.dav_items("events")
    for name in board:
        assert "SUMMARY:Board meeting" in items[name][1] and REVIEW not in items[name][1]
    assert code == 0, out
    assert sorted(subjects(env, "events").values()) == ["SUMMARY:Alt", "SUMMARY:Board meeting", f"SUMMARY:{REVIEW}"]
    # The board meeting's item is a stranger to the restored CRM: it comes back in as a new activity.
    assert sorted(a.subject for a in activities(env)) == ["Alt", "Board meeting", REVIEW]


@pytest.mark.sqlite_files
def test_a_push_made_for_a_lost_activity_never_pushes_the_one_that_takes_its_id(make_env):
    env = make_env(areas=AREAS)
    crm_db, backup = env.dir / "crm.db", env.dir / "crm-backup.db"
    import_mail(env, 5, "Angebot", "Bitte Angebot schicken.")
    copy_db(crm_db, backup)
    pushed = import_mail(env, 6, "Rückruf Erika", "Bitte zurückrufen.")
    assert env.cli("push", str(pushed), "--as", "task").exit_code == 0
    (name, (etag, text)), = env.dav_items("tasks").items()
    assert "Rückruf Erika" in text

    copy_db(backup, crm_db)  # the pushed mail is lost with the restore
    import_mail(env, 7, SALARY, "Names and salaries of everyone.")  # takes its id
    code, out = sync(env, "--only", "tasks")

    assert not any(SALARY in text for _, text in env.dav_items("tasks").values())  # neither rewritten nor pushed
    assert env.dav_items("tasks") == {}  # the lost activity's task: unchanged there, so deleted
    assert code == 0 and out["tasks"]["deleted_groupware"] == 1, out


@pytest.mark.sqlite_files
def test_a_replaced_crm_never_claims_the_old_stores_items(make_env):
    """A new, empty CRM (and a lost state database): its activity 1 is not the old store's 1."""
    env = make_env(areas=AREAS)
    add(env, "Board meeting", "2026-12-09T10:00")
    assert sync(env, "--only", "events")[0] == 0
    (name, (etag, text)), = env.dav_items("events").items()
    for db in ("crm.db", "state.db"):
        (env.dir / db).unlink()

    add(env, REVIEW, "2026-12-12T10:00")  # id 1 of the new store
    code, out = sync(env, "--only", "events")

    items = env.dav_items("events")
    assert "Board meeting" in items[name][1] and REVIEW not in items[name][1]
    assert code == 0, out
    assert sorted(a.subject for a in activities(env)) == ["Board meeting", REVIEW]
    assert len(items) == 2
    board = next(a for a in activities(env) if a.subject == "Board meeting")
    assert f"X-GWSYNC-ACTIVITY-ID:{board.id}" in items[name][1].replace("\r\n ", "")


def test_a_foreign_event_carrying_a_task_kind_stays_one_event(make_env):
    """Finding 9b as reported: the event became an AUFGABE and then a VTODO as well."""
    from test_calendar_sync import event

    env = make_env(areas=AREAS)
    env.dav_put("events", "fake.ics", event("fake", "Vom Handy", "X-GWSYNC-KIND:AUFGABE\n"))

    code, out = sync(env)

    assert code == 0, out
    assert [a.kind for a in activities(env)] == ["TERMIN"] and env.dav_items("tasks") == {}
    code, out = sync(env)
    assert code == 0 and [a.kind for a in activities(env)] == ["TERMIN"] and env.dav_items("tasks") == {}


def test_a_foreign_event_claiming_a_task_kind_and_an_activity_id_stays_one_event_of_its_own(make_env):
    """X-GWSYNC-KIND and X-GWSYNC-ACTIVITY-ID on an item this store never wrote are not trusted,
    and an event never becomes a task kind: no twin VTODO appears, no activity is taken over."""
    from test_calendar_sync import event

    env = make_env(areas=AREAS)
    mine = add(env, "Kundentermin")  # not synced yet: unlinked, like the planted item
    env.dav_put("events", "fake.ics", event("fake", "Vom Handy",
                                            f"X-GWSYNC-KIND:AUFGABE\nX-GWSYNC-ACTIVITY-ID:{mine}\n"))

    code, out = sync(env)

    assert code == 0, out
    assert sorted((a.subject, a.kind) for a in activities(env)) == [("Kundentermin", "TERMIN"),
                                                                    ("Vom Handy", "TERMIN")]
    assert env.dav_items("tasks") == {}
    assert sorted(subjects(env, "events").values()) == ["SUMMARY:Kundentermin", "SUMMARY:Vom Handy"]
    fake = env.dav_items("events")["fake.ics"][1]
    assert "X-GWSYNC-KIND:TERMIN" in fake and f"X-GWSYNC-ACTIVITY-ID:{mine}" not in fake
    code, out = sync(env)
    assert code == 0 and env.dav_items("tasks") == {}
    assert out["events"]["updated_crm"] == 0 and out["events"]["created_crm"] == 0
    assert sorted(a.kind for a in activities(env)) == ["TERMIN", "TERMIN"]


def test_a_linked_event_whose_kind_is_edited_to_a_task_kind_stays_an_event(make_env):
    env = make_env(areas=AREAS)
    add(env, "Kundentermin")
    assert sync(env)[0] == 0
    (name, (etag, text)), = env.dav_items("events").items()
    assert "X-GWSYNC-KIND:TERMIN" in text
    env.dav_put("events", name, text.replace("X-GWSYNC-KIND:TERMIN", "X-GWSYNC-KIND:WIEDERVORLAGE"), etag)

    code, out = sync(env)

    assert code == 0, out
    assert [a.kind for a in activities(env)] == ["TERMIN"] and env.dav_items("tasks") == {}

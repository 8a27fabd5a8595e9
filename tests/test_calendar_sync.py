"""Two-way CalDAV sync against real servers: every flow on each server of the matrix (Radicale,
Xandikos with and without auth, SabreDAV 1.8 with Basic and with Digest auth, Cyrus 3.6)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gwsync.calendar.icalmap import read_item
from gwsync.crm import ActivityFilter
from servers.dav import CyrusDav

OTHER = (Path(__file__).resolve().parent.parent / "fixtures" / "ical" / "other-client-event.ics").read_text()
AREAS = ("events", "tasks")


@pytest.fixture
def cal(make_env, calserver):
    """A user with events and tasks collections, on each CalDAV server in turn."""
    return make_env(areas=AREAS, calserver=calserver)


@pytest.fixture
def synccal(make_env, sync_calserver):
    """The same, on each server with WebDAV sync."""
    return make_env(areas=AREAS, calserver=sync_calserver)


def unfolded(text: str) -> list[str]:
    return text.replace("\r\n", "\n").replace("\n ", "").split("\n")


def sync(env, *args):
    code, out = env.cli_json("sync", *args)
    return code, out["accounts"]["alice"]


def todo(uid: str, summary: str, extra: str = "") -> str:
    return (f"BEGIN:VCALENDAR\nVERSION:2.0\nPRODID:-//Phone//EN\nBEGIN:VTODO\nUID:{uid}\nDTSTAMP:20261120T100000Z\n"
            f"SUMMARY:{summary}\nDUE;VALUE=DATE:20261205\n{extra}END:VTODO\nEND:VCALENDAR\n")


def event(uid: str, summary: str, extra: str = "") -> str:
    return (f"BEGIN:VCALENDAR\nVERSION:2.0\nPRODID:-//Phone//EN\nBEGIN:VEVENT\nUID:{uid}\nDTSTAMP:20261120T100000Z\n"
            f"DTSTART:20261201T090000Z\nDTEND:20261201T100000Z\nSUMMARY:{summary}\n{extra}END:VEVENT\nEND:VCALENDAR\n")


def activities(env, **flt):
    with env.engine() as engine:
        return engine.crm.list_activities(ActivityFilter(**flt))


# Cyrus (libical) stores some lines in a form of its own: X- values without TEXT escapes,
# CATEGORIES one property per value. gwsync must keep the server's form.
CYRUS_FORMS = {
    "X-OTHER-CLIENT-DATA:keep this value exactly\\, with escapes\\; and a very long folded continuation line that "
    "must survive": "X-OTHER-CLIENT-DATA:keep this value exactly, with escapes; and a very long folded continuation "
                    "line that must survive",
    "CATEGORIES:Kunde,Review": "CATEGORIES:Review",
}


def server_form(server, line: str) -> str:
    """A line as the server stores it."""
    return CYRUS_FORMS.get(line, line) if isinstance(server, CyrusDav) else line


def test_items_from_another_client_are_imported_and_linked_with_everything_else_unchanged(cal):
    cal.dav_put("events", "review.ics", OTHER)
    cal.dav_put("tasks", "t1.ics", todo("t1", "Angebot nachfassen"))
    (_, stored), = cal.dav_items("events").values()  # as the server keeps it (Xandikos re-serializes)

    code, out = sync(cal)

    assert code == 0, out
    assert out["events"]["created_crm"] == 1 and out["tasks"]["created_crm"] == 1
    acts = {a.subject: a for a in activities(cal)}
    review = acts["Wöchentliches Review – Größenordnung 😀"]
    assert review.kind == "BESPRECHUNG" and review.location == "Raum Süd"
    assert review.start == "2026-12-03T10:00:00-05:00[America/New_York]"
    assert review.rrule.startswith("FREQ=WEEKLY") and review.body == "Agenda:\n1. Zahlen\n2. Nächste Schritte"
    assert acts["Angebot nachfassen"].kind == "AUFGABE" and acts["Angebot nachfassen"].due == "2026-12-05"

    (etag, text), = cal.dav_items("events").values()
    lines = unfolded(text)
    link = f"https://crm.example.com/activities/{review.id}"
    assert any(l.startswith("DESCRIPTION:Agenda:") and l.endswith(f"CRM: {link}") for l in lines)
    assert f"X-GWSYNC-ACTIVITY-ID:{review.id}" in lines
    assert any(l.startswith("X-ALT-DESC;FMTTYPE=text/html:") and link in l for l in lines)
    original = unfolded(stored)
    for keep in ("ATTENDEE;CN=Carol;PARTSTAT=NEEDS-ACTION:mailto:carol@example.net", "TRIGGER:-PT15M",
                 "X-OTHER-CLIENT-DATA:keep this value exactly\\, with escapes\\; and a very long folded "
                 "continuation line that must survive", "SUMMARY:Review (verschoben)",
                 "RECURRENCE-ID;TZID=America/New_York:20261210T100000", "CATEGORIES:Kunde,Review"):
        form = server_form(cal.calserver, keep)
        assert keep in unfolded(OTHER) and form in original and form in lines, keep
    # every line the server held is still there, except the DESCRIPTION that got the link
    assert [l for l in original if l not in lines and not l.startswith(("DESCRIPTION:Agenda", "PRODID"))] == []


def test_a_second_sync_with_no_changes_does_nothing_and_costs_one_request_per_collection(cal):
    cal.dav_put("events", "e1.ics", event("e1", "Termin"))
    cal.dav_put("events", "e2.ics", event("e2", "Komma", "DESCRIPTION:a\\, b\\; c <d> & 'e'\n"))
    with cal.engine() as engine:
        from gwsync.crm import ActivityDraft

        engine.crm.create_activities([ActivityDraft(key="crm:x", kind="AUFGABE", status="O", subject="CRM task")])
    sync(cal)
    before = cal.dav_items("events") | cal.dav_items("tasks")

    code, out = sync(cal)

    assert code == 0
    for area in AREAS:
        assert {k: v for k, v in out[area].items() if k not in ("conflict_details", "requests")} == {
            "created_crm": 0, "updated_crm": 0, "deleted_crm": 0, "created_groupware": 0,
            "updated_groupware": 0, "deleted_groupware": 0, "conflicts": 0, "unlinked": 0}
        assert out[area]["requests"] == 1, (area, out[area]["requests"])
    assert cal.dav_items("events") | cal.dav_items("tasks") == before  # no write: same ETags


def test_crm_activities_appear_on_the_server_and_edits_travel_both_ways(cal):
    code = cal.cli("activity", "add", "--kind", "TERMIN", "--subject", "Kundentermin", "--start",
                   "2026-12-02T14:00:00+01:00[Europe/Berlin]", "--end", "2026-12-02T15:00:00+01:00[Europe/Berlin]",
                   "--location", "Hamburg").exit_code
    assert code == 0
    cal.cli("activity", "add", "--kind", "WIEDERVORLAGE", "--subject", "Rückruf Erika", "--due", "2026-12-03")
    code, out = sync(cal)
    assert code == 0 and out["events"]["created_groupware"] == 1 and out["tasks"]["created_groupware"] == 1

    (name, (etag, text)), = cal.dav_items("events").items()
    item = read_item(text, "E", "O")
    assert item.fields["subject"] == "Kundentermin" and item.fields["location"] == "Hamburg"
    assert item.fields["start"] == "2026-12-02T14:00:00+01:00[Europe/Berlin]" and "BEGIN:VTIMEZONE" in text
    (tname, (tetag, ttext)), = cal.dav_items("tasks").items()
    assert "BEGIN:VALARM" in ttext and read_item(ttext, "E", "O").fields["kind"] == "WIEDERVORLAGE"

    # edit on the phone: move the appointment; complete the task
    cal.dav_put("events", name, text.replace("SUMMARY:Kundentermin", "SUMMARY:Kundentermin (verschoben)"), etag)
    cal.dav_put("tasks", tname, ttext.replace("STATUS:NEEDS-ACTION", "STATUS:COMPLETED"), tetag)
    code, out = sync(cal)
    assert out["events"]["updated_crm"] == 1 and out["tasks"]["updated_crm"] == 1
    acts = {a.kind: a for a in activities(cal)}
    assert acts["TERMIN"].subject == "Kundentermin (verschoben)" and acts["WIEDERVORLAGE"].status == "E"

    # edit in the CRM
    cal.cli("activity", "edit", str(acts["TERMIN"].id), "--location", "Bremen")
    code, out = sync(cal)
    assert out["events"]["updated_groupware"] == 1
    (etag, text), = cal.dav_items("events").values()
    assert "LOCATION:Bremen" in text and "SUMMARY:Kundentermin (verschoben)" in text


def test_edits_of_different_fields_on_both_sides_merge_and_same_field_is_a_reported_conflict(make_env, calserver):
    env = make_env(areas=AREAS, extra='\n[sync]\nconflict = "crm"\n', calserver=calserver)
    env.dav_put("events", "m.ics", event("m", "Planung", "LOCATION:Alt\n"))
    sync(env)
    (act,) = activities(env)
    (etag, text), = env.dav_items("events").values()
    env.dav_put("events", "m.ics", text.replace("LOCATION:Alt", "LOCATION:Neu vom Handy"), etag)
    env.cli("activity", "edit", str(act.id), "--subject", "Planung 2027")

    code, out = sync(env)

    assert out["events"]["updated_crm"] == 1 and out["events"]["updated_groupware"] == 1
    assert out["events"]["conflicts"] == 0
    (merged,) = activities(env)
    assert (merged.subject, merged.location) == ("Planung 2027", "Neu vom Handy")
    (etag, text), = env.dav_items("events").values()
    assert "SUMMARY:Planung 2027" in text and "LOCATION:Neu vom Handy" in text

    env.dav_put("events", "m.ics", text.replace("SUMMARY:Planung 2027", "SUMMARY:Vom Handy"), etag)
    env.cli("activity", "edit", str(act.id), "--subject", "Vom CRM")
    code, out = sync(env)
    assert out["events"]["conflicts"] == 1 and "subject" in out["events"]["conflict_details"][0]
    assert activities(env)[0].subject == "Vom CRM"  # policy crm
    assert "SUMMARY:Vom CRM" in next(iter(env.dav_items("events").values()))[1]


def test_deletions_propagate_both_ways(cal):
    cal.dav_put("events", "a.ics", event("a", "A"))
    cal.dav_put("events", "b.ics", event("b", "B"))
    sync(cal)
    a_id = next(a.id for a in activities(cal) if a.subject == "A")
    cal.dav_delete("events", "b.ics")
    cal.cli("activity", "delete", str(a_id))
    code, out = sync(cal)
    assert code == 0, out
    assert out["events"]["deleted_crm"] == 1 and out["events"]["deleted_groupware"] == 1
    assert activities(cal) == [] and cal.dav_items("events") == {}


def test_mass_deletion_guard_stops_and_force_passes(cal):
    for n in range(6):
        cal.dav_put("events", f"e{n}.ics", event(f"e{n}", f"E{n}"))
    sync(cal)
    for n in range(5):
        cal.dav_delete("events", f"e{n}.ics")
    code, out = sync(cal)
    assert code == 1 and "would delete 5 of 6" in out["error"] and "--force" in out["error"]
    assert len(activities(cal)) == 6  # nothing deleted
    code, out = sync(cal, "--force")
    assert code == 0 and out["events"]["deleted_crm"] == 5 and len(activities(cal)) == 1


def test_a_concurrent_change_between_read_and_write_loses_neither_edit(cal):
    """The server item changes after gwsync listed it and before it writes: the 412 makes gwsync
    read it again and merge, instead of overwriting the other client's edit."""
    from gwsync.calendar.dav import Collection
    from gwsync.calendar.sync import CalendarSync

    cal.dav_put("events", "c.ics", event("c", "Start"))
    sync(cal)
    (act,) = activities(cal)
    cal.cli("activity", "edit", str(act.id), "--location", "Vom CRM")

    class RacingCollection(Collection):
        raced = False

        def update(self, href, data, etag):
            if not RacingCollection.raced:  # another client writes just before our PUT
                RacingCollection.raced = True
                (cur_etag, text), = cal.dav_items("events").values()
                cal.dav_put("events", "c.ics", text.replace("SUMMARY:Start", "SUMMARY:Vom Handy"), cur_etag)
            return super().update(href, data, etag)

    config = cal.config()
    account = config.account("alice")
    with cal.engine() as engine:
        plain = engine.collection(account, "events")
        racing = RacingCollection(plain.client, plain.url)
        result = CalendarSync(config, account, "events", engine.crm, engine.state, racing).run()
    assert RacingCollection.raced and result.errors == []
    (etag, text), = cal.dav_items("events").values()
    assert "SUMMARY:Vom Handy" in text and "LOCATION:Vom CRM" in text
    sync(cal)
    (after,) = activities(cal)
    assert (after.subject, after.location) == ("Vom Handy", "Vom CRM")


def test_broken_icalendar_is_reported_for_that_item_and_the_rest_syncs(make_env):
    from faultproxy import FaultProxy

    cal = make_env(areas=AREAS)  # on Radicale: the proxy speaks plain HTTP

    cal.dav_put("events", "ok.ics", event("ok", "Fine"))
    cal.dav_put("events", "bad.ics", event("bad", "Broken").replace("20261201T09", "20261202T09").replace(
        "20261201T10", "20261202T10"))
    port = cal.radicale.port
    # The server hands out the second item with an impossible start time (hour 25).
    with FaultProxy(port, {b"DTSTART:20261202T090000Z": b"DTSTART:20261202T250000Z"}) as proxy:
        cal.config_path.write_text(cal.config_path.read_text().replace(f":{port}/", f":{proxy.port}/"))
        code, out = sync(cal)
        assert code == 1
        assert "bad.ics" in out["error"] and "unreadable iCalendar" in out["error"] and "attempt 1 of 3" in out["error"]
        assert [a.subject for a in activities(cal)] == ["Fine"]
        assert out["events"]["created_crm"] == 1
        code, out = sync(cal)  # retried, a bounded number of times
        assert "attempt 2 of 3" in out["error"]
    cal.config_path.write_text(cal.config_path.read_text().replace(f":{proxy.port}/", f":{port}/"))
    code, out = sync(cal)  # the server serves it properly again: it syncs
    assert code == 0 and sorted(a.subject for a in activities(cal)) == ["Broken", "Fine"]


def test_push_any_activity_as_task_and_unpush(cal):
    with cal.engine() as engine:
        from gwsync.crm import ActivityDraft

        (mail_id,) = engine.crm.create_activities([ActivityDraft(
            key="mail:x", kind="MAILEIN", status="O", subject="Bitte Angebot schicken", body="Text")])
    result = cal.cli("push", str(mail_id), "--as", "task")
    assert result.exit_code == 0, result.stderr
    (name, (etag, text)), = cal.dav_items("tasks").items()
    assert "SUMMARY:Bitte Angebot schicken" in text and f"X-GWSYNC-ACTIVITY-ID:{mail_id}" in text
    code, out = sync(cal)
    assert out["tasks"]["created_groupware"] == 0 and out["tasks"]["requests"] == 1  # synced like the others

    result = cal.cli("unpush", str(mail_id))
    assert result.exit_code == 0 and "removed 1 groupware entry" in result.stdout
    assert cal.dav_items("tasks") == {}
    assert [a.id for a in activities(cal)] == [mail_id]  # the activity stays
    code, out = sync(cal)
    assert cal.dav_items("tasks") == {} and out["tasks"]["created_groupware"] == 0  # and is not pushed again


# The activities the flows below create have an end: Cyrus 3.6 refuses timed events without one
# (test_caldav_servers.py shows it), and these flows are about crashes and lost state.

def test_lost_state_database_creates_no_duplicates(cal):
    cal.dav_put("events", "x.ics", event("x", "Vom Handy"))
    cal.cli("activity", "add", "--kind", "TERMIN", "--subject", "Vom CRM", "--start", "2026-12-09T10:00",
            "--end", "2026-12-09T11:00")
    sync(cal)
    cal.lose_state()
    code, out = sync(cal)
    assert code == 0, out
    assert out["events"]["created_crm"] == 0 and out["events"]["created_groupware"] == 0
    assert len(activities(cal)) == 2 and len(cal.dav_items("events")) == 2


def test_wrong_collection_name_is_one_clear_error(make_env):
    env = make_env(areas=("events",))
    env.config_path.write_text(env.config_path.read_text().replace('events = "calendar"', 'events = "kalendr"'))
    code, out = sync(env)
    assert code == 1 and "no calendar collection 'kalendr'" in out["error"] and "found: calendar, tasks" in out["error"]


def test_wrong_caldav_password_and_dead_server_are_one_line_each(make_env):
    from gwsync.demo.localservers import free_port

    env = make_env(areas=("events",))
    original = env.config_path.read_text()
    env.config_path.write_text(original.replace(f'password = "{env.radicale.password_for(env.user)}"',
                                                'password = "not-the-password"'))
    result = env.cli("sync")
    assert result.exit_code == 3, result.stderr  # the line says why, should it ever differ
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "account alice" in lines[0] and "login refused" in lines[0]
    assert "not-the-password" not in result.stdout + result.stderr
    assert env.cli("unlock", "alice").exit_code == 0

    env.config_path.write_text(original.replace(f":{env.radicale.port}/", f":{free_port()}/"))
    result = env.cli("sync")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot connect" in lines[0] and "Traceback" not in result.stderr


def _run_with_a_late_edit(cal) -> None:
    """x.ics synced and a new CRM activity; then a run that creates its copy, during which another
    client edits x.ics right after gwsync's own write (at the check that decides the token)."""
    from gwsync.calendar.dav import Collection
    from gwsync.calendar.sync import CalendarSync

    cal.dav_put("events", "x.ics", event("x", "Original"))
    sync(cal)
    cal.cli("activity", "add", "--kind", "TERMIN", "--subject", "Neu im CRM", "--start", "2026-12-10T10:00",
            "--end", "2026-12-10T11:00")

    class LateEdit(Collection):
        calls = 0

        def changes_since(self, token):
            LateEdit.calls += 1
            if LateEdit.calls == 2:  # the check after gwsync's own write
                (etag, text), = [v for k, v in cal.dav_items("events").items() if k == "x.ics"]
                cal.dav_put("events", "x.ics", text.replace("SUMMARY:Original", "SUMMARY:Spät geändert"), etag)
            return super().changes_since(token)

    config = cal.config()
    account = config.account("alice")
    with cal.engine() as engine:
        plain = engine.collection(account, "events")
        result = CalendarSync(config, account, "events", engine.crm, engine.state,
                              LateEdit(plain.client, plain.url)).run()
    assert LateEdit.calls == 2 and result.counts["created_groupware"] == 1


def test_a_foreign_edit_during_our_own_writes_is_never_skipped(synccal):
    """After writing, gwsync takes a fresher sync token only when the delta holds nothing but its
    own writes; an edit by another client at that very moment must still reach the CRM."""
    cal = synccal
    _run_with_a_late_edit(cal)
    code, out = sync(cal)
    assert out["events"]["updated_crm"] == 1
    assert "Spät geändert" in [a.subject for a in activities(cal)]


def test_a_copy_made_in_a_run_that_kept_an_older_token_and_deleted_on_the_phone_is_unlinked(synccal):
    """The same run (a foreign edit during our own writes: the older token is kept) made a copy of
    a CRM activity, which the phone deletes before the next run. Xandikos leaves an item made and
    deleted since a token out of its delta, so gwsync must not keep a token older than its creates:
    the next run lists the collection, sees the copy gone and unlinks it (the activity stays)."""
    cal = synccal
    _run_with_a_late_edit(cal)
    (copy,) = [name for name in cal.dav_items("events") if name != "x.ics"]
    cal.dav_delete("events", copy)

    code, out = sync(cal)

    assert code == 0, out
    assert out["events"]["unlinked"] == 1 and out["events"]["updated_crm"] == 1  # and the late edit came in
    assert sorted(a.subject for a in activities(cal)) == ["Neu im CRM", "Spät geändert"]
    assert list(cal.dav_items("events")) == ["x.ics"]
    assert sync(cal)[1]["events"]["requests"] == 1  # settled


class _Crash(BaseException):
    """Stands for the process dying at that instruction."""


def _run_with(cal, collection_class):
    from gwsync.calendar.sync import CalendarSync

    config = cal.config()
    account = config.account("alice")
    with cal.engine() as engine:
        plain = engine.collection(account, "events")
        try:
            CalendarSync(config, account, "events", engine.crm, engine.state,
                         collection_class(plain.client, plain.url)).run()
        except _Crash:
            return True
    return False


def test_a_crash_right_after_creating_on_the_server_creates_no_twin(cal):
    """The PUT went through, the process died before saving the link. The rerun matches the item
    by the UID derived from the activity; and where the server's listing lags behind its writes,
    the repeated create meets its own item (412), adopts and links it."""
    from gwsync.calendar.dav import Collection

    class DiesAfterCreate(Collection):
        def create(self, href, data):
            super().create(href, data)
            raise _Crash()

    class LaggingListing(Collection):  # lists nothing that gwsync created
        def changes_since(self, token):
            new_token, changed, deleted = super().changes_since(token)
            return new_token, {h: e for h, e in changed.items() if "gwsync-" not in h}, deleted

    cal.cli("activity", "add", "--kind", "TERMIN", "--subject", "Einmal", "--start", "2026-12-11T10:00",
            "--end", "2026-12-11T11:00")
    cal.cli("activity", "add", "--kind", "TERMIN", "--subject", "Zweimal", "--start", "2026-12-12T10:00",
            "--end", "2026-12-12T11:00")
    assert _run_with(cal, DiesAfterCreate)  # the first create lands, then the process dies
    assert len(cal.dav_items("events")) == 1
    assert not _run_with(cal, LaggingListing)  # 412 on the repeated create: adopted, not twinned
    assert len(cal.dav_items("events")) == 2
    cal.cli("activity", "edit", "1", "--location", "Danach")
    code, out = sync(cal)
    assert code == 0, out
    assert out["events"]["created_groupware"] == 0 and out["events"]["updated_groupware"] == 1
    texts = [text for _, text in cal.dav_items("events").values()]
    assert sorted(t.count("X-GWSYNC-ACTIVITY-ID:") for t in texts) == [1, 1]
    assert any("LOCATION:Danach" in t for t in texts)
    assert sorted(a.subject for a in activities(cal)) == ["Einmal", "Zweimal"]
    assert sync(cal)[1]["events"]["requests"] == 1  # linked and settled


def test_a_crash_between_the_crm_create_and_the_link_write_back_creates_no_twin(cal):
    from gwsync.calendar.dav import Collection

    class DiesBeforeWriteBack(Collection):
        def update(self, href, data, etag):
            raise _Crash()

    cal.dav_put("events", "p.ics", event("p", "Vom Handy"))
    assert _run_with(cal, DiesBeforeWriteBack)
    assert [a.subject for a in activities(cal)] == ["Vom Handy"]  # committed before the crash
    code, out = sync(cal)
    assert code == 0 and out["events"]["created_crm"] == 0
    assert [a.subject for a in activities(cal)] == ["Vom Handy"]
    (etag, text), = cal.dav_items("events").values()
    assert f"X-GWSYNC-ACTIVITY-ID:{activities(cal)[0].id}" in text

"""Private items and the date window on a real CalDAV server (Radicale): what a calendar sync
leaves out of the CRM, and that it writes nothing into what it left out."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from gwsync.crm import ActivityFilter

AREAS = ("events", "tasks")


def stamp(day: date) -> str:
    return f"{day:%Y%m%d}"


def event(uid: str, summary: str, start: date, extra: str = "") -> str:
    return (f"BEGIN:VCALENDAR\nVERSION:2.0\nPRODID:-//Phone//EN\nBEGIN:VEVENT\nUID:{uid}\nDTSTAMP:20261120T100000Z\n"
            f"DTSTART:{stamp(start)}T090000Z\nDTEND:{stamp(start)}T100000Z\nSUMMARY:{summary}\n{extra}"
            "END:VEVENT\nEND:VCALENDAR\n")


def soon(days: int = 3) -> date:
    return datetime.now(UTC).date() + timedelta(days=days)


def sync(env):
    code, out = env.cli_json("sync")
    assert code == 0, out
    return out["accounts"]["alice"]


def subjects(env) -> dict:
    with env.engine() as engine:
        return {a.subject: a for a in engine.crm.list_activities(ActivityFilter())}


ARZT = "CLASS:PRIVATE\nDESCRIPTION:Dr. Weber\\, Befund besprechen\nLOCATION:Praxis Weber\n" \
       "ATTENDEE;CN=Dr. Weber:mailto:weber@praxis.example\n"


def test_a_private_item_is_not_imported_and_nothing_is_written_into_it(make_env):
    env = make_env(areas=AREAS)
    env.dav_put("events", "arzt.ics", event("arzt", "Arzttermin", soon(), ARZT))
    env.dav_put("events", "vertraulich.ics", event("vertraulich", "Gehalt", soon(), "CLASS:CONFIDENTIAL\n"))
    env.dav_put("events", "kunde.ics", event("kunde", "Kundentermin", soon(), "CLASS:PUBLIC\n"))
    before = env.dav_items("events")

    out = sync(env)
    sync(env)  # and again: still out

    assert out["events"]["created_crm"] == 1
    assert set(subjects(env)) == {"Kundentermin"}
    after = env.dav_items("events")
    for name in ("arzt.ics", "vertraulich.ics"):
        href = next(h for h in after if h.endswith(name))
        assert after[href] == before[href]  # same ETag and text: no link written
    # the review does not offer it either
    with env.engine() as engine:
        waiting = engine.waiting_items(env.config().account("alice"), "events")
    assert [data.uid for _, data in waiting] == []


def test_busy_imports_a_private_item_as_privat_with_nothing_else(make_env):
    env = make_env(areas=AREAS, extra='\n[sync]\nprivate = "busy"\n')
    env.dav_put("events", "arzt.ics", event("arzt", "Arzttermin", soon(), ARZT))

    sync(env)
    (etag, text), = env.dav_items("events").values()
    sync(env)
    # edited on the phone: the details still stay out of the CRM
    env.dav_put("events", "arzt.ics", text.replace("Dr. Weber\\, Befund", "Dr. Weber\\, neuer Befund"), etag)
    out = sync(env)

    assert out["events"]["updated_crm"] == 0
    acts = subjects(env)
    assert set(acts) == {"Privat"}
    busy = acts["Privat"]
    assert (busy.body, busy.location) == ("", None)
    assert busy.start == f"{soon():%Y-%m-%d}T09:00:00+00:00"
    with env.engine() as engine:
        shown = repr(engine.crm.get_activity(busy.id))
    assert not any(word in shown for word in ("Arzt", "Weber", "Praxis", "Befund"))
    (_, stored), = env.dav_items("events").values()
    assert "SUMMARY:Arzttermin" in stored and "neuer Befund" in stored  # the item keeps its details


def test_items_entirely_before_the_window_are_not_imported_open_ended_ones_are(make_env):
    env = make_env(areas=AREAS, extra="\n[sync]\npast_days = 30\n")  # the default, stated: the suite widens it
    long_ago = datetime.now(UTC).date() - timedelta(days=730)
    env.dav_put("events", "old.ics", event("old", "Vor zwei Jahren", long_ago))
    until = f"RRULE:FREQ=WEEKLY;UNTIL={stamp(long_ago + timedelta(days=70))}T000000Z\n"
    env.dav_put("events", "ended.ics", event("ended", "Jour fixe alt", long_ago, until))
    env.dav_put("events", "counted.ics", event("counted", "Kurs", long_ago, "RRULE:FREQ=WEEKLY;COUNT=5\n"))
    env.dav_put("events", "running.ics", event("running", "Jour fixe", long_ago, "RRULE:FREQ=WEEKLY\n"))
    env.dav_put("events", "recent.ics", event("recent", "Letzte Woche", datetime.now(UTC).date() - timedelta(days=7)))
    before = env.dav_items("events")

    sync(env)

    assert set(subjects(env)) == {"Jour fixe", "Letzte Woche"}
    after = env.dav_items("events")
    for name in ("old.ics", "ended.ics", "counted.ics"):
        href = next(h for h in after if h.endswith(name))
        assert after[href] == before[href]


def test_an_item_after_the_window_comes_in_when_the_window_reaches_it(make_env):
    env = make_env(areas=AREAS, extra="\n[sync]\nfuture_days = 10\n")
    env.dav_put("events", "later.ics", event("later", "In zwanzig Tagen", soon(20)))
    sync(env)
    assert subjects(env) == {}
    sync(env)
    assert subjects(env) == {}

    # Ten days on the window reaches it, though the item never changed (no delta lists it).
    env.config_path.write_text(env.config_path.read_text().replace("future_days = 10", "future_days = 25"))
    sync(env)
    assert subjects(env) == {}  # not listed yet: the day to list again has not come
    with env.engine() as engine:  # the stored token says when to list again; move that day to today
        state = engine.state
        url = env.collection_url("events")
        token = state.sync_token("alice", "events", url)
        assert token is not None and token.startswith("gwsync:relist-on:")
        day = datetime.now(UTC).date().isoformat()
        state.save_sync_token("alice", "events", url, f"gwsync:relist-on:{day} " + token.split(" ", 1)[1])
    sync(env)
    assert set(subjects(env)) == {"In zwanzig Tagen"}

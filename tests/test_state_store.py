"""The sync state store behaves the same on an SQLite file and on PostgreSQL: every method, with
the values that must survive the trip (UIDs up to 2**32 - 1, JSON fields, NULLs)."""

from __future__ import annotations

import pytest

from gwsync.storage.state import (
    FAILED,
    HELD,
    IMPORTED,
    LEFT_OUT,
    QUARANTINED,
    CalendarItemRecord,
    CalendarLink,
    MailRecord,
    StateStore,
)

BIG = 2**32 - 1  # the largest UID and UIDVALIDITY IMAP allows


@pytest.fixture(params=["sqlite", "postgresql"])
def state(request, tmp_path):
    database = tmp_path / "state.db" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    store = StateStore(database)
    yield store
    store.close()


def test_locks_are_set_found_by_credential_and_cleared(state):
    state.lock("bob", "imap", "login refused", credential="imap bob@mail.example")
    state.lock("bob", "caldav", "login refused")  # from before locks had credentials
    state.lock("bob", "imap", "refused again", credential="imap bob@mail.example")  # replaces
    assert state.lock_of("imap bob@mail.example")["reason"] == "refused again"
    assert state.lock_of("caldav bob@dav.example", users=[("bob", "caldav")])["service"] == "caldav"
    assert state.lock_of("caldav bob@dav.example", users=[("alice", "caldav")]) is None
    assert [(l["account"], l["service"]) for l in state.locks()] == [("bob", "caldav"), ("bob", "imap")]
    assert state.unlock("bob") == ["caldav", "imap"]
    assert state.locks() == [] and state.unlock("bob") == []


def link(activity_id: int, href: str, **kw) -> CalendarLink:
    return CalendarLink(account="alice", area="events", activity_id=activity_id, uid=f"uid-{activity_id}",
                        href=href, etag='"e"', base={"subject": "Ü", "n": activity_id}, **kw)


def test_links_are_saved_replaced_and_dropped_by_href(state):
    state.apply_link_changes([("save", link(1, "/a.ics", identity="id-1")), ("save", link(2, "/b.ics"))])
    assert sorted((l.activity_id, l.href, l.identity) for l in state.links("alice", "events")) == [
        (1, "/a.ics", "id-1"), (2, "/b.ics", None)]
    assert state.links("alice", "events")[0].base in ({"subject": "Ü", "n": 1}, {"subject": "Ü", "n": 2})
    state.apply_link_changes([("save", link(3, "/a.ics"))])  # the href now belongs to activity 3
    assert sorted(l.activity_id for l in state.links("alice", "events")) == [2, 3]
    state.apply_link_changes([("save", link(2, "/c.ics"))])  # activity 2's item moved
    assert [l.href for l in state.links_of_activity(2)] == ["/c.ics"]
    state.drop_link("alice", "events", 2, "/other.ics")  # another href: kept
    assert len(state.links_of_activity(2)) == 1
    state.drop_link("alice", "events", 2, "/c.ics")
    state.drop_link("alice", "events", 3)
    assert state.links("alice", "events") == []
    state.apply_link_changes([("save", link(4, "/d.ics", identity="old"))])
    assert state.links_of_activity(4, identity="new") == [] and len(state.links_of_activity(4, "old")) == 1


def test_dav_cache_membership_and_sync_tokens(state):
    state.save_dav_cache("alice", "events", "src", "https://dav.example/alice/", "basic")
    assert state.dav_cache("alice", "events", "src") == ("https://dav.example/alice/", "basic")
    assert state.dav_cache("alice", "events", "other source") == (None, None)
    state.save_dav_cache("alice", "events", "src", None, None)
    assert state.dav_cache("alice", "events", "src") == (None, None)
    state.set_membership("alice", "tasks", BIG + 5, True, identity="u-1")  # an activity id past 32 bits
    state.set_membership("alice", "tasks", 7, False)
    state.set_membership("alice", "tasks", 7, True, identity="u-7")
    assert state.membership_details("alice", "tasks") == {BIG + 5: (True, "u-1"), 7: (True, "u-7")}
    assert state.memberships("alice", "tasks") == {BIG + 5: True, 7: True}
    state.save_sync_token("alice", "events", "https://dav/a/", "t1")
    state.save_sync_token("alice", "events", "https://dav/a/", "t2")
    assert state.sync_token("alice", "events", "https://dav/a/") == "t2"
    assert state.sync_token("alice", "events", "https://dav/b/") is None


def test_item_failures_count_per_version(state):
    assert state.record_item_failure("alice", "events", "/x.ics", '"1"', "bad") == 1
    assert state.record_item_failure("alice", "events", "/x.ics", '"1"', "bad") == 2
    assert state.record_item_failure("alice", "events", "/x.ics", '"2"', "worse") == 1  # a new version
    assert state.item_failures("alice", "events")["/x.ics"]["error"] == "worse"
    state.clear_item_failure("alice", "events", "/x.ics")
    assert state.item_failures("alice", "events") == {}


def test_calendar_items_kept_out_and_taken_in(state):
    state.save_sync_token("alice", "events", "https://dav/a/", "t1")
    state.save_calendar_items([
        CalendarItemRecord("alice", "events", "/1.ics", LEFT_OUT, uid="u1", subject="Eins"),
        CalendarItemRecord("alice", "events", "/2.ics", HELD, uid="u2", subject="Zwei", missing=["partner"],
                           addresses=["erika@acme.example"])])
    held = state.calendar_items(outcome=HELD)
    assert [(r.href, r.missing, r.addresses) for r in held] == [("/2.ics", ["partner"], ["erika@acme.example"])]
    assert [r.href for r in state.calendar_items("alice", "events")] == ["/1.ics", "/2.ics"]
    state.save_calendar_items([], forget=[("alice", "events", "/1.ics"), ("alice", "events", "/2.ics")],
                              outcome=HELD)  # only the held one goes
    assert [r.href for r in state.calendar_items()] == ["/1.ics"]
    state.take_in("alice", "events", ["/1.ics"])
    assert state.calendar_items() == [] and state.sync_token("alice", "events", "https://dav/a/") is None


def record(uid: int, outcome: str, folder: str = "INBOX/CRM", **kw) -> MailRecord:
    return MailRecord(account="alice", folder=folder, uidvalidity=BIG, uid=uid, outcome=outcome, **kw)


def test_mail_records_round_trip_and_are_forgotten(state):
    assert state.check_uidvalidity("alice", "INBOX/CRM", BIG) is False  # first time: nothing changed
    assert state.check_uidvalidity("alice", "INBOX/CRM", BIG) is False
    state.save([record(BIG, IMPORTED, key="k", activity_id=3), record(2, HELD, missing=["partner"], sender="s@x",
                                                                        subject="Über"),
                record(3, FAILED, attempts=2, error="boom"), record(4, QUARANTINED), record(5, LEFT_OUT),
                record(6, HELD, folder="INBOX/Other")])
    found = state.records("alice", "INBOX/CRM", BIG)
    assert sorted(found) == [2, 3, 4, 5, BIG]
    assert (found[BIG].key, found[BIG].activity_id) == ("k", 3)
    assert (found[2].missing, found[2].subject, found[3].attempts, found[3].error) == (["partner"], "Über", 2, "boom")
    assert [(r.folder, r.uid) for r in state.not_imported()] == [
        ("INBOX/CRM", 2), ("INBOX/Other", 6), ("INBOX/CRM", 3), ("INBOX/CRM", 4), ("INBOX/CRM", 5)]
    assert [r.uid for r in state.by_outcome(HELD, account="bob")] == []
    state.save([record(2, IMPORTED, key="k2")])  # replaces the held record
    assert state.records("alice", "INBOX/CRM", BIG)[2].missing is None
    state.forget("alice", "INBOX/CRM", BIG, [BIG, 3])
    assert sorted(state.records("alice", "INBOX/CRM", BIG)) == [2, 4, 5]
    state.forget_folders_except("alice", ["INBOX/CRM"])
    assert state.by_outcome(HELD) == []
    assert state.check_uidvalidity("alice", "INBOX/CRM", 77) is True  # changed: the old records go
    assert state.records("alice", "INBOX/CRM", BIG) == {}
    state.forget_folders_except("alice", [])
    assert state.check_uidvalidity("alice", "INBOX/CRM", 77) is False  # forgotten: as new


def test_runs_keep_their_last_success(state):
    state.record_run("alice", "mail", True, {"imported": 2}, None)
    first = state.runs()[0]
    state.record_run("alice", "mail", False, {}, "server down")
    (run,) = state.runs()
    assert (run["ok"], run["error"], run["summary"]) == (0, "server down", {})
    assert run["last_success"] == first["last_success"] is not None


def test_links_keep_the_organizer_and_are_found_by_uid_across_accounts(state):
    bob = CalendarLink(account="bob", area="events", activity_id=1, uid="uid-1", href="/bob/1.ics", etag=None,
                       base=None, organizer="alice@firma.example")
    state.apply_link_changes([("save", link(1, "/a.ics", organizer="alice@firma.example")), ("save", bob),
                              ("save", link(2, "/b.ics"))])
    found = state.links_by_uid("events", ["uid-1", "uid-1", "nothing"])
    assert sorted((l.account, l.href, l.organizer) for l in found) == [
        ("alice", "/a.ics", "alice@firma.example"), ("bob", "/bob/1.ics", "alice@firma.example")]
    assert state.links_by_uid("tasks", ["uid-1"]) == [] and state.links_by_uid("events", []) == []

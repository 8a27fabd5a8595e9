"""A team's calendar sync without a server: alice's and bob's real CalendarSync over one
MemoryCRM and one state database, with a MemoryCollection for each calendar (the flows on real
servers are in test_team_calendar.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from calworld import TeamWorld, event, meeting
from gwsync.calendar.dav import DavError, DavUnreachable
from gwsync.crm import ActivityDraft


@pytest.fixture
def team(tmp_path):
    world = TeamWorld(tmp_path)
    yield world
    world.close()


def one(mapping: dict):
    (value,) = mapping.values()
    return value


def shared_meeting(team: TeamWorld) -> int:
    team.coll("alice").put("m.ics", meeting("meet", "Projektstart"))
    team.coll("bob").put("invite.ics", meeting("meet", "Projektstart"))
    team.sync("alice")
    team.sync("bob")
    (activity_id,) = team.activities()
    return activity_id


def move_owner(team: TeamWorld, activity_id: int, owner: str) -> None:
    """What `activity edit --owner` does: the new owner replaces the old one among the participants."""
    old = team.crm.get_activity(activity_id).owner
    team.crm.update_activity(activity_id, {"owner": owner})
    team.crm.add_participant(activity_id, owner)
    team.crm.remove_participant(activity_id, old)


def test_two_accounts_importing_one_uid_at_the_same_moment_make_one_activity(team):
    """bob's sync planned a create for the UID before alice's sync created it: his create meets
    the key alice's activity has, and his copy joins it instead of twinning it."""
    team.coll("alice").put("m.ics", meeting("meet", "Projektstart"))
    team.coll("bob").put("invite.ics", meeting("meet", "Projektstart"))
    # alice's whole sync runs right after bob planned, before bob writes anything
    team.coll("bob").inject("update", before=lambda coll: team.sync("alice"))

    bob = team.sync("bob")

    assert bob.errors == []
    (act,) = team.activities().values()
    assert sorted(act.participants) == ["alice", "bob"] and act.key == "cal:meet"
    links = team.state.links_of_activity(act.id)
    assert sorted(l.account for l in links) == ["alice", "bob"]
    texts = [one(team.coll(name).items()).data for name in ("alice", "bob")]
    assert all(f"X-GWSYNC-ACTIVITY-ID:{act.id}\r\n" in text for text in texts)
    assert all(team.calsync(name).plan().actions == () for name in ("alice", "bob"))


def test_activities_with_keys_from_before_teams_keep_working(team):
    (old,) = team.crm.create_activities([ActivityDraft(
        key="cal:alice:u1", kind="TERMIN", status="O", subject="Alt", start="2026-12-01T09:00:00+00:00",
        end="2026-12-01T10:00:00+00:00", owner="alice")])
    team.coll("alice").put("u1.ics", event("u1", "Alt"))  # its item; the state database was lost
    team.coll("bob").put("u1.ics", event("u1", "Alt"))

    assert team.sync("alice").counts["created_crm"] == 0
    bob = team.sync("bob")

    assert bob.counts["created_crm"] == 0 and list(team.activities()) == [old]
    assert team.crm.get_activity(old).participants == ["bob"]  # joined (the old activity had none)
    team.coll("bob").remove("/bob/events/u1.ics")
    assert team.sync("bob").counts["unlinked"] == 1 and team.crm.get_activity(old).participants == []
    team.coll("alice").remove("/alice/events/u1.ics")
    assert team.sync("alice").counts["deleted_crm"] == 1 and team.activities() == {}  # hers alone: deleted


def test_the_dry_run_plan_shows_join_unlink_cancel_and_release(team):
    # No ATTENDEE line: bob is no participant until his copy joins.
    organized = event("meet", "Projektstart", "ORGANIZER:mailto:alice@firma.example\r\n")
    team.coll("alice").put("m.ics", organized)
    team.sync("alice")
    team.coll("bob").put("invite.ics", organized)
    assert [e["action"] for e in team.sync("bob", dry_run=True).plan] == ["join"]
    team.sync("bob")
    activity_id = one({a: a for a in team.activities()})

    team.coll("bob").remove("/bob/events/invite.ics")
    team.coll("alice").remove("/alice/events/m.ics")
    assert [e["action"] for e in team.sync("bob", dry_run=True).plan] == ["unlink"]
    assert [e["action"] for e in team.sync("alice", dry_run=True).plan] == ["cancel"]
    assert sorted(team.crm.get_activity(activity_id).participants) == ["alice", "bob"]  # nothing done

    (task,) = team.crm.create_activities([ActivityDraft(key="crm:t", kind="AUFGABE", status="O", subject="T",
                                                        owner="alice", participants=["alice"])])
    team.sync("alice", "tasks")
    team.crm.update_activity(task, {"delegated_to": "bob"})
    plan = team.sync("alice", "tasks", dry_run=True).plan
    assert [(e["action"], e["activity"]) for e in plan] == [("release", task)]
    assert [e["action"] for e in team.sync("bob", "tasks", dry_run=True).plan] == ["create-groupware"]


def test_status_cancelled_in_any_copy_cancels_the_activity_and_reaches_the_other_copy(team):
    activity_id = shared_meeting(team)
    href, item = next(iter(team.coll("bob").items().items()))
    team.coll("bob").put(href, item.data.replace("SUMMARY:", "STATUS:CANCELLED\r\nSUMMARY:"))

    team.sync("bob")
    assert team.crm.get_activity(activity_id).status == "S"
    team.sync("alice")
    assert "STATUS:CANCELLED\r\n" in one(team.coll("alice").items()).data

    team.crm.update_activity(activity_id, {"status": "O"})  # taken back in the CRM
    team.sync_all()
    for name in ("alice", "bob"):
        assert "STATUS:CANCELLED" not in one(team.coll(name).items()).data
        assert one(team.fields(name))["status"] == "O"
    assert team.crm.get_activity(activity_id).status == "O"


def test_an_other_status_of_the_event_is_kept_when_the_crm_status_changes(team):
    team.coll("alice").put("c.ics", event("c", "Fix", "STATUS:CONFIRMED\r\n"))
    team.sync("alice")
    (activity_id,) = team.activities()
    team.crm.update_activity(activity_id, {"status": "E"})
    team.sync("alice")
    text = one(team.coll("alice").items()).data
    assert "STATUS:CONFIRMED\r\n" in text and "X-GWSYNC-STATUS:E\r\n" in text


def test_a_released_copy_gives_its_edits_to_the_activity_before_it_is_deleted(team):
    (activity_id,) = team.crm.create_activities([ActivityDraft(
        key="crm:b", kind="TERMIN", status="O", subject="Besuch", start="2026-12-09T10:00:00+00:00",
        end="2026-12-09T11:00:00+00:00", owner="alice", participants=["alice"])])
    team.sync("alice")
    href, item = next(iter(team.coll("alice").items().items()))
    team.coll("alice").put(href, item.data.replace("SUMMARY:Besuch", "LOCATION:Lager\r\nSUMMARY:Besuch"))
    move_owner(team, activity_id, "bob")

    alice = team.sync("alice")
    bob = team.sync("bob")

    assert alice.counts["updated_crm"] == 1 and alice.counts["deleted_groupware"] == 1
    assert team.coll("alice").items() == {} and team.crm.get_activity(activity_id).location == "Lager"
    assert bob.counts["created_groupware"] == 1 and one(team.fields("bob"))["location"] == "Lager"
    assert team.calsync("alice").plan().actions == () and team.calsync("bob").plan().actions == ()


def test_a_team_calendars_item_stays_when_one_account_lets_go_of_it(tmp_path):
    team = TeamWorld(tmp_path, shared=True)
    (activity_id,) = team.crm.create_activities([ActivityDraft(
        key="crm:t", kind="TERMIN", status="O", subject="Teamrunde", start="2026-12-09T10:00:00+00:00",
        owner="alice", participants=["alice"])])
    team.sync_all()  # alice puts it on the team calendar, bob's sync finds it there and joins
    assert sorted(team.crm.get_activity(activity_id).participants) == ["alice", "bob"]
    assert len(team.coll("alice").items()) == 1
    move_owner(team, activity_id, "bob")

    team.sync_all()
    team.sync_all()

    assert len(team.coll("alice").items()) == 1  # the shared item stays: bob holds it
    moved = team.crm.get_activity(activity_id)
    assert moved.owner == "bob" and moved.participants == ["bob"]
    assert [(l.account, l.href) for l in team.state.links_of_activity(activity_id)] == [
        ("bob", next(iter(team.coll("alice").items())))]
    assert all(team.calsync(name).plan().actions == () for name in ("alice", "bob"))
    team.close()


def test_deleting_a_team_calendars_item_deletes_no_activity_another_account_holds(tmp_path):
    team = TeamWorld(tmp_path, shared=True)
    team.coll("alice").put("t.ics", event("t", "Teamrunde"))
    team.sync_all()
    (activity_id,) = team.activities()
    team.coll("alice").remove("/alice/events/t.ics")

    team.sync_all()

    assert team.crm.get_activity(activity_id) is not None  # alice's run saw bob's copy holding it
    assert team.state.links_of_activity(activity_id) == []
    team.close()


@pytest.mark.parametrize("mode, private", [("import", True), ("busy", True)])
def test_an_imported_private_item_makes_a_private_activity(tmp_path, mode, private):
    team = TeamWorld(tmp_path, sync={"private": mode})
    team.coll("alice").put("p.ics", event("p", "Arzt", "CLASS:PRIVATE\r\n"))
    team.coll("alice").put("q.ics", event("q", "Kunde", "CLASS:PUBLIC\r\n"))
    team.sync("alice")
    marks = {a.key: a.private for a in team.activities().values()}
    assert marks == {"cal:p": private, "cal:q": False}
    team.close()


def test_without_a_cancelled_status_of_its_own_no_event_is_written_as_cancelled(tmp_path):
    """[crm.statuses] without S: cancelled_status falls back to the first status (here the
    default "I"), which must not turn every imported mail pushed as an event into a cancellation."""
    from calworld import CalWorld

    world = CalWorld(tmp_path)
    world.config = replace_statuses(world.config, {"I": "Importiert", "O": "Offen", "E": "Erledigt"})
    assert world.config.crm.cancelled_status == "I"
    (activity_id,) = world.crm.create_activities([ActivityDraft(
        key="crm:i", kind="TERMIN", status="I", subject="Importiert", start="2026-12-09T10:00:00+00:00",
        owner="alice")])
    world.sync()
    text = one(world.coll.items()).data
    assert "STATUS:CANCELLED" not in text and "X-GWSYNC-STATUS:I\r\n" in text
    world.coll.put(next(iter(world.coll.items())), text.replace("SUMMARY:", "STATUS:CANCELLED\r\nSUMMARY:"))
    world.sync()
    assert world.crm.get_activity(activity_id).status == "I"
    world.close()


def replace_statuses(config, statuses: dict):
    from gwsync.config import parse_config

    return parse_config({
        "crm": {"database": str(config.crm.database), "link": config.crm.link, "statuses": statuses},
        "state": {"database": str(config.state_database)},
        "accounts": {"alice": {"areas": ["events"], "caldav": {
            "url": "http://memory.invalid/alice/", "username": "alice", "password": "unused"}}}})


def test_the_review_offers_no_copy_of_an_activity_another_account_brought_in(team):
    organized = event("meet", "Projektstart", "ORGANIZER:mailto:alice@firma.example\r\n")
    team.coll("alice").put("m.ics", organized)
    team.coll("bob").put("invite.ics", organized)
    team.coll("bob").put("own.ics", event("own", "Nur bei Bob"))
    assert [d.uid for _, d in team.calsync("bob").waiting()] == ["meet", "own"]

    team.sync("alice")

    assert [d.uid for _, d in team.calsync("bob").waiting()] == ["own"]


def test_the_mass_deletion_guard_counts_released_copies(team):
    ids = team.crm.create_activities([ActivityDraft(
        key=f"crm:{n}", kind="TERMIN", status="O", subject=f"T{n}", start="2026-12-09T10:00:00+00:00",
        owner="alice", participants=["alice"]) for n in range(4)])
    team.sync("alice")
    for activity_id in ids[:3]:
        move_owner(team, activity_id, "bob")

    result = team.sync("alice")
    assert "would delete 3 of 4 items on the groupware side" in result.errors[0]
    assert len(team.coll("alice").items()) == 4  # nothing released
    result = team.sync("alice", force=True)
    assert result.errors == [] and result.counts["deleted_groupware"] == 3 and len(team.coll("alice").items()) == 1
    assert len(team.activities()) == 4


@pytest.mark.parametrize("mode", ["skip", "busy"])
def test_a_copy_made_private_by_its_holder_does_not_join(tmp_path, mode):
    team = TeamWorld(tmp_path, sync={"private": mode})
    organized = event("meet", "Projektstart", "ORGANIZER:mailto:alice@firma.example\r\nLOCATION:Raum 4\r\n")
    team.coll("alice").put("m.ics", organized)
    team.coll("bob").put("invite.ics", organized.replace("SUMMARY:", "CLASS:PRIVATE\r\nSUMMARY:"))
    before = team.coll("bob").items()

    team.sync_all()
    team.sync_all()

    (act,) = team.activities().values()
    assert (act.subject, act.location, act.participants) == ("Projektstart", "Raum 4", ["alice"])
    assert team.coll("bob").items() == before  # nothing written into it
    team.close()


def edit_before(href: str):
    """Another client's edit of `href`, just before gwsync writes it: that write meets a 412."""
    def edit(coll):
        text = next(i.data for h, i in coll.items().items() if h.endswith(href))
        coll.put(href, text.replace("SUMMARY:", "LOCATION:Raum 4\r\nSUMMARY:"))
    return edit


def dies_on_the_second_create(coll):
    coll.inject("create", before=lambda c: None)  # the first create goes through
    coll.inject("create", error=DavUnreachable("CalDAV: cannot connect"))


ENDINGS = {
    # A foreign change in the delta after our writes: the older token is kept to read it again.
    "an edit meets a 412": lambda coll: coll.inject("update", href="inv.ics", before=edit_before("inv.ics")),
    "another item fails": lambda coll: coll.inject("update", href="inv.ics", error=DavError("500 on inv.ics")),
    "the run stops": None,
    "the server goes away": dies_on_the_second_create,
}


@pytest.mark.parametrize("ending", ENDINGS)
def test_a_copy_made_by_a_run_that_kept_an_older_token_is_unlinked_when_the_phone_deletes_it(team, ending):
    """A run creates copies of CRM activities and then keeps an older sync token (a foreign edit
    to read again, a failed item, a stop, a server gone). A copy deleted on the phone before the
    next run was made and deleted after that token, so a delta since it lists nothing of it: the
    next run must still see it gone and unlink it (the activity stays, made in the CRM)."""
    coll = team.coll("alice")
    team.sync("alice")  # a sync token is stored
    coll.put("inv.ics", meeting("inv", "Projektstart"))
    made = team.crm.create_activities([ActivityDraft(
        key=f"crm:{n}", kind="TERMIN", status="O", subject=f"T{n}", start="2026-12-09T10:00:00+00:00",
        owner="alice", participants=["alice"]) for n in range(2)])
    stop = (lambda: any("gwsync-" in h for h in coll.items())) if ending == "the run stops" else None
    if ENDINGS[ending] is not None:
        ENDINGS[ending](coll)
    try:
        team.calsync("alice", should_stop=stop).run()
    except DavUnreachable:
        assert ending == "the server goes away"
    coll.reset_faults()
    (first,) = team.state.links_of_activity(made[0])  # its copy was made
    coll.remove(first.href)

    result = team.sync("alice")

    assert result.errors == [] and result.counts["unlinked"] == 1
    assert team.state.links_of_activity(made[0]) == [] and team.crm.get_activity(made[0]) is not None
    assert team.state.memberships("alice", "events") == {made[0]: False}  # off her calendar, as by unpush
    team.sync_all()
    for name in team.NAMES:
        assert sorted(l.href for l in team.state.links(name, "events")) == sorted(team.coll(name).items())
        assert team.calsync(name).plan().actions == ()


def test_the_state_machines_case_a_phone_deletes_a_copy_made_while_an_invitation_met_a_412(team):
    """test_team_machine's sequence, as found: the copy of a CRM activity made in the run where the
    invitation's link write met a 412 is deleted on the phone; a quiet round unlinks it."""
    draft = ActivityDraft(key="crm:1", kind="TERMIN", status="O", subject="v1", start="2026-12-09T10:00:00+00:00",
                          owner="alice", participants=["alice"])
    team.crm.delete_activity(team.crm.create_activities([draft])[0])
    for name in team.NAMES:
        team.coll(name).put("inv2.ics", meeting("inv2", "v1"))
    (made,) = team.crm.create_activities([replace(draft, key="crm:3")])
    coll = team.coll("alice")
    coll.inject("update", href="inv2.ics", before=lambda c: c.touch("inv2.ics"))  # rewritten as it was
    assert team.sync("alice", force=True).errors == []
    coll.reset_faults()
    (copy,) = team.state.links_of_activity(made)
    coll.remove(copy.href)

    for _ in range(3):
        assert all(r.errors == [] for r in team.sync_all(force=True).values())

    assert team.crm.get_activity(made) is not None and team.state.links_of_activity(made) == []
    for name in team.NAMES:
        assert sorted(l.href for l in team.state.links(name, "events")) == sorted(team.coll(name).items())

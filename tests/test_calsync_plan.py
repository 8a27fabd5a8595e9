"""The calendar sync plans, then applies: plan unit tests on the real CalendarSync over a
MemoryCollection, and `sync --dry-run` printing the plan against a real Radicale."""

from __future__ import annotations

import pytest

from calworld import CalWorld, event
from gwsync.calendar.dav import DavError, DavUnreachable
from gwsync.calendar.sync import CreateInCRM, CreateOnServer, DeleteInCRM, DeleteOnServer, Relink


@pytest.fixture
def world(tmp_path):
    w = CalWorld(tmp_path)
    yield w
    w.close()


def snapshot(world: CalWorld):
    return (world.coll.items(), world.activities(), world.state.links("alice", "events"),
            world.state.sync_token("alice", "events", world.coll.url), world.state.item_failures("alice", "events"))


def synced(world: CalWorld) -> dict[str, int]:
    """Two phone items and two CRM activities, synced; subject -> activity id."""
    world.coll.put("a.ics", event("a", "A"))
    world.coll.put("b.ics", event("b", "B"))
    world.add("C")
    world.add("D")
    result = world.sync()
    assert result.errors == [] and result.counts["created_crm"] == 2 and result.counts["created_groupware"] == 2
    return {a.subject: a.id for a in world.activities().values()}


def item_of(world: CalWorld, subject: str) -> tuple[str, object]:
    (found,) = [(h, i) for h, i in world.coll.items().items() if f"SUMMARY:{subject}\r\n" in i.data]
    return found


def test_planning_writes_nothing_anywhere(world):
    world.coll.put("p.ics", event("p", "Vom Handy"))
    world.coll.put("broken.ics", "BEGIN:VCALENDAR\r\nnot iCalendar")
    world.add("Vom CRM")
    before, writes = snapshot(world), world.coll.writes

    plan = world.calsync().plan()

    assert snapshot(world) == before and world.coll.writes == writes
    assert [(type(a), a.to_dict()["subject"]) for a in plan.actions] == [
        (CreateInCRM, "Vom Handy"), (CreateOnServer, "Vom CRM")]
    assert [href for href, _, _ in plan.broken] == ["/alice/calendar/broken.ics"]
    assert plan.token is not None and plan.linked == 0


def test_each_change_becomes_one_typed_action(tmp_path):
    world = CalWorld(tmp_path, conflict="crm")
    ids = synced(world)
    href_a, item_a = item_of(world, "A")
    world.coll.put(href_a, item_a.data.replace("SUMMARY:A", "SUMMARY:A vom Handy"))  # server edit
    world.crm.update_activity(ids["C"], {"location": "Raum 1"})  # CRM edit
    href_d, item_d = item_of(world, "D")  # the same field on both sides
    world.coll.put(href_d, item_d.data.replace("SUMMARY:D", "SUMMARY:D Handy"))
    world.crm.update_activity(ids["D"], {"subject": "D CRM"})
    href_b, _ = item_of(world, "B")
    world.coll.remove(href_b)  # deleted on the server

    plan = world.calsync().plan()

    assert sorted(type(a).__name__ for a in plan.actions) == ["Conflict", "DeleteInCRM", "UpdateCRM", "UpdateGroupware"]
    entries = sorted((e["action"], e["subject"], tuple(e["fields"]), tuple(e["conflicts"])) for e in plan.to_list())
    assert entries == [("conflict", "D CRM", ("subject",), ("subject",)),
                       ("delete-crm", "B", (), ()),
                       ("update-crm", "A", ("subject",), ()),
                       ("update-groupware", "C", ("location",), ())]
    (delete,) = [a for a in plan.actions if isinstance(a, DeleteInCRM)]
    assert delete.to_dict() == {"action": "delete-crm", "activity": ids["B"], "item": href_b, "subject": "B",
                                "fields": [], "conflicts": []}

    world.crm.delete_activity(ids["C"])  # and one deleted in the CRM
    plan = world.calsync().plan()
    (gone,) = [a for a in plan.actions if isinstance(a, DeleteOnServer)]
    assert gone.to_dict()["activity"] == ids["C"] and gone.to_dict()["item"] == item_of(world, "C")[0]
    world.close()


def test_with_nothing_changed_the_plan_is_empty_and_costs_one_request(world):
    synced(world)
    world.sync()  # settles the token past gwsync's own writes
    requests = world.coll.requests
    plan = world.calsync().plan()
    assert plan.actions == () and world.coll.requests == requests + 1


def test_an_etag_rewritten_without_a_change_plans_only_recording_the_link(world):
    synced(world)
    href, _ = item_of(world, "A")
    world.coll.touch(href)
    plan = world.calsync().plan()
    assert [(type(a), a.name) for a in plan.actions] == [(Relink, "link")]
    writes = world.coll.writes
    world.sync()
    assert world.coll.writes == writes and world.calsync().plan().actions == ()


def test_a_dry_run_returns_the_plan_and_counts_it_and_changes_nothing(world):
    ids = synced(world)
    world.crm.update_activity(ids["A"], {"location": "Neu"})
    world.coll.put("n.ics", event("n", "Neu vom Handy"))
    before = snapshot(world)

    dry = world.sync(dry_run=True)

    assert snapshot(world) == before
    assert [(e["action"], e["subject"]) for e in dry.plan] == [("update-groupware", "A"),
                                                               ("create-crm", "Neu vom Handy")]
    real = world.sync()
    assert real.plan is None and real.counts == dry.counts
    assert world.calsync().plan().actions == ()


def test_the_mass_deletion_guard_runs_on_the_plan(world):
    synced(world)
    for href in list(world.coll.items())[:3]:
        world.coll.remove(href)
    before = snapshot(world)[1:3]

    result = world.sync(dry_run=True)
    assert "would delete 3 of 4" in result.errors[0] and len(result.plan) == 3  # shown, not done
    result = world.sync()
    assert "would delete 3 of 4" in result.errors[0] and snapshot(world)[1:3] == before
    result = world.sync(force=True)
    # The phone's items A and B take their activities along; C, made in the CRM, stays there,
    # taken out of the calendar (a deletion never destroys what the deleted copy did not create).
    assert result.errors == [] and result.counts["deleted_crm"] == 2 and result.counts["unlinked"] == 1
    assert sorted(a.subject for a in world.activities().values()) == ["C", "D"]
    assert [f["subject"] for f in world.server_fields().values()] == ["D"]
    assert world.calsync().plan().actions == ()  # and C is not put back


def test_a_412_during_apply_plans_that_pair_again_and_loses_neither_edit(world):
    ids = synced(world)
    world.crm.update_activity(ids["C"], {"location": "Vom CRM"})
    world.crm.update_activity(ids["D"], {"location": "Auch vom CRM"})
    href, item = item_of(world, "C")
    world.coll.inject("update", href=href,
                      before=lambda coll: coll.put(href, item.data.replace("SUMMARY:C", "SUMMARY:C vom Handy")))

    result = world.sync()

    assert result.errors == [] and result.counts["updated_groupware"] == 2
    assert result.counts["updated_crm"] == 1  # the racing edit, read again and merged
    fields = world.server_fields()
    assert (fields[href]["subject"], fields[href]["location"]) == ("C vom Handy", "Vom CRM")
    assert world.activities()[ids["C"]].subject == "C vom Handy"
    assert world.calsync().plan().actions == ()


def test_an_item_that_keeps_changing_is_reported_and_the_others_sync(world):
    ids = synced(world)
    world.crm.update_activity(ids["C"], {"location": "X"})
    world.crm.update_activity(ids["D"], {"location": "Y"})
    href, _ = item_of(world, "C")
    world.coll.inject("update", href=href, times=4, before=lambda coll: coll.touch(href))  # 1 + 3 retries

    result = world.sync()

    assert len(result.errors) == 1 and "kept changing" in result.errors[0] and "activity" in result.errors[0]
    assert world.server_fields()[item_of(world, "D")[0]]["location"] == "Y"
    assert world.sync().errors == [] and world.server_fields()[href]["location"] == "X"


def test_a_failure_mid_apply_keeps_what_was_done_and_the_next_run_finishes(world):
    ids = synced(world)
    for subject in ("A", "B", "C", "D"):
        world.crm.update_activity(ids[subject], {"location": f"Ort {subject}"})
    third = sorted(world.coll.items())[2]
    world.coll.inject("update", href=third, error=DavUnreachable("CalDAV: cannot connect"))

    with pytest.raises(DavUnreachable):
        world.sync()
    done = [f["location"] for f in world.server_fields().values()]
    assert done.count(None) == 2  # two written before the failure, the rest waits

    result = world.sync()
    assert result.errors == [] and result.counts["updated_groupware"] == 2
    assert sorted(f["location"] for f in world.server_fields().values()) == ["Ort A", "Ort B", "Ort C", "Ort D"]
    assert len(world.activities()) == 4 and len(world.coll.items()) == 4


def test_a_refused_write_is_one_error_for_that_item(world):
    ids = synced(world)
    world.crm.update_activity(ids["A"], {"location": "Neu"})
    world.coll.inject("update", error=DavError("CalDAV PUT: 403 forbidden"))
    result = world.sync()
    assert len(result.errors) == 1 and "'A'" in result.errors[0] and "403" in result.errors[0]


def test_sync_dry_run_prints_the_plan_in_text_and_json(make_env):
    env = make_env(areas=("events",))
    env.dav_put("events", "phone.ics", event("phone", "Vom Handy"))
    env.cli("activity", "add", "--kind", "TERMIN", "--subject", "Vom CRM", "--start", "2026-12-09T10:00")

    result = env.cli("sync", "--dry-run")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "alice events: create-crm new item: 'Vom Handy'" not in lines
    assert f"alice events: create-crm item /{env.user}/calendar/phone.ics: 'Vom Handy'" in lines
    assert "alice events: create-groupware activity 1, new item: 'Vom CRM'" in lines

    code, out = env.cli_json("sync", "--dry-run")
    assert code == 0
    assert out["accounts"]["alice"]["events"]["plan"] == [
        {"action": "create-crm", "activity": None, "item": f"/{env.user}/calendar/phone.ics",
         "subject": "Vom Handy", "fields": [], "conflicts": []},
        {"action": "create-groupware", "activity": 1, "item": None, "subject": "Vom CRM", "fields": [],
         "conflicts": []}]
    assert len(env.dav_items("events")) == 1  # nothing written
    code, out = env.cli_json("sync")
    assert code == 0 and "plan" not in out["accounts"]["alice"]["events"]
    assert out["accounts"]["alice"]["events"]["created_crm"] == 1


# Found by the state machine in test_reconcile.py:

def test_an_item_whose_etag_the_server_rewrote_is_deleted_with_its_activity(world):
    """The server gave the item a new ETag (same content) and the activity was deleted: the
    delete must use the ETag just read, not the linked one, or it meets a 412 on every run."""
    ids = synced(world)
    href, _ = item_of(world, "C")
    world.coll.touch(href)
    world.crm.delete_activity(ids["C"])

    result = world.sync()

    assert result.errors == [] and result.counts["deleted_groupware"] == 1
    assert href not in world.coll.items()


def test_an_item_whose_write_back_failed_is_read_again_and_gets_no_twin(world):
    """A new phone item became an activity, then writing the link into the item failed (a 403):
    the next run must read that item again and link it, not put a second item on the server."""
    world.coll.put("phone.ics", event("phone", "Vom Handy"))
    world.coll.inject("update", error=DavError("CalDAV PUT: 403 forbidden"))
    assert len(world.sync().errors) == 1

    result = world.sync()

    assert result.errors == [] and result.counts["created_groupware"] == 0
    assert list(world.coll.items()) == ["/alice/calendar/phone.ics"] and len(world.activities()) == 1
    assert [l.href for l in world.state.links("alice", "events")] == ["/alice/calendar/phone.ics"]

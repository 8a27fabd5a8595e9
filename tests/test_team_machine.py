"""A Hypothesis state machine for a team: alice's and bob's real CalendarSync over one CRM
(MemoryCRM) and one state database, each with an events and a tasks collection
(MemoryCollection), items sharing UIDs (invitations, a task in both lists) and activities shared
by participants, moved by owner changes and delegation, edited, deleted and synced in any order.
Invariants: one activity per UID; a sync deletes no activity that another account's copy or
another employee holds, and none made in the CRM; after a quiet round (each account syncs until
nothing is left to do) every account holds exactly the activities it links, and every copy
agrees with its activity."""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import test_reconcile as single
from calworld import TeamWorld, meeting, todo
from gwsync.calendar.icalmap import FIELDS
from gwsync.crm import ActivityDraft

NAMES = TeamWorld.NAMES
names = st.sampled_from(NAMES)
AREAS = ("events", "tasks")
areas = st.sampled_from(AREAS)
KIND = {"events": "TERMIN", "tasks": "AUFGABE"}


def set_prop(text: str, field: str, value: str) -> str:
    """`single.set_prop` for events and tasks."""
    if "END:VTODO" in text:
        return single.set_prop(text.replace("END:VTODO", "END:VEVENT"), field, value).replace("END:VEVENT", "END:VTODO")
    return single.set_prop(text, field, value)
QUIET_PASSES = 3  # rounds of alice then bob; a change made in one copy reaches the other in two


class TeamCalendarMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="gwsync-team-machine-"))
        self.world = TeamWorld(self.dir)  # conflict policy "crm": runs must not depend on the clock
        self.n = 0
        self.made_in_crm: set[int] = set()  # activity ids made in the CRM and not deleted there

    def teardown(self):
        self.world.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- the users' and their clients' edits -------------------------------------------------

    def _activity(self, data):
        return data.draw(st.sampled_from(sorted(self.world.activities())))

    def _href(self, data, name: str, area: str):
        return data.draw(st.sampled_from(list(self.world.coll(name, area).items())))

    def _collection(self, data) -> tuple[str, str]:
        """(account, area) of a collection that has items."""
        return data.draw(st.sampled_from([(n, a) for n in NAMES for a in AREAS if self.world.coll(n, a).items()]))

    def _any_items(self) -> bool:
        return any(self.world.coll(n, a).items() for n in NAMES for a in AREAS)

    @rule(value=single.values, where=st.sampled_from([("alice",), ("bob",), ("alice", "bob")]), organizer=names,
          area=areas)
    def invitation(self, value, where, organizer, area):
        """A meeting (or a task) lands in one or both calendars (task lists), with one UID."""
        self.n += 1
        uid = f"inv{self.n}"
        text = meeting(uid, single._escape(value), organizer=f"{organizer}@firma.example") if area == "events" \
            else todo(uid, single._escape(value))
        for name in where:
            self.world.coll(name, area).put(f"{uid}.ics", text)

    @rule(value=single.values, owner=names, area=areas)
    def create_in_crm(self, value, owner, area):
        self.n += 1
        (activity_id,) = self.world.crm.create_activities([ActivityDraft(
            key=f"crm:{self.n}", kind=KIND[area], status="O", subject=value, start="2026-12-09T10:00:00+00:00",
            owner=owner, participants=[owner])])
        self.made_in_crm.add(activity_id)

    @precondition(lambda self: self.world.activities())
    @rule(data=st.data(), delegate=st.sampled_from([None, *NAMES]))
    def delegated_in_crm(self, data, delegate):
        self.world.crm.update_activity(self._activity(data), {"delegated_to": delegate})

    @precondition(lambda self: self.world.activities())
    @rule(data=st.data(), name=names, add=st.booleans())
    def participants_edited_in_crm(self, data, name, add):
        activity_id = self._activity(data)
        change = self.world.crm.add_participant if add else self.world.crm.remove_participant
        change(activity_id, name)

    @precondition(lambda self: self.world.activities())
    @rule(data=st.data(), owner=names)
    def owner_changed_in_crm(self, data, owner):
        """As `activity edit --owner`: the new owner replaces the old one among the participants."""
        activity_id = self._activity(data)
        old = self.world.crm.get_activity(activity_id).owner
        self.world.crm.update_activity(activity_id, {"owner": owner})
        self.world.crm.add_participant(activity_id, owner)
        if old != owner:
            self.world.crm.remove_participant(activity_id, old)

    @precondition(lambda self: self.world.activities())
    @rule(data=st.data(), field=st.sampled_from(single.EDITABLE), value=single.values)
    def edit_in_crm(self, data, field, value):
        self.world.crm.update_activity(self._activity(data), {field: value})

    @precondition(lambda self: self._any_items())
    @rule(data=st.data(), field=st.sampled_from(single.EDITABLE), value=single.values)
    def edit_on_server(self, data, field, value):
        name, area = self._collection(data)
        coll = self.world.coll(name, area)
        href = self._href(data, name, area)
        coll.put(href, set_prop(coll.items()[href].data, field, value))

    @precondition(lambda self: self.world.activities())
    @rule(data=st.data())
    def delete_in_crm(self, data):
        activity_id = self._activity(data)
        self.world.crm.delete_activity(activity_id)
        self.made_in_crm.discard(activity_id)

    @precondition(lambda self: self._any_items())
    @rule(data=st.data())
    def delete_on_server(self, data):
        name, area = self._collection(data)
        self.world.coll(name, area).remove(self._href(data, name, area))

    # -- syncs -------------------------------------------------------------------------------

    @rule(name=names, area=areas)
    def sync(self, name, area):
        self._sync(name, area)

    @precondition(lambda self: self._any_items())
    @rule(data=st.data(), method=st.sampled_from(["update", "delete"]), field=st.sampled_from(single.EDITABLE),
          value=single.values)
    def sync_meets_a_412(self, data, method, field, value):
        """Another client edits an item just before gwsync writes or deletes it (a join's link,
        a release's delete): the write meets a 412, and that item is read and decided again."""
        name, area = self._collection(data)
        coll = self.world.coll(name, area)
        href = self._href(data, name, area)

        def edit(c):
            if href in c.items():
                c.put(href, set_prop(c.items()[href].data, field, value))

        coll.inject(method, href=href, before=edit)
        self._sync(name, area)
        coll.reset_faults()

    @rule()
    def quiet_round(self):
        """Nobody edits: each account syncs until its plan is empty; then all copies agree."""
        for _ in range(QUIET_PASSES):
            for name in NAMES:
                for area in AREAS:
                    self._sync(name, area)
        world = self.world
        for name in NAMES:
            for area in AREAS:
                assert world.calsync(name, area).plan().actions == (), f"{name}'s {area} sync has not settled"
        activities = world.activities()
        for name in NAMES:
            for area in AREAS:
                self._agree(name, area, activities)

    def _agree(self, name: str, area: str, activities: dict) -> None:
        world = self.world
        links = world.state.links(name, area)
        items = world.fields(name, area)
        held = sorted(i for i, a in activities.items() if self._holds(name, area, a))
        assert sorted(l.activity_id for l in links) == held, (name, area, "holds other activities than it links")
        assert sorted(l.href for l in links) == sorted(items), (name, area, "an item without its activity")
        for link in links:
            crm = activities[link.activity_id].calendar_fields()
            got = items[link.href]
            assert {f: crm[f] or None for f in FIELDS} == {f: got[f] or None for f in FIELDS}, (name, link)

    def _holds(self, name: str, area: str, activity) -> bool:
        """TEAM.md's rule, with unlinks ("taken out") overriding it; each kind in its area."""
        if activity.kind not in self.world.config.crm.kinds_of(area):
            return False
        membership = self.world.state.memberships(name, area).get(activity.id)
        if membership is not None:
            return membership
        if area == "events":
            return name == activity.owner or name in activity.participants
        delegate = activity.delegated_to
        return name == delegate or (name == activity.owner and delegate is None) or (
            name in activity.participants and name != activity.owner)

    def _sync(self, name: str, area: str) -> None:
        world = self.world
        before = world.activities()
        holders = {i: ({l.account for l in world.state.links_of_activity(i)} | set(a.employees)) - {name}
                   for i, a in before.items()}
        result = world.sync(name, area, force=True)  # random deletions may well pass the guard's share
        assert result.errors == [], result.errors
        after = world.activities()
        for gone in set(before) - set(after):
            assert not holders[gone], ("deleted while others held it", gone, holders[gone])
            assert gone not in self.made_in_crm, ("a sync deleted an activity made in the CRM", gone)

    @invariant()
    def one_activity_per_uid(self):
        """Among the links to activities that exist (a link to one deleted in the CRM goes with
        its item at that account's next sync)."""
        activity_of: dict[str, int] = {}
        existing = self.world.activities()
        for name in NAMES:
            for area in AREAS:
                for link in self.world.state.links(name, area):
                    if link.activity_id not in existing:
                        continue
                    assert activity_of.setdefault(link.uid, link.activity_id) == link.activity_id, (
                        "two activities for one UID", link.uid)
        keys = [a.key for a in self.world.activities().values()]
        assert len(keys) == len(set(keys))

    @invariant()
    def no_twins_in_a_calendar(self):
        for name in NAMES:
            for area in AREAS:
                items = self.world.coll(name, area).items().values()
                uids = [re.search(r"\r\nUID:([^\r]*)", i.data).group(1) for i in items]
                assert len(uids) == len(set(uids)), (name, area, uids)


TeamCalendarMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)
test_team_calendars_converge = TeamCalendarMachine.TestCase

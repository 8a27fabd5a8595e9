"""The reconcile core: unit cases, and a Hypothesis state machine that drives the real
CalendarSync (real EmbeddedCRM and StateStore on temporary SQLite files) over a MemoryCollection
with ETags rewritten by the server, 412 races and failures in the middle of applying."""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from calworld import CalWorld, event
from gwsync.calendar.dav import DavError, DavUnreachable
from gwsync.calendar.icalmap import FIELDS
from gwsync.calendar.reconcile import Side, guard_deletions, reconcile

F = ("subject", "body", "start")
BASE = {"subject": "a", "body": "b", "start": "2026-01-01"}


def test_one_side_changed_goes_to_the_other():
    d = reconcile(BASE, Side(BASE | {"subject": "crm"}), Side(BASE), F)
    assert d.update_groupware == {"subject": "crm"} and d.update_crm == {} and not d.conflicts
    d = reconcile(BASE, Side(BASE), Side(BASE | {"body": "gw"}), F)
    assert d.update_crm == {"body": "gw"} and d.update_groupware == {}


def test_different_fields_on_both_sides_merge():
    d = reconcile(BASE, Side(BASE | {"subject": "crm"}), Side(BASE | {"body": "gw"}), F)
    assert d.update_crm == {"body": "gw"} and d.update_groupware == {"subject": "crm"}
    assert d.base == {"subject": "crm", "body": "gw", "start": "2026-01-01"} and d.conflicts == []


def test_same_field_both_sides_follows_the_policy_and_is_reported():
    crm, gw = Side(BASE | {"subject": "crm"}, "2026-01-02T00:00:00+00:00"), Side(BASE | {"subject": "gw"},
                                                                                 "2026-01-03T00:00:00+00:00")
    assert reconcile(BASE, crm, gw, F, "newest").base["subject"] == "gw"
    assert reconcile(BASE, crm, gw, F, "crm").base["subject"] == "crm"
    assert reconcile(BASE, crm, gw, F, "groupware").base["subject"] == "gw"
    assert reconcile(BASE, crm, gw, F).conflicts == ["subject"]
    same = reconcile(BASE, Side(BASE | {"subject": "x"}), Side(BASE | {"subject": "x"}), F)
    assert same.is_noop and same.conflicts == []


def test_nothing_changed_is_a_noop():
    assert reconcile(BASE, Side(BASE), Side(BASE), F).is_noop


def test_deletions_propagate_unless_the_other_side_changed():
    assert reconcile(BASE, None, Side(BASE), F).delete_groupware
    assert reconcile(BASE, Side(BASE), None, F).delete_crm
    assert reconcile(BASE, None, Side(BASE | {"body": "edited"}), F).create_crm == BASE | {"body": "edited"}
    assert reconcile(BASE, Side(BASE | {"body": "edited"}), None, F).create_groupware == BASE | {"body": "edited"}
    assert reconcile(BASE, None, None, F).forget


def test_new_items_are_created_on_the_other_side():
    assert reconcile(None, Side(BASE), None, F).create_groupware == BASE
    assert reconcile(None, None, Side(BASE), F).create_crm == BASE


def test_mass_deletion_guard():
    assert not guard_deletions(1, 1, 0.5)  # deleting the only appointment is normal
    assert not guard_deletions(2, 10, 0.5)
    assert guard_deletions(6, 10, 0.5)
    assert guard_deletions(500, 500, 0.5)


values = st.sampled_from(["v1", "v2", "ü 😀", "a, b; c\\d", ""])
EDITABLE = ("subject", "location")
PROPS = {"subject": "SUMMARY", "location": "LOCATION"}


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace(",", "\\,").replace(";", "\\;")


def set_prop(text: str, field: str, value: str) -> str:
    """Another client edits one property of an event (the item's only VEVENT)."""
    lines = text.replace("\r\n ", "").replace("\r\n\t", "").split("\r\n")
    name = PROPS[field]
    new = f"{name}:{_escape(value)}"
    for n, line in enumerate(lines):
        if re.match(rf"{name}[:;]", line):
            lines[n] = new
            break
    else:
        lines.insert(lines.index("END:VEVENT"), new)
    return "\r\n".join(lines)


class CalendarSyncMachine(RuleBasedStateMachine):
    """The CRM and the server edited, deleted and created on at random, the server rewriting
    ETags; `sync` runs the real CalendarSync. After a clean sync: activities and items pair up
    one to one through the links with equal fields (but for activities made in the CRM whose
    item was deleted on the server: they stay, taken out of the calendar, with no item), an
    activity made in the CRM is gone only when deleted there, a second sync plans nothing, and no edit
    made since the last clean sync is lost unless the other side edited that field too. Syncs
    with a 412 race or a failure part way are followed by a clean one, which must get there
    just the same (no twins, nothing lost)."""

    def __init__(self):
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="gwsync-machine-"))
        self.world = CalWorld(self.dir, conflict="crm")  # "newest" would make runs depend on the clock
        self.n = 0
        self.crm_edits: dict[tuple[int, str], str] = {}  # (activity id, field) -> value
        self.gw_edits: dict[tuple[str, str], str] = {}  # (href, field) -> value
        self.synced_crm: dict[int, dict] = {}  # the fields as the last clean sync left them
        self.synced_gw: dict[str, dict] = {}
        self.made_in_crm: set[int] = set()  # activity ids created in the CRM and not deleted there

    def teardown(self):
        self.world.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- the user's and other clients' edits -------------------------------------------------

    def _activity(self, data):
        return data.draw(st.sampled_from(sorted(self.world.activities())))

    def _href(self, data):
        # oldest first, not by href: gwsync's hrefs come from random UUIDs
        return data.draw(st.sampled_from(list(self.world.coll.items())))

    @rule(value=values)
    def create_in_crm(self, value):
        self.n += 1
        self.made_in_crm.add(self.world.add(value, key=f"crm:{self.n}"))

    @rule(value=values)
    def create_on_server(self, value):
        self.n += 1
        self.world.coll.put(f"phone{self.n}.ics", event(f"phone{self.n}", _escape(value)))

    @precondition(lambda self: self.world.activities())
    @rule(data=st.data(), field=st.sampled_from(EDITABLE), value=values)
    def edit_in_crm(self, data, field, value):
        activity_id = self._activity(data)
        self.world.crm.update_activity(activity_id, {field: value})
        self.crm_edits[(activity_id, field)] = value

    @precondition(lambda self: self.world.coll.items())
    @rule(data=st.data(), field=st.sampled_from(EDITABLE), value=values)
    def edit_on_server(self, data, field, value):
        self._server_edit(self._href(data), field, value)

    def _server_edit(self, href: str, field: str, value: str) -> None:
        coll = self.world.coll
        coll.put(href, set_prop(coll.items()[href].data, field, value))
        self.gw_edits[(href, field)] = value

    @precondition(lambda self: self.world.coll.items())
    @rule(data=st.data())
    def server_rewrites_etag(self, data):
        self.world.coll.touch(self._href(data))  # same content, new ETag (servers do that)

    @precondition(lambda self: self.world.activities())
    @rule(data=st.data())
    def delete_in_crm(self, data):
        activity_id = self._activity(data)
        self.world.crm.delete_activity(activity_id)
        self.made_in_crm.discard(activity_id)
        self.crm_edits = {k: v for k, v in self.crm_edits.items() if k[0] != activity_id}  # superseded

    @precondition(lambda self: self.world.coll.items())
    @rule(data=st.data())
    def delete_on_server(self, data):
        href = self._href(data)
        self.world.coll.remove(href)
        self.gw_edits = {k: v for k, v in self.gw_edits.items() if k[0] != href}  # superseded

    # -- syncs -------------------------------------------------------------------------------

    @rule()
    def sync(self):
        self._clean_sync()

    @precondition(lambda self: self.world.coll.items())
    @rule(data=st.data(), method=st.sampled_from(["update", "delete"]), field=st.sampled_from(EDITABLE),
          value=values)
    def sync_meets_a_412(self, data, method, field, value):
        """Another client edits an item just before gwsync writes it: the write meets a 412."""
        href = self._href(data)
        self.world.coll.inject(method, href=href, before=lambda coll: self._server_edit(href, field, value))
        result = self.world.sync(force=True)
        self.world.coll.reset_faults()
        assert result.errors == [], result.errors
        self._clean_sync()

    @rule(method=st.sampled_from(["changes_since", "multiget", "get", "create", "update", "delete"]),
          transient=st.booleans(), later=st.integers(0, 3))
    def sync_fails_part_way(self, method, transient, later):
        """A call fails (the server went away, or refused one request); the next sync recovers."""
        error = DavUnreachable("CalDAV: cannot connect") if transient else DavError("CalDAV: 403 forbidden")
        coll = self.world.coll
        if later:
            coll.inject(method, times=later)  # these calls go through
        coll.inject(method, error=error)
        try:
            self.world.sync(force=True)
        except DavError:
            pass
        coll.reset_faults()
        self._clean_sync()

    def _clean_sync(self) -> None:
        world = self.world
        links_before = {(l.activity_id, l.href) for l in world.state.links("alice", "events")}
        result = world.sync(force=True)  # random deletions may well pass the guard's share
        assert result.errors == [], result.errors
        activities, items = world.activities(), world.server_fields()
        links = world.state.links("alice", "events")
        # a deletion on the server never destroys what its item did not create
        assert self.made_in_crm <= set(activities), "an activity made in the CRM was deleted by a sync"
        # one to one, with equal fields; taken out of the calendar: no link, no item
        taken_out = {i for i, included in world.state.memberships("alice", "events").items()
                     if not included and i in activities}
        assert taken_out <= self.made_in_crm, "only a CRM activity is taken out when its item goes"
        held = sorted(i for i in activities if i not in taken_out)
        assert sorted(l.activity_id for l in links) == held, "an activity without its item"
        assert sorted(l.href for l in links) == sorted(items), "an item without its activity"
        for link in links:
            crm = activities[link.activity_id].calendar_fields()
            assert {f: crm[f] or None for f in FIELDS} == {f: items[link.href][f] or None for f in FIELDS}, link
        # settled: the next sync has nothing to do
        assert world.calsync().plan().actions == ()
        # no edit lost, unless the same field was edited on the other side of the same pair
        pair_of = {l.activity_id: l.href for l in links} | {
            activity_id: href for activity_id, href in links_before}
        # (an edit back to the value of the last sync is no change: the other side's delete wins)
        crm_edits = {k: v for k, v in self.crm_edits.items()
                     if k[0] not in self.synced_crm or (self.synced_crm[k[0]][k[1]] or "") != v}
        gw_edits = {k: v for k, v in self.gw_edits.items()
                    if k[0] not in self.synced_gw or (self.synced_gw[k[0]][k[1]] or "") != v}
        both = {(pair_of.get(a), f) for (a, f) in crm_edits} & set(gw_edits)
        for (activity_id, field), value in crm_edits.items():
            if (pair_of.get(activity_id), field) not in both:
                assert activity_id in activities, ("an edited activity was deleted", activity_id)
                assert (activities[activity_id].calendar_fields()[field] or "") == value, ("lost", field)
        for (href, field), value in gw_edits.items():
            if (href, field) not in both:
                assert href in items, ("an edited item was deleted", href)
                assert (items[href][field] or "") == value, ("lost", href, field)
        self.crm_edits.clear()
        self.gw_edits.clear()
        self.synced_crm = {a.id: a.calendar_fields() for a in activities.values()}
        self.synced_gw = items

    @invariant()
    def never_twins(self):
        """At any time: one server item per activity, one activity per server item."""
        keys = [a.key for a in self.world.activities().values()]
        assert len(keys) == len(set(keys))
        uids = [re.search(r"\r\nUID:([^\r]*)", i.data).group(1) for i in self.world.coll.items().values()]
        assert len(uids) == len(set(uids))


CalendarSyncMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)
test_calendar_sync_converges = CalendarSyncMachine.TestCase


def test_attendees_changed_on_both_sides_are_merged_address_by_address():
    fields = ("subject", "attendees")
    base = {"subject": "a", "attendees": "bob@x.de,erika@y.de"}
    crm = Side(base | {"attendees": "bob@x.de,carol@z.de,erika@y.de"})  # carol added in the CRM
    phone = Side(base | {"attendees": "dave@z.de,erika@y.de"})  # bob removed, dave added on the phone
    d = reconcile(base, crm, phone, fields)
    assert not d.conflicts and d.base["attendees"] == "carol@z.de,dave@z.de,erika@y.de"
    assert d.update_crm == {"attendees": "carol@z.de,dave@z.de,erika@y.de"} == d.update_groupware
    d = reconcile(base, Side(base | {"attendees": None}), Side(base | {"attendees": "erika@y.de"}), fields)
    assert d.base["attendees"] is None and not d.conflicts  # removed on both, the rest on one side
    # a link saved before attendees were synced: its base has none, one side's are taken
    old = {"subject": "a"}
    d = reconcile(old, Side(old | {"attendees": None}), Side(old | {"attendees": "erika@y.de"}), fields)
    assert d.update_crm == {"attendees": "erika@y.de"} and d.update_groupware == {} and not d.conflicts
    # never linked: the union
    d = reconcile(None, Side(old | {"attendees": "bob@x.de"}), Side(old | {"attendees": "erika@y.de"}), fields)
    assert d.base["attendees"] == "bob@x.de,erika@y.de" and d.conflicts == []

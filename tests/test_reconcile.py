"""The reconcile core: unit cases and a Hypothesis state machine of two replicas."""

from __future__ import annotations

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from gwsync.reconcile import Side, guard_deletions, reconcile

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


values = st.sampled_from(["v1", "v2", "v3", "ü", ""])


class TwoReplicas(RuleBasedStateMachine):
    """The CRM and the groupware as dicts of items, edited, deleted and (on the server) rewritten
    with new ETags at random; `sync` applies reconcile's decisions. After each sync both sides
    are equal, and no edit made since the last sync is lost unless both sides edited that field."""

    def __init__(self):
        super().__init__()
        self.crm: dict[int, dict] = {}
        self.gw: dict[int, dict] = {}
        self.etags: dict[int, int] = {}
        self.base: dict[int, dict] = {}
        self.linked_etag: dict[int, int] = {}
        self.next_id = 0
        self.crm_edits: dict[tuple[int, str], str] = {}
        self.gw_edits: dict[tuple[int, str], str] = {}
        self.clock = 0
        self.modified = {"crm": {}, "gw": {}}

    def _tick(self) -> str:
        self.clock += 1
        return f"2026-01-01T00:00:{self.clock:02d}" if self.clock < 60 else f"2026-01-01T01:{self.clock % 60:02d}:00"

    @rule(value=values)
    def create_in_crm(self, value):
        self.next_id += 1
        self.crm[self.next_id] = {f: value for f in F}
        self.modified["crm"][self.next_id] = self._tick()

    @rule(value=values)
    def create_on_server(self, value):
        self.next_id += 1
        self.gw[self.next_id] = {f: value for f in F}
        self.etags[self.next_id] = 0
        self.modified["gw"][self.next_id] = self._tick()

    @precondition(lambda self: self.crm)
    @rule(data=st.data(), name=st.sampled_from(F), value=values)
    def edit_in_crm(self, data, name, value):
        key = data.draw(st.sampled_from(sorted(self.crm)))
        self.crm[key][name] = value
        self.crm_edits[(key, name)] = value
        self.modified["crm"][key] = self._tick()

    @precondition(lambda self: self.gw)
    @rule(data=st.data(), name=st.sampled_from(F), value=values)
    def edit_on_server(self, data, name, value):
        key = data.draw(st.sampled_from(sorted(self.gw)))
        self.gw[key][name] = value
        self.etags[key] += 1
        self.gw_edits[(key, name)] = value
        self.modified["gw"][key] = self._tick()

    @precondition(lambda self: self.gw)
    @rule(data=st.data())
    def server_rewrites_etag(self, data):
        key = data.draw(st.sampled_from(sorted(self.gw)))
        self.etags[key] += 1  # same content, new ETag (servers do that)

    @precondition(lambda self: self.crm)
    @rule(data=st.data())
    def delete_in_crm(self, data):
        key = data.draw(st.sampled_from(sorted(self.crm)))
        del self.crm[key]
        self.crm_edits = {k: v for k, v in self.crm_edits.items() if k[0] != key}  # superseded

    @precondition(lambda self: self.gw)
    @rule(data=st.data())
    def delete_on_server(self, data):
        key = data.draw(st.sampled_from(sorted(self.gw)))
        del self.gw[key]
        self.gw_edits = {k: v for k, v in self.gw_edits.items() if k[0] != key}  # superseded

    @rule(policy=st.sampled_from(["newest", "crm", "groupware"]))
    def sync(self, policy):
        for key in sorted(set(self.crm) | set(self.gw) | set(self.base)):
            crm = Side(dict(self.crm[key]), self.modified["crm"].get(key)) if key in self.crm else None
            # Like the real sync: an unchanged ETag means "unchanged", without reading the item.
            if key in self.gw and key in self.base and self.linked_etag.get(key) == self.etags[key]:
                gw = Side(dict(self.base[key]))
            else:
                gw = Side(dict(self.gw[key]), self.modified["gw"].get(key)) if key in self.gw else None
            d = reconcile(self.base.get(key), crm, gw, F, policy)
            both_edited = {name for (k, name) in self.crm_edits if k == key} & {
                name for (k, name) in self.gw_edits if k == key}
            if d.forget:
                self.base.pop(key, None)
                continue
            if d.delete_crm:
                del self.crm[key]
                self.base.pop(key, None)
                continue
            if d.delete_groupware:
                del self.gw[key]
                self.base.pop(key, None)
                continue
            if d.create_crm is not None:
                self.crm[key] = dict(d.create_crm)
            if d.create_groupware is not None:
                self.gw[key] = dict(d.create_groupware)
                self.etags[key] = self.etags.get(key, 0) + 1
            self.crm[key].update(d.update_crm)
            if d.update_groupware:
                self.gw[key].update(d.update_groupware)
                self.etags[key] += 1
            self.base[key] = dict(d.base)
            self.linked_etag[key] = self.etags[key]
            for (k, name), value in {**self.crm_edits, **self.gw_edits}.items():
                if k == key and name not in both_edited:
                    edits = self.crm_edits if (k, name) in self.crm_edits else self.gw_edits
                    assert self.crm[key][name] == edits[(k, name)], ("lost edit", key, name)
        self.crm_edits.clear()
        self.gw_edits.clear()
        assert self.crm == self.gw, "the two sides differ after a sync"
        assert set(self.base) == set(self.crm)

    @invariant()
    def no_duplicates(self):
        assert len(self.crm) == len(set(self.crm)) and len(self.gw) == len(set(self.gw))


TwoReplicas.TestCase.settings = settings(max_examples=300, stateful_step_count=30, deadline=None)
test_two_replicas_converge = TwoReplicas.TestCase

"""The two-way reconcile core: last synced state + CRM side + groupware side -> what to do.

Pure functions over plain dicts of mapped fields (see `icalmap.FIELDS`); no I/O, no clock.

- Only one side changed since the last sync: its changes go to the other side.
- Both changed: fields changed on one side only are merged; a field changed on both sides to
  different values is decided by the policy (`newest`, `crm`, `groupware`) and reported. A set
  field (SET_FIELDS: comma-separated, sorted) changed on both sides is merged element by element
  instead: what either side added is in, what either side removed is out; never a conflict.
- Deleted on one side, unchanged on the other: the deletion propagates. Deleted on one side
  but changed on the other: the change wins and the item is created again (no edit is lost).
"""

from __future__ import annotations

from dataclasses import dataclass, field

POLICIES = ("newest", "crm", "groupware")
SET_FIELDS = ("attendees",)  # see gwsync.crm.attendee_addresses


@dataclass(frozen=True)
class Side:
    fields: dict
    modified: str | None = None  # ISO 8601 UTC, for the `newest` policy


@dataclass
class Decision:
    create_crm: dict | None = None  # fields of a new CRM activity
    create_groupware: dict | None = None  # fields of a new groupware item
    update_crm: dict = field(default_factory=dict)  # field -> new value
    update_groupware: dict = field(default_factory=dict)
    delete_crm: bool = False
    delete_groupware: bool = False
    forget: bool = False  # both sides gone: drop the link
    base: dict | None = None  # the state both sides will be in afterwards
    conflicts: list[str] = field(default_factory=list)

    @property
    def is_noop(self) -> bool:
        return not (self.create_crm or self.create_groupware or self.update_crm or self.update_groupware
                    or self.delete_crm or self.delete_groupware or self.forget)


def changed_fields(before: dict | None, after: dict, fields) -> set[str]:
    before = before or {}
    return {f for f in fields if after.get(f) != before.get(f)}


def reconcile(base: dict | None, crm: Side | None, groupware: Side | None, fields, policy: str = "newest") -> Decision:
    if policy not in POLICIES:
        raise ValueError(f"unknown conflict policy {policy!r}")
    if crm is None:
        if groupware is None:
            return Decision(forget=base is not None)
        if base is not None and not changed_fields(base, groupware.fields, fields):
            return Decision(delete_groupware=True)
        return Decision(create_crm=dict(groupware.fields), base=dict(groupware.fields))
    if groupware is None:
        if base is not None and not changed_fields(base, crm.fields, fields):
            return Decision(delete_crm=True)
        return Decision(create_groupware=dict(crm.fields), base=dict(crm.fields))
    if base is None:
        # Both exist but were never linked (e.g. the state was lost): treat every difference
        # as changed on both sides.
        return _merge({}, crm, groupware, fields, policy, unknown_base=True)
    return _merge(base, crm, groupware, fields, policy)


def _merge(base: dict, crm: Side, groupware: Side, fields, policy: str, unknown_base: bool = False) -> Decision:
    merged: dict = {}
    conflicts: list[str] = []
    for f in fields:
        c, g, b = crm.fields.get(f), groupware.fields.get(f), base.get(f)
        c_changed, g_changed = (True, True) if unknown_base else (c != b, g != b)
        if c == g:
            merged[f] = c
        elif c_changed and not g_changed:
            merged[f] = c
        elif g_changed and not c_changed:
            merged[f] = g
        elif f in SET_FIELDS:
            merged[f] = _merge_sets(b, c, g)
        else:
            merged[f] = c if _crm_wins(crm, groupware, policy) else g
            conflicts.append(f)
    decision = Decision(base=merged, conflicts=conflicts)
    decision.update_crm = {f: merged[f] for f in fields if merged[f] != crm.fields.get(f)}
    decision.update_groupware = {f: merged[f] for f in fields if merged[f] != groupware.fields.get(f)}
    return decision


def _merge_sets(base: str | None, crm: str | None, groupware: str | None) -> str | None:
    """Both sides' additions and removals since the base (no base: both sides' elements)."""
    def elements(value):
        return set(value.split(",")) if value else set()

    b, c, g = elements(base), elements(crm), elements(groupware)
    return ",".join(sorted((b | (c - b) | (g - b)) - (b - c) - (b - g))) or None


def _crm_wins(crm: Side, groupware: Side, policy: str) -> bool:
    if policy == "crm":
        return True
    if policy == "groupware":
        return False
    # newest: the later modification wins; unknown times and ties go to the CRM.
    if crm.modified and groupware.modified:
        return crm.modified >= groupware.modified
    return groupware.modified is None or crm.modified is not None


def guard_deletions(deletions: int, total: int, max_share: float) -> bool:
    """True when deleting this many of `total` items looks like a server error, not a user:
    more than one item, and more than `max_share` of them."""
    return deletions > 1 and total > 0 and deletions / total > max_share

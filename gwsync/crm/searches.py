"""The quick searches, shared by `gwsync activities` and the web view: everyone's (imported mail,
all activities) and one employee's (the seed's "mine": what they own, are delegated or take part in).

An employee is an account name of the config; the front-end says who is asking (`me`)."""

from __future__ import annotations

from datetime import UTC, datetime, time

from . import ActivityFilter

# name -> title, in the order the web view lists them
QUICK_SEARCHES = {
    "today": "Imported today",
    "unassigned": "Unassigned imported mail",
    "imported": "All imported mail",
    "all": "All activities",
}
# One employee's searches: name -> title, in the order the web view lists them (before everyone's).
MY_SEARCHES = {
    "mine": "Mine",
    "mine-today": "My imports today",
    "mine-unassigned": "My unassigned mail",
}
# What each search selects, as activity_filter's (imported, unassigned, today); an employee's
# search adds `involving=me`.
_SELECTS = {"today": (True, False, True), "unassigned": (True, True, False), "imported": (True, False, False),
            "all": (False, False, False), "mine": (False, False, False), "mine-today": (True, False, True),
            "mine-unassigned": (True, True, False)}


def today_start_utc(now: datetime | None = None) -> str:
    """Local midnight of today, as an ISO timestamp in UTC (imported_at is stored in UTC)."""
    now = now or datetime.now().astimezone()
    local_midnight = datetime.combine(now.date(), time.min, tzinfo=now.tzinfo)
    return local_midnight.astimezone(UTC).isoformat(timespec="seconds")


def activity_filter(imported: bool = False, unassigned: bool = False, today: bool = False,
                    kind: str | None = None, now: datetime | None = None, owner: str | None = None,
                    involving: str | None = None) -> ActivityFilter:
    """`owner`: only this employee's activities; `involving`: those the employee owns, is
    delegated or takes part in (the seed's "mine")."""
    return ActivityFilter(imported=imported or today or unassigned, unassigned=unassigned,
                          imported_since=today_start_utc(now) if today else None, kind=kind,
                          owners=(owner,) if owner is not None else None, involving=involving)


def quick_search(name: str, me: str | None = None, now: datetime | None = None) -> ActivityFilter:
    """The filter of one of QUICK_SEARCHES, or, given the employee `me`, of MY_SEARCHES too;
    KeyError for another name (and for one of MY_SEARCHES without `me`)."""
    if name not in searches_for(me):
        raise KeyError(name)
    imported, unassigned, today = _SELECTS[name]
    return activity_filter(imported=imported, unassigned=unassigned, today=today, now=now,
                           involving=me if name in MY_SEARCHES else None)


def searches_for(me: str | None) -> dict[str, str]:
    """name -> title of the quick searches offered to `me` (an employee; None: no one in
    particular): theirs first, then everyone's."""
    return (MY_SEARCHES | QUICK_SEARCHES) if me is not None else dict(QUICK_SEARCHES)


def summary_links(web_base: str | None, activities) -> list[str]:
    """Lines for an import summary that open the quick searches on the web view: everything
    imported today, and the unassigned mail when this import brought some."""
    if not web_base or not activities:
        return []
    lines = [f"imported today: {web_base}/searches/today"]
    if any(a.unassigned for a in activities):
        lines.append(f"unassigned: {web_base}/searches/unassigned")
    return lines

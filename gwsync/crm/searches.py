"""The quick searches over imported mail, shared by `gwsync activities` and the web view."""

from __future__ import annotations

from datetime import UTC, datetime, time

from . import ActivityFilter

# name -> title, in the order the web view lists them
QUICK_SEARCHES = {
    "today": "Imported today",
    "unassigned": "Unassigned imported mail",
    "imported": "All imported mail",
}


def today_start_utc(now: datetime | None = None) -> str:
    """Local midnight of today, as an ISO timestamp in UTC (imported_at is stored in UTC)."""
    now = now or datetime.now().astimezone()
    local_midnight = datetime.combine(now.date(), time.min, tzinfo=now.tzinfo)
    return local_midnight.astimezone(UTC).isoformat(timespec="seconds")


def activity_filter(imported: bool = False, unassigned: bool = False, today: bool = False,
                    kind: str | None = None, now: datetime | None = None) -> ActivityFilter:
    return ActivityFilter(imported=imported or today or unassigned, unassigned=unassigned,
                          imported_since=today_start_utc(now) if today else None, kind=kind)


def quick_search(name: str, now: datetime | None = None) -> ActivityFilter:
    """The filter of one of QUICK_SEARCHES; KeyError for another name."""
    if name not in QUICK_SEARCHES:
        raise KeyError(name)
    return activity_filter(imported=True, unassigned=name == "unassigned", today=name == "today", now=now)



def summary_links(web_base: str | None, activities) -> list[str]:
    """Lines for an import summary that open the quick searches on the web view: everything
    imported today, and the unassigned mail when this import brought some."""
    if not web_base or not activities:
        return []
    lines = [f"imported today: {web_base}/searches/today"]
    if any(a.unassigned for a in activities):
        lines.append(f"unassigned: {web_base}/searches/unassigned")
    return lines

"""One account's calendar sync without a server: the real CalendarSync, a real EmbeddedCRM and
StateStore on temporary SQLite files, and a MemoryCollection standing for the CalDAV server."""

from __future__ import annotations

from pathlib import Path

from gwsync.calendar.icalmap import read_item
from gwsync.calendar.sync import CalendarResult, CalendarSync
from gwsync.config import parse_config
from gwsync.crm import ActivityDraft, ActivityFilter
from gwsync.crm.embedded import EmbeddedCRM
from gwsync.storage.state import StateStore
from gwsync.testing import MemoryCollection

LINK = "https://crm.example.com/activities/{id}"


def event(uid: str, summary: str, extra: str = "") -> str:
    """An event as a phone writes it."""
    return (f"BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//Phone//EN\r\nBEGIN:VEVENT\r\nUID:{uid}\r\n"
            f"DTSTAMP:20261120T100000Z\r\nDTSTART:20261201T090000Z\r\nDTEND:20261201T100000Z\r\n"
            f"SUMMARY:{summary}\r\n{extra}END:VEVENT\r\nEND:VCALENDAR\r\n")


class CalWorld:
    def __init__(self, directory: Path, conflict: str = "newest", collection: MemoryCollection | None = None):
        self.config = parse_config({
            "crm": {"database": str(directory / "crm.db"), "link": LINK},
            "state": {"database": str(directory / "state.db")},
            "sync": {"conflict": conflict},
            "accounts": {"alice": {"areas": ["events"], "caldav": {
                "url": "http://memory.invalid/alice/", "username": "alice", "password": "unused"}}},
        })
        self.account = self.config.account("alice")
        c = self.config.crm
        self.crm = EmbeddedCRM(c.database, c.documents, c.statuses, c.link)
        self.state = StateStore(self.config.state_database)
        self.coll = collection or MemoryCollection()

    def close(self) -> None:
        self.crm.close()
        self.state.close()

    def calsync(self, **kw) -> CalendarSync:
        return CalendarSync(self.config, self.account, "events", self.crm, self.state, self.coll, **kw)

    def sync(self, **kw) -> CalendarResult:
        return self.calsync(**kw).run()

    # -- the CRM side, as a user edits it ----------------------------------------------------

    def add(self, subject: str, key: str | None = None, start: str = "2026-12-09T10:00:00+00:00") -> int:
        (activity_id,) = self.crm.create_activities([ActivityDraft(
            key=key or f"crm:{subject}", kind="TERMIN", status="O", subject=subject, start=start,
            end=None, owner="alice")])
        return activity_id

    def activities(self) -> dict[int, object]:
        return {a.id: a for a in self.crm.list_activities(ActivityFilter())}

    def server_fields(self) -> dict[str, dict]:
        """href -> mapped fields of every item on the server."""
        return {href: read_item(item.data, "E", "O", store=self.crm.store_id()).fields
                for href, item in self.coll.items().items()}


def meeting(uid: str, summary: str, organizer: str = "alice@firma.example", extra: str = "") -> str:
    """An invitation as both calendars store it: alice organizes, bob attends."""
    return event(uid, summary, f"ORGANIZER:mailto:{organizer}\r\nATTENDEE:mailto:bob@firma.example\r\n{extra}")


class TeamWorld:
    """Two accounts, alice and bob, on one CRM (MemoryCRM) and one state database, each with
    their own events and tasks collections (MemoryCollection); `shared` gives bob alice's
    events collection (a team calendar both sync)."""

    NAMES = ("alice", "bob")

    def __init__(self, directory: Path, shared: bool = False, conflict: str = "crm", sync: dict | None = None):
        from gwsync.testing import MemoryCRM

        statuses = {"O": "Offen", "E": "Erledigt", "S": "Storniert"}
        self.config = parse_config({
            "crm": {"database": str(directory / "crm.db"), "link": LINK, "statuses": statuses},
            "state": {"database": str(directory / "state.db")},
            "sync": {"conflict": conflict, **(sync or {})},
            "accounts": {name: {"areas": ["events", "tasks"], "addresses": [f"{name}@firma.example"], "caldav": {
                "url": "http://memory.invalid/", "username": name, "password": "unused"}} for name in self.NAMES},
        })
        self.crm = MemoryCRM(statuses, LINK)
        self.state = StateStore(self.config.state_database)
        self.colls = {(name, area): MemoryCollection(f"http://memory.invalid/{name}/{area}/")
                      for name in self.NAMES for area in ("events", "tasks")}
        if shared:
            self.colls["bob", "events"] = self.colls["alice", "events"]

    def close(self) -> None:
        self.state.close()

    def coll(self, name: str, area: str = "events") -> MemoryCollection:
        return self.colls[name, area]

    def calsync(self, name: str, area: str = "events", **kw) -> CalendarSync:
        return CalendarSync(self.config, self.config.account(name), area, self.crm, self.state,
                            self.coll(name, area), **kw)

    def sync(self, name: str, area: str = "events", **kw) -> CalendarResult:
        return self.calsync(name, area, **kw).run()

    def sync_all(self, **kw) -> dict[tuple[str, str], CalendarResult]:
        """One `gwsync sync`: alice's areas, then bob's."""
        return {(name, area): self.sync(name, area, **kw) for name in self.NAMES for area in ("events", "tasks")}

    def activities(self) -> dict[int, object]:
        return {a.id: a for a in self.crm.list_activities(ActivityFilter())}

    def fields(self, name: str, area: str = "events") -> dict[str, dict]:
        """href -> mapped fields of every item in the account's collection."""
        return {href: read_item(item.data, "E", "O", store=self.crm.store_id(), cancelled_status="S").fields
                for href, item in self.coll(name, area).items().items()}


def todo(uid: str, summary: str, extra: str = "") -> str:
    """A task as a phone writes it."""
    return (f"BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//Phone//EN\r\nBEGIN:VTODO\r\nUID:{uid}\r\n"
            f"DTSTAMP:20261120T100000Z\r\nDUE;VALUE=DATE:20261205\r\nSUMMARY:{summary}\r\n{extra}"
            "END:VTODO\r\nEND:VCALENDAR\r\n")

"""What the sync state store records, as plain data: the outcomes and the record types.

Kept apart from the store (gwsync/storage/state.py) so that the pure modules and the commands that
open no store (`gwsync --version`, `--help`) import them without SQLAlchemy.
"""

from __future__ import annotations

from dataclasses import dataclass

IMPORTED, HELD, FAILED, QUARANTINED = "imported", "held", "failed", "quarantined"
# Left out in `gwsync review`: stays in its folder (or on its calendar), out of the CRM, until a
# review takes it in.
LEFT_OUT = "left-out"


@dataclass
class MailRecord:
    account: str
    folder: str
    uidvalidity: int
    uid: int
    outcome: str
    key: str | None = None
    activity_id: int | None = None
    attempts: int = 0
    error: str | None = None
    missing: list[str] | None = None
    sender: str | None = None
    subject: str | None = None
    updated_at: str | None = None


@dataclass
class CalendarLink:
    """An activity linked to a groupware item, with the fields both had at the last sync."""

    account: str
    area: str
    activity_id: int
    uid: str
    href: str
    etag: str | None
    base: dict | None
    identity: str | None = None  # the activity's identity when linked; None: saved before it was recorded
    organizer: str | None = None  # the item's ORGANIZER address at the last sync (its deletion may cancel)


@dataclass
class CalendarItemRecord:
    """A new calendar item kept out of the CRM: left out in a review, or held for a mandatory field."""

    account: str
    area: str
    href: str
    outcome: str  # LEFT_OUT or HELD
    uid: str | None = None
    subject: str | None = None
    missing: list[str] | None = None  # HELD: the mandatory fields it lacks
    addresses: list[str] | None = None  # HELD: its attendees' and organizer's addresses (to assign)
    updated_at: str | None = None


@dataclass(frozen=True)
class AccountRecord:
    """An account kept in the database (`gwsync accounts`): the config's [defaults] make it a
    full account (Config.account_from_record)."""

    name: str
    username: str
    email: str | None = None
    areas: tuple[str, ...] = ("mail",)
    added_at: str | None = None  # when it was first added; not part of what an import compares

    def same(self, other: AccountRecord) -> bool:
        return (self.username, self.email, self.areas) == (other.username, other.email, other.areas)


# ("save", CalendarLink) or ("drop", (account, area, activity_id[, href])): see apply_link_changes.
LinkChange = tuple[str, CalendarLink | tuple]

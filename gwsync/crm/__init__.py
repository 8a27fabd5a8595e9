"""The CRM backend interface: what the sync engine needs from a CRM, as plain data.

The embedded SQLite store (`gwsync.crm.embedded.EmbeddedCRM`) implements it; a host CRM can plug in
its own class with the same methods (see the README, "Use it as a library"). The engine
never reaches into a backend's tables. `gwsync.testing.crm_contract.CRMBackendContract` holds
the pytest tests every backend must pass: each promise below is one of them.

Addresses are compared case-insensitively (as `str.lower` does, non-ASCII letters included),
with surrounding white space ignored. Timestamps are ISO 8601 in UTC with the offset written
(`2026-05-01T10:00:00.123456+00:00`, fractions optional), so that they compare as text.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace

# The kinds the mail import writes: mail received, and mail sent from the account's own address.
MAIL_KINDS = ("MAILEIN", "MAILAUS")


@dataclass
class Document:
    filename: str
    content_type: str
    size: int
    sha256: str
    category: str | None = None
    keyword: str | None = None


@dataclass
class Attendee:
    """A meeting's attendee (or organizer) as the calendar item names them, resolved like a
    mail's sender: an employee (an account name), else a contact and its partner."""

    email: str  # lower case
    name: str | None = None
    contact_id: int | None = None
    partner_id: int | None = None
    employee: str | None = None  # the account whose address this is
    organizer: bool = False


def attendees_from(values: Iterable) -> list[Attendee]:
    """Attendees from Attendee objects or from dicts with its fields (as `--json` writes them)."""
    return [v if isinstance(v, Attendee) else Attendee(**v) for v in values]


def attendee_addresses(attendees: Iterable[Attendee]) -> str | None:
    """The attendees as the calendar sync merges them: the addresses of all but the organizer,
    sorted, comma-separated; None when there are none (as in a link saved before attendees were
    synced, so that such a link sees no change)."""
    return ",".join(sorted({a.email for a in attendees if not a.organizer})) or None


# The team fields (README, "A team on one CRM"): who takes part, who it is delegated to, and the
# seed's free references. Not calendar fields: the calendar sync derives them, never merges them.
TEAM_FIELDS = ("participants", "delegated_to", "request", "project", "attendees", "private")


@dataclass
class ActivityDraft:
    """An activity to create. `key` makes the write idempotent: the same key, the same activity."""

    key: str
    kind: str
    status: str
    subject: str
    body: str = ""
    location: str | None = None
    contact_id: int | None = None
    partner_id: int | None = None
    sender: str | None = None
    unassigned: bool = False
    message_id: str | None = None
    start: str | None = None
    end: str | None = None
    due: str | None = None
    source: str | None = None  # the mail import's folder, e.g. "alice:INBOX/CRM Erledigt [E]"
    owner: str | None = None  # the account (employee) the activity belongs to
    rrule: str | None = None  # recurrence rule of a recurring appointment (RFC 5545 RRULE value)
    documents: list[Document] = field(default_factory=list)
    body_html: str | None = None  # a mail's HTML body as sent; whoever shows it must sanitise it
    sender_name: str | None = None  # a mail's From display name, decoded
    recipients_to: list[str] = field(default_factory=list)  # a mail's To addresses (lower case, in order)
    recipients_cc: list[str] = field(default_factory=list)  # its Cc addresses
    participants: list[str] = field(default_factory=list)  # employees (account names), the owner included
    delegated_to: str | None = None  # an employee ("Delegiert an")
    request: str | None = None  # free reference ("Hauptanfrage")
    project: str | None = None  # free reference ("Hauptprojekt")
    attendees: list[Attendee] = field(default_factory=list)
    private: bool = False  # from a CLASS:PRIVATE or CONFIDENTIAL item: details for its owner only


@dataclass
class Activity:
    id: int
    kind: str
    status: str
    subject: str
    body: str
    location: str | None
    contact_id: int | None
    partner_id: int | None
    sender: str | None
    unassigned: bool
    message_id: str | None
    start: str | None
    end: str | None
    due: str | None
    link: str
    # When the mail import created it: set for a draft of a kind in MAIL_KINDS with a source, else None.
    imported_at: str | None
    source: str | None
    documents: list[Document] = field(default_factory=list)
    owner: str | None = None
    rrule: str | None = None
    # Set by every update_activity; the `newest` conflict policy compares it as text with the
    # calendar item's LAST-MODIFIED, so the backend's clock must be right.
    updated_at: str | None = None
    key: str | None = None
    body_html: str | None = None
    # Never given to another activity, not even by a store restored from an older backup (ids
    # can be: a restore rewinds the id counter). None when the backend has none.
    uuid: str | None = None
    sender_name: str | None = None
    recipients_to: list[str] = field(default_factory=list)
    recipients_cc: list[str] = field(default_factory=list)
    participants: list[str] = field(default_factory=list)
    delegated_to: str | None = None
    request: str | None = None
    project: str | None = None
    attendees: list[Attendee] = field(default_factory=list)
    private: bool = False  # from a CLASS:PRIVATE or CONFIDENTIAL item: details for its owner only

    @property
    def employees(self) -> list[str]:
        """Everyone on the team this activity concerns: owner, participants, delegate (in order, once)."""
        names = [self.owner, *self.participants, self.delegated_to]
        return list(dict.fromkeys(n for n in names if n))

    @property
    def correspondent(self) -> str | None:
        """The address a mail was resolved by, and is assigned by (`gwsync assign`): the sender,
        or for outgoing mail (MAILAUS) the first recipient, To then Cc."""
        if self.kind == MAIL_KINDS[1]:
            return next(iter(self.recipients_to + self.recipients_cc), None)
        return self.sender

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def identity(self) -> str | None:
        """What tells this activity from any other that held its id before: the uuid, else the key."""
        return self.uuid or self.key

    def calendar_fields(self) -> dict:
        """The fields the calendar sync maps (see gwsync.calendar.icalmap.FIELDS)."""
        return {"kind": self.kind, "status": self.status, "subject": self.subject or "", "body": self.body or "",
                "location": self.location or None, "start": self.start, "end": self.end, "due": self.due,
                "rrule": self.rrule, "attendees": attendee_addresses(self.attendees)}


@dataclass
class Contact:
    id: int
    name: str
    partner_id: int | None
    emails: list[str] = field(default_factory=list)


@dataclass
class Partner:
    id: int
    name: str
    emails: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ActivityFilter:
    imported: bool = False  # only activities that came from mail import
    unassigned: bool = False
    imported_since: str | None = None  # imported_at >= this (ISO 8601 UTC), for "imported today"
    kind: str | None = None
    kinds: tuple[str, ...] | None = None  # any of these (an empty tuple matches nothing)
    owners: tuple[str | None, ...] | None = None  # None inside: activities without an owner
    involving: str | None = None  # owned by, delegated to, or with this employee as a participant
    partner_id: int | None = None
    contact_id: int | None = None
    newest_first: bool = False  # by id; the default is oldest first
    limit: int | None = None  # at most this many, after skipping `offset`
    offset: int = 0


class CRMBackend(abc.ABC):
    """What gwsync needs from a CRM. Every write is idempotent. A lookup of an id that does not
    exist returns None; a write to one raises LookupError.

    Identities: an activity id must never be given to another activity (AUTOINCREMENT or the
    like); give activities a `uuid` too, which survives even a restore from an older backup.
    """

    def store_id(self) -> str | None:
        """The identity of this store: a UUID kept in the CRM's own database, so that a restored
        backup keeps it and a new or different store has another one. Items gwsync writes carry
        it; an item with another store's identity is never matched to an activity by its id.
        The default, None, means unknown: gwsync then matches items by their link and their UID
        only, never by the activity id written in them."""
        return None

    @abc.abstractmethod
    def statuses(self) -> dict[str, str]:
        """Status keys the CRM knows, with their labels."""

    @abc.abstractmethod
    def find_contact_by_email(self, address: str) -> Contact | None:
        """The contact with this address among its communication entries (compared as the
        module doc says), or None."""

    @abc.abstractmethod
    def find_partner_by_domain(self, domain: str) -> Partner | None:
        """The business partner whose addresses use this domain (case-insensitive), if exactly
        one does; None when none or several do."""

    @abc.abstractmethod
    def existing_keys(self, keys: Iterable[str]) -> dict[str, int]:
        """Map of the given idempotency keys that already have an activity -> its id."""

    @abc.abstractmethod
    def create_activities(self, drafts: list[ActivityDraft]) -> list[int]:
        """Create the activities (with their documents) in one transaction; return their ids
        in order. A draft whose key exists already (in the store or earlier in the same list)
        returns the existing id and changes nothing. Whatever error stops the call leaves none of
        them created."""

    def create_activities_marked(self, drafts: list[ActivityDraft]) -> list[tuple[int, bool]]:
        """As create_activities, each id paired with True if this call created it (False: the key
        existed, or an earlier draft of the list had it). The import counts only those as its
        own. This default asks existing_keys first, which misses a key another process writes in
        between; a backend that can tell inside its transaction should override it."""
        seen = set(self.existing_keys(d.key for d in drafts))
        marked = []
        for draft, activity_id in zip(drafts, self.create_activities(drafts), strict=True):
            marked.append((activity_id, draft.key not in seen))
            seen.add(draft.key)
        return marked

    @abc.abstractmethod
    def update_activity(self, activity_id: int, changes: dict) -> None:
        """Set these fields (names as in Activity); also sets updated_at. Editable are at least
        kind, status, subject, body, location, start, end, due, rrule, contact_id, partner_id,
        owner, unassigned, participants, delegated_to, request, project, attendees and private (a list of
        Attendee or of dicts with Attendee's fields); any other name raises ValueError and changes
        nothing. No such activity: LookupError."""

    @abc.abstractmethod
    def add_participant(self, activity_id: int, name: str) -> bool:
        """Add this employee to the activity's participants, atomically (two accounts' syncs
        may add themselves at once, and neither may lose the other). True if it was added;
        False if already there. No such activity: LookupError. Does not change updated_at."""

    @abc.abstractmethod
    def remove_participant(self, activity_id: int, name: str) -> bool:
        """Remove this employee from the participants, atomically; True if it was there.
        No such activity: LookupError. Does not change updated_at."""

    @abc.abstractmethod
    def delete_activity(self, activity_id: int) -> None:
        """Delete the activity; deleting one that is gone already is not an error."""

    @abc.abstractmethod
    def put_document(self, chunks: Iterator[bytes]) -> tuple[str, int]:
        """Store document content; return (sha256 as lower-case hex, size in bytes). Storing the
        same content twice is a no-op."""

    @abc.abstractmethod
    def get_activity(self, activity_id: int) -> Activity | None: ...

    @abc.abstractmethod
    def list_activities(self, flt: ActivityFilter) -> list[Activity]:
        """The activities matching every field of the filter that is set, with their documents,
        ordered by id (newest first if asked)."""

    def count_activities(self, flt: ActivityFilter) -> int:
        """How many activities match (limit and offset ignored); override with a cheaper query."""
        return len(self.list_activities(replace(flt, limit=None, offset=0)))

    @abc.abstractmethod
    def add_contact(self, name: str, email: str, partner_id: int | None = None) -> Contact:
        """A new contact with this default address; an unknown partner raises LookupError."""

    @abc.abstractmethod
    def add_partner(self, name: str, emails: list[str]) -> Partner: ...

    @abc.abstractmethod
    def get_contact(self, contact_id: int) -> Contact | None: ...

    @abc.abstractmethod
    def list_partners(self) -> list[Partner]: ...

    def get_partner(self, partner_id: int) -> Partner | None:
        """One partner; override with a direct lookup."""
        return next((p for p in self.list_partners() if p.id == partner_id), None)

    @abc.abstractmethod
    def list_contacts(self) -> list[Contact]: ...

    @abc.abstractmethod
    def add_contact_email(self, contact_id: int, email: str) -> Contact:
        """Add a mail address to a contact's communication entries (idempotent, the address
        compared as the module doc says); an unknown contact raises LookupError."""

    @abc.abstractmethod
    def unassigned_senders(self) -> dict[str, int]:
        """Address (lower case) -> number of activities marked unassigned whose correspondent it
        is (Activity.correspondent: the sender; for outgoing mail, MAILAUS, the first recipient)."""

    @abc.abstractmethod
    def link_activities_from(self, address: str, contact_id: int, partner_id: int | None) -> int:
        """Give every activity whose correspondent is this address (as unassigned_senders counts)
        and that has no contact this contact (and the partner, where it has none) and clear its
        unassigned mark; returns how many changed."""

    def close(self) -> None:  # noqa: B027 - optional: a backend with nothing to release leaves it out
        """Release resources; the default does nothing."""

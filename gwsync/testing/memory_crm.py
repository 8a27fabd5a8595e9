"""MemoryCRM: a CRMBackend in plain dicts, for tests that need a CRM but not its storage.

It passes `CRMBackendContract` (tests/test_crm_contract.py), which shows the contract asks
nothing SQLite-specific. Every read returns a copy, so a caller cannot change the store by
changing what it got; every write builds its result first and stores it last, so an error
leaves the store as it was (the "one transaction" of create_activities).
"""

from __future__ import annotations

import copy
import hashlib
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import replace
from datetime import UTC, datetime

from gwsync.crm import (
    MAIL_KINDS,
    TEAM_FIELDS,
    Activity,
    ActivityDraft,
    ActivityFilter,
    Contact,
    CRMBackend,
    Partner,
    attendees_from,
)

EDITABLE = ("kind", "status", "subject", "body", "location", "start", "end", "due", "rrule", "contact_id",
            "partner_id", "owner", "unassigned", *TEAM_FIELDS)
MAIL_KIND = "MAILEIN"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _address(text: str) -> str:
    return text.strip().lower()


class MemoryCRM(CRMBackend):
    def __init__(self, statuses: dict[str, str] | None = None, link: str = "memory:activities/{id}"):
        self._statuses = dict(statuses or {"O": "Offen", "E": "Erledigt"})
        self.link = link
        self.activities: dict[int, Activity] = {}
        self.contacts: dict[int, Contact] = {}
        self.partners: dict[int, Partner] = {}
        self.blobs: dict[str, bytes] = {}
        self._last_id = 0  # activity ids only ever grow
        self._store_id = str(uuid.uuid4())

    def store_id(self) -> str:
        return self._store_id

    def statuses(self) -> dict[str, str]:
        return dict(self._statuses)

    # -- contacts and partners -----------------------------------------------------------------

    def find_contact_by_email(self, address: str) -> Contact | None:
        address = _address(address)
        return next((copy.deepcopy(c) for c in self.contacts.values() if address in c.emails), None)

    def find_partner_by_domain(self, domain: str) -> Partner | None:
        domain = _address(domain)
        found = [p for p in self.partners.values() if any(e.rsplit("@", 1)[-1] == domain for e in p.emails)]
        return copy.deepcopy(found[0]) if len(found) == 1 else None

    def add_contact(self, name: str, email: str, partner_id: int | None = None) -> Contact:
        if partner_id is not None and partner_id not in self.partners:
            raise LookupError(f"no partner with id {partner_id}")
        contact = Contact(id=len(self.contacts) + 1, name=name, partner_id=partner_id, emails=[_address(email)])
        self.contacts[contact.id] = contact
        return copy.deepcopy(contact)

    def add_partner(self, name: str, emails: list[str]) -> Partner:
        partner = Partner(id=len(self.partners) + 1, name=name, emails=[_address(e) for e in emails])
        self.partners[partner.id] = partner
        return copy.deepcopy(partner)

    def get_contact(self, contact_id: int) -> Contact | None:
        return copy.deepcopy(self.contacts.get(contact_id))

    def get_partner(self, partner_id: int) -> Partner | None:
        return copy.deepcopy(self.partners.get(partner_id))

    def list_contacts(self) -> list[Contact]:
        return copy.deepcopy(sorted(self.contacts.values(), key=lambda c: (c.name, c.id)))

    def list_partners(self) -> list[Partner]:
        return copy.deepcopy(sorted(self.partners.values(), key=lambda p: (p.name, p.id)))

    def add_contact_email(self, contact_id: int, email: str) -> Contact:
        if contact_id not in self.contacts:
            raise LookupError(f"no contact with id {contact_id}")
        contact = self.contacts[contact_id]
        if _address(email) not in contact.emails:
            contact.emails.append(_address(email))
        return copy.deepcopy(contact)

    # -- activities ----------------------------------------------------------------------------

    def existing_keys(self, keys: Iterable[str]) -> dict[str, int]:
        by_key = {a.key: a.id for a in self.activities.values()}
        return {k: by_key[k] for k in keys if k in by_key}

    def create_activities(self, drafts: list[ActivityDraft]) -> list[int]:
        by_key = {a.key: a.id for a in self.activities.values()}
        new: dict[int, Activity] = {}
        ids = []
        last = self._last_id
        for draft in drafts:
            if draft.key not in by_key:
                last += 1
                new[last] = self._activity(last, draft)
                by_key[draft.key] = last
            ids.append(by_key[draft.key])
        self.activities.update(new)  # only now: an error above leaves the store unchanged
        self._last_id = last
        return ids

    def _activity(self, activity_id: int, draft: ActivityDraft) -> Activity:
        now = _now()
        return Activity(
            id=activity_id, kind=draft.kind, status=draft.status, subject=draft.subject, body=draft.body,
            location=draft.location, contact_id=draft.contact_id, partner_id=draft.partner_id,
            sender=draft.sender, unassigned=draft.unassigned, message_id=draft.message_id, start=draft.start,
            end=draft.end, due=draft.due, link=self.link.format(id=activity_id),
            imported_at=now if draft.source and draft.kind in MAIL_KINDS else None, source=draft.source,
            documents=copy.deepcopy(list(draft.documents)), owner=draft.owner, rrule=draft.rrule,
            updated_at=now, key=draft.key, body_html=draft.body_html, uuid=str(uuid.uuid4()),
            sender_name=draft.sender_name, recipients_to=list(draft.recipients_to),
            recipients_cc=list(draft.recipients_cc), participants=list(dict.fromkeys(draft.participants)),
            delegated_to=draft.delegated_to, request=draft.request, project=draft.project,
            attendees=copy.deepcopy(draft.attendees), private=draft.private)

    def update_activity(self, activity_id: int, changes: dict) -> None:
        unknown = set(changes) - set(EDITABLE)
        if unknown:
            raise ValueError(f"cannot edit {', '.join(sorted(unknown))}")
        if activity_id not in self.activities:
            raise LookupError(f"no activity with id {activity_id}")
        changes = dict(changes)
        if "participants" in changes:
            changes["participants"] = list(dict.fromkeys(changes["participants"] or []))
        if "attendees" in changes:
            changes["attendees"] = copy.deepcopy(attendees_from(changes["attendees"] or []))
        self.activities[activity_id] = replace(self.activities[activity_id], **changes, updated_at=_now())

    def add_participant(self, activity_id: int, name: str) -> bool:
        activity = self._existing(activity_id)
        if name in activity.participants:
            return False
        activity.participants.append(name)
        return True

    def remove_participant(self, activity_id: int, name: str) -> bool:
        activity = self._existing(activity_id)
        if name not in activity.participants:
            return False
        activity.participants.remove(name)
        return True

    def _existing(self, activity_id: int) -> Activity:
        if activity_id not in self.activities:
            raise LookupError(f"no activity with id {activity_id}")
        return self.activities[activity_id]

    def delete_activity(self, activity_id: int) -> None:
        self.activities.pop(activity_id, None)

    def put_document(self, chunks: Iterator[bytes]) -> tuple[str, int]:
        content = b"".join(chunks)
        sha = hashlib.sha256(content).hexdigest()
        self.blobs.setdefault(sha, content)
        return sha, len(content)

    def get_activity(self, activity_id: int) -> Activity | None:
        return copy.deepcopy(self.activities.get(activity_id))

    def list_activities(self, flt: ActivityFilter) -> list[Activity]:
        found = sorted((a for a in self.activities.values() if _matches(a, flt)),
                       key=lambda a: a.id, reverse=flt.newest_first)
        end = None if flt.limit is None else flt.offset + flt.limit
        return copy.deepcopy(found[flt.offset:end])

    # -- unknown senders -----------------------------------------------------------------------

    def unassigned_senders(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for a in self.activities.values():
            if a.unassigned and a.correspondent:
                counts[_address(a.correspondent)] = counts.get(_address(a.correspondent), 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def link_activities_from(self, address: str, contact_id: int, partner_id: int | None) -> int:
        address = _address(address)
        changed = [a for a in self.activities.values()
                   if a.correspondent and _address(a.correspondent) == address and a.contact_id is None]
        for a in changed:
            self.activities[a.id] = replace(a, contact_id=contact_id, unassigned=False, updated_at=_now(),
                                            partner_id=a.partner_id if a.partner_id is not None else partner_id)
        return len(changed)


def _matches(a: Activity, flt: ActivityFilter) -> bool:
    return ((not flt.imported or a.imported_at is not None)
            and (not flt.unassigned or a.unassigned)
            and (not flt.imported_since or (a.imported_at is not None and a.imported_at >= flt.imported_since))
            and (not flt.kind or a.kind == flt.kind)
            and (flt.kinds is None or a.kind in flt.kinds)
            and (flt.owners is None or a.owner in flt.owners)
            and (flt.involving is None or flt.involving in (a.owner, a.delegated_to, *a.participants))
            and (flt.partner_id is None or a.partner_id == flt.partner_id)
            and (flt.contact_id is None or a.contact_id == flt.contact_id))

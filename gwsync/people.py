"""Who an address is: one rule for a mail's correspondents and a meeting's attendees (pure,
the CRM's lookups passed in).

1. an employee's address (an account's `[accounts.NAME] addresses`, default its IMAP username
   when that is an address) is that employee: never looked up as a contact;
2. any other address is resolved as the mail import resolves recipients
   (`gwsync.mail.decisions.resolve_recipients`): the first address with a contact gives the
   contact and its partner; else the first whose domain is a partner's gives the partner.

Each attendee is resolved on its own too (its contact, else the partner of its domain), so
that `activity show` can say who everyone is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

from .config import AccountConfig
from .crm import Attendee, Contact, Partner
from .mail.decisions import resolve_recipients, sender_domain


def employees_by_address(accounts: Iterable[AccountConfig]) -> dict[str, str]:
    """Address (lower case) -> the account (employee) it belongs to; the first account listing
    an address keeps it."""
    found: dict[str, str] = {}
    for account in accounts:
        for address in account.addresses:
            found.setdefault(address.strip().lower(), account.name)
    return found


def organizer_of(attendees: Iterable[Attendee], owner: AccountConfig | None) -> Attendee | None:
    """Who organizes a meeting gwsync writes: the organizer the activity knows, else its owner
    (by the owner's first address; None when the owner has none)."""
    known = next((a for a in attendees if a.organizer), None)
    if known is None and owner is not None and owner.addresses:
        return Attendee(owner.addresses[0], employee=owner.name, organizer=True)
    return known


def attendee_list(emails: Iterable[str], current: Iterable[Attendee], organizer: Attendee | None) -> list[Attendee]:
    """The attendees for these addresses, as `activity add/edit --attendee` sets them: the
    organizer first, then each address once (an entry the activity has keeps its name). No
    addresses: no attendees, no organizer."""
    known = {a.email: a for a in current if not a.organizer}
    listed = [replace(known.get(e) or Attendee(e), organizer=False)
              for e in dict.fromkeys(e.strip().lower() for e in emails) if organizer is None or e != organizer.email]
    return ([organizer] if organizer is not None else []) + listed if listed else []


def in_rule_order(attendees: Iterable[Attendee]) -> list[Attendee]:
    """A meeting's people in the order in which the external ones give it its contact and
    partner: the attendees in their order, then the organizer (resolve_attendees and the
    mandatory-field check of gwsync.calendar.mandatory both count them so). An address that
    both organizes and attends is one entry (gwsync.calendar.icalmap reads it so), the organizer."""
    return sorted(attendees, key=lambda a: a.organizer)


@dataclass(frozen=True)
class People:
    """Attendees resolved, and what they give the activity."""

    attendees: list[Attendee] = field(default_factory=list)
    contact_id: int | None = None
    partner_id: int | None = None
    employees: list[str] = field(default_factory=list)  # in the attendees' order, each once


def resolve_attendees(attendees: Iterable[Attendee], employees: Mapping[str, str],
                      find_contact: Callable[[str], Contact | None],
                      find_partner: Callable[[str], Partner | None]) -> People:
    """Resolve each attendee (the organizer included) and the activity's contact and partner
    from the external ones, by the rule of the module doc, in_rule_order. A
    contact's name names an attendee that has none."""
    contacts: dict[str, Contact | None] = {}
    partners: dict[str, Partner | None] = {}

    def contact_of(address: str) -> Contact | None:
        if address not in contacts:
            contacts[address] = find_contact(address)
        return contacts[address]

    def partner_of(domain: str) -> Partner | None:
        if domain not in partners:
            partners[domain] = find_partner(domain)
        return partners[domain]

    resolved = []
    for attendee in attendees:
        email = attendee.email.strip().lower()
        employee = employees.get(email)
        contact = contact_of(email) if employee is None else None
        domain = sender_domain(email)
        partner = partner_of(domain) if employee is None and contact is None and domain else None
        resolved.append(replace(
            attendee, email=email, employee=employee, contact_id=contact.id if contact else None,
            partner_id=contact.partner_id if contact else (partner.id if partner else None),
            name=attendee.name or (contact.name if contact else None)))
    external = [a.email for a in in_rule_order(resolved) if a.employee is None]
    match = resolve_recipients(external, contact_of, partner_of)
    names = list(dict.fromkeys(a.employee for a in resolved if a.employee))
    return People(resolved, match.contact_id, match.partner_id, names)


__all__ = ["People", "attendee_list", "employees_by_address", "in_rule_order", "organizer_of", "resolve_attendees"]

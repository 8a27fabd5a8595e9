"""Mandatory fields (`[crm] mandatory`) on new calendar items, as on mail (pure, no I/O).

A new item on a calendar becomes an activity only when it has every mandatory field; until then
it is held: not imported, nothing written into it, listed by `gwsync held` and the review, and
read again at every sync, so that it is imported as soon as the field can be filled. Filled means:
- subject: its SUMMARY is not empty; body: its DESCRIPTION (gwsync's link line aside) is not empty;
- contact: an attendee or the organizer who is not an employee (not one of the accounts'
  addresses) has an address that belongs to a contact; the first such (attendees in their
  order, then the organizer; one who organizes and attends counts as the organizer, as on
  import: gwsync.people.in_rule_order) gives the activity its contact and that contact's partner;
- partner: that contact's partner, else the first such address whose domain is a partner's.
So a held meeting is released by giving an attendee's address to a contact (`gwsync assign`,
`gwsync contact add`), or by filling in SUMMARY or DESCRIPTION on the device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ..crm import Attendee
from ..mail.decisions import SenderMatch, missing_fields, resolve_recipients
from ..people import in_rule_order


def item_addresses(people: Iterable[Attendee]) -> list[str]:
    """The addresses of an item's people as read (ItemData.people: lower case, each once), in
    the order the import resolves them too (gwsync.people.in_rule_order): the attendees, then
    the organizer."""
    return [person.email for person in in_rule_order(people)]


def check_item(mandatory: tuple[str, ...], fields: dict, addresses: Iterable[str], employees: set[str],
               find_contact: Callable, find_partner: Callable) -> tuple[SenderMatch, list[str]]:
    """(the contact and partner its attendees give, the mandatory fields it lacks)."""
    external = [a for a in addresses if a not in employees]
    match = resolve_recipients(external, find_contact, find_partner) if {"contact", "partner"} & set(mandatory) \
        else SenderMatch(None, None)
    return match, missing_fields(mandatory, partner_id=match.partner_id, contact_id=match.contact_id,
                                 subject=fields.get("subject") or "", body=fields.get("body") or "")

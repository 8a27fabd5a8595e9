"""Mandatory fields (`[crm] mandatory`) on new calendar items, as on mail (pure, no I/O).

A new item on a calendar becomes an activity only when it has every mandatory field; until then
it is held: not imported, nothing written into it, listed by `gwsync held` and the review, and
read again at every sync, so that it is imported as soon as the field can be filled. Filled means:
- subject: its SUMMARY is not empty; body: its DESCRIPTION (gwsync's link line aside) is not empty;
- contact: an attendee or the organizer who is not an employee (not one of the accounts'
  addresses) has an address that belongs to a contact; the first such (attendees in their
  order, then the organizer) gives the activity its contact and that contact's partner;
- partner: that contact's partner, else the first such address whose domain is a partner's.
So a held meeting is released by giving an attendee's address to a contact (`gwsync assign`,
`gwsync contact add`), or by filling in SUMMARY or DESCRIPTION on the device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ..mail.decisions import SenderMatch, missing_fields, resolve_recipients


def item_addresses(text: str) -> list[str]:
    """The mail addresses of an item's attendees, then its organizer: lower case, each once."""
    import icalendar

    try:
        cal = icalendar.Calendar.from_ical(text)
    except Exception:  # an unreadable item has no addresses; reading it fails elsewhere, with a reason
        return []
    comp = next((c for c in cal.subcomponents if c.name in ("VEVENT", "VTODO") and "RECURRENCE-ID" not in c),
                next((c for c in cal.subcomponents if c.name in ("VEVENT", "VTODO")), None))
    if comp is None:
        return []
    attendees = comp.get("ATTENDEE", [])
    values = list(attendees) if isinstance(attendees, list) else [attendees]
    if comp.get("ORGANIZER") is not None:
        values.append(comp.get("ORGANIZER"))
    found = []
    for value in values:
        text_value = str(value).strip()
        if text_value[:7].lower() == "mailto:":
            text_value = text_value[7:]
        if "@" in text_value:
            found.append(text_value.strip().lower())
    return list(dict.fromkeys(found))


def check_item(mandatory: tuple[str, ...], fields: dict, addresses: Iterable[str], employees: set[str],
               find_contact: Callable, find_partner: Callable) -> tuple[SenderMatch, list[str]]:
    """(the contact and partner its attendees give, the mandatory fields it lacks)."""
    external = [a for a in addresses if a not in employees]
    match = resolve_recipients(external, find_contact, find_partner) if {"contact", "partner"} & set(mandatory) \
        else SenderMatch(None, None)
    return match, missing_fields(mandatory, partner_id=match.partner_id, contact_id=match.contact_id,
                                 subject=fields.get("subject") or "", body=fields.get("body") or "")

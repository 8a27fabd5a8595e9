"""Mapping between CRM activities and iCalendar items (pure: text in, text or data out).

Reading uses the icalendar library (imported on first use: a sync that reads no item, and
every command that reads none, never loads it). Writing an update edits the item's text at the level of
content lines: only the properties gwsync maps are replaced in the master component; every
other line (alarms, attendees, recurrence overrides, X- properties, other clients' data) is
kept byte-for-byte, folding included.

Times are strings in the CRM: `2026-11-26` (all-day), `2026-11-26T10:00:00` (floating),
`2026-11-26T09:00:00+00:00` (UTC) and `2026-11-26T10:00:00+01:00[Europe/Berlin]` (a time
zone, in the RFC 9557 form), so that a round trip keeps the zone.

gwsync's own properties (X-GWSYNC-KIND, -STATUS, -ACTIVITY-ID, -ACTIVITY-UUID) are honoured only
on an item this CRM store linked or wrote (X-GWSYNC-STORE): anyone can type them into an item.
A kind is never taken from an item of the other component (an event never becomes a task kind).

An event's STATUS:CANCELLED is part of the status mapping: read as `[crm] cancelled_status`,
written for it; another status removes STATUS:CANCELLED and leaves any other STATUS alone.

Attendees: ORGANIZER and ATTENDEE are read into `ItemData.people` (addresses lower case, CN as
name); the merged field "attendees" holds the addresses of all but the organizer, sorted
(`gwsync.crm.attendee_addresses`). Writing it rewrites the ATTENDEE lines: an attendee already
on the item keeps its line as it is (PARTSTAT, RSVP, ...), a new one gets CN and
PARTSTAT=NEEDS-ACTION, and an item without ORGANIZER gets the one given (the owner).
"""

from __future__ import annotations

import html
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ..crm import Attendee, attendee_addresses

if TYPE_CHECKING:
    import icalendar

FIELDS = ("kind", "status", "subject", "body", "location", "start", "end", "due", "rrule", "attendees")
EVENT, TODO = "VEVENT", "VTODO"
PRODID = "-//gwsync//gwsync//EN"
ACTIVITY_ID_PROP = "X-GWSYNC-ACTIVITY-ID"
ACTIVITY_UUID_PROP = "X-GWSYNC-ACTIVITY-UUID"
STORE_PROP = "X-GWSYNC-STORE"
KIND_PROP = "X-GWSYNC-KIND"
STATUS_PROP = "X-GWSYNC-STATUS"
PRIVATE_CLASSES = ("PRIVATE", "CONFIDENTIAL")
_LINK_LINE = re.compile(r"^CRM: \S+\s*$")


class BrokenItem(ValueError):
    """The server's item is not usable iCalendar (reported for that item only)."""


# -- times -----------------------------------------------------------------------------------

_ZONE_SUFFIX = re.compile(r"^(?P<base>[^\[]+)\[(?P<zone>[^\]]+)\]$")


def parse_time(text: str | None):
    """CRM time string -> date, naive datetime (floating) or aware datetime."""
    if not text:
        return None
    text = text.strip()
    match = _ZONE_SUFFIX.match(text)
    if match:
        base = datetime.fromisoformat(match["base"])
        try:
            zone = ZoneInfo(match["zone"])
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {match['zone']!r}") from exc
        return base.replace(tzinfo=None).replace(tzinfo=zone)
    if len(text) == 10:
        return date.fromisoformat(text)
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return value


def format_time(value) -> str | None:
    """date/datetime -> the CRM's time string (see the module doc)."""
    if value is None:
        return None
    if not isinstance(value, datetime):
        return value.isoformat()
    if value.tzinfo is None:
        return value.isoformat(timespec="seconds")
    key = getattr(value.tzinfo, "key", None)
    if key and key not in ("UTC", "Etc/UTC", "GMT", "Z"):
        return f"{value.isoformat(timespec='seconds')}[{key}]"
    return value.astimezone(UTC).isoformat(timespec="seconds")


def normalise_time(text: str | None) -> str | None:
    """The canonical form of a user's ISO 8601 input (raises ValueError when it is none)."""
    return format_time(_ical_ready(parse_time(text))) if text else None


def _ical_ready(value):
    """iCalendar has no fixed UTC offsets without a VTIMEZONE: turn them into UTC."""
    if isinstance(value, datetime) and value.tzinfo is not None and not getattr(value.tzinfo, "key", None):
        return value.astimezone(UTC)
    return value


# -- reading ---------------------------------------------------------------------------------

@dataclass
class ItemData:
    uid: str
    component: str  # VEVENT or VTODO
    fields: dict
    activity_id: int | None  # X-GWSYNC-ACTIVITY-ID, if this store linked it (None when not trusted)
    modified: str | None  # LAST-MODIFIED (or DTSTAMP) in UTC ISO, for the `newest` policy
    description: str = ""  # raw DESCRIPTION and X-ALT-DESC: to tell whether the link is current
    alt_description: str = ""
    store: str | None = None  # X-GWSYNC-STORE: the CRM store that wrote the item (as found, trusted or not)
    activity_uuid: str | None = None  # X-GWSYNC-ACTIVITY-UUID (None when not trusted)
    recorded_kind: str | None = None  # X-GWSYNC-KIND and X-GWSYNC-STATUS as found, trusted or not
    recorded_status: str | None = None
    private: bool = False  # CLASS:PRIVATE or CLASS:CONFIDENTIAL
    first: date | None = None  # the day it starts (a task: its due day), None when undated
    last: date | None = None  # the day its last occurrence ends; None: undated or open-ended
    people: list[Attendee] = field(default_factory=list)  # ORGANIZER (first) and ATTENDEEs, unresolved

    @property
    def organizer(self) -> str | None:
        """The ORGANIZER's address, if the item names one."""
        return next((p.email for p in self.people if p.organizer), None)

    def has_link(self, link: Link) -> bool:
        """True when the item already carries exactly this link (no write-back needed)."""
        lines = [line for line in self.description.replace("\r\n", "\n").split("\n") if _LINK_LINE.match(line)]
        expected_alt = alt_description(strip_link(self.description), link)
        # icalendar hands X- properties over still escaped: accept either form.
        return (lines == [f"CRM: {link.url}"] and self.description.rstrip().endswith(f"CRM: {link.url}")
                and self.activity_id == link.activity_id and self.store == link.store
                and self.activity_uuid == link.activity_uuid
                and expected_alt in (self.alt_description, _unescape_text(self.alt_description)))

    def stale_recorded(self, fields: dict) -> set[str]:
        """Fields whose X-GWSYNC property says something else than `fields` (written by another
        store, or a kind refused): to be rewritten with the link, so no later read takes them."""
        return {name for name, recorded in (("kind", self.recorded_kind), ("status", self.recorded_status))
                if recorded is not None and recorded != fields.get(name)}


def strip_link(description: str) -> str:
    """The description without gwsync's `CRM: <link>` lines."""
    lines = [line for line in description.replace("\r\n", "\n").split("\n") if not _LINK_LINE.match(line)]
    return "\n".join(lines).strip("\n").rstrip()


def _master(cal: icalendar.Calendar):
    for comp in cal.subcomponents:
        if comp.name in (EVENT, TODO) and "RECURRENCE-ID" not in comp:
            return comp
    for comp in cal.subcomponents:  # only overrides: take the first
        if comp.name in (EVENT, TODO):
            return comp
    return None


def _address(value) -> str | None:
    """The mail address of a CAL-ADDRESS (`mailto:` dropped, lower case); None for another URI."""
    text = str(value).strip()
    if text[:7].lower() == "mailto:":
        text = text[7:]
    text = text.strip().lower()
    return text if re.fullmatch(r"[^@\s]+@[^@\s]+", text) else None


def _people(comp) -> list[Attendee]:
    """The organizer (first, organizer=True) and the attendees, each address once."""
    found: dict[str, Attendee] = {}
    attendees = comp.get("ATTENDEE", [])
    entries = [(comp["ORGANIZER"], True)] if "ORGANIZER" in comp else []
    entries += [(a, False) for a in (attendees if isinstance(attendees, list) else [attendees])]
    for value, is_organizer in entries:
        email = _address(value)
        if email is None:
            continue
        name = str(getattr(value, "params", {}).get("CN", "")).strip() or None
        if email in found:
            found[email].name = found[email].name or name
        else:
            found[email] = Attendee(email=email, name=name, organizer=is_organizer)
    return list(found.values())


def read_item(text: str, done_status: str, open_status: str, trusted: bool = True, store: str | None = None,
              kinds: Mapping[str, str] | None = None, cancelled_status: str | None = None) -> ItemData:
    """Parse an item. gwsync's own properties count when `trusted` (an item this store linked)
    or when the item carries this `store`'s identity. `kinds` (kind -> "events" or "tasks", as
    in [crm.kinds]) refuses a kind of the other component's area. An event with
    STATUS:CANCELLED gets `cancelled_status`, when given."""
    import icalendar

    try:
        cal = icalendar.Calendar.from_ical(text)
        comp = _master(cal)
        if comp is None:
            raise BrokenItem("no VEVENT or VTODO in the item")
        uid = str(comp.get("UID", "")).strip()
        if not uid:
            raise BrokenItem("the item has no UID")
        is_todo = comp.name == TODO
        start = comp.decoded("DTSTART") if "DTSTART" in comp else None
        end = due = None
        if is_todo:
            due = comp.decoded("DUE") if "DUE" in comp else None
        elif "DTEND" in comp:
            end = comp.decoded("DTEND")
        elif "DURATION" in comp and start is not None:
            end = start + comp.decoded("DURATION")
        item_store = str(comp.get(STORE_PROP, "")).strip() or None
        own = trusted or (store is not None and item_store == store)
        recorded_kind = str(comp.get(KIND_PROP, "")).strip() or None
        recorded_status = str(comp.get(STATUS_PROP, "")).strip() or None
        kind = recorded_kind if own else None
        if kind and kinds and kinds.get(kind) == ("events" if is_todo else "tasks"):
            kind = None  # an event never takes a task kind, nor a task an event kind
        if not kind:
            kind = "AUFGABE" if is_todo else ("BESPRECHUNG" if "ATTENDEE" in comp else "TERMIN")
        recorded = recorded_status if own else None
        if is_todo and str(comp.get("STATUS", "")).upper() == "COMPLETED":
            status = done_status
        elif is_todo and recorded == done_status:
            status = open_status  # completed in the CRM, reopened on the device
        elif not is_todo and cancelled_status and str(comp.get("STATUS", "")).upper() == "CANCELLED":
            status = cancelled_status  # the organizer cancelled it
        elif not is_todo and recorded == cancelled_status and cancelled_status:
            status = open_status  # cancelled in the CRM, STATUS:CANCELLED taken out on the device
        else:
            status = recorded or open_status
        rrule = comp.get("RRULE")
        if isinstance(rrule, list):
            rrule = rrule[0]
        first, last = _span(start, end, due, rrule)
        private = str(comp.get("CLASS", "")).strip().upper() in PRIVATE_CLASSES
        people = _people(comp)
        fields = {
            "kind": kind,
            "status": status,
            "subject": str(comp.get("SUMMARY", "")),
            "body": strip_link(str(comp.get("DESCRIPTION", ""))),
            "location": str(comp.get("LOCATION")) if comp.get("LOCATION") else None,
            "start": format_time(start),
            "end": format_time(end),
            "due": format_time(due),
            "rrule": rrule.to_ical().decode() if rrule is not None else None,
            "attendees": attendee_addresses(people),
        }
        activity_id = comp.get(ACTIVITY_ID_PROP) if own else None
        activity_uuid = (str(comp.get(ACTIVITY_UUID_PROP, "")).strip() or None) if own else None
        modified = comp.decoded("LAST-MODIFIED") if "LAST-MODIFIED" in comp else (
            comp.decoded("DTSTAMP") if "DTSTAMP" in comp else None)
    except BrokenItem:
        raise
    except Exception as exc:
        raise BrokenItem(f"unreadable iCalendar: {type(exc).__name__}: {exc}") from exc
    return ItemData(
        uid=uid, component=comp.name, fields=fields,
        description=str(comp.get("DESCRIPTION", "")), alt_description=str(comp.get("X-ALT-DESC", "")),
        activity_id=int(str(activity_id)) if activity_id and str(activity_id).strip().isdigit() else None,
        modified=format_time(modified.astimezone(UTC)) if isinstance(modified, datetime)
        and modified.tzinfo else None,
        store=item_store, activity_uuid=activity_uuid, recorded_kind=recorded_kind, recorded_status=recorded_status,
        private=private, first=first, last=last, people=people,
    )


def _day(value) -> date | None:
    if value is None:
        return None
    return value.date() if isinstance(value, datetime) else value


def _day_of(value) -> date:
    day = _day(value)
    assert day is not None  # a value read from the item, not a missing one
    return day


def _span(start, end, due, rrule) -> tuple[date | None, date | None]:
    """(first day, last day) of an item: the last occurrence's end for a recurring one
    (UNTIL, or COUNT expanded); None as the last day when it never ends or has no date."""
    first, last = _day(start) or _day(due), _day(end) or _day(due) or _day(start)
    if rrule is None or first is None or last is None:
        return first, last
    length = last - first
    until = rrule.get("UNTIL")
    if until:
        return first, _day_of(until[0]) + length
    count = rrule.get("COUNT")
    if not count or start is None:
        return first, None  # open-ended: always counts
    from dateutil.rrule import rrulestr  # type: ignore[import-untyped]  # icalendar's own dependency

    dtstart = start if isinstance(start, datetime) else datetime.combine(start, datetime.min.time())
    occurrences = list(rrulestr(rrule.to_ical().decode(), dtstart=dtstart))
    return first, (_day_of(occurrences[-1]) if occurrences else first) + length


def in_window(data: ItemData, today: date, past_days: int, future_days: int) -> bool:
    """Does any of the item fall within [today - past_days, today + future_days]? Undated and
    open-ended items always do."""
    if data.last is not None and data.last < today - timedelta(days=past_days):
        return False
    return data.first is None or data.first <= today + timedelta(days=future_days)


BUSY_SUBJECT = "Privat"


def busy_fields(fields: dict) -> dict:
    """A private item as a busy block: its times only, subject "Privat"."""
    return {**fields, "subject": BUSY_SUBJECT, "body": "", "location": None, "attendees": None}


# -- writing ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Link:
    url: str
    activity_id: int
    store: str | None = None  # the CRM store's identity (X-GWSYNC-STORE)
    activity_uuid: str | None = None  # the activity's never-reused identity (X-GWSYNC-ACTIVITY-UUID)


def description_with_link(body: str, link: Link | None) -> str:
    body = strip_link(body or "")
    if link is None:
        return body
    return f"{body}\n\nCRM: {link.url}" if body else f"CRM: {link.url}"


def alt_description(body: str, link: Link) -> str:
    text = html.escape(strip_link(body or "")).replace("\n", "<br>")
    url = html.escape(link.url, quote=True)
    para = f"<p>{text}</p>" if text else ""
    return f'<html><body>{para}<p><a href="{url}">CRM</a></p></body></html>'


def link_is_current(text: str, link: Link) -> bool:
    """True when the item text already carries exactly this link."""
    try:
        return read_item(text, "", "").has_link(link)
    except BrokenItem:
        return False


def _props_for(fields: dict, changed: set[str], component: str, done_status: str,
               link: Link | None, include_link: bool,
               cancelled_status: str | None = None) -> tuple[dict[str, list], set[str]]:
    """Property name -> new values (empty list: remove), and the time zones they need."""
    props: dict[str, list] = {}
    zones: set[str] = set()

    def time_prop(name, value):
        parsed = _ical_ready(parse_time(value)) if value else None
        props[name] = [parsed] if parsed is not None else []
        key = getattr(getattr(parsed, "tzinfo", None), "key", None)
        if key and key not in ("UTC", "Etc/UTC"):
            zones.add(key)

    if "subject" in changed:
        props["SUMMARY"] = [fields.get("subject") or ""]
    if "body" in changed or include_link:
        props["DESCRIPTION"] = [description_with_link(fields.get("body") or "", link)]
        if link is not None:
            props["X-ALT-DESC"] = [("html", alt_description(fields.get("body") or "", link))]
    if include_link and link is not None:
        props[ACTIVITY_ID_PROP] = [str(link.activity_id)]
        # Replaced or removed: an identity another store wrote must not stay next to ours.
        props[STORE_PROP] = [link.store] if link.store else []
        props[ACTIVITY_UUID_PROP] = [link.activity_uuid] if link.activity_uuid else []
    if "location" in changed:
        props["LOCATION"] = [fields["location"]] if fields.get("location") else []
    if "start" in changed:
        time_prop("DTSTART", fields.get("start"))
    if "end" in changed and component == EVENT:
        time_prop("DTEND", fields.get("end"))
        props["DURATION"] = []
    if "due" in changed and component == TODO:
        time_prop("DUE", fields.get("due"))
    if "status" in changed:
        props[STATUS_PROP] = [fields["status"]] if fields.get("status") else []
        if component == TODO:
            done = fields.get("status") == done_status
            props["STATUS"] = ["COMPLETED" if done else "NEEDS-ACTION"]
            props["PERCENT-COMPLETE"] = [100] if done else []
            props["COMPLETED"] = [datetime.now(UTC).replace(microsecond=0)] if done else []
        elif cancelled_status:
            # [] removes STATUS:CANCELLED; update_item keeps any other STATUS the item has
            props["STATUS"] = ["CANCELLED"] if fields.get("status") == cancelled_status else []
    if "kind" in changed:
        props[KIND_PROP] = [fields["kind"]] if fields.get("kind") else []
    if "rrule" in changed:
        import icalendar

        props["RRULE"] = [icalendar.vRecur.from_ical(fields["rrule"])] if fields.get("rrule") else []
    return props, zones


_TEXT_PROPS = {"SUMMARY", "DESCRIPTION", "LOCATION", "X-ALT-DESC", ACTIVITY_ID_PROP, KIND_PROP, STATUS_PROP,
               STORE_PROP, ACTIVITY_UUID_PROP}


def _content_lines(component: str, props: dict[str, list]) -> dict[str, list[str]]:
    """Serialise properties; returns name -> physical lines (folded). Text properties are
    written directly (the write-back path runs once per item); the rest through icalendar."""
    import icalendar

    out: dict[str, list[str]] = {name: [] for name in props}
    comp = icalendar.Todo() if component == TODO else icalendar.Event()
    for name, values in props.items():
        for value in values:
            if name == "X-ALT-DESC":
                out[name] += _fold(f"X-ALT-DESC;FMTTYPE=text/html:{_escape_text(value[1])}")
            elif name in _TEXT_PROPS:
                out[name] += _fold(f"{name}:{_escape_text(str(value))}")
            else:
                comp.add(name, value)
    if len(comp):
        for entry in _logical_lines(comp.to_ical().decode("utf-8").split("\r\n"))[1:-1]:
            out.setdefault(entry.name, []).extend(entry.physical)
    return out


def _fold(line: str, limit: int = 75) -> list[str]:
    """RFC 5545 folding: at most 75 octets a line, never inside a UTF-8 sequence."""
    data = line.encode("utf-8")
    if len(data) <= limit:
        return [line]
    parts: list[str] = []
    start, width = 0, limit
    while start < len(data):
        end = min(start + width, len(data))
        while end < len(data) and (data[end] & 0xC0) == 0x80:  # back up to a character boundary
            end -= 1
        parts.append(("" if not parts else " ") + data[start:end].decode("utf-8"))
        start, width = end, limit - 1
    return parts


@dataclass
class _Entry:
    name: str
    physical: list[str]


def _logical_lines(physical: list[str]) -> list[_Entry]:
    entries: list[_Entry] = []
    for line in physical:
        if line[:1] in (" ", "\t") and entries:
            entries[-1].physical.append(line)
        elif line == "":
            continue
        else:
            name = re.split(r"[;:]", line, maxsplit=1)[0].strip().upper()
            entries.append(_Entry(name=name, physical=[line]))
    return entries


def _param(value: str) -> str:
    """An RFC 5545 parameter value, quoted when it has : ; , -- without control characters,
    DQUOTE and backslash (which readers take for an escape), ^ escaped as RFC 6868 says."""
    value = re.sub(r'[\x00-\x1f\x7f"\\]', "", value).replace("^", "^^")
    return f'"{value}"' if re.search(r"[:;,]", value) else value


def _person_line(prop: str, person: Attendee) -> list[str]:
    params = f";CN={_param(person.name)}" if person.name else ""
    if prop == "ATTENDEE":
        params += ";PARTSTAT=NEEDS-ACTION"
    return _fold(f"{prop}{params}:mailto:{person.email}")


def _wanted(fields: dict) -> list[str]:
    return [a for a in (fields.get("attendees") or "").split(",") if a]


def _new_people(wanted: list[str], people: list[Attendee], skip: set[str | None]) -> list[str]:
    """ATTENDEE lines for the wanted addresses not in `skip`, named as in `people`."""
    named = {p.email: p for p in people}
    return [line for email in wanted if email not in skip
            for line in _person_line("ATTENDEE", named.get(email) or Attendee(email))]


def _entry_address(entry: _Entry) -> str | None:
    """The address of an ORGANIZER or ATTENDEE content line (its value after the parameters)."""
    line = "".join(line[1:] if i else line for i, line in enumerate(entry.physical))
    quoted = False
    for i, char in enumerate(line):
        if char == '"':
            quoted = not quoted
        elif char == ":" and not quoted:
            return _address(line[i + 1:])
    return None


def _people_lines(entries: list[_Entry], own: set[int], fields: dict, people: list[Attendee],
                  organizer: Attendee | None) -> dict[str, list[str]]:
    """The master's new ATTENDEE (and, where missing, ORGANIZER) lines for the field "attendees".
    No attendees left: no ORGANIZER either (an organizer alone makes no meeting)."""
    wanted = _wanted(fields)
    if not wanted:
        return {"ATTENDEE": [], "ORGANIZER": []}
    mine = [entries[i] for i in sorted(own) if entries[i].name in ("ATTENDEE", "ORGANIZER")]
    organizers = {_entry_address(e) for e in mine if e.name == "ORGANIZER"}
    has_organizer = bool(organizers)
    if not has_organizer and organizer is not None:
        organizers.add(organizer.email)
    # Kept as they are: the wanted ones, the organizer's own, and those that are no mail address.
    keep: set[str | None] = {None, *wanted, *organizers}
    kept = [e for e in mine if e.name == "ATTENDEE" and _entry_address(e) in keep]
    lines = [line for e in kept for line in e.physical]
    lines += _new_people(wanted, people, {_entry_address(e) for e in kept})
    out = {"ATTENDEE": lines}
    if not has_organizer and organizer is not None:
        out["ORGANIZER"] = _person_line("ORGANIZER", organizer)
    return out


def new_item(uid: str, component: str, fields: dict, done_status: str, link: Link | None,
             alarm: bool = False, people: list[Attendee] | None = None, organizer: Attendee | None = None,
             cancelled_status: str | None = None) -> str:
    """A whole new VCALENDAR for an activity. With attendees (the field "attendees", named as in
    `people`) it gets their ATTENDEE lines and `organizer` as ORGANIZER."""
    lines = ["BEGIN:VCALENDAR", "VERSION:2.0", f"PRODID:{PRODID}", f"BEGIN:{component}"]
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    lines += [f"UID:{_escape_uid(uid)}", f"DTSTAMP:{stamp}"]
    changed = set(FIELDS)
    props, zones = _props_for(fields, changed, component, done_status, link, include_link=link is not None,
                              cancelled_status=cancelled_status)
    if component == TODO and fields.get("status") != done_status:
        props["STATUS"] = ["NEEDS-ACTION"]
        props["PERCENT-COMPLETE"], props["COMPLETED"] = [], []
    for physical in _content_lines(component, props).values():
        lines += physical
    if _wanted(fields):
        lines += _person_line("ORGANIZER", organizer) if organizer is not None else []
        lines += _new_people(_wanted(fields), people or [], set())
    if alarm:
        related = "END" if component == TODO and fields.get("due") else "START"
        lines += ["BEGIN:VALARM", "ACTION:DISPLAY", f"DESCRIPTION:{_escape_text(fields.get('subject') or 'Reminder')}",
                  f"TRIGGER;RELATED={related}:PT0S", "END:VALARM"]
    lines += [f"END:{component}", "END:VCALENDAR"]
    # The time zones go before the component, as text: never a marker a subject could spell.
    lines[3:3] = "".join(_vtimezone(z) for z in sorted(zones)).splitlines()
    return "\r\n".join(lines) + "\r\n"


def update_item(text: str, fields: dict, changed: set[str], done_status: str, link: Link | None,
                include_link: bool = False, people: list[Attendee] | None = None,
                organizer: Attendee | None = None,
                cancelled_status: str | None = None) -> str:
    """The item's text with the changed fields (and, if asked, the link) rewritten in place;
    attendees as the module doc says (`people` and `organizer` as for new_item)."""
    newline = "\r\n" if "\r\n" in text else "\n"
    physical = text.replace("\r\n", "\n").split("\n")
    entries = _logical_lines(physical)
    master = _master_range(entries)
    if master is None:
        raise BrokenItem("no VEVENT or VTODO in the item")
    begin, end, component = master
    props, zones = _props_for(fields, changed, component, done_status, link, include_link, cancelled_status)
    own = _own_level(entries, begin, end)
    if props.get("STATUS") == [] and component == EVENT and not any(
            entries[i].name == "STATUS" and entries[i].physical[0].split(":", 1)[-1].strip().upper() == "CANCELLED"
            for i in own):
        del props["STATUS"]  # not cancelled: an event's own STATUS (CONFIRMED, TENTATIVE) stays
    people_lines = _people_lines(entries, own, fields, people or [], organizer) if "attendees" in changed else {}
    if not props and not people_lines:
        return text
    rendered = _content_lines(component, props) | people_lines
    props = {**props, **{name: [] for name in people_lines}}  # the names whose lines are replaced
    # New properties go before the first nested component (VALARM): RFC 5545 puts a
    # component's properties ahead of its subcomponents.
    insert_at = next((i for i in range(begin + 1, end) if entries[i].name == "BEGIN"), end)
    result: list[_Entry] = []
    inserted: set[str] = set()
    for index, entry in enumerate(entries):
        if index in own and entry.name in props:
            if entry.name not in inserted:
                inserted.add(entry.name)
                result.append(_Entry(entry.name, rendered.get(entry.name, [])))
            continue
        if index == insert_at:
            for name in props:
                if name not in inserted:
                    result.append(_Entry(name, rendered.get(name, [])))
        result.append(entry)
    existing_zones = {_tzid(e) for e in entries if e.name == "TZID"}
    missing = [z for z in sorted(zones) if z not in existing_zones]
    lines = [line for entry in result for line in entry.physical]
    if missing:
        first_component = next(i for i, line in enumerate(lines) if line.upper().startswith("BEGIN:V")
                                and not line.upper().startswith("BEGIN:VCALENDAR"))
        block = "".join(_vtimezone(z) for z in missing).rstrip("\r\n").split("\r\n")
        lines[first_component:first_component] = block
    out = newline.join(lines)
    return out if out.endswith(newline) else out + newline


def _tzid(entry: _Entry) -> str:
    return "".join(line.lstrip() if i else line for i, line in enumerate(entry.physical)).split(":", 1)[-1].strip()


def _master_range(entries: list[_Entry]) -> tuple[int, int, str] | None:
    """Index of BEGIN and END of the master VEVENT/VTODO (the one without RECURRENCE-ID)."""
    candidates: list[tuple[int, int, str]] = []
    depth = 0
    start: int | None = None
    comp_name = ""
    for i, entry in enumerate(entries):
        line = entry.physical[0]
        upper = line.upper()
        if entry.name == "BEGIN":
            depth += 1
            value = upper.split(":", 1)[-1].strip()
            if depth == 2 and value in (EVENT, TODO):
                start, comp_name = i, value
        elif entry.name == "END":
            if depth == 2 and start is not None:
                candidates.append((start, i, comp_name))
                start = None
            depth -= 1
    for begin, end, name in candidates:
        if not any(entries[i].name == "RECURRENCE-ID" for i in _own_level(entries, begin, end)):
            return begin, end, name
    return candidates[0] if candidates else None


def _own_level(entries: list[_Entry], begin: int, end: int) -> set[int]:
    """Indexes of the component's own properties (not those of a nested VALARM)."""
    own, depth = set(), 0
    for i in range(begin + 1, end):
        name = entries[i].name
        if name == "BEGIN":
            depth += 1
        elif name == "END":
            depth -= 1
        elif depth == 0:
            own.add(i)
    return own


def _vtimezone(key: str) -> str:
    import icalendar

    try:
        tz = icalendar.Timezone.from_tzid(key)
    except Exception:
        return ""
    return tz.to_ical().decode("utf-8")


def _escape_text(text: str) -> str:
    return (text.replace("\\", "\\\\").replace(";", "\\;").replace(",", "\\,").replace("\r\n", "\n")
            .replace("\r", "\n").replace("\n", "\\n"))


def _unescape_text(text: str) -> str:
    return re.sub(r"\\([\\;,nN])", lambda m: "\n" if m.group(1) in "nN" else m.group(1), text)


def _escape_uid(uid: str) -> str:
    return re.sub(r"[\r\n]", "", uid)


def uid_for_key(key: str) -> str:
    """A stable UID for an activity created in the CRM: the same activity, the same UID,
    so that a create repeated after a crash meets its own earlier item (412), never a twin."""
    return f"gwsync-{uuid.uuid5(uuid.NAMESPACE_URL, 'gwsync:' + key)}"


__all__ = ["FIELDS", "busy_fields", "in_window",
           "BrokenItem", "ItemData", "Link", "read_item", "new_item", "update_item", "link_is_current",
           "parse_time", "format_time", "normalise_time", "strip_link", "uid_for_key"]

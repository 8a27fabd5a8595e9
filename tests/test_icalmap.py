"""The activity <-> iCalendar mapping (pure)."""

import re
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from gwsync.calendar.icalmap import (
    BrokenItem,
    Link,
    busy_fields,
    format_time,
    link_is_current,
    new_item,
    normalise_time,
    parse_time,
    read_item,
    strip_link,
    uid_for_key,
    update_item,
)
from gwsync.crm import Attendee, attendee_addresses

OTHER = (Path(__file__).resolve().parent.parent / "fixtures" / "ical" / "other-client-event.ics").read_text()
LINK = Link("https://crm.example.com/activities/7", 7)


def lines(text):
    return text.replace("\r\n", "\n").split("\n")


def unfolded(text):
    return lines(text.replace("\r\n", "\n").replace("\n ", "").replace("\n\t", ""))


def test_reading_an_item_from_another_client():
    item = read_item(OTHER, "E", "O")
    assert item.uid == "other-client-1@example.org" and item.component == "VEVENT"
    f = item.fields
    assert f["kind"] == "BESPRECHUNG"  # it has attendees
    assert f["subject"] == "Wöchentliches Review – Größenordnung 😀"
    assert f["body"] == "Agenda:\n1. Zahlen\n2. Nächste Schritte"
    assert f["location"] == "Raum Süd"
    assert f["start"] == "2026-12-03T10:00:00-05:00[America/New_York]"
    assert f["end"] == "2026-12-03T11:00:00-05:00[America/New_York]"
    assert f["rrule"] == "FREQ=WEEKLY;COUNT=10;BYDAY=TH" or f["rrule"].startswith("FREQ=WEEKLY")
    assert item.activity_id is None and item.modified == "2026-11-20T10:00:00+00:00"


def test_link_write_back_changes_only_gwsync_lines():
    item = read_item(OTHER, "E", "O")
    out = update_item(OTHER, item.fields, set(), "E", LINK, include_link=True)
    before, after = unfolded(OTHER), unfolded(out)
    removed = [l for l in before if l not in after]
    added = [l for l in after if l not in before]
    assert removed == ["DESCRIPTION:Agenda:\\n1. Zahlen\\n2. Nächste Schritte"]
    assert any(l.startswith("DESCRIPTION:Agenda:") and l.endswith("CRM: https://crm.example.com/activities/7")
               for l in added)
    assert "X-GWSYNC-ACTIVITY-ID:7" in added and any(l.startswith("X-ALT-DESC;FMTTYPE=text/html:") for l in added)
    assert read_item(out, "E", "O").fields == item.fields  # the link is not a change
    assert link_is_current(out, LINK) and not link_is_current(OTHER, LINK)
    # idempotent: writing it again changes nothing, and never appends a second CRM line
    again = update_item(out, item.fields, set(), "E", LINK, include_link=True)
    assert again == out
    assert sum(l.count("CRM: https://crm.example.com/activities/7") for l in unfolded(again)) == 1
    # new properties land before the VALARM (RFC 5545: properties before subcomponents)
    assert after.index("X-GWSYNC-ACTIVITY-ID:7") < after.index("BEGIN:VALARM")


def test_an_update_keeps_alarms_attendees_overrides_and_x_properties():
    item = read_item(OTHER, "E", "O")
    fields = item.fields | {"subject": "Neuer Titel", "location": None}
    out = update_item(OTHER, fields, {"subject", "location"}, "E", LINK)
    for keep in ("ATTENDEE;CN=Carol;PARTSTAT=NEEDS-ACTION:mailto:carol@example.net", "TRIGGER:-PT15M",
                 "X-OTHER-CLIENT-DATA:keep this value exactly\\, with escapes\\; and a very lo",
                 " ng folded continuation line that must survive", "SUMMARY:Review (verschoben)",
                 "RRULE:FREQ=WEEKLY;BYDAY=TH;COUNT=10", "CATEGORIES:Kunde,Review"):
        assert keep in lines(out)
    assert "LOCATION:Raum Süd" not in out and "SUMMARY:Neuer Titel" in lines(out)
    assert read_item(out, "E", "O").fields == fields


def test_new_items_round_trip_for_every_kind_and_time_form():
    cases = [
        ("VEVENT", {"kind": "TERMIN", "start": "2026-12-01", "end": "2026-12-02", "due": None}),
        ("VEVENT", {"kind": "BESPRECHUNG", "start": "2026-12-01T09:30:00+01:00[Europe/Berlin]",
                    "end": "2026-12-01T10:30:00+01:00[Europe/Berlin]", "due": None}),
        ("VEVENT", {"kind": "TERMIN", "start": "2026-12-01T09:30:00+00:00", "end": None, "due": None}),
        ("VEVENT", {"kind": "TERMIN", "start": "2026-12-01T09:30:00", "end": "2026-12-01T10:00:00", "due": None}),
        ("VTODO", {"kind": "AUFGABE", "start": None, "end": None, "due": "2026-12-05"}),
        ("VTODO", {"kind": "WIEDERVORLAGE", "start": None, "end": None, "due": "2026-12-05T08:00:00+00:00"}),
    ]
    for component, times in cases:
        fields = {"status": "O", "subject": "S, mit; Sonderzeichen\\", "body": "Zeile 1\nZeile 2",
                  "location": "Ort", "rrule": None, "attendees": None} | times
        text = new_item(uid_for_key("crm:abc"), component, fields, "E", LINK, alarm=component == "VTODO")
        item = read_item(text, "E", "O")
        assert item.fields == fields, (component, times)
        assert item.activity_id == 7 and link_is_current(text, LINK)


def test_todo_completion_maps_to_the_done_status_both_ways():
    fields = {"kind": "AUFGABE", "status": "O", "subject": "t", "body": "", "location": None, "start": None,
              "end": None, "due": None, "rrule": None}
    text = new_item("u1", "VTODO", fields, "E", None)
    done = update_item(text, fields | {"status": "E"}, {"status"}, "E", None)
    assert "STATUS:COMPLETED" in done and read_item(done, "E", "O").fields["status"] == "E"
    reopened = done.replace("STATUS:COMPLETED", "STATUS:NEEDS-ACTION")
    assert read_item(reopened, "E", "O").fields["status"] == "O"
    phone_done = text.replace("STATUS:NEEDS-ACTION", "STATUS:COMPLETED")
    assert read_item(phone_done, "E", "O").fields["status"] == "E"


def test_strip_link():
    assert strip_link("a\n\nCRM: https://x/1") == "a"
    assert strip_link("CRM: https://x/1") == ""
    assert strip_link("CRM: is a word here\nb") == "CRM: is a word here\nb"


@pytest.mark.parametrize("text", [
    "not ical at all", "BEGIN:VCALENDAR\nEND:VCALENDAR\n",
    "BEGIN:VCALENDAR\nBEGIN:VEVENT\nSUMMARY:no uid\nEND:VEVENT\nEND:VCALENDAR\n",
    "BEGIN:VCALENDAR\nBEGIN:VEVENT\nUID:x\nDTSTART:2026-99-99\nEND:VEVENT\nEND:VCALENDAR\n",
])
def test_broken_items_raise_broken_item(text):
    with pytest.raises(BrokenItem):
        read_item(text, "E", "O")


def test_time_forms():
    assert normalise_time("2026-11-26") == "2026-11-26"
    assert normalise_time("2026-11-26T10:00") == "2026-11-26T10:00:00"
    assert normalise_time("2026-11-26T10:00:00Z") == "2026-11-26T10:00:00+00:00"
    assert normalise_time("2026-11-26T10:00:00+01:00") == "2026-11-26T09:00:00+00:00"
    assert normalise_time("2026-11-26T10:00:00+01:00[Europe/Berlin]") == "2026-11-26T10:00:00+01:00[Europe/Berlin]"
    with pytest.raises(ValueError):
        normalise_time("next tuesday")
    with pytest.raises(ValueError):
        normalise_time("2026-11-26T10:00[Mars/Olympus]")


@given(st.datetimes(timezones=st.sampled_from([None, "Europe/Berlin", "UTC", "America/New_York"]).map(
    lambda z: None if z is None else __import__("zoneinfo").ZoneInfo(z)),
    min_value=__import__("datetime").datetime(1971, 1, 1), max_value=__import__("datetime").datetime(2037, 1, 1)))
def test_time_strings_round_trip(value):
    value = value.replace(microsecond=0, fold=0)
    text = format_time(value)
    assert format_time(parse_time(text)) == text


_text = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\r"), max_size=300)


@given(subject=_text, body=_text.map(lambda t: t.strip()).filter(lambda t: not any(
    l.startswith("CRM: ") for l in t.split("\n"))))
@example(subject="__TIMEZONES__", body="")  # once the writer's own marker for where time zones go
def test_any_text_round_trips_through_our_own_writer(subject, body):
    """Escaping and folding (at 75 octets, never inside a UTF-8 sequence) as icalendar reads them."""
    fields = {"kind": "TERMIN", "status": "O", "subject": subject, "body": body, "location": None,
              "start": "2026-12-01", "end": None, "due": None, "rrule": None}
    text = new_item("u", "VEVENT", fields, "E", LINK)
    assert all(len(line.encode()) <= 75 for line in text.split("\r\n"))
    item = read_item(text, "E", "O")
    assert item.fields["subject"] == subject.replace("\n", " ") or item.fields["subject"] == subject
    assert item.fields["body"] == body and item.has_link(LINK)


# -- identities and gwsync's own properties ---------------------------------------------------

STORE = "0b6f7c2e-8f43-4c57-9d55-7c1f0d3e9a10"
OWN = Link("https://crm.example.com/activities/7", 7, STORE, "5d0c3b7e-2a1f-4a8b-9c6d-1e2f3a4b5c6d")
KINDS = {"TERMIN": "events", "BESPRECHUNG": "events", "AUFGABE": "tasks", "WIEDERVORLAGE": "tasks"}


def _event(extra: str = "", component: str = "VEVENT") -> str:
    return (f"BEGIN:VCALENDAR\nVERSION:2.0\nPRODID:-//Phone//EN\nBEGIN:{component}\nUID:x\n"
            f"DTSTAMP:20261120T100000Z\nDTSTART:20261201T090000Z\nSUMMARY:S\n{extra}END:{component}\nEND:VCALENDAR\n")


def test_gwsync_properties_count_only_on_items_this_store_linked_or_wrote():
    claims = "X-GWSYNC-KIND:BESPRECHUNG\nX-GWSYNC-STATUS:E\nX-GWSYNC-ACTIVITY-ID:7\n"
    foreign = read_item(_event(claims), "E", "O", trusted=False, store=STORE, kinds=KINDS)
    assert (foreign.fields["kind"], foreign.fields["status"], foreign.activity_id) == ("TERMIN", "O", None)
    assert (foreign.recorded_kind, foreign.recorded_status) == ("BESPRECHUNG", "E")  # as found, to rewrite
    other_store = read_item(_event(claims + "X-GWSYNC-STORE:another-store\n"), "E", "O", trusted=False,
                            store=STORE, kinds=KINDS)
    assert other_store.fields["kind"] == "TERMIN" and other_store.store == "another-store"
    ours = read_item(_event(claims + f"X-GWSYNC-STORE:{STORE}\nX-GWSYNC-ACTIVITY-UUID:{OWN.activity_uuid}\n"),
                     "E", "O", trusted=False, store=STORE, kinds=KINDS)
    assert (ours.fields["kind"], ours.fields["status"], ours.activity_id) == ("BESPRECHUNG", "E", 7)
    assert ours.activity_uuid == OWN.activity_uuid
    linked = read_item(_event(claims), "E", "O", trusted=True, store=STORE, kinds=KINDS)
    assert (linked.fields["kind"], linked.activity_id) == ("BESPRECHUNG", 7)
    # a backend without a store identity trusts linked items only
    assert read_item(_event(claims), "E", "O", trusted=False, store=None).fields["kind"] == "TERMIN"


@pytest.mark.parametrize("component, recorded, expected", [
    ("VEVENT", "AUFGABE", "TERMIN"), ("VEVENT", "WIEDERVORLAGE", "TERMIN"), ("VTODO", "TERMIN", "AUFGABE"),
    ("VTODO", "BESPRECHUNG", "AUFGABE"), ("VTODO", "WIEDERVORLAGE", "WIEDERVORLAGE"),
    ("VEVENT", "BESPRECHUNG", "BESPRECHUNG"), ("VTODO", "MAILEIN", "MAILEIN"),  # pushed: no area of its own
])
def test_a_kind_of_the_other_components_area_is_refused_even_on_a_linked_item(component, recorded, expected):
    item = read_item(_event(f"X-GWSYNC-KIND:{recorded}\n", component), "E", "O", trusted=True, kinds=KINDS)
    assert item.fields["kind"] == expected


def test_the_link_carries_the_store_and_the_activity_uuid_and_replaces_another_stores():
    fields = read_item(OTHER, "E", "O").fields
    text = new_item("u", "VEVENT", fields, "E", OWN)
    assert f"X-GWSYNC-STORE:{STORE}" in lines(text) and f"X-GWSYNC-ACTIVITY-UUID:{OWN.activity_uuid}" in lines(text)
    assert read_item(text, "E", "O", trusted=False, store=STORE).has_link(OWN)
    assert not read_item(text, "E", "O").has_link(LINK)  # same id and URL, other identity: written again
    planted = _event("X-GWSYNC-STORE:another-store\nX-GWSYNC-ACTIVITY-UUID:someone-elses\nX-GWSYNC-ACTIVITY-ID:7\n")
    item = read_item(planted, "E", "O", trusted=False, store=STORE)
    assert not item.has_link(OWN)
    out = update_item(planted, item.fields, set(), "E", OWN, include_link=True)
    assert [l for l in lines(out) if l.startswith("X-GWSYNC-STORE") or l.startswith("X-GWSYNC-ACTIVITY-UUID")] == [
        f"X-GWSYNC-STORE:{STORE}", f"X-GWSYNC-ACTIVITY-UUID:{OWN.activity_uuid}"]
    assert read_item(out, "E", "O", trusted=False, store=STORE).has_link(OWN)
    # a backend without identities writes none, and removes ones planted by others
    bare = update_item(planted, item.fields, set(), "E", LINK, include_link=True)
    assert not any(l.startswith(("X-GWSYNC-STORE", "X-GWSYNC-ACTIVITY-UUID")) for l in lines(bare))


def test_stale_recorded_names_the_gwsync_properties_that_disagree():
    item = read_item(_event("X-GWSYNC-KIND:AUFGABE\nX-GWSYNC-STATUS:E\n"), "E", "O", trusted=False, kinds=KINDS)
    assert item.stale_recorded(item.fields) == {"kind", "status"}
    out = update_item(_event("X-GWSYNC-KIND:AUFGABE\nX-GWSYNC-STATUS:E\n"), item.fields, {"kind", "status"}, "E",
                      OWN, include_link=True)
    assert read_item(out, "E", "O", trusted=True, kinds=KINDS).fields == item.fields
    assert read_item(out, "E", "O").stale_recorded(item.fields) == set()
    assert read_item(_event(), "E", "O").stale_recorded(item.fields) == set()  # nothing recorded: nothing stale


# -- attendees ---------------------------------------------------------------------------------

MEETING = {"kind": "BESPRECHUNG", "status": "O", "subject": "Abstimmung", "body": "", "location": None,
           "start": "2026-12-01T09:00:00+00:00", "end": "2026-12-01T10:00:00+00:00", "due": None, "rrule": None}


def people_of(text):
    return [(p.email, p.name, p.organizer) for p in read_item(text, "E", "O").people]


def test_organizer_and_attendees_are_read_lower_case_without_mailto_with_their_names():
    item = read_item(OTHER, "E", "O")
    assert people_of(OTHER) == [("bob@example.org", "Bob", True), ("alice@example.com", "Alice", False),
                                ("carol@example.net", "Carol", False)]
    assert item.fields["attendees"] == "alice@example.com,carol@example.net"  # sorted, the organizer left out
    text = _event('ORGANIZER:MAILTO:Alice@Example.COM\nATTENDEE;CN="Mustermann, Erika";PARTSTAT=ACCEPTED:'
                  'mailto: Erika@Muster.DE\nATTENDEE;CN=Alice:mailto:alice@example.com\n'
                  'ATTENDEE:urn:uuid:room-42\nATTENDEE;CN=Bob:mailto:bob@example.com\n')
    assert people_of(text) == [("alice@example.com", "Alice", True), ("erika@muster.de", "Mustermann, Erika", False),
                               ("bob@example.com", "Bob", False)]  # a room (no address) is no attendee
    assert read_item(text, "E", "O").fields["attendees"] == "bob@example.com,erika@muster.de"
    assert read_item(_event(), "E", "O").fields["attendees"] is None and people_of(_event()) == []
    assert busy_fields(item.fields)["attendees"] is None  # a busy block has no attendees


def test_a_new_meeting_gets_attendee_lines_with_names_and_the_owner_as_organizer():
    people = [Attendee("erika@muster.de", "Mustermann, Erika"), Attendee("bob@example.com")]
    text = new_item("u", "VEVENT", MEETING | {"attendees": "bob@example.com,erika@muster.de"}, "E", LINK,
                    people=people, organizer=Attendee("alice@example.com", organizer=True))
    assert "ORGANIZER:mailto:alice@example.com" in lines(text)
    assert 'ATTENDEE;CN="Mustermann, Erika";PARTSTAT=NEEDS-ACTION:mailto:erika@muster.de' in unfolded(text)
    assert "ATTENDEE;PARTSTAT=NEEDS-ACTION:mailto:bob@example.com" in lines(text)
    item = read_item(text, "E", "O")
    assert item.fields == MEETING | {"attendees": "bob@example.com,erika@muster.de"}
    assert people_of(text)[0] == ("alice@example.com", None, True)
    # no attendees: neither ATTENDEE nor ORGANIZER
    plain = new_item("u", "VEVENT", MEETING | {"attendees": None}, "E", LINK,
                     organizer=Attendee("alice@example.com", organizer=True))
    assert not any(l.startswith(("ATTENDEE", "ORGANIZER")) for l in lines(plain))


def test_rewriting_the_attendees_keeps_the_lines_of_those_who_stay_byte_for_byte():
    fields = read_item(OTHER, "E", "O").fields | {"attendees": "alice@example.com,erika@muster.de"}
    out = update_item(OTHER, fields, {"attendees"}, "E", LINK, people=[Attendee("erika@muster.de", "Erika")],
                      organizer=Attendee("someone@else.org", organizer=True))
    assert "ATTENDEE;CN=Alice;PARTSTAT=ACCEPTED:mailto:alice@example.com" in lines(out)  # PARTSTAT kept
    assert "ATTENDEE;CN=Erika;PARTSTAT=NEEDS-ACTION:mailto:erika@muster.de" in lines(out)
    assert "carol@example.net" not in out  # removed
    assert [l for l in lines(out) if l.startswith("ORGANIZER")] == ["ORGANIZER;CN=Bob:mailto:bob@example.org"]
    assert read_item(out, "E", "O").fields == fields
    removed = [l for l in unfolded(OTHER) if l not in unfolded(out)]
    assert removed == ["ATTENDEE;CN=Carol;PARTSTAT=NEEDS-ACTION:mailto:carol@example.net"]
    # the organizer's own ATTENDEE line stays, and an item without ORGANIZER gets the one given
    text = _event("ATTENDEE;PARTSTAT=ACCEPTED:mailto:alice@example.com\nATTENDEE:mailto:carol@example.net\n")
    out = update_item(text, {"attendees": "erika@muster.de"}, {"attendees"}, "E", None,
                      organizer=Attendee("alice@example.com", organizer=True))
    assert "ORGANIZER:mailto:alice@example.com" in lines(out)
    assert [l for l in lines(out) if l.startswith("ATTENDEE")] == [
        "ATTENDEE;PARTSTAT=ACCEPTED:mailto:alice@example.com", "ATTENDEE;PARTSTAT=NEEDS-ACTION:mailto:erika@muster.de"]
    assert read_item(out, "E", "O").fields["attendees"] == "erika@muster.de"
    # all gone: no ATTENDEE and no ORGANIZER left; an unchanged field rewrites nothing
    cleared = update_item(OTHER, fields | {"attendees": None}, {"attendees"}, "E", LINK)
    assert not any(l.startswith(("ATTENDEE", "ORGANIZER")) for l in unfolded(cleared))
    assert update_item(OTHER, fields, {"subject"}, "E", LINK).count("ATTENDEE") == 2


_address = st.from_regex(r"[a-z0-9]{1,8}@[a-z]{1,6}\.(de|com)", fullmatch=True)


@given(st.lists(st.tuples(_address, st.one_of(st.none(), _text.filter(lambda t: t.strip()))), max_size=5,
                unique_by=lambda p: p[0]))
def test_attendees_round_trip_through_new_and_updated_items(people):
    attendees = [Attendee(email, name) for email, name in people]
    value = attendee_addresses(attendees)
    organizer = Attendee("owner@example.com", organizer=True)
    text = new_item("u", "VEVENT", MEETING | {"attendees": value}, "E", LINK, people=attendees, organizer=organizer)
    assert read_item(text, "E", "O").fields["attendees"] == value
    assert all(len(line.encode()) <= 75 for line in text.split("\r\n"))
    updated = update_item(_event(), MEETING | {"attendees": value}, {"attendees"}, "E", LINK, people=attendees,
                          organizer=organizer)
    item = read_item(updated, "E", "O")
    assert item.fields["attendees"] == value
    named = {p.email: p.name for p in item.people}
    # A name keeps all but control characters, DQUOTE and backslash (no reader takes those back).
    assert named == ({"owner@example.com": None} if attendees else {}) | {
        a.email: re.sub(r'[\x00-\x1f\x7f"\\]', "", a.name or "").strip() or None for a in attendees}

"""The activity <-> iCalendar mapping (pure)."""

from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from gwsync.icalmap import (BrokenItem, Link, format_time, link_is_current, new_item, normalise_time, parse_time,
                            read_item, strip_link, uid_for_key, update_item)

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
                  "location": "Ort", "rrule": None} | times
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
    lambda z: None if z is None else __import__("zoneinfo").ZoneInfo(z)), min_value=__import__("datetime").datetime(1971, 1, 1),
    max_value=__import__("datetime").datetime(2037, 1, 1)))
def test_time_strings_round_trip(value):
    value = value.replace(microsecond=0, fold=0)
    text = format_time(value)
    assert format_time(parse_time(text)) == text


_text = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\r"), max_size=300)


@given(subject=_text, body=_text.map(lambda t: t.strip()).filter(lambda t: not any(
    l.startswith("CRM: ") for l in t.split("\n"))))
def test_any_text_round_trips_through_our_own_writer(subject, body):
    """Escaping and folding (at 75 octets, never inside a UTF-8 sequence) as icalendar reads them."""
    fields = {"kind": "TERMIN", "status": "O", "subject": subject, "body": body, "location": None,
              "start": "2026-12-01", "end": None, "due": None, "rrule": None}
    text = new_item("u", "VEVENT", fields, "E", LINK)
    assert all(len(line.encode()) <= 75 for line in text.split("\r\n"))
    item = read_item(text, "E", "O")
    assert item.fields["subject"] == subject.replace("\n", " ") or item.fields["subject"] == subject
    assert item.fields["body"] == body and item.has_link(LINK)

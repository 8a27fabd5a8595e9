"""Which server items a calendar sync imports: privacy (CLASS) and the date window (pure)."""

from datetime import date

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gwsync.calendar.icalmap import busy_fields, in_window, read_item

TODAY = date(2026, 11, 27)


def _item(props: str, component: str = "VEVENT"):
    text = (f"BEGIN:VCALENDAR\nVERSION:2.0\nPRODID:-//Phone//EN\nBEGIN:{component}\nUID:x\n"
            f"DTSTAMP:20261120T100000Z\n{props}END:{component}\nEND:VCALENDAR\n")
    return read_item(text, "E", "O")


@pytest.mark.parametrize("props, first, last", [
    ("DTSTART:20261201T090000Z\nDTEND:20261201T100000Z\n", date(2026, 12, 1), date(2026, 12, 1)),
    ("DTSTART;VALUE=DATE:20261201\nDTEND;VALUE=DATE:20261204\n", date(2026, 12, 1), date(2026, 12, 4)),
    ("DTSTART:20261201T090000Z\nDURATION:P2D\n", date(2026, 12, 1), date(2026, 12, 3)),
    ("DTSTART:20261201T090000Z\n", date(2026, 12, 1), date(2026, 12, 1)),
    # recurring: by the last occurrence (UNTIL, or COUNT expanded); open-ended has no last day
    ("DTSTART:20200106T090000Z\nDTEND:20200106T100000Z\nRRULE:FREQ=WEEKLY;UNTIL=20200601T000000Z\n",
     date(2020, 1, 6), date(2020, 6, 1)),
    ("DTSTART;VALUE=DATE:20200106\nDTEND;VALUE=DATE:20200107\nRRULE:FREQ=WEEKLY;COUNT=3\n",
     date(2020, 1, 6), date(2020, 1, 21)),
    ("DTSTART;TZID=Europe/Berlin:20200106T233000\nDTEND;TZID=Europe/Berlin:20200107T003000\n"
     "RRULE:FREQ=DAILY;COUNT=2\n", date(2020, 1, 6), date(2020, 1, 8)),
    ("DTSTART:20200106T090000Z\nDTEND:20200106T100000Z\nRRULE:FREQ=WEEKLY\n", date(2020, 1, 6), None),
])
def test_the_span_of_an_event(props, first, last):
    data = _item(props)
    assert (data.first, data.last) == (first, last)


def test_the_span_of_a_task_is_its_due_day_and_an_undated_task_has_none():
    assert (_item("DUE;VALUE=DATE:20261210\n", "VTODO").first, _item("DUE;VALUE=DATE:20261210\n", "VTODO").last) \
        == (date(2026, 12, 10), date(2026, 12, 10))
    undated = _item("SUMMARY:x\n", "VTODO")
    assert (undated.first, undated.last) == (None, None)
    assert in_window(undated, TODAY, 0, 0)


@pytest.mark.parametrize("props, inside", [
    ("DTSTART:20261201T090000Z\n", True),
    ("DTSTART:20241127T090000Z\n", False),  # two years ago
    ("DTSTART:20261028T090000Z\n", True),  # 30 days ago: the window's first day
    ("DTSTART:20261027T090000Z\n", False),  # 31 days ago
    ("DTSTART:20271127T090000Z\n", True),  # in 365 days: the window's last day
    ("DTSTART:20271128T090000Z\n", False),  # in 366 days
    ("DTSTART:20261001T090000Z\nDTEND:20261120T090000Z\n", True),  # started before, ends inside
    ("DTSTART:20200106T090000Z\nRRULE:FREQ=WEEKLY;UNTIL=20200601T000000Z\n", False),  # ended long ago
    ("DTSTART:20200106T090000Z\nRRULE:FREQ=WEEKLY;COUNT=10\n", False),
    ("DTSTART:20200106T090000Z\nRRULE:FREQ=WEEKLY;UNTIL=20261201T000000Z\n", True),  # still running
    ("DTSTART:20200106T090000Z\nRRULE:FREQ=WEEKLY\n", True),  # open-ended: always counts
    ("DTSTART:20300106T090000Z\nRRULE:FREQ=WEEKLY\n", False),  # open-ended, but starts after the window
])
def test_the_window_past_30_and_future_365_days(props, inside):
    assert in_window(_item(props), TODAY, 30, 365) is inside


@given(st.integers(0, 200), st.integers(0, 200), st.integers(-400, 400), st.integers(0, 40))
def test_an_item_is_outside_only_when_it_ends_before_or_starts_after_the_window(past, future, offset, length):
    start = date.fromordinal(TODAY.toordinal() + offset)
    end = date.fromordinal(start.toordinal() + length)
    data = _item(f"DTSTART;VALUE=DATE:{start:%Y%m%d}\nDTEND;VALUE=DATE:{end:%Y%m%d}\n")
    first_day, last_day = (date.fromordinal(TODAY.toordinal() + days) for days in (-past, future))
    overlaps = end >= first_day and start <= last_day
    assert in_window(data, TODAY, past, future) is overlaps


@pytest.mark.parametrize("klass, private", [
    ("CLASS:PRIVATE\n", True), ("CLASS:CONFIDENTIAL\n", True), ("CLASS:private\n", True),
    ("CLASS:PUBLIC\n", False), ("", False), ("CLASS:X-OTHER\n", False)])
def test_private_and_confidential_items_are_private(klass, private):
    assert _item(f"DTSTART:20261201T090000Z\n{klass}").private is private


def test_a_busy_block_keeps_the_times_and_nothing_else():
    data = _item("DTSTART:20261201T090000Z\nDTEND:20261201T100000Z\nSUMMARY:Arzttermin\nDESCRIPTION:Dr. X\n"
                 "LOCATION:Praxis\nCLASS:PRIVATE\nATTENDEE:mailto:dr@example.com\n")
    busy = busy_fields(data.fields)
    assert (busy["subject"], busy["body"], busy["location"]) == ("Privat", "", None)
    assert (busy["start"], busy["end"]) == (data.fields["start"], data.fields["end"])
    assert not {"Arzttermin", "Dr. X", "Praxis"} & {str(v) for v in busy.values()}

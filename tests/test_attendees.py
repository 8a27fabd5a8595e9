"""Attendees of meetings on real servers (Dovecot and Radicale), with two accounts, alice and bob,
on one CRM: resolved like mail correspondents, written as ATTENDEE lines, merged both ways."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from gwsync.calendar.icalmap import read_item
from gwsync.crm import ActivityFilter

ALICE, BOB, ERIKA, CAROL = "alice@example.com", "bob@example.com", "erika@muster.de", "carol@other.org"


def unfolded(text: str) -> list[str]:
    return text.replace("\r\n", "\n").replace("\n ", "").split("\n")


def build_team(make_env, calserver=None):
    """alice and bob, each with a calendar (on `calserver`, default Radicale), their addresses
    configured; Erika a contact of the partner Muster GmbH."""
    env = make_env(areas=("events",), calserver=calserver)
    other = make_env(areas=("events",), calserver=calserver)
    text = env.config_path.read_text().replace("[accounts.alice]\n", f'[accounts.alice]\naddresses = ["{ALICE}"]\n')
    table = other.config_path.read_text().split("[accounts.alice]", 1)[1]
    env.config_path.write_text(text + f'\n[accounts.bob]\naddresses = ["{BOB}"]' +
                               table.replace("[accounts.alice.", "[accounts.bob."))
    with env.engine() as engine:
        env.muster = engine.add_partner("Muster GmbH", ["info@muster.de"])
        env.erika = engine.add_contact("Erika Mustermann", ERIKA, env.muster.id)
    return env


@pytest.fixture
def team(make_env):
    return build_team(make_env)


def meeting(uid: str, people: str) -> str:
    return (f"BEGIN:VCALENDAR\nVERSION:2.0\nPRODID:-//Phone//EN\nBEGIN:VEVENT\nUID:{uid}\nDTSTAMP:20261120T100000Z\n"
            f"DTSTART:20261201T090000Z\nDTEND:20261201T100000Z\nSUMMARY:Abstimmung\n{people}END:VEVENT\nEND:VCALENDAR\n")


def sync_alice(env):
    code, out = env.cli_json("sync", "--account", "alice")
    assert code == 0, out
    return out["accounts"]["alice"]["events"]


def only_activity(env):
    with env.engine() as engine:
        (activity,) = engine.crm.list_activities(ActivityFilter())
    return activity


def test_a_meeting_with_a_contact_and_a_colleague_is_linked_to_the_contact_with_the_colleague_taking_part(team):
    team.dav_put("events", "m1.ics", meeting("m1", (
        f"ORGANIZER;CN=Alice:mailto:{ALICE}\nATTENDEE;CN=Alice;PARTSTAT=ACCEPTED:mailto:{ALICE}\n"
        f"ATTENDEE;CN=\"Mustermann, Erika\";PARTSTAT=NEEDS-ACTION:MAILTO:Erika@Muster.de\n"
        f"ATTENDEE;CN=Bob:mailto:{BOB}\n")))

    assert sync_alice(team)["created_crm"] == 1

    activity = only_activity(team)
    assert (activity.kind, activity.contact_id, activity.partner_id) == ("BESPRECHUNG", team.erika.id, team.muster.id)
    assert "bob" in activity.participants and "alice" in activity.participants
    code, shown = team.cli_json("activity", "show", str(activity.id))
    assert code == 0
    assert shown["attendees"] == [
        {"email": ALICE, "name": "Alice", "contact_id": None, "partner_id": None, "employee": "alice",
         "organizer": True},
        {"email": ERIKA, "name": "Mustermann, Erika", "contact_id": team.erika.id, "partner_id": team.muster.id,
         "employee": None, "organizer": False},
        {"email": BOB, "name": "Bob", "contact_id": None, "partner_id": None, "employee": "bob", "organizer": False}]
    text = team.cli("activity", "show", str(activity.id)).stdout
    assert f"attendee: Alice <{ALICE}> (organizer), employee alice" in text
    assert (f"attendee: Mustermann, Erika <{ERIKA}>, contact {team.erika.id} Erika Mustermann, "
            f"partner {team.muster.id} Muster GmbH") in text
    assert f"attendee: Bob <{BOB}>, employee bob" in text

    from gwsync.web.app import create_app

    page = create_app(team.config(), b"k" * 32).test_client().get(
        f"/activities/{activity.id}", headers={"Host": "127.0.0.1:8765"}).text
    assert "Mustermann, Erika &lt;erika@muster.de&gt;" in page and f'href="/contacts/{team.erika.id}"' in page
    assert "employee bob" in page and "(organizer)" in page

    # a second sync changes nothing: the attendees read back as they were merged
    again = sync_alice(team)
    assert again["updated_crm"] == again["updated_groupware"] == again["conflicts"] == 0


def test_a_meeting_added_in_the_crm_with_an_attendee_gets_attendee_lines_and_the_owner_as_organizer(team):
    code, added = team.cli_json("activity", "add", "--kind", "BESPRECHUNG", "--subject", "Angebot besprechen",
                                "--start", "2026-12-02T10:00:00+00:00", "--end", "2026-12-02T11:00:00+00:00",
                                "--attendee", "Erika@Muster.de", "--account", "alice")
    assert code == 0
    assert (added["contact_id"], added["partner_id"]) == (team.erika.id, team.muster.id)
    assert [(a["email"], a["organizer"], a["employee"]) for a in added["attendees"]] == [
        (ALICE, True, "alice"), (ERIKA, False, None)]

    assert sync_alice(team)["created_groupware"] == 1

    ((_, text),) = team.dav_items("events").values()
    lines = unfolded(text)
    assert f"ORGANIZER:mailto:{ALICE}" in lines
    assert f"ATTENDEE;CN=Erika Mustermann;PARTSTAT=NEEDS-ACTION:mailto:{ERIKA}" in lines
    assert read_item(text, "E", "O").fields["attendees"] == ERIKA


def test_attendees_refused_on_other_kinds_and_bad_addresses_with_one_line(team):
    result = team.cli("activity", "add", "--kind", "TERMIN", "--subject", "Zahnarzt", "--attendee", ERIKA)
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "gwsync: --attendee: only a BESPRECHUNG has attendees, the activity is a TERMIN (add --kind BESPRECHUNG)"]
    result = team.cli("activity", "add", "--kind", "BESPRECHUNG", "--subject", "x", "--attendee", "erika")
    assert result.exit_code == 2 and result.stderr == "gwsync: --attendee 'erika': not a mail address (use " \
                                                      "name@example.com)\n"
    code, added = team.cli_json("activity", "add", "--kind", "TERMIN", "--subject", "Zahnarzt", "--account", "alice")
    result = team.cli("activity", "edit", str(added["id"]), "--attendee", ERIKA)
    assert result.exit_code == 2 and f"activity {added['id']} is a TERMIN" in result.stderr
    result = team.cli("activity", "edit", "999", "--attendee", ERIKA)
    assert result.exit_code == 1 and result.stderr.startswith("gwsync: no activity with id 999")
    # with --kind BESPRECHUNG in the same edit it is a meeting
    code, edited = team.cli_json("activity", "edit", str(added["id"]), "--kind", "BESPRECHUNG", "--attendee", BOB)
    assert code == 0 and [a["employee"] for a in edited["attendees"]] == ["alice", "bob"]
    assert "bob" in edited["participants"]


def attendee_params(text: str) -> dict[str, dict]:
    """Address -> parameters of each ATTENDEE, and "organizer" -> the ORGANIZER's address, as
    any client reads them (servers re-serialise: Radicale sorts properties, Xandikos quotes)."""
    import icalendar

    (event,) = icalendar.Calendar.from_ical(text).walk("VEVENT")
    attendees = event.get("ATTENDEE", [])
    found = {str(a).lower().removeprefix("mailto:"): dict(a.params)
             for a in (attendees if isinstance(attendees, list) else [attendees])}
    if "ORGANIZER" in event:
        found["organizer"] = {"address": str(event["ORGANIZER"]).lower().removeprefix("mailto:")}
    return found


def phone_edit(text: str, partstat: tuple[str, str], invite: tuple[str, str]) -> str:
    """What a phone does: one attendee answers, another one is invited."""
    import icalendar

    cal = icalendar.Calendar.from_ical(text)
    (event,) = cal.walk("VEVENT")
    attendees = event.get("ATTENDEE", [])
    for attendee in attendees if isinstance(attendees, list) else [attendees]:
        if str(attendee).lower() == f"mailto:{partstat[0]}":
            attendee.params["PARTSTAT"] = partstat[1]
    event.add("ATTENDEE", icalendar.vCalAddress(f"mailto:{invite[0]}"),
              parameters={"CN": invite[1], "PARTSTAT": "NEEDS-ACTION"})
    return cal.to_ical().decode()


@pytest.fixture
def any_team(make_env, calserver):
    """The team on each CalDAV server in turn."""
    return build_team(make_env, calserver)


def test_attendees_added_on_the_phone_reach_the_crm_and_those_added_in_the_crm_reach_the_phone(any_team):
    team = any_team
    code, added = team.cli_json("activity", "add", "--kind", "BESPRECHUNG", "--subject", "Planung",
                                "--start", "2026-12-03T10:00:00+00:00", "--end", "2026-12-03T11:00:00+00:00",
                                "--attendee", ERIKA, "--account", "alice")
    sync_alice(team)
    ((name, (etag, text)),) = team.dav_items("events").items()
    team.dav_put("events", name, phone_edit(text, (ERIKA, "ACCEPTED"), (CAROL, "Carol")), etag)

    out = sync_alice(team)
    assert out["updated_crm"] == 1 and out["updated_groupware"] == 0 and out["conflicts"] == 0
    activity = only_activity(team)
    assert [(a.email, a.name, a.organizer) for a in activity.attendees] == [
        (ALICE, None, True), (ERIKA, "Erika Mustermann", False), (CAROL, "Carol", False)]
    assert activity.contact_id == team.erika.id  # kept

    # In the CRM: the list becomes Erika and bob (Carol dropped): Erika's answer stays on the phone.
    code, edited = team.cli_json("activity", "edit", str(added["id"]), "--attendee", ERIKA, "--attendee", BOB)
    assert code == 0 and "bob" in edited["participants"]
    out = sync_alice(team)
    assert out["updated_groupware"] == 1 and out["conflicts"] == 0
    ((_, (_, text)),) = team.dav_items("events").items()
    found = attendee_params(text)
    assert sorted(found) == [BOB, ERIKA, "organizer"] and found["organizer"]["address"] == ALICE
    assert found[ERIKA]["PARTSTAT"] == "ACCEPTED" and found[ERIKA]["CN"] == "Erika Mustermann"
    assert found[BOB]["PARTSTAT"] == "NEEDS-ACTION"
    again = sync_alice(team)
    assert again["updated_crm"] == again["updated_groupware"] == again["conflicts"] == 0

    # `--attendee ''` clears them: no ATTENDEE and no ORGANIZER on the phone
    assert team.cli("activity", "edit", str(added["id"]), "--attendee", "").exit_code == 0
    sync_alice(team)
    ((_, (_, text)),) = team.dav_items("events").items()
    assert attendee_params(text) == {} and not re.search(r"^(ATTENDEE|ORGANIZER)", text, re.M)
    assert only_activity(team).attendees == []


def test_attendees_added_on_both_sides_between_two_syncs_are_all_kept(team):
    code, added = team.cli_json("activity", "add", "--kind", "BESPRECHUNG", "--subject", "Workshop",
                                "--start", "2026-12-04T10:00:00+00:00", "--end", "2026-12-04T12:00:00+00:00",
                                "--attendee", ERIKA, "--account", "alice")
    sync_alice(team)
    ((name, (etag, text)),) = team.dav_items("events").items()
    team.dav_put("events", name, phone_edit(text, (ERIKA, "TENTATIVE"), (CAROL, "Carol")), etag)
    assert team.cli("activity", "edit", str(added["id"]), "--attendee", ERIKA, "--attendee", BOB).exit_code == 0

    out = sync_alice(team)

    assert out["conflicts"] == 0 and out["updated_crm"] == 1 and out["updated_groupware"] == 1
    assert sorted(a.email for a in only_activity(team).attendees) == [ALICE, BOB, CAROL, ERIKA]
    ((_, (_, text)),) = team.dav_items("events").items()
    found = attendee_params(text)
    assert sorted(found) == [BOB, CAROL, ERIKA, "organizer"] and found[ERIKA]["PARTSTAT"] == "TENTATIVE"


def test_a_link_saved_before_attendees_were_synced_keeps_working(team):
    """Its base has no "attendees": an unchanged item is no change, an edited one brings its
    attendees into the CRM without a conflict or a write to the server."""
    team.dav_put("events", "m2.ics", meeting("m2", f"ORGANIZER:mailto:{ALICE}\nATTENDEE:mailto:{ERIKA}\n"))
    sync_alice(team)
    with team.engine() as engine:
        (link,) = engine.state.links("alice", "events")
        old = {k: v for k, v in link.base.items() if k != "attendees"}
        engine.state.apply_link_changes([("save", replace(link, base=old))])
        engine.crm.update_activity(link.activity_id, {"attendees": [], "contact_id": None, "partner_id": None})
    out = sync_alice(team)
    assert out["updated_groupware"] == out["conflicts"] == 0  # nothing written to the server, no conflict
    ((name, (etag, text)),) = team.dav_items("events").items()
    team.dav_put("events", name, text.replace("SUMMARY:Abstimmung", "SUMMARY:Abstimmung neu"), etag)
    out = sync_alice(team)
    assert out["updated_crm"] == 1 and out["updated_groupware"] == 0 and out["conflicts"] == 0
    activity = only_activity(team)
    assert activity.subject == "Abstimmung neu" and [a.email for a in activity.attendees] == [ALICE, ERIKA]
    assert activity.contact_id == team.erika.id


def test_attendees_who_are_employees_join_the_participants_given_with_with(team):
    code, added = team.cli_json("activity", "add", "--kind", "BESPRECHUNG", "--subject", "Team", "--with", "bob",
                                "--attendee", ERIKA, "--account", "alice")
    assert code == 0 and sorted(added["participants"]) == ["alice", "bob"]  # --with kept, the owner added
    code, edited = team.cli_json("activity", "edit", str(added["id"]), "--with", "", "--attendee", BOB)
    assert code == 0 and sorted(edited["participants"]) == ["alice", "bob"]  # bob back in as an attendee
    assert [a["email"] for a in edited["attendees"]] == [ALICE, BOB] and edited["contact_id"] == team.erika.id

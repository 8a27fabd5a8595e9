"""What stays out of the CRM until someone takes it in: mail and calendar items left out in
`gwsync review`, and calendar items that lack a mandatory field (real Dovecot and Radicale)."""

from __future__ import annotations

import re

from conftest import make_mail
from gwsync.crm import ActivityFilter

DONE = "INBOX/CRM Erledigt [E]"


def seqs(env, folder: str) -> list[int]:
    return sorted(int(re.search(rb"X-Seq: (\d+)", m["raw"]).group(1)) for m in env.messages(folder).values())


def subjects(env) -> list[str]:
    with env.engine() as engine:
        return sorted(a.subject for a in engine.crm.list_activities(ActivityFilter()))


def event(uid: str, summary: str | None, attendees: tuple[str, ...] = (), organizer: str | None = None,
          description: str | None = None) -> str:
    lines = ["BEGIN:VCALENDAR", "VERSION:2.0", "PRODID:-//phone//EN", "BEGIN:VEVENT", f"UID:{uid}",
             "DTSTAMP:20261120T100000Z", "DTSTART:20261201T090000Z", "DTEND:20261201T100000Z"]
    if summary is not None:
        lines.append(f"SUMMARY:{summary}")
    if description is not None:
        lines.append(f"DESCRIPTION:{description}")
    if organizer:
        lines.append(f"ORGANIZER:mailto:{organizer}")
    lines += [f"ATTENDEE;CN=Gast;PARTSTAT=NEEDS-ACTION:mailto:{a}" for a in attendees]
    return "\n".join(lines + ["END:VEVENT", "END:VCALENDAR"]) + "\n"


def web_page(env, path: str) -> str:
    from gwsync.web.app import create_app

    app = create_app(env.config(), b"k" * 32)
    response = app.test_client().get(path, headers={"Host": "127.0.0.1:8765"})
    assert response.status_code == 200
    return response.get_data(as_text=True)


def held(env) -> list[dict]:
    code, rows = env.cli_json("held")
    assert code == 0
    return rows


# -- left out in the review --------------------------------------------------------------------------

def test_mail_left_out_in_review_stays_out_until_taken_in(env):
    env.append(DONE, make_mail(1), make_mail(2))
    first = env.cli("review", input="mail\n2\ny\n")  # leave out mail 2
    assert first.exit_code == 0, first.stdout + first.stderr
    assert "Imported 1 mail(s):" in first.stdout

    # The next syncs leave it alone: it stays in its folder, out of the CRM.
    for _ in range(2):
        code, out = env.cli_json("sync")
        assert code == 0 and out["accounts"]["alice"]["mail"]["imported"] == 0
    assert subjects(env) == ["Test mail 1"] and seqs(env, DONE) == [2]
    (row,) = held(env)
    assert (row["outcome"], row["subject"], row["folder"]) == ("left-out", "Test mail 2", DONE)
    assert "gwsync review" in row["released_by"]
    assert "Left out in the review" in web_page(env, "/held")

    # The review shows it again; taken in, it is imported.
    second = env.cli("review", input="mail\n1\ny\n")
    assert second.exit_code == 0, second.stdout + second.stderr
    assert "Left out earlier" in second.stdout and "'Test mail 2'" in second.stdout
    assert "Imported 1 mail(s):" in second.stdout
    assert subjects(env) == ["Test mail 1", "Test mail 2"] and seqs(env, DONE) == []
    assert held(env) == []


def test_a_review_that_leaves_out_every_mail_still_keeps_them_out(env):
    env.append(DONE, make_mail(1))
    result = env.cli("review", input="mail\n1\ny\n")
    assert result.exit_code == 0, result.stdout + result.stderr
    code, out = env.cli_json("sync")
    assert code == 0 and out["accounts"]["alice"]["mail"]["imported"] == 0 and seqs(env, DONE) == [1]


def test_a_calendar_item_left_out_in_review_stays_out_until_taken_in(make_env):
    env = make_env(areas=("events",))
    env.dav_put("events", "a.ics", event("a", "Messe"))
    env.dav_put("events", "b.ics", event("b", "Arzt"))
    first = env.cli("review", input="events\n2\ny\n")  # leave out b.ics
    assert first.exit_code == 0, first.stdout + first.stderr
    assert subjects(env) == ["Messe"]

    for _ in range(2):
        code, out = env.cli_json("sync")
        assert code == 0 and out["accounts"]["alice"]["events"]["created_crm"] == 0
    assert subjects(env) == ["Messe"]
    assert out["accounts"]["alice"]["events"]["requests"] == 1  # no change: one request, left-out item or not
    assert "X-GWSYNC" not in env.dav_items("events")["b.ics"][1]  # nothing written into it
    (row,) = held(env)
    assert (row["outcome"], row["subject"], row["area"]) == ("left-out", "Arzt", "events")
    assert "Arzt" in web_page(env, "/held") and "Left out in the review" in web_page(env, "/held")

    second = env.cli("review", input="events\n1\ny\n")  # take it in
    assert second.exit_code == 0, second.stdout + second.stderr
    assert "Left out earlier" in second.stdout and "'Arzt'" in second.stdout
    assert subjects(env) == ["Arzt", "Messe"] and held(env) == []
    assert "X-GWSYNC-ACTIVITY-ID" in env.dav_items("events")["b.ics"][1]


# -- mandatory fields on calendar items ------------------------------------------------------------

def test_a_calendar_item_without_a_mandatory_contact_is_held_until_an_attendee_has_one(make_env):
    env = make_env(mandatory=("contact",), areas=("events",))
    env.dav_put("events", "kunde.ics", event("kunde", "Besprechung ACME", attendees=("erika@acme.example",)))
    env.dav_put("events", "solo.ics", event("solo", "Allein"))
    etags = {name: etag for name, (etag, _text) in env.dav_items("events").items()}

    code, out = env.cli_json("sync")

    events = out["accounts"]["alice"]["events"]
    assert code == 0 and events["created_crm"] == 0 and events["held"] == 2
    assert subjects(env) == []
    assert {name: etag for name, (etag, _text) in env.dav_items("events").items()} == etags  # untouched
    rows = {r["subject"]: r for r in held(env)}
    assert set(rows) == {"Besprechung ACME", "Allein"}
    assert all(r["outcome"] == "held" and r["missing"] == ["contact"] for r in rows.values())
    assert "erika@acme.example" in rows["Besprechung ACME"]["released_by"]
    review = env.cli("review", input="events\n\ny\n")  # held: the review's import holds them too
    assert "NEEDS contact" in review.stdout and "2 held for a mandatory field" in review.stdout
    assert "erika@acme.example" in web_page(env, "/held") and "Lacks: contact." in web_page(env, "/held")

    # Still no contact: still held, and the item is not written.
    code, out = env.cli_json("sync")
    assert out["accounts"]["alice"]["events"]["held"] == 2 and subjects(env) == []

    # Erika becomes a contact: the meeting with her is imported with her as contact.
    with env.engine() as engine:
        acme = engine.crm.add_partner("ACME", ["info@acme.example"])
        erika = engine.crm.add_contact("Erika", "erika@acme.example", acme.id)
    code, out = env.cli_json("sync")
    events = out["accounts"]["alice"]["events"]
    assert code == 0 and events["created_crm"] == 1 and events["held"] == 1
    with env.engine() as engine:
        (activity,) = engine.crm.list_activities(ActivityFilter())
    assert (activity.subject, activity.contact_id, activity.partner_id) == ("Besprechung ACME", erika.id, acme.id)
    assert f"X-GWSYNC-ACTIVITY-ID:{activity.id}" in env.dav_items("events")["kunde.ics"][1]
    assert [r["subject"] for r in held(env)] == ["Allein"]


def test_a_calendar_item_without_a_mandatory_subject_is_held_until_it_has_one(make_env):
    env = make_env(mandatory=("subject",), areas=("events",))
    etag = env.dav_put("events", "x.ics", event("x", None))
    code, out = env.cli_json("sync")
    assert code == 0 and out["accounts"]["alice"]["events"]["held"] == 1 and subjects(env) == []
    (row,) = held(env)
    assert row["missing"] == ["subject"]
    env.dav_put("events", "x.ics", event("x", "Nachgetragen"), etag=etag)  # filled in on the phone
    code, out = env.cli_json("sync")
    assert code == 0 and out["accounts"]["alice"]["events"]["created_crm"] == 1
    assert subjects(env) == ["Nachgetragen"] and held(env) == []


def test_a_held_calendar_item_deleted_on_the_server_is_no_longer_listed(make_env):
    env = make_env(mandatory=("contact",), areas=("events",))
    env.dav_put("events", "x.ics", event("x", "Ohne Kontakt"))
    env.cli_json("sync")
    assert len(held(env)) == 1
    env.dav_delete("events", "x.ics")
    code, out = env.cli_json("sync")
    assert code == 0 and held(env) == [] and subjects(env) == []


# -- what "filled" means for a calendar item, as units ---------------------------------------------

def addresses_of(text: str) -> list[str]:
    """The mandatory check's addresses of an item, from the item as the sync reads it."""
    from gwsync.calendar.icalmap import read_item
    from gwsync.calendar.mandatory import item_addresses

    return item_addresses(read_item(text, "E", "O").people)


def test_item_addresses_are_the_attendees_then_the_organizer_each_once():
    from gwsync.calendar.mandatory import item_addresses

    text = event("x", "S", attendees=("Erika@ACME.example", "bob@firma.example", "erika@acme.example"),
                 organizer="alice@firma.example").replace("mailto:bob", "MAILTO:bob")
    assert addresses_of(text) == ["erika@acme.example", "bob@firma.example", "alice@firma.example"]
    assert addresses_of(event("y", "S", attendees=("one@x.example",))) == ["one@x.example"]
    assert addresses_of(event("z", "S")) == [] and item_addresses([]) == []


def test_an_organizer_who_also_attends_counts_alike_in_the_mandatory_check_and_the_import():
    """One order for both (gwsync.people.in_rule_order): the attendees, then the organizer, who
    counts once, as the organizer, also when listed among the attendees. The check and the
    import then find the same contact (the check used to take the organizer at its place
    among the attendees, the import last)."""
    from types import SimpleNamespace

    from gwsync.calendar.icalmap import read_item
    from gwsync.calendar.mandatory import check_item, item_addresses
    from gwsync.people import resolve_attendees

    text = event("x", "S", attendees=("erika@acme.example", "max@beta.example"), organizer="erika@acme.example")
    contacts = {"erika@acme.example": SimpleNamespace(id=1, partner_id=10, name="Erika"),
                "max@beta.example": SimpleNamespace(id=2, partner_id=20, name="Max")}
    data = read_item(text, "E", "O")
    assert item_addresses(data.people) == ["max@beta.example", "erika@acme.example"]
    match, missing = check_item(("contact",), data.fields, item_addresses(data.people), set(), contacts.get,
                                lambda domain: None)
    people = resolve_attendees(data.people, {}, contacts.get, lambda domain: None)
    assert missing == [] and (match.contact_id, match.partner_id) == (people.contact_id, people.partner_id) == (2, 20)


def test_check_item_takes_the_first_external_attendee_with_a_contact_then_a_partner_domain():
    from types import SimpleNamespace

    from gwsync.calendar.mandatory import check_item

    contacts = {"erika@acme.example": SimpleNamespace(id=7, partner_id=3),
                "bob@firma.example": SimpleNamespace(id=9, partner_id=None)}
    partners = {"kunde.example": SimpleNamespace(id=5)}
    find_contact, find_partner = contacts.get, partners.get
    fields = {"subject": "Termin", "body": ""}
    employees = {"bob@firma.example"}

    def check(mandatory, addresses, given=fields):
        match, missing = check_item(mandatory, given, addresses, employees, find_contact, find_partner)
        return (match.contact_id, match.partner_id), missing

    assert check(("contact",), ["bob@firma.example", "erika@acme.example"]) == ((7, 3), [])
    assert check(("contact", "partner"), ["neu@kunde.example"]) == ((None, 5), ["contact"])
    assert check(("partner",), ["bob@firma.example"]) == ((None, None), ["partner"])  # an employee: not a contact
    assert check(("subject", "body"), []) == ((None, None), ["body"])
    assert check(("subject",), [], {"subject": "  ", "body": "x"}) == ((None, None), ["subject"])

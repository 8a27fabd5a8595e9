"""After the sync: held mail, unknown senders, assigning them, and the quick searches."""

from __future__ import annotations

from conftest import make_mail
from gwsync.crm import ActivityFilter

DONE = "INBOX/CRM Erledigt [E]"
OPEN = "INBOX/CRM Offen [O]"


def test_assigning_an_unknown_sender_releases_held_mail_with_contact_and_partner(make_env):
    env = make_env(mandatory=("partner",))
    env.append(DONE, make_mail(1, sender="Neu Kunde <neu@kunde.example>"), make_mail(2, sender="neu@kunde.example"),
               make_mail(3, sender="bekannt@acme.example"))
    with env.engine() as engine:
        acme = engine.crm.add_partner("ACME", ["info@acme.example"])
        kunde = engine.crm.add_partner("Kunde GmbH", [])

    code, out = env.cli_json("sync")
    mail = out["accounts"]["alice"]["mail"]
    assert (mail["imported"], mail["held"]) == (1, 2)
    code, held = env.cli_json("held")
    assert [(h["sender"], h["missing"]) for h in held] == [("neu@kunde.example", ["partner"])] * 2
    assert "gwsync assign" in held[0]["released_by"]
    code, unknown = env.cli_json("unknown")
    assert {u["email"]: (u["imported"], u["held"], u["partner_id"]) for u in unknown} == {
        "neu@kunde.example": (0, 2, None), "bekannt@acme.example": (1, 0, acme.id)}

    result = env.cli("assign", "neu@kunde.example", "--new-contact", "Nina Neu", "--partner", str(kunde.id))
    assert result.exit_code == 0 and "2 held mail(s) import at the next sync" in result.stdout
    again = env.cli("assign", "neu@kunde.example", "--new-contact", "Nina Neu", "--partner", str(kunde.id))
    assert again.exit_code == 0 and again.stdout.startswith("neu@kunde.example -> contact #1")  # no second Nina
    other = env.cli("assign", "neu@kunde.example", "--new-contact", "Nino Neu")
    assert other.exit_code == 2 and "belongs to contact #1 Nina Neu already" in other.stderr
    code, out = env.cli_json("sync")
    assert out["accounts"]["alice"]["mail"]["imported"] == 2 and out["accounts"]["alice"]["mail"]["held"] == 0
    with env.engine() as engine:
        released = [a for a in engine.crm.list_activities(ActivityFilter()) if a.sender == "neu@kunde.example"]
        contact = engine.crm.find_contact_by_email("neu@kunde.example")
    assert len(released) == 2 and contact.name == "Nina Neu"
    assert all((a.contact_id, a.partner_id, a.unassigned) == (contact.id, kunde.id, False) for a in released)
    assert env.messages(DONE) == {} and env.cli_json("held")[1] == []
    assert [u["email"] for u in env.cli_json("unknown")[1]] == ["bekannt@acme.example"]


def test_assigning_a_domain_matched_address_links_all_its_earlier_activities(env):
    with env.engine() as engine:
        acme = engine.crm.add_partner("ACME", ["info@acme.example"])
        erika = engine.crm.add_contact("Erika", "erika@acme.example", acme.id)
    env.append(DONE, make_mail(1, sender="einkauf@acme.example"), make_mail(2, sender="einkauf@acme.example"),
               make_mail(3, sender="other@acme.example"))
    env.cli("sync")
    code, unassigned = env.cli_json("activities", "--unassigned")
    assert sorted(a["subject"] for a in unassigned) == ["Test mail 1", "Test mail 2", "Test mail 3"]
    assert all(a["partner_id"] == acme.id for a in unassigned)

    code, result = env.cli_json("assign", "Einkauf@ACME.example", "--contact", str(erika.id))
    assert code == 0 and result["linked_activities"] == 2

    code, unassigned = env.cli_json("activities", "--unassigned")
    assert [a["subject"] for a in unassigned] == ["Test mail 3"]
    with env.engine() as engine:
        assert engine.crm.get_contact(erika.id).emails == ["erika@acme.example", "einkauf@acme.example"]
        linked = [a for a in engine.crm.list_activities(ActivityFilter()) if a.sender == "einkauf@acme.example"]
    assert all((a.contact_id, a.partner_id, a.unassigned) == (erika.id, acme.id, False) for a in linked)
    # the next mail from that address is assigned at import
    env.append(OPEN, make_mail(4, sender="einkauf@acme.example"))
    env.cli("sync")
    with env.engine() as engine:
        (fourth,) = [a for a in engine.crm.list_activities(ActivityFilter()) if a.subject == "Test mail 4"]
    assert fourth.contact_id == erika.id and not fourth.unassigned


def test_the_quick_searches_return_exactly_the_right_activities(env):
    with env.engine() as engine:
        acme = engine.crm.add_partner("ACME", ["info@acme.example"])
        engine.crm.add_contact("Erika", "erika@acme.example", acme.id)
        from gwsync.crm import ActivityDraft

        engine.crm.create_activities([ActivityDraft(key="crm:t", kind="TERMIN", status="O", subject="Termin")])
        # an activity imported yesterday, to tell "today" from "all imported"
        (old_id,) = engine.crm.create_activities([ActivityDraft(
            key="mail:old", kind="MAILEIN", status="E", subject="Gestern", sender="x@y.example", unassigned=True,
            source="alice:INBOX/CRM Erledigt [E]")])
        engine.crm.conn.execute("UPDATE activities SET imported_at = '2020-01-01T00:00:00+00:00' WHERE id = ?",
                                (old_id,))
    env.append(DONE, make_mail(1, sender="erika@acme.example"), make_mail(2, sender="fremd@nowhere.example"))
    env.cli("sync")

    def subjects(*args):
        return sorted(a["subject"] for a in env.cli_json("activities", *args)[1])

    assert subjects("--imported") == ["Gestern", "Test mail 1", "Test mail 2"]
    assert subjects("--imported", "--today") == ["Test mail 1", "Test mail 2"]
    assert subjects("--unassigned") == ["Gestern", "Test mail 2"]
    assert subjects("--unassigned", "--today") == ["Test mail 2"]
    assert subjects("--kind", "TERMIN") == ["Termin"]
    assert subjects("--imported", "--kind", "TERMIN") == []
    assert subjects() == ["Gestern", "Termin", "Test mail 1", "Test mail 2"]


def test_review_end_to_end_through_its_input(make_env):
    """Leave one mail out, fill a mandatory partner, give a document a category and keyword,
    keep the new event; then check the CRM and both servers."""
    from conftest import crlf

    env = make_env(mandatory=("partner",), crm_extra="attachment_review = true\n", areas=("mail", "events"))
    with env.engine() as engine:
        acme = engine.crm.add_partner("ACME", ["info@acme.example"])
        engine.crm.add_partner("Zeta AG", [])
        engine.crm.add_contact("Erika", "erika@acme.example", acme.id)
    with_pdf = crlf(b"From: erika@acme.example\nSubject: Vertrag anbei\nMIME-Version: 1.0\n"
                    b"Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: text/plain\n\nanbei\n"
                    b"--b\nContent-Type: application/pdf\nContent-Disposition: attachment; filename=vertrag.pdf\n"
                    b"Content-Transfer-Encoding: base64\n\nJVBERi0xLjQK\n--b--\n")
    env.append(DONE, with_pdf, make_mail(2, sender="stranger@nowhere.example"),
               make_mail(3, sender="spam@junk.example"))
    # The partner is mandatory for calendar items too: Erika, a contact of ACME, attends.
    env.dav_put("events", "m.ics", "BEGIN:VCALENDAR\nVERSION:2.0\nPRODID:x\nBEGIN:VEVENT\nUID:m\n"
                "DTSTAMP:20261120T100000Z\nDTSTART:20261201T090000Z\nSUMMARY:Messe\n"
                "ATTENDEE:mailto:erika@acme.example\nEND:VEVENT\nEND:VCALENDAR\n")

    answers = "\n".join([
        "mail, events",  # areas
        "3",             # leave out the third mail
        "Vertrag",       # vertrag.pdf of mail 1: category
        "2026-114",      # ... keyword
        str(acme.id),    # mail 2 needs a partner
        "",              # keep the new event
        "y",             # import
    ]) + "\n"
    result = env.cli("review", input=answers)

    assert result.exit_code == 0, result.stdout + result.stderr
    assert "NEEDS partner" in result.stdout and "'Messe'" in result.stdout
    assert "Imported 2 mail(s):" in result.stdout and "events: 1 new in the CRM" in result.stdout
    with env.engine() as engine:
        acts = {a.subject: a for a in engine.crm.list_activities(ActivityFilter())}
    assert set(acts) == {"Vertrag anbei", "Test mail 2", "Messe"}
    (doc,) = acts["Vertrag anbei"].documents
    assert (doc.filename, doc.category, doc.keyword) == ("vertrag.pdf", "Vertrag", "2026-114")
    assert acts["Test mail 2"].partner_id == acme.id and acts["Test mail 2"].sender == "stranger@nowhere.example"
    assert acts["Messe"].partner_id == acme.id
    left = list(env.messages(DONE).values())
    assert len(left) == 1 and b"spam@junk.example" in left[0]["raw"]  # left out: still in its folder
    assert len(env.messages("INBOX/CRM Archiv")) == 2
    (etag, text), = env.dav_items("events").values()
    assert f"X-GWSYNC-ACTIVITY-ID:{acts['Messe'].id}" in text


def test_review_keeps_asking_until_a_required_field_is_given(make_env):
    env = make_env(mandatory=("subject",))
    env.append(DONE, make_mail(1, subject=""))
    result = env.cli("review", input="mail\n\n\n\nNachgetragen\ny\n")
    assert result.exit_code == 0, result.stdout + result.stderr
    assert result.stdout.count("this field is required") == 2
    with env.engine() as engine:
        assert [a.subject for a in engine.crm.list_activities(ActivityFilter())] == ["Nachgetragen"]

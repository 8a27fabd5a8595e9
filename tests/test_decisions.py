"""The import decisions: pure functions, tested exhaustively and by property."""

from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from gwsync.mail.decisions import (
    INCOMING,
    OUTGOING,
    Step,
    failure_outcome,
    missing_fields,
    plan_mail,
    resolve_mail,
    resolve_recipients,
    resolve_sender,
)
from gwsync.storage.state import FAILED, HELD, IMPORTED, QUARANTINED, MailRecord


@dataclass
class C:
    id: int
    partner_id: int | None


@dataclass
class P:
    id: int


CONTACTS = {"erika@acme.example": C(1, 10), "solo@free.example": C(2, None)}
PARTNERS = {"acme.example": P(10), "other.example": P(11)}


def resolve(addr):
    return resolve_sender(addr, CONTACTS.get, PARTNERS.get)


def test_contact_wins_with_its_partner():
    assert resolve("Erika@ACME.example") == resolve_sender("erika@acme.example", CONTACTS.get, PARTNERS.get)
    m = resolve("erika@acme.example")
    assert (m.contact_id, m.partner_id, m.unassigned) == (1, 10, False)


def test_contact_without_partner_does_not_fall_back_to_the_domain():
    m = resolve("solo@free.example")
    assert (m.contact_id, m.partner_id) == (2, None)


def test_domain_gives_the_partner_but_no_contact():
    m = resolve("someone@other.example")
    assert (m.contact_id, m.partner_id, m.unassigned) == (None, 11, True)


def test_unknown_and_missing_senders_are_unassigned():
    assert resolve("x@unknown.example").unassigned
    assert resolve(None).partner_id is None
    assert resolve("").contact_id is None
    assert resolve("no-at-sign").partner_id is None


OWN = ("alice@firma.example", "Vertrieb@Firma.example")


def mail(sender, *recipients):
    return resolve_mail(sender, list(recipients), OWN, CONTACTS.get, PARTNERS.get)


def test_mail_from_an_own_address_is_outgoing_and_resolved_by_its_first_recipient_with_a_contact():
    m = mail("vertrieb@firma.example", "x@unknown.example", "someone@other.example", "erika@acme.example")
    assert (m.kind, m.match.contact_id, m.match.partner_id, m.correspondent) == (
        OUTGOING, 1, 10, "x@unknown.example")


def test_outgoing_mail_without_a_contact_takes_the_first_partner_domain_else_nobody():
    m = mail("alice@firma.example", "x@unknown.example", "someone@other.example", "b@acme.example")
    assert (m.kind, m.match.contact_id, m.match.partner_id, m.match.unassigned) == (OUTGOING, None, 11, True)
    m = mail("alice@firma.example", "x@unknown.example")
    assert (m.match.contact_id, m.match.partner_id, m.correspondent) == (None, None, "x@unknown.example")
    m = mail("alice@firma.example")  # no recipient at all (a draft, Bcc only)
    assert (m.kind, m.match.unassigned, m.correspondent) == (OUTGOING, True, None)


def test_mail_from_anyone_else_is_incoming_and_resolved_by_its_sender():
    m = mail("erika@acme.example", "alice@firma.example")
    assert (m.kind, m.match.contact_id, m.correspondent) == (INCOMING, 1, "erika@acme.example")
    assert mail(None, "erika@acme.example").kind == INCOMING
    assert resolve_mail("alice@firma.example", ["erika@acme.example"], (), CONTACTS.get, PARTNERS.get).kind == INCOMING


@given(st.lists(st.sampled_from([*CONTACTS, "x@other.example", "y@acme.example", "z@nowhere.example"]), max_size=5))
def test_recipients_resolve_to_the_first_contact_else_the_first_partner_domain(recipients):
    m = resolve_recipients(recipients, CONTACTS.get, PARTNERS.get)
    contacts = [CONTACTS[r] for r in recipients if r in CONTACTS]
    partners = [PARTNERS[r.split("@")[1]] for r in recipients if r.split("@")[1] in PARTNERS]
    if contacts:
        assert (m.contact_id, m.partner_id) == (contacts[0].id, contacts[0].partner_id)
    else:
        assert (m.contact_id, m.partner_id) == (None, partners[0].id if partners else None)


@given(st.emails())
def test_resolution_is_one_of_the_three_outcomes(addr):
    m = resolve(addr)
    domain = addr.rsplit("@", 1)[1].lower()
    if addr.lower() in CONTACTS:
        assert m.contact_id == CONTACTS[addr.lower()].id
    elif domain in PARTNERS:
        assert (m.contact_id, m.partner_id) == (None, PARTNERS[domain].id)
    else:
        assert (m.contact_id, m.partner_id) == (None, None)


def test_missing_fields():
    assert missing_fields((), partner_id=None, contact_id=None, subject="", body="") == []
    assert missing_fields(("partner", "contact"), partner_id=3, contact_id=None, subject="s", body="b") == ["contact"]
    assert missing_fields(("subject", "body"), partner_id=None, contact_id=None, subject="  ", body="x") == ["subject"]


def _rec(outcome, activity_id=None, attempts=0):
    return MailRecord(account="a", folder="f", uidvalidity=1, uid=1, outcome=outcome, activity_id=activity_id,
                      attempts=attempts)


def test_plan_mail():
    assert plan_mail(None) is Step.PROCESS
    assert plan_mail(_rec(IMPORTED, activity_id=5)) is Step.MOVE_ONLY
    assert plan_mail(_rec(IMPORTED)) is Step.PROCESS  # no activity id: trust nothing, look again
    assert plan_mail(_rec(HELD)) is Step.PROCESS
    assert plan_mail(_rec(FAILED, attempts=1)) is Step.PROCESS
    assert plan_mail(_rec(QUARANTINED, attempts=3)) is Step.SKIP


@given(max_attempts=st.integers(1, 10))
def test_failures_are_bounded(max_attempts):
    """Whatever the bound, a mail that always fails is tried exactly max_attempts times."""
    record, tries = None, 0
    while plan_mail(record) is Step.PROCESS:
        tries += 1
        outcome, attempts = failure_outcome(record.attempts if record else 0, max_attempts)
        record = _rec(outcome, attempts=attempts)
        assert tries <= max_attempts
    assert tries == max_attempts and record.outcome == QUARANTINED

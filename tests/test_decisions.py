"""The import decisions: pure functions, tested exhaustively and by property."""

from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from gwsync.mail.decisions import Step, failure_outcome, missing_fields, plan_mail, resolve_sender
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

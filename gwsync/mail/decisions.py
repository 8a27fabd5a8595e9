"""The mail import's decisions, as pure functions over plain data (no I/O, no clock).

Kept apart so that they can be read in one sitting and tested exhaustively.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ..storage.records import FAILED, HELD, IMPORTED, LEFT_OUT, QUARANTINED, MailRecord


class _HasId(Protocol):
    id: int


class _Contactish(Protocol):
    id: int
    partner_id: int | None


@dataclass(frozen=True)
class SenderMatch:
    contact_id: int | None
    partner_id: int | None

    @property
    def unassigned(self) -> bool:
        return self.contact_id is None


def sender_domain(address: str | None) -> str | None:
    if not address or "@" not in address:
        return None
    domain = address.rsplit("@", 1)[1].strip().lower()
    return domain or None


def resolve_sender(address: str | None,
                   find_contact: Callable[[str], _Contactish | None],
                   find_partner: Callable[[str], _HasId | None]) -> SenderMatch:
    """README, "What an import does": exact address of a contact -> contact and its partner; else the domain against
    the partners' addresses -> that partner, no contact; else nobody."""
    if not address:
        return SenderMatch(None, None)
    contact = find_contact(address.strip().lower())
    if contact is not None:
        return SenderMatch(contact.id, contact.partner_id)
    domain = sender_domain(address)
    partner = find_partner(domain) if domain else None
    return SenderMatch(None, partner.id if partner is not None else None)


def resolve_recipients(recipients: list[str],
                       find_contact: Callable[[str], _Contactish | None],
                       find_partner: Callable[[str], _HasId | None]) -> SenderMatch:
    """README, "Outgoing mail": the first recipient (To, then Cc) with a contact -> that contact and its
    partner; else the first recipient whose domain is a partner's -> that partner, no contact; else nobody."""
    for address in recipients:
        contact = find_contact(address.strip().lower())
        if contact is not None:
            return SenderMatch(contact.id, contact.partner_id)
    for address in recipients:
        domain = sender_domain(address)
        partner = find_partner(domain) if domain else None
        if partner is not None:
            return SenderMatch(None, partner.id)
    return SenderMatch(None, None)


INCOMING, OUTGOING = "MAILEIN", "MAILAUS"


@dataclass(frozen=True)
class MailMatch:
    kind: str  # INCOMING, or OUTGOING: sent from one of the account's own addresses
    match: SenderMatch
    # The address to assign to a contact (`gwsync unknown`): the sender, or an outgoing mail's first recipient.
    correspondent: str | None


def resolve_mail(sender: str | None, recipients: list[str], own_addresses: tuple[str, ...],
                 find_contact: Callable[[str], _Contactish | None],
                 find_partner: Callable[[str], _HasId | None]) -> MailMatch:
    """Mail from one of the account's own addresses is outgoing and resolved by its recipients;
    any other by its sender."""
    own = {a.strip().lower() for a in own_addresses}
    if sender and sender.strip().lower() in own:
        return MailMatch(OUTGOING, resolve_recipients(recipients, find_contact, find_partner),
                         recipients[0] if recipients else None)
    return MailMatch(INCOMING, resolve_sender(sender, find_contact, find_partner), sender)


def missing_fields(mandatory: tuple[str, ...], *, partner_id: int | None, contact_id: int | None,
                   subject: str, body: str) -> list[str]:
    """The configured mandatory fields that the activity would lack."""
    present = {
        "partner": partner_id is not None,
        "contact": contact_id is not None,
        "subject": bool(subject.strip()),
        "body": bool(body.strip()),
    }
    return [name for name in mandatory if not present.get(name, False)]


class Step(enum.Enum):
    PROCESS = "process"  # fetch, parse and import (new, held again, or retried after a failure)
    MOVE_ONLY = "move"  # imported already (the run died before the move): just archive it
    SKIP = "skip"  # quarantined after too many failures: leave it for the user
    LEFT_OUT = "left-out"  # left out in a review: it stays in its folder until a review takes it in


def plan_mail(record: MailRecord | None) -> Step:
    if record is None:
        return Step.PROCESS
    if record.outcome == IMPORTED and record.activity_id is not None:
        return Step.MOVE_ONLY
    if record.outcome == QUARANTINED:
        return Step.SKIP
    if record.outcome == LEFT_OUT:
        return Step.LEFT_OUT
    return Step.PROCESS  # held or failed: look again


def failure_outcome(previous_attempts: int, max_attempts: int) -> tuple[str, int]:
    """After one more failed attempt: (outcome, attempts). Quarantined once the bound is hit."""
    attempts = previous_attempts + 1
    return (QUARANTINED if attempts >= max_attempts else FAILED), attempts


__all__ = ["SenderMatch", "resolve_sender", "resolve_recipients", "MailMatch", "resolve_mail", "INCOMING",
           "OUTGOING", "missing_fields", "Step", "plan_mail", "failure_outcome",
           "sender_domain", "HELD", "FAILED", "IMPORTED", "QUARANTINED", "LEFT_OUT"]

"""The pytest tests every `gwsync.crm.CRMBackend` must pass: one test (or a few) per promise in
gwsync/crm.py, written against the public interface only.

Use it by subclassing, with a `backend` fixture that returns a new, empty store (no activities,
contacts or partners) and closes it afterwards:

    pytest.register_assert_rewrite("gwsync.testing.crm_contract")  # in conftest.py: clear failures
    from gwsync.testing.crm_contract import CRMBackendContract

    class TestMyCRM(CRMBackendContract):
        @pytest.fixture
        def backend(self, tmp_path):
            crm = MyCRM(...)
            yield crm
            crm.close()

Activities are created with the backend's own statuses, the kind gwsync's mail import writes
(MAILEIN) and the two kinds in `KINDS`; override `KINDS` with two your CRM accepts. Override the
`expected_statuses` fixture to check `statuses()` against the ones your store was given.
This module imports pytest: only tests import it.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from gwsync.crm import ActivityDraft, ActivityFilter, Attendee, CRMBackend, Document

MAIL_KIND = "MAILEIN"  # what gwsync.mail.importer writes
OUTGOING_MAIL_KIND = "MAILAUS"  # what it writes for mail sent from the account's own address
EDITABLE = ("kind", "status", "subject", "body", "location", "start", "end", "due", "rrule", "contact_id",
            "partner_id", "owner", "unassigned", "participants", "delegated_to", "request", "project", "attendees",
            "private")
CLOCK_SLACK = timedelta(minutes=10)  # how far a backend's clock may be from this machine's


def _utc(text: str | None) -> datetime:
    """A timestamp as crm.py promises it: ISO 8601 with a zero UTC offset."""
    assert text, "timestamp missing"
    value = datetime.fromisoformat(text)
    assert value.utcoffset() == timedelta(0), f"{text!r} is not in UTC"
    return value


def _near_now(text: str | None) -> datetime:
    value = _utc(text)
    assert abs(value - datetime.now(UTC)) < CLOCK_SLACK, f"{text!r} is not now"
    return value


class _ExplodingDocuments(list):
    """A draft's documents that fail while the backend reads them: the write must roll back."""

    def __iter__(self):
        raise RuntimeError("document list fails on purpose (CRMBackendContract)")


class CRMBackendContract:
    """Subclass with a `backend` fixture (see the module doc); pytest collects the tests."""

    KINDS: tuple[str, str] = ("TERMIN", "AUFGABE")  # two kinds other than MAILEIN the CRM accepts

    @pytest.fixture
    def backend(self) -> CRMBackend:
        raise NotImplementedError("a CRMBackendContract subclass must provide the `backend` fixture")

    @pytest.fixture
    def expected_statuses(self) -> dict[str, str] | None:
        """The statuses the store was given; None checks only their form."""
        return None

    # -- helpers -------------------------------------------------------------------------------

    @staticmethod
    def status(backend: CRMBackend, index: int = 0) -> str:
        keys = list(backend.statuses())
        return keys[index % len(keys)]

    def draft(self, backend: CRMBackend, key: str, **fields) -> ActivityDraft:
        """An appointment-like draft, as the calendar sync or the CLI writes one."""
        values: dict[str, Any] = {"kind": self.KINDS[0], "status": self.status(backend), "subject": f"subject of {key}"}
        values.update(fields)
        return ActivityDraft(key=key, **values)

    def mail_draft(self, backend: CRMBackend, key: str, sender: str = "someone@unknown.example",
                   **fields) -> ActivityDraft:
        """A draft as the mail import writes one."""
        values: dict[str, Any] = {
            "kind": MAIL_KIND, "status": self.status(backend), "subject": f"mail {key}", "body": "Hello",
            "sender": sender, "message_id": f"<{key}@mail.example>", "start": "2026-03-02T09:15:00+00:00",
            "source": "alice:INBOX/CRM Erledigt [E]", "owner": "alice"}
        values.update(fields)
        return ActivityDraft(key=key, **values)

    def create(self, backend: CRMBackend, *drafts: ActivityDraft) -> list[int]:
        return backend.create_activities(list(drafts))

    def document(self, backend: CRMBackend, content: bytes, filename: str, **fields) -> Document:
        sha, size = backend.put_document(iter([content]))
        return Document(filename=filename, content_type="application/octet-stream", size=size, sha256=sha,
                        **fields)

    @staticmethod
    def ids(activities) -> list[int]:
        return [a.id for a in activities]

    # -- statuses and identity -----------------------------------------------------------------

    def test_statuses_are_keys_with_labels(self, backend, expected_statuses):
        statuses = backend.statuses()
        assert statuses, "a CRM knows at least one status"
        assert all(isinstance(k, str) and k and isinstance(v, str) for k, v in statuses.items())
        assert backend.statuses() == statuses
        if expected_statuses is not None:
            assert statuses == expected_statuses

    def test_store_id_is_stable(self, backend):
        first = backend.store_id()
        assert first is None or (isinstance(first, str) and first.strip())
        assert backend.store_id() == first
        self.create(backend, self.draft(backend, "store-id"))
        assert backend.store_id() == first

    # -- contacts and partners -----------------------------------------------------------------

    def test_add_contact_and_read_it_back(self, backend):
        partner = backend.add_partner("ACME GmbH", ["info@acme.example"])
        contact = backend.add_contact("Erika Mustermann", "erika@acme.example", partner.id)
        assert contact.name == "Erika Mustermann" and contact.partner_id == partner.id
        assert [e.lower() for e in contact.emails] == ["erika@acme.example"]
        loner = backend.add_contact("Max Einzel", "max@solo.example")
        assert loner.partner_id is None and loner.id != contact.id
        assert backend.get_contact(contact.id) == contact
        assert backend.get_contact(loner.id) == loner
        assert sorted(backend.list_contacts(), key=lambda c: c.id) == sorted([contact, loner], key=lambda c: c.id)

    def test_a_contact_of_an_unknown_partner_is_refused(self, backend):
        with pytest.raises(LookupError):
            backend.add_contact("Nobody", "nobody@nowhere.example", 987654)
        assert backend.list_contacts() == []

    def test_add_partner_and_read_it_back(self, backend):
        acme = backend.add_partner("ACME GmbH", ["info@acme.example", "sales@acme-group.example"])
        other = backend.add_partner("Other AG", [])
        assert acme.name == "ACME GmbH" and acme.id != other.id
        assert sorted(e.lower() for e in acme.emails) == ["info@acme.example", "sales@acme-group.example"]
        assert other.emails == []
        assert backend.get_partner(acme.id) == acme
        assert backend.get_partner(other.id) == other
        assert sorted(backend.list_partners(), key=lambda p: p.id) == sorted([acme, other], key=lambda p: p.id)

    def test_unknown_ids_read_as_none(self, backend):
        contact = backend.add_contact("Erika", "erika@acme.example")
        partner = backend.add_partner("ACME", ["info@acme.example"])
        (activity_id,) = self.create(backend, self.draft(backend, "one"))
        assert backend.get_contact(contact.id + 1000) is None
        assert backend.get_partner(partner.id + 1000) is None
        assert backend.get_activity(activity_id + 1000) is None

    def test_find_contact_by_email_ignores_case_and_surrounding_space(self, backend):
        erika = backend.add_contact("Erika", "Erika.Mustermann@ACME.example")
        joerg = backend.add_contact("Jörg", "jörg@müller.example")
        for address in ("erika.mustermann@acme.example", "ERIKA.MUSTERMANN@ACME.EXAMPLE",
                        "  Erika.Mustermann@acme.example\t", "erika.mustermann@acme.example\n"):
            found = backend.find_contact_by_email(address)
            assert found is not None and found.id == erika.id, address
        for address in ("JÖRG@MÜLLER.EXAMPLE", " Jörg@Müller.example "):
            found = backend.find_contact_by_email(address)
            assert found is not None and found.id == joerg.id, address
        assert backend.find_contact_by_email("erika@acme.example") is None
        assert backend.find_contact_by_email("mustermann@acme.example") is None

    def test_find_contact_by_an_added_address(self, backend):
        erika = backend.add_contact("Erika", "erika@acme.example")
        backend.add_contact_email(erika.id, "E.Mustermann@Private.example")
        found = backend.find_contact_by_email("e.mustermann@private.example ")
        assert found is not None and found.id == erika.id
        assert backend.find_contact_by_email("erika@acme.example").id == erika.id

    def test_add_contact_email_is_idempotent(self, backend):
        erika = backend.add_contact("Erika", "erika@acme.example")
        once = backend.add_contact_email(erika.id, "erika@private.example")
        assert sorted(e.lower() for e in once.emails) == ["erika@acme.example", "erika@private.example"]
        for again in ("erika@private.example", "ERIKA@Private.example", " erika@private.example ",
                      "erika@acme.example"):
            assert backend.add_contact_email(erika.id, again) == once, again
        assert backend.get_contact(erika.id) == once

    def test_add_contact_email_of_an_unknown_contact_is_refused(self, backend):
        with pytest.raises(LookupError):
            backend.add_contact_email(987654, "someone@acme.example")

    def test_find_partner_by_domain_of_exactly_one_partner(self, backend):
        acme = backend.add_partner("ACME", ["info@acme.example", "sales@acme-group.example"])
        backend.add_partner("Other", ["info@other.example"])
        for domain in ("acme.example", "ACME.Example", " acme.example ", "acme-group.example"):
            found = backend.find_partner_by_domain(domain)
            assert found is not None and found.id == acme.id, domain
        assert backend.find_partner_by_domain("other.example").name == "Other"

    def test_find_partner_by_domain_none_or_ambiguous_is_none(self, backend):
        backend.add_partner("Mail Inc", ["a@shared.example"])
        backend.add_partner("Mail Ltd", ["b@shared.example"])
        backend.add_partner("ACME", ["info@acme.example"])
        assert backend.find_partner_by_domain("shared.example") is None  # better unassigned than wrong
        assert backend.find_partner_by_domain("nowhere.example") is None
        assert backend.find_partner_by_domain("example") is None  # a suffix of a domain is not the domain

    def test_find_partner_by_domain_of_one_partner_with_two_addresses_there(self, backend):
        acme = backend.add_partner("ACME", ["info@acme.example", "sales@acme.example"])
        found = backend.find_partner_by_domain("acme.example")
        assert found is not None and found.id == acme.id

    # -- creating activities -------------------------------------------------------------------

    def test_create_returns_ids_in_order(self, backend):
        drafts = [self.draft(backend, f"order-{i}") for i in range(5)]
        ids = backend.create_activities(drafts)
        assert len(ids) == 5 and len(set(ids)) == 5
        assert [backend.get_activity(i).key for i in ids] == [d.key for d in drafts]
        assert backend.create_activities([]) == []

    def test_create_keeps_every_field(self, backend):
        partner = backend.add_partner("ACME", ["info@acme.example"])
        contact = backend.add_contact("Erika", "erika@acme.example", partner.id)
        appointment = self.draft(
            backend, "calendar:alice:uid-1", status=self.status(backend, 1), subject="Kick-off",
            body="Agenda:\n1. Hello\n2. Ümlauts", location="Room 1", contact_id=contact.id, partner_id=partner.id,
            start="2026-12-01T10:00:00[Europe/Berlin]", end="2026-12-01T11:30:00[Europe/Berlin]",
            owner="alice", rrule="FREQ=WEEKLY;COUNT=3", participants=["alice", "bob"], delegated_to="carol",
            request="Anfrage 2026-17", project="Projekt Nord",
            attendees=[Attendee("alice@firma.example", "Alice", employee="alice", organizer=True),
                       Attendee("erika@acme.example", "Erika", contact_id=contact.id, partner_id=partner.id)],
            private=True)
        task = self.draft(backend, "calendar:alice:uid-2", kind=self.KINDS[1], due="2026-12-03", body="")
        mail = self.mail_draft(backend, "mail-1", sender="erika@acme.example", contact_id=contact.id,
                               partner_id=partner.id, body_html="<p>Hello</p>", start="2026-03-02T09:15:00+00:00",
                               sender_name="Mustermann, Erika",
                               recipients_to=["alice@firma.example", "bob@firma.example"],
                               recipients_cc=["jörg@müller.example"])
        unassigned = self.mail_draft(backend, "mail-2", unassigned=True)
        outgoing = self.mail_draft(backend, "mail-3", kind=OUTGOING_MAIL_KIND, sender="alice@firma.example",
                                   sender_name="Alice", recipients_to=["erika@acme.example"], contact_id=contact.id,
                                   partner_id=partner.id)
        drafts = [appointment, task, mail, unassigned, outgoing]
        for draft, activity_id in zip(drafts, backend.create_activities(drafts), strict=True):
            got = backend.get_activity(activity_id)
            assert got.id == activity_id
            for name in ("key", "kind", "status", "subject", "body", "location", "contact_id", "partner_id",
                         "sender", "unassigned", "message_id", "start", "end", "due", "source", "owner", "rrule",
                         "body_html", "sender_name", "recipients_to", "recipients_cc", "participants",
                         "delegated_to", "request", "project", "attendees", "private"):
                assert getattr(got, name) == getattr(draft, name), (draft.key, name)
            assert got.documents == []
            assert isinstance(got.link, str)
            if got.uuid is not None:
                assert isinstance(got.uuid, str) and got.uuid.strip()
            if got.updated_at is not None:
                _near_now(got.updated_at)

    def test_imported_at_is_set_for_imported_mail_only(self, backend):
        mail, outgoing, appointment = self.create(
            backend, self.mail_draft(backend, "mail"), self.mail_draft(backend, "sent", kind=OUTGOING_MAIL_KIND),
            self.draft(backend, "appt"))
        _near_now(backend.get_activity(mail).imported_at)
        _near_now(backend.get_activity(outgoing).imported_at)
        assert backend.get_activity(appointment).imported_at is None

    def test_recipients_and_sender_name_default_to_none_given(self, backend):
        (appointment,) = self.create(backend, self.draft(backend, "no-mail"))
        got = backend.get_activity(appointment)
        assert (got.sender_name, got.recipients_to, got.recipients_cc) == (None, [], [])

    def test_activities_are_json_for_the_cli(self, backend):
        doc = self.document(backend, b"%PDF-1.4 offer", "offer.pdf", category="offer", keyword="2026")
        (activity_id,) = self.create(backend, self.mail_draft(backend, "json", documents=[doc]))
        data = json.loads(json.dumps(backend.get_activity(activity_id).to_dict()))
        assert data["id"] == activity_id and data["documents"][0]["filename"] == "offer.pdf"

    def test_create_is_idempotent_by_key_across_calls(self, backend):
        doc = self.document(backend, b"first", "first.txt")
        (first,) = self.create(backend, self.mail_draft(backend, "mail:alice:1", subject="Original", documents=[doc]))
        before = backend.get_activity(first)
        other = self.document(backend, b"second", "second.txt")
        changed = self.mail_draft(backend, "mail:alice:1", subject="Changed", body="other",
                                  status=self.status(backend, 1), documents=[other], unassigned=True)
        again = backend.create_activities([self.draft(backend, "new-one"), changed])
        assert again[1] == first and again[0] != first
        assert backend.get_activity(first) == before  # nothing changed, not even updated_at
        assert backend.existing_keys(["mail:alice:1"]) == {"mail:alice:1": first}
        assert backend.count_activities(ActivityFilter()) == 2

    def test_create_is_idempotent_by_key_within_one_call(self, backend):
        ids = backend.create_activities([self.draft(backend, "twice", subject="First"),
                                         self.draft(backend, "between"),
                                         self.draft(backend, "twice", subject="Second")])
        assert ids[0] == ids[2] and ids[1] != ids[0]
        assert backend.get_activity(ids[0]).subject == "First"
        assert backend.count_activities(ActivityFilter()) == 2

    def test_create_marked_says_which_drafts_this_call_created(self, backend):
        (first, created), = backend.create_activities_marked([self.draft(backend, "old")])
        assert created
        marked = backend.create_activities_marked([self.draft(backend, "old"), self.draft(backend, "new"),
                                                   self.draft(backend, "new"), self.draft(backend, "other")])
        assert [created for _, created in marked] == [False, True, False, True]
        assert marked[0][0] == first and marked[1][0] == marked[2][0] != marked[3][0]
        assert backend.count_activities(ActivityFilter()) == 3

    def test_create_is_one_transaction(self, backend):
        (kept,) = self.create(backend, self.draft(backend, "kept"))
        doc = self.document(backend, b"content", "a.txt")
        drafts = [self.draft(backend, "new-1"), self.draft(backend, "new-2", documents=[doc]),
                  self.draft(backend, "kept", subject="not applied"),
                  self.draft(backend, "fails", documents=_ExplodingDocuments([doc]))]
        with pytest.raises(Exception):  # noqa: B017 (whichever error the backend turns it into)
            backend.create_activities(drafts)
        assert backend.existing_keys(["new-1", "new-2", "kept", "fails"]) == {"kept": kept}
        assert self.ids(backend.list_activities(ActivityFilter())) == [kept]
        assert backend.get_activity(kept).subject == "subject of kept"
        # and the store still works afterwards
        assert len(self.create(backend, self.draft(backend, "new-1"))) == 1

    def test_create_attaches_documents(self, backend):
        offer = self.document(backend, b"%PDF-1.4 offer", "Angebot 2026.pdf", category="offer", keyword="A-17")
        photo = self.document(backend, b"\x89PNG photo", "photo.png")
        first, second, bare = self.create(backend, self.mail_draft(backend, "docs-1", documents=[offer, photo]),
                                          self.mail_draft(backend, "docs-2", documents=[offer]),
                                          self.mail_draft(backend, "docs-3"))

        def docs(activity):
            return sorted(activity.documents, key=lambda d: (d.filename, d.sha256))

        assert docs(backend.get_activity(first)) == sorted([offer, photo], key=lambda d: (d.filename, d.sha256))
        assert backend.get_activity(second).documents == [offer]  # the same content, shared
        assert backend.get_activity(bare).documents == []
        listed = {a.id: docs(a) for a in backend.list_activities(ActivityFilter())}
        assert listed == {first: docs(backend.get_activity(first)), second: [offer], bare: []}

    # -- keys --------------------------------------------------------------------------------

    def test_existing_keys_across_many_keys(self, backend):
        created = backend.create_activities([self.draft(backend, f"bulk-{i}") for i in range(0, 1300, 2)])
        wanted = {f"bulk-{i}": activity_id for i, activity_id in zip(range(0, 1300, 2), created, strict=True)}
        asked = (f"bulk-{i}" for i in range(1300))  # any iterable, 1300 keys, half of them known
        assert backend.existing_keys(asked) == wanted
        assert backend.existing_keys([]) == {}
        assert backend.existing_keys(["bulk-1", "nothing"]) == {}

    # -- identities ----------------------------------------------------------------------------

    def test_ids_are_never_reused(self, backend):
        first, second, third = self.create(backend, *(self.draft(backend, f"id-{i}") for i in range(3)))
        seen = {first, second, third}
        backend.delete_activity(third)  # the highest id: a plain SQLite rowid would hand it out again
        backend.delete_activity(first)
        for round_ in range(3):
            (new,) = self.create(backend, self.draft(backend, f"new-{round_}"))
            assert new not in seen, f"id {new} given out again"
            seen.add(new)
            backend.delete_activity(new)
        (again,) = self.create(backend, self.draft(backend, "id-2"))  # a deleted key is free again,
        assert again not in seen  # but gets a new id
        assert backend.get_activity(again).key == "id-2"

    def test_uuids_are_distinct_and_never_reused(self, backend):
        ids = self.create(backend, *(self.draft(backend, f"uuid-{i}") for i in range(4)))
        uuids = [backend.get_activity(i).uuid for i in ids]
        if all(u is None for u in uuids):
            pytest.skip("this backend gives activities no uuid")
        assert None not in uuids and len(set(uuids)) == 4
        backend.delete_activity(ids[-1])
        (new,) = self.create(backend, self.draft(backend, "uuid-3"))
        assert backend.get_activity(new).uuid not in uuids
        assert backend.get_activity(ids[0]).uuid == uuids[0]  # stable

    # -- updating and deleting -----------------------------------------------------------------

    def test_update_sets_every_editable_field(self, backend):
        partner = backend.add_partner("ACME", ["info@acme.example"])
        contact = backend.add_contact("Erika", "erika@acme.example", partner.id)
        (activity_id,) = self.create(backend, self.mail_draft(backend, "edit", unassigned=True,
                                                              end="2026-03-02T10:00:00+00:00"))
        changes = {"kind": self.KINDS[1], "status": self.status(backend, 1), "subject": "New subject",
                   "body": "New body", "location": "Room 2", "start": "2026-12-01", "end": None,
                   "due": "2026-12-02T12:00:00+00:00", "rrule": "FREQ=DAILY;COUNT=2", "contact_id": contact.id,
                   "partner_id": partner.id, "owner": "bob", "unassigned": False, "participants": ["bob", "carol"],
                   "delegated_to": "dave", "request": "A-1", "project": "P-2",
                   "attendees": [Attendee("erika@acme.example", "Erika", contact.id, partner.id)], "private": True}
        assert set(changes) == set(EDITABLE)
        before = backend.get_activity(activity_id)
        backend.update_activity(activity_id, changes)
        after = backend.get_activity(activity_id)
        for name, value in changes.items():
            assert getattr(after, name) == value, name
        for name in ("key", "sender", "message_id", "source", "body_html", "imported_at", "uuid", "documents"):
            assert getattr(after, name) == getattr(before, name), name
        backend.update_activity(activity_id, {"subject": "One field only"})
        assert replace(backend.get_activity(activity_id), updated_at=None) == \
            replace(after, subject="One field only", updated_at=None)

    def test_team_fields_are_cleared_and_attendees_given_as_dicts(self, backend):
        (activity_id,) = self.create(backend, self.draft(
            backend, "team", participants=["alice"], delegated_to="bob", request="R", project="P",
            attendees=[Attendee("erika@acme.example")]))
        backend.update_activity(activity_id, {"attendees": [{"email": "otto@other.example", "name": "Otto"}]})
        assert backend.get_activity(activity_id).attendees == [Attendee("otto@other.example", "Otto")]
        backend.update_activity(activity_id, {"participants": [], "delegated_to": None, "request": None,
                                              "project": None, "attendees": []})
        got = backend.get_activity(activity_id)
        assert (got.participants, got.delegated_to, got.request, got.project, got.attendees) == \
            ([], None, None, None, [])
        assert json.loads(json.dumps(got.to_dict()))["attendees"] == []

    def test_participants_are_added_and_removed_once(self, backend):
        (activity_id,) = self.create(backend, self.draft(backend, "with", owner="alice", participants=["alice"]))
        before = backend.get_activity(activity_id)
        assert backend.add_participant(activity_id, "bob") is True
        assert backend.add_participant(activity_id, "bob") is False
        assert backend.get_activity(activity_id).participants == ["alice", "bob"]
        assert backend.remove_participant(activity_id, "alice") is True
        assert backend.remove_participant(activity_id, "alice") is False
        after = backend.get_activity(activity_id)
        assert after.participants == ["bob"]
        assert after.updated_at == before.updated_at  # not an edit of the activity's content
        backend.delete_activity(activity_id)
        for change in (backend.add_participant, backend.remove_participant):
            with pytest.raises(LookupError):
                change(activity_id, "bob")

    def test_update_sets_updated_at(self, backend):
        (activity_id,) = self.create(backend, self.draft(backend, "stamp"))
        created = backend.get_activity(activity_id).updated_at
        time.sleep(1.1)  # a backend may keep whole seconds only
        backend.update_activity(activity_id, {"subject": "changed"})
        updated = _near_now(backend.get_activity(activity_id).updated_at)
        if created is not None:
            assert updated > _utc(created)
            assert backend.get_activity(activity_id).updated_at > created  # compared as text too

    def test_update_of_an_unknown_field_is_refused_and_changes_nothing(self, backend):
        (activity_id,) = self.create(backend, self.draft(backend, "strict"))
        before = backend.get_activity(activity_id)
        for changes in ({"no_such_field": 1}, {"subject": "changed", "no_such_field": 1}, {"id": activity_id + 1},
                        {"subject": "changed", "key": "other-key"}):
            with pytest.raises(ValueError):
                backend.update_activity(activity_id, changes)
        assert backend.get_activity(activity_id) == before

    def test_update_of_a_missing_activity_is_a_lookup_error(self, backend):
        (activity_id,) = self.create(backend, self.draft(backend, "gone"))
        backend.delete_activity(activity_id)
        for changes in ({"subject": "x"}, {}):
            with pytest.raises(LookupError):
                backend.update_activity(activity_id, changes)
        with pytest.raises(LookupError):
            backend.update_activity(activity_id + 1000, {"subject": "x"})
        assert backend.get_activity(activity_id) is None

    def test_delete_is_idempotent(self, backend):
        doc = self.document(backend, b"attached", "a.txt")
        keep, gone = self.create(backend, self.draft(backend, "keep"), self.draft(backend, "gone", documents=[doc]))
        backend.delete_activity(gone)
        assert backend.get_activity(gone) is None
        assert backend.existing_keys(["gone", "keep"]) == {"keep": keep}
        backend.delete_activity(gone)  # again: not an error
        backend.delete_activity(gone + 1000)  # never existed: not an error
        assert self.ids(backend.list_activities(ActivityFilter())) == [keep]

    # -- documents -----------------------------------------------------------------------------

    def test_put_document_returns_sha256_and_size(self, backend):
        content = b"".join(bytes([i % 256]) * 1000 for i in range(300))
        chunks = [content[i:i + 4096] for i in range(0, len(content), 4096)]
        expected = (hashlib.sha256(content).hexdigest(), len(content))
        assert backend.put_document(iter(chunks)) == expected
        assert backend.put_document(iter([content])) == expected  # the same content again: no-op
        assert backend.put_document(iter([])) == (hashlib.sha256(b"").hexdigest(), 0)
        assert backend.put_document(iter([b"other"])) == (hashlib.sha256(b"other").hexdigest(), 5)

    # -- reads behind the CLI and the web view ---------------------------------------------------

    @pytest.fixture
    def population(self, backend):
        """Activities of every sort, with their ids by name."""
        acme = backend.add_partner("ACME", ["info@acme.example"])
        erika = backend.add_contact("Erika", "erika@acme.example", acme.id)
        other = backend.add_partner("Other", ["info@other.example"])
        otto = backend.add_contact("Otto", "otto@other.example", other.id)
        a, b = self.KINDS
        drafts = {
            "mail_erika": self.mail_draft(backend, "m1", sender="erika@acme.example", contact_id=erika.id,
                                          partner_id=acme.id, owner="alice"),
            "mail_unknown": self.mail_draft(backend, "m2", unassigned=True, owner="bob"),
            "appt_alice": self.draft(backend, "c1", kind=a, owner="alice", contact_id=erika.id, partner_id=acme.id),
            "task_bob": self.draft(backend, "c2", kind=b, owner="bob", partner_id=other.id),
            "appt_nobody": self.draft(backend, "c3", kind=a, owner=None, contact_id=otto.id),
            "mail_otto": self.mail_draft(backend, "m3", sender="otto@other.example", contact_id=otto.id,
                                         partner_id=other.id, owner=None),
        }
        ids = dict(zip(drafts, backend.create_activities(list(drafts.values())), strict=True))
        return {**ids, "all": sorted(ids.values()), "acme": acme.id, "erika": erika.id, "other": other.id,
                "otto": otto.id}

    def listed(self, backend, **filter_fields) -> list[int]:
        flt = ActivityFilter(**filter_fields)
        found = self.ids(backend.list_activities(flt))
        assert backend.count_activities(flt) == len(backend.list_activities(replace(flt, limit=None, offset=0)))
        return found

    def test_list_everything_oldest_first(self, backend, population):
        everything = population["all"]
        assert self.listed(backend) == everything
        assert self.listed(backend, newest_first=True) == everything[::-1]
        for activity in backend.list_activities(ActivityFilter()):
            assert activity == backend.get_activity(activity.id)

    def test_list_by_import(self, backend, population):
        p = population
        mails = sorted([p["mail_erika"], p["mail_unknown"], p["mail_otto"]])
        assert self.listed(backend, imported=True) == mails
        assert self.listed(backend, unassigned=True) == [p["mail_unknown"]]
        assert self.listed(backend, imported=True, unassigned=True) == [p["mail_unknown"]]
        now = datetime.now(UTC)
        since = (now - CLOCK_SLACK).isoformat(timespec="seconds")
        assert self.listed(backend, imported_since=since) == mails
        assert self.listed(backend, imported=True, imported_since=since) == mails
        later = (now + timedelta(days=1)).isoformat(timespec="seconds")
        assert self.listed(backend, imported_since=later) == []
        own = backend.get_activity(p["mail_unknown"]).imported_at
        assert p["mail_unknown"] in self.listed(backend, imported_since=own)

    def test_list_by_kind(self, backend, population):
        p = population
        a, b = self.KINDS
        assert self.listed(backend, kind=a) == sorted([p["appt_alice"], p["appt_nobody"]])
        assert self.listed(backend, kind=MAIL_KIND) == sorted([p["mail_erika"], p["mail_unknown"], p["mail_otto"]])
        assert self.listed(backend, kinds=(a, b)) == sorted([p["appt_alice"], p["task_bob"], p["appt_nobody"]])
        assert self.listed(backend, kinds=(b,)) == [p["task_bob"]]
        assert self.listed(backend, kinds=()) == []
        assert self.listed(backend, kind="NO_SUCH_KIND") == []
        assert self.listed(backend, kind=a, kinds=(b,)) == []

    def test_list_by_owner(self, backend, population):
        p = population
        assert self.listed(backend, owners=("alice",)) == sorted([p["mail_erika"], p["appt_alice"]])
        assert self.listed(backend, owners=("alice", "bob")) == \
            sorted([p["mail_erika"], p["appt_alice"], p["mail_unknown"], p["task_bob"]])
        assert self.listed(backend, owners=(None,)) == sorted([p["appt_nobody"], p["mail_otto"]])
        assert self.listed(backend, owners=("bob", None)) == \
            sorted([p["mail_unknown"], p["task_bob"], p["appt_nobody"], p["mail_otto"]])
        assert self.listed(backend, owners=()) == []
        assert self.listed(backend, owners=("carol",)) == []

    def test_list_involving_an_employee(self, backend, population):
        p = population
        a, b = self.KINDS
        ids = self.create(backend, self.draft(backend, "with-carol", kind=a, owner="alice",
                                              participants=["alice", "carol"]),
                          self.draft(backend, "to-carol", kind=b, owner="bob", delegated_to="carol"))
        assert self.listed(backend, involving="carol") == ids
        assert self.listed(backend, involving="alice") == sorted([p["mail_erika"], p["appt_alice"], ids[0]])
        assert self.listed(backend, involving="alice", kind=b) == []
        assert self.listed(backend, involving="nobody") == []

    def test_list_by_partner_and_contact(self, backend, population):
        p = population
        assert self.listed(backend, partner_id=p["acme"]) == sorted([p["mail_erika"], p["appt_alice"]])
        assert self.listed(backend, partner_id=p["other"]) == sorted([p["task_bob"], p["mail_otto"]])
        assert self.listed(backend, contact_id=p["otto"]) == sorted([p["appt_nobody"], p["mail_otto"]])
        assert self.listed(backend, contact_id=p["otto"], partner_id=p["other"]) == [p["mail_otto"]]
        assert self.listed(backend, contact_id=p["erika"], kind=MAIL_KIND) == [p["mail_erika"]]

    def test_list_pages_with_limit_and_offset(self, backend, population):
        everything = self.listed(backend)
        assert len(everything) == 6
        assert self.listed(backend, limit=2) == everything[:2]
        assert self.listed(backend, limit=2, offset=2) == everything[2:4]
        assert self.listed(backend, limit=4, offset=4) == everything[4:]
        assert self.listed(backend, limit=2, offset=10) == []
        assert self.listed(backend, limit=0) == []
        assert self.listed(backend, offset=5) == everything[5:]
        assert self.listed(backend, newest_first=True, limit=2, offset=1) == everything[::-1][1:3]
        assert self.listed(backend, imported=True, limit=1, offset=1) == self.listed(backend, imported=True)[1:2]

    def test_count_ignores_limit_and_offset(self, backend, population):
        assert backend.count_activities(ActivityFilter()) == 6
        assert backend.count_activities(ActivityFilter(limit=1, offset=3)) == 6
        assert backend.count_activities(ActivityFilter(imported=True, limit=1)) == 3
        assert backend.count_activities(ActivityFilter(unassigned=True)) == 1
        assert backend.count_activities(ActivityFilter(kinds=())) == 0

    # -- unknown senders -----------------------------------------------------------------------

    def test_unassigned_senders_counts_by_lower_case_address(self, backend):
        erika = backend.add_contact("Erika", "erika@acme.example")
        self.create(backend,
                    self.mail_draft(backend, "u1", sender="Sam@Unknown.example", unassigned=True),
                    self.mail_draft(backend, "u2", sender="sam@unknown.example", unassigned=True),
                    self.mail_draft(backend, "u3", sender="SAM@UNKNOWN.EXAMPLE", unassigned=True),
                    self.mail_draft(backend, "u4", sender="Jörg@Müller.example", unassigned=True),
                    self.mail_draft(backend, "u5", sender="JÖRG@MÜLLER.EXAMPLE", unassigned=True),
                    self.mail_draft(backend, "u6", sender="ann@unknown.example", unassigned=True),
                    self.mail_draft(backend, "k1", sender="erika@acme.example", contact_id=erika.id),
                    self.draft(backend, "c1"))
        assert backend.unassigned_senders() == {"sam@unknown.example": 3, "jörg@müller.example": 2,
                                                "ann@unknown.example": 1}

    def test_link_activities_from_an_address(self, backend):
        acme = backend.add_partner("ACME", ["info@acme.example"])
        other = backend.add_partner("Other", ["info@other.example"])
        someone = backend.add_contact("Someone", "someone@else.example")
        ids = self.create(backend,
                          self.mail_draft(backend, "l1", sender="Sam@Unknown.example", unassigned=True),
                          self.mail_draft(backend, "l2", sender="sam@unknown.example", unassigned=True,
                                          partner_id=other.id),
                          self.mail_draft(backend, "l3", sender="sam@unknown.example", contact_id=someone.id),
                          self.mail_draft(backend, "l4", sender="ann@unknown.example", unassigned=True))
        sam = backend.add_contact("Sam", "sam@unknown.example", acme.id)
        assert backend.link_activities_from(" SAM@unknown.example", sam.id, acme.id) == 2
        first, second, third, fourth = (backend.get_activity(i) for i in ids)
        assert (first.contact_id, first.partner_id, first.unassigned) == (sam.id, acme.id, False)
        assert (second.contact_id, second.partner_id, second.unassigned) == (sam.id, other.id, False)
        assert third.contact_id == someone.id  # had a contact: untouched
        assert (fourth.contact_id, fourth.unassigned) == (None, True)
        assert backend.unassigned_senders() == {"ann@unknown.example": 1}
        assert backend.link_activities_from("sam@unknown.example", sam.id, acme.id) == 0  # again: nothing to do
        assert backend.link_activities_from("nobody@unknown.example", sam.id, None) == 0

    def test_outgoing_mail_counts_and_links_by_its_first_recipient(self, backend):
        """Unassigned outgoing mail (MAILAUS) is sent by the employee: the address to assign is its
        first recipient (To, then Cc), not the sender."""
        acme = backend.add_partner("ACME", ["info@acme.example"])

        def sent(key, to, cc=(), **fields):
            return self.mail_draft(backend, key, kind=OUTGOING_MAIL_KIND, sender="alice@firma.example",
                                   recipients_to=list(to), recipients_cc=list(cc), unassigned=True, **fields)
        ids = self.create(backend,
                          sent("o1", ["Sam@Unknown.example", "ann@unknown.example"]),
                          sent("o2", [], ["SAM@unknown.example"], partner_id=acme.id),
                          sent("o3", ["ann@unknown.example"], ["sam@unknown.example"]),
                          sent("o4", []),  # no recipient: nobody to assign
                          self.mail_draft(backend, "i1", sender="sam@unknown.example", unassigned=True))
        assert backend.unassigned_senders() == {"sam@unknown.example": 3, "ann@unknown.example": 1}
        sam = backend.add_contact("Sam", "sam@unknown.example", acme.id)
        assert backend.link_activities_from("sam@unknown.example", sam.id, acme.id) == 3
        first, second, third, fourth, incoming = (backend.get_activity(i) for i in ids)
        assert (first.contact_id, first.partner_id, first.unassigned) == (sam.id, acme.id, False)
        assert (second.contact_id, second.partner_id) == (sam.id, acme.id)
        assert (third.contact_id, third.unassigned) == (None, True)  # sent to ann first
        assert fourth.contact_id is None and incoming.contact_id == sam.id
        assert backend.unassigned_senders() == {"ann@unknown.example": 1}

    def test_link_activities_without_a_partner(self, backend):
        (activity_id,) = self.create(backend, self.mail_draft(backend, "np", sender="jörg@müller.example",
                                                              unassigned=True))
        joerg = backend.add_contact("Jörg", "jörg@müller.example")
        assert backend.link_activities_from("JÖRG@MÜLLER.EXAMPLE", joerg.id, None) == 1
        got = backend.get_activity(activity_id)
        assert (got.contact_id, got.partner_id, got.unassigned) == (joerg.id, None, False)

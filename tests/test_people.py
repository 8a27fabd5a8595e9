"""Who an address is (gwsync.people): employees, contacts, partners; pure, over MemoryCRM."""

from hypothesis import given
from hypothesis import strategies as st

from gwsync.config import parse_config
from gwsync.crm import Attendee
from gwsync.people import attendee_list, employees_by_address, organizer_of, resolve_attendees
from gwsync.testing.memory_crm import MemoryCRM


def accounts(**tables):
    config = parse_config({"crm": {"database": "/nonexistent/crm.db"}, "state": {"database": "/nonexistent/s.db"},
                           "accounts": tables})
    return config.accounts


def imap(username):
    return {"imap": {"host": "127.0.0.1", "username": username, "password_env": "X"}}


def crm_with_erika():
    crm = MemoryCRM()
    muster = crm.add_partner("Muster GmbH", ["info@muster.de"])
    other = crm.add_partner("Other AG", ["info@other.org"])
    erika = crm.add_contact("Erika Mustermann", "erika@muster.de", muster.id)
    return crm, muster, other, erika


def resolve(crm, employees, *emails):
    return resolve_attendees([Attendee(e) for e in emails], employees, crm.find_contact_by_email,
                             crm.find_partner_by_domain)


def test_employees_are_the_accounts_addresses_by_default_the_imap_username_when_it_is_one():
    found = employees_by_address(accounts(
        alice=imap("Alice@Example.com") | {"addresses": ["Alice@Example.com", "a.smith@example.com"]},
        bob=imap("bob@example.com"), carol=imap("carol"), dave=imap("dave@x.org") | {"addresses": ["bob@example.com"]},
    ).values())
    # dave's own list replaces his username; the first account keeps an address two list
    assert found == {"alice@example.com": "alice", "a.smith@example.com": "alice", "bob@example.com": "bob"}
    assert "carol" not in found.values()  # a username that is no address is none


def test_an_employee_is_never_a_contact_the_first_external_with_a_contact_gives_contact_and_partner():
    crm, muster, _other, erika = crm_with_erika()
    crm.add_contact("Bob as a contact", "bob@example.com")  # an employee's address also on a contact
    people = resolve(crm, {"bob@example.com": "bob"}, "bob@example.com", "nobody@nowhere.net", "Erika@Muster.DE")
    bob, nobody, found = people.attendees
    assert (bob.employee, bob.contact_id) == ("bob", None)
    assert (nobody.employee, nobody.contact_id, nobody.partner_id) == (None, None, None)
    assert (found.email, found.contact_id, found.partner_id, found.name) == (
        "erika@muster.de", erika.id, muster.id, "Erika Mustermann")  # a contact names an unnamed attendee
    assert (people.contact_id, people.partner_id, people.employees) == (erika.id, muster.id, ["bob"])


def test_without_a_contact_the_first_domain_of_a_partner_gives_the_partner():
    crm, muster, other, _erika = crm_with_erika()
    people = resolve(crm, {}, "x@nowhere.net", "someone@other.org", "else@muster.de")
    assert (people.contact_id, people.partner_id) == (None, other.id)
    assert [a.partner_id for a in people.attendees] == [None, other.id, muster.id]
    assert resolve(crm, {}, "x@nowhere.net") == resolve(crm, {}, "x@nowhere.net")  # and nobody
    assert (resolve(crm, {}).contact_id, resolve(crm, {}).partner_id, resolve(crm, {}).attendees) == (None, None, [])


def test_the_organizer_is_the_one_known_else_the_owner_by_the_first_address():
    accs = accounts(alice=imap("alice") | {"addresses": ["alice@example.com", "alice@old.example"]},
                    carol=imap("carol"))
    erika = Attendee("erika@muster.de", organizer=True)
    assert organizer_of([erika], accs["alice"]) is erika
    assert organizer_of([Attendee("x@y.de")], accs["alice"]) == Attendee("alice@example.com", employee="alice",
                                                                          organizer=True)
    assert organizer_of([], accs["carol"]) is None and organizer_of([], None) is None
    # the list as `--attendee` sets it: organizer first, each address once, known names kept
    known = [Attendee("bob@example.com", "Bob")]
    listed = attendee_list(["B@muster.de", "bob@example.com", "b@muster.de", "alice@example.com"], known,
                           organizer_of([], accs["alice"]))
    assert [(a.email, a.name, a.organizer) for a in listed] == [
        ("alice@example.com", None, True), ("b@muster.de", None, False), ("bob@example.com", "Bob", False)]
    assert attendee_list([], known, organizer_of([], accs["alice"])) == []  # none: no organizer either


@given(st.lists(st.sampled_from(["bob@example.com", "erika@muster.de", "x@muster.de", "y@other.org",
                                 "z@nowhere.net"]), max_size=6))
def test_resolution_follows_the_one_rule_whatever_the_order(emails):
    crm, _muster, _other, _erika = crm_with_erika()
    people = resolve(crm, {"bob@example.com": "bob"}, *emails)
    external = [e for e in emails if e != "bob@example.com"]
    with_contact = [e for e in external if crm.find_contact_by_email(e)]
    if with_contact:
        contact = crm.find_contact_by_email(with_contact[0])
        assert (people.contact_id, people.partner_id) == (contact.id, contact.partner_id)
    else:
        partners = [p for e in external if (p := crm.find_partner_by_domain(e.split("@")[1]))]
        assert people.contact_id is None
        assert people.partner_id == (partners[0].id if partners else None)
    assert people.employees == (["bob"] if "bob@example.com" in emails else [])


def test_the_organizer_counts_after_the_attendees():
    crm, muster, other, erika = crm_with_erika()
    olaf = crm.add_contact("Olaf Other", "olaf@other.org", other.id)
    people = resolve_attendees([Attendee("olaf@other.org", organizer=True), Attendee("erika@muster.de")], {},
                               crm.find_contact_by_email, crm.find_partner_by_domain)
    assert (people.contact_id, people.partner_id) == (erika.id, muster.id)
    assert [a.contact_id for a in people.attendees] == [olaf.id, erika.id]  # the list keeps its order

"""A team on one CRM, on the command line: the seed's assignment fields (owner, "Aktivität mit",
"Delegiert an", "Hauptanfrage", "Hauptprojekt") and a view per employee (`activities --owner`,
`--mine`, the quick searches "mine" and "all"). Two accounts, alice and bob, share the CRM."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import make_mail
from gwsync.crm import ActivityFilter, searches

DONE = "INBOX/CRM Erledigt [E]"


def add_accounts(env, *names: str, source=None) -> None:
    """Give `env`'s config more accounts: copies of `source`'s (default: env's own) alice tables."""
    table = (source or env).config_path.read_text().split("[accounts.alice]", 1)[1]
    table = re.split(r"\n(?=\[accounts\.(?!alice\.))", table)[0]  # alice's tables only
    env.config_path.write_text(env.config_path.read_text() + "".join(
        f"\n[accounts.{name}]" + table.replace("[accounts.alice.", f"[accounts.{name}.") for name in names))


@pytest.fixture
def team(env):
    """alice and bob on one CRM (no server is asked by these commands)."""
    add_accounts(env, "bob")
    return env


def add(env, *args: str) -> dict:
    code, out = env.cli_json("activity", "add", "--kind", "BESPRECHUNG", "--subject", "Runde", *args)
    assert code == 0
    return out


def edit(env, activity_id: int, *args: str) -> dict:
    code, out = env.cli_json("activity", "edit", str(activity_id), *args)
    assert code == 0
    return out


def team_fields(activity: dict) -> tuple:
    return (activity["owner"], activity["participants"], activity["delegated_to"], activity["request"],
            activity["project"])


# -- activity add / edit: the assignment fields ---------------------------------------------------

def test_activity_add_sets_owner_participants_delegate_request_and_project(team):
    added = add(team, "--owner", "alice", "--with", "bob", "--delegate", "bob", "--request", "Anfrage 2026-17",
                "--project", "Wartung Halle 3")
    assert team_fields(added) == ("alice", ["alice", "bob"], "bob", "Anfrage 2026-17", "Wartung Halle 3")
    code, shown = team.cli_json("activity", "show", str(added["id"]))
    assert team_fields(shown) == team_fields(added)  # as stored, not only as printed by add


def test_the_owner_is_always_among_the_participants_once(team):
    assert add(team, "--owner", "bob")["participants"] == ["bob"]
    assert add(team, "--owner", "bob", "--with", "alice", "--with", "bob", "--with", "alice")["participants"] == [
        "bob", "alice"]
    # --account, the older name of --owner, does the same
    assert team_fields(add(team, "--account", "bob", "--with", "alice")) == ("bob", ["bob", "alice"], None, None, None)


def test_activity_edit_replaces_the_participants_and_empty_values_clear(team):
    added = add(team, "--owner", "alice", "--delegate", "bob", "--request", "A-1", "--project", "P-1")
    assert edit(team, added["id"], "--with", "bob")["participants"] == ["alice", "bob"]
    assert edit(team, added["id"], "--subject", "Andere Runde")["participants"] == ["alice", "bob"]  # kept
    assert edit(team, added["id"], "--with", "alice")["participants"] == ["alice"]  # replaced, not added
    edit(team, added["id"], "--with", "bob")
    cleared = edit(team, added["id"], "--with", "", "--delegate", "", "--request", "", "--project", "")
    assert team_fields(cleared) == ("alice", ["alice"], None, None, None)
    assert cleared["subject"] == "Andere Runde"


def test_changing_the_owner_replaces_the_old_owner_among_the_participants(team):
    add_accounts(team, "carol")
    added = add(team, "--owner", "alice", "--with", "carol")
    moved = edit(team, added["id"], "--owner", "bob")
    assert moved["owner"] == "bob" and sorted(moved["participants"]) == ["bob", "carol"]
    # the new owner a participant already: there once; the old one leaves
    both = add(team, "--owner", "alice", "--with", "bob")
    assert team_fields(edit(team, both["id"], "--account", "bob"))[:2] == ("bob", ["bob"])
    # the same owner again changes nothing
    assert edit(team, both["id"], "--owner", "bob")["participants"] == ["bob"]
    # a new owner and a new list at once: the list, with the new owner
    third = add(team, "--owner", "alice")
    assert team_fields(edit(team, third["id"], "--owner", "bob", "--with", "alice"))[:2] == ("bob", ["bob", "alice"])


@pytest.mark.parametrize("option", ["--owner", "--account", "--delegate", "--with"])
def test_an_unknown_employee_is_one_line_naming_it_and_the_known_ones_and_changes_nothing(team, option):
    result = team.cli("activity", "add", "--kind", "TERMIN", "--subject", "x", "--owner", "alice", option, "carol")
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("gwsync: ") and "'carol'" in line and "alice, bob" in line
    assert team.cli_json("activities")[1] == []  # nothing half-created

    added = add(team, "--owner", "alice", "--with", "bob", "--delegate", "bob")
    result = team.cli("activity", "edit", str(added["id"]), "--subject", "neu", option, "carol")
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert "'carol'" in line and "alice, bob" in line
    code, shown = team.cli_json("activity", "show", str(added["id"]))
    assert shown["subject"] == "Runde" and team_fields(shown) == team_fields(added)


def test_an_unknown_activity_is_one_line_for_a_team_edit(team):
    result = team.cli("activity", "edit", "42", "--owner", "bob")
    assert result.exit_code == 1 and result.stderr.splitlines() == [
        "gwsync: no activity with id 42 (see `gwsync activities`)"]


def test_activity_show_prints_the_team_fields(team):
    added = add(team, "--owner", "alice", "--with", "bob", "--delegate", "bob", "--request", "Anfrage 2026-17",
                "--project", "Wartung Halle 3")
    result = team.cli("activity", "show", str(added["id"]))
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    for line in ("owner: alice", "participants: alice, bob", "delegated_to: bob", "request: Anfrage 2026-17",
                 "project: Wartung Halle 3"):
        assert line in lines
    bare = add(team, "--owner", "bob")
    lines = team.cli("activity", "show", str(bare["id"])).stdout.splitlines()
    assert "owner: bob" in lines and "participants: bob" in lines
    assert not any(line.startswith(("delegated_to:", "request:", "project:")) for line in lines)


def test_help_texts_name_the_new_options(team):
    for command in ("add", "edit"):
        text = team.cli("activity", command, "--help").stdout
        for option in ("--owner, --account NAME", "--with NAME", "--delegate NAME", "--request TEXT",
                       "--project TEXT"):
            assert option in text, (command, option)
        assert "repeatable" in text
    assert "clears" in team.cli("activity", "edit", "--help").stdout
    text = " ".join(team.cli("activities", "--help").stdout.split())
    for option in ("--owner NAME", "--mine", "--account NAME"):
        assert option in text
    assert "owner, delegate or participant" in text


# -- activities --owner / --mine ---------------------------------------------------------------------

def test_activities_by_owner_and_mine(team):
    ids = {
        "alice's": add(team, "--owner", "alice")["id"],
        "bob's with alice": add(team, "--owner", "bob", "--with", "alice")["id"],
        "bob's for alice": add(team, "--owner", "bob", "--delegate", "alice")["id"],
        "bob's": add(team, "--owner", "bob")["id"],
    }

    def listed(*args: str) -> set[str]:
        code, items = team.cli_json("activities", *args)
        assert code == 0
        return {name for name, i in ids.items() if i in {a["id"] for a in items}}

    assert listed("--owner", "alice") == {"alice's"}
    assert listed("--owner", "bob") == {"bob's with alice", "bob's for alice", "bob's"}
    assert listed("--mine", "--account", "alice") == {"alice's", "bob's with alice", "bob's for alice"}
    assert listed("--mine", "--account", "bob") == {"bob's with alice", "bob's for alice", "bob's"}
    assert listed("--mine", "--account", "alice", "--owner", "bob") == {"bob's with alice", "bob's for alice"}
    assert listed() == set(ids)  # "all"


def test_activities_mine_needs_the_account_when_there_are_several(team):
    for args, words in ((("--mine",), ("--account", "alice, bob")),
                        (("--owner", "carol"), ("'carol'", "alice, bob")),
                        (("--mine", "--account", "carol"), ("'carol'", "alice, bob")),
                        (("--account", "alice"), ("--account", "--mine"))):
        result = team.cli("activities", *args)
        assert result.exit_code == 2, args
        (line,) = result.stderr.splitlines()
        assert line.startswith("gwsync: ") and all(w in line for w in words), (args, line)


def test_activities_mine_is_the_only_account_when_there_is_one(env):
    mine = add(env)  # one account: the owner is alice
    assert mine["owner"] == "alice"
    code, items = env.cli_json("activities", "--mine")
    assert code == 0 and [a["id"] for a in items] == [mine["id"]]


def test_my_imports_and_my_unassigned_mail_on_two_mailboxes(make_env):
    """Integration: alice and bob each file mail on Dovecot; each sees their own."""
    alice, bob = make_env(), make_env()
    add_accounts(alice, "bob", source=bob)
    with alice.engine() as engine:
        acme = engine.add_partner("ACME", ["info@acme.example"])
        engine.add_contact("Erika", "erika@acme.example", acme.id)
    alice.append(DONE, make_mail(1, sender="erika@acme.example", subject="Alice bekannt"),
                 make_mail(2, sender="fremd@nowhere.example", subject="Alice unbekannt"))
    bob.append(DONE, make_mail(3, sender="erika@acme.example", subject="Bob bekannt"),
               make_mail(4, sender="anders@nowhere.example", subject="Bob unbekannt"))
    code, out = alice.cli_json("sync")
    assert code == 0 and [out["accounts"][n]["mail"]["imported"] for n in ("alice", "bob")] == [2, 2]
    meeting = add(alice, "--owner", "bob", "--with", "alice")

    def subjects(*args: str) -> set[str]:
        code, items = alice.cli_json("activities", *args)
        assert code == 0
        return {a["subject"] for a in items}

    assert subjects("--mine", "--account", "alice") == {"Alice bekannt", "Alice unbekannt", "Runde"}
    assert subjects("--mine", "--account", "alice", "--today") == {"Alice bekannt", "Alice unbekannt"}
    assert subjects("--mine", "--account", "alice", "--unassigned") == {"Alice unbekannt"}
    assert subjects("--mine", "--account", "bob", "--unassigned") == {"Bob unbekannt"}
    assert subjects("--owner", "bob") == {"Bob bekannt", "Bob unbekannt", "Runde"}
    # the web view's searches are the same filters
    with alice.engine() as engine:
        def named(name: str, me: str | None = None) -> set[str]:
            return {a.subject for a in engine.activities(searches.quick_search(name, me=me))}

        assert named("mine-today", "bob") == {"Bob bekannt", "Bob unbekannt"}
        assert named("mine-unassigned", "alice") == {"Alice unbekannt"}
        assert named("mine", "alice") == {"Alice bekannt", "Alice unbekannt", "Runde"}
        assert named("all") == subjects() and len(named("all")) == 5
        assert engine.activity(meeting["id"]).participants == ["bob", "alice"]


# -- the quick searches (pure) -------------------------------------------------------------------------

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def test_quick_searches_mine_and_all_as_filters():
    quick_search, MY_SEARCHES = searches.quick_search, searches.MY_SEARCHES
    today = quick_search("today", now=NOW).imported_since
    assert quick_search("all", now=NOW) == ActivityFilter()
    assert quick_search("mine", me="bob", now=NOW) == ActivityFilter(involving="bob")
    assert quick_search("mine-today", me="bob", now=NOW) == ActivityFilter(imported=True, imported_since=today,
                                                                         involving="bob")
    assert quick_search("mine-unassigned", me="bob", now=NOW) == ActivityFilter(imported=True, unassigned=True,
                                                                              involving="bob")
    # everyone's searches do not depend on who asks
    assert quick_search("unassigned", me="bob") == quick_search("unassigned")
    for name in MY_SEARCHES:
        with pytest.raises(KeyError):
            quick_search(name)  # an employee's search needs the employee
    with pytest.raises(KeyError):
        quick_search("nonsense", me="bob")


def test_searches_for_a_user_lists_theirs_first_then_everyones():
    QUICK_SEARCHES, MY_SEARCHES, searches_for = searches.QUICK_SEARCHES, searches.MY_SEARCHES, searches.searches_for
    assert searches_for(None) == QUICK_SEARCHES
    assert "all" in QUICK_SEARCHES and not set(MY_SEARCHES) & set(QUICK_SEARCHES)
    mine = searches_for("alice")
    assert list(mine) == [*MY_SEARCHES, *QUICK_SEARCHES]
    assert mine["mine-today"] == "My imports today" and mine["mine-unassigned"] == "My unassigned mail"


# -- the Engine's rules, over the in-memory CRM ------------------------------------------------------

TEAM = ("alice", "bob", "carol")


def memory_engine(tmp_path, crm=None):
    from gwsync.config import parse_config
    from gwsync.engine import Engine
    from gwsync.testing.memory_crm import MemoryCRM

    imap = {"host": "127.0.0.1", "username": "u@example.com", "password_env": "UNUSED"}
    config = parse_config({"crm": {"database": str(tmp_path / "crm.db")},
                           "state": {"database": str(tmp_path / "state.db")},
                           "accounts": {name: {"imap": imap} for name in TEAM}})
    return Engine(config, crm=crm or MemoryCRM())


def draft(**fields):
    from gwsync.crm import ActivityDraft

    return ActivityDraft(key=f"crm:{uuid.uuid4()}", kind="TERMIN", status="O",
                         subject="Runde", **fields)


def test_a_new_owner_keeps_a_participant_a_sync_adds_meanwhile(tmp_path):
    """A sync adds its account (atomically) between the edit's read and its write: not lost."""
    from gwsync.testing.memory_crm import MemoryCRM

    class SyncMeanwhile(MemoryCRM):
        joined = False

        def get_activity(self, activity_id):
            found = super().get_activity(activity_id)
            if found is not None and not self.joined:
                self.joined = True
                self.add_participant(activity_id, "carol")  # carol's copy joins right now
            return found

    with memory_engine(tmp_path, SyncMeanwhile()) as engine:
        activity_id = engine.create_activity(draft(owner="alice"))
        engine.crm.joined = False
        engine.update_activity(activity_id, {"owner": "bob"})
        found = engine.activity(activity_id)
        assert found.owner == "bob" and sorted(found.participants) == ["bob", "carol"]


@pytest.mark.parametrize("dies_in", ["remove_participant", "add_participant", "update_activity"])
def test_an_interrupted_owner_change_is_finished_by_running_it_again(tmp_path, dies_in):
    from gwsync.testing.memory_crm import MemoryCRM

    class DiesOnce(MemoryCRM):
        died = False

    def dying(name):
        def method(self, *args):
            if not self.died:
                self.died = True
                raise KeyboardInterrupt  # the process stops right here
            return getattr(MemoryCRM, name)(self, *args)
        return method

    setattr(DiesOnce, dies_in, dying(dies_in))
    with memory_engine(tmp_path, DiesOnce()) as engine:
        engine.crm.died = True  # not while creating
        activity_id = engine.create_activity(draft(owner="alice", participants=["carol"]))
        engine.crm.died = False
        with pytest.raises(KeyboardInterrupt):
            engine.update_activity(activity_id, {"owner": "bob", "subject": "Bei Bob"})
        engine.update_activity(activity_id, {"owner": "bob", "subject": "Bei Bob"})
        found = engine.activity(activity_id)
        assert (found.owner, sorted(found.participants), found.subject) == ("bob", ["bob", "carol"], "Bei Bob")


def test_an_unknown_employee_changes_nothing_in_the_engine(tmp_path):
    from gwsync.errors import UsageError

    with memory_engine(tmp_path) as engine:
        activity_id = engine.create_activity(draft(owner="alice"))
        for changes in ({"owner": "dave"}, {"delegated_to": "dave"}, {"participants": ["bob", "dave"]},
                        {"subject": "x", "owner": "bob", "participants": ["dave"]}):
            with pytest.raises(UsageError, match=r"'dave' is not an employee.*known: alice, bob, carol"):
                engine.update_activity(activity_id, changes)
        found = engine.activity(activity_id)
        assert (found.owner, found.participants, found.delegated_to, found.subject) == ("alice", ["alice"], None,
                                                                                        "Runde")
        with pytest.raises(UsageError, match="delegate 'dave'"):
            engine.create_activity(draft(owner="alice", delegated_to="dave"))
        assert len(engine.activities(ActivityFilter())) == 1


EDITS = st.one_of(
    st.tuples(st.just("owner"), st.sampled_from(TEAM)),
    st.tuples(st.just("participants"), st.lists(st.sampled_from(TEAM), max_size=4)),
    st.tuples(st.just("both"), st.sampled_from(TEAM), st.lists(st.sampled_from(TEAM), max_size=4)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(start=st.lists(st.sampled_from(TEAM), max_size=3), first=st.sampled_from(TEAM),
       edits=st.lists(EDITS, max_size=6))
def test_the_owner_is_always_a_participant_and_only_a_new_owner_alone_drops_the_old(tmp_path_factory, start,
                                                                                      first, edits):
    with memory_engine(tmp_path_factory.mktemp("crm")) as engine:
        activity_id = engine.create_activity(draft(owner=first, participants=start))
        owner, expected = first, {first, *start}
        for edit_ in edits:
            if edit_[0] == "owner":
                expected = (expected - {owner}) | {edit_[1]}
                owner = edit_[1]
                engine.update_activity(activity_id, {"owner": owner})
            else:
                owner = edit_[1] if edit_[0] == "both" else owner
                expected = {owner, *edit_[-1]}
                engine.update_activity(activity_id, {"participants": edit_[-1]}
                                       | ({"owner": owner} if edit_[0] == "both" else {}))
            found = engine.activity(activity_id)
            assert found.owner == owner and set(found.participants) == expected
            assert len(found.participants) == len(expected)  # each once

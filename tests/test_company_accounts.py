"""Accounts kept in the database (`gwsync accounts add/remove/list/import`) beside the config
file's, on SQLite and on PostgreSQL: each becomes a full account through [defaults] (a Dovecot
master user logs in for it), every command sees it, and `status --json` shows each account's
last sync, lag and errors, whichever side it comes from."""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from imapclient import IMAPClient

from conftest import make_mail
from gwsync.cli import main
from gwsync.config import load_config
from gwsync.crm import ActivityFilter
from gwsync.demo.localservers import Dovecot, free_port
from gwsync.engine import Engine

DONE = "INBOX/CRM Erledigt [E]"
ARCHIVE = "INBOX/CRM Archiv"
MASTER, MASTER_PASSWORD = "gwsync", "master-secret"
_numbers = itertools.count(1)


@pytest.fixture(scope="module")
def master_dovecot():
    with Dovecot.start(master_users={MASTER: MASTER_PASSWORD}) as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request):
    """None: the state in an SQLite file; else the URL of a fresh PostgreSQL database."""
    return None if request.param == "sqlite" else request.getfixturevalue("pg_url")


@dataclass
class Site:
    """A company's config: [defaults] with a master user, the config file's account alice, and
    the accounts the tests add to the database."""

    dir: Path
    config_path: Path
    dovecot: Dovecot | None
    tag: str  # makes the users on the shared Dovecot this test's own

    def user(self, name: str) -> str:
        return f"{name}{self.tag}"

    def cli(self, *args: str):
        return CliRunner().invoke(main, ["--config", str(self.config_path), *args], catch_exceptions=False)

    def ok(self, *args: str) -> str:
        result = self.cli(*args)
        assert result.exit_code == 0, result.output
        return result.stdout

    def refused(self, *args: str, code: int = 2) -> str:
        """The one line a refusal prints (no traceback, nothing on stdout)."""
        result = self.cli(*args)
        assert result.exit_code == code, result.output
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("gwsync: "), result.stderr
        return lines[0]

    def json(self, *args: str) -> dict:
        return json.loads(self.ok(*args, "--json"))

    def listed(self) -> dict[str, dict]:
        return {row["name"]: row for row in self.json("accounts", "list")["accounts"]}

    def csv(self, text: str, name: str = "people.csv") -> Path:
        path = self.dir / name
        path.write_text(text)
        return path

    def imap(self, name: str) -> IMAPClient:
        client = IMAPClient("127.0.0.1", port=self.dovecot.port, ssl=False)
        client.login(self.user(name), Dovecot.password_for(self.user(name)))
        return client

    def append(self, name: str, folder: str, raw: bytes) -> None:
        with self.imap(name) as client:
            if not client.folder_exists(folder):
                client.create_folder(folder)
            client.append(folder, raw)

    def count(self, name: str, folder: str) -> int:
        with self.imap(name) as client:
            return client.select_folder(folder, readonly=True)[b"EXISTS"] if client.folder_exists(folder) else 0


def make_site(tmp_path: Path, database: str | None, dovecot: Dovecot | None = None, defaults: bool = True,
              extra: str = "") -> Site:
    tag = f"{os.getpid()}a{next(_numbers)}"
    port = dovecot.port if dovecot is not None else free_port()
    text = f'[database]\nurl = "{database}"\n\n' if database else ""
    text += (f'[crm]\ndatabase = "{tmp_path}/crm.db"\n\n[state]\ndatabase = "{tmp_path}/state.db"\n\n'
             "[sync]\npast_days = 36500\n\n")
    if defaults:
        text += (f'[defaults.imap]\nhost = "127.0.0.1"\nport = {port}\nsecurity = "none"\nimport_root = "INBOX"\n'
                 f'archive_folder = "{ARCHIVE}"\nmaster_user = "{MASTER}"\npassword_env = "GWSYNC_TEST_MASTER"\n\n'
                 '[defaults.caldav]\nurl = "https://dav.example.com/{username}/"\nusername = "davsvc"\n'
                 'password = "service-secret"\n\n')
    text += f'[accounts.alice]\nusername = "alice{tag}"\n' + ("" if defaults else
                                                              f'[accounts.alice.imap]\nhost = "127.0.0.1"\n'
                                                              f'port = {port}\npassword = "pw"\n')
    path = tmp_path / "config.toml"
    path.write_text(text + extra)
    os.environ["GWSYNC_TEST_MASTER"] = MASTER_PASSWORD
    return Site(dir=tmp_path, config_path=path, dovecot=dovecot, tag=tag)


# -- add, list, remove ------------------------------------------------------------------------

def test_add_list_remove(tmp_path, database):
    site = make_site(tmp_path, database)

    added = site.ok("accounts", "add", "bob")
    site.ok("accounts", "add", "carol", "--username", "c.lee", "--email", "Carol@example.com",
            "--areas", "mail,events")

    assert "added account bob (username bob, areas mail)" in added
    listed = site.listed()
    assert {name: (row["username"], row["email"], row["areas"], row["source"]) for name, row in listed.items()} == {
        "alice": (f"alice{site.tag}", None, ["mail"], "config"),
        "bob": ("bob", None, ["mail"], "database"),
        "carol": ("c.lee", "Carol@example.com", ["mail", "events"], "database")}
    assert listed["bob"]["added_at"] and listed["alice"]["added_at"] is None
    text = site.ok("accounts", "list")
    assert "carol\tc.lee\tCarol@example.com\tmail,events\tdatabase" in text.splitlines()

    # The same add again changes nothing; another record under the name is refused.
    assert "nothing changed" in site.ok("accounts", "add", "bob")
    line = site.refused("accounts", "add", "bob", "--username", "robert")
    assert "account bob is in" in line and "username bob" in line
    assert "removed account bob" in site.ok("accounts", "remove", "bob")
    assert sorted(site.listed()) == ["alice", "carol"]
    assert "no account 'bob'" in site.refused("accounts", "remove", "bob")


def test_add_refuses_what_no_account_can_be(tmp_path, database):
    site = make_site(tmp_path, database)

    assert "unknown area 'calendar' (use mail, events, tasks)" in site.refused("accounts", "add", "bob", "--areas",
                                                                              "mail,calendar")
    assert "not a mail address" in site.refused("accounts", "add", "bob", "--email", "bob-at-example")
    assert "not a usable account name" in site.refused("accounts", "add", "bob smith")
    assert "area 'mail' is listed twice" in site.refused("accounts", "add", "bob", "--areas", "mail,mail")
    line = site.refused("accounts", "add", "alice")
    assert "account 'alice' is in the config file ([accounts.alice])" in line
    assert "config file" in site.refused("accounts", "remove", "alice")
    assert sorted(site.listed()) == ["alice"]  # nothing was written


def test_add_without_defaults_says_what_to_configure(tmp_path, database):
    site = make_site(tmp_path, database, defaults=False)

    line = site.refused("accounts", "add", "bob")
    assert "add [defaults.imap] (host and master_user with its password)" in line, line
    assert str(site.config_path) in line
    line = site.refused("accounts", "add", "bob", "--areas", "events")
    assert "[defaults.caldav]" in line and "[defaults.imap]" not in line, line
    assert sorted(site.listed()) == ["alice"]


# -- import -------------------------------------------------------------------------------------

PEOPLE = """\
name,username,email,areas
bob,,bob@example.com,
carol,c.lee,carol@example.com,mail;events
"dave",dave.k,,tasks ; mail
"""


def test_import_is_idempotent(tmp_path, database):
    site = make_site(tmp_path, database)
    path = site.csv(PEOPLE)

    first = site.ok("accounts", "import", str(path))
    before = site.listed()
    again = site.ok("accounts", "import", str(path))

    assert "3 added, 0 changed, 0 unchanged in " in first
    assert "0 added, 0 changed, 3 unchanged" in again
    assert site.listed() == before  # added_at included: nothing was written again
    assert {n: (r["username"], r["email"], r["areas"]) for n, r in before.items() if r["source"] == "database"} == {
        "bob": ("bob", "bob@example.com", ["mail"]),
        "carol": ("c.lee", "carol@example.com", ["mail", "events"]),
        "dave": ("dave.k", None, ["tasks", "mail"])}
    # A file that changes one account changes that one; accounts it lacks stay.
    changed = site.ok("accounts", "import", str(site.csv("name,email\ncarol,carol@example.org\n", "one.csv")))
    assert "0 added, 1 changed, 0 unchanged" in changed
    after = site.listed()
    assert after["carol"]["email"] == "carol@example.org" and after["carol"]["username"] == "carol"
    assert after["carol"]["added_at"] == before["carol"]["added_at"]
    assert after["bob"] == before["bob"] and after["dave"] == before["dave"]


BAD_FILES = {
    "unknown area": ("name,areas\nbob,mail\ncarol,mail;calendar\n", 3, "account carol: unknown area 'calendar'"),
    "a name twice": ("name\nbob\ncarol\nbob\n", 4, "account 'bob' is on line 2 too"),
    "a name of the config file": ("name\nbob\nalice\n", 3, "account 'alice' is in the config file"),
    "an unknown column": ("name,mail\nbob,bob@example.com\n", 1, "unknown column 'mail'"),
    "no name column": ("username,email\nbob,bob@example.com\n", 1, "the header has no column name"),
    "too many fields": ("name,username\nbob,bob,extra\n", 2, "3 fields, but the header has 2"),
    "a bad address": ("name,email\nbob,bob@example.com\ncarol,carol\n", 3, "'carol' is not a mail address"),
    "no name": ("name,username\n,bob\n", 2, "no name"),
    "an area needing [defaults] it lacks": None,  # in its own test below
}


@pytest.mark.parametrize("case", [key for key, value in BAD_FILES.items() if value])
def test_a_bad_row_is_one_line_and_nothing_is_written(tmp_path, database, case):
    text, line, what = BAD_FILES[case]
    site = make_site(tmp_path, database)
    path = site.csv(text)

    said = site.refused("accounts", "import", str(path))

    assert said.startswith(f"gwsync: {path} line {line}: "), said
    assert what in said, said
    assert sorted(site.listed()) == ["alice"]


def test_every_bad_row_is_counted_and_the_good_ones_wait(tmp_path, database):
    site = make_site(tmp_path, database)
    path = site.csv("name,areas\nbob,mail\ncarol,calendar\ndave,mail\neve,mail;mail\n")

    said = site.refused("accounts", "import", str(path))

    assert said.startswith(f"gwsync: {path} line 3: account carol: unknown area 'calendar'"), said
    assert said.endswith("(1 more bad rows after it)"), said
    assert sorted(site.listed()) == ["alice"]


def test_an_import_needing_defaults_the_config_lacks_writes_nothing(tmp_path, database):
    site = make_site(tmp_path, database, defaults=False)
    path = site.csv("name\nbob\n")

    said = site.refused("accounts", "import", str(path))

    assert said.startswith(f"gwsync: {path} line 2: account bob (in the database): accounts kept in the database "
                           "take their servers from [defaults]: add [defaults.imap]"), said
    assert sorted(site.listed()) == ["alice"]


@pytest.mark.parametrize("content, what", [(None, "no such file"), (b"", "is empty"),
                                          (b"name\n\xff\n", "is not UTF-8")])
def test_an_unreadable_file_is_one_line(tmp_path, content, what):
    site = make_site(tmp_path, None)
    path = tmp_path / "people.csv"
    if content is not None:
        path.write_bytes(content)

    assert what in site.refused("accounts", "import", str(path))


# -- the accounts in every command -------------------------------------------------------------

def test_a_name_in_the_file_and_the_database_is_an_error_at_load(tmp_path, database):
    site = make_site(tmp_path, database)
    site.ok("accounts", "add", "bob")
    site.config_path.write_text(site.config_path.read_text() + '\n[accounts.bob]\nusername = "bob"\n')

    for command in (("status",), ("sync",), ("held",)):
        line = site.refused(*command)
        assert "account 'bob' is both in the config file ([accounts.bob]) and in the database" in line, line
    # `gwsync accounts` reads the file alone: it can fix it.
    assert "removed account bob" in site.ok("accounts", "remove", "bob")
    site.ok("status")


def test_a_database_account_syncs_mail_through_the_master_user(tmp_path, database, master_dovecot):
    site = make_site(tmp_path, database, master_dovecot)
    site.ok("accounts", "add", "bob", "--username", site.user("bob"), "--email", "bob@example.com")
    site.ok("accounts", "import", str(site.csv(f"name,username\ncarol,{site.user('carol')}\n")))
    for i, name in enumerate(("alice", "bob", "carol"), 1):
        site.append(name, DONE, make_mail(i, subject=f"Auftrag {name}"))
    before = (master_dovecot.directory / "dovecot.log").read_text(errors="replace")

    out = site.json("sync")
    only = site.json("sync", "--account", "bob")

    for name in ("alice", "bob", "carol"):
        assert out["accounts"][name]["mail"]["imported"] == 1, out
        assert site.count(name, DONE) == 0 and site.count(name, ARCHIVE) == 1
    assert list(only["accounts"]) == ["bob"]
    log = (master_dovecot.directory / "dovecot.log").read_text(errors="replace")[len(before):]
    assert f"Master user logging in as {site.user('bob')}" in log
    with Engine(load_config(site.config_path)) as engine:  # the library sees them too
        owners = sorted((a.owner, a.subject) for a in engine.crm.list_activities(ActivityFilter()))
        assert sorted(engine.config.accounts) == ["alice", "bob", "carol"]
    assert owners == [("alice", "Auftrag alice"), ("bob", "Auftrag bob"), ("carol", "Auftrag carol")]

    status = site.json("status")["accounts"]
    for name, source in (("alice", "config"), ("bob", "database"), ("carol", "database")):
        data = status[name]
        assert data["source"] == source
        assert {"areas", "held", "failed", "locked"} <= set(data)  # the keys status always had
        assert data["last_sync"] == data["areas"]["mail"]["last_sync"] == data["last_success"]
        assert isinstance(data["lag"], int) and 0 <= data["lag"] < 60, data
        assert data["areas"]["mail"]["lag"] == data["lag"] and data["errors"] == []


def test_watch_watches_a_database_account(tmp_path, database, master_dovecot):
    from test_watch import Running

    site = make_site(tmp_path, database, master_dovecot)
    site.ok("accounts", "add", "bob", "--username", site.user("bob"))
    site.append("bob", DONE, make_mail(0))  # the folder exists before watch looks
    watch = Running(site)
    try:
        watch.wait_for(r"syncing alice, bob", 15)
        watch.wait_for(r"IDLE .*on bob", 15)
        site.append("bob", DONE, make_mail(1))
        watch.wait_for(r"bob: imported 1 mail\(s\): \S*/activities/2 ", 15)  # the first round's was 1
    finally:
        assert watch.stop() == 0
    assert site.count("bob", DONE) == 0 and site.count("bob", ARCHIVE) == 2


def test_status_shows_errors_and_no_lag_for_an_account_that_never_synced(tmp_path, database, master_dovecot):
    site = make_site(tmp_path, database, master_dovecot)
    site.ok("accounts", "add", "bob", "--username", site.user("bob"))
    site.ok("accounts", "add", "dora", "--username", site.user("dora"), "--areas", "mail,events")
    site.append("bob", DONE, make_mail(1))
    # alice's own server is down: her table names a port nothing listens on.
    closed = free_port()
    site.config_path.write_text(site.config_path.read_text().replace(
        f'[accounts.alice]\nusername = "alice{site.tag}"\n',
        f'[accounts.alice]\nusername = "alice{site.tag}"\n[accounts.alice.imap]\nport = {closed}\n'))

    result = site.cli("sync", "--account", "alice", "--account", "bob")
    status = site.json("status")["accounts"]

    assert result.exit_code == 1, result.output
    alice, bob, dora = status["alice"], status["bob"], status["dora"]
    assert alice["source"] == "config" and alice["lag"] is None and alice["last_success"] is None
    assert [e["area"] for e in alice["errors"]] == ["mail"] and str(closed) in alice["errors"][0]["error"]
    assert alice["errors"][0]["at"] == alice["last_sync"] is not None
    assert bob["errors"] == [] and isinstance(bob["lag"], int)
    # dora never ran: no last sync, no lag, nothing failed.
    assert dora["source"] == "database" and dora["areas"] == {}
    assert (dora["last_sync"], dora["lag"], dora["errors"]) == (None, None, [])
    text = site.ok("status").splitlines()
    assert "dora: held 0, failed 0 (in the database)" in text
    assert any(line.startswith("bob: held 0, failed 0, lag ") and line.endswith(" s (in the database)")
               for line in text), text


def test_remove_keeps_the_sync_state_unless_purged(tmp_path, database, master_dovecot):
    site = make_site(tmp_path, database, master_dovecot)
    site.ok("accounts", "add", "bob", "--username", site.user("bob"))
    site.append("bob", DONE, make_mail(1))
    assert site.json("sync")["accounts"]["bob"]["mail"]["imported"] == 1

    removed = site.ok("accounts", "remove", "bob")

    assert "its sync state is kept (" in removed and "runs 1" in removed, removed
    assert "`gwsync accounts remove bob --purge` deletes it" in removed
    status = site.json("status")["accounts"]
    assert status["bob"]["source"] is None and status["bob"]["areas"]["mail"]["ok"]  # its runs are kept
    assert "bob" not in site.json("sync")["accounts"]
    purged = site.ok("accounts", "remove", "bob", "--purge")
    assert "account bob is not in" in purged and "its sync state is deleted (" in purged, purged
    assert "bob" not in site.json("status")["accounts"]
    assert "no account 'bob'" in site.refused("accounts", "remove", "bob", "--purge")


# -- the CSV reader (no servers) ------------------------------------------------------------------

NAMES = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9._@+-]{0,20}", fullmatch=True)
AREA_LISTS = st.lists(st.sampled_from(["mail", "events", "tasks"]), unique=True, max_size=3)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(NAMES, st.tuples(st.none() | NAMES, st.none() | st.emails(), AREA_LISTS), max_size=8))
def test_what_a_spreadsheet_writes_reads_back(tmp_path_factory, people):
    """Any accounts written by a CSV writer (quoting as it likes) read back as written."""
    from gwsync.accounts import read_csv

    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["name", "username", "email", "areas"])
    for name, (username, email, areas) in people.items():
        writer.writerow([name, username or "", email or "", ";".join(areas)])
    path = tmp_path_factory.mktemp("csv") / "people.csv"
    path.write_text(out.getvalue())

    if not people:
        assert read_csv(path) == []
        return
    rows = read_csv(path)
    assert [line for line, _ in rows] == list(range(2, len(people) + 2))
    assert {r.name: (r.username, r.email, r.areas) for _, r in rows} == {
        name: (username or name, email, tuple(areas) or ("mail",)) for name, (username, email, areas) in people.items()}


def test_a_header_only_file_and_a_bom_read(tmp_path):
    from gwsync.accounts import BadRecord, read_csv

    path = tmp_path / "people.csv"
    path.write_bytes("\ufeffName,Areas\r\n\r\nbob,MAIL; events\r\n".encode())
    ((line, item),) = read_csv(path)
    assert (line, item.name, item.username, item.areas) == (3, "bob", "bob", ("mail", "events"))
    path.write_text("name,username,email,areas\n")
    assert read_csv(path) == []
    path.write_text('name\n"bob\n')
    with pytest.raises(BadRecord, match="line"):
        read_csv(path)


def test_status_json_gives_the_lag_of_the_config_files_accounts_too(tmp_path, database, master_dovecot):
    """Without any account in the database: the file's accounts get last sync, lag and errors."""
    site = make_site(tmp_path, database, master_dovecot)
    site.append("alice", DONE, make_mail(1))
    assert site.json("sync")["accounts"]["alice"]["mail"]["imported"] == 1

    alice = site.json("status")["accounts"]["alice"]

    assert alice["source"] == "config" and alice["errors"] == []
    assert alice["last_sync"] == alice["last_success"] == alice["areas"]["mail"]["last_success"]
    assert isinstance(alice["lag"], int) and 0 <= alice["lag"] < 60
    assert alice["held"] == 0 and alice["failed"] == 0 and alice["locked"] == []


RECORDS = st.lists(st.tuples(st.sampled_from(["ann", "ben", "cem", "dia"]), NAMES, st.none() | st.emails(), AREA_LISTS),
                   max_size=6)


@settings(max_examples=60, deadline=None)
@given(st.lists(RECORDS, min_size=1, max_size=4))
def test_imports_keep_the_last_word_and_a_second_import_changes_nothing(tmp_path_factory, imports):
    """Any sequence of imports into the state store: each account as the last import gave it,
    added once (its added_at kept), and each import run again changes nothing."""
    from gwsync.storage.state import AccountRecord, StateStore

    store = StateStore(tmp_path_factory.mktemp("state") / "state.db")
    expected: dict[str, tuple] = {}
    added_at: dict[str, str] = {}
    try:
        for rows in imports:
            records = list({name: AccountRecord(name, user, email, tuple(areas) or ("mail",))
                            for name, user, email, areas in rows}.values())  # one row per name, as read_csv
            added, changed = store.save_accounts(records)
            assert set(added) == {r.name for r in records} - set(expected)
            assert set(changed) == {r.name for r in records if r.name in expected and
                                    expected[r.name] != (r.username, r.email, r.areas)}
            assert store.save_accounts(records) == ([], [])
            expected.update((r.name, (r.username, r.email, r.areas)) for r in records)
            stored = {r.name: r for r in store.accounts()}
            assert {name: (r.username, r.email, r.areas) for name, r in stored.items()} == expected
            for name, record in stored.items():
                assert added_at.setdefault(name, record.added_at) == record.added_at
    finally:
        store.close()

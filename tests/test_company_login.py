"""A company's shared credentials against real servers: accounts with no password of their own
log in through [defaults.imap]'s Dovecot master user (USER*MASTER, or SASL PLAIN with an
authorization identity) and through [defaults.caldav]'s CalDAV service user (Radicale, with a
rights file that lets it into every user's calendars). A refused master password is one failed
login on the server, however many accounts use it, and one lock named `defaults.imap`."""

from __future__ import annotations

import itertools
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from imapclient import IMAPClient

from conftest import make_mail
from gwsync.cli import main
from gwsync.crm import ActivityFilter
from gwsync.demo.localservers import Dovecot
from servers.dav import RadicaleServer
from test_watch import Running

DONE = "INBOX/CRM Erledigt [E]"
ARCHIVE = "INBOX/CRM Archiv"
MASTER, MASTER_PASSWORD = "gwsync", "master-secret"
SERVICE = "davsvc"  # the CalDAV service user
# Radicale's rights (type = from_file): the first section whose user and collection match
# decides. The service user reads and writes every collection; everyone else only their own.
RIGHTS = f"""\
[service]
user: {SERVICE}
collection: .*
permissions: RrWw

[root]
user: .+
collection:
permissions: R

[principal]
user: .+
collection: {{user}}
permissions: RW

[calendars]
user: .+
collection: {{user}}/[^/]+
permissions: rw
"""
_numbers = itertools.count(1)


@pytest.fixture(scope="module")
def master_dovecot():
    """A Dovecot with a master passdb: gwsync (password master-secret) logs in as any user."""
    with Dovecot.start(master_users={MASTER: MASTER_PASSWORD}) as server:
        yield server


@pytest.fixture(scope="module")
def service_radicale():
    with RadicaleServer.start(rights=RIGHTS) as server:
        server.add_user(SERVICE)
        yield server


@dataclass
class Company:
    """A config with [defaults] and accounts that have a name and a username, nothing else."""

    dir: Path
    config_path: Path
    usernames: dict[str, str]  # account name -> its user name on the servers
    dovecot: Dovecot | None = None

    def cli(self, *args: str):
        return CliRunner().invoke(main, ["--config", str(self.config_path), *args], catch_exceptions=False)

    def cli_json(self, *args: str):
        result = self.cli(*args, "--json")
        return result.exit_code, json.loads(result.stdout)

    def imap(self, name: str) -> IMAPClient:
        """The user's own login (the test Dovecot's static passdb: pw-USER)."""
        client = IMAPClient("127.0.0.1", port=self.dovecot.port, ssl=False)
        client.login(self.usernames[name], Dovecot.password_for(self.usernames[name]))
        return client

    def append(self, name: str, folder: str, raw: bytes) -> None:
        with self.imap(name) as client:
            if not client.folder_exists(folder):
                client.create_folder(folder)
            client.append(folder, raw)

    def count(self, name: str, folder: str) -> int:
        with self.imap(name) as client:
            if not client.folder_exists(folder):
                return 0
            return client.select_folder(folder, readonly=True)[b"EXISTS"]

    def activities(self) -> list:
        from gwsync.config import load_config
        from gwsync.engine import Engine

        with Engine(load_config(self.config_path)) as engine:
            return engine.crm.list_activities(ActivityFilter())


def company(tmp_path: Path, names: tuple[str, ...], defaults: str, areas: str = '["mail"]') -> Company:
    """Accounts NAMES, each with a fresh user name on the servers (`[accounts.NAME] username`)."""
    n = next(_numbers)
    usernames = {name: f"{name}{os.getpid()}c{n}" for name in names}
    accounts = "".join(f'\n[accounts.{name}]\nusername = "{user}"\nareas = {areas}\n'
                       for name, user in usernames.items())
    path = tmp_path / "config.toml"
    path.write_text(f'[crm]\ndatabase = "{tmp_path}/crm.db"\n\n[state]\ndatabase = "{tmp_path}/state.db"\n\n'
                    f'[sync]\npast_days = 36500\n\n{defaults}\n{accounts}')
    return Company(dir=tmp_path, config_path=path, usernames=usernames)


def imap_defaults(dovecot: Dovecot, extra: str = "") -> str:
    return (f'[defaults.imap]\nhost = "127.0.0.1"\nport = {dovecot.port}\nsecurity = "none"\n'
            f'import_root = "INBOX"\narchive_folder = "{ARCHIVE}"\nmaster_user = "{MASTER}"\n'
            f'password_env = "GWSYNC_TEST_MASTER"\n{extra}')


def dovecot_log(dovecot: Dovecot) -> str:
    return (dovecot.directory / "dovecot.log").read_text(errors="replace")


def failed_logins(dovecot: Dovecot) -> int:
    return sum(1 for line in dovecot_log(dovecot).splitlines() if "auth failed" in line)


def mail_company(tmp_path, master_dovecot, monkeypatch, extra: str = "") -> Company:
    monkeypatch.setenv("GWSYNC_TEST_MASTER", MASTER_PASSWORD)
    staff = company(tmp_path, ("anna", "ben", "cem"), imap_defaults(master_dovecot, extra))
    staff.dovecot = master_dovecot
    for i, name in enumerate(staff.usernames, 1):
        staff.append(name, DONE, make_mail(i, subject=f"Auftrag {name}"))
    return staff


def assert_all_imported(staff: Company, out: dict) -> None:
    for name in staff.usernames:
        assert out["accounts"][name]["mail"]["imported"] == 1, out
        assert staff.count(name, DONE) == 0 and staff.count(name, ARCHIVE) == 1
    owners = sorted((a.owner, a.subject) for a in staff.activities())
    assert owners == [(name, f"Auftrag {name}") for name in sorted(staff.usernames)]


@pytest.mark.parametrize("form", ["separator", "sasl"])
def test_three_accounts_without_passwords_sync_through_the_master_user(tmp_path, master_dovecot, monkeypatch,
                                                                       form):
    staff = mail_company(tmp_path, master_dovecot, monkeypatch,
                         'master_login = "sasl"\n' if form == "sasl" else "")
    before = dovecot_log(master_dovecot)

    code, out = staff.cli_json("sync")

    assert code == 0, out
    assert_all_imported(staff, out)
    # Dovecot logged each login as the master user acting for the account's user.
    new = dovecot_log(master_dovecot)[len(before):]
    for user in staff.usernames.values():
        assert f"Master user logging in as {user}" in new
    assert "auth failed" not in new


def test_the_master_separator_is_configurable(tmp_path, master_dovecot, monkeypatch):
    """Dovecot's separator is "*"; a config saying "%" sends `user%gwsync`, which Dovecot takes
    for an ordinary user name and refuses (the setting reaches the server as written)."""
    staff = mail_company(tmp_path, master_dovecot, monkeypatch, 'master_separator = "%"\n')
    before = failed_logins(master_dovecot)

    result = staff.cli("sync")

    assert result.exit_code == 3, result.output
    assert f"login as '{staff.usernames['anna']}%{MASTER}' refused" in result.stderr
    assert failed_logins(master_dovecot) == before + 1


def test_a_wrong_master_password_is_sent_once_and_locks_every_account(tmp_path, master_dovecot, monkeypatch):
    staff = mail_company(tmp_path, master_dovecot, monkeypatch)
    monkeypatch.setenv("GWSYNC_TEST_MASTER", "wrong-master-password")
    before = failed_logins(master_dovecot)

    first = staff.cli("sync")
    again = staff.cli("sync")

    assert first.exit_code == 3 and again.exit_code == 3, first.output + again.output
    assert failed_logins(master_dovecot) == before + 1  # one refusal, not one per account and run
    assert "Traceback" not in first.stderr + again.stderr
    code, status = staff.cli_json("status")
    for name in staff.usernames:
        (lock,) = status["accounts"][name]["locked"]
        assert lock["service"] == "imap" and lock["unlock"] == "defaults.imap", lock
        assert "gwsync unlock defaults.imap" in " ".join(status["accounts"][name]["areas"]["mail"]["error"].split())
    text = staff.cli("status").stdout
    assert text.count("LOCKED imap (the shared credential defaults.imap)") == 3, text
    # The admin fixes the master password and clears the one lock by its name.
    monkeypatch.setenv("GWSYNC_TEST_MASTER", MASTER_PASSWORD)
    unlocked = staff.cli("unlock", "defaults.imap")
    assert unlocked.exit_code == 0 and "unlocked defaults.imap" in unlocked.stdout, unlocked.output
    time.sleep(2)  # Dovecot's auth penalty for the refused login from this address
    code, out = staff.cli_json("sync")
    assert code == 0, out
    assert_all_imported(staff, out)
    assert failed_logins(master_dovecot) == before + 1


def test_watch_sends_a_refused_master_password_once(tmp_path, master_dovecot, monkeypatch):
    staff = mail_company(tmp_path, master_dovecot, monkeypatch)
    staff.config_path.write_text(staff.config_path.read_text().replace('areas = ["mail"]',
                                                                       'areas = ["mail"]\ninterval = 1'))
    monkeypatch.setenv("GWSYNC_TEST_MASTER", "wrong-master-password")
    before = failed_logins(master_dovecot)
    running = Running(staff)
    try:
        running.wait_for(r"now locked", 20)
        time.sleep(4)  # several intervals of three accounts: each must see the lock, not the server
    finally:
        assert running.stop() == 0
    assert failed_logins(master_dovecot) == before + 1


def test_two_accounts_sync_their_calendars_through_the_caldav_service_user(tmp_path, service_radicale,
                                                                           monkeypatch):
    monkeypatch.setenv("GWSYNC_TEST_DAV_SERVICE", service_radicale.password_for(SERVICE))
    defaults = (f'[defaults.caldav]\nurl = "{service_radicale.url}{{username}}/"\nusername = "{SERVICE}"\n'
                'password_env = "GWSYNC_TEST_DAV_SERVICE"\nevents = "work"\n')
    staff = company(tmp_path, ("anna", "ben"), defaults, areas='["events"]')
    for name, user in staff.usernames.items():
        service_radicale.add_user(user)
        url = service_radicale.make_calendar(user, "work", "VEVENT")
        response = service_radicale.client(user).request(url + "meeting.ics", "PUT", EVENT.format(name=name),
                                                         {"Content-Type": "text/calendar; charset=utf-8"})
        assert response.status in (200, 201, 204)

    code, out = staff.cli_json("sync")

    assert code == 0, out
    assert sorted((a.owner, a.subject) for a in staff.activities()) == [("anna", "Termin anna"),
                                                                        ("ben", "Termin ben")]
    # The logins were the service user's: the users' own passwords appear nowhere in the config.
    assert "dav-" not in staff.config_path.read_text()
    code, again = staff.cli_json("sync")
    assert code == 0 and all(again["accounts"][n]["events"]["created_crm"] == 0 for n in staff.usernames), again


EVENT = ("BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//test//EN\r\nBEGIN:VEVENT\r\nUID:meeting-{name}\r\n"
         "DTSTAMP:20261123T090000Z\r\nDTSTART:20261124T090000Z\r\nDTEND:20261124T100000Z\r\n"
         "SUMMARY:Termin {name}\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n")


def test_idle_connections_that_reconnect_send_a_changed_master_password_once(tmp_path, monkeypatch):
    """The master password changes on the server while `watch` holds IDLE connections for three
    accounts. After the server restarts, every IDLE thread reconnects: the first refusal must
    stop the others, which send the same credential (the interval sync is far off)."""
    with Dovecot.start(master_users={MASTER: MASTER_PASSWORD}) as server:
        staff = mail_company(tmp_path, server, monkeypatch)
        staff.config_path.write_text(staff.config_path.read_text().replace('areas = ["mail"]',
                                                                           'areas = ["mail"]\ninterval = 600'))
        running = Running(staff)
        try:
            idling: set[str] = set()
            while idling != set(staff.usernames):
                line = running.wait_for(r"IDLE (with NOTIFY )?on", 20)  # in any order
                idling.add(re.search(r"IDLE (?:with NOTIFY )?on (\w+)", line)[1])
            (server.directory / "master-users").write_text(f"{MASTER}:{{PLAIN}}changed-on-the-server\n")
            server.restart(same_port=True)
            running.wait_for(r"now locked", 30)
            time.sleep(10)  # the other IDLE threads reconnect within this, past Dovecot's auth penalty (2-5 s)
        finally:
            assert running.stop() == 0
        assert failed_logins(server) == 1, "\n".join(running.seen) + dovecot_log(server)
        code, status = staff.cli_json("status")
        assert all(status["accounts"][n]["locked"][0]["unlock"] == "defaults.imap" for n in staff.usernames)


@pytest.mark.parametrize("form", ["separator", "sasl"])
def test_managesieve_logs_in_through_the_master_user_too(tmp_path, monkeypatch, form):
    """Sieve borrows [imap]'s password, and with it the master user and its login form."""
    with Dovecot.start(sieve=True, master_users={MASTER: MASTER_PASSWORD}) as server:
        monkeypatch.setenv("GWSYNC_TEST_MASTER", MASTER_PASSWORD)
        staff = company(tmp_path, ("anna",), imap_defaults(server, 'master_login = "sasl"\n' if form == "sasl"
                                                                   else ""))
        staff.dovecot = server
        staff.config_path.write_text(staff.config_path.read_text() + f"\n[accounts.anna.sieve]\n"
                                                                       f"port = {server.sieve_port}\n")
        added = staff.cli("rules", "add", "--from", "@acme.example", "CRM Kunde [O]")
        assert added.exit_code == 0, added.output
        server.deliver(staff.usernames["anna"], make_mail(1, sender="einkauf@acme.example"))
        assert staff.count("anna", "INBOX/CRM Kunde [O]") == 1
        assert f"Master user logging in as {staff.usernames['anna']}" in dovecot_log(server)


def test_unlocking_an_account_clears_the_shared_credential_it_sends(tmp_path):
    """No server: the lock as a refused master login leaves it (Engine.lock_refused's record)."""
    from gwsync.config import load_config
    from gwsync.engine import Engine

    staff = company(tmp_path, ("anna", "ben"), imap_defaults(Dovecot(directory=tmp_path, port=143)))
    with Engine(load_config(staff.config_path)) as engine:
        anna = engine.config.account("anna")
        assert engine.credential_name(anna, "imap") == "defaults.imap"
        assert engine.credential(anna, "imap") == engine.credential(engine.config.account("ben"), "imap") \
            == f"{MASTER}@127.0.0.1 (defaults.imap)"
        engine.state.lock("defaults.imap", "imap", "refused", engine.credential(anna, "imap"))
        assert engine.is_locked(engine.config.account("ben"), "imap")
        assert [lock["unlock"] for lock in engine.status()["ben"]["locked"]] == ["defaults.imap"]
        assert engine.unlock("anna") == ["imap (defaults.imap)"]
        assert not engine.is_locked(engine.config.account("ben"), "imap") and engine.locks() == []
    assert staff.cli("unlock", "defaults.imap").stdout == "defaults.imap has no locked credential\n"
    assert staff.cli("unlock", "defaults.caldav").exit_code == 2  # no [defaults.caldav]: unknown name


def test_a_user_the_master_may_not_log_in_as_locks_that_account_only(tmp_path, monkeypatch):
    """NO [AUTHORIZATIONFAILED] (RFC 5530): the master password was right, but the server has no
    such user (or its rules leave it out). That is one account's mistake: locking the master
    credential would stop every account. The account is locked instead, once."""
    monkeypatch.setenv("GWSYNC_TEST_MASTER", MASTER_PASSWORD)
    with Dovecot.start(master_users={MASTER: MASTER_PASSWORD}, denied_users=("ghost",)) as server:
        staff = company(tmp_path, ("ghost", "anna", "ben"), imap_defaults(server))
        staff.config_path.write_text(staff.config_path.read_text().replace(
            f'username = "{staff.usernames["ghost"]}"', 'username = "ghost"'))
        staff.usernames["ghost"] = "ghost"
        staff.dovecot = server
        for name in ("anna", "ben"):
            staff.append(name, DONE, make_mail(1, subject=f"Auftrag {name}"))

        first = staff.cli("sync", "--json")
        second = staff.cli("sync", "--json")

        assert first.exit_code == 3 and second.exit_code == 3, first.output
        out = json.loads(first.stdout)
        assert [out["accounts"][n]["mail"]["imported"] for n in ("anna", "ben")] == [1, 1], out
        line = out["accounts"]["ghost"]["error"]
        assert "may log in, but not as 'ghost'" in line and "gwsync unlock ghost" in line, line
        again = json.loads(second.stdout)["accounts"]
        assert "does not try it again" in again["ghost"]["error"]
        assert again["anna"]["error"] is None and again["ben"]["error"] is None, again
        log = dovecot_log(server)
        assert sum(1 for line in log.splitlines() if "authorization failed" in line) == 1, log
        code, status = staff.cli_json("status")
        assert [lock["unlock"] for lock in status["accounts"]["ghost"]["locked"]] == ["ghost"]
        assert status["accounts"]["anna"]["locked"] == [] and status["accounts"]["ben"]["locked"] == []


def test_managesieve_refusing_the_master_for_one_user_locks_that_account_only(tmp_path, monkeypatch):
    monkeypatch.setenv("GWSYNC_TEST_MASTER", MASTER_PASSWORD)
    with Dovecot.start(sieve=True, master_users={MASTER: MASTER_PASSWORD}, denied_users=("ghost",)) as server:
        staff = company(tmp_path, ("ghost", "anna"), imap_defaults(server))
        text = staff.config_path.read_text().replace(f'username = "{staff.usernames["ghost"]}"', 'username = "ghost"')
        staff.config_path.write_text(text + "".join(f"\n[accounts.{name}.sieve]\nport = {server.sieve_port}\n"
                                                    for name in ("ghost", "anna")))
        refused = staff.cli("rules", "list", "--account", "ghost")
        assert refused.exit_code == 3 and "may log in, but not as 'ghost'" in refused.stderr, refused.output
        listed = staff.cli("rules", "list", "--account", "anna")
        assert listed.exit_code == 0 and listed.stdout == "no rules\n", listed.output
        again = staff.cli("rules", "list", "--account", "ghost")
        assert again.exit_code == 3 and "gwsync unlock ghost" in again.stderr, again.output


def test_a_connection_lost_during_login_locks_nothing(tmp_path, master_dovecot, monkeypatch):
    """A server shutting down answers LOGIN with BYE, or the connection drops: imapclient
    reports both as a LoginError. That is no refused password, and locking the master
    credential for it would stop every account until an admin unlocks it."""
    from faultproxy import CuttingProxy

    with CuttingProxy(master_dovecot.port, cut_after=10**9) as counting:
        IMAPClient("127.0.0.1", port=counting.port, ssl=False).shutdown()  # what comes before LOGIN
        before_login = counting.sent
    staff = mail_company(tmp_path, master_dovecot, monkeypatch)
    # Cut when the server's first byte after that comes: the answer to LOGIN.
    with CuttingProxy(master_dovecot.port, cut_after=before_login + 1) as proxy:
        staff.config_path.write_text(staff.config_path.read_text().replace(
            f"port = {master_dovecot.port}", f"port = {proxy.port}"))
        result = staff.cli("sync")

    # Retried as a connection problem (the proxy then seems gone): exit 1, nothing locked.
    assert result.exit_code == 1, result.output
    assert "login as" not in result.stderr and "locked" not in result.stderr, result.stderr
    code, status = staff.cli_json("status")
    assert all(status["accounts"][name]["locked"] == [] for name in staff.usernames), status

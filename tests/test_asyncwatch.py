"""The asyncio watcher (gwsync.mail.asyncwatch) against real servers: Dovecot (NOTIFY), pymap
(IDLE only), a Dovecot killed and started again, a refused password, and the stop."""

from __future__ import annotations

import asyncio
import itertools
import os
import queue
import re
import signal
import threading
import time
from pathlib import Path

import pytest
from imapclient import IMAPClient

from conftest import make_mail
from gwsync.config import ImapConfig
from gwsync.demo.localservers import Dovecot, Pymap
from gwsync.mail.asyncwatch import WatchStatus, WatchTarget, _Plan, target_of, watch_accounts

DONE = "INBOX/CRM Erledigt [E]"
OPEN = "INBOX/Kunden/CRM Offen [O]"
_users = itertools.count(1)


def fresh_user() -> str:
    return f"aw{os.getpid()}x{next(_users)}"


def target(server, name: str, user: str, password: str | None = None, **imap) -> WatchTarget:
    password = password if password is not None else server.password_for(user)
    cfg = ImapConfig(host="127.0.0.1", port=server.port, security="none", username=user, password=password,
                     **imap)
    return WatchTarget(name=name, imap=cfg, password=password)


def client(server, user: str, password: str | None = None) -> IMAPClient:
    imap = IMAPClient("127.0.0.1", port=server.port, ssl=False, timeout=10)
    imap.login(user, password if password is not None else server.password_for(user))
    return imap


def make_folders(server, user: str, *folders: str, password: str | None = None) -> None:
    imap = client(server, user, password)
    for folder in folders:
        if not imap.folder_exists(folder):
            imap.create_folder(folder)
    imap.logout()


class Watching:
    """watch_accounts in an event loop of its own thread, so that the test's thread can play
    the other mail clients with blocking calls; the calls of changed() land in a queue."""

    def __init__(self, targets: list[WatchTarget], **options):
        self.calls: queue.Queue[tuple[float, str]] = queue.Queue()
        self.refusals: list[tuple[str, str]] = []
        self.status = WatchStatus()
        self.loop = asyncio.new_event_loop()
        self.error: BaseException | None = None
        self.finished = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(targets, options), daemon=True)
        self.thread.start()

    def _run(self, targets, options) -> None:
        asyncio.set_event_loop(self.loop)
        self.stop_event = asyncio.Event()
        try:
            self.loop.run_until_complete(watch_accounts(
                targets, lambda name: self.calls.put((time.monotonic(), name)), self.stop_event,
                refused=lambda name, exc: self.refusals.append((name, str(exc))), status=self.status, **options))
        except BaseException as exc:  # shown by stop()
            self.error = exc
        finally:
            self.finished.set()
            self.loop.close()

    def wait_until(self, what, timeout: float, message: str) -> None:
        deadline = time.monotonic() + timeout
        while not what():
            assert not self.finished.is_set(), f"the watch ended: {self.error!r}"
            assert time.monotonic() < deadline, f"{message}: {self.status.accounts}"
            time.sleep(0.02)

    def wait_idle(self, count: int, timeout: float = 15, connects: int = 1) -> None:
        self.wait_until(lambda: sum(1 for a in self.status.accounts.values()
                                    if a.state == "idle" and a.connects >= connects) >= count,
                        timeout, f"not {count} accounts watching")

    def drain(self, settle: float = 1.0) -> list[str]:
        """Every call until none came for `settle` seconds."""
        seen = []
        while True:
            try:
                seen.append(self.calls.get(timeout=settle)[1])
            except queue.Empty:
                return seen

    def next_call(self, timeout: float) -> tuple[float, str]:
        try:
            return self.calls.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no call of changed() within {timeout} s") from None

    def stop(self, timeout: float = 10) -> float:
        started = time.monotonic()
        if not self.finished.is_set():
            self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the watch did not end on stop_event"
        assert self.error is None, repr(self.error)
        return time.monotonic() - started


@pytest.fixture
def watching():
    started: list[Watching] = []

    def start(targets, **options) -> Watching:
        w = Watching(targets, **options)
        started.append(w)
        return w

    yield start
    for w in started:
        if not w.finished.is_set():
            w.loop.call_soon_threadsafe(w.stop_event.set)
            w.thread.join(10)


def connections_to(port: int) -> int:
    """This process's established TCP connections to `port` on loopback (from /proc)."""
    ours = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            ours.add(target[8:-1])
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[2].split(":")[1], 16) == port and fields[3] == "01" and fields[9] in ours:
            count += 1
    return count


def dovecot_log(server: Dovecot) -> str:
    log = server.directory / "dovecot.log"
    return log.read_text(errors="replace") if log.exists() else ""


# -- with NOTIFY (Dovecot) -------------------------------------------------------------------------

def test_twenty_accounts_in_one_loop_each_append_calls_changed_of_that_account_within_2_s(dovecot, watching):
    users = [fresh_user() for _ in range(20)]
    for user in users:
        make_folders(dovecot, user, DONE, OPEN)
    threads = set(threading.enumerate())  # other tests' threads may end meanwhile: compare by identity
    w = watching([target(dovecot, f"acct{k}", user) for k, user in enumerate(users)])
    w.wait_idle(20)
    assert len(set(threading.enumerate()) - threads) == 1  # the loop's own thread, nothing per account
    assert connections_to(dovecot.port) == 20  # one connection per account
    assert {a.mode for a in w.status.accounts.values()} == {"notify"}  # Dovecot offers NOTIFY
    assert sorted(w.drain()) == sorted(f"acct{k}" for k in range(20))  # one look after connecting
    for k, user in enumerate(users):
        imap = client(dovecot, user)
        appended = time.monotonic()
        imap.append(DONE if k % 2 else OPEN, make_mail(k))
        imap.logout()
        at, name = w.next_call(2)
        assert name == f"acct{k}" and at - appended < 2
        assert w.drain(0.3) == []  # no other account's, and one call per mail
    assert len(set(threading.enumerate()) - threads) == 1
    w.stop()


def test_mail_outside_the_import_folders_calls_nothing_and_a_new_import_folder_is_watched(dovecot, watching):
    user = fresh_user()
    make_folders(dovecot, user, DONE, "INBOX/Privat")
    w = watching([target(dovecot, "alice", user)])
    w.wait_idle(1)
    assert w.drain() == ["alice"]
    imap = client(dovecot, user)
    imap.append("INBOX", make_mail(1))
    imap.append("INBOX/Privat", make_mail(2))
    assert w.drain(2) == []
    imap.create_folder("INBOX/Neu/CRM Neu angelegt [O]")  # made after the watch began
    imap.append("INBOX/Neu/CRM Neu angelegt [O]", make_mail(3))
    imap.logout()
    assert w.next_call(2)[1] == "alice"
    w.stop()


def test_a_burst_of_mail_makes_one_call(dovecot, watching):
    user = fresh_user()
    make_folders(dovecot, user, DONE, OPEN)
    w = watching([target(dovecot, "alice", user)], settle=1.0)
    w.wait_idle(1)
    w.drain()
    imap = client(dovecot, user)
    for n in range(10):
        imap.append(DONE if n % 2 else OPEN, make_mail(n))
    imap.logout()
    assert w.drain(2) == ["alice"]
    w.stop()


def test_idle_is_renewed_and_keeps_watching(dovecot, watching):
    user = fresh_user()
    make_folders(dovecot, user, DONE)
    w = watching([target(dovecot, "alice", user)], renew=0.5)
    w.wait_idle(1)
    w.wait_until(lambda: w.status.accounts["alice"].renewals >= 4, 10, "IDLE not renewed")
    w.drain()
    imap = client(dovecot, user)
    imap.append(DONE, make_mail(1))
    imap.logout()
    assert w.next_call(2)[1] == "alice"
    assert w.status.accounts["alice"].connects == 1  # renewed on the same connection
    w.stop()


def test_the_configured_import_folder_is_made_and_its_own_mail_watched(dovecot, watching):
    user = fresh_user()
    make_folders(dovecot, user, "INBOX")
    w = watching([target(dovecot, "alice", user, import_folder="INBOX/CRM Eingang")])
    w.wait_idle(1)
    w.drain()
    imap = client(dovecot, user)
    assert imap.folder_exists("INBOX/CRM Eingang")
    imap.append("INBOX/CRM Eingang", make_mail(1))
    imap.logout()
    assert w.next_call(2)[1] == "alice"
    w.stop()


@pytest.mark.parametrize("security", ["tls", "starttls"])
def test_over_tls_and_starttls(security, watching):
    with Dovecot.start(tls=True) as server:
        user = fresh_user()
        make_folders(server, user, DONE)
        port = server.tls_port if security == "tls" else server.port
        cfg = ImapConfig(host="127.0.0.1", port=port, security=security, ca_file=str(server.ca_file), username=user,
                         password=server.password_for(user))
        w = watching([WatchTarget(name="alice", imap=cfg, password=server.password_for(user))])
        w.wait_idle(1)
        assert w.status.accounts["alice"].mode == "notify"  # NOTIFY is among the capabilities after login
        w.drain()
        imap = client(server, user)
        imap.append(DONE, make_mail(1))
        imap.logout()
        assert w.next_call(2)[1] == "alice"
        w.stop()


def test_an_account_of_the_config_file_is_watched(env, watching):
    """target_of: the account's [imap] table, its password read from where the config says."""
    env.create(DONE)
    w = watching([target_of(env.config().account("alice"))])
    w.wait_idle(1)
    w.drain()
    env.append(DONE, make_mail(1))
    assert w.next_call(2)[1] == "alice"
    w.stop()


@pytest.mark.parametrize("form", ["sasl", "separator"])
def test_a_master_user_watches_for_the_user(form, watching):
    """A company's shared credential: SASL PLAIN with the user as authorization identity, or
    Dovecot's `user*master` login; the session is the user's."""
    with Dovecot.start(master_users={"gwsync": "master-secret"}) as server:
        user = fresh_user()
        make_folders(server, user, DONE)
        username, authzid = ("gwsync", user) if form == "sasl" else (f"{user}*gwsync", None)
        cfg = ImapConfig(host="127.0.0.1", port=server.port, security="none", username=username,
                         password="master-secret")
        w = watching([WatchTarget(name="alice", imap=cfg, password="master-secret", authzid=authzid)])
        w.wait_idle(1)
        w.drain()
        imap = client(server, user)
        imap.append(DONE, make_mail(1))
        imap.logout()
        assert w.next_call(2)[1] == "alice"
        w.stop()
        wrong = ImapConfig(host="127.0.0.1", port=server.port, security="none", username=username, password="wrong")
        w = watching([WatchTarget(name="alice", imap=wrong, password="wrong", authzid=authzid)])
        w.wait_until(lambda: w.status.count("refused") == 1, 10, "a wrong master password was not refused")
        assert len(w.refusals) == 1
        w.stop()


@pytest.mark.parametrize("form", ["sasl", "separator"])
def test_an_account_of_a_master_user_config_is_watched_as_its_user(form, watching, monkeypatch):
    """The account as the config gives it ([defaults.imap] or [accounts.NAME.imap] with
    master_user, as the worker's watcher gets it): the login goes through the master user, as a
    sync's does."""
    with Dovecot.start(master_users={"gwsync": "master-secret"}) as server:
        users = [fresh_user(), fresh_user()]
        for user in users:
            make_folders(server, user, DONE)
        monkeypatch.setenv("GWSYNC_TEST_WATCH_MASTER", "master-secret")
        cfgs = [ImapConfig(host="127.0.0.1", port=server.port, security="none", username=user,
                           password_env="GWSYNC_TEST_WATCH_MASTER", master_user="gwsync", master_login=form)
                for user in users]
        targets = [WatchTarget(name=f"a{n}", imap=cfg, password="master-secret") for n, cfg in enumerate(cfgs)]
        w = watching(targets)
        w.wait_idle(2)
        w.drain()
        imap = client(server, users[1])
        imap.append(DONE, make_mail(1))
        imap.logout()
        assert w.next_call(2)[1] == "a1"
        w.stop()


@pytest.mark.parametrize("form", ["sasl", "separator"])
def test_accounts_of_a_company_config_watch_through_the_master_user(form, watching):
    """target_of an account that takes [defaults.imap] with a master user (what a worker's
    watcher job watches): it logs in through the master, and a wrong master password is one
    refused login for all the accounts that send it, not one each."""
    from gwsync.config import parse_config

    def accounts(server, password: str, users: list[str]):
        sasl = {"master_login": "sasl"} if form == "sasl" else {}
        config = parse_config({
            "defaults": {"imap": {"host": "127.0.0.1", "port": server.port, "security": "none",
                                  "import_root": "INBOX", "master_user": "gwsync", "password": password, **sasl}},
            "accounts": {f"staff{n}": {"username": u} for n, u in enumerate(users)}})
        return [target_of(config.accounts[f"staff{n}"]) for n in range(len(users))]

    denied = fresh_user()  # the master may not act for this one: that account alone is refused
    with Dovecot.start(master_users={"gwsync": "master-secret"}, denied_users=(denied,)) as server:
        users = [fresh_user() for _ in range(3)]
        for user in users:
            make_folders(server, user, DONE)
        w = watching(accounts(server, "master-secret", [denied, *users]))
        w.wait_idle(3)
        w.wait_until(lambda: w.status.count("refused") == 1, 10, "the denied user was not refused")
        assert [name for name, _ in w.refusals] == ["staff0"]
        assert "may log in, but not as" in w.refusals[0][1], w.refusals[0][1]
        w.drain()
        imap = client(server, users[1])
        imap.append(DONE, make_mail(1))
        imap.logout()
        assert w.next_call(2)[1] == "staff2"
        w.stop()
        w = watching(accounts(server, "wrong", users), max_backoff=0.2)
        w.wait_until(lambda: w.status.count("refused") == 3, 10, "a wrong master password was not refused")
        time.sleep(2)  # time for more logins, if there were any
        assert len(w.refusals) == 1
        assert "gwsync" in w.refusals[0][1], w.refusals[0][1]  # names the login it sent
        failed = [line for line in dovecot_log(server).splitlines() if "auth failed" in line and denied not in line]
        assert len(failed) == 1, failed
        w.stop()


# -- without NOTIFY (pymap) ------------------------------------------------------------------------

def test_without_notify_idle_on_the_first_import_folder_and_polls_for_the_others():
    """pymap has IDLE but no NOTIFY: the one connection IDLEs on the first import folder and
    polls the others (and finds new ones) with LIST and STATUS every `poll_every` seconds."""
    with Pymap.start(user="demo", password="demopass") as server:
        folders = ["INBOX/CRM Kunde 0 [O]", "INBOX/CRM Kunde 1 [O]", "INBOX/CRM Kunde 2 [O]"]
        make_folders(server, "demo", *folders, password="demopass")
        w = Watching([target(server, "alice", "demo", "demopass")], poll_every=3)
        try:
            w.wait_idle(1)
            assert w.status.accounts["alice"].mode == "idle INBOX/CRM Kunde 0 [O]"
            assert connections_to(server.port) == 1
            w.drain()
            imap = client(server, "demo", "demopass")
            appended = time.monotonic()
            imap.append(folders[0], make_mail(1))
            at, name = w.next_call(2)  # IDLE
            assert name == "alice" and at - appended < 2
            w.drain()
            appended = time.monotonic()
            imap.append(folders[2], make_mail(2))
            at, name = w.next_call(3 + 2)  # the next poll
            assert name == "alice" and at - appended < 5
            w.drain()
            imap.create_folder("INBOX/Neu/CRM Neu [E]")
            assert w.next_call(3 + 2)[1] == "alice"  # a new folder may hold mail: look
            w.drain()
            imap.append("INBOX/Neu/CRM Neu [E]", make_mail(3))
            assert w.next_call(3 + 2)[1] == "alice"
            w.drain(0.5)
            imap.append("INBOX", make_mail(4))  # not an import folder
            assert w.drain(4) == []
            imap.logout()
            w.stop()
        finally:
            if not w.finished.is_set():
                w.stop()


# -- failures --------------------------------------------------------------------------------------

def test_a_killed_and_restarted_server_is_watched_again(watching):
    server = Dovecot.start()
    try:
        users = [fresh_user() for _ in range(5)]
        for user in users:
            make_folders(server, user, DONE)
        w = watching([target(server, f"acct{k}", user) for k, user in enumerate(users)], look_at_start=False)
        w.wait_idle(5)
        assert w.drain() == []  # the caller's syncs cover what came before the watch began
        os.killpg(server.proc.pid, signal.SIGKILL)  # no BYE: the connections just break
        server.proc.wait()
        w.wait_until(lambda: w.status.count("idle") == 0, 10, "the broken connections went unnoticed")
        server.restart(same_port=True)
        w.wait_idle(5, timeout=30, connects=2)
        assert sorted(w.drain()) == sorted(f"acct{k}" for k in range(5))  # but not what came while it was down
        imap = client(server, users[3])
        imap.append(DONE, make_mail(1))
        imap.logout()
        assert w.next_call(2)[1] == "acct3"
        w.stop()
    finally:
        server.stop()


def test_a_refused_password_is_reported_once_and_never_sent_again(dovecot, watching):
    """Three accounts send the same wrong credential (as a company's master user would): one
    login is refused, one report, and no account tries it again, however short the backoff.
    The good account beside them is watched as usual."""
    good, shared = fresh_user(), fresh_user()
    make_folders(dovecot, good, DONE)
    bad = [WatchTarget(name=f"staff{n}", imap=ImapConfig(host="127.0.0.1", port=dovecot.port, security="none",
                                                         username=shared, password="wrong"),
                       password="wrong", credential=f"{shared}@127.0.0.1 (defaults.imap)") for n in range(3)]
    w = watching([*bad, target(dovecot, "alice", good)], max_backoff=0.2)
    w.wait_idle(1)
    w.wait_until(lambda: w.status.count("refused") == 3, 10, "the refused accounts go on")
    time.sleep(3)  # time for a retry storm, if there were one
    assert len(w.refusals) == 1
    name, message = w.refusals[0]
    assert name.startswith("staff") and f"login as {shared} refused" in message
    failed = [line for line in dovecot_log(dovecot).splitlines() if "auth failed" in line and f"<{shared}>" in line]
    assert len(failed) == 1, failed
    w.drain()
    imap = client(dovecot, good)
    imap.append(DONE, make_mail(1))
    imap.logout()
    assert w.next_call(2)[1] == "alice"
    w.stop()


def test_a_busy_server_is_not_a_refused_password(watching):
    """[LIMIT] on login (too many sessions of the user) is transient: backoff, no report."""
    server = Dovecot.start(max_userip_connections=1)
    try:
        user = fresh_user()
        make_folders(server, user, DONE)
        phone = client(server, user)  # takes the user's only session
        w = watching([target(server, "alice", user)], max_backoff=0.5)
        w.wait_until(lambda: "LIMIT" in getattr(w.status.accounts.get("alice"), "error", ""), 10,
                     "no [LIMIT] seen")
        phone.logout()
        w.wait_idle(1, timeout=10)
        assert w.refusals == []
        w.stop()
    finally:
        server.stop()


def test_stop_ends_every_connection_with_a_logout(dovecot, watching):
    users = [fresh_user() for _ in range(5)]
    for user in users:
        make_folders(dovecot, user, DONE)
    threads = set(threading.enumerate())
    w = watching([target(dovecot, f"acct{k}", user) for k, user in enumerate(users)])
    w.wait_idle(5)
    assert w.stop() < 3
    assert {a.state for a in w.status.accounts.values()} == {"stopped"}
    assert not set(threading.enumerate()) - threads  # the loop's thread is gone, nothing left behind
    deadline = time.monotonic() + 5
    while connections_to(dovecot.port) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert connections_to(dovecot.port) == 0
    time.sleep(0.5)  # the server writes its log line as the session ends
    text = dovecot_log(dovecot)
    for user in users:  # the session of make_folders, then the watch's: both end with LOGOUT
        ends = re.findall(rf"imap\({user}\).*Disconnected: (Logged out|Connection closed)", text)
        assert ends == ["Logged out", "Logged out"], f"{user}: {ends}"


# -- what the lines of IDLE mean (no server) -------------------------------------------------------

def test_which_idle_lines_wake_with_notify():
    plan = _Plan(notify=True, root="INBOX", delimiter="/", own="")
    assert plan.wakes([b'* STATUS "INBOX/CRM Kunde [O]" (MESSAGES 1 UIDNEXT 2)'])
    assert plan.wakes([b'* STATUS "INBOX/A/CRM Kunde \xc3\x84 [O]" (UIDNEXT 2)'])  # a literal, in UTF-8
    assert not plan.wakes([b'* STATUS "INBOX" (MESSAGES 1 UIDNEXT 2)'])  # INBOX's own mail is not imported
    assert not plan.wakes([b'* STATUS "INBOX/Privat" (MESSAGES 1)', b"* OK Still here", b"* 3 EXPUNGE"])
    assert plan.wakes([b"* OK [NOTIFICATIONOVERFLOW] too much"])
    assert plan.wakes([b"* 4 EXISTS"])
    own = _Plan(notify=True, root="INBOX/CRM Eingang", delimiter="/", own="INBOX/CRM Eingang")
    assert own.wakes([b'* STATUS "INBOX/CRM Eingang" (UIDNEXT 9)'])

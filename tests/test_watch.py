"""`gwsync watch` against a real Dovecot: IDLE, intervals, signals, one instance per state."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from imapclient import IMAPClient

from conftest import make_mail
from gwsync.cli.watcher import Duty, plan
from gwsync.crm import ActivityFilter
from gwsync.demo.localservers import Dovecot, Pymap

DONE = "INBOX/CRM Erledigt [E]"


class Running:
    """A `gwsync watch` child process whose output lines are read as they come."""

    def __init__(self, env, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "gwsync.cli", "--config", str(env.config_path), "-v",
                                      "watch", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.seen.append(line)
            if re.search(pattern, line):
                return line
        raise AssertionError(f"no line matching {pattern!r} within {timeout} s; saw:\n" + "\n".join(self.seen))

    def stop(self, sig=signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


@pytest.fixture
def watching():
    running: list[Running] = []

    def start(env, *args):
        r = Running(env, *args)
        running.append(r)
        return r

    yield start
    for r in running:
        if r.proc.poll() is None:
            r.proc.kill()
            r.proc.wait()


def set_interval(env, seconds: int) -> None:
    env.config_path.write_text(env.config_path.read_text().replace('areas = ["mail"]',
                                                                   f'areas = ["mail"]\ninterval = {seconds}'))


def test_new_mail_is_imported_within_seconds_although_the_interval_is_minutes(env, watching):
    set_interval(env, 600)
    env.create(DONE)
    w = watching(env)
    w.wait_for(r"IDLE with NOTIFY on alice: every import folder below 'INBOX'", 15)  # Dovecot offers NOTIFY
    time.sleep(0.5)
    appended = time.monotonic()
    env.append(DONE, make_mail(1))
    w.wait_for(r"alice: imported 1 mail\(s\): https://crm.example.com/activities/1", 10)
    assert time.monotonic() - appended < 5
    assert w.stop() == 0
    assert env.messages(DONE) == {}


def test_sigterm_during_an_import_leaves_no_duplicate_and_no_lost_mail(env, watching):
    total = 4000
    env.append(DONE, *(make_mail(n) for n in range(total)))
    w = watching(env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # stop it once the first batch is in
        time.sleep(0.05)
        if env.crm_exists():
            with env.engine() as engine:
                if engine.crm.get_activity(1) is not None:
                    break
    assert w.stop(signal.SIGTERM) == 0
    w.wait_for("SIGTERM received", 5)
    with env.engine() as engine:
        partial = len(engine.crm.list_activities(ActivityFilter()))
    assert 0 < partial < total, "the stop did not land mid-import"
    code, out = env.cli_json("sync")
    assert code == 0
    with env.engine() as engine:
        subjects = sorted(a.subject for a in engine.crm.list_activities(ActivityFilter()))
    assert subjects == sorted(f"Test mail {n}" for n in range(total))
    assert env.messages(DONE) == {}


def test_a_second_watch_on_the_same_state_is_refused(env, watching):
    first = watching(env)
    first.wait_for("syncing alice", 10)
    second = subprocess.run([sys.executable, "-m", "gwsync.cli", "--config", str(env.config_path), "watch"],
                            capture_output=True, text=True, timeout=30)
    assert second.returncode == 1
    assert "another gwsync watch" in second.stderr and str(first.proc.pid) in second.stderr
    assert first.proc.poll() is None  # the first one keeps running
    assert first.stop() == 0


def test_new_import_folders_are_picked_up_and_notify_command_runs(env, watching):
    set_interval(env, 1)
    notes = env.dir / "notifications.txt"
    env.config_path.write_text(env.config_path.read_text().replace(
        "[accounts.alice.imap]",
        f'notify_command = ["sh", "-c", "printf \'%s\\\\n\' \\"$0\\" >> {notes}"]\n\n[accounts.alice.imap]'))
    w = watching(env)
    w.wait_for("syncing alice", 10)
    env.append("INBOX/Neu/CRM Neu angelegt [O]", make_mail(7))
    w.wait_for(r"alice: imported 1 mail", 15)
    assert w.stop() == 0
    assert "alice: imported 1 mail(s): https://crm.example.com/activities/1" in notes.read_text()


def test_watch_recovers_after_a_server_restart_without_unlock(make_env, watching):
    server = Dovecot.start()
    try:
        env = make_env()
        env.dovecot = server
        env.config_path.write_text(re.sub(r"port = \d+", f"port = {server.port}", env.config_path.read_text()))
        set_interval(env, 2)
        env.create(DONE)
        w = watching(env)
        w.wait_for(r"IDLE with NOTIFY on alice", 15)
        server.restart(same_port=True)
        env.append(DONE, make_mail(1))
        w.wait_for(r"alice: imported 1 mail", 30)
        assert w.stop() == 0
        code, status = env.cli_json("status")
        assert status["accounts"]["alice"]["locked"] == []
    finally:
        server.stop()


# -- the connection budget ---------------------------------------------------------------------------

class ConnectionCount(threading.Thread):
    """Samples, every 20 ms, how many TCP connections process `pid` holds to `port` on loopback
    (from /proc: the sockets among its file descriptors that /proc/net/tcp shows established)."""

    def __init__(self, pid: int, port: int):
        super().__init__(daemon=True)
        self.pid, self.port = pid, port
        self.most = 0
        self.done = threading.Event()

    def now(self) -> int:
        ours = set()
        for fd in Path(f"/proc/{self.pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                ours.add(target[8:-1])
        count = 0
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            remote_port = int(fields[2].split(":")[1], 16)
            if remote_port == self.port and fields[3] == "01" and fields[9] in ours:  # 01: ESTABLISHED
                count += 1
        return count

    def run(self) -> None:
        while not self.done.wait(0.02):
            try:
                self.most = max(self.most, self.now())
            except (FileNotFoundError, ProcessLookupError):
                return


def on_server(env, server, username: str, password: str) -> None:
    """Point the env's account at another server and login."""
    text = re.sub(r"port = \d+", f"port = {server.port}", env.config_path.read_text())
    text = re.sub(r'username = ".*"', f'username = "{username}"', text)
    text = re.sub(r'password_env = ".*"', f'password = "{password}"', text)
    env.config_path.write_text(text)


def test_twelve_import_folders_on_a_stock_dovecot_stay_within_the_connection_budget(make_env, watching):
    """Dovecot allows 10 connections per user and IP. Watch must leave room for the user's
    other clients, and never be refused (a refusal used to lock the credential)."""
    server = Dovecot.start(max_userip_connections=10)  # Dovecot's own default
    try:
        env = make_env()
        on_server(env, server, env.user, env.password)
        env.dovecot = server
        set_interval(env, 600)
        folders = [f"INBOX/Kunden/CRM Kunde {n:02} [O]" for n in range(12)]
        env.create(*folders)
        w = watching(env)
        count = ConnectionCount(w.proc.pid, server.port)
        count.start()
        w.wait_for(r"IDLE .*on alice", 15)
        time.sleep(1)  # the first sync, woken by the watch, runs now
        phones = []  # the user's phone, with as many connections as the budget leaves (10 - 3)
        for _ in range(7):
            phone = IMAPClient("127.0.0.1", port=server.port, ssl=False, timeout=10)
            phone.login(env.user, env.password)
            phones.append(phone)
        for phone in phones:
            phone.logout()
        for n, folder in enumerate((folders[0], folders[6], folders[11]), start=1):
            appended = time.monotonic()
            env.append(folder, make_mail(n))
            w.wait_for(rf"alice: imported 1 mail\(s\): https://crm.example.com/activities/{n}$", 10)
            assert time.monotonic() - appended < 10
        count.done.set()
        assert w.stop() == 0
        assert not [line for line in w.seen if line.startswith("gwsync:")]
        assert 1 <= count.most <= 2, f"{count.most} connections at once"  # NOTIFY: one watch, one sync
        code, status = env.cli_json("status")
        assert code == 0 and status["accounts"]["alice"]["locked"] == []
    finally:
        server.stop()


def test_without_notify_idle_on_the_budget_and_status_polling_for_the_rest(make_env, watching):
    """pymap has IDLE but no NOTIFY: with max_connections = 2 one connection IDLEs on the first
    import folder and polls the other three with STATUS every 30 s."""
    server = Pymap.start(user="demo", password="demopass")
    try:
        env = make_env()
        on_server(env, server, "demo", "demopass")
        set_interval(env, 600)
        env.config_path.write_text(env.config_path.read_text().replace("[accounts.alice.imap]",
                                                                       "[accounts.alice.imap]\nmax_connections = 2"))
        folders = [f"INBOX/CRM Kunde {n} [O]" for n in range(4)]
        client = IMAPClient("127.0.0.1", port=server.port, ssl=False)
        client.login("demo", "demopass")
        for folder in folders:
            client.create_folder(folder)
        w = watching(env)
        count = ConnectionCount(w.proc.pid, server.port)
        count.start()
        w.wait_for(r"IDLE on alice/INBOX/CRM Kunde 0 \[O\]", 15)
        w.wait_for(r"polling alice: 3 import folder\(s\) every 30 s", 5)
        time.sleep(1)
        appended = time.monotonic()
        client.append(folders[0], make_mail(1))
        w.wait_for(r"alice: imported 1 mail\(s\): https://crm.example.com/activities/1$", 10)
        assert time.monotonic() - appended < 5  # IDLE
        appended = time.monotonic()
        client.append(folders[3], make_mail(2))
        w.wait_for(r"alice: imported 1 mail\(s\): https://crm.example.com/activities/2$", 40)
        assert time.monotonic() - appended < 35  # the next STATUS poll, and the sync it wakes
        count.done.set()
        client.logout()
        assert w.stop() == 0
        assert 1 <= count.most <= 2, f"{count.most} connections at once"
    finally:
        server.stop()


@given(st.lists(st.text(min_size=1), unique=True, max_size=30), st.integers(min_value=-1, max_value=12),
       st.booleans())
def test_plan_stays_within_the_budget_and_covers_every_folder(folders, budget, notify):
    duties = plan(folders, budget, notify, "INBOX", "/")
    assert len(duties) <= max(budget, 0)
    if budget < 1:
        assert duties == []
    elif notify:
        assert duties == [Duty(notify=True, root="INBOX", delimiter="/")]
    else:
        watched = [d.folder for d in duties] + [f for d in duties for f in d.polled]
        assert sorted(watched) == sorted(folders)  # each folder once: by IDLE or by STATUS polling
        assert all(not d.polled for d in duties[:-1])


def test_on_cyrus_a_mail_delivered_through_lmtp_is_imported_within_seconds(cyrus, tmp_path, request, watching):
    """Cyrus has no NOTIFY: watch IDLEs on the import folder. Cyrus sends IDLE notices at once
    only while its idled daemon runs (the fixture's does; without it they came after 56.7 s).
    The mail comes the way real mail comes: LMTP to lmtpd, filed by gwsync's Sieve rule."""
    from conftest import build_env

    env = build_env(cyrus, tmp_path, request)
    text = env.config_path.read_text().replace('archive_folder = "INBOX/CRM Archiv"\n', "")
    env.config_path.write_text(text + f"\n[accounts.alice.sieve]\nport = {cyrus.sieve_port}\n")
    set_interval(env, 600)
    added = env.cli("rules", "add", "--from", "@acme.example", "CRM Kunde [O]")
    assert added.exit_code == 0 and "-> INBOX.CRM Kunde [O]" in added.stdout, added.stdout + added.stderr
    w = watching(env)
    w.wait_for(r"IDLE on alice/INBOX\.CRM Kunde \[O\]", 15)
    time.sleep(0.5)
    delivered = time.monotonic()
    cyrus.deliver(env.user, make_mail(1, sender="einkauf@acme.example"))
    w.wait_for(r"alice: imported 1 mail\(s\): https://crm.example.com/activities/1$", 10)
    assert time.monotonic() - delivered < 5
    assert w.stop() == 0
    assert env.messages("INBOX.CRM Kunde [O]") == {} and len(env.messages("INBOX.CRM Archiv")) == 1


def test_with_notify_news_of_the_import_folder_itself_wakes_the_sync_and_of_the_root_without_one_not():
    with_own = plan(["INBOX/CRM Import"], 2, True, "INBOX/CRM Import", "/", own="INBOX/CRM Import")
    assert with_own == [Duty(notify=True, root="INBOX/CRM Import", delimiter="/", own="INBOX/CRM Import")]
    assert with_own[0].is_import_folder("INBOX/CRM Import")  # its own mail is imported
    assert with_own[0].is_import_folder("INBOX/CRM Import/CRM Kunde [O]")
    (without,) = plan([], 2, True, "INBOX", "/")
    assert not without.is_import_folder("INBOX")  # INBOX's own mail is never imported

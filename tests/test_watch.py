"""`gwsync watch` against a real Dovecot: IDLE, intervals, signals, one instance per state."""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import make_mail
from gwsync.crm import ActivityFilter
from gwsync.demo.localservers import Dovecot

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
    w.wait_for(r"IDLE on alice/INBOX/CRM Erledigt \[E\]", 15)
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
        if (env.dir / "crm.db").exists():
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
        w.wait_for(r"IDLE on alice/", 15)
        server.restart(same_port=True)
        env.append(DONE, make_mail(1))
        w.wait_for(r"alice: imported 1 mail", 30)
        assert w.stop() == 0
        code, status = env.cli_json("status")
        assert status["accounts"]["alice"]["locked"] == []
    finally:
        server.stop()

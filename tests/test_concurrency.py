"""One sync per account at a time: runs started together, `watch` beside `sync`, a busy account,
a killed holder (real Dovecot and Radicale); the lock and its config key as units. The CRM's
"created by this call" (create_activities_marked) is in gwsync/testing/crm_contract.py."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_mail
from gwsync.crm import ActivityDraft, ActivityFilter
from test_watch import Running, set_interval

DONE = "INBOX/CRM Erledigt [E]"
ARCHIVE = "INBOX/CRM Archiv"


def seqs(env, folder: str) -> list[int]:
    return sorted(int(re.search(rb"X-Seq: (\d+)", m["raw"]).group(1)) for m in env.messages(folder).values())


def doubles(numbers: list[int]) -> list[int]:
    return sorted(n for n, count in Counter(numbers).items() if count > 1)


def set_state(env, line: str) -> None:
    """Add a key to the config's [state] table."""
    text = env.config_path.read_text()
    env.config_path.write_text(text.replace('[state]\n', f'[state]\n{line}\n', 1))


def imported_subjects(env) -> list[str]:
    with env.engine() as engine:
        return sorted(a.subject for a in engine.crm.list_activities(ActivityFilter(imported=True)))


def locks(state_database, **kw):
    from gwsync.accountlock import FileAccountLocks

    return FileAccountLocks(state_database, **kw)


def lock_holder(env):
    """The account locks the env's config uses: files, or PostgreSQL's with [database] url."""
    from gwsync.engine import account_locks

    return account_locks(env.config())


# -- runs at the same time ---------------------------------------------------------------------

def test_syncs_started_together_archive_each_mail_once_and_count_only_their_own(env):
    """Cron and a manual run (and a third): before the lock, both moved the same batch at the
    same moment and Dovecot put both copies in the archive; both reported the batch."""
    reports, codes, errors = [], [], []
    for first, count, runs in ((0, 1200, 3), (1200, 1000, 2)):
        env.append(DONE, *(make_mail(n) for n in range(first, first + count)))
        procs = [env.subprocess("sync", "--json") for _ in range(runs)]
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            codes.append(proc.returncode)
            errors.append(err.decode())
            reports.append(json.loads(out)["accounts"]["alice"]["mail"])
    total = 2200
    archived = seqs(env, ARCHIVE)
    assert doubles(archived) == [], f"{len(archived) - len(set(archived))} mails archived twice"
    assert archived == list(range(total)) and env.messages(DONE) == {}
    assert imported_subjects(env) == sorted(f"Test mail {n}" for n in range(total))
    # Each run reports only what it created; together that is every activity, once.
    assert sum(r["imported"] for r in reports) == total, [r["imported"] for r in reports]
    ids = [a["id"] for r in reports for a in r["activities"]]
    assert len(ids) == len(set(ids)) == total
    assert codes == [0] * len(codes), errors


def test_watch_beside_a_sync_loop_archives_each_mail_once(env):
    """Mail keeps arriving; `watch` imports what IDLE announces while `sync` runs in a loop."""
    set_interval(env, 1)
    env.create(DONE)
    total = 1500
    watch = Running(env)
    synced, codes, errors = [], [], []
    try:
        watch.wait_for(r"IDLE with NOTIFY on alice", 15)
        arriving = threading.Thread(target=lambda: [
            (env.append(DONE, *(make_mail(n) for n in range(first, first + 250))), time.sleep(0.5))
            for first in range(0, total, 250)])
        arriving.start()
        deadline = time.monotonic() + 60
        while (arriving.is_alive() or env.messages(DONE)) and time.monotonic() < deadline:
            proc = env.subprocess("sync", "--json")
            out, err = proc.communicate(timeout=120)
            codes.append(proc.returncode)
            errors.append(err.decode())
            synced.append(json.loads(out)["accounts"]["alice"]["mail"]["imported"])
        arriving.join()
    finally:
        assert watch.stop() == 0
    watch.wait_for("gwsync watch: stopped", 10)
    by_watch = [int(m.group(1)) for m in (re.search(r"alice: imported (\d+) mail", l) for l in watch.seen) if m]
    archived = seqs(env, ARCHIVE)
    assert doubles(archived) == [], f"{len(archived) - len(set(archived))} mails archived twice"
    assert archived == list(range(total)) and env.messages(DONE) == {}
    assert imported_subjects(env) == sorted(f"Test mail {n}" for n in range(total))
    assert sum(by_watch) + sum(synced) == total, (by_watch, synced)
    assert set(codes) == {0}, errors
    assert not [line for line in watch.seen if line.startswith("gwsync:")]


def test_watch_skips_a_busy_round_quietly_and_tries_again_soon(env):
    """The interval is 10 minutes: the import after the other run lets go comes from the retry."""
    set_interval(env, 600)
    env.append(DONE, make_mail(1))
    watch = None
    try:
        with lock_holder(env).hold("alice", "sync"):
            watch = Running(env)
            watch.wait_for(rf"account alice: gwsync sync \(pid {os.getpid()}\) has it; trying again in 5 s", 20)
            watch.wait_for(r"IDLE with NOTIFY on alice", 15)  # its look at the folder finds the account busy too
            watch.wait_for(r"account alice: .* has it; trying again", 5)
            assert seqs(env, DONE) == [1]
        released = time.monotonic()
        watch.wait_for(r"alice: imported 1 mail", 15)
        assert time.monotonic() - released < 8
    finally:
        if watch is not None:
            assert watch.stop() == 0
    assert seqs(env, ARCHIVE) == [1]
    assert not [line for line in watch.seen if line.startswith("gwsync:")]


# -- a busy account ----------------------------------------------------------------------------

def add_account(env, other, name: str) -> None:
    """Give `env`'s config a second account: `other`'s mail user."""
    table = other.config_path.read_text().split("[accounts.alice]", 1)[1]
    env.config_path.write_text(env.config_path.read_text() + f"\n[accounts.{name}]" +
                               table.replace("[accounts.alice.", f"[accounts.{name}."))


def test_a_busy_account_is_one_line_and_exit_1_and_the_other_accounts_still_sync(make_env):
    env, other = make_env(), make_env()
    add_account(env, other, "bob")
    set_state(env, "lock_wait = 1")
    env.append(DONE, make_mail(1), make_mail(2))
    other.append(DONE, make_mail(3))
    before = env.messages(DONE)
    with lock_holder(env).hold("alice", "sync"):
        started = time.monotonic()
        proc = env.subprocess("sync")
        out, err = proc.communicate(timeout=60)
        waited = time.monotonic() - started
    assert proc.returncode == 1
    (line,) = err.decode().splitlines()
    assert line.startswith("gwsync: account alice is busy: gwsync sync (pid ") and f"pid {os.getpid()})" in line
    assert "waited 1 s" in line
    assert 1 <= waited < 10
    assert "bob: imported 1 mail(s)" in out.decode() and "alice:" not in out.decode()
    assert env.messages(DONE) == before and env.messages(ARCHIVE) == {}  # alice: nothing changed
    assert seqs(other, ARCHIVE) == [3] and imported_subjects(env) == ["Test mail 3"]
    code, status = env.cli_json("status")
    assert status["accounts"]["alice"]["areas"] == {}  # the busy run is not recorded as a failed sync
    # Free again: alice syncs.
    proc = env.subprocess("sync")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    assert "alice: imported 2 mail(s)" in out.decode() and seqs(env, ARCHIVE) == [1, 2]


def test_the_lock_is_released_when_its_holder_is_killed(env):
    set_state(env, "lock_wait = 0")
    total = 1500
    env.append(DONE, *(make_mail(n) for n in range(total)))
    held_by = lock_holder(env)
    proc = env.subprocess("sync")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        if (held_by.holder("alice") or "").endswith(f"(pid {proc.pid})"):
            break
        time.sleep(0.02)
    else:
        proc.kill()
        pytest.fail("the sync never took the account's lock")
    time.sleep(0.2)  # inside the import
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed while it held the lock, not after it ended
    if env.database_url is None:  # the file names the dead holder; PostgreSQL dropped its lock with its session
        assert locks(env.dir / "state.db").path_for("alice").read_text().startswith(f"{proc.pid} ")
    # No wait at all (lock_wait = 0): a lock the dead process still held would fail this run.
    again = env.subprocess("sync")
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, err.decode()
    assert seqs(env, ARCHIVE) == list(range(total)) and env.messages(DONE) == {}
    assert imported_subjects(env) == sorted(f"Test mail {n}" for n in range(total))


def test_push_unpush_and_review_wait_for_a_busy_account_then_say_so(make_env):
    env = make_env(areas=("mail", "tasks"))
    set_state(env, "lock_wait = 0.2")
    with env.engine() as engine:
        (activity_id,) = engine.crm.create_activities([ActivityDraft(
            key="mail:x", kind="MAILEIN", status="O", subject="Bitte Angebot schicken")])
    env.append(DONE, make_mail(1))
    with lock_holder(env).hold("alice", "watch"):
        pushed = env.cli("push", str(activity_id), "--as", "task")
        reviewed = env.cli("review", input="mail\n\ny\n")
    assert pushed.exit_code == 1 and env.dav_items("tasks") == {}
    assert pushed.stderr.startswith("gwsync: account alice is busy: gwsync watch (pid ")
    assert len(pushed.stderr.splitlines()) == 1
    assert reviewed.exit_code == 1, reviewed.stdout + reviewed.stderr
    assert reviewed.stderr.startswith("gwsync: account alice is busy: gwsync watch (pid ")
    assert seqs(env, DONE) == [1] and imported_subjects(env) == []
    with env.engine() as engine:  # push did not half happen: the activity is not marked for the tasks
        assert engine.state.memberships("alice", "tasks") == {} and engine.state.links_of_activity(activity_id) == []
    assert env.cli("push", str(activity_id), "--as", "task").exit_code == 0
    assert len(env.dav_items("tasks")) == 1
    with lock_holder(env).hold("alice", "sync"):
        unpushed = env.cli("unpush", str(activity_id))
    assert unpushed.exit_code == 1 and "account alice is busy: gwsync sync (pid" in unpushed.stderr
    assert len(env.dav_items("tasks")) == 1
    assert env.cli("unpush", str(activity_id)).exit_code == 0 and env.dav_items("tasks") == {}


# -- identical copies ---------------------------------------------------------------------------

def test_identical_copies_in_one_batch_make_one_activity_and_one_archived_mail(env):
    """Two byte-identical copies (a mail copied back twice, say) used to be archived both; the
    second copy is now handled like mail the CRM already has: dropped when its twin is archived."""
    env.append(DONE, make_mail(1), make_mail(1), make_mail(2))
    code, out = env.cli_json("sync")
    assert code == 0
    mail = out["accounts"]["alice"]["mail"]
    assert mail["imported"] == 2 and len(mail["activities"]) == 2
    assert seqs(env, ARCHIVE) == [1, 2] and env.messages(DONE) == {}
    assert imported_subjects(env) == ["Test mail 1", "Test mail 2"]


# -- the lock itself ---------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=300), st.text(min_size=1, max_size=300))
def test_lock_files_are_single_safe_names_next_to_the_state_database_one_per_account(a, b):
    state = Path("/srv/gw/state.db")
    pa, pb = locks(state).path_for(a), locks(state).path_for(b)
    for path in (pa, pb):
        assert path.parent == state.parent
        assert path.name.startswith("state.db.account-") and path.name.endswith(".lock")
        assert len(path.name.encode()) <= 255 and re.fullmatch(r"[A-Za-z0-9._~-]+", path.name)
    assert (pa == pb) == (a == b)
    assert locks(state).path_for("watch") != Path("/srv/gw/state.db.watch.lock")


def test_lock_files_of_look_alike_account_names_differ():
    names = ["alice", "a b", "a_b", "a/b", "a\\b", "..", ".", "a~b", "Alice", "ä", "a" * 64, "a" * 65, "a" * 400]
    paths = [locks(Path("/srv/gw/state.db")).path_for(n) for n in names]
    assert len(set(paths)) == len(names)
    assert paths[0] == Path("/srv/gw/state.db.account-alice.lock")  # a plain name stays readable


@pytest.mark.parametrize("value, ok", [(0, True), (2.5, True), (-1, False), ("10", False), (True, False),
                                       (float("nan"), False), (86401, False)])
def test_lock_wait_in_the_config(value, ok):
    from gwsync.config import ConfigError, parse_config

    if ok:
        assert parse_config({"state": {"lock_wait": value}}).state.lock_wait == value
    else:
        with pytest.raises(ConfigError, match=r"state\.lock_wait"):
            parse_config({"state": {"lock_wait": value}})
    assert parse_config({}).state.lock_wait == 60


def test_the_wait_is_bounded_and_names_the_holder_and_the_lock_is_free_after_the_block(tmp_path):
    from gwsync.accountlock import AccountBusy

    first, second = locks(tmp_path / "state.db"), locks(tmp_path / "state.db", wait=0.3)
    with first.hold("alice", "watch"):
        started = time.monotonic()
        with pytest.raises(AccountBusy) as busy, second.hold("alice", "sync"):
            pass
        assert 0.3 <= time.monotonic() - started < 2
        assert str(busy.value).startswith(f"account alice is busy: gwsync watch (pid {os.getpid()})")
        assert "\n" not in str(busy.value)
        with second.hold("bob", "sync"):  # other accounts are free
            pass
    with pytest.raises(RuntimeError), second.hold("alice", "sync"):
        raise RuntimeError("a sync that failed")
    with first.hold("alice", "sync", wait=0):  # released on the exception too
        pass


def test_a_waiting_run_gets_the_lock_as_soon_as_the_holder_lets_go(tmp_path):
    waiting = locks(tmp_path / "state.db", wait=10)
    held = threading.Event()
    release = threading.Event()

    def holder():
        with locks(tmp_path / "state.db").hold("alice", "sync"):
            held.set()
            release.wait(5)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(5)
    threading.Timer(0.5, release.set).start()
    started = time.monotonic()
    with waiting.hold("alice", "sync"):
        waited = time.monotonic() - started
    thread.join()
    assert 0.4 <= waited < 2


def test_the_lock_is_released_when_a_holding_process_is_killed(tmp_path):
    script = ("import sys, time; from pathlib import Path; from gwsync.accountlock import FileAccountLocks\n"
              "with FileAccountLocks(Path(sys.argv[1])).hold('alice', 'sync'):\n"
              "    print('held', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "state.db")], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        from gwsync.accountlock import AccountBusy

        second = locks(tmp_path / "state.db", wait=0)
        with pytest.raises(AccountBusy, match=f"pid {proc.pid}"), second.hold("alice", "sync"):
            pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with locks(tmp_path / "state.db", wait=0).hold("alice", "sync"):
        pass

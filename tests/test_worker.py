"""`gwsync worker` on a real PostgreSQL and Dovecot: worker processes started as a user would,
mail appended over IMAP, the CRM and the mailboxes read afterwards.

Procrastinate's stalled-worker timeout is shortened through the config ([worker] stalled_after),
so a killed worker's jobs come back within seconds instead of 30."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
from imapclient import IMAPClient

from conftest import company_config, make_mail, pg_rows, wait_until
from gwsync.accountlock import PgAccountLocks, advisory_key
from gwsync.config import load_config
from gwsync.crm import ActivityFilter
from gwsync.engine import Engine

IMPORT = "INBOX/CRM Kunde [O]"
ARCHIVE = "INBOX/CRM Archiv"
_users = itertools.count(1)
_mails = itertools.count(1)


class Company:
    """Accounts on the suite's Dovecot, one config on a fresh PostgreSQL database, workers."""

    def __init__(self, dovecot, pg_url: str, root: Path, accounts: int, interval: int = 3600,
                 worker: str = "", lock_wait: float = 60, database: str = ""):
        self.dovecot = dovecot
        self.url = pg_url
        self.root = root
        self.users = [f"w{os.getpid()}x{next(_users)}" for _ in range(accounts)]
        self.workers: list[subprocess.Popen] = []
        text = (f'[database]\nurl = "{pg_url}"\n{database}\n\n[crm]\ndatabase = "{root}/crm.db"\n\n'
                f'[state]\ndatabase = "{root}/state.db"\nlock_wait = {lock_wait}\n\n'
                f"[worker]\ntick = 1\nstalled_after = 5\nmax_backoff = 2\n{worker}\n")
        for user in self.users:
            env_name = f"GWSYNC_TEST_PW_{user.upper()}"
            os.environ[env_name] = dovecot.password_for(user)
            text += (f'[accounts.{user}]\ninterval = {interval}\n\n[accounts.{user}.imap]\nhost = "127.0.0.1"\n'
                     f'port = {dovecot.port}\nsecurity = "none"\nusername = "{user}"\npassword_env = "{env_name}"\n'
                     f'import_root = "INBOX"\narchive_folder = "{ARCHIVE}"\n\n')
        self.config_path = root / "config.toml"
        self.config_path.write_text(text)
        for user in self.users:
            with self.imap(user) as client:
                client.create_folder(IMPORT)

    def imap(self, user: str) -> IMAPClient:
        client = IMAPClient("127.0.0.1", port=self.dovecot.port, ssl=False)
        client.login(user, self.dovecot.password_for(user))
        return client

    def append(self, user: str, count: int = 1) -> list[str]:
        """`count` new mails into the import folder; their Message-IDs."""
        numbers = [next(_mails) + 100000 for _ in range(count)]
        with self.imap(user) as client:
            if count > 1:
                client.multiappend(IMPORT, [make_mail(n) for n in numbers])
            else:
                client.append(IMPORT, make_mail(numbers[0]))
        return [f"<m{n}@example.org>" for n in numbers]

    def archived(self, user: str) -> list[bytes]:
        """The Message-ID headers of the mail in the archive folder."""
        with self.imap(user) as client:
            if not client.folder_exists(ARCHIVE):
                return []
            client.select_folder(ARCHIVE, readonly=True)
            uids = client.search(["ALL"])
            if not uids:
                return []
            data = client.fetch(uids, ["BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"])
            return [d[b"BODY[HEADER.FIELDS (MESSAGE-ID)]"].strip() for d in data.values()]

    def activities(self) -> list:
        with Engine(load_config(self.config_path)) as engine:
            return engine.activities(ActivityFilter())

    def start_worker(self, *args: str) -> subprocess.Popen:
        n = len(self.workers)
        with open(self.root / f"worker{n}.out", "wb") as out, open(self.root / f"worker{n}.err", "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "gwsync.cli", "-v", "--config", str(self.config_path), "worker", *args],
                stdout=out, stderr=err, start_new_session=True)
        self.workers.append(proc)
        return proc

    def log(self, n: int) -> str:
        return (self.root / f"worker{n}.err").read_text(errors="replace")

    def query(self, sql: str, *params) -> list[tuple]:
        return pg_rows(self.url, sql, *params)

    def wait_for(self, what, timeout: float, message: str):
        def check_workers() -> None:
            for n, proc in enumerate(self.workers):
                if proc.poll() is not None and proc.returncode not in (-9,):
                    raise AssertionError(f"worker {n} exited with {proc.returncode}: {self.log(n)[-3000:]}")

        return wait_until(what, timeout, message, check_workers, lambda: "worker logs:\n" + "\n".join(
            self.log(n)[-2000:] for n in range(len(self.workers))))

    def stop(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def sync_runs(self) -> list[tuple[str, object, object]]:
        """(account, started, ended) of every finished run of a sync job, from Procrastinate's events."""
        return self.query(
            "SELECT j.args->>'account', s.at, e.at FROM procrastinate_jobs j "
            "JOIN procrastinate_events s ON s.job_id = j.id AND s.type = 'started' "
            "JOIN LATERAL (SELECT min(at) AS at FROM procrastinate_events x WHERE x.job_id = j.id AND x.at >= s.at "
            "  AND x.type IN ('succeeded', 'failed', 'cancelled', 'aborted', 'deferred_for_retry')) e ON true "
            "WHERE j.task_name = 'gwsync.sync' AND e.at IS NOT NULL ORDER BY 1, 2")


@pytest.fixture
def company(dovecot, pg_url, tmp_path):
    made: list[Company] = []

    def factory(accounts: int, **kw) -> Company:
        made.append(Company(dovecot, pg_url, tmp_path, accounts, **kw))
        return made[-1]

    yield factory
    for c in made:
        c.stop()


def _no_overlap(runs) -> None:
    last: dict[str, object] = {}
    for account, started, ended in runs:
        if account in last:
            assert started >= last[account], f"two runs of {account} overlapped"
        last[account] = ended


def _all_in(c: Company, expected: dict[str, list[str]]) -> bool:
    return all(sorted(m.decode().split(":", 1)[1].strip() for m in c.archived(u)) == sorted(ids)
               for u, ids in expected.items())


def _check_once(c: Company, expected: dict[str, list[str]]) -> None:
    """Every mail archived once, and exactly one activity per mail."""
    for user, ids in expected.items():
        archived = sorted(m.decode().split(":", 1)[1].strip() for m in c.archived(user))
        assert archived == sorted(ids), user
        with c.imap(user) as client:
            client.select_folder(IMPORT, readonly=True)
            assert client.search(["ALL"]) == [], f"{user}: mail left in the import folder"
    activities = [a.message_id for a in c.activities()]
    assert sorted(activities) == sorted(i for ids in expected.values() for i in ids)


# -- the account lock on PostgreSQL ---------------------------------------------------------------------

def test_sync_on_another_host_waits_for_the_accounts_advisory_lock(company):
    """A worker (here: the lock it holds) on one host and `gwsync sync` on another never run one
    account at once: with [database] url the account lock is PostgreSQL's, not a local file."""
    c = company(1, lock_wait=0)
    c.append(c.users[0])
    locks = PgAccountLocks(c.url, wait=0)
    with locks.hold(c.users[0], "worker") as held:
        assert locks.check(held)
        assert "gwsync worker" in (locks.holder(c.users[0]) or "")
        done = subprocess.run([sys.executable, "-m", "gwsync.cli", "--config", str(c.config_path), "sync"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 1, done.stderr
        assert f"account {c.users[0]} is busy: gwsync worker" in done.stderr
        assert c.archived(c.users[0]) == []
    done = subprocess.run([sys.executable, "-m", "gwsync.cli", "--config", str(c.config_path), "sync"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert len(c.archived(c.users[0])) == 1


def test_a_lost_lock_session_is_seen_by_check(pg_url):
    """The fence: once the lock's session is gone (the server ended it), `check` says so."""
    locks = PgAccountLocks(pg_url, wait=0)
    with locks.hold("acme", "worker") as held:
        assert locks.check(held)
        with psycopg.connect(pg_url, autocommit=True) as admin:
            pid = held[0].info.backend_pid
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        assert not locks.check(held)
        again = locks.try_acquire("acme", "other")  # the server dropped the lock with the session
        assert again is not None
        locks.release(again)
    assert advisory_key("acme") != advisory_key("acme2")


# -- workers ---------------------------------------------------------------------------------------------

def test_worker_imports_mail_of_five_accounts_after_append(company):
    """Watcher job -> sync job: mail appended to five accounts is in the CRM within seconds,
    long before the accounts' interval (an hour) would have brought it."""
    c = company(5)
    worker = c.start_worker("--concurrency", "3")
    # The first round: every account synced once at start, and the watcher is running.
    c.wait_for(lambda: c.query("SELECT count(*) FROM gwsync_schedule WHERE runs >= 1")[0][0] == 5, 30,
               "the first sync of every account did not finish")
    # One worker with its two watcher slots ([worker] watchers): two shards, both watched.
    c.wait_for(lambda: c.query("SELECT count(*) FROM procrastinate_jobs WHERE task_name = 'gwsync.watch' "
                               "AND status = 'doing' AND args->>'shards' = '2'")[0][0] == 2, 20, "no watcher job ran")
    time.sleep(1.5)  # the watcher's connections log in and enter IDLE
    expected = {user: c.append(user) for user in c.users}
    started = time.monotonic()
    c.wait_for(lambda: len(c.activities()) == 5, 15, "the mail of five accounts was not imported")
    took = time.monotonic() - started
    print(f"APPEND to 5 accounts -> 5 activities: {took:.2f} s")
    assert took < 8, took
    _check_once(c, expected)
    assert worker.poll() is None


def test_mail_that_came_while_no_watcher_ran_is_imported_when_one_starts(company):
    """Mail appended while nobody watched (a worker killed, a reshard, the renewal of a watcher
    job) waits in the import folder: a watcher's first connection finds it there and syncs the
    account within seconds, not after its interval (an hour); an account with empty import
    folders is not synced by the watcher's start."""
    c = company(2, worker="watchers = 0")
    first = c.start_worker()
    c.wait_for(lambda: c.query("SELECT count(*) FROM gwsync_schedule WHERE runs >= 1")[0][0] == 2, 30,
               "the first sync of every account did not finish")
    expected = {c.users[0]: c.append(c.users[0])}
    time.sleep(2)
    assert c.archived(c.users[0]) == [], "synced though nothing watched and the interval is an hour"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    c.config_path.write_text(c.config_path.read_text().replace("watchers = 0", "watchers = 2"))
    c.start_worker()
    c.wait_for(lambda: c.query("SELECT count(*) FROM procrastinate_jobs WHERE task_name = 'gwsync.watch' "
                               "AND status = 'doing'")[0][0] >= 1, 30, "no watcher job ran")
    started = time.monotonic()
    c.wait_for(lambda: _all_in(c, expected), 15, "the mail that came while nothing watched was not imported")
    print(f"watcher start -> the waiting mail imported: {time.monotonic() - started:.2f} s")
    time.sleep(2)  # time for a look at the other account, if there were one
    runs = dict(c.query("SELECT account, runs FROM gwsync_schedule"))
    assert runs == {c.users[0]: 2, c.users[1]: 1}, runs
    _check_once(c, expected)


def test_two_workers_never_run_one_account_at_once_and_import_each_mail_once(company):
    c = company(6, interval=1)
    expected = {user: c.append(user, 15) for user in c.users}
    c.start_worker("--concurrency", "3")
    c.start_worker("--concurrency", "3")
    c.wait_for(lambda: _all_in(c, expected), 60, "not all mail was archived")
    # More rounds: every account is due again after a second or two (interval 1, max_backoff 2).
    more = {user: c.append(user, 3) for user in c.users[:3]}
    for user, ids in more.items():
        expected[user] += ids
    c.wait_for(lambda: _all_in(c, expected), 60, "the later mail was not archived")
    c.wait_for(lambda: len(c.sync_runs()) >= 30, 30, "too few sync runs to judge")
    _check_once(c, expected)
    runs = c.sync_runs()
    _no_overlap(runs)
    workers = c.query("SELECT count(DISTINCT worker_id) FROM procrastinate_jobs WHERE task_name = 'gwsync.sync'")
    assert workers[0][0] == 2, "both workers ran sync jobs"


def test_sigterm_stops_a_worker_cleanly(company):
    c = company(2)
    worker = c.start_worker()
    c.wait_for(lambda: c.query("SELECT count(*) FROM gwsync_schedule WHERE runs >= 1")[0][0] == 2, 30,
               "the first syncs did not finish")
    # One worker with its two watcher slots ([worker] watchers): two shards, both watched.
    c.wait_for(lambda: c.query("SELECT count(*) FROM procrastinate_jobs WHERE task_name = 'gwsync.watch' "
                               "AND status = 'doing' AND args->>'shards' = '2'")[0][0] == 2, 20, "no watcher job ran")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=20) == 0, c.log(0)
    assert "Traceback" not in c.log(0)
    assert c.query("SELECT count(*) FROM procrastinate_workers")[0][0] == 0, "the worker did not unregister"
    assert c.query("SELECT count(*) FROM procrastinate_jobs WHERE status = 'doing'")[0][0] == 0


def test_sigterm_during_an_import_stops_between_batches_and_a_later_sync_finishes_it(company):
    c = company(2)
    expected = {user: c.append(user, 1000) for user in c.users}  # four batches each
    worker = c.start_worker()
    c.wait_for(lambda: any(c.archived(u) for u in c.users), 60, "no batch was archived")
    worker.send_signal(signal.SIGTERM)  # the job at hand ends after its batch
    assert worker.wait(timeout=60) == 0, c.log(0)
    assert "Traceback" not in c.log(0)
    assert c.query("SELECT count(*) FROM procrastinate_jobs WHERE status = 'doing'")[0][0] == 0
    left = sum(len(ids) for ids in expected.values()) - sum(len(c.archived(u)) for u in c.users)
    assert left > 0, "the import ran to its end instead of stopping after its batch"
    done = subprocess.run([sys.executable, "-m", "gwsync.cli", "--config", str(c.config_path), "sync"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    _check_once(c, expected)


@pytest.mark.slow
def test_a_killed_workers_jobs_run_again_on_the_other_and_nothing_is_doubled(company):
    """The accounts' interval is an hour: their mail comes in only if the killed worker's jobs
    are queued again (by the other worker's tick, once the heartbeat is 5 s old)."""
    c = company(4)
    expected = {user: c.append(user, 60) for user in c.users}
    first = c.start_worker("--concurrency", "4")
    c.wait_for(lambda: c.query("SELECT count(*) FROM procrastinate_jobs WHERE task_name = 'gwsync.sync' "
                               "AND status = 'doing'")[0][0] >= 1, 30, "no sync job started")
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    held = c.query("SELECT count(*) FROM procrastinate_jobs WHERE status = 'doing'")[0][0]
    assert held >= 1
    c.start_worker("--concurrency", "2")
    c.wait_for(lambda: _all_in(c, expected), 60, "the killed worker's mail was not all archived")
    _check_once(c, expected)
    assert "of a worker that stopped answering: queued again" in c.log(1)


def test_a_frozen_workers_accounts_are_served_by_the_other_and_nothing_is_doubled(company):
    """A worker SIGSTOPped mid-import keeps its TCP sessions: its account locks are freed by the
    server after [database] lock_timeout (3 s here) without a keepalive, its jobs are queued
    again after stalled_after (5 s), and the other worker imports the rest meanwhile. Woken up,
    the frozen worker commits and moves nothing more (the fence)."""
    c = company(4, database="lock_timeout = 3")
    expected = {user: c.append(user, 600) for user in c.users}
    first = c.start_worker("--concurrency", "4")
    c.wait_for(lambda: any(c.archived(u) for u in c.users), 60, "no batch was archived")
    os.killpg(first.pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        assert not _all_in(c, expected), "the import ended before the stop: nothing to take over"
        c.start_worker("--concurrency", "4")
        c.wait_for(lambda: _all_in(c, expected), 60, "the frozen worker's accounts were not served by the other")
        print(f"the frozen worker's mail all archived by the other {time.monotonic() - stopped:.1f} s after the stop")
        assert first.poll() is None
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    # Awake: its jobs end (refused by the fence, or stopped by the lost lock) and it goes on working.
    c.wait_for(lambda: c.query("SELECT count(*) FROM procrastinate_jobs WHERE task_name = 'gwsync.sync' "
                               "AND status = 'doing'")[0][0] == 0, 30, "the woken worker's jobs did not end")
    time.sleep(2)
    _check_once(c, expected)
    assert "lost the account's lock" in c.log(0), c.log(0)[-3000:]
    c.wait_for(lambda: "was taken for dead" in c.log(0), 20, "the woken worker did not register again")
    c.wait_for(lambda: c.query("SELECT count(*) FROM gwsync_workers g JOIN procrastinate_workers p "
                               "ON p.id = g.worker_id WHERE g.pid = %s", first.pid)[0][0] == 1, 20,
               "the woken worker's row in gwsync_workers was not made again")
    time.sleep(1)
    assert first.poll() is None, c.log(0)[-3000:]


def test_worker_needs_a_database_url_and_says_so_in_one_line(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('[accounts.a.imap]\nhost = "127.0.0.1"\nusername = "a"\npassword = "x"\n')
    done = subprocess.run([sys.executable, "-m", "gwsync.cli", "--config", str(config), "worker"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.startswith("gwsync: config error: gwsync worker needs [database] url"), done.stderr
    assert len(done.stderr.splitlines()) == 1


def test_worker_on_an_unreachable_database_says_so_in_one_line(tmp_path):
    from gwsync.demo.localservers import free_port

    config = tmp_path / "config.toml"
    config.write_text(f'[database]\nurl = "postgresql://gwsync@127.0.0.1:{free_port()}/company"\n\n'
                      '[accounts.a.imap]\nhost = "127.0.0.1"\nusername = "a"\npassword = "x"\n')
    done = subprocess.run([sys.executable, "-m", "gwsync.cli", "--config", str(config), "worker"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("gwsync: cannot use the "), done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr


def test_schedule_backs_off_idle_accounts_and_brings_back_one_with_changes(pg_url):
    """Each account at its interval; without changes the wait doubles up to max_backoff; a run
    with changes returns to the interval; a busy run is due again at once; a claimed account is
    not claimed again before its wait is over."""
    from gwsync.storage.database import postgres_engine
    from gwsync.worker import Schedule

    engine = postgres_engine(pg_url, "schedule database")
    schedule = Schedule(engine, max_backoff=720)
    schedule.create(pg_url)

    def backoff(account: str, area: str = "mail") -> int:
        return next(r["backoff"] for r in schedule.rows() if (r["account"], r["area"]) == (account, area))

    wanted = {("a", "mail"): 120, ("b", "mail"): 120, ("b", "events"): 900}
    assert sorted(schedule.claim_due(wanted)) == sorted(wanted)  # new: due at once
    assert schedule.claim_due(wanted) == []  # claimed: pushed on by their backoff
    seen = []
    for _ in range(5):
        schedule.finished("a", "mail", 120, changed=False, busy=False, error=None)
        seen.append(backoff("a"))
    assert seen == [240, 480, 720, 720, 720]
    schedule.finished("a", "mail", 120, changed=True, busy=False, error=None)
    assert backoff("a") == 120
    schedule.finished("b", "events", 900, changed=False, busy=False, error="x")  # interval above the ceiling
    assert backoff("b") == 120 and backoff("b", "events") == 900
    schedule.finished("b", "mail", 120, changed=False, busy=True, error=None)
    assert schedule.claim_due(wanted) == [("b", "mail")]
    rows = {(r["account"], r["area"]): r for r in schedule.rows()}
    assert rows[("b", "events")]["last_error"] == "x" and rows[("a", "mail")]["runs"] == 6
    assert rows[("a", "mail")]["last_changed"] is not None and rows[("b", "mail")]["last_changed"] is None
    engine.dispose()


def test_claims_of_a_tick_that_died_before_deferring_are_due_again_after_the_lease(pg_url):
    """A worker killed between claiming due accounts and deferring their jobs: the claims run
    out after the lease (seconds), not after the accounts' interval (here an hour)."""
    from gwsync.storage.database import postgres_engine
    from gwsync.worker import Schedule

    engine = postgres_engine(pg_url, "schedule database")
    schedule = Schedule(engine, max_backoff=720)
    schedule.create(pg_url)
    wanted = {("a", "mail"): 3600, ("b", "mail"): 3600}
    assert sorted(schedule.claim_due(wanted, lease=1)) == sorted(wanted)
    assert schedule.claim_due(wanted, lease=1) == []
    time.sleep(1.2)
    assert sorted(schedule.claim_due(wanted, lease=1)) == sorted(wanted)
    schedule.finished("a", "mail", 3600, changed=False, busy=False, error=None)  # a job ran: its backoff rules
    time.sleep(1.2)
    assert schedule.claim_due(wanted, lease=1) == [("b", "mail")]
    engine.dispose()


@pytest.fixture(scope="module")
def master_dovecot():
    from gwsync.demo.localservers import Dovecot

    with Dovecot.start(master_users={"gwsync": "master-secret"}) as server:
        yield server


def test_an_account_added_to_the_database_is_served_without_a_restart(master_dovecot, pg_url, tmp_path):
    """`gwsync accounts add` while a worker runs: the next tick takes the account in ([defaults]
    with a master user make it whole) and its mail is imported."""
    os.environ["GWSYNC_TEST_MASTER"] = "master-secret"
    config = tmp_path / "config.toml"
    config.write_text(company_config(pg_url, master_dovecot.port, ARCHIVE))
    user = f"w{os.getpid()}x{next(_users)}"
    with IMAPClient("127.0.0.1", port=master_dovecot.port, ssl=False) as client:
        client.login(user, master_dovecot.password_for(user))
        client.create_folder(IMPORT)
        client.append(IMPORT, make_mail(next(_mails) + 100000))
    cli = [sys.executable, "-m", "gwsync.cli", "--config", str(config)]
    with open(tmp_path / "worker.err", "wb") as err:
        worker = subprocess.Popen([*cli, "worker"], stderr=err, start_new_session=True)
    try:
        time.sleep(2)  # running, with no account yet
        added = subprocess.run([*cli, "accounts", "add", "bob", "--username", user], capture_output=True, text=True,
                               timeout=60)
        assert added.returncode == 0, added.stderr
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with Engine(load_config(config)) as engine:
                if engine.activities(ActivityFilter()):
                    break
            time.sleep(0.3)
        else:
            raise AssertionError("the added account's mail was not imported: "
                                 + (tmp_path / "worker.err").read_text(errors="replace")[-3000:])
        assert worker.poll() is None
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()


def test_a_worker_started_with_accounts_in_the_database_serves_them_and_takes_in_new_ones(master_dovecot, pg_url,
                                                                                          tmp_path):
    """The database has an account when the worker starts (a company's usual case): its ticks
    read the database's accounts again without mistaking them for the config file's, so an
    account added later is served too."""
    os.environ["GWSYNC_TEST_MASTER"] = "master-secret"
    config = tmp_path / "config.toml"
    config.write_text(company_config(pg_url, master_dovecot.port, ARCHIVE))
    users = [f"w{os.getpid()}x{next(_users)}" for _ in range(2)]
    for user in users:
        with IMAPClient("127.0.0.1", port=master_dovecot.port, ssl=False) as client:
            client.login(user, master_dovecot.password_for(user))
            client.create_folder(IMPORT)
            client.append(IMPORT, make_mail(next(_mails) + 100000))
    cli = [sys.executable, "-m", "gwsync.cli", "--config", str(config)]

    def imported() -> int:
        with Engine(load_config(config)) as engine:
            return len(engine.activities(ActivityFilter()))

    def wait_for(count: int) -> None:
        deadline = time.monotonic() + 20
        while imported() < count:
            assert time.monotonic() < deadline, (f"{count} mails not imported: "
                                                 + log.read_text(errors="replace")[-3000:])
            time.sleep(0.3)

    added = subprocess.run([*cli, "accounts", "add", "anna", "--username", users[0]], capture_output=True, text=True,
                           timeout=60)
    assert added.returncode == 0, added.stderr
    log = tmp_path / "worker.err"
    with open(log, "wb") as err:
        worker = subprocess.Popen([*cli, "worker"], stderr=err, start_new_session=True)
    try:
        wait_for(1)
        added = subprocess.run([*cli, "accounts", "add", "ben", "--username", users[1]], capture_output=True,
                               text=True, timeout=60)
        assert added.returncode == 0, added.stderr
        wait_for(2)
        assert "both in the config file" not in log.read_text(errors="replace")
        assert worker.poll() is None
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()


@pytest.mark.parametrize("tick", [1, 5, 7])
def test_the_tick_comes_every_tick_seconds(tick):
    """Procrastinate's six-field cron has the seconds last: the tick must come every [worker]
    tick seconds, around the clock, not every second of every tick-th minute."""
    from datetime import datetime, timedelta
    from types import SimpleNamespace

    from gwsync.config import parse_config
    from gwsync.worker import make_app

    config = parse_config({"database": {"url": "postgresql://gwsync@127.0.0.1:1/company"}, "worker": {"tick": tick}})
    app = make_app(SimpleNamespace(config=config))
    (periodic,) = app.periodic_registry.periodic_tasks.values()
    start = datetime(2026, 11, 27, 15, 41, 20)
    periodic.croniter.set_current(start_time=start)
    times = [periodic.croniter.get_next(datetime) for _ in range(30)]
    gaps = {b - a for a, b in itertools.pairwise(times)}
    assert max(gaps) <= timedelta(seconds=tick), sorted(gaps)
    assert min(gaps) >= timedelta(seconds=min(tick, 60 % tick or tick)), sorted(gaps)


def test_a_small_company_loses_and_doubles_nothing_when_a_worker_is_killed_mid_import(master_dovecot, pg_url,
                                                                                     tmp_path):
    """Issue 15's small company: 50 accounts in the database (`gwsync accounts import`), a master
    user logging in for each, 2 workers, one SIGKILLed in the middle of the import. Every mail
    ends up archived exactly once with exactly one activity, no mail is left in an import folder,
    and the killed worker's jobs are served by the other."""
    started = time.monotonic()
    os.environ["GWSYNC_TEST_MASTER"] = "master-secret"
    config = tmp_path / "config.toml"
    # No watcher jobs: the mail is there before the workers start, and each account's first
    # sync is due at once, so the test is about the import and the kill alone.
    config.write_text(company_config(pg_url, master_dovecot.port, ARCHIVE,
                                     worker="tick = 1\nstalled_after = 5\nmax_backoff = 2\nwatchers = 0\n"))
    users = [f"w{os.getpid()}x{next(_users)}" for _ in range(50)]
    (tmp_path / "staff.csv").write_text("name,username,email,areas\n"
                                        + "".join(f"{u},{u},{u}@firma.example,mail\n" for u in users))
    cli = [sys.executable, "-m", "gwsync.cli", "--config", str(config)]
    done = subprocess.run([*cli, "accounts", "import", str(tmp_path / "staff.csv")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    c = Company.__new__(Company)  # its helpers, on these accounts and this config
    c.dovecot, c.url, c.root, c.users, c.workers, c.config_path = master_dovecot, pg_url, tmp_path, users, [], config
    expected = {}
    for user in users:
        with c.imap(user) as client:
            client.create_folder(IMPORT)
        expected[user] = c.append(user, 30)
    try:
        first = c.start_worker("--concurrency", "4")
        c.wait_for(lambda: any(c.archived(u) for u in users[:8]) and c.query(
            "SELECT count(*) FROM procrastinate_jobs WHERE task_name = 'gwsync.sync' AND status = 'doing'")[0][0],
            60, "the import did not start")
        c.start_worker("--concurrency", "4")
        time.sleep(0.5)
        held = c.query("SELECT count(*) FROM procrastinate_jobs j JOIN procrastinate_workers w ON w.id = j.worker_id "
                       "WHERE j.task_name = 'gwsync.sync' AND j.status = 'doing' AND w.id IN "
                       "(SELECT worker_id FROM procrastinate_jobs WHERE task_name = 'gwsync.sync' "
                       "AND status = 'doing' ORDER BY id LIMIT 1)")[0][0]
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        assert held >= 1, "the first worker held no sync job when it was killed"
        assert not _all_in(c, expected), "the import ended before the kill"
        c.wait_for(lambda: _all_in(c, expected), 90, "not all mail was archived after the kill")
        _check_once(c, expected)
        assert "of a worker that stopped answering: queued again" in c.log(1), c.log(1)[-3000:]
    finally:
        c.stop()
    mails = sum(map(len, expected.values()))
    print(f"50 accounts, {mails} mails, one worker killed: {time.monotonic() - started:.1f} s")

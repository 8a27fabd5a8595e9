"""The worker's tick, shards and the schedule as `gwsync status` shows it, on a real PostgreSQL
(the `pg_url` fixture); the shard arithmetic as unit tests.

What the tick writes is counted with a SQLAlchemy cursor hook: a tick that finds nothing new
must not send the accounts' list again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime

import psycopg
import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st

from conftest import pg_rows, wait_until
from gwsync.storage.database import postgres_engine
from gwsync.worker import Schedule


@pytest.fixture
def schedule(pg_url):
    engine = postgres_engine(pg_url, "schedule database")
    made = Schedule(engine, max_backoff=720)
    made.create(pg_url)
    yield made
    engine.dispose()


def _inserts(engine: sa.Engine) -> list[int]:
    """A list that fills with the row count of every INSERT into gwsync_schedule."""
    seen: list[int] = []

    @sa.event.listens_for(engine, "before_cursor_execute")
    def count(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("INSERT INTO GWSYNC_SCHEDULE"):
            seen.append(statement.count("now()") or 1)

    return seen


def _row(schedule: Schedule, account: str, area: str = "mail") -> dict:
    return next(r for r in schedule.rows() if (r["account"], r["area"]) == (account, area))


# -- the tick's writes -----------------------------------------------------------------------------------

def test_a_tick_with_the_same_accounts_inserts_nothing_and_a_new_account_inserts_one_row(schedule):
    wanted = {(f"u{i}", "mail"): 3600 for i in range(200)}
    inserts = _inserts(schedule.engine)
    assert len(schedule.claim_due(wanted)) == 200
    assert len(inserts) == 1 and inserts[0] == 200  # the first tick: every pair is new
    inserts.clear()
    for _ in range(3):
        assert schedule.claim_due(wanted) == []
    assert inserts == [], "a tick with no new account wrote the schedule rows again"
    wanted[("new", "mail")] = 3600
    assert schedule.claim_due(wanted) == [("new", "mail")]
    assert inserts == [1], "only the new account's row is inserted"


def test_a_restarted_worker_keeps_the_rows_it_finds(schedule):
    """A worker that starts (an empty memory) inserts only the rows missing from the table and
    leaves the others' backoff and next run alone."""
    wanted = {("a", "mail"): 120, ("b", "mail"): 120}
    schedule.claim_due(wanted)
    schedule.finished("a", "mail", 120, changed=False, busy=False, error=None)
    before = _row(schedule, "a")
    again = Schedule(schedule.engine, max_backoff=720)
    inserts = _inserts(schedule.engine)
    assert again.claim_due({**wanted, ("c", "mail"): 120}) == [("c", "mail")]
    assert inserts == [1]
    after = _row(again, "a")
    assert (after["backoff"], after["next_due"], after["runs"]) == (before["backoff"], before["next_due"], 1)


def test_a_row_lost_while_a_worker_remembers_it_comes_back_at_the_next_check(schedule, monkeypatch):
    """Another worker's view or a hand-made DELETE: what the tick remembers is checked against
    the table again now and then, so a wanted account is never left without its row."""
    import gwsync.worker as worker

    wanted = {("a", "mail"): 120}
    assert schedule.claim_due(wanted) == [("a", "mail")]
    with schedule.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM gwsync_schedule"))
    monkeypatch.setattr(worker, "RECONCILE_EVERY", 0)
    assert schedule.claim_due(wanted) == [("a", "mail")]


def test_a_removed_accounts_row_is_kept_but_not_claimed(schedule):
    """An account removed (`gwsync accounts remove`) is no longer wanted: its row stays (adding
    it again carries on), is never returned, and is touched once per max_backoff, not at
    every lease."""
    wanted = {("a", "mail"): 1, ("gone", "mail"): 1}
    assert sorted(schedule.claim_due(wanted, lease=1)) == sorted(wanted)
    del wanted[("gone", "mail")]
    time.sleep(1.2)
    assert schedule.claim_due(wanted, lease=1) == [("a", "mail")]
    row = _row(schedule, "gone")
    assert (row["next_due"] - datetime.now(UTC)).total_seconds() > 600, "a removed account's row is pushed far on"
    wanted[("gone", "mail")] = 1  # added again: due at once
    assert sorted(schedule.claim_due(wanted, lease=1)) == [("gone", "mail")]


# -- shards ----------------------------------------------------------------------------------------------

@given(st.integers(0, 20000), st.integers(1, 1000), st.integers(0, 64))
def test_shards_give_every_watcher_slot_a_share_and_none_is_empty_or_too_big(watched, size, slots):
    from gwsync.worker import shard_count

    shards = shard_count(watched, size, slots)
    if watched == 0:
        assert shards == 0
        return
    assert 1 <= shards <= watched  # no empty shard
    assert shards >= min(slots, watched)  # every live watcher slot gets one, while accounts last
    assert watched / shards <= size or shards == watched  # no shard above shard_size


def test_shard_count_examples():
    from gwsync.worker import shard_count

    assert shard_count(1000, 500, 0) == 2  # no live worker known: shard_size alone
    assert shard_count(1000, 500, 6) == 6  # three workers with two watcher slots each
    assert shard_count(10000, 500, 6) == 20
    assert shard_count(3, 500, 6) == 3


def _procrastinate_schema(url: str) -> None:
    from procrastinate import schema

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(schema.SchemaManager.get_schema())  # type: ignore[arg-type]  # Procrastinate's own text


def test_watch_slots_count_the_live_workers_only(schedule, pg_url):
    """Each worker process's row joins Procrastinate's heartbeat: a silent worker's slots do
    not count, and the row of a worker Procrastinate dropped is deleted."""
    _procrastinate_schema(pg_url)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        new = "INSERT INTO procrastinate_workers DEFAULT VALUES RETURNING id"
        live, silent, gone = (conn.execute(new).fetchone()[0] for _ in range(3))
        conn.execute("UPDATE procrastinate_workers SET last_heartbeat = now() - interval '1 minute' WHERE id = %s",
                     (silent,))
    for worker_id, watchers in ((live, 2), (silent, 3), (gone, 4)):
        schedule.register(worker_id, "host", 1, watchers, 4)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("DELETE FROM procrastinate_workers WHERE id = %s", (gone,))
    assert schedule.watch_slots(stalled_after=30) == 2
    assert schedule.watch_slots(stalled_after=120) == 5
    with psycopg.connect(pg_url, autocommit=True) as conn:
        assert sorted(r[0] for r in conn.execute("SELECT worker_id FROM gwsync_workers")) == sorted([live, silent])


# -- workers on a real Dovecot ---------------------------------------------------------------------------

from test_worker import ARCHIVE, IMPORT, Company, company  # noqa: E402,F401  (the fixture, too)


def _watchers(c: Company) -> list[tuple[int, int, int]]:
    """(shard, shards, worker id) of the watcher jobs running."""
    return c.query("SELECT (args->>'shard')::int, (args->>'shards')::int, worker_id FROM procrastinate_jobs "
                   "WHERE task_name = 'gwsync.watch' AND status = 'doing' ORDER BY 1")


def test_shards_follow_the_live_workers_as_they_come_and_go(company):  # noqa: F811  (the fixture)
    """Two workers with one watcher slot each: two shards, one on each worker (shard_size alone
    would make one shard, and one worker would watch everything). One worker stops: the other
    watches every account again, and mail to each is imported long before its interval."""
    c = company(4, worker="watchers = 1\n")
    c.start_worker()
    c.start_worker()
    c.wait_for(lambda: len(w := _watchers(c)) == 2 and {s for s, _, _ in w} == {0, 1}
               and len({worker for _, _, worker in w}) == 2 and all(n == 2 for _, n, _ in w), 40,
               "two shards were not watched by the two workers")
    stopped = c.workers[0]
    stopped.send_signal(signal.SIGTERM)
    assert stopped.wait(timeout=30) == 0, c.log(0)
    stopped.returncode = -9  # c.wait_for takes only a killed worker's end for granted
    c.wait_for(lambda: _watchers(c) and all(n == 1 for _, n, _ in _watchers(c)), 40,
               "the remaining worker did not take all accounts into one shard")
    time.sleep(1.5)  # its connections log in and enter IDLE
    expected = {user: c.append(user) for user in c.users}
    c.wait_for(lambda: len(c.activities()) == 4, 20, "mail to the accounts was not imported by the watcher")
    assert sorted(a.message_id for a in c.activities()) == sorted(i for ids in expected.values() for i in ids)


@pytest.fixture(scope="module")
def master_dovecot():
    from gwsync.demo.localservers import Dovecot

    with Dovecot.start(master_users={"gwsync": "master-secret"}) as server:
        yield server


class DatabaseAccounts:
    """Accounts added with `gwsync accounts add` on a master-user Dovecot, and one worker."""

    def __init__(self, dovecot, pg_url: str, root, names: list[str]):
        from imapclient import IMAPClient

        from conftest import company_config, make_mail

        os.environ["GWSYNC_TEST_MASTER"] = "master-secret"
        self.dovecot, self.url, self.root, self.make_mail = dovecot, pg_url, root, make_mail
        self.config = root / "config.toml"
        self.config.write_text(company_config(pg_url, dovecot.port, ARCHIVE))
        self.users = {name: f"d{os.getpid()}{name}{int(time.time() * 1000) % 100000}" for name in names}
        for user in self.users.values():
            with IMAPClient("127.0.0.1", port=dovecot.port, ssl=False) as client:
                client.login(user, dovecot.password_for(user))
                client.create_folder(IMPORT)
        for name, user in self.users.items():
            self.cli("accounts", "add", name, "--username", user)
        self.worker = None

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "gwsync.cli", "--config", str(self.config), *args],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done

    def start(self) -> None:
        with open(self.root / "worker.err", "wb") as err:
            self.worker = subprocess.Popen([sys.executable, "-m", "gwsync.cli", "-v", "--config", str(self.config),
                                            "worker"], stderr=err, start_new_session=True)

    def log(self) -> str:
        """The worker's log without the ticks' lines."""
        lines = (self.root / "worker.err").read_text(errors="replace").splitlines()
        return "\n".join(line for line in lines if "gwsync.tick[" not in line)

    def query(self, sql: str, *params) -> list[tuple]:
        return pg_rows(self.url, sql, *params)

    def wait_for(self, what, timeout: float, message: str):
        def check_workers() -> None:
            assert self.worker is None or self.worker.poll() is None, self.log()[-3000:]

        return wait_until(what, timeout, message, check_workers, lambda: f"worker log:\n{self.log()[-3000:]}")

    def append(self, name: str) -> None:
        from imapclient import IMAPClient

        user = self.users[name]
        with IMAPClient("127.0.0.1", port=self.dovecot.port, ssl=False) as client:
            client.login(user, self.dovecot.password_for(user))
            client.append(IMPORT, self.make_mail(int(time.time() * 1000) % 10**9))

    def left_in_import(self, name: str) -> int:
        from imapclient import IMAPClient

        user = self.users[name]
        with IMAPClient("127.0.0.1", port=self.dovecot.port, ssl=False) as client:
            client.login(user, self.dovecot.password_for(user))
            client.select_folder(IMPORT, readonly=True)
            return len(client.search(["ALL"]))

    def stop(self) -> None:
        if self.worker is not None and self.worker.poll() is None:
            os.killpg(self.worker.pid, signal.SIGKILL)
            self.worker.wait()


@pytest.fixture
def database_accounts(master_dovecot, pg_url, tmp_path):
    made: list[DatabaseAccounts] = []

    def factory(names: list[str]) -> DatabaseAccounts:
        made.append(DatabaseAccounts(master_dovecot, pg_url, tmp_path, names))
        return made[-1]

    yield factory
    for d in made:
        d.stop()


def _sync_jobs(d: DatabaseAccounts, account: str, after: int) -> int:
    return d.query("SELECT count(*) FROM procrastinate_jobs WHERE task_name = 'gwsync.sync' "
                   "AND args->>'account' = %s AND id > %s", account, after)[0][0]


def test_a_removed_account_is_no_longer_watched_nor_synced(database_accounts):
    """`gwsync accounts remove` while a worker runs: within a few ticks the watcher lets go of
    the account (mail arriving there defers nothing) and no sync job of it is queued, while the
    account that stays is served as before."""
    d = database_accounts(["keep", "gone"])
    d.start()
    d.wait_for(lambda: d.query("SELECT count(*) FROM gwsync_schedule WHERE runs >= 1")[0][0] == 2, 30,
               "the first sync of both accounts did not finish")
    first = d.wait_for(lambda: d.query("SELECT max(id) FROM procrastinate_jobs WHERE task_name = 'gwsync.watch' "
                                       "AND status = 'doing'")[0][0], 20, "no watcher job ran")
    d.cli("accounts", "remove", "gone")
    marker = d.query("SELECT max(id) FROM procrastinate_jobs")[0][0]
    d.wait_for(lambda: d.query("SELECT count(*) FROM procrastinate_jobs WHERE task_name = 'gwsync.watch' "
                               "AND status = 'doing' AND id > %s", first)[0][0] == 1, 20,
               "the watcher holding the removed account did not hand over")
    time.sleep(1.5)  # the new watcher's connections log in and enter IDLE
    d.append("gone")
    d.append("keep")
    d.wait_for(lambda: d.left_in_import("keep") == 0, 15, "the remaining account's mail was not imported")
    time.sleep(3)  # three more ticks
    assert _sync_jobs(d, "gone", marker) == 0, "a sync job of the removed account was queued"
    assert d.left_in_import("gone") == 1
    assert _sync_jobs(d, "keep", marker) >= 1


# -- gwsync status ---------------------------------------------------------------------------------------

def test_status_shows_the_workers_schedule_and_whether_a_worker_lives(schedule, pg_url, tmp_path):
    """With [database] url, `gwsync status` (and --json) add the workers' view of each account:
    per area the last run's start and end, next due, backoff, last error; and the live worker
    processes. The keys of before stay."""
    config = tmp_path / "config.toml"
    config.write_text(f'[database]\nurl = "{pg_url}"\n\n'
                      '[accounts.alice.imap]\nhost = "127.0.0.1"\nusername = "alice"\npassword = "x"\n\n'
                      '[accounts.bob.imap]\nhost = "127.0.0.1"\nusername = "bob"\npassword = "x"\n')
    cli = [sys.executable, "-m", "gwsync.cli", "--config", str(config), "status"]

    def status() -> dict:
        done = subprocess.run([*cli, "--json"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    before = status()  # no worker ever ran: no schedule yet, none alive
    assert before["workers"] == {"alive": 0, "processes": []}
    assert before["accounts"]["alice"]["schedule"] == {}

    _procrastinate_schema(pg_url)
    wanted = {("alice", "mail"): 300, ("gone", "mail"): 300}
    schedule.claim_due(wanted)
    schedule.started("alice", "mail")
    schedule.finished("alice", "mail", 300, changed=False, busy=False, error="account alice: IMAP refused")
    with psycopg.connect(pg_url, autocommit=True) as conn:
        worker_id = conn.execute("INSERT INTO procrastinate_workers DEFAULT VALUES RETURNING id").fetchone()[0]
    schedule.register(worker_id, "host-a", 4242, 2, 4)

    out = status()
    alice = out["accounts"]["alice"]
    for key in ("source", "last_sync", "last_success", "lag", "errors", "areas", "held", "failed", "locked"):
        assert key in alice, key
    plan = alice["schedule"]["mail"]
    assert plan["backoff"] == 600 and plan["runs"] == 1 and plan["last_error"] == "account alice: IMAP refused"
    assert plan["last_start"] and plan["last_end"] and plan["next_due"]
    due = datetime.fromisoformat(plan["next_due"]) - datetime.fromisoformat(plan["last_end"])
    assert 599 <= due.total_seconds() <= 601
    assert out["accounts"]["bob"]["schedule"] == {}
    assert out["workers"]["alive"] == 1
    assert out["workers"]["processes"][0] | {"started": None, "last_heartbeat": None} == {
        "host": "host-a", "pid": 4242, "watchers": 2, "concurrency": 4, "started": None, "last_heartbeat": None}

    text = subprocess.run(cli, capture_output=True, text=True, timeout=60)
    assert text.returncode == 0, text.stderr
    assert "workers: 1 alive (host-a pid 4242)" in text.stdout
    assert "  worker mail: next " in text.stdout and "backoff 600 s" in text.stdout
    assert "last error: account alice: IMAP refused" in text.stdout

    with psycopg.connect(pg_url, autocommit=True) as conn:  # its heartbeat stopped a minute ago
        conn.execute("UPDATE procrastinate_workers SET last_heartbeat = now() - interval '1 minute'")
    assert status()["workers"] == {"alive": 0, "processes": []}
    text = subprocess.run(cli, capture_output=True, text=True, timeout=60)
    assert "workers: none alive" in text.stdout


def test_status_without_a_database_url_has_no_worker_view(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(f'[crm]\ndatabase = "{tmp_path}/crm.db"\n[state]\ndatabase = "{tmp_path}/state.db"\n'
                      '[accounts.alice.imap]\nhost = "127.0.0.1"\nusername = "alice"\npassword = "x"\n')
    done = subprocess.run([sys.executable, "-m", "gwsync.cli", "--config", str(config), "status", "--json"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["workers"] is None and out["accounts"]["alice"]["schedule"] is None


def test_ten_thousand_accounts_with_three_areas_fit_the_first_tick(schedule):
    """30,000 new rows at once (the first tick of a company): more than the 65,535 parameters
    PostgreSQL takes in one statement, so they go in parts."""
    wanted = {(f"user{i:05d}", area): 600 for i in range(10000) for area in ("mail", "events", "tasks")}
    assert len(schedule.claim_due(wanted)) == 30000
    assert schedule.claim_due(wanted) == []

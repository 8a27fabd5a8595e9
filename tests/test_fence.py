"""The fence on a real PostgreSQL: a run that lost its account's lock writes nothing afterwards,
and a frozen holder loses the lock after [database] lock_timeout.

A run holds the account's advisory lock (PgAccountLocks.hold); its store writes (EmbeddedCRM,
StateStore, both on the database) run the lock's fence first. Another run taking the account
afterwards makes every later write of the first refused, with nothing written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psycopg
import pytest

from gwsync.accountlock import PgAccountLocks
from gwsync.crm import ActivityDraft
from gwsync.crm.embedded import EmbeddedCRM
from gwsync.errors import StoreError
from gwsync.storage.state import MailRecord, StateStore

STATUSES = {"O": "Offen"}


@pytest.fixture
def stores(pg_url, tmp_path):
    crm = EmbeddedCRM(pg_url, tmp_path / "documents", STATUSES, "x{id}")
    state = StateStore(pg_url)
    yield crm, state
    crm.close()
    state.close()


def _draft(key: str) -> ActivityDraft:
    return ActivityDraft(key=key, kind="MAILEIN", status="O", subject=key)


def _record(uid: int) -> MailRecord:
    return MailRecord(account="acme", folder="INBOX/CRM x [O]", uidvalidity=7, uid=uid, outcome="held")


def _kill_session(pg_url: str, held) -> None:
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (held[0].info.backend_pid,))


def test_a_write_after_another_run_took_the_account_is_refused_and_writes_nothing(pg_url, stores):
    crm, state = stores
    locks, other = PgAccountLocks(pg_url, wait=0), PgAccountLocks(pg_url, wait=0)
    with locks.hold("acme", "worker") as held:
        crm.create_activities([_draft("before")])  # its own: written
        state.save([_record(1)])
        _kill_session(pg_url, held)  # the lock's session ends (network, server, timeout)
        taken = other.try_acquire("acme", "sync")
        assert taken is not None, "the lock died with its session"
        try:
            with pytest.raises(StoreError, match="lost the account's lock"):
                crm.create_activities([_draft("after")])
            with pytest.raises(StoreError, match="lost the account's lock"):
                state.save([_record(2)])
        finally:
            other.release(taken)
    assert crm.existing_keys(["before", "after"]) == {"before": crm.existing_keys(["before"])["before"]}
    assert set(state.records("acme", "INBOX/CRM x [O]", 7)) == {1}


def test_a_write_of_the_old_holder_in_flight_finishes_before_the_new_holder_starts(pg_url, stores):
    """The row lock: a new holder's token waits for the old holder's open transaction, so the
    new run sees what the old one committed, never half of it."""
    from gwsync.storage.database import write

    crm, _ = stores
    locks, other = PgAccountLocks(pg_url, wait=0), PgAccountLocks(pg_url, wait=0)
    got: list = []
    with locks.hold("acme", "worker") as held:
        with write(crm.engine) as conn:  # the fence ran: its row is held FOR SHARE until COMMIT
            _kill_session(pg_url, held)
            def take() -> None:
                try:
                    got.append(other.try_acquire("acme", "sync"))
                except Exception as exc:  # shown by the assertion below
                    got.append(exc)

            taker = threading.Thread(target=take)
            taker.start()
            taker.join(1.0)
            assert taker.is_alive() and not got, f"the new holder did not wait for the open transaction: {got}"
            conn.exec_driver_sql("SELECT 1")
        taker.join(10)
        assert got and got[0] is not None
        with pytest.raises(StoreError, match="lost the account's lock"):
            crm.create_activities([_draft("late")])
        other.release(got[0])
    assert crm.existing_keys(["late"]) == {}


HOLDER = textwrap.dedent("""
    import sys, time
    from contextlib import nullcontext
    from pathlib import Path
    from gwsync.engine import account_locks
    from gwsync.config import load_config
    from gwsync.errors import StoreError
    from gwsync.storage.database import write
    from gwsync.storage.state import MailRecord, StateStore
    config = load_config(Path(sys.argv[1]))
    locks, state, doing = account_locks(config), StateStore(config.database.url), sys.argv[2]
    try:
        with locks.hold("acme", "worker"):
            state.save([MailRecord(account="acme", folder="f", uidvalidity=7, uid=9, outcome="held")])
            with write(state.engine) if doing != "idle" else nullcontext() as conn:
                if conn is not None:
                    conn.exec_driver_sql("CREATE TABLE frozen_marker (x INTEGER)")
                    raw = conn.connection.dbapi_connection
                    if doing == "pipelining":  # an executemany's statements sent, its Sync not yet
                        pipeline, cursor = raw.pipeline(), raw.cursor()
                        pipeline.__enter__()
                        cursor.execute("INSERT INTO frozen_marker VALUES (1)")
                        raw.pgconn.flush()
                    elif doing == "reading":  # a result larger than the socket buffers, not read yet
                        raw.pgconn.send_query(b"SELECT repeat('x', 1000) FROM generate_series(1, 100000)")
                        raw.pgconn.flush()
                print("held", flush=True)
                sys.stdin.readline()  # the test writes the line while this process is stopped
                if doing == "reading":
                    while raw.pgconn.get_result() is not None:
                        pass
                conn is not None and conn.exec_driver_sql("SELECT 1")
                if doing == "pipelining":
                    pipeline.__exit__(None, None, None)
    except StoreError as exc:
        print(exc.line, flush=True)
""")


@pytest.mark.parametrize("doing", ["idle", "writing", "pipelining", "reading"])
def test_a_frozen_holder_loses_the_lock_after_lock_timeout_and_a_live_one_keeps_it(pg_url, tmp_path, doing,
                                                                                     caplog):
    """[database] lock_timeout = 2: a holder that keeps running keeps the lock (its thread keeps
    the session busy); SIGSTOPped, the server ends its session within the timeout, also when it
    froze inside a write transaction (which holds the fence's row): idle there, or where the
    server's idle timeout does not apply, amid a pipeline (the server waits for the rest of an
    executemany) or amid a large result (the server waits to send it). Woken up, it ends in the
    fence's one line, with nothing of the frozen transaction kept."""
    config = tmp_path / "config.toml"
    config.write_text(f'[database]\nurl = "{pg_url}"\nlock_timeout = 2\n')
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    StateStore(pg_url).close()  # its tables, before the holder's transaction
    proc = subprocess.Popen([sys.executable, str(script), str(config), doing], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"held\n"
        locks = PgAccountLocks(pg_url, wait=0, timeout=2)  # the same [database] lock_timeout
        if doing == "idle":
            time.sleep(5)  # more than twice the timeout: alive, it holds on
            assert locks.try_acquire("acme", "sync") is None
        os.kill(proc.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        got: list = []

        def take() -> None:  # in a thread: a new holder that waits without end fails the test, not hangs it
            try:
                taken = None
                while taken is None and time.monotonic() - stopped < 10:
                    time.sleep(0.2)
                    taken = locks.try_acquire("acme", "sync")
                got.append(taken)
            except Exception as exc:  # shown by the assertion below
                got.append(exc)

        taker = threading.Thread(target=take, daemon=True)
        taker.start()
        taker.join(15)
        assert got, f"the new holder still waits {time.monotonic() - stopped:.0f} s after the freeze"
        assert got[0] is not None and not isinstance(got[0], Exception), f"a frozen holder kept the account: {got}"
        print(f"frozen holder's lock free after {time.monotonic() - stopped:.1f} s")
        assert time.monotonic() - stopped < 4
        locks.release(got[0])
        # Amid a statement the server's idle timeout does not apply: the new holder ended it.
        assert ("ended database session" in caplog.text) == (doing in ("pipelining", "reading")), caplog.text
        state = StateStore(pg_url)
        assert list(state.records("acme", "f", 7)) == [9]  # committed before the freeze
        state.close()
        with psycopg.connect(pg_url) as conn:  # a frozen transaction is rolled back
            assert conn.execute("SELECT to_regclass('frozen_marker')").fetchone() == (None,)
        if doing != "idle":
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
            os.kill(proc.pid, signal.SIGCONT)
            out, err = proc.communicate(timeout=30)
            assert b"lost the account's lock" in out and b"Traceback" not in err, (out, err)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_new_holder_ends_only_sessions_that_lock_the_fence_row_not_one_that_locks_the_table(pg_url):
    """The sessions a new holder ends are those whose transactions lock the account's fence row
    (runs that lost the lock); someone else's lock on the whole table (an ALTER TABLE, a LOCK
    TABLE) is waited for, not ended."""
    locks = PgAccountLocks(pg_url, wait=0, timeout=2)
    locks.release(locks.try_acquire("acme", "sync"))  # the table and the row exist
    got: list = []
    with psycopg.connect(pg_url) as admin:
        admin.execute("LOCK TABLE gwsync_fence IN SHARE MODE")
        taker = threading.Thread(target=lambda: got.append(locks.try_acquire("acme", "sync")), daemon=True)
        taker.start()
        taker.join(2.5)  # five times the quarter of lock_timeout after which row lockers are ended
        assert taker.is_alive() and not got, f"the new holder did not wait for the table lock: {got}"
        assert admin.execute("SELECT 1").fetchone() == (1,)  # not ended
    taker.join(10)
    assert got and got[0] is not None
    locks.release(got[0])

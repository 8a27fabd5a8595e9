"""One run per account at a time, across processes.

`sync`, each round of `watch`, the import of `review`, `push` and `unpush` hold the account's
lock while they read and change its mail folders, calendars, state and CRM records. Two runs at
once would each import and move the same mail (Dovecot then leaves both copies in the archive)
and each report the other's imports. Order of work in `hold`: try the lock; if another process
has it, try again every POLL seconds until the wait is over, then raise AccountBusy naming the
holder; on leaving the block (however it is left) release it.

FileAccountLocks is an exclusive flock on one file per account next to the state database: the
kernel drops it when the process ends, SIGKILL included, so a dead run never blocks the next.

PgAccountLocks, used when [database] url is set, is a PostgreSQL session advisory lock per
account, each on a connection of its own: `gwsync sync` on one host and a worker on another
never run one account at once, and the server drops the lock when the holder's session ends
(the process died, or the network parted and the server closed the session). The session has
`idle_session_timeout` = [database] lock_timeout, and a thread of the holder sends a query
every quarter of that: a holder that is frozen (SIGSTOP, a VM paused, swapped out) stops
sending, and the server ends its session and frees the account within lock_timeout seconds.

The fence, so that a holder that lost its lock changes nothing afterwards: table
`gwsync_fence` (account, token). Whoever takes an account's lock increments its token (after
the advisory lock, so one holder at a time does); `fence` gives the run's write transactions a
check that reads the token FOR SHARE and refuses the transaction (FenceLost) unless it is the
run's own. The row lock serialises a commit against the next holder's increment: the old
holder's transaction either commits before the new holder starts, or sees the new token and
rolls back. A holder frozen inside such a transaction does not block the next one for long:
the check sets the transaction's idle_in_transaction_session_timeout to lock_timeout as well.
That timeout covers a transaction waiting for its next statement only; one frozen amid a
statement (an executemany's pipeline sent without its Sync, a large result the server waits
to send) stays "active" and would hold the row without end. So the new holder's increment
waits a quarter of lock_timeout, then ends the sessions whose locks on the row it waits for
(pg_terminate_backend: the same role may): such a session belongs to a run that lost the
lock, whose transaction is fenced anyway (rolled back, nothing of it kept); and the store
tells that run the fence's one line (`TokenFence.lost`) instead of the server's error.
`check` asks the lock's session whether it still holds the lock: asked between batches of mail
and before each move to the archive, so a run that lost its session stops and moves no mail
(the commit-then-move order does the rest).
"""

from __future__ import annotations

import abc
import fcntl
import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from .errors import Busy, StoreError

if TYPE_CHECKING:
    from .storage.database import Fence

DEFAULT_WAIT = 60.0  # seconds; [state] lock_wait
DEFAULT_TIMEOUT = 20  # seconds; [database] lock_timeout
POLL = 0.1
FENCE_TABLE = "gwsync_fence"

log = logging.getLogger("gwsync")


class AccountBusy(Busy):
    """Another run holds the account's lock and did not let go within the wait (exit 1)."""


class FenceLost(StoreError):
    """The run lost the account's lock (its session ended) and must not write or move mail."""

    def __init__(self, account: str):
        super().__init__(f"account {account}: this run lost the account's lock in the database (its session "
                         "ended); it committed nothing more and moved no more mail, the next run goes on",
                         Path(account), transient=True)


class AccountLocks(abc.ABC):
    """Per-account mutual exclusion; `wait` is how long `hold` waits for another holder."""

    def __init__(self, wait: float = DEFAULT_WAIT):
        self.wait = wait

    @abc.abstractmethod
    def try_acquire(self, account: str, holder: str) -> Any | None:
        """Take the account's lock without waiting; a handle for `release`, or None if it is held.
        `holder` (e.g. "sync") is recorded for the message another run shows."""

    @abc.abstractmethod
    def release(self, handle: Any) -> None: ...

    def check(self, handle: Any) -> bool:
        """Whether the lock behind `handle` is still held (a file lock always is)."""
        return True

    def fence(self, handle: Any) -> Fence | None:
        """The check every write transaction of the holder runs first (see gwsync.storage.database
        `fencing`), or None: a file lock is dropped only with its process, which then writes nothing."""
        return None

    @abc.abstractmethod
    def holder(self, account: str) -> str | None:
        """Who holds the lock, e.g. "gwsync sync (pid 4242)", if that can be told."""

    @contextmanager
    def hold(self, account: str, holder: str, wait: float | None = None) -> Iterator[Any]:
        """Hold the account's lock for the block, waiting at most `wait` seconds (default: the
        configured wait) for another holder to finish."""
        wait = self.wait if wait is None else wait
        deadline = time.monotonic() + wait
        handle = self.try_acquire(account, holder)
        if handle is None and wait > 0:
            log.info("account %s: %s is working on it; waiting up to %g s", account,
                     self.holder(account) or "another gwsync run", wait)
        while handle is None:
            left = deadline - time.monotonic()
            if left <= 0:
                who = self.holder(account) or "another gwsync run"
                raise AccountBusy(f"account {account} is busy: {who} is working on it; waited {wait:g} s and "
                                  f"changed nothing: run this again when it is done ([state] lock_wait sets the wait)")
            time.sleep(min(POLL, left))
            handle = self.try_acquire(account, holder)
        try:
            from .storage.database import fencing

            with fencing(self.fence(handle)):
                yield handle  # for `check`
        finally:
            self.release(handle)


class FileAccountLocks(AccountLocks):
    """`<state database>.account-<name>.lock`, holding "<pid> <command>" while locked."""

    def __init__(self, state_database: Path, wait: float = DEFAULT_WAIT):
        super().__init__(wait)
        self.state_database = Path(state_database)

    def path_for(self, account: str) -> Path:
        """A single, portable file name for any account name: the name itself when it is plain
        and short, else a readable part plus a digest (so distinct names never share a file)."""
        if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", account):
            name = account
        else:
            readable = re.sub(r"[^A-Za-z0-9_-]+", "_", account)[:40]
            name = f"{readable}~{hashlib.sha256(account.encode('utf-8', 'surrogatepass')).hexdigest()[:16]}"
        return self.state_database.with_name(f"{self.state_database.name}.account-{name}.lock")

    def try_acquire(self, account: str, holder: str) -> int | None:
        path = self.path_for(account)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {holder}\n".encode(), 0)
        return fd

    def release(self, handle: int) -> None:
        try:
            os.ftruncate(handle, 0)  # while still held: nobody reads a finished holder's name
        finally:
            os.close(handle)

    def holder(self, account: str) -> str | None:
        try:
            text = self.path_for(account).read_text(errors="replace").split()
        except OSError:
            return None
        if len(text) < 2 or not text[0].isdigit():
            return None  # the holder has not written its name yet
        return f"gwsync {' '.join(text[1:])} (pid {text[0]})"


def advisory_key(account: str) -> int:
    """The account's 64-bit advisory lock key (signed, as PostgreSQL's bigint), in a range of
    its own: the first bytes of a digest of "gwsync account NAME"."""
    digest = hashlib.sha256(f"gwsync account {account}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class Held(NamedTuple):
    """A held PostgreSQL account lock: its connection, key, the holder's fence token, and the
    stop event of the thread that keeps the session from timing out."""
    conn: Any
    key: int
    account: str
    token: int
    stop: threading.Event


class PgAccountLocks(AccountLocks):
    """A session advisory lock per account on the [database] url, on a connection of its own
    (the handle) whose application_name tells other runs who holds it."""

    def __init__(self, url: str, password: Any = None, wait: float = DEFAULT_WAIT, timeout: float = DEFAULT_TIMEOUT):
        super().__init__(wait)
        self.url = url
        self.password = password  # called at each connection; None: the URL, PGPASSWORD, ~/.pgpass
        self.timeout = timeout  # idle_session_timeout of a holder's session; 0: none
        self._fence_ready = False

    def _connect(self, name: str):
        import psycopg

        from .storage.database import shown, unreachable

        secret = self.password() if self.password else None
        kwargs: dict[str, Any] = {"autocommit": True, "application_name": name[:63]}
        if secret is not None:
            kwargs["password"] = secret
        try:
            conn = psycopg.connect(self.url, **kwargs)
            # The server drops the session of a holder that cannot be reached (its host gone, the
            # network parted) within about 25 s instead of the system's two hours, and the lock with it.
            conn.execute("SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; "
                         "SET tcp_keepalives_count = 3")
            return conn
        except psycopg.OperationalError as exc:
            raise unreachable("account locks database", shown(self.url), exc) from exc

    def _make_fence_table(self, conn) -> None:
        """Once per process; under the schema lock, so that two processes starting at once do
        not both create it. Made already (the usual case), it waits for no schema lock: a
        process frozen amid a store's upgrade must not block every account."""
        if self._fence_ready:
            return
        from .storage.database import SCHEMA_TABLE, _lock_key

        if conn.execute("SELECT to_regclass(%s)", (f'"{FENCE_TABLE}"',)).fetchone()[0] is not None:
            self._fence_ready = True
            return
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key(SCHEMA_TABLE),))
            conn.execute(f'CREATE TABLE IF NOT EXISTS "{FENCE_TABLE}" '
                         '("account" TEXT PRIMARY KEY, "token" BIGINT NOT NULL)')
        self._fence_ready = True

    def try_acquire(self, account: str, holder: str) -> Any | None:
        import psycopg

        from .storage.database import read_only, shown

        conn = self._connect(f"gwsync {holder} (pid {os.getpid()} on {os.uname().nodename})")
        try:
            got = conn.execute("SELECT pg_try_advisory_lock(%s)", (advisory_key(account),)).fetchone()
            if not got or not got[0]:
                conn.close()
                return None
            self._make_fence_table(conn)
            held = Held(conn, advisory_key(account), account, self._next_token(conn, account), threading.Event())
            self._keep_alive(held)
        except psycopg.errors.ReadOnlySqlTransaction as exc:  # the fence's row cannot be written
            conn.close()
            raise read_only("account locks database", shown(self.url), exc) from exc
        except BaseException:
            conn.close()
            raise
        return held

    def _next_token(self, conn, account: str) -> int:
        """The new holder's token. A transaction of an earlier holder that still runs holds the
        row FOR SHARE, and this waits for its COMMIT; past a quarter of lock_timeout a thread
        ends the sessions it waits for (see the module doc)."""
        done = threading.Event()
        if self.timeout:
            threading.Thread(target=self._end_stale_holders, args=(conn.info.backend_pid, account, done),
                             name=f"gwsync fence {account}", daemon=True).start()
        try:
            return conn.execute(f'INSERT INTO "{FENCE_TABLE}" (account, token) VALUES (%s, 1) '
                                f'ON CONFLICT (account) DO UPDATE SET token = "{FENCE_TABLE}".token + 1 '
                                "RETURNING token", (account,)).fetchone()[0]
        finally:
            done.set()

    def _end_stale_holders(self, pid: int, account: str, done: threading.Event) -> None:
        """While session `pid` (holding the account's advisory lock) waits for a lock on the
        account's fence row, end the sessions it waits for: only a transaction of an earlier
        holder locks that row. A wait for a table lock (someone's ALTER TABLE) is left alone."""
        while not done.wait(self.timeout / 4):
            try:
                conn = self._connect("gwsync lock check")
            except Exception:
                continue  # the server is busy or gone: the wait goes on, or fails on its own
            try:
                ended = conn.execute(
                    "SELECT b.pid, b.application_name, pg_terminate_backend(b.pid) FROM pg_stat_activity w "
                    "CROSS JOIN LATERAL unnest(pg_blocking_pids(w.pid)) AS blocker(pid) "
                    "JOIN pg_stat_activity b ON b.pid = blocker.pid "
                    "WHERE w.pid = %s AND w.wait_event_type = 'Lock' AND w.wait_event IN ('transactionid', 'tuple')",
                    (pid,)).fetchall()
            except Exception as exc:  # e.g. another role's session: only its role or a superuser may
                log.warning("account %s: a session of a run that lost the account's lock keeps it blocked and "
                            "cannot be ended (%s): end it on the database server", account,
                            str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
                return
            finally:
                conn.close()
            for blocker, name, _ in ended:
                log.warning("account %s: ended database session %s (%s) of a run that lost the account's lock: "
                            "its transaction had kept the account blocked for %g s", account, blocker,
                            name or "no name", self.timeout / 4)

    def _keep_alive(self, held: Held) -> None:
        """The session ends when it sends nothing for `timeout` seconds: a thread sends a query
        four times as often while the lock is held. A frozen process sends none."""
        if not self.timeout:
            return
        import psycopg

        try:
            held.conn.execute(f"SET idle_session_timeout = {int(self.timeout * 1000)}")
        except psycopg.errors.UndefinedObject:  # PostgreSQL before 14
            log.warning("PostgreSQL before 14 has no idle_session_timeout: a frozen holder of an account's "
                        "lock keeps it until it runs again")
            return

        def run() -> None:
            while not held.stop.wait(self.timeout / 4):
                try:
                    held.conn.execute("SELECT 1")
                except Exception:
                    return  # the session is gone: `check` and the fence tell the run

        threading.Thread(target=run, name=f"gwsync lock {held.account}", daemon=True).start()

    def release(self, handle: Held) -> None:
        handle.stop.set()
        try:
            handle.conn.execute("SELECT pg_advisory_unlock(%s)", (handle.key,))
        except Exception:
            pass  # a lost session has dropped the lock already
        finally:
            handle.conn.close()

    def check(self, handle: Held) -> bool:
        try:
            row = handle.conn.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND pid = pg_backend_pid() AND ((classid::bigint << 32) | objid::bigint) = %s",
                (handle.key,)).fetchone()
        except Exception:
            return False
        return bool(row and row[0])

    def fence(self, handle: Held) -> TokenFence:
        return TokenFence(self, handle)

    def holder(self, account: str) -> str | None:
        key = advisory_key(account)
        try:
            conn = self._connect("gwsync lock check")
        except Exception:
            return None
        try:
            row = conn.execute("SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
                               "WHERE l.locktype = 'advisory' AND l.granted "
                               "AND ((l.classid::bigint << 32) | l.objid::bigint) = %s", (key,)).fetchone()
        except Exception:
            return None
        finally:
            conn.close()
        if not row or not row[0]:
            return None
        return row[0].replace(f" on {os.uname().nodename})", ")")  # the host only when it is another


class TokenFence:
    """The fence of a held PostgreSQL lock (see the module doc): called with a write
    transaction's connection right after BEGIN; `lost` after the transaction failed."""

    def __init__(self, locks: PgAccountLocks, handle: Held):
        import sqlalchemy as sa

        self.locks, self.handle = locks, handle
        # A holder frozen inside the transaction would keep the row locked, and the next holder
        # waiting: the server ends a transaction idle for lock_timeout (nothing of it is kept).
        idle = f"set_config('idle_in_transaction_session_timeout', '{int(locks.timeout * 1000)}', true)" \
            if locks.timeout else "NULL"
        self.query = sa.text(f'SELECT token, {idle} FROM "{FENCE_TABLE}" WHERE account = :account FOR SHARE')

    def __call__(self, conn: Any) -> None:
        row = conn.execute(self.query, {"account": self.handle.account}).first()
        if row is None or row[0] != self.handle.token:
            raise FenceLost(self.handle.account)

    def lost(self) -> FenceLost | None:
        """FenceLost if the run no longer holds the lock: a transaction of the run that failed
        then (the server ended it, idle past lock_timeout or ended by the next holder) is told
        as the fence's one line rather than as the server's error."""
        return None if self.locks.check(self.handle) else FenceLost(self.handle.account)

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
(the process died, or the network parted and the server closed the session). `check` asks the
lock's session whether it still holds the lock: a run that lost its session stops before its
next CRM commit, so it moves no mail (the commit-then-move order does the rest).
"""

from __future__ import annotations

import abc
import fcntl
import hashlib
import logging
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import Busy

DEFAULT_WAIT = 60.0  # seconds; [state] lock_wait
POLL = 0.1

log = logging.getLogger("gwsync")


class AccountBusy(Busy):
    """Another run holds the account's lock and did not let go within the wait (exit 1)."""


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


class PgAccountLocks(AccountLocks):
    """A session advisory lock per account on the [database] url, on a connection of its own
    (the handle) whose application_name tells other runs who holds it."""

    def __init__(self, url: str, password: Any = None, wait: float = DEFAULT_WAIT):
        super().__init__(wait)
        self.url = url
        self.password = password  # called at each connection; None: the URL, PGPASSWORD, ~/.pgpass

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

    def try_acquire(self, account: str, holder: str) -> Any | None:
        conn = self._connect(f"gwsync {holder} (pid {os.getpid()} on {os.uname().nodename})")
        try:
            got = conn.execute("SELECT pg_try_advisory_lock(%s)", (advisory_key(account),)).fetchone()
        except BaseException:
            conn.close()
            raise
        if not got or not got[0]:
            conn.close()
            return None
        return (conn, advisory_key(account))

    def release(self, handle: Any) -> None:
        conn, key = handle
        try:
            conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
        except Exception:
            pass  # a lost session has dropped the lock already
        finally:
            conn.close()

    def check(self, handle: Any) -> bool:
        conn, key = handle
        try:
            row = conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                               "AND pid = pg_backend_pid() AND ((classid::bigint << 32) | objid::bigint) = %s",
                               (key,)).fetchone()
        except Exception:
            return False
        return bool(row and row[0])

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

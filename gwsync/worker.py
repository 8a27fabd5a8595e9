"""`gwsync worker`: Procrastinate jobs on the [database] url PostgreSQL, on any number of hosts.

Three kinds of job, each on a queue of its own, so that long watcher jobs never take the slots
of sync jobs and the tick is never stuck behind either:

- `gwsync.sync(account, area)` (queue "sync"): one Engine sync of that account and area, with
  `lock` = the account (Procrastinate runs no two jobs of one lock at once) and `queueing_lock`
  = account and area (a second waiting job for the same is refused: the waiting one will see
  whatever the second was for). Inside, the Engine holds the account's PostgreSQL advisory lock
  (PgAccountLocks) on a connection of its own, as `gwsync sync` does on any host (waiting
  LOCK_WAIT seconds at most: busy, it is due again at the next tick). The lock's fence
  (gwsync.accountlock) refuses every store write of a run whose lock another run has taken
  since, and before each batch and each move to the archive the run asks that session whether
  it still holds the lock: a worker frozen past [database] lock_timeout, or one whose session
  was lost, commits and moves nothing more. Afterwards the
  account's schedule row records the run: changes bring the account back to its interval, a
  run without changes doubles its wait up to [worker] max_backoff.
- `gwsync.watch(shard, shards)` (queue "watch"): gwsync.mail.asyncwatch.watch_accounts over the
  accounts whose name hashes to the shard (one connection each); mail arriving defers a sync
  job of the mail area. It ends after [worker] watch_for seconds; the tick has already queued
  the next watcher of the shard, which any worker may take, so shards move as workers come and go.
  Every [worker] tick seconds it checks whether it is outdated, and ends early if so: a watcher
  of another number of shards was queued after it, or its shard's accounts changed (one added
  or removed with `gwsync accounts`).
- `gwsync.tick` (queue "tick", Procrastinate periodic every [worker] tick seconds, once across
  all workers): in this order, re-queue the jobs of workers whose heartbeat stopped
  ([worker] stalled_after), queue a watcher job per shard (shard_count: at least one per watcher
  slot of the live workers, so that each takes a share, and no more than [worker] shard_size
  accounts in one), and defer a sync job for every
  account and area whose `next_due` has come (claimed by pushing `next_due` on by a lease of
  twice stalled_after in the same statement, so two ticks never defer one twice, and a tick
  killed before deferring leaves it due again after the lease; the job's end sets the backoff).
  About every 5 minutes it deletes finished jobs older than a day; a tick that succeeded is
  deleted at once.

Scheduling state lives in table `gwsync_schedule` (account, area, last run, next due, backoff,
last error). The tick inserts rows only for accounts new to it (it compares with the table when
the accounts change, and every RECONCILE_EVERY seconds); the row of a removed account is parked
(never due) and due again at once if the account comes back. Table `gwsync_workers` has a row per
worker process (its sync worker's Procrastinate id, host, pid, watcher slots): joined with
Procrastinate's heartbeats it gives the live workers, for the shards and `gwsync status`.

Procrastinate's own schema is applied at the worker's start when the database has
none (under an advisory lock, so workers starting together apply it once).

A worker process runs one Procrastinate worker per queue in one event loop. SIGTERM or SIGINT:
the watchers log out, sync jobs stop between batches of mail (nothing half done), the workers
unregister, exit 0. A worker killed outright leaves its jobs "doing"; a tick re-queues them once
its heartbeat is older than [worker] stalled_after, and the advisory lock died with its session.
A frozen one (SIGSTOP, a paused VM) loses its locks after [database] lock_timeout; woken, its
jobs at hand are refused by the fence and it registers again (its registration was pruned).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import signal
import threading
import time
import zlib
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from .config import Config
from .errors import ConfigError, GwsyncError

log = logging.getLogger("gwsync.worker")

SYNC_QUEUE, WATCH_QUEUE, TICK_QUEUE = "sync", "watch", "tick"
KEEP_JOBS_HOURS = 24  # finished jobs (and their events) are kept this long, for `procrastinate` inspection
CLEAN_EVERY = 300  # seconds between two deletions of old jobs
LOCK_WAIT = 5.0  # seconds a sync job waits for its account's advisory lock


def shard_of(account: str, shards: int) -> int:
    return zlib.crc32(account.encode("utf-8", "surrogatepass")) % shards


def shard_count(watched: int, shard_size: int, slots: int) -> int:
    """Shards for `watched` accounts: enough that none holds more than `shard_size`, and at
    least one per watcher slot of the live workers (`slots`), so that every worker takes a
    share; never more than the accounts (no empty shard)."""
    if watched <= 0:
        return 0
    return min(watched, max(math.ceil(watched / shard_size), slots))


# -- scheduling state ---------------------------------------------------------------------------------

SCHEDULE = sa.Table(
    "gwsync_schedule", sa.MetaData(),
    sa.Column("account", sa.Text, primary_key=True),
    sa.Column("area", sa.Text, primary_key=True),
    sa.Column("next_due", sa.DateTime(timezone=True), nullable=False),
    sa.Column("backoff", sa.Integer, nullable=False),  # seconds until the next run without news
    sa.Column("last_start", sa.DateTime(timezone=True)),
    sa.Column("last_end", sa.DateTime(timezone=True)),
    sa.Column("last_changed", sa.DateTime(timezone=True)),
    sa.Column("last_error", sa.Text),
    sa.Column("runs", sa.Integer, nullable=False, server_default="0"),
)
# One row per worker process: Procrastinate's worker id of its sync worker (whose heartbeat
# tells whether it lives) and how many watcher jobs it runs at once; shards follow the sum.
WORKERS = sa.Table(
    "gwsync_workers", SCHEDULE.metadata,
    sa.Column("worker_id", sa.BigInteger, primary_key=True),
    sa.Column("host", sa.Text, nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("watchers", sa.Integer, nullable=False),
    sa.Column("concurrency", sa.Integer, nullable=False),
    sa.Column("started", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)
SCHEDULE_VERSION = 2
# next_due of an account and area no longer wanted (the account removed): never due, row kept.
PARKED = datetime(9999, 1, 1, tzinfo=UTC)
RECONCILE_EVERY = 300  # seconds between two looks at the whole table when the accounts stay the same


CHUNK = 5000  # pairs per statement: PostgreSQL takes at most 65,535 parameters in one


def _chunks(pairs: list) -> Iterator[list]:
    for start in range(0, len(pairs), CHUNK):
        yield pairs[start:start + CHUNK]


class Schedule:
    """Per account and area: when it is due and how long it waits when nothing changes."""

    def __init__(self, engine: sa.Engine, max_backoff: int):
        self.engine = engine
        self.max_backoff = max_backoff
        self._known: frozenset[tuple[str, str]] | None = None  # the wanted pairs of the last reconcile
        self._looked = 0.0  # its time.monotonic()

    def create(self, label: str) -> None:
        from .storage.database import pg_upgrade

        pg_upgrade(self.engine, "schedule", SCHEDULE_VERSION, "schedule database", label,
                   lambda conn: SCHEDULE.metadata.create_all(conn),
                   [(2, lambda conn: WORKERS.create(conn, checkfirst=True))])

    # -- the worker processes --

    def register(self, worker_id: int, host: str, pid: int, watchers: int, concurrency: int) -> None:
        from sqlalchemy.dialects.postgresql import insert

        from .storage.database import write

        with write(self.engine) as conn:
            conn.execute(insert(WORKERS).values(worker_id=worker_id, host=host, pid=pid, watchers=watchers,
                                                concurrency=concurrency).on_conflict_do_nothing())

    def watch_slots(self, stalled_after: int) -> int:
        """The watcher jobs the live worker processes run at once, together; rows of workers
        Procrastinate no longer knows (stopped, or pruned as stalled) are deleted."""
        from .storage.database import write

        with write(self.engine) as conn:
            conn.execute(sa.text("DELETE FROM gwsync_workers w WHERE NOT EXISTS "
                                 "(SELECT 1 FROM procrastinate_workers p WHERE p.id = w.worker_id)"))
            return int(conn.execute(sa.text(
                "SELECT coalesce(sum(w.watchers), 0) FROM gwsync_workers w JOIN procrastinate_workers p "
                "ON p.id = w.worker_id WHERE p.last_heartbeat > now() - make_interval(secs => :secs)"),
                {"secs": stalled_after}).scalar() or 0)

    def claim_due(self, wanted: dict[tuple[str, str], int], lease: int = 60) -> list[tuple[str, str]]:
        """The (account, area) pairs of `wanted` (pair -> interval) due now; each is pushed on
        by `lease` seconds in the same statement, and its job's end sets the real next time. A
        tick that died between claiming and deferring leaves its claims due again after the
        lease, not after the backoff. New pairs are due at once.

        Rows are inserted only for pairs new to the table (`_reconcile`), not at every tick. A
        due row that is no longer wanted (its account removed) is parked: kept, so that adding
        the account again carries on, but never due until then."""
        from .storage.database import write

        if not wanted:
            return []
        self._reconcile(wanted)
        with write(self.engine) as conn:
            rows = conn.execute(
                SCHEDULE.update()
                .where(SCHEDULE.c.next_due <= sa.func.now())
                .values(next_due=sa.func.now() + sa.func.make_interval(0, 0, 0, 0, 0, 0, lease))
                .returning(SCHEDULE.c.account, SCHEDULE.c.area)).all()
            claimed = [(a, area) for a, area in rows if (a, area) in wanted]
            unwanted = [(a, area) for a, area in rows if (a, area) not in wanted]
            for part in _chunks(unwanted):
                conn.execute(SCHEDULE.update().where(sa.tuple_(SCHEDULE.c.account, SCHEDULE.c.area).in_(part))
                             .values(next_due=PARKED))
        return claimed

    def _reconcile(self, wanted: dict[tuple[str, str], int]) -> None:
        """Rows for the pairs the table lacks, and parked rows of wanted pairs due at once.
        Only when the wanted pairs differ from the last call's, or RECONCILE_EVERY seconds
        after the last look (another worker's tick, or a hand, may have changed the table)."""
        from sqlalchemy.dialects.postgresql import insert

        from .storage.database import write

        pairs = frozenset(wanted)
        if pairs == self._known and time.monotonic() - self._looked < RECONCILE_EVERY:
            return
        with write(self.engine) as conn:
            found = {(a, area): parked for a, area, parked in conn.execute(
                sa.select(SCHEDULE.c.account, SCHEDULE.c.area, SCHEDULE.c.next_due >= PARKED))}
            new = [pair for pair in wanted if pair not in found]
            back = [pair for pair in wanted if found.get(pair)]
            for part in _chunks(new):
                conn.execute(insert(SCHEDULE).values([
                    {"account": a, "area": area, "next_due": sa.func.now(), "backoff": wanted[(a, area)]}
                    for a, area in part]).on_conflict_do_nothing())
            for part in _chunks(back):
                conn.execute(SCHEDULE.update().where(sa.tuple_(SCHEDULE.c.account, SCHEDULE.c.area).in_(part))
                             .values(next_due=sa.func.now()))
        self._known = pairs
        self._looked = time.monotonic()

    def started(self, account: str, area: str) -> None:
        from .storage.database import write

        with write(self.engine) as conn:
            conn.execute(SCHEDULE.update().where(SCHEDULE.c.account == account, SCHEDULE.c.area == area)
                         .values(last_start=sa.func.now()))

    def finished(self, account: str, area: str, interval: int, changed: bool, busy: bool, error: str | None) -> None:
        """Changes: back to the interval. Busy (another run had the account): due at the next
        tick. Otherwise the backoff doubles, from the interval up to max_backoff."""
        from sqlalchemy.dialects.postgresql import insert

        from .storage.database import write

        ceiling = max(self.max_backoff, interval)
        if changed:
            backoff: Any = interval
        else:
            backoff = sa.func.least(sa.func.greatest(SCHEDULE.c.backoff * 2, interval), ceiling)
        wait = sa.literal(0) if busy else backoff
        values = {"last_end": sa.func.now(), "last_error": error, "runs": SCHEDULE.c.runs + 1, "backoff": backoff,
                  "next_due": sa.func.now() + sa.func.make_interval(0, 0, 0, 0, 0, 0, wait)}
        if changed:
            values["last_changed"] = sa.func.now()
        with write(self.engine) as conn:
            conn.execute(insert(SCHEDULE).values(account=account, area=area, next_due=sa.func.now(),
                                                 backoff=interval).on_conflict_do_nothing())
            conn.execute(SCHEDULE.update().where(SCHEDULE.c.account == account, SCHEDULE.c.area == area)
                         .values(**values))

    def rows(self) -> list[dict]:
        from .storage.database import read

        with read(self.engine) as conn:
            return [dict(r._mapping) for r in conn.execute(SCHEDULE.select().order_by(SCHEDULE.c.account,
                                                                                      SCHEDULE.c.area))]


# -- what `gwsync status` shows of the workers -------------------------------------------------------

def _iso(stamp: datetime | None) -> str | None:
    return None if stamp is None else stamp.isoformat()


def schedule_view(engine: sa.Engine) -> dict[str, dict[str, dict]]:
    """Per account and area, the workers' schedule: last run's start and end, next due (None
    when parked: the account was removed), backoff, last change, last error, runs. Empty when
    no worker has made the table yet."""
    from .storage.database import read

    with read(engine) as conn:
        if conn.execute(sa.text("SELECT to_regclass('gwsync_schedule')")).scalar() is None:
            return {}
        rows = conn.execute(SCHEDULE.select().order_by(SCHEDULE.c.account, SCHEDULE.c.area)).mappings().all()
    out: dict[str, dict[str, dict]] = {}
    for r in rows:
        parked = r["next_due"] >= PARKED
        out.setdefault(r["account"], {})[r["area"]] = {
            "next_due": None if parked else _iso(r["next_due"]), "backoff": r["backoff"],
            "last_start": _iso(r["last_start"]), "last_end": _iso(r["last_end"]),
            "last_changed": _iso(r["last_changed"]), "last_error": r["last_error"], "runs": r["runs"]}
    return out


def workers_view(engine: sa.Engine, stalled_after: int) -> dict:
    """The worker processes whose heartbeat is younger than stalled_after: {"alive": N,
    "processes": [{host, pid, watchers, concurrency, started, last_heartbeat}]}."""
    from .storage.database import read

    with read(engine) as conn:
        if (conn.execute(sa.text("SELECT to_regclass('gwsync_workers')")).scalar() is None
                or conn.execute(sa.text("SELECT to_regclass('procrastinate_workers')")).scalar() is None):
            return {"alive": 0, "processes": []}
        rows = conn.execute(sa.text(
            "SELECT w.host, w.pid, w.watchers, w.concurrency, w.started, p.last_heartbeat FROM gwsync_workers w "
            "JOIN procrastinate_workers p ON p.id = w.worker_id "
            "WHERE p.last_heartbeat > now() - make_interval(secs => :secs) ORDER BY w.host, w.pid"),
            {"secs": stalled_after}).mappings().all()
    processes = [{**dict(r), "started": _iso(r["started"]), "last_heartbeat": _iso(r["last_heartbeat"])} for r in rows]
    return {"alive": len(processes), "processes": processes}


# -- the worker process's shared state ------------------------------------------------------------------

def _changed(report: Any) -> bool:
    """Whether a sync moved anything: mail imported or archived, calendar items written."""
    if report is None:
        return False
    if report.mail is not None and (report.mail.imported or report.mail.archived_again):
        return True
    return any(v for result in report.calendars.values() for k, v in result.counts.items() if k != "conflicts")


def _file_part(config: Config) -> Config:
    """The config without the accounts kept in the database (the config file's alone)."""
    import copy

    if not config.database_accounts:
        return config
    out = copy.copy(config)
    object.__setattr__(out, "accounts", {name: account for name, account in config.accounts.items()
                                         if name not in config.database_accounts})
    object.__setattr__(out, "database_accounts", None)
    return out


class Runtime:
    """What the jobs of one worker process share: the config, an Engine per thread, the
    schedule, the stop flag (set on SIGTERM) and the running watchers' stop events."""

    def __init__(self, config: Config):
        from .storage.database import postgres_engine

        if config.database is None:
            raise ConfigError("gwsync worker needs [database] url: the jobs, their locks and the stores live in "
                              "PostgreSQL (see Company deployment in the README)")
        # The config file's accounts; the database's join them (refresh). A config from the command
        # line has them merged already: taken apart, or no refresh could merge them again.
        self.file_config = _file_part(config)
        self.config = config
        self._records: list | None = None
        self._refresh_lock = threading.Lock()
        self._refreshed = 0.0  # time.monotonic() of the last refresh
        self._slots_seen: tuple[int, int] | None = None  # (shards, slots) last logged
        self.app: Any = None
        self.stopping = threading.Event()
        self.watch_stops: set[asyncio.Event] = set()
        self._local = threading.local()
        self._engines: list = []
        self._engines_lock = threading.Lock()
        secret = config.database.secret
        self.db = postgres_engine(config.database.url, "schedule database",
                                  secret.resolve if secret is not None else None)
        self.schedule = Schedule(self.db, config.worker.max_backoff)
        from .engine import store_database
        from .storage.state import StateStore

        self.state = StateStore(*store_database(config, config.state_database))

    def refresh(self) -> None:
        """The accounts kept in the database (`gwsync accounts add/import/remove`) as they are
        now, after the config file's: asked by every tick, so a worker serves a new account
        without a restart. A new set of accounts gives each thread a new Engine."""
        self.refresh_within(0)

    def refresh_within(self, seconds: float) -> None:
        """refresh, unless one ran less than `seconds` ago (the watchers' checks: at 10,000
        accounts a read of them takes about 70 ms)."""
        with self._refresh_lock:  # the tick and the watchers' checks, in threads of their own
            if seconds and time.monotonic() - self._refreshed < seconds:
                return
            self._refresh()
            self._refreshed = time.monotonic()

    def _refresh(self) -> None:
        from .accounts import merged

        records = self.state.accounts()
        if records != self._records:
            try:
                self.config = merged(self.file_config, records)
            except ConfigError as exc:  # a name in both: the accounts as they were, until it is fixed
                log.error("%s", exc)
                return
            self._records = records

    def engine(self):
        """This thread's Engine (Procrastinate runs sync jobs in a thread pool)."""
        from .engine import Engine

        engine = getattr(self._local, "engine", None)
        if engine is not None and engine.config is not self.config:  # the accounts changed
            engine.close()
            with self._engines_lock:
                self._engines.remove(engine)
            engine = None
        if engine is None:
            engine = self._local.engine = Engine(self.config)
            with self._engines_lock:
                self._engines.append(engine)
        return engine

    def close(self) -> None:
        for engine in self._engines:
            engine.close()
        self.state.close()
        self.db.dispose()

    def stop(self) -> None:
        self.stopping.set()
        for event in list(self.watch_stops):
            event.set()

    # -- what the tick wants --

    def due_wanted(self) -> dict[tuple[str, str], int]:
        return {(a.name, area): a.interval for a in self.config.accounts.values() for area in a.areas}

    def watched(self) -> list[str]:
        return sorted(a.name for a in self.config.accounts.values() if "mail" in a.areas and a.imap is not None)

    def shards(self, slots: int = 0) -> int:
        return shard_count(len(self.watched()), self.config.worker.shard_size, slots)

    # -- sync job --

    def run_sync(self, account: str, area: str) -> dict:
        if account not in self.config.accounts or area not in self.config.accounts[account].areas:
            log.warning("sync job for %s/%s: no such account and area in this worker's config; skipped", account, area)
            return {"skipped": True}
        interval = self.config.accounts[account].interval
        self.schedule.started(account, area)
        # A short wait for the account's lock: busy (a `gwsync sync` elsewhere, or a run of a
        # worker thought dead that still holds it) is due again at the next tick; a worker slot
        # is not blocked for the whole [state] lock_wait.
        report = self.engine().sync([account], only=[area], holder="worker", should_stop=self.stopping.is_set,
                                    lock_wait=min(self.config.state.lock_wait, LOCK_WAIT))
        result = report.accounts.get(account)
        changed = _changed(result)
        error = result.error if result is not None else None
        busy = bool(result and result.busy)
        self.schedule.finished(account, area, interval, changed, busy, error)
        if error:
            log.warning("%s", error)
        if report.stopped:  # the database or disk: fail the job, the tick defers it again
            raise GwsyncError(report.stopped)
        return {"changed": changed, "error": error, "busy": busy}

    # -- deferring --

    async def defer_sync(self, account: str, area: str) -> bool:
        """Defer a sync job; False when one is waiting already (it will see the news)."""
        from procrastinate import exceptions

        try:
            await self.app.configure_task("gwsync.sync", lock=f"account:{account}",
                                          queueing_lock=f"sync:{account}:{area}"
                                          ).defer_async(account=account, area=area)
            return True
        except exceptions.AlreadyEnqueued:
            return False

    async def defer_watch(self, shard: int, shards: int) -> None:
        from procrastinate import exceptions

        try:
            # One watcher of a shard number at a time (lock); one waiting per shard of this
            # shape (queueing lock), so that a new shape is queued at once beside the old.
            task = self.app.configure_task("gwsync.watch", lock=f"watch:{shard}",
                                           queueing_lock=f"watch:{shard}/{shards}")
            await task.defer_async(shard=shard, shards=shards)
        except exceptions.AlreadyEnqueued:
            pass

    async def requeue_stalled(self) -> None:
        """Jobs of workers whose heartbeat stopped go back to the queue. One that cannot (a
        job for the same account and area, or shard, waits already) is ended as failed: the
        waiting one does its work."""
        from procrastinate import exceptions
        from procrastinate.jobs import Status

        manager = self.app.job_manager
        stalled = self.config.worker.stalled_after
        for job in await manager.get_stalled_jobs(seconds_since_heartbeat=stalled):
            try:
                await manager.retry_job(job)
                log.warning("job %s %s of a worker that stopped answering: queued again", job.id, job.call_string)
            except exceptions.UniqueViolation:
                await manager.finish_job_by_id_async(job.id, Status.FAILED, delete_job=False)
                log.warning("job %s %s of a worker that stopped answering: ended, the same job waits already",
                            job.id, job.call_string)
        await manager.prune_stalled_workers(stalled)

    async def tick(self, timestamp: int = 0) -> None:
        await self.requeue_stalled()
        await asyncio.to_thread(self.refresh)
        if timestamp % CLEAN_EVERY < self.config.worker.tick:  # about once in CLEAN_EVERY seconds
            await self.app.job_manager.delete_old_jobs(nb_hours=KEEP_JOBS_HOURS, include_failed=True,
                                                       include_cancelled=True, include_aborted=True)
        slots = await asyncio.to_thread(self.schedule.watch_slots, self.config.worker.stalled_after)
        shards = self.shards(slots)
        if slots and shards > slots and self._slots_seen != (shards, slots):
            log.warning("%d shards of watched accounts but %d watcher slots among the live workers: %d shards "
                        "are not watched (their accounts sync at their interval); raise [worker] watchers or "
                        "shard_size, or start more workers", shards, slots, shards - slots)
        self._slots_seen = (shards, slots)
        for shard in range(shards):
            await self.defer_watch(shard, shards)
        lease = 2 * self.config.worker.stalled_after
        for account, area in await asyncio.to_thread(self.schedule.claim_due, self.due_wanted(), lease):
            await self.defer_sync(account, area)

    # -- watcher job --

    async def watch(self, shard: int, shards: int, job_id: int | None = None) -> None:
        """Watch the shard's accounts until [worker] watch_for is over, SIGTERM, or a check
        (every [worker] tick seconds) finds the shard outdated: the tick queued watchers of
        another shape since this job was queued (workers came or went, accounts changed their
        count), or the accounts of this shard are no longer the ones watched (one removed or
        added). The tick keeps the next watcher of each shard queued."""
        from .mail.asyncwatch import target_of, watch_accounts

        if self.stopping.is_set() or await asyncio.to_thread(self._superseded, shards, job_id):
            return
        names = self._shard_names(shard, shards)
        targets = []
        for name in names:
            account = self.config.accounts[name]
            try:
                if await asyncio.to_thread(self.engine_is_locked, account):
                    continue  # a refused credential: `gwsync unlock` first
                targets.append(target_of(account))
            except GwsyncError as exc:
                log.warning("account %s is not watched: %s", name, exc)
        stop = asyncio.Event()
        self.watch_stops.add(stop)
        handle = asyncio.get_running_loop().call_later(self.config.worker.watch_for, stop.set)
        checks = asyncio.create_task(self._watch_checks(shard, shards, job_id, names, stop))

        async def changed(name: str) -> None:
            await self.defer_sync(name, "mail")

        try:
            await watch_accounts(targets, changed, stop, refused=self._refused, look_at_start=False)
        finally:
            handle.cancel()
            checks.cancel()
            self.watch_stops.discard(stop)

    def _shard_names(self, shard: int, shards: int) -> list[str]:
        return [name for name in self.watched() if shard_of(name, shards) == shard]

    async def _watch_checks(self, shard: int, shards: int, job_id: int | None, names: list[str],
                            stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(self.config.worker.tick)
            try:
                await asyncio.to_thread(self.refresh_within, self.config.worker.tick)
                if self._shard_names(shard, shards) != names:
                    log.info("watcher %d/%d: its accounts changed; the next watcher of the shard takes over",
                             shard, shards)
                elif await asyncio.to_thread(self._superseded, shards, job_id):
                    log.info("watcher %d/%d: the shards changed (workers came or went); ending", shard, shards)
                else:
                    continue
            except GwsyncError as exc:  # the database: watch on, the next check tries again
                log.warning("watcher %d/%d: %s", shard, shards, exc)
                continue
            stop.set()
            return

    def _superseded(self, shards: int, job_id: int | None) -> bool:
        """Whether a watcher job of another number of shards was queued after `job_id`."""
        from .storage.database import read

        if job_id is None:
            return False
        with read(self.db) as conn:
            return conn.execute(sa.text(
                "SELECT EXISTS (SELECT 1 FROM procrastinate_jobs WHERE task_name = 'gwsync.watch' AND id > :id "
                "AND (args->>'shards')::int <> :shards)"), {"id": job_id, "shards": shards}).scalar() is True

    def engine_is_locked(self, account) -> bool:
        return self.engine().is_locked(account, "imap")

    async def _refused(self, name: str, exc) -> None:
        error = await asyncio.to_thread(self.engine().lock_refused, self.config.accounts[name], "imap", exc)
        log.error("%s", error)


# -- the Procrastinate app -------------------------------------------------------------------------------

def make_app(runtime: Runtime):
    """The app on [database] url with gwsync's three tasks."""
    from procrastinate import App, PsycopgConnector

    config = runtime.config
    assert config.database is not None
    kwargs: dict[str, Any] = {"conninfo": config.database.url, "min_size": 1, "max_size": config.worker.concurrency + 4}
    if config.database.secret is not None:
        kwargs["kwargs"] = {"password": config.database.secret.resolve()}
    app = App(connector=PsycopgConnector(**kwargs))

    @app.task(name="gwsync.sync", queue=SYNC_QUEUE, pass_context=True)
    def sync(context, account: str, area: str) -> dict:
        return context.additional_context["gwsync"].run_sync(account, area)

    @app.task(name="gwsync.watch", queue=WATCH_QUEUE, pass_context=True)
    async def watch(context, shard: int, shards: int) -> None:
        await context.additional_context["gwsync"].watch(shard, shards, context.job.id)

    # Six fields: the seconds are the last one (croniter); "*/5 * * * * *" would be every
    # second of every fifth minute.
    @app.periodic(cron=f"* * * * * */{config.worker.tick}", periodic_id="tick")
    @app.task(name="gwsync.tick", queue=TICK_QUEUE, queueing_lock="tick", pass_context=True)
    async def tick(context, timestamp: int) -> None:
        await context.additional_context["gwsync"].tick(timestamp)

    runtime.app = app
    return app


PROCRASTINATE_LOCK = zlib.crc32(b"gwsync procrastinate schema")


def apply_schema(runtime: Runtime) -> bool:
    """Procrastinate's tables, if the database has none yet; gwsync's schedule table. Returns
    whether Procrastinate's schema was applied now. Workers starting at once: one applies it."""
    from procrastinate import schema

    from .storage.database import shown, write

    assert runtime.config.database is not None
    label = shown(runtime.config.database.url)
    runtime.schedule.create(label)
    with write(runtime.db) as conn:
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": PROCRASTINATE_LOCK})
        if conn.execute(sa.text("SELECT to_regclass('procrastinate_jobs')")).scalar() is not None:
            return False
        # By the driver itself, without parameters: the schema's text has % signs in it.
        conn.connection.dbapi_connection.execute(schema.SchemaManager.get_schema())  # type: ignore[union-attr]
    log.info("applied Procrastinate's schema to %s", label)
    return True


async def _serve(runtime: Runtime, concurrency: int) -> None:
    from procrastinate.worker import Worker

    app = make_app(runtime)
    settings = runtime.config.worker
    heartbeat = max(0.5, settings.stalled_after / 5)  # a few missed beats are not a death
    async with app.open_async():
        common: dict[str, Any] = {"install_signal_handlers": False, "additional_context": {"gwsync": runtime},
                                  "update_heartbeat_interval": heartbeat,
                                  "stalled_worker_timeout": settings.stalled_after,
                                  "fetch_job_polling_interval": settings.tick}
        workers = [Worker(app, queues=[SYNC_QUEUE], concurrency=concurrency, name="gwsync-sync", **common),
                   Worker(app, queues=[TICK_QUEUE], concurrency=1, name="gwsync-tick", delete_jobs="successful",
                          **common)]
        if settings.watchers:
            workers.append(Worker(app, queues=[WATCH_QUEUE], concurrency=settings.watchers, name="gwsync-watch",
                                  **common))
        loop = asyncio.get_running_loop()
        register = functools.partial(_register, runtime, workers[0], settings.watchers, concurrency)

        def stop() -> None:
            log.info("stopping: the jobs at hand end between batches")
            runtime.stop()
            for worker in workers:
                worker.stop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop)
        try:
            await asyncio.gather(*(_run(worker, runtime, register if worker is workers[0] else None)
                                   for worker in workers))
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)


async def _register(runtime: Runtime, worker, watchers: int, concurrency: int) -> None:
    """Once the sync worker is registered with Procrastinate: this process's row in
    gwsync_workers (its heartbeat is that worker's), which the tick counts for the shards."""
    import os
    import socket

    while worker.worker_id is None:
        await asyncio.sleep(0.1)
    await asyncio.to_thread(runtime.schedule.register, worker.worker_id, socket.gethostname(), os.getpid(),
                            watchers, concurrency)


async def _run(worker, runtime: Runtime, register: Callable[[], Coroutine[Any, Any, None]] | None = None) -> None:
    """`worker.run()` (and `register` once it runs), and again after the worker was taken for
    dead: frozen (SIGSTOP, a paused VM) or cut off longer than [worker] stalled_after, another
    worker's tick queued its jobs again and deleted its registration. Woken, it notices that
    (`_registered`, or its next fetch of a job fails on its unknown id), lets its jobs at hand
    end (the account locks' fence refuses their writes), registers anew and goes on."""
    import psycopg
    from procrastinate import exceptions

    while True:
        pruned = asyncio.Event()
        tasks = [asyncio.create_task(_registered(worker, runtime, pruned))]
        if register is not None:
            tasks.append(asyncio.create_task(register()))
        try:
            await worker.run()
        except exceptions.ConnectorException as exc:
            cause = exc.__cause__
            if runtime.stopping.is_set() or not (isinstance(cause, psycopg.errors.ForeignKeyViolation)
                                                 and "worker_id" in str(cause)):
                raise
            pruned.set()
        finally:
            for task in tasks:
                task.cancel()
        if runtime.stopping.is_set() or not pruned.is_set():
            return
        log.warning("%s was taken for dead (no heartbeat for %d s: frozen or cut off from the database); "
                    "other workers took its jobs; it registers again", worker.worker_name,
                    runtime.config.worker.stalled_after)


async def _registered(worker, runtime: Runtime, pruned: asyncio.Event) -> None:
    """Every few heartbeats: is the worker still registered? Not: stop it (its jobs at hand end
    first), and `_run` starts it again. A fetch of a job finds it out only when one is waiting."""
    every = max(0.5, runtime.config.worker.stalled_after / 5)
    query = sa.text("SELECT count(*) FROM procrastinate_workers WHERE id = :id")

    def known(worker_id: int) -> bool:
        with runtime.db.connect() as conn:
            return bool(conn.execute(query, {"id": worker_id}).scalar())

    while True:
        await asyncio.sleep(every)
        worker_id = worker.worker_id
        if worker_id is None:
            continue
        try:
            if await asyncio.to_thread(known, worker_id):
                continue
        except GwsyncError:
            continue  # the database is away: the worker's own queries say so
        pruned.set()
        worker.stop()
        return


def run_worker(config: Config, concurrency: int | None = None) -> None:
    """`gwsync worker`: until SIGTERM or SIGINT. The database unreachable or gone away: one
    StoreError line (exit 1); a supervisor such as systemd starts the worker again."""
    import psycopg
    from procrastinate import exceptions

    from .errors import StoreError
    from .storage.database import shown, unreachable

    runtime = Runtime(config)
    assert config.database is not None
    label = shown(config.database.url)
    try:
        apply_schema(runtime)
        runtime.refresh()
        asyncio.run(_serve(runtime, concurrency or config.worker.concurrency))
    except psycopg.OperationalError as exc:
        raise unreachable("job queue database", label, exc) from exc
    except exceptions.ProcrastinateException as exc:
        cause = exc.__cause__ or exc
        if isinstance(cause, psycopg.OperationalError):
            raise unreachable("job queue database", label, cause) from exc
        raise StoreError(f"the job queue on {label} failed ({cause}): see the log above, then start the worker "
                         "again", Path(label)) from exc
    finally:
        runtime.close()


@contextmanager
def open_runtime(config: Config) -> Iterator[Runtime]:
    """A Runtime with its schema applied, for tests and tools."""
    runtime = Runtime(config)
    try:
        apply_schema(runtime)
        yield runtime
    finally:
        runtime.close()

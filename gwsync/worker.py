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
- `gwsync.tick` (queue "tick", Procrastinate periodic every [worker] tick seconds, once across
  all workers): in this order, re-queue the jobs of workers whose heartbeat stopped
  ([worker] stalled_after), queue a watcher job per shard, and defer a sync job for every
  account and area whose `next_due` has come (claimed by pushing `next_due` on by a lease of
  twice stalled_after in the same statement, so two ticks never defer one twice, and a tick
  killed before deferring leaves it due again after the lease; the job's end sets the backoff).
  About every 5 minutes it deletes finished jobs older than a day; a tick that succeeded is
  deleted at once.

Scheduling state lives in table `gwsync_schedule` (account, area, last run, next due, backoff,
last error). Procrastinate's own schema is applied at the worker's start when the database has
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
import logging
import math
import signal
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
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
SCHEDULE_VERSION = 1


class Schedule:
    """Per account and area: when it is due and how long it waits when nothing changes."""

    def __init__(self, engine: sa.Engine, max_backoff: int):
        self.engine = engine
        self.max_backoff = max_backoff

    def create(self, label: str) -> None:
        from .storage.database import pg_upgrade

        pg_upgrade(self.engine, "schedule", SCHEDULE_VERSION, "schedule database", label,
                   lambda conn: SCHEDULE.metadata.create_all(conn), [])

    def claim_due(self, wanted: dict[tuple[str, str], int], lease: int = 60) -> list[tuple[str, str]]:
        """The (account, area) pairs of `wanted` (pair -> interval) due now; each is pushed on
        by `lease` seconds in the same statement, and its job's end sets the real next time. A
        tick that died between claiming and deferring leaves its claims due again after the
        lease, not after the backoff. New pairs are due at once."""
        from sqlalchemy.dialects.postgresql import insert

        from .storage.database import write

        if not wanted:
            return []
        with write(self.engine) as conn:
            conn.execute(insert(SCHEDULE).values([
                {"account": a, "area": area, "next_due": sa.func.now(), "backoff": interval}
                for (a, area), interval in wanted.items()]).on_conflict_do_nothing())
            rows = conn.execute(
                SCHEDULE.update()
                .where(SCHEDULE.c.next_due <= sa.func.now())
                .values(next_due=sa.func.now() + sa.func.make_interval(0, 0, 0, 0, 0, 0, lease))
                .returning(SCHEDULE.c.account, SCHEDULE.c.area)).all()
        return [(a, area) for a, area in rows if (a, area) in wanted]

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


# -- the worker process's shared state ------------------------------------------------------------------

def _changed(report: Any) -> bool:
    """Whether a sync moved anything: mail imported or archived, calendar items written."""
    if report is None:
        return False
    if report.mail is not None and (report.mail.imported or report.mail.archived_again):
        return True
    return any(v for result in report.calendars.values() for k, v in result.counts.items() if k != "conflicts")


class Runtime:
    """What the jobs of one worker process share: the config, an Engine per thread, the
    schedule, the stop flag (set on SIGTERM) and the running watchers' stop events."""

    def __init__(self, config: Config):
        from .storage.database import postgres_engine

        if config.database is None:
            raise ConfigError("gwsync worker needs [database] url: the jobs, their locks and the stores live in "
                              "PostgreSQL (see Company deployment in the README)")
        self.file_config = config  # the config file's accounts; the database's join them (refresh)
        self.config = config
        self._records: list | None = None
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

    def shards(self) -> int:
        watched = self.watched()
        return math.ceil(len(watched) / self.config.worker.shard_size) if watched else 0

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
            await self.app.configure_task("gwsync.watch", lock=f"watch:{shard}",
                                          queueing_lock=f"watch:{shard}").defer_async(shard=shard, shards=shards)
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
        shards = self.shards()
        for shard in range(shards):
            await self.defer_watch(shard, shards)
        lease = 2 * self.config.worker.stalled_after
        for account, area in await asyncio.to_thread(self.schedule.claim_due, self.due_wanted(), lease):
            await self.defer_sync(account, area)

    # -- watcher job --

    async def watch(self, shard: int, shards: int) -> None:
        from .mail.asyncwatch import target_of, watch_accounts

        if shards != self.shards():
            return  # the accounts changed since it was queued: the tick queues the new shards
        targets = []
        for name in self.watched():
            if shard_of(name, shards) != shard:
                continue
            account = self.config.accounts[name]
            try:
                if await asyncio.to_thread(self.engine_is_locked, account):
                    continue  # a refused credential: `gwsync unlock` first
                targets.append(target_of(account))
            except GwsyncError as exc:
                log.warning("account %s is not watched: %s", name, exc)
        stop = asyncio.Event()
        if self.stopping.is_set():
            return
        self.watch_stops.add(stop)
        handle = asyncio.get_running_loop().call_later(self.config.worker.watch_for, stop.set)
        async def changed(name: str) -> None:
            await self.defer_sync(name, "mail")

        try:
            await watch_accounts(targets, changed, stop, refused=self._refused, look_at_start=False)
        finally:
            handle.cancel()
            self.watch_stops.discard(stop)

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
        await context.additional_context["gwsync"].watch(shard, shards)

    @app.periodic(cron=f"*/{config.worker.tick} * * * * *", periodic_id="tick")
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

        def stop() -> None:
            log.info("stopping: the jobs at hand end between batches")
            runtime.stop()
            for worker in workers:
                worker.stop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop)
        try:
            await asyncio.gather(*(_run(worker, runtime) for worker in workers))
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)


async def _run(worker, runtime: Runtime) -> None:
    """`worker.run()`, and again after the worker was taken for dead: frozen (SIGSTOP, a paused
    VM) or cut off longer than [worker] stalled_after, another worker's tick queued its jobs
    again and deleted its registration, so its next fetch of a job fails on its unknown id. Its
    jobs at hand were refused by the account locks' fence; it registers anew and goes on."""
    import psycopg
    from procrastinate import exceptions

    while True:
        try:
            await worker.run()
            return
        except exceptions.ConnectorException as exc:
            cause = exc.__cause__
            if runtime.stopping.is_set() or not (isinstance(cause, psycopg.errors.ForeignKeyViolation)
                                                 and "worker_id" in str(cause)):
                raise
            log.warning("%s was taken for dead (no heartbeat for %d s: frozen or cut off from the database); "
                        "other workers took its jobs; it registers again", worker.worker_name,
                        runtime.config.worker.stalled_after)


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

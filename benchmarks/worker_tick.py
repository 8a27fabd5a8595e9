"""What one tick of `gwsync worker` costs in the database, at 1,000 and 10,000 accounts, before
and after the tick stopped writing every schedule row each time; side by side from one run.

A throw-away PostgreSQL (the tests' tests/pg_server.py: Debian's postgresql package, a cluster
in a temporary directory). For each size, two fresh databases: "before" runs the tick's old
statement (INSERT ... ON CONFLICT DO NOTHING of every account and area, then the claim),
"after" runs Schedule.claim_due as the worker does now. The first tick inserts every row in
both; the figures that matter are the steady ticks after it (nothing due: every account waits
for its backoff), the median of TICKS ticks. "nan" is a tick that failed: the old statement
sent more than the 65,535 parameters PostgreSQL takes in one statement from 21,846 accounts
and areas on. Reading the accounts kept in the database
(StateStore.accounts, which every tick does to see added and removed accounts) is timed too.

    python benchmarks/worker_tick.py [--areas 2] [--ticks 30]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from functools import partial

import sqlalchemy as sa

import _setup

sys.path.insert(0, str(_setup.ROOT / "tests"))

from gwsync.errors import StoreError
from gwsync.storage.database import postgres_engine, write
from gwsync.storage.state import AccountRecord, StateStore
from gwsync.worker import SCHEDULE, Schedule
from pg_server import PostgresServer

AREAS = ("mail", "events", "tasks")


def claim_before(engine: sa.Engine, wanted: dict, lease: int = 60) -> list:
    """The tick's statement before: every wanted pair upserted at every tick, then the claim."""
    from sqlalchemy.dialects.postgresql import insert

    with write(engine) as conn:
        conn.execute(insert(SCHEDULE).values([
            {"account": a, "area": area, "next_due": sa.func.now(), "backoff": interval}
            for (a, area), interval in wanted.items()]).on_conflict_do_nothing())
        rows = conn.execute(
            SCHEDULE.update().where(SCHEDULE.c.next_due <= sa.func.now())
            .values(next_due=sa.func.now() + sa.func.make_interval(0, 0, 0, 0, 0, 0, lease))
            .returning(SCHEDULE.c.account, SCHEDULE.c.area)).all()
    return [(a, area) for a, area in rows if (a, area) in wanted]


def timed(tick, ticks: int) -> tuple[float, float]:
    """(first tick, median of the next `ticks`) in milliseconds."""
    started = time.perf_counter()
    tick()
    first = (time.perf_counter() - started) * 1000
    times = []
    for _ in range(ticks):
        started = time.perf_counter()
        assert tick() == [], "nothing is due in a steady tick"
        times.append((time.perf_counter() - started) * 1000)
    return first, statistics.median(times)


def measure(server: PostgresServer, accounts: int, areas: int, ticks: int) -> dict:
    wanted = {(f"user{i:05d}", area): 600 for i in range(accounts) for area in AREAS[:areas]}
    out = {}
    for label in ("before", "after"):
        database = server.new_database(f"tick_{label}")
        engine = postgres_engine(server.url(database), "schedule database")
        schedule = Schedule(engine, max_backoff=720)
        schedule.create(database)
        tick = partial(claim_before, engine, wanted) if label == "before" else partial(schedule.claim_due, wanted)
        try:
            out[label] = timed(tick, ticks)
        except StoreError as exc:  # the old statement at 30,000 pairs: over PostgreSQL's 65,535 parameters
            print(f"  {label}, {accounts} accounts: {exc}", file=sys.stderr)
            out[label] = (math.nan, math.nan)
        engine.dispose()
        server.drop_database(database)
    database = server.new_database("tick_accounts")
    state = StateStore(server.url(database))
    state.save_accounts([AccountRecord(name=f"user{i:05d}", username=f"user{i:05d}") for i in range(accounts)])
    times = []
    for _ in range(5):
        started = time.perf_counter()
        assert len(state.accounts()) == accounts
        times.append((time.perf_counter() - started) * 1000)
    out["accounts read"] = statistics.median(times)
    state.close()
    server.drop_database(database)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--areas", type=int, default=1, choices=(1, 2, 3))
    parser.add_argument("--ticks", type=int, default=30)
    args = parser.parse_args()
    with PostgresServer.start() as server:
        print(f"tick's schedule statements on PostgreSQL, {args.areas} area(s) per account, "
              f"median of {args.ticks} steady ticks")
        print(f"{'accounts':>8} | {'first tick before':>17} | {'first tick after':>16} | "
              f"{'steady before':>13} | {'steady after':>12} | {'accounts read':>13}")
        for accounts in (1000, 10000):
            r = measure(server, accounts, args.areas, args.ticks)
            print(f"{accounts:>8} | {r['before'][0]:>14.1f} ms | {r['after'][0]:>13.1f} ms | "
                  f"{r['before'][1]:>10.1f} ms | {r['after'][1]:>9.1f} ms | {r['accounts read']:>10.1f} ms")


if __name__ == "__main__":
    main()

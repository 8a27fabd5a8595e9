"""The worker's tick, shards and the schedule as `gwsync status` shows it, on a real PostgreSQL
(the `pg_url` fixture); the shard arithmetic as unit tests.

What the tick writes is counted with a SQLAlchemy cursor hook: a tick that finds nothing new
must not send the accounts' list again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime

import psycopg
import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st

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

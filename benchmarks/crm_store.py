"""The CRM store's cost on SQLite, this checkout against another revision's (main), and on PostgreSQL.

    python benchmarks/crm_store.py [--activities 10000] [--batch 250] [--runs 3] [--against main]
                                   [--no-postgres]

For each store a fresh database per run, then, timed on their own:
  - create: the activities written with create_activities_marked in batches of --batch (as the
    mail import writes them: mail with sender, recipients, participants; every fifth with a
    document), then the same batches again (all keys known: nothing created);
  - existing_keys: all keys at once; list: every activity; page: the newest 50 involving one
    employee (the web view's "Mine"); count: all activities.
Best of --runs, in seconds. The revision compared (--against, default main) is taken with
`git archive` into a temporary directory and measured in its own process, like this checkout.
PostgreSQL: a throw-away cluster (tests/pg_server.py; durability off there, so its figures
show the statements' cost, not a disk's). Figures only, no assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MEASURE = r"""
import json, sys, tempfile, time
from pathlib import Path
from gwsync.crm import ActivityDraft, ActivityFilter, Document
from gwsync.crm.embedded import EmbeddedCRM

n, batch, runs, target = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
urls = sys.argv[5:]

def drafts(run):
    for i in range(n):
        yield ActivityDraft(
            key=f"{run}:{i:064d}", kind="MAILEIN", status="E", subject=f"Angebot {i}", body="Text " * 40,
            sender=f"kunde{i % 300}@acme{i % 40}.example", message_id=f"<{i}@bench>",
            source="bench:INBOX/CRM Erledigt [E]", owner=f"user{i % 7}", unassigned=i % 3 == 0,
            recipients_to=[f"user{i % 7}@firma.example"], participants=[f"user{i % 7}", f"user{(i + 1) % 7}"],
            documents=[Document("a.pdf", "application/pdf", 1000, f"{i:064x}")] if i % 5 == 0 else [])

best = {}
for run in range(runs):
    with tempfile.TemporaryDirectory() as tmp:
        database = urls[run] if urls else Path(tmp) / "crm.db"
        store = EmbeddedCRM(database, Path(tmp) / "documents", {"E": "Erledigt"}, "x{id}")
        items = list(drafts(run))
        timings = {}
        started = time.perf_counter()
        for start in range(0, n, batch):
            store.create_activities_marked(items[start:start + batch])
        timings["create"] = time.perf_counter() - started
        started = time.perf_counter()
        for start in range(0, n, batch):
            store.create_activities_marked(items[start:start + batch])
        timings["create again"] = time.perf_counter() - started
        keys = [d.key for d in items]

        def timed(name, work, check, times=5):  # reads: the best of a few, the machine may be busy
            for _ in range(times):
                started = time.perf_counter()
                result = work()
                timings[name] = min(time.perf_counter() - started, timings.get(name, float("inf")))
                assert check(result), name
        mine = ActivityFilter(involving="user3", newest_first=True, limit=50)
        timed("page", lambda: store.list_activities(mine), lambda r: len(r) == 50, times=1)  # makes the statement
        timed("page again", lambda: store.list_activities(mine), lambda r: len(r) == 50)
        timed("existing_keys", lambda: store.existing_keys(keys), lambda r: len(r) == n)
        timed("list", lambda: store.list_activities(ActivityFilter()), lambda r: len(r) == n)
        timed("count", lambda: store.count_activities(ActivityFilter()), lambda r: r == n)
        store.close()
    for name, value in timings.items():
        best[name] = min(value, best.get(name, value))
print(json.dumps(best))
"""


def measure(pythonpath: Path, args, urls: list[str] = ()) -> dict:
    done = subprocess.run([sys.executable, "-c", MEASURE, str(args.activities), str(args.batch), str(args.runs),
                           "x", *urls], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(pythonpath)}, cwd=tempfile.gettempdir())
    if done.returncode != 0:
        raise SystemExit(f"measuring at {pythonpath} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--activities", type=int, default=10000)
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--against", default="main", help="the git revision to compare with (default main)")
    parser.add_argument("--no-postgres", action="store_true", help="leave PostgreSQL out")
    args = parser.parse_args()

    columns: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as other:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.against, "gwsync"], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", other], input=archive, check=True)
        columns[f"SQLite, {args.against}"] = measure(Path(other), args)
    columns["SQLite, this checkout"] = measure(ROOT, args)
    if not args.no_postgres:
        sys.path.insert(0, str(ROOT / "tests"))
        sys.path.insert(0, str(ROOT))
        from pg_server import PostgresServer

        with PostgresServer.start() as server:
            urls = [server.url(server.new_database("bench")) for _ in range(args.runs)]
            columns["PostgreSQL, this checkout"] = measure(ROOT, args, urls)

    print(f"{args.activities} activities in batches of {args.batch}, best of {args.runs} (seconds)")
    names = list(next(iter(columns.values())))
    width = max(len(c) for c in columns) + 2
    print(f"{'':16}" + "".join(f"{c:>{width}}" for c in columns))
    for name in names:
        print(f"{name:16}" + "".join(f"{columns[c][name]:>{width}.3f}" for c in columns))


if __name__ == "__main__":
    main()

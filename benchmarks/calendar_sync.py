"""Calendar sync cost on a 5,000-event collection, next to vdirsyncer on the same data.

    python benchmarks/calendar_sync.py [--events 5000] [--changes 10] [--runs 5]

Starts a throw-away Radicale (logging every request), loads two identical collections in one
PUT each, and prints for gwsync (CRM <-> CalDAV) and vdirsyncer (CalDAV <-> a local folder;
`pip install vdirsyncer`, skipped with a note if missing):
  - start-up alone: the command's `--version`, best of --runs;
  - first sync, a sync with no changes (best and median of --runs), and a sync after another
    client changed N items: wall time and HTTP requests (counted by the server, so both tools
    are counted alike);
  - for gwsync's first sync, the server's own time for the PUTs that write the CRM link back
    (summed from Radicale's log), and the ratio of the whole sync to it.
Both tools run as the command a user types (`gwsync sync --only events`, `vdirsyncer sync`), each
in a new process, so both figures include the interpreter's start-up and the imports.
Targets (issues 3 and 12): a no-change sync costs one request per collection and less time
than vdirsyncer's; the first sync costs at most 1.2x the server's PUT time for the link
write-back. Figures only, no assertions.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from caldav.davclient import DAVClient

import _setup  # puts this checkout of gwsync first on sys.path
from gwsync.config import load_config
from gwsync.crm import ActivityFilter
from gwsync.demo.localservers import Radicale
from gwsync.engine import Engine


def calendar(n: int, prefix: str) -> str:
    events = []
    for i in range(n):
        day = 1 + i % 28
        events.append(
            f"BEGIN:VEVENT\r\nUID:{prefix}-{i}@bench.example\r\nDTSTAMP:20261120T100000Z\r\n"
            f"DTSTART:202612{day:02d}T{8 + i % 9:02d}0000Z\r\nDTEND:202612{day:02d}T{9 + i % 9:02d}0000Z\r\n"
            f"SUMMARY:Termin {i}\r\nDESCRIPTION:Beschreibung {i}\r\nLOCATION:Raum {i % 20}\r\nEND:VEVENT\r\n")
    return "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//bench//EN\r\n" + "".join(events) + "END:VCALENDAR\r\n"


def load(server: Radicale, user: str, n: int) -> str:
    """One PUT of a whole VCALENDAR to a new collection URL (fast bulk load in Radicale)."""
    home = server.add_user(user)
    client = DAVClient(home, username=user, password=server.password_for(user))
    response = client.request(home + "calendar/", "PUT", calendar(n, user),
                              {"Content-Type": "text/calendar; charset=utf-8"})
    assert response.status in (200, 201), response.status
    client.request(home + "tasks/", "MKCALENDAR", "", {})
    return home


def put_seconds(server: Radicale, since_line: int) -> float:
    lines = (server.directory / "radicale.log").read_text(errors="replace").splitlines()[since_line:]
    return sum(float(m.group(1)) for line in lines
               if (m := re.search(r"PUT response status for .* in ([0-9.]+) seconds", line)))


def log_lines(server: Radicale) -> int:
    return len((server.directory / "radicale.log").read_text(errors="replace").splitlines())


def change_items(server: Radicale, home: str, user: str, count: int, prefix: str) -> None:
    """Another client edits `count` events (GET + conditional PUT each); not measured."""
    client = DAVClient(home, username=user, password=server.password_for(user))
    listing = client.request(home + "calendar/", "PROPFIND",
                             '<d:propfind xmlns:d="DAV:"><d:prop><d:getetag/></d:prop></d:propfind>',
                             {"Depth": "1"})
    hrefs = sorted(set(re.findall(r"<[^>]*href>([^<]+\.ics)</", _text(listing))))[:count]
    for href in hrefs:
        url = home.split(f"/{user}/")[0] + href
        got = client.request(url, "GET")
        text = _text(got).replace("SUMMARY:Termin", f"SUMMARY:{prefix} Termin")
        client.request(url, "PUT", text, {"If-Match": got.headers["ETag"], "Content-Type": "text/calendar"})


def _text(response) -> str:
    raw = response.raw
    return raw.decode() if isinstance(raw, bytes) else raw


def measure(server: Radicale, action) -> tuple[float, int]:
    before = server.request_count()
    start = time.perf_counter()
    action()
    return time.perf_counter() - start, server.request_count() - before


def repeated(server: Radicale, action, runs: int) -> tuple[float, float, int]:
    """Best and median wall time of `runs` runs, and the requests of the last one."""
    times, requests = [], 0
    for _ in range(runs):
        seconds, requests = measure(server, action)
        times.append(seconds)
    return min(times), statistics.median(times), requests


def installed_env() -> dict[str, str]:
    """The environment for a tool's process, without PYTHONDONTWRITEBYTECODE: an installed tool
    starts from cached bytecode, and compiling the sources every run would be counted against it."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def command(name: str) -> str | None:
    """A tool installed beside this interpreter (a virtualenv's bin/), else on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def bench_gwsync(server: Radicale, home: str, user: str, workdir: Path, changes: int, runs: int) -> dict:
    config = workdir / "config.toml"
    config.write_text(f'''[crm]
database = "{workdir}/crm.db"
[state]
database = "{workdir}/state.db"
[sync]
past_days = 36500  # the benchmark's events have fixed dates: keep all of them in the window
[accounts.bench]
areas = ["events"]
[accounts.bench.caldav]
url = "{home}"
username = "{user}"
password = "{server.password_for(user)}"
''')
    # This checkout's gwsync, started as the `gwsync` command is: a new interpreter each run,
    # with its bytecode cached as an installed package has it.
    env = {**installed_env(), "PYTHONPATH": str(_setup.ROOT)}
    base = [sys.executable, "-m", "gwsync.cli"]

    def gw(*args):
        done = subprocess.run([*base, "--config", str(config), *args], env=env, capture_output=True, text=True,
                              check=False)
        if done.returncode != 0:
            print(f"  gwsync {' '.join(args)} exited {done.returncode}: {done.stderr.strip()[:300]}")

    def run():
        gw("sync", "--only", "events")

    startup = min(measure(server, lambda: gw("--version"))[0] for _ in range(runs))
    mark = log_lines(server)
    first_time, first_requests = measure(server, run)
    puts = put_seconds(server, mark)
    with Engine(load_config(config)) as engine:
        imported = engine.crm.count_activities(ActivityFilter())
    raw = bench_raw_puts(server, load(server, f"{user}raw", imported), f"{user}raw")
    noop_best, noop_median, noop_requests = repeated(server, run, runs)
    change_items(server, home, user, changes, "gw")
    changed_time, changed_requests = measure(server, run)
    print(f"  gwsync     start-up    : {startup:7.2f} s  (`gwsync --version`, best of {runs})")
    print(f"  gwsync     first sync  : {first_time:7.2f} s  {first_requests:6d} requests")
    print(f"    the same write-back PUTs from a bare http.client loop: {raw:.2f} s -> ratio {first_time / raw:.2f}")
    print(f"    Radicale's own logged time for gwsync's PUTs: {puts:.2f} s -> ratio {first_time / puts:.2f}")
    print(f"  gwsync     no change   : {noop_best:7.2f} s  {noop_requests:6d} requests  (best of {runs}; "
          f"median {noop_median:.2f} s)")
    print(f"  gwsync     {changes:2d} changed  : {changed_time:7.2f} s  {changed_requests:6d} requests")
    return {"startup": startup, "noop": noop_best, "noop_median": noop_median, "noop_requests": noop_requests,
            "changed": changed_time, "changed_requests": changed_requests}


def bench_raw_puts(server: Radicale, home: str, user: str) -> float:
    """The floor: the same link write-back PUTs (If-Match, one per item) from a minimal client,
    bodies prepared beforehand, no sync logic. Returns the seconds the PUTs took."""
    import base64
    import http.client

    from gwsync.calendar.dav import Collection, connect

    collection = Collection(connect(home, user, server.password_for(user), auth_type="basic"), home + "calendar/")
    collection.changes_since(None)  # Radicale keeps sync history once asked: the same server state as gwsync's
    items = collection.multiget(sorted(collection.list_etags()))
    bodies = [(href, item.etag, item.data.replace("DESCRIPTION:Beschreibung", "DESCRIPTION:CRM: x\\nBeschreibung"))
              for href, item in items.items()]
    auth = "Basic " + base64.b64encode(f"{user}:{server.password_for(user)}".encode()).decode()
    start = time.perf_counter()
    for href, etag, body in bodies:
        conn = http.client.HTTPConnection("127.0.0.1", server.port)
        conn.request("PUT", href, body.encode(), {"If-Match": etag, "Authorization": auth,
                                                  "Content-Type": "text/calendar; charset=utf-8"})
        response = conn.getresponse()
        response.read()
        conn.close()
        assert response.status in (200, 201, 204), response.status
    return time.perf_counter() - start


def bench_vdirsyncer(server: Radicale, home: str, user: str, workdir: Path, changes: int, runs: int) -> dict | None:
    binary = command("vdirsyncer")
    if not binary:
        print("  vdirsyncer: not installed (pip install vdirsyncer); no comparison")
        return None
    (workdir / "local").mkdir()
    (workdir / "status").mkdir()
    config = workdir / "vdirsyncer.conf"
    config.write_text(f"""
[general]
status_path = "{workdir}/status/"

[pair bench]
a = "server"
b = "local"
collections = ["calendar"]
conflict_resolution = "a wins"

[storage server]
type = "caldav"
url = "{home}"
username = "{user}"
password = "{server.password_for(user)}"

[storage local]
type = "filesystem"
path = "{workdir}/local/"
fileext = ".ics"
""")
    env = {**installed_env(), "VDIRSYNCER_CONFIG": str(config)}

    def vdir(*args):
        subprocess.run([binary, *args], env=env, check=True, capture_output=True, input=b"y\n" * 5)

    startup = min(measure(server, lambda: vdir("--version"))[0] for _ in range(runs))
    discover_time, discover_requests = measure(server, lambda: vdir("discover", "bench"))
    first_time, first_requests = measure(server, lambda: vdir("sync"))
    noop_best, noop_median, noop_requests = repeated(server, lambda: vdir("sync"), runs)
    change_items(server, home, user, changes, "vd")
    changed_time, changed_requests = measure(server, lambda: vdir("sync"))
    print(f"  vdirsyncer start-up    : {startup:7.2f} s  (`vdirsyncer --version`, best of {runs})")
    print(f"  vdirsyncer discover    : {discover_time:7.2f} s  {discover_requests:6d} requests")
    print(f"  vdirsyncer first sync  : {first_time:7.2f} s  {first_requests:6d} requests  "
          "(downloads only: no write-back)")
    print(f"  vdirsyncer no change   : {noop_best:7.2f} s  {noop_requests:6d} requests  (best of {runs}; "
          f"median {noop_median:.2f} s)")
    print(f"  vdirsyncer {changes:2d} changed  : {changed_time:7.2f} s  {changed_requests:6d} requests")
    return {"startup": startup, "noop": noop_best, "noop_median": noop_median, "noop_requests": noop_requests,
            "changed": changed_time, "changed_requests": changed_requests}


def side_by_side(gw: dict, vd: dict | None, runs: int, changes: int) -> None:
    if vd is None:
        return
    print(f"\n  {'':24s} {'gwsync':>16s} {'vdirsyncer':>16s}")
    print(f"  {'start-up':24s} {gw['startup']:14.2f} s {vd['startup']:14.2f} s")
    print(f"  {'no change, best of ' + str(runs):24s} {gw['noop']:9.2f} s {gw['noop_requests']:3d} rq "
          f"{vd['noop']:9.2f} s {vd['noop_requests']:3d} rq")
    print(f"  {'no change, median':24s} {gw['noop_median']:14.2f} s {vd['noop_median']:14.2f} s")
    print(f"  {str(changes) + ' changed on the server':24s} {gw['changed']:9.2f} s {gw['changed_requests']:3d} rq "
          f"{vd['changed']:9.2f} s {vd['changed_requests']:3d} rq")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--changes", type=int, default=10)
    parser.add_argument("--runs", type=int, default=5, help="runs of the no-change sync and of start-up (best shown)")
    args = parser.parse_args()
    server = Radicale.start(log_level="info")
    workdir = Path(tempfile.mkdtemp(prefix="gwsync-calbench-"))
    try:
        start = time.perf_counter()
        gw_home = load(server, "gw", args.events)
        vd_home = load(server, "vd", args.events)
        print(f"Radicale on 127.0.0.1:{server.port}; two collections of {args.events} events loaded in "
              f"{time.perf_counter() - start:.1f} s")
        (workdir / "gw").mkdir()
        (workdir / "vd").mkdir()
        gw = bench_gwsync(server, gw_home, "gw", workdir / "gw", args.changes, args.runs)
        vd = bench_vdirsyncer(server, vd_home, "vd", workdir / "vd", args.changes, args.runs)
        side_by_side(gw, vd, args.runs, args.changes)
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

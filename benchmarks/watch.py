"""`gwsync watch`: latency from APPEND to CRM activity, and idle CPU.

    python benchmarks/watch.py [--mails 50] [--idle-seconds 60] [--folders 1] [--checkout DIR]

Starts a throw-away Dovecot and `gwsync watch` (interval 10 minutes, so every import below is
IDLE's doing), appends mails one at a time from another client, each to the next of `--folders`
import folders, and waits for each activity to appear in the CRM database; then leaves the watch
idle and reads its CPU time from /proc. Dovecot offers NOTIFY, so this gwsync watches all folders
on one connection; `--checkout` runs `gwsync watch` from another checkout instead (an older one
held one IDLE connection per folder: the baseline).
Targets (issue 4): new mail in the CRM within seconds; idle CPU under 1% of a core per account.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from imapclient import IMAPClient

from _setup import ROOT, imap_account, write_config
from gwsync.demo.localservers import Dovecot

FOLDER = "INBOX/CRM Erledigt [E]"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def activity_count(db: Path) -> int:
    if not db.exists():
        return 0
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute("SELECT count(*) FROM activities").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mails", type=int, default=50)
    parser.add_argument("--idle-seconds", type=int, default=60)
    parser.add_argument("--folders", type=int, default=1, help="import folders, filled in turn")
    parser.add_argument("--checkout", type=Path, default=ROOT, help="the gwsync checkout that runs watch")
    args = parser.parse_args()
    folders = [FOLDER] + [f"INBOX/Kunden/CRM Kunde {n:02} [O]" for n in range(1, args.folders)]
    server = Dovecot.start()
    workdir = Path(tempfile.mkdtemp(prefix="gwsync-watchbench-"))
    user = "bench"
    config = write_config(workdir, imap_account(server, user, "interval = 600"))
    client = IMAPClient("127.0.0.1", port=server.port, ssl=False)
    client.login(user, server.password_for(user))
    for folder in folders:
        client.create_folder(folder)
    checkout = args.checkout.resolve()
    watch = subprocess.Popen([sys.executable, "-m", "gwsync.cli", "--config", str(config), "-v", "watch"],
                             cwd=checkout, env={**os.environ, "PYTHONPATH": str(checkout)},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in watch.stderr:  # wait until IDLE is in place
            if "IDLE" in line:
                break
        time.sleep(2)  # all folders in IDLE, and the first sync done
        db = workdir / "crm.db"
        latencies = []
        for n in range(args.mails):
            before = activity_count(db)
            raw = (f"From: s{n}@example.org\r\nSubject: Watch benchmark {n}\r\nMessage-ID: <w{n}@x>\r\n\r\n"
                   f"body {n}\r\n").encode()
            start = time.perf_counter()
            client.append(folders[n % len(folders)], raw)
            while activity_count(db) <= before:
                if time.perf_counter() - start > 60:
                    raise SystemExit(f"mail {n} did not arrive within 60 s")
                time.sleep(0.005)
            latencies.append(time.perf_counter() - start)
        latencies.sort()
        print(f"APPEND -> CRM activity over {args.mails} mails in {len(folders)} folder(s): "
              f"median {statistics.median(latencies) * 1000:.0f} ms, "
              f"90th percentile {latencies[int(len(latencies) * 0.9) - 1] * 1000:.0f} ms, "
              f"worst {latencies[-1] * 1000:.0f} ms")
        time.sleep(2)
        cpu_before, wall_before = cpu_seconds(watch.pid), time.perf_counter()
        time.sleep(args.idle_seconds)
        cpu = cpu_seconds(watch.pid) - cpu_before
        wall = time.perf_counter() - wall_before
        print(f"idle CPU of watch (1 account, {len(folders)} import folder(s)) over {wall:.0f} s: {cpu:.2f} s = "
              f"{100 * cpu / wall:.2f}% of a core")
    finally:
        watch.terminate()
        watch.wait(timeout=30)
        client.logout()
        server.stop()


if __name__ == "__main__":
    main()

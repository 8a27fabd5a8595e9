"""A whole company on one machine: PostgreSQL, Dovecot with a master user, N accounts, `gwsync worker`s.

    python benchmarks/company.py [--accounts 1000] [--workers 3] [--quick]

Starts everything it needs and stops it again (also on Ctrl-C): a throw-away PostgreSQL cluster
(as the tests' pg_server does; with track_commit_timestamp, so an activity's creation time is its
commit time in the database), a throw-away Dovecot set up for this many sessions (DOVECOT_LIMITS)
with a static passdb and a master user, `--accounts` users with three import folders each, kept
in the database with `gwsync accounts import FILE.csv` and logging in through `[defaults.imap]
master_user`. Then two setups, one after the other, on the same servers and accounts:

- "1 worker": one `gwsync worker` process does everything (the single-process figure);
- "N workers": `--workers` `gwsync worker` processes on the same queue.

For each: the time until every account is watched (the watcher's connections to Dovecot, counted
with ss) and has had its first sync; the worker processes' memory (RSS) and CPU while idle over
`--idle-seconds` (the whole process, and its event-loop thread, where the watcher runs; sync jobs
run in other threads); the latency from APPEND (one mail into a random import folder of a random
account, `--appends` of them at `--rate` per second) to the activity's commit in PostgreSQL
(median, p99, worst); then `--mails` mails into every account (MULTIAPPEND, spread over the
three folders) and the time until all are activities (throughput: mails / seconds from the first
APPEND to the last commit). For the N workers only, a failure test: `--mails` more into every
account, and once a fifth of them are in, the worker holding the most watching connections is SIGKILLed and
another is SIGSTOPped for `--stop-seconds`; then every mail must be in the archive folder once,
none left in the import folders, and every Message-ID exactly one activity. It reports how long
after the kill the killed worker's jobs ran again elsewhere and every account was watched again.

The accounts are split into one shard per watcher slot of the live workers ([worker] watchers,
2 per worker), each watched by one watcher job: with one worker its process holds every account's
connection, with more the shards spread over them. The worker holding the most connections is
"the watcher's process" (its RSS, and the CPU of its event-loop thread, where the watchers run).
Each figure is printed with the machine's load average (`uptime`) when it was taken: on a shared
machine the latencies and throughput depend on what else runs.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _setup import ROOT

sys.path.insert(0, str(ROOT / "tests"))  # the tests' throw-away PostgreSQL

from gwsync.demo.localservers import Dovecot, stop_process_group

MASTER, MASTER_PASSWORD = "gwsync", "bench-master-secret"
FOLDERS = ["INBOX/CRM Erledigt [E]", "INBOX/Kunden/CRM Offen [O]", "INBOX/Kunden/CRM In Arbeit [I]"]
ARCHIVE = "INBOX/CRM Archiv"
INOTIFY = Path("/proc/sys/fs/inotify/max_user_instances")

# Dovecot at this size (README: Company deployment). Each watched account holds one imap process
# (a NOTIFY session is not hibernated), the workers' syncs more: process and client limits above
# that; long-lived login processes; hibernation for plain IDLE sessions.
DOVECOT_LIMITS = """
default_process_limit = {processes}
default_client_limit = {clients}
service imap-login {{
  service_count = 0
  client_limit = {processes}
  process_min_avail = 2
}}
service imap {{
  process_limit = {processes}
}}
imap_hibernate_timeout = 5s
# A watching session's push rides on an inotify watch of dovecot.list.index.log; once that file
# is rotated (over 8 kB and 5 minutes old) only this fallback check finds new mail: default 30 s.
mailbox_idle_check_interval = 5s
"""
MAX_USERIP = 20  # mail_max_userip_connections: per user and IP; a watcher's one + a sync's one + ours


def user(n: int) -> str:
    return f"emp{n:05d}"


def run_all(function, items, threads: int) -> None:
    """function(item) for every item, `threads` at once; on an error or Ctrl-C the rest is
    dropped at once (the cleanup need not wait for it)."""
    pool = concurrent.futures.ThreadPoolExecutor(threads)
    try:
        list(pool.map(function, items))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def say(*words) -> None:
    print(*words, flush=True)


def load() -> str:
    return "load " + " ".join(Path("/proc/loadavg").read_text().split()[:3])


# -- processes, measured from outside --------------------------------------------------------------------

def rss_mb(pid: int) -> float:
    return int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())[1]) / 1024


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    path = f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def connections_by_pid(port: int) -> dict[int, int]:
    """Established TCP connections to `port`, per process."""
    out = subprocess.run(["ss", "-tnpH", "state", "established", f"( dport = :{port} )"],
                         capture_output=True, text=True).stdout
    counts: dict[int, int] = {}
    for pid in re.findall(r"pid=(\d+)", out):
        counts[int(pid)] = counts.get(int(pid), 0) + 1
    return counts


def quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * len(values)) - 1))]


# -- the servers --------------------------------------------------------------------------------------------

class Bench:
    def __init__(self, args):
        self.args = args
        self.workdir = Path(tempfile.mkdtemp(prefix="gwsync-company-"))
        self.pg = None
        self.dovecot: Dovecot | None = None
        self.workers: list[subprocess.Popen] = []
        self.started = 0  # workers started so far (their logs are worker1.log, ...)
        self.logs: list[Path] = []
        self.inotify_before: int | None = None
        self.inotify_set: int | None = None  # what this run raised it to
        self.expected: dict[str, str] = {}  # Message-ID -> account
        self.mail_no = 0

    # servers

    def start(self) -> None:
        args = self.args
        self.inotify_before = int(INOTIFY.read_text())
        wanted = 2 * args.accounts + 512  # one per NOTIFY/IDLE session, and room for the rest of the machine
        if not args.keep_inotify and self.inotify_before < wanted and os.geteuid() == 0:
            INOTIFY.write_text(str(wanted))
            self.inotify_set = wanted
        from pg_server import PostgresServer

        self.pg = PostgresServer.start()
        self.pg.execute("ALTER SYSTEM SET track_commit_timestamp = on",  # read at start: restart
                        "ALTER SYSTEM SET log_lock_waits = on", "ALTER SYSTEM SET deadlock_timeout = '1s'")
        stop_process_group(self.pg.proc)
        self.pg._launch()
        self.db = self.pg.new_database("company")
        self.url = self.pg.url(self.db)
        processes = 2 * args.accounts + 200
        self.dovecot_extra = DOVECOT_LIMITS.format(processes=processes, clients=2 * processes)
        self.dovecot = Dovecot.start(master_users={MASTER: MASTER_PASSWORD}, extra=self.dovecot_extra,
                                     max_userip_connections=MAX_USERIP)
        say(f"work directory {self.workdir}; PostgreSQL {self.pg_version()} on port {self.pg.port}, "
            f"Dovecot {dovecot_version()} on port {self.dovecot.port}")
        self.print_settings()

    def pg_version(self) -> str:
        return self.query("SHOW server_version")[0][0]

    def print_settings(self) -> None:
        conf = self.dovecot.directory / "dovecot.conf"
        out = subprocess.run(["doveconf", "-c", str(conf), "-h", "imap_hibernate_timeout"], capture_output=True,
                             text=True).stdout.strip()
        rows = [("imap_hibernate_timeout", out or "?")]
        for name in ("default_process_limit", "default_client_limit", "mail_max_userip_connections",
                     "mailbox_idle_check_interval"):
            got = subprocess.run(["doveconf", "-c", str(conf), "-f", "protocol=imap", "-h", name],
                                 capture_output=True, text=True)
            rows.append((name, got.stdout.strip() or "?"))
        full = subprocess.run(["doveconf", "-c", str(conf), "-n"], capture_output=True, text=True).stdout
        for service in ("imap", "imap-login"):
            block = re.search(r"^service " + re.escape(service) + r" \{(.*?)^\}", full, re.S | re.M)
            if block:
                for key in ("process_limit", "client_limit", "service_count", "process_min_avail"):
                    value = re.search(rf"^\s*{key} = (\S+)", block[1], re.M)
                    if value:
                        rows.append((f"service {service} {{ {key} }}", value[1]))
        rows.append(("fs.inotify.max_user_instances", f"{INOTIFY.read_text().strip()} (was {self.inotify_before}; "
                     f"{'root: raised for this run' if os.geteuid() == 0 else 'not root: left alone'})"))
        rows.append(("fs.inotify.max_user_watches", Path("/proc/sys/fs/inotify/max_user_watches").read_text().strip()))
        rows.append(("PostgreSQL max_connections", self.query("SHOW max_connections")[0][0]))
        say("Settings that matter at this size:")
        for key, value in rows:
            say(f"  {key:40} {value}")

    def stop(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGCONT)
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        if self.dovecot is not None:
            self.dovecot.stop()
        if self.pg is not None:
            self.pg.stop()
        if self.inotify_set is not None and int(INOTIFY.read_text()) == self.inotify_set:  # ours: put it back
            INOTIFY.write_text(str(self.inotify_before))
        if not self.args.keep_workdir:
            subprocess.run(["rm", "-rf", str(self.workdir)])

    def query(self, sql: str, *params) -> list[tuple]:
        import psycopg

        with psycopg.connect(self.url if hasattr(self, "url") else self.pg.url(), autocommit=True) as conn:
            return conn.execute(sql, params).fetchall()  # type: ignore[arg-type]

    # accounts

    def imap(self, name: str):
        from imapclient import IMAPClient

        client = IMAPClient("127.0.0.1", port=self.dovecot.port, ssl=False, timeout=60)
        client.login(name, Dovecot.password_for(name))
        return client

    def make_accounts(self) -> None:
        began = time.monotonic()

        def one(n: int) -> None:
            with self.imap(user(n)) as client:
                for folder in FOLDERS:
                    client.create_folder(folder)

        run_all(one, range(self.args.accounts), 8)
        self.config = self.workdir / "config.toml"
        self.config.write_text(
            f'[database]\nurl = "{self.url}"\n\n'
            f'[worker]\nconcurrency = {self.args.concurrency}\n\n'
            f'[defaults.imap]\nhost = "127.0.0.1"\nport = {self.dovecot.port}\nsecurity = "none"\n'
            f'import_root = "INBOX"\narchive_folder = "{ARCHIVE}"\nmaster_user = "{MASTER}"\n'
            'password_env = "GWSYNC_BENCH_MASTER"\n')
        csv = self.workdir / "accounts.csv"
        csv.write_text("name,username,email,areas\n" + "".join(
            f"{user(n)},{user(n)},{user(n)}@firma.example,mail\n" for n in range(self.args.accounts)))
        done = self.gwsync("accounts", "import", str(csv))
        say(f"{self.args.accounts} accounts with {len(FOLDERS)} import folders each made, "
            f"`gwsync accounts import`: {done.strip()}; {time.monotonic() - began:.0f} s")

    def env(self) -> dict:
        return {**os.environ, "PYTHONPATH": str(ROOT), "GWSYNC_BENCH_MASTER": MASTER_PASSWORD}

    def gwsync(self, *args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "gwsync.cli", "--config", str(self.config), *args],
                              capture_output=True, text=True, env=self.env(), cwd=ROOT, timeout=600)
        if done.returncode != 0:
            raise SystemExit(f"gwsync {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    # workers

    def start_worker(self) -> subprocess.Popen:
        self.started += 1
        log = self.workdir / f"worker{self.started}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "gwsync.cli", "-v", "--config", str(self.config), "worker"],
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=self.env(),
                                    cwd=ROOT)
        self.workers.append(proc)
        self.logs.append(log)
        return proc

    def check_workers(self, allowed: tuple[int, ...] = ()) -> None:
        for proc, log in zip(self.workers, self.logs, strict=True):
            if proc.poll() is not None and proc.pid not in allowed:
                raise SystemExit(f"worker {proc.pid} exited with {proc.returncode}; its log ends:\n"
                                 + "\n".join(log.read_text(errors="replace").splitlines()[-30:]))

    def stop_workers(self) -> float:
        began = time.monotonic()
        live = [p for p in self.workers if p.poll() is None]
        for proc in live:
            proc.send_signal(signal.SIGTERM)
        for proc in live:
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        return time.monotonic() - began

    def wait(self, what, timeout: float, message: str, allowed: tuple[int, ...] = ()):
        deadline = time.monotonic() + timeout
        while True:
            value = what()
            if value:
                return value
            self.check_workers(allowed)
            if time.monotonic() > deadline:
                raise SystemExit(f"{message} within {timeout:.0f} s ({load()})")
            time.sleep(0.5)

    def watching(self) -> dict[int, int]:
        """Worker pid -> its connections to Dovecot."""
        pids = {p.pid for p in self.workers if p.poll() is None}
        return {pid: n for pid, n in connections_by_pid(self.dovecot.port).items() if pid in pids}

    def all_watched(self, leave_out: tuple[int, ...] = ()) -> dict[int, int] | None:
        """Worker pid -> connections, once the workers (but `leave_out`) hold one per account
        or more (a sync's own session counts too: at most `--concurrency` per worker)."""
        held = {pid: n for pid, n in self.watching().items() if pid not in leave_out}
        return held if sum(held.values()) >= self.args.accounts else None

    # mail

    def raw(self, account: str, tag: str) -> tuple[str, bytes]:
        self.mail_no += 1
        mid = f"<{tag}-{self.mail_no}-{account}@bench.example>"
        self.expected[mid] = account
        return mid, (f"From: Kunde {self.mail_no} <kunde{self.mail_no % 97}@kunde.example>\r\n"
                     f"To: {account}@firma.example\r\nSubject: Anfrage {self.mail_no}\r\nMessage-ID: {mid}\r\n"
                     f"Date: Fri, 27 Nov 2026 10:00:00 +0000\r\n\r\nGuten Tag, bitte um Angebot {self.mail_no}.\r\n"
                     ).encode()

    def activities(self) -> int:
        return self.query("SELECT count(*) FROM activities")[0][0]

    def commit_times(self, mids: list[str]) -> dict[str, float]:
        rows = self.query("SELECT message_id, extract(epoch FROM pg_xact_commit_timestamp(xmin))::float8 "
                          "FROM activities WHERE message_id = ANY(%s)", mids)
        return {mid: at for mid, at in rows}

    def last_commit(self) -> float:
        return self.query("SELECT max(extract(epoch FROM pg_xact_commit_timestamp(xmin)))::float8 "
                          "FROM activities")[0][0]

    def bulk_append(self, tag: str, per_account: int) -> float:
        """`per_account` mails into every account's import folders (one MULTIAPPEND per folder);
        returns the wall time of the first APPEND."""
        first = time.time()
        plan = []
        for n in range(self.args.accounts):
            batches: dict[str, list[bytes]] = {f: [] for f in FOLDERS}
            for k in range(per_account):
                batches[FOLDERS[k % len(FOLDERS)]].append(self.raw(user(n), tag)[1])
            plan.append((user(n), batches))

        def one(item) -> None:
            name, batches = item
            with self.imap(name) as client:
                for folder, mails in batches.items():
                    if mails:
                        client.multiappend(folder, mails)

        run_all(one, plan, 4)
        return first


def dovecot_version() -> str:
    return subprocess.run(["dovecot", "--version"], capture_output=True, text=True).stdout.split()[0]


# -- one setup ----------------------------------------------------------------------------------------------

def measure(bench: Bench, workers: int, label: str, failure_test: bool) -> dict:
    args = bench.args
    result: dict = {}
    started = time.monotonic()
    runs_before = bench.query("SELECT coalesce(sum(runs), 0) FROM gwsync_schedule")[0][0] \
        if bench.query("SELECT to_regclass('gwsync_schedule')")[0][0] else 0
    procs = [bench.start_worker() for _ in range(workers)]
    bench.wait(bench.all_watched, 600, f"{label}: not every account was watched")
    result["every account watched after s"] = time.monotonic() - started
    if runs_before == 0:  # the first start: every account is due at once, none has news
        bench.wait(lambda: bench.query("SELECT count(*) FROM gwsync_schedule WHERE runs >= 1")[0][0]
                   >= args.accounts, 900, f"{label}: not every account had its first sync")
        took = time.monotonic() - started
        result["first sync of every account after s"] = took
        result["no-change syncs/s (first round)"] = args.accounts / took
    say(f"{label}: every account watched after {result['every account watched after s']:.1f} s ({load()})")
    # Idle means idle: the first round's syncs (and those the watchers' first looks deferred) are done.
    bench.wait(lambda: not bench.query("SELECT 1 FROM procrastinate_jobs WHERE task_name = 'gwsync.sync' "
                                       "AND status IN ('todo', 'doing') LIMIT 1"), 600,
               f"{label}: the sync jobs did not end")
    time.sleep(10)  # the logins are over, Dovecot hibernated what it hibernates
    # The watcher jobs: one per shard, the shards spread over the workers' watcher slots ([worker]
    # watchers); the worker with the most connections is "the watcher's process".
    held = bench.watching()
    pid = max(held, key=held.get)
    result["watching connections per worker"] = "/".join(str(held.get(p.pid, 0)) for p in procs)
    result["RSS MB per worker"] = "/".join(f"{rss_mb(p.pid):.0f}" for p in procs)
    result["watcher's process RSS MB"] = rss_mb(pid)
    cpu = {p.pid: (cpu_seconds(p.pid), cpu_seconds(p.pid, p.pid)) for p in procs}
    wall = time.monotonic()
    jobs_before = bench.query("SELECT count(*) FROM procrastinate_jobs WHERE task_name = 'gwsync.sync'")[0][0]
    time.sleep(args.idle_seconds)
    spent = time.monotonic() - wall
    jobs = bench.query("SELECT count(*) FROM procrastinate_jobs WHERE task_name = 'gwsync.sync'")[0][0] - jobs_before
    result["watcher's process idle CPU %"] = 100 * (cpu_seconds(pid) - cpu[pid][0]) / spent
    result["  its event-loop thread %"] = 100 * (cpu_seconds(pid, pid) - cpu[pid][1]) / spent
    result["all workers idle CPU %"] = sum(100 * (cpu_seconds(p.pid) - cpu[p.pid][0]) / spent for p in procs)
    result["sync jobs while idle (periodic)"] = jobs
    result["idle measured at"] = load()
    say(f"{label}: memory and idle CPU measured ({load()})")

    # APPEND -> activity, one mail at a time into random accounts, at a steady rate
    rng = random.Random(15)
    sent: dict[str, float] = {}
    pace = 1.0 / args.rate
    next_at = time.monotonic()
    for _ in range(args.appends):
        name = user(rng.randrange(args.accounts))
        mid, raw = bench.raw(name, "lat")
        with bench.imap(name) as client:
            time.sleep(max(0.0, next_at - time.monotonic()))
            sent[mid] = time.time()
            client.append(rng.choice(FOLDERS), raw)
        next_at += pace
    bench.wait(lambda: len(bench.commit_times(list(sent))) == len(sent), 300,
               f"{label}: not every APPEND became an activity")
    at = bench.commit_times(list(sent))
    latencies = [at[mid] - sent[mid] for mid in sent]
    (bench.workdir / f"latencies-{workers}.txt").write_text(
        "".join(f"{sent[mid]:.3f} {at[mid] - sent[mid]:.3f} {bench.expected[mid]}\n" for mid in sent))
    result["APPEND->activity median s"] = statistics.median(latencies)
    result["APPEND->activity p99 s"] = quantile(latencies, 0.99)
    result["APPEND->activity worst s"] = max(latencies)
    result["latency measured at"] = load()
    say(f"{label}: latency median {result['APPEND->activity median s']:.2f} s, "
        f"p99 {result['APPEND->activity p99 s']:.2f} s ({load()})")

    # throughput
    before = bench.activities()
    first = bench.bulk_append(f"tp{workers}", args.mails)
    appended = time.time() - first
    total = args.mails * args.accounts
    bench.wait(lambda: bench.activities() - before >= total, 1800, f"{label}: the {total} mails were not all imported")
    took = bench.last_commit() - first
    result[f"{args.mails} mails x {args.accounts} accounts imported in s"] = took
    result["  of which APPENDing s"] = appended
    result["throughput mails/s"] = total / took
    result["PostgreSQL connections then"] = bench.query("SELECT count(*) FROM pg_stat_activity WHERE datname = %s",
                                                        bench.db)[0][0]
    result["throughput measured at"] = load()
    say(f"{label}: {total} mails imported in {took:.1f} s, {total / took:.0f} mails/s ({load()})")

    if failure_test:
        result.update(kill_and_stop(bench, procs))
    result["stop (SIGTERM) s"] = bench.stop_workers()
    bench.workers.clear()
    bench.logs.clear()
    return result


def kill_and_stop(bench: Bench, procs: list[subprocess.Popen]) -> dict:
    """SIGKILL the watcher's worker and SIGSTOP another mid-import; then check nothing is lost or doubled."""
    args = bench.args
    result: dict = {}
    before = bench.activities()
    total = args.mails * args.accounts
    holder = {"done": False}

    def append() -> None:
        bench.bulk_append("kill", args.mails)
        holder["done"] = True

    appending = threading.Thread(target=append, daemon=True)
    appending.start()
    bench.wait(lambda: bench.activities() - before >= total // 5, 600, "the import did not start")
    conns = bench.watching()
    victim = max(procs, key=lambda p: conns.get(p.pid, 0))
    frozen = max((p for p in procs if p is not victim), key=lambda p: conns.get(p.pid, 0))
    held = [row[0] for row in bench.query("SELECT id FROM procrastinate_jobs WHERE status = 'doing'")]
    killed_db = bench.query("SELECT now()")[0][0]
    killed_at = time.monotonic()
    os.killpg(victim.pid, signal.SIGKILL)
    os.killpg(frozen.pid, signal.SIGSTOP)
    victim.wait()
    at_kill = bench.activities() - before
    say(f"killed worker {victim.pid} ({conns.get(victim.pid, 0)} connections) and stopped worker {frozen.pid} "
        f"({conns.get(frozen.pid, 0)}) at {at_kill}/{total} mails, "
        f"{len(held)} jobs doing ({load()})")
    dead = (victim.pid,)
    # The killed worker's jobs: those "doing" on a worker that no longer beats.
    watched_again = None
    resumed = False
    while True:
        now = time.monotonic()
        if not resumed and now - killed_at >= args.stop_seconds:
            os.killpg(frozen.pid, signal.SIGCONT)
            resumed = True
            say(f"worker {frozen.pid} continued after {now - killed_at:.0f} s ({load()})")
        if watched_again is None and bench.all_watched(leave_out=() if resumed else (frozen.pid,)):
            watched_again = now - killed_at
            say(f"every account watched again {watched_again:.1f} s after the kill ({load()})")
        if resumed and watched_again is not None and holder["done"] \
                and bench.activities() - before >= total:
            break
        if now - killed_at > 900:
            raise SystemExit(f"after the kill: {bench.activities() - before}/{total} imported, watched again: "
                             f"{watched_again} ({load()})")
        if resumed and frozen.poll() is not None and frozen.pid not in dead:
            # As systemd's Restart=on-failure would: a worker in its place.
            said = [line for line in bench.logs[bench.workers.index(frozen)].read_text(errors="replace").splitlines()
                    if line.startswith("gwsync:")]
            result["the stopped worker after SIGCONT"] = f"exited {frozen.returncode} after {now - killed_at:.0f} s"
            say(f"worker {frozen.pid} exited with {frozen.returncode} after it continued: "
                f"{said[-1][:300] if said else '(no message)'}; starting another in its place ({load()})")
            dead = (*dead, frozen.pid)
            bench.start_worker()
        bench.check_workers(dead)
        time.sleep(0.5)
    result["killed at mails imported"] = f"{at_kill}/{total}"
    result["every account watched again after kill s"] = watched_again
    result["jobs held at the kill started again after s"] = started_again(bench, held, killed_db)
    watch = bench.query("SELECT extract(epoch FROM min(e.at) - %s)::float8 FROM procrastinate_events e "
                        "JOIN procrastinate_jobs j ON j.id = e.job_id WHERE j.task_name = 'gwsync.watch' "
                        "AND e.type = 'started' AND e.at > %s", killed_db, killed_db)[0][0]
    result["a watcher job started again after s"] = watch if watch is not None else "-"
    result["kill test import finished after kill s"] = time.monotonic() - killed_at
    time.sleep(3)
    result.update(check_once(bench))
    result["kill test measured at"] = load()
    lines = (bench.pg.directory / "postgres.log").read_text(errors="replace").splitlines()
    waits = [text for n, line in enumerate(lines) if "still waiting for" in line or "acquired" in line
             for text in lines[n:n + 4]]  # the wait, its DETAIL, CONTEXT and STATEMENT
    if waits:  # a stopped worker's open transaction holds others up: which statement waited, and how long
        say("PostgreSQL's lock waits over 1 s (log_lock_waits):\n  " + "\n  ".join(waits[-40:]))
    return result


def started_again(bench: Bench, held: list[int], killed) -> str:
    """For the jobs "doing" at the kill (the killed and the stopped worker's, and the third's):
    seconds from the kill until those that did not simply finish were started again on another
    worker (Procrastinate's 'started' events, the database's clock): the first and the last, and
    how many."""
    rows = bench.query("SELECT job_id, extract(epoch FROM min(at) - %s)::float8 FROM procrastinate_events "
                       "WHERE type = 'started' AND at > %s AND job_id = ANY(%s) GROUP BY job_id", killed, killed, held)
    if not rows:
        return f"none of {len(held)}"
    again = sorted(at for _, at in rows)
    return f"{again[0]:.0f}-{again[-1]:.0f} ({len(again)} of {len(held)})"


def check_once(bench: Bench) -> dict:
    """Every expected mail in its account's archive once, the import folders empty, one activity each."""
    by_account: dict[str, list[str]] = {}
    for mid, name in bench.expected.items():
        by_account.setdefault(name, []).append(mid)
    problems: list[str] = []

    def one(n: int) -> None:
        name = user(n)
        with bench.imap(name) as client:
            client.select_folder(ARCHIVE, readonly=True)
            uids = client.search(["ALL"])
            got = []
            if uids:
                data = client.fetch(uids, ["BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"])
                got = [d[b"BODY[HEADER.FIELDS (MESSAGE-ID)]"].decode().split(":", 1)[1].strip()
                       for d in data.values()]
            if sorted(got) != sorted(by_account.get(name, [])):
                problems.append(f"{name}: archive has {len(got)} ({len(set(got))} distinct), "
                                f"expected {len(by_account.get(name, []))}")
            for folder in FOLDERS:
                client.select_folder(folder, readonly=True)
                if client.search(["ALL"]):
                    problems.append(f"{name}: mail left in {folder}")

    run_all(one, range(bench.args.accounts), 8)
    rows = bench.query("SELECT message_id, count(*) FROM activities GROUP BY message_id")
    counts = dict(rows)
    doubled = [m for m, c in counts.items() if c > 1]
    missing = [m for m in bench.expected if m not in counts]
    extra = [m for m in counts if m not in bench.expected]
    if doubled or missing or extra:
        problems.append(f"activities: {len(doubled)} doubled, {len(missing)} missing, {len(extra)} unexpected "
                        f"(e.g. {(doubled + missing + extra)[:3]})")
    for line in problems[:20]:
        say("PROBLEM", line)
    return {"every mail archived once, one activity each": "yes" if not problems else f"NO ({len(problems)} problems)",
            "mails checked": len(bench.expected)}


# -- main ---------------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4, help="sync jobs at once per worker")
    parser.add_argument("--mails", type=int, default=10, help="mails into every account, for the throughput")
    parser.add_argument("--appends", type=int, default=200, help="single APPENDs for the latency")
    parser.add_argument("--rate", type=float, default=4.0, help="single APPENDs per second")
    parser.add_argument("--idle-seconds", type=int, default=60)
    parser.add_argument("--stop-seconds", type=int, default=60, help="how long the second worker is SIGSTOPped")
    parser.add_argument("--quick", action="store_true",
                        help="a dry run: 40 appends, 20 s idle, 3 mails per account (the kill test as always)")
    parser.add_argument("--only", choices=("single", "multi"), help="measure one setup only")
    parser.add_argument("--keep-inotify", action="store_true", help="leave fs.inotify.max_user_instances alone")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the logs and config after the run")
    args = parser.parse_args()
    if args.quick:
        args.appends, args.idle_seconds, args.mails = 40, 20, 3

    def interrupted(*_) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    bench = Bench(args)
    results: dict[str, dict] = {}
    began = time.monotonic()
    try:
        bench.start()
        bench.make_accounts()
        if args.only != "multi":
            results["1 worker"] = measure(bench, 1, "1 worker", failure_test=False)
        if args.only != "single":
            results[f"{args.workers} workers"] = measure(bench, args.workers, f"{args.workers} workers",
                                                          failure_test=True)
        report(args, results, time.monotonic() - began)
    except BaseException:
        for log in bench.logs:
            if log.exists():
                say(f"{log.name} ends:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-20:]))
        if bench.dovecot is not None:
            log = bench.dovecot.directory / "dovecot.log"
            if log.exists():
                say("Dovecot's log ends:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
        raise
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the cleanup runs to its end
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        bench.stop()


def report(args, results: dict[str, dict], took: float) -> None:
    say(f"\n{args.accounts} accounts x {len(FOLDERS)} import folders, one Dovecot {dovecot_version()} with a master "
        f"user, one PostgreSQL, `gwsync worker --concurrency {args.concurrency}` ({os.cpu_count()} cores; "
        f"{args.appends} APPENDs at {args.rate:g}/s; idle over {args.idle_seconds} s; whole run {took / 60:.0f} min):")
    kinds = list(results)
    keys = []
    for kind in kinds:
        keys += [k for k in results[kind] if k not in keys]
    say(f"{'':48}" + "".join(f"{kind:>24}" for kind in kinds))
    for key in keys:
        say(f"{key:48}" + "".join(f"{_fmt(results[kind].get(key, '-')):>24}" for kind in kinds))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if value < 10 else f"{value:.1f}"
    return str(value)


if __name__ == "__main__":
    main()

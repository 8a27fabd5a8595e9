"""Watching many accounts: the asyncio watcher against a thread per watching connection.

    python benchmarks/watch_many.py [--accounts 1000] [--folders 3] [--appends 200] [--idle-seconds 60]

Starts a throw-away Dovecot set up for this many sessions (below), makes `--accounts` users with
`--folders` import folders each, and runs each watcher in a process of its own, one after the
other, on the same server:
- asyncio: gwsync.mail.asyncwatch.watch_accounts, one event loop in one thread, one connection
  per account (NOTIFY + IDLE);
- threads: what `gwsync watch` runs today for each account (gwsync.cli.watcher.IdleWatcher with
  the NOTIFY duty, its logins one at a time as Watch.idle_login does): one thread and one
  connection per account (Dovecot offers NOTIFY; without it, one per import folder).
For each it reports the time until every account watches, its memory (RSS) once all watch,
its CPU time while idle over `--idle-seconds`, the latency from APPEND (into a random import
folder of a random account, one mail at a time) to the watcher's callback for that account
(median, 99th percentile, worst over `--appends`), the calls for other accounts meanwhile, how
long a stop takes, and the Dovecot processes' memory meanwhile.

Dovecot at this size (see DOVECOT_LIMITS): more processes and clients than its defaults allow
(`service imap { process_limit }`, `default_client_limit`), logins served by long-lived
imap-login processes; each account is a user of its own, so `mail_max_userip_connections`
(10 by default, per user and IP) is not reached here, but it is for many watchers of one user
from one host. A session with NOTIFY is not hibernated (measured with Dovecot 2.3.19:
`imap_hibernate_timeout` moves IDLE sessions into imap-hibernate, NOTIFY ones stay), so every
account holds an imap process and an inotify instance: past `fs.inotify.max_user_instances`
(128 by default) Dovecot falls back to polling every 30 s. Run as root, the benchmark raises
that limit for its run and puts it back afterwards (`--keep-inotify` leaves it alone).
"""

from __future__ import annotations

import argparse
import os
import queue
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from _setup import ROOT
from gwsync.demo.localservers import Dovecot

DOVECOT_LIMITS = """
default_process_limit = 3000
default_client_limit = 6000
service imap-login {
  service_count = 0
  client_limit = 3000
  process_min_avail = 2
}
service imap {
  process_limit = 3000
}
imap_hibernate_timeout = 5s
"""
INOTIFY = Path("/proc/sys/fs/inotify/max_user_instances")


def folders_of(count: int) -> list[str]:
    return ["INBOX/CRM Erledigt [E]", "INBOX/Kunden/CRM Offen [O]", "INBOX/Kunden/CRM Rückruf [R]"][:count] + \
        [f"INBOX/Mehr/CRM Kunde {n} [O]" for n in range(3, count)]


def user(n: int) -> str:
    return f"wm{n}"


# -- the watchers, each in a child process -----------------------------------------------------------

def say(*words) -> None:
    sys.stdout.write(" ".join(map(str, words)) + "\n")
    sys.stdout.flush()


def child_asyncio(port: int, accounts: int) -> None:
    import asyncio

    from gwsync.config import ImapConfig
    from gwsync.mail.asyncwatch import WatchStatus, WatchTarget, watch_accounts

    targets = [WatchTarget(name=user(n), imap=ImapConfig(host="127.0.0.1", port=port, security="none",
                                                          username=user(n), password=Dovecot.password_for(user(n))),
                           password=Dovecot.password_for(user(n))) for n in range(accounts)]

    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        status = WatchStatus()

        def changed(name: str) -> None:
            say("C", name, f"{time.monotonic():.6f}")

        task = asyncio.create_task(watch_accounts(targets, changed, stop, status=status))
        while status.count("idle") < accounts:
            await asyncio.sleep(0.1)
        say("READY", threading.active_count())
        await task

    asyncio.run(main())


def child_threads(port: int, accounts: int) -> None:
    from functools import partial

    from gwsync.cli.watcher import Duty, IdleWatcher
    from gwsync.config import AccountConfig, ImapConfig
    from gwsync.mail.imap import ImapSession

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    login_lock = threading.Lock()  # Watch.idle_login: one IDLE login at a time
    woken: set[str] = set()

    def login(cfg: ImapConfig, password: str) -> ImapSession:
        with login_lock:
            return ImapSession.connect(cfg, password)

    def wake(name: str) -> None:
        woken.add(name)  # the first wake of each comes once its IDLE is in place
        say("C", name, f"{time.monotonic():.6f}")

    watchers = []
    for n in range(accounts):
        password = Dovecot.password_for(user(n))
        cfg = ImapConfig(host="127.0.0.1", port=port, security="none", username=user(n), password=password)
        account = AccountConfig(imap=cfg)
        object.__setattr__(account, "name", user(n))
        watcher = IdleWatcher(partial(login, cfg, password), account, Duty(notify=True, root="INBOX", delimiter="/"),
                              wake, stop)
        watcher.start()
        watchers.append(watcher)
    while len(woken) < accounts and not stop.is_set():
        time.sleep(0.1)
    say("READY", threading.active_count())
    stop.wait()
    for watcher in watchers:
        watcher.join(timeout=10)


# -- measuring from outside ----------------------------------------------------------------------

def rss_mb(pid: int) -> float:
    return int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())[1]) / 1024


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def dovecot_processes(server: Dovecot) -> tuple[int, float]:
    """(imap processes, PSS of all Dovecot processes in MB: shared pages counted once)."""
    out = subprocess.run(["ps", "-o", "pid=,args=", "-g", str(server.proc.pid)], capture_output=True, text=True).stdout
    rows = [line.split(None, 1) for line in out.splitlines() if line.strip()]
    pss = 0
    for pid, _ in rows:
        try:
            pss += int(re.search(r"Pss:\s+(\d+)", Path(f"/proc/{pid}/smaps_rollup").read_text())[1])
        except (OSError, TypeError):
            pass  # ended meanwhile
    return sum(1 for _, args in rows if args.strip() == "dovecot/imap"), pss / 1024


class Child:
    def __init__(self, kind: str, port: int, accounts: int):
        self.proc = subprocess.Popen([sys.executable, __file__, "--child", kind, "--port", str(port),
                                      "--accounts", str(accounts)], stdout=subprocess.PIPE, text=True,
                                     cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.split())

    def next(self, timeout: float) -> list[str] | None:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            return None

    def drain(self) -> int:
        count = 0
        while self.next(0.0) is not None:
            count += 1
        return count


def measure(kind: str, server: Dovecot, args) -> dict:
    from imapclient import IMAPClient

    started = time.monotonic()
    child = Child(kind, server.port, args.accounts)
    try:
        while (words := child.next(600)) is not None and words[0] != "READY":
            pass
        if words is None:
            raise SystemExit(f"{kind}: not every account watched within 600 s")
        result = {"ready s": time.monotonic() - started, "threads": int(words[1])}
        time.sleep(10)  # the first looks are over, Dovecot has hibernated what it hibernates
        child.drain()
        result["RSS MB"] = rss_mb(child.proc.pid)
        cpu, wall = cpu_seconds(child.proc.pid), time.monotonic()
        time.sleep(args.idle_seconds)
        result["idle CPU %"] = 100 * (cpu_seconds(child.proc.pid) - cpu) / (time.monotonic() - wall)
        result["idle calls"] = child.drain()
        imap_procs, dovecot_mb = dovecot_processes(server)
        result.update({"Dovecot imap processes": imap_procs, "Dovecot PSS MB": dovecot_mb})
        rng = random.Random(15)
        folders = folders_of(args.folders)
        latencies, others = [], 0
        for n in range(args.appends):
            k = rng.randrange(args.accounts)
            client = IMAPClient("127.0.0.1", port=server.port, ssl=False, timeout=30)
            client.login(user(k), server.password_for(user(k)))
            raw = f"From: s{n}@example.org\r\nSubject: bench {n}\r\nMessage-ID: <wm{n}@x>\r\n\r\nbody\r\n".encode()
            sent = time.monotonic()
            client.append(rng.choice(folders), raw)
            while True:
                words = child.next(max(0.0, sent + 60 - time.monotonic()))
                if words is None:
                    raise SystemExit(f"{kind}: no callback for {user(k)} within 60 s of APPEND {n}")
                if words[0] == "C" and words[1] == user(k) and float(words[2]) >= sent:
                    latencies.append(float(words[2]) - sent)
                    break
                others += 1
            client.logout()
        others += len([w for w in iter(lambda: child.next(1.0), None)])
        latencies.sort()
        result.update({"APPEND->callback median ms": 1000 * statistics.median(latencies),
                       "APPEND->callback p99 ms": 1000 * latencies[max(0, int(len(latencies) * 0.99) - 1)],
                       "APPEND->callback worst ms": 1000 * latencies[-1], "extra calls": others,
                       "RSS after appends MB": rss_mb(child.proc.pid)})
        stopping = time.monotonic()
        child.proc.send_signal(signal.SIGTERM)
        child.proc.wait(timeout=120)
        result["stop s"] = time.monotonic() - stopping
        return result
    finally:
        if child.proc.poll() is None:
            child.proc.kill()
            child.proc.wait()


def prepare(server: Dovecot, accounts: int, folders: int) -> None:
    from imapclient import IMAPClient

    for n in range(accounts):
        client = IMAPClient("127.0.0.1", port=server.port, ssl=False, timeout=30)
        client.login(user(n), server.password_for(user(n)))
        for folder in folders_of(folders):
            client.create_folder(folder)
        client.logout()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument("--folders", type=int, default=3, help="import folders per account")
    parser.add_argument("--appends", type=int, default=200)
    parser.add_argument("--idle-seconds", type=int, default=60)
    parser.add_argument("--only", choices=("asyncio", "threads"), help="measure one watcher only")
    parser.add_argument("--keep-inotify", action="store_true", help="leave fs.inotify.max_user_instances alone")
    parser.add_argument("--child", choices=("asyncio", "threads"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        (child_asyncio if args.child == "asyncio" else child_threads)(args.port, args.accounts)
        return
    inotify_before = int(INOTIFY.read_text())
    wanted = 2 * args.accounts + 256  # one per Dovecot session with NOTIFY, and room for the rest of the machine
    if not args.keep_inotify and inotify_before < wanted and os.geteuid() == 0:
        INOTIFY.write_text(str(wanted))
    print(f"fs.inotify.max_user_instances: {INOTIFY.read_text().strip()} (was {inotify_before})", flush=True)
    server = Dovecot.start(extra=DOVECOT_LIMITS)
    try:
        began = time.monotonic()
        prepare(server, args.accounts, args.folders)
        print(f"{args.accounts} accounts with {args.folders} import folder(s) each made in "
              f"{time.monotonic() - began:.0f} s", flush=True)
        results = {}
        for kind in ([args.only] if args.only else ["asyncio", "threads"]):
            results[kind] = measure(kind, server, args)
            print(f"{kind}: {results[kind]}", flush=True)
            time.sleep(3)  # the sessions of the one before are gone
        print(f"\n{args.accounts} accounts, {args.folders} import folders each, one Dovecot {dovecot_version()} "
              f"on this machine ({os.cpu_count()} cores); idle over {args.idle_seconds} s, {args.appends} appends:")
        kinds = list(results)
        print(f"{'':34}" + "".join(f"{kind:>14}" for kind in kinds))
        for key in results[kinds[0]]:
            print(f"{key:34}" + "".join(f"{_fmt(results[kind][key]):>14}" for kind in kinds))
    except BaseException:
        log = server.directory / "dovecot.log"
        if log.exists():  # what the server said, before its directory goes
            print("Dovecot's log ends:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
        raise
    finally:
        server.stop()
        if int(INOTIFY.read_text()) != inotify_before:
            INOTIFY.write_text(str(inotify_before))


def dovecot_version() -> str:
    return subprocess.run(["dovecot", "--version"], capture_output=True, text=True).stdout.split()[0]


def _fmt(value) -> str:
    return f"{value:.1f}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    main()

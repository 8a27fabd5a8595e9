"""`gwsync watch`: every account synced at its interval, new mail imported within seconds.

One main thread runs all syncs (the engine is not shared between threads). Small threads hold
IMAP connections in IDLE and only wake the main thread when the server announces new mail, within
the account's connection budget (`[imap] max_connections`, the sync's own connection included),
so that the user's other clients can still log in:
- where the server offers NOTIFY (RFC 5465), one connection watches every folder below the
  import root, new import folders included;
- elsewhere one connection per import folder IDLEs, up to the budget; the last of them also
  polls the remaining folders with STATUS every POLL_EVERY seconds.
The folders are listed by the main thread (between syncs, so within the sync's connection).
SIGTERM and SIGINT set a stop flag that the import checks between
batches and the calendar sync between items, so a stop never leaves half an item behind.
A lock file next to the state database keeps a second `watch` from running on the same state.
Each sync round takes the account's lock without waiting (gwsync.accountlock): when a `sync`,
`review` or `push` has the account, the round is skipped and comes again after BUSY_RETRY.
The IDLE threads log in through the watch, never on their own: once a login of the account was
refused (by the server, or locked since an earlier run) none of them sends the credential again;
the main thread locks it, and its rounds then say so without logging in.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from ..config import AccountConfig
from ..crm.searches import summary_links
from ..engine import Engine, SyncReport
from ..errors import Busy, CredentialLocked, GwsyncError, LoginRefused
from ..mail.folders import last_element, parse_import_folder
from ..mail.imap import ImapSession

log = logging.getLogger("gwsync.watch")
IDLE_RENEW = 24 * 60  # seconds; servers may drop an IDLE after 30 minutes (RFC 2177)
IDLE_POLL = 1.0  # how often an IDLE thread looks at the stop flag
MAX_BACKOFF = 300
BUSY_RETRY = 5.0  # seconds until a round skipped for another run on the account comes again
POLL_EVERY = 30.0  # seconds between STATUS polls of the import folders beyond the connection budget


class AlreadyRunning(Busy):
    """Another `gwsync watch` holds the lock on this state database (exit 1)."""


class InstanceLock:
    """An exclusive flock on `<state database>.watch.lock`, released when the process ends
    (however it ends), so a crashed watch never blocks the next one."""

    def __init__(self, state_database: Path):
        self.path = Path(str(state_database) + ".watch.lock")
        self.fd: int | None = None

    def __enter__(self) -> InstanceLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise AlreadyRunning(f"another gwsync watch (pid {holder}) is running on {self.path.with_suffix('')}; "
                                 "stop it first, or give this one its own [state] database") from exc
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)


@dataclass(frozen=True)
class Duty:
    """What one watch connection does: IDLE on `folder` and poll `polled` with STATUS, or (with
    `notify`) IDLE with NOTIFY on every folder below `root`."""

    folder: str = ""
    polled: tuple[str, ...] = ()
    notify: bool = False
    root: str = ""
    delimiter: str | None = None
    own: str = ""  # the import folder (the root, whose own mail is imported), or ""

    def is_import_folder(self, name: str) -> bool:
        # NOTIFY's subtree includes the root itself: its news counts only when it is the import folder
        if self.own and name == self.own:
            return True
        return parse_import_folder(last_element(name, self.delimiter)) is not None


def plan(folders: list[str], budget: int, notify: bool, root: str = "", delimiter: str | None = None,
         own: str = "") -> list[Duty]:
    """The duties of an account's watch connections; `budget` is how many it may hold (its
    max_connections less the sync's own). `own` is the import folder, when configured."""
    if budget < 1:
        return []
    if notify:
        return [Duty(notify=True, root=root, delimiter=delimiter, own=own)]
    idle, rest = folders[:budget], tuple(folders[budget:])
    return [Duty(folder=folder, polled=rest if n == len(idle) - 1 else ()) for n, folder in enumerate(idle)]


class IdleWatcher(threading.Thread):
    """Holds one IMAP connection in IDLE and calls `wake(account)` when mail arrives. Its duty
    may change while it runs (`assign`): it then starts over on the same connection.
    `login` opens its session (Watch.idle_login: never with a refused credential)."""

    def __init__(self, login: Callable[[], ImapSession], account: AccountConfig, duty: Duty,
                 wake: Callable[[str], None], stop: threading.Event):
        super().__init__(name=f"idle-{account.name}-{duty.folder or 'notify'}", daemon=True)
        self.login = login
        self.account = account
        self.duty = duty
        self.wake = wake
        self.stop_event = stop
        self.retired = threading.Event()

    def assign(self, duty: Duty) -> None:
        self.duty = duty  # one reference, read by the thread between waits

    def retire(self) -> None:
        self.retired.set()

    def _stopping(self) -> bool:
        return self.stop_event.is_set() or self.retired.is_set()

    def run(self) -> None:
        backoff = 1.0
        while not self._stopping():
            try:
                self._idle_once()
                backoff = 1.0
            except (LoginRefused, CredentialLocked):
                return  # the main thread locks the credential and reports it
            except Exception as exc:  # a watcher must outlive any server hiccup: log, wait, reconnect
                log.info("IDLE on %s/%s: %s; reconnecting in %.0f s", self.account.name,
                         self.duty.folder or self.duty.root, exc, backoff)
                self.stop_event.wait(backoff)
                backoff = min(backoff * 2, 60)

    def _idle_once(self) -> None:
        session = self.login()
        try:
            while not self._stopping():
                self._serve(session, self.duty)
        finally:
            session.logout()

    def _serve(self, session: ImapSession, duty: Duty) -> None:
        """IDLE for `duty` until it changes or the watch stops."""
        name = self.account.name
        if duty.notify:
            session.notify_start(duty.root)
            log.info("IDLE with NOTIFY on %s: every import folder below %r on one connection", name, duty.root)
        else:
            seen = self._poll(session, duty.polled)  # before the wake below: what comes later is news
            session.idle_start(duty.folder)
            log.info("IDLE on %s/%s", name, duty.folder)
            if duty.polled:
                log.info("polling %s: %d import folder(s) every %.0f s with STATUS (beyond [accounts.%s.imap] "
                         "max_connections = %d)", name, len(duty.polled), POLL_EVERY, name,
                         self.account.imap.max_connections if self.account.imap else 0)
        # Mail may have arrived between the last sync and this IDLE: look once.
        self.wake(name)
        renewed = polled = time.monotonic()
        while not self._stopping() and self.duty is duty:
            if duty.notify:
                news = session.notify_wait(IDLE_POLL)
                if news.other or news.overflow or any(map(duty.is_import_folder, news.folders)):
                    self.wake(name)
                if news.overflow:  # the server stopped notifying: ask again
                    session.idle_done()
                    session.notify_start(duty.root)
            elif session.idle_wait(IDLE_POLL):
                self.wake(name)
            now = time.monotonic()
            if duty.polled and now - polled >= POLL_EVERY:
                news_meanwhile = session.idle_done()
                fresh = self._poll(session, duty.polled)
                session.idle_resume()
                if news_meanwhile or fresh != seen:
                    self.wake(name)
                seen, polled, renewed = fresh, now, now
            elif now - renewed > IDLE_RENEW:
                if session.idle_renew():
                    self.wake(name)
                renewed = now
        session.idle_done()  # a changed duty: what came meanwhile is seen by the wake of the next

    @staticmethod
    def _poll(session: ImapSession, folders: tuple[str, ...]) -> dict[str, tuple[int, int]]:
        return {folder: session.uidnext(folder) for folder in folders}


@dataclass
class Watch:
    engine: Engine
    accounts: list[AccountConfig]
    say: Callable[[str], None] = print  # one line of output
    stop: threading.Event = field(default_factory=threading.Event)
    idle: bool = True

    def __post_init__(self) -> None:
        self._woken: set[str] = set()
        self._wake_event = threading.Event()
        self._lock = threading.Lock()
        self._idlers: dict[tuple[str, int], IdleWatcher] = {}  # (account, connection; -1 for NOTIFY)
        self._no_budget: set[str] = set()  # accounts told that max_connections leaves no IDLE
        # One IMAP login at a time, the IDLE threads' and the syncs' (the engine's login gate): a
        # refusal stops every other login that would send the credential, a master user's too.
        self._login_lock = threading.RLock()
        self.engine.login_gate = self._login_lock
        self.engine.before_login = self._lock_refused_logins
        self._refused: dict[str, LoginRefused | None] = {}  # account -> the refusal not yet locked

    def idle_login(self, account: AccountConfig, password: str) -> ImapSession:
        """An IDLE thread's login. None is sent for an account whose login was refused or whose
        credential is locked; a refusal is handed to the main thread, which locks it."""
        credential = self.engine.credential(account, "imap")  # from the config alone: safe in any thread
        with self._login_lock:
            if account.name in self._refused or credential in self.engine.refused:
                raise CredentialLocked(f"account {account.name}: login refused earlier")
            assert account.imap is not None  # only mail accounts are watched with IDLE
            try:
                return ImapSession.connect(account.imap, password)
            except LoginRefused as exc:
                self._refused[account.name] = exc
                if not exc.authorization:  # refused as this user only: the others' logins are fine
                    self.engine.refused.add(credential)
                self._wake_event.set()
                raise

    def _lock_refused_logins(self) -> None:
        """Lock (in the main thread, which owns the engine) what the IDLE threads were refused,
        and forget the locks another process cleared since (`gwsync unlock`). Under the login
        lock, so that no refusal comes in between; also run before each of the syncs' logins."""
        by_name = {a.name: a for a in self.accounts}
        with self._login_lock:
            pending = [(name, exc) for name, exc in self._refused.items() if exc is not None]
            for name, exc in pending:
                self._refused[name] = None
                self.say(f"gwsync: {self.engine.lock_refused(by_name[name], 'imap', exc)}")
            self.engine.forget_unlocked()

    def _stop_idling(self, account: AccountConfig) -> None:
        """The account's credential is locked: its IDLE threads end and none logs in again."""
        with self._login_lock:
            self._refused.setdefault(account.name, None)
        for key in [k for k in self._idlers if k[0] == account.name]:
            self._idlers.pop(key).retire()

    def wake(self, account: str) -> None:
        with self._lock:
            self._woken.add(account)
        self._wake_event.set()

    def install_signal_handlers(self) -> None:
        def handler(signum, frame):
            self.say(f"gwsync watch: {signal.Signals(signum).name} received; finishing the item at hand")
            self.stop.set()
            self._wake_event.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def run(self) -> None:
        next_due = {a.name: 0.0 for a in self.accounts}
        failures = {a.name: 0 for a in self.accounts}
        by_name = {a.name: a for a in self.accounts}
        try:
            while not self.stop.is_set():
                self._lock_refused_logins()
                now = time.monotonic()
                due = [a for a in self.accounts if next_due[a.name] <= now]
                with self._lock:
                    woken, self._woken = self._woken, set()
                    self._wake_event.clear()
                for account in due:
                    outcome = self._sync(account, None)
                    if outcome == "busy":  # not a failure: the other run syncs it; look again soon
                        pause = min(account.interval, BUSY_RETRY)
                    else:
                        ok = outcome == "ok"
                        failures[account.name] = 0 if ok else failures[account.name] + 1
                        # Back off after failures: interval doubled per failure, at most MAX_BACKOFF more.
                        pause = account.interval if ok else min(account.interval * 2 ** failures[account.name],
                                                                account.interval + MAX_BACKOFF)
                    next_due[account.name] = time.monotonic() + pause
                for name in woken - {a.name for a in due}:
                    if "mail" in by_name[name].areas and self._sync(by_name[name], ["mail"]) == "busy":
                        next_due[name] = min(next_due[name], time.monotonic() + BUSY_RETRY)
                if self.idle and due and not self.stop.is_set():
                    self._refresh_idlers()  # with the interval syncs: new folders are picked up
                timeout = max(0.0, min(next_due.values()) - time.monotonic())
                self._wake_event.wait(timeout)
        finally:
            for idler in self._idlers.values():
                idler.retire()
            for idler in self._idlers.values():
                idler.join(timeout=5)

    def _sync(self, account: AccountConfig, only: list[str] | None) -> str:
        """One round under the account's lock, never waiting for it (this loop serves all
        accounts and must stay responsive to stop): "ok", "failed" or "busy"."""
        report = self.engine.sync(accounts=[account.name], only=only, should_stop=self.stop.is_set,
                                  lock_wait=0, holder="watch")
        self._report(report, account)
        acc = report.accounts.get(account.name)
        if acc is not None and acc.login_failed and account.imap is not None and self.engine.is_locked(account, "imap"):
            self._stop_idling(account)
        elif acc is not None and acc.mail is not None:  # logged in: unlocked since, IDLE may log in again
            with self._login_lock:
                if account.name in self._refused and self._refused[account.name] is None:
                    del self._refused[account.name]
        if acc is not None and acc.busy:
            return "busy"
        return "ok" if report.exit_code == 0 else "failed"

    def _report(self, report: SyncReport, account: AccountConfig) -> None:
        acc = report.accounts.get(account.name)
        if acc is None:
            return
        if acc.busy:
            log.info("account %s: %s has it; trying again in %.0f s", account.name,
                     self.engine.run_locks.holder(account.name) or "another run", min(account.interval, BUSY_RETRY))
            return
        if acc.mail is not None and acc.mail.imported:
            links = ", ".join(a.link for a in acc.mail.activities)
            summary = f"{account.name}: imported {acc.mail.imported} mail(s): {links}"
            searches = summary_links(self.engine.config.web_base, acc.mail.activities)
            if searches:
                summary += " (" + "; ".join(searches) + ")"
            self.say(summary)
            self._notify(account, summary)
        for area, result in acc.calendars.items():
            changes = sum(v for k, v in result.counts.items() if k != "conflicts")
            if changes:
                self.say(f"{account.name} {area}: {result.changes_line()}")
        for line in acc.error_lines():
            self.say(f"gwsync: {line}")

    def _notify(self, account: AccountConfig, summary: str) -> None:
        if not account.notify_command:
            return
        try:
            subprocess.run([*account.notify_command, summary], timeout=30, check=False,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            self.say(f"gwsync: account {account.name}: notify_command failed ({exc})")

    def _refresh_idlers(self) -> None:
        """The watch connections each account's budget allows (see `plan`); new folders are
        picked up and gone ones dropped. Connections no longer needed are closed before new
        ones log in, so the budget holds during the change too."""
        wanted: dict[tuple[str, int], tuple[AccountConfig, str, Duty]] = {}
        passwords: dict = {}  # Secret -> password: a master user's is read once, not once per account
        for account in self.accounts:
            if "mail" not in account.areas or account.imap is None:
                continue
            if account.name in self._refused or self.engine.is_locked(account, "imap"):
                continue
            try:
                duties = self._plan(account)
                secret = account.imap.secret
                if secret not in passwords:
                    passwords[secret] = secret.resolve()
                password = passwords[secret]
            except (GwsyncError, OSError):
                continue  # the interval sync reports it (a refused login is locked already)
            for n, duty in enumerate(duties):
                wanted[(account.name, -1 if duty.notify else n)] = (account, password, duty)
        gone = [self._idlers.pop(key) for key in list(self._idlers)
                if key not in wanted or not self._idlers[key].is_alive()]
        for idler in gone:
            idler.retire()
        for idler in gone:
            idler.join(timeout=IDLE_POLL + 5)
        for key, (account, password, duty) in wanted.items():
            if key in self._idlers:
                if self._idlers[key].duty != duty:
                    self._idlers[key].assign(duty)
                continue
            idler = IdleWatcher(partial(self.idle_login, account, password), account, duty,
                                self.wake, self.stop)
            self._idlers[key] = idler
            idler.start()

    def _plan(self, account: AccountConfig) -> list[Duty]:
        """List the account's import folders and see whether the server offers NOTIFY (one
        login, in the main thread: within the sync's connection of the budget)."""
        assert account.imap is not None
        budget = account.imap.max_connections - 1
        if budget < 1:
            if account.name not in self._no_budget:
                self._no_budget.add(account.name)
                log.info("account %s: max_connections = 1 leaves none for IDLE; new mail comes with the interval "
                         "sync", account.name)
            return []
        from ..mail.importer import own_status

        session = self.engine.connect_imap(account)
        try:
            session.ensure_import_folder(account.imap)  # its own mail is watched too, from the start
            root = session.import_root(account.imap.import_root)  # "" named by the server's namespace
            found = session.import_folders(root, own_status(account, self.engine.config.crm))
            folders = [folder.name for folder in found]
            notify = "NOTIFY" in session.capabilities
            delimiter = session.delimiter(root) if notify else None
        finally:
            session.logout()
        if not folders and not notify:
            return []
        own = root if account.imap.import_folder else ""
        return plan(folders, budget, notify, root, delimiter, own)

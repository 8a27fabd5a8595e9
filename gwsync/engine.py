"""The sync engine: one object that a CLI or a host CRM drives.

    from gwsync import Engine, load_config
    engine = Engine(load_config())          # or Engine(config, crm=MyCRMBackend())
    report = engine.sync()
    print(report.to_json())

A fault of the environment (gwsync.errors.StoreError: a full disk, a corrupt database) stops a
sync: every account shares the databases and the document store, so the accounts after it are
not synced. The report keeps what was done before it, and its `stopped` names the fault.

A refused login on any service locks the credential it sent (see `credential`): no service
that sends the same credential logs in again until `unlock`. A credential of [defaults] (a master
user, a CalDAV service user) is every account's: its lock is recorded under its own name
("defaults.imap") and stops every account's logins at once. Front-ends (the CLI, review,
watch, the web view, the demo) use only the Engine's public methods, never its stores.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from imapclient.exceptions import IMAPClientAbortError

from .accountlock import AccountBusy, AccountLocks, FenceLost, FileAccountLocks, PgAccountLocks
from .accounts import with_database_accounts
from .calendar import dav
from .calendar.dav import Collection
from .config import AREAS, AccountConfig, CaldavConfig, Config, ConfigError, ImapConfig, Secret, known_names
from .crm import Activity, ActivityDraft, ActivityFilter, Attendee, Contact, CRMBackend, Partner
from .errors import (
    EXIT_USAGE,
    CredentialLocked,
    GwsyncError,
    LoginRefused,
    NotFound,
    ServiceError,
    StoreError,
    UsageError,
)
from .mail.imap import ImapSession, ImportFolder, LoginFailed, MailServerError, ServerUnreachable, tls_context
from .people import People, attendee_list, employees_by_address, organizer_of, resolve_attendees
from .storage.records import FAILED, HELD, LEFT_OUT, QUARANTINED, CalendarItemRecord, CalendarLink, MailRecord

if TYPE_CHECKING:  # loaded by the areas that use them: a mail sync never reads iCalendar
    from caldav.davclient import DAVClient

    from .calendar.sync import CalendarResult
    from .mail.importer import MailResult, PendingMail, ProgressFn

log = logging.getLogger("gwsync")

__all__ = ["Engine", "SyncReport", "AccountReport", "Selection", "CredentialLocked", "mail_id"]

SERVICE_NAMES = {"imap": "IMAP", "caldav": "CalDAV", "sieve": "ManageSieve"}
# Connection errors, timeouts and 5xx answers: the area is tried again after these pauses.
RETRY_DELAYS = (0.5, 2.0)
MAIL_ID_LENGTH = 12


def mail_id(record: MailRecord) -> str | None:
    """The id that `gwsync held` shows and `gwsync retry` takes: the start of the mail's
    content key (the sha256 of its bytes), the same in every folder and after UIDVALIDITY changes."""
    return record.key.removeprefix("mail:")[:MAIL_ID_LENGTH] if record.key else None


@dataclass
class Selection:
    """What a review chose for one run: the mails to import, by (folder, UID), with the fields
    it filled in, and what it left out or took in. What it leaves out is recorded in the state
    database and stays out of the CRM (every later sync and watch leave it alone) until a review
    takes it in."""

    mail: set[tuple[str, int]] | None = None  # None: every mail waiting; else new ones and those taken in
    overrides: dict[tuple[str, int], dict] = field(default_factory=dict)
    skip: dict[str, set[str]] = field(default_factory=dict)  # area -> hrefs of new items left out
    # Mails left out, (folder, UID) -> (sender, subject), as `gwsync held` lists them.
    left_out_mail: dict[tuple[str, int], tuple[str | None, str]] = field(default_factory=dict)
    subjects: dict[str, str] = field(default_factory=dict)  # href -> subject of the items in `skip`
    take_in: dict[str, set[str]] = field(default_factory=dict)  # area -> hrefs of items left out before


@dataclass
class AccountReport:
    mail: MailResult | None = None
    calendars: dict[str, CalendarResult] = field(default_factory=dict)  # events / tasks
    errors: list[str] = field(default_factory=list)
    login_failed: bool = False  # a login was refused now, or its credential is locked
    busy: bool = False  # another run held the account; nothing was done for it
    transient: bool = False  # the last error was a connection problem, worth another try
    config_error: bool = False  # an error only a change of the config fixes (exit 2)
    stopped: str | None = None  # a fault of the environment that stopped the whole run

    def stop(self, exc: GwsyncError) -> None:
        self.errors.append(str(exc))
        self.stopped = str(exc)

    def absorb(self, other: AccountReport, errors: bool = True) -> None:
        """Add another attempt's results (and, unless told otherwise, its errors)."""
        self.mail = _merge_mail(self.mail, other.mail)
        for area, result in other.calendars.items():
            self.calendars[area] = _merge_calendar(self.calendars.get(area), result)
        if errors:
            self.errors += other.errors
            self.login_failed |= other.login_failed
            self.config_error |= other.config_error
            self.stopped = self.stopped or other.stopped


    def error_lines(self) -> list[str]:
        lines = list(self.errors) + (self.mail.errors if self.mail else [])
        for result in self.calendars.values():
            lines += result.errors
        return lines

    @property
    def error(self) -> str | None:
        lines = self.error_lines()
        return "; ".join(lines) if lines else None

    @property
    def failed(self) -> bool:
        return bool(self.error) or bool(self.mail and self.mail.failed)

    def to_dict(self) -> dict:
        out: dict = {}
        if self.mail is not None:
            out["mail"] = self.mail.counts() | {
                "activities": [{"id": a.id, "link": a.link, "subject": a.subject} for a in self.mail.activities]}
        for area, result in self.calendars.items():
            out[area] = dict(result.counts) | {"conflict_details": result.conflicts, "requests": result.requests}
            if result.held:  # new items kept out for want of a mandatory field (`gwsync held`)
                out[area]["held"] = result.held
            if result.plan is not None:  # a dry run: what the sync would do
                out[area]["plan"] = result.plan
        out["error"] = self.error
        return out


def _merge_mail(a: MailResult | None, b: MailResult | None) -> MailResult | None:
    if a is None or b is None:
        return a or b
    from .mail.importer import MailResult

    return MailResult(imported=a.imported + b.imported, held=b.held, failed=b.failed,
                      archived_again=a.archived_again + b.archived_again, activities=a.activities + b.activities,
                      errors=b.errors, quarantined=b.quarantined)


def _merge_calendar(a: CalendarResult | None, b: CalendarResult) -> CalendarResult:
    if a is None:
        return b
    from .calendar.sync import CalendarResult

    return CalendarResult(counts={k: a.counts.get(k, 0) + v for k, v in b.counts.items()}, errors=b.errors,
                          conflicts=a.conflicts + b.conflicts, requests=a.requests + b.requests,
                          plan=b.plan if b.plan is not None else a.plan, held=b.held)


@dataclass
class SyncReport:
    accounts: dict[str, AccountReport] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        if any(r.login_failed for r in self.accounts.values()):
            return 3
        if any(r.config_error for r in self.accounts.values()):
            return EXIT_USAGE
        return 1 if any(r.failed for r in self.accounts.values()) else 0

    @property
    def stopped(self) -> str | None:
        """The fault of the environment that stopped the run (the accounts after it did not sync)."""
        return next((r.stopped for r in self.accounts.values() if r.stopped), None)

    def to_dict(self) -> dict:
        return {"accounts": {name: report.to_dict() for name, report in self.accounts.items()},
                "stopped": self.stopped}


# The activity fields that name employees (accounts of the config), with the role an error names.
EMPLOYEE_FIELDS = {"owner": "owner", "delegated_to": "delegate", "participants": "participant"}


def _with_owner(owner: str | None, participants) -> list[str]:
    """The participants with the owner first, each once (the owner always takes part)."""
    return list(dict.fromkeys([owner, *participants] if owner else participants))


def _imap(account: AccountConfig) -> ImapConfig:
    """The account's [imap] table; a ConfigError that names it when the account has none."""
    if account.imap is None:
        raise ConfigError(f"accounts.{account.name} has no [accounts.{account.name}.imap] table")
    return account.imap


def _caldav(account: AccountConfig) -> CaldavConfig:
    """The account's [caldav] table; a ConfigError that names it when the account has none."""
    if account.caldav is None:
        raise ConfigError(f"account {account.name!r} has no [accounts.{account.name}.caldav] table")
    return account.caldav


def store_database(config: Config, path: Path) -> tuple[Path | str, Callable[[], str] | None]:
    """Where a store is: [database] url and its password source (None: libpq finds the
    password), else its own SQLite file `path` ([crm] database, [state] database)."""
    if config.database is None:
        return path, None
    secret = config.database.secret
    return config.database.url, (secret.resolve if secret is not None else None)


def account_locks(config: Config) -> AccountLocks:
    """PostgreSQL advisory locks with [database] url (every host sees them), else lock files."""
    if config.database is None:
        return FileAccountLocks(config.state_database, config.state.lock_wait)
    secret = config.database.secret
    return PgAccountLocks(config.database.url, secret.resolve if secret is not None else None,
                          config.state.lock_wait, config.database.lock_timeout)


def _seconds_since(stamp: str | None, now: datetime) -> int | None:
    return None if not stamp else max(0, int((now - datetime.fromisoformat(stamp)).total_seconds()))


def _lag(wanted: tuple[str, ...] | list[str], areas: dict[str, dict], now: datetime) -> dict:
    """An account's last sync (its latest run of any area), its last success and lag (the
    oldest of its areas': every area is in step up to then; None while one never succeeded),
    and the errors of the areas whose last run failed."""
    runs = [areas.get(area) or {} for area in wanted]
    finished = [run["last_sync"] for run in runs if run.get("last_sync")]
    successes = [run.get("last_success") for run in runs]
    done = [stamp for stamp in successes if stamp]
    oldest = min(done, key=datetime.fromisoformat) if done and len(done) == len(successes) else None
    return {"last_sync": max(finished, key=datetime.fromisoformat) if finished else None,
            "last_success": oldest, "lag": _seconds_since(oldest, now),
            "errors": [{"area": area, "error": info["error"], "at": info["last_sync"]}
                       for area, info in areas.items() if not info["ok"]]}


class Engine:
    def __init__(self, config: Config, crm: CRMBackend | None = None, locks: AccountLocks | None = None):
        from .crm.embedded import EmbeddedCRM  # not needed by a host CRM
        from .storage.state import StateStore  # SQLAlchemy: loaded by the commands that open the stores

        self.config = config
        owned = crm is None
        if crm is None:
            database, password = store_database(config, config.crm.database)
            crm = EmbeddedCRM(database, config.crm.documents, config.crm.statuses, config.crm.link, password)
        self.crm = crm
        try:
            self.state = StateStore(*store_database(config, config.state_database))
            # The accounts kept in the database join the file's, once (a config from the command
            # line has them already): every account list of the Engine is config.accounts.
            self.config = config = with_database_accounts(config, self.state)
        except BaseException:
            if owned:
                self.crm.close()
            if hasattr(self, "state"):
                self.state.close()
            raise
        # One run per account at a time (sync, watch rounds, review, push, unpush), across processes.
        self.run_locks = locks or account_locks(config)
        self._owns_stores = True  # False for an Engine from sharing_stores(): its maker closes them
        self._fresh_run_state()

    def _fresh_run_state(self) -> None:
        """What a user of the Engine keeps across its calls: its own in each sharing_stores() copy."""
        self._should_stop: Callable[[], bool] = lambda: False
        self._before_move: Callable[[], None] = lambda: None  # raises when the account's lock was lost
        self._selection = Selection()
        self._dav_clients: dict[tuple, DAVClient] = {}  # the CalDAV client of the account syncing now
        # Passwords read during one run (None outside runs): a password command runs once per run,
        # not once for the check, once per login and once per retry.
        self._passwords: dict[Secret, str] | None = None
        # Held around each IMAP login; `watch` makes it a lock shared with its IDLE threads, so
        # that no two logins with one credential (a master user's) are in flight at once, and
        # `before_login` its hook that locks what those threads were refused before the check.
        self.login_gate: AbstractContextManager = nullcontext()
        self.before_login: Callable[[], None] = lambda: None
        # The credentials this process locked (or saw refused): what `watch`'s IDLE threads check,
        # as they do not read the state database. The main thread's logins read the database.
        self.refused: set[str] = set()

    def sharing_stores(self) -> Engine:
        """An Engine on this one's stores and account locks, with its own run state (the passwords
        and CalDAV clients of a push, the credentials seen refused): for one request of a server
        that answers from several threads (`gwsync serve`), which opens the stores once instead
        of per request. The stores are made for threads (a pooled connection per write, a read
        connection per thread; the locks hold nothing between calls). Closing it closes nothing."""
        other = copy.copy(self)
        other._owns_stores = False
        other._fresh_run_state()
        return other

    def close(self) -> None:
        if self._owns_stores:
            self.crm.close()
            self.state.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def select_accounts(self, names: list[str] | tuple[str, ...] | None) -> list[AccountConfig]:
        if names:
            return [self.config.account(n) for n in names]
        if not self.config.accounts:
            raise ConfigError("the config has no [accounts.NAME] table: add one (see the README)")
        return list(self.config.accounts.values())

    # -- credentials -----------------------------------------------------------------------

    @staticmethod
    def _server(account: AccountConfig, service: str):
        return {"imap": account.imap, "caldav": account.caldav, "sieve": account.sieve}[service]

    def credential(self, account: AccountConfig, service: str) -> str:
        """The key of the credential a login to `service` sends: the user whose password it is
        (a master user's for a login through it), the server's host and where the password comes
        from, e.g. "alice@mail.example.com (accounts.alice.imap)" or "gwsync@mail.example.com
        (defaults.imap)" for every account of a master user. ManageSieve borrowing IMAP's host,
        user and password sends the same credential as IMAP, so a lock on either stops both."""
        cfg = self._server(account, service)
        if cfg is None:
            raise ConfigError(f"account {account.name} has no [accounts.{account.name}.{service}] table")
        host = urlsplit(cfg.url).hostname if service == "caldav" else cfg.host
        user = cfg.username if service == "caldav" else cfg.login_user
        return f"{user}@{(host or '').lower()} ({cfg.secret.where})"

    def credential_name(self, account: AccountConfig, service: str) -> str:
        """Whose lock a refusal of this credential is, and what `gwsync unlock` takes to clear
        it: the account's name, or a shared credential's table ("defaults.imap")."""
        cfg = self._server(account, service)
        return cfg.secret.where if cfg is not None and cfg.secret.shared else account.name

    def _acting_key(self, account: AccountConfig, service: str) -> str:
        """The key of a shared credential's login as this account's user: what a refusal to act
        for the user (AUTHORIZATIONFAILED) locks, e.g. "alice by gwsync@mail.example.com (defaults.imap)"."""
        return f"{self._server(account, service).username} by {self.credential(account, service)}"

    def _refused_text(self, account: AccountConfig, service: str, lock: dict | None = None) -> str:
        name = self.credential_name(account, service)
        if name == account.name:
            return f"fix the password, then run `gwsync unlock {name}`"
        if lock is not None and lock.get("credential") == self._acting_key(account, service):
            return f"fix [accounts.{account.name}] username or the user on the server, then run " \
                   f"`gwsync unlock {account.name}`"
        return f"the credential is [{name}]'s, which every account uses: fix its password there, then run " \
               f"`gwsync unlock {name}`"

    def _lock_of(self, account: AccountConfig, service: str) -> dict | None:
        key = self.credential(account, service)
        users = [(account.name, s) for s in SERVICE_NAMES
                 if self._server(account, s) is not None and self.credential(account, s) == key]
        lock = self.state.lock_of(key, users)
        if lock is None and self._server(account, service).secret.shared:
            lock = self.state.lock_of(self._acting_key(account, service))
        return lock

    def is_locked(self, account: AccountConfig, service: str) -> bool:
        """Whether the credential a login to `service` would send is locked."""
        return self._lock_of(account, service) is not None

    def forget_unlocked(self) -> None:
        """Drop from `refused` what is no longer locked (an unlock by another process)."""
        self.refused = {key for key in self.refused if self.state.lock_of(key) is not None}

    def check_lock(self, account: AccountConfig, service: str) -> None:
        """Raise CredentialLocked (exit 3) when the credential a login to `service` would send
        is locked, by a refused login on this service or any other that sends the same one."""
        lock = self._lock_of(account, service)
        if lock:
            raise CredentialLocked(
                f"account {account.name}: the {SERVICE_NAMES.get(lock['service'], lock['service'])} login was "
                f"refused at {lock['locked_at']}, so gwsync does not try it again; "
                f"{self._refused_text(account, service, lock)}")

    def lock_refused(self, account: AccountConfig, service: str, exc: LoginRefused) -> LoginRefused:
        """Lock the credential a refused login sent; returns the error to show, which says so.
        A shared credential that may not act for this account's user (the server answered
        AUTHORIZATIONFAILED: its password was right) locks only this account's use of it."""
        if exc.locked:
            return exc
        if exc.authorization and self._server(account, service).secret.shared:
            name, key = account.name, self._acting_key(account, service)
            why = "this account is now locked so that the server's penalty for refused logins does not slow " \
                  "the others"
        else:
            name, key = self.credential_name(account, service), self.credential(account, service)
            why = "the credential is now locked so that the server does not block the account"
        self.state.lock(name, service, str(exc), key)
        self.refused.add(key)
        out = exc.reworded(f"account {account.name}: {exc}; {why}: "
                           f"{self._refused_text(account, service, {'credential': key})}")
        out.locked = True
        return out

    @contextmanager
    def _naming(self, account: AccountConfig) -> Iterator[None]:
        """A server's error names the account (a refused login's does already)."""
        try:
            yield
        except ServiceError as exc:
            if str(exc).startswith(f"account {account.name}"):
                raise
            raise exc.reworded(f"account {account.name}: {exc}") from None

    @contextmanager
    def _locking(self, account: AccountConfig, service: str) -> Iterator[None]:
        """Around everything that sends the credential of `service`: a refused login locks it."""
        try:
            yield
        except LoginRefused as exc:
            raise self.lock_refused(account, service, exc) from None

    def locks(self) -> list[dict]:
        """Every credential lock: account, service (whose login was refused), credential, reason, since."""
        return self.state.locks()

    def unlock(self, account: str) -> list[str]:
        """Clear the credential locks of an account, or of a shared credential by its name
        ("defaults.imap"), after the password was fixed; returns the services whose login had
        been refused. An account's shared credentials are cleared with it (the one they are
        shared with: "imap (defaults.imap)")."""
        services = self.state.unlock(account)
        self.refused.clear()  # what this process saw refused: the next login tells again
        if account in self.config.accounts:
            config = self.config.accounts[account]
            shared = {self.credential_name(config, s) for s in SERVICE_NAMES if self._server(config, s) is not None}
            for name in sorted(shared - {account}):
                services += [f"{service} ({name})" for service in self.state.unlock(name)]
        return services

    def connect_imap(self, account: AccountConfig) -> ImapSession:
        """Log in, unless the credential is locked; a refused login locks it (one attempt only)."""
        imap = _imap(account)
        self.check_lock(account, "imap")
        password = self._password(imap.secret)
        with self.login_gate:
            self.before_login()
            self.check_lock(account, "imap")  # another thread's login may have been refused meanwhile
            with self._locking(account, "imap"):
                return ImapSession.connect(imap, password)

    def import_folders(self, account: AccountConfig) -> list[ImportFolder]:
        """The account's import folders on the server (one login)."""
        from .mail.importer import own_status

        with self._naming(account):
            session = self.connect_imap(account)
            try:
                session.ensure_import_folder(_imap(account))  # created when missing, as by a sync
                return session.import_folders(_imap(account).import_root, own_status(account, self.config.crm))
            finally:
                session.logout()

    def sync(self, accounts: list[str] | tuple[str, ...] | None = None,
             only: list[str] | tuple[str, ...] | None = None, dry_run: bool = False,
             progress: ProgressFn | None = None, force: bool = False,
             should_stop: Callable[[], bool] | None = None, lock_wait: float | None = None,
             holder: str = "sync", selection: Selection | None = None) -> SyncReport:
        """One sync of the accounts' areas. `should_stop` is asked between batches of mail and
        between calendar items; when it says yes the sync ends early, with nothing half done.
        Each account is synced under its lock (`holder` names this run to others); an account
        that stays busy beyond `lock_wait` (default: [state] lock_wait) gets one error line and
        `busy`, and the others still sync. A dry run changes nothing and takes no lock.
        `selection` (from a review) narrows what the run imports; see Selection."""
        asked = should_stop or (lambda: False)
        self._should_stop = asked
        self._selection = selection or Selection()
        report = SyncReport()
        selected = self.select_accounts(accounts)
        with self._one_run():
            self.check_passwords(selected, only)
            try:
                for account in selected:
                    areas = [a for a in (only or account.areas) if a in AREAS]
                    acc_report = report.accounts.setdefault(account.name, AccountReport())
                    try:
                        with nullcontext() if dry_run else self.run_locks.hold(account.name, holder, lock_wait) as held:
                            self._should_stop = self._fenced(asked, held, account.name, acc_report)
                            self._before_move = self._move_guard(held, account.name)
                            if not dry_run:
                                self._record_review(account)
                            self._sync_areas(account, areas, acc_report, dry_run, force, progress)
                    except AccountBusy as exc:
                        acc_report.busy = True
                        acc_report.errors.append(str(exc))
                    if acc_report.stopped:
                        break  # the same databases and disk for every account: the others would fail alike
            finally:
                self._selection = Selection()
                self._before_move = lambda: None
            return report

    def _fenced(self, asked: Callable[[], bool], held: Any, name: str, acc_report: AccountReport
                ) -> Callable[[], bool]:
        """`asked`, or the account's lock lost (its database session ended): asked between
        batches, before each CRM commit, so a run that lost the lock moves no more mail."""
        if held is None:
            return asked

        def should_stop() -> bool:
            if asked():
                return True
            if self.run_locks.check(held):
                return False
            if not acc_report.stopped:
                acc_report.errors.append(f"account {name}: the account's lock in the database was lost (its "
                                         "session ended); stopped before the next commit, the next run goes on")
                acc_report.stopped = acc_report.errors[-1]
            return True

        return should_stop

    def _move_guard(self, held: Any, name: str) -> Callable[[], None]:
        """Asked after each CRM commit, right before mail moves to the archive: a run whose lock's
        session ended meanwhile (frozen past [database] lock_timeout) leaves the mail to the run
        that took over, so that two runs never move the same mail at once."""
        def before_move() -> None:
            if held is not None and not self.run_locks.check(held):
                raise FenceLost(name)

        return before_move

    def _record_review(self, account: AccountConfig) -> None:
        """The calendar items the review left out or took in (its mails: by the import, which
        knows their folders' UIDVALIDITY)."""
        chosen = self._selection
        for area, hrefs in chosen.take_in.items():
            self.state.take_in(account.name, area, hrefs)
        self.state.save_calendar_items([
            CalendarItemRecord(account=account.name, area=area, href=href, outcome=LEFT_OUT,
                               subject=chosen.subjects.get(href)) for area, hrefs in chosen.skip.items()
            for href in hrefs])

    def _sync_areas(self, account, areas, acc_report, dry_run, force, progress) -> None:
        for area in areas:
            if self._should_stop():
                break
            if area != "mail" and account.caldav is None:
                acc_report.errors.append(f"account {account.name}: area {area} needs an "
                                         f"[accounts.{account.name}.caldav] table in the config")
                continue
            self._sync_area_with_retries(account, area, acc_report, dry_run, force, progress)
            if acc_report.stopped:
                break

    def _password(self, secret: Secret) -> str:
        if self._passwords is None:
            return secret.resolve()
        if secret not in self._passwords:
            self._passwords[secret] = secret.resolve()
        return self._passwords[secret]

    @contextmanager
    def _one_run(self) -> Iterator[None]:
        """One run (a sync, a push): within it each password source is read once, and one CalDAV
        client serves an account's collections; afterwards both are forgotten (a long-running
        watch reads a changed password at its next run)."""
        self._passwords = {}
        try:
            yield
        finally:
            self._passwords = None
            self._dav_clients = {}  # the CalDAV session of the run, too

    def check_passwords(self, accounts: list[AccountConfig], only: list[str] | tuple[str, ...] | None = None) -> None:
        """Read every password the run will need before its first login: a source that gives
        none is a ConfigError (exit 2) while no server has seen a login, so nothing is locked
        and no account is half synced."""
        for account in accounts:
            areas = set(only or account.areas)
            if "mail" in areas and account.imap is not None:
                self._password(account.imap.secret)
            if areas & {"events", "tasks"} and account.caldav is not None and account.caldav.auth != "none":
                self._password(account.caldav.secret)

    def _sync_area_with_retries(self, account, area, acc_report, dry_run, force, progress) -> None:
        """Connection problems are retried after short pauses; every step is idempotent, so
        running an area again after a dropped connection is safe."""
        for delay in (*RETRY_DELAYS, None):
            attempt = AccountReport()
            try:
                if area == "mail":
                    self._sync_mail(account, attempt, dry_run, progress)
                else:
                    self._sync_calendar(account, area, attempt, dry_run, force)
            except StoreError as exc:  # the environment's fault: stop, count it against nothing
                attempt.stop(exc)
            except GwsyncError as exc:  # a server's, or the config's: this area's error
                attempt.errors.append(exc.line if str(exc).startswith(f"account {account.name}")
                                      else f"account {account.name}, {area}: {exc.line}")
                attempt.login_failed |= exc.exit_code == 3
                attempt.config_error |= exc.exit_code == EXIT_USAGE
                attempt.transient = exc.transient
            if not attempt.transient or delay is None or attempt.stopped:
                acc_report.absorb(attempt)
                if not dry_run:
                    try:
                        self._record(account.name, area, attempt)
                    except StoreError as exc:  # the state database failed just now
                        if not acc_report.stopped:
                            acc_report.stop(exc)
                return
            acc_report.absorb(attempt, errors=False)  # keep what it did; its error is retried
            log.info("account %s, %s: %s; trying again in %.1f s", account.name, area, attempt.errors[-1], delay)
            time.sleep(delay)

    def _record(self, name: str, area: str, attempt: AccountReport) -> None:
        """For `gwsync status`: how the area's last run went (failed connects included)."""
        if area == "mail":
            counts = attempt.mail.counts() if attempt.mail else {}
            errors = attempt.errors + (attempt.mail.errors if attempt.mail else [])
            failed = bool(attempt.mail and attempt.mail.failed)
        else:
            result = attempt.calendars.get(area)
            counts = dict(result.counts) if result else {}
            errors = attempt.errors + (result.errors if result else [])
            failed = False
        self.state.record_run(name, area, ok=not errors and not failed, summary=counts,
                              error="; ".join(errors) or None)

    def collection(self, account: AccountConfig, area: str) -> Collection:
        """The account's events or tasks collection. The first run finds and checks it; later
        runs reuse its URL and auth scheme, so that a sync with no changes is one request."""
        self.check_lock(account, "caldav")
        cfg = _caldav(account)
        verify: bool | str = cfg.ca_file or cfg.verify
        source = f"{cfg.url} {cfg.username} {cfg.collection(area)}"
        url, auth_type = self.state.dav_cache(account.name, area, source)
        password = self._password(cfg.secret) if cfg.auth != "none" else None
        # One client per account and run: the events and tasks collections share its session,
        # so a Digest challenge is answered once per run, not once per collection.
        key = (account.name, cfg.url, cfg.username, password, str(verify), auth_type)
        client = self._dav_clients.get(key)
        if client is None:
            client = dav.connect(cfg.url, cfg.username, password, verify=verify, timeout=int(cfg.timeout),
                                 auth_type=auth_type)
            self._dav_clients = {key: client}
        if url is None:
            with self._locking(account, "caldav"):
                url = dav.resolve_collection(client, cfg.url, cfg.collection(area))
                collection = Collection(client, url)
                collection.check()
            self.state.save_dav_cache(account.name, area, source, url, dav.negotiated_auth_type(client))
        return Collection(client, url)

    def _sync_calendar(self, account: AccountConfig, area: str, acc_report: AccountReport, dry_run: bool,
                       force: bool) -> None:
        from .calendar.sync import CalendarSync

        name = account.name
        try:
            collection = self.collection(account, area)
            with self._locking(account, "caldav"):
                left_out = {r.href for r in self.state.calendar_items(name, area, LEFT_OUT)}
                result = CalendarSync(self.config, account, area, self.crm, self.state, collection,
                                      dry_run=dry_run, force=force, should_stop=self._should_stop,
                                      skip_hrefs=left_out | self._selection.skip.get(area, set())).run()
        except (CredentialLocked, LoginRefused) as exc:
            acc_report.login_failed = True
            acc_report.errors.append(str(exc))
            return
        except dav.DavUnreachable as exc:
            acc_report.transient = True
            acc_report.errors.append(f"account {name}: {exc}; nothing is lost, gwsync will try again next run")
            return
        except (dav.DavError, ConfigError) as exc:
            acc_report.errors.append(f"account {name}, {area}: {exc}")
            acc_report.config_error |= exc.exit_code == EXIT_USAGE  # a certificate or login the config must fix
            # Maybe the collection moved or the auth scheme changed: find it afresh next time.
            self.state.save_dav_cache(name, area, "", None, None)
            return
        acc_report.calendars[area] = result

    def _sync_mail(self, account: AccountConfig, acc_report: AccountReport, dry_run: bool,
                   progress: ProgressFn | None) -> None:
        from .mail.importer import MailImporter

        name = account.name
        try:
            session = self.connect_imap(account)
        except (LoginFailed, CredentialLocked) as exc:
            acc_report.login_failed = True
            acc_report.errors.append(str(exc))
            return
        except ServerUnreachable as exc:
            acc_report.transient = True
            again = "" if exc.server_answered else " is the server up?"
            acc_report.errors.append(f"account {name}: {exc};{again} gwsync will try again next run")
            return
        except (MailServerError, ConfigError) as exc:
            acc_report.errors.append(f"account {name}: {exc}")
            acc_report.config_error |= exc.exit_code == EXIT_USAGE
            return
        importer = None
        try:
            importer = MailImporter(account, self.config.crm, self.crm, self.state, dry_run=dry_run,
                                    progress=progress, should_stop=self._should_stop,
                                    before_move=self._before_move, selection=self._selection.mail,
                                    overrides=self._selection.overrides, left_out=self._selection.left_out_mail)
            acc_report.mail = importer.run(session)
        except StoreError:
            session.logout()
            acc_report.mail = importer.result if importer else None  # what was committed before it
            raise
        except (ServerUnreachable, OSError, IMAPClientAbortError) as exc:
            session.abort()
            acc_report.mail = importer.result if importer else None  # the batches committed before the drop
            acc_report.transient = True
            what = exc if isinstance(exc, ServerUnreachable) else f"connection lost ({exc})"
            acc_report.errors.append(f"account {name}: {what}; nothing is lost, run sync again")
        except MailServerError as exc:
            session.logout()
            acc_report.mail = importer.result if importer else None
            acc_report.errors.append(f"account {name}: {exc}")
        except BaseException:
            session.abort()  # interrupted: the CRM transaction rolled back; the next run finishes
            raise
        else:
            session.logout()

    # -- push / unpush -----------------------------------------------------------------------

    def calendar_account(self, name: str | None, area: str | None = None) -> AccountConfig:
        """The account named, or the only one with a CalDAV table (and the area, if given)."""
        if name:
            account = self.config.account(name)
            if account.caldav is None:
                raise ConfigError(f"account {name!r} has no [accounts.{name}.caldav] table")
            return account
        candidates = [a for a in self.config.accounts.values() if a.caldav is not None]
        if len(candidates) != 1:
            names = ", ".join(a.name for a in candidates) or "none"
            raise UsageError(f"choose the account with --account (accounts with CalDAV: {names})")
        return candidates[0]

    def push(self, activity_id: int, area: str, account_name: str | None = None) -> SyncReport:
        """Put any activity on the account's calendar (events) or task list (tasks), now.
        Raises AccountBusy when another run holds the account beyond the wait."""
        account = self.calendar_account(account_name, area)
        with self._one_run():
            self.check_passwords([account], [area])
            activity = self.crm.get_activity(activity_id)
            if activity is None:
                raise NotFound(f"no activity with id {activity_id}")
            with self.run_locks.hold(account.name, "push"):
                other = "tasks" if area == "events" else "events"
                if any(l.account == account.name and l.area == other
                       for l in self.state.links_of_activity(activity_id, activity.identity)):
                    raise GwsyncError(f"activity {activity_id} is on the {other} collection already; "
                                      "`gwsync unpush` it first")
                self.state.set_membership(account.name, area, activity_id, True, activity.identity)
                self.state.set_membership(account.name, other, activity_id, False, activity.identity)
                report = SyncReport()
                acc_report = report.accounts.setdefault(account.name, AccountReport())
                self._sync_calendar(account, area, acc_report, dry_run=False, force=False)
            return report

    def unpush(self, activity_id: int, account_name: str | None = None) -> int:
        """Delete the activity's groupware items (conditionally) and keep the activity; it stays
        off the calendar until pushed again. Returns how many items were deleted. Raises
        AccountBusy when another run holds the account beyond the wait."""
        account = self.calendar_account(account_name)
        with self.run_locks.hold(account.name, "unpush"), self._locking(account, "caldav"):
            try:
                return self._unpush(account, activity_id)
            except dav.DavError as exc:
                if isinstance(exc, LoginRefused):
                    raise
                raise exc.reworded(f"activity {activity_id}: {exc}") from None

    def _unpush(self, account: AccountConfig, activity_id: int) -> int:
        activity = self.crm.get_activity(activity_id)
        identity = activity.identity if activity is not None else None
        deleted = 0
        for link in self.state.links_of_activity(activity_id, identity):
            if link.account != account.name:
                continue
            collection = self.collection(account, link.area)
            try:
                collection.delete(link.href, link.etag or "*")
            except dav.PreconditionFailed as exc:
                raise dav.DavError(f"the item of activity {activity_id} changed on the server since the last sync; "
                                   "run `gwsync sync` first, then unpush") from exc
            self.state.drop_link(account.name, link.area, activity_id, link.href)
            deleted += 1
        for area in ("events", "tasks"):
            self.state.set_membership(account.name, area, activity_id, False, identity)
        return deleted

    # -- failed and quarantined mail -------------------------------------------------------

    def retry(self, ids: list[str] | tuple[str, ...] = (), everything: bool = False
              ) -> tuple[list[MailRecord], list[str]]:
        """Give failed and quarantined mail its attempts back, so that the next sync tries it
        again: the mails with these ids (as `gwsync held` shows them), or all of them. Returns
        the records released and the ids that name no failed or quarantined mail."""
        failing = self.state.by_outcome(QUARANTINED) + self.state.by_outcome(FAILED)
        if everything:
            chosen, unknown = failing, []
        else:
            wanted = {given: given.strip().lower().removeprefix("mail:") for given in ids}

            def named(record: MailRecord, given: str) -> bool:  # the id, or more of the key
                return (len(given) >= MAIL_ID_LENGTH and record.key is not None
                        and record.key.removeprefix("mail:").startswith(given))

            chosen = [r for r in failing if any(named(r, w) for w in wanted.values())]
            unknown = [given for given, w in wanted.items() if not any(named(r, w) for r in chosen)]
        self.state.save([replace(r, outcome=FAILED, attempts=0) for r in chosen])
        return chosen, unknown

    # -- unknown senders ---------------------------------------------------------------------

    def unknown_senders(self) -> list[dict]:
        """Addresses of unassigned imported mail and of held mail, with counts and the partner
        their domain matches, if any."""
        from .mail.decisions import sender_domain

        counts: dict[str, dict] = {}
        for address, count in self.crm.unassigned_senders().items():
            counts.setdefault(address, {"imported": 0, "held": 0})["imported"] += count
        for record in self.state.by_outcome("held"):
            if record.sender and self.crm.find_contact_by_email(record.sender) is None:
                counts.setdefault(record.sender.lower(), {"imported": 0, "held": 0})["held"] += 1
        out = []
        for address, c in sorted(counts.items(), key=lambda kv: (-(kv[1]["imported"] + kv[1]["held"]), kv[0])):
            domain = sender_domain(address)
            partner = self.crm.find_partner_by_domain(domain) if domain else None
            out.append({"email": address, "imported": c["imported"], "held": c["held"],
                        "partner_id": partner.id if partner else None,
                        "partner": partner.name if partner else None})
        return out

    def assign(self, email: str, contact_id: int | None = None, new_contact: str | None = None,
               partner_id: int | None = None) -> dict:
        """Give an address to a contact (an existing one, or a new one with it as default
        address), link every earlier activity from it, and count the held mail the next sync
        releases."""
        email = email.strip().lower()
        if (contact_id is None) == (new_contact is None):
            raise ValueError("give either an existing contact or a new contact's name")
        if contact_id is not None:
            contact = self.crm.add_contact_email(contact_id, email)
        else:
            assert new_contact is not None  # one of the two, checked above
            known = self.crm.find_contact_by_email(email)
            if known is not None and known.name.strip().casefold() != new_contact.strip().casefold():
                raise ValueError(f"{email} belongs to contact #{known.id} {known.name} already; "
                                 f"assign it to that contact instead")
            # The same request again (a form sent twice, a re-run script) finds its contact.
            contact = known or self.crm.add_contact(new_contact, email, partner_id)
        linked = self.crm.link_activities_from(email, contact.id, contact.partner_id)
        held = sum(1 for r in self.state.by_outcome("held") if (r.sender or "").lower() == email)
        return {"email": email, "contact_id": contact.id, "partner_id": contact.partner_id,
                "linked_activities": linked, "held_to_release": held}

    # -- server-side rules (Sieve) -----------------------------------------------------------

    @contextmanager
    def sieve(self, account: AccountConfig):
        """The account's rules on its ManageSieve server, logged in for the block, unless the
        credential is locked; a refused login locks it. Errors name the account."""
        from .mail.sieve import SieveRules

        cfg = account.sieve
        if cfg is None:
            raise ConfigError(f"account {account.name} has no [accounts.{account.name}.sieve] or imap table")
        self.check_lock(account, "sieve")
        password = self._password(cfg.secret)
        authcid, authzid = cfg.login()  # through [imap]'s master user, when it borrows its password
        with self._naming(account):
            with self._locking(account, "sieve"):
                rules = SieveRules(cfg.host, cfg.port, authcid, password, cfg.starttls,
                                   tls=tls_context(cfg.verify, cfg.ca_file), authz=authzid or "",
                                   acting_for=cfg.username if cfg.login_user != cfg.username else None)
            with rules:
                yield rules

    def rules(self, account: AccountConfig):
        """The rules gwsync keeps on the account's ManageSieve server."""
        with self.sieve(account) as sieve:
            return sieve.rules()

    def remove_rule(self, account: AccountConfig, rule_id: int):
        """Remove one rule; with the last one, the user's own script is back as it was."""
        with self.sieve(account) as sieve:
            return sieve.remove(rule_id)

    def import_folder_name(self, account: AccountConfig, folder: str, session: ImapSession) -> str:
        """A full import folder name from a full name (in the server's separator) or a name
        below the import root, checked against the pattern and the CRM's status keys."""
        from .mail.folders import last_element, parse_import_folder

        full = session.folder_name(_imap(account).import_root, folder)
        parsed = parse_import_folder(last_element(full, session.separator()))
        if parsed is None:
            raise UsageError(f"{folder!r} is not an import folder name: use `CRM <description> [<status>]`")
        if parsed.status not in self.crm.statuses():
            known = ", ".join(sorted(self.crm.statuses()))
            raise UsageError(f"{folder!r}: status key [{parsed.status}] is unknown to the CRM (known: {known})")
        return full

    def add_rule(self, account: AccountConfig, sender: str, folder: str):
        """File mail from `sender` (an address, or @domain) into an import folder, on the server."""
        sender = sender.strip().lower()
        if "@" not in sender or sender.endswith("@") or " " in sender:
            raise UsageError(f"--from {sender!r}: give an address (a@b.example) or a domain (@b.example)")
        with self._naming(account):
            session = self.connect_imap(account)
            try:
                full = self.import_folder_name(account, folder, session)
                session.ensure_folder(full)
            finally:
                session.logout()
        with self.sieve(account) as rules:
            return rules.add(sender, full)

    # -- review: what is waiting -------------------------------------------------------------

    def pending_mail(self, account: AccountConfig) -> list[PendingMail]:
        """The mail waiting in the account's import folders, as the import would see it (one
        login, no lock, nothing changed): for a review to choose from."""
        from .mail.importer import MailImporter

        with self._naming(account):
            session = self.connect_imap(account)
            try:
                return MailImporter(account, self.config.crm, self.crm, self.state).preview(session)
            finally:
                session.logout()

    def waiting_items(self, account: AccountConfig, area: str) -> list:
        """New items on the account's events or tasks collection that the CRM does not have yet,
        as (href, item data): for a review to leave some out (Selection.skip) or take in those
        left out before (`kept_out`). Records of left-out items gone from the server are dropped."""
        from .calendar.sync import CalendarSync

        with self._naming(account):
            collection = self.collection(account, area)
            with self._locking(account, "caldav"):
                waiting = CalendarSync(self.config, account, area, self.crm, self.state, collection).waiting()
                left_out = self.state.calendar_items(account.name, area, LEFT_OUT)
                present = collection.list_etags() if left_out else {}
        gone = [(account.name, area, r.href) for r in left_out if r.href not in present]
        self.state.save_calendar_items([], gone, LEFT_OUT)
        return waiting

    def kept_out(self, account: str | None = None, area: str | None = None) -> list[CalendarItemRecord]:
        """New calendar items kept out of the CRM: left out in a review (until one takes them in),
        or held for a mandatory field (until it can be filled); for `gwsync held` and the review."""
        return self.state.calendar_items(account, area)

    # -- the CRM and the state, for front-ends -------------------------------------------------

    def statuses(self) -> dict[str, str]:
        """The CRM's status keys and their labels."""
        return self.crm.statuses()

    def activity(self, activity_id: int) -> Activity | None:
        """One activity with its documents, or None."""
        return self.crm.get_activity(activity_id)

    def activities(self, flt: ActivityFilter) -> list[Activity]:
        """The activities the filter selects (its order, limit and offset included)."""
        return self.crm.list_activities(flt)

    def count_activities(self, flt: ActivityFilter) -> int:
        """How many activities the filter selects, without limit and offset."""
        return self.crm.count_activities(flt)

    def create_activity(self, draft: ActivityDraft) -> int:
        """Create an activity (idempotent by its key); returns its id. Its owner, delegate and
        participants must be employees (UsageError, nothing created); the owner is made a
        participant."""
        self._check_employees({name: getattr(draft, name) for name in EMPLOYEE_FIELDS})
        (activity_id,) = self.crm.create_activities([replace(
            draft, participants=_with_owner(draft.owner, draft.participants))])
        return activity_id

    def update_activity(self, activity_id: int, changes: dict, added: Iterable[str] = (),
                        removed: Iterable[str] = ()) -> bool:
        """Change fields of an activity; LookupError when there is none with this id. The next
        sync carries the change to its calendar item. True if anything changed.

        Owner, delegate and participants must be employees (UsageError, nothing changed). The
        owner stays a participant: new participants get the owner (the new one, if it changes
        too); a new owner alone replaces the old one among the participants, so that the old
        owner's calendar copy leaves at the next sync. Instead of a new list, participants may
        be `added` and `removed` by name (the web form's ticks), after the owner's steps; the
        owner is never removed."""
        added, removed = list(added), list(removed)
        if "participants" in changes and (added or removed):
            raise ValueError("participants: a new list, or names added and removed, not both")
        self._check_employees(changes | {"participants": added} if added else changes)
        changed = bool(changes)
        if "owner" in changes or "participants" in changes or added or removed:
            current = self.crm.get_activity(activity_id)
            if current is None:
                raise NotFound(f"no activity with id {activity_id}")
            owner = changes.get("owner", current.owner)
            if "participants" in changes:
                changes = changes | {"participants": _with_owner(owner, changes["participants"])}
            else:
                # One atomic step each (a sync may add its account meanwhile), in an order that a
                # repeat of an interrupted change completes: the old owner out, the new one in,
                # then the owner itself, then the names added and removed.
                if current.owner and current.owner != owner:
                    changed |= self.crm.remove_participant(activity_id, current.owner)
                if owner:
                    changed |= self.crm.add_participant(activity_id, owner)
                for name in added:
                    changed |= self.crm.add_participant(activity_id, name)
                for name in removed:
                    if name != owner:
                        changed |= self.crm.remove_participant(activity_id, name)
        self.crm.update_activity(activity_id, changes)
        return changed

    def resolve_attendees(self, emails: list[str], owner: str | None, current: list[Attendee] | tuple = ()) -> People:
        """A meeting's attendees for these addresses (organizer: the one in `current`, else the
        owner), resolved to employees, contacts and partners (gwsync.people)."""
        owner_cfg = self.config.accounts.get(owner) if owner else None
        listed = attendee_list(emails, current, organizer_of(current, owner_cfg))
        return resolve_attendees(listed, employees_by_address(self.config.accounts.values()),
                                 self.crm.find_contact_by_email, self.crm.find_partner_by_domain)

    def add_participants(self, activity_id: int, names: list[str]) -> None:
        """Add these employees to the activity's participants (atomically, each once)."""
        for name in names:
            self.crm.add_participant(activity_id, name)

    def employees(self) -> list[str]:
        """The team: the accounts of the config, by name."""
        return sorted(self.config.accounts)

    def employee(self, name: str, role: str = "employee") -> str:
        """`name`, if it is an employee (an account of the config); else a UsageError (exit 2)
        naming it, in its `role` (owner, delegate, participant), and the known ones."""
        if name not in self.config.accounts:
            raise UsageError(f"{role} {name!r} is not an employee: no account {name!r} in the config "
                             f"(known: {known_names(self.employees())})")
        return name

    def _check_employees(self, fields: dict) -> None:
        for name, role in EMPLOYEE_FIELDS.items():
            value = fields.get(name)
            for person in (value or []) if name == "participants" else [value]:
                if person is not None:
                    self.employee(person, role)

    def delete_activity(self, activity_id: int) -> None:
        """Delete an activity; the next sync deletes its calendar item too. NotFound when there
        is none with this id."""
        if self.crm.get_activity(activity_id) is None:
            raise NotFound(f"no activity with id {activity_id}")
        self.crm.delete_activity(activity_id)

    def document_path(self, sha256: str) -> Path:
        """The file of a stored document, by its content digest. Only a backend that keeps its
        documents as files has one (the embedded store does; CRMBackend does not ask for it)."""
        path_of = getattr(self.crm, "document_path", None)
        if path_of is None:
            raise UsageError(f"the CRM backend ({type(self.crm).__name__}) keeps its documents itself: "
                             "ask it for them")
        return Path(path_of(sha256))

    def calendar_links(self, activity: Activity) -> list[CalendarLink]:
        """The calendar items an activity is linked to, on every account."""
        return self.state.links_of_activity(activity.id, activity.identity)

    def contact(self, contact_id: int) -> Contact | None:
        return self.crm.get_contact(contact_id)

    def partner(self, partner_id: int) -> Partner | None:
        return self.crm.get_partner(partner_id)

    def contacts(self) -> list[Contact]:
        return self.crm.list_contacts()

    def partners(self) -> list[Partner]:
        return self.crm.list_partners()

    def add_contact(self, name: str, email: str, partner_id: int | None = None) -> Contact:
        """A new contact with `email` as its default address; LookupError for an unknown partner."""
        return self.crm.add_contact(name, email, partner_id)

    def add_partner(self, name: str, emails: list[str] | tuple[str, ...] = ()) -> Partner:
        """A new business partner; the domains of `emails` assign mail from unknown people there."""
        return self.crm.add_partner(name, list(emails))

    def not_imported(self) -> list[MailRecord]:
        """Mail held back, failed, quarantined or left out in a review, for `gwsync held` and the
        web view (calendar items kept out: `kept_out`)."""
        return self.state.not_imported()

    def status(self) -> dict[str, dict]:
        """Per account (configured, or met in earlier runs): each area's last run, how many
        mails are held and failed, and its credential locks."""
        runs = self.state.runs()
        locks = self.state.locks()
        held = self.state.by_outcome(HELD)
        failed = self.state.by_outcome(FAILED) + self.state.by_outcome(QUARANTINED)
        now = datetime.now(UTC)
        database = set(self.config.database_accounts or ())
        schedule = None
        if self.config.database is not None:
            from .worker import schedule_view

            schedule = schedule_view(self.state.engine)
        out = {}
        for name in sorted(set(self.config.accounts) | {r["account"] for r in runs}):
            areas = {r["area"]: {"last_sync": r["finished_at"], "ok": bool(r["ok"]),
                                 "last_success": r.get("last_success"), "counts": r["summary"],
                                 "error": r["error"], "lag": _seconds_since(r.get("last_success"), now)}
                     for r in runs if r["account"] == name}
            account = self.config.accounts.get(name)
            out[name] = {
                "source": None if account is None else "database" if name in database else "config",
                **_lag(account.areas if account is not None else tuple(areas), areas, now),
                "areas": areas,
                "held": sum(1 for h in held if h.account == name),
                "failed": sum(1 for f in failed if f.account == name),
                "locked": [{"service": l["service"], "credential": l.get("credential"), "since": l["locked_at"],
                            "reason": l["reason"], "unlock": l["account"]}
                           for l in locks if l["account"] == name or l in self._shared_locks(name, locks)],
                # The workers' view (`gwsync worker`, [database] url only): per area, see worker.schedule_view.
                "schedule": None if schedule is None else schedule.get(name, {}),
            }
        return out

    def workers(self) -> dict | None:
        """The live `gwsync worker` processes on [database] url (worker.workers_view); None
        without one."""
        if self.config.database is None:
            return None
        from .worker import workers_view

        return workers_view(self.state.engine, self.config.worker.stalled_after)

    def _shared_locks(self, name: str, locks: list[dict]) -> list[dict]:
        """The locks on shared credentials ([defaults]) that the account `name` sends."""
        account = self.config.accounts.get(name)
        if account is None:
            return []
        sent = {self.credential(account, s) for s in SERVICE_NAMES
                if self._server(account, s) is not None and self._server(account, s).secret.shared}
        return [lock for lock in locks if lock["account"] != name and lock.get("credential") in sent]


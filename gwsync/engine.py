"""The sync engine: one object that a CLI or a host CRM drives.

    from gwsync import Engine, load_config
    engine = Engine(load_config())          # or Engine(config, crm=MyCRMBackend())
    report = engine.sync()
    print(report.to_json())
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from imapclient.exceptions import IMAPClientAbortError

from .config import AREAS, AccountConfig, Config, ConfigError
from .crm import CRMBackend
from .crmstore import EmbeddedCRM
from .imap import ImapSession, ImportFolder, LoginFailed, MailServerError, ServerUnreachable
from .mailimport import MailImporter, MailResult, ProgressFn
from .state import StateStore

log = logging.getLogger("gwsync")


@dataclass
class AccountReport:
    mail: MailResult | None = None
    errors: list[str] = field(default_factory=list)
    login_failed: bool = False

    @property
    def error(self) -> str | None:
        lines = list(self.errors) + (self.mail.errors if self.mail else [])
        return "; ".join(lines) if lines else None

    @property
    def failed(self) -> bool:
        return bool(self.error) or bool(self.mail and self.mail.failed)

    def to_dict(self) -> dict:
        out: dict = {}
        if self.mail is not None:
            out["mail"] = self.mail.counts() | {
                "activities": [{"id": a.id, "link": a.link, "subject": a.subject} for a in self.mail.activities]}
        out["error"] = self.error
        return out


@dataclass
class SyncReport:
    accounts: dict[str, AccountReport] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return 1 if any(r.failed for r in self.accounts.values()) else 0

    def to_dict(self) -> dict:
        return {"accounts": {name: report.to_dict() for name, report in self.accounts.items()}}


class Engine:
    def __init__(self, config: Config, crm: CRMBackend | None = None):
        self.config = config
        self.crm = crm or EmbeddedCRM(config.crm.database, config.crm.documents, config.crm.statuses,
                                      config.crm.link)
        self.state = StateStore(config.state_database)

    def close(self) -> None:
        self.crm.close()
        self.state.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def select_accounts(self, names: list[str] | tuple[str, ...] | None) -> list[AccountConfig]:
        if names:
            return [self.config.account(n) for n in names]
        if not self.config.accounts:
            raise ConfigError("the config has no [accounts.NAME] table: add one (see the README)")
        return list(self.config.accounts.values())

    def connect_imap(self, account: AccountConfig) -> ImapSession:
        if account.imap is None:
            raise ConfigError(f"accounts.{account.name} has no [accounts.{account.name}.imap] table")
        password = account.imap.secret.resolve()
        return ImapSession.connect(account.imap, password)

    def import_folders(self, account: AccountConfig) -> list[ImportFolder]:
        session = self.connect_imap(account)
        try:
            return session.import_folders(account.imap.import_root)
        finally:
            session.logout()

    def sync(self, accounts: list[str] | tuple[str, ...] | None = None,
             only: list[str] | tuple[str, ...] | None = None, dry_run: bool = False,
             progress: ProgressFn | None = None) -> SyncReport:
        report = SyncReport()
        for account in self.select_accounts(accounts):
            areas = [a for a in (only or account.areas) if a in AREAS]
            acc_report = report.accounts.setdefault(account.name, AccountReport())
            for area in areas:
                if area == "mail":
                    self._sync_mail(account, acc_report, dry_run, progress)
                else:
                    acc_report.errors.append(
                        f"account {account.name}: the {area} area is not available in this version")
        return report

    def _sync_mail(self, account: AccountConfig, acc_report: AccountReport, dry_run: bool,
                   progress: ProgressFn | None) -> None:
        name = account.name
        try:
            session = self.connect_imap(account)
        except LoginFailed as exc:
            acc_report.login_failed = True
            acc_report.errors.append(f"account {name}: {exc}; check the username and password")
            return
        except (ServerUnreachable, MailServerError) as exc:
            acc_report.errors.append(f"account {name}: {exc}; is the server up? gwsync will try again next run")
            return
        except ConfigError as exc:
            acc_report.errors.append(f"account {name}: {exc}")
            return
        try:
            importer = MailImporter(account, self.config.crm, self.crm, self.state, dry_run=dry_run,
                                    progress=progress)
            acc_report.mail = importer.run(session)
        except (ServerUnreachable, OSError, IMAPClientAbortError) as exc:
            session.abort()
            what = exc if isinstance(exc, ServerUnreachable) else f"connection lost ({exc})"
            acc_report.errors.append(f"account {name}: {what}; nothing is lost, run sync again")
        except MailServerError as exc:
            session.logout()
            acc_report.errors.append(f"account {name}: {exc}")
        except BaseException:
            session.abort()  # interrupted: the CRM transaction rolled back; the next run finishes
            raise
        else:
            session.logout()
        if not dry_run:
            mail = acc_report.mail
            self.state.record_run(name, "mail", ok=not acc_report.failed,
                                  summary=mail.counts() if mail else {}, error=acc_report.error)

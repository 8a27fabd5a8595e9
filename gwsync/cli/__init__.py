"""The `gwsync` command line: thin click commands over the Engine's public methods.

Every failure gwsync knows (gwsync.errors.GwsyncError: a config error, a refused login, a locked
credential, a server's refusal, a full disk, a broken or locked database) becomes one line and
its exit code in one place, the `main` group, for every command. A command catches an error
itself only to say more than its message does.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from .. import __version__
from ..config import AREAS, Config, load_config
from ..crm.searches import activity_filter, summary_links
from ..engine import Engine, mail_id
from ..errors import EXIT_FAILED, EXIT_USAGE, GwsyncError
from ..storage.records import FAILED, LEFT_OUT, QUARANTINED

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

EXIT_OK = 0


class Context:
    """What the commands share: the config, and the stores through an Engine.

    The accounts kept in the database are read when the run's first Engine opens the stores
    (gwsync.accounts), so the full config comes with that Engine: the first `config` makes it
    and the first `engine()` hands it out; later ones are new Engines on the same config."""

    def __init__(self, config_path: Path | None, verbosity: int):
        self.config_path = config_path
        self.verbosity = verbosity
        self._config: Config | None = None
        self._file_config: Config | None = None
        self._engine: Engine | None = None  # made with `config`, not yet handed out

    @property
    def file_config(self) -> Config:
        """The config file alone (`gwsync accounts` works on it: a name in both is fixed there)."""
        if self._file_config is None:
            self._file_config = load_config(self.config_path)
        return self._file_config

    @property
    def config(self) -> Config:
        """The config file with the accounts kept in the database."""
        if self._config is None:
            self._engine = self._open(self.file_config)
            self._config = self._engine.config
        return self._config

    def engine(self) -> Engine:
        config = self.config
        engine, self._engine = self._engine, None
        return engine if engine is not None else self._open(config)

    @staticmethod
    def _open(config: Config) -> Engine:
        try:
            return Engine(config)
        except OSError as exc:
            fail(f"cannot open the databases: {exc}", EXIT_USAGE)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    click.echo(f"gwsync: {message}", err=True)
    sys.exit(code)


def emit_json(data) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def _interactive() -> bool:
    return sys.stdout.isatty()


class _Main(click.Group):
    """Runs the commands; a GwsyncError from any of them is one line and its exit code
    (2 config or usage, 3 a refused login or locked credential, 1 anything else)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except GwsyncError as exc:
            fail(exc.line, exc.exit_code)
        finally:
            if isinstance(ctx.obj, Context):
                ctx.obj.close()  # an Engine made for the config that no command took


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="Config file (default: the platform's config dir; GWSYNC_CONFIG overrides).")
@click.option("-v", "--verbose", count=True, help="More output; -vv for debug logs.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors.")
@click.version_option(__version__, prog_name="gwsync")
@click.pass_context
def main(ctx: click.Context, config_path: Path | None, verbose: int, quiet: bool) -> None:
    """Keep a CRM and your mail and calendars in step, over IMAP and CalDAV.

    Mail that you drop into IMAP folders named `CRM <description> [<status>]` becomes a CRM
    activity with that status and is moved to the archive folder.
    """
    verbosity = -1 if quiet else verbose
    level = logging.DEBUG if verbosity >= 2 else logging.INFO if verbosity == 1 else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
    ctx.obj = Context(config_path, verbosity)


# -- worker ----------------------------------------------------------------------------------

@main.command()
@click.option("--concurrency", type=click.IntRange(1, 256), default=None,
              help="Sync jobs at once in this worker (default: [worker] concurrency, 4).")
@click.pass_obj
def worker(obj: Context, concurrency: int | None) -> None:
    """Run sync and watcher jobs from the [database] PostgreSQL until SIGTERM (any number of
    workers, on any hosts; see Company deployment in the README)."""
    from ..worker import run_worker

    run_worker(obj.config, concurrency)


# -- sync ------------------------------------------------------------------------------------

@main.command()
@click.option("--account", "accounts", multiple=True, help="Only this account (repeatable).")
@click.option("--only", "only", multiple=True, type=click.Choice(AREAS), help="Only this area (repeatable).")
@click.option("--dry-run", is_flag=True, help="Show what would happen; change nothing.")
@click.option("--force", is_flag=True, help="Pass the mass-deletion guard.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_obj
def sync(obj: Context, accounts, only, dry_run, force, as_json) -> None:
    """Run one sync: import mail from the CRM folders (and the other areas configured)."""
    with obj.engine() as engine, _progress(obj, as_json) as progress:
        report = engine.sync(accounts=accounts, only=only, dry_run=dry_run, progress=progress, force=force)
    if as_json:
        emit_json(report.to_dict())
    else:
        for name, acc in report.accounts.items():
            if acc.mail is not None and obj.verbosity >= 0:
                m = acc.mail
                verb = "would import" if dry_run else "imported"
                line = f"{name}: {verb} {m.imported} mail(s), held {m.held}, failed {m.failed}"
                if m.archived_again:
                    line += f", archived {m.archived_again} imported earlier"
                click.echo(line)
                for a in m.activities:
                    click.echo(f"  #{a.id} {a.subject or '(no subject)'}  {a.link}")
                for line in summary_links(None if dry_run else obj.config.web_base, m.activities):
                    click.echo(f"  {line}")
                if m.held:
                    click.echo("  held mail is listed by `gwsync held`")
            for area, result in acc.calendars.items():
                if obj.verbosity >= 0:
                    click.echo(f"{name} {area}: {result.changes_line()}, conflicts {result.counts['conflicts']}")
                    for line in result.conflicts:
                        click.echo(f"  conflict: {line}")
                    if result.held:
                        click.echo(f"  held {result.held} new item(s) lacking a mandatory field: see `gwsync held`")
                    if result.plan:  # a dry run: the plan, one line per action
                        from ..calendar.sync import plan_line

                        for entry in result.plan:
                            click.echo(f"{name} {area}: {plan_line(entry)}")
            for line in acc.error_lines():
                click.echo(f"gwsync: {line}", err=True)
    sys.exit(report.exit_code)


class _progress:
    """A rich progress bar on a terminal; nothing when piped, quiet or printing JSON."""

    def __init__(self, obj: Context, as_json: bool):
        self.enabled = sys.stderr.isatty() and obj.verbosity >= 0 and not as_json
        self.bar: Progress | None = None
        self.tasks: dict[str, TaskID] = {}

    def __enter__(self):
        if not self.enabled:
            return None
        from rich.progress import Progress

        self.bar = Progress(transient=True)
        self.bar.__enter__()
        return self.update

    def update(self, done: int, total: int, what: str) -> None:
        assert self.bar is not None  # given out by __enter__, which made the bar
        if what not in self.tasks:
            self.tasks[what] = self.bar.add_task(what, total=total or None)
        self.bar.update(self.tasks[what], completed=done, total=total or None)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)


# -- folders, status, held -------------------------------------------------------------------

@main.command()
@click.option("--account", "accounts", multiple=True, help="Only this account (repeatable).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def folders(obj: Context, accounts, as_json) -> None:
    """List the import folders found on the server and their statuses."""
    code = EXIT_OK
    out = []
    with obj.engine() as engine:
        selected = engine.select_accounts(accounts)
        statuses = engine.statuses()
        for account in selected:
            try:
                found = engine.import_folders(account)
            except GwsyncError as exc:  # one account's failure: the others are still listed
                click.echo(f"gwsync: {exc.line}", err=True)
                code = max(code, exc.exit_code)  # 3 (a locked credential) decides over 2 and 1
                continue
            for f in found:
                known = f.status in statuses
                if not known:
                    code = max(code, EXIT_FAILED)  # a locked account elsewhere (3) still decides
                out.append({"account": account.name, "folder": f.name, "description": f.parsed.description,
                            "status": f.status, "status_label": statuses.get(f.status),
                            "error": None if known else f"unknown status key [{f.status}]"})
    if as_json:
        emit_json(out)
    else:
        for row in out:
            label = row["status_label"] or f"UNKNOWN status key: add [{row['status']}] to [crm.statuses]"
            click.echo(f"{row['account']}\t{row['folder']}\t[{row['status']}] {label}")
        if not out and code == EXIT_OK:
            click.echo("no import folders found (create one named like 'CRM Erledigt [E]' below the import root)")
    sys.exit(code)


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def status(obj: Context, as_json) -> None:
    """Per account: last sync, its counts, held and failed mail, errors."""
    with obj.engine() as engine:
        out = engine.status()
        workers = engine.workers()
    if as_json:
        emit_json({"accounts": out, "workers": workers})
        return
    if workers is not None:
        alive = ", ".join(f"{w['host']} pid {w['pid']}" for w in workers["processes"])
        click.echo(f"workers: {workers['alive']} alive ({alive})" if alive else "workers: none alive")
    for name, data in out.items():
        lag = f", lag {data['lag']} s" if data["lag"] is not None else ""
        source = " (in the database)" if data["source"] == "database" else ""
        click.echo(f"{name}: held {data['held']}, failed {data['failed']}{lag}{source}")
        for lock in data["locked"]:
            shared = f" (the shared credential {lock['unlock']})" if lock["unlock"] != name else ""
            click.echo(f"  LOCKED {lock['service']}{shared} since {lock['since']}: run `gwsync unlock "
                       f"{lock['unlock']}` after fixing the password")
        for area, info in data["areas"].items():
            state = "ok" if info["ok"] else f"FAILED ({info['error']}); last success {info['last_success'] or 'never'}"
            counts = ", ".join(f"{k} {v}" for k, v in info["counts"].items())
            click.echo(f"  {area}: last sync {info['last_sync']} {state}; {counts}")
        if not data["areas"]:
            click.echo("  never synced")
        for area, plan in (data["schedule"] or {}).items():
            due = f"next {plan['next_due']}" if plan["next_due"] else "not scheduled (account removed)"
            error = f"; last error: {plan['last_error']}" if plan["last_error"] else ""
            click.echo(f"  worker {area}: {due}, backoff {plan['backoff']} s, last run {plan['last_start'] or 'never'}"
                       f" to {plan['last_end'] or '-'}{error}")


@main.command()
@click.option("--account", "accounts", multiple=True, help="Only this account (repeatable).")
@click.pass_obj
def watch(obj: Context, accounts) -> None:
    """Sync every account at its interval and import new mail within seconds (IMAP IDLE),
    until stopped with Ctrl-C or SIGTERM."""
    from .watcher import InstanceLock, Watch

    with obj.engine() as engine:
        selected = engine.select_accounts(accounts)
        with InstanceLock(obj.config.state_database):  # AlreadyRunning: exit 1
            runner = Watch(engine, selected, say=lambda line: click.echo(line, err=line.startswith("gwsync")))
            runner.install_signal_handlers()
            names = ", ".join(a.name for a in selected)
            click.echo(f"gwsync watch: syncing {names}; Ctrl-C or SIGTERM stops", err=True)
            runner.run()
    click.echo("gwsync watch: stopped", err=True)


@main.command()
@click.argument("account")
@click.pass_obj
def unlock(obj: Context, account: str) -> None:
    """Clear a credential lock after fixing the password, so that gwsync logs in again. ACCOUNT
    is an account's name, or a shared credential's ("defaults.imap", "defaults.caldav")."""
    with obj.engine() as engine:
        services = engine.unlock(account)
    shared = [f"defaults.{key}" for key in ("imap", "caldav") if getattr(obj.config.defaults, key) is not None]
    if services:
        click.echo(f"unlocked {account} ({', '.join(services)}); the next run logs in again")
    elif account in shared:
        click.echo(f"{account} has no locked credential")
    elif account not in obj.config.accounts:
        fail(f"no account {account!r} in the config and no lock for it", EXIT_USAGE)
    else:
        click.echo(f"{account} has no locked credential")


def _release_hint(record, max_attempts: int) -> str:
    """What really releases the mail (`gwsync held`, `held --json`'s "released_by")."""
    if record.outcome == QUARANTINED:
        return f"fixing the cause, then `gwsync retry {mail_id(record)}`"
    if record.outcome == FAILED:
        return f"the next sync, which tries again: {record.attempts} of {max_attempts} attempts used"
    if record.outcome == LEFT_OUT:
        return "taking it in with `gwsync review`"
    missing = set(record.missing or ())
    hints = []
    if missing & {"partner", "contact"}:
        hints.append(f"assigning {record.sender or 'the sender'} to a contact (`gwsync assign`)"
                     + (" of a partner" if "partner" in missing else ""))
    if missing & {"subject", "body"}:
        hints.append("filling " + " and ".join(sorted(missing & {"subject", "body"})) + " in `gwsync review`")
    return "; ".join(hints or [f"filling {', '.join(sorted(missing))}"]) + ", then the next sync"


def _item_release_hint(record) -> str:
    """What releases a calendar item kept out of the CRM (README, "Mandatory fields")."""
    if record.outcome == LEFT_OUT:
        return "taking it in with `gwsync review`"
    missing = set(record.missing or ())
    hints = []
    if missing & {"partner", "contact"}:
        hints.append(f"giving an attendee's address ({', '.join(record.addresses)}) to a contact (`gwsync assign`)"
                     if record.addresses else "adding an attendee who is a contact, on the device")
    if missing & {"subject", "body"}:
        hints.append("filling in " + " and ".join(sorted(missing & {"subject", "body"})) + " on the device")
    return "; ".join(hints) + ", then the next sync"


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def held(obj: Context, as_json) -> None:
    """Mail held back in its folder because mandatory fields are missing, failed mail, and
    quarantined mail (`gwsync retry ID` after fixing the cause), each with what releases it;
    mail and calendar items left out in `gwsync review`, and calendar items held for a
    mandatory field."""
    with obj.engine() as engine:
        rows = engine.not_imported()
        items = engine.kept_out()
    max_attempts = obj.config.crm.max_attempts
    data: list[dict[str, Any]] = [
        {"id": mail_id(r), "account": r.account, "area": "mail", "folder": r.folder, "uid": r.uid,
         "outcome": r.outcome, "sender": r.sender, "subject": r.subject, "missing": r.missing, "error": r.error,
         "attempts": r.attempts, "released_by": _release_hint(r, max_attempts)} for r in rows]
    data += [{"id": None, "account": r.account, "area": r.area, "item": r.href, "folder": None, "uid": None,
              "outcome": r.outcome, "sender": None, "subject": r.subject, "missing": r.missing, "error": None,
              "attempts": 0, "released_by": _item_release_hint(r)} for r in items]
    if as_json:
        emit_json(data)
        return
    if not data:
        click.echo("nothing held")
    for d in data:
        if d["area"] != "mail":
            why = (f"missing {', '.join(d['missing'])} " if d["missing"] else "") + f"(released by {d['released_by']})"
            click.echo(f"-\t{d['account']}\t{d['area']}\t{d['item']}\t{d['outcome']}\t-\t{d['subject'] or ''}\t{why}")
            continue
        why = f"missing {', '.join(d['missing'])}" if d["missing"] else d["error"]
        if d["missing"] and {"partner", "contact"} & set(d["missing"]) and d["sender"]:
            why += f" (released by `gwsync assign {d['sender']} --contact ID` or --new-contact NAME)"
        elif not d["missing"]:
            why += f" (released by {d['released_by']})"
        click.echo(f"{d['id'] or '-'}\t{d['account']}\t{d['folder']}\tUID {d['uid']}\t{d['outcome']}\t"
                   f"{d['sender'] or '-'}\t{d['subject'] or ''}\t{why}")


@main.command()
@click.argument("ids", nargs=-1, metavar="[ID]...")
@click.option("--all", "everything", is_flag=True, help="Every failed and quarantined mail.")
@click.pass_obj
def retry(obj: Context, ids, everything) -> None:
    """Release quarantined mail after fixing the cause: its failed attempts are forgotten and
    the next sync tries it again. ID is the first column of `gwsync held` ("id" in --json)."""
    if bool(ids) == everything:
        fail("give the ids of the mails to retry (the first column of `gwsync held`) or --all", EXIT_USAGE)
    with obj.engine() as engine:
        released, unknown = engine.retry(ids, everything)
    for r in released:
        click.echo(f"{mail_id(r)}\t{r.account}\t{r.folder}\tUID {r.uid}\t{r.subject or ''}\t"
                   "the next sync tries it again")
    if everything and not released:
        click.echo("no failed or quarantined mail")
    if unknown:
        fail(f"no failed or quarantined mail with id {', '.join(unknown)} (see `gwsync held`; held mail is "
             "released by what it lacks, not by retry)", EXIT_FAILED)


# -- activities ------------------------------------------------------------------------------

def _print_activities(items: list[dict]) -> None:
    if not items:
        click.echo("no activities")
        return
    if _interactive():
        from rich.console import Console
        from rich.table import Table

        table = Table("id", "kind", "status", "subject", "sender", "contact", "partner", "owner", "docs")
        for a in items:
            sender = (a["sender"] or "") + (" (unassigned)" if a["unassigned"] else "")
            table.add_row(str(a["id"]), a["kind"], a["status"], a["subject"], sender, str(a["contact_id"] or ""),
                          str(a["partner_id"] or ""), a["owner"] or "", str(len(a["documents"])))
        Console().print(table)
    else:
        for a in items:
            flag = "unassigned" if a["unassigned"] else ""
            click.echo(f"{a['id']}\t{a['kind']}\t{a['status']}\t{a['subject']}\t{a['sender'] or ''}\t{flag}")


@main.command()
@click.option("--imported", is_flag=True, help="Only activities imported from mail.")
@click.option("--unassigned", is_flag=True, help="Only imported mail with no contact.")
@click.option("--today", is_flag=True, help="Only what was imported today.")
@click.option("--kind", help="Only this activity kind, e.g. MAILEIN.")
@click.option("--owner", metavar="NAME", help="Only the activities of this employee (an account of the config).")
@click.option("--mine", is_flag=True, help="Only mine: those I own, am delegated or take part in "
              "(owner, delegate or participant).")
@click.option("--account", metavar="NAME", help="Who I am for --mine (default: the only account).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def activities(obj: Context, imported, unassigned, today, kind, owner, mine, account, as_json) -> None:
    """List CRM activities, all of them unless told otherwise (the quick searches: --imported,
    --unassigned, --today; --mine, with them: my imports today, my unassigned mail)."""
    if account is not None and not mine:
        fail("--account goes with --mine (it says who is asking)", EXIT_USAGE)
    with obj.engine() as engine:
        if owner is not None:
            engine.employee(owner, "--owner")
        me = _me(engine, account) if mine else None
        flt = activity_filter(imported=imported, unassigned=unassigned, today=today, kind=kind, owner=owner,
                              involving=me)
        items = [a.to_dict() for a in engine.activities(flt)]
    emit_json(items) if as_json else _print_activities(items)


def _me(engine: Engine, account: str | None) -> str:
    """The employee asking for "mine": the account named, else the only one."""
    if account is not None:
        return engine.employee(account, "--account")
    names = engine.employees()
    if len(names) != 1:
        fail(f"--mine: say which account you are with --account ({', '.join(names) or 'the config has none'})",
             EXIT_USAGE)
    return names[0]


@main.group()
def activity() -> None:
    """One activity: show, add, edit or delete it."""


MEETING = "BESPRECHUNG"  # the kind that has attendees


def _activity_options(func):
    for option in reversed([
        click.option("--kind", help="Activity kind, e.g. TERMIN, BESPRECHUNG, AUFGABE, WIEDERVORLAGE."),
        click.option("--subject"),
        click.option("--start", help="ISO 8601: 2026-12-01, 2026-12-01T10:00, ...T10:00:00+01:00[Europe/Berlin]."),
        click.option("--end", help="ISO 8601, as --start."),
        click.option("--due", help="ISO 8601, as --start (tasks and follow-ups)."),
        click.option("--location"),
        click.option("--status", help="A status key from [crm.statuses]."),
        click.option("--body"),
        click.option("--contact", "contact_id", type=int, help="The contact's id (see `gwsync contact add`)."),
        click.option("--partner", "partner_id", type=int, help="The business partner's id."),
        # the team fields (README, "A team on one CRM"): employees are the accounts of the config
        click.option("--owner", "--account", "owner", metavar="NAME",
                     help="The employee the activity belongs to (always among the participants)."),
        click.option("--with", "participants", multiple=True, metavar="NAME",
                     help="An employee taking part besides the owner (repeatable; on edit the list replaces "
                          "the old one, --with \"\" leaves only the owner)."),
        click.option("--delegate", "delegated_to", metavar="NAME", help="The employee it is delegated to."),
        click.option("--request", metavar="TEXT", help="The main request it belongs to (a free reference)."),
        click.option("--project", metavar="TEXT", help="The main project it belongs to (a free reference)."),
        click.option("--attendee", "attendees", multiple=True, metavar="EMAIL",
                     help=f"A {MEETING}'s attendee (repeat it; edit replaces the list, --attendee '' clears it)."),
        click.option("--json", "as_json", is_flag=True, help="Print the activity as JSON."),
    ]):
        func = option(func)
    return func


def _activity_changes(obj: Context, **values) -> dict:
    from ..calendar.icalmap import normalise_time

    changes = {k: v for k, v in values.items() if v is not None and v != ()}  # (): no --with given
    for name in ("start", "end", "due"):
        if name in changes:
            try:
                changes[name] = normalise_time(changes[name]) if changes[name] else None
            except ValueError as exc:
                fail(f"--{name} {values[name]!r}: {exc} (use ISO 8601, e.g. 2026-12-01T10:00)", EXIT_USAGE)
    if "status" in changes and changes["status"] not in obj.config.crm.statuses:
        known = ", ".join(obj.config.crm.statuses)
        fail(f"--status {changes['status']!r} is not a status key (known: {known})", EXIT_USAGE)
    # Employees are checked by the Engine (an unknown one: exit 2, naming the known ones).
    if "participants" in changes:
        changes["participants"] = [name for name in changes["participants"] if name]
    for name in ("delegated_to", "request", "project"):
        if changes.get(name) == "":
            changes[name] = None
    return changes


def _check_references(engine: Engine, changes: dict) -> None:
    """--contact/--partner must name existing records; a contact brings its partner along."""
    if "contact_id" in changes:
        contact = engine.contact(changes["contact_id"])
        if contact is None:
            fail(f"--contact {changes['contact_id']}: no such contact (see `gwsync contact add`)", EXIT_USAGE)
        if "partner_id" not in changes and contact.partner_id is not None:
            changes["partner_id"] = contact.partner_id
    if "partner_id" in changes and engine.partner(changes["partner_id"]) is None:
        fail(f"--partner {changes['partner_id']}: no such partner (see `gwsync partner add`)", EXIT_USAGE)


def _attendee_emails(given: tuple[str, ...], kind: str | None, what: str) -> list[str] | None:
    """The --attendee addresses (lower case, each once); None when not given, [] for
    `--attendee ''` (no attendees). Only a meeting has attendees."""
    if not given:
        return None
    if kind != MEETING:
        fail(f"--attendee: only a {MEETING} has attendees, {what} is a {kind or 'activity without kind'} "
             f"(add --kind {MEETING})", EXIT_USAGE)
    emails = list(dict.fromkeys(e.strip().lower() for e in given if e.strip()))
    for email in emails:
        if not re.fullmatch(r"[^@\s,]+@[^@\s,]+", email):
            fail(f"--attendee {email!r}: not a mail address (use name@example.com)", EXIT_USAGE)
    return emails


def _attendee_changes(engine, emails: list[str], owner: str | None, changes: dict, activity=None) -> list[str]:
    """The attendees into `changes`, with the contact and partner they resolve to where the
    activity has none and none is given; returns the employees among them (participants)."""
    people = engine.resolve_attendees(emails, owner, activity.attendees if activity is not None else [])
    changes["attendees"] = people.attendees
    has_contact = "contact_id" in changes or (activity is not None and activity.contact_id is not None)
    has_partner = "partner_id" in changes or (activity is not None and activity.partner_id is not None)
    if not has_contact and people.contact_id is not None:
        changes["contact_id"] = people.contact_id
    if not has_partner and people.partner_id is not None and changes.get("contact_id") in (None, people.contact_id):
        changes["partner_id"] = people.partner_id
    return people.employees


def _show_activity(engine, activity_id: int, as_json: bool) -> None:
    item = engine.activity(activity_id)
    emit_json(item.to_dict()) if as_json else click.echo(activity_id)


@activity.command("add")
@_activity_options
@click.pass_obj
def activity_add(obj: Context, as_json, **values) -> None:
    """Add an activity to the embedded CRM; prints its id."""
    import uuid

    from ..crm import ActivityDraft

    if not values.get("kind") or not values.get("subject"):
        fail("activity add needs --kind and --subject", EXIT_USAGE)
    emails = _attendee_emails(values.pop("attendees"), values["kind"], "the activity")
    changes = _activity_changes(obj, **values)
    if "owner" not in changes and len(obj.config.accounts) == 1:
        changes["owner"] = next(iter(obj.config.accounts))
    changes.setdefault("status", obj.config.crm.open_status)
    with obj.engine() as engine:
        _check_references(engine, changes)
        if emails:
            employees = _attendee_changes(engine, emails, changes.get("owner"), changes)
            changes["participants"] = list(dict.fromkeys([*changes.get("participants", []), *employees]))
        activity_id = engine.create_activity(ActivityDraft(key=f"crm:{uuid.uuid4()}", **changes))
        _show_activity(engine, activity_id, as_json)


@activity.command("edit")
@click.argument("activity_id", type=int)
@_activity_options
@click.pass_obj
def activity_edit(obj: Context, activity_id: int, as_json, **values) -> None:
    """Change fields of an activity (only the options given); `--end ""` clears a field, `--with ""`
    the participants besides the owner, `--attendee ''` the attendees. A new owner replaces the
    old one among the participants."""
    given = values.pop("attendees")
    changes = _activity_changes(obj, **values)
    if not changes and not given:
        fail("nothing to change: give at least one option, e.g. --subject", EXIT_USAGE)
    with obj.engine() as engine:
        _check_references(engine, changes)
        employees: list[str] = []
        if given:
            current = engine.activity(activity_id)
            if current is None:
                fail(f"no activity with id {activity_id} (see `gwsync activities`)", EXIT_FAILED)
            emails = _attendee_emails(given, changes.get("kind", current.kind), f"activity {activity_id}")
            assert emails is not None  # given
            employees = _attendee_changes(engine, emails, changes.get("owner", current.owner), changes, current)
            if "participants" in changes:  # --with replaces the list: the attendees join the new one
                changes["participants"] = list(dict.fromkeys([*changes["participants"], *employees]))
                employees = []
        try:
            engine.add_participants(activity_id, employees)
            engine.update_activity(activity_id, changes)
        except LookupError as exc:
            fail(f"{exc} (see `gwsync activities`)", EXIT_FAILED)
        _show_activity(engine, activity_id, as_json)


@activity.command("delete")
@click.argument("activity_id", type=int)
@click.pass_obj
def activity_delete(obj: Context, activity_id: int) -> None:
    """Delete an activity; the next sync deletes its calendar item too."""
    with obj.engine() as engine:
        try:
            engine.delete_activity(activity_id)
        except LookupError as exc:
            fail(f"{exc} (see `gwsync activities`)", EXIT_FAILED)
    click.echo(f"deleted activity {activity_id}")


@main.command()
@click.argument("activity_id", type=int)
@click.option("--as", "as_", type=click.Choice(["event", "task"]), required=True,
              help="Put it on the calendar (event) or the task list (task).")
@click.option("--account", help="The account whose calendar gets it (default: the only one with CalDAV).")
@click.pass_obj
def push(obj: Context, activity_id: int, as_, account) -> None:
    """Put any activity on the calendar or task list, linked to the CRM; synced from then on."""
    area = "events" if as_ == "event" else "tasks"
    with obj.engine() as engine:
        report = engine.push(activity_id, area, account)
    for name, acc in report.accounts.items():
        for line in acc.error_lines():
            click.echo(f"gwsync: {line}", err=True)
        if area in acc.calendars:
            click.echo(f"pushed activity {activity_id} to {name}'s {area}")
    sys.exit(report.exit_code)


@main.command()
@click.argument("activity_id", type=int)
@click.option("--account", help="The account (default: the only one with CalDAV).")
@click.pass_obj
def unpush(obj: Context, activity_id: int, account) -> None:
    """Delete the activity's groupware entry and unlink it; the activity stays in the CRM."""
    with obj.engine() as engine:
        count = engine.unpush(activity_id, account)
    click.echo(f"removed {count} groupware entr{'y' if count == 1 else 'ies'} of activity {activity_id}")


def _attendee_line(engine, person) -> str:
    """One attendee for `activity show`: name and address, then who they are."""
    who = [f"{person.name} <{person.email}>" if person.name else person.email]
    if person.organizer:
        who[0] += " (organizer)"
    if person.employee:
        who.append(f"employee {person.employee}")
    contact = engine.contact(person.contact_id) if person.contact_id is not None else None
    partner = engine.partner(person.partner_id) if person.partner_id is not None else None
    if person.contact_id is not None:
        who.append(f"contact {person.contact_id}" + (f" {contact.name}" if contact else ""))
    if person.partner_id is not None:
        who.append(f"partner {person.partner_id}" + (f" {partner.name}" if partner else ""))
    return ", ".join(who)


@activity.command("show")
@click.argument("activity_id", type=int)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def activity_show(obj: Context, activity_id: int, as_json) -> None:
    """Show one activity with its documents."""
    with obj.engine() as engine:
        item = engine.activity(activity_id)
        attendee_lines = [_attendee_line(engine, a) for a in item.attendees] if item is not None else []
    if item is None:
        fail(f"no activity with id {activity_id} (see `gwsync activities`)", EXIT_FAILED)
    data = item.to_dict()
    if as_json:
        emit_json(data)
        return
    for key in ("id", "kind", "status", "subject", "sender", "unassigned", "contact_id", "partner_id",
                "message_id", "start", "end", "due", "location", "source", "imported_at", "link"):
        if data.get(key) not in (None, ""):
            click.echo(f"{key}: {data[key]}")
    if data["sender"] and data["sender_name"]:
        click.echo(f"from: {data['sender_name']} <{data['sender']}>")
    for key, label in (("recipients_to", "to"), ("recipients_cc", "cc")):
        if data[key]:
            click.echo(f"{label}: {', '.join(data[key])}")
    # the team fields
    if data["owner"]:
        click.echo(f"owner: {data['owner']}")
    if data["participants"]:
        click.echo(f"participants: {', '.join(data['participants'])}")
    for key in ("delegated_to", "request", "project"):
        if data[key] not in (None, ""):
            click.echo(f"{key}: {data[key]}")
    for line in attendee_lines:
        click.echo(f"attendee: {line}")
    for doc in data["documents"]:
        click.echo(f"document: {doc['filename']} ({doc['content_type']}, {doc['size']} bytes, sha256 {doc['sha256']})")
    if data["body"]:
        click.echo("")
        click.echo(data["body"])


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def unknown(obj: Context, as_json) -> None:
    """Senders of unassigned imported mail and of held mail, to assign to contacts."""
    with obj.engine() as engine:
        rows = engine.unknown_senders()
    if as_json:
        emit_json(rows)
        return
    if not rows:
        click.echo("no unknown senders")
    for r in rows:
        partner = f"partner #{r['partner_id']} {r['partner']} (by domain)" if r["partner_id"] else "no partner"
        click.echo(f"{r['email']}\timported {r['imported']}, held {r['held']}\t{partner}")
    if rows:
        click.echo("assign with: gwsync assign EMAIL --contact ID   or   --new-contact NAME [--partner ID]")


@main.command()
@click.argument("email")
@click.option("--contact", "contact_id", type=int, help="An existing contact that gets this address.")
@click.option("--new-contact", help="Create a contact with this name and the address as default.")
@click.option("--partner", "partner_id", type=int, help="The new contact's business partner.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def assign(obj: Context, email, contact_id, new_contact, partner_id, as_json) -> None:
    """Assign a sender address to a contact; earlier activities from it are linked, and held mail
    from it is released at the next sync."""
    if "@" not in email:
        fail(f"{email!r} is not a mail address", EXIT_USAGE)
    if (contact_id is None) == (new_contact is None):
        fail("give exactly one of --contact ID and --new-contact NAME", EXIT_USAGE)
    if partner_id is not None and new_contact is None:
        fail("--partner goes with --new-contact (an existing contact keeps its partner)", EXIT_USAGE)
    with obj.engine() as engine:
        try:
            result = engine.assign(email, contact_id=contact_id, new_contact=new_contact, partner_id=partner_id)
        except LookupError as exc:
            fail(f"{exc} (see `gwsync contact add`, `gwsync partner add`)", EXIT_USAGE)
        except ValueError as exc:
            fail(str(exc), EXIT_USAGE)
    if as_json:
        emit_json(result)
        return
    click.echo(f"{result['email']} -> contact #{result['contact_id']}"
               + (f" (partner #{result['partner_id']})" if result["partner_id"] else "")
               + f"; linked {result['linked_activities']} earlier activit"
               + ("y" if result["linked_activities"] == 1 else "ies")
               + (f"; {result['held_to_release']} held mail(s) import at the next sync"
                  if result["held_to_release"] else ""))


@main.command()
@click.option("--account", help="The account to review (default: the only one).")
@click.pass_obj
def review(obj: Context, account) -> None:
    """Look first, then import: choose areas, leave out mail or items, fill mandatory fields,
    give attachments a category and keyword ([crm] attachment_review = true), see the result."""
    from .reviewer import run_review

    with obj.engine() as engine:
        if account:
            selected = engine.config.account(account)
        else:
            accounts = engine.select_accounts(None)
            if len(accounts) != 1:
                fail("choose the account with --account (" + ", ".join(a.name for a in accounts) + ")", EXIT_USAGE)
            selected = accounts[0]
        code = run_review(engine, selected)
    sys.exit(code)


@main.group()
def rules() -> None:
    """Server-side rules (Sieve) that file mail into import folders."""


def _rule_account(obj: Context, name: str | None):
    if name:
        return obj.config.account(name)
    accounts = [a for a in obj.config.accounts.values() if a.sieve is not None]
    if len(accounts) != 1:
        fail("choose the account with --account", EXIT_USAGE)
    return accounts[0]


@rules.command("add")
@click.option("--account", help="The account (default: the only one).")
@click.option("--from", "sender", required=True, help="ADDRESS or @DOMAIN.")
@click.argument("folder")
@click.pass_obj
def rules_add(obj: Context, account, sender, folder) -> None:
    """File mail from ADDRESS or @DOMAIN into FOLDER (full name, or e.g. "CRM Kunde [O]";
    created when missing)."""
    selected = _rule_account(obj, account)
    with obj.engine() as engine:
        rule = engine.add_rule(selected, sender, folder)
    click.echo(f"rule {rule.id}: mail from {rule.sender} -> {rule.folder}")


@rules.command("list")
@click.option("--account", help="The account (default: the only one).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def rules_list(obj: Context, account, as_json) -> None:
    """The rules gwsync keeps on the server."""
    selected = _rule_account(obj, account)
    with obj.engine() as engine:
        found = engine.rules(selected)
    if as_json:
        emit_json([{"id": r.id, "from": r.sender, "folder": r.folder} for r in found])
        return
    if not found:
        click.echo("no rules")
    for r in found:
        click.echo(f"{r.id}\tfrom {r.sender}\t-> {r.folder}")


@rules.command("remove")
@click.argument("rule_id", type=int)
@click.option("--account", help="The account (default: the only one).")
@click.pass_obj
def rules_remove(obj: Context, rule_id, account) -> None:
    """Remove a rule; with the last one, the user's own script is back as it was."""
    selected = _rule_account(obj, account)
    with obj.engine() as engine:
        rule = engine.remove_rule(selected, rule_id)
    click.echo(f"removed rule {rule.id} (from {rule.sender} -> {rule.folder})")


# -- contacts and partners (embedded CRM) ----------------------------------------------------

@main.group()
def contact() -> None:
    """Contacts of the embedded CRM."""


@contact.command("add")
@click.argument("name")
@click.option("--email", required=True, help="The contact's default mail address.")
@click.option("--partner", "partner_id", type=int, help="The business partner's id.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def contact_add(obj: Context, name, email, partner_id, as_json) -> None:
    """Add a contact; prints its id."""
    if "@" not in email:
        fail(f"--email {email!r} is not a mail address", EXIT_USAGE)
    with obj.engine() as engine:
        try:
            c = engine.add_contact(name, email, partner_id)
        except LookupError as exc:
            fail(f"{exc} (see `gwsync partner add`)", EXIT_USAGE)
    emit_json(c.__dict__) if as_json else click.echo(c.id)


@main.group()
def partner() -> None:
    """Business partners of the embedded CRM."""


@partner.command("add")
@click.argument("name")
@click.option("--email", "emails", multiple=True, help="An address of the partner (repeatable); its domain "
              "assigns mail from unknown people there.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def partner_add(obj: Context, name, emails, as_json) -> None:
    """Add a business partner; prints its id."""
    for e in emails:
        if "@" not in e:
            fail(f"--email {e!r} is not a mail address (use e.g. info@example.com)", EXIT_USAGE)
    with obj.engine() as engine:
        p = engine.add_partner(name, emails)
    emit_json(p.__dict__) if as_json else click.echo(p.id)


# -- accounts kept in the database -----------------------------------------------------------

@main.group()
def accounts() -> None:
    """Accounts kept in the state database (a company's), beside the config file's [accounts.NAME];
    the config's [defaults] give them their servers and credentials."""


class _AccountStore:
    """The state store of the config file's [state] database or [database] url, with its name for
    messages; the accounts commands read the config file alone."""

    def __init__(self, obj: Context):
        from ..engine import store_database
        from ..storage.database import shown
        from ..storage.state import StateStore

        self.config = obj.file_config
        database, password = store_database(self.config, self.config.state_database)
        self.where = f"the database {shown(database)}" if isinstance(database, str) else \
            f"the state database {database}"
        self.store: StateStore = StateStore(database, password)

    def __enter__(self) -> _AccountStore:
        return self

    def __exit__(self, *exc) -> None:
        self.store.close()


def _areas_text(areas) -> str:
    return ",".join(areas)


@accounts.command("add")
@click.argument("name")
@click.option("--username", help="The user's name on the servers (default: NAME).")
@click.option("--email", help="The employee's mail address.")
@click.option("--areas", default="mail", show_default=True, help="What to sync: mail, events, tasks, comma-separated.")
@click.pass_obj
def accounts_add(obj: Context, name, username, email, areas) -> None:
    """Add an account to the database. [defaults.imap] (for mail) and [defaults.caldav] (for
    events and tasks) in the config give its servers and the shared credential."""
    from ..accounts import checked, record

    item = record(name, username, email, areas)
    with _AccountStore(obj) as accts:
        checked(accts.config, [item])
        stored = accts.store.add_account(item)
    described = f"username {item.username}, areas {_areas_text(item.areas)}" + (f", {item.email}" if item.email else "")
    if stored is None:
        click.echo(f"added account {item.name} ({described}) to {accts.where}")
    elif stored.same(item):
        click.echo(f"account {item.name} is in {accts.where} already ({described}); nothing changed")
    else:
        was = f"username {stored.username}, areas {_areas_text(stored.areas)}" + (f", {stored.email}" if stored.email
                                                                                 else "")
        fail(f"account {item.name} is in {accts.where} already, with {was}: remove it first (`gwsync accounts "
             f"remove {item.name}`), or change it with `gwsync accounts import`", EXIT_USAGE)


@accounts.command("remove")
@click.argument("name")
@click.option("--purge", is_flag=True, help="Delete its sync state too (kept by default).")
@click.pass_obj
def accounts_remove(obj: Context, name, purge) -> None:
    """Take an account out of the database. Its sync state (what was imported from which folder,
    calendar links, runs, locks) is kept, so that adding it again goes on where it left off;
    --purge deletes it. Its mail, calendars and CRM records are never touched."""
    from ..accountlock import FileAccountLocks

    with _AccountStore(obj) as accts:
        in_file = name in accts.config.accounts
        if in_file and purge:
            fail(f"account {name!r} is in the config file ([accounts.{name}]) and its sync state is that account's: "
                 "remove it without --purge", EXIT_USAGE)
        gone: dict[str, int] = {}
        kept: dict[str, int] = {}
        if purge:
            # Not while a run of the account is under way: it would write its state back.
            locks = FileAccountLocks(accts.config.state_database, accts.config.state.lock_wait)
            with locks.hold(name, "accounts remove"):
                removed = accts.store.remove_account(name)
                gone = accts.store.purge_account(name)
        else:
            removed = accts.store.remove_account(name)
            kept = accts.store.account_state(name)
    if not removed and in_file:
        fail(f"account {name!r} is in the config file, not in the database: remove its [accounts.{name}] table there",
             EXIT_USAGE)
    if not removed and not (purge and gone):
        fail(f"no account {name!r} in {accts.where}" + ("" if purge else " (see `gwsync accounts list`)"), EXIT_USAGE)
    said = f"removed account {name} from {accts.where}" if removed else f"account {name} is not in {accts.where}"
    if purge:
        rows = ", ".join(f"{table} {count}" for table, count in gone.items())
        click.echo(f"{said}; its sync state is deleted ({rows or 'there was none'})")
    elif kept:
        rows = ", ".join(f"{table} {count}" for table, count in kept.items())
        click.echo(f"{said}; its sync state is kept ({rows}): adding {name} again goes on from it, "
                   f"`gwsync accounts remove {name} --purge` deletes it")
    else:
        click.echo(f"{said}; it had no sync state")


@accounts.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def accounts_list(obj: Context, as_json) -> None:
    """Every account: the config file's and the database's (column source)."""
    with _AccountStore(obj) as accts:
        records = accts.store.accounts()
    rows: list[dict[str, Any]] = [
        {"name": name, "username": account.username or (account.imap.username if account.imap else None),
         "email": account.email, "areas": list(account.areas), "source": "config", "added_at": None}
        for name, account in accts.config.accounts.items()]
    rows += [{"name": r.name, "username": r.username, "email": r.email, "areas": list(r.areas), "source": "database",
              "added_at": r.added_at} for r in records]
    rows.sort(key=lambda row: row["name"])
    if as_json:
        emit_json({"accounts": rows})
        return
    if not rows:
        click.echo("no accounts (add them to the config file, or with `gwsync accounts add` or `import`)")
    for row in rows:
        click.echo(f"{row['name']}\t{row['username'] or '-'}\t{row['email'] or '-'}\t{_areas_text(row['areas'])}\t"
                   f"{row['source']}")


@accounts.command("import")
@click.argument("file", type=click.Path(path_type=Path))
@click.pass_obj
def accounts_import(obj: Context, file: Path) -> None:
    """Add or update the accounts of a CSV file: a header row `name,username,email,areas` (name
    required; areas separated by ";", default mail), one account per row. All or nothing: one bad
    row and nothing of the file is written. An account the file has as stored stays as it is, so
    importing a file again changes nothing; accounts the file lacks are not removed."""
    from ..accounts import check_rows, read_csv

    rows = read_csv(file)
    with _AccountStore(obj) as accts:
        check_rows(file, accts.config, rows)
        added, changed = accts.store.save_accounts([item for _, item in rows])
    unchanged = len(rows) - len(added) - len(changed)
    click.echo(f"{file}: {len(added)} added, {len(changed)} changed, {unchanged} unchanged in {accts.where}")


# -- moving to PostgreSQL --------------------------------------------------------------------

@main.command("migrate-store")
@click.option("--to", "url", metavar="URL", help="The empty PostgreSQL database (default: [database] url).")
@click.option("--dry-run", is_flag=True, help="Count what would be copied; write nothing.")
@click.pass_obj
def migrate_store(obj: Context, url: str | None, dry_run: bool) -> None:
    """Copy the embedded files ([crm] database, [state] database) into an empty PostgreSQL
    database, in one transaction; the files are left as they are. Then set [database] url."""
    from ..migrate import migrate, report_lines

    def started() -> None:  # on a terminal, or with -v: an error stays one line in a log
        if obj.verbosity >= 1 or (obj.verbosity == 0 and sys.stderr.isatty()):
            click.echo("gwsync: copying (one transaction: Ctrl-C leaves the target empty)", err=True)

    outcome = migrate(obj.file_config, url, dry_run, started=started)
    for line in report_lines(obj.file_config, outcome, dry_run):
        click.echo(line)


# -- web view --------------------------------------------------------------------------------

@main.command()
@click.option("--host", help="Address to listen on (default: [serve] host, else 127.0.0.1).")
@click.option("--port", type=click.IntRange(0, 65535), help="Port (default: [serve] port, else 8765; 0: any free).")
@click.pass_obj
def serve(obj: Context, host: str | None, port: int | None) -> None:
    """The web view of the embedded CRM that the links open: activity pages, the quick searches,
    unknown senders (with the assign form) and held mail. Listens on loopback unless told
    otherwise; beyond loopback it needs a password in [serve] or a login per employee ([serve.users.NAME])."""
    from ..web.server import ServeError, make_server, run_server

    config = obj.config
    host = host or config.serve.host
    port = config.serve.port if port is None else port
    with obj.engine():  # a database that cannot be opened is one line now, not a failing page later
        pass
    try:
        server = make_server(config, host, port)
    except ServeError as exc:
        fail(str(exc), EXIT_FAILED)

    def ready(address: str) -> None:
        click.echo(f"gwsync: serving the CRM at {address} (Ctrl-C stops)", err=True)
        if not config.crm.link.startswith(address.rstrip("/") + "/") and config.web_base is not None:
            click.echo(f"gwsync: note: [crm] link points at {config.crm.link}, not at this address", err=True)

    run_server(server, ready)
    click.echo("gwsync: stopped", err=True)


# -- demo ------------------------------------------------------------------------------------

@main.command()
@click.option("--keep", type=click.Path(path_type=Path, file_okay=False),
              help="Keep the demo's config and databases in this directory.")
@click.option("--dovecot", is_flag=True, help="Use Dovecot (if installed) instead of the built-in pymap server.")
def demo(keep: Path | None, dovecot: bool) -> None:
    """Run the main job end to end on a local IMAP server with sample mail."""
    from ..demo import run_demo

    sys.exit(run_demo(keep, use_dovecot=dovecot))


def run() -> None:
    """The console script: Ctrl-C ends with one line and exit code 130, no traceback."""
    try:
        code = main.main(standalone_mode=False)
    except (KeyboardInterrupt, click.exceptions.Abort):
        click.echo("gwsync: interrupted; nothing is lost, run the command again to finish", err=True)
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    sys.exit(code or 0)


"""`gwsync review`: look at what is waiting, leave things out, fill what is missing, import.

Keyboard only, one question at a time, every answer with a default: Enter accepts it. The
questions go through click.prompt, so tests drive the whole review through its input.
What a review leaves out stays out (later syncs and watch leave it alone) until a review takes it
in: mail and calendar items left out before are listed after the new ones, to take in by number.
Looking and asking take no lock (a review left open must not stop `watch` or cron syncs); the
import after the last answer is the engine's sync with the review's Selection, so it holds the
account's lock, retries after a dropped connection and records the run, like `gwsync sync`.
A refused login, here as everywhere, locks the credential (exit 3).
"""

from __future__ import annotations

import click

from ..config import AccountConfig
from ..crm.searches import summary_links
from ..engine import Engine, Selection, SyncReport
from ..mail.importer import PendingMail
from ..storage.records import HELD, LEFT_OUT


def _numbers(text: str, upper: int, lower: int = 1) -> set[int]:
    chosen = set()
    for part in text.replace(",", " ").split():
        if not part.isdigit() or not lower <= int(part) <= upper:
            raise click.BadParameter(f"{part!r} is not a number from {lower} to {upper}")
        chosen.add(int(part))
    return chosen


def _ask_numbers(question: str, upper: int, lower: int = 1) -> set[int]:
    if upper < lower:
        return set()  # nothing to choose from: no question
    while True:
        answer = click.prompt(question, default="", show_default=False)
        try:
            return _numbers(answer, upper, lower)
        except click.BadParameter as exc:
            click.echo(f"  {exc.message}")


def _choose(question: str, choices: dict[int, str]) -> int:
    for key, label in choices.items():
        click.echo(f"    {key}  {label}")
    answer = click.prompt(question, type=click.Choice([str(k) for k in choices]), show_choices=False)
    return int(answer)


def _required_text(question: str) -> str:
    while True:
        value = click.prompt(question, default="", show_default=False).strip()
        if value:
            return value
        click.echo("  this field is required")


def run_review(engine: Engine, account: AccountConfig) -> int:
    config = engine.config
    areas_text = click.prompt("Areas to import (mail, events, tasks)", default=", ".join(account.areas))
    areas = [a.strip() for a in areas_text.replace(",", " ").split() if a.strip()]
    unknown = [a for a in areas if a not in ("mail", "events", "tasks")]
    if unknown:
        raise click.UsageError(f"unknown area {unknown[0]!r} (use mail, events, tasks)")

    selection: set[tuple[str, int]] | None = None
    overrides: dict[tuple[str, int], dict] = {}
    pending: list[PendingMail] = []
    left_out_mail: dict[tuple[str, int], tuple[str | None, str]] = {}
    if "mail" in areas:
        found = engine.pending_mail(account)
        pending = [m for m in found if not m.left_out] + [m for m in found if m.left_out]  # new ones first
        new = sum(1 for m in pending if not m.left_out)
        if not pending:
            click.echo("No mail waiting in the import folders.")
        else:
            for n, mail in enumerate(pending, 1):
                if n == 1 and new:
                    click.echo("Mail waiting in the import folders:")
                if n == new + 1:
                    click.echo("Left out earlier (they stay out until taken in):")
                who = f"contact #{mail.contact_id}" if mail.contact_id else (
                    f"partner #{mail.partner_id}" if mail.partner_id else "unknown sender")
                extra = f", {len(mail.attachments)} attachment(s)" if mail.attachments else ""
                need = f"  NEEDS {', '.join(mail.missing)}" if mail.missing else ""
                click.echo(f"  {n}. [{mail.status}] {mail.sender or '-'}  {mail.subject!r}  ({who}{extra}){need}")
            left_out = _ask_numbers("Leave out (numbers, Enter for none)", new)
            taken = _ask_numbers("Take in (numbers, Enter for none)", len(pending), new + 1)
            chosen = [(n, m) for n, m in enumerate(pending, 1) if (n <= new and n not in left_out) or n in taken]
            selection = {(m.folder, m.uid) for _, m in chosen}
            left_out_mail = {(m.folder, m.uid): (m.sender, m.subject) for n, m in enumerate(pending, 1)
                             if n in left_out}
            for n, mail in chosen:
                given: dict = {}
                for field_name in mail.missing:
                    if field_name == "partner":
                        partners = {p.id: p.name for p in engine.partners()}
                        if not partners:
                            raise click.UsageError("partner is mandatory but the CRM has no partners: "
                                                   "add one with `gwsync partner add`")
                        given["partner_id"] = _choose(f"Partner for mail {n} (required)", partners)
                    elif field_name == "contact":
                        contacts = {c.id: f"{c.name} <{', '.join(c.emails)}>" for c in engine.contacts()}
                        if not contacts:
                            raise click.UsageError("contact is mandatory but the CRM has no contacts: "
                                                   "add one with `gwsync contact add`")
                        given["contact_id"] = _choose(f"Contact for mail {n} (required)", contacts)
                    else:
                        given[field_name] = _required_text(f"{field_name.capitalize()} for mail {n} (required)")
                if config.crm.attachment_review and mail.attachments:
                    documents = []
                    for name in mail.attachments:
                        category = click.prompt(f"Mail {n}, document {name}: category", default="",
                                                show_default=False)
                        keyword = click.prompt(f"Mail {n}, document {name}: keyword", default="",
                                               show_default=False)
                        documents.append((category.strip(), keyword.strip()))
                    given["documents"] = documents
                if given:
                    overrides[(mail.folder, mail.uid)] = given

    skips: dict[str, set[str]] = {}
    take_in: dict[str, set[str]] = {}
    subjects: dict[str, str] = {}
    for area in ("events", "tasks"):
        if area not in areas or account.caldav is None:
            continue
        listed = engine.waiting_items(account, area)
        kept = {r.href: r for r in engine.kept_out(account.name, area)}
        earlier = [(h, d) for h, d in listed if h in kept and kept[h].outcome == LEFT_OUT]
        waiting = [(h, d) for h, d in listed if not (h in kept and kept[h].outcome == LEFT_OUT)] + earlier
        new = len(waiting) - len(earlier)
        for n, (href, data) in enumerate(waiting, 1):
            if n == 1 and new:
                click.echo(f"New {area} on the server:")
            if n == new + 1:
                click.echo(f"Left out earlier, {area} (they stay out until taken in):")
            when = data.fields.get("start") or data.fields.get("due") or ""
            held = kept.get(href)
            need = f"  NEEDS {', '.join(held.missing)}" if held and held.outcome == HELD and held.missing else ""
            click.echo(f"  {n}. {data.fields['subject']!r} {when}{need}")
        left_out = _ask_numbers("Leave out (numbers, Enter for none)", new)
        skips[area] = {waiting[n - 1][0] for n in left_out}
        subjects.update({waiting[n - 1][0]: waiting[n - 1][1].fields["subject"] for n in left_out})
        take_in[area] = {waiting[n - 1][0] for n in _ask_numbers("Take in (numbers, Enter for none)",
                                                                  len(waiting), new + 1)}

    count = len(selection) if selection is not None else 0
    calendars = ", ".join(a for a in areas if a != "mail") or "no calendars"
    if not click.confirm(f"Import {count} mail(s) and sync {calendars}?", default=True):
        click.echo("Nothing imported.")
        return 0
    chosen_areas = [a for a in areas if (selection or left_out_mail if a == "mail" else account.caldav is not None)]
    if not chosen_areas:
        return 0
    report = engine.sync(accounts=[account.name], only=chosen_areas, holder="review",
                         selection=Selection(mail=selection, overrides=overrides, skip=skips,
                                             left_out_mail=left_out_mail, subjects=subjects, take_in=take_in))
    _show(report, account, config.web_base)
    return report.exit_code


def _show(report: SyncReport, account: AccountConfig, web_base: str | None) -> None:
    acc = report.accounts[account.name]
    if acc.mail is not None:
        click.echo(f"Imported {acc.mail.imported} mail(s):")
        for a in acc.mail.activities:
            click.echo(f"  #{a.id} {a.subject!r}  {a.link}")
        for line in summary_links(web_base, acc.mail.activities):
            click.echo(f"  {line}")
    for area, result in acc.calendars.items():
        c = result.counts
        click.echo(f"{area}: {c['created_crm']} new in the CRM, {c['updated_crm']} updated; "
                   f"{c['created_groupware']} new on the server, {c['updated_groupware']} updated"
                   + (f"; {result.held} held for a mandatory field (`gwsync held`)" if result.held else ""))
    for line in acc.error_lines():
        click.echo(f"gwsync: {line}", err=True)

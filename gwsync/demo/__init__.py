"""`gwsync demo`: the main job end to end on a local IMAP server with sample mail.

It starts pymap (a pure-Python IMAP server from PyPI, so nothing but `pip install` is needed) or,
with --dovecot, a throw-away Dovecot; writes a config; fills the CRM with a partner and a contact;
drops the sample mails into CRM folders over IMAP; runs a real sync; prints the activities;
and runs the sync a second time to show that nothing is imported twice.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import threading
import urllib.request
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

import click
from imapclient import IMAPClient

from ..config import load_config
from ..crm import ActivityFilter
from ..engine import Engine
from .localservers import Dovecot, Pymap, Radicale, ServerUnavailable

USER, PASSWORD = "demo", "demopass"
COLLEAGUE = "bob"  # a second employee on the same CRM: calendar only

# sample mail -> the import folder a user (or a server-side rule) would have put it in
PLACEMENT = {
    "01-angebot.eml": "INBOX/CRM Erledigt [E]",
    "02-lieferung.eml": "INBOX/CRM Offen [O]",
    "03-anfrage.eml": "INBOX/Vertrieb/CRM Anfrage [O]",
    "04-rueckruf.eml": "INBOX/CRM Rückruf [R]",
}

CONFIG = """\
[crm]
database = "{dir}/crm.db"

[crm.statuses]
I = "Importiert"
O = "Offen"
E = "Erledigt"
R = "Rückruf"

[state]
database = "{dir}/state.db"

[accounts.demo]
areas = ["mail", "events", "tasks"]
addresses = ["demo@demo.example"]

[accounts.demo.imap]
host = "127.0.0.1"
port = {port}
security = "none"
username = "{user}"
password = "{password}"
import_root = "INBOX"
archive_folder = "INBOX/CRM Archiv"

[accounts.demo.caldav]
url = "{dav_url}"
username = "{user}"
password = "{dav_password}"
events = "calendar"
tasks = "tasks"

[accounts.{colleague}]
areas = ["events"]
addresses = ["{colleague}@demo.example"]

[accounts.{colleague}.caldav]
url = "{colleague_dav_url}"
username = "{colleague}"
password = "{colleague_dav_password}"
events = "calendar"
"""

PHONE_EVENT = """\
BEGIN:VCALENDAR
VERSION:2.0
PRODID:-//A Phone//EN
BEGIN:VEVENT
UID:phone-meeting-1@demo.example
DTSTAMP:{stamp}T080000Z
DTSTART;TZID=Europe/Berlin:{day}T100000
DTEND;TZID=Europe/Berlin:{day}T110000
SUMMARY:Jahresgespräch ACME
LOCATION:Hamburg
ORGANIZER;CN=Erika Mustermann:mailto:erika.mustermann@acme.example
ATTENDEE;CN=Erika Mustermann:mailto:erika.mustermann@acme.example
ATTENDEE;CN=Demo:mailto:demo@demo.example
ATTENDEE;CN=Bob:mailto:bob@demo.example
BEGIN:VALARM
ACTION:DISPLAY
DESCRIPTION:Jahresgespräch
TRIGGER:-PT30M
END:VALARM
END:VEVENT
END:VCALENDAR
"""


def run_demo(keep: Path | None, use_dovecot: bool = False) -> int:
    workdir = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="gwsync-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        server = _start_server(use_dovecot)
    except ServerUnavailable as exc:
        click.echo(f"gwsync demo: cannot start the local IMAP server: {exc}", err=True)
        return 1
    try:
        dav_server = Radicale.start()
    except ServerUnavailable as exc:
        server.stop()
        click.echo(f"gwsync demo: cannot start the local CalDAV server: {exc}", err=True)
        return 1
    try:
        dav_home = dav_server.add_user(USER)
        colleague_home = dav_server.add_user(COLLEAGUE)
        _make_calendars(dav_server, dav_home, colleague_home)
        config_path = workdir / "config.toml"
        config_path.write_text(CONFIG.format(
            dir=workdir, port=server.port, user=USER, password=_password(server), dav_url=dav_home,
            dav_password=dav_server.password_for(USER), colleague=COLLEAGUE, colleague_dav_url=colleague_home,
            colleague_dav_password=dav_server.password_for(COLLEAGUE)))
        config = load_config(config_path)
        click.echo(f"IMAP server: {type(server).__name__} on 127.0.0.1:{server.port}")
        click.echo(f"config:      {config_path}")
        with Engine(config) as engine:
            acme = engine.add_partner("ACME GmbH", ["info@acme.example"])
            erika = engine.add_contact("Erika Mustermann", "erika.mustermann@acme.example", acme.id)
            click.echo(f"CRM:         partner #{acme.id} {acme.name} (acme.example), contact #{erika.id} {erika.name}")
            _drop_sample_mail(server.port, _password(server))
            click.echo("")
            click.echo("import folders on the server:")
            for folder in engine.import_folders(config.account("demo")):
                click.echo(f"  {folder.name}  -> status {folder.status} ({config.crm.statuses[folder.status]})")

            erika_call = _add_follow_up(engine)
            report = engine.sync()
            mail = report.accounts["demo"].mail
            click.echo("")
            click.echo(f"first sync:  imported {mail.imported if mail else 0}, held {mail.held if mail else 0}, "
                       f"failed {mail.failed if mail else 0}")
            if report.accounts["demo"].error:
                click.echo(f"error: {report.accounts['demo'].error}", err=True)
            click.echo("")
            for a in engine.activities(ActivityFilter(imported=True)):
                who = f"contact #{a.contact_id}" if a.contact_id else (
                    f"partner #{a.partner_id} by domain" if a.partner_id else "UNASSIGNED")
                click.echo(f"  #{a.id} {a.kind} [{a.status}] {a.subject!r} from {a.sender} ({who})")
                for d in a.documents:
                    click.echo(f"      document {d.filename} {d.size} bytes sha256 {d.sha256[:12]}...")
                click.echo(f"      {a.link}")
            calendars = report.accounts["demo"].calendars
            click.echo("")
            click.echo("calendar and tasks (CalDAV, both ways):")
            for area in ("events", "tasks"):
                if area in calendars:
                    c = calendars[area].counts
                    click.echo(f"  {area}: {c['created_crm']} new in the CRM, "
                               f"{c['created_groupware']} new on the server")
            for a in engine.activities(ActivityFilter(kinds=("TERMIN", "BESPRECHUNG", "AUFGABE",
                                                                      "WIEDERVORLAGE"))):
                when = a.start or a.due or ""
                click.echo(f"  #{a.id} {a.kind} {a.subject!r} {when}")
            (_etag, text), = _items(dav_server, dav_home, "calendar").values()
            link_line = next(l for l in text.replace("\n ", "").splitlines() if l.startswith("DESCRIPTION"))
            click.echo(f"  the phone's event now carries the CRM link: {link_line}")
            click.echo(f"  the follow-up #{erika_call} is on the phone's task list: "
                       f"{len(_items(dav_server, dav_home, 'tasks'))} task(s)")
            _show_shared_meeting(engine, report, dav_server, colleague_home, link_line)
            second = engine.sync().accounts["demo"]
            again = second.mail
            click.echo("")
            click.echo(f"second sync: imported {again.imported if again else 0} (nothing is imported twice); "
                       f"calendar requests: {sum(r.requests for r in second.calendars.values())} "
                       "(one per collection when nothing changed)")
            demo_imap = config.account("demo").imap
            assert demo_imap is not None  # the demo's account has mail
            archived = _count(server.port, _password(server), demo_imap.archive_in("INBOX", "/"))
            click.echo(f"archive folder holds {archived} mail(s); the CRM folders are empty again")
            code = report.exit_code
        _open_link(config, _first(r"CRM: (\S+)", text.replace("\n ", "")))
        if keep:
            click.echo("")
            click.echo(f"kept in {workdir}; try: gwsync --config {config_path} activities")
            click.echo(f"  or open the links: gwsync --config {config_path} serve")
            click.echo("(the demo IMAP server is gone, so `sync` with that config will not connect)")
        return code
    finally:
        server.stop()
        dav_server.stop()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def _show_shared_meeting(engine, report, dav_server: Radicale, colleague_home: str, link_line: str) -> None:
    """The same meeting (one UID) is in both employees' calendars: it is one activity."""
    meetings = [a for a in engine.activities(ActivityFilter(kinds=("TERMIN", "BESPRECHUNG")))
                if a.subject == "Jahresgespräch ACME"]
    joined = report.accounts[COLLEAGUE].calendars["events"].counts["created_crm"]
    (_etag, text), = _items(dav_server, colleague_home, "calendar", COLLEAGUE).values()
    same_link = link_line in text.replace("\n ", "").splitlines()
    count = f"{len(meetings)} activity" if len(meetings) == 1 else f"{len(meetings)} activities"
    click.echo(f"  the same meeting is in {COLLEAGUE}'s calendar too: {count} "
               f"(#{', #'.join(str(a.id) for a in meetings)}), participants "
               f"{', '.join(p for m in meetings for p in m.participants)}; {joined} new from {COLLEAGUE}'s copy; "
               f"its CRM link is {'the same' if same_link else 'another one'}")


def _first(pattern: str, text: str) -> str:
    """The first group of the pattern's first match; the demo wrote the text, so it is there."""
    found = re.search(pattern, text)
    if found is None:
        raise RuntimeError(f"the demo expected {pattern!r} in {text[:200]!r}")
    return found.group(1)


def _open_link(config, link: str) -> None:
    """Open the event's CRM link on the web view (`gwsync serve`), as a phone would."""
    from ..web.server import make_server

    web = make_server(config, "127.0.0.1", 0)  # any free port: 8765 may be taken
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    try:
        local = f"http://127.0.0.1:{web.effective_port}{urlsplit(link).path}"
        with urllib.request.urlopen(local, timeout=10) as response:
            page = response.read().decode()
        title = _first(r"<h1>(.*?)</h1>", page)
        partner = re.search(r'class="partner">(.*?)</a>', page)
        click.echo("")
        click.echo(f"web view (gwsync serve): the event's link opens the activity page {title!r}"
                   + (f" of {partner.group(1)}" if partner else ""))
    finally:
        web.close()


def _start_server(use_dovecot: bool):
    if use_dovecot:
        return Dovecot.start()
    return Pymap.start(USER, PASSWORD)


def _password(server) -> str:
    return server.password_for(USER) if isinstance(server, Dovecot) else PASSWORD


def _drop_sample_mail(port: int, password: str) -> None:
    client = IMAPClient("127.0.0.1", port=port, ssl=False)
    client.login(USER, password)
    try:
        samples = resources.files("gwsync.demo") / "sample_mail"
        for name, folder in PLACEMENT.items():
            if not client.folder_exists(folder):
                _create_with_parents(client, folder)
            raw = (samples / name).read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            client.append(folder, raw)
    finally:
        client.logout()


def _create_with_parents(client: IMAPClient, folder: str) -> None:
    parts = folder.split("/")
    for depth in range(2, len(parts) + 1):
        name = "/".join(parts[:depth])
        if not client.folder_exists(name):
            client.create_folder(name)


def _count(port: int, password: str, folder: str) -> int:
    client = IMAPClient("127.0.0.1", port=port, ssl=False)
    client.login(USER, password)
    try:
        return len(client.select_folder(folder, readonly=True) and client.search(["ALL"]))
    finally:
        client.logout()


def _make_calendars(dav_server: Radicale, home: str, colleague_home: str) -> None:
    """Both employees were invited to the same meeting: the same event (one UID) in each calendar."""
    from caldav.davclient import DAVClient

    dav_server.make_calendar(USER, "calendar", "VEVENT")
    dav_server.make_calendar(USER, "tasks", "VTODO")
    dav_server.make_calendar(COLLEAGUE, "calendar", "VEVENT")
    event = _phone_event().replace("\n", "\r\n")
    for user, user_home in ((USER, home), (COLLEAGUE, colleague_home)):
        client = DAVClient(user_home, username=user, password=dav_server.password_for(user))
        client.request(user_home + "calendar/phone-meeting-1.ics", "PUT", event,
                       {"Content-Type": "text/calendar; charset=utf-8"})


def _in_days(days: int):
    """A day near today, so the demo's items always fall inside the sync's date window."""
    import datetime

    return datetime.date.today() + datetime.timedelta(days=days)


def _phone_event() -> str:
    return PHONE_EVENT.format(stamp=_in_days(0).strftime("%Y%m%d"), day=_in_days(6).strftime("%Y%m%d"))


def _add_follow_up(engine) -> int:
    import uuid

    from ..crm import ActivityDraft

    return engine.create_activity(ActivityDraft(
        key=f"crm:{uuid.uuid4()}", kind="WIEDERVORLAGE", status="O", subject="Erika zurückrufen (Wartungsvertrag)",
        due=f"{_in_days(4).isoformat()}T09:00:00+01:00[Europe/Berlin]", owner=USER))


def _items(dav_server: Radicale, home: str, name: str, user: str = USER) -> dict:
    from caldav.davclient import DAVClient

    from ..calendar.dav import Collection

    collection = Collection(DAVClient(home, username=user, password=dav_server.password_for(user)), home + name + "/")
    return {h: (i.etag, i.data) for h, i in collection.multiget(sorted(collection.list_etags())).items()}


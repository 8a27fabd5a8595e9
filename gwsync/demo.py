"""`gwsync demo`: the main job end to end on a local IMAP server with sample mail.

It starts pymap (a pure-Python IMAP server from PyPI, so nothing but `pip install` is needed) or,
with --dovecot, a throw-away Dovecot; writes a config; fills the CRM with a partner and a contact;
drops the sample mails into CRM folders over IMAP; runs a real sync; prints the activities;
and runs the sync a second time to show that nothing is imported twice.
"""

from __future__ import annotations

import shutil
import tempfile
from importlib import resources
from pathlib import Path

import click
from imapclient import IMAPClient

from .config import load_config
from .crm import ActivityFilter
from .engine import Engine
from .localservers import Dovecot, Pymap, ServerUnavailable

USER, PASSWORD = "demo", "demopass"

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
link = "http://127.0.0.1:8765/activities/{{id}}"

[crm.statuses]
I = "Importiert"
O = "Offen"
E = "Erledigt"
R = "Rückruf"

[state]
database = "{dir}/state.db"

[accounts.demo]
areas = ["mail"]

[accounts.demo.imap]
host = "127.0.0.1"
port = {port}
security = "none"
username = "{user}"
password = "{password}"
import_root = "INBOX"
archive_folder = "INBOX/CRM Archiv"
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
        config_path = workdir / "config.toml"
        config_path.write_text(CONFIG.format(dir=workdir, port=server.port, user=USER, password=_password(server)))
        config = load_config(config_path)
        click.echo(f"IMAP server: {type(server).__name__} on 127.0.0.1:{server.port}")
        click.echo(f"config:      {config_path}")
        with Engine(config) as engine:
            acme = engine.crm.add_partner("ACME GmbH", ["info@acme.example"])
            erika = engine.crm.add_contact("Erika Mustermann", "erika.mustermann@acme.example", acme.id)
            click.echo(f"CRM:         partner #{acme.id} {acme.name} (acme.example), contact #{erika.id} {erika.name}")
            _drop_sample_mail(server.port, _password(server))
            click.echo("")
            click.echo("import folders on the server:")
            for folder in engine.import_folders(config.account("demo")):
                click.echo(f"  {folder.name}  -> status {folder.status} ({config.crm.statuses[folder.status]})")

            report = engine.sync()
            mail = report.accounts["demo"].mail
            click.echo("")
            click.echo(f"first sync:  imported {mail.imported if mail else 0}, held {mail.held if mail else 0}, "
                       f"failed {mail.failed if mail else 0}")
            if report.accounts["demo"].error:
                click.echo(f"error: {report.accounts['demo'].error}", err=True)
            click.echo("")
            for a in engine.crm.list_activities(ActivityFilter(imported=True)):
                who = f"contact #{a.contact_id}" if a.contact_id else (
                    f"partner #{a.partner_id} by domain" if a.partner_id else "UNASSIGNED")
                click.echo(f"  #{a.id} {a.kind} [{a.status}] {a.subject!r} from {a.sender} ({who})")
                for d in a.documents:
                    click.echo(f"      document {d.filename} {d.size} bytes sha256 {d.sha256[:12]}...")
                click.echo(f"      {a.link}")
            again = engine.sync().accounts["demo"].mail
            click.echo("")
            click.echo(f"second sync: imported {again.imported if again else 0} (nothing is imported twice)")
            archived = _count(server.port, _password(server), config.account("demo").imap.archive_folder)
            click.echo(f"archive folder holds {archived} mail(s); the CRM folders are empty again")
            code = report.exit_code
        if keep:
            click.echo("")
            click.echo(f"kept in {workdir}; try: gwsync --config {config_path} activities")
            click.echo("(the demo IMAP server is gone, so `sync` with that config will not connect)")
        return code
    finally:
        server.stop()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


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
        samples = resources.files("gwsync") / "sample_mail"
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

"""Shared fixtures: one real Dovecot per test session, a fresh mail user and gwsync setup per test."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from imapclient import IMAPClient

from gwsync.cli import main
from gwsync.config import load_config
from gwsync.engine import Engine
from gwsync.demo.localservers import Dovecot, Radicale

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
_user_counter = itertools.count(1)


@pytest.fixture(scope="session")
def radicale():
    server = Radicale.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def dovecot():
    # No skip when Dovecot is missing: .ci/run installs it, and a silent skip would hide that.
    server = Dovecot.start()
    yield server
    # The server's own log helps when a test saw a dropped connection; keep its errors visible.
    log = server.directory / "dovecot.log"
    problems = [line for line in log.read_text(errors="replace").splitlines()
                if any(word in line for word in ("Error", "Fatal", "Panic"))] if log.exists() else []
    if problems:
        print("\nDovecot reported:\n" + "\n".join(problems[-30:]))
    server.stop()


@pytest.fixture(scope="session")
def cyrus():
    """Cyrus IMAP with Debian's default hierarchy separator "." (started in well under a second)."""
    from cyrus_server import Cyrus

    with Cyrus.start(separator=".") as server:
        yield server


@pytest.fixture(scope="session")
def cyrus_slash():
    """Cyrus IMAP with `unixhierarchysep: yes`: "/" separates folder levels."""
    from cyrus_server import Cyrus

    with Cyrus.start(separator="/") as server:
        yield server


def crlf(raw: bytes) -> bytes:
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def make_mail(n: int, sender: str = "someone@example.org", subject: str | None = None, body: str | None = None,
              extra_headers: str = "") -> bytes:
    subject = subject if subject is not None else f"Test mail {n}"
    body = body if body is not None else f"Body of mail {n}."
    return crlf((f"From: {sender}\nTo: alice@example.com\nSubject: {subject}\nX-Seq: {n}\n"
                 f"Message-ID: <m{n}@example.org>\n{extra_headers}\n{body}\n").encode())


@dataclass
class GwEnv:
    """One test's gwsync world: a mail user on the shared Dovecot, a config, and helpers."""

    dovecot: Dovecot
    user: str
    password: str
    dir: Path
    config_path: Path
    radicale: Radicale | None = None

    # -- CalDAV, as another client would use it ----------------------------------------------

    def dav(self):
        from caldav.davclient import DAVClient

        return DAVClient(self.radicale.url, username=self.user, password=self.radicale.password_for(self.user))

    def collection_url(self, area: str) -> str:
        return f"{self.radicale.url}{self.user}/{'calendar' if area == 'events' else 'tasks'}/"

    def dav_put(self, area: str, name: str, text: str, etag: str | None = None) -> str:
        headers = {"Content-Type": "text/calendar; charset=utf-8"}
        if etag:
            headers["If-Match"] = etag
        response = self.dav().request(self.collection_url(area) + name, "PUT", crlf(text.encode()).decode(), headers)
        assert response.status in (200, 201, 204), response.status
        return response.headers["ETag"]

    def dav_items(self, area: str) -> dict[str, tuple[str, str]]:
        """name -> (ETag, text) of every item in the collection."""
        from gwsync.calendar.dav import Collection

        coll = Collection(self.dav(), self.collection_url(area))
        items = coll.multiget(sorted(coll.list_etags()))
        return {href.rsplit("/", 1)[-1]: (item.etag, item.data) for href, item in items.items()}

    def dav_delete(self, area: str, name: str) -> None:
        assert self.dav().request(self.collection_url(area) + name, "DELETE").status in (200, 204)

    def imap(self) -> IMAPClient:
        client = IMAPClient("127.0.0.1", port=self.dovecot.port, ssl=False)
        client.login(self.user, self.password)
        return client

    def create(self, *folders: str) -> None:
        with self.imap() as client:
            for folder in folders:
                if not client.folder_exists(folder):
                    client.create_folder(folder)

    def append(self, folder: str, *messages: bytes) -> None:
        with self.imap() as client:
            if not client.folder_exists(folder):
                client.create_folder(folder)
            if len(messages) > 1 and b"MULTIAPPEND" in client.capabilities():
                client.multiappend(folder, list(messages))
            else:
                for raw in messages:
                    client.append(folder, raw)

    def messages(self, folder: str) -> dict[int, dict]:
        """UID -> {flags, raw} of a folder, read without touching \\Seen."""
        with self.imap() as client:
            if not client.folder_exists(folder):
                return {}
            client.select_folder(folder, readonly=True)
            uids = client.search(["ALL"])
            if not uids:
                return {}
            data = client.fetch(uids, ["FLAGS", "BODY.PEEK[]"])
            return {uid: {"flags": d[b"FLAGS"], "raw": d[b"BODY[]"]} for uid, d in data.items()}

    def config(self):
        return load_config(self.config_path)

    def engine(self) -> Engine:
        return Engine(self.config())

    def cli(self, *args: str, input: str | None = None):
        runner = CliRunner()
        return runner.invoke(main, ["--config", str(self.config_path), *args], input=input,
                             catch_exceptions=False)

    def cli_json(self, *args: str):
        result = self.cli(*args, "--json")
        return result.exit_code, json.loads(result.stdout)

    def subprocess(self, *args: str, **kw) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "gwsync.cli", "--config", str(self.config_path), *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


CONFIG_TEMPLATE = """\
[crm]
database = "{dir}/crm.db"
{link}mandatory = {mandatory}
{crm_extra}
[crm.statuses]
I = "Importiert"
O = "Offen"
E = "Erledigt"
R = "Rückruf"

[state]
database = "{dir}/state.db"

[accounts.alice]
areas = {areas}

[accounts.alice.imap]
host = "127.0.0.1"
port = {port}
security = "none"
username = "{user}"
password_env = "{env}"
import_root = "INBOX"
archive_folder = "INBOX/CRM Archiv"
{caldav}"""

CALDAV_TEMPLATE = """
[accounts.alice.caldav]
url = "{url}"
username = "{user}"
password = "{password}"
events = "calendar"
tasks = "tasks"
"""


def build_env(dovecot, root: Path, request, mandatory: tuple[str, ...] = (), crm_extra: str = "",
              areas=("mail",), extra: str = "", link: str | None = "https://crm.example.com/activities/{id}") -> GwEnv:
    """A fresh mail user (and CalDAV user, for the calendar areas) with a config below `root`.
    `link=None` leaves [crm] link at its default, the web view's activity page."""
    user = f"user{os.getpid()}x{next(_user_counter)}"
    password = dovecot.password_for(user)
    env_name = f"GWSYNC_TEST_PW_{user.upper()}"
    os.environ[env_name] = password
    workdir = root / user
    workdir.mkdir()
    config_path = workdir / "config.toml"
    radicale = None
    caldav = ""
    if "events" in areas or "tasks" in areas:
        radicale = request.getfixturevalue("radicale")
        home = radicale.add_user(user)
        caldav = CALDAV_TEMPLATE.format(url=home, user=user, password=radicale.password_for(user))
    config_path.write_text(CONFIG_TEMPLATE.format(
        dir=workdir, port=dovecot.port, user=user, env=env_name, link=f'link = "{link}"\n' if link else "",
        mandatory=json.dumps(list(mandatory)), crm_extra=crm_extra, areas=json.dumps(list(areas)),
        caldav=caldav) + extra)
    env = GwEnv(dovecot=dovecot, user=user, password=password, dir=workdir, config_path=config_path,
                radicale=radicale)
    if radicale is not None:
        radicale.make_calendar(user, "calendar", "VEVENT")
        radicale.make_calendar(user, "tasks", "VTODO")
    return env


@pytest.fixture
def make_env(dovecot, tmp_path, request):
    def factory(**kw) -> GwEnv:
        return build_env(dovecot, tmp_path, request, **kw)

    return factory


@pytest.fixture
def env(make_env) -> GwEnv:
    return make_env()

"""Shared fixtures: one real Dovecot per test session, a fresh mail user and gwsync setup per test.

GWSYNC_TEST_DATABASE=postgresql puts every test setup's stores into a fresh database of the
session's PostgreSQL ([database] url) instead of SQLite files. build_env is the only thing the
switch changes, so that pass runs only the tests whose setup reaches build_env (the `env` and
`make_env` fixtures, or build_env itself); the others would run exactly as in the SQLite pass.
It also leaves out the tests marked `sqlite_files` (they break an SQLite file on purpose). Both
show as "deselected", never as skipped; in the SQLite pass build_env fails a test that calls it
without having been seen to, so the PostgreSQL pass cannot silently leave a store test out."""

from __future__ import annotations

import inspect
import itertools
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from imapclient import IMAPClient

from gwsync.cli import main
from gwsync.config import load_config
from gwsync.demo.localservers import Dovecot
from gwsync.engine import Engine
from servers.dav import CyrusDav, RadicaleServer, SabreDAV, Xandikos

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
_user_counter = itertools.count(1)
ON_POSTGRESQL = os.environ.get("GWSYNC_TEST_DATABASE") == "postgresql"
USES_STORE = pytest.StashKey[bool]()
_current_item: pytest.Item | None = None


def _names(code) -> set[str]:
    """The global and attribute names a function's code refers to, its nested functions' too."""
    names = set(code.co_names)
    for const in code.co_consts:
        if inspect.iscode(const):
            names |= _names(const)
    return names


def _reaches_build_env(item: pytest.Item) -> bool:
    """The test function or one of the fixtures it uses (directly or not) calls build_env."""
    functions = [getattr(item, "function", None)]
    info = getattr(item, "_fixtureinfo", None)  # pytest's: the fixtures of the closure, by name
    for defs in (info.name2fixturedefs.values() if info is not None else ()):
        functions += [d.func for d in defs]
    return any("build_env" in _names(inspect.unwrap(f).__code__) for f in functions if f is not None)


def pytest_collection_modifyitems(config, items):
    for item in items:
        item.stash[USES_STORE] = _reaches_build_env(item)
    if not ON_POSTGRESQL:
        return
    kept, left_out = [], []
    for item in items:
        runs = item.stash[USES_STORE] and item.get_closest_marker("sqlite_files") is None
        (kept if runs else left_out).append(item)
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = kept


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    global _current_item
    _current_item = item


@pytest.fixture(scope="session")
def radicale():
    server = RadicaleServer.start()
    yield server
    server.stop()


# The CalDAV servers the calendar flows and the collection contract run on. No skip when one is
# missing: scripts/test installs them, and a silent skip would hide that.
CALDAV_SERVERS = ("radicale", "xandikos", "xandikos-auth", "sabredav-basic", "sabredav-digest", "cyrus")
WITH_WEBDAV_SYNC = ("radicale", "xandikos", "xandikos-auth", "cyrus")  # SabreDAV 1.8 has no sync-collection
DAV_FIXTURES = {"cyrus": "cyrus_dav"}  # the fixture `cyrus` is the Cyrus server itself


def dav_fixture(request):
    return request.getfixturevalue(DAV_FIXTURES.get(request.param, request.param.replace("-", "_")))


@pytest.fixture(scope="session")
def xandikos():
    with Xandikos.start() as server:
        yield server


@pytest.fixture(scope="session")
def xandikos_auth():
    with Xandikos.start(auth=True) as server:
        yield server


@pytest.fixture(scope="session")
def sabredav_basic():
    with SabreDAV.start("basic") as server:
        yield server


@pytest.fixture(scope="session")
def sabredav_digest():
    with SabreDAV.start("digest") as server:
        yield server


@pytest.fixture(params=CALDAV_SERVERS)
def calserver(request):
    """Each CalDAV server in turn (started once per session, on first use)."""
    return dav_fixture(request)


@pytest.fixture(params=WITH_WEBDAV_SYNC)
def sync_calserver(request):
    """Each CalDAV server with WebDAV sync, for what only sync tokens show."""
    return dav_fixture(request)


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL for the session (tests/pg_server.py): `.url(DB)` gives
    postgresql://gwsync@127.0.0.1:PORT/DB, `.url(DB, socket=True)` adds ?host=SOCKETDIR.
    No skip when PostgreSQL is missing: scripts/test installs it."""
    from pg_server import PostgresServer

    with PostgresServer.start() as server:
        yield server


@pytest.fixture
def pg_url(postgres):
    """The URL of a fresh, empty database of its own for this test (dropped after it)."""
    name = postgres.new_database()
    yield postgres.url(name)
    postgres.drop_database(name)


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
def sieve_dovecot():
    """A Dovecot with Pigeonhole's ManageSieve and LDA, for the rules tests of every file."""
    with Dovecot.start(sieve=True) as server:
        yield server


def use_sieve_dovecot(env, server: Dovecot):
    """Point `env`'s account at `server` for IMAP and ManageSieve (Sieve borrows IMAP's credential)."""
    env.dovecot = server
    text = re.sub(r"port = \d+", f"port = {server.port}", env.config_path.read_text(), count=1)
    env.config_path.write_text(text + f"\n[accounts.alice.sieve]\nport = {server.sieve_port}\n")
    return env


@pytest.fixture(scope="session")
def cyrus():
    """Cyrus IMAP with Debian's default hierarchy separator "." (started in well under a second)."""
    from cyrus_server import Cyrus

    with Cyrus.start(separator=".") as server:
        yield server


@pytest.fixture(scope="session")
def cyrus_dav(cyrus):
    """The CalDAV of the Cyrus server (its httpd, with the Cyrus users and passwords)."""
    return CyrusDav(cyrus=cyrus)


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
    radicale: RadicaleServer | None = None  # the CalDAV server, when it is the suite's Radicale
    calserver: object = None  # the CalDAV server (any of servers.dav's)
    collections: tuple[str, str] = ("calendar", "tasks")  # the events and tasks collections' names
    database_url: str | None = None  # [database] url under GWSYNC_TEST_DATABASE=postgresql; None: SQLite files

    def crm_exists(self) -> bool:
        """The CRM store has been made (its SQLite file; a PostgreSQL database always exists)."""
        return self.database_url is not None or (self.dir / "crm.db").exists()

    # -- the state store, as another program would touch it --------------------------------------

    def _state_engine(self):
        import sqlalchemy as sa

        if self.database_url is None:
            return sa.create_engine(f"sqlite:///{self.dir / 'state.db'}")
        return sa.create_engine(self.database_url.replace("postgresql://", "postgresql+psycopg://", 1))

    def state_sql(self, statement: str, **params) -> list[tuple]:
        """Run one SQL statement (`:name` parameters) on the state store: its file, or the test's
        PostgreSQL database (which holds the CRM's tables too); the rows it returns."""
        import sqlalchemy as sa

        engine = self._state_engine()
        try:
            with engine.begin() as conn:
                result = conn.execute(sa.text(statement), params)
                return [tuple(row) for row in result] if result.returns_rows else []
        finally:
            engine.dispose()

    def lose_state(self) -> None:
        """The sync state is lost: its file deleted, or on PostgreSQL its tables dropped (the CRM's stay)."""
        if self.database_url is None:
            (self.dir / "state.db").unlink()
            return
        import sqlalchemy as sa

        from gwsync.storage.database import SCHEMA_TABLE
        from gwsync.storage.state import metadata

        engine = self._state_engine()
        try:
            with engine.begin() as conn:
                metadata.drop_all(conn)
                conn.execute(sa.text(f"DELETE FROM {SCHEMA_TABLE} WHERE store = 'state'"))
        finally:
            engine.dispose()

    # -- CalDAV, as another client would use it ----------------------------------------------

    def dav(self):
        return self.calserver.client(self.user)

    def collection_url(self, area: str) -> str:
        return self.calserver.calendar_url(self.user, self.collections[0 if area == "events" else 1])

    def dav_put(self, area: str, name: str, text: str, etag: str | None = None) -> str:
        headers = {"Content-Type": "text/calendar; charset=utf-8"}
        if etag:
            headers["If-Match"] = etag
        response = self.dav().request(self.collection_url(area) + name, "PUT", crlf(text.encode()).decode(), headers)
        assert response.status in (200, 201, 204), response.status
        if response.headers.get("ETag"):
            return response.headers["ETag"]
        return self.dav().request(self.collection_url(area) + name, "GET").headers["ETag"]  # no ETag on PUT

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
{password}events = "{events}"
tasks = "{tasks}"
"""


def caldav_table(server, user: str, names: tuple[str, str]) -> str:
    """The [accounts.alice.caldav] table for a user of a CalDAV server: no password where the
    server has no auth, the server's CA where it has TLS."""
    password = f'password = "{server.password_for(user)}"\n' if server.auth != "none" else ""
    if server.ca_file:
        password += f'ca_file = "{server.ca_file}"\n'
    return CALDAV_TEMPLATE.format(url=server.home(user), user=user, password=password, events=names[0],
                                  tasks=names[1])


def _wide_window(config: str, extra: str) -> str:
    """Test items carry fixed dates; a window of a century keeps them in it whatever today is,
    unless the test sets its own (`[sync] past_days` in `extra`). The table goes before the
    accounts, so tests that copy an account's tables from one config to another copy no [sync]."""
    if "past_days" in extra:
        return config + extra
    if "[sync]" in extra:
        return config + extra.replace("[sync]\n", "[sync]\npast_days = 36500\n", 1)
    return config.replace("[accounts.alice]\n", "[sync]\npast_days = 36500\n\n[accounts.alice]\n", 1) + extra


def build_env(dovecot, root: Path, request, mandatory: tuple[str, ...] = (), crm_extra: str = "",
              areas=("mail",), extra: str = "", link: str | None = "https://crm.example.com/activities/{id}",
              calserver=None) -> GwEnv:
    """A fresh mail user (and CalDAV user, for the calendar areas, on `calserver` or else the
    suite's Radicale) with a config below `root`. `link=None` leaves [crm] link at its default,
    the web view's activity page."""
    if _current_item is not None and not _current_item.stash.get(USES_STORE, True):
        pytest.fail(f"{_current_item.nodeid} calls build_env in a way the collection did not see "
                    "(tests/conftest.py, _reaches_build_env): the PostgreSQL pass would leave it out")
    user = f"user{os.getpid()}x{next(_user_counter)}"
    password = dovecot.password_for(user)
    env_name = f"GWSYNC_TEST_PW_{user.upper()}"
    os.environ[env_name] = password
    workdir = root / user
    workdir.mkdir()
    config_path = workdir / "config.toml"
    caldav = ""
    names = ("calendar", "tasks")
    if "events" in areas or "tasks" in areas:
        calserver = calserver or request.getfixturevalue("radicale")
        calserver.add_user(user)
        names = calserver.collection_names(user)
        caldav = caldav_table(calserver, user, names)
    config_path.write_text(_wide_window(CONFIG_TEMPLATE.format(
        dir=workdir, port=dovecot.port, user=user, env=env_name, link=f'link = "{link}"\n' if link else "",
        mandatory=json.dumps(list(mandatory)), crm_extra=crm_extra, areas=json.dumps(list(areas)),
        caldav=caldav), extra))
    database_url = None
    if ON_POSTGRESQL:  # the suite on the shared store
        server = request.getfixturevalue("postgres")
        database_url = server.url(server.new_database())
        # First, so that tests copying an account's tables to another config copy no [database].
        config_path.write_text(f'[database]\nurl = "{database_url}"\n\n' + config_path.read_text())
    env = GwEnv(dovecot=dovecot, user=user, password=password, dir=workdir, config_path=config_path,
                database_url=database_url,
                radicale=calserver if isinstance(calserver, RadicaleServer) else None, calserver=calserver,
                collections=names)
    if calserver is not None:
        calserver.make_calendar(user, names[0], "VEVENT")
        calserver.make_calendar(user, names[1], "VTODO")
    return env


@pytest.fixture
def make_env(dovecot, tmp_path, request):
    def factory(**kw) -> GwEnv:
        return build_env(dovecot, tmp_path, request, **kw)

    return factory


@pytest.fixture
def env(make_env) -> GwEnv:
    return make_env()


def company_config(pg_url: str, imap_port: int, archive: str, worker: str = "tick = 1\nstalled_after = 5\n") -> str:
    """A worker's config: the shared database, `[worker]` settings, and `[defaults.imap]` logging
    in through Dovecot's master user `gwsync` (password in GWSYNC_TEST_MASTER), as a company's."""
    return (f'[database]\nurl = "{pg_url}"\n\n[worker]\n{worker}\n'
            f'[defaults.imap]\nhost = "127.0.0.1"\nport = {imap_port}\nsecurity = "none"\n'
            f'import_root = "INBOX"\narchive_folder = "{archive}"\nmaster_user = "gwsync"\n'
            'password_env = "GWSYNC_TEST_MASTER"\n')


def pg_rows(url: str, sql: str, *params) -> list[tuple]:
    """The rows of one query on its own autocommit connection (the worker tests' look at the database)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()  # type: ignore[arg-type]  # the tests' own text


def wait_until(what, timeout: float, message: str, check_workers, logs):
    """`what()`'s first true value, asked every 0.2 s; a table the worker has not made yet counts
    as not yet. `check_workers()` raises when a worker died; past `timeout` the AssertionError
    says `message` and shows `logs()`."""
    import time

    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        try:
            value = what()
        except psycopg.errors.UndefinedTable:  # the worker has not made its tables yet
            value = None
        if value:
            return value
        check_workers()
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} within {timeout} s; {logs()}")
        time.sleep(0.2)

"""CalDAV servers for the interop tests, started on loopback from Debian and PyPI packages.

Xandikos (PyPI) without auth, and with Basic auth over its `--autocert` TLS; SabreDAV 1.8
(Debian `php-sabre-dav`, the library under Nextcloud and Baikal) on `php -S` with Basic or Digest
auth. Each one shares the interface of `gwsync.demo.localservers.Radicale` that the tests use:
`url`, `ca_file`, `password_for`, `add_user` (returns the user's calendar home), `make_calendar`,
`calendar_url`, `request_count` and `stop`. Each server runs in its own process group with its own
temporary directory, so nothing outlives the test run that started it.
"""

from __future__ import annotations

import base64
import hashlib
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from gwsync.demo.localservers import MKCALENDAR, Radicale, ServerUnavailable, _LocalServer, free_port, wait_for_port

SABRE_EXAMPLES = Path("/usr/share/doc/php-sabre-dav/examples/sql")
SABRE_REALM = "SabreDAV"


def make_certificate(directory: Path, cert: Path, key: Path) -> Path:
    """A throw-away CA (returned) and a certificate for 127.0.0.1 and localhost that it signed,
    valid for 400 days (Xandikos makes a new one when its certificate ends within 30 days)."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    (directory / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "400",
            "-subj", "/CN=gwsync test CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", "server.csr", "-subj", "/CN=localhost")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", str(cert), "-days", "400", "-extfile", "san.ext")
    return directory / "ca.pem"


class _DavServer(_LocalServer):
    """What the CalDAV test servers share: a client as a user, MKCALENDAR."""

    port: int
    scheme: str = "http"
    ca_file: Path | None = None  # what a client trusts for this server's TLS certificate
    auth: str = "basic"  # "none", "basic" or "digest"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/"

    @staticmethod
    def password_for(user: str) -> str:
        return f"dav-{user}"

    def client(self, user: str, url: str | None = None):
        from caldav.davclient import DAVClient

        verify: bool | str = str(self.ca_file) if self.ca_file else True
        if not getattr(self, "own_certificate", True):
            verify = False  # the tests' own client; gwsync's errors about this certificate are tested
            warnings.filterwarnings("ignore", message="Unverified HTTPS request")
        password = self.password_for(user) if self.auth != "none" else None
        return DAVClient(url or self.url, username=user if password else None, password=password,
                         ssl_verify_cert=verify)

    def calendar_url(self, user: str, name: str) -> str:
        return f"{self.home(user)}{name}/"

    def home(self, user: str) -> str:
        raise NotImplementedError

    def collection_names(self, user: str) -> tuple[str, str]:
        """The names a test user's events and tasks collections get."""
        return "calendar", "tasks"

    def make_calendar(self, user: str, name: str, component: str = "VEVENT", display: str | None = None) -> str:
        """Create a calendar collection (MKCALENDAR) for a user; returns its URL."""
        url = self.calendar_url(user, name)
        response = self.client(user, url).request(
            url, "MKCALENDAR", MKCALENDAR.format(name=display or name, comp=component),
            {"Content-Type": "application/xml"})
        if response.status != 201:
            raise ServerUnavailable(f"MKCALENDAR {url} answered {response.status}")
        return url


@dataclass
class Xandikos(_DavServer):
    """Xandikos (PyPI), one principal at /user/. Without auth, plain HTTP; with auth, Basic over
    its `--autocert` HTTPS (it refuses --htpasswd without). `own_certificate=False` leaves
    Xandikos to make its own certificate, which names 127.0.0.1 as a DNS name (a mismatch for
    every client that checks the IP); then `ca_file` is that certificate. Every test user shares
    the one principal, so tests give their collections names of their own."""

    directory: Path
    auth: str = "none"
    own_certificate: bool = True
    port: int = 0
    scheme: str = "http"
    ca_file: Path | None = None
    proc: subprocess.Popen | None = None

    @classmethod
    def start(cls, auth: bool = False, own_certificate: bool = True, defaults: bool = False) -> Xandikos:
        """`defaults=True` makes Xandikos create its "calendar" collection (VEVENT and VTODO)."""
        directory = Path(tempfile.mkdtemp(prefix="gwsync-xandikos-"))
        server = cls(directory=directory, auth="basic" if auth else "none", own_certificate=own_certificate)
        args = ["serve", "-d", str(directory / "data"), "-l", "127.0.0.1", "--state-dir", str(directory / "state"),
                "--defaults" if defaults else "--autocreate"]
        if auth:
            server.scheme = "https"
            certs = directory / "state" / "certs"
            certs.mkdir(parents=True)
            if own_certificate:
                server.ca_file = make_certificate(directory, certs / "selfsigned.crt", certs / "selfsigned.key")
            else:
                server.ca_file = certs / "selfsigned.crt"  # made by Xandikos on start
            (directory / "htpasswd").write_text("")
            args += ["--autocert", "--htpasswd", str(directory / "htpasswd")]
        server._launch(args)
        return server

    def _launch(self, args: list[str]) -> None:
        self.port = free_port()
        log = self.directory / "xandikos.log"
        with open(log, "ab") as errors:  # the child keeps its own copy of the file
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "xandikos", *args, "-p", str(self.port)],
                stdout=subprocess.DEVNULL, stderr=errors, start_new_session=True)
        wait_for_port(self.port, self.proc, log=log)

    def add_user(self, user: str) -> str:
        """A login for the user (with auth); returns the calendar home every user shares."""
        if self.auth != "none":
            digest = base64.b64encode(hashlib.sha1(self.password_for(user).encode()).digest()).decode()
            with open(self.directory / "htpasswd", "a") as users:
                users.write(f"{user}:{{SHA}}{digest}\n")
        return self.home(user)

    def home(self, user: str) -> str:
        return f"{self.url}user/calendars/"

    def collection_names(self, user: str) -> tuple[str, str]:
        return f"{user}-calendar", f"{user}-tasks"  # one principal for all

    def request_count(self) -> int:
        return 0  # Xandikos logs no requests by default


SABRE_SERVER_PHP = r"""<?php
// SabreDAV 1.8 CalDAV server for tests: PDO backends on SQLite, Basic or Digest auth.
date_default_timezone_set('UTC');
$pdo = new \PDO('sqlite:' . __DIR__ . '/db.sqlite');
$pdo->setAttribute(PDO::ATTR_ERRMODE, PDO::ERRMODE_EXCEPTION);
// Errors become exceptions, except deprecation notices: SabreDAV 1.8 predates PHP 8.2.
set_error_handler(function ($errno, $errstr, $errfile, $errline) {
    throw new \ErrorException($errstr, 0, $errno, $errfile, $errline);
}, E_ALL & ~E_DEPRECATED & ~E_USER_DEPRECATED);
require_once 'Sabre/autoload.php';
// One line per request (PHP's server logs none for a router script): the tests count them.
register_shutdown_function(function () {
    file_put_contents(__DIR__ . '/requests.log', http_response_code() . ' ' . $_SERVER['REQUEST_METHOD'] . ' '
        . $_SERVER['REQUEST_URI'] . "\n", FILE_APPEND | LOCK_EX);
});

class BasicFromDigestTable extends \Sabre\DAV\Auth\Backend\AbstractBasic {
    private $pdo;
    function __construct(\PDO $pdo) { $this->pdo = $pdo; }
    protected function validateUserPass($username, $password) {
        $stmt = $this->pdo->prepare('SELECT digesta1 FROM users WHERE username = ?');
        $stmt->execute(array($username));
        $hash = $stmt->fetchColumn();
        return $hash !== false && $hash === md5($username . ':SabreDAV:' . $password);
    }
}

$authBackend = AUTH === 'digest' ? new \Sabre\DAV\Auth\Backend\PDO($pdo) : new BasicFromDigestTable($pdo);
$principalBackend = new \Sabre\DAVACL\PrincipalBackend\PDO($pdo);
$calendarBackend = new \Sabre\CalDAV\Backend\PDO($pdo);
$server = new \Sabre\DAV\Server(array(
    new \Sabre\CalDAV\Principal\Collection($principalBackend),
    new \Sabre\CalDAV\CalendarRootNode($principalBackend, $calendarBackend),
));
$server->setBaseUri('/');
$server->addPlugin(new \Sabre\DAV\Auth\Plugin($authBackend, 'SabreDAV'));
$server->addPlugin(new \Sabre\DAVACL\Plugin());
$server->addPlugin(new \Sabre\CalDAV\Plugin());
$server->exec();
"""


@dataclass
class SabreDAV(_DavServer):
    """SabreDAV 1.8 (Debian `php-sabre-dav`) on PHP's built-in server, with Basic or Digest
    auth; several users, calendars at /calendars/USER/NAME/. It has no sync-collection."""

    directory: Path
    auth: str = "basic"
    port: int = 0
    proc: subprocess.Popen | None = None

    @classmethod
    def start(cls, auth: str = "basic") -> SabreDAV:
        php = shutil.which("php")
        if not php or not (SABRE_EXAMPLES / "sqlite.calendars.sql").exists():
            raise ServerUnavailable("SabreDAV is not installed (apt-get install php-sabre-dav php-cli php-sqlite3)")
        directory = Path(tempfile.mkdtemp(prefix="gwsync-sabredav-"))
        with sqlite3.connect(directory / "db.sqlite") as db:
            for part in ("calendars", "principals", "users", "locks"):
                db.executescript((SABRE_EXAMPLES / f"sqlite.{part}.sql").read_text())
        (directory / "server.php").write_text(SABRE_SERVER_PHP.replace("AUTH ===", f"'{auth}' ==="))
        server = cls(directory=directory, auth=auth, port=free_port())
        log = directory / "php.log"
        with open(log, "ab") as errors:  # the child keeps its own copy of the file
            server.proc = subprocess.Popen(
                [php, "-d", "include_path=.:/usr/share/php", "-S", f"127.0.0.1:{server.port}",
                 str(directory / "server.php")],
                cwd=directory, stdout=subprocess.DEVNULL, stderr=errors, start_new_session=True)
        wait_for_port(server.port, server.proc, log=log)
        return server

    def add_user(self, user: str) -> str:
        """A user with a principal (password `dav-<user>`); returns the calendar home."""
        digest = hashlib.md5(f"{user}:{SABRE_REALM}:{self.password_for(user)}".encode()).hexdigest()
        with sqlite3.connect(self.directory / "db.sqlite", timeout=30) as db:
            db.execute("INSERT INTO users (username, digesta1) VALUES (?, ?)", (user, digest))
            db.execute("INSERT INTO principals (uri, email, displayname) VALUES (?, ?, ?)",
                       (f"principals/{user}", f"{user}@example.org", user))
        return self.home(user)

    def home(self, user: str) -> str:
        return f"{self.url}calendars/{user}/"

    def request_count(self) -> int:
        """Requests the server has answered so far, refused ones (401) too."""
        log = self.directory / "requests.log"
        return len(log.read_text().splitlines()) if log.exists() else 0

    def requests(self) -> list[str]:
        """"STATUS METHOD PATH" of every request so far."""
        log = self.directory / "requests.log"
        return log.read_text().splitlines() if log.exists() else []



class RadicaleServer(Radicale, _DavServer):
    """The suite's Radicale with the interface of the servers above."""

    make_calendar = _DavServer.make_calendar

    def home(self, user: str) -> str:
        return f"{self.url}{user}/"

    def request_count(self) -> int:
        return Radicale.request_count(self)


@dataclass
class CyrusDav(_DavServer):
    """The CalDAV of a Cyrus test server (its httpd; `tests/cyrus_server.Cyrus`), Basic auth with
    the Cyrus user's password, calendars at /dav/calendars/user/USER/NAME/. Every user has
    "Default" (VEVENT and VTODO); others are made with MKCALENDAR. Stopping it leaves the Cyrus
    server to the fixture that started it."""

    cyrus: object  # cyrus_server.Cyrus, which lives outside this package
    proc: subprocess.Popen | None = None  # nothing of its own to stop
    directory: Path | None = None

    @property
    def port(self) -> int:  # type: ignore[override]
        return self.cyrus.http_port

    def password_for(self, user: str) -> str:  # type: ignore[override]
        return self.cyrus.password_for(user)

    def add_user(self, user: str) -> str:
        """A Cyrus user with its INBOX (one IMAP login creates it; until then the user's
        calendar home answers 500); returns the calendar home."""
        from imapclient import IMAPClient

        with IMAPClient("127.0.0.1", port=self.cyrus.port, ssl=False) as client:
            client.login(user, self.password_for(user))
        return self.home(user)

    def home(self, user: str) -> str:
        return f"{self.url}dav/calendars/user/{user}/"

    def request_count(self) -> int:
        return 0  # Cyrus logs requests only through syslog

"""Throw-away local mail and calendar servers on loopback.

Used by `gwsync demo`, the test suite and the benchmarks. Each server gets its own
temporary directory, a free port, and its own process group, so that nothing outlives
the run that started it.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Self


class ServerUnavailable(RuntimeError):
    """The server's program is not installed or did not start."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 15.0, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            detail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise ServerUnavailable(f"server exited with code {proc.returncode}: {detail}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise ServerUnavailable(f"server did not listen on port {port} within {timeout} s")


def _wait_until_bindable(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
                return
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise ServerUnavailable(f"port {port} stayed busy") from exc
                time.sleep(0.1)


def stop_process_group(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=5)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=5)


DOVECOT_CONF = """\
base_dir = {dir}/run
state_dir = {dir}/state
log_path = {dir}/dovecot.log
info_log_path = {dir}/dovecot.log
{ssl}
disable_plaintext_auth = no
listen = 127.0.0.1
protocols = {protocols}
default_internal_user = {user}
default_internal_group = {group}
default_login_user = {user}
first_valid_uid = 1
first_valid_gid = 1
mail_location = maildir:{dir}/mail/%u:LAYOUT=fs
# With the default fcntl locks, two sessions of one user that create or list folders at the
# same moment can make the kernel report EDEADLK, on which Dovecot 2.3 panics and drops the
# session (seen with a `watch` and another client). flock has no deadlock detection.
lock_method = flock
mail_plugins =
auth_mechanisms = plain login
auth_failure_delay = 0
{master}namespace inbox {{
  inbox = yes
  separator = /
  prefix =
}}
passdb {{
  driver = static
  args = password=pw-%u
}}
userdb {{
  driver = static
  args = uid={user} gid={group} home={dir}/home/%u
}}
service imap-login {{
  chroot =
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {tls_port}
  }}
}}
service anvil {{
  chroot =
}}
{sieve}
service stats {{
  unix_listener stats-writer {{
    mode = 0666
  }}
}}
protocol imap {{
  mail_max_userip_connections = {max_userip_connections}
}}
{extra}
"""


SIEVE_CONF = """\
service managesieve-login {{
  chroot =
  inet_listener sieve {{
    address = 127.0.0.1
    port = {sieve_port}
  }}
}}
plugin {{
  sieve = file:~/sieve;active=~/.dovecot.sieve
}}
protocol lda {{
  mail_plugins = $mail_plugins sieve
}}
"""

# Master users (README: Company deployment): `USER*MASTER` with MASTER's password logs in as
# USER, and so does SASL PLAIN with MASTER as authentication and USER as authorization identity.
# Master passdbs are asked only for those two forms. `result_success = continue` then looks USER
# up in the ordinary passdbs (without its password), so a master logs in only as users that exist
# there: the deny passdb's users (denied-users) are refused with NO [AUTHORIZATIONFAILED], the
# answer for a user the server does not have. auth_verbose logs each refused password
# ("Password mismatch").
MASTER_CONF = """\
auth_master_user_separator = *
auth_verbose = yes
passdb {{
  driver = passwd-file
  args = {dir}/master-users
  master = yes
  result_success = continue
}}
passdb {{
  driver = passwd-file
  args = {dir}/denied-users
  deny = yes
}}
"""


class _LocalServer:
    """Stopping (also at the end of a `with` block) a server started in its own process group,
    and removing its temporary directory, if it has one."""

    proc: subprocess.Popen | None
    directory: Path | None = None

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc)
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class Dovecot(_LocalServer):
    """A Dovecot IMAP server in a temporary directory (Debian package `dovecot-imapd`)."""

    directory: Path
    port: int = 0
    host: str = "127.0.0.1"
    proc: subprocess.Popen | None = None
    tls_port: int = 0  # implicit TLS (imaps); STARTTLS works on `port` too
    ca_file: Path | None = None  # the throw-away CA that signed the server's certificate
    sieve_port: int = 0  # ManageSieve, when started with sieve=True
    max_userip_connections: int = 100  # Dovecot's own default is 10
    extra: str = ""  # more config, appended (e.g. the limits of a benchmark with 1,000 sessions)
    master_users: dict[str, str] | None = None  # master user -> password (a master passdb)

    @classmethod
    def start(cls, tls: bool = False, sieve: bool = False, max_userip_connections: int = 100,
              master_users: dict[str, str] | None = None, denied_users: tuple[str, ...] = (),
              extra: str = "") -> Dovecot:
        """With tls=True, the server gets a certificate for 127.0.0.1 and localhost, signed by a
        throw-away CA (`ca_file`), and listens for implicit TLS on `tls_port`. Past
        `max_userip_connections` sessions of one user, a login gets `NO [LIMIT]`. With
        `master_users`, each of them logs in as any user but the `denied_users` (MASTER_CONF).
        `extra` is appended to the config."""
        directory = Path(tempfile.mkdtemp(prefix="gwsync-dovecot-", dir="/tmp"))
        os.chmod(directory, 0o755)
        for sub in ("run", "state", "mail", "home"):
            (directory / sub).mkdir()
        server = cls(directory=directory, sieve_port=free_port() if sieve else 0,
                     max_userip_connections=max_userip_connections, master_users=master_users, extra=extra)
        if master_users:
            (directory / "master-users").write_text("".join(f"{user}:{{PLAIN}}{password}\n"
                                                            for user, password in master_users.items()))
            (directory / "denied-users").write_text("".join(f"{user}\n" for user in denied_users))
        if tls:
            server.ca_file = _make_certificates(directory)
        server._launch()
        return server

    def deliver(self, user: str, raw: bytes, sender: str = "sender@example.org") -> None:
        """Deliver a mail the way the mail server would (dovecot-lda: Sieve rules apply)."""
        lda = "/usr/lib/dovecot/dovecot-lda"
        result = subprocess.run([lda, "-c", str(self.directory / "dovecot.conf"), "-d", user, "-f", sender],
                                input=raw, capture_output=True, timeout=30)
        if result.returncode != 0:
            raise ServerUnavailable(f"dovecot-lda failed: {result.stderr.decode(errors='replace')[-500:]}")

    def restart(self, same_port: bool = False) -> None:
        """Stop the server and start it again on the same mail store, on a new port or (waiting
        until the stopped Dovecot lets go of it, about a second) on the same one."""
        if self.proc is not None:
            stop_process_group(self.proc)
        self._launch(port=self.port if same_port else None)

    def _launch(self, port: int | None = None) -> None:
        binary = shutil.which("dovecot") or ("/usr/sbin/dovecot" if Path("/usr/sbin/dovecot").exists() else None)
        if not binary:
            raise ServerUnavailable("dovecot is not installed (apt-get install dovecot-imapd)")
        # Dovecot's login processes refuse to run as root, and the mail user must be able to
        # traverse the directory: as root, run everything as the `dovecot` user.
        user = "dovecot" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        entry = pwd.getpwnam(user)
        self.port = port if port is not None else free_port()
        if port is not None:
            _wait_until_bindable(port)
        conf = self.directory / "dovecot.conf"
        if self.ca_file is not None:
            self.tls_port = self.tls_port or free_port()
            ssl = (f"ssl = yes\nssl_cert = <{self.directory}/server.pem\nssl_key = <{self.directory}/server.key")
        else:
            ssl = "ssl = no"
        sieve = SIEVE_CONF.format(sieve_port=self.sieve_port) if self.sieve_port else ""
        conf.write_text(DOVECOT_CONF.format(dir=self.directory, port=self.port, user=user, ssl=ssl,
                                            tls_port=self.tls_port, group=_group_name(entry.pw_gid), sieve=sieve,
                                            protocols="imap sieve" if self.sieve_port else "imap",
                                            max_userip_connections=self.max_userip_connections,
                                            extra=self.extra,
                                            master=MASTER_CONF.format(dir=self.directory) if self.master_users else ""))
        if os.geteuid() == 0:
            for path in [self.directory, *self.directory.rglob("*")]:
                os.chown(path, entry.pw_uid, entry.pw_gid)
        with open(self.directory / "stderr.log", "ab") as stderr:  # the child keeps its own copy
            self.proc = subprocess.Popen(
                [binary, "-F", "-c", str(conf)],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
            )
        wait_for_port(self.port, self.proc, log=self.directory / "dovecot.log")
        if self.sieve_port:
            wait_for_port(self.sieve_port, self.proc, log=self.directory / "dovecot.log")

    @staticmethod
    def password_for(user: str) -> str:
        """Every user name logs in, with the password `pw-<user>` (a static passdb: no file
        to re-read, so tests can make a fresh mailbox per test at no cost)."""
        return f"pw-{user}"



def _make_certificates(directory: Path) -> Path:
    """A CA and a server certificate for 127.0.0.1/localhost, with the openssl command."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    (directory / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=gwsync test CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=localhost")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "2", "-extfile", "san.ext")
    return directory / "ca.pem"


def _group_name(gid: int) -> str:
    import grp

    return grp.getgrgid(gid).gr_name


@dataclass
class Pymap(_LocalServer):
    """pymap, a pure-Python IMAP server from PyPI: one demo user, in memory."""

    user: str
    password: str
    port: int = 0
    host: str = "127.0.0.1"
    proc: subprocess.Popen | None = None
    sieve_port: int = 0  # its ManageSieve (Sieve without the include extension)

    @classmethod
    def start(cls, user: str = "demo", password: str = "demopass") -> Pymap:
        server = cls(user=user, password=password, port=free_port(), sieve_port=free_port())
        server.proc = subprocess.Popen(
            [sys.executable, "-c", "from pymap.main import main; main()",
             "--host", "127.0.0.1", "--port", str(server.port),
             "--sieve-host", "127.0.0.1", "--sieve-port", str(server.sieve_port),
             "--no-tls", "dict", "--demo-user", user, "--demo-password", password],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for_port(server.port, server.proc)
        return server



RADICALE_CONF = """\
[server]
hosts = 127.0.0.1:{port}
[auth]
type = htpasswd
htpasswd_filename = {dir}/users
htpasswd_encryption = plain
delay = 0
[rights]
{rights}
[storage]
filesystem_folder = {dir}/collections
[logging]
level = {log_level}
mask_passwords = True
"""


MKCALENDAR = ('<?xml version="1.0" encoding="utf-8"?><C:mkcalendar xmlns:D="DAV:" '
              'xmlns:C="urn:ietf:params:xml:ns:caldav"><D:set><D:prop><D:displayname>{name}</D:displayname>'
              '<C:supported-calendar-component-set><C:comp name="{comp}"/></C:supported-calendar-component-set>'
              '</D:prop></D:set></C:mkcalendar>')


@dataclass
class Radicale(_LocalServer):
    """A Radicale CalDAV server (PyPI) in a temporary directory."""

    directory: Path
    port: int = 0
    host: str = "127.0.0.1"
    proc: subprocess.Popen | None = None

    log_level: str = "warning"
    rights: str | None = None  # a rights file (Radicale's `from_file`); None: each user only their own

    @classmethod
    def start(cls, log_level: str = "warning", rights: str | None = None) -> Radicale:
        """log_level "info" logs one line per request (benchmarks count them). `rights` is the
        text of a rights file, e.g. one that lets a service user into every user's calendars."""
        directory = Path(tempfile.mkdtemp(prefix="gwsync-radicale-"))
        (directory / "users").write_text("")
        server = cls(directory=directory, log_level=log_level, rights=rights)
        server._launch()
        return server

    def request_count(self) -> int:
        """Requests the server has logged so far (needs log_level "info")."""
        log = self.directory / "radicale.log"
        return log.read_text(errors="replace").count(" request for ") if log.exists() else 0

    def _launch(self) -> None:
        self.port = free_port()
        conf = self.directory / "radicale.conf"
        if self.rights is not None:
            (self.directory / "rights").write_text(self.rights)
            rights = f"type = from_file\nfile = {self.directory}/rights"
        else:
            rights = "type = owner_only"
        conf.write_text(RADICALE_CONF.format(dir=self.directory, port=self.port, log_level=self.log_level,
                                             rights=rights))
        with open(self.directory / "radicale.log", "ab") as stderr:  # the child keeps its own copy
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "radicale", "--config", str(conf)],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
            )
        wait_for_port(self.port, self.proc, log=self.directory / "radicale.log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    @staticmethod
    def password_for(user: str) -> str:
        return f"dav-{user}"

    def add_user(self, user: str) -> str:
        """Add a user (password `dav-<user>`); returns the user's calendar home URL."""
        with open(self.directory / "users", "a") as users:
            users.write(f"{user}:{self.password_for(user)}\n")
        return f"{self.url}{user}/"

    def make_calendar(self, user: str, name: str, component: str = "VEVENT") -> str:
        """Create a calendar collection (MKCALENDAR) for a user; returns its URL."""
        from caldav.davclient import DAVClient

        url = f"{self.url}{user}/{name}/"
        client = DAVClient(url, username=user, password=self.password_for(user))
        response = client.request(url, "MKCALENDAR", MKCALENDAR.format(name=name, comp=component),
                                  {"Content-Type": "application/xml"})
        if response.status != 201:
            raise ServerUnavailable(f"MKCALENDAR {url} answered {response.status}")
        return url

    def restart(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc)
        self._launch()


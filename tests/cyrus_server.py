"""A throw-away Cyrus IMAP server on loopback, for the server matrix of the tests.

Cyrus 3.6 from Debian: IMAP (imapd), ManageSieve (timsieved), LMTP delivery (lmtpd), IDLE
notices (idled) and CalDAV (httpd), all under one `master` with a private configdirectory,
partition and sieve directory in a temporary directory, users in a private sasldb.

Debian's `cyrus-imapd` package, which holds imapd and idled, conflicts with `imap-server` and
would remove dovecot-imapd. So it is never installed: its .deb is unpacked (`dpkg -x`) into a
cache directory once and the binaries are run from there; everything else comes from the
packages cyrus-common, cyrus-caldav and sasl2-bin (scripts/test installs them).

Order of work in `start`: the binaries (unpacked once per cyrus-common version), the
directories `cyrus-makedirs` would create, imapd.conf and cyrus.conf, then `master` in its own
process group. INBOXes are created on a user's first login (autocreate_quota).
"""

from __future__ import annotations

import os
import shutil
import smtplib
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from gwsync.demo.localservers import ServerUnavailable, _LocalServer, free_port, wait_for_port

CYRUS_BIN = Path("/usr/lib/cyrus/bin")
PACKAGES = "cyrus-common cyrus-caldav sasl2-bin"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gwsync-test"
CONTROL_DIRS = ("db", "proc", "socket", "log", "msg", "user", "quota", "lock", "sync")

IMAPD_CONF = """\
configdirectory: {dir}/conf
proc_path: {dir}/conf/proc
mboxname_lockpath: {dir}/conf/lock
defaultpartition: default
partition-default: {dir}/spool
sievedir: {dir}/sieve
idlesocket: {dir}/conf/socket/idle
lmtpsocket: {dir}/conf/socket/lmtp
notifysocket: {dir}/conf/socket/notify
servername: localhost
unixhierarchysep: {unixhierarchysep}
altnamespace: no
allowplaintext: yes
sasl_pwcheck_method: auxprop
sasl_auxprop_plugin: sasldb
sasl_sasldb_path: {dir}/sasldb2
sasl_mech_list: PLAIN LOGIN
autocreate_quota: 0
autocreate_post: 1
failedloginpause: 0
lmtp_downcase_rcpt: yes
httpmodules: caldav
{extra}"""

CYRUS_CONF = """\
START {{
  recover cmd="{bin}/ctl_cyrusdb -r -C {conf}"
}}
SERVICES {{
  imap cmd="{imapd_bin}/imapd -C {conf}" listen="127.0.0.1:{port}" prefork=0
  sieve cmd="{bin}/timsieved -C {conf}" listen="127.0.0.1:{sieve_port}" prefork=0
  lmtpunix cmd="{bin}/lmtpd -C {conf}" listen="{dir}/conf/socket/lmtp" prefork=0
  http cmd="{bin}/httpd -C {conf}" listen="127.0.0.1:{http_port}" prefork=0
}}
EVENTS {{
}}
DAEMON {{
  idled cmd="{imapd_bin}/idled -C {conf}"
}}
"""


def imapd_binaries() -> Path:
    """The directory with imapd and idled, unpacked from the cyrus-imapd .deb of the same
    version as the installed cyrus-common (once; later runs reuse it)."""
    if not (CYRUS_BIN / "master").exists() or not shutil.which("saslpasswd2"):
        raise ServerUnavailable(f"Cyrus is not installed (apt-get install --no-install-recommends {PACKAGES}; "
                                "not cyrus-imapd, which removes dovecot-imapd)")
    version = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "cyrus-common"], capture_output=True,
                             text=True, check=True).stdout.strip()
    target = CACHE / f"cyrus-imapd-{version}"
    binaries = target / "usr/lib/cyrus/bin"
    if (binaries / "imapd").exists() and (binaries / "idled").exists():
        return binaries
    with tempfile.TemporaryDirectory(prefix="gwsync-cyrus-deb-") as download:
        os.chmod(download, 0o777)  # apt's download user (_apt) writes here
        fetched = subprocess.run(["apt-get", "download", f"cyrus-imapd={version}"], cwd=download,
                                 capture_output=True, text=True, check=False)
        debs = list(Path(download).glob("cyrus-imapd_*.deb"))
        if fetched.returncode != 0 or not debs:
            raise ServerUnavailable(f"apt-get download cyrus-imapd={version} failed: {fetched.stderr.strip()[-500:]}")
        CACHE.mkdir(parents=True, exist_ok=True)
        unpacking = Path(tempfile.mkdtemp(prefix="cyrus-imapd-", dir=CACHE))
        subprocess.run(["dpkg", "-x", str(debs[0]), str(unpacking)], check=True, capture_output=True)
        os.chmod(unpacking, 0o755)
        try:
            unpacking.rename(target)  # whole or not at all, should two runs unpack at once
        except OSError:  # the other run was first (scripts/test runs two passes side by side)
            shutil.rmtree(unpacking, ignore_errors=True)
            if not (binaries / "imapd").exists():
                raise
    return binaries


@dataclass
class Cyrus(_LocalServer):
    """A Cyrus IMAP server in a temporary directory. `separator` is "." (Debian's default,
    `unixhierarchysep: no`) or "/" (`unixhierarchysep: yes`). `sieve_extensions` limits what
    its Sieve offers (e.g. without include), as an admin's imapd.conf can."""

    directory: Path
    separator: str = "."
    sieve_extensions: str | None = None
    port: int = 0
    sieve_port: int = 0
    http_port: int = 0
    host: str = "127.0.0.1"
    proc: subprocess.Popen | None = None
    users: set[str] = field(default_factory=set)

    @classmethod
    def start(cls, separator: str = ".", sieve_extensions: str | None = None, settings: str = "") -> Cyrus:
        """`settings`: more imapd.conf lines (e.g. "maxlogins_per_user: 2\n")."""
        imapd_bin = imapd_binaries()
        directory = Path(tempfile.mkdtemp(prefix="gwsync-cyrus-", dir="/tmp"))
        os.chmod(directory, 0o755)
        server = cls(directory=directory, separator=separator, sieve_extensions=sieve_extensions,
                     port=free_port(), sieve_port=free_port(), http_port=free_port())
        for sub in [*(f"conf/{name}" for name in CONTROL_DIRS), "spool", "sieve", "bin"]:
            (directory / sub).mkdir(parents=True)
        for program in ("imapd", "idled"):  # the cache may lie where the cyrus user cannot reach (~root)
            shutil.copy2(imapd_bin / program, directory / "bin" / program)
        conf = directory / "imapd.conf"
        extra = (f"sieve_extensions: {sieve_extensions}\n" if sieve_extensions else "") + settings
        conf.write_text(IMAPD_CONF.format(dir=directory, unixhierarchysep="yes" if separator == "/" else "no",
                                          extra=extra))
        (directory / "cyrus.conf").write_text(CYRUS_CONF.format(
            bin=CYRUS_BIN, imapd_bin=directory / "bin", conf=conf, dir=directory, port=server.port,
            sieve_port=server.sieve_port, http_port=server.http_port))
        server._saslpasswd("cyrus", "cyrus-admin")  # creates the sasldb, so its owner can be set below
        if os.geteuid() == 0:  # master drops to the cyrus user: it must own its directories
            shutil.chown(directory, "cyrus", "mail")
            for path in directory.rglob("*"):
                shutil.chown(path, "cyrus", "mail")
        with open(directory / "stderr.log", "ab") as stderr:  # the child keeps its own copy
            server.proc = subprocess.Popen(
                [str(CYRUS_BIN / "master"), "-C", str(conf), "-M", str(directory / "cyrus.conf"),
                 "-p", str(directory / "master.pid")],
                stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
        try:
            for port in (server.port, server.sieve_port):
                wait_for_port(port, server.proc, log=directory / "stderr.log")
        except ServerUnavailable:
            server.stop()
            raise
        return server

    def _saslpasswd(self, user: str, password: str) -> None:
        result = subprocess.run(["saslpasswd2", "-f", str(self.directory / "sasldb2"), "-p", "-c", "-u", "localhost",
                                 user], input=password.encode(), capture_output=True, check=False)
        if result.returncode != 0:
            raise ServerUnavailable(f"saslpasswd2 {user} failed: {result.stderr.decode(errors='replace')}")

    def password_for(self, user: str) -> str:
        """The password `pw-<user>`; the user is added to the sasldb on the first ask (its
        INBOX follows on its first login or delivery)."""
        if user not in self.users:
            self._saslpasswd(user, f"pw-{user}")
            self.users.add(user)
        return f"pw-{user}"

    def deliver(self, user: str, raw: bytes, sender: str = "sender@example.org") -> None:
        """Deliver a mail the way the mail server would (LMTP to lmtpd: Sieve rules apply)."""
        with smtplib.LMTP(str(self.directory / "conf/socket/lmtp"), timeout=30) as lmtp:
            refused = lmtp.sendmail(sender, [user], raw)
        if refused:
            raise ServerUnavailable(f"lmtpd refused the mail for {user}: {refused}")

    @property
    def caldav_url(self) -> str:
        """The calendar homes (USER/ below it; "Default" holds VEVENT and VTODO). A user's home
        answers 500 until the user's INBOX exists: log in over IMAP once first."""
        return f"http://127.0.0.1:{self.http_port}/dav/calendars/user/"

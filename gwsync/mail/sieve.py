"""Server-side rules (README: "Server-side rules"): Sieve filters that file mail into import folders.

gwsync keeps its rules in a script of its own ("gwsync"), one rule per `if`, each preceded by a
comment that records it as JSON (the script on the server is the only copy). The user's active
script gets two lines, tagged `# gwsync`, right after its `require` block:

    require "include"; # gwsync
    include :personal "gwsync"; # gwsync

and nothing else of it is touched; removing the last rule removes exactly those lines again.
Without an active script, gwsync activates a small one of its own ("gwsync-main") and removes
it with the last rule. Every script is checked by the server (CHECKSCRIPT) before it is stored.
The ManageSieve protocol (RFC 5804) is spoken by the sievelib library.

Order of a change: the server's SIEVE capabilities first (without `fileinto` and `include` the
rules cannot work: one line says what the server lacks, nothing is stored); then the scripts,
remembering each one's text before; any failure after the first PUTSCRIPT puts back what was
there (texts, the active script) and removes what gwsync added.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import socket
import ssl
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from sievelib.managesieve import Client
from sievelib.managesieve import Error as SievelibError

from ..errors import LoginRefused, NotFound, ServiceError, ServiceMisconfigured, ServiceUnreachable, UsageError

log = logging.getLogger("gwsync.sieve")

RULES_SCRIPT = "gwsync"
MAIN_SCRIPT = "gwsync-main"
TAG = "# gwsync"
INCLUDE_LINES = f'require "include"; {TAG}\ninclude :personal "{RULES_SCRIPT}"; {TAG}\n'
_WARNING_LINES = re.compile(r"\A(?:[^\r\n]*: line \d+: (?:warning|error): [^\r\n]*\r?\n)+")
_RULE_COMMENT = re.compile(r"^# gwsync-rule (\{.*\})\r?$", re.MULTILINE)
# The leading block a Sieve script may have before its first command: comments and requires.
_PREAMBLE = re.compile(r'\A(?:\s+|#[^\n]*\n|/\*.*?\*/|require\s*(?:\[[^\]]*\]|"(?:[^"\\]|\\.)*")\s*;[^\n]*\n?)*',
                       re.DOTALL)


class SieveError(ServiceError):
    """The ManageSieve server refused something (a script, a command)."""


class SieveLoginRefused(LoginRefused, SieveError):
    """The server refused the credential (exit 3)."""


class SieveUnreachable(ServiceUnreachable, SieveError):
    """No connection, or it dropped: transient."""


class SieveMisconfigured(ServiceMisconfigured, SieveError):
    """The server's certificate does not fit the config (exit 2)."""


NEEDED_EXTENSIONS = ("fileinto", "include")  # filing into a folder; gwsync's script included by the user's


@dataclass(frozen=True)
class Rule:
    id: int
    sender: str  # an address (a@b.example) or a domain (@b.example)
    folder: str


def quote(text: str) -> str:
    """A Sieve quoted string (RFC 5228 2.4.2): backslash and double quote escaped."""
    if "\r" in text or "\n" in text or "\x00" in text:
        raise UsageError(f"{text!r}: line breaks and NUL cannot go into a rule")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_rules(rules: list[Rule]) -> str:
    lines = [f"{TAG}: rules managed by gwsync (`gwsync rules`); changes made here are overwritten",
             'require ["fileinto"];']
    for rule in rules:
        lines.append(f"# gwsync-rule {json.dumps(asdict(rule), ensure_ascii=False)}")
        if rule.sender.startswith("@"):
            test = f'address :domain :is "from" {quote(rule.sender[1:])}'
        else:
            test = f'address :is "from" {quote(rule.sender)}'
        lines.append(f"if {test} {{ fileinto {quote(rule.folder)}; stop; }}")
    return "\n".join(lines) + "\n"


def parse_rules(script: str) -> list[Rule]:
    return [Rule(**json.loads(m.group(1))) for m in _RULE_COMMENT.finditer(script)]


def _include_lines(script: str) -> str:
    """Our two lines, in the script's own line endings (servers store scripts with CRLF)."""
    return INCLUDE_LINES.replace("\n", "\r\n") if "\r\n" in script else INCLUDE_LINES


def with_include(script: str) -> str:
    """The user's script with gwsync's two lines after its require block (once)."""
    if f'include :personal "{RULES_SCRIPT}"; {TAG}' in script:
        return script
    preamble = _PREAMBLE.match(script)
    assert preamble is not None  # the pattern matches the empty string too
    end = preamble.end()
    head = script[:end]
    newline = "\r\n" if "\r\n" in script else "\n"
    if head and not head.endswith("\n"):
        head += newline
    return head + _include_lines(script) + script[end:]


def without_include(script: str) -> str:
    return script.replace(_include_lines(script), "", 1)


# sievelib waits 5 s for an answer, but a server may delay its answer to a login much longer
# after refused ones (Dovecot's auth penalty: up to 15 s per client address); a refused login
# must not look like a dead server. sievelib reads the class attribute of Client itself.
READ_TIMEOUT = 30
Client.read_timeout = max(Client.read_timeout, READ_TIMEOUT)


class _Client(Client):
    """sievelib's client, with gwsync's TLS settings: its own STARTTLS trusts the system's
    certificate store only, so `ca_file` and `verify = false` would not reach it. (Name
    mangling makes `_Client__enable_ssl` the method sievelib's STARTTLS calls.)"""

    sock: socket.socket  # sievelib's connection, set when it connects

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None):
        super().__init__(host, port)
        self._tls = tls or ssl.create_default_context()

    def _Client__enable_ssl(self, keyfile=None, certfile=None) -> None:
        self.sock = self._tls.wrap_socket(self.sock, server_hostname=self.srvhostname)


@contextmanager
def _guard(where: str) -> Iterator[None]:
    """sievelib's errors and dropped connections become SieveErrors, for every public method."""
    try:
        yield
    except (SievelibError, OSError) as exc:  # OSError: reset, timeout, TLS
        raise SieveUnreachable(f"{where}: connection lost ({exc})") from exc


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host.lower() == "localhost"


class SieveRules:
    """gwsync's rules on one account's ManageSieve server. A refused login is SieveLoginRefused,
    any other failure a SieveError (SieveUnreachable for the connection). With `authz`, `username`
    is a master user who logs in (SASL PLAIN) as the user `authz`; `acting_for` names the user a
    master user logs in as (either form), for an AUTHORIZATIONFAILED answer (see imap.login_refusal)."""

    def __init__(self, host: str, port: int, username: str, password: str, starttls: bool,
                 tls: ssl.SSLContext | None = None, authz: str = "", acting_for: str | None = None):
        self.where = f"ManageSieve {host}:{port}"
        self.client = _Client(host, port, tls)
        if not starttls and not _loopback(host):
            log.warning("%s: security = \"none\" sends the password unencrypted", self.where)
        try:
            with warnings.catch_warnings():  # sievelib's own words for the line above, on every connect
                warnings.filterwarnings("ignore", "Credentials are sent over an unencrypted connection")
                ok = self.client.connect(username, password, authz_id=authz, starttls=starttls, authmech="PLAIN")
        except ssl.SSLCertVerificationError as exc:
            from .imap import certificate_problem

            raise SieveMisconfigured(certificate_problem(self.where, host, exc)) from None
        except (SievelibError, OSError) as exc:  # refused connections and TLS trouble
            raise SieveUnreachable(f"ManageSieve {host}:{port}: cannot connect ({exc}); is the server up, "
                                   "and is [sieve] port right?") from exc
        if not ok:
            # Before LOGOUT resets them. Dovecot answers a master user refused for the user with no
            # response code, only its text "Authorization failed" ("Authentication failed." otherwise).
            answer = b" ".join((self.client.errcode or b"", self.client.errmsg or b"")).decode("utf-8", "replace")
            self.close()
            who = f"{authz!r} (SASL PLAIN, authenticated as {username!r})" if authz else repr(username)
            if acting_for is not None and re.search(r"authorization ?failed", answer, re.IGNORECASE):
                refused = SieveLoginRefused(f"ManageSieve {host}:{port}: the master user may log in, but not as "
                                            f"{acting_for!r} ({answer.strip()}); the server has no such user, "
                                            "or its master user rules leave it out")
                refused.authorization = True
                raise refused
            raise SieveLoginRefused(f"ManageSieve {host}:{port}: login as {who} refused")

    def close(self) -> None:
        try:
            self.client.logout()
        except Exception:
            pass

    def __enter__(self) -> SieveRules:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _scripts(self) -> tuple[str | None, list[str]]:
        active, others = self.client.listscripts()
        return active, ([active] if active else []) + list(others)

    def _get(self, name: str) -> str:
        """The script exactly as stored. sievelib's getscript() splits and re-joins lines, which
        drops the final newline and turns CRLF into LF: the user's script would not come back
        byte for byte. So read the literal by its declared size."""
        code, _data, content = self.client._Client__send_command(
            "GETSCRIPT", [name.encode("utf-8")], withcontent=True)
        if code != "OK":
            raise SieveError(f"cannot read Sieve script {name!r}: {self._err()}")
        # sievelib leaves the warnings of an earlier PUTSCRIPT in its buffer, ahead of the script
        # (never valid Sieve, so safe to drop).
        return _WARNING_LINES.sub("", content.decode("utf-8"))

    def _put(self, name: str, text: str) -> None:
        if not self.client.checkscript(text):
            raise SieveError(f"the server rejects the Sieve script {name!r}: {self._err()}")
        if not self.client.putscript(name, text):
            raise SieveError(f"cannot store Sieve script {name!r}: {self._err()}")

    def _err(self) -> str:
        err = self.client.errmsg
        return err.decode(errors="replace") if isinstance(err, bytes) else str(err)

    def rules(self) -> list[Rule]:
        with _guard(self.where):
            _active, names = self._scripts()
            return parse_rules(self._get(RULES_SCRIPT)) if RULES_SCRIPT in names else []

    def _check_extensions(self) -> None:
        offered = {ext.lower() for ext in self.client.get_sieve_capabilities() or []}
        missing = [ext for ext in NEEDED_EXTENSIONS if ext not in offered]
        if missing:
            raise SieveError(f"{self.where}: the server's Sieve lacks the {' and '.join(missing)} extension, which "
                             "gwsync's rules need; file the mail with your mail program's filters instead "
                             f"(the server offers: {', '.join(sorted(offered)) or 'nothing'})")

    def add(self, sender: str, folder: str) -> Rule:
        self._check_extensions()
        rules = self.rules()
        rule = Rule(id=max((r.id for r in rules), default=0) + 1, sender=sender, folder=folder)
        with _guard(self.where):
            self._store(rules + [rule])
        return rule

    def remove(self, rule_id: int) -> Rule:
        rules = self.rules()
        found = [r for r in rules if r.id == rule_id]
        if not found:
            raise NotFound(f"no rule {rule_id} (see `gwsync rules list`)")
        with _guard(self.where):
            self._store([r for r in rules if r.id != rule_id])
        return found[0]

    def _store(self, rules: list[Rule]) -> None:
        """Store the rules; on any failure, put back what was there before."""
        active, names = self._scripts()
        before = {name: self._get(name) for name in (RULES_SCRIPT, active) if name is not None and name in names}
        try:
            self._change(rules, active, names)
        except BaseException:
            self._restore(active, names, before)
            raise

    def _restore(self, active: str | None, names: list[str], before: dict[str, str]) -> None:
        """Back to the scripts as they were (best effort: when the connection is gone, the
        original error says so, and the next command finds the state the server kept)."""
        try:
            now_active, now = self._scripts()
            if now_active != active:
                self.client.setactive(active or "")
            for name, text in before.items():
                if self._get(name) != text:
                    self.client.putscript(name, text)
            for name in (MAIN_SCRIPT, RULES_SCRIPT):
                if name in now and name not in names:
                    self.client.deletescript(name)
        except (SievelibError, OSError, SieveError) as exc:
            log.debug("%s: could not undo a failed change: %s", self.where, exc)

    def _change(self, rules: list[Rule], active: str | None, names: list[str]) -> None:
        if rules:
            self._put(RULES_SCRIPT, render_rules(rules))  # the include target exists first
            if active is None:
                self._put(MAIN_SCRIPT, INCLUDE_LINES)
                if not self.client.setactive(MAIN_SCRIPT):
                    raise SieveError(f"cannot activate {MAIN_SCRIPT!r}: {self._err()}")
            elif active != MAIN_SCRIPT:
                text = self._get(active)
                updated = with_include(text)
                if updated != text:
                    self._put(active, updated)
            return
        # The last rule is gone: take back exactly what gwsync added.
        if active == MAIN_SCRIPT:
            self.client.setactive("")
        elif active is not None:
            text = self._get(active)
            if without_include(text) != text:
                self._put(active, without_include(text))
        for name in (MAIN_SCRIPT, RULES_SCRIPT):
            if name in names:
                self.client.deletescript(name)

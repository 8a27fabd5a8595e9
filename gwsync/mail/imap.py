"""The IMAP adapter: a small, typed layer over imapclient for what the mail import needs.

Reading never sets \\Seen (BODY.PEEK only). Moving uses UID MOVE, or COPY + \\Deleted +
UID EXPUNGE where the server lacks MOVE. For `watch`: IDLE on one folder, or IDLE with NOTIFY
(RFC 5465, sent raw: imapclient has no method for it) on every folder below the import root.

Folder names gwsync makes (the archive's default, a rule's folder given by its short name, the
import root "") are built from what the server reports: its hierarchy separator (LIST) and
its personal namespace (NAMESPACE), never by pasting "/". A login the server turns away for a
reason other than the credential ([LIMIT], [UNAVAILABLE], [INUSE], [SERVERBUG]) is transient
and locks nothing; a certificate that does not fit is a config error that says what to fix.
"""

from __future__ import annotations

import re
import select
import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import imapclient
from imapclient import imap_utf7
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError, LoginError
from imapclient.response_parser import parse_response

from ..config import ImapConfig
from ..errors import LoginRefused, ServiceError, ServiceMisconfigured, ServiceUnreachable, UsageError
from .folders import ImportFolderName, is_below, last_element, parse_import_folder


class MailServerError(ServiceError):
    """The IMAP server refused something or the connection broke."""


class LoginFailed(LoginRefused, MailServerError):
    """The server rejected the credentials (AUTHENTICATIONFAILED or NO on LOGIN): exit 3."""


class ServerUnreachable(ServiceUnreachable, MailServerError):
    """Could not connect, or the connection dropped: transient, worth retrying."""

    server_answered = False  # True: it is up, but turned the login away for now ([LIMIT], ...)


class MailServerMisconfigured(ServiceMisconfigured, MailServerError):
    """The server's certificate does not fit, or it takes no login over this connection: exit 2."""


class MailGone(MailServerError):
    """Another client expunged the mail meanwhile: the server answers NIL for it, or nothing."""


@dataclass(frozen=True)
class ImportFolder:
    name: str  # full name, decoded from modified UTF-7
    delimiter: str | None
    parsed: ImportFolderName

    @property
    def status(self) -> str:
        return self.parsed.status


# Response codes (RFC 5530) of a NO on LOGIN that say "not now", not "wrong password".
TRANSIENT_LOGIN_CODES = frozenset({"LIMIT", "UNAVAILABLE", "INUSE", "SERVERBUG"})
# Refusals that mean [LIMIT] but come without a response code: Cyrus's maxlogins_per_user and
# maxlogins_per_host ("NO Too many open connections (2 of 2 for alice)").
TRANSIENT_LOGIN_TEXTS = ("too many open connections",)
_RESPONSE_CODE = re.compile(r"^\s*\[([A-Za-z-]+)")
# OpenSSL's verify results that mean "the certificate is for other names".
_NAME_MISMATCH = {62, 64}  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH


@dataclass(frozen=True)
class News:
    """What the server announced during IDLE with NOTIFY: the folders a STATUS line named, and
    whether something else came (`other`), or the server gave up notifying (`overflow`)."""

    folders: frozenset[str] = frozenset()
    other: bool = False
    overflow: bool = False


# A FETCH answer per batch costs about one round trip; 250 small mails make one fetch of well
# under 10 MB. Large mails are streamed in chunks instead (see fetch_chunks).
FETCH_BATCH = 250
CHUNK = 1 << 20


@contextmanager
def _guard(what: str):
    """Server refusals become MailServerError; a dropped connection (BYE, reset, timeout, any
    socket error) becomes ServerUnreachable, which is never counted against a folder or a mail.
    Every method of ImapSession that talks to the server runs inside it."""
    try:
        yield
    except (IMAPClientAbortError, OSError) as exc:  # ConnectionError, TimeoutError, ssl errors
        raise ServerUnreachable(f"connection lost during {what} ({_text(exc)})") from exc
    except IMAPClientError as exc:
        raise MailServerError(f"{what}: {_text(exc)}") from exc


def tls_context(verify: bool = True, ca_file: str | None = None) -> ssl.SSLContext:
    """Certificates verified against the system's trust store, or `ca_file`; `verify=False`
    only as the user's explicit choice for a test server."""
    ctx = ssl.create_default_context(cafile=ca_file)
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class ImapSession:
    def __init__(self, client: imapclient.IMAPClient):
        self.client = client
        self.capabilities = {(c.decode("ascii", "replace") if isinstance(c, bytes) else c).upper()
                             for c in client.capabilities()}
        self.selected: str | None = None
        self._separator: tuple[str | None] | None = None  # (separator,) once asked

    @classmethod
    def connect(cls, cfg: ImapConfig, password: str) -> ImapSession:
        where = f"{cfg.host}:{cfg.port}"
        context = tls_context(cfg.verify, cfg.ca_file) if cfg.security != "none" else None
        try:
            client = imapclient.IMAPClient(cfg.host, port=cfg.port, ssl=cfg.security == "tls", ssl_context=context,
                                           timeout=cfg.timeout)
            if cfg.security == "starttls":
                client.starttls(context)
        except ssl.SSLCertVerificationError as exc:
            names = _certificate_names(cfg, context) if exc.verify_code in _NAME_MISMATCH else None
            raise MailServerMisconfigured(certificate_problem(f"IMAP {where}", cfg.host, exc, names)) from None
        except (TimeoutError, OSError, IMAPClientError) as exc:
            raise ServerUnreachable(f"IMAP {where}: cannot connect ({exc})") from exc
        authcid, authzid = cfg.login()  # through a master user: USER*MASTER, or SASL PLAIN for USER
        try:
            if authzid is None:
                client.login(authcid, password)
            else:
                client.plain_login(authcid, password, authorization_identity=authzid)
        except LoginError as exc:
            _close(client)
            if isinstance(exc.__context__, IMAPClientAbortError):  # imapclient's word for a BYE or a dropped
                # connection during LOGIN too (a server shutting down): no answer to the password
                raise ServerUnreachable(f"IMAP {where}: connection lost during login ({_text(exc)})") from exc
            raise login_refusal(f"IMAP {where}", cfg.login_text, _text(exc),
                                acting_for=cfg.username if cfg.login_user != cfg.username else None) from None
        except (TimeoutError, OSError, IMAPClientAbortError) as exc:
            raise ServerUnreachable(f"IMAP {where}: connection lost during login ({exc})") from exc
        except IMAPClientError as exc:  # e.g. LOGINDISABLED: the server takes no login over this connection
            _close(client)
            raise MailServerError(f"IMAP {where}: login as {cfg.login_text} not possible ({_text(exc)})") from exc
        with _guard(f"IMAP {where}: CAPABILITY"):
            return cls(client)

    # -- folders -----------------------------------------------------------------------------

    def import_folders(self, root: str, own_status: str | None = None) -> list[ImportFolder]:
        """Import folders at any depth below `root` (import_root), names decoded from modified UTF-7.
        With `own_status` (an import_folder is configured) the root itself is one too: its own
        mail gets that status. Without, the root's own mail (INBOX's) is never imported."""
        root = self.import_root(root)
        found = []
        if own_status is not None and root:
            own = self._list(root)
            if not own:
                return []  # not made yet (a dry run or review before the first sync): nothing in it
            if b"\\NOSELECT" not in {f.upper() for f in own[0][0]}:
                delim = own[0][1].decode() if isinstance(own[0][1], bytes) else own[0][1]
                found.append(ImportFolder(name=root, delimiter=delim,
                                          parsed=ImportFolderName(last_element(root, delim), own_status)))
        delimiter = self.delimiter(root)
        pattern = f"{root}{delimiter}*" if root and delimiter else "*"
        for flags, delim, name in self._list(pattern):
            if b"\\NOSELECT" in {f.upper() for f in flags}:
                continue
            delim_s = delim.decode() if isinstance(delim, bytes) else delim
            name = name if isinstance(name, str) else name.decode("utf-8", "replace")
            if root and not is_below(name, root, delim_s):
                continue
            parsed = parse_import_folder(last_element(name, delim_s))
            if parsed:
                found.append(ImportFolder(name=name, delimiter=delim_s, parsed=parsed))
        return sorted(found, key=lambda f: f.name)

    def delimiter(self, root: str) -> str | None:
        listing = self._list(root or "INBOX")
        if not listing:
            raise MailServerError(f"import root {root!r} does not exist on the server (check import_root)")
        delim = listing[0][1]
        return delim.decode() if isinstance(delim, bytes) else delim

    def separator(self) -> str | None:
        """The hierarchy separator of the personal folders, as LIST reports it for INBOX."""
        if self._separator is None:
            self._separator = (self.delimiter(""),)
        return self._separator[0]

    def personal_prefix(self) -> str:
        """The personal namespace's prefix ("" on Dovecot, "INBOX." on Cyrus); "" when the
        server has no NAMESPACE (RFC 2342)."""
        if "NAMESPACE" not in self.capabilities:
            return ""
        with _guard("IMAP NAMESPACE"):
            personal = self.client.namespace().personal
        prefix = personal[0][0] if personal else ""
        return prefix if isinstance(prefix, str) else prefix.decode("utf-8", "replace")

    def import_root(self, configured: str) -> str:
        """The import root's full name: as configured, or for "" the top of the personal
        namespace ("INBOX" where personal folders live below INBOX, as on Cyrus)."""
        if configured:
            return configured
        prefix, sep = self.personal_prefix(), self.separator()
        return prefix[:-len(sep)] if sep and prefix.endswith(sep) else prefix

    def archive_folder(self, cfg: ImapConfig) -> str:
        """The archive folder: as configured, or "CRM Archiv" below the import root."""
        return cfg.archive_in(self.import_root(cfg.import_root), self.separator())

    def ensure_import_folder(self, cfg: ImapConfig) -> None:
        """Create the configured import folder when missing, named in the server's separator."""
        if cfg.import_folder is None:
            return
        sep = self.separator()
        if sep and sep != "/" and "/" in cfg.import_folder:
            raise UsageError(f"import_folder {cfg.import_folder!r}: this server separates folder levels with "
                             f"{sep!r}, not '/'; write {cfg.import_folder.replace('/', sep)!r}")
        self.ensure_folder(cfg.import_folder)

    def folder_name(self, import_root: str, folder: str) -> str:
        """A folder named by the user: a full name in the server's separator, or a name below
        the import root (which may have levels of its own), joined with that separator."""
        root, sep = self.import_root(import_root), self.separator()
        if sep and sep != "/" and "/" in folder:
            raise UsageError(f"{folder!r}: this server separates folder levels with {sep!r}, not '/'; "
                             f"write {folder.replace('/', sep)!r}")
        if not root or not sep or is_below(folder, root, sep):
            return folder
        return f"{root}{sep}{folder}"

    def _list(self, pattern: str):
        with _guard(f"IMAP LIST {pattern!r}"):
            return self.client.list_folders("", pattern)

    def ensure_folder(self, name: str) -> None:
        with _guard(f"creating folder {name!r}"):
            if self.client.folder_exists(name):
                return
            try:
                self.client.create_folder(name)
            except IMAPClientError as exc:
                # Another client made it meanwhile, and not every server says [ALREADYEXISTS]
                # (Cyrus: "Mailbox already exists"): what counts is whether it is there now.
                if isinstance(exc, IMAPClientAbortError) or not self.client.folder_exists(name):
                    raise

    # -- messages ----------------------------------------------------------------------------

    def select(self, folder: str) -> int:
        """Select a folder read-write; returns its UIDVALIDITY."""
        with _guard(f"opening folder {folder!r}"):
            info = self.client.select_folder(folder)
        self.selected = folder
        return int(info[b"UIDVALIDITY"])

    def uids(self) -> list[int]:
        """UIDs of the selected folder's mail, without mail already marked \\Deleted."""
        with _guard(f"listing the mail of {self.selected!r}"):
            return sorted(self.client.search(["UNDELETED"]))

    def sizes(self, uids: list[int]) -> dict[int, int]:
        sizes: dict[int, int] = {}
        for start in range(0, len(uids), 2000):
            batch = uids[start:start + 2000]
            with _guard(f"reading mail sizes in {self.selected!r}"):
                answer = self.client.fetch(batch, ["RFC822.SIZE"])
            for uid, data in answer.items():
                if data.get(b"RFC822.SIZE") is not None:  # NIL: expunged meanwhile
                    sizes[uid] = int(data[b"RFC822.SIZE"])
        return sizes

    def fetch_raw(self, uids: list[int]) -> dict[int, bytes]:
        """Whole messages, without setting \\Seen. A mail that vanished meanwhile is absent
        (servers leave it out, or answer `BODY[] NIL` as Dovecot does during another client's expunge)."""
        if not uids:
            return {}
        with _guard(f"reading mail in {self.selected!r}"):
            result = self.client.fetch(uids, ["BODY.PEEK[]"])
        return {uid: data[b"BODY[]"] for uid, data in result.items() if data.get(b"BODY[]")}

    def fetch_chunks(self, uid: int, section: str = "", size: int | None = None,
                     chunk: int = CHUNK) -> Iterator[bytes]:
        """One message or MIME part in partial fetches, so a huge mail is never held whole.
        MailGone when the mail vanished (NIL instead of the text, or no answer for the UID)."""
        offset = 0
        while size is None or offset < size:
            key = f"BODY[{section}]<{offset}>".encode()
            piece = self._fetched(uid, f"BODY.PEEK[{section}]<{offset}.{chunk}>", key)
            if not piece:
                return
            yield piece
            offset += len(piece)
            if len(piece) < chunk:
                return

    def fetch_section(self, uid: int, section: str) -> bytes:
        return self._fetched(uid, f"BODY.PEEK[{section}]", f"BODY[{section}]".encode())

    def bodystructure(self, uid: int):
        return self._fetched(uid, "BODYSTRUCTURE", b"BODYSTRUCTURE")

    def _fetched(self, uid: int, item: str, key: bytes):
        """One item of one mail; MailGone when the server answers NIL or leaves the UID out,
        as it does for a mail another client expunged meanwhile ("" stays an empty part)."""
        with _guard(f"reading mail UID {uid} in {self.selected!r}"):
            value = self.client.fetch([uid], [item]).get(uid, {}).get(key)
        if value is None:
            raise MailGone(f"mail UID {uid} is gone (expunged by another client meanwhile)")
        return value

    def uids_of_size(self, size: int) -> list[int]:
        """UIDs of the selected folder's mail of exactly this size (RFC822.SIZE)."""
        with _guard(f"searching {self.selected!r}"):
            return self.client.search(["LARGER", str(size - 1), "SMALLER", str(size + 1)])

    def examine(self, folder: str) -> int:
        """Select a folder read-only (EXAMINE); returns its UIDVALIDITY."""
        with _guard(f"opening folder {folder!r}"):
            info = self.client.select_folder(folder, readonly=True)
        self.selected = folder
        return int(info[b"UIDVALIDITY"])

    def delete_messages(self, uids: list[int]) -> bool:
        """Expunge exactly these UIDs; False (and nothing done) when the server lacks UIDPLUS,
        since a plain EXPUNGE would also remove mail the user marked deleted."""
        if not uids or "UIDPLUS" not in self.capabilities:
            return False
        with _guard(f"deleting mail in {self.selected!r}"):
            self.client.add_flags(uids, [imapclient.DELETED], silent=True)
            self.client.uid_expunge(uids)
        return True

    def move(self, uids: list[int], destination: str) -> None:
        if not uids:
            return
        with _guard(f"moving mail to {destination!r}"):
            if "MOVE" in self.capabilities:
                self.client.move(uids, destination)
            else:
                # Without MOVE: COPY, mark the originals deleted, and expunge only those UIDs.
                self.client.copy(uids, destination)
                self.client.add_flags(uids, [imapclient.DELETED], silent=True)
                if "UIDPLUS" in self.capabilities:
                    self.client.uid_expunge(uids)
                else:
                    self.client.expunge()

    def uidnext(self, folder: str) -> tuple[int, int]:
        """(UIDVALIDITY, UIDNEXT) of a folder by STATUS, without selecting it: they change
        whenever mail arrives."""
        with _guard(f"STATUS of {folder!r}"):
            status = self.client.folder_status(folder, ["UIDVALIDITY", "UIDNEXT"])
        return int(status.get(b"UIDVALIDITY", 0)), int(status.get(b"UIDNEXT", 0))

    # -- IDLE and NOTIFY (watch) ---------------------------------------------------------------

    def idle_start(self, folder: str) -> None:
        """Open the folder read-only and start IDLE (RFC 2177) on it."""
        self.examine(folder)
        with _guard(f"IDLE on {folder!r}"):
            self.client.idle()

    def notify_start(self, root: str) -> None:
        """Ask for a STATUS line whenever mail arrives in `root` or any folder below it (the
        whole personal namespace for root ""), then IDLE, so that the lines come at once:
        `NOTIFY SET (subtree ROOT (MessageNew))` (RFC 5465), for servers that offer NOTIFY."""
        if "NOTIFY" not in self.capabilities:
            raise MailServerError("the server does not offer NOTIFY")
        mailboxes = b"subtree " + _quoted(root) if root else b"personal"
        with _guard(f"NOTIFY on {root or 'all folders'!r}"):
            # imapclient has no NOTIFY; _raw_command sends a command it does not know, and
            # raises on BAD. The folder name is ASCII (modified UTF-7), so no literal is needed.
            typ, data = self.client._raw_command(b"NOTIFY", [b"SET", b"(" + mailboxes + b" (MessageNew))"],
                                                 uid=False)
            if typ != "OK":
                raise IMAPClientError(f"NOTIFY failed: {data[0].decode(errors='replace') if data else typ}")
            self.selected = None
            self.client.idle()

    def idle_wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds in IDLE; True when the server announced new mail."""
        return any(re.match(rb"\* \d+ (EXISTS|RECENT)", line) for line in self._idle_lines(timeout))

    def notify_wait(self, timeout: float) -> News:
        """Wait up to `timeout` seconds in IDLE with NOTIFY; what the server announced."""
        folders: set[str] = set()
        other = overflow = False
        for line in self._idle_lines(timeout):
            if b"[NOTIFICATIONOVERFLOW]" in line.upper():
                overflow = True
            elif line.upper().startswith(b"* STATUS "):
                name = _status_folder(line)
                if name is None:
                    other = True
                else:
                    folders.add(name)
            elif not re.match(rb"\* (OK|\d+ EXPUNGE)\b", line, re.IGNORECASE):
                other = True  # e.g. EXISTS: something changed, look
        return News(frozenset(folders), other, overflow)

    def _idle_lines(self, timeout: float) -> list[bytes]:
        """The server's untagged lines within `timeout` seconds of IDLE. Unlike imapclient's
        idle_check, a line is always read whole (pymap sends one response in pieces, which
        idle_check's non-blocking read cuts: "unterminated line"), and a connection closed by
        the server (BYE, or EOF) raises ServerUnreachable instead of returning nothing forever."""
        where = f"IDLE on {self.selected or 'all folders'!r}"
        lines: list[bytes] = []
        with _guard(where):
            poller = select.poll()
            poller.register(self.client.socket(), select.POLLIN)
            if not self._buffered() and not poller.poll(timeout * 1000):
                return lines
            while True:
                line = self._read_line()
                if line.upper().startswith(b"* BYE"):
                    raise ServerUnreachable(f"connection lost during {where} ({line[6:].decode(errors='replace')})")
                lines.append(line)
                if not self._buffered():
                    return lines

    def _buffered(self) -> bool:
        """Whether a response is waiting, already read from the socket or readable now."""
        sock = self.client.socket()
        timeout = sock.gettimeout()
        sock.settimeout(0.0)
        try:
            return bool(self.client._imap.file.peek(1))
        except (BlockingIOError, ssl.SSLWantReadError):
            return False
        finally:
            sock.settimeout(timeout)

    def _read_line(self) -> bytes:
        """One response line (blocking, with the session's timeout), any literal in it read
        along and put in its place as a quoted string (Dovecot 2.3 names a folder in a NOTIFY
        STATUS line as a literal in UTF-8, not in modified UTF-7)."""
        imap = self.client._imap
        line: bytes = imap._get_line()
        while (literal := re.search(rb"\{(\d+)\+?\}$", line)) is not None:
            text: bytes = imap.read(int(literal[1]))
            line = line[:literal.start()] + _quote(text) + imap._get_line()
        return line

    def idle_renew(self) -> bool:
        """End IDLE and start it again (servers may drop an IDLE after 30 minutes); True when
        the server announced new mail meanwhile."""
        news = self.idle_done()
        self.idle_resume()
        return news

    def idle_resume(self) -> None:
        """IDLE again after idle_done (on the same folder, or with the same NOTIFY)."""
        with _guard(f"IDLE on {self.selected or 'all folders'!r}"):
            self.client.idle()

    def idle_done(self) -> bool:
        """End IDLE; True when the server announced new mail just before (EXISTS, or a STATUS
        from NOTIFY), which the caller must not lose."""
        with _guard(f"IDLE on {self.selected or 'all folders'!r}"):
            _, responses = self.client.idle_done()
        return any(len(r) > 1 and (r[0] == b"STATUS" or r[1] in (b"EXISTS", b"RECENT")) for r in responses)

    def logout(self) -> None:
        _close(self.client)

    def abort(self) -> None:
        """Drop the connection without a LOGOUT round trip (on Ctrl-C, mid-response)."""
        try:
            self.client.shutdown()
        except Exception:
            pass


def login_refusal(where: str, who: str, text: str, acting_for: str | None = None) -> MailServerError:
    """The error for a NO on LOGIN as `who` (quoted: "'alice'", "'alice*gwsync'"). Only a refused
    credential locks it: no response code or an auth code (AUTHENTICATIONFAILED, ...). A server
    that is full or busy ([LIMIT], ...) turns the login away for now: transient, retried, never
    locked. A master user logging in `acting_for` a user and answered AUTHORIZATIONFAILED (RFC
    5530) had the right password, but may not act for that user: the account's refusal."""
    match = _RESPONSE_CODE.match(text)
    code = match.group(1).upper() if match else None
    if code == "AUTHORIZATIONFAILED" and acting_for is not None:
        refused = LoginFailed(f"{where}: the master user may log in, but not as {acting_for!r} ({text}); the server "
                              "has no such user, or its master user rules leave it out")
        refused.authorization = True
        return refused
    if code in TRANSIENT_LOGIN_CODES or (code is None and any(t in text.lower() for t in TRANSIENT_LOGIN_TEXTS)):
        busy = ServerUnreachable(f"{where}: the server turned the login as {who} away for now ({text}); "
                                 "the password was not refused")
        busy.server_answered = True
        return busy
    if code == "PRIVACYREQUIRED":
        return MailServerMisconfigured(f"{where}: the server takes the login as {who} only over TLS "
                                       f"({text}); set security = \"tls\" or \"starttls\"")
    return LoginFailed(f"{where}: login as {who} refused ({text})")


def certificate_problem(where: str, host: str, exc: ssl.SSLCertVerificationError,
                        names: list[str] | None = None) -> str:
    """What is wrong with the server's certificate, and what to set: the names it is for when
    they are not `host`, `ca_file` when no trusted CA signed it."""
    reason = exc.verify_message or str(exc)
    if exc.verify_code in _NAME_MISMATCH:
        listed = ", ".join(names) if names else "other names"
        hint = (f"; it names {host} as a DNS name, which does not cover the IP address: have it issued with "
                f"IP:{host}, or connect by a DNS name" if names and f"DNS:{host}" in names else "")
        return (f"{where}: the server's certificate is for {listed}, not for the host {host!r} ({reason}){hint}; "
                "set host to a name the certificate lists")
    return (f"{where}: certificate not trusted ({reason}); set ca_file to the certificate of the CA that "
            "signed it (PEM), or verify = false for a test server")


def _certificate_names(cfg: ImapConfig, context: ssl.SSLContext | None) -> list[str] | None:
    """The names (subjectAltName) of the server's certificate, read over a second connection
    that checks the CA but not the name; None when that fails too."""
    if context is None:
        return None
    relaxed = tls_context(cfg.verify, cfg.ca_file)
    relaxed.check_hostname = False
    try:
        if cfg.security == "tls":  # the handshake alone, no IMAP
            with socket.create_connection((cfg.host, cfg.port), timeout=cfg.timeout) as raw, \
                    relaxed.wrap_socket(raw, server_hostname=cfg.host) as tls:
                cert = tls.getpeercert() or {}
        else:
            client = imapclient.IMAPClient(cfg.host, port=cfg.port, ssl=False, timeout=cfg.timeout)
            try:
                client.starttls(relaxed)
                cert = client.socket().getpeercert() or {}
            finally:
                _close(client)
    except (OSError, IMAPClientError):
        return None
    return [f"{entry[0]}:{entry[1]}" for entry in cert.get("subjectAltName", ()) if len(entry) == 2] or None


def _close(client: imapclient.IMAPClient) -> None:
    try:
        client.logout()
    except Exception:
        try:
            client.shutdown()
        except Exception:
            pass


def _quoted(folder: str) -> bytes:
    """A folder name as an IMAP quoted string, in modified UTF-7."""
    return _quote(imap_utf7.encode(folder))


def _quote(text: bytes) -> bytes:
    return b'"' + text.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def _status_folder(line: bytes) -> str | None:
    """The folder a `* STATUS folder (...)` line names, decoded; None when it does not parse."""
    try:
        parsed = parse_response([line[2:]])
    except (IMAPClientError, ValueError):
        return None
    if len(parsed) < 2:
        return None
    name = parsed[1]
    if not isinstance(name, bytes):
        return str(name)  # a name of digits only parses as a number
    return name.decode("utf-8", "replace") if not name.isascii() else imap_utf7.decode(name)


def _text(exc: Exception) -> str:
    msg = str(exc)
    if msg.startswith("b'") or msg.startswith('b"'):
        msg = msg[2:-1]
    return msg

"""The IMAP adapter: a small, typed layer over imapclient for what the mail import needs.

Reading never sets \\Seen (BODY.PEEK only). Moving uses UID MOVE, or COPY + \\Deleted +
UID EXPUNGE where the server lacks MOVE.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import imapclient
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError, LoginError

from ..config import ImapConfig
from ..errors import LoginRefused, ServiceError, ServiceUnreachable
from .folders import ImportFolderName, is_below, last_element, parse_import_folder


class MailServerError(ServiceError):
    """The IMAP server refused something or the connection broke."""


class LoginFailed(LoginRefused, MailServerError):
    """The server rejected the credentials (AUTHENTICATIONFAILED or NO on LOGIN): exit 3."""


class ServerUnreachable(ServiceUnreachable, MailServerError):
    """Could not connect, or the connection dropped: transient, worth retrying."""


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
            raise MailServerError(f"IMAP {where}: certificate not trusted ({exc.verify_message}); "
                                  "set ca_file, or verify = false for a test server") from exc
        except (TimeoutError, OSError, IMAPClientError) as exc:
            raise ServerUnreachable(f"IMAP {where}: cannot connect ({exc})") from exc
        try:
            client.login(cfg.username, password)
        except LoginError as exc:
            _close(client)
            raise LoginFailed(f"IMAP {where}: login as {cfg.username!r} refused ({_text(exc)})") from exc
        except (TimeoutError, OSError, IMAPClientAbortError) as exc:
            raise ServerUnreachable(f"IMAP {where}: connection lost during login ({exc})") from exc
        except IMAPClientError as exc:  # e.g. LOGINDISABLED: the server takes no login over this connection
            _close(client)
            raise MailServerError(f"IMAP {where}: login as {cfg.username!r} not possible ({_text(exc)})") from exc
        with _guard(f"IMAP {where}: CAPABILITY"):
            return cls(client)

    # -- folders -----------------------------------------------------------------------------

    def import_folders(self, root: str) -> list[ImportFolder]:
        """Import folders at any depth below `root`, names decoded from modified UTF-7."""
        delimiter = self.delimiter(root)
        pattern = f"{root}{delimiter}*" if root and delimiter else "*"
        found = []
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
                if isinstance(exc, IMAPClientAbortError) or "ALREADYEXISTS" not in str(exc).upper():
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

    # -- IDLE (watch) -----------------------------------------------------------------------

    def idle_start(self, folder: str) -> None:
        """Open the folder read-only and start IDLE (RFC 2177) on it."""
        self.examine(folder)
        with _guard(f"IDLE on {folder!r}"):
            self.client.idle()

    def idle_wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds in IDLE; True when the server announced new mail."""
        with _guard(f"IDLE on {self.selected!r}"):
            responses = self.client.idle_check(timeout=timeout)
        return any(len(r) > 1 and r[1] in (b"EXISTS", b"RECENT") for r in responses)

    def idle_renew(self) -> None:
        """End IDLE and start it again (servers may drop an IDLE after 30 minutes)."""
        with _guard(f"IDLE on {self.selected!r}"):
            self.client.idle_done()
            self.client.idle()

    def idle_done(self) -> None:
        with _guard(f"IDLE on {self.selected!r}"):
            self.client.idle_done()

    def logout(self) -> None:
        _close(self.client)

    def abort(self) -> None:
        """Drop the connection without a LOGOUT round trip (on Ctrl-C, mid-response)."""
        try:
            self.client.shutdown()
        except Exception:
            pass


def _close(client: imapclient.IMAPClient) -> None:
    try:
        client.logout()
    except Exception:
        try:
            client.shutdown()
        except Exception:
            pass


def _text(exc: Exception) -> str:
    msg = str(exc)
    if msg.startswith("b'") or msg.startswith('b"'):
        msg = msg[2:-1]
    return msg

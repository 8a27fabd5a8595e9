"""Watching many accounts in one asyncio event loop, in one thread: one IMAP connection per account.

For a watcher job that serves a shard of a company's accounts. Per account (one task each):
1. log in, never with a credential that was refused: a refusal ends every account that sends
   the same credential, and until a credential has logged in once its logins go one at a time,
   so a wrong shared (master) password costs one refused login, not one per account;
2. find the import root, its separator and the import folders (NAMESPACE, LIST), as `gwsync
   watch` does;
3. where the server offers NOTIFY (RFC 5465): `NOTIFY SET (subtree ROOT (MessageNew))` and IDLE
   watch every folder below the root, new ones included. Elsewhere the connection IDLEs on the
   first import folder and, every `poll_every` seconds, lists the folders again and compares the
   others' UIDNEXT by STATUS (the one-connection plan of `gwsync watch`);
4. news from an import folder calls `changed(account)`, once per burst (`settle` seconds);
5. IDLE is ended and begun again every `renew` seconds, before servers drop it (RFC 2177 allows
   them to after 30 minutes);
6. a dropped connection is opened again after a backoff (doubled per failure up to `max_backoff`,
   with jitter, so that a restarted server is not hit by every account at once), and `changed`
   is called once after every new connection, since mail may have come while none watched
   (`look_at_start=False` leaves that out for the first connection, where the caller's
   periodic syncs cover what came before the watch).
`stop_event` ends every connection (DONE, LOGOUT) and returns.

The IMAP client is a small protocol of its own on asyncio streams, not aioimaplib (2.0.3, the
maintained asyncio client), measured against it: aioimaplib allows IDLE only with a folder
selected and sends no command it does not know (NOTIFY would mean patching its command table),
and it hands a STATUS line whose folder is a literal (as Dovecot sends them after NOTIFY) over
in pieces; its connections took twice the memory (16.1 against 7.9 kB each for 1,000 in IDLE).
Watching needs a dozen commands; what it reads is parsed by imapclient's parser.

Callbacks run in the event loop: `changed` must not block (defer a job and return, or be a
coroutine function). Used from a Procrastinate job, for example:

    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(25 * 60, stop.set)  # then the job defers itself again
    await watch_accounts(targets, lambda name: sync.defer_async(account=name), stop, refused=lock)
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import logging
import random
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from imapclient import imap_utf7
from imapclient.response_parser import parse_response

from ..config import AccountConfig, ImapConfig
from ..errors import CredentialLocked, GwsyncError, LoginRefused
from .folders import is_below, last_element, parse_import_folder
from .imap import (
    MailServerError,
    MailServerMisconfigured,
    ServerUnreachable,
    _quote,
    _quoted,
    _status_folder,
    certificate_problem,
    login_refusal,
    tls_context,
)

log = logging.getLogger("gwsync.asyncwatch")

IDLE_RENEW = 24 * 60  # seconds; servers may drop an IDLE after 30 minutes (RFC 2177)
POLL_EVERY = 30.0  # seconds between LIST + STATUS polls where the server has no NOTIFY
SETTLE = 0.2  # seconds: news within this time after the first make one call of changed()
MAX_BACKOFF = 300.0
MAX_CONNECTING = 32  # connections being opened (TCP, TLS, login) at once, over all accounts
STEADY = 60.0  # seconds a connection must have watched before its drop starts the backoff anew
MAX_LINE = 1 << 20  # a watch reads short lines only; a longer one is a broken server
_LITERAL = re.compile(rb"\{(\d+)\+?\}$")


@dataclass(frozen=True)
class WatchTarget:
    """One account to watch: where and how to log in. `credential` names what the login sends:
    accounts with the same one are stopped together when it is refused (a master user's)."""

    name: str
    imap: ImapConfig
    password: str = field(repr=False)
    authzid: str | None = None  # SASL PLAIN with this authorization identity (a master login)
    credential: str = ""

    @property
    def credential_key(self) -> str:
        if self.credential:
            return self.credential
        where = self.imap.secret.where if self.imap.secret is not None else self.name
        # A master user's password is one credential for every account that sends it.
        return f"{self.imap.login_user}@{self.imap.host.lower()} ({where})"

    @property
    def where(self) -> str:
        return f"IMAP {self.imap.host}:{self.imap.port}"


def target_of(account: AccountConfig) -> WatchTarget:
    """The account as a watch target; its password is read now (ConfigError when it cannot be)."""
    if account.imap is None:
        raise GwsyncError(f"account {account.name} has no [accounts.{account.name}.imap] table")
    return WatchTarget(name=account.name, imap=account.imap, password=account.imap.secret.resolve())


@dataclass
class AccountWatch:
    """What the watch of one account does now, for status pages and tests."""

    state: str = "starting"  # connecting, idle, backoff, refused, stopped
    mode: str = ""  # "notify" or "idle <folder>"
    connects: int = 0  # connections that reached IDLE
    renewals: int = 0
    changes: int = 0  # calls of changed()
    error: str = ""  # the last error, while backing off or refused


@dataclass
class WatchStatus:
    accounts: dict[str, AccountWatch] = field(default_factory=dict)

    def count(self, state: str) -> int:
        return sum(1 for a in self.accounts.values() if a.state == state)


Changed = Callable[[str], Awaitable[None] | None]
Refused = Callable[[str, LoginRefused], Awaitable[None] | None]


async def watch_accounts(accounts: Iterable[WatchTarget], changed: Changed, stop_event: asyncio.Event, *,
                         refused: Refused | None = None, status: WatchStatus | None = None,
                         renew: float = IDLE_RENEW, poll_every: float = POLL_EVERY, settle: float = SETTLE,
                         max_backoff: float = MAX_BACKOFF, max_connecting: int = MAX_CONNECTING,
                         look_at_start: bool = True) -> None:
    """Watch every account on one connection each until `stop_event` is set (or this is
    cancelled). `changed(name)` is called (and awaited, if it is a coroutine function) when mail
    comes into one of the account's import folders; `refused(name, error)` once per credential
    the server refused (the caller locks it); no account that sends it logs in again.
    Account names must be unique; a password is not read again (a refused one waits for the
    next watch). Open connections are limited to `max_connecting` at a time."""
    watch = _Watch(changed, refused, status or WatchStatus(), renew, poll_every, settle, max_backoff,
                   asyncio.Semaphore(max_connecting), look_at_start)
    tasks = [asyncio.create_task(watch.run(target), name=f"watch-{target.name}") for target in accounts]
    try:
        await stop_event.wait()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await watch.quiet()


class _Watch:
    def __init__(self, changed: Changed, refused: Refused | None, status: WatchStatus, renew: float,
                 poll_every: float, settle: float, max_backoff: float, connecting: asyncio.Semaphore,
                 look_at_start: bool):
        self.changed, self.refused, self.status = changed, refused, status
        self.renew, self.poll_every, self.settle, self.max_backoff = renew, poll_every, settle, max_backoff
        self.connecting, self.look_at_start = connecting, look_at_start
        self.good: set[str] = set()  # credentials that logged in once
        self.bad: set[str] = set()  # credentials the server refused
        self.trying: dict[str, asyncio.Lock] = {}  # one login at a time per credential not known good
        self.pending: dict[str, asyncio.TimerHandle] = {}
        self.calls: set[asyncio.Task] = set()

    # -- news, coalesced ---------------------------------------------------------------------

    def news(self, name: str) -> None:
        if name not in self.pending:
            self.pending[name] = asyncio.get_running_loop().call_later(self.settle, self._fire, name)

    def _fire(self, name: str) -> None:
        self.pending.pop(name, None)
        self.status.accounts[name].changes += 1
        try:
            result = self.changed(name)
        except Exception:  # the caller's fault must not end the watch of every account
            log.exception("changed(%r) failed", name)
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            self.calls.add(task)
            task.add_done_callback(self._called)

    def _called(self, task: asyncio.Task) -> None:
        self.calls.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("changed() failed: %s", task.exception())

    async def quiet(self) -> None:
        """Cancel the calls not yet made; give those running a moment to finish."""
        for handle in self.pending.values():
            handle.cancel()
        self.pending.clear()
        if self.calls:
            _, running = await asyncio.wait(self.calls, timeout=5)
            for task in running:
                task.cancel()

    # -- one account -------------------------------------------------------------------------

    async def run(self, target: WatchTarget) -> None:
        me = self.status.accounts.setdefault(target.name, AccountWatch())
        backoff = 1.0
        try:
            while True:
                me.state = "connecting"
                try:
                    conn = await self._login(target)
                except (LoginRefused, CredentialLocked) as exc:
                    me.state, me.error = "refused", str(exc)
                    return
                except Exception as exc:  # a watch outlives any server's fault: wait, and connect again
                    backoff = await self._backoff(target, me, exc, backoff)
                    continue
                since = time.monotonic()
                try:
                    await self._watch(target, conn, me)
                except asyncio.CancelledError:
                    await conn.logout()
                    raise
                except Exception as exc:
                    conn.close()
                    if time.monotonic() - since > STEADY:  # it watched a while: a fresh drop, not a fault
                        backoff = 1.0
                    backoff = await self._backoff(target, me, exc, backoff)
        finally:
            if me.state != "refused":
                me.state = "stopped"

    async def _backoff(self, target: WatchTarget, me: AccountWatch, exc: BaseException, backoff: float) -> float:
        me.state, me.error = "backoff", str(exc) or type(exc).__name__
        pause = backoff * random.uniform(0.5, 1.0)
        # A dropped connection or a busy server is routine; anything else (a certificate that
        # does not fit, a server that takes no login) needs someone to act.
        expected = isinstance(exc, (OSError, TimeoutError)) or getattr(exc, "transient", False)
        log.log(logging.INFO if expected else logging.WARNING, "watch of %s: %s; connecting again in %.1f s",
                target.name, me.error, pause, exc_info=not isinstance(exc, (GwsyncError, OSError, TimeoutError)))
        await asyncio.sleep(pause)
        return min(backoff * 2, self.max_backoff)

    async def _login(self, target: WatchTarget) -> _Connection:
        key = target.credential_key
        if key in self.bad:
            raise CredentialLocked(f"account {target.name}: login refused earlier")
        if key in self.good:
            async with self.connecting:
                return await self._open(target, key)
        async with self.trying.setdefault(key, asyncio.Lock()):  # its first login goes alone
            if key in self.bad:
                raise CredentialLocked(f"account {target.name}: login refused earlier")
            async with self.connecting:
                return await self._open(target, key)

    async def _open(self, target: WatchTarget, key: str) -> _Connection:
        try:
            conn = await _Connection.open(target)
        except LoginRefused as exc:
            if exc.authorization:  # the master user may not act for this user: this account only
                key = f"{key} for {target.name}"
            first = key not in self.bad
            self.bad.add(key)
            if first:
                log.warning("watch of %s: %s; no account logs in with this credential again", target.name, exc)
                if self.refused is not None:
                    result = self.refused(target.name, exc)
                    if inspect.isawaitable(result):
                        await result
            raise
        self.good.add(key)
        return conn

    async def _watch(self, target: WatchTarget, conn: _Connection, me: AccountWatch) -> None:
        """Watch on this connection until it drops (raises) or the task is cancelled."""
        plan = await _Plan.of(conn, target.imap)
        if plan.notify:
            try:
                await conn.notify(plan.root)
            except _Refused as exc:  # offered, yet refused: watch as where it is not offered
                log.warning("watch of %s: %s; watching with IDLE and polls instead", target.name, exc)
                plan = await _Plan.of(conn, target.imap, notify=False)
        if plan.notify:
            me.mode = "notify"
        else:
            me.mode = f"idle {plan.idle_on}" if plan.idle_on else "poll"
        seen = await plan.poll(conn)
        await plan.idle(conn)  # what comes before is covered by the news() below
        me.state, me.connects, me.error = "idle", me.connects + 1, ""
        if me.connects > 1 or self.look_at_start:
            self.news(target.name)  # mail may have come while no connection watched
        renewed = polled = time.monotonic()
        while True:
            now = time.monotonic()
            due_poll = polled + self.poll_every if plan.polls else float("inf")
            due = min(renewed + self.renew, due_poll)
            lines = await conn.idle_wait(max(0.0, due - now))
            if plan.wakes(lines):
                self.news(target.name)
            if plan.notify and any(b"[NOTIFICATIONOVERFLOW]" in line.upper() for line in lines):
                await conn.idle_done()  # the server stopped notifying: ask again
                await conn.notify(plan.root)
                await plan.idle(conn)
            now = time.monotonic()
            if now >= due_poll:
                if plan.wakes(await conn.idle_done()):
                    self.news(target.name)
                fresh = await _Plan.of(conn, target.imap, notify=False)
                found = await fresh.poll(conn)
                if found != seen or fresh.idle_on != plan.idle_on:
                    self.news(target.name)
                plan, seen = fresh, found
                if plan.wakes(await plan.idle(conn)):
                    self.news(target.name)
                me.mode = f"idle {plan.idle_on}" if plan.idle_on else "poll"
                polled = renewed = time.monotonic()
            elif now >= renewed + self.renew:
                if plan.wakes(await conn.idle_done()):
                    self.news(target.name)
                if plan.wakes(await plan.idle(conn)):
                    self.news(target.name)
                me.renewals += 1
                renewed = time.monotonic()


@dataclass
class _Plan:
    """What one connection watches: with NOTIFY every folder below `root`; else IDLE on
    `idle_on` and STATUS polls of `polled` (and of nothing, when no import folder exists yet:
    the LIST of each poll finds new ones)."""

    notify: bool
    root: str
    delimiter: str | None
    own: str  # the import folder itself, whose own mail is imported, or ""
    idle_on: str = ""
    polled: tuple[str, ...] = ()

    @property
    def polls(self) -> bool:
        return not self.notify

    @classmethod
    async def of(cls, conn: _Connection, cfg: ImapConfig, notify: bool = True) -> _Plan:
        root = await conn.import_root(cfg.import_root)
        if cfg.import_folder is not None and not await conn.exists(cfg.import_folder):
            await conn.create(cfg.import_folder)  # its own mail is watched too, from the start (as a sync makes it)
        delimiter = await conn.delimiter(root)
        own = root if cfg.import_folder is not None else ""
        if notify and "NOTIFY" in conn.capabilities:
            return cls(True, root, delimiter, own)
        folders = await conn.import_folders(root, delimiter, own)
        return cls(False, root, delimiter, own, folders[0] if folders else "", tuple(folders[1:]))

    def is_import_folder(self, name: str) -> bool:
        if self.own and name == self.own:
            return True
        if self.root and not is_below(name, self.root, self.delimiter):
            return False
        return parse_import_folder(last_element(name, self.delimiter)) is not None

    async def idle(self, conn: _Connection) -> list[bytes]:
        """IDLE as planned; without IDLE, or with nothing to IDLE on, the polls do it all."""
        if "IDLE" not in conn.capabilities or not (self.notify or self.idle_on):
            return []
        if not self.notify and conn.selected != self.idle_on:
            # Selected once: mail that comes between DONE and the next IDLE is then announced
            # with the next IDLE, where a fresh EXAMINE would count it in silently.
            await conn.command(b"EXAMINE", _quoted(self.idle_on))
            conn.selected = self.idle_on
        return await conn.idle_start()

    async def poll(self, conn: _Connection) -> dict[str, tuple[int, int]]:
        return {folder: await conn.uidnext(folder) for folder in (self.polled if not self.notify else ())}

    def wakes(self, lines: list[bytes]) -> bool:
        """Whether the server's lines in IDLE announce mail in an import folder."""
        for line in lines:
            upper = line.upper()
            if b"[NOTIFICATIONOVERFLOW]" in upper:
                return True  # the server stopped notifying: look (and ask again)
            if upper.startswith(b"* STATUS "):
                name = _status_folder(line)
                if name is None or self.is_import_folder(name):
                    return True
            elif not re.match(rb"\* (OK|NO|\d+ (EXPUNGE|FETCH))\b", upper):
                return True  # EXISTS, RECENT, or something unforeseen: look
        return False


class _Connection:
    """One IMAP connection on asyncio streams: what a watch sends, nothing more."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: WatchTarget):
        self.reader, self.writer, self.target = reader, writer, target
        self.timeout = target.imap.timeout
        self.capabilities: set[str] = set()
        self.tag = 0
        self.idling: bytes | None = None  # the tag of the IDLE running
        self.selected = ""  # the folder EXAMINEd
        self.separator: tuple[str | None] | None = None

    @classmethod
    async def open(cls, target: WatchTarget) -> _Connection:
        cfg = target.imap
        context = tls_context(cfg.verify, cfg.ca_file) if cfg.security != "none" else None
        try:
            async with asyncio.timeout(cfg.timeout):
                reader, writer = await asyncio.open_connection(
                    cfg.host, cfg.port, ssl=context if cfg.security == "tls" else None, limit=MAX_LINE)
        except ssl.SSLCertVerificationError as exc:
            raise MailServerMisconfigured(certificate_problem(target.where, cfg.host, exc)) from None
        except (TimeoutError, OSError) as exc:
            raise ServerUnreachable(f"{target.where}: cannot connect ({exc or type(exc).__name__})") from exc
        conn = cls(reader, writer, target)
        try:
            await conn._start(context)
        except BaseException:
            conn.close()
            raise
        return conn

    async def _start(self, context) -> None:
        cfg = self.target.imap
        greeting = await self.read_line()
        if greeting.upper().startswith(b"* BYE"):
            raise ServerUnreachable(f"{self.target.where}: the server refused the connection ({_text(greeting)})")
        self._capabilities_from(greeting)
        if cfg.security == "starttls":
            await self.command(b"STARTTLS")
            async with asyncio.timeout(self.timeout):
                await self.writer.start_tls(context, server_hostname=cfg.host)
            self.capabilities = set()
        if not greeting.upper().startswith(b"* PREAUTH"):
            await self._login()
        if not self.capabilities or "IMAP4REV1" not in self.capabilities:
            await self._capability()

    async def _login(self) -> None:
        cfg, target = self.target.imap, self.target
        # The config's master user, as ImapSession logs in: USER*MASTER, or SASL PLAIN for USER.
        authcid, authzid = (cfg.username, target.authzid) if target.authzid is not None else cfg.login()
        acting_for = authzid or (cfg.username if cfg.login_user != cfg.username else None)
        if authzid is not None:
            token = base64.b64encode(f"{authzid}\0{authcid}\0{target.password}".encode())
            args: tuple = (b"PLAIN", token) if "SASL-IR" in self.capabilities else (b"PLAIN",)
            command, continuation = b"AUTHENTICATE", None if "SASL-IR" in self.capabilities else token
        else:
            args, command, continuation = (_astring(authcid), _astring(target.password)), b"LOGIN", None
        who = authcid if authzid is None else f"{authzid} (SASL PLAIN, authenticated as {authcid})"
        try:
            _, text = await self.command(command, *args, continuation=continuation)
        except _Refused as exc:
            if exc.bad:
                raise MailServerError(f"{target.where}: login as {who!r} not possible ({exc.text})") from None
            raise login_refusal(target.where, who, exc.text, acting_for=acting_for) from None
        self.capabilities = set()  # those after login may differ: from the answer, or asked for
        self._capabilities_from(b"* OK " + text)

    def _capabilities_from(self, line: bytes) -> None:
        match = re.search(rb"\[CAPABILITY ([^\]]*)\]", line, re.IGNORECASE)
        if match:
            self.capabilities = {c.decode("ascii", "replace").upper() for c in match[1].split()}

    async def _capability(self) -> None:
        lines, _ = await self.command(b"CAPABILITY")
        for line in lines:
            if line.upper().startswith(b"* CAPABILITY "):
                self.capabilities = {c.decode("ascii", "replace").upper() for c in line.split()[2:]}

    # -- lines and commands ------------------------------------------------------------------

    async def read_line(self) -> bytes:
        """One response line, any literal in it read along and put in its place as a quoted
        string (Dovecot names the folder of a NOTIFY STATUS line as a literal)."""
        line = await self._raw_line()
        while (literal := _LITERAL.search(line)) is not None:
            size = int(literal[1])
            if size > MAX_LINE:
                raise ServerUnreachable(f"{self.target.where}: a literal of {size} bytes in a watch response")
            text = await self.reader.readexactly(size)
            line = line[:literal.start()] + _quote(text) + await self._raw_line()
        return line

    async def _raw_line(self) -> bytes:
        try:
            line = await self.reader.readuntil(b"\r\n")
        except asyncio.IncompleteReadError as exc:
            raise ServerUnreachable(f"{self.target.where}: the server closed the connection") from exc
        except asyncio.LimitOverrunError as exc:
            raise ServerUnreachable(f"{self.target.where}: a response line longer than {MAX_LINE} bytes") from exc
        return line[:-2]

    async def command(self, name: bytes, *args: bytes, continuation: bytes | None = None
                      ) -> tuple[list[bytes], bytes]:
        """Send a command and read its untagged lines and the text of its tagged OK; _Refused
        on NO or BAD, ServerUnreachable on BYE or a closed connection."""
        self.tag += 1
        tag = b"W%d" % self.tag
        self.writer.write(b" ".join((tag, name, *args)) + b"\r\n")
        lines: list[bytes] = []
        async with asyncio.timeout(self.timeout):
            await self.writer.drain()
            while True:
                line = await self.read_line()
                if line.startswith(tag + b" "):
                    status, _, text = line[len(tag) + 1:].partition(b" ")
                    if status.upper() != b"OK":
                        raise _Refused(f"{name.decode()} {_text(text)}", text, status.upper() == b"BAD")
                    return lines, text
                if line.startswith(b"+"):
                    self.writer.write((continuation or b"*") + b"\r\n")  # "*": cancel what we cannot answer
                    continuation = None
                    continue
                if line.upper().startswith(b"* BYE") and name != b"LOGOUT":
                    raise ServerUnreachable(f"{self.target.where}: the server closed the connection ({_text(line)})")
                lines.append(line)

    # -- folders -----------------------------------------------------------------------------

    async def import_root(self, configured: str) -> str:
        """As ImapSession.import_root: as configured, or "" as the top of the personal namespace."""
        if configured:
            return configured
        prefix = ""
        if "NAMESPACE" in self.capabilities:
            lines, _ = await self.command(b"NAMESPACE")
            for line in lines:
                if line.upper().startswith(b"* NAMESPACE "):
                    personal = parse_response([line[12:]])[0]
                    prefix = _decoded(personal[0][0]) if personal else ""
        sep = await self.delimiter("")
        return prefix[:-len(sep)] if sep and prefix.endswith(sep) else prefix

    async def list_folders(self, pattern: str) -> list[tuple[tuple, str | None, str]]:
        lines, _ = await self.command(b"LIST", b'""', _quoted(pattern))
        found = []
        for line in lines:
            if line.upper().startswith(b"* LIST "):
                flags, delim, name = parse_response([line[7:]])[:3]
                found.append((tuple(f.upper() for f in flags), _decoded(delim) if delim else None, _decoded(name)))
        return found

    async def exists(self, folder: str) -> bool:
        return bool(await self.list_folders(folder))

    async def create(self, folder: str) -> None:
        try:
            await self.command(b"CREATE", _quoted(folder))
        except _Refused:
            if not await self.exists(folder):  # another client may have made it meanwhile
                raise

    async def delimiter(self, root: str) -> str | None:
        listing = await self.list_folders(root or "INBOX")
        if not listing:
            raise MailServerError(f"import root {root!r} does not exist on the server (check import_root)")
        return listing[0][1]

    async def import_folders(self, root: str, delimiter: str | None, own: str) -> list[str]:
        """The import folders below `root` (and `own` itself), as ImapSession.import_folders."""
        found = []
        if own:
            listing = await self.list_folders(own)
            if listing and b"\\NOSELECT" not in listing[0][0]:
                found.append(own)
        pattern = f"{root}{delimiter}*" if root and delimiter else "*"
        for flags, delim, name in await self.list_folders(pattern):
            if b"\\NOSELECT" in flags or (root and not is_below(name, root, delim)):
                continue
            if parse_import_folder(last_element(name, delim)) is not None:
                found.append(name)
        return sorted(found)

    async def uidnext(self, folder: str) -> tuple[int, int]:
        lines, _ = await self.command(b"STATUS", _quoted(folder), b"(UIDVALIDITY UIDNEXT)")
        for line in lines:
            match = re.search(rb"UIDVALIDITY (\d+).*?UIDNEXT (\d+)|UIDNEXT (\d+).*?UIDVALIDITY (\d+)", line, re.I)
            if match:
                v, n = (match[1], match[2]) if match[1] else (match[4], match[3])
                return int(v), int(n)
        return 0, 0

    # -- NOTIFY and IDLE ---------------------------------------------------------------------

    async def notify(self, root: str) -> None:
        """`NOTIFY SET (subtree ROOT (MessageNew))` (RFC 5465): a STATUS line for every mail
        that comes into the root or any folder below it (all personal folders for root "")."""
        mailboxes = b"subtree " + _quoted(root) if root else b"personal"
        await self.command(b"NOTIFY", b"SET", b"(" + mailboxes + b" (MessageNew))")

    async def idle_start(self) -> list[bytes]:
        """Begin IDLE; the lines that came before the server's "+" are returned as news."""
        self.tag += 1
        tag = b"W%d" % self.tag
        self.writer.write(tag + b" IDLE\r\n")
        lines: list[bytes] = []
        async with asyncio.timeout(self.timeout):
            await self.writer.drain()
            while True:
                line = await self.read_line()
                if line.startswith(b"+"):
                    self.idling = tag
                    return lines
                if line.startswith(tag + b" "):
                    raise MailServerError(f"{self.target.where}: IDLE refused ({_text(line)})")
                self._check_bye(line)
                lines.append(line)

    async def idle_wait(self, timeout: float) -> list[bytes]:
        """The next line the server sends in IDLE, if one comes within `timeout` seconds."""
        try:
            async with asyncio.timeout(timeout):
                line = await self.read_line()
        except TimeoutError:
            return []
        self._check_bye(line)
        return [line]

    async def idle_done(self) -> list[bytes]:
        """End IDLE; the lines that came meanwhile (news the caller must not lose)."""
        tag, self.idling = self.idling, None
        if tag is None:
            return []
        self.writer.write(b"DONE\r\n")
        lines: list[bytes] = []
        async with asyncio.timeout(self.timeout):
            await self.writer.drain()
            while True:
                line = await self.read_line()
                if line.startswith(tag + b" "):
                    return lines
                self._check_bye(line)
                lines.append(line)

    def _check_bye(self, line: bytes) -> None:
        if line.upper().startswith(b"* BYE"):
            raise ServerUnreachable(f"{self.target.where}: the server closed the connection ({_text(line)})")

    async def logout(self) -> None:
        """End IDLE and log out without waiting long for the answer (on stop)."""
        try:
            if self.idling is not None:
                self.writer.write(b"DONE\r\n")
            self.writer.write(b"WZ LOGOUT\r\n")
            async with asyncio.timeout(1.0):
                await self.writer.drain()
                while not (await self.read_line()).startswith(b"WZ "):
                    pass
        except (OSError, GwsyncError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            self.close()

    def close(self) -> None:
        self.writer.close()  # the transport closes at once; nothing is left to wait for


class _Refused(MailServerError):
    """A NO or BAD to a command."""

    def __init__(self, message: str, text: bytes, bad: bool):
        super().__init__(message)
        self.text = _text(text)
        self.bad = bad


def _astring(value: str) -> bytes:
    """A quoted string, or a literal where quoting cannot carry the value (8-bit, CR, LF)."""
    raw = value.encode()
    if raw.isascii() and b"\r" not in raw and b"\n" not in raw and b"\0" not in raw:
        return _quote(raw)
    return b"{%d+}\r\n" % len(raw) + raw  # LITERAL+ (RFC 7888); Dovecot, Cyrus and pymap have it


def _decoded(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace") if not value.isascii() else imap_utf7.decode(value)
    return str(value)  # a name of digits only parses as a number


def _text(line: bytes) -> str:
    return line.decode("utf-8", "replace").strip()

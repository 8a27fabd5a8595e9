"""gwsync's own errors: one line for the user, the exit code, and whether trying again may help.

This is the one vocabulary of failures. Each adapter turns its library's errors into these at
its own edge, in every method: the IMAP session (imap.py), the CalDAV collection (dav.py), the
ManageSieve client (sieve.py), the stores (dbfiles.py, crmstore.py). The command line turns them
into `gwsync: <message>` and the exit code in one place (the `main` group in cli.py): 2 for a
config or usage error, 3 for a refused login or a locked credential, 1 for everything else.

Errors of the environment (a full disk, a read-only, locked or damaged database) are StoreErrors:
they stop a run, count against no mail, and leave mail where it was. A ServiceError is one
server's refusal or fault; the run goes on with the other areas and accounts.
"""

from __future__ import annotations

import copy
import errno
import os
import sqlite3
import ssl
from pathlib import Path
from typing import Self

EXIT_FAILED, EXIT_USAGE, EXIT_LOCKED = 1, 2, 3


class GwsyncError(Exception):
    """A failure with a message fit for the user: it names the item and says what to do."""

    exit_code = EXIT_FAILED
    transient = False  # the same run later may succeed (a lock released, a server back)
    prefix = ""  # put before the message on the command line, e.g. "config error: "

    def __init__(self, message: str, exit_code: int | None = None, transient: bool | None = None):
        super().__init__(message)
        self.message = message
        if exit_code is not None:
            self.exit_code = exit_code
        if transient is not None:
            self.transient = transient

    def __str__(self) -> str:
        return self.message

    @property
    def line(self) -> str:
        """The one line the command line prints after `gwsync: `."""
        return self.prefix + self.message

    def reworded(self, message: str) -> Self:
        """The same error (its class, exit code, transience) with another message, e.g. one
        that names the account."""
        other = copy.copy(self)
        other.message = message
        other.args = (message,)
        return other


class UsageError(GwsyncError, ValueError):
    """A command was given something it cannot use (an unknown id, a malformed address)."""

    exit_code = EXIT_USAGE


class ConfigError(GwsyncError):
    """A missing, unknown or malformed config key, or a password source that gives none."""

    exit_code = EXIT_USAGE
    prefix = "config error: "


class NotFound(GwsyncError, LookupError):
    """The item named (an activity, a rule) does not exist."""


class Busy(GwsyncError):
    """Another run holds what this one needs (an account, the watch lock)."""

    transient = True


class StoreError(GwsyncError):
    """A database or the document store cannot be used: the environment's fault, never a mail's."""

    def __init__(self, message: str, path: Path, exit_code: int | None = None, transient: bool | None = None):
        super().__init__(message, exit_code, transient)
        self.path = path


class ServiceError(GwsyncError):
    """A server (IMAP, CalDAV, ManageSieve) refused a request or failed."""


class ServiceUnreachable(ServiceError):
    """No connection, a dropped one, a timeout, or a server error (5xx): worth another try."""

    transient = True


class ServiceMisconfigured(ServiceError):
    """The server cannot be used as the config says (its certificate does not fit the host or
    the trusted CAs, it takes logins only over TLS): the config must change, so exit 2 and no
    retry."""

    exit_code = EXIT_USAGE


class LoginRefused(ServiceError):
    """The server refused the credential. The engine locks it: exit 3."""

    exit_code = EXIT_LOCKED
    locked = False  # True once the engine has locked the credential (and said so in the message)
    # True: the credential was right, but it may not act for this user (a master user's login
    # answered AUTHORIZATIONFAILED): the account is locked, not the credential every account sends.
    authorization = False


class CredentialLocked(GwsyncError):
    """An earlier login with this credential was refused; gwsync does not send it again."""

    exit_code = EXIT_LOCKED


# Where the config names each store, for the messages that ask to fix a path.
SETTINGS = {"CRM database": "[crm] database", "state database": "[state] database",
            "document store": "[crm] documents"}
SQLITE_HEADER = b"SQLite format 3\x00"
AGAIN = "then run gwsync again"

# SQLite's primary result codes (https://sqlite.org/rescode.html).
_PERM, _BUSY, _LOCKED, _READONLY, _IOERR, _CORRUPT, _FULL, _CANTOPEN, _NOTADB = 3, 5, 6, 8, 10, 11, 13, 14, 26
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}


def _setting(what: str) -> str:
    return SETTINGS.get(what, "its path")


def _read_only(path: Path) -> bool:
    """The file or, when it does not exist yet, its directory cannot be written (a read-only
    mount, permissions, an immutable flag)."""
    target = path if path.exists() else path.parent
    try:
        if os.statvfs(target).f_flag & os.ST_RDONLY:
            return True
    except OSError:
        return False
    return not os.access(target, os.W_OK) or (path.exists() and not os.access(path.parent, os.W_OK))


def _disk_full(path: Path) -> bool:
    """Too little space left next to the file for SQLite's journal and shared memory files."""
    try:
        stats = os.statvfs(path.parent)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < 64 * 1024


def _has_sqlite_header(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(SQLITE_HEADER)) == SQLITE_HEADER
    except OSError:
        return False


def _corrupt_hint(what: str) -> str:
    if what == "state database":  # it can be rebuilt: the CRM's keys keep every mail from a second import
        return "move it away (gwsync starts a new one; no mail is lost or imported twice), or restore it from a backup"
    return "restore it from a backup, or move it away to start an empty one"


def full(what: str, path: Path) -> StoreError:
    return StoreError(f"disk full writing the {what} {path}: free space, {AGAIN}", path)


def read_only(what: str, path: Path, detail: str) -> StoreError:
    return StoreError(f"the {what} {path} is read-only ({detail}): make it and its directory writable, {AGAIN}",
                      path)


def is_directory(what: str, path: Path) -> StoreError:
    return StoreError(f"the {what} {path} is a directory, not a file: point {_setting(what)} at a file "
                      "(the directory stays as it is)", path, exit_code=EXIT_USAGE)


def database_fault(exc: sqlite3.Error, path: Path, what: str) -> StoreError | None:
    """The StoreError for an SQLite error that the environment caused, or None for one that
    is a bug (a constraint, bad SQL): those must surface as they are."""
    code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
    detail = str(exc)
    if path.is_dir():
        return is_directory(what, path)
    if code == _FULL or (code in (_IOERR, _CANTOPEN) and _disk_full(path)):
        return full(what, path)
    if code in (_BUSY, _LOCKED) and "locked" in detail:  # not "statements in progress", also BUSY
        return StoreError(f"the {what} {path} is locked by another program ({detail}): wait until it is done "
                          f"or stop it, {AGAIN}", path, transient=True)
    if code in (_CORRUPT, _NOTADB):
        if code == _NOTADB and not _has_sqlite_header(path):
            return StoreError(f"the {what} {path} is not an SQLite database ({detail}): check {_setting(what)} "
                              "in the config, or move the file away if it is a damaged database", path)
        return StoreError(f"the {what} {path} is corrupt ({detail}): {_corrupt_hint(what)}", path)
    if code in (_READONLY, _PERM) or (code in (_CANTOPEN, _IOERR) and _read_only(path)):
        return read_only(what, path, detail)
    if code == _CANTOPEN:
        return StoreError(f"cannot open the {what} {path} ({detail}): check that its directory exists and is "
                          f"writable, {AGAIN}", path)
    if code == _IOERR:
        return StoreError(f"cannot read or write the {what} {path} ({detail}): check the disk, {AGAIN}", path)
    return None


def file_fault(exc: OSError, path: Path, what: str) -> StoreError | None:
    """The StoreError for an OSError met while gwsync wrote or opened one of its own files, or
    None for one that did not come from the file system (a dropped socket is an OSError too)."""
    if isinstance(exc, (ConnectionError, ssl.SSLError)) or exc.errno is None:
        return None
    detail = exc.strerror or str(exc)
    if exc.errno in _DISK_FULL:
        return full(what, path)
    if exc.errno in _NOT_WRITABLE:
        return read_only(what, path, detail)
    if exc.errno in (errno.EISDIR, errno.ENOTDIR):
        return StoreError(f"the {what} {path}: {detail}: {_setting(what)} or one of its parent directories "
                          "is the wrong kind of file; point it at another path", path, exit_code=EXIT_USAGE)
    if exc.errno == errno.EIO:
        return StoreError(f"cannot read or write the {what} {path} ({detail}): check the disk, {AGAIN}", path)
    return None

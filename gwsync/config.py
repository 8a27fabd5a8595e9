"""The TOML config (README: Configure): each key declared once, checked at load, one-line errors.

Each key is a field of one of the dataclasses below: its name, type and default, and in
`Annotated[..., Meta(...), Says(...)]` its range and the words for a value outside it. A
default that follows other keys is marked `DERIVED` and filled in one place: the
`__post_init__` of the table that holds what it follows, or `AccountConfig._complete` for
what needs the account's name ([sieve] from [imap]). Loading goes in this order:

1. unknown keys: each table's keys against its dataclass, all of one table's named at once;
   then [defaults] is checked on its own and written into each account's tables, key by key
   (`_account_with_defaults`; README: Company deployment);
2. `msgspec.convert` builds the dataclasses, checking types and ranges; each table's
   `__post_init__` then checks what spans keys (one password source, the link template) and
   fills its derived defaults; `Config.__post_init__` completes the accounts;
3. a refused value becomes one ConfigError line naming the key, its value and what is
   allowed (`_explain`, from msgspec's error and the field's declaration).

msgspec, not pydantic: it imports in a fraction of the time (every command loads the config
first), converts to plain dataclasses, and both need the same translation to our messages.

Only the password itself is read later, when a login needs it; a source that gives
no password is a ConfigError too, raised before the login is tried.
"""

from __future__ import annotations

import functools
import os
import re
import string
import subprocess
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass, make_dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote

import msgspec
import platformdirs
from msgspec import Meta

from . import errors
from .accountlock import DEFAULT_WAIT
from .mail.folders import parse_import_folder

Area = Literal["mail", "events", "tasks"]
Security = Literal["tls", "starttls", "none"]
Conflict = Literal["newest", "crm", "groupware"]
DavAuth = Literal["password", "none"]
MandatoryField = Literal["partner", "contact", "subject", "body"]
Private = Literal["skip", "busy", "import"]
MasterLogin = Literal["separator", "sasl", "none"]  # USER*MASTER, SASL PLAIN with USER as authzid, no master
AREAS: tuple[str, ...] = typing.get_args(Area)
SECURITY_MODES: tuple[str, ...] = typing.get_args(Security)
CONFLICT_POLICIES: tuple[str, ...] = typing.get_args(Conflict)
MANDATORY_FIELDS: tuple[str, ...] = typing.get_args(MandatoryField)
DEFAULT_STATUSES = {"I": "Importiert", "O": "Offen", "E": "Erledigt", "S": "Storniert"}
DEFAULT_LINK = "http://127.0.0.1:8765/activities/{id}"
DEFAULT_KINDS = {"TERMIN": "events", "BESPRECHUNG": "events", "AUFGABE": "tasks", "WIEDERVORLAGE": "tasks"}
PASSWORD_SOURCES = ("password_command", "password_env", "password_keyring", "password")
PASSWORD_KEYS_TEXT = "password_command, password_env, password_keyring or password"
MASTER_KEYS = ("master_user", "master_separator", "master_login")
SHARED = "defaults."  # the key path of a credential that [defaults] gives every account
MAX_TIMEOUT = 3600  # seconds; a server silent for an hour is down, and sockets reject huge values
MAX_INTERVAL = 86400  # seconds (one day); longer pauses are a job for a timer, not `watch`
MAX_LOCK_WAIT = 86400  # seconds a run may wait for another run of the same account
MAX_ATTEMPTS = 100
MAX_DAYS = 36500  # a hundred years: the widest date window
ARCHIVE = "CRM Archiv"  # the archive folder's default name, below the import root
MAX_CONNECTIONS = 100  # IMAP connections of one account at a time (Dovecot allows 10 per user and IP)
DERIVED: Any = None  # the default follows other keys: the table's __post_init__ fills it in


# A missing, unknown or malformed config key (the CLI exits with code 2): gwsync.errors' own.
ConfigError = errors.ConfigError


def default_config_path() -> Path:
    env = os.environ.get("GWSYNC_CONFIG")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_config_dir("gwsync")) / "config.toml"


def _default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("gwsync"))


def _default_state_dir() -> Path:
    return Path(platformdirs.user_state_dir("gwsync"))


class Says:
    """What to say after a key's name when msgspec refuses its value ({value!r} is the value):
    `message` for a value out of range or not matching, `above` for one over the upper bound
    when that reads differently, `each` for a wrong element of a list."""

    def __init__(self, message: str = "", *, above: str | None = None, each: str | None = None):
        self.message, self.above, self.each = message, above, each


class _Wrong(ValueError):
    """A check in a table's __post_init__ failed. The message is what follows the table's key
    path: ".key ..." or ": ..." (msgspec adds where it happened; `_explain` puts it in front)."""

    MARK = "\x1e"  # tells our messages from msgspec's own

    def __init__(self, rest: str):
        super().__init__(self.MARK + rest)


# -- value types: what a key holds, and what is said when it holds something else -----------------

Text = Annotated[str, Meta(pattern=r"\S"), Says("must not be empty, got {value!r}")]  # a host, user, folder
FilePath = Annotated[Path, Says("must not be empty, got {value!r}")]  # $VARS and ~ expanded
Port = Annotated[int, Meta(ge=1, le=65535), Says("must be between 1 and 65535, got {value!r}")]
Seconds = Annotated[float, Meta(ge=1, le=MAX_TIMEOUT),
                    Says(f"must be a number of seconds from 1 to {MAX_TIMEOUT}, got {{value!r}}")]
Command = Annotated[tuple[str, ...], Says(each="must be a non-empty list of strings")]  # program, arguments
Share = Annotated[float, Meta(gt=0, le=1), Says("must be above 0 and at most 1")]
Days = Annotated[int, Meta(ge=0, le=MAX_DAYS), Says(f"must be a number of days from 0 to {MAX_DAYS}, got {{value!r}}")]
DavUrl = Annotated[str, Meta(pattern="^https?://"), Says("must start with https:// (or http:// for a local server)")]
Address = Annotated[str, Meta(pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")]  # a mail address: local@domain.tld
Email = Annotated[str, Meta(pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$"),
                  Says("must be a mail address (name@example.com), got {value!r}")]
WebUrl = Annotated[str, Meta(pattern="^https?://"), Says("must start with https:// or http://, got {value!r}")]


def _check_command(key: str, value: tuple[str, ...] | str | None, at: str = "") -> None:
    if value is None:
        return
    command = [value] if isinstance(value, str) else list(value)
    if not command:
        raise _Wrong(f"{at}.{key} must be a non-empty list of strings")
    if not command[0].strip():
        raise _Wrong(f"{at}.{key} must start with a program name, got {command!r}")


@dataclass(frozen=True)
class Secret:
    """Where a password comes from. The value is only read when a login needs it."""

    where: str  # config key path, for error messages
    command: tuple[str, ...] | None = None
    env: str | None = None
    keyring: str | None = None
    username: str = ""
    inline: str | None = field(default=None, repr=False)

    @property
    def configured(self) -> bool:
        return any((self.command, self.env, self.keyring, self.inline is not None))

    @property
    def shared(self) -> bool:
        """A credential of [defaults] (a master user, a service user): every account sends it."""
        return self.where.startswith(SHARED)

    def resolve(self) -> str:
        if self.command:
            try:
                out = subprocess.run(list(self.command), capture_output=True, check=True, timeout=60)
            except FileNotFoundError as exc:
                raise ConfigError(f"{self.where}.password_command: program {self.command[0]!r} not found") from exc
            except subprocess.CalledProcessError as exc:
                raise ConfigError(
                    f"{self.where}.password_command exited with code {exc.returncode}; run it by hand to see why"
                ) from exc
            except subprocess.TimeoutExpired as exc:
                raise ConfigError(f"{self.where}.password_command did not finish within 60 s") from exc
            except OSError as exc:  # a directory, no execute permission, ...
                raise ConfigError(f"{self.where}.password_command: cannot run {self.command[0]!r} "
                                  f"({exc.strerror or exc})") from exc
            try:
                text = out.stdout.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ConfigError(f"{self.where}.password_command printed bytes that are not UTF-8; "
                                  "make it print the password as text") from exc
            # Only the first line: `pass show` prints the password and then other fields.
            return _given(text.splitlines()[0] if text else "",
                          f"{self.where}.password_command printed no password (its first line is empty); "
                          "make it print the password on its first line")
        if self.env:
            value = os.environ.get(self.env)
            if value is None:
                raise ConfigError(f"{self.where}.password_env: environment variable {self.env} is not set")
            return _given(value, f"{self.where}.password_env: environment variable {self.env} is empty")
        if self.keyring:
            import keyring
            from keyring.errors import KeyringError

            try:
                value = keyring.get_password(self.keyring, self.username)
            except KeyringError as exc:
                raise ConfigError(f"{self.where}.password_keyring: the system keyring is not available ({exc}); "
                                  "use password_command or password_env instead") from exc
            if value is None:
                raise ConfigError(
                    f"{self.where}.password_keyring: no password stored for service {self.keyring!r}, "
                    f"user {self.username!r}"
                )
            return _given(value, f"{self.where}.password_keyring: the password stored for service "
                                 f"{self.keyring!r}, user {self.username!r} is empty")
        if self.inline is not None:
            return self.inline
        raise ConfigError(f"{self.where}: set password_command, password_env, password_keyring or password")


def _given(password: str, message: str) -> str:
    """An empty password is never sent: the server would refuse it and gwsync lock the
    credential, when the fault is in the config (or the password store)."""
    if not password.strip():
        raise ConfigError(message)
    return password


# -- the tables ----------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class _Password:
    """The password keys of a table: at most one source (exactly one where it is required)."""

    password_command: Command | str | None = None  # the first line of its output
    password_env: Text | None = None
    password_keyring: Text | None = None  # service name; the user is the table's username
    password: str | None = field(default=None, repr=False)
    secret: Secret = field(default=DERIVED, init=False)  # set once the key path is known (_complete)

    def _check_password(self, required: bool, at: str = "") -> None:
        _check_command("password_command", self.password_command, at)
        if self.password is not None and not self.password.strip():
            raise _Wrong(f"{at}.password is empty: " + (
                "set the password, or use password_command, password_env or password_keyring" if required else
                "set a password or leave the key out"))
        found = [key for key in PASSWORD_SOURCES if getattr(self, key) is not None]
        if len(found) > 1:
            raise _Wrong(f"{at}: set only one of {', '.join(PASSWORD_SOURCES)} (found {', '.join(found)})")
        if required and not found:
            raise _Wrong(f"{at}: set password_command, password_env, password_keyring or password")

    @property
    def _has_password(self) -> bool:
        return any(getattr(self, key) is not None for key in PASSWORD_SOURCES)

    def _name_secret(self, where: str, username: str) -> None:
        command = self.password_command
        object.__setattr__(self, "secret", Secret(
            where=where, command=(command,) if isinstance(command, str) else command or None,
            env=self.password_env, keyring=self.password_keyring, username=username, inline=self.password))


class _Login:
    """How a login names its user: as itself, or through a master user (Dovecot's master users,
    README: Company deployment), who logs in with its own password as any user."""

    username: str
    master_user: str | None
    master_separator: str | None
    master_login: str

    def login(self) -> tuple[str, str | None]:
        """(authentication identity, authorization identity or None): what the login sends."""
        if self.master_user is None or self.master_login == "none":
            return self.username, None
        if self.master_login == "sasl":  # SASL PLAIN: authzid USER, authcid MASTER, MASTER's password
            return self.master_user, self.username
        return f"{self.username}{self.master_separator}{self.master_user}", None

    @property
    def login_user(self) -> str:
        """Whose password the login sends: the master user's, or the user's own."""
        return self.master_user if self.master_user is not None and self.master_login != "none" else self.username

    @property
    def login_text(self) -> str:
        """The login for messages: 'alice*gwsync', or 'alice' (SASL, as 'gwsync')."""
        authcid, authzid = self.login()
        return repr(authcid) if authzid is None else f"{authzid!r} (SASL PLAIN, authenticated as {authcid!r})"


@dataclass(frozen=True, kw_only=True)
class _MasterLogin(_Password, _Login):
    """The keys of an IMAP login through a master user."""

    master_user: Text | None = None  # logs in as the table's username with its own password
    master_separator: Text | None = DERIVED  # between user and master: "*" (Dovecot's usual)
    master_login: MasterLogin = DERIVED  # "separator" with a master_user, else "none"

    def _check_master(self) -> None:
        if self.master_login == "none" and self.master_user is not None:
            raise _Wrong(": master_login = \"none\" logs in with the account's own password; remove master_user")
        if self.master_user is None:
            if self.master_login not in (None, "none"):
                raise _Wrong(f': master_login = "{self.master_login}" needs master_user (the master user\'s name)')
            if self.master_separator is not None:
                raise _Wrong(": master_separator needs master_user (the master user's name)")
        if self.master_login == "sasl" and self.master_separator is not None:
            raise _Wrong('.master_separator: master_login = "sasl" sends no separator; remove it')
        if self.master_login is None:
            object.__setattr__(self, "master_login", "separator" if self.master_user is not None else "none")
        if self.master_login == "separator" and self.master_separator is None:
            object.__setattr__(self, "master_separator", "*")


@dataclass(frozen=True, kw_only=True)
class ImapConfig(_MasterLogin):
    host: Text
    username: Text
    port: Port = DERIVED  # 993 for tls, 143 for starttls and none
    security: Security = "tls"
    verify: bool = True
    ca_file: Text | None = None
    # The seed's import folder (a full name): its own mail is imported with [crm] default_status,
    # the CRM folders below it as usual; it is then the import root. Created when missing.
    import_folder: Text | None = None
    # DERIVED: the import folder, else "INBOX"; "" is the top of the server's personal namespace
    import_root: str = DERIVED
    # None: "CRM Archiv" below the import root (beside the import folder), joined with the
    # separator the server reports (archive_in); a folder name is only known once connected.
    archive_folder: Text | None = None
    timeout: Seconds = 60.0
    # `watch` holds at most this many connections, the sync's own included: IDLE on the rest
    max_connections: Annotated[int, Meta(ge=1, le=MAX_CONNECTIONS),
                               Says("must be at least 1 (the sync's own connection), got {value!r}",
                                    above=f"must be at most {MAX_CONNECTIONS}, got {{value!r}}")] = 3

    def __post_init__(self) -> None:
        if self.port is None:
            object.__setattr__(self, "port", 993 if self.security == "tls" else 143)
        if self.import_root is None:
            object.__setattr__(self, "import_root", self.import_folder or "INBOX")
        elif self.import_folder is not None and self.import_root != self.import_folder:
            raise _Wrong(f": import_folder {self.import_folder!r} is the import root; remove import_root "
                         f"{self.import_root!r} (the CRM folders go below the import folder)")
        archive = self.archive_folder
        if archive is not None:
            last = archive.replace("\\", "/").split("/")[-1].split(".")[-1]
            if parse_import_folder(last) is not None or parse_import_folder(archive.rsplit("/", 1)[-1]) is not None:
                raise _Wrong(f".archive_folder {archive!r} looks like an import folder (CRM ... [X]); "
                             "choose a name without a [status] suffix")
        self._check_master()
        self._check_password(required=True)

    def archive_in(self, root: str, separator: str | None) -> str:
        """The archive folder on a server whose import root is `root` (import_root, or the top
        of the personal namespace for "") and whose hierarchy separator is `separator`: below
        the root, or with an import folder beside it (its own mail must not be archived into it)."""
        if self.archive_folder is not None:
            return self.archive_folder
        if self.import_folder is not None:
            root = root.rsplit(separator, 1)[0] if separator and separator in root else ""
        return f"{root}{separator}{ARCHIVE}" if root and separator else ARCHIVE


@dataclass(frozen=True, kw_only=True)
class CaldavConfig(_Password):
    url: DavUrl  # the account's calendar home; a / is added when missing
    username: Text
    events: Text = "calendar"  # collection name below url, or a full URL
    tasks: Text = "tasks"
    auth: DavAuth = DERIVED  # "password" where a password source is set, else "none" (no login)
    verify: bool = True
    ca_file: Text | None = None
    timeout: Seconds = 60.0

    def __post_init__(self) -> None:
        if not self.url.endswith("/"):
            object.__setattr__(self, "url", self.url + "/")
        if self.auth is None:
            object.__setattr__(self, "auth", "password" if self._has_password else "none")
        if self.auth == "none" and self._has_password:
            found = ", ".join(key for key in PASSWORD_SOURCES if getattr(self, key) is not None)
            raise _Wrong(f': auth = "none" sends no password; remove {found}, or set auth = "password"')
        self._check_password(required=self.auth == "password")

    def collection(self, area: str) -> str:
        return self.events if area == "events" else self.tasks


# -- [defaults]: what every account takes unless its own table says otherwise ----------------------

def _defaults_of(table: type, base: type, leave_out: tuple[str, ...], check: typing.Callable, doc: str) -> type:
    """A [defaults.X] table: the keys of `table` (each optional, checked alike) except the
    per-user ones in `leave_out`; the credential keys come from `base`, checked by `check`."""
    hints = typing.get_type_hints(table, include_extras=True)
    inherited = {f.name for f in fields(base)}
    keys = [(f.name, hints[f.name] | None, field(default=None)) for f in fields(table)
            if f.init and f.name not in inherited and f.name not in leave_out]
    return make_dataclass(table.__name__.replace("Config", "Defaults"), keys, bases=(base,), frozen=True,
                          kw_only=True, namespace={"__post_init__": check, "__doc__": doc, "__module__": __name__})


def _check_imap_defaults(self: Any) -> None:
    self._check_master()
    self._check_password(required=False)
    if self.master_user is None and self._has_password:
        raise _Wrong(': a password here is the master user\'s: set master_user (e.g. "gwsync"), or give each '
                     "account its password in [accounts.NAME.imap]")
    if self.master_user is not None and not self._has_password:
        raise _Wrong(f": master_user {self.master_user!r} needs its password: set {PASSWORD_KEYS_TEXT}")
    if self.master_user is not None:
        self._name_secret("defaults.imap", self.master_user)


def _check_caldav_defaults(self: Any) -> None:
    self._check_password(required=False)
    if self.url is not None:
        _check_url_template(self.url)
    if self.auth == "none" and self._has_password:
        found = ", ".join(key for key in PASSWORD_SOURCES if getattr(self, key) is not None)
        raise _Wrong(f': auth = "none" sends no password; remove {found}, or set auth = "password"')
    if self._has_password and self.username is None:
        raise _Wrong(": a password needs the service user's username")
    if self.username is not None and self.auth != "none" and not self._has_password:
        raise _Wrong(f": set {PASSWORD_KEYS_TEXT}")
    if self._has_password:
        self._name_secret("defaults.caldav", self.username)


def _check_url_template(url: str) -> None:
    """[defaults.caldav] url: {username} is the only field, and it must make an address."""
    wrong = _Wrong(f".url {url!r} is not a template: write {{username}} for the account's username, "
                   "{{ and }} for a brace")
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(url) if name is not None]
    except ValueError as exc:
        raise wrong from exc
    for name in names:
        if name != "username":
            raise _Wrong(f".url {url!r} has the field {{{name}}}; only {{username}} (the account's username) "
                         "is allowed")
    try:
        url.format(username="x")
    except (ValueError, KeyError, IndexError, AttributeError) as exc:  # a format spec or conversion
        raise wrong from exc


ImapDefaults = _defaults_of(
    ImapConfig, _MasterLogin, ("username",), _check_imap_defaults,
    """[defaults.imap]: the keys of [accounts.NAME.imap] but username; its credential is a master user's.""")
CaldavDefaults = _defaults_of(
    CaldavConfig, _Password, (), _check_caldav_defaults,
    """[defaults.caldav]: the keys of [accounts.NAME.caldav]; url may hold {username}, username and the
    password are a service user's, who may use every user's calendars.""")


@dataclass(frozen=True, kw_only=True)
class DefaultsConfig:
    imap: ImapDefaults | None = None  # type: ignore[valid-type]
    caldav: CaldavDefaults | None = None  # type: ignore[valid-type]


IMAP_CREDENTIAL = (*MASTER_KEYS, *PASSWORD_SOURCES)
CALDAV_CREDENTIAL = ("username", "auth", *PASSWORD_SOURCES)


def _account_with_defaults(name: str, raw: Any, defaults: dict[str, Any]) -> Any:
    """An account's table with [defaults] written into it, key by key: each server table its
    areas need, or that it has, gets the defaults' keys it does not set itself. A table with a
    credential of its own takes none of the defaults' credential keys. Wrong types are left for
    msgspec to name."""
    if not isinstance(raw, dict):
        return raw
    areas = raw.get("areas", ["mail"])
    areas = {area for area in areas if isinstance(area, str)} if isinstance(areas, list) else set()
    given = raw.get("username")
    user = given if isinstance(given, str) and given.strip() else name
    where = _join("accounts", name)
    out = dict(raw)
    for key, wanted, merge in (("imap", "mail" in areas, _imap_with_defaults),
                               ("caldav", bool({"events", "tasks"} & areas), _caldav_with_defaults)):
        table, default = raw.get(key), defaults.get(key)
        if default is None or (table is None and not wanted):
            if isinstance(table, dict) and "username" in raw:
                out[key] = {"username": user} | table
            continue
        if isinstance(table, dict | None):
            out[key] = merge(f"{where}.{key}", table or {}, default, user)
    return out


def _imap_with_defaults(where: str, table: dict, default: dict, user: str) -> dict:
    own = any(key in table for key in (*PASSWORD_SOURCES, "master_user")) or table.get("master_login") == "none"
    master = default.get("master_user")
    if own and master is not None and "master_user" not in table and table.get("master_login") != "none":
        key = next(key for key in PASSWORD_SOURCES if key in table)
        raise ConfigError(f"{where}: {key} is a password for {user}, but [defaults.imap] master_user {master!r} "
                          f"logs in for every account: remove {key} (the master user logs in), or set "
                          'master_login = "none" to log in with the account\'s own password')
    if not own and master is None:
        raise ConfigError(f"{where}: set {PASSWORD_KEYS_TEXT} (or master_user and its password in [defaults.imap])")
    base = {k: v for k, v in default.items() if not (own and k in IMAP_CREDENTIAL)}
    return {"username": user} | base | table


def _caldav_with_defaults(where: str, table: dict, default: dict, user: str) -> dict:
    own = any(key in table for key in PASSWORD_SOURCES) or table.get("auth") == "none"
    service = default.get("username")
    if "username" in table and not own and service is not None:
        raise ConfigError(f"{where}: username {table['username']!r} has no password of its own; set one, or "
                          f"leave username out to log in as the service user {service!r}")
    base = {k: v for k, v in default.items() if not (own and k in CALDAV_CREDENTIAL)}
    merged = base | table
    if own or service is None:
        merged.setdefault("username", user)
    template = default.get("url")
    if "url" not in table and template is not None:
        if "{username}" not in template:
            raise ConfigError(f"{where}: [defaults.caldav] url {template!r} has no {{username}}, so every account "
                              f"would use one calendar home: put {{username}} in it, or set url in [{where}]")
        merged["url"] = template.format(username=quote(user, safe="@"))
    return merged


@dataclass(frozen=True, kw_only=True)
class SieveConfig(_Password, _Login):
    """[accounts.X.sieve]: server-side rules. Everything but the port defaults to [imap]'s
    (AccountConfig._complete fills it in), the password too unless the table names its own; with
    [imap]'s password goes its master user (Dovecot's master users log in to ManageSieve alike)."""

    host: Text = DERIVED
    port: Port = 4190
    security: Security = DERIVED  # STARTTLS unless "none"
    username: Text = DERIVED
    verify: bool = DERIVED
    ca_file: Text | None = DERIVED
    master_user: str | None = field(default=None, init=False)  # [imap]'s, with its password
    master_separator: str | None = field(default=None, init=False)
    master_login: str = field(default="none", init=False)

    @property
    def starttls(self) -> bool:
        return self.security != "none"

    def _borrow(self, imap: ImapConfig | None, where: str) -> None:
        for key, default in (("host", None), ("username", None), ("security", "starttls"), ("verify", True),
                             ("ca_file", None)):
            if getattr(self, key) is None:
                object.__setattr__(self, key, getattr(imap, key) if imap else default)
        if self.host is None or self.username is None:
            raise _Wrong(f"{where}: set host and username (there is no [imap] table to take them from)")
        self._check_password(required=imap is None, at=where)
        if imap is not None and not self._has_password:
            for key in MASTER_KEYS:
                object.__setattr__(self, key, getattr(imap, key))


@dataclass(frozen=True, kw_only=True)
class AccountConfig:
    areas: Annotated[tuple[Area, ...], Meta(min_length=1),
                     Says(f"is empty: list at least one of {', '.join(AREAS)}",
                          each=f": unknown area {{value!r}} (use {', '.join(AREAS)})")] = ("mail",)
    interval: Annotated[int, Meta(ge=1, le=MAX_INTERVAL),
                        Says("must be at least 1 second",
                             above=f"must be at most {MAX_INTERVAL} seconds (one day), got {{value!r}}")] = 300
    imap: ImapConfig | None = None
    caldav: CaldavConfig | None = None
    notify_command: Command | None = None  # run with the import summary as last argument
    sieve: SieveConfig | None = None  # DERIVED from [imap] when the table is left out (see _complete)
    # The employee's own addresses: mail from one of them is outgoing (MAILAUS). Default: the
    # IMAP username if it is an address, else none. Lower-cased by _complete.
    addresses: Annotated[tuple[Address, ...],
                         Says(each="must be a list of mail addresses (name@example.com), got {value!r}")] = DERIVED
    # The user's name on the servers (default: the account's name): the login through [defaults]'
    # master user, and {username} in [defaults.caldav] url. An [imap] username of its own wins.
    username: Text | None = None
    email: Email | None = None  # the employee's mail address: one of `addresses`
    name: str = field(default="", init=False)  # the key in [accounts], set by Config

    def __post_init__(self) -> None:
        for area in self.areas:
            if self.areas.count(area) > 1:
                raise _Wrong(f".areas lists {area!r} twice")
        _check_command("notify_command", self.notify_command)

    def _complete(self, name: str, defaults: DefaultsConfig | None = None) -> None:
        """What needs the account's name: the tables its areas need, [sieve] from [imap], and
        where each password comes from (for messages about it): a table that sends [defaults]'
        credential (the same user and password keys) shares its Secret, and so its lock."""
        where = _join("accounts", name)
        defaults = defaults or DefaultsConfig()
        object.__setattr__(self, "name", name)
        if self.addresses is None:
            username = self.imap.username if self.imap is not None and self.email is None else ""
            object.__setattr__(self, "addresses", (username,) if re.fullmatch(r"[^@\s]+@[^@\s]+", username) else ())
        own = self.addresses + ((self.email,) if self.email else ())
        object.__setattr__(self, "addresses", tuple(dict.fromkeys(a.strip().lower() for a in own)))
        for area in self.areas:
            table = "imap" if area == "mail" else "caldav"
            if getattr(self, table) is None:
                raise _Wrong(f"{where}: area {area} needs an [{where}.{table}] table")
        if self.sieve is not None or self.imap is not None:
            sieve = self.sieve or SieveConfig()
            sieve._borrow(self.imap, f"{where}.sieve")
            object.__setattr__(self, "sieve", sieve)
        for key, server in (("imap", self.imap), ("caldav", self.caldav), ("sieve", self.sieve)):
            if server is None:
                continue
            shared = getattr(defaults, key, None)
            if shared is not None and shared.secret is not None and _credential(server) == _credential(shared):
                object.__setattr__(server, "secret", shared.secret)
            else:
                server._name_secret(f"{where}.{key}", server.username if isinstance(server, CaldavConfig)
                                    else server.login_user)
        if self.sieve is not None and self.imap is not None and not self.sieve._has_password:
            object.__setattr__(self.sieve, "secret", self.imap.secret)


def _credential(table: Any) -> tuple:
    """What makes a table's credential: who logs in (the master or service user) and the password keys."""
    user = table.master_user if hasattr(table, "master_user") else table.username
    return (user, *(getattr(table, key) for key in PASSWORD_SOURCES))


def _check_link(link: str) -> None:
    """[crm] link is a str.format template: `{id}` must be in it and is the only field, and
    it must format an id. Otherwise the first import would commit and then fail on it."""
    lone_brace = (f".link {link!r} has a lone {{ or }}; write {{{{ or }}}} for a literal brace and {{id}} "
                  "for the activity id")
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(link) if name is not None]
    except ValueError as exc:
        raise _Wrong(lone_brace) from exc
    for name in names:
        if name != "id":
            raise _Wrong(f".link {link!r} has the field {{{name}}}; only {{id}} (the activity id) is allowed")
    if not names:
        raise _Wrong(".link must contain {id}, e.g. https://crm.example.com/activities/{id}")
    try:
        link.format(id=1)
    except (ValueError, KeyError, IndexError, AttributeError, TypeError) as exc:  # a format spec or conversion
        raise _Wrong(f".link {link!r} cannot show an activity id ({exc}); write {{id}}") from exc


@dataclass(frozen=True, kw_only=True)
class CrmConfig:
    database: FilePath = field(default_factory=lambda: _default_data_dir() / "crm.db")
    documents: FilePath = DERIVED  # next to the database
    link: str = DERIVED  # the web view's address from [serve], /activities/{id}
    mandatory: Annotated[tuple[MandatoryField, ...],
                         Says(each=f": unknown field {{value!r}} (known: {', '.join(MANDATORY_FIELDS)})")] = ()
    statuses: Annotated[dict[str, str], Meta(min_length=1), Says("is empty: list at least one status key")] = \
        field(default_factory=lambda: dict(DEFAULT_STATUSES))
    max_attempts: Annotated[int, Meta(ge=1, le=MAX_ATTEMPTS),
                            Says("must be at least 1", above=f"must be at most {MAX_ATTEMPTS}, got {{value!r}}")] = 3
    attachment_review: bool = False
    kinds: dict[str, Annotated[Literal["events", "tasks"], Says('must be "events" or "tasks", got {value!r}')]] = \
        field(default_factory=dict)  # kind -> events | tasks, added to DEFAULT_KINDS
    done_status: str = DERIVED  # a completed VTODO <-> this status; "E" if that is a status, else the first
    open_status: str = DERIVED  # status of items from the groupware without one; "O", else the first
    default_status: str = DERIVED  # mail lying in the import folder itself; "I", else the first
    cancelled_status: str = DERIVED  # a meeting its organizer cancelled; "S" (Storniert), else the first

    def __post_init__(self) -> None:
        for key in self.statuses:
            if not key or "[" in key or "]" in key or any(c.isspace() for c in key):  # as a folder reads it
                raise _Wrong(f".statuses: {key!r} is not a usable status key")
        for kind in self.kinds:
            if not kind.strip():
                raise _Wrong(f".kinds: {kind!r} is not a usable kind name")
        if self.link is not None:
            _check_link(self.link)
        first = next(iter(self.statuses))
        for key, default in (("documents", self.database.parent / "documents"),
                             ("done_status", "E" if "E" in self.statuses else first),
                             ("open_status", "O" if "O" in self.statuses else first),
                             ("default_status", "I" if "I" in self.statuses else first),
                             ("cancelled_status", "S" if "S" in self.statuses else first)):
            if getattr(self, key) is None:
                object.__setattr__(self, key, default)
        object.__setattr__(self, "kinds", DEFAULT_KINDS | self.kinds)
        for key in ("done_status", "open_status", "default_status", "cancelled_status"):
            if getattr(self, key) not in self.statuses:
                raise _Wrong(f".{key} {getattr(self, key)!r} is not one of the status keys in [crm.statuses]")

    def kinds_of(self, area: str) -> tuple[str, ...]:
        return tuple(sorted(kind for kind, target in self.kinds.items() if target == area))


@dataclass(frozen=True, kw_only=True)
class StateConfig:
    database: FilePath = field(default_factory=lambda: _default_state_dir() / "state.db")
    # How long a run waits while another run (sync, watch, review, push) has the same account.
    lock_wait: Annotated[float, Meta(ge=0, le=MAX_LOCK_WAIT),
                         Says(f"must be a number of seconds from 0 to {MAX_LOCK_WAIT}, got {{value!r}}")] = DEFAULT_WAIT


@dataclass(frozen=True, kw_only=True)
class DatabaseConfig(_Password):
    """[database]: one PostgreSQL that holds the CRM store of a company, shared by any number of
    gwsync processes on any hosts. Absent: the embedded SQLite files of [crm] and [state].

    `url` is libpq's: postgresql://USER@HOST:PORT/DATABASE, also ?host=/socket/dir. The password
    comes from one of the password keys (keyring user: the URL's user), else from the URL itself,
    libpq's PGPASSWORD or ~/.pgpass."""

    url: Text
    # A holder of an account's lock that sends nothing this long (frozen, its host paused) loses
    # its session and the lock; 0: never (then only a dead process or connection frees it).
    lock_timeout: Annotated[int, Meta(ge=0, le=3600)] = 20

    def __post_init__(self) -> None:
        from urllib.parse import urlsplit

        self._check_password(required=False)
        parts = urlsplit(self.url)
        if parts.scheme not in ("postgresql", "postgres") or "://" not in self.url:
            shown = self.url if parts.password is None else self.url.replace(parts.password, "***")
            raise _Wrong(f".url must be a postgresql:// URL (postgresql://USER@HOST:PORT/DATABASE), got {shown!r}")
        if not parts.path.strip("/"):
            raise _Wrong(".url names no database: write postgresql://USER@HOST:PORT/DATABASE")
        if self._has_password:
            self._name_secret("database", parts.username or "database")


@dataclass(frozen=True, kw_only=True)
class WorkerConfig:
    """[worker]: `gwsync worker` (needs [database] url). Seconds unless said otherwise."""

    concurrency: Annotated[int, Meta(ge=1, le=256)] = 4  # sync jobs at once per worker (--concurrency)
    tick: Annotated[int, Meta(ge=1, le=59)] = 5  # how often due accounts are deferred
    max_backoff: Annotated[int, Meta(ge=1, le=86400)] = 720  # an idle account's longest interval
    shard_size: Annotated[int, Meta(ge=1, le=100000)] = 500  # accounts per watcher job
    watch_for: Annotated[int, Meta(ge=10, le=86400)] = 1500  # a watcher job's length, then it is deferred again
    watchers: Annotated[int, Meta(ge=0, le=256)] = 2  # watcher jobs at once per worker
    stalled_after: Annotated[int, Meta(ge=2, le=3600)] = 30  # a worker silent this long is dead: its jobs run again


@dataclass(frozen=True, kw_only=True)
class SyncConfig:
    conflict: Conflict = "newest"  # which side wins a field changed on both
    max_delete_share: Share = 0.5  # the mass-deletion guard
    private: Private = "skip"  # CLASS:PRIVATE/CONFIDENTIAL items: left out, imported as "Privat", or imported
    past_days: Days = 30  # items that ended longer ago than this are not imported
    future_days: Days = 365  # nor those starting later than this


@dataclass(frozen=True, kw_only=True)
class ServeUserConfig(_Password):
    """[serve.users.NAME]: an employee (an account) who logs in to the web view as themselves,
    with their own password (keyring user NAME)."""

    def __post_init__(self) -> None:
        self._check_password(required=True)


@dataclass(frozen=True, kw_only=True)
class ServeConfig(_Password):
    """[serve]: the web view. A login is required when it listens beyond loopback: one shared
    password (this table's), or a password per employee ([serve.users.NAME]), not both."""

    host: Text = "127.0.0.1"
    port: Port = 8765
    url: WebUrl | None = None  # where users open it (behind a proxy, say); default http://HOST:PORT
    users: dict[str, ServeUserConfig] = field(default_factory=dict)  # account name -> its login
    secret: Secret | None = field(default=None, init=False)  # type: ignore[assignment]  # the login
    # password (keyring user "serve"); None without one, where every other table has one

    def __post_init__(self) -> None:
        self._check_password(required=False)
        for key in ("host", "url"):
            value = getattr(self, key) or ""
            if "{" in value or "}" in value:  # the default [crm] link is a template made from them
                raise _Wrong(f".{key} must not contain {{ or }} (it becomes part of [crm] link), got {value!r}")
        if self._has_password and self.users:
            # Whose session would the shared password open? Neither reading is safe to guess.
            raise _Wrong(f": set either one shared password ({PASSWORD_KEYS_TEXT}) or [serve.users.NAME] "
                         "tables, not both")
        if self._has_password:
            self._name_secret("serve", "serve")
        for name, user in self.users.items():
            user._name_secret(_join("serve.users", name), name)

    @property
    def base_url(self) -> str:
        return self.url.rstrip("/") if self.url else http_address(self.host, self.port)


def known_names(names: typing.Iterable[str], shown: int = 10) -> str:
    """Names for a message: the first few, sorted (a company has thousands of accounts)."""
    names = sorted(names)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return (", ".join(names[:shown]) or "none") + more


def http_address(host: str, port: int) -> str:
    """http://HOST:PORT, with an IPv6 address in brackets."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@dataclass(frozen=True, kw_only=True)
class Config:
    crm: CrmConfig = field(default_factory=CrmConfig)
    state: StateConfig = field(default_factory=StateConfig)
    database: DatabaseConfig | None = None  # None: the embedded SQLite files
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    accounts: dict[str, AccountConfig] = field(default_factory=dict)
    defaults: DefaultsConfig = field(default_factory=DefaultsConfig)  # what every account takes
    sync: SyncConfig = field(default_factory=SyncConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    path: Path | None = field(default=None, init=False)  # the file it was loaded from
    # [defaults] as written, to make accounts from records (account_from_record)
    raw_defaults: dict[str, Any] = field(default_factory=dict, init=False)
    # The accounts of `accounts` that the database holds (gwsync.accounts); None: not loaded yet
    database_accounts: tuple[str, ...] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.crm.link is None:
            object.__setattr__(self.crm, "link", self.serve.base_url + "/activities/{id}")
        for name, account in self.accounts.items():
            if not name.strip():
                raise _Wrong(f"accounts: {name!r} is not a usable account name")
            account._complete(name, self.defaults)
        for name in self.serve.users:
            if name not in self.accounts:
                known = ", ".join(sorted(self.accounts)) or "none"
                raise _Wrong(f"{_join('serve.users', name)}: no account {name!r} in [accounts] (known: {known}); "
                             "each web user is an employee")

    @property
    def state_database(self) -> Path:
        return self.state.database

    @property
    def web_base(self) -> str | None:
        """The web view's address when the CRM links point at it (so summaries can link to
        its quick searches too); None when they point at another CRM."""
        base = self.serve.base_url
        return base if self.crm.link.startswith(base + "/activities/") else None

    def account(self, name: str) -> AccountConfig:
        try:
            return self.accounts[name]
        except KeyError as exc:
            raise ConfigError(f"no account {name!r} in the config (known: {known_names(self.accounts)})") from exc

    def account_from_record(self, name: str, username: str | None = None, email: str | None = None,
                            areas: tuple[str, ...] | list[str] = ("mail",)) -> AccountConfig:
        """A full account from a record of name, username, email and areas (accounts kept in a
        database) and this config's [defaults], checked as `[accounts.NAME]` with those keys
        would be; a ConfigError names accounts.NAME and the key."""
        record: dict[str, Any] = {"areas": list(areas)}
        if username is not None:
            record["username"] = username
        if email is not None:
            record["email"] = email
        config = _convert({"defaults": self.raw_defaults,
                           "accounts": {name: _account_with_defaults(name, record, self.raw_defaults)}})
        return config.accounts[name]


# -- loading: unknown keys, then msgspec, then its error in our words ----------------------------

def parse_config(data: dict[str, Any], path: Path | None = None) -> Config:
    """[defaults] is checked first, on its own (its mistakes are named there, not in the accounts
    that take it), then written into the accounts' tables (_account_with_defaults)."""
    _reject_unknown_keys(data, Config, "")
    defaults = data.get("defaults") or {}
    if defaults:
        _convert({"defaults": defaults})
    if isinstance(data.get("accounts"), dict):
        data = data | {"accounts": {name: _account_with_defaults(name, raw, defaults)
                                    for name, raw in data["accounts"].items()}}
    config = _convert(data)
    object.__setattr__(config, "path", path)
    object.__setattr__(config, "raw_defaults", defaults)
    return config


def _convert(data: dict[str, Any]) -> Config:
    try:
        return msgspec.convert(data, Config, strict=True, dec_hook=_decode)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(str(exc), data)) from None


def load_config(path: Path | None = None) -> Config:
    path = path or default_config_path()
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(f"no config file at {path} (create one, see the README, or pass --config)") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config {path} is not UTF-8") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path}: {exc}") from exc
    return parse_config(data, path)


def _decode(kind: type, value: Any) -> Any:
    """The types msgspec leaves to us: paths, with $VARS and ~ expanded."""
    if kind is Path:
        if not isinstance(value, str):
            raise TypeError(f"Expected `str`, got `{type(value).__name__}`")
        if not value.strip():
            raise ValueError("empty path")
        return Path(os.path.expandvars(value)).expanduser()
    raise NotImplementedError(kind)


def _reject_unknown_keys(data: Any, kind: Any, where: str) -> None:
    """Every table's keys against its dataclass (msgspec would skip unknown ones), all of a
    table's unknown keys in one line. A value of the wrong type is left to msgspec."""
    table = _plain(kind)
    if not isinstance(data, dict):
        return
    if is_dataclass(table):
        hints = _hints(typing.cast(type, table))
        known = {f.name for f in fields(table) if f.init}
        unknown = sorted(str(key) for key in data if key not in known)
        if unknown:
            names = ", ".join(_join(where or "config", key) for key in unknown)
            raise ConfigError(f"unknown key {names} (check the spelling against the README)")
        for key, value in data.items():
            _reject_unknown_keys(value, hints[key], _join(where, key))
    elif typing.get_origin(table) is dict:
        for key, value in data.items():
            _reject_unknown_keys(value, typing.get_args(table)[1], _join(where, str(key)))


_AT = re.compile(r"(.*) - at `\$(.*)`", re.DOTALL)


def _explain(error: str, data: dict[str, Any]) -> str:
    """msgspec's error (what, and where as `$.crm.link`) as our one line naming the key."""
    match = _AT.fullmatch(error)
    what, path = match.groups() if match else (error, "")
    where, value, kind, element = _locate(data, path)
    if what.startswith(_Wrong.MARK):
        return _after(where, what[len(_Wrong.MARK):])
    if missing := re.fullmatch(r"Object missing required field `(.*)`", what):
        return f"missing key {_join(where, missing[1])}"
    says = _says(kind)
    if element:
        return _after(where, says.each.format(value=value) if says and says.each else
                      f"has {value!r}, not {_kind_names(typing.get_args(_plain(kind))[0])}")
    choices = [c for k in map(_plain, _members(kind)) if typing.get_origin(k) is Literal for c in typing.get_args(k)]
    if re.fullmatch(r"Expected `[^`]*`, got `[^`]*`", what) and not choices:  # a key with choices names them
        if any(is_dataclass(k) or typing.get_origin(k) is dict for k in map(_plain, _members(kind))):
            return f"[{where}] must be a table, got {value!r}"
        if isinstance(value, bool):
            return f"{where} must be {_kind_names(kind)}, not a boolean"
        return f"{where} must be {_kind_names(kind)}, got {value!r}"
    if says:  # out of range, not matching, not one of the choices: in the key's own words
        return _after(where, (says.above if says.above and "` <" in what else says.message).format(value=value))
    if choices:
        return f"{where} must be one of {', '.join(choices)}, got {value!r}"
    return f"{where}: {what}"


def _locate(data: Any, path: str) -> tuple[str, Any, Any, bool]:
    """Follow msgspec's path ($.accounts[...].imap.port) through the data and the dataclasses:
    the key path, its value, its declared type, and whether the error is in a list's element.
    msgspec writes a dict key as [...]; the first entry that fails on its own is the one."""
    where, value, kind, element = "", data, Config, False
    for name, index in re.findall(r"\.([^.\[]+)|\[([^\]]*)\]", path):
        if name:
            kind = _hints(_plain(kind))[name]
            value = value.get(name) if isinstance(value, dict) else None
            where = _join(where, name)
        elif index == "...":
            kind = typing.get_args(_plain(kind))[1]
            key = next((k for k, v in value.items() if _fails(v, kind)), "...")
            value = value.get(key)
            where = _join(where, key)
        else:
            value, element = value[int(index)], True
    return where, value, kind, element


def _fails(value: Any, kind: Any) -> bool:
    try:
        msgspec.convert(value, kind, strict=True, dec_hook=_decode)
    except msgspec.ValidationError:
        return True
    return False


def _after(where: str, rest: str) -> str:
    """The key path, then what is wrong with it: "crm.link must ...", "crm.statuses: ..."."""
    if not where:
        return rest
    return where + rest if rest[:1] in ".:" else f"{where} {rest}"


def _join(where: str, key: str) -> str:
    """A key path, quoting a key that would not read as one ("bob smith", or with a line break)."""
    if not (key.isprintable() and re.fullmatch(r"[^\s.'\"\[\]]+", key)):
        key = repr(key)
    return f"{where}.{key}" if where else key


@functools.cache
def _hints(table: type) -> dict[str, Any]:
    return typing.get_type_hints(table, include_extras=True)


def _members(kind: Any) -> list[Any]:
    """The types a key may hold, None left out: `Command | str | None` -> [Command, str]."""
    if typing.get_origin(kind) is Annotated:
        inner = typing.get_args(kind)[0]
        if typing.get_origin(inner) not in (typing.Union, types.UnionType):
            return [kind]
        kind = inner
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return [k for k in typing.get_args(kind) if k is not type(None)]
    return [kind]


def _plain(kind: Any) -> Any:
    """The type without its Annotated metadata, and without None when that is the only other choice."""
    members = _members(kind)
    kind = members[0] if len(members) == 1 else kind
    return typing.get_args(kind)[0] if typing.get_origin(kind) is Annotated else kind


def _says(kind: Any) -> Says | None:
    for member in [kind, *_members(kind)]:
        if typing.get_origin(member) is Annotated:
            for meta in member.__metadata__:
                if isinstance(meta, Says):
                    return meta
    return None


_KIND_NAMES = {str: "a string", Path: "a string", int: "an integer", float: "an integer or a number",
               bool: "true or false", tuple: "a list", list: "a list", dict: "a table"}


def _kind_names(kind: Any) -> str:
    names = []
    for member in map(_plain, _members(kind)):
        origin = typing.get_origin(member) or member
        if origin is Literal:
            origin = type(typing.get_args(member)[0])
        names.append(_KIND_NAMES.get(origin, "a table" if is_dataclass(origin) else str(origin)))
    return " or ".join(dict.fromkeys(names))

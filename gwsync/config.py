"""The TOML config (SPEC section 2): loading, defaults, and one-line errors for bad keys.

Every key is checked when the file is loaded (types, ranges, non-empty names, the link
template, one password source per table), so a run never starts with a config that fails
half-way. Only the password itself is read later, when a login needs it; a source that gives
no password is a ConfigError too, raised before the login is tried.
"""

from __future__ import annotations

import os
import string
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs

from .folders import parse_import_folder

AREAS = ("mail", "events", "tasks")
DEFAULT_STATUSES = {"I": "Importiert", "O": "Offen", "E": "Erledigt"}
DEFAULT_LINK = "http://127.0.0.1:8765/activities/{id}"
DEFAULT_KINDS = {"TERMIN": "events", "BESPRECHUNG": "events", "AUFGABE": "tasks", "WIEDERVORLAGE": "tasks"}
CONFLICT_POLICIES = ("newest", "crm", "groupware")
SECURITY_MODES = ("tls", "starttls", "none")
PASSWORD_SOURCES = ("password_command", "password_env", "password_keyring", "password")
MAX_TIMEOUT = 3600  # seconds; a server silent for an hour is down, and sockets reject huge values
MAX_INTERVAL = 86400  # seconds (one day); longer pauses are a job for a timer, not `watch`
MAX_ATTEMPTS = 100


class ConfigError(Exception):
    """A missing, unknown or malformed config key. The CLI exits with code 2."""


def default_config_path() -> Path:
    env = os.environ.get("GWSYNC_CONFIG")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_config_dir("gwsync")) / "config.toml"


def _default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("gwsync"))


def _default_state_dir() -> Path:
    return Path(platformdirs.user_state_dir("gwsync"))


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

    def resolve(self) -> str:
        if self.command:
            try:
                out = subprocess.run(list(self.command), capture_output=True, check=True, timeout=60)
            except FileNotFoundError:
                raise ConfigError(f"{self.where}.password_command: program {self.command[0]!r} not found")
            except subprocess.CalledProcessError as exc:
                raise ConfigError(
                    f"{self.where}.password_command exited with code {exc.returncode}; run it by hand to see why"
                )
            except subprocess.TimeoutExpired:
                raise ConfigError(f"{self.where}.password_command did not finish within 60 s")
            except OSError as exc:  # a directory, no execute permission, ...
                raise ConfigError(f"{self.where}.password_command: cannot run {self.command[0]!r} "
                                  f"({exc.strerror or exc})")
            try:
                text = out.stdout.decode("utf-8")
            except UnicodeDecodeError:
                raise ConfigError(f"{self.where}.password_command printed bytes that are not UTF-8; "
                                  "make it print the password as text")
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
                                  "use password_command or password_env instead")
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


@dataclass(frozen=True)
class ImapConfig:
    host: str
    username: str
    secret: Secret
    port: int = 993
    security: str = "tls"
    verify: bool = True
    ca_file: str | None = None
    import_root: str = "INBOX"
    archive_folder: str = "INBOX/CRM Archiv"
    timeout: float = 60.0


@dataclass(frozen=True)
class CaldavConfig:
    url: str
    username: str
    secret: Secret
    events: str = "calendar"  # collection name below url, or a full URL
    tasks: str = "tasks"
    verify: bool = True
    ca_file: str | None = None
    timeout: float = 60.0

    def collection(self, area: str) -> str:
        return self.events if area == "events" else self.tasks


@dataclass(frozen=True)
class SieveConfig:
    host: str
    port: int
    starttls: bool
    username: str
    secret: Secret
    verify: bool = True
    ca_file: str | None = None


@dataclass(frozen=True)
class AccountConfig:
    name: str
    areas: tuple[str, ...] = ("mail",)
    interval: int = 300
    imap: ImapConfig | None = None
    caldav: CaldavConfig | None = None
    notify_command: tuple[str, ...] | None = None  # run with the import summary as last argument
    sieve: SieveConfig | None = None  # server-side rules; host and credentials default to IMAP's


@dataclass(frozen=True)
class CrmConfig:
    database: Path
    documents: Path
    link: str = DEFAULT_LINK
    mandatory: tuple[str, ...] = ()
    statuses: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_STATUSES))
    max_attempts: int = 3
    attachment_review: bool = False
    kinds: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_KINDS))  # kind -> events | tasks
    done_status: str = "E"  # a completed VTODO <-> this status
    open_status: str = "O"  # status of items that come from the groupware without one

    def kinds_of(self, area: str) -> tuple[str, ...]:
        return tuple(sorted(kind for kind, target in self.kinds.items() if target == area))


@dataclass(frozen=True)
class SyncConfig:
    conflict: str = "newest"  # newest | crm | groupware
    max_delete_share: float = 0.5  # the mass-deletion guard


@dataclass(frozen=True)
class ServeConfig:
    """[serve]: the web view. A password is required when it listens beyond loopback."""

    host: str = "127.0.0.1"
    port: int = 8765
    secret: Secret | None = None  # the login password (password_command, _env, _keyring or password)
    url: str | None = None  # where users open it (e.g. behind a proxy); default http://HOST:PORT

    @property
    def base_url(self) -> str:
        return self.url.rstrip("/") if self.url else http_address(self.host, self.port)


def http_address(host: str, port: int) -> str:
    """http://HOST:PORT, with an IPv6 address in brackets."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@dataclass(frozen=True)
class Config:
    crm: CrmConfig
    state_database: Path
    accounts: dict[str, AccountConfig]
    path: Path | None = None
    sync: SyncConfig = field(default_factory=SyncConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    @property
    def web_base(self) -> str | None:
        """The web view's address when the CRM links point at it (so summaries can link to
        its quick searches too); None when they point at another CRM."""
        base = self.serve.base_url
        return base if self.crm.link.startswith(base + "/activities/") else None

    def account(self, name: str) -> AccountConfig:
        try:
            return self.accounts[name]
        except KeyError:
            known = ", ".join(sorted(self.accounts)) or "none"
            raise ConfigError(f"no account {name!r} in the config (known: {known})")


MANDATORY_FIELDS = ("partner", "contact", "subject", "body")


class _Section:
    """Reads one TOML table, remembering its dotted path so errors name the exact key."""

    def __init__(self, data: Any, where: str):
        if not isinstance(data, dict):
            raise ConfigError(f"[{where}] must be a table, got {data!r}")
        self.data = data
        self.where = where
        self.used: set[str] = set()

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None, required: bool = False) -> Any:
        self.used.add(key)
        if key not in self.data:
            if required:
                raise ConfigError(f"missing key {self.where}.{key}")
            return default
        value = self.data[key]
        # TOML has no bool/int overlap in intent: reject `port = true`.
        if isinstance(value, bool) and kind is not bool and not (isinstance(kind, tuple) and bool in kind):
            raise ConfigError(f"{self.where}.{key} must be {_kind_name(kind)}, not a boolean")
        if not isinstance(value, kind):
            raise ConfigError(f"{self.where}.{key} must be {_kind_name(kind)}, got {value!r}")
        return value

    def text(self, key: str, default: str | None = None, required: bool = False) -> str | None:
        """A string that must say something: a host, a user, a folder, a path."""
        value = self.get(key, str, default, required)
        if key in self.data and not value.strip():
            raise ConfigError(f"{self.where}.{key} must not be empty, got {value!r}")
        return value

    def number(self, key: str, default: float, low: float, high: float, what: str) -> float:
        """A number within [low, high]; NaN and the infinities are out of every range."""
        value = self.get(key, (int, float), default)
        if not low <= value <= high:
            raise ConfigError(f"{self.where}.{key} must be {what} from {low} to {high}, got {value!r}")
        return float(value)

    def section(self, key: str) -> "_Section | None":
        self.used.add(key)
        if key not in self.data:
            return None
        return _Section(self.data[key], key if self.where == "config" else f"{self.where}.{key}")

    def reject_unknown(self, allowed_extra: tuple[str, ...] = ()) -> None:
        unknown = set(self.data) - self.used - set(allowed_extra)
        if unknown:
            names = ", ".join(f"{self.where}.{k}" for k in sorted(unknown))
            raise ConfigError(f"unknown key {names} (check the spelling against the README)")


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {str: "a string", int: "an integer", bool: "true or false", list: "a list", dict: "a table",
             float: "a number"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _path(value: str) -> Path:
    return Path(os.path.expandvars(value)).expanduser()


def _command(sec: _Section, key: str, kind: type | tuple[type, ...]) -> list[str] | None:
    command = sec.get(key, kind)
    if isinstance(command, str):
        command = [command]
    if command is not None and (not command or not all(isinstance(c, str) for c in command)):
        raise ConfigError(f"{sec.where}.{key} must be a non-empty list of strings")
    if command is not None and not command[0].strip():
        raise ConfigError(f"{sec.where}.{key} must start with a program name, got {command!r}")
    return command


def _secret(sec: _Section, username: str, required: bool = True) -> Secret:
    """Where the table's password comes from: exactly one source (none, when not required)."""
    command = _command(sec, "password_command", (list, str))
    inline = sec.get("password", str)
    if inline is not None and not inline.strip():
        raise ConfigError(f"{sec.where}.password is empty: " + (
            "set the password, or use password_command, password_env or password_keyring" if required else
            "set a password or leave the key out"))
    secret = Secret(
        where=sec.where,
        command=tuple(command) if command else None,
        env=sec.text("password_env"),
        keyring=sec.text("password_keyring"),
        username=username,
        inline=inline,
    )
    found = [key for key in PASSWORD_SOURCES if key in sec.data]
    if len(found) > 1:
        raise ConfigError(f"{sec.where}: set only one of {', '.join(PASSWORD_SOURCES)} (found {', '.join(found)})")
    if required and not found:
        raise ConfigError(f"{sec.where}: set password_command, password_env, password_keyring or password")
    return secret


def _check_link(link: str) -> None:
    """[crm] link is a str.format template: `{id}` must be in it and is the only field, and
    it must format an id. Otherwise the first import would commit and then fail on it."""
    lone_brace = (f"crm.link {link!r} has a lone {{ or }}; write {{{{ or }}}} for a literal brace and {{id}} "
                  "for the activity id")
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(link) if name is not None]
    except ValueError:
        raise ConfigError(lone_brace)
    for name in fields:
        if name != "id":
            raise ConfigError(f"crm.link {link!r} has the field {{{name}}}; only {{id}} (the activity id) is allowed")
    if not fields:
        raise ConfigError("crm.link must contain {id}, e.g. https://crm.example.com/activities/{id}")
    try:
        link.format(id=1)
    except (ValueError, KeyError, IndexError, AttributeError, TypeError) as exc:  # a format spec or conversion
        raise ConfigError(f"crm.link {link!r} cannot show an activity id ({exc}); write {{id}}")


def _imap(sec: _Section, account: str) -> ImapConfig:
    security = sec.get("security", str, "tls")
    if security not in SECURITY_MODES:
        raise ConfigError(f"{sec.where}.security must be one of {', '.join(SECURITY_MODES)}, got {security!r}")
    username = sec.text("username", required=True)
    default_port = {"tls": 993, "starttls": 143, "none": 143}[security]
    import_root = sec.get("import_root", str, "INBOX")  # "" is the top level, for servers without INBOX/...
    archive = sec.text("archive_folder", f"{import_root}/CRM Archiv" if import_root else "CRM Archiv")
    last = archive.replace("\\", "/").split("/")[-1].split(".")[-1]
    if parse_import_folder(last) is not None or parse_import_folder(archive.rsplit("/", 1)[-1]) is not None:
        raise ConfigError(
            f"{sec.where}.archive_folder {archive!r} looks like an import folder (CRM ... [X]); "
            "choose a name without a [status] suffix"
        )
    port = sec.get("port", int, default_port)
    if not 0 < port < 65536:
        raise ConfigError(f"{sec.where}.port must be between 1 and 65535, got {port}")
    imap = ImapConfig(
        host=sec.text("host", required=True),
        port=port,
        security=security,
        verify=sec.get("verify", bool, True),
        ca_file=sec.text("ca_file"),
        username=username,
        secret=_secret(sec, username),
        import_root=import_root,
        archive_folder=archive,
        timeout=sec.number("timeout", 60, 1, MAX_TIMEOUT, "a number of seconds"),
    )
    sec.reject_unknown()
    return imap


def _caldav(sec: _Section) -> CaldavConfig:
    url = sec.get("url", str, required=True)
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"{sec.where}.url must start with https:// (or http:// for a local server)")
    username = sec.text("username", required=True)
    caldav = CaldavConfig(
        url=url if url.endswith("/") else url + "/",
        username=username,
        secret=_secret(sec, username),
        events=sec.text("events", "calendar"),
        tasks=sec.text("tasks", "tasks"),
        verify=sec.get("verify", bool, True),
        ca_file=sec.text("ca_file"),
        timeout=sec.number("timeout", 60, 1, MAX_TIMEOUT, "a number of seconds"),
    )
    sec.reject_unknown()
    return caldav


def _sieve(sec: "_Section | None", imap: ImapConfig | None) -> SieveConfig | None:
    """[accounts.X.sieve]: everything defaults to the IMAP settings, port 4190."""
    sec = sec or _Section({}, "sieve")
    host = sec.text("host", imap.host if imap else None)
    username = sec.text("username", imap.username if imap else None)
    if host is None or username is None:
        raise ConfigError(f"{sec.where}: set host and username (there is no [imap] table to take them from)")
    own = _secret(sec, username, required=imap is None)
    security = sec.get("security", str, imap.security if imap else "starttls")
    if security not in SECURITY_MODES:
        raise ConfigError(f"{sec.where}.security must be one of {', '.join(SECURITY_MODES)}")
    port = sec.get("port", int, 4190)
    if not 0 < port < 65536:
        raise ConfigError(f"{sec.where}.port must be between 1 and 65535, got {port}")
    verify = sec.get("verify", bool, imap.verify if imap else True)
    ca_file = sec.text("ca_file", imap.ca_file if imap else None)
    sec.reject_unknown()
    return SieveConfig(host=host, port=port, starttls=security != "none", username=username,
                       secret=own if own.configured or imap is None else imap.secret, verify=verify, ca_file=ca_file)


def parse_config(data: dict[str, Any], path: Path | None = None) -> Config:
    root = _Section(data, "config")
    crm_sec = root.section("crm") or _Section({}, "crm")
    crm_sec.where = "crm"
    database = _path(crm_sec.text("database", str(_default_data_dir() / "crm.db")))
    documents = _path(crm_sec.text("documents", str(database.parent / "documents")))
    statuses_sec = crm_sec.section("statuses")
    if statuses_sec is not None:
        statuses = {}
        for key, label in statuses_sec.data.items():
            if not isinstance(label, str):
                raise ConfigError(f"crm.statuses.{key} must be a string label")
            if not key or "[" in key or "]" in key or any(c.isspace() for c in key):  # as a folder reads it
                raise ConfigError(f"crm.statuses: {key!r} is not a usable status key")
            statuses[key] = label
        if not statuses:
            raise ConfigError("crm.statuses is empty: list at least one status key")
    else:
        statuses = dict(DEFAULT_STATUSES)
    mandatory = crm_sec.get("mandatory", list, [])
    for item in mandatory:
        if item not in MANDATORY_FIELDS:
            raise ConfigError(
                f"crm.mandatory: unknown field {item!r} (known: {', '.join(MANDATORY_FIELDS)})"
            )
    serve = _serve(root.section("serve") or _Section({}, "serve"))
    link = crm_sec.get("link", str, serve.base_url + "/activities/{id}")
    _check_link(link)
    max_attempts = crm_sec.get("max_attempts", int, 3)
    if max_attempts < 1:
        raise ConfigError("crm.max_attempts must be at least 1")
    if max_attempts > MAX_ATTEMPTS:
        raise ConfigError(f"crm.max_attempts must be at most {MAX_ATTEMPTS}, got {max_attempts}")
    kinds = dict(DEFAULT_KINDS)
    kinds_sec = crm_sec.section("kinds")
    if kinds_sec is not None:
        for kind, target in kinds_sec.data.items():
            if not kind.strip():
                raise ConfigError(f"crm.kinds: {kind!r} is not a usable kind name")
            if target not in ("events", "tasks"):
                raise ConfigError(f"crm.kinds.{kind} must be \"events\" or \"tasks\", got {target!r}")
            kinds[kind] = target
    done_status = crm_sec.get("done_status", str, "E" if "E" in statuses else next(iter(statuses)))
    open_status = crm_sec.get("open_status", str, "O" if "O" in statuses else next(iter(statuses)))
    for key, value in (("done_status", done_status), ("open_status", open_status)):
        if value not in statuses:
            raise ConfigError(f"crm.{key} {value!r} is not one of the status keys in [crm.statuses]")
    crm = CrmConfig(
        database=database,
        documents=documents,
        link=link,
        mandatory=tuple(mandatory),
        statuses=statuses,
        max_attempts=max_attempts,
        attachment_review=crm_sec.get("attachment_review", bool, False),
        kinds=kinds,
        done_status=done_status,
        open_status=open_status,
    )
    crm_sec.reject_unknown()

    state_sec = root.section("state") or _Section({}, "state")
    state_sec.where = "state"
    state_db = _path(state_sec.text("database", str(_default_state_dir() / "state.db")))
    state_sec.reject_unknown()

    accounts: dict[str, AccountConfig] = {}
    accounts_sec = root.section("accounts")
    if accounts_sec is not None:
        accounts_sec.where = "accounts"
        for name in accounts_sec.data:
            if not name.strip():
                raise ConfigError(f"accounts: {name!r} is not a usable account name")
            acc = accounts_sec.section(name)
            areas = acc.get("areas", list, ["mail"])
            for area in areas:
                if area not in AREAS:
                    raise ConfigError(f"accounts.{name}.areas: unknown area {area!r} (use {', '.join(AREAS)})")
                if areas.count(area) > 1:
                    raise ConfigError(f"accounts.{name}.areas lists {area!r} twice")
            if not areas:
                raise ConfigError(f"accounts.{name}.areas is empty: list at least one of {', '.join(AREAS)}")
            interval = acc.get("interval", int, 300)
            if interval < 1:
                raise ConfigError(f"accounts.{name}.interval must be at least 1 second")
            if interval > MAX_INTERVAL:
                raise ConfigError(f"accounts.{name}.interval must be at most {MAX_INTERVAL} seconds (one day), "
                                  f"got {interval}")
            imap_sec = acc.section("imap")
            imap = _imap(imap_sec, name) if imap_sec is not None else None
            if "mail" in areas and imap is None:
                raise ConfigError(f"accounts.{name}: area mail needs an [accounts.{name}.imap] table")
            caldav_sec = acc.section("caldav")
            caldav = _caldav(caldav_sec) if caldav_sec is not None else None
            for area in ("events", "tasks"):
                if area in areas and caldav is None:
                    raise ConfigError(f"accounts.{name}: area {area} needs an [accounts.{name}.caldav] table")
            notify = _command(acc, "notify_command", list)
            sieve_sec = acc.section("sieve")
            sieve = _sieve(sieve_sec, imap) if sieve_sec is not None or imap is not None else None
            acc.reject_unknown()
            accounts[name] = AccountConfig(name=name, areas=tuple(areas), interval=interval, imap=imap,
                                           caldav=caldav, notify_command=tuple(notify) if notify else None,
                                           sieve=sieve)
    sync_sec = root.section("sync") or _Section({}, "sync")
    sync_sec.where = "sync"
    conflict = sync_sec.get("conflict", str, "newest")
    if conflict not in CONFLICT_POLICIES:
        raise ConfigError(f"sync.conflict must be one of {', '.join(CONFLICT_POLICIES)}, got {conflict!r}")
    share = float(sync_sec.get("max_delete_share", (int, float), 0.5))
    if not 0 < share <= 1:
        raise ConfigError("sync.max_delete_share must be above 0 and at most 1")
    sync_sec.reject_unknown()
    root.reject_unknown()
    return Config(crm=crm, state_database=state_db, accounts=accounts, path=path,
                  sync=SyncConfig(conflict=conflict, max_delete_share=share), serve=serve)


def _serve(sec: _Section) -> ServeConfig:
    sec.where = "serve"
    port = sec.get("port", int, 8765)
    if not 0 < port < 65536:
        raise ConfigError(f"serve.port must be between 1 and 65535, got {port}")
    secret = _secret(sec, "serve", required=False)  # keyring user name: "serve"
    url = sec.get("url", str)
    if url is not None and not url.startswith(("http://", "https://")):
        raise ConfigError(f"serve.url must start with https:// or http://, got {url!r}")
    host = sec.text("host", "127.0.0.1")
    for key, value in (("host", host), ("url", url or "")):
        if "{" in value or "}" in value:  # the default [crm] link is a template made from them
            raise ConfigError(f"serve.{key} must not contain {{ or }} (it becomes part of [crm] link), got {value!r}")
    serve = ServeConfig(host=host, port=port, secret=secret if secret.configured else None, url=url)
    sec.reject_unknown()
    return serve


def load_config(path: Path | None = None) -> Config:
    path = path or default_config_path()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"no config file at {path} (create one, see the README, or pass --config)")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config {path} is not UTF-8")
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path}: {exc}")
    return parse_config(data, path)

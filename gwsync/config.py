"""The TOML config (SPEC section 2): loading, defaults, and one-line errors for bad keys."""

from __future__ import annotations

import os
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
            # Only the first line: `pass show` prints the password and then other fields.
            return out.stdout.decode("utf-8", "replace").splitlines()[0] if out.stdout else ""
        if self.env:
            value = os.environ.get(self.env)
            if value is None:
                raise ConfigError(f"{self.where}.password_env: environment variable {self.env} is not set")
            return value
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
            return value
        if self.inline is not None:
            return self.inline
        raise ConfigError(f"{self.where}: set password_command, password_env, password_keyring or password")


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
            raise ConfigError(f"[{where}] must be a table")
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

    def section(self, key: str) -> "_Section | None":
        self.used.add(key)
        if key not in self.data:
            return None
        return _Section(self.data[key], f"{self.where}.{key}")

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


def _secret(sec: _Section, username: str) -> Secret:
    command = sec.get("password_command", (list, str))
    if isinstance(command, str):
        command = [command]
    if command is not None and (not command or not all(isinstance(c, str) for c in command)):
        raise ConfigError(f"{sec.where}.password_command must be a non-empty list of strings")
    return Secret(
        where=sec.where,
        command=tuple(command) if command else None,
        env=sec.get("password_env", str),
        keyring=sec.get("password_keyring", str),
        username=username,
        inline=sec.get("password", str),
    )


def _imap(sec: _Section, account: str) -> ImapConfig:
    security = sec.get("security", str, "tls")
    if security not in SECURITY_MODES:
        raise ConfigError(f"{sec.where}.security must be one of {', '.join(SECURITY_MODES)}, got {security!r}")
    username = sec.get("username", str, required=True)
    default_port = {"tls": 993, "starttls": 143, "none": 143}[security]
    import_root = sec.get("import_root", str, "INBOX")
    archive = sec.get("archive_folder", str, f"{import_root}/CRM Archiv")
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
        host=sec.get("host", str, required=True),
        port=port,
        security=security,
        verify=sec.get("verify", bool, True),
        ca_file=sec.get("ca_file", str),
        username=username,
        secret=_secret(sec, username),
        import_root=import_root,
        archive_folder=archive,
        timeout=float(sec.get("timeout", (int, float), 60)),
    )
    sec.reject_unknown()
    return imap


def _caldav(sec: _Section) -> CaldavConfig:
    url = sec.get("url", str, required=True)
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"{sec.where}.url must start with https:// (or http:// for a local server)")
    username = sec.get("username", str, required=True)
    caldav = CaldavConfig(
        url=url if url.endswith("/") else url + "/",
        username=username,
        secret=_secret(sec, username),
        events=sec.get("events", str, "calendar"),
        tasks=sec.get("tasks", str, "tasks"),
        verify=sec.get("verify", bool, True),
        ca_file=sec.get("ca_file", str),
        timeout=float(sec.get("timeout", (int, float), 60)),
    )
    sec.reject_unknown()
    return caldav


def _sieve(sec: "_Section | None", imap: ImapConfig | None) -> SieveConfig | None:
    """[accounts.X.sieve]: everything defaults to the IMAP settings, port 4190."""
    sec = sec or _Section({}, "sieve")
    host = sec.get("host", str, imap.host if imap else None)
    username = sec.get("username", str, imap.username if imap else None)
    if host is None or username is None:
        raise ConfigError(f"{sec.where}: set host and username (there is no [imap] table to take them from)")
    own = _secret(sec, username)
    security = sec.get("security", str, imap.security if imap else "starttls")
    if security not in SECURITY_MODES:
        raise ConfigError(f"{sec.where}.security must be one of {', '.join(SECURITY_MODES)}")
    port = sec.get("port", int, 4190)
    verify = sec.get("verify", bool, imap.verify if imap else True)
    ca_file = sec.get("ca_file", str, imap.ca_file if imap else None)
    sec.reject_unknown()
    return SieveConfig(host=host, port=port, starttls=security != "none", username=username,
                       secret=own if own.configured or imap is None else imap.secret, verify=verify, ca_file=ca_file)


def parse_config(data: dict[str, Any], path: Path | None = None) -> Config:
    root = _Section(data, "config")
    crm_sec = root.section("crm") or _Section({}, "crm")
    crm_sec.where = "crm"
    database = _path(crm_sec.get("database", str, str(_default_data_dir() / "crm.db")))
    documents = _path(crm_sec.get("documents", str, str(database.parent / "documents")))
    statuses_sec = crm_sec.section("statuses")
    if statuses_sec is not None:
        statuses = {}
        for key, label in statuses_sec.data.items():
            if not isinstance(label, str):
                raise ConfigError(f"crm.statuses.{key} must be a string label")
            if not key or "[" in key or "]" in key:
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
    if "{id}" not in link:
        raise ConfigError("crm.link must contain {id}, e.g. https://crm.example.com/activities/{id}")
    max_attempts = crm_sec.get("max_attempts", int, 3)
    if max_attempts < 1:
        raise ConfigError("crm.max_attempts must be at least 1")
    kinds = dict(DEFAULT_KINDS)
    kinds_sec = crm_sec.section("kinds")
    if kinds_sec is not None:
        for kind, target in kinds_sec.data.items():
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
    state_db = _path(state_sec.get("database", str, str(_default_state_dir() / "state.db")))
    state_sec.reject_unknown()

    accounts: dict[str, AccountConfig] = {}
    accounts_sec = root.section("accounts")
    if accounts_sec is not None:
        accounts_sec.where = "accounts"
        for name in accounts_sec.data:
            acc = accounts_sec.section(name)
            areas = acc.get("areas", list, ["mail"])
            for area in areas:
                if area not in AREAS:
                    raise ConfigError(f"accounts.{name}.areas: unknown area {area!r} (use {', '.join(AREAS)})")
            interval = acc.get("interval", int, 300)
            if interval < 1:
                raise ConfigError(f"accounts.{name}.interval must be at least 1 second")
            imap_sec = acc.section("imap")
            imap = _imap(imap_sec, name) if imap_sec is not None else None
            if "mail" in areas and imap is None:
                raise ConfigError(f"accounts.{name}: area mail needs an [accounts.{name}.imap] table")
            caldav_sec = acc.section("caldav")
            caldav = _caldav(caldav_sec) if caldav_sec is not None else None
            for area in ("events", "tasks"):
                if area in areas and caldav is None:
                    raise ConfigError(f"accounts.{name}: area {area} needs an [accounts.{name}.caldav] table")
            notify = acc.get("notify_command", list)
            if notify is not None and (not notify or not all(isinstance(c, str) for c in notify)):
                raise ConfigError(f"accounts.{name}.notify_command must be a non-empty list of strings")
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
    secret = _secret(sec, "serve")  # keyring user name: "serve"
    if secret.inline == "":
        raise ConfigError("serve.password is empty: set a password or leave the key out")
    url = sec.get("url", str)
    if url is not None and not url.startswith(("http://", "https://")):
        raise ConfigError(f"serve.url must start with https:// or http://, got {url!r}")
    serve = ServeConfig(host=sec.get("host", str, "127.0.0.1"), port=port,
                        secret=secret if secret.configured else None, url=url)
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

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
            try:
                import keyring  # optional dependency
            except ImportError:
                raise ConfigError(f"{self.where}.password_keyring needs the keyring package (pip install keyring)")
            value = keyring.get_password(self.keyring, self.username)
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
class AccountConfig:
    name: str
    areas: tuple[str, ...] = ("mail",)
    interval: int = 300
    imap: ImapConfig | None = None


@dataclass(frozen=True)
class CrmConfig:
    database: Path
    documents: Path
    link: str = DEFAULT_LINK
    mandatory: tuple[str, ...] = ()
    statuses: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_STATUSES))
    max_attempts: int = 3
    attachment_review: bool = False


@dataclass(frozen=True)
class Config:
    crm: CrmConfig
    state_database: Path
    accounts: dict[str, AccountConfig]
    path: Path | None = None

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
    link = crm_sec.get("link", str, DEFAULT_LINK)
    if "{id}" not in link:
        raise ConfigError("crm.link must contain {id}, e.g. https://crm.example.com/activities/{id}")
    max_attempts = crm_sec.get("max_attempts", int, 3)
    if max_attempts < 1:
        raise ConfigError("crm.max_attempts must be at least 1")
    crm = CrmConfig(
        database=database,
        documents=documents,
        link=link,
        mandatory=tuple(mandatory),
        statuses=statuses,
        max_attempts=max_attempts,
        attachment_review=crm_sec.get("attachment_review", bool, False),
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
            # caldav and sieve belong to later areas; accept them so configs can be written ahead.
            acc.reject_unknown(allowed_extra=("caldav", "sieve", "notify_command"))
            accounts[name] = AccountConfig(name=name, areas=tuple(areas), interval=interval, imap=imap)
    root.reject_unknown()
    return Config(crm=crm, state_database=state_db, accounts=accounts, path=path)


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

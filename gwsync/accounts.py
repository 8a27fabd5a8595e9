"""Accounts kept in the database (`gwsync accounts`), beside the config file's [accounts.NAME].

A company keeps its accounts in the state database (the SQLite file of [state], or the
PostgreSQL of [database] url): a name, the user's name on the servers, a mail address and the
areas. The config's [defaults] make each a full account (Config.account_from_record): host,
security and the master user's credential of [defaults.imap], the calendar URL template and the
service user of [defaults.caldav].

Order of work when a run loads its accounts (`with_database_accounts`, once per run: when an
Engine opens the stores for a config that has not loaded them; the command line's config is
that Engine's):
1. read every record of the accounts table;
2. a name that is also in the config file is a ConfigError (one line; `gwsync accounts remove`
   or the file's table fixes it, and `gwsync accounts` itself runs on the file alone);
3. each record becomes an AccountConfig through [defaults]; a record that cannot (the
   [defaults] it needs are gone) is a ConfigError naming it;
4. the config is copied with these accounts after the file's, and `database_accounts` names them.

An import (`read_csv`, then `checked`) is all or nothing: every row is checked first, against
the file's other rows, the config file's names and [defaults]; one bad row writes nothing, and
the rows are then written in one transaction (StateStore.save_accounts). An account of the file
that is stored with the same username, email and areas is left as it is, so importing a file
again changes nothing.
"""

from __future__ import annotations

import copy
import csv
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from .config import AREAS, AccountConfig, Config, ConfigError
from .errors import UsageError
from .storage.records import AccountRecord

if TYPE_CHECKING:
    from .storage.state import StateStore

# A name for the command line, file names and key paths: no spaces, no quotes, no slashes.
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._@+-]{0,99}")
USERNAME = re.compile(r"[^\s\"']{1,200}")
EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
COLUMNS = ("name", "username", "email", "areas")
CSV_AREAS = ";"  # areas in a CSV cell: mail;events


class BadRecord(UsageError):
    """A name, username, address or area that no account can have (exit 2)."""


def parse_areas(text: str | Iterable[str] | None, separator: str = ",") -> tuple[str, ...]:
    """The areas of "mail,events" (a CSV cell: "mail;events"); empty or None: mail."""
    items = text.split(separator) if isinstance(text, str) else list(text or ())
    areas = tuple(item.strip().lower() for item in items if item.strip())
    for area in areas:
        if area not in AREAS:
            raise BadRecord(f"unknown area {area!r} (use {', '.join(AREAS)})")
        if areas.count(area) > 1:
            raise BadRecord(f"area {area!r} is listed twice")
    return areas or ("mail",)


def record(name: str, username: str | None = None, email: str | None = None,
           areas: str | Iterable[str] | None = None, separator: str = ",") -> AccountRecord:
    """A record from what a user typed: username defaults to the name, areas to mail."""
    name = name.strip()
    if not NAME.fullmatch(name):
        raise BadRecord(f"{name!r} is not a usable account name (letters, digits and . _ @ + -, starting with a "
                        "letter or digit)")
    username = (username or "").strip() or name
    if not USERNAME.fullmatch(username):
        raise BadRecord(f"account {name}: {username!r} is not a usable username (no spaces or quotes)")
    email = (email or "").strip() or None
    if email is not None and not EMAIL.fullmatch(email):
        raise BadRecord(f"account {name}: {email!r} is not a mail address (name@example.com)")
    try:
        return AccountRecord(name=name, username=username, email=email, areas=parse_areas(areas, separator))
    except BadRecord as exc:
        raise exc.reworded(f"account {name}: {exc.message}") from None


def needs_defaults(config: Config, areas: Iterable[str]) -> str | None:
    """What [defaults] lacks for an account of the database with these areas, or None."""
    missing = []
    if "mail" in areas and config.defaults.imap is None:
        missing.append("[defaults.imap] (host and master_user with its password)")
    if {"events", "tasks"} & set(areas) and config.defaults.caldav is None:
        missing.append("[defaults.caldav] (url with {username}, and the service user's username and password)")
    if not missing:
        return None
    where = f" to {config.path}" if config.path else ""
    return (f"accounts kept in the database take their servers from [defaults]: add {' and '.join(missing)}"
            f"{where} (README: Company deployment)")


def full_account(config: Config, item: AccountRecord) -> AccountConfig:
    """The AccountConfig of a record, through the config's [defaults]; a ConfigError naming the
    account when [defaults] cannot make one."""
    lacking = needs_defaults(config, item.areas)
    if lacking:
        raise ConfigError(f"account {item.name} (in the database): {lacking}")
    try:
        return config.account_from_record(item.name, item.username, item.email, item.areas)
    except ConfigError as exc:
        # Its tables are [defaults]' (the keys of accounts.NAME.imap come from [defaults.imap]).
        tables = [t for t in ("imap", "caldav") if f"accounts.{item.name}.{t}" in exc.message]
        hint = f" (set it in [defaults.{tables[0]}])" if tables else ""
        raise exc.reworded(f"account {item.name} (in the database): {exc.message}{hint}") from None


def in_file(config: Config, name: str) -> str | None:
    """The message for a name the config file has, or None."""
    if name not in config.accounts or name in (config.database_accounts or ()):
        return None
    return (f"account {name!r} is in the config file ([accounts.{name}]): a name is either there or in the "
            "database, not both")


def checked(config: Config, records: list[AccountRecord]) -> None:
    """Each record against the config file's names and [defaults] (raises for the first one)."""
    for item in records:
        clash = in_file(config, item.name)
        if clash:
            raise BadRecord(clash)
        full_account(config, item)


def with_database_accounts(config: Config, state: StateStore) -> Config:
    """The config with the database's accounts after the file's (see the module doc); the
    config itself when it has them already."""
    if config.database_accounts is not None:
        return config
    return merged(config, state.accounts())


def merged(config: Config, records: list[AccountRecord]) -> Config:
    accounts = dict(config.accounts)
    for item in records:
        if item.name in accounts:
            raise ConfigError(f"account {item.name!r} is both in the config file ([accounts.{item.name}]) and in the "
                              f"database: remove one (`gwsync accounts remove {item.name}`, or the table)")
        accounts[item.name] = full_account(config, item)
    out = copy.copy(config)  # not dataclasses.replace: the file's accounts are complete already
    object.__setattr__(out, "accounts", accounts)
    object.__setattr__(out, "database_accounts", tuple(item.name for item in records))
    return out


# -- CSV files ----------------------------------------------------------------------------------

def read_csv(path: Path) -> list[tuple[int, AccountRecord]]:
    """(line, record) of each row of an accounts file: a header row naming its columns (name,
    and any of username, email, areas), then one account per row; blank rows are skipped, areas
    are separated by ";". A bad file or row is a BadRecord naming the file and the line; the
    rows after a bad one are checked too and counted in its message."""
    try:
        text = path.read_bytes().decode("utf-8-sig")  # a spreadsheet's BOM is not part of "name"
    except FileNotFoundError:
        raise BadRecord(f"{path}: no such file") from None
    except IsADirectoryError:
        raise BadRecord(f"{path} is a directory, not a CSV file") from None
    except OSError as exc:
        raise BadRecord(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise BadRecord(f"{path} is not UTF-8: save it as CSV UTF-8") from None
    reader = csv.reader(text.splitlines(keepends=True), strict=True)  # an open quote is an error
    errors: list[str] = []
    out: list[tuple[int, AccountRecord]] = []
    seen: dict[str, int] = {}
    header: list[str] | None = None
    try:
        for row in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if header is None:
                header = _header(path, line, row)
                continue
            try:
                item = _row(header, row)
            except BadRecord as exc:
                errors.append(f"{path} line {line}: {exc.message}")
                continue
            if item.name in seen:
                errors.append(f"{path} line {line}: account {item.name!r} is on line {seen[item.name]} too")
                continue
            seen[item.name] = line
            out.append((line, item))
    except csv.Error as exc:
        errors.append(f"{path} line {reader.line_num}: {exc} (check the quotes)")
    if header is None and not errors:
        raise BadRecord(f"{path} is empty: write a header row ({','.join(COLUMNS)}), then one account per row")
    if errors:
        more = f" ({len(errors) - 1} more bad rows after it)" if len(errors) > 1 else ""
        raise BadRecord(errors[0] + more)
    return out


def _header(path: Path, line: int, row: list[str]) -> list[str]:
    names = [cell.strip().lower() for cell in row]
    for name in names:
        if name not in COLUMNS:
            raise BadRecord(f"{path} line {line}: unknown column {name!r} in the header (the columns are "
                            f"{', '.join(COLUMNS)}; the first row names them)")
        if names.count(name) > 1:
            raise BadRecord(f"{path} line {line}: column {name!r} is in the header twice")
    if "name" not in names:
        raise BadRecord(f"{path} line {line}: the header has no column name (the columns are {', '.join(COLUMNS)})")
    return names


def _row(header: list[str], row: list[str]) -> AccountRecord:
    if len(row) > len(header):
        raise BadRecord(f"{len(row)} fields, but the header has {len(header)} (quote a field that holds a comma)")
    cells = dict(zip(header, row + [""] * (len(header) - len(row)), strict=True))
    if not cells["name"].strip():
        raise BadRecord("no name")
    return record(cells["name"], cells.get("username"), cells.get("email"), cells.get("areas"), CSV_AREAS)


def check_rows(path: Path, config: Config, rows: list[tuple[int, AccountRecord]]) -> None:
    """Each row against the config (the file's names, [defaults]); the first bad one is a
    BadRecord naming the file and its line."""
    errors = []
    for line, item in rows:
        try:
            checked(config, [item])
        except (BadRecord, ConfigError) as exc:
            errors.append(f"{path} line {line}: {exc.message}")
    if errors:
        more = f" ({len(errors) - 1} more bad rows after it)" if len(errors) > 1 else ""
        raise BadRecord(errors[0] + more)

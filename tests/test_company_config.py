"""[defaults] (README: Company deployment): a host, a login form and one shared credential for
every account; an account of a name, a username, an email and areas is a full account. Units:
the config alone, no server."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gwsync.config import ConfigError, load_config, parse_config

IMAP = {"host": "mail.firma.example", "port": 143, "security": "starttls", "import_root": "INBOX/CRM",
        "archive_folder": "INBOX/Archiv", "master_user": "gwsync", "password_env": "GW_MASTER"}
CALDAV = {"url": "https://dav.firma.example/{username}/", "username": "davsvc", "password_env": "GW_DAV",
          "events": "Kalender", "tasks": "Aufgaben"}


def company(accounts: dict, imap: dict | None = IMAP, caldav: dict | None = CALDAV):
    defaults = {key: table for key, table in (("imap", imap), ("caldav", caldav)) if table is not None}
    return parse_config({"defaults": defaults, "accounts": accounts})


def error(data: dict) -> str:
    with pytest.raises(ConfigError) as exc:
        parse_config(data)
    return str(exc.value)


def test_an_account_with_a_username_only_is_a_full_account_from_the_defaults():
    config = company({"anna": {"username": "anna.berg", "email": "Anna.Berg@firma.example",
                               "areas": ["mail", "events", "tasks"]}})
    anna = config.account("anna")
    imap, dav = anna.imap, anna.caldav
    assert (imap.host, imap.port, imap.security, imap.import_root, imap.archive_folder) == \
        ("mail.firma.example", 143, "starttls", "INBOX/CRM", "INBOX/Archiv")
    assert imap.username == "anna.berg" and imap.login() == ("anna.berg*gwsync", None)
    assert imap.secret.where == "defaults.imap" and imap.secret.env == "GW_MASTER"
    assert imap.secret.username == "gwsync"  # the keyring entry is the master user's
    assert (dav.url, dav.username, dav.events, dav.tasks) == \
        ("https://dav.firma.example/anna.berg/", "davsvc", "Kalender", "Aufgaben")
    assert dav.secret.where == "defaults.caldav" and dav.auth == "password"
    assert anna.addresses == ("anna.berg@firma.example",)
    assert anna.sieve.login() == ("anna.berg*gwsync", None) and anna.sieve.secret == imap.secret


def test_the_username_defaults_to_the_account_name():
    config = company({"ben": {}})
    assert config.account("ben").imap.username == "ben" and config.account("ben").imap.login()[0] == "ben*gwsync"


def test_every_account_sends_one_and_the_same_credential():
    config = company({name: {"areas": ["mail", "events"]} for name in ("anna", "ben", "cem")})
    assert len({a.imap.secret for a in config.accounts.values()}) == 1
    assert len({a.caldav.secret for a in config.accounts.values()}) == 1


def test_the_login_forms():
    sasl = company({"anna": {}}, imap=IMAP | {"master_login": "sasl"}).account("anna").imap
    assert sasl.login() == ("gwsync", "anna")
    percent = company({"anna": {}}, imap=IMAP | {"master_separator": "%"}).account("anna").imap
    assert percent.login() == ("anna%gwsync", None)
    own = company({"anna": {"imap": {"master_login": "none", "password": "pw"}}}).account("anna").imap
    assert own.login() == ("anna", None) and own.secret.where == "accounts.anna.imap" and own.master_user is None


def test_an_accounts_tables_override_the_defaults_key_by_key():
    config = company({"anna": {"areas": ["mail", "events"], "imap": {"port": 1143, "archive_folder": "Archiv"},
                               "caldav": {"url": "https://other.example/cal/anna/", "events": "Termine"}}})
    anna = config.account("anna")
    assert (anna.imap.host, anna.imap.port, anna.imap.archive_folder) == ("mail.firma.example", 1143, "Archiv")
    assert anna.imap.secret.where == "defaults.imap"  # still the master credential
    assert (anna.caldav.url, anna.caldav.events, anna.caldav.tasks) == \
        ("https://other.example/cal/anna/", "Termine", "Aufgaben")


def test_an_account_with_a_credential_of_its_own_keeps_it():
    config = company({"anna": {"areas": ["events"], "caldav": {"password": "own"}}})
    dav = config.account("anna").caldav
    assert dav.username == "anna" and dav.secret.where == "accounts.anna.caldav"
    own_master = company({"anna": {"imap": {"master_user": "admin", "password": "x"}}}).account("anna").imap
    assert own_master.login() == ("anna*admin", None) and own_master.secret.where == "accounts.anna.imap"


def test_accounts_without_defaults_work_as_before():
    config = parse_config({"accounts": {"a": {"imap": {"host": "h", "username": "u", "password": "p"}}}})
    assert config.account("a").imap.login() == ("u", None) and config.account("a").imap.master_user is None


def test_the_accounts_username_fills_its_tables_without_defaults_too():
    config = parse_config({"accounts": {"a": {"username": "anna", "areas": ["mail", "events"],
                                              "imap": {"host": "h", "password": "p"},
                                              "caldav": {"url": "https://dav.example/anna/", "password": "q"}}}})
    assert config.account("a").imap.username == "anna" and config.account("a").caldav.username == "anna"
    assert config.account("a").imap.secret.where == "accounts.a.imap"


def test_a_record_and_the_defaults_make_an_account():
    """Accounts kept in a database are name, username, email and areas: the config's [defaults]
    make them full accounts, checked as one from the file would be."""
    config = company({})
    anna = config.account_from_record("anna", username="anna.berg", email="anna@firma.example",
                                      areas=("mail", "tasks"))
    assert anna.name == "anna" and anna.imap.login() == ("anna.berg*gwsync", None)
    assert anna.caldav.url == "https://dav.firma.example/anna.berg/" and anna.addresses == ("anna@firma.example",)
    assert anna.imap.secret == company({"x": {}}).account("x").imap.secret
    with pytest.raises(ConfigError, match=r"accounts\.bob\.areas: unknown area 'fax'"):
        config.account_from_record("bob", areas=("fax",))
    with pytest.raises(ConfigError, match=r"area mail needs an \[accounts\.bob\.imap\] table"):
        parse_config({}).account_from_record("bob")


@pytest.mark.parametrize("data, message", [
    ({"defaults": {"imap": {"host": "h", "master_user": "gwsync"}}},
     "defaults.imap: master_user 'gwsync' needs its password: set password_command, password_env, "
     "password_keyring or password"),
    ({"defaults": {"imap": {"host": "h", "password": "pw"}}},
     "defaults.imap: a password here is the master user's: set master_user (e.g. \"gwsync\"), or give each "
     "account its password in [accounts.NAME.imap]"),
    ({"defaults": {"imap": {"host": "h", "master_login": "sasl"}}},
     "defaults.imap: master_login = \"sasl\" needs master_user (the master user's name)"),
    ({"defaults": {"imap": {"host": "h", "master_separator": "%"}}},
     "defaults.imap: master_separator needs master_user (the master user's name)"),
    ({"defaults": {"imap": IMAP | {"master_login": "sasl", "master_separator": "%"}}},
     "defaults.imap.master_separator: master_login = \"sasl\" sends no separator; remove it"),
    ({"defaults": {"imap": IMAP | {"master_separator": ""}}},
     "defaults.imap.master_separator must not be empty, got ''"),
    ({"defaults": {"imap": IMAP | {"port": 0}}}, "defaults.imap.port must be between 1 and 65535, got 0"),
    ({"defaults": {"imap": IMAP | {"username": "x"}}},
     "unknown key defaults.imap.username (check the spelling against the README)"),
    ({"defaults": {"caldav": CALDAV | {"url": "https://dav.example/{user}/"}}},
     "defaults.caldav.url 'https://dav.example/{user}/' has the field {user}; only {username} (the account's "
     "username) is allowed"),
    ({"defaults": {"caldav": {"url": "https://dav.example/{username}/", "password": "pw"}}},
     "defaults.caldav: a password needs the service user's username"),
    ({"defaults": {"caldav": {"url": "https://dav.example/{username}/", "username": "svc"}}},
     "defaults.caldav: set password_command, password_env, password_keyring or password"),
    ({"defaults": {"caldav": CALDAV | {"url": "https://dav.example/shared/"}},
      "accounts": {"anna": {"areas": ["events"]}}},
     "accounts.anna.caldav: [defaults.caldav] url 'https://dav.example/shared/' has no {username}, so every "
     "account would use one calendar home: put {username} in it, or set url in [accounts.anna.caldav]"),
    ({"defaults": {"imap": IMAP}, "accounts": {"anna": {"imap": {"password_env": "ANNA"}}}},
     "accounts.anna.imap: password_env is a password for anna, but [defaults.imap] master_user 'gwsync' logs in "
     "for every account: remove password_env (the master user logs in), or set master_login = \"none\" to log in "
     "with the account's own password"),
    ({"defaults": {"imap": IMAP}, "accounts": {"anna": {"imap": {"master_login": "none"}}}},
     "accounts.anna.imap: set password_command, password_env, password_keyring or password"),
    ({"defaults": {"imap": IMAP}, "accounts": {"anna": {"imap": {"master_login": "none", "master_user": "x",
                                                                 "password": "p"}}}},
     "accounts.anna.imap: master_login = \"none\" logs in with the account's own password; remove master_user"),
    ({"defaults": {"imap": {"host": "h"}}, "accounts": {"anna": {}}},
     "accounts.anna.imap: set password_command, password_env, password_keyring or password (or master_user and "
     "its password in [defaults.imap])"),
    ({"accounts": {"anna": {}}},
     "accounts.anna: area mail needs an [accounts.anna.imap] table"),
    ({"defaults": {"caldav": CALDAV}, "accounts": {"anna": {"areas": ["events"], "caldav": {"username": "anna"}}}},
     "accounts.anna.caldav: username 'anna' has no password of its own; set one, or leave username out to log "
     "in as the service user 'davsvc'"),
    ({"accounts": {"anna": {"username": " "}}}, "accounts.anna.username must not be empty, got ' '"),
    ({"accounts": {"anna": {"email": "nobody"}}},
     "accounts.anna.email must be a mail address (name@example.com), got 'nobody'"),
])
def test_each_mistake_is_one_line_naming_the_key(data, message):
    assert error(data) == message


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789.-_@", min_size=1, max_size=30))
def test_any_username_fills_the_url_template_once_and_the_login(username):
    config = company({"a": {"username": username, "areas": ["mail", "events"]}})
    account = config.account("a")
    assert account.caldav.url == f"https://dav.firma.example/{username}/"
    assert account.imap.login() == (f"{username}*gwsync", None)


def test_the_company_example_config_loads():
    config = load_config(Path(__file__).resolve().parent.parent / "examples" / "company.toml")
    anna, ben, cem = (config.account(n) for n in ("anna", "ben", "cem"))
    assert anna.imap.login() == ("anna.berg*gwsync", None) and ben.imap.login() == ("ben*gwsync", None)
    assert anna.caldav.url == "https://dav.firma.example/anna.berg/" and ben.caldav is None
    assert cem.imap.archive_folder == "Archiv" and cem.imap.secret is anna.imap.secret


JUNK = st.recursive(st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=6)
KEYS = [("defaults", "imap", key) for key in (*IMAP, "master_login", "master_separator", "timeout", "verify")] + \
       [("defaults", "caldav", key) for key in (*CALDAV, "auth", "verify")] + \
       [("accounts", "anna", key) for key in ("username", "email", "areas", "imap", "caldav")]


@settings(max_examples=300, deadline=None)
@given(path=st.sampled_from(KEYS), value=JUNK)
def test_any_value_in_defaults_or_a_company_account_loads_or_is_one_line(path, value):
    data = {"defaults": {"imap": dict(IMAP), "caldav": dict(CALDAV)},
            "accounts": {"anna": {"username": "anna", "areas": ["mail", "events"]}}}
    data[path[0]][path[1]][path[2]] = value
    try:
        parse_config(data)
    except ConfigError as exc:
        assert "\n" not in str(exc) and path[0] in str(exc), str(exc)

"""Config loading: defaults, and a one-line error naming the key for anything wrong."""

import copy
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from gwsync.cli import main
from gwsync.config import ConfigError, load_config, parse_config

MINIMAL = {"accounts": {"alice": {"imap": {"host": "imap.example.com", "username": "alice",
                                           "password_env": "X"}}}}


def test_defaults():
    config = parse_config(MINIMAL)
    alice = config.account("alice")
    assert alice.areas == ("mail",) and alice.interval == 300
    assert alice.imap.port == 993 and alice.imap.security == "tls" and alice.imap.verify
    assert alice.imap.import_root == "INBOX" and alice.imap.archive_folder is None  # named by the server:
    assert alice.imap.archive_in("INBOX", "/") == "INBOX/CRM Archiv"
    assert alice.imap.archive_in("INBOX", ".") == "INBOX.CRM Archiv"
    assert alice.imap.max_connections == 3
    assert config.crm.statuses == {"I": "Importiert", "O": "Offen", "E": "Erledigt", "S": "Storniert"}
    assert config.crm.default_status == "I"  # mail lying in the import folder itself
    assert config.crm.mandatory == ()
    assert "{id}" in config.crm.link
    assert (config.sync.private, config.sync.past_days, config.sync.future_days) == ("skip", 30, 365)


def test_an_accounts_own_addresses_default_to_its_imap_username_if_that_is_an_address():
    imap = {"host": "h", "password_env": "X"}
    assert parse_config(MINIMAL).account("alice").addresses == ()
    named = parse_config({"accounts": {"a": {"imap": imap | {"username": "Alice@Firma.example"}}}})
    assert named.account("a").addresses == ("alice@firma.example",)
    given = parse_config({"accounts": {"a": {"addresses": ["Vertrieb@Firma.example", "alice@firma.example",
                                                           "vertrieb@firma.example"],
                                             "imap": imap | {"username": "alice@firma.example"}}}})
    assert given.account("a").addresses == ("vertrieb@firma.example", "alice@firma.example")
    none = parse_config({"accounts": {"a": {"addresses": [], "imap": imap | {"username": "alice@firma.example"}}}})
    assert none.account("a").addresses == ()  # no mail counts as outgoing


def test_spec_example_config_loads(tmp_path):
    text = (Path(__file__).resolve().parent.parent / "examples" / "config.toml").read_text()
    path = tmp_path / "c.toml"
    path.write_text(text)
    config = load_config(path)
    assert "alice" in config.accounts


@pytest.mark.parametrize("data, message", [
    ({"crm": {"databse": "x"}}, "unknown key crm.databse"),
    ({"accounts": {"a": {"imap": {"username": "u"}}}}, "missing key accounts.a.imap.host"),
    ({"accounts": {"a": {"imap": {"host": "h", "username": "u", "port": "993"}}}},
     "accounts.a.imap.port must be an integer"),
    ({"accounts": {"a": {"imap": {"host": "h", "username": "u", "security": "ssl"}}}}, "accounts.a.imap.security"),
    ({"accounts": {"a": {"areas": ["mail", "calendar"], "imap": {"host": "h", "username": "u"}}}},
     "unknown area 'calendar'"),
    ({"accounts": {"a": {"areas": ["mail"]}}}, "area mail needs an [accounts.a.imap] table"),
    ({"accounts": {"a": {"imap": {"host": "h", "username": "u", "archive_folder": "INBOX/CRM Archiv [E]"}}}},
     "looks like an import folder"),
    ({"crm": {"link": "https://crm/"}}, "crm.link must contain {id}"),
    ({"crm": {"mandatory": ["partnr"]}}, "unknown field 'partnr'"),
    ({"crm": {"statuses": {}}}, "crm.statuses is empty"),
    ({"accounts": {"a": {"addresses": ["vertrieb"], "imap": {"host": "h", "username": "u"}}}},
     "accounts.a.addresses must be a list of mail addresses (name@example.com), got 'vertrieb'"),
    ({"accounts": {"a": {"addresses": "a@firma.example", "imap": {"host": "h", "username": "u"}}}},
     "accounts.a.addresses must be a list, got 'a@firma.example'"),
])
def test_errors_name_the_key(data, message):
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert message in str(err.value)


def test_passwords_from_env_command_and_file(monkeypatch):
    base = {"host": "h", "username": "u"}
    monkeypatch.setenv("GW_PW", "from-env")
    assert parse_config({"accounts": {"a": {"imap": base | {"password_env": "GW_PW"}}}}) \
        .account("a").imap.secret.resolve() == "from-env"
    cmd = parse_config({"accounts": {"a": {"imap": base | {"password_command": ["printf", "s3cret\\nuser: x"]}}}})
    assert cmd.account("a").imap.secret.resolve() == "s3cret"
    inline = parse_config({"accounts": {"a": {"imap": base | {"password": "hunter2"}}}})
    assert inline.account("a").imap.secret.resolve() == "hunter2"
    assert "hunter2" not in repr(inline.account("a")) and "hunter2" not in repr(inline)
    missing = parse_config({"accounts": {"a": {"imap": base | {"password_env": "GW_NOT_SET"}}}})
    with pytest.raises(ConfigError, match="GW_NOT_SET is not set"):
        missing.account("a").imap.secret.resolve()
    failing = parse_config({"accounts": {"a": {"imap": base | {"password_command": ["false"]}}}})
    with pytest.raises(ConfigError, match="exited with code 1"):
        failing.account("a").imap.secret.resolve()


def _run(args, env=None):
    return CliRunner().invoke(main, args, env=env)


def test_cli_config_errors_exit_2_with_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[crm\n")
    result = _run(["--config", str(bad), "sync"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "bad.toml" in result.stderr
    result = _run(["--config", str(tmp_path / "missing.toml"), "status"])
    assert result.exit_code == 2 and "no config file" in result.stderr
    result = _run(["sync"], env={"GWSYNC_CONFIG": str(tmp_path / "nowhere.toml")})
    assert result.exit_code == 2 and "nowhere.toml" in result.stderr


def test_unknown_account_is_a_usage_error(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(f'[crm]\ndatabase = "{tmp_path}/crm.db"\n[state]\ndatabase = "{tmp_path}/s.db"\n'
                    '[accounts.alice.imap]\nhost = "h"\nusername = "u"\npassword = "p"\n')
    result = _run(["--config", str(path), "sync", "--account", "bob"])
    assert result.exit_code == 2 and "no account 'bob'" in result.stderr and "alice" in result.stderr


def test_help_for_every_command():
    for args in (["--help"], ["sync", "--help"], ["folders", "--help"], ["activities", "--help"],
                 ["activity", "show", "--help"], ["contact", "add", "--help"], ["partner", "add", "--help"],
                 ["demo", "--help"], ["status", "--help"], ["held", "--help"], ["watch", "--help"],
                 ["unlock", "--help"], ["push", "--help"], ["unpush", "--help"], ["activity", "add", "--help"],
                 ["activity", "edit", "--help"], ["activity", "delete", "--help"], ["rules", "add", "--help"],
                 ["rules", "list", "--help"], ["rules", "remove", "--help"], ["review", "--help"],
                 ["unknown", "--help"], ["assign", "--help"], ["serve", "--help"], ["migrate-store", "--help"]):
        result = _run(args)
        assert result.exit_code == 0 and "Usage:" in result.stdout, args


def test_serve_defaults_and_the_link_follow_its_address():
    config = parse_config({})
    assert (config.serve.host, config.serve.port, config.serve.secret) == ("127.0.0.1", 8765, None)
    assert config.crm.link == "http://127.0.0.1:8765/activities/{id}"
    assert config.web_base == "http://127.0.0.1:8765"
    proxied = parse_config({"serve": {"host": "0.0.0.0", "url": "https://crm.example.com/",
                                      "password_env": "GW_WEB"}})
    assert proxied.crm.link == "https://crm.example.com/activities/{id}"
    assert proxied.web_base == "https://crm.example.com" and proxied.serve.secret.env == "GW_WEB"
    other_crm = parse_config({"crm": {"link": "https://crm.example.com/activities/{id}"}})
    assert other_crm.web_base is None  # links point at another CRM: no quick-search links from us


@pytest.mark.parametrize("serve, message", [
    ({"port": 70000}, "serve.port must be between 1 and 65535"),
    ({"url": "crm.example.com"}, "serve.url must start with https://"),
    ({"password": ""}, "serve.password is empty"),
    ({"passwort": "x"}, "unknown key serve.passwort"),
])
def test_serve_errors_name_the_key(serve, message):
    with pytest.raises(ConfigError) as err:
        parse_config({"serve": serve})
    assert message in str(err.value)


# -- every key checked at load: the spec as data ---------------------------------------------------

IMAP = {"host": "h", "username": "u", "password_env": "X"}
DAV = {"url": "https://dav.example.com/u/", "username": "u", "password_env": "X"}


def _imap(**keys):
    return {"accounts": {"a": {"imap": IMAP | keys}}}


def _dav(**keys):
    return {"accounts": {"a": {"areas": ["events"], "caldav": DAV | keys}}}


@pytest.mark.parametrize("data, message", [
    # [crm] link: exactly the field {id}, no other field, no lone brace, a format that works
    ({"crm": {"link": "https://crm/{user}/{id}"}},
     "crm.link 'https://crm/{user}/{id}' has the field {user}; only {id} (the activity id) is allowed"),
    ({"crm": {"link": "https://crm/{}/{id}"}},
     "crm.link 'https://crm/{}/{id}' has the field {}; only {id} (the activity id) is allowed"),
    ({"crm": {"link": "https://crm/{0}"}},
     "crm.link 'https://crm/{0}' has the field {0}; only {id} (the activity id) is allowed"),
    ({"crm": {"link": "https://crm/{id.real}"}},
     "crm.link 'https://crm/{id.real}' has the field {id.real}; only {id} (the activity id) is allowed"),
    ({"crm": {"link": "https://crm/{/{id}"}},
     "crm.link 'https://crm/{/{id}' has a lone { or }; write {{ or }} for a literal brace and {id} for the "
     "activity id"),
    ({"crm": {"link": "https://crm/}/{id}"}},
     "crm.link 'https://crm/}/{id}' has a lone { or }; write {{ or }} for a literal brace and {id} for the "
     "activity id"),
    ({"crm": {"link": "https://crm/{id"}},
     "crm.link 'https://crm/{id' has a lone { or }; write {{ or }} for a literal brace and {id} for the "
     "activity id"),
    ({"crm": {"link": "https://crm/{id:s}"}},
     "crm.link 'https://crm/{id:s}' cannot show an activity id (Unknown format code 's' for object of type "
     "'int'); write {id}"),
    ({"crm": {"link": "https://crm/{id!x}"}},
     "crm.link 'https://crm/{id!x}' cannot show an activity id (Unknown conversion specifier x); write {id}"),
    ({"crm": {"link": "https://crm/{{id}}"}},
     "crm.link must contain {id}, e.g. https://crm.example.com/activities/{id}"),
    ({"serve": {"url": "https://crm.example.com/{x}"}},
     "serve.url must not contain { or } (it becomes part of [crm] link), got 'https://crm.example.com/{x}'"),
    # numbers in range
    (_imap(timeout=-1), "accounts.a.imap.timeout must be a number of seconds from 1 to 3600, got -1"),
    (_imap(timeout=0), "accounts.a.imap.timeout must be a number of seconds from 1 to 3600, got 0"),
    (_imap(timeout=1e308), "accounts.a.imap.timeout must be a number of seconds from 1 to 3600, got 1e+308"),
    (_imap(timeout=float("inf")), "accounts.a.imap.timeout must be a number of seconds from 1 to 3600, got inf"),
    (_imap(timeout=float("nan")), "accounts.a.imap.timeout must be a number of seconds from 1 to 3600, got nan"),
    (_dav(timeout=0.5), "accounts.a.caldav.timeout must be a number of seconds from 1 to 3600, got 0.5"),
    (_dav(timeout=float("-inf")), "accounts.a.caldav.timeout must be a number of seconds from 1 to 3600, got -inf"),
    ({"accounts": {"a": {"interval": 0, "imap": IMAP}}}, "accounts.a.interval must be at least 1 second"),
    ({"accounts": {"a": {"interval": 10**18, "imap": IMAP}}},
     "accounts.a.interval must be at most 86400 seconds (one day), got 1000000000000000000"),
    ({"crm": {"max_attempts": 0}}, "crm.max_attempts must be at least 1"),
    ({"crm": {"max_attempts": 101}}, "crm.max_attempts must be at most 100, got 101"),
    ({"sync": {"max_delete_share": 0}}, "sync.max_delete_share must be above 0 and at most 1"),
    ({"sync": {"max_delete_share": 1.5}}, "sync.max_delete_share must be above 0 and at most 1"),
    ({"sync": {"max_delete_share": float("nan")}}, "sync.max_delete_share must be above 0 and at most 1"),
    ({"sync": {"past_days": -1}}, "sync.past_days must be a number of days from 0 to 36500, got -1"),
    ({"sync": {"future_days": 36501}}, "sync.future_days must be a number of days from 0 to 36500, got 36501"),
    ({"sync": {"past_days": 1.5}}, "sync.past_days must be an integer, got 1.5"),
    (_imap(port=0), "accounts.a.imap.port must be between 1 and 65535, got 0"),
    (_imap(max_connections=0), "accounts.a.imap.max_connections must be at least 1 (the sync's own connection), got 0"),
    (_imap(max_connections=101), "accounts.a.imap.max_connections must be at most 100, got 101"),
    (_imap(max_connections=2.5), "accounts.a.imap.max_connections must be an integer, got 2.5"),
    ({"accounts": {"a": {"imap": IMAP, "sieve": {"port": 0}}}},
     "accounts.a.sieve.port must be between 1 and 65535, got 0"),
    ({"accounts": {"a": {"imap": IMAP, "sieve": {"port": 65536}}}},
     "accounts.a.sieve.port must be between 1 and 65535, got 65536"),
    ({"serve": {"port": 0}}, "serve.port must be between 1 and 65535, got 0"),
    # names that must not be empty
    (_imap(archive_folder=""), "accounts.a.imap.archive_folder must not be empty, got ''"),
    (_imap(archive_folder="  "), "accounts.a.imap.archive_folder must not be empty, got '  '"),
    (_imap(host=""), "accounts.a.imap.host must not be empty, got ''"),
    (_imap(username=""), "accounts.a.imap.username must not be empty, got ''"),
    (_imap(ca_file=""), "accounts.a.imap.ca_file must not be empty, got ''"),
    (_dav(events=""), "accounts.a.caldav.events must not be empty, got ''"),
    (_dav(tasks=" "), "accounts.a.caldav.tasks must not be empty, got ' '"),
    ({"accounts": {"a": {"imap": IMAP, "sieve": {"host": ""}}}}, "accounts.a.sieve.host must not be empty, got ''"),
    ({"crm": {"database": ""}}, "crm.database must not be empty, got ''"),
    ({"crm": {"documents": ""}}, "crm.documents must not be empty, got ''"),
    ({"state": {"database": ""}}, "state.database must not be empty, got ''"),
    ({"serve": {"host": ""}}, "serve.host must not be empty, got ''"),
    ({"crm": {"statuses": {"E E": "Erledigt"}}}, "crm.statuses: 'E E' is not a usable status key"),
    ({"crm": {"kinds": {"": "events"}}}, "crm.kinds: '' is not a usable kind name"),
    ({"accounts": {"": {"imap": IMAP}}}, "accounts: '' is not a usable account name"),
    ({"accounts": {"a": {"areas": [], "imap": IMAP}}},
     "accounts.a.areas is empty: list at least one of mail, events, tasks"),
    ({"accounts": {"a": {"areas": ["mail", "mail"], "imap": IMAP}}}, "accounts.a.areas lists 'mail' twice"),
    ({"accounts": {"a": {"imap": IMAP, "notify_command": [""]}}},
     "accounts.a.notify_command must start with a program name, got ['']"),
    # passwords: exactly one source, none empty
    (_imap(password_command=[""]), "accounts.a.imap.password_command must start with a program name, got ['']"),
    (_imap(password_command=""), "accounts.a.imap.password_command must start with a program name, got ['']"),
    (_imap(password=""), "accounts.a.imap.password is empty: set the password, or use password_command, "
                         "password_env or password_keyring"),
    (_imap(password_env=""), "accounts.a.imap.password_env must not be empty, got ''"),
    (_imap(password_keyring=""), "accounts.a.imap.password_keyring must not be empty, got ''"),
    (_imap(password="p"), "accounts.a.imap: set only one of password_command, password_env, password_keyring, "
                          "password (found password_env, password)"),
    ({"accounts": {"a": {"imap": {"host": "h", "username": "u"}}}},
     "accounts.a.imap: set password_command, password_env, password_keyring or password"),
    ({"accounts": {"a": {"areas": ["events"], "caldav": {"url": "https://d/", "username": "u", "auth": "password"}}}},
     "accounts.a.caldav: set password_command, password_env, password_keyring or password"),
    # auth: "password" (the default where a password source is set) or "none" (a server without login)
    (_dav(auth="none"), 'accounts.a.caldav: auth = "none" sends no password; remove password_env, '
                        'or set auth = "password"'),
    (_dav(auth="basic"), "accounts.a.caldav.auth must be one of password, none, got 'basic'"),
    ({"serve": {"password": " "}}, "serve.password is empty: set a password or leave the key out"),
    # a value of the wrong TOML type: one line naming the key, the value and the type wanted
    (_imap(timeout="abc"), "accounts.a.imap.timeout must be an integer or a number, got 'abc'"),
    (_imap(verify="true"), "accounts.a.imap.verify must be true or false, got 'true'"),
    (_imap(port=True), "accounts.a.imap.port must be an integer, not a boolean"),
    ({"accounts": {"a": {"areas": "mail", "imap": IMAP}}}, "accounts.a.areas must be a list, got 'mail'"),
    ({"accounts": {"a": {"interval": 1.5, "imap": IMAP}}}, "accounts.a.interval must be an integer, got 1.5"),
    ({"crm": 5}, "[crm] must be a table, got 5"),
    ({"accounts": [{"imap": IMAP}]}, "[accounts] must be a table, got [{'imap': {'host': 'h', 'username': 'u', "
                                     "'password_env': 'X'}}]"),
    ({"accounts": {"a": {"imap": "h"}}}, "[accounts.a.imap] must be a table, got 'h'"),
    ({"crm": {"statuses": 5}}, "[crm.statuses] must be a table, got 5"),
    ({"accounts": {"a": {"imap": IMAP, "notify_command": "notify-send"}}},
     "accounts.a.notify_command must be a list, got 'notify-send'"),
    (_imap(password_command=5), "accounts.a.imap.password_command must be a list or a string, got 5"),
    ({"crm": {"database": True}}, "crm.database must be a string, not a boolean"),
    ({"sync": {"max_delete_share": "half"}}, "sync.max_delete_share must be an integer or a number, got 'half'"),
    # unknown keys, at every level, all of a table's at once
    ({"foo": 1}, "unknown key config.foo (check the spelling against the README)"),
    ({"crm": {"databse": "x", "lnk": "y"}}, "unknown key crm.databse, crm.lnk (check the spelling against the README)"),
    ({"state": {"path": "x"}}, "unknown key state.path (check the spelling against the README)"),
    ({"sync": {"conflicts": "crm"}}, "unknown key sync.conflicts (check the spelling against the README)"),
    ({"accounts": {"a": {"imap": IMAP, "intervall": 5}}},
     "unknown key accounts.a.intervall (check the spelling against the README)"),
    ({"accounts": {"a": {"imap": IMAP | {"tls": True}}}},
     "unknown key accounts.a.imap.tls (check the spelling against the README)"),
    ({"accounts": {"a": {"areas": ["events"], "caldav": DAV | {"calendar": "c"}}}},
     "unknown key accounts.a.caldav.calendar (check the spelling against the README)"),
    ({"accounts": {"a": {"imap": IMAP, "sieve": {"starttls": True}}}},
     "unknown key accounts.a.sieve.starttls (check the spelling against the README)"),
    ({"accounts": {"a": {"name": "b", "imap": IMAP}}},
     "unknown key accounts.a.name (check the spelling against the README)"),
    ({"accounts": {"a": {"imap": IMAP | {"secret": "x"}}}},
     "unknown key accounts.a.imap.secret (check the spelling against the README)"),
    # values outside their choices, with the whole message
    (_imap(security="ssl"), "accounts.a.imap.security must be one of tls, starttls, none, got 'ssl'"),
    ({"sync": {"conflict": "mine"}}, "sync.conflict must be one of newest, crm, groupware, got 'mine'"),
    ({"sync": {"private": "hide"}}, "sync.private must be one of skip, busy, import, got 'hide'"),
    ({"crm": {"kinds": {"NOTIZ": "notes"}}}, "crm.kinds.NOTIZ must be \"events\" or \"tasks\", got 'notes'"),
    ({"crm": {"kinds": {"NOTIZ": True}}}, "crm.kinds.NOTIZ must be \"events\" or \"tasks\", got True"),
    ({"crm": {"kinds": {"NOTIZ": ["tasks"]}}}, "crm.kinds.NOTIZ must be \"events\" or \"tasks\", got ['tasks']"),
    ({"crm": {"mandatory": ["partnr"]}},
     "crm.mandatory: unknown field 'partnr' (known: partner, contact, subject, body)"),
    ({"accounts": {"a": {"areas": ["mail", 5], "imap": IMAP}}},
     "accounts.a.areas: unknown area 5 (use mail, events, tasks)"),
    ({"crm": {"statuses": {"A": "a"}, "done_status": "E"}},
     "crm.done_status 'E' is not one of the status keys in [crm.statuses]"),
    ({"crm": {"open_status": "X"}}, "crm.open_status 'X' is not one of the status keys in [crm.statuses]"),
    ({"crm": {"default_status": "X"}}, "crm.default_status 'X' is not one of the status keys in [crm.statuses]"),
    (_imap(import_folder=""), "accounts.a.imap.import_folder must not be empty, got ''"),
    (_imap(import_folder="INBOX/CRM Import", import_root="INBOX"),
     "accounts.a.imap: import_folder 'INBOX/CRM Import' is the import root; remove import_root 'INBOX' "
     "(the CRM folders go below the import folder)"),
    (_dav(url="dav.example.com"), "accounts.a.caldav.url must start with https:// (or http:// for a local server)"),
    ({"accounts": {"a": {"areas": ["events"], "caldav": {"username": "u", "password_env": "X"}}}},
     "missing key accounts.a.caldav.url"),
    ({"accounts": {"a": {"areas": ["mail", "tasks"], "imap": IMAP}}},
     "accounts.a: area tasks needs an [accounts.a.caldav] table"),
    ({"accounts": {"a": {"imap": IMAP, "notify_command": []}}},
     "accounts.a.notify_command must be a non-empty list of strings"),
    ({"accounts": {"a": {"imap": IMAP, "notify_command": ["notify-send", 5]}}},
     "accounts.a.notify_command must be a non-empty list of strings"),
    ({"serve": {"host": "{x}"}}, "serve.host must not contain { or } (it becomes part of [crm] link), got '{x}'"),
    # a [sieve] table without [imap] has nothing to borrow
    ({"accounts": {"a": {"areas": ["events"], "caldav": DAV, "sieve": {"host": "h"}}}},
     "accounts.a.sieve: set host and username (there is no [imap] table to take them from)"),
    ({"accounts": {"a": {"areas": ["events"], "caldav": DAV, "sieve": {"host": "h", "username": "u"}}}},
     "accounts.a.sieve: set password_command, password_env, password_keyring or password"),
    ({"accounts": {"a": {"areas": ["events"], "caldav": DAV, "sieve": {"host": "h", "username": "u", "password": ""}}}},
     "accounts.a.sieve.password is empty: set the password, or use password_command, password_env or "
     "password_keyring"),
    ({"accounts": {"a": {"imap": IMAP, "sieve": {"password_env": "Y", "password": "p"}}}},
     "accounts.a.sieve: set only one of password_command, password_env, password_keyring, password "
     "(found password_env, password)"),
])
def test_each_bad_value_is_one_line_naming_key_value_and_what_is_allowed(data, message):
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert str(err.value) == message
    assert "\n" not in message


@pytest.mark.parametrize("data", [
    {"crm": {"link": "https://crm.example.com/activities/{id}"}},
    {"crm": {"link": "https://crm.example.com/a/{id:06d}?x={{literal}}&again={id}"}},
    _imap(import_root=""),  # servers whose folders are not below INBOX
    _imap(import_folder="INBOX/CRM Import", import_root="INBOX/CRM Import"),  # the same folder, said twice
    _imap(timeout=1, archive_folder="Archiv"),
    _imap(timeout=3600.0),
    _dav(timeout=30),
    {"accounts": {"a": {"areas": ["events"], "caldav": {"url": "http://127.0.0.1:8080/", "username": "u"}}}},
    {"accounts": {"a": {"areas": ["events"], "caldav": {"url": "https://d/", "username": "u", "auth": "none"}}}},
    {"accounts": {"a": {"interval": 86400, "imap": IMAP}}},
    {"crm": {"max_attempts": 100}, "sync": {"max_delete_share": 1}},
    {"sync": {"past_days": 0, "future_days": 36500, "private": "busy"}},
    {"sync": {"past_days": 36500, "future_days": 0, "private": "import"}},
    {"serve": {"port": 65535}},
    {"accounts": {"a": {"imap": IMAP, "sieve": {"port": 4190, "password_env": "Y"}}}},
])
def test_values_at_the_edges_of_what_is_allowed_load(data):
    parse_config(data)


def test_the_link_template_shows_the_activity_id():
    config = parse_config({"crm": {"link": "https://crm.example.com/a/{id:06d}?x={{literal}}&again={id}"}})
    assert config.crm.link.format(id=42) == "https://crm.example.com/a/000042?x={literal}&again=42"


def _secret(**keys):
    return parse_config({"accounts": {"a": {"imap": {"host": "h", "username": "u"} | keys}}}).account("a").imap.secret


@pytest.mark.parametrize("keys, message", [
    ({"password_command": ["true"]},
     "accounts.a.imap.password_command printed no password (its first line is empty); make it print the "
     "password on its first line"),
    ({"password_command": ["printf", "  \\nsecond line"]},
     "accounts.a.imap.password_command printed no password (its first line is empty); make it print the "
     "password on its first line"),
    ({"password_command": ["printf", "\\377\\376"]},
     "accounts.a.imap.password_command printed bytes that are not UTF-8; make it print the password as text"),
    ({"password_command": ["false"]},
     "accounts.a.imap.password_command exited with code 1; run it by hand to see why"),
    ({"password_command": ["gwsync-no-such-program"]},
     "accounts.a.imap.password_command: program 'gwsync-no-such-program' not found"),
    ({"password_command": ["/"]},
     "accounts.a.imap.password_command: cannot run '/' (Permission denied)"),
    ({"password_env": "GW_EMPTY"}, "accounts.a.imap.password_env: environment variable GW_EMPTY is empty"),
    ({"password_env": "GW_NOT_SET"}, "accounts.a.imap.password_env: environment variable GW_NOT_SET is not set"),
])
def test_a_password_source_that_gives_no_password_is_a_config_error(keys, message, monkeypatch):
    monkeypatch.setenv("GW_EMPTY", "")
    monkeypatch.delenv("GW_NOT_SET", raising=False)
    with pytest.raises(ConfigError) as err:
        _secret(**keys).resolve()
    assert str(err.value) == message


def test_an_empty_keyring_entry_is_a_config_error(monkeypatch):
    import keyring

    monkeypatch.setattr(keyring, "get_password", lambda service, user: "")
    with pytest.raises(ConfigError) as err:
        _secret(password_keyring="mail").resolve()
    assert str(err.value) == "accounts.a.imap.password_keyring: the password stored for service 'mail', " \
                             "user 'u' is empty"


def test_a_password_with_spaces_inside_is_kept_as_printed():
    assert _secret(password_command=["printf", " s3 cret \\nuser: x"]).resolve() == " s3 cret "


# -- against the real servers: a bad config stops before any login or CRM write ----------------------

DONE = "INBOX/CRM Erledigt [E]"


def _one_config_error(result, *words):
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("gwsync: config error: "), result.stderr
    assert all(w in result.stderr for w in words), result.stderr


def test_a_link_with_another_field_stops_the_sync_before_anything_is_touched(make_env):
    from conftest import make_mail

    env = make_env(link="https://crm.example.com/{user}/activities/{id}")
    env.append(DONE, make_mail(1))
    _one_config_error(env.cli("sync"), "crm.link", "{user}")
    _one_config_error(env.cli("activities"), "crm.link", "{user}")
    assert len(env.messages(DONE)) == 1 and env.messages("INBOX/CRM Archiv") == {}  # the mail stays put
    env.config_path.write_text(env.config_path.read_text().replace("{user}/", ""))
    code, activities = env.cli_json("activities")
    assert code == 0 and activities == []  # nothing reached the CRM
    code, out = env.cli_json("sync")
    assert code == 0 and out["accounts"]["alice"]["mail"]["imported"] == 1
    assert env.messages(DONE) == {} and len(env.messages("INBOX/CRM Archiv")) == 1


def _dovecot_failed_logins(env) -> int:
    log = (env.dovecot.directory / "dovecot.log").read_text(errors="replace")
    return sum(1 for line in log.splitlines() if f"user=<{env.user}>" in line and "auth failed" in line)


@pytest.mark.parametrize("source, words", [
    ('password_command = ["true"]', ("accounts.alice.imap.password_command", "printed no password")),
    ('password_command = ["printf", " \\n"]', ("accounts.alice.imap.password_command", "printed no password")),
    ('password_command = ["false"]', ("accounts.alice.imap.password_command", "exited with code 1")),
    ('password_env = "GWSYNC_TEST_EMPTY"', ("accounts.alice.imap.password_env", "GWSYNC_TEST_EMPTY is empty")),
    ('password = ""', ("accounts.alice.imap.password is empty",)),
])
def test_an_empty_password_is_a_config_error_that_locks_nothing(env, monkeypatch, source, words):
    from conftest import make_mail

    monkeypatch.setenv("GWSYNC_TEST_EMPTY", "")
    env.append(DONE, make_mail(1))
    text = env.config_path.read_text()
    env.config_path.write_text(text.replace(f'password_env = "GWSYNC_TEST_PW_{env.user.upper()}"', source))
    for args in (["sync"], ["sync"], ["folders"]):
        _one_config_error(env.cli(*args), *words)
    assert len(env.messages(DONE)) == 1
    env.config_path.write_text(text)  # status reads no password; the original config shows the state as it is
    code, status = env.cli_json("status")
    assert status["accounts"]["alice"]["locked"] == []
    assert _dovecot_failed_logins(env) == 0  # the server saw no login with it
    code, out = env.cli_json("sync")  # and the fixed config just works: nothing to unlock
    assert code == 0 and out["accounts"]["alice"]["mail"]["imported"] == 1


def test_an_empty_caldav_password_stops_the_sync_before_any_login(make_env):
    from conftest import make_mail

    env = make_env(areas=("mail", "events"))
    env.append(DONE, make_mail(1))
    dav_password = f'password = "{env.radicale.password_for(env.user)}"'
    text = env.config_path.read_text()
    env.config_path.write_text(text.replace(dav_password, 'password_command = ["true"]'))
    _one_config_error(env.cli("sync"), "accounts.alice.caldav.password_command", "printed no password")
    assert len(env.messages(DONE)) == 1  # not even the mail area ran: the config is wrong, so nothing runs
    log = (env.radicale.directory / "radicale.log").read_text(errors="replace")
    assert not any("Failed login attempt" in line and env.user in line for line in log.splitlines())
    env.config_path.write_text(text)
    code, status = env.cli_json("status")
    assert status["accounts"]["alice"]["locked"] == []


def test_watch_with_an_empty_password_exits_2_with_one_line(env):
    env.config_path.write_text(env.config_path.read_text().replace(
        f'password_env = "GWSYNC_TEST_PW_{env.user.upper()}"', 'password_command = ["true"]'))
    proc = env.subprocess("watch")
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    lines = err.decode().splitlines()
    assert proc.returncode == 2 and lines[-1].startswith("gwsync: config error: accounts.alice.imap.password_command")
    assert [l for l in lines if l.startswith("gwsync:")] == lines[-1:] and "Traceback" not in err.decode()
    code, status = env.cli_json("status")
    assert status["accounts"]["alice"]["locked"] == []


def test_an_empty_sieve_password_is_refused_not_replaced_by_the_imap_one():
    data = {"accounts": {"a": {"imap": IMAP, "sieve": {"password": ""}}}}
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert str(err.value) == "accounts.a.sieve.password is empty: set a password or leave the key out"


def test_import_root_may_be_empty_and_then_the_archive_is_at_the_top_level():
    imap = parse_config(_imap(import_root="")).account("a").imap
    assert (imap.import_root, imap.archive_folder) == ("", None)
    assert imap.archive_in("", "/") == "CRM Archiv"  # a personal namespace without prefix (Dovecot)
    assert imap.archive_in("INBOX", ".") == "INBOX.CRM Archiv"  # below INBOX. (Cyrus)


def test_the_import_folder_is_the_import_root_and_the_archive_sits_beside_it():
    imap = parse_config(_imap(import_folder="INBOX/CRM Import")).account("a").imap
    assert (imap.import_folder, imap.import_root, imap.archive_folder) == ("INBOX/CRM Import",) * 2 + (None,)
    assert imap.archive_in("INBOX/CRM Import", "/") == "INBOX/CRM Archiv"  # same parent, not below it
    assert imap.archive_in("INBOX.CRM Import", ".") == "INBOX.CRM Archiv"  # named in the server's separator
    assert imap.archive_in("CRM Import", "/") == "CRM Archiv"  # at the top level: beside it there too
    assert parse_config(_imap(import_folder="X", archive_folder="Old")).account("a").imap.archive_in("X", "/") == "Old"
    assert parse_config(MINIMAL).account("alice").imap.import_folder is None  # INBOX stays the root


# -- derived defaults: each computed in one place, from the keys it follows ---------------------------

def test_derived_defaults_follow_the_keys_they_come_from(monkeypatch, tmp_path):
    monkeypatch.setenv("GW_HOME", str(tmp_path))
    config = parse_config({
        "crm": {"database": "$GW_HOME/crm.db", "statuses": {"A": "Auf", "Z": "Zu"}, "kinds": {"NOTIZ": "tasks"}},
        "state": {"database": "~/s.db"},
        "serve": {"host": "::1", "port": 9000},
        "accounts": {
            "a": {"areas": ["mail", "events"], "imap": IMAP | {"security": "starttls", "import_root": "Mail",
                                                                "verify": False, "ca_file": "/ca.pem"},
                  "caldav": DAV | {"url": "https://dav.example.com/u"}},
            "b": {"imap": IMAP | {"security": "none"}, "sieve": {"port": 2000, "password_env": "S"}},
            "c": {"areas": ["tasks"], "caldav": DAV},
        },
    })
    crm = config.crm
    assert (crm.database, crm.documents) == (tmp_path / "crm.db", tmp_path / "documents")
    assert config.state_database == Path("~/s.db").expanduser()
    assert (crm.done_status, crm.open_status, crm.default_status) == ("A", "A", "A")  # no E, O, I: the first
    assert crm.kinds["NOTIZ"] == "tasks" and crm.kinds["TERMIN"] == "events"  # added to the defaults
    assert crm.kinds_of("tasks") == ("AUFGABE", "NOTIZ", "WIEDERVORLAGE")
    assert crm.link == "http://[::1]:9000/activities/{id}" and config.web_base == "http://[::1]:9000"
    a, b = config.account("a"), config.account("b")
    assert (a.name, b.name, a.areas, a.interval) == ("a", "b", ("mail", "events"), 300)
    assert (a.imap.port, b.imap.port) == (143, 143)
    assert a.imap.archive_in("Mail", "/") == "Mail/CRM Archiv" and a.imap.timeout == 60.0
    assert parse_config(_imap(archive_folder="Archiv")).account("a").imap.archive_in("Mail", ".") == "Archiv"
    assert a.caldav.url == "https://dav.example.com/u/" and a.caldav.collection("events") == "calendar"
    assert a.imap.secret.where == "accounts.a.imap" and a.caldav.secret.where == "accounts.a.caldav"
    assert a.imap.secret.env == "X" and a.imap.secret.username == "u"
    # [sieve] borrows what [imap] has: host, user, password, TLS settings; port 4190
    sieve = a.sieve
    assert (sieve.host, sieve.port, sieve.username, sieve.starttls) == ("h", 4190, "u", True)
    assert (sieve.verify, sieve.ca_file, sieve.secret) == (False, "/ca.pem", a.imap.secret)
    assert (b.sieve.port, b.sieve.starttls, b.sieve.secret.env, b.sieve.secret.where) == \
        (2000, False, "S", "accounts.b.sieve")
    assert config.account("c").sieve is None and config.account("c").imap is None
    assert config.serve.secret is None and config.path is None


def test_load_config_remembers_its_path(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[serve]\npassword_keyring = "gw"\n')
    config = load_config(path)
    assert config.path == path and config.serve.secret.keyring == "gw" and config.serve.secret.username == "serve"
    assert config.serve.secret.where == "serve" and config.accounts == {}


@pytest.mark.parametrize("data, message", [
    # a misspelt key is named even when the key it misspells is required: the typo is the cause
    ({"accounts": {"a": {"imap": {"hots": "h", "username": "u", "password_env": "X"}}}},
     "unknown key accounts.a.imap.hots (check the spelling against the README)"),
    ({"accounts": {"a": {"areas": ["events"], "caldav": {"ulr": "https://d/", "username": "u", "password": "p"}}}},
     "unknown key accounts.a.caldav.ulr (check the spelling against the README)"),
    # every value outside its choices names the value, as [imap] security always did
    ({"accounts": {"a": {"imap": IMAP, "sieve": {"security": "ssl"}}}},
     "accounts.a.sieve.security must be one of tls, starttls, none, got 'ssl'"),
    ({"crm": {"statuses": {"E": 5}}}, "crm.statuses.E must be a string, got 5"),
    # a key that would not read as one is quoted, so the message stays one line
    ({"accounts": {"bob smith": {"imap": IMAP | {"hots": "h"}}}},
     "unknown key accounts.'bob smith'.imap.hots (check the spelling against the README)"),
    ({"accounts": {"a": {"imap": IMAP, "x\ny": 1}}},
     "unknown key accounts.a.'x\\ny' (check the spelling against the README)"),
    ({"accounts": {"a\n": {"areas": ["events"]}}},
     "accounts.'a\\n': area events needs an [accounts.'a\\n'.caldav] table"),
    # a key with choices names them whatever the wrong value is
    (_imap(security=5), "accounts.a.imap.security must be one of tls, starttls, none, got 5"),
    ({"sync": {"conflict": True}}, "sync.conflict must be one of newest, crm, groupware, got True"),
])
def test_each_wrong_key_is_named_with_its_value(data, message):
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert str(err.value) == message


VALID = {
    "crm": {"database": "/tmp/crm.db", "link": "https://crm/{id}", "mandatory": ["partner"],
            "statuses": {"I": "Importiert", "E": "Erledigt"}, "max_attempts": 3, "kinds": {"NOTIZ": "tasks"}},
    "state": {"database": "/tmp/s.db"},
    "sync": {"conflict": "crm", "max_delete_share": 0.5},
    "serve": {"host": "127.0.0.1", "port": 8765, "url": "https://crm.example.com", "password_env": "W"},
    "accounts": {"a": {
        "areas": ["mail", "events"], "interval": 60, "notify_command": ["notify-send"],
        "imap": IMAP | {"port": 993, "security": "tls", "verify": True, "timeout": 30, "archive_folder": "Archiv"},
        "caldav": DAV | {"events": "calendar", "tasks": "tasks", "timeout": 30},
        "sieve": {"port": 4190, "host": "h"},
    }},
}


def _key_paths(table, prefix=()):
    for key, value in table.items():
        yield prefix + (key,)
        if isinstance(value, dict):
            yield from _key_paths(value, prefix + (key,))


JUNK = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
).filter(lambda v: v is not None)  # TOML has no null


@settings(max_examples=300, deadline=None)
@given(path=st.sampled_from(sorted(_key_paths(VALID))), value=JUNK)
def test_any_value_anywhere_loads_or_is_one_line_naming_its_table(path, value):
    data = copy.deepcopy(VALID)
    table = data
    for key in path[:-1]:
        table = table[key]
    table[path[-1]] = value
    try:
        parse_config(data)
    except ConfigError as exc:
        message = str(exc)
        assert "\n" not in message and path[0] in message, message

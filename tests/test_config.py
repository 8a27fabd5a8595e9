"""Config loading: defaults, and a one-line error naming the key for anything wrong."""

from pathlib import Path

import pytest
from click.testing import CliRunner

from gwsync.cli import main
from gwsync.config import ConfigError, load_config, parse_config

MINIMAL = {"accounts": {"alice": {"imap": {"host": "imap.example.com", "username": "alice",
                                           "password_env": "X"}}}}


def test_defaults():
    config = parse_config(MINIMAL)
    alice = config.account("alice")
    assert alice.areas == ("mail",) and alice.interval == 300
    assert alice.imap.port == 993 and alice.imap.security == "tls" and alice.imap.verify
    assert alice.imap.import_root == "INBOX" and alice.imap.archive_folder == "INBOX/CRM Archiv"
    assert config.crm.statuses == {"I": "Importiert", "O": "Offen", "E": "Erledigt"}
    assert config.crm.mandatory == ()
    assert "{id}" in config.crm.link


def test_spec_example_config_loads(tmp_path):
    text = (Path(__file__).resolve().parent.parent / "examples" / "config.toml").read_text()
    path = tmp_path / "c.toml"
    path.write_text(text)
    config = load_config(path)
    assert "alice" in config.accounts


@pytest.mark.parametrize("data, message", [
    ({"crm": {"databse": "x"}}, "unknown key crm.databse"),
    ({"accounts": {"a": {"imap": {"username": "u"}}}}, "missing key accounts.a.imap.host"),
    ({"accounts": {"a": {"imap": {"host": "h", "username": "u", "port": "993"}}}}, "accounts.a.imap.port must be an integer"),
    ({"accounts": {"a": {"imap": {"host": "h", "username": "u", "security": "ssl"}}}}, "accounts.a.imap.security"),
    ({"accounts": {"a": {"areas": ["mail", "calendar"], "imap": {"host": "h", "username": "u"}}}}, "unknown area 'calendar'"),
    ({"accounts": {"a": {"areas": ["mail"]}}}, "area mail needs an [accounts.a.imap] table"),
    ({"accounts": {"a": {"imap": {"host": "h", "username": "u", "archive_folder": "INBOX/CRM Archiv [E]"}}}},
     "looks like an import folder"),
    ({"crm": {"link": "https://crm/"}}, "crm.link must contain {id}"),
    ({"crm": {"mandatory": ["partnr"]}}, "unknown field 'partnr'"),
    ({"crm": {"statuses": {}}}, "crm.statuses is empty"),
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
                 ["unknown", "--help"], ["assign", "--help"], ["serve", "--help"]):
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

"""Server-side rules: Sieve over ManageSieve, against Dovecot with Pigeonhole; mail delivered by
Dovecot's own LDA, so the rules really run."""

from __future__ import annotations

import re

import pytest
from sievelib.managesieve import Client

from conftest import make_mail, use_sieve_dovecot
from gwsync.crm import ActivityFilter
from gwsync.demo.localservers import Dovecot
from gwsync.mail.sieve import quote

USER_SCRIPT = ('require ["fileinto"];\n# my own rule\n'
               'if header :contains "subject" "Rechnung" { fileinto "INBOX/Rechnungen"; }\n')


@pytest.fixture
def senv(make_env, sieve_dovecot):
    return use_sieve_dovecot(make_env(), sieve_dovecot)


def sieve_client(env) -> Client:
    client = Client("127.0.0.1", env.dovecot.sieve_port)
    assert client.connect(env.user, env.password, starttls=False, authmech="PLAIN")
    return client


def test_a_rule_files_delivered_mail_into_an_import_folder_and_sync_imports_it(senv):
    result = senv.cli("rules", "add", "--from", "@acme.example", "CRM Kunde [O]")
    assert result.exit_code == 0, result.stderr
    assert "rule 1: mail from @acme.example -> INBOX/CRM Kunde [O]" in result.stdout
    senv.dovecot.deliver(senv.user, make_mail(1, sender="einkauf@acme.example"))
    senv.dovecot.deliver(senv.user, make_mail(2, sender="someone@else.example"))
    assert len(senv.messages("INBOX/CRM Kunde [O]")) == 1
    code, out = senv.cli_json("sync")
    assert code == 0 and out["accounts"]["alice"]["mail"]["imported"] == 1
    with senv.engine() as engine:
        (activity,) = engine.crm.list_activities(ActivityFilter())
    assert (activity.subject, activity.status) == ("Test mail 1", "O")
    code, listed = senv.cli_json("rules", "list")
    assert listed == [{"id": 1, "from": "@acme.example", "folder": "INBOX/CRM Kunde [O]"}]


def test_the_users_own_active_script_keeps_working_and_comes_back_unchanged(senv):
    client = sieve_client(senv)
    assert client.putscript("mine", USER_SCRIPT) and client.setactive("mine")
    stored = senv.dovecot.directory / "home" / senv.user / "sieve" / "mine.sieve"
    original = stored.read_bytes()  # as the server keeps it
    senv.create("INBOX/Rechnungen")

    assert senv.cli("rules", "add", "--from", "chef@acme.example", "INBOX/CRM Chef [E]").exit_code == 0
    assert senv.cli("rules", "add", "--from", "@beta.example", "CRM Beta [O]").exit_code == 0
    active, others = client.listscripts()
    assert active == "mine" and "gwsync" in others
    senv.dovecot.deliver(senv.user, make_mail(1, sender="x@y.example", subject="Ihre Rechnung"))
    senv.dovecot.deliver(senv.user, make_mail(2, sender="chef@acme.example"))
    senv.dovecot.deliver(senv.user, make_mail(3, sender="a@beta.example"))
    assert len(senv.messages("INBOX/Rechnungen")) == 1  # the user's rule still files its mail
    assert len(senv.messages("INBOX/CRM Chef [E]")) == 1 and len(senv.messages("INBOX/CRM Beta [O]")) == 1
    assert b'include :personal "gwsync"; # gwsync' in stored.read_bytes()

    assert senv.cli("rules", "remove", "1").exit_code == 0
    assert [r["id"] for r in senv.cli_json("rules", "list")[1]] == [2]
    assert senv.cli("rules", "remove", "2").exit_code == 0
    active, others = client.listscripts()
    assert active == "mine" and others == []
    assert stored.read_bytes() == original  # byte for byte as before gwsync touched it
    assert senv.cli("rules", "remove", "9").exit_code == 1


def test_without_an_active_script_gwsync_brings_and_takes_back_its_own(senv):
    client = sieve_client(senv)
    assert client.listscripts() == (None, [])
    assert senv.cli("rules", "add", "--from", "@acme.example", "CRM Kunde [O]").exit_code == 0
    active, others = client.listscripts()
    assert active == "gwsync-main"
    assert senv.cli("rules", "remove", "1").exit_code == 0
    assert client.listscripts() == (None, [])


def test_quotes_backslashes_and_umlauts_are_escaped(senv):
    assert quote('a"b\\c') == '"a\\"b\\\\c"'
    folder = 'CRM Müller "Spezial" [O]'
    result = senv.cli("rules", "add", "--from", "@müller.example", folder)
    assert result.exit_code == 0, result.stderr
    senv.dovecot.deliver(senv.user, make_mail(1, sender="info@müller.example"))
    assert len(senv.messages(f"INBOX/{folder}")) == 1


def test_bad_input_is_one_clear_line(senv):
    result = senv.cli("rules", "add", "--from", "@acme.example", "Kein Importordner")
    assert result.exit_code == 2 and "not an import folder name" in result.stderr
    result = senv.cli("rules", "add", "--from", "@acme.example", "CRM Kunde [Z]")
    assert result.exit_code == 2 and "[Z] is unknown to the CRM" in result.stderr
    result = senv.cli("rules", "add", "--from", "nobody", "CRM Kunde [O]")
    assert result.exit_code == 2 and "give an address" in result.stderr
    result = senv.cli("rules", "list", "--account", "nobody")
    assert result.exit_code == 2 and "no account 'nobody'" in result.stderr
    dead = senv.config_path.read_text().replace(f"port = {senv.dovecot.sieve_port}", "port = 1")
    senv.config_path.write_text(dead)
    result = senv.cli("rules", "list")
    assert result.exit_code == 1 and "cannot connect" in result.stderr and "Traceback" not in result.stderr



def test_starttls_to_managesieve_uses_the_accounts_ca_file_or_verify_false(make_env):
    server = Dovecot.start(tls=True, sieve=True)
    try:
        env = make_env()
        env.dovecot = server
        text = re.sub(r"port = \d+", f"port = {server.port}", env.config_path.read_text())
        text = text.replace('security = "none"', 'security = "starttls"')
        sieve = f"\n[accounts.alice.sieve]\nport = {server.sieve_port}\n"
        env.config_path.write_text(text + sieve)
        untrusted = env.cli("rules", "list")  # the test CA is not in the system's trust store
        assert untrusted.exit_code != 0
        assert f"ManageSieve 127.0.0.1:{server.sieve_port}: certificate not trusted" in untrusted.stderr
        assert "ca_file" in untrusted.stderr and len(untrusted.stderr.strip().splitlines()) == 1

        # the IMAP table's ca_file reaches Sieve too
        env.config_path.write_text(text.replace('security = ', f'ca_file = "{server.ca_file}"\nsecurity = ') + sieve)
        assert env.cli("rules", "add", "--from", "@acme.example", "CRM Kunde [O]").exit_code == 0
        assert env.cli_json("rules", "list")[1][0]["from"] == "@acme.example"
        # and Sieve's own verify = false, the explicit opt-out
        env.config_path.write_text(text + sieve + "verify = false\n")
        assert env.cli_json("rules", "list")[1][0]["from"] == "@acme.example"
    finally:
        server.stop()


def test_a_refused_imap_login_while_adding_a_rule_locks_the_credential(senv, monkeypatch):
    monkeypatch.setenv(f"GWSYNC_TEST_PW_{senv.user.upper()}", "wrong")
    result = senv.cli("rules", "add", "--from", "@acme.example", "CRM Kunde [O]")
    assert result.exit_code == 3 and "login as" in result.stderr and "refused" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    again = senv.cli("rules", "add", "--from", "@acme.example", "CRM Kunde [O]")
    assert again.exit_code == 3  # not sent to the server again until `gwsync unlock`

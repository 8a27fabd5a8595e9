"""Accounts in daily use: the credential lock, retries, and secrets kept out of output and files."""

from __future__ import annotations

from typing import ClassVar

import pytest

from conftest import make_mail

DONE = "INBOX/CRM Erledigt [E]"


def dovecot_failed_logins(env) -> int:
    log = (env.dovecot.directory / "dovecot.log").read_text(errors="replace")
    return sum(1 for line in log.splitlines() if f"user=<{env.user}>" in line and "auth failed" in line)


def radicale_failed_logins(env) -> int:
    log = (env.radicale.directory / "radicale.log").read_text(errors="replace")
    return sum(1 for line in log.splitlines() if "Failed login attempt" in line and env.user in line)


def test_a_wrong_password_reaches_each_server_exactly_once_over_several_runs(make_env, monkeypatch):
    env = make_env(areas=("mail", "events"))
    monkeypatch.setenv(f"GWSYNC_TEST_PW_{env.user.upper()}", "wrong-imap-password")
    env.config_path.write_text(env.config_path.read_text().replace(
        f'password = "{env.radicale.password_for(env.user)}"', 'password = "wrong-dav-password"'))

    first = env.cli("sync")
    assert first.exit_code == 3
    assert "now locked" in first.stderr and "gwsync unlock alice" in first.stderr
    for _ in range(3):
        again = env.cli("sync")
        assert again.exit_code == 3
        lines = again.stderr.strip().splitlines()
        assert len(lines) == 2 and all("gwsync unlock alice" in l and "does not try it again" in l for l in lines)
    assert env.cli("folders").exit_code == 3
    assert dovecot_failed_logins(env) == 1
    assert radicale_failed_logins(env) == 1
    code, status = env.cli_json("status")
    assert sorted(l["service"] for l in status["accounts"]["alice"]["locked"]) == ["caldav", "imap"]
    for text in (first.stdout, first.stderr):
        assert "wrong-imap-password" not in text and "wrong-dav-password" not in text

    # the user fixes the passwords and unlocks
    monkeypatch.setenv(f"GWSYNC_TEST_PW_{env.user.upper()}", env.password)
    env.config_path.write_text(env.config_path.read_text().replace(
        'password = "wrong-dav-password"', f'password = "{env.radicale.password_for(env.user)}"'))
    result = env.cli("unlock", "alice")
    assert result.exit_code == 0 and "unlocked alice (caldav, imap)" in result.stdout
    env.append(DONE, make_mail(1))
    code, out = env.cli_json("sync")
    assert code == 0 and out["accounts"]["alice"]["mail"]["imported"] == 1


def test_an_unreachable_server_is_retried_and_never_locks(env):
    from gwsync.demo.localservers import free_port

    port = env.dovecot.port
    env.config_path.write_text(env.config_path.read_text().replace(f"port = {port}", f"port = {free_port()}"))
    for _ in range(2):
        result = env.cli("-v", "sync")
        assert result.exit_code == 1 and "cannot connect" in result.stderr
        assert result.stderr.count("trying again in") == 2  # two retries with a pause, then reported
    code, status = env.cli_json("status")
    assert status["accounts"]["alice"]["locked"] == []


def test_no_password_in_verbose_output_or_any_database_file(make_env, monkeypatch):
    env = make_env(areas=("mail", "events", "tasks"))
    env.append(DONE, make_mail(1))
    result = env.cli("-vv", "sync")
    assert result.exit_code == 0, result.stderr
    assert "DEBUG imapclient" in result.stderr  # the protocol conversation itself is in the output
    secrets = [env.password, env.radicale.password_for(env.user)]
    for secret in secrets:
        assert secret not in result.stdout and secret not in result.stderr
    for path in env.dir.rglob("*"):
        if path.is_file() and path.name != "config.toml":
            data = path.read_bytes()
            for secret in secrets:
                assert secret.encode() not in data, path


@pytest.fixture(scope="module")
def tls_dovecot():
    from gwsync.demo.localservers import Dovecot

    server = Dovecot.start(tls=True)
    yield server
    server.stop()


@pytest.mark.parametrize("security", ["tls", "starttls"])
def test_tls_verifies_certificates_by_default(env, tls_dovecot, security):
    port = tls_dovecot.tls_port if security == "tls" else tls_dovecot.port
    text = env.config_path.read_text()
    text = text.replace(f"port = {env.dovecot.port}", f"port = {port}").replace(
        'security = "none"', f'security = "{security}"')
    env.config_path.write_text(text)
    env.dovecot = tls_dovecot
    env.append(DONE, make_mail(1))

    untrusted = env.cli("sync")  # the test CA is not in the system's trust store
    assert untrusted.exit_code == 2 and "certificate not trusted" in untrusted.stderr
    assert "ca_file" in untrusted.stderr

    env.config_path.write_text(text.replace('security = ', f'ca_file = "{tls_dovecot.ca_file}"\nsecurity = '))
    code, out = env.cli_json("sync")
    assert code == 0 and out["accounts"]["alice"]["mail"]["imported"] == 1

    env.append(DONE, make_mail(2))
    env.config_path.write_text(text.replace('security = ', 'verify = false\nsecurity = '))
    code, out = env.cli_json("sync")  # the explicit opt-out
    assert code == 0 and out["accounts"]["alice"]["mail"]["imported"] == 1
    assert env.cli_json("status")[1]["accounts"]["alice"]["locked"] == []  # a TLS error never locks


def test_password_from_keyring_command_and_env(env, monkeypatch):
    import keyring
    from keyring.backend import KeyringBackend

    class MemoryKeyring(KeyringBackend):
        priority = 1
        store: ClassVar[dict[tuple[str, str], str]] = {("gwsync-test", env.user): env.password}

        def get_password(self, service, username):
            return self.store.get((service, username))

        def set_password(self, service, username, password):
            self.store[(service, username)] = password

        def delete_password(self, service, username):
            self.store.pop((service, username), None)

    previous = keyring.get_keyring()
    keyring.set_keyring(MemoryKeyring())
    try:
        env_line = f'password_env = "GWSYNC_TEST_PW_{env.user.upper()}"'
        text = env.config_path.read_text()
        env.config_path.write_text(text.replace(env_line, 'password_keyring = "gwsync-test"'))
        env.append(DONE, make_mail(1))
        code, out = env.cli_json("sync")
        assert code == 0 and out["accounts"]["alice"]["mail"]["imported"] == 1
    finally:
        keyring.set_keyring(previous)
    env.config_path.write_text(text.replace(env_line, f'password_command = ["printf", "{env.password}"]'))
    env.append(DONE, make_mail(2))
    code, out = env.cli_json("sync")
    assert code == 0 and out["accounts"]["alice"]["mail"]["imported"] == 1


def test_several_accounts_each_with_its_own_credentials_and_status(make_env):
    env = make_env()
    other = make_env()  # a second mail user on the same server, with its own password
    text = other.config_path.read_text()
    imap_table = text[text.index("[accounts.alice.imap]"):].split("\n\n")[0]
    env.config_path.write_text(env.config_path.read_text() + "\n[accounts.bob]\ninterval = 60\n\n"
                               + imap_table.replace("[accounts.alice.imap]", "[accounts.bob.imap]") + "\n")
    env.append(DONE, make_mail(1))
    other.append(DONE, make_mail(2), make_mail(3))

    code, out = env.cli_json("sync", "--account", "bob")
    assert code == 0 and list(out["accounts"]) == ["bob"] and out["accounts"]["bob"]["mail"]["imported"] == 2
    code, out = env.cli_json("sync")
    assert out["accounts"]["alice"]["mail"]["imported"] == 1 and out["accounts"]["bob"]["mail"]["imported"] == 0
    with env.engine() as engine:
        from gwsync.crm import ActivityFilter

        owners = sorted(a.owner for a in engine.crm.list_activities(ActivityFilter()))
    assert owners == ["alice", "bob", "bob"]

    # bob's server goes away: alice still syncs; status keeps bob's last success and his error
    env.config_path.write_text(env.config_path.read_text().replace(
        f'username = "{other.user}"', f'username = "{other.user}"\ntimeout = 5').replace(
        "[accounts.bob.imap]\nhost = \"127.0.0.1\"", "[accounts.bob.imap]\nhost = \"127.0.0.9\""))
    code, out = env.cli_json("sync")
    assert code == 1 and out["accounts"]["alice"]["error"] is None
    assert "cannot connect" in out["accounts"]["bob"]["error"]
    code, status = env.cli_json("status")
    bob = status["accounts"]["bob"]["areas"]["mail"]
    assert bob["ok"] is False and bob["last_success"] is not None and "cannot connect" in bob["error"]



def test_a_password_command_runs_once_per_run(make_env):
    """A password command may prompt (a GPG agent) or be slow: one sync reads each source once,
    not once for the up-front check, once per login and once per retry."""
    env = make_env(areas=("mail", "events"))
    runs = env.dir / "password-command-runs"
    text = env.config_path.read_text()
    env_line = f'password_env = "GWSYNC_TEST_PW_{env.user.upper()}"'
    command = f'password_command = ["sh", "-c", "echo run >> {runs}; printf %s {env.password}"]'
    env.config_path.write_text(text.replace(env_line, command, 1))
    env.append(DONE, make_mail(1))
    code, out = env.cli_json("sync")
    assert code == 0 and out["accounts"]["alice"]["mail"]["imported"] == 1
    assert runs.read_text().count("run") == 1
    code, _ = env.cli_json("sync")  # the next run reads it again: a changed password is picked up
    assert code == 0 and runs.read_text().count("run") == 2

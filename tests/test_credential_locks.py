"""The credential lock against real servers: a refused login on any service that sends a
credential (IMAP, CalDAV, ManageSieve) locks it, exits 3, and nothing sends it again until
`gwsync unlock`; every command, and every service that shares the credential."""

from __future__ import annotations

import time

import pytest

from conftest import make_mail, use_sieve_dovecot
from test_accounts import dovecot_failed_logins, radicale_failed_logins
from test_watch import Running

DONE = "INBOX/CRM Erledigt [E]"


@pytest.fixture
def senv(make_env, sieve_dovecot):
    """An account whose IMAP and ManageSieve are one Dovecot (Sieve borrows IMAP's credential)."""
    return lambda **kw: use_sieve_dovecot(make_env(**kw), sieve_dovecot)


def wrong_imap_password(env, monkeypatch) -> None:
    monkeypatch.setenv(f"GWSYNC_TEST_PW_{env.user.upper()}", "wrong-imap-password")


def wrong_dav_password(env) -> None:
    env.config_path.write_text(env.config_path.read_text().replace(
        f'password = "{env.radicale.password_for(env.user)}"', 'password = "wrong-dav-password"'))


def locked_services(env) -> list[str]:
    code, status = env.cli_json("status")
    return sorted(lock["service"] for lock in status["accounts"]["alice"]["locked"])


def one_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


# -- the two reported bugs ---------------------------------------------------------------------

def test_review_with_a_wrong_caldav_password_locks_it_and_exits_3(make_env):
    env = make_env(areas=("mail", "events"))
    wrong_dav_password(env)
    first = env.cli("review", input="mail, events\ny\n")
    assert first.exit_code == 3, first.stdout + first.stderr
    line = one_line(first)
    assert "login refused" in line and "now locked" in line and "gwsync unlock alice" in line
    assert locked_services(env) == ["caldav"]
    again = env.cli("review", input="mail, events\ny\n")
    assert again.exit_code == 3 and "does not try it again" in one_line(again)
    assert radicale_failed_logins(env) == 1


def test_rules_list_with_a_wrong_password_logs_in_once_and_locks(senv, monkeypatch):
    env = senv()
    wrong_imap_password(env, monkeypatch)
    results = [env.cli("rules", "list", "--account", "alice") for _ in range(3)]
    assert [r.exit_code for r in results] == [3, 3, 3], [r.stderr for r in results]
    assert "refused" in one_line(results[0]) and "now locked" in results[0].stderr
    assert all("does not try it again" in one_line(r) for r in results[1:])
    assert dovecot_failed_logins(env) == 1
    assert locked_services(env) == ["sieve"]
    # Sieve borrows IMAP's credential: the lock stops IMAP too
    assert env.cli("sync").exit_code == 3 and env.cli("folders").exit_code == 3
    assert dovecot_failed_logins(env) == 1

    monkeypatch.setenv(f"GWSYNC_TEST_PW_{env.user.upper()}", env.password)
    assert env.cli("unlock", "alice").exit_code == 0
    assert env.cli("rules", "list").exit_code == 0 and locked_services(env) == []


def test_an_imap_lock_stops_the_rules_commands(senv, monkeypatch):
    env = senv()
    wrong_imap_password(env, monkeypatch)
    assert env.cli("sync").exit_code == 3 and locked_services(env) == ["imap"]
    for args in (["rules", "list"], ["rules", "add", "--from", "@acme.example", "CRM Kunde [O]"],
                 ["rules", "remove", "1"]):
        result = env.cli(*args)
        assert result.exit_code == 3 and "does not try it again" in one_line(result), (args, result.stderr)
    assert dovecot_failed_logins(env) == 1


def test_sieve_with_a_password_of_its_own_is_its_own_credential(senv, monkeypatch):
    env = senv()
    env.config_path.write_text(env.config_path.read_text() + 'password = "wrong-sieve-password"\n')
    assert env.cli("rules", "list").exit_code == 3 and locked_services(env) == ["sieve"]
    env.append(DONE, make_mail(1))
    code, out = env.cli_json("sync")  # IMAP's own password is right and not locked
    assert code == 0 and out["accounts"]["alice"]["mail"]["imported"] == 1
    assert env.cli("rules", "list").exit_code == 3 and dovecot_failed_logins(env) == 1


# -- every command -----------------------------------------------------------------------------

def _activity(env) -> str:
    result = env.cli("activity", "add", "--kind", "AUFGABE", "--subject", "Angebot schicken")
    assert result.exit_code == 0, result.stderr
    return result.stdout.strip()


IMAP_COMMANDS = {
    "sync": lambda env: env.cli("sync"),
    "folders": lambda env: env.cli("folders"),
    "review": lambda env: env.cli("review", input="mail\ny\n"),
    "rules list": lambda env: env.cli("rules", "list"),
    "rules add": lambda env: env.cli("rules", "add", "--from", "@acme.example", "CRM Kunde [O]"),
    "rules remove": lambda env: env.cli("rules", "remove", "1"),
}


@pytest.mark.parametrize("command", sorted(IMAP_COMMANDS))
def test_every_imap_command_exits_3_on_a_refused_login_and_sends_it_once(senv, monkeypatch, command):
    env = senv()
    wrong_imap_password(env, monkeypatch)
    first = IMAP_COMMANDS[command](env)
    assert first.exit_code == 3, first.stdout + first.stderr
    assert "now locked" in first.stderr and "Traceback" not in first.stderr
    second = IMAP_COMMANDS[command](env)
    assert second.exit_code == 3 and "does not try it again" in second.stderr
    assert dovecot_failed_logins(env) == 1


DAV_COMMANDS = {
    "sync": lambda env, activity: env.cli("sync", "--only", "tasks"),
    "review": lambda env, activity: env.cli("review", input="tasks\ny\n"),
    "push": lambda env, activity: env.cli("push", activity, "--as", "task"),
    "unpush": lambda env, activity: env.cli("unpush", activity),
}


@pytest.mark.parametrize("command", sorted(DAV_COMMANDS))
def test_every_caldav_command_exits_3_on_a_refused_login_and_sends_it_once(make_env, command):
    env = make_env(areas=("mail", "tasks"))
    activity = _activity(env)
    assert env.cli("push", activity, "--as", "task").exit_code == 0  # unpush has an item to delete
    env.cli("sync")  # the collection is known: the next login goes with the first request
    wrong_dav_password(env)
    first = DAV_COMMANDS[command](env, activity)
    assert first.exit_code == 3, first.stdout + first.stderr
    assert "now locked" in first.stderr and "Traceback" not in first.stderr
    second = DAV_COMMANDS[command](env, activity)
    assert second.exit_code == 3 and "does not try it again" in second.stderr
    assert radicale_failed_logins(env) == 1
    assert locked_services(env) == ["caldav"]


def test_watch_sends_a_refused_login_once(make_env, monkeypatch):
    env = make_env()
    env.create(DONE)
    wrong_imap_password(env, monkeypatch)
    env.config_path.write_text(env.config_path.read_text().replace('areas = ["mail"]',
                                                                   'areas = ["mail"]\ninterval = 1'))
    running = Running(env)
    try:
        running.wait_for(r"now locked", 20)
        time.sleep(4)  # several intervals: each must see the lock, not the server
    finally:
        assert running.stop() == 0
    assert dovecot_failed_logins(env) == 1 and locked_services(env) == ["imap"]
    assert any("does not try it again" in line for line in running.seen + _drain(running))


def _drain(running: Running) -> list[str]:
    out = []
    while not running.lines.empty():
        out.append(running.lines.get())
    return out


def test_the_engine_lists_and_clears_the_locks_for_a_library_user(make_env, monkeypatch):
    """`Engine.locks()` and `Engine.unlock()`, as the README's "Use it as a library" lists them."""
    env = make_env()
    wrong_imap_password(env, monkeypatch)
    assert env.cli("sync").exit_code == 3
    with env.engine() as engine:
        assert [(lock["account"], lock["service"]) for lock in engine.locks()] == [("alice", "imap")]
        assert engine.unlock("alice") == ["imap"]
        assert engine.locks() == []

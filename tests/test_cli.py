"""The command line as a user meets it, against a real Dovecot (and pymap for the demo)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import make_mail
from gwsync.demo.localservers import free_port

DONE = "INBOX/CRM Erledigt [E]"


def _rewrite(env, old: str, new: str) -> None:
    env.config_path.write_text(env.config_path.read_text().replace(old, new))


def test_wrong_password_is_one_clear_line_and_leaks_nothing(env, monkeypatch):
    env.append(DONE, make_mail(1))
    monkeypatch.setenv(f"GWSYNC_TEST_PW_{env.user.upper()}", "wrong-password-123")
    result = env.cli("sync")
    assert result.exit_code == 3  # and the credential is locked (tests/test_accounts.py)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "account alice" in lines[0] and "login" in lines[0]
    assert "wrong-password-123" not in result.stdout + result.stderr
    assert len(env.messages(DONE)) == 1


def test_dead_server_is_reported_and_nothing_is_lost(env):
    env.append(DONE, make_mail(1))
    _rewrite(env, f"port = {env.dovecot.port}", f"port = {free_port()}")
    code, out = env.cli_json("sync")
    assert code == 1
    assert "cannot connect" in out["accounts"]["alice"]["error"]
    assert "alice" in out["accounts"]["alice"]["error"]


def test_wrong_import_root_names_the_folder(env):
    _rewrite(env, 'import_root = "INBOX"', 'import_root = "Posteingang"')
    _rewrite(env, 'archive_folder = "INBOX/CRM Archiv"', 'archive_folder = "Archiv"')
    result = env.cli("sync")
    assert result.exit_code == 1 and "'Posteingang' does not exist" in result.stderr


def test_folders_lists_statuses_and_flags_unknown_keys(env):
    env.create("INBOX/CRM Erledigt [E]", "INBOX/CRM Neu [N]", "INBOX/Privat")
    code, rows = env.cli_json("folders")
    assert code == 1  # an unknown status key is an error
    by_name = {r["folder"]: r for r in rows}
    assert set(by_name) == {"INBOX/CRM Erledigt [E]", "INBOX/CRM Neu [N]"}
    assert by_name["INBOX/CRM Erledigt [E]"]["status_label"] == "Erledigt"
    assert by_name["INBOX/CRM Neu [N]"]["error"] == "unknown status key [N]"


def test_sync_prints_count_and_links_and_status_remembers_it(env):
    env.append(DONE, make_mail(1))
    result = env.cli("sync")
    assert result.exit_code == 0
    assert "alice: imported 1 mail(s)" in result.stdout
    assert "https://crm.example.com/activities/1" in result.stdout
    code, status = env.cli_json("status")
    mail = status["accounts"]["alice"]["areas"]["mail"]
    assert mail["ok"] and mail["counts"] == {"imported": 1, "held": 0, "failed": 0}


def test_contact_and_partner_add_print_ids(env):
    result = env.cli("partner", "add", "ACME", "--email", "info@acme.example")
    assert result.exit_code == 0 and result.stdout.strip() == "1"
    code, contact = env.cli_json("contact", "add", "Erika", "--email", "erika@acme.example", "--partner", "1")
    assert code == 0 and contact["partner_id"] == 1 and contact["emails"] == ["erika@acme.example"]
    assert env.cli("contact", "add", "X", "--email", "x@y.example", "--partner", "42").exit_code == 2
    assert env.cli("contact", "add", "X", "--email", "not-an-address").exit_code == 2


def test_quiet_pipe_output_has_no_progress_bar(env):
    env.append(DONE, *(make_mail(n) for n in range(30)))
    proc = env.subprocess("sync", "--json")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and err == b""
    assert json.loads(out)["accounts"]["alice"]["mail"]["imported"] == 30


def test_demo_runs_on_the_builtin_server_with_nothing_but_the_package():
    proc = subprocess.run([sys.executable, "-m", "gwsync.cli", "demo"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "first sync:  imported 4" in proc.stdout
    assert "second sync: imported 0" in proc.stdout
    assert "UNASSIGNED" in proc.stdout and "by domain" in proc.stdout
    assert "Bestellung 2026-114.pdf" in proc.stdout
    assert "events: 1 new in the CRM, 0 new on the server" in proc.stdout
    assert "tasks: 0 new in the CRM, 1 new on the server" in proc.stdout
    assert ("the phone's event now carries the CRM link: DESCRIPTION:CRM: http://127.0.0.1:8765/activities/"
            in proc.stdout)
    assert "calendar requests: 2 (one per collection" in proc.stdout
    assert "web view (gwsync serve): the event's link opens the activity page 'Jahresgespräch ACME'" in proc.stdout
    assert ("the same meeting is in bob's calendar too: 1 activity" in proc.stdout
            and "participants demo, bob; 0 new from bob's copy; its CRM link is the same" in proc.stdout)


def test_demo_runs_on_dovecot():
    proc = subprocess.run([sys.executable, "-m", "gwsync.cli", "demo", "--dovecot"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "first sync:  imported 4" in proc.stdout and "archive folder holds 4 mail(s)" in proc.stdout


def test_activity_add_takes_a_contact_with_its_partner(env):
    assert env.cli("partner", "add", "ACME GmbH", "--email", "info@acme.example").exit_code == 0
    assert env.cli("contact", "add", "Erika", "--email", "erika@acme.example", "--partner", "1").exit_code == 0
    code, added = env.cli_json("activity", "add", "--kind", "TERMIN", "--subject", "Termin", "--contact", "1")
    assert code == 0 and (added["contact_id"], added["partner_id"]) == (1, 1)
    code, edited = env.cli_json("activity", "edit", str(added["id"]), "--partner", "1")
    assert code == 0 and edited["partner_id"] == 1
    for option in ("--contact", "--partner"):
        result = env.cli("activity", "add", "--kind", "TERMIN", "--subject", "x", option, "99")
        assert result.exit_code == 2 and f"{option} 99: no such" in result.stderr
    assert len(env.cli_json("activities")[1]) == 1  # nothing half-created

"""A team on one CRM: two accounts, alice and bob, each with their own calendar and task list on
one Radicale, and one mailbox each on one Dovecot. One activity per iCalendar UID; a deletion
never destroys what the deleted copy did not create; items follow their holders (owner change,
delegation)."""

from __future__ import annotations

import re

import pytest

from conftest import crlf
from gwsync.crm import ActivityFilter

AREAS = ("mail", "events", "tasks")
ALICE, BOB = "alice@firma.example", "bob@firma.example"


def _account_table(env, name: str, addresses: str, areas: tuple[str, ...] | None = None) -> str:
    """`env`'s [accounts.alice] tables renamed to `name`, with its own addresses."""
    table = env.config_path.read_text().split("[accounts.alice]\n", 1)[1]
    table = table.replace("[accounts.alice.", f"[accounts.{name}.")
    if areas is not None:
        table = re.sub(r"^areas = .*$", f"areas = {list(areas)!r}".replace("'", '"'), table, count=1, flags=re.M)
    return f"\n[accounts.{name}]\naddresses = [\"{addresses}\"]\n" + table


def team(make_env, shared: bool = False):
    """alice's env, whose config has a second account bob on the same CRM, and bob's env (his
    own mail and CalDAV user); with `shared`, bob syncs alice's calendar (a team calendar)."""
    alice = make_env(areas=AREAS)
    bob = alice if shared else make_env(areas=AREAS)
    text = alice.config_path.read_text()
    text = text.replace('R = "Rückruf"\n', 'R = "Rückruf"\nS = "Storniert"\n')
    bob_table = _account_table(bob, "bob", BOB, ("events",) if shared else None)
    text = text.replace("[accounts.alice]\n", f'[accounts.alice]\naddresses = ["{ALICE}"]\n', 1)
    alice.config_path.write_text(text + bob_table)
    return alice, bob


def meeting(uid: str, summary: str, extra: str = "") -> str:
    """An invitation from alice to bob, as their calendar clients store it."""
    return (f"BEGIN:VCALENDAR\nVERSION:2.0\nPRODID:-//Phone//EN\nBEGIN:VEVENT\nUID:{uid}\nDTSTAMP:20261120T100000Z\n"
            f"DTSTART:20261201T090000Z\nDTEND:20261201T100000Z\nSUMMARY:{summary}\n"
            f"ORGANIZER;CN=Alice:mailto:{ALICE}\nATTENDEE;CN=Bob:mailto:{BOB}\n{extra}END:VEVENT\nEND:VCALENDAR\n")


def sync(env, *args):
    code, out = env.cli_json("sync", *args)
    assert code == 0, out
    return out["accounts"]


def activities(env):
    with env.engine() as engine:
        return engine.crm.list_activities(ActivityFilter())


def activity(env, activity_id: int):
    with env.engine() as engine:
        return engine.crm.get_activity(activity_id)


def unfolded(text: str) -> list[str]:
    return text.replace("\r\n", "\n").replace("\n ", "").split("\n")


def crm_lines(text: str) -> list[str]:
    """The link line and gwsync's identity properties of an item."""
    return [l for l in unfolded(text) if l.startswith(("CRM: ", "DESCRIPTION:", "X-GWSYNC-ACTIVITY-"))]


def only_item(env, area: str = "events") -> tuple[str, str, str]:
    (name, (etag, text)), = env.dav_items(area).items()
    return name, etag, text


def shared_meeting(make_env):
    """The same meeting (one UID) in alice's and bob's calendars, synced by both."""
    alice, bob = team(make_env)
    alice.dav_put("events", "m.ics", meeting("meet-1", "Projektstart"))
    bob.dav_put("events", "invite.ics", meeting("meet-1", "Projektstart"))
    out = sync(alice)
    (act,) = activities(alice)
    return alice, bob, act, out


def test_the_same_meeting_in_both_calendars_is_one_activity_with_both_participants(make_env):
    alice, bob, act, out = shared_meeting(make_env)

    assert out["alice"]["events"]["created_crm"] + out["bob"]["events"]["created_crm"] == 1
    assert sorted(act.participants) == ["alice", "bob"] and act.owner == "alice"
    _, _, alice_text = only_item(alice)
    _, _, bob_text = only_item(bob)
    link = f"CRM: https://crm.example.com/activities/{act.id}"
    assert crm_lines(alice_text) == crm_lines(bob_text) and any(l.endswith(link) for l in crm_lines(bob_text))
    assert f"X-GWSYNC-ACTIVITY-ID:{act.id}" in unfolded(bob_text)
    again = sync(alice)  # settled: nothing to do on either calendar
    for name in ("alice", "bob"):
        counts = again[name]["events"]
        assert counts["created_crm"] == counts["updated_crm"] == counts["updated_groupware"] == 0, (name, counts)
    assert len(activities(alice)) == 1


def test_a_team_calendar_synced_by_both_accounts_imports_each_item_once(make_env):
    alice, _ = team(make_env, shared=True)
    alice.dav_put("events", "a.ics", meeting("team-a", "Teamrunde"))
    alice.dav_put("events", "b.ics", meeting("team-b", "Messe"))

    sync(alice)
    before = alice.dav_items("events")
    again = sync(alice)

    acts = activities(alice)
    assert sorted(a.subject for a in acts) == ["Messe", "Teamrunde"]
    assert all(sorted(a.participants) == ["alice", "bob"] for a in acts)
    by_subject = {a.subject: a.id for a in acts}
    for _etag, text in alice.dav_items("events").values():
        subject = next(l for l in unfolded(text) if l.startswith("SUMMARY:"))[len("SUMMARY:"):]
        assert f"X-GWSYNC-ACTIVITY-ID:{by_subject[subject]}" in unfolded(text)
    assert alice.dav_items("events") == before  # the second run wrote nothing: no link rewritten
    assert again["bob"]["events"]["created_crm"] == 0 and again["alice"]["events"]["created_crm"] == 0


def test_an_edit_in_bobs_copy_reaches_the_crm_and_alices_copy(make_env):
    alice, bob, act, _ = shared_meeting(make_env)
    name, etag, text = only_item(bob)
    bob.dav_put("events", name, text.replace("SUMMARY:Projektstart", "LOCATION:Raum 4\nSUMMARY:Projektstart"), etag)

    sync(alice)  # bob's run reads the edit
    assert activity(alice, act.id).location == "Raum 4"
    sync(alice)  # alice's copy follows on her next run

    assert "LOCATION:Raum 4" in unfolded(only_item(alice)[2])
    assert len(activities(alice)) == 1


def test_bob_deleting_his_copy_keeps_the_activity_and_takes_him_out(make_env):
    alice, bob, act, _ = shared_meeting(make_env)
    bob.dav_delete("events", only_item(bob)[0])

    result = alice.cli("sync", "--only", "events")
    assert result.exit_code == 0, result.stderr
    assert "bob events: CRM +0 ~0 -0, groupware +0 ~0 -0, unlinked 1, conflicts 0" in result.stdout
    out = sync(alice)

    after = activity(alice, act.id)
    assert after is not None and after.participants == ["alice"] and after.status == "O"
    assert out["bob"]["events"]["deleted_crm"] == out["bob"]["events"]["unlinked"] == 0  # done by the first run
    assert bob.dav_items("events") == {}  # not created again
    assert len(alice.dav_items("events")) == 1


def test_the_organizer_deleting_her_copy_cancels_the_meeting(make_env):
    alice, bob, act, _ = shared_meeting(make_env)
    alice.dav_delete("events", only_item(alice)[0])

    sync(alice)  # alice's run cancels it; bob's run (after hers) writes the cancellation into his copy
    sync(alice)

    after = activity(alice, act.id)
    assert after is not None and after.status == "S"
    assert "STATUS:CANCELLED" in unfolded(only_item(bob)[2])
    assert alice.dav_items("events") == {}  # her deletion stands


def test_a_pushed_mail_whose_task_is_deleted_on_the_phone_is_unpushed_and_kept_with_its_documents(make_env):
    alice, _ = team(make_env)
    alice.append("INBOX/CRM Eingang [O]", crlf(
        b"From: erika@kunde.example\nTo: alice@firma.example\nSubject: Bitte Angebot\n"
        b"Message-ID: <doc1@kunde.example>\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=b\n\n"
        b"--b\nContent-Type: text/plain\n\nText\n--b\nContent-Type: application/pdf\n"
        b"Content-Disposition: attachment; filename=anfrage.pdf\n\n%PDF-1\n--b--\n"))
    sync(alice, "--only", "mail", "--account", "alice")
    (mail,) = activities(alice)
    assert len(mail.documents) == 1
    result = alice.cli("push", str(mail.id), "--as", "task", "--account", "alice")
    assert result.exit_code == 0, result.stderr
    alice.dav_delete("tasks", only_item(alice, "tasks")[0])

    out = sync(alice)
    sync(alice)

    kept = activity(alice, mail.id)
    assert kept is not None and kept.subject == "Bitte Angebot" and len(kept.documents) == 1
    assert out["alice"]["tasks"]["deleted_crm"] == 0
    assert alice.dav_items("tasks") == {}  # unpushed: not put back


def test_an_owner_change_moves_the_item_to_the_new_owners_calendar(make_env):
    alice, bob = team(make_env)
    result = alice.cli("activity", "add", "--kind", "TERMIN", "--subject", "Kundenbesuch", "--start",
                       "2026-12-09T10:00", "--end", "2026-12-09T11:00", "--owner", "alice")
    activity_id = int(result.stdout.strip())
    sync(alice)
    assert len(alice.dav_items("events")) == 1 and bob.dav_items("events") == {}

    result = alice.cli("activity", "edit", str(activity_id), "--owner", "bob")
    assert result.exit_code == 0, result.stderr
    dry = alice.cli("sync", "--dry-run")
    (href,) = (f"/{alice.user}/calendar/{name}" for name in alice.dav_items("events"))
    assert f"alice events: release activity {activity_id}, item {href}: 'Kundenbesuch'" in dry.stdout.splitlines()
    assert f"bob events: create-groupware activity {activity_id}, new item: 'Kundenbesuch'" in dry.stdout.splitlines()
    sync(alice)
    sync(alice)

    assert alice.dav_items("events") == {}
    assert f"X-GWSYNC-ACTIVITY-ID:{activity_id}" in unfolded(only_item(bob)[2])
    moved = activity(alice, activity_id)
    assert moved is not None and moved.owner == "bob" and "alice" not in moved.participants
    assert len(activities(alice)) == 1


@pytest.mark.parametrize("kind", ["WIEDERVORLAGE", "AUFGABE"])
def test_a_task_delegated_to_bob_moves_to_his_task_list(make_env, kind):
    alice, bob = team(make_env)
    result = alice.cli("activity", "add", "--kind", kind, "--subject", "Angebot nachfassen", "--due",
                       "2026-12-05", "--owner", "alice")
    activity_id = int(result.stdout.strip())
    sync(alice)
    assert len(alice.dav_items("tasks")) == 1 and bob.dav_items("tasks") == {}

    result = alice.cli("activity", "edit", str(activity_id), "--delegate", "bob")
    assert result.exit_code == 0, result.stderr
    out = sync(alice)
    sync(alice)

    assert alice.dav_items("tasks") == {}
    assert f"X-GWSYNC-ACTIVITY-ID:{activity_id}" in unfolded(only_item(bob, "tasks")[2])
    assert out["alice"]["tasks"]["deleted_crm"] == 0 and activity(alice, activity_id).delegated_to == "bob"


def test_an_imported_private_item_is_a_private_activity_with_private_import(make_env):
    env = make_env(areas=("events",), extra='\n[sync]\nprivate = "import"\n')
    env.dav_put("events", "arzt.ics", meeting("arzt", "Arzttermin", "CLASS:PRIVATE\n"))
    env.dav_put("events", "kunde.ics", meeting("kunde", "Kundentermin"))

    sync(env)

    assert {a.subject: a.private for a in activities(env)} == {"Arzttermin": True, "Kundentermin": False}

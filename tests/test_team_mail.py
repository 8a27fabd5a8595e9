"""A team on one CRM, mail: the same mail filed by several employees is one activity, each filer
a participant (real Dovecot, two accounts alice and bob on one CRM)."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import crlf
from gwsync.crm import ActivityDraft, ActivityFilter
from gwsync.mail.mime import MAX_HEADER_BLOCK, MailKeyReader, content_key, mail_keys

DONE = "INBOX/CRM Erledigt [E]"
OPEN = "INBOX/CRM Offen [O]"
ARCHIVE = "INBOX/CRM Archiv"


def add_account(env, other, name: str) -> None:
    """Give `env`'s config a second account: `other`'s mail user, on the same CRM and state."""
    table = other.config_path.read_text().split("[accounts.alice]", 1)[1]
    env.config_path.write_text(env.config_path.read_text() + f"\n[accounts.{name}]" +
                               table.replace("[accounts.alice.", f"[accounts.{name}."))


def team(make_env):
    alice, bob = make_env(), make_env()
    add_account(alice, bob, "bob")
    return alice, bob


def delivered(n: int, to: str, body: str | None = None, message_id: str | None = None, hop: str = "mx1") -> bytes:
    """Mail n as the server delivered it to `to`: its own trace and delivery headers."""
    mid = f"Message-ID: <angebot{n}@acme.example>\n" if message_id is None else message_id
    return crlf((f"Return-Path: <erika@acme.example>\nDelivered-To: {to}\nX-Original-To: {to}\n"
                 f"Received: from {hop}.acme.example by mail.firma.example with LMTP id {hop}{n} for <{to}>;"
                 " Mon, 23 Nov 2026 09:00:00 +0100\n"
                 "From: Erika Mustermann <erika@acme.example>\nTo: alice@firma.example, bob@firma.example\n"
                 f"Subject: Angebot {n}\nDate: Mon, 23 Nov 2026 08:59:00 +0100\n{mid}"
                 f"X-Seq: {n}\n\n{body or f'Das Angebot Nr. {n} im Anhang.'}\n").encode())


def activities(env) -> list:
    with env.engine() as engine:
        return engine.crm.list_activities(ActivityFilter())


def seqs(env, folder: str) -> list[int]:
    return sorted(int(re.search(rb"X-Seq: (\d+)", m["raw"]).group(1)) for m in env.messages(folder).values())


def test_the_same_mail_filed_by_two_employees_is_one_activity_with_both_as_participants(make_env):
    alice, bob = team(make_env)
    alice.append(DONE, delivered(1, "alice@firma.example"))
    bob.append(OPEN, delivered(1, "bob@firma.example", hop="mx2"))

    code, out = alice.cli_json("sync")

    assert code == 0, out
    reports = {name: out["accounts"][name]["mail"] for name in ("alice", "bob")}
    assert reports["alice"]["imported"] + reports["bob"]["imported"] == 1
    (activity,) = activities(alice)
    assert activity.subject == "Angebot 1" and activity.owner == "alice" and activity.status == "E"
    assert sorted(activity.participants) == ["alice", "bob"]
    # Both mails are archived, each in its own mailbox, with its own delivery headers.
    assert seqs(alice, ARCHIVE) == [1] and seqs(bob, ARCHIVE) == [1]
    assert alice.messages(DONE) == {} and bob.messages(OPEN) == {}
    (bobs,) = bob.messages(ARCHIVE).values()
    assert b"Delivered-To: bob@firma.example" in bobs["raw"]
    # Nothing changes on the next sync, and bob's copy put back is not imported again.
    with bob.imap() as client:
        client.select_folder(ARCHIVE)
        client.copy(client.search(["ALL"]), OPEN)
    code, out = alice.cli_json("sync")
    assert code == 0 and [out["accounts"][n]["mail"]["imported"] for n in ("alice", "bob")] == [0, 0]
    assert len(activities(alice)) == 1 and seqs(bob, ARCHIVE) == [1] and bob.messages(OPEN) == {}


def test_the_first_filer_owns_the_activity_and_is_a_participant(make_env):
    alice, bob = team(make_env)
    bob.append(DONE, delivered(1, "bob@firma.example"))
    code, out = alice.cli_json("sync", "--account", "bob")
    assert code == 0 and out["accounts"]["bob"]["mail"]["imported"] == 1
    alice.append(DONE, delivered(1, "alice@firma.example"))
    code, out = alice.cli_json("sync", "--account", "alice")
    assert code == 0 and out["accounts"]["alice"]["mail"]["imported"] == 0
    (activity,) = activities(alice)
    assert activity.owner == "bob" and activity.participants == ["bob", "alice"]
    assert seqs(alice, ARCHIVE) == [1] and alice.messages(DONE) == {}


def test_the_same_message_id_with_another_body_or_attachment_is_another_activity(make_env):
    alice, bob = team(make_env)
    alice.append(DONE, delivered(1, "alice@firma.example"))
    # A forwarded or edited copy: same Message-ID, another body.
    bob.append(DONE, delivered(1, "bob@firma.example", body="Korrigiertes Angebot, bitte dieses nehmen."))

    code, out = alice.cli_json("sync")

    assert code == 0
    acts = activities(alice)
    assert len(acts) == 2 and {a.owner for a in acts} == {"alice", "bob"}
    assert sorted(tuple(a.participants) for a in acts) == [("alice",), ("bob",)]
    assert seqs(alice, ARCHIVE) == [1] and seqs(bob, ARCHIVE) == [1]


def _with_attachment(to: str, data: bytes) -> bytes:
    return crlf(b"Delivered-To: " + to.encode() + b"\nFrom: erika@acme.example\nSubject: Vertrag\n"
                b"Message-ID: <vertrag@acme.example>\nX-Seq: 7\nMIME-Version: 1.0\n"
                b"Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: text/plain\n\nanbei\n"
                b"--b\nContent-Type: application/pdf\nContent-Disposition: attachment; filename=vertrag.pdf\n"
                b"Content-Transfer-Encoding: base64\n\n" + data + b"\n--b--\n")


def test_the_same_body_with_another_attachment_is_another_activity(make_env):
    alice, bob = team(make_env)
    carol = make_env()
    add_account(alice, carol, "carol")
    alice.append(DONE, _with_attachment("alice@firma.example", b"JVBERi0xLjQK"))
    bob.append(DONE, _with_attachment("bob@firma.example", b"JVBERi0xLjQK"))
    carol.append(DONE, _with_attachment("carol@firma.example", b"JVBERi0xLjUK"))
    code, out = alice.cli_json("sync")
    assert code == 0
    acts = sorted(activities(alice), key=lambda a: a.id)
    assert [sorted(a.participants) for a in acts] == [["alice", "bob"], ["carol"]]
    assert [len(a.documents) for a in acts] == [1, 1]
    assert acts[0].documents[0].sha256 != acts[1].documents[0].sha256


def test_mail_without_a_message_id_keeps_the_exact_bytes_key(make_env):
    alice, bob = team(make_env)
    alice.append(DONE, delivered(1, "alice@firma.example", message_id=""))
    bob.append(DONE, delivered(1, "bob@firma.example", message_id=""))
    # The same bytes twice in one mailbox are still one activity.
    alice.append(OPEN, delivered(1, "alice@firma.example", message_id=""))
    code, out = alice.cli_json("sync")
    assert code == 0
    acts = activities(alice)
    assert len(acts) == 2 and sorted(a.owner for a in acts) == ["alice", "bob"]
    keys = {a.owner: a.key for a in acts}
    raw_alice = next(iter(alice.messages(ARCHIVE).values()))["raw"]
    assert keys["alice"] == content_key(raw_alice)
    assert seqs(alice, ARCHIVE) == [1] and alice.messages(OPEN) == {} and alice.messages(DONE) == {}


def test_an_activity_imported_before_under_the_exact_bytes_key_is_not_imported_again(make_env):
    """Activities made before mail was matched by Message-ID keep their keys: the same mail in an
    import folder again (an earlier run died before the move, or the user put it back) is archived,
    not imported a second time."""
    alice, _bob = team(make_env)
    raw = delivered(1, "alice@firma.example")
    with alice.engine() as engine:
        (old,) = engine.crm.create_activities([ActivityDraft(
            key=content_key(raw), kind="MAILEIN", status="E", subject="Angebot 1", source="alice:" + DONE,
            owner="alice", message_id="<angebot1@acme.example>")])
    alice.append(DONE, raw)
    code, out = alice.cli_json("sync", "--account", "alice")
    assert code == 0 and out["accounts"]["alice"]["mail"]["imported"] == 0
    (activity,) = activities(alice)
    assert activity.id == old and activity.key == content_key(raw) and activity.participants == ["alice"]
    assert seqs(alice, ARCHIVE) == [1] and alice.messages(DONE) == {}


def test_two_employees_syncing_at_the_same_moment_make_one_activity_per_mail(make_env):
    alice, bob = team(make_env)
    total = 300
    alice.append(DONE, *(delivered(n, "alice@firma.example") for n in range(total)))
    bob.append(OPEN, *(delivered(n, "bob@firma.example", hop="mx2") for n in range(total)))

    procs = [alice.subprocess("sync", "--json", "--account", name) for name in ("alice", "bob")]
    reports = []
    for proc, name in zip(procs, ("alice", "bob"), strict=True):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()
        reports.append(json.loads(out)["accounts"][name]["mail"])

    acts = activities(alice)
    assert len(acts) == total, f"{len(acts) - total} activities too many"
    assert sorted(a.subject for a in acts) == sorted(f"Angebot {n}" for n in range(total))
    assert all(sorted(a.participants) == ["alice", "bob"] for a in acts)
    assert all(a.owner in a.participants for a in acts)
    # Each run counts only the activities it created: together, each one once.
    assert sum(r["imported"] for r in reports) == total
    assert seqs(alice, ARCHIVE) == list(range(total)) and seqs(bob, ARCHIVE) == list(range(total))
    assert alice.messages(DONE) == {} and bob.messages(OPEN) == {}


def test_a_streamed_copy_and_a_whole_copy_of_one_mail_are_one_activity(make_env, monkeypatch):
    """Mail above the stream threshold is read in pieces: its keys are the same as read whole."""
    from gwsync.mail import importer

    alice, bob = team(make_env)
    alice.append(DONE, delivered(1, "alice@firma.example"))
    bob.append(DONE, delivered(1, "bob@firma.example"))
    monkeypatch.setattr(importer, "STREAM_THRESHOLD", 100)  # alice's copy is streamed
    with alice.engine() as engine:
        assert engine.sync(accounts=["alice"]).exit_code == 0
    monkeypatch.setattr(importer, "STREAM_THRESHOLD", 8 << 20)  # bob's is read whole
    with alice.engine() as engine:
        report = engine.sync(accounts=["bob"])
    assert report.exit_code == 0 and report.accounts["bob"].mail.imported == 0
    (activity,) = activities(alice)
    assert sorted(activity.participants) == ["alice", "bob"]
    assert seqs(alice, ARCHIVE) == [1] and seqs(bob, ARCHIVE) == [1]


# -- the keys, as units ----------------------------------------------------------------------------

BASE = crlf(b"From: Erika <erika@acme.example>\nTo: alice@firma.example\nCc: bob@firma.example\n"
            b"Subject: Angebot\nDate: Mon, 23 Nov 2026 08:59:00 +0100\nMessage-ID: <a1@acme.example>\n"
            b"MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: text/plain\n\n"
            b"anbei\n--b\nContent-Type: application/pdf\nContent-Disposition: attachment; filename=a.pdf\n"
            b"Content-Transfer-Encoding: base64\n\nJVBERi0xLjQK\n--b--\n")
DELIVERY = ("Received", "Delivered-To", "Return-Path", "X-Original-To", "X-Spam-Status", "DKIM-Signature",
            "Authentication-Results", "Bcc", "Envelope-To", "X-Seq")
header_value = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=40)


def _headers_added(raw: bytes, added: list[tuple[str, str]], at_top: bool) -> bytes:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = b"".join(f"{name}: {value}\r\n".encode() for name, value in added)
    return (lines + head + b"\r\n" if at_top else head + b"\r\n" + lines) + b"\r\n" + body


@settings(max_examples=200)
@given(st.lists(st.tuples(st.sampled_from(DELIVERY), header_value), max_size=6), st.booleans())
def test_delivery_headers_do_not_change_the_activity_key(added, at_top):
    copy = _headers_added(BASE, added, at_top)
    assert mail_keys(copy).activity == mail_keys(BASE).activity
    assert mail_keys(copy).exact != mail_keys(BASE).exact or not added


@pytest.mark.parametrize("old, new", [
    (b"anbei\r\n", b"anbei, korrigiert\r\n"),  # the body
    (b"JVBERi0xLjQK", b"JVBERi0xLjUK"),  # an attachment
    (b"filename=a.pdf", b"filename=b.pdf"),  # an attachment's name
    (b"Subject: Angebot", b"Subject: Fwd: Angebot"),
    (b"To: alice@firma.example", b"To: carol@firma.example"),
    (b"Cc: bob@firma.example", b"Cc: dave@firma.example"),
    (b"From: Erika <erika@acme.example>", b"From: Mallory <erika@acme.example>"),
    (b"Date: Mon, 23 Nov 2026 08:59:00", b"Date: Mon, 23 Nov 2026 09:59:00"),
    (b"boundary=b", b"boundary=\"b\""),  # how the body is read
    (b"<a1@acme.example>", b"<a2@acme.example>"),
])
def test_what_the_activity_keeps_changes_the_activity_key(old, new):
    assert old in BASE
    assert mail_keys(BASE.replace(old, new, 1)).activity != mail_keys(BASE).activity


def test_refolding_a_content_header_keeps_the_key():
    refolded = BASE.replace(b"To: alice@firma.example", b"To:\r\n\talice@firma.example")
    assert mail_keys(refolded).activity == mail_keys(BASE).activity


@pytest.mark.parametrize("message_id", [b"", b"Message-ID: <>\r\n", b"Message-ID:   \r\n"])
def test_without_a_message_id_the_activity_key_is_the_exact_bytes_key(message_id):
    raw = BASE.replace(b"Message-ID: <a1@acme.example>\r\n", message_id)
    keys = mail_keys(raw)
    assert keys.activity == keys.exact == content_key(raw)


def test_a_header_block_too_large_to_look_at_keeps_the_exact_bytes_key():
    raw = b"X-Pad: " + b"x" * MAX_HEADER_BLOCK + b"\r\n" + BASE
    keys = mail_keys(raw)
    assert keys.activity == keys.exact


@settings(max_examples=200)
@given(st.one_of(st.binary(max_size=600), st.just(BASE), st.just(b"Message-ID: <x>\n\nbody"),
                 st.just(b"\r\nno headers"), st.just(b"Message-ID: <x>\r\nno body")),
       st.lists(st.integers(0, 700), max_size=8))
def test_fed_in_any_pieces_the_keys_are_those_of_the_whole(raw, cuts):
    reader = MailKeyReader()
    last = 0
    for cut in sorted(set(cuts)) + [len(raw)]:
        reader.feed(raw[last:cut])
        last = max(last, cut)
    assert reader.finish() == mail_keys(raw)
    assert mail_keys(raw).exact == content_key(raw)

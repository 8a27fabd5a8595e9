"""The mail import end to end against a real Dovecot."""

from __future__ import annotations

import base64
import hashlib
import itertools
import os
import stat

import pytest
from hypothesis import HealthCheck, given, settings

import mimegen
from conftest import FIXTURES, crlf, make_mail
from gwsync.crm import ActivityFilter
from gwsync.mail.imap import ImapSession
from gwsync.mail.importer import STREAM_THRESHOLD, _StreamedMail
from gwsync.mail.mime import parse_message

DONE = "INBOX/CRM Erledigt [E]"
OPEN = "INBOX/CRM Offen [O]"
ARCHIVE = "INBOX/CRM Archiv"
_seq = itertools.count(1)


def test_mail_in_crm_folders_becomes_activities_and_is_archived(env):
    env.append(DONE, make_mail(1), make_mail(2))
    env.append(OPEN, make_mail(3))
    env.append("INBOX", make_mail(99))  # not an import folder: untouched

    code, out = env.cli_json("sync")

    assert code == 0
    assert out["accounts"]["alice"]["mail"]["imported"] == 3
    assert out["accounts"]["alice"]["error"] is None
    with env.engine() as engine:
        acts = engine.crm.list_activities(ActivityFilter(imported=True))
    assert sorted((a.subject, a.status, a.kind) for a in acts) == [
        ("Test mail 1", "E", "MAILEIN"), ("Test mail 2", "E", "MAILEIN"), ("Test mail 3", "O", "MAILEIN")]
    assert all(a.link == f"https://crm.example.com/activities/{a.id}" for a in acts)
    assert env.messages(DONE) == {} and env.messages(OPEN) == {}
    assert len(env.messages(ARCHIVE)) == 3
    assert len(env.messages("INBOX")) == 1


def test_second_sync_imports_nothing(env):
    env.append(DONE, make_mail(1), make_mail(2))
    assert env.cli_json("sync")[1]["accounts"]["alice"]["mail"]["imported"] == 2
    code, out = env.cli_json("sync")
    assert code == 0
    assert out["accounts"]["alice"]["mail"] == {"imported": 0, "held": 0, "failed": 0, "activities": []}


def test_import_never_sets_seen(env):
    env.append(DONE, make_mail(1))
    env.cli("sync")
    (archived,) = env.messages(ARCHIVE).values()
    assert b"\\Seen" not in archived["flags"]


def test_folders_at_any_depth_and_non_ascii_names(env):
    env.create("INBOX/Kunden", "INBOX/Kunden/Nord")
    env.append("INBOX/Kunden/Nord/CRM Rückruf [R]", make_mail(1))
    env.append("INBOX/CRM Ärger mit Ölpreisen [O]", make_mail(2))

    result = env.cli("folders")
    assert result.exit_code == 0
    assert "INBOX/Kunden/Nord/CRM Rückruf [R]" in result.stdout
    assert "INBOX/CRM Ärger mit Ölpreisen [O]" in result.stdout

    env.cli("sync")
    with env.engine() as engine:
        statuses = sorted(a.status for a in engine.crm.list_activities(ActivityFilter()))
    assert statuses == ["O", "R"]


def test_unknown_status_key_is_an_error_for_that_folder_only(env):
    env.append("INBOX/CRM Irgendwas [Z]", make_mail(1))
    env.append(DONE, make_mail(2))

    result = env.cli("sync")

    assert result.exit_code == 1
    assert "INBOX/CRM Irgendwas [Z]" in result.stderr and "[Z]" in result.stderr
    assert "imported 1 mail" in result.stdout
    assert len(env.messages("INBOX/CRM Irgendwas [Z]")) == 1  # nothing lost


def test_sender_resolution_contact_then_partner_domain_then_unassigned(env):
    with env.engine() as engine:
        acme = engine.crm.add_partner("ACME", ["info@acme.example"])
        erika = engine.crm.add_contact("Erika", "Erika@ACME.example", acme.id)
    env.append(DONE, make_mail(1, sender="Erika <erika@acme.example>"),
               make_mail(2, sender="buchhaltung@acme.example"), make_mail(3, sender="nobody@else.example"))
    env.cli("sync")
    with env.engine() as engine:
        acts = {a.subject: a for a in engine.crm.list_activities(ActivityFilter())}
        unassigned = [a.subject for a in engine.crm.list_activities(ActivityFilter(unassigned=True))]
    assert (acts["Test mail 1"].contact_id, acts["Test mail 1"].partner_id) == (erika.id, acme.id)
    assert (acts["Test mail 2"].contact_id, acts["Test mail 2"].partner_id) == (None, acme.id)
    assert (acts["Test mail 3"].contact_id, acts["Test mail 3"].partner_id) == (None, None)
    assert sorted(unassigned) == ["Test mail 2", "Test mail 3"]


def test_a_batch_asks_the_crm_once_per_sender_and_resolves_each_mail(env):
    """The lookups of a batch are asked once per address and domain (each is a query; a batch's
    mails often share senders), and every mail still gets its own sender's contact or partner."""
    from gwsync.mail.imap import ImapSession
    from gwsync.mail.importer import MailImporter
    from gwsync.storage.state import StateStore

    with env.engine() as engine:
        acme = engine.crm.add_partner("ACME", ["info@acme.example"])
        erika = engine.crm.add_contact("Erika", "erika@acme.example", acme.id)
    env.append(DONE, *[make_mail(n, sender="Erika <erika@acme.example>") for n in (1, 2, 3)],
               *[make_mail(n, sender="office@acme.example") for n in (4, 5)], make_mail(6, sender="x@else.example"))
    config = env.config()
    account = config.account("alice")
    asked: list[str] = []
    with env.engine() as engine:
        crm = engine.crm
        find_contact, find_partner = crm.find_contact_by_email, crm.find_partner_by_domain
        crm.find_contact_by_email = lambda address: asked.append(address) or find_contact(address)  # type: ignore
        crm.find_partner_by_domain = lambda domain: asked.append(domain) or find_partner(domain)  # type: ignore
        state = StateStore(config.state_database)
        session = ImapSession.connect(account.imap, env.password)
        try:
            result = MailImporter(account, config.crm, crm, state).run(session)
        finally:
            session.logout()
            state.close()
        acts = {a.subject: (a.contact_id, a.partner_id) for a in crm.list_activities(ActivityFilter())}
    assert result.imported == 6
    assert sorted(asked) == sorted(["erika@acme.example", "office@acme.example", "acme.example",
                                    "x@else.example", "else.example"])
    assert [acts[f"Test mail {n}"] for n in range(1, 7)] == [(erika.id, acme.id)] * 3 + [(None, acme.id)] * 2 + \
        [(None, None)]


def test_mandatory_partner_holds_mail_in_its_folder(make_env):
    env = make_env(mandatory=("partner",))
    with env.engine() as engine:
        engine.crm.add_partner("ACME", ["info@acme.example"])
    env.append(DONE, make_mail(1, sender="x@acme.example"), make_mail(2, sender="stranger@nowhere.example"))

    code, out = env.cli_json("sync")

    assert code == 0  # held mail is not an error
    assert out["accounts"]["alice"]["mail"]["imported"] == 1
    assert out["accounts"]["alice"]["mail"]["held"] == 1
    left = list(env.messages(DONE).values())
    assert len(left) == 1 and b"stranger@nowhere.example" in left[0]["raw"]
    code, held = env.cli_json("held")
    assert [(h["sender"], h["missing"]) for h in held] == [("stranger@nowhere.example", ["partner"])]

    # The data changes (the domain becomes a partner's): the next sync releases the mail.
    with env.engine() as engine:
        engine.crm.add_partner("Nowhere Ltd", ["info@nowhere.example"])
    code, out = env.cli_json("sync")
    assert out["accounts"]["alice"]["mail"]["imported"] == 1
    assert env.messages(DONE) == {}
    assert env.cli_json("held")[1] == []


def test_real_world_messages_import(env):
    names = sorted(p.name for p in (FIXTURES / "mail").glob("*.eml"))
    env.append(DONE, *(crlf((FIXTURES / "mail" / n).read_bytes()) for n in names))

    code, out = env.cli_json("sync")

    assert code == 0, out
    assert out["accounts"]["alice"]["mail"]["imported"] == len(names)
    code, acts = env.cli_json("activities", "--imported")
    by_subject = {a["subject"]: a for a in acts}
    assert "Malformed headers müssen still import" in by_subject
    assert by_subject["Malformed headers müssen still import"]["sender"] == "broken@example.org"
    assert "Grüße aus Köln" in by_subject["Übersechung für Köln"]["body"]
    assert by_subject["No Message-ID here"]["message_id"] is None
    assert by_subject["HTML only"]["body"].startswith("First paragraph & more.")
    assert "alert" not in by_subject["HTML only"]["body"]
    nested = by_subject["Nested"]
    assert nested["body"] == "Plain body of the nested mail."
    assert sorted(d["filename"] for d in nested["documents"]) == [
        "Forwarded inner mail.eml", "Prüfbericht § 3.txt", "logo.png"]


def test_hostile_attachment_names_stay_inside_the_document_store(env):
    env.append(DONE, crlf((FIXTURES / "mail" / "hostile-names.eml").read_bytes()))
    env.cli("sync")
    code, acts = env.cli_json("activities")
    docs = acts[0]["documents"]
    store = env.dir / "documents"
    assert len(docs) == 7
    for doc in docs:
        name = doc["filename"]
        assert "/" not in name and "\\" not in name and "\x00" not in name and not name.startswith(".")
        assert 0 < len(name.encode()) <= 200
        path = store / doc["sha256"][:2] / doc["sha256"]
        assert path.is_file() and path.resolve().is_relative_to(store.resolve())
    # Nothing was written anywhere else in the test's directory tree.
    written = {p.name for p in env.dir.rglob("*") if p.is_file()}
    assert not ({"x", "passwd", "evil.bat"} & written)
    assert sorted(d["size"] for d in docs) == [3, 4, 4, 7, 8, 9, 11]


def test_documents_are_content_addressed_with_their_hash(env):
    import hashlib

    env.append(DONE, crlf((FIXTURES / "mail" / "nested-multipart.eml").read_bytes()))
    env.cli("sync")
    code, acts = env.cli_json("activities")
    for doc in acts[0]["documents"]:
        data = (env.dir / "documents" / doc["sha256"][:2] / doc["sha256"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == doc["sha256"] and len(data) == doc["size"]
    prufbericht = next(d for d in acts[0]["documents"] if d["filename"].startswith("Pr"))
    assert (env.dir / "documents" / prufbericht["sha256"][:2] / prufbericht["sha256"]).read_bytes() == \
        "Prüfbericht".encode()


def test_mails_sharing_a_message_id_are_different_activities(env):
    same_id = "Message-ID: <dup@example.org>\n"
    env.append(DONE, make_mail(1, extra_headers=same_id).replace(b"Message-ID: <m1@example.org>\r\n", b""),
               make_mail(2, extra_headers=same_id).replace(b"Message-ID: <m2@example.org>\r\n", b""))
    code, out = env.cli_json("sync")
    assert out["accounts"]["alice"]["mail"]["imported"] == 2


def test_mail_back_in_a_new_folder_after_uidvalidity_change_or_lost_state_is_not_imported_twice(env):
    env.append(DONE, make_mail(1), make_mail(2))
    env.cli("sync")
    with env.imap() as client:
        client.delete_folder(DONE)  # the recreated folder gets a new UIDVALIDITY
        client.create_folder(DONE)
        client.select_folder(ARCHIVE)
        client.copy(client.search(["ALL"]), DONE)
    env.lose_state()  # and the state database is lost too

    code, out = env.cli_json("sync")

    assert code == 0
    assert out["accounts"]["alice"]["mail"]["imported"] == 0
    with env.engine() as engine:
        assert len(engine.crm.list_activities(ActivityFilter())) == 2
    assert env.messages(DONE) == {}


def test_dry_run_changes_nothing(env):
    env.append(DONE, make_mail(1))
    result = env.cli("sync", "--dry-run")
    assert result.exit_code == 0 and "would import 1 mail" in result.stdout
    assert len(env.messages(DONE)) == 1
    assert env.cli_json("activities")[1] == []
    assert env.messages(ARCHIVE) == {}


@pytest.mark.sqlite_files
def test_databases_are_private(env):
    env.append(DONE, make_mail(1))
    env.cli("sync")
    for name in ("crm.db", "state.db"):
        mode = stat.S_IMODE(os.stat(env.dir / name).st_mode)
        assert mode == 0o600, (name, oct(mode))
    assert stat.S_IMODE(os.stat(env.dir / "documents").st_mode) == 0o700


def test_activity_show_json_has_the_spec_fields(env):
    env.append(DONE, crlf((FIXTURES / "mail" / "nested-multipart.eml").read_bytes()))
    env.cli("sync")
    code, item = env.cli_json("activity", "show", "1")
    assert code == 0
    for key in ("id", "kind", "status", "subject", "body", "location", "contact_id", "partner_id", "sender",
                "unassigned", "message_id", "start", "end", "due", "link", "documents"):
        assert key in item
    for key in ("filename", "size", "sha256", "category", "keyword"):
        assert key in item["documents"][0]
    assert env.cli("activity", "show", "999").exit_code == 1


def test_imported_today_quick_search(env):
    with env.engine() as engine:
        from gwsync.crm import ActivityDraft

        engine.crm.create_activities([ActivityDraft(key="manual:1", kind="TERMIN", status="O", subject="Not mail")])
    env.append(DONE, make_mail(1))
    env.cli("sync")
    assert [a["subject"] for a in env.cli_json("activities", "--imported", "--today")[1]] == ["Test mail 1"]
    assert len(env.cli_json("activities")[1]) == 2
    assert [a["subject"] for a in env.cli_json("activities", "--kind", "TERMIN")[1]] == ["Not mail"]


def test_servers_without_move_get_copy_deleted_uid_expunge(env):
    """The fallback path, against the real server: COPY, \\Deleted, UID EXPUNGE of just these UIDs."""
    from gwsync.mail.imap import ImapSession
    from gwsync.mail.importer import MailImporter
    from gwsync.storage.state import StateStore

    env.append(DONE, make_mail(1), make_mail(2))
    with env.imap() as client:  # a mail the user marked deleted but did not expunge must survive
        client.select_folder(DONE)
        client.append(DONE, make_mail(3))
        uid3 = max(client.search(["ALL"]))
        client.add_flags([uid3], [b"\\Deleted"])
    config = env.config()
    account = config.account("alice")
    with env.engine() as engine:
        session = ImapSession.connect(account.imap, env.password)
        session.capabilities.discard("MOVE")
        try:
            result = MailImporter(account, config.crm, engine.crm, StateStore(config.state_database)).run(session)
        finally:
            session.logout()
    assert result.imported == 2
    assert len(env.messages(ARCHIVE)) == 2
    left = list(env.messages(DONE).values())
    assert len(left) == 1 and b"X-Seq: 3" in left[0]["raw"]


def test_dovecot_gets_uid_move(env):
    from gwsync.mail.imap import ImapSession

    session = ImapSession.connect(env.config().account("alice").imap, env.password)
    try:
        assert {"MOVE", "UIDPLUS"} <= session.capabilities
    finally:
        session.logout()


# -- large (streamed) and small mail read the same --------------------------------------------

def _blob(size: int) -> bytes:
    out, seed = bytearray(), b"seed"
    while len(out) < size:
        seed = hashlib.sha256(seed).digest()
        out += seed
    return bytes(out[:size])


def test_a_large_mail_with_malformed_base64_imports_the_bytes_a_small_mail_gets(env):
    blob = _blob(STREAM_THRESHOLD + 123_457)
    # A stray padded line before the data, and padding in mid-stream (pieces encoded one by one).
    pieces = [blob[:3_000_001], blob[3_000_001:6_000_000], blob[6_000_000:]]
    text = b"".join(base64.b64encode(p) for p in pieces)
    body = b"A===\n" + b"\n".join(text[i:i + 76] for i in range(0, len(text), 76)) + b"\n"
    raw = crlf(b"From: Big <big@example.org>\nSubject: Broken base64\nMessage-ID: <big@x>\nMIME-Version: 1.0\n"
               b"Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: text/plain; charset=utf-8\n\n"
               b"See attached.\n--b\nContent-Type: application/pdf\nContent-Transfer-Encoding: base64\n"
               b"Content-Disposition: attachment; filename*=utf-8''inv%E2%80%AEfdp.exe\n\n" + body + b"--b--\n")
    assert len(raw) > STREAM_THRESHOLD and b"=" in text.rstrip(b"=")  # padding in mid-stream
    env.append(DONE, raw)

    code, out = env.cli_json("sync")

    assert code == 0, out
    assert out["accounts"]["alice"]["mail"]["imported"] == 1
    (act,) = env.cli_json("activities")[1]
    (doc,) = act["documents"]
    stored = (env.dir / "documents" / doc["sha256"][:2] / doc["sha256"]).read_bytes()
    assert stored == blob and doc["size"] == len(blob)
    assert doc["filename"] == "invfdp.exe"
    # The same mail as the server hands it out, read by the small-mail path: the same result.
    (archived,) = env.messages(ARCHIVE).values()
    small = parse_message(archived["raw"])
    assert [(a.filename, a.data) for a in small.attachments] == [(doc["filename"], stored)]
    assert small.body == act["body"] == "See attached."


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(mail=mimegen.mails(max_size=20_000, whole_messages=True))
def test_streamed_and_whole_mail_read_the_same_from_dovecot(env, mail):
    """Random MIME, as Dovecot stores and serves it: part by part (BODYSTRUCTURE, partial fetches)
    and whole, the two paths give the same body, HTML and attachments."""
    raw = b"X-Seq: %d\r\n" % next(_seq) + mail.raw
    env.append(DONE, raw)
    session = ImapSession.connect(env.config().account("alice").imap, env.password)
    try:
        session.select(DONE)
        uid = max(session.uids())
        whole = parse_message(session.fetch_raw([uid])[uid])
        streamed = _StreamedMail(session, uid, crm=None, dry_run=True).parse()
    finally:
        session.logout()
    assert (streamed.subject, streamed.body, streamed.body_html) == (whole.subject, whole.body, whole.body_html)
    assert [(d.filename, d.content_type, d.sha256, d.size) for d in streamed.attachments] == [
        (a.filename, a.content_type, hashlib.sha256(a.data).hexdigest(), len(a.data)) for a in whole.attachments]


# -- recipients: outgoing mail, To and Cc ------------------------------------------------------------

def own_addresses(env, *addresses: str) -> None:
    """[accounts.alice] addresses: the test users' IMAP names are no addresses."""
    text = env.config_path.read_text()
    env.config_path.write_text(text.replace("[accounts.alice]\n", f"[accounts.alice]\naddresses = {list(addresses)!r}\n"
                                            .replace("'", '"'), 1))


def sent_mail(n: int, to: str, cc: str = "", sender: str = "Alice Example <Alice@Firma.example>") -> bytes:
    return crlf((f"From: {sender}\nTo: {to}\n" + (f"Cc: {cc}\n" if cc else "") +
                 f"Subject: Sent {n}\nMessage-ID: <s{n}@firma.example>\n\nBody of sent mail {n}.\n").encode())


def test_mail_sent_by_the_employee_is_outgoing_and_resolved_by_its_recipients(env):
    own_addresses(env, "alice@firma.example")
    with env.engine() as engine:
        acme = engine.crm.add_partner("ACME", ["info@acme.example"])
        erika = engine.crm.add_contact("Erika Mustermann", "erika@acme.example", acme.id)
    env.append(DONE,
               sent_mail(1, to="=?utf-8?q?Gr=C3=BC=C3=9Fe?= <stranger@nowhere.example>, Erika <Erika@ACME.example>",
                         cc="bob@firma.example"),
               sent_mail(2, to="einkauf@acme.example"),
               sent_mail(3, to="stranger@nowhere.example"),
               make_mail(4, sender="=?utf-8?q?Mustermann=2C_Erika?= <erika@acme.example>",
                         extra_headers="Cc: bob@firma.example, Buchhaltung <buha@acme.example>\n"))

    code, out = env.cli_json("sync")

    assert code == 0, out
    with env.engine() as engine:
        acts = {a.subject: a for a in engine.crm.list_activities(ActivityFilter())}
    to_erika, to_acme, to_stranger, from_erika = (acts[s] for s in ("Sent 1", "Sent 2", "Sent 3", "Test mail 4"))
    assert (to_erika.kind, to_erika.contact_id, to_erika.partner_id, to_erika.unassigned) == (
        "MAILAUS", erika.id, acme.id, False)
    assert (to_erika.sender, to_erika.sender_name) == ("alice@firma.example", "Alice Example")
    assert (to_erika.recipients_to, to_erika.recipients_cc) == (
        ["stranger@nowhere.example", "erika@acme.example"], ["bob@firma.example"])
    assert (to_acme.kind, to_acme.contact_id, to_acme.partner_id) == ("MAILAUS", None, acme.id)
    assert (to_stranger.kind, to_stranger.contact_id, to_stranger.partner_id, to_stranger.unassigned) == (
        "MAILAUS", None, None, True)
    assert (from_erika.kind, from_erika.contact_id, from_erika.sender_name) == (
        "MAILEIN", erika.id, "Mustermann, Erika")
    assert (from_erika.recipients_to, from_erika.recipients_cc) == (
        ["alice@example.com"], ["bob@firma.example", "buha@acme.example"])
    assert all(a.imported_at for a in acts.values())

    code, shown = env.cli_json("activity", "show", str(to_erika.id))
    assert code == 0
    assert (shown["sender_name"], shown["recipients_to"], shown["recipients_cc"]) == (
        "Alice Example", ["stranger@nowhere.example", "erika@acme.example"], ["bob@firma.example"])
    text = env.cli("activity", "show", str(to_erika.id)).stdout
    assert "from: Alice Example <alice@firma.example>" in text
    assert "to: stranger@nowhere.example, erika@acme.example" in text and "cc: bob@firma.example" in text


def test_an_outgoing_mail_to_an_unknown_recipient_is_assigned_by_that_recipient(env):
    own_addresses(env, "vertrieb@firma.example", "alice@firma.example")
    env.append(DONE, sent_mail(1, to="Neu <neu@kunde.example>", sender="vertrieb@firma.example"),
               make_mail(2, sender="neu@kunde.example"))
    assert env.cli_json("sync")[0] == 0

    code, rows = env.cli_json("unknown")
    assert code == 0 and [(r["email"], r["imported"]) for r in rows] == [("neu@kunde.example", 2)]
    result = env.cli("assign", "neu@kunde.example", "--new-contact", "Neu Kunde")
    assert result.exit_code == 0, result.stderr
    with env.engine() as engine:
        acts = engine.crm.list_activities(ActivityFilter())
    assert sorted((a.kind, a.unassigned, a.contact_id is not None) for a in acts) == [
        ("MAILAUS", False, True), ("MAILEIN", False, True)]


def test_outgoing_mail_held_for_a_contact_is_released_by_assigning_its_recipient(make_env):
    env = make_env(mandatory=("contact",))
    own_addresses(env, "alice@firma.example")
    env.append(DONE, sent_mail(1, to="neu@kunde.example", cc="bob@firma.example"))
    env.cli_json("sync")
    assert len(env.messages(DONE)) == 1  # held: no contact yet

    code, rows = env.cli_json("unknown")
    assert [(r["email"], r["held"]) for r in rows] == [("neu@kunde.example", 1)]
    code, assigned = env.cli_json("assign", "neu@kunde.example", "--new-contact", "Neu Kunde")
    assert assigned["held_to_release"] == 1
    code, out = env.cli_json("sync")
    assert out["accounts"]["alice"]["mail"]["imported"] == 1
    with env.engine() as engine:
        (act,) = engine.crm.list_activities(ActivityFilter())
    assert (act.kind, act.contact_id, act.unassigned) == ("MAILAUS", assigned["contact_id"], False)

"""Data safety of the mail import against a real Dovecot: crashes, bad mail, huge mail."""

from __future__ import annotations

import base64
import hashlib
import random
import re
import signal
import time

from conftest import crlf, make_mail
from gwsync.crm import ActivityFilter
from gwsync.crm.embedded import EmbeddedCRM
from gwsync.demo.localservers import Dovecot
from gwsync.engine import Engine
from gwsync.mail.imap import ImapSession
from gwsync.mail.importer import STREAM_THRESHOLD, MailImporter
from gwsync.storage.state import StateStore

DONE = "INBOX/CRM Erledigt [E]"
ARCHIVE = "INBOX/CRM Archiv"


def _seq_numbers(raws) -> list[int]:
    return sorted(int(re.search(rb"X-Seq: (\d+)", raw).group(1)) for raw in raws)


def _activity_count(env) -> int:
    """Activities committed so far, read beside the running sync (the CRM database is in WAL mode)."""
    import sqlite3

    if env.database_url is not None:
        import psycopg

        with psycopg.connect(env.database_url) as conn:
            if conn.execute("SELECT to_regclass('activities')").fetchone()[0] is None:
                return 0  # not made yet
            return int(conn.execute("SELECT count(*) FROM activities").fetchone()[0])
    path = env.dir / "crm.db"
    if not path.exists():
        return 0
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)
        try:
            return int(conn.execute("SELECT count(*) FROM activities").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error:  # not created yet, or being upgraded: nothing committed that counts
        return 0


def test_sigkill_at_random_moments_loses_and_duplicates_nothing(env):
    total = 600
    # Some attachments make parts of the run slower, so kills land in different steps.
    mails = [make_mail(n) if n % 10 else _with_attachment(n) for n in range(total)]
    env.append(DONE, *mails)
    rng = random.Random(20261126)
    partial_kills = 0
    for _attempt in range(15):
        done_before = _activity_count(env)
        proc = env.subprocess("-q", "sync")
        # Kill once the run has committed a random number of further activities, a random moment
        # later: a kill at a fixed time could land after a fast machine finished the whole run.
        target = done_before + rng.randint(1, 150)
        deadline = time.monotonic() + 30
        while proc.poll() is None and _activity_count(env) < target and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.3))
        killed = proc.poll() is None
        if killed:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        with env.engine() as engine:
            subjects = [a.subject for a in engine.crm.list_activities(ActivityFilter(imported=True))]
        archived = _seq_numbers(m["raw"] for m in env.messages(ARCHIVE).values())
        left = _seq_numbers(m["raw"] for m in env.messages(DONE).values())
        # After every kill: no duplicate activity, every mail still somewhere, and every archived
        # mail already has its activity (the CRM commit comes before the move). A mail may sit in
        # both folders for a moment: Dovecot's MOVE is not atomic when the client dies inside it.
        assert len(subjects) == len(set(subjects))
        assert set(archived + left) == set(range(total))
        assert {f"Test mail {n}" for n in archived} <= set(subjects)
        if killed and 0 < len(subjects) < total:
            partial_kills += 1
        if proc.returncode == 0:
            break
    assert partial_kills >= 2, "too few kills landed mid-import; the test proved little"
    final = env.subprocess("-q", "sync")
    final.wait(timeout=120)
    assert final.returncode == 0, final.stderr.read()

    with env.engine() as engine:
        activities = engine.crm.list_activities(ActivityFilter(imported=True))
    assert sorted(int(a.subject.split()[-1]) for a in activities) == list(range(total))  # each exactly once
    assert _seq_numbers(m["raw"] for m in env.messages(ARCHIVE).values()) == list(range(total))
    assert env.messages(DONE) == {}


class _Crash(BaseException):
    """Stands for the process dying at that instruction."""


def _crashing(cls, method: str):
    """A subclass whose `method` dies once before doing anything: a deterministic crash point."""
    def die(self, *args, **kwargs):
        raise _Crash(method)
    return type(f"Crashing{cls.__name__}", (cls,), {method: die})


def test_crash_between_crm_commit_and_state_or_move_creates_no_duplicate(env):
    env.append(DONE, *(make_mail(n) for n in range(5)))
    config = env.config()
    account = config.account("alice")
    for crash_class, method in ((StateStore, "save"), (ImapSession, "move")):
        state_cls = _crashing(StateStore, method) if crash_class is StateStore else StateStore
        with Engine(config) as engine:
            client = ImapSession.connect(account.imap, env.password).client
            session = (_crashing(ImapSession, method) if crash_class is ImapSession else ImapSession)(client)
            importer = MailImporter(account, config.crm, engine.crm, state_cls(config.state_database))
            try:
                importer.run(session)
            except _Crash:
                pass
            else:
                raise AssertionError("the crash point was not reached")
            finally:
                session.logout()
        with env.engine() as engine:
            assert len(engine.crm.list_activities(ActivityFilter())) == 5  # committed before the crash
        assert len(env.messages(DONE)) == 5  # but not moved yet
    code, out = env.cli_json("sync")
    assert code == 0 and out["accounts"]["alice"]["mail"]["imported"] == 0
    with env.engine() as engine:
        assert len(engine.crm.list_activities(ActivityFilter())) == 5
    assert env.messages(DONE) == {} and len(env.messages(ARCHIVE)) == 5


def _with_attachment(n: int) -> bytes:
    payload = base64.encodebytes(bytes(range(256)) * 2000).decode()
    return crlf((f"From: someone@example.org\nSubject: Test mail {n}\nX-Seq: {n}\nMIME-Version: 1.0\n"
                 f"Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: text/plain\n\nbody {n}\n"
                 f"--b\nContent-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n"
                 f"Content-Disposition: attachment; filename=data{n}.bin\n\n{payload}--b--\n").encode())


class FlakyCRM(EmbeddedCRM):
    """The embedded store, failing to store documents of mail whose attachment is named poison.bin:
    a stand-in for any per-item failure (disk error, CRM rejecting the record)."""

    def put_document(self, chunks):
        data = b"".join(chunks)
        if data == b"POISON":
            raise OSError("document store refused the file")
        return super().put_document(iter([data]))


def _poisoned(n: int) -> bytes:
    return crlf((f"From: p@example.org\nSubject: Poisoned {n}\nMIME-Version: 1.0\n"
                 "Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: text/plain\n\nx\n"
                 "--b\nContent-Type: application/octet-stream\nContent-Disposition: attachment; filename=poison.bin\n\n"
                 "POISON\n--b--\n").encode()).replace(b"POISON\r\n--b--", b"POISON\r\n--b--")


def test_a_failing_mail_is_retried_a_bounded_number_of_times_and_never_blocks_the_others(env):
    env.append(DONE, make_mail(1), _poisoned(2), make_mail(3))
    config = env.config()
    results = []
    for run in range(4):
        crm = FlakyCRM(config.crm.database, config.crm.documents, config.crm.statuses, config.crm.link)
        with Engine(config, crm=crm) as engine:
            report = engine.sync()
        results.append(report.accounts["alice"])
        if run == 0:
            env.append(DONE, make_mail(4 + run))  # new mail keeps arriving meanwhile

    first, second, third, fourth = results
    assert (first.mail.imported, first.mail.failed) == (2, 1)
    assert (second.mail.imported, second.mail.failed) == (1, 1)
    assert third.mail.failed == 1 and "quarantined after 3 failed attempts" in third.error
    assert "document store refused the file" in third.error
    assert fourth.mail.failed == 0 and fourth.mail.quarantined == 1  # no fourth attempt
    remaining = list(env.messages(DONE).values())
    assert len(remaining) == 1 and b"Poisoned 2" in remaining[0]["raw"]  # kept, not lost
    code, held = env.cli_json("held")
    assert [(h["outcome"], h["attempts"]) for h in held] == [("quarantined", 3)]


def test_a_mail_larger_than_the_stream_threshold_is_streamed_part_by_part(env):
    blob = hashlib.sha256(b"seed").digest() * ((STREAM_THRESHOLD + (1 << 20)) // 32)
    encoded = base64.encodebytes(blob)
    raw = crlf(b"From: Big <big@example.org>\nSubject: =?utf-8?q?Gro=C3=9Fe_Datei?=\nMessage-ID: <big@x>\n"
               b"MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=b\n\n--b\n"
               b"Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: quoted-printable\n\n"
               b"Anbei die gro=C3=9Fe Datei.\n--b\nContent-Type: text/html; charset=utf-8\n\n"
               b"<p>Anbei die <b>gro\xc3\x9fe</b> Datei.</p>\n--b\nContent-Type: application/zip\n"
               b"Content-Transfer-Encoding: base64\n"
               b"Content-Disposition: attachment; filename=\"../big.zip\"\n\n" + encoded + b"--b--\n")
    assert len(raw) > STREAM_THRESHOLD
    env.append(DONE, raw, make_mail(1))

    code, out = env.cli_json("sync")

    assert code == 0 and out["accounts"]["alice"]["mail"]["imported"] == 2
    acts = {a["subject"]: a for a in env.cli_json("activities")[1]}
    big = acts["Große Datei"]
    assert big["sender"] == "big@example.org" and big["body"] == "Anbei die große Datei."
    assert big["body_html"] == "<p>Anbei die <b>große</b> Datei.</p>"
    (doc,) = big["documents"]
    assert doc["filename"] == "big.zip" and doc["size"] == len(blob)
    assert doc["sha256"] == hashlib.sha256(blob).hexdigest()
    stored = env.dir / "documents" / doc["sha256"][:2] / doc["sha256"]
    assert stored.read_bytes() == blob
    # Streamed and whole-fetched mails share one identity rule: no re-import after a lost state.
    env.lose_state()
    with env.imap() as client:
        client.select_folder(ARCHIVE)
        client.copy(client.search(["ALL"]), DONE)
    assert env.cli_json("sync")[1]["accounts"]["alice"]["mail"]["imported"] == 0


def test_the_importer_can_be_driven_as_a_library_with_a_session(env):
    env.append(DONE, make_mail(1))
    config = env.config()
    account = config.account("alice")
    with Engine(config) as engine:
        session = ImapSession.connect(account.imap, env.password)
        try:
            result = MailImporter(account, config.crm, engine.crm, StateStore(config.state_database)).run(session)
        finally:
            session.logout()
    assert result.imported == 1 and result.activities[0].link.startswith("https://crm.example.com/activities/")


def _wait_for_first_activities(env, timeout: float = 30) -> None:
    """Until the running import has committed its first batch to the CRM."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.05)
        if env.crm_exists():
            with env.engine() as engine:
                if engine.crm.get_activity(1) is not None:
                    return
    raise AssertionError("the import committed nothing within the time limit")


def test_ctrl_c_in_the_middle_is_one_line_and_the_next_run_finishes(env):
    env.append(DONE, *(make_mail(n) for n in range(4000)))
    proc = env.subprocess("sync")
    _wait_for_first_activities(env)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert err.decode().strip().splitlines() == [
        "gwsync: interrupted; nothing is lost, run the command again to finish"]
    with env.engine() as engine:
        assert 0 < len(engine.crm.list_activities(ActivityFilter())) < 4000  # it really stopped mid-import
    code, result = env.cli_json("sync")
    assert code == 0
    with env.engine() as engine:
        subjects = [a.subject for a in engine.crm.list_activities(ActivityFilter())]
    assert sorted(subjects) == sorted(f"Test mail {n}" for n in range(4000))
    assert env.messages(DONE) == {}


def test_server_restart_mid_import_is_reported_and_recovered(make_env):
    server = Dovecot.start()
    try:
        env = make_env()
        env.dovecot = server
        env.config_path.write_text(re.sub(r"port = \d+", f"port = {server.port}", env.config_path.read_text()))
        env.append(DONE, *(make_mail(n) for n in range(3000)))
        proc = env.subprocess("sync")
        _wait_for_first_activities(env)
        old_port = server.port
        server.restart()  # the connection drops mid-import
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 1
        lines = err.decode().strip().splitlines()
        # the drop, then two retries that find the server gone from its old port: one line
        assert len(lines) == 1 and ("connection lost" in lines[0] or "cannot connect" in lines[0])
        assert "Traceback" not in err.decode()
        env.config_path.write_text(env.config_path.read_text().replace(f"port = {old_port}", f"port = {server.port}"))
        code, result = env.cli_json("sync")
        assert code == 0, result
        with env.engine() as engine:
            subjects = [a.subject for a in engine.crm.list_activities(ActivityFilter())]
        assert sorted(subjects) == sorted(f"Test mail {n}" for n in range(3000))
        assert env.messages(DONE) == {} and len(env.messages(ARCHIVE)) == 3000
    finally:
        server.stop()

"""Faults of the environment against a real Dovecot: mail that another client expunges during a
sync, a full or read-only disk, corrupt, misplaced and locked databases, a connection lost
mid-import.

Such faults are the environment's, not a mail's: one line naming the file and what to do, exit 1
(2 for a path that can never be a database), no mail counted as failed, and every mail still
where it was, so that the run after the fix imports it.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import crlf, make_mail
from gwsync.crm import ActivityFilter
from gwsync.crm.embedded import EmbeddedCRM
from gwsync.engine import Engine
from gwsync.mail.importer import STREAM_THRESHOLD
from gwsync.storage import sqlite as dbfiles

DONE = "INBOX/CRM Erledigt [E]"
ARCHIVE = "INBOX/CRM Archiv"


# -- helpers ---------------------------------------------------------------------------------

@contextmanager
def tmpfs(path: Path, size: str):
    """A small tmpfs at `path`; where mounting is not allowed the test is skipped, saying why (in CI it fails)."""
    path.mkdir(exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        why = (f"this machine does not let the tests mount a tmpfs ({done.stderr.strip() or 'mount failed'}); "
               "the full-disk and read-only faults need one")
        if os.environ.get("CI"):  # CI runs as root and must run every fault test: never a silent pass
            pytest.fail(why)
        pytest.skip(why)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)


def fill(directory: Path) -> Path:
    """Fill the file system of `directory` up to the last byte."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def expunge_unnoticed(env, folder: str, *subjects: str) -> None:
    """Delete mails the way another program does while gwsync works, before Dovecot notices:
    Dovecot still lists them and answers FETCH with `BODY[] NIL`, as for a mail that another
    client expunged during the command. (Dovecot rescans a maildir only when its mtime changed.)"""
    box = env.dovecot.directory / "mail" / env.user / folder
    old = time.time() - 3600
    with env.imap() as client:
        client.select_folder(folder)  # new mail moves from new/ to cur/
        client.noop()
        for sub in ("cur", "new"):
            os.utime(box / sub, (old, old))
        client.select_folder(folder, readonly=True)  # Dovecot rescans once and records the old mtime
        client.noop()
    pattern = re.compile(b"^Subject: (" + b"|".join(re.escape(s.encode()) for s in subjects) + b")\r?$", re.M)
    gone = [f for sub in ("cur", "new") for f in (box / sub).iterdir() if pattern.search(f.read_bytes())]
    assert len(gone) == len(subjects)
    for f in gone:
        f.unlink()
    for sub in ("cur", "new"):
        os.utime(box / sub, (old, old))


def run(env, *args: str) -> tuple[int, str, str]:
    """gwsync as a user runs it: a process of its own, its real stdout and stderr."""
    proc = env.subprocess(*args)
    out, err = proc.communicate(timeout=180)
    return proc.returncode, out.decode(), err.decode()


def assert_one_line(err: str, *words: str) -> str:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("gwsync: ")
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def subjects_in(env, folder: str) -> list[str]:
    return sorted(re.search(rb"Subject: (.*)\r\n", m["raw"]).group(1).decode()
                  for m in env.messages(folder).values())


def activity_subjects(env) -> list[str]:
    with env.engine() as engine:
        return sorted(a.subject for a in engine.crm.list_activities(ActivityFilter()))


def with_attachment(n: int, size: int) -> bytes:
    """A mail with an incompressible attachment of about `size` bytes, unique to n."""
    payload = random.Random(n).randbytes(size)
    import base64
    encoded = base64.encodebytes(payload).decode()
    return crlf((f"From: someone@example.org\nSubject: Test mail {n}\nMessage-ID: <a{n}@example.org>\n"
                 "MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: text/plain\n\n"
                 f"body {n}\n--b\nContent-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n"
                 f"Content-Disposition: attachment; filename=data{n}.bin\n\n{encoded}--b--\n").encode())


def move_databases(env, directory: Path) -> tuple[Path, Path]:
    """Point [crm] database and [state] database (and so the document store) into `directory`."""
    crm, state = directory / "crm.db", directory / "state.db"
    text = env.config_path.read_text()
    text = text.replace(f'"{env.dir}/crm.db"', f'"{crm}"').replace(f'"{env.dir}/state.db"', f'"{state}"')
    env.config_path.write_text(text)
    return crm, state


# -- the translation at the stores' edge (no servers) -----------------------------------------

def test_only_faults_of_the_environment_become_store_errors(tmp_path):
    import sqlite3
    import ssl

    from gwsync.errors import StoreError, database_fault, file_fault

    where = tmp_path / "crm.db"
    assert "disk full" in str(file_fault(OSError(errno.ENOSPC, "No space left on device"), where, "CRM database"))
    assert "read-only" in str(file_fault(OSError(errno.EROFS, "Read-only file system"), where, "CRM database"))
    # A dropped connection or a TLS error is an OSError too, but not the disk's.
    for exc in (ConnectionResetError(errno.ECONNRESET, "reset"), ssl.SSLError(1, "bad record"), TimeoutError()):
        assert file_fault(exc, where, "CRM database") is None
    conn = dbfiles.open_private_db(where, "CRM database")
    conn.execute("CREATE TABLE t (k TEXT UNIQUE)")
    conn.execute("INSERT INTO t VALUES ('a')")
    with pytest.raises(sqlite3.IntegrityError):  # a bug, not the environment: it stays as it is
        conn.execute("INSERT INTO t VALUES ('a')")
    with pytest.raises(sqlite3.OperationalError):
        conn.execute("SELECT nothing FROM nowhere")
    assert database_fault(sqlite3.OperationalError("cannot commit transaction - SQL statements in progress"),
                          where, "CRM database") is None
    conn.close()
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"not a database at all\n" * 100)
    with pytest.raises(StoreError, match=r"notes\.txt is not an SQLite database"):
        dbfiles.open_private_db(notes, "CRM database")


def test_a_dropped_connection_while_storing_a_document_is_not_a_disk_fault(tmp_path):
    from gwsync.crm.embedded import DocumentStore

    store = DocumentStore(tmp_path / "documents")

    def chunks():
        yield b"first part"
        raise ConnectionResetError(errno.ECONNRESET, "connection reset by peer")

    with pytest.raises(ConnectionResetError):
        store.put(chunks())
    assert [p.name for p in (tmp_path / "documents").iterdir()] == []  # no half-written file left
    assert store.put(iter([b"whole"]))[1] == 5


# -- finding 3: mail expunged by another client during the sync -------------------------------

@pytest.mark.parametrize("vanishing", ["Test mail 2", "Test mail 100"], ids=["fetched whole", "streamed"])
def test_mail_expunged_by_another_client_during_the_sync_is_skipped(env, vanishing):
    big = with_attachment(100, STREAM_THRESHOLD + (1 << 20))  # "Test mail 100", streamed part by part
    env.append(DONE, make_mail(1), make_mail(2), big)
    expunge_unnoticed(env, DONE, vanishing)

    code, out, err = run(env, "sync", "--json")

    assert code == 0 and err == "", err
    report = json.loads(out)["accounts"]["alice"]
    assert (report["mail"]["imported"], report["mail"]["held"], report["mail"]["failed"]) == (2, 0, 0)
    assert report["error"] is None
    assert activity_subjects(env) == sorted({"Test mail 1", "Test mail 2", "Test mail 100"} - {vanishing})
    assert env.cli_json("held")[1] == []  # nothing counted against the vanished mail
    assert env.cli_json("sync")[0] == 0


def test_an_archived_copy_expunged_during_the_sync_does_not_stop_the_recovery(env):
    env.append(DONE, make_mail(1), make_mail(2))
    assert env.cli("sync").exit_code == 0
    with env.imap() as client:  # the user puts the archived mails back, and the state is lost
        client.select_folder(ARCHIVE)
        client.copy(client.search(["ALL"]), DONE)
    env.lose_state()
    expunge_unnoticed(env, ARCHIVE, "Test mail 1")

    code, out, err = run(env, "sync", "--json")

    assert code == 0 and err == "", err
    assert json.loads(out)["accounts"]["alice"]["mail"]["imported"] == 0
    assert activity_subjects(env) == ["Test mail 1", "Test mail 2"]  # no second activity
    assert env.messages(DONE) == {}
    assert "Test mail 1" in subjects_in(env, ARCHIVE)


# -- finding 4: a full document store ---------------------------------------------------------

def add_account(env, name: str) -> None:
    """A second account on the same mailbox and the same databases."""
    env.config_path.write_text(env.config_path.read_text() + f"""
[accounts.{name}]
areas = ["mail"]

[accounts.{name}.imap]
host = "127.0.0.1"
port = {env.dovecot.port}
security = "none"
username = "{env.user}"
password_env = "GWSYNC_TEST_PW_{env.user.upper()}"
""")


def test_a_full_document_store_stops_the_run_counts_against_no_mail_and_imports_after_freeing(env):
    docs = env.dir / "docs"
    env.config_path.write_text(env.config_path.read_text().replace("[crm.statuses]",
                                                                   f'documents = "{docs}"\n\n[crm.statuses]'))
    add_account(env, "bob")
    with tmpfs(docs, "1m"):
        env.append(DONE, *(with_attachment(n, 400_000) for n in range(1, 5)))  # 1.6 MB of attachments
        for _ in range(4):  # more runs than max_attempts (3)
            code, out, err = run(env, "sync")
            assert code == 1
            assert_one_line(err, "disk full", str(docs), "free space")
        code, out, err = run(env, "sync", "--json")
        report = json.loads(out)
        assert code == 1 and "disk full" in report["stopped"] and str(docs) in report["stopped"]
        assert report["accounts"]["alice"]["mail"]["failed"] == 0
        assert "bob" not in report["accounts"]  # same store: the run stopped for every account
        assert subjects_in(env, DONE) == [f"Test mail {n}" for n in range(1, 5)]  # all still there
        assert env.cli_json("held")[1] == []  # counted against no mail, quarantined none
        assert env.cli_json("status")[1]["accounts"]["alice"]["failed"] == 0
        remount(docs, "size=16m")  # space freed
        code, out, err = run(env, "sync", "--json")
        assert code == 0, err
        assert json.loads(out)["accounts"]["alice"]["mail"]["imported"] == 4
    assert env.messages(DONE) == {}
    assert activity_subjects(env) == [f"Test mail {n}" for n in range(1, 5)]


# -- finding 4: quarantined mail and `gwsync retry` -------------------------------------------

class RefusingCRM(EmbeddedCRM):
    """Refuses documents of mail whose attachment reads POISON: a fault of that one mail that
    the user fixes in the CRM (a stand-in for a CRM rejecting a record)."""

    def put_document(self, chunks):
        data = b"".join(chunks)
        if data == b"POISON":
            raise ValueError("the CRM refused the document")
        return super().put_document(iter([data]))


def _poisoned(n: int) -> bytes:
    return crlf((f"From: p@example.org\nSubject: Poisoned {n}\nMIME-Version: 1.0\n"
                 "Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: text/plain\n\nx\n"
                 "--b\nContent-Type: application/octet-stream\nContent-Disposition: attachment; filename=p.bin\n\n"
                 "POISON\n--b--\n").encode())


def _quarantine(env, *mails: bytes) -> None:
    env.append(DONE, *mails)
    config = env.config()
    for _ in range(config.crm.max_attempts):
        crm = RefusingCRM(config.crm.database, config.crm.documents, config.crm.statuses, config.crm.link)
        with Engine(config, crm=crm) as engine:
            engine.sync()


def test_held_tells_what_releases_quarantined_mail_and_retry_releases_it(env):
    _quarantine(env, _poisoned(1), _poisoned(2))
    code, held = env.cli_json("held")
    assert [(h["outcome"], h["attempts"]) for h in held] == [("quarantined", 3)] * 2
    first, second = held[0], held[1]["id"]
    assert re.fullmatch(r"[0-9a-f]{12}", first["id"])
    assert first["released_by"] == f"fixing the cause, then `gwsync retry {first['id']}`"
    text = env.cli("held").stdout
    assert first["id"] in text and f"gwsync retry {first['id']}" in text and "gwsync sync" not in text

    result = env.cli("retry", "0123456789ab")
    assert result.exit_code == 1 and "0123456789ab" in result.stderr and "gwsync held" in result.stderr
    result = env.cli("retry", first["id"])
    assert result.exit_code == 0 and first["id"] in result.stdout
    code, held = env.cli_json("held")
    assert sorted((h["outcome"], h["attempts"]) for h in held) == [("failed", 0), ("quarantined", 3)]

    code, out = env.cli_json("sync")  # the cause is fixed: the CRM takes the document now
    assert code == 0 and out["accounts"]["alice"]["mail"]["imported"] == 1
    assert [(h["id"], h["outcome"]) for h in env.cli_json("held")[1]] == [(second, "quarantined")]
    assert env.cli("retry", "--all").exit_code == 0
    code, out = env.cli_json("sync")
    assert code == 0 and out["accounts"]["alice"]["mail"]["imported"] == 1
    assert env.messages(DONE) == {} and env.cli_json("held")[1] == []
    assert activity_subjects(env) == ["Poisoned 1", "Poisoned 2"]


# -- finding 6: database faults ---------------------------------------------------------------

def _synced(env) -> None:
    """Both databases exist with data; one new mail waits in its folder."""
    env.append(DONE, make_mail(1))
    assert env.cli("sync").exit_code == 0
    env.append(DONE, make_mail(2))


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _garbage(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(4096)
        f.write(random.Random(4096).randbytes(path.stat().st_size - 4096))


@pytest.mark.sqlite_files
@pytest.mark.parametrize("which", ["crm", "state"])
@pytest.mark.parametrize("damage", [_truncate, _garbage], ids=["truncated", "garbage at offset 4096"])
def test_a_corrupt_database_is_one_line_naming_it_and_the_mail_stays(env, which, damage):
    _synced(env)
    path = env.dir / f"{which}.db"
    damage(path)
    code, out, err = run(env, "sync")
    assert code == 1
    assert_one_line(err, str(path), "corrupt", "restore it from a backup")
    assert subjects_in(env, DONE) == ["Test mail 2"]
    if which == "state":  # as the line says: moved away, a new state imports the mail once
        path.rename(path.with_suffix(".damaged"))
        assert run(env, "sync")[0] == 0
        assert activity_subjects(env) == ["Test mail 1", "Test mail 2"]


@pytest.mark.sqlite_files
@pytest.mark.parametrize("command, which", [("status", "state"), ("activities", "crm"), ("held", "state")])
def test_status_and_activities_on_a_malformed_database_are_one_line(env, command, which):
    _synced(env)
    path = env.dir / f"{which}.db"
    _garbage(path)
    code, out, err = run(env, command)
    assert code == 1
    assert_one_line(err, str(path), "corrupt")


@pytest.mark.sqlite_files
def test_the_web_view_answers_a_corrupt_database_with_a_page_that_names_it(env):
    from gwsync.web import create_app

    _synced(env)
    _garbage(env.dir / "crm.db")
    client = create_app(env.config(), b"k" * 32).test_client()
    page = client.get("/activities/1")
    assert page.status_code == 500
    assert str(env.dir / "crm.db") in page.get_data(as_text=True) and "corrupt" in page.get_data(as_text=True)


@pytest.mark.sqlite_files
@pytest.mark.parametrize("which", ["crm", "state"])
def test_a_database_path_naming_a_text_file_or_a_directory_is_one_line(env, which):
    env.append(DONE, make_mail(1))
    text_file = env.dir / "notes.txt"
    text_file.write_text("shopping list\n" * 500)
    key = f'"{env.dir}/{which}.db"'
    config = env.config_path.read_text()
    env.config_path.write_text(config.replace(key, f'"{text_file}"'))
    code, out, err = run(env, "sync")
    assert code == 1
    assert_one_line(err, str(text_file), "not an SQLite database")
    assert text_file.read_text() == "shopping list\n" * 500  # untouched

    directory = env.dir / "somedir"
    directory.mkdir()
    env.config_path.write_text(config.replace(key, f'"{directory}"'))
    code, out, err = run(env, "sync")
    assert code == 2  # a config error: the path can never be a database
    assert_one_line(err, str(directory), "is a directory")
    assert subjects_in(env, DONE) == ["Test mail 1"]


@pytest.mark.sqlite_files
def test_read_only_databases_are_one_line_and_the_mail_is_imported_once_writable(env):
    with tmpfs(env.dir / "db", "16m") as directory:
        crm, state = move_databases(env, directory)
        _synced(env)
        remount(directory, "ro")
        code, out, err = run(env, "sync")
        assert code == 1
        line = assert_one_line(err, "read-only")
        assert str(crm) in line or str(state) in line
        assert subjects_in(env, DONE) == ["Test mail 2"]
        remount(directory, "rw")
        code, out, err = run(env, "sync")
        assert code == 0, err
        assert activity_subjects(env) == ["Test mail 1", "Test mail 2"]


@pytest.mark.sqlite_files
def test_a_full_disk_under_the_databases_is_one_line_and_the_mail_is_imported_after_freeing(env):
    with tmpfs(env.dir / "db", "1m") as directory:
        crm, state = move_databases(env, directory)
        _synced(env)
        filler = fill(directory)
        code, out, err = run(env, "sync")
        assert code == 1
        line = assert_one_line(err, "disk full writing the", "free space")
        assert str(crm) in line or str(state) in line
        assert subjects_in(env, DONE) == ["Test mail 2"]
        filler.unlink()
        code, out, err = run(env, "sync")
        assert code == 0, err
        assert env.cli_json("held")[1] == []
        assert activity_subjects(env) == ["Test mail 1", "Test mail 2"]


LOCKER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(40)
"""


@pytest.mark.sqlite_files
@pytest.mark.parametrize("which", ["crm", "state"])
def test_a_database_locked_by_another_program_is_one_line_within_the_timeout(env, which, monkeypatch):
    _synced(env)
    path = env.dir / f"{which}.db"
    monkeypatch.setattr(dbfiles, "LOCK_TIMEOUT", 1.0, raising=False)  # 30 s in real use
    holder = subprocess.Popen([sys.executable, "-c", LOCKER, str(path)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"locked\n"
        started = time.monotonic()
        result = env.cli("sync")
        assert time.monotonic() - started < 20
        assert result.exit_code == 1
        assert_one_line(result.stderr, str(path), "locked by another program")
        assert subjects_in(env, DONE) == ["Test mail 2"]
    finally:
        holder.kill()
        holder.wait()
    assert env.cli("sync").exit_code == 0
    assert activity_subjects(env) == ["Test mail 1", "Test mail 2"]
    assert env.messages(DONE) == {}


# -- finding 9c: a connection lost after some batches were committed ---------------------------

@pytest.mark.parametrize("as_json", [True, False], ids=["json", "text"])
def test_a_connection_lost_mid_import_still_reports_what_was_imported(env, as_json):
    from faultproxy import CuttingProxy

    mails = [make_mail(n) for n in range(3000)]
    env.append(DONE, *mails)
    # Cut once about half of the mail has come through (several batches of 250 are committed
    # by then); the retries then find no server behind the proxy.
    with CuttingProxy(env.dovecot.port, cut_after=sum(map(len, mails)) // 2) as proxy:
        env.config_path.write_text(re.sub(r"port = \d+", f"port = {proxy.port}", env.config_path.read_text()))
        proc = env.subprocess("sync", *(["--json"] if as_json else []))
        out, err = proc.communicate(timeout=120)
    assert proxy.cut.is_set()
    assert proc.returncode == 1
    with env.engine() as engine:
        activities = engine.crm.list_activities(ActivityFilter())
    assert 0 < len(activities) < 3000
    if as_json:
        report = json.loads(out)["accounts"]["alice"]
        assert re.search("connection lost|cannot connect", report["error"]) and err == b""
        assert report["mail"]["imported"] == len(activities)
        assert sorted(a["id"] for a in report["mail"]["activities"]) == sorted(a.id for a in activities)
    else:
        assert re.search("connection lost|cannot connect", assert_one_line(err.decode()))
        assert f"alice: imported {len(activities)} mail(s)" in out.decode()
        assert all(a.link in out.decode() for a in activities)

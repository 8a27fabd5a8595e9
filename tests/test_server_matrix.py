"""The mail flows on every IMAP server of the matrix: Dovecot ("/"), Cyrus with Debian's "."
separator and Cyrus with "/" (unixhierarchysep). Folders, import of nested and umlaut folders,
the archive, no second import, the lock on a wrong password, and rules with delivery through
the server's own LDA (dovecot-lda) or LMTP (Cyrus lmtpd), so that the rules really run.
The configs name no archive folder: its default comes from the server's separator."""

from __future__ import annotations

import re

import pytest
from sievelib.managesieve import Client

from conftest import build_env, make_mail, use_sieve_dovecot
from gwsync.crm import ActivityFilter
from gwsync.demo.localservers import Dovecot

SERVERS = {"dovecot": "sieve_dovecot", "cyrus.": "cyrus", "cyrus/": "cyrus_slash"}


@pytest.fixture(params=list(SERVERS))
def server(request):
    return request.getfixturevalue(SERVERS[request.param])


def separator(server) -> str:
    return getattr(server, "separator", "/")  # the test Dovecot's inbox namespace uses "/"


@pytest.fixture
def menv(server, tmp_path, request):
    """A fresh user on `server`, with a config that leaves the archive folder to its default."""
    env = build_env(server, tmp_path, request)
    text = env.config_path.read_text().replace('archive_folder = "INBOX/CRM Archiv"\n', "")
    env.config_path.write_text(text + f"\n[accounts.alice.sieve]\nport = {server.sieve_port}\n")
    env.sep = separator(server)
    return env


def in_inbox(env, *levels: str) -> str:
    return env.sep.join(["INBOX", *levels])


def test_nested_and_umlaut_folders_are_imported_archived_and_never_imported_again(menv):
    done, nested = in_inbox(menv, "CRM Erledigt [E]"), in_inbox(menv, "Kunden", "CRM Müller & Söhne [O]")
    menv.append(done, make_mail(1))
    # encoded as mail programs send it: Cyrus turns raw 8-bit header bytes into X (munge8bit)
    menv.append(nested, make_mail(2, subject="=?utf-8?q?Gr=C3=BC=C3=9Fe_aus_K=C3=B6ln?="))
    code, listed = menv.cli_json("folders")
    assert code == 0 and sorted(f["folder"] for f in listed) == sorted([done, nested])

    code, out = menv.cli_json("sync")
    assert code == 0 and out["accounts"]["alice"]["mail"]["imported"] == 2, out
    archive = in_inbox(menv, "CRM Archiv")
    assert len(menv.messages(archive)) == 2 and menv.messages(done) == {} and menv.messages(nested) == {}
    with menv.engine() as engine:
        activities = engine.crm.list_activities(ActivityFilter())
    assert sorted((a.subject, a.status) for a in activities) == [("Grüße aus Köln", "O"), ("Test mail 1", "E")]

    # an archived mail put back is archived again (once), not imported twice
    menv.append(done, next(iter(menv.messages(archive).values()))["raw"])
    code, out = menv.cli_json("sync")
    assert code == 0 and out["accounts"]["alice"]["mail"]["imported"] == 0, out
    assert menv.messages(done) == {} and len(menv.messages(archive)) == 2
    with menv.engine() as engine:
        assert len(engine.crm.list_activities(ActivityFilter())) == 2


def test_a_wrong_password_locks_the_credential(menv, monkeypatch):
    monkeypatch.setenv(f"GWSYNC_TEST_PW_{menv.user.upper()}", "wrong-password")
    first = menv.cli("sync")
    assert first.exit_code == 3 and "refused" in first.stderr and "now locked" in first.stderr, first.stderr
    again = menv.cli("sync")
    assert again.exit_code == 3 and "does not try it again" in again.stderr
    code, status = menv.cli_json("status")
    assert [lock["service"] for lock in status["accounts"]["alice"]["locked"]] == ["imap"]


def test_rules_file_delivered_mail_and_go_again_without_a_trace(menv):
    kunde, chef = in_inbox(menv, "CRM Kunde [O]"), in_inbox(menv, "CRM Chef [E]")
    added = menv.cli("rules", "add", "--from", "@acme.example", "CRM Kunde [O]")  # a short name
    assert added.exit_code == 0 and f"-> {kunde}" in added.stdout, added.stderr
    added = menv.cli("rules", "add", "--from", "chef@beta.example", chef)  # a full name, the server's separator
    assert added.exit_code == 0, added.stderr
    _, listed = menv.cli_json("rules", "list")
    assert listed == [{"id": 1, "from": "@acme.example", "folder": kunde},
                      {"id": 2, "from": "chef@beta.example", "folder": chef}]

    menv.dovecot.deliver(menv.user, make_mail(1, sender="einkauf@acme.example"))
    menv.dovecot.deliver(menv.user, make_mail(2, sender="chef@beta.example"))
    menv.dovecot.deliver(menv.user, make_mail(3, sender="someone@else.example"))
    assert [len(menv.messages(f)) for f in (kunde, chef, "INBOX")] == [1, 1, 1]
    code, out = menv.cli_json("sync")
    assert code == 0 and out["accounts"]["alice"]["mail"]["imported"] == 2, out

    assert menv.cli("rules", "remove", "1").exit_code == 0 and menv.cli("rules", "remove", "2").exit_code == 0
    client = Client("127.0.0.1", menv.dovecot.sieve_port)
    assert client.connect(menv.user, menv.password, starttls=False, authmech="PLAIN")
    assert client.listscripts() == (None, [])
    menv.dovecot.deliver(menv.user, make_mail(4, sender="einkauf@acme.example"))
    assert len(menv.messages(kunde)) == 0 and len(menv.messages("INBOX")) == 2


def test_a_folder_name_with_slashes_on_a_dot_server_is_refused_naming_the_right_one(cyrus, tmp_path, request):
    env = build_env(cyrus, tmp_path, request)
    result = env.cli("rules", "add", "--from", "@acme.example", "INBOX/CRM Kunde [O]")
    assert result.exit_code == 2 and "'INBOX.CRM Kunde [O]'" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_an_empty_import_root_puts_the_archive_at_the_top_of_the_personal_namespace(menv):
    text = menv.config_path.read_text().replace('import_root = "INBOX"', 'import_root = ""')
    menv.config_path.write_text(text)
    with menv.imap() as client:
        prefix = client.namespace().personal[0][0]  # "" on Dovecot, "INBOX." or "INBOX/" on Cyrus
    folder = f"{prefix}CRM Erledigt [E]"
    menv.append(folder, make_mail(1))
    for _ in range(2):  # the second run finds the archive the first one made
        code, out = menv.cli_json("sync")
        assert code == 0, out
    assert out["accounts"]["alice"]["mail"]["imported"] == 0
    assert len(menv.messages(f"{prefix}CRM Archiv")) == 1 and menv.messages(folder) == {}


def test_create_answered_no_for_a_folder_that_is_there_goes_on(cyrus, tmp_path, request):
    """Cyrus answers CREATE of an existing folder with a NO and no [ALREADYEXISTS]: when another
    client made the folder between gwsync's LIST and its CREATE, gwsync lists again and goes on."""
    env = build_env(cyrus, tmp_path, request)
    env.create("INBOX.CRM Archiv")
    with env.engine() as engine:
        session = engine.connect_imap(env.config().account("alice"))
        try:
            listed = session.client.folder_exists
            calls = []

            def first_list_misses(name: str) -> bool:  # the LIST before the other client's CREATE
                calls.append(name)
                return len(calls) > 1 and listed(name)

            session.client.folder_exists = first_list_misses
            session.ensure_folder("INBOX.CRM Archiv")
            with pytest.raises(Exception, match="CRM Nirgends"):
                session.ensure_folder("Nirgends.CRM Nirgends")  # a NO for a folder that is not there stays one
        finally:
            session.logout()


def test_the_cyrus_server_answers_a_wrong_login_without_a_response_code(cyrus):
    """The fact the lock relies on, so that a change in Cyrus shows here first."""
    from imapclient import IMAPClient
    from imapclient.exceptions import LoginError

    cyrus.password_for("probe")
    with IMAPClient("127.0.0.1", port=cyrus.port, ssl=False) as client, \
            pytest.raises(LoginError, match=re.escape("Login failed: authentication failure")):
        client.login("probe", "wrong")


# -- edges: connection limits, Sieve without include, TLS -------------------------------------

def one_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_a_connection_limit_on_login_is_retried_and_never_locks(tmp_path, request):
    """Dovecot's `NO [LIMIT]` (mail_max_userip_connections, 10 by default) is not a wrong password."""
    with Dovecot.start(max_userip_connections=2) as server:
        env = build_env(server, tmp_path, request)
        held = [env.imap(), env.imap()]  # the user's phone and laptop
        try:
            result = env.cli("sync")
            assert result.exit_code == 1 and "[LIMIT]" in one_line(result) and "locked" not in result.stderr
            log = (server.directory / "dovecot.log").read_text(errors="replace")
            refused = [line for line in log.splitlines()
                       if "Maximum number of connections" in line and env.user in line]
            assert len(refused) == 3  # the first try and two retries after a pause
            code, status = env.cli_json("status")
            assert status["accounts"]["alice"]["locked"] == []
        finally:
            for client in held:
                client.logout()
        code, out = env.cli_json("sync")
        assert code == 0, out


@pytest.mark.parametrize("text, locks", [
    ("[AUTHENTICATIONFAILED] Authentication failed.", True),  # Dovecot
    ("Login failed: authentication failure", True),  # Cyrus: no code
    ("[LIMIT] Maximum number of connections from user+IP exceeded (mail_max_userip_connections=10)", False),
    ("Too many open connections (2 of 2 for alice)", False),  # Cyrus maxlogins_per_user: no code
    ("[AUTHENTICATIONFAILED] Too many open connections", True),  # a code decides, not the words
])
def test_which_login_refusals_lock(text, locks):
    from gwsync.mail.imap import LoginFailed, ServerUnreachable, login_refusal

    error = login_refusal("IMAP host", "alice", text)
    assert isinstance(error, LoginFailed if locks else ServerUnreachable), error


def test_cyrus_maxlogins_per_user_on_login_is_retried_and_never_locks(tmp_path, request):
    """Cyrus's `maxlogins_per_user` answers the login past it `NO Too many open connections
    (2 of 2 for USER)`, with no response code; that is not a wrong password either."""
    from cyrus_server import Cyrus

    with Cyrus.start(settings="maxlogins_per_user: 2\n") as server:
        env = build_env(server, tmp_path, request)
        env.config_path.write_text(env.config_path.read_text().replace('archive_folder = "INBOX/CRM Archiv"\n', ""))
        held = [env.imap(), env.imap()]  # the user's phone and laptop
        try:
            result = env.cli("sync")
            line = one_line(result)
            assert result.exit_code == 1 and "Too many open connections" in line, line
            assert "locked" not in result.stderr
            code, status = env.cli_json("status")
            assert status["accounts"]["alice"]["locked"] == []
        finally:
            for client in held:
                client.logout()
        code, out = env.cli_json("sync")
        assert code == 0, out


@pytest.fixture(scope="module")
def pymap_sieve():
    from gwsync.demo.localservers import Pymap, wait_for_port

    with Pymap.start(user="pat", password="pat-pw") as server:
        wait_for_port(server.sieve_port, server.proc)
        yield server


def test_rules_on_a_server_without_include_say_what_it_lacks_and_leave_nothing(pymap_sieve, tmp_path, monkeypatch):
    from conftest import CONFIG_TEMPLATE

    monkeypatch.setenv("GWSYNC_TEST_PW_PAT", "pat-pw")
    config = tmp_path / "config.toml"
    config.write_text(CONFIG_TEMPLATE.format(
        dir=tmp_path, port=pymap_sieve.port, user="pat", env="GWSYNC_TEST_PW_PAT", link="", mandatory="[]",
        crm_extra="", areas='["mail"]', caldav="") + f"\n[accounts.alice.sieve]\nport = {pymap_sieve.sieve_port}\n")
    from click.testing import CliRunner

    from gwsync.cli import main

    result = CliRunner().invoke(main, ["--config", str(config), "rules", "add", "--from", "@acme.example",
                                       "CRM Kunde [O]"])
    line = one_line(result)
    assert result.exit_code == 1 and "include" in line and "rules" in line, line
    client = Client("127.0.0.1", pymap_sieve.sieve_port)
    assert client.connect("pat", "pat-pw", starttls=False, authmech="PLAIN")
    assert client.listscripts() == (None, [])


USER_SCRIPT = 'require ["fileinto"];\nif header :contains "subject" "Rechnung" { fileinto "INBOX/Rechnungen"; }\n'


def test_a_failure_after_a_putscript_takes_back_what_was_stored(sieve_dovecot, tmp_path, request, monkeypatch):
    from gwsync.mail import sieve

    env = use_sieve_dovecot(build_env(sieve_dovecot, tmp_path, request), sieve_dovecot)
    client = Client("127.0.0.1", sieve_dovecot.sieve_port)
    assert client.connect(env.user, env.password, starttls=False, authmech="PLAIN")
    real_put = sieve.SieveRules._put

    def second_put_fails(self, name: str, text: str) -> None:
        if name != sieve.RULES_SCRIPT:
            raise sieve.SieveError(f"cannot store Sieve script {name!r}: quota exceeded")
        real_put(self, name, text)

    monkeypatch.setattr(sieve.SieveRules, "_put", second_put_fails)
    result = env.cli("rules", "add", "--from", "@acme.example", "CRM Kunde [O]")  # no active script yet
    assert result.exit_code == 1 and "quota exceeded" in one_line(result)
    assert client.listscripts() == (None, [])

    assert client.putscript("mine", USER_SCRIPT) and client.setactive("mine")
    result = env.cli("rules", "add", "--from", "@acme.example", "CRM Kunde [O]")  # the user's script gets the include
    assert result.exit_code == 1 and "quota exceeded" in one_line(result)
    assert client.listscripts() == ("mine", [])
    monkeypatch.undo()
    assert env.cli("rules", "add", "--from", "@acme.example", "CRM Kunde [O]").exit_code == 0
    assert env.cli_json("rules", "list")[1] == [{"id": 1, "from": "@acme.example", "folder": "INBOX/CRM Kunde [O]"}]


def test_rules_over_plain_text_print_no_library_warning(sieve_dovecot, tmp_path, request):
    env = use_sieve_dovecot(build_env(sieve_dovecot, tmp_path, request), sieve_dovecot)
    proc = env.subprocess("rules", "list")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and err.decode() == "", err.decode()


def _openssl(directory, *args: str) -> None:
    import subprocess

    subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)


@pytest.fixture(scope="module")
def dns_named_ip_server(tmp_path_factory):
    """A TLS server whose certificate names 127.0.0.1 as a DNS name, as Xandikos' --autocert
    makes it: Python's verification rejects it for the IP address 127.0.0.1."""
    import socket
    import ssl
    import threading

    directory = tmp_path_factory.mktemp("dnsip")
    _openssl(directory, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test CA")
    _openssl(directory, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (directory / "san.ext").write_text("subjectAltName=DNS:127.0.0.1\n")
    _openssl(directory, "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.pem", "-days", "2", "-extfile", "san.ext")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(directory / "server.pem", directory / "server.key")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"* OK [CAPABILITY IMAP4rev1] ready\r\n")
                    tls.settimeout(1)
                    tls.recv(100)
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1], directory / "ca.pem"
    stop.set()
    thread.join()
    listener.close()


def _tls_config(env, port: int, ca_file=None) -> None:
    if not hasattr(env, "plain_config"):
        env.plain_config = env.config_path.read_text()
    text = re.sub(r"port = \d+", f"port = {port}", env.plain_config, count=1)
    ca = f'ca_file = "{ca_file}"\n' if ca_file else ""
    env.config_path.write_text(text.replace('security = "none"', f'security = "tls"\n{ca}'))


def test_a_certificate_for_other_names_names_them_and_is_a_config_error(dns_named_ip_server, make_env):
    port, ca_file = dns_named_ip_server
    env = make_env()
    _tls_config(env, port, ca_file)
    for args in (["sync"], ["folders"]):
        result = env.cli(*args)
        line = one_line(result)
        assert result.exit_code == 2, line
        assert "127.0.0.1" in line and "DNS:127.0.0.1" in line and "host" in line, line


def test_a_certificate_from_an_unknown_ca_points_at_ca_file_and_is_not_retried(make_env):
    import time

    with Dovecot.start(tls=True) as server:
        env = make_env()
        _tls_config(env, server.tls_port)
        started = time.monotonic()
        result = env.cli("sync")
        line = one_line(result)
        assert result.exit_code == 2 and "ca_file" in line and "not trusted" in line, line
        assert time.monotonic() - started < 2  # no retry pauses (0.5 s, then 2 s)
        _tls_config(env, server.tls_port, server.ca_file)
        assert env.cli("sync").exit_code == 0


def test_mail_in_the_import_folder_itself_is_imported_with_the_default_status(menv):
    """The seed's import folder: its own mail gets [crm] default_status (I), the CRM folders
    below it their own status, the archive sits beside it; folders outside it are not scanned."""
    own, kunde = in_inbox(menv, "CRM Import"), in_inbox(menv, "CRM Import", "CRM Kunde [O]")
    text = menv.config_path.read_text().replace('import_root = "INBOX"', f'import_folder = "{own}"')
    menv.config_path.write_text(text)
    code, listed = menv.cli_json("folders")  # created when missing, listed with its status
    assert code == 0 and [(f["folder"], f["status"], f["status_label"]) for f in listed] == [(own, "I", "Importiert")]
    menv.append(own, make_mail(1))
    menv.append(kunde, make_mail(2))
    menv.append("INBOX", make_mail(3))  # the mailbox's own mail
    outside = in_inbox(menv, "CRM Erledigt [E]")  # not below the import folder
    menv.append(outside, make_mail(4))
    code, listed = menv.cli_json("folders")
    assert code == 0 and [(f["folder"], f["status"]) for f in listed] == [(own, "I"), (kunde, "O")]

    code, out = menv.cli_json("sync")
    assert code == 0 and out["accounts"]["alice"]["mail"]["imported"] == 2, out
    with menv.engine() as engine:
        activities = engine.crm.list_activities(ActivityFilter())
    assert sorted((a.subject, a.status) for a in activities) == [("Test mail 1", "I"), ("Test mail 2", "O")]
    archive = in_inbox(menv, "CRM Archiv")  # beside the import folder, not in it
    assert len(menv.messages(archive)) == 2 and menv.messages(own) == {} and menv.messages(kunde) == {}
    assert len(menv.messages("INBOX")) == 1 and len(menv.messages(outside)) == 1
    code, out = menv.cli_json("sync")  # nothing twice
    assert code == 0 and out["accounts"]["alice"]["mail"]["imported"] == 0, out


def test_without_an_import_folder_the_mail_of_inbox_itself_is_never_imported(menv):
    menv.append("INBOX", make_mail(1))
    menv.append(in_inbox(menv, "CRM Offen [O]"), make_mail(2))
    code, listed = menv.cli_json("folders")
    assert code == 0 and [f["folder"] for f in listed] == [in_inbox(menv, "CRM Offen [O]")]
    code, out = menv.cli_json("sync")
    assert code == 0 and out["accounts"]["alice"]["mail"]["imported"] == 1, out
    assert len(menv.messages("INBOX")) == 1
    with menv.engine() as engine:
        assert [a.subject for a in engine.crm.list_activities(ActivityFilter())] == ["Test mail 2"]

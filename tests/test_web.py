"""The web view (`gwsync serve`) over real HTTP: the CLI starts the server as a user would,
mail comes in through Dovecot and the calendar through Radicale, and the checks are what a
browser would get. The last test drives Debian's Chromium through chromedriver."""

from __future__ import annotations

import hashlib
import html
import http.server
import os
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from conftest import GwEnv, build_env, crlf

FOLDER = "INBOX/CRM Kunde [O]"
PDF = bytes(range(256)) * 64 + b"%%EOF\n"  # binary: every byte value, so any re-encoding shows
HOSTILE_ATTACHMENT = b"<html><script>alert('from an attachment')</script></html>"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Tracker:
    """A loopback HTTP server standing in for a sender's tracking-pixel host: it counts hits."""

    def __init__(self):
        self.hits: list[str] = []
        hits = self.hits

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                hits.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "image/gif")
                self.end_headers()
                self.wfile.write(b"GIF89a")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()


def hostile_mail(tracker: str) -> bytes:
    html = f"""<html><head><style>body {{ background: url({tracker}/style-bg.gif) }}</style>
<link rel="stylesheet" href="{tracker}/sheet.css"><meta http-equiv="refresh" content="0;url={tracker}/refresh"></head>
<body onload="alert('onload')"><p>Dear Alice, here is our <b>offer</b> for 2027.</p>
<img src="{tracker}/pixel.gif?u=alice" width="1" height="1" alt="">
<img src="x" onerror="fetch('{tracker}/onerror')" alt="logo">
<img srcset="{tracker}/srcset.gif 2x" alt="">
<table background="{tracker}/table-bg.gif"><tr><td style="background-image:url({tracker}/td.gif)">Price: 1.200 EUR</td></tr></table>
<script>fetch('{tracker}/script')</script>
<a href="javascript:fetch('{tracker}/js-link')">click me</a>
<a href="https://acme.example/offer">the offer online</a>
<iframe src="{tracker}/frame"></iframe><svg><image href="{tracker}/svg.gif"/></svg>
</body></html>"""  # noqa: E501 - the mail's HTML as a sender writes it
    b64 = __import__("base64").encodebytes
    return crlf(f"""From: Erika Mustermann <erika@acme.example>
To: alice@example.com
Subject: Angebot 2027
Message-ID: <offer-2027@acme.example>
Date: Tue, 24 Nov 2026 09:15:00 +0100
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="outer"

--outer
Content-Type: multipart/alternative; boundary="alt"

--alt
Content-Type: text/plain; charset=utf-8

Dear Alice, here is our offer for 2027.
--alt
Content-Type: text/html; charset=utf-8

{html}
--alt--
--outer
Content-Type: application/pdf; name="Angebot 2027 (final).pdf"
Content-Disposition: attachment; filename="Angebot 2027 (final).pdf"
Content-Transfer-Encoding: base64

{b64(PDF).decode()}
--outer
Content-Type: text/html; name="../../evil.html"
Content-Disposition: attachment; filename="../../evil.html"
Content-Transfer-Encoding: base64

{b64(HOSTILE_ATTACHMENT).decode()}
--outer--
""".encode())


def plain_mail(n: int, sender: str, subject: str) -> bytes:
    return crlf(f"From: {sender}\nTo: alice@example.com\nSubject: {subject}\nMessage-ID: <web{n}@example.org>\n"
                f"\nText of {subject}.\n".encode())


@dataclass
class World:
    env: GwEnv
    url: str  # the web view, e.g. http://127.0.0.1:PORT
    process: subprocess.Popen
    tracker: Tracker
    ids: dict[str, int]  # subject -> activity id
    calendar_link: str  # the CRM link as written into the CalDAV item

    def get(self, path: str, session: requests.Session | None = None, **kw) -> requests.Response:
        return (session or requests).get(self.url + path, timeout=10, **kw)


def start_serve(config: Path, *args: str) -> tuple[subprocess.Popen, str]:
    """`gwsync serve` as a user starts it; returns the process and the address it printed."""
    process = subprocess.Popen([sys.executable, "-m", "gwsync.cli", "--config", str(config), "serve", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stderr.readline()
    match = re.search(r"serving the CRM at (http://\S+?)/? ", line)
    if not match:
        process.kill()
        raise AssertionError(f"gwsync serve did not start: {line}{process.stderr.read()}")
    return process, match.group(1)


def serve_refused(config: Path, *args: str) -> subprocess.CompletedProcess:
    """`gwsync serve` where it must not start: it has to end by itself."""
    return subprocess.run([sys.executable, "-m", "gwsync.cli", "--config", str(config), "serve", *args],
                          capture_output=True, text=True, timeout=30)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture(scope="module")
def world(dovecot, tmp_path_factory, request):
    port = free_port()
    env = build_env(dovecot, tmp_path_factory.mktemp("web"), request, areas=("mail", "events"),
                    mandatory=("subject",), link=None, extra=f"\n[serve]\nport = {port}\n")
    tracker = Tracker()
    assert env.cli("partner", "add", "ACME GmbH", "--email", "info@acme.example").exit_code == 0
    assert env.cli("contact", "add", "Erika Mustermann", "--email", "erika@acme.example",
                   "--partner", "1").exit_code == 0
    env.append(FOLDER, hostile_mail(tracker.url), plain_mail(1, "erika@acme.example", "Rückfrage Lieferung"),
               plain_mail(2, "neu@kunde.example", "Anfrage Wartungsvertrag"),
               plain_mail(5, "neu2@kunde.example", "Noch eine Anfrage"),
               plain_mail(3, "erika@acme.example", ""))  # no subject, which is mandatory: held
    added = env.cli("activity", "add", "--kind", "TERMIN", "--subject", "Jahresgespräch ACME", "--contact", "1",
                    "--start", "2026-12-02T14:00:00+01:00[Europe/Berlin]",
                    "--end", "2026-12-02T15:00:00+01:00[Europe/Berlin]", "--location", "Bremen")
    assert added.exit_code == 0, added.output
    synced = env.cli("sync")
    assert synced.exit_code == 0, synced.output
    ids = {a["subject"]: a["id"] for a in env.cli_json("activities")[1]}
    (text,) = [data for _etag, data in env.dav_items("events").values()]
    calendar_link = re.search(r"CRM: (\S+)", text.replace("\r\n ", "")).group(1)
    process, url = start_serve(env.config_path)
    yield World(env=env, url=url, process=process, tracker=tracker, ids=ids, calendar_link=calendar_link)
    stop(process)
    tracker.stop()


def csrf_token(page: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)


# -- pages -----------------------------------------------------------------------------------

def test_the_link_written_into_the_calendar_item_opens_the_activity(world):
    assert world.calendar_link == f"{world.url}/activities/{world.ids['Jahresgespräch ACME']}"
    page = requests.get(world.calendar_link, timeout=10)
    assert page.status_code == 200
    assert "<h1>Jahresgespräch ACME</h1>" in page.text
    assert "TERMIN" in page.text and "O · Offen" in page.text
    assert "Wed 02 Dec 2026, 14:00 (Europe/Berlin)" in page.text and "15:00 (Europe/Berlin)" in page.text
    assert "Bremen" in page.text
    assert ">Erika Mustermann</a>" in page.text and ">ACME GmbH</a>" in page.text
    # the groupware item it is linked to
    assert "Appointment in alice's events collection" in page.text
    assert f"/{world.env.user}/calendar/" in page.text


def test_an_imported_mail_shows_sender_contact_partner_and_documents(world):
    page = world.get(f"/activities/{world.ids['Angebot 2027']}").text
    assert "MAILEIN" in page and "O · Offen" in page
    assert "erika@acme.example" in page and ">Erika Mustermann</a>" in page and ">ACME GmbH</a>" in page
    assert "Angebot 2027 (final).pdf</a>" in page and "16.0 KB" in page
    assert "evil.html</a>" in page and "../" not in page
    assert "<b>offer</b>" in page  # the HTML body, not only its text


def test_quick_searches_list_the_right_mail(world):
    def subjects(name):
        page = world.get(f"/searches/{name}")
        assert page.status_code == 200
        return set(re.findall(r'class="subject">([^<]*)<', page.text))

    mails = {"Angebot 2027", "Rückfrage Lieferung", "Anfrage Wartungsvertrag", "Noch eine Anfrage"}
    assert subjects("today") == mails
    assert subjects("imported") == mails
    assert subjects("unassigned") == {"Anfrage Wartungsvertrag", "Noch eine Anfrage"}
    assert world.get("/searches/nonsense").status_code == 404
    index = world.get("/").text
    assert re.search(r'Unassigned imported mail</a> <span class="count">2<', index)


def test_partner_page_lists_its_activities_and_contacts(world):
    page = world.get("/partners/1").text
    assert "Activities of ACME GmbH" in page and ">Erika Mustermann</a>" in page
    assert set(re.findall(r'class="subject">([^<]*)<', page)) == {
        "Angebot 2027", "Rückfrage Lieferung", "Jahresgespräch ACME"}
    assert world.get("/partners/99").status_code == 404
    assert world.get("/activities/9999").status_code == 404
    # beyond what SQLite can store: still only "not there", no server error
    assert world.get("/activities/99999999999999999999999999").status_code == 404
    assert world.get("/partners/1?page=999999999999999999999").status_code in (400, 404)


def test_held_mail_says_what_it_lacks(world):
    page = world.get("/held").text
    assert "erika@acme.example" in page and "Lacks: subject." in page and "gwsync review" in page


def test_sync_summary_links_to_the_quick_searches(world):
    world.env.append(FOLDER, plain_mail(4, "neu3@kunde.example", "Dritte Anfrage"))
    out = world.env.cli("sync", "--only", "mail").output
    assert f"imported today: {world.url}/searches/today" in out
    assert f"unassigned: {world.url}/searches/unassigned" in out
    assert ">Dritte Anfrage</a>" in world.get("/searches/unassigned").text


# -- safety ----------------------------------------------------------------------------------

def test_mail_html_renders_without_script_handlers_or_remote_images(world):
    page = world.get(f"/activities/{world.ids['Angebot 2027']}").text
    body = page.split('<div class="mail-html">', 1)[1].split("</div>", 1)[0]
    assert "Dear Alice, here is our <b>offer</b> for 2027." in body and "Price: 1.200 EUR" in body
    for bad in ("<script", "onload", "onerror", "javascript:", "<iframe", "<svg", "<style", "<link", "<meta",
                "style=", "background", "srcset", "src="):
        assert bad not in body.lower(), bad
    assert world.tracker.url not in page  # no address of the tracker anywhere on the page
    assert 'href="https://acme.example/offer"' in body and 'rel="noopener noreferrer"' in body
    assert "3 images not shown" in page
    assert "Load remote images</a>" in page
    loaded = world.get(f"/activities/{world.ids['Angebot 2027']}?images=remote")  # the reader's choice
    body = loaded.text.split('<div class="mail-html">', 1)[1].split("</div>", 1)[0]
    assert f'<img src="{world.tracker.url}/pixel.gif?u=alice" width="1" height="1" alt="">' in body
    for bad in ("<script", "onerror", "onload", "srcset", "background", "javascript:", "style="):
        assert bad not in body.lower(), bad
    assert "img-src 'self' https: http:" in loaded.headers["Content-Security-Policy"]
    plain = world.get(f"/activities/{world.ids['Angebot 2027']}?text=1").text
    assert '<pre class="mail-text">Dear Alice, here is our offer for 2027.</pre>' in plain


def test_pages_forbid_scripts_and_foreign_loads(world):
    response = world.get(f"/activities/{world.ids['Angebot 2027']}")
    policy = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "img-src 'self'" in policy and "script-src" not in policy
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "same-origin"


def test_documents_download_byte_identical_as_attachments(world):
    activity = world.ids["Angebot 2027"]
    pdf = world.get(f"/activities/{activity}/documents/1")
    assert pdf.status_code == 200
    assert hashlib.sha256(pdf.content).hexdigest() == hashlib.sha256(PDF).hexdigest()
    assert pdf.headers["Content-Disposition"].startswith("attachment;")
    assert 'filename="Angebot 2027 (final).pdf"' in pdf.headers["Content-Disposition"]
    assert pdf.headers["Content-Type"] == "application/pdf"
    assert pdf.headers["X-Content-Type-Options"] == "nosniff"

    evil = world.get(f"/activities/{activity}/documents/2")
    assert evil.content == HOSTILE_ATTACHMENT
    assert evil.headers["Content-Disposition"] == "attachment; filename=evil.html"
    assert evil.headers["Content-Type"] == "application/octet-stream"  # never rendered as a page
    assert evil.headers["Content-Security-Policy"].startswith("sandbox")
    assert world.get(f"/activities/{activity}/documents/3").status_code == 404
    assert world.get(f"/activities/{activity}/documents/0").status_code == 404


def test_a_forged_post_is_refused_and_the_assign_form_works(world):
    activity = world.ids["Anfrage Wartungsvertrag"]
    # Another site's page can make the browser POST here, but it cannot read our token.
    forged = requests.post(world.url + "/unknown/assign", timeout=10,
                           data={"email": "neu@kunde.example", "new_contact": "Mallory"})
    assert forged.status_code == 400 and "Form refused" in forged.text
    browser = requests.Session()
    world.get("/unknown", session=browser)
    no_token = browser.post(world.url + "/unknown/assign", timeout=10,
                            data={"email": "neu@kunde.example", "new_contact": "Mallory"})
    assert no_token.status_code == 400
    wrong_token = browser.post(world.url + "/unknown/assign", timeout=10,
                               data={"email": "neu@kunde.example", "new_contact": "Mallory", "csrf_token": "x"})
    assert wrong_token.status_code == 400
    assert world.env.cli_json("activity", "show", str(activity))[1]["contact_id"] is None

    page = world.get("/unknown", session=browser)
    assert 'id="neu@kunde.example"' in page.text
    done = browser.post(world.url + "/unknown/assign", timeout=10, data={
        "email": "neu@kunde.example", "new_contact": "Nina Neu", "partner_id": "1",
        "csrf_token": csrf_token(page.text)})
    assert done.status_code == 200 and done.history[0].status_code == 303  # redirected back to the list
    assert "neu@kunde.example now belongs to contact #2; 1 earlier activity linked." in done.text
    again = browser.post(world.url + "/unknown/assign", timeout=10, data={  # sent twice: still one contact
        "email": "neu@kunde.example", "new_contact": "Nina Neu", "partner_id": "1",
        "csrf_token": csrf_token(page.text)})
    assert "neu@kunde.example now belongs to contact #2; 0 earlier activities linked." in again.text
    with world.env.engine() as engine:
        assert [c.name for c in engine.crm.list_contacts()].count("Nina Neu") == 1
    other = browser.post(world.url + "/unknown/assign", timeout=10, data={
        "email": "neu@kunde.example", "new_contact": "Somebody Else", "csrf_token": csrf_token(page.text)})
    assert other.status_code == 400 and "belongs to contact #2 Nina Neu already" in other.text
    assert 'id="neu@kunde.example"' not in done.text
    shown = world.env.cli_json("activity", "show", str(activity))[1]
    assert (shown["contact_id"], shown["partner_id"], shown["unassigned"]) == (2, 1, False)

    # an existing contact, chosen from the list
    page = world.get("/unknown", session=browser).text
    assert 'id="neu2@kunde.example"' in page
    assert '<option value="#2 Nina Neu (ACME GmbH)">' in page
    done = browser.post(world.url + "/unknown/assign", timeout=10, data={
        "email": "neu2@kunde.example", "contact": "#2 Nina Neu (ACME GmbH)", "csrf_token": csrf_token(page)})
    assert "neu2@kunde.example now belongs to contact #2" in done.text
    for chosen, message in (("#77 Nobody", "no contact with id 77"), ("Nobody", "no contact &#39;Nobody&#39;")):
        bad = browser.post(world.url + "/unknown/assign", timeout=10, data={
            "email": "x@kunde.example", "contact": chosen, "csrf_token": csrf_token(page)})
        assert bad.status_code == 400 and message in bad.text, chosen


def test_only_its_own_host_names_are_answered(world):
    # DNS rebinding: a hostile site whose name resolves to 127.0.0.1 must not read the CRM.
    rebound = requests.get(world.url + "/", headers={"Host": f"evil.example:{world.url.rsplit(':', 1)[1]}"},
                           timeout=10)
    assert rebound.status_code == 400 and "CRM" not in rebound.text
    assert requests.get(world.url.replace("127.0.0.1", "localhost") + "/", timeout=10).status_code == 200


def ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback(), reason="this machine has no IPv6 loopback (::1 cannot be bound)")
def test_on_ipv6_loopback_it_answers_and_still_refuses_other_host_names(world):
    process, url = start_serve(world.env.config_path, "--host", "::1", "--port", "0")
    try:
        assert url.startswith("http://[::1]:")
        port = url.rsplit(":", 1)[1]
        # what browsers and curl send (requests leaves the brackets out: "Host: ::1:PORT")
        own = {"Host": f"[::1]:{port}"}
        page = requests.get(url + "/", headers=own, timeout=10)
        assert page.status_code == 200 and "Unassigned imported mail" in page.text
        activity = requests.get(url + f"/activities/{world.ids['Angebot 2027']}", headers=own, timeout=10)
        assert activity.status_code == 200 and "<h1>Angebot 2027</h1>" in activity.text
        for host in (f"evil.example:{port}", f"[::2]:{port}"):
            rebound = requests.get(url + "/", headers={"Host": host}, timeout=10)
            assert rebound.status_code == 400 and "CRM" not in rebound.text, host
    finally:
        stop(process)


# -- starting it -----------------------------------------------------------------------------

def test_beyond_loopback_it_needs_a_password(world):
    result = serve_refused(world.env.config_path, "--host", "0.0.0.0", "--port", "0")
    assert result.returncode == 2
    assert result.stderr.startswith("gwsync: config error: serve: listening on 0.0.0.0")
    assert len(result.stderr.strip().splitlines()) == 1


def test_behind_a_proxy_it_needs_a_password_too(world):
    config = world.env.dir / "proxied.toml"
    config.write_text(world.env.config_path.read_text().replace("[serve]\n", '[serve]\nurl = "https://crm.example.com"\n'))
    result = serve_refused(config, "--port", "0")
    assert result.returncode == 2
    assert "serve.url https://crm.example.com says the CRM is opened from other machines" in result.stderr


def test_a_taken_port_is_one_line(world):
    port = world.url.rsplit(":", 1)[1]
    result = serve_refused(world.env.config_path, "--port", port)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"gwsync: cannot listen on 127.0.0.1 port {port}: Address already in use "
        "(another gwsync serve? choose another with --port)"]


def serve_with_password(world, monkeypatch) -> tuple[subprocess.Popen, str]:
    """`gwsync serve` on all addresses with the password "s3cret wörd"; its loopback address."""
    config = world.env.dir / "with-password.toml"
    config.write_text(world.env.config_path.read_text().replace(
        "[serve]\n", '[serve]\nhost = "0.0.0.0"\npassword_env = "GWSYNC_TEST_WEB_PASSWORD"\n'))
    monkeypatch.setenv("GWSYNC_TEST_WEB_PASSWORD", "s3cret wörd")
    process, url = start_serve(config, "--port", "0")
    return process, url.replace("0.0.0.0", "127.0.0.1")


def test_with_a_password_every_page_needs_a_login(world, monkeypatch):
    process, address = serve_with_password(world, monkeypatch)
    try:
        target = f"/activities/{world.ids['Angebot 2027']}"
        anonymous = requests.get(address + target, timeout=10, allow_redirects=False)
        assert anonymous.status_code == 302 and anonymous.headers["Location"].startswith("/login?next=")
        for path in ("/", "/searches/imported", "/unknown", "/held", target + "/documents/1"):
            assert requests.get(address + path, timeout=10, allow_redirects=False).status_code == 302, path

        browser = requests.Session()
        login = browser.get(address + target, timeout=10)  # follows to the login page
        assert "Password" in login.text and "Angebot" not in login.text
        wrong = browser.post(address + "/login", timeout=10, data={
            "password": "guess", "next": target, "csrf_token": csrf_token(login.text)})
        assert wrong.status_code == 401 and "Wrong password." in wrong.text
        time.sleep(int(wrong.headers["Retry-After"]))  # the next try has to wait that long
        right = browser.post(address + "/login", timeout=10, data={
            "password": "s3cret wörd", "next": target, "csrf_token": csrf_token(wrong.text)})
        assert right.status_code == 200 and "<h1>Angebot 2027</h1>" in right.text  # back where the link pointed
        cookie = next(c for c in browser.cookies if c.name.startswith("gwsync_session"))
        assert cookie.has_nonstandard_attr("HttpOnly")
        out = browser.post(address + "/logout", timeout=10, data={"csrf_token": csrf_token(right.text)})
        assert "Log in" in out.text
        assert browser.get(address + target, timeout=10, allow_redirects=False).status_code == 302
        # no open redirect through ?next=
        page = browser.get(address + "/login", timeout=10)
        away = browser.post(address + "/login", timeout=10, allow_redirects=False, data={
            "password": "s3cret wörd", "next": "//evil.example/", "csrf_token": csrf_token(page.text)})
        assert away.headers["Location"] == "/"
        # what browsers read as another site: tabs and newlines dropped, "\\" taken for "/"
        for hostile in ("/%09/evil.example", "/%0d%0a/evil.example", "/%5C%5Cevil.example", "/%5Cevil.example",
                        "https:evil.example", "/%0d%0aSet-Cookie:%20x=1"):
            page = browser.get(address + "/login?next=" + hostile, timeout=10)
            assert page.status_code == 200, hostile
            sent = re.search(r'name="next" value="([^"]*)"', page.text).group(1)  # as the form sends it back
            away = browser.post(address + "/login", timeout=10, allow_redirects=False, data={
                "password": "s3cret wörd", "next": html.unescape(sent), "csrf_token": csrf_token(page.text)})
            assert (away.status_code, away.headers["Location"]) == (303, "/"), hostile
            page = browser.get(address + "/login", timeout=10)  # a fresh token: the login renewed the session
            away = browser.post(address + "/login?next=" + hostile, timeout=10, allow_redirects=False, data={
                "password": "s3cret wörd", "csrf_token": csrf_token(page.text)})
            assert (away.status_code, away.headers["Location"]) == (303, "/"), hostile
    finally:
        stop(process)


def test_wrong_passwords_cost_the_guesser_not_the_server(world, monkeypatch):
    process, address = serve_with_password(world, monkeypatch)
    try:
        reader = requests.Session()  # someone logged in, reading
        page = reader.get(address + "/login", timeout=10)
        assert reader.post(address + "/login", timeout=10, data={
            "password": "s3cret wörd", "csrf_token": csrf_token(page.text)}).status_code == 200
        guesser = requests.Session()
        token = csrf_token(guesser.get(address + "/login", timeout=10).text)

        def guess(_n):
            return guesser.post(address + "/login", data={"password": "guess", "csrf_token": token}, timeout=30)

        target = address + f"/activities/{world.ids['Angebot 2027']}"
        with ThreadPoolExecutor(12) as pool:
            guesses = [pool.submit(guess, n) for n in range(12)]
            time.sleep(0.2)  # the guesses are in (they used to sleep in all of the server's threads)
            started = time.monotonic()
            read = reader.get(target, timeout=30)
            took = time.monotonic() - started
            answers = [g.result() for g in guesses]
        assert read.status_code == 200 and "<h1>Angebot 2027</h1>" in read.text
        assert took < 1.0, f"an unrelated page took {took:.1f} s while wrong passwords came in"
        statuses = [a.status_code for a in answers]
        assert set(statuses) == {401, 429} and 1 <= statuses.count(401) <= 2, statuses  # most not even checked
        refused = next(a for a in answers if a.status_code == 429)
        assert int(refused.headers["Retry-After"]) >= 1 and "try again in" in refused.text

        # the right password, too early, is refused without being checked; in time it works
        early = guesser.post(address + "/login", timeout=10, allow_redirects=False,
                             data={"password": "s3cret wörd", "csrf_token": token})
        assert early.status_code == 429
        assert guesser.get(target, timeout=10, allow_redirects=False).status_code == 302  # not logged in
        time.sleep(int(early.headers["Retry-After"]))
        right = guesser.post(address + "/login", timeout=10, allow_redirects=False,
                             data={"password": "s3cret wörd", "csrf_token": token})
        assert right.status_code == 303
    finally:
        stop(process)


def test_sigterm_stops_it_cleanly(world):
    process, url = start_serve(world.env.config_path, "--port", "0")
    assert requests.get(url + "/", timeout=10).status_code == 200
    process.terminate()
    assert process.wait(timeout=10) == 0
    with pytest.raises(requests.ConnectionError):
        requests.get(url + "/", timeout=2)


# -- in a real browser -----------------------------------------------------------------------

def chromium(tmp_path):
    """Debian's Chromium, headless, with a phone's window and its console log kept."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=412,915"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))


def test_in_chromium_the_calendar_link_leads_to_the_partners_activities(world, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as arrived
    from selenium.webdriver.support.wait import WebDriverWait

    driver = chromium(tmp_path)
    # A click that follows a link or sends a form returns before the next page is there.
    wait = WebDriverWait(driver, 10).until
    try:
        driver.get(world.calendar_link)  # as a phone calendar opens it
        assert driver.find_element(By.TAG_NAME, "h1").text == "Jahresgespräch ACME"
        driver.find_element(By.CSS_SELECTOR, "a.partner").click()
        wait(arrived.text_to_be_present_in_element((By.TAG_NAME, "h1"), "Activities of"))
        assert driver.find_element(By.TAG_NAME, "h1").text == "Activities of ACME GmbH"
        subjects = {a.text for a in driver.find_elements(By.CSS_SELECTOR, "a.subject")}
        assert {"Angebot 2027", "Rückfrage Lieferung"} <= subjects
        shot = tmp_path / "partner.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 1000

        # the mail with the tracking pixel, opened for real: nothing reaches the tracker
        driver.find_element(By.LINK_TEXT, "Angebot 2027").click()
        assert "offer" in wait(arrived.presence_of_element_located((By.CSS_SELECTOR, ".mail-html"))).text
        assert driver.execute_script("return document.readyState") == "complete"
        time.sleep(0.5)
        driver.save_screenshot(str(tmp_path / "mail.png"))
        assert world.tracker.hits == []
        # only when the reader asks for remote images does the pixel fire (so the check above can fail)
        driver.find_element(By.LINK_TEXT, "Load remote images").click()
        deadline = time.monotonic() + 5
        while not world.tracker.hits and time.monotonic() < deadline:
            time.sleep(0.1)
        assert world.tracker.hits == ["/pixel.gif?u=alice"]

        # the assign form, filled in and sent by the browser (its CSRF token and cookie included)
        world.env.append(FOLDER, plain_mail(7, "browser@kunde.example", "Aus dem Browser"))
        assert world.env.cli("sync", "--only", "mail").exit_code == 0
        driver.get(world.url + "/unknown")
        section = driver.find_element(By.CSS_SELECTOR, 'section[id="browser@kunde.example"]')
        section.find_element(By.NAME, "new_contact").send_keys("Bruno Browser")
        section.find_element(By.XPATH, ".//button[text()='Create and assign']").click()
        notice = wait(arrived.presence_of_element_located((By.CSS_SELECTOR, ".notice")))
        assert "browser@kunde.example now belongs to contact" in notice.text
        assert not driver.find_elements(By.CSS_SELECTOR, 'section[id="browser@kunde.example"]')

        problems = [entry for entry in driver.get_log("browser") if entry["level"] in ("SEVERE", "WARNING")]
        assert problems == []
    finally:
        driver.quit()


# -- a team: alice and bob on one CRM, each logging in as themselves ---------------------------

ALICE_WEB, BOB_WEB = "alice wörd", "bob wörd"


@dataclass
class Team:
    alice: GwEnv  # the config of both is alice's
    bob: GwEnv  # bob's mail and calendar user
    url: str
    process: subprocess.Popen
    ids: dict[str, int]  # subject -> activity id

    def login(self, user: str, password: str) -> requests.Session:
        browser = requests.Session()
        page = browser.get(self.url + "/login", timeout=10)
        answer = browser.post(self.url + "/login", timeout=10, data={
            "user": user, "password": password, "csrf_token": csrf_token(page.text)})
        assert answer.status_code == 200 and f"Logged in as {user}" in answer.text, answer.text
        return browser


def account_tables(env: GwEnv, name: str) -> str:
    """env's [accounts.alice] tables, renamed to account `name` (for a second employee)."""
    text = env.config_path.read_text()
    tables = text[text.index("[accounts.alice]"):]
    return tables.replace("[accounts.alice", f"[accounts.{name}")


@pytest.fixture(scope="module")
def team(dovecot, tmp_path_factory, request):
    root = tmp_path_factory.mktemp("team")
    alice = build_env(dovecot, root, request, areas=("mail", "events"), link=None)
    bob = build_env(dovecot, root, request, areas=("mail", "events"), link=None)
    os.environ["GWSYNC_TEST_ALICE_WEB"] = ALICE_WEB
    alice.config_path.write_text(
        alice.config_path.read_text() + "\n" + account_tables(bob, "bob")
        + f'\n[serve]\nport = {free_port()}\n\n[serve.users.alice]\npassword_env = "GWSYNC_TEST_ALICE_WEB"\n\n'
        f'[serve.users.bob]\npassword = "{BOB_WEB}"\n')
    alice.append(FOLDER, plain_mail(11, "erika@acme.example", "Rückfrage an Alice"),
                 plain_mail(12, "neu@kunde.example", "Unbekannt an Alice"))
    bob.append(FOLDER, plain_mail(13, "neu@kunde.example", "Unbekannt an Bob"))
    assert alice.cli("partner", "add", "ACME GmbH", "--email", "info@acme.example").exit_code == 0
    assert alice.cli("contact", "add", "Erika Mustermann", "--email", "erika@acme.example",
                     "--partner", "1").exit_code == 0
    synced = alice.cli("sync")
    assert synced.exit_code == 0, synced.output
    from gwsync.crm import ActivityDraft

    with alice.engine() as engine:  # a busy block of bob's (as `[sync] private = "busy"` imports) and a meeting
        engine.create_activity(ActivityDraft(
            key="cal:arzt@team", kind="TERMIN", status="O", subject="Arzttermin Dr. Specht", owner="bob",
            participants=["bob"], private=True, body="Befund mitbringen", location="Praxis Specht",
            start="2026-12-03T09:00:00+01:00[Europe/Berlin]", end="2026-12-03T10:00:00+01:00[Europe/Berlin]"))
        engine.create_activity(ActivityDraft(
            key="crm:jour-fixe", kind="BESPRECHUNG", status="O", subject="Jour fixe", owner="alice",
            participants=["alice"], start="2026-12-04T09:00:00+01:00[Europe/Berlin]",
            end="2026-12-04T10:00:00+01:00[Europe/Berlin]"))
    ids = {a["subject"]: a["id"] for a in alice.cli_json("activities")[1]}
    process, url = start_serve(alice.config_path)
    yield Team(alice=alice, bob=bob, url=url, process=process, ids=ids)
    stop(process)


def test_each_employee_logs_in_with_their_own_password(team):
    anonymous = requests.get(team.url + "/", timeout=10, allow_redirects=False)
    assert anonymous.status_code == 302 and anonymous.headers["Location"].startswith("/login")
    browser = requests.Session()
    page = browser.get(team.url + "/login", timeout=10)
    assert 'name="user"' in page.text
    wrong = browser.post(team.url + "/login", timeout=10, data={  # bob's password is not alice's
        "user": "alice", "password": BOB_WEB, "csrf_token": csrf_token(page.text)})
    assert wrong.status_code == 401 and "Wrong user name or password." in wrong.text
    time.sleep(int(wrong.headers["Retry-After"]))
    unknown = browser.post(team.url + "/login", timeout=10, data={
        "user": "carol", "password": ALICE_WEB, "csrf_token": csrf_token(page.text)})
    assert unknown.status_code == 401 and "Wrong user name or password." in unknown.text
    assert browser.get(team.url + "/", timeout=10, allow_redirects=False).status_code == 302
    time.sleep(int(unknown.headers["Retry-After"]))
    alice = team.login("alice", ALICE_WEB)
    assert "Logged in as alice" in alice.get(team.url + "/", timeout=10).text
    bob = team.login("bob", BOB_WEB)
    assert "Logged in as bob" in bob.get(team.url + "/", timeout=10).text
    # beyond loopback, logins per employee are enough (no shared password needed)
    process, url = start_serve(team.alice.config_path, "--host", "0.0.0.0", "--port", "0")
    try:
        assert requests.get(url.replace("0.0.0.0", "127.0.0.1") + "/", timeout=10,
                            allow_redirects=False).status_code == 302
    finally:
        stop(process)


def test_a_private_item_is_privat_for_everyone_but_its_owner(team):
    alice, bob = team.login("alice", ALICE_WEB), team.login("bob", BOB_WEB)
    target = f"{team.url}/activities/{team.ids['Arzttermin Dr. Specht']}"
    seen = alice.get(target, timeout=10).text
    assert "<h1>Privat</h1>" in seen and "Thu 03 Dec 2026, 09:00 (Europe/Berlin)" in seen
    for secret in ("Arzttermin", "Specht", "Befund"):
        assert secret not in seen and secret not in alice.get(team.url + "/searches/all", timeout=10).text
    owner = bob.get(target, timeout=10).text
    assert "<h1>Arzttermin Dr. Specht</h1>" in owner and "Praxis Specht" in owner and "Befund mitbringen" in owner


def test_searches_per_employee(team):
    def subjects(browser, name):
        page = browser.get(f"{team.url}/searches/{name}", timeout=10)
        assert page.status_code == 200
        return set(re.findall(r'class="subject">([^<]*)<', page.text))

    alice, bob = team.login("alice", ALICE_WEB), team.login("bob", BOB_WEB)
    assert subjects(alice, "mine-today") == {"Rückfrage an Alice", "Unbekannt an Alice"}
    assert subjects(alice, "mine-unassigned") == {"Unbekannt an Alice"}
    assert subjects(bob, "mine-today") == {"Unbekannt an Bob"}
    assert subjects(bob, "mine-unassigned") == {"Unbekannt an Bob"}
    assert subjects(alice, "all") == {"Rückfrage an Alice", "Unbekannt an Alice", "Unbekannt an Bob", "Privat",
                                      "Jour fixe"}
    assert subjects(bob, "all") >= {"Arzttermin Dr. Specht", "Jour fixe"}


def edit_fields(page: str) -> dict:
    """The edit form's fields as the page fills them in."""
    form = {name: html.unescape(value) for name, value in re.findall(r'<input[^>]* name="(\w+)" value="([^"]*)"', page)
            if name != "participants"}
    for name in ("kind", "status", "owner", "delegated_to"):
        chosen = re.search(rf'<select name="{name}".*?<option value="([^"]*)" selected', page, re.DOTALL)
        form[name] = chosen.group(1) if chosen else ""
    form["participants"] = re.findall(r'name="participants" value="([^"]+)" checked', page)
    form["participants_seen"] = re.findall(r'name="participants_seen" value="([^"]+)"', page)
    return form


def test_the_edit_form_changes_an_activity_and_refuses_forgeries_and_unknown_names(team):
    activity = team.ids["Unbekannt an Alice"]
    edit = f"{team.url}/activities/{activity}/edit"
    alice = team.login("alice", ALICE_WEB)
    page = alice.get(edit, timeout=10).text
    form = edit_fields(page)
    assert form["owner"] == "alice" and form["status"] == "O" and form["kind"] == "MAILEIN"

    # without the form's token (another site's page posting here), nothing changes
    no_token = {k: v for k, v in form.items() if k != "csrf_token"} | {"subject": "Gefälscht"}
    forged = alice.post(edit, timeout=10, data=no_token)
    assert forged.status_code == 400 and "Form refused" in forged.text
    # an owner who is no employee: the form again, with one line saying why
    unknown = alice.post(edit, timeout=10, data=form | {"owner": "mallory", "subject": "Neu"})
    assert unknown.status_code == 400
    assert re.findall(r'<p class="error" role="alert">([^<]*)</p>', unknown.text) == [
        "owner &#39;mallory&#39; is not an account (known: alice, bob)."]
    assert 'value="Neu"' in unknown.text
    shown = team.alice.cli_json("activity", "show", str(activity))[1]
    assert (shown["subject"], shown["owner"]) == ("Unbekannt an Alice", "alice")

    done = alice.post(edit, timeout=10, data=form | {
        "kind": "MAILEIN", "status": "E", "subject": "Wartungsvertrag Kunde", "owner": "bob", "delegated_to": "alice",
        "participants": ["alice", "bob"], "request": "Anfrage 2027-14", "project": "Wartung Nord"})
    assert done.status_code == 200 and done.history[0].status_code == 303 and "Saved." in done.text
    shown = team.alice.cli_json("activity", "show", str(activity))[1]
    assert {k: shown[k] for k in ("status", "subject", "owner", "delegated_to", "participants", "request",
                                  "project")} == {
        "status": "E", "subject": "Wartungsvertrag Kunde", "owner": "bob", "delegated_to": "alice",
        "participants": ["bob"], "request": "Anfrage 2027-14", "project": "Wartung Nord"}


def test_push_and_unpush_from_the_page(team):
    activity = team.ids["Jour fixe"]
    target = f"{team.url}/activities/{activity}"
    alice = team.login("alice", ALICE_WEB)
    page = alice.get(target, timeout=10).text
    assert f'action="/activities/{activity}/push"' in page
    no_token = alice.post(target + "/push", timeout=10, data={"area": "events", "account": "alice"})
    assert no_token.status_code == 400 and team.alice.dav_items("events") == {}
    pushed = alice.post(target + "/push", timeout=10, data={"area": "events", "account": "alice",
                                                             "csrf_token": csrf_token(page)})
    assert pushed.status_code == 200 and "Pushed to alice&#39;s events." in pushed.text
    (text,) = [data for _etag, data in team.alice.dav_items("events").values()]
    assert "SUMMARY:Jour fixe" in text and f"/activities/{activity}" in text.replace("\r\n ", "")
    assert "Appointment in alice's events collection" in pushed.text
    assert team.bob.dav_items("events") == {}
    # a name that is no account with a calendar: refused, nothing pushed there
    bad = alice.post(target + "/push", timeout=10, data={"area": "events", "account": "mallory",
                                                          "csrf_token": csrf_token(page)})
    assert bad.status_code == 400 and "mallory" in bad.text
    unpushed = alice.post(target + "/unpush", timeout=10, data={"account": "alice", "csrf_token": csrf_token(page)})
    assert unpushed.status_code == 200 and "Removed 1 calendar item from alice&#39;s calendar." in unpushed.text
    assert team.alice.dav_items("events") == {}
    assert team.alice.cli_json("activity", "show", str(activity))[1]["subject"] == "Jour fixe"  # kept


def test_in_chromium_bob_logs_in_and_edits_an_activity(team, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as arrived
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.wait import WebDriverWait

    activity = team.ids["Unbekannt an Bob"]
    driver = chromium(tmp_path)
    wait = WebDriverWait(driver, 10).until
    try:
        driver.get(f"{team.url}/activities/{activity}/edit")  # to the login first, then back here
        driver.find_element(By.NAME, "user").send_keys("bob")
        driver.find_element(By.NAME, "password").send_keys(BOB_WEB)
        driver.find_element(By.XPATH, "//button[text()='Log in']").click()
        wait(arrived.presence_of_element_located((By.NAME, "subject")))
        assert "Logged in as bob" in driver.page_source
        Select(driver.find_element(By.NAME, "status")).select_by_value("E")
        driver.find_element(By.CSS_SELECTOR, 'input[name="participants"][value="alice"]').click()
        driver.find_element(By.NAME, "project").send_keys("Projekt Süd")
        driver.find_element(By.XPATH, "//button[text()='Save']").click()
        notice = wait(arrived.presence_of_element_located((By.CSS_SELECTOR, ".notice")))
        assert notice.text == "Saved."
        assert driver.find_element(By.TAG_NAME, "h1").text == "Unbekannt an Bob"
        problems = [entry for entry in driver.get_log("browser") if entry["level"] in ("SEVERE", "WARNING")]
        assert problems == []
    finally:
        driver.quit()
    shown = team.alice.cli_json("activity", "show", str(activity))[1]
    assert (shown["status"], shown["participants"], shown["project"]) == ("E", ["bob", "alice"], "Projekt Süd")

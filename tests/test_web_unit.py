"""The web view without a server: HTML sanitising, formatting, and the app through Flask's test client."""

import html.parser
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gwsync.web.app import format_size, human_time, is_loopback
from gwsync.web.sanitize import sanitise_mail_html

TRACKER = "http://tracker.example"


@pytest.mark.parametrize("markup", [
    f"<script>new Image().src='{TRACKER}/s'</script>",
    f"<img src='{TRACKER}/pixel.gif' width=1 height=1>",
    f"<img src=x onerror=\"fetch('{TRACKER}/e')\">",
    f"<img srcset='{TRACKER}/a.gif 1x, {TRACKER}/b.gif 2x'>",
    "<img src='//tracker.example/protocol-relative.gif'>",
    f"<p style=\"background:url({TRACKER}/bg)\">x</p>",
    f"<style>@import url({TRACKER}/c.css); p {{ background: url({TRACKER}/p) }}</style>",
    f"<link rel=stylesheet href='{TRACKER}/c.css'>",
    f"<meta http-equiv=refresh content='0;url={TRACKER}/r'>",
    f"<base href='{TRACKER}/'>",
    f"<table background='{TRACKER}/t.gif'><tr><td background='{TRACKER}/td.gif'>x</td></tr></table>",
    f"<body background='{TRACKER}/body.gif'>x</body>",
    f"<iframe src='{TRACKER}/f'></iframe><object data='{TRACKER}/o'></object><embed src='{TRACKER}/e'>",
    f"<video poster='{TRACKER}/v.jpg'><source src='{TRACKER}/v.mp4'></video><audio src='{TRACKER}/a'>",
    f"<svg><image href='{TRACKER}/svg.gif'/><use href='{TRACKER}/u#x'/></svg>",
    f"<input type=image src='{TRACKER}/i'><form action='{TRACKER}/f'><button>b</button></form>",
    f"<picture><source srcset='{TRACKER}/p.webp'><img src='{TRACKER}/p.jpg'></picture>",
    f"<a href=\"javascript:fetch('{TRACKER}/j')\">x</a><a href='data:text/html,<script>1</script>'>d</a>",
])
def test_nothing_that_loads_or_runs_survives(markup):
    clean = sanitise_mail_html(f"<p>before</p>{markup}<p>after</p>").markup
    assert "tracker.example" not in clean
    assert not re.search(r"<(script|style|link|meta|base|iframe|object|embed|video|audio|svg|form|input)\b", clean)
    assert not re.search(r"\s(on\w+|style|src|srcset|background|poster)\s*=", clean)
    assert "javascript:" not in clean and "data:" not in clean
    assert "<p>before</p>" in clean and "<p>after</p>" in clean


def test_formatting_and_links_stay():
    safe = sanitise_mail_html('<h2>Offer</h2><p>Dear <b>Alice</b>,</p><ul><li>one</li></ul>'
                              '<table><tr><td colspan="2">cell</td></tr></table>'
                              '<a href="https://acme.example/offer">offer</a><img alt="logo" src="cid:logo@x">')
    assert "<h2>Offer</h2><p>Dear <b>Alice</b>,</p><ul><li>one</li></ul>" in safe.markup
    assert '<td colspan="2">cell</td>' in safe.markup
    assert '<a href="https://acme.example/offer" target="_blank" rel="noopener noreferrer">offer</a>' in safe.markup
    assert '<img alt="logo">' in safe.markup and safe.blocked_images == 1


def test_remote_images_only_when_asked_and_nothing_else_loosens():
    markup = (f"<img src='{TRACKER}/a.gif' onerror=alert(1)><img src='https://cdn.example/b.png' srcset='x 2x'>"
              "<img src='javascript:alert(1)'><img src='data:image/png;base64,AAAA'>"
              "<img src='cid:c@x'><img src='/logout'>"
              "<script>1</script><p style='background:url(http://t/x)'>p</p>")
    safe = sanitise_mail_html(markup, remote_images=True)
    assert f'<img src="{TRACKER}/a.gif">' in safe.markup and '<img src="https://cdn.example/b.png">' in safe.markup
    assert safe.markup.count("<img>") == 4 and safe.blocked_images == 4
    assert "onerror" not in safe.markup and "<script" not in safe.markup and "style=" not in safe.markup
    assert "srcset" not in safe.markup and "javascript:" not in safe.markup and "data:" not in safe.markup
    assert sanitise_mail_html(markup).blocked_images == 6


TAGS = ["p", "img", "a", "script", "style", "div", "svg", "iframe", "table", "td", "b", "form", "math", "noscript",
        "template", "textarea", "title", "xmp", "select", "option"]
ATTRS = ["src", "href", "onerror", "onload", "style", "srcset", "background", "poster", "formaction", "action",
         "xlink:href", "data", "alt", "class"]
VALUES = ["http://tracker.example/x", "javascript:alert(1)", "x", "url(http://tracker.example/y)",
          "&#106;avascript:alert(1)", "\"><script>alert(1)</script>"]


@st.composite
def tag_soup(draw):
    parts = []
    for _ in range(draw(st.integers(1, 12))):
        tag = draw(st.sampled_from(TAGS))
        attrs = " ".join(f'{draw(st.sampled_from(ATTRS))}="{draw(st.sampled_from(VALUES))}"'
                         for _ in range(draw(st.integers(0, 3))))
        close = draw(st.sampled_from(["", f"</{tag}>", "/>", "-->", "<!--", "<![CDATA[", "]]>"]))
        parts.append(f"<{tag} {attrs}>{draw(st.text(max_size=8))}{close}")
    return "".join(parts)


class _Elements(html.parser.HTMLParser):
    """The tags and attributes a browser would build from the markup (text is only text)."""

    def __init__(self, markup: str):
        super().__init__(convert_charrefs=True)
        self.found: list[tuple[str, list[tuple[str, str | None]]]] = []
        self.feed(markup)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.found.append((tag, attrs))


@settings(max_examples=300, deadline=None)
@given(tag_soup())
def test_no_tag_soup_gets_script_handlers_or_remote_loads_through(markup):
    for tag, attrs in _Elements(sanitise_mail_html(markup).markup).found:
        assert tag not in ("script", "style", "svg", "iframe", "form", "math", "textarea", "select", "title",
                           "xmp", "noscript", "template"), tag
        for name, value in attrs:
            assert not name.startswith("on") and name not in (
                "style", "src", "srcset", "background", "poster", "formaction", "action", "xlink:href", "data"), name
            if name in ("alt", "title"):
                continue  # shown as text, never loaded or run
            value = (value or "").lower()
            assert "javascript:" not in value
            # the tracker's address may remain only as a link the reader has to click
            assert "tracker.example" not in value or (tag, name) == ("a", "href"), (tag, name, value)


@pytest.mark.parametrize("stored, shown", [
    ("2026-12-02T14:00:00+01:00[Europe/Berlin]", "Wed 02 Dec 2026, 14:00 (Europe/Berlin)"),
    ("2026-12-03", "Thu 03 Dec 2026"),
    ("2026-12-02T10:00:00", "Wed 02 Dec 2026, 10:00"),
    ("not a time", "not a time"),
    (None, ""),
])
def test_times_are_shown_for_people(stored, shown):
    assert human_time(stored) == shown


def test_utc_stamps_are_shown_in_local_time(monkeypatch):
    import time

    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    try:
        assert human_time("2026-11-24T08:12:00+00:00") == "Tue 24 Nov 2026, 09:12"
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_sizes_and_loopback():
    assert [format_size(n) for n in (0, 1023, 16 * 1024 + 6, 5 << 20)] == ["0 bytes", "1023 bytes", "16.0 KB", "5.0 MB"]
    assert all(is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.5", "crm.example.com"))


def test_a_broken_database_gives_an_error_page_not_a_traceback(tmp_path):
    from gwsync.config import parse_config
    from gwsync.web.app import create_app

    (tmp_path / "crm.db").mkdir()  # a directory where the database should be: SQLite cannot open it
    config = parse_config({"crm": {"database": str(tmp_path / "crm.db")},
                           "state": {"database": str(tmp_path / "state.db")}})
    app = create_app(config, b"k" * 32)
    app.logger.disabled = True
    response = app.test_client().get("/activities/1", headers={"Host": "127.0.0.1:8765"})
    assert response.status_code == 500
    assert b"Something went wrong" in response.data and b"Traceback" not in response.data


def test_the_stores_open_once_per_process_and_serve_threads_at_once(tmp_path, monkeypatch):
    """Opening both stores cost about 9 ms a request: the app opens them at its first request
    and every request (from waitress's threads, here four at once) gets an Engine on them."""
    import threading

    from gwsync.crm import ActivityDraft
    from gwsync.engine import Engine

    config, app = web_app(tmp_path)
    with Engine(config) as engine:
        engine.crm.create_activities([ActivityDraft(key=f"k{n}", kind="TERMIN", status="O", subject=f"Termin {n}")
                                      for n in range(3)])
    opened = []
    real_init = Engine.__init__

    def counting_init(self, *args, **kwargs):
        opened.append(threading.get_ident())
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "__init__", counting_init)
    answers: list[tuple[int, bool]] = []

    def reader(n: int) -> None:
        client = app.test_client()
        for i in range(10):
            page = client.get(f"/activities/{(n + i) % 3 + 1}")
            answers.append((page.status_code, f"Termin {(n + i) % 3}" in page.text))
            answers.append((client.get("/").status_code, True))

    threads = [threading.Thread(target=reader, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == [(200, True)] * 80
    assert len(opened) == 1
    app.extensions["gwsync.stores"].close()


def test_stores_that_could_not_be_opened_are_tried_again_at_the_next_request(tmp_path):
    config, app = web_app(tmp_path)
    app.logger.disabled = True
    (tmp_path / "crm.db").mkdir()  # SQLite cannot open a directory
    client = app.test_client()
    assert client.get("/").status_code == 500
    (tmp_path / "crm.db").rmdir()
    assert client.get("/").status_code == 200
    app.extensions["gwsync.stores"].close()


def test_summary_links_point_at_the_quick_searches_only_when_the_links_point_at_the_web_view():
    from gwsync.crm.searches import summary_links
    from gwsync.mail.importer import ImportedActivity

    assigned = ImportedActivity(id=1, link="l", subject="s", folder="f")
    unknown = ImportedActivity(id=2, link="l", subject="s", folder="f", unassigned=True)
    base = "http://127.0.0.1:8765"
    assert summary_links(base, [assigned]) == [f"imported today: {base}/searches/today"]
    assert summary_links(base, [assigned, unknown]) == [f"imported today: {base}/searches/today",
                                                         f"unassigned: {base}/searches/unassigned"]
    assert summary_links(None, [unknown]) == [] and summary_links(base, []) == []


# -- the edges of the app: redirects after login, hosts, ids and pages, wrong passwords ------

PASSWORD = "s3cret"
C0_AND_SPACE = "".join(map(chr, range(0x21)))


def web_app(tmp_path, password: str | None = None):
    """The app over an empty CRM, forms without CSRF tokens (the server tests check those)."""
    from gwsync.config import parse_config
    from gwsync.web.app import create_app

    config = parse_config({"crm": {"database": str(tmp_path / "crm.db")},
                           "state": {"database": str(tmp_path / "state.db")}})
    app = create_app(config, b"k" * 32, password)
    app.config["WTF_CSRF_ENABLED"] = False
    return config, app


def assert_stays_here(location: str) -> None:
    """A Location a browser follows to a path of this site: neither urllib nor a browser's reading
    (which drops tabs and newlines, trims control characters and takes '\\' for '/') finds a
    scheme or another host in it."""
    from urllib.parse import urlsplit

    assert location.startswith("/") and location.isprintable(), repr(location)
    browser = re.sub(r"[\t\n\r]", "", location.strip(C0_AND_SPACE)).replace("\\", "/")
    for read in (urlsplit(location), urlsplit(browser)):
        assert not read.scheme and not read.netloc, (location, read)


@pytest.mark.parametrize("query", [
    "next=/%09/evil.example", "next=/%0d%0a/evil.example", "next=/%0a/evil.example", "next=%09//evil.example",
    "next=//evil.example", "next=/%5C%5Cevil.example", "next=/%5Cevil.example", "next=%5C%5Cevil.example",
    "next=/%2F%2Fevil.example", "next=https:evil.example", "next=https://evil.example/", "next=javascript:alert(1)",
    "next=/%0d%0aSet-Cookie:%20x=1", "next=/%00/evil.example", "next=/%7F/evil.example", "next=evil.example",
    "next=/%C2%85/evil.example", "next=%20/",
])
def test_after_login_a_hostile_next_leads_to_the_start_page(tmp_path, query):
    _config, app = web_app(tmp_path, PASSWORD)
    client = app.test_client()
    form = client.get(f"/login?{query}")
    assert form.status_code == 200 and 'name="next" value="/"' in form.text
    logged_in = client.post(f"/login?{query}", data={"password": PASSWORD})
    assert logged_in.status_code == 303 and logged_in.headers["Location"] == "/"


@pytest.mark.parametrize("target", ["/activities/12?images=remote", "/searches/today?page=2", "/unknown#neu",
                                    "/%2F%2Fevil.example", "/searches/Rückfrage"])
def test_after_login_a_local_next_is_kept(tmp_path, target):
    _config, app = web_app(tmp_path, PASSWORD)
    logged_in = app.test_client().post("/login", data={"password": PASSWORD, "next": target})
    assert logged_in.status_code == 303
    assert logged_in.headers["Location"] in (target, target.replace("ü", "%C3%BC"))
    assert_stays_here(logged_in.headers["Location"])


NEXT_PIECES = ["/", "//", "\\", "\t", "\r", "\n", " ", "\x00", "\x0b", "\x7f", "\x85", "\u2028", "\u3000", ".", ":",
               "@", "?", "#", "%", "%2F", "%5C", "%09", "https:", "http://", "javascript:", "evil.example", "ü"]


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(NEXT_PIECES) | st.text(max_size=3), max_size=8).map("".join))
def test_after_login_the_redirect_never_leaves_the_site(tmp_path_factory, target):
    _config, app = web_app(tmp_path_factory.mktemp("next"), PASSWORD)
    for request in ({"data": {"password": PASSWORD, "next": target}},
                    {"data": {"password": PASSWORD}, "query_string": {"next": target}}):
        logged_in = app.test_client().post("/login", **request)
        assert logged_in.status_code == 303
        assert_stays_here(logged_in.headers["Location"])


@pytest.mark.parametrize("host, status", [
    ("[::1]:8765", 200), ("[::1]", 200), ("127.0.0.1:8765", 200), ("localhost:8765", 200), ("127.0.0.2:8765", 200),
    ("evil.example:8765", 400), ("evil.example", 400), ("[::2]:8765", 400), ("192.168.1.5:8765", 400),
    ("[::1]:8765@evil.example", 400), ("", 400),
])
def test_without_a_password_only_loopback_host_names_are_answered(tmp_path, host, status):
    _config, app = web_app(tmp_path)
    app.logger.disabled = True
    response = app.test_client().get("/held", headers={"Host": host})
    assert response.status_code == status, response.text
    if status == 400:
        assert "only to its own address" in response.text and "held" not in response.text.lower()


BIG = "99999999999999999999999999"


def test_out_of_range_ids_and_pages_are_not_found_not_a_server_error(tmp_path):
    from gwsync.engine import Engine

    config, app = web_app(tmp_path)
    app.logger.disabled = True
    with Engine(config) as engine:
        partner = engine.crm.add_partner("ACME GmbH", ["info@acme.example"])
        contact = engine.crm.add_contact("Erika", "erika@acme.example", partner.id)
    client = app.test_client()
    for path in (f"/activities/{BIG}", f"/activities/{2 ** 63}", f"/activities/1/documents/{BIG}",
                 f"/activities/{BIG}/documents/1", f"/partners/{BIG}", f"/contacts/{BIG}", "/activities/-1"):
        assert client.get(path).status_code == 404, path
    assert client.get(f"/activities/{2 ** 63 - 1}").status_code == 404  # the largest id: looked up, not there
    for path in ("/searches/today", f"/partners/{partner.id}", f"/contacts/{contact.id}"):
        assert client.get(path).status_code == 200, path
        assert client.get(f"{path}?page=1").status_code == 200, path
        for page in (BIG, "2", "0", "-3", "x", "1e3"):
            response = client.get(f"{path}?page={page}")
            assert response.status_code in (400, 404), (path, page)
            assert "page" in response.text, (path, page)


def test_the_assign_form_refuses_out_of_range_ids(tmp_path):
    from gwsync.engine import Engine

    config, app = web_app(tmp_path)
    app.logger.disabled = True
    with Engine(config) as engine:
        engine.crm.add_contact("Erika", "erika@acme.example")
    client = app.test_client()
    for form, says in (({"contact": f"#{BIG} Nobody"}, "no contact"),
                       ({"contact": f"#{2 ** 63} Nobody"}, "no contact"),
                       ({"new_contact": "Nina", "partner_id": BIG}, "no partner"),
                       ({"new_contact": "Nina", "partner_id": "-1"}, "no partner"),
                       ({"new_contact": "Nina", "partner_id": "ACME"}, "no partner")):
        response = client.post("/unknown/assign", data={"email": "neu@kunde.example", **form})
        assert response.status_code == 400 and says in response.text, form
    with Engine(config) as engine:
        assert [c.name for c in engine.crm.list_contacts()] == ["Erika"]


def test_a_wrong_password_makes_the_next_try_wait_without_a_sleeping_server(tmp_path):
    import time

    _config, app = web_app(tmp_path, PASSWORD)
    client = app.test_client()
    assert client.head("/login").status_code == 200 and client.get("/login").status_code == 200  # no tries
    started = time.monotonic()
    wrong = client.post("/login", data={"password": "guess"})
    assert time.monotonic() - started < 0.5  # answered at once; the wait is the guesser's
    assert wrong.status_code == 401 and "Wrong password" in wrong.text and wrong.headers["Retry-After"] == "1"
    # the right password, too early: refused without being checked
    early = client.post("/login", data={"password": PASSWORD, "next": "/held"})
    assert early.status_code == 429 and early.headers["Retry-After"] == "1"
    assert "try again in 1 s" in early.text
    assert client.get("/held").status_code == 302  # still not logged in
    # another client is not held up by this one
    other = app.test_client().post("/login", data={"password": PASSWORD},
                                   environ_overrides={"REMOTE_ADDR": "127.0.0.9"})
    assert other.status_code == 303


def test_wrong_passwords_double_the_wait_per_client_in_bounded_memory():
    from gwsync.web.app import LoginThrottle

    now = [1000.0]
    throttle = LoginThrottle(first=1, most=8, forget=600, size=3, clock=lambda: now[0])
    assert throttle.begin("10.0.0.1") == 0  # a try: checked, and wrong until passed() says otherwise
    waits = [throttle.begin("10.0.0.1")]  # the next one, at once: refused
    for _ in range(5):
        now[0] += waits[-1]
        assert throttle.begin("10.0.0.1") == 0  # its turn
        waits.append(throttle.begin("10.0.0.1"))
    assert waits == [1, 2, 4, 8, 8, 8]  # doubling, up to `most`
    assert throttle.begin("10.0.0.2") == 0  # others are not held
    now[0] += 8 + 600  # a long quiet while: the count starts over
    assert throttle.begin("10.0.0.1") == 0 and throttle.begin("10.0.0.1") == 1
    # one IPv6 network (/64) is one client: new addresses from it do not start over
    assert throttle.begin("2001:db8::1") == 0
    assert throttle.begin("2001:db8::2") == 1 and throttle.begin("2001:db8:0:1::1") == 0
    assert len(throttle) == 3  # the oldest client is forgotten first
    now[0] += 1
    assert throttle.begin("2001:db8::1") == 0
    throttle.passed("2001:db8::1")  # the right password: a clean slate
    assert throttle.begin("2001:db8::1") == 0


def test_the_activity_page_shows_the_senders_name_to_and_cc_and_assigns_outgoing_mail_by_its_recipient(tmp_path):
    from gwsync.crm import ActivityDraft
    from gwsync.engine import Engine

    config, app = web_app(tmp_path)
    with Engine(config) as engine:
        incoming, outgoing = engine.crm.create_activities([
            ActivityDraft(key="in", kind="MAILEIN", status="I", subject="Anfrage", sender="erika@acme.example",
                          sender_name="Mustermann, Erika <script>", recipients_to=["alice@firma.example"],
                          recipients_cc=["bob@firma.example", "buha@acme.example"]),
            ActivityDraft(key="out", kind="MAILAUS", status="I", subject="Angebot", sender="alice@firma.example",
                          sender_name="Alice", recipients_to=["neu@kunde.example", "zweit@kunde.example"],
                          unassigned=True, source="alice:INBOX/CRM Neu [I]")])
    client = app.test_client()
    page = client.get(f"/activities/{incoming}").text
    assert "Mustermann, Erika &lt;script&gt; &lt;erika@acme.example&gt;" in page
    assert re.search(r"<dt>To</dt><dd>alice@firma.example</dd>", page)
    assert re.search(r"<dt>Cc</dt><dd>bob@firma.example, buha@acme.example</dd>", page)
    page = client.get(f"/activities/{outgoing}").text
    assert re.search(r"<dt>To</dt><dd>neu@kunde.example <span class=\"warn\">unassigned</span> · "
                     r"<a href=\"/unknown#neu@kunde.example\">assign</a>, zweit@kunde.example</dd>", page)
    assert "/unknown#alice@firma.example" not in page
    listed = client.get("/searches/unassigned").text
    assert "to neu@kunde.example" in listed and "alice@firma.example" not in listed
    with Engine(config) as engine:
        engine.crm.update_activity(incoming, {"unassigned": True})
    page = client.get(f"/activities/{incoming}").text
    assert re.search(r"<dt>From</dt><dd>Mustermann, Erika &lt;script&gt; &lt;erika@acme.example&gt; "
                     r"<span class=\"warn\">unassigned</span> · "
                     r"<a href=\"/unknown#erika@acme.example\">assign</a></dd>", page)


# -- a team: a login per employee, private items, their searches, the edit form -----------------

ALICE_PW, BOB_PW = "alice s3cret", "bob s3cret"


def team_data(tmp_path, users: dict | None = None, **serve) -> dict:
    """alice and bob, each with their own login to the web view (`users`; {}: none)."""
    users = {"alice": {"password": ALICE_PW}, "bob": {"password": BOB_PW}} if users is None else users
    account = {"areas": ["mail"]}
    return {"crm": {"database": str(tmp_path / "crm.db")}, "state": {"database": str(tmp_path / "state.db")},
            "accounts": {name: account | {"imap": {"host": "127.0.0.1", "username": f"{name}@firma.example",
                                                   "password": "imap"}} for name in ("alice", "bob")},
            "serve": serve | ({"users": users} if users != {} else {})}


def team_app(tmp_path):
    """The app for alice and bob, each with their own password; forms without CSRF tokens."""
    from gwsync.config import parse_config
    from gwsync.web.app import create_app

    config = parse_config(team_data(tmp_path))
    app = create_app(config, b"k" * 32, users={"alice": ALICE_PW, "bob": BOB_PW})
    app.config["WTF_CSRF_ENABLED"] = False
    return config, app


def logged_in(app, user: str, password: str, address: str = "127.0.0.1"):
    client = app.test_client()
    client.environ_base["REMOTE_ADDR"] = address
    answer = client.post("/login", data={"user": user, "password": password})
    assert answer.status_code == 303, answer.text
    return client


def test_serve_users_are_accounts_each_with_one_password_source(tmp_path, monkeypatch):
    from gwsync.config import ConfigError, parse_config

    monkeypatch.setenv("ALICE_WEB", ALICE_PW)
    config = parse_config(team_data(tmp_path, {"alice": {"password_env": "ALICE_WEB"},
                                               "bob": {"password_command": ["echo", BOB_PW]}}))
    assert sorted(config.serve.users) == ["alice", "bob"] and config.serve.secret is None
    assert config.serve.users["alice"].secret.resolve() == ALICE_PW
    assert config.serve.users["bob"].secret.resolve() == BOB_PW
    assert config.serve.users["bob"].secret.where == "serve.users.bob"
    refused = {
        "serve.users.carol: no account 'carol' in [accounts] (known: alice, bob); each web user is an employee":
            team_data(tmp_path, {"carol": {"password": "x"}}),
        "serve.users.alice: set password_command, password_env, password_keyring or password":
            team_data(tmp_path, {"alice": {}}),
        "serve.users.alice: set only one of password_command, password_env, password_keyring, password "
        "(found password_env, password)": team_data(tmp_path, {"alice": {"password_env": "A", "password": "x"}}),
        "unknown key serve.users.alice.user (check the spelling against the README)":
            team_data(tmp_path, {"alice": {"password": "x", "user": "alice"}}),
        "serve: set either one shared password (password_command, password_env, password_keyring or password) "
        "or [serve.users.NAME] tables, not both": team_data(tmp_path, password="shared"),
    }
    for message, data in refused.items():
        with pytest.raises(ConfigError) as caught:
            parse_config(data)
        assert str(caught.value) == message
        assert "\n" not in str(caught.value)


def test_each_employee_logs_in_as_themselves(tmp_path):
    _config, app = team_app(tmp_path)
    form = app.test_client().get("/login")
    assert 'name="user"' in form.text and 'name="password"' in form.text
    alice = logged_in(app, "alice", ALICE_PW)
    assert "Logged in as alice" in alice.get("/").text
    bob = logged_in(app, "bob", BOB_PW, "127.0.0.2")
    assert "Logged in as bob" in bob.get("/").text
    for number, (user, password) in enumerate([("alice", BOB_PW), ("bob", ALICE_PW), ("carol", ALICE_PW),
                                               ("", ALICE_PW), ("alice", "")]):
        client = app.test_client()
        client.environ_base["REMOTE_ADDR"] = f"127.0.1.{number}"  # each a client of its own: no throttle
        wrong = client.post("/login", data={"user": user, "password": password})
        assert wrong.status_code == 401 and "Wrong user name or password" in wrong.text, (user, password)
        assert client.get("/").status_code == 302
    # the same throttle per client as for one password
    client = app.test_client()
    client.environ_base["REMOTE_ADDR"] = "127.0.2.1"
    assert client.post("/login", data={"user": "alice", "password": "guess"}).status_code == 401
    early = client.post("/login", data={"user": "alice", "password": ALICE_PW})
    assert early.status_code == 429 and client.get("/").status_code == 302


def test_a_session_of_one_shared_password_does_not_open_a_team_view(tmp_path):
    """A cookie signed with the same key but made for another login (the shared password, or a
    user whose password changed) is not a login."""
    from gwsync.config import parse_config
    from gwsync.web.app import create_app

    config = parse_config(team_data(tmp_path))
    shared = create_app(parse_config(team_data(tmp_path, {}, password=ALICE_PW)), b"k" * 32, ALICE_PW)
    shared.config["WTF_CSRF_ENABLED"] = False
    cookie_client = shared.test_client()
    assert cookie_client.post("/login", data={"password": ALICE_PW}).status_code == 303
    team = create_app(config, b"k" * 32, users={"alice": "changed", "bob": BOB_PW})
    moved = team.test_client()
    name = next(iter(cookie_client._cookies))[2]
    moved.set_cookie(name, cookie_client.get_cookie(name).value)
    assert moved.get("/").status_code == 302
    before = create_app(config, b"k" * 32, users={"alice": ALICE_PW, "bob": BOB_PW})
    before.config["WTF_CSRF_ENABLED"] = False
    old = logged_in(before, "alice", ALICE_PW)
    assert old.get("/").status_code == 200
    moved.set_cookie(name, old.get_cookie(name).value)
    assert moved.get("/").status_code == 302  # alice's password changed: her old session is over


def seed_team(config) -> dict[str, int]:
    """Activities of alice and bob: imported mail (today), a private appointment of bob's with a
    document, a meeting of both."""
    from gwsync.crm import ActivityDraft, Attendee, Document
    from gwsync.engine import Engine

    def mail(key, owner, subject, unassigned=False, participants=()):
        return ActivityDraft(key=key, kind="MAILEIN", status="I", subject=subject, sender=f"{key}@kunde.example",
                             unassigned=unassigned, source=f"{owner}:INBOX/CRM Neu [I]", owner=owner,
                             participants=[owner, *participants], body=f"Text of {subject}")

    with Engine(config) as engine:
        sha, size = engine.crm.put_document(iter([b"%PDF Befund"]))
        drafts = {
            "alice-mail": mail("a1", "alice", "Anfrage an Alice"),
            "alice-unassigned": mail("a2", "alice", "Unbekannt an Alice", unassigned=True),
            "bob-unassigned": mail("b1", "bob", "Unbekannt an Bob", unassigned=True),
            "shared-mail": mail("s1", "bob", "An beide", participants=("alice",)),
            "private": ActivityDraft(
                key="cal:arzt", kind="TERMIN", status="O", subject="Arzttermin Dr. Specht", body="Befund mitbringen",
                location="Praxis Specht", owner="bob", participants=["bob"], private=True, request="Kur 2027",
                start="2026-12-03T09:00:00+00:00", end="2026-12-03T10:00:00+00:00",
                attendees=[Attendee(email="praxis@specht.example", name="Praxis Specht")],
                documents=[Document(filename="Befund.pdf", content_type="application/pdf", size=size, sha256=sha)]),
            "meeting": ActivityDraft(key="cal:jour", kind="BESPRECHUNG", status="O", subject="Jour fixe",
                                     owner="alice", participants=["alice", "bob"], start="2026-12-04T09:00:00+00:00"),
        }
        return dict(zip(drafts, engine.crm.create_activities(list(drafts.values())), strict=True))


SECRETS = ("Arzttermin", "Specht", "Befund", "Kur 2027")


def test_a_private_item_shows_its_details_only_to_its_owner(tmp_path):
    config, app = team_app(tmp_path)
    ids = seed_team(config)
    alice, bob = logged_in(app, "alice", ALICE_PW), logged_in(app, "bob", BOB_PW, "127.0.0.2")
    page = alice.get(f"/activities/{ids['private']}")
    assert page.status_code == 200 and "<h1>Privat</h1>" in page.text
    assert "Thu 03 Dec 2026" in page.text and "09:00" in page.text and "10:00" in page.text  # the times stay
    assert "<dt>Contact</dt>" not in page.text and "only bob sees its details" in page.text
    for secret in SECRETS:
        assert secret not in page.text, secret
    assert alice.get(f"/activities/{ids['private']}/documents/1").status_code == 404
    for listing in ("/searches/all", "/searches/imported"):
        assert not any(secret in alice.get(listing).text for secret in SECRETS), listing
    assert "Privat" in alice.get("/searches/all").text
    # its owner sees everything
    page = bob.get(f"/activities/{ids['private']}").text
    assert all(secret in page for secret in SECRETS) and "praxis@specht.example" in page
    assert bob.get(f"/activities/{ids['private']}/documents/1").data == b"%PDF Befund"
    assert "Arzttermin Dr. Specht" in bob.get("/searches/all").text
    # nobody can edit or push another's private item (the form would show its details)
    assert alice.get(f"/activities/{ids['private']}/edit").status_code == 403
    refused = alice.post(f"/activities/{ids['private']}/edit", data={"subject": "x"})
    assert refused.status_code == 403
    assert alice.post(f"/activities/{ids['private']}/push", data={"area": "events"}).status_code == 403
    assert "Arzttermin Dr. Specht" in bob.get(f"/activities/{ids['private']}/edit").text


def subjects(client, path: str) -> set[str]:
    page = client.get(path)
    assert page.status_code == 200, (path, page.text)
    return set(re.findall(r'class="subject">([^<]*)<', page.text))


def test_each_employee_has_their_own_searches(tmp_path):
    config, app = team_app(tmp_path)
    seed_team(config)
    alice, bob = logged_in(app, "alice", ALICE_PW), logged_in(app, "bob", BOB_PW, "127.0.0.2")
    assert subjects(alice, "/searches/mine-today") == {"Anfrage an Alice", "Unbekannt an Alice", "An beide"}
    assert subjects(alice, "/searches/mine-unassigned") == {"Unbekannt an Alice"}
    assert subjects(bob, "/searches/mine-today") == {"Unbekannt an Bob", "An beide"}
    assert subjects(bob, "/searches/mine-unassigned") == {"Unbekannt an Bob"}
    everything = {"Anfrage an Alice", "Unbekannt an Alice", "Unbekannt an Bob", "An beide", "Privat", "Jour fixe"}
    assert subjects(alice, "/searches/all") == everything
    assert subjects(alice, "/searches/unassigned") == {"Unbekannt an Alice", "Unbekannt an Bob"}  # the team's
    index = alice.get("/").text
    assert re.search(r'My imports today</a> <span class="count">3<', index)
    assert re.search(r'My unassigned mail</a> <span class="count">1<', index)
    assert re.search(r'All activities</a> <span class="count">6<', index)


def test_with_one_account_and_no_users_mine_is_that_account(tmp_path):
    from gwsync.config import parse_config
    from gwsync.web.app import create_app

    data = team_data(tmp_path, {})
    del data["accounts"]["bob"]
    config = parse_config(data)
    from gwsync.crm import ActivityDraft
    from gwsync.engine import Engine

    with Engine(config) as engine:
        engine.crm.create_activities([ActivityDraft(key="p", kind="TERMIN", status="O", subject="Zahnarzt",
                                                    owner="alice", private=True)])
    client = create_app(config, b"k" * 32).test_client()
    assert subjects(client, "/searches/all") == {"Zahnarzt"}  # the only employee is the owner
    assert client.get("/searches/mine-today").status_code == 200


def test_with_several_accounts_and_no_users_private_items_stay_private(tmp_path):
    from gwsync.config import parse_config
    from gwsync.web.app import create_app

    config = parse_config(team_data(tmp_path, {}))
    ids = seed_team(config)
    client = create_app(config, b"k" * 32).test_client()
    assert "Arzttermin" not in client.get(f"/activities/{ids['private']}").text
    assert client.get("/searches/mine-today").status_code == 404  # nobody to be "me"
    assert "My imports today" not in client.get("/").text


def edit_form(client, activity_id: int) -> dict:
    """The edit form's fields as the page fills them in."""
    page = client.get(f"/activities/{activity_id}/edit")
    assert page.status_code == 200, page.text
    form = {name: html.unescape(value)
            for name, value in re.findall(r'<input[^>]* name="(\w+)" value="([^"]*)"', page.text)}
    for name in ("kind", "status", "owner", "delegated_to"):
        chosen = re.search(rf'<select name="{name}".*?<option value="([^"]*)" selected', page.text, re.DOTALL)
        form[name] = chosen.group(1) if chosen else ""
    form["participants"] = re.findall(r'name="participants" value="([^"]+)" checked', page.text)
    form["participants_seen"] = re.findall(r'name="participants_seen" value="([^"]+)"', page.text)
    return form


def test_the_edit_form_changes_the_fields_through_the_engine(tmp_path):
    from gwsync.engine import Engine

    config, app = team_app(tmp_path)
    ids = seed_team(config)
    alice = logged_in(app, "alice", ALICE_PW)
    form = edit_form(alice, ids["meeting"])
    assert form["kind"] == "BESPRECHUNG" and form["owner"] == "alice" and form["participants"] == ["alice", "bob"]
    form.update(kind="AUFGABE", status="E", subject="Jour fixe <neu>", owner="bob", delegated_to="alice",
                participants=["alice", "bob"], request="Anfrage 12", project="Projekt Nord")
    sent = alice.post(f"/activities/{ids['meeting']}/edit", data=form)
    assert sent.status_code == 303 and sent.headers["Location"] == f"/activities/{ids['meeting']}"
    assert "Saved." in alice.get(sent.headers["Location"]).text
    with Engine(config) as engine:
        a = engine.activity(ids["meeting"])
    assert (a.kind, a.status, a.subject, a.owner, a.delegated_to, a.request, a.project) == (
        "AUFGABE", "E", "Jour fixe <neu>", "bob", "alice", "Anfrage 12", "Projekt Nord")
    # the new owner replaced the old one among the participants, who was ticked only as the owner
    assert a.participants == ["bob"]
    assert (a.start, a.body) == ("2026-12-04T09:00:00+00:00", "")  # what the form does not hold stays
    # cleared fields
    form = edit_form(alice, ids["meeting"])
    form.update(delegated_to="", request="", project="", participants=["bob", "alice"])
    assert alice.post(f"/activities/{ids['meeting']}/edit", data=form).status_code == 303
    with Engine(config) as engine:
        a = engine.activity(ids["meeting"])
    assert (a.delegated_to, a.request, a.project, a.participants) == (None, None, None, ["bob", "alice"])


def test_the_edit_form_refuses_bad_input_with_one_line_and_changes_nothing(tmp_path):
    from gwsync.engine import Engine

    config, app = team_app(tmp_path)
    ids = seed_team(config)
    alice = logged_in(app, "alice", ALICE_PW)
    good = edit_form(alice, ids["meeting"])
    with Engine(config) as engine:
        before = engine.activity(ids["meeting"])
    for change, says in (({"owner": "mallory"}, "owner &#39;mallory&#39; is not an account (known: alice, bob)"),
                         ({"owner": ""}, "owner &#39;&#39; is not an account (known: alice, bob)"),
                         ({"delegated_to": "carol"}, "delegate &#39;carol&#39; is not an account"),
                         ({"participants": ["alice", "eve"]}, "participant &#39;eve&#39; is not an account"),
                         ({"status": "Z"}, "status &#39;Z&#39; is not one of I, O, E, S"),
                         ({"kind": "ZAUBEREI"}, "kind &#39;ZAUBEREI&#39; is not one of"),
                         ({"subject": "x" * 2000}, "subject is longer than"),
                         ({"updated_at": "2001-01-01T00:00:00+00:00"}, "changed since you opened this form")):
        refused = alice.post(f"/activities/{ids['meeting']}/edit", data=good | change | {"request": "R-99"})
        assert refused.status_code in (400, 409), change
        errors = re.findall(r'<p class="error" role="alert">([^<]*)</p>', refused.text)
        assert len(errors) == 1 and says in errors[0], (change, errors)
        assert 'value="R-99"' in refused.text  # the form again, as it was sent
    with Engine(config) as engine:
        assert engine.activity(ids["meeting"]) == before
    assert alice.post("/activities/999/edit", data=good).status_code == 404


def test_push_and_unpush_refuse_what_names_no_calendar(tmp_path):
    config, app = team_app(tmp_path)  # alice and bob sync mail only: no calendar to push to
    ids = seed_team(config)
    alice = logged_in(app, "alice", ALICE_PW)
    page = alice.get(f"/activities/{ids['meeting']}").text
    assert f'href="/activities/{ids["meeting"]}/edit"' in page and "/push" not in page
    for path, form, says in (("push", {"area": "events", "account": "alice"}, "Push: &#39;alice&#39; is not an "
                              "account with a calendar (known: none)."),
                             ("push", {"area": "journal", "account": "alice"}, "Push: &#39;journal&#39; is neither "
                              "events nor tasks."),
                             ("unpush", {"account": "bob"}, "Unpush: &#39;bob&#39; is not an account with a calendar")):
        refused = alice.post(f"/activities/{ids['meeting']}/{path}", data=form)
        assert refused.status_code == 400 and says in refused.text, (path, form)
    assert alice.post("/activities/999/push", data={"area": "events", "account": "alice"}).status_code == 404


def test_the_edit_form_keeps_a_participant_a_sync_added_after_it_was_opened(tmp_path):
    from gwsync.engine import Engine

    config, app = team_app(tmp_path)
    ids = seed_team(config)
    alice = logged_in(app, "alice", ALICE_PW)
    form = edit_form(alice, ids["alice-mail"])
    assert form["participants"] == form["participants_seen"] == ["alice"]
    with Engine(config) as engine:  # bob files the same mail meanwhile: his sync adds him (updated_at stays)
        assert engine.crm.add_participant(ids["alice-mail"], "bob")
    assert alice.post(f"/activities/{ids['alice-mail']}/edit", data=form | {"status": "E"}).status_code == 303
    with Engine(config) as engine:
        a = engine.activity(ids["alice-mail"])
    assert (a.status, a.participants) == ("E", ["alice", "bob"])
    # what the reader unticks goes; the owner stays one whatever the boxes say
    form = edit_form(alice, ids["alice-mail"])
    assert alice.post(f"/activities/{ids['alice-mail']}/edit", data=form | {"participants": []}).status_code == 303
    with Engine(config) as engine:
        assert engine.activity(ids["alice-mail"]).participants == ["alice"]


def test_the_edit_form_keeps_a_participant_a_sync_adds_while_it_is_saved(tmp_path, monkeypatch):
    """The form's ticks go to the Engine as names added and removed, each step atomic, and the
    owner's rule is the Engine's: a participant that carol's sync adds between the form's check
    and its write stays (a whole list written from what the form read would drop her)."""
    from gwsync.config import parse_config
    from gwsync.engine import Engine
    from gwsync.web.app import create_app

    data = team_data(tmp_path)
    data["accounts"]["carol"] = data["accounts"]["bob"] | {"imap": data["accounts"]["bob"]["imap"] |
                                                           {"username": "carol@firma.example"}}
    config = parse_config(data)
    app = create_app(config, b"k" * 32, users={"alice": ALICE_PW, "bob": BOB_PW})
    app.config["WTF_CSRF_ENABLED"] = False
    ids = seed_team(config)
    alice = logged_in(app, "alice", ALICE_PW)
    form = edit_form(alice, ids["alice-mail"])
    assert form["participants"] == form["participants_seen"] == ["alice"]
    real_update = Engine.update_activity

    def carol_files_it_meanwhile(self, *args, **kwargs):
        with Engine(config) as other:
            other.crm.add_participant(ids["alice-mail"], "carol")
        return real_update(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "update_activity", carol_files_it_meanwhile)
    sent = alice.post(f"/activities/{ids['alice-mail']}/edit", data=form | {"participants": ["alice", "bob"]})
    assert sent.status_code == 303
    monkeypatch.undo()
    with Engine(config) as engine:
        assert sorted(engine.activity(ids["alice-mail"]).participants) == ["alice", "bob", "carol"]
    # a new owner replaces the old one, by the Engine's rule; what is ticked anew joins, the rest stays
    form = edit_form(alice, ids["alice-mail"])
    sent = alice.post(f"/activities/{ids['alice-mail']}/edit",
                      data=form | {"owner": "bob", "participants": ["alice", "bob"]})  # carol unticked
    assert sent.status_code == 303 and "Saved." in alice.get(sent.headers["Location"]).text
    with Engine(config) as engine:
        a = engine.activity(ids["alice-mail"])
    assert (a.owner, sorted(a.participants)) == ("bob", ["bob"])
    # sent again unchanged: nothing to do, and the page says so
    form = edit_form(bob := logged_in(app, "bob", BOB_PW), ids["alice-mail"])
    sent = bob.post(f"/activities/{ids['alice-mail']}/edit", data=form | {"participants": []})
    assert "Nothing changed." in bob.get(sent.headers["Location"]).text  # the owner stays, whatever the boxes
    with Engine(config) as engine:
        assert engine.activity(ids["alice-mail"]).participants == ["bob"]

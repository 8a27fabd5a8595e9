"""CalDAV servers as they are: what differs between Radicale, Xandikos and SabreDAV and how
gwsync meets it. No WebDAV sync (SabreDAV 1.8): list by ETag without asking every run, and with
the fewest requests; a refused token (Radicale 403, Xandikos 412): one full listing; no login
(Xandikos without auth); one collection for events and tasks (Xandikos "calendar"); collections
named by path or display name; certificates that do not fit (Xandikos --autocert): a config
error that says what to fix; `verify = false`: one warning line per run."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from gwsync.calendar.sync import NO_SYNC, no_sync_marker
from servers.dav import Xandikos
from test_calendar_sync import AREAS, activities, event, sync, todo


def stored_token(env, area: str) -> str | None:
    rows = env.state_sql("SELECT sync_token FROM collections WHERE account = 'alice' AND area = :area", area=area)
    return rows[0][0] if rows else None


def store_token(env, area: str, token: str) -> None:
    env.state_sql("UPDATE collections SET sync_token = :token WHERE account = 'alice' AND area = :area",
                  token=token, area=area)


def one_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


# -- no WebDAV sync (SabreDAV 1.8) -------------------------------------------------------------

@pytest.mark.parametrize("server, per_run", [("sabredav_basic", 2), ("sabredav_digest", 3)])
def test_without_webdav_sync_a_no_change_sync_lists_each_collection_once_and_asks_nothing_else(
        make_env, request, server, per_run):
    """SabreDAV answers sync-collection with 403 ReportNotSupported. gwsync remembers that and
    lists by ETag: one PROPFIND per collection; with Digest auth, one challenge per run on top
    (the collections share the session), never one per request."""
    dav = request.getfixturevalue(server)
    env = make_env(areas=AREAS, calserver=dav)
    env.dav_put("events", "e.ics", event("e", "Termin"))
    env.dav_put("tasks", "t.ics", todo("t", "Aufgabe"))
    assert sync(env)[0] == 0
    assert all(stored_token(env, area).startswith(NO_SYNC) for area in AREAS)
    before = dav.request_count()

    code, out = sync(env)

    assert code == 0 and sum(out[area]["created_crm"] + out[area]["updated_groupware"] for area in AREAS) == 0
    assert [out[area]["requests"] for area in AREAS] == [1, 1]
    log = dav.requests()[before:]
    assert len(log) == per_run, log
    assert [line.split()[1] for line in log if not line.startswith("401")] == ["PROPFIND", "PROPFIND"]
    assert not any("REPORT" in line for line in log)  # the refused sync-collection is not asked again


def test_a_day_later_gwsync_asks_again_whether_the_server_has_webdav_sync(make_env, sabredav_basic):
    env = make_env(areas=("events",), calserver=sabredav_basic)
    env.dav_put("events", "e.ics", event("e", "Termin"))
    sync(env)
    store_token(env, "events", no_sync_marker(datetime.now(UTC) - timedelta(days=1, minutes=1)))
    before = sabredav_basic.request_count()

    code, out = sync(env)

    assert code == 0 and out["events"]["requests"] == 2  # the REPORT asked once more, then the listing
    assert [line.split()[:2] for line in sabredav_basic.requests()[before:]] == [["403", "REPORT"],
                                                                                 ["207", "PROPFIND"]]
    since = datetime.fromisoformat(stored_token(env, "events")[len(NO_SYNC):])
    assert datetime.now(UTC) - since < timedelta(minutes=1)  # remembered afresh
    assert [a.subject for a in activities(env)] == ["Termin"]


# -- a refused sync token ------------------------------------------------------------------------

def test_a_refused_sync_token_costs_one_full_listing_once(make_env, sync_calserver):
    """Radicale answers an unknown token with 403, Xandikos with 412: gwsync lists the collection
    in full once (one sync-collection without a token, which also gives a fresh token), and the
    run after is one request again."""
    env = make_env(areas=("events",), calserver=sync_calserver)
    env.dav_put("events", "a.ics", event("a", "A"))
    sync(env)
    store_token(env, "events", "http://radicale.org/ns/sync/0000000000000000000000000000000000000000")

    code, out = sync(env)

    assert code == 0, out
    assert {k: v for k, v in out["events"].items() if k in ("created_crm", "deleted_crm", "updated_crm")} == {
        "created_crm": 0, "deleted_crm": 0, "updated_crm": 0}
    assert out["events"]["requests"] == 2  # the refused REPORT, then one without a token
    assert not stored_token(env, "events").startswith(NO_SYNC)  # the server does have sync
    code, out = sync(env)
    assert out["events"]["requests"] == 1
    assert [a.subject for a in activities(env)] == ["A"]


# -- no login ---------------------------------------------------------------------------------------

def test_a_server_without_login_needs_no_password_and_one_that_asks_says_so(make_env, xandikos_auth):
    """Without a password source gwsync sends no credentials (Xandikos without auth is in the
    flows); where the server then asks for a login, that is a config error, and nothing is locked."""
    env = make_env(areas=("events",), calserver=xandikos_auth)
    text = env.config_path.read_text()
    env.config_path.write_text(text.replace(f'password = "{xandikos_auth.password_for(env.user)}"\n', ""))

    result = env.cli("sync")

    assert result.exit_code == 2, result.stderr  # the line says why, should it ever differ
    line = one_line(result)
    assert "account alice" in line and "asks for a login" in line and "password_env" in line
    _, status = env.cli_json("status")
    assert status["accounts"]["alice"]["locked"] == []


# -- one collection for both, collections by path or display name --------------------------------

@pytest.fixture(scope="module")
def xandikos_defaults():
    with Xandikos.start(defaults=True) as server:
        yield server


def test_one_collection_may_serve_events_and_tasks(make_env, xandikos_defaults):
    """Xandikos --defaults makes one "calendar" for VEVENT and VTODO (Cyrus's "Default" too)."""
    env = make_env(areas=AREAS, calserver=xandikos_defaults)
    env.collections = ("calendar", "calendar")
    text = env.config_path.read_text()
    env.config_path.write_text(text.replace(f'events = "{env.user}-calendar"\ntasks = "{env.user}-tasks"',
                                            'events = "calendar"\ntasks = "calendar"'))
    env.dav_put("events", f"{env.user}-e.ics", event(f"{env.user}-e", "Vom Handy: Termin"))
    env.dav_put("events", f"{env.user}-t.ics", todo(f"{env.user}-t", "Vom Handy: Aufgabe"))
    env.cli("activity", "add", "--kind", "TERMIN", "--subject", "Vom CRM: Termin", "--start", "2026-12-09T10:00")
    env.cli("activity", "add", "--kind", "AUFGABE", "--subject", "Vom CRM: Aufgabe", "--due", "2026-12-10")

    code, out = sync(env)

    assert code == 0, out
    for area in AREAS:
        assert (out[area]["created_crm"], out[area]["created_groupware"]) == (1, 1), (area, out[area])
    kinds = {a.subject: a.kind for a in activities(env)}
    assert kinds == {"Vom Handy: Termin": "TERMIN", "Vom Handy: Aufgabe": "AUFGABE",
                     "Vom CRM: Termin": "TERMIN", "Vom CRM: Aufgabe": "AUFGABE"}
    items = [text for _, text in env.dav_items("events").values()]
    assert sorted(("VTODO" in t, "VEVENT" in t) for t in items) == [(False, True)] * 2 + [(True, False)] * 2
    code, out = sync(env)
    assert code == 0 and all(out[a]["created_crm"] + out[a]["created_groupware"] + out[a]["deleted_crm"]
                             + out[a]["deleted_groupware"] == 0 for a in AREAS), out


def test_collections_may_be_named_by_path_or_display_name(make_env, sabredav_digest):
    env = make_env(areas=AREAS, calserver=sabredav_digest)
    sabredav_digest.make_calendar(env.user, "work", "VTODO", display="Büro – Aufgaben")
    path = f"/calendars/{env.user}/calendar/"
    text = env.config_path.read_text()
    env.config_path.write_text(text.replace('events = "calendar"\ntasks = "tasks"',
                                            f'events = "{path}"\ntasks = "Büro – Aufgaben"'))
    env.dav_put("events", "e.ics", event("e", "Termin"))
    env.collections = ("calendar", "work")
    env.dav_put("tasks", "t.ics", todo("t", "Aufgabe im Büro"))

    code, out = sync(env)

    assert code == 0, out
    assert out["events"]["created_crm"] == 1 and out["tasks"]["created_crm"] == 1
    assert sorted(a.subject for a in activities(env)) == ["Aufgabe im Büro", "Termin"]


# -- certificates -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def autocert_xandikos():
    """Xandikos with its own --autocert certificate: it names 127.0.0.1 as a DNS name."""
    with Xandikos.start(auth=True, own_certificate=False) as server:
        yield server


def test_a_certificate_for_other_names_is_a_config_error_that_names_them(make_env, autocert_xandikos):
    env = make_env(areas=("events",), calserver=autocert_xandikos)

    result = env.cli("sync")

    assert result.exit_code == 2
    line = one_line(result)
    assert "account alice" in line and "certificate is for DNS:127.0.0.1, not for 127.0.0.1" in line, line
    assert "IP:127.0.0.1" in line and "url" in line and "try again" not in line
    _, status = env.cli_json("status")
    assert status["accounts"]["alice"]["locked"] == []


def test_an_untrusted_certificate_points_at_ca_file(make_env, autocert_xandikos):
    env = make_env(areas=("events",), calserver=autocert_xandikos)
    env.config_path.write_text(env.config_path.read_text().replace(f'ca_file = "{autocert_xandikos.ca_file}"\n', ""))

    result = env.cli("sync")

    assert result.exit_code == 2
    line = one_line(result)
    assert "not trusted (self-signed certificate)" in line and "set ca_file" in line and "try again" not in line


def test_verify_false_warns_once_per_run_not_per_request(make_env, autocert_xandikos):
    env = make_env(areas=AREAS, calserver=autocert_xandikos)
    env.config_path.write_text(env.config_path.read_text().replace(f'ca_file = "{autocert_xandikos.ca_file}"\n',
                                                                   "verify = false\n"))
    env.dav_put("events", "e.ics", event(f"{env.user}-e", "Termin"))

    run = env.subprocess("sync")
    _, stderr = run.communicate(timeout=60)

    assert run.returncode == 0, stderr
    lines = stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "verify = false" in lines[0] and "127.0.0.1" in lines[0], lines
    assert [a.subject for a in activities(env)] == ["Termin"]


# -- Cyrus ---------------------------------------------------------------------------------------

def test_an_item_the_server_refuses_is_named_with_the_servers_reason(make_env, cyrus_dav):
    """Cyrus 3.6 refuses a timed event without an end (zero length; RFC 5545 allows it) with
    403 valid-calendar-data. The error says why, in the server's words, not just "forbidden"."""
    env = make_env(areas=("events",), calserver=cyrus_dav)
    env.cli("activity", "add", "--kind", "TERMIN", "--subject", "Ohne Ende", "--start", "2026-12-09T10:00")

    code, out = sync(env)

    assert code == 1
    assert "DTEND must occur after DTSTART" in out["error"] and "valid-calendar-data" in out["error"], out
    assert env.dav_items("events") == {}

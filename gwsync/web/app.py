"""The web view behind the CRM links (`gwsync serve`): Flask + Jinja2 over the embedded CRM.

The CRM and state stores are opened once per process, at the first request (`Stores`), and each
request gets an Engine on them of its own (Engine.sharing_stores: its own passwords and CalDAV
clients for a push); waitress answers from several threads, and the stores give each thread
its own read connection and each write a pooled one. Opening both stores for every request
cost about 9 ms. A store that cannot be opened is an error page, and the next request tries
again. The writes are
forms that run what the CLI runs: assign (Engine.assign, as `gwsync assign`), the edit form
(Engine.update_activity, as `gwsync activity edit`), push and unpush (Engine.push/unpush).

A request passes, in this order: Flask-WTF's CSRF check (forms), the Host check (without a
login: loopback names only), the login check (with one), then its page. Ids in URLs and
forms beyond SQLite's 64-bit integers are "not there" before any query sees them.

Who reads: with `[serve.users.NAME]` each employee logs in as themselves and the session
remembers who (its mark is tied to that user's password); with one shared password, or none,
the reader is the config's only account, or nobody in particular when it has several. A
private activity shows its details only to its owner: everyone else sees "Privat", its
times and its owner, and can neither edit nor push it.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import math
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta
from functools import partial
from urllib.parse import urlsplit

from flask import Flask, Response, abort, flash, g, redirect, render_template, request, send_file, session, url_for
from flask_wtf.csrf import CSRFError, CSRFProtect
from markupsafe import Markup
from werkzeug.routing import IntegerConverter

from ..accountlock import AccountBusy
from ..calendar.icalmap import BUSY_SUBJECT, parse_time
from ..config import Config
from ..crm import MAIL_KINDS, Activity, ActivityFilter
from ..crm.searches import MY_SEARCHES, quick_search, searches_for
from ..engine import Engine
from ..errors import GwsyncError
from .sanitize import sanitise_mail_html

log = logging.getLogger("gwsync.web")
PAGE_SIZE = 50
MAX_ID = 2 ** 63 - 1  # SQLite's largest integer: a larger id cannot exist (and would not bind)
# A Host header: a name or IPv4 address, or an IPv6 address in brackets; an optional port.
HOST_HEADER = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9.-]+)(?::[0-9]{1,5})?", re.IGNORECASE)

# Types a browser might render or run; served as plain bytes (they are downloads anyway).
ACTIVE_TYPES = ("text/html", "application/xhtml+xml", "image/svg+xml", "text/xml", "application/xml",
                "text/javascript", "application/javascript")

MAX_TEXT = 1000  # characters of a subject, request or project typed into the edit form

# The viewer's own share of two quick searches (owner, delegate or participant), and everything.

MEDIA_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*")  # RFC 6838 names only

# Our own pages load nothing from elsewhere: no scripts at all, styles and images from here.
PAGE_POLICY = ("default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
               "frame-ancestors 'none'; base-uri 'none'")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str | None:
    """The name in a Host header, lower case and without brackets ('[::1]:8765' -> '::1');
    None when it is not a host name at all."""
    match = HOST_HEADER.fullmatch(header)
    return match.group(1).strip("[]").lower() if match else None


def local_path(target: str) -> str | None:
    """`target` if a browser reads it as a path of this site, else None. Browsers drop tabs
    and newlines inside a URL and take '\\' for '/', so '/\t/evil.example' and '/\\evil.example'
    lead to another host: control characters and backslashes are refused with '//' and schemes."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target or not target.isprintable():
        return None
    parts = urlsplit(target)
    return None if parts.scheme or parts.netloc else target


class IdConverter(IntegerConverter):
    """<id:name>: a whole number SQLite can hold; a larger one matches no page (404)."""

    def __init__(self, url_map, *args, **kwargs):
        super().__init__(url_map, max=MAX_ID)


class LoginThrottle:
    """Wrong passwords cost the guesser time, not the server a thread: each try from a client
    (an address; an IPv6 /64, which one machine usually has whole) counts as wrong until
    passed() says otherwise, and the client's next try is refused unchecked until the delay
    is over: `first` seconds, doubled with every further wrong try up to `most`, started over
    after `forget` quiet seconds. The oldest of more than `size` clients is forgotten."""

    def __init__(self, first: float = 1, most: float = 30, forget: float = 900, size: int = 4096,
                 clock: Callable[[], float] = time.monotonic):
        self.first, self.most, self.forget, self.size, self.clock = first, most, forget, size, clock
        self._clients: OrderedDict[str, tuple[int, float]] = OrderedDict()  # client -> (wrong tries, not before)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._clients)

    @staticmethod
    def _key(address: str) -> str:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return address
        return str(ipaddress.ip_network(f"{ip}/64", strict=False)) if ip.version == 6 else str(ip)

    def wait(self, address: str) -> float:
        """The seconds this client has to wait before its next try (0: none)."""
        with self._lock:
            _wrong, not_before = self._clients.get(self._key(address), (0, 0.0))
            return max(0.0, not_before - self.clock())

    def begin(self, address: str) -> float:
        """0 if this client may try now (the try is counted in the same step, so of two tries at
        once only one is checked); else the seconds it has to wait."""
        key = self._key(address)
        with self._lock:
            now = self.clock()
            wrong, not_before = self._clients.get(key, (0, now))
            if now < not_before:
                return not_before - now
            if now - not_before >= self.forget:
                wrong = 0
            wrong += 1
            self._clients[key] = (wrong, now + min(self.first * 2 ** (wrong - 1), self.most))
            self._clients.move_to_end(key)
            while len(self._clients) > self.size:
                self._clients.popitem(last=False)
            return 0

    def passed(self, address: str) -> None:
        """The right password: the client's count starts over."""
        with self._lock:
            self._clients.pop(self._key(address), None)


class Stores:
    """The web process's CRM and state stores: an Engine opened at the first request that needs
    one (under a lock: two threads at once open them once), closed by `close` when the server stops."""

    def __init__(self, config: Config):
        self.config = config
        self._engine: Engine | None = None
        self._lock = threading.Lock()

    def engine(self) -> Engine:
        """An Engine of the request's own on the process's stores."""
        with self._lock:
            if self._engine is None:
                self._engine = Engine(self.config)  # a failure leaves None: the next request tries again
            return self._engine.sharing_stores()

    def close(self) -> None:
        with self._lock:
            opened, self._engine = self._engine, None
        if opened is not None:
            opened.close()


def create_app(config: Config, secret_key: bytes, password: str | None = None,
               users: dict[str, str] | None = None) -> Flask:
    """The web view. With `password` (one shared login) or `users` (account name -> that
    employee's password), every page but the login needs a session that logged in with it;
    without either, only loopback host names are answered (no DNS rebinding)."""
    if password is not None and users:
        raise ValueError("one shared password or a login per user, not both")
    app = Flask(__name__)
    app.url_map.converters["id"] = IdConverter
    base = urlsplit(config.serve.base_url)
    app.config.update(
        SECRET_KEY=secret_key,
        # Cookies are per host, not per port: two views on one host must not share a session.
        SESSION_COOKIE_NAME=f"gwsync_session_{base.port or 0}",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=base.scheme == "https",
        PERMANENT_SESSION_LIFETIME=timedelta(days=30),
        WTF_CSRF_TIME_LIMIT=None,  # the token lives as long as the session
        WTF_CSRF_SSL_STRICT=base.scheme == "https",
        MAX_CONTENT_LENGTH=64 * 1024,  # the only forms are tiny
    )
    app.jinja_env.trim_blocks = app.jinja_env.lstrip_blocks = True
    CSRFProtect(app)
    statuses = config.crm.statuses
    writing = threading.Lock()  # around each form's write: a form sent twice finds the first one's result
    users = dict(users or {})
    login_required = password is not None or bool(users)
    # What a session that logged in carries: tied to the password, so changing it ends the
    # sessions made with the old one; per user, tied to the name too.
    marks: dict[str | None, str] = (
        {name: _mark(secret_key, f"user\0{name}\0{secret}") for name, secret in users.items()} if users else
        {None: _mark(secret_key, password or "")})
    only_account = next(iter(config.accounts)) if len(config.accounts) == 1 else None
    accounts = list(config.accounts)
    calendar_accounts = [a.name for a in config.accounts.values() if a.caldav is not None]
    throttle = LoginThrottle()

    stores = app.extensions["gwsync.stores"] = Stores(config)

    def engine() -> Engine:
        if "engine" not in g:
            g.engine = stores.engine()
        return g.engine

    @app.before_request
    def require_own_host():
        """Without a password, only loopback names: a hostile site whose name resolves to
        127.0.0.1 (DNS rebinding) must not read the CRM. (Werkzeug's TRUSTED_HOSTS cannot
        match an IPv6 address, hence this check.)"""
        if login_required:
            return None
        name = host_name(request.environ.get("HTTP_HOST", ""))
        if name is not None and (name == base.hostname or is_loopback(name)):
            return None
        return Response("gwsync answers only to its own address (this one is not trusted)\n", 400,
                        mimetype="text/plain")

    @app.before_request
    def require_login():
        g.viewer = None if users else only_account
        if not login_required or request.endpoint in ("login", "static", "favicon"):
            return None
        user = session.get("user") if users else None
        expected = marks.get(user) if user is None or isinstance(user, str) else None
        given = session.get("login")
        if expected is None or not isinstance(given, str) or not hmac.compare_digest(given, expected):
            return redirect(url_for("login", next=request.full_path.rstrip("?")))
        if users:
            g.viewer = user
        return None

    @app.after_request
    def security_headers(response):
        response.headers.setdefault("Content-Security-Policy", PAGE_POLICY)
        response.headers["X-Content-Type-Options"] = "nosniff"
        # Links out (from mail, say) must not tell other sites the CRM's URLs; our own forms do
        # send it, which Flask-WTF checks over HTTPS.
        response.headers["Referrer-Policy"] = "same-origin"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    @app.context_processor
    def navigation():
        viewer = g.get("viewer")
        return {"quick_searches": searches_for(viewer), "login_required": login_required,
                "logged_in_as": viewer if users else None,
                "status_label": lambda key: f"{key} · {statuses[key]}" if key in statuses else key}

    def sees_details(item: Activity) -> bool:
        """A private activity's details are its owner's (an activity without owner is the only
        account's, as the calendar sync reads it)."""
        viewer = g.get("viewer")
        return not item.private or (viewer is not None and (item.owner or only_account) == viewer)

    def shown(item: Activity) -> Activity:
        return item if sees_details(item) else private_view(item)

    def changeable(activity_id: int) -> Activity:
        """The activity a form changes: 404 when there is none, 403 when it is another's private one."""
        item = engine().activity(activity_id)
        if item is None:
            abort(404, f"There is no activity #{activity_id}; it may have been deleted.")
        if not sees_details(item):
            abort(403, f"Activity #{activity_id} is private: only its owner, {item.owner}, can change it.")
        return item

    app.add_template_filter(human_time, "when")
    app.add_template_filter(format_size, "size")

    def error_page(title: str, message: str, status: int):
        return render_template("error.html", title=title, message=message), status

    @app.errorhandler(CSRFError)
    def csrf_refused(exc):
        return error_page("Form refused", "This form did not come from this page or has expired. "
                                          "Go back, reload the page and send it again.", 400)

    @app.errorhandler(404)
    def not_found(exc):
        return error_page("Not found", exc.description, 404)

    @app.errorhandler(403)
    def forbidden(exc):
        return error_page("Private", exc.description, 403)

    @app.errorhandler(500)
    def server_error(exc):
        # Flask has logged the traceback on stderr; the page says what the reader can do.
        return error_page("Something went wrong", "The page could not be built; the server's log says why. "
                                                  "Reloading may help if the database was busy.", 500)

    @app.errorhandler(GwsyncError)
    def environment_fault(exc):
        # A broken or locked database, a full disk: the page and the log say which, and what to do.
        log.error("%s", exc)
        return error_page("Something went wrong", str(exc), 500)

    @app.errorhandler(400)
    def bad_request(exc):
        return error_page("Bad request", exc.description, 400)

    # -- pages -------------------------------------------------------------------------------

    @app.get("/")
    def index():
        eng = engine()
        counts = {name: eng.count_activities(quick_search(name, g.viewer)) for name in searches_for(g.viewer)}
        held = eng.not_imported()
        return render_template("index.html", counts=counts, unknown=len(engine().unknown_senders()),
                               held=len(held))

    @app.get("/activities/<id:activity_id>")
    def activity(activity_id: int):
        item = engine().activity(activity_id)
        if item is None:
            abort(404, f"There is no activity #{activity_id}; it may have been deleted.")
        return _activity_page(item)

    def _activity_page(item: Activity, error: str | None = None, status: int = 200):
        eng = engine()
        private = not sees_details(item)
        item = shown(item)
        contact = eng.contact(item.contact_id) if item.contact_id else None
        partner = eng.partner(item.partner_id) if item.partner_id else None
        remote_images = request.args.get("images") == "remote"  # the reader asked for them
        safe = (sanitise_mail_html(item.body_html, remote_images=remote_images)
                if item.body_html and not request.args.get("text") else None)
        page = render_template("activity.html", a=item, contact=contact, partner=partner,
                               html_body=Markup(safe.markup) if safe else None,
                               blocked_images=safe.blocked_images if safe else 0, remote_images=remote_images,
                               links=[] if private else eng.calendar_links(item), private=private, error=error,
                               calendar_accounts=calendar_accounts, area=config.crm.kinds.get(item.kind, "events"),
                               default_account=g.viewer if g.viewer in calendar_accounts else item.owner)
        response = app.make_response((page, status))
        if remote_images:
            response.headers["Content-Security-Policy"] = PAGE_POLICY.replace("img-src 'self'",
                                                                              "img-src 'self' https: http:")
        return response

    @app.get("/activities/<id:activity_id>/documents/<id:number>")
    def document(activity_id: int, number: int):
        item = engine().activity(activity_id)
        if item is not None and not sees_details(item):
            item = None  # another's private activity: its documents are not there for this reader
        if item is None or not 1 <= number <= len(item.documents):
            abort(404, f"Activity #{activity_id} has no document {number}.")
        doc = item.documents[number - 1]
        path = engine().document_path(doc.sha256)
        if not path.is_file():
            abort(404, f"The file of {doc.filename} is missing from the document store.")
        ctype = (doc.content_type or "").lower()
        mimetype = ctype if MEDIA_TYPE.fullmatch(ctype) and ctype not in ACTIVE_TYPES else "application/octet-stream"
        response = send_file(path, mimetype=mimetype, as_attachment=True, download_name=doc.filename,
                             etag=doc.sha256, max_age=0, conditional=True)
        response.headers["Content-Security-Policy"] = "sandbox; default-src 'none'"
        response.headers["Cache-Control"] = "private, no-cache"
        return response

    @app.get("/searches/<name>")
    def search(name: str):
        if name in MY_SEARCHES and g.viewer is None:
            abort(404, f"The search {name!r} needs to know who you are: it works with a login per employee "
                       "([serve.users.NAME]) or a config with one account.")
        try:
            flt = quick_search(name, g.viewer)
        except KeyError:
            abort(404, f"There is no quick search {name!r}.")
        return _activity_list(engine(), flt, searches_for(g.viewer)[name], shown)

    @app.get("/partners/<id:partner_id>")
    def partner(partner_id: int):
        found = engine().partner(partner_id)
        if found is None:
            abort(404, f"There is no partner #{partner_id}.")
        contacts = [c for c in engine().contacts() if c.partner_id == partner_id]
        return _activity_list(engine(), ActivityFilter(partner_id=partner_id), f"Activities of {found.name}", shown,
                              partner=found, contacts=contacts)

    @app.get("/contacts/<id:contact_id>")
    def contact(contact_id: int):
        found = engine().contact(contact_id)
        if found is None:
            abort(404, f"There is no contact #{contact_id}.")
        partner = engine().partner(found.partner_id) if found.partner_id else None
        return _activity_list(engine(), ActivityFilter(contact_id=contact_id), f"Activities of {found.name}", shown,
                              contact=found, partner=partner)

    @app.get("/unknown")
    def unknown():
        return _unknown_page()

    def _unknown_page(error: str | None = None, status: int = 200):
        eng = engine()
        partners = eng.partners()
        names = {p.id: p.name for p in partners}
        return render_template("unknown.html", senders=eng.unknown_senders(), contacts=eng.contacts(),
                               partners=partners, partner_names=names, error=error), status

    @app.post("/unknown/assign")
    def assign():
        form = request.form
        email = form.get("email", "").strip()
        if "@" not in email:
            return _unknown_page(f"{email!r} is not a mail address.", 400)
        chosen = form.get("contact", "").strip()
        new_contact = form.get("new_contact", "").strip() or None
        partner_text = form.get("partner_id", "").strip()
        partner_id = _whole_number(partner_text)
        if partner_text and partner_id is None:
            return _unknown_page(f"Assigning {email}: no partner {partner_text!r}; choose one from the list.", 400)
        if bool(chosen) == bool(new_contact):
            return _unknown_page(f"Assigning {email}: choose a contact, or give the new contact's name.", 400)
        contact_id = _chosen_contact(engine(), chosen) if chosen else None
        if chosen and contact_id is None:
            return _unknown_page(f"Assigning {email}: no contact {chosen!r}; pick one from the list as you type.", 400)
        try:
            with writing:  # a double-clicked form: the second request finds the first one's contact
                result = engine().assign(email, contact_id=contact_id, new_contact=new_contact,
                                         partner_id=partner_id if new_contact else None)
        except (LookupError, ValueError) as exc:
            return _unknown_page(f"Assigning {email}: {exc}.", 400)
        linked = result["linked_activities"]
        message = (f"{result['email']} now belongs to contact #{result['contact_id']}; "
                   f"{linked} earlier activit{'y' if linked == 1 else 'ies'} linked")
        if result["held_to_release"]:
            message += f"; {result['held_to_release']} held mail(s) import at the next sync"
        flash(message + ".")
        return redirect(url_for("unknown"), 303)

    @app.get("/held")
    def held():
        eng = engine()
        return render_template("held.html", rows=eng.not_imported(), items=eng.kept_out())

    # -- changing an activity: the edit form, push and unpush ----------------------------------

    def kinds_for(item: Activity) -> list[str]:
        return list(dict.fromkeys([*config.crm.kinds, *MAIL_KINDS, item.kind]))

    def edit_page(item: Activity, values: dict, seen: str, seen_participants: list[str], error: str | None = None,
                  status: int = 200):
        return render_template("edit.html", a=item, values=values, seen=seen, seen_participants=seen_participants,
                               error=error, kinds=kinds_for(item), statuses=statuses, accounts=accounts), status

    @app.get("/activities/<id:activity_id>/edit")
    def edit(activity_id: int):
        item = changeable(activity_id)
        return edit_page(item, {key: getattr(item, key) for key in EDITED}, item.updated_at or "", item.participants)

    @app.post("/activities/<id:activity_id>/edit")
    def save(activity_id: int):
        form = request.form
        sent = {key: form.get(key, "") for key in EDITED} | {"participants": form.getlist("participants")}
        seen, seen_participants = form.get("updated_at", ""), form.getlist("participants_seen")
        with writing:  # the check and the write together: of two forms sent at once, the second sees the first
            current = changeable(activity_id)
            try:
                values, added, removed = edited_values(current, form, kinds_for(current), list(statuses), accounts)
            except ValueError as exc:
                return edit_page(current, sent, seen, seen_participants, f"{exc}.", 400)
            if seen != (current.updated_at or ""):
                return edit_page(current, sent, current.updated_at or "", current.participants,
                                 "The activity was changed since you opened this form (by a sync or someone else): "
                                 "check the fields and send it again.", 409)
            changes = {key: value for key, value in values.items() if getattr(current, key) != value}
            try:
                changed = engine().update_activity(activity_id, changes, added, removed)
            except LookupError:
                abort(404, f"There is no activity #{activity_id}; it may have been deleted.")
        flash("Saved." if changed else "Nothing changed.")
        return redirect(url_for("activity", activity_id=activity_id), 303)

    @app.post("/activities/<id:activity_id>/push")
    def push(activity_id: int):
        item = changeable(activity_id)
        area = request.form.get("area", "")
        account = request.form.get("account", "")
        if area not in ("events", "tasks"):
            return _activity_page(item, f"Push: {area!r} is neither events nor tasks.", 400)
        if account not in calendar_accounts:
            return _activity_page(item, f"Push: {account!r} is not an account with a calendar "
                                        f"(known: {', '.join(calendar_accounts) or 'none'}).", 400)
        try:
            report = engine().push(activity_id, area, account)
        except (AccountBusy, GwsyncError) as exc:
            return _activity_page(item, f"Push: {exc}", 409)
        problems = report.accounts[account].error_lines() if account in report.accounts else []
        if problems:
            return _activity_page(engine().activity(activity_id) or item, f"Push: {'; '.join(problems)}", 502)
        flash(f"Pushed to {account}'s {area}.")
        return redirect(url_for("activity", activity_id=activity_id), 303)

    @app.post("/activities/<id:activity_id>/unpush")
    def unpush(activity_id: int):
        item = changeable(activity_id)
        account = request.form.get("account", "")
        if account not in calendar_accounts:
            return _activity_page(item, f"Unpush: {account!r} is not an account with a calendar "
                                        f"(known: {', '.join(calendar_accounts) or 'none'}).", 400)
        try:
            count = engine().unpush(activity_id, account)
        except (AccountBusy, GwsyncError) as exc:
            return _activity_page(item, f"Unpush: {exc}", 409)
        flash(f"Removed {count} calendar item{'' if count == 1 else 's'} from {account}'s calendar. "
              f"The activity stays in the CRM and off that calendar until pushed again.")
        return redirect(url_for("activity", activity_id=activity_id), 303)

    # -- login -------------------------------------------------------------------------------

    @app.route("/login", methods=["GET", "POST"])
    def login():
        if not login_required:
            return redirect(url_for("index"))
        target = local_path(request.values.get("next", "")) or url_for("index")  # no open redirect
        user = request.form.get("user", "").strip() if users else None
        page = partial(render_template, "login.html", next=target, per_user=bool(users), user=user or "")
        if request.method != "POST":  # GET, and HEAD with it
            return page()
        client = request.remote_addr or ""
        wait = throttle.begin(client)
        if wait:  # refused unchecked: guessing stays slow, and no thread sleeps for it
            seconds = math.ceil(wait)
            return (page(error=f"Too many wrong passwords from here: try again in {seconds} s."),
                    429, {"Retry-After": str(seconds)})
        given = request.form.get("password", "")
        # An unknown user is checked against a password nobody has: the answer takes as long.
        expected = users.get(user or "") if users else password
        if _same(given, expected if expected is not None else secrets.token_hex(16)) and expected is not None:
            throttle.passed(client)
            session.clear()
            session.permanent = True
            session["login"] = marks[user]
            if users:
                session["user"] = user
            return redirect(target, 303)
        seconds = math.ceil(throttle.wait(client))  # the wait this wrong try has started
        wrong = "Wrong user name or password" if users else "Wrong password"
        return page(error=f"{wrong}. Try again in {seconds} s."), 401, {"Retry-After": str(seconds)}

    @app.post("/logout")
    def logout():
        session.clear()
        return redirect(url_for("login"), 303)

    @app.get("/favicon.ico")
    def favicon():
        return app.send_static_file("favicon.svg")

    return app


# The fields the edit form changes (participants from its check boxes).
EDITED = ("kind", "status", "subject", "owner", "delegated_to", "participants", "request", "project")


def edited_values(item: Activity, form, kinds: list[str], statuses: list[str],
                  accounts: list[str]) -> tuple[dict, list[str], list[str]]:
    """The edit form's fields over the activity as it is now, checked, and the participants it
    adds and removes: ValueError says what is wrong with the first bad one. Names must be
    accounts. Participants change by what the reader ticked or unticked against what the form
    showed (`participants_seen`), name by name: one a sync added since (which does not change
    updated_at), even while the form is saved, stays. The owner's place among them is
    Engine.update_activity's rule: a new owner replaces the old one, the owner always takes part."""
    known = f"(known: {', '.join(accounts) or 'none'})"

    def text(key: str, name: str) -> str | None:
        value = form.get(key, "").strip()
        if len(value) > MAX_TEXT:
            raise ValueError(f"{name} is longer than {MAX_TEXT} characters")
        if not value.isprintable():
            raise ValueError(f"{name} has a line break or another control character; write it on one line")
        return value or None

    def employee(key: str, name: str, empty_ok: bool) -> str | None:
        value = form.get(key, "").strip()
        if value in accounts or (empty_ok and not value):
            return value or None
        raise ValueError(f"{name} {value!r} is not an account {known}")

    kind, status = form.get("kind", "").strip(), form.get("status", "").strip()
    if kind not in kinds:
        raise ValueError(f"kind {kind!r} is not one of {', '.join(kinds)}")
    if status not in statuses:
        raise ValueError(f"status {status!r} is not one of {', '.join(statuses)}")
    subject = text("subject", "subject") or ""
    owner = employee("owner", "owner", empty_ok=item.owner is None)
    delegate = employee("delegated_to", "delegate", empty_ok=True)
    ticked = list(dict.fromkeys(name.strip() for name in form.getlist("participants")))
    for name in ticked:
        if name not in accounts:
            raise ValueError(f"participant {name!r} is not an account {known}")
    seen = list(dict.fromkeys(name.strip() for name in form.getlist("participants_seen")))
    added = [name for name in ticked if name not in seen]
    removed = [name for name in seen if name not in ticked]
    return ({"kind": kind, "status": status, "subject": subject, "owner": owner, "delegated_to": delegate,
             "request": text("request", "request"), "project": text("project", "project")}, added, removed)


def private_view(item: Activity) -> Activity:
    """What a private activity shows to anyone but its owner: "Privat", its times, its owner."""
    return replace(item, subject=BUSY_SUBJECT, body="", body_html=None, location=None, attendees=[], documents=[],
                   sender=None, sender_name=None, recipients_to=[], recipients_cc=[], contact_id=None,
                   partner_id=None, unassigned=False, message_id=None, source=None, participants=[],
                   delegated_to=None, request=None, project=None)


def _mark(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def _same(given: str, expected: str) -> bool:
    """Constant time, whatever the lengths."""
    return hmac.compare_digest(hashlib.sha256(given.encode()).digest(), hashlib.sha256(expected.encode()).digest())


def _activity_list(eng: Engine, flt: ActivityFilter, title: str, shown: Callable[[Activity], Activity], **extra):
    given = request.args.get("page") or "1"
    page = _whole_number(given)
    total = eng.count_activities(flt)
    pages = max(1, math.ceil(total / PAGE_SIZE))
    if page is None or page > pages:  # nor can an offset grow beyond what SQLite holds
        abort(404, f"There is no page {given[:30]} of this list; it has {pages} page{'s' if pages > 1 else ''}.")
    paged = replace(flt, newest_first=True, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)
    items = [shown(a) for a in eng.activities(paged)]
    # names of just the contacts and partners on this page (a CRM may have thousands)
    contacts = {c.id: c.name for c in map(eng.contact, {a.contact_id for a in items if a.contact_id}) if c}
    partners = {p.id: p.name for p in map(eng.partner, {a.partner_id for a in items if a.partner_id}) if p}
    return render_template("list.html", title=title, items=items, total=total, page=page, pages=pages,
                           contact_names=contacts, partner_names=partners, **extra)


def _chosen_contact(eng: Engine, text: str) -> int | None:
    """The contact picked in the form: '#ID Name' from the list, or a name that only one has."""
    match = re.match(r"#([0-9]+)\b", text)
    if match:
        return _whole_number(match.group(1))
    named = [c.id for c in eng.contacts() if c.name.casefold() == text.casefold()]
    return named[0] if len(named) == 1 else None


def _whole_number(value: str) -> int | None:
    """A number from 1 to MAX_ID (an id, a page) written in ASCII digits only, else None."""
    if not (value.isascii() and value.isdigit()) or len(value) > len(str(MAX_ID)):
        return None
    number = int(value)
    return number if 1 <= number <= MAX_ID else None


def human_time(value: str | None) -> str:
    """Times as gwsync stores them, for people: '2026-12-02T14:00:00+01:00[Europe/Berlin]' ->
    'Wed 02 Dec 2026, 14:00 (Europe/Berlin)'; UTC stamps in the server's local time."""
    if not value:
        return ""
    try:
        moment = parse_time(value)
    except ValueError:
        return value
    if not isinstance(moment, datetime):
        return moment.strftime("%a %d %b %Y")
    zone = getattr(moment.tzinfo, "key", None)  # a ZoneInfo from the [zone] suffix
    if zone is None and moment.tzinfo is not None:
        moment = moment.astimezone()
    shown = moment.strftime("%a %d %b %Y, %H:%M")
    return f"{shown} ({zone})" if zone else shown


def format_size(size: int | None) -> str:
    if size is None:
        return ""
    if size < 1024:
        return f"{size} bytes"
    scaled = float(size)
    for unit in ("KB", "MB"):
        scaled /= 1024
        if scaled < 1024:
            return f"{scaled:.1f} {unit}"
    return f"{scaled / 1024:.1f} GB"

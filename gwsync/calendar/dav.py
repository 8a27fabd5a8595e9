"""The CalDAV adapter: one collection's items with ETags, WebDAV sync, and conditional writes.

It uses the caldav library's DAVClient for the HTTP session and authentication, and sends every
write with its precondition itself (If-None-Match: * on create, If-Match on update and delete),
since the library's high-level objects do not send them all. A 412 is raised as
PreconditionFailed: the caller re-reads and reconciles, it never overwrites.
"""

from __future__ import annotations

import functools
import logging
import re
import socket
import ssl
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote, urljoin, urlsplit

from ..errors import ConfigError, LoginRefused, ServiceError, ServiceUnreachable

if TYPE_CHECKING:  # the caldav library and its HTTP stack load on the first connect, not before
    from caldav.davclient import DAVClient

NS = {"d": "DAV:", "c": "urn:ietf:params:xml:ns:caldav"}
MULTIGET_BATCH = 200
log = logging.getLogger(__name__)
_unverified_warned: set[str] = set()  # servers reached with verify = false, warned about once per process


@functools.cache
def transport_errors() -> tuple[type[Exception], ...]:
    """What the HTTP stack raises for a connection that fails or drops (niquests' errors are
    OSErrors; urllib3's and urllib3-future's are not)."""
    import urllib3.exceptions
    from caldav.lib.http_sync import requests as http

    errors: tuple[type[Exception], ...] = (OSError, http.exceptions.RequestException,
                                           urllib3.exceptions.HTTPError)
    try:
        import urllib3_future.exceptions

        errors += (urllib3_future.exceptions.HTTPError,)
    except ImportError:
        pass
    return errors


class DavError(ServiceError):
    """The CalDAV server refused a request."""


class DavLoginFailed(LoginRefused, DavError):
    """401: the credentials were refused (exit 3)."""


class DavUnreachable(ServiceUnreachable, DavError):
    """No connection, a timeout, or a 5xx answer: transient."""


class DavConfigError(ConfigError, DavError):
    """The fault is in the config, not the server's state: the certificate does not match the
    URL or is not trusted, or the server asks for a login that the config does not have. Exit 2;
    trying again does not help."""


class PreconditionFailed(DavError):
    """412: the item changed (or exists) on the server since we read it."""


class SyncTokenInvalid(DavError):
    """The server does not know the token (expired, or no sync support): list in full instead."""


class SyncUnsupported(SyncTokenInvalid):
    """The collection has no WebDAV sync (sync-collection) at all: list by ETag."""


@dataclass
class Item:
    href: str  # path on the server, e.g. /alice/calendar/x.ics
    etag: str | None
    data: str | None = None


def connect(url: str, username: str, password: str | None, verify: bool | str = True, timeout: int = 60,
            auth_type: str | None = None) -> DAVClient:
    """A client; with `auth_type` (remembered from an earlier run) the credentials go with the
    first request instead of after a 401 challenge, which saves a request per run. With no
    password (a server without login) no credentials go at all. With `verify` false, one
    warning line per server and process, instead of the HTTP library's two per request."""
    from caldav.davclient import DAVClient

    if verify is False:
        warnings.filterwarnings("ignore", message="Unverified HTTPS request")
        server = urlsplit(url).netloc
        if url.startswith("https:") and server not in _unverified_warned:
            _unverified_warned.add(server)
            log.warning("CalDAV %s: certificate checks are off (verify = false); anyone between gwsync and the "
                        "server can read the password and the calendars", server)
    if password is None:
        return DAVClient(url, ssl_verify_cert=verify, timeout=timeout, require_tls=False, enable_rfc6764=False)
    return DAVClient(url, username=username, password=password, ssl_verify_cert=verify, timeout=timeout,
                     require_tls=False, enable_rfc6764=False, auth_type=auth_type)


def negotiated_auth_type(client: DAVClient) -> str | None:
    """The auth scheme the client settled on ("basic", "digest", "bearer"), if any."""
    if client.auth_type:
        return client.auth_type
    name = type(client.auth).__name__.lower() if client.auth is not None else ""
    for scheme in ("digest", "basic", "bearer"):
        if scheme in name:
            return scheme
    return None


class Collection:
    def __init__(self, client: DAVClient, url: str):
        self.client = client
        self.url = url if url.endswith("/") else url + "/"
        self.path = urlsplit(self.url).path
        self.requests = 0  # HTTP requests sent, for the benchmark and the tests
        self.writes = 0  # successful PUTs and DELETEs
        self.sync_support: bool | None = None  # whether sync-collection works here, once asked

    # -- transport ---------------------------------------------------------------------------

    def _request(self, url: str, method: str, body: str = "", headers: dict | None = None):
        from caldav.lib import error as caldav_error

        self.requests += 1
        try:
            response = self.client.request(url, method, body, headers or {})
        except caldav_error.AuthorizationError as exc:
            status = getattr(exc, "status", None) or ""
            if "403" in str(status) or "403" in str(exc)[:200]:
                raw = getattr(exc, "body", None) or b""
                return _Forbidden(raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw))
            if self.client.password is None:  # no password to refuse: nothing to lock
                raise DavConfigError(
                    f"CalDAV {self.url}: the server asks for a login; set password_command, password_env, "
                    "password_keyring or password in the account's [caldav] table") from exc
            raise DavLoginFailed(f"CalDAV {self.url}: login refused (HTTP 401)") from exc
        except caldav_error.RateLimitError as exc:
            raise DavUnreachable(f"CalDAV {self.url}: server busy ({exc})") from exc
        except transport_errors() as exc:
            certificate = _certificate_error(exc)
            if certificate is not None:
                raise DavConfigError(_explain_certificate(url, certificate, self.client.ssl_verify_cert)) from exc
            raise DavUnreachable(f"CalDAV {self.url}: cannot connect ({_reason(exc)})") from exc
        except caldav_error.DAVError as exc:
            raise DavError(f"CalDAV {url}: {method} failed ({exc})") from exc
        if response.status >= 500:
            raise DavUnreachable(f"CalDAV {url}: server error {response.status}")
        return response

    def _absolute(self, href: str) -> str:
        return urljoin(self.url, href)

    # -- reading -----------------------------------------------------------------------------

    def check(self) -> None:
        """Fail clearly when the collection does not exist or is not a calendar."""
        response = self._request(self.url, "PROPFIND", _PROPFIND_TYPE,
                                 {"Depth": "0", "Content-Type": "application/xml"})
        if isinstance(response, _Forbidden) or response.status == 404:
            raise DavError(f"CalDAV collection {self.url} not found (check events/tasks in the config)")
        if response.status != 207:
            raise DavError(f"CalDAV collection {self.url}: PROPFIND answered {response.status}")
        root = _parse(_body(response))
        if root.find(".//c:calendar", NS) is None:
            raise DavError(f"{self.url} is not a calendar collection")

    def list_etags(self) -> dict[str, str]:
        """href -> ETag of every calendar object (PROPFIND, depth 1)."""
        response = self._request(self.url, "PROPFIND", _PROPFIND_ETAGS,
                                 {"Depth": "1", "Content-Type": "application/xml"})
        if isinstance(response, _Forbidden) or response.status != 207:
            raise DavError(f"CalDAV {self.url}: listing answered {getattr(response, 'status', 403)}")
        items = {}
        for href, _status, props in _multistatus(_body(response)):
            if _norm(href) == _norm(self.path) or props.find(".//d:collection", NS) is not None:
                continue
            etag = props.findtext(".//d:getetag", default=None, namespaces=NS)
            if etag:
                items[_norm(href)] = etag
        return items

    def changes_since(self, token: str | None) -> tuple[str, dict[str, str], set[str]]:
        """RFC 6578 sync-collection: (new token, changed href -> ETag, deleted hrefs).
        With no token, every item counts as changed. Raises SyncTokenInvalid to ask for a listing."""
        body = _SYNC_COLLECTION.format(token=_xml_escape(token or ""))
        response = self._request(self.url, "REPORT", body, {"Depth": "1", "Content-Type": "application/xml"})
        if isinstance(response, _Forbidden) or response.status != 207:
            status = response.status
            # Refused without a token, or with the report named as unsupported (SabreDAV 1.8:
            # 403 ReportNotSupported): the server has no sync. Else only this token is unknown
            # (Radicale answers 403, Xandikos 412).
            if not token or "supported-report" in _text(response) or status in (405, 501):
                self.sync_support = False
                raise SyncUnsupported(f"CalDAV {self.url}: no WebDAV sync (sync-collection answered {status})")
            raise SyncTokenInvalid(f"CalDAV {self.url}: sync token refused ({status})")
        root = _parse(_body(response))
        new_token = root.findtext("d:sync-token", default=None, namespaces=NS)
        if not new_token:
            self.sync_support = False
            raise SyncUnsupported(f"CalDAV {self.url}: no sync token in the sync-collection answer")
        self.sync_support = True
        changed, deleted = {}, set()
        for href, status, props in _multistatus_root(root):
            if _norm(href) == _norm(self.path):
                continue
            if status and " 404" in status:
                deleted.add(_norm(href))
                continue
            etag = props.findtext(".//d:getetag", default=None, namespaces=NS)
            if etag:
                changed[_norm(href)] = etag
        return new_token, changed, deleted

    def multiget(self, hrefs: list[str]) -> dict[str, Item]:
        """The data of these items (calendar-multiget, in batches). Missing items are absent."""
        found: dict[str, Item] = {}
        for start in range(0, len(hrefs), MULTIGET_BATCH):
            batch = hrefs[start:start + MULTIGET_BATCH]
            body = _MULTIGET.format(hrefs="".join(f"<d:href>{_xml_escape(quote(unquote(h)))}</d:href>"
                                                  for h in batch))
            response = self._request(self.url, "REPORT", body, {"Depth": "1", "Content-Type": "application/xml"})
            if response.status == 404:  # SabreDAV 1.8 fails the whole report for one missing item
                found.update((href, item) for href in batch if (item := self.get(_norm(href))) is not None)
                continue
            if isinstance(response, _Forbidden) or response.status != 207:
                raise DavError(f"CalDAV {self.url}: multiget answered {getattr(response, 'status', 403)}")
            for href, status, props in _multistatus(_body(response)):
                data = props.findtext(".//c:calendar-data", default=None, namespaces=NS)
                if data is not None and (not status or " 200" in status):
                    found[_norm(href)] = Item(_norm(href), props.findtext(".//d:getetag", default=None,
                                                                          namespaces=NS), data)
        return found

    def get(self, href: str) -> Item | None:
        response = self._request(self._absolute(href), "GET")
        if isinstance(response, _Forbidden) or response.status == 404:
            return None
        if response.status != 200:
            raise DavError(f"CalDAV GET {href}: {response.status}")
        return Item(href, response.headers.get("ETag"), _body(response))

    # -- writing -----------------------------------------------------------------------------

    def href_for(self, uid: str) -> str:
        # Spelled as listings spell hrefs (`_norm`), so a created item is found under its href.
        return _norm(self.path + quote(uid.replace("/", "_"), safe="@-_.") + ".ics")

    def create(self, href: str, data: str) -> str:
        """PUT with If-None-Match: *; returns the new ETag. PreconditionFailed if it exists."""
        return self._put(href, data, {"If-None-Match": "*"})

    def update(self, href: str, data: str, etag: str) -> str:
        """PUT with If-Match; returns the new ETag. PreconditionFailed if it changed meanwhile."""
        return self._put(href, data, {"If-Match": etag})

    def delete(self, href: str, etag: str) -> None:
        response = self._request(self._absolute(href), "DELETE", "", {"If-Match": etag})
        if isinstance(response, _Forbidden):
            raise DavError(f"CalDAV DELETE {href}: forbidden{_refusal(response.text)}")
        if response.status == 404:
            return  # gone already: what we wanted
        if response.status == 412:
            if self.get(href) is None:  # If-Match on a missing item is a 412 too (SabreDAV)
                return
            raise PreconditionFailed(href)
        if response.status not in (200, 204):
            raise DavError(f"CalDAV DELETE {href}: {response.status}")
        self.writes += 1

    def _put(self, href: str, data: str, condition: dict) -> str:
        headers = {"Content-Type": "text/calendar; charset=utf-8", **condition}
        response = self._request(self._absolute(href), "PUT", data, headers)
        if isinstance(response, _Forbidden):
            raise DavError(f"CalDAV PUT {href}: forbidden{_refusal(response.text)}")
        if response.status == 412:
            raise PreconditionFailed(href)
        if response.status not in (200, 201, 204):
            detail = _body(response)[:200].strip()
            raise DavError(f"CalDAV PUT {href}: {response.status} {detail}")
        self.writes += 1
        etag = response.headers.get("ETag")
        if not etag:  # some servers answer without one: ask
            item = self.get(href)
            etag = item.etag if item else None
        return etag or ""


def _reason(exc: BaseException) -> str:
    """The useful part of a connection error ("[Errno 111] Connection refused"), not urllib3's
    whole nested message."""
    match = re.search(r"\[Errno -?\d+\][^'\")\]]*", str(exc))
    return match.group(0).strip() if match else type(exc).__name__


def _certificate_error(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate check that failed, wherever the HTTP stack wrapped it."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return current
        todo += [e for e in (current.__cause__, current.__context__, getattr(current, "reason", None),
                             *current.args) if isinstance(e, BaseException)]
    return None


def _explain_certificate(url: str, exc: ssl.SSLCertVerificationError, verify: bool | str) -> str:
    """What to fix, in one line: a certificate for other names (named), or one signed by a CA
    that is not trusted (set ca_file)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 443
    detail = getattr(exc, "verify_message", "") or str(exc)
    where = f"CalDAV {parts.scheme}://{parts.netloc}/"
    if "mismatch" in detail:
        names = _certificate_names(host, port, verify)
        listed = ", ".join(names) if names else "other names"
        hint = ""
        if any(name == f"DNS:{host}" for name in names):
            hint = f" (it names {host} as a DNS name; an IP address must be listed as IP:{host})"
        return (f"{where}: the server's certificate is for {listed}, not for {host}{hint}; use a name from the "
                "certificate in url, or give the server a certificate for that address")
    return (f"{where}: the server's certificate is not trusted ({detail}); set ca_file in the account's [caldav] "
            "table to the certificate of the CA that signed it (for a self-signed one, the certificate itself)")


def _certificate_names(host: str, port: int, verify: bool | str) -> list[str]:
    """The names in the server's certificate (subjectAltName), read over a connection that
    checks the chain but not the name; empty when that fails too."""
    context = ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
    context.check_hostname = False
    try:
        with socket.create_connection((host, port), timeout=10) as sock, context.wrap_socket(sock) as tls:
            cert = tls.getpeercert() or {}
    except (OSError, ValueError):
        return []
    names: tuple[tuple[str, str], ...] = cert.get("subjectAltName", ())  # type: ignore[assignment]
    return [f"{kind}:{value}" for kind, value in names]


class _Forbidden:
    """A 403 answer (the caldav library raises it as an error; its body comes along)."""

    status = 403

    def __init__(self, text: str = ""):
        self.text = text


def _refusal(text: str) -> str:
    """The server's reason in a 403 body (RFC 4918 DAV:error: the failed precondition and its
    DAV:responsedescription, e.g. Cyrus "valid-calendar-data: DTEND must occur after DTSTART"),
    as ` (...)`, or "" when it gives none."""
    import re

    error = re.search(r"<(?:\w+:)?error\b[^>]*>(.*?)</(?:\w+:)?error>", text, re.S)
    if not error:
        return ""
    inner = error.group(1)
    description = re.search(r"<(?:\w+:)?responsedescription[^>]*>(.*?)</", inner, re.S)
    condition = re.search(r"<(?:\w+:)?([\w-]+)\s*/>", inner)
    parts = [part for part in (condition and condition.group(1), description and description.group(1).strip()) if part]
    return f" ({': '.join(parts)})"[:300] if parts else ""


def _body(response) -> str:
    raw = getattr(response, "_raw", None)
    if raw is None:
        raw = getattr(response, "raw", b"")
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else (raw or "")


def _text(response) -> str:
    return response.text if isinstance(response, _Forbidden) else _body(response)


def _parse(text: str) -> ET.Element:
    """An answer's XML; a malformed answer is the server's fault, said as a DavError."""
    try:
        return ET.fromstring(text)
    except ET.ParseError as exc:
        raise DavError(f"CalDAV: the server's answer is not well-formed XML ({exc})") from exc


def _norm(href: str) -> str:
    return quote(unquote(urlsplit(href).path), safe="/@-_.~!$&'()*+,;=:")


def _multistatus(text: str):
    return _multistatus_root(_parse(text))


def _multistatus_root(root):
    for response in root.findall("d:response", NS):
        href = response.findtext("d:href", default="", namespaces=NS)
        status = response.findtext("d:status", default="", namespaces=NS)
        props = ET.Element("props")
        for propstat in response.findall("d:propstat", NS):
            if " 200" in (propstat.findtext("d:status", default="", namespaces=NS) or ""):
                for prop in propstat.findall("d:prop", NS):
                    props.extend(list(prop))
        yield href, status, props


def _xml_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


_PROPFIND_TYPE = ('<?xml version="1.0" encoding="utf-8"?><d:propfind xmlns:d="DAV:"><d:prop><d:resourcetype/>'
                  '</d:prop></d:propfind>')
_PROPFIND_ETAGS = ('<?xml version="1.0" encoding="utf-8"?><d:propfind xmlns:d="DAV:"><d:prop><d:getetag/>'
                   '<d:resourcetype/></d:prop></d:propfind>')
_SYNC_COLLECTION = ('<?xml version="1.0" encoding="utf-8"?><d:sync-collection xmlns:d="DAV:">'
                    '<d:sync-token>{token}</d:sync-token><d:sync-level>1</d:sync-level>'
                    '<d:prop><d:getetag/></d:prop></d:sync-collection>')
_MULTIGET = ('<?xml version="1.0" encoding="utf-8"?><c:calendar-multiget xmlns:d="DAV:" '
             'xmlns:c="urn:ietf:params:xml:ns:caldav"><d:prop><d:getetag/><c:calendar-data/></d:prop>'
             '{hrefs}</c:calendar-multiget>')


def resolve_collection(client: DAVClient, home: str, name_or_url: str) -> str:
    """A collection's URL from its name (the last path segment or display name below the
    account URL), its path on the server (starting with /), or a full URL."""
    if name_or_url.startswith(("http://", "https://", "/")):
        url = urljoin(home, name_or_url)
        return url if url.endswith("/") else url + "/"
    home = home if home.endswith("/") else home + "/"
    probe = Collection(client, home)
    response = probe._request(home, "PROPFIND", '<?xml version="1.0" encoding="utf-8"?><d:propfind xmlns:d="DAV:">'
                              '<d:prop><d:displayname/><d:resourcetype/></d:prop></d:propfind>',
                              {"Depth": "1", "Content-Type": "application/xml"})
    if isinstance(response, _Forbidden) or response.status != 207:
        raise DavError(f"CalDAV {home}: cannot list collections ({getattr(response, 'status', 403)}); check url")
    names = []
    for href, _status, props in _multistatus(_body(response)):
        if props.find(".//c:calendar", NS) is None:
            continue
        segment = unquote(urlsplit(href).path.rstrip("/").rsplit("/", 1)[-1])
        display = props.findtext(".//d:displayname", default="", namespaces=NS)
        names.append(segment)
        if name_or_url in (segment, display):
            return urljoin(home, urlsplit(href).path if href.endswith("/") else urlsplit(href).path + "/")
    known = ", ".join(sorted(names)) or "none"
    raise DavError(f"no calendar collection {name_or_url!r} at {home} (found: {known})")

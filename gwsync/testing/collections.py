"""An in-memory CalDAV collection, for tests here and in host CRMs.

`MemoryCollection` offers what `CalendarSync` uses of `gwsync.calendar.dav.Collection` (url, requests,
writes, check, list_etags, changes_since, multiget, get, href_for, create, update, delete) and
keeps the same promises, checked by `CollectionContract` on it and on a real server: every write
gets a new ETag; create sends If-None-Match: * and update/delete If-Match, a stale one is a 412
(PreconditionFailed); RFC 6578 sync tokens list exactly what changed or went since; an unknown or
expired token raises SyncTokenInvalid; without sync support, every sync request raises
SyncUnsupported.

What a test adds on top:
- another client's writes (`put`, `remove`) and a server that rewrites an ETag without a change
  (`touch`);
- `inject(method, error=..., before=...)`: raise an error, or first run something (another
  client's edit, so the write meets a real 412), on the next call of a method; `reset_faults()`;
- `sync_support=False` (a server without WebDAV sync) and `expire_tokens()`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote, unquote, urljoin, urlsplit

from ..calendar.dav import DavError, Item, PreconditionFailed, SyncTokenInvalid, SyncUnsupported

METHODS = ("check", "list_etags", "changes_since", "multiget", "get", "create", "update", "delete")
MULTIGET_BATCH = 200  # as the real adapter: one request per batch
_instances = itertools.count(1)


@dataclass
class _Stored:
    etag: str
    data: str


@dataclass
class _Fault:
    method: str
    href: str | None
    error: BaseException | None
    before: Callable[[MemoryCollection], object] | None
    times: int


class MemoryCollection:
    def __init__(self, url: str = "http://memory.invalid/alice/calendar/", sync_support: bool = True):
        self.url = url if url.endswith("/") else url + "/"
        self.path = urlsplit(self.url).path
        self.sync_support = sync_support
        self.requests = 0  # calls that a server would count as requests
        self.writes = 0  # successful creates, updates and deletes (by anyone through the adapter)
        self._items: dict[str, _Stored] = {}
        # href -> (change number, exists afterwards) of each write and delete, oldest first
        self._history: dict[str, list[tuple[int, bool]]] = {}
        self._seq = 0
        self._epoch = 0  # tokens of an older epoch are unknown (expired)
        self._etags = itertools.count(1)
        self._name = f"{next(_instances)}"
        self._faults: list[_Fault] = []

    # -- what a test controls ----------------------------------------------------------------

    def inject(self, method: str, *, error: BaseException | None = None,
               before: Callable[[MemoryCollection], object] | None = None,
               href: str | None = None, times: int = 1) -> None:
        """On the next `times` calls of `method` (for `href`, when given): run `before(self)`,
        then raise `error` if given, else carry out the call."""
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r} (one of {', '.join(METHODS)})")
        self._faults.append(_Fault(method, href, error, before, times))

    def reset_faults(self) -> None:
        """Forget the injected faults that have not been triggered yet."""
        self._faults.clear()

    def put(self, href: str, data: str) -> str:
        """Another client writes the item, unconditionally; returns its new ETag."""
        return self._store(self._href(href), data)

    def remove(self, href: str) -> None:
        """Another client deletes the item."""
        self._remove(self._href(href))

    def touch(self, href: str) -> str:
        """The server gives the item a new ETag without changing it (servers do that)."""
        href = self._href(href)
        return self._store(href, self._items[href].data)

    def items(self) -> dict[str, Item]:
        """Every item as it is now, oldest first (no request counted)."""
        return {h: Item(h, s.etag, s.data) for h, s in self._items.items()}

    def expire_tokens(self) -> None:
        """Every token handed out so far becomes unknown to the server."""
        self._epoch += 1

    # -- the Collection interface ------------------------------------------------------------

    def check(self) -> None:
        self._call("check")

    def list_etags(self) -> dict[str, str]:
        self._call("list_etags")
        return {h: s.etag for h, s in self._items.items()}

    def changes_since(self, token: str | None) -> tuple[str, dict[str, str], set[str]]:
        self._call("changes_since")
        if not self.sync_support:
            raise SyncUnsupported(f"CalDAV {self.url}: sync-collection answered 501")
        if token is None:
            return self._token(), {h: s.etag for h, s in self._items.items()}, set()
        since = self._parse_token(token)
        changed = {h: s.etag for h, s in self._items.items() if self._history[h][-1][0] > since}
        # Like RFC 6578 servers: an item made and deleted after the token is not reported.
        deleted = {h for h, events in self._history.items()
                   if h not in self._items and events[-1][0] > since and self._existed(h, since)}
        return self._token(), changed, deleted

    def multiget(self, hrefs: list[str]) -> dict[str, Item]:
        found: dict[str, Item] = {}
        for start in range(0, len(hrefs), MULTIGET_BATCH):
            batch = hrefs[start:start + MULTIGET_BATCH]
            self._call("multiget", *batch)
            for href in map(self._href, batch):
                if href in self._items:
                    stored = self._items[href]
                    found[href] = Item(href, stored.etag, stored.data)
        return found

    def get(self, href: str) -> Item | None:
        href = self._href(href)
        self._call("get", href)
        stored = self._items.get(href)
        return Item(href, stored.etag, stored.data) if stored else None

    def href_for(self, uid: str) -> str:
        return self._href(self.path + quote(uid.replace("/", "_"), safe="@-_.") + ".ics")

    def create(self, href: str, data: str) -> str:
        """If-None-Match: *; PreconditionFailed if the item exists."""
        href = self._href(href)
        self._call("create", href)
        if href in self._items:
            raise PreconditionFailed(href)
        self.writes += 1
        return self._store(href, data)

    def update(self, href: str, data: str, etag: str) -> str:
        """If-Match; PreconditionFailed if it changed meanwhile or is gone."""
        href = self._href(href)
        self._call("update", href)
        stored = self._items.get(href)
        if stored is None or etag not in ("*", stored.etag):
            raise PreconditionFailed(href)
        self.writes += 1
        return self._store(href, data)

    def delete(self, href: str, etag: str) -> None:
        """If-Match; gone already is what was wanted (as a 404 is to the real adapter)."""
        href = self._href(href)
        self._call("delete", href)
        stored = self._items.get(href)
        if stored is None:
            return
        if etag not in ("*", stored.etag):
            raise PreconditionFailed(href)
        self.writes += 1
        self._remove(href)

    # -- inside ------------------------------------------------------------------------------

    def _call(self, method: str, *hrefs: str) -> None:
        self.requests += 1
        for fault in list(self._faults):
            if fault.method != method or (fault.href is not None and self._href(fault.href) not in hrefs):
                continue
            fault.times -= 1
            if fault.times <= 0:
                self._faults.remove(fault)
            if fault.before is not None:
                fault.before(self)
            if fault.error is not None:
                raise fault.error
            return

    def _href(self, href: str) -> str:
        """The collection's spelling of an href: a path below the collection, quoted as the real
        adapter normalises it. A bare name ("x.ics") is taken as below the collection."""
        path = unquote(urlsplit(urljoin(self.url, href)).path)
        if not path.startswith(self.path) or path == self.path:
            raise DavError(f"{href} is not an item of {self.url}")
        return quote(path, safe="/@-_.~!$&'()*+,;=:")

    def _store(self, href: str, data: str) -> str:
        self._seq += 1
        etag = f'"m{self._name}-{next(self._etags)}"'
        self._items[href] = _Stored(etag, data)
        self._history.setdefault(href, []).append((self._seq, True))
        return etag

    def _remove(self, href: str) -> None:
        if self._items.pop(href, None) is None:
            return
        self._seq += 1
        self._history[href].append((self._seq, False))

    def _existed(self, href: str, at: int) -> bool:
        before = [exists for seq, exists in self._history.get(href, []) if seq <= at]
        return bool(before) and before[-1]

    def _token(self) -> str:
        return f"urn:gwsync:memory:{self._name}:{self._epoch}:{self._seq}"

    def _parse_token(self, token: str) -> int:
        prefix = f"urn:gwsync:memory:{self._name}:{self._epoch}:"
        number = token[len(prefix):] if token.startswith(prefix) else ""
        if not number.isdigit() or int(number) > self._seq:
            raise SyncTokenInvalid(f"CalDAV {self.url}: sync token refused")
        return int(number)

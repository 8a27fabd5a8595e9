"""`CollectionContract`: the pytest tests every CalDAV collection adapter must pass.

What `CalendarSync` relies on, stated as tests: ETags that change with every write, conditional
writes that answer a stale precondition with PreconditionFailed, WebDAV sync tokens that list
exactly what changed (or, on a server without WebDAV sync, SyncUnsupported on every sync request,
and `sync_support` False after it), and hrefs spelled the same way by every method. Subclass it with a
`collection` fixture that returns a new, empty calendar collection for VEVENTs:

    class TestMemoryCollection(CollectionContract):
        @pytest.fixture
        def collection(self):
            return MemoryCollection()

This module imports pytest: import it from tests only.
"""

from __future__ import annotations

import itertools

import pytest

from ..calendar.dav import PreconditionFailed, SyncTokenInvalid, SyncUnsupported

_uids = itertools.count(1)


def event_text(uid: str, summary: str) -> str:
    """A small valid VEVENT, CRLF line ends, as a client sends it."""
    return ("BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//gwsync contract//EN\r\nBEGIN:VEVENT\r\n"
            f"UID:{uid}\r\nDTSTAMP:20261120T100000Z\r\nDTSTART:20261201T090000Z\r\n"
            f"DTEND:20261201T100000Z\r\nSUMMARY:{summary}\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n")


def new_uid(name: str = "item") -> str:
    return f"contract-{name}-{next(_uids)}"


def create_item(collection, summary: str = "Contract", uid: str | None = None) -> tuple[str, str, str]:
    """Create one event through the adapter: (uid, href, etag)."""
    uid = uid or new_uid()
    href = collection.href_for(uid)
    return uid, href, collection.create(href, event_text(uid, summary))


class CollectionContract:
    """Tests for an adapter with the interface of `gwsync.calendar.dav.Collection`."""

    _create = staticmethod(create_item)

    # -- reading and writing -----------------------------------------------------------------

    def test_check_accepts_the_collection(self, collection):
        collection.check()

    def test_a_new_collection_lists_nothing(self, collection):
        assert collection.list_etags() == {}

    def test_create_then_get_returns_the_data_and_the_etag(self, collection):
        uid, href, etag = self._create(collection, "Erstellt")
        assert etag
        item = collection.get(href)
        assert item is not None and item.href == href and item.etag == etag
        assert f"UID:{uid}" in item.data and "SUMMARY:Erstellt" in item.data

    def test_href_for_gives_the_href_every_method_lists(self, collection):
        _, href, etag = self._create(collection, uid=new_uid("a b@c/d+e"))
        assert href.startswith(collection.path if hasattr(collection, "path") else "/")
        assert collection.list_etags() == {href: etag}
        assert set(collection.multiget([href])) == {href}
        try:
            assert collection.changes_since(None)[1] == {href: etag}
        except SyncUnsupported:
            pass  # no WebDAV sync: nothing more to spell

    def test_create_on_an_existing_href_fails_and_changes_nothing(self, collection):
        uid, href, etag = self._create(collection, "Erstes")
        with pytest.raises(PreconditionFailed):
            collection.create(href, event_text(uid, "Zweites"))
        item = collection.get(href)
        assert item.etag == etag and "SUMMARY:Erstes" in item.data

    def test_update_with_the_current_etag_writes_and_gives_a_new_etag(self, collection):
        uid, href, etag = self._create(collection, "Alt")
        new_etag = collection.update(href, event_text(uid, "Neu"), etag)
        assert new_etag and new_etag != etag
        item = collection.get(href)
        assert item.etag == new_etag and "SUMMARY:Neu" in item.data
        assert collection.list_etags() == {href: new_etag}

    def test_update_with_a_stale_etag_fails_and_changes_nothing(self, collection):
        uid, href, stale = self._create(collection, "Eins")
        current = collection.update(href, event_text(uid, "Zwei"), stale)
        with pytest.raises(PreconditionFailed):
            collection.update(href, event_text(uid, "Drei"), stale)
        item = collection.get(href)
        assert item.etag == current and "SUMMARY:Zwei" in item.data

    def test_update_of_a_missing_item_fails(self, collection):
        uid, href, etag = self._create(collection)
        collection.delete(href, etag)
        with pytest.raises(PreconditionFailed):
            collection.update(href, event_text(uid, "Wieder da"), etag)
        assert collection.get(href) is None

    def test_delete_with_the_current_etag_removes_the_item(self, collection):
        _, href, etag = self._create(collection)
        collection.delete(href, etag)
        assert collection.get(href) is None and collection.list_etags() == {}

    def test_delete_with_a_stale_etag_fails_and_keeps_the_item(self, collection):
        uid, href, stale = self._create(collection, "Eins")
        current = collection.update(href, event_text(uid, "Zwei"), stale)
        with pytest.raises(PreconditionFailed):
            collection.delete(href, stale)
        assert collection.get(href).etag == current

    def test_deleting_a_missing_item_is_not_an_error(self, collection):
        _, href, etag = self._create(collection)
        collection.delete(href, etag)
        collection.delete(href, etag)  # gone already: what was wanted
        assert collection.get(href) is None

    def test_get_of_a_missing_item_is_none(self, collection):
        assert collection.get(collection.href_for(new_uid("missing"))) is None

    def test_list_etags_lists_every_item(self, collection):
        made = dict(self._create(collection, f"Item {n}")[1:] for n in range(3))
        assert collection.list_etags() == made

    def test_multiget_returns_the_items_and_leaves_out_missing_ones(self, collection):
        made = {href: (uid, etag) for uid, href, etag in (self._create(collection, f"M{n}") for n in range(2))}
        missing = collection.href_for(new_uid("missing"))
        found = collection.multiget(sorted(made) + [missing])
        assert set(found) == set(made)
        for href, item in found.items():
            assert item.href == href and item.etag == made[href][1] and f"UID:{made[href][0]}" in item.data

    # -- WebDAV sync -------------------------------------------------------------------------

    def test_without_sync_support_every_sync_request_says_so(self, collection):
        self._create(collection)
        try:
            collection.changes_since(None)
        except SyncUnsupported:
            assert collection.sync_support is False
            for token in ("urn:gwsync:no-such-token", "http://radicale.org/ns/sync/0"):
                with pytest.raises(SyncUnsupported):
                    collection.changes_since(token)
            assert collection.sync_support is False
        else:
            assert collection.sync_support is True

    # -- counters ----------------------------------------------------------------------------

    def test_requests_and_writes_are_counted(self, collection):
        requests, writes = collection.requests, collection.writes
        uid, href, _ = self._create(collection)
        with pytest.raises(PreconditionFailed):
            collection.create(href, event_text(uid, "Zweimal"))
        collection.list_etags()
        assert collection.writes == writes + 1  # a refused write is no write
        assert collection.requests >= requests + 3



class CollectionSyncContract:
    """The WebDAV sync (RFC 6578) tests, for a collection whose server has sync-collection. A
    collection with sync passes both contracts: `class TestX(CollectionContract,
    CollectionSyncContract)`; one without passes `CollectionContract` alone, which checks that
    it says so (SabreDAV 1.8, for one)."""

    _create = staticmethod(create_item)

    @pytest.fixture(autouse=True)
    def _has_sync(self, collection):
        try:
            collection.changes_since(None)
        except SyncUnsupported:
            pytest.fail("this collection has no WebDAV sync: test it with CollectionContract alone")


    def test_changes_since_no_token_lists_every_item_and_gives_a_token(self, collection):
        made = dict(self._create(collection, f"S{n}")[1:] for n in range(2))
        token, changed, deleted = collection.changes_since(None)
        assert token and changed == made and deleted == set()

    def test_changes_since_a_token_lists_exactly_what_changed_and_went(self, collection):
        self._create(collection, "Bleibt")
        edited_uid, edited, edited_etag = self._create(collection, "Alt")
        _, gone, gone_etag = self._create(collection, "Geht")
        token, _, _ = collection.changes_since(None)
        new_etag = collection.update(edited, event_text(edited_uid, "Neu"), edited_etag)
        collection.delete(gone, gone_etag)
        _, added, added_etag = self._create(collection, "Neu dazu")

        token2, changed, deleted = collection.changes_since(token)

        assert changed == {edited: new_etag, added: added_etag}
        assert deleted == {gone}
        assert token2 and token2 != token
        assert collection.changes_since(token2)[1:] == ({}, set())

    def test_changes_since_the_latest_token_is_empty(self, collection):
        self._create(collection)
        token, _, _ = collection.changes_since(None)
        token2, changed, deleted = collection.changes_since(token)
        assert (changed, deleted) == ({}, set()) and token2

    def test_an_unknown_token_raises_sync_token_invalid(self, collection):
        for token in ("http://radicale.org/ns/sync/0000000000000000000000000000000000000000",
                      "urn:gwsync:no-such-token"):
            with pytest.raises(SyncTokenInvalid) as refused:
                collection.changes_since(token)
            assert not isinstance(refused.value, SyncUnsupported)  # the server has sync: only the token is bad

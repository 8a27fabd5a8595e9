"""`CollectionContract` on every collection gwsync knows: the in-memory one and every CalDAV server
of the test matrix (Radicale, Xandikos with and without auth, SabreDAV with Basic and Digest)."""

from __future__ import annotations

import itertools
import os

import pytest

from gwsync.calendar.dav import Collection
from gwsync.testing import CollectionContract, CollectionSyncContract, MemoryCollection

_users = itertools.count(1)


class TestMemoryCollection(CollectionContract, CollectionSyncContract):
    @pytest.fixture
    def collection(self):
        return MemoryCollection()


class TestMemoryCollectionWithoutSync(CollectionContract):
    @pytest.fixture
    def collection(self):
        return MemoryCollection(sync_support=False)


def _dav_collection(server) -> Collection:
    user = f"contract{os.getpid()}x{next(_users)}"
    server.add_user(user)
    url = server.make_calendar(user, server.collection_names(user)[0], "VEVENT")
    return Collection(server.client(user, url), url)


class TestDavCollection(CollectionContract):
    @pytest.fixture
    def collection(self, calserver):
        return _dav_collection(calserver)


class TestDavCollectionSync(CollectionSyncContract):
    @pytest.fixture
    def collection(self, sync_calserver):
        return _dav_collection(sync_calserver)


def test_memory_collection_hooks_for_tests():
    """What the contract does not cover: another client's writes, faults, no sync support."""
    from gwsync.calendar.dav import DavUnreachable, PreconditionFailed, SyncTokenInvalid
    from gwsync.testing.collection_contract import event_text

    coll = MemoryCollection()
    etag = coll.put("x.ics", event_text("x", "Eins"))
    href = coll.href_for("x")
    token, _, _ = coll.changes_since(None)
    touched = coll.touch(href)
    assert touched != etag and coll.changes_since(token)[1] == {href: touched}

    # a race: another client writes just before our update, which then meets a real 412
    coll.inject("update", before=lambda c: c.put(href, event_text("x", "Fremd")))
    with pytest.raises(PreconditionFailed):
        coll.update(href, event_text("x", "Unser"), touched)
    assert "SUMMARY:Fremd" in coll.get(href).data
    coll.inject("get", error=DavUnreachable("down"), href="other.ics")
    assert coll.get(href) is not None  # another href: not this fault
    with pytest.raises(DavUnreachable):
        coll.get("other.ics")
    assert coll.get("other.ics") is None  # once only

    coll.expire_tokens()
    with pytest.raises(SyncTokenInvalid):
        coll.changes_since(token)
    fresh, _, _ = coll.changes_since(None)
    assert coll.changes_since(fresh)[1:] == ({}, set())
    with pytest.raises(SyncTokenInvalid):
        MemoryCollection(sync_support=False).changes_since(None)

"""Test helpers for gwsync and for host CRMs: an in-memory CalDAV collection and contract suites."""

from .collections import MemoryCollection

__all__ = ["CollectionContract", "MemoryCollection"]


def __getattr__(name: str):
    # The contract suites import pytest: load them only when a test asks for them.
    if name == "CollectionContract":
        from .collection_contract import CollectionContract

        return CollectionContract
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

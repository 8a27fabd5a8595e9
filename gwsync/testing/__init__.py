"""Test helpers for gwsync and for host CRMs: an in-memory CalDAV collection, an in-memory CRM
backend, and the contract suites every collection and every CRM backend must pass."""

from .collections import MemoryCollection
from .memory_crm import MemoryCRM

__all__ = ["CRMBackendContract", "CollectionContract", "CollectionSyncContract", "MemoryCRM", "MemoryCollection"]

# The contract suites import pytest: load them only when a test asks for them.
_CONTRACTS = {"CollectionContract": ".collection_contract", "CollectionSyncContract": ".collection_contract",
              "CRMBackendContract": ".crm_contract"}


def __getattr__(name: str):
    if name in _CONTRACTS:
        import importlib

        return getattr(importlib.import_module(_CONTRACTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

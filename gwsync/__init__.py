"""gwsync: keep a CRM and a company's mail and calendars in step, over IMAP and CalDAV.

Library use::

    from gwsync import Engine, load_config
    with Engine(load_config()) as engine:
        report = engine.sync()

A host CRM passes its own store: ``Engine(config, crm=MyBackend())`` where ``MyBackend``
implements :class:`gwsync.crm.CRMBackend`.

The names below are imported when first used (module ``__getattr__``), so that a command
loads only the stacks it needs: ``gwsync folders`` never imports the CalDAV client.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .config import Config, ConfigError, load_config, parse_config
    from .crm import Activity, ActivityDraft, ActivityFilter, Contact, CRMBackend, Document, Partner
    from .crm.embedded import EmbeddedCRM
    from .engine import Engine, SyncReport

_WHERE = {"Config": "config", "ConfigError": "config", "load_config": "config", "parse_config": "config",
          "Activity": "crm", "ActivityDraft": "crm", "ActivityFilter": "crm", "Contact": "crm",
          "CRMBackend": "crm", "Document": "crm", "Partner": "crm", "EmbeddedCRM": "crm.embedded",
          "Engine": "engine", "SyncReport": "engine"}

__all__ = ["Engine", "SyncReport", "Config", "ConfigError", "load_config", "parse_config", "CRMBackend",
           "EmbeddedCRM", "Activity", "ActivityDraft", "ActivityFilter", "Contact", "Document", "Partner",
           "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'gwsync' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value  # found once; later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

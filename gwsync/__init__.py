"""gwsync: keep a CRM and a company's mail and calendars in step, over IMAP and CalDAV.

Library use::

    from gwsync import Engine, load_config
    with Engine(load_config()) as engine:
        report = engine.sync()

A host CRM passes its own store: ``Engine(config, crm=MyBackend())`` where ``MyBackend``
implements :class:`gwsync.crm.CRMBackend`.
"""

__version__ = "0.1.0"

from .config import Config, ConfigError, load_config, parse_config  # noqa: E402
from .crm import Activity, ActivityDraft, ActivityFilter, Contact, CRMBackend, Document, Partner  # noqa: E402
from .crmstore import EmbeddedCRM  # noqa: E402
from .engine import Engine, SyncReport  # noqa: E402

__all__ = ["Engine", "SyncReport", "Config", "ConfigError", "load_config", "parse_config", "CRMBackend",
           "EmbeddedCRM", "Activity", "ActivityDraft", "ActivityFilter", "Contact", "Document", "Partner",
           "__version__"]

"""The web view behind the CRM links (`gwsync serve`)."""

from .app import create_app

__all__ = ["create_app"]

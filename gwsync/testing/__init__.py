"""Test helpers for gwsync and for the CRMs and servers that work with it."""

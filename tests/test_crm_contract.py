"""CRMBackendContract on the embedded SQLite store, on the same store on PostgreSQL, and on the
in-memory reference backend: the last shows the contract asks nothing a non-SQL CRM could not do."""

from __future__ import annotations

import pytest

pytest.register_assert_rewrite("gwsync.testing.crm_contract")

from gwsync.crm.embedded import EmbeddedCRM  # noqa: E402
from gwsync.testing.crm_contract import CRMBackendContract  # noqa: E402
from gwsync.testing.memory_crm import MemoryCRM  # noqa: E402

STATUSES = {"I": "Importiert", "O": "Offen", "E": "Erledigt"}


class TestEmbeddedCRM(CRMBackendContract):
    @pytest.fixture
    def backend(self, tmp_path):
        crm = EmbeddedCRM(tmp_path / "crm.db", tmp_path / "documents", STATUSES,
                          "https://crm.example.com/activities/{id}")
        yield crm
        crm.close()

    @pytest.fixture
    def expected_statuses(self):
        return STATUSES


class TestPostgresCRM(CRMBackendContract):
    """The store on a real PostgreSQL (a fresh database per test)."""

    @pytest.fixture
    def backend(self, pg_url, tmp_path):
        crm = EmbeddedCRM(pg_url, tmp_path / "documents", STATUSES, "https://crm.example.com/activities/{id}")
        yield crm
        crm.close()

    @pytest.fixture
    def expected_statuses(self):
        return STATUSES


class TestMemoryCRM(CRMBackendContract):
    @pytest.fixture
    def backend(self):
        return MemoryCRM(STATUSES)

    @pytest.fixture
    def expected_statuses(self):
        return STATUSES


def test_the_engine_says_so_when_a_host_crm_has_no_document_files(tmp_path):
    from gwsync.config import parse_config
    from gwsync.engine import Engine
    from gwsync.errors import UsageError

    config = parse_config({"crm": {"database": str(tmp_path / "crm.db")},
                           "state": {"database": str(tmp_path / "state.db")}})
    with Engine(config, crm=MemoryCRM(STATUSES)) as engine, \
            pytest.raises(UsageError, match=r"\(MemoryCRM\) keeps its documents itself"):
        engine.document_path("0" * 64)

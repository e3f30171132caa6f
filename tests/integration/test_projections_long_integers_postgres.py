"""Integers beyond 64 bits in ledger events on real PostgreSQL: the usage debits of
``tests/unit/projections/test_long_integers.py`` are projected there as on SQLite, row for row, their causes' integers
exact in the transaction history."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from billing_projections import lists, views
from billing_projections.service import ProjectionService
from billing_runtime.db import PostgresDatabase

from tests.namespaces import scratch_namespace
from tests.support import drop_schema
from tests.unit.projections.conftest import apply, dump, sqlite_service
from tests.unit.projections.ledger_events import Ledger
from tests.unit.projections.test_long_integers import LONG, _debits

pytestmark = pytest.mark.integration


@pytest.fixture
async def postgres(infra: dict[str, str]) -> AsyncIterator[ProjectionService]:
    schema = f"{scratch_namespace()}_long_integers"
    db = await PostgresDatabase(infra["DATABASE_URL"], schema).connect()
    try:
        service = ProjectionService(db)
        await service.setup()
        yield service
    finally:
        await db.close()
        await drop_schema(infra["DATABASE_URL"], schema)


async def test_long_integers_are_projected_on_postgres_as_on_sqlite(postgres: ProjectionService,
                                                                    tmp_path: Path) -> None:
    ledger = Ledger()
    _debits(ledger)
    records = ledger.records()
    await apply(postgres, records)
    balance = await views.balance_view(postgres.db, "acme", datetime.now(UTC))
    assert balance is not None and [w["balance"] for w in balance["wallets"]] == ["16.00"]
    items, _ = await lists.transactions(postgres.db, tenant="acme", types=["usage"], limit=10)
    assert sorted(item["cause"]["properties"]["request_id"] for item in items) == sorted(LONG)
    async with sqlite_service(tmp_path / "reference.sqlite") as reference:
        await apply(reference, records)
        expected = await dump(reference.db)
    found = await dump(postgres.db)
    for table in ("transactions", "wallets", "usage_monthly"):
        assert found[table] == expected[table], table

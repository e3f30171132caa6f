"""Card expiry notices on PostgreSQL: two ledger processes' expiry tasks deciding at the same moment (a leadership
handed over mid-round), then a restarted one, record each card's notice exactly once."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from billing_ledger.alerts import EXPIRED_TOPIC, EXPIRING_TOPIC
from billing_ledger.application import LedgerApplication, persistence_env
from billing_ledger.card_expiry_notices import CardExpiryNotices

from tests.integration.ledger_support import command
from tests.namespaces import scratch_namespace

pytestmark = pytest.mark.integration
ACCOUNTS = 12


@pytest.fixture
def two_stores(infra: dict[str, str], tmp_path: Path) -> Iterator[tuple[LedgerApplication, LedgerApplication, str]]:
    """Two ledger applications (as two processes) on one fresh PostgreSQL schema, and that schema."""
    schema = f"{scratch_namespace('tl')}_billing_ledger"
    with psycopg.connect(infra["DATABASE_URL"], autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    first = LedgerApplication(persistence_env(infra["DATABASE_URL"], str(tmp_path), schema))
    second = LedgerApplication(persistence_env(infra["DATABASE_URL"], str(tmp_path), schema))
    try:
        yield first, second, schema
    finally:
        first.close()
        second.close()
        with psycopg.connect(infra["DATABASE_URL"], autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


class Clock:
    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


def notices(app: LedgerApplication) -> list[tuple[str, str]]:
    found = app.process_recorder.select_notifications(1, 10_000, topics=[EXPIRING_TOPIC, EXPIRED_TOPIC])
    return sorted((str(n.originator_id), n.topic.rsplit(".", 1)[-1]) for n in found)


@pytest.mark.asyncio
async def test_two_leaders_at_once_and_a_restart_record_each_notice_once(
        two_stores: tuple[LedgerApplication, LedgerApplication, str], infra: dict[str, str], tmp_path: Path) -> None:
    first, second, schema = two_stores
    for n in range(ACCOUNTS):
        tenant = f"card-{n}"
        for kind, payload in (("account.open", {"currency": "USD"}), ("payment_method.add", {
                "method_id": f"pm_{n}", "gateway": "stripe",
                "card": {"brand": "visa", "last4": f"{n:04d}", "exp_month": 12, "exp_year": 2026}})):
            [result] = first.apply_commands([command(kind, tenant, payload, "setup")])
            assert result.outcome == "applied", result
    clock = Clock(datetime(2026, 12, 10, tzinfo=UTC))
    for notice, at in (("PaymentMethodExpiring", datetime(2026, 12, 10, tzinfo=UTC)),
                       ("PaymentMethodExpired", datetime(2027, 1, 1, 12, tzinfo=UTC))):
        clock.at = at
        results = await asyncio.gather(CardExpiryNotices(first, 30, now=clock).process(),
                                       CardExpiryNotices(second, 30, now=clock).process())
        recorded = [(r["tenant"], r["notice"]) for r in results[0] + results[1]]
        # Each card's notice once between them (a conflict is left for the next round: none is lost either).
        assert len(recorded) == len(set(recorded)) <= ACCOUNTS
        await CardExpiryNotices(first, 30, now=clock).process()  # the round after records what a conflict left
        assert [t for _, t in notices(first)].count(notice) == ACCOUNTS
    restarted = LedgerApplication(persistence_env(infra["DATABASE_URL"], str(tmp_path), schema))
    try:
        assert await CardExpiryNotices(restarted, 30, now=clock).process() == []
        assert len(notices(restarted)) == 2 * ACCOUNTS
    finally:
        restarted.close()

"""An immediate cancel issued after the period's end, before the scheduler's tick renewed it: the real ledger
(SQLite event store) and the real rating service (SQLite, embedded bus), each one's output fed to the other as
the relay and the Kafka consumers would, so the invoices show what a customer is billed."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from billing_events import ids, topics
from billing_events.messages import AcceptedUsage, LedgerCommand, UsageEvent
from billing_ledger.application import LedgerApplication, persistence_env
from billing_ledger.domain.invoice import Invoice, invoice_id
from billing_ledger.domain.subscription import subscription_id
from billing_ledger.relay import to_message
from billing_rating.service import RatingService
from billing_runtime.bus import EmbeddedBus, Record
from billing_runtime.db import SqliteDatabase
from eventsourcing.utils import get_topic

NOV_1, DEC_1, JAN_1 = (datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC),
                       datetime(2027, 1, 1, tzinfo=UTC))
INVOICE_DRAFTED = get_topic(Invoice.Drafted)
DEC_11 = datetime(2026, 12, 11, tzinfo=UTC)  # 10 of December's 31 days used, 21 left
CATALOG: dict[str, Any] = {
    "meters": [{"code": "api_calls", "aggregation": "sum",
                "price": {"model": "per_unit", "unit": "USD", "unit_amount": "0.10"}}],
    "plans": [{"code": "team", "name": "Team", "version": 1, "currency": "USD", "base_fee": "31.00",
               "charges": [{"meter": "api_calls", "price": {"model": "per_unit", "unit": "USD", "unit_amount": "0.10"},
                            "included": "100"}]}],
}


@dataclass
class Stack:
    """The ledger and rating, wired by hand: ``relay`` gives rating the ledger's new events, ``deliver`` gives
    the ledger rating's new commands."""

    ledger: LedgerApplication
    rating: RatingService
    bus: EmbeddedBus
    relayed: int = 0
    delivered: int = 0
    results: list[Any] = field(default_factory=list)

    def run(self, kind: str, at: datetime, tenant: str | None = "acme", **payload: Any) -> Any:
        command = LedgerCommand(command_id=uuid4(), kind=kind, tenant=tenant, issued_at=at, issued_by="user:test",
                                payload={"at": at.isoformat(), **payload})
        [result] = self.ledger.apply_commands([command])
        assert result.outcome == "applied", result
        return result

    async def relay(self) -> None:
        notifications = self.ledger.process_recorder.select_notifications(self.relayed + 1, 1000)
        records = []
        for notification in notifications:
            message = to_message(self.ledger, notification)
            records.append(Record(topics.LEDGER_EVENTS, 0, notification.id, message.key.encode(), message.value,
                                  message.headers))
            self.relayed = notification.id
        await self.rating.handle_ledger_events(records)

    async def deliver(self) -> None:
        rows = await self.bus._db.fetch('SELECT value FROM messages WHERE topic = $1 ORDER BY "offset"',
                                        topics.LEDGER_COMMANDS)
        for row in rows[self.delivered:]:
            command = LedgerCommand.model_validate_json(bytes(row["value"]))
            self.results.extend(self.ledger.apply_commands([command]))
        self.delivered = len(rows)

    async def use(self, event_id: str, calls: str, at: datetime, meter: str = "api_calls") -> None:
        event = UsageEvent(id=event_id, tenant="acme", meter=meter, quantity=calls, timestamp=at)
        message = AcceptedUsage(account_id=ids.account_id("acme"), event=event, accepted_at=at, source="test",
                                catalog_version=1)
        await self.rating.handle_accepted([Record(topics.USAGE_ACCEPTED, 0, 0, None, message.to_json())])
        await self.deliver()

    def invoice(self, key: str) -> Invoice:
        return self.ledger.repository.get(invoice_id("acme", f"{subscription_id('acme', 'm')}/{key}"))

    def invoices(self) -> dict[str, Invoice]:
        """The subscription's documents, by key (the first, the renewals, the final ones, the credit notes)."""
        found = {}
        for notification in self.ledger.process_recorder.select_notifications(1, 10_000):
            if notification.topic == INVOICE_DRAFTED:
                invoice = self.ledger.repository.get(notification.originator_id)
                found[invoice.key] = invoice
        return found


@contextlib.asynccontextmanager
async def wired_stack(tmp_path: Path, catalog: dict[str, Any]) -> AsyncIterator[Stack]:
    """The ledger (``catalog`` published, acme's USD account open) and rating on an embedded bus; closed after."""
    bus = EmbeddedBus(tmp_path / "bus.sqlite", partitions=1)
    await bus.start()
    rating = RatingService(await SqliteDatabase(tmp_path / "rating.sqlite").connect(), bus)
    try:
        await rating.setup()
        wired = Stack(LedgerApplication(persistence_env(None, str(tmp_path / "ledger"))), rating, bus)
        wired.run("catalog.publish", NOV_1, tenant=None, document=catalog, digest="c1")
        wired.run("account.open", NOV_1, currency="USD")
        yield wired
    finally:
        await rating.db.close()
        await bus.stop()


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with wired_stack(tmp_path, CATALOG) as wired:
        wired.run("subscription.create", NOV_1, key="m", plan="team")  # Nov 1 - Dec 1, 31.00 in advance
        await wired.relay()
        yield wired


def usage_money(invoice: Invoice) -> Decimal:
    return sum((Decimal(item["amount"]) for item in invoice.lines if item["kind"] == "usage"), Decimal(0))


async def test_a_cancel_after_the_period_end_before_its_renewal_bills_each_periods_usage_once(stack: Stack) -> None:
    await stack.use("nov", "250", datetime(2026, 11, 20, tzinfo=UTC))   # 100 included, 150 x 0.10 = 15.00
    # The ledger's tick for Dec 1 has not run: rating places December's usage in the period after November's.
    await stack.use("dec", "130", datetime(2026, 12, 5, tzinfo=UTC))    # December's 100 included: 3.00
    result = stack.run("subscription.cancel", DEC_11, key="m", immediately=True)
    await stack.relay()     # the cancel's events reach rating, which closes what they end
    await stack.deliver()   # and its usage lines reach the ledger
    await stack.relay()
    await stack.deliver()
    assert all(r.outcome in ("applied", "duplicate") for r in stack.results), stack.results
    # Every usage event is billed once, on one invoice: 18.00 in all (the cancel used to cut November at Dec 11:
    # its final invoice billed November's 15.00, December's usage, rated in the period after November, nowhere).
    billed = {key: usage_money(i) for key, i in stack.invoices().items() if i.status == "finalized"}
    assert sum(billed.values(), Decimal(0)) == Decimal("18.00"), billed
    # November ended on Dec 1 as the tick would have ended it: its renewal invoice bills December in advance and
    # November's usage; the cancel credits December's unused 21 days and its final invoice bills Dec 1 - Dec 11.
    renewal, final = stack.invoice(DEC_1.isoformat()), stack.invoice(DEC_11.isoformat())
    assert (final.status, final.period_start, final.period_end, usage_money(final), final.total) == (
        "finalized", DEC_1, DEC_11, Decimal("3.00"), Decimal("3.00"))
    assert (renewal.status, renewal.period_start, usage_money(renewal), renewal.total) == (
        "finalized", NOV_1, Decimal("15.00"), Decimal("46.00"))
    assert [item["amount"] for item in result.value["lines"]] == ["-21.00"]
    assert stack.invoice("cancel").total == Decimal("-21.00")
    sub = stack.ledger.repository.get(subscription_id("acme", "m"))
    assert (sub.status, sub.period_start) == ("canceled", DEC_1)


async def test_a_late_tick_after_such_a_cancel_changes_nothing(stack: Stack) -> None:
    stack.run("subscription.cancel", DEC_11, key="m", immediately=True)
    assert stack.run("subscription.tick", DEC_11, key="m").value == {"transition": None}


async def test_a_cancel_after_the_end_of_a_period_set_to_cancel_there_ends_it_at_that_end(stack: Stack) -> None:
    await stack.use("nov", "250", datetime(2026, 11, 20, tzinfo=UTC))
    stack.run("subscription.cancel", datetime(2026, 11, 25, tzinfo=UTC), key="m")  # at period end
    result = stack.run("subscription.cancel", DEC_11, key="m", immediately=True)
    assert (result.value["status"], result.value["lines"]) == ("canceled", [])
    await stack.relay()
    await stack.deliver()
    # It ended on Dec 1, as scheduled: November's usage on its final invoice, no December fee, nothing credited.
    final = stack.invoice(DEC_1.isoformat())
    assert (final.status, usage_money(final), final.total) == ("finalized", Decimal("15.00"), Decimal("15.00"))
    assert stack.ledger.repository.get(subscription_id("acme", "m")).status == "canceled"


async def test_a_cancel_more_periods_behind_than_it_may_renew_is_rejected_and_changes_nothing(stack: Stack) -> None:
    # No tick ran from November 2026 to the cancel in 2030 (issued then: an ``at`` that far from its issue is refused).
    command = LedgerCommand(command_id=uuid4(), kind="subscription.cancel", tenant="acme",
                            issued_at=datetime(2030, 1, 1, tzinfo=UTC),
                            issued_by="user:test", payload={"at": datetime(2030, 1, 1, tzinfo=UTC).isoformat(),
                                                            "key": "m", "immediately": True})
    [result] = stack.ledger.apply_commands([command])
    assert (result.outcome, result.reason) == ("rejected", "renewals_behind")
    sub = stack.ledger.repository.get(subscription_id("acme", "m"))
    assert (sub.status, sub.period_start) == ("active", NOV_1)   # no renewal of the 36 tried was kept
    assert DEC_1.isoformat() not in {key.rpartition("/")[2] for key in stack.invoices()}


async def test_a_cancel_at_period_end_after_the_period_end_ends_the_period_the_customer_is_in(stack: Stack) -> None:
    """November ended on Dec 1, the tick has not run; on Dec 11 the customer cancels at period end. It used to take
    November's end, already past: canceled as of Dec 1, December (used since) never billed. Now November ends first
    as the tick would end it, and the cancel is at the end of December, billed in advance by the Dec 1 renewal."""
    await stack.use("nov", "250", datetime(2026, 11, 20, tzinfo=UTC))   # 15.00 of November's usage
    await stack.use("dec", "130", datetime(2026, 12, 5, tzinfo=UTC))    # rated into December: 3.00
    result = stack.run("subscription.cancel", DEC_11, key="m")
    assert (result.value["status"], result.value["lines"]) == ("active", [])
    sub = stack.ledger.repository.get(subscription_id("acme", "m"))
    assert (sub.status, sub.period_start, sub.period_end, sub.cancel_at_period_end) == ("active", DEC_1, JAN_1, True)
    await stack.relay()
    await stack.deliver()
    renewal = stack.invoice(DEC_1.isoformat())  # December's 31.00 in advance, November's usage
    assert (renewal.status, renewal.period_start, usage_money(renewal), renewal.total) == (
        "finalized", NOV_1, Decimal("15.00"), Decimal("46.00"))
    # The tick at the end of December ends it there: December's usage on its final invoice, no January fee.
    assert stack.run("subscription.tick", JAN_1, key="m").value == {"transition": "canceled_at_period_end"}
    await stack.relay()
    await stack.deliver()
    final = stack.invoice(JAN_1.isoformat())
    assert (final.status, usage_money(final), final.total) == ("finalized", Decimal("3.00"), Decimal("3.00"))
    assert all(r.outcome in ("applied", "duplicate") for r in stack.results), stack.results
    assert stack.ledger.repository.get(subscription_id("acme", "m")).status == "canceled"


async def test_a_cancel_at_period_end_after_the_end_of_a_period_set_to_cancel_there_ends_it_there(
        stack: Stack) -> None:
    stack.run("subscription.cancel", datetime(2026, 11, 25, tzinfo=UTC), key="m")  # at period end
    result = stack.run("subscription.cancel", DEC_11, key="m")  # again, after that end, before the tick
    assert (result.value["status"], result.value["lines"]) == ("canceled", [])
    sub = stack.ledger.repository.get(subscription_id("acme", "m"))
    assert (sub.status, sub.period_start) == ("canceled", NOV_1)  # ended on Dec 1 as scheduled, nothing renewed

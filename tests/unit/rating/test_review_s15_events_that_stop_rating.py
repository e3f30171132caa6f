"""Session 15 review: usage events ingest accepts that rating cannot rate, found on the real stack (namespace
review15): rating raised on them, the bus retried the batch for ever, and every later event of the partition
(other tenants' too) stayed unrated, balances frozen. The tests still marked xfail (strict) fail on the current
code; each passes once such an event ends in one outcome (priced, or a dead letter with its reason) and the events
after it are rated."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from billing_events import ids, topics
from billing_events.messages import AcceptedUsage, LedgerEvent, UsageEvent
from billing_runtime.bus import Record

from tests.unit.rating.test_rating_service import (
    BASIC,
    CATALOG,
    DEC,
    JAN,
    NOV,
    TEAM,
    accepted,
    end_period,
    published,
    rating,
    subscription_event,
    usage_lines,
)

__all__ = ["rating"]

# examples/catalog.yaml's payments_volume meter: 2.9 % of each transaction plus 0.30.
PAYMENTS = {"code": "payments_volume", "aggregation": "sum",
            "price": {"model": "percentage", "unit": "USD", "rate": "0.029", "fixed_amount": "0.30"}}


async def publish_payments_meter(service: Any) -> None:
    event = LedgerEvent(position=2, aggregate_id=ids.catalog_id(), aggregate_version=3, type="Catalog.Published",
                        recorded_at=datetime.now(UTC),
                        data={"version": 2, "document": {**CATALOG, "meters": [*CATALOG["meters"], PAYMENTS]}})
    await service.handle_ledger_events([Record(topics.LEDGER_EVENTS, 0, 2, None, event.to_json())])


def debits(commands: list[dict[str, Any]]) -> dict[str, Decimal]:
    return {c["payload"]["cause"]["event_ids"][0]: Decimal(c["payload"]["amount"]) for c in commands
            if c["kind"] == "usage.debit"}


async def test_usage_of_a_percentage_meter_is_priced_per_transaction(rating) -> None:  # type: ignore[no-untyped-def]
    """Two payments of 100.00 on the catalogue's own payments_volume meter cost 2.9 % + 0.30 each, 3.20 and 3.20
    (docs/rating.md: `percentage` is a charge model of a meter); the api_calls event after them is rated too."""
    service, bus = rating
    await publish_payments_meter(service)
    await service.handle_accepted([accepted("p1", "100", "payments_volume", catalog_version=2),
                                   accepted("p2", "100", "payments_volume", catalog_version=2),
                                   accepted("c1", "3", catalog_version=2)])
    charged = debits(await published(bus))
    assert (charged.get("p1"), charged.get("p2")) == (Decimal("3.20"), Decimal("3.20"))
    assert charged.get("c1") == Decimal(1)  # 3 calls, 2 included, 1.00 each up to 10


@pytest.mark.parametrize("count", ["-400000000", "1.5", "many"])
async def test_an_ai_event_with_a_token_count_that_is_not_a_whole_count_is_dead_lettered(rating, count: str) -> None:  # type: ignore[no-untyped-def]
    """POST /v1/usage accepts `input_tokens: "-400000000"` (properties are strings; ingest only checks that `model`
    and `operation` are there). Rating must answer it with a dead letter naming the event, charge nothing for it, and
    rate the event behind it: on the stack the partition stopped, the next tenant's 1,000,000 gpt-4o tokens were never
    charged."""
    service, bus = rating
    await service.handle_accepted([
        accepted("bad", "1", "ai_tokens", model="large", operation="chat", user="u", input_tokens=count),
        accepted("good", "1000000", "ai_tokens", model="large", operation="chat", user="u", input_tokens=1000000),
    ])
    letters = await published(bus, topics.USAGE_REJECTED)
    assert [letter["event_id"] for letter in letters] == ["bad"]
    assert debits(await published(bus)) == {"good": Decimal("2.50")}  # 1M input tokens at 2.50 per million


async def test_an_event_charging_more_than_the_ledger_can_hold_is_dead_lettered(rating) -> None:  # type: ignore[no-untyped-def]
    """A client that sends bytes where the meter counts calls: 50,000,000,000 calls (11 integer digits; ingest takes up
    to 15) cost 25,000,000,004 USD, 2.5e19 sub-units, more than a signed 64-bit amount (9.2e18; docs/money.md). The
    event must be refused with a dead letter naming it, and the login after it charged."""
    service, bus = rating
    await service.handle_accepted([accepted("bytes", "50000000000"), accepted("login", "1", "logins")])
    letters = await published(bus, topics.USAGE_REJECTED)
    assert [letter["event_id"] for letter in letters] == ["bytes"]
    assert debits(await published(bus)) == {"login": Decimal(1)}


async def test_the_close_bills_a_percentage_meter_at_the_fees_charged_per_transaction(rating) -> None:  # type: ignore[no-untyped-def]
    """The period's invoice line of a percentage meter is the sum of its transactions' fees (3.20 + 3.20), not a fee
    of the period's total: the close priced it with period_charge, which refuses per-transaction models, and the
    PeriodEnded was retried for ever (no invoice lines)."""
    service, bus = rating
    catalog = LedgerEvent(position=2, aggregate_id=ids.catalog_id(), aggregate_version=3, type="Catalog.Published",
                          recorded_at=NOV, data={"version": 2, "document": {
                              **CATALOG, "meters": [*CATALOG["meters"], PAYMENTS], "plans": [TEAM, BASIC]}})
    await service.handle_ledger_events([Record(topics.LEDGER_EVENTS, 0, 2, None, catalog.to_json())])
    await subscription_event(service, "Started", 3, tenant="acme", plan={"code": "team", "version": 1}, quantity=1,
                             status="active", started_at=NOV.isoformat(), period_start=NOV.isoformat(),
                             period_end=DEC.isoformat())
    day = datetime(2026, 11, 3, tzinfo=UTC)
    await service.handle_accepted([accepted("p1", "100", "payments_volume", catalog_version=2, at=day),
                                   accepted("p2", "100", "payments_volume", catalog_version=2, at=day)])
    await end_period(service, NOV, DEC, JAN)
    assert usage_lines(await published(bus))["payments_volume"] == ("200", "6.400000000")


async def test_an_unpriceable_event_delivered_again_gets_the_same_dead_letter_and_charges_nothing(rating) -> None:  # type: ignore[no-untyped-def]
    """A redelivery (a restart) of a batch with an event rating refused: its decision is stored (no_price), so the
    dead letter is sent again and the good event's debit is the same command (posted once by the ledger)."""
    service, bus = rating
    batch = [accepted("bad", "1", "ai_tokens", model="large", operation="chat", input_tokens="-400000000"),
             accepted("good", "1000000", "ai_tokens", model="large", operation="chat", input_tokens=1000000)]
    await service.handle_accepted(batch)
    await service.handle_accepted(batch)
    letters = await published(bus, topics.USAGE_REJECTED)
    assert [(letter["event_id"], letter["reason"]) for letter in letters] == [("bad", "no_price")] * 2
    assert "input_tokens '-400000000' is not a whole number of tokens" in letters[0]["detail"]
    commands = [c for c in await published(bus) if c["kind"] == "usage.debit"]
    assert {c["command_id"] for c in commands} == {commands[0]["command_id"]}
    assert [Decimal(c["payload"]["amount"]) for c in commands] == [Decimal("2.50")] * 2


async def test_a_correction_of_a_percentage_meter_is_dead_lettered(rating) -> None:  # type: ignore[no-untyped-def]
    """A fee is per transaction: amending a payment is refused with a reason, the payment's fee stands."""
    service, bus = rating
    await publish_payments_meter(service)
    await service.handle_accepted([accepted("p1", "100", "payments_volume", catalog_version=2)])
    event = UsageEvent(id="p1-fix", tenant="acme", meter="payments_volume", quantity="50",
                       timestamp=datetime(2026, 11, 21, 10, tzinfo=UTC), correction_of="p1")
    message = AcceptedUsage(account_id=ids.account_id("acme"), event=event, accepted_at=datetime.now(UTC),
                            source="test", catalog_version=2)
    await service.handle_accepted([Record(topics.USAGE_ACCEPTED, 0, 1, None, message.to_json())])
    letters = await published(bus, topics.USAGE_REJECTED)
    assert [(letter["event_id"], letter["reason"]) for letter in letters] == [("p1-fix", "invalid_correction")]
    assert debits(await published(bus)) == {"p1": Decimal("3.20")}

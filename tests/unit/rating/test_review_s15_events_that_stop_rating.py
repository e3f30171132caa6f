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
from billing_events.messages import LedgerEvent
from billing_runtime.bus import Record

from tests.unit.rating.test_rating_service import CATALOG, accepted, published, rating

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


@pytest.mark.xfail(strict=True, reason="review s15: a meter priced `percentage` (examples/catalog.yaml's "
                                       "payments_volume) raises PriceSpecError in RatingService._rate "
                                       "(period_charge refuses per-transaction models): the batch is retried for ever")
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

"""Review finding (session 13): usage that reaches rating before the ledger's ``Subscription.Started``.

Rating learns of a subscription from the ledger's events, on another topic than usage, so usage sent right after
``POST .../subscriptions`` can be rated first. Driven through ``billing run``, 1 of 16 accounts that subscribed to
a 14-day trial and sent usage at once was charged the meter's list price for it (100.00 for 500 calls of the
trial), put in the calendar month, and the next renewal invoice billed it as "Overage from earlier periods".
Rating now reprices it when it learns of the subscription (docs/rating.md "Usage rated before its subscription").
"""

from __future__ import annotations

from datetime import UTC, datetime

from tests.unit.rating.test_rating_service import (  # noqa: F401 - the fixture
    NOV_15,
    accepted,
    published,
    rating,
    start_trial,
)


async def test_trial_usage_rated_before_rating_learns_of_the_trial_costs_nothing_in_the_end(rating) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    service, bus = rating
    # The ledger started the trial on Nov 1; its usage of Nov 10 reaches rating before the Started event.
    await service.handle_accepted([accepted("t1", "150", at=datetime(2026, 11, 10, tzinfo=UTC))])
    await start_trial(service)
    assert NOV_15 > datetime(2026, 11, 10, tzinfo=UTC)  # the usage is within the trial
    # Each command counted once, as the ledger posts it (rating sends the event's own debit again before giving it
    # back, so the ledger has the debit first whatever the order the two consumers published in).
    debits = {c["command_id"]: c for c in await published(bus) if c["kind"] == "usage.debit"}
    charged = sum(int(c["payload"]["amount_subunits"]) for c in debits.values())
    assert charged == 0  # it was 79.00 at the meter's list price (2 included, 10 x 1.00 + 138 x 0.50), billed later as overage

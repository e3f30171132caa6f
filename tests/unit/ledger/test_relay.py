"""The relay's direct path (stored JSON -> record) gives the same bytes as decoding the domain event."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson
from billing_events import ids
from billing_events.messages import LedgerEvent
from billing_ledger.application import LedgerApplication
from billing_ledger.relay import _direct_message, _mapped_message, to_message
from billing_ledger.sweeper import Sweeper

from tests.unit.ledger.ledger_support import apply, command, open_account

NOW = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)


def _some_history(app: LedgerApplication) -> None:
    open_account(app, "acme", {"key": "paid", "amount": "25.50"},
                 {"key": "promo", "amount": "5", "source": "promotion",
                  "expires_at": (NOW + timedelta(days=1)).isoformat(), "effective_at": NOW.isoformat()})
    open_account(app, "beta", {"key": "g", "amount": "10.00", "effective_at": NOW.isoformat()})
    debits = [command("usage.debit", "acme", {
        "unit": "USD", "amount_subunits": 1_234_567 * (i + 1), "meter": "api_calls", "at": NOW.isoformat(),
        "cause": {"event_ids": [f"e{i}"], "quantity": "1.5", "properties": {"user": "ü-1", "n": i},
                  "ratio": "0.000000001"}}, key=f"d{i}") for i in range(5)]
    apply(app, *debits)
    apply(app, command("hold.place", "beta", {
        "hold_id": str(ids.grant_id("beta", "h")), "amount": "3", "at": NOW.isoformat(),
        "expires_at": (NOW + timedelta(hours=1)).isoformat()}))
    Sweeper(app).sweep(NOW + timedelta(days=2))  # the hold and the promotion expire
    apply(app, command("no.such.kind", "acme", {}))  # a rejection has a receipt too


def test_direct_records_equal_the_mapped_ones_for_every_stored_event(app: LedgerApplication) -> None:
    _some_history(app)
    notifications = app.recorder.select_notifications(1, 10_000)
    assert len(notifications) > 15
    types = set()
    for n in notifications:
        direct, mapped = _direct_message(n), _mapped_message(app, n)
        assert direct.value == mapped.value, n.topic
        assert (direct.topic, direct.key, direct.headers) == (mapped.topic, mapped.key, mapped.headers)
        event = LedgerEvent.model_validate_json(direct.value)
        assert event.position == n.id
        types.add(event.type)
    assert {"BillingAccount.Opened", "BillingAccount.UsageDebited", "CommandReceipt.Recorded"} <= types


def test_unusual_stored_state_goes_the_mapped_way(app: LedgerApplication) -> None:
    _some_history(app)
    n = app.recorder.select_notifications(1, 1)[0]
    state = orjson.loads(n.state)
    state["class_version"] = 2
    unusual = type(n)(id=n.id, originator_id=n.originator_id, originator_version=n.originator_version,
                      topic=n.topic, state=orjson.dumps(state))
    try:
        _direct_message(unusual)
    except Exception as exc:  # noqa: BLE001 - any refusal is fine: the point is that it is not used
        assert type(exc).__name__ == "_Unusual"
    else:
        raise AssertionError("a class version must not take the direct path")
    assert to_message(app, n).value == _mapped_message(app, n).value

"""The relay's direct path (stored JSON -> record) gives the same bytes as decoding the domain event."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from billing_events import ids
from billing_events.messages import LedgerEvent
from billing_ledger import relay as relay_module
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


class _Capture:
    """A bus that keeps what is published (positions in order) and can fail on demand."""

    def __init__(self) -> None:
        self.positions: list[int] = []
        self.calls: list[int] = []  # messages per publish
        self.fail = False

    async def publish(self, messages: list[Any]) -> None:
        if self.fail:
            raise OSError("broker down")
        self.positions += [int(dict(m.headers)["position"]) for m in messages]
        self.calls.append(len(messages))


def test_the_relay_publishes_every_event_once_in_order_and_records_its_position_at_intervals(
        app: LedgerApplication, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under a steady trickle every round finds new events: the position is recorded every
    RELAY_POSITION_RECORD_SECONDS, not after every round (a durable commit each), then once idle."""
    async def scenario() -> None:
        bus, stopping = _Capture(), asyncio.Event()
        monkeypatch.setattr(relay_module, "RELAY_POSITION_RECORD_SECONDS", 0.2)
        recorded: list[int] = []
        processed = app.processed
        monkeypatch.setattr(app, "processed", lambda name, position: recorded.append(position) or processed(
            name, position))
        open_account(app, "acme", {"key": "g", "amount": "100"})
        task = asyncio.create_task(relay_module.run_relay(app, bus, stopping))

        def trickle() -> None:  # a debit every ~4 ms for ~0.8 s, in another thread (as HTTP holds would be)
            for i in range(200):
                apply(app, command("usage.debit", "acme", {"unit": "USD", "amount_subunits": 1, "meter": "m",
                                                           "at": NOW.isoformat()}, key=f"t{i}"))
                time.sleep(0.004)

        rounds_before = len(bus.calls)
        await asyncio.to_thread(trickle)
        rounds = len(bus.calls) - rounds_before
        await asyncio.sleep(0.3)  # idle now: what was published is recorded
        last = app.recorder.max_notification_id()
        assert app.process_recorder.max_tracking_id(relay_module.RELAY_NAME) == last
        assert rounds >= 10 and len(recorded) <= rounds // 3, (rounds, recorded)
        stopping.set()
        await task
        assert bus.positions == list(range(1, last + 1))

    asyncio.run(scenario())


def test_a_stopped_relay_records_what_it_published_and_the_next_resumes_after_it(
        app: LedgerApplication, monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        monkeypatch.setattr(relay_module, "RELAY_POSITION_RECORD_SECONDS", 3600.0)  # only on stop or idle
        monkeypatch.setattr(relay_module, "RELAY_BATCH_EVENTS_MAX", 3)  # never idle while there is a backlog
        _some_history(app)
        first, stopping = _Capture(), asyncio.Event()
        task = asyncio.create_task(relay_module.run_relay(app, first, stopping))
        while len(first.positions) < 6:
            await asyncio.sleep(0.001)
        first.fail = True  # the broker goes away: the relay stops with what it published recorded
        with pytest.raises(OSError):
            await task
        published = first.positions[-1]
        assert app.process_recorder.max_tracking_id(relay_module.RELAY_NAME) == published
        second, stopping = _Capture(), asyncio.Event()
        task = asyncio.create_task(relay_module.run_relay(app, second, stopping))
        while not second.positions or second.positions[-1] < app.recorder.max_notification_id():
            await asyncio.sleep(0.001)
        stopping.set()
        await task
        assert second.positions == list(range(published + 1, app.recorder.max_notification_id() + 1))

    asyncio.run(scenario())

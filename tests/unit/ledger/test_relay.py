"""The relay's direct path (stored JSON -> record) gives the same bytes as decoding the domain event."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import orjson
import pytest
from billing_events import ids
from billing_events.messages import LedgerEvent
from billing_ledger import relay as relay_module
from billing_ledger.application import LedgerApplication
from billing_ledger.relay import _direct_message, _mapped_message, _walked_message, to_message
from billing_ledger.sweeper import Sweeper
from billing_ledger.transcoder import encode_plain_state
from billing_runtime.bus import OutMessage
from eventsourcing.persistence import Notification

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


USAGE_TOPIC = "billing_ledger.domain.account:BillingAccount.UsageDebited"


def _stored(app: LedgerApplication, state: dict[str, Any], position: int = 7, plain: bool = True,
            topic: str = USAGE_TOPIC) -> Any:
    """A notification of ``state`` as the ledger stores it (``encode_plain_state`` when it takes it)."""
    encoded = encode_plain_state(state) if plain else None
    return Notification(id=position, originator_id=uuid.uuid4(), originator_version=3, topic=topic,
                        state=encoded if encoded is not None else app.mapper.transcoder.encode(state))


def _same_records(app: LedgerApplication, n: Any, mapped: bool = True) -> OutMessage:
    direct = _direct_message(n)
    for other in (_walked_message(n), *([_mapped_message(app, n)] if mapped else [])):
        assert (direct.topic, direct.key, direct.value, direct.headers) == (
            other.topic, other.key, other.value, other.headers), n.state
    return direct


def _odd_states() -> list[dict[str, Any]]:
    grant = str(uuid.uuid4())
    usage = {
        "timestamp": NOW, "chain_hash": "0" * 64, "command_id": uuid.uuid4(), "meter": "tokens", "unit": "USD",
        "amount": 2_000, "tenant": "acme",
        "postings": [{"account": "tenant_wallet", "unit": "USD", "amount": 1_500, "grant_id": grant},
                     {"account": "recognised_revenue", "unit": "USD", "amount": -1_500, "grant_id": grant},
                     {"account": "receivables", "unit": "USD", "amount": 500, "grant_id": None},
                     {"account": "recognised_revenue", "unit": "USD", "amount": -500, "grant_id": None}],
        "draws": [{"grant_id": grant, "amount": 1_000}], "overage": 500, "credit_grant": None,
        # The longest number the direct path takes (18 digits; 19 and more go the mapped way: test below).
        "cause": {"event_id": "é☃\"\n\\u00e9 \x01", "n": 1.5, "ok": True, "none": None, "big": -(10**18 - 1)},
    }
    return [
        usage,
        {**usage, "tenant": "ü-ß☃"},
        {**usage, "tenant": None}, {**usage, "tenant": 5},
        {**usage, "hold_id": uuid.uuid4(), "expires_at": datetime(2026, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
         "at": datetime(2026, 1, 1, tzinfo=UTC), "placed": datetime(1, 1, 1, tzinfo=UTC)},
        {**usage, "meter": "_type_"}, {**usage, "cause": {"note": 'say "_type_"', "x": '\\"_type_\\"'}},
        # Values encode_plain_state declines (the transcoder's walk writes them): tags below the top level.
        {**usage, "cause": {"id": uuid.uuid4(), "at": datetime(2026, 5, 6, 7, 8, 9, 123, tzinfo=UTC),
                            "price": Decimal("0.000000000001"), "deep": [{"a": [uuid.uuid4(), Decimal("-1E+3")]}]}},
        {**usage, "price": Decimal("12.50"), "ratio": Decimal("1E-12"), "nan": Decimal("NaN")},
        {**usage, "at": datetime(2026, 11, 21, 10, 0, tzinfo=timezone(timedelta(hours=5, minutes=30)))},
        {**usage, "draws": [{"grant_id": uuid.uuid4(), "amount": 1}], "tuple": ("a", 1)},
        {"timestamp": NOW, "originator_topic": "billing_ledger.domain.account:BillingAccount", "tenant": "t",
         "currency": "USD", "empty": {}, "list": [], "float": 0.1, "neg": -0.0},
    ]


def test_direct_records_equal_the_walks_and_the_mapped_ones_for_odd_values(app: LedgerApplication) -> None:
    for plain in (True, False):
        for state in _odd_states():
            _same_records(app, _stored(app, state, plain=plain))


LONG_INTEGERS = [2**70, -(2**63) - 1, 2**64, 2**64 - 1, 2**63, -(2**63), 10**18, -(10**40)]


def test_integers_beyond_64_bits_are_relayed_exact(app: LedgerApplication) -> None:
    """A command's payload integers beyond 64 bits (here a usage debit's cause, recorded as sent) reach
    ``billing.ledger.events`` as the same integers. Before, the direct path read them with orjson, as floats, and
    relayed 2**70 as 1.1805916207174113e+21 (and 2**64 as 1.8446744073709552e+19)."""
    open_account(app, "acme", {"key": "paid", "amount": "25.50"})
    cause = {"event_ids": ["e1"], "counters": LONG_INTEGERS, "big": 2**70, "nested": {"small": -(2**63) - 1}}
    apply(app, command("usage.debit", "acme", {"unit": "USD", "amount_subunits": 1_000, "meter": "api_calls",
                                               "at": NOW.isoformat(), "cause": cause}, key="long"))
    notifications = list(app.recorder.select_notifications(1, 10_000))
    rows = [(n.id, str(n.originator_id), n.originator_version, n.topic, n.state) for n in notifications]
    for messages in (relay_module.to_messages(app, notifications), relay_module._row_messages(app, rows)):
        [debit] = [json.loads(m.value) for m in messages if dict(m.headers)["type"] == b"BillingAccount.UsageDebited"]
        assert debit["data"]["cause"] == cause
    # The same for every such integer, stored by either encoder, and as the mapped record writes it.
    for number in LONG_INTEGERS:
        n = _stored(app, {"timestamp": NOW, "tenant": "acme", "number": number}, plain=False)
        record = to_message(app, n)
        assert record.value == _mapped_message(app, n).value
        assert json.loads(record.value)["data"]["number"] == number


@pytest.mark.parametrize("when", [
    NOW, NOW.replace(microsecond=1), NOW.replace(microsecond=999_999), NOW.replace(microsecond=100_000),
    datetime(1, 1, 1, tzinfo=UTC), datetime(999, 12, 31, 23, 59, 59, tzinfo=UTC),
    datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
    NOW.astimezone(timezone(timedelta(hours=-8))), NOW.replace(microsecond=5).astimezone(timezone(timedelta(hours=14))),
    datetime(2026, 3, 29, 1, 30, tzinfo=timezone(timedelta(hours=1), "CET")),
])
def test_recorded_at_is_the_mapped_ones_for_any_stored_timestamp(app: LedgerApplication, when: datetime) -> None:
    n = _stored(app, {"timestamp": when, "tenant": "acme", "amount": 1}, plain=False)
    record = _same_records(app, n)
    assert LedgerEvent.model_validate_json(record.value).recorded_at == when


@pytest.mark.parametrize("text", [
    "2026-11-21T10:00:00+00:00", "2026-11-21T10:00:00.000000+00:00", "2026-11-21T10:00:00.000001+00:00",
    "2026-11-21T10:00:00,500000+00:00", "2026-11-21T10:00:00.5+00:00", "2026-11-21 10:00:00+00:00",
    "2026-11-21T10:00:00Z", "2026-11-21T10:00+00:00", "2026-11-21T10:00:00.123456-00:00",
    "2026-11-21T10:00:00+01:00", "20261121T100000+00:00", "2026-11-21T10:00:00.1234567+00:00",
])
def test_a_stored_timestamp_text_is_reused_only_when_it_is_the_records(text: str) -> None:
    """Texts ``isoformat()`` never writes (the ledger's are all its) are parsed and written as before."""
    state = orjson.dumps({"timestamp": {"_type_": "datetime_iso", "_data_": text}, "tenant": "acme"})
    n = Notification(id=1, originator_id=uuid.uuid4(), originator_version=1, topic=USAGE_TOPIC, state=state)
    direct, walked = _direct_message(n), _walked_message(n)
    assert direct.value == walked.value
    assert orjson.loads(direct.value)["recorded_at"] == orjson.dumps(
        datetime.fromisoformat(text).astimezone(UTC), option=orjson.OPT_UTC_Z).decode().strip('"')


def test_unknown_tags_and_odd_stored_states_take_the_mapped_way(app: LedgerApplication) -> None:
    stamp = {"_type_": "datetime_iso", "_data_": NOW.isoformat()}
    odd = [
        {"timestamp": stamp, "amount": {"_type_": "other", "_data_": "1"}},
        {"timestamp": stamp, "amount": {"_type_": "decimal_str", "_data_": "1", "extra": 1}},
        {"timestamp": stamp, "amount": {"_type_": "decimal_str", "_data_": 1}},
        {"timestamp": stamp, "cause": [{"_type_": "other", "_data_": "1"}]},
        {"timestamp": stamp, "cause": {"_type_": "x"}}, {"timestamp": stamp, "cause": {"a": {"_type_": "x"}}},
        {"timestamp": stamp, "class_version": 2},
        {"timestamp": NOW.isoformat()},
        {"amount": 1},
    ]
    for state in odd:  # to_message takes the mapped way with them (or fails with its error)
        n = Notification(id=1, originator_id=uuid.uuid4(), originator_version=1, topic=USAGE_TOPIC,
                         state=orjson.dumps(state))
        with pytest.raises(relay_module._Unusual):
            _direct_message(n)


def test_the_ledgers_own_states_are_not_walked(app: LedgerApplication, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tags at the top level only (``encode_plain_state``'s, and most of the transcoder's): no walk."""
    _some_history(app)
    notifications = app.recorder.select_notifications(1, 10_000)
    expected = [_walked_message(n).value for n in notifications]

    def walk(n: Any) -> Any:
        raise AssertionError(n.state)

    monkeypatch.setattr(relay_module, "_walked_message", walk)
    assert [_direct_message(n).value for n in notifications] == expected


def test_rows_read_back_give_the_notifications_records(app: LedgerApplication) -> None:
    """The relay's read on PostgreSQL (``select_notification_rows``: the originator id as text), odd states too."""
    _some_history(app)
    notifications = list(app.recorder.select_notifications(1, 10_000))
    position = notifications[-1].id
    for plain in (True, False):
        for state in _odd_states():
            position += 1
            notifications.append(_stored(app, state, position=position, plain=plain))
    stamp = {"_type_": "datetime_iso", "_data_": NOW.isoformat()}
    notifications.append(Notification(id=position + 1, originator_id=uuid.uuid4(), originator_version=1,
                                      topic=USAGE_TOPIC, state=orjson.dumps({"timestamp": stamp, "class_version": 2})))
    rows = [(n.id, str(n.originator_id), n.originator_version, n.topic, n.state) for n in notifications]
    assert [(m.topic, m.key, m.value, m.headers) for m in relay_module._row_messages(app, rows)] == [
        (m.topic, m.key, m.value, m.headers) for m in relay_module.to_messages(app, notifications)]

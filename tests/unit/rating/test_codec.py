"""Rating's hot-path codec gives what the pydantic models give: the same accepted usage, the same command bytes.

The fast decoder may only ever say "not mine" (and hand the message to ``AcceptedUsage``): whatever it accepts
must be exactly what the model accepts, with the same values; whatever the model refuses it must refuse.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any
from uuid import UUID

import pytest
from billing_events import ids
from billing_events.messages import AcceptedUsage, LedgerCommand, UsageEvent
from billing_rating import codec
from billing_rating.charge_models import amount, parse_spec, price
from billing_rating.codec import Usage, debit_command_json, decode_accepted, timestamp_text, usage_command_id
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

NOW = datetime(2026, 11, 21, 10, 0, 0, 123456, tzinfo=UTC)


def message(**changes: Any) -> dict[str, Any]:
    """An accepted usage message as ingest writes it (every field present), with ``changes`` applied."""
    event = UsageEvent(id="e1", tenant="acme", meter="api_calls", quantity="3", timestamp=NOW,
                       properties={"model": "gpt-4o", "tokens": 12, "cached": True})
    data = json.loads(AcceptedUsage(account_id=ids.account_id("acme"), event=event, accepted_at=NOW,
                                    source="kafka:billing.usage.raw:0:1", catalog_version=3).to_json())
    for key, value in changes.items():
        if key.startswith("event."):
            if value is _DROP:
                data["event"].pop(key[6:])
            else:
                data["event"][key[6:]] = value
        elif value is _DROP:
            data.pop(key)
        else:
            data[key] = value
    return data


_DROP = object()


def as_model_would(raw: bytes) -> Usage | None:
    """The model's answer in the codec's terms, or None when the model refuses the message."""
    try:
        model = AcceptedUsage.model_validate_json(raw)
    except ValidationError:
        return None
    e = model.event
    return Usage(str(model.account_id), codec.Event(e.id, e.tenant, e.meter, e.quantity, e.timestamp,
                                                    dict(e.properties), e.correction_of),
                 model.source, model.catalog_version)


def same(a: Usage, b: Usage) -> bool:
    ea, eb = a.event, b.event
    return (a.account, a.source, a.catalog_version, ea.id, ea.tenant, ea.meter, ea.quantity, ea.timestamp,
            ea.properties, ea.correction_of) == (
        b.account, b.source, b.catalog_version, eb.id, eb.tenant, eb.meter, eb.quantity, eb.timestamp,
        eb.properties, eb.correction_of) and ea.timestamp.tzinfo == eb.timestamp.tzinfo and (
        str(ea.quantity) == str(eb.quantity))


VARIANTS: list[dict[str, Any]] = [
    {},
    {"event.quantity": "0.000001"}, {"event.quantity": 7}, {"event.quantity": "1E+3"}, {"event.quantity": "-1"},
    {"event.quantity": 1.5}, {"event.quantity": True}, {"event.quantity": "12345678901234567"},
    {"event.quantity": "nan"}, {"event.quantity": None},
    {"event.timestamp": "2026-11-21T12:00:00+02:00"}, {"event.timestamp": "2026-11-21T10:00:00"},
    {"event.timestamp": "2026-11-21 10:00:00Z"}, {"event.timestamp": "not a time"}, {"event.timestamp": 5},
    {"event.tenant": "bad tenant"}, {"event.tenant": "a" * 129}, {"event.tenant": "acme\n"},
    {"event.meter": "Api"}, {"event.meter": "api_calls\n"},
    {"event.id": ""}, {"event.id": "x" * 129}, {"event.id": "é€😀"}, {"event.id": 12},
    {"event.correction_of": "e0"}, {"event.correction_of": "x" * 129}, {"event.correction_of": 3},
    {"event.properties": {}}, {"event.properties": {"n": 1.5}}, {"event.properties": {"": "x"}},
    {"event.properties": {"v": "x" * 257}}, {"event.properties": {f"p{i}": i for i in range(33)}},
    {"event.properties": {"nested": {"a": 1}}}, {"event.properties": None}, {"event.properties": _DROP},
    {"event.correction_of": _DROP}, {"event.extra": 1},
    {"schema": "usage.accepted/v2"}, {"schema": _DROP}, {"extra": 1},
    {"account_id": "911CB755-D968-5325-B3B8-B8D87D7E86D9"}, {"account_id": "nope"},
    {"accepted_at": "2026-11-21T10:00:00"}, {"accepted_at": "2026-13-21T10:00:00Z"},
    {"accepted_at": "2026-11-21T10:00:00.123+05:30"}, {"catalog_version": -1}, {"catalog_version": "3"},
    {"catalog_version": True}, {"source": 5},
]


@pytest.mark.parametrize("changes", VARIANTS, ids=[json.dumps(v, default=str)[:60] for v in VARIANTS])
def test_the_fast_decoder_answers_as_the_model_does(changes: dict[str, Any]) -> None:
    raw = json.dumps(message(**changes)).encode()
    expected = as_model_would(raw)
    if expected is None:
        with pytest.raises(ValidationError):
            decode_accepted(raw)
        assert codec._fast(raw) is None
    else:
        assert same(decode_accepted(raw), expected)
        fast = codec._fast(raw)
        assert fast is None or same(fast, expected)


def test_the_fast_decoder_takes_what_ingest_writes() -> None:
    raw = json.dumps(message()).encode()
    assert codec._fast(raw) is not None
    assert codec._fast(b"\xff{not json") is None
    with pytest.raises(ValidationError):
        decode_accepted(b"\xff{not json")


def test_a_dead_letter_payload_is_the_event_as_the_model_writes_it() -> None:
    raw = json.dumps(message(**{"event.timestamp": "2026-11-21T12:00:00.5+02:00"})).encode()
    usage = decode_accepted(raw)
    assert usage.event.model_dump_json() == AcceptedUsage.model_validate_json(raw).event.model_dump_json()
    moved = usage.event.at(datetime(2026, 10, 1, tzinfo=UTC))
    assert moved.timestamp_text() == "2026-10-01T00:00:00+00:00" != usage.event.timestamp_text()


@given(st.text(min_size=1, max_size=40), st.text(min_size=1, max_size=80))
@settings(max_examples=300)
def test_usage_command_ids_are_the_uuid5_of_ids(tenant: str, event_id: str) -> None:
    try:
        expected = str(ids.usage_command_id(tenant, event_id))
    except UnicodeEncodeError:
        return  # lone surrogates: neither can encode them (and JSON never carries them)
    assert usage_command_id(tenant, event_id) == expected


def payloads() -> list[dict[str, Any]]:
    price_spec = {"model": "graduated", "unit": "USD", "tiers": [{"up_to": "10", "unit_amount": "1.00"},
                                                                 {"up_to": None, "unit_amount": "0.50"}]}
    cause = {"event_ids": ["e1"], "period": "2026-11", "quantity": "3", "quantity_before": "0",
             "quantity_after": "3", "group": "", "usage_type": "api", "catalog_version": 2, "price": price_spec,
             "included": "0", "overage_policy": "overage", "priced_by": "list_price",
             "properties": {"user": "ann \"quoted\" \\ é€😀 \u2028 \x1f\x7f", "model": "m"}, "user": "ann",
             "model": "m", "operation": None}
    base = {"unit": "USD", "amount_subunits": 3_000_000_000, "amount": "3.000000000", "meter": "api_calls",
            "at": "2026-11-21T10:00:00+00:00", "overage_policy": "overage", "cause": cause}
    ai = {**base, "amount_subunits": -45, "cause": {**cause, "ai_prices": {"unit": "USD", "models": {
        "small": {"input": "0.15"}}}, "tokens": {"input": "1000"}, "tokens_before": {"input": "0"}}}
    late = {**base, "cause": {**cause, "late": "late_adjustment", "original_period": "2026-10",
                              "corrects": "e0", "quantity_old": "1", "quantity_new": "0"}}
    decimals = {**base, "cause": {**cause, "included": Decimal("2.50")}}
    huge = {**base, "amount_subunits": 2**70}
    return [base, ai, late, decimals, huge]


@pytest.mark.parametrize("payload", payloads())
@pytest.mark.parametrize("issued_at", [NOW, NOW.replace(microsecond=0),
                                       NOW.astimezone(timezone(timedelta(hours=2)))])
def test_debit_commands_are_the_bytes_the_model_writes(payload: dict[str, Any], issued_at: datetime) -> None:
    command_id = usage_command_id("acme", "e1")
    model = LedgerCommand(command_id=UUID(command_id), kind="usage.debit", tenant="acme", issued_at=issued_at,
                          issued_by="service:rating", payload=payload).to_json()
    fast = debit_command_json(command_id, "acme", issued_at, timestamp_text(issued_at), payload)
    assert fast == model
    assert LedgerCommand.model_validate_json(fast).command_id == UUID(command_id)


SPECS = [
    {"model": "per_unit", "unit": "USD", "unit_amount": "0.000012"},
    {"model": "graduated", "unit": "USD", "tiers": [{"up_to": "10", "unit_amount": "1.00", "flat_amount": "2"},
                                                    {"up_to": "100.5", "unit_amount": "0.5"},
                                                    {"up_to": None, "unit_amount": "0.25", "flat_amount": "1"}]},
    {"model": "volume", "unit": "USD", "tiers": [{"up_to": "10", "unit_amount": "1"},
                                                 {"up_to": None, "unit_amount": "0.5"}]},
    {"model": "flat", "unit": "USD", "amount": "9"},
    {"model": "package", "unit": "USD", "package_size": "100", "package_amount": "5"},
]


@given(st.sampled_from(SPECS), st.integers(min_value=0, max_value=10**9).map(lambda n: Decimal(n).scaleb(-3)))
@settings(max_examples=400)
def test_the_amount_only_path_is_the_price_amount(spec: dict[str, Any], quantity: Decimal) -> None:
    parsed = parse_spec(spec)
    assert amount(parsed, quantity) == price(parsed, quantity).amount

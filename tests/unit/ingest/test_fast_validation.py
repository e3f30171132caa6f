"""The fast path of ingest (orjson decoding, plain checks, the accepted record written by orjson) against the
reference it replaces (the exact decoder, ``UsageEvent.model_validate``, ``AcceptedUsage(...).to_json()``):
on random input it accepts only what the schema accepts, with equal models, and writes the same bytes."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import orjson
import pytest
from billing_events import ids
from billing_events.messages import AcceptedUsage, RejectReason, UsageEvent
from billing_ingest import service, validation
from billing_ingest.service import accepted_record
from billing_ingest.validation import Invalid, parse_exact, parse_raw
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.ingest.test_ingest_properties import events, json_values, near_valid_events

NOW = datetime(2026, 11, 21, 12, 0, 0, 250000, tzinfo=UTC)

texts = st.text(alphabet=st.characters(codec="utf-8"), max_size=12) | st.sampled_from(
    ["", "a\nb", "\x00\x1f\x7f", "\u2028", '"\\', "é", "🎉", "x" * 256, "x" * 257])
valid_texts = st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=12)
offsets = st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8))])


FIELDS = ("id", "tenant", "meter", "quantity", "properties", "property_name", "property_value", "correction_of")


@st.composite
def plain_events(draw: st.DrawFn) -> dict[str, Any]:
    """Events of the shape the fast path takes, with values at every limit of the schema, and in one event
    out of two one field (or property) just beyond its limit or of a wrong type."""
    broken = draw(st.sampled_from((None,) * len(FIELDS) + FIELDS))

    def pick(field: str, valid: st.SearchStrategy[Any], invalid: st.SearchStrategy[Any]) -> Any:
        return draw(invalid if field == broken else valid)

    moment = draw(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1)))
    if draw(st.booleans()):
        moment = moment.replace(microsecond=0)
    event: dict[str, Any] = {
        "id": pick("id", st.sampled_from(["e", "x" * 128]) | valid_texts, st.sampled_from(["x" * 129, "", 7])),
        "tenant": pick("tenant", st.sampled_from(["acme", "a.b-c_d", "A" * 128, "9"]),
                       st.sampled_from(["bad tenant", "acme\n", "-x", "A" * 129, "é"]) | texts),
        "meter": pick("meter", st.sampled_from(["api_calls", "ai_tokens", "m" * 64]),
                      st.sampled_from(["Bad", "m\n", "m" * 65])),
        "quantity": pick("quantity", st.one_of(
            st.integers(min_value=0, max_value=10**15 - 1),
            st.sampled_from(["0", "007", "999999999999999", "0.5", " 5", "1e3", "1E+2", "-0"]),
            st.decimals(min_value=0, max_value=10**6, places=3).map(str)),
            st.one_of(st.integers(min_value=-2, max_value=-1), st.integers(min_value=10**15, max_value=10**16),
                      st.sampled_from(["1000000000000000", "١٢", "", "-1", "0x1", True, None]))),
        "timestamp": moment.replace(tzinfo=draw(offsets)).isoformat(),
    }
    if broken in ("properties", "property_name", "property_value") or draw(st.booleans()):
        names = st.sampled_from(["model", "operation", "x" * 64]) | valid_texts
        values = st.one_of(valid_texts, st.just("v" * 256), st.integers(min_value=-2**63, max_value=2**64 - 1),
                           st.booleans())
        properties = draw(st.dictionaries(names, values, max_size=4))
        if broken == "properties":
            properties = draw(st.sampled_from([None, [], "x", {str(i): i for i in range(33)}]))
        elif broken == "property_name":
            properties[draw(st.sampled_from(["", "x" * 65]))] = 1
        elif broken == "property_value":
            properties["bad"] = draw(st.sampled_from([None, "v" * 257, [1], {"a": 1}]))
        event["properties"] = properties
    if broken == "correction_of" or draw(st.booleans()):
        event["correction_of"] = pick("correction_of", st.none() | valid_texts | st.just("x" * 128),
                                      st.sampled_from(["x" * 129, 5]))
    return event


def encodings(value: Any) -> list[bytes]:
    """The same JSON as an ASCII-escaped and as a raw UTF-8 document (lone surrogates as their bytes)."""
    text = json.dumps(value, default=str)
    return [text.encode(), json.dumps(value, default=str, ensure_ascii=False).encode("utf-8", "surrogatepass")]


def assert_same(raw: bytes) -> None:
    fast, reference = parse_raw(raw), parse_exact(raw)
    if isinstance(reference, Invalid):
        assert fast == reference
        return
    assert isinstance(fast, UsageEvent)
    assert fast == reference
    assert fast.model_fields_set == reference.model_fields_set
    assert fast.model_dump_json() == reference.model_dump_json()
    assert type(fast.quantity) is Decimal and str(fast.quantity) == str(reference.quantity)
    assert fast.timestamp.tzinfo is UTC and fast.timestamp == reference.timestamp
    record = accepted_record(fast, NOW, "kafka:raw:0:7", 3)
    assert record == AcceptedUsage(account_id=ids.account_id(fast.tenant), event=reference, accepted_at=NOW,
                                   source="kafka:raw:0:7", catalog_version=3).to_json()


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plain_events())
def test_plain_events_give_what_the_schema_gives(event: dict[str, Any]) -> None:
    for raw in encodings(event):
        assert_same(raw)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(events(), near_valid_events(), json_values))
def test_any_json_gives_what_the_schema_gives(value: Any) -> None:
    for raw in encodings(value):
        assert_same(raw)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_any_bytes_give_what_the_schema_gives(raw: bytes) -> None:
    assert_same(raw)


def test_a_plain_event_takes_the_fast_path() -> None:
    data = orjson.loads(b'{"id":"e1","tenant":"acme","meter":"ai_tokens","quantity":"12","timestamp":'
                        b'"2026-11-21T10:00:00.5+01:00","properties":{"model":"m","n":3,"b":true}}')
    event = validation._plain_usage(data)
    assert event is not None
    assert event.timestamp == datetime(2026, 11, 21, 9, 0, 0, 500000, tzinfo=UTC)
    assert event.model_fields_set == {"id", "tenant", "meter", "quantity", "timestamp", "properties"}


@pytest.mark.parametrize("raw", [
    b'{"id":"e","tenant":"acme","meter":"api_calls","quantity":0.1,"timestamp":"2026-11-21T10:00:00Z"}',
    (b'{"id":"e","tenant":"acme","meter":"api_calls","quantity":18446744073709551616,'
    b'"timestamp":"2026-11-21T10:00:00Z"}'),
    (b'{"id":"e","tenant":"acme","meter":"api_calls","quantity":"1","timestamp":"2026-11-21T10:00:00Z",'
    b'"properties":{"n":1.5}}'),
])
def test_numbers_with_a_point_or_beyond_64_bits_never_pass_through_a_float(raw: bytes) -> None:
    assert validation._plain_usage(orjson.loads(raw)) is None  # orjson read a float: the exact decoder decides
    assert_same(raw)


@pytest.mark.parametrize("timestamp", ["0001-01-01T00:00:00+05:00", "9999-12-31T23:59:59-05:00"])
def test_a_time_that_leaves_the_utc_range_is_rejected_not_raised(timestamp: str) -> None:
    event = {"id": "e", "tenant": "acme", "meter": "api_calls", "quantity": "1", "timestamp": timestamp}
    for item in (json.dumps(event).encode(), event):
        result = parse_raw(item)
        assert isinstance(result, Invalid) and result.reason == RejectReason.SCHEMA_INVALID
        assert result.event_id == "e"


def test_an_integer_property_beyond_64_bits_is_written_by_the_model() -> None:
    event = parse_raw({"id": "e", "tenant": "acme", "meter": "api_calls", "quantity": "1",
                       "timestamp": "2026-11-21T10:00:00Z", "properties": {"n": 2**70}})
    assert isinstance(event, UsageEvent)
    record = accepted_record(event, NOW, "http:r:0", 1)
    assert json.loads(record)["event"]["properties"] == {"n": 2**70}
    assert record == AcceptedUsage(account_id=ids.account_id("acme"), event=event, accepted_at=NOW,
                                   source="http:r:0", catalog_version=1).to_json()


@given(st.lists(st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=offsets),
                max_size=20))
def test_event_times_are_written_as_isoformat_writes_them(moments: list[datetime]) -> None:
    utc = [m.astimezone(UTC) for m in moments]
    assert service._iso_texts(utc) == [m.isoformat() for m in utc]


def test_the_fast_path_knows_every_field_of_the_schema() -> None:
    """A field added to ``UsageEvent`` must be taught to ``_plain_usage`` (which reads these by name)."""
    fields = UsageEvent.model_fields
    assert set(fields) == {"id", "tenant", "meter", "quantity", "timestamp", "properties", "correction_of"}
    assert {name for name, field in fields.items() if field.is_required()} == {
        "id", "tenant", "meter", "quantity", "timestamp"}
    assert set(UsageEvent.__pydantic_decorators__.field_validators) == {"_bounded_properties"}
    assert not UsageEvent.__pydantic_decorators__.model_validators

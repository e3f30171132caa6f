from datetime import UTC, datetime, timedelta

import pytest
from billing_events.messages import RejectReason, UsageEvent
from billing_ingest.validation import CatalogKnowledge, Invalid, MeterRules, VerifiedUsage, parse_raw, verify

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
KNOWS = CatalogKnowledge(frozenset({"acme"}), {"api_calls": MeterRules("api_calls"),
                                               "ai_tokens": MeterRules("ai_tokens", ("model", "operation"))})


def check(raw: bytes) -> VerifiedUsage | Invalid:
    parsed = parse_raw(raw)
    if isinstance(parsed, Invalid):
        return parsed
    return verify(parsed, KNOWS, now=NOW, future_skew=timedelta(minutes=5), window=timedelta(days=35))


def event(**overrides: object) -> bytes:
    import json

    base = {"id": "e1", "tenant": "acme", "meter": "api_calls", "quantity": "3",
            "timestamp": "2026-11-21T10:00:00Z"}
    base.update(overrides)
    return json.dumps(base).encode()


def test_a_good_event_is_verified_with_an_exact_quantity() -> None:
    result = check(event(quantity="0.000001"))
    assert isinstance(result, VerifiedUsage)
    assert str(result.event.quantity) == "0.000001"


@pytest.mark.parametrize(("raw", "reason"), [
    (b"{nope", RejectReason.INVALID_JSON),
    (b"[]", RejectReason.SCHEMA_INVALID),
    (event(quantity="-1"), RejectReason.INVALID_QUANTITY),
    (b'{"id":"e","tenant":"acme","meter":"api_calls","quantity":1e400,"timestamp":"2026-11-21T10:00:00Z"}',
     RejectReason.INVALID_QUANTITY),
    (b'{"id":"e","tenant":"acme","meter":"api_calls","quantity":NaN,"timestamp":"2026-11-21T10:00:00Z"}',
     RejectReason.INVALID_JSON),
    (event(timestamp="2026-11-21T10:00:00"), RejectReason.NAIVE_TIMESTAMP),
    (event(timestamp="2026-11-21T12:06:00Z"), RejectReason.FUTURE_TIMESTAMP),
    (event(timestamp="2026-09-01T00:00:00Z"), RejectReason.TOO_OLD),
    (event(tenant="globex"), RejectReason.UNKNOWN_TENANT),
    (event(meter="gpu_hours"), RejectReason.UNKNOWN_METER),
    (event(meter="ai_tokens", properties={"model": "m"}), RejectReason.MISSING_PROPERTY),
    (event(extra="x"), RejectReason.SCHEMA_INVALID),
    (b"x" * 20000, RejectReason.PAYLOAD_TOO_LARGE),
])
def test_bad_events_get_a_reason(raw: bytes, reason: RejectReason) -> None:
    result = check(raw)
    assert isinstance(result, Invalid), result
    assert result.reason == reason


def test_a_float_quantity_is_never_a_binary_float() -> None:
    result = parse_raw(b'{"id":"e","tenant":"acme","meter":"api_calls","quantity":0.1,'
                       b'"timestamp":"2026-11-21T10:00:00Z"}')
    assert isinstance(result, UsageEvent)
    assert str(result.quantity) == "0.1"

"""Validation of raw usage events into a separate verified type. Pure: no I/O, the clock is an argument."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from billing_events.messages import RAW_EVENT_BYTES_MAX, RejectReason, UsageEvent
from pydantic import ValidationError


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not a number")


# ``billing_events.messages.loads_exact`` with its decoder built once (json.loads builds one per call, which
# costs about as much as decoding a small event): numbers with a point or exponent -> Decimal, no NaN.
_EXACT_JSON = json.JSONDecoder(parse_float=Decimal, parse_constant=_refuse_constant)


def loads_exact_bytes(raw: bytes | bytearray) -> object:
    return _EXACT_JSON.decode(bytes(raw).decode(json.detect_encoding(raw), "surrogatepass"))


@dataclass(frozen=True, slots=True)
class MeterRules:
    code: str
    required_properties: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CatalogKnowledge:
    """What ingest knows of the catalogue (learnt from ``billing.ledger.events``)."""

    tenants: frozenset[str]
    meters: dict[str, MeterRules]
    catalog_version: int = 0


@dataclass(frozen=True, slots=True)
class VerifiedUsage:
    """A usage event that passed every check; only this type may be published as accepted."""

    event: UsageEvent


@dataclass(frozen=True, slots=True)
class Invalid:
    reason: RejectReason
    detail: str
    tenant: str | None = None
    event_id: str | None = None


def _reason_for(error: ValidationError) -> tuple[RejectReason, str]:
    first = error.errors()[0]
    field = ".".join(str(p) for p in first.get("loc", ())) or "event"
    message = first.get("msg", "invalid").removeprefix("Value error, ")
    if field == "quantity":
        return RejectReason.INVALID_QUANTITY, f"quantity: {message}"
    if field == "timestamp" and "offset" in message:
        return RejectReason.NAIVE_TIMESTAMP, f"timestamp: {message}"
    return RejectReason.SCHEMA_INVALID, f"{field}: {message}"


def parse_raw(raw: bytes | object) -> UsageEvent | Invalid:
    """Raw bytes (a Kafka record) or an already decoded JSON value (one item of an HTTP body) -> UsageEvent,
    never through a binary float. A decoded value that is not an object is refused, even a string of JSON."""
    if isinstance(raw, (bytes, bytearray)):
        if len(raw) > RAW_EVENT_BYTES_MAX:
            return Invalid(RejectReason.PAYLOAD_TOO_LARGE, f"event larger than {RAW_EVENT_BYTES_MAX} bytes")
        try:
            data = loads_exact_bytes(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            return Invalid(RejectReason.INVALID_JSON, f"not valid JSON: {str(exc)[:120]}")
    else:
        data = raw
    if not isinstance(data, dict):
        return Invalid(RejectReason.SCHEMA_INVALID, "a usage event must be a JSON object")
    tenant = data.get("tenant") if isinstance(data.get("tenant"), str) else None
    event_id = data.get("id") if isinstance(data.get("id"), str) else None
    try:
        return UsageEvent.model_validate(data)
    except ValidationError as exc:
        reason, detail = _reason_for(exc)
        return Invalid(reason, detail, tenant=tenant, event_id=event_id)


def verify(event: UsageEvent, knowledge: CatalogKnowledge, *, now: datetime, future_skew: timedelta,
           window: timedelta) -> VerifiedUsage | Invalid:
    """Checks what the schema cannot: tenant and meter known, time window, required properties."""
    if event.tenant not in knowledge.tenants:
        return Invalid(RejectReason.UNKNOWN_TENANT, f"tenant {event.tenant!r} has no billing account",
                       event.tenant, event.id)
    rules = knowledge.meters.get(event.meter)
    if rules is None:
        return Invalid(RejectReason.UNKNOWN_METER, f"meter {event.meter!r} is not in the catalogue",
                       event.tenant, event.id)
    if event.timestamp > now + future_skew:
        return Invalid(RejectReason.FUTURE_TIMESTAMP,
                       f"timestamp is more than {int(future_skew.total_seconds())} s in the future",
                       event.tenant, event.id)
    if event.timestamp < now - window:
        return Invalid(RejectReason.TOO_OLD, f"timestamp is older than the {window.days}-day dedup window",
                       event.tenant, event.id)
    missing = [p for p in rules.required_properties if p not in event.properties]
    if missing:
        return Invalid(RejectReason.MISSING_PROPERTY, f"meter {event.meter!r} requires properties {missing}",
                       event.tenant, event.id)
    return VerifiedUsage(event)

"""Validation of raw usage events into a separate verified type. Pure: no I/O, the clock is an argument.

Raw Kafka records take a fast path when they are plain (decoded by orjson, only the field types an event
may have, every limit met): the checks of ``UsageEvent``'s schema in straight Python and the model built
without pydantic's validators, about five times cheaper. Anything else, and every event the fast path does
not accept, goes through ``UsageEvent.model_validate`` on the exact decoder exactly as before, so every
rejection keeps its reason and detail; the fast path only ever accepts what the schema accepts, with the
same values (``tests/unit/ingest/test_fast_validation.py`` checks it against the schema on random input).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
from billing_events.messages import (
    CODE_PATTERN,
    EVENT_ID_LENGTH_MAX,
    PROPERTIES_COUNT_MAX,
    PROPERTY_NAME_LENGTH_MAX,
    PROPERTY_VALUE_LENGTH_MAX,
    RAW_EVENT_BYTES_MAX,
    TENANT_PATTERN,
    RejectReason,
    UsageEvent,
)
from billing_events.money import DECIMAL_INT_DIGITS_MAX, parse_decimal
from billing_events.timeutil import parse_timestamp
from pydantic import ValidationError


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not a number")


# ``billing_events.messages.loads_exact`` with its decoder built once (json.loads builds one per call, which
# costs about as much as decoding a small event): numbers with a point or exponent -> Decimal, no NaN.
_EXACT_JSON = json.JSONDecoder(parse_float=Decimal, parse_constant=_refuse_constant)


def loads_exact_bytes(raw: bytes | bytearray) -> object:
    return _EXACT_JSON.decode(bytes(raw).decode(json.detect_encoding(raw), "surrogatepass"))


# The schema's own fields and patterns (fullmatch: ``$`` alone would let a trailing newline through, which
# the schema's regex engine does not).
_FIELDS = frozenset(UsageEvent.model_fields)
_TENANT = re.compile(TENANT_PATTERN)
_CODE = re.compile(CODE_PATTERN)
# A non-negative integer quantity below this has at most ``DECIMAL_INT_DIGITS_MAX`` digits: valid as it is.
_INT_QUANTITY_BOUND = 10**DECIMAL_INT_DIGITS_MAX
_new_model = object.__new__
_set_slot = object.__setattr__


def _plain_usage(data: dict[str, Any]) -> UsageEvent | None:
    """The ``UsageEvent`` of a decoded JSON object whose every field is plainly valid, else None (then the
    schema decides, and explains).

    Only exact JSON types pass: a float (orjson's reading of any number with a point or exponent, or of an
    integer beyond 64 bits) falls back to the exact decoder, so no quantity is ever read through a binary
    float. The model is built as ``model_construct`` would (same ``__dict__`` and fields set), without its
    per-field overhead; the checks are those of the schema, in the same terms.
    """
    if not _FIELDS.issuperset(data):
        return None
    try:
        event_id = data["id"]
        tenant = data["tenant"]
        meter = data["meter"]
        quantity = data["quantity"]
        timestamp = data["timestamp"]
    except KeyError:
        return None
    if type(event_id) is not str or not 0 < len(event_id) <= EVENT_ID_LENGTH_MAX:
        return None
    if type(tenant) is not str or _TENANT.fullmatch(tenant) is None:
        return None
    if type(meter) is not str or _CODE.fullmatch(meter) is None:
        return None
    if type(timestamp) is not str:
        return None
    if type(quantity) is str:
        # Plain ASCII digits within the integer bound: exactly what ``parse_decimal`` would answer, cheaper.
        exact = (Decimal(quantity) if len(quantity) <= DECIMAL_INT_DIGITS_MAX and quantity.isascii()
                 and quantity.isdigit() else None)
    elif type(quantity) is int:
        exact = Decimal(quantity) if 0 <= quantity < _INT_QUANTITY_BOUND else None
    else:
        return None
    properties = data.get("properties")
    if properties is None:
        if "properties" in data:  # null is not a mapping
            return None
        properties = {}
    elif type(properties) is dict and len(properties) <= PROPERTIES_COUNT_MAX:
        for name, value in properties.items():
            kind = type(value)
            if not 0 < len(name) <= PROPERTY_NAME_LENGTH_MAX:
                return None
            if kind is str:
                if len(value) > PROPERTY_VALUE_LENGTH_MAX:
                    return None
            elif kind is not int and kind is not bool:
                return None
    else:
        return None
    correction_of = data.get("correction_of")
    if correction_of is not None and (type(correction_of) is not str or len(correction_of) > EVENT_ID_LENGTH_MAX):
        return None
    try:
        if exact is None:
            exact = parse_decimal(quantity, field="quantity")
        moment = parse_timestamp(timestamp).astimezone(UTC)
    except (ValueError, OverflowError):  # MoneyError, NaiveTimestampError, an unparsable or unrepresentable time
        return None
    event = _new_model(UsageEvent)
    _set_slot(event, "__dict__", {"id": event_id, "tenant": tenant, "meter": meter, "quantity": exact,
                                  "timestamp": moment, "properties": properties, "correction_of": correction_of})
    _set_slot(event, "__pydantic_fields_set__", set(data))
    _set_slot(event, "__pydantic_extra__", None)
    _set_slot(event, "__pydantic_private__", None)
    return event


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
    never through a binary float. A decoded value that is not an object is refused, even a string of JSON.

    Raw bytes try the fast path first; its every refusal, and every decoded value, goes to ``parse_exact``.
    (Decoded values never take it: the exact decoder may have read a lone surrogate, which the schema refuses
    and the fast path would not look for.)"""
    if type(raw) is bytes and len(raw) <= RAW_EVENT_BYTES_MAX:
        try:
            plain = orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass  # the exact decoder explains (or reads what orjson does not: a BOM, UTF-16, lone surrogates)
        else:
            if type(plain) is dict:
                fast = _plain_usage(plain)
                if fast is not None:
                    return fast
    return parse_exact(raw)


def parse_exact(raw: bytes | object) -> UsageEvent | Invalid:
    """``parse_raw`` through the exact decoder and the schema alone: the reference the fast path must match,
    and the reason and detail of every rejection."""
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
    except OverflowError:
        # The schema's conversion to UTC raises this (not a validation error) for a time near year 1 or 9999
        # with an offset that leaves the representable range; unanswered, it would stop the partition.
        return Invalid(RejectReason.SCHEMA_INVALID, "timestamp: not representable in UTC (date value out of range)",
                       tenant=tenant, event_id=event_id)


class Verifier:
    """``verify`` for a whole batch: the knowledge and the time bounds are looked up and computed once."""

    __slots__ = ("_earliest", "_latest", "_meters", "_skew_seconds", "_tenants", "_window_days")

    def __init__(self, knowledge: CatalogKnowledge, *, now: datetime, future_skew: timedelta,
                 window: timedelta) -> None:
        self._tenants = knowledge.tenants
        self._meters = knowledge.meters
        self._latest = now + future_skew
        self._earliest = now - window
        self._skew_seconds = int(future_skew.total_seconds())
        self._window_days = window.days

    def check(self, event: UsageEvent) -> VerifiedUsage | Invalid:
        """Checks what the schema cannot: tenant and meter known, time window, required properties."""
        if event.tenant not in self._tenants:
            return Invalid(RejectReason.UNKNOWN_TENANT, f"tenant {event.tenant!r} has no billing account",
                           event.tenant, event.id)
        rules = self._meters.get(event.meter)
        if rules is None:
            return Invalid(RejectReason.UNKNOWN_METER, f"meter {event.meter!r} is not in the catalogue",
                           event.tenant, event.id)
        if event.timestamp > self._latest:
            return Invalid(RejectReason.FUTURE_TIMESTAMP,
                           f"timestamp is more than {self._skew_seconds} s in the future",
                           event.tenant, event.id)
        if event.timestamp < self._earliest:
            return Invalid(RejectReason.TOO_OLD, f"timestamp is older than the {self._window_days}-day dedup window",
                           event.tenant, event.id)
        if rules.required_properties:
            missing = [p for p in rules.required_properties if p not in event.properties]
            if missing:
                return Invalid(RejectReason.MISSING_PROPERTY, f"meter {event.meter!r} requires properties {missing}",
                               event.tenant, event.id)
        return VerifiedUsage(event)


def verify(event: UsageEvent, knowledge: CatalogKnowledge, *, now: datetime, future_skew: timedelta,
           window: timedelta) -> VerifiedUsage | Invalid:
    """Checks what the schema cannot: tenant and meter known, time window, required properties."""
    return Verifier(knowledge, now=now, future_skew=future_skew, window=window).check(event)

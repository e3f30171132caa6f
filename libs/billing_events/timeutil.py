"""ISO 8601 time handling: every timestamp carries an offset; naive times are refused."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, AwareDatetime


class NaiveTimestampError(ValueError):
    pass


def utcnow() -> datetime:
    return datetime.now(UTC)


def parse_timestamp(value: Any) -> datetime:
    """Parses an ISO 8601 timestamp that must carry an offset (``Z`` or ``+hh:mm``)."""
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError as exc:
            raise ValueError(f"not an ISO 8601 timestamp: {value[:40]!r}") from exc
    else:
        # ValueError, not TypeError: pydantic validators report ValueError as a validation error.
        raise ValueError("timestamp must be an ISO 8601 string")  # noqa: TRY004
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise NaiveTimestampError("timestamp must carry a UTC offset, e.g. 2026-11-21T10:00:00Z")
    return parsed


def isoformat(value: datetime) -> str:
    """ISO 8601 in UTC with a ``Z``-free ``+00:00`` offset, stable for hashing and comparison."""
    return value.astimezone(UTC).isoformat()


def _to_utc(value: datetime) -> datetime:
    """The same instant in UTC; an instant outside datetime's range once in UTC (0001-01-01T00:00+01:00,
    9999-12-31T23:59-01:00) is a validation error, not an ``OverflowError`` that would escape the model."""
    try:
        return value.astimezone(UTC)
    except OverflowError as exc:
        raise ValueError(f"timestamp {value.isoformat()} is out of range in UTC") from exc


Timestamp = Annotated[AwareDatetime, AfterValidator(_to_utc)]

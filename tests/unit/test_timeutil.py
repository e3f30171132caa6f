"""Timestamps: every instant is aware and representable in UTC, or it is a validation error."""

from __future__ import annotations

import pytest
from billing_events.messages import UsageEvent
from pydantic import ValidationError


def _event(timestamp: str) -> dict[str, str]:
    return {"id": "e-1", "tenant": "acme", "meter": "api_calls", "quantity": "1", "timestamp": timestamp}


@pytest.mark.parametrize("timestamp", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:00-01:00"])
def test_an_instant_outside_utc_range_is_a_validation_error_not_an_overflow(timestamp: str) -> None:
    with pytest.raises(ValidationError, match="out of range in UTC"):
        UsageEvent.model_validate(_event(timestamp))


def test_offsets_are_normalised_to_utc() -> None:
    event = UsageEvent.model_validate(_event("2026-11-21T12:00:00+02:00"))
    assert event.timestamp.isoformat() == "2026-11-21T10:00:00+00:00"

"""``facts.utc_text``: the ledger's UTC texts are reshaped without parsing, to exactly what parsing gives."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from billing_projections.facts import utc_text

TEXTS = [
    "2026-11-03T10:00:00.123456+00:00", "2026-11-03T10:00:00.123456Z", "2026-11-03T10:00:00+00:00",
    "2026-11-03T10:00:00Z", "2026-11-03T10:00:00.000000+00:00", "2026-11-03T10:00:00.123+00:00",
    "2026-11-03T10:00:00.123456+01:00", "2026-11-03T10:00:00-00:00", "2026-11-03 10:00:00.123456+00:00",
    "2026-11-03T10:00:00", "2026-11-03T10:00:00.123456", "2026-11-03T23:30:00-05:00", "2026-11-03T10:00:00.5Z",
]


@pytest.mark.parametrize("text", TEXTS)
def test_a_utc_text_is_what_parsing_it_gives(text: str) -> None:
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    assert utc_text(text) == parsed.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert utc_text(parsed) == utc_text(text)


@pytest.mark.parametrize("text", ["2026-11-03T10:00:00x123456Z", "2026-11-03T10:00:00.123456+00:0x", "not a time"])
def test_a_text_that_is_no_time_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        utc_text(text)

"""Query parameters shared by the list routes: periods, cursors, page sizes, output format."""

from __future__ import annotations

import base64
import binascii
import json
import re
from datetime import UTC, date, datetime, timedelta
from typing import Any

from billing_events.timeutil import parse_timestamp
from billing_projections.facts import utc_text
from billing_runtime.problems import Problem
from fastapi import Request


def invalid(detail: str, parameter: str) -> Problem:
    return Problem(422, "Invalid request", detail, kind="invalid-request",
                   errors=[{"location": f"query.{parameter}", "message": detail}])


def instant(value: str | None, parameter: str) -> datetime | None:
    """An ISO 8601 timestamp with offset, or a date (its start, UTC)."""
    if value is None or value == "":
        return None
    try:
        if len(value) == 10:
            return datetime.combine(date.fromisoformat(value), datetime.min.time(), tzinfo=UTC)
        return parse_timestamp(value)
    except ValueError as exc:
        raise invalid(f"{parameter} must be an ISO 8601 date (2026-11-01) or timestamp with offset "
                      f"(2026-11-01T00:00:00Z): {exc}", parameter) from exc


def time_bound(value: str | None, parameter: str) -> str | None:
    found = instant(value, parameter)
    return utc_text(found) if found else None


def day_bound(value: str | None, parameter: str, *, end: bool = False) -> str | None:
    """A day text ``YYYY-MM-DD`` for the daily figures (an exclusive end timestamp inside a day keeps it)."""
    found = instant(value, parameter)
    if found is None:
        return None
    found = found.astimezone(UTC)
    if end and found.time() != datetime.min.time():
        found += timedelta(days=1)
    return found.date().isoformat()


def month_range(year: int | None, month: int | None) -> tuple[str | None, str | None]:
    """[start, end) day texts of a year or one month of it."""
    if year is None:
        return None, None
    if month is None:
        return f"{year:04d}-01-01", f"{year + 1:04d}-01-01"
    end = (year + 1, 1) if month == 12 else (year, month + 1)
    return f"{year:04d}-{month:02d}-01", f"{end[0]:04d}-{end[1]:02d}-01"


_MONTH = re.compile(r"[0-9]{4}-(0[1-9]|1[0-2])")  # ASCII digits only ([0-9], not \d); fullmatch: no trailing newline


def month_param(value: str | None, parameter: str) -> tuple[int, int] | None:
    """A month ``YYYY-MM`` (1970-01 .. 9999-12) as (year, month); None when not given."""
    if value is None or value == "":
        return None
    if not _MONTH.fullmatch(value) or value < "1970":
        raise invalid(f"{parameter} must be a month YYYY-MM from 1970-01 (e.g. 2026-11), not {value!r}", parameter)
    return int(value[:4]), int(value[5:])


_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")  # ASCII digits; date.fromisoformat alone takes 20261031 too


def day_param(value: str | None, parameter: str) -> date | None:
    """A day ``YYYY-MM-DD`` (1970-01-01 .. 9999-12-31) as a date; None when not given."""
    if value is None or value == "":
        return None
    try:
        if not _DAY.fullmatch(value) or value < "1970":
            raise ValueError(value)
        return date.fromisoformat(value)
    except ValueError as exc:
        raise invalid(f"{parameter} must be a day YYYY-MM-DD from 1970-01-01 (e.g. 2026-10-31), not {value!r}",
                      parameter) from exc


_YEAR = re.compile(r"[0-9]{4}")


def month_or_year(value: str | None, parameter: str) -> tuple[str | None, str | None]:
    """A month ``YYYY-MM`` -> (it, None) or a year ``YYYY`` -> (None, it), ASCII digits from 1970 on as
    ``month_param``; None, None when not given. ``str.isdigit`` took other digits (``٢٠٢٦``), which matched nothing,
    so a wrong period answered an empty list instead of a 422."""
    if value is None or value == "":
        return None, None
    if _YEAR.fullmatch(value) and value >= "1970":
        return None, value
    if _MONTH.fullmatch(value) and value >= "1970":
        return value, None
    raise invalid(f"{parameter} must be a month YYYY-MM (2026-11) or a year YYYY (2026) from 1970, not {value!r}",
                  parameter)


def encode_cursor(state: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(state, separators=(",", ":")).encode()).decode().rstrip("=")


def _cursor_state(cursor: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))


def _not_ours() -> Problem:
    return invalid("cursor is not one this API returned (use next_cursor as given)", "cursor")


def decode_cursor(cursor: str | None, field: str) -> int | None:
    """The integer ``field`` of an opaque cursor made by :func:`encode_cursor`."""
    if not cursor:
        return None
    try:
        found = _cursor_state(cursor)[field]
        if type(found) is not int or found < 0:
            raise ValueError(field)
        return found
    except (ValueError, KeyError, TypeError, binascii.Error, json.JSONDecodeError) as exc:
        raise _not_ours() from exc


def decode_key_cursor(cursor: str | None, size: int) -> tuple[str, ...] | None:
    """The sort key (``size`` texts) of the last row a keyset cursor's page ended with: ``{"after": [...]}``.

    Until session 12 monthly usage and subscriptions paged by ``{"offset": n}``, which repeated or skipped rows when
    one was added before the page: such a cursor is refused (422) with what to do, not read as another position.
    """
    if not cursor:
        return None
    try:
        state = _cursor_state(cursor)
        if isinstance(state, dict) and "offset" in state and "after" not in state:
            raise invalid("cursor is an offset cursor of an earlier version, no longer accepted (it could repeat "
                          "or skip rows): read the list again from its first page", "cursor")
        found = state["after"]
        if type(found) is not list or len(found) != size or not all(type(v) is str for v in found):
            raise ValueError("after")
        return tuple(found)
    except (ValueError, KeyError, TypeError, binascii.Error, json.JSONDecodeError) as exc:
        raise _not_ours() from exc


def wants_csv(request: Request, fmt: str | None) -> bool:
    if fmt is not None:
        if fmt not in ("json", "csv"):
            raise invalid("format must be json or csv", "format")
        return fmt == "csv"
    accept = request.headers.get("accept", "")
    return "text/csv" in accept and "application/json" not in accept


def split_list(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]

"""Reading command payloads: every malformed field becomes a ``CommandRejected`` with a clear reason."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any
from uuid import UUID
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from billing_events.messages import LedgerCommand
from billing_events.money import MoneyError, from_subunits, parse_decimal, to_subunits
from billing_events.timeutil import parse_timestamp
from billing_ledger.application import CommandRejected

INVALID = "invalid_command"


def text(command: LedgerCommand, field: str, *, default: str | None = None) -> str:
    value = command.payload.get(field, default)
    if not isinstance(value, str) or not value.strip():
        raise CommandRejected(INVALID, f"{field} must be a non-empty string")
    return value


def optional_text(command: LedgerCommand, field: str) -> str | None:
    value = command.payload.get(field)
    return None if value is None else text(command, field)


def uuid(command: LedgerCommand, field: str) -> UUID:
    try:
        return UUID(str(command.payload[field]))
    except (KeyError, ValueError) as exc:
        raise CommandRejected(INVALID, f"{field} must be a UUID") from exc


def timestamp(command: LedgerCommand, field: str, *, default: datetime | None = None) -> datetime:
    raw = command.payload.get(field)
    if raw is None:
        if default is None:
            raise CommandRejected(INVALID, f"{field} is required")
        return default
    try:
        return parse_timestamp(raw)
    except ValueError as exc:
        raise CommandRejected(INVALID, f"{field}: {exc}") from exc


def at(command: LedgerCommand) -> datetime:
    """When the command takes effect: its payload's ``at``, else when it was issued."""
    raw = command.payload.get("at")
    return parse_timestamp(raw) if raw else command.issued_at


def subunits(command: LedgerCommand, field: str, *, allow_negative: bool = False) -> int:
    """A decimal amount (string or int, never a float) as exact ledger sub-units."""
    try:
        amount = parse_decimal(command.payload[field], field=field, allow_negative=allow_negative)
    except KeyError as exc:
        raise CommandRejected(INVALID, f"{field} is required") from exc
    except MoneyError as exc:
        raise CommandRejected(INVALID, str(exc)) from exc
    result = to_subunits(amount)
    if from_subunits(result) != amount:
        raise CommandRejected(INVALID, f"{field} is finer than the ledger sub-unit (9 decimal places)")
    return result


_WHOLE_NUMBER = re.compile(r"^[0-9]{1,9}$")


def whole_number(command: LedgerCommand, field: str, *, default: int) -> int:
    """A count (a subscription's quantity): a JSON integer or a string of digits. A float, a fraction or
    true/false is refused, never truncated (``int(2.7)`` billed 2 seats, ``int(True)`` 1)."""
    value: Any = command.payload.get(field, default)
    if type(value) is int:
        return value
    if isinstance(value, str) and _WHOLE_NUMBER.match(value):
        return int(value)
    raise CommandRejected(INVALID, f"{field} must be a whole number, not {value!r}")


def time_zone(command: LedgerCommand, field: str, *, default: str = "UTC") -> str:
    """An IANA time zone name (``Europe/Berlin``), checked before anything is changed: an unknown one raised
    ``ZoneInfoNotFoundError`` half-way through the command, which failed its whole batch."""
    value: Any = command.payload.get(field, default)
    try:
        if isinstance(value, str) and value:
            ZoneInfo(value)
            return value
    except (ZoneInfoNotFoundError, ValueError):
        pass
    raise CommandRejected(INVALID, f"{field} must be an IANA time zone name such as Europe/Berlin, not {value!r}")


def flag(command: LedgerCommand, field: str) -> bool:
    value: Any = command.payload.get(field, False)
    if not isinstance(value, bool):
        raise CommandRejected(INVALID, f"{field} must be true or false")
    return value

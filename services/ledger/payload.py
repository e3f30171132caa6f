"""Reading command payloads: every malformed field becomes a ``CommandRejected`` with a clear reason."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from billing_events.messages import RESOURCE_KEY_PATTERN, LedgerCommand
from billing_events.money import MoneyError, from_subunits, parse_decimal, to_subunits
from billing_events.timeutil import parse_timestamp
from billing_ledger.application import CommandRejected
from billing_ledger.limits import EFFECTIVE_AT_BACKDATE_DAYS_MAX, EFFECTIVE_AT_SKEW_SECONDS_MAX

INVALID = "invalid_command"


def text(command: LedgerCommand, field: str, *, default: str | None = None) -> str:
    value = command.payload.get(field, default)
    if not isinstance(value, str) or not value.strip():
        raise CommandRejected(INVALID, f"{field} must be a non-empty string")
    return value


_RESOURCE_KEY = re.compile(RESOURCE_KEY_PATTERN)


def key(command: LedgerCommand, field: str, *, reason: str = INVALID) -> str:
    """A key naming what the command creates, which a URL path then addresses (``RESOURCE_KEY_PATTERN``). A key
    with a ``/`` was taken and could never be reached again (``GET .../subscriptions/a%2Fb`` is routed as two path
    segments: 404), and one of 5,000 characters was stored as given."""
    value = text(command, field)
    if not _RESOURCE_KEY.fullmatch(value):
        raise CommandRejected(reason, f"{field} must be 1 to 128 ASCII letters, digits, '.', '_', ':' or '-', "
                                      f"starting with a letter or digit (it is part of a URL path), not "
                                      f"{value[:40]!r}{'...' if len(value) > 40 else ''}")
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
    """When the command takes effect: its payload's ``at``, else when it was issued. A malformed one (no offset,
    ``"yesterday"``, a number) is rejected as ``timestamp`` rejects it: its ``ValueError`` escaped a command that
    had already changed an aggregate (``subscription.create`` had made the roster), which failed the command
    (HTTP: a plain-text 500) instead of rejecting it."""
    raw = command.payload.get("at")
    if raw is None or raw == "":
        return command.issued_at
    try:
        return parse_timestamp(raw)
    except ValueError as exc:
        raise CommandRejected(INVALID, f"at: {exc}") from exc


AT_OUT_OF_RANGE = "at_out_of_range"


def check_effective(moment: datetime, now: datetime, *, field: str = "at") -> datetime:
    """``moment`` within the bounds a subscription command may take effect in around ``now`` (``limits.py``:
    EFFECTIVE_AT_BACKDATE_DAYS_MAX before, EFFECTIVE_AT_SKEW_SECONDS_MAX after), else ``at_out_of_range``."""
    earliest = now - timedelta(days=EFFECTIVE_AT_BACKDATE_DAYS_MAX)
    latest = now + timedelta(seconds=EFFECTIVE_AT_SKEW_SECONDS_MAX)
    if moment < earliest:
        raise CommandRejected(AT_OUT_OF_RANGE, f"{field} {moment.isoformat()} is more than "
                                               f"{EFFECTIVE_AT_BACKDATE_DAYS_MAX} days before {now.isoformat()}")
    if moment > latest:
        raise CommandRejected(AT_OUT_OF_RANGE, f"{field} {moment.isoformat()} is more than "
                                               f"{EFFECTIVE_AT_SKEW_SECONDS_MAX} s after {now.isoformat()}: a "
                                               "subscription command takes effect when it is applied, nothing "
                                               "is scheduled")
    return moment


def bounded_at(command: LedgerCommand) -> datetime:
    """When a subscription command (create, change, cancel, pause, resume) takes effect: ``at`` as ``at`` reads it,
    within the bounds ``check_effective`` gives around when the command was issued (so a redelivery, or a command
    applied late from Kafka, decides the same)."""
    return check_effective(at(command), command.issued_at)


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


def flag(command: LedgerCommand, field: str, *, default: bool = False) -> bool:
    """A JSON boolean; absent: ``default``. Anything else (``"no"``, ``0``, ``null``) is rejected, never read by
    its truth (``bool("no")`` is true)."""
    value: Any = command.payload.get(field, default)
    if not isinstance(value, bool):
        raise CommandRejected(INVALID, f"{field} must be true or false")
    return value


def string(command: LedgerCommand, field: str, *, default: str = "") -> str:
    """A JSON string, possibly empty; absent: ``default``. Anything else is rejected, never stored as ``"None"``
    or ``"5"``."""
    value: Any = command.payload.get(field, default)
    if not isinstance(value, str):
        raise CommandRejected(INVALID, f"{field} must be a string")
    return value


def optional_whole(command: LedgerCommand, field: str) -> int | None:
    """A JSON integer, or None when absent or null. A fraction (``2.5``), a string (``"3"``) or a boolean is
    rejected, never truncated or converted: its range is the domain's to check."""
    value: Any = command.payload.get(field)
    if value is None:
        return None
    if type(value) is not int:
        raise CommandRejected(INVALID, f"{field} must be a whole number, not {value!r}")
    return value


def whole(command: LedgerCommand, field: str, *, default: int) -> int:
    """A JSON integer (as ``optional_whole``); absent: ``default``. Null is rejected: give the field or leave it
    out."""
    if field not in command.payload:
        return default
    value = optional_whole(command, field)
    if value is None:
        raise CommandRejected(INVALID, f"{field} must be a whole number, not null")
    return value

"""Ledger events as the read models see them: a parsed envelope plus the few derived values all share.

A *fact* is one event from ``billing.ledger.events`` with its tenant resolved. Every helper here is a pure
function of the event, so rebuilding a read model from the topic gives the same rows every time.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
from billing_events.messages import has_long_number

# Wall-clock text of every stored timestamp: UTC, microseconds, ``Z``. Fixed width, so text order = time order.
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
# UTC texts that need no parsing: ...:SS+00:00, ...:SS.ffffff+00:00, ...:SSZ, ...:SS.ffffffZ (checked below).
_UTC_LENGTHS = {25: "+00:00", 32: "+00:00", 20: "Z", 27: "Z"}

WALLET = "tenant_wallet"
RECEIVABLES = "receivables"


@dataclass(slots=True)
class Fact:
    position: int
    aggregate_id: str
    type: str  # e.g. "BillingAccount.UsageDebited"
    recorded_at: str  # stored time text (see utc_text)
    data: dict[str, Any]
    tenant: str  # "" when the event's tenant is unknown here (later events of invoices and subscriptions)
    occurred_at: str = ""  # business time text; derived from data when not given (see business_time)
    aggregate: str = ""  # "BillingAccount"; derived from ``type`` when not given
    name: str = ""  # "UsageDebited"; derived from ``type`` when not given
    sums: PostingSums | None = None  # the postings walked once (see posting_sums), filled on first use

    def __post_init__(self) -> None:
        if not self.occurred_at:
            self.occurred_at = business_time(self.data, self.recorded_at)
        if not self.aggregate:
            self.aggregate, _, self.name = self.type.partition(".")

    @property
    def cause(self) -> dict[str, Any]:
        cause = self.data.get("cause")
        return cause if isinstance(cause, dict) else {}


@dataclass(slots=True)
class PostingSums:
    """One walk over an event's postings: what every read model needs from them."""

    wallet: dict[str, int]  # unit -> change of the tenant's wallet (positive = more to spend)
    grants: dict[str, int]  # grant id -> change of its remaining credit
    accounts: dict[tuple[str, str], int]  # (ledger account, unit) -> signed sum, debit positive


_NO_SUMS = PostingSums({}, {}, {})


def posting_sums(fact: Fact) -> PostingSums:
    found = fact.sums
    if found is not None:
        return found
    lines = fact.data.get("postings")
    if not lines or not isinstance(lines, list):
        fact.sums = _NO_SUMS
        return _NO_SUMS
    wallet: dict[str, int] = {}
    grants: dict[str, int] = {}
    accounts: dict[tuple[str, str], int] = {}
    for line in lines:
        account, unit, amount = line.get("account"), line["unit"], line["amount"]
        if type(amount) is not int:
            amount = int(amount)
        key = (account, unit) if type(account) is str and type(unit) is str else (str(account), str(unit))
        accounts[key] = accounts.get(key, 0) + amount
        if account == WALLET:
            wallet[unit] = wallet.get(unit, 0) - amount
            grant = line.get("grant_id")
            if grant:
                grants[grant] = grants.get(grant, 0) - amount
    fact.sums = found = PostingSums(wallet, grants, accounts)
    return found


class MalformedEvent(ValueError):
    pass


_ENVELOPE_TYPES: dict[str, type] = {
    "position": int, "aggregate_id": str, "type": str, "recorded_at": str, "data": dict}


def parse_event(raw: bytes) -> dict[str, Any]:
    """A ``billing.ledger.events`` envelope (``billing_events.messages.LedgerEvent``), checked field by field.

    The read models need only these fields; checking them directly is several times faster than the
    pydantic model, which matters when a rebuild replays the whole topic.

    Integers are read exact at any size: the ledger relays them so (a usage debit's ``cause`` is recorded as
    sent). orjson reads one outside [-2**63, 2**64) as a float and one beyond a double's range not at all, so a
    record that may hold one (``has_long_number``) is decoded by the standard library; before, 2**128 in a usage
    event's properties read as 3.402823669209385e+38, and 10**400 made the whole debit malformed (skipped: the
    balances missed its money). ``json_text`` writes such an integer back exact.
    """
    if has_long_number(raw):
        try:
            envelope = json.loads(raw, parse_constant=_no_constant)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise MalformedEvent(f"not JSON: {exc}") from exc
    else:
        try:
            envelope = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise MalformedEvent(f"not JSON: {exc}") from exc
    if type(envelope) is not dict:
        raise MalformedEvent("not a JSON object")
    schema = envelope.get("schema")  # the wire name; "schema_" from older producers (the field's name)
    if schema is None:
        schema = envelope.get("schema_", "ledger.event/v1")
    if schema != "ledger.event/v1":
        raise MalformedEvent(f"unknown schema {schema!r}")
    # JSON gives exact types: ``type(x) is int`` also refuses booleans.
    if (type(envelope.get("position")) is not int or type(envelope.get("aggregate_id")) is not str
            or type(envelope.get("type")) is not str or type(envelope.get("recorded_at")) is not str
            or type(envelope.get("data")) is not dict):
        for name, kind in _ENVELOPE_TYPES.items():
            if type(envelope.get(name)) is not kind:
                raise MalformedEvent(f"{name} is missing or not a {kind}")
    return envelope


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")  # as orjson: NaN and Infinity are not JSON


def business_time(data: dict[str, Any], recorded_at: str) -> str:
    """The movement's ``at`` (usage time for debits), else its effective time, else when it was recorded."""
    for field in ("at", "effective_at"):
        value = data.get(field)
        if isinstance(value, str) and value:
            return utc_text(value)
    return recorded_at


def utc_text(value: str | datetime) -> str:
    if type(value) is str and value[10:11] == "T":  # the ledger's own texts, each shape checked by its length
        size = len(value)
        if size == 32:
            if value[19] == "." and value[26:] == "+00:00":
                return value[:26] + "Z"
        elif size == 27:
            if value[19] == "." and value[26] == "Z":
                return value
        elif size == 25:
            if value[19:] == "+00:00":
                return value[:19] + ".000000Z"
        elif size == 20 and value[19] == "Z":
            return value[:19] + ".000000Z"
    if isinstance(value, str) and value.endswith(_UTC_LENGTHS.get(len(value), "?")) and value[10:11] == "T" and (
            len(value) in (20, 25) or value[19] == "."):
        # Already UTC (what the ledger writes): reshaped without parsing, the hot path of a rebuild.
        return value[:19] + (value[19:26] if value[19] == "." else ".000000") + "Z"
    parsed = datetime.fromisoformat(value) if isinstance(value, str) else value
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC).strftime(_TIME_FORMAT)


def parse_utc_text(value: str) -> datetime:
    return datetime.strptime(value, _TIME_FORMAT).replace(tzinfo=UTC)


def month_of(time_text: str, time_zone: Any = None) -> str:
    """``YYYY-MM`` of a stored time text: its UTC month, or with ``time_zone`` (an IANA name, a usage debit's
    ``cause.time_zone``) its month in that zone, as the subscription whose periods bill it counts months."""
    if not time_zone or time_zone == "UTC":
        return time_text[:7]
    return local_month(time_text, time_zone)


# No zone is a day or more away from UTC (today -12:00 .. +14:00, never a day): between the 2nd and the 27th of a UTC
# month every zone is in the same month, and only the texts of the month's first and last days are converted.
_SAME_MONTH_DAYS = frozenset(f"{d:02d}" for d in range(2, 28))


def local_month(time_text: str, time_zone: Any) -> str:
    """The month of ``time_text`` (a stored UTC time text) in ``time_zone``; its UTC month for a zone not known here
    (not a string, or not in this host's time zone database)."""
    if time_text[8:10] in _SAME_MONTH_DAYS:
        return time_text[:7]
    zone = _zone(time_zone) if type(time_zone) is str else None
    if zone is None:
        return time_text[:7]
    local = parse_utc_text(utc_text(time_text)).astimezone(zone)
    return f"{local.year:04d}-{local.month:02d}"


@lru_cache(maxsize=256)
def _zone(name: str) -> ZoneInfo | None:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # unknown, not a key (a path, ""), a folder ("Europe")
        return None


def day_of(time_text: str) -> str:
    return time_text[:10]  # "YYYY-MM-DD"


def postings(fact: Fact) -> list[dict[str, Any]]:
    found = fact.data.get("postings")
    return found if isinstance(found, list) else []


def wallet_deltas(fact: Fact) -> dict[str, int]:
    """Change of the tenant's wallet per unit (positive = more to spend): the wallet is credit-negative."""
    return posting_sums(fact).wallet


def grant_deltas(fact: Fact) -> dict[str, int]:
    """Change of each grant's remaining credit (every wallet posting names its grant)."""
    return posting_sums(fact).grants


def account_sums(fact: Fact) -> dict[tuple[str, str], int]:
    """Signed sum (debit positive) per (ledger account, unit) of the event's postings."""
    return posting_sums(fact).accounts


def json_text(value: Any) -> str:
    """Canonical JSON (sorted keys, no spaces): the same value is always the same text. An integer orjson cannot
    write (beyond 64 bits, read exact by ``parse_event``) is written exact by the standard library, as orjson
    writes the rest."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    except orjson.JSONEncodeError:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def decimal_or_none(value: Any) -> Decimal | None:
    """A decimal from a string or int in an event (never a float); None when absent or not a number."""
    kind = type(value)
    if kind is str:
        try:
            result = Decimal(value)  # surrounding whitespace is allowed, as by str.strip()
        except InvalidOperation:
            return None
    elif kind is int:
        return Decimal(value)
    elif value is None or kind is bool or kind is float:
        return None
    else:
        try:
            result = Decimal(str(value).strip())
        except InvalidOperation:
            return None
    return result if result.is_finite() else None


def chargeback_of(data: dict[str, Any]) -> str | None:
    """The dispute a refund's event is the chargeback of (its ``cause.dispute``, since session 13), else None."""
    cause = data.get("cause")
    dispute = cause.get("dispute") if isinstance(cause, dict) else None
    return dispute if isinstance(dispute, str) and dispute else None


def first_text(*values: Any) -> str:
    for value in values:
        if type(value) is str and value:
            found = value.strip()
            if found:
                return found
    return ""


def text_list(value: Any) -> list[str]:
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    return [str(value)] if isinstance(value, str) and value else []


def units_of(facts: Iterable[Fact]) -> set[str]:
    return {str(f.data["unit"]) for f in facts if isinstance(f.data.get("unit"), str)}

"""When a saved card expires, and which expiry notice is due for it (seed 004: "proactive notifications ... for card
expirations").

A card is valid through the last day of its expiry month (``12/2026``: all of 31 December 2026). The issuer's time
zone is not known, so the month ends when it has ended everywhere: at 00:00 on the 1st of the next month at
UTC-12, the last time zone on Earth (``2027-01-01T12:00:00+00:00`` for ``12/2026``). Until then the card may still
be good somewhere (31 December 20:00 in Los Angeles is already 1 January in UTC): it is not called expired, nor
skipped by off-session charges.

Two notices per card expiry, each recorded once on the roster (``PaymentMethodExpiring``, ``PaymentMethodExpired``):

* ``expiring``: from ``notice_days`` days before that end (``BILLING_CARD_EXPIRY_NOTICE_DAYS``, default 30), until
  the end;
* ``expired``: from the end on (an ``expiring`` notice is no longer due then: the card has expired).

A notice belongs to one expiry (``<method>/<YYYY-MM>/<notice>``): a card the gateway's account updater renewed
(a new expiry) gets its own notices when that one comes.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

EXPIRING = "expiring"
EXPIRED = "expired"
NOTICES = (EXPIRING, EXPIRED)
# The last time zone on Earth (Baker Island, "anywhere on Earth"): a month has ended everywhere when it ends there.
LAST_TIME_ZONE = timezone(timedelta(hours=-12))


def card_expires_at(exp_month: int, exp_year: int) -> datetime:
    """The first moment at which a card of ``exp_month/exp_year`` is expired everywhere."""
    year, month = (exp_year + 1, 1) if exp_month == 12 else (exp_year, exp_month + 1)
    return datetime(year, month, 1, tzinfo=LAST_TIME_ZONE)


def expires_at(card: dict[str, Any] | None) -> datetime | None:
    return None if not card else card_expires_at(int(card["exp_month"]), int(card["exp_year"]))


def is_expired(card: dict[str, Any] | None, now: datetime) -> bool:
    """Whether the card is past the end of its expiry month at ``now`` (an aware datetime); no card: never."""
    end = expires_at(card)
    return end is not None and now >= end


def notice_due(card: dict[str, Any] | None, now: datetime, notice_days: int) -> str | None:
    """The notice due for ``card`` at ``now``: ``expired``, ``expiring`` (within ``notice_days`` of the end), or
    None (no card, or not yet within the notice period)."""
    end = expires_at(card)
    if end is None:
        return None
    if now >= end:
        return EXPIRED
    if now >= end - timedelta(days=notice_days):
        return EXPIRING
    return None


def expiry_label(card: dict[str, Any]) -> str:
    """``12/2026``, as printed on the card."""
    return f"{int(card['exp_month']):02d}/{int(card['exp_year'])}"


def notice_key(method_id: str, card: dict[str, Any], notice: str) -> str:
    """What makes a notice unique on the roster: the method, the expiry it is about, and which notice."""
    return f"{method_id}/{int(card['exp_year']):04d}-{int(card['exp_month']):02d}/{notice}"


def notice_command_id(tenant: str, method_id: str, card: dict[str, Any], notice: str) -> UUID:
    """The id of the command that records a notice: the same from the expiry task and from an off-session charge
    that skipped the expired card, from any process, so the ledger records it once."""
    return uuid5(NAMESPACE_URL, f"/accounts/{tenant}/payment-methods/{notice_key(method_id, card, notice)}")

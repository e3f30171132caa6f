"""The identity-verification gate of top-ups (seed 003), decided inside ``checkout.place``.

``BILLING_IDENTITY_VERIFICATION``: ``off``; ``first_top_up`` (no top-up before the identity is verified);
``threshold`` (no top-up that takes what the account has paid for top-ups *plus its orders still open* above
``BILLING_IDENTITY_THRESHOLD``). Open orders count because an order is paid later, at the gateway: four
checkouts of 23.80 opened together would otherwise each pass a threshold of 50. The decision is taken in the
command's transaction, which records the new order on the account's ``PaymentProfile`` (a write to that
aggregate), so two concurrent checkouts conflict and the second is decided again, seeing the first.

The checkout route and auto-top-up pass the gate as the command's ``identity_gate`` payload (``{"mode",
"threshold"}``, from their settings); a ``checkout.place`` without it is not gated (operator tools).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any
from uuid import UUID

from billing_ledger.application import CommandRejected, _Batch
from billing_ledger.domain.checkout import OPEN, PENDING
from billing_ledger.domain.payment_profile import PaymentProfile
from billing_runtime.settings import Settings

REASON = "identity_verification_required"


def gate_of(settings: Settings) -> dict[str, str] | None:
    """The ``identity_gate`` payload for ``checkout.place`` (None when the gate is off)."""
    if settings.identity_verification == "off":
        return None
    return {"mode": settings.identity_verification, "threshold": settings.identity_threshold or "0"}


def open_orders_total(batch: _Batch, profile: PaymentProfile) -> Decimal:
    """What the account's orders still open (pending or open at the gateway: neither paid, failed nor expired)
    would add; closed ones are released from the profile as they are found."""
    total, closed = Decimal(0), []
    for oid, amount in profile.open_orders.items():
        order = batch.get(UUID(oid))
        if order is not None and order.status in (PENDING, OPEN):
            total += Decimal(amount)
        else:
            closed.append(oid)
    if closed:
        profile.release_orders(orders=closed)
    return total


def check(batch: _Batch, profile: PaymentProfile, gate: Any, total: Decimal) -> None:
    """Raises ``CommandRejected(identity_verification_required)`` when ``gate`` refuses a top-up of ``total``."""
    if not isinstance(gate, dict) or gate.get("mode") in (None, "off") or profile.identity_verified:
        return
    if gate["mode"] == "threshold":
        spent = Decimal(profile.top_ups_paid) + open_orders_total(batch, profile) + total
        if spent <= Decimal(str(gate.get("threshold") or "0")):
            return
    raise CommandRejected(REASON, "Complete identity verification before adding funds.")

"""An account's saved payment methods: how the API shows them, and charging them off-session (the default
first, then each backup in order; shared by auto-top-up and dunning).

Only gateway tokens are used (no card data is ever stored: a card's brand, last four digits and expiry, as its
gateway told them). A card past the end of its expiry month (``card_expiry``) is not charged before the methods
that are not: the next backup is charged instead, and the expired one is tried only after every other method
declined (the gateway's account updater may have renewed it without the ledger being told). Skipping it records
its ``PaymentMethodExpired`` notice (once: the same command as the expiry task's), so the account is warned.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from billing_events.messages import LedgerCommand
from billing_events.timeutil import utcnow
from billing_ledger.application import LedgerApplication
from billing_ledger.domain.card_expiry import EXPIRED, expires_at, expiry_label, is_expired, notice_command_id
from billing_ledger.domain.payment_profile import payment_profile_id
from billing_ledger.domain.roster import roster_id
from billing_ledger.gateways import Charge, OutboundGateway
from billing_runtime.logging import get_logger
from eventsourcing.persistence import IntegrityError

log = get_logger(__name__)
BY = "system:saved-methods"


def method_view(method: dict[str, Any], now: datetime) -> dict[str, Any]:
    """A saved method as the API shows it: its token, gateway, label, card (brand, last4, exp_month, exp_year;
    null when the gateway told none), when the card expires (the end of its expiry month) and whether it has."""
    card = method.get("card")
    end = expires_at(card)
    return {"method_id": method["method_id"], "gateway": method["gateway"], "label": method.get("label", ""),
            "card": dict(card) if card else None, "expires_at": end.isoformat() if end else None,
            "expired": is_expired(card, now)}


@dataclass(frozen=True)
class Charged:
    """The outcome of charging an account's saved methods in order: the first success, a pending charge, or
    every refusal."""

    charge: Charge | None
    gateway: str | None
    method_index: int | None
    errors: list[str]
    methods: int = 0  # how many saved methods the account had
    pending: Charge | None = None  # a charge under way: no further method was tried (``gateway``/``method_index``)
    expired: tuple[str, ...] = ()  # the methods whose card had expired: put after the others


async def charge_in_order(app: LedgerApplication, gateways: dict[str, OutboundGateway], *, tenant: str,
                          total: Decimal, currency_code: str, key_prefix: str, order_ref: str,
                          invoice_ref: str | None = None, now: datetime | None = None) -> Charged:
    """Charges the default payment method off-session, then each backup in order, until one succeeds; a card
    expired at ``now`` (default: the clock) goes after the others, and its expiry notice is recorded.

    ``invoice_ref`` (dunning) names the invoice the charge pays, in the gateway's metadata (``invoice_id``), so
    the payment's webhook settles that invoice instead of granting credit. The idempotency key of method ``i`` (its
    place on the account, expired or not) is ``<key_prefix>/<i>``. ``GatewayError`` (nothing known) propagates.
    A *pending* charge (the gateway took it but has not settled it) stops here: charging a backup method for it
    would charge the customer twice when the first one succeeds; the gateway's webhook settles it.
    """
    moment = now or utcnow()
    methods = await asyncio.to_thread(app.read, roster_id(tenant), lambda r: [dict(m) for m in r.payment_methods])
    customers = await asyncio.to_thread(app.read, payment_profile_id(tenant), lambda p: dict(p.customers))
    placed = list(enumerate(methods or []))
    expired = [(i, m) for i, m in placed if is_expired(m.get("card"), moment)]
    errors: list[str] = []
    for _, method in expired:
        errors.append(f"{method.get('label') or method['method_id']}: card expired {expiry_label(method['card'])}, "
                      "tried after the other methods")
        await asyncio.to_thread(_warn_expired, app, tenant, method, moment)
    names = tuple(m["method_id"] for _, m in expired)
    for index, method in [(i, m) for i, m in placed if not is_expired(m.get("card"), moment)] + expired:
        gateway = gateways.get(method["gateway"])
        if gateway is None:
            errors.append(f"{method['method_id']}: gateway {method['gateway']} not enabled")
            continue
        charge = await gateway.charge_saved_method(
            customer=(customers or {}).get(method["gateway"]), method_id=method["method_id"], total=total,
            currency_code=currency_code, idempotency_key=f"{key_prefix}/{index}", tenant=tenant, order_id=order_ref,
            invoice_id=invoice_ref)
        if charge.ok:
            return Charged(charge, method["gateway"], index, errors, len(methods), expired=names)
        if charge.pending:
            return Charged(None, method["gateway"], index, errors, len(methods), pending=charge, expired=names)
        errors.append(f"{method.get('label') or method['method_id']}: {charge.error}")
    if not methods:
        errors.append("no saved payment method")
    return Charged(None, None, None, errors, len(methods or []), expired=names)


def _warn_expired(app: LedgerApplication, tenant: str, method: dict[str, Any], now: datetime) -> None:
    """Records the card's ``PaymentMethodExpired`` (the alerts task emails it); a second time changes nothing."""
    command = LedgerCommand(
        command_id=notice_command_id(tenant, method["method_id"], method["card"], EXPIRED),
        kind="payment_method.expiry_notice", tenant=tenant, issued_at=now, issued_by=BY,
        payload={"method_id": method["method_id"], "notice": EXPIRED, "at": now.isoformat()})
    try:
        [result] = app.apply_commands([command])
    except IntegrityError:  # another writer changed the roster first: the expiry task records the notice next round
        log.info("expired_payment_method_notice_deferred", tenant=tenant, method=method["method_id"])
        return
    log.info("expired_payment_method_skipped", tenant=tenant, method=method["method_id"],
             expiry=expiry_label(method["card"]), outcome=result.outcome)

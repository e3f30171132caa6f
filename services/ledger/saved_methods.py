"""Charging an account's saved payment methods off-session: the default first, then each backup in order.

Shared by auto-top-up and dunning. Only gateway tokens are used (no card data is ever stored).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from decimal import Decimal

from billing_ledger.application import LedgerApplication
from billing_ledger.domain.payment_profile import payment_profile_id
from billing_ledger.domain.roster import roster_id
from billing_ledger.gateways import Charge, OutboundGateway


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


async def charge_in_order(app: LedgerApplication, gateways: dict[str, OutboundGateway], *, tenant: str,
                          total: Decimal, currency_code: str, key_prefix: str, order_ref: str,
                          invoice_ref: str | None = None) -> Charged:
    """Charges the default payment method off-session, then each backup in order, until one succeeds.

    ``invoice_ref`` (dunning) names the invoice the charge pays, in the gateway's metadata (``invoice_id``), so
    the payment's webhook settles that invoice instead of granting credit. The idempotency key of method ``i``
    is ``<key_prefix>/<i>``. ``GatewayError`` (nothing known) propagates.
    A *pending* charge (the gateway took it but has not settled it) stops here: charging a backup method for it
    would charge the customer twice when the first one succeeds; the gateway's webhook settles it.
    """
    methods = await asyncio.to_thread(app.read, roster_id(tenant), lambda r: [dict(m) for m in r.payment_methods])
    customers = await asyncio.to_thread(app.read, payment_profile_id(tenant), lambda p: dict(p.customers))
    errors: list[str] = []
    for index, method in enumerate(methods or []):
        gateway = gateways.get(method["gateway"])
        if gateway is None:
            errors.append(f"{method['method_id']}: gateway {method['gateway']} not enabled")
            continue
        charge = await gateway.charge_saved_method(
            customer=(customers or {}).get(method["gateway"]), method_id=method["method_id"], total=total,
            currency_code=currency_code, idempotency_key=f"{key_prefix}/{index}", tenant=tenant, order_id=order_ref,
            invoice_id=invoice_ref)
        if charge.ok:
            return Charged(charge, method["gateway"], index, errors, len(methods))
        if charge.pending:
            return Charged(None, method["gateway"], index, errors, len(methods), pending=charge)
        errors.append(f"{method.get('label') or method['method_id']}: {charge.error}")
    if not methods:
        errors.append("no saved payment method")
    return Charged(None, None, None, errors, len(methods or []))

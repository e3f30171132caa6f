"""Auto-top-up: follows ``AutoTopUpRequested`` events and charges the account's saved payment methods.

The account aggregate decides *when* (threshold crossed, cooldown over, monthly cap not exceeded) and records
the request; this task only carries it out. It follows the event store's notification log and records its
position (``topups:charge``) after each request is settled, like the invoice notifier. For each request:

1. ``checkout.place`` an order ``auto-top-up/<request id>`` (the package, or the amount up to the target,
   with tax from the tax profile): the credit granted is the quote's, once;
2. charge the default payment method off-session (Stripe PaymentIntent, ``confirm`` + ``off_session``,
   idempotency key ``<request id>/<method index>``); when declined, each backup method in order (a card past
   its expiry month after the others, see ``saved_methods``);
3. the first success applies ``order.paid_off_session`` (credits, invoice); if every method is declined the
   order fails and the account is notified. A gateway outage leaves the position where it is: retried. A
   *pending* charge (Stripe ``processing``) leaves the order open without trying a backup method (that would
   charge twice): the payment's webhook names the order and pays it (``payment.succeeded``).

The identity gate applies as at checkout (``identity_gate``): a request it refuses places no order and charges
nothing; it is logged (``auto_top_up_skipped``, reason ``identity_verification_required``) and the account emailed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from decimal import ROUND_CEILING, Decimal
from typing import Any
from uuid import NAMESPACE_URL, uuid5

from billing_events.messages import LedgerCommand
from billing_events.money import currency, from_subunits
from billing_events.timeutil import utcnow
from billing_ledger.application import LedgerApplication
from billing_ledger.checkout_commands import order_view
from billing_ledger.domain.account import BillingAccount
from billing_ledger.domain.checkout import PAID, order_id
from billing_ledger.gateways import GatewayError, OutboundGateway
from billing_ledger.identity_gate import REASON as IDENTITY_REQUIRED
from billing_ledger.identity_gate import gate_of
from billing_ledger.mail import send_text, tenant_address
from billing_ledger.notifier import SmtpSettings
from billing_ledger.saved_methods import charge_in_order
from billing_runtime.logging import get_logger
from billing_runtime.service import pause
from billing_runtime.settings import Settings
from eventsourcing.utils import get_topic

log = get_logger(__name__)
TOPUPS_NAME = "topups:charge"
REQUESTED_TOPIC = get_topic(BillingAccount.AutoTopUpRequested)
SCAN_BATCH_EVENTS_MAX = 100
BY = "system:auto-top-up"


def _apply(app: LedgerApplication, kind: str, tenant: str, cause: str, payload: dict[str, Any]) -> Any:
    command = LedgerCommand(command_id=uuid5(NAMESPACE_URL, f"/auto-top-up/{cause}/{kind}"), kind=kind,
                            tenant=tenant, issued_at=utcnow(), issued_by=BY, payload=payload)
    [result] = app.apply_commands([command])
    return result


def _order_payload(account: tuple[str, str], event: Any) -> dict[str, Any] | None:
    code = account[1]
    if event.package_code:
        return {"package": event.package_code}
    if event.unit != code:
        return None  # a credit unit without a package has no price
    # The account asks for whole steps of what the currency is charged in (a cent; ten fils of KWD:
    # ``Unit.billed_scale``; ``BillingAccount._top_up_to_target``). A request recorded before session 14 holds
    # ``target - available`` exact: rounded up to the step, as it was then (never below the target).
    unit = currency(code)
    amount = from_subunits(event.amount).quantize(Decimal(1).scaleb(-unit.billed_scale), ROUND_CEILING).quantize(
        Decimal(1).scaleb(-unit.minor_scale))
    return {"amount": str(amount)}


async def settle_request(app: LedgerApplication, gateways: dict[str, OutboundGateway], smtp: SmtpSettings | None,
                         event: Any, settings: Settings | None = None) -> str:
    """Carries out one request; returns its outcome (paid, pending, declined, unpriceable, no_method, rejected,
    identity_required: the identity gate (``BILLING_IDENTITY_VERIFICATION``) refused it, nothing charged)."""
    account = await asyncio.to_thread(app.read, event.originator_id, lambda a: (a.tenant, a.currency))
    if account is None:
        return "rejected"
    tenant = account[0]
    key = f"auto-top-up/{event.request_id}"
    payload = _order_payload(account, event)
    if payload is None:
        await asyncio.to_thread(send_text, smtp, tenant_address(smtp, tenant), "Auto-top-up not possible",
                                f"An auto-top-up of {event.unit} needs a credit package.\n")
        return "unpriceable"
    placed = await asyncio.to_thread(_apply, app, "checkout.place", tenant, str(event.request_id),
                                     {**payload, "key": key, "gateway": "stripe", "at": event.at.isoformat(),
                                      "identity_gate": gate_of(settings or Settings.from_env())})
    order = await asyncio.to_thread(app.read, order_id(tenant, key), order_view)
    if order is None and placed.reason == IDENTITY_REQUIRED:  # the checkout route's gate: nothing is charged
        log.warning("auto_top_up_skipped", tenant=tenant, reason=IDENTITY_REQUIRED)
        await asyncio.to_thread(send_text, smtp, tenant_address(smtp, tenant), "Auto-top-up not possible",
                                "An auto-top-up was skipped: complete identity verification before adding funds.\n")
        return "identity_required"
    if order is None:
        log.warning("auto_top_up_not_placed", tenant=tenant, reason=placed.reason, detail=placed.detail)
        return "rejected"
    if order["status"] == PAID:
        return "paid"
    q = order["quote"]
    charged = await charge_in_order(app, gateways, tenant=tenant, total=Decimal(q["total"]), currency_code=q["currency"],
                                    key_prefix=str(event.request_id), order_ref=order["order_id"])
    if charged.charge is not None:
        result = await asyncio.to_thread(_apply, app, "order.paid_off_session", tenant, str(event.request_id), {
            "key": key, "gateway": charged.gateway, "payment_id": charged.charge.reference, "amount": q["total"],
            "currency": q["currency"]})
        log.info("auto_top_up_paid", tenant=tenant, method_index=charged.method_index, outcome=result.outcome)
        return "paid"
    if charged.pending is not None:
        log.info("auto_top_up_pending", tenant=tenant, method_index=charged.method_index,
                 payment=charged.pending.reference)
        return "pending"
    methods = charged.methods
    errors = charged.errors
    await asyncio.to_thread(_apply, app, "checkout.fail", tenant, str(event.request_id),
                            {"key": key, "reason": "declined" if methods else "no_payment_method"})
    await asyncio.to_thread(send_text, smtp, tenant_address(smtp, tenant), "Auto-top-up failed",
                            f"We could not top up {q['total']} {q['currency']}:\n" + "\n".join(errors) + "\n")
    return "declined" if methods else "no_method"


async def process_pending(app: LedgerApplication, gateways: dict[str, OutboundGateway],
                          smtp: SmtpSettings | None) -> list[str]:
    notifications = await asyncio.to_thread(app.unprocessed, TOPUPS_NAME, SCAN_BATCH_EVENTS_MAX, [REQUESTED_TOPIC])
    outcomes = []
    for notification in notifications:
        event = app.mapper.to_domain_event(notification)
        outcomes.append(await settle_request(app, gateways, smtp, event))
        await asyncio.to_thread(app.processed, TOPUPS_NAME, notification.id)
    return outcomes


async def run_topups(app: LedgerApplication, gateways: dict[str, OutboundGateway], smtp: SmtpSettings | None,
                     stopping: asyncio.Event, interval_seconds: float = 5.0,
                     is_leader: Callable[[], Awaitable[bool]] | None = None) -> None:
    while not stopping.is_set():
        try:
            if is_leader is None or await is_leader():  # one process at a time
                await process_pending(app, gateways, smtp)
        except (GatewayError, OSError) as exc:
            log.warning("auto_top_up_failed_will_retry", error=str(exc))
        await pause(stopping, interval_seconds)


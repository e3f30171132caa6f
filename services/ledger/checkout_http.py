"""HTTP routes of top-up checkout, orders, identity verification and refund requests (ledger service).

``POST /v1/accounts/{t}/checkout`` places the order (promotion redeemed live, so a bad code is a 422 before
any gateway is called), then asks the chosen gateway for a hosted page (idempotency key: the order id) and
records it on the order. Nothing here sees card data.
"""

from __future__ import annotations

import asyncio
import copy
import re
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any
from uuid import NAMESPACE_URL, UUID, uuid4, uuid5

from billing_events.messages import RESOURCE_KEY_PATTERN, LedgerCommand
from billing_events.timeutil import utcnow
from billing_ledger import payment_settings_commands  # noqa: F401  (registers its commands)
from billing_ledger.application import CommandRejected, CommandResult, LedgerApplication, _Batch
from billing_ledger.checkout_commands import build_quote, order_view
from billing_ledger.domain.checkout import Promotion, PromotionRefused, check_promotion, order_id
from billing_ledger.domain.payment_profile import payment_profile_id
from billing_ledger.domain.refund_request import refund_request_id
from billing_ledger.gateways import AmountNotChargeable, GatewayError, OutboundGateway
from billing_ledger.http_models import (
    AlertSettings,
    AutoTopUpRule,
    CheckoutRequest,
    GatewayCustomer,
    IdentityVerification,
    LowBalanceThreshold,
    RefundRequestCreate,
    RefundRequestRejection,
)
from billing_ledger.identity_gate import REASON as IDENTITY_REQUIRED
from billing_ledger.identity_gate import gate_of
from billing_ledger.refund_request_commands import request_view
from billing_ledger.subscriptions_http import apply_now, attribute_customer
from billing_runtime.auth import Principal, Role, check_tenant, require, require_operator
from billing_runtime.bodies import described_by
from billing_runtime.problems import Problem
from billing_runtime.settings import Settings
from fastapi import APIRouter, Body, Depends, Request

_ORDER_KEY = re.compile(RESOURCE_KEY_PATTERN)
STATUS_FOR_REASON = {"unknown_account": 404, "unknown_order": 404, "unknown_refund_request": 404,
                     "order_exists": 409, "refund_request_exists": 409, "invalid_transition": 409,
                     "no_catalog": 503}
AnyRole = Annotated[Principal, Depends(require())]
# A customer's own settings and purchases: the tenant's admin/finance token (or platform staff).
Manager = Annotated[Principal, Depends(require(Role.ADMIN, Role.FINANCE))]
# Operator actions: platform staff only (admin/finance without a tenant claim; see billing_runtime.auth).
Operator = Annotated[Principal, Depends(require_operator(Role.ADMIN, Role.FINANCE))]
AdminOnly = Annotated[Principal, Depends(require_operator(Role.ADMIN))]
# The bodies go to their command (or quote) as sent, whose checks answer a bad field; the models describe them.
CheckoutBody = Annotated[dict[str, Any], described_by(CheckoutRequest), Body()]
IdentityBody = Annotated[dict[str, Any] | None, described_by(IdentityVerification, optional=True), Body()]
CustomerBody = Annotated[dict[str, Any], described_by(GatewayCustomer), Body()]
AlertsBody = Annotated[dict[str, Any], described_by(AlertSettings), Body()]
AutoTopUpBody = Annotated[dict[str, Any], described_by(AutoTopUpRule), Body()]
LowBalanceBody = Annotated[dict[str, Any], described_by(LowBalanceThreshold), Body()]
RefundRequestBody = Annotated[dict[str, Any], described_by(RefundRequestCreate), Body()]
RejectionBody = Annotated[dict[str, Any] | None, described_by(RefundRequestRejection, optional=True), Body()]


def quote_now(app: LedgerApplication, tenant: str, payload: dict[str, Any], at: datetime) -> dict[str, Any]:
    """The top-up summary, read-only: the same quote ``checkout.place`` will record, promotion checked live."""
    batch = _Batch(app, None)
    try:
        built = build_quote(batch, tenant, payload, at)
        promotion = built["promotion"]
        if promotion is not None:
            try:
                check_promotion(promotion, package=payload.get("package"), at=at)
                redeemed = batch.get(Promotion.create_id(promotion["code"]))
                taken = dict(redeemed.redemptions) if redeemed is not None else {}
            except PromotionRefused as exc:
                raise CommandRejected("promotion_refused", str(exc)) from exc
            if promotion.get("max_redemptions") and len(taken) >= int(promotion["max_redemptions"]):
                raise CommandRejected("promotion_refused", f"promotion {promotion['code']} has been fully redeemed")
            per_account = promotion.get("max_per_account")
            if per_account and sum(t == tenant for t in taken.values()) >= int(per_account):
                raise CommandRejected("promotion_refused", f"promotion {promotion['code']} was already used by "
                                                           "this account")
        return copy.deepcopy(built["quote"])  # type: ignore[no-any-return]
    finally:
        batch.return_to_cache()


def _refused(exc: CommandRejected) -> Problem:
    return Problem(STATUS_FOR_REASON.get(exc.reason, 422), "Refused", exc.detail, kind=exc.reason.replace("_", "-"),
                   reason=exc.reason)


def build_router(app: LedgerApplication, settings: Settings, gateways: dict[str, OutboundGateway]) -> APIRouter:
    router = APIRouter(tags=["checkout"])

    async def run(principal: Principal, kind: str, tenant: str, payload: dict[str, Any], key: str | None
                  ) -> CommandResult:
        command_id = uuid5(NAMESPACE_URL, f"/http/{tenant}/{kind}/{key}") if key else uuid4()
        command = LedgerCommand(command_id=command_id, kind=kind, tenant=tenant, issued_at=utcnow(),
                                issued_by=f"user:{principal.subject}", payload=payload)
        result = await apply_now(app, command)
        if result.outcome == "rejected":
            raise _refused(CommandRejected(result.reason or "rejected", result.detail or ""))
        return result

    async def read(aggregate_id: UUID, view: Any) -> Any:
        return await asyncio.to_thread(app.read, aggregate_id, view)

    async def order(tenant: str, key: str) -> dict[str, Any]:
        found = await read(order_id(tenant, key), lambda o: copy.deepcopy(order_view(o)))
        if found is None or found["tenant"] != tenant:
            raise Problem(404, "Not found", f"No order {key!r} for {tenant!r}.", kind="unknown-order")
        return found  # type: ignore[no-any-return]

    @router.get("/v1/accounts/{tenant}/checkout/quote",
                summary="The top-up summary (amount, promotion, tax, total, credits) before confirming")
    async def get_quote(tenant: str, principal: AnyRole, package: str | None = None, amount: str | None = None,
                        promotion: str | None = None) -> dict[str, Any]:
        check_tenant(principal, tenant)
        try:
            q = await asyncio.to_thread(quote_now, app, tenant, {"package": package, "amount": amount,
                                                                 "promotion": promotion}, utcnow())
        except CommandRejected as exc:
            raise _refused(exc) from exc
        return {"tenant": tenant, "quote": q, "gateways": sorted(gateways)}

    @router.post("/v1/accounts/{tenant}/checkout", status_code=201,
                 summary="Place a top-up order and open the gateway's hosted checkout page")
    async def checkout(tenant: str, request: Request, body: CheckoutBody,
                       principal: Manager) -> dict[str, Any]:
        check_tenant(principal, tenant)
        gateway_name = str(body.get("gateway") or (min(gateways) if gateways else ""))
        gateway = gateways.get(gateway_name)
        if gateway is None and not gateways:  # "Choose one of []." told an operator nothing
            raise Problem(422, "Gateway not enabled", "No payment gateway is enabled: set the credentials of Stripe, "
                          "Razorpay or PayPal (BILLING_STRIPE_API_KEY, ...; see docs/payments.md).",
                          kind="gateway-not-enabled", reason="gateway_not_enabled")
        if gateway is None:
            raise Problem(422, "Gateway not enabled", f"{gateway_name!r} is not enabled; choose one of "
                          f"{', '.join(sorted(gateways))}.", kind="gateway-not-enabled", reason="gateway_not_enabled")
        if not all(isinstance(body.get(url), str) and body[url] for url in ("success_url", "cancel_url")):
            raise Problem(422, "Invalid request", "success_url and cancel_url are required (strings).",
                          kind="invalid-request")
        payload = {k: body.get(k) for k in ("package", "amount", "promotion")}
        key = request.headers.get("idempotency-key") or uuid4().hex
        if not _ORDER_KEY.fullmatch(key):  # the order is read back at .../orders/{key} (auto-top-ups' keys are
            # the ledger's own, ``auto-top-up/<request>``, never read by path)
            raise Problem(422, "Invalid request", "The Idempotency-Key names the order (.../orders/{key}): 1 to 128 "
                          "ASCII letters, digits, '.', '_', ':' or '-', starting with a letter or digit.",
                          kind="invalid-request", reason="invalid_checkout")
        if await read(order_id(tenant, key), lambda o: o.tenant) is None:  # else: a retry of this request
            try:
                q = await asyncio.to_thread(quote_now, app, tenant, payload, utcnow())
            except CommandRejected as exc:
                raise _refused(exc) from exc
            refused = gateway.refusal(Decimal(q["total"]), q["currency"])
            if refused:  # before the order is placed (and a promotion redeemed): nothing changes
                raise Problem(422, "Amount not chargeable", f"{refused}; choose another gateway or amount.",
                              kind="amount-not-chargeable", reason="amount_not_chargeable")
            placed = await apply_now(app, LedgerCommand(
                command_id=uuid5(NAMESPACE_URL, f"/http/{tenant}/checkout.place/{key}"), kind="checkout.place",
                tenant=tenant, issued_at=utcnow(), issued_by=f"user:{principal.subject}",
                payload={**payload, "key": key, "gateway": gateway_name, "identity_gate": gate_of(settings)}))
            if placed.outcome == "rejected" and placed.reason == IDENTITY_REQUIRED:  # decided with open orders
                raise Problem(403, "Identity verification required", placed.detail or "",
                              kind=IDENTITY_REQUIRED, reason=IDENTITY_REQUIRED)
            if placed.outcome == "rejected":
                raise _refused(CommandRejected(placed.reason or "rejected", placed.detail or ""))
        current = await order(tenant, key)  # a retried request finds its order (and its page, once opened)
        if current["checkout"] is None and current["status"] == "pending":
            q = current["quote"]
            try:
                session = await gateway.open_checkout(
                    order_id=current["order_id"], tenant=tenant, total=Decimal(q["total"]), currency_code=q["currency"],
                    description=f"Credit package {q['package']}" if q["package"] else "Account top-up",
                    success_url=body["success_url"], cancel_url=body["cancel_url"])
            except GatewayError as exc:
                await run(principal, "checkout.fail", tenant, {"key": key, "reason": "gateway_unavailable"}, None)
                raise Problem(502, "Gateway unavailable", str(exc), kind="gateway-unavailable") from exc
            except AmountNotChargeable as exc:  # an order placed before the gateway could refuse it (nothing sent)
                await run(principal, "checkout.fail", tenant, {"key": key, "reason": "amount_not_chargeable"}, None)
                raise Problem(422, "Amount not chargeable", str(exc), kind="amount-not-chargeable",
                              reason="amount_not_chargeable") from exc
            await run(principal, "checkout.open", tenant, {"key": key, "session_id": session.session_id,
                                                           "url": session.url}, f"{key}/open")
            current = await order(tenant, key)
        return {**current, "checkout_url": (current["checkout"] or {}).get("url")}

    @router.get("/v1/accounts/{tenant}/orders/{key}", summary="An order's status (the success page polls it)")
    async def get_order(tenant: str, key: str, principal: AnyRole) -> dict[str, Any]:
        check_tenant(principal, tenant)
        return await order(tenant, key)

    @router.post("/v1/accounts/{tenant}/identity/verify", summary="Record a completed identity verification (operator: platform admin)")
    async def verify(tenant: str, request: Request, principal: AdminOnly, body: IdentityBody = None) -> dict[str, Any]:
        check_tenant(principal, tenant)
        result = await run(principal, "identity.verify", tenant, body or {}, request.headers.get("idempotency-key"))
        if result.outcome == "duplicate":  # a retry (same Idempotency-Key): the verification as the profile holds it
            return {"tenant": tenant, **await read(payment_profile_id(tenant), lambda p: {
                "identity_verified": p.identity_verified, "identity": copy.deepcopy(p.identity)})}
        return {"tenant": tenant, **result.value}

    @router.put("/v1/accounts/{tenant}/gateway-customers/{gateway}",
                summary="The gateway's customer id that owns the saved payment methods (operator: platform admin, finance)")
    async def put_customer(tenant: str, gateway: str, body: CustomerBody,
                           principal: Operator) -> dict[str, Any]:
        check_tenant(principal, tenant)
        customer, outbound = body.get("customer"), gateways.get(gateway)
        if outbound is not None and isinstance(customer, str) and customer.strip():
            await attribute_customer(outbound, customer, tenant)
        await run(principal, "payment_customer.set", tenant, {"gateway": gateway, "customer": customer}, None)
        return {"tenant": tenant, "gateway": gateway, "customer": body.get("customer")}

    @router.put("/v1/accounts/{tenant}/alerts", summary="Low-balance alerts: email and signed webhook endpoint")
    async def put_alerts(tenant: str, body: AlertsBody,
                         principal: Manager) -> dict[str, Any]:
        check_tenant(principal, tenant)
        result = await run(principal, "alerts.configure", tenant, body, None)
        shown = {**result.value, "webhook_secret": "set" if result.value.get("webhook_secret") else None}
        return {"tenant": tenant, "alerts": shown}

    @router.put("/v1/accounts/{tenant}/auto-top-up",
                summary="Auto-top-up rule: below threshold, top up to target or by one package (cooldown, monthly cap)")
    async def put_auto_top_up(tenant: str, body: AutoTopUpBody, principal: Manager) -> dict[str, Any]:
        check_tenant(principal, tenant)
        known = ("unit", "threshold", "target", "package", "cooldown_seconds", "monthly_cap")
        unknown = sorted(set(body) - set(known))
        if unknown or body.get("threshold") is None or body.get("monthly_cap") is None or (
                (body.get("target") is None) == (not body.get("package"))):
            raise Problem(422, "Invalid request", "Give threshold, monthly_cap and exactly one of target or package"
                          + (f"; unknown fields {unknown}" if unknown else "") + ".", kind="invalid-request")
        result = await run(principal, "auto_top_up.set", tenant,
                           {k: body[k] for k in known if body.get(k) is not None}, None)
        return {"tenant": tenant, "auto_top_up": result.value}

    @router.delete("/v1/accounts/{tenant}/auto-top-up", summary="Remove the auto-top-up rule")
    async def delete_auto_top_up(tenant: str, principal: Manager, unit: str | None = None) -> dict[str, Any]:
        check_tenant(principal, tenant)
        result = await run(principal, "auto_top_up.clear", tenant, {"unit": unit}, None)
        return {"tenant": tenant, **result.value}

    @router.put("/v1/accounts/{tenant}/low-balance",
                summary="Low-balance alert threshold (null removes it); alerts go where PUT .../alerts says")
    async def put_low_balance(tenant: str, body: LowBalanceBody, principal: Manager) -> dict[str, Any]:
        check_tenant(principal, tenant)
        if "threshold" not in body:
            raise Problem(422, "Invalid request", "threshold is required (null removes the alert).",
                          kind="invalid-request")
        result = await run(principal, "low_balance.set", tenant,
                           {"unit": body.get("unit"), "threshold": body["threshold"]}, None)
        return {"tenant": tenant, "low_balance": result.value}

    # -- refunds ---------------------------------------------------------------------------------------------

    async def refund_request(tenant: str, key: str) -> dict[str, Any]:
        found = await read(refund_request_id(tenant, key), lambda r: copy.deepcopy(request_view(r)))
        if found is None:
            raise Problem(404, "Not found", f"No refund request {key!r}.", kind="unknown-refund-request")
        return found  # type: ignore[no-any-return]

    @router.post("/v1/accounts/{tenant}/refund-requests", status_code=201,
                 summary="Ask for a refund of a paid top-up order (reviewed by an operator)")
    async def create_refund_request(tenant: str, request: Request, body: RefundRequestBody,
                                    principal: AnyRole) -> dict[str, Any]:
        check_tenant(principal, tenant)
        if body.get("key") is not None and not (isinstance(body["key"], str) and body["key"]):
            raise Problem(422, "Invalid request", "key must be a non-empty string.", kind="invalid-request")
        key = body.get("key") or request.headers.get("idempotency-key") or uuid4().hex
        result = await run(principal, "refund_request.create", tenant, {**body, "key": key}, key)
        return result.value or await refund_request(tenant, key)  # type: ignore[no-any-return]

    @router.get("/v1/accounts/{tenant}/refund-requests/{key}")
    async def get_refund_request(tenant: str, key: str, principal: AnyRole) -> dict[str, Any]:
        check_tenant(principal, tenant)
        return await refund_request(tenant, key)

    @router.post("/v1/accounts/{tenant}/refund-requests/{key}/approve",
                 summary="Approve: the gateway refunds, then the ledger reverses the order and issues a credit note (operator: "
                         "platform admin, finance)")
    async def approve(tenant: str, key: str, principal: Operator) -> dict[str, Any]:
        check_tenant(principal, tenant)
        approved = await run(principal, "refund_request.approve", tenant, {"key": key}, None)
        details = approved.value["order"]
        gateway = gateways.get(details["gateway"])
        if gateway is None:
            raise Problem(409, "Gateway not enabled", f"{details['gateway']} is not enabled.", kind="gateway-not-enabled")
        q = details["quote"]
        try:
            refund = await gateway.refund(payment_reference=details["payment"]["payment_id"], total=Decimal(q["total"]),
                                          currency_code=q["currency"], idempotency_key=f"refund-{approved.value['refund_request_id']}",
                                          tenant=tenant, order_id=approved.value["order_id"])
        except GatewayError as exc:  # stays approved: approving again retries the same refund (same key)
            raise Problem(502, "Gateway unavailable", str(exc), kind="gateway-unavailable") from exc
        except AmountNotChargeable as exc:  # nothing sent; an order the gateway charged is always refundable
            raise Problem(422, "Amount not chargeable", str(exc), kind="amount-not-chargeable",
                          reason="amount_not_chargeable") from exc
        await run(principal, "refund_request.complete", tenant, {"key": key, "gateway_refund": refund.reference},
                  f"{key}/complete")
        return await refund_request(tenant, key)

    @router.post("/v1/accounts/{tenant}/refund-requests/{key}/reject",
                 summary="Reject a refund request (operator: platform admin, finance)")
    async def reject(tenant: str, key: str, principal: Operator, body: RejectionBody = None) -> dict[str, Any]:
        check_tenant(principal, tenant)
        await run(principal, "refund_request.reject", tenant, {**(body or {}), "key": key}, None)  # the path's
        return await refund_request(tenant, key)

    return router

"""HTTP routes for subscriptions, payment methods, invoice previews and invoice PDFs, and workspace membership
(trial eligibility) (ledger service).

Saving a payment method asks its gateway (when enabled here) for the card's brand, last four digits and expiry
(``OutboundGateway.saved_card``), which the method keeps, and marks it the tenant's there
(``OutboundGateway.attribute_method``: Stripe's ``metadata.tenant``, so its card updates are attributed), and the
account's customer at that gateway too (``attribute_customer``, since session 15: the customer's own events); a method
the gateway does not know, or marks another tenant's, is refused, and so is one of a customer deleted there or marked
another tenant's.

Changes are applied synchronously in this process (one-command transactions) so the caller gets the
outcome at once; an optimistic-concurrency conflict with the Kafka consumer is retried on fresh state.
An ``Idempotency-Key`` header makes a retried request the same command (same id: the first answer).
"""

from __future__ import annotations

import asyncio
import copy
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any
from uuid import NAMESPACE_URL, UUID, uuid4, uuid5

from billing_events.messages import RESOURCE_KEY_PATTERN, TENANT_PATTERN, LedgerCommand
from billing_events.timeutil import parse_timestamp, utcnow
from billing_ledger.application import CommandRejected, CommandResult, LedgerApplication
from billing_ledger.domain.allocation import ResourcePool
from billing_ledger.domain.catalog import Catalog
from billing_ledger.domain.invoice import Invoice, invoice_id
from billing_ledger.domain.payment_profile import payment_profile_id
from billing_ledger.domain.proration import localized, quote_change
from billing_ledger.domain.roster import roster_id, workspace_id
from billing_ledger.domain.subscription import (
    ACTIVE,
    CANCELED,
    LIVE,
    PAST_DUE,
    TRIALING,
    Subscription,
    change_invoice_key,
    subscription_id,
)
from billing_ledger.domain.tax import EU_MEMBER_STATES, check_tax_id
from billing_ledger.gateways import GatewayError, OutboundGateway, UnknownCustomer, UnknownPaymentMethod
from billing_ledger.http_models import (
    PaymentMethodAdd,
    SubscriptionCancel,
    SubscriptionChange,
    SubscriptionCreate,
    SubscriptionMoment,
    TaxProfile,
)
from billing_ledger.invoice_pdf import render_pdf
from billing_ledger.limits import CANCEL_RENEWALS_MAX, EFFECTIVE_AT_SKEW_SECONDS_MAX
from billing_ledger.saved_methods import method_view
from billing_ledger.scheduler import DueIndex, tick_messages
from billing_ledger.subscription_commands import (
    _left_to_give_back,
    capacities_after_change,
    check_capacity,
    credit_live_invoice,
    document_tax_lines,
    live_period_invoice,
    workspace_view,
)
from billing_ledger.vies import NoRegistry, VatRegistry
from billing_runtime.auth import Principal, Role, check_tenant, require, require_operator
from billing_runtime.bodies import described_by
from billing_runtime.bus import Bus
from billing_runtime.problems import Problem
from eventsourcing.persistence import IntegrityError
from fastapi import APIRouter, Body, Depends, Path, Request, Response

APPLY_ATTEMPTS_MAX = 5
STATUS_FOR_REASON = {"invalid_vat_id": 422, "invalid_tax_id": 422, "vat_id_country_mismatch": 422,
                     "invalid_tax_profile": 422, "unknown_account": 404,
                     "unknown_subscription": 404, "unknown_plan": 422, "unsupported_plan": 422,
                     "unknown_invoice": 404, "subscription_limit_reached": 409, "subscription_exists": 409,
                     "capacity_below_usage": 409, "invalid_transition": 409, "renewals_behind": 409,
                     "invalid_card": 422, "workspace_mismatch": 409}
# The bodies go to their command as sent (its checks answer a bad field); the models describe them.
CreateBody = Annotated[dict[str, Any], described_by(SubscriptionCreate), Body()]
ActionBody = Annotated[dict[str, Any] | None, Body()]
ACTION_BODIES = {action: Annotated[dict[str, Any] | None, described_by(model, optional=True), Body()]
                 for action, model in (("change", SubscriptionChange), ("cancel", SubscriptionCancel),
                                       ("pause", SubscriptionMoment), ("resume", SubscriptionMoment))}
PaymentMethodBody = Annotated[dict[str, Any], described_by(PaymentMethodAdd, refused_by_route=("card",)), Body()]
TaxProfileBody = Annotated[dict[str, Any], described_by(TaxProfile), Body()]
WorkspaceName = Annotated[str, Path(pattern=RESOURCE_KEY_PATTERN, description="The workspace (organisation)")]
TenantName = Annotated[str, Path(pattern=TENANT_PATTERN, description="The billing account (tenant)")]


async def apply_now(app: LedgerApplication, command: LedgerCommand) -> CommandResult:
    for _ in range(APPLY_ATTEMPTS_MAX):
        try:
            [result] = await asyncio.to_thread(app.apply_commands, [command], None, record_rejections=False)
            return result
        except IntegrityError:
            continue  # another writer recorded one of the aggregates first: retry on fresh state
    raise Problem(503, "Busy", "The account is being changed concurrently; retry.", kind="conflict-retry")


def _view(sub: Subscription) -> dict[str, Any]:
    return {"subscription_id": str(sub.id), "key": sub.key, "tenant": sub.tenant, "status": sub.status,
            "plan": {"code": sub.plan["code"], "version": sub.plan["version"], "name": sub.plan["name"],
                     "cadence": sub.plan["cadence"], "currency": sub.plan["currency"]},
            "quantity": sub.quantity, "period_start": sub.period_start, "period_end": sub.period_end,
            "trial_end": sub.trial_end, "cancel_at_period_end": sub.cancel_at_period_end,
            "time_zone": sub.time_zone, "collection": sub.collection}


def _issued_lines(document: Any) -> list[dict[str, Any]]:
    """The lines a subscription command gave its document (an invoice or a credit note), without the tax finalizing
    added to them: what the command answered."""
    if not isinstance(document, Invoice):
        return []
    return [copy.deepcopy(line) for line in document.lines if line.get("kind") != "tax"]


def retried_action(app: LedgerApplication, action: str, tenant: str, key: str, command_id: UUID
                   ) -> dict[str, Any] | None:
    """What a lifecycle command (``subscription.<action>``) answered the first time, for a retry of it (the same
    ``Idempotency-Key``: a duplicate, whose result holds nothing), read from the document it issued: a change's
    (keyed by the command's id), an immediate cancel's, a resume's (the period's invoice it made). Before session 15
    a retry was answered ``result: null``, the prorated lines the client came for lost."""
    found = app.read(subscription_id(tenant, key), lambda s: (str(s.id), s.status, s.period_invoice))
    if found is None or action == "pause":
        return None
    sub, status, period_invoice = found
    if action == "change":
        lines = app.read(invoice_id(tenant, change_invoice_key(UUID(sub), command_id)), _issued_lines)
        return {"subscription_id": sub, "lines": lines or []}
    if action == "cancel":
        lines = app.read(invoice_id(tenant, f"{sub}/cancel"), _issued_lines) if status == CANCELED else None
        return {"subscription_id": sub, "status": status, "lines": lines or []}
    # resume: the rest of a period that began while paused is billed by a document that became the period's
    lines = app.read(UUID(period_invoice), lambda i: _issued_lines(i) if str(getattr(i, "key", "")).startswith(
        f"{sub}/resume/") else []) if period_invoice else None
    return {"subscription_id": sub, "lines": lines or []}


def _moment(at: str | None) -> datetime:
    """The ``at`` query parameter (ISO 8601 with a UTC offset), else now; a malformed one is a 422, not a 500."""
    if not at:
        return utcnow()
    try:
        return parse_timestamp(at)
    except ValueError as exc:
        raise Problem(422, "Invalid request", f"at: {exc}", kind="invalid-request",
                      reason="invalid_command") from exc


def _methods(roster: Any) -> list[dict[str, Any]]:
    now = utcnow()
    return [method_view(m, now) for m in roster.payment_methods]


def unknown_customer(exc: UnknownCustomer) -> Problem:
    return Problem(422, "Unknown gateway customer", str(exc), kind="unknown-payment-customer",
                   reason="unknown_payment_customer")


def gateway_unavailable(exc: GatewayError) -> Problem:
    return Problem(503, "Gateway unavailable", f"{exc}; nothing was saved, retry later.", kind="gateway-unavailable",
                   reason="gateway_unavailable")


async def attribute_customer(gateway: OutboundGateway, customer: str, tenant: str) -> bool:
    """Marks ``customer`` the tenant's at ``gateway`` (Stripe's ``metadata.tenant``: its events about the customer
    reach the ledger, since session 15); a customer the gateway does not know, deleted or marked another tenant's is
    422 ``unknown-payment-customer``, the gateway unavailable 503: the caller saves nothing then."""
    try:
        return await gateway.attribute_customer(customer=customer, tenant=tenant)
    except UnknownCustomer as exc:
        raise unknown_customer(exc) from exc
    except GatewayError as exc:
        raise gateway_unavailable(exc) from exc


def build_router(app: LedgerApplication, bus: Bus, issuer: str, vat_registry: VatRegistry | None = None,
                 gateways: dict[str, OutboundGateway] | None = None) -> APIRouter:
    registry = vat_registry or NoRegistry()
    outbound = gateways or {}
    router = APIRouter(tags=["subscriptions"])

    async def run(request: Request, principal: Principal, kind: str, tenant: str, payload: dict[str, Any]
                  ) -> CommandResult:
        key = request.headers.get("idempotency-key")
        command_id = uuid5(NAMESPACE_URL, f"/http/{tenant}/{kind}/{key}") if key else uuid4()
        command = LedgerCommand(command_id=command_id, kind=kind, tenant=tenant, issued_at=utcnow(),
                                issued_by=f"user:{principal.subject}", payload=payload)
        result = await apply_now(app, command)
        if result.outcome == "rejected" or (result.outcome == "duplicate" and result.first_outcome == "rejected"):
            reason = result.reason or "rejected"
            raise Problem(STATUS_FOR_REASON.get(reason, 422), "Refused", result.detail or reason,
                          kind=reason.replace("_", "-"), reason=reason)
        return result

    async def read(aggregate_id: UUID, view: Any) -> Any:
        return await asyncio.to_thread(app.read, aggregate_id, view)

    async def subscription(tenant: str, key: str, view: Any = None) -> Any:
        found = await read(subscription_id(tenant, key), view or _view)
        if found is None:
            raise Problem(404, "Not found", f"No subscription {key!r} for {tenant!r}.", kind="unknown-subscription")
        return found

    admin = require(Role.ADMIN, Role.SERVICE)

    def check_pools(tenant: str, sub: Subscription, plan: dict[str, Any], quantity: int) -> None:
        """The change's capacity check (``check_capacity``) on the account's pools as they are now: a cut the
        change would refuse (``capacity_below_usage``) is refused by its preview too."""
        live = app.read(roster_id(tenant), lambda r: list(r.live)) or []
        subs = [s for s in (app.read(UUID(i), copy.deepcopy) for i in live) if s is not None and s.status in LIVE]
        before, after = capacities_after_change(subs, sub, plan, quantity)
        check_capacity(lambda resource, capacity: app.read(ResourcePool.create_id(tenant, resource), lambda p: (
            p.can_reduce_to(capacity), p.in_use)), before, after)

    @router.post("/v1/accounts/{tenant}/subscriptions", status_code=201,
                 summary="Subscribe to a published plan version (trial when eligible)")
    async def create(tenant: str, request: Request, body: CreateBody,
                     principal: Principal = Depends(admin)) -> dict[str, Any]:
        check_tenant(principal, tenant)
        if not body.get("key") or not body.get("plan"):
            raise Problem(422, "Invalid request", "key and plan are required.", kind="invalid-request")
        await run(request, principal, "subscription.create", tenant, body)
        return await subscription(tenant, str(body["key"]))  # type: ignore[no-any-return]

    @router.get("/v1/accounts/{tenant}/subscriptions", summary="Live subscriptions of an account")
    async def list_live(tenant: str, principal: Principal = Depends(require())) -> dict[str, Any]:
        check_tenant(principal, tenant)
        roster = await read(roster_id(tenant), lambda r: (list(r.live), _methods(r), r.workspace))
        live, methods, workspace = roster or ([], [], None)
        subs = [await read(UUID(i), _view) for i in live]
        return {"tenant": tenant, "subscriptions": [s for s in subs if s is not None], "payment_methods": methods,
                "workspace": workspace}

    @router.get("/v1/accounts/{tenant}/subscriptions/{key}")
    async def get_one(tenant: str, key: str, principal: Principal = Depends(require())) -> dict[str, Any]:
        check_tenant(principal, tenant)
        return await subscription(tenant, key)  # type: ignore[no-any-return]

    @router.get("/v1/accounts/{tenant}/subscriptions/{key}/invoice-preview",
                summary="The exact effect of a proposed change (prorated charges and credits) before making it")
    async def preview(tenant: str, key: str, plan: str | None = None, plan_version: int | None = None,
                      quantity: int | None = None, at: str | None = None,
                      principal: Principal = Depends(require())) -> dict[str, Any]:
        check_tenant(principal, tenant)
        if plan_version is not None and (plan_version < 1 or not plan):
            raise Problem(422, "Invalid request", "plan_version must be a version (1 or more) of the plan given "
                          "as plan.", kind="invalid-request", reason="invalid_command")
        sub = await subscription(tenant, key, lambda s: copy.deepcopy(s))
        new_plan = sub.plan
        if plan:
            def find(catalog: Catalog) -> dict[str, Any] | None:
                version = plan_version
                if version is None:
                    current = next((p for p in catalog.document.get("plans", []) if p["code"] == plan), None)
                    version = int(current["version"]) if current else None
                return copy.deepcopy(catalog.plan(plan, version)) if version else None

            found = await read(Catalog.create_id(), find)
            if found is None:
                raise Problem(422, "Unknown plan", f"Plan {plan!r} v{plan_version} does not exist.",
                              kind="unknown-plan")
            new_plan = localized(found, sub.plan["currency"])
            if new_plan is None:
                raise Problem(422, "No price in this currency",
                              f"Plan {plan!r} has no price in {sub.plan['currency']}.", kind="currency-mismatch")
        if quantity is not None and quantity < 1:
            raise Problem(422, "Invalid request", "quantity must be at least 1.", kind="invalid-request",
                          reason="invalid_command")
        moment = _moment(at)
        status, start, end = sub.status, sub.period_start, sub.period_end
        trial_over = status == TRIALING and sub.trial_end is not None and moment >= sub.trial_end
        converted = trial_over and await read(roster_id(tenant), lambda r: r.usable_payment_method(moment) is not None)
        if trial_over and not converted:
            # The change would end the trial unconverted first (no payment method but expired cards) and be refused.
            raise Problem(422, "Refused", f"The trial ended on {sub.trial_end.isoformat()} without a usable payment "
                                          "method (none saved, or every saved card has expired): nothing to change.",
                          kind="invalid-transition", reason="invalid_transition")
        if converted:
            # The change ends the trial first (``change_subscription``): converted, it prorates that paid period.
            status, (start, end) = ACTIVE, sub.converted_period()
        renewed = status in (ACTIVE, PAST_DUE) and moment >= end
        if renewed:
            # The change renews the periods ended by then first, as the tick would (``_renew_due``): it prorates the
            # period ``moment`` falls in, and corrects that period's renewal invoice (a draft: today's tax).
            if sub.cancel_at_period_end:
                raise Problem(422, "Refused", f"The subscription ended on {end.isoformat()} (canceled at its "
                                              "period's end): nothing to change.", kind="invalid-transition",
                              reason="invalid_transition")
            due = sub.renewed_period(moment, CANCEL_RENEWALS_MAX, converted=converted)
            if due is None:
                raise Problem(422, "Refused", f"More than {CANCEL_RENEWALS_MAX} periods ended since "
                                              f"{end.isoformat()} are not renewed: tick the subscription first.",
                              kind="renewals-behind", reason="renewals_behind")
            start, end = due
        try:
            await asyncio.to_thread(check_pools, tenant, sub, new_plan, quantity or sub.quantity)
        except CommandRejected as exc:  # the change would be refused so (it answered 200 with prorated lines)
            raise Problem(STATUS_FOR_REASON.get(exc.reason, 422), "Refused", exc.detail,
                          kind=exc.reason.replace("_", "-"), reason=exc.reason) from exc
        lines = quote_change(status=status, plan=sub.plan, quantity=sub.quantity,
                             period_start=start, period_end_at=end, time_zone=sub.time_zone,
                             new_plan=new_plan, new_quantity=quantity or sub.quantity, at=moment)
        # The invoice it corrects (the subscription's period invoice, or the one a voided change corrected, whose
        # unused time it credits at what that billed), read as the change reads it.
        corrected = await asyncio.to_thread(live_period_invoice, sub, lambda i: app.read(i, copy.deepcopy)) \
            if lines and not renewed else None
        # ... and no more than that invoice has left to give back (a gateway refund, in full or in part), as the
        # change caps it: the preview quoted the whole unused time after a refund.
        lines = _left_to_give_back(credit_live_invoice(lines, sub, corrected, moment, canceled=False), corrected)
        net = sum((Decimal(line["amount"]) for line in lines), Decimal(0))
        # The tax finalizing would add: the same rules, on the same net total, by the account's tax profile, and
        # the credit for unused time at the rate of the invoice it corrects.
        profile = await read(roster_id(tenant), lambda r: copy.deepcopy(r.tax_profile))
        catalog = await read(Catalog.create_id(), lambda c: copy.deepcopy(c.document))
        if lines:
            try:
                lines = lines + document_tax_lines(lines, sub.plan["currency"], profile, catalog, corrected)
            except CommandRejected as exc:  # the change itself would be refused so
                raise Problem(STATUS_FOR_REASON.get(exc.reason, 422), "Refused", exc.detail,
                              kind=exc.reason.replace("_", "-"), reason=exc.reason) from exc
        total = sum((Decimal(line["amount"]) for line in lines), Decimal(0))
        return {"subscription": _view(sub), "at": moment, "lines": lines, "net": str(net), "total": str(total),
                "currency": sub.plan["currency"],
                "document": "credit_note" if total < 0 else ("invoice" if lines else "none")}

    for action in ("change", "cancel", "pause", "resume"):
        def make(action: str = action) -> Any:
            async def act(tenant: str, key: str, request: Request, body: ActionBody = None,
                          principal: Principal = Depends(admin)) -> dict[str, Any]:
                check_tenant(principal, tenant)
                result = await run(request, principal, f"subscription.{action}", tenant, {**(body or {}), "key": key})
                value = result.value
                if result.outcome == "duplicate":  # a retry: the first answer, from the documents it issued
                    value = await asyncio.to_thread(retried_action, app, action, tenant, key, result.command_id)
                return {**await subscription(tenant, key), "result": value}
            act.__annotations__["body"] = ACTION_BODIES[action]  # the action's own model documents its body
            return act
        router.post(f"/v1/accounts/{{tenant}}/subscriptions/{{key}}/{action}",
                    summary=f"{action.capitalize()} a subscription")(make())

    async def saved_card(tenant: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """What the method's gateway says of the card, once it has marked the method and the account's customer there
        the tenant's (Stripe's ``metadata.tenant``: its card updates and the customer's events reach the ledger); None
        when that gateway is not enabled here (or the body is malformed: the command says how)."""
        method_id, name = body.get("method_id"), body.get("gateway", "stripe")
        gateway = outbound.get(name) if isinstance(name, str) else None
        if gateway is None or not isinstance(method_id, str) or not method_id.strip():
            return None
        customers = await read(payment_profile_id(tenant), lambda p: dict(p.customers)) or {}
        customer = customers.get(name)
        try:
            card = await gateway.saved_card(customer=customer, method_id=method_id)
            if customer:  # the customer it belongs to, first: marked too (one set before session 15 was not)
                await gateway.attribute_customer(customer=customer, tenant=tenant)
            await gateway.attribute_method(customer=customer, method_id=method_id, tenant=tenant)
            return card
        except UnknownPaymentMethod as exc:
            raise Problem(422, "Unknown payment method", str(exc), kind="unknown-payment-method",
                          reason="unknown_payment_method") from exc
        except UnknownCustomer as exc:
            raise unknown_customer(exc) from exc
        except GatewayError as exc:
            raise gateway_unavailable(exc) from exc

    @router.post("/v1/accounts/{tenant}/payment-methods", status_code=201,
                 summary="Add a gateway payment-method token (no card data is ever stored); up to 5. A card's brand, "
                         "last four digits and expiry come from its gateway")
    async def add_method(tenant: str, request: Request, body: PaymentMethodBody,
                         principal: Principal = Depends(admin)) -> dict[str, Any]:
        check_tenant(principal, tenant)
        if "card" in body:
            raise Problem(422, "Invalid request", "card is not taken from the request: the brand, last four digits "
                          "and expiry of a card come from its gateway.", kind="invalid-command",
                          reason="invalid_command")
        card = await saved_card(tenant, body)
        await run(request, principal, "payment_method.add", tenant, {**body, "card": card} if card else body)
        methods = await read(roster_id(tenant), _methods)
        return {"tenant": tenant, "payment_methods": methods}

    @router.get("/v1/accounts/{tenant}/payment-methods",
                summary="Saved payment methods, the default first: card brand, last four digits, expiry")
    async def list_methods(tenant: str, principal: Principal = Depends(require())) -> dict[str, Any]:
        check_tenant(principal, tenant)
        return {"tenant": tenant, "payment_methods": await read(roster_id(tenant), _methods) or []}

    @router.delete("/v1/accounts/{tenant}/payment-methods/{method_id}", status_code=204)
    async def remove_method(tenant: str, method_id: str, request: Request,
                            principal: Principal = Depends(admin)) -> Response:
        check_tenant(principal, tenant)
        await run(request, principal, "payment_method.remove", tenant, {"method_id": method_id})
        return Response(status_code=204)

    @router.put("/v1/accounts/{tenant}/tax-profile", summary="Business name, country and VAT id (validated)")
    async def put_tax_profile(tenant: str, request: Request, body: TaxProfileBody,
                              principal: Principal = Depends(require(Role.ADMIN, Role.FINANCE))) -> dict[str, Any]:
        check_tenant(principal, tenant)
        if body.get("tax_id") and str(body.get("country", "")).upper() in EU_MEMBER_STATES:  # VIES: EU VAT ids only
            check = check_tax_id(str(body["country"]), str(body["tax_id"]))  # VIES is not asked about another's
            registered = await registry.is_registered(check.number) if check.valid else None
            if registered is False:
                raise Problem(422, "Refused", f"VAT id {check.number} is not registered (VIES).",
                              kind="vat-id-not-registered", reason="vat_id_not_registered")
            body = {**body, "vies": "registered" if registered else "not_checked"}
        result = await run(request, principal, "tax_profile.set", tenant, body)
        profile = result.value
        if result.outcome == "duplicate":  # a retry: the profile the first request saved, as the account holds it
            profile = await read(roster_id(tenant), lambda r: copy.deepcopy(r.tax_profile))
        return {"tenant": tenant, "tax_profile": profile, "vies": body.get("vies")}

    @router.get("/v1/accounts/{tenant}/tax-profile")
    async def get_tax_profile(tenant: str, principal: Principal = Depends(require())) -> dict[str, Any]:
        check_tenant(principal, tenant)
        profile = await read(roster_id(tenant), lambda r: dict(r.tax_profile) if r.tax_profile else None)
        return {"tenant": tenant, "tax_profile": profile}

    @router.get("/v1/accounts/{tenant}/invoices/{invoice_id}.pdf", summary="A fresh PDF copy of an invoice",
                response_class=Response)
    async def invoice_pdf(tenant: str, invoice_id: UUID, principal: Principal = Depends(require())) -> Response:
        check_tenant(principal, tenant)

        def owned_pdf(invoice: Any) -> tuple[str | None, bytes] | None:
            # The invoice's tenant first: another tenant's document is never rendered (it was, then refused 404,
            # which cost the server a rendering per request and told by its time that the invoice exists).
            if not isinstance(invoice, Invoice) or invoice.tenant != tenant:
                return None
            return invoice.number, render_pdf(invoice, issuer=issuer)

        rendered = await read(invoice_id, owned_pdf)
        if rendered is None:
            raise Problem(404, "Not found", "No such invoice.", kind="unknown-invoice")
        number, pdf = rendered
        return Response(pdf, media_type="application/pdf",
                        headers={"Content-Disposition": f'inline; filename="{number or invoice_id}.pdf"'})

    @router.put("/v1/workspaces/{workspace}/accounts/{tenant}",
                summary="Make a billing account a member of a workspace (operator: platform admin; a trial needs "
                        "it to have one only)")
    async def join_workspace(workspace: WorkspaceName, tenant: TenantName, request: Request,
                             principal: Principal = Depends(require_operator(Role.ADMIN))) -> dict[str, Any]:
        check_tenant(principal, tenant)
        result = await run(request, principal, "workspace.add_account", tenant, {"workspace": workspace})
        if result.outcome == "duplicate":  # a retry: the membership the first request made, as the workspace holds it
            return await read(workspace_id(workspace), workspace_view)  # type: ignore[no-any-return]
        return result.value  # type: ignore[no-any-return]

    @router.get("/v1/workspaces/{workspace}", summary="A workspace's billing accounts (admin)")
    async def get_workspace(workspace: WorkspaceName, principal: Principal = Depends(require(Role.ADMIN))
                            ) -> dict[str, Any]:
        found = await read(workspace_id(workspace), workspace_view)
        if found is not None and principal.tenant is not None and principal.tenant not in found["accounts"]:
            found = None  # a tenant's token sees its own workspace only (another's is not said to exist)
        if found is None:
            raise Problem(404, "Not found", f"No workspace {workspace!r}.", kind="unknown-workspace")
        return found  # type: ignore[no-any-return]

    @router.post("/v1/billing/cycle/run", summary="Tick every subscription due now (operator: platform admin; idempotent)",
                 description="`at` (default: now) may be in the past (ticks what was due then), never after now "
                             "(plus `EFFECTIVE_AT_SKEW_SECONDS_MAX`): 422 `at-in-the-future`, nothing ticked.")
    async def run_cycle(at: str | None = None,
                        _: Principal = Depends(require_operator(Role.ADMIN))) -> dict[str, Any]:
        moment: datetime = _moment(at)
        latest = utcnow() + timedelta(seconds=EFFECTIVE_AT_SKEW_SECONDS_MAX)
        if moment > latest:
            # Ticked early, a period would be renewed before its end (its next fee invoiced, its credits expired)
            # and rating would take the usage of now as late, into the period after (``late:priced``).
            raise Problem(422, "Refused", f"at {moment.isoformat()} is in the future: the cycle ticks what is due "
                                          f"by now (at most {EFFECTIVE_AT_SKEW_SECONDS_MAX} s ahead, a clock's skew).",
                          kind="at-in-the-future", reason="at_in_the_future")
        index = DueIndex()
        await asyncio.to_thread(index.catch_up, app)
        commands = index.ticks(moment)
        await bus.publish(tick_messages(commands))
        return {"at": moment, "ticked": [{"tenant": c.tenant, "key": c.payload["key"]} for c in commands]}

    return router

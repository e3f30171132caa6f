"""Ledger commands of top-up checkout: ``checkout.place`` / ``.open`` / ``.fail``, and paying an order.

``checkout.place`` checks the promotion live (validity, total and per-account limits: the ``Promotion``
aggregate records the redemption in the same transaction) and places the ``Order`` with its quote, before any
gateway is called, so an invalid, expired or exhausted code is refused before anything is charged.
``pay_order`` is what a verified payment for a known order does, in one transaction: the order is paid (exact
quoted total only), the credits are granted once (in the currency: ``purchase`` for what was paid, net, with
the tax recorded, funded from the gateway's clearing, and a ``promotion`` grant for the rest, a package's bonus
or a discount; a package granted in a credit unit keeps credits + bonus on its ``purchase`` grant and books the
money paid, net and tax, in the currency: ``BillingAccount.book_purchase_money``; the promotion's bonus as a
``promotion`` grant in the promotion's unit) and a paid top-up invoice is issued and
finalized (gap-free number; the notifier emails it with its PDF).
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

from billing_events import ids
from billing_events.catalog import price_not_billable
from billing_events.messages import LedgerCommand
from billing_events.money import parse_decimal, to_subunits
from billing_ledger import identity_gate
from billing_ledger import payload as fields
from billing_ledger.account_commands import account_of, declared_unit, minor_amount
from billing_ledger.application import CommandRejected, LedgerApplication, _Batch, handles
from billing_ledger.catalog_commands import published_catalog
from billing_ledger.domain.account import AUTO_TOP_UP_COOLDOWN_SECONDS_DEFAULT
from billing_ledger.domain.checkout import (
    PAID,
    CheckoutError,
    Order,
    Promotion,
    PromotionRefused,
    order_id,
    quote,
)
from billing_ledger.domain.invoice import INVOICE, Invoice, invoice_id, line
from billing_ledger.domain.payment_profile import PaymentProfile, payment_profile_id
from billing_ledger.domain.roster import roster_id
from billing_ledger.domain.tax import percent_text
from billing_ledger.invoice_overage import repay_from_purchase
from billing_ledger.outbound_urls import OutboundUrlRefused, check_url
from billing_ledger.payload import at as effective_at
from billing_ledger.subscription_commands import _finalize
from billing_runtime.settings import Settings


def catalog_document(batch: _Batch) -> dict[str, Any]:
    return published_catalog(batch).document


def profile_of(batch: _Batch, tenant: str) -> PaymentProfile:
    return batch.get_or_create(payment_profile_id(tenant),  # type: ignore[no-any-return]
                               lambda: PaymentProfile(tenant=tenant))


def order_of(batch: _Batch, tenant: str, key: str) -> Order:
    return batch.existing(order_id(tenant, key), "unknown_order",  # type: ignore[no-any-return]
                          f"tenant {tenant!r} has no order {key!r}")


def _promotion(document: dict[str, Any], code: str) -> dict[str, Any]:
    found = next((p for p in document.get("promotions") or [] if p["code"] == code.upper()), None)
    if found is None:
        raise CommandRejected("promotion_refused", f"promotion code {code!r} is not valid")
    return dict(found)


def order_view(order: Order) -> dict[str, Any]:
    return {"order_id": str(order.id), "key": order.key, "tenant": order.tenant, "status": order.status,
            "gateway": order.gateway, "quote": dict(order.quote), "checkout": order.checkout,
            "payment": order.payment, "invoice_id": order.invoice_id}


def build_quote(batch: _Batch, tenant: str, payload: dict[str, Any], at: datetime) -> dict[str, Any]:
    """The top-up summary for ``payload`` (package or amount, optional promotion); checks nothing is stale."""
    account = account_of(batch, tenant)
    document = catalog_document(batch)
    package = None
    if payload.get("package"):
        package = next((p for p in document.get("packages") or [] if p["code"] == payload["package"]), None)
        if package is None:
            raise CommandRejected("unknown_package", f"no credit package {payload['package']!r}")
        if package["currency"] != account.currency:
            raise CommandRejected("currency_mismatch", f"package in {package['currency']}, account in "
                                                       f"{account.currency}")
    promotion = _promotion(document, str(payload["promotion"])) if payload.get("promotion") else None
    roster = batch.get(roster_id(tenant))
    try:
        amount = parse_decimal(payload["amount"], field="amount") if payload.get("amount") is not None else None
        q = quote(package=package, amount=amount, account_currency=account.currency, promotion=promotion,
                  tax_profile=roster.tax_profile if roster is not None else None,
                  tax_rules=document.get("tax_rules") or [], seller_country=(document.get("seller") or {}).get("country"),
                  credit_units=(document.get("credit_units") or {}).keys())
    except PromotionRefused as exc:
        raise CommandRejected("promotion_refused", str(exc)) from exc
    except (CheckoutError, ValueError) as exc:
        raise CommandRejected("invalid_checkout", str(exc)) from exc
    return {"quote": q.as_dict(), "promotion": promotion, "package": package}


@handles("checkout.place")
def place_order(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> dict[str, Any]:
    tenant = command.tenant or ""
    payload = command.payload
    key = str(payload.get("key") or "")
    if not key:
        raise CommandRejected("invalid_checkout", "an order needs a key")
    at = effective_at(command)
    existing = batch.get(order_id(tenant, key))
    if existing is not None:
        raise CommandRejected("order_exists", f"order {key!r} exists")
    built = build_quote(batch, tenant, payload, at)
    oid = order_id(tenant, key)
    # The identity gate, in this transaction: the profile's write below (the order counts as open) makes
    # concurrent checkouts conflict, so one is decided again and sees the other's order.
    profile = profile_of(batch, tenant)
    identity_gate.check(batch, profile, payload.get("identity_gate"), Decimal(built["quote"]["total"]))
    if built["promotion"] is not None:
        definition = {**built["promotion"], "_package": payload.get("package")}
        promo = batch.get_or_create(Promotion.create_id(definition["code"]),
                                    lambda: Promotion(code=definition["code"]))
        try:
            promo.redeem(tenant=tenant, order=oid, definition=definition, at=at)
        except PromotionRefused as exc:
            raise CommandRejected("promotion_refused", str(exc)) from exc
    order = Order(tenant=tenant, key=key, quote=built["quote"], gateway=str(payload.get("gateway", "stripe")),
                  at=at, by=command.issued_by)
    batch.add(order)
    profile.place_order(order=str(oid), total=built["quote"]["total"], at=at)
    return order_view(order)


@handles("checkout.open")
def open_checkout(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> dict[str, Any]:
    order = order_of(batch, command.tenant or "", str(command.payload["key"]))
    try:
        order.open_checkout(session_id=str(command.payload["session_id"]), url=str(command.payload["url"]),
                            at=effective_at(command))
    except CheckoutError as exc:
        raise CommandRejected("invalid_transition", str(exc)) from exc
    return order_view(order)


@handles("checkout.fail")
def fail_order(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> dict[str, Any]:
    """The gateway could not open a checkout (or the charge failed): the order fails, its promotion is freed."""
    order = order_of(batch, command.tenant or "", str(command.payload["key"]))
    at = effective_at(command)
    if order.status != PAID:
        order.fail(reason=str(command.payload.get("reason", "failed")), at=at)
        if order.quote.get("promotion"):
            promo = batch.get(Promotion.create_id(order.quote["promotion"]))
            if promo is not None:
                promo.release(order=order.id, at=at)
    return order_view(order)


@handles("identity.verify")
def verify_identity(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> dict[str, Any]:
    account_of(batch, command.tenant)
    reference = fields.string(command, "reference")
    method = fields.string(command, "method", default="manual")
    profile = profile_of(batch, command.tenant or "")
    profile.verify_identity(reference=reference, method=method, at=effective_at(command), by=command.issued_by)
    return {"identity_verified": True, "identity": profile.identity}


@handles("payment_customer.set")
def set_customer(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> None:
    account_of(batch, command.tenant)
    # A missing or empty customer is rejected, never stored as "None" (later charges would name that customer).
    gateway, customer = fields.text(command, "gateway", default="stripe"), fields.text(command, "customer")
    profile_of(batch, command.tenant or "").set_customer(gateway=gateway, customer=customer, at=effective_at(command))


@handles("alerts.configure")
def configure_alerts(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> dict[str, Any]:
    """Low-balance alerts: an email address and/or a webhook endpoint (signed with the account's secret)."""
    account_of(batch, command.tenant)
    payload = command.payload
    url = payload.get("webhook_url")
    if url is not None and not (isinstance(url, str) and url.startswith(("https://", "http://"))):
        raise CommandRejected("invalid_alerts", "webhook_url must be an http(s) URL")
    if url is not None:
        try:  # SSRF: no private, loopback or link-local target unless the deployment allows them
            check_url(url, private_allowed=Settings.from_env().outbound_private_targets_allowed)
        except OutboundUrlRefused as exc:
            raise CommandRejected("invalid_alerts", f"webhook_url {exc} (BILLING_OUTBOUND_PRIVATE_TARGETS_ALLOWED "
                                                    "allows private targets)") from exc
    for name in ("email", "webhook_secret"):
        if payload.get(name) is not None and not isinstance(payload[name], str):
            raise CommandRejected("invalid_alerts", f"{name} must be a string")
    enabled = payload.get("enabled", True)
    if not isinstance(enabled, bool):  # "false" would have been true
        raise CommandRejected("invalid_alerts", "enabled must be true or false")
    settings = {"email": payload.get("email"), "webhook_url": url, "webhook_secret": payload.get("webhook_secret"),
                "enabled": enabled}
    profile_of(batch, command.tenant or "").configure_alerts(settings=settings, at=effective_at(command), by=command.issued_by)
    return settings


@handles("auto_top_up.set")
def set_auto_top_up(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> dict[str, Any]:
    """The account's rule: below ``threshold``, top up to ``target`` or by one ``package``; cap per month."""
    account = account_of(batch, command.tenant)
    p = command.payload
    unit = declared_unit(batch, account, str(p["unit"]) if p.get("unit") else None)
    package = None
    if p.get("package"):
        package = next((x for x in catalog_document(batch).get("packages") or [] if x["code"] == p["package"]), None)
        if package is None:
            raise CommandRejected("unknown_package", f"no credit package {p['package']!r}")
        if package["unit"] != unit:  # it would top up another wallet than the one watched
            raise CommandRejected("invalid_auto_top_up", f"package {package['code']!r} gives {package['unit']}, "
                                                         f"the rule watches {unit}")
    if p.get("target") is not None and unit != account.currency:
        # A top-up to a target is charged at face value in the currency; a credit unit has no such price
        # (``topups._order_payload``): refused now rather than failing every time the rule fires.
        raise CommandRejected("invalid_auto_top_up", f"a {unit} rule needs a package: only {account.currency} "
                                                     f"can be topped up to a target")
    for field in ("threshold", "monthly_cap"):
        if p.get(field) is None:
            raise CommandRejected("invalid_auto_top_up", f"{field} is required")
    # Amounts in whole minor units of the unit (a target of 50.001 USD was taken, as a checkout quote refuses it).
    threshold, monthly_cap, target = (
        None if p.get(field) is None else minor_amount(batch, unit, field, p[field], "invalid_auto_top_up")
        for field in ("threshold", "monthly_cap", "target"))
    # The balance is topped up to the target by a charge, so the target is in what the currency is charged in: a
    # top-up can land on 50.000 KWD, never on 50.005 (it went to 50.010, above the target).
    unbillable = None if target is None else price_not_billable("target", parse_decimal(p["target"]), unit)
    if unbillable:
        raise CommandRejected("invalid_auto_top_up", unbillable)
    # A JSON integer only: 1.9 was truncated to 1 and true taken as 1 (the answer still said 1.9); its range is the
    # account's to check.
    try:
        cooldown = fields.whole(command, "cooldown_seconds", default=AUTO_TOP_UP_COOLDOWN_SECONDS_DEFAULT)
    except CommandRejected as exc:
        raise CommandRejected("invalid_auto_top_up", exc.detail) from exc
    try:
        account.set_auto_top_up(
            unit, threshold, target,
            package["code"] if package else None, cooldown,
            monthly_cap,
            package_amount=to_subunits(Decimal(package["credits"]) + Decimal(package.get("bonus_credits", "0")))
            if package else None)
    except (KeyError, ValueError) as exc:
        raise CommandRejected("invalid_auto_top_up", str(exc)) from exc
    return {"unit": unit, **{k: p.get(k) for k in ("threshold", "target", "package", "monthly_cap")},
            "cooldown_seconds": cooldown}


@handles("order.paid_off_session")
def paid_off_session(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> dict[str, Any]:
    """A saved payment method was charged for an order (auto-top-up): the same effect as a paid checkout."""
    order = order_of(batch, command.tenant or "", str(command.payload["key"]))
    return pay_order(app, batch, order, gateway=str(command.payload["gateway"]),
                     payment_id=str(command.payload["payment_id"]), amount=parse_decimal(command.payload["amount"]),
                     currency_code=str(command.payload["currency"]), at=effective_at(command), by=command.issued_by,
                     command_id=command.command_id)


def pay_order(app: LedgerApplication, batch: _Batch, order: Order, *, gateway: str, payment_id: str,
              amount: Decimal, currency_code: str, at: datetime, by: str, command_id: UUID) -> dict[str, Any]:
    """A verified payment for ``order``: paid, credited once, invoiced, in the caller's transaction."""
    if order.status == PAID:
        return {**order_view(order), "already_paid": True}
    try:
        order.pay(gateway=gateway, payment_id=payment_id, amount=amount, currency_code=currency_code, at=at)
    except CheckoutError as exc:
        raise CommandRejected("payment_mismatch", str(exc)) from exc
    account = account_of(batch, order.tenant)
    q = order.quote
    cause = {"gateway": gateway, "order_id": str(order.id), "payment_id": payment_id, "command_id": str(command_id)}
    tax = to_subunits(Decimal(q["tax"]))
    in_currency = q["unit"] == q["currency"]
    purchase = ids.grant_id(order.tenant, f"order/{order.id}/purchase")
    credit = to_subunits(Decimal(q["credits"]) + Decimal(q["bonus_credits"]))
    net = to_subunits(Decimal(q["total"])) - tax
    # Credit in the currency: only what was paid (net; the tax to tax payable) is funded from the gateway's
    # clearing; the part the customer did not pay for (a package's bonus, a discount) is a promotional grant.
    # A credit unit's purchase keeps its whole credit on one grant: its money is booked apart, in the currency,
    # for exactly what was paid, and recognised over all of that credit (``book_purchase_money``).
    paid = min(net, credit) if in_currency else credit
    account.grant_credit(
        grant_id=purchase, unit=q["unit"], amount=paid, priority=0, effective_at=at,
        expires_at=None, scope=None, source="purchase", cause={**cause, "tax": q["tax"], "total": q["total"]},
        granted_by=by, tax_amount=tax if in_currency else 0)
    repay_from_purchase(batch, account, purchase, at, cause)
    if credit > paid:
        account.grant_credit(
            grant_id=bonus_grant_id(order), unit=q["unit"], amount=credit - paid, priority=0, effective_at=at,
            expires_at=None, scope=None, source="promotion",
            cause={**cause, "bonus_of": str(purchase), "promotion": q["promotion"], "package": q["package"]},
            granted_by=by)
    if not in_currency and net + tax > 0:
        # Credits bought in a credit unit: the money paid (and its tax) is booked in the currency too.
        account.book_purchase_money(grant_id=purchase, currency=q["currency"], net=net, tax_amount=tax, at=at,
                                    cause={**cause, "total": q["total"], "tax": q["tax"],
                                           **({"user": by} if by else {})})  # who (session 13), as the grant
    if Decimal(q["promotion_credits"]) > 0:
        # In the promotion's own unit (orders placed before it was recorded: the purchase unit).
        account.grant_credit(
            grant_id=ids.grant_id(order.tenant, f"order/{order.id}/promotion"), unit=q.get("promotion_unit") or q["unit"],
            amount=to_subunits(Decimal(q["promotion_credits"])), priority=0, effective_at=at, expires_at=None,
            scope=None, source="promotion", cause={**cause, "promotion": q["promotion"]}, granted_by=by)
    invoice = _top_up_invoice(app, batch, order, at, by)
    invoice.mark_paid(at=at, payment=payment_id, by=by)
    order.attach_invoice(invoice.id)
    profile_of(batch, order.tenant).record_top_up(order=str(order.id), total=q["total"], at=at)
    return order_view(order)


def _top_up_tax_line(q: dict[str, Any], code: str) -> dict[str, Any]:
    """The tax line of a top-up's invoice, as a subscription invoice's ("USt 19 % of 45.00", with its ``rate``, which
    the invoice audit checks the tax against). An order placed before its quote recorded the rate (session 15) has
    only the rule's name: "USt on 45.00", without a rate, as it was."""
    if q.get("tax_rate") is None:
        return line("tax", f"{q['tax_rule'] or 'Tax'} on {q['net']}", Decimal(q["tax"]), code)
    return line("tax", f"{q['tax_rule'] or 'Tax'} {percent_text(q['tax_rate'])} % of {q['net']}", Decimal(q["tax"]),
                code, rate=q["tax_rate"])


def _top_up_invoice(app: LedgerApplication, batch: _Batch, order: Order, at: datetime, by: str) -> Invoice:
    q = order.quote
    code = q["currency"]
    what = f"Credit package {q['package']}" if q["package"] else "Account top-up"
    credits = f"{q['credits']} {q['unit']}" + (f" + {q['bonus_credits']} bonus" if Decimal(q["bonus_credits"]) else "")
    lines = [line("top_up", f"{what}: {credits}", Decimal(q["amount"]), code, quantity="1", unit_amount=q["amount"])]
    if Decimal(q["discount"]):
        lines.append(line("discount", f"Promotion {q['promotion']}", -Decimal(q["discount"]), code))
    if q["tax_note"]:
        lines.append(line("tax", q["tax_note"], Decimal(0), code, rate="0"))
    else:
        lines.append(_top_up_tax_line(q, code))
    if Decimal(q["promotion_credits"]):
        # The bonus is granted in the promotion's own unit (orders placed before it was recorded: the purchase's).
        bonus_unit = q.get("promotion_unit") or q["unit"]
        lines.append(line("adjustment", f"Promotion {q['promotion']}: {q['promotion_credits']} {bonus_unit} bonus",
                          Decimal(0), code))
    invoice = Invoice(tenant=order.tenant, key=f"orders/{order.id}", document_type=INVOICE, currency=code, lines=lines,
                      period_start=None, period_end=None, subscription_id=None, related_invoice=None, at=at, by=by)
    batch.add(invoice)
    _finalize(app, batch, invoice, at, by)
    return invoice


def known_order(batch: _Batch, tenant: str | None, order_ref: str | None) -> Order | None:
    """The ``Order`` a payment's order id names (its UUID), if it is one of this tenant's orders."""
    if not tenant or not order_ref:
        return None
    try:
        found = batch.get(UUID(order_ref))
    except ValueError:
        return None
    return found if isinstance(found, Order) and found.tenant == tenant else None


def bonus_grant_id(order: Order) -> UUID:
    """The promotional grant of the credit an order gives beyond what was paid (package bonus, discount)."""
    return ids.grant_id(order.tenant, f"order/{order.id}/bonus")


def top_up_invoice_id(order: Order) -> UUID:
    return invoice_id(order.tenant, f"orders/{order.id}")

# Handler modules that build on this one register themselves on import.
from billing_ledger import refund_request_commands  # noqa: F401

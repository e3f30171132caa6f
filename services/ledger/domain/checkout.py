"""Top-up orders and promotion codes: what a customer buys, what it costs, and what credit it grants.

``quote`` is pure and is what the checkout summary shows before payment (amount, promotion, tax, total,
credits); the ``Order`` records exactly that quote, so the credit granted on payment is the credit the
customer was shown. Promotion codes are checked live (validity window, total and per-account limits)
when the order is placed, so an expired or exhausted code is refused before any payment is taken; a
redemption is released if the order fails or expires.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from billing_events.catalog import package_priced_above_credit, price_not_billable
from billing_events.money import RATING_CONTEXT, currency, round_minor
from billing_ledger.domain.tax import TaxProfileData, compute_tax
from eventsourcing.domain import Aggregate, event

PENDING, OPEN, PAID, FAILED, EXPIRED, REFUNDED = "pending", "open", "paid", "failed", "expired", "refunded"


def order_id(tenant: str, key: str) -> UUID:
    return uuid5(NAMESPACE_URL, f"/orders/{tenant}/{key}")


def promotion_id(code: str) -> UUID:
    return uuid5(NAMESPACE_URL, f"/promotions/{code}")


class CheckoutError(ValueError):
    pass


class PromotionRefused(CheckoutError):
    pass


@dataclass(frozen=True)
class Quote:
    currency: str
    unit: str  # what the credit is granted in (a credit type, or the currency for plain top-ups)
    amount: str  # list price (net, before discount)
    discount: str
    net: str
    tax: str
    total: str  # what the customer pays
    credits: str
    bonus_credits: str
    promotion_credits: str
    promotion_unit: str  # what the promotion's bonus is granted in (its declared unit, else ``unit``)
    tax_rule: str | None
    tax_rate: str | None  # the rule's rate (a fraction, "0.19"; "0" for the reverse charge), None without a rule
    tax_note: str | None
    promotion: str | None
    package: str | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _money(value: Decimal, code: str) -> Decimal:
    """Rounded once to what ``code`` is charged in (cents; ten fils of the three-decimal currencies), so the
    quote's net, tax and total are what the gateway charges and what the ledger books (docs/money.md)."""
    return round_minor(value, currency(code))


def quote(*, package: dict[str, Any] | None, amount: Decimal | None, account_currency: str,
          promotion: dict[str, Any] | None, tax_profile: dict[str, Any] | None, tax_rules: list[dict[str, Any]],
          seller_country: str | None, credit_units: Iterable[str] = ()) -> Quote:
    """The checkout summary: a credit package, or a free amount in the account's currency.

    A promotion's declared ``unit`` is honoured: a ``bonus_credit`` is granted in it (the order's currency or a
    catalogue credit unit, ``credit_units``; anything else is refused), and a ``discount_amount`` in another
    currency than the order's is refused. A promotion must leave something to pay.
    """
    if package is not None:
        # A catalogue published before these were refused: the money above the credit has no account; a price
        # finer than the currency is charged in (11.906 KWD) cannot be charged as quoted.
        refused = package_priced_above_credit(package) or price_not_billable(
            f"package {package['code']!r}: price", package["price"], package["currency"])
        if refused:
            raise CheckoutError(refused)
        code = package["currency"]
        price = Decimal(package["price"])
        unit = package["unit"]
        credits = Decimal(package["credits"])
        bonus = Decimal(package.get("bonus_credits", "0"))
    elif amount is not None:
        if amount <= 0:
            raise CheckoutError("a top-up amount must be positive")
        code = account_currency
        price = _money(amount, code)
        if price != amount:  # 50.001 USD; 11.906 KWD (a card payment's last digit of thousandths is 0)
            raise CheckoutError(price_not_billable("a top-up amount of", amount, code) or
                                f"{amount} has more decimals than {code} allows")
        unit, credits, bonus = code, price, Decimal(0)
    else:
        raise CheckoutError("choose a package or an amount")
    discount = Decimal(0)
    promo_credits = Decimal(0)
    promo_unit = unit
    if promotion is not None:
        kind, value = promotion["kind"], Decimal(promotion["value"])
        declared = promotion.get("unit")
        if kind == "discount_percent":
            discount = _money(RATING_CONTEXT.multiply(price, value), code)
        elif kind == "discount_amount":
            if declared and declared != code:
                raise PromotionRefused(f"promotion {promotion['code']} takes {value} {declared} off; this order "
                                       f"is in {code}")
            discount = min(price, _money(value, code))
        elif kind == "bonus_credit":
            promo_unit = declared or unit
            if promo_unit not in (unit, code) and promo_unit not in set(credit_units):
                raise PromotionRefused(f"promotion {promotion['code']} grants {promo_unit}, which is neither "
                                       f"{code} nor a credit unit of the catalogue")
            promo_credits = value
    net = price - discount
    if promotion is not None and net <= 0:  # the paid part of the credit would be nothing (see ``pay_order``)
        raise PromotionRefused(f"promotion {promotion['code']} leaves nothing to pay; a free top-up is a "
                               f"promotional grant, not an order")
    profile = None
    if tax_profile:
        profile = TaxProfileData(country=tax_profile["country"], subdivision=tax_profile.get("subdivision"),
                                 business_name=tax_profile.get("business_name"), tax_id=tax_profile.get("tax_id"),
                                 tax_id_valid=bool(tax_profile.get("tax_id_valid")))
    taxed = compute_tax(net, code, profile, tax_rules, seller_country)
    return Quote(currency=code, unit=unit, amount=str(price), discount=str(_money(discount, code)),
                 net=str(_money(taxed.net, code)), tax=str(_money(taxed.tax, code)),
                 total=str(_money(taxed.total, code)), credits=str(credits), bonus_credits=str(bonus),
                 promotion_credits=str(promo_credits), promotion_unit=promo_unit, tax_rule=taxed.rule,
                 tax_rate=str(taxed.rate) if taxed.rule is not None else None, tax_note=taxed.note,
                 promotion=promotion["code"] if promotion else None,
                 package=package["code"] if package else None)


def check_promotion(definition: dict[str, Any], *, package: str | None, at: datetime) -> None:
    """Validity window and package scope (limits are the Promotion aggregate's)."""
    if definition.get("valid_from") and at < datetime.fromisoformat(definition["valid_from"]):
        raise PromotionRefused(f"promotion {definition['code']} is not valid yet")
    if definition.get("valid_until") and at >= datetime.fromisoformat(definition["valid_until"]):
        raise PromotionRefused(f"promotion {definition['code']} has expired")
    if definition.get("packages") is not None and package not in definition["packages"]:
        raise PromotionRefused(f"promotion {definition['code']} does not apply to this purchase")


class Promotion(Aggregate):
    """Redemptions of one code: never more than its total or per-account limit."""

    @staticmethod
    def create_id(code: str) -> UUID:
        return promotion_id(code)

    @event("Created")
    def __init__(self, code: str) -> None:
        self.code = code
        self.redemptions: dict[str, str] = {}  # order id -> tenant (live redemptions)

    def redeem(self, *, tenant: str, order: UUID, definition: dict[str, Any], at: datetime) -> None:
        if str(order) in self.redemptions:
            return
        check_promotion(definition, package=definition.get("_package"), at=at)
        limit = definition.get("max_redemptions")
        if limit is not None and len(self.redemptions) >= int(limit):
            raise PromotionRefused(f"promotion {self.code} has been fully redeemed")
        per_account = definition.get("max_per_account")
        if per_account is not None and sum(t == tenant for t in self.redemptions.values()) >= int(per_account):
            raise PromotionRefused(f"promotion {self.code} was already used by this account")
        self._redeemed(tenant=tenant, order=str(order), at=at)

    @event("Redeemed")
    def _redeemed(self, tenant: str, order: str, at: datetime) -> None:
        self.redemptions[order] = tenant

    def release(self, *, order: UUID, at: datetime) -> None:
        if str(order) in self.redemptions:
            self._released(order=str(order), at=at)

    @event("Released")
    def _released(self, order: str, at: datetime) -> None:
        self.redemptions.pop(order, None)


class Order(Aggregate):
    """A top-up order: placed with its quote, paid through a hosted checkout, then granted once."""

    @staticmethod
    def create_id(tenant: str, key: str) -> UUID:
        return order_id(tenant, key)

    @event("Placed")
    def __init__(self, tenant: str, key: str, quote: dict[str, Any], gateway: str, at: datetime, by: str) -> None:
        self.tenant = tenant
        self.key = key
        self.quote = quote
        self.gateway = gateway
        self.status = PENDING
        self.checkout: dict[str, Any] | None = None
        self.payment: dict[str, Any] | None = None
        self.invoice_id: str | None = None

    def open_checkout(self, *, session_id: str, url: str, at: datetime) -> None:
        if self.status not in (PENDING, OPEN):
            raise CheckoutError(f"order is {self.status}")
        self._checkout_opened(session_id=session_id, url=url, at=at)

    @event("CheckoutOpened")
    def _checkout_opened(self, session_id: str, url: str, at: datetime) -> None:
        self.status = OPEN
        self.checkout = {"session_id": session_id, "url": url}

    def pay(self, *, gateway: str, payment_id: str, amount: Decimal, currency_code: str, at: datetime) -> None:
        """A verified payment: must match the quoted total and currency exactly."""
        if self.status == PAID:
            raise CheckoutError("order already paid")
        if currency_code != self.quote["currency"] or amount != Decimal(self.quote["total"]):
            raise CheckoutError(f"payment {amount} {currency_code} does not match the order total "
                                f"{self.quote['total']} {self.quote['currency']}")
        self._paid(gateway=gateway, payment_id=payment_id, amount=str(amount), at=at)

    @event("Paid")
    def _paid(self, gateway: str, payment_id: str, amount: str, at: datetime) -> None:
        self.status = PAID
        self.payment = {"gateway": gateway, "payment_id": payment_id, "amount": amount}

    def fail(self, *, reason: str, at: datetime) -> None:
        if self.status in (PENDING, OPEN):
            self._failed(reason=reason, at=at)

    @event("Failed")
    def _failed(self, reason: str, at: datetime) -> None:
        self.status = FAILED

    def attach_invoice(self, invoice: UUID) -> None:
        self._invoiced(invoice=str(invoice))

    @event("Invoiced")
    def _invoiced(self, invoice: str) -> None:
        self.invoice_id = invoice

    def mark_refunded(self, *, refund_id: str, amount: str, at: datetime, by: str) -> None:
        if self.status != PAID:
            raise CheckoutError(f"order is {self.status}; only a paid order can be refunded")
        self._refunded(refund_id=refund_id, amount=amount, at=at, by=by)

    @event("Refunded")
    def _refunded(self, refund_id: str, amount: str, at: datetime, by: str) -> None:
        self.status = REFUNDED

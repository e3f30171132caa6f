"""Top-up quotes, promotion limits, and orders that only accept the exact quoted payment."""

from datetime import UTC, datetime
from decimal import Decimal
from uuid import uuid4

import pytest
from billing_ledger.domain.checkout import CheckoutError, Order, Promotion, PromotionRefused, quote

PACKAGE = {"code": "credits-10k", "unit": "CREDIT", "credits": "10000", "bonus_credits": "1000", "price": "95.00",
           "currency": "USD"}
RULES = [{"region": "DE", "rate": "0.19", "name": "DE VAT"}]
NOW = datetime(2026, 11, 21, tzinfo=UTC)


def test_a_package_quote_shows_amount_promotion_tax_and_total() -> None:
    q = quote(package=PACKAGE, amount=None, account_currency="USD",
              promotion={"code": "TENOFF", "kind": "discount_percent", "value": "0.10"},
              tax_profile={"country": "DE"}, tax_rules=RULES, seller_country="DE")
    assert (q.amount, q.discount, q.net, q.tax, q.total) == ("95.00", "9.50", "85.50", "16.25", "101.75")
    assert (q.credits, q.bonus_credits, q.unit) == ("10000", "1000", "CREDIT")


def test_a_free_amount_top_up_with_bonus_credit() -> None:
    q = quote(package=None, amount=Decimal(50), account_currency="EUR",
              promotion={"code": "BONUS5", "kind": "bonus_credit", "value": "5"}, tax_profile=None, tax_rules=[],
              seller_country=None)
    assert (q.total, q.credits, q.promotion_credits, q.unit) == ("50.00", "50.00", "5", "EUR")
    assert (q.discount, q.tax) == ("0.00", "0.00")  # amounts of the currency, shown as such (not "0")
    with pytest.raises(CheckoutError):
        quote(package=None, amount=Decimal("0.001"), account_currency="EUR", promotion=None, tax_profile=None,
              tax_rules=[], seller_country=None)


def test_a_package_of_a_catalogue_published_before_that_costs_more_than_its_credit_is_not_quoted() -> None:
    """Catalogues stored before publishing refused it are read as they are: the checkout refuses to sell it."""
    premium = {"code": "usd-fee", "unit": "USD", "credits": "100", "bonus_credits": "0", "price": "110.00",
               "currency": "USD"}
    with pytest.raises(CheckoutError, match="package 'usd-fee' costs 110.00 USD but grants 100 USD"):
        quote(package=premium, amount=None, account_currency="USD", promotion=None, tax_profile={"country": "DE"},
              tax_rules=RULES, seller_country="DE")
    # A credit unit has no face value in the currency: its price is not compared.
    assert quote(package={**PACKAGE, "price": "20000.00"}, amount=None, account_currency="USD", promotion=None,
                 tax_profile=None, tax_rules=[], seller_country=None).total == "20000.00"


KWD_PACKAGE = {"code": "kwd-12", "unit": "KWD", "credits": "12.340", "bonus_credits": "0", "price": "12.340",
               "currency": "KWD"}
OMAN = [{"region": "OM", "rate": "0.05", "name": "OM VAT"}]


def test_a_three_decimal_currency_quote_is_charged_in_hundredths_and_adds_up() -> None:
    """5 % of 12.340 KWD is 0.617: the quote's total was 12.957 KWD, which Stripe (and Razorpay) cannot charge (the
    last digit of thousandths must be 0). The tax is rounded to hundredths instead, so the total is chargeable and
    net + tax is exactly the total the gateway charges and the ledger books."""
    q = quote(package=KWD_PACKAGE, amount=None, account_currency="KWD", promotion=None,
              tax_profile={"country": "OM"}, tax_rules=OMAN, seller_country="DE")
    assert (q.amount, q.net, q.tax, q.total) == ("12.340", "12.340", "0.620", "12.960")
    assert Decimal(q.net) + Decimal(q.tax) == Decimal(q.total)
    # A discount is rounded the same way: 15 % of 12.340 is 1.851, taken off as 1.850.
    off = quote(package=KWD_PACKAGE, amount=None, account_currency="KWD",
                promotion={"code": "OFF15", "kind": "discount_percent", "value": "0.15"}, tax_profile=None,
                tax_rules=[], seller_country=None)
    assert (off.discount, off.net, off.total) == ("1.850", "10.490", "10.490")
    # A free amount is taken in what KWD is charged in; 11.906 is refused, with why.
    assert quote(package=None, amount=Decimal("11.91"), account_currency="KWD", promotion=None, tax_profile=None,
                 tax_rules=[], seller_country=None).total == "11.910"
    with pytest.raises(CheckoutError, match=r"11\.906 KWD is finer than KWD is billed and charged in \(0\.010: card "
                                            r"payments in three-decimal currencies take a last digit of 0\); use "
                                            r"11\.900 or 11\.910"):
        quote(package=None, amount=Decimal("11.906"), account_currency="KWD", promotion=None, tax_profile=None,
              tax_rules=[], seller_country=None)


def test_a_package_of_a_catalogue_published_before_that_is_priced_finer_than_charged_is_not_quoted() -> None:
    with pytest.raises(CheckoutError, match="package 'kwd-12': price 12.345 KWD is finer than KWD is billed"):
        quote(package={**KWD_PACKAGE, "price": "12.345", "credits": "13"}, amount=None, account_currency="KWD",
              promotion=None, tax_profile=None, tax_rules=[], seller_country=None)


def test_promotions_are_refused_when_expired_or_exhausted() -> None:
    promo = Promotion(code="WELCOME")
    definition = {"code": "WELCOME", "kind": "bonus_credit", "value": "5", "max_redemptions": 2,
                  "max_per_account": 1, "valid_until": "2026-12-01T00:00:00+00:00"}
    promo.redeem(tenant="a", order=uuid4(), definition=definition, at=NOW)
    with pytest.raises(PromotionRefused, match="already used"):
        promo.redeem(tenant="a", order=uuid4(), definition=definition, at=NOW)
    promo.redeem(tenant="b", order=uuid4(), definition=definition, at=NOW)
    with pytest.raises(PromotionRefused, match="fully redeemed"):
        promo.redeem(tenant="c", order=uuid4(), definition=definition, at=NOW)
    with pytest.raises(PromotionRefused, match="expired"):
        Promotion(code="WELCOME").redeem(tenant="d", order=uuid4(), definition=definition,
                                         at=datetime(2026, 12, 2, tzinfo=UTC))


def test_an_order_accepts_only_the_exact_quoted_payment() -> None:
    q = quote(package=PACKAGE, amount=None, account_currency="USD", promotion=None, tax_profile=None, tax_rules=[],
              seller_country=None)
    order = Order(tenant="acme", key="o1", quote=q.as_dict(), gateway="stripe", at=NOW, by="user:ann")
    with pytest.raises(CheckoutError, match="does not match"):
        order.pay(gateway="stripe", payment_id="pi_1", amount=Decimal("9.50"), currency_code="USD", at=NOW)
    order.pay(gateway="stripe", payment_id="pi_1", amount=Decimal("95.00"), currency_code="USD", at=NOW)
    assert order.status == "paid"
    with pytest.raises(CheckoutError, match="already paid"):
        order.pay(gateway="stripe", payment_id="pi_1", amount=Decimal("95.00"), currency_code="USD", at=NOW)

"""The Stripe adapter's amount encoding, against the fake Stripe API: minor units per Stripe's currency rules
(three-decimal currencies in thousandths ending in 0, ISK with two decimals), and an amount Stripe cannot take
refused before anything is sent (never rounded: what Stripe charges is what the ledger books)."""

from __future__ import annotations

from decimal import Decimal

import pytest
from billing_ledger.gateways import AmountNotChargeable

from tests.unit.payments.support import FakeStripe, stripe_gateway

URLS = {"success_url": "https://app.test/ok", "cancel_url": "https://app.test/cancel"}


def sent(api: FakeStripe, path: str) -> list[dict[str, str]]:
    return [form for _method, called, _key, form in api.calls if called == path]


@pytest.mark.asyncio
@pytest.mark.parametrize(("total", "code", "minor"), [
    ("11.910", "KWD", "11910"), ("11.91", "BHD", "11910"), ("0.050", "OMR", "50"), ("7.000", "JOD", "7000"),
    ("12.960", "TND", "12960"), ("101.75", "USD", "10175"), ("1000", "JPY", "1000"), ("500", "ISK", "50000"),
])
async def test_checkout_and_off_session_amounts_are_minor_units_stripe_takes(total: str, code: str,
                                                                             minor: str) -> None:
    api = FakeStripe()
    gateway = stripe_gateway(api)
    session = await gateway.open_checkout(order_id="o-1", tenant="acme", description="Account top-up",
                                          total=Decimal(total), currency_code=code, **URLS)
    assert session.session_id.startswith("cs_test_")
    charge = await gateway.charge_saved_method(customer="cus_1", method_id="pm_1", total=Decimal(total),
                                               currency_code=code, idempotency_key="k1", tenant="acme", order_id="o-2")
    assert charge.ok
    [checkout] = sent(api, "/v1/checkout/sessions")
    [intent] = sent(api, "/v1/payment_intents")
    assert checkout["line_items[0][price_data][unit_amount]"] == minor
    assert checkout["line_items[0][price_data][currency]"] == code.lower()
    assert (intent["amount"], intent["currency"]) == (minor, code.lower())


@pytest.mark.asyncio
@pytest.mark.parametrize("code", ["KWD", "BHD", "JOD", "OMR", "TND"])
async def test_a_thousandth_stripe_cannot_charge_is_refused_before_anything_is_sent(code: str) -> None:
    """11.906 KWD was sent as 11906, which Stripe refuses: the checkout failed at the gateway, and an off-session
    charge (auto-top-up, dunning) was taken for a gateway outage and retried for ever."""
    api = FakeStripe()
    gateway = stripe_gateway(api)
    assert gateway.refusal(Decimal("11.906"), code) == (
        f"Stripe charges {code} in thousandths whose last digit is 0: 11.906 {code} (11906) cannot be charged")
    with pytest.raises(AmountNotChargeable, match="last digit is 0"):
        await gateway.open_checkout(order_id="o-1", tenant="acme", description="Account top-up",
                                    total=Decimal("11.906"), currency_code=code, **URLS)
    with pytest.raises(AmountNotChargeable, match="last digit is 0"):
        await gateway.refund(payment_reference="pi_1", total=Decimal("11.906"), currency_code=code,
                             idempotency_key="r1", tenant="acme", order_id="o-1")
    charge = await gateway.charge_saved_method(customer="cus_1", method_id="pm_1", total=Decimal("11.906"),
                                               currency_code=code, idempotency_key="k1", tenant="acme", order_id="o-2")
    assert (charge.ok, charge.pending, charge.reference) == (False, False, None)  # a decline of this method
    assert "11.906" in (charge.error or "")
    assert api.calls == []


@pytest.mark.asyncio
async def test_an_amount_finer_than_the_currency_is_refused_at_stripe() -> None:
    api = FakeStripe()
    gateway = stripe_gateway(api)
    assert gateway.refusal(Decimal("10.001"), "USD") is not None and gateway.refusal(Decimal("1.5"), "JPY") is not None
    with pytest.raises(AmountNotChargeable):
        await gateway.open_checkout(order_id="o-1", tenant="acme", description="Account top-up",
                                    total=Decimal("10.001"), currency_code="USD", **URLS)
    assert api.calls == []

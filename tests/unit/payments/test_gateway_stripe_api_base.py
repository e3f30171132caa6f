"""``BILLING_STRIPE_API_BASE``: the Stripe adapters (the ledger's outbound gateway, ingest's webhook re-fetch) call the
address it names (stripe-mock, a local fake) instead of Stripe's; a malformed one stops the service at start."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest
from billing_ingest.webhooks import stripe as ingest_stripe
from billing_ledger.gateways import stripe as ledger_stripe
from billing_runtime.settings import Settings

from tests.fake_http_api import Request, serve


def _intent(request: Request) -> tuple[int, object]:
    return 200, {"id": "pi_local", "object": "payment_intent", "status": "succeeded", "amount": 2800,
                 "currency": "usd", "metadata": {}}


def test_the_ledger_charges_off_session_at_the_configured_stripe_address() -> None:
    with serve(_intent) as fake:
        gateway = ledger_stripe.build(Settings(stripe_api_key="sk_test_1", stripe_api_base=fake.base + "/"))
        assert gateway is not None
        charge = asyncio.run(gateway.charge_saved_method(
            customer=None, method_id="pm_1", total=Decimal("28.00"), currency_code="USD", idempotency_key="k1",
            tenant="acme", order_id="o1"))
    assert (charge.ok, charge.reference) == (True, "pi_local")
    [request] = fake.requests
    assert (request.method, request.path, request.form["amount"], request.form["off_session"]) == (
        "POST", "/v1/payment_intents", ["2800"], ["true"])


@pytest.mark.parametrize("base", ["localhost:12111", "ftp://stripe.test", "http://", "http://mock.test/?x=1"])
def test_a_malformed_stripe_api_base_is_refused_with_its_name(base: str) -> None:
    settings = Settings(stripe_api_key="sk_test_1", stripe_webhook_secret="whsec_1", stripe_api_base=base)
    for build in (ledger_stripe.build, ingest_stripe.build):
        with pytest.raises(ValueError, match="BILLING_STRIPE_API_BASE must be an http"):
            build(settings)


def test_unset_it_is_the_stripe_librarys_own_address() -> None:
    assert Settings(stripe_api_key="sk_test_1").stripe_api_address() is None

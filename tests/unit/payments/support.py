"""Shared fixtures of the payment tests: a fake Stripe API (a ``stripe.HTTPClient`` subclass, offline), a
ledger on SQLite with its checkout routes, an SMTP inbox (aiosmtpd), and set-up commands."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
import stripe
from billing_events import ids
from billing_events.messages import LedgerCommand
from billing_ledger.application import CommandResult, LedgerApplication, persistence_env
from billing_ledger.checkout_http import build_router
from billing_ledger.gateways.stripe import StripeGateway
from billing_runtime.auth import mint_token
from billing_runtime.http import create_app
from billing_runtime.settings import Settings
from fastapi.testclient import TestClient

TENANT = "acme"
CATALOG = {
    "credit_units": {"CREDIT": {"scale": 0}},
    "packages": [{"code": "credits-10k", "name": "10k credits", "unit": "CREDIT", "credits": "10000",
                  "bonus_credits": "1000", "price": "95.00", "currency": "USD"},
                 {"code": "usd-100", "name": "100 USD of credit", "unit": "USD", "credits": "100",
                  "bonus_credits": "20", "price": "100.00", "currency": "USD"}],
    "tax_rules": [{"region": "DE", "rate": "0.19", "name": "DE VAT"}],
    "promotions": [
        {"code": "TENOFF", "kind": "discount_percent", "value": "0.10", "max_per_account": 1},
        {"code": "BONUS500", "kind": "bonus_credit", "value": "500", "unit": "CREDIT"},
        {"code": "OLD", "kind": "bonus_credit", "value": "5", "valid_until": "2020-01-01T00:00:00+00:00"},
        {"code": "ONCE", "kind": "discount_amount", "value": "5", "max_redemptions": 1, "max_per_account": 1},
        {"code": "EUROFF", "kind": "discount_amount", "value": "5", "unit": "EUR"},
        {"code": "EUROGIFT", "kind": "bonus_credit", "value": "5", "unit": "EUR"},
        {"code": "ALLOFF", "kind": "discount_percent", "value": "1"},
    ],
    "seller": {"name": "billing", "country": "DE"},
}


# Stripe's three-decimal currencies (lower case, as its API writes them).
THREE_DECIMAL = frozenset({"bhd", "jod", "kwd", "omr", "tnd"})


def _form(post_data: Any) -> dict[str, str]:
    if not post_data:
        return {}
    text = post_data.decode() if isinstance(post_data, bytes) else str(post_data)
    return dict(parse_qsl(text))


class FakeStripe(stripe.HTTPClient):
    """Answers the SDK offline: creates and serves checkout sessions, payment intents and refunds; refuses (400) an
    amount in a three-decimal currency whose last digit is not 0, as Stripe does.

    ``card`` saves a card PaymentMethod (brand, last4, expiry) that ``GET /v1/payment_methods/{id}`` answers and
    ``POST /v1/payment_methods/{id}`` updates (its ``metadata``, merged; only once attached to a customer, as Stripe);
    ``customer`` a Customer that ``GET /v1/customers/{id}`` answers and ``POST`` updates (its ``metadata``, merged).
    ``declined`` payment methods are refused (402 card_declined); ``processing`` ones answer a payment intent
    still ``processing`` (a bank debit: the money may arrive later); every call is recorded with its
    idempotency key, and a repeated key answers the first answer (as Stripe does)."""

    name = "fake-stripe"

    def __init__(self) -> None:
        super().__init__()
        self.objects: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str, str | None, dict[str, str]]] = []
        self.declined: set[str] = set()
        self.processing: set[str] = set()
        self._by_key: dict[str, tuple[bytes, int]] = {}

    def _answer(self, method: str, url: str, headers: Any, post_data: Any) -> tuple[bytes, int, dict[str, str]]:
        parts = urlsplit(url)
        key = dict(headers or {}).get("Idempotency-Key")
        form = _form(post_data)
        self.calls.append((method, parts.path, key, form))
        if method == "post" and key and key in self._by_key:
            body, status = self._by_key[key]
            return body, status, {}
        body, status = self._handle(method, parts.path, parts.query, form)
        if method == "post" and key:
            self._by_key[key] = (body, status)
        return body, status, {}

    def _handle(self, method: str, path: str, query: str, form: dict[str, str]) -> tuple[bytes, int]:
        metadata = {k[len("metadata["):-1]: v for k, v in form.items() if k.startswith("metadata[")}
        n = len(self.objects) + 1
        amount = form.get("amount") or form.get("line_items[0][price_data][unit_amount]")
        code = form.get("currency") or form.get("line_items[0][price_data][currency]")
        if method == "post" and amount and code in THREE_DECIMAL and int(amount) % 10:
            # As Stripe: three-decimal currencies are taken in thousandths whose last digit is 0.
            error = {"type": "invalid_request_error", "param": "amount",
                     "message": f"Invalid amount: {code.upper()} amounts must end in 0 (round to the nearest ten)."}
            return json.dumps({"error": error}).encode(), 400
        if method == "post" and path == "/v1/checkout/sessions":
            sid = f"cs_test_{n}"
            obj = {"id": sid, "object": "checkout.session", "status": "open", "payment_status": "unpaid",
                   "url": f"https://checkout.stripe.test/c/pay/{sid}", "mode": form.get("mode"),
                   "amount_total": int(form["line_items[0][price_data][unit_amount]"]),
                   "currency": form["line_items[0][price_data][currency]"], "payment_intent": None,
                   "metadata": metadata}
            self.objects[f"/v1/checkout/sessions/{sid}"] = obj
            return json.dumps(obj).encode(), 200
        if method == "post" and path == "/v1/payment_intents":
            pid = f"pi_test_{n}"
            if form.get("payment_method") in self.declined:
                error = {"type": "card_error", "code": "card_declined", "message": "Your card was declined.",
                         "payment_intent": {"id": pid, "status": "requires_payment_method"}}
                return json.dumps({"error": error}).encode(), 402
            status = "processing" if form.get("payment_method") in self.processing else "succeeded"
            obj = {"id": pid, "object": "payment_intent", "status": status, "amount": int(form["amount"]),
                   "amount_received": int(form["amount"]), "currency": form["currency"],
                   "customer": form.get("customer"), "payment_method": form.get("payment_method"),
                   "metadata": metadata}
            self.objects[f"/v1/payment_intents/{pid}"] = obj
            return json.dumps(obj).encode(), 200
        if method == "post" and path == "/v1/refunds":
            rid = f"re_test_{n}"
            obj = {"id": rid, "object": "refund", "status": "succeeded", "amount": int(form["amount"]),
                   "currency": "usd", "payment_intent": form["payment_intent"], "metadata": metadata}
            self.objects[f"/v1/refunds/{rid}"] = obj
            return json.dumps(obj).encode(), 200
        obj = self.objects.get(path)
        if obj is None:
            return json.dumps({"error": {"type": "invalid_request_error", "message": f"No such {path}"}}).encode(), 404
        if method == "post" and path.startswith("/v1/customers/"):
            if obj.get("deleted"):  # as Stripe: a deleted customer is no customer to update
                return json.dumps({"error": {"type": "invalid_request_error",
                                             "message": f"No such customer: '{obj['id']}'"}}).encode(), 404
            obj["metadata"] = {**obj.get("metadata", {}), **metadata}
        if method == "post" and path.startswith("/v1/payment_methods/"):
            if not obj.get("customer"):  # as Stripe: "A PaymentMethod must be attached a customer to be updated."
                error = {"type": "invalid_request_error",
                         "message": "You must save this PaymentMethod to a customer before you can update it."}
                return json.dumps({"error": error}).encode(), 400
            obj["metadata"] = {**obj.get("metadata", {}), **metadata}
        return json.dumps(obj).encode(), 200

    def card(self, method_id: str, *, brand: str = "visa", last4: str = "4242", exp_month: int = 12,
             exp_year: int = 2030, customer: str | None = None, metadata: dict[str, str] | None = None) -> None:
        """A saved card PaymentMethod, as Stripe answers ``GET /v1/payment_methods/{id}`` (never the number); its
        ``customer`` exists (a method is attached to an existing customer only)."""
        if customer and f"/v1/customers/{customer}" not in self.objects:
            self.customer(customer)
        self.objects[f"/v1/payment_methods/{method_id}"] = {
            "id": method_id, "object": "payment_method", "type": "card", "customer": customer,
            "metadata": dict(metadata or {}),
            "card": {"brand": brand, "last4": last4, "exp_month": exp_month, "exp_year": exp_year,
                     "funding": "credit", "country": "US"}}

    def customer(self, customer_id: str, *, metadata: dict[str, str] | None = None) -> None:
        """A Customer, as Stripe answers ``GET /v1/customers/{id}``; ``POST`` updates its ``metadata`` (merged)."""
        self.objects[f"/v1/customers/{customer_id}"] = {"id": customer_id, "object": "customer",
                                                        "metadata": dict(metadata or {})}

    def delete_customer(self, customer_id: str) -> None:
        """Deleted in Stripe's dashboard: the API answers only that (no metadata), and its methods are detached."""
        self.objects[f"/v1/customers/{customer_id}"] = {"id": customer_id, "object": "customer", "deleted": True}
        for obj in self.objects.values():
            if obj.get("object") == "payment_method" and obj.get("customer") == customer_id:
                obj["customer"] = None

    def complete(self, session_id: str) -> str:
        """The customer paid on the hosted page (3-D Secure included): the session is complete and paid."""
        session = self.objects[f"/v1/checkout/sessions/{session_id}"]
        intent = f"pi_for_{session_id}"
        session.update(status="complete", payment_status="paid", payment_intent=intent)
        return intent

    def request(self, method: str, url: str, headers: Any, post_data: Any = None, *,
                _usage: Any = None) -> tuple[str, int, dict[str, str]]:
        body, status, out = self._answer(method, url, headers, post_data)
        return body.decode(), status, out

    async def request_async(self, method: str, url: str, headers: Any, post_data: Any = None,
                            *, _usage: Any = None) -> tuple[bytes, int, dict[str, str]]:
        return self._answer(method, url, headers, post_data)

    def close(self) -> None:
        return None

    async def close_async(self) -> None:
        return None

    async def sleep_async(self, secs: float) -> None:
        return None


def stripe_gateway(api: FakeStripe) -> StripeGateway:
    return StripeGateway(stripe.StripeClient("sk_test_123", http_client=api, max_network_retries=0))


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[LedgerApplication]:
    application = LedgerApplication(persistence_env(None, str(tmp_path / "ledger")))
    setup(application)
    yield application
    application.close()


def command(kind: str, tenant: str | None, payload: dict[str, Any], key: str = "",
            at: datetime | None = None) -> LedgerCommand:
    return LedgerCommand(command_id=ids.command_id(kind, tenant or "-", key or json.dumps(payload, sort_keys=True)),
                         kind=kind, tenant=tenant, issued_at=at or datetime.now(UTC), issued_by="test",
                         payload=payload)


def run(app: LedgerApplication, kind: str, tenant: str | None, key: str = "", **payload: Any) -> CommandResult:
    [result] = app.apply_commands([command(kind, tenant, payload, key)])
    return result


def setup(app: LedgerApplication, *, tax_profile: dict[str, Any] | None = None) -> None:
    assert run(app, "catalog.publish", None, document=CATALOG, digest="pay1").outcome == "applied"
    assert run(app, "account.open", TENANT, currency="USD").outcome == "applied"
    profile = tax_profile or {"country": "DE", "business_name": "Acme GmbH"}
    result = run(app, "tax_profile.set", TENANT, **profile)
    assert result.outcome == "applied", result


SETTINGS = Settings()


def headers(role: str = "admin", tenant: str | None = TENANT) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(SETTINGS, role=role, tenant=tenant)}"}


def client(app: LedgerApplication, gateways: dict[str, Any], settings: Settings = SETTINGS) -> TestClient:
    api = create_app("ledger-payments-test", settings)
    api.include_router(build_router(app, settings, gateways))
    return TestClient(api)

"""Stripe's card updates of the cards the ledger saved, through the real services: ``billing serve ingest`` and
``billing serve ledger`` (Kafka, PostgreSQL, a fresh namespace) pointed at a local fake of Stripe's API by
``BILLING_STRIPE_API_BASE``, and ``billing payment-methods backfill`` for a method saved before session 13.

Ingest attributes ``payment_method.automatically_updated`` (Stripe's account updater renewed a card) by
``metadata.tenant`` on the PaymentMethod or its customer, which the ledger never wrote: the renewal of a card saved
through ``POST /v1/accounts/{t}/payment-methods`` was ignored, its old expiry kept (and, once past, the card skipped
and noticed as expired). Saving now marks the method at Stripe; the backfill records the card of a method saved
without details and marks it too; both renewals then reach the ledger.

Events about the Stripe Customer named no tenant either: only the methods were marked. Since session 15 the ledger
marks the account's customer when it is told it (``PUT .../gateway-customers/stripe``), so ``customer.source.updated``
(a card saved as a source of the customer, renewed) and ``customer.deleted`` reach the ledger: the source card takes
its new expiry, and a deleted customer's Stripe methods leave the account.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import stripe
from billing_events import ids, topics
from billing_events.messages import LedgerCommand
from billing_events.timeutil import utcnow
from billing_runtime.bus import KafkaBus, OutMessage

from tests.fake_http_api import Request, serve
from tests.integration.conftest import Stack
from tests.integration.test_walking_skeleton import apply_accounts
from tests.namespaces import scratch_namespace
from tests.support import BILLING, ROOT, ServiceProcess, auth, free_port, wait_until

pytestmark = pytest.mark.integration
WEBHOOK_SECRET = "whsec_card_updates_stack"
CUSTOMER = "cus_stack_1"


class StripeApi:
    """Stripe's PaymentMethods (offline): read (``expand[]=customer`` as Stripe expands it) and updated (their
    ``metadata``, merged, only once attached to a customer, as Stripe); ``renew`` is the account updater. Its
    Customers: read and updated (``metadata``, merged), with their card sources (``GET .../sources/{id}``);
    ``delete`` is a deletion in Stripe's dashboard (the API answers only ``deleted``)."""

    def __init__(self) -> None:
        self.methods: dict[str, dict[str, Any]] = {}
        self.customers: dict[str, dict[str, Any]] = {CUSTOMER: {"id": CUSTOMER, "object": "customer",
                                                                "metadata": {}}}
        self.sources: dict[str, dict[str, Any]] = {}

    def source_card(self, card_id: str, last4: str, exp_month: int, exp_year: int) -> None:
        self.sources[card_id] = {"id": card_id, "object": "card", "customer": CUSTOMER, "brand": "Visa",
                                 "last4": last4, "exp_month": exp_month, "exp_year": exp_year, "metadata": {}}

    def renew_source(self, card_id: str, exp_month: int, exp_year: int) -> dict[str, Any]:
        self.sources[card_id].update(exp_month=exp_month, exp_year=exp_year)
        return self.sources[card_id]

    def delete(self, customer: str) -> dict[str, Any]:
        """The customer as the ``customer.deleted`` event carries it; the API keeps only that it is deleted."""
        deleted = self.customers[customer]
        self.customers[customer] = {"id": customer, "object": "customer", "deleted": True}
        return deleted

    def _customers(self, request: Request) -> tuple[int, Any]:
        parts = request.path.split("/")  # "", "v1", "customers", id[, "sources", id]
        customer = self.customers.get(parts[3])
        if customer is None:
            return 404, {"error": {"type": "invalid_request_error", "message": "No such customer"}}
        if len(parts) == 6 and parts[4] == "sources":
            source = self.sources.get(parts[5])
            if source is None or source["customer"] != parts[3]:
                return 404, {"error": {"type": "invalid_request_error", "message": "No such source"}}
            return 200, source
        if request.method == "POST":
            customer["metadata"].update({key[len("metadata["):-1]: values[0] for key, values in request.form.items()
                                         if key.startswith("metadata[")})
        return 200, customer

    def card(self, method_id: str, last4: str, exp_month: int, exp_year: int) -> None:
        self.methods[method_id] = {"id": method_id, "object": "payment_method", "type": "card",
                                   "customer": CUSTOMER, "metadata": {},
                                   "card": {"brand": "visa", "last4": last4, "exp_month": exp_month,
                                            "exp_year": exp_year}}

    def renew(self, method_id: str, exp_month: int, exp_year: int) -> dict[str, Any]:
        self.methods[method_id]["card"].update(exp_month=exp_month, exp_year=exp_year)
        return self.methods[method_id]

    def __call__(self, request: Request) -> tuple[int, Any]:
        if request.path.startswith("/v1/customers/"):
            return self._customers(request)
        if not request.path.startswith("/v1/payment_methods/"):
            return 404, {"error": {"type": "invalid_request_error", "message": f"unknown {request.path}"}}
        method = self.methods.get(request.path.rsplit("/", 1)[1])
        if method is None:
            return 404, {"error": {"type": "invalid_request_error", "message": "No such PaymentMethod"}}
        if request.method == "POST":
            if not method["customer"]:
                return 400, {"error": {"type": "invalid_request_error",
                                       "message": "You must save this PaymentMethod to a customer first."}}
            method["metadata"].update({key[len("metadata["):-1]: values[0] for key, values in request.form.items()
                                       if key.startswith("metadata[")})
            return 200, method
        expanded = any(v == "customer" for key, values in request.query.items() if key.startswith("expand")
                       for v in values)
        return 200, {**method, "customer": self.customers[method["customer"]]} if expanded else method


def published(env: dict[str, str], command: LedgerCommand) -> None:
    """A command on ``billing.ledger.commands``, as the ledger's HTTP route of session 12 recorded it."""
    async def send() -> None:
        bus = KafkaBus(env["KAFKA_BOOTSTRAP_SERVERS"], namespace=env["BILLING_NAMESPACE"])
        await bus.start()
        try:
            await bus.publish([OutMessage(topics.LEDGER_COMMANDS, str(ids.account_id(command.tenant or "")),
                                          command.to_json(), (("schema", b"ledger.command/v1"),))])
        finally:
            await bus.stop()

    asyncio.run(send())


def cards(ledger: str, tenant: str) -> dict[str, Any]:
    response = httpx.get(f"{ledger}/v1/accounts/{tenant}/payment-methods", headers=auth("viewer", tenant), timeout=10)
    response.raise_for_status()
    return {m["method_id"]: m["card"] for m in response.json()["payment_methods"]}


def webhook(ingest: str, event_id: str, method: dict[str, Any],
            event_type: str = "payment_method.automatically_updated") -> None:
    body = json.dumps({"id": event_id, "object": "event", "type": event_type,
                       "created": int(time.time()), "data": {"object": method}})
    header = stripe.WebhookSignature.generate_signature_header(body, WEBHOOK_SECRET)
    response = httpx.post(f"{ingest}/v1/webhooks/stripe", content=body.encode(), timeout=10,
                          headers={"Stripe-Signature": header, "Content-Type": "application/json"})
    assert response.status_code == 200, response.text


def test_stripe_renewals_of_cards_the_ledger_saved_and_backfilled_reach_the_ledger(
        infra: dict[str, str], tmp_path: Path) -> None:
    tenant = f"cards-{uuid.uuid4().hex[:6]}"
    api = StripeApi()
    api.card("pm_saved", "4242", 12, 2026)
    api.card("pm_legacy", "0005", 11, 2026)
    with serve(api) as fake:
        env = {**infra, "BILLING_NAMESPACE": scratch_namespace("t"), "BILLING_DATA_DIR": str(tmp_path / "var"),
               "BILLING_STRIPE_API_KEY": "sk_test_cards", "BILLING_STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
               "BILLING_STRIPE_API_BASE": fake.base}
        ports = {"ingest": free_port(), "ledger": free_port()}
        processes = {name: ServiceProcess(["serve", name, "--port", str(port)], env, tmp_path / f"{name}.log", port)
                     for name, port in ports.items()}
        try:
            for process in processes.values():
                process.start()
            stack = Stack(env, env["BILLING_NAMESPACE"], f"http://127.0.0.1:{ports['ingest']}", "", processes,
                          tmp_path)
            ledger = f"http://127.0.0.1:{ports['ledger']}"
            apply_accounts(stack, tmp_path, [tenant], amount="20.00")
            wait_until(lambda: httpx.get(f"{ledger}/v1/accounts/{tenant}/payment-methods",
                                         headers=auth("viewer", tenant)).status_code == 200, timeout=60,
                       what="the account")
            customer = httpx.put(f"{ledger}/v1/accounts/{tenant}/gateway-customers/stripe", json={"customer": CUSTOMER},
                                 headers=auth("admin"), timeout=10)
            assert customer.status_code == 200, customer.text
            assert api.customers[CUSTOMER]["metadata"] == {"tenant": tenant}  # marked the tenant's when set
            # A method saved before session 13: its token only, no card details, no mark at Stripe.
            published(env, LedgerCommand(command_id=uuid.uuid4(), kind="payment_method.add", tenant=tenant,
                                         issued_at=utcnow(), issued_by="user:legacy",
                                         payload={"method_id": "pm_legacy", "gateway": "stripe", "label": "old"}))
            wait_until(lambda: "pm_legacy" in cards(ledger, tenant), timeout=60, what="the legacy method")
            saved = httpx.post(f"{ledger}/v1/accounts/{tenant}/payment-methods", timeout=10,
                               headers=auth("admin", tenant), json={"method_id": "pm_saved", "gateway": "stripe"})
            assert saved.status_code == 201, saved.text
            assert api.methods["pm_saved"]["metadata"] == {"tenant": tenant}  # marked the tenant's when saved
            assert cards(ledger, tenant) == {"pm_legacy": None, "pm_saved": {
                "brand": "visa", "last4": "4242", "exp_month": 12, "exp_year": 2026}}

            # The backfill records the legacy method's card and marks it at Stripe.
            ran = subprocess.run([BILLING, "payment-methods", "backfill", "--tenant", tenant, "--format", "json"],
                                 env={**processes["ingest"].env}, cwd=ROOT, capture_output=True, text=True,
                                 timeout=120, check=False)
            assert ran.returncode == 0, ran.stdout + ran.stderr
            outcomes = {m["method_id"]: (m["outcome"], m["attributed"]) for m in json.loads(ran.stdout)["methods"]}
            assert outcomes == {"pm_legacy": ("card", True), "pm_saved": ("already_known", True)}
            assert [(c["customer"], c["outcome"]) for c in json.loads(ran.stdout)["customers"]] == [
                (CUSTOMER, "marked")]
            assert api.methods["pm_legacy"]["metadata"] == {"tenant": tenant}
            wait_until(lambda: (cards(ledger, tenant)["pm_legacy"] or {}).get("last4") == "0005", timeout=60,
                       what="the legacy method's card")

            # Stripe's account updater renews both cards: ingest attributes them, the ledger keeps the new expiry.
            webhook(stack.ingest_url, "evt_renew_saved", api.renew("pm_saved", 12, 2029))
            webhook(stack.ingest_url, "evt_renew_legacy", api.renew("pm_legacy", 11, 2030))
            wait_until(lambda: {m: (c or {}).get("exp_year") for m, c in cards(ledger, tenant).items()} == {
                "pm_saved": 2029, "pm_legacy": 2030}, timeout=60, what="the renewed expiries")

            # A card saved as a source of the customer (the Cards API; its token only, no mark of its own): Stripe
            # renews it with an event about the customer, attributed by the customer's mark.
            api.source_card("card_src", "1881", 10, 2026)
            published(env, LedgerCommand(command_id=uuid.uuid4(), kind="payment_method.add", tenant=tenant,
                                         issued_at=utcnow(), issued_by="user:legacy",
                                         payload={"method_id": "card_src", "gateway": "stripe", "label": "source"}))
            wait_until(lambda: "card_src" in cards(ledger, tenant), timeout=60, what="the source card")
            webhook(stack.ingest_url, "evt_renew_source", api.renew_source("card_src", 10, 2031),
                    "customer.source.updated")
            wait_until(lambda: cards(ledger, tenant)["card_src"] == {
                "brand": "visa", "last4": "1881", "exp_month": 10, "exp_year": 2031}, timeout=60,
                what="the source card's renewal")

            # The customer is deleted in Stripe's dashboard, its methods detached: the account forgets them.
            webhook(stack.ingest_url, "evt_customer_deleted", api.delete(CUSTOMER), "customer.deleted")
            wait_until(lambda: cards(ledger, tenant) == {}, timeout=60, what="the deleted customer's methods")
        finally:
            for process in processes.values():
                process.stop()

"""Stripe: ``Stripe-Signature`` verified by the stripe SDK, then the object re-fetched with a StripeClient.

Events acted on (anything else is answered 200 ``ignored``):

* ``checkout.session.completed`` / ``checkout.session.async_payment_succeeded``: the session must be
  ``complete`` and ``paid``; amount ``amount_total``; reference: its payment intent.
* ``payment_intent.succeeded``: status ``succeeded``; amount ``amount_received``. A payment intent without
  billing metadata (what Checkout creates) is ignored: its session's event carries the metadata. Its
  ``metadata.invoice_id`` (dunning's off-session charges) names the invoice the payment settles.
* ``payment_intent.payment_failed``: status ``requires_payment_method`` or ``canceled`` (Stripe's state after a
  failed attempt), only for an intent whose ``metadata.invoice_id`` names an invoice (dunning's charges): a
  ``payment_failed`` notification, so the ledger follows up a charge it recorded pending. Any other intent's
  failure is ignored (auto-top-up and checkout see their declines when they charge).
* ``refund.created`` / ``refund.updated``: status ``succeeded``; tenant and order id from the refund's
  metadata, else its payment intent's, else the checkout session that created the payment intent; the
  invoice a refunded dunning charge settled from ``metadata.invoice_id`` (the refund's, else the intent's).
* ``charge.dispute.created`` / ``funds_withdrawn`` / ``funds_reinstated`` / ``closed``: the dispute re-fetched
  (``GET /v1/disputes/{id}``, its payment intent expanded); amount and currency: the dispute's. Tenant and order id
  as for a refund (the intent's metadata, else its checkout session). ``funds_withdrawn`` needs a withdrawal among
  the dispute's ``balance_transactions`` (amount < 0), ``funds_reinstated`` a reinstatement (amount > 0): each is
  published with that balance transaction as its reference. ``closed`` needs a final status: ``won``, ``lost``, or
  ``warning_closed`` / ``prevented`` (an inquiry closed, no chargeback: outcome ``closed``). Every movement carries the
  dispute's fee so far (``dispute_fee``: the fee of its balance transactions, net of a fee Stripe gave back).
* ``payment_method.updated`` / ``payment_method.automatically_updated`` (the account updater renewed a saved card):
  the PaymentMethod re-fetched (its customer expanded); a card whose ``metadata.tenant`` (else its customer's)
  names a tenant becomes a ``payment_method.card_update`` ledger command with the card's brand, last4, exp_month
  and exp_year. Any other method (not a card, no tenant) is ignored.

Events about a customer (since session 15) are attributed by the customer's ``metadata.tenant`` (the ledger writes
it on the account's customer), else by the mark of the object the event is about:

* ``customer.source.updated`` of a card (a card saved as a source of the customer: Stripe's account updater renews
  those with this event, not ``payment_method.*``): the card re-fetched (``GET /v1/customers/{customer}/sources/{id}``)
  and its customer; a card whose customer's ``metadata.tenant`` (else its own) names a tenant becomes a
  ``payment_method.card_update`` ledger command as above. A source that is no card, or of no tenant, is ignored.
* ``customer.deleted``: the customer re-fetched must be deleted (else not confirmed); Stripe keeps nothing of a
  deleted customer but its id, so its mark is the ``metadata.tenant`` of the customer as the signed event carries it.
  It becomes a ``payment_customer.deleted`` ledger command (the account forgets the customer and the saved methods
  Stripe detached with it); a customer of no tenant is ignored.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from decimal import Decimal
from functools import partial
from typing import Any

import stripe
from billing_events.cards import CardDetailsError, card_details
from billing_events.messages import PaymentKind, loads_exact
from billing_events.money import MoneyError
from billing_ingest.webhooks import (
    Confirmation,
    ConfirmedCardUpdate,
    ConfirmedCustomerDeleted,
    ConfirmedPayment,
    GatewayUnavailable,
    Ignored,
    NotConfirmed,
    NotConfirmedKind,
    RefusalKind,
    Refused,
    VerifiedEvent,
    attribution,
    dispute_movement,
    header,
    invoice_reference,
    minor_units_to_amount,
    tenant_reference,
)
from billing_runtime.settings import Settings

NAME = "stripe"
_OBJECT_ID = re.compile(r"^[A-Za-z0-9_]{1,255}$")
# Stripe's API sends these zero-decimal ISO 4217 currencies with two decimals, for backwards compatibility.
STRIPE_SCALE_OVERRIDES = {"ISK": 2, "UGX": 2}
STRIPE_NETWORK_RETRIES_MAX = 2
# A payment intent whose attempt failed: it waits for another payment method, or was given up.
FAILED_INTENT_STATUSES = frozenset({"requires_payment_method", "canceled"})
# A closed dispute's final status -> its outcome (an inquiry, warning_*, never withdraws funds).
DISPUTE_OUTCOMES = {"won": "won", "lost": "lost", "warning_closed": "closed", "prevented": "closed"}
DISPUTE_EVENTS = {"charge.dispute.created": "dispute_opened", "charge.dispute.funds_withdrawn": "dispute_funds_withdrawn",
                  "charge.dispute.funds_reinstated": "dispute_funds_reinstated", "charge.dispute.closed": "dispute_closed"}


def _signed_timestamp(signature_header: str) -> int:
    """The timestamp the stripe SDK verified the HMAC over: the first item whose key is exactly ``t`` (not
    stripped: the SDK reads it so), never a look-alike such as `` t=`` put in front of a captured header."""
    for item in signature_header.split(","):
        key, _, value = item.partition("=")
        if key == "t":
            return int(value)
    raise ValueError("no timestamp in Stripe-Signature")


def _timestamp_count(signature_header: str) -> int:
    """How many items name a timestamp, spaced or not: a genuine header has exactly one."""
    return sum(1 for item in signature_header.split(",") if item.partition("=")[0].strip() == "t")


class StripeGateway:
    name = NAME

    def __init__(self, client: stripe.StripeClient, http_client: stripe.HTTPClient, webhook_secret: str,
                 tolerance_seconds: int) -> None:
        self._client = client
        self._http_client = http_client
        self._secret = webhook_secret
        self._tolerance_seconds = tolerance_seconds
        self._handlers: dict[str, Callable[[str], Awaitable[Confirmation]]] = {
            "checkout.session.completed": self._confirm_session,
            "checkout.session.async_payment_succeeded": self._confirm_session,
            "payment_intent.succeeded": self._confirm_payment_intent,
            "payment_intent.payment_failed": self._confirm_failed_intent,
            "refund.created": self._confirm_refund,
            "refund.updated": self._confirm_refund,
            **{name: partial(self._confirm_dispute, kind) for name, kind in DISPUTE_EVENTS.items()},
            "payment_method.updated": self._confirm_card,
            "payment_method.automatically_updated": self._confirm_card,
        }
        # Events about a customer: their handlers read the signed event's object (the customer a source belongs to,
        # a deleted customer's mark), and re-fetch what the API still has of it.
        self._customer_handlers: dict[str, Callable[[Mapping[str, Any]], Awaitable[Confirmation]]] = {
            "customer.source.updated": self._confirm_source_card,
            "customer.deleted": self._confirm_customer_deleted,
        }

    async def verify(self, raw_body: bytes, headers: Mapping[str, str], now: datetime) -> VerifiedEvent | Refused:
        signature = header(headers, "Stripe-Signature")
        try:
            text = raw_body.decode("utf-8")
        except UnicodeDecodeError:
            return Refused(RefusalKind.SIGNATURE_INVALID, "The body is not UTF-8, so it cannot carry a valid signature.")
        try:
            # The SDK checks the HMAC-SHA256 over "<t>.<raw body>"; the window is checked below against our
            # clock (`now`), in both directions, because the SDK reads the wall clock and only looks back.
            stripe.WebhookSignature.verify_header(text, signature, self._secret, tolerance=None)
            signed_at = _signed_timestamp(signature or "")
        except (stripe.SignatureVerificationError, ValueError) as exc:
            return Refused(RefusalKind.SIGNATURE_INVALID, f"Stripe-Signature does not verify: {exc}")
        age = now.timestamp() - signed_at
        if abs(age) > self._tolerance_seconds:
            return Refused(RefusalKind.EXPIRED, f"Signed {int(age)} s ago; the tolerance is "
                                                f"{self._tolerance_seconds} s.")
        if _timestamp_count(signature or "") != 1:
            return Refused(RefusalKind.SIGNATURE_INVALID, "Stripe-Signature must carry exactly one timestamp (t=).")
        try:
            event = loads_exact(text)
        except ValueError as exc:
            return Refused(RefusalKind.MALFORMED, f"Signed body is not JSON: {str(exc)[:120]}")
        data = event.get("data") if isinstance(event, dict) else None
        obj = data.get("object") if isinstance(data, dict) else None
        if not (isinstance(event.get("id"), str) and isinstance(event.get("type"), str) and isinstance(obj, dict)
                and isinstance(obj.get("id"), str) and _OBJECT_ID.match(obj["id"]) and event["id"]):
            return Refused(RefusalKind.MALFORMED, "A Stripe event needs id, type and a valid data.object.id.")
        return VerifiedEvent(NAME, event["id"], event["type"], event, replay_key=event["id"])

    async def confirm(self, event: VerifiedEvent) -> Confirmation:
        handler = self._handlers.get(event.event_type)
        customer_handler = self._customer_handlers.get(event.event_type)
        if handler is None and customer_handler is None:
            return Ignored(f"Stripe event type {event.event_type} moves no money billing acts on.")
        obj = event.payload["data"]["object"]
        object_id = obj["id"]
        try:
            if handler is not None:
                return await handler(object_id)
            assert customer_handler is not None
            return await customer_handler(obj)
        except stripe.InvalidRequestError as exc:  # e.g. 404: not an object of this account / mode
            return NotConfirmed(NotConfirmedKind.NOT_CONFIRMED, f"Stripe does not confirm {object_id}: "
                                                                f"{exc.user_message or exc}")
        except stripe.StripeError as exc:  # connection, rate limit, 5xx, our credentials
            raise GatewayUnavailable(f"Stripe API: {type(exc).__name__}: {exc.user_message or exc}") from exc
        except MoneyError as exc:
            return NotConfirmed(NotConfirmedKind.NOT_CONFIRMED, f"Stripe's amount is not usable: {exc}")

    async def close(self) -> None:
        try:
            await self._http_client.close_async()
        except NotImplementedError:  # a client without async connections to close
            return

    # -- one re-fetch per object kind -----------------------------------------------------------------------

    async def _confirm_session(self, session_id: str) -> Confirmation:
        session = (await self._client.v1.checkout.sessions.retrieve_async(session_id)).to_dict()
        status, paid = session.get("status"), session.get("payment_status")
        if paid == "no_payment_required":
            return Ignored(f"Checkout session {session_id} needed no payment.")
        if status != "complete" or paid != "paid":
            return NotConfirmed(NotConfirmedKind.NOT_CONFIRMED,
                                f"Stripe says checkout session {session_id} is {status}/{paid}, not complete/paid.")
        who = attribution(session.get("metadata"))
        if who is None:
            return NotConfirmed(NotConfirmedKind.UNATTRIBUTABLE,
                                f"Checkout session {session_id} has no metadata.tenant / metadata.order_id.")
        amount, code = minor_units_to_amount(session.get("amount_total"), session.get("currency"),
                                             STRIPE_SCALE_OVERRIDES)
        reference = _id_of(session.get("payment_intent")) or _id_of(session.get("invoice")) or session_id
        return ConfirmedPayment("payment_succeeded", who[0], who[1], amount, code, reference)

    async def _confirm_payment_intent(self, intent_id: str) -> Confirmation:
        intent = (await self._client.v1.payment_intents.retrieve_async(intent_id)).to_dict()
        if intent.get("status") != "succeeded":
            return NotConfirmed(NotConfirmedKind.NOT_CONFIRMED,
                                f"Stripe says payment intent {intent_id} is {intent.get('status')}, not succeeded.")
        who = attribution(intent.get("metadata"))
        if who is None:
            return Ignored(f"Payment intent {intent_id} carries no billing metadata (its checkout session does).")
        amount, code = minor_units_to_amount(intent.get("amount_received"), intent.get("currency"),
                                             STRIPE_SCALE_OVERRIDES)
        return ConfirmedPayment("payment_succeeded", who[0], who[1], amount, code, intent_id,
                                invoice_reference(intent.get("metadata")))

    async def _confirm_failed_intent(self, intent_id: str) -> Confirmation:
        intent = (await self._client.v1.payment_intents.retrieve_async(intent_id)).to_dict()
        who, invoice = attribution(intent.get("metadata")), invoice_reference(intent.get("metadata"))
        if who is None or invoice is None:
            return Ignored(f"Payment intent {intent_id} pays no invoice: its failure is seen by whoever charged it.")
        if intent.get("status") not in FAILED_INTENT_STATUSES:
            return NotConfirmed(NotConfirmedKind.NOT_CONFIRMED,
                                f"Stripe says payment intent {intent_id} is {intent.get('status')}, not failed.")
        amount, code = minor_units_to_amount(intent.get("amount"), intent.get("currency"), STRIPE_SCALE_OVERRIDES)
        return ConfirmedPayment("payment_failed", who[0], who[1], amount, code, intent_id, invoice)

    async def _confirm_refund(self, refund_id: str) -> Confirmation:
        refund = (await self._client.v1.refunds.retrieve_async(
            refund_id, params={"expand": ["payment_intent"]})).to_dict()
        if refund.get("status") != "succeeded":
            return NotConfirmed(NotConfirmedKind.NOT_CONFIRMED,
                                f"Stripe says refund {refund_id} is {refund.get('status')}, not succeeded.")
        intent = refund.get("payment_intent")
        who = attribution(refund.get("metadata"))
        if who is None and isinstance(intent, dict):
            who = attribution(intent.get("metadata"))
        if who is None and _id_of(intent):
            who = await self._session_attribution(_id_of(intent) or "")
        if who is None:
            return NotConfirmed(NotConfirmedKind.UNATTRIBUTABLE,
                                f"Refund {refund_id}: no tenant / order id on the refund, its payment intent "
                                f"or its checkout session.")
        amount, code = minor_units_to_amount(refund.get("amount"), refund.get("currency"), STRIPE_SCALE_OVERRIDES)
        # A refund of a dunning charge names the invoice that payment settled: the ledger credits that invoice.
        invoice = invoice_reference(refund.get("metadata")) or (
            invoice_reference(intent.get("metadata")) if isinstance(intent, dict) else None)
        # The payment given back, as its own notification named it (dunning's charges and checkout: the intent).
        refunded = _id_of(intent) or _id_of(refund.get("charge"))
        return ConfirmedPayment("refund_succeeded", who[0], who[1], amount, code, refund_id, invoice, refunded)

    async def _confirm_dispute(self, kind: PaymentKind, dispute_id: str) -> Confirmation:
        """A dispute movement (see the module doc): the dispute as Stripe's API has it, never the webhook's body."""
        dispute = (await self._client.v1.disputes.retrieve_async(
            dispute_id, params={"expand": ["payment_intent"]})).to_dict()
        intent = dispute.get("payment_intent")
        metadata = intent.get("metadata") if isinstance(intent, dict) else None
        who = attribution(metadata)
        if who is None and _id_of(intent):
            who = await self._session_attribution(_id_of(intent) or "")
        if who is None:
            return NotConfirmed(NotConfirmedKind.UNATTRIBUTABLE,
                                f"Dispute {dispute_id}: no tenant / order id on its payment intent or its checkout "
                                "session.")
        amount, code = minor_units_to_amount(dispute.get("amount"), dispute.get("currency"), STRIPE_SCALE_OVERRIDES)
        status, movement, outcome = dispute.get("status"), None, None
        if kind in ("dispute_funds_withdrawn", "dispute_funds_reinstated"):
            withdrawn = kind == "dispute_funds_withdrawn"
            movement = next((t["id"] for t in dispute.get("balance_transactions") or ()
                             if isinstance(t, dict) and isinstance(t.get("id"), str)
                             and isinstance(t.get("amount"), int) and (t["amount"] < 0) == withdrawn
                             and t["amount"] != 0), None)
            if movement is None:
                return NotConfirmed(NotConfirmedKind.NOT_CONFIRMED,
                                    f"Stripe shows no {'withdrawal' if withdrawn else 'reinstatement'} of dispute "
                                    f"{dispute_id}'s funds.")
        if kind == "dispute_closed":
            outcome = DISPUTE_OUTCOMES.get(str(status))
            if outcome is None:
                return NotConfirmed(NotConfirmedKind.NOT_CONFIRMED,
                                    f"Stripe says dispute {dispute_id} is {status}, not closed.")
        payment = _id_of(intent) or _id_of(dispute.get("charge"))
        return dispute_movement(kind, who, amount, code, dispute_id, payment, outcome=outcome,  # type: ignore[arg-type]
                                movement=movement, invoice_id=invoice_reference(metadata),
                                fee=dispute_fee(dispute))

    async def _confirm_card(self, method_id: str) -> Confirmation:
        method = (await self._client.v1.payment_methods.retrieve_async(
            method_id, params={"expand": ["customer"]})).to_dict()
        card = method.get("card")
        if method.get("type") != "card" or not isinstance(card, dict):
            return Ignored(f"Payment method {method_id} is not a card: no expiry to keep.")
        customer = method.get("customer")
        tenant = tenant_reference(method.get("metadata")) or (
            tenant_reference(customer.get("metadata")) if isinstance(customer, dict) else None)
        if tenant is None:
            return Ignored(f"Payment method {method_id} names no billing tenant (metadata.tenant on it or on its "
                           f"customer).")
        return _card_update(tenant, method_id, card)

    async def _confirm_source_card(self, source: Mapping[str, Any]) -> Confirmation:
        """``customer.source.updated``: a card saved as a source of a customer, as Stripe's API has it now."""
        source_id, customer_id = source["id"], source.get("customer")
        if not isinstance(customer_id, str) or not _OBJECT_ID.match(customer_id):
            return Ignored(f"Source {source_id} belongs to no customer: no saved card to keep.")
        card = (await self._client.v1.customers.payment_sources.retrieve_async(customer_id, source_id)).to_dict()
        if card.get("object") != "card":
            return Ignored(f"Source {source_id} is not a card: no expiry to keep.")
        customer = (await self._client.v1.customers.retrieve_async(customer_id)).to_dict()
        tenant = tenant_reference(customer.get("metadata")) or tenant_reference(card.get("metadata"))
        if tenant is None:
            return Ignored(f"Card {source_id} names no billing tenant (metadata.tenant on its customer {customer_id} "
                           f"or on it).")
        return _card_update(tenant, source_id, card)

    async def _confirm_customer_deleted(self, signed: Mapping[str, Any]) -> Confirmation:
        """``customer.deleted``: Stripe's API must say the customer is deleted. It keeps no metadata of a deleted
        customer, so the tenant is the mark the signed event carries (Stripe's copy of the customer as deleted)."""
        customer_id = signed["id"]
        customer = (await self._client.v1.customers.retrieve_async(customer_id)).to_dict()
        if not customer.get("deleted"):
            return NotConfirmed(NotConfirmedKind.NOT_CONFIRMED, f"Stripe says customer {customer_id} is not deleted.")
        tenant = tenant_reference(customer.get("metadata")) or tenant_reference(signed.get("metadata"))
        if tenant is None:
            return Ignored(f"Customer {customer_id} names no billing tenant (metadata.tenant).")
        return ConfirmedCustomerDeleted(tenant, customer_id)

    async def _session_attribution(self, intent_id: str) -> tuple[str, str] | None:
        sessions = await self._client.v1.checkout.sessions.list_async(
            params={"payment_intent": intent_id, "limit": 1})
        for session in sessions.to_dict().get("data", []):
            return attribution(session.get("metadata"))
        return None


def dispute_fee(dispute: Mapping[str, Any]) -> tuple[Decimal, str] | None:
    """The fee Stripe has charged for a dispute so far, net of what it gave back: the sum of the ``fee`` of the
    dispute's balance transactions (the withdrawal's dispute fee, e.g. 1500; a reinstatement's negative fee where
    Stripe returns it on a won dispute), in their currency (the account's settlement currency). None: no balance
    transaction yet (an inquiry; nothing withdrawn). ``MoneyError`` when Stripe's answer is not usable (a fee that is
    no integer, transactions in several currencies, a negative net): the movement is not confirmed."""
    transactions = [t for t in dispute.get("balance_transactions") or () if isinstance(t, dict)]
    if not transactions:
        return None
    currencies = {str(t.get("currency")) for t in transactions}
    fees = [t.get("fee") for t in transactions]
    if len(currencies) != 1 or not all(isinstance(f, int) and not isinstance(f, bool) for f in fees):
        raise MoneyError(f"the dispute's balance transactions carry no usable fee: {fees} in {sorted(currencies)}")
    return minor_units_to_amount(sum(fees), currencies.pop(), STRIPE_SCALE_OVERRIDES)  # type: ignore[arg-type]


def _id_of(value: Any) -> str | None:
    """A Stripe reference is an id string, or the expanded object with an ``id``."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("id"), str):
        return value["id"]
    return None


def build(settings: Settings, http_client: stripe.HTTPClient | None = None) -> StripeGateway | None:
    """The Stripe gateway when BILLING_STRIPE_API_KEY and BILLING_STRIPE_WEBHOOK_SECRET are set, else None."""
    if not settings.stripe_api_key and not settings.stripe_webhook_secret:
        return None
    if not settings.stripe_api_key or not settings.stripe_webhook_secret:
        raise ValueError("Stripe webhooks need both BILLING_STRIPE_API_KEY (to re-fetch every payment) and "
                         "BILLING_STRIPE_WEBHOOK_SECRET")
    api = settings.stripe_api_address()  # BILLING_STRIPE_API_BASE (stripe-mock, a test's fake), else Stripe's
    http = http_client or stripe.HTTPXClient(timeout=settings.gateway_api_timeout_seconds)
    client = stripe.StripeClient(settings.stripe_api_key, http_client=http,
                                 max_network_retries=STRIPE_NETWORK_RETRIES_MAX,
                                 base_addresses={"api": api} if api else None)
    return StripeGateway(client, http, settings.stripe_webhook_secret, settings.stripe_webhook_tolerance_seconds)


def _card_update(tenant: str, card_id: str, card: Mapping[str, Any]) -> Confirmation:
    """The card update of ``card`` (a PaymentMethod's ``card`` or a customer's card source), as Stripe's API has it."""
    try:
        details = card_details({"brand": card.get("brand"), "last4": card.get("last4"),
                                "exp_month": card.get("exp_month"), "exp_year": card.get("exp_year")})
    except CardDetailsError as exc:
        return NotConfirmed(NotConfirmedKind.NOT_CONFIRMED, f"Stripe's card details of {card_id} are not usable: {exc}")
    return ConfirmedCardUpdate(tenant, card_id, details)

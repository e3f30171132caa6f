"""Saved payment methods filled in from their gateways (``billing payment-methods backfill``): the card details of
methods saved before the ledger kept them (session 13), and the gateway's mark of the tenant on methods saved before
the ledger wrote it (Stripe's ``metadata.tenant``, session 14).

A method saved before session 13 has no ``card`` (brand, last four digits, expiry month/year): it is never called
expired, so no expiry notice is recorded for it and, as the default, it is charged first even when its card has
expired. For each such method of the accounts asked (by default every account that saved one), its gateway is asked
what it knows (``OutboundGateway.saved_card``); a card becomes a ``payment_method.card_update`` command, the one
Stripe's card-updated webhook sends, recorded as ``Roster.PaymentMethodCardUpdated``: the expiry task and off-session
charges see it as any other card. Its id derives from (tenant, method, card), so running the backfill again sends
the same command, which the ledger refuses as a duplicate. Every method is also marked the tenant's at its gateway
(``OutboundGateway.attribute_method``) unless ``attribute`` is off, so that the gateway's later card updates reach the
ledger (ingest attributes Stripe's by ``metadata.tenant``), and so is each account's gateway customer
(``OutboundGateway.attribute_customer``, since session 15: the ledger marked only the methods, so Stripe's events about
the customer, ``customer.source.updated`` and ``customer.deleted``, named no tenant). The accounts asked by default are
every one that saved a method or was given a gateway customer.

The commands are returned, not applied: the CLI publishes them on ``billing.ledger.commands``, where the ledger
applies them as any other command (a method removed meanwhile: rejected ``unknown_payment_method``, nothing changed).
Nothing here writes to the ledger's store.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from billing_events.messages import LedgerCommand
from billing_events.timeutil import utcnow
from billing_ledger.application import LedgerApplication
from billing_ledger.domain.payment_profile import PaymentProfile, payment_profile_id
from billing_ledger.domain.roster import Roster, roster_id
from billing_ledger.gateways import GatewayError, OutboundGateway, UnknownCustomer, UnknownPaymentMethod
from eventsourcing.utils import get_topic

BY = "cli:payment-methods-backfill"
SCAN_BATCH_EVENTS_MAX = 1000
ADDED_TOPIC = get_topic(Roster.PaymentMethodAdded)
CUSTOMER_SET_TOPIC = get_topic(PaymentProfile.CustomerSet)

# What became of one method: its card found (``card``: a command to record it), known already, no card at its
# gateway (a bank debit, a wallet); or not checked: the gateway does not know it (or marks it another tenant's), could
# not answer, or is not enabled here.
CARD, KNOWN, NO_CARD = "card", "already_known", "no_card"
UNKNOWN, UNAVAILABLE, NOT_ENABLED = "unknown_payment_method", "gateway_unavailable", "gateway_not_enabled"
DONE = frozenset({CARD, KNOWN, NO_CARD})
# What became of an account's gateway customer: marked the tenant's (now or before), a gateway that keeps no mark, not
# asked (a dry run); or not marked: the gateway does not know it (deleted, or marked another tenant's), could not
# answer, or is not enabled here.
MARKED, NO_MARK, DRY_RUN, UNKNOWN_CUSTOMER = "marked", "no_mark", "dry_run", "unknown_payment_customer"
CUSTOMER_DONE = frozenset({MARKED, NO_MARK, DRY_RUN})


@dataclass(frozen=True)
class MethodBackfill:
    tenant: str
    method_id: str
    gateway: str
    outcome: str
    card: dict[str, Any] | None = None
    attributed: bool = False  # marked the tenant's at its gateway (now or before)
    detail: str = ""

    @property
    def done(self) -> bool:
        return self.outcome in DONE

    def to_json(self) -> dict[str, Any]:
        return {"tenant": self.tenant, "method_id": self.method_id, "gateway": self.gateway, "outcome": self.outcome,
                "card": self.card, "attributed": self.attributed, "detail": self.detail}


@dataclass(frozen=True)
class CustomerBackfill:
    tenant: str
    gateway: str
    customer: str
    outcome: str
    detail: str = ""

    @property
    def done(self) -> bool:
        return self.outcome in CUSTOMER_DONE

    def to_json(self) -> dict[str, Any]:
        return {"tenant": self.tenant, "gateway": self.gateway, "customer": self.customer, "outcome": self.outcome,
                "detail": self.detail}


@dataclass
class Backfill:
    methods: list[MethodBackfill] = field(default_factory=list)
    commands: list[LedgerCommand] = field(default_factory=list)
    customers: list[CustomerBackfill] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(m.done for m in self.methods) and all(c.done for c in self.customers)


def card_update_command_id(tenant: str, method_id: str, card: dict[str, Any]) -> UUID:
    return uuid5(NAMESPACE_URL, f"/accounts/{tenant}/payment-methods/{method_id}/backfill/"
                                f"{json.dumps(card, sort_keys=True)}")


def _tenants(app: LedgerApplication, tenants: Sequence[str] | None) -> list[str]:
    """``tenants``, else every account that ever saved a payment method or was given a gateway customer (in the order
    it first did)."""
    if tenants:
        return list(tenants)
    found: dict[UUID, None] = {}
    position = 0
    while True:
        notifications = app.process_recorder.select_notifications(position + 1, SCAN_BATCH_EVENTS_MAX,
                                                                  topics=[ADDED_TOPIC, CUSTOMER_SET_TOPIC])
        if not notifications:
            break
        found.update((n.originator_id, None) for n in notifications)
        position = notifications[-1].id
    named = [app.read(aggregate, lambda a: a.tenant) for aggregate in found]
    return list(dict.fromkeys(tenant for tenant in named if tenant))


def _saved(app: LedgerApplication, tenant: str) -> tuple[list[dict[str, Any]], dict[str, str]]:
    methods = app.read(roster_id(tenant), lambda r: [dict(m) for m in r.payment_methods]) or []
    customers = app.read(payment_profile_id(tenant), lambda p: dict(p.customers)) or {}
    return methods, customers


async def backfill(app: LedgerApplication, gateways: dict[str, OutboundGateway], *,
                   tenants: Sequence[str] | None = None, attribute: bool = True,
                   now: datetime | None = None) -> Backfill:
    """Asks each saved method's gateway for what the ledger lacks of it, and marks each account's gateway customers;
    returns what became of each method and customer and the ``payment_method.card_update`` commands to apply (see
    the module's docstring)."""
    moment = now or utcnow()
    result = Backfill()
    for tenant in await asyncio.to_thread(_tenants, app, tenants):
        methods, customers = await asyncio.to_thread(_saved, app, tenant)
        for method in methods:
            result.methods.append(await _one(gateways, tenant, method, customers, attribute, moment, result.commands))
        for name, customer in sorted(customers.items()):
            result.customers.append(await _customer(gateways, tenant, name, customer, attribute))
    return result


async def _customer(gateways: dict[str, OutboundGateway], tenant: str, name: str, customer: str,
                    attribute: bool) -> CustomerBackfill:
    gateway = gateways.get(name)
    if gateway is None:
        return CustomerBackfill(tenant, name, customer, NOT_ENABLED, f"gateway {name} is not enabled here")
    if not attribute:
        return CustomerBackfill(tenant, name, customer, DRY_RUN)
    try:
        marked = await gateway.attribute_customer(customer=customer, tenant=tenant)
    except UnknownCustomer as exc:
        return CustomerBackfill(tenant, name, customer, UNKNOWN_CUSTOMER, str(exc))
    except GatewayError as exc:
        return CustomerBackfill(tenant, name, customer, UNAVAILABLE, str(exc))
    return CustomerBackfill(tenant, name, customer, MARKED if marked else NO_MARK)


async def _one(gateways: dict[str, OutboundGateway], tenant: str, method: dict[str, Any], customers: dict[str, str],
               attribute: bool, now: datetime, commands: list[LedgerCommand]) -> MethodBackfill:
    method_id, name = method["method_id"], method["gateway"]
    gateway = gateways.get(name)
    if gateway is None:
        return MethodBackfill(tenant, method_id, name, NOT_ENABLED, detail=f"gateway {name} is not enabled here")
    customer = customers.get(name)
    known = method.get("card")
    try:
        card = known or await gateway.saved_card(customer=customer, method_id=method_id)
        attributed = attribute and await gateway.attribute_method(customer=customer, method_id=method_id,
                                                                  tenant=tenant)
    except UnknownPaymentMethod as exc:
        return MethodBackfill(tenant, method_id, name, UNKNOWN, detail=str(exc))
    except GatewayError as exc:
        return MethodBackfill(tenant, method_id, name, UNAVAILABLE, detail=str(exc))
    if known:
        return MethodBackfill(tenant, method_id, name, KNOWN, dict(known), attributed)
    if card is None:
        return MethodBackfill(tenant, method_id, name, NO_CARD, attributed=attributed)
    commands.append(LedgerCommand(
        command_id=card_update_command_id(tenant, method_id, card), kind="payment_method.card_update", tenant=tenant,
        issued_at=now, issued_by=BY, payload={"method_id": method_id, "gateway": name, "card": card,
                                              "at": now.isoformat()}))
    return MethodBackfill(tenant, method_id, name, CARD, dict(card), attributed)

"""An account's payment profile: identity verification (seed 003), gateway customer ids, alert settings and
what it has paid for top-ups so far (the identity gate's spending threshold)."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.domain import Aggregate, event


def payment_profile_id(tenant: str) -> UUID:
    return uuid5(NAMESPACE_URL, f"/accounts/{tenant}/payment-profile")


class PaymentProfile(Aggregate):
    @staticmethod
    def create_id(tenant: str) -> UUID:
        return payment_profile_id(tenant)

    @event("Created")
    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        self.identity_verified = False
        self.identity: dict[str, Any] | None = None
        self.customers: dict[str, str] = {}  # gateway -> the gateway's customer id (saved methods belong to it)
        self.alerts: dict[str, Any] = {}  # email, webhook_url, webhook_secret
        self.top_ups_paid = "0"  # sum of paid top-up totals, in the account's currency
        self.top_ups_count = 0
        self.open_orders: dict[str, str] = {}  # order id -> total, top-up orders placed and not yet paid or closed

    def verify_identity(self, *, reference: str, method: str, at: datetime, by: str) -> None:
        self._identity_verified(reference=reference, method=method, at=at, by=by)

    @event("IdentityVerified")
    def _identity_verified(self, reference: str, method: str, at: datetime, by: str) -> None:
        self.identity_verified = True
        self.identity = {"reference": reference, "method": method, "at": at.isoformat(), "by": by}

    def set_customer(self, *, gateway: str, customer: str, at: datetime) -> None:
        if self.customers.get(gateway) != customer:
            self._customer_set(gateway=gateway, customer=customer, at=at)

    @event("CustomerSet")
    def _customer_set(self, gateway: str, customer: str, at: datetime) -> None:
        self.customers[gateway] = customer

    def remove_customer(self, *, gateway: str, customer: str, at: datetime, by: str) -> bool:
        """The gateway deleted ``customer`` (its saved methods with it): the account names no customer there any more
        (charges would name one the gateway no longer knows). False when it names another one (changed since)."""
        if self.customers.get(gateway) != customer:
            return False
        self._customer_removed(gateway=gateway, customer=customer, at=at, by=by)
        return True

    @event("CustomerRemoved")
    def _customer_removed(self, gateway: str, customer: str, at: datetime, by: str) -> None:
        self.customers.pop(gateway, None)

    def configure_alerts(self, *, settings: dict[str, Any], at: datetime, by: str) -> None:
        self._alerts_configured(settings=settings, at=at, by=by)

    @event("AlertsConfigured")
    def _alerts_configured(self, settings: dict[str, Any], at: datetime, by: str) -> None:
        self.alerts = dict(settings)

    def record_top_up(self, *, order: str, total: str, at: datetime) -> None:
        self._top_up_recorded(order=order, total=total, at=at)

    @event("TopUpRecorded")
    def _top_up_recorded(self, order: str, total: str, at: datetime) -> None:
        self.top_ups_paid = str(Decimal(self.top_ups_paid) + Decimal(total))
        self.top_ups_count += 1
        self.open_orders.pop(order, None)

    def place_order(self, *, order: str, total: str, at: datetime) -> None:
        """A top-up order was placed: it counts towards the identity threshold until paid, failed or expired."""
        self._order_placed(order=order, total=total, at=at)

    @event("OrderPlaced")
    def _order_placed(self, order: str, total: str, at: datetime) -> None:
        self.open_orders[order] = total

    def release_orders(self, *, orders: list[str]) -> None:
        self._orders_released(orders=list(orders))

    @event("OrdersReleased")
    def _orders_released(self, orders: list[str]) -> None:
        for order in orders:
            self.open_orders.pop(order, None)

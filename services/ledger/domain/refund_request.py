"""A customer's refund request against a paid order: requested -> approved -> refunded, or rejected."""

from __future__ import annotations

from datetime import datetime
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.domain import Aggregate, event

REQUESTED, APPROVED, REFUNDED, REJECTED = "requested", "approved", "refunded", "rejected"


def refund_request_id(tenant: str, key: str) -> UUID:
    return uuid5(NAMESPACE_URL, f"/refund-requests/{tenant}/{key}")


class RefundRequestError(ValueError):
    pass


class RefundRequest(Aggregate):
    @staticmethod
    def create_id(tenant: str, key: str) -> UUID:
        return refund_request_id(tenant, key)

    @event("Requested")
    def __init__(self, tenant: str, key: str, order_id: str, reason: str, at: datetime, by: str) -> None:
        self.tenant = tenant
        self.key = key
        self.order_id = order_id
        self.reason = reason
        self.status = REQUESTED
        self.gateway_refund: str | None = None
        self.credit_note: str | None = None

    def approve(self, *, at: datetime, by: str) -> None:
        if self.status == APPROVED:
            return
        if self.status != REQUESTED:
            raise RefundRequestError(f"refund request is {self.status}")
        self._approved(at=at, by=by)

    @event("Approved")
    def _approved(self, at: datetime, by: str) -> None:
        self.status = APPROVED

    def reject(self, *, reason: str, at: datetime, by: str) -> None:
        if self.status != REQUESTED:
            raise RefundRequestError(f"refund request is {self.status}")
        self._rejected(reason=reason, at=at, by=by)

    @event("Rejected")
    def _rejected(self, reason: str, at: datetime, by: str) -> None:
        self.status = REJECTED

    def complete(self, *, gateway_refund: str, credit_note: str, at: datetime, by: str) -> None:
        if self.status != APPROVED:
            raise RefundRequestError(f"refund request is {self.status}, not approved")
        self._refunded(gateway_refund=gateway_refund, credit_note=credit_note, at=at, by=by)

    @event("Refunded")
    def _refunded(self, gateway_refund: str, credit_note: str, at: datetime, by: str) -> None:
        self.status = REFUNDED
        self.gateway_refund = gateway_refund
        self.credit_note = credit_note

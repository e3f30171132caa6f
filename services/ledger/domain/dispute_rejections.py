"""The dispute notifications the ledger rejected for one tenant (since session 14): an index for reconciliation.

A rejected command changes nothing; its receipt keeps its id, kind and reason code, but receipts are keyed by the
command's id alone, so finding a tenant's rejected dispute commands meant reading every receipt in the store (all of
its usage, ten thousand a second). ``DisputeRejections`` (one per tenant, its id from the tenant) records each
rejected ``dispute.*`` command of the tenant in the same transaction as its receipt
(``dispute_commands.record_rejection``), so ``billing reconcile disputes`` reads the tenant's own few events. It moves
no money and is no part of the account's books (not chained, not exported by ``billing audit``).
"""

from __future__ import annotations

from datetime import datetime
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.domain import Aggregate, event

# What a rejection keeps of its detail (the words; the reason code is whole).
REJECTION_DETAIL_CHARS_MAX = 500


def dispute_rejections_id(tenant: str) -> UUID:
    return uuid5(NAMESPACE_URL, f"/dispute-rejections/{tenant}")


class DisputeRejections(Aggregate):
    @staticmethod
    def create_id(tenant: str) -> UUID:
        return dispute_rejections_id(tenant)

    @event("Created")
    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        self.rejections = 0

    def record(self, *, command_id: UUID, kind: str, reason: str | None, detail: str | None, gateway: str | None,
               dispute: str | None, order_id: str | None, amount: str | None, currency: str | None,
               at: datetime) -> None:
        """A ``dispute.*`` command of the tenant was rejected (changed nothing): what finance needs to find the
        gateway's event (the command id derives from it) and why."""
        self._rejected(command_id=command_id, kind=kind, reason=reason,
                       detail=detail[:REJECTION_DETAIL_CHARS_MAX] if detail else detail, gateway=gateway,
                       dispute=dispute, order_id=order_id, amount=amount, currency=currency, at=at)

    @event("Rejected")
    def _rejected(self, command_id: UUID, kind: str, reason: str | None, detail: str | None, gateway: str | None,
                  dispute: str | None, order_id: str | None, amount: str | None, currency: str | None,
                  at: datetime) -> None:
        self.rejections += 1

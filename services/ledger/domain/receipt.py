"""A receipt per ledger command: its id is the command id, so a second delivery is recognised and refused."""

from __future__ import annotations

from uuid import UUID

from eventsourcing.domain import Aggregate, event


class CommandReceipt(Aggregate):
    @staticmethod
    def create_id(command_id: UUID) -> UUID:
        return command_id

    @event("Recorded")
    def __init__(self, command_id: UUID, kind: str, tenant: str | None, outcome: str, reason: str | None,
                 issued_by: str) -> None:
        self.command_id = command_id
        self.kind = kind
        self.tenant = tenant
        self.outcome = outcome
        self.reason = reason
        self.issued_by = issued_by

"""Ledger commands of holds (two-phase spending): ``hold.place``, ``hold.capture``, ``hold.release``.

The HTTP routes apply these directly (one-command transactions, a synchronous answer); other services may
send the same kinds over ``billing.ledger.commands``. Each handler returns the hold as it stands after the
command, which is what the HTTP answer shows.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from billing_events.messages import LedgerCommand
from billing_ledger import payload
from billing_ledger.account_commands import account_of, declared_unit
from billing_ledger.application import LedgerApplication, _Batch, handles
from billing_ledger.domain.roster import roster_id
from billing_ledger.domain.subscription import ENTITLED


def hold_id(tenant: str, idempotency_key: str) -> UUID:
    """A hold's id from the caller's idempotency key: a retried request names the same hold."""
    return uuid5(NAMESPACE_URL, f"/accounts/{tenant}/holds/{idempotency_key}")


def billing_time_zone(batch: _Batch, tenant: str, at: datetime) -> str | None:
    """The zone whose months a capture at ``at`` is summed in (``HoldCaptured.time_zone``), or None: UTC.

    The zone a usage debit at that instant names (rating's ``billing_time_zone``, ``cause.time_zone``): that of the
    account's primary subscription, the earliest-started entitled one (trialing, active, past_due, paused: rating's
    live ones; ties by id, as rating orders them), whose periods bill the account's usage and overage, when ``at``
    is not before its start. None (the UTC month) without one, before it started (rating bills such usage by
    calendar month) and for UTC. The projections cannot look it up (the subscription's events are in another
    partition than the account's), so the ledger records it on the event.
    """
    roster = batch.get(roster_id(tenant))
    if roster is None or not roster.live:
        return None
    live = [s for s in (batch.get(UUID(i)) for i in roster.live) if s is not None and s.status in ENTITLED]
    if not live:
        return None
    primary = min(live, key=lambda s: (s.started_at, str(s.id)))
    if at < primary.started_at or not primary.time_zone or primary.time_zone == "UTC":
        return None
    return str(primary.time_zone)


@handles("hold.place")
def place_hold(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> dict[str, Any]:
    account = account_of(batch, command.tenant)
    hold = payload.uuid(command, "hold_id")
    account.place_hold(
        hold_id=hold,
        unit=declared_unit(batch, account, payload.optional_text(command, "unit")),
        amount=payload.subunits(command, "amount"),
        meter=payload.optional_text(command, "meter"),
        expires_at=payload.timestamp(command, "expires_at"),
        at=payload.timestamp(command, "at", default=command.issued_at),
        by=command.issued_by or None,
    )
    return account.hold(hold)


@handles("hold.capture")
def capture_hold(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> dict[str, Any]:
    account = account_of(batch, command.tenant)
    hold = payload.uuid(command, "hold_id")
    at = payload.timestamp(command, "at", default=command.issued_at)
    account.capture_hold(hold_id=hold, amount=payload.subunits(command, "amount"), at=at,
                         allow_overage=payload.flag(command, "allow_overage"),
                         time_zone=billing_time_zone(batch, command.tenant, at), by=command.issued_by or None)
    return account.hold(hold)


@handles("hold.release")
def release_hold(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> dict[str, Any]:
    account = account_of(batch, command.tenant)
    hold = payload.uuid(command, "hold_id")
    account.release_hold(hold_id=hold, at=payload.timestamp(command, "at", default=command.issued_at),
                         by=command.issued_by or None)
    return account.hold(hold)

"""Ledger commands of holds (two-phase spending): ``hold.place``, ``hold.capture``, ``hold.release``.

The HTTP routes apply these directly (one-command transactions, a synchronous answer); other services may
send the same kinds over ``billing.ledger.commands``. Each handler returns the hold as it stands after the
command, which is what the HTTP answer shows.
"""

from __future__ import annotations

from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from billing_events.messages import LedgerCommand
from billing_ledger import payload
from billing_ledger.account_commands import account_of
from billing_ledger.application import LedgerApplication, _Batch, handles


def hold_id(tenant: str, idempotency_key: str) -> UUID:
    """A hold's id from the caller's idempotency key: a retried request names the same hold."""
    return uuid5(NAMESPACE_URL, f"/accounts/{tenant}/holds/{idempotency_key}")


@handles("hold.place")
def place_hold(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> dict[str, Any]:
    account = account_of(batch, command.tenant)
    hold = payload.uuid(command, "hold_id")
    account.place_hold(
        hold_id=hold,
        unit=payload.optional_text(command, "unit") or account.currency,
        amount=payload.subunits(command, "amount"),
        meter=payload.optional_text(command, "meter"),
        expires_at=payload.timestamp(command, "expires_at"),
        at=payload.timestamp(command, "at", default=command.issued_at),
    )
    return account.hold(hold)


@handles("hold.capture")
def capture_hold(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> dict[str, Any]:
    account = account_of(batch, command.tenant)
    hold = payload.uuid(command, "hold_id")
    account.capture_hold(hold_id=hold, amount=payload.subunits(command, "amount"),
                         at=payload.timestamp(command, "at", default=command.issued_at),
                         allow_overage=payload.flag(command, "allow_overage"))
    return account.hold(hold)


@handles("hold.release")
def release_hold(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> dict[str, Any]:
    account = account_of(batch, command.tenant)
    hold = payload.uuid(command, "hold_id")
    account.release_hold(hold_id=hold, at=payload.timestamp(command, "at", default=command.issued_at))
    return account.hold(hold)

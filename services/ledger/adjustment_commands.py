"""Manual balance corrections by admin or finance: ``balance.adjust`` (reason required, user recorded)."""

from __future__ import annotations

from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from billing_events.messages import LedgerCommand
from billing_ledger import payload
from billing_ledger.account_commands import account_of, declared_unit
from billing_ledger.application import LedgerApplication, _Batch, handles


def adjustment_id(tenant: str, idempotency_key: str) -> UUID:
    """A positive adjustment becomes a grant with this id, so a retried request cannot add credit twice."""
    return uuid5(NAMESPACE_URL, f"/accounts/{tenant}/adjustments/{idempotency_key}")


@handles("balance.adjust")
def adjust_balance(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> dict[str, Any]:
    account = account_of(batch, command.tenant)
    amount = payload.subunits(command, "amount", allow_negative=True)
    unit = payload.optional_text(command, "unit")
    # Credit may be added in a declared unit only; taking it away needs none (a type since dropped from the catalogue
    # can still be emptied), and cannot make a wallet: nothing is available in a unit the account never had.
    unit = declared_unit(batch, account, unit) if amount > 0 else unit or account.currency
    adjustment = payload.uuid(command, "adjustment_id")
    account.adjust(adjustment_id=adjustment, unit=unit, amount=amount,
                   reason=payload.text(command, "reason"), user=payload.text(command, "user", default=command.issued_by),
                   at=payload.timestamp(command, "at", default=command.issued_at))
    return {"adjustment_id": str(adjustment), **(account.adjustment(adjustment) or {})}

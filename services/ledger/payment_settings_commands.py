"""Account payment settings that had no command of their own: the low-balance alert threshold and clearing
the auto-top-up rule (``auto_top_up.set`` lives in checkout_commands). Registered on import by checkout_http.
"""

from __future__ import annotations

from typing import Any

from billing_events.messages import LedgerCommand
from billing_ledger.account_commands import account_of, declared_unit, minor_amount
from billing_ledger.application import LedgerApplication, _Batch, handles


@handles("low_balance.set")
def set_low_balance(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> dict[str, Any]:
    """Alerts once when the available balance of ``unit`` drops below ``threshold``; null removes the alert."""
    account = account_of(batch, command.tenant)
    p = command.payload
    raw = p.get("threshold")
    if raw is None:  # removing an alert needs no declared unit (its credit type may have left the catalogue since)
        unit, threshold = str(p.get("unit") or account.currency), None
    else:  # in a declared unit, in whole minor units of it (5.0000000001 USD was taken)
        unit = declared_unit(batch, account, str(p["unit"]) if p.get("unit") else None)
        threshold = minor_amount(batch, unit, "threshold", raw, "invalid_low_balance")
    account.set_low_balance_threshold(unit, threshold)
    return {"unit": unit, "threshold": None if raw is None else str(raw)}


@handles("auto_top_up.clear")
def clear_auto_top_up(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> dict[str, Any]:
    account = account_of(batch, command.tenant)
    unit = str(command.payload.get("unit") or account.currency)
    account.clear_auto_top_up(unit)
    return {"unit": unit, "cleared": True}

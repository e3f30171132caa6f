"""Account payment settings that had no command of their own: the low-balance alert threshold and clearing
the auto-top-up rule (``auto_top_up.set`` lives in checkout_commands). Registered on import by checkout_http.
"""

from __future__ import annotations

from typing import Any

from billing_events.messages import LedgerCommand
from billing_events.money import MoneyError, parse_decimal, to_subunits
from billing_ledger.account_commands import account_of
from billing_ledger.application import CommandRejected, LedgerApplication, _Batch, handles


@handles("low_balance.set")
def set_low_balance(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> dict[str, Any]:
    """Alerts once when the available balance of ``unit`` drops below ``threshold``; null removes the alert."""
    account = account_of(batch, command.tenant)
    p = command.payload
    unit = str(p.get("unit") or account.currency)
    raw = p.get("threshold")
    try:
        threshold = to_subunits(parse_decimal(raw, field="threshold")) if raw is not None else None
    except (MoneyError, ValueError) as exc:
        raise CommandRejected("invalid_low_balance", str(exc)) from exc
    account.set_low_balance_threshold(unit, threshold)
    return {"unit": unit, "threshold": None if raw is None else str(raw)}


@handles("auto_top_up.clear")
def clear_auto_top_up(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> dict[str, Any]:
    account = account_of(batch, command.tenant)
    unit = str(command.payload.get("unit") or account.currency)
    account.clear_auto_top_up(unit)
    return {"unit": unit, "cleared": True}

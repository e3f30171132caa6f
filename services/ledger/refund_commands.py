"""Refunds of paid credit: ``grant.refund`` (refused for spent credit unless finance overrides)."""

from __future__ import annotations

from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from billing_events.messages import LedgerCommand
from billing_events.money import billed_step, currency, from_subunits, is_currency_code, minor_subunits
from billing_ledger import payload
from billing_ledger.account_commands import account_of
from billing_ledger.application import CommandRejected, LedgerApplication, _Batch, handles
from billing_ledger.domain.account import BillingAccount


def refund_id(tenant: str, idempotency_key: str) -> UUID:
    return uuid5(NAMESPACE_URL, f"/accounts/{tenant}/refunds/{idempotency_key}")


@handles("grant.refund")
def refund_grant(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> dict[str, Any]:
    account = account_of(batch, command.tenant)
    grant = payload.uuid(command, "grant_id")
    refund = payload.uuid(command, "refund_id")
    cause = {"reason": payload.text(command, "reason"), "requested_by": command.issued_by,
             "command_id": str(command.command_id)}
    amount = payload.subunits(command, "amount")
    unit = next((g["unit"] for g in account.grant_balances() if g["grant_id"] == str(grant)), None)
    if unit is not None and is_currency_code(unit):
        # Credit in the currency is paid back as money: in what a gateway pays back (its tax share is floored to
        # it too: ``refund_grant``): whole minor units, ten fils of a three-decimal currency (``billed_scale``).
        money = currency(unit)
        if amount % minor_subunits(money):
            raise CommandRejected(payload.INVALID, f"amount {from_subunits(amount)} {unit} is finer than the "
                                                   f"currency is paid back in ({billed_step(money)} {unit}): money "
                                                   "is paid back in whole minor units")
    account.refund_grant(grant_id=grant, amount=amount, refund_id=refund,
                         at=payload.timestamp(command, "at", default=command.issued_at),
                         finance_override=payload.flag(command, "finance_override"), cause=cause)
    # The refund event (a low-balance alert may follow it in the same command).
    event = next(e for e in reversed(account.pending_events) if isinstance(e, BillingAccount.GrantRefunded))
    return {"refund_id": str(refund), "grant_id": str(grant), "unit": event.unit, "amount": event.amount,
            "tax_amount": event.tax_amount, "from_wallet": event.from_wallet, "from_breakage": event.from_breakage,
            "from_adjustment": event.from_adjustment, "from_revenue": event.from_revenue, "paid_back": _paid_back(account, event)}


def _paid_back(account: BillingAccount, event: BillingAccount.GrantRefunded) -> dict[str, Any] | None:
    """The money the refund takes out of the gateway's clearing, for finance to pay back through the gateway:
    credit in the currency with its share of the tax (``refund_grant``), or a credit-unit package's share of the
    money booked for it (``PurchaseMoneyRefunded``); None for credit with no money booked."""
    money = next((e for e in account.pending_events if isinstance(e, BillingAccount.PurchaseMoneyRefunded)
                  and e.refund_id == event.refund_id), None)
    if money is not None:
        return {"unit": money.unit, "amount": money.amount, "tax_amount": money.tax_amount}
    if is_currency_code(event.unit):
        return {"unit": event.unit, "amount": event.amount + event.tax_amount, "tax_amount": event.tax_amount}
    return None

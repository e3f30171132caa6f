"""Refunds of paid credit: ``grant.refund`` (refused for spent credit unless finance overrides)."""

from __future__ import annotations

from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from billing_events.messages import LedgerCommand
from billing_events.money import billed_step, currency, from_subunits, is_currency_code, minor_subunits
from billing_ledger import payload, refund_request_commands
from billing_ledger.account_commands import account_of
from billing_ledger.application import CommandRejected, LedgerApplication, _Batch, handles


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
    at = payload.timestamp(command, "at", default=command.issued_at)
    account.refund_grant(grant_id=grant, amount=amount, refund_id=refund, at=at,
                         finance_override=payload.flag(command, "finance_override"), cause=cause)
    # The purchase grant of a top-up order: the money and tax paid back are documented by a credit note of its
    # invoice, in the same transaction (before session 14 a partial refund had none: the documents kept declaring
    # the whole VAT the books had given back in part).
    note = refund_request_commands.document_grant_refund(app, batch, account, grant, refund, at, command.issued_by)
    # What the account remembers of it (``BillingAccount.refund``): the answer to this command and to its retries,
    # which find its credit note by its id (``grant_refund_note_id``).
    return {"refund_id": str(refund), **(account.refund(refund) or {}),
            "credit_note": refund_request_commands.note_reference(note)}

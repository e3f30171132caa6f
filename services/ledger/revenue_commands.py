"""Revenue recognition of one account: ``money.recognise``.

Recognises the currency money of credit packages granted in a credit unit as far as their credit was
consumed or lapsed (``BillingAccount.recognise_purchase_money``): one ``PurchaseMoneyRecognised`` for the
grants whose use changed since their last run, none if nothing did; and the subscription fees billed in advance
ratably over their service period up to the start of ``now``'s UTC day, or their period's end once reached
(``BillingAccount.recognise_fee_revenue``): one ``FeeRevenueRecognised`` per UTC day with something due, dated in
that day (the first run of Nov 1 records Oct 31's share on Oct 31), none if nothing is. Idempotent by construction:
a second run (another ledger process, a redelivery, an overlapping sweep) at the same ``now`` finds the books
already there and records no movement. The sweeper (:mod:`billing_ledger.sweeper`) sends it when
``purchase_money_due`` or ``fee_revenue_days_due``; anyone may.
"""

from __future__ import annotations

from typing import Any

from billing_events.messages import LedgerCommand
from billing_ledger import payload
from billing_ledger.account_commands import account_of
from billing_ledger.application import LedgerApplication, _Batch, handles


@handles("money.recognise")
def recognise_purchase_money(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> dict[str, Any]:
    account = account_of(batch, command.tenant)
    before = len(account.pending_events)
    now = payload.timestamp(command, "now", default=command.issued_at)
    account.recognise_purchase_money(now)
    account.recognise_fee_revenue(now)
    return {"events": len(account.pending_events) - before}

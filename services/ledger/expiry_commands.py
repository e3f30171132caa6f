"""Expiry sweeps of one account: ``grant.expire`` and ``hold.expire``.

``grant.expire`` also sets aside the plan credits whose period has ended (``GrantSetAside``, out of ``available``;
see ``BillingAccount.expire_grants``). Both are idempotent by construction: an expired grant or hold is closed by the
event that expires it, and a grant set aside is marked so by its event, so a second sweep (another ledger process,
a redelivery, an overlapping round) finds nothing left to do and records no movement. The sweeper
(:mod:`billing_ledger.sweeper`) sends them; anyone may.
"""

from __future__ import annotations

from typing import Any

from billing_events.messages import LedgerCommand
from billing_ledger import payload
from billing_ledger.account_commands import account_of
from billing_ledger.application import LedgerApplication, _Batch, handles


@handles("grant.expire")
def expire_grants(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> dict[str, Any]:
    account = account_of(batch, command.tenant)
    before = len(account.pending_events)
    account.expire_grants(payload.timestamp(command, "now"))
    return {"events": len(account.pending_events) - before}


@handles("hold.expire")
def expire_holds(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> dict[str, Any]:
    account = account_of(batch, command.tenant)
    before = len(account.pending_events)
    limit = command.payload.get("limit")  # the sweeper splits a mass expiry (see sweeper._chunks)
    account.expire_holds(payload.timestamp(command, "now"), limit)
    return {"events": len(account.pending_events) - before}

"""A subscription invoice of 0.00 that shows something (usage paid with credit) is settled as it is issued: on the
real ledger and rating wired by hand (``test_cancel_after_period_end.Stack``). Before session 14 it stayed
``finalized`` (open) forever: listed as owed, followed by dunning, never closed."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from billing_ledger.audit import verify_store
from billing_ledger.dunning import Dunning

from tests.unit.subscriptions.test_cancel_after_period_end import CATALOG, DEC_1, NOV_1, Stack, wired_stack


async def settle(stack: Stack) -> None:
    for _ in range(3):  # the ledger's events to rating, rating's commands (close, usage lines) to the ledger
        await stack.relay()
        await stack.deliver()


async def test_a_final_invoice_paid_with_credit_is_settled_at_once_and_never_dunned(tmp_path: Path) -> None:
    """Team at 31.00 with 100 calls included, 20.00 of credit granted, 250 calls on Nov 20 (15.00 beyond the
    allowance, all paid with that credit), canceled at the period's end: the final invoice bills 15.00 of calls and
    "Prepaid credits applied -15.00", 0.00. It is paid (by nothing) when it is issued; dunning never sees it open."""
    async with wired_stack(tmp_path, CATALOG) as stack:
        stack.run("subscription.create", NOV_1, key="m", plan="team")
        stack.run("credit.grant", NOV_1, grant_key="gift", unit="USD", amount="20", source="manual")
        await settle(stack)
        await stack.use("nov", "250", datetime(2026, 11, 20, tzinfo=UTC))
        stack.run("subscription.cancel", datetime(2026, 11, 25, tzinfo=UTC), key="m")  # at the period's end
        stack.run("subscription.tick", DEC_1, key="m")
        await settle(stack)
        assert all(r.outcome in ("applied", "duplicate") for r in stack.results), stack.results
        final = stack.invoice(DEC_1.isoformat())
        assert [(x["kind"], x["amount"]) for x in final.lines] == [("usage", "15.00"), ("credits_applied", "-15.00")]
        assert (final.number, final.total) == ("INV-2026-000002", Decimal("0.00"))
        assert (final.status, final.payment) == ("paid", "nothing_due")
        # The first invoice (31.00, unpaid) is still owed and dunned; the 0.00 one is not among the open ones.
        dunning = Dunning(stack.ledger, {}, None, (0, 3, 5), now=lambda: datetime(2026, 12, 2, tzinfo=UTC))
        dunning._scan()
        assert set(dunning.open) == {stack.invoice(NOV_1.isoformat()).id}
        assert verify_store(stack.ledger, "acme").ok

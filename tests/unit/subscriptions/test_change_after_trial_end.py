"""A plan or quantity change issued after a trial's end, before the scheduler's tick ended the trial: the real ledger
and rating wired by hand (``test_cancel_after_period_end.Stack``). The change ends the trial first, as the tick and
an immediate cancel do (``_end_trial``), then prorates against the converted paid period."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from uuid import uuid4

from billing_events.messages import LedgerCommand
from billing_ledger.domain.subscription import subscription_id

from tests.unit.subscriptions.test_cancel_after_period_end import Stack
from tests.unit.subscriptions.test_cancel_after_trial_end import NOV_11, NOV_15, owed, settle

DEC_11 = datetime(2026, 12, 11, tzinfo=UTC)


def fees(stack: Stack) -> dict[str, Decimal]:
    """The finalized documents' totals without usage (fees, prorations, their tax), by key."""
    return {key: sum((Decimal(item["amount"]) for item in invoice.lines if item["kind"] != "usage"), Decimal(0))
            for key, invoice in stack.invoices().items() if invoice.status == "finalized"}


async def test_an_upgrade_after_the_trial_end_converts_first_and_prorates_against_the_paid_period(
        converting: Stack) -> None:
    """Trial Nov 1 - Nov 11, 31.00 a month; the tick for Nov 11 has not run when the quantity goes to 2 on Nov 15.
    The trial converts at its end first (Nov 11 - Dec 11 at 31.00), then the change credits the 26 unused days
    (26.87) and charges them at 62.00 (53.73). Before, the change was taken as a trial's (no proration) and the late
    tick billed 62.00 for the whole period, the 4 days before the upgrade included (4.13 too much)."""
    result = converting.run("subscription.change", NOV_15, key="m", quantity=2)
    assert [item["amount"] for item in result.value["lines"]] == ["-26.87", "53.73"]
    assert converting.run("subscription.tick", NOV_15, key="m").value == {"transition": None}  # converted already
    await settle(converting)
    first = converting.invoice(NOV_11.isoformat())
    assert (first.status, first.period_start, first.period_end, first.total) == (
        "finalized", NOV_11, DEC_11, Decimal("31.00"))
    assert sorted(fees(converting).values()) == [Decimal("26.86"), Decimal("31.00")]
    # 31.00 - 26.87 + 53.73 of fees, and the calls since Nov 11 priced as they came (15.00, billed at renewal).
    assert owed(converting) == Decimal("57.86") + Decimal("15.00")
    sub = converting.ledger.repository.get(subscription_id("acme", "m"))
    assert (sub.status, sub.quantity, sub.period_start, sub.period_end) == ("active", 2, NOV_11, DEC_11)

    # Rating rated the usage since the trial's end into the converted period: the renewal bills it once.
    converting.run("subscription.tick", DEC_11, key="m")
    await settle(converting)
    renewal = converting.invoice(DEC_11.isoformat())
    usage = {item["meter"]: item["amount"] for item in renewal.lines if item["kind"] == "usage"}
    assert usage == {"api_calls": "15.00", "storage_gb": "5.00"}, renewal.lines


async def test_without_a_payment_method_a_change_after_the_trial_end_is_refused_and_changes_nothing(
        unconverted: Stack) -> None:
    command = LedgerCommand(command_id=uuid4(), kind="subscription.change", tenant="acme", issued_at=NOV_15,
                            issued_by="user:test", payload={"at": NOV_15.isoformat(), "key": "m", "quantity": 2})
    [refused] = unconverted.ledger.apply_commands([command])
    assert (refused.outcome, refused.reason) == ("rejected", "invalid_transition"), refused
    assert "ended with its trial" in (refused.detail or "")
    sub = unconverted.ledger.repository.get(subscription_id("acme", "m"))
    assert (sub.status, sub.quantity) == ("trialing", 1)  # the tick ends it, unconverted, as before
    assert unconverted.run("subscription.tick", NOV_15, key="m").value == {"transition": "trial_ended"}

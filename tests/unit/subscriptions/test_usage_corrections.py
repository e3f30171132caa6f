"""A correction of usage already invoiced, as the real rating service sends it (SQLite ledger and rating wired by
hand, see ``test_cancel_after_period_end``): a credit note against the invoice that billed it."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from billing_events import ids
from billing_events.messages import AcceptedUsage, UsageEvent
from billing_events.topics import USAGE_ACCEPTED
from billing_runtime.bus import Record

from tests.unit.subscriptions import test_cancel_after_period_end as wiring
from tests.unit.subscriptions.test_cancel_after_period_end import DEC_1, JAN_1, Stack, usage_money

stack = wiring.stack  # the ledger and rating wired by hand (that module's fixture)


async def test_a_correction_rating_rates_after_the_invoice_is_credited_against_that_invoice(stack: Stack) -> None:
    await stack.use("nov", "250", datetime(2026, 11, 20, tzinfo=UTC))  # 100 included, 150 x 0.10 = 15.00
    stack.run("subscription.tick", DEC_1, key="m")
    await stack.relay()  # rating closes November
    await stack.deliver()  # its usage lines finalize the renewal
    renewal = stack.invoice(DEC_1.isoformat())
    assert (renewal.status, renewal.total) == ("finalized", Decimal("46.00"))  # 31.00 + 15.00
    await stack.use("dec", "150", datetime(2026, 12, 5, tzinfo=UTC))  # December's overage: 5.00
    # November's event corrected from 250 to 240 calls: rating prices it late, on November's total, naming it.
    event = UsageEvent(id="nov-fix", tenant="acme", meter="api_calls", quantity="240",
                       timestamp=datetime(2026, 11, 20, tzinfo=UTC), correction_of="nov")
    message = AcceptedUsage(account_id=ids.account_id("acme"), event=event, accepted_at=datetime(2026, 12, 6, tzinfo=UTC),
                            source="test", catalog_version=1)
    await stack.rating.handle_accepted([Record(USAGE_ACCEPTED, 0, 1, None, message.to_json())])
    await stack.deliver()
    assert all(r.outcome == "applied" for r in stack.results), stack.results
    [note] = [i for i in stack.invoices().values() if "/usage-correction/" in i.key]
    assert (note.document_type, note.total, note.related_invoice) == ("credit_note", Decimal("-1.00"), str(renewal.id))
    account = stack.ledger.repository.get(ids.account_id("acme"))
    assert account.available("USD") == 100 * 10**7  # 1.00 of account credit
    assert sum(account.unbilled_overage("USD").values()) == 500 * 10**7  # December's 5.00 still to bill


async def correct(stack: Stack, event_id: str, of: str, calls: str, received: datetime) -> None:
    """A correction of ``of`` (a November 20 event) to ``calls``, rated as it arrives, and its commands delivered."""
    event = UsageEvent(id=event_id, tenant="acme", meter="api_calls", quantity=calls,
                       timestamp=datetime(2026, 11, 20, tzinfo=UTC), correction_of=of)
    message = AcceptedUsage(account_id=ids.account_id("acme"), event=event, accepted_at=received, source="test",
                            catalog_version=1)
    await stack.rating.handle_accepted([Record(USAGE_ACCEPTED, 0, 1, None, message.to_json())])
    await stack.deliver()


def credited(stack: Stack) -> list[Decimal]:
    return [i.total for i in stack.invoices().values() if "/usage-correction/" in i.key]


async def test_a_correction_after_the_renewal_with_no_new_usage_is_credited_not_a_stopped_partition(
        stack: Stack) -> None:
    await stack.use("nov", "250", datetime(2026, 11, 20, tzinfo=UTC))  # 15.00 on the Dec 1 renewal
    stack.run("subscription.tick", DEC_1, key="m")
    await stack.relay()
    await stack.deliver()
    # Dec 5, no December usage yet: 150 calls really (5.00). Rating raised here, so the bus retried forever.
    await correct(stack, "nov-fix", "nov", "150", datetime(2026, 12, 5, tzinfo=UTC))
    assert all(r.outcome == "applied" for r in stack.results), stack.results
    assert credited(stack) == [Decimal("-10.00")]
    stack.run("subscription.tick", JAN_1, key="m")
    await stack.relay()
    await stack.deliver()
    january = stack.invoice(JAN_1.isoformat())
    assert (january.total, usage_money(january)) == (Decimal("31.00"), Decimal(0))
    # November's usage, all documents together: 15.00 billed, 10.00 credited.
    assert usage_money(stack.invoice(DEC_1.isoformat())) + sum(credited(stack)) == Decimal("5.00")


async def test_a_correction_after_the_renewal_credits_at_novembers_margin_and_decembers_usage_stays_billed(
        stack: Stack) -> None:
    await stack.use("nov", "250", datetime(2026, 11, 20, tzinfo=UTC))  # 15.00 on the Dec 1 renewal
    stack.run("subscription.tick", DEC_1, key="m")
    await stack.relay()
    await stack.deliver()
    await stack.use("dec", "130", datetime(2026, 12, 3, tzinfo=UTC))  # December's own 3.00
    # Corrected to 150 (5.00: 10.00 back, as before the close), then to 120 (2.00: 3.00 more back).
    await correct(stack, "nov-fix", "nov", "150", datetime(2026, 12, 5, tzinfo=UTC))
    await correct(stack, "nov-fix-2", "nov", "120", datetime(2026, 12, 6, tzinfo=UTC))
    assert all(r.outcome == "applied" for r in stack.results), stack.results
    assert credited(stack) == [Decimal("-10.00"), Decimal("-3.00")]
    stack.run("subscription.tick", JAN_1, key="m")
    await stack.relay()
    await stack.deliver()
    january = stack.invoice(JAN_1.isoformat())
    # December's 130 calls, 3.00, and nothing else (it billed 3.00 as overage next to "30 unit 0.00").
    assert [(i["kind"], i["amount"]) for i in january.lines if i["kind"] != "base_fee"] == [("usage", "3.00")]
    usage = usage_money(stack.invoice(DEC_1.isoformat())) + usage_money(january) + sum(credited(stack))
    assert usage == Decimal("2.00") + Decimal("3.00")


@pytest.mark.parametrize(("minimum", "notes"), [("20.00", []), ("10.00", [Decimal("-5.00")])])
async def test_a_correction_never_credits_below_the_periods_minimum_spend(
        tmp_path: Path, minimum: str, notes: list[Decimal]) -> None:
    catalog = copy.deepcopy(wiring.CATALOG)
    catalog["plans"][0]["minimum_spend"] = minimum
    async with wiring.wired_stack(tmp_path, catalog) as wired:
        wired.run("subscription.create", wiring.NOV_1, key="m", plan="team")
        await wired.relay()
        await wired.use("nov", "250", datetime(2026, 11, 20, tzinfo=UTC))  # 15.00 of usage in November
        wired.run("subscription.tick", DEC_1, key="m")
        await wired.relay()
        await wired.deliver()
        renewal = wired.invoice(DEC_1.isoformat())
        # Corrected to 150 calls: 5.00 of usage, so the period owes its minimum. 20.00: the renewal billed 15.00 and
        # a 5.00 minimum commitment, 20.00 owed either way (it credited 10.00). 10.00: 5.00 above it (not 10.00).
        await correct(wired, "nov-fix", "nov", "150", datetime(2026, 12, 5, tzinfo=UTC))
        assert all(r.outcome == "applied" for r in wired.results), wired.results
        assert credited(wired) == notes
        usage = sum((Decimal(i["amount"]) for i in renewal.lines if i["kind"] in ("usage", "minimum_commitment")),
                    Decimal(0))
        assert usage + sum(notes, Decimal(0)) == Decimal(minimum)  # what the period's usage costs in all
        account = wired.ledger.repository.get(ids.account_id("acme"))
        assert account.available("USD") == -sum(notes, Decimal(0)) * 10**9  # and no credit besides

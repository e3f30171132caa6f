"""A correction of usage already invoiced, as the real rating service sends it (SQLite ledger and rating wired by
hand, see ``test_cancel_after_period_end``): a credit note against the invoice that billed it."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from billing_events import ids
from billing_events.messages import AcceptedUsage, UsageEvent
from billing_events.topics import USAGE_ACCEPTED
from billing_ledger.audit import verify_store
from billing_runtime.bus import Record

from tests.unit.subscriptions import test_cancel_after_period_end as wiring
from tests.unit.subscriptions.test_cancel_after_period_end import DEC_1, JAN_1, Stack, usage_money

stack = wiring.stack  # the ledger and rating wired by hand (that module's fixture)


async def november_renewed(stack: Stack) -> None:
    """250 calls on Nov 20 (100 included, 150 x 0.10 = 15.00), then the Dec 1 renewal: rating closes November and
    its usage lines finalize the renewal invoice (31.00 + 15.00)."""
    await stack.use("nov", "250", datetime(2026, 11, 20, tzinfo=UTC))
    stack.run("subscription.tick", DEC_1, key="m")
    await stack.relay()
    await stack.deliver()


async def test_a_correction_rating_rates_after_the_invoice_is_credited_against_that_invoice(stack: Stack) -> None:
    await november_renewed(stack)
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
    await november_renewed(stack)
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
    await november_renewed(stack)
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


@pytest.mark.parametrize(("used", "line", "corrected", "credit"), [
    ("250.05", "15.01", "100", "-15.01"),   # 15.005 billed 15.01 (half up), voided: 15.01 back, not 15.00
    ("250.04", "15.00", "100", "-15.00"),   # 15.004 billed 15.00: 15.00 back, not 15.00 and 0.004 of credit more
    ("250.05", "15.01", "150.05", "-10.00"),  # 15.005 -> 5.005: billed 15.01, 5.01 left billed
])
async def test_a_correction_credits_what_the_invoice_line_charged_rounded_as_the_line_was(
        stack: Stack, used: str, line: str, corrected: str, credit: str) -> None:
    # Audit: the note credited the corrected usage rounded down and gave the sub-cent rest back as credit, so the
    # invoice less its note did not bill the corrected usage to the cent (15.01 - 15.00 = 0.01 for no usage).
    await stack.use("nov", used, datetime(2026, 11, 20, tzinfo=UTC))
    stack.run("subscription.tick", DEC_1, key="m")
    await stack.relay()
    await stack.deliver()
    renewal = stack.invoice(DEC_1.isoformat())
    assert usage_money(renewal) == Decimal(line)
    await correct(stack, "nov-fix", "nov", corrected, datetime(2026, 12, 5, tzinfo=UTC))
    assert all(r.outcome == "applied" for r in stack.results), stack.results
    assert credited(stack) == [Decimal(credit)]
    # The invoice less its note bills the corrected usage as its line would: 0.00, or 5.005 as 5.01.
    usage_left = max(Decimal(corrected) - 100, Decimal(0)) * Decimal("0.10")
    assert usage_money(renewal) + sum(credited(stack)) == usage_left.quantize(Decimal("0.01"), rounding="ROUND_HALF_UP")
    account = stack.ledger.repository.get(ids.account_id("acme"))
    # The customer's credit is the note's and nothing more (no sub-cent rest given back on top of it).
    assert account.available("USD") == -Decimal(credit) * 10**9
    assert verify_store(stack.ledger, "acme").ok


@contextlib.asynccontextmanager
async def november_billed(tmp_path: Path, minimum: str) -> AsyncIterator[Stack]:
    """A team plan with ``minimum`` spend, 250 calls in November (15.00), billed on the Dec 1 renewal."""
    catalog = copy.deepcopy(wiring.CATALOG)
    catalog["plans"][0]["minimum_spend"] = minimum
    async with wiring.wired_stack(tmp_path, catalog) as wired:
        wired.run("subscription.create", wiring.NOV_1, key="m", plan="team")
        await wired.relay()
        await wired.use("nov", "250", datetime(2026, 11, 20, tzinfo=UTC))  # 15.00 of usage in November
        wired.run("subscription.tick", DEC_1, key="m")
        await wired.relay()
        await wired.deliver()
        yield wired


@pytest.mark.parametrize(("minimum", "notes"), [("20.00", []), ("10.00", [Decimal("-5.00")])])
async def test_a_correction_never_credits_below_the_periods_minimum_spend(
        tmp_path: Path, minimum: str, notes: list[Decimal]) -> None:
    async with november_billed(tmp_path, minimum) as wired:
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


def november_charge(stack: Stack) -> Decimal:
    """What November's usage costs in all: the Dec 1 renewal's usage and minimum commitment, the overage of earlier
    periods later invoices bill (and the commitment they net from it), the correction notes."""
    total = Decimal(0)
    for document in stack.invoices().values():
        for item in document.lines:
            if document.key.endswith(DEC_1.isoformat()) and item["kind"] in ("usage", "minimum_commitment") \
                    or item["kind"] in ("overage", "usage_correction") or item.get("earlier_periods"):
                total += Decimal(item["amount"])
    return total


async def test_a_late_increase_of_a_period_billed_with_a_minimum_commitment_is_charged_once(tmp_path: Path) -> None:
    async with november_billed(tmp_path, "20.00") as wired:
        assert november_charge(wired) == Decimal("20.00")  # 15.00 + a 5.00 minimum commitment
        # Raised to 350 calls (25.00): January bills the 10.00 more, less the 5.00 commitment that already paid for
        # it (30.00 before: the commitment and the usage it stood for, both).
        await correct(wired, "nov-fix", "nov", "350", datetime(2026, 12, 5, tzinfo=UTC))
        wired.run("subscription.tick", JAN_1, key="m")
        await wired.relay()
        await wired.deliver()
        january = wired.invoice(JAN_1.isoformat())
        assert [(i["kind"], i["amount"]) for i in january.lines if i["kind"] != "base_fee"] == [
            ("overage", "10.00"), ("minimum_commitment", "-5.00"), ("minimum_commitment", "20.00")]  # December's
        assert november_charge(wired) == Decimal("25.00")
        # Lowered to 300 calls (20.00): 5.00 back (it took 10.00 below 25.00 before: January credited in full).
        await correct(wired, "nov-fix2", "nov", "300", datetime(2027, 1, 5, tzinfo=UTC))
        assert credited(wired) == [Decimal("-5.00")]
        assert november_charge(wired) == Decimal("20.00")
        # Lowered to 150 calls (5.00): the minimum, 20.00, is owed whatever the usage: nothing more back.
        await correct(wired, "nov-fix3", "nov", "150", datetime(2027, 1, 6, tzinfo=UTC))
        assert credited(wired) == [Decimal("-5.00")]
        assert november_charge(wired) == Decimal("20.00")
        assert all(r.outcome == "applied" for r in wired.results), wired.results
        # The books say the same: owed, every invoice's total; the account credit, the one note's.
        account = wired.ledger.repository.get(ids.account_id("acme"))
        totals = sum((i.total for i in wired.invoices().values() if i.document_type == "invoice"), Decimal(0))
        assert (account.receivable("USD"), account.available("USD")) == (totals * 10**9, 5 * 10**9)
        assert verify_store(wired.ledger, "acme").ok


async def test_a_period_raised_then_lowered_before_its_increase_is_invoiced_is_charged_its_usage(
        tmp_path: Path) -> None:
    catalog = copy.deepcopy(wiring.CATALOG)
    catalog["plans"][0]["minimum_spend"] = "20.00"
    async with wiring.wired_stack(tmp_path, catalog) as wired:
        wired.run("subscription.create", wiring.NOV_1, key="m", plan="team")
        await wired.relay()
        await wired.use("nov", "350", datetime(2026, 11, 20, tzinfo=UTC))  # 25.00: above the minimum
        wired.run("subscription.tick", DEC_1, key="m")
        await wired.relay()
        await wired.deliver()
        # Raised to 450 calls (35.00, not invoiced yet), then back to 350 (25.00) before the Jan 1 renewal: the
        # lowering credits the renewal down to the minimum (5.00 back) and the minimum covers the rest of the
        # increase, so January bills 5.00 of it, not 10.00 (November charged 30.00).
        await correct(wired, "nov-fix", "nov", "450", datetime(2026, 12, 5, tzinfo=UTC))
        await correct(wired, "nov-fix2", "nov", "350", datetime(2026, 12, 6, tzinfo=UTC))
        wired.run("subscription.tick", JAN_1, key="m")
        await wired.relay()
        await wired.deliver()
        assert all(r.outcome == "applied" for r in wired.results), wired.results
        assert credited(wired) == [Decimal("-5.00")]
        assert november_charge(wired) == Decimal("25.00")
        assert verify_store(wired.ledger, "acme").ok

"""Fee revenue schedules of the billing account (domain, in memory): subscription fees billed in advance are
deferred and recognised ratably over their service period; credit notes, voids and refunds take back what is
still deferred first. Invoices billed before fees were deferred stay recognised revenue and replay as recorded."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import NAMESPACE_URL, uuid5

from billing_ledger.domain.account import BillingAccount
from billing_ledger.domain.postings import LedgerAccount, account_balances, assert_balanced
from eventsourcing.application import Application
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

U = 10**9
USD = "USD"
T0 = datetime(2026, 11, 1, tzinfo=UTC)
DEFERRED, RECOGNISED = LedgerAccount.DEFERRED_REVENUE.value, LedgerAccount.RECOGNISED_REVENUE.value


def chart(account: BillingAccount, events: list[Any]) -> dict[str, int]:
    postings = [p for e in events for p in getattr(e, "postings", None) or []]
    return {a: v for (a, _), v in account_balances(postings).items() if v}


def test_an_invoice_billed_before_fees_were_deferred_replays_as_recorded_and_is_never_recognised_again() -> None:
    account = BillingAccount.open("acme", USD, opened_by="test")
    # As the old code recorded it: the fee straight to recognised revenue, no ``revenue`` on the event.
    account.bill_invoice(invoice="old", unit=USD, net=30 * U, tax=0, at=T0, cause={})
    [opened, billed] = account.collect_events()
    assert not getattr(billed, "revenue", None)
    if "revenue" in vars(billed):
        object.__delattr__(billed, "revenue")  # as recorded before the attribute existed
    replayed = billed.mutate(opened.mutate(None))
    assert replayed.invoice_billed("old") == {"unit": USD, "amount": 30 * U, "tax": 0}
    assert replayed.deferred_fees(USD) == 0 and not replayed.fee_revenue_days_due(T0 + timedelta(days=40))
    replayed.recognise_fee_revenue(T0 + timedelta(days=40))
    assert replayed.collect_events() == []  # nothing to recognise: it was revenue when billed
    # Its void takes the fee back from recognised revenue, as before.
    replayed.void_invoice_bill(invoice="old", at=T0 + timedelta(days=41), cause={})
    [voided] = replayed.collect_events()
    assert chart(replayed, [billed, voided]) == {}
    assert {p["account"] for p in voided.postings} == {RECOGNISED, LedgerAccount.RECEIVABLES.value}


def test_a_fee_without_a_future_period_is_revenue_at_once_and_a_zero_length_period_is_refused() -> None:
    account = BillingAccount.open("acme", USD, opened_by="test")
    account.bill_invoice(invoice="true-up", unit=USD, net=5 * U, tax=0, at=T0, cause={})  # a minimum-spend true-up
    try:
        account.bill_invoice(invoice="bad", unit=USD, net=5 * U, tax=0, at=T0, cause={},
                             deferred={"amount": 5 * U, "start": T0, "end": T0})
    except ValueError as exc:
        assert "before it starts" in str(exc)
    else:
        raise AssertionError("a service period that ends when it starts was accepted")
    assert chart(account, account.collect_events()) == {RECOGNISED: -5 * U, LedgerAccount.RECEIVABLES.value: 5 * U}


OCT_1 = datetime(2026, 10, 1, tzinfo=UTC)
NOV_1 = datetime(2026, 11, 1, tzinfo=UTC)
LAST_MICROSECOND = timedelta(microseconds=1)


def test_a_run_after_days_without_one_records_each_days_share_dated_in_that_day() -> None:
    account = BillingAccount.open("acme", USD, opened_by="test")
    account.bill_invoice(invoice="oct", unit=USD, net=31 * U, tax=0, at=OCT_1, cause={},
                         deferred={"amount": 31 * U, "start": OCT_1, "end": NOV_1})
    account.collect_events()
    assert account.fee_revenue_days_due(OCT_1 + timedelta(hours=23)) == 0  # Oct 1 is not over
    assert account.fee_revenue_days_due(NOV_1 - timedelta(days=3) + timedelta(hours=2)) == 28
    account.recognise_fee_revenue(NOV_1 - timedelta(days=3) + timedelta(hours=2))  # Oct 29 02:00: Oct 1-28
    runs = account.collect_events()
    assert [(e.at, e.amount) for e in runs] == [(OCT_1 + timedelta(days=d + 1) - LAST_MICROSECOND, U)
                                                 for d in range(28)]
    assert not account.fee_revenue_days_due(NOV_1 - timedelta(days=3) + timedelta(hours=23))
    account.recognise_fee_revenue(NOV_1 + timedelta(seconds=5))  # the first sweep of Nov 1: Oct 29-31, the end
    last = account.collect_events()
    assert [(e.at.isoformat(), e.amount) for e in last] == [
        ("2026-10-29T23:59:59.999999+00:00", U), ("2026-10-30T23:59:59.999999+00:00", U),
        ("2026-10-31T23:59:59.999999+00:00", U)]
    assert account.deferred_fees(USD) == 0 and account.fee_schedule("oct") is None


def test_a_run_recorded_before_runs_were_dated_by_day_replays_as_recorded_and_the_next_goes_on_from_it() -> None:
    account = BillingAccount.open("acme", USD, opened_by="test")
    account.bill_invoice(invoice="oct", unit=USD, net=31 * U, tax=0, at=OCT_1, cause={},
                         deferred={"amount": 31 * U, "start": OCT_1, "end": NOV_1})
    # As a run before session 15 recorded it: dated when it ran (Oct 31 00:00:30), recognised to then, no ``to``.
    old_run = NOV_1 - timedelta(days=1) + timedelta(seconds=30)
    due = 31 * U * ((old_run - OCT_1) // timedelta(seconds=1)) // (31 * 86400)
    account._fee_revenue_recognised(unit=USD, amount=due, schedules=[{"invoice": "oct", "amount": due}], postings=[
        {"account": DEFERRED, "unit": USD, "amount": due, "grant_id": None},
        {"account": RECOGNISED, "unit": USD, "amount": -due, "grant_id": None}], at=old_run)
    events = account.collect_events()
    replayed = None
    for e in events:
        replayed = e.mutate(replayed)
    assert replayed is not None and replayed.fee_schedule("oct")["recognised_to"] == old_run  # type: ignore[index]
    assert not replayed.fee_revenue_days_due(old_run + timedelta(hours=12))  # that day's run was done
    replayed.recognise_fee_revenue(NOV_1 + timedelta(seconds=5))
    [rest] = replayed.collect_events()
    # The rest of Oct 31 after that run, dated Oct 31: the fee ends exactly recognised, all of it in October.
    assert (rest.at, rest.amount, rest.schedules[0]["to"]) == (NOV_1 - LAST_MICROSECOND, 31 * U - due, NOV_1)
    assert replayed.deferred_fees(USD) == 0


# -- property: random bills, recognition runs, credit notes, voids and refunds -------------------------------

# A bill's period starts 0-3 days after the current time and lasts up to ~4.6 days; a run moves time on by up to
# 2 days, so runs land before, inside and after the periods.
bills = st.tuples(st.just("bill"), st.integers(1, 10**6), st.integers(0, 3), st.integers(1, 400_000))
runs = st.tuples(st.just("recognise"), st.integers(0, 2 * 86400))
credits = st.tuples(st.just("credit"), st.integers(0, 20), st.integers(0, 10**6), st.booleans())
voids = st.tuples(st.just("void"), st.integers(0, 20))
refunds = st.tuples(st.just("refund"), st.integers(0, 20), st.integers(1, 10**6), st.booleans())
operations = st.lists(st.one_of(bills, runs, credits, voids, refunds), min_size=1, max_size=40)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations)
def test_deferred_fees_never_go_negative_and_everything_billed_ends_recognised_or_given_back(
        ops: list[tuple[Any, ...]]) -> None:
    account = BillingAccount.open("acme", USD, opened_by="test")
    now = T0
    invoices: list[str] = []
    billed = given_back = 0
    for n, op in enumerate(ops):
        if op[0] == "bill":
            _, amount, start_days, seconds = op
            start = now + timedelta(days=start_days)
            invoice = f"inv-{n}"
            account.bill_invoice(invoice=invoice, unit=USD, net=amount * 1000, tax=0, at=now, cause={},
                                 deferred={"amount": amount * 1000, "start": start,
                                           "end": start + timedelta(seconds=seconds)})
            invoices.append(invoice)
            billed += amount * 1000
        elif op[0] == "recognise":
            now += timedelta(seconds=op[1])
            account.recognise_fee_revenue(now)
        elif not invoices:
            continue
        elif op[0] == "credit":  # a cancel's or change's credit for unused time, as account credit
            _, index, amount, close = op
            corrected = invoices[index % len(invoices)]
            account.credit_note_grant(grant_id=uuid5(NAMESPACE_URL, f"/notes/{n}"), note=f"cn-{n}", unit=USD,
                                      net=amount, tax=0, at=now, cause={},
                                      credits={"invoice": corrected, "amount": amount, "close": close})
            given_back += amount
        elif op[0] == "void":
            invoice = invoices[op[1] % len(invoices)]
            left = account.invoice_billed(invoice)
            account.void_invoice_bill(invoice=invoice, at=now, cause={})
            given_back += left["amount"] if left else 0
        else:
            _, index, amount, close = op
            account.refund_invoice_payment(note=f"re-{n}", unit=USD, amount=amount, tax=0, at=now, cause={},
                                           credits={"invoice": invoices[index % len(invoices)], "amount": amount,
                                                    "close": close})
            given_back += amount
        events = list(account.pending_events)
        for event in events:
            assert_balanced(getattr(event, "postings", None) or [])
            if type(event).__name__ == "FeeRevenueRecognised":
                # A day's share is dated in that UTC day: every schedule's ``to`` is in it (its end: the next
                # midnight, or the end of a period that ends that day, earlier than another's it was recorded with).
                day = datetime.combine(event.at.date(), datetime.min.time(), UTC)
                assert event.at == max(change["to"] for change in event.schedules) - timedelta(microseconds=1)
                for change in event.schedules:
                    assert day < change["to"] <= day + timedelta(days=1)
        books = chart(account, events)
        # The books' deferred revenue is the schedules' (a credit: never a debit balance), each schedule >= 0.
        assert -books.get(DEFERRED, 0) == account.deferred_fees(USD) >= 0
        for schedule in filter(None, map(account.fee_schedule, invoices)):
            assert schedule["deferred"] >= 0
            # Ratably, never ahead of time: what a schedule recognised (or gave back) by its last run is at most
            # its share of the period elapsed by then (a credit note only makes what is left smaller).
            elapsed = (schedule["recognised_to"] - schedule["start"]).total_seconds()
            period = (schedule["end"] - schedule["start"]).total_seconds()
            if schedule["deferred"] == schedule["amount"] or elapsed <= 0:
                continue
            assert (schedule["amount"] - schedule["deferred"]) * period <= schedule["amount"] * elapsed or any(
                op[0] in ("credit", "refund") for op in ops[:n + 1])
        # deferred + recognised - given back == billed
        assert -books.get(DEFERRED, 0) - books.get(RECOGNISED, 0) == billed - given_back
    # After the last period's end a run leaves nothing deferred, and a second run records nothing.
    end = now + timedelta(days=4, seconds=400_000)
    account.recognise_fee_revenue(end)
    assert account.deferred_fees(USD) == 0
    recorded = len(account.pending_events)
    account.recognise_fee_revenue(end)
    assert len(account.pending_events) == recorded
    # Replaying the events rebuilds the same account (schedules included).
    app: Application[Any] = Application()
    app.save(account)
    assert vars(app.repository.get(account.id)) == vars(account)

"""A plan credit with rollover is drawn only by usage of its own period: usage after the period's end that reaches
the ledger before a late tick waits for the next period's credit, as with a tick on time, and the renewal carries
(up to ``rollover_cap``) and lapses the ended period's credit left the same way, whether the expiry sweep or the
tick runs first (docs/subscriptions.md "Credits of a period ticked late"). SQLite ledger, real commands; the chart
of accounts is read from the account's events' postings."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from billing_ledger.application import LedgerApplication, persistence_env
from billing_ledger.audit import verify_store
from billing_ledger.domain.invoice import Invoice, invoice_id
from billing_ledger.domain.subscription import subscription_id
from billing_ledger.limits import RECURRING_CREDIT_LATE_USAGE_DAYS
from billing_ledger.sweeper import Sweeper

from tests.unit.subscriptions.test_included_credit_revenue import ROLLOVER, recognise, revenue, rollover_app
from tests.unit.subscriptions.test_invoice_books import account, books
from tests.unit.subscriptions.test_invoice_overage import debit, renew_and_bill, run, usage_line

U = 10**9
CENT = U // 100
NOV_1 = datetime(2026, 11, 1, tzinfo=UTC)
NOV_20 = datetime(2026, 11, 20, tzinfo=UTC)
DEC_1 = datetime(2026, 12, 1, tzinfo=UTC)
DEC_2 = datetime(2026, 12, 2, tzinfo=UTC)
DEC_3 = datetime(2026, 12, 3, tzinfo=UTC)
JAN_1 = datetime(2027, 1, 1, tzinfo=UTC)
# The Dec 1 tick on time; late, after December's first usage; late, the expiry sweep of Dec 1 run before it too.
TICKS = ["on_time", "late", "late_after_sweep"]
# How long after its period's end a plan credit's rest stays open for that period's late usage (then it lapses).
LAPSES = timedelta(days=RECURRING_CREDIT_LATE_USAGE_DAYS)


def lapse(app: LedgerApplication, now: datetime) -> None:
    """The expiry sweep alone at ``now`` (``grant.expire``): credit past its late usage window lapses."""
    run(app, "grant.expire", "acme", at=now, now=now.isoformat())


def _november(app: LedgerApplication, tick: str, december_usage: str = "3.00") -> None:
    """Team 30.00 with 10.00 USD included, rollover capped at 2.00: 4.00 used in November (6.00 left), then
    ``december_usage`` on Dec 2, rated into December, with the Dec 1 tick at ``tick``."""
    run(app, "subscription.create", "acme", key="m", plan="team")
    debit(app, "4.00", NOV_1, NOV_20)
    if tick == "on_time":
        renew_and_bill(app, NOV_1, DEC_1, [usage_line("4.00")])
        debit(app, december_usage, DEC_1, DEC_2)
        return
    if tick == "late_after_sweep":
        recognise(app, DEC_1)  # the sweeper at the period's end: grant.expire and money.recognise
    debit(app, december_usage, DEC_1, DEC_2)  # before the tick: the ledger has no December credit yet
    renew_and_bill(app, NOV_1, DEC_1, [usage_line("4.00")])


def _renew_first(app: LedgerApplication, command: str, at: datetime) -> None:
    """Ends the subscription's period by ``command`` (cancel at once, change or pause), which renews first."""
    if command == "cancel":
        run(app, "subscription.cancel", "acme", at=at, key="m", immediately=True)
    elif command == "change":
        run(app, "subscription.change", "acme", at=at, key="m", quantity=2)
    else:
        run(app, "subscription.pause", "acme", at=at, key="m")


def _lines(invoice: Invoice) -> list[tuple[str, str]]:
    return [(item["kind"], item["amount"]) for item in invoice.lines]


def _invoice(app: LedgerApplication, key: str) -> Invoice:
    return app.repository.get(invoice_id("acme", f"{subscription_id('acme', 'm')}/{key}"))  # type: ignore[no-any-return]


def _outcome(app: LedgerApplication) -> dict[str, Any]:
    """What the customer and the books see: the chart of accounts, credit left, each grant's state."""
    return {"books": books(app), "available": account(app).available("USD"),
            "receivable": account(app).receivable("USD"), "overage": account(app).overage_receivable("USD"),
            "grants": [(g["status"], g["amount"], g["remaining"]) for g in account(app).grant_balances()]}


@pytest.mark.parametrize("tick", TICKS)
def test_a_late_tick_pays_the_next_periods_usage_from_its_credit_and_lapses_the_rest_as_on_time(
        tmp_path: Path, tick: str) -> None:
    app = rollover_app(tmp_path)
    _november(app, tick)
    december = _invoice(app, DEC_1.isoformat())
    # December's 30.00 and November's 4.00 of usage paid by November's credit: nothing of December on it.
    assert _lines(december) == [("base_fee", "30.00"), ("usage", "4.00"), ("credits_applied", "-4.00")]
    # November's 6.00 left: 2.00 carried into December's 12.00, 4.00 set aside for November's late usage (lapsed
    # after its window); December's 3.00 from December's grant. Before, the late tick's December usage was drawn
    # from November's credit: 1.00 lapsed, 12.00 left.
    assert account(app).late_usage_reserve("USD") == 400 * CENT
    assert ("breakage", "USD") not in books(app)
    assert account(app).available("USD") == 900 * CENT
    assert account(app).grant_balances()[-1]["remaining"] == 900 * CENT
    assert account(app).receivable("USD") == 3000 * CENT + 3000 * CENT  # the two fees; no overage owed
    january = renew_and_bill(app, DEC_1, JAN_1, [usage_line("3.00")])
    assert _lines(january) == [("base_fee", "30.00"), ("usage", "3.00"), ("credits_applied", "-3.00")]
    recognise(app, JAN_1)
    lapse(app, JAN_1 + LAPSES)  # after November's and December's late usage windows
    # December's 9.00 left: 2.00 carried, 7.00 lapsed. November: 20.00 + 4.00 used; December 20.00 + 3.00 used.
    assert revenue(app) == (4700 * CENT, 1100 * CENT, 2000 * CENT)
    assert verify_store(app, "acme").ok
    app.close()


def test_the_late_tick_ends_with_the_books_and_credit_of_the_tick_on_time(tmp_path: Path) -> None:
    outcomes = {}
    for tick in TICKS:
        app = rollover_app(tmp_path / tick)
        _november(app, tick, december_usage="7.50")  # more than November's 6.00 left: all of it was drawn
        renew_and_bill(app, DEC_1, JAN_1, [usage_line("7.50")])
        recognise(app, JAN_1)
        outcomes[tick] = _outcome(app)
        app.close()
    assert outcomes["late"] == outcomes["on_time"]
    assert outcomes["late_after_sweep"] == outcomes["on_time"]
    # December's 12.00 (10.00 + 2.00 carried) paid its 7.50: 4.50 left, 2.00 carried into January.
    assert outcomes["on_time"]["available"] == 1200 * CENT


@pytest.mark.parametrize("command", ["cancel", "change", "pause"])
def test_a_command_that_renews_first_pays_the_next_periods_usage_from_its_credit(
        tmp_path: Path, command: str) -> None:
    """An immediate cancel, a change or a pause on Dec 3, the Dec 1 tick not run, renews first: the outcome is
    the tick on time followed by the command."""
    outcomes = {}
    for tick in ("on_time", "late"):
        app = rollover_app(tmp_path / tick)
        _november(app, tick)
        _renew_first(app, command, DEC_3)
        recognise(app, DEC_3 + timedelta(days=45))
        outcomes[tick] = _outcome(app)
        app.close()
    assert outcomes["late"] == outcomes["on_time"]
    assert -outcomes["on_time"]["books"][("breakage", "USD")] >= 400 * CENT  # November's 4.00 above the cap


def test_a_rollover_credit_is_not_drawn_after_its_period_but_its_renewal_still_carries_it(tmp_path: Path) -> None:
    """The credit left at the period's end stays open (the sweep does not expire it) until the renewal decides:
    usage after the end goes to overage meanwhile, never to it."""
    app = rollover_app(tmp_path)
    run(app, "subscription.create", "acme", key="m", plan="team")
    debit(app, "4.00", NOV_1, NOV_20)
    recognise(app, DEC_1 + timedelta(hours=1))
    [november] = account(app).grant_balances()
    assert (november["status"], november["remaining"]) == ("open", 600 * CENT)
    debit(app, "1.00", DEC_1, DEC_1 + timedelta(minutes=5))
    assert account(app).overage_receivable("USD") == 100 * CENT
    assert account(app).balance("USD") == 600 * CENT  # not drawn
    run(app, "subscription.tick", "acme", at=DEC_2, key="m")
    assert account(app).overage_receivable("USD") == 0  # repaid by December's grant
    # 2.00 carried into December's 10.00 (less the 1.00 repaid); the 4.00 above the cap stays for November's late
    # usage, set aside, and lapses after its window.
    assert [(g["status"], g["remaining"]) for g in account(app).grant_balances()] == [
        ("open", 400 * CENT), ("open", 1100 * CENT)]
    lapse(app, DEC_1 + LAPSES)
    assert [(g["status"], g["remaining"]) for g in account(app).grant_balances()] == [
        ("expired", 0), ("open", 1100 * CENT)]
    assert Decimal(-books(app)[("breakage", "USD")]) == 400 * CENT
    app.close()


# -- a tick more than a whole period late -----------------------------------------------------------------------
# Team 30.00 with 10.00 included: 4.00 used in November, 11.00 in December (more than its own 10.00: the carry pays
# the rest), 5.00 in January, each rated into its own period (as rating places usage after a period's end that the
# ledger has not renewed yet: the period ahead).
# (start, end, when its usage is posted, how much)
PERIODS = [(NOV_1, DEC_1, NOV_20, "4.00"), (DEC_1, JAN_1, DEC_2, "11.00"),
           (JAN_1, datetime(2027, 2, 1, tzinfo=UTC), datetime(2027, 1, 10, tzinfo=UTC), "5.00")]
# 1.5 and 2.5 periods after November's end (Dec 1): after November's rollover credit expires (Dec 31), and after
# December's would (Feb 1).
LATE = {"one_and_a_half": datetime(2027, 1, 16, tzinfo=UTC), "two_and_a_half": datetime(2027, 2, 15, tzinfo=UTC)}


def _uncapped_app(tmp_path: Path) -> LedgerApplication:
    """The team plan's credit rolling over whole (no ``rollover_cap``)."""
    app = LedgerApplication(persistence_env(None, str(tmp_path)))
    [plan] = ROLLOVER["plans"]
    [credit] = plan["recurring_credits"]
    uncapped = {**ROLLOVER, "plans": [{**plan, "recurring_credits": [
        {k: v for k, v in credit.items() if k != "rollover_cap"}]}]}
    run(app, "catalog.publish", None, document=uncapped, digest="included-rollover-uncapped")
    run(app, "account.open", "acme", currency="USD")
    return app


def _periods(app: LedgerApplication, now: datetime, late: bool) -> dict[str, Any]:
    """The usage of ``PERIODS`` and the renewals due by ``now``, each ticked at its period's end (``late`` False) or
    all at ``now``, with the sweeper (``grant.expire``, ``money.recognise``) running an hour after every period's
    end, at every rollover credit's expiry (a period after its period's end) and at ``now`` before each tick.
    Returns what the customer and the books see at ``now``, and the renewal invoices' lines."""
    sweeper = Sweeper(app)
    run(app, "subscription.create", "acme", key="m", plan="team")
    due = [(start, end, amount) for start, end, _, amount in PERIODS if end <= now]
    moments = sorted({*(used for _, _, used, _ in PERIODS), *(end for _, end, _ in due),
                      *(end + timedelta(hours=1) for _, end, _ in due),
                      *(end + (end - start) for start, end, _ in due)})
    for moment in [m for m in moments if m < now]:
        for start, end, used, amount in PERIODS:
            if used == moment:
                debit(app, amount, start, used)
            if end == moment and not late:
                renew_and_bill(app, start, end, [usage_line(amount)])
        sweeper.sweep(moment)
    for start, end, amount in due:
        if late:
            sweeper.sweep(now)  # the sweeper's round comes before the scheduler's next tick
            renew_and_bill(app, start, end, [usage_line(amount)])
    sweeper.sweep(now)
    recognise(app, now)
    outcome = {**_outcome(app), "revenue": revenue(app),
               "invoices": {end: _lines(_invoice(app, end.isoformat())) for _, end, _ in due}}
    assert verify_store(app, "acme").ok
    app.close()
    return outcome


@pytest.mark.parametrize("late", sorted(LATE))
@pytest.mark.parametrize("capped", [True, False], ids=["rollover_cap", "uncapped"])
def test_a_tick_more_than_a_period_late_carries_the_rollover_credit_as_a_tick_on_time(
        tmp_path: Path, late: str, capped: bool) -> None:
    """The sweeper runs after the ended period's rollover credit's expiry (a period after its end) and before the
    late tick: it leaves the credit to the renewal, which carries and lapses it as on time. Before, the sweep
    expired all of it to breakage first: the customer lost the carry (2.00 with the cap, 6.00 without)."""
    now = LATE[late]
    make = rollover_app if capped else _uncapped_app
    on_time = _periods(make(tmp_path / "on_time"), now, late=False)
    ticked_late = _periods(make(tmp_path / "late"), now, late=True)
    assert ticked_late == on_time
    # On time, with the cap: November 6.00 left, 2.00 carried, 4.00 lapsed; December 12.00 - 11.00: 1.00 carried;
    # January 11.00 - 5.00 = 6.00 left (open until its renewal; on Feb 1 2.00 carried into 12.00, 4.00 set aside
    # for January's late usage until Mar 8, so not lapsed yet on Feb 15).
    # Without it: 6.00 carried into 16.00, 5.00 left carried into 15.00, 10.00 left carried into 20.00, none lapsed.
    # Before, the sweep expired November's 6.00 first: December's 10.00 left 1.00 of its usage billed as overage.
    available = {("one_and_a_half", True): 600, ("two_and_a_half", True): 1200,
                 ("one_and_a_half", False): 1000, ("two_and_a_half", False): 2000}[(late, capped)]
    assert on_time["available"] == available * CENT
    breakage = {("one_and_a_half", True): 400, ("two_and_a_half", True): 400}.get((late, capped), 0)
    assert on_time["revenue"][1] == breakage * CENT
    assert on_time["invoices"][JAN_1] == [("base_fee", "30.00"), ("usage", "11.00"), ("credits_applied", "-11.00")]


@pytest.mark.parametrize("command", ["cancel", "change", "pause"])
def test_a_command_more_than_a_period_late_that_renews_first_carries_the_rollover_credit_as_on_time(
        tmp_path: Path, command: str) -> None:
    """An immediate cancel, a change or a pause on Jan 16, the sweeper run after November's credit's expiry (Dec 31),
    renews the periods due first: November's credit is still there to carry, as with the Dec 1 tick on time.
    Before, the sweep had expired it: December's 11.00 of usage left 1.00 owed beyond its 10.00."""
    now = LATE["one_and_a_half"]
    outcomes = {}
    for tick in ("on_time", "late"):
        app = rollover_app(tmp_path / tick)
        sweeper = Sweeper(app)
        run(app, "subscription.create", "acme", key="m", plan="team")
        debit(app, "4.00", NOV_1, NOV_20)
        if tick == "on_time":
            renew_and_bill(app, NOV_1, DEC_1, [usage_line("4.00")])
        debit(app, "11.00", DEC_1, DEC_2)
        for moment in (DEC_1 + timedelta(hours=1), DEC_1 + (DEC_1 - NOV_1), now):
            sweeper.sweep(moment)
        _renew_first(app, command, now)
        # Rating's usage lines of the periods the command ended first finalize their renewals.
        for ended, end, amount in ([(NOV_1, DEC_1, "4.00")] if tick == "late" else []) + [(DEC_1, JAN_1, "11.00")]:
            run(app, "invoice.usage_lines", "acme", at=now, invoice_key=f"{subscription_id('acme', 'm')}/"
                f"{end.isoformat()}", lines=[usage_line(amount)], period_start=ended.isoformat(),
                period_end=end.isoformat())
        recognise(app, now + timedelta(days=45))
        outcomes[tick] = _outcome(app)
        outcomes[tick]["invoices"] = [_lines(_invoice(app, end.isoformat())) for end in (DEC_1, JAN_1)]
        assert verify_store(app, "acme").ok
        app.close()
    assert outcomes["late"] == outcomes["on_time"]
    assert outcomes["on_time"]["overage"] == 0  # December's 11.00 within its 10.00 + 2.00 carried

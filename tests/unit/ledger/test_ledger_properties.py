"""Properties of the billing account under random command sequences (hypothesis).

Whatever the sequence of grants, debits (overage and block), give-backs, holds, expiries, refunds, voids and
adjustments:

* every posting set sums to zero per unit;
* the wallet sub-ledger of every grant equals the grant's remaining credit, and no grant goes below zero;
* the sum of ``wallet_delta`` over all events equals ``available + held`` per unit, and the receivables
  postings add up to ``receivable``;
* under the ``block`` policy (and captures within their holds) no usage debit posts overage: the
  wallet never pays more than it holds;
* purchases in a credit unit may book their money in the currency (net + tax): the booked money reversed so
  far is exactly the floor of its share of the credit refunded, never more than was booked (tax included),
  and the tax payable of the booking's postings is what is left of its tax;
* the net money of such a purchase is, at every step, deferred + recognised + breakage + refunded (each >= 0,
  each equal to the grant's currency postings on that account); recognition runs at random points, and a
  last run (after expiring what is due) leaves nothing deferred for a grant with no credit left, gives the
  exact floor amounts for grants never refunded nor adjusted, and a second run records nothing;
* a grant's remaining credit plus what refunds paid back never exceeds its amount, and the recognised revenue of
  a paid grant in its own unit (usage drawn from it, less give-backs and refunds of spent credit) never goes below
  zero, also when usage is given back after a finance override refunded the credit it spent (the give-back is
  absorbed, not credited again);
* usage, on time or late, draws only grants drawable at its own time (effective, before their ``drawable_until``
  or expiry), and the expiry sweep leaves open past their expiry only rollover plan credits (a plan credit open
  for its period's late usage lapses at its expiry);
* a refused command records nothing and changes nothing;
* replaying the recorded events (``mutate`` chain, and an eventsourcing ``Application``) rebuilds the
  same account.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any
from uuid import UUID, uuid5

from billing_events.money import SUBUNITS_PER_UNIT
from billing_ledger import audit, snapshots
from billing_ledger.domain.account import BillingAccount, LedgerError
from billing_ledger.domain.postings import PAID_SOURCES, LedgerAccount, assert_balanced, wallet_delta
from billing_ledger.transcoder import OrjsonTranscoder
from eventsourcing.application import Application
from eventsourcing.persistence import Transcoder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

T0 = datetime(2026, 11, 1, tzinfo=UTC)
UNITS = ("USD", "CREDIT")
METERS = ("tokens", "compute")
# Purchases twice as likely: only paid grants can be refunded.
SOURCES = ("purchase", "purchase", "plan_recurrence", "promotion", "manual", "refund_reversal")
NAMESPACE = UUID("6f1c7d1e-9c55-4a8e-a0f3-2a8f7c1e0b5d")

units = st.sampled_from(UNITS)
meters = st.sampled_from(METERS)
indices = st.integers(min_value=0, max_value=50)

grant_ops = st.tuples(
    st.just("grant"),
    units,
    st.integers(100, 2_000),
    st.integers(0, 3),
    st.integers(0, 60),
    st.one_of(st.none(), st.integers(1, 240)),
    st.one_of(st.none(), st.lists(meters, min_size=1, max_size=2)),
    st.sampled_from(SOURCES),
    st.integers(0, 50),
    # The money (net, tax) a purchase in CREDIT books in the currency, if any.
    st.one_of(st.none(), st.tuples(st.integers(0, 3_000), st.integers(0, 600))),
    # A plan credit drawn only until halfway to its expiry: left to its renewal (rollover), or open for its period's
    # late usage until its expiry and swept then (``late_usage``); or neither (drawn until it expires).
    st.sampled_from((None, "rollover", "late_usage")),
)
# A credit package: CREDIT bought with money (net, tax) booked in the currency.
MILLI = SUBUNITS_PER_UNIT // 1000
package_ops = st.tuples(st.just("package"), st.integers(1, 1_000), st.integers(0, 3_000), st.integers(1, 600))
debit_ops = st.tuples(
    st.just("debit"), units, st.integers(-300, 800), meters, st.sampled_from(("overage", "block")),
    st.sampled_from((0, 0, 0, 20, 90)),  # minutes the usage happened before it reaches the ledger (late usage)
)
place_ops = st.tuples(
    st.just("place"), units, st.integers(1, 400), st.one_of(st.none(), meters), st.integers(1, 120)
)
# Captures take a percentage of the hold (over 100 % needs allow_overage).
capture_ops = st.tuples(st.just("capture"), indices, st.integers(0, 150), st.booleans())
release_ops = st.tuples(st.just("release"), indices)
expire_grants_ops = st.tuples(st.just("expire_grants"))
expire_holds_ops = st.tuples(st.just("expire_holds"))
refund_ops = st.tuples(st.just("refund"), indices, st.integers(1, 600), st.booleans(), st.integers(0, 20))
# Refunds a share (percent) of what of a grant is not refunded yet, rounded up: the rest of it at 100.
refund_share_ops = st.tuples(st.just("refund_share"), indices, st.integers(1, 100), st.booleans())
void_ops = st.tuples(st.just("void"), indices)
adjust_ops = st.tuples(st.just("adjust"), units, st.integers(-500, 500).filter(bool))
advance_ops = st.tuples(st.just("advance"), st.integers(1, 90))
# A finance override refunds a share (percent) of a grant's credit not refunded yet (spent credit from revenue), then
# usage of the grant's unit is given back (a correction): the give-back credits back only what was not paid back.
refund_give_back_ops = st.tuples(st.just("refund_give_back"), indices, st.sampled_from((100, 60, 30)),
                                 st.integers(1, 800), meters)
recognise_ops = st.tuples(st.just("recognise"))

operations = st.lists(
    st.one_of(
        grant_ops,
        grant_ops,
        package_ops,
        debit_ops,
        debit_ops,
        place_ops,
        place_ops,
        capture_ops,
        capture_ops,
        release_ops,
        expire_grants_ops,
        expire_grants_ops,
        expire_holds_ops,
        refund_ops,
        refund_ops,
        refund_share_ops,
        refund_share_ops,
        refund_give_back_ops,
        refund_give_back_ops,
        void_ops,
        adjust_ops,
        advance_ops,
        advance_ops,
        recognise_ops,
        recognise_ops,
    ),
    min_size=10,
    max_size=80,
)


@dataclass
class Run:
    account: BillingAccount
    block_only: bool
    now: datetime = T0
    counter: int = 0
    grants: list[UUID] = field(default_factory=list)
    holds: list[UUID] = field(default_factory=list)  # placed (accepted) holds only
    events: list[Any] = field(default_factory=list)
    credit_taken: bool = False  # a negative CREDIT adjustment happened (its money lapses, not consumed)

    def new_id(self) -> UUID:
        self.counter += 1
        return uuid5(NAMESPACE, str(self.counter))

    def pick(self, ids: list[UUID], index: int) -> UUID | None:
        return ids[index % len(ids)] if ids else None


def snapshot_of(account: BillingAccount) -> tuple[Any, ...]:
    return (
        account.version,
        account.grant_balances(),
        [(u, account.available(u), account.held(u), account.receivable(u)) for u in UNITS],
    )


def apply(run: Run, op: tuple[Any, ...]) -> None:
    account, kind = run.account, op[0]
    if kind == "grant":
        _, unit, amount, priority, effective, expires, scope, source, tax, money = op[:10]
        plan_credit = op[10] if len(op) > 10 and source == "plan_recurrence" and expires else None
        grant_id = run.new_id()
        run.grants.append(grant_id)
        effective_at = run.now + timedelta(minutes=effective - 30)
        drawn_until = {"drawable_until": effective_at + timedelta(minutes=max(1, expires // 2)),
                       "late_usage": plan_credit == "late_usage"} if plan_credit else {}
        account.grant_credit(
            grant_id=grant_id,
            unit=unit,
            amount=amount,
            priority=priority,
            effective_at=effective_at,
            expires_at=effective_at + timedelta(minutes=expires) if expires else None,
            scope=scope,
            source=source,
            cause={"op": "grant"},
            granted_by="hypothesis",
            tax_amount=tax if source == "purchase" else 0,
            **drawn_until,
        )
        if source == "purchase" and unit == "CREDIT" and money is not None and sum(money):
            account.book_purchase_money(
                grant_id=grant_id, currency="USD", net=money[0], tax_amount=money[1], at=run.now, cause={}
            )
    elif kind == "package":
        _, amount, net, tax = op
        grant_id = run.new_id()
        run.grants.append(grant_id)
        account.grant_credit(grant_id=grant_id, unit="CREDIT", amount=amount, effective_at=run.now, expires_at=None,
                             scope=None, source="purchase", cause={"op": "package"}, granted_by="hypothesis")
        # In thousandths of a USD: finer than the cent, so refunds' floor to the cent is exercised.
        account.book_purchase_money(grant_id=grant_id, currency="USD", net=net * MILLI, tax_amount=tax * MILLI,
                                    at=run.now, cause={"op": "package"})
    elif kind == "debit":
        _, unit, amount, meter, policy = op[:5]
        late = op[5] if len(op) > 5 else 0
        account.debit_usage(
            command_id=run.new_id(),
            unit=unit,
            amount=amount,
            meter=meter,
            at=run.now - timedelta(minutes=late),
            overage_policy="block" if run.block_only else policy,
            cause={},
        )
    elif kind == "place":
        _, unit, amount, meter, ttl = op
        hold_id = run.new_id()
        if account.place_hold(
            hold_id=hold_id,
            unit=unit,
            amount=amount,
            meter=meter,
            expires_at=run.now + timedelta(minutes=ttl),
            at=run.now,
        ):
            run.holds.append(hold_id)
    elif kind == "capture":
        _, index, percent, allow_overage = op
        hold_id = run.pick(run.holds, index)
        if hold_id is not None:
            amount = account.hold(hold_id)["amount"] * percent // 100
            account.capture_hold(
                hold_id=hold_id, amount=amount, at=run.now, allow_overage=allow_overage and not run.block_only
            )
    elif kind == "release":
        hold_id = run.pick(run.holds, op[1])
        if hold_id is not None:
            account.release_hold(hold_id=hold_id, at=run.now)
    elif kind == "expire_grants":
        account.expire_grants(run.now)
        # The sweep leaves only rollover plan credits open past their expiry (their renewal closes them); a plan
        # credit open for its period's late usage lapses at its expiry like any grant.
        for grant in account.grant_balances():
            if grant["status"] == "open" and grant["expires_at"] is not None and grant["expires_at"] <= run.now:
                record = account._grants[grant["grant_id"]]
                assert record["drawable_until"] is not None and not record["late_usage"], grant
    elif kind == "expire_holds":
        account.expire_holds(run.now)
    elif kind == "refund":
        _, index, amount, override, tax = op
        grant_id = run.pick(run.grants, index)
        if grant_id is not None:
            account.refund_grant(
                grant_id=grant_id,
                amount=amount,
                refund_id=run.new_id(),
                at=run.now,
                finance_override=override and not run.block_only,
                cause={},
                tax_amount=tax,
            )
    elif kind == "refund_share":
        _, index, percent, override = op
        grant_id = run.pick(run.grants, index)
        if grant_id is not None:
            grant = next(g for g in account.grant_balances() if g["grant_id"] == str(grant_id))
            rest = grant["amount"] - grant["refunded"]
            account.refund_grant(
                grant_id=grant_id,
                amount=-(-rest * percent // 100),
                refund_id=run.new_id(),
                at=run.now,
                finance_override=override and not run.block_only,
                cause={},
            )
    elif kind == "refund_give_back":
        _, index, percent, amount, meter = op
        grant_id = run.pick(run.grants, index)
        if grant_id is not None:
            unit = next(g["unit"] for g in account.grant_balances() if g["grant_id"] == str(grant_id))
            apply(run, ("refund_share", index, percent, True))
            account.debit_usage(command_id=run.new_id(), unit=unit, amount=-amount, meter=meter, at=run.now,
                                overage_policy="overage", cause={})
    elif kind == "void":
        grant_id = run.pick(run.grants, op[1])
        if grant_id is not None:
            account.void_grant(grant_id=grant_id, reason="property test", voided_by="hypothesis", at=run.now)
    elif kind == "adjust":
        _, unit, amount = op
        run.credit_taken |= unit == "CREDIT" and amount < 0
        account.adjust(
            adjustment_id=run.new_id(),
            unit=unit,
            amount=amount,
            reason="property test",
            user="hypothesis",
            at=run.now,
        )
    elif kind == "advance":
        run.now += timedelta(minutes=op[1])
    elif kind == "recognise":
        account.recognise_purchase_money(run.now)
    else:  # pragma: no cover - the strategies produce only the kinds above
        raise AssertionError(kind)


def check_step(run: Run) -> None:
    account = run.account
    for grant in account.grant_balances():
        assert 0 <= grant["remaining"] <= grant["amount"], grant
        assert grant["remaining"] + grant["refunded"] <= grant["amount"], grant
    check_grant_revenue(run)
    active = account.active_holds()
    for unit in UNITS:
        assert account.held(unit) == sum(h["amount"] for h in active if h["unit"] == unit)
        assert account.balance(unit) >= 0
        assert account.held(unit) >= 0
        assert account.receivable(unit) >= 0
    for grant in account.grant_balances():
        revenue = account.purchase_revenue(UUID(grant["grant_id"]))
        if revenue is not None:
            parts = (revenue["deferred"], revenue["recognised"], revenue["breakage"], revenue["refunded_net"])
            assert min(parts) >= 0 and sum(parts) == revenue["net"], revenue


def check_grant_revenue(run: Run) -> None:
    """The recognised revenue of each paid grant in its unit is never below zero (a debit balance): a give-back
    never credits a grant again with usage a refund already paid back from revenue. Grants a negative adjustment
    took credit from (a finance override refunds that credit from revenue too) or whose credit repaid overage
    (posted against receivables) are left out: their revenue lines are not their usage alone."""
    revenue: dict[str, int] = {}
    left_out: set[str] = set()
    for evt in run.events:
        name = type(evt).__name__
        if name == "BalanceAdjusted":
            left_out |= {draw["grant_id"] for draw in evt.draws}
        elif name == "OverageRepaid":
            left_out.add(str(evt.grant_id))
        for line in getattr(evt, "postings", []):
            if line["account"] == LedgerAccount.RECOGNISED_REVENUE and line["grant_id"] is not None:
                revenue[line["grant_id"]] = revenue.get(line["grant_id"], 0) + line["amount"]
    for grant in run.account.grant_balances():
        if grant["source"] in PAID_SOURCES and grant["grant_id"] not in left_out:
            assert revenue.get(grant["grant_id"], 0) <= 0, (grant, revenue.get(grant["grant_id"]))


def check_history(run: Run) -> None:
    account, recorded = run.account, run.events
    wallet: dict[str, int] = {}
    receivables: dict[str, int] = {}
    per_grant: dict[str, int] = {}
    for evt in recorded:
        postings = getattr(evt, "postings", [])
        assert_balanced(postings)
        for unit, delta in wallet_delta(postings).items():
            wallet[unit] = wallet.get(unit, 0) + delta
        for line in postings:
            if line["account"] == LedgerAccount.RECEIVABLES:
                receivables[line["unit"]] = receivables.get(line["unit"], 0) + line["amount"]
            if line["account"] == LedgerAccount.TENANT_WALLET:
                assert line["grant_id"] is not None
                per_grant[line["grant_id"]] = per_grant.get(line["grant_id"], 0) - line["amount"]
        if run.block_only and type(evt).__name__ == "UsageDebited":
            assert evt.overage <= 0, "a block-only debit never posts beyond the credit"
        if type(evt).__name__ == "UsageDebited" and evt.amount > 0:
            for draw in evt.draws:  # usage draws only credit drawable at its own time, however late it comes
                record = account._grants[draw["grant_id"]]
                ends = record["drawable_until"] or record["expires_at"]
                assert record["effective_at"] <= evt.at and (ends is None or evt.at < ends), (record, evt.at)
    for unit in UNITS:
        # balance = available + held + the credit set aside for an ended period's late usage (GrantSetAside)
        assert wallet.get(unit, 0) == account.available(unit) + account.held(unit) + account.late_usage_reserve(unit) \
            == account.balance(unit)
        assert receivables.get(unit, 0) == account.receivable(unit)
    for grant in account.grant_balances():
        assert per_grant.get(grant["grant_id"], 0) == grant["remaining"], grant
    check_money(run)


def check_money(run: Run) -> None:
    """The currency money of credit-unit purchases: booked once, reversed in proportion, never beyond."""
    account = run.account
    tax_payable: dict[str, int] = {}
    for evt in run.events:
        name = type(evt).__name__
        if name in ("PurchaseMoneyBooked", "PurchaseMoneyRefunded"):
            assert evt.unit == "USD" and evt.amount == evt.net + evt.tax_amount > 0
            assert wallet_delta(evt.postings) == {}
            for line in evt.postings:
                assert line["grant_id"] == str(evt.grant_id)
                if line["account"] == LedgerAccount.TAX_PAYABLE:
                    tax_payable[line["grant_id"]] = tax_payable.get(line["grant_id"], 0) + line["amount"]
    for grant in account.grant_balances():
        money = account.purchase_money(UUID(grant["grant_id"]))
        if money is None:
            assert grant["grant_id"] not in tax_payable
            continue
        assert grant["unit"] == "CREDIT" and grant["source"] == "purchase"
        assert money["refunded_net"] == paid_back(money["net"], grant["refunded"], grant["amount"]) <= money["net"]
        assert money["refunded_tax"] == paid_back(money["tax"], grant["refunded"], grant["amount"]) <= money["tax"]
        assert tax_payable.get(grant["grant_id"], 0) == -(money["tax"] - money["refunded_tax"])
    check_revenue(run)


def paid_back(booked: int, refunded: int, amount: int) -> int:
    """What of a grant's ``booked`` USD money refunds of ``refunded`` of its ``amount`` credit paid back: the
    running share floored to the cent (a gateway pays back whole cents), all of it at the last refund."""
    if refunded >= amount:
        return booked
    share = booked * refunded // amount
    return share - share % (SUBUNITS_PER_UNIT // 100)


def check_revenue(run: Run) -> None:
    """The currency money of credit-unit purchases is recognised exactly, only by recognition runs."""
    account = run.account
    per_grant: dict[tuple[str, str, str], int] = {}
    for evt in run.events:
        for line in getattr(evt, "postings", []):
            if line["grant_id"] is not None:
                key = (line["grant_id"], line["account"], line["unit"])
                per_grant[key] = per_grant.get(key, 0) + line["amount"]
        if type(evt).__name__ in ("UsageDebited", "HoldCaptured"):
            assert {line["unit"] for line in evt.postings} <= {evt.unit}  # never any currency money on usage
    # The books of every grant's money are what its state says, before and after a last run.
    for last_run in (False, True):
        if last_run:
            account.expire_grants(run.now)
            account.recognise_purchase_money(run.now)
            closing = account.collect_events()
            run.events.extend(closing)
            account.recognise_purchase_money(run.now)
            assert account.pending_events == []  # a second run finds nothing to do
            assert not account.purchase_money_due(run.now)
            for evt in closing:
                for line in getattr(evt, "postings", []):
                    if line["grant_id"] is not None:
                        key = (line["grant_id"], line["account"], line["unit"])
                        per_grant[key] = per_grant.get(key, 0) + line["amount"]
        for grant in account.grant_balances():
            revenue = account.purchase_revenue(UUID(grant["grant_id"]))
            if revenue is None:
                continue
            gid = grant["grant_id"]
            assert -per_grant.get((gid, LedgerAccount.DEFERRED_REVENUE, "USD"), 0) == revenue["deferred"] >= 0
            assert -per_grant.get((gid, LedgerAccount.RECOGNISED_REVENUE, "USD"), 0) == revenue["recognised"] >= 0
            assert -per_grant.get((gid, LedgerAccount.BREAKAGE, "USD"), 0) == revenue["breakage"] >= 0
            if not last_run:
                continue
            if grant["remaining"] == 0:
                assert revenue["deferred"] == 0, (grant, revenue)
            if grant["refunded"] == 0 and not run.credit_taken:
                net, amount = revenue["net"], grant["amount"]
                lapsed = -per_grant.get((gid, LedgerAccount.BREAKAGE, "CREDIT"), 0)  # never refunded: none reversed
                consumed = amount - grant["remaining"] - lapsed
                assert revenue["recognised"] == net * consumed // amount, (grant, revenue)
                assert revenue["breakage"] == net * (consumed + lapsed) // amount - net * consumed // amount


def check_replay(run: Run) -> None:
    account = run.account
    replayed: BillingAccount | None = None
    for evt in run.events:
        replayed = evt.mutate(replayed)
    assert replayed is not None
    assert replayed == account
    assert snapshot_of(replayed) == snapshot_of(account)

    app: Application[UUID] = Application()
    app.save(*run.events)  # Application.save takes recorded events as well as aggregates
    reloaded = app.repository.get(account.id)
    assert reloaded == account
    assert snapshot_of(reloaded) == snapshot_of(account)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=operations, block_only=st.booleans())
def test_random_command_sequences_keep_the_books_balanced_and_replayable(
    ops: list[tuple[Any, ...]], block_only: bool
) -> None:
    account = BillingAccount.open("prop", "USD", low_balance_threshold=200, opened_by="hypothesis")
    account.set_auto_top_up("CREDIT", 300, 1_000, None, 600, 5_000)
    run_and_check(Run(account=account, block_only=block_only), ops)


def run_and_check(run: Run, ops: list[tuple[Any, ...]]) -> None:
    """Applies ``ops`` to the run's account, checking every step, then the whole history and its replay."""
    account = run.account
    run.events.extend(account.collect_events())
    for op in ops:
        before = snapshot_of(account)
        try:
            apply(run, op)
        except LedgerError:
            # A refused command records nothing and changes nothing.
            assert account.pending_events == []
            assert snapshot_of(account) == before
        run.events.extend(account.collect_events())
        check_step(run)
    check_history(run)
    check_replay(run)


# Credit packages only (CREDIT bought with money), used, lapsing, refunded and recognised in any order: the
# general mix above rarely refunds a package whose money was already recognised.
package_expiring_ops = st.tuples(st.just("grant"), st.just("CREDIT"), st.integers(1, 2_000), st.integers(0, 3),
                                 st.integers(0, 60), st.integers(1, 240), st.none(), st.just("purchase"),
                                 st.just(0), st.tuples(st.integers(0, 3_000), st.integers(0, 600)))
credit_debit_ops = st.tuples(st.just("debit"), st.just("CREDIT"), st.integers(-300, 800), meters,
                             st.sampled_from(("overage", "block")))
package_operations = st.lists(
    st.one_of(
        package_ops,
        package_expiring_ops,
        credit_debit_ops,
        credit_debit_ops,
        st.tuples(st.just("place"), st.just("CREDIT"), st.integers(1, 400), st.none(), st.integers(1, 120)),
        capture_ops,
        expire_grants_ops,
        refund_share_ops,
        # Finance refunds spent or lapsed credit (the rest of a grant, or a share of it), then usage is given back.
        st.tuples(st.just("refund_share"), indices, st.sampled_from((100, 100, 50, 30)), st.just(True)),
        st.tuples(st.just("refund_give_back"), indices, st.sampled_from((100, 60, 30)), st.integers(1, 800),
                  meters),
        st.tuples(st.just("adjust"), st.just("CREDIT"), st.integers(-500, 500).filter(bool)),
        advance_ops,
        recognise_ops,
        recognise_ops,
    ),
    min_size=5,
    max_size=60,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=package_operations)
def test_credit_package_money_is_recognised_exactly_whatever_the_order(ops: list[tuple[Any, ...]]) -> None:
    run_and_check(Run(account=BillingAccount.open("prop", "USD", opened_by="hypothesis"), block_only=False), ops)


# == overage kept per period, subscription invoices, repayments and credit notes ============================
#
# Usage debits rated into periods (``cause.period``: calendar months and subscription period starts), invoices
# taking the overage of the periods that began before their end, billing their fees and tax, paid or voided,
# credit bought that repays unbilled overage, credit notes and refunds of an invoice's payment. Besides the
# properties above, after every step:
#
# * ``receivable`` is the sum of the receivables postings, and ``overage_receivable`` plus the fees and tax of
#   the unpaid billed invoices is ``receivable``;
# * every sub-unit of overage receivable is either unbilled or on exactly one unpaid invoice: the unbilled
#   overage plus the overage of the unpaid invoices is the overage receivable, none of them negative;
# * the audit's recomputation from the events (``billing_ledger.audit.replay``) gives the account's balances,
#   and a snapshot of the account loads as the account.

PERIOD_KEYS = ("2026-10", "2026-11", "2026-12", "2026-11-01T00:00:00+00:00", "2026-11-15T00:00:00+00:00")
INVOICE_ENDS = tuple(datetime(*d, tzinfo=UTC) for d in ((2026, 10, 15), (2026, 11, 1), (2026, 11, 3), (2026, 11, 15),
                                                        (2026, 12, 1), (2027, 1, 1)))

# Mostly beyond the credit (overage), and give-backs.
period_debit_ops = st.tuples(st.just("period_debit"), units, st.integers(1, 3_000), meters,
                             st.sampled_from(("overage", "overage", "block")), st.sampled_from(PERIOD_KEYS))
give_back_ops = st.tuples(st.just("period_debit"), units, st.integers(-600, -1), meters, st.just("overage"),
                          st.sampled_from(PERIOD_KEYS))
small_grant_ops = st.tuples(st.just("grant"), units, st.integers(1, 400), st.integers(0, 3), st.integers(0, 60),
                            st.one_of(st.none(), st.integers(1, 240)), st.one_of(st.none(), st.lists(meters, min_size=1,
                                                                                                     max_size=2)),
                            st.sampled_from(SOURCES), st.integers(0, 50), st.none())
# Invoices: the overage of both units (a credit unit billed at its list price), or the currency's only, then (as
# finalizing does) their fees and tax, if any.
invoice_ops = st.tuples(st.just("invoice"), st.sampled_from(INVOICE_ENDS), st.booleans(),
                        st.one_of(st.none(), st.tuples(st.integers(0, 3_000), st.integers(0, 600))))
bill_ops = st.tuples(st.just("bill"), indices, st.integers(0, 3_000), st.integers(0, 600))
pay_ops = st.tuples(st.just("pay"), indices)
void_invoice_ops = st.tuples(st.just("void_invoice"), indices)
repay_ops = st.tuples(st.just("repay"), units, st.integers(1, 800), st.one_of(st.none(), st.lists(meters, min_size=1,
                                                                                                      max_size=1)))
credit_note_ops = st.tuples(st.just("credit_note"), st.integers(0, 500), st.integers(0, 100))
refund_invoice_ops = st.tuples(st.just("refund_invoice"), st.integers(1, 2_000), st.integers(0, 400))

invoice_operations = st.lists(
    st.one_of(
        small_grant_ops,
        period_debit_ops,
        period_debit_ops,
        period_debit_ops,
        give_back_ops,
        give_back_ops,
        debit_ops,
        place_ops,
        capture_ops,
        expire_grants_ops,
        advance_ops,
        invoice_ops,
        invoice_ops,
        invoice_ops,
        bill_ops,
        bill_ops,
        pay_ops,
        pay_ops,
        void_invoice_ops,
        void_invoice_ops,
        repay_ops,
        repay_ops,
        credit_note_ops,
        refund_invoice_ops,
        refund_ops,
    ),
    min_size=20,
    max_size=80,
)


@dataclass
class InvoiceRun(Run):
    invoices: list[str] = field(default_factory=list)  # unpaid, not voided
    receivables: dict[str, int] = field(default_factory=dict)  # the receivables postings of the events checked
    checked: int = 0  # how many of ``events`` were checked


def apply_invoicing(run: InvoiceRun, op: tuple[Any, ...]) -> None:
    account, kind = run.account, op[0]
    if kind == "period_debit":
        _, unit, amount, meter, policy, period = op
        account.debit_usage(command_id=run.new_id(), unit=unit, amount=amount, meter=meter, at=run.now,
                            overage_policy="block" if run.block_only else policy, cause={"period": period})
    elif kind == "invoice":
        _, end, with_credit, fees = op
        invoice = f"inv-{run.new_id()}"
        run.invoices.append(invoice)
        account.invoice_overage(invoice=invoice, units=["USD", "CREDIT"] if with_credit else ["USD"], end=end,
                                at=run.now)
        run.events.extend(account.collect_events())
        if fees is not None:
            account.bill_invoice(invoice=invoice, unit="USD", net=fees[0], tax=fees[1], at=run.now, cause={})
    elif kind == "bill":
        _, index, net, tax = op
        invoice = run.pick(run.invoices, index)
        if invoice is not None:
            account.bill_invoice(invoice=invoice, unit="USD", net=net, tax=tax, at=run.now, cause={})
    elif kind == "pay":
        invoice = run.pick(run.invoices, op[1])
        if invoice is not None:
            account.settle_invoiced_overage(invoice=invoice, at=run.now, cause={})
            run.invoices.remove(invoice)  # an invoice is paid once (Invoice.mark_paid)
    elif kind == "void_invoice":
        invoice = run.pick(run.invoices, op[1])
        if invoice is not None:  # as subscription_commands.void_invoice does
            account.void_invoice_bill(invoice=invoice, at=run.now, cause={})
            account.return_invoiced_overage(invoice=invoice, at=run.now)
            run.invoices.remove(invoice)
    elif kind == "repay":
        _, unit, amount, scope = op
        grant_id = run.new_id()
        run.grants.append(grant_id)
        account.grant_credit(grant_id=grant_id, unit=unit, amount=amount, effective_at=run.now, expires_at=None,
                             scope=scope, source="purchase", cause={"op": "repay"}, granted_by="hypothesis")
        account.repay_overage(grant_id=grant_id, at=run.now, cause={})
    elif kind == "credit_note":
        _, net, tax = op
        account.credit_note_grant(grant_id=run.new_id(), note=f"cn-{run.counter}", unit="USD", net=net, tax=tax,
                                  at=run.now, cause={})
    elif kind == "refund_invoice":
        _, amount, tax = op
        account.refund_invoice_payment(note=f"cn-{run.counter}", unit="USD", amount=amount, tax=tax, at=run.now,
                                       cause={})
    else:
        apply(run, op)


def check_invoicing_step(run: InvoiceRun) -> None:
    account, receivables = run.account, run.receivables
    for evt in run.events[run.checked:]:
        postings = getattr(evt, "postings", [])
        assert_balanced(postings)
        for line in postings:
            if line["account"] == LedgerAccount.RECEIVABLES:
                receivables[line["unit"]] = receivables.get(line["unit"], 0) + line["amount"]
    run.checked = len(run.events)
    for unit in UNITS:
        billed = [account.invoice_billed(invoice) for invoice in run.invoices]
        fees = sum(b["amount"] for b in billed if b is not None and b["unit"] == unit)
        assert receivables.get(unit, 0) == account.receivable(unit) == account.overage_receivable(unit) + fees
        unbilled = account.unbilled_overage(unit)
        invoiced = [account.invoiced_overage(invoice).get(unit, 0) for invoice in run.invoices]
        assert min(invoiced, default=0) >= 0 and min(unbilled.values(), default=0) >= 0, (unbilled, invoiced)
        assert sum(unbilled.values()) + sum(invoiced) == account.overage_receivable(unit) >= 0, (
            unit, unbilled, invoiced, account.overage_receivable(unit))
        for key, parts in account.unbilled_overage_meters(unit).items():  # what scoped credit may repay
            assert min(parts.values()) > 0 and sum(parts.values()) <= unbilled.get(key, 0), (unit, key, parts, unbilled)


class SnapshotCodec(Application[UUID]):
    """An in-memory application with the ledger's transcoder (``LedgerApplication.construct_transcoder``)."""

    def construct_transcoder(self) -> Transcoder:
        transcoder = OrjsonTranscoder()
        self.register_transcodings(transcoder)
        return transcoder


def check_audit_and_snapshot(run: InvoiceRun) -> None:
    account = run.account
    replayed = audit.replay(audit.to_record(evt) for evt in run.events)
    assert replayed.problems == []
    for unit, wallet in replayed.wallets().items():
        assert wallet == {"balance": account.balance(unit), "held": account.held(unit),
                          "late_usage_reserve": account.late_usage_reserve(unit),
                          "available": account.available(unit), "receivable": account.receivable(unit)}, unit
    # The ledger's snapshot encoding (snapshots.py: its format tag, the ledger's orjson transcoder) and back.
    ledger = SimpleNamespace(_app=SnapshotCodec())
    restored = snapshots.Snapshots._from_stored(ledger, snapshots.Snapshots.encode(ledger, account))  # type: ignore[arg-type]
    assert isinstance(restored, BillingAccount)
    assert restored == account
    assert snapshot_of(restored) == snapshot_of(account)
    for unit in UNITS:
        assert restored.unbilled_overage(unit) == account.unbilled_overage(unit)
    for invoice in run.invoices:
        assert restored.invoiced_overage(invoice) == account.invoiced_overage(invoice)
        assert restored.invoice_billed(invoice) == account.invoice_billed(invoice)


def run_invoicing(run: InvoiceRun, ops: list[tuple[Any, ...]]) -> None:
    account = run.account
    run.events.extend(account.collect_events())
    for op in ops:
        before = snapshot_of(account)
        try:
            apply_invoicing(run, op)
        except LedgerError:
            assert account.pending_events == []
            assert snapshot_of(account) == before
        run.events.extend(account.collect_events())
        check_step(run)
        check_invoicing_step(run)
    check_history(run)
    check_replay(run)
    check_audit_and_snapshot(run)


# Longer sequences than above (20-80 steps, invoices need overage first): fewer of them.
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=invoice_operations, block_only=st.sampled_from((False, False, False, True)))
def test_overage_is_owed_once_unbilled_or_on_one_unpaid_invoice_whatever_the_sequence(
    ops: list[tuple[Any, ...]], block_only: bool
) -> None:
    account = BillingAccount.open("prop", "USD", opened_by="hypothesis")
    run_invoicing(InvoiceRun(account=account, block_only=block_only), ops)

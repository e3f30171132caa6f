"""Snapshots (snapshots.py): an account not in memory loads from its latest snapshot plus the events after it,
exactly as its whole stream replays; a snapshot of another format is ignored; the audit checks the latest
snapshot against the events. SQLite here; tests/integration/test_ledger_exactly_once.py runs the PostgreSQL
query."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from billing_events import ids
from billing_events.money import SUBUNITS_PER_UNIT
from billing_ledger import snapshots
from billing_ledger.application import LedgerApplication, persistence_env
from billing_ledger.audit import state_of, verify_store
from billing_ledger.domain.account import BillingAccount
from billing_ledger.domain.allocation import ResourcePool
from billing_ledger.sweeper import Sweeper

from tests.unit.ledger.ledger_support import apply, command, open_account

U = SUBUNITS_PER_UNIT
NOW = datetime(2026, 11, 1, tzinfo=UTC)
INTERVAL = 7


def ledger(path: Path) -> LedgerApplication:
    app = LedgerApplication(persistence_env(None, str(path)))
    assert app.snapshotter is not None
    app.snapshotter.interval_events = INTERVAL
    return app


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path


def busy_account(app: LedgerApplication, tenant: str = "acme", rounds: int = 6) -> None:
    """Every kind of change an account sees: grants (one expiring), debits across grants, holds placed,
    captured, released and expired, a low-balance threshold crossed and re-armed, an adjustment."""
    open_account(app, tenant, {"key": "paid", "amount": "100.00"},
                 {"key": "promo", "amount": "5.00", "source": "promotion", "priority": 1,
                  "effective_at": NOW.isoformat(), "expires_at": (NOW + timedelta(days=2)).isoformat()})
    done(apply(app, command("low_balance.set", tenant, {"unit": "USD", "threshold": "90.00"})))
    account = app.load_many([ids.account_id(tenant)])[ids.account_id(tenant)]
    account.set_auto_top_up("USD", 95 * U, 150 * U, None, 60, 1_000 * U)
    app.save(account)
    app.cache.put(account)
    for n in range(rounds):
        at = (NOW + timedelta(hours=n)).isoformat()
        done(apply(app, command("usage.debit", tenant, {"unit": "USD", "amount_subunits": 3 * U + n, "meter": "m",
                                                   "at": at}, key=f"d{n}")))
        hold = str(ids.grant_id(tenant, f"h{n}"))
        done(apply(app, command("hold.place", tenant, {
            "hold_id": hold, "amount": "2", "at": at, "expires_at": (NOW + timedelta(hours=n, minutes=30)).isoformat()},
            key=f"h{n}")))
        if n % 3 == 0:
            done(apply(app, command("hold.capture", tenant, {"hold_id": hold, "amount": "1.5", "at": at}, key=f"c{n}")))
        elif n % 3 == 1:
            done(apply(app, command("hold.release", tenant, {"hold_id": hold, "at": at}, key=f"r{n}")))
    assert Sweeper(app).sweep(NOW + timedelta(days=3)) == 2  # the last hold, and the promotion, expire
    done(apply(app, command("balance.adjust", tenant, {"adjustment_id": str(ids.grant_id(tenant, "adj")), "amount": "50",
                                                  "unit": "USD", "reason": "goodwill", "user": "ops",
                                                  "at": NOW.isoformat()}, key="adj")))


def ledger_asked(path: Path) -> tuple[LedgerApplication, list[dict[UUID, int]]]:
    """Another process's ledger on the store, and the versions it asks the store for events after."""
    app = ledger(path)
    asked: list[dict[UUID, int]] = []
    events_after = app.reader.events_after
    app.reader.events_after = lambda versions: asked.append(dict(versions)) or events_after(versions)  # type: ignore[method-assign]
    return app, asked


def done(results: list[Any]) -> None:
    assert all(r.outcome == "applied" for r in results), results


def replayed(app: LedgerApplication, aggregate_id: UUID) -> Any:
    aggregate = None
    for event in app.events.get(aggregate_id):
        aggregate = event.mutate(aggregate)
    return aggregate


def stored_snapshots(app: LedgerApplication, aggregate_id: UUID) -> list[int]:
    assert app.snapshots is not None and app.snapshotter is not None
    app.snapshotter.flush()  # written by a thread of its own
    return [s.originator_version for s in app.snapshots.recorder.select_events(aggregate_id)]


def test_an_account_loads_from_its_latest_snapshot_as_its_whole_stream_replays(store: Path) -> None:
    account_id = ids.account_id("acme")
    writer = ledger(store)
    try:
        busy_account(writer)
        version = writer.read(account_id, lambda a: a.version)
        taken = stored_snapshots(writer, account_id)
        assert taken and taken[-1] <= version and all(b - a >= INTERVAL for a, b in pairwise(taken))
    finally:
        writer.close()
    fresh, asked = ledger_asked(store)  # another process: nothing in memory
    try:
        loaded = fresh.load_many([account_id])[account_id]
        assert asked == [{account_id: taken[-1]}]  # only the events after the snapshot were read
        assert loaded.version == version
        assert state_of(fresh, loaded) == state_of(fresh, replayed(fresh, account_id))
        # And it decides exactly as the replayed account would: a debit across what is left.
        fresh.cache.put(loaded)
        [debit] = apply(fresh, command("usage.debit", "acme", {"unit": "USD", "amount_subunits": 120 * U,
                                                               "meter": "m", "at": NOW.isoformat()}, key="big"))
        assert debit.outcome == "applied"
        assert fresh.read(account_id, lambda a: (a.available("USD"), a.receivable("USD"))) == \
            (replayed(fresh, account_id).available("USD"), replayed(fresh, account_id).receivable("USD"))
        assert verify_store(fresh, "acme").ok
    finally:
        fresh.close()


def test_a_snapshot_of_another_format_is_ignored_and_the_stream_replayed(store: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    account_id = ids.account_id("acme")
    writer = ledger(store)
    try:
        busy_account(writer)
        assert stored_snapshots(writer, account_id)
    finally:
        writer.close()
    monkeypatch.setitem(snapshots.FORMATS, BillingAccount, snapshots.FORMATS[BillingAccount] + 1)
    fresh, asked = ledger_asked(store)
    try:
        loaded = fresh.load_many([account_id])[account_id]
        assert asked == [{account_id: 0}]
        assert state_of(fresh, loaded) == state_of(fresh, replayed(fresh, account_id))
    finally:
        fresh.close()


def test_the_audit_finds_a_snapshot_that_is_not_what_the_events_build(store: Path) -> None:
    app = ledger(store)
    try:
        busy_account(app)
        account_id = ids.account_id("acme")
        assert stored_snapshots(app, account_id) and verify_store(app, "acme").ok
        forged = app.read(account_id, lambda a: a)
        assert forged is not None and app.snapshotter is not None
        version = stored_snapshots(app, account_id)[-1] + 1
        assert forged.version >= version  # a snapshot beyond the last one, at a version the events reach
        good = replayed_to(app, account_id, version)
        good._grants[next(iter(good._grants))]["remaining"] += 1_000 * U  # the forgery
        app.snapshotter.write([app.snapshotter.encode(good)])
        found = verify_store(app, "acme")
        assert not found.ok and any("differs from the account replayed" in p for p in found.problems)
    finally:
        app.close()


def replayed_to(app: LedgerApplication, aggregate_id: UUID, version: int) -> Any:
    aggregate = None
    for event in app.events.get(aggregate_id, lte=version):
        aggregate = event.mutate(aggregate)
    return aggregate


# The current format of each snapshotted aggregate: the attributes its events build. A change here means a change
# of the snapshot format: bump the class's entry in snapshots.FORMATS, then update this list. Account format 2:
# the same attributes, but the ``money`` of a credit-unit purchase grant (in ``_grants``) keeps its recognition.
# Format 3: overage kept per period until invoiced (``_unbilled``) and per invoice until paid (``_invoiced_overage``).
# Format 5: the same attributes, but a give-back reduces ``_unbilled`` period by period, never below zero.
# Format 6: _billed_periods (the invoice that billed each period's overage, what a correction can still credit).
# Format 7: _fee_schedules; 8: _pending_fee_credits (unused time credited from a renewal draft not billed yet).
# Format 9: the same attributes, but _billed_periods keeps every invoice that billed a period (period -> list).
# Format 10: _period_minimums (the minimum spend a period was billed against, its usage spend since).
# Format 11: the same attributes, but each grant in _grants keeps what each refund paid back (refunds_paid_back).
# Format 12: _unbilled_meters (the meters each period's unbilled overage came from).
# Format 13: _overage_rounding (the rounding of an unpaid invoice's usage lines, posted with its overage).
# Format 14: the same attributes, but each grant in _grants keeps when usage stops drawing it (drawable_until).
# Format 15: the same attributes, but each grant keeps its usage given back after it lapsed (reversed), and an
# expired grant's draws stay in _recent_draws. Format 16: the same attributes, but each grant keeps the credit
# negative adjustments took from it and what of it refunds paid back (adjusted, adjusted_reversed).
# Format 17: _overage_times (each unbilled period's overage by the time of the usage that posted it).
# Format 18: the same attributes, but a usage_reversal credit in _grants keeps what gateway refunds took back of
# each grant's usage it reversed (taken_back).
# Format 19: _owed_usage (usage of a usage_reversal credit a gateway refund made owed, until cleared or paid).
# Format 20: _adjustments (what each manual adjustment left, the answer a retry of it gets).
# Format 21: _parked_refunds (gateway refunds waiting for their payment).
# Format 22: _refunds (what each grant refund took from where and paid back, the answer a retry of it gets).
# Format 23: _disputes (disputes of the account's payments, the funds withdrawn for them).
# Format 24: the same attributes, but each grant in _grants keeps whether it is a plan credit left open after its
# period for that period's late usage (late_usage) and whether it is set aside (set_aside).
# Format 25: the same attributes, but each dispute in _disputes keeps the gateway's fee booked for it (fee, fee_at,
# fee_unbooked).
# Format 26: the same attributes, but each grant in _grants keeps what it moved into a next grant when kept for late
# usage (moved) and its carry into that grant that late usage may still draw (carry).
# Format 27: _credit_note_spend (credit notes' credit usage drew, per period, until its invoice applies it).
# Format 28: the same attributes, but each share in a grant's refunds_paid_back names its refund and dispute.
# Format 29: the same attributes, but each grant in _grants keeps what late usage of the period before drew of it
# through a carry (carry_drawn), and a kept grant's carry the part its successor does not hold (reserve, from).
ACCOUNT_ATTRIBUTES_FORMAT_29 = [  # 4: _invoice_billed (the fees and tax of unpaid subscription invoices)
    "_adjustments", "_auto_top_up", "_billed_periods", "_created_on", "_credit_note_spend", "_disputes", "_fee_schedules", "_grants", "_held", "_holds", "_id", "_invoice_billed", "_invoiced_overage",
    "_low_balance",
    "_modified_on", "_overage_rounding", "_overage_times", "_owed_usage", "_parked_refunds", "_pending_events", "_pending_fee_credits", "_period_minimums", "_receivable", "_recent_draws", "_refunds", "_settled_holds", "_top_up_history",
    "_unbilled", "_unbilled_meters", "_version",
    "chain_head", "currency", "opened_by", "tenant",
]


def test_the_snapshotted_attributes_change_only_with_the_format(store: Path) -> None:
    app = ledger(store)
    try:
        busy_account(app)
        apply(app, command("allocation.set_capacity", "acme", {"resource": "seats", "capacity": 3}))
        apply(app, command("allocation.allocate", "acme", {"resource": "seats", "quantity": 1, "request_id": "u1",
                                                           "at": NOW.isoformat()}, key="u1"))
        account = app.read(ids.account_id("acme"), lambda a: sorted(vars(a)))
        pool = app.read(ResourcePool.create_id("acme", "seats"), lambda p: sorted(vars(p)))
    finally:
        app.close()
    assert snapshots.FORMATS[BillingAccount] == 29 and account == ACCOUNT_ATTRIBUTES_FORMAT_29
    assert snapshots.FORMATS[ResourcePool] == 2 and pool == POOL_ATTRIBUTES_FORMAT_2


POOL_ATTRIBUTES_FORMAT_2 = [  # 2: _finished (finished requests are forgotten after a while)
    "_created_on", "_finished", "_id", "_modified_on", "_pending_events", "_requests", "_version", "capacity",
    "capacity_source", "chain_head", "in_use", "resource", "tenant",
]


def test_snapshots_are_written_off_the_deciding_thread(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A decision does not wait for its snapshot's write (which took 5-10 ms on PostgreSQL, on the hold path):
    the writer thread does it; ``flush`` waits for it and ``close`` writes what is waiting."""
    import threading

    app = ledger(store)
    assert app.snapshotter is not None
    writing = threading.Event()
    release = threading.Event()
    insert = app.snapshotter._insert

    def slow_insert(stored: list[Any]) -> None:
        writing.set()
        assert threading.current_thread().name == "ledger-snapshots"
        release.wait(10)
        insert(stored)

    monkeypatch.setattr(app.snapshotter, "_insert", slow_insert)
    try:
        busy_account(app)  # decided and committed while the writer is held up
        assert writing.wait(10) and not stored_snapshots_now(app, ids.account_id("acme"))
        release.set()
        assert stored_snapshots(app, ids.account_id("acme"))
    finally:
        release.set()
        app.close()


def stored_snapshots_now(app: LedgerApplication, aggregate_id: UUID) -> list[int]:
    assert app.snapshots is not None
    return [s.originator_version for s in app.snapshots.recorder.select_events(aggregate_id)]


def test_a_big_state_is_snapshotted_less_often(store: Path) -> None:
    """Encoding a snapshot costs about as much per SNAPSHOT_STATE_BYTES_PER_EVENT bytes as replaying one event:
    an account whose state is big (many active holds) is snapshotted that much further apart."""
    app = ledger(store)
    assert app.snapshotter is not None
    try:
        open_account(app, "acme", {"key": "g", "amount": "1000.00"})
        account_id = ids.account_id("acme")
        apply(app, *[command("hold.place", "acme", {"hold_id": str(ids.grant_id("acme", f"h{n}")), "amount": "0.01",
                                                   "at": NOW.isoformat(),
                                                   "expires_at": (NOW + timedelta(days=9)).isoformat()}, key=f"h{n}")
                     for n in range(60)])
        first = stored_snapshots(app, account_id)
        assert first  # 60 holds: due after INTERVAL events
        size = len(app.snapshots.recorder.select_events(account_id, desc=True, limit=1)[0].state)  # type: ignore[union-attr]
        spacing = size // snapshots.SNAPSHOT_STATE_BYTES_PER_EVENT
        assert spacing > INTERVAL  # a few kB of holds
        for n in range(spacing + INTERVAL):
            apply(app, command("usage.debit", "acme", {"unit": "USD", "amount_subunits": 1, "meter": "m",
                                                       "at": NOW.isoformat()}, key=f"d{n}"))
        taken = stored_snapshots(app, account_id)
        assert taken[len(first)] - taken[len(first) - 1] >= spacing
    finally:
        app.close()


def test_a_graceful_stop_snapshots_the_cached_accounts_far_past_their_snapshot(store: Path) -> None:
    """``snapshot_lagging`` (the service's stop): the next process loads an account without replaying the events
    recorded since its latest snapshot; one only a few events past it is left to replay them."""
    app = ledger(store)
    assert app.snapshotter is not None
    app.snapshotter.interval_events = 10_000  # no regular snapshot during the test
    try:
        open_account(app, "acme", {"key": "g", "amount": "1000.00"})
        open_account(app, "quiet", {"key": "g", "amount": "1000.00"})
        apply(app, *[command("usage.debit", "acme", {"unit": "USD", "amount_subunits": 1, "meter": "m",
                                                     "at": NOW.isoformat()}, key=f"d{n}") for n in range(30)])
        acme, quiet = ids.account_id("acme"), ids.account_id("quiet")
        assert stored_snapshots(app, acme) == [] and stored_snapshots(app, quiet) == []
        version = app.read(acme, lambda a: a.version)
        assert version - app.read(quiet, lambda a: a.version) >= 20
        assert app.snapshot_lagging() == 1  # acme: 30 debits past no snapshot; quiet: a few events only
        assert stored_snapshots(app, acme) == [version] and stored_snapshots(app, quiet) == []
        assert app.read(acme, lambda a: a.version) == version  # still cached, unchanged
    finally:
        app.close()
    fresh, asked = ledger_asked(store)
    try:
        loaded = fresh.load_many([acme])[acme]
        assert asked == [{acme: version}]  # nothing to replay after the snapshot
        assert loaded.version == version
        assert state_of(fresh, loaded) == state_of(fresh, replayed(fresh, acme))
    finally:
        fresh.close()


def test_snapshots_at_a_stop_go_most_behind_first_within_the_time_allowed(store: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    app = ledger(store)
    assert app.snapshotter is not None
    app.snapshotter.interval_events = 10_000
    try:
        for tenant, debits in (("a", 25), ("b", 40)):
            open_account(app, tenant, {"key": "g", "amount": "1000.00"})
            apply(app, *[command("usage.debit", tenant, {"unit": "USD", "amount_subunits": 1, "meter": "m",
                                                         "at": NOW.isoformat()}, key=f"d{n}") for n in range(debits)])
        assert app.snapshotter.take_lagging(app.cache, seconds=0) == 0  # no time: nothing
        assert app.snapshotter.take_lagging(app.cache, events_min=30) == 1  # only "b" is 30 events behind
        assert stored_snapshots(app, ids.account_id("b")) and not stored_snapshots(app, ids.account_id("a"))
        apply(app, *[command("usage.debit", "b", {"unit": "USD", "amount_subunits": 1, "meter": "m",
                                                  "at": NOW.isoformat()}, key=f"e{n}") for n in range(30)])
        # Time for one snapshot (the clock: the deadline, then one look per aggregate): the most behind goes
        # first, "b" now 30 events past its snapshot, ahead of "a" at 27 past none.
        ticks = iter([0.0, 0.0, 10.0])
        monkeypatch.setattr(snapshots, "time", type("Clock", (), {"monotonic": staticmethod(lambda: next(ticks))}))
        assert app.snapshotter.take_lagging(app.cache, seconds=5) == 1
        monkeypatch.undo()
        assert len(stored_snapshots(app, ids.account_id("b"))) == 2 and not stored_snapshots(app, ids.account_id("a"))
    finally:
        app.close()

"""Every read model, fed the ledger's real events, agrees with the ledger's own aggregate."""

from __future__ import annotations

import json
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from billing_projections import ai_usage, balances, figures, history, usage_monthly
from billing_projections import service as service_module
from billing_projections.service import ProjectionService

from tests.unit.projections.conftest import apply, dump, dumps_by_batching, sqlite_service
from tests.unit.projections.ledger_events import (
    T0,
    Ledger,
    U,
    full_scenario,
    simple_account,
    uid,
    usage_cause,
)


async def test_wallet_and_grant_balances_equal_the_ledger(service: ProjectionService) -> None:
    ledger = Ledger()
    account = full_scenario(ledger)
    await apply(service, ledger.records())
    wallets = {w["unit"]: w for w in await balances.wallets(service.db, "acme")}
    for unit in ("USD", "CREDIT"):
        assert int(wallets[unit]["balance"]) == account.balance(unit), unit
        assert int(wallets[unit]["held"]) == account.held(unit), unit
        assert int(wallets[unit]["receivable"]) == account.receivable(unit), unit
    assert wallets["USD"]["low_balance_threshold"] == 50 * U
    assert wallets["USD"]["low_balance_reached_at"] is not None and wallets["USD"]["low_balance_alerts"] == 1
    grants = {g["grant_id"]: g for g in await balances.grants(service.db, "acme")}
    expected = {g["grant_id"]: g for g in account.grant_balances()}
    assert set(grants) == set(expected)
    for gid, g in expected.items():
        assert int(grants[gid]["remaining"]) == g["remaining"], g
        assert grants[gid]["status"] == g["status"], g
        assert int(grants[gid]["refunded"]) == g["refunded"]


async def test_history_has_every_movement_with_cause_and_user(service: ProjectionService) -> None:
    ledger = Ledger()
    account = full_scenario(ledger)
    await apply(service, ledger.records())
    rows = await history.page(service.db, tenant="acme", limit=1000)
    types = [r["type"] for r in reversed(rows)]
    assert types[:4] == ["purchase", "grant", "grant", "grant"]
    for expected in ("usage", "usage_rejected", "expiry", "void", "refund", "adjustment", "hold_placed",
                     "hold_captured", "hold_released", "hold_expired", "receivable_settled"):
        assert expected in types, expected
    # The rows of a unit sum to the wallet's balance and held credit, exactly.
    for unit in ("USD", "CREDIT"):
        assert sum(int(r["wallet_delta"]) for r in rows if r["unit"] == unit) == account.balance(unit)
        assert sum(int(r["held_delta"]) for r in rows if r["unit"] == unit) == account.held(unit)
    purchase = next(r for r in rows if r["type"] == "purchase")
    assert purchase["payment_id"] == "pi_123" and purchase["user_id"] == "service:payments"
    first_usage = next(r for r in reversed(rows) if r["type"] == "usage")
    assert json.loads(first_usage["event_ids"]) == ["evt-1"] and first_usage["user_id"] == "alice"
    assert first_usage["quantity"] == "23" and first_usage["meter"] == "api_calls"
    adjustment = next(r for r in rows if r["type"] == "adjustment")
    assert adjustment["user_id"] == "finance@test" and adjustment["detail"] in ("goodwill", "correction")
    positions = [r["position"] for r in rows]
    assert positions == sorted(positions, reverse=True)
    filtered = await history.page(service.db, tenant="acme", types=["usage"], meter="ai_tokens", user="bob",
                                  limit=100)
    assert [json.loads(r["event_ids"]) for r in filtered] == [["evt-2"]]


async def test_monthly_summaries_split_by_month_and_meter(service: ProjectionService) -> None:
    ledger = Ledger()
    full_scenario(ledger)
    await apply(service, ledger.records())
    rows = await usage_monthly.summaries(service.db, tenant="acme", year=None, month=None, meter=None,
                                         limit=100)
    got = {(r["period"], r["meter"], r["unit"]): (r["quantity"], int(r["cost"]), int(r["events"])) for r in rows}
    assert got[("2026-10", "api_calls", "USD")] == ("23", 4 * U + 600_000_000, 1)
    # November: 500 + 0 (give-back) calls; 100 USD debit minus a 1 USD give-back.
    assert got[("2026-11", "api_calls", "USD")] == ("500", 99 * U, 2)
    assert got[("2026-11", "ai_tokens", "USD")] == ("1500", 3_000, 2)
    assert got[("2026-11", "api_calls", "CREDIT")] == ("5", 250 * U, 1)
    assert got[("2026-11", "holds", "USD")] == ("0", 2 * U, 1)
    november = await usage_monthly.summaries(service.db, tenant="acme", year=2026, month=11, meter="ai_tokens",
                                             limit=100)
    assert [(r["meter"], r["quantity"]) for r in november] == [("ai_tokens", "1500")]


async def test_ai_usage_by_model_operation_and_user(service: ProjectionService) -> None:
    ledger = Ledger()
    full_scenario(ledger)
    await apply(service, ledger.records())
    by_model = await ai_usage.summary(service.db, tenant="acme", period="2026-11", year_prefix=None,
                                      group_by=("model",))
    got = {r["model"]: r for r in by_model}
    assert (got["gpt-large"]["input_tokens"], got["gpt-large"]["output_tokens"],
            got["gpt-large"]["cached_tokens"], got["gpt-large"]["tokens"]) == (1000, 150, 50, 1200)
    assert got["gpt-large"]["cost"] == 2_400
    assert (got["gpt-small"]["input_tokens"], got["gpt-small"]["tokens"], got["gpt-small"]["cost"]) == (300, 300, 600)
    by_user = await ai_usage.summary(service.db, tenant="acme", period=None, year_prefix="2026-",
                                     group_by=("operation", "user_id"))
    assert {(r["operation"], r["user_id"]): r["tokens"] for r in by_user} == {("chat", "bob"): Decimal(1200),
                                                                           ("embed", "alice"): Decimal(300)}


async def test_dashboard_figures_per_day_and_month(service: ProjectionService) -> None:
    ledger = Ledger()
    full_scenario(ledger)
    await apply(service, ledger.records())
    months = {(r["bucket"], r["unit"]): r for r in await figures.series(service.db, tenant=None, granularity="month",
                                                                       since=None, until=None)}
    october, november = months[("2026-10", "USD")], months[("2026-11", "USD")]
    assert (october["top_ups"], october["tax_collected"], october["funds_in"]) == (100 * U, 20 * U, 120 * U)
    assert october["promotional"] == 15 * U and october["consumed"] == 4 * U + 600_000_000
    assert november["breakage"] == 5 * U - 0  # the 5 USD manual grant lapsed unspent (priority 5: drawn last)
    assert (november["refunds"], november["tax_refunded"]) == (12 * U, 2 * U)
    assert november["adjustments"] == 2 * U and november["settlements"] == 5 * U
    assert november["consumed"] == 3_000 + 2 * U + 100 * U - U
    assert months[("2026-10", "CREDIT")]["plan_grants"] == 1000 * U
    days = await figures.series(service.db, tenant="acme", granularity="day", since="2026-11-01", until="2026-11-02",
                                unit="USD")
    assert [d["bucket"] for d in days] == ["2026-11-01"]


async def test_adjustments_figure_counts_an_override_refund_of_adjusted_credit(service: ProjectionService) -> None:
    # 100.00 bought, 30.00 used, 40.00 removed by finance, then the whole grant refunded with the override: the
    # ledger takes the removed 40.00 back from manual_adjustment (GrantRefunded.from_adjustment), so the net manual
    # corrections the dashboard shows are 0, not -40.00, agreeing with the chart of accounts.
    ledger = Ledger()
    a = ledger.open("acme")
    purchase = uid("acme", "purchase")
    a.grant_credit(grant_id=purchase, unit="USD", amount=100 * U, effective_at=T0, expires_at=None, scope=None,
                   source="purchase", cause={"payment_id": "pi_1"}, granted_by="service:payments")
    a.debit_usage(command_id=uid("acme", "u1"), unit="USD", amount=30 * U, meter="api_calls", at=T0,
                  overage_policy="overage", cause=usage_cause("evt-1", "30"))
    a.adjust(adjustment_id=uid("acme", "adj-"), unit="USD", amount=-40 * U, reason="double grant",
             user="finance@test", at=T0 + timedelta(hours=1))
    a.refund_grant(grant_id=purchase, amount=100 * U, refund_id=uid("acme", "refund"), at=T0 + timedelta(hours=2),
                   finance_override=True, cause={"payment_id": "re_1"})
    ledger.save(a)
    await apply(service, ledger.records())
    [october] = await figures.series(service.db, tenant="acme", granularity="month", since=None, until=None)
    chart = {r["ledger_account"]: int(r["amount"]) for r in await balances.ledger_balances(service.db, "acme")}
    assert october["adjustments"] == chart["manual_adjustment"] == 0
    assert (october["refunds"], october["consumed"]) == (100 * U, 30 * U)


async def test_adjustments_figure_counts_a_gateway_refund_taking_back_adjusted_usage_reversal_credit(
        service: ProjectionService) -> None:
    # 100.00 bought and used, expired, 60.00 of its usage given back as usage_reversal credit, 20.00 of that removed
    # by finance, then the gateway refunds the 100.00: the refund takes the removed 20.00 back from manual_adjustment
    # (GrantRefunded.reclaimed.from_adjustment), not owed again; the dashboard's adjustments and receivables agree
    # with the chart of accounts (0 and 0).
    ledger = Ledger()
    a = ledger.open("acme")
    purchase = uid("acme", "purchase")
    a.grant_credit(grant_id=purchase, unit="USD", amount=100 * U, effective_at=T0, expires_at=T0 + timedelta(days=1),
                   scope=None, source="purchase", cause={"payment_id": "pi_1"}, granted_by="service:payments")
    a.debit_usage(command_id=uid("acme", "u1"), unit="USD", amount=100 * U, meter="api_calls", at=T0,
                  overage_policy="overage", cause=usage_cause("evt-1", "100"))
    a.expire_grants(T0 + timedelta(days=2))
    a.debit_usage(command_id=uid("acme", "u2"), unit="USD", amount=-60 * U, meter="api_calls",
                  at=T0 + timedelta(days=2, hours=1), overage_policy="overage", cause=usage_cause("evt-2", "-60"))
    a.adjust(adjustment_id=uid("acme", "adj-"), unit="USD", amount=-20 * U, reason="clawback",
             user="finance@test", at=T0 + timedelta(days=2, hours=2))
    a.refund_grant(grant_id=purchase, amount=100 * U, refund_id=uid("acme", "refund"),
                   at=T0 + timedelta(days=2, hours=3), finance_override=True, reclaim_reversed=True,
                   cause={"forced_by": "gateway"})
    ledger.save(a)
    await apply(service, ledger.records())
    months = await figures.series(service.db, tenant="acme", granularity="month", since=None, until=None)
    total = {name: sum(int(m[name]) for m in months) for name in ("adjustments", "receivables", "refunds")}
    chart = {r["ledger_account"]: int(r["amount"]) for r in await balances.ledger_balances(service.db, "acme")}
    assert total["adjustments"] == chart["manual_adjustment"] == 0
    assert total["receivables"] == chart.get("receivables", 0) == 0
    assert total["refunds"] == 100 * U


async def test_replays_and_re_relayed_events_change_nothing(service: ProjectionService) -> None:
    ledger = Ledger()
    full_scenario(ledger)
    records = ledger.records()
    await apply(service, records)
    before = await dump(service.db)
    await apply(service, records)  # the same records again (a consumer restarted from older offsets)
    # The ledger's relay crashed after publishing: the same events again, at new offsets.
    messages = [m for m in ledger.messages()]  # nothing new
    assert messages == []
    rerelayed = ledger.records([_as_message(r) for r in records])
    await apply(service, rerelayed)
    after = await dump(service.db)
    positions_before = before.pop("positions")
    positions_after = after.pop("positions")
    assert before == after
    assert [p[3] for p in positions_before] == [p[3] for p in positions_after]  # same last ledger position


async def test_batch_boundaries_do_not_change_any_row(tmp_path: Path) -> None:
    ledger = Ledger()
    full_scenario(ledger, "acme")
    for i in range(5):
        simple_account(ledger, f"t{i}", debits=40)
    records = ledger.records()
    dumps = await dumps_by_batching(records, tmp_path, seed=7, size_max=30)
    assert dumps[0] == dumps[1] == dumps[2]


async def test_schema_version_change_drops_and_replays(service: ProjectionService) -> None:
    ledger = Ledger()
    simple_account(ledger, "acme", debits=3)
    await apply(service, ledger.records())
    await service.db.execute("UPDATE projection_meta SET value = 'old' WHERE name = 'schema_version'")
    await service.setup()
    assert await service.db.fetchval("SELECT COUNT(*) FROM transactions") == 0
    assert await service.start_positions("billing.ledger.events", [0, 1]) == {0: 0, 1: 0}


def _as_message(record):  # type: ignore[no-untyped-def]
    from billing_runtime.bus import OutMessage

    return OutMessage(record.topic, record.key.decode(), record.value, record.headers)


async def test_a_restarted_service_looks_tenants_up_and_keeps_the_batch_order(tmp_path: Path) -> None:
    """A fresh service (empty account cache, as after a restart) gets a batch whose first events belong to
    accounts opened in an earlier batch, interleaved with accounts opened in this one: it looks the tenants up
    and writes exactly the rows a service that never restarted writes."""
    ledger = Ledger()
    olds = [simple_account(ledger, f"old{i}", debits=5) for i in range(4)]
    first = ledger.records()
    for i, old in enumerate(olds):
        account = ledger.get(old.id)
        account.debit_usage(command_id=uid(f"old{i}", "late"), unit="USD", amount=U // 5, meter="api_calls",
                            at=T0 + timedelta(minutes=5), overage_policy="overage", cause=usage_cause("late", "1"))
        ledger.save(account)
        simple_account(ledger, f"new{i}", debits=3)
    second = ledger.records()
    dumps = []
    for restart in (False, True):
        async with sqlite_service(tmp_path / f"restart-{restart}.sqlite") as service:
            await apply(service, first, batch=10_000)
            if restart:
                service = ProjectionService(service.db)
            await apply(service, second, batch=10_000)
            dumps.append(await dump(service.db))
    assert dumps[0] == dumps[1]
    usage = [row for row in dumps[1]["transactions"] if "usage" in row]
    assert len(usage) == 4 * 5 + 4 + 4 * 3  # every debit, none skipped


async def test_the_account_cache_is_bounded_between_batches_never_within_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """More accounts opened in one batch than the cache holds: none of their debits in that batch is lost
    (their Opened rows are not in the table before the batch commits, so a forgotten tenant could not be
    looked up); the cache is cut back before the next batch."""
    monkeypatch.setattr(service_module, "ACCOUNT_CACHE_ENTRIES_MAX", 3)
    ledger = Ledger()
    for i in range(8):
        simple_account(ledger, f"t{i}", debits=2)
    async with sqlite_service(tmp_path / "bounded.sqlite") as service:
        db = service.db
        await apply(service, ledger.records(), batch=10_000)
        usage = await db.fetch("SELECT DISTINCT tenant FROM transactions WHERE type = 'usage'")
        assert {row["tenant"] for row in usage} == {f"t{i}" for i in range(8)}
        assert len(service._tenants) > 3  # not cut within the batch
        simple_account(ledger, "later", debits=1)
        await apply(service, ledger.records(), batch=10_000)
        assert len(service._tenants) <= 3 + 1
        assert await db.fetchval("SELECT COUNT(*) FROM transactions WHERE tenant = 'later' AND type = 'usage'") == 1


async def test_a_correction_adds_the_difference_it_made_to_the_monthly_quantity(service: ProjectionService) -> None:
    """Rating's debit of a correction (500 calls amended to 700: 200 more, 0.40 USD at 0.002) and of a void
    (300 calls to 0): the month shows 1,000 + 700 calls, as its cost does, not 1,000 + 500 + 700 + 300 + 0."""
    ledger = Ledger()
    a = simple_account(ledger, "acme")
    debits = [("e1", "1000", None, 2 * U), ("e2", "500", None, U), ("e3", "700", ("e2", "500"), 400_000_000),
              ("e4", "300", None, 600_000_000), ("e5", "0", ("e4", "300"), -600_000_000)]
    for i, (event, quantity, corrects, amount) in enumerate(debits):
        extra = {"corrects": corrects[0], "quantity_old": corrects[1], "quantity_new": quantity} if corrects else None
        cause = usage_cause(event, quantity, extra)
        a.debit_usage(command_id=uid("corr", i), unit="USD", amount=amount, meter="api_calls",  # < 0: give-back
                      at=T0 + timedelta(seconds=i), overage_policy="overage", cause=cause)
    ledger.save(a)
    await apply(service, ledger.records())
    [row] = await usage_monthly.summaries(service.db, tenant="acme", year=None, month=None, meter="api_calls",
                                          limit=10)
    assert (Decimal(row["quantity"]), Decimal(int(row["cost"])) / U) == (Decimal(1700), Decimal("3.40"))


async def test_a_count_meters_debits_recorded_before_contribution_count_one_per_event(service: ProjectionService
                                                                                     ) -> None:
    """Rating's debits of a ``count`` meter as recorded before they carried ``cause.contribution``, replayed: each
    counts what it moved the meter's running total by (5 requests then 3 then 4: 3 events; r2 amended to 9: none
    more; r3 voided: one less), as the invoice counts them (2), not the events' quantities (5 + 3 + 4 + 6 - 4 = 14).
    An AI meter's running totals count tokens: its debit counts its quantity; a close debit its line's quantity."""
    ledger = Ledger()
    a = simple_account(ledger, "acme")
    debits = [("r1", "5", "0", "1", None), ("r2", "3", "1", "2", None), ("r3", "4", "2", "3", None),
              ("c2", "9", "3", "3", ("r2", "3")), ("c3", "0", "3", "2", ("r3", "4"))]
    for i, (event, quantity, before, after, corrects) in enumerate(debits):
        extra = {"quantity_before": before, "quantity_after": after}
        if corrects:
            extra |= {"corrects": corrects[0], "quantity_old": corrects[1], "quantity_new": quantity}
        a.debit_usage(command_id=uid("count", i), unit="USD", amount=0, meter="requests",
                      at=T0 + timedelta(seconds=i), overage_policy="overage", cause=usage_cause(event, quantity, extra))
    a.debit_usage(command_id=uid("ai", 0), unit="USD", amount=0, meter="ai_tokens", at=T0, overage_policy="overage",
                  cause=usage_cause("t1", "1200", {"quantity_before": "0", "quantity_after": "1500",
                                                   "ai_prices": {"m1": {}}, "tokens": {"input": "1500"}}, model="m1"))
    a.debit_usage(command_id=uid("close", 0), unit="USD", amount=0, meter="disk", at=T0, overage_policy="overage",
                  cause={"quantity": "12", "closed": True, "event_count": 2, "aggregation": "max", "period": "2026-11"})
    ledger.save(a)
    await apply(service, ledger.records())
    rows = await usage_monthly.summaries(service.db, tenant="acme", year=None, month=None, meter=None,
                                         limit=10)
    assert {r["meter"]: (Decimal(r["quantity"]), int(r["events"])) for r in rows} == {
        "requests": (Decimal(2), 5), "ai_tokens": (Decimal(1200), 1), "disk": (Decimal(12), 2)}

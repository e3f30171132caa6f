"""The read side of a plan credit set aside at its period's end (``GrantSetAside``, session 13): the balance API, the
accounts list and the dashboard's balance card show it as ``late_usage_reserve``, out of ``available``, as the ledger
decides (``balance = available + held + late_usage_reserve``), from the ledger's events alone. Before, for the 35 days
such a credit stays open for its period's late usage, the balance API showed it available while the ledger refused
``block`` usage and raised its low-balance alert on it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from billing_events import ids
from billing_events.money import format_subunits, resolve_unit
from billing_ledger.limits import RECURRING_CREDIT_LATE_USAGE_DAYS
from billing_ledger.sweeper import Sweeper
from billing_projections import lists
from billing_projections.balances import GRANTS
from billing_projections.service import ProjectionService

from tests.unit.projections.conftest import apply, dumps_by_batching
from tests.unit.projections.ledger_events import (
    LATE_USAGE_CATALOG,
    NOV_1,
    Ledger,
    period_ended_scenario,
    usage_debit,
)
from tests.unit.projections.test_api import api_client, auth
from tests.unit.projections.test_dashboard_pages import text_of

DEC_1 = datetime(2026, 12, 1, tzinfo=UTC)
NOV_25 = datetime(2026, 11, 25, tzinfo=UTC)
LAPSES = DEC_1 + timedelta(days=RECURRING_CREDIT_LATE_USAGE_DAYS)
USD = resolve_unit("USD", {})


def _ledger_wallet(ledger: Ledger) -> dict[str, Any]:
    """What the ledger decides with, as the API shows amounts."""
    a = ledger.get(ids.account_id("acme"))
    figures = {"balance": a.balance("USD"), "available": a.available("USD"), "held": a.held("USD"),
               "late_usage_reserve": a.late_usage_reserve("USD")}
    return {name: format_subunits(value, USD) for name, value in figures.items()}


async def _api_wallet(service: ProjectionService) -> dict[str, Any]:
    async with api_client(service.db) as client:
        body = (await client.get("/v1/accounts/acme/balance", headers=auth("viewer", "acme"))).json()
    [usd] = body["wallets"]
    return usd  # type: ignore[no-any-return]


async def test_the_balance_api_shows_the_credit_set_aside_apart_from_what_is_available_as_the_ledger_decides(
        service: ProjectionService) -> None:
    ledger = Ledger()
    period_ended_scenario(ledger)
    # New usage after the period's end with the ``block`` policy: refused, nothing in the wallet can pay it.
    usage_debit(ledger, "acme", "3.00", DEC_1 + timedelta(hours=1), policy="block", period=DEC_1)
    assert [e.spendable for e in ledger.app.events.get(ids.account_id("acme"))
            if type(e).__name__ == "UsageRejected"] == [0]
    await apply(service, ledger.records())
    wallet = await _api_wallet(service)
    assert (wallet["available"], wallet["balance"]) == ("0.00", "6.00")  # it showed 6.00 available
    assert {k: wallet[k] for k in ("balance", "available", "held", "late_usage_reserve")} == _ledger_wallet(ledger) == {
        "balance": "6.00", "available": "0.00", "held": "0.00", "late_usage_reserve": "6.00"}
    assert wallet["low_balance"] is True and wallet["low_balance_reached_at"] is not None  # below 5.00 since Dec 1

    # The seats' close debit (3.00, read at Nov 25) after the renewal draws November's credit set aside.
    usage_debit(ledger, "acme", "3.00", NOV_25, meter="seats")
    await apply(service, ledger.records())
    assert {k: (await _api_wallet(service))[k] for k in ("balance", "available", "late_usage_reserve")} == {
        "balance": "3.00", "available": "0.00", "late_usage_reserve": "3.00"}

    # At the window's end the sweep lapses the 3.00 left to breakage: nothing set aside any more.
    Sweeper(ledger.app).sweep(LAPSES)
    await apply(service, ledger.records())
    wallet = await _api_wallet(service)
    assert {k: wallet[k] for k in ("balance", "available", "held", "late_usage_reserve")} == _ledger_wallet(ledger) == {
        "balance": "0.00", "available": "0.00", "held": "0.00", "late_usage_reserve": "0.00"}


async def test_the_grants_accounts_list_and_dashboard_card_show_the_same_figures(
        service: ProjectionService) -> None:
    ledger = Ledger()
    period_ended_scenario(ledger)
    ledger.command("credit.grant", "acme", at=DEC_1 + timedelta(hours=1), grant_key="bought", unit="USD",
                   amount="2.50")
    await apply(service, ledger.records())
    async with api_client(service.db) as client:
        grants = (await client.get("/v1/accounts/acme/grants", headers=auth("viewer", "acme"))).json()["items"]
        page = (await client.get("/dashboard/accounts/acme", headers=auth("viewer", "acme"))).text
    [account] = [a for a in await lists.accounts(service.db, DEC_1) if a["tenant"] == "acme"]
    [usd] = account["wallets"]
    assert (usd["available"], usd["balance"], usd["low_balance"]) == ("2.50", "8.50", True)  # was 8.50, not low
    assert text_of(page, "available-USD") == "2.50"
    assert (usd["late_usage_reserve"], text_of(page, "late-usage-reserve-USD")) == ("6.00", "6.00")
    plan = next(g for g in grants if g["source"] == "plan_recurrence")
    assert (plan["remaining"], plan["drawable_until"], plan["set_aside_at"]) == (
        "6.00", "2026-12-01T00:00:00.000000Z", "2026-12-01T00:00:00.000000Z")
    assert _ledger_wallet(ledger)["available"] == "2.50"


async def test_the_reserve_rebuilds_from_the_events_alone_whatever_the_batches(tmp_path: Path) -> None:
    """The sweep sets November's credit aside before the tick, late usage draws it, the tick renews: the read models
    from one event at a time, all at once, random slices and a replay of everything are the same rows."""
    ledger = Ledger()
    period_ended_scenario(ledger, "globex")
    for tenant in ("acme",):
        ledger.command("account.open", tenant, at=NOV_1, currency="USD")
        ledger.command("subscription.create", tenant, at=NOV_1, key="m", plan="included")
        usage_debit(ledger, tenant, "4.00", NOV_1 + timedelta(days=19))
    Sweeper(ledger.app).sweep(DEC_1 + timedelta(seconds=5))
    usage_debit(ledger, "acme", "1.00", NOV_25)  # late usage of November: from the reserve
    ledger.command("subscription.tick", "acme", at=DEC_1 + timedelta(seconds=30), key="m")
    records = ledger.records()
    assert sum(1 for r in records if b"GrantSetAside" in r.value) == 2
    dumps = await dumps_by_batching(records, tmp_path, seed=13, size_max=7, replay_all=True)
    assert dumps[0] == dumps[1] == dumps[2]
    column = ["grant_id", *GRANTS.columns].index("set_aside_at")
    assert sum(1 for row in dumps[0]["grants"] if row[column] is not None) == 2  # both November credits


async def test_a_credit_cut_by_an_immediate_cancel_shows_its_cut_and_reserve_as_the_ledger_decides(
        service: ProjectionService, tmp_path: Path) -> None:
    """Since session 14 an immediate cancel keeps the plan credit left for the usage of before the cut that comes late
    (``GrantKeptForLateUsage``): the grants list shows it drawable until the cut and open for 35 days after it, set
    aside; the seats' close debit after the cancel draws it, and the read models rebuild the same from the events."""
    ledger = Ledger()
    ledger.command("catalog.publish", None, at=NOV_1, document=LATE_USAGE_CATALOG, digest="late-usage-1")
    ledger.command("account.open", "acme", at=NOV_1, currency="USD")
    ledger.command("subscription.create", "acme", at=NOV_1, key="m", plan="included")  # 10.00, all of it credit
    usage_debit(ledger, "acme", "4.00", NOV_1 + timedelta(days=9))
    cut = NOV_1 + timedelta(days=15)
    ledger.command("subscription.cancel", "acme", at=cut, key="m", immediately=True)  # 5.00 credited back
    usage_debit(ledger, "acme", "3.00", cut - timedelta(days=1), meter="seats")  # rating's close, after the cancel
    records = ledger.records()
    await apply(service, records)
    wallet = await _api_wallet(service)
    assert {k: wallet[k] for k in ("balance", "available", "held", "late_usage_reserve")} == _ledger_wallet(ledger) == {
        "balance": "8.00", "available": "5.00", "held": "0.00", "late_usage_reserve": "3.00"}
    async with api_client(service.db) as client:
        grants = (await client.get("/v1/accounts/acme/grants", headers=auth("viewer", "acme"))).json()["items"]
    plan = next(g for g in grants if g["source"] == "plan_recurrence")
    assert (plan["remaining"], plan["drawable_until"], plan["set_aside_at"], plan["expires_at"]) == (
        "3.00", "2026-11-16T00:00:00.000000Z", "2026-11-16T00:00:00.000000Z", "2026-12-21T00:00:00.000000Z")
    Sweeper(ledger.app).sweep(cut + timedelta(days=RECURRING_CREDIT_LATE_USAGE_DAYS))
    lapsed = ledger.records()
    await apply(service, lapsed)
    assert {k: (await _api_wallet(service))[k] for k in ("balance", "available", "late_usage_reserve")} == {
        "balance": "5.00", "available": "5.00", "late_usage_reserve": "0.00"}
    dumps = await dumps_by_batching(records + lapsed, tmp_path, seed=14, size_max=5, replay_all=True)
    assert dumps[0] == dumps[1] == dumps[2]

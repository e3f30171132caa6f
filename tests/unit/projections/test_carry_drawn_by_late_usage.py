"""A plan credit carried into the next period's grant (rollover) that the ended period's late usage draws there after
the renewal: the grants list shows the next grant as it would have been granted had that usage come on time, its
``amount`` less the carry drawn, which it shows apart (``carry_drawn``), as the ledger decides (docs/ledger.md
"Included credit", *Credit kept for late usage*). Before session 15 its ``amount`` stayed the carry as at the renewal:
December's grant read 11.00 with 10.50 left though nothing of December had used it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from billing_events import ids
from billing_events.money import format_subunits, resolve_unit
from billing_projections.service import ProjectionService

from tests.unit.projections.conftest import apply, dumps_by_batching
from tests.unit.projections.ledger_events import NOV_1, Ledger, usage_debit
from tests.unit.projections.test_api import api_client, auth

DEC_1 = datetime(2026, 12, 1, tzinfo=UTC)
NOV_25 = datetime(2026, 11, 25, tzinfo=UTC)
USD = resolve_unit("USD", {})
# 10.00 a month, all of it credit, what is left carried into the next month's (capped at 2.00).
ROLLOVER_CATALOG: dict[str, Any] = {
    "meters": [{"code": "api_calls", "name": "API calls", "unit_of_measure": "call",
                "price": {"model": "per_unit", "unit": "USD", "unit_amount": "0.10"}},
               {"code": "seats", "name": "Seats", "unit_of_measure": "seat", "aggregation": "last",
                "price": {"model": "per_unit", "unit": "USD", "unit_amount": "3.00"}}],
    "plans": [{"code": "rolling", "name": "Rolling", "currency": "USD", "base_fee": "10.00",
               "recurring_credits": [{"unit": "USD", "amount": "10.00", "rollover": True, "rollover_cap": "2.00"}]}],
}


def _november(ledger: Ledger, tenant: str, *, seats_late: bool) -> None:
    """9.00 of calls in November, the seats' 0.50 close debit (last reading Nov 25) before the Dec 1 renewal or, as
    rating sends it, after: the renewal carries the 1.00 left (or the 0.50 left) into December's grant."""
    ledger.command("account.open", tenant, at=NOV_1, currency="USD")
    ledger.command("subscription.create", tenant, at=NOV_1, key="m", plan="rolling")
    usage_debit(ledger, tenant, "9.00", NOV_1 + timedelta(days=19))
    if not seats_late:
        usage_debit(ledger, tenant, "0.50", NOV_25, meter="seats")
    ledger.command("subscription.tick", tenant, at=DEC_1, key="m")
    if seats_late:
        usage_debit(ledger, tenant, "0.50", NOV_25, meter="seats")


async def _december_grant(service: ProjectionService, tenant: str) -> dict[str, Any]:
    async with api_client(service.db) as client:
        grants = (await client.get(f"/v1/accounts/{tenant}/grants", headers=auth("viewer", tenant))).json()["items"]
    [december] = [g for g in grants if g["source"] == "plan_recurrence" and g["effective_at"].startswith("2026-12-01")]
    return {k: december.get(k) for k in ("amount", "carry_drawn", "remaining")}


def _ledger_december(ledger: Ledger, tenant: str) -> dict[str, str]:
    """What the ledger holds of December's grant, as the API shows amounts."""
    account = ledger.get(ids.account_id(tenant))
    [december] = [g for g in account.grant_balances() if g["effective_at"] == DEC_1]
    shown = {"amount": december["amount"] - december["carry_drawn"], "carry_drawn": december["carry_drawn"],
             "remaining": december["remaining"]}
    return {k: format_subunits(v, USD) for k, v in shown.items()}


async def test_the_next_grant_shows_what_late_usage_left_of_its_carry_as_on_time(
        service: ProjectionService, tmp_path: Path) -> None:
    ledger = Ledger()
    ledger.command("catalog.publish", None, at=NOV_1, document=ROLLOVER_CATALOG, digest="rollover-1")
    _november(ledger, "early", seats_late=False)
    _november(ledger, "acme", seats_late=True)
    records = ledger.records()
    await apply(service, records)
    # December's grant took 1.00 of carry at the renewal; the seats drew 0.50 of it: it gives December 10.50, as on
    # time (it read 11.00 with 10.50 left, as if December had used 0.50 of it).
    december = await _december_grant(service, "acme")
    assert (december["amount"], december["remaining"]) == ("10.50", "10.50")
    assert december == _ledger_december(ledger, "acme") == {
        "amount": "10.50", "carry_drawn": "0.50", "remaining": "10.50"}
    assert await _december_grant(service, "early") == _ledger_december(ledger, "early") == {
        "amount": "10.50", "carry_drawn": "0.00", "remaining": "10.50"}
    async with api_client(service.db) as client:
        page = (await client.get("/dashboard/accounts/acme", headers=auth("viewer", "acme"))).text
    assert "0.50 of its carry drawn by the period before" in page

    # A give-back of the seats (a correction to 0) credits the carry back: December's grant is whole again.
    usage_debit(ledger, "acme", "-0.50", NOV_25, meter="seats")
    more = ledger.records()
    await apply(service, more)
    assert await _december_grant(service, "acme") == _ledger_december(ledger, "acme") == {
        "amount": "11.00", "carry_drawn": "0.00", "remaining": "11.00"}
    dumps = await dumps_by_batching(records + more, tmp_path, seed=15, size_max=4, replay_all=True)
    assert dumps[0] == dumps[1] == dumps[2]


DOWNGRADE_CATALOG: dict[str, Any] = {
    "meters": [{"code": "api_calls", "name": "API calls", "unit_of_measure": "call",
                "price": {"model": "per_unit", "unit": "USD", "unit_amount": "1.00"}}],
    "plans": [{"code": "pro", "name": "Pro", "currency": "USD", "base_fee": "1000.00",
               "recurring_credits": [{"unit": "USD", "amount": "1000.00"}]},
              {"code": "starter", "name": "Starter", "currency": "USD", "base_fee": "200.00",
               "recurring_credits": [{"unit": "USD", "amount": "200.00"}]}],
}


async def test_late_usage_of_before_a_downgrade_shows_the_old_allowance_it_drew_as_the_ledger_decides(
        service: ProjectionService) -> None:
    """Pro (1,000.00 of credit) to Starter on Nov 17 12:00 after 600.00 used; 150.00 of Nov 15 after it draw Starter's
    40.00 and 110.00 of Pro's allowance, which comes back into Pro's grant first (since session 15; they were owed).
    The wallet, the grants and the history's row of that debit agree with the ledger."""
    ledger = Ledger()
    ledger.command("catalog.publish", None, at=NOV_1, document=DOWNGRADE_CATALOG, digest="downgrade-1")
    ledger.command("account.open", "acme", at=NOV_1, currency="USD")
    ledger.command("subscription.create", "acme", at=NOV_1, key="m", plan="pro")
    usage_debit(ledger, "acme", "600.00", NOV_1 + timedelta(days=9))
    ledger.command("subscription.change", "acme", at=datetime(2026, 11, 17, 12, tzinfo=UTC), key="m", plan="starter")
    usage_debit(ledger, "acme", "150.00", NOV_1 + timedelta(days=14))
    await apply(service, ledger.records())
    account = ledger.get(ids.account_id("acme"))
    async with api_client(service.db) as client:
        headers = auth("viewer", "acme")
        [usd] = (await client.get("/v1/accounts/acme/balance", headers=headers)).json()["wallets"]
        grants = (await client.get("/v1/accounts/acme/grants", headers=headers)).json()["items"]
        rows = (await client.get("/v1/accounts/acme/transactions?type=usage", headers=headers)).json()["items"]
    assert (usd["receivable"], usd["late_usage_reserve"]) == ("1000.00", "250.00")  # Pro's invoice; 110.00 more owed
    assert (usd["balance"], usd["late_usage_reserve"]) == (
        format_subunits(account.balance("USD"), USD), format_subunits(account.late_usage_reserve("USD"), USD))
    assert sorted((g["amount"], g["remaining"]) for g in grants if g["source"] == "plan_recurrence") == [
        ("0.00", "0.00"), ("1000.00", "250.00")]
    late = rows[0]  # newest first
    # 150.00 of usage; the wallet: 360.00 of Pro's allowance back, 150.00 drawn (40.00 of Starter's, 110.00 of it).
    assert (late["amount"], late["wallet_delta"], late["detail"]) == (
        "-150.00", "210.00", "late usage; reinstated 360.00")

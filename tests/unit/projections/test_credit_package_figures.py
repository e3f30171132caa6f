"""Finance figures of credit packages granted in a credit unit: the money and VAT are counted in the currency,
and so is the revenue recognised as their credit is used (``money.recognise``).

A package of 10,000 + 1,000 CREDIT sold for USD 95.00 + 19 % VAT is bought twice through the ledger's own
checkout commands; one order is refunded in full (refund request), a quarter of the other's credit is refunded
by finance (``grant.refund``). The figures read model counts funds taken in, tax collected, refunds and tax
refunded in USD; the chart of accounts carries the USD clearing, deferred revenue and tax payable.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from uuid import uuid4

from billing_events import ids
from billing_projections import balances, figures, history
from billing_projections.service import ProjectionService
from billing_projections.views import load_units, transaction_view

from tests.unit.projections.conftest import apply, dumps_by_batching
from tests.unit.projections.ledger_events import T0, Ledger, U

CATALOG = {
    "credit_units": {"CREDIT": {"scale": 0}},
    "packages": [{"code": "credits-10k", "name": "10k credits", "unit": "CREDIT", "credits": "10000",
                  "bonus_credits": "1000", "price": "95.00", "currency": "USD"}],
    "tax_rules": [{"region": "DE", "rate": "0.19", "name": "DE VAT"}],
    "seller": {"name": "billing", "country": "DE"},
}
NOVEMBER = T0 + timedelta(days=5)  # T0 is 2026-10-30
CENT = U // 100


def buy(ledger: Ledger, key: str) -> str:
    placed = ledger.command("checkout.place", "acme", package="credits-10k", key=key, gateway="stripe").value
    assert (placed["quote"]["unit"], placed["quote"]["total"], placed["quote"]["tax"]) == ("CREDIT", "113.05", "18.05")
    ledger.command("order.paid_off_session", "acme", key=key, gateway="stripe", payment_id=f"pi_{key}",
                   amount="113.05", currency="USD")
    return str(placed["order_id"])


async def monthly_figures(service: ProjectionService) -> dict[tuple[str, str], dict]:  # type: ignore[type-arg]
    """acme's finance figures by (month, unit)."""
    return {(r["bucket"], r["unit"]): r for r in await figures.series(service.db, tenant="acme", granularity="month",
                                                                     since=None, until=None)}


def credit_packages(ledger: Ledger) -> str:
    ledger.command("catalog.publish", None, document=CATALOG, digest="packages-1")
    ledger.command("account.open", "acme", currency="USD")
    ledger.command("tax_profile.set", "acme", country="DE", business_name="Acme GmbH")
    kept = buy(ledger, "o1")
    buy(ledger, "o2")
    ledger.command("refund_request.create", "acme", at=NOVEMBER, key="r2", order="o2")
    ledger.command("refund_request.approve", "acme", at=NOVEMBER, key="r2")
    ledger.command("refund_request.complete", "acme", at=NOVEMBER, key="r2", gateway_refund="re_2")
    # Finance refunds a quarter of the other order's credit: a quarter of its money and VAT goes back.
    ledger.command("grant.refund", "acme", at=NOVEMBER, grant_id=str(ids.grant_id("acme", f"order/{kept}/purchase")),
                   refund_id=str(uuid4()), amount="2750", reason="goodwill")
    return kept


async def test_finance_figures_count_the_money_and_vat_of_credit_packages_in_the_currency(
        service: ProjectionService) -> None:
    ledger = Ledger()
    credit_packages(ledger)
    await apply(service, ledger.records())
    rows = await monthly_figures(service)
    october, november = rows[("2026-10", "USD")], rows[("2026-11", "USD")]
    assert october["funds_in"] == 2 * 11305 * CENT
    assert october["tax_collected"] == 2 * 1805 * CENT
    assert (october["refunds"], october["tax_refunded"]) == (0, 0)
    # The whole of o2 (113.05, VAT 18.05) and a quarter of o1 (23.75 + 4.51 VAT: a quarter of 18.05 floored to the
    # cent, as a gateway pays back; it was 4.5125).
    quarter_tax = 451 * CENT
    assert november["refunds"] == 11305 * CENT + 2375 * CENT + quarter_tax
    assert november["tax_refunded"] == 1805 * CENT + quarter_tax
    # The credit itself stays in its unit.
    assert rows[("2026-10", "CREDIT")]["top_ups"] == 2 * 11000 * U
    assert rows[("2026-10", "CREDIT")]["tax_collected"] == 0
    assert rows[("2026-11", "CREDIT")]["refunds"] == (11000 + 2750) * U

    # All tenants together (the finance dashboard's query) give the same USD figures.
    everyone = await figures.series(service.db, tenant=None, granularity="day", since=None, until=None, unit="USD")
    assert sum(r["tax_collected"] for r in everyone) == 2 * 1805 * CENT
    assert sum(r["tax_refunded"] for r in everyone) == 1805 * CENT + quarter_tax

    # The chart of accounts: what of the VAT is still owed, and the money still in clearing, in USD.
    chart = {(r["ledger_account"], r["unit"]): int(r["amount"]) for r in await balances.ledger_balances(service.db,
                                                                                                     "acme")}
    assert chart[("tax_payable", "USD")] == -(1805 * CENT - quarter_tax)
    assert chart[("deferred_revenue", "USD")] == -(9500 * CENT - 2375 * CENT)
    assert chart[("gateway_clearing", "USD")] == 11305 * CENT - 2375 * CENT - quarter_tax
    # The grants view keeps each grant's tax in its own unit: the VAT of a CREDIT grant is in USD, above.
    grants = await balances.grants(service.db, "acme", unit="CREDIT")
    assert {(g["source"], int(g["tax_amount"])) for g in grants} == {("purchase", 0)}


async def test_history_shows_the_money_paid_and_given_back_for_credit_packages(service: ProjectionService) -> None:
    ledger = Ledger()
    kept = credit_packages(ledger)
    await apply(service, ledger.records())
    rows = list(reversed(await history.page(service.db, tenant="acme", limit=1000)))
    money = [(r["type"], r["unit"], int(r["amount"]), int(r["wallet_delta"])) for r in rows if r["unit"] == "USD"]
    quarter_tax = 451 * CENT  # a quarter of 18.05, floored to the cent
    assert money == [
        ("payment", "USD", 11305 * CENT, 0),
        ("payment", "USD", 11305 * CENT, 0),
        ("payment_refund", "USD", -11305 * CENT, 0),  # the whole of o2
        ("payment_refund", "USD", -(2375 * CENT + quarter_tax), 0),  # a quarter of o1
    ]
    assert [r["payment_id"] for r in rows if r["type"] == "payment"] == ["pi_o1", "pi_o2"]
    first = next(r for r in rows if r["type"] == "payment")
    assert first["grant_id"] == str(ids.grant_id("acme", f"order/{kept}/purchase"))
    assert first["detail"] == f"net {9500 * CENT}, tax {1805 * CENT}"
    # Each payment sits next to the credit it bought, in the credit unit, on the wallet.
    credit = [(r["type"], int(r["amount"])) for r in rows if r["unit"] == "CREDIT" and r["type"] != "grant"]
    # The approved refund request of o2 reserved its credit (a hold) until the refund was booked.
    assert credit == [("purchase", 11000 * U), ("purchase", 11000 * U), ("hold_placed", -11000 * U),
                      ("hold_released", 11000 * U), ("refund", -11000 * U), ("refund", -2750 * U)]
    assert [r["type"] for r in await history.page(service.db, tenant="acme", types=["payment_refund"], limit=10)] == [
        "payment_refund", "payment_refund"]


async def test_credit_package_figures_do_not_depend_on_batching_or_replays(tmp_path: Path) -> None:
    ledger = Ledger()
    credit_packages(ledger)
    records = ledger.records()
    dumps = await dumps_by_batching(records, tmp_path, seed=7, size_max=5, replay_all=True)
    assert dumps[0] == dumps[1] == dumps[2]


def used_package(ledger: Ledger) -> None:
    """One package bought in October; a quarter of its credit used in November and its money recognised, then
    finance refunds the rest of the credit."""
    ledger.command("catalog.publish", None, document=CATALOG, digest="packages-1")
    ledger.command("account.open", "acme", currency="USD")
    ledger.command("tax_profile.set", "acme", country="DE", business_name="Acme GmbH")
    order = buy(ledger, "o1")
    ledger.command("usage.debit", "acme", at=NOVEMBER, unit="CREDIT", amount_subunits=2750 * U, meter="tokens")
    later = NOVEMBER + timedelta(hours=1)
    assert ledger.command("money.recognise", "acme", at=later, now=later.isoformat()).value == {"events": 1}
    assert ledger.command("money.recognise", "acme", at=later, now=later.isoformat()).value == {"events": 0}
    ledger.command("grant.refund", "acme", at=later, grant_id=str(ids.grant_id("acme", f"order/{order}/purchase")),
                   refund_id=str(uuid4()), amount="8250", reason="goodwill")


async def test_finance_figures_count_the_revenue_recognised_for_credit_packages_in_the_currency(
        service: ProjectionService) -> None:
    ledger = Ledger()
    used_package(ledger)
    await apply(service, ledger.records())
    rows = await monthly_figures(service)
    november = rows[("2026-11", "USD")]
    # A quarter of 11,000 CREDIT used: a quarter of USD 95.00 earned, in USD; the credit itself in CREDIT.
    assert (november["consumed"], november["breakage"]) == (2375 * CENT, 0)
    assert rows[("2026-11", "CREDIT")]["consumed"] == 2750 * U
    assert november["refunds"] == 7125 * CENT + 1353 * CENT  # three quarters of the net and of the VAT (to the cent)
    chart = {(r["ledger_account"], r["unit"]): int(r["amount"]) for r in await balances.ledger_balances(service.db,
                                                                                                     "acme")}
    assert chart[("recognised_revenue", "USD")] == -2375 * CENT
    assert chart.get(("deferred_revenue", "USD"), 0) == 0  # used or refunded: nothing of it deferred
    assert chart[("tax_payable", "USD")] == -(1805 * CENT - 1353 * CENT)


async def test_recognised_package_figures_do_not_depend_on_batching_or_replays(tmp_path: Path) -> None:
    ledger = Ledger()
    used_package(ledger)
    dumps = await dumps_by_batching(ledger.records(), tmp_path, seed=11, size_max=4, replay_all=True)
    assert dumps[0] == dumps[1] == dumps[2]


async def test_funds_in_are_the_money_received_for_bonuses_and_discounts_in_the_currency(
        service: ProjectionService) -> None:
    """A USD package of 100 + 20 bonus for 100.00 and a 100.00 top-up at 10 % off, both + 19 % VAT: funds in are
    the 119.00 + 107.10 the customer paid; the bonus and the discount are promotional."""
    ledger = Ledger()
    ledger.command("catalog.publish", None, digest="packages-2", document={
        **CATALOG, "packages": [{"code": "usd-100", "name": "100 USD", "unit": "USD", "credits": "100",
                                 "bonus_credits": "20", "price": "100.00", "currency": "USD"}],
        "promotions": [{"code": "TENOFF", "kind": "discount_percent", "value": "0.10"}]})
    ledger.command("account.open", "acme", currency="USD")
    ledger.command("tax_profile.set", "acme", country="DE", business_name="Acme GmbH")
    for key, what, total in (("p1", {"package": "usd-100"}, "119.00"),
                             ("t1", {"amount": "100", "promotion": "TENOFF"}, "107.10")):
        placed = ledger.command("checkout.place", "acme", key=key, gateway="stripe", **what).value
        assert placed["quote"]["total"] == total
        ledger.command("order.paid_off_session", "acme", key=key, gateway="stripe", payment_id=f"pi_{key}",
                       amount=total, currency="USD")
    await apply(service, ledger.records())
    october = (await monthly_figures(service))[("2026-10", "USD")]
    assert october["funds_in"] == (11900 + 10710) * CENT
    assert (october["top_ups"], october["tax_collected"]) == (19000 * CENT, (1900 + 1710) * CENT)
    assert october["promotional"] == (2000 + 1000) * CENT


async def top_up_refunded_in_part(service: ProjectionService, amount: str) -> None:
    """A 100.00 USD top-up paid with 19 % VAT (119.00), ``amount`` of its credit refunded by finance (``grant.refund``),
    projected."""
    ledger = Ledger()
    ledger.command("catalog.publish", None, document=CATALOG, digest="packages-1")
    ledger.command("account.open", "acme", currency="USD")
    ledger.command("tax_profile.set", "acme", country="DE", business_name="Acme GmbH")
    placed = ledger.command("checkout.place", "acme", amount="100", key="o1", gateway="stripe").value
    ledger.command("order.paid_off_session", "acme", key="o1", gateway="stripe", payment_id="pi_o1",
                   amount="119.00", currency="USD")
    ledger.command("grant.refund", "acme", at=NOVEMBER,
                   grant_id=str(ids.grant_id("acme", f"order/{placed['order_id']}/purchase")), refund_id=str(uuid4()),
                   amount=amount, reason="goodwill")
    await apply(service, ledger.records())


async def test_a_partial_refund_of_a_currency_top_up_shows_the_vat_paid_back(service: ProjectionService) -> None:
    """For comparison, a top-up in the currency itself (100.00 + 19 % VAT): finance refunds a quarter of its credit
    with ``grant.refund``; the history row and the figures show the 4.75 of VAT paid back with the 25.00."""
    await top_up_refunded_in_part(service, "25")
    [refund] = [r for r in await history.page(service.db, tenant="acme", limit=1000) if r["type"] == "refund"]
    assert (int(refund["amount"]), int(refund["wallet_delta"])) == (-25 * U, -25 * U)  # the credit, off the wallet
    assert transaction_view(refund, await load_units(service.db))["detail"] == "net 25.00, tax 4.75"
    november = (await monthly_figures(service))[("2026-11", "USD")]
    assert (int(november["refunds"]), int(november["tax_refunded"])) == (2975 * CENT, 475 * CENT)


async def test_a_refund_of_a_third_of_a_top_up_shows_whole_cents_of_vat_paid_back(service: ProjectionService) -> None:
    """33.33 of a 100.00 + 19 % top-up refunded: the history row and the figures show 6.33 of VAT paid back (the
    running share floored to the cent, what a gateway can pay back), not 6.3327."""
    await top_up_refunded_in_part(service, "33.33")
    [refund] = [r for r in await history.page(service.db, tenant="acme", limit=1000) if r["type"] == "refund"]
    assert transaction_view(refund, await load_units(service.db))["detail"] == "net 33.33, tax 6.33"
    november = (await monthly_figures(service))[("2026-11", "USD")]
    assert (int(november["refunds"]), int(november["tax_refunded"])) == (3966 * CENT, 633 * CENT)

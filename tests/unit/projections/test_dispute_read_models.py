"""Disputes (chargebacks) in the read models: the transaction history shows each movement of a dispute as a
``dispute`` row (the chargeback's refund too, no longer a ``refund``), the finance figures count the money lost
disputes took back as ``chargebacks`` (not ``refunds``) and the funds gateways hold for open disputes as
``disputed``, the dashboard shows a chargebacks card, and any batching of the events gives the same rows.

Two top-ups of 100.00 + 19 % VAT are paid through the ledger's own commands; the first is disputed, its funds
withdrawn, and the dispute lost (a chargeback of 119.00); the second is disputed, withdrawn and won.
"""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from billing_events.messages import PaymentNotification
from billing_ledger.payment_commands import payment_command
from billing_projections import figures, history
from billing_projections.service import ProjectionService

from tests.unit.payments.support import CATALOG
from tests.unit.projections.conftest import apply, dumps_by_batching
from tests.unit.projections.ledger_events import T0, Ledger, U
from tests.unit.projections.test_api import auth
from tests.unit.projections.test_dashboard_pages import serving, text_of

CENT = U // 100
DISPUTED_AT = T0 + timedelta(days=3)  # 2026-11-02


def notify(ledger: Ledger, kind: str, order_id: str, event: str, dispute: str, **fields: Any) -> None:
    message = PaymentNotification(gateway="stripe", gateway_event_id=event, kind=kind, tenant="acme",  # type: ignore[arg-type]
                                  order_id=order_id, amount=Decimal("119.00"), currency="USD",
                                  verified_at=DISPUTED_AT, dispute=dispute, **fields)
    [result] = ledger.app.apply_commands([payment_command(message)])
    assert result.outcome == "applied", result


def disputed_top_ups(ledger: Ledger) -> None:
    ledger.command("catalog.publish", None, document=CATALOG, digest="disputes-1")
    ledger.command("account.open", "acme", currency="USD")
    ledger.command("tax_profile.set", "acme", country="DE", business_name="Acme GmbH")
    orders = {}
    for key in ("o1", "o2"):
        placed = ledger.command("checkout.place", "acme", amount="100", key=key, gateway="stripe").value
        ledger.command("order.paid_off_session", "acme", key=key, gateway="stripe", payment_id=f"pi_{key}",
                       amount="119.00", currency="USD")
        orders[key] = placed["order_id"]
    for key, dispute, outcome in (("o1", "dp_1", "lost"), ("o2", "dp_2", "won")):
        paid = f"pi_{key}"
        notify(ledger, "dispute_opened", orders[key], f"evt_{dispute}_open", dispute, gateway_reference=dispute,
               disputed_payment=paid)
        notify(ledger, "dispute_funds_withdrawn", orders[key], f"evt_{dispute}_w", dispute,
               gateway_reference=f"txn_{dispute}", disputed_payment=paid)
        notify(ledger, "dispute_closed", orders[key], f"evt_{dispute}_close", dispute,
               gateway_reference=f"{dispute}/{outcome}", disputed_payment=paid, dispute_outcome=outcome)


async def test_a_chargeback_is_a_dispute_in_the_history_and_in_its_own_figure(service: ProjectionService) -> None:
    ledger = Ledger()
    disputed_top_ups(ledger)
    await apply(service, ledger.records())
    rows = await history.page(service.db, tenant="acme", types=["dispute"], limit=100)
    seen = [(r["reference"], r["amount"], r["wallet_delta"], r["detail"]) for r in reversed(rows)]
    assert [(ref, amount, delta, detail) for ref, amount, delta, detail in seen if ref in ("dp_1", "dp_2")] == [
        ("dp_1", 0, 0, "opened"), ("dp_1", 0, 0, f"funds withdrawn {11900 * CENT}"), ("dp_1", 0, 0, "lost"),
        ("dp_2", 0, 0, "opened"), ("dp_2", 0, 0, f"funds withdrawn {11900 * CENT}"),
        ("dp_2", 0, 0, f"won; funds reinstated {11900 * CENT}")]
    # The chargeback itself: the 100.00 of credit left the wallet, with its 19.00 of VAT.
    [chargeback] = [row for row in rows if row["detail"].startswith("chargeback")]
    assert (chargeback["amount"], chargeback["wallet_delta"], chargeback["detail"]) == (
        -100 * U, -100 * U, f"chargeback dp_1; finance override; net {100 * U}, tax {19 * U}")
    assert await history.page(service.db, tenant="acme", types=["refund"], limit=10) == []
    [november] = [r for r in await figures.series(service.db, tenant="acme", granularity="month", since="2026-11",
                                                  until=None) if r["unit"] == "USD"]
    assert (november["chargebacks"], november["chargeback_tax"], november["refunds"], november["disputed"]) == (
        11900 * CENT, 1900 * CENT, 0, 0)  # both withdrawals came back to clearing (one paid out as the chargeback)
    balances = {r["ledger_account"]: r["amount"] for r in await service.db.fetch(
        "SELECT ledger_account, amount FROM ledger_balances WHERE tenant = 'acme' AND unit = 'USD'")}
    assert (balances["gateway_clearing"], balances["disputed_funds"]) == (11900 * CENT, 0)  # o2's money stays


async def test_the_dashboard_shows_the_months_chargebacks_on_their_own_card(service: ProjectionService) -> None:
    ledger = Ledger()
    disputed_top_ups(ledger)
    await apply(service, ledger.records())
    async with serving(service) as client:
        account = await client.get("/dashboard/accounts/acme?year=2026&month=11", headers=auth("viewer", "acme"))
        finance = await client.get("/dashboard/finance?year=2026&month=11", headers=auth("finance"))
        api = (await client.get("/v1/reports/figures?year=2026&month=11", headers=auth("finance"))).json()
    for page in (account, finance):
        assert page.status_code == 200
        assert (text_of(page.text, "figure-chargebacks-USD"), text_of(page.text, "figure-refunds-USD")) == (
            "119.00", "0.00")
        assert "Chargebacks (lost card disputes)" in page.text
    assert "Dispute (chargeback)" in account.text and "funds withdrawn 119.00" in account.text
    [usd] = [item for item in api["items"] if item["unit"] == "USD"]
    assert (usd["chargebacks"], usd["chargeback_tax"], usd["disputed"]) == ("119.00", "19.00", "0.00")


async def test_any_batching_of_a_disputes_events_gives_the_same_rows(tmp_path: Path) -> None:
    ledger = Ledger()
    disputed_with_fees(ledger)
    first, *others = await dumps_by_batching(ledger.records(), tmp_path, seed=13, size_max=4, replay_all=True)
    assert all(dump == first for dump in others)


def disputed_with_fees(ledger: Ledger) -> None:
    """The two disputes above, Stripe's 15.00 dispute fee on each withdrawal; the won one's fee given back with its
    close (its balance transactions net to no fee then)."""
    disputed_top_ups(ledger)
    for dispute, event, fee, minutes in (("dp_1", "evt_dp_1_fee", "15.00", 1), ("dp_2", "evt_dp_2_fee", "15.00", 1),
                                         ("dp_2", "evt_dp_2_back", "0", 2)):
        message = PaymentNotification(
            gateway="stripe", gateway_event_id=event, kind="dispute_opened", tenant="acme", order_id="-",
            amount=Decimal("119.00"), currency="USD", verified_at=DISPUTED_AT + timedelta(minutes=minutes),
            dispute=dispute, gateway_reference=dispute, dispute_fee=Decimal(fee), dispute_fee_currency="USD")
        [result] = ledger.app.apply_commands([payment_command(message)])
        assert result.outcome == "applied", result


async def test_dispute_fees_are_their_own_figure_and_dispute_rows_of_the_history(service: ProjectionService) -> None:
    ledger = Ledger()
    disputed_with_fees(ledger)
    await apply(service, ledger.records())
    rows = await history.page(service.db, tenant="acme", types=["dispute"], limit=100)
    fees = [(r["reference"], r["amount"], r["wallet_delta"], r["detail"]) for r in reversed(rows)
            if r["detail"].startswith("fee")]
    assert fees == [("dp_1", 0, 0, f"fee charged {15 * U}"), ("dp_2", 0, 0, f"fee charged {15 * U}"),
                    ("dp_2", 0, 0, f"fee given back {15 * U}")]
    [november] = [r for r in await figures.series(service.db, tenant="acme", granularity="month", since="2026-11",
                                                  until=None) if r["unit"] == "USD"]
    assert (november["dispute_fees"], november["chargebacks"]) == (15 * U, 11900 * CENT)
    balances = {r["ledger_account"]: r["amount"] for r in await service.db.fetch(
        "SELECT ledger_account, amount FROM ledger_balances WHERE tenant = 'acme' AND unit = 'USD'")}
    assert (balances["dispute_fees"], balances["gateway_clearing"]) == (15 * U, 11900 * CENT - 15 * U)
    async with serving(service) as client:
        finance = await client.get("/dashboard/finance?year=2026&month=11", headers=auth("finance"))
        api = (await client.get("/v1/reports/figures?year=2026&month=11", headers=auth("finance"))).json()
    assert text_of(finance.text, "figure-dispute_fees-USD") == "15.00" and "Dispute fees (gateways)" in finance.text
    [usd] = [item for item in api["items"] if item["unit"] == "USD"]
    assert usd["dispute_fees"] == "15.00"


async def test_a_partial_chargebacks_share_of_a_bonus_is_a_void_row_and_leaves_the_rest_of_the_grant(
        service: ProjectionService) -> None:
    """A package of 100.00 + 20.00 bonus for 119.00, a quarter of its payment lost to a dispute: the history shows the
    chargeback's refund and the 5.00 of the bonus voided, and the grants keep the rest (75.00 and 15.00)."""
    ledger = Ledger()
    disputed_top_ups(ledger)
    placed = ledger.command("checkout.place", "acme", package="usd-100", key="o3", gateway="stripe").value
    ledger.command("order.paid_off_session", "acme", key="o3", gateway="stripe", payment_id="pi_o3",
                   amount="119.00", currency="USD")
    message = PaymentNotification(gateway="stripe", gateway_event_id="evt_dp_3", kind="dispute_closed", tenant="acme",
                                  order_id=placed["order_id"], amount=Decimal("29.75"), currency="USD",
                                  verified_at=DISPUTED_AT, dispute="dp_3", gateway_reference="dp_3/lost",
                                  disputed_payment="pi_o3", dispute_outcome="lost")
    [result] = ledger.app.apply_commands([payment_command(message)])
    assert result.outcome == "applied", result
    await apply(service, ledger.records())
    voids = await history.page(service.db, tenant="acme", types=["void"], limit=10)
    assert [(r["amount"], r["wallet_delta"], r["detail"]) for r in voids] == [
        (-5 * U, -5 * U, "chargeback dp_3; order_charged_back")]
    charged_back = [r for r in await history.page(service.db, tenant="acme", types=["dispute"], limit=100)
                    if r["detail"].startswith("chargeback dp_3")]
    assert [(r["amount"], r["wallet_delta"]) for r in charged_back] == [(-25 * U, -25 * U)]
    grants = await service.db.fetch("SELECT source, remaining FROM grants WHERE tenant = 'acme' AND cause LIKE $1",
                                    f"%{placed['order_id']}%")
    assert sorted((r["source"], r["remaining"]) for r in grants) == [("promotion", 15 * U), ("purchase", 75 * U)]

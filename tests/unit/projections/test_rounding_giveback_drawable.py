"""Read-side of the session 9 ledger fixes: an invoice's usage-line rounding in the history, a give-back whose part
was absorbed, and a rollover credit's ``drawable_until`` on its grant row ("expiring soon" by the earlier end)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

from billing_ledger.domain.postings import account_balances
from billing_projections import balances, history, lists, views
from billing_projections.service import ProjectionService

from tests.unit.projections.conftest import apply
from tests.unit.projections.ledger_events import Ledger, U, uid, usage_cause

NOV_1 = datetime(2026, 11, 1, tzinfo=UTC)
DEC_1 = datetime(2026, 12, 1, tzinfo=UTC)
JAN_1 = datetime(2027, 1, 1, tzinfo=UTC)


async def _rows(service: ProjectionService, tenant: str) -> list[dict]:
    return list(reversed(await history.page(service.db, tenant=tenant, limit=1000)))


async def test_an_invoices_usage_line_rounding_and_its_reversal_are_listed_with_amount_unit_and_invoice(
        service: ProjectionService) -> None:
    ledger = Ledger()
    a = ledger.open("acme")
    for day in (3, 4, 5):  # 0.005 each beyond any credit: 0.015 of overage, exact to the sub-unit
        a.debit_usage(command_id=uid("acme", "d", day), unit="USD", amount=5 * U // 1000, meter="api_calls",
                      at=NOV_1 + timedelta(days=day), overage_policy="overage",
                      cause=usage_cause(f"e-{day}", "1"))
    a.invoice_overage(invoice="inv-1", units=["USD"], end=DEC_1, at=DEC_1)
    # Three lines of 0.01 each bill 0.03: 0.015 of rounding, receivable until paid; then the invoice is voided.
    assert a.round_invoiced_overage(invoice="inv-1", unit="USD", billed=3 * U // 100, bound=U, at=DEC_1) \
        == 15 * U // 1000
    a.return_invoiced_overage(invoice="inv-1", at=DEC_1 + timedelta(days=1))
    ledger.save(a)
    await apply(service, ledger.records())

    rows = await _rows(service, "acme")
    rounding = [r for r in rows if r["type"] in ("invoice_rounding", "invoice_rounding_reversed")]
    assert [(r["type"], r["unit"], int(r["amount"]), int(r["wallet_delta"]), r["reference"]) for r in rounding] == [
        ("invoice_rounding", "USD", -15 * U // 1000, 0, "inv-1"),  # owed 0.015 more: the lines rounded up
        ("invoice_rounding_reversed", "USD", 15 * U // 1000, 0, "inv-1"),
    ]
    assert all("inv-1" in (r["detail"] or "") for r in rounding)  # the dashboard shows the detail, not reference
    assert [history.type_label(r["type"]) for r in rounding] == ["Invoice rounding", "Invoice rounding reversed"]
    assert {"invoice_rounding", "invoice_rounding_reversed"} <= set(history.TYPES)  # the API's type filter
    filtered = await history.page(service.db, tenant="acme", types=["invoice_rounding"], limit=10)
    assert [r["reference"] for r in filtered] == ["inv-1"]
    units = await views.load_units(service.db)
    assert views.transaction_view(rounding[0], units)["amount"] == "-0.015"
    assert sum(int(r["wallet_delta"]) for r in rows) == a.balance("USD")


async def test_a_give_back_after_an_override_refund_says_what_was_absorbed_and_credits_only_the_rest(
        service: ProjectionService) -> None:
    ledger = Ledger()
    a, grant = _bought_and_used(ledger, expires_at=None)
    a.refund_grant(grant_id=grant, amount=60 * U, refund_id=uuid4(), at=NOV_1 + timedelta(days=2),
                   finance_override=True, cause={"payment_id": "re_1"})
    a.debit_usage(command_id=uid("acme", "back"), unit="USD", amount=-100 * U, meter="api_calls",
                  at=NOV_1 + timedelta(days=3), overage_policy="overage", cause=usage_cause("e-1", "0"))
    ledger.save(a)
    await apply(service, ledger.records())

    rows = await _rows(service, "acme")
    back = rows[-1]
    assert back["type"] == "usage" and int(back["amount"]) == 100 * U  # the usage given back
    assert int(back["wallet_delta"]) == 40 * U  # only the 40.00 not refunded comes back to the grant
    assert back["detail"] == f"give-back; absorbed {60 * U}"
    units = await views.load_units(service.db)
    assert views.transaction_view(back, units)["detail"] == "give-back; absorbed 60.00"
    # The balances were right already: the wallet and the grant hold 40.00.
    assert sum(int(r["wallet_delta"]) for r in rows) == a.balance("USD") == 40 * U
    [row] = await balances.grants(service.db, "acme")
    assert (int(row["remaining"]), int(row["refunded"])) == (40 * U, 60 * U)


async def test_a_rollover_credit_records_drawable_until_and_expires_soon_by_its_earlier_end(
        service: ProjectionService) -> None:
    ledger = Ledger()
    a = ledger.open("acme")
    rollover = uid("acme", "rollover")
    # A plan credit drawn only by November's usage, open until the renewal carries or lapses it (expires Jan 1).
    a.grant_credit(grant_id=rollover, unit="USD", amount=10 * U, effective_at=NOV_1, expires_at=JAN_1, scope=None,
                   source="plan_recurrence", cause={}, granted_by="service:subscriptions", drawable_until=DEC_1)
    a.grant_credit(grant_id=uid("acme", "plain"), unit="USD", amount=5 * U, effective_at=NOV_1, expires_at=JAN_1,
                   scope=None, source="promotion", cause={}, granted_by="admin@test")
    ledger.save(a)
    await apply(service, ledger.records())

    rows = {g["grant_id"]: g for g in await balances.grants(service.db, "acme")}
    assert rows[str(rollover)]["drawable_until"] == "2026-12-01T00:00:00.000000Z"
    assert rows[str(uid("acme", "plain"))]["drawable_until"] is None
    units = await views.load_units(service.db)
    for now, soon in ((NOV_1 + timedelta(days=26), 10 * U),  # 4 days before it stops being drawable
                      (DEC_1 + timedelta(hours=1), 0),  # past its period's end, before the tick: not spendable
                      (JAN_1 - timedelta(days=3), 5 * U)):  # only the plain grant expires soon
        view = await views.balance_view(service.db, "acme", now)
        assert view is not None
        assert view["wallets"][0]["expiring_soon"] == units.fmt(soon, "USD"), now
        assert (await balances.expiring(service.db, now, "acme")).get(("acme", "USD"), 0) == soon, now
        assert balances.expiring_soon(list(rows.values()), now).get("USD", 0) == soon, now
        [account] = [x for x in await lists.accounts(service.db, now) if x["tenant"] == "acme"]
        assert account["wallets"][0]["expiring_soon"] == units.fmt(soon, "USD"), now
    grant = views.grant_view(rows[str(rollover)], units, NOV_1 + timedelta(days=26))
    assert grant["drawable_until"] == "2026-12-01T00:00:00.000000Z" and grant["expiring_soon"] is True
    assert grant["expires_at"] == "2027-01-01T00:00:00.000000Z"


async def test_a_gateway_refund_that_takes_usage_reversal_credit_back_shows_it_and_what_is_owed(
        service: ProjectionService) -> None:
    ledger = Ledger()
    a, grant = _bought_and_used(ledger, expires_at=DEC_1)
    a.expire_grants(DEC_1)
    a.debit_usage(command_id=uid("acme", "back"), unit="USD", amount=-60 * U, meter="api_calls",
                  at=DEC_1 + timedelta(days=1), overage_policy="overage", cause=usage_cause("e-1", "200"))
    a.debit_usage(command_id=uid("acme", "spend"), unit="USD", amount=25 * U, meter="api_calls",
                  at=DEC_1 + timedelta(days=2), overage_policy="overage", cause=usage_cause("e-2", "125"))
    a.refund_grant(grant_id=grant, amount=100 * U, refund_id=uuid4(), at=DEC_1 + timedelta(days=3),
                   finance_override=True, reclaim_reversed=True, cause={"forced_by": "gateway"})
    ledger.save(a)
    await apply(service, ledger.records())

    rows = await _rows(service, "acme")
    refund = rows[-1]
    assert refund["type"] == "refund" and int(refund["amount"]) == -100 * U
    assert int(refund["wallet_delta"]) == -35 * U  # the unspent usage_reversal credit taken back
    units = await views.load_units(service.db)
    assert views.transaction_view(refund, units)["detail"] == \
        "finance override; usage_reversal credit taken back 60.00; owed 25.00"
    assert sum(int(r["wallet_delta"]) for r in rows) == a.balance("USD") == 0
    [wallet] = await balances.wallets(service.db, "acme")
    assert (int(wallet["balance"]), int(wallet["receivable"])) == (0, 25 * U)
    assert {int(g["remaining"]) for g in await balances.grants(service.db, "acme")} == {0}


def _bought_and_used(ledger: Ledger, expires_at: datetime | None) -> tuple[Any, UUID]:
    """acme's 100.00 USD purchase grant (``pi_1``), all of it used on Nov 2 (event ``e-1``, 500 calls)."""
    a = ledger.open("acme")
    grant = uid("acme", "purchase")
    a.grant_credit(grant_id=grant, unit="USD", amount=100 * U, effective_at=NOV_1, expires_at=expires_at, scope=None,
                   source="purchase", cause={"payment_id": "pi_1"}, granted_by="service:payments")
    a.debit_usage(command_id=uid("acme", "use"), unit="USD", amount=100 * U, meter="api_calls",
                  at=NOV_1 + timedelta(days=1), overage_policy="block", cause=usage_cause("e-1", "500"))
    return a, grant


async def test_a_gateway_refund_of_a_credit_package_in_parts_takes_its_usage_reversal_credit_back_once(
        service: ProjectionService) -> None:
    """1,000 CREDIT bought for 50.00 + 10.00 VAT (money booked in USD), used up, expired; 600 of the usage given back
    as usage_reversal credit, 250 of it spent; the gateway refunds the package in two halves. The credit is taken
    back once in all (350 from the wallet, 250 owed), the USD money exactly once (60.00: the revenue recognised for
    the usage and the VAT), and each refund's history row says what it took back."""
    ledger = Ledger()
    ledger.publish_catalog({"credit_units": {"CREDIT": {"scale": 0}}, "meters": [{"code": "api_calls"}]})
    a = ledger.open("acme")
    grant = uid("acme", "package")
    a.grant_credit(grant_id=grant, unit="CREDIT", amount=1000 * U, effective_at=NOV_1, expires_at=DEC_1, scope=None,
                   source="purchase", cause={"order_id": "o1"}, granted_by="service:payments")
    a.book_purchase_money(grant_id=grant, currency="USD", net=50 * U, tax_amount=10 * U, at=NOV_1,
                          cause={"order_id": "o1"})
    a.debit_usage(command_id=uid("acme", "use"), unit="CREDIT", amount=1000 * U, meter="api_calls",
                  at=NOV_1 + timedelta(days=1), overage_policy="block", cause=usage_cause("e-1", "1000"))
    a.expire_grants(DEC_1)
    a.recognise_purchase_money(DEC_1)
    a.debit_usage(command_id=uid("acme", "back"), unit="CREDIT", amount=-600 * U, meter="api_calls",
                  at=DEC_1 + timedelta(days=1), overage_policy="overage", cause=usage_cause("e-1", "400"))
    a.debit_usage(command_id=uid("acme", "spend"), unit="CREDIT", amount=250 * U, meter="api_calls",
                  at=DEC_1 + timedelta(days=2), overage_policy="overage", cause=usage_cause("e-2", "250"))
    for day in (3, 4):
        a.refund_grant(grant_id=grant, amount=500 * U, refund_id=uid("acme", "refund", day),
                       at=DEC_1 + timedelta(days=day), finance_override=True, reclaim_reversed=True,
                       cause={"forced_by": "gateway"})
    recorded = list(a.pending_events)
    ledger.save(a)
    await apply(service, ledger.records())

    books = account_balances([line for e in recorded for line in getattr(e, "postings", [])])
    assert {k: v for k, v in books.items() if v and k[1] == "USD"} == {}  # 60.00 in, 60.00 back: nothing left
    assert {k: v for k, v in books.items() if v and k[1] == "CREDIT"} == {
        ("receivables", "CREDIT"): 250 * U, ("recognised_revenue", "CREDIT"): -250 * U}
    assert (a.available("CREDIT"), a.overage_receivable("CREDIT")) == (0, 250 * U)
    refunds = [e for e in recorded if type(e).__name__ == "GrantRefunded"]
    assert [e.reclaimed["amount"] if e.reclaimed else 0 for e in refunds] == [100 * U, 500 * U]
    rows = [r for r in await _rows(service, "acme") if r["type"] == "refund"]
    units = await views.load_units(service.db)
    assert [views.transaction_view(r, units)["detail"] for r in rows] == [
        "finance override; usage_reversal credit taken back 100", "finance override; usage_reversal credit taken back 500; owed 250"]
    assert [int(r["wallet_delta"]) for r in rows] == [-100 * U, -250 * U]
    wallet = {w["unit"]: w for w in await balances.wallets(service.db, "acme")}["CREDIT"]
    assert (int(wallet["balance"]), int(wallet["receivable"])) == (0, 250 * U)

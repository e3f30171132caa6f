"""An invoice finalized before session 13 in thousandths of KWD (12.957), paid what a gateway can charge (12.950):
the history lists the 0.007 written off next to the payment, and the figures and the chart of accounts leave nothing
receivable. Fed the ledger's real events (its own commands)."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from billing_events import money
from billing_ledger.domain.invoice import invoice_id
from billing_ledger.domain.subscription import subscription_id
from billing_projections import balances, figures, history
from billing_projections.service import ProjectionService

from tests.unit.projections.conftest import apply
from tests.unit.projections.ledger_events import T0, Ledger, U

FILS = U // 1000
CATALOG = {
    "plans": [{"code": "team-kwd", "name": "Team", "currency": "KWD", "base_fee": "12.340"}],
    "tax_rules": [{"region": "OM", "rate": "0.05", "name": "OM VAT"}],
    "seller": {"name": "billing", "country": "DE"},
}


async def test_an_old_invoice_paid_less_its_rounding_shows_the_write_off_and_leaves_nothing_owed(
        service: ProjectionService, monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = Ledger()
    with monkeypatch.context() as before_session_13:  # KWD billed in thousandths, as before session 13
        before_session_13.setattr(money, "CHARGED_DECIMALS_MAX", 3)
        ledger.command("catalog.publish", None, document=CATALOG, digest="kwd-1")
        ledger.command("account.open", "gulf", currency="KWD")
        ledger.command("tax_profile.set", "gulf", country="OM")
        ledger.command("subscription.create", "gulf", key="m", plan="team-kwd")
    sub = ledger.get(subscription_id("gulf", "m"))
    invoice = ledger.get(invoice_id("gulf", f"{sub.id}/{sub.period_start.isoformat()}"))
    assert invoice.total == Decimal("12.957")
    ledger.command("invoice.mark_paid", "gulf", at=T0 + timedelta(hours=1), invoice_id=str(invoice.id),
                   payment="pi_1", amount="12.950")
    await apply(service, ledger.records())

    rows = [r for r in reversed(await history.page(service.db, tenant="gulf", limit=100))
            if r["type"].startswith("invoice_")]
    assert [(r["type"], int(r["amount"])) for r in rows] == [
        ("invoice_billed", -12957 * FILS), ("invoice_charge_rounding", 7 * FILS), ("invoice_paid", 12950 * FILS)]
    assert str(invoice.id) in (rows[1]["detail"] or "") and rows[1]["reference"] == str(invoice.id)
    assert history.type_label("invoice_charge_rounding") == "Invoice charge rounding written off"
    [row] = await figures.series(service.db, tenant="gulf", granularity="month", since=None, until=None)
    assert (row["receivables"], row["settlements"], row["funds_in"], row["tax_collected"]) == (
        12950 * FILS, 12950 * FILS, 12950 * FILS, 617 * FILS)
    chart = {(r["ledger_account"], r["unit"]): int(r["amount"])
             for r in await balances.ledger_balances(service.db, "gulf")}
    assert chart.get(("receivables", "KWD"), 0) == 0
    assert (chart[("gateway_clearing", "KWD")], chart[("recognised_revenue", "KWD")]) == (12950 * FILS, 7 * FILS)

"""The fee a gateway charges the operator for a dispute (Stripe's 15.00 in the dispute's balance transactions, PayPal's
fee money movements) is booked as the operator's expense: Dr ``dispute_fees`` / Cr ``gateway_clearing``, following the
latest reading of the fee a notification of the dispute carries, so a fee given back on a won dispute comes back to
clearing, whatever order the notifications arrive in and however often. It was not booked at all before: clearing
showed 15.00 more than the gateway held."""

from __future__ import annotations

import json
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from billing_cli.main import app as cli
from billing_events.messages import PaymentNotification
from billing_ledger.application import LedgerApplication
from billing_ledger.audit import account_events, verify_store
from typer.testing import CliRunner

from tests.unit.payments.support import TENANT, ledger
from tests.unit.payments.test_disputes import PAID, dispute, paid_top_up, status
from tests.unit.payments.test_refund_before_payment import deliver, fresh
from tests.unit.payments.test_top_up_grants import books

__all__ = ["ledger"]


def with_fee(message: PaymentNotification, fee: str, code: str = "USD", later: int = 0) -> PaymentNotification:
    """The notification as ingest publishes it when the gateway's API shows ``fee`` for the dispute so far, verified
    ``later`` seconds after the message's own time."""
    return message.model_copy(update={"dispute_fee": Decimal(fee), "dispute_fee_currency": code,
                                      "verified_at": message.verified_at + timedelta(seconds=later)})


def fee_events(app: LedgerApplication) -> list[Any]:
    return [e for e in account_events(app, TENANT) if type(e).__name__ == "DisputeFeeBooked"]


def test_a_stripe_dispute_fee_is_the_operators_expense_and_stays_when_the_dispute_is_lost(
        ledger: LedgerApplication) -> None:
    order = paid_top_up(ledger)  # 119.00
    withdrawn = deliver(ledger, with_fee(dispute("dispute_funds_withdrawn", order, "119.00", "evt_w"), "15.00"))
    assert (withdrawn.outcome, withdrawn.value["fee_booked"]) == ("applied", "15.00")
    # Stripe took 119.00 and its 15.00 fee: both left clearing, the fee as an expense of the operator.
    assert books(ledger) == {("disputed_funds", "USD"): Decimal(119), ("dispute_fees", "USD"): Decimal(15),
                             ("gateway_clearing", "USD"): Decimal(-15), ("tax_payable", "USD"): Decimal(-19),
                             ("tenant_wallet", "USD"): Decimal(-100)}
    lost = deliver(ledger, with_fee(dispute("dispute_closed", order, "119.00", "evt_l", outcome="lost"), "15.00",
                                    later=60))
    assert (lost.outcome, lost.value["fee_booked"]) == ("applied", None)  # the same fee: nothing booked again
    assert books(ledger) == {("dispute_fees", "USD"): Decimal(15), ("gateway_clearing", "USD"): Decimal(-15)}
    assert status(ledger)["fee"] == 15 * 10**9  # type: ignore[index]
    assert verify_store(ledger, TENANT).ok


def test_a_fee_given_back_on_a_won_dispute_comes_back_to_clearing_in_any_order_of_the_notifications(
        tmp_path: Path) -> None:
    seen = []
    for name, reinstated_first in (("in-order", False), ("crossed", True)):
        app = fresh(tmp_path, name)
        try:
            order = paid_top_up(app)
            withdrawn = with_fee(dispute("dispute_funds_withdrawn", order, "119.00", "evt_w"), "15.00")
            # Stripe gives the fee back with the reinstatement: the dispute's balance transactions net to no fee.
            reinstated = with_fee(dispute("dispute_funds_reinstated", order, "119.00", "evt_r"), "0", later=60)
            won = with_fee(dispute("dispute_closed", order, "119.00", "evt_won", outcome="won"), "0", later=120)
            for message in ([reinstated, won, withdrawn] if reinstated_first else [withdrawn, reinstated, won]):
                assert deliver(app, message).outcome == "applied"
            assert [deliver(app, m).outcome for m in (withdrawn, reinstated, won)] == ["duplicate"] * 3
            seen.append(books(app))
            assert verify_store(app, TENANT).ok
        finally:
            app.close()
    assert seen == [PAID, PAID]  # the fee charged and given back: no expense, clearing as before the dispute


def test_a_fee_in_another_currency_than_the_accounts_is_recorded_unbooked_and_listed_for_a_person(
        tmp_path: Path) -> None:
    app = fresh(tmp_path, "ledger")
    try:
        order = paid_top_up(app)
        eur = deliver(app, with_fee(dispute("dispute_funds_withdrawn", order, "119.00", "evt_w"), "15.00", "EUR"))
        assert (eur.outcome, eur.value["fee_unbooked"]) == ("applied", True)
        assert ("dispute_fees", "USD") not in books(app)
        assert status(app)["fee_unbooked"] == {"unit": "EUR", "amount": 15 * 10**9}  # type: ignore[index]
        assert deliver(app, dispute("dispute_closed", order, "119.00", "evt_won", outcome="won")).outcome == "applied"
    finally:
        app.close()
    env = {"BILLING_DATA_DIR": str(tmp_path / "ledger"), "DATABASE_URL": "", "BILLING_NAMESPACE": ""}
    listed = CliRunner().invoke(cli, ["reconcile", "disputes", "--tenant", TENANT, "--format", "json"], env=env)
    assert listed.exit_code == 1, listed.output  # nothing open, but a fee to book by hand
    found = json.loads(listed.output)
    assert [(f["key"], f["status"], f["fee"], f["unbooked"]) for f in found["fees"]] == [
        ("stripe/dp_1", "won", "0.00", "15.00 EUR")]


def test_billing_reconcile_disputes_shows_each_disputes_fee(tmp_path: Path) -> None:
    app = fresh(tmp_path, "ledger")
    try:
        order = paid_top_up(app)
        for message in (with_fee(dispute("dispute_funds_withdrawn", order, "119.00", "evt_w"), "15.00"),
                        dispute("dispute_closed", order, "119.00", "evt_l", outcome="lost")):
            assert deliver(app, message).outcome == "applied"
    finally:
        app.close()
    env = {"BILLING_DATA_DIR": str(tmp_path / "ledger"), "DATABASE_URL": "", "BILLING_NAMESPACE": ""}
    table = CliRunner().invoke(cli, ["reconcile", "disputes", "--tenant", TENANT], env=env)
    assert table.exit_code == 0, table.output  # a fee booked is nothing to do
    assert "1 dispute fee(s) booked: 15.00 USD" in table.output
    assert f"{TENANT}  stripe/dp_1  lost  fee 15.00 USD" in table.output

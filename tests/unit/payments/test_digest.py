"""The daily income digest: yesterday's funds, tax, consumption and refunds from the ledger's events, emailed
once per UTC day over SMTP (aiosmtpd), with an injected clock; a restart does not resend it."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from billing_events import ids
from billing_events.messages import PaymentNotification
from billing_ledger.application import LedgerApplication
from billing_ledger.audit import account_events
from billing_ledger.digest import render, send_due, summarize
from billing_ledger.domain.checkout import order_id
from billing_ledger.limits import DIGEST_BACKFILL_DAYS_MAX
from billing_ledger.notifier import SmtpSettings
from billing_ledger.payment_commands import payment_command

from tests.support import Inbox
from tests.unit.payments.support import TENANT, command, ledger, run

__all__ = ["ledger"]


def apply(app: LedgerApplication, kind: str, payload: dict[str, Any], key: str) -> Any:
    [result] = app.apply_commands([command(kind, TENANT, payload, key)])
    assert result.outcome == "applied", result
    return result


def buy_package(app: LedgerApplication, key: str) -> dict[str, Any]:
    placed = apply(app, "checkout.place", {"package": "credits-10k", "key": key, "gateway": "stripe"}, f"{key}/place")
    quote = placed.value["quote"]
    apply(app, "order.paid_off_session", {"key": key, "gateway": "stripe", "payment_id": f"pi_{key}",
                                          "amount": quote["total"], "currency": quote["currency"]}, f"{key}/paid")
    return quote  # type: ignore[no-any-return]


def test_yesterdays_figures_are_emailed_once_per_day(ledger: LedgerApplication, smtp: tuple[Inbox, int]) -> None:
    inbox, port = smtp
    mail = SmtpSettings("127.0.0.1", port, "billing@localhost", "billing")
    today = datetime.now(UTC).date()

    quote = buy_package(ledger, "o1")  # 95.00 + 19 % DE VAT = 113.05 USD for 10 000 + 1 000 CREDIT
    assert (quote["total"], quote["tax"], quote["currency"]) == ("113.05", "18.05", "USD")
    buy_package(ledger, "o2")
    apply(ledger, "refund_request.create", {"key": "r2", "order": "o2"}, "r2/create")
    apply(ledger, "refund_request.approve", {"key": "r2"}, "r2/approve")
    apply(ledger, "refund_request.complete", {"key": "r2", "gateway_refund": "re_1"}, "r2/complete")
    notification = PaymentNotification(gateway="stripe", gateway_event_id="evt_plain", kind="payment_succeeded",
                                       tenant=TENANT, order_id="ext-1", amount=Decimal("20.00"), currency="USD",
                                       verified_at=datetime.now(UTC) - timedelta(seconds=1))
    assert ledger.apply_commands([payment_command(notification)])[0].outcome == "applied"
    assert run(ledger, "usage.debit", TENANT, "u1", unit="USD", amount_subunits=5 * 10**9, meter="api_calls",
               at=datetime.now(UTC).isoformat(), cause={}).outcome == "applied"
    assert run(ledger, "usage.debit", TENANT, "u2", unit="CREDIT", amount_subunits=1500 * 10**9, meter="api_calls",
               at=datetime.now(UTC).isoformat(), cause={}).outcome == "applied"

    shortly_after_midnight = datetime.combine(today + timedelta(days=1), time(0, 5), UTC)
    # Today's digest covers yesterday, when nothing was recorded; tomorrow's covers today.
    before = send_due(ledger, mail, "finance@operator.test", datetime.combine(today, time(23, 59), UTC))
    assert before is not None and before["day"] == (today - timedelta(days=1)).isoformat()
    assert (before["purchase_count"], before["funds_in"], before["consumed"]) == (0, {}, {})
    inbox.messages.clear()
    summary = send_due(ledger, mail, "finance@operator.test", shortly_after_midnight)
    assert summary is not None and summary["day"] == today.isoformat()
    assert summary["funds_in"] == {"USD": (11305 + 11305 + 2000) * 10**7}
    assert summary["tax_collected"] == {"USD": (1805 + 1805) * 10**7}
    assert summary["refunds"] == {"USD": 11305 * 10**7}
    assert summary["consumed"] == {"CREDIT": 1500 * 10**9, "USD": 5 * 10**9}
    assert (summary["purchase_count"], summary["refund_count"]) == (3, 1)

    [message] = inbox.messages
    assert message["To"] == "finance@operator.test" and message["Subject"] == f"Income digest {today}"
    body = message.get_payload()
    assert "Funds taken in: 246.10 USD" in body and "Tax collected: 36.10 USD" in body
    assert "Purchases: 3, refunds: 1" in body
    assert "Refunds: 113.05 USD" in body and "Credit consumed: 1500 CREDIT, 5.00 USD" in body

    # Later the same day, and after a restart (state is in the store): not sent again.
    assert send_due(ledger, mail, "finance@operator.test", shortly_after_midnight + timedelta(hours=20)) is None
    assert len(inbox.messages) == 1

    # The next day: a digest of a quiet day.
    quiet = send_due(ledger, mail, "finance@operator.test", shortly_after_midnight + timedelta(days=1))
    assert quiet is not None and quiet["day"] == (today + timedelta(days=1)).isoformat()
    assert quiet["funds_in"] == {} and quiet["purchase_count"] == 0
    assert "Funds taken in: none" in inbox.messages[-1].get_payload()


def test_without_smtp_nothing_is_recorded(ledger: LedgerApplication) -> None:
    tomorrow = datetime.now(UTC) + timedelta(days=1)
    assert send_due(ledger, None, "finance@operator.test", tomorrow) is None
    assert ledger.process_recorder.max_tracking_id("digest:day") is None


def test_credit_packages_count_their_money_and_refunds_in_the_currency(ledger: LedgerApplication) -> None:
    """A package granted in CREDIT: its booked money counts in USD, and so does a partial refund of its credit."""
    buy_package(ledger, "o1")  # 113.05 USD (18.05 VAT) for 11 000 CREDIT
    grant = str(ids.grant_id(TENANT, f"order/{order_id(TENANT, 'o1')}/purchase"))
    apply(ledger, "grant.refund", {"grant_id": grant, "refund_id": str(ids.grant_id(TENANT, "refund-1")),
                                   "amount": "2750", "reason": "goodwill"}, "refund-1")  # a quarter of the credit
    summary, _ = summarize(ledger, datetime.now(UTC).date(), 0)
    assert summary["funds_in"] == {"USD": 11305 * 10**7}
    assert summary["tax_collected"] == {"USD": 1805 * 10**7}
    # A quarter of the money paid: 23.75 + 4.51 VAT (floored to the cent), in USD (not 2750 CREDIT).
    assert summary["refunds"] == {"USD": (2375 + 451) * 10**7}
    assert (summary["purchase_count"], summary["refund_count"]) == (1, 1)


def test_refunds_count_what_left_clearing_when_a_partial_refund_precedes_the_gateway_reversal(
        ledger: LedgerApplication) -> None:
    """A 50.00 top-up (59.50 with VAT); finance refunds 20.00 of its credit (23.80 with its VAT), then the gateway's
    refund of the rest of the order (35.70) reverses it: 59.50 was paid back in all, not 23.80 + the order's 59.50."""
    placed = apply(ledger, "checkout.place", {"amount": "50", "key": "o1", "gateway": "stripe"}, "o1/place")
    apply(ledger, "order.paid_off_session", {"key": "o1", "gateway": "stripe", "payment_id": "pi_o1",
                                             "amount": "59.50", "currency": "USD"}, "o1/paid")
    grant = str(ids.grant_id(TENANT, f"order/{order_id(TENANT, 'o1')}/purchase"))
    apply(ledger, "grant.refund", {"grant_id": grant, "refund_id": str(ids.grant_id(TENANT, "refund-1")),
                                   "amount": "20", "reason": "goodwill"}, "refund-1")
    reversal = PaymentNotification(gateway="stripe", gateway_event_id="evt_refund", kind="refund_succeeded",
                                   tenant=TENANT, order_id=placed.value["order_id"], amount=Decimal("35.70"),
                                   currency="USD", verified_at=datetime.now(UTC), gateway_reference="re_1")
    assert ledger.apply_commands([payment_command(reversal)])[0].outcome == "applied"
    # The books: all 59.50 taken in went back out of the gateway's clearing.
    assert sum(line["amount"] for event in account_events(ledger, TENANT)
               for line in getattr(event, "postings", None) or [] if line["account"] == "gateway_clearing") == 0
    summary, _ = summarize(ledger, datetime.now(UTC).date(), 0)
    assert summary["funds_in"] == {"USD": 5950 * 10**7}
    assert summary["refunds"] == {"USD": 5950 * 10**7}  # not 23.80 + the order's total 59.50
    assert summary["refund_count"] == 2


def test_days_missed_while_no_ledger_ran_are_sent_afterwards_oldest_first(
        ledger: LedgerApplication, smtp: tuple[Inbox, int]) -> None:
    inbox, port = smtp
    mail = SmtpSettings("127.0.0.1", port, "billing@localhost", "billing")
    today = datetime.now(UTC).date()
    buy_package(ledger, "o1")  # recorded today: 113.05 USD
    first = send_due(ledger, mail, "finance@operator.test", datetime.combine(today - timedelta(days=2), time(1), UTC))
    assert first is not None and first["day"] == (today - timedelta(days=3)).isoformat()
    # The ledger was down for three days: the three digests due go out at once, each with its own day's figures.
    last = send_due(ledger, mail, "finance@operator.test", datetime.combine(today + timedelta(days=1), time(1), UTC))
    assert last is not None and last["day"] == today.isoformat() and last["funds_in"] == {"USD": 11305 * 10**7}
    subjects = [m["Subject"] for m in inbox.messages[1:]]
    assert subjects == [f"Income digest {today - timedelta(days=d)}" for d in (2, 1, 0)]
    assert "Funds taken in: none" in inbox.messages[1].get_payload()
    assert "Funds taken in: 113.05 USD" in inbox.messages[3].get_payload()
    assert send_due(ledger, mail, "finance@operator.test", datetime.combine(today + timedelta(days=1), time(2), UTC)) \
        is None and len(inbox.messages) == 4


def test_a_long_outage_sends_at_most_the_last_month_of_digests(ledger: LedgerApplication,
                                                               smtp: tuple[Inbox, int]) -> None:
    inbox, port = smtp
    mail = SmtpSettings("127.0.0.1", port, "billing@localhost", "billing")
    today = datetime.now(UTC).date()
    assert send_due(ledger, mail, "finance@operator.test", datetime.combine(today - timedelta(days=90), time(1), UTC))
    inbox.messages.clear()
    send_due(ledger, mail, "finance@operator.test", datetime.combine(today, time(1), UTC))
    assert len(inbox.messages) == DIGEST_BACKFILL_DAYS_MAX
    assert inbox.messages[0]["Subject"] == f"Income digest {today - timedelta(days=DIGEST_BACKFILL_DAYS_MAX)}"
    assert inbox.messages[-1]["Subject"] == f"Income digest {today - timedelta(days=1)}"


def test_the_digest_states_each_unit_at_its_own_scale() -> None:
    """A currency at its ISO 4217 minor digits (KWD: 3), a credit type at its catalogue scale (here 2), not the
    bare digits a credit amount used to be written with (``1500``)."""
    summary = {"day": "2026-11-21", "purchase_count": 1, "refund_count": 0, "funds_in": {"KWD": 12_960_000_000},
               "tax_collected": {}, "refunds": {}, "consumed": {"TOKENS": 1500 * 10**9, "KWD": 5 * 10**8},
               "chargebacks": {}, "chargeback_count": 0, "disputed": {}}
    body = render(summary, {"TOKENS": 2})
    assert "Funds taken in: 12.960 KWD" in body, body
    assert "Credit consumed: 1500.00 TOKENS, 0.500 KWD" in body, body


def test_chargebacks_are_reported_on_their_own_line_not_as_refunds(ledger: LedgerApplication) -> None:
    """A package (113.05) and a top-up (119.00) lost to disputes, another top-up (59.50) disputed and still open, a
    third (11.90) refunded: the refund is a refund, the two lost disputes are chargebacks, and what the gateway holds
    for the open one is held, as the projections' figures (``refunds``, ``chargebacks``, ``disputed``) count them."""
    from tests.unit.payments.test_disputes import dispute, lost
    from tests.unit.payments.test_refund_before_payment import deliver, notification
    from tests.unit.payments.test_top_up_grants import pay, place

    package, top_up, open_one, refunded = (place(ledger, "o1", package="credits-10k"), place(ledger, "o2", amount="100"),
                                           place(ledger, "o3", amount="50"), place(ledger, "o4", amount="10"))
    for order in (package, top_up, open_one, refunded):
        pay(ledger, order)
    for message in (dispute("dispute_funds_withdrawn", top_up, "119.00", "evt_w2", dispute_id="dp_2"),
                    dispute("dispute_closed", top_up, "119.00", "evt_l2", outcome="lost", dispute_id="dp_2"),
                    lost(package, "evt_l1"),
                    dispute("dispute_funds_withdrawn", open_one, "59.50", "evt_w3", dispute_id="dp_3"),
                    notification("refund_succeeded", refunded["order_id"], "11.90", "evt_r4", "re_4")):
        assert deliver(ledger, message).outcome == "applied"
    summary, _ = summarize(ledger, datetime.now(UTC).date(), 0)
    cent = 10**7
    assert summary["funds_in"] == {"USD": (11305 + 11900 + 5950 + 1190) * cent}
    assert summary["refunds"] == {"USD": 1190 * cent} and summary["refund_count"] == 1
    assert summary["chargebacks"] == {"USD": (11305 + 11900) * cent} and summary["chargeback_count"] == 2
    assert summary["disputed"] == {"USD": 5950 * cent}  # dp_2's withdrawal came back at its close
    text = render(summary)
    assert "Refunds: 11.90 USD" in text and "Chargebacks (lost disputes): 232.05 USD" in text
    assert "Held for open disputes (net): 59.50 USD" in text
    assert "refunds: 1, chargebacks: 2" in text


def test_a_chargeback_of_an_invoice_payment_is_a_chargeback_in_the_digest(tmp_path: Path) -> None:
    from tests.unit.payments.test_disputes import dispute, subscribed
    from tests.unit.payments.test_refund_before_payment import deliver
    from tests.unit.subscriptions.test_invoice_books import first_invoice
    from tests.unit.subscriptions.test_invoice_overage import run

    app = subscribed(tmp_path)
    try:
        run(app, "subscription.create", TENANT, key="m", plan="team")  # 30.00 + 5.70 VAT
        invoice = first_invoice(app)
        run(app, "invoice.mark_paid", TENANT, at=datetime.now(UTC), invoice_id=str(invoice.id), payment="pi_1")
        result = deliver(app, dispute("dispute_closed", str(invoice.id), "35.70", "evt_inv_lost", outcome="lost",
                                      payment="pi_1", invoice_id=str(invoice.id)))
        assert result.outcome == "applied", result
        summary, _ = summarize(app, datetime.now(UTC).date(), 0)
        assert summary["chargebacks"] == {"USD": 3570 * 10**7} and summary["chargeback_count"] == 1
        assert summary["refunds"] == {} and summary["refund_count"] == 0
    finally:
        app.close()


def test_dispute_fees_are_reported_on_their_own_line(ledger: LedgerApplication) -> None:
    """Stripe's 15.00 fee on two disputes' withdrawals, given back on the one that is won: the digest says what the
    day's disputes cost the operator, 15.00, as the projections' ``dispute_fees`` figure counts it."""
    from tests.unit.payments.test_dispute_fees import with_fee
    from tests.unit.payments.test_disputes import dispute
    from tests.unit.payments.test_refund_before_payment import deliver
    from tests.unit.payments.test_top_up_grants import pay, place

    first, second = place(ledger, "o1", amount="100"), place(ledger, "o2", amount="50")
    for order in (first, second):
        pay(ledger, order)
    for message in (with_fee(dispute("dispute_funds_withdrawn", first, "119.00", "evt_w1"), "15.00"),
                    with_fee(dispute("dispute_funds_withdrawn", second, "59.50", "evt_w2", dispute_id="dp_2"), "15.00"),
                    with_fee(dispute("dispute_closed", second, "59.50", "evt_won2", outcome="won", dispute_id="dp_2"),
                             "0", later=60)):
        assert deliver(ledger, message).outcome == "applied"
    summary, _ = summarize(ledger, datetime.now(UTC).date(), 0)
    assert summary["dispute_fees"] == {"USD": 1500 * 10**7}
    assert "Dispute fees (gateways): 15.00 USD" in render(summary)

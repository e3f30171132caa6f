"""Three-decimal currencies (KWD, BHD, JOD, OMR, TND) at the gateways: card payments take their thousandths with a
last digit of 0 (Stripe, Razorpay), so what the ledger bills in them (catalogue prices, a top-up's tax, an
invoice's lines) is in hundredths, and what the gateway charges is exactly what the ledger books. A gateway that
cannot take an order's currency or amount at all is refused before the order is placed.

The fake Stripe API refuses a three-decimal amount whose last digit is not 0, as Stripe does."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from uuid import UUID, uuid4

import httpx
import pytest
from billing_events import ids, money
from billing_events.messages import PaymentNotification
from billing_events.money import SUBUNITS_PER_UNIT, to_subunits
from billing_events.timeutil import utcnow
from billing_ledger.application import LedgerApplication, persistence_env
from billing_ledger.audit import account_events, export_lines, replay_lines, verify_store
from billing_ledger.domain.invoice import Invoice, invoice_id
from billing_ledger.domain.subscription import subscription_id
from billing_ledger.dunning import Dunning
from billing_ledger.gateways import paypal
from billing_ledger.payment_commands import payment_command
from billing_ledger.topups import process_pending

from tests.unit.payments.support import FakeStripe, client, command, headers, run, stripe_gateway

TENANT = "gulf"
NOV_1 = datetime(2026, 11, 1, tzinfo=UTC)
CATALOG = {
    "plans": [{"code": "team-kwd", "name": "Team", "currency": "KWD", "base_fee": "12.340"}],
    "packages": [{"code": "kwd-12", "name": "12.340 KWD of credit", "unit": "KWD", "credits": "12.340",
                  "price": "12.340", "currency": "KWD"}],
    "tax_rules": [{"region": "OM", "rate": "0.05", "name": "OM VAT"}],
    "seller": {"name": "billing", "country": "DE"},
}
URLS = {"success_url": "https://app.test/ok", "cancel_url": "https://app.test/cancel"}


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[LedgerApplication]:
    app = LedgerApplication(persistence_env(None, str(tmp_path / "ledger")))
    assert run(app, "catalog.publish", None, document=CATALOG, digest="kwd1").outcome == "applied"
    assert run(app, "account.open", TENANT, currency="KWD").outcome == "applied"
    assert run(app, "tax_profile.set", TENANT, country="OM", business_name="Gulf LLC").outcome == "applied"
    yield app
    app.close()


def books(app: LedgerApplication) -> dict[tuple[str, str], Decimal]:
    """The account's ledger accounts (debit positive) per unit, from every posting it recorded."""
    sums: dict[tuple[str, str], int] = defaultdict(int)
    for event in account_events(app, TENANT):
        for line in getattr(event, "postings", None) or []:
            sums[(line["account"], line["unit"])] += line["amount"]
    return {key: Decimal(amount) / SUBUNITS_PER_UNIT for key, amount in sums.items() if amount}


def add_card(app: LedgerApplication) -> None:
    assert run(app, "payment_method.add", TENANT, "pm", method_id="pm_card", gateway="stripe",
               label="card").outcome == "applied"
    assert run(app, "payment_customer.set", TENANT, "cus", gateway="stripe", customer="cus_1").outcome == "applied"


def test_a_price_finer_than_the_currency_is_charged_in_is_not_published(ledger: LedgerApplication) -> None:
    for document, what in [
        ({**CATALOG, "packages": [{**CATALOG["packages"][0], "price": "11.906", "credits": "11.906"}]},
         "package 'kwd-12': price 11.906 KWD"),
        ({**CATALOG, "plans": [{**CATALOG["plans"][0], "base_fee": "9.995"}]}, "plan 'team-kwd': base_fee 9.995 KWD"),
    ]:
        refused = run(ledger, "catalog.publish", None, document=document, digest=what)
        assert (refused.outcome, refused.reason) == ("rejected", "invalid_catalog"), refused
        assert f"{what} is finer than KWD is billed and charged in (0.010: card payments in three-decimal " \
               "currencies take a last digit of 0)" in (refused.detail or ""), refused.detail


def test_a_top_up_whose_tax_ends_in_a_thousandth_is_charged_and_booked_the_same(ledger: LedgerApplication) -> None:
    """12.340 KWD + 5 % tax: the total was 12.957, sent to Stripe as 12957 and refused there (the checkout failed
    with 502). The tax is billed in hundredths: 0.620, so Stripe charges 12960 and the ledger books 12.960."""
    api = FakeStripe()
    http = client(ledger, {"stripe": stripe_gateway(api)})
    placed = http.post(f"/v1/accounts/{TENANT}/checkout", headers={**headers(tenant=TENANT), "Idempotency-Key": "k1"},
                       json={"package": "kwd-12", "gateway": "stripe", **URLS})
    assert placed.status_code == 201, placed.text
    order = placed.json()
    assert (order["quote"]["net"], order["quote"]["tax"], order["quote"]["total"]) == ("12.340", "0.620", "12.960")
    [form] = [c[3] for c in api.calls if c[1] == "/v1/checkout/sessions"]
    assert (form["line_items[0][price_data][unit_amount]"], form["line_items[0][price_data][currency]"]) == (
        "12960", "kwd")
    paid = PaymentNotification(gateway="stripe", gateway_event_id="evt_1", kind="payment_succeeded", tenant=TENANT,
                               order_id=order["order_id"], amount=Decimal("12.960"), currency="KWD",
                               verified_at=utcnow(), gateway_reference="pi_1")
    [result] = ledger.apply_commands([payment_command(paid)])
    assert result.outcome == "applied", result
    assert books(ledger) == {("gateway_clearing", "KWD"): Decimal("12.960"), ("tax_payable", "KWD"): Decimal("-0.620"),
                             ("tenant_wallet", "KWD"): Decimal("-12.340")}


def test_a_partial_refund_pays_back_what_the_gateway_can_pay_back(ledger: LedgerApplication) -> None:
    """Money paid back goes through the gateway too, so in hundredths of KWD: a refund of 5.005 KWD of credit was
    taken, and a share of the tax was floored to the fils (5.000 of 12.340 of a 0.620 tax: 0.251), refunds of 5.xx5
    and 5.251 that Stripe cannot pay back. The share is floored to hundredths: 0.250."""
    placed = ledger.apply_commands([command("checkout.place", TENANT, {"key": "o1", "package": "kwd-12",
                                                                       "gateway": "stripe"})])[0]
    assert placed.outcome == "applied", placed
    paid = PaymentNotification(gateway="stripe", gateway_event_id="evt_1", kind="payment_succeeded", tenant=TENANT,
                               order_id=placed.value["order_id"], amount=Decimal("12.960"), currency="KWD",
                               verified_at=utcnow(), gateway_reference="pi_1")
    assert ledger.apply_commands([payment_command(paid)])[0].outcome == "applied"
    grant = str(ids.grant_id(TENANT, f"order/{placed.value['order_id']}/purchase"))
    before = books(ledger)
    refused = run(ledger, "grant.refund", TENANT, "r1", grant_id=grant, refund_id=str(uuid4()), amount="5.005",
                  reason="goodwill")
    assert (refused.outcome, refused.reason) == ("rejected", "invalid_command"), refused
    assert "finer than the currency is paid back in (0.010 KWD)" in (refused.detail or "")
    assert books(ledger) == before
    refunded = run(ledger, "grant.refund", TENANT, "r2", grant_id=grant, refund_id=str(uuid4()), amount="5",
                   reason="goodwill")
    assert refunded.outcome == "applied", refunded
    back = refunded.value["paid_back"]
    assert (back["amount"], back["tax_amount"]) == (to_subunits(Decimal("5.250")), to_subunits(Decimal("0.250")))


def test_a_gateway_that_cannot_take_the_currency_is_refused_before_the_order(ledger: LedgerApplication) -> None:
    requests: list[httpx.Request] = []
    transport = httpx.MockTransport(lambda r: requests.append(r) or httpx.Response(500))
    gateway = paypal.PayPalGateway("pp-client", "pp-secret", "https://paypal.api.test", 5, transport)
    http = client(ledger, {"paypal": gateway})
    refused = http.post(f"/v1/accounts/{TENANT}/checkout", headers={**headers(tenant=TENANT), "Idempotency-Key": "k2"},
                        json={"package": "kwd-12", "gateway": "paypal", **URLS})
    assert refused.status_code == 422, refused.text
    problem = refused.json()
    assert refused.headers["content-type"].startswith("application/problem+json")
    assert problem["reason"] == "amount_not_chargeable" and problem["detail"].startswith("PayPal does not take KWD")
    assert http.get(f"/v1/accounts/{TENANT}/orders/k2", headers=headers(tenant=TENANT)).status_code == 404
    assert requests == []


@pytest.mark.asyncio
async def test_a_subscription_invoice_is_dunned_for_what_it_bills(ledger: LedgerApplication) -> None:
    """The invoice's tax line was 0.617 KWD and its total 12.957: Stripe refused every attempt, which dunning took
    for a gateway outage and retried at every round, the invoice never paid nor past due."""
    add_card(ledger)
    [created] = ledger.apply_commands([command("subscription.create", TENANT, {
        "key": "main", "plan": "team-kwd", "at": NOV_1.isoformat()}, at=NOV_1)])  # issued then (dated then)
    assert created.outcome == "applied", created
    invoice = ledger.repository.get(invoice_id(TENANT, f"{subscription_id(TENANT, 'main')}/{NOV_1.isoformat()}"))
    assert [(line["kind"], line["amount"]) for line in invoice.lines] == [("base_fee", "12.340"), ("tax", "0.620")]
    assert invoice.total == Decimal("12.960")
    api = FakeStripe()
    dunning = Dunning(ledger, {"stripe": stripe_gateway(api)}, None, (0, 3, 5), now=lambda: NOV_1 + timedelta(hours=1))
    assert await dunning.process() == {str(invoice.id): "paid"}
    [form] = [c[3] for c in api.calls if c[1] == "/v1/payment_intents"]
    assert (form["amount"], form["currency"]) == ("12960", "kwd")
    assert ledger.repository.get(invoice.id).status == "paid"
    assert books(ledger) == {("gateway_clearing", "KWD"): Decimal("12.960"), ("tax_payable", "KWD"): Decimal("-0.620"),
                             ("deferred_revenue", "KWD"): Decimal("-12.340")}


def test_an_auto_top_up_target_is_in_what_the_currency_is_charged_in(ledger: LedgerApplication) -> None:
    """A target of 50.005 KWD was taken and topped up to 50.010: no charge in hundredths lands on it."""
    refused = run(ledger, "auto_top_up.set", TENANT, "rule", threshold="10", target="50.005", cooldown_seconds=0,
                  monthly_cap="500")
    assert (refused.outcome, refused.reason) == ("rejected", "invalid_auto_top_up")
    assert "target 50.005 KWD is finer than KWD is billed and charged in (0.010" in (refused.detail or "")
    assert "use 50.000 or 50.010" in (refused.detail or "")
    assert ledger.read(ids.account_id(TENANT), lambda a: dict(a._auto_top_up)) == {}
    # A threshold is compared, never charged: it keeps the fils.
    assert run(ledger, "auto_top_up.set", TENANT, "rule2", threshold="10.005", target="50.000", cooldown_seconds=0,
               monthly_cap="500").outcome == "applied"


@pytest.mark.asyncio
@pytest.mark.parametrize(("spent", "charged", "reached"), [
    ("15.000", "47250", "50.000"),  # a balance in whole steps lands on the target: 45.000 + 2.250 tax
    # 4.999 left, 45.001 to the target: rounded up to the step, 45.010 was charged and 50.009 reached, 0.009 above
    # the target; now 45.000, the most that stays within it (+ 2.250 tax).
    ("15.001", "47250", "49.999"),
    ("14.991", "47240", "49.999"),  # 5.009 left: 44.991 to the target, 44.990 (+ 2.250 tax; was 45.000, 50.009)
    # Usage priced in fractions of a fils leaves 4.9999999: 45.0000001 to go costs no whole step more (was 45.010).
    ("15.0000001", "47250", "49.9999999"),
])
async def test_an_auto_top_up_lands_on_its_target_never_above_it(ledger: LedgerApplication, spent: str, charged: str,
                                                                  reached: str) -> None:
    add_card(ledger)
    now = datetime.now(UTC)
    assert run(ledger, "credit.grant", TENANT, "g", unit="KWD", amount="20", grant_key="start", source="manual",
               effective_at=(now - timedelta(days=1)).isoformat()).outcome == "applied"
    rule = run(ledger, "auto_top_up.set", TENANT, "rule", threshold="10", target="50.000", cooldown_seconds=0,
               monthly_cap="500")
    assert rule.outcome == "applied", rule
    assert run(ledger, "usage.debit", TENANT, "u1", unit="KWD", amount_subunits=to_subunits(Decimal(spent)),
               meter="api_calls", at=now.isoformat(), cause={}).outcome == "applied"
    api = FakeStripe()
    assert await process_pending(ledger, {"stripe": stripe_gateway(api)}, None) == ["paid"]
    [form] = [c[3] for c in api.calls if c[1] == "/v1/payment_intents"]
    assert (form["amount"], form["currency"]) == (charged, "kwd")
    available = ledger.read(ids.account_id(TENANT), lambda a: a.available("KWD"))
    assert Decimal(available) / SUBUNITS_PER_UNIT == Decimal(reached)

def old_invoice(ledger: LedgerApplication, monkeypatch: pytest.MonkeyPatch) -> Invoice:
    """A subscription's first invoice as the ledger finalized it before session 13, when KWD was billed in
    thousandths: 12.340 + 0.617 tax (5 %) = 12.957."""
    add_card(ledger)
    with monkeypatch.context() as before_session_13:
        before_session_13.setattr(money, "CHARGED_DECIMALS_MAX", 3)
        [created] = ledger.apply_commands([command("subscription.create", TENANT, {
            "key": "main", "plan": "team-kwd", "at": NOV_1.isoformat()}, at=NOV_1)])  # issued (and dated) Nov 1
    assert created.outcome == "applied", created
    invoice = ledger.repository.get(invoice_id(TENANT, f"{subscription_id(TENANT, 'main')}/{NOV_1.isoformat()}"))
    assert (invoice.status, invoice.total, [item["amount"] for item in invoice.lines]) == (
        "finalized", Decimal("12.957"), ["12.340", "0.617"])
    return invoice


@pytest.mark.asyncio
async def test_an_old_invoice_in_thousandths_is_charged_what_the_gateway_takes_and_the_rest_written_off(
        ledger: LedgerApplication, monkeypatch: pytest.MonkeyPatch) -> None:
    """Dunning sent 12957 to Stripe, which refuses a last digit of thousandths: every attempt was a "decline" of a
    good card, and after the last one the subscription went past due. It now charges 12.950, the invoice is paid and
    the 0.007 no gateway can charge is written off (Dr recognised revenue / Cr receivables), nothing left owed."""
    invoice = old_invoice(ledger, monkeypatch)
    api = FakeStripe()
    dunning = Dunning(ledger, {"stripe": stripe_gateway(api)}, None, (0,), now=lambda: NOV_1 + timedelta(hours=1))
    assert await dunning.process() == {str(invoice.id): "paid"}
    [form] = [c[3] for c in api.calls if c[1] == "/v1/payment_intents"]
    assert (form["amount"], form["currency"], form["metadata[invoice_id]"]) == ("12950", "kwd", str(invoice.id))
    assert ledger.repository.get(invoice.id).status == "paid"
    assert ledger.repository.get(subscription_id(TENANT, "main")).status == "active"
    assert books(ledger) == {("gateway_clearing", "KWD"): Decimal("12.950"),
                             ("recognised_revenue", "KWD"): Decimal("0.007"),
                             ("tax_payable", "KWD"): Decimal("-0.617"), ("deferred_revenue", "KWD"): Decimal("-12.340")}
    [rounded] = [e for e in account_events(ledger, TENANT) if type(e).__name__ == "InvoiceChargeRounded"]
    assert (rounded.invoice, rounded.amount) == (str(invoice.id), to_subunits(Decimal("0.007")))
    assert verify_store(ledger, TENANT).problems == []
    # The charge's webhook (ingest re-fetched the intent: 12.950 for this invoice) finds it paid by that payment.
    paid = PaymentNotification(gateway="stripe", gateway_event_id="evt_old", kind="payment_succeeded", tenant=TENANT,
                               invoice_id=str(invoice.id), order_id=str(invoice.id), amount=Decimal("12.950"),
                               currency="KWD", verified_at=utcnow(), gateway_reference=rounded.cause["payment"])
    [result] = ledger.apply_commands([payment_command(paid)])
    assert (result.outcome, result.value["already_paid"]) == ("applied", True), result


@pytest.mark.asyncio
async def test_an_old_invoice_charged_pending_is_settled_by_the_webhook_with_the_rounding_written_off(
        ledger: LedgerApplication, monkeypatch: pytest.MonkeyPatch) -> None:
    invoice = old_invoice(ledger, monkeypatch)
    api = FakeStripe()
    api.processing.add("pm_card")  # a bank debit: the money arrives later, through the webhook
    dunning = Dunning(ledger, {"stripe": stripe_gateway(api)}, None, (0, 3), now=lambda: NOV_1 + timedelta(hours=1))
    assert await dunning.process() == {str(invoice.id): "pending"}
    [intent] = [o for path, o in api.objects.items() if path.startswith("/v1/payment_intents/")]
    assert intent["amount"] == 12950
    short = PaymentNotification(gateway="stripe", gateway_event_id="evt_short", kind="payment_succeeded",
                                tenant=TENANT, invoice_id=str(invoice.id), order_id=str(invoice.id),
                                amount=Decimal("12.940"), currency="KWD", verified_at=utcnow(),
                                gateway_reference="pi_other")
    [refused] = ledger.apply_commands([payment_command(short)])  # not what the invoice is charged: a person's
    assert (refused.outcome, refused.reason) == ("rejected", "invoice_payment_mismatch")
    paid = PaymentNotification(gateway="stripe", gateway_event_id="evt_pending", kind="payment_succeeded",
                               tenant=TENANT, invoice_id=str(invoice.id), order_id=str(invoice.id),
                               amount=Decimal("12.950"), currency="KWD", verified_at=utcnow(),
                               gateway_reference=intent["id"])
    [result] = ledger.apply_commands([payment_command(paid)])
    assert (result.outcome, result.value["already_paid"]) == ("applied", False), result
    assert ledger.repository.get(invoice.id).status == "paid"
    assert books(ledger)[("recognised_revenue", "KWD")] == Decimal("0.007")
    assert ("receivables", "KWD") not in books(ledger)
    assert verify_store(ledger, TENANT).problems == []


@pytest.mark.asyncio
async def test_an_old_invoice_below_one_step_is_written_off_whole_and_nothing_is_charged(
        ledger: LedgerApplication, monkeypatch: pytest.MonkeyPatch) -> None:
    """0.005 KWD (a fee of a catalogue published before session 13): no gateway can charge any of it."""
    add_card(ledger)
    with monkeypatch.context() as before_session_13:
        before_session_13.setattr(money, "CHARGED_DECIMALS_MAX", 3)
        tiny = {**CATALOG, "plans": [{"code": "tiny", "name": "Tiny", "currency": "KWD", "base_fee": "0.005"}]}
        assert run(ledger, "catalog.publish", None, document=tiny, digest="kwd-tiny").outcome == "applied"
        [created] = ledger.apply_commands([command("subscription.create", TENANT, {
            "key": "tiny", "plan": "tiny", "at": NOV_1.isoformat()}, at=NOV_1)])  # issued (and dated) Nov 1
    assert created.outcome == "applied", created
    invoice = ledger.repository.get(invoice_id(TENANT, f"{subscription_id(TENANT, 'tiny')}/{NOV_1.isoformat()}"))
    assert invoice.total == Decimal("0.005")
    api = FakeStripe()
    dunning = Dunning(ledger, {"stripe": stripe_gateway(api)}, None, (0,), now=lambda: NOV_1 + timedelta(hours=1))
    assert await dunning.process() == {str(invoice.id): "written_off"}
    assert api.calls == []
    assert ledger.repository.get(invoice.id).status == "paid"
    assert books(ledger)[("recognised_revenue", "KWD")] == Decimal("0.005")
    assert ("receivables", "KWD") not in books(ledger)
    assert verify_store(ledger, TENANT).problems == []


def refund_of(invoice: Invoice, payment: str, event_id: str, amount: str) -> PaymentNotification:
    """What ingest publishes for Stripe's refund of the dunning charge ``payment`` of ``invoice``."""
    return PaymentNotification(gateway="stripe", gateway_event_id=event_id, kind="refund_succeeded", tenant=TENANT,
                               invoice_id=str(invoice.id), order_id=str(invoice.id), amount=Decimal(amount),
                               currency="KWD", verified_at=utcnow(), gateway_reference=f"re_{event_id}",
                               refunded_payment=payment)


async def dunned_old_invoice(ledger: LedgerApplication, monkeypatch: pytest.MonkeyPatch) -> tuple[Invoice, str]:
    """The old 12.957 KWD invoice, paid 12.950 by dunning's charge (0.007 written off); and that charge."""
    invoice = old_invoice(ledger, monkeypatch)
    dunning = Dunning(ledger, {"stripe": stripe_gateway(FakeStripe())}, None, (0,),
                      now=lambda: NOV_1 + timedelta(hours=1))
    assert await dunning.process() == {str(invoice.id): "paid"}
    paid = ledger.repository.get(invoice.id)
    assert paid.status == "paid"
    return paid, str(paid.payment)


@pytest.mark.asyncio
async def test_a_refund_of_all_a_written_off_invoice_was_paid_credits_the_whole_invoice(
        ledger: LedgerApplication, monkeypatch: pytest.MonkeyPatch) -> None:
    """12.957 KWD invoiced, 12.950 charged and paid, 0.007 written off; the gateway pays the 12.950 back. That was
    read as a partial refund of a 12.957 invoice: an adjustment of -12.333 and -0.617 of tax, the invoice's fee
    schedule left open (0.007 of its deferred fee never given back, its revenue recognised later) and 0.007 of the
    invoice still "left" for a cancel to credit. Now it is the full refund it is: the credit note negates the
    invoice's lines, shows the 0.007 written off when it was paid (not paid back: it never was paid), credits
    exactly the 12.950 refunded, and every ledger account is back to zero."""
    invoice, payment = await dunned_old_invoice(ledger, monkeypatch)
    [result] = ledger.apply_commands([payment_command(refund_of(invoice, payment, "full", "12.950"))])
    assert result.outcome == "applied", result
    note = ledger.repository.get(UUID(result.value["credit_note"]))
    assert [(item["kind"], item["amount"]) for item in note.lines] == [
        ("base_fee", "-12.340"), ("tax", "-0.617"), ("adjustment", "0.007")]
    assert note.total == Decimal("-12.950")
    assert books(ledger) == {}  # revenue, tax payable, deferred revenue, clearing and receivables all at zero
    refunded = ledger.repository.get(invoice.id)
    assert refunded.given_back == refunded.total  # nothing of it left for a cancel to credit
    assert verify_store(ledger, TENANT).problems == []
    replayed = replay_lines(export_lines(ledger, TENANT))  # and the auditor's offline replay of the export
    assert (replayed.problems, replayed.document_problems, replayed.documents) == ([], [], 2)
    # A cancel now credits nothing of the refunded invoice.
    [canceled] = ledger.apply_commands([command("subscription.cancel", TENANT, {
        "key": "main", "at_period_end": False, "at": (NOV_1 + timedelta(days=10)).isoformat()},
        at=NOV_1 + timedelta(days=10))])
    assert canceled.outcome == "applied", canceled
    assert books(ledger) == {}
    assert verify_store(ledger, TENANT).problems == []


@pytest.mark.asyncio
async def test_refunds_that_together_give_back_all_a_written_off_invoice_was_paid_end_it_in_full(
        ledger: LedgerApplication, monkeypatch: pytest.MonkeyPatch) -> None:
    """5.000 then 7.950 KWD of the 12.950 paid: the second is the last of the money, so it gives back what is left of
    the invoice, its tax exactly, and the 0.007 written off; every account ends at zero."""
    invoice, payment = await dunned_old_invoice(ledger, monkeypatch)
    [first] = ledger.apply_commands([payment_command(refund_of(invoice, payment, "part", "5.000"))])
    assert first.outcome == "applied", first
    assert ledger.repository.get(UUID(first.value["credit_note"])).total == Decimal("-5.000")
    [last] = ledger.apply_commands([payment_command(refund_of(invoice, payment, "rest", "7.950"))])
    assert last.outcome == "applied", last
    note = ledger.repository.get(UUID(last.value["credit_note"]))
    assert note.total == Decimal("-7.950")
    assert books(ledger) == {}
    assert [item["amount"] for item in note.lines if item.get("written_off")] == ["0.007"]
    refunded = ledger.repository.get(invoice.id)
    assert (refunded.given_back, Decimal(refunded.given_back_tax)) == (Decimal("12.957"), Decimal("0.617"))
    assert verify_store(ledger, TENANT).problems == []

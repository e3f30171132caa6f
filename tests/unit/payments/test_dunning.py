"""Dunning of subscription invoices: off-session charges on the retry schedule (fake Stripe API, injected
clock), the backup method after the default, and past_due with an email at each failed step."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
from billing_events import ids
from billing_events.messages import PaymentNotification
from billing_events.money import to_subunits
from billing_events.timeutil import utcnow
from billing_ledger.application import LedgerApplication, persistence_env
from billing_ledger.audit import account_events
from billing_ledger.domain.invoice import invoice_id
from billing_ledger.domain.postings import account_balances
from billing_ledger.domain.subscription import subscription_id
from billing_ledger.dunning import Dunning
from billing_ledger.notifier import SmtpSettings
from billing_ledger.payment_commands import payment_command

from tests.support import Inbox
from tests.unit.payments.support import FakeStripe, command, run, stripe_gateway

__all__ = []
TENANT = "dunco"
NOV_1 = datetime(2026, 11, 1, tzinfo=UTC)
CATALOG = {"plans": [{"code": "team", "name": "Team", "currency": "USD", "base_fee": "30.00"}]}
SCHEDULE = (0, 3, 5)


class Clock:
    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[LedgerApplication]:
    app = LedgerApplication(persistence_env(None, str(tmp_path / "ledger")))
    assert run(app, "catalog.publish", None, document=CATALOG, digest="dun1").outcome == "applied"
    assert run(app, "account.open", TENANT, currency="USD").outcome == "applied"
    for method in ("pm_primary", "pm_backup"):
        assert run(app, "payment_method.add", TENANT, method, method_id=method, gateway="stripe",
                   label=method).outcome == "applied"
    assert run(app, "payment_customer.set", TENANT, "cus", gateway="stripe", customer="cus_9").outcome == "applied"
    [created] = app.apply_commands([command("subscription.create", TENANT, {
        "key": "main", "plan": "team", "at": NOV_1.isoformat()}, at=NOV_1)])  # issued then (dated then)
    assert created.outcome == "applied", created
    yield app
    app.close()


def first_invoice(app: LedgerApplication) -> Any:
    sub_id = subscription_id(TENANT, "main")
    return app.repository.get(invoice_id(TENANT, f"{sub_id}/{NOV_1.isoformat()}"))


def status(app: LedgerApplication) -> str:
    return str(app.repository.get(subscription_id(TENANT, "main")).status)


def intents(api: FakeStripe) -> list[tuple[str | None, dict[str, str]]]:
    return [(c[2], c[3]) for c in api.calls if c[1] == "/v1/payment_intents"]


@pytest.mark.asyncio
async def test_paid_at_the_first_attempt(ledger: LedgerApplication, smtp: tuple[Inbox, int]) -> None:
    inbox, port = smtp
    invoice = first_invoice(ledger)
    assert (invoice.status, invoice.total) == ("finalized", Decimal("30.00"))
    api = FakeStripe()
    clock = Clock(NOV_1 + timedelta(minutes=1))
    dunning = Dunning(ledger, {"stripe": stripe_gateway(api)}, SmtpSettings("127.0.0.1", port, "b@x", "billing"),
                      SCHEDULE, now=clock)
    assert await dunning.process() == {str(invoice.id): "paid"}
    [(key, form)] = intents(api)
    assert key == f"dunning/{invoice.id}/0/0"
    assert (form["payment_method"], form["amount"], form["currency"], form["customer"]) == (
        "pm_primary", "3000", "usd", "cus_9")
    assert form["off_session"] == "true" and form["confirm"] == "true"
    assert first_invoice(ledger).status == "paid" and status(ledger) == "active"
    assert inbox.messages == []
    clock.at += timedelta(days=10)
    assert await dunning.process() == {}  # the Paid event closed it
    assert await Dunning(ledger, {"stripe": stripe_gateway(api)}, None, SCHEDULE, now=clock).process() == {}
    assert len(intents(api)) == 1


@pytest.mark.asyncio
async def test_the_default_method_declines_and_the_backup_pays(ledger: LedgerApplication,
                                                               smtp: tuple[Inbox, int]) -> None:
    inbox, port = smtp
    api = FakeStripe()
    api.declined.add("pm_primary")
    invoice = first_invoice(ledger)
    dunning = Dunning(ledger, {"stripe": stripe_gateway(api)}, SmtpSettings("127.0.0.1", port, "b@x", "billing"),
                      SCHEDULE, now=Clock(NOV_1))
    assert await dunning.process() == {str(invoice.id): "paid"}
    assert [(key, form["payment_method"]) for key, form in intents(api)] == [
        (f"dunning/{invoice.id}/0/0", "pm_primary"), (f"dunning/{invoice.id}/0/1", "pm_backup")]
    assert first_invoice(ledger).status == "paid" and status(ledger) == "active"
    assert inbox.messages == []  # the attempt succeeded: nothing to tell


@pytest.mark.asyncio
async def test_every_attempt_fails_through_the_schedule_then_past_due(ledger: LedgerApplication,
                                                                       smtp: tuple[Inbox, int]) -> None:
    inbox, port = smtp
    api = FakeStripe()
    api.declined.update({"pm_primary", "pm_backup"})
    gateways = {"stripe": stripe_gateway(api)}
    mail = SmtpSettings("127.0.0.1", port, "b@x", "billing", "tenants.test")
    invoice = first_invoice(ledger)
    clock = Clock(NOV_1 + timedelta(hours=1))
    dunning = Dunning(ledger, gateways, mail, SCHEDULE, now=clock)

    assert await dunning.process() == {str(invoice.id): "retry"}  # day 0
    assert status(ledger) == "active" and len(inbox.messages) == 1
    assert await dunning.process() == {}  # not due again before day 3
    clock.at = NOV_1 + timedelta(days=2, hours=23)
    assert await dunning.process() == {}

    clock.at = NOV_1 + timedelta(days=3)
    restarted = Dunning(ledger, gateways, mail, SCHEDULE, now=clock)  # a restart resumes, repeats nothing
    assert await restarted.process() == {str(invoice.id): "retry"}
    assert status(ledger) == "active" and len(inbox.messages) == 2

    clock.at = NOV_1 + timedelta(days=5)
    assert await restarted.process() == {str(invoice.id): "past_due"}
    assert status(ledger) == "past_due" and first_invoice(ledger).status == "finalized"
    assert len(inbox.messages) == 3
    clock.at += timedelta(days=30)
    assert await restarted.process() == {}
    assert await Dunning(ledger, gateways, mail, SCHEDULE, now=clock).process() == {}  # exhausted

    keys = [key for key, _ in intents(api)]
    assert keys == [f"dunning/{invoice.id}/{attempt}/{index}" for attempt in range(3) for index in range(2)]
    first, second, last = inbox.messages
    assert all(m["To"] == f"{TENANT}@tenants.test" for m in inbox.messages)
    assert "attempt 1 of 3" in first.get_payload() and "2026-11-04" in first.get_payload()
    assert "card_declined" in first.get_payload()
    assert "attempt 2 of 3" in second.get_payload() and "2026-11-06" in second.get_payload()
    assert "final" in last["Subject"] and "past due" in last.get_payload()

    # Paid later by other means (a bank transfer recorded by finance): the subscription recovers.
    assert run(ledger, "invoice.mark_paid", TENANT, "manual", invoice_id=str(invoice.id),
               payment="transfer-1").outcome == "applied"
    assert status(ledger) == "active"


def balance(app: LedgerApplication) -> int:
    return int(app.read(ids.account_id(TENANT), lambda a: a.balance("USD")))


def stripe_paid(form: dict[str, str], intent: str, event_id: str) -> PaymentNotification:
    """What ingest publishes for Stripe's ``payment_intent.succeeded`` of the charge made with ``form``."""
    return from_intent(form, "payment_succeeded", intent, event_id)


def from_intent(form: dict[str, str], kind: str, intent: str, event_id: str) -> PaymentNotification:
    """A notification of kind ``kind`` about the intent created with ``form`` (its metadata: tenant, order id
    and invoice id; its amount and currency)."""
    metadata = {k[len("metadata["):-1]: v for k, v in form.items() if k.startswith("metadata[")}
    return PaymentNotification(gateway="stripe", gateway_event_id=event_id, kind=kind,
                               tenant=metadata["tenant"], order_id=metadata["order_id"],
                               invoice_id=metadata.get("invoice_id"), amount=Decimal(form["amount"]).scaleb(-2),
                               currency=form["currency"].upper(), verified_at=utcnow(), gateway_reference=intent)


@pytest.mark.asyncio
async def test_the_webhook_of_a_dunning_charge_settles_the_invoice_and_grants_no_credit(
        ledger: LedgerApplication) -> None:
    api = FakeStripe()
    invoice = first_invoice(ledger)
    dunning = Dunning(ledger, {"stripe": stripe_gateway(api)}, None, SCHEDULE, now=Clock(NOV_1))
    assert await dunning.process() == {str(invoice.id): "paid"}
    [(_, form)] = intents(api)
    assert (form["metadata[invoice_id]"], form["metadata[order_id]"]) == (str(invoice.id), str(invoice.id))
    [intent] = [o["id"] for o in api.objects.values() if o["object"] == "payment_intent"]

    [result] = ledger.apply_commands([payment_command(stripe_paid(form, intent, "evt_pi_1"))])
    assert result.outcome == "applied", result
    assert result.value == {"invoice_id": str(invoice.id), "gateway": "stripe", "already_paid": True}
    assert balance(ledger) == 0  # the 30.00 paid the invoice: not a cent of it became credit
    assert first_invoice(ledger).status == "paid"


def test_a_payment_in_flight_that_names_the_invoice_as_its_order_settles_it_once(ledger: LedgerApplication) -> None:
    invoice = first_invoice(ledger)
    # A charge made before dunning wrote metadata.invoice_id: its order_id is the invoice's id.
    notification = PaymentNotification(gateway="stripe", gateway_event_id="evt_old", kind="payment_succeeded",
                                       tenant=TENANT, order_id=str(invoice.id), amount=Decimal("30.00"),
                                       currency="USD", verified_at=utcnow(), gateway_reference="pi_old")
    [result] = ledger.apply_commands([payment_command(notification)])
    assert result.outcome == "applied" and result.value["already_paid"] is False, result
    assert first_invoice(ledger).status == "paid" and status(ledger) == "active"
    assert balance(ledger) == 0
    # Dunning's own mark-paid for the same charge, arriving after the webhook, changes nothing either.
    assert run(ledger, "invoice.mark_paid", TENANT, "late", invoice_id=str(invoice.id),
               payment="pi_old").outcome == "applied"
    assert balance(ledger) == 0


def test_a_payment_naming_an_invoice_it_does_not_match_is_rejected_not_credited(ledger: LedgerApplication) -> None:
    invoice = first_invoice(ledger)
    for event_id, invoice_ref, amount, reason in (("evt_short", str(invoice.id), "29.99", "invoice_payment_mismatch"),
                                                  ("evt_unknown", str(uuid4()), "30.00", "unknown_invoice")):
        notification = PaymentNotification(gateway="stripe", gateway_event_id=event_id, kind="payment_succeeded",
                                           tenant=TENANT, order_id=invoice_ref, invoice_id=invoice_ref,
                                           amount=Decimal(amount), currency="USD", verified_at=utcnow(),
                                           gateway_reference=f"pi_{event_id}")
        [result] = ledger.apply_commands([payment_command(notification)])
        assert (result.outcome, result.reason) == ("rejected", reason), result
    assert balance(ledger) == 0 and first_invoice(ledger).status == "finalized"


async def pending_charge(ledger: LedgerApplication, clock: Clock, mail: SmtpSettings | None = None,
                         schedule: tuple[int, ...] = SCHEDULE) -> tuple[Any, FakeStripe, Dunning]:
    """Dunning's first attempt on the first invoice, charged to the primary method as a debit still under way
    (Stripe ``processing``): the invoice, the fake Stripe and that dunning."""
    api = FakeStripe()
    api.processing.add("pm_primary")
    invoice = first_invoice(ledger)
    dunning = Dunning(ledger, {"stripe": stripe_gateway(api)}, mail, schedule, now=clock)
    assert await dunning.process() == {str(invoice.id): "pending"}
    return invoice, api, dunning


@pytest.mark.asyncio
async def test_a_processing_charge_is_pending_no_backup_is_charged_and_the_webhook_settles_it(
        ledger: LedgerApplication) -> None:
    clock = Clock(NOV_1 + timedelta(minutes=1))
    _, api, dunning = await pending_charge(ledger, clock)  # e.g. a SEPA debit: succeeded days later
    gateways = dunning.gateways
    assert [form["payment_method"] for _, form in intents(api)] == ["pm_primary"]  # no backup charged
    assert first_invoice(ledger).status == "finalized" and status(ledger) == "active"
    # Later rounds and a restart, even past the next retry day, charge nothing more while it is under way.
    clock.at = NOV_1 + timedelta(days=4)
    assert await dunning.process() == {}
    assert await Dunning(ledger, gateways, None, SCHEDULE, now=clock).process() == {}
    assert len(intents(api)) == 1 and status(ledger) == "active"

    [(_, form)] = intents(api)
    [intent] = [o["id"] for o in api.objects.values() if o["object"] == "payment_intent"]
    [result] = ledger.apply_commands([payment_command(stripe_paid(form, intent, "evt_pi_late"))])
    assert result.outcome == "applied" and result.value["already_paid"] is False, result
    assert first_invoice(ledger).status == "paid" and balance(ledger) == 0
    assert await Dunning(ledger, gateways, None, SCHEDULE, now=clock).process() == {}
    assert len(intents(api)) == 1


@pytest.mark.asyncio
async def test_a_pending_charge_succeeding_after_the_invoice_was_paid_otherwise_is_refused_for_reconciliation(
        ledger: LedgerApplication) -> None:
    invoice, api, _ = await pending_charge(ledger, Clock(NOV_1 + timedelta(minutes=1)))  # a SEPA debit, for days
    # Meanwhile the tenant pays by bank transfer, recorded by finance.
    assert run(ledger, "invoice.mark_paid", TENANT, "transfer", invoice_id=str(invoice.id),
               payment="transfer-1").outcome == "applied"
    # Then the debit succeeds too: 30.00 received a second time. It is refused with its reason (the receipt
    # finance reconciles), not applied as "already paid" and forgotten.
    [(_, form)] = intents(api)
    [intent] = [o["id"] for o in api.objects.values() if o["object"] == "payment_intent"]
    late = payment_command(stripe_paid(form, intent, "evt_pi_late"))
    [result] = ledger.apply_commands([late])
    assert (result.outcome, result.reason) == ("rejected", "invoice_already_paid"), result
    assert ledger.read(late.command_id, lambda r: (r.outcome, r.reason)) == ("rejected", "invoice_already_paid")
    postings = [p for e in account_events(ledger, TENANT) for p in getattr(e, "postings", None) or []]
    assert account_balances(postings).get(("gateway_clearing", "USD")) == to_subunits(Decimal("30.00"))  # once
    assert first_invoice(ledger).payment == "transfer-1" and balance(ledger) == 0
    # The transfer's own record repeated is still the one payment.
    again = run(ledger, "invoice.mark_paid", TENANT, "transfer-again", invoice_id=str(invoice.id),
                payment="transfer-1")
    assert again.outcome == "applied" and again.value["already_paid"] is True, again


@pytest.mark.asyncio
@pytest.mark.parametrize("manual", [{}, {"payment": None}, {"payment": ""}], ids=["absent", "null", "empty"])
async def test_a_pending_charge_succeeding_after_a_payment_booked_without_a_reference_is_refused(
        ledger: LedgerApplication, manual: dict[str, Any]) -> None:
    invoice, api, _ = await pending_charge(ledger, Clock(NOV_1 + timedelta(minutes=1)))  # a SEPA debit, for days
    # The bank transfer booked by hand, without a reference: recorded under one of its own.
    booked = run(ledger, "invoice.mark_paid", TENANT, "transfer", invoice_id=str(invoice.id), **manual)
    assert booked.outcome == "applied" and booked.value["already_paid"] is False, booked
    assert first_invoice(ledger).payment == f"manual:{booked.command_id}"  # never "None" nor ""
    # The debit succeeds too: 30.00 received a second time, refused for reconciliation (was applied as
    # "already paid" and forgotten).
    [(_, form)] = intents(api)
    [intent] = [o["id"] for o in api.objects.values() if o["object"] == "payment_intent"]
    [result] = ledger.apply_commands([payment_command(stripe_paid(form, intent, "evt_pi_late"))])
    assert (result.outcome, result.reason) == ("rejected", "invoice_already_paid"), result
    postings = [p for e in account_events(ledger, TENANT) for p in getattr(e, "postings", None) or []]
    assert account_balances(postings).get(("gateway_clearing", "USD")) == to_subunits(Decimal("30.00"))  # once
    # The hand-booked payment recorded again without a reference claims no money of its own.
    again = run(ledger, "invoice.mark_paid", TENANT, "transfer-again", invoice_id=str(invoice.id))
    assert again.outcome == "applied" and again.value["already_paid"] is True, again


def stripe_refunded(form: dict[str, str], refund: str, amount: str, event_id: str) -> PaymentNotification:
    """What ingest publishes for Stripe's ``refund.created`` of the charge made with ``form`` (its intent's
    metadata: tenant, order id and invoice id)."""
    metadata = {k[len("metadata["):-1]: v for k, v in form.items() if k.startswith("metadata[")}
    return PaymentNotification(gateway="stripe", gateway_event_id=event_id, kind="refund_succeeded",
                               tenant=metadata["tenant"], order_id=metadata["order_id"],
                               invoice_id=metadata.get("invoice_id"), amount=Decimal(amount), currency="USD",
                               verified_at=utcnow(), gateway_reference=refund)


def credit_note(app: LedgerApplication, note: str) -> tuple[Any, ...]:
    found = app.read(UUID(note), lambda n: (n.document_type, n.status, n.number, n.total, n.related_invoice,
                                            [(x["kind"], x["amount"]) for x in n.lines]))
    assert found is not None
    return found


@pytest.mark.asyncio
async def test_a_gateway_refund_of_an_invoice_payment_is_a_credit_note_of_that_invoice(
        ledger: LedgerApplication) -> None:
    api = FakeStripe()
    invoice = first_invoice(ledger)
    assert await Dunning(ledger, {"stripe": stripe_gateway(api)}, None, SCHEDULE, now=Clock(NOV_1)).process() == {
        str(invoice.id): "paid"}
    [(_, form)] = intents(api)

    # 10.00 of the 30.00 refunded in Stripe's dashboard: a credit note of -10.00 for that invoice, no credit moves.
    [partial] = ledger.apply_commands([payment_command(stripe_refunded(form, "re_1", "10.00", "evt_re_1"))])
    assert partial.outcome == "applied", partial  # was rejected as an unknown purchase
    assert credit_note(ledger, partial.value["credit_note"]) == (
        "credit_note", "finalized", partial.value["credit_note_number"], Decimal("-10.00"), str(invoice.id),
        [("adjustment", "-10.00"), ("tax", "0.00")])
    assert partial.value["credit_note_number"].startswith("CN-")
    # The same refund announced by another event: nothing new.
    [again] = ledger.apply_commands([payment_command(stripe_refunded(form, "re_1", "10.00", "evt_re_1b"))])
    assert again.outcome == "applied" and again.value["already_refunded"], again
    # The rest refunded: the invoice's lines, negated, for the 20.00; more than the invoice is rejected.
    [rest] = ledger.apply_commands([payment_command(stripe_refunded(form, "re_2", "20.00", "evt_re_2"))])
    assert credit_note(ledger, rest.value["credit_note"])[3] == Decimal("-20.00")
    [too_much] = ledger.apply_commands([payment_command(stripe_refunded(form, "re_3", "30.01", "evt_re_3"))])
    assert (too_much.outcome, too_much.reason) == ("rejected", "invoice_refund_mismatch")

    assert balance(ledger) == 0  # nothing was granted or reversed as purchased credit
    # The invoice was paid and stays so (its credit notes say what came back): dunning never charges it again.
    assert first_invoice(ledger).status == "paid" and status(ledger) == "active"


@pytest.mark.parametrize("refunded", ["pi_2", None], ids=["named", "unnamed"])
def test_the_refund_of_a_second_payment_the_ledger_rejected_leaves_the_paid_invoice_alone(
        ledger: LedgerApplication, refunded: str | None) -> None:
    invoice = first_invoice(ledger)
    assert run(ledger, "invoice.payment_pending", TENANT, "pending", invoice_id=str(invoice.id), payment="pi_2",
               attempt=1).outcome == "applied"
    assert run(ledger, "invoice.mark_paid", TENANT, "paid", invoice_id=str(invoice.id),
               payment="pi_1").outcome == "applied"

    def notified(kind: str, event_id: str, reference: str, **more: Any) -> Any:
        [result] = ledger.apply_commands([payment_command(PaymentNotification(
            gateway="stripe", gateway_event_id=event_id, kind=kind, tenant=TENANT, order_id=str(invoice.id),
            invoice_id=str(invoice.id), amount=Decimal("30.00"), currency="USD", verified_at=utcnow(),
            gateway_reference=reference, **more))])
        return result

    second = notified("payment_succeeded", "evt_pi_2", "pi_2")  # the pending debit succeeds too: never booked
    assert (second.outcome, second.reason) == ("rejected", "invoice_already_paid")

    def books() -> dict[tuple[str, str], int]:
        postings = [p for e in account_events(ledger, TENANT) for p in getattr(e, "postings", None) or []]
        return {k: v for k, v in account_balances(postings).items() if v}

    paid = books()
    assert paid == {("gateway_clearing", "USD"): to_subunits(Decimal("30.00")),
                    ("deferred_revenue", "USD"): -to_subunits(Decimal("30.00"))}  # the fee of the period ahead
    # Finance refunds pi_2 in Stripe: its refund names the invoice (the intent's metadata). It was booked as a
    # credit note of the invoice: its revenue and clearing back to 0 although the payment it kept was pi_1.
    refund = notified("refund_succeeded", "evt_re_2", "re_2", refunded_payment=refunded)
    assert (refund.outcome, refund.reason) == ("rejected", "refund_of_other_payment"), refund
    assert books() == paid and balance(ledger) == 0
    assert first_invoice(ledger).status == "paid"
    # The refund of the payment that paid it is still its credit note.
    back = notified("refund_succeeded", "evt_re_1", "re_1", refunded_payment="pi_1")
    assert back.outcome == "applied" and credit_note(ledger, back.value["credit_note"])[3] == Decimal("-30.00")
    assert books() == {}


def test_a_full_refund_credits_the_invoice_lines(ledger: LedgerApplication) -> None:
    invoice = first_invoice(ledger)
    assert run(ledger, "invoice.mark_paid", TENANT, "paid", invoice_id=str(invoice.id),
               payment="pi_9").outcome == "applied"
    # A refund whose order id names the invoice (a charge made before metadata.invoice_id existed).
    refund = PaymentNotification(gateway="stripe", gateway_event_id="evt_full", kind="refund_succeeded", tenant=TENANT,
                                 order_id=str(invoice.id), amount=Decimal("30.00"), currency="USD",
                                 verified_at=utcnow(), gateway_reference="re_full")
    [result] = ledger.apply_commands([payment_command(refund)])
    assert result.outcome == "applied", result
    note = credit_note(ledger, result.value["credit_note"])
    # The invoice's lines negated, and its tax (none: a 0.00 tax line, so finalizing computes none).
    assert note[3] == -invoice.total and note[5] == [
        *[(x["kind"], str(-Decimal(x["amount"]))) for x in invoice.lines], ("tax", "0.00")]
    assert balance(ledger) == 0  # the money went back through the gateway: no account credit on top
    # The books: billed, paid, then given back through the gateway's clearing: every account back to zero.
    postings = [p for e in account_events(ledger, TENANT) for p in getattr(e, "postings", None) or []]
    assert {k: v for k, v in account_balances(postings).items() if v} == {}


def test_a_full_refund_gives_back_the_invoices_own_tax_after_the_tax_profile_changed(
        ledger: LedgerApplication) -> None:
    invoice = first_invoice(ledger)  # issued without tax: the account had no tax profile then
    assert [x["kind"] for x in invoice.lines] == ["base_fee"]
    assert run(ledger, "invoice.mark_paid", TENANT, "paid", invoice_id=str(invoice.id),
               payment="pi_9").outcome == "applied"
    assert run(ledger, "catalog.publish", None, "taxed", digest="dun-tax", document={
        **CATALOG, "tax_rules": [{"region": "DE", "rate": "0.19", "name": "DE VAT"}],
        "seller": {"name": "Billing GmbH", "country": "DE"}}).outcome == "applied"
    assert run(ledger, "tax_profile.set", TENANT, "de", country="DE").outcome == "applied"  # 19 % VAT from now
    refund = PaymentNotification(gateway="stripe", gateway_event_id="evt_full_taxed", kind="refund_succeeded",
                                 tenant=TENANT, order_id=str(invoice.id), invoice_id=str(invoice.id),
                                 amount=Decimal("30.00"), currency="USD", verified_at=utcnow(),
                                 gateway_reference="re_full")
    [result] = ledger.apply_commands([payment_command(refund)])  # raised AssertionError: the batch retried forever
    assert result.outcome == "applied", result
    # The 30.00 paid comes back as 30.00, no VAT added that the invoice never charged.
    assert credit_note(ledger, result.value["credit_note"])[3:] == (
        Decimal("-30.00"), str(invoice.id), [("base_fee", "-30.00"), ("tax", "0.00")])
    postings = [p for e in account_events(ledger, TENANT) for p in getattr(e, "postings", None) or []]
    assert {k: v for k, v in account_balances(postings).items() if v} == {}
    assert balance(ledger) == 0


def stripe_failed(form: dict[str, str], intent: str, event_id: str) -> PaymentNotification:
    """What ingest publishes for Stripe's ``payment_intent.payment_failed`` of the charge made with ``form``."""
    return from_intent(form, "payment_failed", intent, event_id)


@pytest.mark.asyncio
async def test_a_pending_charge_that_fails_is_a_failed_attempt_and_the_next_one_is_made(
        ledger: LedgerApplication, smtp: tuple[Inbox, int]) -> None:
    inbox, port = smtp
    mail = SmtpSettings("127.0.0.1", port, "b@x", "billing", "tenants.test")
    clock = Clock(NOV_1 + timedelta(minutes=1))
    invoice, api, dunning = await pending_charge(ledger, clock, mail)  # a bank debit: it fails two days later
    [(_, form)] = intents(api)
    [intent] = [o for o in api.objects.values() if o["object"] == "payment_intent"]
    intent["status"] = "requires_payment_method"

    [failed] = ledger.apply_commands([payment_command(stripe_failed(form, intent["id"], "evt_pi_failed"))])
    assert failed.outcome == "applied", failed
    assert failed.value == {"invoice_id": str(invoice.id), "followed": True, "attempt": 1}
    clock.at = NOV_1 + timedelta(days=2)
    assert await dunning.process() == {str(invoice.id): "retry"}  # attempt 1 failed; it used to wait for ever
    [message] = inbox.messages
    assert "attempt 1 of 3" in message.get_payload() and intent["id"] in message.get_payload()
    assert len(intents(api)) == 1 and first_invoice(ledger).status == "finalized"

    api.processing.clear()
    clock.at = NOV_1 + timedelta(days=3)  # attempt 2, on its day: charged and paid
    assert await dunning.process() == {str(invoice.id): "paid"}
    assert [key for key, _ in intents(api)] == [f"dunning/{invoice.id}/0/0", f"dunning/{invoice.id}/1/0"]
    assert first_invoice(ledger).status == "paid" and status(ledger) == "active" and balance(ledger) == 0


@pytest.mark.asyncio
async def test_a_pending_last_attempt_that_fails_makes_the_subscription_past_due(ledger: LedgerApplication) -> None:
    clock = Clock(NOV_1)
    invoice, api, dunning = await pending_charge(ledger, clock, schedule=(0,))
    [(_, form)] = intents(api)
    [intent] = [o["id"] for o in api.objects.values() if o["object"] == "payment_intent"]
    # A decline of some other charge of the invoice (seen by dunning when it charged) changes nothing.
    [other] = ledger.apply_commands([payment_command(stripe_failed(form, "pi_other", "evt_other"))])
    assert other.outcome == "applied" and other.value["followed"] is False, other
    assert await dunning.process() == {}  # still pending

    [failed] = ledger.apply_commands([payment_command(stripe_failed(form, intent, "evt_failed"))])
    assert failed.value["followed"] is True, failed
    assert await dunning.process() == {str(invoice.id): "past_due"}
    assert status(ledger) == "past_due" and first_invoice(ledger).status == "finalized"
    assert len(intents(api)) == 1  # no backup method was charged for the pending attempt


@pytest.mark.asyncio
async def test_a_months_credit_note_usage_invoice_is_collected_like_a_subscription_invoice(
        ledger: LedgerApplication, smtp: tuple[Inbox, int]) -> None:
    """A tenant cancels Team at once halfway (15.00 back as credit), then, taxed in DE, spends 10.00 of that credit on
    usage without a subscription: December's first sweep invoices its 1.90 of VAT (session 15). Dunning charges it
    like a subscription invoice; when every method declines through the schedule it stays open and owed (no
    subscription to make past due), the tenant told to pay it."""
    inbox, port = smtp
    taxed = {**CATALOG, "tax_rules": [{"region": "DE", "rate": "0.19", "name": "DE VAT"}],
             "seller": {"name": "Billing GmbH", "country": "DE"}}
    assert run(ledger, "catalog.publish", None, document=taxed, digest="dun-vat").outcome == "applied"
    assert run(ledger, "tax_profile.set", TENANT, "de", country="DE").outcome == "applied"
    [cancel] = ledger.apply_commands([command("subscription.cancel", TENANT, {
        "key": "main", "immediately": True, "at": (NOV_1 + timedelta(days=15)).isoformat()})])
    assert cancel.outcome == "applied", cancel
    assert run(ledger, "usage.debit", TENANT, "use", unit="USD", amount_subunits=to_subunits(Decimal(10)),
               meter="api_calls", at=datetime(2026, 11, 20, tzinfo=UTC).isoformat(),
               cause={"period": "2026-11"}).outcome == "applied"
    december = datetime(2026, 12, 1, 0, 0, 5, tzinfo=UTC)
    [issued] = ledger.apply_commands([command("invoice.credit_note_usage", TENANT, {"now": december.isoformat()},
                                              at=december)])  # as the sweep sends it
    assert issued.outcome == "applied", issued
    [made] = issued.value["invoices"]
    assert (made["month"], made["total"], made["status"]) == ("2026-11", "1.90", "finalized")
    api = FakeStripe()
    api.declined.update({"pm_primary", "pm_backup"})
    mail = SmtpSettings("127.0.0.1", port, "b@x", "billing", "tenants.test")
    clock = Clock(december)
    dunning = Dunning(ledger, {"stripe": stripe_gateway(api)}, mail, (0, 3), now=clock)
    assert (await dunning.process())[made["invoice_id"]] == "retry"
    clock.at = december + timedelta(days=3)
    assert (await dunning.process())[made["invoice_id"]] == "exhausted"
    charged = [form for key, form in intents(api) if key and key.startswith(f"dunning/{made['invoice_id']}/")]
    assert [form["amount"] for form in charged] == ["190"] * 4  # the default method, then the backup, twice
    assert ledger.repository.get(UUID(made["invoice_id"])).status == "finalized"  # open, owed
    last = [m for m in inbox.messages if f"invoice {made['number']} (final attempt)" in m["Subject"]]
    assert len(last) == 1 and "Please pay the invoice" in last[0].get_payload(), [m["Subject"] for m in inbox.messages]
    assert run(ledger, "invoice.mark_paid", TENANT, "transfer", invoice_id=made["invoice_id"],
               payment="bank-transfer-7").outcome == "applied"
    assert ledger.repository.get(UUID(made["invoice_id"])).status == "paid"

"""Collection ``charge_before_access`` (seed 000: the entitlement is updated "on successful payment"): a paid plan
starts ``incomplete`` (first invoice finalized, no credits, no capacity) and becomes ``active`` when that invoice
is paid, exactly once; unpaid, it expires (``incomplete_expired``) and its invoice is voided. SQLite ledger."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from billing_events import ids
from billing_events.messages import LedgerCommand, PaymentNotification
from billing_ledger.application import LedgerApplication, persistence_env
from billing_ledger.domain.allocation import ResourcePool
from billing_ledger.domain.invoice import Invoice, invoice_id
from billing_ledger.domain.postings import account_balances
from billing_ledger.domain.roster import roster_id
from billing_ledger.domain.subscription import Subscription, subscription_id
from billing_ledger.dunning import Dunning
from billing_ledger.limits import INCOMPLETE_EXPIRY_DAYS
from billing_ledger.notifier import SmtpSettings
from billing_ledger.payment_commands import payment_command
from billing_ledger.scheduler import DueIndex

from tests.support import Inbox
from tests.unit.payments.support import FakeStripe, stripe_gateway
from tests.unit.subscriptions.test_subscriptions import run

TENANT = "gated"
U = 10**9
NOV_1 = datetime(2026, 11, 1, tzinfo=UTC)
NOV_4 = datetime(2026, 11, 4, 12, tzinfo=UTC)
CATALOG: dict[str, Any] = {
    "credit_units": {"CREDIT": {"scale": 2}},
    "plans": [
        {"code": "team", "name": "Team", "currency": "USD", "base_fee": "30.00", "resources": {"users": 5},
         "recurring_credits": [{"unit": "CREDIT", "amount": "100"}]},
        {"code": "shop", "name": "Shop", "currency": "USD", "base_fee": "30.00", "resources": {"users": 5},
         "recurring_credits": [{"unit": "CREDIT", "amount": "100"}], "collection": "charge_before_access"},
        {"code": "trial", "name": "Trial", "currency": "USD", "base_fee": "10.00", "trial_days": 14,
         "collection": "charge_before_access"},
        {"code": "free", "name": "Free", "currency": "USD", "base_fee": "0.00",
         "recurring_credits": [{"unit": "CREDIT", "amount": "5"}]},
    ],
}


@pytest.fixture
def app(tmp_path: Path) -> LedgerApplication:
    ledger = LedgerApplication(persistence_env(None, str(tmp_path)))
    assert run(ledger, "catalog.publish", None, document=CATALOG, digest="gated-1").outcome == "applied"
    assert run(ledger, "account.open", TENANT, currency="USD").outcome == "applied"
    return ledger



def subscribe(app: LedgerApplication, key: str = "main", **payload: Any) -> Any:
    return run(app, "subscription.create", TENANT, key=key, plan=payload.pop("plan", "team"), trial=False, **payload)


def sub(app: LedgerApplication, key: str = "main") -> Subscription:
    return app.repository.get(subscription_id(TENANT, key))  # type: ignore[no-any-return]


def first_invoice(app: LedgerApplication, key: str = "main") -> Invoice:
    return app.repository.get(invoice_id(TENANT, f"{subscription_id(TENANT, key)}/{NOV_1.isoformat()}"))  # type: ignore[no-any-return]


def credits(app: LedgerApplication) -> int:
    return int(app.read(ids.account_id(TENANT), lambda a: a.available("CREDIT")))


def capacity(app: LedgerApplication) -> int:
    return int(app.read(ResourcePool.create_id(TENANT, "users"), lambda p: p.capacity) or 0)


def receivable(app: LedgerApplication) -> int:
    postings = [p for e in app.events.get(ids.account_id(TENANT)) for p in getattr(e, "postings", None) or []]
    return sum(v for (name, unit), v in account_balances(postings).items() if name == "receivables" and unit == "USD")


def paid(invoice: Invoice, event_id: str, at: datetime = NOV_4, reference: str | None = None) -> LedgerCommand:
    """What ingest publishes for the gateway's verified payment of ``invoice`` (Stripe metadata.invoice_id);
    ``reference``: the charge's (default ``pi_<event_id>``)."""
    return payment_command(PaymentNotification(
        gateway="stripe", gateway_event_id=event_id, kind="payment_succeeded", tenant=TENANT,
        order_id=str(invoice.id), invoice_id=str(invoice.id), amount=invoice.total, currency="USD", verified_at=at,
        gateway_reference=reference or f"pi_{event_id}"))


def test_created_incomplete_it_bills_its_first_invoice_and_grants_nothing(app: LedgerApplication) -> None:
    result = subscribe(app, collection="charge_before_access")
    assert result.outcome == "applied", result
    assert sub(app).status == "incomplete"
    invoice = first_invoice(app)
    assert (invoice.status, invoice.number, invoice.total) == ("finalized", "INV-2026-000001", Decimal("30.00"))
    assert result.value["invoice_id"] == str(invoice.id)
    assert credits(app) == 0  # no recurring credits before the payment
    assert capacity(app) == 0  # no seats either
    refused = run(app, "allocation.allocate", TENANT, resource="users", request_id="seat-1", quantity=1)
    assert (refused.outcome, refused.reason) == ("rejected", "unknown_pool")
    assert receivable(app) == 30 * U  # the invoice is owed like any finalized one
    # It counts towards the account's limit while it waits (so 3 incomplete ones cannot be stacked up).
    assert app.repository.get(roster_id(TENANT)).live == [str(sub(app).id)]


def test_the_payment_webhook_activates_it_once_with_its_credits_and_capacity(app: LedgerApplication) -> None:
    subscribe(app, collection="charge_before_access")
    invoice = first_invoice(app)
    [result] = app.apply_commands([paid(invoice, "evt_1")])
    assert result.outcome == "applied" and result.value["already_paid"] is False, result
    activated = sub(app)
    assert activated.status == "active"
    # The first period starts at the payment: a full month for the fee paid.
    assert (activated.period_start, activated.period_end) == (NOV_4, datetime(2026, 12, 4, 12, tzinfo=UTC))
    assert credits(app) == 100 * U and capacity(app) == 5
    assert first_invoice(app).status == "paid" and receivable(app) == 0
    # The same charge announced again (another event id), then dunning's own mark_paid: nothing more.
    [again] = app.apply_commands([paid(invoice, "evt_2", NOV_4 + timedelta(minutes=1), reference="pi_evt_1")])
    assert again.outcome == "applied" and again.value["already_paid"] is True, again
    assert run(app, "invoice.mark_paid", TENANT, NOV_4 + timedelta(minutes=2), invoice_id=str(invoice.id),
               payment="pi_evt_1").value["already_paid"] is True
    assert credits(app) == 100 * U and capacity(app) == 5
    assert len(sub(app).recurring_grants) == 1


@pytest.mark.asyncio
async def test_dunning_charging_the_saved_method_activates_it_once(app: LedgerApplication) -> None:
    assert run(app, "payment_method.add", TENANT, method_id="pm_1", gateway="stripe", label="visa").outcome == "applied"
    subscribe(app, collection="charge_before_access")
    invoice = first_invoice(app)
    api = FakeStripe()
    dunning = Dunning(app, {"stripe": stripe_gateway(api)}, None, (0, 3, 5), now=lambda: NOV_4)
    assert await dunning.process() == {str(invoice.id): "paid"}
    assert sub(app).status == "active" and sub(app).period_start == NOV_4
    assert credits(app) == 100 * U and capacity(app) == 5
    assert await dunning.process() == {}
    # The webhook of that charge arrives afterwards: already paid, nothing granted twice.
    [intent] = [o["id"] for o in api.objects.values() if o["object"] == "payment_intent"]
    [webhook] = app.apply_commands([paid(invoice, "evt_pi", reference=intent)])
    assert webhook.value["already_paid"] is True
    assert credits(app) == 100 * U and capacity(app) == 5


def test_the_last_failed_dunning_attempt_cancels_it_and_voids_its_invoice(app: LedgerApplication) -> None:
    for key in ("a", "b", "main"):
        assert subscribe(app, key, collection="charge_before_access").outcome == "applied"
    assert subscribe(app, "d").reason == "subscription_limit_reached"
    invoice = first_invoice(app)
    assert run(app, "invoice.payment_failed", TENANT, invoice_id=str(invoice.id), final=False).outcome == "applied"
    assert sub(app).status == "incomplete"
    assert run(app, "invoice.payment_failed", TENANT, NOV_1 + timedelta(days=5), invoice_id=str(invoice.id),
               final=True).outcome == "applied"
    expired = sub(app)
    assert expired.status == "canceled"
    assert [e.reason for e in app.events.get(expired.id) if type(e).__name__ == "Canceled"] == ["incomplete_expired"]
    assert first_invoice(app).status == "void"
    assert receivable(app) == 60 * U  # its 30.00 is no longer owed (the two others' still are)
    assert credits(app) == 0 and capacity(app) == 0
    assert str(expired.id) not in app.repository.get(roster_id(TENANT)).live
    assert subscribe(app, "d").outcome == "applied"  # the limit no longer counts it
    # A payment arriving after that is not turned into access (nor credit): a person reconciles it.
    [late] = app.apply_commands([paid(invoice, "evt_late", NOV_1 + timedelta(days=6))])
    assert (late.outcome, late.reason) == ("rejected", "invoice_not_payable")
    assert sub(app).status == "canceled" and credits(app) == 100 * U  # only "d"'s own credits


@pytest.mark.asyncio
async def test_dunning_declined_to_the_last_attempt_expires_it_and_says_so(app: LedgerApplication,
                                                                           smtp: tuple[Inbox, int]) -> None:
    inbox, port = smtp
    assert run(app, "payment_method.add", TENANT, method_id="pm_1", gateway="stripe", label="visa").outcome == "applied"
    subscribe(app, collection="charge_before_access")
    invoice = first_invoice(app)
    api = FakeStripe()
    api.declined.add("pm_1")
    clock = [NOV_1]
    dunning = Dunning(app, {"stripe": stripe_gateway(api)}, SmtpSettings("127.0.0.1", port, "b@x", "billing"),
                      (0, 3, 5), now=lambda: clock[0])
    assert await dunning.process() == {str(invoice.id): "retry"}
    clock[0] = NOV_1 + timedelta(days=3)
    assert await dunning.process() == {str(invoice.id): "retry"}
    assert sub(app).status == "incomplete"
    clock[0] = NOV_1 + timedelta(days=5)
    assert await dunning.process() == {str(invoice.id): "incomplete_expired"}
    assert sub(app).status == "canceled" and first_invoice(app).status == "void"
    assert credits(app) == 0 and capacity(app) == 0 and receivable(app) == 0
    last = inbox.messages[-1]
    assert "final" in last["Subject"] and "never started" in last.get_payload()
    assert "past due" not in last.get_payload()


def test_a_user_cancel_before_paying_ends_it_and_voids_its_invoice(app: LedgerApplication) -> None:
    subscribe(app, collection="charge_before_access")
    result = run(app, "subscription.cancel", TENANT, NOV_1 + timedelta(hours=1), key="main")
    assert result.outcome == "applied" and result.value["lines"] == [], result
    assert sub(app).status == "canceled" and first_invoice(app).status == "void"
    assert app.repository.get(roster_id(TENANT)).live == [] and receivable(app) == 0
    # Neither a change nor a pause is possible before the payment (nothing to prorate yet).
    subscribe(app, "other", collection="charge_before_access")
    refused = run(app, "subscription.change", TENANT, key="other", quantity=2)
    assert (refused.outcome, refused.reason) == ("rejected", "invalid_transition")


def test_unpaid_it_expires_when_the_scheduler_ticks_it_after_the_wait(app: LedgerApplication) -> None:
    subscribe(app, collection="charge_before_access")
    index = DueIndex()
    index.catch_up(app)
    due = NOV_1 + timedelta(days=INCOMPLETE_EXPIRY_DAYS)
    assert index.ticks(due - timedelta(seconds=1)) == []
    [tick] = index.ticks(due)
    assert tick.kind == "subscription.tick" and tick.payload["key"] == "main"
    [result] = app.apply_commands([tick])
    assert result.value == {"transition": "incomplete_expired"}
    assert sub(app).status == "canceled" and first_invoice(app).status == "void"
    assert app.repository.get(roster_id(TENANT)).live == [] and receivable(app) == 0
    index.catch_up(app)
    assert index.ticks(due + timedelta(days=30)) == []


async def pending_first_charge(app: LedgerApplication, retry_days: tuple[int, ...] = (0, 3, 5),
                               now: Any = None) -> tuple[Invoice, Dunning, str]:
    """A ``charge_before_access`` subscription whose first invoice dunning charged to a SEPA debit (pm_1) that is
    still under way: the invoice, that dunning, and the charge's payment intent."""
    assert run(app, "payment_method.add", TENANT, method_id="pm_1", gateway="stripe", label="sepa").outcome == "applied"
    subscribe(app, collection="charge_before_access")
    invoice = first_invoice(app)
    api = FakeStripe()
    api.processing.add("pm_1")
    dunning = Dunning(app, {"stripe": stripe_gateway(api)}, None, retry_days,
                      now=now or (lambda: NOV_1 + timedelta(minutes=1)))
    assert await dunning.process() == {str(invoice.id): "pending"}
    [intent] = [o["id"] for o in api.objects.values() if o["object"] == "payment_intent"]
    return invoice, dunning, intent


@pytest.mark.asyncio
async def test_a_pending_first_charge_holds_off_the_expiry_and_its_webhook_activates_it(
        app: LedgerApplication) -> None:
    invoice, _, intent = await pending_first_charge(app)  # a SEPA debit: the money arrives after the expiry wait
    index = DueIndex()
    index.catch_up(app)
    due = NOV_1 + timedelta(days=INCOMPLETE_EXPIRY_DAYS)
    [tick] = index.ticks(due)
    [result] = app.apply_commands([tick])
    assert result.value == {"transition": None, "payment_pending": True}, result
    assert sub(app).status == "incomplete" and first_invoice(app).status == "finalized"
    # The debit succeeds the next day: the customer paid, so the customer gets the plan.
    [webhook] = app.apply_commands([paid(invoice, "evt_sepa", due + timedelta(days=1), reference=intent)])
    assert webhook.outcome == "applied", webhook
    assert sub(app).status == "active" and first_invoice(app).status == "paid"
    assert credits(app) == 100 * U and capacity(app) == 5 and receivable(app) == 0


@pytest.mark.asyncio
async def test_a_pending_first_charge_that_fails_lets_dunning_expire_it(app: LedgerApplication) -> None:
    clock = [NOV_1 + timedelta(minutes=1)]
    invoice, dunning, intent = await pending_first_charge(app, (0,), lambda: clock[0])
    due = NOV_1 + timedelta(days=INCOMPLETE_EXPIRY_DAYS)
    assert run(app, "subscription.tick", TENANT, due, key="main").value["transition"] is None
    # The debit fails after the wait: that was the last attempt, so dunning expires it (the tick is spent).
    [failed] = app.apply_commands([payment_command(PaymentNotification(
        gateway="stripe", gateway_event_id="evt_fail", kind="payment_failed", tenant=TENANT, order_id=str(invoice.id),
        invoice_id=str(invoice.id), amount=invoice.total, currency="USD", verified_at=due + timedelta(days=1),
        gateway_reference=intent))])
    assert failed.outcome == "applied" and failed.value["followed"] is True, failed
    clock[0] = due + timedelta(days=1)
    assert await dunning.process() == {str(invoice.id): "incomplete_expired"}
    assert sub(app).status == "canceled" and first_invoice(app).status == "void" and receivable(app) == 0


def test_an_early_tick_does_not_expire_it(app: LedgerApplication) -> None:
    subscribe(app, collection="charge_before_access")
    result = run(app, "subscription.tick", TENANT, NOV_1 + timedelta(days=1), key="main")
    assert result.value == {"transition": None} and sub(app).status == "incomplete"


def test_the_plan_sets_the_default_and_the_subscription_may_override_it(app: LedgerApplication) -> None:
    assert subscribe(app, "shop", plan="shop").value["status"] == "incomplete"
    assert subscribe(app, "invoiced", plan="shop", collection="invoice").value["status"] == "active"
    refused = subscribe(app, "bad", collection="upfront")
    assert (refused.outcome, refused.reason) == ("rejected", "invalid_collection")
    assert app.repository.get(roster_id(TENANT)).live == [str(sub(app, "shop").id), str(sub(app, "invoiced").id)]


def test_the_catalogue_refuses_an_unknown_collection(app: LedgerApplication) -> None:
    bad = {**CATALOG, "plans": [{**CATALOG["plans"][0], "collection": "prepaid"}]}
    assert run(app, "catalog.publish", None, document=bad, digest="gated-2").reason == "invalid_catalog"


def test_a_trial_needs_no_payment_to_start(tmp_path: Path) -> None:
    ledger = LedgerApplication(persistence_env(None, str(tmp_path)))
    run(ledger, "catalog.publish", None, document=CATALOG, digest="gated-1")
    run(ledger, "account.open", TENANT, currency="USD")
    assert run(ledger, "subscription.create", TENANT, key="t", plan="trial").value["status"] == "trialing"


def test_a_free_plan_has_nothing_to_charge_before_access(app: LedgerApplication) -> None:
    assert subscribe(app, plan="free", collection="charge_before_access").value["status"] == "active"
    assert credits(app) == 5 * U


def test_the_default_collection_gives_access_at_once_as_before(app: LedgerApplication) -> None:
    assert subscribe(app).value["status"] == "active"
    assert first_invoice(app).status == "finalized"
    assert credits(app) == 100 * U and capacity(app) == 5


@pytest.mark.asyncio
async def test_a_cancel_while_the_first_charge_is_pending_is_refused_so_the_payment_is_not_lost(
        app: LedgerApplication) -> None:
    invoice, _, intent = await pending_first_charge(app)
    refused = run(app, "subscription.cancel", TENANT, at=NOV_1 + timedelta(days=1), key="main")
    assert (refused.outcome, refused.reason) == ("rejected", "payment_pending")
    assert sub(app).status == "incomplete" and first_invoice(app).status == "finalized"
    [webhook] = app.apply_commands([paid(invoice, "evt_sepa", NOV_1 + timedelta(days=2), reference=intent)])
    assert webhook.outcome == "applied" and sub(app).status == "active"  # paid, so the customer gets the plan

"""Payments from ``billing.payments`` and the expiry sweeper, through the service's real record handler."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from billing_events import ids, topics
from billing_events.catalog import EXAMPLE as CATALOG
from billing_events.messages import PaymentNotification
from billing_events.money import SUBUNITS_PER_UNIT
from billing_ledger import sweeper as sweeper_module
from billing_ledger.application import LedgerApplication
from billing_ledger.domain.account import BillingAccount
from billing_ledger.payment_commands import PAYMENT_ACCOUNT_WAIT_SECONDS, AccountNotYetOpen, payment_grant_id
from billing_ledger.service import LedgerService
from billing_ledger.sweeper import Sweeper
from billing_runtime.bus import Record

from tests.unit.ledger.ledger_support import apply, command, open_account

U = SUBUNITS_PER_UNIT
NOW = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)


def publish_catalog(app: LedgerApplication) -> None:
    [published] = apply(app, command("catalog.publish", None, {"document": CATALOG, "digest": "c1"}))
    assert published.outcome == "applied", published


def notification(kind: str, event_id: str, amount: str, order: str = "order-1", currency: str = "USD",
                 tenant: str = "acme") -> PaymentNotification:
    return PaymentNotification(gateway="stripe", gateway_event_id=event_id, kind=kind, tenant=tenant,
                               order_id=order, amount=Decimal(amount), currency=currency, verified_at=NOW)


def records(start: int, *messages: PaymentNotification | bytes) -> list[Record]:
    return [Record(topics.PAYMENTS, 0, start + i, b"k", m if isinstance(m, bytes) else m.to_json())
            for i, m in enumerate(messages)]


def account(app: LedgerApplication) -> BillingAccount:
    return app.read(ids.account_id("acme"), lambda a: a)  # type: ignore[return-value]


def test_payment_grants_purchased_credit_exactly_once(app: LedgerApplication) -> None:
    open_account(app, "acme")
    service = LedgerService(app)
    paid = notification("payment_succeeded", "evt_1", "25.00")
    asyncio.run(service.handle_records(records(0, paid, b"{not json")))
    assert account(app).available("USD") == 25 * U
    [grant] = account(app).grant_balances()
    assert grant["grant_id"] == str(payment_grant_id("acme", "stripe", "evt_1")) and grant["source"] == "purchase"
    # Redelivered at the same offsets (a crash before the Kafka commit), then again at a new offset (the
    # gateway sent the webhook twice): neither changes the balance.
    asyncio.run(service.handle_records(records(0, paid, b"{not json")))
    asyncio.run(service.handle_records(records(2, paid)))
    assert account(app).available("USD") == 25 * U
    assert app.next_offset(topics.PAYMENTS, 0) == 3


def test_payment_in_other_currency_is_rejected(app: LedgerApplication) -> None:
    open_account(app, "acme")
    asyncio.run(LedgerService(app).handle_records(records(0, notification("payment_succeeded", "e", "5", currency="EUR"))))
    assert account(app).available("USD") == 0


def test_gateway_refund_is_booked_even_when_spent(app: LedgerApplication) -> None:
    open_account(app, "acme")
    service = LedgerService(app)
    asyncio.run(service.handle_records(records(0, notification("payment_succeeded", "evt_1", "30.00"))))
    [spent] = apply(app, command("usage.debit", "acme", {"unit": "USD", "amount_subunits": 25 * U, "meter": "m",
                                                         "at": NOW.isoformat()}))
    assert spent.outcome == "applied"
    asyncio.run(service.handle_records(records(1, notification("refund_succeeded", "evt_2", "10.00"))))
    acct = account(app)
    assert acct.available("USD") == 0
    [refund] = [e for e in app.events.get(acct.id) if type(e).__name__ == "GrantRefunded"]
    assert (refund.from_wallet, refund.from_revenue) == (5 * U, 5 * U)  # type: ignore[attr-defined]


def test_gateway_refund_after_a_give_back_of_the_lapsed_grant_s_usage_takes_that_credit_back(
        app: LedgerApplication) -> None:
    # The give-back returned 20.00 of the expired grant's usage as usage_reversal credit; the gateway then refunded
    # the whole 50.00 at Stripe. It was rejected (unknown_purchase: only 30.00 refundable) while the money had left.
    expires = (NOW - timedelta(days=1)).isoformat()
    open_account(app, "acme", {"key": "order-1", "amount": "50.00", "expires_at": expires,
                               "cause": {"gateway": "stripe", "order_id": "order-1"}})
    results = apply(app, command("usage.debit", "acme", {"unit": "USD", "amount_subunits": 50 * U, "meter": "m",
                                                         "at": (NOW - timedelta(days=2)).isoformat()}),
                    command("grant.expire", "acme", {"now": expires}),
                    command("usage.debit", "acme", {"unit": "USD", "amount_subunits": -20 * U, "meter": "m",
                                                    "at": (NOW - timedelta(hours=1)).isoformat()}, key="give-back"))
    assert [r.outcome for r in results] == ["applied"] * 3
    assert account(app).available("USD") == 20 * U
    asyncio.run(LedgerService(app).handle_records(records(0, notification("refund_succeeded", "evt_9", "50.00"))))
    acct = account(app)
    [refund] = [e for e in app.events.get(acct.id) if type(e).__name__ == "GrantRefunded"]
    assert refund.amount == 50 * U and refund.reclaimed["amount"] == 20 * U  # type: ignore[attr-defined]
    assert acct.available("USD") == 0 and acct.overage_receivable("USD") == 0


def test_sweeper_expires_grants_and_holds_once(app: LedgerApplication) -> None:
    open_account(app, "acme", {"key": "trial", "amount": "10.00", "source": "promotion",
                               "expires_at": (NOW + timedelta(days=1)).isoformat(), "effective_at": NOW.isoformat()})
    open_account(app, "beta", {"key": "g", "amount": "10.00", "effective_at": NOW.isoformat()})
    [placed] = apply(app, command("hold.place", "beta", {
        "hold_id": str(ids.grant_id("beta", "h")), "amount": "3", "at": NOW.isoformat(),
        "expires_at": (NOW + timedelta(hours=1)).isoformat()}))
    assert placed.value["status"] == "active"
    sweeper = Sweeper(app)
    assert sweeper.sweep(NOW) == 0
    assert sweeper.sweep(NOW + timedelta(hours=2)) == 1  # beta's hold
    assert sweeper.sweep(NOW + timedelta(days=2)) == 1  # acme's grant
    assert sweeper.sweep(NOW + timedelta(days=3)) == 0
    acme = account(app)
    assert acme.available("USD") == 0 and acme.grant_balances()[0]["status"] == "expired"
    expired = [e for e in app.events.get(acme.id) if type(e).__name__ == "GrantExpired"]
    assert len(expired) == 1 and expired[0].remainder == 10 * U  # type: ignore[attr-defined]
    beta = app.read(ids.account_id("beta"), lambda a: (a.available("USD"), a.held("USD")))
    assert beta == (10 * U, 0)
    # A second sweeper (another process) finds the new account too and nothing left to do.
    assert Sweeper(app).sweep(NOW + timedelta(days=3)) == 0


def test_sweeper_recognises_credit_package_money_when_due_and_once(app: LedgerApplication) -> None:
    """A CREDIT package's money (deferred revenue, USD) is recognised by ``money.recognise`` from the sweeper:
    at once the first time, then at most hourly, and with the grant's expiry, each time once."""
    publish_catalog(app)  # CREDIT declared
    open_account(app, "acme", {"key": "pkg", "amount": "1000", "unit": "CREDIT", "effective_at": NOW.isoformat(),
                               "expires_at": (NOW + timedelta(days=2)).isoformat()})
    grant = ids.grant_id("acme", "pkg")
    acme = account(app)
    acme.book_purchase_money(grant_id=grant, currency="USD", net=80 * U, tax_amount=16 * U, at=NOW, cause={})
    app.save(acme)
    app.cache.put(acme)

    def use(amount: int, when: datetime, key: str) -> None:
        [used] = apply(app, command("usage.debit", "acme", {"unit": "CREDIT", "amount_subunits": amount * U,
                                                            "meter": "m", "at": when.isoformat()}, key=key))
        assert used.outcome == "applied"

    def recognitions() -> list[object]:
        return [e for e in app.events.get(ids.account_id("acme")) if type(e).__name__ == "PurchaseMoneyRecognised"]

    sweeper = Sweeper(app)
    assert sweeper.sweep(NOW) == 0  # nothing used: nothing to recognise
    use(250, NOW, "u1")
    assert sweeper.sweep(NOW + timedelta(seconds=5)) == 1
    assert sweeper.sweep(NOW + timedelta(seconds=10)) == 0  # recognised once
    assert [e.recognised for e in recognitions()] == [20 * U]  # type: ignore[attr-defined]
    use(250, NOW + timedelta(minutes=10), "u2")
    assert sweeper.sweep(NOW + timedelta(minutes=30)) == 0  # within the hour
    assert sweeper.sweep(NOW + timedelta(hours=1, seconds=5)) == 1
    assert sweeper.sweep(NOW + timedelta(hours=1, seconds=10)) == 0
    assert sweeper.sweep(NOW + timedelta(days=2)) == 2  # the grant expires and its money closes with it
    assert sweeper.sweep(NOW + timedelta(days=2, seconds=5)) == 0
    assert Sweeper(app).sweep(NOW + timedelta(days=3)) == 0
    assert [(e.recognised, e.breakage) for e in recognitions()] == [  # type: ignore[attr-defined]
        (20 * U, 0), (20 * U, 0), (0, 40 * U)]
    assert account(app).purchase_revenue(grant) == {
        "unit": "USD", "net": 80 * U, "deferred": 0, "recognised": 40 * U, "breakage": 40 * U, "refunded_net": 0,
        "recognised_at": NOW + timedelta(days=2)}
    # The command itself, sent again by anyone: nothing left to do, no event.
    [again] = apply(app, command("money.recognise", "acme", {"now": (NOW + timedelta(days=3)).isoformat()}))
    assert again.outcome == "applied" and again.value == {"events": 0}


def test_payment_before_its_account_waits_then_is_granted(app: LedgerApplication) -> None:
    service = LedgerService(app)
    early = PaymentNotification(gateway="stripe", gateway_event_id="evt_early", kind="payment_succeeded",
                                tenant="acme", order_id="o", amount=Decimal("7.00"), currency="USD",
                                verified_at=datetime.now(UTC))
    with pytest.raises(AccountNotYetOpen):  # the consumer retries the batch
        asyncio.run(service.handle_records(records(0, early)))
    assert app.next_offset(topics.PAYMENTS, 0) is None  # nothing recorded, not even the position
    open_account(app, "acme")
    asyncio.run(service.handle_records(records(0, early)))
    assert account(app).available("USD") == 7 * U


def test_payment_for_an_account_that_never_appears_is_rejected_after_the_wait(app: LedgerApplication) -> None:
    stale = PaymentNotification(gateway="stripe", gateway_event_id="old", kind="payment_succeeded", tenant="ghost",
                                order_id="o", amount=Decimal(1), currency="USD",
                                verified_at=datetime.now(UTC) - timedelta(seconds=PAYMENT_ACCOUNT_WAIT_SECONDS + 1))
    asyncio.run(LedgerService(app).handle_records(records(0, stale)))
    assert app.next_offset(topics.PAYMENTS, 0) == 1


def test_a_mass_expiry_is_decided_in_small_transactions_in_order(app: LedgerApplication,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Under locks (PostgreSQL) a sweep's transaction holds its accounts: it takes at most
    SWEEP_DECISIONS_PER_TRANSACTION_MAX expiries (one account's, however many) and 20 commands."""
    monkeypatch.setattr(sweeper_module, "SWEEP_DECISIONS_PER_TRANSACTION_MAX", 10)
    sweeper = Sweeper(app)
    commands = [command("hold.expire", f"t{i}", {"now": NOW.isoformat()}, key=f"x{i}") for i in range(8)]
    weights = [4, 4, 3, 12, 1, 1, 1, 1]  # holds expiring on each account
    sweeper.weights = {c.command_id: w for c, w in zip(commands, weights, strict=True)}
    chunks = sweeper._chunks(commands)
    assert [[commands.index(c) for c in chunk] for chunk in chunks] == [[0, 1], [2], [3], [4, 5, 6, 7]]
    assert sweeper.weights == {}
    many = [command("grant.expire", f"g{i}", {"now": NOW.isoformat()}, key=f"g{i}") for i in range(45)]
    assert [len(c) for c in sweeper._chunks(many)] == [10, 10, 10, 10, 5]  # unweighted: one event each
    monkeypatch.setattr(sweeper_module, "SWEEP_DECISIONS_PER_TRANSACTION_MAX", 100)
    assert [len(c) for c in sweeper._chunks(many)] == [20, 20, 5]  # and at most 20 commands


def test_one_accounts_mass_expiry_is_swept_in_parts_earliest_first(app: LedgerApplication,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """An account with more holds due than SWEEP_DECISIONS_PER_TRANSACTION_MAX gets them expired by several
    commands (each its own transaction under the account's lock on PostgreSQL), the earliest first, once."""
    monkeypatch.setattr(sweeper_module, "SWEEP_DECISIONS_PER_TRANSACTION_MAX", 4)
    open_account(app, "acme", {"key": "g", "amount": "100.00"})
    for n in range(10):
        apply(app, command("hold.place", "acme", {"hold_id": str(ids.grant_id("acme", f"h{n}")), "amount": "1",
                                                  "at": NOW.isoformat(),
                                                  "expires_at": (NOW + timedelta(minutes=10 - n)).isoformat()},
                           key=f"h{n}"))
    sweeper = Sweeper(app)
    sweeper.discover()
    due = sweeper.due_commands(sorted(sweeper.accounts), NOW + timedelta(hours=1))
    assert [(c.kind, c.payload.get("limit")) for c in due] == [("hold.expire", 4)] * 3
    assert [len(chunk) for chunk in sweeper._chunks(due)] == [1, 1, 1]
    assert sweeper.sweep(NOW + timedelta(hours=1)) == 3
    expired = [e for e in app.events.get(ids.account_id("acme")) if type(e).__name__ == "HoldExpired"]
    assert [str(e.hold_id) for e in expired] == [str(ids.grant_id("acme", f"h{n}")) for n in range(9, -1, -1)]  # type: ignore[attr-defined]
    assert account(app).held("USD") == 0 and account(app).available("USD") == 100 * U
    assert Sweeper(app).sweep(NOW + timedelta(hours=2)) == 0


def test_gateway_refund_of_an_order_whose_grant_is_in_a_credit_unit_is_rejected_and_changes_nothing(
        app: LedgerApplication) -> None:
    # payment.refunded matched the order's grants by gateway and order only: 5.00 USD refunded of an order whose
    # grant is 500 CREDIT was read as 5.00 of credits (5 CREDIT taken back, the USD money never reversed).
    publish_catalog(app)  # CREDIT declared
    open_account(app, "acme", {"key": "order-c", "unit": "CREDIT", "amount": "500",
                               "cause": {"gateway": "stripe", "order_id": "order-c"}})
    before = account(app).grant_balances()
    asyncio.run(LedgerService(app).handle_records(
        records(0, notification("refund_succeeded", "evt_c", "5.00", order="order-c"))))
    acct = account(app)
    assert acct.grant_balances() == before and acct.available("CREDIT") == 500 * U
    assert not [e for e in app.events.get(acct.id) if type(e).__name__ == "GrantRefunded"]

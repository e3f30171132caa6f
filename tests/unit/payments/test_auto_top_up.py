"""Auto-top-up: the default method declined, the backup charged off-session; cooldown and monthly cap hold."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from billing_events import ids
from billing_events.messages import PaymentNotification
from billing_events.timeutil import utcnow
from billing_ledger.application import LedgerApplication
from billing_ledger.payment_commands import payment_command
from billing_ledger.topups import process_pending

from tests.support import Inbox
from tests.unit.payments.support import TENANT, FakeStripe, ledger, run, stripe_gateway

__all__ = ["ledger"]
T0 = datetime.now(UTC)  # purchased credit is effective from when it is paid (now)


@pytest.fixture(autouse=True)
def _fresh_now() -> None:
    """Each test's "now": usage timed before a purchase cannot draw on it, so T0 must not go stale while the
    rest of the suite runs."""
    global T0
    T0 = datetime.now(UTC)


def debit(app: LedgerApplication, key: str, usd: int, at: datetime) -> None:
    result = run(app, "usage.debit", TENANT, key, unit="USD", amount_subunits=usd * 10**9, meter="api_calls",
                 at=at.isoformat(), cause={})
    assert result.outcome == "applied", result


def available(app: LedgerApplication) -> int:
    value = app.read(ids.account_id(TENANT), lambda a: a.available("USD"))
    assert value is not None
    return value // 10**9


def prepare(app: LedgerApplication, cooldown: int, cap: str) -> None:
    assert run(app, "credit.grant", TENANT, "g", unit="USD", amount="20", grant_key="start", source="manual",
               effective_at=(T0 - timedelta(days=1)).isoformat()).outcome == "applied"
    rule = run(app, "auto_top_up.set", TENANT, f"rule-{cooldown}", threshold="10", target="50",
               cooldown_seconds=cooldown, monthly_cap=cap)
    assert rule.outcome == "applied", rule
    for method in ("pm_primary", "pm_backup"):
        assert run(app, "payment_method.add", TENANT, method, method_id=method, gateway="stripe",
                   label=method).outcome == "applied"
    assert run(app, "payment_customer.set", TENANT, "cus", gateway="stripe", customer="cus_1").outcome == "applied"


@pytest.mark.asyncio
async def test_primary_declined_backup_charged_once_and_cooldown_respected(ledger: LedgerApplication) -> None:
    prepare(ledger, cooldown=3600, cap="500")
    api = FakeStripe()
    api.declined.add("pm_primary")
    gateways = {"stripe": stripe_gateway(api)}
    debit(ledger, "u1", 15, T0)  # 20 -> 5, below 10: a request to top up to 50 (45 USD + 19 % VAT charged)
    assert await process_pending(ledger, gateways, None) == ["paid"]
    intents = [c for c in api.calls if c[1] == "/v1/payment_intents"]
    assert [c[3]["payment_method"] for c in intents] == ["pm_primary", "pm_backup"]
    assert all(c[3]["off_session"] == "true" and c[3]["confirm"] == "true" and c[3]["customer"] == "cus_1"
               for c in intents)
    assert intents[1][3]["amount"] == "5355"  # 45.00 + 8.55 tax
    assert available(ledger) == 50
    assert await process_pending(ledger, gateways, None) == []  # settled once: position recorded

    debit(ledger, "u2", 45, T0 + timedelta(minutes=5))  # below again, but within the cooldown: no request
    assert await process_pending(ledger, gateways, None) == []
    assert available(ledger) == 5


@pytest.mark.asyncio
async def test_the_monthly_cap_bounds_requests_and_all_declined_notifies(ledger: LedgerApplication,
                                                                          smtp: tuple[Inbox, int]) -> None:
    from billing_ledger.notifier import SmtpSettings

    prepare(ledger, cooldown=0, cap="60")
    api = FakeStripe()
    gateways = {"stripe": stripe_gateway(api)}
    debit(ledger, "u1", 15, T0)
    assert await process_pending(ledger, gateways, None) == ["paid"]  # 45 of the 60 cap
    debit(ledger, "u2", 45, T0 + timedelta(minutes=1))  # 45 more would exceed the cap: no request
    assert await process_pending(ledger, gateways, None) == []
    assert available(ledger) == 5

    # Next month the rule may request again; every method declines: the order fails and the tenant is told.
    api.declined.update({"pm_primary", "pm_backup"})
    debit(ledger, "u3", 1, T0 + timedelta(days=32))
    inbox, port = smtp
    outcome = await process_pending(ledger, gateways, SmtpSettings("127.0.0.1", port, "billing@localhost", "billing"))
    assert outcome == ["declined"]
    [mail] = inbox.messages
    assert mail["Subject"] == "Auto-top-up failed" and "card_declined" in mail.get_payload()


@pytest.mark.asyncio
async def test_a_processing_charge_is_not_failed_over_and_its_webhook_credits_the_order_once(
        ledger: LedgerApplication) -> None:
    prepare(ledger, cooldown=3600, cap="500")
    api = FakeStripe()
    api.processing.add("pm_primary")
    gateways = {"stripe": stripe_gateway(api)}
    debit(ledger, "u1", 15, T0)
    assert await process_pending(ledger, gateways, None) == ["pending"]
    [(_, _, _, form)] = [c for c in api.calls if c[1] == "/v1/payment_intents"]
    assert form["payment_method"] == "pm_primary"  # the backup was not charged as well
    assert available(ledger) == 5  # nothing credited before the money arrives
    [intent] = [o for o in api.objects.values() if o["object"] == "payment_intent"]
    notification = PaymentNotification(
        gateway="stripe", gateway_event_id="evt_pi_1", kind="payment_succeeded", tenant=TENANT,
        order_id=intent["metadata"]["order_id"], amount=Decimal(intent["amount"]).scaleb(-2), currency="USD",
        verified_at=utcnow(), gateway_reference=intent["id"])
    [result] = ledger.apply_commands([payment_command(notification)])
    assert result.outcome == "applied" and result.value["status"] == "paid", result
    assert available(ledger) == 50


def test_a_rule_whose_package_tops_up_another_unit_is_refused_and_changes_nothing(ledger: LedgerApplication) -> None:
    # credits-10k gives CREDIT: a USD rule with it would never lift the USD balance it watches.
    result = run(ledger, "auto_top_up.set", TENANT, "mismatch", unit="USD", threshold="10", package="credits-10k",
                 cooldown_seconds=0, monthly_cap="500")
    assert (result.outcome, result.reason) == ("rejected", "invalid_auto_top_up"), result
    assert "CREDIT" in result.detail
    assert ledger.read(ids.account_id(TENANT), lambda a: dict(a._auto_top_up)) == {}
    matching = run(ledger, "auto_top_up.set", TENANT, "match", unit="CREDIT", threshold="10", package="credits-10k",
                   cooldown_seconds=0, monthly_cap="50000")
    assert matching.outcome == "applied", matching


def test_a_credit_unit_rule_with_a_target_is_refused_when_set(ledger: LedgerApplication) -> None:
    # A target is topped up at face value in the currency; CREDIT has no such price, so the rule could
    # never be charged (it used to be accepted and fail as "unpriceable" each time it fired).
    result = run(ledger, "auto_top_up.set", TENANT, "credit-target", unit="CREDIT", threshold="10", target="500",
                 cooldown_seconds=0, monthly_cap="5000")
    assert (result.outcome, result.reason) == ("rejected", "invalid_auto_top_up"), result
    assert "needs a package" in result.detail
    assert ledger.read(ids.account_id(TENANT), lambda a: dict(a._auto_top_up)) == {}


def test_a_rule_command_with_a_cooldown_that_is_not_whole_seconds_is_rejected_with_a_reason(
        ledger: LedgerApplication) -> None:
    """``auto_top_up.set`` from Kafka: 1.9 was saved as 1 second, true as 1, and null stopped the command with a
    TypeError; each is a rejection with a reason now, recorded on the command's receipt, nothing saved."""
    for n, bad in enumerate((1.9, True, None, "60", [60])):
        result = run(ledger, "auto_top_up.set", TENANT, f"bad-{n}", threshold="10", target="50",
                     cooldown_seconds=bad, monthly_cap="500")
        assert (result.outcome, result.reason) == ("rejected", "invalid_auto_top_up"), (bad, result)
        assert "cooldown_seconds must be a whole number" in (result.detail or ""), result
        assert ledger.read(ids.account_id(TENANT), lambda a: dict(a._auto_top_up)) == {}
        # The rejection is recorded: the same command again is a duplicate of it, not applied.
        again = run(ledger, "auto_top_up.set", TENANT, f"bad-{n}", threshold="10", target="50",
                    cooldown_seconds=bad, monthly_cap="500")
        assert (again.outcome, again.first_outcome) == ("duplicate", "rejected"), again

"""Subscriptions and invoices through the ledger application (SQLite event store in a temp dir)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from billing_events import ids
from billing_events.messages import LedgerCommand
from billing_events.money import to_subunits
from billing_ledger.application import LedgerApplication, persistence_env
from billing_ledger.domain.allocation import ResourcePool
from billing_ledger.domain.catalog import Catalog
from billing_ledger.domain.invoice import Invoice, invoice_id
from billing_ledger.domain.proration import quote_change
from billing_ledger.domain.roster import roster_id
from billing_ledger.domain.subscription import Subscription, subscription_id
from eventsourcing.persistence import IntegrityError

NOV_1 = datetime(2026, 11, 1, tzinfo=UTC)
CATALOG: dict[str, Any] = {
    "credit_units": {"CREDIT": {"scale": 2}},
    "meters": [{"code": "api_calls", "price": {"model": "per_unit", "unit": "USD", "unit_amount": "0.01"}}],
    "plans": [
        {"code": "team", "name": "Team", "currency": "USD", "base_fee": "30.00", "resources": {"users": 5},
         "recurring_credits": [{"unit": "CREDIT", "amount": "100"}]},
        {"code": "pro", "name": "Pro", "currency": "USD", "base_fee": "90.00", "resources": {"users": 20},
         "recurring_credits": [{"unit": "CREDIT", "amount": "500"}]},
        {"code": "trial", "name": "Trial", "currency": "USD", "base_fee": "10.00", "trial_days": 14},
        {"code": "yearly", "name": "Yearly", "currency": "USD", "base_fee": "300.00", "cadence": "year"},
    ],
}


@pytest.fixture
def app(tmp_path: Path) -> LedgerApplication:
    ledger = LedgerApplication(persistence_env(None, str(tmp_path)))
    run(ledger, "catalog.publish", None, document=CATALOG, digest="c1")
    return ledger


def run(app: LedgerApplication, kind: str, tenant: str | None, at: datetime = NOV_1, **payload: Any) -> Any:
    command = LedgerCommand(command_id=uuid4(), kind=kind, tenant=tenant, issued_at=at, issued_by="user:test",
                            payload={"at": at.isoformat(), **payload})
    [result] = app.apply_commands([command])
    return result


def open_account(app: LedgerApplication, tenant: str) -> None:
    assert run(app, "account.open", tenant, currency="USD").outcome == "applied"


def invoice(app: LedgerApplication, tenant: str, key: str) -> Invoice:
    return app.repository.get(invoice_id(tenant, key))


def test_a_paid_plan_starts_active_with_its_first_invoice_and_recurring_credits(app: LedgerApplication) -> None:
    open_account(app, "acme")
    result = run(app, "subscription.create", "acme", key="main", plan="team", quantity=2)
    assert result.outcome == "applied", result
    sub: Subscription = app.repository.get(subscription_id("acme", "main"))
    assert (sub.status, sub.period_end) == ("active", datetime(2026, 12, 1, tzinfo=UTC))
    first = invoice(app, "acme", f"{sub.id}/{NOV_1.isoformat()}")
    assert (first.status, first.number, first.total) == ("finalized", "INV-2026-000001", Decimal("60.00"))
    account = app.repository.get(ids.account_id("acme"))
    assert account.available("CREDIT") == 200 * 10**9
    pool = app.repository.get(ResourcePool.create_id("acme", "users"))
    assert pool.capacity == 10


def test_trial_eligibility_and_conversion(app: LedgerApplication) -> None:
    open_account(app, "solo")
    run(app, "subscription.create", "solo", key="t", plan="trial")
    sub = app.repository.get(subscription_id("solo", "t"))
    assert (sub.status, sub.trial_end) == ("trialing", NOV_1 + timedelta(days=14))
    # A second subscription on the same account gets no trial (a subscription existed already).
    run(app, "subscription.create", "solo", key="t2", plan="trial")
    assert app.repository.get(subscription_id("solo", "t2")).status == "active"
    run(app, "payment_method.add", "solo", method_id="pm_123", gateway="stripe", label="visa 4242")
    result = run(app, "subscription.tick", "solo", at=NOV_1 + timedelta(days=14), key="t")
    assert result.value == {"transition": "trial_converted"}
    converted = app.repository.get(subscription_id("solo", "t"))
    assert converted.status == "active" and converted.period_start == NOV_1 + timedelta(days=14)
    assert invoice(app, "solo", f"{converted.id}/{converted.period_start.isoformat()}").status == "finalized"


def test_a_trial_without_payment_method_ends_and_bills_nothing(app: LedgerApplication) -> None:
    open_account(app, "free")
    run(app, "subscription.create", "free", key="t", plan="trial")
    result = run(app, "subscription.tick", "free", at=NOV_1 + timedelta(days=15), key="t")
    assert result.value == {"transition": "trial_ended"}
    sub = app.repository.get(subscription_id("free", "t"))
    assert sub.status == "canceled"
    assert app.repository.get(roster_id("free")).live == []


def test_a_workspace_with_two_accounts_gets_no_trial(app: LedgerApplication) -> None:
    for tenant in ("ws-a", "ws-b"):
        open_account(app, tenant)
        run(app, "workspace.add_account", tenant, workspace="corp")
    run(app, "subscription.create", "ws-a", key="t", plan="trial", workspace="corp")
    assert app.repository.get(subscription_id("ws-a", "t")).status == "active"


def test_at_most_three_live_subscriptions_and_pooled_capacity(app: LedgerApplication) -> None:
    open_account(app, "pool")
    for key in ("a", "b", "c"):
        assert run(app, "subscription.create", "pool", key=key, plan="team").outcome == "applied"
    fourth = run(app, "subscription.create", "pool", key="d", plan="team")
    assert (fourth.outcome, fourth.reason) == ("rejected", "subscription_limit_reached")
    assert len(app.repository.get(roster_id("pool")).live) == 3  # the rejected command left nothing behind
    assert app.repository.get(ResourcePool.create_id("pool", "users")).capacity == 15


def test_quantity_change_is_prorated_to_the_second_and_equals_the_preview(app: LedgerApplication) -> None:
    open_account(app, "grow")
    run(app, "subscription.create", "grow", key="m", plan="team", quantity=1)
    sub = app.repository.get(subscription_id("grow", "m"))
    mid = datetime(2026, 11, 16, tzinfo=UTC)  # exactly half of a 30-day period remains
    preview = quote_change(status=sub.status, plan=sub.plan, quantity=1, period_start=sub.period_start,
                           period_end_at=sub.period_end, time_zone="UTC", new_plan=sub.plan, new_quantity=3, at=mid)
    result = run(app, "subscription.change", "grow", at=mid, key="m", quantity=3)
    assert result.outcome == "applied"
    assert result.value["lines"] == preview
    assert [line["amount"] for line in preview] == ["-15.00", "45.00"]
    change = invoice(app, "grow", f"{sub.id}/change/{result.command_id}")
    assert (change.document_type, change.total, change.number) == ("invoice", Decimal("30.00"), "INV-2026-000002")


def test_a_downgrade_issues_a_credit_note(app: LedgerApplication) -> None:
    open_account(app, "shrink")
    run(app, "subscription.create", "shrink", key="m", plan="team", quantity=3)
    result = run(app, "subscription.change", "shrink", at=datetime(2026, 11, 16, tzinfo=UTC), key="m", quantity=1)
    sub = app.repository.get(subscription_id("shrink", "m"))
    note = invoice(app, "shrink", f"{sub.id}/change/{result.command_id}")
    assert (note.document_type, note.total, note.number) == ("credit_note", Decimal("-30.00"), "CN-2026-000001")


def test_a_plan_change_moves_the_old_grants_rest_into_the_new_one(app: LedgerApplication) -> None:
    open_account(app, "up")
    run(app, "subscription.create", "up", key="m", plan="team")
    run(app, "subscription.change", "up", at=datetime(2026, 11, 10, tzinfo=UTC), key="m", plan="pro")
    account = app.repository.get(ids.account_id("up"))
    grants = [g for g in account.grant_balances() if g["unit"] == "CREDIT"]
    # 21 of 30 days left, like the fee: 500 x 0.7 of Pro, plus Team's 100 unused beyond its own 100 x 0.7. Team's
    # grant keeps nothing but stays open (for 35 days) for late usage of before the change, which draws its 100
    # from the new grant (since session 14; it was voided).
    assert [(g["status"], g["amount"], g["remaining"]) for g in grants] == [
        ("open", 100 * 10**9, 0), ("open", 380 * 10**9, 380 * 10**9)]
    assert account.available("CREDIT") == 380 * 10**9
    assert account.spendable("CREDIT", "api_calls", datetime(2026, 11, 9, tzinfo=UTC)) == 100 * 10**9


def test_capacity_cannot_drop_below_usage(app: LedgerApplication) -> None:
    open_account(app, "busy")
    run(app, "subscription.create", "busy", key="m", plan="team", quantity=2)
    pool = app.repository.get(ResourcePool.create_id("busy", "users"))
    pool.allocate(uuid4(), 8, NOV_1)
    app.save(pool)
    result = run(app, "subscription.change", "busy", at=datetime(2026, 11, 5, tzinfo=UTC), key="m", quantity=1)
    assert (result.outcome, result.reason) == ("rejected", "capacity_below_usage")
    assert app.repository.get(subscription_id("busy", "m")).quantity == 2


def test_renewal_runs_once_and_usage_lines_finalize_the_invoice(app: LedgerApplication) -> None:
    open_account(app, "renew")
    run(app, "subscription.create", "renew", key="m", plan="team")
    dec_1 = datetime(2026, 12, 1, tzinfo=UTC)
    assert run(app, "subscription.tick", "renew", at=dec_1, key="m").value["transition"] == "renewed"
    assert run(app, "subscription.tick", "renew", at=dec_1, key="m").value == {"transition": None}
    sub = app.repository.get(subscription_id("renew", "m"))
    key = f"{sub.id}/{dec_1.isoformat()}"
    assert invoice(app, "renew", key).status == "draft"
    # Rating's usage line; the usage was covered by credit (no overage), so the ledger applies that much credit.
    run(app, "invoice.usage_lines", "renew", at=dec_1, invoice_key=key, lines=[
        {"kind": "usage", "description": "API calls: 1,500 (1,000 included)", "amount": "5.00", "meter": "api_calls"}])
    final = invoice(app, "renew", key)
    assert (final.status, final.total) == ("finalized", Decimal("30.00"))
    assert [line["kind"] for line in final.lines] == ["base_fee", "usage", "credits_applied"]
    account = app.repository.get(ids.account_id("renew"))
    # December's grant issued; November's stays open for November's late usage only (it lapses later).
    assert account.spendable("CREDIT", "api_calls", dec_1) == 100 * 10**9
    assert [(g["status"], g["remaining"]) for g in account.grant_balances()] == [("open", 100 * 10**9)] * 2


def test_immediate_cancel_credits_the_unused_time(app: LedgerApplication) -> None:
    open_account(app, "bye")
    run(app, "subscription.create", "bye", key="m", plan="team")
    result = run(app, "subscription.cancel", "bye", at=datetime(2026, 11, 16, tzinfo=UTC), key="m", immediately=True)
    assert [line["amount"] for line in result.value["lines"]] == ["-15.00"]
    assert app.repository.get(roster_id("bye")).live == []


def test_invoice_numbers_are_gap_free_under_concurrency(tmp_path: Path) -> None:
    first = LedgerApplication(persistence_env(None, str(tmp_path)))
    run(first, "catalog.publish", None, document=CATALOG, digest="c1")
    second = LedgerApplication(persistence_env(None, str(tmp_path)))
    tenants = [f"c{i}" for i in range(12)]
    for tenant in tenants:
        open_account(first, tenant)

    def subscribe(app: LedgerApplication, names: list[str]) -> None:
        for tenant in names:
            while True:
                try:
                    assert run(app, "subscription.create", tenant, key="m", plan="team").outcome == "applied"
                    break
                except IntegrityError:
                    continue  # another writer took the number first: retry with the next one

    threads = [threading.Thread(target=subscribe, args=(a, tenants[i::2])) for i, a in enumerate((first, second))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    numbers = sorted(invoice(first, t, f"{subscription_id(t, 'm')}/{NOV_1.isoformat()}").number for t in tenants)
    assert numbers == [f"INV-2026-{n:06d}" for n in range(1, 13)]


def test_tax_is_computed_once_by_the_profile_and_vat_ids_are_checked(app: LedgerApplication) -> None:
    catalog = {**CATALOG, "tax_rules": [{"region": "DE", "rate": "0.19", "name": "DE VAT"},
                                        {"region": "FR", "rate": "0.20", "name": "FR VAT"}],
               "seller": {"name": "Billing GmbH", "country": "DE"}}
    run(app, "catalog.publish", None, document=catalog, digest="c2")
    open_account(app, "berlin")
    bad = run(app, "tax_profile.set", "berlin", country="DE", business_name="B GmbH", tax_id="DE136695977")
    assert (bad.outcome, bad.reason) == ("rejected", "invalid_vat_id")
    run(app, "tax_profile.set", "berlin", country="DE")
    run(app, "subscription.create", "berlin", key="m", plan="team")
    sub = app.repository.get(subscription_id("berlin", "m"))
    first = invoice(app, "berlin", f"{sub.id}/{NOV_1.isoformat()}")
    assert [(item["kind"], item["amount"]) for item in first.lines] == [("base_fee", "30.00"), ("tax", "5.70")]
    assert first.total == Decimal("35.70")

    open_account(app, "paris")  # a French business with a valid VAT id: reverse charge, no VAT
    run(app, "tax_profile.set", "paris", country="FR", business_name="P SAS", tax_id="FR40303265045")
    run(app, "subscription.create", "paris", key="m", plan="team")
    sub = app.repository.get(subscription_id("paris", "m"))
    reverse = invoice(app, "paris", f"{sub.id}/{NOV_1.isoformat()}")
    assert reverse.total == Decimal("30.00") and "Reverse charge" in reverse.lines[-1]["description"]


def test_a_vat_id_of_another_country_than_the_profile_is_refused_and_gives_no_reverse_charge(
        app: LedgerApplication) -> None:
    catalog = {**CATALOG, "tax_rules": [{"region": "DE", "rate": "0.19", "name": "DE VAT"},
                                        {"region": "AT", "rate": "0.20", "name": "AT VAT"}],
               "seller": {"name": "Billing GmbH", "country": "DE"}}
    run(app, "catalog.publish", None, document=catalog, digest="c2")
    open_account(app, "vienna")
    run(app, "tax_profile.set", "vienna", country="AT", business_name="Deutsche GmbH")
    refused = run(app, "tax_profile.set", "vienna", country="AT", business_name="Deutsche GmbH", tax_id="DE136695976")
    assert (refused.outcome, refused.reason) == ("rejected", "vat_id_country_mismatch")
    assert "from DE, not AT" in refused.detail
    assert app.repository.get(roster_id("vienna")).tax_profile["tax_id"] is None  # unchanged
    # A German business of a German seller: domestic VAT, no reverse charge.
    open_account(app, "munich")
    assert run(app, "tax_profile.set", "munich", country="DE", business_name="M GmbH",
               tax_id="DE136695976").outcome == "applied"
    run(app, "subscription.create", "munich", key="m", plan="team")
    first = invoice(app, "munich", f"{subscription_id('munich', 'm')}/{NOV_1.isoformat()}")
    assert [(item["kind"], item["amount"]) for item in first.lines] == [("base_fee", "30.00"), ("tax", "5.70")]
    # Such a profile recorded before the check still replays, and is charged its country's VAT, not reverse charged.
    roster = app.repository.get(roster_id("vienna"))
    roster.set_tax_profile(profile={"country": "AT", "subdivision": None, "business_name": "Deutsche GmbH",
                                    "tax_id": "DE136695976", "tax_id_valid": True, "vies": "not_checked"},
                           at=NOV_1, by="user:test")
    app.save(roster)
    run(app, "subscription.create", "vienna", key="m", plan="team")
    old = invoice(app, "vienna", f"{subscription_id('vienna', 'm')}/{NOV_1.isoformat()}")
    assert [(item["kind"], item["amount"]) for item in old.lines] == [("base_fee", "30.00"), ("tax", "6.00")]
    assert old.total == Decimal("36.00")


def test_lifecycle_pause_resume_past_due_and_recovery(app: LedgerApplication) -> None:
    open_account(app, "life")
    run(app, "subscription.create", "life", key="m", plan="team")
    assert run(app, "subscription.pause", "life", key="m").outcome == "applied"
    assert app.repository.get(subscription_id("life", "m")).status == "paused"
    assert run(app, "subscription.pause", "life", key="m").reason == "invalid_transition"
    run(app, "subscription.resume", "life", key="m")
    sub = app.repository.get(subscription_id("life", "m"))
    first = invoice(app, "life", f"{sub.id}/{NOV_1.isoformat()}")
    run(app, "invoice.payment_failed", "life", invoice_id=str(first.id))
    assert app.repository.get(subscription_id("life", "m")).status == "past_due"
    run(app, "invoice.mark_paid", "life", invoice_id=str(first.id), payment="pi_1")
    assert app.repository.get(subscription_id("life", "m")).status == "active"
    assert app.repository.get(first.id).status == "paid"
    run(app, "subscription.cancel", "life", key="m")  # at period end
    assert run(app, "subscription.tick", "life", at=datetime(2026, 12, 1, tzinfo=UTC), key="m").value == {
        "transition": "canceled_at_period_end"}
    assert app.repository.get(subscription_id("life", "m")).status == "canceled"


def test_business_tax_ids_outside_the_eu_are_checked_by_their_country_not_as_eu_vat(app: LedgerApplication) -> None:
    catalog = {**CATALOG, "tax_rules": [{"region": "GB", "rate": "0.20", "name": "UK VAT"}],
               "seller": {"name": "Billing GmbH", "country": "DE"}}
    run(app, "catalog.publish", None, document=catalog, digest="c2")
    accepted = {"london": ("GB", "GB 980 7806 84", "980780684", True), "boston": ("US", "04-3110112", "043110112", True),
                "zurich": ("CH", "CHE-116.281.710 MWST", "CHE116281710MWST", True),
                "dubai": ("AE", "100-2345-6789-0003", "100234567890003", False)}  # no checker: kept, unchecked
    for tenant, (country, tax_id, stored, valid) in accepted.items():
        open_account(app, tenant)
        result = run(app, "tax_profile.set", tenant, country=country, business_name="B Ltd", tax_id=tax_id)
        assert result.outcome == "applied", (tenant, result)
        profile = app.repository.get(roster_id(tenant)).tax_profile
        assert (profile["tax_id"], profile["tax_id_valid"]) == (stored, valid)
    bad = run(app, "tax_profile.set", "london", country="GB", business_name="B Ltd", tax_id="GB980780685")
    assert (bad.outcome, bad.reason) == ("rejected", "invalid_tax_id")
    assert app.repository.get(roster_id("london")).tax_profile["tax_id"] == "980780684"  # unchanged
    # A valid UK VAT number is no EU VAT id: the UK rule applies, no reverse charge.
    run(app, "subscription.create", "london", key="m", plan="team")
    sub = app.repository.get(subscription_id("london", "m"))
    first = invoice(app, "london", f"{sub.id}/{NOV_1.isoformat()}")
    assert [(item["kind"], item["amount"]) for item in first.lines] == [("base_fee", "30.00"), ("tax", "6.00")]


def test_a_cancel_at_period_end_gives_back_its_pooled_capacity_even_when_seats_are_in_use(
        app: LedgerApplication) -> None:
    open_account(app, "seats")
    run(app, "subscription.create", "seats", key="a", plan="team")  # 5 users each, pooled: 10
    run(app, "subscription.create", "seats", key="b", plan="team")
    pool = app.repository.get(ResourcePool.create_id("seats", "users"))
    assert pool.allocate(uuid4(), 7, NOV_1)
    app.save(pool)
    run(app, "subscription.cancel", "seats", key="b")  # at period end
    ended = run(app, "subscription.tick", "seats", at=datetime(2026, 12, 1, tzinfo=UTC), key="b")
    assert ended.value == {"transition": "canceled_at_period_end"}
    pool = app.repository.get(ResourcePool.create_id("seats", "users"))
    assert (pool.capacity, pool.in_use) == (5, 7)  # b's 5 users went, though 7 of 10 were in use
    assert (pool.free, pool.over_capacity) == (0, 2)
    assert not pool.allocate(uuid4(), 1, datetime(2026, 12, 2, tzinfo=UTC))  # over capacity: new ones refused
    # The remaining subscription renews, and may change, with the pool over capacity.
    assert run(app, "subscription.tick", "seats", at=datetime(2026, 12, 1, tzinfo=UTC), key="a").value[
        "transition"] == "renewed"
    assert run(app, "subscription.change", "seats", at=datetime(2026, 12, 2, tzinfo=UTC), key="a",
               quantity=2).outcome == "applied"
    assert app.repository.get(ResourcePool.create_id("seats", "users")).capacity == 10


def test_a_trial_without_payment_method_ends_even_when_seats_are_in_use(app: LedgerApplication) -> None:
    catalog = {**CATALOG, "plans": [*CATALOG["plans"], {"code": "seats-trial", "name": "Seats trial",
                                                         "currency": "USD", "base_fee": "10.00", "trial_days": 14,
                                                         "resources": {"users": 5}}]}
    run(app, "catalog.publish", None, document=catalog, digest="c2")
    open_account(app, "tryout")
    run(app, "subscription.create", "tryout", key="t", plan="seats-trial")
    pool = app.repository.get(ResourcePool.create_id("tryout", "users"))
    assert pool.allocate(uuid4(), 3, NOV_1)
    app.save(pool)
    result = run(app, "subscription.tick", "tryout", at=NOV_1 + timedelta(days=14), key="t")
    assert result.value == {"transition": "trial_ended"}
    assert app.repository.get(subscription_id("tryout", "t")).status == "canceled"
    assert app.repository.get(roster_id("tryout")).live == []
    pool = app.repository.get(ResourcePool.create_id("tryout", "users"))
    assert (pool.capacity, pool.in_use) == (0, 3)
    assert pool.over_capacity == 3


def test_recurring_credits_on_another_cadence_than_the_plan_are_refused_not_misgranted(
        app: LedgerApplication) -> None:
    def with_plan(plan: dict[str, Any]) -> dict[str, Any]:
        return {**CATALOG, "plans": [*CATALOG["plans"], plan]}

    # Yearly plan, monthly credits: it used to grant 100 once for the whole year.
    yearly = {"code": "annual", "name": "Annual", "currency": "USD", "base_fee": "300.00", "cadence": "year",
              "recurring_credits": [{"unit": "CREDIT", "amount": "100", "cadence": "month"}]}
    refused = run(app, "catalog.publish", None, document=with_plan(yearly), digest="c2")
    assert (refused.outcome, refused.reason) == ("rejected", "invalid_catalog")
    assert "recurring_credits[0] has cadence 'month' but the plan is billed per year" in refused.detail
    # Monthly plan, yearly credits: it used to grant the year's 1,200 every month.
    monthly = {"code": "monthly", "name": "Monthly", "currency": "USD", "base_fee": "30.00",
               "recurring_credits": [{"unit": "CREDIT", "amount": "1200", "cadence": "year"}]}
    refused = run(app, "catalog.publish", None, document=with_plan(monthly), digest="c3")
    assert (refused.outcome, refused.reason) == ("rejected", "invalid_catalog")
    open_account(app, "cadence")
    assert run(app, "subscription.create", "cadence", key="m", plan="annual").reason == "unknown_plan"
    # Same cadence on both: one grant per billed period, as documented.
    yearly["recurring_credits"] = [{"unit": "CREDIT", "amount": "1200", "cadence": "year"}]
    assert run(app, "catalog.publish", None, document=with_plan(yearly), digest="c4").outcome == "applied"
    assert run(app, "subscription.create", "cadence", key="m", plan="annual").outcome == "applied"
    assert app.repository.get(ids.account_id("cadence")).available("CREDIT") == 1200 * 10**9


def test_a_plan_published_with_a_credit_cadence_unlike_its_own_is_no_longer_sold(app: LedgerApplication) -> None:
    # Published before the catalogue refused it (recorded as it was then, without today's validation).
    catalog = app.repository.get(Catalog.create_id())
    plan = {"code": "annual", "name": "Annual", "currency": "USD", "base_fee": "300.00", "cadence": "year",
            "version": 1, "recurring_credits": [{"unit": "CREDIT", "amount": "100", "cadence": "month"}]}
    catalog._published(document={**catalog.document, "plans": [*catalog.document["plans"], plan]}, digest="old",
                       version=catalog.catalog_version + 1, new_plan_versions={"annual": 1}, published_by="user:old")
    app.save(catalog)
    open_account(app, "legacy")
    refused = run(app, "subscription.create", "legacy", key="m", plan="annual")
    assert (refused.outcome, refused.reason) == ("rejected", "unsupported_plan")
    assert app.repository.get(ids.account_id("legacy")).available("CREDIT") == 0


def use_credits(app: LedgerApplication, tenant: str, credits: int, at: datetime) -> None:
    assert run(app, "usage.debit", tenant, at=at, unit="CREDIT", amount_subunits=credits * 10**9,
               meter="api_calls").outcome == "applied"


def test_changing_the_quantity_back_and_forth_does_not_refill_used_credits(app: LedgerApplication) -> None:
    open_account(app, "refill")
    run(app, "subscription.create", "refill", key="m", plan="team")
    nov_5 = datetime(2026, 11, 5, tzinfo=UTC)  # 26 of 30 days left
    use_credits(app, "refill", 90, nov_5)
    up = run(app, "subscription.change", "refill", at=nov_5, key="m", quantity=2)
    down = run(app, "subscription.change", "refill", at=nov_5 + timedelta(seconds=1), key="m", quantity=1)
    sub = app.repository.get(subscription_id("refill", "m"))
    totals = [invoice(app, "refill", f"{sub.id}/change/{r.command_id}").total for r in (up, down)]
    assert totals == [Decimal("26.00"), Decimal("-26.00")]  # the fees cancel out...
    # ... and so do the credits: 10 left, plus the second's worth of the second seat (100 x 1 s / 30 days).
    second = (100 * 10**9) // (30 * 86_400)  # 38,580 sub-units (each grant rounds once to a sub-unit)
    assert abs(app.repository.get(ids.account_id("refill")).available("CREDIT") - (10 * 10**9 + second)) <= 2


def test_an_upgrade_grants_the_rest_of_the_period_at_the_new_plan_less_what_was_used(
        app: LedgerApplication) -> None:
    open_account(app, "used")
    run(app, "subscription.create", "used", key="m", plan="team")
    mid = datetime(2026, 11, 16, tzinfo=UTC)  # half of the period left
    use_credits(app, "used", 80, mid)
    run(app, "subscription.change", "used", at=mid, key="m", plan="pro")
    # Team's first half (50) and Pro's second (250) make 300 for the period; 80 are used: 220 left.
    assert app.repository.get(ids.account_id("used")).available("CREDIT") == 220 * 10**9
    run(app, "subscription.change", "used", at=datetime(2026, 11, 23, 12, tzinfo=UTC), key="m", plan="team")
    # A quarter left: 220 - 500 x 1/4 + 100 x 1/4 = 120.
    assert app.repository.get(ids.account_id("used")).available("CREDIT") == 120 * 10**9
    # At renewal the next period starts with the plan's full allotment.
    dec_1 = datetime(2026, 12, 1, tzinfo=UTC)
    run(app, "subscription.tick", "used", at=dec_1, key="m")
    assert app.repository.get(ids.account_id("used")).spendable("CREDIT", "api_calls", dec_1) == 100 * 10**9


def test_a_paused_subscription_is_not_billed_nor_granted_credits_until_it_resumes(app: LedgerApplication) -> None:
    open_account(app, "nap")
    run(app, "subscription.create", "nap", key="m", plan="team")
    run(app, "subscription.pause", "nap", at=datetime(2026, 11, 20, tzinfo=UTC), key="m")
    dec_1 = datetime(2026, 12, 1, tzinfo=UTC)
    assert run(app, "subscription.tick", "nap", at=dec_1, key="m").outcome == "applied"
    sub = app.repository.get(subscription_id("nap", "m"))
    assert (sub.status, sub.period_start) == ("paused", dec_1)
    # The renewal draft carries no fee (only November's usage lines, from rating), and no December credits.
    key = f"{sub.id}/{dec_1.isoformat()}"
    assert invoice(app, "nap", key).total == Decimal("0.00")
    run(app, "invoice.usage_lines", "nap", at=dec_1, invoice_key=key, lines=[])
    # Nothing to bill at all: voided unnumbered (nothing_to_bill), not a numbered 0.00 invoice.
    assert (invoice(app, "nap", key).status, invoice(app, "nap", key).number) == ("void", None)
    account = app.repository.get(ids.account_id("nap"))
    assert account.spendable("CREDIT", "api_calls", dec_1) == 0  # November's left is for November's usage only
    # Resumed on Dec 16 (16 of 31 days left): the rest of December is billed and its credits granted.
    dec_16 = datetime(2026, 12, 16, tzinfo=UTC)
    resumed = run(app, "subscription.resume", "nap", at=dec_16, key="m")
    assert [item["amount"] for item in resumed.value["lines"]] == ["15.48"]  # 30.00 x 16/31
    bill = invoice(app, "nap", f"{sub.id}/resume/{dec_16.isoformat()}")
    assert (bill.status, bill.total) == ("finalized", Decimal("15.48"))
    assert app.repository.get(ids.account_id("nap")).spendable("CREDIT", "api_calls", dec_16) == to_subunits(
        Decimal(100) * Decimal(16) / Decimal(31))


def test_resuming_within_the_paid_period_bills_nothing_more(app: LedgerApplication) -> None:
    open_account(app, "blink")
    run(app, "subscription.create", "blink", key="m", plan="team")
    run(app, "subscription.pause", "blink", at=datetime(2026, 11, 10, tzinfo=UTC), key="m")
    assert run(app, "subscription.resume", "blink", at=datetime(2026, 11, 12, tzinfo=UTC), key="m").value[
        "lines"] == []
    assert app.repository.get(ids.account_id("blink")).available("CREDIT") == 100 * 10**9
    run(app, "subscription.tick", "blink", at=datetime(2026, 12, 1, tzinfo=UTC), key="m")
    sub = app.repository.get(subscription_id("blink", "m"))
    assert invoice(app, "blink", f"{sub.id}/{datetime(2026, 12, 1, tzinfo=UTC).isoformat()}").total == Decimal("30.00")


def test_canceling_in_a_period_that_began_while_paused_credits_nothing(app: LedgerApplication) -> None:
    open_account(app, "gone")
    run(app, "subscription.create", "gone", key="m", plan="team")
    run(app, "subscription.pause", "gone", at=datetime(2026, 11, 20, tzinfo=UTC), key="m")
    run(app, "subscription.tick", "gone", at=datetime(2026, 12, 1, tzinfo=UTC), key="m")
    result = run(app, "subscription.cancel", "gone", at=datetime(2026, 12, 16, tzinfo=UTC), key="m", immediately=True)
    assert (result.outcome, result.value["lines"]) == ("applied", [])  # December was never billed
    assert app.repository.get(subscription_id("gone", "m")).status == "canceled"


def test_a_change_at_the_period_start_or_twice_at_one_instant_grants_its_credits(app: LedgerApplication) -> None:
    open_account(app, "instant")
    run(app, "subscription.create", "instant", key="m", plan="team")
    # Upgraded at the very start of the period (the first grant's start), then downgraded at that same instant.
    up = run(app, "subscription.change", "instant", at=NOV_1, key="m", plan="pro")
    assert up.outcome == "applied", up
    assert app.repository.get(ids.account_id("instant")).available("CREDIT") == 500 * 10**9
    down = run(app, "subscription.change", "instant", at=NOV_1, key="m", plan="team")
    assert down.outcome == "applied", down
    assert app.repository.get(ids.account_id("instant")).available("CREDIT") == 100 * 10**9

"""Real ledger events for projection tests: the ledger's own aggregate and relay, in memory.

Tests drive ``BillingAccount`` through every kind of movement, save it in an in-memory eventsourcing
application and turn the recorded events into ``billing.ledger.events`` records exactly as the relay
does, so the projections see the same JSON they see in production.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from billing_events import ids, topics
from billing_events.messages import LedgerCommand
from billing_events.money import SUBUNITS_PER_UNIT
from billing_ledger.application import CommandResult, LedgerApplication
from billing_ledger.domain.account import BillingAccount
from billing_ledger.domain.catalog import Catalog
from billing_ledger.relay import to_message
from billing_runtime.bus import OutMessage, Record, partition_for
from eventsourcing.application import AggregateNotFoundError

U = SUBUNITS_PER_UNIT
T0 = datetime(2026, 10, 30, 12, 0, tzinfo=UTC)
PARTITIONS = 6


def uid(*parts: object) -> UUID:
    return uuid5(NAMESPACE_URL, "/test/" + "/".join(str(p) for p in parts))


class Ledger:
    """An in-memory ledger whose events can be relayed as records, partitioned like Kafka does."""

    def __init__(self) -> None:
        self.app = LedgerApplication(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
        self.accounts: dict[str, BillingAccount] = {}
        self._relayed = 0
        self._offsets: dict[int, int] = {}

    def open(self, tenant: str, currency: str = "USD", threshold: int | None = None) -> BillingAccount:
        account = BillingAccount.open(tenant, currency, low_balance_threshold=threshold, opened_by="admin@test")
        self.accounts[tenant] = account
        return account

    def save(self, *aggregates: Any) -> None:
        self.app.save(*aggregates)

    def command(self, kind: str, tenant: str | None, at: datetime = T0, *, issued_by: str = "user:test",
                **payload: Any) -> CommandResult:
        """A ledger command applied as the ledger's consumer applies it (subscriptions, invoices, ...), issued by
        ``issued_by`` (a token's subject)."""
        self._commands = getattr(self, "_commands", 0) + 1
        command = LedgerCommand(command_id=uid("command", self._commands), kind=kind, tenant=tenant, issued_at=at,
                                issued_by=issued_by, payload={"at": at.isoformat(), **payload})
        [result] = self.app.apply_commands([command])
        assert result.outcome in ("applied", "duplicate"), result
        return result

    def get(self, aggregate_id: str | UUID) -> Any:
        return self.app.repository.get(UUID(str(aggregate_id)))

    def publish_catalog(self, document: dict[str, Any]) -> None:
        try:
            catalog = self.app.repository.get(ids.catalog_id())
        except AggregateNotFoundError:
            catalog = Catalog()
        catalog.publish(document=document, digest=str(hash(repr(document))), published_by="cli:test")
        self.save(catalog)

    def messages(self) -> list[OutMessage]:
        """Events recorded since the last call, as the relay would publish them."""
        found = self.app.process_recorder.select_notifications(self._relayed + 1, 1_000_000)
        if found:
            self._relayed = found[-1].id
        return [to_message(self.app, n) for n in found]

    def records(self, messages: Iterable[OutMessage] | None = None) -> list[Record]:
        """Messages -> records with per-partition offsets (a re-sent message gets a new offset, like Kafka)."""
        out: list[Record] = []
        for m in self.messages() if messages is None else messages:
            part = partition_for(m.key, PARTITIONS)
            offset = self._offsets.get(part, 0)
            self._offsets[part] = offset + 1
            out.append(Record(topics.LEDGER_EVENTS, part, offset, m.key.encode(), m.value, m.headers))
        return out


def by_partition(records: Iterable[Record]) -> dict[int, list[Record]]:
    parts: dict[int, list[Record]] = {}
    for r in records:
        parts.setdefault(r.partition, []).append(r)
    return parts


def usage_cause(event_id: str, quantity: str, extra: dict[str, Any] | None = None, **properties: str
                ) -> dict[str, Any]:
    """A debit's cause as rating writes it (services/rating/service.py ``_debit``)."""
    return {"event_ids": [event_id], "quantity": quantity, "period": "2026-11", "catalog_version": 1,
            "price": {"model": "per_unit", "unit": "USD", "unit_amount": "0.20"}, "usage_type": "api",
            "properties": dict(properties), "user": properties.get("user"), "model": properties.get("model"),
            "operation": properties.get("operation"), **(extra or {})}


DEMO_CATALOG = {
    "credit_units": {"CREDIT": {"scale": 2}},
    "meters": [
        {"code": "api_calls", "name": "API calls", "unit_of_measure": "call", "aggregation": "sum"},
        {"code": "ai_tokens", "name": "AI tokens", "unit_of_measure": "token", "aggregation": "sum"},
    ],
}


def full_scenario(ledger: Ledger, tenant: str = "acme") -> BillingAccount:
    """One account through every movement kind: purchase, promotion, usage (incl. AI, overage, give-back),
    holds (captured, released, expired), expiry, void, refund, adjustments, settlement, low balance."""
    ledger.publish_catalog(DEMO_CATALOG)
    a = ledger.open(tenant, threshold=50 * U)
    purchase, promo, expiring = uid(tenant, "purchase"), uid(tenant, "promo"), uid(tenant, "expiring")
    a.grant_credit(grant_id=purchase, unit="USD", amount=100 * U, effective_at=T0, expires_at=None, scope=None,
                   source="purchase", cause={"payment_id": "pi_123", "order_id": "ord_1"},
                   granted_by="service:payments", tax_amount=20 * U)
    a.grant_credit(grant_id=promo, unit="USD", amount=10 * U, effective_at=T0, expires_at=T0 + timedelta(days=60),
                   scope=["api_calls"], source="promotion", cause={"code": "WELCOME"}, granted_by="admin@test")
    a.grant_credit(grant_id=expiring, unit="USD", amount=5 * U, effective_at=T0, expires_at=T0 + timedelta(days=3),
                   scope=None, source="manual", cause={}, granted_by="finance@test", priority=5)
    a.grant_credit(grant_id=uid(tenant, "credits"), unit="CREDIT", amount=1000 * U, effective_at=T0,
                   expires_at=None, scope=None, source="plan_recurrence", cause={"plan": "pro"},
                   granted_by="service:subscriptions")
    # October usage, then November usage (month boundary at T0 + 2 days).
    a.debit_usage(command_id=uid(tenant, "u1"), unit="USD", amount=4 * U + 600_000_000, meter="api_calls",
                  at=T0, overage_policy="overage", cause=usage_cause("evt-1", "23", user="alice"))
    a.debit_usage(command_id=uid(tenant, "u2"), unit="USD", amount=2_400, meter="ai_tokens",
                  at=T0 + timedelta(days=2), overage_policy="overage",
                  cause=usage_cause("evt-2", "1200", {"usage_type": "ai", "tokens": {
                      "input": "1000", "output": "150", "cached_input": "50"}}, model="gpt-large", operation="chat",
                      user="bob", input_tokens="1000", output_tokens="150", cached_input_tokens="50"))
    a.debit_usage(command_id=uid(tenant, "u3"), unit="USD", amount=600, meter="ai_tokens",
                  at=T0 + timedelta(days=2, hours=1), overage_policy="overage",
                  cause=usage_cause("evt-3", "300", {"usage_type": "ai"}, model="gpt-small", operation="embed",
                                    user="alice"))
    a.debit_usage(command_id=uid(tenant, "u4"), unit="CREDIT", amount=250 * U, meter="api_calls",
                  at=T0 + timedelta(days=2), overage_policy="overage", cause=usage_cause("evt-4", "5"))
    hold1, hold2, hold3 = uid(tenant, "h1"), uid(tenant, "h2"), uid(tenant, "h3")
    a.place_hold(hold_id=hold1, unit="USD", amount=3 * U, meter=None, expires_at=T0 + timedelta(days=2, hours=5),
                 at=T0 + timedelta(days=2))
    a.capture_hold(hold_id=hold1, amount=2 * U, at=T0 + timedelta(days=2, hours=1))
    a.place_hold(hold_id=hold2, unit="USD", amount=1 * U, meter="api_calls",
                 expires_at=T0 + timedelta(days=2, hours=5), at=T0 + timedelta(days=2))
    a.release_hold(hold_id=hold2, at=T0 + timedelta(days=2, hours=2))
    a.place_hold(hold_id=hold3, unit="USD", amount=7 * U, meter=None, expires_at=T0 + timedelta(days=2, hours=3),
                 at=T0 + timedelta(days=2))
    a.expire_holds(T0 + timedelta(days=2, hours=4))
    a.place_hold(hold_id=uid(tenant, "h4"), unit="USD", amount=U, meter=None,
                 expires_at=T0 + timedelta(days=30), at=T0 + timedelta(days=2, hours=4))  # stays active
    a.expire_grants(T0 + timedelta(days=3))
    a.void_grant(grant_id=promo, reason="campaign ended", voided_by="admin@test", at=T0 + timedelta(days=3))
    a.refund_grant(grant_id=purchase, amount=10 * U, refund_id=uid(tenant, "refund"), at=T0 + timedelta(days=3),
                   cause={"payment_id": "re_9", "user": "finance@test"}, tax_amount=2 * U)
    a.adjust(adjustment_id=uid(tenant, "adj+"), unit="USD", amount=3 * U, reason="goodwill", user="finance@test",
             at=T0 + timedelta(days=3))
    a.adjust(adjustment_id=uid(tenant, "adj-"), unit="USD", amount=-1 * U, reason="correction", user="finance@test",
             at=T0 + timedelta(days=3))
    # Spend past the credit: the rest is overage (receivable), then part of it is settled, then a give-back.
    a.debit_usage(command_id=uid(tenant, "u5"), unit="USD", amount=100 * U, meter="api_calls",
                  at=T0 + timedelta(days=3), overage_policy="overage", cause=usage_cause("evt-5", "500", user="bob"))
    a.settle_receivable(settlement_id=uid(tenant, "settle"), unit="USD", amount=5 * U, at=T0 + timedelta(days=4),
                        cause={"payment_id": "pi_settle"})
    a.debit_usage(command_id=uid(tenant, "u6"), unit="USD", amount=-U, meter="api_calls",
                  at=T0 + timedelta(days=4), overage_policy="overage", cause=usage_cause("evt-6", "0"))
    a.debit_usage(command_id=uid(tenant, "u7"), unit="USD", amount=U, meter="api_calls",
                  at=T0 + timedelta(days=4), overage_policy="block", cause=usage_cause("evt-7", "5"))
    ledger.save(a)
    return a


def simple_account(ledger: Ledger, tenant: str, grant: int = 100 * U, debits: int = 0, price: int = U // 5,
                   start: datetime = T0) -> BillingAccount:
    """An account with one promotional grant and ``debits`` usage debits of ``price`` each."""
    a = ledger.open(tenant)
    a.grant_credit(grant_id=uid(tenant, "welcome"), unit="USD", amount=grant, effective_at=start, expires_at=None,
                   scope=None, source="promotion", cause={}, granted_by="cli:test")
    for i in range(debits):
        a.debit_usage(command_id=uid(tenant, "d", i), unit="USD", amount=price, meter="api_calls",
                      at=start + timedelta(seconds=i), overage_policy="overage",
                      cause=usage_cause(f"e-{i}", "1", user=f"user-{i % 3}"))
    ledger.save(a)
    return a


NOV_1 = datetime(2026, 11, 1, tzinfo=UTC)
SUBSCRIPTION_CATALOG: dict[str, Any] = {
    "credit_units": {"CREDIT": {"scale": 2}},
    "meters": [{"code": "api_calls", "name": "API calls", "unit_of_measure": "call",
                "price": {"model": "per_unit", "unit": "USD", "unit_amount": "0.01"}}],
    "plans": [
        {"code": "team", "name": "Team", "currency": "USD", "base_fee": "30.00", "resources": {"users": 5},
         "recurring_credits": [{"unit": "CREDIT", "amount": "100"}]},
        {"code": "ops", "name": "Ops", "currency": "USD", "base_fee": "90.00", "cadence": "quarter"},
        {"code": "yearly", "name": "Yearly", "currency": "USD", "base_fee": "300.00", "cadence": "year"},
        {"code": "trial", "name": "Trial", "currency": "USD", "base_fee": "10.00", "trial_days": 14},
        {"code": "euro", "name": "Euro", "currency": "EUR", "base_fee": "100.00", "cadence": "quarter"},
    ],
}


def subscription_scenario(ledger: Ledger) -> dict[str, Any]:
    """Subscriptions through their lifecycle and the invoices they issue, through the ledger's own commands.

    acme: team x 2 (monthly, 30.00: INV 60.00, then down to 1 mid-period: a credit note of -15.00, payment
    failed -> past_due, renewal on Dec 1 with usage lines added to the draft -> finalized, paid -> active);
    ops (quarterly, 90.00, paid at once); yearly (300.00, paused). globex: a trial (trialing, nothing billed)
    and team canceled at once (credit note; the final draft of its cut period voided: no usage). initech
    (EUR): euro x 3 (quarterly 100.00) to cancel at period end (still billable). Returns the keys the tests
    look up.
    """
    ledger.command("catalog.publish", None, at=NOV_1, document=SUBSCRIPTION_CATALOG, digest="subs-1")
    for tenant, code in (("acme", "USD"), ("globex", "USD"), ("initech", "EUR")):
        ledger.command("account.open", tenant, at=NOV_1, currency=code)
    team = ledger.command("subscription.create", "acme", at=NOV_1, key="team", plan="team", quantity=2).value
    ops = ledger.command("subscription.create", "acme", at=NOV_1, key="ops", plan="ops", quantity=1).value
    yearly = ledger.command("subscription.create", "acme", at=NOV_1, key="yearly", plan="yearly",
                            quantity=1).value
    mid = NOV_1 + timedelta(days=15)
    ledger.command("subscription.change", "acme", at=mid, key="team", quantity=1)
    first = invoice_id_of(team["subscription_id"], "acme", NOV_1)
    ledger.command("invoice.payment_failed", "acme", at=mid, invoice_id=first)
    ledger.command("invoice.mark_paid", "acme", at=mid, invoice_id=invoice_id_of(ops["subscription_id"], "acme", NOV_1),
                   payment="pi_ops")
    ledger.command("subscription.pause", "acme", at=mid, key="yearly")
    dec_1 = datetime(2026, 12, 1, tzinfo=UTC)
    ledger.command("subscription.tick", "acme", at=dec_1, key="team")
    renewal = f"{team['subscription_id']}/{dec_1.isoformat()}"
    ledger.command("invoice.usage_lines", "acme", at=dec_1, invoice_key=renewal, lines=[
        {"kind": "usage", "description": "API calls: 1,500", "amount": "5.00", "meter": "api_calls",
         "quantity": "1500", "events": 3}])
    ledger.command("invoice.mark_paid", "acme", at=dec_1, invoice_id=first, payment="pi_team")

    ledger.command("subscription.create", "globex", at=NOV_1, key="try", plan="trial", trial=True)
    euro = ledger.command("subscription.create", "initech", at=NOV_1, key="euro", plan="euro", quantity=3).value
    ledger.command("subscription.cancel", "initech", at=mid, key="euro")
    gone = ledger.command("subscription.create", "globex", at=NOV_1, key="gone", plan="team", quantity=1).value
    ledger.command("subscription.cancel", "globex", at=mid, key="gone", immediately=True)
    # Rating's usage lines of the period the cancel cut short (none): its final draft is voided, unnumbered.
    ledger.command("invoice.usage_lines", "globex", at=mid, invoice_key=f"{gone['subscription_id']}/{mid.isoformat()}",
                   lines=[], period_start=NOV_1.isoformat(), period_end=mid.isoformat())
    return {"team": team["subscription_id"], "ops": ops["subscription_id"], "yearly": yearly["subscription_id"],
            "euro": euro["subscription_id"], "first_invoice": first,
            "renewal_invoice": str(invoice_uuid("acme", renewal))}


def invoice_uuid(tenant: str, key: str) -> UUID:
    from billing_ledger.domain.invoice import invoice_id

    return invoice_id(tenant, key)


def invoice_id_of(subscription_id: str, tenant: str, period_start: datetime) -> str:
    """The first invoice of a subscription period (the ledger keys it by subscription and period start)."""
    return str(invoice_uuid(tenant, f"{subscription_id}/{period_start.isoformat()}"))


AUG_1 = datetime(2026, 8, 1, tzinfo=UTC)
SEP = datetime(2026, 9, 1, 12, tzinfo=UTC)  # Sep 1, noon; the day of a change is SEP + days
OCT = datetime(2026, 10, 1, 12, tzinfo=UTC)
ANALYTICS_CATALOG: dict[str, Any] = {
    "plans": [
        {"code": "basic", "name": "Basic", "currency": "USD", "base_fee": "10.00"},
        {"code": "pro", "name": "Pro", "currency": "USD", "base_fee": "50.00"},
        {"code": "annual", "name": "Annual", "currency": "USD", "base_fee": "1200.00", "cadence": "year"},
        {"code": "quarter", "name": "Quarter", "currency": "USD", "base_fee": "90.00", "cadence": "quarter"},
        {"code": "tried", "name": "Tried", "currency": "USD", "base_fee": "20.00", "trial_days": 14},
        {"code": "euro", "name": "Euro", "currency": "EUR", "base_fee": "30.00"},
    ],
}


def analytics_scenario(ledger: Ledger, prefix: str = "") -> None:
    """Customers whose MRR moves in September 2026, through the ledger's own commands (tenants ``prefix`` + name).

    Live from Aug 1 (USD, MRR): up 10 (Sep 10: basic -> pro, 50), down 100 (pro x 2; Sep 12: x 1, 50), gone 30
    (basic x 3; Sep 15: canceled), nap 100 (annual 1200.00 a year; Sep 5: paused; Oct 3: resumed), both 40 (basic 10
    + quarter 90.00 a quarter; Sep 14: basic canceled, 30 left), zigzag 10 (Sep 3: basic x 5, 50; Sep 20: x 2, 20),
    late 10 (Sep 2: its first invoice's payment failed: past_due), ends 10 (Sep 20: to cancel at its period's end,
    Oct 1; the tick records it on Oct 2). tryout: a trial from Aug 25, converted Sep 8 (20).
    fresh: basic from Sep 18 (10). flash: pro from Sep 8, canceled Sep 20. euro (EUR): 30 from Aug 1, Sep 9: x 2.
    """
    ledger.command("catalog.publish", None, at=AUG_1, document=ANALYTICS_CATALOG, digest=f"analytics-{prefix}")
    for name in ("up", "down", "gone", "nap", "both", "zigzag", "late", "ends", "tryout", "fresh", "flash"):
        ledger.command("account.open", prefix + name, at=AUG_1, currency="USD")
    ledger.command("account.open", prefix + "euro", at=AUG_1, currency="EUR")

    def create(name: str, key: str, plan: str, at: datetime = AUG_1, quantity: int = 1, trial: bool = False) -> str:
        made = ledger.command("subscription.create", prefix + name, at=at, key=key, plan=plan, quantity=quantity,
                              trial=trial)
        return str(made.value["subscription_id"])

    def command(kind: str, name: str, days: int, key: str = "main", base: datetime = SEP, **payload: Any) -> None:
        ledger.command(f"subscription.{kind}", prefix + name, at=base + timedelta(days=days), key=key, **payload)

    for name, plan, quantity in (("up", "basic", 1), ("down", "pro", 2), ("gone", "basic", 3), ("nap", "annual", 1),
                                 ("both", "basic", 1), ("zigzag", "basic", 1), ("ends", "basic", 1),
                                 ("euro", "euro", 1)):
        create(name, "main", plan, quantity=quantity)
    create("both", "extra", "quarter")
    late = create("late", "main", "basic")
    create("tryout", "main", "tried", at=AUG_1 + timedelta(days=24), trial=True)
    ledger.command("payment_method.add", prefix + "tryout", at=AUG_1 + timedelta(days=24), method_id="pm_1",
                   gateway="stripe", label="visa 4242", default=True)

    command("change", "zigzag", 2, quantity=5)
    ledger.command("invoice.payment_failed", prefix + "late", at=SEP + timedelta(days=1),
                   invoice_id=invoice_id_of(late, prefix + "late", AUG_1))
    command("pause", "nap", 4)
    ledger.command("subscription.tick", prefix + "tryout", at=datetime(2026, 9, 8, tzinfo=UTC), key="main")
    create("flash", "main", "pro", at=SEP + timedelta(days=7))
    command("change", "euro", 8, quantity=2)
    command("change", "up", 9, plan="pro")
    command("change", "down", 11, quantity=1)
    command("cancel", "both", 13, key="main", immediately=True)
    command("cancel", "gone", 14, immediately=True)
    create("fresh", "main", "basic", at=SEP + timedelta(days=17))
    command("change", "zigzag", 19, quantity=2)
    command("cancel", "flash", 19, immediately=True)
    command("tick", "ends", 0)  # renewed on time: Sep 1 - Oct 1
    command("cancel", "ends", 19)  # at its period's end, Oct 1
    command("resume", "nap", 2, base=OCT)
    command("tick", "ends", 1, base=OCT)  # a day late: canceled as of Oct 1 all the same


# A plan of 10.00 a month including 10.00 USD of credit; ``api_calls`` priced in real time, ``seats`` (the last
# reading) at the period's close, after the renewal.
LATE_USAGE_CATALOG: dict[str, Any] = {
    "meters": [{"code": "api_calls", "name": "API calls", "unit_of_measure": "call",
                "price": {"model": "per_unit", "unit": "USD", "unit_amount": "0.10"}},
               {"code": "seats", "name": "Seats", "unit_of_measure": "seat", "aggregation": "last",
                "price": {"model": "per_unit", "unit": "USD", "unit_amount": "3.00"}}],
    "plans": [{"code": "included", "name": "Included", "currency": "USD", "base_fee": "10.00",
               "recurring_credits": [{"unit": "USD", "amount": "10.00"}]}],
}


def usage_debit(ledger: Ledger, tenant: str, amount: str, at: datetime, *, meter: str = "api_calls",
                policy: str = "overage", period: datetime = NOV_1) -> CommandResult:
    """A ``usage.debit`` as rating sends it (of the subscription period beginning at ``period``)."""
    return ledger.command("usage.debit", tenant, at=at, unit="USD", amount_subunits=int(Decimal(amount) * U),
                          meter=meter, overage_policy=policy,
                          cause={"event_ids": [f"{tenant}-{meter}-{at.isoformat()}"], "period": period.isoformat()})


def period_ended_scenario(ledger: Ledger, tenant: str = "acme") -> None:
    """``tenant`` on the plan above from Nov 1, a low-balance alert below 5.00 and a rule "below 5.00, top up to
    20.00", 4.00 of November's 10.00 of credit used, paused from Nov 25: the Dec 1 renewal grants no December credit
    and sets November's 6.00 aside for November's late usage (0.00 available, 6.00 in the balance)."""
    ledger.command("catalog.publish", None, at=NOV_1, document=LATE_USAGE_CATALOG, digest="late-usage-1")
    ledger.command("account.open", tenant, at=NOV_1, currency="USD")
    ledger.command("subscription.create", tenant, at=NOV_1, key="m", plan="included")
    ledger.command("low_balance.set", tenant, at=NOV_1, threshold="5.00", unit="USD")
    ledger.command("auto_top_up.set", tenant, at=NOV_1, threshold="5.00", target="20.00", cooldown_seconds=0,
                   monthly_cap="500")
    usage_debit(ledger, tenant, "4.00", NOV_1 + timedelta(days=19))
    ledger.command("subscription.pause", tenant, at=NOV_1 + timedelta(days=24), key="m")
    ledger.command("subscription.tick", tenant, at=datetime(2026, 12, 1, tzinfo=UTC), key="m")


CLOSE_OCT_1 = datetime(2026, 10, 1, tzinfo=UTC)
CLOSE_NOV_1 = datetime(2026, 11, 1, tzinfo=UTC)
CLOSE_CATALOG: dict[str, Any] = {
    "meters": [{"code": "api_calls", "name": "API calls", "unit_of_measure": "call"}],
    "plans": [{"code": "team", "name": "Team", "currency": "USD", "base_fee": "31.00"}],
}


def _account(ledger: Ledger, tenant: str, change: Any) -> None:
    """Loads ``tenant``'s account, applies ``change`` to it and saves it (between the ledger's own commands)."""
    account = ledger.get(ids.account_id(tenant))
    change(account)
    ledger.save(account)


def month_end_scenario(ledger: Ledger, tenant: str = "close", *, catalog: bool = True) -> None:
    """October 2026 of ``tenant`` (USD), through the ledger's own commands and aggregate, as the ledger has it once
    October is over: a subscription to Team (31.00 a month, billed in advance on Oct 1 and recognised ratably, each
    day's share dated in it: the runs of Oct 16 and Oct 31 and the one at the period's end, Nov 1 00:00:20, which
    recognises Oct 31), 100.00 of credit bought on Oct 5 (19.00 of tax), a 10.00 promotion expiring on Oct 20, 4.00
    of usage on Oct 10 (drawn from the promotion, the first to expire), the promotion's 6.00 lapsed by the Oct 21
    sweep. ``catalog``: publish its catalogue first (once per ledger)."""
    if catalog:
        ledger.command("catalog.publish", None, at=CLOSE_OCT_1, document=CLOSE_CATALOG, digest="close-1")
    ledger.command("account.open", tenant, at=CLOSE_OCT_1, currency="USD")
    ledger.command("subscription.create", tenant, at=CLOSE_OCT_1, key="m", plan="team", quantity=1)
    day = timedelta(days=1)
    _account(ledger, tenant, lambda a: a.grant_credit(
        grant_id=uid(tenant, "bought"), unit="USD", amount=100 * U, tax_amount=19 * U, effective_at=CLOSE_OCT_1 + 4 * day,
        expires_at=None, scope=None, source="purchase", cause={"payment_id": f"pi_{tenant}"},
        granted_by="service:payments"))
    _account(ledger, tenant, lambda a: a.grant_credit(
        grant_id=uid(tenant, "promo"), unit="USD", amount=10 * U, effective_at=CLOSE_OCT_1 + 5 * day,
        expires_at=CLOSE_OCT_1 + 19 * day, scope=None, source="promotion", cause={"code": "OCT"},
        granted_by="admin@test"))
    ledger.command("usage.debit", tenant, at=CLOSE_OCT_1 + 9 * day, unit="USD", amount_subunits=4 * U,
                   meter="api_calls", cause=usage_cause(f"{tenant}-oct", "20"))
    for at in (CLOSE_OCT_1 + 15 * day + timedelta(hours=12), CLOSE_OCT_1 + 30 * day + timedelta(seconds=30)):
        ledger.command("money.recognise", tenant, at=at, now=at.isoformat())
    ledger.command("grant.expire", tenant, at=CLOSE_OCT_1 + 20 * day, now=(CLOSE_OCT_1 + 20 * day).isoformat())
    # The first sweep of Nov 1, at the period's end: Oct 31's share, dated Oct 31 (recorded once the day is over).
    run = CLOSE_NOV_1 + timedelta(seconds=20)
    ledger.command("money.recognise", tenant, at=run, now=run.isoformat())


def month_end_later(ledger: Ledger, tenant: str = "close") -> None:
    """What follows October's close of ``tenant`` (all dated in November): the renewal bills November's 31.00, 10.00
    of the credit bought is refunded (with its tax), 2.00 of usage."""
    from billing_ledger.domain.subscription import subscription_id

    run = CLOSE_NOV_1 + timedelta(seconds=20)
    ledger.command("subscription.tick", tenant, at=CLOSE_NOV_1, key="m")
    # Rating's usage lines of October (none): the renewal invoice is finalized, November's fee billed in advance.
    ledger.command("invoice.usage_lines", tenant, at=run, lines=[],
                   invoice_key=f"{subscription_id(tenant, 'm')}/{CLOSE_NOV_1.isoformat()}")
    ledger.command("grant.refund", tenant, at=CLOSE_NOV_1 + timedelta(days=2), grant_id=str(uid(tenant, "bought")),
                   refund_id=str(uid(tenant, "refund")), amount="10.00", reason="goodwill")
    ledger.command("usage.debit", tenant, at=CLOSE_NOV_1 + timedelta(days=3), unit="USD", amount_subunits=2 * U,
                   meter="api_calls", cause=usage_cause(f"{tenant}-nov", "10"))

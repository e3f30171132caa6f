"""Response models of the query API (OpenAPI). Amounts are exact decimal strings in the unit's scale."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

Amount = str


class Wallet(BaseModel):
    unit: str = Field(description="ISO 4217 currency or catalogue credit type", examples=["USD"])
    available: Amount = Field(description="What new usage and holds can spend: balance - held - late_usage_reserve "
                                          "(the ledger's low-balance alert, auto-top-up, holds and block policy use it)",
                              examples=["95.40"])
    held: Amount
    late_usage_reserve: Amount = Field(
        description="Credit of a plan period that has ended, kept for that period's usage reaching the ledger late "
                    "(a close debit, delayed usage) until it lapses: in balance, not available (new usage cannot "
                    "draw it)", examples=["0.00"])
    balance: Amount = Field(description="Accounting balance of the wallet (tenant_wallet): available + held + "
                                        "late_usage_reserve")
    receivable: Amount = Field(description="Owed: usage posted beyond credit (overage) and the fees and tax of unpaid subscription invoices")
    expiring_soon: Amount = Field(description="Remaining credit of open grants expiring within 7 days (or, "
                                  "sooner, no longer drawable: drawable_until)")
    low_balance_threshold: Amount | None = None
    low_balance: bool = Field(description="available is below the low-balance threshold")
    low_balance_reached_at: str | None = None
    updated_at: str | None = None


class Balance(BaseModel):
    tenant: str
    currency: str
    wallets: list[Wallet]
    position: int = Field(description="Freshness: ledger position of the last event applied for this account")
    updated_at: str | None = None


class Grant(BaseModel):
    grant_id: str
    unit: str
    source: str = Field(examples=["purchase", "promotion", "plan_recurrence", "manual"])
    status: str = Field(examples=["open", "expired", "voided"])
    amount: Amount = Field(description="What the grant gives: as granted, less carry_drawn (a plan credit that took "
                                       "the period before's carry: what it can still give its own period)")
    carry_drawn: Amount = Field(
        description="Of a plan credit that took a carry from the period before (rollover, a plan change's rest): what "
                    "that period's late usage drew of it since (amount + carry_drawn is what was granted)")
    remaining: Amount
    tax: Amount
    refunded: Amount
    breakage: Amount
    priority: int
    effective_at: str
    expires_at: str | None
    drawable_until: str | None = Field(
        default=None, description="When usage stops drawing this credit though the grant stays open until "
                                  "expires_at (a plan's recurring credit: its period's end; with rollover the "
                                  "renewal carries or lapses it, without it stays open for that period's late "
                                  "usage and lapses at expires_at); null: drawable until it expires")
    expiring_soon: bool = Field(description="Remaining credit whose end (the earlier of drawable_until and "
                                            "expires_at) falls within 7 days")
    set_aside_at: str | None = Field(
        default=None, description="When its period ended and what is left of it was set aside for that period's "
                                  "late usage (the wallet's late_usage_reserve, out of available); null: not set aside")
    scope: list[str] | None
    granted_by: str | None
    cause: dict[str, Any]


class Grants(BaseModel):
    tenant: str
    items: list[Grant]


class Transaction(BaseModel):
    position: int = Field(description="Ledger position: the order of the ledger")
    tenant: str
    occurred_at: str = Field(description="Business time (usage time for debits), ISO 8601 UTC")
    recorded_at: str
    type: str = Field(examples=["purchase", "grant", "usage", "expiry", "refund", "adjustment", "hold_placed"])
    unit: str
    amount: Amount = Field(description="The movement as the tenant sees it: credit added (+) or taken (-)")
    wallet_delta: Amount = Field(description="Exact change of the wallet balance")
    held_delta: Amount = Field(description="Exact change of held credit")
    meter: str | None
    quantity: str | None
    user: str | None = Field(description="Who did it: granted_by, the adjusting or refunding user, who placed, "
                                         "captured or released a hold (since session 13), or the usage's user; "
                                         "null when the event names nobody")
    grant_id: str | None
    hold_id: str | None
    event_ids: list[str] = Field(description="Usage event ids that caused a debit")
    payment_id: str | None
    reference: str | None = Field(description="Command, refund, adjustment or settlement id")
    detail: str | None
    cause: dict[str, Any]


class Transactions(BaseModel):
    items: list[Transaction]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next (older) page; null at the end")


class MonthlyUsage(BaseModel):
    tenant: str
    year: int
    month: int
    meter: str = Field(description="Meter code")
    usage_type: str | None = Field(description="Reporting category of the meter, e.g. ai, compute, storage")
    meter_name: str | None
    unit_of_measure: str | None
    quantity: str = Field(description="Quantity used in the month (exact decimal), including usage that cost "
                                      "nothing (within the allowance, a flat fee or band, a trial), counted as the "
                                      "invoice counts it: a count meter one per event (whatever the event's "
                                      "quantity); a correction counts by the difference it made; a "
                                      "max/last/unique_count meter: its period's quantity as invoiced")
    unit: str
    cost: Amount = Field(description="What the month's usage was charged (0 for free usage)")
    events: int = Field(description="Usage events counted (corrections included)")


class MonthlyUsagePage(BaseModel):
    items: list[MonthlyUsage]
    next_cursor: str | None


class AIUsage(BaseModel):
    model: str | None = None
    operation: str | None = None
    user: str | None = None
    input_tokens: str
    output_tokens: str
    cached_tokens: str
    tokens: str
    unit: str
    cost: Amount
    events: int


class AIUsageList(BaseModel):
    group_by: list[str]
    items: list[AIUsage]


class Figures(BaseModel):
    period: str = Field(description="YYYY-MM-DD or YYYY-MM")
    unit: str
    top_ups: Amount
    tax_collected: Amount
    funds_in: Amount
    settlements: Amount
    promotional: Amount
    plan_grants: Amount
    consumed: Amount
    receivables: Amount
    breakage: Amount
    refunds: Amount = Field(description="Money paid back to the customer through the gateway (purchase refunds, "
                                        "refunds of paid invoices), tax included")
    tax_refunded: Amount = Field(description="The tax in refunds")
    credit_notes: Amount = Field(description="Account credit given by subscription credit notes (a downgrade's or "
                                             "cancel's unused time, a correction of invoiced usage), tax included; "
                                             "no money paid back, so not in refunds")
    credit_note_tax: Amount = Field(description="The tax in credit_notes")
    adjustments: Amount
    chargebacks: Amount = Field(description="Money lost disputes took back through the gateway (the credit and tax "
                                            "of a chargeback, an invoice's payment owed again), tax included; not "
                                            "in refunds")
    chargeback_tax: Amount = Field(description="The tax in chargebacks")
    disputed: Amount = Field(description="Funds gateways withdrew for open disputes, less what they reinstated or a "
                                         "close returned (summed over all time: the money still held)")
    dispute_fees: Amount = Field(description="What gateways charged the operator for disputes (Stripe's dispute fee, "
                                             "PayPal's chargeback fee), less fees they gave back: the operator's "
                                             "expense, not the tenant's")


class MRR(BaseModel):
    tenant: str | None = Field(default=None, description="Set when grouped by tenant")
    currency: str
    mrr: Amount = Field(description="Monthly recurring revenue: ARR / 12, rounded once (half-up) to the currency",
                        examples=["58.00"])
    arr: Amount = Field(description="Annual run rate, exact: monthly fees x 12 + quarterly x 4 + yearly")
    subscriptions: int = Field(description="Billable (active or past_due) subscriptions counted")
    monthly_fees: Amount = Field(description="Sum of base fee x quantity of monthly subscriptions")
    quarterly_fees: Amount
    yearly_fees: Amount


class MRRList(BaseModel):
    items: list[MRR]


Ratio = str


class SubscriptionAnalytics(BaseModel):
    """One calendar month (UTC) of one currency's subscription revenue (services/projections/README.md
    "Subscription analytics"). A customer is an account in that currency; it is live when its MRR (active and
    past_due subscriptions, as /v1/reports/mrr) is above zero. Each customer's MRR at the month's start is compared
    with its MRR at its end, so changes within the month net out."""

    month: str = Field(description="YYYY-MM (UTC)", examples=["2026-11"])
    currency: str = Field(examples=["USD"])
    complete: bool = Field(description="The month has ended; false: this month, counted to date")
    accounts_start: int = Field(description="Customers live at the month's start")
    accounts_new: int = Field(description="Customers live at its end that were not at its start")
    accounts_churned: int = Field(description="Customers live at its start that are not at its end")
    accounts_end: int = Field(description="Customers live at its end")
    mrr_start: Amount = Field(description="MRR at the month's start (as /v1/reports/mrr then)", examples=["280.00"])
    mrr_new: Amount = Field(description="End MRR of the new customers")
    mrr_expansion: Amount = Field(description="MRR gained by customers live at both ends (upgrades, more seats)")
    mrr_contraction: Amount = Field(description="MRR lost by customers live at both ends (downgrades, fewer "
                                                "seats, one of several subscriptions canceled or paused)")
    mrr_churned: Amount = Field(description="Start MRR of the churned customers (canceled or paused)")
    mrr_end: Amount = Field(description="MRR at the month's end (this month: now)")
    logo_churn_rate: Ratio | None = Field(description="accounts_churned / accounts_start, a fraction with 4 "
                                                      "digits, half-up; null without customers at the start",
                                          examples=["0.0400"])
    revenue_churn_rate: Ratio | None = Field(description="Gross: (contraction + churned) / start, exact sums, 4 "
                                                         "digits, half-up", examples=["0.6786"])
    net_revenue_retention: Ratio | None = Field(description="(start + expansion - contraction - churned) / start, "
                                                            "exact sums, 4 digits, half-up", examples=["1.0250"])


class SubscriptionAnalyticsList(BaseModel):
    months: list[str] = Field(description="The months asked for, oldest first (a month without a live customer "
                                          "has no item)")
    items: list[SubscriptionAnalytics]


class FiguresList(BaseModel):
    granularity: str
    items: list[Figures]
    mrr: list[MRR] | None = Field(default=None, description="Recurring revenue now, per currency (see /v1/reports/mrr)")


class InvoiceLine(BaseModel):
    kind: str = Field(examples=["base_fee", "usage", "credits_applied", "proration", "tax"])
    description: str | None
    quantity: str | None
    unit_amount: str | None
    amount: Amount = Field(description="Rounded once to the currency's minor unit")
    exact_amount: str | None = Field(description="The amount before that rounding")
    meter: str | None
    detail: dict[str, Any] = Field(description="Everything else the line carries (events, fraction, ...)")


class Invoice(BaseModel):
    invoice_id: str
    tenant: str
    number: str | None = Field(description="Gap-free per issuer and year, e.g. INV-2026-000123; null for a draft")
    document_type: str = Field(examples=["invoice", "credit_note"])
    status: str = Field(examples=["draft", "finalized", "paid", "void"])
    currency: str
    issue_date: str | None = Field(description="ISO 8601 date (UTC)", examples=["2026-11-01"])
    due_date: str | None = Field(description="ISO 8601 date (UTC)", examples=["2026-11-15"])
    issued_at: str | None
    due_at: str | None
    drafted_at: str
    paid_at: str | None
    voided_at: str | None
    period: str = Field(description="Month of issue (a draft: of drafting), YYYY-MM")
    period_start: str | None = Field(description="Billing period covered")
    period_end: str | None
    subscription_id: str | None
    related_invoice: str | None
    payment_reference: str | None
    void_reason: str | None
    subtotal: Amount
    tax: Amount
    total: Amount
    lines: int = Field(description="Number of lines")
    pdf_url: str = Field(description="The ledger's PDF of this document (GET, same bearer token)")
    position: int = Field(description="Freshness: ledger position of the last event applied to this document")


class InvoiceDetail(Invoice):
    items: list[InvoiceLine]


class Invoices(BaseModel):
    items: list[Invoice]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next (older) page; null at the end")


class Subscription(BaseModel):
    subscription_id: str
    tenant: str
    key: str
    status: str = Field(examples=["incomplete", "trialing", "active", "past_due", "paused", "canceled"])
    plan: str
    plan_name: str | None
    plan_version: int | None
    cadence: str = Field(examples=["month", "quarter", "year"])
    currency: str
    base_fee: str = Field(description="Per unit of quantity and period, exact decimal")
    quantity: int
    time_zone: str | None
    started_at: str
    period_start: str | None
    period_end: str | None
    trial_end: str | None
    cancel_at_period_end: bool
    cancel_at: str | None
    canceled_at: str | None
    cancel_reason: str | None
    paused_at: str | None
    updated_at: str | None


class Subscriptions(BaseModel):
    items: list[Subscription]
    next_cursor: str | None


class ChargebackLine(BaseModel):
    tenant: str
    year: int
    month: int
    unit: str
    cost: Amount
    events: int
    meters: int
    share_percent: str = Field(description="This tenant's share of the month's cost in this unit, 2 decimals")


class Chargeback(BaseModel):
    items: list[ChargebackLine]


class AccountSummary(BaseModel):
    tenant: str
    currency: str
    opened_at: str
    wallets: list[Wallet]


class AccountList(BaseModel):
    items: list[AccountSummary]


class LedgerAccountBalance(BaseModel):
    ledger_account: str
    unit: str
    balance: Amount = Field(description="Signed, debit positive")


class LedgerBalances(BaseModel):
    items: list[LedgerAccountBalance]


class RevenueLine(BaseModel):
    """One unit's (or one tenant's, `by=tenant`) deferred-revenue roll-forward and recognised revenue for the period
    (services/projections/README.md "Revenue report"). Every figure is summed from the ledger's postings dated in the
    period. closing_deferred = opening_deferred + credit_sold + plan_grants + promotional + fees_billed + credit_notes
    + adjustments + other - recognised_usage - recognised_fees - breakage - refunds - chargebacks - overage_repaid."""

    tenant: str | None = Field(default=None, description="Set with by=tenant")
    period: str = Field(description="The month, YYYY-MM (UTC)", examples=["2026-10"])
    unit: str = Field(examples=["USD"])
    kind: str = Field(description="currency: money; credit: a catalogue credit type, figures in credits (the money "
                                  "paid for them is in the currency's line)", examples=["currency", "credit"])
    opening_deferred: Amount = Field(description="Deferred revenue (contract liability: tenant wallets' credit and, "
                                                 "in a currency, fees billed in advance and credit-unit packages' "
                                                 "money) at the period's start")
    credit_sold: Amount = Field(description="In: credit bought, net of tax (and the money of packages granted in a "
                                            "credit unit)")
    plan_grants: Amount = Field(description="In: plans' recurring credit in a credit unit (in a currency it moves "
                                            "within deferred revenue: 0)")
    promotional: Amount = Field(description="In: credit given (promotions, manual grants), funded by promotional "
                                            "expense, less voided remainders")
    fees_billed: Amount = Field(description="In: subscription fees billed in advance for a service period, less voids")
    credit_notes: Amount = Field(description="In: account credit of subscription credit notes, from revenue and tax")
    adjustments: Amount = Field(description="In (signed): manual balance corrections")
    other: Amount = Field(description="In (signed): any other movement of deferred revenue (none known)")
    recognised_usage: Amount = Field(description="Out: credit consumed by usage and captured holds (less "
                                                 "give-backs); credit-unit packages' money recognised")
    recognised_fees: Amount = Field(description="Out: subscription fees recognised ratably over their period")
    breakage: Amount = Field(description="Out: credit lapsed unused (expiry, the lapsed part of a void)")
    refunds: Amount = Field(description="Out: deferred revenue paid back (credit, fees), less reversed refunds")
    chargebacks: Amount = Field(description="Out: the same taken back by lost card disputes")
    overage_repaid: Amount = Field(description="Out: credit bought that repaid overage owed")
    closing_deferred: Amount = Field(description="Deferred revenue at the period's end (as at: the end of that day)")
    recognised_revenue: Amount = Field(description="Revenue recognised in the period: revenue_usage + revenue_fees - "
                                                   "revenue_refunded + revenue_other (minus the sum of the "
                                                   "recognised_revenue account's postings)")
    revenue_usage: Amount = Field(description="From usage: credit consumed, overage, captured holds, packages' money, "
                                              "invoice usage rounding, less give-backs")
    revenue_fees: Amount = Field(description="From subscription invoices: fees recognised, fees billed without a "
                                             "service period, less credit notes and voids")
    revenue_refunded: Amount = Field(description="Revenue paid back by refunds and chargebacks (spent credit, "
                                                 "recognised fees)")
    revenue_other: Amount = Field(description="Any other posting to recognised revenue (signed; none known)")
    breakage_revenue: Amount = Field(description="Breakage account: credit lapsed, less breakage refunded")
    promotional_expense: Amount = Field(description="Promotional expense account: credit given, less voided remainders")


class RevenueReport(BaseModel):
    period: str = Field(description="The month, YYYY-MM (UTC)", examples=["2026-10"])
    as_at: str | None = Field(default=None, description="With at=: the day the report is as at (its end), the month "
                                                        "to that day")
    start: str = Field(description="First day covered, YYYY-MM-DD (from 00:00Z)", examples=["2026-10-01"])
    end: str = Field(description="Day after the last one covered, YYYY-MM-DD (to 00:00Z, exclusive)",
                     examples=["2026-11-01"])
    complete: bool = Field(description="The period has ended; false: counted to date")
    items: list[RevenueLine]

"""Read model: deferred and recognised revenue per tenant, day (UTC, business time) and unit (IFRS 15 month-end close).

``revenue_daily`` holds, for every ledger movement, what its postings did to the tenant's **deferred revenue** (the
contract liability) and to the revenue and expense accounts, so a month's close (or any day's) is read back as sums of
rows: ``GET /v1/reports/revenue`` (services/projections/README.md "Revenue report").

Deferred revenue, per unit, is the balance of the liability accounts a customer's consideration waits in until it is
earned (services/ledger/domain/postings.py): ``tenant_wallet`` (prepaid credit: the tenant-level sub-ledger of deferred
revenue, promotional credit included, funded by ``promotional_expense``) and, in a currency, ``deferred_revenue``
(subscription fees billed in advance, the money of credit packages granted in a credit unit). In a credit unit
``deferred_revenue`` holds only the counter-postings of plans' recurring credit (no fee stands behind them in that
unit), so there the liability is the wallet alone and a plan's credit comes *in* (``plan_grants``). A posting on those
accounts changes deferred revenue by its negated amount (credit-negative: a credit of 10 is 10 more deferred). An
event's change, per unit, is split by its other postings, the *counter-accounts* (they balance the liability's postings
to zero, so each one's signed sum is its share of the change): each share goes to the event's flow below, or to the one
the event names for that counter-account (``_FLOWS``: a void's lapsed part to breakage, an invoice's fees recognised at
once to ``recognised_fees``). A movement no rule names lands in ``other``, so every row's flows always sum to the
change of the liability's balance (``closing = opening + in - out`` holds by construction, and the totals equal the
chart of accounts: tests/unit/projections/test_revenue_report.py checks both against the ledger's own postings).

Flows into deferred revenue (stored as the change they made, positive = more deferred):

* ``credit_sold``: credit bought (``CreditGranted`` source ``purchase``, net of tax) and, in the currency, the money of
  packages granted in a credit unit (``PurchaseMoneyBooked``).
* ``plan_grants``: plans' recurring credit in a credit unit (in a currency the grant moves its fee's deferred revenue
  into the wallet: no change).
* ``promotional``: credit given by promotions and manual grants, funded by ``promotional_expense``; a void's
  remainder going back there is negative.
* ``fees_billed``: subscription fees billed, net of tax (``InvoiceBilled``), less what a void took back
  (``InvoiceBillVoided``). Those of a service period stay deferred; those that are revenue at once (no service period,
  what a plan change earned of the fee it replaces) leave again as ``recognised_fees``.
* ``credit_notes``: account credit of subscription credit notes from outside deferred revenue: the tax they give back
  and the revenue already recognised they reverse (what comes from the corrected invoice's deferred fee moves within
  deferred revenue: the wallet's gain is the schedule's loss; what the change earned of that fee is
  ``recognised_fees``).
* ``adjustments``: manual corrections (``BalanceAdjusted``, signed).
* ``other``: any other change of deferred revenue (signed; none from the ledger's movements known here).

Flows out (stored positive = less deferred):

* ``recognised_usage``: credit consumed by usage and captured holds (less give-backs), and the money of credit-unit
  packages recognised as their credit is used (``PurchaseMoneyRecognised``).
* ``recognised_fees``: subscription fees recognised: ratably over their period (``FeeRevenueRecognised``), at billing
  when they have no service period, at a plan change or cancel what it earned of the fee it cuts; less revenue a void
  took back (negative).
* ``breakage``: credit lapsed unused (``GrantExpired``, the lapsed part of a ``GrantVoided``, a package's money whose
  credit lapsed).
* ``refunds``: deferred revenue paid back (``GrantRefunded``, ``PurchaseMoneyRefunded``, ``InvoicePaymentRefunded``;
  a refund the gateway reversed, ``CreditGranted`` source ``refund_reversal``, negative).
* ``chargebacks``: the same taken back by lost card disputes (the refund events whose ``cause`` names the dispute).
* ``overage_repaid``: credit bought that repaid overage owed (``OverageRepaid``: the overage was revenue already).

Revenue and expense of the period, from the revenue accounts' postings (stored positive = more revenue / expense):

* ``revenue_usage``: ``recognised_revenue`` credited by usage: credit consumed, overage, captured holds, packages'
  money recognised, invoices' usage rounding and a minimum commitment's netting (less give-backs).
* ``revenue_fees``: by subscription invoices: fees recognised ratably, fees billed without a service period, less
  credit notes and voids taken from revenue.
* ``revenue_refunded``: revenue paid back by refunds and chargebacks (spent credit refunded on a finance override, a
  paid invoice's recognised fee refunded): a debit of ``recognised_revenue``, stored positive.
* ``revenue_other``: any other posting to ``recognised_revenue`` (signed). Recognised revenue of the period =
  ``revenue_usage + revenue_fees - revenue_refunded + revenue_other`` = minus the sum of its postings.
* ``breakage_revenue``: minus the sum of ``breakage``'s postings; ``promotional_expense``: the sum of its postings.

A row's day is the movement's business time (``facts.business_time``: its ``at``, else ``effective_at``), as the finance
figures date it (``figures_daily``): a month's figures are the postings dated in that UTC month. The ledger dates a day's
fee recognition in that day (since session 15: the first sweep of Nov 1 records Oct 31's share dated Oct 31), its other
periodic runs (expiry, package money) when they run; a movement the ledger records later but dates in an ended month
(usage that reached it late, a backdated command, the last day's fee) changes that month's figures when it is projected.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from billing_events.money import is_currency_code
from billing_projections.facts import WALLET, Fact, chargeback_of, day_of, posting_sums
from billing_projections.writer import INT_SUM, BatchWriter, Handler, Table, value
from billing_runtime.db import Database

DEFERRED = "deferred_revenue"
RECOGNISED = "recognised_revenue"
BREAKAGE = "breakage"
PROMOTIONAL_EXPENSE = "promotional_expense"

FLOWS_IN = ("credit_sold", "plan_grants", "promotional", "fees_billed", "credit_notes", "adjustments", "other")
FLOWS_OUT = ("recognised_usage", "recognised_fees", "breakage", "refunds", "chargebacks", "overage_repaid")
REVENUE = ("revenue_usage", "revenue_fees", "revenue_refunded", "revenue_other", "breakage_revenue",
           "promotional_expense")
COLUMNS = (*FLOWS_IN, *FLOWS_OUT, *REVENUE)
# A line of the report: the roll-forward of deferred revenue (opening, each flow, closing), then the period's revenue.
REPORT_AMOUNTS = ("opening_deferred", *FLOWS_IN, *FLOWS_OUT, "closing_deferred", "recognised_revenue", *REVENUE)
REVENUE_DAILY = Table("revenue_daily", {"tenant": "TEXT", "day": "TEXT", "unit": "TEXT"}, {
    **{name: INT_SUM for name in COLUMNS}, "last_position": value("BIGINT"),
}, indexes=("day, tenant",))
TABLES = (REVENUE_DAILY,)

# Each event's change of deferred revenue, split by its counter-accounts: each one's signed sum is its share (the
# postings balance per unit), and goes to the event's flow unless the event names another for that account. An event
# without a rule puts all of it in ``other``.
_BY_SIGN = "by sign"  # a credit note's revenue: reversed into credit (a debit) or earned at the change (a credit)
_CLEARING, _MANUAL = "gateway_clearing", "manual_adjustment"
_VOID_SPLIT = {BREAKAGE: "breakage", PROMOTIONAL_EXPENSE: "promotional", _MANUAL: "adjustments", DEFERRED: "plan_grants",
               RECOGNISED: "recognised_usage", _CLEARING: "refunds"}
_FLOWS: dict[str, tuple[str, dict[str, str]]] = {
    "PurchaseMoneyBooked": ("credit_sold", {}),
    # A run over credit-unit packages' money: consumed credit's share to revenue, lapsed credit's to breakage.
    "PurchaseMoneyRecognised": ("recognised_usage", {BREAKAGE: "breakage"}),
    "GrantExpired": ("breakage", {}),
    # A void: the remainder back to the account that funded the grant (in a currency a plan's credit goes back to
    # its fee's deferred revenue: no change), the lapsed part to breakage.
    "GrantVoided": ("other", _VOID_SPLIT),
    # Since session 14, as a void: a plan credit kept for late usage moves its rest into the next grant (a rollover's
    # carry, a change's rest) or lapses it to breakage; a partial chargeback voids its share of an order's bonus.
    "GrantKeptForLateUsage": ("other", _VOID_SPLIT),
    "GrantPartVoided": ("other", _VOID_SPLIT),
    "UsageDebited": ("recognised_usage", {}),
    "HoldCaptured": ("recognised_usage", {}),
    "BalanceAdjusted": ("adjustments", {}),
    # Fees and tax receivable, less tax: the fees billed; what of them is revenue at once (no service period, or
    # earned by a change at its time) is recognised (a void: both negative).
    "InvoiceBilled": ("fees_billed", {RECOGNISED: "recognised_fees"}),
    "InvoiceBillVoided": ("fees_billed", {RECOGNISED: "recognised_fees"}),
    "FeeRevenueRecognised": ("recognised_fees", {}),
    "OverageRepaid": ("overage_repaid", {}),
    **{name: ("refunds", {}) for name in ("GrantRefunded", "PurchaseMoneyRefunded", "InvoicePaymentRefunded")},
}
_GRANT_SOURCES: dict[str, str] = {
    "purchase": "credit_sold", "plan_recurrence": "plan_grants", "promotion": "promotional", "manual": "promotional",
    "refund_reversal": "refunds", "credit_note": "credit_notes",
}
_CREDIT_NOTE_SPLIT = {RECOGNISED: _BY_SIGN}
_REFUNDS = frozenset({"GrantRefunded", "PurchaseMoneyRefunded", "InvoicePaymentRefunded"})
_REVENUE_KIND: dict[str, str] = {
    **dict.fromkeys(("UsageDebited", "HoldCaptured", "PurchaseMoneyRecognised", "InvoicedOverageRounded",
                     "InvoicedOverageRoundingReversed", "PeriodMinimumsCharged", "GrantVoided", "GrantKeptForLateUsage",
                     "GrantPartVoided"), "revenue_usage"),
    **dict.fromkeys(("InvoiceBilled", "InvoiceBillVoided", "FeeRevenueRecognised", "CreditGranted"), "revenue_fees"),
    **dict.fromkeys(_REFUNDS, "revenue_refunded"),
}
_OUT = frozenset(FLOWS_OUT)


@lru_cache(maxsize=256)
def _deferred_in_pool(unit: str) -> bool:
    """Whether ``deferred_revenue`` in ``unit`` is part of the liability: in a currency yes, in a credit unit no."""
    return is_currency_code(unit)


def in_pool(account: str, unit: str) -> bool:
    """Whether a posting on ``account`` in ``unit`` moves deferred revenue (the liability this report rolls forward)."""
    return account == WALLET or (account == DEFERRED and _deferred_in_pool(unit))


def flows(fact: Fact) -> dict[str, dict[str, int]]:
    """unit -> column -> amount (the columns' own signs, see the module) of one event; units it does not move left out."""
    accounts = posting_sums(fact).accounts
    if not accounts:
        return {}
    counters: dict[str, dict[str, int]] = {}  # unit -> counter-account -> signed sum (pool accounts left out)
    for (account, unit), amount in accounts.items():
        if not in_pool(account, unit):
            counters.setdefault(unit, {})[account] = amount
    flow, split = _flow_of(fact)
    name = fact.name
    out: dict[str, dict[str, int]] = {}
    for unit in sorted(counters):
        found: dict[str, int] = {}
        counter = counters[unit]
        for account, amount in counter.items():
            chosen = split.get(account, flow)
            if chosen == _BY_SIGN:
                chosen = "credit_notes" if amount > 0 else "recognised_fees"
            found[chosen] = found.get(chosen, 0) + (-amount if chosen in _OUT else amount)
        revenue = counter.get(RECOGNISED, 0)
        if revenue:
            kind = _REVENUE_KIND.get(name, "revenue_other")
            # revenue_refunded: a debit of revenue, paid back, stored positive; the others: a credit is revenue.
            found[kind] = found.get(kind, 0) + (revenue if kind == "revenue_refunded" else -revenue)
        if counter.get(BREAKAGE):
            found["breakage_revenue"] = -counter[BREAKAGE]
        if counter.get(PROMOTIONAL_EXPENSE):
            found["promotional_expense"] = counter[PROMOTIONAL_EXPENSE]
        found = {k: v for k, v in found.items() if v}
        if found:
            out[unit] = found
    return out


def _flow_of(fact: Fact) -> tuple[str, dict[str, str]]:
    """The flow an event's change of deferred revenue goes to, and the counter-accounts whose share goes elsewhere."""
    name, data = fact.name, fact.data
    if name == "CreditGranted":
        source = str(data.get("source"))
        return _GRANT_SOURCES.get(source, "other"), (_CREDIT_NOTE_SPLIT if source == "credit_note" else {})
    flow, split = _FLOWS.get(name, ("other", {}))
    if flow == "refunds" and name in _REFUNDS and chargeback_of(data):
        return "chargebacks", split
    return flow, split


def deferred_change(row: dict[str, Any]) -> int:
    """The change of deferred revenue a row's (or a sum of rows') flows make: in - out."""
    return sum(int(row[c] or 0) for c in FLOWS_IN) - sum(int(row[c] or 0) for c in FLOWS_OUT)


def recognised_revenue(row: dict[str, Any]) -> int:
    """Recognised revenue of a row (or a sum of rows): minus the sum of ``recognised_revenue``'s postings."""
    return (int(row["revenue_usage"] or 0) + int(row["revenue_fees"] or 0) - int(row["revenue_refunded"] or 0)
            + int(row["revenue_other"] or 0))


def handler_for(event_type: str) -> Handler | None:
    # Every account event with postings; a usage debit takes debits.project, which writes the same row (a change here
    # goes there too: tests/unit/projections/test_debits.py compares the two).
    return project if event_type.startswith("BillingAccount.") else None


def project(fact: Fact, w: BatchWriter) -> None:
    if fact.aggregate != "BillingAccount" or not fact.tenant or not fact.data.get("postings"):
        return
    day = day_of(fact.occurred_at)
    last = {"last_position": fact.position}
    for unit, found in flows(fact).items():
        w.upsert(REVENUE_DAILY, (fact.tenant, day, unit), add=found, set=last)


# -- queries ---------------------------------------------------------------------------------------------

_POOL_ACCOUNTS = (WALLET, DEFERRED)


async def period_rows(db: Database, *, start_day: str, end_day: str, tenant: str | None = None,
                      by_tenant: bool = True) -> list[dict[str, Any]]:
    """Per tenant and unit (``by_tenant``; else per unit, all tenants summed by PostgreSQL, ``tenant`` None): every
    column summed over the days [``start_day``, ``end_day``), the change of deferred revenue dated from ``end_day`` on
    (``later``), and the liability's balance now (``now``, from the chart of accounts, ``ledger_balances``), so
    ``closing = now - later`` and ``opening = closing - (in - out)``: the rows read are those dated from the period's
    start on, not the whole history. One statement, so one snapshot of both tables (the consumer commits them
    together)."""
    where, args = "", [start_day, end_day]
    if tenant is not None:
        args.append(tenant)
        where = " AND tenant = $3"
    keys, group = ("tenant, unit", "tenant, unit") if by_tenant else ("NULL AS tenant, unit", "unit")
    # A tenant's sums fit a BIGINT as its balances do (decoded as int, not Decimal: a report by tenant has thousands of
    # lines); the sums of all tenants stay numeric.
    total = "CAST(SUM({}) AS BIGINT)" if by_tenant else "SUM({})"
    sums = ", ".join(f"SUM(CASE WHEN day < $2 THEN {c} ELSE 0 END) AS {c}" for c in COLUMNS)
    change = " + ".join(FLOWS_IN) + " - " + " - ".join(FLOWS_OUT)
    zeros = ", ".join(f"0 AS {c}" for c in COLUMNS)
    outer = ", ".join(f"{total.format(c)} AS {c}" for c in (*COLUMNS, "later", "wallet", "deferred"))
    rows = await db.fetch(
        f"SELECT {'tenant, unit' if by_tenant else 'NULL AS tenant, unit'}, {outer} FROM ("
        f"SELECT {keys}, {sums}, SUM(CASE WHEN day >= $2 THEN {change} ELSE 0 END) AS later, 0 AS wallet, "
        f"0 AS deferred FROM revenue_daily WHERE day >= $1{where} GROUP BY {group} "
        f"UNION ALL SELECT {keys}, {zeros}, 0 AS later, "
        f"SUM(CASE WHEN ledger_account = '{WALLET}' THEN amount ELSE 0 END) AS wallet, "
        f"SUM(CASE WHEN ledger_account = '{DEFERRED}' THEN amount ELSE 0 END) AS deferred FROM ledger_balances "
        f"WHERE ledger_account IN ('{WALLET}', '{DEFERRED}'){where} GROUP BY {group}) AS parts GROUP BY {group}", *args)
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        unit = r["unit"]
        row = {"tenant": r["tenant"], "unit": unit, **{c: int(r[c] or 0) for c in COLUMNS}}
        row["later"] = int(r["later"] or 0)
        # Credit-negative: a credit balance is that much deferred; deferred_revenue only in a currency (``in_pool``).
        row["now"] = -int(r["wallet"] or 0) - (int(r["deferred"] or 0) if _deferred_in_pool(unit) else 0)
        found[(r["tenant"] or "", unit)] = row
    for row in found.values():
        row["closing_deferred"] = row["now"] - row["later"]
        row["opening_deferred"] = row["closing_deferred"] - deferred_change(row)
        row["recognised_revenue"] = recognised_revenue(row)
    return [found[k] for k in sorted(found)]

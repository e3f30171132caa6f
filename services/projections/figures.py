"""Read model: billing dashboard figures per tenant, day (UTC, business time) and unit.

* ``top_ups``: credit bought (purchase grants, net of tax); ``tax_collected``: tax on those purchases and on
  subscription invoices when they are paid (``InvoicePaid``); ``funds_in``: money taken in through the gateway
  (top-ups + tax + receivables settled + subscription invoices paid + refund reversals); ``settlements``:
  receivables paid (overage, and the fees and tax of subscription invoices). A package granted in a credit unit counts its credit in that
  unit (``top_ups``, and ``funds_in`` as the ledger's clearing posting in that unit) and the money paid for it
  in the currency (``PurchaseMoneyBooked``: ``funds_in`` = total, ``tax_collected`` = its tax).
* ``promotional`` / ``plan_grants``: credit given by promotions and manual grants / by plan recurrences.
* ``consumed``: credit consumed by usage and captured holds (give-backs negative); ``receivables``: the part
  posted beyond credit (overage), and the fees and tax a subscription invoice bills (``InvoiceBilled``; a
  voided one negative), less the overage of a period raised late that its minimum commitment already billed
  (``PeriodMinimumsCharged``), plus the rounding of an invoice's usage lines posted with its overage
  (``InvoicedOverageRounded``; taken back when it is voided: ``InvoicedOverageRoundingReversed``), less what of an
  invoice finalized before session 13 no gateway could charge (12.957 KWD paid 12.950: ``InvoiceChargeRounded``). In the currency it is also the revenue recognised for the money of packages
  granted in a credit unit as their credit is used (``PurchaseMoneyRecognised``, periodic: ``recognised``), so
  a currency's ``consumed`` is the revenue its prepaid credit earned.
* ``breakage``: unused credit lapsed at expiry, or the part of a voided plan credit that lapsed (above its
  rollover cap at its period's end, or its fee given back in full: ``GrantVoided.lapsed``); in the currency also
  the money of credit-unit packages whose credit lapsed (``PurchaseMoneyRecognised.breakage``).
* ``refunds``: money paid back to the customer through the gateway, incl. tax, ``tax_refunded`` its tax:
  what left the gateway's clearing for a purchase grant (``GrantRefunded``: credit + tax; for a credit-unit
  package also the currency money and tax paid back: ``PurchaseMoneyRefunded``) and for a paid subscription
  invoice (``InvoicePaymentRefunded``, documented by a credit note).
* ``credit_notes``: account credit given by subscription credit notes (a downgrade's or immediate cancel's
  unused time, a correction of invoiced usage: a grant with source ``credit_note``), tax inside,
  ``credit_note_tax`` that tax. No money leaves, so they are not ``refunds``. A later gateway refund of the
  same invoice beyond what it had left to give takes unspent credit of its notes back
  (``InvoicePaymentRefunded.reclaimed``): ``refunds`` counts the money paid, ``credit_notes`` stays what the
  notes credited, and what that credit no longer covered (spent) is owed: ``receivables``
  (``reclaimed.receivable``), settled when the renewal invoice billing it is paid or credit bought repays it.
* ``adjustments``: net manual corrections, what the ledger posted to ``manual_adjustment`` (credit given
  positive): a manual adjustment's signed amount, and the part of a finance-override refund taken back from
  ``manual_adjustment`` (``GrantRefunded.from_adjustment``: credit a negative adjustment removed, now paid back
  as money, so that removal no longer stands; the refund's money is in ``refunds`` as well), and likewise the
  ``usage_reversal`` credit a negative adjustment removed that a gateway refund takes back
  (``GrantRefunded.reclaimed.from_adjustment``, not owed again).

* ``chargebacks`` (since session 13): money a lost dispute took back through the gateway, tax included, and
  ``chargeback_tax`` its tax: the chargeback's refund events (``GrantRefunded`` / ``PurchaseMoneyRefunded`` whose
  cause names the dispute; not counted in ``refunds``: the customer's bank took it, nobody paid it back) and an
  invoice's payment taken back (``DisputeClosed.owed``, owed again: also in ``receivables``; its tax stays booked).
  ``disputed``: the funds gateways withdrew for open disputes (``DisputeFundsWithdrawn``), less what they reinstated
  or what a close returned to clearing (``DisputeFundsReinstated``, ``DisputeClosed.returned``): summed over all days,
  the money still held for disputes.
* ``dispute_fees`` (since session 14): what gateways charged the operator for disputes (``DisputeFeeBooked.amount``,
  the change of a dispute's fee: negative when a gateway gave some back), the operator's expense, never the tenant's.

Figures for all tenants, or per month, are sums of these rows at query time, so every row belongs to one
tenant (one Kafka partition) and concurrent projection instances never contend for it.
"""

from __future__ import annotations

from typing import Any

from billing_projections.facts import Fact, chargeback_of, day_of
from billing_projections.writer import INT_SUM, BatchWriter, Handler, Table, value
from billing_runtime.db import Database

FIGURES = ("top_ups", "tax_collected", "funds_in", "settlements", "promotional", "plan_grants", "consumed",
           "receivables", "breakage", "refunds", "tax_refunded", "credit_notes", "credit_note_tax",
           "adjustments", "chargebacks", "chargeback_tax", "disputed", "dispute_fees")
FIGURES_DAILY = Table("figures_daily", {"tenant": "TEXT", "day": "TEXT", "unit": "TEXT"}, {
    **{name: INT_SUM for name in FIGURES}, "last_position": value("BIGINT"),
}, indexes=("day, tenant",))
TABLES = (FIGURES_DAILY,)


def _figures(fact: Fact) -> dict[str, int]:
    d, name = fact.data, fact.name
    if name == "CreditGranted":
        amount, tax, source = int(d["amount"]), int(d.get("tax_amount") or 0), d.get("source")
        if source == "purchase":
            return {"top_ups": amount, "tax_collected": tax, "funds_in": amount + tax}
        if source == "refund_reversal":
            return {"funds_in": amount}
        if source == "plan_recurrence":
            return {"plan_grants": amount}
        if source == "credit_note":  # subscription credit note: account credit (tax inside), no money out
            cause = d.get("cause") if isinstance(d.get("cause"), dict) else {}
            return {"credit_notes": amount, "credit_note_tax": int(cause.get("tax") or 0)}
        return {"promotional": amount}
    if name in ("UsageDebited", "HoldCaptured"):
        return {"consumed": int(d["amount"]), "receivables": int(d.get("overage") or 0)}
    if name == "GrantExpired":
        return {"breakage": int(d.get("remainder") or 0)}
    if name in ("GrantVoided", "GrantKeptForLateUsage"):  # the part that lapsed (above a rollover cap before session
        # 14, a fee given back in full) of a void, or of what a plan credit kept for late usage moved out
        return {"breakage": int(d.get("lapsed") or 0)}
    if name == "GrantRefunded":
        tax = int(d.get("tax_amount") or 0)
        # from_adjustment: absent before session 11 (such a refund took that credit from revenue then).
        # reclaimed (since session 11): a gateway refund of usage a give-back had returned as usage_reversal credit
        # takes that credit back, and what of it was spent is owed (``reclaimed.receivable``); what a negative
        # adjustment had removed of it comes back from manual_adjustment (``reclaimed.from_adjustment``, session 12).
        reclaimed = d.get("reclaimed") if isinstance(d.get("reclaimed"), dict) else {}
        paid_back = ({"chargebacks": int(d["amount"]) + tax, "chargeback_tax": tax} if chargeback_of(d)
                     else {"refunds": int(d["amount"]) + tax, "tax_refunded": tax})
        return {**paid_back,
                "adjustments": int(d.get("from_adjustment") or 0) + int(reclaimed.get("from_adjustment") or 0),
                "receivables": int(reclaimed.get("receivable") or 0)}
    if name == "PurchaseMoneyBooked":
        return {"tax_collected": int(d.get("tax_amount") or 0), "funds_in": int(d["amount"])}
    if name == "PurchaseMoneyRefunded":
        tax = int(d.get("tax_amount") or 0)
        if chargeback_of(d):
            return {"chargebacks": int(d["amount"]), "chargeback_tax": tax}
        return {"refunds": int(d["amount"]), "tax_refunded": tax}
    if name == "DisputeFundsWithdrawn":
        return {"disputed": int(d["amount"])}
    if name == "DisputeFundsReinstated":
        return {"disputed": -int(d["amount"])}
    if name == "DisputeClosed":  # what the gateway still held goes back to clearing; an invoice's payment is owed
        owed = int(d["owed"].get("receivable") or 0) if isinstance(d.get("owed"), dict) else 0
        return {"disputed": -int(d.get("returned") or 0), "chargebacks": owed, "receivables": owed}
    if name == "DisputeFeeBooked":  # the gateway's fee for a dispute: charged, or given back (negative)
        return {"dispute_fees": int(d.get("amount") or 0)}
    if name == "PurchaseMoneyRecognised":
        return {"consumed": int(d.get("recognised") or 0), "breakage": int(d.get("breakage") or 0)}
    if name == "BalanceAdjusted":
        return {"adjustments": int(d["amount"])}
    if name == "ReceivableSettled":
        return {"settlements": int(d["amount"]), "funds_in": int(d["amount"])}
    if name == "InvoiceBilled":  # a subscription invoice's fees and tax, owed until it is paid
        return {"receivables": int(d["amount"])}
    if name == "InvoiceBillVoided":
        return {"receivables": -int(d["amount"])}
    if name == "InvoicePaid":
        return {"settlements": int(d["amount"]), "funds_in": int(d["amount"]),
                "tax_collected": int(d.get("tax_amount") or 0)}
    if name == "InvoicePaymentRefunded":  # money of a paid invoice given back through the gateway
        tax = int(d.get("tax_amount") or 0)
        # Given back beyond what the invoice had left, and no longer in its notes' unspent credit: owed again.
        reclaimed = d.get("reclaimed") if isinstance(d.get("reclaimed"), dict) else {}
        return {"refunds": int(d["amount"]), "tax_refunded": tax,
                "receivables": int(reclaimed.get("receivable") or 0)}
    if name == "OverageRepaid":  # paid with credit bought (its money counted in when it was bought)
        return {"settlements": int(d["amount"])}
    if name == "InvoicedOverageRounded":  # what an invoice's rounded usage lines bill beyond (or below) the overage
        return {"receivables": int(d["amount"])}
    if name == "InvoicedOverageRoundingReversed":  # that invoice voided: owed again exactly as used
        return {"receivables": -int(d["amount"])}
    if name == "InvoiceChargeRounded":  # what a gateway could not charge of an old invoice's total: written off
        return {"receivables": -int(d["amount"])}
    if name == "PeriodMinimumsCharged":  # overage a period's minimum commitment already billed: not owed twice
        periods = d.get("periods") if isinstance(d.get("periods"), dict) else {}
        return {"receivables": -sum(int(p.get("netted") or 0) for p in periods.values() if isinstance(p, dict))}
    return {}


_FIGURE_EVENTS = frozenset({"CreditGranted", "UsageDebited", "HoldCaptured", "GrantExpired", "GrantVoided",
                            "GrantKeptForLateUsage",
                            "GrantRefunded", "BalanceAdjusted", "ReceivableSettled", "OverageRepaid", "PurchaseMoneyBooked",
                            "PurchaseMoneyRefunded", "PurchaseMoneyRecognised", "InvoiceBilled",
                            "InvoiceBillVoided", "InvoicePaid", "InvoicePaymentRefunded", "PeriodMinimumsCharged",
                            "InvoicedOverageRounded", "InvoicedOverageRoundingReversed", "InvoiceChargeRounded",
                            "DisputeFundsWithdrawn",
                            "DisputeFundsReinstated", "DisputeClosed", "DisputeFeeBooked"})


def handler_for(event_type: str) -> Handler | None:
    aggregate, _, name = event_type.partition(".")
    return project if aggregate == "BillingAccount" and name in _FIGURE_EVENTS else None


def project(fact: Fact, w: BatchWriter) -> None:
    # A usage debit takes debits.project, which writes what this does in one pass with the other read models:
    # a change here goes there too (tests/unit/projections/test_debits.py compares the two).
    if fact.aggregate != "BillingAccount" or not fact.tenant:
        return
    figures = {k: v for k, v in _figures(fact).items() if v}
    if figures:
        w.upsert(FIGURES_DAILY, (fact.tenant, day_of(fact.occurred_at), str(fact.data["unit"])), add=figures,
                 set={"last_position": fact.position})


async def series(db: Database, *, tenant: str | None, granularity: str, since: str | None, until: str | None,
                 unit: str | None = None) -> list[dict[str, Any]]:
    """Figures per day (``YYYY-MM-DD``) or month (``YYYY-MM``) and unit; ``since`` inclusive, ``until`` exclusive."""
    width = 10 if granularity == "day" else 7
    where: list[str] = []
    args: list[Any] = []
    for sql, arg in (("tenant = ?", tenant), ("day >= ?", since), ("day < ?", until), ("unit = ?", unit)):
        if arg is not None:
            args.append(arg)
            where.append(sql.replace("?", f"${len(args)}"))
    sums = ", ".join(f"SUM({name}) AS {name}" for name in FIGURES)
    rows = await db.fetch(
        f"SELECT SUBSTR(day, 1, {width}) AS bucket, unit, {sums} FROM figures_daily "
        f"{'WHERE ' + ' AND '.join(where) if where else ''} GROUP BY SUBSTR(day, 1, {width}), unit "
        "ORDER BY bucket, unit", *args)
    return [{"bucket": r["bucket"], "unit": r["unit"], **{n: int(r[n] or 0) for n in FIGURES}} for r in rows]

"""Read-model rows -> what the API and the dashboard show: exact decimal strings, ISO 8601 times.

The JSON API and the HTML dashboard both render these views, so a number on the page is the number the
API returns; the dashboard's figure cards (``figure_cards``) show it at the unit's scale, rounded once for display,
with the exact figure beside it.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any
from urllib.parse import quote

from billing_events.money import (
    RATING_CONTEXT,
    MoneyError,
    Unit,
    UnitKind,
    format_subunits,
    resolve_unit,
    to_subunits,
)
from billing_projections import balances, catalog, revenue
from billing_projections.facts import utc_text
from billing_projections.figures import FIGURES
from billing_runtime.db import Database


class Units:
    """Formats sub-units in a unit's own scale (ISO 4217 minor units, or the catalogue's credit scale)."""

    def __init__(self, credit_scales: dict[str, int]) -> None:
        self._scales = credit_scales
        self._units: dict[str, Unit] = {}

    def unit(self, code: str) -> Unit:
        found = self._units.get(code)
        if found is None:
            try:
                found = resolve_unit(code, self._scales)
            except MoneyError:
                found = Unit(code=code, kind=UnitKind.CREDIT, minor_scale=catalog.CREDIT_SCALE_DEFAULT)
            self._units[code] = found
        return found

    def fmt(self, subunits: int | Decimal | None, code: str) -> str:
        return format_subunits(int(subunits or 0), self.unit(code))


async def load_units(db: Database) -> Units:
    return Units(await catalog.credit_scales(db))


def decimal_text(value: Decimal | str | int) -> str:
    number = Decimal(value)
    return "0" if number == 0 else format(number.normalize(), "f")


_ENDS_AT = "COALESCE(g.drawable_until, g.expires_at)"  # balances.ENDS_AT_SQL of the grants aliased g
_BALANCE_SQL = (
    "SELECT a.currency, a.last_position AS account_position, w.unit, w.balance, w.held, w.receivable, "
    "w.low_balance_threshold, w.low_balance_reached_at, w.low_balance_alerts, w.updated_at, w.last_position, "
    "(SELECT c.scale FROM catalog_units c WHERE c.code = w.unit) AS credit_scale, "
    "(SELECT SUM(g.remaining) FROM grants g WHERE g.tenant = a.tenant AND g.unit = w.unit AND g.status = 'open' "
    f"AND {_ENDS_AT} > $2 AND {_ENDS_AT} <= $3 AND g.remaining > 0) AS expiring, "
    "(SELECT SUM(g.remaining) FROM grants g WHERE g.tenant = a.tenant AND g.unit = w.unit AND g.status = 'open' "
    "AND g.set_aside_at IS NOT NULL) AS late_usage_reserve "  # balances.RESERVE_SQL of the grants aliased g
    "FROM accounts a LEFT JOIN wallets w ON w.tenant = a.tenant WHERE a.tenant = $1 ORDER BY w.unit")


async def balance_view(db: Database, tenant: str, now: datetime) -> dict[str, Any] | None:
    """The balance of every wallet of a tenant: ONE indexed query (account, wallets, units' scales, expiring, the
    late usage reserve)."""
    start, end = balances.expiring_window(now)
    rows = await db.fetch(_BALANCE_SQL, tenant, start, end)
    return balance_from_rows(tenant, rows) if rows else None


def balance_from_rows(tenant: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``balance_view``'s answer from its query's rows (also built by the API's copy, balance_cache.py)."""
    units = Units({r["unit"]: int(r["credit_scale"]) for r in rows if r["credit_scale"] is not None})
    wallets = []
    position, updated_at = int(rows[0]["account_position"]), ""
    for w in rows:
        if w["unit"] is None:
            continue  # an account without a wallet row (LEFT JOIN)
        wallets.append(wallet_view(w, units, int(w["expiring"] or 0), int(w["late_usage_reserve"] or 0)))
        position = max(position, int(w["last_position"] or 0))
        updated_at = max(updated_at, w["updated_at"] or "")
    return {"tenant": tenant, "currency": rows[0]["currency"], "wallets": wallets, "position": position,
            "updated_at": updated_at or None}


def wallet_view(w: dict[str, Any], units: Units, expiring_soon: int, late_usage_reserve: int) -> dict[str, Any]:
    """One wallet: ``available`` (what new usage and holds can spend) = ``balance`` - ``held`` - ``late_usage_reserve``
    (credit of ended periods set aside for their late usage, ``balances.RESERVE_SQL``), as the ledger decides."""
    code = w["unit"]
    balance, held = int(w["balance"]), int(w["held"])
    available = balance - held - late_usage_reserve
    threshold = w["low_balance_threshold"]
    return {
        "unit": code,
        "available": units.fmt(available, code),
        "held": units.fmt(held, code),
        "late_usage_reserve": units.fmt(late_usage_reserve, code),
        "balance": units.fmt(balance, code),
        "receivable": units.fmt(w["receivable"], code),
        "expiring_soon": units.fmt(expiring_soon, code),
        "low_balance_threshold": units.fmt(threshold, code) if threshold is not None else None,
        "low_balance": threshold is not None and available < int(threshold),
        "low_balance_reached_at": w["low_balance_reached_at"],
        "updated_at": w["updated_at"],
    }


def grant_view(row: dict[str, Any], units: Units, now: datetime) -> dict[str, Any]:
    code = row["unit"]
    expires = row["expires_at"]
    return {
        "grant_id": row["grant_id"], "unit": code, "source": row["source"], "status": row["status"],
        # What the grant gave its own period: as granted, less the carry late usage of the period before drew of it.
        "amount": units.fmt(row["amount"] - int(row.get("carry_drawn") or 0), code),
        "carry_drawn": units.fmt(int(row.get("carry_drawn") or 0), code),
        "remaining": units.fmt(row["remaining"], code),
        "tax": units.fmt(row["tax_amount"], code), "refunded": units.fmt(row["refunded"], code),
        "breakage": units.fmt(row["breakage"], code), "priority": int(row["priority"]),
        "effective_at": row["effective_at"], "expires_at": expires, "drawable_until": row.get("drawable_until"),
        "expiring_soon": bool(balances.expiring_soon([row], now)), "set_aside_at": row.get("set_aside_at"),
        "scope": json.loads(row["scope"]) if row["scope"] else None, "granted_by": row["granted_by"],
        "cause": json.loads(row["cause"]) if row["cause"] else {},
    }


def transaction_view(row: dict[str, Any], units: Units) -> dict[str, Any]:
    code = row["unit"]
    return {
        "position": int(row["position"]), "tenant": row["tenant"], "occurred_at": row["occurred_at"],
        "recorded_at": row["recorded_at"], "type": row["type"], "unit": code,
        "amount": units.fmt(row["amount"], code), "wallet_delta": units.fmt(row["wallet_delta"], code),
        "held_delta": units.fmt(row["held_delta"], code), "meter": row["meter"], "quantity": row["quantity"],
        "user": row["user_id"], "grant_id": row["grant_id"], "hold_id": row["hold_id"],
        "event_ids": json.loads(row["event_ids"]) if row["event_ids"] else [],
        "payment_id": row["payment_id"], "reference": row["reference"], "detail": _detail_text(row["detail"], units, code),
        "cause": json.loads(row["cause"]) if row["cause"] else {},
    }


_NET_AND_TAX = re.compile(r"^net (-?\d+), tax (-?\d+)$")
# After a note and ``; ``: a give-back's absorbed part, a gateway refund's usage_reversal credit taken back and owed.
_AMOUNT_NOTE = re.compile(
    r"^(absorbed|usage_reversal credit taken back|owed|funds withdrawn|funds reinstated|reinstated) (-?\d+)$")


def _detail_text(detail: str | None, units: Units, code: str) -> str | None:
    """A money row's split as stored (``net N, tax N`` in sub-units, after a note and ``; `` on a refund,
    history.py), a give-back's absorbed part (``give-back; absorbed N``), or what a gateway refund took back of
    ``usage_reversal`` credit (``...; usage_reversal credit taken back N; owed N``), in the unit's own scale."""
    if not detail:
        return detail
    parts = detail.split("; ")
    for index, part in enumerate(parts):
        found = _NET_AND_TAX.match(part)
        if found is not None:
            parts[index] = f"net {units.fmt(int(found[1]), code)}, tax {units.fmt(int(found[2]), code)}"
            continue
        noted = _AMOUNT_NOTE.match(part) if index or part.startswith("funds ") else None
        if noted is not None:
            parts[index] = f"{noted[1]} {units.fmt(int(noted[2]), code)}"
    return "; ".join(parts)


def monthly_view(row: dict[str, Any], units: Units, meters: dict[str, dict[str, Any]]) -> dict[str, Any]:
    meter = meters.get(row["meter"]) or {}
    year, month = row["period"].split("-")
    return {
        "tenant": row["tenant"], "year": int(year), "month": int(month), "meter": row["meter"],
        "usage_type": row["usage_type"], "meter_name": meter.get("name"), "unit_of_measure": meter.get("unit_of_measure"),
        "quantity": decimal_text(row["quantity"]), "unit": row["unit"], "cost": units.fmt(row["cost"], row["unit"]),
        "events": int(row["events"]),
    }


def ai_view(row: dict[str, Any], units: Units) -> dict[str, Any]:
    view: dict[str, Any] = {("user" if k == "user_id" else k): row[k] for k in ("model", "operation", "user_id")
                            if k in row}
    view.update({
        "input_tokens": decimal_text(row["input_tokens"]), "output_tokens": decimal_text(row["output_tokens"]),
        "cached_tokens": decimal_text(row["cached_tokens"]), "tokens": decimal_text(row["tokens"]),
        "unit": row["unit"], "cost": units.fmt(row["cost"], row["unit"]), "events": int(row["events"]),
    })
    return view


def figures_view(row: dict[str, Any], units: Units) -> dict[str, Any]:
    return {"period": row["bucket"], "unit": row["unit"], **{n: units.fmt(row[n], row["unit"]) for n in FIGURES}}


# The dashboard's cards of a month's figures (figures.py), per kind of unit. A currency's row is money: what came
# in, was consumed (revenue), collected, paid back. A credit type's row is credit, never money: its ``funds_in``
# is only the clearing posting in that unit (the money is in the currency, ``PurchaseMoneyBooked``), so it is
# not shown; what was bought, granted, consumed and lapsed is, labelled as credits.
MONEY_CARDS = (("funds_in", "Funds taken in"), ("top_ups", "Top-ups"), ("consumed", "Credit consumed"),
               ("tax_collected", "Tax collected"), ("refunds", "Refunds (money paid back)"),
               ("credit_notes", "Credit notes (account credit)"), ("breakage", "Breakage"),
               ("chargebacks", "Chargebacks (lost card disputes)"), ("dispute_fees", "Dispute fees (gateways)"))
CREDIT_CARDS = (("top_ups", "Credits bought"), ("plan_grants", "Credits granted by plans"),
                ("promotional", "Credits given (promotions, manual)"), ("consumed", "Credits consumed"),
                ("breakage", "Credits lapsed"))


def figure_cards(figures: list[dict[str, Any]], units: Units) -> list[dict[str, Any]]:
    """``figures_view`` rows as the dashboard's cards: each figure ``shown`` at its unit's scale (a currency's ISO
    4217 minor digits, a credit type's catalogue scale), rounded half-up once for display, with the API's
    ``exact`` figure beside it (the card's tooltip and ``data-exact``): 8.186886363 USD consumed shows 8.19."""
    cards = []
    for f in figures:
        unit = units.unit(f["unit"])
        step = Decimal(1).scaleb(-unit.minor_scale)
        chosen = MONEY_CARDS if unit.kind is UnitKind.CURRENCY else CREDIT_CARDS
        cards.append({"unit": f["unit"], "kind": unit.kind.value, "cards": [
            {"key": key, "label": label, "exact": f[key],
             "shown": str(Decimal(f[key]).quantize(step, rounding=ROUND_HALF_UP, context=RATING_CONTEXT))}
            for key, label in chosen]})
    return cards


def now_text(now: datetime) -> str:
    return utc_text(now)


def invoice_pdf_url(ledger_url: str, tenant: str, invoice_id: str) -> str:
    """The ledger's ``GET /v1/accounts/{tenant}/invoices/{id}.pdf`` (a fresh rendering each time)."""
    return f"{ledger_url}/v1/accounts/{quote(tenant, safe='')}/invoices/{invoice_id}.pdf"


def invoice_view(row: dict[str, Any], units: Units, ledger_url: str) -> dict[str, Any]:
    code = row["currency"]
    issued, due = row["issued_at"], row["due_at"]
    return {
        "invoice_id": row["invoice_id"], "tenant": row["tenant"], "number": row["number"],
        "document_type": row["document_type"], "status": row["status"], "currency": code,
        "issue_date": issued[:10] if issued else None, "due_date": due[:10] if due else None,
        "issued_at": issued, "due_at": due, "drafted_at": row["drafted_at"], "paid_at": row["paid_at"],
        "voided_at": row["voided_at"], "period": row["period"], "period_start": row["period_start"],
        "period_end": row["period_end"], "subscription_id": row["subscription_id"],
        "related_invoice": row["related_invoice"], "payment_reference": row["payment_reference"],
        "void_reason": row["void_reason"], "subtotal": units.fmt(row["subtotal"], code),
        "tax": units.fmt(row["tax"], code), "total": units.fmt(row["total"], code), "lines": int(row["line_count"]),
        "pdf_url": invoice_pdf_url(ledger_url, row["tenant"], row["invoice_id"]),
        "position": int(row["last_position"] or row["drafted_position"]),
    }


def invoice_line_view(row: dict[str, Any], units: Units, code: str) -> dict[str, Any]:
    return {
        "kind": row["kind"], "description": row["description"], "quantity": row["quantity"],
        "unit_amount": row["unit_amount"], "amount": units.fmt(row["amount"], code),
        "exact_amount": row["exact_amount"], "meter": row["meter"],
        "detail": json.loads(row["detail"]) if row["detail"] else {},
    }


def subscription_view(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "subscription_id": row["subscription_id"], "tenant": row["tenant"], "key": row["subscription_key"],
        "status": row["status"], "plan": row["plan_code"], "plan_name": row["plan_name"],
        "plan_version": row["plan_version"], "cadence": row["cadence"], "currency": row["currency"],
        "base_fee": decimal_text(row["base_fee"]), "quantity": int(row["quantity"]), "time_zone": row["time_zone"],
        "started_at": row["started_at"], "period_start": row["period_start"], "period_end": row["period_end"],
        "trial_end": row["trial_end"], "cancel_at_period_end": bool(row["cancel_at_period_end"]),
        "cancel_at": row["cancel_at"], "canceled_at": row["canceled_at"], "cancel_reason": row["cancel_reason"],
        "paused_at": row["paused_at"], "updated_at": row["updated_at"],
    }


CADENCE_FEES = {"month": "monthly_fees", "quarter": "quarterly_fees", "year": "yearly_fees"}


def mrr_view(row: dict[str, Any], units: Units) -> dict[str, Any]:
    """Amounts shown exact, with at least the currency's minor digits (``mrr`` is rounded once, half-up)."""
    code = row["currency"]
    view: dict[str, Any] = {"tenant": row["tenant"]} if row.get("tenant") else {}
    view.update({
        "currency": code, "mrr": units.fmt(to_subunits(row["mrr"]), code),
        "arr": units.fmt(to_subunits(row["arr"]), code), "subscriptions": int(row["subscriptions"]),
        **{CADENCE_FEES[cadence]: units.fmt(to_subunits(amount), code)
           for cadence, amount in row["per_cadence"].items()},
    })
    return view


ANALYTICS_AMOUNTS = ("mrr_start", "mrr_new", "mrr_expansion", "mrr_contraction", "mrr_churned", "mrr_end")
ANALYTICS_RATIOS = ("logo_churn_rate", "revenue_churn_rate", "net_revenue_retention")


def analytics_view(row: dict[str, Any], units: Units) -> dict[str, Any]:
    """A month of ``subscription_analytics``: amounts as MRR's (rounded once, at least the minor digits), ratios as
    their decimal text (``RATIO_PLACES`` digits), null when nothing was live at the month's start."""
    code = row["currency"]
    view = dict(row)
    for name in ANALYTICS_AMOUNTS:
        view[name] = units.fmt(to_subunits(row[name]), code)
    for name in ANALYTICS_RATIOS:
        view[name] = None if row[name] is None else str(row[name])
    return view


def revenue_view(row: dict[str, Any], units: Units, period: str) -> dict[str, Any]:
    """A line of the revenue report (``revenue.period_rows``, or their sum per unit): amounts exact in the unit's
    scale; ``kind`` says whether they are money (a currency) or credit (a catalogue credit type)."""
    code = row["unit"]
    view: dict[str, Any] = {"tenant": row["tenant"]} if row.get("tenant") else {}
    view.update({"period": period, "unit": code, "kind": units.unit(code).kind.value,
                 **{name: units.fmt(row[name], code) for name in revenue.REPORT_AMOUNTS}})
    return view


# The finance page's revenue table, a figure a row (the roll-forward of deferred revenue, then the month's revenue):
# (key, label, sign in the roll-forward: "+" in, "−" out, "" a balance or a revenue figure).
REVENUE_ROWS = (
    ("opening_deferred", "Deferred revenue at the start", ""), ("credit_sold", "Credit sold (net of tax)", "+"),
    ("plan_grants", "Plan credit granted", "+"), ("promotional", "Promotional credit given", "+"),
    ("fees_billed", "Subscription fees billed", "+"), ("credit_notes", "Credit notes (account credit)", "+"),
    ("adjustments", "Manual adjustments", "+"), ("other", "Other movements", "+"),
    ("recognised_usage", "Recognised from usage", "−"), ("recognised_fees", "Recognised subscription fees", "−"),
    ("breakage", "Breakage (credit lapsed)", "−"), ("refunds", "Refunds", "−"), ("chargebacks", "Chargebacks", "−"),
    ("overage_repaid", "Credit applied to overage owed", "−"), ("closing_deferred", "Deferred revenue at the end", ""),
    ("recognised_revenue", "Recognised revenue of the period", ""), ("revenue_usage", "… from usage", ""),
    ("revenue_fees", "… from subscription fees", ""), ("revenue_refunded", "… paid back (refunds, chargebacks)", ""),
    ("revenue_other", "… other postings", ""),
    ("breakage_revenue", "Breakage revenue", ""), ("promotional_expense", "Promotional expense", ""),
)

"""Read-model rows -> what the API and the dashboard show: exact decimal strings, ISO 8601 times.

The JSON API and the HTML dashboard both render these views, so a number on the page is the number the
API returns.
"""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from typing import Any

from billing_events.money import MoneyError, Unit, UnitKind, format_subunits, resolve_unit
from billing_projections import balances, catalog
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


async def balance_view(db: Database, tenant: str, now: datetime) -> dict[str, Any] | None:
    account = await balances.account(db, tenant)
    if account is None:
        return None
    units = await load_units(db)
    soon = {unit: amount for (_, unit), amount in (await balances.expiring(db, now, tenant)).items()}
    wallets = []
    position, updated_at = int(account["last_position"]), ""
    for w in await balances.wallets(db, tenant):
        wallets.append(wallet_view(w, units, soon.get(w["unit"], 0)))
        position = max(position, int(w["last_position"] or 0))
        updated_at = max(updated_at, w["updated_at"] or "")
    return {"tenant": tenant, "currency": account["currency"], "wallets": wallets, "position": position,
            "updated_at": updated_at or None}


def wallet_view(w: dict[str, Any], units: Units, expiring_soon: int) -> dict[str, Any]:
    code = w["unit"]
    balance, held = int(w["balance"]), int(w["held"])
    available = balance - held
    threshold = w["low_balance_threshold"]
    return {
        "unit": code,
        "available": units.fmt(available, code),
        "held": units.fmt(held, code),
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
        "amount": units.fmt(row["amount"], code), "remaining": units.fmt(row["remaining"], code),
        "tax": units.fmt(row["tax_amount"], code), "refunded": units.fmt(row["refunded"], code),
        "breakage": units.fmt(row["breakage"], code), "priority": int(row["priority"]),
        "effective_at": row["effective_at"], "expires_at": expires,
        "expiring_soon": bool(balances.expiring_soon([row], now)),
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
        "payment_id": row["payment_id"], "reference": row["reference"], "detail": row["detail"],
        "cause": json.loads(row["cause"]) if row["cause"] else {},
    }


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


def now_text(now: datetime) -> str:
    return utc_text(now)

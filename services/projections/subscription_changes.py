"""Read model: every change of a subscription's recurring revenue, when it took effect (what churn is computed from).

``subscriptions`` keeps each subscription's state now; MRR reads it. Churn and net revenue retention need the state
at every month's start and end, so this table keeps one row per event that can move a subscription's MRR: its
status (``Started``, ``TrialConverted``, ``Activated``, ``Paused``, ``Resumed``, ``PastDue``, ``Recovered``,
``Canceled``) or its price (``Started``, ``Changed``: plan and/or quantity). A row holds what the event says and no
more, so it is a pure function of the event: ``status`` (None: unchanged) and ``arr`` (None: unchanged), the
subscription's annual run rate at its plan's base fee x quantity x periods per year, exact (``subscriptions.annual_fee``,
the same sum ``/v1/reports/mrr`` makes). Later events carry the subscription's id alone: its tenant and currency are
its ``subscriptions`` row's (a plan change cannot change the currency).

``effective_at`` is the event's own time: ``started_at`` for ``Started``, ``at`` for the others (a cancel at period
end: the period's end, however late the tick recorded it), else when it was recorded. ``subscription_analytics``
folds a subscription's rows in the order the ledger recorded them (``position``).

One table, append-only (one row per event, never updated): ``subscription_changes``.
"""

from __future__ import annotations

from typing import Any

from billing_projections.facts import Fact, utc_text
from billing_projections.subscriptions import annual_fee, plan_columns
from billing_projections.writer import BatchWriter, Handler, Table, value
from billing_runtime.db import Database

SUBSCRIPTION_CHANGES = Table("subscription_changes", {"subscription_id": "TEXT", "position": "BIGINT"}, {
    "effective_at": value("TEXT NOT NULL"), "event": value("TEXT NOT NULL"), "status": value("TEXT"),
    "arr": value("TEXT"),
}, append_only=True)
TABLES = (SUBSCRIPTION_CHANGES,)

# The status each event leaves (``Started``: the one it names; ``Changed``: unchanged).
_STATUS_AFTER = {"TrialConverted": "active", "Activated": "active", "Resumed": "active", "Recovered": "active",
                 "Paused": "paused", "PastDue": "past_due", "Canceled": "canceled"}


def handler_for(event_type: str) -> Handler | None:
    aggregate, _, name = event_type.partition(".")
    if aggregate != "Subscription":
        return None
    return _HANDLERS.get(name)


def _time(value: Any, fact: Fact) -> str:
    return utc_text(value) if isinstance(value, str) and value else fact.recorded_at


def _arr(data: dict[str, Any]) -> str:
    columns = plan_columns(data.get("plan"))
    return str(annual_fee(columns["base_fee"], int(data.get("quantity") or 0), columns["cadence"]))


def _started(fact: Fact, w: BatchWriter) -> None:
    data = fact.data
    tenant = data.get("tenant")
    if not isinstance(tenant, str) or not tenant:  # not in ``subscriptions`` either
        return
    w.append(SUBSCRIPTION_CHANGES, (fact.aggregate_id, fact.position, _time(data.get("started_at"), fact), "Started",
                                    str(data.get("status") or ""), _arr(data)))


def _changed(fact: Fact, w: BatchWriter) -> None:
    w.append(SUBSCRIPTION_CHANGES, (fact.aggregate_id, fact.position, _time(fact.data.get("at"), fact), "Changed",
                                    None, _arr(fact.data)))


def _status(name: str, status: str) -> Handler:
    def handle(fact: Fact, w: BatchWriter) -> None:
        w.append(SUBSCRIPTION_CHANGES, (fact.aggregate_id, fact.position, _time(fact.data.get("at"), fact), name,
                                        status, None))

    return handle


_HANDLERS: dict[str, Handler] = {"Started": _started, "Changed": _changed,
                                  **{name: _status(name, status) for name, status in _STATUS_AFTER.items()}}


def project(fact: Fact, w: BatchWriter) -> None:
    handler = handler_for(fact.type)
    if handler is not None:
        handler(fact, w)


# -- queries ---------------------------------------------------------------------------------------------

async def rows(db: Database, *, tenant: str | None) -> list[dict[str, Any]]:
    """Every change with its subscription's tenant and currency, by subscription then in recorded order."""
    where, args = ("WHERE s.tenant = $1", [tenant]) if tenant is not None else ("", [])
    return await db.fetch(
        "SELECT c.subscription_id, c.position, c.effective_at, c.status, c.arr, s.tenant, s.currency "
        "FROM subscription_changes c JOIN subscriptions s ON s.subscription_id = c.subscription_id "
        f"{where} ORDER BY c.subscription_id, c.position", *args)

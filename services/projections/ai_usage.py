"""Read model: AI usage per tenant, month, model, operation and user: tokens per class and cost.

An AI usage debit is one whose rated usage event carried a ``model`` (the rating ``cause`` keeps the
event's model, operation, user, properties, quantity and, for AI meters, the token counts per class it
priced: ``tokens = {"input": .., "output": .., "cached_input": ..}``). Without that map the counts come
from the event's properties (``input_tokens``, ``output_tokens``, ``cached_input_tokens``), or from a
``token_class`` property, and else the quantity is input tokens, as rating prices it. ``tokens`` is the
sum over classes. Cost is the debit's amount for the whole event. The month is the usage time's, in
``cause.time_zone`` when rating names one, as ``usage_monthly``'s.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from billing_projections.facts import Fact, decimal_or_none, first_text, month_of
from billing_projections.writer import DEC_SUM, INT_SUM, BatchWriter, Handler, Table, value
from billing_runtime.db import Database

AI_USAGE = Table("ai_usage", {"tenant": "TEXT", "period": "TEXT", "model": "TEXT", "operation": "TEXT",
                              "user_id": "TEXT", "unit": "TEXT"}, {
    "input_tokens": DEC_SUM, "output_tokens": DEC_SUM, "cached_tokens": DEC_SUM, "tokens": DEC_SUM,
    "cost": INT_SUM, "events": INT_SUM, "last_position": value("BIGINT"),
}, indexes=("period, tenant",))
TABLES = (AI_USAGE,)

TOKEN_CLASSES = ("input", "output", "cached")
# Property names upstream services use for per-class token counts.
_CLASS_PROPERTIES = {
    "input": ("input_tokens", "prompt_tokens"),
    "output": ("output_tokens", "completion_tokens"),
    "cached": ("cached_input_tokens", "cached_tokens"),
}
_CLASS_NAMES = {"input": "input", "prompt": "input", "output": "output", "completion": "output",
                "cached": "cached", "cached_input": "cached", "cache": "cached"}


def tokens_by_class(cause: dict[str, Any], properties: dict[str, Any], quantity: Decimal
                    ) -> tuple[dict[str, Decimal], Decimal]:
    """(tokens per known class, total tokens) of one usage event."""
    found: dict[str, Decimal] = {}
    priced = cause.get("tokens")
    if type(priced) is dict:
        for name, count in priced.items():
            token_class = _CLASS_NAMES.get(name) or _CLASS_NAMES.get(str(name).lower())
            number = decimal_or_none(count)
            if token_class and number is not None:
                found[token_class] = found[token_class] + number if token_class in found else number
        if found:
            return found, sum(found.values(), _ZERO)
    for token_class, names in _CLASS_PROPERTIES.items():
        for name in names:
            count = decimal_or_none(properties.get(name))
            if count is not None:
                found[token_class] = count
                break
    if found:
        return found, sum(found.values(), _ZERO)
    named = _CLASS_NAMES.get(str(properties.get("token_class") or properties.get("token_type") or "input").lower())
    return ({named: quantity} if named else {}), quantity


_ZERO = Decimal(0)


def handler_for(event_type: str) -> Handler | None:
    return project if event_type == "BillingAccount.UsageDebited" else None


_TOKEN_COLUMNS = {c: f"{c}_tokens" for c in TOKEN_CLASSES}


def project(fact: Fact, w: BatchWriter) -> None:
    # A usage debit takes debits.project, which writes what this does in one pass with the other read models:
    # a change here goes there too (tests/unit/projections/test_debits.py compares the two).
    if fact.aggregate != "BillingAccount" or fact.name != "UsageDebited" or not fact.tenant:
        return
    data = fact.data
    cause = data.get("cause")
    if not isinstance(cause, dict):
        return
    properties = cause.get("properties")
    if not isinstance(properties, dict):
        properties = {}
    model = first_text(properties.get("model"), cause.get("model"))
    if not model:
        return
    quantity = decimal_or_none(cause.get("quantity")) or Decimal(0)
    per_class, total = tokens_by_class(cause, properties, quantity)
    add: dict[str, Any] = {_TOKEN_COLUMNS[c]: count for c, count in per_class.items()}
    add["tokens"] = total
    add["cost"] = int(data["amount"])
    add["events"] = 1
    key = (fact.tenant, month_of(fact.occurred_at, cause.get("time_zone")), model,
           first_text(cause.get("operation"), properties.get("operation")),
           first_text(cause.get("user"), properties.get("user")), str(data["unit"]))
    w.upsert(AI_USAGE, key, add=add, set={"last_position": fact.position})


GROUPINGS = ("model", "operation", "user_id")


async def summary(db: Database, *, tenant: str | None, period: str | None, year_prefix: str | None,
                  group_by: tuple[str, ...], model: str | None = None, user: str | None = None
                  ) -> list[dict[str, Any]]:
    """Rows summed over everything not in ``group_by`` (a subset of model, operation, user_id), plus unit."""
    assert all(g in GROUPINGS for g in group_by)
    where: list[str] = []
    args: list[Any] = []
    for sql, arg in (("tenant = ?", tenant), ("period = ?", period), ("period LIKE ?",
                     year_prefix + "%" if year_prefix else None), ("model = ?", model), ("user_id = ?", user)):
        if arg is not None:
            args.append(arg)
            where.append(sql.replace("?", f"${len(args)}"))
    rows = await db.fetch(
        f"SELECT {', '.join(group_by + ('unit',))}, input_tokens, output_tokens, cached_tokens, tokens, cost, events "
        f"FROM ai_usage {'WHERE ' + ' AND '.join(where) if where else ''}", *args)
    # Token counts are exact decimal text: summed here, not by the database.
    totals: dict[tuple[str, ...], dict[str, Any]] = {}
    for row in rows:
        key = tuple(str(row[g]) for g in group_by + ("unit",))
        acc = totals.setdefault(key, {**{g: row[g] for g in group_by + ("unit",)}, "input_tokens": Decimal(0),
                                      "output_tokens": Decimal(0), "cached_tokens": Decimal(0),
                                      "tokens": Decimal(0), "cost": 0, "events": 0})
        for column in ("input_tokens", "output_tokens", "cached_tokens", "tokens"):
            acc[column] += Decimal(row[column])
        acc["cost"] += int(row["cost"])
        acc["events"] += int(row["events"])
    return [totals[k] for k in sorted(totals)]

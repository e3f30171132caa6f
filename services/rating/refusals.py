"""Usage debits the ledger refused: their quantity leaves rating's running totals, and what was mispriced since is
made right once.

Under a ``block`` overage policy the ledger refuses a usage debit the account's credit cannot cover
(``BillingAccount.UsageRejected``, reason ``insufficient_credit``): nothing is posted and the usage is not billed.
Rating had already counted the event in the period's running total (the meter's, its ``group_by`` group's, an AI
model's token classes), so the allowance, tiers and stairstep bands it used up stayed used: the next event of the
period was priced as if the refused one had been billed (10 refused documents, then 10 more priced 0 instead of the
first step's 500 CREDIT).

When rating reads the ledger's ``UsageRejected`` of a debit it sent for an event (:func:`apply_refusal`):

* the event's contribution (``cause.contribution``; a correction's difference, each group's part when it moved the
  event between groups; an AI event's token counts) leaves the period's running totals;
* its decision becomes ``refused`` (no close or invoice counts it; a correction of it is refused like a correction
  of any refused event), and a refused correction amends nothing (the next one amends the quantity before it);
* the ledger's charge of the meter's period is set right: every debit rated after the refused one was priced on a
  running total that counted it; priced without it (each at the price it was rated at: a plan change or a new tier
  mid-period prices the debits before and after it otherwise), the period's debits would hold ``should``, they hold
  ``held`` (the refused one posted nothing). Rating sends one *refusal adjustment* of ``should - held``
  (:func:`adjustment`; with one price for the whole period it is ``period_charge(T - q) - (period_charge(T) -
  refused)``, ``T`` the meter's total; 0 when the refusal is learned before any later event of the meter was priced:
  nothing is sent then). It is a ``usage.debit`` with overage policy ``overage`` (the usage it bills already
  happened and was accepted: never refused), ``cause.refusal_of`` naming the refused command, ``contribution`` 0 (it
  adds no quantity and no event to the monthly summary), and a command id from (account, refused event id), so a
  redelivered ``UsageRejected`` sends the same command again.

A refusal of a period rating has closed already (its close and usage lines counted the event: the ledger's ``block``
refusal and rating's close run on one partition in order, so this needs rating's ledger-events consumer to lag behind
the close) is made right the same way, its adjustment named as a late correction of that period (``cause.late``,
``cause.original_period``): an increase is overage of that period, which the next renewal invoice bills, a decrease
is credited to the invoice that billed it (a credit note), as the ledger does for late corrections. It used to be
logged and left alone.

A refusal and a repricing (``billing_rating.repricing``) reach rating in either order. The refused debit may be a
repricing's charge (found by its command id among the event's decisions): it leaves its period like any other and
stays in its event's chain, so no later repricing gives it back. A refusal that reaches rating after a repricing gave
the refused debit back (the give-back credited what the ledger never posted) neutralises that give-back too: both are
``refused``, the running totals stay (the give-back took the event out of them), and the adjustment counts the
give-back as posted and owed nothing (``Debit.posted``), so it takes that credit back.

The refusal (its reason, the adjustment's amount and command) is kept in ``refused_debits``; the decisions trace
shows it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from billing_events import ids, topics
from billing_events.messages import LedgerCommand, LedgerEvent
from billing_events.money import RATING_CONTEXT, to_subunits
from billing_events.timeutil import utcnow
from billing_rating import repricing
from billing_rating.aggregation import GROUP_SEPARATOR, contribution
from billing_rating.catalog_view import CatalogView
from billing_rating.charge_models import PriceSpecError, parse_spec
from billing_rating.pricing import ai_token_price, incremental_charge
from billing_rating.text import decimal_text, subunits_text
from billing_runtime.bus import OutMessage
from billing_runtime.db import Connection
from billing_runtime.logging import get_logger

log = get_logger(__name__)

REFUSED = "refused"
# The decisions whose debit carried a charge (a debit of 0 is never refused).
_CHARGED = ("priced", "late:priced", "late_adjustment:priced")

REFUSALS_SCHEMA = """
CREATE TABLE IF NOT EXISTS refused_debits (
    account_id TEXT NOT NULL, event_id TEXT NOT NULL, reason TEXT NOT NULL, command_id TEXT NOT NULL,
    adjustment_subunits BIGINT NOT NULL, output TEXT, refused_at TEXT NOT NULL, PRIMARY KEY (account_id, event_id));
"""


def adjustment_command_id(account: str, event_id: str) -> str:
    """The id of the refusal adjustment of ``event_id``'s refused debit: the same whenever it is sent again."""
    return str(ids.command_id("usage.refusal_adjustment", account, event_id))


async def apply_refusal(conn: Connection, dialect: str, catalog: CatalogView, event: LedgerEvent
                        ) -> list[OutMessage]:
    """Takes a refused usage debit's event out of rating's totals (module docstring); returns the adjustment to
    publish once the caller's transaction is committed (none when nothing was mispriced).

    The usage consumer writes the same totals from another task: on PostgreSQL the account's advisory lock
    (``repricing.lock_account``, taken shared by every usage batch before it reads totals) keeps the two apart, so neither overwrites the other's
    total with one computed from a stale read. SQLite runs one transaction at a time."""
    data = event.data
    cause = data.get("cause") or {}
    event_ids = cause.get("event_ids") or []
    if cause.get("closed") or cause.get("refusal_of") or len(event_ids) != 1:
        return []  # not a real-time debit of one event (a close's or an adjustment's are never refused)
    account = str(event.aggregate_id)
    await repricing.lock_account(conn, dialect, account)
    row = await _refused_decision(conn, account, str(event_ids[0]), str(data.get("command_id")))
    if row is None:
        return []
    event_id = row["event_id"]  # the decision's own key: a repricing's charge has its own, the event's is its chain's
    stored = await conn.fetchrow("SELECT output FROM refused_debits WHERE account_id = $1 AND event_id = $2",
                                 account, event_id)
    if stored is not None:  # a redelivered UsageRejected: the same adjustment again (same id)
        return [_message(account, stored["output"])] if stored["output"] else []
    if row["decision"] not in _CHARGED:
        return []
    sent = json.loads(row["output"])
    period = row["period"]
    # A repricing that ran before this refusal reached rating may have given the refused debit back already (out of
    # its period, at its price: money the ledger never posted) and charged the event again elsewhere.
    given_back = await _given_back_since(conn, account, row)
    # A closed period (its close and invoice counted the event): made right as a late correction of it.
    closed = await conn.fetchrow("SELECT 1 FROM closed_periods WHERE period = $1 AND account_id = $2", period,
                                 account) is not None
    sent_cause = sent["payload"]["cause"]
    refused = int(row["amount_subunits"])
    totals = {r["meter"]: Decimal(r["quantity"]) for r in await conn.fetch(
        "SELECT meter, quantity FROM period_totals WHERE account_id = $1 AND period = $2", account, period)}
    meter = row["meter"]
    # What the adjustment adds to the monthly usage summary: the quantity a give-back of the refused debit took out
    # of its month (it gave back usage the ledger never counted), else nothing.
    contributed = "0"
    try:
        if given_back is not None:
            # The give-back took the event out of the period's running totals already; it is neutralised with the
            # refused debit (``refused``: no close counts either), and the ledger's credit of it is taken back.
            moves = {}
            given_cause = json.loads(given_back["output"])["payload"]["cause"]
            contributed = decimal_text(-Decimal(given_cause.get("contribution") or "0"))
            adjustment = -int(given_back["amount_subunits"]) if "ai_prices" in sent_cause else \
                await _metered_adjustment(conn, catalog, account, meter, period, event_id, given_back["event_id"])
        elif "ai_prices" in sent_cause:
            moves, adjustment = _ai(meter, row["group_key"], sent_cause, totals, refused)
        else:
            moves = _metered(catalog, meter, row["group_key"], sent_cause, totals)
            adjustment = await _metered_adjustment(conn, catalog, account, meter, period, event_id)
    except (PriceSpecError, KeyError, ValueError) as exc:
        log.error("refusal_not_applied", account=account, event_id=event_id, error=str(exc)[:300])
        return []
    if given_back is not None:
        await conn.execute("UPDATE rated_events SET decision = $1 WHERE account_id = $2 AND event_id = $3",
                           REFUSED, account, given_back["event_id"])
    for key, quantity in moves.items():
        await conn.execute(
            "INSERT INTO period_totals (account_id, meter, period, quantity) VALUES ($1, $2, $3, $4) "
            "ON CONFLICT (account_id, meter, period) DO UPDATE SET quantity = excluded.quantity",
            account, key, period, str(quantity))
    if repricing.way_of(event_id):
        # A repricing's charge: it stays in its event's chain (``corrects``), so the event counts nowhere now and a
        # later repricing or correction of it finds it refused, never gives back what the ledger did not post.
        await conn.execute("UPDATE rated_events SET decision = $1 WHERE account_id = $2 AND event_id = $3",
                           REFUSED, account, event_id)
    else:
        # A refused correction amends nothing: the next one amends the quantity before it.
        await conn.execute("UPDATE rated_events SET decision = $1, corrects = NULL, effective_quantity = NULL "
                           "WHERE account_id = $2 AND event_id = $3", REFUSED, account, event_id)
    output = None
    if adjustment:
        output = _adjustment(account, row["tenant"], event_id, sent, adjustment, str(data.get("reason")),
                             closed_period=period if closed else None, contribution=contributed)
    await conn.execute(
        "INSERT INTO refused_debits (account_id, event_id, reason, command_id, adjustment_subunits, output, "
        "refused_at) VALUES ($1, $2, $3, $4, $5, $6, $7)", account, event_id, str(data.get("reason")),
        str(data.get("command_id")), adjustment, output, utcnow().isoformat())
    log.info("usage_refusal_applied", account=account, event_id=event_id, period=period, refused=refused,
             adjustment=adjustment, closed=closed)
    return [_message(account, output)] if output else []


_DECISION_COLUMNS = ("event_id, tenant, meter, period, group_key, decision, output_topic, output, amount_subunits, "
                     "corrects, rated_at")


def _sent_command_id(row: Any) -> str | None:
    if row["output_topic"] != topics.LEDGER_COMMANDS or not row["output"]:
        return None
    command_id: str | None = json.loads(row["output"]).get("command_id")
    return command_id


async def _refused_decision(conn: Connection, account: str, event_id: str, command_id: str) -> Any:
    """The decision whose debit the ledger refused (command ``command_id``, of usage event ``event_id``): the event's
    own (or a correction's: its id is the event's), else a repricing's charge of the event (``repricing.repriced_id``:
    its debit names the event too); None when rating sent no such command."""
    row = await conn.fetchrow(f"SELECT {_DECISION_COLUMNS} FROM rated_events WHERE account_id = $1 AND event_id = $2",
                              account, event_id)
    if row is not None and _sent_command_id(row) == command_id:
        return row
    for charge in await conn.fetch(f"SELECT {_DECISION_COLUMNS} FROM rated_events WHERE account_id = $1 AND "
                                   f"corrects = $2", account, event_id):
        if repricing.way_of(charge["event_id"]) == "in" and _sent_command_id(charge) == command_id:
            return charge
    return None


async def _given_back_since(conn: Connection, account: str, row: Any) -> Any:
    """The give-back of a repricing that took the refused decision ``row`` out of its period after it was rated (the
    next decision of its event, in the same period), or None.

    A correction's refusal is left as before (not covered: a repricing gives back the event's corrected quantity, not
    the correction's difference)."""
    if row["corrects"] and not repricing.way_of(row["event_id"]):
        return None
    chain = row["corrects"] or row["event_id"]
    rated_at = datetime.fromisoformat(row["rated_at"])
    later = sorted((r for r in await conn.fetch(
        f"SELECT {_DECISION_COLUMNS} FROM rated_events WHERE account_id = $1 AND corrects = $2", account, chain)
        if datetime.fromisoformat(r["rated_at"]) > rated_at), key=lambda r: datetime.fromisoformat(r["rated_at"]))
    if not later:
        return None
    following = later[0]
    if repricing.way_of(following["event_id"]) != "out" or following["period"] != row["period"] or \
            following["decision"] == REFUSED or _sent_command_id(following) is None:
        return None
    return following


def _metered(catalog: CatalogView, meter: str, group: str, cause: dict[str, Any], totals: dict[str, Decimal]
             ) -> dict[str, Decimal]:
    """The group totals after a sum/count meter's refused debit leaves them."""
    step = Decimal(cause["contribution"])
    key = f"{meter}{GROUP_SEPARATOR}{group}" if group else meter
    moves: dict[str, Decimal] = {}
    group_old = cause.get("group_old")
    if cause.get("corrects") and group_old is not None and group_old != group:
        # The correction moved the event between groups: the new quantity leaves this one, the old one goes back.
        definition = catalog.meters[meter].definition
        new = Decimal(cause["quantity_new"])
        gained = contribution(definition, new) if new else Decimal(0)
        old_key = f"{meter}{GROUP_SEPARATOR}{group_old}" if group_old else meter
        moves[key] = RATING_CONTEXT.subtract(totals.get(key, Decimal(0)), gained)
        moves[old_key] = RATING_CONTEXT.add(totals.get(old_key, Decimal(0)), gained - step)
    else:
        moves[key] = RATING_CONTEXT.subtract(totals.get(key, Decimal(0)), step)
    if any(quantity < 0 for quantity in moves.values()):
        raise ValueError(f"taking {step} out of meter {meter!r} leaves a running total below zero")
    return moves


@dataclass(frozen=True)
class Debit:
    """One real-time decision of a meter's period as the ledger holds it (:func:`adjustment`)."""

    event_id: str
    issued_at: datetime  # its command's: every decision of one rating batch (or one repricing) shares it
    before: Decimal  # the meter's running total it was priced from, and to
    after: Decimal
    amount: int  # sub-units it debited
    spec: Any  # the price it was rated at (its ``cause.price``), parsed
    included: Decimal  # the allowance it was rated with
    refused: bool  # the ledger refused it (``refused``, or the refusal being applied): nothing of it was posted
    # A repricing's give-back of a refused debit (``refused`` with it): the ledger posted it (it never refuses a
    # give-back), though it gave back what was never posted; it should be nothing.
    posted: bool = False
    rated_at: datetime | None = None  # its decision's (a repricing's give-backs come before its charges)
    repriced: bool = False  # a repricing's decision (``repricing.way_of``)

    def counted_in(self, other: Debit) -> bool:
        """Whether ``other`` was priced on a running total that counted this one: rated after it (a later batch; in
        the same batch, from the total this one took its meter to, or above; of one repricing, its give-backs first,
        each from the total the one before it left, then its charges)."""
        if other.issued_at != self.issued_at:
            return other.issued_at > self.issued_at
        if other.event_id == self.event_id:
            return False
        if self.repriced and other.repriced and self.rated_at is not None and other.rated_at is not None \
                and self.rated_at != other.rated_at:
            return other.rated_at > self.rated_at
        if self.after < self.before and other.after < other.before:
            return other.before <= self.after
        return other.before >= self.after


def adjustment(debits: list[Debit], adjusted: int) -> int:
    """What one meter's period still owes (or is owed) once its refused debits count nowhere: every debit posted,
    priced again at its own price on its running totals less the refused quantities they counted, less what the
    ledger holds for them (their amounts and the refusal adjustments sent before, ``adjusted``).

    Each debit keeps the price it was rated at, so a price that changed mid-period (a plan change, a new catalogue,
    the price a closed period was billed at for its late corrections) prices the debits on each side of the change by
    their own, where the former formula priced them all by the refused debit's price."""
    held = adjusted
    should = 0
    for debit in debits:
        if debit.refused:
            if debit.posted:
                held += debit.amount
            continue
        held += debit.amount
        removed = sum((r.after - r.before for r in debits if r.refused and r.counted_in(debit)), Decimal(0))
        if removed > debit.before:
            removed = Decimal(0)  # its total never held them (never expected): priced as it was
        # period_charge(after) - period_charge(before); a percentage debit: the fee of its own transaction
        should += incremental_charge(debit.spec, RATING_CONTEXT.subtract(debit.before, removed),
                                     RATING_CONTEXT.subtract(debit.after, removed), debit.included)
    return should - held


async def _metered_adjustment(conn: Connection, catalog: CatalogView, account: str, meter: str, period: str,
                              event_id: str, given_back: str | None = None) -> int:
    """The refusal adjustment of ``event_id``'s debit (``adjustment``), from the meter's decisions in ``period`` and
    the adjustments sent for its earlier refusals; ``given_back``: a repricing's give-back of that debit, neutralised
    with it (a give-back marked ``refused``, now or before: posted, to be nothing)."""
    rows = await conn.fetch(
        "SELECT event_id, decision, output_topic, output, amount_subunits, quantity_before, quantity_after, rated_at "
        "FROM rated_events WHERE period = $1 AND account_id = $2 AND meter = $3", period, account, meter)
    adjusted = sum(int(r["adjustment_subunits"]) for r in await conn.fetch(
        "SELECT d.adjustment_subunits FROM refused_debits d JOIN rated_events e ON e.account_id = d.account_id AND "
        "e.event_id = d.event_id WHERE d.account_id = $1 AND e.period = $2 AND e.meter = $3", account, period, meter))
    scales = {"CREDIT": 2, **{code: int((u or {}).get("scale", 2))
                              for code, u in (catalog.document.get("credit_units") or {}).items()}}
    specs: dict[str, Any] = {}
    debits = []
    for row in rows:
        refused = row["event_id"] in (event_id, given_back) or row["decision"] == REFUSED
        way = repricing.way_of(row["event_id"])
        if row["output_topic"] != topics.LEDGER_COMMANDS or not row["output"] or not (
                refused or row["decision"] in _CHARGED):
            continue  # trial usage (0 whatever the total), dead letters, meters priced at close
        command = json.loads(row["output"])
        cause = command["payload"]["cause"]
        text = json.dumps(cause["price"], sort_keys=True)
        if text not in specs:
            specs[text] = parse_spec(cause["price"], credit_scales=scales)
        debits.append(Debit(row["event_id"], datetime.fromisoformat(command["issued_at"]),
                            Decimal(row["quantity_before"]), Decimal(row["quantity_after"]),
                            int(row["amount_subunits"]), specs[text], Decimal(cause["included"]), refused,
                            posted=refused and way == "out", rated_at=datetime.fromisoformat(row["rated_at"]),
                            repriced=way is not None))
    return adjustment(debits, adjusted)


def _ai(meter: str, group: str, cause: dict[str, Any], totals: dict[str, Decimal], refused: int
        ) -> tuple[dict[str, Decimal], int]:
    """(token totals after, adjustment) of an AI meter's refused debit: its token counts leave the model's classes."""
    model = str(cause["model"])
    base = f"{meter}{GROUP_SEPARATOR}{group}" if group else meter
    keys = {cls: f"{base}|model={model}|{cls}" for cls in cause["tokens"]}
    now = {cls: totals.get(key, Decimal(0)) for cls, key in keys.items()}
    after = {cls: RATING_CONTEXT.subtract(now[cls], Decimal(str(count))) for cls, count in cause["tokens"].items()}
    if any(quantity < 0 for quantity in after.values()):
        raise ValueError(f"taking the tokens of model {model!r} out leaves a running total below zero")
    table = cause["ai_prices"]
    charged_now = to_subunits(ai_token_price(table, model, now).amount) - refused
    adjustment = to_subunits(ai_token_price(table, model, after).amount) - charged_now
    return {keys[cls]: quantity for cls, quantity in after.items()}, adjustment


def _adjustment(account: str, tenant: str, event_id: str, sent: dict[str, Any], amount: int, reason: str,
                closed_period: str | None = None, contribution: str = "0") -> str:
    """The refusal adjustment's ``usage.debit``; of a ``closed_period``: named as a late correction of it;
    ``contribution``: what it gives the monthly usage summary back (a give-back of the refused debit took it out)."""
    payload = sent["payload"]
    cause = payload["cause"]
    kept = {k: cause[k] for k in ("period", "group", "usage_type", "catalog_version", "price", "included",
                                  "priced_by", "time_zone", "original_period", "late") if k in cause}
    if closed_period is not None:
        kept.update(late=cause.get("late", "late"), original_period=closed_period)
    message = LedgerCommand(
        command_id=adjustment_command_id(account, event_id), kind="usage.debit", tenant=tenant,
        issued_at=utcnow(), issued_by="service:rating",
        payload={"unit": payload["unit"], "amount_subunits": amount, "amount": subunits_text(amount),
                 "meter": payload["meter"], "at": payload["at"],
                 "overage_policy": "overage",  # the usage it bills was accepted: never refused
                 "cause": {**kept, "event_ids": cause.get("event_ids") or [event_id], "refusal_of": sent["command_id"], "refusal_reason": reason,
                           "quantity": "0", "contribution": contribution,
                           "quantity_refused": cause.get("contribution", cause.get("quantity"))}})
    return message.to_json().decode()


def _message(account: str, output: str) -> OutMessage:
    return OutMessage(topics.LEDGER_COMMANDS, account, output.encode(), (("schema", b"ledger.command/v1"),))



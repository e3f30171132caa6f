"""Repricing: usage rating priced before it learnt of a subscription event that prices it otherwise.

Rating learns of subscriptions from the ledger's events (``billing.ledger.events``), usage comes on another topic
(``billing.usage.accepted``), and nothing orders the two: usage sent right after ``POST .../subscriptions`` is often
rated before rating applies the subscription's ``Started`` (the ledger's relay trails its commits). Such usage was
priced as if the subscription did not exist (the meter's list price, the calendar month) and stayed so, trial usage
included. Now the subscription events that change how usage from some instant on is priced (``REPRICING_EVENTS``:
a ``Started``, a ``Changed``, an ``Activated``, a ``Canceled`` of a live subscription; ``since`` gives the instant)
reprice the account's usage of that instant or later that rating already decided (only those decisions are read:
``time_floor``), once, in the transaction that applies the event:

* each event whose period or price is not what rating resolves now (``RatingService._reprice``; real-time, AI token
  and close-priced meters alike, the last moving only their period) gets a *give-back*
  in the period it was rated in, at the price it was rated at (a period that is closed: at the price its close line
  billed, named as a late correction, ``late``/``original_period``, so the ledger credits the invoice that billed
  it with a credit note), then a *charge* in the period and at the price rating resolves now (a trial: a debit of
  0), so the running totals, the close lines, the renewal invoice's usage lines and the monthly usage summary end
  as if the subscription event had been rated first;
* both are decisions of their own (``rated_events``) that amend the event as a correction does (``corrects``, its
  quantity in ``effective_quantity``): the give-back's takes it out of its period (0), the charge's counts it in
  the new one, where a later correction of the event is rated (``_BatchState._load_originals``);
* their keys and command ids come from the event and the ledger event that caused them (``repriced_id``); what a
  repricing sent is kept (``repricings``), so a redelivered ledger event sends the same commands again and changes
  nothing else (the ledger refuses a command id it has).

Why not hold usage until rating's view of subscriptions is current: rating cannot know which ledger events are
still on their way (the ledger's positions say nothing of a subscription created after the usage was sent, and the
two topics have no common order), so a bounded wait would only make the mis-pricing rarer; repricing makes the
outcome independent of the order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID
from zlib import crc32

from billing_events import topics
from billing_events.messages import EVENT_ID_LENGTH_MAX, LedgerEvent
from billing_runtime.bus import OutMessage
from billing_runtime.db import Connection

SCHEMA = """
CREATE TABLE IF NOT EXISTS repricings (
    cause TEXT NOT NULL, seq INTEGER NOT NULL, account_id TEXT NOT NULL, event_id TEXT NOT NULL,
    PRIMARY KEY (cause, seq));
"""

# Subscription events that price usage from an instant on, and the field of their data that holds it: a ``Started``
# (a live one: trialing, active), a ``Changed`` (a plan or quantity change, from its ``at``), an ``Activated``
# (an ``incomplete`` subscription's first payment: from the period it starts) and a ``Canceled`` of a live one (from
# its ``at``: an immediate cancel's cut, a cancel at period end's end; a trial ended without a payment method: from
# the trial's end). ``Paused``, ``Resumed``, ``PastDue`` and ``Recovered`` are not among them: a paused or past-due
# subscription prices usage as an active one does (same plan, allowance and periods: ``LIVE``, ``RENEWING``), so
# learning of them late leaves nothing priced otherwise (docs/rating.md "Usage rated before its subscription").
REPRICING_EVENTS = {"Started": "started_at", "Changed": "at", "Activated": "period_start", "Canceled": "at"}
# The reason of the ledger's ``Canceled`` of a trial that ended without a payment method: it ended at the trial's end.
TRIAL_ENDED_UNCONVERTED = "trial_ended_without_payment_method"
# The decisions a repricing may move: on time, counted, not refused (a ``late:`` decision is priced in its own closed
# period, which stands as invoiced; a filtered or refused one counts nowhere).
MOVABLE = ("priced", "trial", "deferred_to_close")
# Repricing decisions are keyed ``{prefix}{event id}``, the prefix padded to this length: longer than any event id
# ingest accepts, so no usage event can ever take (or be refused for) a repricing's key.
REPRICED_PREFIX_LENGTH = EVENT_ID_LENGTH_MAX + 1
# PostgreSQL advisory locks: this class (``RATE`` in ASCII) and one lock per bucket of accounts. A usage batch takes
# its accounts' buckets shared, a repricing its account's exclusively (``lock_account``), so the repricing sees every
# decision made without the subscription event, and every batch after it rates with it. Buckets bound the locks a
# batch of 2,000 accounts takes (PostgreSQL's lock table is shared and bounded).
ACCOUNT_LOCK_CLASS = 0x52415445
ACCOUNT_LOCK_BUCKETS = 256


def may_reprice(event: LedgerEvent) -> bool:
    """Whether ``event`` is of a kind that reprices (a redelivered one sends what it sent again: ``sent_before``)."""
    return event.type.removeprefix("Subscription.") in REPRICING_EVENTS


def since(event: LedgerEvent, live: bool = True, trial_end: datetime | None = None) -> datetime | None:
    """The instant from which ``event`` prices the account's usage otherwise, or None (it reprices nothing).

    ``live``: whether the subscription was live before ``event`` (a ``Canceled`` of an ``incomplete`` one priced
    nothing: nothing to reprice); ``trial_end``: its trial's end, when rating kept it."""
    name = event.type.removeprefix("Subscription.")
    field = REPRICING_EVENTS.get(name)
    if field is None or not event.data.get(field):
        return None
    if name == "Started" and event.data.get("status") not in ("trialing", "active"):
        return None  # an ``incomplete`` one is not live: usage is priced as without it until its ``Activated``
    if name == "Canceled":
        if not live:
            return None
        if event.data.get("reason") == TRIAL_ENDED_UNCONVERTED and trial_end is not None:
            return trial_end  # the ledger's tick ends the trial later than its end: usage since its end is repriced
    return datetime.fromisoformat(event.data[field])


def cause_of(event: LedgerEvent) -> str:
    """The ledger event a repricing follows from: the subscription and its version (one event each)."""
    return f"{event.aggregate_id}/{event.aggregate_version}"


def repriced_id(event_id: str, way: str, cause: str) -> str:
    """The key of the decision that gives back (``way`` ``out``) or charges again (``in``) event ``event_id`` for
    the repricing ``cause``: a fixed-length prefix longer than any event id, then the event's id."""
    return f"repriced-{way}:{cause}:".ljust(REPRICED_PREFIX_LENGTH, ".") + event_id


def way_of(event_id: str) -> str | None:
    """``out`` or ``in`` for a repricing's decision key (``repriced_id``), None for a usage event's."""
    if len(event_id) <= EVENT_ID_LENGTH_MAX or not event_id.startswith("repriced-"):
        return None
    return event_id[len("repriced-"):].partition(":")[0]


def traced(rows: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(raw event id, decision) of the events that ``rows`` (one period's decisions) count in that period, for an
    invoice line's trace: a repricing's decisions are not events of their own, its latest charge in the period stands
    for its event (named by the event's id), and an event a repricing took out of the period (its latest repricing
    there a give-back) is not traced there. Corrections and every other decision as they are."""
    last: dict[str, tuple[str, str]] = {}  # event id -> (rated at, key) of its latest repricing decision here
    for row in rows:
        if way_of(row["event_id"]) and (row["corrects"] not in last or row["rated_at"] > last[row["corrects"]][0]):
            last[row["corrects"]] = (row["rated_at"], row["event_id"])
    found = []
    for row in rows:
        event, way = row["corrects"] or row["event_id"], way_of(row["event_id"])
        latest = last.get(event)
        gone = latest is not None and way_of(latest[1]) == "out"
        if way is None and not gone or way == "in" and latest is not None and latest[1] == row["event_id"]:
            found.append((event if way else row["event_id"], row))
    return found


def time_floor(moment: datetime) -> str:
    """A lower bound of the stored ``event_time`` of the events at or after ``moment``: event times are stored in UTC
    (``+00:00``, the codec's), whose ISO 8601 text sorts as the instants do; to the whole second below it (the text of
    a fraction sorts after that of none), ``chains_since`` keeping those at or after ``moment`` exactly."""
    return moment.astimezone(UTC).replace(microsecond=0).isoformat()


@dataclass
class Chain:
    """One usage event's decisions: its own, then its corrections and repricings in the order they were made."""

    event_id: str
    rows: list[dict[str, Any]]

    @property
    def latest(self) -> dict[str, Any]:
        return self.rows[-1]

    @property
    def quantity(self) -> Decimal:
        """What the event counts now: its latest correction's quantity, else its own."""
        latest = self.latest
        return Decimal(latest["effective_quantity"] if latest["corrects"] else latest["quantity"])

    @property
    def moment(self) -> datetime:
        return datetime.fromisoformat(self.latest["event_time"])

    def commands(self) -> list[dict[str, Any]]:
        """Its decisions that sent a ledger command, in order."""
        return [r for r in self.rows if r["output_topic"] == topics.LEDGER_COMMANDS and r["output"]]

    def payload(self) -> dict[str, Any] | None:
        """The payload of the latest decision's ``usage.debit`` (its price and cause), None without one."""
        latest = self.latest
        if latest["output_topic"] != topics.LEDGER_COMMANDS or not latest["output"]:
            return None
        payload: dict[str, Any] = json.loads(latest["output"])["payload"]
        return payload


def chains_since(rows: list[dict[str, Any]], moment: datetime) -> list[Chain]:
    """The events of ``rows`` (one account's decisions) at or after ``moment``, each with its decisions in order."""
    by_event: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if datetime.fromisoformat(row["event_time"]) >= moment:
            by_event.setdefault(row["corrects"] or row["event_id"], []).append(row)
    chains = []
    for event_id, chain in by_event.items():
        chain.sort(key=lambda r: (r["corrects"] is not None, r["rated_at"]))
        chains.append(Chain(event_id, chain))
    return chains


def added_last(move: Move) -> tuple[str, Decimal]:
    """Sort key: when the event's latest decision was added to its period's running total (rated at, then the total
    it took its meter to: decisions rated together share their instant)."""
    latest = move.chain.latest
    return latest["rated_at"], Decimal(latest["quantity_after"] or 0)


def _bucket(account: str) -> int:
    try:
        return UUID(account).int % ACCOUNT_LOCK_BUCKETS
    except ValueError:
        return crc32(account.encode()) % ACCOUNT_LOCK_BUCKETS


async def lock_account(conn: Connection, dialect: str, account: str) -> None:
    """Before a subscription event that may reprice ``account`` is applied (PostgreSQL; SQLite runs one transaction
    at a time): waits for the usage batches of the account in flight, and holds back those that start meanwhile."""
    if dialect == "postgres":
        await conn.execute("SELECT pg_advisory_xact_lock($1::int, $2::int)", ACCOUNT_LOCK_CLASS, _bucket(account))


async def lock_accounts_shared(conn: Connection, dialect: str, accounts: list[str]) -> None:
    """A usage batch's side of ``lock_account``: its accounts' buckets, shared (batches never wait for each other),
    in one statement, in bucket order."""
    if dialect == "postgres":
        buckets = sorted({_bucket(account) for account in accounts})
        await conn.execute("SELECT pg_advisory_xact_lock_shared($1::int, b) FROM unnest($2::int[]) AS b",
                           ACCOUNT_LOCK_CLASS, buckets)


async def record_sent(conn: Connection, cause: str, account: str, event_ids: list[str]) -> None:
    """Keeps which decisions' commands the repricing ``cause`` sent, in order (for a redelivery of its event)."""
    await conn.executemany("INSERT INTO repricings (cause, seq, account_id, event_id) VALUES ($1, $2, $3, $4)",
                           [(cause, seq, account, event_id) for seq, event_id in enumerate(event_ids)])


async def sent_before(conn: Connection, cause: str) -> list[OutMessage]:
    """What the repricing ``cause`` sent, again (the same commands, the same ids: the ledger posts each once)."""
    rows = await conn.fetch(
        "SELECT r.account_id, r.output_topic, r.output FROM repricings p JOIN rated_events r ON "
        "r.account_id = p.account_id AND r.event_id = p.event_id WHERE p.cause = $1 ORDER BY p.seq", cause)
    return [OutMessage(r["output_topic"], r["account_id"], r["output"].encode(), (("schema", b"ledger.command/v1"),))
            for r in rows if r["output"]]


@dataclass
class Price:
    """A real-time meter's price as a decision records it: the spec, the pooled allowance, and its inputs."""

    spec: Any
    included: Decimal
    trial: bool  # usage the pricing subscription's trial makes free (recorded, charged 0)
    inputs: dict[str, Any]  # ``price``, ``included``, ``overage_policy``, ``priced_by`` as the debit's cause names them


@dataclass
class Move:
    """One event to reprice: from the period and price it was rated at to those rating resolves now."""

    chain: Chain
    meter: Any  # the catalogue's ``MeterView``
    old_period: str
    new_period: str
    counted: Decimal  # what it adds to its meter's running total (a count meter: 1)
    # None: a meter priced at close (its period's close prices it, nothing is debited now), or an AI token meter
    # (priced by its own table, per model and token class, whatever the plan: only its period changes)
    old: Price | None
    new: Price | None

"""What rating knows of subscriptions (learnt from ``billing.ledger.events``): which plan prices a meter
for an account, the account's billing period, and the usage lines of an ended period.

Rules (documented in docs/rating.md):
* A meter is priced by the charge of the account's earliest-started live subscription whose plan has a
  charge for it; allowances (``included``) of every live subscription charging that meter pool together.
  Without such a subscription, the meter's list price applies. A subscription prices usage from its start
  (``started_at``) on: usage before it is priced as without it, whether rating learnt of it before or after.
  It prices usage by the plan it had at the usage's time (``AccountSubscription.plan_at``: the plans changes
  replaced are kept in ``subscription_plans``, ``PLAN_HISTORY_KEPT``), whether the usage reaches rating before or
  after the change.
* Usage while the pricing subscription is trialing is recorded but not charged: usage before its trial's end
  (``trial_end`` of its ``Started``, kept in ``subscription_trials``). Usage at or after the trial's end is not
  trial usage even before the ledger's ``TrialConverted`` reaches rating: it is priced by the plan and, for the
  primary subscription, placed in the period the conversion starts (from the trial's end, ``period_end`` of the
  cadence with the trial end's day in the subscription's time zone as anchor, as the ledger's ``end_trial``), so
  it shares that period's running total and allowance and is on its renewal invoice once. Usage before the
  trial's end that reaches rating after the ``TrialConverted`` is still trial usage. A close takes the pricing
  subscription's trial status at the closed period's last instant. Without a kept trial end (started before
  rating kept them): the status.
* A trial that ends without a payment method (``Canceled``, reason ``trial_ended_without_payment_method``) starts
  no period: usage from its end on is priced as without the subscription (list price by calendar month); usage
  rated after its end before that event is repriced so (``billing_rating.repricing``), then rating closes the
  periods it was placed in (what could not be moved out), sending no usage lines (the ledger drafts no invoice).
  A redelivered ``Canceled`` sends the same commands again.
* An ``incomplete`` subscription (collection ``charge_before_access``, its first invoice not paid yet) is not
  live: usage is priced as for an account without it. Its ``Activated`` event makes it active, with the
  period that starts at the activation.
* The billing period of usage is the primary (earliest-started live) subscription's current period; an
  account without a subscription is billed by calendar month (UTC).
* When a subscription's period ends, rating closes it (the meters priced only at close: max, last,
  unique_count) and sends the period's usage lines for the renewal invoice (``invoice.usage_lines``): only
  the primary subscription's invoice carries usage, others get none. The ended period's bounds are kept
  (``subscription_periods``): an event of that period arriving later follows its meter's late policy.
* Usage after the end of the current period that arrives before the ledger's ``PeriodEnded`` belongs to the
  period that follows (it starts where the current one ends; ``billing_events.periods`` gives its end from
  the cadence, time zone and anchor day kept in ``subscription_renewals``), never to a calendar month; for a
  trialing subscription, usage at or after its trial's end (above).
* Events older than the last one applied to a subscription (a redelivery) change nothing: its period never
  moves backwards. A redelivered ``PeriodEnded`` (or restarting ``Changed``) still sends its commands again.
* A change that restarts the period (a cadence change) closes the period cut short, like an end, and its
  usage goes on the next renewal invoice, the one of the period it restarted into (``restarted_periods``).
* An immediate cancel (``Canceled`` with reason ``canceled`` of a live subscription) ends its current period at
  the cancel: rating closes [period start, cancel) like an end and sends its usage lines for the ledger's final
  draft (the key of a period ending at the cancel). The canceled row keeps that cut as its ``period_end``, so a
  redelivered ``Canceled`` sends the same commands again. A cancel at period end (``canceled_at_period_end``,
  after its ``PeriodEnded``), an ``incomplete`` one's and a trial's end without a payment method close no period
  of their own (the latter closes the periods after the trial's end it placed usage in, above).
  A cancel after the current period's end (before the ledger's tick) follows the ``PeriodEnded`` of every period
  due by then (the ledger ends them first), so it cuts the period it falls in: the usage placed there ahead of
  the ``PeriodEnded`` goes on the final draft, the ended period's on its renewal invoice. A cancel after a trial's
  end follows the ledger's end of that trial (the ledger ends it first, as its tick would): a ``TrialConverted``,
  so the cancel cuts the first billed period the usage since the trial's end was placed in (its usage lines
  itemise it on the final draft), or the unconverted end's ``Canceled``. A ``Canceled`` of a trialing subscription
  (cut in its trial, or recorded before the ledger ended trials first) first closes the periods after the trial's
  end it placed usage in, as an unconverted end does, then its cut.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from functools import cached_property, lru_cache
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from billing_events import topics
from billing_events.messages import LedgerCommand, LedgerEvent
from billing_events.money import RATING_CONTEXT, is_currency_code
from billing_events.periods import MONTHS, period_end
from billing_events.periods import anchor_day as local_anchor_day
from billing_events.timeutil import utcnow
from billing_rating import repricing
from billing_rating.aggregation import REAL_TIME, period_of
from billing_rating.close import CloseLine
from billing_rating.text import decimal_text, subunits_text
from billing_runtime.bus import OutMessage
from billing_runtime.db import Connection, Database

SCHEMA = """
CREATE TABLE IF NOT EXISTS account_subscriptions (
    subscription_id TEXT PRIMARY KEY, account_id TEXT NOT NULL, tenant TEXT NOT NULL, plan_code TEXT NOT NULL,
    plan_version INTEGER NOT NULL, quantity INTEGER NOT NULL, status TEXT NOT NULL, started_at TEXT NOT NULL,
    period_start TEXT NOT NULL, period_end TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS account_subscriptions_account ON account_subscriptions (account_id);
CREATE TABLE IF NOT EXISTS subscription_periods (
    account_id TEXT NOT NULL, period TEXT NOT NULL, period_start TEXT NOT NULL, period_end TEXT NOT NULL,
    subscription_id TEXT NOT NULL, PRIMARY KEY (account_id, period));
CREATE TABLE IF NOT EXISTS subscription_renewals (
    subscription_id TEXT PRIMARY KEY, version INTEGER NOT NULL, cadence TEXT, time_zone TEXT, anchor_day INTEGER,
    ends_at_period_end INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS restarted_periods (
    account_id TEXT NOT NULL, period TEXT NOT NULL, period_start TEXT NOT NULL, restarted_at TEXT NOT NULL,
    subscription_id TEXT NOT NULL, billed_with TEXT NOT NULL, PRIMARY KEY (account_id, period));
CREATE INDEX IF NOT EXISTS restarted_periods_billed_with ON restarted_periods (account_id, billed_with);
CREATE TABLE IF NOT EXISTS subscription_trials (subscription_id TEXT PRIMARY KEY, trial_end TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS subscription_anchors (subscription_id TEXT PRIMARY KEY, anchor_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS subscription_plans (subscription_id TEXT PRIMARY KEY, history TEXT NOT NULL);
"""

LIVE = ("trialing", "active", "past_due", "paused")
IMMEDIATE_CANCEL = "canceled"  # the reason of a ``Canceled`` a user asked for at once (the ledger's cancel)
TRACE_EVENT_IDS_MAX = 100  # raw event ids listed on an invoice line; the rest via rating's decisions route
# Statuses whose period is followed by another at its end (a trialing one restarts at its trial's end instead).
RENEWING = ("active", "past_due", "paused")
# How many periods past the current one's end usage may be placed before the ledger's PeriodEnded arrives
# (3 years of monthly periods); beyond, the calendar month (UTC) as for an account without a subscription.
PERIODS_AHEAD_MAX = 36
STATUS_BY_EVENT = {"Paused": "paused", "Resumed": "active", "PastDue": "past_due", "Recovered": "active",
                   "Canceled": "canceled", "TrialConverted": "active", "Activated": "active"}
# Events that start the subscription's first billed period (status active, new bounds and anchor day).
PERIOD_STARTS = ("TrialConverted", "Activated")
# The reason of the ledger's ``Canceled`` when a trial ends without a default payment method (not converted).
TRIAL_ENDED_UNCONVERTED = repricing.TRIAL_ENDED_UNCONVERTED
# How long rating remembers a plan a ``Changed`` replaced (``subscription_plans``), by the change's ``at``: usage
# reaches rating at most ingest's window after it happened (35 days: older usage is refused ``too_old``, and a
# subscription command's ``at`` goes as far back), plus a week for a consumer lagging behind; and at most this many
# plans per subscription (the earliest forgotten first). Usage older than what is remembered is priced by the
# earliest plan remembered.
PLAN_HISTORY_KEPT = timedelta(days=35 + 7)
PLAN_HISTORY_ENTRIES_MAX = 64


@dataclass(frozen=True)
class Renewal:
    """How a subscription's periods follow each other, as the ledger computes them (``billing_events.periods``)."""

    cadence: str
    time_zone: str
    anchor_day: int
    ends_at_period_end: bool  # cancel at period end: no period follows
    # The start the anchor day was taken from (``subscription_anchors``): periods end at its local time, as the
    # ledger's do (``billing_events.periods``). None: not known (kept since session 11): the local time of the end
    # before, as before.
    anchor_at: datetime | None = None


@dataclass(frozen=True)
class AccountSubscription:
    subscription_id: str
    plan_code: str
    plan_version: int
    quantity: int
    status: str
    started_at: str
    period_start: datetime
    period_end: datetime
    # None: not known (a subscription whose Started rating applied before it kept renewals).
    renewal: Renewal | None = None
    # When its trial ends (the ledger's ``trial_end``); None: no trial, or not known (a subscription whose
    # Started rating applied before it kept trial ends: its status alone says whether usage is trial usage).
    trial_end: datetime | None = None
    # The IANA zone its periods turn in (``Subscription.Started``'s ``time_zone``, kept for every cadence); None: not
    # known. Rating names it on the usage debits it bills in its periods (``cause.time_zone``), for the monthly summary.
    time_zone: str | None = None
    # The plans changes replaced, oldest first: (until, plan code, plan version), each in force up to ``until`` (the
    # ``at`` of the change that replaced it; ``subscription_plans``). Empty: never changed plan (most).
    plans: tuple[tuple[datetime, str, int], ...] = ()

    def plan_at(self, moment: datetime) -> tuple[str, int]:
        """(code, version) of the plan in force at ``moment``: usage is priced by the plan of its own time, whether
        it reaches rating before or after a change."""
        for until, code, version in self.plans:
            if moment < until:
                return code, version
        return self.plan_code, self.plan_version

    @cached_property
    def start(self) -> datetime:
        """When it started (``started_at``): usage before it is not priced by it, whenever rating learnt of it."""
        return datetime.fromisoformat(self.started_at)

    def in_trial(self, moment: datetime) -> bool:
        """Whether usage at ``moment`` is trial usage (recorded, not charged): ``moment`` is before the end of the
        subscription's trial, whether or not rating has seen its ``TrialConverted`` yet (a late event of the trial
        is still free). Usage at or after the trial's end is not, even before the ``TrialConverted`` reaches
        rating: it belongs to the first billed period. Without a kept trial end: the status says."""
        if self.trial_end is not None:
            return moment < self.trial_end
        return self.status == "trialing"

    def trial_ended_at(self, moment: datetime) -> bool:
        """Whether ``moment`` is at or after the end of the trial rating knows the subscription is in."""
        return self.status == "trialing" and self.trial_end is not None and moment >= self.trial_end

    def period_ahead(self, moment: datetime) -> datetime | None:
        """The start of the period after the current one that contains ``moment`` (``moment`` at or after the
        current end), as the ledger will renew it; ``None`` when no period follows or it is not known.

        For a trialing subscription whose trial end is known: the periods the ledger's ``TrialConverted``
        starts (the first from the trial's end to ``period_end(trial end, cadence, its day, time zone)``, the
        trial end's day in the subscription's time zone the anchor of those after it), for ``moment`` at or after
        the trial's end; a cancel scheduled during the trial still lets that first billed period come (it ends at
        its end)."""
        renewal = self.renewal
        if renewal is None:
            return None
        trialing = self.status == "trialing"
        if trialing:
            if self.trial_end is None or moment < self.trial_end:
                return None
            # As the ledger's ``end_trial``: anchored on the trial end's day in the subscription's time zone.
            start, anchor_day = self.trial_end, local_anchor_day(self.trial_end, renewal.time_zone)
            anchor = self.trial_end
        else:
            if renewal.ends_at_period_end or self.status not in RENEWING or moment < self.period_end:
                return None
            start, anchor_day, anchor = self.period_end, renewal.anchor_day, renewal.anchor_at
        for _ in range(PERIODS_AHEAD_MAX):
            end = _next_end(start, renewal.cadence, anchor_day, renewal.time_zone, anchor)
            if moment < end:
                return start
            if trialing and renewal.ends_at_period_end:
                return None  # canceled at the end of the first billed period: nothing follows it
            start = end
        return None

    def periods_after_trial(self) -> list[datetime]:
        """The starts of the periods ``period_ahead`` may have placed usage in after the trial's end."""
        renewal = self.renewal
        if renewal is None or self.trial_end is None:
            return []
        starts, start = [], self.trial_end
        anchor_day = local_anchor_day(self.trial_end, renewal.time_zone)
        for _ in range(PERIODS_AHEAD_MAX):
            starts.append(start)
            start = _next_end(start, renewal.cadence, anchor_day, renewal.time_zone, self.trial_end)
        return starts


@lru_cache(maxsize=4096)
def _next_end(start: datetime, cadence: str, anchor_day: int, time_zone: str, anchor: datetime | None) -> datetime:
    return period_end(start, cadence, anchor_day, time_zone, anchor)


async def load_for(conn: Connection, accounts: Sequence[str], dialect: str = "") -> dict[str, list[AccountSubscription]]:
    """Live subscriptions per account, earliest-started first."""
    return (await load_subscriptions(conn, accounts, dialect))[0]


async def load_subscriptions(conn: Connection, accounts: Sequence[str], dialect: str = ""
                             ) -> tuple[dict[str, list[AccountSubscription]], set[str]]:
    """(live subscriptions per account, earliest-started first; the accounts that have had any subscription).

    On PostgreSQL (``dialect="postgres"``) the accounts are one array parameter: one prepared statement
    whatever their number, instead of a new statement text (and plan) per batch size.
    """
    if not accounts:
        return {}, set()
    where, args = _accounts_where(accounts, dialect)
    rows = await conn.fetch(f"{_SELECT} WHERE s.{where} ORDER BY s.started_at, s.subscription_id", *args)
    result: dict[str, list[AccountSubscription]] = {}
    subscribed: set[str] = set()
    for r in rows:
        subscribed.add(r["account_id"])
        if r["status"] not in LIVE:
            continue
        result.setdefault(r["account_id"], []).append(_from_row(r))
    return result, subscribed


async def load_subscription(conn: Connection, subscription_id: str) -> tuple[str, str, AccountSubscription] | None:
    """(account, tenant, the subscription with its renewals and trial end) whatever its status."""
    row = await conn.fetchrow(f"{_SELECT} WHERE s.subscription_id = $1", subscription_id)
    return None if row is None else (row["account_id"], row["tenant"], _from_row(row))


async def time_zone_of(conn: Connection, subscription_id: str) -> str | None:
    """The zone the subscription's periods turn in (``Subscription.Started``'s), None when not known."""
    return await conn.fetchval("SELECT time_zone FROM subscription_renewals WHERE subscription_id = $1",
                               subscription_id)


_SELECT = ("SELECT s.*, r.cadence, r.time_zone, r.anchor_day, r.ends_at_period_end, t.trial_end, a.anchor_at, "
           "h.history AS plan_history "
           "FROM account_subscriptions s LEFT JOIN subscription_renewals r ON r.subscription_id = s.subscription_id "
           "LEFT JOIN subscription_trials t ON t.subscription_id = s.subscription_id "
           "LEFT JOIN subscription_anchors a ON a.subscription_id = s.subscription_id "
           "LEFT JOIN subscription_plans h ON h.subscription_id = s.subscription_id")


def _from_row(r: Any) -> AccountSubscription:
    return AccountSubscription(
        r["subscription_id"], r["plan_code"], int(r["plan_version"]), int(r["quantity"]), r["status"],
        r["started_at"], datetime.fromisoformat(r["period_start"]), datetime.fromisoformat(r["period_end"]),
        Renewal(r["cadence"], r["time_zone"], int(r["anchor_day"]), bool(r["ends_at_period_end"]),
                datetime.fromisoformat(r["anchor_at"]) if r["anchor_at"] else None)
        if r["cadence"] in MONTHS and r["time_zone"] and r["anchor_day"] else None,
        datetime.fromisoformat(r["trial_end"]) if r["trial_end"] else None, r["time_zone"] or None,
        _plans(r["plan_history"]) if r["plan_history"] else ())


def _plans(history: str) -> tuple[tuple[datetime, str, int], ...]:
    return tuple((datetime.fromisoformat(until), str(code), int(version)) for until, code, version in json.loads(history))


async def _remember_plan(conn: Connection, sid: str, row: Any, data: dict[str, Any]) -> None:
    """A ``Changed`` that replaced the plan: the old one is kept as in force until the change's ``at``, so usage of
    before the change is priced by it whenever it reaches rating (bounded: ``PLAN_HISTORY_KEPT``,
    ``PLAN_HISTORY_ENTRIES_MAX``)."""
    new = (str(data["plan"]["code"]), int(data["plan"]["version"]))
    if row is None or (row["plan_code"], int(row["plan_version"])) == new or not data.get("at"):
        return  # a quantity change (the plan stays), or a subscription rating does not know
    at = datetime.fromisoformat(data["at"])
    stored = await conn.fetchval("SELECT history FROM subscription_plans WHERE subscription_id = $1", sid)
    history = [entry for entry in (_plans(stored) if stored else ()) if entry[0] >= at - PLAN_HISTORY_KEPT]
    history.append((at, row["plan_code"], int(row["plan_version"])))
    # By instant only, stable: changes at one instant stay in the order the ledger recorded them, so the plan in force
    # just before it is the first one replaced (sorted whole, the plan codes decided: team -> basic -> team at one
    # instant priced the usage before it by basic, held for no time at all; since session 15).
    history = sorted(history, key=lambda entry: entry[0])[-PLAN_HISTORY_ENTRIES_MAX:]
    await conn.execute(
        "INSERT INTO subscription_plans (subscription_id, history) VALUES ($1, $2) ON CONFLICT (subscription_id) "
        "DO UPDATE SET history = excluded.history", sid,
        json.dumps([[until.isoformat(), code, version] for until, code, version in history]))


async def ended_periods(conn: Connection, accounts: Sequence[str], dialect: str = ""
                        ) -> dict[str, list[tuple[datetime, datetime, str]]]:
    """The ended (and closed) subscription periods of ``accounts``: (start, end, period key) each."""
    if not accounts:
        return {}
    where, args = _accounts_where(accounts, dialect)
    result: dict[str, list[tuple[datetime, datetime, str]]] = {}
    for r in await conn.fetch(f"SELECT account_id, period, period_start, period_end FROM subscription_periods "
                              f"WHERE {where}", *args):
        result.setdefault(r["account_id"], []).append(
            (datetime.fromisoformat(r["period_start"]), datetime.fromisoformat(r["period_end"]), r["period"]))
    return result


async def record_ended_period(conn: Connection, account: str, ended: AccountSubscription) -> None:
    """Keeps the bounds of a closed subscription period, so later events of it are known to be late."""
    await conn.execute(
        "INSERT INTO subscription_periods (account_id, period, period_start, period_end, subscription_id) "
        "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (account_id, period) DO NOTHING", account,
        ended.period_start.isoformat(), ended.period_start.isoformat(), ended.period_end.isoformat(),
        ended.subscription_id)


def _accounts_where(accounts: Sequence[str], dialect: str) -> tuple[str, list[Any]]:
    if dialect == "postgres":
        return "account_id = ANY($1::text[])", [list(accounts)]
    return f"account_id IN ({', '.join(f'${i}' for i in range(1, len(accounts) + 1))})", list(accounts)


async def already_applied(conn: Connection, event: LedgerEvent) -> bool:
    """Whether ``event`` is not newer than the last event applied to its subscription (a redelivery)."""
    known = await conn.fetchval("SELECT version FROM subscription_renewals WHERE subscription_id = $1",
                                str(event.aggregate_id))
    return known is not None and event.aggregate_version <= int(known)


async def apply_event(conn: Connection, event: LedgerEvent, dialect: str = "") -> AccountSubscription | None:
    """Updates the tables from one Subscription event. Returns the subscription with the bounds of a period
    that ended (``PeriodEnded``), that a change cut short by restarting the period (``Changed``, ending at
    the restart) or that an immediate cancel cut short (``Canceled``, ending at the cancel, with the status it
    had before), for the caller to close; also when the event is a redelivery, so its commands go again.

    An event not newer than the last one applied to the subscription (its ``aggregate_version``) changes
    nothing: a redelivered older ``PeriodEnded`` must not move the current period back.

    On PostgreSQL the subscription's row is locked (``FOR UPDATE``) before a period ends or restarts: the
    usage path reads an account's subscriptions ``FOR SHARE`` before its closed periods, so a batch rates
    either before the close (which then counts its decisions) or after it (and sees the period closed).
    """
    name = event.type.removeprefix("Subscription.")
    data = event.data
    sid = str(event.aggregate_id)
    version = event.aggregate_version
    stale = await already_applied(conn, event)
    row = None
    if name in ("PeriodEnded", "Changed", "Canceled"):
        lock = " FOR UPDATE" if dialect == "postgres" else ""
        row = await conn.fetchrow(f"SELECT * FROM account_subscriptions WHERE subscription_id = $1{lock}", sid)
    if stale:
        if name == "PeriodEnded" and row is not None:
            return _with_bounds(row, data["period_start"], data["period_end"])
        if name == "Changed" and row is not None:
            restart = datetime.fromisoformat(data["period_start"]).isoformat()
            cut = await conn.fetchrow("SELECT period_start FROM restarted_periods WHERE subscription_id = $1 AND "
                                      "restarted_at = $2", sid, restart)
            if cut is not None:
                return _with_bounds({**row, "plan_code": data["old_plan"]["code"],
                                     "plan_version": data["old_plan"]["version"]}, cut["period_start"], restart)
        if name == "Canceled" and row is not None and row["status"] == "canceled" and _cut_at(data) is not None \
                and datetime.fromisoformat(row["period_end"]) == _cut_at(data):  # the cut it made: sent again
            return _with_bounds(row, row["period_start"], row["period_end"])
        return None
    result = None
    renewal: dict[str, Any] = {}
    if name == "Started":
        from billing_events import ids

        await conn.execute(
            "INSERT INTO account_subscriptions (subscription_id, account_id, tenant, plan_code, plan_version, quantity, "
            "status, started_at, period_start, period_end) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) "
            "ON CONFLICT (subscription_id) DO NOTHING",
            sid, str(ids.account_id(data["tenant"])), data["tenant"], data["plan"]["code"],
            int(data["plan"]["version"]), int(data["quantity"]), data["status"], data["started_at"],
            data["period_start"], data["period_end"])
        time_zone = data.get("time_zone") or "UTC"
        renewal = {"cadence": data["plan"].get("cadence", "month"), "time_zone": time_zone,
                   "anchor_day": data.get("anchor_day") or local_anchor_day(
                       datetime.fromisoformat(data["period_start"]), time_zone)}
        renewal["anchor_at"] = data["period_start"]
        if data["status"] == "trialing" and data.get("trial_end"):
            await conn.execute("INSERT INTO subscription_trials (subscription_id, trial_end) VALUES ($1, $2) "
                               "ON CONFLICT (subscription_id) DO NOTHING", sid, data["trial_end"])
    elif name == "Changed":
        await _remember_plan(conn, sid, row, data)
        await conn.execute(
            "UPDATE account_subscriptions SET plan_code = $2, plan_version = $3, quantity = $4, period_start = $5, "
            "period_end = $6 WHERE subscription_id = $1", sid, data["plan"]["code"], int(data["plan"]["version"]),
            int(data["quantity"]), data["period_start"], data["period_end"])
        renewal = {"cadence": data["plan"].get("cadence"), "anchor_day": data.get("anchor_day")}
        if row is not None and datetime.fromisoformat(data["period_start"]) > datetime.fromisoformat(
                row["period_start"]):
            result = _with_bounds(row, row["period_start"], data["period_start"])  # the period restarted
            renewal["anchor_at"] = data["period_start"]  # as its anchor day: the ledger's cadence change
    elif name == "PeriodEnded":
        if row is not None:
            if data.get("next_start") and datetime.fromisoformat(data["next_start"]) > datetime.fromisoformat(
                    row["period_start"]):  # never backwards (a subscription rating kept no version of)
                await conn.execute("UPDATE account_subscriptions SET period_start = $2, period_end = $3 "
                                   "WHERE subscription_id = $1", sid, data["next_start"], data["next_end"])
            result = _with_bounds(row, data["period_start"], data["period_end"])
    elif name == "CancelScheduled":
        renewal = {"ends_at_period_end": 1}
    elif name in STATUS_BY_EVENT:
        await conn.execute("UPDATE account_subscriptions SET status = $2 WHERE subscription_id = $1", sid,
                           STATUS_BY_EVENT[name])
        cut_at = _cut_at(data) if name == "Canceled" and row is not None and row["status"] in LIVE else None
        if cut_at is not None and row is not None and cut_at > datetime.fromisoformat(row["period_start"]):
            # An immediate cancel: the current period ends here (its row keeps the cut, for a redelivery).
            await conn.execute("UPDATE account_subscriptions SET period_end = $2 WHERE subscription_id = $1", sid,
                               cut_at.isoformat())
            result = _with_bounds(row, row["period_start"], cut_at.isoformat())
        if name in PERIOD_STARTS:
            await conn.execute("UPDATE account_subscriptions SET period_start = $2, period_end = $3 "
                               "WHERE subscription_id = $1", sid, data["period_start"], data["period_end"])
            renewal = {"anchor_day": data.get("anchor_day"), "anchor_at": data["period_start"]}
    if renewal.get("anchor_at"):
        await conn.execute("INSERT INTO subscription_anchors (subscription_id, anchor_at) VALUES ($1, $2) "
                           "ON CONFLICT (subscription_id) DO UPDATE SET anchor_at = excluded.anchor_at", sid,
                           datetime.fromisoformat(renewal["anchor_at"]).isoformat())
    await conn.execute(
        "INSERT INTO subscription_renewals (subscription_id, version, cadence, time_zone, anchor_day, "
        "ends_at_period_end) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (subscription_id) DO UPDATE SET "
        "version = excluded.version, cadence = COALESCE(excluded.cadence, subscription_renewals.cadence), "
        "time_zone = COALESCE(excluded.time_zone, subscription_renewals.time_zone), "
        "anchor_day = COALESCE(excluded.anchor_day, subscription_renewals.anchor_day), "
        "ends_at_period_end = CASE WHEN excluded.ends_at_period_end = 1 THEN 1 "
        "ELSE subscription_renewals.ends_at_period_end END",
        sid, version, renewal.get("cadence"), renewal.get("time_zone"),
        int(renewal["anchor_day"]) if renewal.get("anchor_day") else None, int(renewal.get("ends_at_period_end", 0)))
    return result


def _with_bounds(row: Any, start: str, end: str) -> AccountSubscription:
    return AccountSubscription(str(row["subscription_id"]), row["plan_code"], int(row["plan_version"]),
                               int(row["quantity"]), row["status"], row["started_at"], datetime.fromisoformat(start),
                               datetime.fromisoformat(end))


def _cut_at(data: dict[str, Any]) -> datetime | None:
    """When an immediate cancel (``Canceled`` with reason ``canceled``) cut the current period short."""
    if data.get("reason") != IMMEDIATE_CANCEL or not data.get("at"):
        return None
    return datetime.fromisoformat(data["at"])


async def record_restarted_period(conn: Connection, account: str, cut: AccountSubscription) -> None:
    """Keeps the period a change cut short (closed already) and has its usage billed with the period it
    restarted into: the next renewal invoice shows it, once. A period restarted into that is itself cut short
    passes what it carried on."""
    period, into = cut.period_start.isoformat(), cut.period_end.isoformat()
    await record_ended_period(conn, account, cut)
    await conn.execute(
        "INSERT INTO restarted_periods (account_id, period, period_start, restarted_at, subscription_id, billed_with) "
        "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (account_id, period) DO NOTHING", account, period, period,
        into, cut.subscription_id, into)
    await conn.execute("UPDATE restarted_periods SET billed_with = $3 WHERE account_id = $1 AND billed_with = $2",
                       account, period, into)


async def usage_lines_command(conn: Connection, ended: AccountSubscription, tenant: str, account: str,
                              meter_names: dict[str, dict[str, Any]], primary: bool,
                              closed: Sequence[CloseLine] = ()) -> OutMessage:
    """``invoice.usage_lines`` for the renewal invoice of ``ended`` (usage only on the primary subscription; the
    payload's ``primary`` says so, and the ledger bills the account's overage only on the primary's invoices).

    Real-time meters (sum, count, AI tokens): the amounts rating posted for the period's decisions, and the
    quantity by which they moved the period's running totals (a correction counts by its difference, a
    count meter by one per event). The period's decisions are those under its key, late events of earlier
    periods included, those under the keys of periods a change cut short and restarted into it
    (``restarted_periods``: billed here and nowhere else), and those of its time span rated by calendar month
    (before rating knew of the subscription). Meters priced at close (max, last, unique_count): the
    ``closed`` lines of the period and the close lines of those cut periods.
    """
    lines: list[dict[str, Any]] = []
    if primary:
        key = ended.period_start.isoformat()
        # Periods a change cut short before this one (restarted into it): their usage is billed here, once.
        restarted = await conn.fetch("SELECT period, period_start FROM restarted_periods WHERE account_id = $1 "
                                     "AND billed_with = $2 ORDER BY period_start", account, key)
        keys = {key, *(r["period"] for r in restarted)}
        span_start = min([ended.period_start, *(datetime.fromisoformat(r["period_start"]) for r in restarted)])
        months = _months(span_start, ended.period_end)
        periods = [*sorted(keys), *months]
        rows = await conn.fetch(
            "SELECT event_id, meter, unit, quantity_before, quantity_after, amount_subunits, event_time, period, "
            "corrects, rated_at FROM rated_events WHERE account_id = $1 AND period IN "
            f"({', '.join(f'${i + 2}' for i in range(len(periods)))}) AND decision LIKE '%priced' "
            "ORDER BY event_time, event_id", account, *periods)
        if restarted:  # their close lines (max, last, unique_count), closed when the change cut them short
            cut_keys = sorted(keys - {key})
            closed = [*closed, *(CloseLine(**json.loads(r["line"])) for r in await conn.fetch(
                f"SELECT line FROM close_lines WHERE account_id = $1 AND period IN "
                f"({', '.join(f'${i + 2}' for i in range(len(cut_keys)))}) ORDER BY period, meter, group_key",
                account, *cut_keys))]
        totals: dict[tuple[str, str], tuple[Decimal, int, list[str], set[str], int]] = {}
        rows = [r for r in rows if r["period"] in keys or span_start <= datetime.fromisoformat(r["event_time"])
                < ended.period_end]  # not a calendar month's decision outside the subscription's period
        # The events traced (repricings: ``billing_rating.repricing``), each period's decisions on their own.
        traced = {id(row): event for period in {r["period"] for r in rows}
                  for event, row in repricing.traced([r for r in rows if r["period"] == period])}
        for r in rows:
            meter_unit = (r["meter"], r["unit"] or "")
            quantity, amount, event_ids, seen, events = totals.get(meter_unit, (Decimal(0), 0, [], set(), 0))
            event = traced.get(id(r))
            if event is not None and len(event_ids) < TRACE_EVENT_IDS_MAX:
                event_ids.append(event)
            seen.add(r["period"])
            moved = RATING_CONTEXT.subtract(Decimal(r["quantity_after"]), Decimal(r["quantity_before"]))
            totals[meter_unit] = (RATING_CONTEXT.add(quantity, moved), amount + int(r["amount_subunits"]),
                                  event_ids, seen, events + (event is not None))
        for line in closed:
            if line.aggregation in REAL_TIME:
                continue  # priced in real time: its decisions above
            meter_unit = (line.meter, line.unit or "")
            quantity, amount, event_ids, seen, events = totals.get(meter_unit, (Decimal(0), 0, [], set(), 0))
            event_ids.extend(line.event_ids[:TRACE_EVENT_IDS_MAX - len(event_ids)])
            seen.add(line.period)
            totals[meter_unit] = (RATING_CONTEXT.add(quantity, Decimal(line.quantity)),
                                  amount + line.charged_at_close_subunits, event_ids, seen, events + line.event_count)
        for (meter, unit), (quantity, amount, event_ids, seen, events) in sorted(totals.items()):
            if not events and not quantity and not amount:
                continue  # only usage a repricing moved to another period: nothing of it is billed here
            meta = meter_names.get(meter, {})
            label = f"{meta.get('name') or meter}: {decimal_text(quantity)} {meta.get('unit_of_measure', 'units')}"
            # The trace: rating's decisions (GET /v1/rating/periods/{period}/accounts/{tenant}/decisions)
            # of these periods and events explain the line down to each raw event.
            trace = {"rating_periods": sorted(seen), "event_ids": event_ids, "events": events}
            if is_currency_code(unit):
                lines.append({"kind": "usage", "description": label, "amount": subunits_text(amount),
                              "meter": meter, "quantity": decimal_text(quantity), "trace": trace})
            else:
                # Priced in credits: what of them prepaid credit paid and what went beyond it (overage) only the
                # ledger knows; it says so on the invoice (``credits``, ``credits_unit``: invoice_overage.py).
                lines.append({"kind": "usage", "description": f"{label} ({subunits_text(amount)} {unit})",
                              "amount": "0", "meter": meter, "quantity": decimal_text(quantity), "trace": trace,
                              "credits": subunits_text(amount), "credits_unit": unit})
    invoice_key = f"{ended.subscription_id}/{ended.period_end.isoformat()}"
    command = LedgerCommand(
        command_id=uuid5(NAMESPACE_URL, f"/usage-lines/{ended.subscription_id}/{ended.period_end.isoformat()}"),
        kind="invoice.usage_lines", tenant=tenant, issued_at=utcnow(), issued_by="service:rating",
        payload={"invoice_key": invoice_key, "lines": lines, "period_start": ended.period_start.isoformat(),
                 "period_end": ended.period_end.isoformat(), "primary": primary})
    return OutMessage(topics.LEDGER_COMMANDS, account, command.to_json(), (("schema", b"ledger.command/v1"),))


def _months(start: datetime, end: datetime) -> list[str]:
    """The calendar months (``YYYY-MM``, UTC) that overlap [start, end)."""
    months: list[str] = []
    month = period_of(start)
    last = period_of(end - timedelta(microseconds=1))
    while True:
        months.append(month)
        if month >= last:
            return months
        year, number = int(month[:4]), int(month[5:])
        month = f"{year + number // 12}-{number % 12 + 1:02d}"


async def meters_of_live_plans(conn: Connection | Database) -> dict[str, list[str]]:
    """meter -> the plan versions (``code vN``) of subscriptions not canceled that charge it (a catalogue version
    must keep these meters: ``catalog_view.check_meters_kept``). An ``incomplete`` subscription counts: its
    activation makes it live on the version it was sold."""
    rows = await conn.fetch(
        "SELECT DISTINCT p.code, p.version, p.content FROM account_subscriptions s JOIN plan_versions p "
        "ON p.code = s.plan_code AND p.version = s.plan_version WHERE s.status <> 'canceled'")
    meters: dict[str, list[str]] = {}
    for row in sorted(rows, key=lambda r: (r["code"], int(r["version"]))):
        for charge in json.loads(row["content"]).get("charges") or []:
            plans = meters.setdefault(charge["meter"], [])
            if f"{row['code']} v{row['version']}" not in plans:
                plans.append(f"{row['code']} v{row['version']}")
    return meters


def subscription_uuid(value: str) -> UUID:
    return UUID(value)

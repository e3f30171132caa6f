"""Rating: prices each accepted usage event in real time and asks the ledger to post the charge.

The charge of an event is price(cumulative quantity of the period after it) - price(before it), so
graduated, volume and stairstep prices stay exact mid-period, and the increments of a period always add up
to the price of its total. Each decision is stored with its inputs (event id, catalogue version, quantities
before/after, price spec) together with the ledger command it produced, in one transaction with the
period totals. A redelivered event finds its decision and re-publishes the same command (same id, so the
ledger refuses it if it already has it): exactly-once without Kafka transactions.

Throughput (docs/rating.md, "Performance"): one handler call rates a whole Kafka poll (up to 2,000 events)
in one transaction with a fixed number of statements whatever the batch size: the subscriptions, closed
periods and running totals of the batch's accounts (totals only of the periods the batch touches), prior
decisions by primary key (on PostgreSQL only when the optimistic first attempt met one, see
``handle_accepted``), one ``COPY`` of the decisions streamed while they are made, one upsert of the totals.
Per event, the hot path avoids pydantic (``billing_rating.codec``: same checks, same bytes) and everything
that only depends on the batch (the clock) or on the price (its JSON dump) is computed once.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from billing_events import ids, topics
from billing_events.messages import LedgerEvent, RejectReason, UsageRejection
from billing_events.money import RATING_CONTEXT, MoneyError, to_subunits
from billing_events.timeutil import utcnow
from billing_rating import repricing
from billing_rating.aggregation import GROUP_SEPARATOR, REAL_TIME, contribution, group_key, matches, period_of
from billing_rating.catalog_view import CatalogView, MeterView, build_view
from billing_rating.charge_models import PriceSpecError, parse_spec
from billing_rating.close import (
    CLOSE_SCHEMA,
    CloseLine,
    ClosePricing,
    billed_price_at,
    close_account_period,
    close_command,
    counted_decisions,
    meter_quantity,
)
from billing_rating.codec import (
    Event,
    Usage,
    debit_command_json,
    decode_accepted,
    timestamp_text,
    usage_command_id,
)
from billing_rating.pricing import (
    TOKEN_CLASSES,
    ai_token_price,
    incremental_charge,
    is_per_event,
    period_charge,
)
from billing_rating.refusals import REFUSALS_SCHEMA, REFUSED, apply_refusal
from billing_rating.subscriptions import (
    LIVE,
    TRIAL_ENDED_UNCONVERTED,
    AccountSubscription,
    already_applied,
    apply_event,
    ended_periods,
    load_for,
    load_subscription,
    load_subscriptions,
    record_ended_period,
    record_restarted_period,
    time_zone_of,
    usage_lines_command,
)
from billing_rating.subscriptions import SCHEMA as SUBSCRIPTIONS_SCHEMA
from billing_rating.text import decimal_text, subunits_text
from billing_runtime.bus import Bus, OutMessage, Record, header
from billing_runtime.db import Connection, Database, is_unique_violation
from billing_runtime.logging import get_logger
from pydantic import ValidationError

log = get_logger(__name__)

# The schema header of each topic rating publishes to (a re-published stored decision carries it too).
SCHEMA_HEADERS = {topics.LEDGER_COMMANDS: (("schema", b"ledger.command/v1"),),
                  topics.USAGE_REJECTED: (("schema", b"usage.rejected/v1"),)}

# Decisions of events that were refused and counted in no total: a correction of one is refused too.
# ``refused``: the ledger refused its debit (a ``block`` overage policy, ``billing_rating.refusals``).
REFUSED_DECISIONS = frozenset({"period_closed", "no_price", "invalid_correction", "unknown_correction", REFUSED})
# The decision of an event (or of a correction) that the meter's property filters left out: it counted in no
# total, so a correction of it that passes the filters counts as a fresh event of its own quantity.
FILTERED = "filtered"

# The ledger's event of a usage debit it refused (a ``block`` overage policy): rating takes its usage back.
USAGE_REJECTED = "BillingAccount.UsageRejected"

# A period's last instant is its end less this (periods are [start, end), to the microsecond).
LAST_INSTANT = timedelta(microseconds=1)

# ``rated_events.amount_subunits`` and the ledger's amounts are signed 64-bit integers (docs/money.md).
AMOUNT_MIN, AMOUNT_MAX = -(2**63), 2**63 - 1

# What pricing one event may raise on that event's own data (a price it cannot read, a quantity or token count it
# cannot take, a charge no amount holds): that event is refused with a dead letter (``UnpriceableEvent``), the rest of
# its batch is rated. Anything else (the database, the bus, a bug) still fails the batch, which is retried.
PRICING_ERRORS = (PriceSpecError, MoneyError, ArithmeticError)


class UnpriceableEvent(Exception):
    """One event of a batch that rating cannot price: the batch is rated again with it refused (``no_price``)."""

    def __init__(self, key: tuple[str, str], detail: str) -> None:
        super().__init__(detail)
        self.key, self.detail = key, detail

# Token counts of an AI usage event: properties ``input_tokens``, ``output_tokens``, ``cached_input_tokens``.
TOKEN_PROPERTIES = {f"{c}_tokens": c for c in TOKEN_CLASSES}

SCHEMA = """
CREATE TABLE IF NOT EXISTS catalog (id INTEGER PRIMARY KEY, version INTEGER NOT NULL, document TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS plan_versions (
    code TEXT NOT NULL, version INTEGER NOT NULL, content TEXT NOT NULL, PRIMARY KEY (code, version));
CREATE TABLE IF NOT EXISTS period_totals (
    account_id TEXT NOT NULL, meter TEXT NOT NULL, period TEXT NOT NULL, quantity TEXT NOT NULL,
    PRIMARY KEY (account_id, meter, period));
CREATE TABLE IF NOT EXISTS rated_events (
    account_id TEXT NOT NULL, event_id TEXT NOT NULL, tenant TEXT NOT NULL, meter TEXT NOT NULL,
    period TEXT NOT NULL, group_key TEXT NOT NULL, event_time TEXT NOT NULL, quantity TEXT NOT NULL,
    value TEXT, quantity_before TEXT NOT NULL, quantity_after TEXT NOT NULL,
    amount_subunits BIGINT NOT NULL, unit TEXT, catalog_version INTEGER NOT NULL,
    decision TEXT NOT NULL, output_topic TEXT, output TEXT, rated_at TEXT NOT NULL,
    corrects TEXT, effective_quantity TEXT,
    PRIMARY KEY (account_id, event_id));
CREATE INDEX IF NOT EXISTS rated_events_period ON rated_events (period, account_id, meter);
CREATE INDEX IF NOT EXISTS rated_events_account_time ON rated_events (account_id, event_time);
"""


class CatalogBehind(RuntimeError):
    """Ingest validated against a newer catalogue than rating has seen yet: retry, never mis-rate."""


class RatingService:
    def __init__(self, db: Database, bus: Bus) -> None:
        self.db = db
        self.bus = bus
        self.catalog = CatalogView()
        # (plan code, plan version, meter) -> the charge's parsed spec and its JSON form (a decision's input).
        self._plan_specs: dict[tuple[int, str, int, str], tuple[Any, dict[str, Any]]] = {}

    async def setup(self) -> None:
        await self.db.executescript(SCHEMA + CLOSE_SCHEMA + SUBSCRIPTIONS_SCHEMA  # type: ignore[attr-defined]
                                    + repricing.SCHEMA + REFUSALS_SCHEMA)
        await self._load_catalog()

    async def _load_catalog(self) -> None:
        row = await self.db.fetchrow("SELECT version, document FROM catalog WHERE id = 1")
        history = {
            (r["code"], int(r["version"])): json.loads(r["content"])
            for r in await self.db.fetch("SELECT code, version, content FROM plan_versions")
        }
        if row:
            self.catalog = build_view(int(row["version"]), json.loads(row["document"]), history)
            self._plan_specs = {}

    async def handle_ledger_events(self, records: list[Record]) -> None:
        changed = False
        outputs: list[OutMessage] = []
        for record in records:
            event_type = header(record, "type")
            if event_type is not None and not event_type.startswith(
                    (b"Subscription.", b"Catalog.Published", USAGE_REJECTED.encode())):
                continue  # usage debits and the like: nothing rating follows (see the relay's ``type`` header)
            event = LedgerEvent.model_validate_json(record.value)
            if event.type == USAGE_REJECTED:
                # A debit the ledger refused (``block``): its usage leaves the running totals (``refusals``).
                async with self.db.transaction() as conn:
                    outputs.extend(await apply_refusal(conn, self.db.dialect, self.catalog, event))
                continue
            if event.type.startswith("Subscription."):
                async with self.db.transaction() as conn:
                    # Usage of the account rated before this event that it prices otherwise is repriced first (the
                    # give-backs and charges go before any close debit or usage lines of the same event). A
                    # redelivered event (not newer than the subscription's last) sends what its repricing sent.
                    reprices = await self._repricing_target(conn, event)
                    stale = repricing.may_reprice(event) and await already_applied(conn, event)
                    ended = await apply_event(conn, event, self.db.dialect)
                    if stale:
                        outputs.extend(await repricing.sent_before(conn, repricing.cause_of(event)))
                    elif reprices is not None:
                        outputs.extend(await self._reprice(conn, event, *reprices))
                    if ended is not None and event.type == "Subscription.Changed":
                        outputs.extend(await self._period_restarted(conn, ended))
                    elif ended is not None:
                        if event.type == "Subscription.Canceled":
                            # A cut of a trial: usage at or after the trial's end rated before this event (placed
                            # in the periods the conversion would start) is closed first, as for an unconverted
                            # end; its close debits go before the cut's usage lines finalize the final draft.
                            outputs.extend(await self._trial_ended_unconverted(conn, str(event.aggregate_id),
                                                                               cut=ended))
                        outputs.extend(await self._period_ended(conn, ended))
                    elif event.type == "Subscription.Canceled" and event.data.get("reason") == TRIAL_ENDED_UNCONVERTED:
                        outputs.extend(await self._trial_ended_unconverted(conn, str(event.aggregate_id)))
                continue
            if event.type != "Catalog.Published":
                continue
            version = int(event.data["version"])
            if version <= self.catalog.version:
                continue
            document = event.data["document"]
            async with self.db.transaction() as conn:
                await conn.execute(
                    "INSERT INTO catalog (id, version, document) VALUES (1, $1, $2) ON CONFLICT (id) DO UPDATE "
                    "SET version = excluded.version, document = excluded.document", version, json.dumps(document))
                for plan in document.get("plans", []):
                    content = {k: v for k, v in plan.items() if k != "version"}
                    await conn.execute(
                        "INSERT INTO plan_versions (code, version, content) VALUES ($1, $2, $3) "
                        "ON CONFLICT (code, version) DO NOTHING", plan["code"], int(plan["version"]),
                        json.dumps({**content, "version": plan["version"]}))
            changed = True
        if changed:
            await self._load_catalog()
            log.info("catalog_loaded", version=self.catalog.version, meters=len(self.catalog.meters))
        await self.bus.publish(outputs)

    async def _period_ended(self, conn: Connection, ended: AccountSubscription) -> list[OutMessage]:
        """Closes the ended period (primary subscription only) and builds its usage lines for the invoice.

        The close debits go first: on the account's partition the ledger posts them before the usage lines
        finalize the invoice. A redelivered ``PeriodEnded`` (or ``Canceled``) finds the period closed and sends
        the same commands again (same ids: the ledger refuses them the second time).

        An immediate cancel (``Canceled``) ends the period too: the subscription is no longer live, so it is
        put back among the live ones as it was (its status before the cancel, ordered by its start) to decide
        whether it was the primary one and to price the close as real-time rating did.
        """
        row = await conn.fetchrow("SELECT account_id, tenant FROM account_subscriptions WHERE subscription_id = $1",
                                  ended.subscription_id)
        assert row is not None
        account, tenant = row["account_id"], row["tenant"]
        catalog = self.catalog
        live = (await load_for(conn, [account])).get(account, [])
        if all(sub.subscription_id != ended.subscription_id for sub in live):
            live = sorted([*live, ended], key=lambda sub: (sub.started_at, sub.subscription_id))
        primary = live[0].subscription_id == ended.subscription_id
        outputs: list[OutMessage] = []
        closed: list[CloseLine] = []
        if primary:
            last = ended.period_end - LAST_INSTANT
            closed = await close_account_period(conn, catalog, ended.period_start.isoformat(), account, tenant,
                                                lambda meter: self._close_pricing(catalog, live, meter, last,
                                                                                  ended.period_start))
            await record_ended_period(conn, account, ended)
            zone = await time_zone_of(conn, ended.subscription_id)
            outputs.extend(c for c in (close_command(catalog, account, line, zone) for line in closed) if c is not None)
        names = {code: {"name": m.definition.name, "unit_of_measure": m.definition.unit_of_measure}
                 for code, m in catalog.meters.items()}
        outputs.append(await usage_lines_command(conn, ended, tenant, account, names, primary, closed))
        return outputs

    async def _period_restarted(self, conn: Connection, cut: AccountSubscription) -> list[OutMessage]:
        """A change restarted the primary subscription's period (a cadence change): the part before the change
        (``cut``, ending at the restart) is closed now at the prices it was rated at (the plan before the
        change) and its usage goes on the next renewal invoice, with the period it restarted into
        (``record_restarted_period``); events of it arriving later follow the late policy. The ledger's change
        invoice is final at once and takes no usage lines.
        """
        row = await conn.fetchrow("SELECT account_id, tenant FROM account_subscriptions WHERE subscription_id = $1",
                                  cut.subscription_id)
        assert row is not None
        account, tenant = row["account_id"], row["tenant"]
        catalog = self.catalog
        live = (await load_for(conn, [account])).get(account, [])
        if not live or live[0].subscription_id != cut.subscription_id:
            return []  # usage is billed by the primary subscription's periods only
        before = [cut if sub.subscription_id == cut.subscription_id else sub for sub in live]
        last = cut.period_end - LAST_INSTANT
        closed = await close_account_period(conn, catalog, cut.period_start.isoformat(), account, tenant,
                                            lambda meter: self._close_pricing(catalog, before, meter, last,
                                                                              cut.period_start))
        await record_restarted_period(conn, account, cut)
        zone = await time_zone_of(conn, cut.subscription_id)
        return [c for c in (close_command(catalog, account, line, zone) for line in closed) if c is not None]

    async def _trial_ended_unconverted(self, conn: Connection, subscription_id: str,
                                       cut: AccountSubscription | None = None) -> list[OutMessage]:
        """A trial ended without a payment method (the ledger's ``Canceled``, reason
        ``trial_ended_without_payment_method``): no billed period follows it, but usage at or after the trial's
        end that reached rating before this event was rated into the periods a conversion would have started
        (``AccountSubscription.period_ahead``), at the plan's price. The event's repricing (``_reprice``, run
        first) moves it out, as for an account without the subscription; those periods are closed now with what
        could not be moved (max, last, unique_count priced as real-time rating priced the rest: the plan's charge,
        the subscription counted as it was, its usage not trial usage), so nothing of them stays open; no invoice
        takes usage lines (the ledger drafts none): their overage stays on the account under their keys, like
        the overage of any account without a live subscription (docs/rating.md). A redelivered ``Canceled``
        finds them closed and sends the same close debits again (same ids). An immediate cancel that ``cut`` the
        trial's period (it starts before the trial's end: no ``TrialConverted`` moved it) closes them the same way,
        before its cut (``handle_ledger_events``), also when redelivered; a converted one's cut closes nothing here.
        """
        found = await load_subscription(conn, subscription_id)
        if found is None:
            return []
        account, tenant, ended = found
        if cut is not None and (ended.trial_end is None or cut.period_start >= ended.trial_end):
            return []
        trial = replace(ended, status="trialing")  # as real-time rating saw it
        others = [sub for sub in (await load_for(conn, [account])).get(account, [])
                  if sub.subscription_id != subscription_id]
        live = sorted([*others, trial], key=lambda sub: (sub.started_at, sub.subscription_id))
        if live[0].subscription_id != trial.subscription_id:
            return []  # usage follows the primary subscription's periods only: none was placed after this trial
        starts = {start.isoformat(): start for start in trial.periods_after_trial()}
        if not starts:
            return []
        keys = list(starts)
        rows = await conn.fetch(
            f"SELECT DISTINCT period FROM rated_events WHERE account_id = $1 AND period IN "
            f"({', '.join(f'${i + 2}' for i in range(len(keys)))})", account, *keys)
        catalog = self.catalog
        outputs: list[OutMessage] = []
        zone = trial.time_zone
        for key in sorted((r["period"] for r in rows), key=lambda k: starts[k]):
            closed = await close_account_period(  # priced at the period's start: at or after the trial's end
                conn, catalog, key, account, tenant,
                lambda meter, at=starts[key]: self._close_pricing(catalog, live, meter, at))
            outputs.extend(c for c in (close_command(catalog, account, line, zone) for line in closed) if c is not None)
        return outputs

    def _close_pricing(self, catalog: CatalogView, subs: list[AccountSubscription], meter: MeterView,
                       moment: datetime, start: datetime | None = None) -> ClosePricing | None:
        """The plan price of ``meter`` at close, resolved as in real time (``None``: the list price); trial
        usage (free) when the pricing subscription is in its trial at ``moment``, the closed period's last
        instant (the status it had at its end, whenever the ledger's ``TrialConverted`` reached rating).

        With the period's ``start``: the prices real time used before each plan change of the period
        (``ClosePricing.earlier``), which its close line keeps for the late events and corrections of the period."""
        pricing = self._pricing(catalog, subs, meter, moment) if subs and meter.ai_table is None else None
        earlier: list[dict[str, Any]] = []
        if start is not None and subs and meter.ai_table is None:
            changes = sorted({until for sub in subs for until, _, _ in sub.plans if start < until <= moment})
            for until in changes:
                before = self._pricing(catalog, subs, meter, until - LAST_INSTANT)
                if before is None:
                    price, included, priced_by = meter.definition.price, meter.definition.included, "list_price"
                else:
                    price, included, priced_by = before[4], before[1], "plan"
                earlier.append({"until": until.isoformat(), "price": price, "included": decimal_text(included),
                                "priced_by": priced_by})
        if pricing is None:
            if not earlier or meter.spec is None:
                return None
            # No plan charges the meter at the period's end, one did before a change: the list price from then on.
            definition = meter.definition
            return ClosePricing(meter.spec, definition.included, False, definition.price, tuple(earlier), "list_price")
        spec, included, _, trialing, price_json = pricing
        return ClosePricing(spec, included, trialing, price_json, tuple(earlier))

    def _pricing(self, catalog: CatalogView, subs: list[AccountSubscription], meter: MeterView, moment: datetime
                 ) -> tuple[Any, Decimal, str, bool, dict[str, Any]] | None:
        """(spec, pooled allowance, overage policy, trial usage, spec as JSON) from the plans of live subscriptions
        started by ``moment``; trial usage: the pricing subscription is in its trial at ``moment``
        (``AccountSubscription.in_trial``)."""
        chosen = None
        included = Decimal(0)
        for sub in subs:
            # The plan in force at ``moment`` (``plan_at``: a change's old plan before its ``at``).
            code, version = sub.plan_at(moment) if sub.plans else (sub.plan_code, sub.plan_version)
            plan = catalog.plans.get((code, version))
            if plan is None or sub.start > moment:  # not started at ``moment``: its usage is priced as without it
                continue
            for charge in plan.charges:
                if charge.meter != meter.code:
                    continue
                included = RATING_CONTEXT.add(included, charge.included)
                if chosen is None:
                    chosen = (sub, charge, code, version)
        if chosen is None:
            return None
        sub, charge, code, version = chosen
        key = (catalog.version, code, version, meter.code)
        cached = self._plan_specs.get(key)
        if cached is None:
            spec = parse_spec(charge.price, credit_scales=_credit_scales(catalog))
            cached = (spec, spec.model_dump(mode="json"))  # dumped once per catalogue, not per event
            self._plan_specs[key] = cached
        return cached[0], included, charge.overage_policy, sub.in_trial(moment), cached[1]

    async def _repricing_target(self, conn: Connection, event: LedgerEvent
                                ) -> tuple[str, str, datetime, list[AccountSubscription]] | None:
        """(account, tenant, the instant from which it prices otherwise: ``repricing.since``, the account's live
        subscriptions before the event: what its usage was rated with) whose usage ``event`` may reprice, locked
        against usage batches of the account (``repricing.lock_account``) before anything else of the event is read or
        written; else None. Read before the event is applied (a ``Canceled``: whether the subscription was live)."""
        if not repricing.may_reprice(event):
            return None
        if event.type == "Subscription.Started":
            moment = repricing.since(event)
            tenant = str(event.data["tenant"])
            account = str(ids.account_id(tenant))
        else:
            found = await load_subscription(conn, str(event.aggregate_id))
            if found is None:
                return None
            account, tenant, sub = found
            moment = repricing.since(event, sub.status in LIVE, sub.trial_end)
        if moment is None:
            return None
        await repricing.lock_account(conn, self.db.dialect, account)
        rated_with = (await load_subscriptions(conn, [account], self.db.dialect))[0].get(account, [])
        return account, tenant, moment, rated_with

    async def _reprice(self, conn: Connection, event: LedgerEvent, account: str, tenant: str, moment: datetime,
                       rated_with: list[AccountSubscription]) -> list[OutMessage]:
        """Reprices the usage of ``account`` at or after ``moment`` (``event``'s instant) that rating decided before
        it learnt of ``event`` and that it now places in another period or prices otherwise
        (``billing_rating.repricing``): a give-back in the period it was rated in, at that price, and a charge in the
        period and at the price resolved now, as decisions of their own; returns their commands, after the events'
        own commands sent again."""
        cause = repricing.cause_of(event)
        dialect = self.db.dialect
        # Only the decisions a repricing can move: of events at or after its instant (``rated_events_account_time``;
        # corrections and repricings carry their event's time), never the account's earlier periods.
        rows = await conn.fetch(f"SELECT {', '.join(RATED_COLUMNS)} FROM rated_events WHERE account_id = $1 "
                                f"AND event_time >= $2", account, repricing.time_floor(moment))
        chains = repricing.chains_since(rows, moment)
        if not chains:
            return []
        batch = _BatchState(dialect, utcnow())
        batch.catalog = self.catalog
        batch.subscriptions, _ = await load_subscriptions(conn, [account], dialect)
        batch.rated_with = {account: rated_with}  # the give-backs' plan changes (``floored``): as the usage was rated
        batch.ended = await ended_periods(conn, [account], dialect)
        batch.closed = {(account, r["period"]) for r in await conn.fetch(
            "SELECT period FROM closed_periods WHERE account_id = $1", account)}
        closed = sorted({(account, c.latest["period"]) for c in chains} & batch.closed)
        if closed:
            await batch._load_close_lines(conn, closed)
        moves = [m for m in (self._move(batch, account, chain) for chain in chains) if m is not None]
        if not moves:
            return []
        batch.periods = {(account, period) for m in moves for period in (m.old_period, m.new_period)}
        await batch._load_totals(conn)
        await batch._load_charged_before_changes(conn)
        # The events' own commands go again first: on the account's partition the ledger then has each debit before
        # its give-back, even when the batch that rated it has not published it yet (same ids: posted once).
        resent = [row for move in moves for row in move.chain.commands()]
        # Out of the old periods, the last added first (each gives back what it added on top of those before it:
        # the latest rated, and of decisions rated together the one that took its meter's total the highest), then
        # into the new ones in the order the events happened; give-back before charge in each event's history.
        gave_back = [m for m in sorted(moves, key=repricing.added_last, reverse=True)
                     if self._give_back(batch, m, cause, batch.rated_at)]
        charged_at = (batch.now + LAST_INSTANT).isoformat()
        for move in sorted(gave_back, key=lambda m: (m.chain.moment, m.chain.rows[0]["rated_at"], m.chain.event_id)):
            self._charge_again(batch, move, cause, charged_at)
        await conn.copy_records("rated_events", RATED_COLUMNS, batch.rows)
        await batch.save_totals(conn)
        sent = [*resent, *({"event_id": row[1], "output_topic": row[15], "output": row[16]} for row in batch.rows
                           if row[15] is not None)]
        await repricing.record_sent(conn, cause, account, [row["event_id"] for row in sent])
        log.info("usage_repriced", account=account, cause=cause, events=len(gave_back))
        return [OutMessage(row["output_topic"], account, row["output"].encode(), SCHEMA_HEADERS[row["output_topic"]])
                for row in sent]

    def _move(self, batch: _BatchState, account: str, chain: repricing.Chain) -> repricing.Move | None:
        """Where and at what price ``chain``'s event is rated now, when that is not where and how it was rated."""
        latest = chain.latest
        meter = batch.catalog.meters.get(latest["meter"])
        if latest["decision"] not in repricing.MOVABLE or meter is None or meter.error:
            return None  # refused, filtered, or late (priced in its own period, closed: that stands)
        definition = meter.definition
        counted = contribution(definition, chain.quantity)
        if latest["corrects"] and chain.quantity == 0 or definition.aggregation in REAL_TIME and counted == 0:
            return None  # voided, or counting nothing: nothing to move
        moment = chain.moment
        subs = batch.subscriptions.get(account)
        old_period, new_period = latest["period"], _period(subs, batch.ended.get(account), moment)
        if (account, new_period) in batch.closed:
            return None  # its period was invoiced as it was rated: it stays so
        if definition.aggregation not in REAL_TIME or meter.ai_table is not None:
            # Priced at its period's close, or by the meter's own token prices whatever the plan: only its period may
            # change (a close-priced meter's not out of a closed period: that close billed it).
            if new_period == old_period or definition.aggregation not in REAL_TIME and (
                    account, old_period) in batch.closed or meter.ai_table is not None and chain.payload() is None:
                return None
            return repricing.Move(chain, meter, old_period, new_period, counted, None, None)
        payload = chain.payload()
        old = self._recorded_price(batch, account, chain, payload) if payload is not None else None
        new = self._price_now(batch.catalog, subs, meter, moment)
        if old is None or new is None:
            return None
        if new_period == old_period and (old.trial and new.trial or not old.trial and not new.trial and (
                old.inputs["price"], old.included) == (new.inputs["price"], new.included)):
            return None
        return repricing.Move(chain, meter, old_period, new_period, counted, old, new)

    def _recorded_price(self, batch: _BatchState, account: str, chain: repricing.Chain, payload: dict[str, Any]
                        ) -> repricing.Price | None:
        """The price ``chain``'s event was rated at (its latest debit's inputs); in a closed period the price and
        allowance its close line billed, as a late correction is priced."""
        latest, cause = chain.latest, payload["cause"]
        price, included, priced_by = cause.get("price"), cause.get("included"), cause.get("priced_by")
        billed = batch.close_lines.get((account, latest["period"], latest["meter"], latest["group_key"]))
        if billed is not None and billed.get("price") is not None:
            price, included, priced_by, _ = billed_price_at(billed, chain.moment)
        if price is None or included is None:
            return None
        try:
            spec = parse_spec(price, credit_scales=_credit_scales(batch.catalog))
        except PriceSpecError as exc:
            log.error("repricing_skipped", event_id=chain.event_id, error=str(exc))
            return None
        return repricing.Price(spec, Decimal(included), latest["decision"] == "trial", {
            "price": price, "included": decimal_text(Decimal(included)),
            "overage_policy": cause.get("overage_policy", payload.get("overage_policy")), "priced_by": priced_by})

    def _price_now(self, catalog: CatalogView, subs: list[AccountSubscription] | None, meter: MeterView,
                   moment: datetime) -> repricing.Price | None:
        """The price real-time rating resolves for ``meter``'s usage at ``moment`` (as ``_rate``)."""
        plan = self._pricing(catalog, subs, meter, moment) if subs else None
        definition = meter.definition
        if plan is not None:
            spec, included, overage_policy, trialing, price = plan
        else:
            spec, included, overage_policy, trialing, price = (
                meter.spec, definition.included, definition.overage_policy, False, definition.price)
        if spec is None:
            return None
        return repricing.Price(spec, included, trialing, {
            "price": price, "included": decimal_text(included), "overage_policy": overage_policy,
            "priced_by": "plan" if plan is not None else "list_price"})

    def _give_back(self, batch: _BatchState, move: repricing.Move, cause: str, rated_at: str) -> bool:
        """Takes ``move``'s event out of the period it was rated in: its decision (quantity 0), and for a real-time
        meter the debit of the difference it made to that period's price, at the price it was rated at (a closed
        period: named as a late correction, so the ledger credits the invoice that billed it)."""
        chain, latest, old = move.chain, move.chain.latest, move.old
        account, tenant, code, group, period = (latest["account_id"], latest["tenant"], latest["meter"],
                                                latest["group_key"], move.old_period)
        out_id = repricing.repriced_id(chain.event_id, "out", cause)
        if old is None and move.meter.ai_table is None:  # priced at close: its new period's close counts it, not this
            batch.rows.append((account, out_id, tenant, code, period, group, latest["event_time"], "0", latest["value"],
                               "0", "0", 0, None, batch.catalog.version, "deferred_to_close", None, None, rated_at,
                               chain.event_id, "0"))
            return True
        payload = chain.payload()
        assert payload is not None
        key = f"{code}{GROUP_SEPARATOR}{group}" if group else code
        inputs: dict[str, Any]
        if old is None:  # AI tokens: each token class's running total, priced by the meter's table
            gone = self._ai_give_back(batch, account, key, period, move.meter, payload["cause"])
            if gone is None:
                log.error("repricing_skipped", event_id=chain.event_id, period=period)
                return False
            amount, before, after, inputs = gone
        else:
            before = batch.meter_total(account, code, period)
            after = RATING_CONTEXT.subtract(before, move.counted)
            group_after = RATING_CONTEXT.subtract(batch.total(account, key, period), move.counted)
            if after < 0 or group_after < 0:  # its period does not hold it (never expected): neither out nor in
                log.error("repricing_skipped", event_id=chain.event_id, period=period, total=decimal_text(before))
                return False
            batch.set_total(account, key, period, group_after)
            billed = batch.close_lines.get((account, period, code, group)) if (account, period) in batch.closed \
                else None
            if old.trial:
                amount = 0
            elif is_per_event(old.spec):  # the fee of its own transaction, at its place in the period's free volume
                amount = -incremental_charge(old.spec, after, before, old.included)
            elif billed is not None and billed.get("price") is not None:  # the plan changes its close line kept
                amount = -batch.floored_since(account, code, period, billed_price_at(billed, chain.moment)[3],
                                              period_charge(old.spec, after, old.included),
                                              period_charge(old.spec, before, old.included))
            else:
                amount = -batch.floored(account, code, period, chain.moment,
                                        period_charge(old.spec, after, old.included),
                                        period_charge(old.spec, before, old.included), batch.rated_with.get(account))
            inputs = old.inputs
        batch.charged_at(account, code, period, chain.moment, amount)
        late = (account, period) in batch.closed
        given = {k: v for k, v in payload["cause"].items()
                 if k not in ("group_old", "quantity_old_uncounted", "late", "original_period")}
        given.update(inputs, quantity_before=decimal_text(before), quantity_after=decimal_text(after),
                     contribution=decimal_text(-move.counted), corrects=chain.event_id,
                     quantity_old=decimal_text(chain.quantity), quantity_new="0",
                     repriced={"by": cause, "as": "give_back"},
                     **({"late": "late", "original_period": period} if late else {}))
        value = debit_command_json(usage_command_id(tenant, out_id), tenant, batch.now, batch.now_json,
                                   {**payload, "amount_subunits": amount, "amount": _amount_text(amount), "cause": given})
        decision = "trial" if old is not None and old.trial else "late:priced" if late else "priced"
        batch.rows.append((account, out_id, tenant, code, period, group, latest["event_time"], "0", latest["value"],
                           decimal_text(before), decimal_text(after), amount, payload["unit"], batch.catalog.version,
                           decision, topics.LEDGER_COMMANDS, value.decode(), rated_at, chain.event_id, "0"))
        return True

    @staticmethod
    def _ai_give_back(batch: _BatchState, account: str, key: str, period: str, meter: MeterView,
                      cause: dict[str, Any]) -> tuple[int, Decimal, Decimal, dict[str, Any]] | None:
        """An AI token event out of ``period``'s running totals (per model and token class, as ``_rate_ai`` added it):
        (amount, tokens before, after, the debit's inputs), or None when they do not hold it."""
        assert meter.ai_table is not None
        model, tokens = str(cause.get("model") or ""), cause.get("tokens") or {}
        before_counts = {c: batch.total(account, f"{key}|model={model}|{c}", period) for c in tokens}
        after_counts = {c: RATING_CONTEXT.subtract(before_counts[c], Decimal(str(n))) for c, n in tokens.items()}
        if not tokens or any(n < 0 for n in after_counts.values()):
            return None
        for token_class, total in after_counts.items():
            batch.set_total(account, f"{key}|model={model}|{token_class}", period, total)
        amount = (to_subunits(ai_token_price(meter.ai_table, model, after_counts).amount)
                  - to_subunits(ai_token_price(meter.ai_table, model, before_counts).amount))
        inputs = {"ai_prices": meter.definition.ai_prices, "model": model, "tokens": dict(tokens),
                  "tokens_before": {c: decimal_text(v) for c, v in before_counts.items()}}
        return amount, sum(before_counts.values(), Decimal(0)), sum(after_counts.values(), Decimal(0)), inputs

    def _charge_again(self, batch: _BatchState, move: repricing.Move, cause: str, rated_at: str) -> None:
        """Counts ``move``'s event in the period rating places it in now, and for a real-time meter debits the
        difference it makes to that period's price at the price resolved now (a trial: 0)."""
        chain, latest, new = move.chain, move.chain.latest, move.new
        account, tenant, code, group, period = (latest["account_id"], latest["tenant"], latest["meter"],
                                                latest["group_key"], move.new_period)
        in_id = repricing.repriced_id(chain.event_id, "in", cause)
        quantity = decimal_text(chain.quantity)
        if new is None and move.meter.ai_table is None:  # priced at close: its new period's close counts it
            batch.rows.append((account, in_id, tenant, code, period, group, latest["event_time"], quantity,
                               latest["value"], "0", "0", 0, None, batch.catalog.version, "deferred_to_close", None,
                               None, rated_at, chain.event_id, quantity))
            return
        key = f"{code}{GROUP_SEPARATOR}{group}" if group else code
        payload = chain.payload()
        assert payload is not None
        properties = payload["cause"].get("properties") or {}
        usage = Usage(account, Event(chain.event_id, tenant, code, chain.quantity, chain.moment, properties, None),
                      "repricing", batch.catalog.version)
        inputs: dict[str, Any]
        if new is None:  # AI tokens: added to the new period's totals per model and token class, as when rated
            amount, unit, before, after, inputs = self._rate_ai(batch, account, key, period, usage, move.meter)
        else:
            before = batch.meter_total(account, code, period)
            after = RATING_CONTEXT.add(before, move.counted)
            batch.set_total(account, key, period, RATING_CONTEXT.add(batch.total(account, key, period), move.counted))
            if new.trial:
                amount = 0
            elif is_per_event(new.spec):
                amount = incremental_charge(new.spec, before, after, new.included)
            else:
                amount = batch.floored(account, code, period, chain.moment, period_charge(new.spec, before,
                                       new.included), period_charge(new.spec, after, new.included))
            unit, inputs = new.spec.unit, new.inputs
        batch.charged_at(account, code, period, chain.moment, amount)
        inputs = {**inputs, "corrects": chain.event_id, "quantity_old": "0", "quantity_new": quantity,
                  "repriced": {"by": cause, "as": "charge"}}
        output = self._debit(batch, usage, unit, amount, move.meter, period, decimal_text(before),
                             decimal_text(after), decimal_text(move.counted), group, inputs,
                             command_id=usage_command_id(tenant, in_id))
        batch.rows.append((account, in_id, tenant, code, period, group, latest["event_time"], quantity,
                           latest["value"], decimal_text(before), decimal_text(after), amount, unit,
                           batch.catalog.version, "trial" if new is not None and new.trial else "priced", output.topic,
                           output.value.decode(), rated_at, chain.event_id, quantity))

    async def handle_accepted(self, records: list[Record]) -> None:
        """One batch, one transaction: a few set-wise reads, decisions in memory, then bulk writes.

        The decisions stream into one ``COPY`` as they are made (``_decide``), so PostgreSQL stores the
        first ones while the last ones are being rated: the write costs little more than its tail.

        ``COPY`` cannot say ``ON CONFLICT``, and needs not. An event met twice in one batch is decided once
        (the second meets the first's decision in ``batch.decided``). An event decided by an earlier batch
        (a redelivery) has its row already, under the primary key (account, event id): on PostgreSQL the
        batch is first rated *optimistically*, without looking its events up (2,000 index probes saved per
        batch), and a redelivered event makes the ``COPY`` fail on that key; the whole transaction rolls
        back (no total, no decision of it is kept) and the batch is rated again with the lookup, which finds
        the stored decisions and re-publishes them. Redeliveries are rare (a restart, a rebalance), so they
        pay one wasted attempt instead of every batch paying the lookup. SQLite (embedded, one writer) always
        looks up first.

        Partitions are keyed by account, so one consumer rates an account at a time; a consumer that lost
        its partitions and has not noticed yet (the only other writer possible) makes the same primary key
        refuse the transaction that comes second, as the former plain ``INSERT`` did, so totals computed from
        a stale read are never committed.
        """
        usages: list[Usage] = []
        for record in records:
            try:
                usages.append(decode_accepted(record.value))
            except ValidationError as exc:
                log.error("malformed_accepted_usage", offset=record.offset, error=str(exc)[:300])
        if not usages:
            return
        lookup = self.db.dialect != "postgres"
        # Events rating cannot price (``PRICING_ERRORS``), found one per attempt: each attempt rolls back whole and
        # the next refuses them with a dead letter. Bounded: each attempt refuses one more event of the batch.
        unpriceable: dict[tuple[str, str], str] = {}
        while True:
            try:
                outputs = await self._apply(usages, lookup=lookup, unpriceable=unpriceable)
                break
            except UnpriceableEvent as exc:
                log.warning("unpriceable_event_refused", account=exc.key[0], event_id=exc.key[1], error=exc.detail)
                unpriceable[exc.key] = exc.detail
            except Exception as exc:
                if lookup or not is_unique_violation(exc, "rated_events_pkey"):
                    raise
                log.info("redelivered_events_rated_again_with_lookup", events=len(usages))
                lookup = True
        await self.bus.publish(outputs)

    async def _apply(self, usages: list[Usage], *, lookup: bool,
                     unpriceable: dict[tuple[str, str], str] | None = None) -> list[OutMessage]:
        """Rates and stores the batch in one transaction; returns what to publish once it is committed.

        ``lookup=False`` assumes no event was decided before (the primary key checks it, see above).
        ``unpriceable``: events a former attempt could not price, refused with their reason (``no_price``).
        """
        outputs: list[OutMessage] = []
        async with self.db.transaction() as conn:
            # One catalogue for the whole batch, even if a newer one is loaded while the COPY waits for the
            # socket (the catalogue consumer runs then): the increments of one key chain on one price.
            catalog = self.catalog
            batch = await _BatchState.load(conn, self.db.dialect, usages, utcnow(), lookup=lookup, catalog=catalog)
            newest = max((u.catalog_version for u in batch.pending), default=0)
            if newest > catalog.version:  # before anything is decided: the whole batch waits
                raise CatalogBehind(f"event needs catalogue v{newest}, rating has v{catalog.version}")
            failed: list[Exception] = []
            if batch.pending:
                await conn.copy_records("rated_events", RATED_COLUMNS,
                                        self._decide(batch, usages, outputs, failed, unpriceable or {}))
            else:
                outputs.extend(o for o in (batch.decided[(u.account, u.event.id)] for u in usages) if o is not None)
            if failed:
                raise failed[0]  # the transaction rolls back: nothing of the batch is kept
            await batch.save_totals(conn)
        return outputs

    async def _decide(self, batch: _BatchState, usages: list[Usage], outputs: list[OutMessage],
                      failed: list[Exception], unpriceable: dict[tuple[str, str], str]
                      ) -> AsyncIterator[tuple[Any, ...]]:
        """Rates the batch in order, yielding each decision's row and collecting the messages to publish.

        An error ends the rows early (and is handed back in ``failed``) instead of escaping into the driver
        mid-``COPY``: the caller raises it once the statement is over, so the transaction rolls back cleanly.
        A pricing error of one event (``PRICING_ERRORS``) is handed back as ``UnpriceableEvent``: the batch is
        rated again with that event in ``unpriceable``, refused with a dead letter before anything of it is counted
        (pricing may have moved the batch's totals before it raised: the attempt is thrown away whole).
        """
        rows = batch.rows
        try:
            for usage in usages:
                key = (usage.account, usage.event.id)
                if key in batch.decided:  # decided before, or earlier in this batch: the same output again
                    stored = batch.decided[key]
                    if stored is not None:
                        outputs.append(stored)
                    continue
                refused = unpriceable.get(key)
                if refused is not None:
                    output = self._unpriceable(batch, usage, refused)
                else:
                    try:
                        output = (self._correct(batch, usage) if usage.event.correction_of
                                  else self._rate(batch, usage))
                    except PRICING_ERRORS as exc:
                        raise UnpriceableEvent(key, f"event {usage.event.id!r} of meter {usage.event.meter!r} "
                                                    f"cannot be priced: {exc}") from exc
                batch.decided[key] = output
                if output is not None:
                    outputs.append(output)
                if key[1] in batch.corrected and not usage.event.correction_of:
                    batch.original_from(rows[-1])  # corrected later in this very batch
                for row in rows:
                    yield row
                rows.clear()
        except Exception as exc:  # noqa: BLE001 - handed back, re-raised by the caller after the COPY
            failed.append(exc)

    def _rate(self, batch: _BatchState, usage: Usage, *, correction: tuple[str, Decimal, Decimal] | None
              = None, counted: bool = True, rated_in: str | None = None, group_old: str = "") -> OutMessage | None:
        """Rates one event; ``correction`` = (original id, old quantity, new quantity) for an amendment, rated in
        ``rated_in``, the period its original was rated in (``_correct``); ``counted``: whether the old quantity
        is in that period's total (not when the event was filtered out or voided: the correction then counts its
        own quantity, never a difference against nothing), in the ``group_by`` group ``group_old``: a correction
        whose properties put it in another group takes the old quantity out of that one and counts the new one in
        its own (the meter's total, which is priced, moves by the difference either way)."""
        event = usage.event
        account = usage.account
        catalog = batch.catalog
        subs = batch.subscriptions.get(account)
        if rated_in is None:
            period, late = batch.period_of(account, event.timestamp)
        else:
            period, late = rated_in, (account, rated_in) in batch.closed
        meter = catalog.meters.get(event.meter)
        decision_prefix = ""
        original_period = period
        if late:
            # The event's period is already invoiced: the meter's late policy decides (default next_period).
            policy = meter.definition.late_policy if meter is not None else "reject"
            if policy == "reject":
                rejection = self._rejection(batch, usage, RejectReason.PERIOD_CLOSED, f"period {period} is closed")
                batch.record(usage, batch.catalog.version, period, "", None, Decimal(0), Decimal(0), 0, None,
                             "period_closed", rejection)
                return rejection
            # A late event, like a late correction, stays in its own period: a real-time meter's priced on that
            # period's total and allowance at the price it was billed at, a close-priced meter's (max, last,
            # unique_count) as the difference it makes to the aggregate that period's close billed
            # (``_price_late_at_close``), named by ``original_period`` (the ledger draws it by its time from that
            # period's credit and bills what the credit leaves as that period's overage on the next renewal invoice),
            # so its price never depends on the open period's usage, nor changes the open period's aggregate.
            decision_prefix = "late_adjustment:" if policy == "adjust" else "late:"
        decision = "priced"
        amount = 0
        unit: str | None = None
        output: OutMessage | None = None
        before = after = Decimal(0)
        step = Decimal(0)  # what the event moves the meter's total by (``contribution``; a correction's difference)
        group = ""
        value: str | None = None
        inputs: dict[str, Any] = {}
        if meter is None or meter.error:
            decision = "no_price"
            detail = meter.error if meter else f"meter {event.meter!r} is not in catalogue v{batch.catalog.version}"
            output = self._rejection(batch, usage, RejectReason.NO_PRICE, detail or "no price")
        elif meter.definition.filters and not matches(meter.definition, event.properties):
            decision = FILTERED
            if correction is not None and counted:
                # The event it corrects counted: filtering the correction out would leave the old quantity in the
                # total while later corrections amend the new one. Refused (amends nothing); a void takes it back.
                decision = "invalid_correction"
                output = self._rejection(
                    batch, usage, RejectReason.INVALID_CORRECTION,
                    f"correction of {correction[0]!r} does not pass the filters of meter {event.meter!r} "
                    f"({', '.join(sorted(meter.definition.filters))}) though the event it corrects counted: send its "
                    f"properties, or a void (quantity 0) to take it back")
        else:
            definition = meter.definition
            group = group_key(definition, event.properties) if definition.group_by else ""
            if definition.value_property:
                value = str(event.properties.get(definition.value_property, "")) or None
            key = f"{event.meter}|{group}" if group else event.meter
            if definition.aggregation not in REAL_TIME and correction is not None and late:
                # Priced once, at the close that already billed the period: it is not priced again.
                decision = "period_closed"
                output = self._rejection(batch, usage, RejectReason.PERIOD_CLOSED,
                                         f"period {period} is closed and its {definition.aggregation} meter "
                                         f"{event.meter!r} was priced at its close: a correction cannot change it")
            elif definition.aggregation not in REAL_TIME and late:
                priced = self._price_late_at_close(batch, usage, meter, period, group, value)
                if isinstance(priced, OutMessage):
                    batch.record(usage, catalog.version, period, group, value, Decimal(0), Decimal(0), 0, None,
                                 "no_price", priced)
                    return priced
                amount, unit, before, after, inputs = priced
                step = after - before
            elif definition.aggregation not in REAL_TIME:
                decision = "deferred_to_close"
            elif meter.ai_table is not None and correction is not None:
                decision = "invalid_correction"
                output = self._rejection(batch, usage, RejectReason.INVALID_CORRECTION,
                                         "AI token events cannot be amended; send a compensating event")
            elif meter.ai_table is not None:
                try:
                    amount, unit, before, after, inputs = self._rate_ai(batch, account, key, period, usage, meter)
                    step = event.quantity  # a sum meter: the close adds the events' quantities, whatever the tokens
                except PriceSpecError as exc:
                    decision = "no_price"
                    output = self._rejection(batch, usage, RejectReason.NO_PRICE, str(exc))
            else:
                plan_pricing = self._pricing(catalog, subs, meter, event.timestamp) if subs else None
                if plan_pricing is not None:
                    spec, included, overage_policy, trialing, price_json = plan_pricing
                else:
                    spec, included, overage_policy, trialing = (
                        meter.spec, definition.included, definition.overage_policy, False)
                    price_json = definition.price
                priced_by = "plan" if plan_pricing is not None else "list_price"
                billed = None
                change = None  # a plan change of the closed period before the event (``floored_since``)
                if late:  # the price is the meter's: any of its lines has it, the original's (or its own) first
                    billed = batch.billed_line(account, period, event.meter, group_old, group)
                if billed is not None and billed.get("price") is not None:
                    # The price and allowance the closed period was billed at (whatever changed since: a plan
                    # change, a cancel, a new catalogue), so the difference is what that period's invoice billed:
                    # the price of the event's time in that period (its line keeps the prices before its plan changes).
                    price_json, included, priced_by, change = billed_price_at(billed, event.timestamp)
                    try:
                        spec = parse_spec(price_json, credit_scales=_credit_scales(catalog))
                    except PriceSpecError as exc:
                        rejection = self._rejection(batch, usage, RejectReason.NO_PRICE,
                                                    f"the price period {period} was billed at: {exc}")
                        batch.record(usage, catalog.version, period, group, value, Decimal(0), Decimal(0), 0, None,
                                     "no_price", rejection)
                        return rejection
                assert spec is not None
                per_event = is_per_event(spec)
                if per_event and correction is not None:
                    # A fee of one transaction (``percentage``: its fixed part, min and max apply per event): an
                    # amendment is no difference of a period total, and a give-back no transaction.
                    rejection = self._rejection(
                        batch, usage, RejectReason.INVALID_CORRECTION,
                        f"meter {event.meter!r} is priced per transaction ({spec.model}): its events cannot be "
                        f"amended or voided; send the transaction's own refund as the catalogue prices it")
                    batch.record(usage, catalog.version, period, group, value, Decimal(0), Decimal(0), 0, None,
                                 "invalid_correction", rejection)
                    return rejection
                # Two running totals: the group's (stored, what ``group_by`` attributes) and the meter's, the sum
                # of its groups, which is priced: the allowance and the tiers apply once per meter and period, as
                # the invoice shows the meter's quantity on one line, never once per group.
                total_key = (account, key, period)
                group_before = batch.total(account, key, period)
                before = batch.meter_total(account, event.meter, period)
                # A correction into another group (``group_old`` != ``group``): the old quantity leaves the original's
                # group (``moved``: its key and its total after), the new one counts in this one.
                moved: tuple[tuple[str, str, str], Decimal] | None = None
                below: tuple[str, Decimal, Decimal] | None = None  # (group key, its total, the step) gone below zero
                if correction is None:
                    step = contribution(definition, event.quantity)
                    group_after = RATING_CONTEXT.add(group_before, step)
                else:
                    _, old, new = correction
                    gained = contribution(definition, new) if new else Decimal(0)
                    lost = contribution(definition, old) if counted else Decimal(0)
                    step = gained - lost
                    if lost and group_old != group:
                        moved_key = (account, f"{event.meter}|{group_old}" if group_old else event.meter, period)
                        moved = (moved_key, RATING_CONTEXT.subtract(batch.total(*moved_key), lost))
                        if moved[1] < 0:  # the old group does not hold the old quantity: never priced
                            below = (moved_key[1], batch.total(*moved_key), -lost)
                        group_after = RATING_CONTEXT.add(group_before, gained)
                    else:
                        group_after = RATING_CONTEXT.add(group_before, step)
                if group_after < 0 and below is None:  # a correction taking back more than the total holds
                    below = (key, group_before, step)
                if below is not None:
                    rejection = self._rejection(
                        batch, usage, RejectReason.INVALID_CORRECTION,
                        f"correction of {correction[0] if correction else event.id!r} takes the total of meter "
                        f"{below[0]!r} in period {period} below zero ({decimal_text(below[1])} by "
                        f"{decimal_text(below[2])})")
                    batch.record(usage, catalog.version, period, group, value, Decimal(0), Decimal(0), 0, None,
                                 "invalid_correction", rejection)
                    return rejection
                after = RATING_CONTEXT.add(before, step)
                batch.totals[total_key] = group_after
                batch.dirty.add(total_key)
                if moved is not None:
                    batch.totals[moved[0]] = moved[1]
                    batch.dirty.add(moved[0])
                batch.meter_moved(account, event.meter, period, step)
                unit = spec.unit
                # The charge is period_charge(after) - period_charge(before) of the meter's total; the batch
                # remembers the last period_charge per meter so each event prices one cumulative quantity, not two.
                # Keyed by the price too: usage on each side of a plan change in one batch has its own.
                if per_event:
                    # Priced per transaction (pricing.incremental_charge): the fee of this event's amount, on its
                    # part above the period's free volume; a plan change floors nothing (no fee is cumulative).
                    amount = incremental_charge(spec, before, after, included)
                else:
                    charged_key = (account, event.meter, period, included, id(price_json))
                    charged_before = batch.charged.get(charged_key)
                    if charged_before is None or charged_before[0] != before:
                        charged_before = (before, period_charge(spec, before, included))
                    charged_after = period_charge(spec, after, included)
                    batch.charged[charged_key] = (after, charged_after)
                    # After a plan change in the period, what was charged before it counts as paid (``floored``); of
                    # a closed period, the changes its close line kept.
                    if billed is None:
                        amount = batch.floored(account, event.meter, period, event.timestamp, charged_before[1],
                                               charged_after)
                    else:
                        amount = batch.floored_since(account, event.meter, period, change, charged_before[1],
                                                     charged_after)
                # The same few keys for every event of a price: one dict per batch, shared (never mutated:
                # corrections and late events below build new ones).
                inputs_key = (id(price_json), included, overage_policy, priced_by == "plan")
                inputs = batch.inputs.get(inputs_key)  # type: ignore[assignment]
                if inputs is None:
                    inputs = batch.inputs[inputs_key] = {
                        "price": price_json, "included": decimal_text(included), "overage_policy": overage_policy,
                        "priced_by": priced_by}
                if trialing:
                    decision, amount = "trial", 0  # recorded, not charged: nothing is billed during a trial
                if correction is not None:
                    # ``quantity_old`` is what the event counted before (the monthly usage summary adds new - old);
                    # an event that counted nothing names the quantity it had in ``quantity_old_uncounted``.
                    inputs = {**inputs, "corrects": correction[0],
                              "quantity_old": decimal_text(correction[1]) if counted else "0",
                              "quantity_new": decimal_text(correction[2])}
                    if moved is not None:  # the group the old quantity left (``group``: where the new one counts)
                        inputs["group_old"] = group_old
                    if not counted:
                        inputs["quantity_old_uncounted"] = decimal_text(correction[1])
            # Usage that costs nothing (inside the allowance, a flat fee or a stairstep band already charged, a
            # trial, a correction that moves no price) is sent too, as a debit of 0: the ledger records its
            # quantity with no postings, and the monthly usage summary (built from the ledger's events alone)
            # counts it (docs/rating.md "Usage that costs nothing").
            if unit is not None and output is None:
                if decision_prefix:
                    inputs = {**inputs, "late": decision_prefix.rstrip(":"),
                              "original_period": original_period}
                before_text, after_text = decimal_text(before), decimal_text(after)  # the command and decision show them
                output = self._debit(batch, usage, unit, amount, meter, period, before_text, after_text,
                                     decimal_text(step), group, inputs)
                before, after = before_text, after_text  # type: ignore[assignment]
        if decision not in ("no_price", FILTERED, "trial", "invalid_correction", "period_closed"):
            decision = decision_prefix + decision
        # A refused correction amends nothing: the next one amends the quantity before it (as ``_correct``'s own).
        amends = correction is not None and decision not in ("no_price", "invalid_correction", "period_closed")
        batch.record(usage, batch.catalog.version, period, group, value, before, after, amount, unit, decision,
                     output, corrects=correction[0] if correction and amends else None,
                     effective_quantity=decimal_text(correction[2]) if correction and amends else None)
        if amount and decision not in REFUSED_DECISIONS:
            batch.charged_at(account, event.meter, period, event.timestamp, amount)
        return output

    def _price_late_at_close(self, batch: _BatchState, usage: Usage, meter: MeterView, period: str, group: str,
                             value: str | None) -> tuple[int, str, Decimal, Decimal, dict[str, Any]] | OutMessage:
        """A late event of a meter priced at close (max, last, unique_count) whose period is closed: a late correction
        of that period's aggregate, (amount, unit, the meter's quantity before, after, the debit's inputs), or the
        dead letter of a price that cannot be read.

        The period's close billed the aggregate of its decisions; the event is counted with them (and with the late
        ones before it: ``close.counted_decisions``, read per batch) and the debit is the difference it makes to the
        price of the meter's quantity, at the price and allowance the close line billed (without a line of the meter,
        the price of the event's own time), nothing when the close line was trial usage: the period then costs what
        its close would have billed with the event on time. The event used to count in the open period's aggregate:
        a peak of the closed period raised the open period's maximum."""
        event, account, catalog, definition = usage.event, usage.account, batch.catalog, meter.definition
        billed = batch.billed_line(account, period, event.meter, group)
        spec: Any
        if billed is not None and billed.get("price") is not None:
            price_json, included = billed["price"], Decimal(billed["included"])
            priced_by, trialing = billed.get("priced_by", "list_price"), bool(billed.get("trial"))
            try:
                spec = parse_spec(price_json, credit_scales=_credit_scales(catalog))
            except PriceSpecError as exc:
                return self._rejection(batch, usage, RejectReason.NO_PRICE,
                                       f"the price period {period} was billed at: {exc}")
        else:
            subs = batch.subscriptions.get(account)
            plan_pricing = self._pricing(catalog, subs, meter, event.timestamp) if subs else None
            if plan_pricing is not None:
                spec, included, _, trialing, price_json = plan_pricing
                priced_by = "plan"
            else:
                spec, included, trialing, price_json = meter.spec, definition.included, False, definition.price
                priced_by = "list_price"
        assert spec is not None
        groups = batch.counted_at_close.get((account, period, event.meter))
        if groups is None:
            raise RuntimeError(f"decisions of meter {event.meter} in closed period {period} of account {account} "
                               f"were not loaded")
        before = meter_quantity(meter, groups)
        groups.setdefault(group, []).append({
            "event_id": event.id, "event_time": event.timestamp_text(), "quantity": event.quantity_text(),
            "value": value, "corrects": None, "effective_quantity": None, "group_key": group,
            "rated_at": batch.rated_at})
        after = meter_quantity(meter, groups)
        amount = 0 if trialing else period_charge(spec, after, included) - period_charge(spec, before, included)
        inputs = {"price": price_json, "included": decimal_text(included),
                  # as the close's debit: the usage already happened, never refused
                  "overage_policy": "overage", "priced_by": priced_by, "aggregation": definition.aggregation}
        return amount, spec.unit, before, after, inputs

    def _correct(self, batch: _BatchState, usage: Usage) -> OutMessage | None:
        """An amendment (new quantity) or a void (quantity 0) of an earlier event: re-rated by the difference.

        The original decision stays as it was; the correction is a decision of its own whose charge is
        price(total - old + new) - price(total), posted as one more debit (or give-back when negative).
        Both show in the history. Only sum/count meters priced in real time can be corrected in place.

        ``total`` is the running total of the period the original was rated in, even a closed one (a late
        correction: that period's price and allowance, ``original_period`` in the command, so the ledger credits
        the invoice that billed it); never the open period's. Whatever cannot be priced is a dead letter.
        """
        event = usage.event
        account = usage.account
        original = batch.originals.get((account, event.correction_of or ""))
        if original is None:
            rejection = self._rejection(batch, usage, RejectReason.UNKNOWN_CORRECTION,
                                        f"no rated event {event.correction_of!r} for tenant {event.tenant!r}")
            batch.record(usage, batch.catalog.version, period_of(event.timestamp), "", None, Decimal(0), Decimal(0),
                         0, None, "unknown_correction", rejection)
            return rejection
        if original["meter"] != event.meter:
            rejection = self._rejection(batch, usage, RejectReason.INVALID_CORRECTION,
                                        f"correction changes meter {original['meter']!r} to {event.meter!r}")
            batch.record(usage, batch.catalog.version, original["period"], "", None, Decimal(0), Decimal(0), 0,
                         None, "invalid_correction", rejection)
            return rejection
        decided = (original.get("decision") or "").rpartition(":")[2]
        if decided in REFUSED_DECISIONS:
            reason = RejectReason.PERIOD_CLOSED if decided == "period_closed" else RejectReason.INVALID_CORRECTION
            rejection = self._rejection(batch, usage, reason, f"event {event.correction_of!r} was refused "
                                                              f"({decided}): nothing of it was billed to correct")
            batch.record(usage, batch.catalog.version, original["period"], "", None, Decimal(0), Decimal(0), 0,
                         None, reason.value, rejection)
            return rejection
        # The correction is rated at its original's time, in the period its original was rated in: closed or not
        # (a late correction, the late policy says whether it is rated at all), its total and allowance.
        old = Decimal(original["quantity"])
        # What the event counts now: nothing when it (or its latest correction) was filtered out, or voided (a
        # correction to 0; a count meter counts an original of quantity 0 as one event, a void as none).
        counted = decided != FILTERED and not (original.get("corrected") and old == 0)
        at_original = Usage(usage.account, event.at(datetime.fromisoformat(original["event_time"])), usage.source,
                            usage.catalog_version)
        rows = len(batch.rows)
        output = self._rate(batch, at_original, correction=(event.correction_of or "", old, event.quantity),
                            counted=counted, rated_in=original["period"], group_old=original["group_key"])
        if len(batch.rows) > rows and batch.rows[-1][18] is not None:  # amended (a refusal amends nothing)
            batch.originals[(account, event.correction_of or "")] = {
                **original, "quantity": str(event.quantity), "decision": batch.rows[-1][14], "corrected": True,
                "group_key": batch.rows[-1][5]}
        return output

    def _rate_ai(self, batch: _BatchState, account: str, key: str, period: str, usage: Usage,
                 meter: MeterView) -> tuple[int, str, Decimal, Decimal, dict[str, Any]]:
        """Per model and token class, the cumulative price of the period after minus before."""
        assert meter.ai_table is not None
        event = usage.event
        model = str(event.properties.get("model", ""))
        counts = {cls: event.properties[prop] for prop, cls in TOKEN_PROPERTIES.items() if prop in event.properties}
        if not counts:
            counts = {"input": str(event.quantity)}  # a bare token count is input tokens
        before_counts: dict[str, Decimal] = {}
        after_counts: dict[str, Decimal] = {}
        for token_class, raw in counts.items():
            before_counts[token_class] = batch.total(account, f"{key}|model={model}|{token_class}", period)
            after_counts[token_class] = RATING_CONTEXT.add(before_counts[token_class], _token_count(token_class, raw))
        price_after = ai_token_price(meter.ai_table, model, after_counts)
        price_before = ai_token_price(meter.ai_table, model, before_counts)
        for token_class, total in after_counts.items():
            batch.set_total(account, f"{key}|model={model}|{token_class}", period, total)
        amount = to_subunits(price_after.amount) - to_subunits(price_before.amount)
        inputs = {"ai_prices": meter.definition.ai_prices, "model": model,
                  "tokens": {c: str(v) for c, v in counts.items()},
                  "tokens_before": {c: decimal_text(v) for c, v in before_counts.items()}}
        before = sum(before_counts.values(), Decimal(0))
        after = sum(after_counts.values(), Decimal(0))
        return amount, meter.ai_table.unit, before, after, inputs

    def _debit(self, batch: _BatchState, usage: Usage, unit: str, amount: int, meter: MeterView, period: str,
               before: str, after: str, contributed: str, group: str, inputs: dict[str, Any],
               command_id: str | None = None) -> OutMessage:
        """The ``usage.debit`` command (contract: ``LedgerCommand``, written by ``codec.debit_command_json``).

        ``cause.quantity`` is the event's own quantity (the audit trail); ``cause.contribution`` what it added to
        the meter's total, as the invoice counts it: a ``count`` meter's event 1 whatever its quantity, a correction
        the difference it made (an amendment 0 more, a void 1 less), else the quantity. The monthly usage summary
        adds it (docs/rating.md "Usage that costs nothing").

        ``cause.time_zone``: the zone of the subscription periods the usage is billed in, when not UTC, so the monthly
        summaries put it in the month of its usage time there, the invoice's (``billing_time_zone``).

        ``command_id``: a repricing's charge (``_charge_again``), keyed by its own decision; else the event's.
        """
        if not AMOUNT_MIN <= amount <= AMOUNT_MAX:
            raise MoneyError(f"a charge of {_amount_text(amount)} {unit} is more than a ledger amount holds (a signed "
                             f"64-bit count of sub-units, docs/money.md)")
        event = usage.event
        properties = ({k: v if type(v) is str else str(v) for k, v in event.properties.items()}
                      if event.properties else _NO_PROPERTIES)
        payload = {
            "unit": unit, "amount_subunits": amount, "amount": _amount_text(amount),
            "meter": event.meter, "at": event.timestamp_text(),
            "overage_policy": inputs.get("overage_policy", meter.definition.overage_policy),
            "cause": {
                "event_ids": [event.id], "period": period, "quantity": event.quantity_text(),
                "quantity_before": before, "quantity_after": after, "contribution": contributed, "group": group,
                "usage_type": meter.definition.usage_type or event.meter,
                "catalog_version": batch.catalog.version, **inputs,
                "properties": properties, "user": properties.get("user"),
                "model": properties.get("model"), "operation": properties.get("operation"),
            },
        }
        zone = billing_time_zone(batch.subscriptions.get(usage.account), period)
        if zone is not None:
            payload["cause"]["time_zone"] = zone
        value = debit_command_json(command_id or usage_command_id(event.tenant, event.id), event.tenant, batch.now,
                                   batch.now_json, payload)
        return OutMessage(topics.LEDGER_COMMANDS, usage.account, value, SCHEMA_HEADERS[topics.LEDGER_COMMANDS])

    def _unpriceable(self, batch: _BatchState, usage: Usage, detail: str) -> OutMessage:
        """The dead letter of an event a former attempt of the batch could not price (``UnpriceableEvent``),
        recorded as ``no_price``: it counts in no total and charges nothing; a redelivery publishes it again."""
        rejection = self._rejection(batch, usage, RejectReason.NO_PRICE, detail)
        event = usage.event
        original = batch.originals.get((usage.account, event.correction_of)) if event.correction_of else None
        period = original["period"] if original else batch.period_of(usage.account, event.timestamp)[0]
        batch.record(usage, batch.catalog.version, period, "", None, Decimal(0), Decimal(0), 0, None, "no_price",
                     rejection)
        return rejection

    def _rejection(self, batch: _BatchState, usage: Usage, reason: RejectReason, detail: str) -> OutMessage:
        record = UsageRejection(reason=reason, detail=detail, stage="rating", tenant=usage.event.tenant,
                                event_id=usage.event.id, payload=usage.event.model_dump_json(),
                                rejected_at=batch.now, source=usage.source)
        return OutMessage(topics.USAGE_REJECTED, usage.account, record.to_json(),
                          SCHEMA_HEADERS[topics.USAGE_REJECTED])


_NO_PROPERTIES: dict[str, str] = {}  # shared, only ever read


def billing_time_zone(subs: list[AccountSubscription] | None, period: str) -> str | None:
    """The zone a usage debit billed in ``period`` names (``cause.time_zone``), or None: UTC.

    The projections cannot look it up (``Subscription.Started`` is in another partition than the account's debits,
    and partitions replay in parallel), so rating names it. A subscription's period (an ISO 8601 start: the primary
    subscription's, whose invoice bills the account's usage, ``usage_lines_command``) turns in that subscription's
    zone; a calendar month (``YYYY-MM``: no live subscription, or usage before it started) is a UTC month. UTC itself
    is not named, so the debits of UTC accounts and of credit-only accounts are as they were.
    """
    if not subs or len(period) == 7:
        return None
    zone = subs[0].time_zone
    return zone if zone and zone != "UTC" else None
_AMOUNT_TEXTS_MAX = 4096
_amount_texts: dict[int, str] = {}


def _credit_scales(catalog: CatalogView) -> dict[str, int]:
    units = catalog.document.get("credit_units") or {}
    return {"CREDIT": 2, **{code: int((u or {}).get("scale", 2)) for code, u in units.items()}}


def _token_count(token_class: str, raw: Any) -> Decimal:
    """An AI event's count of ``token_class`` tokens: a whole number, 0 or more; else ``MoneyError`` (the event is
    refused: a negative count would give back tokens the tenant never reported, a fraction is no token count)."""
    try:
        count = Decimal(str(raw))
    except InvalidOperation:
        count = None
    if count is None or not count.is_finite() or count < 0 or count != count.to_integral_value():
        raise MoneyError(f"{token_class}_tokens {str(raw)[:40]!r} is not a whole number of tokens (0 or more)")
    return count


def _amount_text(subunits: int) -> str:
    """``subunits_text(subunits)``, kept for the amounts that recur (a per-unit price times small counts)."""
    text = _amount_texts.get(subunits)
    if text is None:
        text = subunits_text(subunits)
        if len(_amount_texts) < _AMOUNT_TEXTS_MAX:
            _amount_texts[subunits] = text
    return text


def _in(values: list[str], first: int = 1) -> str:
    """``$1, $2, ...`` for an IN list (SQLite; PostgreSQL takes one array parameter instead)."""
    return ", ".join(f"${i}" for i in range(first, first + len(values)))


async def _rows_by_pairs(conn: Connection, postgres: bool, select: str, table: str, columns: tuple[str, str],
                         pairs: list[tuple[str, str]], sqlite_by: int) -> list[Any]:
    """``SELECT {select} FROM {table}`` for the rows whose (``columns``) are among ``pairs``. PostgreSQL: by
    primary key, one index probe per pair (``unnest`` of two arrays). SQLite: by the one column
    ``columns[sqlite_by]``, a superset the caller filters to ``pairs`` (it does anyway)."""
    first, second = columns
    if postgres:
        return await conn.fetch(
            f"SELECT {', '.join(f't.{c}' for c in select.split(', '))} FROM {table} t "
            f"JOIN unnest($1::text[], $2::text[]) AS k({first}, {second}) "
            f"ON t.{first} = k.{first} AND t.{second} = k.{second}",
            [p[0] for p in pairs], [p[1] for p in pairs])
    values = sorted({p[sqlite_by] for p in pairs})
    return await conn.fetch(f"SELECT {select} FROM {table} WHERE {columns[sqlite_by]} IN ({_in(values)})", *values)


RATED_COLUMNS = ("account_id", "event_id", "tenant", "meter", "period", "group_key", "event_time", "quantity",
                 "value", "quantity_before", "quantity_after", "amount_subunits", "unit", "catalog_version",
                 "decision", "output_topic", "output", "rated_at", "corrects", "effective_quantity")


class _BatchState:
    """What one batch reads once and writes once: prior decisions, running totals, closed periods.

    ``now`` is the batch's clock: the open period of late events, ``issued_at`` of its commands, ``rated_at``
    of its decisions (corrections keep their own instant, which orders successive corrections of one event).
    """

    def __init__(self, dialect: str, now: datetime) -> None:
        self.dialect = dialect
        self.now = now
        self.now_json = timestamp_text(now)
        self.rated_at = now.isoformat()
        self.catalog = CatalogView()  # the catalogue the batch is rated with (set before rating)
        self.decided: dict[tuple[str, str], OutMessage | None] = {}
        self.totals: dict[tuple[str, str, str], Decimal] = {}
        # (account, meter, period) -> the sum of the meter's group totals (``meter_total``), summed when needed.
        self.meter_totals: dict[tuple[str, str, str], Decimal] | None = None
        self.dirty: set[tuple[str, str, str]] = set()
        self.closed: set[tuple[str, str]] = set()
        # (account, meter, period, allowance, price JSON identity) -> (the meter's last total, its period charge).
        self.charged: dict[tuple[str, str, str, Decimal, int], tuple[Decimal, int]] = {}
        # (price JSON identity, allowance, overage policy, priced by plan) -> the decision inputs of that price;
        # the dict holds the price JSON, so its identity cannot be reused while the batch lives.
        self.inputs: dict[tuple[int, Decimal, str, bool], dict[str, Any]] = {}
        self.subscriptions: dict[str, list[AccountSubscription]] = {}
        # account -> its ended subscription periods (start, end, key), read only for accounts with an event
        # before their current subscription period (rare: late events, corrections of old ones).
        self.ended: dict[str, list[tuple[datetime, datetime, str]]] = {}
        # (account, event id) -> the decision a correction amends, with its current effective quantity.
        self.originals: dict[tuple[str, str], dict[str, Any]] = {}
        # (account, period, meter, group) -> the close line of a closed period a correction amends: the price and
        # allowance that period was billed at (read only for batches with such corrections).
        self.close_lines: dict[tuple[str, str, str, str], dict[str, Any]] = {}
        # (account, period) pairs whose running totals were read; rating any other period is a bug.
        self.periods: set[tuple[str, str]] = set()
        self.pending: list[Usage] = []  # the batch's events that no earlier batch decided
        self.corrected: set[str] = set()  # ids the batch's corrections amend
        self.rows: list[tuple[Any, ...]] = []  # decisions not yet handed to the COPY
        # (account, period) -> (meter, usage time, sub-units) of its charged decisions, read only for periods in which
        # a subscription of the account changed plan; (account, meter, period, change) -> what usage before the
        # change was charged (``floored``).
        self.period_charges: dict[tuple[str, str], list[tuple[str, datetime, int]]] = {}
        self.before_change: dict[tuple[str, str, str, datetime], int] = {}
        # account -> its live subscriptions before the subscription event a repricing follows (``_reprice``).
        self.rated_with: dict[str, list[AccountSubscription]] = {}
        # (account, closed period, meter) -> the decisions its close counts, by group: read only for the late events
        # of meters priced at close (``_price_late_at_close``), kept in step with the batch's.
        self.counted_at_close: dict[tuple[str, str, str], dict[str, list[dict[str, Any]]]] = {}

    @classmethod
    async def load(cls, conn: Connection, dialect: str, usages: list[Usage], now: datetime, *,
                   lookup: bool = True, catalog: CatalogView | None = None) -> _BatchState:
        """Reads what the batch needs; ``lookup=False`` skips prior decisions (the caller relies on the key);
        ``catalog``: the one the batch is rated with (which meters are priced at close)."""
        state = cls(dialect, now)
        if catalog is not None:
            state.catalog = catalog
        postgres = dialect == "postgres"
        accounts = sorted({u.account for u in usages})
        keys = sorted({(u.account, u.event.id) for u in usages}) if lookup else []
        # Prior decisions, by primary key: an index probe per event, whatever the size of the table.
        rows = await _rows_by_pairs(conn, postgres, "account_id, event_id, output_topic, output", "rated_events",
                                    ("account_id", "event_id"), keys, sqlite_by=1) if keys else []
        wanted = set(keys)
        for row in rows:
            key = (row["account_id"], row["event_id"])
            if key in wanted:
                topic = row["output_topic"]
                state.decided[key] = (OutMessage(topic, key[0], row["output"].encode(), SCHEMA_HEADERS.get(topic, ()))
                                      if row["output"] else None)
        by_account = ("account_id = ANY($1::text[])", [accounts]) if postgres else (
            f"account_id IN ({_in(accounts)})", accounts)
        if postgres:
            # Before anything a close changes is read: the batch's accounts' subscription rows, FOR SHARE. A
            # subscription period closes (PeriodEnded, a restarting Changed: ``apply_event``) with that row
            # locked FOR UPDATE, so a close and this batch never overlap: either the close waits until this
            # batch has committed and then counts its decisions, or this lock waits until the close has
            # committed, and the reads below (each its own snapshot, READ COMMITTED) see the period closed and
            # its new bounds. Without it a batch that read the closed periods just before a close committed
            # rated into the period being closed, after its lines were taken: never invoiced. SQLite runs one
            # transaction at a time (the embedded database's lock): nothing can overlap there.
            # First of all, the accounts' locks, shared (``repricing.lock_account``): a subscription event that
            # reprices an account, or a refusal the ledger-events consumer takes back (``refusals.apply_refusal``),
            # the other writers of its running totals, waits for this batch, or this batch for it (and then reads
            # the totals it left and rates with it).
            await repricing.lock_accounts_shared(conn, dialect, accounts)
            await conn.execute(f"SELECT 1 FROM account_subscriptions WHERE {by_account[0]} FOR SHARE", *by_account[1])
        for row in await conn.fetch(f"SELECT account_id, period FROM closed_periods WHERE {by_account[0]}",
                                    *by_account[1]):
            state.closed.add((row["account_id"], row["period"]))
        state.subscriptions, subscribed = await load_subscriptions(conn, accounts, dialect)
        pending = state.pending = [u for u in usages if (u.account, u.event.id) not in state.decided]
        corrected = sorted({u.event.correction_of for u in pending if u.event.correction_of})
        state.corrected = set(corrected)
        if corrected:
            await state._load_originals(conn, corrected)
        in_batch = {(u.account, u.event.id): u for u in pending if u.event.id in state.corrected}
        # Each event's moment: its own, or its original's for a correction of one rated in this batch (an unknown
        # original has none). A correction of a stored decision is rated in that decision's period, closed or not.
        # (account, moment, the meter of an event that is no correction: its late events count with its period's close)
        moments: list[tuple[str, datetime, str | None]] = []
        closed_corrected: set[tuple[str, str]] = set()
        for usage in pending:
            moment = usage.event.timestamp
            if usage.event.correction_of:
                key = (usage.account, usage.event.correction_of)
                original = state.originals.get(key)
                if original is not None:
                    pair = (usage.account, original["period"])
                    state.periods.add(pair)
                    if pair in state.closed:
                        closed_corrected.add(pair)
                    continue
                if key in in_batch:
                    moment = in_batch[key].event.timestamp
                else:
                    continue
                moments.append((usage.account, moment, None))
            else:
                moments.append((usage.account, moment, usage.event.meter))
        # Ended subscription periods, only of accounts that have had a subscription and have an event before
        # their current period (none for most batches: no statement then).
        earlier = sorted({account for account, moment, _ in moments if account in subscribed and (
            account not in state.subscriptions or moment < state.subscriptions[account][0].period_start)})
        if earlier:
            state.ended = await ended_periods(conn, earlier, dialect)
        # The periods this batch rates in: each event's (or its original's) period, closed or not.
        late_pairs: set[tuple[str, str]] = set()
        late_at_close: set[tuple[str, str, str]] = set()  # (account, closed period, meter priced at close)
        for account, moment, code in moments:
            period, late = state.period_of(account, moment)
            state.periods.add((account, period))
            if late:
                late_pairs.add((account, period))
                meter = state.catalog.meters.get(code) if code is not None else None
                if meter is not None and meter.definition.aggregation not in REAL_TIME:
                    late_at_close.add((account, period, meter.code))
        if closed_corrected or late_pairs:  # the price and allowance each closed period was billed at
            await state._load_close_lines(conn, sorted(closed_corrected | late_pairs))
        # The decisions the close of a closed period counted, for the late events of meters priced at close (rare: one
        # statement per account, period and meter).
        for account, period, code in sorted(late_at_close):
            state.counted_at_close[(account, period, code)] = await counted_decisions(conn, account, period, code)
        if state.periods:
            await state._load_totals(conn)
            await state._load_charged_before_changes(conn)
        return state

    async def _load_originals(self, conn: Connection, corrected: list[str]) -> None:
        """The decisions amended by this batch's corrections, with their latest corrected quantity."""
        postgres = self.dialect == "postgres"
        where = "event_id = ANY($1::text[])" if postgres else f"event_id IN ({_in(corrected)})"
        args: list[Any] = [corrected] if postgres else list(corrected)
        for row in await conn.fetch(
                f"SELECT account_id, event_id, meter, period, event_time, quantity, decision, group_key "
                f"FROM rated_events WHERE {where} AND corrects IS NULL", *args):
            self.originals[(row["account_id"], row["event_id"])] = dict(row)
        where = "corrects = ANY($1::text[])" if postgres else f"corrects IN ({_in(corrected)})"
        for row in await conn.fetch(
                f"SELECT account_id, corrects, effective_quantity, decision, group_key, period FROM rated_events "
                f"WHERE {where} ORDER BY rated_at", *args):
            original = self.originals.get((row["account_id"], row["corrects"]))
            if original is not None:  # the latest correction is what the next one amends (filtered out or not),
                # in the period it counts in (a repricing's charge may have moved the event: ``_charge_again``)
                original.update(quantity=row["effective_quantity"], decision=row["decision"], corrected=True,
                                group_key=row["group_key"], period=row["period"])

    async def _load_close_lines(self, conn: Connection, pairs: list[tuple[str, str]]) -> None:
        """The close lines of the closed (account, period) pairs this batch's corrections amend."""
        rows = await _rows_by_pairs(conn, self.dialect == "postgres", "account_id, period, meter, group_key, line",
                                    "close_lines", ("account_id", "period"), pairs, sqlite_by=1)
        wanted = set(pairs)
        for row in rows:
            if (row["account_id"], row["period"]) in wanted:
                self.close_lines[(row["account_id"], row["period"], row["meter"], row["group_key"])] = json.loads(
                    row["line"])

    async def _load_totals(self, conn: Connection) -> None:
        """Running totals of the (account, period) pairs the batch rates in, not of every period ever."""
        rows = await _rows_by_pairs(conn, self.dialect == "postgres", "account_id, meter, period, quantity",
                                    "period_totals", ("account_id", "period"), sorted(self.periods), sqlite_by=0)
        for row in rows:
            if (row["account_id"], row["period"]) in self.periods:
                self.totals[(row["account_id"], row["meter"], row["period"])] = Decimal(row["quantity"])

    def plan_change_in(self, subs: list[AccountSubscription], period: str, moment: datetime) -> datetime | None:
        """The instant of the latest plan change of live subscriptions ``subs`` (started by ``moment``) after
        ``period``'s start and at or before ``moment``, or None: the plan pricing usage at ``moment`` took over within
        the period (docs/rating.md "Which price applies")."""
        start = _period_start(period)
        latest = None
        for sub in subs:
            if sub.start > moment:
                continue
            for until, _, _ in sub.plans:
                if start < until <= moment and (latest is None or until > latest):
                    latest = until
        return latest

    def floored(self, account: str, meter: str, period: str, moment: datetime, charged_before: int,
                charged_after: int, subs: list[AccountSubscription] | None = None) -> int:
        """What usage at ``moment`` that takes the period's price from ``charged_before`` to ``charged_after`` (the
        plan of its time, on the period's whole total) is charged: the difference, except after a plan change within
        the period, where the new plan's price of the period counts what the period's usage before the change was
        charged (``floor``) as paid: ``max(floor, after) - max(floor, before)``. So the period never costs more
        than the higher of the two plans' prices of its whole usage, nothing charged before the change is given
        back, and usage before it is never charged again. ``subs``: the account's live subscriptions the usage is
        priced with (default: the batch's)."""
        subs = self.subscriptions.get(account) if subs is None else subs
        change = self.plan_change_in(subs, period, moment) if subs and any(sub.plans for sub in subs) else None
        return self.floored_since(account, meter, period, change, charged_before, charged_after)

    def floored_since(self, account: str, meter: str, period: str, change: datetime | None, charged_before: int,
                      charged_after: int) -> int:
        """``floored`` after the plan change at ``change`` (None: no change before the usage, the difference)."""
        if change is None:
            return charged_after - charged_before
        floor = self.charged_before_change(account, meter, period, change)
        return max(floor, charged_after) - max(floor, charged_before)

    def charged_before_change(self, account: str, meter: str, period: str, change: datetime) -> int:
        """Sub-units the decisions of ``meter`` in ``period`` for usage before ``change`` were charged in all."""
        key = (account, meter, period, change)
        if key not in self.before_change:
            rows = self.period_charges.get((account, period))
            if rows is None:
                raise RuntimeError(f"charges of period {period} of account {account} were not loaded")
            self.before_change[key] = sum(amount for code, at, amount in rows if code == meter and at < change)
        return self.before_change[key]

    def charged_at(self, account: str, meter: str, period: str, moment: datetime, amount: int) -> None:
        """Keeps the charges before plan changes (``charged_before_change``) in step with a decision of the batch."""
        rows = self.period_charges.get((account, period))
        if rows is None or not amount:
            return
        rows.append((meter, moment, amount))
        for (key_account, key_meter, key_period, change) in self.before_change:
            if (key_account, key_meter, key_period) == (account, meter, period) and moment < change:
                self.before_change[(key_account, key_meter, key_period, change)] += amount

    async def _load_charged_before_changes(self, conn: Connection) -> None:
        """The charges of the (account, period) pairs the batch rates in where a subscription of the account changed
        plan after the period's start, or whose close line kept plan changes (rare): what ``charged_before_change``
        sums."""
        changed_lines = {(account, period) for (account, period, _, _), line in self.close_lines.items()
                         if line.get("earlier_prices")}
        for account, period in sorted(self.periods):
            if (account, period) in self.period_charges:
                continue
            start = _period_start(period)
            subs = [*(self.subscriptions.get(account) or ()), *(self.rated_with.get(account) or ())]
            if not any(until > start for sub in subs for until, _, _ in sub.plans) and (
                    account, period) not in changed_lines:
                continue
            rows = await conn.fetch(
                "SELECT meter, event_time, amount_subunits, decision FROM rated_events WHERE account_id = $1 "
                "AND period = $2", account, period)
            self.period_charges[(account, period)] = [
                (r["meter"], datetime.fromisoformat(r["event_time"]), int(r["amount_subunits"])) for r in rows
                if r["amount_subunits"] and r["decision"].rpartition(":")[2] not in REFUSED_DECISIONS]

    def billed_line(self, account: str, period: str, meter: str, *groups: str) -> dict[str, Any] | None:
        """The close line a closed ``period`` billed ``meter`` with: the line of the first of ``groups`` it has, else
        any line of the meter (its price and allowance are the meter's), else None (no usage of it was billed)."""
        for group in groups:
            line = self.close_lines.get((account, period, meter, group))
            if line is not None:
                return line
        for (line_account, line_period, line_meter, _), line in self.close_lines.items():
            if (line_account, line_period, line_meter) == (account, period, meter):
                return line
        return None

    def original_from(self, row: tuple[Any, ...]) -> None:
        """Makes a decision of this batch amendable by a later correction in the same batch (as if stored)."""
        account, event_id = row[0], row[1]
        if (account, event_id) not in self.originals:
            self.originals[(account, event_id)] = {
                "account_id": account, "event_id": event_id, "meter": row[3], "period": row[4],
                "event_time": row[6], "quantity": row[7], "decision": row[14], "group_key": row[5]}

    def period_of(self, account: str, moment: datetime) -> tuple[str, bool]:
        """(the billing period of ``moment`` for ``account``, whether that period is closed)."""
        period = _period(self.subscriptions.get(account), self.ended.get(account), moment)
        return period, (account, period) in self.closed

    def total(self, account: str, key: str, period: str) -> Decimal:
        if (account, period) not in self.periods:
            raise RuntimeError(f"totals of period {period} of account {account} were not loaded")
        return self.totals.get((account, key, period), Decimal(0))

    def meter_total(self, account: str, meter: str, period: str) -> Decimal:
        """The running total of ``meter`` in ``period``: the sum of its groups' (``meter``, ``meter|group...``)."""
        if (account, period) not in self.periods:
            raise RuntimeError(f"totals of period {period} of account {account} were not loaded")
        if self.meter_totals is None:  # summed once per batch, on the first grouped event
            self.meter_totals = {}
            for (total_account, key, total_period), quantity in self.totals.items():
                code = key.partition(GROUP_SEPARATOR)[0]
                summed = (total_account, code, total_period)
                self.meter_totals[summed] = RATING_CONTEXT.add(self.meter_totals.get(summed, Decimal(0)), quantity)
        return self.meter_totals.get((account, meter, period), Decimal(0))

    def meter_moved(self, account: str, meter: str, period: str, step: Decimal) -> None:
        """Keeps the summed meter totals (once summed) in step with a group's total."""
        if self.meter_totals is not None:
            summed = (account, meter, period)
            self.meter_totals[summed] = RATING_CONTEXT.add(self.meter_totals.get(summed, Decimal(0)), step)

    def set_total(self, account: str, key: str, period: str, quantity: Decimal) -> None:
        self.meter_moved(account, key.partition(GROUP_SEPARATOR)[0], period,
                         quantity - self.totals.get((account, key, period), Decimal(0)))
        self.totals[(account, key, period)] = quantity
        self.dirty.add((account, key, period))

    def record(self, usage: Usage, catalog_version: int, period: str, group: str, value: str | None,
               before: Decimal | str, after: Decimal | str, amount: int, unit: str | None, decision: str,
               output: OutMessage | None, *, corrects: str | None = None,
               effective_quantity: str | None = None) -> None:
        """The decision with its inputs, saved with the totals: the trace of every charge."""
        event = usage.event
        self.rows.append((
            usage.account, event.id, event.tenant, event.meter, period, group, event.timestamp_text(),
            event.quantity_text(), value, decimal_text(before) if type(before) is not str else before,
            decimal_text(after) if type(after) is not str else after, amount, unit, catalog_version, decision,
            output.topic if output else None, output.value.decode() if output else None,
            utcnow().isoformat() if corrects is not None else self.rated_at, corrects, effective_quantity))

    async def save_totals(self, conn: Connection) -> None:
        """The running totals the batch changed, upserted in one statement (PostgreSQL: arrays, unnest)."""
        if not self.dirty:
            return
        dirty = sorted(self.dirty)
        if self.dialect == "postgres":
            await conn.execute(
                "INSERT INTO period_totals (account_id, meter, period, quantity) "
                "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) "
                "ON CONFLICT (account_id, meter, period) DO UPDATE SET quantity = excluded.quantity",
                [d[0] for d in dirty], [d[1] for d in dirty], [d[2] for d in dirty],
                [str(self.totals[d]) for d in dirty])
        else:
            await conn.executemany(
                "INSERT INTO period_totals (account_id, meter, period, quantity) VALUES ($1, $2, $3, $4) "
                "ON CONFLICT (account_id, meter, period) DO UPDATE SET quantity = excluded.quantity",
                [(a, m, p, str(self.totals[(a, m, p)])) for a, m, p in dirty])


def _period_start(period: str) -> datetime:
    """The first instant of a period key: a calendar month (``YYYY-MM``, UTC) or a subscription period's start."""
    if len(period) == 7:
        return datetime(int(period[:4]), int(period[5:]), 1, tzinfo=UTC)
    return datetime.fromisoformat(period)


def _period(subs: list[AccountSubscription] | None, ended: list[tuple[datetime, datetime, str]] | None,
            moment: datetime) -> str:
    """The period key of ``moment``: the primary subscription's current period (its start), or one that
    follows it (``moment`` after its end, before the ledger's ``PeriodEnded`` reached rating: the periods the
    ledger will renew, from its cadence; at or after a trial's end, before its ``TrialConverted``: the periods
    the conversion starts), else an ended subscription period of the account containing it (closed: the late
    policy applies), else the calendar month (UTC)."""
    if subs:
        primary = subs[0]
        if primary.period_start <= moment < primary.period_end and not primary.trial_ended_at(moment):
            return primary.period_start.isoformat()
        ahead = primary.period_ahead(moment)  # after the current period, before rating saw it end
        if ahead is not None:
            return ahead.isoformat()
    if ended:
        for start, end, key in ended:
            if start <= moment < end:
                return key
    return period_of(moment)

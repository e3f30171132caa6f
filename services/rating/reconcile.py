"""Rating's part of ``billing reconcile usage``: its decision of each event and the ledger command it implies.

A decision (``rated_events``) stores what rating published: a ``usage.debit`` (``output_topic`` the ledger's
commands; a debit of 0 for usage that costs nothing: an allowance, a trial, a flat fee already charged, a
correction that moves no price), a dead letter (the rejected topic: ``period_closed``, ``no_price``,
``invalid_correction``, ``unknown_correction``), or nothing. Nothing is either a meter's filters leaving the event
out (``filtered``) or a close-priced meter (``max``, ``last``, ``unique_count``: ``deferred_to_close``, also
``late:`` / ``late_adjustment:`` of events rated before session 15; a late event of such a meter is now a debit of its
own closed period), billed by the debit its period's close sends (``close.close_command``, one per
line, its id from the line's key), once the period is closed (``closed_periods``). A correction is an event of its
own with its own decision and command. An event of a close-priced meter whose latest correction put it in another
``group_by`` group (``close._moves``: the group it was rated in no longer counts it) is billed by the close line of
that group, its debit (``close_debit``), or not billable ``voided_by_correction`` when that correction is to 0; it
used to be taken for its own group's line, reported ``voided_before_close`` when nothing else was left there.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

from billing_events import ids, topics
from billing_events.reconciliation import Decision
from billing_rating.close import CloseLine, close_command_id, sends_debit
from billing_runtime.db import Database

DEFERRED = "deferred_to_close"
# Event ids per lookup statement (SQLite allows 32,766 parameters).
LOOKUP_IDS_MAX = 500


async def decisions(db: Database, tenant: str, event_ids: Iterable[str]) -> dict[str, Decision]:
    """Rating's decisions of ``event_ids`` of ``tenant``, by event id (an event not rated yet has none)."""
    account = str(ids.account_id(tenant))
    wanted = sorted(set(event_ids))
    rows: list[dict[str, Any]] = []
    for start in range(0, len(wanted), LOOKUP_IDS_MAX):
        chunk = wanted[start:start + LOOKUP_IDS_MAX]
        marks = ", ".join(f"${i + 2}" for i in range(len(chunk)))
        rows += await db.fetch(
            "SELECT event_id, meter, period, group_key, decision, output_topic, output, rated_at, corrects "
            f"FROM rated_events WHERE account_id = $1 AND event_id IN ({marks})", account, *chunk)
    closes = _Closes(db, account)
    found: dict[str, Decision] = {}
    for row in rows:
        found[row["event_id"]] = await _decision(tenant, row, closes)
    return found


async def _decision(tenant: str, row: dict[str, Any], closes: _Closes) -> Decision:
    decision, event_id = row["decision"], row["event_id"]
    rated_at = datetime.fromisoformat(row["rated_at"])
    if row["output_topic"] == topics.LEDGER_COMMANDS:
        command = json.loads(row["output"])
        return Decision(tenant, event_id, decision, "debit", UUID(command["command_id"]), sent_at=rated_at)
    if row["output_topic"] == topics.USAGE_REJECTED:
        return Decision(tenant, event_id, decision, "rejected", reason=json.loads(row["output"])["reason"])
    if not decision.endswith(DEFERRED):
        return Decision(tenant, event_id, decision, "not_billable", reason=decision)
    group, period = row["group_key"], row["period"]
    latest = await closes.latest_correction(row["corrects"] or event_id)
    if latest is not None and latest["event_id"] != event_id and (latest["group_key"], latest["period"]) != (
            group, period):
        # A later correction moved the event to another group, whose line counts it now (``close._moves``), or a
        # repricing to another period, whose close counts it (``RatingService._charge_again``).
        if Decimal(latest["effective_quantity"] or 0) == 0:
            return Decision(tenant, event_id, decision, "not_billable", reason="voided_by_correction")
        group, period = latest["group_key"], latest["period"]
    closed_at = await closes.closed_at(period)
    if closed_at is None:
        return Decision(tenant, event_id, decision, "awaiting_close")
    line = await closes.line(period, row["meter"], group)
    if line is not None and not sends_debit(line):
        return Decision(tenant, event_id, decision, "not_billable", reason="voided_before_close")
    # A closed period without this event's line sent no debit for it: its command is then never applied, which
    # the report shows as a discrepancy.
    return Decision(tenant, event_id, decision, "close_debit",
                    close_command_id(closes.account, row["meter"], group, period), sent_at=closed_at)


class _Closes:
    """The account's closed periods and close lines, each read once."""

    def __init__(self, db: Database, account: str) -> None:
        self.db = db
        self.account = account
        self._closed: dict[str, datetime | None] = {}
        self._lines: dict[tuple[str, str, str], CloseLine | None] = {}
        self._latest: dict[str, dict[str, Any]] | None = None  # corrected event id -> its latest correction

    async def closed_at(self, period: str) -> datetime | None:
        if period not in self._closed:
            value = await self.db.fetchval("SELECT closed_at FROM closed_periods WHERE period = $1 AND account_id = $2",
                                           period, self.account)
            self._closed[period] = datetime.fromisoformat(value) if value else None
        return self._closed[period]

    async def latest_correction(self, original: str) -> dict[str, Any] | None:
        """The latest correction of event ``original`` (the one a close counts, in its own group), if any. The
        account's corrections (few) are read once, in the order a close takes them (``close._moves``)."""
        if self._latest is None:
            self._latest = {}
            for r in await self.db.fetch(
                    "SELECT event_id, corrects, group_key, period, effective_quantity FROM rated_events WHERE account_id = $1 "
                    "AND corrects IS NOT NULL ORDER BY event_time, rated_at", self.account):
                self._latest[r["corrects"]] = r
        return self._latest.get(original)

    async def line(self, period: str, meter: str, group: str) -> CloseLine | None:
        key = (period, meter, group)
        if key not in self._lines:
            text = await self.db.fetchval("SELECT line FROM close_lines WHERE period = $1 AND account_id = $2 "
                                          "AND meter = $3 AND group_key = $4", period, self.account, meter, group)
            self._lines[key] = CloseLine(**json.loads(text)) if text else None
        return self._lines[key]

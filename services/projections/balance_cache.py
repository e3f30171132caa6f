"""Balance reads without a PostgreSQL round trip: the query API's copy of what a balance view needs per tenant.

Why: under a flow of usage events on 2 shared cores a balance read waited for a core about four times (the
client, the API twice, the API's PostgreSQL backend; each wait p99 2.5-3 ms: README "Read tail"). Served from
this copy a read is the client's and the API's wake-ups only.

What is kept per tenant (``TenantState``): the rows ``views.balance_view`` reads (the account's currency and
position, each wallet with its unit's catalogue scale) and the tenant's open grants that could count as
"expiring soon" or in the late usage reserve (unit, end, remaining, set aside). "Expiring soon" (with ``now``) and
the reserve (the grants set aside, ``balances.RESERVE_SQL``) are still summed at read time and the view is
built by the same function as the query's (``views.balance_from_rows``), so the answer is the bytes the query
path gives for the same committed state (tests/unit/projections/test_balance_cache.py).

How it stays right:

* The consumer, in the SAME transaction that writes a poll's rows, sends ``pg_notify(channel(schema), ...)``
  with the new state of every tenant whose account events the poll applied (``NOTIFY_SQL``: computed by
  PostgreSQL from the rows just written, in chunks under the 8000-byte payload limit; a tenant too large for one
  is named only, and dropped from the copy, with any miss of it in flight: see below). PostgreSQL delivers
  notifications only after commit, in commit order, so the copy never shows a state that was not committed.
* A state carries a version: the highest ledger position of the tenant's account, wallet and grant rows (every
  change of them sets its event's position). A state older than the one held is ignored, so a copy filled by a
  query (a miss) that raced a notification never goes backwards. A tenant named only leaves nothing to compare
  with, so its drop also marks the misses of that tenant in flight (``_dropped_at``): one whose query began
  before the drop may have read the state before that commit and is answered but not kept.
* Anything that may change the rows without naming the tenants sends ``*``: a catalogue change of a unit's
  scale, the tables dropped (``store._drop``), a transaction of a replay (``billing projections rebuild``),
  which sends no states. ``*`` drops the whole copy.
* The copy is used only while LISTEN is established. A miss is filled only if no ``*`` and no loss of the
  listener came between its query and its answer (``_epoch``). On the listener's loss (its connection closed, or
  its check query failing) the copy is dropped and reads go to the query path until LISTEN is back.
* At most ``BALANCE_CACHE_TENANTS_MAX`` tenants (limits.py): a notification adds a tenant only while there is
  room; a miss evicts the oldest entry.

A read may trail a commit by the notification's delivery (milliseconds); the answer carries its position as
before. SQLite (the embedded run) has no LISTEN: there is no copy, every read is the query.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
from datetime import datetime
from typing import Any

import asyncpg
import orjson
from billing_projections import balances, views
from billing_projections.limits import (
    BALANCE_CACHE_TENANTS_MAX,
    BALANCE_LISTENER_CHECK_SECONDS,
    BALANCE_LISTENER_RETRY_SECONDS_MAX,
)
from billing_runtime.db import Database
from billing_runtime.logging import get_logger

log = get_logger(__name__)

RESET = "*"  # the payload that drops the whole copy
_CHANNEL_BYTES_MAX = 63  # PostgreSQL's identifier length (NAMEDATALEN - 1)

_ENDS_AT = "COALESCE(g.drawable_until, g.expires_at)"  # balances.ENDS_AT_SQL of the grants aliased g
# One tenant's state as a JSON array: [tenant, version, currency, account position, wallets, grants]; wallets
# in the query's order (ORDER BY unit, the same collation), each [unit, balance, held, receivable, low balance
# threshold, reached at, updated at, last position, credit scale]; grants [unit, ends at, remaining, set aside]
# (open, remaining > 0 and with an end: the only ones "expiring soon" and the late usage reserve can count; a grant
# set aside always has its drawable_until). ``a`` is the accounts row.
STATE_SQL = (
    "json_build_array(a.tenant, GREATEST(a.last_position, w.last_position, g.last_position), a.currency, "
    "a.last_position, COALESCE(w.wallets, '[]'), COALESCE(g.grants, '[]'))::text")
# The accounts a with each one's wallets w and grants g (one scan each, their highest position with them).
STATE_FROM = (
    "accounts a LEFT JOIN LATERAL (SELECT MAX(w.last_position) AS last_position, "
    "json_agg(json_build_array(w.unit, w.balance, w.held, w.receivable, w.low_balance_threshold, "
    "w.low_balance_reached_at, w.updated_at, w.last_position, "
    "(SELECT c.scale FROM catalog_units c WHERE c.code = w.unit)) ORDER BY w.unit) AS wallets "
    "FROM wallets w WHERE w.tenant = a.tenant) w ON true "
    "LEFT JOIN LATERAL (SELECT MAX(g.last_position) AS last_position, "
    f"json_agg(json_build_array(g.unit, {_ENDS_AT}, g.remaining, g.set_aside_at IS NOT NULL)) "
    "FILTER (WHERE g.status = 'open' "
    f"AND g.remaining > 0 AND {_ENDS_AT} IS NOT NULL) AS grants FROM grants g WHERE g.tenant = a.tenant) g ON true")
STATE_OF_TENANT_SQL = f"SELECT {STATE_SQL} FROM {STATE_FROM} WHERE a.tenant = $1"
# The consumer's notification of a poll's tenants ($1 the channel, $2 the tenants): each tenant's state, or its
# name alone when the state is over 3000 bytes (or ``*`` when even the name is), in chunks whose running sum of
# sizes falls in one 4000-byte window: at most 3999 + 3000 bytes, under PostgreSQL's 8000-byte payload limit.
NOTIFY_SQL = (
    f"WITH s AS MATERIALIZED (SELECT a.tenant, {STATE_SQL} AS j FROM {STATE_FROM} WHERE a.tenant = ANY($2::text[])), "
    "e AS (SELECT tenant, CASE WHEN octet_length(j) <= 3000 THEN j "
    "WHEN octet_length(to_json(tenant)::text) <= 3000 THEN to_json(tenant)::text ELSE '\"*\"' END AS j FROM s), "
    "n AS (SELECT j, SUM(octet_length(j) + 1) OVER (ORDER BY tenant) AS upto FROM e) "
    "SELECT pg_notify($1, '[' || string_agg(j, ',') || ']') FROM n GROUP BY upto / 4000")


def channel(schema: str) -> str:
    """The notification channel of a projections schema (a hash of it when the name would be too long)."""
    name = f"balances.{schema}"
    if len(name.encode()) > _CHANNEL_BYTES_MAX:
        name = "balances." + hashlib.sha256(schema.encode()).hexdigest()[:40]
    return name


class TenantState:
    """What a balance view of one tenant needs, as committed at ``version`` (see the module's docstring)."""

    __slots__ = ("account_position", "currency", "grants", "version", "wallets")

    def __init__(self, found: list[Any]) -> None:
        _, self.version, self.currency, self.account_position, self.wallets, self.grants = found

    def view(self, tenant: str, now: datetime) -> dict[str, Any]:
        """``views.balance_view``'s answer for this state at ``now`` (its rows, "expiring" summed here)."""
        start, end = balances.expiring_window(now)
        expiring: dict[str, int] = {}
        reserve: dict[str, int] = {}
        for unit, ends, remaining, set_aside in self.grants:
            if start < ends <= end:
                expiring[unit] = expiring.get(unit, 0) + remaining
            if set_aside:
                reserve[unit] = reserve.get(unit, 0) + remaining
        currency, position = self.currency, self.account_position
        rows = [{"currency": currency, "account_position": position, "unit": w[0], "balance": w[1], "held": w[2],
                 "receivable": w[3], "low_balance_threshold": w[4], "low_balance_reached_at": w[5],
                 "updated_at": w[6], "last_position": w[7], "credit_scale": w[8], "expiring": expiring.get(w[0]),
                 "late_usage_reserve": reserve.get(w[0])}
                for w in self.wallets]
        if not rows:  # the query's LEFT JOIN: one row without a wallet
            rows = [{"currency": currency, "account_position": position, "unit": None, "credit_scale": None}]
        return views.balance_from_rows(tenant, rows)


class BalanceCache:
    """The API's copy of tenants' balance states, kept by a LISTEN on the consumer's notifications."""

    def __init__(self, db: Database, url: str, schema: str, tenants_max: int = BALANCE_CACHE_TENANTS_MAX) -> None:
        self._db = db  # the API's read pool: misses, and every read while not listening
        self._url = url
        self._schema = schema
        self.channel = channel(schema)
        self._tenants_max = tenants_max
        self._states: dict[str, TenantState] = {}
        self.listening = False
        self._epoch = 0  # moves on every loss of the listener and every RESET: misses begun before are not kept
        # Name-only drops (a state too large for a notification): ``_drops`` counts them, ``_dropped_at`` holds
        # the count at the last drop of each tenant with a miss in flight (``_misses``: how many), so a miss begun
        # before its tenant's drop is not kept. Both hold only tenants with a miss in flight.
        self._drops = 0
        self._dropped_at: dict[str, int] = {}
        self._misses: dict[str, int] = {}
        self.listener_pid: int | None = None  # the LISTEN connection's PostgreSQL backend

    def __len__(self) -> int:
        return len(self._states)

    async def view(self, tenant: str, now: datetime) -> dict[str, Any] | None:
        """The balance view of ``tenant`` (None: no such account), from the copy when it holds the tenant."""
        state = self._states.get(tenant) if self.listening else None
        if state is not None:
            return state.view(tenant, now)
        if not self.listening:
            return await views.balance_view(self._db, tenant, now)
        epoch, drops = self._epoch, self._drops
        self._misses[tenant] = self._misses.get(tenant, 0) + 1
        try:
            found = await self._db.fetchval(STATE_OF_TENANT_SQL, tenant)
            if found is None:
                return None
            state = TenantState(orjson.loads(found))
            if self.listening and epoch == self._epoch and self._dropped_at.get(tenant, drops) <= drops:
                held = self._states.get(tenant)
                if held is None:
                    if len(self._states) >= self._tenants_max:
                        del self._states[next(iter(self._states))]  # the oldest entry
                    self._states[tenant] = state
                elif state.version >= held.version:
                    self._states[tenant] = state
            return state.view(tenant, now)
        finally:
            if self._misses[tenant] == 1:
                del self._misses[tenant]
                self._dropped_at.pop(tenant, None)
            else:
                self._misses[tenant] -= 1

    def notified(self, payload: str) -> None:
        """One notification: RESET, or a JSON array of tenant states (and names of tenants to drop)."""
        if payload == RESET:
            self.reset()
            return
        states = self._states
        for found in orjson.loads(payload):
            if type(found) is str:
                if found == RESET:
                    self.reset()
                else:
                    self._dropped(found)
                continue
            tenant = found[0]
            held = states.get(tenant)
            if held is None:
                if len(states) < self._tenants_max:
                    states[tenant] = TenantState(found)
            elif found[1] >= held.version:
                states[tenant] = TenantState(found)

    def _dropped(self, tenant: str) -> None:
        """A tenant named only: its state changed but is not given, so the held one and any miss in flight go."""
        self._states.pop(tenant, None)
        self._drops += 1
        if tenant in self._misses:
            self._dropped_at[tenant] = self._drops

    def reset(self) -> None:
        self._epoch += 1
        self._states.clear()

    def _stop_listening(self) -> None:
        self.listening = False
        self.reset()

    async def listen(self, stopping: asyncio.Event) -> None:
        """The listener task: LISTEN on a connection of its own (a pool's must keep no session state), a check
        query every ``BALANCE_LISTENER_CHECK_SECONDS``; on loss, the copy dropped and LISTEN tried again."""
        delay = 0.1
        while not stopping.is_set():
            conn: asyncpg.Connection | None = None
            lost = asyncio.Event()
            try:
                conn = await asyncpg.connect(self._url, server_settings={
                    "search_path": self._schema, "application_name": "billing projections balance listener"})
                self.listener_pid = conn.get_server_pid()
                conn.add_termination_listener(functools.partial(_set, lost))
                await conn.add_listener(self.channel, lambda _c, _pid, _ch, payload: self.notified(payload))
                self.reset()
                self.listening = True
                log.info("balance_listener_started", channel=self.channel)
                delay = 0.1
                while not stopping.is_set() and not lost.is_set():
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(_first(stopping, lost), BALANCE_LISTENER_CHECK_SECONDS)
                    if not stopping.is_set() and not lost.is_set():
                        await conn.fetchval("SELECT 1", timeout=BALANCE_LISTENER_CHECK_SECONDS)
            except asyncio.CancelledError:
                raise
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                # the connection failed or was lost: reads go to the query path meanwhile
                log.warning("balance_listener_lost", error=repr(exc)[:300])
            finally:
                self._stop_listening()
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close(timeout=1)
            if not stopping.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stopping.wait(), delay)
                delay = min(delay * 2, BALANCE_LISTENER_RETRY_SECONDS_MAX)


def _set(event: asyncio.Event, *_: Any) -> None:
    event.set()


async def _first(*events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


async def notify_reset(conn: Any) -> None:
    """``*`` on this schema's channel, sent when the transaction of ``conn`` commits (PostgreSQL only)."""
    schema = await conn.fetchval("SELECT current_schema()")
    await conn.execute("SELECT pg_notify($1, $2)", channel(schema), RESET)

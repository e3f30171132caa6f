"""The query API's copy of balance states (balance_cache.py), on PostgreSQL (``DATABASE_URL``): it answers what
the query answers for the same committed state, follows commits through the consumer's notifications, never goes
backwards, is dropped when LISTEN is lost (reads take the query meanwhile) or the catalogue changes a unit's
scale, and holds at most its cap of tenants."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest
from billing_events.timeutil import utcnow
from billing_projections import views
from billing_projections.balance_cache import NOTIFY_SQL, STATE_OF_TENANT_SQL, BalanceCache, channel
from billing_projections.service import ProjectionService
from billing_runtime.db import PostgresDatabase

from tests.unit.projections.conftest import apply
from tests.unit.projections.ledger_events import (
    Ledger,
    U,
    full_scenario,
    period_ended_scenario,
    simple_account,
    uid,
    usage_debit,
)

URL = os.environ.get("DATABASE_URL", "")
pytestmark = pytest.mark.skipif(not URL, reason="DATABASE_URL is not set")


@dataclass
class Stack:
    service: ProjectionService
    db: PostgresDatabase
    cache: BalanceCache
    schema: str
    ledger: Ledger


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    schema = f"balance_cache_{uuid.uuid4().hex[:10]}"
    db = await PostgresDatabase(URL, schema, reset_sessions=False).connect()
    stopping = asyncio.Event()
    try:
        service = ProjectionService(db, notify_balances=True)
        await service.setup()
        cache = BalanceCache(db, URL, schema)
        listener = asyncio.create_task(cache.listen(stopping))
        await until(lambda: cache.listening)
        yield Stack(service, db, cache, schema, Ledger())
        stopping.set()
        await listener
    finally:
        await db.execute("DO $$ BEGIN EXECUTE format('DROP SCHEMA %I CASCADE', current_schema()); END $$")
        await db.close()


async def until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


async def state_of(stack: Stack, tenant: str) -> list[Any]:
    found: list[Any] = orjson.loads(await stack.db.fetchval(STATE_OF_TENANT_SQL, tenant))
    return found


async def test_the_copy_answers_as_the_query_and_follows_commits(stack: Stack) -> None:
    ledger, cache = stack.ledger, stack.cache
    full_scenario(ledger, "acme")
    a = simple_account(ledger, "globex", debits=3)
    now = utcnow()
    a.grant_credit(grant_id=uid("globex", "soon"), unit="USD", amount=5 * U, effective_at=now,
                   expires_at=now + timedelta(days=3), scope=None, source="manual", cause={}, granted_by="t")
    ledger.save(a, ledger.open("empty"))
    await apply(stack.service, ledger.records())
    await until(lambda: len(cache) == 3)
    for tenant in ("acme", "globex", "empty"):
        assert await cache.view(tenant, now) == await views.balance_view(stack.db, tenant, now)
        # "expiring soon" is still of the read's time: a week later the grant is past
        later = now + timedelta(days=6)
        assert await cache.view(tenant, later) == await views.balance_view(stack.db, tenant, later)
    assert await cache.view("nobody", now) is None
    before = await cache.view("globex", now)
    assert before is not None
    a.debit_usage(command_id=uid("globex", "more"), unit="USD", amount=U, meter="api_calls", at=now,
                  overage_policy="overage", cause={})
    ledger.save(a)
    state = cache._states["globex"]
    await apply(stack.service, ledger.records())
    expected = await views.balance_view(stack.db, "globex", now)
    assert expected is not None and expected["position"] > before["position"]
    await until(lambda: cache._states["globex"] is not state)  # the notification, not a query, refreshed it
    assert await cache.view("globex", now) == expected


async def test_the_copy_shows_the_credit_set_aside_at_a_periods_end_as_the_query(stack: Stack) -> None:
    """A plan credit set aside at its period's end (``GrantSetAside``: in the balance, not available) and drawn by the
    period's late usage: the copy's ``late_usage_reserve`` and ``available`` are the query's, commit after commit."""
    ledger, cache = stack.ledger, stack.cache
    period_ended_scenario(ledger)
    await apply(stack.service, ledger.records())
    await until(lambda: "acme" in cache._states)
    now = utcnow()
    view = await cache.view("acme", now)
    assert view == await views.balance_view(stack.db, "acme", now)
    assert view is not None
    [usd] = view["wallets"]
    assert (usd["balance"], usd["available"], usd["late_usage_reserve"]) == ("6.00", "0.00", "6.00")
    state = cache._states["acme"]
    usage_debit(ledger, "acme", "2.50", datetime(2026, 11, 25, tzinfo=UTC), meter="seats")  # late: from the reserve
    await apply(stack.service, ledger.records())
    await until(lambda: cache._states["acme"] is not state)
    view = await cache.view("acme", now)
    assert view == await views.balance_view(stack.db, "acme", now)
    assert view is not None
    [usd] = view["wallets"]
    assert (usd["balance"], usd["available"], usd["late_usage_reserve"]) == ("3.50", "0.00", "3.50")


async def test_a_state_never_goes_backwards(stack: Stack) -> None:
    ledger, cache = stack.ledger, stack.cache
    a = simple_account(ledger, "globex", debits=2)
    await apply(stack.service, ledger.records())
    await until(lambda: "globex" in cache._states)
    old = await state_of(stack, "globex")
    a.debit_usage(command_id=uid("globex", "more"), unit="USD", amount=U, meter="api_calls", at=utcnow(),
                  overage_policy="overage", cause={})
    ledger.save(a)
    await apply(stack.service, ledger.records())
    new = await state_of(stack, "globex")
    assert new[1] > old[1]
    await until(lambda: cache._states["globex"].version == new[1])
    cache.notified(orjson.dumps([old]).decode())  # a late notification of an older commit
    assert cache._states["globex"].version == new[1]
    # A miss whose query raced a newer notification keeps the newer state.
    cache.reset()
    cache.notified(orjson.dumps([new]).decode())
    fetch = stack.db.fetchval

    async def stale_query(sql: str, *args: Any) -> Any:
        return orjson.dumps(old).decode() if sql == STATE_OF_TENANT_SQL else await fetch(sql, *args)

    stack.db.fetchval = stale_query  # type: ignore[method-assign]
    try:
        cache._states.pop("globex")
        cache.notified(orjson.dumps([new]).decode())  # arrives while the miss's query is out
        await cache.view("globex", utcnow())
    finally:
        stack.db.fetchval = fetch  # type: ignore[method-assign]
    assert cache._states["globex"].version == new[1]


async def test_a_miss_that_raced_a_reset_is_not_kept(stack: Stack) -> None:
    ledger, cache = stack.ledger, stack.cache
    simple_account(ledger, "globex", debits=1)
    await apply(stack.service, ledger.records())
    await until(lambda: "globex" in cache._states)
    cache.reset()
    fetch = stack.db.fetchval

    async def reset_meanwhile(sql: str, *args: Any) -> Any:
        found = await fetch(sql, *args)
        cache.notified("*")
        return found

    stack.db.fetchval = reset_meanwhile  # type: ignore[method-assign]
    try:
        assert await cache.view("globex", utcnow()) == await views.balance_view(stack.db, "globex", utcnow())
    finally:
        stack.db.fetchval = fetch  # type: ignore[method-assign]
    assert "globex" not in cache._states


async def test_a_miss_that_raced_a_drop_by_name_is_not_kept(stack: Stack) -> None:
    """A tenant too large for a notification goes by name: a miss whose query read the state before that commit
    answers it but does not keep it, so the next read is the new balance, not the old one until the next change."""
    ledger = stack.ledger
    cache = BalanceCache(stack.db, URL, stack.schema)
    cache.listening = True  # as if LISTEN were established: the consumer's real notifications are given by hand
    big = ledger.open("big")
    now = utcnow()
    for i in range(60):  # 60 open grants with an end: a state over the 3000 bytes one notification carries
        big.grant_credit(grant_id=uid("big", i), unit="USD", amount=U, effective_at=now,
                         expires_at=now + timedelta(days=30 + i), scope=None, source="manual", cause={},
                         granted_by="t")
    ledger.save(big)
    await apply(stack.service, ledger.records())
    payloads: list[str] = []
    conn = await asyncpg.connect(URL)
    fetch = stack.db.fetchval

    async def commit_meanwhile(sql: str, *args: Any) -> Any:
        found = await fetch(sql, *args)  # the state before the debit below
        big.debit_usage(command_id=uid("big", "debit"), unit="USD", amount=U, meter="api_calls", at=now,
                        overage_policy="overage", cause={})
        ledger.save(big)
        await apply(stack.service, ledger.records())  # commits, and notifies "big" by name only
        await until(lambda: len(payloads) == 1)
        assert orjson.loads(payloads[0]) == ["big"]
        cache.notified(payloads[0])  # delivered while the miss's query is out
        return found

    try:
        await conn.add_listener(channel(stack.schema), lambda _c, _p, _ch, payload: payloads.append(payload))
        stack.db.fetchval = commit_meanwhile  # type: ignore[method-assign]
        try:
            old = await cache.view("big", now)
        finally:
            stack.db.fetchval = fetch  # type: ignore[method-assign]
    finally:
        await conn.close()
    new = await views.balance_view(stack.db, "big", now)
    assert old is not None and new is not None and new["position"] > old["position"]
    assert await cache.view("big", now) == new
    assert await cache.view("big", now) == new  # kept now: a miss begun after the drop
    assert "big" in cache._states
    assert not cache._misses and not cache._dropped_at  # held only while a miss is in flight


async def test_losing_the_listener_drops_the_copy_and_reads_take_the_query(stack: Stack) -> None:
    ledger, cache = stack.ledger, stack.cache
    a = simple_account(ledger, "globex", debits=1)
    await apply(stack.service, ledger.records())
    await until(lambda: "globex" in cache._states)
    assert cache.listener_pid is not None
    assert await stack.db.fetchval("SELECT pg_terminate_backend($1)", cache.listener_pid)
    await until(lambda: not cache.listening)
    assert len(cache) == 0
    # Meanwhile a commit (its notification goes nowhere) and a read: the query's answer, nothing kept.
    a.debit_usage(command_id=uid("globex", "more"), unit="USD", amount=U, meter="api_calls", at=utcnow(),
                  overage_policy="overage", cause={})
    ledger.save(a)
    await apply(stack.service, ledger.records())
    now = utcnow()
    assert await cache.view("globex", now) == await views.balance_view(stack.db, "globex", now)
    assert len(cache) == 0
    await until(lambda: cache.listening)  # LISTEN again, an empty copy filled anew
    assert await cache.view("globex", now) == await views.balance_view(stack.db, "globex", now)
    assert "globex" in cache._states


async def test_a_catalogue_change_of_scales_drops_the_copy(stack: Stack) -> None:
    ledger, cache = stack.ledger, stack.cache
    simple_account(ledger, "globex", debits=1)
    await apply(stack.service, ledger.records())
    await until(lambda: "globex" in cache._states)
    cache.notified("[]")
    ledger.publish_catalog({"credit_units": {"CREDIT": {"scale": 3}}, "meters": [{"code": "api_calls"}]})
    await apply(stack.service, ledger.records())
    await until(lambda: len(cache) == 0)


async def test_the_copy_holds_at_most_its_cap(stack: Stack) -> None:
    ledger = stack.ledger
    cache = BalanceCache(stack.db, URL, stack.schema, tenants_max=2)
    cache.listening = True  # as if LISTEN were established (notifications given by hand below)
    for tenant in ("t1", "t2", "t3"):
        simple_account(ledger, tenant)
    await apply(stack.service, ledger.records())
    states = [await state_of(stack, t) for t in ("t1", "t2", "t3")]
    cache.notified(orjson.dumps(states).decode())  # room for two: the third is not added
    assert sorted(cache._states) == ["t1", "t2"]
    await cache.view("t3", utcnow())  # a miss evicts the oldest
    assert sorted(cache._states) == ["t2", "t3"]
    cache.notified(orjson.dumps(["t2"]).decode())  # a tenant named alone is dropped
    assert sorted(cache._states) == ["t3"]


async def test_a_notification_stays_under_the_payload_limit(stack: Stack) -> None:
    """Many tenants go in several notifications; a tenant whose state is too large for one goes by name."""
    ledger = stack.ledger
    big = ledger.open("big")
    now = utcnow()
    for i in range(60):  # 60 open grants with an end: a state of ~4 KB
        big.grant_credit(grant_id=uid("big", i), unit="USD", amount=U, effective_at=now,
                         expires_at=now + timedelta(days=30 + i), scope=None, source="manual", cause={},
                         granted_by="t")
    ledger.save(big)
    tenants = [f"tenant-{i:03d}" for i in range(120)]
    for tenant in tenants:
        simple_account(ledger, tenant)
    await apply(stack.service, ledger.records())
    payloads: list[str] = []
    conn = await asyncpg.connect(URL)
    try:
        await conn.add_listener("test_payloads", lambda _c, _p, _ch, payload: payloads.append(payload))
        async with stack.db.transaction() as tx:
            await tx.execute(NOTIFY_SQL, "test_payloads", [*tenants, "big"])
        await until(lambda: sum(len(orjson.loads(p)) for p in payloads) == len(tenants) + 1)
    finally:
        await conn.close()
    assert len(payloads) > 1 and max(len(p.encode()) for p in payloads) < 8000
    items = [item for p in payloads for item in orjson.loads(p)]
    assert "big" in items and sorted(i[0] for i in items if type(i) is list) == tenants


async def test_a_replay_and_dropped_tables_drop_the_copy(stack: Stack) -> None:
    """A rebuild's service (no states notified) and a drop of the tables tell the copy to go."""
    ledger, cache = stack.ledger, stack.cache
    simple_account(ledger, "globex", debits=1)
    await apply(stack.service, ledger.records())
    await until(lambda: "globex" in cache._states)
    simple_account(ledger, "initech", debits=1)
    await apply(ProjectionService(stack.db), ledger.records())  # as `billing projections rebuild` writes
    await until(lambda: len(cache) == 0)
    await cache.view("globex", utcnow())
    assert "globex" in cache._states
    await stack.service.drop()
    await until(lambda: len(cache) == 0)
    assert await cache.view("globex", utcnow()) is None

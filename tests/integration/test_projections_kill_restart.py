"""SIGKILL the projections process mid-stream, restart it: nothing is lost and nothing applied twice.

Balances must equal the ledger's own (the aggregates that recorded the events); every movement must be in
the history exactly once; monthly usage and dashboard figures must count every debit once.
"""

from __future__ import annotations

import asyncio
import json
import signal
from decimal import Decimal
from pathlib import Path

import asyncpg
import httpx
import pytest
from billing_events.money import SUBUNITS_PER_UNIT

from tests.integration.projections_support import applied_offsets, publish, start_projections, wait_caught_up
from tests.support import auth, wait_until
from tests.unit.projections.ledger_events import Ledger, simple_account

pytestmark = pytest.mark.integration
TENANTS = 120
DEBITS = 150
PRICE = SUBUNITS_PER_UNIT // 5


async def _counts(database_url: str, schema: str) -> dict[str, dict[str, int]]:
    conn = await asyncpg.connect(database_url)
    try:
        history = await conn.fetch(f'SELECT tenant, COUNT(*) AS n, COUNT(DISTINCT position) AS d '
                                   f'FROM "{schema}".transactions GROUP BY tenant')
        monthly = await conn.fetch(f'SELECT tenant, SUM(events) AS n FROM "{schema}".usage_monthly GROUP BY tenant')
        consumed = await conn.fetch(f'SELECT tenant, SUM(consumed) AS n FROM "{schema}".figures_daily '
                                    "GROUP BY tenant")
    finally:
        await conn.close()
    return {
        "history": {r["tenant"]: int(r["n"]) for r in history},
        "history_distinct": {r["tenant"]: int(r["d"]) for r in history},
        "monthly_events": {r["tenant"]: int(r["n"]) for r in monthly},
        "consumed": {r["tenant"]: int(r["n"]) for r in consumed},
    }


def _consumer_pid(log_path: Path) -> int:
    started = [json.loads(line) for line in log_path.read_text(errors="replace").splitlines()
               if '"consumer_process_started"' in line]
    assert started, "the projections process logs its consumer child's pid"
    return int(started[-1]["pid"])


def _running(pid: int) -> bool:
    """Alive and not a zombie (an exited orphan waits for init to reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def test_sigkill_mid_stream_then_restart_double_applies_nothing(infra: dict[str, str],
                                                                  tmp_path_factory: pytest.TempPathFactory) -> None:
    stack = start_projections(infra, tmp_path_factory.mktemp("projections-kill"))
    try:
        ledger = Ledger()
        for i in range(TENANTS):
            simple_account(ledger, f"k-{i:03d}", grant=100 * SUBUNITS_PER_UNIT, debits=DEBITS, price=PRICE)
        messages = ledger.messages()
        half = len(messages) // 2
        asyncio.run(publish(stack, messages[:half]))
        total = half
        progress = wait_until(lambda: sum(asyncio.run(applied_offsets(stack.database_url, stack.schema)).values()),
                              timeout=60, interval=0.05, what="the first applied batch")
        stack.process.stop(signal.SIGKILL)
        assert progress < total, f"killed after everything was applied ({progress}/{total}): not mid-stream"
        # Its consumer child sees the parent gone (EOF on its stdin) and stops too: no orphan keeps consuming.
        child = _consumer_pid(stack.process.log_path)
        wait_until(lambda: not _running(child), timeout=30, what=f"consumer child {child} to stop")
        # While it is down: the rest of the stream, and a tail the ledger's relay re-published after a crash.
        asyncio.run(publish(stack, messages[half:]))
        asyncio.run(publish(stack, messages[half - 300:half + 300]))
        stack.restart()
        wait_caught_up(stack, timeout=180)

        for i in range(0, TENANTS, 7):
            tenant = f"k-{i:03d}"
            def balance_equal(tenant: str = tenant) -> bool:
                body = httpx.get(f"{stack.url}/v1/accounts/{tenant}/balance", headers=auth("viewer", tenant)).json()
                usd = next(w for w in body["wallets"] if w["unit"] == "USD")
                assert Decimal(usd["balance"]) * SUBUNITS_PER_UNIT == ledger.accounts[tenant].balance("USD"), tenant
                return True

            # Served from the API's copy, refreshed a moment after each commit (balance_cache.py).
            wait_until(balance_equal, timeout=10, interval=0.05, what=f"{tenant}'s balance")
        counts = asyncio.run(_counts(stack.database_url, stack.schema))
        expected_tenants = {f"k-{i:03d}" for i in range(TENANTS)}
        assert counts["history"] == counts["history_distinct"] == {t: DEBITS + 1 for t in expected_tenants}
        assert counts["monthly_events"] == {t: DEBITS for t in expected_tenants}
        assert counts["consumed"] == {t: DEBITS * PRICE for t in expected_tenants}
        balances = httpx.get(f"{stack.url}/v1/reports/accounts", headers=auth("finance")).json()["items"]
        for account in balances:
            wallet = account["wallets"][0]
            assert Decimal(wallet["balance"]) * SUBUNITS_PER_UNIT == ledger.accounts[account["tenant"]].balance("USD")
    finally:
        stack.process.stop()

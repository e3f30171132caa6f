"""`billing audit` against the real stack: the ledger's event store on PostgreSQL agrees with the
projections service's balance, and an export replays to the same balances."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from billing_cli.audit import app as audit_cli
from billing_events import ids, topics
from billing_events.messages import LedgerCommand
from billing_events.money import SUBUNITS_PER_UNIT
from typer.testing import CliRunner

from tests.integration.conftest import Stack
from tests.support import auth, wait_until

pytestmark = pytest.mark.integration


def command(kind: str, tenant: str, payload: dict[str, object], cause: str) -> LedgerCommand:
    return LedgerCommand(command_id=ids.command_id(kind, tenant, cause), kind=kind, tenant=tenant,
                         issued_at=datetime.now(UTC), issued_by="integration-test", payload=payload)


async def send(stack: Stack, commands: list[LedgerCommand]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=stack.env["KAFKA_BOOTSTRAP_SERVERS"], acks="all")
    await producer.start()
    try:
        for c in commands:
            await producer.send_and_wait(stack.topic(topics.LEDGER_COMMANDS), c.to_json(),
                                         key=str(ids.account_id(c.tenant or "")).encode())
    finally:
        await producer.stop()


def projected_available(stack: Stack, tenant: str) -> Decimal | None:
    response = httpx.get(f"{stack.projections_url}/v1/accounts/{tenant}/balance", headers=auth("viewer", tenant))
    if response.status_code != 200:
        return None
    wallets = {w["unit"]: w for w in response.json()["wallets"]}
    return Decimal(wallets["USD"]["available"]) if "USD" in wallets else None


def test_verify_agrees_with_projection_and_export_replays(stack: Stack, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    tenant = f"audit-{uuid.uuid4().hex[:8]}"
    at = datetime.now(UTC).isoformat()
    commands = [
        command("account.open", tenant, {"currency": "USD"}, "open"),
        command("credit.grant", tenant, {"grant_key": "g", "unit": "USD", "amount": "25.00", "source": "purchase",
                                         "effective_at": "2026-01-01T00:00:00+00:00"}, "grant"),
        *[command("usage.debit", tenant, {"unit": "USD", "amount_subunits": 1_250_000_000 + i, "meter": "m",
                                          "at": at}, f"u{i}") for i in range(5)],
    ]
    asyncio.run(send(stack, commands))
    expected = Decimal(25) - Decimal(5 * 1_250_000_000 + 10) / SUBUNITS_PER_UNIT
    wait_until(lambda: projected_available(stack, tenant) == expected, timeout=60,
               what=f"projection of {tenant} at {expected}")
    for name, value in stack.env.items():
        monkeypatch.setenv(name, value)
    runner = CliRunner()
    verified = runner.invoke(audit_cli, ["verify", "--tenant", tenant, "--projections-url", stack.projections_url,
                                         "--wait-seconds", "30"])
    assert verified.exit_code == 0, verified.output
    report = json.loads(verified.output)
    assert report["ok"] and report["events"] == 7 and report["wallets"]["USD"]["available"] == str(expected)
    out = tmp_path / "export.jsonl"
    assert runner.invoke(audit_cli, ["export", "--tenant", tenant, "--out", str(out)]).exit_code == 0
    replayed = runner.invoke(audit_cli, ["replay", str(out)])
    assert replayed.exit_code == 0, replayed.output
    assert json.loads(replayed.output)["wallets"] == report["wallets"]
    assert json.loads(replayed.output)["chain_head"] == report["chain_head"]

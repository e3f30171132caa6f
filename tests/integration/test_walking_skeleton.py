"""One usage event end to end on the real stack: Kafka raw -> ingest -> rating -> ledger -> projections."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from billing_events import topics

from tests.integration.conftest import Stack
from tests.support import BILLING, ROOT, auth, wait_until

pytestmark = pytest.mark.integration

PRICE = Decimal("0.20")  # examples/demo-catalog.yaml: api_calls per unit


def apply_accounts(stack: Stack, tmp_path: Path, tenants: list[str], amount: str = "100.00") -> None:
    """Publishes the demo catalogue plus accounts for ``tenants`` through `billing catalog apply`."""
    import yaml

    demo = yaml.safe_load((ROOT / "examples/demo-catalog.yaml").read_text())
    demo["accounts"] = [
        {"tenant": t, "currency": "USD", "grants": [{"key": "welcome", "unit": "USD", "amount": amount,
                                                     "source": "promotion"}]}
        for t in tenants
    ]
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(demo))
    subprocess.run([BILLING, "catalog", "apply", str(path)], env={**stack.processes["ingest"].env}, check=True,
                   cwd=ROOT, capture_output=True)


def available(stack: Stack, tenant: str) -> Decimal | None:
    response = httpx.get(f"{stack.projections_url}/v1/accounts/{tenant}/balance", headers=auth("viewer", tenant))
    if response.status_code == 404:
        return None
    response.raise_for_status()
    wallets = {w["unit"]: w for w in response.json()["wallets"]}
    return Decimal(wallets["USD"]["available"]) if "USD" in wallets else None


def wait_balance(stack: Stack, tenant: str, expected: Decimal, timeout: float = 60) -> None:
    wait_until(lambda: available(stack, tenant) == expected, timeout=timeout,
               what=f"{tenant} balance {expected} (now {available(stack, tenant)})")


def usage(tenant: str, event_id: str, quantity: str) -> dict[str, object]:
    return {"id": event_id, "tenant": tenant, "meter": "api_calls", "quantity": quantity,
            "timestamp": datetime.now(UTC).isoformat()}


async def produce_raw(stack: Stack, events: list[dict[str, object] | bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=stack.env["KAFKA_BOOTSTRAP_SERVERS"], acks="all")
    await producer.start()
    try:
        for event in events:
            value = event if isinstance(event, bytes) else json.dumps(event).encode()
            tenant = event.get("tenant", "x") if isinstance(event, dict) else "x"
            await producer.send_and_wait(stack.topic(topics.USAGE_RAW), value, key=str(tenant).encode())
    finally:
        await producer.stop()


def test_event_from_kafka_changes_balance_exactly_once(stack: Stack, tmp_path: Path) -> None:
    tenant = f"acme-{uuid.uuid4().hex[:8]}"
    apply_accounts(stack, tmp_path, [tenant])
    wait_balance(stack, tenant, Decimal("100.00"))

    first = usage(tenant, "evt-1", "23")
    asyncio.run(produce_raw(stack, [first]))
    wait_balance(stack, tenant, Decimal("100.00") - 23 * PRICE)

    # The same event again, then a marker on the same partition: once the marker is visible, the
    # duplicate has been processed too, and it must not have moved the balance.
    asyncio.run(produce_raw(stack, [first, usage(tenant, "evt-marker", "1")]))
    wait_balance(stack, tenant, Decimal("100.00") - 24 * PRICE)


def test_http_usage_gets_per_event_results_and_dead_letters(stack: Stack, tmp_path: Path) -> None:
    tenant = f"http-{uuid.uuid4().hex[:8]}"
    apply_accounts(stack, tmp_path, [tenant])
    wait_balance(stack, tenant, Decimal("100.00"))
    good = usage(tenant, "h-1", "2.5")
    naive = dict(usage(tenant, "h-2", "1"), timestamp="2026-11-21T10:00:00")
    body = json.dumps({"events": [good, good, naive, {"id": "h-3", "tenant": tenant}]})
    # A float-looking quantity must never be parsed as a binary float.
    body = body[:-2] + ', {"id": "h-4", "tenant": "' + tenant + '", "meter": "api_calls", "quantity": 1e400, ' \
        '"timestamp": "2026-11-21T10:00:00Z"}]}'
    response = httpx.post(f"{stack.ingest_url}/v1/usage", content=body, headers=auth("service"))
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["status"] for r in results] == ["accepted", "duplicate", "rejected", "rejected", "rejected"]
    assert [r.get("reason") for r in results[2:]] == ["naive_timestamp", "schema_invalid", "invalid_quantity"]
    wait_balance(stack, tenant, Decimal("100.00") - Decimal("2.5") * PRICE)

    async def dead_letters() -> list[dict[str, object]]:
        consumer = AIOKafkaConsumer(stack.topic(topics.USAGE_REJECTED), auto_offset_reset="earliest",
                                    bootstrap_servers=stack.env["KAFKA_BOOTSTRAP_SERVERS"], enable_auto_commit=False)
        await consumer.start()
        try:
            batches = await consumer.getmany(timeout_ms=5000, max_records=10000)
            records = [json.loads(r.value) for rs in batches.values() for r in rs]
        finally:
            await consumer.stop()
        return [r for r in records if r.get("tenant") == tenant]

    letters = asyncio.run(dead_letters())
    assert sorted(str(r["reason"]) for r in letters) == ["invalid_quantity", "naive_timestamp", "schema_invalid"]
    assert all(r["payload"] for r in letters)


def test_bad_kafka_record_is_dead_lettered_and_consumer_keeps_going(stack: Stack, tmp_path: Path) -> None:
    tenant = f"bad-{uuid.uuid4().hex[:8]}"
    apply_accounts(stack, tmp_path, [tenant])
    wait_balance(stack, tenant, Decimal("100.00"))
    asyncio.run(produce_raw(stack, [b"{not json", b"[1,2]", json.dumps(usage(tenant, "ok-1", "5")).encode()]))
    wait_balance(stack, tenant, Decimal("100.00") - 5 * PRICE)


def test_auth_errors_are_problem_json(stack: Stack) -> None:
    url = f"{stack.projections_url}/v1/accounts/acme/balance"
    missing = httpx.get(url)
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert missing.headers["content-type"].startswith("application/problem+json")
    bad = httpx.get(url, headers={"Authorization": "Bearer not-a-jwt"})
    assert bad.status_code == 401 and "invalid_token" in bad.headers["www-authenticate"]
    other = httpx.get(url, headers=auth("viewer", "someone-else"))
    assert other.status_code == 403 and other.json()["status"] == 403
    viewer_posting = httpx.post(f"{stack.ingest_url}/v1/usage", json=[], headers=auth("viewer", "acme"))
    assert viewer_posting.status_code == 403


def test_two_ledger_processes_split_partitions_without_double_posting(stack: Stack, tmp_path: Path) -> None:
    tenants = [f"pool-{i}-{uuid.uuid4().hex[:6]}" for i in range(24)]
    apply_accounts(stack, tmp_path, tenants, amount="10.00")
    for tenant in tenants:
        wait_balance(stack, tenant, Decimal("10.00"))
    # Every tenant's grant posted exactly once even though two ledger processes share the partitions.
    events = [usage(t, "split-1", "1") for t in tenants]
    asyncio.run(produce_raw(stack, events + events))  # everything twice
    for tenant in tenants:
        wait_balance(stack, tenant, Decimal("10.00") - PRICE)

    async def members() -> dict[str, list[int]]:
        admin = AIOKafkaAdminClient(bootstrap_servers=stack.env["KAFKA_BOOTSTRAP_SERVERS"])
        await admin.start()
        try:
            described = await admin.describe_consumer_groups([f"{stack.namespace}.billing-ledger"])
        finally:
            await admin.close()
        from aiokafka.protocol.group import MemberAssignment

        result: dict[str, list[int]] = {}
        for group in described:
            for member in group.groups[0][5] if hasattr(group, "groups") else []:
                assignment = MemberAssignment.decode(member[4])
                result[member[0]] = sorted(p for _, parts in assignment.assignment for p in parts)
        return result

    assigned = asyncio.run(members())
    assert len(assigned) == 2, assigned
    assert all(assigned.values()), f"both ledger processes own partitions: {assigned}"

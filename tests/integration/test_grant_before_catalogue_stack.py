"""A ``credit.grant`` read before the catalogue that declares its unit, on the real stack: the grant (naming the
catalogue, ``catalog_digest``) is sent to billing.ledger.commands under its account's key and read by the ledger
processes; only seconds later is the catalogue published (``POST /v1/catalog``, under the catalogue's key, another
partition). The grant waits for it and is then applied: the tenant's balance shows the credit. Before, it was rejected
``unknown_unit`` the moment it was read."""

from __future__ import annotations

import asyncio
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from aiokafka import AIOKafkaProducer
from billing_events import ids, topics
from billing_events.messages import LedgerCommand
from billing_events.timeutil import utcnow
from billing_rating.catalog_view import validate_document
from billing_rating.http import publish_command

from tests.integration.conftest import Stack
from tests.integration.test_walking_skeleton import apply_accounts, wait_balance
from tests.support import ROOT, auth, wait_until

pytestmark = pytest.mark.integration


def _wallets(stack: Stack, tenant: str) -> dict[str, Decimal]:
    answer = httpx.get(f"{stack.projections_url}/v1/accounts/{tenant}/balance", headers=auth("viewer", tenant))
    answer.raise_for_status()
    return {w["unit"]: Decimal(w["available"]) for w in answer.json()["wallets"]}


async def _send(stack: Stack, command: LedgerCommand) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=stack.env["KAFKA_BOOTSTRAP_SERVERS"], acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(stack.topic(topics.LEDGER_COMMANDS), command.to_json(),
                                     key=str(ids.account_id(command.tenant or "")).encode(),
                                     headers=[("schema", b"ledger.command/v1")])
    finally:
        await producer.stop()


def test_a_grant_read_before_its_catalogue_is_applied_once_the_catalogue_is_published(
        stack: Stack, tmp_path: Path) -> None:
    tenant = f"gpu-{uuid.uuid4().hex[:8]}"
    apply_accounts(stack, tmp_path, [tenant])
    wait_balance(stack, tenant, Decimal("100.00"))
    demo: dict[str, Any] = yaml.safe_load((ROOT / "examples/demo-catalog.yaml").read_text())["catalog"]
    with_gpu = {**demo, "credit_units": {**demo.get("credit_units", {}), "GPU": {"scale": 3}}}
    digest = str(publish_command(validate_document(with_gpu).model_dump(mode="json"), "-").payload["digest"])
    grant = LedgerCommand(command_id=ids.command_id("credit.grant", tenant, "gpu"), kind="credit.grant",
                          tenant=tenant, issued_at=utcnow(), issued_by="user:ops",
                          payload={"grant_key": "gpu", "unit": "GPU", "amount": "12.5", "source": "manual",
                                   "catalog_digest": digest})
    try:
        asyncio.run(_send(stack, grant))
        time.sleep(3)  # the ledger has read the grant by now; no catalogue declares GPU yet
        assert "GPU" not in _wallets(stack, tenant)
        published = httpx.post(f"{stack.rating_url}/v1/catalog", headers=auth("admin"), json=with_gpu, timeout=30)
        assert published.status_code == 202, published.text
        assert published.json()["catalog_digest"] == digest
        wait_until(lambda: _wallets(stack, tenant).get("GPU") == Decimal("12.5"), timeout=60,
                   what=f"{tenant}'s 12.5 GPU granted after its catalogue")
        assert _wallets(stack, tenant)["USD"] == Decimal("100.00")
    finally:
        # The session's other tests share the stack: the demo catalogue back.
        assert httpx.post(f"{stack.rating_url}/v1/catalog", headers=auth("admin"), json=demo,
                          timeout=30).status_code == 202

"""Payments on the real stack (``billing serve`` processes, Kafka, PostgreSQL, fresh namespace).

The ledger processes have no gateway credentials (nothing may call a real gateway), so an order cannot be
placed through the checkout route here; what ingest publishes after verifying a webhook is produced
directly: a ``payment_succeeded`` PaymentNotification for an order the ledger does not know, delivered
twice, raises the balance exactly once. The account's payment settings routes answer on a ledger process.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from billing_events import ids, topics
from billing_events.messages import PaymentNotification

from tests.integration.conftest import Stack
from tests.integration.test_walking_skeleton import apply_accounts, available, wait_balance
from tests.support import auth

pytestmark = pytest.mark.integration


async def produce_payments(stack: Stack, notifications: list[PaymentNotification]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=stack.env["KAFKA_BOOTSTRAP_SERVERS"], acks="all")
    await producer.start()
    try:
        for notification in notifications:  # keyed by account: one partition, in this order
            await producer.send_and_wait(stack.topic(topics.PAYMENTS), notification.to_json(),
                                         key=str(ids.account_id(notification.tenant)).encode())
    finally:
        await producer.stop()


def paid(tenant: str, event_id: str, amount: str) -> PaymentNotification:
    return PaymentNotification(gateway="stripe", gateway_event_id=event_id, kind="payment_succeeded", tenant=tenant,
                               order_id=f"unknown-order-{event_id}", amount=Decimal(amount), currency="USD",
                               verified_at=datetime.now(UTC), gateway_reference=f"pi_{event_id}")


def test_a_payment_notification_delivered_twice_raises_the_balance_once(stack: Stack, tmp_path: Path) -> None:
    tenant = f"payit-{uuid.uuid4().hex[:6]}"
    apply_accounts(stack, tmp_path, [tenant], amount="20.00")
    wait_balance(stack, tenant, Decimal("20.00"))

    twice = paid(tenant, "evt_twice", "19.99")
    # The marker goes after both deliveries on the same partition: once it shows, the duplicate was consumed.
    asyncio.run(produce_payments(stack, [twice, twice, paid(tenant, "evt_marker", "1.00")]))
    wait_balance(stack, tenant, Decimal("40.99"))
    assert available(stack, tenant) == Decimal("40.99")


def test_payment_settings_routes_on_a_ledger_process(stack: Stack, tmp_path: Path) -> None:
    tenant = f"payset-{uuid.uuid4().hex[:6]}"
    apply_accounts(stack, tmp_path, [tenant], amount="20.00")
    wait_balance(stack, tenant, Decimal("20.00"))
    base = f"{stack.ledger_url}/v1/accounts/{tenant}"
    admin = auth("admin", tenant)

    low = httpx.put(f"{base}/low-balance", json={"threshold": "5"}, headers=admin, timeout=10)
    assert low.status_code == 200, low.text
    assert low.json()["low_balance"] == {"unit": "USD", "threshold": "5"}
    rule = {"threshold": "2", "target": "30", "cooldown_seconds": 3600, "monthly_cap": "100"}
    put = httpx.put(f"{base}/auto-top-up", json=rule, headers=admin, timeout=10)
    assert put.status_code == 200, put.text
    assert put.json()["auto_top_up"] == {"unit": "USD", **rule, "package": None}
    assert httpx.put(f"{base}/auto-top-up", json=rule, headers=auth("viewer", tenant), timeout=10).status_code == 403
    cleared = httpx.delete(f"{base}/auto-top-up", headers=admin, timeout=10)
    assert cleared.status_code == 200 and cleared.json()["cleared"] is True
    # No gateway is configured on the stack: the checkout route says so instead of calling one.
    refused = httpx.post(f"{base}/checkout", json={"amount": "10", "success_url": "https://a.test/ok",
                                                  "cancel_url": "https://a.test/no"}, headers=admin, timeout=10)
    assert refused.status_code == 422 and refused.json()["type"].endswith("gateway-not-enabled")

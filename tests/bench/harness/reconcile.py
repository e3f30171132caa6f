"""Reconciliation: every event produced is posted exactly once or rejected with its reason.

Three independent sources, each checked against what the stream generator says must happen:

1. ``<ns>.billing.ledger.events`` (the ledger's own record, de-duplicated by ``position`` as any consumer
   does): each good event id is in exactly one ``BillingAccount.UsageDebited``, no other usage is posted,
   and each tenant's posted amounts add up to its expected charge from the catalogue prices;
2. ``<ns>.billing.usage.rejected``: one dead letter per bad event, with the expected stage and reason,
   and none for a good event;
3. the projections' ``GET /v1/accounts/{tenant}/balance``: each tenant's balance dropped by exactly its
   expected charge (so the duplicates changed nothing), and the marker tenant by its markers.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from decimal import Decimal
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition
from billing_events import ids

from tests.bench.harness.stream import GRANT_USD, MARKER_PRICE, SUBUNITS_PER_UNIT, Expected

USAGE_DEBITED = b'"BillingAccount.UsageDebited"'


async def read_topic(bootstrap: str, topic: str, partitions: int, wanted: bytes | None = None) -> list[Any]:
    """Every record of ``topic`` up to its current end, decoded (only those containing ``wanted``)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                                max_poll_records=10000, fetch_max_bytes=64 * 1024 * 1024,
                                max_partition_fetch_bytes=16 * 1024 * 1024)
    await consumer.start()
    out: list[Any] = []
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        remaining = {tp for tp in tps if ends[tp] > 0}
        while remaining:
            batches = await consumer.getmany(*remaining, timeout_ms=1000, max_records=10000)
            for tp, records in batches.items():
                for record in records:
                    if wanted is None or wanted in (record.value or b""):
                        out.append(json.loads(record.value))
                if records and records[-1].offset + 1 >= ends[tp]:
                    remaining.discard(tp)
    finally:
        await consumer.stop()
    return out


def _subunits(text: str) -> int:
    return int(Decimal(text) * SUBUNITS_PER_UNIT)


async def reconcile(*, bootstrap: str, namespace: str, partitions: int, projections_url: str, token: Any,
                    expected: Expected, marker_tenant: str, markers_published: int) -> dict[str, Any]:
    problems: list[str] = []
    charges = expected.charge_subunits()
    tenants = sorted(expected.good_ids)
    account_tenant = {str(ids.account_id(t)): t for t in [*tenants, marker_tenant]}
    good_owner = {event_id: tenant for tenant, event_ids in expected.good_ids.items() for event_id in event_ids}

    # 1. The ledger's record.
    events = await read_topic(bootstrap, f"{namespace}.billing.ledger.events", partitions, USAGE_DEBITED)
    by_position = {e["position"]: e for e in events if e["type"] == "BillingAccount.UsageDebited"}
    postings: Counter[str] = Counter()
    posted_amount: dict[str, int] = defaultdict(int)
    markers_posted = 0
    for event in by_position.values():
        tenant = account_tenant.get(event["aggregate_id"])
        for event_id in event["data"].get("cause", {}).get("event_ids", []):
            postings[event_id] += 1
            if tenant == marker_tenant:
                markers_posted += 1
        if tenant is not None:
            posted_amount[tenant] += int(event["data"]["amount"])
    missing = [e for e in good_owner if postings[e] == 0]
    twice = [e for e, n in postings.items() if n > 1]
    unexpected = [e for e in postings if e not in good_owner and "-marker-" not in e]
    if missing:
        problems.append(f"{len(missing)} good events never posted, e.g. {missing[:3]}")
    if twice:
        problems.append(f"{len(twice)} events posted more than once, e.g. {twice[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} events posted that should not be, e.g. {unexpected[:3]}")
    ledger_mismatch = {t: (posted_amount.get(t, 0), charges.get(t, 0)) for t in tenants
                       if posted_amount.get(t, 0) != charges.get(t, 0)}
    if ledger_mismatch:
        problems.append(f"ledger amounts differ from the catalogue prices for {len(ledger_mismatch)} tenants: "
                        f"{dict(list(ledger_mismatch.items())[:3])} (posted, expected sub-units)")

    # 2. Dead letters.
    letters = await read_topic(bootstrap, f"{namespace}.billing.usage.rejected", partitions)
    got = Counter((r["stage"], r["reason"]) for r in letters)
    if got != expected.bad:
        problems.append(f"dead letters {dict(got)} != expected {dict(expected.bad)}")
    wrong_reason = [r["event_id"] for r in letters if r.get("event_id") in expected.bad_ids
                    and expected.bad_ids[r["event_id"]] != (r["stage"], r["reason"])]
    rejected_good = [r["event_id"] for r in letters if r.get("event_id") in good_owner]
    if wrong_reason:
        problems.append(f"{len(wrong_reason)} bad events rejected for another reason, e.g. {wrong_reason[:3]}")
    if rejected_good:
        problems.append(f"{len(rejected_good)} good events were rejected, e.g. {rejected_good[:3]}")

    # 3. Balances as the query API shows them.
    grant = _subunits(GRANT_USD)
    balance_mismatch: dict[str, tuple[int, int]] = {}
    async with httpx.AsyncClient(base_url=projections_url, timeout=30) as client:
        for tenant in [*tenants, marker_tenant]:
            response = await client.get(f"/v1/accounts/{tenant}/balance", headers=token(tenant))
            response.raise_for_status()
            wallets = {w["unit"]: w for w in response.json()["wallets"]}
            drop = grant - _subunits(wallets["USD"]["available"])
            want = (markers_published * _subunits(str(MARKER_PRICE)) if tenant == marker_tenant
                    else charges.get(tenant, 0))
            if drop != want:
                balance_mismatch[tenant] = (drop, want)
    if balance_mismatch:
        problems.append(f"balances differ for {len(balance_mismatch)} tenants: "
                        f"{dict(list(balance_mismatch.items())[:3])} (drop, expected sub-units)")
    if markers_posted != markers_published:
        problems.append(f"{markers_posted} markers posted, {markers_published} published")

    return {
        "ok": not problems,
        "problems": problems,
        "good_events": expected.good_count,
        "posted_once": sum(1 for e in good_owner if postings[e] == 1),
        "duplicates_sent": expected.duplicates,
        "bad_events_sent": expected.bad_count,
        "dead_letters": len(letters),
        "dead_letters_by_reason": {f"{s}:{r}": n for (s, r), n in sorted(got.items())},
        "markers_published": markers_published,
        "markers_posted": markers_posted,
        "tenants_checked": len(tenants) + 1,
        "expected_charge_usd": str(Decimal(sum(charges.values())) / SUBUNITS_PER_UNIT),
        "posted_charge_usd": str(Decimal(sum(posted_amount[t] for t in tenants)) / SUBUNITS_PER_UNIT),
    }

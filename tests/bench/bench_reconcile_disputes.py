"""``billing reconcile disputes`` on a store with many receipts (a plain script; pytest does not collect it).

    DATABASE_URL=postgresql://billing:billing@127.0.0.1:55432/billing \\
        .venv/bin/python tests/bench/bench_reconcile_disputes.py [--debits 500000] [--tenants 200] [--rejections 20]

Every ledger command leaves a receipt, so a store's receipts are mostly usage debits (ten thousand a second at the
target rate). The bench fills a fresh schema (``bench_<random>_billing_ledger``, dropped at the end) with ``--debits``
usage debits over ``--tenants`` accounts, then gives one more tenant a paid top-up and ``--rejections`` dispute
notifications the ledger rejects (a chargeback above the order). It times, best of three:

* ``reconcile.disputes(app, [tenant])``: the whole listing, the rejected notifications read from the tenant's
  ``DisputeRejections`` (since session 14);
* ``reconcile.scanned_rejected_dispute_commands``: what session 13 did to find them, a scan of every receipt of the
  store (``--scan-receipts`` now, for rejections recorded before the index).

Both must find the same ``--rejections`` commands.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
from billing_events import ids
from billing_events.messages import LedgerCommand, PaymentNotification
from billing_ledger import reconcile
from billing_ledger.application import LedgerApplication, persistence_env
from billing_ledger.domain.receipt import RECORDED_TOPIC as RECEIPT_RECORDED_TOPIC
from billing_ledger.payment_commands import payment_command
from eventsourcing.persistence import Tracking

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for tests.*
from tests.bench.bench_ledger import command, debit_records, setup_accounts
from tests.unit.payments.support import CATALOG

DISPUTED = "bench-disputed"
BATCH = 500


def best_of(runs: int, read: Callable[[], Any]) -> tuple[float, Any]:
    seconds, found = [], None
    for _ in range(runs):
        started = time.perf_counter()
        found = read()
        seconds.append(time.perf_counter() - started)
    return min(seconds), found


def fill(app: LedgerApplication, tenants: list[str], debits: int, rejections: int) -> None:
    """The store: ``debits`` usage debits (a receipt each) and ``rejections`` rejected dispute notifications of one
    tenant's top-up."""
    [published] = app.apply_commands([LedgerCommand(
        command_id=ids.command_id("catalog.publish", "-", "bench"), kind="catalog.publish", tenant=None,
        issued_at=datetime.now(UTC), issued_by="bench", payload={"document": CATALOG, "digest": "bench"})])
    assert published.outcome == "applied", published
    setup_accounts(app, tenants)
    records = debit_records(tenants, debits, uuid.uuid4().hex[:8])
    for start in range(0, len(records), BATCH):
        chunk = [LedgerCommand.model_validate_json(r) for r in records[start:start + BATCH]]
        results = app.apply_commands(chunk, Tracking("kafka:bench:0", start + len(chunk)))
        assert all(r.outcome == "applied" for r in results), results[:3]
    placed = app.apply_commands([command("account.open", DISPUTED, {"currency": "USD"}, "open"),
                                 command("tax_profile.set", DISPUTED, {"country": "DE", "business_name": "Bench GmbH"},
                                         "tax"),
                                 command("checkout.place", DISPUTED, {"key": "o1", "gateway": "stripe", "amount": "50"},
                                         "place")])
    assert all(r.outcome == "applied" for r in placed), placed
    order = placed[-1].value
    now = datetime.now(UTC)
    paid = PaymentNotification(gateway="stripe", gateway_event_id="evt-pay", kind="payment_succeeded", tenant=DISPUTED,
                               order_id=order["order_id"], amount=Decimal(order["quote"]["total"]), currency="USD",
                               verified_at=now, gateway_reference="pi-o1")
    over = [PaymentNotification(gateway="stripe", gateway_event_id=f"evt-over-{i}", kind="dispute_closed",
                                tenant=DISPUTED, order_id=order["order_id"], amount=Decimal("500.00"), currency="USD",
                                verified_at=now, gateway_reference=f"dp_{i}/lost", dispute=f"dp_{i}",
                                disputed_payment="pi-o1", dispute_outcome="lost") for i in range(rejections)]
    results = app.apply_commands([payment_command(m) for m in [paid, *over]], Tracking("kafka:bench:1", 1))
    assert [r.outcome for r in results] == ["applied"] + ["rejected"] * rejections, results


def stored(database_url: str, schema: str) -> tuple[int, int]:
    """(receipts, events) in the bench's store."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute(f'SELECT count(*) FILTER (WHERE topic = %s), count(*) FROM "{schema}".ledger_events',
                           (RECEIPT_RECORDED_TOPIC,)).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--debits", type=int, default=500_000)
    parser.add_argument("--tenants", type=int, default=200)
    parser.add_argument("--rejections", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    from tests.bench.harness.resources import host_speed_ms

    print(f"host speed {host_speed_ms()} ms (tests/bench/harness/resources.host_speed_ms: lower is faster)")
    database_url = os.environ.get("DATABASE_URL", "postgresql://billing:billing@127.0.0.1:55432/billing")
    schema = f"bench_{uuid.uuid4().hex[:8]}_billing_ledger"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    app = LedgerApplication(persistence_env(database_url, "var", schema))
    try:
        started = time.perf_counter()
        fill(app, [f"bench-{i}" for i in range(args.tenants)], args.debits, args.rejections)
        receipts, events = stored(database_url, schema)
        print(f"store: {receipts:,} receipts of {events:,} events ({args.debits:,} usage debits over {args.tenants} "
              f"accounts), "
              f"{args.rejections} rejected dispute notifications of {DISPUTED} (filled in "
              f"{time.perf_counter() - started:.0f} s)")
        indexed_s, listed = best_of(args.runs, lambda: reconcile.disputes(app, [DISPUTED]))
        scanned_s, scanned = best_of(args.runs, lambda: reconcile.scanned_rejected_dispute_commands(app, [DISPUTED]))
        assert sorted(r.command_id for r in listed.rejected) == sorted(r.command_id for r in scanned)
        assert len(scanned) == args.rejections
        print(f"reconcile disputes of one tenant (best of {args.runs}): {indexed_s * 1000:.1f} ms from its "
              f"DisputeRejections; the receipts' scan (session 13, now --scan-receipts) {scanned_s * 1000:.0f} ms "
              f"({receipts / scanned_s:,.0f} receipts/s read)")
    finally:
        app.close()
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


if __name__ == "__main__":
    main()

"""``billing reconcile usage`` on real PostgreSQL: the services' stores in a namespace's schemas (ingest's and
rating's through ``billing_runtime.db``, the ledger's eventsourcing tables), read back by the command."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from billing_cli.main import app as cli
from billing_runtime.settings import Settings
from typer.testing import CliRunner

from tests.namespaces import scratch_namespace
from tests.unit.test_reconcile_usage import AT, priced_on_a_refused_quantity_and_made_right_once, wired

pytestmark = pytest.mark.integration


async def test_reconciles_the_namespaced_postgres_stores_and_finds_a_lost_decision(
        infra: dict[str, str], tmp_path: Path) -> None:
    namespace = scratch_namespace("t")  # its schemas are dropped at the end of the session
    settings = Settings(database_url=infra["DATABASE_URL"], namespace=namespace, data_dir=tmp_path)
    async with wired(tmp_path, settings) as services:
        await services.send("paid", "api_calls", "5", AT)
        await services.send("us-gpu", "gpu_calls", "3", AT, properties={"region": "us"})
        await services.send("export", "exports", "2", AT)
        await services.flow()
        await services.relay()  # rating reads the ledger's refusal of "export"
        clean = await services.reconcile()
        assert (clean.ok, clean.accepted, clean.counts["posted"], dict(clean.rejected), dict(clean.not_billable)) == (
            True, 3, 1, {"ledger:insufficient_credit": 1}, {"filtered": 1})
        await services.rating.db.execute("DELETE FROM rated_events WHERE event_id = 'paid'")
    env = {"DATABASE_URL": infra["DATABASE_URL"], "BILLING_NAMESPACE": namespace, "BILLING_DATA_DIR": str(tmp_path)}
    result = await asyncio.to_thread(CliRunner().invoke, cli, ["reconcile", "usage", "--format", "json"], env=env)
    assert result.exit_code == 1, result.output
    document = json.loads(result.output)
    assert [(d["kind"], d["event_id"]) for d in document["discrepancies"]] == [("not_rated", "paid")]


async def test_usage_priced_on_a_refused_events_quantity_is_made_right_once_on_postgres(
        infra: dict[str, str], tmp_path: Path) -> None:
    settings = Settings(database_url=infra["DATABASE_URL"], namespace=scratch_namespace("t"), data_dir=tmp_path)
    async with wired(tmp_path, settings) as services:
        await priced_on_a_refused_quantity_and_made_right_once(services)


async def test_reconcile_disputes_finds_a_rejected_chargeback_in_the_postgres_store(
        infra: dict[str, str], tmp_path: Path) -> None:
    """The rejected dispute commands come from the tenant's index of them in PostgreSQL (its DisputeRejections), and
    from the receipts in the notification log (bytea states) with --scan-receipts, each listed once."""
    import asyncpg
    from billing_ledger.application import LedgerApplication, persistence_env
    from billing_runtime.db import ensure_schema

    from tests.unit.payments.support import TENANT, setup
    from tests.unit.payments.test_disputes import deliver, dispute, pay, place

    namespace = scratch_namespace("t")
    settings = Settings(database_url=infra["DATABASE_URL"], namespace=namespace, data_dir=tmp_path)
    conn = await asyncpg.connect(infra["DATABASE_URL"])
    try:
        await ensure_schema(conn, settings.schema("ledger"))
    finally:
        await conn.close()

    def record() -> None:
        app = LedgerApplication(persistence_env(infra["DATABASE_URL"], str(tmp_path), settings.schema("ledger")))
        try:
            setup(app)
            order = place(app, "o1", amount="50")
            pay(app, order)
            over = dispute("dispute_closed", order, "70.00", "evt_over", outcome="lost", dispute_id="dp_over")
            assert deliver(app, over).outcome == "rejected"
        finally:
            app.close()

    await asyncio.to_thread(record)
    env = {"DATABASE_URL": infra["DATABASE_URL"], "BILLING_NAMESPACE": namespace, "BILLING_DATA_DIR": str(tmp_path)}
    for flags in ([], ["--scan-receipts"]):
        result = await asyncio.to_thread(CliRunner().invoke, cli, ["reconcile", "disputes", "--tenant", TENANT,
                                                                   "--format", "json", *flags], env=env)
        assert result.exit_code == 1, result.output
        assert [(r["kind"], r["reason"], r["dispute"]) for r in json.loads(result.output)["rejected"]] == [
            ("dispute.closed", "refund_exceeds_order", "dp_over")]


async def test_reconcile_refunds_and_the_audit_export_read_the_postgres_store(
        infra: dict[str, str], tmp_path: Path) -> None:
    """A gateway refund the ledger rejected is listed from its receipt in PostgreSQL (the receipt's second event, kept
    for the rejection), and the tenant's audit export carries its top-up invoice and replays clean."""
    import asyncpg
    from billing_ledger.application import LedgerApplication, persistence_env
    from billing_runtime.db import ensure_schema

    from tests.unit.payments.support import TENANT
    from tests.unit.payments.test_refund_before_payment import deliver, notification
    from tests.unit.payments.test_top_up_grants import pay, place

    namespace = scratch_namespace("t")
    settings = Settings(database_url=infra["DATABASE_URL"], namespace=namespace, data_dir=tmp_path)
    conn = await asyncpg.connect(infra["DATABASE_URL"])
    try:
        await ensure_schema(conn, settings.schema("ledger"))
    finally:
        await conn.close()

    def record() -> None:
        from tests.unit.payments.support import setup

        app = LedgerApplication(persistence_env(infra["DATABASE_URL"], str(tmp_path), settings.schema("ledger")))
        try:
            setup(app)
            order = place(app, "o1", amount="100")
            pay(app, order)
            part = deliver(app, notification("refund_succeeded", order["order_id"], "30.00", "evt_part", "re_part"))
            assert (part.outcome, part.reason) == ("rejected", "partial_refund")
        finally:
            app.close()

    await asyncio.to_thread(record)
    env = {"DATABASE_URL": infra["DATABASE_URL"], "BILLING_NAMESPACE": namespace, "BILLING_DATA_DIR": str(tmp_path)}
    listed = await asyncio.to_thread(CliRunner().invoke, cli, ["reconcile", "refunds", "--tenant", TENANT,
                                                               "--format", "json"], env=env)
    assert listed.exit_code == 1, listed.output
    assert [(r["key"], r["amount"], r["status"], r["reason"]) for r in json.loads(listed.output)] == [
        ("stripe/re_part", "30.00", "rejected", "partial_refund")]
    out = tmp_path / "export.jsonl"
    exported = await asyncio.to_thread(CliRunner().invoke, cli, ["audit", "export", "--tenant", TENANT,
                                                                 "--out", str(out)], env=env)
    assert exported.exit_code == 0, exported.output
    replayed = await asyncio.to_thread(CliRunner().invoke, cli, ["audit", "replay", str(out)], env=env)
    assert replayed.exit_code == 0, replayed.output
    assert json.loads(replayed.output)["documents_checked"] == 1

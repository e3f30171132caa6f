"""``billing reconcile usage`` on the embedded default's stores: ingest, rating and the ledger wired by hand on
SQLite files under one data directory (as ``billing run`` keeps them), each one's output fed to the next as the
bus consumers would; discrepancies made as an operator would find them after an incident, by changing a row of a
store directly."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import uuid4

import asyncpg
import pytest
from billing_cli.main import app as cli
from billing_cli.reconcile import reconcile_usage
from billing_events import ids, topics
from billing_events.messages import LedgerCommand
from billing_events.reconciliation import GRACE_SECONDS_DEFAULT, Report
from billing_events.timeutil import utcnow
from billing_ingest.service import IngestService
from billing_ledger.application import LedgerApplication, persistence_env
from billing_ledger.relay import to_message
from billing_rating.aggregation import period_of as calendar_period
from billing_rating.close import close_period
from billing_rating.codec import usage_command_id
from billing_rating.service import RatingService
from billing_runtime.bus import EmbeddedBus, Record
from billing_runtime.db import ensure_schema, open_database
from billing_runtime.settings import Settings
from typer.testing import CliRunner

PER_CALL = {"model": "per_unit", "unit": "USD", "unit_amount": "0.10"}
CATALOG: dict[str, Any] = {"meters": [
    {"code": "api_calls", "aggregation": "sum", "price": PER_CALL, "included": "1"},
    {"code": "gpu_calls", "aggregation": "sum", "filters": {"region": ["eu"]}, "price": PER_CALL},
    {"code": "storage_gb", "aggregation": "max", "price": PER_CALL},
    {"code": "exports", "aggregation": "sum", "price": PER_CALL, "overage_policy": "block"},
    {"code": "reports", "aggregation": "sum", "price": PER_CALL, "overage_policy": "block", "included": "5"},
    {"code": "regional_gb", "aggregation": "max", "group_by": ["region"], "price": PER_CALL},
]}
GRACE = timedelta(seconds=GRACE_SECONDS_DEFAULT)


@dataclass
class Services:
    """The three services on one data directory; ``flow`` moves what each published to the next."""

    settings: Settings
    bus: EmbeddedBus
    ingest: IngestService
    rating: RatingService
    ledger: LedgerApplication
    offsets: dict[str, int] = field(default_factory=dict)
    relayed: int = 0

    def run(self, kind: str, tenant: str | None = "acme", **payload: Any) -> None:
        command = LedgerCommand(command_id=uuid4(), kind=kind, tenant=tenant, issued_at=utcnow(),
                                issued_by="user:test", payload=payload)
        [result] = self.ledger.apply_commands([command])
        assert result.outcome == "applied", result

    async def relay(self) -> None:
        records = []
        for notification in self.ledger.process_recorder.select_notifications(self.relayed + 1, 1000):
            message = to_message(self.ledger, notification)
            records.append(Record(topics.LEDGER_EVENTS, 0, notification.id, message.key.encode(), message.value,
                                  message.headers))
            self.relayed = notification.id
        await self.ingest.handle_ledger_events(records)
        await self.rating.handle_ledger_events(records)

    async def send(self, event_id: str, meter: str, quantity: str, at: datetime, **extra: Any) -> None:
        [outcome] = await self.ingest.process([({"id": event_id, "tenant": "acme", "meter": meter,
                                                 "quantity": quantity, "timestamp": at.isoformat(), **extra}, "test")])
        assert outcome.status == "accepted", outcome

    async def unread(self, topic: str) -> list[bytes]:
        rows = await self.bus._db.fetch('SELECT value FROM messages WHERE topic = $1 ORDER BY "offset"', topic)
        new = [bytes(r["value"]) for r in rows[self.offsets.get(topic, 0):]]
        self.offsets[topic] = len(rows)
        return new

    async def rate(self) -> None:
        values = await self.unread(topics.USAGE_ACCEPTED)
        if values:
            await self.rating.handle_accepted([Record(topics.USAGE_ACCEPTED, 0, i, None, v)
                                               for i, v in enumerate(values)])

    async def deliver(self) -> list[LedgerCommand]:
        commands = [LedgerCommand.model_validate_json(v) for v in await self.unread(topics.LEDGER_COMMANDS)]
        if commands:
            self.ledger.apply_commands(commands)
        return commands

    async def flow(self) -> None:
        await self.rate()
        await self.deliver()

    async def reconcile(self, grace: timedelta = GRACE, **options: Any) -> Report:
        return await reconcile_usage(self.settings, utcnow(), options.get("tenant"), options.get("since"),
                                     options.get("until"), grace)


@contextlib.asynccontextmanager
async def wired(tmp_path: Path, settings: Settings | None = None) -> AsyncIterator[Services]:
    """The services' stores where ``settings`` put them (default: SQLite files under ``tmp_path``, as ``billing
    run`` keeps them; with a ``database_url``, the namespace's PostgreSQL schemas), the catalogue published."""
    settings = settings or Settings(data_dir=tmp_path)
    if settings.database_url:  # eventsourcing creates its tables, not the schema holding them (as the ledger's build)
        conn = await asyncpg.connect(settings.database_url)
        try:
            await ensure_schema(conn, settings.schema("ledger"))
        finally:
            await conn.close()
    bus = EmbeddedBus(tmp_path / "bus.sqlite", partitions=1)
    await bus.start()
    ingest = IngestService(settings, await open_database("ingest", settings), bus)
    rating = RatingService(await open_database("rating", settings), bus)
    ledger = LedgerApplication(persistence_env(settings.database_url, str(settings.data_dir),
                                               settings.schema("ledger")))
    try:
        await ingest.setup()
        await rating.setup()
        services = Services(settings, bus, ingest, rating, ledger)
        services.run("catalog.publish", tenant=None, document=CATALOG, digest="c1")
        services.run("account.open", currency="USD")
        await services.relay()
        yield services
    finally:
        ledger.close()
        await ingest.db.close()
        await rating.db.close()
        await bus.stop()


# Half an hour ago: older than the grace period, inside the dedup window, in one calendar month with the rest.
AT = utcnow().replace(microsecond=0) - timedelta(minutes=30)


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Services]:
    """Every kind of outcome, each event through ingest, rating and the ledger (and the month's close)."""
    async with wired(tmp_path) as services:
        await services.send("free", "api_calls", "1", AT)          # inside the allowance: a debit of 0
        await services.send("paid", "api_calls", "5", AT)          # 5 x 0.10
        await services.send("us-gpu", "gpu_calls", "3", AT, properties={"region": "us"})  # filtered out
        await services.send("disk", "storage_gb", "40", AT)        # max meter: billed at the close
        await services.send("export", "exports", "2", AT)          # block policy, no credit: the ledger refuses
        await services.send("fix-ghost", "api_calls", "2", AT, correction_of="ghost")  # corrects nothing: rating refuses
        await services.flow()
        await services.relay()  # rating reads the ledger's refusal of "export"
        await services.send("paid-fix", "api_calls", "7", AT, correction_of="paid")  # an amendment: its own debit
        await services.flow()
        await close_period(services.rating.db, services.bus, services.rating.catalog, calendar_period(AT))
        await services.deliver()
        yield services


def account_events(services: Services) -> list[tuple[int, str]]:
    with sqlite3.connect(services.settings.data_dir / "ledger-events.sqlite") as conn:
        return conn.execute("SELECT originator_version, topic FROM stored_events WHERE originator_id = ? "
                            "ORDER BY originator_version", (ids.account_id("acme").hex,)).fetchall()


async def test_a_clean_run_counts_each_accepted_event_once_by_its_outcome(stack: Services) -> None:
    report = await stack.reconcile()
    document = report.to_json()
    assert (document["ok"], document["discrepancies"]) == (True, [])
    assert (document["accepted"], document["outcomes"]) == (7, {
        "posted": 3, "posted_at_period_close": 1, "rejected": 2, "not_billable": 1, "in_flight": 0})
    assert document["rejected_by_reason"] == {"ledger:insufficient_credit": 1, "rating:unknown_correction": 1}
    assert document["not_billable_by_decision"] == {"filtered": 1}
    assert document["tenants"] == ["acme"]
    assert "dedup window (35 days" in document["notes"][0]


async def test_the_command_prints_a_table_or_json_and_exits_zero_when_clean(stack: Services) -> None:
    env = {"BILLING_DATA_DIR": str(stack.settings.data_dir), "DATABASE_URL": "", "BILLING_NAMESPACE": ""}
    table = await asyncio.to_thread(CliRunner().invoke, cli, ["reconcile", "usage"], env=env)
    assert table.exit_code == 0, table.output
    assert "posted at period close" in table.output and "OK: every accepted event has one outcome" in table.output
    document = await asyncio.to_thread(CliRunner().invoke, cli, ["reconcile", "usage", "--format", "json",
                                                                 "--tenant", "acme"], env=env)
    assert document.exit_code == 0, document.output
    assert json.loads(document.output)["outcomes"]["posted"] == 3


async def test_events_not_rated_or_not_applied_yet_are_in_flight_until_the_grace_period_ends(tmp_path: Path) -> None:
    async with wired(tmp_path) as services:
        await services.send("queued", "api_calls", "5", utcnow() - timedelta(minutes=1))   # rating has not read it
        await services.send("sent", "api_calls", "5", AT)
        await services.rate()
        await services.rate()  # "queued" too: now both are rated, their commands not delivered
        assert len(await services.unread(topics.LEDGER_COMMANDS)) == 2  # lost on the way to the ledger
        report = await services.reconcile()
        assert (report.ok, dict(report.in_flight)) == (True, {"sent, not applied by the ledger yet": 2})
        # Past the grace period (0 here), a command the ledger never applied is a discrepancy, with its event.
        late = await services.reconcile(grace=timedelta(0))
        assert sorted((d.kind, d.event_id) for d in late.discrepancies) == [
            ("not_applied", "queued"), ("not_applied", "sent")]


async def test_an_accepted_event_rating_has_no_decision_of_is_a_discrepancy_after_the_grace_period(
        stack: Services) -> None:
    await stack.send("recent", "api_calls", "1", utcnow() - timedelta(minutes=1))  # not rated yet: in flight
    await stack.rating.db.execute("DELETE FROM rated_events WHERE event_id = 'disk'")  # rating lost a decision
    report = await stack.reconcile()
    assert [(d.kind, d.event_id) for d in report.discrepancies] == [("not_rated", "disk")]
    assert dict(report.in_flight) == {"accepted, not rated yet": 1}
    env = {"BILLING_DATA_DIR": str(stack.settings.data_dir), "DATABASE_URL": "", "BILLING_NAMESPACE": ""}
    result = await asyncio.to_thread(CliRunner().invoke, cli, ["reconcile", "usage"], env=env)
    assert result.exit_code == 1
    assert "not_rated (1):" in result.output and "disk" in result.output and "DISCREPANCIES FOUND" in result.output


async def test_a_refused_debit_rating_still_counts_is_a_discrepancy_after_the_grace_period(tmp_path: Path) -> None:
    async with wired(tmp_path) as services:
        await services.send("export", "exports", "2", AT)  # block policy, no credit: the ledger refuses
        await services.flow()  # rating has not read the ledger's UsageRejected (as before session 13: never)
        assert (await services.reconcile()).in_flight == {"refused by the ledger, not taken back by rating yet": 1}
        report = await services.reconcile(grace=timedelta(0))
        assert [(d.kind, d.event_id) for d in report.discrepancies] == [("refusal_still_counted", "export")]
        await services.relay()
        report = await services.reconcile(grace=timedelta(0))
        assert (report.ok, dict(report.rejected)) == (True, {"ledger:insufficient_credit": 1})


async def test_usage_priced_on_a_refused_events_quantity_is_made_right_once(tmp_path: Path) -> None:
    async with wired(tmp_path) as services:
        await priced_on_a_refused_quantity_and_made_right_once(services)


async def priced_on_a_refused_quantity_and_made_right_once(services: Services) -> None:
    """5 reports included, then 0.10 each; 0.30 USD of credit. 10 reports are refused (0.50), 3 more are rated
    before rating reads the refusal: priced 0.30 as reports 11-13, they are within the allowance (the refused 10
    were never billed), so rating gives the 0.30 back once the refusal reaches it, exactly once."""
    services.run("credit.grant", unit="USD", amount="0.30", grant_key="g", source="manual",
                 effective_at=(AT - timedelta(hours=1)).isoformat())
    await services.send("r1", "reports", "10", AT)
    await services.flow()
    await services.send("r2", "reports", "3", AT + timedelta(seconds=1))
    await services.flow()  # r2 priced on 13 reports: 0.30, posted
    account = services.ledger.repository.get(ids.account_id("acme"))
    assert account.available("USD") == 0
    await services.relay()  # the ledger's refusal of r1 and the debit of r2 reach rating
    [adjustment] = await services.deliver()
    assert (Decimal(adjustment.payload["amount"]), adjustment.payload["cause"]["refusal_of"]) == (
        Decimal("-0.30"), str(usage_command_id("acme", "r1")))
    await services.relay()
    await services.relay()  # nothing new: no second adjustment
    assert await services.deliver() == []
    account = services.ledger.repository.get(ids.account_id("acme"))
    assert account.available("USD") == 30 * 10**7  # the 0.30 back: 3 reports within the allowance cost 0
    report = await services.reconcile(grace=timedelta(0))
    assert (report.ok, report.counts["posted"], dict(report.rejected)) == (
        True, 1, {"ledger:insufficient_credit": 1})


async def test_an_event_debited_by_a_second_command_is_debited_twice(stack: Services) -> None:
    # An operator re-posted a debit by hand (a new command id) after an incident: the ledger applied both.
    [original] = [c for c in await stack_commands(stack) if c.command_id == ids.usage_command_id("acme", "paid")]
    stack.ledger.apply_commands([original.model_copy(update={"command_id": uuid4()})])
    report = await stack.reconcile()
    [found] = report.discrepancies
    assert (found.kind, found.event_id) == ("debited_twice", "paid")
    assert report.counts["posted"] == 3  # the event's own outcome is still counted once


async def test_a_usage_debit_of_an_event_ingest_never_accepted_is_a_discrepancy(stack: Services) -> None:
    await stack.ingest.db.execute("DELETE FROM seen_events WHERE event_id = 'paid'")
    report = await stack.reconcile()
    assert [(d.kind, d.event_id, d.command_id) for d in report.discrepancies] == [
        ("debit_not_accepted", "paid", ids.usage_command_id("acme", "paid"))]
    assert report.accepted == 6


async def test_a_receipt_saying_applied_without_the_accounts_debit_is_a_discrepancy(stack: Services) -> None:
    # The account's last event is the debit of the month's close (the max meter's "disk"); it is lost, its receipt
    # (applied) stays.
    version, topic = account_events(stack)[-1]
    assert topic.endswith("UsageDebited")
    with sqlite3.connect(stack.settings.data_dir / "ledger-events.sqlite") as conn:
        conn.execute("DELETE FROM stored_events WHERE originator_id = ? AND originator_version = ?",
                     (ids.account_id("acme").hex, version))
    report = await stack.reconcile()
    assert [(d.kind, d.event_id) for d in report.discrepancies] == [("applied_without_debit", "disk")]


async def test_a_period_close_debit_the_ledger_never_applied_is_a_discrepancy(tmp_path: Path) -> None:
    async with wired(tmp_path) as services:
        await services.send("disk", "storage_gb", "40", AT)
        await services.flow()
        assert dict((await services.reconcile()).in_flight) == {"rated, period not closed yet": 1}
        await close_period(services.rating.db, services.bus, services.rating.catalog, calendar_period(AT))
        await services.unread(topics.LEDGER_COMMANDS)  # the close's debit never reaches the ledger
        report = await services.reconcile(grace=timedelta(0))
        [found] = report.discrepancies
        assert (found.kind, found.event_id) == ("not_applied", "disk")
        assert "close debit" in found.detail


async def test_a_close_priced_event_a_correction_moved_to_another_group_is_billed_by_that_groups_close(
        tmp_path: Path) -> None:
    async with wired(tmp_path) as services:
        await services.send("eu-disk", "regional_gb", "8", AT, properties={"region": "eu"})
        await services.send("ap-disk", "regional_gb", "5", AT, properties={"region": "ap"})
        await services.flow()
        await services.send("us-disk", "regional_gb", "9", AT, correction_of="eu-disk", properties={"region": "us"})
        await services.send("ap-void", "regional_gb", "0", AT, correction_of="ap-disk", properties={"region": "us"})
        await services.flow()
        await close_period(services.rating.db, services.bus, services.rating.catalog, calendar_period(AT))
        await services.deliver()
        report = await services.reconcile()
        # eu-disk's reading (corrected to 9 GB in us) is billed by the us line's close debit, as its correction is
        # (and the void, a correction in us); ap-disk, corrected to 0 in another group, was voided by that correction.
        # Both were "voided_before_close" (their own lines had nothing left), eu-disk though it is billed.
        assert report.to_json()["outcomes"] == {
            "posted": 0, "posted_at_period_close": 3, "rejected": 0, "not_billable": 1, "in_flight": 0}
        assert dict(report.not_billable) == {"voided_by_correction": 1}
        assert report.discrepancies == []


async def test_a_close_priced_event_a_repricing_moved_to_its_subscriptions_period_is_billed_by_that_close(
        tmp_path: Path) -> None:
    async with wired(tmp_path) as services:
        await services.send("disk", "storage_gb", "40", AT)
        await services.flow()  # rated by calendar month: rating knows of no subscription
        plan = {"code": "team", "name": "Team", "currency": "USD", "charges": [{"meter": "storage_gb", "price": PER_CALL}]}
        services.run("catalog.publish", tenant=None, document={**CATALOG, "plans": [plan]}, digest="c2")
        start = AT - timedelta(hours=1)  # it started before the reading; rating learns of it after
        services.run("subscription.create", key="m", plan="team", trial=False, at=start.isoformat())
        await services.relay()  # the reading moves to the subscription's period
        await services.deliver()
        services.run("subscription.tick", key="m", at=(start + timedelta(days=32)).isoformat())
        await services.relay()  # the period ends: its close prices the reading
        await services.deliver()
        report = await services.reconcile()
        # Billed by the close of the subscription's period (it was "rated, period not closed yet": the calendar
        # month it was first rated in, which no longer counts it).
        assert report.to_json()["outcomes"]["posted_at_period_close"] == 1
        assert report.discrepancies == [] and dict(report.in_flight) == {}


async def test_the_window_is_the_dedup_window_and_a_bad_time_or_store_is_refused(tmp_path: Path) -> None:
    env = {"BILLING_DATA_DIR": str(tmp_path / "nothing"), "DATABASE_URL": "", "BILLING_NAMESPACE": ""}
    missing = await asyncio.to_thread(CliRunner().invoke, cli, ["reconcile", "usage"], env=env)
    assert missing.exit_code == 2 and "has `billing run` run there?" in missing.output
    assert not (tmp_path / "nothing" / "ledger-events.sqlite").exists()  # nothing was created
    bad = await asyncio.to_thread(CliRunner().invoke, cli, ["reconcile", "usage", "--since", "yesterday"], env=env)
    assert bad.exit_code == 2 and "--since" in bad.output
    async with wired(tmp_path) as services:
        report = await services.reconcile(since=utcnow() - timedelta(days=400))
        assert report.window_start > utcnow() - timedelta(days=36)
        assert any("raised to its start" in note for note in report.notes)
        unknown = await services.reconcile(tenant="nobody")
        assert (unknown.tenants, unknown.accepted) == ([], 0)
        assert any("ingest knows no tenant 'nobody'" in note for note in unknown.notes)


async def stack_commands(services: Services) -> list[LedgerCommand]:
    rows = await services.bus._db.fetch('SELECT value FROM messages WHERE topic = $1 ORDER BY "offset"',
                                        topics.LEDGER_COMMANDS)
    return [LedgerCommand.model_validate_json(bytes(r["value"])) for r in rows]

"""`billing projections rebuild` in the embedded mode: replaying the log gives the live tables, row for row."""

from __future__ import annotations

from pathlib import Path

from billing_projections.rebuild import rebuild
from billing_projections.service import ProjectionService
from billing_projections.store import ALL_TABLES
from billing_runtime.bus import EmbeddedBus
from billing_runtime.db import SqliteDatabase
from billing_runtime.settings import Settings

from tests.unit.projections.conftest import apply, dump
from tests.unit.projections.ledger_events import PARTITIONS, Ledger, full_scenario, simple_account


async def test_rebuild_from_the_embedded_log_equals_the_live_tables(tmp_path: Path,
                                                                     service: ProjectionService) -> None:
    ledger = Ledger()
    full_scenario(ledger, "acme")
    for i in range(3):
        simple_account(ledger, f"tenant-{i}", debits=50)
    messages = ledger.messages()
    bus = EmbeddedBus(tmp_path / "var" / "bus.sqlite", partitions=PARTITIONS)
    await bus.start()
    await bus.publish(messages)
    await bus.publish(messages[-5:])  # a re-relayed tail: same positions at new offsets
    await bus.stop()
    live_records = ledger.records(messages + messages[-5:])
    await apply(service, live_records, batch=17)

    report = await rebuild(Settings(data_dir=tmp_path / "var"), sqlite_path=tmp_path / "rebuilt.sqlite",
                           batch_records_max=100)
    assert report.events == len(messages) + 5
    rebuilt = await SqliteDatabase(tmp_path / "rebuilt.sqlite").connect()
    try:
        assert await dump(rebuilt) == await dump(service.db)
        # The secondary indexes, created after the replay's bulk load, are all there, as the live service has them.
        assert await _indexes(rebuilt) == await _indexes(service.db) == {
            f"{table.name}_ix{i}" for table in ALL_TABLES for i in range(len(table.indexes))}
    finally:
        await rebuilt.close()

    # Rebuilding again (drop + replay) gives the same tables once more.
    again = await rebuild(Settings(data_dir=tmp_path / "var"), sqlite_path=tmp_path / "rebuilt.sqlite")
    assert again.events == report.events
    rebuilt = await SqliteDatabase(tmp_path / "rebuilt.sqlite").connect()
    try:
        assert await dump(rebuilt) == await dump(service.db)
    finally:
        await rebuilt.close()


async def _indexes(db: SqliteDatabase) -> set[str]:
    rows = await db.fetch("SELECT name FROM sqlite_master WHERE type = 'index' AND name NOT LIKE 'sqlite_autoindex%'")
    return {str(r["name"]) for r in rows}

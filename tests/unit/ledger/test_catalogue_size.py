"""A catalogue travels to the ledger as one Kafka record (the ``catalog.publish`` command) and back out of it as
another (the ``Catalog.Published`` event, which rating and ingest read), each at most ``RECORD_BYTES_MAX``. The largest
catalogue any publishing path accepts, ``CATALOG_DOCUMENT_BYTES_MAX``, fits in both even in the worst case (thousands
of plans with the longest codes); a larger ``catalog.publish`` sent past those paths is rejected by the ledger and
changes nothing (before, its event stopped the relay, which publishes every event in order). No bus sends a record
larger than Kafka takes."""

from __future__ import annotations

from pathlib import Path

import pytest
from billing_events import ids, topics
from billing_events.catalog import CATALOG_DOCUMENT_BYTES_MAX, EXAMPLE, published_bytes
from billing_ledger.application import LedgerApplication
from billing_ledger.domain.catalog import Catalog
from billing_ledger.relay import to_messages
from billing_rating.catalog_view import validate_document
from billing_rating.http import publish_command
from billing_runtime.bus import EmbeddedBus, OutMessage, RecordTooLarge

from tests.catalogue_sizes import padded

# What a record costs beyond its key, value and headers: the record batch's header (61 bytes) and the record's own
# lengths and offsets (at most ~30), rounded up.
RECORD_OVERHEAD_BYTES = 128


def record_bytes(key: bytes, value: bytes, headers: tuple[tuple[str, bytes], ...]) -> int:
    return len(key) + len(value) + sum(len(name) + len(data) for name, data in headers) + RECORD_OVERHEAD_BYTES


def test_the_largest_catalogue_fits_in_one_record_as_the_command_and_as_the_ledger_s_event(
        app: LedgerApplication) -> None:
    document = validate_document(padded(EXAMPLE, CATALOG_DOCUMENT_BYTES_MAX)).model_dump(mode="json")
    assert CATALOG_DOCUMENT_BYTES_MAX - 400 < published_bytes(document) <= CATALOG_DOCUMENT_BYTES_MAX
    assert len(document["plans"]) > 2500
    command = publish_command(document, "user:ops")
    sent = record_bytes(str(ids.catalog_id()).encode(), command.to_json(), (("schema", b"ledger.command/v1"),))
    assert sent <= topics.RECORD_BYTES_MAX
    [result] = app.apply_commands([command])
    assert result.outcome == "applied", result
    assert app.read(Catalog.create_id(), lambda c: c.catalog_version) == 1
    events = to_messages(app, app.recorder.select_notifications(1, 100))
    [published] = [m for m in events if dict(m.headers)["type"] == b"Catalog.Published"]
    relayed = record_bytes(published.key.encode(), published.value, published.headers)
    assert relayed <= topics.RECORD_BYTES_MAX, (relayed, sent)


def test_a_larger_catalogue_sent_past_rating_and_the_cli_is_rejected_by_the_ledger(app: LedgerApplication) -> None:
    first = publish_command(validate_document(EXAMPLE).model_dump(mode="json"), "user:ops")
    assert app.apply_commands([first])[0].outcome == "applied"
    document = validate_document(padded(EXAMPLE, CATALOG_DOCUMENT_BYTES_MAX + 2000)).model_dump(mode="json")
    assert published_bytes(document) > CATALOG_DOCUMENT_BYTES_MAX
    [result] = app.apply_commands([publish_command(document, "user:ops")])
    assert (result.outcome, result.reason) == ("rejected", "catalog_too_large"), result
    assert f"more than the {CATALOG_DOCUMENT_BYTES_MAX:,} bytes a catalogue may be" in (result.detail or "")
    assert app.read(Catalog.create_id(), lambda c: c.catalog_version) == 1  # the first version stays


async def test_the_embedded_bus_refuses_what_kafka_would_and_sends_nothing_of_the_call(tmp_path: Path) -> None:
    """The embedded default runs the same handler code as the real stack: a record Kafka would refuse is refused
    there too (before, the embedded run took it and the same input failed only on the real stack)."""
    bus = EmbeddedBus(tmp_path / "bus.sqlite")
    await bus.start()
    try:
        with pytest.raises(RecordTooLarge, match=f"more than the {topics.RECORD_BYTES_MAX:,} bytes"):
            await bus.publish([OutMessage(topics.LEDGER_COMMANDS, "k", b"small"),
                               OutMessage(topics.LEDGER_COMMANDS, "k", b"x" * topics.RECORD_BYTES_MAX)])
        assert await bus._db.fetchval("SELECT count(*) FROM messages") == 0
    finally:
        await bus.stop()

"""A ``credit.grant`` in a credit unit travels under its account's key, the catalogue that declares the unit under the
catalogue's: on different partitions, which the ledger reads in any order. A grant read first was rejected
``unknown_unit`` though its catalogue was already on its way. A grant naming the catalogue it was checked against
(``catalog_digest``: ``POST /v1/catalog`` answers it, the CLI's grants carry their file's) now waits for it: its batch
fails, the consumer hands it again later while it goes on with the catalogue's partition, and the grant is applied once
the catalogue is published. A catalogue the ledger rejected, or one that never comes, rejects it ``unknown_catalog``."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from billing_events import ids, topics
from billing_events.catalog import EXAMPLE
from billing_events.messages import LedgerCommand
from billing_ledger import catalog_commands
from billing_ledger.application import LedgerApplication, persistence_env
from billing_ledger.catalog_commands import CatalogueNotYetPublished
from billing_ledger.service import COMMAND_TOPICS, LedgerService
from billing_rating.catalog_view import validate_document
from billing_rating.http import publish_command
from billing_runtime.bus import EmbeddedBus, OutMessage, partition_for

from tests.unit.ledger.ledger_support import apply, command, open_account

# A catalogue declaring a credit unit, GPU, that no catalogue published before declares.
GPU_CATALOGUE: dict[str, Any] = {**EXAMPLE, "credit_units": {**EXAMPLE["credit_units"], "GPU": {"scale": 3}}}


def publish(document: dict[str, Any]) -> LedgerCommand:
    """The command ``POST /v1/catalog`` sends for ``document`` (its digest is in the route's answer)."""
    return publish_command(validate_document(document).model_dump(mode="json"), "user:ops")


def gpu_grant(tenant: str, digest: str | None, key: str = "gpu") -> LedgerCommand:
    return command("credit.grant", tenant, {"grant_key": key, "unit": "GPU", "amount": "12.5", "source": "manual",
                                            **({"catalog_digest": digest} if digest else {})}, key=key)


def gpu(app: LedgerApplication, tenant: str) -> int:
    return int(app.read(ids.account_id(tenant), lambda a: a.available("GPU")) or 0)


def test_a_grant_read_before_its_catalogue_is_applied_once_the_consumer_has_the_catalogue(tmp_path: Path) -> None:
    """The real consumer (the embedded bus, Kafka's contract) reads the grant's partition before the catalogue's, both
    in one consumer: the grant waits, the catalogue is applied meanwhile, then the grant."""
    app = LedgerApplication(persistence_env(None, str(tmp_path / "ledger")))
    catalogue = str(ids.catalog_id())
    # A tenant whose account's partition the consumer reads before the catalogue's (the order that was refused).
    partitions = next(n for n in range(2, 64) if partition_for(catalogue, n) > 0)
    bus = EmbeddedBus(tmp_path / "bus.sqlite", partitions)
    tenant = next(t for t in (f"t{n}" for n in range(1000))
                  if partition_for(str(ids.account_id(t)), partitions) < partition_for(catalogue, partitions))

    async def run() -> None:
        await bus.start()
        stopping = asyncio.Event()
        service = LedgerService(app)
        try:
            first = publish(EXAMPLE)
            await bus.publish([OutMessage(topics.LEDGER_COMMANDS, catalogue, first.to_json())])
            await bus.publish([OutMessage(topics.LEDGER_COMMANDS, str(ids.account_id(tenant)), c.to_json())
                               for c in (command("account.open", tenant, {"currency": "USD"}),)])
            consumer = asyncio.create_task(bus.consume("ledger", COMMAND_TOPICS, service.handle_records,
                                                       service.start_positions, stopping))
            for _ in range(100):  # the first catalogue and the account applied
                await asyncio.sleep(0.05)
                if app.read(ids.account_id(tenant), lambda a: a.tenant):
                    break
            second = publish(GPU_CATALOGUE)
            grant = gpu_grant(tenant, str(second.payload["digest"]))
            # The grant goes first, the catalogue it was checked against after it, on another partition.
            await bus.publish([OutMessage(topics.LEDGER_COMMANDS, str(ids.account_id(tenant)), grant.to_json())])
            await bus.publish([OutMessage(topics.LEDGER_COMMANDS, catalogue, second.to_json())])
            for _ in range(200):
                await asyncio.sleep(0.05)
                if gpu(app, tenant):
                    break
        finally:
            stopping.set()
            await asyncio.wait_for(consumer, 10)
            await bus.stop()

    try:
        asyncio.run(run())
        assert gpu(app, tenant) == 12_500_000_000  # 12.5 GPU, granted once
    finally:
        app.close()


def test_a_grant_naming_its_catalogue_waits_and_is_applied_after_it(app: LedgerApplication) -> None:
    open_account(app, "acme")
    apply(app, publish(EXAMPLE))
    second = publish(GPU_CATALOGUE)
    grant = gpu_grant("acme", str(second.payload["digest"]))
    with pytest.raises(CatalogueNotYetPublished):  # not a rejection: nothing recorded, the batch is handed again
        apply(app, grant)
    assert [r.outcome for r in apply(app, second, grant)] == ["applied", "applied"]
    assert gpu(app, "acme") == 12_500_000_000
    # A later catalogue does not hold it up: it names one published before (the grant is decided on the current).
    later = gpu_grant("acme", str(second.payload["digest"]), key="gpu-2")
    assert apply(app, publish({**GPU_CATALOGUE, "tax_rules": []}), later)[1].outcome == "applied"


def test_a_grant_whose_catalogue_the_ledger_rejected_is_rejected_at_once(app: LedgerApplication) -> None:
    open_account(app, "acme")
    refused = publish(GPU_CATALOGUE).model_copy(update={"payload": {
        **publish(GPU_CATALOGUE).payload, "document": {"credit_units": {"GPU": {"scale": 3}}}}})
    assert apply(app, refused)[0].reason == "invalid_catalog"  # nothing to publish
    [rejected] = apply(app, gpu_grant("acme", str(refused.payload["digest"])))
    assert (rejected.outcome, rejected.reason) == ("rejected", "unknown_catalog")
    assert "the ledger rejected it (invalid_catalog)" in (rejected.detail or "")
    assert gpu(app, "acme") == 0


def test_a_grant_whose_catalogue_never_comes_is_rejected_after_the_wait(app: LedgerApplication,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    open_account(app, "acme")
    apply(app, publish(EXAMPLE))
    grant = gpu_grant("acme", "ab" * 32)
    with pytest.raises(CatalogueNotYetPublished):
        apply(app, grant)
    monkeypatch.setattr(catalog_commands, "CATALOG_WAIT_SECONDS", 0)  # the wait over
    [rejected] = apply(app, grant)
    assert (rejected.outcome, rejected.reason) == ("rejected", "unknown_catalog")
    assert "not published within 0 s" in (rejected.detail or "")
    [malformed] = apply(app, gpu_grant("acme", "not-a-digest", key="m"))
    assert (malformed.outcome, malformed.reason) == ("rejected", "invalid_grant")

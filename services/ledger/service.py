"""The ledger service: consumes ``billing.ledger.commands`` and ``billing.payments``, exactly once.

One Kafka batch (one partition) is applied as consecutive transactions of at most
``CHUNK_COMMANDS_MAX`` commands (``CONTENDED_CHUNK_COMMANDS_MAX`` while another writer is changing the same
accounts, see :mod:`billing_ledger.contention`), each with the Kafka position after its last record as an
eventsourcing ``Tracking`` row, the next one prepared while the previous one commits (``apply_chunks``). The consumer
commits the Kafka offset only after the handler returned; on (re)assignment it seeks to the tracked
position, and records below it are skipped here too, so a redelivered record is never applied twice.
"""

from __future__ import annotations

import asyncio

from billing_events import topics
from billing_events.messages import LedgerCommand, PaymentNotification
from billing_ledger.application import CommandResult, LedgerApplication
from billing_ledger.payment_commands import payment_command
from billing_runtime.bus import Record
from billing_runtime.logging import get_logger
from eventsourcing.persistence import Tracking
from pydantic import ValidationError

log = get_logger(__name__)



def decode(record: Record) -> LedgerCommand | None:
    """The ledger command a record carries (a payment notification becomes its payment command)."""
    try:
        if record.topic == topics.PAYMENTS:
            return payment_command(PaymentNotification.model_validate_json(record.value))
        return LedgerCommand.model_validate_json(record.value)
    except ValidationError as exc:
        # Producers are our own services, so this is a bug upstream: log loudly, never block the partition.
        log.error("malformed_ledger_record", topic=record.topic, partition=record.partition, offset=record.offset,
                  error=str(exc)[:300])
        return None


class LedgerService:
    def __init__(self, app: LedgerApplication) -> None:
        self.app = app

    async def start_positions(self, topic: str, partitions: list[int]) -> dict[int, int]:
        positions: dict[int, int] = {}
        for part in partitions:
            nxt = await asyncio.to_thread(self.app.next_offset, topic, part)
            if nxt is not None:
                positions[part] = nxt
        return positions

    async def handle_records(self, records: list[Record]) -> None:
        first = records[0]
        done = await asyncio.to_thread(self.app.next_offset, first.topic, first.partition) or 0
        fresh = [r for r in records if r.offset >= done]  # already applied in an earlier transaction
        if not fresh:
            return
        results = await asyncio.to_thread(self._apply_records, fresh, f"kafka:{first.topic}:{first.partition}")
        applied = sum(r.outcome == "applied" for r in results)
        log.debug("commands_applied", topic=first.topic, partition=first.partition, applied=applied,
                  total=len(results))

    def _apply_records(self, fresh: list[Record], position: str) -> list[CommandResult]:
        """Decodes the records and applies them in chunks, on a worker thread: decoding a poll's records (pydantic,
        ~6 us each, 2,000 a poll) on the event loop held up the HTTP decisions (holds) this process serves."""
        chunks: list[tuple[list[LedgerCommand], Tracking | None]] = []
        size = self.app.chunk_commands_max()
        for start in range(0, len(fresh), size):
            part = fresh[start:start + size]
            commands = [c for c in map(decode, part) if c is not None]
            chunks.append((commands, Tracking(position, part[-1].offset + 1)))
        return self.app.apply_chunks(chunks)

    # The walking skeleton's name for the command handler.
    handle_commands = handle_records

    async def apply(self, commands: list[LedgerCommand]) -> list[CommandResult]:
        """Direct application (admin routes within the ledger process); no Kafka position."""
        return await asyncio.to_thread(self.app.apply_commands, commands, None)


COMMAND_TOPICS = [topics.LEDGER_COMMANDS, topics.PAYMENTS]

"""The ledger service: consumes ``billing.ledger.commands`` and runs the outbox relay."""

from __future__ import annotations

import asyncio

from billing_events import topics
from billing_events.messages import LedgerCommand
from billing_ledger.application import CommandResult, LedgerApplication
from billing_runtime.bus import Record
from billing_runtime.logging import get_logger
from eventsourcing.persistence import Tracking
from pydantic import ValidationError

log = get_logger(__name__)


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

    async def handle_commands(self, records: list[Record]) -> None:
        first = records[0]
        done = await asyncio.to_thread(self.app.next_offset, first.topic, first.partition) or 0
        fresh = [r for r in records if r.offset >= done]  # already applied in an earlier transaction
        if not fresh:
            return
        commands: list[LedgerCommand] = []
        for record in fresh:
            try:
                commands.append(LedgerCommand.model_validate_json(record.value))
            except ValidationError as exc:
                # Producers are our own services, so this is a bug upstream: log loudly, never block.
                log.error("malformed_ledger_command", topic=record.topic, partition=record.partition,
                          offset=record.offset, error=str(exc)[:300])
        tracking = Tracking(f"kafka:{first.topic}:{first.partition}", fresh[-1].offset + 1)
        results = await asyncio.to_thread(self.app.apply_commands, commands, tracking)
        applied = sum(r.outcome == "applied" for r in results)
        log.debug("commands_applied", partition=first.partition, applied=applied, total=len(results))

    async def apply(self, commands: list[LedgerCommand]) -> list[CommandResult]:
        """Direct application (admin routes within the ledger process); no Kafka position."""
        return await asyncio.to_thread(self.app.apply_commands, commands, None)


COMMAND_TOPICS = [topics.LEDGER_COMMANDS]

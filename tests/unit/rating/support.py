"""A rating service on the embedded bus and a SQLite database, as the rating unit tests start it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from billing_rating.service import RatingService
from billing_runtime.bus import EmbeddedBus
from billing_runtime.db import SqliteDatabase


@contextlib.asynccontextmanager
async def embedded_rating(tmp_path: Path) -> AsyncIterator[tuple[RatingService, EmbeddedBus]]:
    """A set-up rating service (no catalogue yet) and its bus (one partition); both closed after."""
    bus = EmbeddedBus(tmp_path / "bus.sqlite", partitions=1)
    await bus.start()
    service = RatingService(await SqliteDatabase(tmp_path / "rating.sqlite").connect(), bus)
    try:
        await service.setup()
        yield service, bus
    finally:
        await service.db.close()
        await bus.stop()

"""Drops what interrupted benches left behind: Kafka topics and PostgreSQL schemas of ``bench*`` namespaces.

Every bench works in a fresh namespace ``bench<random>`` (its topics ``bench<random>.<topic>``, its schemas
``bench<random>_billing_<service>``) and drops it at the end; a bench that was killed leaves it, and hundreds
of leftover topics cost the broker (and every later bench) CPU. ``make bench-clean`` runs this; nothing but
``bench`` namespaces is touched. Do not run it while a bench is running.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: make `tests.` importable

from tests.namespaces import drop_namespaces

PREFIX = "bench"


async def main() -> None:
    topics, schemas = await drop_namespaces(os.environ["KAFKA_BOOTSTRAP_SERVERS"], os.environ["DATABASE_URL"],
                                            lambda name: name.startswith(PREFIX))
    print(f"dropped {schemas} schemas and {topics} topics of {PREFIX}* namespaces")


if __name__ == "__main__":
    asyncio.run(main())

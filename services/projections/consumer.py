"""The projections consumer as its own process: ``python -m billing_projections.consumer [--port N]``.

Started by ``billing serve projections`` (role ``all``, see ``app.py``) with a pipe on stdin: when the pipe
closes (the parent exited, however it died) the consumer stops as on SIGTERM, finishing the batch in hand.
Run by hand (stdin a terminal or /dev/null) it runs until SIGTERM/SIGINT. Needs Kafka and PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal

from billing_projections.app import builder
from billing_projections.limits import CONSUMER_NICE
from billing_projections.tuning import tune_gc
from billing_runtime.bus import KafkaBus
from billing_runtime.child import watch_parent
from billing_runtime.eventloop import run_loop
from billing_runtime.logging import configure_logging, get_logger
from billing_runtime.runner import Runner
from billing_runtime.settings import Settings

log = get_logger(__name__)


async def main(port: int | None) -> None:
    settings = Settings.from_env()
    if not settings.kafka_bootstrap_servers or not settings.database_url:
        raise SystemExit("the projections consumer process needs KAFKA_BOOTSTRAP_SERVERS and DATABASE_URL")
    # The bus only creates the topics here; the consumer's own loop is kafka_consumer.py.
    bus = KafkaBus(settings.kafka_bootstrap_servers, settings.topic_partitions, settings.batch_records_max,
                   namespace=settings.namespace)
    runner = Runner(settings, bus, [builder("consumer")], "billing projections consumer", port)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, runner.stopping.set)
    watch_parent(loop, runner.stopping)
    tune_gc()
    # Below the API's CPU priority: when cores are short, a read waits less and a batch a little longer.
    with contextlib.suppress(OSError):
        os.nice(CONSUMER_NICE)
    await runner.run_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=None, help="HTTP port for /metrics, /healthz (default: none)")
    configure_logging()
    run_loop(main(parser.parse_args().port))

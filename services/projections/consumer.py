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
import stat
import sys
import threading

from billing_projections.app import builder
from billing_projections.limits import CONSUMER_NICE
from billing_projections.tuning import tune_gc
from billing_runtime.bus import KafkaBus
from billing_runtime.eventloop import run_loop
from billing_runtime.logging import configure_logging, get_logger
from billing_runtime.runner import Runner
from billing_runtime.settings import Settings

log = get_logger(__name__)


def _watch_parent(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """Stops when stdin (a pipe from the parent) reaches EOF: the parent is gone, however it died.

    A daemon thread blocked in ``read``: it needs nothing from the event loop until the parent is gone.
    """
    try:
        fd = sys.stdin.fileno()
        mode = os.fstat(fd).st_mode
        # A pipe, or a socket pair (what uvloop's subprocesses get for stdin=PIPE); not a terminal or file.
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
            return
    except (OSError, ValueError):
        return

    def wait_for_eof() -> None:
        while True:
            try:
                if not os.read(fd, 4096):
                    break
            except InterruptedError:
                continue
            except OSError:
                break
        log.info("parent_gone_stopping")
        with contextlib.suppress(RuntimeError):  # the loop already closed: the process is ending anyway
            loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=wait_for_eof, name="parent-watch", daemon=True).start()


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
    _watch_parent(loop, runner.stopping)
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

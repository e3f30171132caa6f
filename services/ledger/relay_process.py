"""The outbox relay as its own process: ``python -m billing_ledger.relay_process [--leader-fd N]``.

Started by ``billing serve ledger`` (``app.py``, unless ``BILLING_LEDGER_RELAY=inline``) and supervised by it
(``billing_runtime.child``): a pipe on stdin closes when the service is gone, however it died, and the relay
stops as on SIGTERM (recording its position); if the relay exits on its own, the service stops too.

Relaying is CPU-bound Python (reading stored events back, converting them, producing): in the service's
interpreter it took a quarter of it under a usage backlog, and its rounds ran on the event loop and the GIL
that decide the holds. Here it needs only the event store (its notification log and the relay's Tracking
position) and a Kafka producer. It holds the store's relay lock itself (``<schema>_relay``, leader.py):
exactly one relay per store at any time, also during a rolling restart next to a ledger of an earlier version
that relays in process under the same lock. It tells the service on ``--leader-fd`` whether it holds the lock
(``LeaderReports``): the service's other leader tasks follow it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from functools import partial

from billing_ledger.application import LedgerApplication, persistence_env
from billing_ledger.leader import AdvisoryLock, LeaderReports
from billing_ledger.relay import run_relay
from billing_ledger.tuning import tune_process
from billing_runtime.bus import Bus, KafkaBus
from billing_runtime.child import watch_parent
from billing_runtime.eventloop import run_loop
from billing_runtime.logging import configure_logging
from billing_runtime.runner import Runner
from billing_runtime.service import ServiceParts
from billing_runtime.settings import Settings


async def build(settings: Settings, bus: Bus, leader_fd: int | None) -> ServiceParts:
    assert settings.database_url
    env = persistence_env(settings.database_url, str(settings.data_dir), settings.schema("ledger"))
    app = await asyncio.to_thread(LedgerApplication, env)
    lock = AdvisoryLock(settings.database_url, settings.schema("ledger") + "_relay")
    reports = LeaderReports(leader_fd)

    async def is_leader() -> bool:
        held = await lock.is_held()
        reports.report(held)
        return held

    return ServiceParts(name="ledger relay", tasks=[partial(run_relay, app, bus, is_leader=is_leader)],
                        close=lambda: asyncio.to_thread(app.close))


async def main(leader_fd: int | None) -> None:
    settings = Settings.from_env()
    if not settings.kafka_bootstrap_servers or not settings.database_url:
        raise SystemExit("the ledger's relay process needs KAFKA_BOOTSTRAP_SERVERS and DATABASE_URL")
    bus = KafkaBus(settings.kafka_bootstrap_servers, settings.topic_partitions, settings.batch_records_max,
                   namespace=settings.namespace)

    async def build_relay(settings: Settings, bus: Bus) -> ServiceParts:
        return await build(settings, bus, leader_fd)

    runner = Runner(settings, bus, [build_relay], "billing ledger relay", None)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, runner.stopping.set)
    watch_parent(loop, runner.stopping)
    tune_process()
    await runner.run_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--leader-fd", type=int, default=None,
                        help="a pipe to write whether this relay holds the lock to (given by the service)")
    configure_logging()
    run_loop(main(parser.parse_args().leader_fd))

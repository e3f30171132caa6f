"""Wiring of the ledger service: command consumer, outbox relay, HTTP routes.

On Kafka + PostgreSQL (``billing serve ledger``) the outbox relay runs in a child process of the service
(``relay_process.py``, supervised by ``billing_runtime.child``), which holds the store's relay lock; the service's
leader tasks follow its leadership (``leader.ReportedLeadership``). ``BILLING_LEDGER_RELAY=inline`` relays in
this process instead, under the same lock, as the embedded default (SQLite, one process) always does.
"""

from __future__ import annotations

import asyncio
import os
import sys
from functools import partial

from billing_ledger import checkout_http, subscriptions_http
from billing_ledger import http as ledger_http
from billing_ledger.alerts import run_alerts
from billing_ledger.application import LedgerApplication, persistence_env
from billing_ledger.card_expiry_notices import run_card_expiry
from billing_ledger.digest import run_digest
from billing_ledger.dunning import run_dunning
from billing_ledger.gateways.registry import enabled_gateways
from billing_ledger.leader import ReportedLeadership
from billing_ledger.limits import RELAY_STOP_SECONDS_MAX
from billing_ledger.notifier import SmtpSettings, run_notifier
from billing_ledger.relay import run_relay
from billing_ledger.scheduler import run_scheduler
from billing_ledger.service import COMMAND_TOPICS, LedgerService
from billing_ledger.sweeper import run_sweeper
from billing_ledger.topups import run_topups
from billing_ledger.tuning import tune_process
from billing_ledger.vies import registry_from
from billing_runtime.bus import Bus, KafkaBus
from billing_runtime.child import ChildProcess
from billing_runtime.service import ConsumerSpec, ServiceParts
from billing_runtime.settings import Settings

# Where `billing serve ledger` relays: `process` (a child process; the default) or `inline` (this process).
RELAY_ENV = "BILLING_LEDGER_RELAY"
RELAY_MODES = ("process", "inline")


async def build(settings: Settings, bus: Bus) -> ServiceParts:
    tune_process()  # GIL switch interval and garbage collector (see tuning.py)
    env = persistence_env(settings.database_url, str(settings.data_dir), settings.schema("ledger"))
    if settings.database_url:
        import asyncpg

        # eventsourcing creates its tables but not the schema that holds them.
        from billing_runtime.db import ensure_schema

        conn = await asyncpg.connect(settings.database_url)
        try:
            await ensure_schema(conn, settings.schema("ledger"))
        finally:
            await conn.close()
    app = await asyncio.to_thread(LedgerApplication, env)
    app.max_active_subscriptions = settings.max_active_subscriptions  # type: ignore[attr-defined]
    app.invoice_issuer = settings.invoice_issuer  # type: ignore[attr-defined]
    service = LedgerService(app)
    gateways = enabled_gateways(settings)
    smtp = SmtpSettings(settings.smtp_host, settings.smtp_port, settings.smtp_sender, settings.invoice_issuer,
                        settings.smtp_recipient_domain) if settings.smtp_host else None
    leader = None
    relay_child: RelayChild | None = None
    relay = partial(run_relay, app, bus)
    if settings.database_url and isinstance(bus, KafkaBus) and relay_mode() == "process":
        relay_child = RelayChild()
        leader = relay_child.leadership.is_held
        relay = relay_child.run
    elif settings.database_url:
        from billing_ledger.leader import AdvisoryLock

        lock = AdvisoryLock(settings.database_url, settings.schema("ledger") + "_relay")
        leader = lock.is_held
        relay = partial(run_relay, app, bus, is_leader=leader)
    return ServiceParts(
        name="ledger",
        consumers=[ConsumerSpec(settings.group("billing-ledger"), COMMAND_TOPICS, service.handle_records,
                                service.start_positions)],
        routers=[subscriptions_http.build_router(app, bus, settings.invoice_issuer,
                                                 registry_from(settings.vies_enabled, settings.vies_url), gateways),
                 ledger_http.build_router(app),
                 checkout_http.build_router(app, settings, gateways)],
        tasks=[relay,
               partial(run_sweeper, app, is_leader=leader),
               partial(run_scheduler, app, bus, interval_seconds=settings.scheduler_interval_seconds,
                       is_leader=leader),
               *([partial(run_notifier, app, SmtpSettings(settings.smtp_host, settings.smtp_port,
                                                           settings.smtp_sender, settings.invoice_issuer,
                                                           settings.smtp_recipient_domain))]
                 if settings.smtp_host else []),
               partial(run_topups, app, gateways, smtp, interval_seconds=settings.payments_interval_seconds,
                       is_leader=leader),
               partial(run_alerts, app, smtp, settings.alert_webhook_attempts_max,
                       interval_seconds=settings.payments_interval_seconds, is_leader=leader),
               partial(run_dunning, app, gateways, smtp, settings.dunning_retry_days,
                       interval_seconds=settings.payments_interval_seconds, is_leader=leader),
               partial(run_card_expiry, app, settings.card_expiry_notice_days,
                       interval_seconds=settings.payments_interval_seconds, is_leader=leader),
               *([partial(run_digest, app, smtp, settings.digest_recipient,
                          interval_seconds=settings.digest_interval_seconds, is_leader=leader)]
                 if settings.digest_recipient and smtp else [])],
        ready=relay_child.ready if relay_child is not None else None,
        close=lambda: asyncio.to_thread(_stop, app),
    )


def relay_mode() -> str:
    """Where ``billing serve ledger`` relays: ``process`` (a child process, the default) or ``inline``."""
    mode = os.environ.get(RELAY_ENV, "process").strip() or "process"
    if mode not in RELAY_MODES:
        raise ValueError(f"{RELAY_ENV} must be one of {', '.join(RELAY_MODES)}, not {mode!r}")
    return mode


class RelayChild(ChildProcess):
    """``python -m billing_ledger.relay_process`` as a child process, stopped with this one; its leadership
    reports come on a pipe of their own (stdout and stderr are the logs')."""

    def __init__(self) -> None:
        super().__init__("relay", RELAY_STOP_SECONDS_MAX)
        self._reports_read, self._reports_write = os.pipe()
        self.leadership = ReportedLeadership(self._reports_read)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "billing_ledger.relay_process", "--leader-fd", str(self._reports_write)]

    def pass_fds(self) -> tuple[int, ...]:
        return (self._reports_write,)

    def started(self) -> None:
        os.close(self._reports_write)  # the child's copy is the only writer: its exit closes the pipe


def _stop(app: LedgerApplication) -> None:
    """At a graceful stop: the next process loads the accounts in memory here without long replays, then close."""
    try:
        app.snapshot_lagging()
    finally:
        app.close()

"""Runs one or several services in this process: consumers, background tasks and one HTTP server.

Graceful shutdown: on SIGINT/SIGTERM the consumers stop polling, the batch in hand finishes (its offsets
are committed only after its effect is durable; an unfinished batch is simply not committed and will be
redelivered), background tasks finish their round, then connections close.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable, Sequence

import uvicorn

from billing_runtime.bus import Bus
from billing_runtime.http import create_app
from billing_runtime.logging import get_logger
from billing_runtime.service import ServiceParts
from billing_runtime.settings import Settings

log = get_logger(__name__)

Builder = Callable[[Settings, Bus], Awaitable[ServiceParts]]
SHUTDOWN_GRACE_SECONDS = 15.0


class Runner:
    def __init__(self, settings: Settings, bus: Bus, builders: Sequence[Builder], title: str, port: int | None):
        self.settings = settings
        self.bus = bus
        self.builders = builders
        self.title = title
        self.port = port
        self.stopping = asyncio.Event()
        self.parts: list[ServiceParts] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.server: uvicorn.Server | None = None
        self.started = asyncio.Event()

    async def start(self) -> None:
        await self.bus.start()
        for build in self.builders:
            self.parts.append(await build(self.settings, self.bus))

        async def ready() -> bool:
            for part in self.parts:
                if part.ready is not None and not await part.ready():
                    return False
            return True

        body_limits = {path: limit for part in self.parts for path, limit in part.body_limits.items()}
        app = create_app(self.title, self.settings, ready=ready, body_limits=body_limits)
        for part in self.parts:
            for router in part.routers:
                app.include_router(router)
            for spec in part.consumers:
                self._tasks.append(asyncio.create_task(
                    self.bus.consume(spec.group_id, spec.topics, spec.handler, spec.start_positions, self.stopping,
                                      whole_poll=spec.whole_poll),
                    name=f"{part.name}:{spec.group_id}"))
            for task in part.tasks:
                self._tasks.append(asyncio.create_task(task(self.stopping), name=f"{part.name}:task"))
        self.app = app
        if self.port is not None:
            config = uvicorn.Config(app, host=self.settings.http_host, port=self.port, log_config=None,
                                    access_log=False, lifespan="off")
            self.server = uvicorn.Server(config)
            self.server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
            self._tasks.append(asyncio.create_task(self.server.serve(), name="http"))
        self.started.set()
        log.info("started", services=[p.name for p in self.parts], port=self.port)

    async def stop(self) -> None:
        self.stopping.set()
        if self.server is not None:
            self.server.should_exit = True
        done, pending = await asyncio.wait(self._tasks, timeout=SHUTDOWN_GRACE_SECONDS) if self._tasks else ((), ())
        for task in pending:
            task.cancel()
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.error("task_failed", task=task.get_name(), error=repr(task.exception()))
        for part in self.parts:
            if part.close is not None:
                await part.close()
        await self.bus.stop()
        log.info("stopped")

    async def run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, self.stopping.set)
        await self.start()
        watch = [asyncio.create_task(self.stopping.wait())]
        # A crashed consumer task is fatal for the process: let the supervisor restart it cleanly.
        await asyncio.wait(watch + self._tasks, return_when=asyncio.FIRST_COMPLETED)
        await self.stop()

"""A helper process of a service (``python -m <module>``), supervised by the service that starts it.

Used where a service's work would otherwise compete with its HTTP server for one interpreter: the projections'
consumers (``billing_projections.app``) and the ledger's outbox relay (``billing_ledger.app``).

* It dies with its parent: its stdin is a pipe from the parent, which the child watches (``watch_parent``);
  EOF means the parent is gone, however it died (even by SIGKILL), and the child stops as on SIGTERM.
* The parent stops if the child exits on its own (``ChildProcess.run`` raises): the process supervisor then
  restarts both, as with any crashed consumer.
* To stop it: SIGTERM (the child finishes what it has in hand and exits), SIGKILL after ``stop_seconds``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
import sys
import threading
from collections.abc import Awaitable, Sequence

from billing_runtime.logging import get_logger

log = get_logger(__name__)


class ChildProcess:
    """``command()`` as a child process of this one, run until ``stopping`` is set, then stopped."""

    def __init__(self, name: str, stop_seconds: float) -> None:
        self.name = name  # in log events: ``<name>_process_started`` ...
        self.stop_seconds = stop_seconds
        self.process: asyncio.subprocess.Process | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def pass_fds(self) -> Sequence[int]:
        """File descriptors the child inherits (besides stdin, stdout and stderr)."""
        return ()

    def started(self) -> None:
        """Called once the child runs (e.g. to close this process's copies of what ``pass_fds`` passed)."""

    async def ready(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def run(self, stopping: asyncio.Event) -> None:
        # stdin is a pipe the child watches: if this process dies, even by SIGKILL, the child sees EOF and stops.
        fds = tuple(self.pass_fds())
        self.process = await asyncio.create_subprocess_exec(
            *self.command(), stdin=asyncio.subprocess.PIPE, **({"pass_fds": fds} if fds else {}))
        self.started()
        log.info(f"{self.name}_process_started", pid=self.process.pid)
        exited = asyncio.create_task(self.process.wait())
        stop = asyncio.create_task(stopping.wait())
        await asyncio.wait({exited, stop}, return_when=asyncio.FIRST_COMPLETED)
        if exited.done():
            stop.cancel()
            if not stopping.is_set():
                raise RuntimeError(f"the {self.name} process exited with {self.process.returncode}")
            return
        await stop_child(self.process, exited, self.stop_seconds, self.name)


async def stop_child(process: asyncio.subprocess.Process, exited: Awaitable[int], stop_seconds: float,
                     name: str) -> None:
    """SIGTERM: the child finishes what it has in hand and exits; SIGKILL if it takes longer than ``stop_seconds``."""
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(asyncio.shield(exited), stop_seconds)
    except TimeoutError:
        log.error(f"{name}_process_kill", pid=process.pid)
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await exited
    log.info(f"{name}_process_stopped", pid=process.pid, returncode=process.returncode)


def watch_parent(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """In the child: sets ``stop`` when stdin (a pipe from the parent) reaches EOF, the parent being gone.

    A daemon thread blocked in ``read``: it needs nothing from the event loop until the parent is gone. Run by
    hand (stdin a terminal or a file) it does nothing.
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

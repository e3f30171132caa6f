"""Helpers shared by integration and e2e tests: processes, polling, tokens."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from email import message_from_bytes
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx
import pytest
from aiosmtpd.controller import Controller
from billing_runtime.auth import mint_token
from billing_runtime.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
BILLING = str(Path(sys.executable).parent / "billing")
T = TypeVar("T")


async def drop_schema(database_url: str, schema: str) -> None:
    """Drops a test's PostgreSQL schema and everything in it (nothing if it is not there)."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def token(role: str, tenant: str | None = None) -> str:
    return mint_token(Settings.from_env(), role=role, tenant=tenant)


def auth(role: str, tenant: str | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(role, tenant)}"}


def wait_until(probe: Callable[[], T], timeout: float = 30.0, interval: float = 0.2, what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = probe()
            if last:
                return last
        except (httpx.HTTPError, AssertionError, KeyError) as exc:
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


class ServiceProcess:
    """``billing <args>`` as a real OS process, logs in a file, stopped with SIGTERM (or killed)."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path, port: int | None = None) -> None:
        self.args = args
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServiceProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the child's lifetime
        self.proc = subprocess.Popen([BILLING, *self.args], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     cwd=ROOT)
        if self.port is not None:
            wait_until(self._ready, timeout=60, what=f"{' '.join(self.args)} to be ready")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.args} exited with {self.proc.returncode}: {self.log_tail()}")
        return httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=2).status_code == 200

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Inbox:
    """A local SMTP server's mailbox (aiosmtpd handler): every message it received, parsed."""

    def __init__(self) -> None:
        self.messages: list[Any] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(message_from_bytes(envelope.content))
        return "250 OK"


@pytest.fixture
def smtp() -> Iterator[tuple[Inbox, int]]:
    """A real SMTP server on a free loopback port: (its inbox, its port)."""
    inbox = Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    yield inbox, port
    controller.stop()



async def exercise_copy_records(db: Any, unique_error: type[BaseException]) -> BaseException:
    """``copy_records`` on either dialect: lists and async iterables append, an empty list is nothing, and a
    row breaking the primary key fails the whole copy (nothing of it stays). Returns the unique violation."""
    await db.executescript("CREATE TABLE t (k TEXT PRIMARY KEY, n BIGINT, note TEXT)")

    async def rows() -> Any:
        for i in range(3):
            yield (f"a{i}", i, None)

    async with db.transaction() as conn:
        await conn.copy_records("t", ("k", "n", "note"), [("x", 2**40, "é")])
        await conn.copy_records("t", ("k", "n", "note"), rows())
        await conn.copy_records("t", ("k", "n", "note"), [])
    assert [tuple(r.values()) for r in await db.fetch("SELECT k, n, note FROM t ORDER BY k")] == [
        ("a0", 0, None), ("a1", 1, None), ("a2", 2, None), ("x", 2**40, "é")]
    try:
        async with db.transaction() as conn:
            await conn.copy_records("t", ("k", "n", "note"), [("new", 1, None), ("x", 1, None)])
    except unique_error as exc:
        caught = exc
    else:
        raise AssertionError("a duplicate key must fail the copy")
    assert await db.fetchval("SELECT count(*) FROM t") == 4  # the failed copy left nothing
    return caught

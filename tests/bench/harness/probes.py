"""The probes, in their own process (so their timings are not skewed by the producer's event loop):

* **balance reader**: ``GET /v1/accounts/{tenant}/balance`` at a steady open-loop rate (default 200/s)
  over the stream's tenants; latency measured at the client, per request;
* **markers**: one usage event of a dedicated tenant published every ``marker_interval`` seconds straight
  to ``<ns>.billing.usage.raw``; its balance is polled until it reflects the marker: publish -> visible
  balance latency (a marker is one api call, so the balance drop counts the markers that are visible);
* **hold decisions**: ``POST /v1/accounts/{tenant}/holds`` on the ledger at a steady rate, when the
  ledger serves that route (its OpenAPI document is checked first; otherwise skipped with a note).

    python -m tests.bench.harness.probes CONFIG.json

Prints ``ready`` when started, runs until a line ``stop`` (or EOF) arrives on stdin, writes its samples to
``config["out"]`` and prints ``done``. Times are wall-clock (``time.time()``) so the harness can split them
into the load and idle phases.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
from aiokafka import AIOKafkaProducer
from billing_runtime.auth import mint_token
from billing_runtime.settings import Settings

from tests.bench.harness.stream import MARKER_PRICE, marker_event

HOLDS_PATH = "/v1/accounts/{tenant}/holds"
MARKER_POLL_SECONDS = 0.01
KEEP_ALIVE_IDLE_SECONDS_MAX = 3.0  # below uvicorn's 5 s keep-alive timeout
IN_FLIGHT_MAX = 32  # requests of one probe in flight; an arrival beyond it is counted as not sent


class KeepAliveClient:
    """A minimal HTTP/1.1 keep-alive client over asyncio streams, for the latency probes.

    httpx costs about a millisecond of client CPU per request and its pool slows down quadratically with a
    queue; on a 2-core machine shared with the services that would be measured as server latency. This
    sends a request and reads one ``Content-Length`` response on a pooled connection: tens of microseconds.
    """

    def __init__(self, base_url: str, connections: int = IN_FLIGHT_MAX) -> None:
        host_port = base_url.split("://", 1)[1].rstrip("/")
        self.host, port = host_port.split(":")
        self.port = int(port)
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
        self.connections = connections

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
        """A pooled connection (reused: True) unless the server may have closed it: uvicorn closes a
        keep-alive connection after 5 s idle, so older idle ones are dropped."""
        now = time.monotonic()
        while self._idle:
            reader, writer, last_used = self._idle.pop()
            if now - last_used < KEEP_ALIVE_IDLE_SECONDS_MAX and not writer.is_closing():
                return reader, writer, True
            writer.close()
        reader, writer = await asyncio.open_connection(self.host, self.port)
        return reader, writer, False

    async def request(self, method: str, path: str, headers: dict[str, str], body: bytes = b"",
                      timeout: float = 30) -> tuple[int, bytes]:
        reader, writer, reused = await self._connection()
        try:
            return await self._exchange(reader, writer, method, path, headers, body, timeout)
        except (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError):
            if not reused:
                raise
        # The server closed the reused connection before answering (nothing was processed): once more on a
        # new one.
        reader, writer = await asyncio.open_connection(self.host, self.port)
        return await self._exchange(reader, writer, method, path, headers, body, timeout)

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, method: str, path: str,
                        headers: dict[str, str], body: bytes, timeout: float) -> tuple[int, bytes]:
        try:
            head = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}", f"Content-Length: {len(body)}",
                    *(f"{k}: {v}" for k, v in headers.items())]
            if body:
                head.append("Content-Type: application/json")
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
            status_line = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
            lines = status_line.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ")[1])
            length, close = 0, False
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.lower() == "content-length":
                    length = int(value.strip())
                elif name.lower() == "connection" and value.strip().lower() == "close":
                    close = True
            payload = await asyncio.wait_for(reader.readexactly(length), timeout) if length else b""
        except BaseException:
            writer.close()
            raise
        if close or len(self._idle) >= self.connections:
            writer.close()
        else:
            self._idle.append((reader, writer, time.monotonic()))
        return status, payload

    async def close(self) -> None:
        for _, writer, _ in self._idle:
            writer.close()
        self._idle.clear()


def _token(role: str, tenant: str | None = None) -> str:
    return mint_token(Settings.from_env(), role=role, tenant=tenant, subject="bench", ttl_seconds=24 * 3600)


async def _open_loop(rate: float, stop: asyncio.Event, fire: Any, skipped: list[float]) -> None:
    """Calls ``fire(i)`` (a coroutine, not awaited in line) at ``rate`` per second until ``stop``; an
    arrival that finds ``IN_FLIGHT_MAX`` requests still in flight is not sent (its time goes to ``skipped``):
    the server is not keeping up, and an unbounded queue would only measure the client."""
    if rate <= 0:
        return
    interval = 1.0 / rate
    began = time.perf_counter()
    tasks: set[asyncio.Task[None]] = set()
    i = 0
    while not stop.is_set():
        delay = began + i * interval - time.perf_counter()
        if delay > 0:
            try:
                await asyncio.wait_for(stop.wait(), timeout=delay)
                break
            except TimeoutError:
                pass
        if len(tasks) >= IN_FLIGHT_MAX:
            skipped.append(time.time())
        else:
            task = asyncio.create_task(fire(i))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        i += 1
    if tasks:
        await asyncio.wait(tasks, timeout=10)


async def balance_reader(config: dict[str, Any], stop: asyncio.Event, out: list[list[float]],
                         skipped: list[float]) -> None:
    tenants = config["reader_tenants"]
    tokens = {t: {"Authorization": f"Bearer {_token('viewer', t)}"} for t in tenants}
    client = KeepAliveClient(config["projections_url"])

    async def one(i: int) -> None:
        tenant = tenants[i % len(tenants)]
        sent = time.time()
        started = time.perf_counter()
        error = ""
        try:
            status, _ = await client.request("GET", f"/v1/accounts/{tenant}/balance", tokens[tenant])
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
            status, error = 0, repr(exc)[:200]
        out.append([sent, (time.perf_counter() - started) * 1000, status, error])

    try:
        for i in range(20):  # warm-up: connections, the first queries' plans
            await one(i)
        out.clear()
        await _open_loop(config["reader_rate"], stop, one, skipped)
    finally:
        await client.close()


async def markers(config: dict[str, Any], stop: asyncio.Event, out: list[dict[str, Any]]) -> None:
    tenant, grant = config["marker_tenant"], Decimal(config["marker_grant"])
    headers = {"Authorization": f"Bearer {_token('viewer', tenant)}"}
    producer = AIOKafkaProducer(bootstrap_servers=config["bootstrap"], acks="all", enable_idempotence=True,
                                linger_ms=0)
    await producer.start()
    published: list[float] = []  # wall time of marker k's publish, k = index + 1
    visible = 0
    client = KeepAliveClient(config["projections_url"], connections=1)
    try:
        async def visible_count() -> int:
            status, body = await client.request("GET", f"/v1/accounts/{tenant}/balance", headers)
            if status != 200:
                raise ValueError(f"balance answered {status}")
            wallets = {w["unit"]: w for w in json.loads(body)["wallets"]}
            drop = grant - Decimal(wallets["USD"]["available"])
            return int(drop / MARKER_PRICE)

        async def publisher() -> None:
            index = 0
            next_at = time.monotonic()
            while not stop.is_set():
                index += 1
                value = marker_event(config["run"], index, tenant, datetime.now(UTC))
                published.append(time.time())
                await producer.send_and_wait(config["raw_topic"], value, key=tenant.encode())
                next_at += config["marker_interval"]
                try:
                    await asyncio.wait_for(stop.wait(), timeout=max(0.0, next_at - time.monotonic()))
                except TimeoutError:
                    pass

        task = asyncio.create_task(publisher())
        deadline = None
        while True:
            if stop.is_set() and deadline is None:
                deadline = time.monotonic() + config.get("marker_drain_seconds", 30)
            if deadline is not None and (visible >= len(published) or time.monotonic() > deadline):
                break
            if visible < len(published):
                try:
                    now_visible = await visible_count()
                except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError, KeyError):
                    now_visible = visible
                seen_at = time.time()
                for k in range(visible, min(now_visible, len(published))):
                    out.append({"marker": k + 1, "published": published[k], "visible": seen_at,
                                "latency_ms": (seen_at - published[k]) * 1000})
                visible = max(visible, now_visible)
            await asyncio.sleep(MARKER_POLL_SECONDS)
        await task
    finally:
        await client.close()
        await producer.stop()
    out.append({"published_total": len(published), "visible_total": visible})


async def holds(config: dict[str, Any], stop: asyncio.Event, out: dict[str, Any]) -> None:
    ledger, tenant = config["ledger_url"], config["hold_tenant"]
    out.update(samples=[], skipped=[], available=False, note="")
    if config["hold_rate"] <= 0:
        out["note"] = "hold decisions not measured (--hold-rate 0)"
        return
    try:
        async with httpx.AsyncClient(base_url=ledger, timeout=30) as probe:
            paths = (await probe.get("/openapi.json")).json().get("paths", {})
    except (httpx.HTTPError, ValueError):
        paths = {}
    if "post" not in paths.get(HOLDS_PATH, {}):
        out["note"] = (f"skipped: the ledger service does not serve POST {HOLDS_PATH} "
                       "(route absent from its OpenAPI document)")
        return
    out["available"] = True
    run = uuid.uuid4().hex[:8]
    headers = {"Authorization": f"Bearer {_token('service')}"}
    client = KeepAliveClient(ledger)
    path = HOLDS_PATH.format(tenant=tenant)

    async def one(i: int) -> None:
        body = json.dumps({"idempotency_key": f"{run}-{i}", "amount": "0.01", "ttl_seconds": 60}).encode()
        sent = time.time()
        started = time.perf_counter()
        error = ""
        try:
            status, answer = await client.request("POST", path, headers, body)
            if status not in (200, 201):
                error = answer[:200].decode(errors="replace")
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
            status, error = 0, repr(exc)[:200]
        out["samples"].append([sent, (time.perf_counter() - started) * 1000, status, error])

    try:
        for i in range(10):  # warm-up
            await one(-1 - i)
        out["samples"].clear()
        await _open_loop(config["hold_rate"], stop, one, out["skipped"])
    finally:
        await client.close()


async def main(config_path: str) -> None:
    config = json.loads(Path(config_path).read_text())
    stop = asyncio.Event()
    reads: list[list[float]] = []
    reads_skipped: list[float] = []
    marks: list[dict[str, Any]] = []
    hold_out: dict[str, Any] = {}
    tasks = [asyncio.create_task(balance_reader(config, stop, reads, reads_skipped)),
             asyncio.create_task(markers(config, stop, marks)),
             asyncio.create_task(holds(config, stop, hold_out))]
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line or line.strip() == "stop":
            break
    stop.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    errors = [repr(r) for r in results if isinstance(r, BaseException)]
    totals = marks.pop() if marks and "published_total" in marks[-1] else {}
    Path(config["out"]).write_text(json.dumps({
        "reads": reads, "reads_skipped": reads_skipped, "markers": marks, "marker_totals": totals, "holds": hold_out,
        "errors": errors}))
    print("done", flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))

"""Ledger speed on real PostgreSQL (a plain script; pytest does not collect it).

    DATABASE_URL=postgresql://billing:billing@127.0.0.1:55432/billing \\
        .venv/bin/python tests/bench/bench_ledger.py [--debits 50000] [--batch 500] [--holds 2000] \\
            [--service] [--busy-account 3000]

1. **Usage debits/s**: ``usage.debit`` commands committed in transactions of ``--batch`` commands (each
   with its Kafka ``Tracking`` position), spread over ``--tenants`` accounts: first one
   ``LedgerApplication.apply_commands`` call per transaction, then ``apply_chunks``, which prepares the
   next transaction while the previous one commits (what the Kafka consumer uses). Decoding the JSON
   records (``LedgerCommand.model_validate_json``) is measured separately. Then ``--workers`` processes
   at once, each on its own accounts, as ledger processes sharing the partitions of a consumer group run.
   Target: >= 10,000 debits/s.
2. **Hold decisions**: ``POST /v1/accounts/{tenant}/holds`` through the real HTTP stack (the ledger's
   routes under uvicorn in their own process, a minimal keep-alive client here) at a fixed, open-loop
   offered rate (``--hold-rate``, default 200/s), group commit as in the service; latency measured at the
   client (a process of its own: ``measure_holds``) from when each request was due, and from when it was issued
   (the due figure adds the client's own timer lateness, ~0.1 ms with the ``select()`` loop it runs on,
   ``run_client``, and any wait for a free connection). Target: p99 < 5 ms. First the floor: a bare one-row INSERT +
   COMMIT at the same rate (PostgreSQL's WAL flush on this machine). Then holds on a quiet ledger, then
   the same while another ledger process consumes usage on the same accounts at ``--load-rate`` debits/s
   (as ``LedgerService.handle_records`` does: batches per poll interval split into transactions, retried on
   conflicts): contention on the event table's insert lock and on the locks of the shared accounts
   (``billing_ledger.pg_recorder``), and version conflicts when either side's copy of an account is stale.
   The load runs in a process of its own, so it does not share an interpreter with the measuring client.
   The last line gives both p99 figures.
3. **Holds against the service** (``--service``): the same quiet run against ``billing serve ledger`` itself
   on the same store (its Kafka consumer, outbox relay publishing every hold's events, sweeper and the
   other background tasks in the process), not only its HTTP routes: what a caller of a deployed ledger
   sees.
4. **Debits through the service** (``--service-debits N``): N usage.debit commands published to the namespace's
   Kafka topic, then ``billing serve ledger`` started: debits/s from its first applied command to its last, with
   everything the service does meanwhile (its consumer, decoding, relay), its CPU per debit (its child processes'
   included: the relay's) and the machine's; then until its relay has published every recorded event.
5. **A busy account** (``--busy-account LIVE``): against the service too, one account gets ``LIVE`` holds over
   20 s (each living 60 s), then holds at 50/s for 90 s, while the sweeper expires the earlier ones in parts
   of 50 per transaction on the same account: p50/p95/p99 overall and while they expire (an account with
   3,000 live holds carries about 1 MB of state, so every replay of it is expensive).

Every process is set up as a ledger process is (``billing_ledger.tuning.tune_process``: GIL switch
interval, garbage collector).

Everything runs in a fresh schema ``bench_<random>_billing_ledger``, dropped at the end (with ``--service``
the namespace ``bench_<random>``'s Kafka topics too).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import selectors
import socket
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from billing_events import ids
from billing_events.messages import LedgerCommand
from billing_ledger.application import LedgerApplication, persistence_env
from billing_ledger.limits import CHUNK_COMMANDS_MAX, CONTENDED_CHUNK_COMMANDS_MAX, DIRECT_GROUP_COMMANDS_MAX
from billing_ledger.tuning import tune_process
from eventsourcing.persistence import IntegrityError, Tracking

GRANT_UNITS = "1000000000"  # USD per tenant: never runs out during the bench
# --busy-account: the account, its holds' lifetime, and the measured holds' rate and duration.
BUSY_TENANT = "bench-busy"
BUSY_TTL_SECONDS = 60.0
BUSY_HOLD_RATE = 50.0
BUSY_SECONDS = 90.0


def command(kind: str, tenant: str, payload: dict[str, object], cause: str) -> LedgerCommand:
    return LedgerCommand(command_id=ids.command_id(kind, tenant, cause), kind=kind, tenant=tenant,
                         issued_at=datetime.now(UTC), issued_by="bench", payload=payload)


def setup_accounts(app: LedgerApplication, tenants: list[str]) -> None:
    commands: list[LedgerCommand] = []
    for tenant in tenants:
        commands.append(command("account.open", tenant, {"currency": "USD"}, "open"))
        commands.append(command("credit.grant", tenant, {"grant_key": "bench", "unit": "USD",
                                                         "amount": GRANT_UNITS, "source": "promotion"}, "grant"))
    for start in range(0, len(commands), 500):
        app.apply_commands(commands[start:start + 500])


def quiet_logs() -> None:
    """Info-level logs in the bench's child processes, as the service logs (debug lines would mix with
    the figures on stdout)."""
    from billing_runtime.logging import configure_logging

    configure_logging(json_output=False)


def existing_store(database_url: str, schema: str) -> dict[str, str]:
    """Settings of another process on the bench's store: its tables exist, so no DDL (two processes starting
    together would race on eventsourcing's CREATE OR REPLACE FUNCTION: "tuple concurrently updated")."""
    return {**persistence_env(database_url, "var", schema), "CREATE_TABLE": "n"}


def debit_records(tenants: list[str], count: int, run: str) -> list[bytes]:
    now = datetime.now(UTC).isoformat()
    return [
        command("usage.debit", tenants[i % len(tenants)],
                {"unit": "USD", "amount_subunits": 2_000 + i % 7, "meter": "tokens", "at": now,
                 "cause": {"event_id": f"{run}-{i}"}}, f"{run}-{i}").to_json()
        for i in range(count)
    ]


def bench_debits(app: LedgerApplication, tenants: list[str], debits: int, batch: int, pipelined: bool,
                 partition: int) -> dict[str, float]:
    records = debit_records(tenants, debits, uuid.uuid4().hex[:8])
    started = time.perf_counter()
    commands = [LedgerCommand.model_validate_json(r) for r in records]
    decode_seconds = time.perf_counter() - started
    name = f"kafka:bench:{partition}"
    # Warm-up batch (connections, prepared statements, cache), not timed.
    app.apply_commands(commands[:batch], Tracking(name, batch))
    chunks = [(commands[start:start + batch], Tracking(name, start + len(commands[start:start + batch])))
              for start in range(batch, len(commands), batch)]
    started, cpu_started = time.perf_counter(), time.process_time()
    if pipelined:
        results = app.apply_chunks(chunks)
    else:
        results = [r for chunk, tracking in chunks for r in app.apply_commands(chunk, tracking)]
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    assert len(results) == len(commands) - batch and all(r.outcome == "applied" for r in results), results[:3]
    return {"debits_per_second": (len(commands) - batch) / seconds,
            # CPU time of this process per debit: what the ledger's Python costs, whatever else runs here.
            "cpu_us_per_debit": 1e6 * cpu_seconds / (len(commands) - batch),
            "decode_per_second": len(records) / decode_seconds}


def debit_worker(database_url: str, schema: str, tenants: list[str], debits: int, batch: int, partition: int,
                 start: Any, done: Any) -> None:
    """One ledger process's share (its own accounts, like its own partitions): pipelined debits."""
    tune_process()
    app = LedgerApplication(existing_store(database_url, schema))
    try:
        commands = [LedgerCommand.model_validate_json(r) for r in debit_records(tenants, debits, uuid.uuid4().hex)]
        name = f"kafka:bench-workers:{partition}"
        app.apply_commands(commands[:batch], Tracking(name, batch))  # warm-up: cache, connections
        chunks = [(commands[i:i + batch], Tracking(name, i + len(commands[i:i + batch])))
                  for i in range(batch, len(commands), batch)]
        start.wait()
        began = time.perf_counter()
        results = app.apply_chunks(chunks)
        done.put((len(results), began, time.perf_counter()))
    finally:
        app.close()


def bench_workers(database_url: str, schema: str, tenants: list[str], debits: int, batch: int, workers: int
                  ) -> float:
    """Debits/s committed by ``workers`` ledger processes at once, each on its own accounts."""
    context = multiprocessing.get_context("spawn")
    start, done = context.Event(), context.Queue()
    processes = [context.Process(target=debit_worker, args=(database_url, schema, tenants[w::workers],
                                                            debits // workers, batch, w, start, done))
                 for w in range(workers)]
    for process in processes:
        process.start()
    time.sleep(5.0)  # every worker decoded its records and warmed up
    start.set()
    finished = [done.get(timeout=600) for _ in processes]
    for process in processes:
        process.join()
    return sum(n for n, _, _ in finished) / (max(e for _, _, e in finished) - min(b for _, b, _ in finished))


def usage_load(database_url: str, schema: str, tenants: list[str], rate: float, stop: Any, done: Any,
               ready: Any) -> None:
    """Another ledger process consuming usage at ``rate`` debits/s (run by multiprocessing).

    As ``LedgerService.handle_records`` does: every poll interval one batch of records, split into
    transactions of ``app.chunk_commands_max()`` (fewer while contended) with their tracking positions,
    applied by ``apply_chunks`` (which decides a chunk that lost a race again under the table lock); if a
    batch still fails it is retried from the tracked position, as the bus redelivers it. A process of its
    own, so neither the HTTP server's nor the measuring client's interpreter is shared with it. ``ready`` is
    set once its first batch is committed: a new process first loads every account (replaying those without
    a snapshot, seconds for the bench's 200), which is not the steady load the holds are measured under.
    """
    tune_process()
    quiet_logs()
    app = LedgerApplication(existing_store(database_url, schema))
    name, offset, committed, failures, contended = "kafka:bench-load:0", 0, 0, 0, 0
    poll_seconds = 0.1
    began = time.perf_counter()
    try:
        while not stop.is_set():
            tick = time.perf_counter()
            records = debit_records(tenants, max(1, int(rate * poll_seconds)), uuid.uuid4().hex[:8])
            commands = [LedgerCommand.model_validate_json(r) for r in records]
            first = offset
            for _ in range(100):
                done_to = max(first, app.next_offset("bench-load", 0) or 0)
                size = app.chunk_commands_max()
                contended += size != CHUNK_COMMANDS_MAX
                chunks = [(commands[i - first:i - first + size], Tracking(name, min(i + size, first + len(commands))))
                          for i in range(done_to, first + len(commands), size)]
                try:
                    app.apply_chunks(chunks)
                    break
                except IntegrityError:
                    failures += 1
            offset = first + len(commands)
            if not ready.is_set():  # warmed up: count from here
                ready.set()
                began = time.perf_counter()
                continue
            committed += len(commands)
            time.sleep(max(0.0, poll_seconds - (time.perf_counter() - tick)))
    finally:
        done.put((committed, failures, contended, time.perf_counter() - began))
        app.close()


def start_usage_load(database_url: str, schema: str, tenants: list[str], rate: float) -> tuple[Any, Any, Any]:
    context = multiprocessing.get_context("spawn")
    stop, done, ready = context.Event(), context.Queue(), context.Event()
    process = context.Process(target=usage_load, args=(database_url, schema, tenants, rate, stop, done, ready))
    process.start()
    if not ready.wait(timeout=300):
        raise RuntimeError("the usage load process did not commit its first batch in 300 s")
    time.sleep(1.0)  # committing steadily before the holds begin
    return process, stop, done


def stop_usage_load(process: Any, stop: Any, done: Any) -> tuple[int, int, int, float]:
    """Committed debits, batches that failed and were retried, batches applied contended, seconds."""
    stop.set()
    result = done.get(timeout=120)
    process.join()
    return result  # type: ignore[no-any-return]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class ServerTime:
    """Pure ASGI middleware: time inside the server (parsing, auth, decision, commit) until the answer starts,
    as an ``x-server-ms`` header, to tell it from client-side waits. Not Starlette's ``@app.middleware``
    (BaseHTTPMiddleware): that runs every request in an anyio task group whose cancellation leaves ~40 objects
    of cyclic garbage per request, and the collections that free them paused the server for 20-60 ms every
    few seconds: the instrument made the tail it measured (the ledger service has no such middleware)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def timed(message: Any) -> None:
            if message["type"] == "http.response.start":
                elapsed = f"{1000 * (time.perf_counter() - started):.3f}".encode()
                message = {**message, "headers": [*message.get("headers", []), (b"x-server-ms", elapsed)]}
            await send(message)

        await self.app(scope, receive, timed)


def serve_ledger(database_url: str, schema: str, port: int, group: int) -> None:
    """The ledger's HTTP routes in their own process, as in production (run by multiprocessing)."""
    import uvicorn
    from billing_ledger.direct import DirectCommands
    from billing_ledger.http import build_router
    from billing_runtime.http import create_app
    from billing_runtime.settings import Settings

    tune_process()  # as the ledger service does at start
    quiet_logs()
    app = LedgerApplication(existing_store(database_url, schema))
    api = create_app("bench ledger", Settings())
    api.include_router(build_router(app, DirectCommands(app, group_commands_max=group)))

    api.add_middleware(ServerTime)

    profile = os.environ.get("BENCH_PROFILE_SERVER")  # a file name: cProfile the server into it
    if profile:
        import cProfile

        cProfile.runctx("uvicorn.run(api, host='127.0.0.1', port=port, log_config=None, access_log=False, "
                        "lifespan='off')", globals(), {"uvicorn": uvicorn, "api": api, "port": port}, profile)
        return
    uvicorn.run(api, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="off")


class RawHttpClient:
    """A minimal HTTP/1.1 keep-alive client: httpx costs ~1 ms of CPU per request, which at 200 requests/s
    on two cores would measure the client, not the server. Connections are pooled; bodies are JSON."""

    def __init__(self, port: int, token: str, connections: int) -> None:
        self.port = port
        self.token = token
        self.size = connections
        self.idle: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

    async def open(self) -> None:
        for _ in range(self.size):
            self.idle.put_nowait(await asyncio.open_connection("127.0.0.1", self.port))

    async def close(self) -> None:
        while not self.idle.empty():
            _, writer = self.idle.get_nowait()
            writer.close()

    async def post(self, path: str, body: dict[str, object]) -> tuple[int, bytes, float]:
        reader, writer = await self.idle.get()
        try:
            return await self._exchange(reader, writer, path, body)
        except (asyncio.IncompleteReadError, ConnectionError):  # the server closed an idle keep-alive connection
            writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            return await self._exchange(reader, writer, path, body)

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str,
                        body: dict[str, object]) -> tuple[int, bytes, float]:
        payload = json.dumps(body).encode()
        writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {self.token}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        fields = dict(line.lower().split(b":", 1) for line in head.split(b"\r\n")[1:] if b":" in line)
        answer = await reader.readexactly(int(fields[b"content-length"]))
        self.idle.put_nowait((reader, writer))
        return status, answer, float(fields.get(b"x-server-ms", b"nan"))


async def bench_holds(port: int, tenants: list[str], holds: int, rate: float) -> dict[str, float]:
    from billing_runtime.auth import mint_token
    from billing_runtime.settings import Settings

    client = RawHttpClient(port, mint_token(Settings(), role="service"), connections=128)
    await client.open()
    latencies: list[float] = []
    issued_latencies: list[float] = []
    server_ms: list[float] = []
    run = uuid.uuid4().hex[:8]

    async def one(i: int, due: float) -> None:
        tenant = tenants[i % len(tenants)]
        # Ten minutes: none expires during the bench. With a minute, the quiet phases' 8,000 holds expired
        # together during the --service phase, and it measured that expiry storm (sweeps of 40 holds per
        # account deciding next to the holds) rather than decisions at 200/s.
        body = {"idempotency_key": f"{run}-{i}", "amount": "0.01", "ttl_seconds": 600}
        issued = time.perf_counter()
        status, answer, inside = await client.post(f"/v1/accounts/{tenant}/holds", body)
        issued_latencies.append(time.perf_counter() - issued)
        server_ms.append(inside)
        # From when the request was due, so time spent waiting for a free connection counts too.
        latencies.append(time.perf_counter() - due)
        assert status == 201, answer

    try:
        for i in range(len(tenants)):  # warm-up: every account cached in the server
            await one(i, time.perf_counter())
        latencies.clear()
        issued_latencies.clear()
        server_ms.clear()
        tasks = []
        interval = 1.0 / rate
        began = time.perf_counter()
        for n, i in enumerate(range(len(tenants), len(tenants) + holds)):
            # Open-loop arrivals at a fixed rate: a slow answer does not slow the offered load down.
            due = began + n * interval
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, due)))
        await asyncio.gather(*tasks)
    finally:
        await client.close()
    return {"p50_ms": 1000 * statistics.median(latencies), "p99_ms": 1000 * percentile(latencies, 0.99),
            "max_ms": 1000 * max(latencies), "server_p50_ms": statistics.median(server_ms),
            "server_p99_ms": percentile(server_ms, 0.99), "issued_p50_ms": 1000 * statistics.median(issued_latencies),
            "issued_p99_ms": 1000 * percentile(issued_latencies, 0.99)}


def run_client(coroutine: Any) -> Any:
    """Runs a measuring client's coroutine on an event loop whose timers fire on time. asyncio's default selector
    on Linux (epoll) waits in whole milliseconds, rounded up, so a request due in 2.3 ms was sent 0.6 ms late at
    the median and 1.1 ms at p99 on this machine (an open-loop client's own lateness, counted in every latency
    measured from when the request was due). ``select()`` takes microseconds: 0.1 ms late at the median, 0.7 ms at
    p99; the client holds at most ~130 sockets, far below its descriptor limit."""
    loop = asyncio.SelectorEventLoop(selectors.SelectSelector())
    try:
        return loop.run_until_complete(coroutine)
    finally:
        loop.close()


def _holds_in_process(port: int, tenants: list[str], holds: int, rate: float) -> dict[str, float]:
    return run_client(bench_holds(port, tenants, holds, rate))


def measure_holds(port: int, tenants: list[str], holds: int, rate: float) -> dict[str, float]:
    """``bench_holds`` in a fresh process of its own: the measuring client shares no heap with this one (its
    ledger application, the decoded commands of the debit phases), whose garbage collections would pause the
    client while requests are in flight, and so lengthen the latencies it measures."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_holds_in_process, port, tenants, holds, rate).result()


def commit_floor(database_url: str, schema: str, count: int, rate: float) -> dict[str, float]:
    """Latency of a bare one-row INSERT + COMMIT at ``rate``/s on one connection: what PostgreSQL's durable
    commit (WAL flush) alone costs on this machine now, the floor under any hold's latency."""
    latencies: list[float] = []
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f'CREATE TABLE "{schema}".commit_floor (id bigint)')
        began = time.perf_counter()
        for i in range(count):
            delay = began + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            started = time.perf_counter()
            with conn.transaction():
                conn.execute(f'INSERT INTO "{schema}".commit_floor VALUES (%s)', (i,))
            latencies.append(time.perf_counter() - started)
    return {"p50_ms": 1000 * statistics.median(latencies), "p99_ms": 1000 * percentile(latencies, 0.99)}


def start_server(database_url: str, schema: str, group: int) -> tuple[multiprocessing.process.BaseProcess, int]:
    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    process = multiprocessing.get_context("spawn").Process(target=serve_ledger, args=(database_url, schema, port, group),
                                                           daemon=True)
    process.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return process, port
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError("the ledger HTTP server did not start")


@contextlib.contextmanager
def serving_ledger(app: LedgerApplication, database_url: str, schema: str) -> Iterator[int]:
    """``billing serve ledger`` in the namespace whose ledger schema is ``schema`` (its port), once its relay has
    published what the earlier phases recorded (a backlog is not what a quiet ledger does)."""
    from billing_ledger.relay import RELAY_NAME

    from tests.support import ServiceProcess, free_port

    namespace = schema.removesuffix("_billing_ledger")
    port = free_port()
    env = {**os.environ, "DATABASE_URL": database_url, "BILLING_NAMESPACE": namespace}
    env.setdefault("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"{namespace}-ledger.log"
    process = ServiceProcess(["serve", "ledger", "--port", str(port)], env, log, port).start()
    try:
        deadline = time.monotonic() + 300
        while (app.process_recorder.max_tracking_id(RELAY_NAME) or 0) < app.recorder.max_notification_id():
            if time.monotonic() > deadline:
                raise RuntimeError("the service's relay did not publish the store's events in 300 s")
            time.sleep(0.5)
        yield port
    finally:
        process.stop()
        asyncio.run(_drop_topics(env["KAFKA_BOOTSTRAP_SERVERS"], namespace))


async def busy_account_holds(port: int, tenant: str, live: int, ttl: float, rate: float, seconds: float
                             ) -> dict[str, float]:
    """Holds at ``rate``/s for ``seconds`` on one account that already has ``live`` holds (placed over 20 s
    before, each living ``ttl`` s): once they start to expire, the service's sweeper expires them (in parts of
    50 per transaction) on the account the holds are decided on. Latency from when each request was due;
    ``expiring_*``: the holds decided while the earlier ones expire (after ``ttl - 20`` s)."""
    from billing_runtime.auth import mint_token
    from billing_runtime.settings import Settings

    client = RawHttpClient(port, mint_token(Settings(), role="service"), connections=32)
    await client.open()
    run = uuid.uuid4().hex[:8]
    samples: list[tuple[float, float]] = []

    async def one(key: str, due: float, measured: bool) -> None:
        body = {"idempotency_key": f"{run}-{key}", "amount": "0.01", "ttl_seconds": ttl}
        status, answer, _ = await client.post(f"/v1/accounts/{tenant}/holds", body)
        assert status == 201, answer
        if measured:
            samples.append((due, time.perf_counter() - due))

    async def offer(count: int, interval: float, prefix: str, measured: bool) -> float:
        began = time.perf_counter()
        tasks = []
        for n in range(count):
            delay = began + n * interval - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(f"{prefix}{n}", began + n * interval, measured)))
        await asyncio.gather(*tasks)
        return began

    try:
        await offer(live, 20.0 / live, "live-", measured=False)
        began = await offer(int(rate * seconds), 1.0 / rate, "", measured=True)
    finally:
        await client.close()
    expiring_from = began + ttl - 20.0

    def figures(prefix: str, values: list[float]) -> dict[str, float]:
        values = sorted(values)
        return {f"{prefix}p50_ms": 1000 * statistics.median(values), f"{prefix}p95_ms": 1000 * percentile(values, 0.95),
                f"{prefix}p99_ms": 1000 * percentile(values, 0.99), f"{prefix}max_ms": 1000 * values[-1]}

    return {**figures("", [latency for _, latency in samples]),
            **figures("expiring_", [latency for due, latency in samples if due >= expiring_from] or [0.0])}


def service_debits(app: LedgerApplication, database_url: str, schema: str, tenants: list[str], debits: int) -> str:
    """``debits`` usage.debit commands published to the namespace's ``billing.ledger.commands`` first, then
    ``billing serve ledger`` started on the store: debits/s from its first applied command to its last (its Kafka
    consumer, its relay publishing the events meanwhile, everything the service does), and its CPU per debit."""
    import psutil
    from billing_events import topics
    from billing_ledger.relay import RELAY_NAME
    from billing_runtime.bus import OutMessage
    from billing_runtime.settings import Settings

    from tests.support import ServiceProcess, free_port

    namespace = schema.removesuffix("_billing_ledger")
    from tests.bench.harness.backlog import publish

    base = Settings.from_env()
    bootstrap = base.kafka_bootstrap_servers or "127.0.0.1:9092"
    settings = Settings(**{**base.__dict__, "namespace": namespace, "kafka_bootstrap_servers": bootstrap})
    records = debit_records(tenants, debits, uuid.uuid4().hex[:8])
    messages = [OutMessage(topics.LEDGER_COMMANDS, str(ids.account_id(tenants[i % len(tenants)])), record,
                           (("schema", b"ledger.command/v1"),)) for i, record in enumerate(records)]

    def applied() -> int:
        return sum(app.next_offset(topics.LEDGER_COMMANDS, p) or 0 for p in range(settings.topic_partitions))

    def relayed() -> int:
        return app.process_recorder.max_tracking_id(RELAY_NAME) or 0

    children: dict[int, Any] = {}

    def service_cpu(service: Any, of_children: bool = False) -> float:
        """User + system CPU seconds of the service and its child processes (its relay's, when it has one), or
        of the children alone."""
        total = 0.0
        for child in service.children(recursive=True):
            children.setdefault(child.pid, child)  # the same Process object: its CPU once it is gone too
        for process in ([] if of_children else [service]) + list(children.values()):
            with contextlib.suppress(psutil.NoSuchProcess):
                total += sum(process.cpu_times()[:2])
        return total

    asyncio.run(publish(settings, messages))
    port = free_port()
    env = {**os.environ, "DATABASE_URL": database_url, "BILLING_NAMESPACE": namespace,
           "KAFKA_BOOTSTRAP_SERVERS": bootstrap}
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"{namespace}-ledger-debits.log"
    process = ServiceProcess(["serve", "ledger", "--port", str(port)], env, log, port).start()
    try:
        assert process.proc is not None
        service = psutil.Process(process.proc.pid)
        deadline = time.monotonic() + 600
        while (first := applied()) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        began, cpu_began, machine = time.perf_counter(), service_cpu(service), psutil.cpu_times()
        children_began = service_cpu(service, of_children=True)
        while applied() < debits and time.monotonic() < deadline:
            time.sleep(0.05)
        seconds, cpu = time.perf_counter() - began, service_cpu(service) - cpu_began
        now = psutil.cpu_times()
        busy = sum(getattr(now, f) - getattr(machine, f) for f in ("user", "nice", "system", "irq", "softirq"))
        done = applied() - first
        # Then until the relay has published every recorded event (wherever it runs, its CPU counts).
        while relayed() < app.recorder.max_notification_id() and time.monotonic() < deadline:
            time.sleep(0.05)
        relay_seconds, relay_cpu = time.perf_counter() - began, service_cpu(service) - cpu_began
        children_cpu = service_cpu(service, of_children=True) - children_began
        return (f"usage debits through `billing serve ledger` from a backlog of {debits:,} on Kafka: {done / seconds:,.0f}/s "
                f"committed ({done:,} in {seconds:.1f} s; service CPU {1e6 * cpu / done:.0f} us per debit, its relay "
                f"publishing the events meanwhile; machine {100 * busy / (seconds * (os.cpu_count() or 1)):.0f} % busy); "
                f"all relayed after {relay_seconds:.1f} s ({done / relay_seconds:,.0f} debits/s, service CPU "
                f"{1e6 * relay_cpu / done:.0f} us per debit, of which its child processes' (the relay's) "
                f"{1e6 * children_cpu / done:.0f})")
    finally:
        process.stop()
        asyncio.run(_drop_topics(bootstrap, namespace))


async def _drop_topics(bootstrap_servers: str, namespace: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        mine = [t for t in await admin.list_topics() if t.startswith(f"{namespace}.")]
        if mine:
            await admin.delete_topics(mine)
    finally:
        await admin.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--debits", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--tenants", type=int, default=200)
    parser.add_argument("--holds", type=int, default=2_000)
    parser.add_argument("--hold-rate", type=float, default=200.0)
    parser.add_argument("--workers", type=int, default=2, help="ledger processes for the scale-out figure")
    parser.add_argument("--load-rate", type=float, default=5_000.0,
                        help="usage debits/s offered by another ledger process during the second hold run")
    parser.add_argument("--group", type=int, default=DIRECT_GROUP_COMMANDS_MAX,
                        help="decisions per transaction at most (1: one transaction per request)")
    parser.add_argument("--service", action="store_true",
                        help="also hold at --hold-rate against `billing serve ledger` (relay and tasks running)")
    parser.add_argument("--service-debits", type=int, default=0, metavar="N",
                        help="also N usage debits through `billing serve ledger` from a backlog on Kafka")
    parser.add_argument("--busy-account", type=int, default=0, metavar="LIVE",
                        help="also hold at 50/s for 90 s against `billing serve ledger` on one account that has "
                             "LIVE live holds (e.g. 3000) expiring meanwhile")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for tests.bench.harness
    from tests.bench.harness.resources import host_speed_ms

    print(f"host speed {host_speed_ms()} ms (tests/bench/harness/resources.host_speed_ms: lower is faster)")
    tune_process()  # this process measures the ledger's batch path: set up as a ledger process is
    database_url = os.environ.get("DATABASE_URL", "postgresql://billing:billing@127.0.0.1:55432/billing")
    schema = f"bench_{uuid.uuid4().hex[:8]}_billing_ledger"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    app = LedgerApplication(persistence_env(database_url, "var", schema))
    try:
        tenants = [f"bench-{i}" for i in range(args.tenants)]
        setup_accounts(app, tenants + ([BUSY_TENANT] if args.busy_account else []))
        for pipelined, partition in ((False, 0), (True, 1)):
            debits = bench_debits(app, tenants, args.debits, args.batch, pipelined, partition)
            how = "apply_chunks (pipelined)" if pipelined else "apply_commands"
            print(f"usage debits via {how}: {debits['debits_per_second']:,.0f}/s committed "
                  f"(transactions of {args.batch}, {args.tenants} accounts; ledger CPU "
                  f"{debits['cpu_us_per_debit']:.0f} us/debit); decoding {debits['decode_per_second']:,.0f} records/s")
        if args.service_debits:
            print(service_debits(app, database_url, schema, tenants, args.service_debits))
        if args.workers > 1:
            rate = bench_workers(database_url, schema, tenants, args.debits, args.batch, args.workers)
            print(f"usage debits by {args.workers} ledger processes on their own accounts: {rate:,.0f}/s committed")
        if args.holds:
            floor = commit_floor(database_url, schema, min(args.holds, 1_000), args.hold_rate)
            print(f"PostgreSQL durable commit alone (one-row INSERT + COMMIT at {args.hold_rate:.0f}/s): "
                  f"p50 {floor['p50_ms']:.2f} ms, p99 {floor['p99_ms']:.2f} ms (machine load average "
                  f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores)")
            server, port = start_server(database_url, schema, args.group)
            try:
                quiet = measure_holds(port, tenants, args.holds, args.hold_rate)
                print(f"holds at {args.hold_rate:.0f}/s over HTTP (group commit <= {args.group}): "
                      f"p50 {quiet['p50_ms']:.2f} ms, p99 {quiet['p99_ms']:.2f} ms, max {quiet['max_ms']:.2f} ms "
                      f"(inside the server: p50 {quiet['server_p50_ms']:.2f} ms, p99 {quiet['server_p99_ms']:.2f} ms; from issue "
                      f"p50 {quiet['issued_p50_ms']:.2f}, p99 {quiet['issued_p99_ms']:.2f} ms)")
                load = start_usage_load(database_url, schema, tenants, args.load_rate)
                try:
                    busy = measure_holds(port, tenants, args.holds, args.hold_rate)
                finally:
                    committed, failures, contended, seconds = stop_usage_load(*load)
                print(f"holds at {args.hold_rate:.0f}/s over HTTP while usage batches commit to the same store "
                      f"({committed / seconds:,.0f} debits/s committed by another ledger process, {contended} "
                      f"batches contended (transactions of {CONTENDED_CHUNK_COMMANDS_MAX} decided under locks), "
                      f"{failures} retried): p50 {busy['p50_ms']:.2f} ms, p99 {busy['p99_ms']:.2f} ms, "
                      f"max {busy['max_ms']:.2f} ms (inside the server: p50 {busy['server_p50_ms']:.2f} ms, "
                      f"p99 {busy['server_p99_ms']:.2f} ms)")
                print(f"hold decision p99 at {args.hold_rate:.0f} holds/s: quiet {quiet['p99_ms']:.2f} ms, "
                      f"under usage load {busy['p99_ms']:.2f} ms (target < 5 ms)")
            finally:
                server.terminate()
                server.join()
        if args.service or args.busy_account:
            with serving_ledger(app, database_url, schema) as port:
                if args.service and args.holds:
                    served = measure_holds(port, tenants, args.holds, args.hold_rate)
                    print(f"holds at {args.hold_rate:.0f}/s against `billing serve ledger` (consumer, relay and "
                          f"background tasks running): p50 {served['p50_ms']:.2f} ms, p99 {served['p99_ms']:.2f} ms, "
                          f"max {served['max_ms']:.2f} ms (from issue p50 {served['issued_p50_ms']:.2f} ms, "
                          f"p99 {served['issued_p99_ms']:.2f} ms)")
                if args.busy_account:
                    busy = run_client(busy_account_holds(port, BUSY_TENANT, args.busy_account, BUSY_TTL_SECONDS,
                                                          BUSY_HOLD_RATE, BUSY_SECONDS))
                    print(f"holds at {BUSY_HOLD_RATE:.0f}/s on one account with {args.busy_account:,} live holds "
                          f"(`billing serve ledger`, its sweeper expiring them): p50 {busy['p50_ms']:.2f} ms, "
                          f"p95 {busy['p95_ms']:.2f} ms, p99 {busy['p99_ms']:.2f} ms, max {busy['max_ms']:.2f} ms; "
                          f"while they expire: p95 {busy['expiring_p95_ms']:.2f} ms, "
                          f"p99 {busy['expiring_p99_ms']:.2f} ms, max {busy['expiring_max_ms']:.2f} ms")
    finally:
        app.close()
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    print(f"host speed {host_speed_ms()} ms after the runs")


if __name__ == "__main__":
    main()

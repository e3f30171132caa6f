"""The end-to-end bench: the four services as processes on real Kafka + PostgreSQL, one run, every figure.

Phases (all in a fresh namespace ``bench<hex>``: its own topics, consumer groups and schemas):

1. topics created; the stream generated in memory (not timed);
2. ``billing serve ingest|rating|ledger|projections`` started as four processes; the catalogue and the
   accounts applied with ``billing catalog apply``; wait until every account is visible and ingest and
   rating have learnt the catalogue;
3. load: the lag sampler, the resource monitor, the probes process (balance reader, markers, holds) and
   optional py-spy profilers start; the stream is produced to ``<ns>.billing.usage.raw`` (as fast as
   possible, or at ``rate`` events/s); the run is *done* when every tenant's balance shows exactly its
   expected charge and every bad event has its dead letter;
4. idle: a few more seconds of markers and reads with no load; then wait until every consumer group has
   caught up, and reconcile;
5. the raw limits (Kafka produce+consume, PostgreSQL COPY) with the same messages, services idle;
6. services stopped, namespace dropped (unless ``keep``), report written.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import yaml
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from billing_runtime.auth import mint_token
from billing_runtime.bus import ensure_topics
from billing_runtime.settings import Settings

from tests.bench.harness import limits, profile, reconcile, report, resources, stream
from tests.bench.harness.kafka_watch import CATALOG_GROUPS, STAGES, KafkaWatch, Snapshot, sample_every
from tests.support import BILLING, ROOT, free_port

SERVICES = ("ingest", "rating", "ledger", "projections")
TOPIC_NAMES = ("billing.usage.raw", "billing.usage.accepted", "billing.usage.rejected", "billing.payments",
               "billing.ledger.commands", "billing.ledger.events")
MARKER_TENANT = "bench-marker"
HOLD_TENANT = "bench-holds"
DONE_CHECK_LAG_MAX = 200  # records left upstream of projections before balances are polled for completion


@dataclass
class BenchConfig:
    events: int = 50_000
    tenants: int = 20
    rate: float = 0.0  # events/s offered; 0 = as fast as the producer goes (a backlog)
    duration: float | None = None  # sustained mode: rate * duration events
    # After a backlog, a paced phase at a sustainable rate (latency under load is only meaningful when the
    # pipeline keeps up): paced_rate events/s, or paced_fraction of the backlog's end-to-end rate.
    paced_seconds: float = 30.0
    paced_rate: float | None = None
    paced_fraction: float = 0.5
    partitions: int = 6
    batch_records_max: int | None = None  # BILLING_BATCH_RECORDS_MAX for the services (None: their default)
    reader_rate: float = 200.0
    hold_rate: float = 50.0
    marker_interval: float = 0.25
    idle_seconds: float = 5.0
    raw_limits: bool = True
    profile: list[str] = field(default_factory=list)  # services to profile with py-spy
    profile_rate: int = 100
    seed: int = 7
    timeout: float | None = None  # for the pipeline to drain; default grows with the size
    keep: bool = False  # keep the namespace (topics, schemas) for inspection
    out_dir: Path = ROOT / "bench" / "results"
    plot: bool = True
    label: str = "e2e"
    # Run the services from a snapshot of the committed tree (git archive HEAD) instead of the working tree,
    # which others may be editing: the figures then belong to one commit.
    snapshot: bool = False
    source: Path | None = None  # or run the services from this tree (same layout; e.g. a patched copy)

    def offered_events(self) -> int:
        if self.duration:
            return int((self.rate or 10_000) * self.duration)
        return self.events


def log(message: str) -> None:
    print(f"[bench {datetime.now().strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass
class Phase:
    name: str  # backlog | paced | sustained
    data: stream.Stream
    rate: float  # events/s offered (0: as fast as possible)
    marks: dict[str, float] = field(default_factory=dict)  # produce_start, produce_end, done (time.time())
    finished: bool = False

    @property
    def seconds(self) -> float:
        return self.marks["done"] - self.marks["produce_start"]

    @property
    def events_per_second(self) -> float:
        return self.data.size / self.seconds if self.seconds > 0 else 0.0


# Import package -> directory, as pyproject.toml maps them (for a snapshot run from PYTHONPATH).
PACKAGE_DIRS = {"billing_events": "libs/billing_events", "billing_runtime": "libs/billing_runtime",
                "billing_ingest": "services/ingest", "billing_rating": "services/rating",
                "billing_ledger": "services/ledger", "billing_projections": "services/projections",
                "billing_cli": "cli"}


def git(*args: str) -> str:
    result = subprocess.run(["git", *args], check=False, cwd=ROOT, capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else ""


def snapshot_source(target: Path) -> Path:
    """``git archive HEAD`` into ``target``, with its package links (see ``link_packages``)."""
    target.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", "--format=tar", "HEAD"], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return link_packages(target)


def link_packages(target: Path) -> Path:
    """A directory of package links into ``target`` that PYTHONPATH puts before the editable install
    (setuptools appends its finder to ``sys.meta_path``, after the path finder)."""
    packages = target / ".bench-packages"
    packages.mkdir(exist_ok=True)
    for name, directory in PACKAGE_DIRS.items():
        link = packages / name
        if not link.exists():
            link.symlink_to(target / directory, target_is_directory=True)
    return target


class Service:
    def __init__(self, name: str, env: dict[str, str], log_path: Path, cwd: Path = ROOT) -> None:
        self.name, self.env, self.log_path, self.cwd = name, env, log_path, cwd
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen([BILLING, "serve", self.name, "--port", str(self.port)], env=self.env,
                                         stdout=log_file, stderr=subprocess.STDOUT, cwd=self.cwd)

    async def ready(self, timeout: float = 90) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=2) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{self.url}/readyz")).status_code == 200:
                        return
                await asyncio.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready after {timeout}s:\n{self.log_tail()}")

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def error_lines(self) -> int:
        with contextlib.suppress(OSError):
            return sum(1 for line in self.log_path.read_text(errors="replace").splitlines()
                       if '"level": "error"' in line or '"level":"error"' in line or "Traceback" in line)
        return 0


def _headers(settings: Settings, role: str, tenant: str | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(settings, role=role, tenant=tenant, subject='bench')}"}


async def _available(client: httpx.AsyncClient, settings: Settings, tenant: str) -> Decimal | None:
    response = await client.get(f"/v1/accounts/{tenant}/balance", headers=_headers(settings, "viewer", tenant))
    if response.status_code == 404:
        return None
    response.raise_for_status()
    wallets = {w["unit"]: w for w in response.json()["wallets"]}
    return Decimal(wallets["USD"]["available"]) if "USD" in wallets else None


class Bench:
    def __init__(self, config: BenchConfig) -> None:
        self.config = config
        self.bootstrap = os.environ["KAFKA_BOOTSTRAP_SERVERS"]
        self.database_url = os.environ["DATABASE_URL"]
        self.namespace = "bench" + uuid.uuid4().hex[:8]
        self.stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        self.name = f"{config.label}-{self.stamp}-{self.namespace}"
        self.run_dir = config.out_dir / self.name
        self.settings = Settings.from_env()
        self.services: dict[str, Service] = {}
        self.tenants = [f"bench-t{i:02d}" for i in range(config.tenants)]
        self.notes: list[str] = []
        self.source = ROOT  # where the services' code comes from
        self.commit = git("rev-parse", "HEAD")
        self.dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", "libs", "services", "cli"))

    def topic(self, name: str) -> str:
        return f"{self.namespace}.{name}"

    # -- setup ---------------------------------------------------------------------------------------------

    async def start_services(self) -> None:
        env = {**os.environ, "BILLING_NAMESPACE": self.namespace, "BILLING_DATA_DIR": str(self.run_dir / "var"),
               "BILLING_TOPIC_PARTITIONS": str(self.config.partitions)}
        if self.config.batch_records_max:
            env["BILLING_BATCH_RECORDS_MAX"] = str(self.config.batch_records_max)
        if self.source != ROOT:
            env["PYTHONPATH"] = f"{self.source / '.bench-packages'}:{self.source}"
        for name in SERVICES:
            self.services[name] = Service(name, env, self.run_dir / f"{name}.log", self.source)
            self.services[name].start()
        await asyncio.gather(*(s.ready() for s in self.services.values()))

    async def apply_catalog(self) -> None:
        document = stream.catalog_document([*self.tenants, MARKER_TENANT, HOLD_TENANT])
        path = self.run_dir / "catalog.yaml"
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        result = await asyncio.to_thread(
            subprocess.run, [BILLING, "catalog", "apply", str(path)], env=self.services["ingest"].env, cwd=self.source,
            capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"billing catalog apply failed: {result.stderr[-2000:]}")

    async def wait_accounts(self, watch: KafkaWatch, timeout: float = 120) -> None:
        grant = Decimal(stream.GRANT_USD)
        waiting = [*self.tenants, MARKER_TENANT, HOLD_TENANT]
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(base_url=self.services["projections"].url, timeout=10) as client:
            while waiting and time.monotonic() < deadline:
                waiting = [t for t in waiting if await _available(client, self.settings, t) != grant]
                if waiting:
                    await asyncio.sleep(0.3)
        if waiting:
            raise RuntimeError(f"accounts not visible after {timeout}s: {waiting[:5]}")
        while not await watch.caught_up(CATALOG_GROUPS):
            if time.monotonic() > deadline:
                raise RuntimeError("ingest/rating did not learn the catalogue in time")
            await asyncio.sleep(0.3)

    # -- load ----------------------------------------------------------------------------------------------

    async def produce(self, phase: Phase) -> None:
        data, rate = phase.data, phase.rate
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", enable_idempotence=True,
                                    linger_ms=5, max_batch_size=1024 * 1024)
        await producer.start()
        topic = self.topic("billing.usage.raw")
        try:
            phase.marks["produce_start"] = time.time()
            futures = []
            if rate <= 0:
                for key, value in data.records:
                    futures.append(await producer.send(topic, value, key=key))
            else:
                began = time.perf_counter()
                sent = 0
                while sent < data.size:
                    due = min(data.size, int((time.perf_counter() - began) * rate) + 1)
                    for key, value in data.records[sent:due]:
                        futures.append(await producer.send(topic, value, key=key))
                    sent = due
                    if len(futures) > 50_000:
                        await asyncio.gather(*futures)
                        futures.clear()
                    await asyncio.sleep(max(0.0, began + sent / rate - time.perf_counter()))
            await asyncio.gather(*futures)
            phase.marks["produce_end"] = time.time()
        finally:
            await producer.stop()

    async def wait_done(self, watch: KafkaWatch, phase: Phase, expected: stream.Expected, timeout: float) -> bool:
        """Until every tenant shows its expected balance (``expected``: everything produced so far) and every
        bad event has its dead letter."""
        grant = stream.subunits(Decimal(stream.GRANT_USD))
        charges = expected.charge_subunits()
        want = {t: Decimal(grant - charges.get(t, 0)) / stream.SUBUNITS_PER_UNIT for t in self.tenants}
        remaining = set(want)
        letters_done = False
        next_balance_check = 0.0
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(base_url=self.services["projections"].url, timeout=10) as client:
            while time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                if "produce_end" not in phase.marks:
                    continue
                if not letters_done:
                    rejected = (await watch.end_offsets(["billing.usage.rejected"]))["billing.usage.rejected"]
                    letters_done = rejected >= expected.bad_count
                # Balances are read only once ingest, rating and the ledger have (almost) nothing left: cheap
                # Kafka checks first, so the completion check adds no load while the pipeline is busy. (Not
                # "nothing at all": the probes' markers and holds keep a trickle going.)
                if time.monotonic() < next_balance_check:
                    continue
                lag = (await watch.snapshot()).lag
                if lag["ingest"] + lag["rating"] + lag["ledger"] > DONE_CHECK_LAG_MAX:
                    continue
                next_balance_check = time.monotonic() + 0.3
                for tenant in sorted(remaining):
                    if await _available(client, self.settings, tenant) == want[tenant]:
                        remaining.discard(tenant)
                if not remaining and letters_done:
                    phase.marks["done"] = time.time()
                    phase.finished = True
                    return True
        self.notes.append(f"{phase.name}: pipeline did not finish within {timeout:.0f}s: {len(remaining)} tenants "
                          f"short, dead letters {'complete' if letters_done else 'incomplete'}")
        phase.marks["done"] = time.time()
        return False

    async def run_phase(self, watch: KafkaWatch, phase: Phase, expected: stream.Expected) -> None:
        how = f"at {phase.rate:,.0f}/s" if phase.rate else "as fast as possible"
        log(f"{phase.name}: producing {phase.data.size:,} events to {self.topic('billing.usage.raw')} {how}")
        timeout = self.config.timeout or 120 + phase.data.size / 500 + (phase.data.size / phase.rate if phase.rate
                                                                         else 0)
        done_task = asyncio.create_task(self.wait_done(watch, phase, expected, timeout))
        await self.produce(phase)
        log(f"{phase.name}: produced in {phase.marks['produce_end'] - phase.marks['produce_start']:.1f}s; "
            "waiting for balances")
        await done_task
        log(f"{phase.name}: {'done' if phase.finished else 'TIMED OUT'} after {phase.seconds:.1f}s "
            f"({phase.events_per_second:,.0f} events/s end to end)")

    async def wait_drained(self, watch: KafkaWatch, timeout: float = 120) -> None:
        """Every consumer group (stages and catalogue) at the end of its topic, twice a second apart."""
        groups = {**STAGES, **CATALOG_GROUPS}
        deadline = time.monotonic() + timeout
        stable = 0
        while time.monotonic() < deadline and stable < 2:
            stable = stable + 1 if await watch.caught_up(groups) else 0
            await asyncio.sleep(1.0)
        if stable < 2:
            self.notes.append("consumer groups still lagging after the run")

    # -- the run -------------------------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        cfg = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.source is not None:
            self.source = link_packages(cfg.source.resolve())
            self.dirty = True
            log(f"services run from {self.source}")
        elif cfg.snapshot:
            self.source = snapshot_source(self.run_dir / "src")
            self.dirty = False
            log(f"services run from a snapshot of commit {self.commit[:12]} ({self.source})")
        offered = cfg.offered_events()
        if cfg.duration and not cfg.rate:
            cfg.rate = 10_000
        log(f"namespace {self.namespace}; generating {offered:,} events over {cfg.tenants} tenants")
        first = Phase("sustained" if cfg.duration else "backlog" if not cfg.rate else "paced",
                      stream.generate(self.namespace, self.tenants, offered, seed=cfg.seed), cfg.rate)
        phases = [first]
        expected = first.data.expected
        await ensure_topics(self.bootstrap, cfg.partitions, [self.topic(t) for t in TOPIC_NAMES])
        watch = KafkaWatch(self.bootstrap, self.namespace, cfg.partitions)
        await watch.start()
        snapshots: list[Snapshot] = []
        probes_proc: subprocess.Popen[str] | None = None
        profilers: dict[str, profile.Profiler] = {}
        result: dict[str, Any] = {}
        try:
            log("starting ingest, rating, ledger, projections")
            await self.start_services()
            await self.apply_catalog()
            await self.wait_accounts(watch)
            log("catalogue and accounts visible; starting probes")
            probes_out = self.run_dir / "probes.json"
            probes_cfg = {
                "projections_url": self.services["projections"].url, "ledger_url": self.services["ledger"].url,
                "bootstrap": self.bootstrap, "raw_topic": self.topic("billing.usage.raw"), "run": self.namespace,
                "reader_tenants": self.tenants, "reader_rate": cfg.reader_rate, "marker_tenant": MARKER_TENANT,
                "marker_grant": stream.GRANT_USD, "marker_interval": cfg.marker_interval,
                "hold_tenant": HOLD_TENANT, "hold_rate": cfg.hold_rate, "out": str(probes_out)}
            (self.run_dir / "probes-config.json").write_text(json.dumps(probes_cfg))
            probes_proc = subprocess.Popen(  # noqa: ASYNC220 - started once, before the measurement
                [sys.executable, "-m", "tests.bench.harness.probes", str(self.run_dir / "probes-config.json")],
                cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert probes_proc.stdout is not None
            line = await asyncio.to_thread(probes_proc.stdout.readline)
            if line.strip() != "ready":
                raise RuntimeError(f"probes did not start: {line!r}")
            pids = {name: s.proc.pid for name, s in self.services.items() if s.proc}
            monitor = resources.ResourceMonitor(pids, {"bench harness": os.getpid(), "bench probes": probes_proc.pid})
            stop_sampling = asyncio.Event()
            samplers = [asyncio.create_task(sample_every(watch, 1.0, snapshots, stop_sampling)),
                        asyncio.create_task(monitor.run(stop_sampling))]
            for name in cfg.profile:
                profilers[name] = profile.Profiler(pids[name], self.run_dir / f"profile-{name}.txt", cfg.profile_rate)
                if not profilers[name].start():
                    self.notes.append("py-spy not installed: no profile")
                    profilers.pop(name)
            await asyncio.sleep(2.0)  # a baseline: the probes alone, no usage load yet

            await self.run_phase(watch, first, expected)
            if first.name == "backlog" and cfg.paced_seconds > 0 and first.finished:
                rate = cfg.paced_rate or max(10.0, round(cfg.paced_fraction * first.events_per_second, -1))
                size = max(100, int(rate * cfg.paced_seconds))
                paced = Phase("paced", stream.generate(self.namespace + "p", self.tenants, size, seed=cfg.seed + 1),
                              rate)
                phases.append(paced)
                expected = stream.merged(expected, paced.data.expected)
                await self.run_phase(watch, paced, expected)
            for p in profilers.values():
                p.stop()
            log(f"{cfg.idle_seconds:.0f}s idle probes")
            idle_start = time.time()
            await asyncio.sleep(cfg.idle_seconds)
            idle = (idle_start, time.time())
            assert probes_proc.stdin is not None
            probes_proc.stdin.write("stop\n")
            probes_proc.stdin.flush()
            await asyncio.to_thread(probes_proc.wait, 90)
            probes = json.loads(probes_out.read_text())
            await self.wait_drained(watch)
            stop_sampling.set()
            await asyncio.gather(*samplers)

            log("reconciling")
            markers_published = int(probes.get("marker_totals", {}).get("published_total", 0))
            recon = await reconcile.reconcile(
                bootstrap=self.bootstrap, namespace=self.namespace, partitions=cfg.partitions,
                projections_url=self.services["projections"].url,
                token=lambda t: _headers(self.settings, "viewer", t), expected=expected,
                marker_tenant=MARKER_TENANT, markers_published=markers_published)

            raw: dict[str, Any] = {}
            if cfg.raw_limits:
                log("raw limits: Kafka produce+consume, PostgreSQL COPY (services idle)")
                raw["kafka"] = await limits.kafka_limit(self.bootstrap, self.topic("bench.raw-limit"),
                                                        cfg.partitions, first.data.records)
                raw["postgres"] = await limits.postgres_limit(
                    self.database_url, f"{self.namespace}_bench_raw", first.data.records,
                    cfg.batch_records_max or self.settings.batch_records_max)
            profiles = {name: profile.summarise(p.out) for name, p in profilers.items() if p.out.exists()}
            result = report.build(self, phases, expected, idle, snapshots, monitor.samples, probes, recon, raw,
                                  profiles)
        finally:
            for p in profilers.values():
                p.stop()
            if probes_proc is not None and probes_proc.poll() is None:
                probes_proc.kill()
                probes_proc.wait()
            exit_codes = {name: s.stop() for name, s in self.services.items()}
            errors = {name: s.error_lines() for name, s in self.services.items()}
            await watch.stop()
            if not cfg.keep:
                await self.drop_namespace()
                if cfg.snapshot and cfg.source is None:
                    shutil.rmtree(self.source, ignore_errors=True)  # the snapshot: `code.commit` names it
        result["services_exit"] = exit_codes
        result["service_log_error_lines"] = errors
        return result

    async def drop_namespace(self) -> None:
        """Deletes this run's topics and schemas (only names with this run's namespace prefix)."""
        with contextlib.suppress(Exception):
            admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
            await admin.start()
            try:
                mine = [t for t in await admin.list_topics() if t.startswith(self.namespace + ".")]
                if mine:
                    await admin.delete_topics(mine)
            finally:
                await admin.close()
        with contextlib.suppress(Exception):
            conn = await asyncpg.connect(self.database_url)
            try:
                schemas = await conn.fetch("SELECT nspname FROM pg_namespace WHERE nspname LIKE $1",
                                           self.namespace + "\\_%")
                for row in schemas:
                    await conn.execute(f'DROP SCHEMA IF EXISTS "{row["nspname"]}" CASCADE')
            finally:
                await conn.close()


def machine() -> dict[str, Any]:
    import psutil

    return {"host_cores": psutil.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "platform": platform.platform(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()], "host_speed_ms": resources.host_speed_ms()}


async def run_bench(config: BenchConfig) -> dict[str, Any]:
    info = machine()
    bench = Bench(config)
    result = await bench.run()
    info["host_speed_ms_after"] = resources.host_speed_ms()
    result["machine"] = info
    result["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    paths = report.write(bench, result)
    result["files"] = {k: str(v) for k, v in paths.items()}
    return result

"""CPU and memory of the service processes (psutil), and of the machine, sampled every second.

Also the broker (Kafka's pid file from deploy/local) and every PostgreSQL process: the machine is shared,
so the report shows how much of the CPU was ours, the infrastructure's, and everybody else's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path
from typing import Any

import psutil

# The same pure-Python work on every run: its time says how fast this (shared, virtual) machine's cores are
# right now. The speed of the 2-core benchmark machine drifted by up to ~2x between and during sessions, with
# nothing else running on it, so figures are only comparable between runs with a similar host speed.
HOST_SPEED_WORK = 3_000_000


def host_speed_ms(rounds: int = 5) -> float:
    """The best of ``rounds`` timings of a fixed loop (``sum(i * i for i in range(3e6))``), in ms: lower is
    faster. Printed next to every benchmark result (before and after); the figures of runs whose host speeds
    differ a lot do not compare."""
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        sum(i * i for i in range(HOST_SPEED_WORK))
        best = min(best, time.perf_counter() - started)
    return round(1000 * best, 1)


KAFKA_PID_FILE = Path(os.environ.get("BILLING_STACK_DIR", "/var/tmp/billing-stack")) / "kafka" / "kafka.pid"


def _cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def _cpu_rss(proc: psutil.Process) -> tuple[float, int]:
    with proc.oneshot():
        return _cpu(proc), proc.memory_info().rss


def _kafka_process() -> psutil.Process | None:
    try:
        return psutil.Process(int(KAFKA_PID_FILE.read_text().strip()))
    except (OSError, ValueError, psutil.Error):
        return None


class ResourceMonitor:
    def __init__(self, services: dict[str, int], extra: dict[str, int] | None = None) -> None:
        self.procs = {name: psutil.Process(pid) for name, pid in services.items()}
        self.extra = {name: psutil.Process(pid) for name, pid in (extra or {}).items()}
        self.kafka = _kafka_process()
        self.samples: list[dict[str, Any]] = []
        self._postgres: dict[int, float] = {}  # pid -> last cumulative CPU seconds seen
        self._postgres_procs: dict[int, psutil.Process] = {}
        self._rounds = 0

    def _postgres_cpu(self) -> float:
        """Cumulative CPU seconds of every PostgreSQL process seen so far (backends come and go; the list of
        processes is refreshed every 5 samples, which is cheap enough not to disturb the measurement)."""
        if self._rounds % 5 == 0:
            for proc in psutil.process_iter(["name", "username"]):
                info = proc.info
                if info.get("username") == "postgres" or (info.get("name") or "").startswith("postgres"):
                    self._postgres_procs.setdefault(proc.pid, proc)
        self._rounds += 1
        for pid, proc in list(self._postgres_procs.items()):
            try:
                self._postgres[pid] = _cpu(proc)
            except psutil.Error:
                self._postgres_procs.pop(pid)
        return sum(self._postgres.values())

    def sample(self) -> dict[str, Any]:
        cpu = psutil.cpu_times()
        busy = float(cpu.user + cpu.system + cpu.nice + getattr(cpu, "irq", 0) + getattr(cpu, "softirq", 0)
                     + getattr(cpu, "steal", 0))
        sample: dict[str, Any] = {"t": time.time(), "machine_busy": busy, "cpu": {}, "rss": {}}
        for name, proc in {**self.procs, **self.extra}.items():
            with contextlib.suppress(psutil.Error):
                sample["cpu"][name], sample["rss"][name] = _cpu_rss(proc)
        if self.kafka is not None:
            with contextlib.suppress(psutil.Error):
                sample["cpu"]["kafka"] = _cpu(self.kafka)
                sample["rss"]["kafka"] = self.kafka.memory_info().rss
        sample["cpu"]["postgres"] = self._postgres_cpu()
        return sample

    async def run(self, stop: asyncio.Event, interval: float = 1.0) -> None:
        psutil.cpu_percent()
        while not stop.is_set():
            self.samples.append(await asyncio.to_thread(self.sample))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)
        self.samples.append(await asyncio.to_thread(self.sample))


def summarise(samples: list[dict[str, Any]], start: float, end: float, services: list[str],
              events: int) -> dict[str, Any]:
    """Peak RSS over the whole run; CPU (as % of one core, and ms per usage event of the ``events`` processed
    in the window) between ``start`` and ``end``."""
    peak = {name: max((s["rss"].get(name, 0) for s in samples), default=0) / 2**20 for name in services}
    window = [s for s in samples if start <= s["t"] <= end]
    if len(window) < 2:
        window = samples[-2:] if len(samples) >= 2 else samples
    cpu: dict[str, float] = {}
    per_event: dict[str, float] = {}
    if len(window) >= 2:
        first, last = window[0], window[-1]
        seconds = last["t"] - first["t"] or 1.0
        names = set(first["cpu"]) & set(last["cpu"])
        for name in sorted(names):
            used = last["cpu"][name] - first["cpu"][name]
            cpu[name] = round(100 * used / seconds, 1)
            per_event[name] = round(1000 * used / events, 3) if events else 0.0
        pipeline = [n for n in names if n in services or n in ("kafka", "postgres")]
        per_event["pipeline total"] = round(sum(per_event[n] for n in pipeline), 3)
        machine = 100 * (last["machine_busy"] - first["machine_busy"]) / seconds
        cpu["machine (all processes)"] = round(machine, 1)
        ours = sum(v for k, v in cpu.items() if k != "machine (all processes)")
        cpu["everything else"] = round(max(0.0, machine - ours), 1)
    return {"peak_rss_mb": {k: round(v, 1) for k, v in peak.items()}, "cpu_percent_of_core": cpu,
            "cpu_ms_per_event": per_event,
            "cores": psutil.cpu_count()}

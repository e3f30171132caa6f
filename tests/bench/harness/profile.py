"""Sampling profiles of service processes with py-spy (a dev dependency), and a summary of where time goes.

``py-spy record --format raw --idle --threads`` writes collapsed stacks (``thread;frame;frame count``) of
every thread at every sample, waiting or not. The summary leaves out the samples of a thread waiting for
work (its event loop in ``select``, a pool thread waiting for a task) and keeps everything else, including
time blocked inside a call (a PostgreSQL round trip shows as time in psycopg/asyncpg): so a frame's share is
its share of the wall time the process spent *doing or waiting on its work*. It lists frames by *self* time
(the leaf: where the time is) and by *inclusive* time (what a call costs with everything under it), groups
self time by library, and gives each thread's utilisation (share of its samples not waiting for work).
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*)(?::\d+)?\)$")
AREAS = (  # (label, substring of the file path), first match wins
    ("eventsourcing", "/eventsourcing/"), ("psycopg", "/psycopg"), ("asyncpg", "/asyncpg/"),
    ("aiokafka", "/aiokafka/"), ("kafka", "/kafka/"), ("pydantic", "/pydantic"), ("json", "/json/"),
    ("structlog", "/structlog/"), ("uvicorn/fastapi/starlette", "/uvicorn/"), ("fastapi", "/fastapi/"),
    ("starlette", "/starlette/"), ("asyncio", "/asyncio/"), ("decimal", "decimal"), ("uuid", "/uuid.py"),
    ("billing: ingest", "/services/ingest/"), ("billing: rating", "/services/rating/"),
    ("billing: ledger", "/services/ledger/"), ("billing: projections", "/services/projections/"),
    ("billing: libs", "/libs/"), ("threading/concurrent", "/threading.py"),
    ("threading/concurrent", "/concurrent/"),
)


# Leaf frames that are a thread waiting, not working (py-spy's idle detection misses some of them when it
# samples without pausing the process): left out of the shares.
IDLE_LEAVES = ("select (selectors.py)", "EpollSelector.select (selectors.py)", "_worker (concurrent/futures/thread.py)",
               "wait (threading.py)", "Condition.wait (threading.py)", "Event.wait (threading.py)",
               "_wait_for_tstate_lock (threading.py)", "Popen._wait (subprocess.py)", "sleep (time)")


# Frames every stack has (entry point, event loop, thread bootstrap): left out of the "inclusive" list.
PLUMBING = ("typer/", "click/", "(billing)", "cli/main.py", "asyncio/runners.py", "asyncio/base_events.py",
            "asyncio/events.py", "threading.py", "concurrent/futures/", "<frozen runpy>")


def py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


class Profiler:
    """``py-spy record`` attached to one process until ``stop()`` (SIGINT makes it write its file)."""

    def __init__(self, pid: int, out: Path, rate: int = 100) -> None:
        self.pid, self.out, self.rate = pid, out, rate
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = out.with_suffix(".log")

    def start(self) -> bool:
        binary = py_spy()
        if binary is None:
            return False
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [binary, "record", "--pid", str(self.pid), "--rate", str(self.rate), "--format", "raw", "--idle",
                 "--threads", "--nonblocking", "--output", str(self.out)], stdout=log, stderr=subprocess.STDOUT)
        return True

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _short(frame: str) -> tuple[str, str]:
    """('function (path/relative)', path) of one collapsed-stack frame, without line numbers."""
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip(), ""
    path = match["file"]
    short = path
    for anchor in ("/site-packages/", "/work/main/", "/lib/python3"):
        if anchor in path:
            short = path.split(anchor, 1)[1]
            break
    return f"{match['func']} ({short})", path


def area_of(path: str) -> str:
    path = "/" + path.lstrip("/")  # py-spy gives site-packages files relative (psycopg/connection.py)
    if "/billing_" in path:  # a snapshot run: billing_ledger/... is services/ledger/...
        path = path.replace("/billing_events/", "/libs/").replace("/billing_runtime/", "/libs/")
        for service in ("ingest", "rating", "ledger", "projections"):
            path = path.replace(f"/billing_{service}/", f"/services/{service}/")
    for label, needle in AREAS:
        if needle in path:
            return label
    return "other"


def summarise(collapsed: Path, top: int = 25) -> dict[str, Any]:
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    thread_all: Counter[str] = Counter()
    thread_busy: Counter[str] = Counter()
    total = idle = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        parts = [f for f in stack.split(";") if f and not f.startswith("process ")]
        thread = "?"
        if parts and parts[0].startswith("thread "):
            thread = re.sub(r"\d+$", "N", parts[0].split(": ", 1)[-1])  # asyncio_0, asyncio_1 -> asyncio_N
            parts = parts[1:]
        thread_all[thread] += count
        if not parts:
            idle += count
            continue
        names = [_short(f) for f in parts]
        leaf, leaf_path = names[-1]
        if leaf in IDLE_LEAVES or leaf.startswith("_worker (") or leaf.endswith(".select (selectors.py)"):
            idle += count
            continue
        total += count
        thread_busy[thread] += count
        self_time[leaf] += count
        areas[area_of(leaf_path)] += count
        for name in {n for n, _ in names}:
            inclusive[name] += count

    def share(counter: Counter[str]) -> list[list[Any]]:
        return [[name, round(100 * n / total, 1)] for name, n in counter.most_common(top)] if total else []

    threads = [[name, round(100 * thread_busy[name] / n, 1), n] for name, n in thread_all.most_common()]
    focus = Counter({n: c for n, c in inclusive.items() if not any(p in n for p in PLUMBING)})
    return {"samples": total, "idle_samples_left_out": idle, "self": share(self_time),
            "inclusive": share(focus), "areas": share(areas),
            "threads_busy_percent": threads}

"""Sampling profiles of service processes with py-spy (a dev dependency), and a summary of where time goes.

``py-spy record --format raw`` writes collapsed stacks (``frame;frame;frame count``) of the busy threads
(idle ones are left out by default), so the share of samples of a frame is its share of the process's busy
time. The summary lists frames by *self* time (where the CPU actually is) and by *inclusive* time (what a
call costs with everything under it), and groups self time by library.
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
                [binary, "record", "--pid", str(self.pid), "--rate", str(self.rate), "--format", "raw",
                 "--nonblocking", "--output", str(self.out)], stdout=log, stderr=subprocess.STDOUT)
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
    for label, needle in AREAS:
        if needle in path:
            return label
    return "other"


def summarise(collapsed: Path, top: int = 25) -> dict[str, Any]:
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    total = idle = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        names = [_short(f) for f in frames]
        leaf, leaf_path = names[-1]
        if leaf in IDLE_LEAVES or leaf.startswith("_worker (") or leaf.endswith(".select (selectors.py)"):
            idle += count
            continue
        total += count
        self_time[leaf] += count
        areas[area_of(leaf_path)] += count
        for name in {n for n, _ in names}:
            inclusive[name] += count

    def share(counter: Counter[str]) -> list[list[Any]]:
        return [[name, round(100 * n / total, 1)] for name, n in counter.most_common(top)] if total else []

    return {"samples": total, "idle_samples_left_out": idle, "self": share(self_time), "inclusive": share(inclusive),
            "areas": share(areas)}

"""Process settings: the processes that project (the consumer child, rebuild workers), and the API's."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

from billing_projections.limits import GC_GEN0_THRESHOLD


def tune_gc(collect: bool = True, gen0_threshold: int = GC_GEN0_THRESHOLD) -> None:
    """Projecting allocates many short-lived objects and creates no cycles worth collecting often: with the
    default gen-0 threshold (700) a quarter of a batch's CPU goes to the collector. Startup objects are frozen
    out of every later collection (``collect=False`` in a forked child: its parent's objects are there
    already, and collecting them would only copy their pages)."""
    if collect:
        gc.collect()
    gc.freeze()
    gc.set_threshold(gen0_threshold, 20, 20)


@contextlib.contextmanager
def gc_tuned(gen0_threshold: int = GC_GEN0_THRESHOLD) -> Iterator[None]:
    """``tune_gc``'s thresholds for a while, in a process that is not only projecting (a rebuild run from a
    command or a test replays one share in the caller's process); the caller's thresholds are restored."""
    saved = gc.get_threshold()
    gc.set_threshold(gen0_threshold, 20, 20)
    try:
        yield
    finally:
        gc.set_threshold(*saved)


def freeze_startup_heap() -> None:
    """The API process, once built: everything imported and built so far (the app, its models, ~100,000
    objects) is moved out of the collector's reach. A full collection of that heap takes tens of milliseconds,
    and the request that happens to trigger one waits for it: a read's latency tail. What requests allocate
    later is collected as ever."""
    gc.collect()
    gc.freeze()

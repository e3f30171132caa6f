"""Process settings for the processes that project (the consumer child, rebuild workers)."""

from __future__ import annotations

import gc

from billing_projections.limits import GC_GEN0_THRESHOLD


def tune_gc() -> None:
    """Projecting allocates many short-lived objects and creates no cycles worth collecting often: with the
    default gen-0 threshold (700) a quarter of a batch's CPU goes to the collector. Startup objects are frozen
    out of every later collection."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, 20, 20)

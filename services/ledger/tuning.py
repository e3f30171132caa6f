"""Interpreter settings for a ledger process, applied once at start (the service and the benchmark).

* **GIL switch interval** (``GIL_SWITCH_INTERVAL_SECONDS``): batch preparation is pure Python on one
  thread; an HTTP decision needs the GIL several times on two others (event loop, writer), and waiting up
  to Python's default 5 ms each time would be most of a hold's latency.
* **Garbage collector**: a usage debit allocates a few hundred short-lived containers (command, event,
  postings, stored state) and creates no reference cycles worth collecting often. With the default
  gen-0 threshold (700) the collector ran every couple of debits and took about a third of a batch's CPU
  (measured: 86 -> 61 us/debit prepared). Objects alive at start (modules, the application) are frozen out
  of every later collection, and the youngest generation is collected every ``GC_GEN0_THRESHOLD``
  allocations: one such collection costs under 1 ms, so it does not show in a hold's latency either, while
  the older generations are collected rarely (their thresholds count young collections).
"""

from __future__ import annotations

import gc
import sys

from billing_ledger.limits import (
    GC_GEN0_THRESHOLD,
    GC_GEN1_THRESHOLD,
    GC_GEN2_THRESHOLD,
    GIL_SWITCH_INTERVAL_SECONDS,
)


def tune_process() -> None:
    """Sets the switch interval and the collector's thresholds, and freezes what is alive now."""
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_SECONDS)
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, GC_GEN1_THRESHOLD, GC_GEN2_THRESHOLD)

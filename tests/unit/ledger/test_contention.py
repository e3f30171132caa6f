"""How writes decide under contention: the window after a conflict, the retry back-off, process tuning."""

from __future__ import annotations

import gc
import random
import sys

from billing_ledger.application import LedgerApplication
from billing_ledger.contention import Contention, backoff_seconds
from billing_ledger.limits import (
    CHUNK_COMMANDS_MAX,
    DIRECT_CONFLICT_BACKOFF_SECONDS_MAX,
    GC_GEN0_THRESHOLD,
    GIL_SWITCH_INTERVAL_SECONDS,
)
from billing_ledger.tuning import tune_process


def test_contention_lasts_its_window_after_the_last_conflict() -> None:
    contention = Contention(window_seconds=2.0)
    assert not contention.recent(100.0)
    contention.conflicted(100.0)
    assert contention.recent(100.0) and contention.recent(101.9)
    assert not contention.recent(102.0)
    contention.conflicted(101.0)  # a later conflict extends it
    assert contention.recent(102.5) and not contention.recent(103.0)


def test_first_retry_is_immediate_later_ones_back_off() -> None:
    rng = random.Random(7)
    assert backoff_seconds(1, rng) == 0.0
    waits = [backoff_seconds(attempt, rng) for attempt in range(2, 50)]
    assert all(0.0 <= w <= DIRECT_CONFLICT_BACKOFF_SECONDS_MAX for w in waits) and any(w > 0 for w in waits)


def test_sqlite_never_decides_exclusively_nor_shrinks_chunks(app: LedgerApplication) -> None:
    # Embedded (SQLite): no table lock to decide under, so contention changes nothing.
    app.contention.conflicted(0.0)
    app.contention.window_seconds = 10**12
    assert not app.can_decide_exclusively
    assert app.chunk_commands_max() == CHUNK_COMMANDS_MAX


def test_tune_process_sets_switch_interval_and_collector() -> None:
    before_interval, before_thresholds = sys.getswitchinterval(), gc.get_threshold()
    try:
        tune_process()
        assert sys.getswitchinterval() == GIL_SWITCH_INTERVAL_SECONDS
        assert gc.get_threshold()[0] == GC_GEN0_THRESHOLD and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before_thresholds)
        sys.setswitchinterval(before_interval)

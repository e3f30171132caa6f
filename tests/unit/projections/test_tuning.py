"""GC settings of the processes that project: applied for a while, the caller's restored."""

from __future__ import annotations

import gc

import pytest
from billing_projections.limits import REBUILD_GC_GEN0_THRESHOLD
from billing_projections.tuning import gc_tuned


def test_gc_tuned_restores_the_callers_thresholds() -> None:
    saved = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        with gc_tuned(REBUILD_GC_GEN0_THRESHOLD):
            assert gc.get_threshold()[0] == REBUILD_GC_GEN0_THRESHOLD
        assert gc.get_threshold() == (700, 10, 10)
        with pytest.raises(RuntimeError), gc_tuned():
            raise RuntimeError("a failed replay")
        assert gc.get_threshold() == (700, 10, 10)
    finally:
        gc.set_threshold(*saved)

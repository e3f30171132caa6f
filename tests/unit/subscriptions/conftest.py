"""Fixtures shared by the subscription tests: a trialing subscription whose trial has ended, before the tick."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.unit.subscriptions.test_cancel_after_period_end import Stack
from tests.unit.subscriptions.test_cancel_after_trial_end import started


@pytest.fixture
async def converting(tmp_path: Path) -> AsyncIterator[Stack]:
    """Trial Nov 1 - Nov 11 with a payment method (it converts), usage after its end, no tick since."""
    async with started(tmp_path, payment_method=True) as wired:
        yield wired


@pytest.fixture
async def unconverted(tmp_path: Path) -> AsyncIterator[Stack]:
    """The same without a payment method: the trial ends unconverted."""
    async with started(tmp_path, payment_method=False) as wired:
        yield wired

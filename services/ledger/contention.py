"""Whether another writer is changing the same aggregates right now: how a write should decide.

A write is optimistic by default: decided on cached or freshly read state, then inserted as the next
versions, failing with ``IntegrityError`` if another writer recorded one of them first. That is the cheapest
way while writers rarely touch the same aggregates. When they do (HTTP holds on the accounts a usage batch
is debiting, in this process or another), a lost race costs a failed insert behind the event table's lock,
the aggregates the loser had taken out of the cache (they must be replayed), and a second try that may
lose again. So for ``window_seconds`` after a conflict, writers decide under locks instead
(``LedgerApplication.apply_commands(exclusive=True)``): those of the accounts they decide on, which only
writers of the same accounts wait for, and which no writer can pass (see :mod:`billing_ledger.pg_recorder`).
A decision under those locks that finds its accounts changed by another writer since they were cached
marks a conflict too (``apply_commands(contention=...)``): the optimistic write would have lost, so the
contention lasts as long as the other writer does instead of lapsing every ``window_seconds`` (each lapse
cost a lost race and a replay of every account of a Kafka batch: 0.5-2.5 s for 200 busy accounts on the
bench machine).
"""

from __future__ import annotations

import random

from billing_ledger.limits import CONTENTION_WINDOW_SECONDS, DIRECT_CONFLICT_BACKOFF_SECONDS_MAX


class Contention:
    """Remembers the last conflict; ``now`` is a monotonic clock reading (``time.monotonic()``)."""

    def __init__(self, window_seconds: float = CONTENTION_WINDOW_SECONDS) -> None:
        assert window_seconds >= 0
        self.window_seconds = window_seconds
        self._conflict_at: float | None = None

    def recent(self, now: float) -> bool:
        """Whether a conflict happened less than ``window_seconds`` before ``now``."""
        return self._conflict_at is not None and now - self._conflict_at < self.window_seconds

    def conflicted(self, now: float) -> None:
        self._conflict_at = now


def backoff_seconds(attempt: int, rng: random.Random) -> float:
    """Wait before retrying after conflict number ``attempt`` (1-based): none after the first (the usual
    cause is a stale copy, which waiting does not fix), then a short random back-off (a real race)."""
    return 0.0 if attempt <= 1 else rng.uniform(0, DIRECT_CONFLICT_BACKOFF_SECONDS_MAX)

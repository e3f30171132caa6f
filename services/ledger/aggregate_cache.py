"""Committed aggregates kept in memory between batches, so a busy account is not replayed per batch.

An aggregate is *taken out* by the one batch (or read) that uses it and *put back* only after that batch
committed: a batch that fails never leaves a half-changed aggregate behind. Whoever takes an aggregate
brings it up to date with the events recorded after its version (one query for a whole batch:
:mod:`billing_ledger.bulk_reads`).

**While an aggregate is out**, another thread that wants it waits for its turn (``take`` with
``wait_seconds``): when the aggregate comes back it goes straight to the first thread waiting, with the
decision that was in progress committed in it, and a thread that puts it back and wants it again at once
queues behind the others. A thread loads its own copy from the store only when its wait runs out, when the
holder's batch failed (``release_mine``: the next in turn loads it), or when the holder took it longer ago
than ``OUT_TRUSTED_SECONDS``, or keeps it long by design (the Kafka consumer's pipeline); then optimistic concurrency decides which write wins, and ``put`` keeps the
newer version. Without the turns, every hold that arrived while the sweeper was expiring a busy account's
holds in parts (50 per transaction) loaded that account again, its latest snapshot and every event since (for
an account with 3,000 live holds, 100-300 ms), and then lost the race to the sweeper's next commit anyway:
holds on it measured p99 266-290 ms, now 8-11 ms. A thread never waits for what it has out itself, nor on an
event loop's thread or under PostgreSQL locks (``LedgerApplication.load_many``), and it takes what it decides
on before it takes those locks (``_apply_locked``), so no wait here can be a wait for a lock it holds.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Collection
from typing import Any, TypeVar
from uuid import UUID

T = TypeVar("T")

# An aggregate taken out longer ago than this is not waited for (its batch failed, or is stuck).
OUT_TRUSTED_SECONDS = 1.0
# Marks of aggregates taken out kept at most (those never put back, after failures, are pruned beyond it).
OUT_MARKS_MAX = 10_000


class _Turn:
    """A thread waiting for an aggregate another thread has out; served in arrival order."""

    __slots__ = ("aggregate", "ready", "thread")

    def __init__(self, thread: int) -> None:
        self.thread = thread
        self.ready = False
        self.aggregate: Any | None = None


class AggregateCache:
    def __init__(self, aggregates_max: int) -> None:
        assert aggregates_max > 0
        self._max = aggregates_max
        self._items: OrderedDict[UUID, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._returned = threading.Condition(self._lock)
        # Taken out and not put back yet: aggregate id -> (the taking thread's ident, monotonic time taken,
        # whether others may wait for it).
        self._out: dict[UUID, tuple[int, float, bool]] = {}
        # Threads waiting for an aggregate that is out, first come first served: when it comes back it goes
        # straight to the first of them (a thread that puts it back and takes it again at once, such as the
        # sweeper expiring a big account's holds in parts, queues behind them instead of starving them).
        self._turns: dict[UUID, deque[_Turn]] = {}
        self._pruned_at = 0.0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, aggregate_id: object) -> bool:
        """Whether it is cached now (another thread may take it the next moment: a hint, not a promise)."""
        return aggregate_id in self._items

    def version(self, aggregate_id: UUID) -> int | None:
        """The cached version (None if absent), without taking it: a hint, as ``in``."""
        found = self._items.get(aggregate_id)
        return None if found is None else found.version  # type: ignore[no-any-return]

    def versions(self) -> dict[UUID, int]:
        """The version of every cached aggregate now (hints, as ``in``)."""
        with self._lock:
            return {i: a.version for i, a in self._items.items()}

    def peek(self, aggregate_id: UUID, read: Callable[[Any], T]) -> T | None:
        """``read(aggregate)`` of the cached aggregate without taking it out (None if absent): ``read`` must not
        change it. A cached aggregate is committed and nobody changes it while it is cached, so this is the
        state of its cached version (perhaps behind the store: a hint, as ``in``)."""
        with self._lock:
            found = self._items.get(aggregate_id)
            return None if found is None else read(found)

    def take(self, aggregate_id: UUID, wait_seconds: float = 0.0, *, briefly: bool = True) -> Any | None:
        """Removes and returns the cached aggregate (None if absent): the caller owns it now, and until it puts it
        (or a newer version) back or releases it, it is *out*: cached or not, the caller is deciding on it. If
        another thread has it out (or waits for it), waits up to ``wait_seconds`` for its turn; without a turn
        (no wait, or the wait ran out) None, and the caller loads its own copy (see the module's docstring).
        ``briefly=False``: the caller keeps it for long (the Kafka consumer's pipelined batches pass it on from
        batch to batch), so nobody waits for it."""
        me = threading.get_ident()
        with self._lock:
            out = self._out.get(aggregate_id)
            mine = out is not None and out[0] == me
            held = (out is not None and not mine and out[2]
                    and out[1] > time.monotonic() - OUT_TRUSTED_SECONDS)
            if not mine and (held or aggregate_id in self._turns):
                if wait_seconds <= 0:
                    return None
                return self._wait_turn(aggregate_id, me, wait_seconds)
            found = self._items.pop(aggregate_id, None)
            if len(self._out) >= OUT_MARKS_MAX and self._pruned_at < time.monotonic() - OUT_TRUSTED_SECONDS:
                self._prune_out()
            self._out[aggregate_id] = (me, time.monotonic(), briefly)
            return found

    def _wait_turn(self, aggregate_id: UUID, me: int, wait_seconds: float) -> Any | None:
        turn = _Turn(me)
        turns = self._turns.setdefault(aggregate_id, deque())
        turns.append(turn)
        deadline = time.monotonic() + wait_seconds
        while not turn.ready:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                turns.remove(turn)
                if not turns:
                    del self._turns[aggregate_id]
                return None
            self._returned.wait(remaining)
        return turn.aggregate  # handed over (marked out by this thread): the aggregate, or None to load

    def _next_turn(self, aggregate_id: UUID, aggregate: Any | None) -> bool:
        """Hands ``aggregate`` (or the cached copy, whichever is newer; None: to be loaded) to the first thread
        waiting for it; False when nobody waits."""
        turns = self._turns.get(aggregate_id)
        if not turns:
            return False
        turn = turns.popleft()
        if not turns:
            del self._turns[aggregate_id]
        cached = self._items.pop(aggregate_id, None)
        if cached is not None and (aggregate is None or cached.version > aggregate.version):
            aggregate = cached
        turn.aggregate, turn.ready = aggregate, True
        self._out[aggregate_id] = (turn.thread, time.monotonic(), True)
        self._returned.notify_all()
        return True

    def _prune_out(self) -> None:
        """Forgets marks older than ``OUT_TRUSTED_SECONDS`` (nobody waits for those): at most once that often, as
        a batch of many accounts may hold more marks than ``OUT_MARKS_MAX`` for a while, none of them stale."""
        self._pruned_at = time.monotonic()
        stale = self._pruned_at - OUT_TRUSTED_SECONDS
        for aggregate_id in [i for i, (_, taken, _) in self._out.items() if taken < stale and i not in self._turns]:
            del self._out[aggregate_id]

    def put(self, aggregate: Any) -> None:
        """Returns a committed aggregate (no pending events); an older version never replaces a newer one."""
        assert not aggregate.pending_events, "only committed aggregates are cached"
        with self._lock:
            # What this thread took comes back (to the next in turn, if any). A copy another thread loaded while
            # this one was out (it got no turn) just goes to the cache if newer, as ever.
            if self._is_mine(aggregate.id):
                del self._out[aggregate.id]
                if self._next_turn(aggregate.id, aggregate):
                    return
            current = self._items.get(aggregate.id)
            if current is not None and current.version >= aggregate.version:
                self._items.move_to_end(aggregate.id)
                return
            self._items[aggregate.id] = aggregate
            self._items.move_to_end(aggregate.id)
            while len(self._items) > self._max:
                self._items.popitem(last=False)

    def release(self, aggregate_ids: Collection[UUID]) -> None:
        """Aggregates taken that will not be put back (they do not exist, or were not changed and not kept)."""
        if not aggregate_ids:  # every batch calls this, almost always with none: no lock then
            return
        with self._lock:
            for aggregate_id in aggregate_ids:
                if self._is_mine(aggregate_id):
                    del self._out[aggregate_id]
                    self._next_turn(aggregate_id, None)

    def _is_mine(self, aggregate_id: UUID) -> bool:
        out = self._out.get(aggregate_id)
        return out is not None and out[0] == threading.get_ident()

    def release_mine(self) -> None:
        """Everything this thread has out will not be put back (its batch failed and dropped its aggregates):
        the next in turn loads its own. A thread decides one batch (or pipeline of batches) at a time."""
        me = threading.get_ident()
        with self._lock:
            for aggregate_id in [i for i, (thread, _, _) in self._out.items() if thread == me]:
                del self._out[aggregate_id]
                self._next_turn(aggregate_id, None)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

"""Committed aggregates kept in memory between batches, so a busy account is not replayed per batch.

An aggregate is *taken out* by the one batch (or read) that uses it and *put back* only after that batch
committed: a batch that fails never leaves a half-changed aggregate behind. While an aggregate is out,
another thread simply loads its own copy from the store; optimistic concurrency decides which write wins,
and ``put`` keeps the newer version. Whoever takes an aggregate brings it up to date with the events
recorded after its version (one query for a whole batch: :mod:`billing_ledger.bulk_reads`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar
from uuid import UUID

T = TypeVar("T")


class AggregateCache:
    def __init__(self, aggregates_max: int) -> None:
        assert aggregates_max > 0
        self._max = aggregates_max
        self._items: OrderedDict[UUID, Any] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, aggregate_id: object) -> bool:
        """Whether it is cached now (another thread may take it the next moment: a hint, not a promise)."""
        return aggregate_id in self._items

    def version(self, aggregate_id: UUID) -> int | None:
        """The cached version (None if absent), without taking it: a hint, as ``in``."""
        found = self._items.get(aggregate_id)
        return None if found is None else found.version  # type: ignore[no-any-return]

    def peek(self, aggregate_id: UUID, read: Callable[[Any], T]) -> T | None:
        """``read(aggregate)`` of the cached aggregate without taking it out (None if absent): ``read`` must not
        change it. A cached aggregate is committed and nobody changes it while it is cached, so this is the
        state of its cached version (perhaps behind the store: a hint, as ``in``)."""
        with self._lock:
            found = self._items.get(aggregate_id)
            return None if found is None else read(found)

    def take(self, aggregate_id: UUID) -> Any | None:
        """Removes and returns the cached aggregate (None if absent): the caller owns it now."""
        with self._lock:
            return self._items.pop(aggregate_id, None)

    def put(self, aggregate: Any) -> None:
        """Returns a committed aggregate (no pending events); an older version never replaces a newer one."""
        assert not aggregate.pending_events, "only committed aggregates are cached"
        with self._lock:
            current = self._items.get(aggregate.id)
            if current is not None and current.version >= aggregate.version:
                self._items.move_to_end(aggregate.id)
                return
            self._items[aggregate.id] = aggregate
            self._items.move_to_end(aggregate.id)
            while len(self._items) > self._max:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

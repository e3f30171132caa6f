"""The aggregate cache between threads of one ledger process: a thread that wants an aggregate another thread
is deciding on waits for its turn and gets the committed result, instead of replaying its own copy."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from billing_ledger import aggregate_cache
from billing_ledger.aggregate_cache import AggregateCache
from billing_ledger.domain.allocation import ResourcePool


def pool(capacity: int = 1) -> ResourcePool:
    p = ResourcePool.open(tenant="acme", resource="seats")
    p.set_capacity(capacity, {})
    p.collect_events()
    return p


def newer(aggregate: ResourcePool) -> ResourcePool:
    """The aggregate after one more committed decision."""
    aggregate.set_capacity(aggregate.capacity + 1, {})
    aggregate.collect_events()
    return aggregate


def in_thread(target: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    got: list[Any] = []
    thread = threading.Thread(target=lambda: got.append(target()))
    thread.start()
    return thread, got


def waiting(cache: AggregateCache, count: int) -> None:
    """Until ``count`` threads wait for a turn (the cache's own queue, read for the test)."""
    deadline = time.monotonic() + 5
    while sum(len(t) for t in cache._turns.values()) < count:
        assert time.monotonic() < deadline, "nobody queued"
        time.sleep(0.001)


def test_a_thread_waits_for_the_decision_in_progress_and_gets_its_result() -> None:
    cache = AggregateCache(aggregates_max=10)
    cache.put(pool())
    original = cache.take(pool().id)
    assert original is not None
    thread, got = in_thread(lambda: cache.take(original.id, wait_seconds=5))
    waiting(cache, 1)
    cache.put(newer(original))  # the decision committed: handed straight to the waiting thread
    thread.join()
    assert got == [original] and original.version == 3
    assert cache.take(original.id) is None  # the other thread has it out now, not the cache


def test_turns_are_first_come_first_served_and_a_thread_coming_back_queues_behind() -> None:
    cache = AggregateCache(aggregates_max=10)
    aggregate = pool()
    cache.put(aggregate)
    assert cache.take(aggregate.id) is aggregate
    order: list[str] = []
    lock = threading.Lock()

    def taker(name: str) -> Callable[[], Any]:
        def run() -> Any:
            found = cache.take(aggregate.id, wait_seconds=5)
            version = found.version
            with lock:
                order.append(name)
            cache.put(newer(found))
            return version
        return run

    first, first_got = in_thread(taker("first"))
    waiting(cache, 1)
    second, second_got = in_thread(taker("second"))
    waiting(cache, 2)
    cache.put(aggregate)
    first.join()
    second.join()
    assert order == ["first", "second"] and first_got == [2] and second_got == [3]


def test_a_wait_ends_after_its_time_and_the_thread_loads_its_own_copy() -> None:
    cache = AggregateCache(aggregates_max=10)
    aggregate = pool()
    cache.put(aggregate)
    cache.take(aggregate.id)
    started = time.monotonic()
    thread, got = in_thread(lambda: cache.take(aggregate.id, wait_seconds=0.05))
    thread.join()
    assert got == [None] and 0.05 <= time.monotonic() - started < 2
    assert cache._turns == {}  # it left the queue


def test_a_failed_decision_lets_the_next_thread_load_from_the_store() -> None:
    cache = AggregateCache(aggregates_max=10)
    aggregate = pool()
    cache.put(aggregate)
    holder_took = threading.Event()
    fail = threading.Event()

    def holder() -> None:
        cache.take(aggregate.id)
        holder_took.set()
        fail.wait(5)
        cache.release_mine()  # its batch failed: the aggregate is dropped

    thread = threading.Thread(target=holder)
    thread.start()
    holder_took.wait(5)
    waiter, got = in_thread(lambda: cache.take(aggregate.id, wait_seconds=5))
    waiting(cache, 1)
    fail.set()
    thread.join()
    waiter.join()
    assert got == [None]  # its turn, nothing cached: it loads the aggregate, and has it out
    assert cache.take(aggregate.id, wait_seconds=0) is None and cache._turns == {}


def test_no_thread_waits_for_what_it_has_out_itself_nor_for_a_stale_mark(monkeypatch: pytest.MonkeyPatch) -> None:
    cache = AggregateCache(aggregates_max=10)
    aggregate = pool()
    cache.put(aggregate)
    cache.take(aggregate.id)
    started = time.monotonic()
    assert cache.take(aggregate.id, wait_seconds=5) is None  # mine: a reload (a rollback), no wait
    assert time.monotonic() - started < 1
    monkeypatch.setattr(aggregate_cache, "OUT_TRUSTED_SECONDS", 0.0)  # taken too long ago to be waited for
    thread, got = in_thread(lambda: cache.take(aggregate.id, wait_seconds=5))
    thread.join(2)
    assert not thread.is_alive() and got == [None]


def test_without_a_wait_another_threads_aggregate_is_not_taken_nor_its_mark() -> None:
    cache = AggregateCache(aggregates_max=10)
    aggregate = pool()
    cache.put(aggregate)
    cache.take(aggregate.id)
    thread, got = in_thread(lambda: cache.take(aggregate.id))  # e.g. under PostgreSQL locks: never waits
    thread.join()
    assert got == [None]
    copy, _ = in_thread(lambda: cache.put(newer(pool())))  # a copy that thread loaded and committed
    copy.join()
    waiter, waited = in_thread(lambda: cache.take(aggregate.id, wait_seconds=5))
    waiting(cache, 1)  # still this thread's: the copy went to the cache, not to the waiter
    cache.put(aggregate)
    waiter.join()
    assert waited[0].version == 3  # the newer of the two


def test_nobody_waits_for_what_the_kafka_consumers_pipeline_keeps() -> None:
    cache = AggregateCache(aggregates_max=10)
    aggregate = pool()
    cache.put(aggregate)
    cache.take(aggregate.id, briefly=False)  # passed on from batch to batch for as long as the poll lasts
    started = time.monotonic()
    thread, got = in_thread(lambda: cache.take(aggregate.id, wait_seconds=5))
    thread.join(2)
    assert got == [None] and time.monotonic() - started < 1  # it loads its own copy at once, as before


def test_marks_of_aggregates_never_put_back_are_forgotten_once_stale(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aggregate_cache, "OUT_MARKS_MAX", 3)
    monkeypatch.setattr(aggregate_cache, "OUT_TRUSTED_SECONDS", 0.01)
    cache = AggregateCache(aggregates_max=10)
    dropped = [pool() for _ in range(3)]
    for aggregate in dropped:
        aggregate._id = uuid.uuid4()
        cache.take(aggregate.id)  # taken, then dropped without release (a path that forgot to)
    time.sleep(0.02)
    cache.take(pool().id)
    assert set(cache._out) == {pool().id}

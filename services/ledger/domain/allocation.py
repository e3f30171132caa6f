"""Pooled allocations of seat-like resources (seats, projects, concurrent jobs) for one billing account.

One ``ResourcePool`` per (tenant, resource). Its capacity is the sum of the quantities of the account's
active subscriptions for that resource (computed by the caller: subscriptions pool their quantities) and
``set_capacity`` records it with its ``source`` (which subscriptions, which versions). Allocations never
exceed capacity, and a change someone asks for can never set capacity below what is allocated
(``can_reduce_to`` lets the subscription side refuse a quantity decrease before it happens: DESIGN.md
section 6). Time is the exception: a subscription that ends by itself (canceled at period end, a trial
without a payment method) must end, so its capacity goes with ``force=True`` even below what is allocated.
The pool is then over capacity (``over_capacity`` > 0, ``free`` 0): the live allocations stay until their
holders release them (the pool cannot know which to take away), and new ones are refused until enough are.

Requests are idempotent by ``request_id``: a repeated ``allocate`` returns its first answer without a new
event, so a retried caller cannot allocate twice. Refusals are recorded (``AllocationRefused``) so the
answer to a retry is the same ``False``. No clock is read; times are arguments.

**Bounded memory.** A pool that hands out short-lived allocations (concurrent jobs) sees thousands of
requests a day, and remembering each for ever would grow its state, and every snapshot of it, without end.
An allocation that is live is always remembered. A finished one (refused, or released) is remembered for
``FINISHED_REQUEST_KEEP`` after it finished, and only the latest ``FINISHED_REQUESTS_MAX`` finished ones,
like a payment provider's idempotency keys: a retry within that time gets its first answer; a request id
used again after that is a new request. Forgetting happens in the event mutators, by the events' own times,
so a replay forgets exactly what the live aggregate forgot. (Commands sent again with their own command id
are refused by the ledger's receipts however old they are: forgetting never applies a command twice.)
Changing either bound changes replayed state: bump the pool's snapshot format with it.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from billing_ledger.domain.chain import ChainedAggregate
from eventsourcing.domain import event

# Bounds: a pool's capacity and any single request stay far inside int64.
CAPACITY_MAX = 10**12
RESOURCE_CHARS_MAX = 128
# Finished requests (refused or released) are remembered this long after they finished, and this many at most.
FINISHED_REQUEST_KEEP = timedelta(days=7)
FINISHED_REQUESTS_MAX = 10_000


class ResourcePool(ChainedAggregate):
    @staticmethod
    def create_id(tenant: str, resource: str) -> UUID:
        return uuid5(NAMESPACE_URL, f"/accounts/{tenant}/pools/{resource}")

    @classmethod
    def open(cls, *, tenant: str, resource: str) -> ResourcePool:
        for name, value in (("tenant", tenant), ("resource", resource)):
            if not isinstance(value, str) or not value.strip() or len(value) > RESOURCE_CHARS_MAX:
                raise InvalidAllocation(
                    f"{name} must be a non-empty string of at most {RESOURCE_CHARS_MAX} chars"
                )
        return cls(tenant=tenant, resource=resource)

    @event("Opened")
    def __init__(self, tenant: str, resource: str) -> None:
        self.tenant = tenant
        self.resource = resource
        self.capacity = 0
        self.capacity_source: dict[str, Any] = {}
        self.in_use = 0
        # request id (str) -> {"quantity", "status": allocated | refused | released, "at"}
        self._requests: dict[str, dict[str, Any]] = {}
        # request id (str) -> when it finished, for the finished ones in ``_requests``, oldest first
        self._finished: dict[str, datetime] = {}

    # -- read helpers ---------------------------------------------------------------------------------------

    @property
    def free(self) -> int:
        return max(0, self.capacity - self.in_use)

    @property
    def over_capacity(self) -> int:
        """How much more is allocated than the capacity (only after a forced reduction, else 0)."""
        return max(0, self.in_use - self.capacity)

    def can_reduce_to(self, capacity: int) -> bool:
        """Whether capacity may become ``capacity``: never below what is allocated now, unless it does not
        go down (a pool over capacity after a forced reduction may keep or raise its capacity)."""
        return capacity >= self.in_use or capacity >= self.capacity

    def allocation(self, request_id: UUID) -> dict[str, Any] | None:
        found = self._requests.get(str(request_id))
        return dict(found) if found is not None else None

    # -- commands -------------------------------------------------------------------------------------------

    def set_capacity(self, capacity: int, source: dict[str, Any], *, force: bool = False) -> None:
        """Records the pooled capacity; refused (``CapacityBelowUsage``) below current usage unless ``force``
        (a subscription that ended by itself: see the module's docstring)."""
        _require_quantity("capacity", capacity, allow_zero=True)
        if not force and not self.can_reduce_to(capacity):
            raise CapacityBelowUsage(
                f"{self.resource}: {self.in_use} in use, cannot reduce capacity to {capacity}"
            )
        if capacity == self.capacity and source == self.capacity_source:
            return
        self._capacity_set(capacity=capacity, source=dict(source))

    @event("CapacitySet")
    def _capacity_set(self, capacity: int, source: dict[str, Any]) -> None:
        self.capacity = capacity
        self.capacity_source = source

    def allocate(self, request_id: UUID, quantity: int, at: datetime) -> bool:
        """Allocates ``quantity`` if it fits; a repeated ``request_id`` returns the first answer."""
        previous = self._requests.get(str(request_id))
        if previous is not None:
            return bool(previous["status"] != "refused")
        _require_quantity("quantity", quantity)
        _require_time(at)
        if quantity > self.free:
            self._allocation_refused(request_id=request_id, quantity=quantity, free=self.free, at=at)
            return False
        self._allocated(request_id=request_id, quantity=quantity, at=at)
        return True

    @event("Allocated")
    def _allocated(self, request_id: UUID, quantity: int, at: datetime) -> None:
        self._requests[str(request_id)] = {"quantity": quantity, "status": "allocated", "at": at}
        self.in_use += quantity
        self._forget_finished(at)

    @event("AllocationRefused")
    def _allocation_refused(self, request_id: UUID, quantity: int, free: int, at: datetime) -> None:
        self._requests[str(request_id)] = {"quantity": quantity, "status": "refused", "at": at}
        self._finished_request(str(request_id), at)

    def deallocate(self, request_id: UUID, at: datetime) -> bool:
        """Frees an allocation; returns False (no event) if it was refused or is already freed."""
        previous = self._requests.get(str(request_id))
        if previous is None:
            raise UnknownAllocation(f"no allocation request {request_id}")
        _require_time(at)
        if previous["status"] != "allocated":
            return False
        self._deallocated(request_id=request_id, quantity=previous["quantity"], at=at)
        return True

    @event("Deallocated")
    def _deallocated(self, request_id: UUID, quantity: int, at: datetime) -> None:
        self._requests[str(request_id)]["status"] = "released"
        self.in_use -= quantity
        self._finished_request(str(request_id), at)

    # -- memory (called by the mutators above, never on its own: see the module's "Bounded memory") --------

    def _finished_request(self, request: str, at: datetime) -> None:
        self._finished[request] = at
        self._forget_finished(at)

    def _forget_finished(self, now: datetime) -> None:
        """Forgets the oldest finished requests: those finished before ``now - FINISHED_REQUEST_KEEP``, and any
        beyond the latest ``FINISHED_REQUESTS_MAX`` (in the order they finished)."""
        finished = self._finished
        horizon = now - FINISHED_REQUEST_KEEP
        while finished:
            request, finished_at = next(iter(finished.items()))
            if len(finished) <= FINISHED_REQUESTS_MAX and finished_at >= horizon:
                break
            del finished[request]
            self._requests.pop(request, None)


def _require_quantity(name: str, value: Any, *, allow_zero: bool = False) -> None:
    if type(value) is not int or value < 0 or value > CAPACITY_MAX or (value == 0 and not allow_zero):
        raise InvalidAllocation(f"{name} must be an int in [{0 if allow_zero else 1}, {CAPACITY_MAX}]")


def _require_time(at: Any) -> None:
    if not isinstance(at, datetime) or at.tzinfo is None or at.utcoffset() is None:
        raise InvalidAllocation("at must be a timezone-aware datetime")


class AllocationError(ValueError):
    """A refused pool command; nothing was recorded."""


class InvalidAllocation(AllocationError):
    pass


class CapacityBelowUsage(AllocationError):
    pass


class UnknownAllocation(AllocationError):
    pass

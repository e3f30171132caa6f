"""Pooled allocations of seat-like resources: ``allocation.allocate``, ``allocation.release`` and
``allocation.set_capacity``.

A pool's capacity normally follows the account's subscriptions (``subscription_commands`` sets it);
``allocation.set_capacity`` sets it by hand for accounts without them (admin operations, tests). A request is
idempotent by its request id: the pool remembers its answer, and the command id is derived from it too.
Concurrent requests never exceed capacity because each decision is recorded as the next version of the
one pool aggregate: a racing writer's version conflict makes the loser reload and decide again.
"""

from __future__ import annotations

from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from billing_events.messages import LedgerCommand
from billing_ledger import payload
from billing_ledger.application import CommandRejected, LedgerApplication, _Batch, handles
from billing_ledger.domain.allocation import ResourcePool


def allocation_request_id(tenant: str, resource: str, request_id: str) -> UUID:
    return uuid5(NAMESPACE_URL, f"/accounts/{tenant}/pools/{resource}/requests/{request_id}")


def pool_view(pool: ResourcePool) -> dict[str, Any]:
    return {"resource": pool.resource, "capacity": pool.capacity, "in_use": pool.in_use, "free": pool.free,
            "over_capacity": pool.over_capacity}


def _pool(batch: _Batch, command: LedgerCommand) -> ResourcePool:
    if not command.tenant:
        raise CommandRejected("missing_tenant", "the command names no tenant")
    resource = payload.text(command, "resource")
    return batch.existing(ResourcePool.create_id(command.tenant, resource),  # type: ignore[no-any-return]
                          "unknown_pool", f"tenant {command.tenant!r} has no {resource!r} pool")


@handles("allocation.set_capacity")
def set_capacity(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> dict[str, Any]:
    if not command.tenant:
        raise CommandRejected("missing_tenant", "the command names no tenant")
    resource = payload.text(command, "resource")
    capacity = command.payload.get("capacity")
    if type(capacity) is not int:
        raise CommandRejected(payload.INVALID, "capacity must be an integer")
    pool = batch.get(ResourcePool.create_id(command.tenant, resource))
    if pool is None:
        pool = ResourcePool.open(tenant=command.tenant, resource=resource)
        batch.add(pool)
    pool.set_capacity(capacity, {"set_by": command.issued_by, "command_id": str(command.command_id)})
    return pool_view(pool)


@handles("allocation.allocate")
def allocate(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> dict[str, Any]:
    pool = _pool(batch, command)
    quantity = command.payload.get("quantity")
    if type(quantity) is not int:
        raise CommandRejected(payload.INVALID, "quantity must be an integer")
    request = allocation_request_id(pool.tenant, pool.resource, payload.key(command, "request_id"))
    allocated = pool.allocate(request, quantity, payload.timestamp(command, "at", default=command.issued_at))
    return {**pool_view(pool), "allocated": allocated, "request": pool.allocation(request)}


@handles("allocation.release")
def release(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> dict[str, Any]:
    pool = _pool(batch, command)
    request = allocation_request_id(pool.tenant, pool.resource, payload.text(command, "request_id"))
    released = pool.deallocate(request, payload.timestamp(command, "at", default=command.issued_at))
    return {**pool_view(pool), "released": released, "request": pool.allocation(request)}

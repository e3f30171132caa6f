"""The ledger's HTTP API: synchronous, strongly consistent decisions (holds, allocations, corrections).

Every write is one ledger command applied directly in this process (:mod:`billing_ledger.direct`), with a
command id derived from the caller's idempotency key: a retry gets the first answer (``200``) and changes
nothing; a first answer that created something is ``201``. Refusals are RFC 9457 problem+json and record
nothing. Tokens: holds and allocations are for ``service`` (and ``admin``) callers, corrections for
``admin`` and ``finance``; reads for any role that may see the tenant.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any
from uuid import UUID

import orjson
from billing_events import ids
from billing_events.messages import CODE_PATTERN, RESOURCE_KEY_PATTERN, TENANT_PATTERN, LedgerCommand
from billing_events.money import to_subunits
from billing_ledger import holds_http
from billing_ledger.adjustment_commands import adjustment_id
from billing_ledger.allocation_commands import allocation_request_id
from billing_ledger.amounts import show
from billing_ledger.application import CommandResult, LedgerApplication
from billing_ledger.direct import ConflictsExhausted, DirectCommands, Overloaded
from billing_ledger.domain.account import BillingAccount
from billing_ledger.domain.allocation import FINISHED_REQUEST_KEEP, ResourcePool
from billing_ledger.domain.invoice import DRAFT, Invoice
from billing_ledger.hold_commands import hold_id
from billing_ledger.http_models import (
    AdjustmentRequest,
    AllocationRequest,
    CapacityRequest,
    CaptureRequest,
    HoldRequest,
    RefundAnswer,
    RefundRequest,
)
from billing_ledger.refund_commands import refund_id
from billing_ledger.refund_request_commands import grant_refund_note_id, note_reference
from billing_runtime.auth import Principal, Role, check_tenant, require, require_operator
from billing_runtime.problems import Problem
from fastapi import APIRouter, Depends, Path, Response
from fastapi.routing import APIRoute

Spender = Annotated[Principal, Depends(require(Role.SERVICE, Role.ADMIN))]
# Operator actions: platform staff only (admin/finance without a tenant claim; see billing_runtime.auth).
Corrector = Annotated[Principal, Depends(require_operator(Role.ADMIN, Role.FINANCE))]
Admin = Annotated[Principal, Depends(require_operator(Role.ADMIN))]
Reader = Annotated[Principal, Depends(require())]
Tenant = Annotated[str, Path(pattern=TENANT_PATTERN, description="The tenant (organisation)")]
Resource = Annotated[str, Path(pattern=CODE_PATTERN, description="A pooled resource, e.g. seats")]
RequestId = Annotated[str, Path(pattern=RESOURCE_KEY_PATTERN)]

# Rejection reason -> HTTP status (anything else is 422: the request cannot be carried out as given).
_STATUS = {
    "unknown_account": 404, "unknown_hold": 404, "unknown_pool": 404, "unknown_grant": 404,
    "unknown_allocation": 404, "missing_tenant": 404,
    "hold_already_settled": 409, "hold_lapsed": 409, "insufficient_credit": 409, "refund_exceeds_remaining": 409,
    "not_refundable": 409, "duplicate_grant": 409, "capacity_below_usage": 409, "grant_closed": 409,
}



def _time(value: Any) -> str | None:
    return value.isoformat() if isinstance(value, datetime) else None


def hold_view(tenant: str, hold: dict[str, Any]) -> dict[str, Any]:
    unit = hold["unit"]
    view = {"hold_id": hold["hold_id"], "tenant": tenant, "status": hold["status"],
            "approved": hold["status"] != "rejected", "unit": unit, "amount": show(hold["amount"], unit),
            "captured": show(hold.get("captured", 0), unit), "meter": hold["meter"],
            "placed_at": _time(hold["placed_at"]), "expires_at": _time(hold["expires_at"])}
    if hold["status"] == "rejected":
        view["reason"] = hold.get("reason", "insufficient_credit")
    return view


def adjustment_view(tenant: str, adjustment: UUID, record: dict[str, Any]) -> dict[str, Any]:
    """An adjustment's answer (``BillingAccount.adjustment``): the same to its first request and to every retry."""
    unit = record["unit"]
    return {"adjustment_id": str(adjustment), "tenant": tenant, "unit": unit, "amount": show(record["amount"], unit),
            "user": record["user"], "reason": record["reason"], "balance": show(record["balance"], unit),
            "available": show(record["available"], unit)}


def refund_view(tenant: str, refund: UUID, record: dict[str, Any], credit_note: dict[str, Any] | None
                ) -> dict[str, Any]:
    """A grant refund's answer (``BillingAccount.refund``, and ``credit_note``: the credit note documenting it,
    ``{"id", "number"}`` or ``None``): the same to its first request and to every retry (``RefundAnswer``)."""
    unit, money = record["unit"], record["paid_back"]
    paid_back = None if money is None else {
        "unit": money["unit"], "amount": show(money["amount"], money["unit"]),
        "tax": show(money["tax_amount"], money["unit"])}
    return {"refund_id": str(refund), "tenant": tenant, "grant_id": record["grant_id"], "unit": unit,
            "amount": show(record["amount"], unit), "tax": show(record["tax_amount"], unit), "paid_back": paid_back,
            "from_wallet": show(record["from_wallet"], unit), "from_breakage": show(record["from_breakage"], unit),
            "from_adjustment": show(record["from_adjustment"], unit),
            "from_revenue": show(record["from_revenue"], unit), "reason": record["reason"],
            "finance_override": record["finance_override"], "requested_by": record["requested_by"],
            "credit_note": credit_note}


def _refund_note_id(account: BillingAccount, refund: UUID) -> UUID | None:
    """The id of the credit note that documents refund ``refund`` if one was issued (``grant_refund_note_id``)."""
    record = account.refund(refund)
    return None if record is None else grant_refund_note_id(account, UUID(record["grant_id"]), refund)


def _note_reference(note: Any) -> dict[str, Any] | None:
    return note_reference(note) if isinstance(note, Invoice) and note.status != DRAFT else None


def _problem(result: CommandResult) -> Problem:
    reason = result.reason or "rejected"
    return Problem(_STATUS.get(reason, 422), reason.replace("_", " ").capitalize(), result.detail or reason,
                   kind=reason.replace("_", "-"), reason=reason)


def _json(view: dict[str, Any], status: int) -> Response:
    """A view (strings, numbers, booleans, None) as the JSON answer, without FastAPI's generic serialisation
    (validating the returned dict, then ``jsonable_encoder`` walking it): a tenth of a hold's HTTP CPU."""
    return Response(orjson.dumps(view), status_code=status, media_type="application/json")


def _now() -> datetime:
    return datetime.now(UTC)


def _command(kind: str, tenant: str, principal: Principal, key: str, payload: dict[str, Any]) -> LedgerCommand:
    return LedgerCommand(command_id=ids.command_id(kind, tenant, key), kind=kind, tenant=tenant, issued_at=_now(),
                         issued_by=principal.subject, payload=payload)


def build_router(app: LedgerApplication, direct: DirectCommands | None = None, *, lean_hold: bool = True
                 ) -> APIRouter:
    """``lean_hold=False``: holds are placed through their FastAPI route alone (the reference in tests)."""
    direct = direct or DirectCommands(app)
    router = APIRouter(tags=["ledger"])

    async def decide(command: LedgerCommand, aggregate_id: UUID) -> CommandResult:
        try:
            result = await direct.decide(command, aggregate_id)
        except (ConflictsExhausted, Overloaded) as exc:
            raise Problem(503, "Busy", "The ledger is too busy to decide now; retry shortly.", kind="busy",
                          headers={"Retry-After": "1"}) from exc
        if result.outcome == "rejected" or (result.outcome == "duplicate" and result.first_outcome == "rejected"):
            raise _problem(result)
        return result

    async def read(aggregate_id: UUID, view: Callable[[Any], Any], missing: str) -> Any:
        found = await direct.read(aggregate_id, view)
        if found is None:
            raise Problem(404, "Not found", missing, kind="not-found")
        return found

    async def read_hold(tenant: str, hold: UUID) -> dict[str, Any]:
        def view(account: BillingAccount) -> dict[str, Any] | None:
            try:
                return hold_view(tenant, account.hold(hold))
            except ValueError:
                return None
        return await read(ids.account_id(tenant), view, f"No hold {hold} for tenant {tenant!r}.")  # type: ignore[no-any-return]

    # -- holds -----------------------------------------------------------------------------------------------

    async def place(tenant: str, body: HoldRequest, principal: Principal) -> tuple[dict[str, Any], int]:
        """The hold's view and status (201 placed, 200 a retry's first answer); refusals raise problems."""
        check_tenant(principal, tenant)
        now = _now()
        hold = hold_id(tenant, body.idempotency_key)
        command = _command("hold.place", tenant, principal, body.idempotency_key, {
            "hold_id": str(hold), "amount": str(body.amount), "unit": body.unit, "meter": body.meter,
            "at": now.isoformat(), "expires_at": (now + timedelta(seconds=body.ttl_seconds)).isoformat()})
        result = await decide(command, ids.account_id(tenant))
        if result.outcome == "duplicate":
            return await read_hold(tenant, hold), 200
        return hold_view(tenant, result.value), 201

    lean = holds_http.HoldEndpoint(place) if lean_hold else None
    if lean is not None:  # first: it receives every request to the path; the FastAPI route below documents it
        router.add_route(holds_http.PATH, lean, methods=None, name="place_hold_lean", include_in_schema=False)

    @router.post(holds_http.PATH, status_code=201, summary="Reserve credit (yes/no, now)",
                 response_model=dict[str, Any])
    async def place_hold(tenant: Tenant, body: HoldRequest, principal: Spender) -> Response:
        # Served by holds_http.HoldEndpoint in the plain case (the same answer for far less CPU); this route
        # answers everything else, is what the OpenAPI document describes and what tests compare it with.
        return _json(*await place(tenant, body, principal))

    if lean is not None:
        reference = router.routes[-1]
        assert isinstance(reference, APIRoute) and reference.path == holds_http.PATH
        lean.reference = reference

    @router.get("/v1/accounts/{tenant}/holds/{hold}", summary="A hold and its status")
    async def get_hold(tenant: Tenant, hold: UUID, principal: Reader) -> dict[str, Any]:
        check_tenant(principal, tenant)
        return await read_hold(tenant, hold)

    async def settle(kind: str, tenant: str, hold: UUID, principal: Principal, payload: dict[str, Any],
                     amount: Decimal | None = None) -> dict[str, Any]:
        """A capture (of ``amount``) or release. The command id is the hold's, so a second capture is a duplicate:
        answered with the hold (200) when it captured the same amount, else refused (409) as a release of a captured
        hold is, naming what it captured; the first answer was given to another request."""
        check_tenant(principal, tenant)
        command = _command(kind, tenant, principal, str(hold), {"hold_id": str(hold), "at": _now().isoformat(),
                                                                **payload})
        result = await decide(command, ids.account_id(tenant))
        if result.outcome == "duplicate":
            view = await read_hold(tenant, hold)
            if amount is not None and view["status"] == "captured" and Decimal(view["captured"]) != amount:
                raise Problem(409, "Hold already settled", f"hold {hold} is already captured ({view['captured']} "
                              f"{view['unit']}), not for {amount}", kind="hold-already-settled",
                              reason="hold_already_settled")
            return view
        return hold_view(tenant, result.value)

    @router.post("/v1/accounts/{tenant}/holds/{hold}/capture", summary="Spend the actual amount of a hold",
                 responses={409: {"description": "The hold is settled: released, expired, or captured for "
                                                 "another amount (a capture of the same amount is answered 200)"}})
    async def capture_hold(tenant: Tenant, hold: UUID, body: CaptureRequest, principal: Spender) -> dict[str, Any]:
        return await settle("hold.capture", tenant, hold, principal,
                            {"amount": str(body.amount), "allow_overage": body.allow_overage}, body.amount)

    @router.post("/v1/accounts/{tenant}/holds/{hold}/release", summary="Release a hold without spending")
    async def release_hold(tenant: Tenant, hold: UUID, principal: Spender) -> dict[str, Any]:
        return await settle("hold.release", tenant, hold, principal, {})

    # -- pooled allocations ----------------------------------------------------------------------------------

    async def read_allocation(tenant: str, resource: str, request_id: str) -> dict[str, Any]:
        request = allocation_request_id(tenant, resource, request_id)

        def view(pool: ResourcePool) -> dict[str, Any] | None:
            found = pool.allocation(request)
            if found is None:
                return None
            return {"tenant": tenant, "resource": resource, "request_id": request_id,
                    "allocated": found["status"] != "refused", "status": found["status"],
                    "quantity": found["quantity"], "capacity": pool.capacity, "in_use": pool.in_use,
                    "free": pool.free}
        return await read(ResourcePool.create_id(tenant, resource), view,  # type: ignore[no-any-return]
                          f"No allocation request {request_id!r} for {resource!r} (a finished request is "
                          f"remembered for {FINISHED_REQUEST_KEEP.days} days).")

    @router.post("/v1/accounts/{tenant}/allocations", status_code=201, summary="Allocate from a pooled resource")
    async def allocate(tenant: Tenant, body: AllocationRequest, principal: Spender, response: Response
                       ) -> dict[str, Any]:
        check_tenant(principal, tenant)
        command = _command("allocation.allocate", tenant, principal, f"{body.resource}/{body.request_id}", {
            "resource": body.resource, "request_id": body.request_id, "quantity": body.quantity,
            "at": _now().isoformat()})
        result = await decide(command, ResourcePool.create_id(tenant, body.resource))
        if result.outcome == "duplicate":
            response.status_code = 200
            return await read_allocation(tenant, body.resource, body.request_id)
        value = result.value
        response.status_code = 201 if value["allocated"] else 200
        return {"tenant": tenant, "resource": body.resource, "request_id": body.request_id,
                "allocated": value["allocated"], "status": value["request"]["status"], "quantity": body.quantity,
                "capacity": value["capacity"], "in_use": value["in_use"], "free": value["free"]}

    @router.get("/v1/accounts/{tenant}/allocations/{resource}/{request_id}", summary="An allocation request")
    async def get_allocation(tenant: Tenant, resource: Resource, request_id: RequestId, principal: Reader) -> dict[str, Any]:
        check_tenant(principal, tenant)
        return await read_allocation(tenant, resource, request_id)

    @router.post("/v1/accounts/{tenant}/allocations/{resource}/{request_id}/release",
                 summary="Give an allocation back to the pool")
    async def release_allocation(tenant: Tenant, resource: Resource, request_id: RequestId, principal: Spender
                                 ) -> dict[str, Any]:
        check_tenant(principal, tenant)
        command = _command("allocation.release", tenant, principal, f"{resource}/{request_id}", {
            "resource": resource, "request_id": request_id, "at": _now().isoformat()})
        await decide(command, ResourcePool.create_id(tenant, resource))
        return await read_allocation(tenant, resource, request_id)

    @router.put("/v1/accounts/{tenant}/pools/{resource}", summary="Set a pool's capacity by hand (operator: platform admin)")
    async def set_capacity(tenant: Tenant, resource: Resource, body: CapacityRequest, principal: Admin) -> dict[str, Any]:
        check_tenant(principal, tenant)
        # Not idempotent by key, and need not be: the capacity is an absolute value, a retry sets it again.
        key = f"{resource}/{body.capacity}/{_now().isoformat()}"
        command = _command("allocation.set_capacity", tenant, principal, key,
                           {"resource": resource, "capacity": body.capacity})
        result = await decide(command, ResourcePool.create_id(tenant, resource))
        return {"tenant": tenant, **result.value}

    # -- corrections -----------------------------------------------------------------------------------------

    @router.post("/v1/accounts/{tenant}/adjustments", status_code=201, summary="Manual correction (operator: platform admin, finance)")
    async def adjust(tenant: Tenant, body: AdjustmentRequest, principal: Corrector, response: Response
                     ) -> dict[str, Any]:
        check_tenant(principal, tenant)
        if to_subunits(body.amount) == 0:
            raise Problem(422, "Invalid request", "An adjustment of zero changes nothing.", kind="invalid-request")
        adjustment = adjustment_id(tenant, body.idempotency_key)
        command = _command("balance.adjust", tenant, principal, body.idempotency_key, {
            "adjustment_id": str(adjustment), "amount": str(body.amount), "unit": body.unit, "reason": body.reason,
            "user": principal.subject, "at": _now().isoformat()})
        result = await decide(command, ids.account_id(tenant))
        if result.outcome == "duplicate":  # a retry: the first answer, as the account remembers it
            response.status_code = 200
            record = await direct.read(ids.account_id(tenant), lambda account: account.adjustment(adjustment))
            if record is None:  # forgotten (beyond ADJUSTMENTS_KEPT_MAX later ones)
                return {"adjustment_id": str(adjustment), "tenant": tenant, "duplicate": True}
            return adjustment_view(tenant, adjustment, record)
        return adjustment_view(tenant, adjustment, result.value)

    @router.post("/v1/accounts/{tenant}/refunds", status_code=201,
                 summary="Refund a purchase grant (operator: platform admin, finance)", response_model=None,
                 responses={201: {"model": RefundAnswer, "description": "Refunded"},
                            200: {"model": RefundAnswer, "description": "A retry (same `idempotency_key`): the first "
                                                                        "answer, nothing refunded again"}})
    async def refund(tenant: Tenant, body: RefundRequest, principal: Corrector, response: Response) -> dict[str, Any]:
        check_tenant(principal, tenant)
        if body.finance_override and not principal.is_operator(Role.FINANCE):
            raise Problem(403, "Forbidden", "Only the platform's finance role may refund spent credit.",
                          kind="forbidden")
        refund_uuid = refund_id(tenant, body.idempotency_key)
        command = _command("grant.refund", tenant, principal, body.idempotency_key, {
            "grant_id": str(body.grant_id), "refund_id": str(refund_uuid), "amount": str(body.amount),
            "reason": body.reason, "finance_override": body.finance_override, "at": _now().isoformat()})
        result = await decide(command, ids.account_id(tenant))
        if result.outcome == "duplicate":  # a retry: the first answer, as the account remembers it
            response.status_code = 200
            found = await direct.read(ids.account_id(tenant), lambda account: (
                account.refund(refund_uuid), _refund_note_id(account, refund_uuid)))
            record, note_id = found if found is not None else (None, None)
            if record is None:  # forgotten (beyond REFUNDS_KEPT_MAX later ones)
                return {"refund_id": str(refund_uuid), "tenant": tenant, "duplicate": True}
            note = None if note_id is None else await direct.read(note_id, _note_reference)
            return refund_view(tenant, refund_uuid, record, note)
        return refund_view(tenant, refund_uuid, result.value, result.value.get("credit_note"))

    return router

"""Query API of the projections service (reads only the read models)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from billing_events.money import SUBUNIT_SCALE, format_subunits, resolve_unit
from billing_projections.service import ProjectionService
from billing_runtime.auth import Principal, require, check_tenant
from billing_runtime.problems import Problem


def _unit(code: str) -> Any:
    try:
        return resolve_unit(code, {code: 2})
    except ValueError:
        return resolve_unit("XXX")


def build_router(service: ProjectionService) -> APIRouter:
    router = APIRouter(tags=["accounts"])

    @router.get("/v1/accounts/{tenant}/balance", summary="Balances per wallet",
                description="Available = wallet balance - active holds; amounts are exact decimals "
                            f"(ledger sub-unit 10^-{SUBUNIT_SCALE}).")
    async def get_balance(tenant: str, principal: Principal = Depends(require())) -> dict[str, Any]:
        check_tenant(principal, tenant)
        view = await service.balance(tenant)
        if view is None:
            raise Problem(404, "Not found", f"No billing account for tenant {tenant!r}.", kind="unknown-account")
        wallets = []
        for code, w in sorted(view["wallets"].items()):
            unit = _unit(code)
            held = view["holds"].get(code, 0)
            wallets.append({
                "unit": code,
                "available": format_subunits(w["balance"] - held, unit),
                "held": format_subunits(held, unit),
                "balance": format_subunits(w["balance"], unit),
                "receivable": format_subunits(w["receivable"], unit),
            })
        return {"tenant": tenant, "currency": view["currency"], "wallets": wallets, "position": view["position"]}

    return router

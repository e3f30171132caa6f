"""Query API for one tenant: ``/v1/accounts/{tenant}/...`` (a tenant's token sees only its own tenant)."""

from __future__ import annotations

from typing import Annotated, Any
from uuid import UUID

from billing_events.money import SUBUNIT_SCALE
from billing_events.timeutil import utcnow
from billing_projections import api_balance, api_models, balances, lists, views
from billing_projections.balance_cache import BalanceCache
from billing_projections.exports import csv_of, csv_response
from billing_projections.limits import PAGE_ITEMS_DEFAULT, PAGE_ITEMS_MAX
from billing_projections.params import day_bound, invalid, month_range, split_list, time_bound, wants_csv
from billing_runtime.auth import Principal, check_tenant, require
from billing_runtime.db import Database
from billing_runtime.problems import Problem
from fastapi import APIRouter, Depends, Query, Request

# Any role (the verifier answers a token it accepted a moment ago from memory: billing_runtime.auth).
Reader = Annotated[Principal, Depends(require())]
Limit = Annotated[int, Query(ge=1, le=PAGE_ITEMS_MAX, description="Items per page")]
Cursor = Annotated[str | None, Query(description="next_cursor of the previous page")]
Format = Annotated[str | None, Query(alias="format", description="json (default) or csv; or Accept: text/csv")]
Year = Annotated[int | None, Query(ge=1970, le=9999)]
Month = Annotated[int | None, Query(ge=1, le=12)]
CSV = {200: {"content": {"text/csv": {}}, "description": "JSON, or CSV with ?format=csv / Accept: text/csv"}}

TRANSACTION_COLUMNS = ("position", "occurred_at", "recorded_at", "type", "unit", "amount", "wallet_delta",
                       "held_delta", "meter", "quantity", "user", "event_ids", "payment_id", "grant_id", "hold_id",
                       "reference", "detail", "cause")
MONTHLY_COLUMNS = ("tenant", "year", "month", "meter", "usage_type", "meter_name", "unit_of_measure", "quantity", "unit", "cost",
                   "events")
AI_COLUMNS = ("model", "operation", "user", "input_tokens", "output_tokens", "cached_tokens", "tokens", "unit",
              "cost", "events")
GRANT_COLUMNS = ("grant_id", "unit", "source", "status", "amount", "carry_drawn", "remaining", "tax", "refunded",
                 "breakage", "priority", "effective_at", "expires_at", "drawable_until", "expiring_soon", "scope",
                 "granted_by", "cause")
FIGURE_COLUMNS = tuple(api_models.Figures.model_fields)
INVOICE_COLUMNS = ("invoice_id", "number", "document_type", "status", "currency", "issue_date", "due_date",
                   "period", "period_start", "period_end", "subtotal", "tax", "total", "lines", "subscription_id",
                   "paid_at", "voided_at", "payment_reference", "pdf_url")
InvoiceStatus = Annotated[str | None, Query(alias="status",
                                            description="Comma-separated: draft, finalized, paid, void")]
InvoiceType = Annotated[str | None, Query(alias="type", description="invoice | credit_note (comma-separated)")]
Period = Annotated[str | None, Query(description="Issued in this month (2026-11) or year (2026); drafts: drafted")]


async def _known(db: Database, principal: Principal, tenant: str) -> None:
    check_tenant(principal, tenant)
    if await balances.account(db, tenant) is None:
        raise api_balance.unknown_account(tenant)


def build_router(db: Database, ledger_url: str = "", *, lean_balance: bool = True,
                 balance_cache: BalanceCache | None = None) -> APIRouter:
    """``lean_balance=False``: the balance is served by its FastAPI route alone (the reference in tests).
    ``balance_cache``: the lean route reads balances from it (balance_cache.py)."""
    router = APIRouter(tags=["accounts"])
    if lean_balance:  # first: it serves every request to the path; the FastAPI route below documents it
        # Not a function, so Starlette's Route calls it as an ASGI app; methods=None: it answers 405 itself.
        endpoint: Any = api_balance.BalanceEndpoint(db, balance_cache)
        router.add_route(api_balance.PATH, endpoint, methods=None, name="get_balance_lean", include_in_schema=False)

    @router.get(api_balance.PATH, summary="Balances per wallet", response_model=api_models.Balance,
                description="Available = wallet balance - active holds; amounts are exact decimals (ledger "
                            f"sub-unit 10^-{SUBUNIT_SCALE}). `position` tells how fresh the read model is.")
    async def get_balance(tenant: str, principal: Reader) -> Any:
        # Served by api_balance.BalanceEndpoint (the same answer for far less CPU); this one, validated and
        # serialized by the model, is what the OpenAPI document describes and what tests compare it with.
        check_tenant(principal, tenant)
        view = await views.balance_view(db, tenant, utcnow())
        if view is None:
            raise api_balance.unknown_account(tenant)
        return view

    @router.get("/v1/accounts/{tenant}/grants", summary="Balances per grant", response_model=api_models.Grants,
                responses=CSV)
    async def get_grants(tenant: str, principal: Reader, request: Request,
                         status: Annotated[str | None, Query(description="open | expired | voided")] = None,
                         unit: str | None = None, fmt: Format = None) -> Any:
        await _known(db, principal, tenant)
        if status and status not in balances.GRANT_STATUSES:
            raise invalid(f"unknown status {status}; known: {', '.join(balances.GRANT_STATUSES)}", "status")
        units, now = await views.load_units(db), utcnow()
        items = [views.grant_view(g, units, now) for g in await balances.grants(db, tenant, status=status, unit=unit)]
        if wants_csv(request, fmt):
            return csv_of(GRANT_COLUMNS, items, f"grants-{tenant}")
        return {"tenant": tenant, "items": items}

    @router.get("/v1/accounts/{tenant}/transactions", summary="Transaction history (newest first)",
                response_model=api_models.Transactions, responses=CSV,
                description="Every movement with its cause and user. Filters combine; `from` is inclusive, `to` "
                            "exclusive (business time). Pages are keyset cursors, stable while new rows arrive.")
    async def get_transactions(
            tenant: str, principal: Reader, request: Request,
            types: Annotated[str | None, Query(alias="type", description="Comma-separated, e.g. usage,purchase")] = None,
            since: Annotated[str | None, Query(alias="from", description="ISO 8601 date or timestamp")] = None,
            until: Annotated[str | None, Query(alias="to", description="ISO 8601 date or timestamp")] = None,
            meter: str | None = None, user: str | None = None, unit: str | None = None,
            cursor: Cursor = None, limit: Limit = PAGE_ITEMS_DEFAULT, fmt: Format = None) -> Any:
        await _known(db, principal, tenant)
        filters: dict[str, Any] = {"tenant": tenant, "types": split_list(types), "since": time_bound(since, "from"),
                                       "until": time_bound(until, "to"), "meter": meter, "user": user, "unit": unit}
        if wants_csv(request, fmt):
            async def fetch(c: str | None, n: int) -> lists.Page:
                return await lists.transactions(db, **filters, cursor=c, limit=n)
            return await csv_response(TRANSACTION_COLUMNS, fetch, f"transactions-{tenant}")
        items, next_cursor = await lists.transactions(db, **filters, cursor=cursor, limit=limit)
        return {"items": items, "next_cursor": next_cursor}

    @router.get("/v1/accounts/{tenant}/usage/monthly", summary="Monthly usage summary by usage type",
                response_model=api_models.MonthlyUsagePage, responses=CSV,
                description="Newest month first, then by meter and unit. Pages are keyset cursors, stable while "
                            "new rows arrive.")
    async def get_monthly(tenant: str, principal: Reader, request: Request, year: Year = None, month: Month = None,
                          meter: str | None = None, cursor: Cursor = None, limit: Limit = PAGE_ITEMS_DEFAULT,
                          fmt: Format = None) -> Any:
        await _known(db, principal, tenant)
        filters: dict[str, Any] = {"tenant": tenant, "year": year, "month": month, "meter": meter}
        if wants_csv(request, fmt):
            async def fetch(c: str | None, n: int) -> lists.Page:
                return await lists.monthly(db, **filters, cursor=c, limit=n)
            return await csv_response(MONTHLY_COLUMNS, fetch, f"usage-monthly-{tenant}")
        items, next_cursor = await lists.monthly(db, **filters, cursor=cursor, limit=limit)
        return {"items": items, "next_cursor": next_cursor}

    @router.get("/v1/accounts/{tenant}/usage/ai", summary="AI usage: tokens per class and cost",
                response_model=api_models.AIUsageList, responses=CSV,
                description="Grouped by `group_by` (comma-separated subset of model, operation, user; default "
                            "model).")
    async def get_ai(tenant: str, principal: Reader, request: Request, year: Year = None, month: Month = None,
                     group_by: str = "model", model: str | None = None, user: str | None = None,
                     fmt: Format = None) -> Any:
        await _known(db, principal, tenant)
        groups = split_list(group_by)
        items = await lists.ai(db, tenant=tenant, year=year, month=month, group_by=groups, model=model, user=user)
        if wants_csv(request, fmt):
            return csv_of([c for c in AI_COLUMNS if c in groups or c not in ("model", "operation", "user")], items,
                          f"ai-usage-{tenant}")
        return {"group_by": groups, "items": items}

    @router.get("/v1/accounts/{tenant}/figures",
                summary="Top-ups, consumption, tax, refunds, credit notes per day or month",
                response_model=api_models.FiguresList, responses=CSV)
    async def get_figures(tenant: str, principal: Reader, request: Request,
                          granularity: Annotated[str, Query(description="day | month")] = "day",
                          year: Year = None, month: Month = None,
                          since: Annotated[str | None, Query(alias="from")] = None,
                          until: Annotated[str | None, Query(alias="to")] = None,
                          unit: str | None = None, fmt: Format = None) -> Any:
        await _known(db, principal, tenant)
        return await figures_response(db, request, tenant, granularity, year, month, since, until, unit, fmt)

    @router.get("/v1/accounts/{tenant}/invoices", summary="Invoices and credit notes (newest first)",
                response_model=api_models.Invoices, responses=CSV,
                description="Filters combine. Each item links its PDF (`pdf_url`: the ledger renders it afresh). "
                            "Pages are keyset cursors, stable while new documents arrive.")
    async def get_invoices(tenant: str, principal: Reader, request: Request, statuses: InvoiceStatus = None,
                           types: InvoiceType = None, period: Period = None,
                           subscription: Annotated[str | None, Query(description="Subscription id")] = None,
                           cursor: Cursor = None, limit: Limit = PAGE_ITEMS_DEFAULT, fmt: Format = None) -> Any:
        await _known(db, principal, tenant)
        filters: dict[str, Any] = {"tenant": tenant, "ledger_url": ledger_url, "statuses": split_list(statuses),
                                   "types": split_list(types), "period": period, "subscription": subscription}
        if wants_csv(request, fmt):
            async def fetch(c: str | None, n: int) -> lists.Page:
                return await lists.invoice_list(db, **filters, cursor=c, limit=n)
            return await csv_response(INVOICE_COLUMNS, fetch, f"invoices-{tenant}")
        items, next_cursor = await lists.invoice_list(db, **filters, cursor=cursor, limit=limit)
        return {"items": items, "next_cursor": next_cursor}

    @router.get("/v1/accounts/{tenant}/invoices/{invoice_id:uuid}", summary="One invoice with its lines",
                response_model=api_models.InvoiceDetail,
                description="The PDF is the ledger's `GET /v1/accounts/{tenant}/invoices/{invoice_id}.pdf` "
                            "(`pdf_url`).")
    async def get_invoice(tenant: str, invoice_id: UUID, principal: Reader) -> Any:
        await _known(db, principal, tenant)
        found = await lists.invoice_detail(db, tenant=tenant, invoice_id=str(invoice_id), ledger_url=ledger_url)
        if found is None:
            raise Problem(404, "Not found", f"No invoice {invoice_id} for tenant {tenant!r}.", kind="unknown-invoice")
        return found

    return router


async def figures_response(db: Database, request: Request, tenant: str | None, granularity: str, year: int | None,
                           month: int | None, since: str | None, until: str | None, unit: str | None,
                           fmt: str | None) -> Any:
    start, end = month_range(year, month)
    start = day_bound(since, "from") or start
    end = day_bound(until, "to", end=True) or end
    items = await lists.figure_series(db, tenant=tenant, granularity=granularity, since=start, until=end, unit=unit)
    if wants_csv(request, fmt):
        return csv_of(FIGURE_COLUMNS, items, f"figures-{tenant or 'all'}")
    recurring = [m for m in await lists.mrr(db, tenant=tenant) if unit is None or m["currency"] == unit]
    return {"granularity": granularity, "items": items, "mrr": recurring}



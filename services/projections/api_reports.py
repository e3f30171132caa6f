"""Finance and admin reports across tenants: ``/v1/reports/...`` (roles admin or finance).

A token scoped to one tenant gets that tenant's rows only (asking for another tenant is 403).
"""

from __future__ import annotations

from typing import Annotated, Any

from billing_events.timeutil import utcnow
from billing_projections import api_models, lists
from billing_projections.api_accounts import (
    CSV,
    INVOICE_COLUMNS,
    MONTHLY_COLUMNS,
    TRANSACTION_COLUMNS,
    Cursor,
    Format,
    InvoiceStatus,
    InvoiceType,
    Limit,
    Month,
    Period,
    Year,
    figures_response,
)
from billing_projections.exports import csv_of, csv_response
from billing_projections.limits import PAGE_ITEMS_DEFAULT
from billing_projections.params import invalid, month_param, split_list, time_bound, wants_csv
from billing_runtime.auth import Principal, Role, check_tenant, require
from billing_runtime.db import Database
from fastapi import APIRouter, Depends, Query, Request

Finance = Annotated[Principal, Depends(require(Role.ADMIN, Role.FINANCE))]
TenantFilter = Annotated[str | None, Query(description="Only this tenant (organisation)")]
CHARGEBACK_COLUMNS = tuple(api_models.ChargebackLine.model_fields)
SUBSCRIPTION_COLUMNS = tuple(api_models.Subscription.model_fields)
MRR_COLUMNS = tuple(api_models.MRR.model_fields)
ANALYTICS_COLUMNS = tuple(api_models.SubscriptionAnalytics.model_fields)
REVENUE_COLUMNS = tuple(api_models.RevenueLine.model_fields)
ACCOUNT_COLUMNS = ("tenant", "currency", "opened_at", "unit", "available", "held", "balance", "receivable",
                   "expiring_soon", "low_balance_threshold", "low_balance", "updated_at")


def _scope(principal: Principal, tenant: str | None) -> str | None:
    if tenant is not None:
        check_tenant(principal, tenant)
        return tenant
    return principal.tenant


def chargeback_month(period: str | None, year: int | None, month: int | None) -> tuple[int, int]:
    """The chargeback report's month: ``period`` (``YYYY-MM``, as the other reports take a month) or ``year`` and
    ``month`` (its first parameters, kept); both forms, or neither, or half of the second, is a 422 problem."""
    if period is not None:
        if year is not None or month is not None:
            raise invalid("give the month as period=YYYY-MM or as year and month, not both", "period")
        found = month_param(period, "period")
        if found is not None:
            return found
    if year is None or month is None:
        raise invalid("the month is required: period=YYYY-MM (e.g. 2026-11), or year and month", "period")
    return year, month


def build_router(db: Database, ledger_url: str = "") -> APIRouter:
    router = APIRouter(tags=["reports"])

    @router.get("/v1/reports/accounts", summary="Every account with its wallets and low-balance status",
                response_model=api_models.AccountList, responses=CSV)
    async def get_accounts(principal: Finance, request: Request, fmt: Format = None) -> Any:
        items = [a for a in await lists.accounts(db, utcnow()) if principal.can_see(a["tenant"])]
        if wants_csv(request, fmt):
            flat = [{**{k: a[k] for k in ("tenant", "currency", "opened_at")}, **w} for a in items for w in a["wallets"]]
            return csv_of(ACCOUNT_COLUMNS, flat, "accounts")
        return {"items": items}

    @router.get("/v1/reports/usage/monthly", summary="Monthly usage summaries of all tenants",
                response_model=api_models.MonthlyUsagePage, responses=CSV,
                description="Newest month first, then by tenant, meter and unit. Pages are keyset cursors, stable "
                            "while new rows arrive.")
    async def get_monthly(principal: Finance, request: Request, tenant: TenantFilter = None, year: Year = None,
                          month: Month = None, meter: str | None = None, cursor: Cursor = None,
                          limit: Limit = PAGE_ITEMS_DEFAULT, fmt: Format = None) -> Any:
        filters: dict[str, Any] = {"tenant": _scope(principal, tenant), "year": year, "month": month, "meter": meter}
        if wants_csv(request, fmt):
            async def fetch(c: str | None, n: int) -> lists.Page:
                return await lists.monthly(db, **filters, cursor=c, limit=n)
            return await csv_response(MONTHLY_COLUMNS, fetch, "usage-monthly")
        items, next_cursor = await lists.monthly(db, **filters, cursor=cursor, limit=limit)
        return {"items": items, "next_cursor": next_cursor}

    @router.get("/v1/reports/chargeback", summary="Tenant chargeback: each tenant's cost for a month",
                response_model=api_models.Chargeback, responses=CSV,
                description="Per tenant and unit, summed over usage types, with the tenant's share of the month. "
                            "The month: `period=YYYY-MM`, as the other reports take it, or `year` and `month` "
                            "(integers, as before); one of the two forms, else 422 problem+json.")
    async def get_chargeback(principal: Finance, request: Request,
                             period: Annotated[str | None, Query(description="The month, YYYY-MM (2026-11)")] = None,
                             year: Year = None, month: Month = None,
                             tenant: TenantFilter = None, fmt: Format = None) -> Any:
        year, month = chargeback_month(period, year, month)
        items = await lists.chargeback(db, year=year, month=month, tenant=_scope(principal, tenant))
        if wants_csv(request, fmt):
            return csv_of(CHARGEBACK_COLUMNS, items, f"chargeback-{year:04d}-{month:02d}")
        return {"items": items}

    @router.get("/v1/reports/figures", summary="Dashboard figures of all tenants per day or month",
                response_model=api_models.FiguresList, responses=CSV,
                description="Funds taken in, top-ups, tax collected, credit consumed, refunds (money paid "
                            "back), credit notes (account credit given), breakage, chargebacks (money lost card "
                            "disputes took back; not the tenant cost-allocation report /v1/reports/chargeback) and "
                            "funds held for open disputes.")
    async def get_figures(principal: Finance, request: Request,
                          granularity: Annotated[str, Query(description="day | month")] = "month",
                          year: Year = None, month: Month = None,
                          since: Annotated[str | None, Query(alias="from")] = None,
                          until: Annotated[str | None, Query(alias="to")] = None,
                          tenant: TenantFilter = None, unit: str | None = None, fmt: Format = None) -> Any:
        return await figures_response(db, request, _scope(principal, tenant), granularity, year, month, since,
                                      until, unit, fmt)

    @router.get("/v1/reports/transactions", summary="Transactions of all tenants (newest first)",
                response_model=api_models.Transactions, responses=CSV)
    async def get_transactions(
            principal: Finance, request: Request, tenant: TenantFilter = None,
            types: Annotated[str | None, Query(alias="type", description="Comma-separated types")] = None,
            since: Annotated[str | None, Query(alias="from")] = None,
            until: Annotated[str | None, Query(alias="to")] = None,
            meter: str | None = None, user: str | None = None, unit: str | None = None,
            cursor: Cursor = None, limit: Limit = PAGE_ITEMS_DEFAULT, fmt: Format = None) -> Any:
        filters: dict[str, Any] = {"tenant": _scope(principal, tenant), "types": split_list(types),
                                       "since": time_bound(since, "from"), "until": time_bound(until, "to"), "meter": meter,
                                       "user": user, "unit": unit}
        if wants_csv(request, fmt):
            async def fetch(c: str | None, n: int) -> lists.Page:
                return await lists.transactions(db, **filters, cursor=c, limit=n)
            return await csv_response(("tenant",) + TRANSACTION_COLUMNS, fetch, "transactions")
        items, next_cursor = await lists.transactions(db, **filters, cursor=cursor, limit=limit)
        return {"items": items, "next_cursor": next_cursor}

    @router.get("/v1/reports/ledger", summary="Balances of the chart of accounts (debit positive)",
                response_model=api_models.LedgerBalances, responses=CSV)
    async def get_ledger(principal: Finance, request: Request, tenant: TenantFilter = None,
                         fmt: Format = None) -> Any:
        items = await lists.ledger(db, _scope(principal, tenant))
        if wants_csv(request, fmt):
            return csv_of(("ledger_account", "unit", "balance"), items, "ledger")
        return {"items": items}

    @router.get("/v1/reports/invoices", summary="Invoices and credit notes of all tenants (newest first)",
                response_model=api_models.Invoices, responses=CSV)
    async def get_invoices(principal: Finance, request: Request, tenant: TenantFilter = None,
                           statuses: InvoiceStatus = None, types: InvoiceType = None, period: Period = None,
                           cursor: Cursor = None, limit: Limit = PAGE_ITEMS_DEFAULT, fmt: Format = None) -> Any:
        filters: dict[str, Any] = {"tenant": _scope(principal, tenant), "ledger_url": ledger_url,
                                   "statuses": split_list(statuses), "types": split_list(types), "period": period}
        if wants_csv(request, fmt):
            async def fetch(c: str | None, n: int) -> lists.Page:
                return await lists.invoice_list(db, **filters, cursor=c, limit=n)
            return await csv_response(("tenant",) + INVOICE_COLUMNS, fetch, "invoices")
        items, next_cursor = await lists.invoice_list(db, **filters, cursor=cursor, limit=limit)
        return {"items": items, "next_cursor": next_cursor}

    @router.get("/v1/reports/subscriptions", summary="Subscriptions of all tenants",
                response_model=api_models.Subscriptions, responses=CSV,
                description="Status, plan and version, quantity, current period, trial end, cancellation. By "
                            "tenant and key; pages are keyset cursors, stable while new subscriptions arrive.")
    async def get_subscriptions(
            principal: Finance, request: Request, tenant: TenantFilter = None,
            statuses: Annotated[str | None, Query(alias="status", description="Comma-separated: incomplete, trialing, "
                                                  "active, past_due, paused, canceled")] = None,
            plan: Annotated[str | None, Query(description="Plan code")] = None,
            cursor: Cursor = None, limit: Limit = PAGE_ITEMS_DEFAULT, fmt: Format = None) -> Any:
        filters: dict[str, Any] = {"tenant": _scope(principal, tenant), "statuses": split_list(statuses),
                                   "plan": plan}
        if wants_csv(request, fmt):
            async def fetch(c: str | None, n: int) -> lists.Page:
                return await lists.subscription_list(db, **filters, cursor=c, limit=n)
            return await csv_response(SUBSCRIPTION_COLUMNS, fetch, "subscriptions")
        items, next_cursor = await lists.subscription_list(db, **filters, cursor=cursor, limit=limit)
        return {"items": items, "next_cursor": next_cursor}

    @router.get("/v1/reports/mrr", summary="Monthly recurring revenue now, per currency",
                response_model=api_models.MRRList, responses=CSV,
                description="Base fee x quantity of every active or past_due subscription, a quarter's fee a "
                            "third per month, a year's a twelfth; exact sums, MRR rounded once. `by=tenant` "
                            "splits it per tenant.")
    async def get_mrr(principal: Finance, request: Request, tenant: TenantFilter = None,
                      by: Annotated[str | None, Query(description="tenant: one line per tenant and currency")] = None,
                      fmt: Format = None) -> Any:
        if by not in (None, "", "tenant"):
            raise invalid("by takes only tenant", "by")
        items = await lists.mrr(db, tenant=_scope(principal, tenant), by_tenant=by == "tenant")
        if wants_csv(request, fmt):
            return csv_of(MRR_COLUMNS, items, "mrr")
        return {"items": items}

    @router.get("/v1/reports/subscriptions/analytics",
                summary="Churn, net revenue retention and MRR movements per calendar month and currency",
                response_model=api_models.SubscriptionAnalyticsList, responses=CSV,
                description="Per UTC calendar month and currency, from the same subscription events MRR reads: "
                            "customers (accounts) live at the start and end, new, expansion, contraction and "
                            "churned MRR, logo churn, gross revenue churn and net revenue retention. Each customer's "
                            "MRR at the month's start is compared with its MRR at its end (changes within the month "
                            "net out); amounts rounded once as MRR, ratios to 4 digits. Defined in "
                            "services/projections/README.md \"Subscription analytics\".")
    async def get_subscription_analytics(
            principal: Finance, request: Request, tenant: TenantFilter = None,
            since: Annotated[str | None, Query(alias="from", description="First month, YYYY-MM (default: 11 months "
                                               "before `to`)", examples=["2026-01"])] = None,
            until: Annotated[str | None, Query(alias="to", description="Last month, YYYY-MM, not after this month "
                                               "(default: this month, UTC)", examples=["2026-12"])] = None,
            fmt: Format = None) -> Any:
        now = utcnow()
        months = lists.analytics_months(since, until, now)
        csv = wants_csv(request, fmt)
        items = await lists.analytics(db, tenant=_scope(principal, tenant), months=months, now=now)
        if csv:
            return csv_of(ANALYTICS_COLUMNS, items, f"subscription-analytics-{months[0]}-{months[-1]}")
        return {"months": months, "items": items}

    @router.get("/v1/reports/revenue",
                summary="Deferred and recognised revenue for a month or as at a day, per unit (IFRS 15 close)",
                response_model=api_models.RevenueReport, responses=CSV,
                description="The month's roll-forward of deferred revenue (opening, credit sold, fees billed, "
                            "promotional credit, credit notes, adjustments; recognised from usage and fees, breakage, "
                            "refunds, chargebacks; closing) and its recognised revenue, breakage and promotional "
                            "expense, all summed from the ledger's postings dated in the period (UTC). `at=YYYY-MM-DD`: "
                            "its month up to the end of that day. `by=tenant`: one line per tenant and unit. Defined in "
                            "services/projections/README.md \"Revenue report\".")
    async def get_revenue(
            principal: Finance, request: Request, tenant: TenantFilter = None,
            period: Annotated[str | None, Query(description="A month, YYYY-MM, not after this month (default: this "
                                                "month, UTC)", examples=["2026-10"])] = None,
            at: Annotated[str | None, Query(description="Instead of period: a day, YYYY-MM-DD, not after today; the "
                                            "report is as at its end", examples=["2026-10-31"])] = None,
            by: Annotated[str | None, Query(description="tenant: one line per tenant and unit")] = None,
            fmt: Format = None) -> Any:
        if by not in (None, "", "tenant"):
            raise invalid("by takes only tenant", "by")
        chosen = lists.revenue_period(period, at, utcnow())
        csv = wants_csv(request, fmt)
        document = await lists.revenue_document(db, tenant=_scope(principal, tenant), period=chosen,
                                                by_tenant=by == "tenant")
        if csv:
            return csv_of(REVENUE_COLUMNS, document["items"], f"revenue-{chosen.as_at or chosen.label}")
        return document

    return router

"""The billing dashboard: server-rendered HTML (Jinja2) with inline SVG charts, no build step, no CDN.

Same bearer tokens as the API: the login page takes a token and keeps it in an HttpOnly, SameSite=Strict
cookie scoped to ``/dashboard``; an ``Authorization: Bearer`` header works too. The forms that post (sign in, sign
out) carry a CSRF token and are refused from another site's page (``csrf.py``). A tenant's token sees only
its own account page; the finance page needs the admin or finance role. Every number comes from the same
views as the JSON API (``views.py`` / ``lists.py``).
"""

from __future__ import annotations

import calendar
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, quote
from uuid import UUID

import httpx
import jwt
from billing_events.timeutil import utcnow
from billing_projections import balances, catalog, charts, csrf, history, lists, views
from billing_projections.api_accounts import INVOICE_COLUMNS, MONTHLY_COLUMNS, TRANSACTION_COLUMNS
from billing_projections.exports import csv_response
from billing_projections.params import month_range
from billing_runtime.auth import Principal, Role, TokenVerifier
from billing_runtime.db import Database
from billing_runtime.problems import Problem
from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

COOKIE = "billing_token"
COOKIE_PATH = "/dashboard"
TRANSACTIONS_SHOWN = 20
INVOICES_SHOWN = 24
PDF_FETCH_SECONDS_MAX = 30.0
LOGIN_BODY_BYTES_MAX = 16 * 1024

templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
templates.env.globals["type_label"] = history.type_label


def _percent(ratio: str | None) -> str:
    """A ratio of the API (``0.4000``) as a percentage, exactly (``40.00 %``); an em dash for none."""
    return "—" if ratio is None else f"{Decimal(ratio).scaleb(2)} %"


templates.env.filters["percent"] = _percent


def _principal(request: Request) -> Principal | None:
    verifier: TokenVerifier = request.app.state.token_verifier
    token = _token(request)
    if not token:
        return None
    try:
        return verifier.verify(token)
    except jwt.PyJWTError:
        return None


def _to_login(request: Request, message: str = "") -> RedirectResponse:
    target = f"/dashboard/login?next={quote(request.url.path)}" + (f"&message={quote(message)}" if message else "")
    response = RedirectResponse(target, status_code=303)
    response.delete_cookie(COOKIE, path=COOKIE_PATH)
    return response


def _page(request: Request, name: str, context: dict[str, Any], status: int = 200) -> HTMLResponse:
    """A page; its forms that post (sign in, sign out) carry this browser's CSRF token (``csrf.py``)."""
    response = templates.TemplateResponse(request, name, {**context, "csrf": csrf.form_token(request)},
                                          status_code=status)
    csrf.set_cookie(request, response)
    return response


def _forbidden(request: Request, principal: Principal, detail: str) -> HTMLResponse:
    return _page(request, "error.html", {"principal": principal, "title": "Forbidden", "detail": detail}, 403)


# The pages' year and month filters, read by the page itself after it compared the token's tenant: declared as
# validated query parameters, a bad value was FastAPI's 422 problem+json before the page looked at the token, so
# another tenant's page answered a stranger's bad query (and a person saw JSON instead of a page).
Filter = Annotated[str | None, Query()]
YEAR_MIN, YEAR_MAX = 1970, 9999


class InvalidFilter(ValueError):
    """A page filter that is not one of the values the page offers."""


def _whole(text: str | None, name: str, low: int, high: int) -> int | None:
    if text is None or text.strip() == "":
        return None
    value = text.strip()
    if not (value.isascii() and value.isdigit()) or not low <= int(value) <= high:
        raise InvalidFilter(f"{name} must be a whole number from {low} to {high}, not {text!r}.")
    return int(value)


def _month_filter(year: str | None, month: str | None) -> tuple[int | None, int | None]:
    return _whole(year, "year", YEAR_MIN, YEAR_MAX), _whole(month, "month", 1, 12)


def _invalid(request: Request, principal: Principal, exc: InvalidFilter) -> HTMLResponse:
    return _page(request, "error.html", {"principal": principal, "title": "Invalid request", "detail": str(exc)},
                 422)


def _period(year: int | None, month: int | None) -> tuple[int, int]:
    now = utcnow()
    return year or now.year, month or (now.month if year is None else 1)


def _days(year: int, month: int) -> list[str]:
    return [f"{year:04d}-{month:02d}-{day:02d}" for day in range(1, calendar.monthrange(year, month)[1] + 1)]


def _chart_points(series: list[dict[str, Any]], days: list[str], unit: str) -> list[tuple[str, Decimal]]:
    by_day = {r["period"]: Decimal(r["consumed"]) for r in series if r["unit"] == unit}
    return [(day, by_day.get(day, Decimal(0))) for day in days]


def _years(now: datetime) -> list[int]:
    return list(range(now.year - 4, now.year + 1))


def _token(request: Request) -> str:
    header = request.headers.get("authorization", "")
    token = header.partition(" ")[2].strip() if header.lower().startswith("bearer ") else ""
    return token or request.cookies.get(COOKIE, "")


def _own_origin(request: Request) -> str:
    """This server's own address (the embedded app also serves the ledger's routes); never the Host header."""
    host, port = request.scope.get("server") or ("127.0.0.1", 80)
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def build_router(db: Database, ledger_url: str = "") -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.get("/dashboard/login", response_class=HTMLResponse)
    async def login_form(request: Request, next: str = "/dashboard", message: str = "") -> HTMLResponse:
        return _page(request, "login.html", {"next": next if next.startswith("/dashboard") else "/dashboard",
                                             "message": message, "principal": None})

    @router.post("/dashboard/login")
    async def login(request: Request) -> Response:
        body = await request.body()
        if len(body) > LOGIN_BODY_BYTES_MAX:
            raise Problem(413, "Payload too large", "The login form is too large.")
        form = parse_qs(body.decode(errors="replace"))
        token = (form.get("token") or [""])[0].strip()
        target = (form.get("next") or ["/dashboard"])[0]
        target = target if target.startswith("/dashboard") else "/dashboard"
        try:
            csrf.check(request, form)
        except csrf.CsrfRefused as exc:  # signed in by another site's page: nothing is set
            return _page(request, "login.html", {"next": target, "principal": None,
                                                 "message": f"Not signed in: {exc}. Sign in again from this page."},
                         403)
        verifier: TokenVerifier = request.app.state.token_verifier
        try:
            verifier.verify(token)
        except jwt.PyJWTError as exc:
            return _page(request, "login.html", {"next": target, "principal": None,
                                                 "message": f"That token was not accepted: {exc}."}, 401)
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict", path=COOKIE_PATH,
                            secure=request.url.scheme == "https")
        return response

    @router.post("/dashboard/logout")
    async def logout(request: Request) -> Response:
        body = await request.body()
        if len(body) > LOGIN_BODY_BYTES_MAX:
            raise Problem(413, "Payload too large", "The sign-out form is too large.")
        try:
            csrf.check(request, parse_qs(body.decode(errors="replace")))
        except csrf.CsrfRefused as exc:  # signed out by another site's page: the cookie stays
            return _page(request, "error.html", {"principal": _principal(request), "title": "Forbidden",
                                                 "detail": f"Not signed out: {exc}."}, 403)
        response = RedirectResponse("/dashboard/login", status_code=303)
        response.delete_cookie(COOKIE, path=COOKIE_PATH)
        return response

    @router.get("/dashboard")
    async def home(request: Request) -> Response:
        principal = _principal(request)
        if principal is None:
            return _to_login(request)
        if principal.tenant:
            return RedirectResponse(f"/dashboard/accounts/{quote(principal.tenant)}", status_code=303)
        if principal.role in (Role.ADMIN, Role.FINANCE):
            return RedirectResponse("/dashboard/finance", status_code=303)
        return _forbidden(request, principal, "This token sees no tenant: use a tenant's token or a finance one.")

    @router.get("/dashboard/accounts/{tenant}", response_class=HTMLResponse)
    async def account_page(request: Request, tenant: str, year: Filter = None, month: Filter = None,
                           meter: str | None = None, type: str | None = None,
                           cursor: str | None = None) -> Response:
        principal = _principal(request)
        if principal is None:
            return _to_login(request)
        if not principal.can_see(tenant):
            return _forbidden(request, principal, "This token is scoped to another tenant.")
        try:
            chosen_year, chosen_month = _month_filter(year, month)
        except InvalidFilter as exc:
            return _invalid(request, principal, exc)
        now = utcnow()
        balance = await views.balance_view(db, tenant, now)
        if balance is None:
            return _page(request, "error.html", {"principal": principal, "title": "Not found",
                                                 "detail": f"No billing account for tenant {tenant}."}, 404)
        y, m = _period(chosen_year, chosen_month)
        start, end = month_range(y, m)
        days = _days(y, m)
        daily = await lists.figure_series(db, tenant=tenant, granularity="day", since=start, until=end)
        units = await views.load_units(db)
        month_figures = await lists.figure_series(db, tenant=tenant, granularity="month", since=start, until=end)
        chart_units = sorted({r["unit"] for r in daily}) or [balance["currency"]]
        meters = await catalog.meters(db)
        monthly, _ = await lists.monthly(db, tenant=tenant, year=y, month=m, meter=meter or None, limit=200)
        ai = await lists.ai(db, tenant=tenant, year=y, month=m, group_by=["model"])
        types = [type] if type else []
        transactions, next_cursor = await lists.transactions(db, tenant=tenant, types=types, cursor=cursor,
                                                             limit=TRANSACTIONS_SHOWN)
        grant_rows = [views.grant_view(g, units, now) for g in await balances.grants(db, tenant, status="open")]
        invoice_rows, _ = await lists.invoice_list(db, tenant=tenant, ledger_url=ledger_url, limit=INVOICES_SHOWN)
        return _page(request, "account.html", {
            "invoices": invoice_rows,
            "principal": principal, "tenant": tenant, "balance": balance, "year": y, "month": m,
            "years": _years(now), "meter": meter or "", "meters": sorted(set(meters) | {r["meter"] for r in monthly}),
            "charts": [charts.bar_chart(_chart_points(daily, days, u), unit=u, test_id=f"consumption-chart-{u}",
                                        title=f"Credit consumed per day, {y:04d}-{m:02d} ({u})") for u in chart_units],
            "month_figures": views.figure_cards(month_figures, units), "monthly": monthly, "ai": ai,
            "transactions": transactions,
            "next_cursor": next_cursor, "type": type or "", "types": history.TYPES, "grants": grant_rows,
        })

    @router.get("/dashboard/accounts/{tenant}/export/{name}.csv")
    async def account_export(request: Request, tenant: str, name: str, year: Filter = None, month: Filter = None,
                             meter: str | None = None, type: str | None = None) -> Response:
        """The page's lists as CSV, with the dashboard's cookie (the API itself takes the bearer header)."""
        principal = _principal(request)
        if principal is None:
            return _to_login(request)
        if not principal.can_see(tenant):
            return _forbidden(request, principal, "This token is scoped to another tenant.")
        try:
            chosen_year, chosen_month = _month_filter(year, month)
        except InvalidFilter as exc:
            return _invalid(request, principal, exc)
        if name == "usage-monthly":
            async def monthly_page(c: str | None, n: int) -> lists.Page:
                return await lists.monthly(db, tenant=tenant, year=chosen_year, month=chosen_month,
                                           meter=meter or None, cursor=c, limit=n)
            return await csv_response(MONTHLY_COLUMNS, monthly_page, f"usage-monthly-{tenant}")
        if name == "transactions":
            async def transaction_page(c: str | None, n: int) -> lists.Page:
                return await lists.transactions(db, tenant=tenant, types=[type] if type else [], cursor=c, limit=n)
            return await csv_response(TRANSACTION_COLUMNS, transaction_page, f"transactions-{tenant}")
        if name == "invoices":
            async def invoice_page(c: str | None, n: int) -> lists.Page:
                return await lists.invoice_list(db, tenant=tenant, ledger_url=ledger_url, cursor=c, limit=n)
            return await csv_response(INVOICE_COLUMNS, invoice_page, f"invoices-{tenant}")
        return _page(request, "error.html", {"principal": principal, "title": "Not found",
                                             "detail": f"No export named {name}."}, 404)

    @router.get("/dashboard/accounts/{tenant}/invoices/{invoice_id:uuid}.pdf")
    async def invoice_pdf(request: Request, tenant: str, invoice_id: UUID) -> Response:
        """The ledger's PDF, fetched with the dashboard's token (a browser link cannot send the bearer header)."""
        principal = _principal(request)
        if principal is None:
            return _to_login(request)
        if not principal.can_see(tenant):
            return _forbidden(request, principal, "This token is scoped to another tenant.")
        source = (ledger_url or _own_origin(request)) + views.invoice_pdf_url("", tenant, str(invoice_id))
        try:
            async with httpx.AsyncClient(timeout=PDF_FETCH_SECONDS_MAX) as client:
                found = await client.get(source, headers={"Authorization": f"Bearer {_token(request)}"})
        except httpx.HTTPError as exc:
            return _page(request, "error.html", {"principal": principal, "title": "Unavailable",
                                                 "detail": f"The invoice PDF could not be fetched: {exc}."}, 502)
        if found.status_code != 200:
            return _page(request, "error.html", {"principal": principal, "title": "Not found",
                                                 "detail": f"No PDF for invoice {invoice_id}."}, 404)
        return Response(found.content, media_type="application/pdf", headers={
            "Content-Disposition": found.headers.get("content-disposition", f'inline; filename="{invoice_id}.pdf"')})

    @router.get("/dashboard/finance", response_class=HTMLResponse)
    async def finance_page(request: Request, year: Filter = None, month: Filter = None,
                           tenant: str | None = None) -> Response:
        principal = _principal(request)
        if principal is None:
            return _to_login(request)
        if principal.role not in (Role.ADMIN, Role.FINANCE):
            return _forbidden(request, principal, "The finance dashboard needs the admin or finance role.")
        if tenant and not principal.can_see(tenant):
            return _forbidden(request, principal, "This token is scoped to another tenant.")
        try:
            chosen_year, chosen_month = _month_filter(year, month)
        except InvalidFilter as exc:
            return _invalid(request, principal, exc)
        scope = tenant or principal.tenant
        now = utcnow()
        y, m = _period(chosen_year, chosen_month)
        start, end = month_range(y, m)
        daily = await lists.figure_series(db, tenant=scope, granularity="day", since=start, until=end)
        month_figures = views.figure_cards(
            await lists.figure_series(db, tenant=scope, granularity="month", since=start, until=end),
            await views.load_units(db))
        accounts = [a for a in await lists.accounts(db, now) if principal.can_see(a["tenant"])]
        monthly, _ = await lists.monthly(db, tenant=scope, year=y, month=m, meter=None, limit=500)
        chargeback = await lists.chargeback(db, year=y, month=m, tenant=scope)
        ai = await lists.ai(db, tenant=scope, year=y, month=m, group_by=["model"])
        chart_units = sorted({r["unit"] for r in daily}) or ["USD"]
        recurring = await lists.mrr(db, tenant=scope)
        # The ANALYTICS_MONTHS_SHOWN months up to the page's month (this month at the latest: later ones have none).
        last = min((y, m), (now.year, now.month))
        analytics_months = lists.analytics_months(None, f"{last[0]:04d}-{last[1]:02d}", now)
        analytics = await lists.analytics(db, tenant=scope, months=analytics_months, now=now)
        invoice_rows, _ = await lists.invoice_list(db, tenant=scope, ledger_url=ledger_url,
                                                   period=f"{y:04d}-{m:02d}", limit=INVOICES_SHOWN)
        revenue = None  # a month not begun has no figures (the report refuses it)
        if (y, m) <= (now.year, now.month):
            chosen = lists.revenue_period(f"{y:04d}-{m:02d}", None, now)
            per_unit, per_tenant = await lists.revenue_lines(db, tenant=scope, period=chosen)
            revenue = {"period": chosen.label, "start": chosen.start, "end": chosen.end, "complete": chosen.complete,
                       "lines": per_unit, "tenants": per_tenant, "rows": views.REVENUE_ROWS}
        return _page(request, "finance.html", {
            "revenue": revenue,
            "mrr": recurring, "invoices": invoice_rows, "analytics": analytics, "analytics_months": analytics_months,
            "principal": principal, "year": y, "month": m, "years": _years(now), "tenant": scope or "",
            "tenants": [a["tenant"] for a in accounts], "month_figures": month_figures, "accounts": accounts,
            "monthly": monthly, "chargeback": chargeback, "ai": ai,
            "charts": [charts.bar_chart(_chart_points(daily, _days(y, m), u), unit=u, test_id=f"consumption-chart-{u}",
                                        title=f"Credit consumed per day, {y:04d}-{m:02d} ({u})") for u in chart_units],
        })

    return router



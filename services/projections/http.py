"""HTTP surface of the projections service: the query API, the finance reports and the dashboard.

Everything here reads only the read models.
"""

from __future__ import annotations

from billing_projections import api_accounts, api_reports, dashboard
from billing_projections.balance_cache import BalanceCache
from billing_runtime.db import Database
from fastapi import APIRouter


def build_routers(db: Database, ledger_url: str = "", *, lean_balance: bool = True,
                  balance_cache: BalanceCache | None = None) -> list[APIRouter]:
    """``ledger_url``: base URL of the ledger's API, for links to invoice PDFs ("" = this same origin).
    ``lean_balance=False``: the balance served by its FastAPI route (api_balance.py), the reference in tests.
    ``balance_cache``: the API's copy of balance states (balance_cache.py; PostgreSQL)."""
    return [api_accounts.build_router(db, ledger_url, lean_balance=lean_balance, balance_cache=balance_cache), api_reports.build_router(db, ledger_url),
            dashboard.build_router(db, ledger_url)]

"""The dashboard's pages (server-rendered): login with a token, scoping, and the API's numbers on the page."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

import httpx
import pytest
from billing_projections import history
from billing_projections.http import build_routers
from billing_projections.service import ProjectionService
from billing_runtime.http import create_app

from tests.unit.projections.conftest import apply
from tests.unit.projections.ledger_events import Ledger, full_scenario, simple_account
from tests.unit.projections.test_api import SETTINGS, auth
from tests.unit.projections.test_credit_package_figures import credit_packages
from tests.unit.projections.test_subscription_invoice_figures import PAID_AT, gateway_refund, subscribed


@pytest.fixture
async def client(service: ProjectionService) -> AsyncIterator[httpx.AsyncClient]:
    ledger = Ledger()
    full_scenario(ledger, "acme")
    simple_account(ledger, "globex", debits=10)
    await apply(service, ledger.records())
    async with serving(service) as c:
        yield c


@asynccontextmanager
async def serving(service: ProjectionService) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app("projections", SETTINGS)
    for router in build_routers(service.db):
        app.include_router(router)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        yield c


def cards_of(html: str, unit: str) -> dict[str, tuple[str, str, str]]:
    """The figure cards of ``unit``: key -> (label, what is shown, data-exact)."""
    assert f'data-testid="finance-cards-{unit}"' in html, f"no cards for {unit}"
    return {key: (label, shown, exact) for label, key, exact, shown in re.findall(
        rf'<div class="label">([^<]*)</div>\s*<div class="value"><span data-testid="figure-(\w+)-{unit}" '
        rf'data-exact="([^"]*)"[^>]*>([^<]*)<', html)}


def text_of(html: str, name: str) -> str:
    found = re.search(rf'data-testid="{re.escape(name)}"[^>]*>([^<]*)<', html)
    assert found, f"{name} not on the page"
    return found.group(1).strip()


FORM = {"content-type": "application/x-www-form-urlencoded"}


async def form_token(client: httpx.AsyncClient) -> str:
    """The CSRF token of the login page's form (the page sets the same value in the browser's cookie)."""
    page = await client.get("/dashboard/login")
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found and client.cookies.get("billing_csrf") == found.group(1)
    return found.group(1)


async def test_login_sets_a_cookie_and_lands_on_the_tenants_page(client: httpx.AsyncClient) -> None:
    assert (await client.get("/dashboard")).headers["location"].startswith("/dashboard/login")
    token = auth("viewer", "acme")["Authorization"].split()[1]
    csrf = await form_token(client)
    bad = await client.post("/dashboard/login", content=f"token=nope&csrf={csrf}", headers=FORM)
    assert bad.status_code == 401 and "not accepted" in bad.text
    r = await client.post("/dashboard/login", content=f"token={token}&next=/dashboard&csrf={csrf}", headers=FORM)
    assert r.status_code == 303 and "httponly" in r.headers["set-cookie"].lower()
    home = await client.get("/dashboard")
    assert home.headers["location"] == "/dashboard/accounts/acme"
    page = await client.get("/dashboard/accounts/acme?year=2026&month=11")
    assert page.status_code == 200
    balance = (await client.get("/v1/accounts/acme/balance", headers=auth("viewer", "acme"))).json()
    usd = next(w for w in balance["wallets"] if w["unit"] == "USD")
    assert text_of(page.text, "available-USD") == usd["available"]
    assert text_of(page.text, "low-balance-USD").startswith("Low balance")
    assert 'data-testid="consumption-chart-USD"' in page.text
    # The card shows money at the currency's minor digits; the API (and the card's data-exact) keeps it exact.
    assert text_of(page.text, "figure-consumed-USD") == "101.00"
    assert 'data-exact="101.000003"' in page.text
    assert (await client.get("/dashboard/accounts/globex")).status_code == 403
    assert (await client.get("/dashboard/finance")).status_code == 403


async def test_finance_page_filters_by_organisation(client: httpx.AsyncClient) -> None:
    headers = auth("finance")
    everyone = await client.get("/dashboard/finance?year=2026&month=10", headers=headers)
    assert everyone.status_code == 200
    assert {m for m in re.findall(r'data-testid="chargeback-row" data-tenant="([^"]+)"', everyone.text)} == {
        "acme", "globex"}
    one = await client.get("/dashboard/finance?year=2026&month=10&tenant=globex", headers=headers)
    assert set(re.findall(r'data-testid="chargeback-row" data-tenant="([^"]+)"', one.text)) == {"globex"}
    api = (await client.get("/v1/reports/figures?year=2026&month=10&tenant=globex", headers=headers)).json()
    assert text_of(one.text, "figure-consumed-USD") == api["items"][0]["consumed"]


async def test_transaction_types_are_named_in_words_and_filter_by_their_key(client: httpx.AsyncClient) -> None:
    assert set(history.TYPE_LABELS) == set(history.TYPES), "every transaction type has a name on the dashboard"
    headers = auth("viewer", "acme")
    page = await client.get("/dashboard/accounts/acme?year=2026&month=11&type=usage", headers=headers)
    assert page.status_code == 200
    assert '<option value="hold_captured" >Hold captured</option>' in page.text
    assert '<option value="usage" selected>Usage</option>' in page.text
    shown = re.findall(r'data-type="([^"]+)">\s*<td[^>]*>[^<]*</td><td data-testid="transaction-type">([^<]*)<',
                       page.text)
    assert shown and all(key == "usage" and name == "Usage" for key, name in shown)


async def test_the_pages_show_credit_notes_apart_from_refunds(service: ProjectionService) -> None:
    """A downgrade's credit note (62.19 of account credit) and a gateway refund (11.90 paid back) in November: the
    account and finance pages show each on its own card, as the API and its CSV do."""
    ledger = Ledger()
    invoice = subscribed(ledger)
    ledger.command("subscription.change", "acme", at=PAID_AT + timedelta(days=1), key="m", quantity=1)
    gateway_refund(ledger, invoice, "11.90", "re_1")
    await apply(service, ledger.records())
    async with serving(service) as client:
        account = await client.get("/dashboard/accounts/acme?year=2026&month=11", headers=auth("viewer", "acme"))
        finance = await client.get("/dashboard/finance?year=2026&month=11", headers=auth("finance"))
        api = (await client.get("/v1/accounts/acme/figures?granularity=month&year=2026&month=11",
                                headers=auth("viewer", "acme"))).json()
        exported = await client.get("/v1/reports/figures?year=2026&month=11&format=csv", headers=auth("finance"))
    for page in (account, finance):
        assert page.status_code == 200
        assert (text_of(page.text, "figure-credit_notes-USD"), text_of(page.text, "figure-refunds-USD")) == (
            "62.19", "11.90")
        assert "Credit notes (account credit)" in page.text
    [usd] = api["items"]
    assert (usd["credit_notes"], usd["credit_note_tax"], usd["refunds"], usd["tax_refunded"]) == (
        "62.19", "9.93", "11.90", "1.90")
    [row] = list(csv.DictReader(io.StringIO(exported.text)))
    assert (row["credit_notes"], row["credit_note_tax"], row["refunds"], row["tax_refunded"]) == (
        "62.19", "9.93", "11.90", "1.90")


async def test_the_transactions_table_shows_each_rows_reference(service: ProjectionService) -> None:
    """The invoice a subscription's bill and payment belong to, and the refund's id, are on the account page (the
    rows' ``reference``, as the API and the CSV give it), not only in a rounding row's detail."""
    ledger = Ledger()
    invoice = subscribed(ledger)
    gateway_refund(ledger, invoice, "11.90", "re_1")
    await apply(service, ledger.records())
    async with serving(service) as client:
        headers = auth("viewer", "acme")
        page = await client.get("/dashboard/accounts/acme?year=2026&month=11", headers=headers)
        api = (await client.get("/v1/accounts/acme/transactions", headers=headers)).json()["items"]
        exported = await client.get("/dashboard/accounts/acme/export/transactions.csv", headers=headers)
    assert page.status_code == 200
    shown = dict(re.findall(r'data-position="(\d+)"[^>]*>(?:(?!</tr>).)*?data-testid="transaction-reference">([^<]*)<',
                            page.text, re.DOTALL))
    assert shown == {str(t["position"]): t["reference"] or "" for t in api}
    by_type = {t["type"]: t["reference"] for t in api}
    assert by_type["invoice_billed"] == by_type["invoice_paid"] == invoice
    assert invoice in shown.values()
    assert {r["position"]: r["reference"] for r in csv.DictReader(io.StringIO(exported.text))} == {
        str(t["position"]): t["reference"] or "" for t in api}


async def test_money_cards_show_minor_units_and_credit_cards_are_labelled_credits(service: ProjectionService) -> None:
    """Two packages of 10,000 + 1,000 CREDIT bought for 113.05 USD each, and usage of 8.186886363 USD: the USD cards
    show 226.10 taken in and 8.19 consumed (the API's exact figures beside them); the CREDIT row shows the credit
    bought as credits, and no "Funds taken in" (its clearing posting in CREDIT is not money)."""
    ledger = Ledger()
    credit_packages(ledger)
    ledger.command("usage.debit", "acme", unit="USD", amount_subunits=8_186_886_363, meter="api_calls")
    await apply(service, ledger.records())
    async with serving(service) as client:
        account = await client.get("/dashboard/accounts/acme?year=2026&month=10", headers=auth("viewer", "acme"))
        finance = await client.get("/dashboard/finance?year=2026&month=10", headers=auth("finance"))
        api = (await client.get("/v1/accounts/acme/figures?granularity=month&year=2026&month=10",
                                headers=auth("viewer", "acme"))).json()
    figures = {f["unit"]: f for f in api["items"]}
    assert (figures["USD"]["consumed"], figures["USD"]["funds_in"]) == ("8.186886363", "226.10")  # the API: exact
    for page in (account, finance):
        assert page.status_code == 200
        usd, credit = cards_of(page.text, "USD"), cards_of(page.text, "CREDIT")
        assert usd["funds_in"] == ("Funds taken in", "226.10", "226.10")
        assert usd["consumed"] == ("Credit consumed", "8.19", "8.186886363")
        assert usd["tax_collected"][1] == "36.10"
        assert "funds_in" not in credit and "tax_collected" not in credit and "refunds" not in credit
        assert credit["top_ups"] == ("Credits bought", "22000", "22000")
        assert all("credit" in label.lower() for label, _, _ in credit.values()), credit

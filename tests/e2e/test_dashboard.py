"""The dashboard in a real headless Chromium (Debian's chromium driven by Playwright), on the embedded run.

The page loads behind the token login, its numbers are the API's numbers, and the filters work.
Screenshots go to tests/e2e/artifacts/ (not committed).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fake_http_api import Request, serve
from tests.support import ServiceProcess, auth, free_port, token, wait_until

pytestmark = pytest.mark.e2e
ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM = os.environ.get("BILLING_CHROMIUM", "/usr/bin/chromium")
RAZORPAY_WEBHOOK_SECRET = "rzp_dashboard_webhook_secret"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def _razorpay(request: Request) -> tuple[int, object]:
    """Razorpay's API (a local fake) for acme's captured payment of 50.00 USD and its lost dispute."""
    objects = {
        "/v1/payments/pay_D1": {"id": "pay_D1", "entity": "payment", "amount": 5000, "currency": "USD",
                                "status": "captured", "notes": {"tenant": "acme", "order_id": "order-d1"}},
        "/v1/disputes/disp_D1": {"id": "disp_D1", "entity": "dispute", "payment_id": "pay_D1", "amount": 5000,
                                 "currency": "USD", "amount_deducted": 5000, "reason_code": "chargeback",
                                 "status": "lost", "phase": "chargeback", "created_at": int(time.time()),
                                 "respond_by": int(time.time()) + 86400}}
    found = objects.get(request.path)
    return (200, found) if found else (404, {"error": {}})


def _razorpay_webhook(base: str, name: str, entity: str, entity_id: str) -> None:
    body = json.dumps({"entity": "event", "account_id": "acc_1", "event": name, "contains": [entity],
                       "payload": {entity: {"entity": {"id": entity_id, "entity": entity}}},
                       "created_at": int(time.time())}).encode()
    signature = hmac.new(RAZORPAY_WEBHOOK_SECRET.encode(), body, hashlib.sha256).hexdigest()
    r = httpx.post(f"{base}/v1/webhooks/razorpay", content=body, timeout=10, headers={
        "X-Razorpay-Signature": signature, "X-Razorpay-Event-Id": f"evt_{name}", "Content-Type": "application/json"})
    assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`billing run` with the demo catalogue (tenant acme, 100.00 USD), fed a little usage, a Razorpay payment of
    50.00 and its lost dispute (a chargeback of 50.00) through the webhook route, Razorpay's API a local fake."""
    tmp = tmp_path_factory.mktemp("dashboard")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with serve(_razorpay) as razorpay:
        env = {"BILLING_DATA_DIR": str(tmp / "var"), "BILLING_PORT": str(port), "KAFKA_BOOTSTRAP_SERVERS": "",
               "DATABASE_URL": "", "BILLING_RAZORPAY_KEY_ID": "rzp_key", "BILLING_RAZORPAY_KEY_SECRET": "rzp_secret",
               "BILLING_RAZORPAY_WEBHOOK_SECRET": RAZORPAY_WEBHOOK_SECRET, "BILLING_RAZORPAY_API_BASE": razorpay.base}
        yield from _embedded(base, env, tmp)


def _embedded(base: str, env: dict[str, str], tmp: Path) -> Iterator[str]:
    run = ServiceProcess(["run"], env, tmp / "run.log", int(base.rsplit(":", 1)[1])).start()
    try:
        wait_until(lambda: _balance(base) == "100.00", what="the demo grant")
        now = datetime.now(UTC).isoformat()
        events = [
            {"id": "calls-1", "tenant": "acme", "meter": "api_calls", "quantity": "23", "timestamp": now,
             "properties": {"user": "ann"}},
            {"id": "calls-2", "tenant": "acme", "meter": "api_calls", "quantity": "7", "timestamp": now},
            {"id": "ai-1", "tenant": "acme", "meter": "ai_tokens", "quantity": "12000", "timestamp": now,
             "properties": {"model": "gpt-4o", "operation": "chat", "user": "ann", "input_tokens": 10000,
                            "output_tokens": 2000}},
            {"id": "ai-2", "tenant": "acme", "meter": "ai_tokens", "quantity": "150000", "timestamp": now,
             "properties": {"model": "gpt-4o-mini", "operation": "summarise", "user": "bob",
                            "input_tokens": 100000, "output_tokens": 50000}},
            # 0.00000015 USD: below the cent, so the exact figures (API, balance) differ from the cards' cents.
            {"id": "ai-3", "tenant": "acme", "meter": "ai_tokens", "quantity": "1", "timestamp": now,
             "properties": {"model": "gpt-4o-mini", "operation": "chat", "user": "bob", "input_tokens": 1}},
        ]
        r = httpx.post(f"{base}/v1/usage", json={"events": events}, headers=auth("service"), timeout=10)
        assert [x["status"] for x in r.json()["results"]] == ["accepted"] * 5, r.text
        wait_until(lambda: _balance(base) == "93.90999985",
                   what="the debits (30 x 0.20 + 0.045 + 0.045 + 0.00000015)")
        # A subscription to the demo plan (29.00 a month): its first invoice is finalized at once.
        created = httpx.post(f"{base}/v1/accounts/acme/subscriptions", headers=auth("admin"), timeout=30,
                             json={"key": "main", "plan": "starter", "quantity": 1, "trial": False})
        assert created.status_code == 201, created.text
        wait_until(lambda: _invoices(base), what="the first invoice in the read model")
        _razorpay_webhook(base, "payment.captured", "payment", "pay_D1")
        wait_until(lambda: _balance(base) == "143.90999985", what="the 50.00 paid through Razorpay")
        _razorpay_webhook(base, "payment.dispute.lost", "dispute", "disp_D1")
        wait_until(lambda: _balance(base) == "93.90999985", what="the chargeback of those 50.00")
        yield base
    finally:
        run.stop(signal.SIGINT)


def _invoices(base: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{base}/v1/accounts/acme/invoices", headers=auth("viewer", "acme"), timeout=5)
    return [i for i in r.json()["items"] if i["status"] == "finalized"] if r.status_code == 200 else []


def _balance(base: str) -> str | None:
    r = httpx.get(f"{base}/v1/accounts/acme/balance", headers=auth("viewer", "acme"), timeout=5)
    if r.status_code == 404:
        return None
    return str(next(w for w in r.json()["wallets"] if w["unit"] == "USD")["available"])


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        pytest.fail(f"Chromium not found at {CHROMIUM}: run `bash deploy/local/browser.sh` (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def _sign_in(browser: Any, base: str, bearer: str) -> Any:
    page = browser.new_context(viewport={"width": 1280, "height": 1600}).new_page()
    page.goto(f"{base}/dashboard")
    assert "/dashboard/login" in page.url
    page.fill("[data-testid=token-input]", bearer)
    _submit(page, "sign-in")
    return page


def _submit(page: Any, button: str) -> None:
    with page.expect_navigation():
        page.click(f"[data-testid={button}]")


def _api(base: str, path: str, headers: dict[str, str], **params: object) -> Any:
    r = httpx.get(f"{base}{path}", headers=headers, params=params, timeout=10)  # type: ignore[arg-type]
    r.raise_for_status()
    return r.json()


def test_tenant_dashboard_matches_the_api_and_filters(embedded: str, browser: Any) -> None:
    base, viewer = embedded, auth("viewer", "acme")
    page = _sign_in(browser, base, token("viewer", "acme"))
    assert page.url.endswith("/dashboard/accounts/acme")
    page.screenshot(path=str(ARTIFACTS / "dashboard-account.png"), full_page=True)
    export = page.request.get(f"{base}/dashboard/accounts/acme/export/transactions.csv")  # with the cookie
    assert export.ok and export.headers["content-type"].startswith("text/csv")
    assert export.text().count("\r\nusage,") + export.text().count(",usage,") >= 4

    balance = _api(base, "/v1/accounts/acme/balance", viewer)
    usd = next(w for w in balance["wallets"] if w["unit"] == "USD")
    assert page.inner_text("[data-testid=available-USD]") == usd["available"] == "93.90999985"  # a balance: exact
    assert page.inner_text("[data-testid=held-USD]") == usd["held"]
    assert page.locator("[data-testid=consumption-chart-USD] rect.bar").count() >= 28  # one bar per day

    now = datetime.now(UTC)
    monthly = _api(base, "/v1/accounts/acme/usage/monthly", viewer, year=now.year, month=now.month)["items"]
    rows = page.locator("[data-testid=monthly-row]")
    assert rows.count() == len(monthly) == 2
    shown = {rows.nth(i).get_attribute("data-meter"): rows.nth(i).locator("[data-testid=monthly-cost]").inner_text()
             for i in range(rows.count())}
    assert shown == {m["meter"]: m["cost"] for m in monthly}

    ai = _api(base, "/v1/accounts/acme/usage/ai", viewer, year=now.year, month=now.month)["items"]
    ai_rows = page.locator("[data-testid=ai-row]")
    assert {ai_rows.nth(i).get_attribute("data-model"): ai_rows.nth(i).locator("[data-testid=ai-cost]").inner_text()
            for i in range(ai_rows.count())} == {a["model"]: a["cost"] for a in ai}

    figures = _api(base, "/v1/accounts/acme/figures", viewer, granularity="month", year=now.year,
                   month=now.month)["items"]
    usd_figures = next(f for f in figures if f["unit"] == "USD")
    assert usd_figures["consumed"] == "6.09000015"  # the API: exact
    consumed = page.locator("[data-testid=figure-consumed-USD]")
    assert consumed.inner_text() == "6.09" and consumed.get_attribute("data-exact") == usd_figures["consumed"]

    # Invoices: the API's list, each with a PDF link that downloads the ledger's rendering with the cookie.
    invoices = _api(base, "/v1/accounts/acme/invoices", viewer)["items"]
    invoice_rows = page.locator("[data-testid=invoice-row]")
    assert invoice_rows.count() == len(invoices) >= 1
    assert [invoice_rows.nth(i).get_attribute("data-number") for i in range(invoice_rows.count())] == [
        i["number"] for i in invoices]
    assert invoice_rows.nth(0).locator("[data-testid=invoice-total]").inner_text() == invoices[0]["total"] == "29.00"
    href = invoice_rows.nth(0).locator("[data-testid=invoice-pdf]").get_attribute("href")
    assert href == f"/dashboard/accounts/acme/invoices/{invoices[0]['invoice_id']}.pdf"
    pdf = page.request.get(f"{base}{href}")
    assert pdf.ok and pdf.headers["content-type"] == "application/pdf" and pdf.body().startswith(b"%PDF")
    detail = _api(base, f"/v1/accounts/acme/invoices/{invoices[0]['invoice_id']}", viewer)
    assert detail["items"][0]["kind"] == "base_fee"
    assert detail["pdf_url"] == f"/v1/accounts/acme/invoices/{invoices[0]['invoice_id']}.pdf"  # same origin
    direct = httpx.get(f"{base}{detail['pdf_url']}", headers=viewer, timeout=30)  # the ledger's own route
    assert direct.status_code == 200 and direct.content.startswith(b"%PDF")

    transactions = _api(base, "/v1/accounts/acme/transactions", viewer, limit=20)["items"]
    tx_rows = page.locator("[data-testid=transaction-row]")
    assert [tx_rows.nth(i).get_attribute("data-position") for i in range(tx_rows.count())] == [
        str(t["position"]) for t in transactions]
    # Each row's reference (the invoice of an invoice's movements, a refund's or an adjustment's id), as the API's.
    assert [tx_rows.nth(i).locator("[data-testid=transaction-reference]").inner_text()
            for i in range(tx_rows.count())] == [t["reference"] or "" for t in transactions]

    # Filter the monthly summary to one usage type.
    page.select_option("[data-testid=filter-meter]", "ai_tokens")
    _submit(page, "apply-filters")
    assert "meter=ai_tokens" in page.url
    rows = page.locator("[data-testid=monthly-row]")
    assert [rows.nth(i).get_attribute("data-meter") for i in range(rows.count())] == ["ai_tokens"]
    page.screenshot(path=str(ARTIFACTS / "dashboard-account-filtered.png"), full_page=True)

    # A month without usage shows an empty summary; the transaction type filter keeps only that type.
    page.select_option("[data-testid=filter-year]", str(now.year - 1))
    _submit(page, "apply-filters")
    assert page.locator("[data-testid=monthly-empty]").count() == 1
    page.select_option("[data-testid=filter-type]", "usage")
    _submit(page, "apply-type")
    types = page.locator("[data-testid=transaction-row]")
    assert types.count() == 5 and {types.nth(i).get_attribute("data-type") for i in range(5)} == {"usage"}

    # Another tenant's page is refused.
    page.goto(f"{base}/dashboard/accounts/globex")
    assert page.inner_text("[data-testid=error-title]") == "Forbidden"

    # Signing out (a form with the page's CSRF token) clears the cookie.
    with page.expect_navigation():
        page.click("text=Sign out")
    assert "/dashboard/login" in page.url
    assert not [c for c in page.context.cookies() if c["name"] == "billing_token"]


def test_a_login_form_on_another_site_does_not_sign_the_browser_in(embedded: str, browser: Any) -> None:
    """Login CSRF: a page of another origin posts the attacker's token to the dashboard's login, going on to a page
    that does not sign out a visitor without a cookie (the login form). Before, the browser kept the attacker's
    token and was signed in as the attacker from then on; now it gets the refusal (403) and no dashboard cookie."""
    attacker = token("viewer", "acme")
    html = f"""<!doctype html><form id="f" method="post" action="{embedded}/dashboard/login">
<input name="token" value="{attacker}"><input name="next" value="/dashboard/login"></form>
<script>document.getElementById("f").submit()</script>""".encode()

    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(html)))
            self.end_headers()
            self.wfile.write(html)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        context = browser.new_context()
        page = context.new_page()
        page.goto(f"http://localhost:{server.server_address[1]}/")  # another site than 127.0.0.1
        page.wait_for_url(f"{embedded}/dashboard/**")
        page.wait_for_load_state()
        assert not [c for c in context.cookies() if c["name"] == "billing_token"]
        assert "Not signed in" in page.content()
        page.goto(f"{embedded}/dashboard")
        assert "/dashboard/login" in page.url
        context.close()
    finally:
        server.shutdown()
        server.server_close()


def test_finance_dashboard_cards_and_organisation_filter(embedded: str, browser: Any) -> None:
    base, finance = embedded, auth("finance")
    page = _sign_in(browser, base, token("finance"))
    assert page.url.endswith("/dashboard/finance")
    now = datetime.now(UTC)
    figures = _api(base, "/v1/reports/figures", finance, year=now.year, month=now.month)["items"]
    usd = next(f for f in figures if f["unit"] == "USD")
    # Money cards: the API's figures at the currency's minor digits (the exact one in data-exact).
    for key in ("funds_in", "top_ups", "consumed", "tax_collected", "refunds", "credit_notes", "breakage",
                "chargebacks"):
        card = page.locator(f"[data-testid=figure-{key}-USD]")
        assert card.get_attribute("data-exact") == usd[key], key
        assert card.inner_text() == str(Decimal(usd[key]).quantize(Decimal("0.01"), ROUND_HALF_UP)), key
    assert (usd["consumed"], page.inner_text("[data-testid=figure-consumed-USD]")) == ("6.09000015", "6.09")
    assert (usd["chargebacks"], usd["refunds"]) == ("50.00", "0.00")  # the lost dispute, not a refund
    # The plan's 1000 CREDIT: credit, never money. Its row has no funds, tax or refund cards; its cards say credits.
    credit = next(f for f in figures if f["unit"] == "CREDIT")
    cards = page.locator("[data-testid=finance-cards-CREDIT]")
    assert cards.get_attribute("data-kind") == "credit"
    assert page.locator("[data-testid=figure-funds_in-CREDIT]").count() == 0
    assert page.locator("[data-testid=figure-tax_collected-CREDIT]").count() == 0
    assert page.inner_text("[data-testid=figure-plan_grants-CREDIT]") == credit["plan_grants"] == "1000.00"
    labels = cards.text_content()
    assert "Funds taken in" not in labels and "Credits granted by plans" in labels
    mrr = _api(base, "/v1/reports/mrr", finance)["items"]
    assert [(m["currency"], m["mrr"]) for m in mrr] == [("USD", "29.00")]
    assert page.inner_text("[data-testid=mrr-USD]") == mrr[0]["mrr"]
    assert page.inner_text("[data-testid=arr-USD]") == mrr[0]["arr"] == "348.00"
    # Subscription analytics: the API's months (the 12 up to this one), row for row, figure for figure.
    analytics = _api(base, "/v1/reports/subscriptions/analytics", finance)
    this_month = f"{now.year:04d}-{now.month:02d}"
    assert analytics["months"][-1] == this_month
    current = next(r for r in analytics["items"] if (r["month"], r["currency"]) == (this_month, "USD"))
    assert (current["accounts_new"], current["mrr_new"], current["mrr_end"], current["complete"]) == (
        1, "29.00", mrr[0]["mrr"], False)  # the subscription started this month; its end is MRR now
    rows = page.locator("[data-testid=analytics-row]")
    assert rows.count() == len(analytics["items"]) >= 1
    for i, item in enumerate(analytics["items"]):
        row = rows.nth(i)
        assert (row.get_attribute("data-month"), row.get_attribute("data-currency")) == (item["month"], item["currency"])
        for key in ("mrr_start", "mrr_new", "mrr_expansion", "mrr_contraction", "mrr_churned", "mrr_end",
                    "accounts_start", "accounts_new", "accounts_churned", "accounts_end"):
            assert row.locator(f"[data-testid=analytics-{key}]").inner_text() == str(item[key]), key
        for key in ("logo_churn_rate", "revenue_churn_rate", "net_revenue_retention"):
            assert row.locator(f"[data-testid=analytics-{key}]").get_attribute("data-ratio") == (item[key] or ""), key
    issued = page.locator("[data-testid=invoice-row]")
    assert issued.count() >= 1 and issued.nth(0).get_attribute("data-status") == "finalized"
    chargeback = page.locator("[data-testid=chargeback-row]")
    assert [chargeback.nth(i).get_attribute("data-tenant") for i in range(chargeback.count())] == ["acme"]
    page.screenshot(path=str(ARTIFACTS / "dashboard-finance.png"), full_page=True)

    # Revenue and deferred revenue this month: the API's report, figure for figure, unit for unit.
    revenue = _api(base, "/v1/reports/revenue", finance)
    assert revenue["period"] == this_month and revenue["complete"] is False
    lines = {r["unit"]: r for r in revenue["items"]}
    units = page.locator("[data-testid=revenue-unit]")
    assert [units.nth(i).inner_text() for i in range(units.count())] == list(lines) == ["CREDIT", "USD"]
    for unit, line in lines.items():
        for key in line:
            if key not in ("tenant", "period", "unit", "kind"):
                assert page.inner_text(f"[data-testid=revenue-{key}-{unit}]") == line[key], (unit, key)
    usd_revenue = lines["USD"]
    # The demo's 100.00 promotion, the 50.00 paid through Razorpay and lost to its dispute, the plan's 29.00 fee billed
    # in advance, the usage drawn from the credit; the plan's 1000 CREDIT are credit, in the CREDIT column.
    assert (usd_revenue["promotional"], usd_revenue["credit_sold"], usd_revenue["chargebacks"], usd_revenue["fees_billed"],
            usd_revenue["recognised_usage"]) == ("100.00", "50.00", "50.00", "29.00", "6.09000015")
    assert lines["CREDIT"]["plan_grants"] == "1000.00" and lines["CREDIT"]["kind"] == "credit"
    ins = sum(Decimal(usd_revenue[k]) for k in ("credit_sold", "plan_grants", "promotional", "fees_billed",
                                                "credit_notes", "adjustments", "other"))
    outs = sum(Decimal(usd_revenue[k]) for k in ("recognised_usage", "recognised_fees", "breakage", "refunds",
                                                 "chargebacks", "overage_repaid"))
    assert Decimal(usd_revenue["closing_deferred"]) == Decimal(usd_revenue["opening_deferred"]) + ins - outs
    tenant_rows = page.locator("[data-testid=revenue-tenant-row]")
    assert [(tenant_rows.nth(i).get_attribute("data-tenant"), tenant_rows.nth(i).get_attribute("data-unit"))
            for i in range(tenant_rows.count())] == [("acme", "CREDIT"), ("acme", "USD")]
    usd_row = page.locator("[data-testid=revenue-tenant-row][data-unit=USD]")
    assert usd_row.locator("[data-testid=revenue-tenant-recognised_revenue]").inner_text() == (
        usd_revenue["recognised_revenue"])

    page.select_option("[data-testid=filter-tenant]", "acme")
    _submit(page, "apply-filters")
    assert "tenant=acme" in page.url
    assert page.inner_text("[data-testid=figure-consumed-USD]") == "6.09"
    page.select_option("[data-testid=filter-month]", str(1 if now.month != 1 else 2))
    page.select_option("[data-testid=filter-year]", str(now.year - 1))
    _submit(page, "apply-filters")
    assert page.locator("[data-testid=finance-cards-empty]").count() == 1
    assert page.locator("[data-testid=revenue-none]").count() == 1  # nothing dated in that month

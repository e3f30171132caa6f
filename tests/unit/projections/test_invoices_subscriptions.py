"""Invoices, subscriptions and MRR, fed the ledger's real events (its own commands), against its aggregates."""

from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import AsyncIterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from billing_events.money import to_subunits
from billing_ledger.invoice_pdf import render_pdf
from billing_projections import invoices, subscriptions
from billing_projections.facts import utc_text
from billing_projections.http import build_routers
from billing_projections.params import encode_cursor
from billing_projections.service import ProjectionService
from billing_runtime.bus import Record
from billing_runtime.db import SqliteDatabase
from billing_runtime.http import create_app

from tests.unit.projections.conftest import apply, dump, dumps_by_batching
from tests.unit.projections.ledger_events import (
    NOV_1,
    SUBSCRIPTION_CATALOG,
    Ledger,
    by_partition,
    full_scenario,
    invoice_id_of,
    invoice_uuid,
    subscription_scenario,
)
from tests.unit.projections.test_api import SETTINGS, auth

LEDGER_URL = "http://ledger.test"


def _ids(records: list[Record], aggregate: str) -> list[str]:
    """Aggregate ids of ``aggregate`` in the order the ledger recorded their first event."""
    found: list[str] = []
    for record in records:
        event = json.loads(record.value)
        if event["type"].startswith(aggregate + ".") and event["aggregate_id"] not in found:
            found.append(event["aggregate_id"])
    return found


Scenario = tuple[Ledger, dict[str, Any], list[Record]]


@pytest.fixture
async def scenario(service: ProjectionService) -> Scenario:
    ledger = Ledger()
    keys = subscription_scenario(ledger)
    records = ledger.records()
    await apply(service, records)
    return ledger, keys, records


async def test_invoices_equal_the_ledgers_documents_line_for_line(service: ProjectionService,
                                                                   scenario: Scenario) -> None:
    ledger, keys, records = scenario
    ids = _ids(records, "Invoice")
    assert len(ids) == 9  # globex's immediate cancel: a credit note and its cut period's final draft (voided)
    for invoice_id in ids:
        document = ledger.get(invoice_id)
        row = await invoices.one(service.db, document.tenant, invoice_id)
        assert row is not None, invoice_id
        assert (row["number"], row["status"], row["document_type"], row["currency"]) == (
            document.number, document.status, document.document_type, document.currency)
        assert int(row["total"]) == to_subunits(document.total)
        assert row["period_start"] == (utc_text(document.period_start) if document.period_start else None)
        assert row["subscription_id"] == document.subscription_id
        lines = await invoices.lines(service.db, invoice_id)
        assert [(item["kind"], item["description"], int(item["amount"])) for item in lines] == [
            (item["kind"], item["description"], to_subunits(Decimal(item["amount"])))
            for item in document.lines]
        assert int(row["line_count"]) == len(document.lines)
        tax = sum(to_subunits(Decimal(i["amount"])) for i in document.lines if i["kind"] == "tax")
        assert int(row["tax"]) == tax and int(row["subtotal"]) + tax == int(row["total"])
    renewal = await invoices.one(service.db, "acme", keys["renewal_invoice"])
    assert renewal is not None
    assert (renewal["number"], renewal["status"], renewal["period"], renewal["line_count"]) == (
        "INV-2026-000004", "finalized", "2026-12", 3)  # base fee from the draft + usage and credits lines added
    first = await invoices.one(service.db, "acme", keys["first_invoice"])
    assert first is not None
    assert (first["status"], first["payment_reference"], first["issued_at"], first["due_at"]) == (
        "paid", "pi_team", "2026-11-01T00:00:00.000000Z", "2026-11-15T00:00:00.000000Z")


async def test_subscriptions_equal_the_ledgers_aggregates(service: ProjectionService,
                                                           scenario: Scenario) -> None:
    ledger, keys, records = scenario
    ids = _ids(records, "Subscription")
    assert len(ids) == 6
    rows = {r["subscription_id"]: r for r in await subscriptions.page(service.db, tenant=None, limit=100)}
    for subscription_id in ids:
        sub = ledger.get(subscription_id)
        row = rows[subscription_id]
        assert (row["tenant"], row["subscription_key"], row["status"], row["plan_code"], row["plan_version"],
                row["cadence"], row["quantity"]) == (sub.tenant, sub.key, sub.status, sub.plan["code"],
                                                     sub.plan["version"], sub.plan["cadence"], sub.quantity)
        assert (row["period_start"], row["period_end"]) == (utc_text(sub.period_start), utc_text(sub.period_end))
        assert row["trial_end"] == (utc_text(sub.trial_end) if sub.trial_end else None)
        assert bool(row["cancel_at_period_end"]) == sub.cancel_at_period_end
    assert {r["status"] for r in rows.values()} == {"active", "paused", "trialing", "canceled"}
    assert rows[keys["team"]]["period_start"] == "2026-12-01T00:00:00.000000Z"  # renewed


async def test_mrr_counts_billable_subscriptions_per_currency_exactly(service: ProjectionService,
                                                                      scenario: Scenario) -> None:
    # acme: team 30.00 x 1 monthly + ops 90.00 quarterly (30.00 a month); yearly is paused. globex: a trial and
    # a canceled one. initech: 3 x 100.00 EUR quarterly, set to cancel at period end, still billable.
    found = {(r["tenant"], r["currency"]): r for r in await subscriptions.mrr(service.db, tenant=None)}
    usd, eur = found[(None, "USD")], found[(None, "EUR")]
    assert (str(usd["mrr"]), str(usd["arr"]), usd["subscriptions"]) == ("60.00", "720.00", 2)
    assert (str(eur["mrr"]), eur["subscriptions"]) == ("100.00", 1)
    by_tenant = await subscriptions.mrr(service.db, tenant=None, by_tenant=True)
    assert [(r["tenant"], r["currency"], str(r["mrr"])) for r in by_tenant] == [("acme", "USD", "60.00"),
                                                                                ("initech", "EUR", "100.00")]
    assert await subscriptions.mrr(service.db, tenant="globex") == []


async def test_a_third_of_a_quarter_stays_exact_until_rounded_once(tmp_path: Path) -> None:
    ledger = Ledger()
    ledger.command("catalog.publish", None, document={"plans": [
        {"code": "q", "name": "Q", "currency": "USD", "base_fee": "100.00", "cadence": "quarter"}]}, digest="q")
    for i in range(3):
        ledger.command("account.open", f"t{i}", currency="USD")
        ledger.command("subscription.create", f"t{i}", key="q", plan="q", quantity=1)
    db = await SqliteDatabase(tmp_path / "mrr.sqlite").connect()
    service = ProjectionService(db)
    await service.setup()
    await apply(service, ledger.records())
    [usd] = await subscriptions.mrr(db, tenant=None)
    # 3 x 100/3 is 100.00 exactly: rounding each subscription first would give 3 x 33.33 = 99.99.
    assert (str(usd["mrr"]), str(usd["arr"])) == ("100.00", "1200.00")
    await db.close()


async def test_batch_boundaries_and_replays_change_no_row(tmp_path: Path) -> None:
    ledger = Ledger()
    full_scenario(ledger, "zeta")  # account movements interleaved with the documents
    subscription_scenario(ledger)
    records = ledger.records()
    # Everything again after the random slices: nothing changes.
    dumps = await dumps_by_batching(records, tmp_path, seed=11, size_max=7, replay_all=True)
    assert dumps[0] == dumps[1] == dumps[2]
    assert len(dumps[0]["invoices"]) == 9 and len(dumps[0]["subscriptions"]) == 6
    assert len(dumps[0]["invoice_lines"]) == 11


@pytest.fixture
async def client(service: ProjectionService, scenario: Scenario
                 ) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app("projections", SETTINGS)
    for router in build_routers(service.db, ledger_url=LEDGER_URL):
        app.include_router(router)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        yield c


async def test_invoice_list_filters_pages_and_csv(client: httpx.AsyncClient,
                                                   scenario: Scenario) -> None:
    viewer = auth("viewer", "acme")
    r = await client.get("/v1/accounts/acme/invoices", headers=viewer)
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    assert [i["number"] for i in items] == ["INV-2026-000004", "CN-2026-000001", "INV-2026-000003",
                                            "INV-2026-000002", "INV-2026-000001"]
    newest = items[0]
    assert (newest["total"], newest["currency"], newest["issue_date"], newest["due_date"], newest["lines"]) == (
        "30.00", "USD", "2026-12-01", "2026-12-15", 3)
    assert newest["pdf_url"] == f"{LEDGER_URL}/v1/accounts/acme/invoices/{newest['invoice_id']}.pdf"
    note = items[1]
    assert (note["document_type"], note["total"], note["status"]) == ("credit_note", "-15.00", "finalized")

    async def numbers(**params: Any) -> list[str]:
        found = await client.get("/v1/accounts/acme/invoices", headers=viewer, params=params)
        assert found.status_code == 200, found.text
        return [i["number"] for i in found.json()["items"]]

    assert await numbers(status="paid") == ["INV-2026-000002", "INV-2026-000001"]
    assert await numbers(type="credit_note") == ["CN-2026-000001"]
    assert await numbers(period="2026-12") == ["INV-2026-000004"]
    assert len(await numbers(period="2026")) == 5 and await numbers(period="2025") == []
    assert await numbers(status="finalized,paid", type="invoice", period="2026-11") == [
        "INV-2026-000003", "INV-2026-000002", "INV-2026-000001"]
    for bad in ({"status": "sent"}, {"type": "bill"}, {"period": "2026-13"}, {"period": "11-2026"}):
        assert (await client.get("/v1/accounts/acme/invoices", headers=viewer, params=bad)).status_code == 422

    pages, cursor = [], None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        body = (await client.get("/v1/accounts/acme/invoices", headers=viewer, params=params)).json()
        pages.append([i["number"] for i in body["items"]])
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert [n for page in pages for n in page] == [i["number"] for i in items] and len(pages) == 3

    exported = await client.get("/v1/accounts/acme/invoices", headers=viewer, params={"format": "csv"})
    assert exported.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert [(r["number"], r["total"]) for r in rows] == [(i["number"], i["total"]) for i in items]


@pytest.mark.parametrize("period", ["٢٠٢٦", "٢٠٢٦-١١", "２０２６-11", "2026-1１", "²⁰²⁶", "2026\n", "1969", "0000-01"])
async def test_an_invoice_period_in_other_digits_is_a_422_not_an_empty_list(client: httpx.AsyncClient,
                                                                            scenario: Scenario, period: str) -> None:
    """``str.isdigit`` took Arabic-Indic, full-width and superscript digits: the period matched no invoice and the
    list answered 200 with no items, as for a month without invoices."""
    for url, headers in (("/v1/accounts/acme/invoices", auth("viewer", "acme")),
                         ("/v1/reports/invoices", auth("finance"))):
        refused = await client.get(url, headers=headers, params={"period": period})
        assert (refused.status_code, refused.headers["content-type"]) == (422, "application/problem+json"), (
            url, refused.text)
        assert refused.json()["errors"] == [{"location": "query.period", "message": refused.json()["detail"]}]
    assert len((await client.get("/v1/accounts/acme/invoices", headers=auth("viewer", "acme"),
                                 params={"period": "2026"})).json()["items"]) == 5


async def test_invoice_detail_has_its_lines_and_the_pdf_link(client: httpx.AsyncClient,
                                                              scenario: Scenario) -> None:
    ledger, keys, _ = scenario
    renewal = keys["renewal_invoice"]
    r = await client.get(f"/v1/accounts/acme/invoices/{renewal}", headers=auth("viewer", "acme"))
    assert r.status_code == 200, r.text
    body = r.json()
    document = ledger.get(renewal)
    assert [(i["kind"], i["description"], i["amount"]) for i in body["items"]] == [
        (i["kind"], i["description"], i["amount"]) for i in document.lines]
    usage = next(i for i in body["items"] if i["kind"] == "usage")
    assert (usage["meter"], usage["quantity"], usage["detail"]) == ("api_calls", "1500", {"events": 3})
    assert body["pdf_url"].endswith(f"/v1/accounts/acme/invoices/{renewal}.pdf")
    # Scoped: another tenant's token, another tenant's invoice, an unknown one.
    assert (await client.get(f"/v1/accounts/acme/invoices/{renewal}", headers=auth("viewer", "globex"))
            ).status_code == 403
    assert (await client.get(f"/v1/accounts/globex/invoices/{renewal}", headers=auth("viewer", "globex"))
            ).status_code == 404
    # The ledger's PDF route is not this service's: `.pdf` is not taken for an invoice id here.
    pdf = await client.get(f"/v1/accounts/acme/invoices/{renewal}.pdf", headers=auth("viewer", "acme"))
    assert pdf.status_code == 404 and "unknown-invoice" not in pdf.text


async def test_finance_reports_invoices_subscriptions_and_mrr(client: httpx.AsyncClient) -> None:
    finance = auth("finance")
    every = (await client.get("/v1/reports/invoices", headers=finance, params={"limit": 100})).json()["items"]
    assert len(every) == 9 and {i["tenant"] for i in every} == {"acme", "globex", "initech"}
    notes = (await client.get("/v1/reports/invoices", headers=finance, params={"type": "credit_note"})).json()
    assert sorted(i["number"] for i in notes["items"]) == ["CN-2026-000001", "CN-2026-000002"]
    scoped = await client.get("/v1/reports/invoices", headers=auth("finance", "globex"))
    assert {i["tenant"] for i in scoped.json()["items"]} == {"globex"}

    subs = (await client.get("/v1/reports/subscriptions", headers=finance)).json()["items"]
    assert [(s["tenant"], s["key"], s["status"]) for s in subs] == [
        ("acme", "ops", "active"), ("acme", "team", "active"), ("acme", "yearly", "paused"),
        ("globex", "gone", "canceled"), ("globex", "try", "trialing"), ("initech", "euro", "active")]
    euro = subs[-1]
    assert (euro["cancel_at_period_end"], euro["base_fee"], euro["quantity"], euro["cadence"]) == (
        True, "100", 3, "quarter")
    trialing = (await client.get("/v1/reports/subscriptions", headers=finance, params={"status": "trialing"})).json()
    assert trialing["items"][0]["trial_end"] == "2026-11-15T00:00:00.000000Z"
    exported = await client.get("/v1/reports/subscriptions", headers=finance, params={"format": "csv"})
    assert len(list(csv.DictReader(io.StringIO(exported.text)))) == 6

    mrr = (await client.get("/v1/reports/mrr", headers=finance)).json()["items"]
    assert [(m["currency"], m["mrr"], m["arr"], m["monthly_fees"], m["quarterly_fees"]) for m in mrr] == [
        ("EUR", "100.00", "1200.00", "0.00", "300.00"), ("USD", "60.00", "720.00", "30.00", "90.00")]
    per_tenant = (await client.get("/v1/reports/mrr", headers=finance, params={"by": "tenant"})).json()["items"]
    assert [(m["tenant"], m["mrr"]) for m in per_tenant] == [("acme", "60.00"), ("initech", "100.00")]
    figures = (await client.get("/v1/reports/figures", headers=finance)).json()
    assert [(m["currency"], m["mrr"]) for m in figures["mrr"]] == [("EUR", "100.00"), ("USD", "60.00")]
    assert (await client.get("/v1/reports/mrr", headers=auth("viewer", "acme"))).status_code == 403


async def test_dashboard_shows_invoices_and_mrr(client: httpx.AsyncClient) -> None:
    page = await client.get("/dashboard/accounts/acme", headers=auth("viewer", "acme"))
    assert page.status_code == 200
    assert page.text.count('data-testid="invoice-row"') == 5
    assert "INV-2026-000004" in page.text and "/dashboard/accounts/acme/invoices/" in page.text
    finance = await client.get("/dashboard/finance", headers=auth("finance"), params={"year": 2026, "month": 11})
    assert 'data-testid="mrr-USD">60.00<' in finance.text and 'data-testid="mrr-EUR">100.00<' in finance.text
    # Issued in November 2026, all tenants: 6. The scenario numbers initech's and globex's first invoices
    # (commands dated Nov 1) after acme's renewal INV-2026-000004 of Dec 1: numbers follow their issue dates
    # (session 14), so INV-2026-000005 and -000006 are dated Dec 1, not before the number ahead of them.
    assert finance.text.count('data-testid="invoice-row"') == 6
    exported = await client.get("/dashboard/accounts/acme/export/invoices.csv", headers=auth("viewer", "acme"))
    assert exported.status_code == 200 and exported.text.count("INV-2026-") == 4


async def test_several_partitions_in_one_transaction_equal_one_at_a_time(tmp_path: Path) -> None:
    """The consumer process applies a whole poll (all its partitions) at once: same rows, same positions."""
    ledger = Ledger()
    full_scenario(ledger, "zeta")
    subscription_scenario(ledger)
    records = ledger.records()
    parts = by_partition(records)
    dumps = []
    for name in ("each", "together"):
        db = await SqliteDatabase(tmp_path / f"{name}.sqlite").connect()
        service = ProjectionService(db)
        await service.setup()
        if name == "each":
            await apply(service, records, batch=9)
        else:
            rng = random.Random(5)
            cursors = {p: 0 for p in parts}
            while any(cursors[p] < len(parts[p]) for p in parts):
                polled = []
                for p, rows in parts.items():
                    size = rng.randint(0, 9)
                    polled.append(rows[cursors[p]:cursors[p] + size])
                    cursors[p] += size
                await service.handle_partitions(polled)
            await service.handle_partitions(list(parts.values()))  # a whole replay: nothing changes
        dumps.append(await dump(db))
        await db.close()
    assert dumps[0] == dumps[1]


async def test_the_debit_shortcut_writes_what_the_general_path_writes(service: ProjectionService) -> None:
    from billing_projections import balances
    from billing_projections.writer import BatchWriter

    ledger = Ledger()
    full_scenario(ledger, "acme")  # debits with overage, give-backs, blocks, several units
    records = ledger.records()
    await apply(service, records[:3])  # the account, so that facts resolve its tenant
    events = [json.loads(r.value) for r in records]
    facts = [f for f in await service._facts(None, events) if f.type == "BillingAccount.UsageDebited"]  # type: ignore[arg-type]
    assert len(facts) == 6  # one blocked debit was rejected (UsageRejected)
    general, shortcut = BatchWriter(), BatchWriter()
    for fact in facts:
        balances.project(fact, general)
        fact.sums = None
        balances.handler_for(fact.type)(fact, shortcut)  # type: ignore[misc]
    rows = {name: {k: (r.init, r.set, r.add) for k, r in found[1].items()} for name, found in general._rows.items()}
    assert rows == {name: {k: (r.init, r.set, r.add) for k, r in found[1].items()}
                    for name, found in shortcut._rows.items()}


async def test_a_minimum_commitment_line_is_projected_and_printed_like_the_ledgers(
        service: ProjectionService) -> None:
    ledger = Ledger()
    plans = [{"code": "commit", "name": "Commit", "currency": "USD", "base_fee": "30.00", "minimum_spend": "50.00"}]
    ledger.command("catalog.publish", None, at=NOV_1, document={"plans": plans}, digest="commit-1")
    ledger.command("account.open", "acme", at=NOV_1, currency="USD")
    sub = ledger.command("subscription.create", "acme", at=NOV_1, key="m", plan="commit").value["subscription_id"]
    dec_1 = NOV_1.replace(month=12)
    ledger.command("subscription.tick", "acme", at=dec_1, key="m")
    key = f"{sub}/{dec_1.isoformat()}"
    ledger.command("invoice.usage_lines", "acme", at=dec_1, invoice_key=key, lines=[
        {"kind": "usage", "description": "API calls", "amount": "0", "meter": "api_calls"}])
    await apply(service, ledger.records())
    renewal = str(invoice_uuid("acme", key))
    lines = await invoices.lines(service.db, renewal)
    assert [(item["kind"], int(item["amount"])) for item in lines] == [
        ("base_fee", to_subunits(Decimal("30.00"))), ("usage", 0), ("minimum_commitment", to_subunits(Decimal(50)))]
    row = await invoices.one(service.db, "acme", renewal)
    assert row is not None and int(row["total"]) == to_subunits(Decimal("80.00"))
    document = ledger.get(renewal)
    assert render_pdf(document, issuer="billing").startswith(b"%PDF")
    assert [item["kind"] for item in document.lines][-1] == "minimum_commitment"


async def test_incomplete_subscriptions_are_listed_activated_or_expired_as_the_ledger_has_them(
        service: ProjectionService) -> None:
    # charge_before_access: "paid" is activated by its invoice's payment on Nov 4, "unpaid" expires after the
    # last dunning attempt, "waiting" is still incomplete. Only the activated one is billable (MRR).
    ledger = Ledger()
    ledger.command("catalog.publish", None, at=NOV_1, document=SUBSCRIPTION_CATALOG, digest="subs-1")
    ledger.command("account.open", "shop", at=NOV_1, currency="USD")
    made = {key: ledger.command("subscription.create", "shop", at=NOV_1, key=key, plan="team", trial=False,
                                collection="charge_before_access").value["subscription_id"]
            for key in ("paid", "unpaid", "waiting")}
    nov_4 = NOV_1 + timedelta(days=3)
    ledger.command("invoice.mark_paid", "shop", at=nov_4, invoice_id=invoice_id_of(made["paid"], "shop", NOV_1),
                   payment="pi_1")
    ledger.command("invoice.payment_failed", "shop", at=nov_4,
                   invoice_id=invoice_id_of(made["unpaid"], "shop", NOV_1), final=True)
    await apply(service, ledger.records())
    rows = {r["subscription_key"]: r for r in await subscriptions.page(service.db, tenant="shop", limit=10)}
    assert {key: row["status"] for key, row in rows.items()} == {
        "paid": "active", "unpaid": "canceled", "waiting": "incomplete"}
    for key, row in rows.items():
        sub = ledger.get(made[key])
        assert (row["status"], row["period_start"], row["period_end"]) == (
            sub.status, utc_text(sub.period_start), utc_text(sub.period_end))
    assert rows["paid"]["period_start"] == utc_text(nov_4)  # its first period starts when it was paid
    assert rows["unpaid"]["cancel_reason"] == "incomplete_expired"
    [usd] = await subscriptions.mrr(service.db, tenant="shop")
    assert (str(usd["mrr"]), usd["subscriptions"]) == ("30.00", 1)
    listed = await subscriptions.page(service.db, tenant="shop", statuses=("incomplete",), limit=10)
    assert [r["subscription_key"] for r in listed] == ["waiting"]


async def test_a_plans_base_fee_is_shown_in_its_currencys_minor_units(tmp_path: Path) -> None:
    ledger = Ledger()
    ledger.command("catalog.publish", None, document={"plans": [
        {"code": "round", "name": "Round", "currency": "USD", "base_fee": "92", "cadence": "month"},
        {"code": "yen", "name": "Yen", "currency": "JPY", "base_fee": "1200", "cadence": "month"}]}, digest="r")
    ledger.command("account.open", "usd", currency="USD")
    ledger.command("subscription.create", "usd", key="r", plan="round", quantity=1)
    ledger.command("account.open", "jpy", currency="JPY")
    ledger.command("subscription.create", "jpy", key="y", plan="yen", quantity=1)
    db = await SqliteDatabase(tmp_path / "fees.sqlite").connect()
    service = ProjectionService(db)
    await service.setup()
    await apply(service, ledger.records())
    rows = await db.fetch("SELECT tenant, base_fee FROM subscriptions ORDER BY tenant")
    assert [(r["tenant"], r["base_fee"]) for r in rows] == [("jpy", "1200"), ("usd", "92.00")]
    await db.close()


async def test_subscription_pages_neither_repeat_nor_skip_one_started_between_two_reads(
        client: httpx.AsyncClient, service: ProjectionService, scenario: Scenario) -> None:
    """Keyset cursors: a subscription started before the page read last (it was an offset: the next page repeated
    a subscription)."""
    ledger = scenario[0]
    finance = auth("finance")

    def keys(items: list[dict[str, Any]]) -> list[tuple[str, str]]:
        return [(s["tenant"], s["key"]) for s in items]

    first = (await client.get("/v1/reports/subscriptions", params={"limit": 4}, headers=finance)).json()
    paged, cursor = keys(first["items"]), first["next_cursor"]
    assert paged == [("acme", "ops"), ("acme", "team"), ("acme", "yearly"), ("globex", "gone")]
    # Between two reads: one sorting before the rows read (globex "aaa"), one after them (initech "zzz").
    later = NOV_1 + timedelta(days=20)
    ledger.command("subscription.create", "globex", at=later, key="aaa", plan="team", quantity=1)
    ledger.command("subscription.create", "initech", at=later, key="zzz", plan="euro", quantity=1)
    await apply(service, ledger.records())
    while cursor:
        page = (await client.get("/v1/reports/subscriptions", params={"limit": 4, "cursor": cursor},
                                 headers=finance)).json()
        paged += keys(page["items"])
        cursor = page["next_cursor"]
    every = keys((await client.get("/v1/reports/subscriptions", params={"limit": 500}, headers=finance)).json()["items"])
    assert len(every) == 8
    assert paged == [k for k in every if k != ("globex", "aaa")]  # each once, the one added ahead included
    old = await client.get("/v1/reports/subscriptions", params={"cursor": encode_cursor({"offset": 4})},
                           headers=finance)
    assert old.status_code == 422 and "first page" in old.json()["detail"]

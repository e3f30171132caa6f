"""An invoice finalized by the real ledger (a subscription started through its HTTP API) shows in the
projections' invoice list and detail with its lines, its subscription in the finance report, and in MRR."""

from __future__ import annotations

import io
import re
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from pypdf import PdfReader

from tests.integration.conftest import Stack
from tests.integration.test_walking_skeleton import apply_accounts, wait_balance
from tests.support import auth, wait_until

pytestmark = pytest.mark.integration


def test_a_finalized_invoice_shows_with_its_lines(stack: Stack, tmp_path: Path) -> None:
    tenant = f"inv-{uuid.uuid4().hex[:8]}"
    apply_accounts(stack, tmp_path, [tenant])
    wait_balance(stack, tenant, Decimal("100.00"))
    created = httpx.post(f"{stack.ledger_url}/v1/accounts/{tenant}/subscriptions", headers=auth("admin"),
                         json={"key": "main", "plan": "starter", "quantity": 2, "trial": False}, timeout=30)
    assert created.status_code == 201, created.text
    subscription_id = created.json()["subscription_id"]
    viewer = auth("viewer", tenant)

    def listed() -> list[dict[str, Any]]:
        r = httpx.get(f"{stack.projections_url}/v1/accounts/{tenant}/invoices", headers=viewer, timeout=10)
        items = r.json()["items"] if r.status_code == 200 else []
        return items if items and items[0]["status"] == "finalized" else []

    [invoice] = wait_until(listed, timeout=60, what="the first invoice in the projections")
    assert re.fullmatch(r"INV-\d{4}-\d{6}", invoice["number"]), invoice
    assert (invoice["document_type"], invoice["currency"], invoice["total"], invoice["lines"]) == (
        "invoice", "USD", "58.00", 1)
    assert invoice["subscription_id"] == subscription_id
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", invoice["issue_date"]) and invoice["due_date"] >= invoice["issue_date"]

    detail = httpx.get(f"{stack.projections_url}/v1/accounts/{tenant}/invoices/{invoice['invoice_id']}",
                       headers=viewer, timeout=10)
    assert detail.status_code == 200, detail.text
    [line] = detail.json()["items"]
    assert (line["kind"], line["quantity"], line["unit_amount"], line["amount"]) == ("base_fee", "2", "29.00",
                                                                                     "58.00")
    assert line["description"].startswith("Starter")

    # pdf_url names the ledger's route; the ledger of this stack renders it.
    path = f"/v1/accounts/{tenant}/invoices/{invoice['invoice_id']}.pdf"
    assert invoice["pdf_url"].endswith(path)
    pdf = httpx.get(f"{stack.ledger_url}{path}", headers=viewer, timeout=30)
    assert pdf.status_code == 200 and pdf.headers["content-type"] == "application/pdf"
    text = "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf.content)).pages)
    assert invoice["number"] in text and "58.00" in text

    finance = auth("finance")
    subs = httpx.get(f"{stack.projections_url}/v1/reports/subscriptions", headers=finance,
                     params={"tenant": tenant}, timeout=10).json()["items"]
    assert [(s["key"], s["status"], s["plan"], s["quantity"]) for s in subs] == [("main", "active", "starter", 2)]
    mrr = httpx.get(f"{stack.projections_url}/v1/reports/mrr", headers=finance, params={"tenant": tenant},
                    timeout=10).json()["items"]
    assert [(m["currency"], m["mrr"], m["subscriptions"]) for m in mrr] == [("USD", "58.00", 1)]
    everyone = httpx.get(f"{stack.projections_url}/v1/reports/invoices", headers=finance,
                         params={"tenant": tenant, "status": "finalized"}, timeout=10).json()["items"]
    assert [i["number"] for i in everyone] == [invoice["number"]]

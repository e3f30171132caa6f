"""Subscriptions through the HTTP API of `billing run`: invoices, previews, PDFs, emails, the billing cycle."""

from __future__ import annotations

import io
import os
import subprocess
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from pypdf import PdfReader

from tests.support import BILLING, ROOT, Inbox, ServiceProcess, auth, free_port, wait_until

pytestmark = pytest.mark.e2e


def pdf_text(pdf: bytes) -> str:
    return "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf)).pages)


def test_subscription_lifecycle_with_invoices_pdfs_and_email(tmp_path: Path, smtp: tuple[Inbox, int]) -> None:
    inbox, smtp_port = smtp
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {"BILLING_DATA_DIR": str(tmp_path / "var"), "BILLING_PORT": str(port), "KAFKA_BOOTSTRAP_SERVERS": "",
           "DATABASE_URL": "", "BILLING_SMTP_HOST": "127.0.0.1", "BILLING_SMTP_PORT": str(smtp_port),
           "BILLING_SCHEDULER_INTERVAL_SECONDS": "3600",
           # No dunning round during the test (acme has no payment method: each would email "Payment failed");
           # the invoices' own emails are what this test counts. Dunning: tests/unit/payments/test_dunning.py.
           "BILLING_PAYMENTS_INTERVAL_SECONDS": "3600"}
    run = ServiceProcess(["run"], env, tmp_path / "run.log", port).start()
    admin = auth("admin")
    try:
        wait_until(lambda: httpx.get(f"{base}/v1/catalog/plans", headers=admin).status_code == 200,
                   what="the catalogue")
        # Started 33 days ago (a command may be dated up to 35 days back): its first month has ended, not ticked yet.
        start = (datetime.now(UTC) - timedelta(days=33)).replace(hour=0, minute=0, second=0, microsecond=0)
        # acme already had no subscription: it is trial-eligible, but asks for none here (pays at once).
        created = httpx.post(f"{base}/v1/accounts/acme/subscriptions", headers=admin,
                             json={"key": "main", "plan": "starter", "trial": False, "at": start.isoformat()})
        assert created.status_code == 201, created.text
        assert created.json()["status"] == "active"
        end = datetime.fromisoformat(created.json()["period_end"])
        assert end < datetime.now(UTC)

        first = wait_until(lambda: inbox.messages[:1], what="the first invoice email")[0]
        first_number = f"INV-{start.year}-000001"
        assert first_number in first["Subject"]
        [attachment] = [p for p in first.walk() if p.get_content_type() == "application/pdf"]
        text = pdf_text(attachment.get_payload(decode=True))
        assert first_number in text and "29.00" in text and "acme" in text

        mid_point = start + (end - start) / 2  # half of the period left: half of each fee
        mid = mid_point.isoformat()
        change_number = f"INV-{mid_point.year}-{2 if mid_point.year == start.year else 1:06d}"
        preview = httpx.get(f"{base}/v1/accounts/acme/subscriptions/main/invoice-preview",
                            params={"quantity": 3, "at": mid}, headers=admin).json()
        changed = httpx.post(f"{base}/v1/accounts/acme/subscriptions/main/change", headers=admin,
                             json={"quantity": 3, "at": mid})
        assert changed.status_code == 200, changed.text
        assert changed.json()["result"]["lines"] == preview["lines"]
        assert Decimal(preview["total"]) == Decimal("-14.50") + Decimal("43.50")  # half of 29 and of 87

        too_many = httpx.post(f"{base}/v1/accounts/acme/subscriptions/main/change", headers=admin,
                              json={"plan": "nope"})
        assert too_many.status_code == 422 and too_many.headers["content-type"] == "application/problem+json"

        # A cycle run cannot tick ahead of now (it would renew periods early).
        ahead = httpx.post(f"{base}/v1/billing/cycle/run", params={"at": (end + timedelta(days=40)).isoformat()},
                           headers=admin)
        assert (ahead.status_code, ahead.headers["content-type"]) == (422, "application/problem+json")
        # The period has ended: the cycle runs (twice: still one renewal), rating adds usage lines, invoice #3 goes out.
        for _ in range(2):
            ticked = httpx.post(f"{base}/v1/billing/cycle/run", params={"at": (end + timedelta(seconds=1)).isoformat()},
                                headers=admin)
            assert ticked.status_code == 200
        wait_until(lambda: len(inbox.messages) >= 3, timeout=30, what="the renewal invoice email")
        time.sleep(2)
        subjects = sorted(m["Subject"] for m in inbox.messages)
        assert len(subjects) == 3 and any(change_number in s for s in subjects), subjects
        renewal = httpx.get(f"{base}/v1/accounts/acme/subscriptions/main", headers=admin).json()
        assert datetime.fromisoformat(renewal["period_start"]) == end
        renewal_invoice = next(m for m in inbox.messages
                               if first_number not in m["Subject"] and change_number not in m["Subject"])
        [pdf] = [p for p in renewal_invoice.walk() if p.get_content_type() == "application/pdf"]
        assert "Starter" in pdf_text(pdf.get_payload(decode=True))

        # The CLI sends the same commands through the bus (here the embedded log under BILLING_DATA_DIR).
        subprocess.run([BILLING, "subscription", "create", "--tenant", "acme", "--key", "extra", "--plan",
                        "starter", "--no-trial"], env={**os.environ, **env}, check=True, cwd=ROOT,
                       capture_output=True)
        live = wait_until(lambda: [s["key"] for s in httpx.get(f"{base}/v1/accounts/acme/subscriptions",
                                                               headers=admin).json()["subscriptions"]]
                          if len(httpx.get(f"{base}/v1/accounts/acme/subscriptions",
                                           headers=admin).json()["subscriptions"]) == 2 else None,
                          what="the CLI's subscription")
        assert sorted(live) == ["extra", "main"]
    finally:
        run.stop()

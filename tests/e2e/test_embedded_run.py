"""`billing run` (what `make run` starts): the README's quickstart, then a restart that loses nothing."""

from __future__ import annotations

import signal
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from tests.support import ServiceProcess, auth, free_port, wait_until

pytestmark = pytest.mark.e2e


def balance(base: str) -> str | None:
    r = httpx.get(f"{base}/v1/accounts/acme/balance", headers=auth("viewer", "acme"), timeout=5)
    if r.status_code == 404:
        return None
    r.raise_for_status()
    return str(r.json()["wallets"][0]["available"])


def test_quickstart_then_restart_keeps_the_balance(tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {"BILLING_DATA_DIR": str(tmp_path / "var"), "BILLING_PORT": str(port),
           "KAFKA_BOOTSTRAP_SERVERS": "", "DATABASE_URL": ""}
    run = ServiceProcess(["run"], env, tmp_path / "run.log", port).start()
    try:
        wait_until(lambda: balance(base) == "100.00", what="the demo grant")
        event = {"id": "evt-1", "tenant": "acme", "meter": "api_calls", "quantity": "23",
                 "timestamp": datetime.now(UTC).isoformat()}
        r = httpx.post(f"{base}/v1/usage", json=event, headers=auth("service"))
        assert r.json()["results"][0]["status"] == "accepted", r.text
        wait_until(lambda: balance(base) == "95.40", what="the debit (23 x 0.20)")
        again = httpx.post(f"{base}/v1/usage", json=event, headers=auth("service"))
        assert again.json()["results"][0]["status"] == "duplicate"
    finally:
        assert run.stop(signal.SIGINT) == 0, run.log_tail()
    assert "stopped" in run.log_tail()

    restarted = ServiceProcess(["run"], env, tmp_path / "run2.log", port).start()
    try:
        # The demo catalogue is applied again at start: same command ids, so no second grant.
        wait_until(lambda: balance(base) is not None, what="projections to answer")
        import time

        time.sleep(2)
        assert balance(base) == "95.40"
        r = httpx.post(f"{base}/v1/usage", json=dict(event, id="evt-2", quantity="1"), headers=auth("service"))
        assert r.json()["results"][0]["status"] == "accepted"
        wait_until(lambda: balance(base) == "95.20", what="a debit after the restart")
    finally:
        restarted.stop(signal.SIGINT)

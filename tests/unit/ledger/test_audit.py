"""Tamper evidence: the hash chain, the export an auditor replays, and `billing audit`."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from billing_cli.audit import app as audit_cli
from billing_events import ids
from billing_events.money import SUBUNITS_PER_UNIT
from billing_ledger.application import LedgerApplication
from billing_ledger.audit import compare_with_projection, export_lines, replay_lines, verify_store
from billing_ledger.domain.chain import GENESIS, chain_hash, event_content
from typer.testing import CliRunner

from tests.unit.ledger.ledger_support import apply, command, open_account

U = SUBUNITS_PER_UNIT
T0 = datetime(2026, 11, 1, tzinfo=UTC)


def busy_account(app: LedgerApplication) -> None:
    """Every kind of movement: purchase, promotion with expiry, usage with overage, holds, refund, adjustment."""
    open_account(app, "acme", {"key": "bought", "amount": "50.00", "effective_at": T0.isoformat()},
                 {"key": "promo", "amount": "5.00", "source": "promotion", "effective_at": T0.isoformat(),
                  "expires_at": (T0 + timedelta(days=3)).isoformat()})
    at = (T0 + timedelta(days=1)).isoformat()
    hold = str(ids.grant_id("acme", "hold-1"))
    results = apply(
        app,
        command("usage.debit", "acme", {"unit": "USD", "amount_subunits": 12 * U + 7, "meter": "m", "at": at}, key="u1"),
        command("hold.place", "acme", {"hold_id": hold, "amount": "10", "at": at,
                                       "expires_at": (T0 + timedelta(days=2)).isoformat()}, key="h1"),
        command("hold.capture", "acme", {"hold_id": hold, "amount": "4.5", "at": at}, key="c1"),
        command("hold.place", "acme", {"hold_id": str(ids.grant_id("acme", "hold-2")), "amount": "1", "at": at,
                                       "expires_at": (T0 + timedelta(days=9)).isoformat()}, key="h2"),
        command("grant.refund", "acme", {"grant_id": str(ids.grant_id("acme", "bought")), "refund_id": hold,
                                         "amount": "3", "reason": "asked", "at": at}, key="r1"),
        command("balance.adjust", "acme", {"adjustment_id": str(ids.grant_id("acme", "adj")), "amount": "-1.25",
                                           "reason": "fix", "user": "ada", "at": at}, key="a1"),
        command("grant.expire", "acme", {"now": (T0 + timedelta(days=4)).isoformat()}, key="e1"),
        command("usage.debit", "acme", {"unit": "USD", "amount_subunits": 40 * U, "meter": "m",
                                        "at": (T0 + timedelta(days=5)).isoformat()}, key="u2"),
    )
    assert all(r.outcome == "applied" for r in results), results


def test_every_event_carries_a_chain_computed_when_created(app: LedgerApplication) -> None:
    busy_account(app)
    previous = GENESIS
    for event in app.events.get(ids.account_id("acme")):
        expected = chain_hash(previous, type(event).__qualname__, event.originator_id, event.originator_version,
                              event.timestamp, event_content(event))
        assert event.chain_hash == expected  # type: ignore[attr-defined]
        previous = expected


def test_export_replays_to_the_same_balances(app: LedgerApplication, tmp_path: Path) -> None:
    busy_account(app)
    path = tmp_path / "acme.jsonl"
    path.write_text("".join(line + "\n" for line in export_lines(app, "acme")))
    replayed = replay_lines(path.read_text().splitlines())
    assert replayed.problems == []
    account = app.repository.get(ids.account_id("acme"))
    wallet = replayed.wallets()["USD"]
    assert wallet == {"balance": account.balance("USD"), "held": account.held("USD"),
                      "late_usage_reserve": account.late_usage_reserve("USD"),
                      "available": account.available("USD"), "receivable": account.receivable("USD")}
    assert wallet["held"] == U and wallet["receivable"] > 0  # the open hold, the overage
    assert replayed.head == account.chain_head
    assert verify_store(app, "acme").ok


def test_changing_a_stored_event_breaks_the_chain(app: LedgerApplication, tmp_path: Path) -> None:
    busy_account(app)
    account_hex = ids.account_id("acme").hex
    with sqlite3.connect(tmp_path / "ledger-events.sqlite") as db:
        state = db.execute("SELECT state FROM stored_events WHERE originator_id = ? AND originator_version = 4",
                           (account_hex,)).fetchone()[0]
        doctored = state.replace(b'"amount":12000000007', b'"amount":2000000007')
        assert doctored != state
        db.execute("UPDATE stored_events SET state = ? WHERE originator_id = ? AND originator_version = 4",
                   (doctored, account_hex))
    report = verify_store(app, "acme")
    assert not report.ok
    assert any("version 4" in p and "chain hash" in p for p in report.problems), report.problems


def test_removing_an_event_is_found(app: LedgerApplication, tmp_path: Path) -> None:
    busy_account(app)
    with sqlite3.connect(tmp_path / "ledger-events.sqlite") as db:
        db.execute("DELETE FROM stored_events WHERE originator_id = ? AND originator_version = 5",
                   (ids.account_id("acme").hex,))
    report = verify_store(app, "acme")
    assert not report.ok and any("missing" in p for p in report.problems)


def test_projection_mismatch_is_reported(app: LedgerApplication) -> None:
    busy_account(app)
    report = verify_store(app, "acme")
    wallet = report.replay.to_json()["wallets"]["USD"]
    good = {"wallets": [{"unit": "USD", **wallet}]}
    assert compare_with_projection(report, good) == []
    bad = {"wallets": [{"unit": "USD", **wallet, "available": "999.00"}]}
    assert compare_with_projection(report, bad) == [f"projection USD available 999.00 != ledger {wallet['available']}"]


def test_cli_export_replay_and_verify(app: LedgerApplication, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    busy_account(app)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("BILLING_DATA_DIR", str(tmp_path))
    runner = CliRunner()
    out = tmp_path / "export.jsonl"
    exported = runner.invoke(audit_cli, ["export", "--tenant", "acme", "--out", str(out)])
    assert exported.exit_code == 0, exported.output
    assert json.loads(exported.output)["events"] == len(out.read_text().splitlines())
    replayed = runner.invoke(audit_cli, ["replay", str(out)])
    assert replayed.exit_code == 0, replayed.output
    assert json.loads(replayed.output)["chain_ok"] is True
    verified = runner.invoke(audit_cli, ["verify", "--tenant", "acme", "--skip-projection"])
    assert verified.exit_code == 0, verified.output
    unreachable = runner.invoke(audit_cli, ["verify", "--tenant", "acme", "--projections-url", "http://127.0.0.1:9"])
    assert unreachable.exit_code == 1 and "projection unavailable" in unreachable.output
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:3] + lines[4:]) + "\n")  # an event taken out of the export
    assert runner.invoke(audit_cli, ["replay", str(out)]).exit_code == 1

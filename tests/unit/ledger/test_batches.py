"""The batch path: bulk reads, the aggregate cache, pipelined chunks, conflicts between two processes."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from billing_events import ids
from billing_events.messages import LedgerCommand
from billing_events.money import SUBUNITS_PER_UNIT
from billing_ledger.application import LedgerApplication, persistence_env
from billing_ledger.direct import DirectCommands
from eventsourcing.persistence import IntegrityError, Tracking

from tests.unit.ledger.ledger_support import apply, command, open_account

U = SUBUNITS_PER_UNIT
AT = "2026-11-21T10:00:00+00:00"


def debit(tenant: str, key: str, amount: int = U) -> object:
    return command("usage.debit", tenant, {"unit": "USD", "amount_subunits": amount, "meter": "m", "at": AT}, key=key)


def available(app: LedgerApplication, tenant: str) -> int:
    return app.read(ids.account_id(tenant), lambda a: a.available("USD"))  # type: ignore[return-value]


def test_pipelined_chunks_apply_in_order_once_with_their_positions(app: LedgerApplication) -> None:
    open_account(app, "a", {"key": "g", "amount": "100"})
    open_account(app, "b", {"key": "g", "amount": "100"})
    first = [debit("a", "1"), debit("b", "1"), debit("a", "2")]
    second = [debit("a", "3"), debit("a", "2"), debit("b", "2")]  # "a/2" repeats a command of the chunk before
    third = [debit("b", "1")]  # repeats a command two chunks back
    results = app.apply_chunks([(first, Tracking("kafka:t:0", 3)), (second, Tracking("kafka:t:0", 6)),
                                (third, Tracking("kafka:t:0", 7))])
    assert [r.outcome for r in results] == ["applied"] * 4 + ["duplicate", "applied", "duplicate"]
    assert available(app, "a") == 97 * U and available(app, "b") == 98 * U
    assert app.next_offset("t", 0) == 7
    versions = [e.originator_version for e in app.events.get(ids.account_id("a"))]
    assert versions == list(range(1, len(versions) + 1))


def test_failed_commit_discards_the_chunk_prepared_on_top_of_it(app: LedgerApplication) -> None:
    open_account(app, "a", {"key": "g", "amount": "100"})
    app.apply_commands([debit("a", "0")], Tracking("kafka:t:0", 5))
    with pytest.raises(IntegrityError):  # position 5 again: the tracking row refuses it
        app.apply_chunks([([debit("a", "1")], Tracking("kafka:t:0", 5)), ([debit("a", "2")], Tracking("kafka:t:0", 6))])
    assert available(app, "a") == 99 * U and app.next_offset("t", 0) == 5
    app.apply_chunks([([debit("a", "1")], Tracking("kafka:t:0", 6)), ([debit("a", "2")], Tracking("kafka:t:0", 7))])
    assert available(app, "a") == 97 * U


def test_cached_account_catches_up_with_another_process(app: LedgerApplication, tmp_path: Path) -> None:
    open_account(app, "a", {"key": "g", "amount": "100"})
    assert available(app, "a") == 100 * U  # now cached here
    other = LedgerApplication(persistence_env(None, str(tmp_path)))
    try:
        assert other.apply_commands([debit("a", "x", 5 * U)])[0].outcome == "applied"
    finally:
        other.close()
    assert available(app, "a") == 95 * U
    assert app.apply_commands([debit("a", "y", 5 * U)])[0].outcome == "applied"
    assert available(app, "a") == 90 * U


def test_direct_command_retries_after_losing_a_race(app: LedgerApplication, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    open_account(app, "a", {"key": "g", "amount": "100"})
    assert available(app, "a") == 100 * U  # cached at the current version
    other = LedgerApplication(persistence_env(None, str(tmp_path)))
    original = app.load_many
    raced = []

    def load_then_race(*args, **kwargs):  # type: ignore[no-untyped-def]
        loaded = original(*args, **kwargs)
        if not raced:  # another process records the next version right after we read ours
            raced.append(other.apply_commands([debit("a", "other", 10 * U)]))
        return loaded

    monkeypatch.setattr(app, "load_many", load_then_race)
    try:
        result = DirectCommands(app).apply(debit("a", "mine", 10 * U), ids.account_id("a"))  # type: ignore[arg-type]
    finally:
        other.close()
    assert result.outcome == "applied" and raced
    assert available(app, "a") == 80 * U


def test_malformed_payload_is_rejected_with_a_receipt(app: LedgerApplication) -> None:
    open_account(app, "a", {"key": "g", "amount": "1"})
    broken = command("usage.debit", "a", {"unit": "USD"}, key="broken")
    [result] = apply(app, broken)
    assert result.outcome == "rejected" and result.reason == "invalid_command"
    [again] = apply(app, broken)
    assert again.outcome == "duplicate" and again.first_outcome == "rejected"
    unknown = command("no.such.kind", "a", {}, key="u")
    assert apply(app, unknown)[0].reason == "unknown_command"


@pytest.mark.parametrize("amount", [2.5 * U, str(U), True])
def test_a_debit_whose_amount_is_not_an_integer_is_rejected_not_truncated(app: LedgerApplication,
                                                                         amount: object) -> None:
    open_account(app, "a", {"key": "g", "amount": "10"})
    [result] = apply(app, debit("a", "odd", amount))  # type: ignore[arg-type]
    assert (result.outcome, result.reason) == ("rejected", "invalid_command"), result
    assert available(app, "a") == 10 * U  # int("1000000000") or int(True) would have taken credit


@pytest.mark.parametrize("priority", ["1", 0.5, None])
def test_a_grant_whose_priority_is_not_an_integer_is_rejected(app: LedgerApplication, priority: object) -> None:
    open_account(app, "a")
    [result] = apply(app, command("credit.grant", "a", {"grant_key": "p", "unit": "USD", "amount": "5",
                                                       "source": "manual", "priority": priority}, key="p"))
    assert (result.outcome, result.reason) == ("rejected", "invalid_grant"), result
    assert available(app, "a") == 0


def test_an_event_that_fails_half_way_through_being_applied_leaves_no_half_changed_account(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The debit's event changes the receivable, then (a bug) fails: the account must not keep half of it."""
    from billing_ledger.domain import account as account_module

    app = LedgerApplication(persistence_env(None, str(tmp_path)))
    stamp = datetime(2026, 11, 1, tzinfo=UTC)

    def one(kind: str, **payload: Any) -> LedgerCommand:
        return LedgerCommand(command_id=uuid4(), kind=kind, tenant="acme", issued_at=stamp, issued_by="test",
                             payload=payload)

    assert app.apply_commands([one("account.open", currency="USD")])[0].outcome == "applied"

    def fails(*args: Any, **kwargs: Any) -> None:
        raise ValueError("a bug in an event's apply")

    monkeypatch.setattr(account_module, "_add_unbilled", fails)
    with pytest.raises(ValueError, match="a bug"):  # the batch fails: nothing of it is recorded
        app.apply_commands([one("usage.debit", unit="USD", amount_subunits=10**9, meter="m",
                                at="2026-11-02T00:00:00+00:00", overage_policy="overage",
                                cause={"period": "2026-11"})])
    monkeypatch.undo()
    assert app.read(ids.account_id("acme"), lambda a: (a.receivable("USD"), a.version)) == (0, 1)

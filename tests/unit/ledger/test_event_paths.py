"""The ledger's short paths for creating and applying events (``ChainedAggregate.trigger_event`` and
``Event.mutate``, ``BillingAccount._record_usage_debited``) record and replay exactly what eventsourcing's own
layers do: the same stored events, byte for byte, the same hash chain and the same state."""

from __future__ import annotations

import hashlib
import itertools
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import eventsourcing.domain
import pytest
from billing_events import ids
from billing_ledger.application import LedgerApplication, persistence_env
from billing_ledger.domain.account import BillingAccount
from billing_ledger.domain.chain import GENESIS, NOT_CONTENT, ChainedAggregate, chain_hash
from eventsourcing.domain import Aggregate

from tests.unit.ledger.ledger_support import apply, command
from tests.unit.ledger.test_audit import busy_account

T0 = datetime(2026, 11, 1, tzinfo=UTC)


def _library_trigger_event(self: Any, event_class: Any, **kwargs: Any) -> None:
    """What ``ChainedAggregate.trigger_event`` did before its short path: the hash, then the library's own."""
    timestamp = kwargs.get("timestamp") or event_class.create_timestamp()
    kwargs["timestamp"] = timestamp
    kwargs["chain_hash"] = chain_hash(self.chain_head, event_class.__qualname__, self.id, self.version + 1,
                                      timestamp, {k: v for k, v in kwargs.items() if k not in NOT_CONTENT})
    Aggregate.trigger_event(self, event_class, **kwargs)


def _library_mutate(self: Any, aggregate: Any) -> Any:
    result = super(ChainedAggregate.Event, self).mutate(aggregate)  # CanMutateAggregate -> DecoratedFuncCaller
    result.chain_head = self.chain_hash
    return result


def _library_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ChainedAggregate, "trigger_event", _library_trigger_event)
    monkeypatch.setattr(ChainedAggregate.Event, "mutate", _library_mutate)
    monkeypatch.setattr(BillingAccount, "_record_usage_debited", lambda self, **kwargs: self._usage_debited(**kwargs))


def _run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[list[tuple[Any, ...]], dict[str, Any]]:
    """Every kind of account movement (``busy_account``) and usage that costs nothing, is given back or goes beyond
    credit, on an event clock that ticks a second per event: the account's stored events and replayed state."""
    clock = (T0 + timedelta(seconds=n) for n in itertools.count())
    monkeypatch.setattr(eventsourcing.domain, "datetime_now_with_tzinfo", lambda: next(clock))
    app = LedgerApplication(persistence_env(None, str(tmp_path)))
    try:
        busy_account(app)
        at = (T0 + timedelta(days=6)).isoformat()
        results = apply(
            app,
            command("usage.debit", "acme", {"unit": "USD", "amount_subunits": 0, "meter": "m", "at": at}, key="z"),
            command("usage.debit", "acme", {"unit": "USD", "amount_subunits": -7, "meter": "m", "at": at,
                                            "cause": {"period": "2026-11"}}, key="g"),
            command("usage.debit", "acme", {"unit": "USD", "amount_subunits": 3, "meter": "m", "at": at,
                                            "cause": {"event_id": "e"}}, key="d"),
        )
        assert all(r.outcome == "applied" for r in results), results
        account_id = ids.account_id("acme")
        stored = [(s.originator_id, s.originator_version, s.topic, s.state)
                  for s in (app.mapper.to_stored_event(e) for e in app.events.get(account_id))]
        state = {k: v for k, v in vars(app.repository.get(account_id)).items() if k != "_pending_events"}
        return stored, state
    finally:
        app.close()


def test_short_paths_record_and_replay_what_the_library_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    fast_events, fast_state = _run(tmp_path / "fast", monkeypatch)
    with monkeypatch.context() as library:
        _library_paths(library)
        library_events, library_state = _run(tmp_path / "library", library)
    assert len(fast_events) >= 14
    assert fast_events == library_events
    assert fast_state == library_state


def test_the_chain_hashes_the_aggregate_id_as_its_canonical_string() -> None:
    aggregate_id = ids.account_id("acme")
    data = {"amount": 5, "at": T0, "grant_id": ids.grant_id("acme", "g")}
    content = json.dumps({"aggregate_id": str(aggregate_id), "version": 3, "type": "BillingAccount.UsageDebited",
                          "timestamp": T0.isoformat(), "data": {**data, "at": T0.isoformat(),
                                                                "grant_id": str(data["grant_id"])}},
                         sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    expected = hashlib.sha256((GENESIS + content).encode()).hexdigest()
    assert chain_hash(GENESIS, "BillingAccount.UsageDebited", aggregate_id, 3, T0, data) == expected
    assert chain_hash(GENESIS, "BillingAccount.UsageDebited", str(aggregate_id), 3, T0, data) == expected

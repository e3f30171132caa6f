"""The ledger's short paths for creating and applying events (``ChainedAggregate.trigger_event`` and
``Event.mutate``, ``BillingAccount._record_usage_debited``) record and replay exactly what eventsourcing's own
layers do: the same stored events, byte for byte, the same hash chain and the same state."""

from __future__ import annotations

import hashlib
import itertools
import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import eventsourcing.domain
import pytest
from billing_events import ids
from billing_ledger.application import LedgerApplication, persistence_env
from billing_ledger.domain.account import BillingAccount
from billing_ledger.domain.chain import GENESIS, NOT_CONTENT, ChainedAggregate, canonical_json, chain_hash
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
    monkeypatch.setattr(LedgerApplication, "_to_stored_events",
                        lambda self, events: [self.mapper.to_stored_event(e) for e in events])


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
            # Beyond the credit (draws of every grant left, overage), and causes of odd values.
            command("usage.debit", "acme", {"unit": "USD", "amount_subunits": 10**15, "meter": "m", "at": at,
                                            "cause": {"event_id": "é☃\"\n", "n": 1.5, "none": None}}, key="o"),
            command("usage.debit", "acme", {"unit": "USD", "amount_subunits": 4, "meter": "m", "at": at,
                                            "cause": {"event_id": "x", "big": 2**70, "nested": {"a": [1, {"b": 2}]}}},
                    key="x"),
        )
        assert all(r.outcome == "applied" for r in results), results
        account_id = ids.account_id("acme")
        # As the batches stored them (``_to_stored_events``; the library's paths: the mapper's).
        stored = [(s.originator_id, s.originator_version, s.topic, s.state)
                  for s in app.recorder.select_events(account_id)]
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


def test_the_chain_hash_written_by_orjson_alone_is_the_canonical_one() -> None:
    """``chain_hash``'s short path (plain data, UTC datetimes written by orjson) hashes the text ``canonical_json``
    writes, and data it cannot write alone goes the long way."""
    grant = str(ids.grant_id("acme", "g"))
    samples: list[dict[str, Any]] = [
        {"command_id": ids.grant_id("acme", "c"), "meter": "m", "amount": 5, "at": T0, "credit_grant": None,
         "postings": [{"account": "tenant_wallet", "unit": "USD", "amount": 5, "grant_id": grant}],
         "draws": [{"grant_id": grant, "amount": 5}], "cause": {"event_id": "é☃\"", "n": 1.5, "none": None},
         "absorbed": [{"grant_id": grant, "amount": 1}], "ids": [ids.grant_id("acme", "x")]},
        {"at": datetime(1, 1, 1, tzinfo=UTC), "later": datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
         "micro": T0 + timedelta(microseconds=1)},
        {"at": T0.astimezone(timezone(timedelta(hours=5, minutes=30)))}, {"cause": {"at": T0}}, {"big": 2**70},
        {"tags": {"b", "a"}}, {"nested": {"a": {"b": T0}}}, {"keys": {1: "a"}},
    ]
    for data in samples:
        for timestamp in (T0, T0 + timedelta(microseconds=7), T0.isoformat()):
            content = canonical_json({"aggregate_id": ids.account_id("acme"), "version": 3, "type": "A.E",
                                      "timestamp": timestamp if isinstance(timestamp, str) else timestamp.isoformat(),
                                      "data": data})
            expected = hashlib.sha256((GENESIS + content).encode()).hexdigest()
            assert chain_hash(GENESIS, "A.E", ids.account_id("acme"), 3, timestamp, data) == expected, data


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

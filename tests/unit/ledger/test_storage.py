"""Storage helpers: the orjson transcoder keeps eventsourcing's stored format; the aggregate cache's rules."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import orjson
from billing_ledger.aggregate_cache import AggregateCache
from billing_ledger.application import LedgerApplication
from billing_ledger.domain.account import BillingAccount
from billing_ledger.domain.allocation import ResourcePool
from billing_ledger.domain.receipt import RECORDED_TOPIC, CommandReceipt
from billing_ledger.pg_recorder import existing_aggregates
from billing_ledger.transcoder import OrjsonTranscoder, encode_plain_state
from eventsourcing.persistence import DatetimeAsISO, DecimalAsStr, JSONTranscoder, StoredEvent, UUIDAsHex

from tests.unit.ledger.ledger_support import command, open_account


def transcoders() -> tuple[OrjsonTranscoder, JSONTranscoder]:
    fast, library = OrjsonTranscoder(), JSONTranscoder()
    for transcoder in (fast, library):
        for transcoding in (UUIDAsHex(), DecimalAsStr(), DatetimeAsISO()):
            transcoder.register(transcoding)
    return fast, library


def test_orjson_transcoder_writes_what_the_library_reads() -> None:
    fast, library = transcoders()
    value = {
        "id": uuid.uuid4(), "at": datetime(2026, 11, 21, 10, 0, tzinfo=timezone(timedelta(hours=5, minutes=30))),
        "price": Decimal("0.000002"), "nested": [{"grant": uuid.uuid4(), "when": datetime.now(UTC)}, [uuid.uuid4()]],
        "text": "naïve – ünïcode", "none": None, "flag": True, "amount": -(10**18),
    }
    assert library.decode(fast.encode(value)) == value
    assert fast.decode(fast.encode(value)) == library.decode(library.encode(value))


def test_orjson_transcoder_writes_the_library_s_bytes() -> None:
    """Byte for byte what eventsourcing's own transcoder writes (datetimes, UUIDs and Decimals nested anywhere)."""
    fast, library = transcoders()
    value = {
        "id": uuid.uuid4(), "at": datetime(2026, 11, 21, 10, 0, tzinfo=timezone(timedelta(hours=5, minutes=30))),
        "price": Decimal("0.000002"), "old": datetime(999, 1, 1, 0, 0, 0, 5),
        "nested": [{"grant": uuid.uuid4(), "when": datetime.now(UTC), "plain": {"a": 1}}, [uuid.uuid4(), Decimal(3)]],
        "text": "naïve – ünïcode", "none": None, "flag": True, "amount": -(10**18), "ratio": 0.5,
    }
    assert fast.encode(value) == library.encode(value)


def test_plain_states_are_encoded_as_the_walk_encodes_them() -> None:
    """``encode_plain_state`` (a usage debit's event state) writes the walk's bytes, or declines (``None``)."""
    fast, library = transcoders()
    grant = str(uuid.uuid4())
    usage = {
        "timestamp": datetime(2026, 11, 21, 10, 0, tzinfo=UTC), "chain_hash": "0" * 64, "command_id": uuid.uuid4(),
        "meter": "tokens", "unit": "USD", "amount": 2_000,
        "postings": [{"account": "tenant_wallet", "unit": "USD", "amount": 1_500, "grant_id": grant},
                     {"account": "recognised_revenue", "unit": "USD", "amount": -1_500, "grant_id": grant},
                     {"account": "receivables", "unit": "USD", "amount": 500, "grant_id": None},
                     {"account": "recognised_revenue", "unit": "USD", "amount": -500, "grant_id": None}],
        "draws": [{"grant_id": grant, "amount": 1_000}, {"grant_id": str(uuid.uuid4()), "amount": 500}],
        "overage": 500, "credit_grant": None, "cause": {"event_id": "é☃\"\n", "period": "2026-11", "n": 1.5,
                                                        "ok": True, "none": None},
        "at": datetime(1, 1, 1, tzinfo=UTC), "absorbed": [{"grant_id": grant, "amount": 3}], "empty": [],
        "scalars": [1, "a", None, 2.5], "later": datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
    }
    assert encode_plain_state(usage) == fast.encode(usage) == library.encode(usage)
    declined = [
        {"at": datetime(2026, 11, 21, 10, 0, tzinfo=timezone(timedelta(hours=1)))},  # not UTC
        {"at": datetime(2026, 11, 21, 10, 0)},  # naive
        {"cause": {"id": uuid.uuid4()}}, {"cause": {"at": datetime.now(UTC)}}, {"cause": {"a": {"b": 1}}},
        {"draws": [{"grant_id": uuid.uuid4(), "amount": 1}]}, {"draws": [[1]]}, {"draws": ({"a": 1},)},
        {"price": Decimal("1.5")}, {"big": 2**70}, {"nested_big": {"n": 2**70}}, {"tags": {1, 2}},
        {"credit_grant": {"grant_id": "g", "effective_at": datetime.now(UTC), "cause": {}}},
    ]
    for state in declined:
        assert encode_plain_state(state) is None, state
        if "tags" not in state:
            assert fast.encode(state) == library.encode(state)


def test_batches_store_what_the_mapper_stores(app: LedgerApplication) -> None:
    """``_to_stored_events`` (a batch's events, plain states encoded without the walk) = ``mapper.to_stored_event``."""
    open_account(app, "acme")
    at = datetime(2026, 11, 21, 10, 0, tzinfo=UTC).isoformat()
    app.apply_commands([command("credit.grant", "acme", {"grant_key": f"g{n}", "unit": "USD", "amount": "1",
                                                         "source": "promotion"}, key=f"g{n}") for n in range(3)])
    account = app.repository.get(BillingAccount.create_id("acme"))
    for n, (amount, cause) in enumerate([(2_000_000_000, {"event_id": "x"}), (0, {}), (-7, {"period": "2026-11"}),
                                         (5, {"event_id": "é☃", "nested": {"a": [1]}, "big": 2**70})]):
        account.debit_usage(command_id=uuid.uuid4(), unit="USD", amount=amount, meter="m",
                            at=datetime.fromisoformat(at) + timedelta(seconds=n), overage_policy="overage", cause=cause)
    events = account.collect_events()
    assert len(events) >= 4
    assert app._to_stored_events(events) == [app.mapper.to_stored_event(e) for e in events]


def test_orjson_transcoder_tags_datetime_subclasses_as_datetimes() -> None:
    class Moment(datetime):
        pass

    fast, library = transcoders()
    at = Moment(2026, 11, 21, 10, 0, 0, 7, tzinfo=UTC)
    assert library.decode(fast.encode({"at": at, "more": [at]})) == {"at": at, "more": [at]}


def test_orjson_transcoder_falls_back_for_what_orjson_refuses() -> None:
    fast, library = transcoders()
    huge = {"amount": 10**30, "id": uuid.UUID(int=7)}
    assert library.decode(fast.encode(huge)) == huge


def pool(version_bumps: int) -> ResourcePool:
    p = ResourcePool.open(tenant="acme", resource="seats")
    for capacity in range(1, version_bumps + 1):
        p.set_capacity(capacity, {})
    p.collect_events()
    return p


def test_cache_hands_an_aggregate_to_one_taker_and_keeps_the_newest() -> None:
    cache = AggregateCache(aggregates_max=2)
    newer, older = pool(3), pool(1)
    cache.put(newer)
    cache.put(older)  # an older version never replaces a newer one
    taken = cache.take(newer.id)
    assert taken is newer and cache.take(newer.id) is None
    cache.put(taken)
    others = [pool(1) for _ in range(2)]
    for other in others:
        other._id = uuid.uuid4()  # distinct ids for the size bound
        cache.put(other)
    assert len(cache) == 2 and cache.take(newer.id) is None  # least recently used went first


def test_receipt_state_is_what_the_mapper_stores(app: LedgerApplication) -> None:
    at = datetime(2026, 11, 21, 10, 0, 0, 123456, tzinfo=UTC)
    for tenant, reason in (("acme", None), (None, "unknown_command")):
        command_id = uuid.uuid4()
        event = CommandReceipt.recorded(command_id=command_id, kind="usage.debit", tenant=tenant, outcome="rejected",
                                        reason=reason, issued_by="rating", at=at)
        expected = app.mapper.to_stored_event(event)
        state = CommandReceipt.recorded_state(command_id=command_id, kind="usage.debit", tenant=tenant,
                                              outcome="rejected", reason=reason, issued_by="rating",
                                              at_tagged={"_type_": "datetime_iso", "_data_": at.isoformat()})
        assert orjson.dumps(state) == expected.state
        assert RECORDED_TOPIC == expected.topic
        decoded = app.mapper.to_domain_event(expected)
        assert (decoded.command_id, decoded.tenant, decoded.reason, decoded.timestamp) == (command_id, tenant, reason, at)


def test_batch_receipts_are_stored_readable_and_first(app: LedgerApplication) -> None:
    open_account(app, "a", {"key": "g", "amount": "100"})
    debit = command("usage.debit", "a", {"unit": "USD", "amount_subunits": 5, "meter": "m",
                                         "at": "2026-11-21T10:00:00+00:00"}, key="d1")
    batch = app._prepare([debit], None, True)
    assert batch.stored[0].topic == RECORDED_TOPIC and len(batch.stored) == 2
    app._commit(batch)
    receipt = app.repository.get(debit.command_id)
    assert (receipt.outcome, receipt.kind, receipt.tenant, receipt.version) == ("applied", "usage.debit", "a", 1)


def test_inserts_lock_every_aggregate_they_record_a_version_after_the_first_of() -> None:
    # A decision under an account's lock read it at version >= 1; any other writer of that account records
    # version >= 2 and so takes the lock first. An aggregate recorded only at version 1 (a receipt, a new
    # account) is not locked: a race on it is refused by the unique (aggregate, version) as always.
    account, receipt, new = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    events = [StoredEvent(receipt, 1, RECORDED_TOPIC, b"{}"), StoredEvent(account, 7, "t", b"{}"),
              StoredEvent(account, 8, "t", b"{}"), StoredEvent(new, 1, "t", b"{}"), StoredEvent(new, 2, "t", b"{}")]
    assert existing_aggregates(events) == {account, new}

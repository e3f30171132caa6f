"""Storage helpers: the orjson transcoder keeps eventsourcing's stored format; the aggregate cache's rules."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import orjson
from billing_ledger.aggregate_cache import AggregateCache
from billing_ledger.application import LedgerApplication
from billing_ledger.domain.allocation import ResourcePool
from billing_ledger.domain.receipt import RECORDED_TOPIC, CommandReceipt
from billing_ledger.pg_recorder import existing_aggregates
from billing_ledger.transcoder import OrjsonTranscoder
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

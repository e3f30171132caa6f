"""The one-pass debit handler (``debits.project``) writes exactly what the six read models' handlers write."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from billing_projections import debits
from billing_projections.facts import Fact
from billing_projections.service import PROJECTIONS, ProjectionService
from billing_projections.writer import BatchWriter

from tests.unit.projections.conftest import apply, dump, sqlite_service
from tests.unit.projections.ledger_events import Ledger, full_scenario

GRANT = "9f1c8a52-0000-4000-8000-000000000001"
OTHER_GRANT = "9f1c8a52-0000-4000-8000-000000000002"


def _debit(**changes: Any) -> dict[str, Any]:
    """A relay-shaped ``UsageDebited`` body; ``changes`` replace (or, as None values in ``cause``, drop) fields."""
    data: dict[str, Any] = {
        "command_id": "c-1", "meter": "ai_tokens", "unit": "USD", "amount": 200, "overage": 0, "credit_grant": None,
        "at": "2026-11-03T10:00:00.123456+00:00",
        "postings": [{"account": "tenant_wallet", "unit": "USD", "amount": 200, "grant_id": GRANT},
                     {"account": "recognised_revenue", "unit": "USD", "amount": -200, "grant_id": GRANT}],
        "draws": [{"grant_id": GRANT, "amount": 200}],
        "cause": {"event_ids": ["e1"], "period": "2026-11", "quantity": "1200", "usage_type": "ai", "model": "m1",
                  "operation": "chat", "user": "u1", "tokens": {"input": "1000", "output": "200"},
                  "properties": {"model": "m1", "operation": "chat", "user": "u1"}},
    }
    data.update(changes)
    return data


SHAPES: list[dict[str, Any]] = [
    _debit(),
    _debit(amount=-50, postings=[{"account": "tenant_wallet", "unit": "USD", "amount": -50, "grant_id": GRANT},
                                 {"account": "recognised_revenue", "unit": "USD", "amount": 50, "grant_id": GRANT}]),
    _debit(amount=300, overage=100, postings=[
        {"account": "tenant_wallet", "unit": "USD", "amount": 200, "grant_id": GRANT},
        {"account": "receivables", "unit": "USD", "amount": 100},
        {"account": "recognised_revenue", "unit": "USD", "amount": -300}]),
    _debit(amount=0, postings=[]),
    _debit(cause=None),
    _debit(cause="not a map"),
    _debit(cause={}),
    _debit(cause={"quantity": "", "event_id": "solo", "payment_id": " pay-1 ", "issued_by": "svc"}),
    _debit(cause={"quantity": "7.50", "usage_type": "compute", "properties": {"input_tokens": "5",
                                                                             "completion_tokens": 2}}),
    _debit(cause={"quantity": 12, "model": "m2", "properties": "odd", "user": "", "requested_by": "ops"}),
    _debit(cause={"quantity": "3", "properties": {"model": " m3 ", "token_class": "cached", "user": "u9"}}),
    _debit(cause={"quantity": "nan", "model": "m4", "tokens": {"prompt": "1", "weird": "2", "cached_input": "x"}}),
    _debit(unit="CREDIT", meter="api_calls", postings=[
        {"account": "tenant_wallet", "unit": "CREDIT", "amount": 200, "grant_id": GRANT},
        {"account": "tenant_wallet", "unit": "CREDIT", "amount": 5, "grant_id": OTHER_GRANT},
        {"account": "recognised_revenue", "unit": "CREDIT", "amount": -205}]),
    _debit(postings=[{"account": "tenant_wallet", "unit": "EUR", "amount": 10, "grant_id": GRANT},
                     {"account": "recognised_revenue", "unit": "EUR", "amount": -10}]),
    _debit(credit_grant={"grant_id": OTHER_GRANT, "unit": "USD", "amount": 1000, "source": "promotion"}),
    _debit(at=None, effective_at=None),
    _debit(cause={"quantity": "700", "corrects": "e0", "quantity_old": "500", "quantity_new": "700"}),
    _debit(amount=-50, cause={"quantity": "0", "corrects": "e0", "quantity_old": "300", "quantity_new": "0"}),
    _debit(cause={"quantity": "700", "corrects": "e0", "quantity_new": "700"}),
    _debit(cause={"quantity": "700", "corrects": "", "quantity_old": "500", "quantity_new": "700"}),
    # What the event added to the meter's total (a count meter: 1 whatever its quantity; its void -1), and debits
    # recorded before ``contribution`` (after - before; an AI meter's token totals are not its quantity).
    _debit(meter="requests", cause={"quantity": "5", "quantity_before": "3", "quantity_after": "4",
                                    "contribution": "1"}),
    _debit(meter="requests", cause={"quantity": "0", "corrects": "e0", "quantity_old": "5", "quantity_new": "0",
                                    "quantity_before": "4", "quantity_after": "3", "contribution": "-1"}),
    _debit(meter="requests", cause={"quantity": "5", "quantity_before": "3", "quantity_after": "4"}),
    _debit(meter="requests", cause={"quantity": "9", "corrects": "e0", "quantity_old": "5", "quantity_new": "9",
                                    "quantity_before": "4", "quantity_after": "4"}),
    _debit(meter="requests", cause={"quantity": "5", "contribution": "x", "quantity_before": "3",
                                    "quantity_after": "4"}),
    _debit(meter="requests", cause={"quantity": "5", "quantity_before": "3", "quantity_after": None}),
    _debit(cause={**_debit()["cause"], "quantity_before": "0", "quantity_after": "1200", "ai_prices": {}}),
    # A correction on a meter whose events name a model: the AI usage read model takes the event's own quantity.
    _debit(meter="requests", cause={"quantity": "9", "corrects": "e0", "quantity_old": "5", "quantity_new": "9",
                                    "contribution": "0", "properties": {"model": "m1"}}),
    _debit(meter="calls", cause={"quantity": "700", "corrects": "e0", "quantity_old": "500", "quantity_new": "700",
                                 "properties": {"model": "m1"}}),
    # A close debit (max/last/unique_count) counts the events its line counted; of 0 (within the allowance) too.
    _debit(meter="disk", cause={"quantity": "9", "closed": True, "event_count": 3, "event_ids": ["d1", "d2", "d3"]}),
    _debit(amount=0, postings=[], draws=[], cause={"quantity": "9", "closed": True, "event_count": 2}),
    _debit(cause={"quantity": "9", "closed": True, "event_count": "2"}),
    _debit(cause={"quantity": "9", "closed": False, "event_count": 2}),
    # A give-back whose part a finance-override refund already paid back is absorbed (no postings for it).
    _debit(amount=-100, absorbed=[{"grant_id": GRANT, "amount": 60}],
           postings=[{"account": "tenant_wallet", "unit": "USD", "amount": -40, "grant_id": GRANT},
                     {"account": "recognised_revenue", "unit": "USD", "amount": 40, "grant_id": GRANT}],
           draws=[{"grant_id": GRANT, "amount": -40}]),
    _debit(amount=-100, absorbed=[{"grant_id": GRANT, "amount": 60}, {"grant_id": OTHER_GRANT, "amount": 40}],
           postings=[], draws=[]),
    _debit(amount=-50, absorbed="odd"),
    _debit(amount=-50, absorbed=[]),
    # Late usage of the period before drawing a grant through the carry into it (``carry_of``), and its give-back: the
    # grant's row counts it (``carry_drawn``, since session 15).
    _debit(draws=[{"grant_id": GRANT, "amount": 200, "carry_of": [OTHER_GRANT]}]),
    _debit(amount=-50, postings=[{"account": "tenant_wallet", "unit": "USD", "amount": -50, "grant_id": GRANT},
                                 {"account": "recognised_revenue", "unit": "USD", "amount": 50, "grant_id": GRANT}],
           draws=[{"grant_id": GRANT, "amount": -50, "carry_of": [OTHER_GRANT]}]),
    _debit(draws="odd"),
    # Late usage of before a downgrade drawing the old allowance, reinstated into its grant first (since session 15).
    _debit(postings=[{"account": "recognised_revenue", "unit": "USD", "amount": 500, "grant_id": GRANT},
                     {"account": "tenant_wallet", "unit": "USD", "amount": -500, "grant_id": GRANT},
                     {"account": "tenant_wallet", "unit": "USD", "amount": 200, "grant_id": GRANT},
                     {"account": "recognised_revenue", "unit": "USD", "amount": -200, "grant_id": GRANT}],
           draws=[{"grant_id": GRANT, "amount": 200, "reinstated": 500, "reinstated_from": "recognised_revenue"}]),
    # What the one-pass handler reads its own way (postings walked in place, the usual quantity, contribution and
    # token texts decoded directly, one event id as is): every other shape of them takes the shared rules.
    _debit(postings=[{"account": "tenant_wallet", "unit": "USD", "amount": "150", "grant_id": GRANT},
                     {"account": "tenant_wallet", "unit": "USD", "amount": 50, "grant_id": GRANT},
                     {"account": "recognised_revenue", "unit": "USD", "amount": -150},
                     {"account": "recognised_revenue", "unit": "USD", "amount": -50}]),
    _debit(postings=[{"account": "tenant_wallet", "unit": "USD", "amount": 200, "grant_id": GRANT},
                     {"account": 7, "unit": "USD", "amount": -200}]),
    _debit(postings=[{"account": "tenant_wallet", "unit": "USD", "amount": 200, "grant_id": GRANT},
                     {"account": "recognised_revenue", "unit": 840, "amount": -200}]),
    _debit(postings=[{"account": "tenant_wallet", "unit": "USD", "amount": 200}]),
    _debit(postings=[]),
    _debit(postings="odd"),
    *(_debit(cause={**_debit()["cause"], "quantity": quantity}) for quantity in (
        "0", "-0", "0.000", " 12 ", "1e3", "-5", "Infinity", "NaN", "sNaN", "x", "", 1200, 0, True, None)),
    *(_debit(cause={**_debit()["cause"], "contribution": contribution}) for contribution in (
        "1200", "0", "-0.5", " 3 ", "Infinity", "x", "", 7, 0, None, False)),
    _debit(cause={**_debit()["cause"], "contribution": "2", "closed": True, "event_count": 4}),
    *(_debit(cause={**_debit()["cause"], "tokens": tokens}) for tokens in (
        {"input": 1000, "output": "200"}, {"Input": "10", "OUTPUT": " 2 ", "prompt": "3"},
        {"input": "nan", "output": "-Infinity"}, {"input": "x"}, {"other": "5"}, {}, {"input": None, "cached": 1.5},
        {"input": "1e2", "cached_input": "0.5", "completion": True}, "odd")),
    *(_debit(cause={**_debit()["cause"], "event_ids": ids}) for ids in (
        ["e1", "e2"], [5], [""], [], ("e1",), "e9", None)),
    # The zone of the subscription periods that bill the usage (rating's ``cause.time_zone``): the month of the usage
    # time there, at both ends of a UTC month; a zone not known here, or not a name, leaves the UTC month.
    *(_debit(at=at, cause={**_debit()["cause"], "time_zone": zone})
      for at in ("2026-11-30T23:30:00+00:00", "2026-12-01T03:30:00.5+00:00", "2026-11-15T12:00:00+00:00",
                 "2026-12-31T23:30:00Z", "2027-01-01T04:59:59.999999+00:00")
      for zone in ("Europe/Berlin", "America/New_York", "Pacific/Kiritimati", "UTC", "", None, "Nope/Nowhere",
                   "Europe", "../etc", 5, ["Europe/Berlin"])),
    _debit(at="2026-11-30T23:30:00+00:00", meter="requests",
           cause={"quantity": "0", "corrects": "e0", "quantity_old": "5", "quantity_new": "0", "contribution": "-1",
                  "time_zone": "Europe/Berlin"}),
    _debit(at="2026-11-30T23:30:00+00:00", meter="disk",
           cause={"quantity": "9", "closed": True, "event_count": 3, "time_zone": "Europe/Berlin"}),
]


def _facts(shapes: list[dict[str, Any]], tenant: str = "acme") -> list[Fact]:
    return [Fact(i + 1, "acct-1", debits.EVENT_TYPE, "2026-11-03T10:00:01.000000Z", copy.deepcopy(data), tenant)
            for i, data in enumerate(shapes)]


def _state(writer: BatchWriter) -> tuple[Any, Any]:
    """Everything a writer would write, exactly (``repr``: ``Decimal('1')`` is not ``1``). Rows are sorted (the
    writer sorts them before writing); appended rows stay in their order (the order they are copied in)."""
    rows = {name: sorted(((key, (row.init, row.set, row.add)) for key, row in found[1].items()), key=repr)
            for name, found in writer._rows.items() if found[1]}  # a table without rows writes nothing
    appends = {name: list(found[1].items()) for name, found in writer._appends.items() if found[1]}
    return repr(sorted(rows.items())), repr(sorted(appends.items()))


@pytest.mark.parametrize("tenant", ["acme", ""])
def test_every_shape_of_debit_writes_the_same_rows(tenant: str) -> None:
    for shapes in ([s] for s in SHAPES):
        general, fused = BatchWriter(), BatchWriter()
        for fact in _facts(shapes, tenant):
            for handler in debits.HANDLERS:
                handler(fact, general)
        for fact in _facts(shapes, tenant):
            debits.project(fact, fused)
        assert _state(fused) == _state(general), shapes


def test_a_batch_of_debits_merges_like_the_general_path() -> None:
    """Many debits on the same rows (sums, last values), in one writer."""
    general, fused = BatchWriter(), BatchWriter()
    for fact in _facts(SHAPES * 3):
        for handler in debits.HANDLERS:
            handler(fact, general)
    for fact in _facts(SHAPES * 3):
        debits.project(fact, fused)
    assert _state(fused) == _state(general)


def test_debits_merge_like_the_general_path_into_rows_other_events_changed() -> None:
    """Rows another event of the batch created or set first (a grant, a manual adjustment, an expiry: their columns
    in ``set``, not ``add``) take the debits' changes alike: the one-pass handler's quick adds are for its own."""
    granted = {"grant_id": GRANT, "unit": "USD", "amount": 10_000, "priority": 0, "source": "promotion",
               "effective_at": "2026-11-01T00:00:00+00:00", "expires_at": None, "tax_amount": 0, "cause": {},
               "postings": [{"account": "promotional_expense", "unit": "USD", "amount": 10_000, "grant_id": GRANT},
                            {"account": "tenant_wallet", "unit": "USD", "amount": -10_000, "grant_id": GRANT}]}
    expired = {"grant_id": GRANT, "unit": "USD", "remainder": 70, "at": "2026-11-03T11:00:00+00:00",
               "postings": [{"account": "tenant_wallet", "unit": "USD", "amount": 70, "grant_id": GRANT},
                            {"account": "breakage", "unit": "USD", "amount": -70, "grant_id": GRANT}]}
    events = [("BillingAccount.CreditGranted", granted), *((debits.EVENT_TYPE, d) for d in SHAPES),
              ("BillingAccount.GrantExpired", expired), *((debits.EVENT_TYPE, d) for d in SHAPES)]
    facts = [Fact(i + 1, "acct-1", kind, "2026-11-03T10:00:01.000000Z", copy.deepcopy(data), "acme")
             for i, (kind, data) in enumerate(events)]
    general, fused = BatchWriter(), BatchWriter()
    for fact in facts:
        for module in PROJECTIONS:
            if (handler := module.handler_for(fact.type)) is not None:
                handler(fact, general)
    service = ProjectionService(None)  # type: ignore[arg-type]
    for fact in copy.deepcopy(facts):
        for handler in service._handlers_of(fact.type):
            handler(fact, fused)
    assert _state(fused) == _state(general)


def test_the_service_uses_the_one_pass_handler_for_debits_only() -> None:
    service = ProjectionService(None)  # type: ignore[arg-type]
    assert service._handlers_of(debits.EVENT_TYPE) == (debits.project,)
    assert debits.project not in service._handlers_of("BillingAccount.CreditGranted")


async def test_real_ledger_events_give_the_same_read_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """The ledger's own events (every movement kind, debits interleaved with the rest) through the service,
    with the one-pass handler and with the read models' own handlers: identical tables."""
    ledger = Ledger()
    full_scenario(ledger, "acme")
    full_scenario(ledger, "globex")
    records = ledger.records()
    assert sum(json.loads(r.value)["type"] == debits.EVENT_TYPE for r in records) >= 10
    dumps = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(debits, "handler_for", lambda event_type: None)
        async with sqlite_service(tmp_path / f"p{fused}.sqlite") as service:
            await apply(service, records, batch=7)
            dumps.append(await dump(service.db))
    assert dumps[0] == dumps[1]


async def test_kafka_client_records_apply_under_the_topics_own_name(tmp_path: Path) -> None:
    """A rebuild passes the Kafka client's records as they come (named after the namespaced topic, ``value``
    possibly None): the rows equal those of ``Record``s, and positions are kept under the topic's own name, so a
    second replay of either kind skips everything."""
    from aiokafka import ConsumerRecord
    from billing_events import topics

    from tests.unit.projections.conftest import apply
    from tests.unit.projections.ledger_events import by_partition

    ledger = Ledger()
    full_scenario(ledger, "acme")
    records = ledger.records()
    dumps = []
    for raw in (False, True):
        async with sqlite_service(tmp_path / f"r{raw}.sqlite") as service:
            if raw:
                for part in by_partition(records).values():
                    batch = [ConsumerRecord(f"ns1.{r.topic}", r.partition, r.offset, 0, 0, r.key, r.value, None, 0,
                                            0, list(r.headers)) for r in part]
                    batch.append(ConsumerRecord(f"ns1.{topics.LEDGER_EVENTS}", batch[-1].partition,
                                                batch[-1].offset + 1, 0, 0, None, None, None, 0, 0, []))  # no value
                    await service.handle_partitions([batch], topic=topics.LEDGER_EVENTS)
                    await service.handle_partitions([batch], topic=topics.LEDGER_EVENTS)
            else:
                await apply(service, records)
                await apply(service, records)
            dumps.append(await dump(service.db))
            positions = await service.db.fetch("SELECT DISTINCT topic FROM positions")
            assert [p["topic"] for p in positions] == [topics.LEDGER_EVENTS]
    plain, raw_dump = dumps
    # The value-less record at each partition's end is skipped (malformed), its offset applied all the same.
    assert [(t, p, o + 1, last) for t, p, o, last in plain.pop("positions")] == raw_dump.pop("positions")
    assert plain["accounts"] and plain == raw_dump


async def test_records_no_read_model_needs_are_skipped_by_their_headers_without_decoding(tmp_path: Path) -> None:
    """A command receipt (the relay's ``type`` header names it) moves the position on, is never decoded (its
    value here is not even JSON), and changes no row; replaying it again is skipped as re-relayed."""
    from billing_runtime.bus import Record

    from tests.unit.projections.ledger_events import by_partition

    ledger = Ledger()
    full_scenario(ledger, "acme")
    records = ledger.records()
    dumps = []
    for receipts in (False, True):
        async with sqlite_service(tmp_path / f"h{receipts}.sqlite") as service:
            for part in by_partition(records).values():
                batch = list(part)
                if receipts:
                    last = json.loads(batch[-1].value)["position"]
                    batch.append(Record(batch[-1].topic, batch[-1].partition, batch[-1].offset + 1, None,
                                        b"not json", (("type", b"CommandReceipt.Recorded"),
                                                      ("position", str(last + 1).encode()))))
                await service.handle_partitions([batch])
                await service.handle_partitions([batch])
            dumps.append(await dump(service.db))
    plain, with_receipts = dumps
    # Same rows; each partition's stored position is one further (the receipt's), its offset too.
    assert [(t, p, o + 1, last + 1) for t, p, o, last in plain.pop("positions")] == with_receipts.pop("positions")
    assert plain["accounts"] and plain == with_receipts


@pytest.mark.parametrize(("at", "zone", "month"), [
    ("2026-11-30T23:30:00+00:00", "Europe/Berlin", "2026-12"),  # 00:30 on Dec 1 in Berlin
    ("2026-12-01T03:30:00+00:00", "America/New_York", "2026-11"),  # 22:30 on Nov 30 in New York
    ("2026-12-01T05:00:00+00:00", "America/New_York", "2026-12"),  # 00:00 on Dec 1 in New York
    ("2026-11-30T23:30:00+00:00", "UTC", "2026-11"),
    ("2026-11-30T23:30:00+00:00", None, "2026-11"),  # recorded before rating named zones: its UTC month
    ("2026-11-30T23:30:00+00:00", "Nope/Nowhere", "2026-11"),
])
def test_a_debit_is_summed_into_the_month_of_its_usage_time_in_the_zone_it_names(
        at: str, zone: str | None, month: str) -> None:
    for fused in (True, False):
        writer = BatchWriter()
        for fact in _facts([_debit(at=at, cause={**_debit()["cause"], "time_zone": zone})]):
            if fused:
                debits.project(fact, writer)
            else:
                for handler in debits.HANDLERS:
                    handler(fact, writer)
        monthly = [key[1] for key in writer._rows["usage_monthly"][1]]
        ai = [key[1] for key in writer._rows["ai_usage"][1]]
        figures = [key[1] for key in writer._rows["figures_daily"][1]]
        assert (monthly, ai, figures) == ([month], [month], [at[:10]])  # the daily figures stay by UTC day

"""Integers beyond 64 bits in ``billing.ledger.events`` (a usage debit's cause is recorded as sent, and the ledger
relays its integers exact since session 14) are read exact by the projections, and the event is projected.

Before, the projections decoded every record with orjson, which reads an integer outside [-2**63, 2**64) as a float
and one beyond a double's range not at all: 2**128 in a usage event's properties showed in the transaction history
as 3.402823669209385e+38, and a debit whose cause held 10**400 was skipped as malformed, its money missing from the
balances. Records come from the ledger's own aggregate and relay (``ledger_events.Ledger``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from billing_projections import lists, views
from billing_projections.facts import MalformedEvent, json_text, parse_event
from billing_projections.service import ProjectionService

from tests.unit.projections.conftest import apply, dumps_by_batching
from tests.unit.projections.ledger_events import T0, Ledger, usage_cause

LONG = [2**128, 10**400, -(2**63) - 1, 2**64]


def _debits(ledger: Ledger) -> None:
    """20.00 granted, then one 1.00 debit per long integer, carried by the usage event's properties and the cause."""
    ledger.command("account.open", "acme", currency="USD")
    ledger.command("credit.grant", "acme", unit="USD", amount="20", grant_key="g", source="manual",
                   effective_at=(T0 - timedelta(hours=1)).isoformat())
    for n, number in enumerate(LONG):
        cause = {**usage_cause(f"e{n}", "3", request_id=number), "counters": [number, 1]}
        ledger.command("usage.debit", "acme", unit="USD", amount_subunits=10**9, meter="api_calls", key=f"k{n}",
                       cause=cause)


async def test_a_debit_with_integers_beyond_64_bits_is_projected_with_them_exact(service: ProjectionService) -> None:
    ledger = Ledger()
    _debits(ledger)
    await apply(service, ledger.records())
    balance = await views.balance_view(service.db, "acme", datetime.now(UTC))
    assert balance is not None
    assert [(w["unit"], w["balance"]) for w in balance["wallets"]] == [("USD", "16.00")]  # every debit counted
    items, _ = await lists.transactions(service.db, tenant="acme", types=["usage"], limit=10)
    by_event = {item["cause"]["event_ids"][0]: item for item in items}
    assert sorted(by_event) == [f"e{n}" for n in range(len(LONG))]
    for n, number in enumerate(LONG):
        cause = by_event[f"e{n}"]["cause"]
        assert cause["properties"]["request_id"] == number and type(cause["properties"]["request_id"]) is int
        assert cause["counters"] == [number, 1]
        assert by_event[f"e{n}"]["amount"] == "-1.00"


async def test_the_rows_do_not_depend_on_batching_or_replays(tmp_path: Path) -> None:
    ledger = Ledger()
    _debits(ledger)
    dumps = await dumps_by_batching(ledger.records(), tmp_path, seed=7, size_max=3, replay_all=True)
    assert dumps[0] == dumps[1] == dumps[2]


def test_a_long_integer_is_written_back_as_orjson_writes_the_rest() -> None:
    value = {"z": [1, "é☃\n", {"a": None, "b": True, "c": 1.5}], "big": 2**70, "small": -(2**63) - 1}
    assert json_text(value) == ('{"big":1180591620717411303424,"small":-9223372036854775809,'
                                '"z":[1,"é☃\\n",{"a":null,"b":true,"c":1.5}]}')
    assert json_text({"z": 1, "a": [2**63 - 1]}) == '{"a":[9223372036854775807],"z":1}'  # orjson's own


@pytest.mark.parametrize("raw", [
    b'{"schema": "ledger.event/v1", "position": 1, "data": {"n": 12345678901234567890123, "x": NaN}}',
    b'{"schema": "ledger.event/v1", "position": 1, "data": {"n": 12345678901234567890123, "x": Infinity}}',
    b'{"schema": "ledger.event/v1", "position": 1, "data": {"n": 12345678901234567890123}',
    b'{"schema": "ledger.event/v1", "position": 1, "data": {"n": 12345678901234567890123, "s": "\xff"}}',
])
def test_a_record_with_a_long_integer_is_still_refused_when_it_is_not_json(raw: bytes) -> None:
    with pytest.raises(MalformedEvent, match="not JSON"):
        parse_event(raw)

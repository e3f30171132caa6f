"""The monthly usage summaries put usage in the month its subscription's invoice bills it in: the month of its usage
time in the subscription's time zone, which rating names on the debit (``cause.time_zone``). The real ledger and
rating wired by hand (``wired_stack``), the ledger's events projected by the real projection service."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest
from billing_events import ids, topics
from billing_events.messages import AcceptedUsage, UsageEvent
from billing_events.money import SUBUNITS_PER_UNIT
from billing_ledger import http as ledger_http
from billing_ledger.hold_commands import hold_id
from billing_ledger.http import build_router
from billing_runtime.bus import Record
from billing_runtime.http import create_app
from fastapi.testclient import TestClient

from tests.unit.ledger.ledger_support import SETTINGS, headers
from tests.unit.projections.conftest import apply, dumps_by_batching, sqlite_service
from tests.unit.projections.test_usage_monthly_free_usage import ledger_records, pump
from tests.unit.subscriptions.test_cancel_after_period_end import Stack, wired_stack

PER_CALL = {"model": "per_unit", "unit": "USD", "unit_amount": "0.10"}
AI = {"unit": "USD", "models": {"small": {"input": "1.00", "output": "2.00"}}}
CATALOG: dict[str, Any] = {
    "meters": [{"code": "api_calls", "price": PER_CALL},
               {"code": "peak", "aggregation": "max", "price": PER_CALL},  # priced when its period closes
               {"code": "ai_tokens", "required_properties": ["model"], "ai_prices": AI}],
    "plans": [{"code": "p", "name": "P", "version": 1, "currency": "USD", "base_fee": "10.00", "cadence": "month",
               "charges": [{"meter": "api_calls", "price": PER_CALL}, {"meter": "peak", "price": PER_CALL}]}],
}
MINUTE = timedelta(minutes=1)


def local(zone: str, *args: int) -> datetime:
    return datetime(*args, tzinfo=ZoneInfo(zone)).astimezone(UTC)  # type: ignore[misc]


async def use(stack: Stack, event_id: str, meter: str, quantity: str, at: datetime, **properties: str) -> None:
    event = UsageEvent(id=event_id, tenant="acme", meter=meter, quantity=quantity, timestamp=at,
                       properties=properties)
    message = AcceptedUsage(account_id=ids.account_id("acme"), event=event, accepted_at=at, source="test",
                            catalog_version=1)
    await stack.rating.handle_accepted([Record(topics.USAGE_ACCEPTED, 0, 0, None, message.to_json())])
    await stack.deliver()


@pytest.mark.parametrize("zone", ["Europe/Berlin", "America/New_York"])
async def test_usage_at_a_local_month_boundary_is_summed_into_the_month_its_invoice_bills(
        tmp_path: Path, zone: str) -> None:
    nov_1, dec_1, jan_1 = local(zone, 2026, 11, 1), local(zone, 2026, 12, 1), local(zone, 2027, 1, 1)
    # Around Dec 1 00:00 local: in Berlin the UTC month is November an hour longer (Dec 1 00:30 local is Nov 30
    # 23:30 UTC), in New York December starts five hours early in UTC (Nov 30 22:30 local is Dec 1 03:30 UTC).
    async with wired_stack(tmp_path, CATALOG) as stack:
        stack.run("subscription.create", nov_1, key="m", plan="p", time_zone=zone)
        await pump(stack)
        await use(stack, "n0", "api_calls", "60", nov_1 + 30 * MINUTE)     # Nov 1 00:30 local: November
        await use(stack, "n1", "api_calls", "50", dec_1 - 30 * MINUTE)     # Nov 30 23:30 local: November
        await use(stack, "np", "peak", "5", dec_1 - 30 * MINUTE)
        await use(stack, "na", "ai_tokens", "3", dec_1 - 30 * MINUTE, model="small", input_tokens="3")
        await use(stack, "d1", "api_calls", "200", dec_1 + 30 * MINUTE)    # Dec 1 00:30 local: December
        await use(stack, "dp", "peak", "7", dec_1 + 30 * MINUTE)
        await use(stack, "da", "ai_tokens", "4", dec_1 + 30 * MINUTE, model="small", output_tokens="4")
        stack.run("subscription.tick", dec_1, key="m")
        await pump(stack)
        await use(stack, "d2", "api_calls", "5", jan_1 - 30 * MINUTE)      # Dec 31 23:30 local: December
        stack.run("subscription.tick", jan_1, key="m")
        await pump(stack)
        assert all(r.outcome in ("applied", "duplicate") for r in stack.results), stack.results
        # The invoice billing each local month's usage (drafted at its end): period month -> meter -> quantity.
        invoiced = {}
        for month, end in (("2026-11", dec_1), ("2026-12", jan_1)):
            invoice = stack.invoice(end.isoformat())
            assert invoice.status == "finalized"
            invoiced[month] = {item["meter"]: item["quantity"] for item in invoice.lines if item["kind"] == "usage"}
        assert invoiced == {"2026-11": {"api_calls": "110", "peak": "5", "ai_tokens": "3"},
                            "2026-12": {"api_calls": "205", "peak": "7", "ai_tokens": "4"}}
        records = ledger_records(stack)
    async with sqlite_service(tmp_path / "p.sqlite") as service:
        await apply(service, records)
        monthly = await service.db.fetch("SELECT period, meter, quantity FROM usage_monthly WHERE tenant = 'acme'")
        ai = await service.db.fetch("SELECT period, tokens FROM ai_usage WHERE tenant = 'acme'")
    summary: dict[str, dict[str, str]] = {}
    for row in monthly:
        summary.setdefault(row["period"], {})[row["meter"]] = str(Decimal(row["quantity"]))
    # Summed by UTC month, Berlin's showed api_calls 60+50+200 in November and 5 in December (n0 in October),
    # New York's 60 in November and 50+200+5 in December.
    assert summary == invoiced
    assert {row["period"]: str(Decimal(row["tokens"])) for row in ai} == {"2026-11": "3", "2026-12": "4"}
    # Replayed in any batching, the same rows.
    one, everything, random_slices = await dumps_by_batching(records, tmp_path, seed=3, size_max=5, replay_all=True)
    assert one == everything == random_slices


async def test_usage_of_a_utc_subscription_and_of_an_account_without_one_stays_in_its_utc_month(
        tmp_path: Path) -> None:
    nov_1, dec_1 = datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)
    async with wired_stack(tmp_path, CATALOG) as stack:
        await pump(stack)  # the catalogue, to rating
        await use(stack, "o1", "api_calls", "3", nov_1 - 30 * MINUTE)  # no subscription yet: calendar month (UTC)
        stack.run("subscription.create", nov_1, key="m", plan="p")
        await pump(stack)
        await use(stack, "n1", "api_calls", "50", dec_1 - 30 * MINUTE)
        await use(stack, "d1", "api_calls", "200", dec_1 + 30 * MINUTE)
        await pump(stack)
        records = ledger_records(stack)
    debits = [r for r in records if b"UsageDebited" in r.value]
    assert len(debits) == 3 and all(b"time_zone" not in r.value for r in debits)
    async with sqlite_service(tmp_path / "p.sqlite") as service:
        await apply(service, records)
        rows = await service.db.fetch("SELECT period, quantity FROM usage_monthly WHERE tenant = 'acme'")
    assert {r["period"]: str(Decimal(r["quantity"])) for r in rows} == {"2026-10": "3", "2026-11": "50",
                                                                        "2026-12": "200"}


HOUR = timedelta(hours=1)


def costs_by_month(rows: list[Any]) -> dict[str, dict[str, Decimal]]:
    """period -> meter -> cost in units."""
    found: dict[str, dict[str, Decimal]] = {}
    for row in rows:
        found.setdefault(row["period"], {})[row["meter"]] = Decimal(int(row["cost"])) / SUBUNITS_PER_UNIT
    return found


async def capture_and_use(stack: Stack, name: str, at: datetime) -> None:
    """A hold of 2.00 captured for 1.50 at ``at`` (the ledger's ``hold.capture``, as the HTTP route sends it) and 10
    api_calls (1.00) used at the same instant."""
    hold = str(hold_id("acme", name))
    stack.run("hold.place", at - MINUTE, hold_id=hold, amount="2.00", expires_at=(at + HOUR).isoformat())
    stack.run("hold.capture", at, hold_id=hold, amount="1.50")
    await use(stack, name, "api_calls", "10", at)


def capture_over_http(client: TestClient, monkeypatch: pytest.MonkeyPatch, name: str, at: datetime) -> None:
    """``POST /v1/accounts/acme/holds`` (2.00) and ``POST .../holds/{id}/capture`` (1.50), the routes' clock at ``at``."""
    monkeypatch.setattr(ledger_http, "_now", lambda: at)
    service = headers("service")
    placed = client.post("/v1/accounts/acme/holds", json={"idempotency_key": name, "amount": "2.00"},
                         headers=service)
    assert placed.status_code == 201 and placed.json()["approved"] is True, placed.text
    captured = client.post(f"/v1/accounts/acme/holds/{placed.json()['hold_id']}/capture", json={"amount": "1.50"},
                           headers=service)
    assert captured.status_code == 200 and captured.json()["status"] == "captured", captured.text


@pytest.mark.parametrize("zone", ["Europe/Berlin", "America/New_York"])
async def test_a_hold_captured_over_http_is_summed_into_the_local_month_a_usage_debit_at_that_instant_is_in(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, zone: str) -> None:
    nov_1, dec_1 = local(zone, 2026, 11, 1), local(zone, 2026, 12, 1)
    async with wired_stack(tmp_path, CATALOG) as stack:
        stack.run("credit.grant", nov_1, grant_key="bought", unit="USD", amount="100.00", source="purchase")
        stack.run("subscription.create", nov_1, key="m", plan="p", time_zone=zone)
        await pump(stack)
        api = create_app("ledger-test", SETTINGS)
        api.include_router(build_router(stack.ledger))
        with TestClient(api) as client:
            for name, at in (("nov", dec_1 - 30 * MINUTE), ("dec", dec_1 + 30 * MINUTE)):  # 23:30, 00:30 local
                capture_over_http(client, monkeypatch, name, at)
                await use(stack, name, "api_calls", "10", at)  # 1.00 at the same instant
        await pump(stack)
        assert all(r.outcome in ("applied", "duplicate") for r in stack.results), stack.results
        records = ledger_records(stack)
    account = str(ids.account_id("acme")).encode()
    async with sqlite_service(tmp_path / "p.sqlite") as service:
        # The account's own events alone (its partition), as a rebuild worker replays them: no subscription event.
        await apply(service, [r for r in records if r.key == account])
        rows = await service.db.fetch("SELECT period, meter, cost FROM usage_monthly WHERE tenant = 'acme'")
    # Summed by UTC month, Berlin's showed the capture at Dec 1 00:30 local in November next to the debit at that
    # instant in December (New York's the capture at Nov 30 22:30 local in December, its debit in November).
    assert costs_by_month(rows) == {"2026-11": {"api_calls": Decimal("1.00"), "holds": Decimal("1.50")},
                                    "2026-12": {"api_calls": Decimal("1.00"), "holds": Decimal("1.50")}}
    one, everything, random_slices = await dumps_by_batching(records, tmp_path, seed=5, size_max=4, replay_all=True)
    assert one == everything == random_slices


async def test_a_captured_hold_of_a_utc_account_before_or_without_a_subscription_or_recorded_before_stays_in_its_utc_month(
        tmp_path: Path) -> None:
    nov_1, dec_1 = local("Europe/Berlin", 2026, 11, 1), local("Europe/Berlin", 2026, 12, 1)
    async with wired_stack(tmp_path, CATALOG) as stack:
        stack.run("credit.grant", nov_1 - 2 * HOUR, grant_key="bought", unit="USD", amount="100.00",
                  source="purchase")
        await pump(stack)  # the catalogue, to rating
        # Oct 31 23:30 UTC, Nov 1 00:30 in Berlin, before the Berlin subscription starts: billed by calendar month.
        hold = str(hold_id("acme", "early"))
        stack.run("hold.place", nov_1 - HOUR, hold_id=hold, amount="2.00", expires_at=(nov_1 + HOUR).isoformat())
        stack.run("hold.capture", nov_1 - 30 * MINUTE, hold_id=hold, amount="0.50")
        stack.run("subscription.create", nov_1, key="m", plan="p", time_zone="Europe/Berlin")
        await pump(stack)
        await capture_and_use(stack, "dec", dec_1 + 30 * MINUTE)  # Nov 30 23:30 UTC, Dec 1 00:30 in Berlin
        records = ledger_records(stack)
    captures = [orjson.loads(r.value)["data"] for r in records if b"HoldCaptured" in r.value]
    assert [c["time_zone"] for c in captures] == [None, "Europe/Berlin"]
    # The same capture recorded before session 12 named no zone: it keeps its UTC month on replay.
    recorded_before = [Record(r.topic, r.partition, r.offset, r.key, _without_zone(r.value), r.headers)
                       if b"HoldCaptured" in r.value else r for r in records]
    async with sqlite_service(tmp_path / "p.sqlite") as service:
        await apply(service, records)
        rows = await service.db.fetch("SELECT period, meter, cost FROM usage_monthly WHERE tenant = 'acme'")
    async with sqlite_service(tmp_path / "before.sqlite") as service:
        await apply(service, recorded_before)
        before = await service.db.fetch("SELECT period, meter, cost FROM usage_monthly WHERE tenant = 'acme'")
    assert costs_by_month(rows) == {"2026-10": {"holds": Decimal("0.50")},
                                    "2026-12": {"api_calls": Decimal("1.00"), "holds": Decimal("1.50")}}
    assert costs_by_month(before) == {"2026-10": {"holds": Decimal("0.50")}, "2026-11": {"holds": Decimal("1.50")},
                                      "2026-12": {"api_calls": Decimal("1.00")}}


def _without_zone(value: bytes) -> bytes:
    envelope = orjson.loads(value)
    del envelope["data"]["time_zone"]
    return orjson.dumps(envelope)

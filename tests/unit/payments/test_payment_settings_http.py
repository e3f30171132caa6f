"""HTTP routes of the auto-top-up rule and the low-balance threshold, down to their effect on the ledger."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from billing_events import ids
from billing_ledger import alerts, topups
from billing_ledger.application import LedgerApplication

from tests.unit.payments.support import TENANT, FakeStripe, client, headers, ledger, run, stripe_gateway

__all__ = ["ledger"]
NOW = datetime.now(UTC)


def fund(app: LedgerApplication, usd: str) -> None:
    assert run(app, "credit.grant", TENANT, "g", unit="USD", amount=usd, grant_key="start", source="manual",
               effective_at=(NOW - timedelta(days=1)).isoformat()).outcome == "applied"


def debit(app: LedgerApplication, key: str, usd: int) -> None:
    at = datetime.now(UTC) + timedelta(seconds=1)  # after the credit bought just before is effective
    assert run(app, "usage.debit", TENANT, key, unit="USD", amount_subunits=usd * 10**9, meter="api_calls",
               at=at.isoformat(), cause={}).outcome == "applied"


def available(app: LedgerApplication) -> int:
    value = app.read(ids.account_id(TENANT), lambda a: a.available("USD"))
    assert value is not None
    return value // 10**9


@pytest.mark.asyncio
async def test_put_auto_top_up_rule_then_a_low_balance_tops_up(ledger: LedgerApplication) -> None:
    api = FakeStripe()
    gateways = {"stripe": stripe_gateway(api)}
    http = client(ledger, gateways)
    url = f"/v1/accounts/{TENANT}/auto-top-up"
    rule = {"threshold": "10", "target": "50", "cooldown_seconds": 600, "monthly_cap": "200"}
    assert http.put(url, headers=headers("viewer"), json=rule).status_code == 403
    assert http.put(url.replace(TENANT, "other"), headers=headers(), json=rule).status_code == 403
    for bad in ({**rule, "package": "credits-10k"}, {"threshold": "10", "monthly_cap": "200"},
                {**rule, "threshold": 10.5}, {**rule, "target": "5"}, {**rule, "surprise": 1}):
        refused = http.put(url, headers=headers(), json=bad)
        assert refused.status_code == 422, (bad, refused.text)
    unknown = http.put(url, headers=headers(), json={"threshold": "10", "package": "nope", "monthly_cap": "200"})
    assert unknown.status_code == 422 and unknown.json()["reason"] == "unknown_package"
    other_unit = http.put(url, headers=headers(), json={"threshold": "10", "package": "credits-10k",
                                                        "monthly_cap": "500"})  # gives CREDIT, not USD
    assert other_unit.status_code == 422 and other_unit.json()["reason"] == "invalid_auto_top_up"
    assert http.put(url, headers=headers(), json={"threshold": "10", "package": "usd-100",
                                                  "monthly_cap": "500"}).status_code == 200

    saved = http.put(url, headers=headers("finance"), json=rule)  # replaces the package rule
    assert saved.status_code == 200, saved.text
    assert saved.json()["auto_top_up"] == {"unit": "USD", **rule, "package": None}

    run(ledger, "payment_method.add", TENANT, "pm", method_id="pm_1", gateway="stripe", label="visa")
    fund(ledger, "20")
    debit(ledger, "u1", 15)  # 5 left, below 10: top up to 50
    assert await topups.process_pending(ledger, gateways, None) == ["paid"]
    assert available(ledger) == 50

    cleared = http.delete(url, headers=headers())
    assert cleared.status_code == 200 and cleared.json()["cleared"] is True
    debit(ledger, "u2", 45)
    assert await topups.process_pending(ledger, gateways, None) == []  # no rule: no request
    assert available(ledger) == 5


def test_a_cooldown_or_amount_that_is_not_exact_is_refused_and_changes_nothing(ledger: LedgerApplication) -> None:
    """A cooldown of 1.9 was saved as 1 second (and answered as 1.9), true as 1; "abc" was refused with Python's
    words. Each is a 422 invalid_auto_top_up problem now, and the rule in effect stays as it was."""
    http = client(ledger, {})
    url = f"/v1/accounts/{TENANT}/auto-top-up"
    rule = {"threshold": "10", "target": "50", "cooldown_seconds": 600, "monthly_cap": "200"}
    saved = http.put(url, headers=headers(), json={**rule, "cooldown_seconds": 60})
    assert saved.status_code == 200 and saved.json()["auto_top_up"]["cooldown_seconds"] == 60
    kept = ledger.read(ids.account_id(TENANT), lambda a: dict(a._auto_top_up["USD"]))
    assert kept is not None and kept["cooldown_seconds"] == 60
    for field, bad, words in (("cooldown_seconds", 1.9, "whole number"), ("cooldown_seconds", "abc", "whole number"),
                              ("cooldown_seconds", True, "whole number"), ("cooldown_seconds", "600", "whole number"),
                              ("cooldown_seconds", -5, "[0, 31622400]"),
                              ("cooldown_seconds", 10**12, "[0, 31622400]"),
                              ("threshold", True, "not true"), ("threshold", "abc", "not a decimal"),
                              ("threshold", -5, "negative"), ("target", 0.5, "binary float"),
                              ("monthly_cap", "1.001", "decimals"), ("monthly_cap", False, "not false")):
        refused = http.put(url, headers=headers(), json={**rule, field: bad})
        assert refused.status_code == 422, (field, bad, refused.text)
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert refused.json()["reason"] == "invalid_auto_top_up" and field in refused.json()["detail"], refused.text
        assert words in refused.json()["detail"], refused.text
    assert ledger.read(ids.account_id(TENANT), lambda a: dict(a._auto_top_up["USD"])) == kept
    # Left out, the cooldown is the documented default, and the answer says so.
    default = http.put(url, headers=headers(), json={k: v for k, v in rule.items() if k != "cooldown_seconds"})
    assert default.status_code == 200 and default.json()["auto_top_up"]["cooldown_seconds"] == 3600


@pytest.mark.asyncio
async def test_put_low_balance_threshold_raises_an_alert(ledger: LedgerApplication) -> None:
    http = client(ledger, {})
    url = f"/v1/accounts/{TENANT}/low-balance"
    assert http.put(url, headers=headers(), json={}).status_code == 422
    assert http.put(url, headers=headers(), json={"threshold": "-1"}).status_code == 422
    assert http.put(url, headers=headers(), json={"threshold": "5", "unit": "EUR"}).status_code == 422
    saved = http.put(url, headers=headers(), json={"threshold": "10"})
    assert saved.status_code == 200, saved.text
    assert saved.json()["low_balance"] == {"unit": "USD", "threshold": "10"}

    fund(ledger, "20")
    debit(ledger, "u1", 15)
    [alert] = await alerts.process_pending(ledger, None)
    assert (alert["tenant"], alert["unit"], Decimal(alert["threshold"])) == (TENANT, "USD", 10)

    assert http.put(url, headers=headers(), json={"threshold": None}).json()["low_balance"]["threshold"] is None
    fund_more = run(ledger, "credit.grant", TENANT, "g2", unit="USD", amount="20", grant_key="more",
                    source="manual", effective_at=(NOW - timedelta(days=1)).isoformat())
    assert fund_more.outcome == "applied"
    debit(ledger, "u2", 20)
    assert await alerts.process_pending(ledger, None) == []  # removed: no alert


def account_state(app: LedgerApplication) -> tuple[object, ...]:
    """The account's version (an event would move it) and its units."""
    return app.read(ids.account_id(TENANT), lambda a: (a.version, a.units()))  # type: ignore[return-value]


LOW, TOP_UP = "low-balance", "auto-top-up"
RULE = {"threshold": "5.10", "target": "50.50", "monthly_cap": "100.99"}  # whole cents: taken


@pytest.mark.parametrize(("route", "body", "reason", "fine"), [
    # finer than the unit allows (checkout quotes refuse 10.001 too): were accepted
    (LOW, {"threshold": "5.0000000001"}, "invalid_low_balance", {"threshold": "5.10"}),
    (LOW, {"threshold": "5.001"}, "invalid_low_balance", {"threshold": "5.10"}),
    (LOW, {"threshold": "2.5", "unit": "CREDIT"}, "invalid_low_balance", {"threshold": "3", "unit": "CREDIT"}),  # scale 0
    (TOP_UP, {**RULE, "target": "50.001"}, "invalid_auto_top_up", RULE),
    (TOP_UP, {**RULE, "threshold": "5.001"}, "invalid_auto_top_up", RULE),
    (TOP_UP, {**RULE, "monthly_cap": "100.009"}, "invalid_auto_top_up", RULE),
    # a unit nobody declared: ZZZ made an alert of its own
    (LOW, {"threshold": "5", "unit": "ZZZ"}, "unknown_unit", {"threshold": "5", "unit": "USD"}),
    (TOP_UP, {"unit": "ZZZ", "threshold": "5", "package": "credits-10k", "monthly_cap": "100"}, "unknown_unit",
     {"unit": "CREDIT", "threshold": "5", "package": "credits-10k", "monthly_cap": "100000"}),
])
def test_an_undeclared_unit_or_an_amount_finer_than_its_unit_is_refused(
        ledger: LedgerApplication, route: str, body: dict[str, object], reason: str, fine: dict[str, object]) -> None:
    http = client(ledger, {})
    before = account_state(ledger)
    refused = http.put(f"/v1/accounts/{TENANT}/{route}", headers=headers(), json=body)
    assert (refused.status_code, refused.headers["content-type"]) == (422, "application/problem+json"), refused.text
    assert refused.json()["reason"] == reason
    assert account_state(ledger) == before
    taken = http.put(f"/v1/accounts/{TENANT}/{route}", headers=headers(), json=fine)
    assert taken.status_code == 200, taken.text


def test_a_command_naming_an_undeclared_unit_is_rejected_with_its_reason(ledger: LedgerApplication) -> None:
    """Over Kafka too: rejected (its receipt says why), nothing changed."""
    before = account_state(ledger)
    result = run(ledger, "low_balance.set", TENANT, "lb", unit="ZZZ", threshold="5")
    assert (result.outcome, result.reason) == ("rejected", "unknown_unit")
    assert account_state(ledger) == before

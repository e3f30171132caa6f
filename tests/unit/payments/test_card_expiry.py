"""Saved cards' expiry (seed 004, "proactive notifications ... for card expirations"): when a card expires (the end
of its expiry month, wherever that month still runs), the notices the leader task records once per card expiry
(across restarts and two leaders), their emails, and a card the gateway's account updater renewed. A SQLite ledger,
a real SMTP server, an injected clock."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from billing_events.cards import CardDetailsError, card_details
from billing_ledger.alerts import EXPIRED_TOPIC, EXPIRING_TOPIC, process_pending
from billing_ledger.application import LedgerApplication, persistence_env
from billing_ledger.card_expiry_notices import CardExpiryNotices
from billing_ledger.domain.card_expiry import (
    EXPIRED,
    EXPIRING,
    LAST_TIME_ZONE,
    card_expires_at,
    is_expired,
    notice_due,
)
from billing_ledger.domain.roster import roster_id
from billing_ledger.notifier import SmtpSettings
from billing_ledger.saved_methods import method_view

from tests.support import Inbox
from tests.unit.payments.support import run

__all__: list[str] = []
TENANT = "cardco"


def card(month: int, year: int, last4: str = "4242", brand: str = "visa") -> dict[str, Any]:
    return {"brand": brand, "last4": last4, "exp_month": month, "exp_year": year}


class Clock:
    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


def open_ledger(path: Path) -> LedgerApplication:
    return LedgerApplication(persistence_env(None, str(path / "ledger")))


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[LedgerApplication]:
    app = open_ledger(tmp_path)
    assert run(app, "account.open", TENANT, currency="USD").outcome == "applied"
    added = run(app, "payment_method.add", TENANT, "visa", method_id="pm_visa", gateway="stripe", card=card(12, 2026))
    assert added.outcome == "applied", added
    # A backup without card details (a bank debit, or saved before the ledger kept them): never a notice.
    assert run(app, "payment_method.add", TENANT, "sepa", method_id="pm_sepa", gateway="stripe").outcome == "applied"
    yield app
    app.close()


def notices_recorded(app: LedgerApplication) -> list[str]:
    found = app.process_recorder.select_notifications(1, 1000, topics=[EXPIRING_TOPIC, EXPIRED_TOPIC])
    return [n.topic.rsplit(".", 1)[-1] for n in found]


# -- when a card expires ----------------------------------------------------------------------------------------


def test_a_card_is_good_through_the_last_day_of_its_expiry_month_wherever_that_day_still_runs() -> None:
    december = card(12, 2026)
    # The month has ended everywhere at 00:00 on 1 January at UTC-12: 12:00 UTC.
    assert card_expires_at(12, 2026) == datetime(2027, 1, 1, 12, tzinfo=UTC)
    # 31 December, 20:00 in Los Angeles is 1 January 04:00 UTC: still December there, the card is good.
    assert not is_expired(december, datetime(2026, 12, 31, 20, tzinfo=ZoneInfo("America/Los_Angeles")))
    assert not is_expired(december, datetime(2027, 1, 1, 11, 59, tzinfo=UTC))
    assert is_expired(december, datetime(2027, 1, 1, 12, tzinfo=UTC))
    # 1 January 01:00 in Kiritimati (UTC+14) is 31 December 11:00 UTC: good; 2 January 02:00 there: expired.
    assert not is_expired(december, datetime(2027, 1, 1, 1, tzinfo=ZoneInfo("Pacific/Kiritimati")))
    assert is_expired(december, datetime(2027, 1, 2, 2, tzinfo=ZoneInfo("Pacific/Kiritimati")))
    # A month in the middle of the year ends on its own last day (30 June), not on the 1st of the month.
    assert not is_expired(card(6, 2027), datetime(2027, 6, 30, 23, tzinfo=UTC))
    assert is_expired(card(6, 2027), datetime(2027, 7, 1, 12, tzinfo=UTC))
    assert not is_expired(None, datetime(2099, 1, 1, tzinfo=UTC))  # no card details: never called expired


def test_february_ends_on_the_29th_in_a_leap_year_and_the_notice_counts_back_from_its_real_end() -> None:
    leap, common = card(2, 2028), card(2, 2027)
    assert not is_expired(leap, datetime(2028, 2, 29, 23, 59, tzinfo=LAST_TIME_ZONE))
    assert is_expired(leap, datetime(2028, 3, 1, tzinfo=LAST_TIME_ZONE))
    # 30 days before the end of February: 31 January in 2028 (29 days in February), 30 January in 2027.
    assert notice_due(leap, datetime(2028, 1, 30, 23, 59, tzinfo=LAST_TIME_ZONE), 30) is None
    assert notice_due(leap, datetime(2028, 1, 31, tzinfo=LAST_TIME_ZONE), 30) == EXPIRING
    assert notice_due(common, datetime(2027, 1, 29, 23, 59, tzinfo=LAST_TIME_ZONE), 30) is None
    assert notice_due(common, datetime(2027, 1, 30, tzinfo=LAST_TIME_ZONE), 30) == EXPIRING
    # After the end the card is expired, not expiring; with no notice period, only the expired notice comes.
    assert notice_due(common, datetime(2027, 3, 1, 12, tzinfo=UTC), 30) == EXPIRED
    assert notice_due(common, datetime(2027, 2, 28, tzinfo=UTC), 0) is None


def test_card_details_are_brand_last_four_digits_and_expiry_never_a_number() -> None:
    assert card_details({"brand": "Visa", "last4": "4242", "exp_month": "07", "exp_year": "2031"}) == card(7, 2031)
    for bad in ({"brand": "visa", "last4": "4242424242424242", "exp_month": 12, "exp_year": 2030},  # a number
                {**card(12, 2030), "number": "4242424242424242"},  # nothing but the four fields
                {**card(12, 2030), "cvc": "123"},
                card(13, 2030), card(0, 2030), card(12, 30),  # a two-digit year is the adapter's to widen
                {**card(12, 2030), "exp_month": True}, {**card(12, 2030), "exp_month": 12.0},
                {**card(12, 2030), "brand": ""}, {**card(12, 2030), "last4": 4242}, "visa 4242"):
        with pytest.raises(CardDetailsError):
            card_details(bad)


def test_a_command_with_bad_card_details_is_rejected_and_saves_nothing(ledger: LedgerApplication) -> None:
    result = run(ledger, "payment_method.add", TENANT, "bad", method_id="pm_bad", gateway="stripe",
                 card={"brand": "visa", "last4": "4242424242424242", "exp_month": 12, "exp_year": 2030})
    assert (result.outcome, result.reason) == ("rejected", "invalid_card")
    assert ledger.read(roster_id(TENANT), lambda r: [m["method_id"] for m in r.payment_methods]) == [
        "pm_visa", "pm_sepa"]
    # Without a label, the method is named after its card.
    assert ledger.read(roster_id(TENANT), lambda r: r.payment_methods[0]["label"]) == "Visa 4242"


# -- the leader task --------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_each_notice_is_recorded_once_across_leader_restarts_and_emailed_once(
        tmp_path: Path, ledger: LedgerApplication, smtp: tuple[Inbox, int]) -> None:
    inbox, port = smtp
    mail = SmtpSettings("127.0.0.1", port, "billing@localhost", "billing", "tenants.test")
    clock = Clock(datetime(2026, 11, 15, tzinfo=UTC))  # 47 days before the end of December: nothing due
    leader = CardExpiryNotices(ledger, 30, now=clock)
    assert await leader.process() == []
    clock.at = datetime(2026, 12, 5, tzinfo=UTC)  # within 30 days of the end
    [expiring] = await leader.process()
    assert (expiring["tenant"], expiring["method_id"], expiring["notice"]) == (TENANT, "pm_visa", EXPIRING)
    assert await leader.process() == []
    ledger.close()
    app = open_ledger(tmp_path)  # the leader's process restarts: nothing in memory
    try:
        assert await CardExpiryNotices(app, 30, now=clock).process() == []
        clock.at = datetime(2027, 1, 1, 12, tzinfo=UTC)  # December has ended everywhere
        # Two leaders at the same moment (a lock handed over mid-round): one notice.
        results = await asyncio.gather(CardExpiryNotices(app, 30, now=clock).process(),
                                       CardExpiryNotices(app, 30, now=clock).process())
        assert [n["notice"] for n in results[0] + results[1]] == [EXPIRED]
        clock.at += timedelta(days=40)
        assert await CardExpiryNotices(app, 30, now=clock).process() == []
        assert notices_recorded(app) == ["PaymentMethodExpiring", "PaymentMethodExpired"]

        # The alerts task emails each notice once, to the tenant (no alert address configured), and a restart
        # of it does not resend them.
        sent = await process_pending(app, mail)
        assert [(a["type"], a["method_id"], a["email"]) for a in sent] == [
            ("payment_method_expiring", "pm_visa", True), ("payment_method_expired", "pm_visa", True)]
        assert sent[0]["expires_at"] == "2027-01-01T00:00:00-12:00" and sent[0]["last4"] == "4242"
        assert [(m["To"], m["Subject"]) for m in inbox.messages] == [
            ("cardco@tenants.test", "Card expiring: Visa 4242 (12/2026)"),
            ("cardco@tenants.test", "Card expired: Visa 4242 (12/2026)")]
        assert "default payment method" in inbox.messages[1].get_payload()
        assert await process_pending(app, mail) == []
        assert len(inbox.messages) == 2
    finally:
        app.close()


@pytest.mark.asyncio
async def test_a_card_renewed_by_the_gateway_is_not_expired_and_gets_notices_for_its_new_expiry(
        ledger: LedgerApplication) -> None:
    clock = Clock(datetime(2026, 12, 5, tzinfo=UTC))
    leader = CardExpiryNotices(ledger, 30, now=clock)
    assert [n["notice"] for n in await leader.process()] == [EXPIRING]
    # Stripe's account updater gave the card a new expiry (ingest: payment_method.automatically_updated).
    updated = run(ledger, "payment_method.card_update", TENANT, "evt_renewed", gateway="stripe", method_id="pm_visa",
                  card=card(12, 2029))
    assert (updated.outcome, updated.value) == ("applied", {"method_id": "pm_visa", "changed": True})
    clock.at = datetime(2027, 1, 2, tzinfo=UTC)
    assert await leader.process() == []  # the old expiry passed: the card is not expired
    [view] = [method_view(m, clock.at) for m in ledger.read(roster_id(TENANT), lambda r: r.payment_methods)[:1]]
    assert (view["card"], view["expires_at"], view["expired"]) == (
        card(12, 2029), "2030-01-01T00:00:00-12:00", False)
    clock.at = datetime(2029, 12, 10, tzinfo=UTC)
    assert [(n["method_id"], n["notice"]) for n in await leader.process()] == [("pm_visa", EXPIRING)]
    assert notices_recorded(ledger) == ["PaymentMethodExpiring", "PaymentMethodExpiring"]


def test_a_card_update_for_a_method_not_on_the_account_is_rejected_and_recorded(ledger: LedgerApplication) -> None:
    for method, gateway in (("pm_gone", "stripe"), ("pm_visa", "paypal")):
        result = run(ledger, "payment_method.card_update", TENANT, f"evt-{method}-{gateway}", gateway=gateway,
                     method_id=method, card=card(1, 2031))
        assert (result.outcome, result.reason) == ("rejected", "unknown_payment_method")
    same = run(ledger, "payment_method.card_update", TENANT, "evt-same", gateway="stripe", method_id="pm_visa",
               card=card(12, 2026))
    assert same.value == {"method_id": "pm_visa", "changed": False}  # what the roster has: no event
    assert ledger.read(roster_id(TENANT), lambda r: r.payment_methods[0]["card"]) == card(12, 2026)


def test_a_notice_period_beyond_the_bound_is_refused_at_startup(ledger: LedgerApplication) -> None:
    with pytest.raises(ValueError, match="card_expiry_notice_days"):
        CardExpiryNotices(ledger, 366)
    with pytest.raises(ValueError, match="card_expiry_notice_days"):
        CardExpiryNotices(ledger, -1)

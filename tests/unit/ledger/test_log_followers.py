"""The leader's followers of the event log that act on a few topics (top-ups, alerts, invoice emails, dunning, card
expiry notices, the subscription scheduler): each round reads only what was recorded since the round before, also
when none of its topics came meanwhile. Before, a follower went on from the last event it had acted on, so every
round (every 5 s) read every hold and debit recorded since: 100-150 ms per follower on a bench store, growing with
the log, and the holds decided meanwhile waited (p99 9-20 ms against the service). A SQLite ledger."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from billing_ledger import application as application_module
from billing_ledger.application import LedgerApplication, persistence_env
from billing_ledger.card_expiry_notices import CardExpiryNotices
from billing_ledger.domain.account import BillingAccount
from billing_ledger.dunning import Dunning
from billing_ledger.scheduler import DueIndex
from eventsourcing.utils import get_topic

from tests.unit.payments.support import run

__all__: list[str] = []
OPENED = get_topic(BillingAccount.Opened)


def open_ledger(path: Path) -> LedgerApplication:
    return LedgerApplication(persistence_env(None, str(path / "ledger")))


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[LedgerApplication]:
    app = open_ledger(tmp_path)
    yield app
    app.close()


class Scans:
    """The positions each ``select_notifications`` of the ledger's recorder started from."""

    def __init__(self, app: LedgerApplication, monkeypatch: pytest.MonkeyPatch) -> None:
        self.starts: list[int] = []
        recorder = app.process_recorder
        select = recorder.select_notifications

        def spied(start: int, limit: int, *args: Any, **kwargs: Any) -> Any:
            self.starts.append(start)
            return select(start, limit, *args, **kwargs)

        monkeypatch.setattr(recorder, "select_notifications", spied)


def busy(app: LedgerApplication, tenant: str, debits: int) -> None:
    """Events of other topics: a grant and ``debits`` usage debits on ``tenant``'s account."""
    key = uuid4().hex
    now = datetime.now(UTC)
    assert run(app, "credit.grant", tenant, key, unit="USD", amount="100", grant_key=key, source="manual",
               effective_at=(now - timedelta(hours=1)).isoformat()).outcome == "applied"
    for n in range(debits):
        assert run(app, "usage.debit", tenant, f"{key}-{n}", unit="USD", amount_subunits=10**7, meter="api_calls",
                   overage="overage", at=now.isoformat()).outcome == "applied"


def last_position(app: LedgerApplication) -> int:
    return app.process_recorder.max_notification_id() or 0


def test_a_round_that_finds_none_of_its_topics_is_not_read_again(ledger: LedgerApplication,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    assert run(ledger, "account.open", "acme", currency="USD").outcome == "applied"
    [opened] = ledger.unprocessed("follower", 100, [OPENED])
    ledger.processed("follower", opened.id)
    busy(ledger, "acme", 30)
    scans = Scans(ledger, monkeypatch)

    assert ledger.unprocessed("follower", 100, [OPENED]) == []
    end = last_position(ledger)
    busy(ledger, "acme", 0)  # one more event of another topic
    assert ledger.unprocessed("follower", 100, [OPENED]) == []
    # The first round read from the last event acted on; the second only what was recorded after the first.
    assert scans.starts == [opened.id + 1, end + 1]

    assert run(ledger, "account.open", "bravo", currency="USD").outcome == "applied"
    [found] = ledger.unprocessed("follower", 100, [OPENED])  # nothing of its topics is passed over
    assert found.originator_id == BillingAccount.create_id("bravo")
    assert ledger.unprocessed("follower", 100, [OPENED]) == [found]  # until it is processed


def test_a_follower_that_failed_on_what_it_found_finds_it_again(ledger: LedgerApplication) -> None:
    assert run(ledger, "account.open", "acme", currency="USD").outcome == "applied"
    busy(ledger, "acme", 5)
    [opened] = ledger.unprocessed("follower", 100, [OPENED])
    busy(ledger, "acme", 0)  # (no processed: acting on it failed)
    assert ledger.unprocessed("follower", 100, [OPENED]) == [opened]


def test_how_far_a_follower_scanned_is_recorded_for_the_next_process(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(application_module, "FOLLOWER_POSITION_RECORD_SECONDS", 0.0)
    first = open_ledger(tmp_path)
    try:
        assert run(first, "account.open", "acme", currency="USD").outcome == "applied"
        [opened] = first.unprocessed("follower", 100, [OPENED])
        first.processed("follower", opened.id)
        busy(first, "acme", 10)
        assert first.unprocessed("follower", 100, [OPENED]) == []
        end = last_position(first)
    finally:
        first.close()
    second = open_ledger(tmp_path)  # a restarted process
    try:
        scans = Scans(second, monkeypatch)
        assert second.unprocessed("follower", 100, [OPENED]) == []
        assert scans.starts == []  # nothing recorded since: nothing read
        busy(second, "acme", 0)
        assert second.unprocessed("follower", 100, [OPENED]) == []
        assert scans.starts == [end + 1]
    finally:
        second.close()


def test_the_position_is_recorded_at_most_every_so_often(ledger: LedgerApplication) -> None:
    assert run(ledger, "account.open", "acme", currency="USD").outcome == "applied"
    [opened] = ledger.unprocessed("follower", 100, [OPENED])
    ledger.processed("follower", opened.id)
    busy(ledger, "acme", 3)
    assert ledger.unprocessed("follower", 100, [OPENED]) == []
    recorded = ledger.process_recorder.max_tracking_id("follower")
    assert recorded == last_position(ledger)  # the first empty round records it
    busy(ledger, "acme", 0)
    assert ledger.unprocessed("follower", 100, [OPENED]) == []
    assert ledger.process_recorder.max_tracking_id("follower") == recorded  # the next ones, not within a minute


def test_a_full_page_goes_on_from_its_last_event(ledger: LedgerApplication) -> None:
    for tenant in ("a", "b", "c"):
        assert run(ledger, "account.open", tenant, currency="USD").outcome == "applied"
        busy(ledger, tenant, 2)
    found, after = ledger.scan_notifications(0, 2, [OPENED])
    assert [n.originator_id for n in found] == [BillingAccount.create_id(t) for t in ("a", "b")]
    assert after == found[-1].id
    rest, end = ledger.scan_notifications(after, 2, [OPENED])
    assert [n.originator_id for n in rest] == [BillingAccount.create_id("c")]
    assert end == last_position(ledger)
    assert ledger.scan_notifications(end, 2, [OPENED]) == ([], end)


def test_dunning_card_notices_and_the_scheduler_go_on_from_the_end_of_their_last_scan(
        ledger: LedgerApplication, monkeypatch: pytest.MonkeyPatch) -> None:
    assert run(ledger, "account.open", "acme", currency="USD").outcome == "applied"
    busy(ledger, "acme", 20)
    dunning, notices, index = Dunning(ledger, {}, None, [1, 3]), CardExpiryNotices(ledger, 7), DueIndex()
    rounds = (dunning._scan, notices._catch_up, lambda: index.catch_up(ledger))
    for round_ in rounds:
        round_()
    end = last_position(ledger)
    assert (dunning.position, notices.position, index.position) == (end, end, end)

    busy(ledger, "acme", 0)
    scans = Scans(ledger, monkeypatch)
    for round_ in rounds:
        round_()
    assert scans.starts == [end + 1] * 3

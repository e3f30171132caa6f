"""``credit.grant`` grants in a declared unit only (docs/money.md), as adjustments and holds do: a code neither ISO
4217 nor a credit unit of the published catalogue is rejected ``unknown_unit``, recorded, nothing granted."""

from __future__ import annotations

import asyncio

from billing_events import ids, topics
from billing_events.catalog import EXAMPLE as CATALOG
from billing_events.messages import LedgerCommand
from billing_ledger.application import LedgerApplication
from billing_ledger.service import LedgerService
from billing_runtime.bus import Record

from tests.unit.ledger.ledger_support import apply, command, open_account


def grant(unit: str, key: str) -> LedgerCommand:
    return command("credit.grant", "acme", {"grant_key": key, "unit": unit, "amount": "5", "source": "manual"},
                   key=key)


def test_a_grant_in_a_unit_nothing_declares_is_rejected_with_unknown_unit_and_recorded(
        app: LedgerApplication) -> None:
    """A ``ZZZ`` grant (or a CREDIT grant before a catalogue declares CREDIT) made a wallet nothing prices."""
    open_account(app, "acme")
    before = list(app.events.get(ids.account_id("acme")))
    sent = [grant("ZZZ", "z"), grant("CREDIT", "c")]
    asyncio.run(LedgerService(app).handle_records(  # as consumed from Kafka
        [Record(topics.LEDGER_COMMANDS, 0, i, b"acme", c.to_json()) for i, c in enumerate(sent)]))
    assert list(app.events.get(ids.account_id("acme"))) == before
    assert app.read(ids.account_id("acme"), lambda a: a.units()) == []
    for again in apply(app, *sent):
        # Its receipt says why: the same command again is a duplicate of a rejection, with its reason.
        assert (again.outcome, again.first_outcome, again.reason) == ("duplicate", "rejected", "unknown_unit")
    [rejected] = apply(app, grant("ZZZ", "z2"))
    assert (rejected.outcome, rejected.reason) == ("rejected", "unknown_unit")
    assert "ZZZ" in (rejected.detail or "") and "catalogue" in (rejected.detail or "")

    [published] = apply(app, command("catalog.publish", None, {"document": CATALOG, "digest": "c1"}))
    assert published.outcome == "applied"
    assert [r.outcome for r in apply(app, grant("CREDIT", "c2"), grant("USD", "u"))] == ["applied", "applied"]
    assert app.read(ids.account_id("acme"), lambda a: a.units()) == ["CREDIT", "USD"]

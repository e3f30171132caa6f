"""A correction of usage already invoiced, as the real rating service sends it (SQLite ledger and rating wired by
hand, see ``test_cancel_after_period_end``): a credit note against the invoice that billed it."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from billing_events import ids
from billing_events.messages import AcceptedUsage, UsageEvent
from billing_events.topics import USAGE_ACCEPTED
from billing_runtime.bus import Record

from tests.unit.subscriptions import test_cancel_after_period_end as wiring
from tests.unit.subscriptions.test_cancel_after_period_end import DEC_1, Stack

stack = wiring.stack  # the ledger and rating wired by hand (that module's fixture)


async def test_a_correction_rating_rates_after_the_invoice_is_credited_against_that_invoice(stack: Stack) -> None:
    await stack.use("nov", "250", datetime(2026, 11, 20, tzinfo=UTC))  # 100 included, 150 x 0.10 = 15.00
    stack.run("subscription.tick", DEC_1, key="m")
    await stack.relay()  # rating closes November
    await stack.deliver()  # its usage lines finalize the renewal
    renewal = stack.invoice(DEC_1.isoformat())
    assert (renewal.status, renewal.total) == ("finalized", Decimal("46.00"))  # 31.00 + 15.00
    await stack.use("dec", "150", datetime(2026, 12, 5, tzinfo=UTC))  # December's overage: 5.00
    # November's event corrected from 250 to 240 calls: rating rates it late, into December, naming November.
    event = UsageEvent(id="nov-fix", tenant="acme", meter="api_calls", quantity="240",
                       timestamp=datetime(2026, 11, 20, tzinfo=UTC), correction_of="nov")
    message = AcceptedUsage(account_id=ids.account_id("acme"), event=event, accepted_at=datetime(2026, 12, 6, tzinfo=UTC),
                            source="test", catalog_version=1)
    await stack.rating.handle_accepted([Record(USAGE_ACCEPTED, 0, 1, None, message.to_json())])
    await stack.deliver()
    assert all(r.outcome == "applied" for r in stack.results), stack.results
    [note] = [i for i in stack.invoices().values() if "/usage-correction/" in i.key]
    assert (note.document_type, note.total, note.related_invoice) == ("credit_note", Decimal("-1.00"), str(renewal.id))
    account = stack.ledger.repository.get(ids.account_id("acme"))
    assert account.available("USD") == 100 * 10**7  # 1.00 of account credit
    assert sum(account.unbilled_overage("USD").values()) == 500 * 10**7  # December's 5.00 still to bill

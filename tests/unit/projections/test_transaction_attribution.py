"""Who moved the money, on every row of the transaction history (seed 000: every movement with user attribution).

A refund request approved and completed by finance: its hold on the credit being refunded (placed at approval,
released at completion) and the refund itself name the finance user, as a void of the order's bonus grant did
already. A hold placed, captured and released through the holds API names the service token's subject.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from uuid import uuid4

from billing_projections.service import ProjectionService

from tests.unit.projections.conftest import apply, dumps_by_batching
from tests.unit.projections.ledger_events import T0, Ledger
from tests.unit.projections.test_credit_package_figures import CATALOG, buy

FINANCE, SERVICE = "finance@org-b", "svc-upstream"


def scenario(ledger: Ledger) -> None:
    ledger.command("catalog.publish", None, document=CATALOG, digest="packages-1")
    ledger.command("account.open", "acme", currency="USD")
    ledger.command("tax_profile.set", "acme", country="DE", business_name="Acme GmbH")
    buy(ledger, "o1")
    buy(ledger, "o2")
    at = T0 + timedelta(hours=1)
    ledger.command("refund_request.create", "acme", at=at, issued_by="owner@acme", key="r1", order="o1")
    ledger.command("refund_request.approve", "acme", at=at, issued_by=FINANCE, key="r1")
    ledger.command("refund_request.complete", "acme", at=at + timedelta(minutes=5), issued_by=FINANCE, key="r1",
                   gateway_refund="re_1")
    for n, settle in enumerate(("hold.capture", "hold.release")):
        hold = str(uuid4())
        ledger.command("hold.place", "acme", at=at, issued_by=SERVICE, hold_id=hold, unit="CREDIT", amount="10",
                       expires_at=(at + timedelta(hours=1)).isoformat())
        ledger.command(settle, "acme", at=at + timedelta(minutes=n + 1), issued_by=SERVICE, hold_id=hold,
                       **({"amount": "4"} if settle == "hold.capture" else {}))


async def test_refunds_and_holds_name_who_moved_the_credit(service: ProjectionService) -> None:
    ledger = Ledger()
    scenario(ledger)
    await apply(service, ledger.records())
    rows = await service.db.fetch("SELECT type, user_id, hold_id, reference FROM transactions "
                                  "WHERE tenant = $1 ORDER BY position", "acme")
    by_type: dict[str, list[str | None]] = {}
    for r in rows:
        by_type.setdefault(r["type"], []).append(r["user_id"])
    assert by_type["refund"] == [FINANCE]
    # The refund request's hold (placed at approval, released when the refund is booked), then the API's holds.
    assert by_type["hold_placed"] == [FINANCE, SERVICE, SERVICE]
    assert by_type["hold_released"] == [FINANCE, SERVICE]
    assert by_type["hold_captured"] == [SERVICE]
    assert None not in {u for users in by_type.values() for u in users}, by_type


async def test_attribution_does_not_depend_on_batching_or_replays(tmp_path: Path) -> None:
    ledger = Ledger()
    scenario(ledger)
    dumps = await dumps_by_batching(ledger.records(), tmp_path, seed=13, size_max=4, replay_all=True)
    assert dumps[0] == dumps[1] == dumps[2]

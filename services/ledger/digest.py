"""The daily income digest (opt-in: ``BILLING_DIGEST_RECIPIENT``): one email per UTC day about the day before.

Computed from the ledger's events *recorded* on that day (the notification log, so it needs no read model):

* funds taken in: purchase grants (``CreditGranted``, source ``purchase``) - for a checkout order the money
  paid (its ``total``, in the order's currency), else the amount granted plus its tax. A purchase granted in
  a credit unit has its money booked in the currency by a ``PurchaseMoneyBooked`` (total and tax): that
  event counts, not the grant (grants recorded before that booking existed fall back to their order);
* tax collected: the tax of those purchases;
* credit consumed: ``UsageDebited`` and ``HoldCaptured`` amounts, per unit;
* refunds: ``GrantRefunded`` - in the currency, what the refund's postings took out of the gateway's clearing
  (the credit refunded plus its tax: a reversed checkout order after a partial ``grant.refund`` counts only
  the rest); for a credit-unit grant with its money booked, the currency money paid back
  (``PurchaseMoneyRefunded``, in proportion to the credit refunded); for an older credit-unit grant without
  it, a reversed checkout order's total. Not the refunds of a chargeback: those are chargebacks;
* chargebacks (since session 13): money lost disputes took back through the gateway, tax included, counted as
  refunds are (the same events whose ``cause`` names the dispute: ``GrantRefunded``, ``PurchaseMoneyRefunded``) and
  an invoice's payment owed again (``DisputeClosed.owed``), as the projections' ``chargebacks`` figure counts them;
  the number of disputes they belong to is ``chargeback_count``;
* held for disputes: funds gateways withdrew for open disputes that day (``DisputeFundsWithdrawn``) less what they
  reinstated or a close returned to clearing (``DisputeFundsReinstated``, ``DisputeClosed.returned``): the
  projections' ``disputed`` figure, negative on a day more came back than was withdrawn;
* dispute fees (since session 14): what gateways charged the operator for disputes that day, less fees they gave back
  (``DisputeFeeBooked.amount``): the projections' ``dispute_fees`` figure.

One leader sends it (advisory lock, like the other payment tasks). Two tracking positions make it
restart-safe: ``digest:day`` holds the ordinal of the last day sent (a restart does not resend it), and
``digest:position`` the notification up to which every event was recorded before the end of that day (the
next day's scan starts there). The day is recorded before the position, so a crash between them only makes
the next scan start earlier. Days missed while no ledger ran (or the mail server refused) are sent
afterwards, oldest first, each with its own figures, at most the last ``DIGEST_BACKFILL_DAYS_MAX``; the very
first digest is yesterday's.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID

from billing_events.money import is_currency_code, to_subunits
from billing_events.timeutil import utcnow
from billing_ledger.amounts import credit_scales, show
from billing_ledger.application import LedgerApplication
from billing_ledger.domain.account import BillingAccount
from billing_ledger.domain.catalog import Catalog
from billing_ledger.domain.postings import LedgerAccount
from billing_ledger.limits import DIGEST_BACKFILL_DAYS_MAX
from billing_ledger.mail import send_text
from billing_ledger.notifier import SmtpSettings
from billing_runtime.logging import get_logger
from billing_runtime.service import pause
from eventsourcing.persistence import Tracking
from eventsourcing.utils import get_topic

log = get_logger(__name__)
DAY_NAME = "digest:day"
POSITION_NAME = "digest:position"
SCAN_BATCH_EVENTS_MAX = 1000
GRANTED, DEBITED, CAPTURED, REFUNDED = (get_topic(BillingAccount.CreditGranted),
                                        get_topic(BillingAccount.UsageDebited),
                                        get_topic(BillingAccount.HoldCaptured),
                                        get_topic(BillingAccount.GrantRefunded))
MONEY_BOOKED, MONEY_REFUNDED = (get_topic(BillingAccount.PurchaseMoneyBooked),
                                get_topic(BillingAccount.PurchaseMoneyRefunded))
# Subscription invoices paid through a gateway, and gateway refunds of them (their credit notes).
INVOICE_PAID, INVOICE_REFUNDED = (get_topic(BillingAccount.InvoicePaid),
                                  get_topic(BillingAccount.InvoicePaymentRefunded))
# Disputes (since session 13): the funds a gateway holds for them, and an invoice's payment a lost one takes back.
WITHDRAWN, REINSTATED, DISPUTE_CLOSED = (get_topic(BillingAccount.DisputeFundsWithdrawn),
                                         get_topic(BillingAccount.DisputeFundsReinstated),
                                         get_topic(BillingAccount.DisputeClosed))
DISPUTE_FEE = get_topic(BillingAccount.DisputeFeeBooked)  # since session 14
TOPICS = [GRANTED, DEBITED, CAPTURED, REFUNDED, MONEY_BOOKED, MONEY_REFUNDED, INVOICE_PAID, INVOICE_REFUNDED,
          WITHDRAWN, REINSTATED, DISPUTE_CLOSED, DISPUTE_FEE]
FIGURES = ("funds_in", "tax_collected", "consumed", "refunds", "chargebacks", "disputed", "dispute_fees")
Clock = Callable[[], datetime]


def _order_currency(app: LedgerApplication, cause: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The currency and quote of the checkout order a grant's cause names, if it names one."""
    try:
        order = UUID(str(cause.get("order_id")))
    except ValueError:
        return None
    quote = app.read(order, lambda o: dict(getattr(o, "quote", None) or {}))
    return (str(quote["currency"]), quote) if quote and quote.get("currency") else None


def _money_booked(app: LedgerApplication, account: UUID, grant: Any) -> bool:
    """Whether the credit-unit grant's money is booked in the currency (its own events count it then)."""
    try:
        return bool(app.read(account, lambda a: a.purchase_money(UUID(str(grant))) is not None))
    except (ValueError, LookupError):
        return False


def _out_of_clearing(postings: list[dict[str, Any]], unit: str) -> int:
    """What a refund's postings took out of the gateway's clearing in ``unit`` (sub-units, positive)."""
    return -sum(line["amount"] for line in postings
                if line["account"] == LedgerAccount.GATEWAY_CLEARING and line["unit"] == unit)


def _chargeback_of(event: Any) -> str | None:
    """The dispute a refund's event is the chargeback of (its ``cause.dispute``), else None."""
    cause = getattr(event, "cause", None)
    dispute = cause.get("dispute") if isinstance(cause, dict) else None
    return dispute if isinstance(dispute, str) and dispute else None


def summarize(app: LedgerApplication, day: date, start_after: int) -> tuple[dict[str, Any], int]:
    """The figures of ``day`` (UTC) in sub-units per unit, and the next scan's start position."""
    begin = datetime.combine(day, time(), UTC)
    end = begin + timedelta(days=1)
    sums: dict[str, dict[str, int]] = {name: defaultdict(int) for name in FIGURES}
    counts = {"purchase_count": 0, "refund_count": 0}
    disputes: set[tuple[UUID, str]] = set()  # the chargebacks' disputes (one may book several refund events)
    recorder = app.process_recorder
    position, mark, before_end = start_after, start_after, True
    while True:
        notifications = recorder.select_notifications(position + 1, SCAN_BATCH_EVENTS_MAX,
                                                      topics=TOPICS)
        for notification in notifications:
            position = notification.id
            event: Any = app.mapper.to_domain_event(notification)
            recorded = event.timestamp
            if recorded >= end:
                before_end = False  # the next day starts here (the log is in recording order, nearly)
                continue
            if before_end:
                mark = notification.id
            if recorded < begin:
                continue
            chargeback = _chargeback_of(event) if notification.topic in (REFUNDED, MONEY_REFUNDED) else None
            paid_back = sums["refunds"]
            if chargeback is not None:  # the customer's bank took it: a chargeback, not a refund
                disputes.add((event.originator_id, chargeback))
                paid_back = sums["chargebacks"]
            if notification.topic == WITHDRAWN:
                sums["disputed"][event.unit] += event.amount
            elif notification.topic == REINSTATED:
                sums["disputed"][event.unit] -= event.amount
            elif notification.topic == DISPUTE_FEE:
                sums["dispute_fees"][event.unit] += event.amount
            elif notification.topic == DISPUTE_CLOSED:
                sums["disputed"][event.unit] -= event.returned
                owed = event.owed.get("receivable") if isinstance(getattr(event, "owed", None), dict) else None
                if owed:  # an invoice's payment taken back: owed again
                    disputes.add((event.originator_id, str(event.key).split("/", 1)[-1]))
                    sums["chargebacks"][event.unit] += int(owed)
            elif notification.topic == MONEY_BOOKED:
                sums["funds_in"][event.unit] += event.amount
                sums["tax_collected"][event.unit] += event.tax_amount
            elif notification.topic == MONEY_REFUNDED:
                paid_back[event.unit] += event.amount
            elif notification.topic == INVOICE_PAID:  # what the payment put in the gateway's clearing
                sums["funds_in"][event.unit] -= _out_of_clearing(event.postings, event.unit)
                sums["tax_collected"][event.unit] += event.tax_amount
            elif notification.topic == INVOICE_REFUNDED:
                counts["refund_count"] += 1
                sums["refunds"][event.unit] += _out_of_clearing(event.postings, event.unit)
            elif notification.topic == GRANTED:
                if event.source != "purchase":
                    continue
                counts["purchase_count"] += 1
                if not is_currency_code(event.unit) and _money_booked(app, event.originator_id, event.grant_id):
                    continue
                order = _order_currency(app, event.cause) if "total" in event.cause else None
                if order is not None:
                    sums["funds_in"][order[0]] += to_subunits(Decimal(event.cause["total"]))
                    sums["tax_collected"][order[0]] += to_subunits(Decimal(event.cause.get("tax") or "0"))
                else:
                    sums["funds_in"][event.unit] += event.amount + event.tax_amount
                    sums["tax_collected"][event.unit] += event.tax_amount
            elif notification.topic in (DEBITED, CAPTURED):
                sums["consumed"][event.unit] += event.amount
            else:
                if chargeback is None:
                    counts["refund_count"] += 1
                if not is_currency_code(event.unit) and _money_booked(app, event.originator_id, event.grant_id):
                    continue
                if is_currency_code(event.unit):
                    # What this refund took out of the gateway's clearing (credit and its tax), never the order's
                    # total: a partial grant.refund before an order's reversal paid part of it back already.
                    paid_back[event.unit] += _out_of_clearing(event.postings, event.unit)
                    continue
                order = _order_currency(app, event.cause) if event.cause.get("gateway_refund") else None
                if order is not None:  # credit-unit grants recorded before their money was booked
                    paid_back[order[0]] += to_subunits(Decimal(order[1]["total"]))
                else:
                    paid_back[event.unit] += event.amount + event.tax_amount
        if len(notifications) < SCAN_BATCH_EVENTS_MAX:
            break
    summary = {"day": day.isoformat(), **counts, "chargeback_count": len(disputes),
               **{name: {unit: value for unit, value in sorted(values.items()) if value}
                  for name, values in sums.items()}}
    return summary, mark


def render(summary: dict[str, Any], scales: dict[str, int] | None = None) -> str:
    """The digest's text: each amount as the ledger shows one (``amounts.show``: a currency's minor digits, a credit
    type's catalogue scale from ``scales``)."""
    labels = {"funds_in": "Funds taken in", "tax_collected": "Tax collected", "consumed": "Credit consumed",
              "refunds": "Refunds", "chargebacks": "Chargebacks (lost disputes)",
              "disputed": "Held for open disputes (net)", "dispute_fees": "Dispute fees (gateways)"}
    lines = [f"Income digest for {summary['day']} (UTC)", ""]
    for name, label in labels.items():
        values = summary.get(name) or {}  # a figure the summary predates shows as none
        shown = ", ".join(f"{show(value, unit, scales)} {unit}" for unit, value in values.items()) or "none"
        lines.append(f"{label}: {shown}")
    lines += ["", (f"Purchases: {summary['purchase_count']}, refunds: {summary['refund_count']}, "
                  f"chargebacks: {summary['chargeback_count']}"), ""]
    return "\n".join(lines)


def send_due(app: LedgerApplication, smtp: SmtpSettings | None, recipient: str, now: datetime
             ) -> dict[str, Any] | None:
    """Sends the digest of every day (UTC) up to yesterday not sent yet, oldest first (see the module
    docstring); returns the figures of the last one that went out, None if none was due."""
    if smtp is None:
        return None
    yesterday = now.astimezone(UTC).date() - timedelta(days=1)
    recorder = app.process_recorder
    last = recorder.max_tracking_id(DAY_NAME)
    if last is not None and last >= yesterday.toordinal():
        return None
    oldest = yesterday - timedelta(days=DIGEST_BACKFILL_DAYS_MAX - 1)
    day = yesterday if last is None else max(date.fromordinal(last + 1), oldest)
    summary = None
    scales = credit_scales(app.read(Catalog.create_id(), lambda c: dict(c.document.get("credit_units") or {})))
    while day <= yesterday:
        start = recorder.max_tracking_id(POSITION_NAME) or 0
        summary, mark = summarize(app, day, start)
        send_text(smtp, recipient, f"Income digest {summary['day']}", render(summary, scales))
        recorder.insert_tracking(Tracking(DAY_NAME, day.toordinal()))
        if mark > start:
            recorder.insert_tracking(Tracking(POSITION_NAME, mark))
        log.info("income_digest_sent", day=summary["day"], recipient=recipient, late=day < yesterday)
        day += timedelta(days=1)
    return summary


async def run_digest(app: LedgerApplication, smtp: SmtpSettings | None, recipient: str, stopping: asyncio.Event,
                     interval_seconds: float = 60.0, is_leader: Callable[[], Awaitable[bool]] | None = None,
                     now: Clock = utcnow) -> None:
    while not stopping.is_set():
        try:
            if is_leader is None or await is_leader():  # one process at a time
                await asyncio.to_thread(send_due, app, smtp, recipient, now())
        except OSError as exc:
            log.warning("income_digest_failed_will_retry", error=str(exc))
        await pause(stopping, interval_seconds)

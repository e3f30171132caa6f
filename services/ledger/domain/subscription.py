"""Subscriptions: a billing account's commitment to one published plan version, with a quantity.

Lifecycle: trialing -> active -> past_due -> canceled, plus paused <-> resumed. Every transition is an
event carrying its cause (a user or ``system:...``).

Collection (``collection``, per subscription at its start): ``invoice`` (the default) gives access at once and
collects the first invoice afterwards (dunning); ``charge_before_access`` starts a paid plan ``incomplete``
(its first invoice finalized, nothing granted, no capacity, not live for rating) until that invoice is paid:
then it is ``Activated`` and its first period starts at the activation. Unpaid (dunning's last attempt failed,
or ``INCOMPLETE_EXPIRY_DAYS`` passed without a charge of it pending) it is canceled with reason
``incomplete_expired``. A trial starts as before, whatever the mode.

Pause stops billing: the period already paid runs to its end, and a period that starts while paused is
not billed (``PeriodEnded(billed=False)``, ``period_billed`` false). Resuming in such a period bills its
rest from the resume (``Resumed(billed_from=...)``); resuming within the paid period bills nothing. Money effects of a change (proration) are computed
by ``billing_ledger.domain.proration`` from the same inputs for the preview and for the change itself, so
a preview always equals the change actually made.

``period_invoice``: the document that billed the current plan for the rest of the current period (the period's
first or renewal invoice, a resume's, a change's), which a change's or cancel's credit for unused time corrects
and whose tax rate it gives back. Derived in the apply methods from the events and the documents' keys
(``period_invoice_key``, ``resume_invoice_key``; a change records its document in ``Changed.invoice``), so
replaying older streams rebuilds it, except after a cadence change recorded without ``invoice`` (None).
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from billing_events.money import RATING_CONTEXT
from billing_ledger.domain.invoice import invoice_id
from billing_ledger.domain.periods import add_days, anchor_day, period_end, proration_fraction
from eventsourcing.domain import Aggregate, event

TRIALING, ACTIVE, PAST_DUE, PAUSED, CANCELED = "trialing", "active", "past_due", "paused", "canceled"
INCOMPLETE = "incomplete"  # charge_before_access: waiting for its first invoice to be paid
LIVE = frozenset({INCOMPLETE, TRIALING, ACTIVE, PAST_DUE, PAUSED})  # counts towards the account's limit
ENTITLED = frozenset({TRIALING, ACTIVE, PAST_DUE, PAUSED})  # gives access: pooled capacity, the plan's prices
BILLABLE = frozenset({ACTIVE, PAST_DUE})
INVOICE_COLLECTION, CHARGE_BEFORE_ACCESS = "invoice", "charge_before_access"
COLLECTIONS = (INVOICE_COLLECTION, CHARGE_BEFORE_ACCESS)
INCOMPLETE_EXPIRED = "incomplete_expired"  # the Canceled reason of an incomplete subscription never paid


def subscription_id(tenant: str, key: str) -> UUID:
    return uuid5(NAMESPACE_URL, f"/subscriptions/{tenant}/{key}")


# The keys of a subscription's documents (``Invoice.create_id(tenant, key)``).

def period_invoice_key(subscription: UUID, start: datetime) -> str:
    """A period's own invoice (the first one, or a renewal's), by the period's start."""
    return f"{subscription}/{start.isoformat()}"


def resume_invoice_key(subscription: UUID, billed_from: datetime) -> str:
    """A resume's invoice for the rest of a period that began while paused."""
    return f"{subscription}/resume/{billed_from.isoformat()}"


def change_invoice_key(subscription: UUID, command_id: UUID) -> str:
    """A plan or quantity change's document (invoice or credit note), by the command's id."""
    return f"{subscription}/change/{command_id}"


class Subscription(Aggregate):
    @staticmethod
    def create_id(tenant: str, key: str) -> UUID:
        return subscription_id(tenant, key)

    @classmethod
    def start(cls, *, tenant: str, key: str, plan: dict[str, Any], quantity: int, time_zone: str, at: datetime,
              trial: bool, by: str, collection: str = INVOICE_COLLECTION) -> Subscription:
        if quantity < 1:
            raise SubscriptionError("quantity must be at least 1")
        if collection not in COLLECTIONS:
            raise SubscriptionError(f"collection must be one of {', '.join(COLLECTIONS)}, not {collection!r}")
        trial_days = int(plan.get("trial_days", 0)) if trial else 0
        # Periods are whole months of the subscription's time zone: anchored on the local day of the start (the
        # UTC day gave Nov 1 00:00 Berlin, Oct 31 23:00 UTC, a first period to Dec 31), and a trial ends after
        # whole local days. Both are recorded on the event, so replay never recomputes them.
        anchor, day = at, anchor_day(at, time_zone)
        end = period_end(anchor, plan["cadence"], day, time_zone)
        trial_end = add_days(anchor, trial_days, time_zone) if trial_days else None
        # A trial needs no payment to start; a free plan has nothing to charge before access.
        status = TRIALING if trial_end else ACTIVE
        if status == ACTIVE and collection == CHARGE_BEFORE_ACCESS and Decimal(str(plan.get("base_fee") or 0)) > 0:
            status = INCOMPLETE
        return cls(tenant=tenant, key=key, plan=plan, quantity=quantity, time_zone=time_zone, anchor_day=day,
                   started_at=at, period_start=anchor, period_end=end, trial_end=trial_end, status=status, by=by,
                   collection=collection)

    @event("Started")
    def __init__(self, tenant: str, key: str, plan: dict[str, Any], quantity: int, time_zone: str, anchor_day: int,
                 started_at: datetime, period_start: datetime, period_end: datetime, trial_end: datetime | None,
                 status: str, by: str, collection: str = INVOICE_COLLECTION) -> None:
        self.tenant = tenant
        self.key = key
        self.plan = plan
        self.quantity = quantity
        self.time_zone = time_zone
        self.anchor_day = anchor_day
        # The start the anchor day was taken from: every period ends at its local time (``periods.period_end``), one
        # the clocks skip that day at the first instant after the skip and the next ones at that time again.
        # Derived from the events (the start, a conversion's, an activation's or a cadence change's period start).
        self.anchor_at = period_start
        self.started_at = started_at
        self.period_start = period_start
        self.period_end = period_end
        self.trial_end = trial_end
        self.status = status
        self.collection = collection
        self.cancel_at_period_end = False
        self.recurring_grants: list[str] = []
        # What a plan or quantity change left that a second change at the same instant takes on (``left_at``, since
        # session 15): {"at", "kept" (grants it kept without a new grant of their unit), "unclaimed" (per unit, the
        # carry no new grant took)}; None: nothing.
        self.left_at_change: dict[str, Any] | None = None
        self.period_billed = True  # False: the current period began while paused and nothing billed it
        # The minimum spend committed for the current period (plan ``minimum_spend``): the exact amount accrued
        # by the plans held before the last change, and since when the current plan's share runs (None: not
        # billed). Derived from the events in their apply methods, so replay rebuilds it.
        self.minimum_accrued = Decimal(0)
        self.minimum_from: datetime | None = period_start
        # The document that billed the current plan for the rest of the current period (module docstring): a
        # trial's has none; a charge_before_access subscription's first invoice bills the period it activates.
        self.period_invoice: str | None = None if status == TRIALING else self._document(
            period_invoice_key(self.id, period_start))

    # -- changes ---------------------------------------------------------------------------------------------

    def _require(self, *statuses: str) -> None:
        if self.status not in statuses:
            raise InvalidTransition(f"subscription is {self.status}; this needs {' or '.join(statuses)}")

    def _document(self, key: str) -> str:
        return str(invoice_id(self.tenant, key))

    def change(self, *, plan: dict[str, Any], quantity: int, at: datetime, by: str, lines: list[dict[str, Any]],
               invoice: UUID | None = None) -> None:
        """Plan and/or quantity change at ``at``; ``lines`` are the proration lines (from the quote), ``invoice``
        the document that bills them (None: none, as in a trial); it bills the new plan for the rest of the
        period (a cadence change: for the new period), so it becomes the ``period_invoice``."""
        self._require(TRIALING, ACTIVE, PAST_DUE)
        if quantity < 1:
            raise SubscriptionError("quantity must be at least 1")
        if plan["currency"] != self.plan["currency"]:
            raise SubscriptionError("a plan change cannot change the currency")
        if plan == self.plan and quantity == self.quantity:
            raise SubscriptionError("nothing to change")
        new_end = self.period_end
        new_start = self.period_start
        minimum_carried = None
        if plan["cadence"] != self.plan["cadence"]:
            # A cadence change (monthly <-> annual) starts a new period now; the old one is prorated away. Its
            # minimum spend committed so far is carried into the new period, as rating carries its usage onto
            # the next renewal invoice: billed there once, against that usage.
            new_start = at
            new_end = period_end(at, plan["cadence"], anchor_day(at, self.time_zone), self.time_zone)
            minimum_carried = str(self._minimum_until(at))
        self._changed(old_plan=self.plan, plan=plan, old_quantity=self.quantity, quantity=quantity, at=at, by=by,
                      lines=lines, period_start=new_start, period_end=new_end,
                      anchor_day=anchor_day(at, self.time_zone) if new_start == at else self.anchor_day,
                      minimum_carried=minimum_carried, invoice=str(invoice) if invoice is not None and lines else None)

    @event("Changed")
    def _changed(self, old_plan: dict[str, Any], plan: dict[str, Any], old_quantity: int, quantity: int,
                 at: datetime, by: str, lines: list[dict[str, Any]], period_start: datetime, period_end: datetime,
                 anchor_day: int, minimum_carried: str | None = None, invoice: str | None = None) -> None:
        # ``invoice`` None: no document (a trial's change keeps what it had), or a change recorded before it was
        # named; a cadence change of those started a period whose document is unknown (None, as it was found).
        if invoice is not None:
            self.period_invoice = invoice
        elif period_start != self.period_start:
            self.period_invoice = None
        if period_start != self.period_start:  # a cadence change: a new period starts now
            # ``minimum_carried``: the cut period's commitment (None: recorded before it was carried, nothing).
            self.minimum_accrued, self.minimum_from = Decimal(minimum_carried or 0), period_start
            self.anchor_at = period_start
        elif self.minimum_from is not None and self.status != TRIALING:
            self.minimum_accrued = RATING_CONTEXT.add(self.minimum_accrued, self._minimum_share(self.minimum_from, at))
            self.minimum_from = at
        self.plan = plan
        self.quantity = quantity
        self.period_start = period_start
        self.period_end = period_end
        self.anchor_day = anchor_day

    def set_recurring_grants(self, grant_ids: list[str], *, at: datetime | None = None, kept: list[str] | None = None,
                             unclaimed: dict[str, int] | None = None) -> None:
        """The recurring grants now current; ``at`` (a change's), ``kept`` and ``unclaimed``: what of the grants it
        closed no new grant took (``left_at``)."""
        left = {"at": at, "kept": list(kept or []), "unclaimed": dict(unclaimed or {})} \
            if at is not None and (kept or unclaimed) else {}
        self._grants_issued(grant_ids=grant_ids, **left)

    @event("RecurringGrantsIssued")
    def _grants_issued(self, grant_ids: list[str], at: datetime | None = None, kept: list[str] | None = None,
                       unclaimed: dict[str, int] | None = None) -> None:
        self.recurring_grants = list(grant_ids)
        # ``at``, ``kept``, ``unclaimed``: recorded since session 15.
        self.left_at_change = {"at": at, "kept": list(kept or []), "unclaimed": dict(unclaimed or {})} \
            if at is not None else None

    def left_at(self, at: datetime) -> tuple[list[str], dict[str, int]]:
        """What the last plan or quantity change left unclaimed, if it took effect at ``at`` too (a second change at
        the same instant, applied after it): the grants it kept for late usage without a new grant of their unit, and
        per unit the carry no new grant took (its new grant came to nothing, or the plan grants no credit of the unit).
        The second change takes them on as if the first had not cut them, so a change and a change back at one instant
        leave the credit no change leaves. Empty at any other instant: time passed, the first change's outcome
        stands."""
        left = self.left_at_change
        if left is None or left["at"] != at:
            return [], {}
        return list(left["kept"]), dict(left["unclaimed"])

    def pause(self, *, at: datetime, by: str) -> None:
        self._require(ACTIVE, PAST_DUE)
        self._paused(at=at, by=by)

    @event("Paused")
    def _paused(self, at: datetime, by: str) -> None:
        self.status = PAUSED

    def resume(self, *, at: datetime, by: str) -> datetime | None:
        """Active again; returns from when the rest of the current period is to be billed (None: it was)."""
        self._require(PAUSED)
        billed_from = None if self.period_billed else max(at, self.period_start)
        self._resumed(at=at, by=by, billed_from=billed_from)
        return billed_from

    @event("Resumed")
    def _resumed(self, at: datetime, by: str, billed_from: datetime | None = None) -> None:
        self.status = ACTIVE
        self.period_billed = True
        if billed_from is not None:
            self.minimum_from = billed_from
            self.period_invoice = self._document(resume_invoice_key(self.id, billed_from))

    def mark_past_due(self, *, at: datetime, reason: str, by: str) -> None:
        self._require(ACTIVE)
        self._past_due(at=at, reason=reason, by=by)

    @event("PastDue")
    def _past_due(self, at: datetime, reason: str, by: str) -> None:
        self.status = PAST_DUE

    def mark_paid(self, *, at: datetime, by: str) -> None:
        if self.status == PAST_DUE:
            self._recovered(at=at, by=by)

    def activate(self, *, at: datetime, by: str) -> None:
        """Its first invoice is paid (``charge_before_access``): active from ``at``, when its first period starts
        (a full period for the fee paid, however late the payment came)."""
        self._require(INCOMPLETE)
        day = anchor_day(at, self.time_zone)
        end = period_end(at, self.plan["cadence"], day, self.time_zone)
        self._activated(at=at, by=by, period_start=at, period_end=end, anchor_day=day)

    @event("Activated")
    def _activated(self, at: datetime, by: str, period_start: datetime, period_end: datetime, anchor_day: int) -> None:
        self.status = ACTIVE
        self.period_start = period_start
        self.period_end = period_end
        self.anchor_day = anchor_day
        self.anchor_at = period_start
        self.minimum_accrued, self.minimum_from = Decimal(0), period_start
        # ``period_invoice`` stays the first invoice (its key is the start): paid, it bills this first period.

    def expire_incomplete(self, *, at: datetime, by: str, reason: str = INCOMPLETE_EXPIRED) -> None:
        """Its first invoice was never paid: canceled (``incomplete_expired``, or ``canceled`` when a user
        canceled it before paying), having granted nothing."""
        self._require(INCOMPLETE)
        self._canceled(at=at, by=by, reason=reason, lines=[])

    @event("Recovered")
    def _recovered(self, at: datetime, by: str) -> None:
        self.status = ACTIVE

    def cancel(self, *, at: datetime, by: str, immediately: bool, lines: list[dict[str, Any]]) -> None:
        self._require(TRIALING, ACTIVE, PAST_DUE, PAUSED)
        if immediately:
            self._canceled(at=at, by=by, reason="canceled", lines=lines)
        else:
            if self.cancel_at_period_end:
                raise SubscriptionError("already set to cancel at the end of the period")
            self._cancel_scheduled(at=at, by=by, cancel_at=self.period_end)

    @event("CancelScheduled")
    def _cancel_scheduled(self, at: datetime, by: str, cancel_at: datetime) -> None:
        self.cancel_at_period_end = True

    @event("Canceled")
    def _canceled(self, at: datetime, by: str, reason: str, lines: list[dict[str, Any]]) -> None:
        self.status = CANCELED

    # -- time ------------------------------------------------------------------------------------------------

    def end_trial(self, *, at: datetime, has_payment_method: bool) -> bool:
        """At trial end: convert (True) with a default payment method, else end without billing (False)."""
        self._require(TRIALING)
        if self.trial_end is None or at < self.trial_end:
            raise InvalidTransition("the trial has not ended yet")
        if has_payment_method:
            start, end = self.converted_period()
            self._converted(at=at, by="system:trial", period_start=start, period_end=end,
                            anchor_day=anchor_day(start, self.time_zone))
            return True
        self._canceled(at=at, by="system:trial", reason="trial_ended_without_payment_method", lines=[])
        return False

    def converted_period(self) -> tuple[datetime, datetime]:
        """The first paid period a trialing subscription converts into: from its trial's end, one cadence long."""
        if self.trial_end is None:
            raise InvalidTransition("no trial to convert")
        day = anchor_day(self.trial_end, self.time_zone)  # rating's ``period_ahead`` predicts the same
        return self.trial_end, period_end(self.trial_end, self.plan["cadence"], day, self.time_zone)

    def renewed_period(self, at: datetime, renewals_max: int, *, converted: bool = False
                       ) -> tuple[datetime, datetime] | None:
        """The period ``at`` falls in once the periods ended by ``at`` are renewed, each as ``renew`` renews it
        (``converted``: from the first paid period a trial ended by ``at`` converts into, ``converted_period``).
        ``None`` when more than ``renewals_max`` periods are due. Pure: the invoice preview of a change issued
        after the period's end, before the tick, prorates this period, as the change does after renewing them."""
        start, end, day, anchor = self.period_start, self.period_end, self.anchor_day, self.anchor_at
        if converted:
            start, end = self.converted_period()
            day, anchor = anchor_day(start, self.time_zone), start
        for _ in range(renewals_max + 1):
            if at < end:
                return start, end
            start, end = end, period_end(end, self.plan["cadence"], day, self.time_zone, anchor)
        return None

    @event("TrialConverted")
    def _converted(self, at: datetime, by: str, period_start: datetime, period_end: datetime, anchor_day: int) -> None:
        self.status = ACTIVE
        self.period_start = period_start
        self.period_end = period_end
        self.anchor_day = anchor_day
        self.anchor_at = period_start
        self.minimum_accrued, self.minimum_from = Decimal(0), period_start
        self.period_invoice = self._document(period_invoice_key(self.id, period_start))

    def renew(self, *, at: datetime) -> bool:
        """Closes the current period if it has ended: renews, or cancels when so scheduled. Once per period."""
        if self.status not in BILLABLE and self.status != PAUSED:
            return False
        if at < self.period_end:
            return False
        if self.cancel_at_period_end:
            self._period_ended(period_start=self.period_start, period_end=self.period_end, next_start=None,
                               next_end=None)
            self._canceled(at=self.period_end, by="system:period_end", reason="canceled_at_period_end", lines=[])
            return True
        next_end = period_end(self.period_end, self.plan["cadence"], self.anchor_day, self.time_zone, self.anchor_at)
        self._period_ended(period_start=self.period_start, period_end=self.period_end,
                           next_start=self.period_end, next_end=next_end, billed=self.status != PAUSED)
        return True

    @event("PeriodEnded")
    def _period_ended(self, period_start: datetime, period_end: datetime, next_start: datetime | None,
                      next_end: datetime | None, billed: bool = True) -> None:
        if next_start is not None and next_end is not None:
            self.period_start = next_start
            self.period_end = next_end
            self.period_billed = billed
            self.minimum_accrued, self.minimum_from = Decimal(0), next_start if billed else None
            self.left_at_change = None
            # The renewal invoice bills it (a paused one's draft bills no fee: the resume's invoice will).
            self.period_invoice = self._document(period_invoice_key(self.id, next_start)) if billed else None

    # -- minimum spend ---------------------------------------------------------------------------------------

    def _minimum_share(self, start: datetime, end: datetime) -> Decimal:
        """The current plan's ``minimum_spend`` for [start, end) of the current period, prorated to the second."""
        minimum = self.plan.get("minimum_spend")
        if not minimum:
            return Decimal(0)
        fraction = RATING_CONTEXT.subtract(proration_fraction(self.period_start, self.period_end, start),
                                           proration_fraction(self.period_start, self.period_end, end))
        return RATING_CONTEXT.multiply(Decimal(str(minimum)), max(fraction, Decimal(0)))

    def _minimum_until(self, at: datetime) -> Decimal:
        """The minimum spend committed in the current period up to ``at`` (what ``period_minimum`` is at its end)."""
        if self.status == TRIALING or self.minimum_from is None:
            return Decimal(0)
        return RATING_CONTEXT.add(self.minimum_accrued, self._minimum_share(self.minimum_from, at))

    def period_minimum(self, until: datetime | None = None) -> Decimal:
        """The minimum spend on usage committed for the current period, exact: each plan's ``minimum_spend``
        for the billed time it was held (a mid-period change or a resume prorates it; an unbilled period and a
        trial commit nothing; a period restarted by a cadence change adds what the cut one committed). Read at
        renewal, before ``renew`` moves on to the next period; ``until``: the period is cut short there (an
        immediate cancel, read before it), so only the time before it commits."""
        return self._minimum_until(self.period_end if until is None else min(until, self.period_end))

    @property
    def live(self) -> bool:
        return self.status in LIVE


class SubscriptionError(ValueError):
    pass


class InvalidTransition(SubscriptionError):
    pass

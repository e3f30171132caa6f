"""The billing account aggregate: one tenant's credit wallets, grants, holds, receivables and alerts.

Every command method checks its arguments and the current state, computes the complete movement
(postings, draws, new grants) and then calls one private ``@event`` method that only *applies* what it is
given. Replaying the events therefore never re-runs validation, clock reads or id generation; every time is
an argument (``at`` / ``now``), never read from a clock. Movement rules (which accounts each movement
posts) are in :mod:`billing_ledger.domain.postings`.

Wallets and grants
    A wallet is the set of open grants of one *unit*: the account's ISO 4217 currency or a catalogue credit
    type (``CREDIT``...). A currency unit must be the account's own currency, so an account never holds
    balances in two currencies. The wallet balance is the sum of its open grants' ``remaining``.
    ``available = balance - held - late_usage_reserve``: what new usage and holds can spend; ``held`` is the sum of
    active holds, ``late_usage_reserve`` the credit set aside (below).

Credit set aside for its period's late usage (since session 13)
    A plan credit past its ``drawable_until`` (its period's end) stays open, for its period's usage that reaches the
    ledger late (a credit without rollover until its ``expires_at``; a rollover credit until its renewal), but new
    usage can no longer draw it. When its period ends it is *set aside* (``GrantSetAside``): by the renewal (a paused
    one, a cancel at the period's end) or by the expiry sweep, whichever comes first, once. What is left of a grant
    set aside is the wallet's ``late_usage_reserve``: in ``balance`` (the accounting balance, ``tenant_wallet``) but
    not in ``available``, so the low-balance alert and the auto-top-up rule see the drop when the period ends
    (re-evaluated then, edge-triggered as for a debit), and holds and ``block`` debits never count it. Late usage of
    its period still draws it (``_spendable``: eligible credit set aside counts in full, the rest at most
    ``available``), which lowers the reserve, not ``available``; the sweep lapses what is left at its ``expires_at``.
    Until session 13 such credit expired at the period's end, which lowered ``available`` the same way.

Credit kept for late usage (since session 14)
    ``keep_for_late_usage`` (``GrantKeptForLateUsage``) does the same for every other close of a plan credit: a
    rollover credit at its renewal (a paused one, a cancel at the period's end), and any plan credit cut short by an
    immediate cancel or a plan or quantity change (``drawable_until`` becomes the cut). It stays open
    ``RECURRING_CREDIT_LATE_USAGE_DAYS`` after its period's end or the cut (its new ``expires_at``) and is set aside,
    and the sweep lapses what is left to breakage then. What a next grant takes of it leaves it at once (``moved``,
    back to its funding account, which the next grant draws again): a rollover's carry (``rollover_cap``), a change's
    whole rest. The kept grant names that grant (``carry``: {"to", "left"}) and late usage of before its
    ``drawable_until`` draws the kept rest first, then at most ``left`` of the next grant (``_carried_parts``, draws
    naming the next grant with ``carry_of``): the same money, since on time that usage would have come out of the part
    that lapses first and then the carry. A chain is followed (the next grant kept and carried on in turn), at most
    ``CARRY_CHAIN_MAX`` grants deep. The next grant counts what such usage drew of it (``carry_drawn``, since session
    15): ``amount - carry_drawn`` is what it gives its own period, as on time. Such draws are remembered apart
    (``carry_of`` on the entry): a give-back of that usage while the kept grant is open credits the next grant back and
    restores the carry. Before session 14 those closes voided the credit at once, and such usage was owed as overage.
    A change's new grant may hold less than the kept grant's rest (a downgrade): the rest of the carry is its
    ``reserve`` (since session 15), the old plan's allowance late usage draws once it has drawn all of the successor's
    part, reinstated into the kept grant by that draw (``reinstated``; ``_carried_parts``, ``_apply_draws``).

Drawdown order (usage, captures)
    Only grants that are effective at ``at`` (``effective_at <= at``), not expired at ``at``
    (``at < expires_at``), still drawable at ``at`` (``at < drawable_until``, when set), in scope for the
    meter (``scope`` is ``None`` = every meter) and with ``remaining > 0`` are drawn, ordered by

    1. ``priority`` ascending: **a lower number is drawn first** (0 before 10);
    2. earliest end first (``drawable_until`` or ``expires_at``, whichever comes first); a grant that never
       ends comes last;
    3. oldest first (the order in which the grants were recorded).

    ``drawable_until`` (since session 9): a plan's recurring credit with rollover is drawn only by usage of its
    own period (before the period's end), but stays open after it, so the renewal, whenever its tick runs, decides
    what of it is carried and what lapses (``void_grant(lapsed=...)``); the expiry sweep does not take it first,
    not even after its ``expires_at`` (a period later), when the tick comes later still (since session 12:
    ``_left_to_renewal``). Grants recorded before have none: drawable until they expire, and swept then.
    Since session 13 a plan credit without rollover has a ``drawable_until`` too (its period's end) and stays open
    after it for ``RECURRING_CREDIT_LATE_USAGE_DAYS`` (its ``expires_at``, ``late_usage``): usage is drawn by the
    time it happened, not by when it reaches the ledger, so a close debit (max, last, unique_count, sent after the
    renewal) or usage of the period that comes late still draws the period's credit, as it would have on time; the
    sweep lapses what is left at its ``expires_at``, once (the renewal leaves it open). Such credits granted before
    expired at the period's end (the renewal or the sweep, whichever came first) and replay so.

    A plan credit kept for late usage with a carry (``keep_for_late_usage``) is followed, in that order, by what of
    its carry the next grant still holds (usage of the kept grant's period only).

    One debit may span several grants; every draw and every wallet posting names its grant.

Holds reserve credit
    Holds are authorisations at the *unit* level: a usage debit or another hold can only take what is
    ``spendable`` = ``min(eligible credit for the meter at that time, available)`` (plus eligible credit set aside:
    usage of an ended period). A hold with no meter
    can only be covered by unscoped grants. Holds reserve an amount, not particular grants, so with scoped
    grants the guarantee is best effort; a capture never fails for lack of credit: if credit under a hold
    vanished (the grant expired, was voided, or refunded with a finance override) the shortfall goes to
    ``RECEIVABLES``. That, and credit under a hold set aside at its period's end, are the only ways ``available``
    can become negative.

Usage give-back (negative usage amounts)
    A give-back first reduces the unit's overage that no invoice bills yet (its own period's first, then the
    latest periods', never below zero: an invoice issued is collected in full), then credits the wallet back to the
    grants most recently drawn (a bounded per-unit stack of recent draws, ``DRAW_HISTORY_MAX`` entries),
    skipping grants that are closed, expired at ``at`` or out of scope for the meter. A grant is credited back at
    most its credit spent and not paid back by a refund (``_give_back_room``: ``amount - remaining - refunded -
    lapsed``), so ``remaining + refunded`` never exceeds ``amount``: what a finance override refunded of spent
    credit (from ``RECOGNISED_REVENUE``) is usage the customer already has the money of, and the part of a
    remembered draw beyond that room is ``absorbed`` (recorded on the ``UsageDebited``, no postings, taken off the
    draws remembered), never credited a second time nor taken from revenue again. Anything left (the
    grants lapsed meanwhile) becomes a new non-expiring, unscoped grant with source ``usage_reversal``
    whose id is derived from the command id. An expired grant's draws stay remembered (since session 11): a
    give-back of a lapsed grant's usage (expired, or past its draw end at ``at``) absorbs what a refund paid back
    of it, as for an open grant, and gives the rest back as that ``usage_reversal`` credit, which names the grant
    (``reverses``); the grant counts it (``reversed``) so it is never given back twice.
    Usage that drew such a credit and that a gateway refund then made owed (the credit taken back though spent,
    ``reclaimed.owed``; likewise a credit note's credit an invoice's refund took back, ``refund_invoice_payment``) is
    kept (``_owed_usage``): a give-back that reduces that unbilled overage, or credit bought
    that repays it, forgets that much of the credit's draws (since session 12), so no later give-back credits the
    credit for it again; an invoice that bills it collects it in full, so its draws stay and a give-back of it credits
    the credit back once, as for any invoiced usage.
    A give-back of a period whose overage invoices billed (``billed_overage``: every invoice that billed some of
    it, a late correction's increase billed on a later invoice too) is first credited, with each invoice's tax, by
    credit notes the command issues, newest invoice first (``credit_note_grant``; ``debit_usage(credit_note=...)``
    records one ``InvoicedUsageCredited`` per invoice); what an invoice billed but can no longer give back (a
    refund gave it back, its minimum commitment bills it anyway) is ``absorbed``: not given back again. Only the
    rest takes the steps above.

Overage repaid by new credit
    ``repay_overage``: credit a pay-as-you-go account buys first pays off the overage no invoice bills (Dr
    ``TENANT_WALLET`` / Cr ``RECEIVABLES``, oldest period first), at most what the grant holds and what is
    available; a grant for some meters only (``scope``) repays only the overage those meters posted (the meter of
    each period's overage is kept, ``unbilled_overage_meters``; overage of no known meter only unscoped credit
    repays). The draw is remembered like a debit's, so a give-back of the usage it paid returns the credit to that
    grant (a period's recurring credit, not a new grant).

Overage policies
    ``overage``: what the credit cannot cover is posted to ``RECEIVABLES``. ``block``: the whole debit
    is refused with a ``UsageRejected`` event (no postings) so the command is still recorded as handled.

Low balance and auto top-up (edge-triggered, per unit, on ``available``)
    Low means ``available < threshold`` (strictly), credit set aside excluded. A downward crossing (a movement, or a
    period's credit set aside at its end) records exactly one
    ``LowBalanceReached`` (the alert disarms); reaching ``available >= threshold`` again re-arms it, which
    is derived state, not an event. Setting a threshold while already below it arms nothing: only a
    future downward crossing alerts. The auto-top-up rule works the same way and records one
    ``AutoTopUpRequested`` per crossing, unless the cooldown since the last request has not elapsed or
    the request would take the calendar month's (UTC) requested total above ``monthly_cap``; a suppressed
    rule stays armed and fires at the next movement that is allowed to, once. The requested amount is the
    package's amount, or ``target - available`` in whole steps of what the currency is charged in
    (``_top_up_to_target``: the balance lands on the target, never a minor unit above it). Requests recorded before
    session 14 hold ``target - available`` exact (the auto-top-up task rounded it up to the step).

Money of purchases in a credit unit
    A purchase grant in the account's currency books the money paid and its tax on the grant itself
    (``tax_amount``). A purchase granted in a credit unit (``CREDIT``) is balanced in that unit, so the
    money paid for it is booked apart, in the currency, by ``book_purchase_money`` (one
    ``PurchaseMoneyBooked`` per grant: Dr ``GATEWAY_CLEARING`` total / Cr ``DEFERRED_REVENUE`` net /
    Cr ``TAX_PAYABLE`` tax). Every refund of such a grant reverses that booking in proportion to the credit
    refunded (``PurchaseMoneyRefunded``, cumulative and rounded down, so a full refund reverses it
    exactly and never more tax than was collected). Grants recorded before this booking existed have none
    and are refunded in their unit only, as before.

Revenue of purchases in a credit unit (IFRS 15)
    The net money booked to ``DEFERRED_REVENUE`` (currency) is recognised as the grant's credit is used,
    in periodic runs, never on the usage path (a debit of a credit-unit grant records nothing in the
    currency): ``recognise_purchase_money(now)`` records one ``PurchaseMoneyRecognised`` per run with, per
    grant whose use changed since its last run, Dr ``DEFERRED_REVENUE`` / Cr ``RECOGNISED_REVENUE`` and
    Cr ``BREAKAGE`` (currency; negative deltas, after give-backs, reverse them). Exact by cumulative floor:
    with ``F`` of the grant's ``A`` credit refunded, ``c`` consumed (usage and captures net of give-backs
    and of refunds from revenue) and ``l`` lapsed (breakage not refunded, plus credit removed by negative
    adjustments: the tenant's right to it ended unused), the grant's money stands at ``recognised =
    floor(net * c / A)``, ``breakage = floor(net * (c + l) / A) - recognised``, ``refunded_net = floor(net
    * F / A)`` and the rest deferred; once no credit of it is left (``F + c + l = A``) the last sub-unit
    of rounding goes to breakage (or revenue if nothing lapsed), so its deferred revenue is exactly zero.
    A refund of such a grant pays its net back from recognised revenue and breakage only as far as they
    exceed what the grant's credit after the refund has earned (a finance-override refund of spent or
    lapsed credit that was already recognised), the rest from deferred revenue: no currency account of a
    grant ever changes sign, and deferred + recognised + breakage + refunded = net at every event. The
    ledger's sweeper runs it for an account with unrecognised use at most once an hour, at the first
    sweep of each UTC day, and at once when a grant of it finishes or expires (``purchase_money_due``).

Subscription fee revenue (IFRS 15 / ASC 606)
    A subscription document's fees for a service period are deferred when billed (``bill_invoice``, a credit
    note's ``credit_note_grant``: Cr ``DEFERRED_REVENUE``, one schedule per document in ``_fee_schedules``) and
    recognised ratably by ``recognise_fee_revenue(now)`` (``FeeRevenueRecognised``: per schedule ``deferred x
    elapsed // remaining`` in whole seconds since its last run, all that is left at its end, so exactly what it
    deferred; a UTC day at a time once the day is over, each day's event dated in that day, since session 15), but for the share of a plan's recurring credit in the currency the fee includes (``included``): its
    grant took that share into the wallet, earned as it is used or lapses. A credit for unused time, a void and a
    refund take their net from the schedule of the invoice they correct first (``_fee_revenue``; a credit, a void
    and a full refund end it, recognising what it still
    defers beyond the credit), the rest from ``RECOGNISED_REVENUE``. Invoices billed before schedules existed have
    none: revenue when billed, reversed from ``RECOGNISED_REVENUE``. The sweeper runs it at the first sweep of
    each UTC day with something due and when a period ends (``fee_revenue_days_due``).

Disputes (chargebacks, since session 13)
    ``open_dispute`` records a dispute of one of the account's payments (``DisputeRaised``, no postings: the
    customer keeps the credit until the bank decides). Funds the gateway withdraws for it move from
    ``GATEWAY_CLEARING`` to ``DISPUTED_FUNDS`` (``withdraw_dispute_funds``, once, while it is open) and back
    (``reinstate_dispute_funds``). ``close_dispute`` (``DisputeClosed``) returns what is still withdrawn to clearing;
    won or closed, that is all; lost, the caller books the chargeback as a gateway refund (``refund_grant``) that
    takes the money out of clearing once, or, for an invoice's payment, ``owed`` makes it receivable again (unbilled
    under ``OWED_CHARGEBACK_KEY_PREFIX``). A lost dispute never changes its outcome (``DisputeOutcomeChanged``).
    The gateway's fee for a dispute (since session 14) follows its latest reading (``book_dispute_fee``): Dr
    ``DISPUTE_FEES`` / Cr ``GATEWAY_CLEARING`` the change, back when the gateway gives some back.

Idempotency
    Grant ids (and positive adjustment ids, which become grant ids) are refused when repeated
    (``DuplicateGrant``). A repeated hold id returns the first yes/no answer without a new event while the
    hold is active or among the last ``SETTLED_HOLDS_KEPT_MAX`` settled ones. Usage, refund and settlement
    command ids are recorded in their events but not remembered by the aggregate (unbounded state): the
    application's per-command receipts refuse a second delivery before it reaches the aggregate.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from billing_events import ids
from billing_events.money import SUBUNITS_PER_UNIT, MoneyError, credit_unit, is_currency_code, minor_subunits
from billing_events.money import currency as iso_currency
from billing_ledger.amounts import show
from billing_ledger.domain.chain import ChainedAggregate
from billing_ledger.domain.postings import (
    FUNDING_ACCOUNT,
    PAID_SOURCES,
    GrantSource,
    LedgerAccount,
    Posting,
    assert_balanced,
    posting,
)
from eventsourcing.domain import event

# -- bounds (TIGER_STYLE: every limit named, in one place) ---------------------------------------------------
# One movement moves at most one billion units (10**18 sub-units), so balances stay far inside int64.
MOVEMENT_SUBUNITS_MAX = 10**18
# Recent draws remembered per unit for give-backs (consecutive draws of one grant share one entry).
DRAW_HISTORY_MAX = 256
PRIORITY_ABS_MAX = 1_000_000
SCOPE_METERS_MAX = 256
TEXT_CHARS_MAX = 512
# Holds: at most this many active at once per account (a further hold is rejected), and this many settled
# ones remembered for idempotent answers (older ones are forgotten; command receipts dedupe beyond that).
ACTIVE_HOLDS_MAX = 10_000
SETTLED_HOLDS_KEPT_MAX = 10_000
# Late usage drawing a carried credit follows the carry from grant to successor at most this many times (a month's
# carry into the next and on into the one after: within ``RECURRING_CREDIT_LATE_USAGE_DAYS`` of a period's end at
# most the next renewal comes; the rest is a margin).
CARRY_CHAIN_MAX = 4
# Adjustments remembered for idempotent answers (what each left: ``adjustment``); older ones are forgotten.
ADJUSTMENTS_KEPT_MAX = 10_000
# Grant refunds remembered for idempotent answers (what each took from where and paid back: ``refund``).
REFUNDS_KEPT_MAX = 10_000
AUTO_TOP_UP_COOLDOWN_SECONDS_DEFAULT = 3600
AUTO_TOP_UP_COOLDOWN_SECONDS_MAX = 366 * 24 * 3600
# Periods whose invoiced overage a usage correction credits by a credit note, remembered per unit (older ones: a
# correction of them is given back as credit without tax, as before). Three years of monthly periods. Each keeps
# every invoice that billed some of it (a late correction's increase is billed by a later invoice): a few at most.
BILLED_PERIODS_KEPT_MAX = 36
# Per unit and unbilled period, at most this many entries of the overage posted by usage time
# (``overage_since``): beyond it the earliest two merge into one spanning both times.
OVERAGE_TIMES_MAX = 64
# Per unit, at most this many records of usage whose ``usage_reversal`` credit a gateway refund took back though it
# was spent, so the usage is owed (``_owed_usage``); beyond it the oldest is forgotten (its draws stay remembered, as
# before session 12's fix: a give-back of it may credit that credit again).
OWED_USAGE_KEPT_MAX = 256
# The overage key of what a gateway refund gave back beyond what its invoice had left and the account owes
# (``refund_invoice_payment``): this prefix and the refund's time. Money whose revenue and tax are already booked
# (not usage): a renewal invoice bills it without tax (``invoice_overage.overage_lines``).
OWED_REFUND_KEY_PREFIX = "refund:"
# Recognition of credit-package money (``purchase_money_due``): at most this often per account, besides the
# first sweep of each UTC day and a grant that finishes or expires.
MONEY_RECOGNITION_INTERVAL = timedelta(hours=1)
# Subscription fee revenue is recognised a UTC day at a time, each day's ``FeeRevenueRecognised`` dated in it
# (``recognise_fee_revenue``): a run behind by more days (a sweeper stopped over two month ends, a store restored)
# records this many (two months: a run after a month end stopped catches up both months) and leaves the rest to the
# next sweep, so one command's transaction stays bounded (the sweeper weighs it by ``fee_revenue_days_due``).
FEE_RECOGNITION_DAYS_PER_RUN_MAX = 62
# A run's FeeRevenueRecognised is dated this much before the time it recognises to: the last instant of the day
# whose share it is (to a midnight: 23:59:59.999999 of the day before), never the next day.
_LAST_MICROSECOND = timedelta(microseconds=1)
# Gateway refunds waiting for the payment they give back (``park_refund``) at once per account: a further one is
# refused (``TooManyParkedRefunds``, its rejection recorded for reconciliation). Each is settled when its payment
# is booked; only a payment that never comes keeps one here.
PARKED_REFUNDS_MAX = 1_000
# The overage key of an invoice payment a lost dispute took back (a chargeback): owed again, revenue and tax booked
# when it was billed, so a renewal invoice bills it without tax as the refund prefix above (``overage_lines``).
OWED_CHARGEBACK_KEY_PREFIX = "chargeback:"
# The key under which the credit notes' credit a captured hold drew is counted (``_credit_note_spend``): this prefix
# and the capture's calendar month (UTC), ``hold_spend_key``. No subscription invoice bills a capture (rating's usage
# lines never show one): the month's credit note usage invoice does (``credit_note_usage_due``). Since session 15.
HOLD_SPEND_KEY_PREFIX = "holds:"
# Disputes (chargebacks) an account keeps (``open_dispute``), open and closed: a further one is refused
# (``TooManyDisputes``, recorded for reconciliation). Closed ones are kept so that a late event of one (a withdrawal
# after its loss, a reinstatement after its win) finds it and moves nothing twice.
DISPUTES_KEPT_MAX = 10_000
DISPUTE_OUTCOMES = ("won", "lost", "closed")

OVERAGE_POLICIES = ("overage", "block")
REJECTED_INSUFFICIENT_CREDIT = "insufficient_credit"
REJECTED_TOO_MANY_HOLDS = "too_many_active_holds"

# Sort key placeholder for grants that never expire (they sort last through the preceding flag).
_NO_EXPIRY_KEY = datetime(1970, 1, 1, tzinfo=UTC)

GrantRecord = dict[str, Any]
HoldRecord = dict[str, Any]
Draw = dict[str, Any]  # {"grant_id": str, "amount": int}; negative amount = credited back


class BillingAccount(ChainedAggregate):
    """One tenant's billing account (see the module docstring for the rules)."""

    @staticmethod
    def create_id(tenant: str) -> UUID:
        return ids.account_id(tenant)

    @classmethod
    def open(
        cls, tenant: str, currency: str, *, low_balance_threshold: int | None = None, opened_by: str
    ) -> BillingAccount:
        """Opens the account of ``tenant`` in ISO 4217 ``currency`` (refused if not ISO 4217)."""
        _require_text("tenant", tenant)
        _require_text("opened_by", opened_by)
        try:
            currency_unit = iso_currency(currency)
        except MoneyError as exc:
            raise InvalidUnit(str(exc)) from exc
        if low_balance_threshold is not None:
            _require_amount("low_balance_threshold", low_balance_threshold, allow_zero=True)
        return cls(
            tenant=tenant,
            currency=currency_unit.code,
            low_balance_threshold=low_balance_threshold,
            opened_by=opened_by,
        )

    @event("Opened")
    def __init__(self, tenant: str, currency: str, low_balance_threshold: int | None, opened_by: str) -> None:
        self.tenant = tenant
        self.currency = currency
        self.opened_by = opened_by
        # Everything below is keyed by str and holds JSON-transcodable values, so snapshots work too.
        self._grants: dict[str, GrantRecord] = {}  # insertion order = granted order
        self._holds: dict[str, HoldRecord] = {}  # active holds only
        self._settled_holds: dict[str, HoldRecord] = {}  # the last SETTLED_HOLDS_KEPT_MAX, oldest first
        # Manual adjustments (``adjust``), the last ADJUSTMENTS_KEPT_MAX, oldest first: adjustment id -> {"unit",
        # "amount", "reason", "user", "balance", "available" (the wallet's just after it)}, the answer a retry gets.
        self._adjustments: dict[str, dict[str, Any]] = {}
        # Grant refunds (``refund_grant``), the last REFUNDS_KEPT_MAX, oldest first: refund id -> {"grant_id",
        # "unit", "amount", "tax_amount", "from_wallet", "from_breakage", "from_adjustment", "from_revenue",
        # "finance_override", "reason", "requested_by", "paid_back"}, the answer a retry gets.
        self._refunds: dict[str, dict[str, Any]] = {}
        self._held: dict[str, int] = {}  # sum of active holds per unit
        self._receivable: dict[str, int] = {}
        # Overage not yet on an invoice: unit -> period key (rating's ``cause.period``, else the time it was
        # posted) -> net sub-units; and the overage each unpaid invoice billed: invoice id -> unit -> sub-units.
        self._unbilled: dict[str, dict[str, int]] = {}
        # The meters the unbilled overage of each period came from (``unbilled_overage_meters``): unit -> period key
        # -> meter -> sub-units, never more in all than the period's ``_unbilled``; the rest is of no known meter (a
        # voided invoice's overage owed again, a refund's owed excess, a capture of a hold without a meter). A grant
        # for some meters only repays the overage of those meters (``repay_overage``).
        self._unbilled_meters: dict[str, dict[str, dict[str, int]]] = {}
        # The unbilled overage of each period by the time of the usage that posted it (``overage_since``): unit ->
        # period key -> [[first, last, sub-units], ...] by time (an entry merged from several spans their times), so a
        # change or resume given an earlier ``at`` repays what usage since then posted, as its credit would have
        # covered it on time. Forgotten with the period's unbilled overage.
        self._overage_times: dict[str, dict[str, list[list[Any]]]] = {}
        self._invoiced_overage: dict[str, dict[str, int]] = {}
        # What of each unpaid invoice's ``_invoiced_overage`` is the rounding of its lines (``round_invoiced_overage``,
        # already in it): invoice id -> unit -> sub-units (negative: rounded down), taken back if it is voided.
        self._overage_rounding: dict[str, dict[str, int]] = {}
        # What each unpaid subscription invoice billed besides overage (``bill_invoice``): invoice id ->
        # {"unit", "amount" (fees + tax, sub-units), "tax"}. Kept apart from ``_receivable`` (the overage), which
        # usage give-backs and repayments reduce: they must never eat into an invoice's fee.
        self._invoice_billed: dict[str, dict[str, Any]] = {}
        # The invoices that billed each period's overage, and what of it a correction can still credit by a credit
        # note (``billed_overage``): unit -> period key -> [{"invoice", "amount" (sub-units)}, ...] in the order they
        # billed it, the last ``BILLED_PERIODS_KEPT_MAX`` periods per unit (oldest first).
        self._billed_periods: dict[str, dict[str, list[dict[str, Any]]]] = {}
        # The minimum spend a renewal invoice committed for the period it itemises, and the period's usage spend
        # billed since (``period_minimum``): unit -> period key -> {"invoice", "minimum", "spend"} (sub-units), the
        # last ``BILLED_PERIODS_KEPT_MAX`` periods per unit. A period is charged max(spend, minimum) across all its
        # invoices and credit notes: a later increase is billed net of the commitment already billed, a decrease
        # is credited only down to the minimum.
        self._period_minimums: dict[str, dict[str, dict[str, Any]]] = {}
        # Subscription fees billed in advance and not yet recognised (``bill_invoice`` with a service period):
        # invoice id -> {"unit", "amount" (net deferred at billing), "deferred" (what is left), "start", "end",
        # "recognised_to" (the time up to which it is recognised), "pending" (the service has not begun)}. A schedule is forgotten once nothing of it is
        # deferred (recognised to its end, or closed by a credit note, a void or a full refund).
        self._fee_schedules: dict[str, dict[str, Any]] = {}
        # Credits for unused time taken from the fee of a renewal invoice still a draft (no schedule yet: a change
        # or cancel after the tick, before rating's usage lines finalized it): invoice id -> {"unit", "amount"
        # (sub-units already debited to DEFERRED_REVENUE), "end" (where the credit cut the invoice's service)}.
        # Billing the draft settles them: its schedule starts net of them and ends at that cut (``_fee_revenue``).
        self._pending_fee_credits: dict[str, dict[str, Any]] = {}
        self._recent_draws: dict[str, list[Draw]] = {}
        # Usage that drew a ``usage_reversal`` credit which a gateway refund then took back though it was spent
        # (``GrantRefunded.reclaimed.owed``; or a credit note's credit an invoice refund took back,
        # ``InvoicePaymentRefunded.reclaimed.owed``), owed as overage: unit -> [{"grant_id" (the credit), "amount", "key" (the
        # unbilled overage period it is owed under) or "invoice" (the unpaid invoice that billed it)}]. As long as it
        # is owed and unbilled, the credit's draws stay remembered; once a give-back or credit bought clears it, that
        # much of them is forgotten (the usage no longer drew the credit), so no later give-back credits it again; once
        # an invoice bills it, it is collected in full and the record is dropped when the invoice is paid (a give-back
        # of that usage then credits the credit back, as the invoice charged it). Since session 12 (format 19).
        self._owed_usage: dict[str, list[dict[str, Any]]] = {}
        # The credit of credit notes (``credit_note`` grants: money given back with its tax, a means of payment) that
        # usage drew, per rating period, until the invoice billing that period's usage applies it after tax
        # (``apply_credit_note_credit``): unit -> period key (as ``_unbilled``; a capture's: ``hold_spend_key``) ->
        # sub-units, the last ``BILLED_PERIODS_KEPT_MAX`` periods per unit. A give-back of such usage takes it down.
        # Since session 14 (format 25): before, that credit was taken off before tax and the usage it paid bore no
        # VAT. A subscription period's is applied by its invoice; a calendar month's and the captures' by the month's
        # credit note usage invoice (``credit_note_usage``, since session 15: before, no invoice ever billed them).
        self._credit_note_spend: dict[str, dict[str, int]] = {}
        self._low_balance: dict[str, dict[str, Any]] = {}
        self._auto_top_up: dict[str, dict[str, Any]] = {}
        self._top_up_history: dict[str, dict[str, Any]] = {}
        # Gateway refunds that came before the payment they give back (``park_refund``): "<gateway>/<refund
        # reference>" -> {"gateway", "order_id", "refunded_payment", "refund" (the refund's command, JSON), "at"},
        # and "invoice" (its id) for the refund of an invoice's payment (since session 13; no other entry has it).
        # The payment's command applies them and settles each (``settle_parked_refund``), so it is forgotten.
        self._parked_refunds: dict[str, dict[str, Any]] = {}
        # Disputes of the account's payments (``open_dispute``, since session 13): "<gateway>/<dispute id>" ->
        # {"key", "gateway", "dispute", "order_id", "payment", "invoice", "unit", "amount", "status" (open, won, lost,
        # closed), "withdrawn" (sub-units the gateway withdrew and holds: in DISPUTED_FUNDS), "opened_at",
        # "closed_at", and since session 14 (format 25) "fee" (the gateway's fee booked, in DISPUTE_FEES), "fee_at" (the
        # time of the reading it follows) and "fee_unbooked" ({"unit", "amount"}: a fee in another currency)}.
        self._disputes: dict[str, dict[str, Any]] = {}
        if low_balance_threshold is not None:
            self._low_balance[currency] = {
                "threshold": low_balance_threshold,
                "armed": low_balance_threshold <= 0,
            }

    # == read helpers (pure) =================================================================================

    def balance(self, unit: str) -> int:
        """Sum of the open grants' remaining credit of ``unit`` (sub-units), holds included."""
        return sum(
            g["remaining"] for g in self._grants.values() if g["unit"] == unit and g["status"] == "open"
        )

    def held(self, unit: str) -> int:
        """Sum of the active holds of ``unit``."""
        return self._held.get(unit, 0)

    def active_holds(self) -> list[dict[str, Any]]:
        return [dict(h) for h in self._holds.values()]

    def available(self, unit: str) -> int:
        """What new usage and holds can spend: the open grants' credit not set aside for an ended period's late
        usage, minus active holds (negative only when credit under a hold vanished or was set aside)."""
        return sum(g["remaining"] for g in self._grants.values()
                   if g["unit"] == unit and g["status"] == "open" and not g["set_aside"]) - self.held(unit)

    def late_usage_reserve(self, unit: str) -> int:
        """Credit of ``unit`` set aside for late usage of an ended period (``set_aside_grants``): in ``balance``,
        not ``available``; ``balance = available + held + late_usage_reserve``."""
        return sum(g["remaining"] for g in self._grants.values()
                   if g["unit"] == unit and g["status"] == "open" and g["set_aside"])

    def receivable(self, unit: str) -> int:
        """Everything the tenant owes in ``unit``: overage plus the fees and tax of unpaid invoices."""
        billed = sum(b["amount"] for b in self._invoice_billed.values() if b["unit"] == unit)
        return self._receivable.get(unit, 0) + billed

    def overage_receivable(self, unit: str) -> int:
        """The part of ``receivable`` that is usage beyond credit (what give-backs and repayments reduce)."""
        return self._receivable.get(unit, 0)

    def spendable(self, unit: str, meter: str | None, at: datetime) -> int:
        """What a debit or hold for ``meter`` at ``at`` can draw from credit: eligible grants, minus holds (credit
        set aside, eligible only for usage of its ended period, in full)."""
        return _spendable(self._eligible_grants(unit, meter, at), self.available(unit))

    def grant_balances(self) -> list[dict[str, Any]]:
        """Every grant in granted order with its remaining credit (copies: changing them changes nothing). ``amount`` is
        as granted; ``carry_drawn`` what late usage of the period before drew of it through a carry into it (since
        session 15): ``amount - carry_drawn`` is what it gave its own period (the API's and dashboard's ``amount``)."""
        keys = (
            "grant_id",
            "unit",
            "amount",
            "remaining",
            "priority",
            "effective_at",
            "expires_at",
            "scope",
            "source",
            "status",
            "refunded",
            "carry_drawn",
        )
        return [{k: _copy(g[k]) for k in keys} for g in self._grants.values()]

    def grants_caused_by(self, **match: str) -> list[dict[str, Any]]:
        """Grants (granted order) whose ``cause`` has every given key with the given value, with what of
        each may still be refunded (``refundable`` = amount - refunded - reversed: see :func:`_refundable`; a
        gateway's refund may pay back ``reversed`` too, ``refund_grant(reclaim_reversed=True)``)."""
        return [
            {"grant_id": g["grant_id"], "unit": g["unit"], "source": g["source"], "status": g["status"],
             "remaining": g["remaining"], "refundable": _refundable(g), "reversed": g["reversed"]}
            for g in self._grants.values()
            if all(g["cause"].get(k) == v for k, v in match.items())
        ]

    def grant_cause(self, grant_id: UUID) -> dict[str, Any] | None:
        """What grant ``grant_id`` was granted for (a copy of its ``cause``: a checkout order's ``order_id``, ...), or
        ``None`` for an unknown grant."""
        g = self._grants.get(str(grant_id))
        return _copy(g["cause"]) if g is not None else None

    def open_for_late_usage(self, grant_id: UUID) -> bool:
        """Whether grant ``grant_id`` is a plan credit left open after its period for that period's late usage, lapsed
        by the expiry sweep at its ``expires_at`` (``grant_credit(late_usage=True)``, since session 13)."""
        return bool(self._grant(grant_id).get("late_usage"))

    def drawable_until(self, grant_id: UUID) -> datetime | None:
        """When usage stops drawing grant ``grant_id`` (its ``drawable_until``: a plan credit's period end, or the cut of
        an immediate cancel or a change, ``keep_for_late_usage``); None: recorded before session 9, drawn until it
        expires."""
        return self._grant(grant_id).get("drawable_until")  # type: ignore[no-any-return]

    def remaining(self, grant_id: UUID) -> int:
        """What is left of grant ``grant_id`` (sub-units)."""
        return int(self._grant(grant_id)["remaining"])

    def expires_at(self, grant_id: UUID) -> datetime | None:
        """When grant ``grant_id`` expires (None: never)."""
        return self._grant(grant_id)["expires_at"]  # type: ignore[no-any-return]

    def grants_expiring_by(self, now: datetime) -> bool:
        """Whether an open grant has ``expires_at <= now`` (what ``expire_grants(now)`` would expire), one left to
        its renewal (``_left_to_renewal``) aside."""
        return any(g["status"] == "open" and g["expires_at"] is not None and g["expires_at"] <= now
                   and not _left_to_renewal(g) for g in self._grants.values())

    def grants_due_by(self, now: datetime) -> bool:
        """Whether the expiry sweep (``expire_grants(now)``) has something to do: a grant to expire, or one past its
        ``drawable_until`` to set aside (``set_aside_grants``)."""
        return any(g["status"] == "open" and (
            (g["expires_at"] is not None and g["expires_at"] <= now and not _left_to_renewal(g)) or _to_set_aside(g, now))
            for g in self._grants.values())  # one pass: the sweeper asks every account every round

    def holds_expiring_by(self, now: datetime) -> int:
        """How many active holds have ``expires_at <= now`` (what ``expire_holds(now)`` would release)."""
        return sum(1 for h in self._holds.values() if h["expires_at"] <= now)

    def hold(self, hold_id: UUID) -> dict[str, Any]:
        """An active hold, or a settled one still remembered (status captured/released/expired/rejected)."""
        found = self._holds.get(str(hold_id)) or self._settled_holds.get(str(hold_id))
        if found is None:
            raise UnknownHold(f"no hold {hold_id}")
        return dict(found)

    def adjustment(self, adjustment_id: UUID) -> dict[str, Any] | None:
        """A manual adjustment still remembered (the last ``ADJUSTMENTS_KEPT_MAX``): its unit, amount, reason and
        user, and the wallet's ``balance`` and ``available`` just after it; None if unknown or forgotten."""
        found = self._adjustments.get(str(adjustment_id))
        return None if found is None else dict(found)

    def refund(self, refund_id: UUID) -> dict[str, Any] | None:
        """A grant refund still remembered (the last ``REFUNDS_KEPT_MAX``): its grant, unit, amount and tax, where
        the credit came from (``from_wallet``, ``from_breakage``, ``from_adjustment``, ``from_revenue``), whether
        finance overrode, the reason and who asked (``cause``), and ``paid_back``: the money to pay back through
        the gateway (``{"unit", "amount", "tax_amount"}``, None for credit with no money booked); None if unknown
        or forgotten."""
        found = self._refunds.get(str(refund_id))
        if found is None:
            return None
        paid_back = found["paid_back"]
        return {**found, "paid_back": None if paid_back is None else dict(paid_back)}

    def units(self) -> list[str]:
        """Every unit that has had a grant, a hold or a receivable on this account."""
        return sorted({g["unit"] for g in self._grants.values()} | set(self._held) | set(self._receivable)
                      | {b["unit"] for b in self._invoice_billed.values()})

    # == grants ==============================================================================================

    def grant_credit(
        self,
        *,
        grant_id: UUID,
        unit: str,
        amount: int,
        priority: int = 0,
        effective_at: datetime,
        expires_at: datetime | None,
        scope: list[str] | None,
        source: str,
        cause: dict[str, Any],
        granted_by: str,
        tax_amount: int = 0,
        drawable_until: datetime | None = None,
        late_usage: bool = False,
    ) -> None:
        """Adds a grant of ``amount`` sub-units. ``tax_amount`` (same unit) only for purchases.
        ``drawable_until``: usage at or after it no longer draws the grant, which stays open until ``expires_at``
        (a plan's recurring credit: drawn in its period; see the module docstring); after ``effective_at`` and not
        after ``expires_at``. ``late_usage`` (a plan credit without rollover, with ``drawable_until`` and an
        ``expires_at`` after it): open after its period only for that period's late usage, it lapses at its
        ``expires_at`` by the expiry sweep like any grant, never by the renewal (which closes a rollover credit)."""
        self._require_unit(unit)
        if str(grant_id) in self._grants:
            raise DuplicateGrant(f"grant {grant_id} already exists")
        _require_amount("amount", amount)
        _require_amount("tax_amount", tax_amount, allow_zero=True)
        _require_priority(priority)
        _require_time("effective_at", effective_at)
        if expires_at is not None:
            _require_time("expires_at", expires_at)
            if expires_at <= effective_at:
                raise InvalidArgument("expires_at must be after effective_at")
        if drawable_until is not None:
            _require_time("drawable_until", drawable_until)
            if drawable_until <= effective_at:
                raise InvalidArgument("drawable_until must be after effective_at")
            if expires_at is not None and drawable_until > expires_at:
                raise InvalidArgument("drawable_until must not be after expires_at")
        if late_usage and (source != GrantSource.PLAN_RECURRENCE or drawable_until is None or expires_at is None):
            raise InvalidArgument("only a plan credit with drawable_until and expires_at stays open for late usage")
        scope = _require_scope(scope)
        if source not in _CALLER_SOURCES:
            raise InvalidArgument(
                f"unknown grant source {source!r}; expected one of {sorted(_CALLER_SOURCES)}"
            )
        if tax_amount and source != GrantSource.PURCHASE:
            raise InvalidArgument("tax is only booked on purchases")
        _require_text("granted_by", granted_by)
        gid = str(grant_id)
        funding = FUNDING_ACCOUNT[source]
        postings = [
            posting(funding, unit, amount + tax_amount, gid),
            posting(LedgerAccount.TENANT_WALLET, unit, -amount, gid),
        ]
        if tax_amount:
            postings.append(posting(LedgerAccount.TAX_PAYABLE, unit, -tax_amount, gid))
        assert_balanced(postings)
        self._credit_granted(
            grant_id=grant_id,
            unit=unit,
            amount=amount,
            priority=priority,
            effective_at=effective_at,
            expires_at=expires_at,
            scope=scope,
            source=str(source),
            tax_amount=tax_amount,
            cause=dict(cause),
            granted_by=granted_by,
            postings=postings,
            **({"drawable_until": drawable_until} if drawable_until is not None else {}),
            **({"late_usage": True} if late_usage else {}),
        )
        # A grant only raises the balance: no downward crossing to check.

    @event("CreditGranted")
    def _credit_granted(
        self,
        grant_id: UUID,
        unit: str,
        amount: int,
        priority: int,
        effective_at: datetime,
        expires_at: datetime | None,
        scope: list[str] | None,
        source: str,
        tax_amount: int,
        cause: dict[str, Any],
        granted_by: str,
        postings: list[Posting],
        revenue: dict[str, Any] | None = None,
        drawable_until: datetime | None = None,
        late_usage: bool = False,
    ) -> None:
        # ``revenue``: a subscription credit note's change to the fee schedules (``credit_note_grant``).
        # ``drawable_until``: recorded since session 9 (a rollover recurring credit; since session 13 every plan
        # credit); earlier grants have none. ``late_usage``: recorded since session 13 (a plan credit without
        # rollover, open after its period for late usage of it until its expiry); earlier grants have none.
        self._apply_fee_revenue(revenue)
        self._add_grant(
            {
                "grant_id": str(grant_id),
                "unit": unit,
                "amount": amount,
                "priority": priority,
                "effective_at": effective_at,
                "expires_at": expires_at,
                "scope": scope,
                "source": source,
                "funded_by": str(FUNDING_ACCOUNT[source]),
                "tax_amount": tax_amount,
                "cause": cause,
                "granted_by": granted_by,
                "drawable_until": drawable_until,
                "late_usage": late_usage,
            }
        )
        self._update_arming(unit)

    def book_purchase_money(
        self,
        *,
        grant_id: UUID,
        currency: str,
        net: int,
        tax_amount: int,
        at: datetime,
        cause: dict[str, Any],
    ) -> None:
        """Books the money paid for a purchase granted in a *credit unit*, in the account's ``currency``.

        A purchase grant in a credit unit (``CREDIT``) is balanced in that unit; what the tenant paid for
        it (``net`` + ``tax_amount`` sub-units of the currency) is a second posting set, in the currency:
        Dr ``GATEWAY_CLEARING`` total / Cr ``DEFERRED_REVENUE`` net / Cr ``TAX_PAYABLE`` tax. Once per
        grant, before anything of it is refunded; refunds reverse it in proportion (:meth:`refund_grant`).
        A purchase in the currency itself books its money and tax on the grant (``grant_credit``).
        """
        g = self._grant(grant_id)
        if not is_currency_code(currency):
            raise InvalidUnit(f"{currency!r} is not an ISO 4217 currency")
        self._require_unit(currency)
        _require_amount("net", net, allow_zero=True)
        _require_amount("tax_amount", tax_amount, allow_zero=True)
        _require_amount("total", net + tax_amount)
        _require_time("at", at)
        if g["source"] != GrantSource.PURCHASE:
            raise InvalidArgument(f"grant {grant_id} is {g['source']}: money is booked for purchases only")
        if is_currency_code(g["unit"]):
            raise InvalidArgument(f"grant {grant_id} is in {g['unit']}: its money is booked on the grant")
        if g.get("money") is not None:
            raise MoneyAlreadyBooked(f"the money of grant {grant_id} is already booked")
        if g["refunded"]:
            raise InvalidArgument(f"grant {grant_id} is already (partly) refunded")
        gid = g["grant_id"]
        postings = [
            posting(LedgerAccount.GATEWAY_CLEARING, currency, net + tax_amount, gid),
            posting(LedgerAccount.DEFERRED_REVENUE, currency, -net, gid),
            posting(LedgerAccount.TAX_PAYABLE, currency, -tax_amount, gid),
        ]
        postings = [line for line in postings if line["amount"]]
        assert_balanced(postings)
        self._purchase_money_booked(
            grant_id=grant_id,
            unit=currency,
            amount=net + tax_amount,
            net=net,
            tax_amount=tax_amount,
            postings=postings,
            cause=dict(cause),
            at=at,
        )

    @event("PurchaseMoneyBooked")
    def _purchase_money_booked(
        self,
        grant_id: UUID,
        unit: str,
        amount: int,
        net: int,
        tax_amount: int,
        postings: list[Posting],
        cause: dict[str, Any],
        at: datetime,
    ) -> None:
        # recognised / breakage: the grant's currency revenue and breakage (net of reversals); adjusted: its
        # credit removed by negative adjustments; recognised_at: the last run that moved it.
        self._grants[str(grant_id)]["money"] = {
            "unit": unit, "net": net, "tax": tax_amount, "refunded_net": 0, "refunded_tax": 0,
            "recognised": 0, "breakage": 0, "adjusted": 0, "recognised_at": None,
        }

    def purchase_money(self, grant_id: UUID) -> dict[str, Any] | None:
        """The currency money booked for a credit-unit purchase grant (a copy), or ``None``: ``unit``,
        ``net``, ``tax`` and what of them was refunded (``refunded_net``, ``refunded_tax``)."""
        money = self._grant(grant_id).get("money")
        return {k: money[k] for k in _MONEY_KEYS} if money is not None else None

    def purchase_revenue(self, grant_id: UUID) -> dict[str, Any] | None:
        """Where the net money of a credit-unit purchase grant stands, or ``None``: ``unit``, ``net``,
        ``deferred``, ``recognised``, ``breakage`` and ``refunded_net`` (they sum to ``net``), and
        ``recognised_at`` (the last recognition that moved it)."""
        money = self._grant(grant_id).get("money")
        if money is None:
            return None
        deferred = money["net"] - money["refunded_net"] - money["recognised"] - money["breakage"]
        return {"unit": money["unit"], "net": money["net"], "deferred": deferred, "recognised": money["recognised"],
                "breakage": money["breakage"], "refunded_net": money["refunded_net"],
                "recognised_at": money["recognised_at"]}

    def money_paid_back(self, grant_id: UUID) -> dict[str, Any] | None:
        """What the refunds of a paid grant took out of the gateway's clearing, in the currency it was paid in, or
        ``None`` when that money is not known (a credit-unit grant whose money was never booked):
        ``unit``, ``paid_back`` (in all: credit in the currency plus its tax, or a credit-unit package's money
        and tax), ``refunds`` (each refund's share, in recorded order: ``{"refund_id", "amount"}``) and
        ``chargebacks`` (each lost dispute's share, ``{"refund_id", "amount", "dispute"}``: a bank's decision, never a
        payout at the gateway). Since format 28 of the snapshot each share names its refund and dispute (a bare amount
        before); the record is rebuilt from the events, so refunds recorded before are there too."""
        g = self._grant(grant_id)
        money = g.get("money")
        if money is not None:
            paid_back = money["refunded_net"] + money["refunded_tax"]
            unit = money["unit"]
        elif is_currency_code(g["unit"]):
            paid_back, unit = g["refunded"] + g["refunded_tax"], g["unit"]
        else:
            return None
        refunds = [dict(r) for r in g["refunds_paid_back"] if not r.get("dispute")]
        chargebacks = [dict(r) for r in g["refunds_paid_back"] if r.get("dispute")]
        return {"unit": unit, "paid_back": paid_back, "refunds": refunds, "chargebacks": chargebacks}

    def paid_money(self, grant_id: UUID) -> dict[str, Any] | None:
        """What was paid for a paid grant and what its refunds gave back of it, in the currency it was paid in:
        ``unit``, ``net``, ``tax``, ``refunded_net``, ``refunded_tax``, and ``credit`` / ``refunded`` (the grant's credit
        and what of it was refunded, in the grant's own unit). A grant in the currency: its credit is the net and its
        tax on it; a credit-unit grant: the money booked for it (:meth:`book_purchase_money`). ``None`` when that money
        is not known (a credit-unit grant whose money was never booked)."""
        g = self._grant(grant_id)
        money = g.get("money")
        if money is not None:
            paid = {k: money[k] for k in _MONEY_KEYS}
        elif is_currency_code(g["unit"]):
            paid = {"unit": g["unit"], "net": g["amount"], "tax": g["tax_amount"], "refunded_net": g["refunded"],
                    "refunded_tax": g["refunded_tax"]}
        else:
            return None
        return {**paid, "credit": g["amount"], "refunded": g["refunded"]}

    def purchase_money_due(self, now: datetime) -> bool:
        """Whether the sweeper should run :meth:`recognise_purchase_money` at ``now`` (cheap: no postings).

        Due when a grant with booked money has use not yet recognised and either the account's last run
        is ``MONEY_RECOGNITION_INTERVAL`` or more before ``now``, or on another UTC day, or there was none;
        or at once when such a grant has no credit left to defer or expires by ``now``.
        """
        last: datetime | None = None
        pending = False
        for g in self._grants.values():
            money = g.get("money")
            if money is None:
                continue
            if money["recognised_at"] is not None and (last is None or money["recognised_at"] > last):
                last = money["recognised_at"]
            if (g["status"] == "open" and g["remaining"] and g["expires_at"] is not None
                    and g["expires_at"] <= now):
                return True  # its remainder lapses in this sweep: close its money with it
            recognised, breakage, closed = _money_targets(g)
            if (recognised, breakage) != (money["recognised"], money["breakage"]):
                if closed:
                    return True
                pending = True
        if not pending:
            return False
        return (last is None or now - last >= MONEY_RECOGNITION_INTERVAL
                or last.astimezone(UTC).date() != now.astimezone(UTC).date())

    def recognise_purchase_money(self, now: datetime) -> None:
        """Recognises the currency money of credit-unit purchase grants as far as their credit was used.

        One ``PurchaseMoneyRecognised`` for every grant whose consumption or lapse changed since its last
        recognition (none if nothing changed, so a second run at once records nothing); per grant, in the
        currency: Dr ``DEFERRED_REVENUE`` / Cr ``RECOGNISED_REVENUE`` (consumed) and Cr ``BREAKAGE``
        (lapsed), to exactly the amounts in the module docstring. Usage debits never do this.
        """
        _require_time("now", now)
        changes: list[dict[str, Any]] = []
        postings: list[Posting] = []
        for g in self._grants.values():
            money = g.get("money")
            if money is None:
                continue
            recognised, breakage, _ = _money_targets(g)
            to_revenue, to_breakage = recognised - money["recognised"], breakage - money["breakage"]
            if not (to_revenue or to_breakage):
                continue
            gid, currency = g["grant_id"], money["unit"]
            changes.append({"grant_id": gid, "recognised": to_revenue, "breakage": to_breakage})
            postings += [line for line in (
                posting(LedgerAccount.DEFERRED_REVENUE, currency, to_revenue + to_breakage, gid),
                posting(LedgerAccount.RECOGNISED_REVENUE, currency, -to_revenue, gid),
                posting(LedgerAccount.BREAKAGE, currency, -to_breakage, gid),
            ) if line["amount"]]
        if not changes:
            return
        assert_balanced(postings)
        self._purchase_money_recognised(
            unit=self.currency,
            recognised=sum(c["recognised"] for c in changes),
            breakage=sum(c["breakage"] for c in changes),
            grants=changes,
            postings=postings,
            at=now,
        )

    @event("PurchaseMoneyRecognised")
    def _purchase_money_recognised(
        self,
        unit: str,
        recognised: int,
        breakage: int,
        grants: list[dict[str, Any]],
        postings: list[Posting],
        at: datetime,
    ) -> None:
        for change in grants:
            money = self._grants[change["grant_id"]]["money"]
            money["recognised"] += change["recognised"]
            money["breakage"] += change["breakage"]
            money["recognised_at"] = at

    def expire_grants(self, now: datetime, *, grant_ids: Iterable[str] | None = None, thresholds: bool = True) -> None:
        """Posts each grant expired at ``now`` (``expires_at <= now``) to breakage, once each. ``grant_ids``: only
        these (a renewal ends its period's recurring credits; the sweeper the rest); ``thresholds`` False: the
        caller checks the units' alerts once its command's movements are done (``check_thresholds``).

        The sweep (no ``grant_ids``) leaves a plan's rollover credit to the renewal that ends its period
        (``_left_to_renewal``), however late that comes: expired first, its carry was lost (see the module
        docstring, ``drawable_until``). It also sets aside every open grant past its ``drawable_until`` not expiring
        now (``GrantSetAside``, since session 13: a plan credit whose period ended before its renewal came), and checks
        the alerts of the units it expired or set aside once, after both."""
        _require_time("now", now)
        only = None if grant_ids is None else set(grant_ids)
        due = [
            g
            for g in self._grants.values()
            if g["status"] == "open" and g["expires_at"] is not None and g["expires_at"] <= now
            and (g["grant_id"] in only if only is not None else not _left_to_renewal(g))
        ]
        if only is None:
            # The sweep also sets aside the credit whose period has ended (not expiring now), the renewal not come
            # yet: new usage can no longer draw it, so it leaves ``available`` now, its alerts checked below once.
            units = self._set_aside(now, [g for g in self._grants.values() if _to_set_aside(g, now)])
        else:
            units = set()
        due.sort(key=lambda g: (g["expires_at"], g["seq"]))
        for g in due:
            units.add(g["unit"])
            remainder = g["remaining"]
            postings: list[Posting] = []
            if remainder:
                postings = [
                    posting(LedgerAccount.TENANT_WALLET, g["unit"], remainder, g["grant_id"]),
                    posting(LedgerAccount.BREAKAGE, g["unit"], -remainder, g["grant_id"]),
                ]
            assert_balanced(postings)
            self._grant_expired(
                grant_id=UUID(g["grant_id"]),
                unit=g["unit"],
                remainder=remainder,
                source=g["source"],
                expired_at=g["expires_at"],
                postings=postings,
                at=now,
                draws_kept=True,
            )
        for unit in sorted(units if thresholds else ()):
            self._check_thresholds(unit, now)

    def set_aside_grants(self, now: datetime, *, grant_ids: Iterable[str], thresholds: bool = True) -> None:
        """Sets aside the credit left of each of ``grant_ids`` whose ``drawable_until`` has come by ``now`` (its
        period has ended) and that stays open, once each: the renewal that ends the period of a plan credit left open
        for that period's late usage (``late_usage``). It leaves ``available`` for ``late_usage_reserve`` (see the
        module docstring); ``thresholds`` False: the caller checks the units' alerts once its command's movements are
        done (the renewal, after the next period's credit). The expiry sweep sets aside the others
        (``expire_grants``)."""
        _require_time("now", now)
        wanted = set(grant_ids)
        units = self._set_aside(now, [g for g in self._grants.values()
                                      if g["grant_id"] in wanted and _to_set_aside(g, now)])
        for unit in sorted(units if thresholds else ()):
            self._check_thresholds(unit, now)

    def _set_aside(self, now: datetime, grants: list[GrantRecord]) -> set[str]:
        for g in sorted(grants, key=lambda g: (g["drawable_until"], g["seq"])):
            self._grant_set_aside(grant_id=UUID(g["grant_id"]), unit=g["unit"], remaining=g["remaining"],
                                  drawable_until=g["drawable_until"], at=now)
        return {g["unit"] for g in grants}

    @event("GrantSetAside")
    def _grant_set_aside(self, grant_id: UUID, unit: str, remaining: int, drawable_until: datetime,
                         at: datetime) -> None:
        # Recorded since session 13. No postings: the credit stays in ``tenant_wallet`` (``balance``), out of
        # ``available``; ``remaining`` is what was left of the grant then (a read model's reserve follows the grant's
        # postings from here). ``available`` only goes down: nothing to re-arm.
        self._grants[str(grant_id)]["set_aside"] = True

    def keep_for_late_usage(self, *, grant_id: UUID, at: datetime, drawable_until: datetime, expires_at: datetime,
                            reason: str, by: str, moved: int = 0, lapsed: int = 0, successor: UUID | None = None,
                            carry: int = 0, reserve: int = 0, reserve_from: str | None = None) -> None:
        """A plan credit whose period ended (a renewal, a paused one, a cancel at the period's end) or was cut short at
        ``drawable_until`` (an immediate cancel, a plan or quantity change) stays open until ``expires_at`` for the usage
        of before ``drawable_until`` that reaches the ledger late, as a credit without rollover does after its period
        (since session 14; see the module docstring, "Credit kept for late usage"); the expiry sweep lapses what is
        left of it to breakage then.

        ``moved`` of its remaining leaves it now, back to the account that funded it (``lapsed`` of that to breakage):
        what a next grant takes again (a rollover's carry, a change's whole rest). ``successor`` (with ``carry``): that
        grant; late usage of before ``drawable_until`` draws this grant's rest first and then at most ``carry`` of the
        successor (the same money: on time it would have come out of the carry). No alerts here: the caller sets it
        aside (``set_aside_grants``) and checks them once its movements are done.

        ``reserve`` (at most ``carry``, since session 15): the part of the carry the successor does not hold (a
        downgrade's new grant, less than the rest: on time, usage of before the change lowers the new grant to nothing
        and then the rest stays in the old grant). Late usage draws the successor's part first, and once that usage has
        taken all of it, this old allowance: reinstated into this grant (from ``reserve_from``, the account the move
        credited; recognised revenue when the change's credit note took it out of deferred revenue, ``included_back``)
        as the usage needs it, whole, and lapsed after the window like the rest of it, as on time."""
        g = self._grant(grant_id)
        _require_time("at", at)
        _require_time("drawable_until", drawable_until)
        _require_time("expires_at", expires_at)
        _require_text("reason", reason)
        _require_text("by", by)
        _require_amount("moved", moved, allow_zero=True)
        _require_amount("lapsed", lapsed, allow_zero=True)
        _require_amount("carry", carry, allow_zero=True)
        _require_amount("reserve", reserve, allow_zero=True)
        if g["status"] != "open":
            raise GrantClosed(f"grant {grant_id} is {g['status']}")
        if g["source"] != GrantSource.PLAN_RECURRENCE or g.get("drawable_until") is None:
            raise InvalidArgument("only a plan credit with drawable_until is kept for late usage")
        if reserve > carry or reserve > moved - lapsed:
            raise InvalidAmount(f"a reserve of {reserve} is more than the carry {carry} or what moved back")
        try:
            source = LedgerAccount(reserve_from or g["funded_by"])
        except ValueError:
            raise InvalidArgument(f"unknown ledger account {reserve_from!r}") from None
        if not g["effective_at"] < drawable_until <= g["drawable_until"]:
            raise InvalidArgument("drawable_until must be after effective_at and not after the grant's own")
        if expires_at <= drawable_until:
            raise InvalidArgument("expires_at must be after drawable_until")
        if lapsed > moved or moved > g["remaining"]:
            raise InvalidAmount(f"grant {grant_id} has {g['remaining']} left: {moved} cannot move, {lapsed} of it "
                                "lapse")
        if (successor is None) != (carry == 0) or (successor is not None and str(successor) == g["grant_id"]):
            raise InvalidArgument("a successor needs a carry, and a carry a successor other than the grant")
        unit, gid = g["unit"], g["grant_id"]
        postings: list[Posting] = []
        if moved:
            postings = [posting(LedgerAccount.TENANT_WALLET, unit, moved, gid)]
            if moved - lapsed:
                postings.append(posting(LedgerAccount(g["funded_by"]), unit, -(moved - lapsed), gid))
            if lapsed:
                postings.append(posting(LedgerAccount.BREAKAGE, unit, -lapsed, gid))
        assert_balanced(postings)
        self._grant_kept_for_late_usage(
            grant_id=grant_id, unit=unit, moved=moved, lapsed=lapsed, postings=postings,
            drawable_until=drawable_until, expires_at=expires_at,
            successor=None if successor is None else str(successor), carry=carry, reason=reason, by=by, at=at,
            **({"reserve": reserve, "reserve_from": source.value} if reserve else {}))

    @event("GrantKeptForLateUsage")
    def _grant_kept_for_late_usage(self, grant_id: UUID, unit: str, moved: int, lapsed: int, postings: list[Posting],
                                   drawable_until: datetime, expires_at: datetime, successor: str | None, carry: int,
                                   reason: str, by: str, at: datetime, reserve: int = 0,
                                   reserve_from: str | None = None) -> None:
        # Recorded since session 14. ``moved`` left the wallet (``lapsed`` of it to breakage); ``moved - lapsed`` is
        # kept apart (``moved``) so a give-back never credits back what went to the next grant.
        g = self._grants[str(grant_id)]
        g["remaining"] -= moved
        g["moved"] += moved - lapsed
        g["breakage"] += lapsed
        g["drawable_until"] = drawable_until
        g["expires_at"] = expires_at
        g["late_usage"] = True
        # ``reserve`` / ``from`` (recorded since session 15): the part of the carry the successor does not hold.
        g["carry"] = {"to": successor, "left": carry, "reserve": reserve, "from": reserve_from} \
            if successor is not None and carry > 0 else None
        self._update_arming(unit)

    def hand_on_carry(self, *, grant_id: UUID, at: datetime, reason: str, by: str,
                      successor: UUID | None = None, room: int | None = None,
                      reserve_from: str | None = None) -> bool:
        """Grant ``grant_id`` is about to be voided at or before its own start (a second plan change, or an immediate
        cancel, at the instant of a change or a renewal that granted it): what kept grants carried into it (their
        ``carry`` naming it) is handed on first, so their period's late usage still finds it (since session 15; before,
        the void broke the link: that usage was owed, and a cancel's void took the carry back to deferred revenue).
        Each carrier, in granted order, has at most what its carry still has and what the grant holds: it goes on into
        ``successor`` (the change's new grant of the unit, which takes the grant's rest: the carrier names it now, with
        what of its carry and ``reserve`` the successor does not hold, ``room`` being what it is granted, as its
        reserve: from its own ``from``, else ``reserve_from``, else the carrier's funding account), or without one (a cancel, a new plan without credit of the unit) it comes back to the carrier
        at once (``CarryHandedOn``: Dr the grant / Cr the carrier, in ``TENANT_WALLET``), with its ``reserve``
        reinstated (Dr its ``from``), kept there for that late usage and lapsed after its window with the carrier's own
        rest, as if the void's command had come alone. False: nothing carried into it, nothing recorded. No alerts: the
        caller voids the grant and checks them once its movements are done."""
        g = self._grant(grant_id)
        _require_time("at", at)
        _require_text("reason", reason)
        _require_text("by", by)
        if g["status"] != "open":
            raise GrantClosed(f"grant {grant_id} is {g['status']}")
        if successor is not None and str(successor) == g["grant_id"]:
            raise InvalidArgument("a grant cannot hand its carry on to itself")
        gid, unit = g["grant_id"], g["unit"]
        carriers = [c for c in self._grants.values() if c["status"] == "open" and c["carry"] is not None
                    and c["carry"]["to"] == gid and c["carry"]["left"] > 0]
        if not carriers:
            return False
        links: list[dict[str, Any]] = []
        postings: list[Posting] = []
        holds = g["remaining"]
        for c in carriers:
            reserve = min(c["carry"].get("reserve", 0), c["carry"]["left"])
            part = min(c["carry"]["left"] - reserve, holds)
            holds -= part
            link: dict[str, Any] = {"grant_id": c["grant_id"], "to": None, "left": 0, "back": part}
            if successor is not None:
                claim = part + reserve
                held = claim if room is None else min(claim, room)
                if room is not None:
                    room -= held
                link.update(to=str(successor), left=claim, back=0,
                            **({"reserve": claim - held,
                                "from": c["carry"].get("from") or reserve_from or c["funded_by"]}
                               if claim - held else {}))
            elif reserve:
                link["reinstated"] = reserve
                postings += [posting(LedgerAccount(c["carry"]["from"]), unit, reserve, c["grant_id"]),
                             posting(LedgerAccount.TENANT_WALLET, unit, -reserve, c["grant_id"])]
            links.append(link)
            if link["back"]:
                postings += [posting(LedgerAccount.TENANT_WALLET, unit, part, gid),
                             posting(LedgerAccount.TENANT_WALLET, unit, -part, c["grant_id"])]
        assert_balanced(postings)
        self._carry_handed_on(grant_id=grant_id, unit=unit, links=links, postings=postings, reason=reason, by=by, at=at)
        return True

    @event("CarryHandedOn")
    def _carry_handed_on(self, grant_id: UUID, unit: str, links: list[dict[str, Any]], postings: list[Posting],
                         reason: str, by: str, at: datetime) -> None:
        # Recorded since session 15. ``back`` leaves the grant for its carrier within the wallet (no other account).
        g = self._grants[str(grant_id)]
        for link in links:
            c = self._grants[link["grant_id"]]
            back = link["back"] + link.get("reinstated", 0)
            g["remaining"] -= link["back"]
            c["remaining"] += back
            c["moved"] -= back
            c["carry"] = {"to": link["to"], "left": link["left"], "reserve": link.get("reserve", 0),
                          "from": link.get("from")} if link["to"] is not None else None
        self._update_arming(unit)

    @event("GrantExpired")
    def _grant_expired(
        self,
        grant_id: UUID,
        unit: str,
        remainder: int,
        source: str,
        expired_at: datetime,
        postings: list[Posting],
        at: datetime,
        draws_kept: bool = False,
    ) -> None:
        # ``draws_kept`` (recorded since session 11): the grant's draws stay remembered, so a give-back of its usage
        # after the expiry absorbs what a refund already paid back of it (``_give_back``). Earlier expiries forgot
        # them: their streams replay as recorded.
        g = self._grants[str(grant_id)]
        g["remaining"] -= remainder
        g["breakage"] += remainder  # 0 before (a grant kept for late usage may have lapsed part when kept)
        g["status"] = "expired"
        if not draws_kept:
            self._forget_draws_of(unit, g["grant_id"])
        self._update_arming(unit)

    def void_grant(self, *, grant_id: UUID, reason: str, voided_by: str, at: datetime,
                   thresholds: bool = True, lapsed: int = 0) -> None:
        """Closes a non-paid grant (e.g. a plan change voids the old plan's recurring grant).

        The remainder goes back to the account that funded the grant. Paid grants are refunded instead.
        ``thresholds`` False: no low-balance alert or auto-top-up here; the command goes on to move more of
        the unit (a renewal grants the next period's credit, a cancel its credit note, a refund just paid
        back) and calls :meth:`check_thresholds` once, after its last movement, on the balance it leaves.
        ``lapsed`` (at most the remainder): the part of it the tenant's right to ended unused, posted to
        ``BREAKAGE`` as an expiry would post it instead of going back to the funding account: a recurring
        credit's remainder above its ``rollover_cap`` at its period's end, or an included credit whose fee was
        given back in full (the fee's funding of it is gone, so nothing is there to return it to).
        """
        g = self._grant(grant_id)
        _require_text("reason", reason)
        _require_text("voided_by", voided_by)
        _require_time("at", at)
        _require_amount("lapsed", lapsed, allow_zero=True)
        if g["source"] in PAID_SOURCES:
            raise NotVoidable(f"grant {grant_id} was paid for: refund it instead")
        if g["status"] != "open":
            raise GrantClosed(f"grant {grant_id} is {g['status']}")
        remainder = g["remaining"]
        if lapsed > remainder:
            raise InvalidAmount(f"grant {grant_id} has {remainder} left, {lapsed} cannot lapse")
        postings: list[Posting] = []
        if remainder:
            postings = [posting(LedgerAccount.TENANT_WALLET, g["unit"], remainder, g["grant_id"])]
            if remainder - lapsed:
                postings.append(posting(LedgerAccount(g["funded_by"]), g["unit"], -(remainder - lapsed),
                                        g["grant_id"]))
            if lapsed:
                postings.append(posting(LedgerAccount.BREAKAGE, g["unit"], -lapsed, g["grant_id"]))
        assert_balanced(postings)
        self._grant_voided(
            grant_id=grant_id,
            unit=g["unit"],
            remainder=remainder,
            reason=reason,
            voided_by=voided_by,
            postings=postings,
            at=at,
            **({"lapsed": lapsed} if lapsed else {}),
        )
        if thresholds:
            self._check_thresholds(g["unit"], at)

    def void_grant_part(self, *, grant_id: UUID, amount: int, reason: str, voided_by: str, at: datetime,
                        cause: dict[str, Any]) -> int:
        """Takes up to ``amount`` of a non-paid grant's remaining credit back to the account that funded it (Dr
        TENANT_WALLET / Cr its funding account, ``GrantPartVoided``); the grant stays open with the rest. What of it
        was used stays used: at most what is left is taken. A partial chargeback of a checkout order voids that share
        of the order's bonus so (``order_chargebacks``). No alerts here: the caller moves more of the unit and calls
        :meth:`check_thresholds` once. Returns what was taken (0: nothing left of it, nothing recorded)."""
        g = self._grant(grant_id)
        _require_amount("amount", amount)
        _require_text("reason", reason)
        _require_text("voided_by", voided_by)
        _require_time("at", at)
        if g["source"] in PAID_SOURCES:
            raise NotVoidable(f"grant {grant_id} was paid for: refund it instead")
        take = min(amount, g["remaining"]) if g["status"] == "open" else 0
        if take <= 0:
            return 0
        postings = [posting(LedgerAccount.TENANT_WALLET, g["unit"], take, g["grant_id"]),
                    posting(LedgerAccount(g["funded_by"]), g["unit"], -take, g["grant_id"])]
        assert_balanced(postings)
        self._grant_part_voided(grant_id=grant_id, unit=g["unit"], amount=take, reason=reason, voided_by=voided_by,
                                postings=postings, cause=dict(cause), at=at)
        return take

    @event("GrantPartVoided")
    def _grant_part_voided(self, grant_id: UUID, unit: str, amount: int, reason: str, voided_by: str,
                           postings: list[Posting], cause: dict[str, Any], at: datetime) -> None:
        self._grants[str(grant_id)]["remaining"] -= amount
        self._update_arming(unit)

    def check_thresholds(self, unit: str, at: datetime, *, top_up: bool = True) -> None:
        """The alerts of a command that moved ``unit`` several times (``void_grant(thresholds=False)`` then a
        grant), once, on the balance it leaves; ``top_up`` False: no auto-top-up request (money given back at
        the customer's request, a cancel), the rule stays armed for the next usage below its threshold."""
        self._require_unit(unit)
        _require_time("at", at)
        self._check_thresholds(unit, at, top_up=top_up)

    @event("GrantVoided")
    def _grant_voided(
        self,
        grant_id: UUID,
        unit: str,
        remainder: int,
        reason: str,
        voided_by: str,
        postings: list[Posting],
        at: datetime,
        lapsed: int = 0,
    ) -> None:
        # ``lapsed`` recorded since session 9 (earlier voids: all of the remainder back to the funding account).
        g = self._grants[str(grant_id)]
        g["remaining"] -= remainder
        g["breakage"] += lapsed  # 0 before (a grant kept for late usage may have lapsed part when kept)
        g["status"] = "voided"
        self._forget_draws_of(unit, g["grant_id"])
        self._update_arming(unit)

    # == usage ===============================================================================================

    def debit_usage(
        self,
        *,
        command_id: UUID,
        unit: str,
        amount: int,
        meter: str,
        at: datetime,
        overage_policy: str,
        cause: dict[str, Any],
        credit_note: dict[str, Any] | list[dict[str, Any]] | None = None,
    ) -> None:
        """Draws ``amount`` sub-units for ``meter`` (negative: give-back). Never raises for lack of credit.

        ``credit_note``: a give-back of usage invoices already billed (``billed_overage``), one entry per invoice
        (a list, or one dict): ``{"note", "invoice", "period", "amount"[, "absorbed"]}``: ``amount`` sub-units of
        the give-back were credited, with the tax that invoice charged, by its credit note ``note``
        (``credit_note_grant``, recorded just before; ``None`` when it credits nothing), and ``absorbed`` more are
        what the invoice billed but can no longer give back (a refund gave it back already, its minimum commitment
        bills it anyway): neither is given back again. The period's creditable overage of that invoice goes down by
        both (``InvoicedUsageCredited``) and only the rest is given back here; the ``UsageDebited`` still records
        the whole ``amount`` (the usage corrected), with the postings of the rest. Usage of a grant a finance override
        already refunded is ``absorbed`` too (see the module docstring, "Usage give-back")."""
        self._require_unit(unit)
        _require_amount("amount", amount, allow_zero=True, allow_negative=True)
        _require_text("meter", meter)
        _require_time("at", at)
        if overage_policy not in OVERAGE_POLICIES:
            raise InvalidArgument(f"overage_policy must be one of {OVERAGE_POLICIES}, not {overage_policy!r}")
        if not isinstance(cause, dict):
            raise InvalidArgument("cause must be an object")
        period = cause.get("period")
        if period is not None:
            try:
                _period_start(period)
            except (TypeError, ValueError):
                raise InvalidArgument(f"cause.period must be a month (YYYY-MM) or an ISO 8601 time, not {period!r}"
                                      ) from None
        cause = dict(cause)
        notes = [credit_note] if isinstance(credit_note, dict) else list(credit_note or [])
        if notes:
            self._check_credit_notes(unit, amount, notes)
        if amount < 0:
            self._give_back(command_id=command_id, unit=unit, amount=amount, meter=meter, at=at, cause=cause,
                            credit_notes=notes)
            return
        if amount == 0:
            # Usage that cost nothing (an allowance, a flat fee or band already charged, a trial): recorded for its
            # quantity (the monthly usage summary), no postings; nothing moved, so no credit is looked at, never
            # refused, and no balance alert or auto-top-up can follow from it.
            self._record_usage_debited(command_id=command_id, meter=meter, unit=unit, amount=0, postings=[], draws=[],
                                overage=0, credit_grant=None, cause=cause, at=at)
            return
        # ``spendable`` and ``_plan_draws`` of one list of eligible grants, looked up once.
        eligible = self._eligible_grants(unit, meter, at)
        available = self.available(unit)
        spendable = _spendable(eligible, available)
        from_credit = min(amount, spendable)
        if from_credit < amount and overage_policy == "block":
            self._usage_rejected(
                command_id=command_id,
                meter=meter,
                unit=unit,
                amount=amount,
                reason=REJECTED_INSUFFICIENT_CREDIT,
                spendable=spendable,
                cause=cause,
                at=at,
            )
            return
        draws = self._plan_draws(unit, meter, at, from_credit, available, eligible=eligible)
        overage = amount - from_credit
        postings = _usage_postings(unit, draws, overage)
        assert_balanced(postings)
        self._record_usage_debited(
            command_id=command_id,
            meter=meter,
            unit=unit,
            amount=amount,
            postings=postings,
            draws=draws,
            overage=overage,
            credit_grant=None,
            cause=cause,
            at=at,
        )
        self._check_thresholds(unit, at)

    def _check_credit_notes(self, unit: str, amount: int, notes: list[dict[str, Any]]) -> None:
        total, seen = 0, set()
        for credit_note in notes:
            if not isinstance(credit_note, dict) or not all(isinstance(credit_note.get(f), str)
                                                            for f in ("invoice", "period")) \
                    or not isinstance(credit_note.get("note"), str | None):
                raise InvalidArgument("credit_note must name its note, invoice and period")
            credited, absorbed = credit_note.get("amount"), credit_note.get("absorbed", 0)
            _require_amount("credit_note.amount", credited, allow_zero=True)
            _require_amount("credit_note.absorbed", absorbed, allow_zero=True)
            if credit_note.get("note") is None and credited:
                raise InvalidArgument("credit_note credits an amount without naming its note")
            key = (credit_note["period"], credit_note["invoice"])
            billed = next((b for b in self.billed_overage(unit, key[0]) if b["invoice"] == key[1]), None)
            total += credited + absorbed
            if amount >= 0 or not credited + absorbed or total > -amount or key in seen or billed is None \
                    or credited + absorbed > billed["amount"]:
                raise InvalidAmount(f"credit note {credit_note.get('note')} credits {credited} (and {absorbed} "
                                    f"absorbed) of a give-back of {-amount}: nothing, more than the give-back or than "
                                    f"invoice {key[1]} billed for {key[0]}")
            seen.add(key)

    def _give_back(
        self, *, command_id: UUID, unit: str, amount: int, meter: str, at: datetime, cause: dict[str, Any],
        credit_notes: list[dict[str, Any]],
    ) -> None:
        left = -amount
        for credit_note in credit_notes:
            # What the credit note credited (net, its tax on top), or the invoice cannot give back, is not given back.
            absorbed = credit_note.get("absorbed", 0)
            self._invoiced_usage_credited(command_id=command_id, unit=unit, invoice=credit_note["invoice"],
                                          period=credit_note["period"], note=credit_note["note"],
                                          amount=credit_note["amount"], at=at,
                                          **({"absorbed": absorbed} if absorbed else {}))
            left -= credit_note["amount"] + absorbed
        postings: list[Posting] = []
        # Only overage no invoice bills yet: an issued invoice is charged its full total (as its fees are), so what
        # it billed stays receivable until it is paid or voided, and the rest of the give-back becomes credit.
        unbilled = sum(self._unbilled.get(unit, {}).values())
        reduce_receivable = max(0, min(left, self.overage_receivable(unit), unbilled))
        stack = self._recent_draws.get(unit, [])
        if reduce_receivable:
            postings += [
                posting(LedgerAccount.RECOGNISED_REVENUE, unit, reduce_receivable),
                posting(LedgerAccount.RECEIVABLES, unit, -reduce_receivable),
            ]
            left -= reduce_receivable
            if self._owed_usage.get(unit):
                # What it clears of usage a gateway refund made owed no longer draws the credit it drew (the event
                # forgets those draws, ``_clear_owed_usage``): the rest is given back against the draws left.
                reduced = _reduce_unbilled({unit: dict(self._unbilled.get(unit, {}))}, unit,
                                           _overage_key(cause, at), reduce_receivable)
                stack = [dict(entry) for entry in stack]
                for part in _owed_cleared(self._owed_usage[unit], reduced):
                    _trim_entries(stack, part["grant_id"], part["amount"])
        draws: list[Draw] = []
        # What of a drawn grant's usage a refund already paid back from revenue (a finance override): the customer
        # has that money, so it is not credited again, only taken off the draws remembered (``absorbed``).
        absorbed: list[Draw] = []
        # What of a lapsed grant's remembered draws (expired, or past its draw end at ``at``) is given back: the
        # grant can take no credit, so it goes to the ``usage_reversal`` grant below like any other rest, and the
        # grant counts it (``reversed``, part of ``_give_back_room``) so no later give-back credits it again.
        reverses: list[Draw] = []
        room: dict[str, int] = {}  # per grant: what this give-back may still credit it (``_give_back_room``)
        for entry in reversed(stack):
            if left == 0:
                break
            g = self._grants[entry["grant_id"]]
            carry_of = entry.get("carry_of")
            if carry_of:
                # Usage of a kept grant's period drew this next grant through its carry (since session 14): given
                # back to it, and the carry restored, while that period's late usage may still draw it.
                carrier = self._grants[carry_of[0]]
                if g["status"] != "open" or not _in_scope(g, meter) or carrier["status"] != "open" \
                        or not _is_eligible(carrier, meter, at, need_remaining=False):
                    continue
                lapsed = False
            else:
                lapsed = _has_lapsed(g, at)
                if not (_in_scope(g, meter) if lapsed else _is_eligible(g, meter, at, need_remaining=False)):
                    continue
            gid = g["grant_id"]
            if gid not in room:
                room[gid] = _give_back_room(g)
            take = min(left, entry["amount"])
            back = min(take, room[gid])
            if back:
                room[gid] -= back
                if lapsed:
                    reverses.append({"grant_id": gid, "amount": back})
                else:
                    draws.append({"grant_id": gid, "amount": -back, **({"carry_of": carry_of} if carry_of else {})})
                    postings += [
                        posting(LedgerAccount.RECOGNISED_REVENUE, unit, back, gid),
                        posting(LedgerAccount.TENANT_WALLET, unit, -back, gid),
                    ]
            if take - back:
                absorbed.append({"grant_id": gid, "amount": take - back})
            left -= take
        left += sum(part["amount"] for part in reverses)
        credit_grant: GrantRecord | None = None
        if left:
            gid = str(uuid5(NAMESPACE_URL, f"/accounts/{self.tenant}/give-back/{command_id}"))
            if gid in self._grants:
                raise DuplicateGrant(f"usage command {command_id} already gave credit back")
            credit_grant = {
                "grant_id": gid,
                "unit": unit,
                "amount": left,
                "priority": 0,
                "effective_at": at,
                "expires_at": None,
                "scope": None,
                "source": GrantSource.USAGE_REVERSAL.value,
                "funded_by": LedgerAccount.RECOGNISED_REVENUE.value,
                "tax_amount": 0,
                "cause": {"command_id": str(command_id), "meter": meter},
                "granted_by": "ledger",
                **({"reverses": reverses} if reverses else {}),
            }
            postings += [
                posting(LedgerAccount.RECOGNISED_REVENUE, unit, left, gid),
                posting(LedgerAccount.TENANT_WALLET, unit, -left, gid),
            ]
        assert_balanced(postings)
        self._record_usage_debited(
            command_id=command_id,
            meter=meter,
            unit=unit,
            amount=amount,
            postings=postings,
            draws=draws,
            overage=-reduce_receivable,
            credit_grant=credit_grant,
            cause=cause,
            at=at,
            **({"absorbed": absorbed} if absorbed else {}),
        )
        self._check_thresholds(unit, at)

    def _record_usage_debited(self, **kwargs: Any) -> None:
        """``self._usage_debited(**kwargs)``, without eventsourcing's decorator layers (binding, argument coercion
        and filtering: ~7 us of a usage debit's ~90) nor the dataclass's per-field ``__setattr__``: every argument is given by name and the one default filled as
        the library fills it, so the event and its hash are the same (``tests/unit/ledger/test_event_paths.py``);
        a missing or unknown argument fails to construct the event."""
        kwargs.setdefault("absorbed", None)
        # Every caller names the arguments in the event's field order (absorbed last): the event is built and applied
        # directly (``ChainedAggregate.trigger_complete``; any other order goes ``trigger_event``'s way).
        self.trigger_complete(self.UsageDebited, kwargs)

    @event("UsageDebited")
    def _usage_debited(
        self,
        command_id: UUID,
        meter: str,
        unit: str,
        amount: int,
        postings: list[Posting],
        draws: list[Draw],
        overage: int,
        credit_grant: GrantRecord | None,
        cause: dict[str, Any],
        at: datetime,
        absorbed: list[Draw] | None = None,
    ) -> None:
        # ``overage`` is the change of receivables: positive = posted beyond credit, negative = given back.
        self._receivable[unit] = self._receivable.get(unit, 0) + overage
        if overage:
            key = _overage_key(cause, at)
            if overage > 0:
                _add_unbilled(self._unbilled, unit, key, overage)
                _add_meter_overage(self._unbilled_meters, self._unbilled, unit, key, meter, overage)
                _add_overage_time(self._overage_times, unit, key, at, overage)
            else:
                reduced_by_key = _reduce_unbilled(self._unbilled, unit, key, -overage)
                for reduced, part in reduced_by_key.items():
                    _fit_meter_overage(self._unbilled_meters, self._unbilled, unit, reduced, {meter: part})
                _forget_overage_times(self._overage_times, self._unbilled, unit)
                # First, as the give-back decided on the draws left after it (since session 12).
                self._clear_owed_usage(unit, reduced_by_key)
        # ``absorbed`` (a give-back, recorded since session 9): usage of these grants a refund already paid back;
        # no postings, only the draws remembered go down.
        self._apply_draws(unit, draws, remember=True)
        if draws:
            self._count_credit_note_spend(unit, _overage_key(cause, at), draws)
        for part in absorbed or ():
            self._trim_draws(unit, part["grant_id"], part["amount"])
        # ``credit_grant["reverses"]`` (since session 11): usage of lapsed grants this credit gives back.
        for part in (credit_grant or {}).get("reverses", ()):
            self._grants[part["grant_id"]]["reversed"] += part["amount"]
            self._trim_draws(unit, part["grant_id"], part["amount"])
        if credit_grant is not None:
            self._add_grant(credit_grant)
        self._update_arming(unit)

    def _count_credit_note_spend(self, unit: str, key: str, draws: list[Draw]) -> None:
        """What ``draws`` (of a usage debit or give-back under period ``key``) took from credit notes' credit, or gave
        back to it, counted for the invoice of that period (``_credit_note_spend``, never below zero)."""
        change = sum(draw["amount"] for draw in draws
                     if self._grants[draw["grant_id"]]["source"] == GrantSource.CREDIT_NOTE.value)
        if not change:
            return
        periods = self._credit_note_spend.setdefault(unit, {})
        spent = max(periods.pop(key, 0) + change, 0)
        if spent:
            periods[key] = spent  # the newest last
            while len(periods) > BILLED_PERIODS_KEPT_MAX:
                del periods[next(iter(periods))]
        if not periods:
            del self._credit_note_spend[unit]

    def credit_note_spend(self, unit: str) -> dict[str, int]:
        """Credit notes' credit usage drew in ``unit`` that no invoice applied yet, by period key (a copy)."""
        return dict(self._credit_note_spend.get(unit, {}))

    def credit_note_usage_due(self, now: datetime) -> bool:
        """Whether usage no subscription invoice bills drew credit notes' credit in a calendar month (UTC) ended by
        ``now``, at least what rounds to one minor unit of its currency: the month's credit note usage invoice is
        due (``credit_note_usage``; the sweeper sends ``invoice.credit_note_usage``)."""
        return bool(self._credit_note_spend) and bool(self.credit_note_usage(now))

    def credit_note_usage(self, now: datetime) -> dict[str, dict[str, dict[str, int]]]:
        """The credit notes' credit drawn by usage no subscription invoice bills, in calendar months (UTC) ended by
        ``now``: unit -> month (``YYYY-MM``) -> spend key -> sub-units (a copy), the months whose spend rounds to at
        least one minor unit of the currency (``minor_subunits``: a smaller one waits for more of that month, as its
        VAT would round to nothing). That usage is an account's rated by calendar month (rating's period of an account
        without a live subscription, ``YYYY-MM``) and captured holds (``hold_spend_key``); a subscription period's
        (an ISO 8601 start) is billed by that subscription's invoice (``invoice_overage.overage_lines``)."""
        ended = _month(now)
        due: dict[str, dict[str, dict[str, int]]] = {}
        for unit, periods in self._credit_note_spend.items():
            months: dict[str, dict[str, int]] = {}
            for key, amount in periods.items():
                month = spend_month(key)
                if month is not None and month < ended and amount > 0:
                    months.setdefault(month, {})[key] = amount
            half = minor_subunits(iso_currency(unit)) // 2 if is_currency_code(unit) else 1
            months = {month: keys for month, keys in months.items() if sum(keys.values()) >= half}
            if months:
                due[unit] = months
        return due

    def apply_credit_note_credit(self, *, invoice: str, unit: str, periods: Iterable[str], at: datetime) -> int:
        """``invoice`` bills the usage of ``periods``: the credit notes' credit that usage drew is applied on it after
        tax, as a payment (``invoice_overage.overage_lines``), and forgotten here (``CreditNoteCreditApplied``, no
        postings: the usage debits moved the money). Returns the sub-units applied."""
        spent = self._credit_note_spend.get(unit, {})
        taken = {key: spent[key] for key in sorted(set(periods)) if spent.get(key, 0) > 0}
        if not taken:
            return 0
        self._credit_note_credit_applied(invoice=invoice, unit=unit, taken=taken, at=at)
        return sum(taken.values())

    @event("CreditNoteCreditApplied")
    def _credit_note_credit_applied(self, invoice: str, unit: str, taken: dict[str, int], at: datetime) -> None:
        periods = self._credit_note_spend.get(unit, {})
        for key in taken:
            periods.pop(key, None)
        if not periods:
            self._credit_note_spend.pop(unit, None)

    @event("InvoicedUsageCredited")
    def _invoiced_usage_credited(self, command_id: UUID, unit: str, invoice: str, period: str, note: str | None,
                                 amount: int, at: datetime, absorbed: int = 0) -> None:
        # No postings: the credit note's ``CreditGranted`` moved the money; this says what of the period is credited
        # (``absorbed``: what of it the invoice can no longer give back, recorded since session 8).
        periods = self._billed_periods.get(unit, {})
        records = periods.get(period, [])
        for billed in records:
            if billed["invoice"] == invoice:
                billed["amount"] -= amount + absorbed
        records[:] = [billed for billed in records if billed["amount"] > 0]
        if not records:
            periods.pop(period, None)
        if not periods:
            self._billed_periods.pop(unit, None)
        minimum = self._period_minimums.get(unit, {}).get(period)
        if minimum is not None:  # the period's usage spend went down by all of it (credited or not)
            minimum["spend"] -= amount + absorbed

    @event("UsageRejected")
    def _usage_rejected(
        self,
        command_id: UUID,
        meter: str,
        unit: str,
        amount: int,
        reason: str,
        spendable: int,
        cause: dict[str, Any],
        at: datetime,
    ) -> None:
        pass  # recorded so the command counts as handled; nothing moves

    # == holds ===============================================================================================

    def place_hold(
        self, *, hold_id: UUID, unit: str, amount: int, meter: str | None, expires_at: datetime, at: datetime,
        thresholds: bool = True, by: str | None = None,
    ) -> bool:
        """Reserves ``amount`` if spendable; answers yes/no. Repeating a hold id returns the first answer.

        ``by``: who placed it (the command's issuer: a service token's subject, the finance user approving a refund
        request), recorded on ``HoldPlaced`` since session 13 (earlier holds name none).

        ``thresholds=False`` (a refund request's hold on the credit being refunded): no low-balance alert and
        no auto-top-up for the drop, which is money going back, not spending (the alerts stay armed)."""
        existing = self._holds.get(str(hold_id)) or self._settled_holds.get(str(hold_id))
        if existing is not None:
            return bool(existing["status"] != "rejected")
        self._require_unit(unit)
        _require_amount("amount", amount)
        if meter is not None:
            _require_text("meter", meter)
        _require_time("at", at)
        _require_time("expires_at", expires_at)
        if expires_at <= at:
            raise InvalidArgument("a hold must expire after it is placed")
        spendable = self.spendable(unit, meter, at)
        if len(self._holds) >= ACTIVE_HOLDS_MAX:
            self._hold_rejected(
                hold_id=hold_id,
                unit=unit,
                amount=amount,
                meter=meter,
                reason=REJECTED_TOO_MANY_HOLDS,
                spendable=spendable,
                at=at,
            )
            return False
        if spendable < amount:
            self._hold_rejected(
                hold_id=hold_id,
                unit=unit,
                amount=amount,
                meter=meter,
                reason=REJECTED_INSUFFICIENT_CREDIT,
                spendable=spendable,
                at=at,
            )
            return False
        self._hold_placed(
            hold_id=hold_id, unit=unit, amount=amount, meter=meter, expires_at=expires_at, at=at, by=by
        )
        if thresholds:
            self._check_thresholds(unit, at)
        return True

    @event("HoldPlaced")
    def _hold_placed(
        self, hold_id: UUID, unit: str, amount: int, meter: str | None, expires_at: datetime, at: datetime,
        by: str | None = None,  # (since session 13) who placed it; only read by the projections
    ) -> None:
        self._holds[str(hold_id)] = {
            "hold_id": str(hold_id),
            "unit": unit,
            "amount": amount,
            "meter": meter,
            "expires_at": expires_at,
            "placed_at": at,
            "status": "active",
            "captured": 0,
        }
        self._held[unit] = self._held.get(unit, 0) + amount
        self._update_arming(unit)

    @event("HoldRejected")
    def _hold_rejected(
        self,
        hold_id: UUID,
        unit: str,
        amount: int,
        meter: str | None,
        reason: str,
        spendable: int,
        at: datetime,
    ) -> None:
        self._remember_settled_hold(
            {
                "hold_id": str(hold_id),
                "unit": unit,
                "amount": amount,
                "meter": meter,
                "expires_at": at,
                "placed_at": at,
                "status": "rejected",
                "captured": 0,
                "reason": reason,
            }
        )

    def capture_hold(self, *, hold_id: UUID, amount: int, at: datetime, allow_overage: bool = False,
                     time_zone: str | None = None, by: str | None = None) -> None:
        """Spends ``amount`` (at most the hold unless ``allow_overage``) like a debit; frees the rest.

        ``time_zone``: the zone of the subscription periods that bill usage at ``at`` (not UTC; the caller's
        ``hold_commands.billing_time_zone``), recorded on ``HoldCaptured`` so the monthly summary puts the capture in
        the local month a usage debit at that instant is in (rating's ``cause.time_zone``). None: its UTC month."""
        h = self._active_hold(hold_id)
        _require_amount("amount", amount, allow_zero=True)
        _require_time("at", at)
        if time_zone is not None:
            _require_text("time_zone", time_zone)
        if at >= h["expires_at"]:
            raise HoldLapsed(f"hold {hold_id} expired at {h['expires_at'].isoformat()}")
        if amount > h["amount"] and not allow_overage:
            raise CaptureExceedsHold(f"capture of {_money(amount, h['unit'])} exceeds the hold of "
                                     f"{_money(h['amount'], h['unit'])}")
        unit = h["unit"]
        # The hold's own reservation is spendable by its capture.
        eligible = self._eligible_grants(unit, h["meter"], at)
        available = self.available(unit) + h["amount"]
        from_credit = min(amount, _spendable(eligible, available))
        draws = self._plan_draws(unit, h["meter"], at, from_credit, available, eligible=eligible)
        overage = amount - from_credit
        postings = _usage_postings(unit, draws, overage)
        assert_balanced(postings)
        # What it draws of credit notes' credit is counted for the month's credit note usage invoice (since session
        # 15: before, a capture paid with that credit bore no VAT).
        from_notes = any(self._grants[d["grant_id"]]["source"] == GrantSource.CREDIT_NOTE.value for d in draws)
        self._hold_captured(
            hold_id=hold_id,
            unit=unit,
            meter=h["meter"],
            held_amount=h["amount"],
            amount=amount,
            postings=postings,
            draws=draws,
            overage=overage,
            at=at,
            time_zone=time_zone,
            by=by,
            **({"credit_note_key": hold_spend_key(at)} if from_notes else {}),
        )
        self._check_thresholds(unit, at)

    @event("HoldCaptured")
    def _hold_captured(
        self,
        hold_id: UUID,
        unit: str,
        meter: str | None,
        held_amount: int,
        amount: int,
        postings: list[Posting],
        draws: list[Draw],
        overage: int,
        at: datetime,
        time_zone: str | None = None,  # (since session 12) only read by the projections; captures before name none
        by: str | None = None,  # (since session 13) who captured it; only read by the projections
        # (since session 15) the ``_credit_note_spend`` key its draws of credit notes' credit count under
        # (``hold_spend_key``); captures recorded before counted none, and replay as they were.
        credit_note_key: str | None = None,
    ) -> None:
        self._settle_hold(str(hold_id), "captured", captured=amount)
        self._apply_draws(unit, draws, remember=True)
        if credit_note_key is not None:
            self._count_credit_note_spend(unit, credit_note_key, draws)
        self._receivable[unit] = self._receivable.get(unit, 0) + overage
        if overage:
            key = at.isoformat()
            _add_unbilled(self._unbilled, unit, key, overage)
            if meter is not None:
                _add_meter_overage(self._unbilled_meters, self._unbilled, unit, key, meter, overage)
            _add_overage_time(self._overage_times, unit, key, at, overage)
        self._update_arming(unit)

    def release_hold(self, *, hold_id: UUID, at: datetime, by: str | None = None) -> None:
        """Frees the hold without spending; ``by``: who released it (since session 13, as ``place_hold``)."""
        h = self._active_hold(hold_id)
        _require_time("at", at)
        self._hold_released(hold_id=hold_id, unit=h["unit"], amount=h["amount"], at=at, by=by)

    @event("HoldReleased")
    def _hold_released(self, hold_id: UUID, unit: str, amount: int, at: datetime, by: str | None = None) -> None:
        self._settle_hold(str(hold_id), "released")
        self._update_arming(unit)

    def expire_holds(self, now: datetime, limit: int | None = None) -> None:
        """Releases every active hold whose ``expires_at <= now`` (a ``HoldExpired`` each), or the ``limit``
        that expired first (ties by hold id)."""
        _require_time("now", now)
        if limit is not None and (type(limit) is not int or limit < 1):
            raise InvalidArgument(f"limit must be a positive integer, not {limit!r}")
        due = [h for h in self._holds.values() if h["expires_at"] <= now]
        due.sort(key=lambda h: (h["expires_at"], h["hold_id"]))
        for h in due[:limit]:
            self._hold_expired(
                hold_id=UUID(h["hold_id"]),
                unit=h["unit"],
                amount=h["amount"],
                expires_at=h["expires_at"],
                at=now,
            )

    @event("HoldExpired")
    def _hold_expired(
        self, hold_id: UUID, unit: str, amount: int, expires_at: datetime, at: datetime
    ) -> None:
        self._settle_hold(str(hold_id), "expired")
        self._update_arming(unit)

    # == refunds, adjustments, settlements ===================================================================

    def refund_grant(
        self,
        *,
        grant_id: UUID,
        amount: int,
        refund_id: UUID,
        at: datetime,
        finance_override: bool = False,
        cause: dict[str, Any],
        tax_amount: int | None = None,
        reclaim_reversed: bool = False,
        money: tuple[int, int] | None = None,
    ) -> None:
        """Pays back ``amount`` (+ ``tax_amount``) of a paid grant through the gateway.

        ``tax_amount`` defaults to the grant's share of the tax it booked (a purchase in the currency, whose
        ``tax_amount`` is on the grant): the same cumulative floor as a credit-unit grant's money below, so
        after refunds of ``r`` of its ``amount``, ``floor(tax * r / amount)`` has been paid back, floored to the
        currency's minor unit (``_refunded_share``; a quarter of 100.00 + 19.00 VAT pays back 25.00 + 4.75, 33.33
        of it 6.33, not 6.3327; the rest of the credit, the rest of the tax exactly).

        Without ``finance_override`` only unspent, unreserved credit can be refunded
        (``min(remaining, available)``). With it, the grant's remaining credit is taken first, then the
        part that lapsed to breakage is reversed from ``BREAKAGE``, the part a negative adjustment removed from
        ``MANUAL_ADJUSTMENT`` (``from_adjustment``, since session 11: it was taken from revenue, where that credit
        never went) and the part that was spent from ``RECOGNISED_REVENUE`` (a concession: the tenant is not
        billed again, so not ``RECEIVABLES``). A later
        give-back of that usage credits the grant back only what was not refunded; the rest is absorbed
        (``_give_back``), so the draws remembered are kept: they say which give-back the refund already paid.

        A credit-unit grant whose money was booked in the currency (:meth:`book_purchase_money`) has that
        booking reversed in proportion, in the same command (a ``PurchaseMoneyRefunded`` after the
        ``GrantRefunded``): after refunds of ``r`` of the grant's ``amount`` credit, ``floor(net * r /
        amount)`` of the net and ``floor(tax * r / amount)`` of the tax have been paid back, each floored to the
        currency's minor unit, so a full refund reverses exactly what was booked and no refund ever pays back
        more money or tax than was collected. ``money`` (net, tax), since session 14: the share of that money this refund
        pays back when the caller knows it exactly (a partial chargeback takes exactly the money the bank took back,
        ``order_chargebacks``), at most what is left of each; the floors above then catch up from it.

        Usage of the grant given back after it lapsed (``reversed``) is the customer's again as ``usage_reversal``
        credit, so a refund may pay back only ``amount - refunded - reversed`` (``refund_exceeds_grant``). With
        ``reclaim_reversed`` (a refund the gateway already paid out: the money has left, the ledger records it) the
        whole rest can be refunded, and the part of it beyond that is no longer owed as credit: it is taken back
        from the ``usage_reversal`` grants that reversed this grant's usage as far as they are unspent (Dr
        TENANT_WALLET) and the rest is owed (Dr RECEIVABLES, unbilled overage under the refund's time, as for an
        invoice refund's excess: ``refund_invoice_payment``); no revenue moves for it a second time (the give-back
        took it). ``GrantRefunded.reclaimed`` records it; the grant's ``reversed`` goes down by it.
        """
        g = self._grant(grant_id)
        _require_amount("amount", amount)
        _require_time("at", at)
        if g["source"] not in PAID_SOURCES:
            raise NotRefundable(f"grant {grant_id} is {g['source']}: only paid grants are refunded (void it)")
        if g["refunded"] + amount > g["amount"]:
            raise RefundExceedsGrant(f"refunds would total more than the grant's {_money(g['amount'], g['unit'])}")
        # What of the refund pays back usage a give-back already returned as ``usage_reversal`` credit.
        reclaim = max(0, g["refunded"] + amount - (g["amount"] - g["reversed"]))
        if reclaim and not reclaim_reversed:
            # Usage of the grant given back after it lapsed is the customer's again as ``usage_reversal`` credit
            # (``_give_back``): refunding it in money too would pay it back twice.
            raise RefundExceedsGrant(
                f"only {_money(max(0, _refundable(g)), g['unit'])} of grant {grant_id} can still be refunded: "
                f"{_money(g['reversed'], g['unit'])} of its usage was given back as usage_reversal credit")
        if tax_amount is None:
            tax_amount = _tax_share(g, amount)
        _require_amount("tax_amount", tax_amount, allow_zero=True)
        if g["refunded_tax"] + tax_amount > g["tax_amount"]:
            raise RefundExceedsGrant(f"tax refunds would total more than the {_money(g['tax_amount'], g['unit'])} "
                                     "collected")
        in_wallet = g["remaining"] if g["status"] == "open" else 0
        unspent = max(0, min(in_wallet, self.available(g["unit"])))
        if amount > unspent and not finance_override:
            raise RefundExceedsRemaining(f"only {_money(unspent, g['unit'])} of grant {grant_id} is unspent and "
                                         "unreserved")
        # A reversed grant has lapsed (no credit in the wallet): the reclaimed part is never taken from it again.
        paid = amount - reclaim
        from_wallet = min(paid, in_wallet)
        from_breakage = min(paid - from_wallet, g["breakage"] - g["breakage_reversed"])
        from_adjustment = min(paid - from_wallet - from_breakage, g["adjusted"] - g["adjusted_reversed"])
        from_revenue = paid - from_wallet - from_breakage - from_adjustment
        unit, gid = g["unit"], g["grant_id"]
        postings = [posting(LedgerAccount.GATEWAY_CLEARING, unit, -(amount + tax_amount), gid)]
        for account, part in (
            (LedgerAccount.TENANT_WALLET, from_wallet),
            (LedgerAccount.BREAKAGE, from_breakage),
            (LedgerAccount.MANUAL_ADJUSTMENT, from_adjustment),
            (LedgerAccount.RECOGNISED_REVENUE, from_revenue),
            (LedgerAccount.TAX_PAYABLE, tax_amount),
        ):
            if part:
                postings.append(posting(account, unit, part, gid))
        reclaimed = self._reclaim_reversal(g, reclaim, at, postings) if reclaim else None
        assert_balanced(postings)
        money_back = self._money_refund(g, amount, from_wallet, from_breakage, from_adjustment, gid, money)
        self._grant_refunded(
            refund_id=refund_id,
            grant_id=grant_id,
            unit=unit,
            amount=amount,
            tax_amount=tax_amount,
            from_wallet=from_wallet,
            from_breakage=from_breakage,
            from_revenue=from_revenue,
            finance_override=bool(finance_override),
            postings=postings,
            cause=dict(cause),
            at=at,
            **({"from_adjustment": from_adjustment} if from_adjustment else {}),
            **({"reclaimed": reclaimed} if reclaimed else {}),
        )
        if money_back is not None:
            self._purchase_money_refunded(refund_id=refund_id, grant_id=grant_id, **money_back, cause=dict(cause),
                                          at=at)
        # Money given back at the customer's request must not be charged again at once: no auto-top-up here (the
        # rule stays armed, so the next usage below the threshold tops up); a low-balance alert still says so.
        self._check_thresholds(unit, at, top_up=False)

    def _money_refund(
        self, g: GrantRecord, amount: int, from_wallet: int, from_breakage: int, from_adjustment: int, gid: str,
        exact: tuple[int, int] | None = None,
    ) -> dict[str, Any] | None:
        """The currency reversal refunding ``amount`` more of ``g``'s credit takes (``None``: nothing).

        The net comes back from recognised revenue and breakage only as far as they exceed what the grant's
        credit earns after the refund (they were recognised for credit now refunded), the rest from
        deferred revenue (which then never goes below what is still deferred: see the module docstring).
        """
        money = g.get("money")
        if money is None:
            return None
        refunded = g["refunded"] + amount
        # Floored to the currency's minor unit (``_refunded_share``); a stream whose earlier refunds paid back
        # sub-cent amounts (before they were floored) pays back nothing until the floor catches up.
        net = max(0, _refunded_share(money["net"], refunded, g["amount"], money["unit"]) - money["refunded_net"])
        tax = max(0, _refunded_share(money["tax"], refunded, g["amount"], money["unit"]) - money["refunded_tax"])
        if exact is not None:  # the caller's exact share of the money (a partial chargeback): never beyond what is left
            net, tax = exact
            if min(net, tax) < 0 or money["refunded_net"] + net > money["net"] \
                    or money["refunded_tax"] + tax > money["tax"]:
                raise RefundExceedsGrant(f"{_money(net, money['unit'])} + {_money(tax, money['unit'])} tax is more "
                                         f"than grant {gid} has left of the money paid for it")
        assert money["refunded_net"] + net <= money["net"] and money["refunded_tax"] + tax <= money["tax"]
        if net + tax == 0:
            return None
        recognised, breakage, _ = _money_targets(
            g,
            refunded=refunded,
            refunded_net=money["refunded_net"] + net,
            remaining=(g["remaining"] if g["status"] == "open" else 0) - from_wallet,
            breakage_reversed=g["breakage_reversed"] + from_breakage,
            adjusted_reversed=g["adjusted_reversed"] + from_adjustment,
        )
        from_revenue = min(net, max(0, money["recognised"] - recognised))
        from_lapsed = min(net - from_revenue, max(0, money["breakage"] - breakage))
        currency = money["unit"]
        postings = [
            posting(LedgerAccount.GATEWAY_CLEARING, currency, -(net + tax), gid),
            posting(LedgerAccount.DEFERRED_REVENUE, currency, net - from_revenue - from_lapsed, gid),
            posting(LedgerAccount.RECOGNISED_REVENUE, currency, from_revenue, gid),
            posting(LedgerAccount.BREAKAGE, currency, from_lapsed, gid),
            posting(LedgerAccount.TAX_PAYABLE, currency, tax, gid),
        ]
        postings = [line for line in postings if line["amount"]]
        assert_balanced(postings)
        return {"unit": currency, "amount": net + tax, "net": net, "tax_amount": tax, "postings": postings}

    @event("PurchaseMoneyRefunded")
    def _purchase_money_refunded(
        self,
        refund_id: UUID,
        grant_id: UUID,
        unit: str,
        amount: int,
        net: int,
        tax_amount: int,
        postings: list[Posting],
        cause: dict[str, Any],
        at: datetime,
    ) -> None:
        g = self._grants[str(grant_id)]
        money = g["money"]
        money["refunded_net"] += net
        money["refunded_tax"] += tax_amount
        g["refunds_paid_back"].append(_paid_back(refund_id, amount, cause))
        remembered = self._refunds.get(str(refund_id))
        if remembered is not None:  # the money of a credit-unit grant: what its refund pays back
            remembered["paid_back"] = {"unit": unit, "amount": amount, "tax_amount": tax_amount}
        # Streams recorded before recognition existed reverse from deferred revenue only: no such lines.
        for line in postings:
            if line["account"] == LedgerAccount.RECOGNISED_REVENUE:
                money["recognised"] -= line["amount"]
            elif line["account"] == LedgerAccount.BREAKAGE:
                money["breakage"] -= line["amount"]

    @event("GrantRefunded")
    def _grant_refunded(
        self,
        refund_id: UUID,
        grant_id: UUID,
        unit: str,
        amount: int,
        tax_amount: int,
        from_wallet: int,
        from_breakage: int,
        from_revenue: int,
        finance_override: bool,
        postings: list[Posting],
        cause: dict[str, Any],
        at: datetime,
        from_adjustment: int = 0,
        reclaimed: dict[str, Any] | None = None,
    ) -> None:
        # ``from_adjustment`` recorded since session 11 (earlier override refunds took it from revenue).
        g = self._grants[str(grant_id)]
        g["remaining"] -= from_wallet
        g["refunded"] += amount
        g["refunded_tax"] += tax_amount
        g["breakage_reversed"] += from_breakage
        g["adjusted_reversed"] += from_adjustment
        if reclaimed:  # (since session 11) usage_reversal credit of this grant's usage taken back, the rest owed
            g["reversed"] -= reclaimed["amount"]
            # Each credit counts what was taken back of the part it reversed of this grant (``taken_back``), from the
            # wallet or owed, so no later refund takes that part again. ``owed`` names the credits of the owed part
            # since session 12; a refund recorded before is attributed here as it would be now.
            owed = reclaimed.get("owed")
            if owed is None:
                owed = self._owed_reversal_parts(g["grant_id"], unit, reclaimed["receivable"],
                                                 {d["grant_id"]: d["amount"] for d in reclaimed["draws"]})
            # ``adjusted`` (since session 12): what a negative adjustment had removed of a credit, paid back from
            # MANUAL_ADJUSTMENT; that credit's adjustment is reversed by it.
            adjusted = list(reclaimed.get("adjusted") or ())
            for part in adjusted:
                self._grants[part["grant_id"]]["adjusted_reversed"] += part["amount"]
            for part in list(reclaimed["draws"]) + adjusted + list(owed):
                taken = self._grants[part["grant_id"]].setdefault("taken_back", {})
                taken[g["grant_id"]] = taken.get(g["grant_id"], 0) + part["amount"]
            self._apply_draws(unit, reclaimed["draws"], remember=False)
            # The spent credit's usage is owed now (since session 12): ``_owed_usage``.
            self._owe_reclaimed(unit, reclaimed, owed)
        if is_currency_code(unit):  # paid back as money: the credit and its tax (a credit unit's money: below)
            g["refunds_paid_back"].append(_paid_back(refund_id, amount + tax_amount, cause))
        self._update_arming(unit)
        self._refunds[str(refund_id)] = {
            "grant_id": g["grant_id"], "unit": unit, "amount": amount, "tax_amount": tax_amount,
            "from_wallet": from_wallet, "from_breakage": from_breakage, "from_adjustment": from_adjustment,
            "from_revenue": from_revenue, "finance_override": finance_override, "reason": cause.get("reason"),
            "requested_by": cause.get("requested_by"),
            # a credit unit's money, if any, follows in a PurchaseMoneyRefunded (``_purchase_money_refunded``)
            "paid_back": {"unit": unit, "amount": amount + tax_amount, "tax_amount": tax_amount}
            if is_currency_code(unit) else None}
        while len(self._refunds) > REFUNDS_KEPT_MAX:
            del self._refunds[next(iter(self._refunds))]

    def _reclaim_reversal(self, g: GrantRecord, amount: int, at: datetime, postings: list[Posting]) -> dict[str, Any]:
        """Takes back ``amount`` of the ``usage_reversal`` credit given for ``g``'s usage (a gateway refund paid
        it back in money), appending the postings to ``postings``. Each credit that reversed some of ``g``'s usage
        (``reverses``) gives up at most that part less what earlier refunds of ``g`` took back of it
        (``taken_back``), so over any number of partial refunds no part is taken twice and each credit keeps what it
        gives for other grants' usage: first from the unspent credit, newest credit first (Dr TENANT_WALLET), then
        from what negative adjustments removed of them (Dr MANUAL_ADJUSTMENT: already taken from the customer), then
        the rest is owed (Dr RECEIVABLES) for the parts their credit no longer holds (it was spent). What
        ``GrantRefunded.reclaimed`` records: ``amount``, ``draws`` (from the wallet), ``receivable`` and ``owed``
        (per credit, since session 12), ``period``, and ``adjusted`` (per credit) with its total ``from_adjustment``
        (since session 12, only when there is some): ``amount = draws + from_adjustment + receivable``."""
        unit, gid, left = g["unit"], g["grant_id"], amount
        draws: list[Draw] = []
        for credit in self._reversals_of(gid, unit):
            if not left:
                break
            held = credit["remaining"] if credit["status"] == "open" else 0
            take = min(left, _reversal_left(credit, gid), max(0, held))
            if take:
                draws.append({"grant_id": credit["grant_id"], "amount": take})
                postings.append(posting(LedgerAccount.TENANT_WALLET, unit, take, credit["grant_id"]))
                left -= take
        drawn = {d["grant_id"]: d["amount"] for d in draws}
        # Then what a negative adjustment removed of those credits (since session 12): already taken from the customer
        # (to MANUAL_ADJUSTMENT), so neither taken again nor owed; the money went back at the gateway, so that removal
        # no longer stands and is paid back from MANUAL_ADJUSTMENT, as an override refund's ``from_adjustment``.
        adjusted: list[Draw] = []
        for credit in self._reversals_of(gid, unit):
            if not left:
                break
            cid = credit["grant_id"]
            take = min(left, _reversal_left(credit, gid) - drawn.get(cid, 0),
                       credit["adjusted"] - credit["adjusted_reversed"])
            if take > 0:
                adjusted.append({"grant_id": cid, "amount": take})
                postings.append(posting(LedgerAccount.MANUAL_ADJUSTMENT, unit, take, cid))
                drawn[cid] = drawn.get(cid, 0) + take
                left -= take
        owed = self._owed_reversal_parts(gid, unit, left, drawn)
        if left:
            postings.append(posting(LedgerAccount.RECEIVABLES, unit, left))
        return {"amount": amount, "draws": draws, "receivable": left, "owed": owed, "period": owed_refund_key(at),
                **({"adjusted": adjusted, "from_adjustment": sum(part["amount"] for part in adjusted)}
                   if adjusted else {})}

    def _reversals_of(self, grant_id: str, unit: str) -> list[GrantRecord]:
        """The ``usage_reversal`` credits that reversed some of ``grant_id``'s usage, newest first."""
        return [credit for credit in reversed(list(self._grants.values()))
                if credit["source"] == GrantSource.USAGE_REVERSAL.value and credit["unit"] == unit
                and _reversal_left(credit, grant_id) > 0]

    def _owed_reversal_parts(self, grant_id: str, unit: str, amount: int, drawn: dict[str, int]) -> list[Draw]:
        """Which credits the owed ``amount`` of a reclaim of ``grant_id`` stands for: the parts of ``grant_id``'s
        usage they reversed and still give (less ``drawn`` from them by the same reclaim), newest credit first.
        Only state built from the events themselves: a command and a replay attribute it the same way."""
        owed: list[Draw] = []
        left = amount
        for credit in self._reversals_of(grant_id, unit):
            if not left:
                break
            part = min(left, _reversal_left(credit, grant_id) - drawn.get(credit["grant_id"], 0))
            if part > 0:
                owed.append({"grant_id": credit["grant_id"], "amount": part})
                left -= part
        return owed

    # == gateway refunds before their payment ================================================================

    def park_refund(self, *, key: str, gateway: str, order_id: str, refunded_payment: str | None,
                    refund: dict[str, Any], at: datetime, invoice: str | None = None) -> bool:
        """Records a refund the gateway paid out of a payment not booked yet (``RefundAwaitingPayment``).

        Notifications may come in any order: the payment's command applies it when it books the payment
        (``settle_parked_refund``). ``key`` names the refund at its gateway ("<gateway>/<refund reference>"):
        the same refund announced again while it waits records nothing (False). ``refund`` is its command, as
        JSON; ``invoice``: the invoice whose payment it gives back (None: a checkout order's or another purchase's,
        by ``order_id``), which applies it when it is paid, whoever books that payment. At most
        ``PARKED_REFUNDS_MAX`` wait at once (``TooManyParkedRefunds``)."""
        _require_text("key", key)
        _require_text("gateway", gateway)
        _require_text("order_id", order_id)
        if invoice is not None:
            _require_text("invoice", invoice)
        _require_time("at", at)
        if key in self._parked_refunds:
            return False
        if len(self._parked_refunds) >= PARKED_REFUNDS_MAX:
            raise TooManyParkedRefunds(f"{len(self._parked_refunds)} gateway refunds already wait for their payment")
        self._refund_parked(key=key, gateway=gateway, order_id=order_id, refunded_payment=refunded_payment,
                            refund=copy.deepcopy(refund), at=at, invoice=invoice)
        return True

    @event("RefundAwaitingPayment")
    def _refund_parked(self, key: str, gateway: str, order_id: str, refunded_payment: str | None,
                       refund: dict[str, Any], at: datetime, invoice: str | None = None) -> None:
        # ``invoice`` since session 13; kept only when set, so a state without one reads as it was recorded.
        self._parked_refunds[key] = {"key": key, "gateway": gateway, "order_id": order_id,
                                     "refunded_payment": refunded_payment, "refund": refund, "at": at,
                                     **({"invoice": invoice} if invoice is not None else {})}

    def parked_refunds(self, *, gateway: str | None = None, order_id: str | None = None,
                       invoice: str | None = None) -> list[dict[str, Any]]:
        """The refunds waiting for their payment (oldest first; copies): of ``gateway``'s ``order_id`` if given
        (never an invoice's then), of ``invoice`` if given, else all."""
        return [copy.deepcopy(p) for p in self._parked_refunds.values()
                if (gateway is None or p["gateway"] == gateway)
                and (order_id is None or (p["order_id"] == order_id and "invoice" not in p))
                and (invoice is None or p.get("invoice") == invoice)]

    def settle_parked_refund(self, *, key: str, payment: str, outcome: str, reason: str | None,
                             detail: str | None, at: datetime) -> None:
        """The payment ``payment`` was booked and the parked refund ``key`` with it: ``applied`` (its movements
        are in the same command), or ``rejected`` with ``reason`` (nothing moved: reconcile it by hand, as a
        refund after its payment rejected for that reason). It no longer waits (``ParkedRefundSettled``)."""
        if key not in self._parked_refunds:
            raise UnknownParkedRefund(f"no gateway refund {key!r} waits for its payment")
        if outcome not in ("applied", "rejected"):
            raise InvalidArgument(f"outcome {outcome!r} is neither applied nor rejected")
        _require_text("payment", payment)
        _require_time("at", at)
        self._parked_refund_settled(key=key, payment=payment, outcome=outcome, reason=reason, detail=detail, at=at)

    @event("ParkedRefundSettled")
    def _parked_refund_settled(self, key: str, payment: str, outcome: str, reason: str | None, detail: str | None,
                               at: datetime) -> None:
        self._parked_refunds.pop(key, None)

    # == disputes (chargebacks) ==============================================================================

    def dispute(self, key: str) -> dict[str, Any] | None:
        """The dispute ``key`` ("<gateway>/<dispute id>") as the account keeps it (a copy), or ``None``."""
        found = self._disputes.get(key)
        return copy.deepcopy(found) if found is not None else None

    def disputes(self) -> list[dict[str, Any]]:
        """Every dispute the account keeps, oldest first (copies)."""
        return [copy.deepcopy(d) for d in self._disputes.values()]

    def open_dispute(self, *, key: str, gateway: str, dispute: str, order_id: str, payment: str | None,
                     invoice: str | None, unit: str, amount: int, at: datetime) -> bool:
        """Records that the customer's bank disputes a payment (``DisputeRaised``, no postings: nothing moved yet).
        Every later movement of the dispute finds it; one that comes first (the gateway's webhooks crossed) opens it
        itself. False when it is known already. At most ``DISPUTES_KEPT_MAX`` (``TooManyDisputes``)."""
        for name, value in (("key", key), ("gateway", gateway), ("dispute", dispute), ("order_id", order_id)):
            _require_text(name, value)
        self._require_unit(unit)
        _require_amount("amount", amount)
        _require_time("at", at)
        if key in self._disputes:
            return False
        if len(self._disputes) >= DISPUTES_KEPT_MAX:
            raise TooManyDisputes(f"the account keeps {len(self._disputes)} disputes already")
        self._dispute_opened(key=key, gateway=gateway, dispute=dispute, order_id=order_id, payment=payment,
                             invoice=invoice, unit=unit, amount=amount, at=at)
        return True

    @event("DisputeRaised")
    def _dispute_opened(self, key: str, gateway: str, dispute: str, order_id: str, payment: str | None,
                        invoice: str | None, unit: str, amount: int, at: datetime) -> None:
        self._disputes[key] = {"key": key, "gateway": gateway, "dispute": dispute, "order_id": order_id,
                               "payment": payment, "invoice": invoice, "unit": unit, "amount": amount,
                               "status": "open", "withdrawn": 0, "opened_at": at, "closed_at": None,
                               "fee": 0, "fee_at": None, "fee_unbooked": None}

    def withdraw_dispute_funds(self, *, key: str, amount: int, at: datetime) -> bool:
        """The gateway took ``amount`` of the disputed money out of our balance while the dispute is decided: it
        leaves clearing for DISPUTED_FUNDS (Dr DISPUTED_FUNDS / Cr GATEWAY_CLEARING, ``DisputeFundsWithdrawn``). Once
        per dispute and only while it is open: a withdrawal announced after its close moves nothing (lost: the
        chargeback already paid that money out of clearing; won: the money is back). False when nothing moved."""
        d = self._known_dispute(key)
        _require_amount("amount", amount)
        _require_time("at", at)
        if d["status"] != "open" or d["withdrawn"]:
            return False
        postings = [posting(LedgerAccount.DISPUTED_FUNDS, d["unit"], amount),
                    posting(LedgerAccount.GATEWAY_CLEARING, d["unit"], -amount)]
        assert_balanced(postings)
        self._dispute_funds_withdrawn(key=key, unit=d["unit"], amount=amount, postings=postings, at=at)
        return True

    @event("DisputeFundsWithdrawn")
    def _dispute_funds_withdrawn(self, key: str, unit: str, amount: int, postings: list[Posting],
                                 at: datetime) -> None:
        self._disputes[key]["withdrawn"] = amount

    def reinstate_dispute_funds(self, *, key: str, at: datetime) -> bool:
        """The gateway gave the withdrawn money back (a won dispute): DISPUTED_FUNDS back to clearing
        (``DisputeFundsReinstated``). False when nothing is withdrawn (never, or already reinstated or closed)."""
        d = self._known_dispute(key)
        _require_time("at", at)
        withdrawn = d["withdrawn"]
        if not withdrawn:
            return False
        postings = [posting(LedgerAccount.GATEWAY_CLEARING, d["unit"], withdrawn),
                    posting(LedgerAccount.DISPUTED_FUNDS, d["unit"], -withdrawn)]
        assert_balanced(postings)
        self._dispute_funds_reinstated(key=key, unit=d["unit"], amount=withdrawn, postings=postings, at=at)
        return True

    @event("DisputeFundsReinstated")
    def _dispute_funds_reinstated(self, key: str, unit: str, amount: int, postings: list[Posting],
                                  at: datetime) -> None:
        self._disputes[key]["withdrawn"] = 0

    def close_dispute(self, *, key: str, outcome: str, amount: int, at: datetime, owed: int = 0) -> bool:
        """The dispute ended (``DisputeClosed``) ``won``, ``closed`` (no chargeback) or ``lost`` (a chargeback of
        ``amount``). What the gateway still holds of it goes back to clearing (Dr GATEWAY_CLEARING / Cr
        DISPUTED_FUNDS): won or closed, the money is ours again; lost, the chargeback that the caller books next, as
        a refund the gateway paid out, takes it out of clearing once. ``owed`` (lost, of an invoice's payment): that
        money is owed again (Dr RECEIVABLES / Cr GATEWAY_CLEARING), unbilled overage under the chargeback's time
        (``OWED_CHARGEBACK_KEY_PREFIX``), billed by the next renewal invoice or repaid by credit bought.

        The same outcome again records nothing (False). A won or closed dispute may still be lost (an appeal, a
        pre-arbitration: the bank took the money after all); a lost one never changes its outcome
        (``DisputeOutcomeChanged``: the chargeback was booked, a person reconciles the money that came back)."""
        d = self._known_dispute(key)
        if outcome not in DISPUTE_OUTCOMES:
            raise InvalidArgument(f"outcome {outcome!r} is none of {', '.join(DISPUTE_OUTCOMES)}")
        _require_amount("amount", amount)
        _require_amount("owed", owed, allow_zero=True)
        _require_time("at", at)
        if owed and outcome != "lost":
            raise InvalidArgument("only a lost dispute leaves money owed")
        if d["status"] == outcome:
            return False
        if d["status"] == "lost" or (d["status"] != "open" and outcome != "lost"):
            raise DisputeOutcomeChanged(f"dispute {d['dispute']} was {d['status']}; the gateway now says {outcome}")
        unit, withdrawn = d["unit"], d["withdrawn"]
        postings: list[Posting] = []
        if withdrawn:
            postings += [posting(LedgerAccount.GATEWAY_CLEARING, unit, withdrawn),
                         posting(LedgerAccount.DISPUTED_FUNDS, unit, -withdrawn)]
        if owed:
            postings += [posting(LedgerAccount.RECEIVABLES, unit, owed),
                         posting(LedgerAccount.GATEWAY_CLEARING, unit, -owed)]
        if postings:
            assert_balanced(postings)
        self._dispute_closed(key=key, outcome=outcome, unit=unit, amount=amount, returned=withdrawn,
                             postings=postings, at=at,
                             **({"owed": {"receivable": owed, "period": owed_chargeback_key(at)}} if owed else {}))
        return True

    @event("DisputeClosed")
    def _dispute_closed(self, key: str, outcome: str, unit: str, amount: int, returned: int,
                        postings: list[Posting], at: datetime, owed: dict[str, Any] | None = None) -> None:
        d = self._disputes[key]
        d.update(status=outcome, withdrawn=0, closed_at=at, amount=amount)
        if owed:
            self._owe_reclaimed(unit, owed, ())

    def book_dispute_fee(self, *, key: str, fee: int, unit: str, at: datetime) -> int | None:
        """The gateway's fee for dispute ``key`` as its API showed it when a notification of the dispute was verified
        at ``at``: ``fee`` in all (what it charged for the dispute less what it gave back, in ``unit``). The books follow
        it (``DisputeFeeBooked``): the change since the last reading leaves clearing for DISPUTE_FEES (Dr DISPUTE_FEES /
        Cr GATEWAY_CLEARING), or comes back when the gateway gave some back (a won Stripe dispute, in some regions). A
        reading older than the last one applied (notifications crossed) moves nothing, so the latest reading wins in
        any order of delivery and a repeated one changes nothing. A fee in another currency than the dispute's (a
        gateway account settling in another currency) cannot be booked on this account, whose units are its own
        currency and credit types: it is recorded as ``fee_unbooked`` for a person (``billing reconcile disputes``).
        Every newer reading is recorded (its time is what decides against an older one delivered later). Returns the
        change booked (sub-units; negative: given back; 0: none), None when the reading is older than the last or the
        same one again (nothing recorded)."""
        d = self._known_dispute(key)
        _require_amount("fee", fee, allow_zero=True)
        _require_text("unit", unit)
        _require_time("at", at)
        if d["fee_at"] is not None and at < d["fee_at"]:
            return None  # an older reading than one applied already
        foreign = unit != d["unit"]
        change = 0 if foreign else fee - d["fee"]
        unbooked = ({"unit": unit, "amount": fee} if fee else None) if foreign else d["fee_unbooked"]
        if at == d["fee_at"] and not change and unbooked == d["fee_unbooked"]:
            return None  # this reading again
        # Every newer reading is recorded, a change or not: its time is what an older one that comes later loses to.
        postings = [posting(LedgerAccount.DISPUTE_FEES, unit, change),
                    posting(LedgerAccount.GATEWAY_CLEARING, unit, -change)] if change else []
        if postings:
            assert_balanced(postings)
        self._dispute_fee_booked(key=key, unit=unit, fee=fee, amount=change, postings=postings, at=at,
                                 **({"unbooked": True} if foreign else {}))
        return change

    @event("DisputeFeeBooked")
    def _dispute_fee_booked(self, key: str, unit: str, fee: int, amount: int, postings: list[Posting], at: datetime,
                            unbooked: bool = False) -> None:
        d = self._disputes[key]
        d["fee_at"] = at
        if unbooked:
            d["fee_unbooked"] = {"unit": unit, "amount": fee} if fee else None
        else:
            d["fee"] = fee

    def _known_dispute(self, key: str) -> dict[str, Any]:
        found = self._disputes.get(key)
        if found is None:
            raise UnknownDispute(f"no dispute {key!r} is open on the account")
        return found

    def adjust(
        self, *, adjustment_id: UUID, unit: str, amount: int, reason: str, user: str, at: datetime
    ) -> None:
        """Manual correction by admin/finance (counter-account ``MANUAL_ADJUSTMENT``).

        Positive: a new unscoped, non-expiring grant whose id is ``adjustment_id``. Negative: taken from the
        open grants in drawdown order (scope and dates ignored), at most ``available`` (raises
        ``InsufficientCredit``).
        """
        self._require_unit(unit)
        _require_amount("amount", amount, allow_negative=True)
        _require_text("reason", reason)
        _require_text("user", user)
        _require_time("at", at)
        postings: list[Posting] = []
        draws: list[Draw] = []
        grant: GrantRecord | None = None
        if amount > 0:
            gid = str(adjustment_id)
            if gid in self._grants:
                raise DuplicateGrant(f"adjustment {adjustment_id} was already applied")
            grant = {
                "grant_id": gid,
                "unit": unit,
                "amount": amount,
                "priority": 0,
                "effective_at": at,
                "expires_at": None,
                "scope": None,
                "source": GrantSource.MANUAL.value,
                "funded_by": LedgerAccount.MANUAL_ADJUSTMENT.value,
                "tax_amount": 0,
                "cause": {"adjustment_id": gid, "reason": reason},
                "granted_by": user,
            }
            postings = [
                posting(LedgerAccount.MANUAL_ADJUSTMENT, unit, amount, gid),
                posting(LedgerAccount.TENANT_WALLET, unit, -amount, gid),
            ]
        else:
            take = -amount
            if take > self.available(unit):
                raise InsufficientCredit(f"cannot remove {_money(take, unit)}: only {_money(self.available(unit), unit)} "
                                         "is available")
            open_grants = [  # what ``available`` counts: not credit set aside for an ended period's late usage
                g
                for g in self._grants.values()
                if g["unit"] == unit and g["status"] == "open" and g["remaining"] > 0 and not g["set_aside"]
            ]
            left = take
            for g in sorted(open_grants, key=_drawdown_key):
                if left == 0:
                    break
                part = min(left, g["remaining"])
                draws.append({"grant_id": g["grant_id"], "amount": part})
                postings += [
                    posting(LedgerAccount.TENANT_WALLET, unit, part, g["grant_id"]),
                    posting(LedgerAccount.MANUAL_ADJUSTMENT, unit, -part, g["grant_id"]),
                ]
                left -= part
            assert left == 0, "available never exceeds the open grants' remaining credit"
        assert_balanced(postings)
        self._balance_adjusted(
            adjustment_id=adjustment_id,
            unit=unit,
            amount=amount,
            reason=reason,
            user=user,
            postings=postings,
            draws=draws,
            grant=grant,
            at=at,
        )
        self._check_thresholds(unit, at)

    @event("BalanceAdjusted")
    def _balance_adjusted(
        self,
        adjustment_id: UUID,
        unit: str,
        amount: int,
        reason: str,
        user: str,
        postings: list[Posting],
        draws: list[Draw],
        grant: GrantRecord | None,
        at: datetime,
    ) -> None:
        self._apply_draws(unit, draws, remember=False)
        for draw in draws:  # credit of a package taken away: its money lapses (see recognise_purchase_money)
            self._grants[draw["grant_id"]]["adjusted"] += draw["amount"]
            money = self._grants[draw["grant_id"]].get("money")
            if money is not None:
                money["adjusted"] += draw["amount"]
        if grant is not None:
            self._add_grant(grant)
        self._update_arming(unit)
        self._adjustments[str(adjustment_id)] = {"unit": unit, "amount": amount, "reason": reason, "user": user,
                                                 "balance": self.balance(unit), "available": self.available(unit)}
        while len(self._adjustments) > ADJUSTMENTS_KEPT_MAX:
            del self._adjustments[next(iter(self._adjustments))]

    def settle_receivable(
        self, *, settlement_id: UUID, unit: str, amount: int, at: datetime, cause: dict[str, Any]
    ) -> None:
        """Records payment of outstanding overage (Dr GATEWAY_CLEARING / Cr RECEIVABLES)."""
        self._require_unit(unit)
        _require_amount("amount", amount)
        _require_time("at", at)
        if amount > self.overage_receivable(unit):
            raise InvalidAmount(f"settlement {_money(amount, unit)} exceeds the receivable "
                                f"{_money(self.overage_receivable(unit), unit)}")
        postings = [
            posting(LedgerAccount.GATEWAY_CLEARING, unit, amount),
            posting(LedgerAccount.RECEIVABLES, unit, -amount),
        ]
        assert_balanced(postings)
        self._receivable_settled(
            settlement_id=settlement_id, unit=unit, amount=amount, postings=postings, cause=dict(cause), at=at
        )

    @event("ReceivableSettled")
    def _receivable_settled(
        self,
        settlement_id: UUID,
        unit: str,
        amount: int,
        postings: list[Posting],
        cause: dict[str, Any],
        at: datetime,
    ) -> None:
        self._receivable[unit] = self._receivable.get(unit, 0) - amount

    # == overage on invoices ==================================================================================

    def unbilled_overage(self, unit: str) -> dict[str, int]:
        """Overage of ``unit`` not yet on an invoice: period key -> net sub-units (see ``invoice_overage``)."""
        return dict(self._unbilled.get(unit, {}))

    def overage_since(self, unit: str, key: str, since: datetime) -> int:
        """What of period ``key``'s unbilled overage of ``unit`` usage at or after ``since`` posted (sub-units; an
        entry merged from usage on both sides of ``since`` counts as before it), at most the period's unbilled."""
        posted = sum(entry[2] for entry in self._overage_times.get(unit, {}).get(key, ()) if entry[0] >= since)
        return max(min(posted, self._unbilled.get(unit, {}).get(key, 0)), 0)

    def unbilled_overage_meters(self, unit: str) -> dict[str, dict[str, int]]:
        """The meters ``unbilled_overage`` came from: period key -> meter -> sub-units (copies). A period's meters
        add up to at most its unbilled overage; the rest is of no known meter."""
        return {key: dict(parts) for key, parts in self._unbilled_meters.get(unit, {}).items()}

    def invoiced_overage(self, invoice: str) -> dict[str, int]:
        """The overage ``invoice`` billed and that is not settled yet: unit -> sub-units."""
        return dict(self._invoiced_overage.get(invoice, {}))

    def billed_overage(self, unit: str, period: str) -> list[dict[str, Any]]:
        """The invoices that billed the overage of ``unit`` priced in ``period`` and what of it a usage correction can
        still credit by a credit note against each (``{"invoice", "amount"}``, sub-units), newest invoice first: a
        late correction's increase of a period already invoiced is billed by a later invoice, and a later decrease
        credits that one first. Empty: not invoiced, voided, or older than the last ``BILLED_PERIODS_KEPT_MAX``
        periods."""
        return [dict(billed) for billed in reversed(self._billed_periods.get(unit, {}).get(period, []))]

    def period_minimum(self, unit: str, period: str) -> dict[str, Any] | None:
        """The minimum spend committed for ``period`` (a copy: ``invoice`` that committed it, ``minimum`` and the
        period's usage ``spend`` billed so far, sub-units of ``unit``), or ``None``: no minimum, committed before
        session 8, or older than the last ``BILLED_PERIODS_KEPT_MAX`` periods."""
        found = self._period_minimums.get(unit, {}).get(period)
        return dict(found) if found is not None else None

    def commit_period_minimum(self, *, invoice: str, unit: str, period: str, minimum: int, spend: int,
                              at: datetime) -> None:
        """``invoice`` billed ``period``'s usage (``spend``, at its rated value) against the minimum spend the period
        committed (``minimum``; its "Minimum commitment" line billed the shortfall): remembered so a later correction
        of the period keeps its charge at max(spend, minimum) (``charge_period_minimums``, ``debit_usage``)."""
        self._require_unit(unit)
        _require_text("invoice", invoice)
        _require_text("period", period)
        _require_amount("minimum", minimum)
        _require_amount("spend", spend, allow_zero=True, allow_negative=True)
        _require_time("at", at)
        self._period_minimum_committed(invoice=invoice, unit=unit, period=period, minimum=minimum, spend=spend,
                                       at=at)

    @event("PeriodMinimumCommitted")
    def _period_minimum_committed(self, invoice: str, unit: str, period: str, minimum: int, spend: int,
                                  at: datetime) -> None:
        kept = self._period_minimums.setdefault(unit, {})
        kept.pop(period, None)
        kept[period] = {"invoice": invoice, "minimum": minimum, "spend": spend}
        while len(kept) > BILLED_PERIODS_KEPT_MAX:
            del kept[next(iter(kept))]

    def charge_period_minimums(self, *, invoice: str, unit: str, taken: dict[str, int], minor: int,
                               at: datetime) -> dict[str, int]:
        """``invoice`` took ``taken`` (period key -> sub-units, ``invoice_overage``): overage of periods an earlier
        invoice billed against a minimum spend (``period_minimum``: a late correction raised their usage). What of
        each the minimum commitment already billed covers (the period's minimum less its spend, whole ``minor``
        units) is netted: not owed twice (Dr RECOGNISED_REVENUE / Cr RECEIVABLES, ``PeriodMinimumsCharged``), and
        every period's spend grows by what it took. Returns period key -> sub-units netted (none: ``{}``)."""
        self._require_unit(unit)
        _require_amount("minor", minor)
        kept = self._period_minimums.get(unit, {})
        periods: dict[str, dict[str, int]] = {}
        for key, amount in taken.items():
            record = kept.get(key)
            if record is None or amount <= 0:
                continue
            cover = max(record["minimum"] - record["spend"], 0)
            periods[key] = {"overage": amount, "netted": min(amount, cover) // minor * minor}
        if not periods:
            return {}
        netted = sum(p["netted"] for p in periods.values())
        postings = [posting(LedgerAccount.RECOGNISED_REVENUE, unit, netted),
                    posting(LedgerAccount.RECEIVABLES, unit, -netted)] if netted else []
        assert_balanced(postings)
        self._period_minimums_charged(invoice=invoice, unit=unit, periods=periods, postings=postings, at=at)
        return {key: p["netted"] for key, p in periods.items() if p["netted"]}

    @event("PeriodMinimumsCharged")
    def _period_minimums_charged(self, invoice: str, unit: str, periods: dict[str, dict[str, int]],
                                 postings: list[Posting], at: datetime) -> None:
        kept = self._period_minimums.get(unit, {})
        netted = 0
        for key, change in periods.items():
            if key in kept:
                kept[key]["spend"] += change["overage"]
            if change["netted"]:
                netted += change["netted"]
                # What the invoice bills of the period is its overage less the commitment netted: all a later
                # decrease can credit against it.
                records = self._billed_periods.get(unit, {}).get(key, [])
                for billed in records:
                    if billed["invoice"] == invoice:
                        billed["amount"] -= change["netted"]
                records[:] = [billed for billed in records if billed["amount"] > 0]
                if not records:
                    self._billed_periods.get(unit, {}).pop(key, None)
        if not self._billed_periods.get(unit, True):
            self._billed_periods.pop(unit, None)
        if netted:
            self._receivable[unit] = self._receivable.get(unit, 0) - netted
            billed_overage = self._invoiced_overage.get(invoice, {})
            if unit in billed_overage:
                billed_overage[unit] -= netted
                if billed_overage[unit] <= 0:
                    del billed_overage[unit]
            if not billed_overage:
                self._invoiced_overage.pop(invoice, None)

    def invoice_overage(
        self, *, invoice: str, units: Iterable[str], end: datetime, at: datetime
    ) -> dict[str, dict[str, int]]:
        """Marks the overage of ``units`` posted for periods that began before ``end`` as billed on ``invoice``.

        Returns unit -> period key -> net sub-units taken. Overage is kept by the period rating priced it in
        (``cause.period``: a subscription period's start or a calendar month ``YYYY-MM``; the time it was
        posted when there is none), so an invoice for a period that ended takes that period's overage and any
        left from earlier periods, never what the next period's usage (arriving before the invoice) posted.
        """
        _require_time("end", end)
        taken: dict[str, dict[str, int]] = {}
        for unit in sorted(set(units)):
            picked = {key: amount for key, amount in self._unbilled.get(unit, {}).items()
                      if period_began(key) < end}
            if picked:
                taken[unit] = picked
        if taken:
            self._overage_invoiced(invoice=invoice, taken=taken, at=at)
        return taken

    @event("OverageInvoiced")
    def _overage_invoiced(self, invoice: str, taken: dict[str, dict[str, int]], at: datetime) -> None:
        billed = self._invoiced_overage.setdefault(invoice, {})
        for unit, periods in taken.items():
            left = self._unbilled.get(unit, {})
            for key in periods:
                left.pop(key, None)
                _fit_meter_overage(self._unbilled_meters, self._unbilled, unit, key)
            for entry in self._owed_usage.get(unit, ()):  # billed: collected in full (since session 12)
                if entry.get("key") in periods:
                    del entry["key"]
                    entry["invoice"] = invoice
            if not left:
                self._unbilled.pop(unit, None)
            _forget_overage_times(self._overage_times, self._unbilled, unit)
            billed[unit] = billed.get(unit, 0) + sum(periods.values())
            kept = self._billed_periods.setdefault(unit, {})
            for key, amount in periods.items():
                if amount <= 0:
                    continue
                # Billed again (a late correction's increase, or after a void): every invoice that billed some of it
                # is kept, and the period moves to the end, the newest.
                records = kept.pop(key, [])
                if records and records[-1]["invoice"] == invoice:
                    records[-1]["amount"] += amount
                else:
                    records.append({"invoice": invoice, "amount": amount})
                kept[key] = records
            while len(kept) > BILLED_PERIODS_KEPT_MAX:
                del kept[next(iter(kept))]
            if not kept:
                del self._billed_periods[unit]
        for unit in [u for u, amount in billed.items() if amount <= 0]:
            del billed[unit]  # a net give-back: nothing to collect
        if not billed:
            del self._invoiced_overage[invoice]

    def round_invoiced_overage(self, *, invoice: str, unit: str, billed: int, bound: int, at: datetime) -> int:
        """``invoice`` bills ``billed`` sub-units of ``unit`` (whole minor units: its usage, credits-applied and overage
        lines, each rounded once) for the overage it took (``invoiced_overage``, exact to the sub-unit). The difference
        is the rounding of those lines, at most ``bound``: posted (``InvoicedOverageRounded``: Dr RECEIVABLES / Cr
        RECOGNISED_REVENUE, the reverse when the lines rounded down) so the invoice's overage receivable is what it
        bills and its payment settles exactly its total. Returns the sub-units posted (0: nothing recorded)."""
        self._require_unit(unit)
        _require_text("invoice", invoice)
        _require_amount("billed", billed, allow_zero=True)
        _require_amount("bound", bound, allow_zero=True)
        _require_time("at", at)
        minor = minor_subunits(iso_currency(unit)) if is_currency_code(unit) else 1
        if billed % minor:
            raise InvalidAmount(f"invoice {invoice} bills {billed} sub-units of {unit}: not whole minor units")
        if invoice in self._overage_rounding:
            raise InvalidArgument(f"invoice {invoice}'s overage is already rounded")
        rounding = billed - self._invoiced_overage.get(invoice, {}).get(unit, 0)
        if abs(rounding) > bound:
            raise InvalidAmount(f"invoice {invoice} bills {_money(billed, unit)} for "
                                f"{_money(billed - rounding, unit)} of overage: more than rounding ({_money(bound, unit)})")
        if not rounding:
            return 0
        postings = [posting(LedgerAccount.RECEIVABLES, unit, rounding),
                    posting(LedgerAccount.RECOGNISED_REVENUE, unit, -rounding)]
        assert_balanced(postings)
        self._invoiced_overage_rounded(invoice=invoice, unit=unit, amount=rounding, postings=postings, at=at)
        return rounding

    @event("InvoicedOverageRounded")
    def _invoiced_overage_rounded(self, invoice: str, unit: str, amount: int, postings: list[Posting],
                                  at: datetime) -> None:
        self._receivable[unit] = self._receivable.get(unit, 0) + amount
        _change_invoiced(self._invoiced_overage, invoice, unit, amount)
        self._overage_rounding.setdefault(invoice, {})[unit] = amount

    def overage_rounding(self, invoice: str) -> dict[str, int]:
        """The rounding of ``invoice``'s lines posted with its overage (``round_invoiced_overage``), while it is
        unpaid: unit -> sub-units."""
        return dict(self._overage_rounding.get(invoice, {}))

    def settle_invoiced_overage(self, *, invoice: str, at: datetime, cause: dict[str, Any]) -> None:
        """``invoice`` was paid: what it billed leaves receivables (Dr GATEWAY_CLEARING / Cr RECEIVABLES): its
        fees and tax (``bill_invoice``, one ``InvoicePaid``) and the overage it billed, each unit at most what
        is still receivable (a give-back after the invoice may have reduced it)."""
        billed = self._invoice_billed.get(invoice)
        if billed is not None:
            unit, amount = billed["unit"], billed["amount"]
            postings = [posting(LedgerAccount.GATEWAY_CLEARING, unit, amount),
                        posting(LedgerAccount.RECEIVABLES, unit, -amount)]
            assert_balanced(postings)
            self._invoice_paid(invoice=invoice, unit=unit, amount=amount, tax_amount=billed["tax"],
                               postings=postings, cause=dict(cause), at=at)
        due = self._invoiced_overage.get(invoice)
        if not due:
            if invoice in self._overage_rounding:  # its lines rounded what it took down to nothing: forgotten
                self._invoiced_overage_closed(invoice=invoice, at=at)
            return
        for unit, amount in sorted(due.items()):
            amount = min(amount, self.overage_receivable(unit))
            if amount > 0:
                self.settle_receivable(
                    settlement_id=uuid5(NAMESPACE_URL, f"/accounts/{self.tenant}/invoices/{invoice}/settle/{unit}"),
                    unit=unit, amount=amount, at=at, cause={**cause, "invoice": invoice})
        self._invoiced_overage_closed(invoice=invoice, at=at)

    def write_off_charge_rounding(self, *, invoice: str, unit: str, amount: int, at: datetime,
                                  cause: dict[str, Any]) -> None:
        """``invoice`` is paid ``amount`` less than it bills because its total is finer than its currency is charged
        in (12.957 KWD, finalized before session 13; a gateway charges 12.950): the difference is written off
        before the payment clears the rest (Dr RECOGNISED_REVENUE / Cr RECEIVABLES, ``InvoiceChargeRounded``), so
        nothing of the invoice stays receivable. Taken from its fees and tax (``bill_invoice``), the rest from the
        overage it billed. Less than one step of what the currency is charged in (``minor_subunits``)."""
        self._require_unit(unit)
        _require_amount("amount", amount)
        step = minor_subunits(iso_currency(unit))
        if amount >= step:
            raise InvalidAmount(f"a charge's rounding of {_money(amount, unit)} is a whole step of {unit} or more")
        billed = self._invoice_billed.get(invoice)
        owed = (billed["amount"] if billed is not None and billed["unit"] == unit else 0) + min(
            self._invoiced_overage.get(invoice, {}).get(unit, 0), self.overage_receivable(unit))
        if amount > owed:
            raise InvalidAmount(f"invoice {invoice} has {_money(owed, unit)} receivable, less than the "
                                f"{_money(amount, unit)} to write off")
        postings = [posting(LedgerAccount.RECOGNISED_REVENUE, unit, amount),
                    posting(LedgerAccount.RECEIVABLES, unit, -amount)]
        assert_balanced(postings)
        self._invoice_charge_rounded(invoice=invoice, unit=unit, amount=amount, postings=postings, cause=dict(cause),
                                     at=at)

    @event("InvoiceChargeRounded")
    def _invoice_charge_rounded(self, invoice: str, unit: str, amount: int, postings: list[Posting],
                                cause: dict[str, Any], at: datetime) -> None:
        rest = amount
        billed = self._invoice_billed.get(invoice)
        if billed is not None and billed["unit"] == unit:
            taken = min(rest, billed["amount"])
            if taken == billed["amount"]:  # all of its fees and tax written off: no payment of them to record
                del self._invoice_billed[invoice]
            else:
                self._invoice_billed[invoice] = {**billed, "amount": billed["amount"] - taken}
            rest -= taken
        if rest:
            _change_invoiced(self._invoiced_overage, invoice, unit, -rest)
            self._receivable[unit] = self._receivable.get(unit, 0) - rest

    @event("InvoicedOverageClosed")
    def _invoiced_overage_closed(self, invoice: str, at: datetime) -> None:
        self._invoiced_overage.pop(invoice, None)
        self._overage_rounding.pop(invoice, None)
        # Owed usage it billed is paid: a give-back of it credits its credit back (since session 12).
        for unit in list(self._owed_usage):
            self._owed_usage[unit] = [e for e in self._owed_usage[unit] if e.get("invoice") != invoice]
            if not self._owed_usage[unit]:
                del self._owed_usage[unit]

    def return_invoiced_overage(self, *, invoice: str, at: datetime) -> None:
        """``invoice`` was voided unpaid: the overage it billed is owed again, unbilled (as posted at ``at``), so
        the next invoice bills it or, pay as you go, credit bought repays it. The rounding of its lines is taken
        back first (``InvoicedOverageRoundingReversed``): what is owed again is the overage exact, rounded anew by
        the invoice that bills it. Nothing billed: nothing recorded."""
        for unit, amount in sorted(self._overage_rounding.get(invoice, {}).items()):
            postings = [posting(LedgerAccount.RECOGNISED_REVENUE, unit, amount),
                        posting(LedgerAccount.RECEIVABLES, unit, -amount)]
            assert_balanced(postings)
            self._invoiced_overage_rounding_reversed(invoice=invoice, unit=unit, amount=amount, postings=postings,
                                                     at=at)
        due = self._invoiced_overage.get(invoice)
        if due:
            self._invoiced_overage_returned(invoice=invoice, returned=dict(due), at=at)

    @event("InvoicedOverageRoundingReversed")
    def _invoiced_overage_rounding_reversed(self, invoice: str, unit: str, amount: int, postings: list[Posting],
                                            at: datetime) -> None:
        self._receivable[unit] = self._receivable.get(unit, 0) - amount
        _change_invoiced(self._invoiced_overage, invoice, unit, -amount)
        rounding = self._overage_rounding.get(invoice, {})
        rounding.pop(unit, None)
        if not rounding:
            self._overage_rounding.pop(invoice, None)

    @event("InvoicedOverageReturned")
    def _invoiced_overage_returned(self, invoice: str, returned: dict[str, int], at: datetime) -> None:
        self._invoiced_overage.pop(invoice, None)
        for unit, amount in returned.items():
            _add_unbilled(self._unbilled, unit, at.isoformat(), amount)
        for entries in self._owed_usage.values():  # owed usage it billed is owed again, unbilled (since session 12)
            for entry in entries:
                if entry.get("invoice") == invoice:
                    del entry["invoice"]
                    entry["key"] = at.isoformat()
        for unit in list(self._period_minimums):  # its minimum commitment is no longer billed
            minimums = self._period_minimums[unit]
            for key in [key for key, record in minimums.items() if record["invoice"] == invoice]:
                del minimums[key]
            if not minimums:
                del self._period_minimums[unit]
        for unit in list(self._billed_periods):  # owed again, unbilled: a correction of it reduces it instead
            periods = self._billed_periods[unit]
            for key in list(periods):
                periods[key] = [billed for billed in periods[key] if billed["invoice"] != invoice]
                if not periods[key]:
                    del periods[key]
            if not periods:
                del self._billed_periods[unit]

    # == subscription invoices and credit notes ===============================================================

    def invoice_billed(self, invoice: str) -> dict[str, Any] | None:
        """The fees and tax ``invoice`` billed and that are not paid yet (``bill_invoice``), or ``None``."""
        billed = self._invoice_billed.get(invoice)
        return dict(billed) if billed is not None else None

    def fee_schedule(self, invoice: str) -> dict[str, Any] | None:
        """Where the fee revenue ``invoice`` deferred stands (a copy), or ``None`` when nothing of it is deferred
        (never deferred, recognised to its end, or closed): ``unit``, ``amount`` (deferred at billing),
        ``deferred`` (left), ``start``, ``end`` and ``recognised_to``."""
        schedule = self._fee_schedules.get(invoice)
        return dict(schedule) if schedule is not None else None

    def deferred_fees(self, unit: str) -> int:
        """Fee revenue billed in advance and not recognised yet, in ``unit`` (the ``DEFERRED_REVENUE`` of fees), less
        the credits already taken from drafts not billed yet (``pending_fee_credit``)."""
        return (sum(s["deferred"] for s in self._fee_schedules.values() if s["unit"] == unit)
                - sum(c["amount"] for c in self._pending_fee_credits.values() if c["unit"] == unit))

    def pending_fee_credit(self, invoice: str) -> dict[str, Any] | None:
        """The credit for unused time taken from ``invoice``'s fee while it was a draft and not billed yet (a copy:
        ``unit``, ``amount``, ``end``), or ``None``."""
        credit = self._pending_fee_credits.get(invoice)
        return dict(credit) if credit is not None else None

    def bill_invoice(
        self, *, invoice: str, unit: str, net: int, tax: int, at: datetime, cause: dict[str, Any],
        deferred: dict[str, Any] | None = None, credits: dict[str, Any] | None = None,
    ) -> None:
        """A finalized subscription invoice bills its fee lines (``net``: base fee, proration, discount) and its
        tax: Dr RECEIVABLES net + tax / Cr DEFERRED_REVENUE (the fees of its service period, ``deferred``) and
        Cr RECOGNISED_REVENUE (the rest of the net) / Cr TAX_PAYABLE tax (``InvoiceBilled``). The deferred fee is
        recognised over its period by ``recognise_fee_revenue``; ``credits`` (an upgrade's unused time of the
        invoice it corrects) is taken back from that invoice's schedule (see ``_fee_revenue``). Its usage,
        credits-applied and overage lines are not posted again: that money is already receivable.
        Nothing to bill (0 and 0) records nothing. Paying the invoice settles it (``settle_invoiced_overage``).
        ``tax`` (or ``net``) is negative only when the invoice also credits unused time taxed at another rate than
        today's (an upgrade after the tax profile changed: the credit gives back the tax its invoice charged);
        ``net + tax`` is never negative."""
        self._require_document(unit, "invoice", invoice, net, tax, at)
        if net + tax < 0:
            raise InvalidAmount(f"invoice {invoice} would bill {net + tax}: a negative total is a credit note")
        if invoice in self._invoice_billed or invoice in self._fee_schedules:
            raise InvalidArgument(f"invoice {invoice} is already billed")
        if net + tax == 0 and not deferred and not credits and invoice not in self._pending_fee_credits:
            return
        revenue_lines, revenue = self._fee_revenue(document=invoice, unit=unit, revenue=net, deferred=deferred,
                                                   credits=credits, at=at)
        postings = [posting(LedgerAccount.RECEIVABLES, unit, net + tax)] if net + tax else []
        postings += revenue_lines
        if tax:
            postings.append(posting(LedgerAccount.TAX_PAYABLE, unit, -tax))
        if not postings:
            return
        assert_balanced(postings)
        self._invoice_billed_event(invoice=invoice, unit=unit, amount=net + tax, tax_amount=tax, postings=postings,
                                   cause=dict(cause), at=at, **({"revenue": revenue} if revenue else {}))

    @event("InvoiceBilled")
    def _invoice_billed_event(self, invoice: str, unit: str, amount: int, tax_amount: int, postings: list[Posting],
                              cause: dict[str, Any], at: datetime, revenue: dict[str, Any] | None = None) -> None:
        # ``revenue`` None: nothing deferred nor taken back (and every InvoiceBilled recorded before fees were
        # deferred: their fee went to RECOGNISED_REVENUE, and stays there).
        if amount:
            self._invoice_billed[invoice] = {"unit": unit, "amount": amount, "tax": tax_amount}
        self._apply_fee_revenue(revenue)

    def void_invoice_bill(self, *, invoice: str, at: datetime, cause: dict[str, Any],
                          restored: str | None = None) -> None:
        """A billed invoice was voided unpaid: its ``InvoiceBilled`` is reversed (``InvoiceBillVoided``: Dr
        DEFERRED_REVENUE what of its fee is still deferred (its schedule ends) and Dr RECOGNISED_REVENUE the rest
        of its net / Dr TAX_PAYABLE tax / Cr RECEIVABLES). Nothing billed: nothing recorded.

        ``restored``: the invoice whose unused time the voided one (a change's) netted as a credit, owed in full
        again: what the voided schedule defers beyond the net reversed is that invoice's fee for the rest of the
        period, so it stays deferred on a schedule of ``restored`` to the voided one's end (``revenue.moved``) and is
        recognised as the time passes, not at the void (when ``restored`` has no schedule of its own)."""
        billed = self._invoice_billed.get(invoice)
        if billed is None:
            return
        unit, amount, tax = billed["unit"], billed["amount"], billed["tax"]
        revenue_lines, revenue = self._fee_revenue(
            document=invoice, unit=unit, revenue=-(amount - tax), deferred=None,
            credits={"invoice": invoice, "amount": amount - tax, "close": True,
                     **({"restored": restored} if restored is not None else {})})
        postings = _revenue_and_tax_back(LedgerAccount.RECEIVABLES, unit, amount, tax, revenue_lines)
        self._invoice_bill_voided(invoice=invoice, unit=unit, amount=amount, tax_amount=tax, postings=postings,
                                  cause=dict(cause), at=at, **({"revenue": revenue} if revenue else {}))

    @event("InvoiceBillVoided")
    def _invoice_bill_voided(self, invoice: str, unit: str, amount: int, tax_amount: int, postings: list[Posting],
                             cause: dict[str, Any], at: datetime, revenue: dict[str, Any] | None = None) -> None:
        self._invoice_billed.pop(invoice, None)
        self._apply_fee_revenue(revenue)

    @event("InvoicePaid")
    def _invoice_paid(self, invoice: str, unit: str, amount: int, tax_amount: int, postings: list[Posting],
                      cause: dict[str, Any], at: datetime) -> None:
        self._invoice_billed.pop(invoice, None)

    def credit_note_grant(
        self, *, grant_id: UUID, note: str, unit: str, net: int, tax: int, at: datetime, cause: dict[str, Any],
        deferred: dict[str, Any] | None = None, credits: dict[str, Any] | None = None,
    ) -> None:
        """A subscription credit note (proration on a downgrade or an immediate cancel) credits ``net`` + ``tax``
        as account credit in the currency: Dr DEFERRED_REVENUE / Dr RECOGNISED_REVENUE net / Dr TAX_PAYABLE tax /
        Cr TENANT_WALLET (a non-expiring, unscoped grant with source ``credit_note``, recorded as
        ``CreditGranted``). ``credits`` (the unused time of the invoice it corrects) is taken from that invoice's
        deferred fee, whose schedule ends here, and ``deferred`` (a downgrade's new fee for the rest of the
        period) is deferred anew (see ``_fee_revenue``); without them the net comes from RECOGNISED_REVENUE. The
        invoice it corrects is charged its full total whether paid or not, so the credit never reduces its
        receivable. ``tax`` (or ``net``) is negative only when the note also charges something new taxed at
        another rate than the credit (a downgrade after the tax profile changed: the new plan's rest is taxed at
        today's rate, the credit gives back the tax its invoice charged); ``net + tax``, the credit, is never
        negative."""
        self._require_document(unit, "note", note, net, tax, at)
        if net + tax < 0:
            raise InvalidAmount(f"credit note {note} would take {-(net + tax)} from the account: it bills")
        if net + tax == 0:
            return
        gid = str(grant_id)
        if gid in self._grants:
            raise DuplicateGrant(f"grant {grant_id} already exists")
        revenue_lines, revenue = self._fee_revenue(document=note, unit=unit, revenue=-net, deferred=deferred,
                                                   credits=credits, gid=gid)
        postings = [posting(LedgerAccount.TENANT_WALLET, unit, -(net + tax), gid), *revenue_lines]
        if tax:
            postings.append(posting(LedgerAccount.TAX_PAYABLE, unit, tax, gid))
        assert_balanced(postings)
        self._credit_granted(
            grant_id=grant_id, unit=unit, amount=net + tax, priority=0, effective_at=at, expires_at=None, scope=None,
            # ``tax_amount`` is tax paid on top of a purchase; here the tax credited is inside ``amount``.
            source=GrantSource.CREDIT_NOTE.value, tax_amount=0, cause={**cause, "credit_note": note, "tax": tax},
            granted_by="ledger", postings=postings, **({"revenue": revenue} if revenue else {}),
        )

    def refund_invoice_payment(
        self, *, note: str, unit: str, amount: int, tax: int, at: datetime, cause: dict[str, Any],
        credits: dict[str, Any] | None = None, excess: int = 0, reclaim: list[str] | None = None,
    ) -> None:
        """The gateway gave back ``amount`` (``tax`` of it tax) of a paid invoice's payment, documented by credit
        note ``note``: Dr DEFERRED_REVENUE / Dr RECOGNISED_REVENUE / Dr TAX_PAYABLE / Cr GATEWAY_CLEARING
        (``InvoicePaymentRefunded``). ``credits`` names the refunded invoice: its net comes from that invoice's
        deferred fee first, the rest from RECOGNISED_REVENUE (``close``: a full refund ends the schedule). The
        money went back to the customer, so no account credit is given.

        ``excess`` (of ``amount``, beyond ``tax``) is what the gateway gave back beyond what the invoice had left
        to give: credits for unused time (a change's or cancel's) had already given it back. It is taken back from
        the account credit of the credit notes ``reclaim`` (grant ids) as far as it is unspent (Dr TENANT_WALLET),
        and the rest is owed (Dr RECEIVABLES): overage of the account, unbilled under the refund's time ``at`` (an
        earlier period's), so the next renewal invoice bills it as "Overage from earlier periods" and paying that
        invoice settles it, or, with no live subscription, credit bought repays it (``repay_overage``); no revenue
        or tax moves for it a second time."""
        self._require_unit(unit)
        _require_text("note", note)
        _require_amount("amount", amount)
        _require_amount("tax", tax, allow_zero=True)
        _require_amount("excess", excess, allow_zero=True)
        _require_time("at", at)
        if tax + excess > amount:
            raise InvalidAmount(f"refunded tax {tax} and excess {excess} exceed the refund {amount}")
        revenue_lines, revenue = self._fee_revenue(document=note, unit=unit, revenue=-(amount - tax - excess),
                                                   deferred=None, credits=credits)
        postings = [posting(LedgerAccount.GATEWAY_CLEARING, unit, -amount), *revenue_lines]
        if tax:
            postings.append(posting(LedgerAccount.TAX_PAYABLE, unit, tax))
        reclaimed: dict[str, Any] = {}
        if excess:
            draws, left = [], excess
            for gid in reclaim or []:
                g = self._grants.get(gid)
                if g is None or g["unit"] != unit or g["status"] != "open" or g["remaining"] <= 0 or not left:
                    continue
                part = min(left, g["remaining"])
                draws.append({"grant_id": gid, "amount": part})
                postings.append(posting(LedgerAccount.TENANT_WALLET, unit, part, gid))
                left -= part
            reclaimed = {"draws": draws, "receivable": left}
            if left:
                postings.append(posting(LedgerAccount.RECEIVABLES, unit, left))
                reclaimed["period"] = owed_refund_key(at)  # the overage key it is owed under
                # The usage that spent those notes' credit is owed now (since session 12), as a gateway refund's
                # spent usage_reversal credit is: ``_owed_usage``.
                owed = self._owed_credit_parts(unit, list(reclaim or []), left)
                if owed:
                    reclaimed["owed"] = owed
        assert_balanced(postings)
        self._invoice_payment_refunded(note=note, unit=unit, amount=amount, tax_amount=tax, postings=postings,
                                       cause=dict(cause), at=at, **({"revenue": revenue} if revenue else {}),
                                       **({"reclaimed": reclaimed} if reclaimed else {}))
        if reclaimed.get("draws"):
            self._check_thresholds(unit, at, top_up=False)

    @event("InvoicePaymentRefunded")
    def _invoice_payment_refunded(self, note: str, unit: str, amount: int, tax_amount: int,
                                  postings: list[Posting], cause: dict[str, Any], at: datetime,
                                  revenue: dict[str, Any] | None = None,
                                  reclaimed: dict[str, Any] | None = None) -> None:
        self._apply_fee_revenue(revenue)
        if reclaimed:  # credit already given for the refunded money taken back, the rest owed
            self._apply_draws(unit, reclaimed["draws"], remember=False)
            # Owed as unbilled overage, to be invoiced or repaid (recorded since session 8; an earlier ``reclaimed``
            # without a ``period`` replays as it was: receivable only, never billed). ``owed`` (since session 12): the
            # credit notes whose spent credit it is; a refund recorded before owes no usage of them (replays as it was).
            self._owe_reclaimed(unit, reclaimed, reclaimed.get("owed") or [])
            self._update_arming(unit)

    # == fee revenue recognition (IFRS 15 / ASC 606: fees billed in advance, earned over their period) =========

    def _fee_revenue(self, *, document: str, unit: str, revenue: int, deferred: dict[str, Any] | None,
                     credits: dict[str, Any] | None, gid: str | None = None, at: datetime | None = None
                     ) -> tuple[list[Posting], dict[str, Any] | None]:
        """The revenue side of a document that changes the fee revenue by ``revenue`` sub-units (positive: billed,
        negative: given back), and what it changes in the schedules (``None``: nothing, all of it is
        RECOGNISED_REVENUE as before fees were deferred).

        ``deferred`` {"amount", "start", "end"[, "pending"]}: ``amount`` of it (> 0) is the fee of the service
        period [start, end): Cr DEFERRED_REVENUE, a new schedule named ``document`` (``pending``: the service has
        not begun, nothing is recognised until ``start_fee_schedule`` says when it does). ``credits`` {"invoice", "amount",
        "close"[, "draft", "end"]}: ``amount`` (>= 0) of what is given back reverses ``invoice``'s fee: Dr DEFERRED_REVENUE as far
        as its schedule still defers it, the rest from RECOGNISED_REVENUE; ``close``: the schedule ends here and
        what it defers beyond the credit (the time up to now not yet recognised by a run) is recognised now, so a
        cancel's credit for the unused time is exactly what leaves DEFERRED_REVENUE of its period and the period
        is recognised at its fee less that credit. ``draft``: ``invoice`` is a draft not billed yet (a renewal
        before rating's usage lines): the whole credit is Dr DEFERRED_REVENUE now, pending on that invoice, whose
        service the credit cuts at ``end``; billing it (``document`` with a pending credit) settles the credit
        against its fee: what of the fee is left is deferred to that cut and recognised at once when billed after
        it (``at``), so no period's recognised revenue moves and nothing stays deferred past the cut. Whatever
        else of ``revenue`` is RECOGNISED_REVENUE."""
        record: dict[str, Any] = {}
        lines: list[Posting] = []
        new = 0
        pending = self._pending_fee_credits.get(document)
        if pending is not None and pending["unit"] != unit:
            raise InvalidUnit(f"invoice {document} bills {unit}, its credit for unused time is in {pending['unit']}")
        if deferred:
            new, start, end = deferred.get("amount"), deferred.get("start"), deferred.get("end")
            _require_amount("deferred amount", new, allow_zero=True)
            _require_time("deferred start", start)
            _require_time("deferred end", end)
            if end <= start:
                raise InvalidTime(f"the service period of {document} ends ({end}) before it starts ({start})")
            included = deferred.get("included", 0)
            _require_amount("included credit", included, allow_zero=True)
            if included > new:
                raise InvalidAmount(f"{document} includes {included} of credit in a fee of {new}")
            if pending is not None:
                # Deferred to the cut, net of the credit already taken from DEFERRED_REVENUE and of the included
                # credit (its grant's funding); none once billed past the cut (recognised now below, as a close
                # recognises the time up to the credit).
                cut = pending["end"]
                left = (max(new - pending["amount"] - included, 0) if at is not None and at < cut and start < cut
                        else 0)
                if left:
                    record["schedule"] = {"invoice": document, "unit": unit, "amount": left, "start": start,
                                          "end": cut}
                new = left + included
            elif new - included:
                record["schedule"] = {"invoice": document, "unit": unit, "amount": new - included, "start": start,
                                      "end": end}
                if deferred.get("pending"):
                    record["schedule"]["pending"] = True
            if included:
                # The plan's recurring credit in this currency the fee includes: its grant took that share from
                # DEFERRED_REVENUE into the wallet (earned as it is used, breakage if it lapses), so it is credited
                # there with the rest but not recognised ratably (never recognised twice).
                record["included"] = {"invoice": document, "amount": included}
        if pending is not None:
            # The credit's debit of DEFERRED_REVENUE is cleared: what the fee had beyond it is revenue (now, or by
            # the schedule above), what it had less (a credit above the fee billed) comes from RECOGNISED_REVENUE.
            new += pending["amount"]
            record["settled"] = {"invoice": document, "amount": pending["amount"]}
        if new:
            lines.append(posting(LedgerAccount.DEFERRED_REVENUE, unit, -new, gid))
        out = recognised_now = 0
        if credits:
            corrected, amount, close = credits.get("invoice"), credits.get("amount"), credits.get("close")
            _require_text("credited invoice", corrected)
            _require_amount("credited amount", amount, allow_zero=True)
            if not isinstance(close, bool):
                raise InvalidArgument(f"close must be true or false, not {close!r}")
            schedule = self._fee_schedules.get(corrected)
            if schedule is not None and schedule["unit"] == unit:
                taken = min(amount, schedule["deferred"])
                recognised_now = schedule["deferred"] - taken if close else 0
                restored = credits.get("restored")
                if (recognised_now and restored is not None and not schedule.get("pending")
                        and restored not in self._fee_schedules):
                    # A change's invoice voided: the fee of the invoice whose unused time it credited is owed again
                    # (``restored``), for service still to come; what the voided schedule defers beyond its net is
                    # that fee's rest, recognised over the rest of the period on that invoice's schedule, not now.
                    record["moved"] = {"invoice": restored, "unit": unit, "amount": recognised_now,
                                       "start": schedule["recognised_to"], "end": schedule["end"]}
                    recognised_now = 0
                out = taken + recognised_now
                if out:
                    lines.append(posting(LedgerAccount.DEFERRED_REVENUE, unit, out, gid))
                if out or close:
                    record["reversal"] = {"invoice": corrected, "taken": taken, "recognised": recognised_now,
                                          "close": close}
            elif credits.get("draft") and amount and corrected not in self._invoice_billed:
                cut = credits.get("end")
                _require_time("credit end", cut)
                held = self._pending_fee_credits.get(corrected)
                if held is not None and held["unit"] != unit:
                    raise InvalidUnit(f"credit in {unit} of invoice {corrected} in {held['unit']}")
                out = amount
                lines.append(posting(LedgerAccount.DEFERRED_REVENUE, unit, out, gid))
                record["pending_credit"] = {"invoice": corrected, "unit": unit, "amount": amount, "end": cut}
            back = credits.get("included", 0)
            _require_amount("included credit given back", back, allow_zero=True)
            if back:
                # The included recurring credit the change or cancel took out of the wallet back into DEFERRED_REVENUE
                # (voided, less what its new grants carry): it leaves DEFERRED_REVENUE with the credit, so what the
                # corrected invoice's included share left there ends at zero.
                out += back
                lines.append(posting(LedgerAccount.DEFERRED_REVENUE, unit, back, gid))
                record["included_back"] = {"invoice": corrected, "amount": back}
        # Revenue accounts together are credited ``revenue``: -new + out on DEFERRED_REVENUE, the rest here.
        to_recognised = new - out - revenue
        if to_recognised:
            lines.append(posting(LedgerAccount.RECOGNISED_REVENUE, unit, to_recognised, gid))
        return lines, (record or None)

    def _apply_fee_revenue(self, revenue: dict[str, Any] | None) -> None:
        if not revenue:
            return
        reversal = revenue.get("reversal")
        if reversal is not None:
            schedule = self._fee_schedules.get(reversal["invoice"])
            if schedule is not None:
                schedule["deferred"] -= reversal["taken"] + reversal["recognised"]
                if reversal["close"] or schedule["deferred"] <= 0:
                    del self._fee_schedules[reversal["invoice"]]
        moved = revenue.get("moved")
        if moved is not None:  # recorded since session 11 (a void of a change's invoice)
            self._fee_schedules[moved["invoice"]] = {
                "unit": moved["unit"], "amount": moved["amount"], "deferred": moved["amount"], "start": moved["start"],
                "end": moved["end"], "recognised_to": moved["start"], "pending": False}
        credit = revenue.get("pending_credit")
        if credit is not None:
            held = self._pending_fee_credits.get(credit["invoice"])
            self._pending_fee_credits[credit["invoice"]] = {
                "unit": credit["unit"], "amount": credit["amount"] + (held["amount"] if held else 0),
                "end": min(credit["end"], held["end"]) if held else credit["end"]}
        settled = revenue.get("settled")
        if settled is not None:
            self._pending_fee_credits.pop(settled["invoice"], None)
        new = revenue.get("schedule")
        if new is not None:
            self._fee_schedules[new["invoice"]] = {
                "unit": new["unit"], "amount": new["amount"], "deferred": new["amount"], "start": new["start"],
                "end": new["end"], "recognised_to": new["start"], "pending": bool(new.get("pending"))}

    def start_fee_schedule(self, *, invoice: str, start: datetime, end: datetime, at: datetime,
                           included: int = 0) -> None:
        """The service a pending schedule's fee pays for begins (``charge_before_access``: the first invoice is
        paid, the first period starts then): it is recognised over [start, end) from now on
        (``FeeScheduleStarted``, no postings). ``included``: the plan's recurring credit in the currency granted
        now for that period, funded from the fee's DEFERRED_REVENUE: that share leaves the schedule (earned as the
        credit is used), as a fee billed with its grant defers it (``_fee_revenue``). Nothing recorded when
        ``invoice`` has no pending schedule (billed before fees were deferred, or voided)."""
        _require_time("start", start)
        _require_time("end", end)
        _require_time("at", at)
        _require_amount("included", included, allow_zero=True)
        if end <= start:
            raise InvalidTime(f"the service period of {invoice} ends ({end}) before it starts ({start})")
        schedule = self._fee_schedules.get(invoice)
        if schedule is None or not schedule.get("pending"):
            return
        self._fee_schedule_started(invoice=invoice, start=start, end=end, at=at,
                                   **({"included": min(included, schedule["deferred"])} if included else {}))

    @event("FeeScheduleStarted")
    def _fee_schedule_started(self, invoice: str, start: datetime, end: datetime, at: datetime,
                              included: int = 0) -> None:
        # ``included`` recorded since session 9 (earlier events: none, the whole fee recognised ratably).
        schedule = self._fee_schedules[invoice]
        schedule.update(start=start, end=end, recognised_to=start, pending=False,
                        amount=schedule["amount"] - included, deferred=schedule["deferred"] - included)
        if schedule["deferred"] <= 0:
            del self._fee_schedules[invoice]

    def fee_revenue_days_due(self, now: datetime) -> int:
        """Whether the sweeper should run :meth:`recognise_fee_revenue` at ``now`` (cheap: no postings), as the number
        of ``FeeRevenueRecognised`` it would record at most (a UTC day each, at most ``FEE_RECOGNITION_DAYS_PER_RUN_MAX``;
        0: nothing due). Due when a schedule has revenue to recognise up to its cut (:func:`_fee_cut`: the start of
        ``now``'s UTC day, or its end once reached): at the first sweep of a day (the day before's share) and at
        each period's end, so at most one run a day per account besides period ends."""
        due = [(schedule["recognised_to"], cut) for schedule in self._fee_schedules.values()
               if _fee_due(schedule, cut := _fee_cut(schedule, now))]
        if not due:
            return 0
        first = _next_utc_midnight(min(since for since, _ in due)) - timedelta(days=1)
        days = -(-(max(cut for _, cut in due) - first) // timedelta(days=1))
        return min(days, FEE_RECOGNITION_DAYS_PER_RUN_MAX)

    def recognise_fee_revenue(self, now: datetime) -> None:
        """Recognises the subscription fees billed in advance ratably over their service period, up to ``now``'s
        UTC day: each whole UTC day's share once the day is over, dated in that day.

        Per schedule, up to its cut (:func:`_fee_cut`: the start of ``now``'s UTC day, its end once ``now`` reaches
        it), one UTC day at a time: of what it still defers (``deferred``) from the time it was last recognised to
        (``recognised_to``, first its period's start) to its end, ``deferred x elapsed // remaining`` in whole seconds
        (rounded down), and all that is left at its end, so the last share is exactly what was billed less what was
        given back. One ``FeeRevenueRecognised`` per UTC day with something due (none if nothing is, so a second run
        the same day records nothing), dated the last microsecond of the time it recognises (``at``; each schedule's
        ``to`` the time it is recognised to): Dr DEFERRED_REVENUE / Cr RECOGNISED_REVENUE, per invoice. So a day's
        share is in that day's (and month's) books, though the run that records it comes after the day: October's
        31st is recognised by the first sweep of Nov 1, dated Oct 31 23:59:59.999999. A run behind by more than
        ``FEE_RECOGNITION_DAYS_PER_RUN_MAX`` days records that many and leaves the rest to the next one (still due).

        Until session 15 a run recognised up to ``now`` and was dated then: the first sweep of a day recognised the day
        before in the new day, and a month's last day in the next month. Those events keep their date and meaning
        (no ``to``: recognised to their ``at``); a schedule recognised by them goes on from there.
        """
        _require_time("now", now)
        cuts = {invoice: _fee_cut(schedule, now) for invoice, schedule in self._fee_schedules.items()}
        schedules = {invoice: cut for invoice, cut in cuts.items() if _fee_due(self._fee_schedules[invoice], cut)}
        if not schedules:
            return
        day_end = _next_utc_midnight(min(self._fee_schedules[i]["recognised_to"] for i in schedules))
        last = max(schedules.values())
        recorded = 0
        while recorded < FEE_RECOGNITION_DAYS_PER_RUN_MAX:
            changes: list[dict[str, Any]] = []
            postings: list[Posting] = []
            for invoice, cut in schedules.items():
                schedule = self._fee_schedules.get(invoice)
                to = min(cut, day_end)
                if schedule is None or to <= schedule["recognised_to"]:
                    continue
                # Rounded down by day, a share below a sub-unit waits: the next day recognises it with its own.
                amount = _fee_due(schedule, to)
                if not amount:
                    continue
                changes.append({"invoice": invoice, "amount": amount, "to": to})
                postings += [posting(LedgerAccount.DEFERRED_REVENUE, schedule["unit"], amount),
                             posting(LedgerAccount.RECOGNISED_REVENUE, schedule["unit"], -amount)]
            if changes:
                assert_balanced(postings)
                self._fee_revenue_recognised(
                    unit=self.currency, amount=sum(c["amount"] for c in changes), schedules=changes,
                    postings=postings, at=max(c["to"] for c in changes) - _LAST_MICROSECOND)
                recorded += 1
            if day_end >= last:
                return
            day_end += timedelta(days=1)

    @event("FeeRevenueRecognised")
    def _fee_revenue_recognised(self, unit: str, amount: int, schedules: list[dict[str, Any]],
                                postings: list[Posting], at: datetime) -> None:
        for change in schedules:
            schedule = self._fee_schedules[change["invoice"]]
            schedule["deferred"] -= change["amount"]
            # ``to`` recorded since session 15 (the run's ``at`` is then inside the day it recognises); before, the
            # run was dated at the time it recognised to.
            schedule["recognised_to"] = change.get("to", at)
            if schedule["deferred"] <= 0:
                del self._fee_schedules[change["invoice"]]

    def repay_overage(self, *, grant_id: UUID, at: datetime, cause: dict[str, Any],
                      period: tuple[datetime, datetime] | None = None, since: datetime | None = None,
                      thresholds: bool = True) -> int:
        """New credit pays off the overage of its unit that no invoice bills (a pay-as-you-go account's negative
        balance): Dr TENANT_WALLET (that grant) / Cr RECEIVABLES, oldest period first, at most what the grant
        holds. Returns the sub-units repaid. Revenue was recognised when the usage was posted; this only
        settles the receivable, with credit instead of a payment.

        ``period`` (start, end): only the overage of periods that began in [start, end), the grant usable as of
        its own start (a period's recurring grant issued late pays the usage of that period posted before it).
        A grant for some meters only (``scope``) repays only the overage those meters posted
        (``unbilled_overage_meters``; overage of no known meter it never repays), and the event records which
        (``meters``). ``since`` (with ``period``): only what usage at or after it posted (``overage_since``): the
        credit of a change or resume given an earlier ``at`` than usage already posted beyond credit pays what it
        would have covered on time, not the usage before it. ``thresholds`` False: the caller checks the unit's
        alerts once its command's movements are done."""
        g = self._grant(grant_id)
        unit = g["unit"]
        scope = g["scope"]
        usable_at = at if period is None else g["effective_at"]
        if g["status"] != "open" or not _is_eligible(g, None if scope is None else scope[0], usable_at):
            return 0  # not yet (or no longer) usable
        by_meter = self._unbilled_meters.get(unit, {})
        owed: list[tuple[datetime, str, int]] = []
        for key, amount in self._unbilled.get(unit, {}).items():
            if amount <= 0 or (period is not None and not period[0] <= period_began(key) < period[1]):
                continue
            if since is not None:
                amount = self.overage_since(unit, key, since)
            if scope is not None:  # only what the meters it pays for posted
                amount = min(amount, sum(part for meter, part in by_meter.get(key, {}).items() if meter in scope))
            if amount > 0:
                owed.append((period_began(key), key, amount))
        owed.sort()
        # Credit set aside for its period's late usage is no hold's: all of it can repay that period's overage.
        room = g["remaining"] if g["set_aside"] else min(g["remaining"], self.available(unit))
        left = min(room, self.overage_receivable(unit), sum(a for _, _, a in owed))
        if left <= 0:
            return 0
        periods: dict[str, int] = {}
        meters: dict[str, dict[str, int]] = {}
        for _, key, amount in owed:
            if left == 0:
                break
            part = min(left, amount)
            periods[key] = part
            left -= part
            if scope is not None:
                meters[key] = _take_meters(by_meter.get(key, {}), scope, part)
        total = sum(periods.values())
        gid = str(grant_id)
        postings = [posting(LedgerAccount.TENANT_WALLET, unit, total, gid),
                    posting(LedgerAccount.RECEIVABLES, unit, -total)]
        assert_balanced(postings)
        self._overage_repaid(grant_id=gid, unit=unit, amount=total, periods=periods, postings=postings,
                             cause=dict(cause), at=at, remembered=True, **({"meters": meters} if meters else {}),
                             **({"since": since} if since is not None else {}))
        if thresholds:
            self._check_thresholds(unit, at)
        return total

    @event("OverageRepaid")
    def _overage_repaid(self, grant_id: str, unit: str, amount: int, periods: dict[str, int],
                        postings: list[Posting], cause: dict[str, Any], at: datetime, remembered: bool = False,
                        meters: dict[str, dict[str, int]] | None = None, since: datetime | None = None) -> None:
        # ``remembered``: the draw is remembered as a debit's is, so a give-back of the usage it paid returns it to
        # that grant (recorded since session 8; earlier events replay as they were: not remembered). ``meters``:
        # period key -> meter -> sub-units, what a grant for some meters repaid of each meter's overage (since
        # session 9; without it, as before: the overage of no known meter first, ``_fit_meter_overage``).
        self._apply_draws(unit, [{"grant_id": grant_id, "amount": amount}], remember=remembered)
        self._receivable[unit] = self._receivable.get(unit, 0) - amount
        # ``since`` (recorded since session 11): it repaid the overage usage at or after that time posted.
        for key, part in periods.items():
            _add_unbilled(self._unbilled, unit, key, -part)
            _fit_meter_overage(self._unbilled_meters, self._unbilled, unit, key, (meters or {}).get(key))
            if since is not None:
                _take_overage_times(self._overage_times, unit, key, since, part)
        _forget_overage_times(self._overage_times, self._unbilled, unit)
        # Owed usage of a usage_reversal credit it repays is paid by this grant now (its draw is remembered): the
        # credit's draws for it are forgotten, so a give-back of that usage returns it here, once (since session 12).
        self._clear_owed_usage(unit, periods)
        self._update_arming(unit)

    # == low balance and auto top-up =========================================================================

    def set_low_balance_threshold(self, unit: str, threshold: int | None) -> None:
        """Alerts once when ``available`` drops below ``threshold``; ``None`` removes the alert."""
        self._require_unit(unit)
        if threshold is not None:
            _require_amount("threshold", threshold, allow_zero=True)
        self._low_balance_threshold_set(unit=unit, threshold=threshold)

    @event("LowBalanceThresholdSet")
    def _low_balance_threshold_set(self, unit: str, threshold: int | None) -> None:
        if threshold is None:
            self._low_balance.pop(unit, None)
        else:
            self._low_balance[unit] = {"threshold": threshold, "armed": self.available(unit) >= threshold}

    @event("LowBalanceReached")
    def _low_balance_reached(self, unit: str, threshold: int, available: int, at: datetime) -> None:
        self._low_balance[unit]["armed"] = False

    def set_auto_top_up(
        self,
        unit: str,
        threshold: int,
        target: int | None,
        package_code: str | None,
        cooldown_seconds: int,
        monthly_cap: int,
        *,
        package_amount: int | None = None,
    ) -> None:
        """Requests a top-up when ``available`` drops below ``threshold``: to ``target``, or one package.

        Exactly one of ``target`` / ``package_code``; a package needs ``package_amount`` (its credit in
        sub-units of ``unit``) so the monthly cap can be enforced. ``monthly_cap`` bounds the requested
        amounts per calendar month (UTC).
        """
        self._require_unit(unit)
        _require_amount("threshold", threshold, allow_zero=True)
        if (target is None) == (package_code is None):
            raise InvalidArgument("give exactly one of target or package_code")
        if target is not None:
            _require_amount("target", target)
            if target <= threshold:
                raise InvalidArgument("target must be above threshold")
            if package_amount is not None:
                raise InvalidArgument("package_amount only goes with package_code")
        else:
            _require_text("package_code", package_code)
            if package_amount is None:
                raise InvalidArgument("a package top-up needs package_amount")
            _require_amount("package_amount", package_amount)
        if type(cooldown_seconds) is not int or not 0 <= cooldown_seconds <= AUTO_TOP_UP_COOLDOWN_SECONDS_MAX:
            raise InvalidArgument(
                f"cooldown_seconds must be a whole number of seconds in [0, {AUTO_TOP_UP_COOLDOWN_SECONDS_MAX}], "
                f"not {cooldown_seconds!r}"
            )
        _require_amount("monthly_cap", monthly_cap)
        self._auto_top_up_set(
            unit=unit,
            threshold=threshold,
            target=target,
            package_code=package_code,
            package_amount=package_amount,
            cooldown_seconds=cooldown_seconds,
            monthly_cap=monthly_cap,
        )

    @event("AutoTopUpRuleSet")
    def _auto_top_up_set(
        self,
        unit: str,
        threshold: int,
        target: int | None,
        package_code: str | None,
        package_amount: int | None,
        cooldown_seconds: int,
        monthly_cap: int,
    ) -> None:
        self._auto_top_up[unit] = {
            "threshold": threshold,
            "target": target,
            "package_code": package_code,
            "package_amount": package_amount,
            "cooldown_seconds": cooldown_seconds,
            "monthly_cap": monthly_cap,
            "armed": self.available(unit) >= threshold,
        }

    def clear_auto_top_up(self, unit: str) -> None:
        if unit not in self._auto_top_up:
            return
        self._auto_top_up_cleared(unit=unit)

    @event("AutoTopUpRuleCleared")
    def _auto_top_up_cleared(self, unit: str) -> None:
        del self._auto_top_up[unit]

    @event("AutoTopUpRequested")
    def _auto_top_up_requested(
        self, request_id: UUID, unit: str, amount: int, package_code: str | None, available: int, at: datetime
    ) -> None:
        self._auto_top_up[unit]["armed"] = False
        history = self._top_up_history.setdefault(
            unit, {"count": 0, "last_at": None, "month": "", "month_total": 0}
        )
        month = _month(at)
        if history["month"] != month:
            history["month"], history["month_total"] = month, 0
        history["month_total"] += amount
        history["count"] += 1
        history["last_at"] = at

    def _check_thresholds(self, unit: str, at: datetime, *, top_up: bool = True) -> None:
        """Records the edge-triggered alerts a movement just caused (called after every movement); ``top_up``
        False: no auto-top-up request (a refund)."""
        alert = self._low_balance.get(unit)
        rule = self._auto_top_up.get(unit)
        if alert is None and rule is None:
            return  # nothing to check: ``available`` (a sum over the unit's grants) is not needed
        available = self.available(unit)
        if alert is not None and alert["armed"] and available < alert["threshold"]:
            self._low_balance_reached(unit=unit, threshold=alert["threshold"], available=available, at=at)
        if rule is None or not rule["armed"] or available >= rule["threshold"] or not top_up:
            return
        amount = rule["package_amount"] if rule["package_code"] is not None else _top_up_to_target(
            unit, rule["target"], rule["threshold"], available)
        history = self._top_up_history.get(unit, {"count": 0, "last_at": None, "month": "", "month_total": 0})
        if history["last_at"] is not None and at - history["last_at"] < timedelta(
            seconds=rule["cooldown_seconds"]
        ):
            return  # still cooling down: stays armed
        month_total = history["month_total"] if history["month"] == _month(at) else 0
        if month_total + amount > rule["monthly_cap"]:
            return  # over the month's cap: stays armed
        request_id = uuid5(NAMESPACE_URL, f"/accounts/{self.tenant}/auto-top-up/{unit}/{history['count']}")
        self._auto_top_up_requested(
            request_id=request_id,
            unit=unit,
            amount=amount,
            package_code=rule["package_code"],
            available=available,
            at=at,
        )

    # == internals (pure helpers shared by commands and event application) ===================================

    def _require_document(self, unit: str, kind: str, document: str, net: int, tax: int, at: datetime) -> None:
        """The arguments of a subscription document's posting (an invoice billed, a credit note): ``net`` and
        ``tax`` may be negative (a credit at another tax rate than a new charge); the caller checks the total."""
        self._require_unit(unit)
        _require_text(kind, document)
        _require_amount("net", net, allow_zero=True, allow_negative=True)
        _require_amount("tax", tax, allow_zero=True, allow_negative=True)
        _require_time("at", at)

    def _require_unit(self, unit: str) -> None:
        if not isinstance(unit, str):
            raise InvalidUnit("unit must be a string")
        if is_currency_code(unit):
            if unit != self.currency:
                raise UnitMismatch(f"account {self.tenant} is in {self.currency}, not {unit}")
            return
        try:
            credit_unit(unit)
        except MoneyError as exc:
            raise InvalidUnit(str(exc)) from exc

    def _grant(self, grant_id: UUID) -> GrantRecord:
        try:
            return self._grants[str(grant_id)]
        except KeyError:
            raise UnknownGrant(f"no grant {grant_id}") from None

    def _active_hold(self, hold_id: UUID) -> HoldRecord:
        h = self._holds.get(str(hold_id))
        if h is not None:
            return h
        settled = self._settled_holds.get(str(hold_id))
        if settled is not None:
            if settled["status"] == "captured":  # what it spent, so the caller can tell it from its own attempt
                raise HoldAlreadySettled(f"hold {hold_id} is already captured "
                                         f"({_money(settled.get('captured', 0), settled['unit'])})")
            raise HoldAlreadySettled(f"hold {hold_id} is {settled['status']}")
        raise UnknownHold(f"no hold {hold_id}")

    def _settle_hold(self, hold_id: str, status: str, *, captured: int = 0) -> None:
        h = self._holds.pop(hold_id)
        self._held[h["unit"]] -= h["amount"]
        self._remember_settled_hold(dict(h, status=status, captured=captured))

    def _remember_settled_hold(self, record: HoldRecord) -> None:
        self._settled_holds[record["hold_id"]] = record
        while len(self._settled_holds) > SETTLED_HOLDS_KEPT_MAX:
            del self._settled_holds[next(iter(self._settled_holds))]

    def _eligible_grants(self, unit: str, meter: str | None, at: datetime) -> list[GrantRecord]:
        """Grants a debit for ``meter`` at ``at`` may draw from, in drawdown order. A grant kept for late usage with a
        successor (``carry``) is followed by what of its successor that usage may draw (``_carried_parts``): entries
        naming the successor, ``remaining`` at most the carry left, ``carry_of`` the grants whose carry they use."""
        found, carrying = [], []
        for g in self._grants.values():
            if g["unit"] != unit:
                continue
            if _is_eligible(g, meter, at):
                found.append(g)
            if g["carry"] is not None and _is_eligible(g, meter, at, need_remaining=False):
                carrying.append(g)
        found.sort(key=_drawdown_key)
        if carrying:
            found = self._with_carried_parts(found, carrying, meter)
        return found

    def _with_carried_parts(self, found: list[GrantRecord], carrying: list[GrantRecord], meter: str | None
                            ) -> list[GrantRecord]:
        """``found`` with each carrying grant's ``_carried_parts`` right after where it sorts (its rest first, then the
        carry: on time the usage would have come out of the part that lapses before the part carried). One successor
        shared by several carrying grants gives each at most what the ones before left of it."""
        taken: dict[str, int] = {}
        entries = [(_drawdown_key(g), 0, g) for g in found]
        for g in carrying:
            for hop, part in enumerate(self._carried_parts(g, meter, taken), start=1):
                entries.append((_drawdown_key(g), hop, part))
        entries.sort(key=lambda e: (e[0], e[1]))
        return [g for _, _, g in entries]

    def _carried_parts(self, g: GrantRecord, meter: str | None, taken: dict[str, int]) -> list[GrantRecord]:
        """What late usage of ``g``'s period may draw of what ``g`` carried into its successor, and on through the
        successor's own carry (a chain: a monthly period's usage may come after the next renewal too), each part at
        most the carry left along the way and the successor's credit not ``taken`` by an earlier part."""
        parts: list[GrantRecord] = []
        link, via = g["carry"], [g["grant_id"]]
        reserve = min(link.get("reserve", 0), link["left"])
        left = held = link["left"] - reserve
        for _ in range(CARRY_CHAIN_MAX):
            successor = self._grants.get(link["to"])
            if successor is None or successor["status"] != "open" or not _in_scope(successor, meter) or left <= 0:
                break
            gid = successor["grant_id"]
            part = min(left, successor["remaining"] - taken.get(gid, 0))
            if part > 0:
                taken[gid] = taken.get(gid, 0) + part
                parts.append({"grant_id": gid, "remaining": part, "set_aside": successor["set_aside"],
                              "carry_of": list(via)})
                left -= part
            link = successor["carry"]
            if link is None:
                break
            left, via = min(left, link["left"]), [*via, gid]
        if reserve and sum(part["remaining"] for part in parts) == held:
            # The successor's part all drawable by this usage: then the old allowance it does not hold (since session
            # 15), reinstated into ``g`` as the usage draws it (``_plan_draws``, ``_apply_draws``).
            parts.append({"grant_id": g["grant_id"], "remaining": reserve, "set_aside": True,
                          "reinstate": reserve, "from": g["carry"]["from"]})
        return parts

    def _plan_draws(self, unit: str, meter: str | None, at: datetime, amount: int, available: int, *,
                    eligible: list[GrantRecord] | None = None) -> list[Draw]:
        """Draws of ``amount`` (at most ``_spendable(eligible, available)``) in drawdown order, taking at most
        ``available`` of credit not set aside (holds reserve the rest; credit set aside, usage of its ended period,
        in full); ``eligible``: ``_eligible_grants(unit, meter, at)`` already looked up (the state unchanged since)."""
        draws: list[Draw] = []
        left, kept_left = amount, max(0, available)
        for g in self._eligible_grants(unit, meter, at) if eligible is None else eligible:
            if left == 0:
                break
            part = min(left, g["remaining"] if g["set_aside"] else min(g["remaining"], kept_left))
            if part == 0:
                continue
            if not g["set_aside"]:
                kept_left -= part
            draw: Draw = {"grant_id": g["grant_id"], "amount": part}
            if g.get("carry_of"):  # a successor's credit through these grants' carry (``_carried_parts``)
                draw["carry_of"] = g["carry_of"]
            if g.get("reinstate"):  # a kept grant's old allowance, reinstated whole (``_carried_parts``)
                draw.update(reinstated=g["reinstate"], reinstated_from=g["from"])
            draws.append(draw)
            left -= part
        assert left == 0, "callers never plan more than the spendable credit"
        return draws

    def _add_grant(self, record: GrantRecord) -> None:
        self._grants[record["grant_id"]] = dict(
            record,
            remaining=record["amount"],
            status="open",
            seq=len(self._grants),
            refunded=0,
            refunded_tax=0,
            breakage=0,
            breakage_reversed=0,
            # What each refund took out of clearing (``money_paid_back``, format 11), with its refund and dispute (28).
            refunds_paid_back=[],
            reversed=0,  # its usage given back after it lapsed, as ``usage_reversal`` credit; format 15
            adjusted=0,  # credit negative adjustments took from it (to MANUAL_ADJUSTMENT); format 16
            adjusted_reversed=0,  # of it, paid back by override refunds (from MANUAL_ADJUSTMENT); format 16
            drawable_until=record.get("drawable_until"),  # usage from then on does not draw it; format 14
            late_usage=bool(record.get("late_usage")),  # open after drawable_until for late usage only; format 22
            set_aside=False,  # past drawable_until, out of ``available`` (``GrantSetAside``); format 22
            # Kept for late usage (``GrantKeptForLateUsage``, format 25): what left it for a next grant, and the link to
            # that grant with what late usage may still draw of it ({"to", "left"}).
            moved=0,
            carry=None,
            # What late usage of the period before drew of this grant through a carry into it (``carry_of`` draws, net
            # of give-backs; format 28): the carry it no longer holds, shown apart from ``amount``.
            carry_drawn=0,
        )

    def _apply_draws(self, unit: str, draws: Iterable[Draw], *, remember: bool) -> None:
        for draw in draws:
            gid, amount = draw["grant_id"], draw["amount"]
            reinstated = draw.get("reinstated")
            if reinstated:  # since session 15: the old allowance a change moved out comes back for late usage of it
                g = self._grants[gid]
                g["remaining"] += reinstated
                g["moved"] -= reinstated
                g["carry"] = None
            self._grants[gid]["remaining"] -= amount
            carry_of = draw.get("carry_of")
            if carry_of:  # since session 14: late usage drawing a carry (counted on the grant drawn since session 15)
                self._grants[gid]["carry_drawn"] += amount
                for carrier in carry_of:
                    self._grants[carrier]["carry"]["left"] -= amount
            if not remember:
                continue
            stack = self._recent_draws.setdefault(unit, [])
            # A draw through a carry is remembered apart, with its carriers.
            if amount > 0:
                if stack and stack[-1]["grant_id"] == gid and stack[-1].get("carry_of") == carry_of:
                    stack[-1]["amount"] += amount
                else:
                    stack.append({"grant_id": gid, "amount": amount, **({"carry_of": carry_of} if carry_of else {})})
                    if len(stack) > DRAW_HISTORY_MAX:
                        del stack[0]
            elif "carry_of" in draw or any(entry.get("carry_of") for entry in stack):
                _trim_entries(stack, gid, -amount, carry_of=carry_of)  # since session 14: the draws it gave back
            else:
                self._trim_draws(unit, gid, -amount)

    def _trim_draws(self, unit: str, grant_id: str, amount: int) -> None:
        """Takes ``amount`` off the draws of ``grant_id`` remembered for give-backs, the most recent first."""
        _trim_entries(self._recent_draws.setdefault(unit, []), grant_id, amount)

    def _owe_reclaimed(self, unit: str, reclaimed: dict[str, Any], owed: Iterable[Draw]) -> None:
        """What a gateway refund took back of credit already given (a grant's ``usage_reversal`` credit, an invoice's
        credit notes) and found spent is owed: receivable, unbilled under ``reclaimed["period"]`` (when recorded), and
        the usage that spent each credit (``owed``: [{"grant_id", "amount"}]) kept as owed usage (``_owed_usage``)."""
        if not reclaimed["receivable"]:
            return
        self._receivable[unit] = self._receivable.get(unit, 0) + reclaimed["receivable"]
        key = reclaimed.get("period")
        if type(key) is not str:
            return
        _add_unbilled(self._unbilled, unit, key, reclaimed["receivable"])
        for part in owed:
            self._add_owed_usage(unit, part["grant_id"], part["amount"], key=key)

    def _owed_credit_parts(self, unit: str, credits: list[str], amount: int) -> list[Draw]:
        """Which of the credit notes ``credits`` (grant ids, in that order) the owed ``amount`` of an invoice refund
        stands for: the usage remembered as drawing each (its credit spent), less what of it is owed already. Only
        that usage can be given back against the credit, so only it needs forgetting once it is no longer owed."""
        owed: list[Draw] = []
        left = amount
        stack = self._recent_draws.get(unit, [])
        for gid in dict.fromkeys(credits):
            if not left:
                break
            drawn = sum(entry["amount"] for entry in stack if entry["grant_id"] == gid)
            drawn -= sum(entry["amount"] for entry in self._owed_usage.get(unit, ()) if entry["grant_id"] == gid)
            part = min(left, drawn)
            if part > 0:
                owed.append({"grant_id": gid, "amount": part})
                left -= part
        return owed

    def _add_owed_usage(self, unit: str, grant_id: str, amount: int, *, key: str) -> None:
        entries = self._owed_usage.setdefault(unit, [])
        entry = next((e for e in entries if e["grant_id"] == grant_id and e.get("key") == key), None)
        if entry is None:
            entries.append({"grant_id": grant_id, "amount": amount, "key": key})
            if len(entries) > OWED_USAGE_KEPT_MAX:
                del entries[0]
        else:
            entry["amount"] += amount

    def _clear_owed_usage(self, unit: str, reduced: dict[str, int]) -> None:
        """Unbilled overage of these period keys (key -> sub-units) left receivables without an invoice (a give-back,
        credit bought): as far as it is owed usage of a usage_reversal credit (``_owed_usage``), that usage no longer
        drew the credit, so its draws are forgotten and no later give-back credits it to the credit again."""
        entries = self._owed_usage.get(unit)
        if not entries:
            return
        for part in _owed_cleared(entries, reduced):
            _trim_entries(entries, part["grant_id"], part["amount"], key=part["key"])
            self._trim_draws(unit, part["grant_id"], part["amount"])
        if not entries:
            del self._owed_usage[unit]

    def _forget_draws_of(self, unit: str, grant_id: str) -> None:
        stack = self._recent_draws.get(unit)
        if stack:
            stack[:] = [entry for entry in stack if entry["grant_id"] != grant_id]

    def _update_arming(self, unit: str) -> None:
        """Re-arms the unit's alerts once ``available`` is back at or above their thresholds (derived)."""
        alert = self._low_balance.get(unit)
        rule = self._auto_top_up.get(unit)
        if alert is None and rule is None:
            return  # no alert to arm: ``available`` (a sum over the unit's grants) is not needed
        available = self.available(unit)
        if alert is not None and available >= alert["threshold"]:
            alert["armed"] = True
        if rule is not None and available >= rule["threshold"]:
            rule["armed"] = True


_CALLER_SOURCES = frozenset(s.value for s in GrantSource) - {GrantSource.USAGE_REVERSAL.value,
                                                              GrantSource.CREDIT_NOTE.value}
# What ``purchase_money`` shows of a grant's money (its booking and refunds).
_MONEY_KEYS = ("unit", "net", "tax", "refunded_net", "refunded_tax")


def _money_targets(
    g: GrantRecord,
    *,
    refunded: int | None = None,
    refunded_net: int | None = None,
    remaining: int | None = None,
    breakage_reversed: int | None = None,
    adjusted_reversed: int | None = None,
) -> tuple[int, int, bool]:
    """(recognised, breakage, closed): where the net money of ``g`` (a grant with booked money) stands for
    its credit as it is (or as given: the state after a refund being decided). See the module docstring."""
    money = g["money"]
    amount, net = g["amount"], money["net"]
    refunded = g["refunded"] if refunded is None else refunded
    refunded_net = money["refunded_net"] if refunded_net is None else refunded_net
    remaining = g["remaining"] if remaining is None else remaining
    reversed_ = g["breakage_reversed"] if breakage_reversed is None else breakage_reversed
    adjusted_reversed = g["adjusted_reversed"] if adjusted_reversed is None else adjusted_reversed
    room = amount - refunded
    lapsed = g["breakage"] - reversed_ + money["adjusted"] - adjusted_reversed
    # Clamped: a give-back recorded before session 9 could credit a grant already refunded from revenue beyond what
    # is not refunded (``_give_back_room`` caps it since), and a negative adjustment is not spent credit.
    consumed = min(max(amount - remaining - lapsed - refunded, 0), room)
    lapsed = min(max(lapsed, 0), room - consumed)
    recognised = net * consumed // amount
    breakage = net * (consumed + lapsed) // amount - recognised
    closed = consumed + lapsed == room
    if closed:  # nothing left to defer: the rounding rest (0 or 1 sub-unit) goes with the last use
        rest = net - refunded_net - recognised - breakage
        if lapsed:
            breakage += rest
        else:
            recognised += rest
    return recognised, breakage, closed


def _overage_key(cause: dict[str, Any], at: datetime) -> str:
    """The unbilled overage period a debit's overage (or a give-back's reduction) is kept under: rating's
    ``cause.period``, else the time it was posted."""
    period = cause.get("period")
    return period if type(period) is str and period else at.isoformat()


def _trim_entries(entries: list[dict[str, Any]], grant_id: str, amount: int, *, key: str | None = None,
                  carry_of: Any = ...) -> None:
    """Takes ``amount`` off the entries of ``grant_id`` (and of period ``key``, when given; and drawn through exactly
    the carry ``carry_of``, when given: None for draws not through one), the most recent first; entries left empty
    are dropped."""
    left = amount
    for index in range(len(entries) - 1, -1, -1):
        if left == 0:
            break
        entry = entries[index]
        if entry["grant_id"] != grant_id or (key is not None and entry.get("key") != key) \
                or (carry_of is not ... and entry.get("carry_of") != carry_of):
            continue
        back = min(left, entry["amount"])
        entry["amount"] -= back
        left -= back
    entries[:] = [entry for entry in entries if entry["amount"] > 0]


def _owed_cleared(entries: list[dict[str, Any]], reduced: dict[str, int]) -> list[dict[str, Any]]:
    """Of the owed usage ``entries`` (``_owed_usage``), what the unbilled overage ``reduced`` (period key ->
    sub-units) clears: [{"grant_id", "key", "amount"}], the newest entry of each key first. The overage of a key
    reduced counts as its owed usage first (a refund's owed excess of an invoice may share the key)."""
    cleared: list[dict[str, Any]] = []
    for key, amount in reduced.items():
        left = amount
        for entry in reversed(entries):
            if left <= 0:
                break
            if entry.get("key") != key:
                continue
            part = min(left, entry["amount"])
            if part > 0:
                cleared.append({"grant_id": entry["grant_id"], "key": key, "amount": part})
                left -= part
    return cleared


def _give_back_room(g: GrantRecord) -> int:
    """What a usage give-back may credit back to ``g``: its credit spent and not paid back by a refund nor given
    back already, ``amount - remaining - refunded - lapsed - reversed`` (lapsed: breakage and credit removed by
    negative adjustments, not refunded; reversed: given back after the grant lapsed, as ``usage_reversal`` credit), so
    ``remaining + refunded`` never exceeds ``amount``. A finance override refunds spent credit from revenue: that
    usage is paid back in money already, and its give-back is absorbed, not credited to the grant a second time."""
    lapsed = g["breakage"] - g["breakage_reversed"] + g["adjusted"] - g["adjusted_reversed"]
    return max(0, g["amount"] - g["remaining"] - g["refunded"] - lapsed - g["reversed"] - g["moved"])


def _refundable(g: GrantRecord) -> int:
    """What of ``g``'s credit a refund may still pay back: ``amount - refunded - reversed``. Its usage given back
    after it lapsed (``reversed``) is the customer's again as ``usage_reversal`` credit, so no refund pays it back
    in money as well (a finance override would take it from revenue, where the give-back already took it)."""
    return g["amount"] - g["refunded"] - g["reversed"]


def _reversal_left(credit: GrantRecord, grant_id: str) -> int:
    """What of ``grant_id``'s usage the ``usage_reversal`` ``credit`` reversed (``reverses``) and no gateway refund
    of ``grant_id`` has taken back yet (``taken_back``, since session 12)."""
    part = sum(r["amount"] for r in credit.get("reverses") or () if r["grant_id"] == grant_id)
    return part - (credit.get("taken_back") or {}).get(grant_id, 0) if part else 0


def _has_lapsed(g: GrantRecord, at: datetime) -> bool:
    """Whether ``g`` can take no credit back at ``at``: closed (expired, voided) or past its draw end."""
    end = _draw_end(g)
    return g["status"] != "open" or (end is not None and at >= end)


def _in_scope(g: GrantRecord, meter: str | None) -> bool:
    return g["scope"] is None or (meter is not None and meter in g["scope"])


def _tax_share(g: GrantRecord, amount: int) -> int:
    """The tax paid back with ``amount`` more of ``g``'s credit (see ``refund_grant``): cumulative and floored,
    never below zero nor above the tax not yet paid back (refunds recorded before it gave back none: the next
    one catches up to the grant's share)."""
    if not g["tax_amount"]:
        return 0
    share = _refunded_share(g["tax_amount"], g["refunded"] + amount, g["amount"], g["unit"]) - g["refunded_tax"]
    return max(0, min(share, g["tax_amount"] - g["refunded_tax"]))


def _paid_back(refund_id: UUID, amount: int, cause: dict[str, Any]) -> dict[str, Any]:
    """One refund's share of a paid grant's money (``refunds_paid_back``): a lost dispute's names its dispute, the
    cause every chargeback's events carry (``payment_commands.dispute_cause``)."""
    share: dict[str, Any] = {"refund_id": str(refund_id), "amount": amount}
    if cause.get("dispute"):
        share["dispute"] = str(cause["dispute"])
    return share


def _refunded_share(booked: int, refunded: int, amount: int, unit: str) -> int:
    """What of ``booked`` (money or tax of a grant, in ``unit``) has been paid back once ``refunded`` of its
    ``amount`` credit is: ``booked * refunded / amount`` floored to the currency's minor unit (a gateway pays
    back whole cents, never 6.3327), and all of it at the last refund, so the refunds add up to exactly what
    was booked and never to more."""
    if refunded >= amount:
        return booked
    share = booked * refunded // amount
    if is_currency_code(unit):
        share -= share % minor_subunits(iso_currency(unit))
    return share


def _spendable(eligible: list[GrantRecord], available: int) -> int:
    """``BillingAccount.spendable`` of the eligible grants and the wallet's available credit: the eligible credit not
    set aside, at most ``available`` (holds reserve it), and the eligible credit set aside (usage of its ended period,
    which no hold reserves) in full. ``_plan_draws`` draws the first part at most ``available`` the same way."""
    kept = aside = 0
    for g in eligible:
        if g["set_aside"]:
            aside += g["remaining"]
        else:
            kept += g["remaining"]
    return max(0, min(kept, available)) + aside


def _is_eligible(g: GrantRecord, meter: str | None, at: datetime, *, need_remaining: bool = True) -> bool:
    if g["status"] != "open" or (need_remaining and g["remaining"] <= 0):
        return False
    if g["effective_at"] > at:
        return False
    end = _draw_end(g)
    if end is not None and at >= end:
        return False
    if g["scope"] is None:
        return True
    return meter is not None and meter in g["scope"]


def _draw_end(g: GrantRecord) -> datetime | None:
    """When usage stops drawing ``g``: its ``drawable_until`` or its ``expires_at``, the earlier; ``None``: never.
    ``grant_credit`` refuses a ``drawable_until`` after ``expires_at``, so when there is one it is the earlier."""
    drawable_until = g.get("drawable_until")
    return drawable_until if drawable_until is not None else g["expires_at"]


def _to_set_aside(g: GrantRecord, now: datetime) -> bool:
    """Whether ``g`` is open, not set aside and past its ``drawable_until`` at ``now`` (its period has ended: new usage
    can no longer draw it) without expiring by ``now`` (an expiry closes it instead)."""
    drawable_until = g.get("drawable_until")
    return (g["status"] == "open" and not g["set_aside"] and drawable_until is not None and drawable_until <= now
            and (g["expires_at"] is None or g["expires_at"] > now or _left_to_renewal(g)))


def _left_to_renewal(g: GrantRecord) -> bool:
    """Whether the expiry sweep leaves ``g`` open past its ``expires_at``: a plan's recurring credit with rollover
    (``drawable_until``, recorded since session 9). The subscription's renewal that ends its period carries it (up to
    ``rollover_cap``) and lapses the rest (``void_grant(lapsed=...)``), and a change, pause or cancel closes it the
    same way; the scheduler ticks every live subscription at each period's end, so it is always closed by one of
    them. Swept first when the tick came more than a period late, all of it lapsed and the renewal had nothing to
    carry. Usage never draws it after ``drawable_until``, so it stays open but unspent meanwhile.

    A plan credit without rollover (``late_usage``, since session 13) is not: the renewal leaves it open for its
    period's late usage and the sweep lapses it at its ``expires_at``, ``RECURRING_CREDIT_LATE_USAGE_DAYS`` after the
    period's end (``billing_ledger.limits``)."""
    return (g["source"] == GrantSource.PLAN_RECURRENCE and g.get("drawable_until") is not None
            and not g.get("late_usage"))


def _drawdown_key(g: GrantRecord) -> tuple[int, bool, datetime, int]:
    end = _draw_end(g)
    return (g["priority"], end is None, end if end is not None else _NO_EXPIRY_KEY, g["seq"])


def _money(subunits: int, unit: str) -> str:
    """An amount of sub-units as a person reads it in a refusal (``9.00 USD``), never the raw integer."""
    return f"{show(subunits, unit)} {unit}"


def _usage_postings(unit: str, draws: list[Draw], overage: int) -> list[Posting]:
    postings: list[Posting] = []
    for draw in draws:
        if draw.get("reinstated"):  # the old allowance back into its grant first (``_carried_parts``)
            postings += [posting(LedgerAccount(draw["reinstated_from"]), unit, draw["reinstated"], draw["grant_id"]),
                         posting(LedgerAccount.TENANT_WALLET, unit, -draw["reinstated"], draw["grant_id"])]
        postings += [
            posting(LedgerAccount.TENANT_WALLET, unit, draw["amount"], draw["grant_id"]),
            posting(LedgerAccount.RECOGNISED_REVENUE, unit, -draw["amount"], draw["grant_id"]),
        ]
    if overage:
        postings += [
            posting(LedgerAccount.RECEIVABLES, unit, overage),
            posting(LedgerAccount.RECOGNISED_REVENUE, unit, -overage),
        ]
    return postings


def owed_refund_key(at: datetime) -> str:
    """The overage key of what a gateway refund at ``at`` left owed (``OWED_REFUND_KEY_PREFIX``)."""
    return f"{OWED_REFUND_KEY_PREFIX}{at.isoformat()}"


def owed_chargeback_key(at: datetime) -> str:
    """The overage key of an invoice payment a dispute lost at ``at`` took back (``OWED_CHARGEBACK_KEY_PREFIX``)."""
    return f"{OWED_CHARGEBACK_KEY_PREFIX}{at.isoformat()}"


def is_owed_refund_key(key: str) -> bool:
    return key.startswith(OWED_REFUND_KEY_PREFIX)


def is_owed_chargeback_key(key: str) -> bool:
    return key.startswith(OWED_CHARGEBACK_KEY_PREFIX)


def hold_spend_key(at: datetime) -> str:
    """The ``_credit_note_spend`` key of a capture at ``at``: ``HOLD_SPEND_KEY_PREFIX`` and its month (UTC)."""
    return f"{HOLD_SPEND_KEY_PREFIX}{_month(at)}"


def spend_month(key: str) -> str | None:
    """The calendar month (``YYYY-MM``) of a ``_credit_note_spend`` key the month's credit note usage invoice bills:
    a calendar month's (usage rated by calendar month) or a capture's (``hold_spend_key``); ``None`` for any other
    (a subscription period's, billed by its invoice)."""
    month = key.removeprefix(HOLD_SPEND_KEY_PREFIX)
    if len(month) == 7 and month[4] == "-" and month[:4].isdigit() and month[5:].isdigit():
        return month
    return None


def is_owed_money_key(key: str) -> bool:
    """Owed money whose revenue and tax were booked when first billed (a refund's excess, a chargeback), not usage."""
    return is_owed_refund_key(key) or is_owed_chargeback_key(key)


def period_began(key: str) -> datetime:
    """When the period named by an overage key began: ``YYYY-MM`` (a calendar month) or an ISO 8601 time (for a
    refund's owed excess, ``owed_refund_key``, or a chargeback's, ``owed_chargeback_key``: its time). A key that is
    neither (none is accepted since ``debit_usage`` checks them) counts as the oldest period, so no event of an account
    can fail to apply over it."""
    for prefix in (OWED_REFUND_KEY_PREFIX, OWED_CHARGEBACK_KEY_PREFIX):
        key = key.removeprefix(prefix)
    try:
        return _period_start(key)
    except (TypeError, ValueError):
        return datetime.min.replace(tzinfo=UTC)


@lru_cache(maxsize=4096)
def _period_start(key: str) -> datetime:
    """``period_began`` for a well-formed key; raises ``ValueError`` otherwise. Memoized: every usage debit names
    its period (checked in ``debit_usage``), and an account's debits name the same few."""
    if len(key) == 7 and key[4] == "-":
        return datetime(int(key[:4]), int(key[5:7]), 1, tzinfo=UTC)
    began = datetime.fromisoformat(key)
    return began if began.tzinfo is not None else began.replace(tzinfo=UTC)


def _revenue_and_tax_back(counter: LedgerAccount, unit: str, amount: int, tax: int,
                          revenue_lines: list[Posting]) -> list[Posting]:
    """``amount`` billed is taken back: the revenue lines (Dr DEFERRED_REVENUE / Dr RECOGNISED_REVENUE, together
    amount - tax: ``BillingAccount._fee_revenue``) / Dr TAX_PAYABLE tax / Cr ``counter`` amount (receivables for
    an invoice voided unpaid, the gateway's clearing for money refunded)."""
    postings = [posting(counter, unit, -amount), *revenue_lines]
    if tax:
        postings.append(posting(LedgerAccount.TAX_PAYABLE, unit, tax))
    assert_balanced(postings)
    return postings


def _fee_cut(schedule: dict[str, Any], now: datetime) -> datetime:
    """The time a recognition run at ``now`` recognises a fee schedule up to: its end once ``now`` reaches it, else the
    start of ``now``'s UTC day (a day's share is recognised once the day is over, dated in it)."""
    end: datetime = schedule["end"]
    return end if now >= end else _next_utc_midnight(now) - timedelta(days=1)


def _next_utc_midnight(when: datetime) -> datetime:
    """The first UTC midnight after ``when``."""
    day = when.astimezone(UTC).date() + timedelta(days=1)
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def _fee_due(schedule: dict[str, Any], now: datetime) -> int:
    """What of a fee schedule is recognised by ``now`` and not yet: ratably by whole seconds over the rest of its
    period, rounded down; everything left once ``now`` reaches its end (so the sum is exactly what it deferred)."""
    deferred, since, end = schedule["deferred"], schedule["recognised_to"], schedule["end"]
    if deferred <= 0 or now <= since or schedule.get("pending"):
        return 0
    if now >= end:
        return int(deferred)
    second = timedelta(seconds=1)
    remaining = (end - since) // second
    if remaining <= 0:
        return int(deferred)
    return int(deferred * ((now - since) // second) // remaining)


def _change_invoiced(invoiced: dict[str, dict[str, int]], invoice: str, unit: str, amount: int) -> None:
    """``invoice``'s overage of ``unit`` to collect changes by ``amount``; none left (or less: a net give-back,
    nothing to collect, as ``_overage_invoiced`` keeps it) forgets it."""
    billed = invoiced.setdefault(invoice, {})
    billed[unit] = billed.get(unit, 0) + amount
    if billed[unit] <= 0:
        del billed[unit]
    if not billed:
        del invoiced[invoice]


def _add_overage_time(times: dict[str, dict[str, list[list[Any]]]], unit: str, key: str, at: datetime,
                      amount: int) -> None:
    """Records ``amount`` of overage posted under period ``key`` by usage at ``at`` (``overage_since``), in time
    order; beyond ``OVERAGE_TIMES_MAX`` entries the earliest two merge (spanning both times)."""
    entries = times.setdefault(unit, {}).setdefault(key, [])
    index = len(entries)
    while index > 0 and entries[index - 1][0] > at:
        index -= 1
    if index > 0 and entries[index - 1][0] == at == entries[index - 1][1]:
        entries[index - 1][2] += amount
        return
    entries.insert(index, [at, at, amount])
    if len(entries) > OVERAGE_TIMES_MAX:
        first, second = entries[0], entries[1]
        entries[0:2] = [[first[0], max(first[1], second[1]), first[2] + second[2]]]


def _take_overage_times(times: dict[str, dict[str, list[list[Any]]]], unit: str, key: str, since: datetime,
                        amount: int) -> None:
    """``amount`` of the overage posted under ``key`` by usage at or after ``since`` is paid: off those entries,
    the earliest first (as the usage would have drawn the credit)."""
    entries = times.get(unit, {}).get(key, [])
    for entry in entries:
        if amount <= 0:
            break
        if entry[0] >= since:
            part = min(amount, entry[2])
            entry[2] -= part
            amount -= part
    entries[:] = [entry for entry in entries if entry[2] > 0]


def _forget_overage_times(times: dict[str, dict[str, list[list[Any]]]], unbilled: dict[str, dict[str, int]],
                          unit: str) -> None:
    """Drops the times of ``unit``'s periods that have no unbilled overage left (billed, repaid, given back)."""
    periods = times.get(unit)
    if not periods:
        return
    left = unbilled.get(unit, {})
    for key in [k for k in periods if left.get(k, 0) <= 0 or not periods[k]]:
        del periods[key]
    if not periods:
        del times[unit]


def _add_unbilled(unbilled: dict[str, dict[str, int]], unit: str, key: str, amount: int) -> None:
    periods = unbilled.setdefault(unit, {})
    total = periods.get(key, 0) + amount
    if total:
        periods[key] = total
    else:
        periods.pop(key, None)
        if not periods:
            del unbilled[unit]


def _reduce_unbilled(unbilled: dict[str, dict[str, int]], unit: str, key: str, amount: int) -> dict[str, int]:
    """A give-back of ``amount`` reduces the unbilled overage of its own period first, then of the latest periods,
    so no period is left negative: an invoice taking some periods never takes a give-back without the overage it
    offsets. Whatever finds no unbilled overage (streams recorded when a give-back could reduce invoiced overage)
    stays negative under its own period, as it was then. Returns period key -> sub-units reduced."""
    periods = unbilled.get(unit, {})
    order = [key] if periods.get(key, 0) > 0 else []
    order += sorted((k for k in periods if k != key and periods[k] > 0), key=lambda k: (period_began(k), k), reverse=True)
    reduced: dict[str, int] = {}
    for k in order:
        if amount == 0:
            break
        part = min(amount, periods[k])
        _add_unbilled(unbilled, unit, k, -part)
        reduced[k] = part
        amount -= part
    if amount:
        _add_unbilled(unbilled, unit, key, -amount)
        reduced[key] = reduced.get(key, 0) + amount
    return reduced


def _add_meter_overage(by_meter: dict[str, dict[str, dict[str, int]]], unbilled: dict[str, dict[str, int]],
                       unit: str, key: str, meter: str, amount: int) -> None:
    """``meter`` posted ``amount`` of the period ``key``'s unbilled overage (already added to ``unbilled``)."""
    parts = by_meter.setdefault(unit, {}).setdefault(key, {})
    parts[meter] = parts.get(meter, 0) + amount
    _fit_meter_overage(by_meter, unbilled, unit, key)


def _fit_meter_overage(by_meter: dict[str, dict[str, dict[str, int]]], unbilled: dict[str, dict[str, int]],
                       unit: str, key: str, taken: dict[str, int] | None = None) -> None:
    """The period ``key``'s unbilled overage went down: ``taken`` (meter -> sub-units; a give-back of a meter's
    usage, a grant for some meters repaying theirs) comes off those meters' parts, then the parts are kept within
    what is left of the period's overage: what left it for no known meter (an invoice took the period, unscoped
    credit repaid it) is taken from the part of no known meter first, then from the meters' in meter order, so a
    grant for some meters never repays more than those meters posted and not paid or billed yet."""
    periods = by_meter.get(unit)
    if not periods or key not in periods:
        return
    parts = periods[key]
    for meter, amount in (taken or {}).items():
        if meter in parts:
            parts[meter] -= min(amount, parts[meter])
    total = unbilled.get(unit, {}).get(key, 0)
    excess = sum(parts.values()) - max(total, 0)
    for meter in sorted(parts):
        if excess <= 0:
            break
        cut = min(excess, parts[meter])
        parts[meter] -= cut
        excess -= cut
    for meter in [m for m, amount in parts.items() if amount <= 0]:
        del parts[meter]
    if not parts:
        del periods[key]
        if not periods:
            del by_meter[unit]


def _take_meters(parts: dict[str, int], scope: list[str], amount: int) -> dict[str, int]:
    """``amount`` of a period's overage repaid by a grant for the meters ``scope``: from those meters' ``parts``,
    in the order of the scope. Meter -> sub-units."""
    taken: dict[str, int] = {}
    for meter in scope:
        if amount <= 0:
            break
        part = min(amount, parts.get(meter, 0))
        if part > 0:
            taken[meter] = part
            amount -= part
    return taken


def _month(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m")


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value



def _top_up_to_target(unit: str, target: int, threshold: int, available: int) -> int:
    """What a top-up to ``target`` asks for, in sub-units: ``target - available`` in whole steps of what ``unit`` is
    charged in (``minor_subunits``: a cent; ten fils of KWD, whose thousandths cards take with a last digit of 0),
    never taking the balance a whole minor unit (a cent, a fils) above the target: the difference is rounded up to
    the minor unit (a balance's sub-cent remainder of usage costs no whole step), then down to the step. So a
    balance in whole steps lands on a target in whole steps, and none ends above it by a minor unit (rounded up to
    the step, 50.001 KWD from 5.000 reached 50.010, and 50.000 from 5.001 reached 50.001). Rounded up to the step
    only when down would leave the balance below ``threshold`` (a target less than one step above it)."""
    exact = target - available
    if not is_currency_code(unit):
        return exact
    code = iso_currency(unit)
    step, minor = minor_subunits(code), SUBUNITS_PER_UNIT // 10**code.minor_scale
    up_to_minor = -(-exact // minor) * minor
    down = up_to_minor - up_to_minor % step
    if down > 0 and available + down >= threshold:
        return down
    return -(-exact // step) * step


def _require_amount(name: str, value: Any, *, allow_zero: bool = False, allow_negative: bool = False) -> None:
    if type(value) is not int:
        raise InvalidAmount(f"{name} must be an int of sub-units, not {type(value).__name__}")
    if abs(value) > MOVEMENT_SUBUNITS_MAX:
        raise InvalidAmount(f"{name} exceeds {MOVEMENT_SUBUNITS_MAX} sub-units")
    if value == 0 and not allow_zero:
        raise InvalidAmount(f"{name} must not be zero")
    if value < 0 and not allow_negative:
        raise InvalidAmount(f"{name} must not be negative")


def _require_time(name: str, value: Any) -> None:
    if not isinstance(value, datetime) or value.tzinfo is None or value.utcoffset() is None:
        raise InvalidTime(f"{name} must be a timezone-aware datetime")


def _require_text(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value.strip() or len(value) > TEXT_CHARS_MAX:
        raise InvalidArgument(f"{name} must be a non-empty string of at most {TEXT_CHARS_MAX} characters")


def _require_priority(priority: Any) -> None:
    if type(priority) is not int or abs(priority) > PRIORITY_ABS_MAX:
        raise InvalidArgument(f"priority must be an int within +/-{PRIORITY_ABS_MAX}")


def _require_scope(scope: Any) -> list[str] | None:
    if scope is None:
        return None
    if not isinstance(scope, list | tuple) or not scope or len(scope) > SCOPE_METERS_MAX:
        raise InvalidArgument(
            f"scope must be None (every meter) or a list of 1-{SCOPE_METERS_MAX} meter codes"
        )
    for meter in scope:
        _require_text("scope meter", meter)
    return sorted(set(scope))


# == domain errors (ValueError: bad input or a refused command, never a half-applied change) =================


class LedgerError(ValueError):
    """A command the ledger refuses; nothing was recorded."""


class InvalidArgument(LedgerError):
    pass


class InvalidAmount(InvalidArgument):
    pass


class InvalidTime(InvalidArgument):
    pass


class InvalidUnit(InvalidArgument):
    pass


class UnitMismatch(InvalidUnit):
    pass


class DuplicateGrant(LedgerError):
    pass


class UnknownGrant(LedgerError):
    pass


class GrantClosed(LedgerError):
    pass


class NotVoidable(LedgerError):
    pass


class NotRefundable(LedgerError):
    pass


class RefundExceedsRemaining(LedgerError):
    pass


class RefundExceedsGrant(LedgerError):
    pass


class InsufficientCredit(LedgerError):
    pass


class UnknownHold(LedgerError):
    pass


class HoldAlreadySettled(LedgerError):
    pass


class HoldLapsed(HoldAlreadySettled):
    pass


class CaptureExceedsHold(InvalidAmount):
    pass


class MoneyAlreadyBooked(LedgerError):
    pass


class TooManyParkedRefunds(LedgerError):
    pass


class UnknownParkedRefund(LedgerError):
    pass


class TooManyDisputes(LedgerError):
    pass


class UnknownDispute(LedgerError):
    pass


class DisputeOutcomeChanged(LedgerError):
    pass

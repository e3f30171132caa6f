"""Ledger commands of subscriptions: ``subscription.*``, ``workspace.*``, ``tax_profile.*``,
and how their documents are made (``_document``, ``_finalize``: tax, number, postings); the ``invoice.*`` commands
that follow a document's life are in :mod:`billing_ledger.invoice_commands`.

Every change that touches several aggregates (subscription, roster, resource pools, the account's
recurring credit grants, the invoice and its number sequence) happens in one command, so in one
transaction: a plan change voids the old recurring grant and issues the new one atomically, and an
invoice gets its gap-free number in the same transaction that finalizes it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from datetime import datetime, timedelta
from decimal import ROUND_FLOOR, Decimal
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

import pycountry
from billing_events.catalog import unsupported_credit_cadence
from billing_events.messages import LedgerCommand
from billing_events.money import (
    RATING_CONTEXT,
    billed_step,
    from_subunits,
    parse_decimal,
    round_minor,
    to_subunits,
)
from billing_events.money import currency as currency_of
from billing_ledger import payload as fields
from billing_ledger.account_commands import account_of
from billing_ledger.application import CommandRejected, LedgerApplication, _Batch, handles
from billing_ledger.catalog_commands import published_catalog
from billing_ledger.domain.account import BillingAccount
from billing_ledger.domain.allocation import ResourcePool
from billing_ledger.domain.catalog import Catalog
from billing_ledger.domain.invoice import (
    CREDIT_NOTE,
    DRAFT,
    FINALIZED,
    INVOICE,
    VOID,
    Invoice,
    InvoiceSequence,
    invoice_id,
    line,
)
from billing_ledger.domain.periods import proration_fraction
from billing_ledger.domain.postings import LedgerAccount
from billing_ledger.domain.proration import (
    localized,
    paused_period_line,
    period_fee_line,
    quote_cancel,
    quote_change,
    quote_resume,
    quote_unused,
)
from billing_ledger.domain.roster import Roster, Workspace, roster_id, workspace_id
from billing_ledger.domain.subscription import (
    ACTIVE,
    COLLECTIONS,
    ENTITLED,
    INCOMPLETE,
    INCOMPLETE_EXPIRED,
    INVOICE_COLLECTION,
    LIVE,
    PAUSED,
    TRIALING,
    Subscription,
    change_invoice_key,
    period_invoice_key,
    resume_invoice_key,
    subscription_id,
)
from billing_ledger.domain.tax import (
    EU_MEMBER_STATES,
    TaxProfileData,
    TaxResult,
    check_tax_id,
    compute_tax,
    percent_text,
)
from billing_ledger.invoice_overage import settle_paid
from billing_ledger.limits import (
    CANCEL_RENEWALS_MAX,
    INCOMPLETE_EXPIRY_DAYS,
    RECURRING_CREDIT_LATE_USAGE_DAYS,
)
from billing_ledger.payload import at as effective_at
from billing_ledger.payload import time_zone as read_time_zone

INVOICE_DUE_DAYS = 14
DEFAULT_ISSUER = "billing"


def _tenant(command: LedgerCommand) -> str:
    """The command's tenant: a command without one is rejected (``missing_tenant``), never an AssertionError that
    fails its whole batch (retried forever, blocking the partition)."""
    if not command.tenant:
        raise CommandRejected("missing_tenant", "the command names no tenant")
    return command.tenant


def _plan(batch: _Batch, code: str, version: int | None) -> dict[str, Any]:
    catalog = published_catalog(batch)
    if version is None:
        current = next((p for p in catalog.document.get("plans", []) if p["code"] == code), None)
        if current is None:
            raise CommandRejected("unknown_plan", f"plan {code!r} is not in the current catalogue")
        version = int(current["version"])
    plan = catalog.plan(code, int(version))
    if plan is None:
        raise CommandRejected("unknown_plan", f"plan {code!r} has no version {version}")
    for index, credit in enumerate(plan.get("recurring_credits") or []):
        # Published before the catalogue refused it: not sold any more (subscriptions on it renew as before).
        if credit.get("cadence", "month") != plan["cadence"]:
            raise CommandRejected("unsupported_plan", unsupported_credit_cadence(
                code, index, credit.get("cadence", "month"), plan["cadence"]))
    return plan  # type: ignore[no-any-return]


def _billed_in(plan: dict[str, Any], code: str) -> dict[str, Any]:
    """``plan`` priced in currency ``code`` (its own, or one of its localized ``prices``), or rejected."""
    found = localized(plan, code)
    if found is None:
        offered = ", ".join([plan["currency"], *sorted(plan.get("prices") or {})])
        raise CommandRejected("currency_mismatch", f"plan {plan['code']!r} v{plan['version']} has no price in "
                                                   f"{code} (it is priced in {offered})")
    return found


def _roster(batch: _Batch, tenant: str) -> Roster:
    return batch.get_or_create(roster_id(tenant), lambda: Roster(tenant=tenant))  # type: ignore[no-any-return]


def _subscription(batch: _Batch, tenant: str, key: str) -> Subscription:
    return batch.existing(subscription_id(tenant, key), "unknown_subscription",  # type: ignore[no-any-return]
                          f"tenant {tenant!r} has no subscription {key!r}")


def _live_subscriptions(batch: _Batch, roster: Roster) -> list[Subscription]:
    return [s for s in (batch.get(UUID(i)) for i in roster.live) if s is not None and s.status in LIVE]


def _capacities(subscriptions: list[Subscription]) -> dict[str, int]:
    """Pooled capacity: quantities of the same resource add up across the account's live subscriptions (an
    ``incomplete`` one, not paid yet, gives none)."""
    pooled: dict[str, int] = {}
    for sub in subscriptions:
        if sub.status not in ENTITLED:
            continue
        for resource, per_unit in (sub.plan.get("resources") or {}).items():
            pooled[resource] = pooled.get(resource, 0) + int(per_unit) * sub.quantity
    return pooled


# (resource, capacity) -> whether its pool may take that capacity (``ResourcePool.can_reduce_to``) and what is in use
# from it, or None without a pool.
PoolCheck = Callable[[str, int], tuple[bool, int] | None]


def pool_check(get: Callable[[UUID], Any], tenant: str) -> PoolCheck:
    """``PoolCheck`` of the pools ``get`` loads (a batch's aggregates)."""
    def check(resource: str, capacity: int) -> tuple[bool, int] | None:
        pool = get(ResourcePool.create_id(tenant, resource))
        return None if pool is None else (pool.can_reduce_to(capacity), pool.in_use)
    return check


def check_capacity(check: PoolCheck, before: dict[str, int], after: dict[str, int]) -> None:
    """Refuses (``capacity_below_usage``) pooled capacity ``after`` that would leave a pool below what is allocated
    from it: the change's check (``_set_pools``) and its invoice preview's, so both answer the same."""
    for resource in sorted(set(before) | set(after)):
        capacity = after.get(resource, 0)
        found = check(resource, capacity)
        if found is not None and not found[0]:
            raise CommandRejected("capacity_below_usage",
                                  f"{resource}: {found[1]} in use, the change would leave {capacity}")


def capacities_after_change(subscriptions: list[Subscription], changed: Subscription, plan: dict[str, Any],
                            quantity: int) -> tuple[dict[str, int], dict[str, int]]:
    """The pooled capacity of ``subscriptions`` (an account's live ones) before and after ``changed`` takes ``plan``
    and ``quantity``, for the invoice preview (the change itself changes the subscription and pools it again)."""
    stand_in = copy.copy(changed)  # read by _capacities only, never saved
    stand_in.plan, stand_in.quantity = plan, quantity
    after = [stand_in if sub.id == changed.id else sub for sub in subscriptions]
    return _capacities(subscriptions), _capacities(after)


def _set_pools(batch: _Batch, tenant: str, before: dict[str, int], after: dict[str, int], cause: str, *,
               force: bool = False) -> None:
    """Checks every pool first (capacity can't drop below current usage: ``check_capacity``), then changes them.

    ``force``: a subscription ended by itself (period end, trial end) and must end whatever is allocated, so
    its capacity goes even below usage; the pool is then over capacity and refuses new allocations.
    """
    if not force:
        check_capacity(pool_check(batch.get, tenant), before, after)
    pools: dict[str, ResourcePool] = {}
    for resource in sorted(set(before) | set(after)):
        pool = batch.get(ResourcePool.create_id(tenant, resource))
        if pool is not None:
            pools[resource] = pool
    for resource in sorted(set(before) | set(after)):
        capacity = after.get(resource, 0)
        pool = pools.get(resource)
        if pool is None:
            if capacity == 0:
                continue
            pool = ResourcePool.open(tenant=tenant, resource=resource)
            batch.add(pool)
        if pool.capacity != capacity:
            source: dict[str, Any] = {"cause": cause}
            if capacity < pool.in_use:
                source["over_capacity"] = pool.in_use - capacity
            pool.set_capacity(capacity, source, force=force)


def _allotment(credit: dict[str, Any], quantity: int, fraction: Decimal = Decimal(1)) -> int:
    """One recurring credit's amount for ``quantity`` over ``fraction`` of a period, in sub-units."""
    return to_subunits(RATING_CONTEXT.multiply(
        RATING_CONTEXT.multiply(parse_decimal(credit["amount"]), Decimal(quantity)), fraction))


def _included_credit(plan: dict[str, Any], quantity: int, fraction: Decimal = Decimal(1)) -> int:
    """The plan's recurring credit in its own billing currency for ``quantity`` over ``fraction`` of a period, in
    sub-units: the share of the period's fee that pays for that credit (a separate performance obligation, IFRS
    15: earned as the credit is used or lapses, not ratably with the rest of the fee). Credits in a credit unit
    (``CREDIT``) are not money of the fee: 0 for them."""
    return sum(_allotment(credit, quantity, fraction) for credit in plan.get("recurring_credits") or []
               if credit["unit"] == plan["currency"])


def _including(item: dict[str, Any], included: int) -> dict[str, Any]:
    """A fee line for a service period that includes ``included`` sub-units of the plan's recurring credit in the
    currency (``included_credit`` on the line, read by ``_deferred_fee``): that share of its fee is not deferred
    for ratable recognition, its grant took it into the wallet."""
    return {**item, "included_credit": str(from_subunits(included))} if included > 0 else item


def _with_included(lines: list[dict[str, Any]], included: int, back: int) -> list[dict[str, Any]]:
    """A change's or cancel's lines with the included recurring credit in the currency: ``included`` on its new fee
    for the rest of the period (the line naming its service period) and ``back`` on its credit for unused time
    (``included_back``, read by ``_unused_time_credit``): what of the included credit left the wallet for
    DEFERRED_REVENUE, which the credit takes out again."""
    out, charged, credited = [], False, False
    for item in lines:
        amount = Decimal(item["amount"])
        if not charged and amount > 0 and item.get("service_start"):
            item, charged = _including(item, included), True
        elif not credited and back > 0 and _unused_time_line(item):
            item, credited = {**item, "included_back": str(from_subunits(back))}, True
        out.append(item)
    return out


def _currency_recurring_left(account: BillingAccount, sub: Subscription) -> int:
    """What is left of ``sub``'s open recurring grants in its billing currency (sub-units)."""
    balances = {g["grant_id"]: g for g in account.grant_balances()}
    return sum(int(state.get("remaining", 0)) for grant in sub.recurring_grants
               if (state := balances.get(grant)) is not None and state.get("status") == "open"
               and state["unit"] == sub.plan["currency"])


def _granted_in_currency(account: BillingAccount, grants: list[str], currency: str) -> int:
    """The amount of the recurring grants ``grants`` (just issued) in ``currency`` (sub-units)."""
    balances = {g["grant_id"]: g for g in account.grant_balances()}
    return sum(int(balances[grant]["amount"]) for grant in grants
               if grant in balances and balances[grant]["unit"] == currency)


def _includes_credit(invoice: Invoice | None) -> bool:
    """Whether ``invoice`` deferred its fee net of an included recurring credit in the currency (a fee line with
    ``included_credit``, since session 9): a change or cancel correcting it gives that credit's remainder back
    from DEFERRED_REVENUE (``included_back``). Invoices billed before recognise their whole fee ratably, as before."""
    return invoice is not None and any(item.get("included_credit") for item in invoice.lines)


def _recurring_amounts(sub: Subscription, carried: dict[str, int] | None, fraction: Decimal) -> dict[int, int]:
    """Per credit index of ``sub``'s plan, what ``_grant_recurring`` grants (sub-units): the allotment for the
    quantity over ``fraction`` of a period plus what is ``carried`` in; a credit that comes to nothing or less is
    left out."""
    amounts = {}
    for index, credit in enumerate(sub.plan.get("recurring_credits") or []):
        amount = _allotment(credit, sub.quantity, fraction) + (carried or {}).get(str(index), 0)
        if amount > 0:
            amounts[index] = amount
    return amounts


def _grant_recurring(account: BillingAccount, sub: Subscription, start: datetime, end: datetime, by: str,
                     carried: dict[str, int] | None = None, fraction: Decimal = Decimal(1),
                     change: UUID | None = None) -> list[str]:
    """Issues the plan's recurring credits for [start, end), each drawn only by usage of [start, end)
    (``drawable_until``: ``end``).

    Without rollover a credit stays open ``RECURRING_CREDIT_LATE_USAGE_DAYS`` after ``end`` (``expires_at``,
    ``late_usage``) and the expiry sweep lapses what is left of it then, once; the renewal leaves it open
    (``_close_recurring``). The period's usage that reaches the ledger after its end still draws it: the close debits
    of meters priced at close (rating sends them after the renewal's ``PeriodEnded``) and usage from the period's last
    moments delayed in Kafka or rating. It expired at ``end`` (the renewal or the sweep, whichever came first) before
    session 13, and that usage was all billed as overage while the credit lapsed to breakage.

    A rollover credit stays open a period longer (``expires_at``) so the renewal that ends its period carries what is
    left of it (``_close_recurring``), whether the expiry sweep or the tick runs first: the sweep leaves it to the
    renewal even after ``expires_at``, a tick more than a period late included (``BillingAccount.expire_grants``; it
    expired all of it to breakage, and the renewal had nothing left to carry). The renewal keeps the rest open for the
    period's late usage then, as a credit without rollover (since session 14, ``keep_for_late_usage``).
    Drawable until its later expiry, as it was, usage after the period's end that came before a late tick drew it
    instead of waiting for the next period's credit (``_repay_period_overage``): less of it lapsed above the cap and
    the next period's credit stayed unused.

    ``fraction``: the share of the period's allotment granted (a mid-period change); ``carried`` (by credit
    index, may be negative) is added to it, and a credit that comes to nothing or less is not granted.
    ``change``: the command id of the change granting them. A period's grants are named by its start; a
    change's by the change (one at the period's start, or two at one instant, would otherwise name the same
    grant and be refused ``duplicate_grant``).
    """
    issued = []
    credits = sub.plan.get("recurring_credits") or []
    for index, amount in _recurring_amounts(sub, carried, fraction).items():
        credit = credits[index]
        grant = _recurring_grant_id(sub, start, index, change)
        rollover = bool(credit.get("rollover"))
        # Rollover: carried once at most, by the renewal, which then keeps its rest for the period's late usage (session
        # 14). Without: open for the period's late usage, then lapsed.
        expires = end + (end - start) if rollover else end + timedelta(days=RECURRING_CREDIT_LATE_USAGE_DAYS)
        account.grant_credit(grant_id=grant, unit=credit["unit"], amount=amount, priority=int(credit.get("priority", 0)),
                             effective_at=start, expires_at=expires, drawable_until=end, late_usage=not rollover,
                             scope=credit.get("scope"),
                             source="plan_recurrence", granted_by=by,
                             cause={"subscription": str(sub.id), "plan": sub.plan["code"],
                                    "plan_version": sub.plan["version"], "period_start": start.isoformat()})
        issued.append(str(grant))
    return issued


def _recurring_grant_id(sub: Subscription, start: datetime, index: int, change: UUID | None = None) -> UUID:
    """The id of ``sub``'s recurring grant of credit ``index`` from ``start`` (a period's, named by its start) or of
    the change ``change`` (named by its command id): what ``_grant_recurring`` issues, known before it does."""
    named = start.isoformat() if change is None else f"change/{change}"
    return uuid5(NAMESPACE_URL, f"/subscriptions/{sub.id}/grants/{named}/{index}")


def _successors(sub: Subscription, start: datetime, amounts: dict[int, int] | None = None,
                change: UUID | None = None) -> dict[str, UUID]:
    """The grants about to be issued from ``start`` that take the carry of the grants a renewal or a change closes
    (``_close_recurring``'s ``successors``). A renewal's (``change`` None): per credit index, the same index, issued
    whenever it carries something (the allotment plus a positive carry). A change's: per unit, its first new credit
    (``_change_carry`` gives it that unit's carry), if it is issued (``amounts``: ``_recurring_amounts``)."""
    credits = sub.plan.get("recurring_credits") or []
    if change is None:
        return {str(index): _recurring_grant_id(sub, start, index) for index in range(len(credits))}
    return {unit: _recurring_grant_id(sub, start, index, change) for unit, index in _first_credits(sub).items()
            if index in (amounts or {})}


def _successor_holds(sub: Subscription, amounts: dict[int, int]) -> dict[str, int]:
    """Per unit, what a change's new grant of the unit (``_successors``) is granted (``amounts``:
    ``_recurring_amounts``): of the old grants' rest it takes, the part late usage from before the change draws there;
    the rest of it is their ``reserve`` (``_close_recurring``)."""
    return {unit: amounts[index] for unit, index in _first_credits(sub).items() if index in amounts}


def _first_credits(sub: Subscription) -> dict[str, int]:
    """Per unit, the index of ``sub``'s plan's first recurring credit of it (the one that takes a change's carry)."""
    first: dict[str, int] = {}
    for index, credit in enumerate(sub.plan.get("recurring_credits") or []):
        first.setdefault(credit["unit"], index)
    return first


def _repay_period_overage(account: BillingAccount, sub: Subscription, grants: list[str], at: datetime,
                          since: datetime | None = None) -> set[str]:
    """The period's recurring credits just granted (``grants``) pay the overage already posted for usage of that
    period: a renewal (or trial end) ticked late, after rating placed the period's first usage in it (the period
    ahead), when the ledger had no credit of it yet, so it went to receivables. A timely tick's credit would have
    covered it; now the grant repays it (``repay_overage`` limited to the period's overage, ``OverageRepaid``) and
    the invoice shows it paid with credit, not billed as overage. Returns the units repaid, whose alerts the
    caller checks once its movements are done. A grant for some meters only (``scope``) repays the overage of
    those meters; the grants for some meters repay first, so unscoped credit is left for the other meters'.

    ``since``: the grants of a change or resume, granted from ``since`` (its ``at``): they repay only the overage
    usage at or after it posted (``BillingAccount.overage_since``), usage already posted when the change or resume
    came with an earlier ``at``; the period's usage before it had no credit of them on time either."""
    units: set[str] = set()
    cause = {"subscription": str(sub.id), "period_start": sub.period_start.isoformat(), "reason": "recurring_credits"}
    if since is not None:
        cause["since"] = since.isoformat()
    balances = {g["grant_id"]: g for g in account.grant_balances()}  # a grant's unit and scope never change
    for grant in sorted(grants, key=lambda g: balances[g]["scope"] is None if g in balances else True):
        # stable: the plan's order otherwise
        if account.repay_overage(grant_id=UUID(grant), at=at, cause=cause, period=(sub.period_start, sub.period_end),
                                 since=since, thresholds=False) and grant in balances:
            units.add(str(balances[grant]["unit"]))
    return units


def _close_recurring(account: BillingAccount, sub: Subscription, at: datetime, by: str, reason: str,
                     rollover: bool, *, ended: bool = False, lapse_currency: int = 0, now: datetime | None = None,
                     successors: dict[str, UUID] | None = None, holds: dict[str, int] | None = None,
                     included_back: bool = False, kept: list[str] | None = None,
                     ) -> tuple[dict[str, int], set[str], int]:
    """Closes the current recurring grants to new usage at ``at``; returns the rollover to carry (capped), the units
    moved and what of the plan's currency went back to DEFERRED_REVENUE (not lapsed): the sub-units a change's or
    cancel's credit for unused time takes out of it again (``included_back``). No balance thresholds are checked: the
    command goes on to grant (the next period's credit, a credit note) and calls ``_check_thresholds`` on those units
    after its last movement, so a balance that is 0 only between the close and the new grant requests no auto-top-up.

    Usage from before the close that reaches the ledger after it (late usage, and the close debits of meters priced
    at close, which rating sends after the period's end or cut) still draws the credit it was entitled to, as on time:
    every plan credit with ``drawable_until`` stays open ``RECURRING_CREDIT_LATE_USAGE_DAYS`` after its period's end or
    the cut for it, set aside (out of ``available``: new usage cannot draw it), and the expiry sweep lapses what is left
    of it to breakage then, once (``BillingAccount.keep_for_late_usage``, since session 14). Before, only a credit
    without rollover did so at its period's end (session 13); a rollover credit was voided at the renewal, a cut
    credit at the cut, and that usage was billed as overage.

    ``ended``: the grants' period is over at ``at`` (a renewal, a paused renewal, a cancel at the period's end). A
    credit without rollover (``late_usage``, since session 13) is set aside; a rollover credit moves what it carries
    (``rollover_cap``; nothing at a paused renewal or a cancel) into the next period's grant at once (``successors``:
    per credit index, that grant's id), and late usage draws its rest first, then at most that carry of the next grant
    (the same money: on time it would have lowered the carry). ``now`` (the tick's time): a window over by then lapses
    the rest at once. A grant expired by ``at`` (granted before session 13: it expires at its period's end) is expired.

    Otherwise the grants are cut at ``at`` (an immediate cancel, a change). A change's new grant of the unit
    (``successors``, per unit) takes all of what is left now (``lapse_currency``: this much of it in the plan's
    currency lapses instead, in the grants' order: a period whose fee was given back in full, refunded or voided, so
    that fee no longer funds their credit), and late usage from before the cut draws it up to that. Without one (an
    immediate cancel, a unit the new plan does not grant) the grant keeps its rest for that usage and it lapses after
    the window; before session 14 a cancel voided it back to DEFERRED_REVENUE, where the credit for unused time took
    it out again. What of the rest the new grant does not hold (``holds``, per unit: what it is granted; a downgrade
    after more than the elapsed time's share was used) is the kept grant's ``reserve`` (since session 15; before, that
    usage beyond the new grant was owed though the old plan's allowance had it): once late usage has drawn the new
    grant's part, the rest of that usage draws it, reinstated (``BillingAccount.keep_for_late_usage``) from recognised
    revenue when the change's credit note takes the moved currency out of deferred revenue (``included_back``), else
    from the account the move credited; not with ``lapse_currency`` (its fee given back in full: not reserved).
    ``kept``: grants an earlier change at the same instant kept without a new grant of their unit
    (``Subscription.left_at``): those of a unit this change grants move into its new grant like the current ones. A grant cut at or before its own start, or granted before session 9 (no ``drawable_until``), is
    voided at once as before; what kept grants carried into it is handed on first (a second change, or a cancel, at the
    instant of the change or renewal that granted it; ``BillingAccount.hand_on_carry``, since session 15): into the
    change's new grant of the unit, which takes its rest, or back to them."""
    carried: dict[str, int] = {}
    units: set[str] = set()
    back = 0
    credits = sub.plan.get("recurring_credits") or []
    balances = {g["grant_id"]: g for g in account.grant_balances()}
    window = timedelta(days=RECURRING_CREDIT_LATE_USAGE_DAYS)
    for index, grant in enumerate([*sub.recurring_grants, *(kept or ())]):
        state = balances.get(grant)
        if state is None or state.get("status") != "open":
            continue
        gid, unit = UUID(grant), str(state["unit"])
        if index >= len(sub.recurring_grants) and (successors or {}).get(unit) is None:
            continue  # kept by a change at this instant, and no new grant of its unit now either: it stays kept
        remaining = int(state.get("remaining", 0))
        spec = credits[index] if index < len(credits) else {}
        late_usage = account.open_for_late_usage(gid)  # a credit without rollover, since session 13
        drawable_until = account.drawable_until(gid)
        rolled = rollover and bool(spec.get("rollover")) and not late_usage
        carry = 0
        if rolled and remaining > 0:
            cap = spec.get("rollover_cap")
            carry = carried[str(index)] = min(remaining, to_subunits(parse_decimal(cap))) if cap else remaining
        units.add(unit)
        currency = unit == sub.plan["currency"]
        if not rolled and (late_usage or drawable_until is None) and state.get("expires_at") is not None \
                and state["expires_at"] <= at:
            # Its period and window are over (a renewal, a cancel at the period's end, ticked that late; a credit
            # granted before session 13 expires at its period's end): what is left lapsed, breakage as the sweeper's
            # expiry would post it, whichever comes first.
            account.expire_grants(at, grant_ids=[grant], thresholds=False)
        elif ended and late_usage:
            # The period's late usage may still draw it and the sweep lapses it at its expires_at; new usage no longer
            # can: it is set aside, out of ``available``, its alerts checked by the caller after its last movement.
            account.set_aside_grants(at, grant_ids=[grant], thresholds=False)
        elif ended and drawable_until is not None:
            # A rollover credit: its carry goes into the next grant now, its rest stays for the period's late usage.
            successor = (successors or {}).get(str(index)) if carry else None
            account.keep_for_late_usage(grant_id=gid, at=at, drawable_until=drawable_until,
                                        expires_at=drawable_until + window, reason=reason, by=by, moved=carry,
                                        successor=successor, carry=carry if successor is not None else 0)
            back += carry if currency else 0
            _set_aside_or_lapse(account, grant, at, now or at)
        else:
            lapsed = remaining - carry if ended or rolled else 0
            if not (ended or rolled) and lapse_currency > 0 and currency:
                lapsed = min(remaining, lapse_currency)
                lapse_currency -= lapsed
            successor = (successors or {}).get(unit)
            if ended or drawable_until is None or at <= state["effective_at"]:
                # Cut at its start: the carry that kept grants put in it goes on with its rest into the new grant, or
                # back to them, so their period's late usage still finds it (the void broke the link before session 15).
                from_revenue = LedgerAccount.RECOGNISED_REVENUE.value if currency and included_back else None
                if not ended and account.hand_on_carry(grant_id=gid, at=at, reason=reason, by=by, successor=successor,
                                                       room=None if holds is None else holds.get(unit, 0),
                                                       reserve_from=from_revenue):
                    remaining = account.remaining(gid)
                    lapsed = min(lapsed, remaining)
                account.void_grant(grant_id=gid, reason=reason, voided_by=by, at=at, thresholds=False, lapsed=lapsed)
                back += remaining - lapsed if currency else 0
                continue
            cut = min(at, drawable_until)
            if successor is not None:  # a change's new grant of the unit takes the rest now, late usage from it
                held = remaining if holds is None else min(remaining, holds.get(unit, 0))
                if holds is not None:
                    holds[unit] = holds.get(unit, 0) - held
                reserve = remaining - held if not lapsed else 0  # the old allowance the new grant does not hold
                account.keep_for_late_usage(grant_id=gid, at=at, drawable_until=cut, expires_at=cut + window,
                                            reason=reason, by=by, moved=remaining, lapsed=lapsed,
                                            successor=successor if remaining else None, carry=remaining,
                                            reserve=reserve, reserve_from=(
                                                LedgerAccount.RECOGNISED_REVENUE.value
                                                if currency and included_back else None))
                back += remaining - lapsed if currency else 0
            else:
                account.keep_for_late_usage(grant_id=gid, at=at, drawable_until=cut, expires_at=cut + window,
                                            reason=reason, by=by)
            account.set_aside_grants(at, grant_ids=[grant], thresholds=False)
    return carried, units, back


def _set_aside_or_lapse(account: BillingAccount, grant: str, at: datetime, now: datetime) -> None:
    """A plan credit just kept for its period's late usage (``keep_for_late_usage``): set aside from ``at``, or lapsed
    now when its window is over by ``now`` (a renewal ticked later than that: no late usage is waited for)."""
    if account.expires_at(UUID(grant)) <= now:
        account.expire_grants(now, grant_ids=[grant], thresholds=False)
    else:
        account.set_aside_grants(at, grant_ids=[grant], thresholds=False)


def _check_thresholds(account: BillingAccount, units: set[str], at: datetime, *, top_up: bool) -> None:
    """The low-balance alerts (and, with ``top_up``, auto-top-ups) of ``units`` once a command's movements are
    all done. A cancel passes ``top_up`` False: the customer who just canceled is not charged for a top-up at
    once (the rule stays armed: the next usage below its threshold tops up)."""
    for unit in sorted(units):
        account.check_thresholds(unit, at, top_up=top_up)


def _change_carry(account: BillingAccount, sub: Subscription, old_plan: dict[str, Any], old_quantity: int,
                  old_fraction: Decimal, unclaimed: dict[str, int] | None = None
                  ) -> tuple[dict[str, int], dict[str, int]]:
    """At a plan or quantity change, per credit index of the new plan: what is left of the current recurring
    grants beyond what the old allotment still gives for the rest of the period (negative when more than the
    time elapsed paid for was used). Called before the old grants are voided.

    The new grants are the new allotment prorated to the rest of the period plus this, like the base fee
    (old fee credited for the unused time, new fee charged for it): over a period the credits granted are
    the time-weighted allotments of the plans held, and using credits then changing back and forth refills
    nothing. A unit the new plan does not grant carries nothing (the old grants keep their rest for late usage).

    ``unclaimed``: per unit, the carry an earlier change at this same instant left that no new grant took
    (``Subscription.left_at``), counted in as if that change had not happened (its plan's allotment is subtracted
    here as the old one, so the carry is the first plan's). Also returns, per unit, what no credit of the new plan
    takes (``unclaimed`` for a change after this one at the same instant).
    """
    balances = {g["grant_id"]: g for g in account.grant_balances()}
    by_unit: dict[str, int] = {}
    for grant in sub.recurring_grants:
        state = balances.get(grant)
        if state is not None and state.get("status") == "open":
            by_unit[state["unit"]] = by_unit.get(state["unit"], 0) + int(state.get("remaining", 0))
    for credit in old_plan.get("recurring_credits") or []:
        by_unit[credit["unit"]] = by_unit.get(credit["unit"], 0) - _allotment(credit, old_quantity, old_fraction)
    for unit, amount in (unclaimed or {}).items():
        by_unit[unit] = by_unit.get(unit, 0) + amount
    carried: dict[str, int] = {}
    for index, credit in enumerate(sub.plan.get("recurring_credits") or []):
        if credit["unit"] in by_unit:  # the first new credit of a unit takes that unit's carry
            carried[str(index)] = by_unit.pop(credit["unit"])
    return carried, by_unit


def tax_lines_for(net: Decimal, unit: str, profile: dict[str, Any] | None,
                  catalog: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The tax lines of a document whose net total is ``net``, by a tax profile (the roster's) and a catalogue
    document's rules: what finalizing adds, and what the invoice preview shows."""
    return _lines_of_tax(_tax_result(net, unit, profile, catalog), unit)


def _lines_of_tax(result: TaxResult | None, unit: str) -> list[dict[str, Any]]:
    """``tax_lines_for`` of a tax already computed."""
    if result is None:
        return []
    if result.reverse_charge:
        return [line("tax", result.note or "Reverse charge", Decimal(0), unit, rate="0")]
    if result.tax == 0:
        return []
    percent = percent_text(result.rate)
    return [line("tax", f"{result.rule} {percent} % of {result.net}", result.tax, unit, rate=str(result.rate))]


def _tax_result(net: Decimal, unit: str, profile: dict[str, Any] | None,
                catalog: dict[str, Any] | None) -> TaxResult | None:
    if profile is None or catalog is None:
        return None
    return compute_tax(net, unit, TaxProfileData(
        country=profile["country"], subdivision=profile.get("subdivision"), business_name=profile.get("business_name"),
        tax_id=profile.get("tax_id"), tax_id_valid=bool(profile.get("tax_id_valid"))),
        catalog.get("tax_rules") or [], (catalog.get("seller") or {}).get("country"))


def _tax_lines(batch: _Batch, invoice: Invoice) -> list[dict[str, Any]]:
    """Tax, computed once on the invoice's net total, by the account's tax profile and the catalogue's rules
    (``document_tax_lines``; a subscription document's ``related_invoice`` is the invoice it corrects)."""
    if any(item["kind"] == "tax" for item in invoice.lines):
        return []
    roster = batch.get(roster_id(invoice.tenant))
    catalog = batch.get(Catalog.create_id())
    corrected = batch.get(UUID(invoice.related_invoice)) if invoice.subscription_id and invoice.related_invoice \
        else None
    return document_tax_lines(invoice.lines, invoice.currency, roster.tax_profile if roster is not None else None,
                              catalog.document if catalog is not None else None,
                              corrected if isinstance(corrected, Invoice) else None)


def document_tax_lines(lines: list[dict[str, Any]], unit: str, profile: dict[str, Any] | None,
                       catalog: dict[str, Any] | None, corrected: Invoice | None) -> list[dict[str, Any]]:
    """The tax lines of a document with ``lines`` (no tax yet): what finalizing adds, and what the invoice
    preview shows for the same lines.

    A change's or cancel's document corrects the invoice that billed the plan for the period (``corrected``,
    the subscription's ``period_invoice``): its credit for the unused time (the negative lines) gives back the
    tax that invoice charged, at that invoice's rate (0 when it had none), and only what it charges anew is taxed
    by today's profile and rules. With the same rate as today (the usual case) that is one tax line on the net
    total, as for any document; with another (a tax profile set since, a rule changed) the credit gets a tax line
    of its own at the invoiced rate, naming that invoice (``invoice``).
    """
    # A line whose amount has its tax inside, already booked (``tax_included``: what a refund left owed) is not taxed,
    # nor is a means of payment applied after tax (``after_tax``: a credit note's credit, ``invoice_overage``).
    lines = [item for item in lines if not item.get("tax_included") and not item.get("after_tax")]
    total = sum((Decimal(item["amount"]) for item in lines), Decimal(0))
    # Today's rate by the profile and rules, whatever the net: a net of 0.00 (a plan of the same fee) has no tax
    # line, and read as 0 % it took the "rates differ" branch below and was refused ``tax_rate_changed``.
    today = _tax_result(total, unit, profile, catalog)
    current = _lines_of_tax(today, unit)
    rate = _invoiced_tax_rate(corrected) if corrected is not None else None
    credited = sum((Decimal(item["amount"]) for item in lines if Decimal(item["amount"]) < 0), Decimal(0))
    today_rate = today.rate if today is not None else Decimal(0)
    if rate is None or not credited or rate == today_rate:
        if not current and credited and today is not None and today_rate and not today.reverse_charge:
            # Nothing to tax, but a later cancel gives back its credit at the rate this document charged the new
            # plan at (``_invoiced_tax_rate``): a 0.00 tax line records it (else it read 0 % and gave back no VAT).
            percent = percent_text(today_rate)
            current = [line("tax", f"{today.rule} {percent} % of {today.net}", Decimal(0), unit,
                            rate=str(today_rate))]
        return current
    assert corrected is not None
    charged = RATING_CONTEXT.subtract(total, credited)
    taxes = tax_lines_for(charged, unit, profile, catalog) if charged else []
    percent = percent_text(rate)
    taxes.append(line("tax", f"Tax as invoiced on {corrected.number}: {percent} % of {credited}",
                      RATING_CONTEXT.multiply(credited, rate), unit, rate=str(rate), invoice=str(corrected.id)))
    after = RATING_CONTEXT.add(total, sum((Decimal(item["amount"]) for item in taxes), Decimal(0)))
    document_type = CREDIT_NOTE if total < 0 else INVOICE  # as ``_document`` decides it
    if (after <= 0) if document_type == INVOICE else (after >= 0):
        # Rare: a new charge almost as large as the credit, taxed at another rate, flips the document's sign.
        raise CommandRejected("tax_rate_changed", f"the change credits {-credited} taxed at {percent} % on "
                                                  f"{corrected.number} and charges {charged} at today's tax: "
                                                  f"the {document_type} would total {after}; cancel and "
                                                  "subscribe again, or change at the period's end")
    return taxes


def _tax_rate(tax_lines: list[dict[str, Any]]) -> Decimal:
    """The rate of a document's tax lines (0 without any; a reverse charge's is 0)."""
    rates = [Decimal(item["rate"]) for item in tax_lines if item.get("rate") is not None]
    return rates[0] if rates else Decimal(0)


def _invoiced_tax_rate(invoice: Invoice) -> Decimal | None:
    """The tax rate ``invoice`` charged what it billed anew with (0 when it had no tax); ``None`` for a draft,
    which is taxed when it is finalized, by the profile and rules of that day (today's, for a document finalized
    now). A change's document may also carry the tax it gave back at an earlier invoice's rate (a tax line
    naming that ``invoice``): not the rate of its own charges, so not counted."""
    if invoice.status == DRAFT:
        return None
    taxes = [item for item in invoice.lines if item["kind"] == "tax" and not item.get("invoice")]
    if any(item.get("rate") is None for item in taxes):  # not recorded: the invoice's tax over its net
        tax = sum((Decimal(item["amount"]) for item in taxes), Decimal(0))
        net = RATING_CONTEXT.subtract(invoice.total, tax)
        return RATING_CONTEXT.divide(tax, net) if net else Decimal(0)
    return _tax_rate(taxes)


def period_invoice(sub: Subscription, get: Callable[[UUID], Any]) -> Invoice | None:
    """The document that billed ``sub``'s current plan for the rest of its current period, which a change's or
    cancel's credit for the unused time corrects (``Subscription.period_invoice``: the period's first or renewal
    invoice, a resume's, the last change's). ``None`` when nothing billed it (a period begun while paused and not
    resumed, a trial) or it is unknown (a cadence change recorded before changes named their document): its
    credit is then taxed like the rest. ``get``: an aggregate by id (the command's batch, or a read)."""
    if not sub.period_billed or sub.period_invoice is None:
        return None
    found = get(UUID(sub.period_invoice))
    return found if isinstance(found, Invoice) else None


def live_period_invoice(sub: Subscription, get: Callable[[UUID], Any]) -> Invoice | None:
    """The document that still bills ``sub``'s current period, which a change's or cancel's credit for the unused
    time corrects: its ``period_invoice``, unless that is a change's document that was voided (``invoice.void``
    forgave the change's charge and gave its credit back to the document it corrected, ``Invoice.given_back``):
    then that corrected document, as long as it is not void itself. One step is enough: a document a change
    credited cannot be voided (``invoice_has_credit_notes``), so the one a voided change corrected is live."""
    found = period_invoice(sub, get)
    if found is None or found.status != VOID or not found.related_invoice:
        return found
    corrected = get(UUID(found.related_invoice))
    return corrected if isinstance(corrected, Invoice) and corrected.status != VOID else found


def _unused_time_line(item: dict[str, Any]) -> bool:
    """A change's or cancel's credit for the unused time of the invoice it corrects: a negative proration line
    without a service period of its own."""
    return item["kind"] == "proration" and not item.get("service_start") and Decimal(item["amount"]) < 0


def credit_live_invoice(lines: list[dict[str, Any]], sub: Subscription, live: Invoice | None, at: datetime, *,
                        canceled: bool) -> list[dict[str, Any]]:
    """A change's or cancel's quoted ``lines`` with their credit for the unused time (negative lines without a
    service period of their own) taken from what ``live`` billed (``quote_unused``) when it is not the
    subscription's ``period_invoice``: the change that billed the plan and quantity held now was voided, so the
    quote's credit for them (20.00 for two seats) would give back a fee never owed, and ``live`` billed the
    period at its own amounts (10.00 for one). When ``live`` is void itself (the period's only invoice voided,
    ``invoice.void``: the period is not billed) it billed nothing: no credit at all, the rest of the lines (a
    change's new fee for the rest of the period) as quoted; a credit of the voided fee (-15.00 against 30.00) let
    the customer pay 15.00 for the rest of the period at two seats and took revenue below nothing. Unchanged
    otherwise."""
    if live is not None and live.status == VOID:
        return [item for item in lines if not _unused_time_line(item)]
    if live is None or str(live.id) == sub.period_invoice:
        return lines
    kept = [item for item in lines if not _unused_time_line(item)]
    credit = quote_unused(lines=live.lines, unit=live.currency, billed_by=str(live.number), at=at, canceled=canceled)
    return credit + kept


# Lines whose money is already receivable when the invoice is finalized (usage posted beyond credit): the
# ledger books the other lines (fees, proration, discounts, a minimum commitment) and the tax (``_book``). An
# overage line billing a credit unit (``credit_unit``) is booked too: its receivable is in credits, and this is
# its money in the invoice currency (as a credit package's money is booked apart from its credits).
ALREADY_POSTED_KINDS = frozenset({"usage", "credits_applied", "overage"})
NOTHING_TO_BILL = "nothing_to_bill"
# The payment a subscription invoice of 0.00 is settled by, at once when it is finalized (``_settle_nothing_due``).
NOTHING_DUE = "nothing_due"


def _book(batch: _Batch, invoice: Invoice, at: datetime, refunded: bool = False) -> None:
    """Posts what a finalized subscription document bills on the tenant's account: an invoice's fees and tax
    are receivable (``BillingAccount.bill_invoice``, settled when it is paid); a credit note's become account
    credit in the currency (``credit_note_grant``), unless it documents money the gateway gave back
    (``refunded``: ``refund_invoice_payment``, out of the gateway's clearing). Top-up invoices and their credit
    notes (no subscription) post nothing here: the purchase grant and the refund already moved that money.

    Revenue (IFRS 15): the fee lines that name their service period (``service_start``/``service_end``: a period's
    fee, a change's or resume's rest of the period) are deferred and recognised over it (``_fee_revenue``); a
    change's or cancel's credit for unused time (its negative proration lines) is taken back from the deferred
    fee of the invoice it corrects, whose schedule ends; a refund from the refunded invoice's (a full refund ends
    it). Other fee lines (a minimum-spend true-up of an ended period, lines of documents drafted before fees
    named their period) are revenue at once."""
    if not invoice.subscription_id:
        return
    fees = tax = Decimal(0)
    for item in invoice.lines:
        if item["kind"] == "tax":
            tax = RATING_CONTEXT.add(tax, Decimal(item["amount"]))
        elif (item["kind"] not in ALREADY_POSTED_KINDS or item.get("credit_unit")) and not _netted_minimum(item):
            fees = RATING_CONTEXT.add(fees, Decimal(item["amount"]))
    account = account_of(batch, invoice.tenant)
    cause = {"invoice": str(invoice.id), "invoice_number": invoice.number, "subscription": invoice.subscription_id}
    if invoice.document_type == INVOICE:
        deferred = _deferred_fee(invoice)
        sub = batch.get(UUID(invoice.subscription_id))
        if deferred is not None and isinstance(sub, Subscription) and sub.status == INCOMPLETE:
            deferred["pending"] = True  # charge_before_access: its period starts when it is paid (``_activate``)
            deferred.pop("included", None)  # nothing granted yet: its credit is granted, and taken out, then
        account.bill_invoice(invoice=str(invoice.id), unit=invoice.currency, net=to_subunits(fees),
                             tax=to_subunits(tax), at=at, cause=cause, deferred=deferred,
                             credits=_unused_time_credit(batch, invoice, at))
    elif refunded:  # every line's money, usage included, went back: the whole note is revenue and tax given back
        # ... but for the lines of money its invoice had already given back as credit for unused time (``reclaimed``
        # lines, see payment_commands._refund_invoice): taken back from that credit, else owed.
        amount, tax_back = to_subunits(-invoice.total), to_subunits(-tax)
        reclaimed = -sum((Decimal(item["amount"]) for item in invoice.lines if item.get("reclaimed")), Decimal(0))
        excess = to_subunits(reclaimed)
        # ... and for what the refunded invoice's payment never paid (``written_off`` lines: the write-off took it off
        # its revenue when it was paid), which the note gives back of the invoice without money.
        unpaid = sum((Decimal(item["amount"]) for item in invoice.lines if item.get("written_off")), Decimal(0))
        refunded_invoice = batch.get(UUID(invoice.related_invoice)) if invoice.related_invoice else None
        credits, reclaim = None, []
        if isinstance(refunded_invoice, Invoice):
            # What this note gives back of the invoice, before the invoice records it.
            back = RATING_CONTEXT.add(RATING_CONTEXT.subtract(-invoice.total, reclaimed), unpaid)
            credits = {"invoice": str(refunded_invoice.id), "amount": amount - tax_back - excess,
                       "close": RATING_CONTEXT.add(refunded_invoice.given_back, back) >= refunded_invoice.total}
            reclaim = [str(credit_note_grant_id(UUID(document))) for document in refunded_invoice.corrections]
        account.refund_invoice_payment(note=str(invoice.id), unit=invoice.currency, amount=amount, tax=tax_back,
                                       at=at, cause=cause, credits=credits, excess=excess, reclaim=reclaim)
    else:
        account.credit_note_grant(grant_id=credit_note_grant_id(invoice.id),
                                  note=str(invoice.id), unit=invoice.currency, net=to_subunits(-fees),
                                  tax=to_subunits(-tax), at=at, cause=cause, deferred=_deferred_fee(invoice),
                                  credits=_unused_time_credit(batch, invoice, at))


def _netted_minimum(item: dict[str, Any]) -> bool:
    """A negative "Minimum commitment" line of earlier periods (``invoice_overage._minimum_already_billed``): the
    account netted it from the overage receivable when the invoice took that overage, so it is already posted."""
    return item["kind"] == "minimum_commitment" and bool(item.get("earlier_periods"))


def credit_note_grant_id(note: UUID) -> UUID:
    """The account credit (grant) a subscription credit note gives."""
    return uuid5(NAMESPACE_URL, f"/invoices/{note}/credit")


def _left_to_give_back(lines: list[dict[str, Any]], corrected: Invoice | None) -> list[dict[str, Any]]:
    """A change's or cancel's lines with their credit for unused time (negative lines) capped by what of the
    invoice it corrects is not given back yet (``Invoice.given_back``: gateway refunds, earlier credits), tax
    included at that invoice's rate: nothing once it is refunded in full, as for a voided invoice. An invoice can
    never give back more than it billed."""
    if corrected is None or corrected.status == DRAFT:
        return lines
    rate = _invoiced_tax_rate(corrected) or Decimal(0)
    # What it charged: its total, and the credit a change's document nets for the invoice it corrects in turn.
    net, tax = _credit_given(corrected)
    left = RATING_CONTEXT.subtract(RATING_CONTEXT.add(corrected.total, net + tax), corrected.given_back)
    money = currency_of(corrected.currency)
    minor = billed_step(money)  # what its lines are rounded to (``round_minor``): a cent, ten fils of KWD
    # The most net whose tax at ``rate`` keeps the credit within what is left (rounded down to the minor unit).
    most = max(Decimal(0), (RATING_CONTEXT.divide(left, 1 + rate) / minor).to_integral_value(ROUND_FLOOR) * minor)
    while most > 0 and RATING_CONTEXT.add(most, round_minor(RATING_CONTEXT.multiply(most, rate), money)) > left:
        most -= minor
    # A capped line reads -10.00 like the others, not -10 (-10.000 in KWD).
    most = most.quantize(Decimal(1).scaleb(-money.minor_scale), context=RATING_CONTEXT)
    out = []
    for item in lines:
        amount = Decimal(item["amount"])
        if amount < 0:
            amount = max(amount, -most)
            most += amount
            if not amount:
                continue
            if amount != Decimal(item["amount"]):
                item = {**item, "amount": str(amount), "exact_amount": str(amount),
                        "description": f"{item['description']} (up to what {corrected.number} has not given back)"}
        out.append(item)
    return out


def _credit_given(document: Invoice) -> tuple[Decimal, Decimal]:
    """The credit a change's or cancel's finalized ``document`` gives the invoice it corrects (its negative lines)
    and that credit's tax: its own tax line when it has one (another rate than today's), else all the document's
    tax when it only credits, else the credit at the document's rate. (0, 0) for any other document."""
    if not document.related_invoice or not document.subscription_id or document.status == DRAFT:
        return Decimal(0), Decimal(0)
    credited = -sum((Decimal(i["amount"]) for i in document.lines if i["kind"] != "tax" and Decimal(i["amount"]) < 0),
                    Decimal(0))
    if not credited:
        return Decimal(0), Decimal(0)
    taxes = [i for i in document.lines if i["kind"] == "tax"]
    own = [i for i in taxes if i.get("invoice") == document.related_invoice]
    if own:
        tax = -sum((Decimal(i["amount"]) for i in own), Decimal(0))
    elif all(Decimal(i["amount"]) <= 0 for i in document.lines if i["kind"] != "tax"):
        tax = -sum((Decimal(i["amount"]) for i in taxes), Decimal(0))
    else:
        tax = round_minor(RATING_CONTEXT.multiply(credited, _tax_rate(taxes)), currency_of(document.currency))
    return credited, tax


def _record_given_back(corrected: Invoice, document: Invoice, by: str) -> None:
    """The invoice a change's or cancel's finalized document corrects records the credit it gave (``Invoice.
    given_back``), so a later refund or credit never gives it back again."""
    net, tax = _credit_given(document)
    corrected.record_given_back(document=document.id, net=net, tax=tax, by=by)


def _deferred_fee(invoice: Invoice) -> dict[str, Any] | None:
    """The fee ``invoice`` bills in advance for its service period, to defer: the sum of its lines that name the
    period (``proration.service_period``), from the earliest start to the latest end; ``None`` if none or not
    positive (nothing to spread: revenue at once). ``included``: the share of it that pays for the plan's recurring
    credit in the currency (its lines' ``included_credit``), not recognised ratably (``_fee_revenue``)."""
    amount, start, end, included = Decimal(0), None, None, Decimal(0)
    for item in invoice.lines:
        if not (item.get("service_start") and item.get("service_end")):
            continue
        amount = RATING_CONTEXT.add(amount, Decimal(item["amount"]))
        if item.get("included_credit") and Decimal(item["amount"]) > 0:
            included = RATING_CONTEXT.add(included, Decimal(item["included_credit"]))
        began, ends = datetime.fromisoformat(item["service_start"]), datetime.fromisoformat(item["service_end"])
        start = began if start is None or began < start else start
        end = ends if end is None or ends > end else end
    if amount <= 0 or start is None or end is None or end <= start:
        return None
    deferred: dict[str, Any] = {"amount": to_subunits(amount), "start": start, "end": end}
    if included > 0:  # the included recurring credit's share: not ratable (capped by the fee)
        deferred["included"] = min(to_subunits(included), deferred["amount"])
    return deferred


def _unused_time_credit(batch: _Batch, invoice: Invoice, at: datetime) -> dict[str, Any] | None:
    """A change's or cancel's credit for the unused time of the invoice it corrects (its negative proration lines
    without a period of their own): taken back from that invoice's deferred fee, whose schedule ends here. When
    that invoice is still a draft (a renewal before rating's usage lines finalize it) it has no schedule yet: the
    credit is taken from its fee all the same (``draft``), pending until it is billed, and its service ends at the
    change or cancel (``end``: this document's start)."""
    if not invoice.related_invoice:
        return None
    credit = back = Decimal(0)
    for item in invoice.lines:
        if _unused_time_line(item):
            credit = RATING_CONTEXT.subtract(credit, Decimal(item["amount"]))
            back = RATING_CONTEXT.add(back, Decimal(item.get("included_back") or 0))
    if not credit:
        return None
    corrected = batch.get(UUID(invoice.related_invoice))
    included = {"included": to_subunits(back)} if back > 0 else {}
    if isinstance(corrected, Invoice) and corrected.status == DRAFT:
        return {"invoice": invoice.related_invoice, "amount": to_subunits(credit), "close": True, "draft": True,
                "end": invoice.period_start or at, **included}
    return {"invoice": invoice.related_invoice, "amount": to_subunits(credit), "close": True, **included}


def _finalize(app: LedgerApplication, batch: _Batch, invoice: Invoice, at: datetime, by: str, *,
              refunded: bool = False, after_tax: list[dict[str, Any]] | None = None) -> None:
    """Tax, number and posting of a document (``refunded``: a credit note of money the gateway gave back;
    ``after_tax``: lines of payment means applied after the tax, shown below it)."""
    if invoice.subscription_id and all(Decimal(item["amount"]) == 0 for item in invoice.lines):
        # A free plan's period (or a paused one without usage): no number, no email, nothing to collect.
        invoice.void(at=at, reason=NOTHING_TO_BILL, by=by)
        return
    invoice.add_lines(_tax_lines(batch, invoice), by="system:tax")
    if after_tax:
        invoice.add_lines(after_tax, by=by)
    prefix = "CN" if invoice.document_type == CREDIT_NOTE else "INV"
    issuer = getattr(app, "invoice_issuer", DEFAULT_ISSUER)
    # Issued (dated, numbered in that year's series) when the command issuing it is applied, never at an earlier
    # time it takes effect: a backdated command's document is dated today, its service period says what it bills
    # (``period_start``/``period_end``, the lines' ``service_start``/``service_end``), and its postings keep the
    # effective time ``at``. Before session 14 it was dated ``at``: numbered after invoices dated after it.
    issued = max(at, batch.command_issued_at or at)
    sequence = batch.get_or_create(InvoiceSequence.create_id(issuer, issued.year, prefix),
                                   lambda: InvoiceSequence(issuer=issuer, year=issued.year, prefix=prefix))
    issued = sequence.issue_date(issued)
    number = sequence.next_number(invoice=invoice.id, issued_at=issued)
    invoice.finalize(number=number, issued_at=issued, due_at=issued + timedelta(days=INVOICE_DUE_DAYS), by=by,
                     billed_to=_billed_to(batch, invoice.tenant), seller=_seller(batch, issuer))
    _book(batch, invoice, at, refunded)
    if invoice.document_type == INVOICE and invoice.subscription_id and invoice.total == 0:
        _settle_nothing_due(batch, invoice, at, by)


def _settle_nothing_due(batch: _Batch, invoice: Invoice, at: datetime, by: str) -> None:
    """A subscription invoice of 0.00 that shows something (usage paid with credit, a change to a plan of the same
    fee) is settled as it is issued: paid by nothing (payment ``nothing_due``), what it billed (nothing) settled, so
    it is never open, never dunned, and never counted as owed. It pays nothing else: a past_due subscription stays so
    until the invoice it owes is paid (an incomplete one, ``charge_before_access``, had nothing to pay first: it is
    active). Before session 14 such an invoice stayed ``finalized`` (open) forever."""
    invoice.mark_paid(at=at, payment=NOTHING_DUE, by=by)
    settle_paid(account_of(batch, invoice.tenant), invoice, at, NOTHING_DUE)
    sub = batch.get(UUID(invoice.subscription_id)) if invoice.subscription_id else None
    if isinstance(sub, Subscription) and sub.status == INCOMPLETE:
        _activate(batch, sub, at, by)


def _billed_to(batch: _Batch, tenant: str) -> dict[str, Any] | None:
    """The customer on a document finalized now: its tax profile's name, country and tax id (None without one)."""
    roster = batch.get(roster_id(tenant))
    profile = roster.tax_profile if roster is not None else None
    if not profile:
        return None
    return {name: profile.get(name) for name in ("business_name", "country", "subdivision", "tax_id")}


# What a catalogue published before session 14 stored as its seller's name when it declared none (the model's
# default then): read as no name, so such a catalogue's documents keep naming the issuer setting, as they did.
_UNDECLARED_SELLER_NAME = "billing"


def _seller(batch: _Batch, issuer: str) -> dict[str, Any]:
    """The seller on a document finalized now: the catalogue's ``seller`` (its name, address, country and VAT id),
    named by the issuer setting the document is numbered for when the catalogue declares no name. Before session 14
    the name was always the setting (``BILLING_INVOICE_ISSUER``, default ``billing``), printed beside the catalogue
    seller's VAT id: "Issuer: billing" on Billing GmbH's invoices."""
    catalog = batch.get(Catalog.create_id())
    seller = (catalog.document.get("seller") if catalog is not None else None) or {}
    name = seller.get("name")
    found = {"name": name if name and name != _UNDECLARED_SELLER_NAME else issuer, "country": seller.get("country"),
             "vat_id": seller.get("vat_id")}
    if seller.get("address"):
        found["address"] = seller["address"]
    return found


def _document(app: LedgerApplication, batch: _Batch, sub: Subscription, key: str, lines: list[dict[str, Any]],
              at: datetime, by: str, *, finalize: bool, start: datetime | None = None,
              end: datetime | None = None, corrects: Invoice | None = None) -> Invoice | None:
    """An invoice (total >= 0) or a credit note (total < 0) for ``lines``; one per key, ever. ``corrects``: the
    invoice whose period a change or cancel credits (``related_invoice``; see ``_tax_lines``)."""
    if not lines:
        return None
    if batch.get(invoice_id(sub.tenant, key)) is not None:
        return None
    total = sum((Decimal(item["amount"]) for item in lines), Decimal(0))
    kind = CREDIT_NOTE if total < 0 else INVOICE
    invoice = Invoice(tenant=sub.tenant, key=key, document_type=kind, currency=sub.plan["currency"], lines=lines,
                      period_start=start, period_end=end, subscription_id=str(sub.id),
                      related_invoice=str(corrects.id) if corrects is not None else None, at=at, by=by)
    batch.add(invoice)
    if corrects is not None and any(Decimal(item["amount"]) < 0 for item in lines):
        corrects.record_correction(document=invoice.id, by=by)  # it can no longer be voided (``void_invoice``)
    if finalize:
        _finalize(app, batch, invoice, at, by)
        if corrects is not None and invoice.status != VOID:
            _record_given_back(corrects, invoice, by)
    return invoice


def _start_billing(app: LedgerApplication, batch: _Batch, account: BillingAccount, sub: Subscription, at: datetime,
                   by: str, *, finalize: bool) -> None:
    """A billed period begins: recurring credits for it (paying the period's overage posted before them, a trial
    that ended before its tick: ``_repay_period_overage``), and its invoice (base fee in advance)."""
    sub.set_recurring_grants(_grant_recurring(account, sub, sub.period_start, sub.period_end, by))
    _check_thresholds(account, _repay_period_overage(account, sub, sub.recurring_grants, at), at, top_up=True)
    _first_invoice(app, batch, sub, at, by, finalize=finalize)


def _first_invoice_key(sub: Subscription) -> str:
    return period_invoice_key(sub.id, sub.period_start)


def _first_invoice(app: LedgerApplication, batch: _Batch, sub: Subscription, at: datetime, by: str, *,
                   finalize: bool) -> Invoice | None:
    """The invoice of the period starting now: its base fee in advance."""
    return _document(app, batch, sub, _first_invoice_key(sub),
                     [_including(period_fee_line(sub.plan, sub.quantity, sub.period_start, sub.period_end, sub.time_zone),
                                 _included_credit(sub.plan, sub.quantity))], at, by,
                     finalize=finalize, start=sub.period_start, end=sub.period_end)


def _collection(payload: dict[str, Any], plan: dict[str, Any]) -> str:
    """How the subscription's first invoice is collected: the payload's ``collection``, else the plan's, else
    ``invoice`` (access at once, collected afterwards)."""
    collection = payload.get("collection") or plan.get("collection") or INVOICE_COLLECTION
    if collection not in COLLECTIONS:
        raise CommandRejected("invalid_collection", f"collection must be one of {', '.join(COLLECTIONS)}, "
                                                    f"not {collection!r}")
    return str(collection)


def _activate(batch: _Batch, sub: Subscription, at: datetime, by: str) -> None:
    """``charge_before_access``: the first invoice is paid. Active from ``at`` (its first full period starts
    then), its capacity pooled and its recurring credits for that period granted, in the paying transaction.
    The capacity only rises, so it is set whatever is allocated (a payment received is never refused)."""
    roster = _roster(batch, sub.tenant)
    before = _capacities(_live_subscriptions(batch, roster))
    first = str(invoice_id(sub.tenant, _first_invoice_key(sub)))  # keyed by the start it had when it was billed
    sub.activate(at=at, by=by)
    _set_pools(batch, sub.tenant, before, _capacities(_live_subscriptions(batch, roster)), f"activated {sub.key}",
               force=True)
    account = account_of(batch, sub.tenant)
    sub.set_recurring_grants(_grant_recurring(account, sub, sub.period_start, sub.period_end, by))
    # The fee it paid is recognised over that first period, from now (it was deferred, pending, when billed), but
    # for the share of its included credit in the currency, granted now: that is earned as the credit is used.
    invoice = batch.get(UUID(first))
    deferred = _deferred_fee(invoice) if isinstance(invoice, Invoice) else None
    account.start_fee_schedule(invoice=first, start=sub.period_start, end=sub.period_end, at=at,
                               included=(deferred or {}).get("included", 0))


def _expire_incomplete(batch: _Batch, sub: Subscription, at: datetime, by: str,
                       reason: str = INCOMPLETE_EXPIRED) -> None:
    """An ``incomplete`` subscription whose first invoice was not paid: canceled (``incomplete_expired``; a
    user's cancel: ``canceled``), off the roster (the account's limit no longer counts it), its invoice voided
    and what it billed reversed. Nothing was granted and no capacity given, so nothing else moves."""
    sub.expire_incomplete(at=at, by=by, reason=reason)
    _roster(batch, sub.tenant).release(subscription_id=sub.id, at=at)
    invoice = batch.get(invoice_id(sub.tenant, _first_invoice_key(sub)))
    if invoice is not None and invoice.status == FINALIZED:
        invoice.void(at=at, reason=INCOMPLETE_EXPIRED, by=by)
        account_of(batch, sub.tenant).void_invoice_bill(invoice=str(invoice.id), at=at,
                                                        cause={"invoice_number": invoice.number})


# -- handlers ------------------------------------------------------------------------------------------------

def _join_workspace(batch: _Batch, roster: Roster, name: str, at: datetime, by: str) -> Workspace:
    """The account joins workspace ``name`` (its roster records it, the workspace lists it), in the command's
    transaction: two accounts subscribing at once both write the workspace, so the second is decided again on the
    first's membership (an optimistic-concurrency conflict) and gets no trial."""
    roster.join_workspace(workspace=name, at=at, by=by)
    workspace: Workspace = batch.get_or_create(workspace_id(name), lambda: Workspace(workspace=name))
    workspace.add_account(roster.tenant)
    return workspace


def workspace_view(workspace: Workspace) -> dict[str, Any]:
    return {"workspace": workspace.workspace, "accounts": list(workspace.accounts)}


@handles("workspace.add_account")
def add_to_workspace(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> dict[str, Any]:
    """Admin (``PUT /v1/workspaces/{workspace}/accounts/{tenant}``, ``billing workspace add-account``): the account
    is a member of the workspace from now on, so no account of it gets a trial while it has more than one."""
    tenant = _tenant(command)
    account_of(batch, tenant)
    name = fields.key(command, "workspace")
    return workspace_view(_join_workspace(batch, _roster(batch, tenant), name, effective_at(command),
                                          command.issued_by))


@handles("subscription.create")
def create_subscription(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> dict[str, Any]:
    payload = command.payload
    tenant = command.tenant
    account = account_of(batch, tenant)
    assert tenant is not None
    key = fields.key(command, "key")  # reachable at .../subscriptions/{key}: no '/', at most 128 characters
    # Every field is checked as documented (``http_models.SubscriptionCreate``) before anything changes: a
    # ``quantity`` of 2.5 or "3" or a ``trial`` of "no" is rejected, never truncated or read by its truth.
    quantity = fields.whole(command, "quantity", default=1)
    wants_trial = fields.flag(command, "trial", default=True)
    time_zone = read_time_zone(command, "time_zone")
    workspace_name = fields.key(command, "workspace") if command.payload.get("workspace") is not None else None
    at = fields.bounded_at(command)
    if batch.get(subscription_id(tenant, key)) is not None:
        raise CommandRejected("subscription_exists", f"subscription {key!r} exists")
    plan = _billed_in(_plan(batch, fields.text(command, "plan"), fields.optional_whole(command, "plan_version")),
                      account.currency)
    roster = _roster(batch, tenant)
    # Seed 004: a trial needs the workspace to have exactly one billing account, this one. Naming a workspace joins
    # it (in this transaction: refused, the command changes nothing); named before, the account's is counted. Before
    # session 13 the name was only looked up (never joined), without counting the subscribing account: every account
    # of a workspace got a trial, and an account outside a one-account workspace got one there too.
    if workspace_name is not None:
        workspace = _join_workspace(batch, roster, workspace_name, at, command.issued_by)
    else:
        workspace = batch.get(workspace_id(roster.workspace)) if roster.workspace else None
    accounts_in_workspace = len({*workspace.accounts, tenant}) if workspace is not None else 1
    trial = wants_trial and int(plan.get("trial_days", 0)) > 0 and roster.trial_eligible(accounts_in_workspace)
    before = _capacities(_live_subscriptions(batch, roster))
    collection = _collection(payload, plan)
    sub = Subscription.start(tenant=tenant, key=key, plan=plan, quantity=quantity,
                             time_zone=time_zone, at=at, trial=trial, by=command.issued_by,
                             collection=collection)
    roster.admit(subscription_id=sub.id, limit=getattr(app, "max_active_subscriptions", 3), trial=trial, at=at)
    batch.add(sub)
    _set_pools(batch, tenant, before, _capacities([*_live_subscriptions(batch, roster)]), f"subscription {key}")
    if sub.status == ACTIVE:
        _start_billing(app, batch, account, sub, at, command.issued_by, finalize=True)
    elif sub.status == INCOMPLETE:  # charge_before_access: the invoice to pay first, nothing granted before
        first = _first_invoice(app, batch, sub, at, command.issued_by, finalize=True)
        return {"subscription_id": str(sub.id), "status": sub.status, "trial_end": None,
                "invoice_id": str(first.id) if first is not None else None}
    return {"subscription_id": str(sub.id), "status": sub.status, "trial_end": sub.trial_end}


@handles("subscription.change")
def change_subscription(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> dict[str, Any]:
    tenant = _tenant(command)
    account = account_of(batch, tenant)
    sub = _subscription(batch, tenant, fields.text(command, "key"))
    plan_code, plan_version = fields.optional_text(command, "plan"), fields.optional_whole(command, "plan_version")
    new_quantity = fields.optional_whole(command, "quantity")  # null or absent: the same
    new_plan = _billed_in(_plan(batch, plan_code, plan_version), sub.plan["currency"]) if plan_code else sub.plan
    quantity = sub.quantity if new_quantity is None else new_quantity
    at = fields.bounded_at(command)
    roster = _roster(batch, tenant)
    if _trial_over(sub, at):
        # The trial ended before the change and no tick has ended it yet: it ends first, as the tick would
        # (``_end_trial``, as a cancel's does), so the change prorates against the converted paid period (its
        # first invoice billed at the old plan from the trial's end, the change's credit and charge for the rest)
        # and rating sees the conversion before the change. Before, the change was taken as a trial's (no
        # proration) and the late tick billed the new plan for the whole first period, the time before the
        # change included. Without a payment method the trial ends unconverted: nothing is left to change
        # (refused, so nothing changes: the tick ends it).
        _end_trial(app, batch, account, roster, sub, at)
        if sub.status not in LIVE:
            raise CommandRejected("invalid_transition", f"subscription {sub.key!r} ended with its trial on "
                                                        f"{sub.trial_end.isoformat() if sub.trial_end else '?'} "
                                                        "(no payment method): nothing to change")
    if sub.live and at >= sub.period_end:
        # The period ended before the change and no tick has renewed it yet: the periods due end first, as the
        # tick would end them (``_renew_due``, as a cancel's does), so the ended period's renewal bills the old plan
        # from its end (rating closes it at the old plan's prices) and the change prorates against the period it
        # falls in, the one rating rated the usage since into. Before, it prorated nothing (the old period was
        # over) and the late tick billed the new plan for the whole new period, the days before the change too.
        _renew_due(app, batch, account, roster, sub, at, doing="changing it", top_up=True)
        _refuse_if_ended(sub, "change")
    lines = quote_change(status=sub.status, plan=sub.plan, quantity=sub.quantity, period_start=sub.period_start,
                         period_end_at=sub.period_end, time_zone=sub.time_zone, new_plan=new_plan,
                         new_quantity=quantity, at=at)
    before = _capacities(_live_subscriptions(batch, roster))
    plan_changed = new_plan != sub.plan
    quantity_changed = quantity != sub.quantity
    old_plan, old_quantity = sub.plan, sub.quantity
    old_fraction = proration_fraction(sub.period_start, sub.period_end, at)
    corrected = live_period_invoice(sub, batch.get)  # before the change names its own document
    quoted = lines
    lines = _left_to_give_back(credit_live_invoice(lines, sub, corrected, at, canceled=False), corrected)
    # The period's fee was given back in full (its invoice voided, or refunded): nothing of it is credited, the
    # change bills the new plan's rest as quoted. Its included credit in the currency is no longer funded by it.
    fee_given_back = _includes_credit(corrected) and any(_unused_time_line(item) for item in quoted) \
        and not any(_unused_time_line(item) for item in lines)
    if corrected is not None and corrected.status == VOID:
        corrected = None  # nothing bills the period: the change's document corrects no invoice
    key = change_invoice_key(sub.id, command.command_id)
    sub.change(plan=new_plan, quantity=quantity, at=at, by=command.issued_by, lines=lines,
               invoice=invoice_id(tenant, key))
    _set_pools(batch, tenant, before, _capacities(_live_subscriptions(batch, roster)), f"change {sub.key}")
    if (plan_changed or quantity_changed) and sub.status != TRIALING and (
            new_plan.get("recurring_credits") or sub.recurring_grants):
        # The old plan's remaining recurring grant is voided and the new one issued, atomically: the new
        # allotment for the rest of the period, plus what is left of the old beyond its own (_change_carry).
        # A change at the instant of the one before takes on what that one left (``Subscription.left_at``).
        kept, unclaimed = sub.left_at(at)
        carried, unclaimed = _change_carry(account, sub, old_plan, old_quantity, old_fraction, unclaimed)
        fraction = proration_fraction(sub.period_start, sub.period_end, at)
        included = _included_credit(sub.plan, sub.quantity, fraction)
        lapse = 0
        if fee_given_back:
            # No credit for unused time takes the old grants' remainder out of DEFERRED_REVENUE: what of it the new
            # grants do not carry lapses (breakage), as an immediate cancel's would, and the new fee includes no more
            # credit than its grants hold (credit used beyond the elapsed time's share came out of the new
            # allotment: that share of the fee is earned with the rest). Back in DEFERRED_REVENUE, nothing took the
            # old allotment's rest out (5.00 left there for Nov 16 - Dec 1 of 10.00 a month).
            credits, left = sub.plan.get("recurring_credits") or [], _currency_recurring_left(account, sub)
            granting = sum(amount for index, amount in _recurring_amounts(sub, carried, fraction).items()
                           if credits[index]["unit"] == sub.plan["currency"])
            lapse, included = max(left - max(granting - included, 0), 0), min(included, granting)
        # The new grant of each unit takes what is left of the old ones now (late usage from before the change draws
        # it there); a unit it does not grant keeps its rest in the old grants for that usage, lapsed after it.
        amounts = _recurring_amounts(sub, carried, fraction)
        credits = sub.plan.get("recurring_credits") or []
        for unit, index in _first_credits(sub).items():
            if index not in amounts and str(index) in carried:  # its new grant comes to nothing: not granted
                unclaimed[unit] = _allotment(credits[index], sub.quantity, fraction) + carried[str(index)]
        # What of the old grants' rest the new ones do not hold stays their reserve for that usage (``holds``); the
        # credit for unused time takes what moved in the currency out of DEFERRED_REVENUE (``included_back``), also
        # when it corrects a plan without credit in it, if it moves the credit a change at this instant kept (the
        # first plan's, whose fee included it).
        states = {g["grant_id"]: g for g in account.grant_balances()}
        takes_back = not fee_given_back and (_includes_credit(corrected) or any(
            states[grant]["unit"] == sub.plan["currency"] and states[grant]["remaining"] > 0
            for grant in kept if grant in states))
        _, voided, returned = _close_recurring(
            account, sub, at, command.issued_by, "plan_changed", rollover=False, lapse_currency=lapse,
            successors=_successors(sub, at, amounts, change=command.command_id), holds=_successor_holds(sub, amounts),
            included_back=takes_back, kept=kept)
        states = {g["grant_id"]: g for g in account.grant_balances()}
        kept = [grant for grant in [*sub.recurring_grants, *kept] if grant in states
                and states[grant]["status"] == "open" and states[grant]["unit"] in unclaimed]
        sub.set_recurring_grants(_grant_recurring(
            account, sub, at, sub.period_end, command.issued_by, carried,
            fraction=fraction, change=command.command_id), at=at, kept=kept, unclaimed=unclaimed)
        # The new fee's included credit in the currency (the new allotment for the rest of the period) is not
        # recognised ratably; what the old grants had left beyond what the new ones carry, plus that allotment,
        # came back to DEFERRED_REVENUE from the wallet: the credit for unused time takes it out again.
        back = returned - _granted_in_currency(account, sub.recurring_grants, sub.plan["currency"]) + included \
            if takes_back else 0
        lines = _with_included(lines, included, back)
        # Usage since ``at`` already posted beyond credit (the change came later, given an earlier ``at``) drew
        # nothing of the new grants: they repay it, as they would have covered it on time.
        voided |= _repay_period_overage(account, sub, sub.recurring_grants, at, since=at)
    else:
        voided = set()
    _document(app, batch, sub, key, lines, at, command.issued_by, finalize=True, start=at, end=sub.period_end,
              corrects=corrected)
    _check_thresholds(account, voided, at, top_up=True)  # after the new grants and a downgrade's credit note
    return {"subscription_id": str(sub.id), "lines": lines}


@handles("subscription.cancel")
def cancel_subscription(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> dict[str, Any]:
    tenant = _tenant(command)
    account = account_of(batch, tenant)
    sub = _subscription(batch, tenant, fields.text(command, "key"))
    immediately = fields.flag(command, "immediately")  # checked before the incomplete case ends it
    at = fields.bounded_at(command)
    if sub.status == INCOMPLETE:  # never paid, nothing granted: it ends now, its unpaid invoice voided
        first = batch.get(invoice_id(tenant, _first_invoice_key(sub)))
        if first is not None and first.status == FINALIZED and first.payment_under_way:
            # Voiding the invoice now would refuse the payment already on its way (a SEPA debit takes days).
            raise CommandRejected("payment_pending", "the first invoice's payment is under way: cancel once it "
                                                     "has succeeded (then as any subscription) or failed")
        _expire_incomplete(batch, sub, at, command.issued_by, reason="canceled")
        return {"subscription_id": str(sub.id), "status": sub.status, "lines": []}
    roster = _roster(batch, tenant)
    if immediately and _trial_over(sub, at):
        # The trial ended before the cancel and no tick has ended it yet: it ends first, as the tick would end it
        # (``_end_trial``). Rating rated the usage since the trial's end into the period the conversion starts
        # (``period_ahead``): converted, that period is the one the cancel cuts below, so that usage is on the
        # final invoice once, with the fee of the time used since the trial's end (the rest credited); without a
        # payment method the trial ends unconverted, as the tick's would (rating closes those periods on its
        # ``Canceled``), and the cancel has nothing left to end. Before, the cancel cut the trial's period: its
        # final draft had no key that usage went under (real-time usage billed only as earlier overage, usage
        # priced at close never priced).
        _end_trial(app, batch, account, roster, sub, at)
        if sub.status not in LIVE:
            return {"subscription_id": str(sub.id), "status": sub.status, "lines": []}
    if at >= sub.period_end:
        # The period ended before the cancel and no tick has renewed it yet: the periods due end first, as the tick
        # would end them, immediately or not. A cancel at period end then ends the period the customer is in (the
        # one rating rates the usage since into), billed by its renewal; before session 13 it took the old end,
        # already past, so the subscription ended there and that period was never billed.
        _renew_due(app, batch, account, roster, sub, at, doing="canceling", top_up=False)
        if sub.status not in LIVE:  # it was set to cancel at that period's end: it ended there, nothing to cut
            return {"subscription_id": str(sub.id), "status": sub.status, "lines": []}
    # A period that began while paused was never billed: nothing of it to credit.
    lines = quote_cancel(status=sub.status, plan=sub.plan, quantity=sub.quantity, period_start=sub.period_start,
                         period_end_at=sub.period_end, at=at) if immediately and sub.period_billed else []
    before = _capacities(_live_subscriptions(batch, roster))
    cut_start = sub.period_start
    minimum = sub.period_minimum(until=at) if immediately else Decimal(0)  # before the cancel: a trial commits 0
    corrected = live_period_invoice(sub, batch.get) if lines else None
    # A voided change's document no longer bills the period: the document it corrected does, at its own amounts.
    lines = credit_live_invoice(lines, sub, corrected, at, canceled=True)
    # The period's fee included credit in the currency and was given back in full (voided, or refunded): the void
    # or refund took all of the fee out of revenue, the included credit's share too, and the customer kept the
    # credit, earned back as it is used or lapses. The cancel voids what is left of it: it lapses (breakage), as
    # it would at the period's end; back in DEFERRED_REVENUE no schedule nor credit would ever take it out.
    fee_given_back = _includes_credit(corrected)
    if corrected is not None and corrected.status == VOID:
        lines, corrected = [], None  # the period's fee was voided, never owed: no unused time to credit
    lines = _left_to_give_back(lines, corrected)  # refunded in full: nothing left to credit either
    if not lines:
        corrected = None
    fee_given_back = fee_given_back and corrected is None
    sub.cancel(at=at, by=command.issued_by, immediately=immediately, lines=lines)
    if immediately:
        _set_pools(batch, tenant, before, _capacities(_live_subscriptions(batch, roster)), f"cancel {sub.key}")
        roster.release(subscription_id=sub.id, at=at)
        # The included credit in the currency left unused stays open for the late usage of before the cancel, then
        # lapses (since session 14); only a grant voided at once (granted before session 9, or cut at its start) goes
        # back from the wallet to DEFERRED_REVENUE, and the credit for unused time takes that out again (the corrected
        # invoice did not recognise it ratably).
        left = _currency_recurring_left(account, sub) if fee_given_back else 0
        _, voided, returned = _close_recurring(account, sub, at, command.issued_by, "subscription_canceled",
                                               rollover=False, lapse_currency=left)
        back = returned if _includes_credit(corrected) else 0
        _document(app, batch, sub, f"{sub.id}/cancel", _with_included(lines, 0, back), at, command.issued_by,
                  finalize=True, start=at, end=sub.period_end, corrects=corrected)
        _check_thresholds(account, voided, at, top_up=False)  # after its credit note
        if at > cut_start:
            # The period is cut short at the cancel: rating closes [start, at) on this Canceled event and sends
            # its usage lines under the key of a period ending at ``at``; they go on a final draft without a fee,
            # with the minimum spend of the time before the cancel (nothing to bill: voided unnumbered).
            final = _final_usage_draft(batch, sub, cut_start, at, at)
            _commit_minimum(final, sub, minimum)
    return {"subscription_id": str(sub.id), "status": sub.status, "lines": lines}


def _renew_due(app: LedgerApplication, batch: _Batch, account: BillingAccount, roster: Roster, sub: Subscription,
               at: datetime, *, doing: str, top_up: bool) -> None:
    """A command at ``at`` (a cancel, a change, a pause, a resume), after the current period's end,
    before the scheduler's tick renewed it: the periods that ended by ``at`` end first, each as the tick would end
    it (``_renew``: its renewal draft with the next period's fee, which rating's ``PeriodEnded`` usage lines
    finalize; a paused one's without a fee), so the command acts on the period ``at`` falls in, as rating placed
    the usage since the old end (``period_ahead``). Without it a cancel cut the old period at ``at`` (the usage
    rated ahead never invoiced, no fee for the time after the old end), a change prorated nothing and the late
    tick billed the new plan for the whole next period (the ended one's usage priced at close by the new plan),
    a pause left the next period unbilled and a resume billed all of it. ``doing`` names the command in the
    rejection; ``top_up``: whether the renewals' new balances may request an auto-top-up (a cancel's may not: the
    customer is leaving)."""
    since = sub.period_end
    for _ in range(CANCEL_RENEWALS_MAX):
        if at < sub.period_end or _renew(app, batch, account, roster, sub, at, top_up=top_up)["transition"] is None:
            return
    if at >= sub.period_end and sub.live:  # rejected: the renewals above are rolled back with the command
        raise CommandRejected("renewals_behind", f"subscription {sub.key!r} has more than {CANCEL_RENEWALS_MAX} "
                                                 f"periods ended since {since.isoformat()} not renewed: tick it "
                                                 f"(subscription.tick) before {doing}")


@handles("subscription.pause")
def pause_subscription(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> None:
    """Paused from ``at``: the period already billed runs to its end, the next is not billed. Issued after the
    current period's end before the tick renewed it, the periods due end first, as the tick would end them, so the
    period ``at`` falls in is billed (it began before the pause) and the pause stops billing from the next one;
    before, the late tick found it paused and left that period unbilled."""
    tenant = _tenant(command)
    sub = _subscription(batch, tenant, fields.text(command, "key"))
    at = fields.bounded_at(command)
    if sub.live and at >= sub.period_end:
        _renew_due(app, batch, account_of(batch, tenant), _roster(batch, tenant), sub, at, doing="pausing it",
                   top_up=True)
        _refuse_if_ended(sub, "pause")
    sub.pause(at=at, by=command.issued_by)


@handles("subscription.resume")
def resume_subscription(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> dict[str, Any]:
    """Active again. In a period that began while paused (unbilled), the rest of it is billed now and its
    recurring credits granted for the rest of it, both prorated like a change. Issued after the current period's
    end before the tick renewed it, the periods due end first, as the tick would end them (paused: unbilled), so
    the resume bills the rest of the period ``at`` falls in; before, the late tick billed all of it, the days
    paused before the resume included."""
    tenant = _tenant(command)
    sub = _subscription(batch, tenant, fields.text(command, "key"))
    at = fields.bounded_at(command)
    account = account_of(batch, tenant)
    if sub.live and at >= sub.period_end:
        _renew_due(app, batch, account, _roster(batch, tenant), sub, at, doing="resuming it", top_up=True)
        _refuse_if_ended(sub, "resume")
    billed_from = sub.resume(at=at, by=command.issued_by)
    if billed_from is None:
        return {"subscription_id": str(sub.id), "lines": []}
    fraction = proration_fraction(sub.period_start, sub.period_end, billed_from)
    sub.set_recurring_grants(_grant_recurring(
        account, sub, billed_from, sub.period_end, command.issued_by, fraction=fraction))
    # Usage since the resume already posted beyond credit (the resume came later, given an earlier ``at``): the
    # credits repay it, as they would have covered it on time; usage while paused before it stays owed.
    _check_thresholds(account, _repay_period_overage(account, sub, sub.recurring_grants, at, since=billed_from), at,
                      top_up=True)
    lines = [_including(item, _included_credit(sub.plan, sub.quantity, fraction))
             for item in quote_resume(plan=sub.plan, quantity=sub.quantity, period_start=sub.period_start,
                                      period_end_at=sub.period_end, at=billed_from)]
    _document(app, batch, sub, resume_invoice_key(sub.id, billed_from), lines, at, command.issued_by,
              finalize=True, start=billed_from, end=sub.period_end)
    return {"subscription_id": str(sub.id), "lines": lines}


def _refuse_if_ended(sub: Subscription, what: str) -> None:
    """After ``_renew_due`` of a live subscription: one set to cancel at its period's end has ended there, so a
    command that needs it live is refused (and the renewal with it: nothing changes; the tick ends it)."""
    if sub.status not in LIVE:
        raise CommandRejected("invalid_transition", f"subscription {sub.key!r} ended on {sub.period_end.isoformat()} "
                                                    f"(canceled at its period's end): nothing to {what}")


@handles("subscription.tick")
def tick_subscription(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> dict[str, Any]:
    """Time passes for one subscription (the scheduler's command): trial end, or period end and renewal."""
    tenant = _tenant(command)
    account = account_of(batch, tenant)
    sub = _subscription(batch, tenant, str(command.payload["key"]))
    at = effective_at(command)
    roster = _roster(batch, tenant)
    if sub.status == INCOMPLETE:  # charge_before_access, still unpaid: expires after INCOMPLETE_EXPIRY_DAYS
        if at < incomplete_expires_at(sub):
            return {"transition": None}
        first = batch.get(invoice_id(tenant, _first_invoice_key(sub)))
        if first is not None and first.status == FINALIZED and first.payment_under_way:
            # A charge of it is pending (a SEPA debit takes days): expiring now would void an invoice the
            # customer is paying. Its webhook activates it; its failure is a failed dunning attempt, and
            # dunning's last failed attempt expires it (``invoice.payment_failed``, final).
            return {"transition": None, "payment_pending": True}
        _expire_incomplete(batch, sub, at, "system:incomplete_expiry")
        return {"transition": INCOMPLETE_EXPIRED}
    if _trial_over(sub, at):
        return {"transition": _end_trial(app, batch, account, roster, sub, at)}
    return _renew(app, batch, account, roster, sub, at, top_up=True)


def _trial_over(sub: Subscription, at: datetime) -> bool:
    """Whether ``sub`` is still trialing although its trial has ended by ``at`` (the tick has not ended it)."""
    return sub.status == TRIALING and sub.trial_end is not None and at >= sub.trial_end


def _end_trial(app: LedgerApplication, batch: _Batch, account: BillingAccount, roster: Roster, sub: Subscription,
               at: datetime) -> str:
    """Ends a trial whose end has come by ``at``: with a usable payment method it converts (``TrialConverted``,
    its first billed period from the trial's end, its first invoice finalized at once), else it ends unconverted
    (``Canceled``, reason ``trial_ended_without_payment_method``). Usable: a saved method whose card has not
    expired by ``at`` (``Roster.usable_payment_method``): an expired default gives way to a valid backup (which
    dunning then charges first), and only expired cards are no payment method. The scheduler's tick and an
    immediate cancel issued after the trial's end (``cancel_subscription``) both end a trial here. Returns the
    transition."""
    before = _capacities(_live_subscriptions(batch, roster))
    if sub.end_trial(at=at, has_payment_method=roster.usable_payment_method(at) is not None):
        _start_billing(app, batch, account, sub, at, "system:trial", finalize=True)  # first invoice at once
        return "trial_converted"
    # The trial ends whatever is allocated (the scheduler's tick for this due time is sent once).
    _set_pools(batch, sub.tenant, before, _capacities(_live_subscriptions(batch, roster)), "trial ended", force=True)
    roster.release(subscription_id=sub.id, at=at)
    return "trial_ended"


def _renew(app: LedgerApplication, batch: _Batch, account: BillingAccount, roster: Roster, sub: Subscription,
           at: datetime, *, top_up: bool) -> dict[str, Any]:
    """Ends ``sub``'s current period if it has ended by ``at`` (once per period): renews it (the renewal draft,
    the next period's recurring credits) or, canceled at period end, ends the subscription. The scheduler's tick
    and a cancel, change, pause or resume issued after the period's end (``_renew_due``) both end a period here.
    ``top_up``: whether the renewal's new balances may request an auto-top-up (a cancel requests none)."""
    tenant = sub.tenant
    ended_start, ended_end = sub.period_start, sub.period_end
    minimum = sub.period_minimum()  # the ended period's commitment on usage, before renew moves on
    before = _capacities(_live_subscriptions(batch, roster))
    if not sub.renew(at=at):
        return {"transition": None}
    if sub.status not in LIVE:  # canceled at period end: its capacity goes, whatever is allocated
        _set_pools(batch, tenant, before, _capacities(_live_subscriptions(batch, roster)),
                   f"canceled at period end {sub.key}", force=True)
        _, voided, _ = _close_recurring(account, sub, at, "system:period_end", "subscription_canceled",
                                        rollover=False, ended=True, now=at)
        _check_thresholds(account, voided, at, top_up=False)
        roster.release(subscription_id=sub.id, at=at)
        # No fee for a next period, but the ended one's usage is still billed: a final draft under the key
        # rating's usage lines name (the period's end); without usage (or minimum) it is voided unnumbered.
        final = _final_usage_draft(batch, sub, ended_start, ended_end, at)
        _commit_minimum(final, sub, minimum)
        return {"transition": "canceled_at_period_end"}
    if sub.status == PAUSED:
        # Paused: the new period is not billed and gets no credits (resume bills its rest). The draft still
        # takes rating's usage lines of the ended period, which was live until its end.
        _, voided, _ = _close_recurring(account, sub, ended_end, "system:renewal", "period_ended", rollover=False,
                                        ended=True, now=at)
        _check_thresholds(account, voided, ended_end, top_up=top_up)  # nothing granted while paused: a real drop
        sub.set_recurring_grants([])
        draft = _document(app, batch, sub, period_invoice_key(sub.id, sub.period_start),
                          [paused_period_line(sub.plan, sub.quantity, sub.period_start, sub.period_end, sub.time_zone)], at,
                          "system:renewal", finalize=False, start=ended_start, end=sub.period_end)
        _commit_minimum(draft, sub, minimum)
        return {"transition": "renewed_paused", "ended": [ended_start, ended_end]}
    carried, voided, _ = _close_recurring(account, sub, ended_end, "system:renewal", "period_ended", rollover=True,
                                          ended=True, now=at, successors=_successors(sub, sub.period_start))
    sub.set_recurring_grants(_grant_recurring(account, sub, sub.period_start, sub.period_end, "system:renewal",
                                              carried))
    repaid = _repay_period_overage(account, sub, sub.recurring_grants, at)  # a late tick: the period's usage so far
    _check_thresholds(account, voided | repaid, ended_end, top_up=top_up)  # on the new period's credit
    # The renewal invoice: next period's base fee in advance; rating adds the ended period's usage lines
    # (invoice.usage_lines) and that finalizes it, so one invoice carries both (seed 001 "hybrid billing").
    draft = _document(app, batch, sub, period_invoice_key(sub.id, sub.period_start),
                      [_including(period_fee_line(sub.plan, sub.quantity, sub.period_start, sub.period_end, sub.time_zone),
                                  _included_credit(sub.plan, sub.quantity))], at,
                      "system:renewal", finalize=False, start=ended_start, end=sub.period_end)
    _commit_minimum(draft, sub, minimum)
    return {"transition": "renewed", "ended": [ended_start, ended_end]}


def _final_usage_draft(batch: _Batch, sub: Subscription, start: datetime, end: datetime, at: datetime) -> Invoice:
    """The draft that takes the last period's usage lines of a subscription ended at its period's end."""
    key = f"{sub.id}/{end.isoformat()}"
    found = batch.get(invoice_id(sub.tenant, key))
    if found is not None:
        return found  # type: ignore[no-any-return]
    draft = Invoice(tenant=sub.tenant, key=key, document_type=INVOICE, currency=sub.plan["currency"], lines=[],
                    period_start=start, period_end=end, subscription_id=str(sub.id), related_invoice=None, at=at,
                    by="system:period_end")
    batch.add(draft)
    return draft


def incomplete_expires_at(sub: Subscription) -> datetime:
    """When an ``incomplete`` subscription still unpaid is canceled (the scheduler ticks it then)."""
    return sub.started_at + timedelta(days=INCOMPLETE_EXPIRY_DAYS)


def _commit_minimum(draft: Invoice | None, sub: Subscription, minimum: Decimal) -> None:
    """The renewal draft records the ended period's minimum spend: rating's usage lines bill its shortfall."""
    if draft is not None and minimum > 0:
        draft.commit_minimum_spend(amount=minimum, currency=sub.plan["currency"], by="system:renewal")


@handles("tax_profile.set")
def set_tax_profile(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> dict[str, Any]:
    account_of(batch, command.tenant)
    payload = command.payload
    country = payload.get("country")
    if not isinstance(country, str) or len(country) != 2 or not country.isalpha():
        raise CommandRejected("invalid_tax_profile", "country must be an ISO 3166-1 alpha-2 code")
    country = country.upper()
    if pycountry.countries.get(alpha_2=country) is None:  # "XX" has the shape of a code, not a country's
        raise CommandRejected("invalid_tax_profile", f"country {country!r} is not an ISO 3166-1 country code")
    for name in ("subdivision", "business_name", "tax_id"):  # stored or checked as sent: never a number or a list
        if payload.get(name) is not None and not isinstance(payload[name], str):
            raise CommandRejected("invalid_tax_profile", f"{name} must be a string")
    subdivision = payload.get("subdivision")
    if subdivision and pycountry.subdivisions.get(code=f"{country}-{subdivision.upper()}") is None:
        raise CommandRejected("invalid_tax_profile", f"subdivision {subdivision!r} is not an ISO 3166-2 subdivision "
                                                     f"of {country} (e.g. CA for US-CA)")
    profile: dict[str, Any] = {"country": country, "subdivision": subdivision.upper() if subdivision else None,
                               "business_name": payload.get("business_name"), "tax_id": None, "tax_id_valid": False}
    if payload.get("tax_id"):
        # EU VAT rules only for EU member states, with an id of that member state; elsewhere the country's own
        # format, if known (reverse charge still needs an EU VAT id of another member state: compute_tax).
        check = check_tax_id(country, str(payload["tax_id"]))
        if not check.valid and check.checked:
            reason = "invalid_tax_id"
            if country in EU_MEMBER_STATES:
                reason = "vat_id_country_mismatch" if check.country not in (None, country) else "invalid_vat_id"
            raise CommandRejected(reason, f"tax id {payload['tax_id']!r} is not valid for {country}: {check.reason}")
        profile.update(tax_id=check.number, tax_id_valid=check.valid)
        if country in EU_MEMBER_STATES:
            profile["vies"] = str(payload.get("vies", "not_checked"))
    _roster(batch, command.tenant or "").set_tax_profile(profile=profile, at=effective_at(command), by=command.issued_by)
    return profile

"""What a renewal invoice bills for the ended period's usage: the credits applied and the overage lines.

Real-time drawdown already took what credit covered; what it did not went to ``RECEIVABLES`` (overage),
kept on the account by the period rating priced it in (``BillingAccount.invoice_overage``). Rating's usage
lines show the period's whole usage, so the invoice adds:

* **Prepaid credits applied**: the credit drawn for the usage the lines show: their exact total (``exact_amount``)
  less the period's own overage in the invoice currency, rounded once, never more than the lines bill. The
  period's own overage is that of the periods the usage lines itemise (their ``trace.rating_periods``: a period
  a cadence change cut short is billed with the one it restarted into), besides the ended period's.
* **Credit note credit applied**: what of that credit came from credit notes (a downgrade's or cancel's credit for
  unused time, given back *with its tax*: account credit that is a means of payment, not a discount), on a line of its
  own applied after tax (``after_tax``: not in the taxable net), so the usage it paid bears its VAT like any other
  (``BillingAccount.apply_credit_note_credit``: the account counts it per period as usage draws it). A top-up's credit
  is the net paid (its VAT booked at purchase) and a plan's credit is part of its taxed fee: taken off before tax,
  as before. Before session 14 a credit note's credit was too: usage it paid bore no VAT (35.70 of calls, 6.78).
  Usage no subscription invoice bills (an account without one, captured holds) is taxed the same way by the month's
  credit note usage invoice (``credit_note_usage_commands``, since session 15).
* **Overage** lines for what the usage lines cannot show: overage left from earlier periods (or more than the
  lines itemise), and overage in a credit unit (a meter priced in credits that ran out), priced at the credit
  unit's ``list_price`` in the invoice currency. Credit overage without a list price in that currency cannot
  be billed: it stays receivable, unbilled, and is logged.

* **Usage paid with credits** (a meter priced in a credit unit: rating's line shows 0.00 and the credits the
  usage cost, ``credits``/``credits_unit``): its description says how many of them prepaid credit paid and how many
  went beyond it (the overage the overage line bills), by the meter each period's overage came from
  (``BillingAccount.unbilled_overage_meters``; ``credit_usage_lines``). It said "paid with" all of them.

* **Owed after a refund**: what a gateway refund gave back beyond what its invoice had left to give (credit for
  unused time already given and spent) is owed, unbilled under the refund's time (``owed_refund_key``), so the
  next renewal invoice bills it on a line of its own. Its revenue and tax were booked when it was first billed
  and stay so: the line is ``tax_included`` and not taxed again (``document_tax_lines``), and it is no usage spend.
  An invoice's payment a lost dispute took back (a chargeback, ``owed_chargeback_key``) is billed the same way on a
  line of its own ("Charged back by the card issuer ...").

* **Minimum commitment**: when the ended period committed a minimum spend on usage (the plan's
  ``minimum_spend``, recorded on the draft at renewal), the shortfall below it of the period's usage spend:
  the usage lines at their rated value, before prepaid credits applied (usage paid from credit bought in the
  invoice currency is spend), plus the overage lines billing a credit unit at its list price. Usage paid from
  credits of a credit unit (granted by the plan or bought) shows at 0 and counts nothing.

Each line is rounded once (``invoice.line``), so what these lines bill for the overage taken (exact to the sub-unit)
is off by their rounding: it is posted when they are made (``_post_rounding``,
``BillingAccount.round_invoiced_overage``), so what is receivable for the invoice is what it bills. The overage an
invoice billed, its rounding included, is settled (leaves receivables) when the invoice is paid (``settle_paid``):
the payment books the invoice's total to the minor unit. An
account without a live subscription gets no invoice for its overage: credit it buys pays it off first
(``repay_from_purchase``), like a prepaid balance that went below zero.
"""

from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

from billing_events.catalog import CreditUnitDef
from billing_events.money import (
    RATING_CONTEXT,
    currency,
    from_subunits,
    minor_subunits,
    round_minor,
    to_subunits,
)
from billing_ledger.domain.account import (
    BillingAccount,
    is_owed_chargeback_key,
    is_owed_money_key,
    is_owed_refund_key,
    period_began,
)
from billing_ledger.domain.invoice import Invoice, line
from billing_ledger.domain.roster import roster_id
from billing_runtime.logging import get_logger

log = get_logger(__name__)
# The line applying credit notes' credit after tax (here, and on a month's credit note usage invoice).
CREDIT_NOTE_CREDIT_APPLIED = "Credit note credit applied (a payment, after tax)"


def overage_lines(account: BillingAccount, invoice: Invoice, usage_lines: list[dict[str, Any]],
                  credit_units: dict[str, Any], period_start: datetime, period_end: datetime,
                  at: datetime, own_currency: str | None = None) -> list[dict[str, Any]]:
    """The lines to add after rating's ``usage_lines`` (already rounded, see ``invoice.line``); marks the
    overage they bill as invoiced on the account."""
    money = invoice.currency
    prices = _credit_prices(credit_units, money, own_currency)
    for unit in sorted(set(account.units()) - {money} - set(prices)):
        if unit in credit_units and any(v > 0 for v in account.unbilled_overage(unit).values()):
            log.warning("credit_overage_unpriced", tenant=account.tenant, unit=unit, invoice=str(invoice.id),
                        detail=f"credit unit {unit} has no list_price in {money}: its overage stays unbilled")
    taken = account.invoice_overage(invoice=str(invoice.id), units=[money, *prices], end=period_end, at=at)
    lines: list[dict[str, Any]] = []
    usage = Decimal(0)
    exact = 0
    for item in usage_lines:  # rating's lines, as rounded on the invoice, and at their exact rated value
        usage = RATING_CONTEXT.add(usage, Decimal(item["amount"]))
        exact += to_subunits(Decimal(item.get("exact_amount") or item["amount"]))
    itemised = _itemised_periods(usage_lines)
    taken_money = taken.get(money, {})
    owed_refunds = sum(amount for key, amount in taken_money.items() if is_owed_refund_key(key))
    owed_chargebacks = sum(amount for key, amount in taken_money.items() if is_owed_chargeback_key(key))
    own, earlier = _own_and_earlier({key: amount for key, amount in taken_money.items()
                                     if not is_owed_money_key(key)}, period_start, itemised)
    scale = currency(money)
    # The period's usage at its rated value is what credit covered plus its own overage (real-time drawdown
    # debited exactly the lines' amounts): the credit drawn is the exact difference, rounded once, never more than
    # the usage lines show. Rounding the lines first and taking the overage from them showed their rounding as
    # credit ("Prepaid credits applied -0.01" with no credit at all).
    shown = min(max(own, 0), max(exact, 0))  # the overage the usage lines show
    # What of the credit drawn came from credit notes (given back with its tax: a means of payment), applied after
    # tax on a line of its own (``after_tax``): the usage it paid is taxed like any other (``document_tax_lines``).
    from_notes = account.apply_credit_note_credit(
        invoice=str(invoice.id), unit=money, at=at,
        periods=[key for key in account.credit_note_spend(money)
                 if not is_owed_money_key(key) and (period_began(key) == period_start or key in itemised)])
    if usage > 0:
        applied = min(round_minor(from_subunits(max(exact, 0) - shown), scale), usage)
        paid_by_notes = min(round_minor(from_subunits(from_notes), scale), max(applied, Decimal(0)))
        if applied - paid_by_notes > 0:
            lines.append(line("credits_applied", "Prepaid credits applied", -(applied - paid_by_notes), money))
        if paid_by_notes > 0:
            lines.append(line("credits_applied", CREDIT_NOTE_CREDIT_APPLIED, -paid_by_notes, money, after_tax=True))
    # What the usage lines do not show of the overage taken (earlier periods, or more overage than the lines
    # itemise), rounded once.
    rest = round_minor(from_subunits(own + earlier - shown), scale)
    if rest > 0:
        label = "Overage from earlier periods" if earlier else "Overage beyond the usage itemised above"
        lines.append(line("overage", label, rest, money))
    if owed_refunds > 0:
        lines.append(line("overage", "Refunded beyond what an earlier invoice had left to give back, owed (tax "
                          "included)", from_subunits(owed_refunds), money, tax_included=True))
    if owed_chargebacks > 0:
        lines.append(line("overage", "Charged back by the card issuer (a lost dispute of an earlier invoice's "
                          "payment), owed (tax included)", from_subunits(owed_chargebacks), money, tax_included=True))
    lines += _minimum_already_billed(account, invoice, taken.get(money, {}), period_start, itemised, at)
    _post_rounding(account, invoice, [*usage_lines, *lines], at)
    for unit, price in prices.items():
        own_credits, earlier_credits = _own_and_earlier(taken.get(unit, {}), period_start, itemised)
        if own_credits + earlier_credits <= 0:
            continue
        # The period's own credit overage and what is left of earlier periods' apart: only the former is this
        # period's usage spend (``minimum_commitment_lines``).
        for credits, earlier_periods in ((own_credits, False), (earlier_credits, True)):
            if credits <= 0:
                continue
            quantity = Decimal(format(from_subunits(credits).normalize(), "f"))
            label = f"{quantity} {unit} used beyond prepaid credit{' in earlier periods' if earlier_periods else ''}"
            lines.append(line("overage", f"{label}, at {price} {money} each",
                              RATING_CONTEXT.multiply(quantity, price), money, quantity=str(quantity),
                              unit_amount=str(price), credit_unit=unit, overage_subunits=credits,
                              **({"earlier_periods": True} if earlier_periods else {})))
    return lines


def credit_usage_lines(account: BillingAccount, usage_lines: list[dict[str, Any]], period_start: datetime,
                       ) -> list[dict[str, Any]]:
    """Rating's ``usage_lines`` with each line priced in a credit unit (``credits`` of ``credits_unit``) described
    by what prepaid credit paid of it and what went beyond it, from the period's own unbilled overage of its meter
    (call it before ``overage_lines`` takes that overage). Overage of the period of no known meter is the line's
    when it is the unit's only line; with several, their descriptions claim nothing about credit. A line of a
    rating from before (``(paid with N UNIT)`` in its description, no ``credits``) is read the same way."""
    itemised = _itemised_periods(usage_lines)
    parsed = {index: found for index, item in enumerate(usage_lines)
              if item.get("kind") == "usage" and (found := _credit_usage(item)) is not None}
    result = [dict(item) for item in usage_lines]
    for unit in sorted({found[2] for found in parsed.values()}):
        own = {key: amount for key, amount in account.unbilled_overage(unit).items()
               if amount > 0 and (period_began(key) == period_start or key in itemised)}
        by_meter: dict[str, int] = {}
        for key, parts in account.unbilled_overage_meters(unit).items():
            if key in own:
                for meter, part in parts.items():
                    by_meter[meter] = by_meter.get(meter, 0) + part
        unknown = sum(own.values()) - sum(by_meter.values())
        lines = [index for index, found in parsed.items() if found[2] == unit]
        for index in lines:
            base, credits, _ = parsed[index]
            if unknown > 0 and len(lines) > 1:  # whose that overage was is not known: no claim about credit
                result[index]["description"] = f"{base} ({_credits_text(credits)} {unit})"
                continue
            beyond = max(min(by_meter.get(str(result[index].get("meter")), 0) + max(unknown, 0), credits), 0)
            paid = credits - beyond
            said = ([f"paid with {_credits_text(paid)} {unit}"] if paid or not beyond else []) + (
                [f"{_credits_text(beyond)} {unit} beyond prepaid credit"] if beyond else [])
            result[index].update(description=f"{base} ({', '.join(said)})", credits_paid=_credits_text(paid),
                                 credits_beyond=_credits_text(beyond))
    return result


def _credit_usage(item: dict[str, Any]) -> tuple[str, int, str] | None:
    """A usage line priced in credits: (its description without the credits, the credits in sub-units, the unit);
    ``None`` for a line priced in money."""
    description = str(item.get("description", ""))
    credits, unit = item.get("credits"), item.get("credits_unit")
    if isinstance(credits, str) and isinstance(unit, str):
        suffix = f" ({credits} {unit})"
    else:  # rating's lines from before: "tokens: 150 tokens (paid with 150.000000000 CREDIT)"
        found = _LEGACY_CREDITS.search(description)
        if found is None:
            return None
        credits, unit, suffix = found.group(1), found.group(2), found.group(0)
    try:
        amount = to_subunits(Decimal(credits))
    except (ArithmeticError, ValueError):
        return None
    base = description.removesuffix(suffix)
    return base, amount, unit


_LEGACY_CREDITS = re.compile(r" \(paid with ([0-9]+(?:\.[0-9]+)?) ([A-Za-z0-9_]+)\)$")


def _credits_text(subunits: int) -> str:
    """Credits as a person reads them: ``150``, ``12.5``, never ``150.000000000``."""
    return format(from_subunits(subunits).normalize(), "f")


def _post_rounding(account: BillingAccount, invoice: Invoice, lines: list[dict[str, Any]], at: datetime) -> None:
    """What the invoice bills for the overage it took (its usage, credits-applied and overage lines in the invoice
    currency, and the minimum commitment netted from it: all already receivable) is that overage with each line
    rounded once: the difference is posted (``BillingAccount.round_invoiced_overage``), so paying the invoice
    settles its total to the minor unit and leaves nothing receivable. A difference beyond the lines' rounding
    (overage taken net negative, in a stream recorded before give-backs kept periods at zero or more) is logged and
    not posted: the invoice settles what it took, as before."""
    money = invoice.currency
    billed = Decimal(0)
    rounded = 0
    for item in lines:
        if (item["kind"] in ("usage", "credits_applied", "overage") and not item.get("credit_unit")) \
                or (item["kind"] == "minimum_commitment" and item.get("earlier_periods")):
            billed = RATING_CONTEXT.add(billed, Decimal(item["amount"]))
            rounded += 1
    minor = minor_subunits(currency(money))
    # Each line is rounded once, half-up: off by half a minor unit at most; the credits applied and the overage
    # beyond the usage lines are rounded even when they show no line.
    bound = (rounded + 2) * (minor // 2)
    took = account.invoiced_overage(str(invoice.id)).get(money, 0)
    if billed < 0 or abs(to_subunits(billed) - took) > bound:
        log.warning("overage_rounding_out_of_bounds", tenant=account.tenant, invoice=str(invoice.id),
                    billed=str(billed), took=str(from_subunits(took)), unit=money)
        return
    account.round_invoiced_overage(invoice=str(invoice.id), unit=money, billed=to_subunits(billed), bound=bound,
                                   at=at)


def _minimum_already_billed(account: BillingAccount, invoice: Invoice, taken: dict[str, int],
                            period_start: datetime, itemised: set[str], at: datetime) -> list[dict[str, Any]]:
    """A negative "Minimum commitment" line for what of the earlier periods' overage ``taken`` (a late correction
    raised their usage after an invoice billed them) their minimum commitment already billed: a period is charged
    max(usage, minimum) in all, never its commitment and the usage it covered both. The account nets it from the
    overage receivable (``BillingAccount.charge_period_minimums``), so the line is already posted (``_book``)."""
    money = invoice.currency
    earlier = {key: amount for key, amount in taken.items()
               if not (period_began(key) == period_start or key in itemised)}
    minor = minor_subunits(currency(money))
    netted = account.charge_period_minimums(invoice=str(invoice.id), unit=money, taken=earlier, minor=minor, at=at)
    if not netted:
        return []
    amount = from_subunits(sum(netted.values()))
    periods = sorted(netted)
    began = ", ".join(period_began(key).date().isoformat() for key in periods)
    return [line("minimum_commitment", f"Minimum commitment already billed for the period from {began}, covering "
                 "its usage above", -amount, money, earlier_periods=True, periods=periods)]


def commit_period_minimum(account: BillingAccount, invoice: Invoice, lines: list[dict[str, Any]],
                          period_start: datetime, at: datetime) -> None:
    """The account remembers the minimum spend ``invoice`` (a primary subscription's renewal or final invoice, its
    ``lines`` complete) billed its period against, and that period's usage spend (as ``minimum_commitment_lines``
    counts it), so a later correction of the period keeps its charge at max(usage, minimum)
    (``BillingAccount.period_minimum``). A period rating's lines itemise with another (a cadence change) shares one
    minimum between two period keys: not remembered, corrections of it are capped per invoice as before."""
    minimum = invoice.minimum_spend
    if not minimum:
        return
    keys = _itemised_periods(lines) or {period_start.isoformat()}
    if len(keys) != 1:
        return
    usage = usage_spend(lines)
    account.commit_period_minimum(invoice=str(invoice.id), unit=invoice.currency, period=keys.pop(),
                                  minimum=to_subunits(minimum), spend=to_subunits(usage), at=at)


def _own_and_earlier(periods: dict[str, int], period_start: datetime, itemised: set[str]) -> tuple[int, int]:
    """Overage taken, by period key -> (the ended period's own and that of the periods rating's usage lines
    itemise, ``itemised``; the rest: earlier periods')."""
    own = sum(amount for key, amount in periods.items() if period_began(key) == period_start or key in itemised)
    return own, sum(periods.values()) - own


def _itemised_periods(usage_lines: list[dict[str, Any]]) -> set[str]:
    """The rating periods whose usage rating's lines show (each line's ``trace.rating_periods``): the ended
    period's, and those of a period a cadence change cut short, which rating bills with the period it restarted
    into (``restarted_periods``), or a calendar month rated before rating knew of the subscription. Their overage
    is this period's usage, already on the lines: counted as earlier periods', the lines showed "Prepaid credits
    applied" for credit that never existed and billed the same money again as "Overage from earlier periods"."""
    keys: set[str] = set()
    for item in usage_lines:
        trace = item.get("trace")
        if item.get("kind") == "usage" and isinstance(trace, dict) and isinstance(trace.get("rating_periods"), list):
            keys.update(str(key) for key in trace["rating_periods"])
    return keys


def usage_spend(lines: list[dict[str, Any]]) -> Decimal:
    """What a period's usage cost on an invoice's lines, as a minimum commitment counts it: its usage lines and the
    overage of its credit-priced usage (not the overage of earlier periods)."""
    spend = Decimal(0)
    for item in lines:
        if item["kind"] == "usage" or (item["kind"] == "overage" and item.get("credit_unit")
                                       and not item.get("earlier_periods")):
            spend = RATING_CONTEXT.add(spend, Decimal(item["amount"]))
    return spend


def minimum_commitment_lines(invoice: Invoice, usage_lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A "Minimum commitment" line for what the period's usage spend (rating's usage lines and the credit-unit
    overage lines, as rounded on the invoice) falls short of the minimum spend the renewal draft recorded; none
    without one or when usage reached it."""
    minimum = invoice.minimum_spend
    if not minimum:
        return []
    usage = usage_spend(usage_lines)
    shortfall = RATING_CONTEXT.subtract(minimum, usage)
    if shortfall <= 0:
        return []
    committed = round_minor(minimum, currency(invoice.currency))
    return [line("minimum_commitment", f"Minimum commitment: {committed} {invoice.currency} of usage per period, "
                 f"{usage} used", shortfall, invoice.currency, minimum_spend=str(minimum), usage=str(usage))]


def _credit_prices(credit_units: dict[str, Any], money: str, own: str | None) -> dict[str, Decimal]:
    """Credit unit -> its price in ``money`` (``CreditUnitDef.price_in``, ``own``: the plan's own currency; units
    not priced in it left out)."""
    prices: dict[str, Decimal] = {}
    for code, spec in sorted(credit_units.items()):
        price = CreditUnitDef.model_validate(spec).price_in(money, own) if isinstance(spec, dict) else None
        if price is not None:
            prices[code] = price
    return prices


def settle_paid(account: BillingAccount, invoice: Invoice, at: datetime, payment: str) -> None:
    """``invoice`` is paid: the overage it billed is settled (Dr GATEWAY_CLEARING / Cr RECEIVABLES)."""
    account.settle_invoiced_overage(invoice=str(invoice.id), at=at,
                                    cause={"invoice_number": invoice.number, "payment": payment})


def repay_from_purchase(batch: Any, account: BillingAccount, grant_id: UUID, at: datetime,
                        cause: dict[str, Any]) -> int:
    """Credit just bought (grant ``grant_id``) pays off the account's unbilled overage when no live subscription
    will invoice it (pay as you go); returns the sub-units repaid (``BillingAccount.repay_overage``)."""
    roster = batch.get(roster_id(account.tenant))
    if roster is not None and roster.live:
        return 0  # the next renewal invoice bills it
    return account.repay_overage(grant_id=grant_id, at=at, cause=cause)

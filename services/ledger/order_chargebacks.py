"""A lost dispute of part of a checkout order's payment (a partial chargeback): that share of the order taken back.

The bank may take back only part of a payment (Stripe's dispute ``amount`` below the charge's, Razorpay's
``amount_deducted``, PayPal's ``amount_refunded``). The chargeback of all that is left of an order reverses it
(``refund_request_commands.reverse_order``, via ``gateway_refunded``); a part of it (``charge_back_part``, since
session 14: it was rejected ``partial_refund`` and left for a person) takes back that share of the order by the same
rules:

* the money: exactly the chargeback leaves the gateway's clearing. Its tax is the order's tax in proportion to the
  money taken back in all, floored to the currency's minor unit (``floor(tax * paid back / paid)``, less what earlier
  refunds gave back of it: a gateway pays back whole cents), its net the rest; for a package in the currency the net
  is at least a minor unit and leaves at least one for the rest of the order (its credit is its net, and the order's
  reversal pays back the rest of the credit with the rest of the tax), the tax giving way by that;
* the credit: a package in the currency gives back that net as its credit with that tax; a package granted in a
  credit unit gives back the same share of its credits (``floor(credits * chargeback / paid)``) with exactly that net
  and tax of the money booked for it in the currency (``refund_grant(money=...)``). As for a whole chargeback, with the
  finance override: the unspent credit leaves the wallet first, the spent part comes back from recognised revenue
  (lapsed or adjusted credit from breakage or manual adjustment, as override refunds take it);
* the bonus: each free grant of the order (a package's bonus or a discount, the promotion's bonus) gives up the same
  share of what it granted (``floor(granted * chargeback / paid)``), at most what is left of it
  (``BillingAccount.void_grant_part``): what of it was used stays used, as when the whole order is reversed;
* the order stays ``paid`` and no credit note is made: like a partial refund's, the money it gave back is counted
  (``BillingAccount.money_paid_back``), so a refund or chargeback of what is left later reverses the rest exactly and
  its credit note, mirroring the order's invoice, documents it all.

Every event names the dispute in its ``cause`` (``payment_commands.dispute_cause``), so the read models count it as a
chargeback.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from billing_events import ids
from billing_events.money import currency, from_subunits, minor_subunits
from billing_ledger.account_commands import account_of
from billing_ledger.amounts import show
from billing_ledger.application import CommandRejected, _Batch
from billing_ledger.checkout_commands import bonus_grant_id
from billing_ledger.domain.checkout import Order


def chargeback_refund_id(order: Order, reference: str) -> UUID:
    """The refund a partial chargeback books (``reference``: the lost dispute's gateway reference, one per dispute)."""
    return uuid5(NAMESPACE_URL, f"/orders/{order.id}/chargebacks/{reference}")


def charge_back_part(batch: _Batch, order: Order, *, amount: int, reference: str, at: datetime, by: str,
                     cause: dict[str, Any]) -> dict[str, Any]:
    """Takes back ``amount`` (sub-units of the order's currency, less than what is left of it) of a paid order (see
    the module doc). Raises ``CommandRejected`` (nothing changed) when the order's money is not known (an older
    credit-unit grant without booked money) or the share is too small to take a sub-unit of credit."""
    account = account_of(batch, order.tenant)
    code = order.quote["currency"]
    purchase = ids.grant_id(order.tenant, f"order/{order.id}/purchase")
    paid = account.paid_money(purchase)
    if paid is None or paid["unit"] != code:
        raise CommandRejected("partial_refund", f"chargeback {reference} of part of order {order.key!r}, whose money "
                                                "is not booked in its currency: reconcile by hand")
    total = paid["net"] + paid["tax"]
    net_left, tax_left = paid["net"] - paid["refunded_net"], paid["tax"] - paid["refunded_tax"]
    if not 0 < amount < net_left + tax_left:
        raise CommandRejected("partial_refund", f"chargeback {reference} of {show(amount, code)} {code} is not a part "
                                                f"of the {show(net_left + tax_left, code)} {code} left of order "
                                                f"{order.key!r}: reconcile by hand")
    # The tax of the money taken back in all, floored to the minor unit; this chargeback gives back what it adds.
    minor = minor_subunits(currency(code))
    tax_after = paid["tax"] * (paid["refunded_net"] + paid["refunded_tax"] + amount) // total
    tax = min(max(0, tax_after - tax_after % minor - paid["refunded_tax"]), tax_left, amount)
    refund = chargeback_refund_id(order, reference)
    grants = {g["grant_id"]: g for g in account.grant_balances()}
    unit = grants[str(purchase)]["unit"]
    if unit == code:  # a package in the currency: its credit is its net
        # Some credit now, and some left for the rest of the order (its reversal pays back the rest of the credit with
        # the rest of the tax): the proportional tax gives way by what that takes, at most a minor unit or two.
        low, high = max(minor, amount - tax_left), min(amount, net_left - minor)
        if low > high:
            raise CommandRejected("partial_refund", f"chargeback {reference} of {show(amount, code)} {code} of order "
                                                    f"{order.key!r} cannot be split into credit and tax: reconcile "
                                                    "by hand")
        net = min(max(amount - tax, low), high)
        tax = amount - net
        account.refund_grant(grant_id=purchase, amount=net, tax_amount=tax, refund_id=refund, at=at,
                             finance_override=True, reclaim_reversed=True, cause=cause)
        credit = net
    else:  # a package in a credit unit: that share of its credits, with exactly this money
        net = min(amount - tax, net_left)
        tax = amount - net
        credit = min(paid["credit"] * amount // total, paid["credit"] - paid["refunded"])
        if credit <= 0:
            raise CommandRejected("partial_refund", f"chargeback {reference} of {show(amount, code)} {code} is too "
                                                    f"small a part of order {order.key!r} to take back its credit")
        account.refund_grant(grant_id=purchase, amount=credit, refund_id=refund, at=at, finance_override=True,
                             reclaim_reversed=True, cause=cause, money=(net, tax))
    voided: dict[str, str] = {}
    units = {unit}
    for free in (bonus_grant_id(order), ids.grant_id(order.tenant, f"order/{order.id}/promotion")):
        bonus = grants.get(str(free))
        share = int(bonus["amount"]) * amount // total if bonus is not None and bonus["status"] == "open" else 0
        if share > 0:
            taken = account.void_grant_part(grant_id=free, amount=share, reason="order_charged_back", voided_by=by,
                                            at=at, cause=cause)
            if taken:
                voided[str(free)] = str(from_subunits(taken))
                units.add(bonus["unit"])
    for moved in sorted(units):  # money went back at the bank's request: no auto-top-up, the alerts only
        account.check_thresholds(moved, at, top_up=False)
    return {"order_id": str(order.id), "charged_back": show(amount, code), "net": show(net, code),
            "tax": show(tax, code), "credit": str(from_subunits(credit)), "bonus_voided": voided,
            "refund_id": str(refund)}


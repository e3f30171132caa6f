"""Refunds of top-up orders: the customer's request, the operator's approval, and the reversal.

A reversal (``reverse_order``) is one transaction: the purchase grant is refunded (credit and the tax
collected; for a package granted in a credit unit, the money and tax booked in the currency with it), the
promotional grants of the order (a package's bonus or a discount in the currency, the promotion's bonus) are
voided (their unspent remainder; what of them was used stays used), a credit note mirroring the top-up invoice is finalized
(``CN-`` number) and the order is marked refunded. It happens once: the gateway's own refund webhook that
follows finds the order refunded and changes nothing (and a refund made in the gateway's dashboard reverses
the order the same way).

Approval reserves the purchased credit: a hold on the account (``refund_hold_id``, meter None) for what of the
purchase grant is unrefunded, expiring after ``REFUND_HOLD_SECONDS``, so usage between approval and the
gateway's answer cannot spend credit that is about to be paid back (it goes to overage, or is refused under
``block``). The reversal releases it first, whichever path books the refund (``complete`` or the gateway's
webhook, which may arrive first: ``complete`` then finds the order refunded and just completes the request).
The hold reserves the unit's balance, not the grant itself: when other credit of the unit is left, usage may
still draw the purchase grant first (drawdown order) and the reversal is refused as before.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from billing_events import ids
from billing_events.messages import LedgerCommand
from billing_events.money import currency, from_subunits, round_minor, to_subunits
from billing_ledger import checkout_commands
from billing_ledger import payload as fields
from billing_ledger.account_commands import account_of
from billing_ledger.amounts import show
from billing_ledger.application import CommandRejected, LedgerApplication, _Batch, handles
from billing_ledger.checkout_commands import bonus_grant_id, order_of, top_up_invoice_id
from billing_ledger.domain.account import BillingAccount
from billing_ledger.domain.checkout import PAID, REFUNDED, Order
from billing_ledger.domain.invoice import CREDIT_NOTE, DRAFT, Invoice, invoice_id, line, reversing_lines
from billing_ledger.domain.refund_request import RefundRequest, RefundRequestError, refund_request_id
from billing_ledger.limits import REFUND_HOLD_SECONDS
from billing_ledger.order_chargebacks import charge_back_part
from billing_ledger.payload import at as effective_at
from billing_ledger.subscription_commands import _finalize


def _request(batch: _Batch, tenant: str, key: str) -> RefundRequest:
    return batch.existing(refund_request_id(tenant, key), "unknown_refund_request",  # type: ignore[no-any-return]
                          f"no refund request {key!r}")


def refundable_now(batch: _Batch, order: Order) -> int:
    """What of the order's purchase grant is unspent and unreserved (sub-units)."""
    account = account_of(batch, order.tenant)
    grant = str(ids.grant_id(order.tenant, f"order/{order.id}/purchase"))
    state = next((g for g in account.grant_balances() if g["grant_id"] == grant), None)
    if state is None or state["status"] != "open":
        return 0
    return max(0, min(int(state["remaining"]), account.available(state["unit"])))


def refund_hold_id(order: Order) -> UUID:
    """The hold an approved refund request of ``order`` places (one per order: its credit is refunded once)."""
    return uuid5(NAMESPACE_URL, f"/orders/{order.id}/refund-hold")


def _purchase_grant(batch: _Batch, order: Order) -> dict[str, Any]:
    purchase = str(ids.grant_id(order.tenant, f"order/{order.id}/purchase"))
    return next(g for g in account_of(batch, order.tenant).grant_balances() if g["grant_id"] == purchase)


def _reserve(batch: _Batch, order: Order, at: datetime, by: str) -> None:
    """Holds the unrefunded purchased credit until the gateway's refund is booked (see the module docstring)."""
    grant = _purchase_grant(batch, order)
    amount = int(grant["amount"]) - int(grant["refunded"])
    if not account_of(batch, order.tenant).place_hold(
            hold_id=refund_hold_id(order), unit=grant["unit"], amount=amount, meter=None,
            expires_at=at + timedelta(seconds=REFUND_HOLD_SECONDS), at=at, thresholds=False, by=by or None):
        raise CommandRejected("refund_not_eligible", f"the credit of order {order.key!r} cannot be reserved")


def _release(batch: _Batch, order: Order, at: datetime, by: str) -> None:
    account = account_of(batch, order.tenant)
    hold = str(refund_hold_id(order))
    if any(h["hold_id"] == hold for h in account.active_holds()):
        account.release_hold(hold_id=UUID(hold), at=at, by=by or None)


def request_view(request: RefundRequest) -> dict[str, Any]:
    return {"refund_request_id": str(request.id), "key": request.key, "order_id": request.order_id,
            "status": request.status, "reason": request.reason, "gateway_refund": request.gateway_refund,
            "credit_note": request.credit_note}


def _eligible(batch: _Batch, order: Order) -> None:
    if order.status != PAID:
        raise CommandRejected("refund_not_eligible", f"order {order.key!r} is {order.status}, not paid")
    grant = next(g for g in account_of(batch, order.tenant).grant_balances()
                 if g["grant_id"] == str(ids.grant_id(order.tenant, f"order/{order.id}/purchase")))
    if refundable_now(batch, order) < int(grant["amount"]):
        raise CommandRejected("refund_not_eligible", f"the credit of order {order.key!r} has been used")


@handles("refund_request.create")
def create_request(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> dict[str, Any]:
    tenant = command.tenant or ""
    key = fields.key(command, "key", reason="invalid_refund_request")  # read at .../refund-requests/{key}
    reason = fields.string(command, "reason")  # never stored as "None"
    if batch.get(refund_request_id(tenant, key)) is not None:
        raise CommandRejected("refund_request_exists", f"refund request {key!r} exists")
    order = order_of(batch, tenant, fields.text(command, "order"))
    _eligible(batch, order)
    request = RefundRequest(tenant=tenant, key=key, order_id=str(order.id), reason=reason,
                            at=effective_at(command), by=command.issued_by)
    batch.add(request)
    return request_view(request)


@handles("refund_request.approve")
def approve_request(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> dict[str, Any]:
    request = _request(batch, command.tenant or "", str(command.payload["key"]))
    order = batch.get(UUID(request.order_id))
    if request.status != "approved":
        _eligible(batch, order)
    try:
        request.approve(at=effective_at(command), by=command.issued_by)
    except RefundRequestError as exc:
        raise CommandRejected("invalid_transition", str(exc)) from exc
    if order.status == PAID:  # approving again (a gateway retry) keeps the first hold; refunded: nothing to hold
        _reserve(batch, order, effective_at(command), command.issued_by)
    return {**request_view(request), "order": {"key": order.key, "gateway": order.gateway,
                                               "payment": order.payment, "quote": dict(order.quote)}}


@handles("refund_request.reject")
def reject_request(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> dict[str, Any]:
    request = _request(batch, command.tenant or "", str(command.payload["key"]))
    reason = fields.string(command, "reason")
    try:
        request.reject(reason=reason, at=effective_at(command), by=command.issued_by)
    except RefundRequestError as exc:
        raise CommandRejected("invalid_transition", str(exc)) from exc
    return request_view(request)


@handles("refund_request.complete")
def complete_request(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> dict[str, Any]:
    """The gateway accepted the refund: the ledger reversal and the credit note, in one transaction."""
    request = _request(batch, command.tenant or "", str(command.payload["key"]))
    if request.status == "refunded":
        return request_view(request)
    order = batch.get(UUID(request.order_id))
    reference = str(command.payload["gateway_refund"])
    if order.status == REFUNDED:  # the gateway's refund webhook came first and reversed the order
        credit_note = str(invoice_id(order.tenant, f"orders/{order.id}/refund"))
    else:
        credit_note = reverse_order(app, batch, order, reference=reference, at=effective_at(command),
                                    by=command.issued_by, finance_override=False)["credit_note"]
    try:
        request.complete(gateway_refund=reference, credit_note=credit_note, at=effective_at(command),
                         by=command.issued_by)
    except RefundRequestError as exc:
        raise CommandRejected("invalid_transition", str(exc)) from exc
    return request_view(request)


def gateway_refunded(app: LedgerApplication, batch: _Batch, order: Order, *, amount: Decimal, reference: str,
                     at: datetime, by: str, cause: dict[str, Any] | None = None) -> dict[str, Any]:
    """A refund the gateway reports for a checkout order: what is left of it, once (other amounts need a person).

    What is left is the order's total less what earlier refunds of its purchase grant paid back (a partial
    ``grant.refund``: its credit and tax, or a credit-unit package's share of the money): a gateway refunds the
    rest of a payment, never more than was paid, so after 47.60 of a 119.00 order was paid back the order's
    refund is 71.40, and the reversal gives back exactly that (the rest of the credit and of the tax). A refund
    above it (119.00 again) would pay back more than was received: refused, as is one below it (a part: which
    credit it pays for is a person's decision) and one that is also exactly what an earlier partial refund paid
    back (the gateway's record of that payout, finance's refund in the gateway's dashboard, cannot be told from
    the rest's refund: reversing the rest for it would pay back twice; ``ambiguous_refund``, naming that refund).
    An earlier partial chargeback of the same amount leaves no such doubt (since session 15): the bank took that
    money, so no payout at the gateway follows it, and a refund notification is never a dispute's. Rejections are
    recorded for reconciliation (``billing reconcile refunds`` lists them with their detail) and change nothing.
    ``cause``: added to the reversal's events' cause (a chargeback names its dispute,
    ``payment_commands.dispute_cause``). A chargeback of a part of what is left (since session 14) takes back
    that share of the order (``order_chargebacks.charge_back_part``), and one of all that is left reverses it even when
    it is also what an earlier refund paid back (a bank's decision is never a gateway's payout).
    """
    if order.status == REFUNDED:
        return {"order_id": str(order.id), "already_refunded": True}
    code = order.quote["currency"]
    total, refund = to_subunits(Decimal(order.quote["total"])), to_subunits(amount)
    purchase = ids.grant_id(order.tenant, f"order/{order.id}/purchase")
    money = account_of(batch, order.tenant).money_paid_back(purchase)
    if money is None and int(_purchase_grant(batch, order)["refunded"]):
        # An older credit-unit grant without booked money, refunded in part: what that paid back is unknown.
        raise CommandRejected("partial_refund", f"refund {reference} of {amount} {code} of order {order.key!r}, "
                                                "whose credit was refunded in part: reconcile by hand")
    paid_back = money["paid_back"] if money is not None else 0
    left = total - paid_back
    where = (f"the {show(left, code)} {code} left of order {order.key!r} ({show(total, code)} paid, "
             f"{show(paid_back, code)} paid back by earlier refunds)" if paid_back
             else f"order {order.key!r}'s total {show(total, code)} {code}")
    if refund > left:
        raise CommandRejected("refund_exceeds_order", f"refund {reference} of {amount} {code} is more than {where}: "
                                                      "reconcile by hand")
    chargeback = bool((cause or {}).get("dispute"))
    if refund != left and chargeback:  # the bank took back part of the payment: that share of the order
        return charge_back_part(batch, order, amount=refund, reference=reference, at=at, by=by, cause={
            "order_id": str(order.id), "gateway": order.gateway, "gateway_refund": reference, **(cause or {})})
    if refund != left:
        raise CommandRejected("partial_refund", f"refund {reference} of {amount} {code} is part of {where}: "
                                                "reconcile by hand")
    # A chargeback is its bank's decision, never the gateway's payout of an earlier partial refund; and a refund is
    # never a chargeback's payout (the bank took that money, the gateway paid nothing out for it: its notification is
    # a dispute, its id the dispute's). Only an earlier partial *refund* of the same amount leaves a doubt.
    same = [r for r in money["refunds"] if r["amount"] == refund] if money is not None and not chargeback else []
    if same:
        raise CommandRejected("ambiguous_refund", f"refund {reference} of {amount} {code}, {where}, is also what "
                                                  f"{_earlier_refunds(batch, order, same)} paid back: it may be that "
                                                  "refund's payout at the gateway, or the refund of the rest; check "
                                                  "at the gateway and reconcile by hand")
    return reverse_order(app, batch, order, reference=reference, at=at, by=by, finance_override=True,
                         refunded_amount=str(amount), reclaim_reversed=True, cause=cause)


def _earlier_refunds(batch: _Batch, order: Order, shares: list[dict[str, Any]]) -> str:
    """Names the earlier partial refunds a gateway refund cannot be told from, for the person reconciling it: the
    ledger's refund id, and who asked and why while the account remembers it (``BillingAccount.refund``)."""
    account = account_of(batch, order.tenant)
    named = []
    for share in shares:
        known = account.refund(UUID(share["refund_id"])) or {}
        who = ", ".join(str(part) for part in (known.get("requested_by"), known.get("reason")) if part)
        named.append(f"refund {share['refund_id']}" + (f" ({who})" if who else ""))
    return ("the earlier partial " if len(named) == 1 else "each of the earlier partial ") + "; ".join(named)


def reverse_order(app: LedgerApplication, batch: _Batch, order: Order, *, reference: str, at: datetime, by: str,
                  finance_override: bool, refunded_amount: str | None = None,
                  reclaim_reversed: bool = False, cause: dict[str, Any] | None = None) -> dict[str, Any]:
    """The order's reversal: the rest of its credit, its promotional grants, a credit note mirroring its invoice
    less what the credit notes of partial refunds credited before (``_credited_before``; a partial refund recorded
    before session 14 had no note: all of it), the order refunded (``refunded_amount``:
    what this refund paid back, by default the order's total). ``reclaim_reversed`` (the gateway's refund: the
    money has left): usage of the purchase a give-back returned as ``usage_reversal`` credit is refunded too and
    that credit taken back (``BillingAccount.refund_grant``); otherwise such a refund is refused."""
    _release(batch, order, at, by)  # the credit an approved request reserved is the credit paid back now
    account = account_of(batch, order.tenant)
    grants = {g["grant_id"]: g for g in account.grant_balances()}
    purchase = ids.grant_id(order.tenant, f"order/{order.id}/purchase")
    state = grants[str(purchase)]
    # The rest of the credit with the rest of the tax booked on the grant (a currency package: the tax a partial
    # ``grant.refund`` gave back before is not given back again). A package in a credit unit has its money and
    # tax booked in the currency apart (``book_purchase_money``): ``refund_grant`` reverses that in proportion.
    # ``user``: who refunded it (the finance user completing an approved request, the gateway's webhook), as a
    # ``grant.refund``'s cause names its user (since session 13; the history's ``user``).
    cause = {"order_id": str(order.id), "gateway": order.gateway, "gateway_refund": reference,
             **({"user": by} if by else {}), **(cause or {})}
    account.refund_grant(grant_id=purchase, amount=int(state["amount"]) - int(state["refunded"]),
                         refund_id=uuid5(NAMESPACE_URL, f"/orders/{order.id}/refund"), at=at,
                         finance_override=finance_override, cause=cause, reclaim_reversed=reclaim_reversed)
    # What the order gave beyond the money (a package's bonus or a discount, the promotion's bonus) is voided:
    # its unspent remainder goes back to promotional expense; what of it was already used stays used.
    for free in (bonus_grant_id(order), ids.grant_id(order.tenant, f"order/{order.id}/promotion")):
        promotion = grants.get(str(free))
        if promotion is not None and promotion["status"] == "open":
            # Like the refund itself, no auto-top-up: money just went back at the customer's request.
            account.void_grant(grant_id=UUID(promotion["grant_id"]), reason="order_refunded", voided_by=by, at=at,
                               thresholds=False)
            account.check_thresholds(promotion["unit"], at, top_up=False)
    original = batch.get(top_up_invoice_id(order))
    note = Invoice(tenant=order.tenant, key=f"orders/{order.id}/refund", document_type=CREDIT_NOTE,
                   currency=order.quote["currency"],
                   lines=reversing_lines(original) + _credited_before(batch, original),
                   period_start=None, period_end=None, subscription_id=None, related_invoice=str(original.id),
                   at=at, by=by)
    batch.add(note)
    _finalize(app, batch, note, at, by)
    order.mark_refunded(refund_id=reference, amount=refunded_amount or order.quote["total"], at=at, by=by)
    return {"order_id": str(order.id), "credit_note": str(note.id), "credit_note_number": note.number}


def document_grant_refund(app: LedgerApplication, batch: _Batch, account: BillingAccount, grant: UUID, refund: UUID,
                          at: datetime, by: str) -> Invoice | None:
    """A ``grant.refund`` (``POST /v1/accounts/{t}/refunds``) of a checkout order's purchase grant paid money back,
    with its share of the tax: a credit note of the order's top-up invoice for exactly that (``top_up`` line: the
    money net of tax; ``tax`` line: the tax, 0.00 when the invoice charged none), ``related_invoice`` that invoice,
    numbered ``CN-`` in the same transaction. 25.00 of a 100.00 + 19 % top-up refunded: -25.00 and -4.75 of VAT, the
    VAT the books gave back. The invoice records it (``Invoice.Corrected``, ``GivenBack``), so the order's reversal
    later credits only the rest. ``None`` for any other grant (no order, or an order without an invoice), or when no
    money went back (an older credit-unit grant without its money booked)."""
    cause = account.grant_cause(grant) or {}
    order = checkout_commands.known_order(batch, account.tenant, cause.get("order_id"))
    if order is None or grant != ids.grant_id(order.tenant, f"order/{order.id}/purchase"):
        return None
    original = batch.get(top_up_invoice_id(order))
    money = (account.refund(refund) or {}).get("paid_back")
    if not isinstance(original, Invoice) or not money or money["unit"] != original.currency or not money["amount"]:
        return None
    code = original.currency
    tax = from_subunits(money["tax_amount"])
    net = from_subunits(money["amount"] - money["tax_amount"])
    taxes = [item for item in original.lines if item["kind"] == "tax"]
    lines = [line("top_up", f"Refund of {round_minor(net, currency(code))} {code} of {original.number} "
                            f"({_what(original)})", -net, code)]
    if tax:
        lines.append(line("tax", f"Tax refunded with it ({taxes[0]['description'] if taxes else 'tax'})", -tax, code))
    else:
        lines.append(line("tax", f"No tax on {original.number}" + (f" ({taxes[0]['description']})" if taxes else ""),
                          Decimal(0), code, rate="0"))
    note = Invoice(tenant=order.tenant, key=grant_refund_note_key(order.id, refund), document_type=CREDIT_NOTE,
                   currency=code, lines=lines, period_start=None, period_end=None, subscription_id=None,
                   related_invoice=str(original.id), at=at, by=by)
    batch.add(note)
    _finalize(app, batch, note, at, by)
    original.record_correction(document=note.id, by=by)
    original.record_given_back(document=note.id, net=net, tax=tax, by=by)
    return note


def grant_refund_note_key(order: UUID, refund: UUID) -> str:
    """The key of the credit note ``document_grant_refund`` issues for refund ``refund`` of ``order``'s purchase grant."""
    return f"orders/{order}/refunds/{refund}"


def grant_refund_note_id(account: BillingAccount, grant: UUID, refund: UUID) -> UUID | None:
    """The id the credit note documenting refund ``refund`` of ``grant`` has if ``document_grant_refund`` issued one:
    ``grant`` is a checkout order's purchase grant. ``None`` for any other grant (no such note is ever issued); a note
    of this id may still not exist (no money went back with the refund)."""
    order = (account.grant_cause(grant) or {}).get("order_id")
    try:
        order_id = UUID(str(order))
    except ValueError:
        return None
    if grant != ids.grant_id(account.tenant, f"order/{order_id}/purchase"):
        return None
    return invoice_id(account.tenant, grant_refund_note_key(order_id, refund))


def note_reference(note: Invoice | None) -> dict[str, Any] | None:
    """A credit note as an answer names it: ``{"id", "number"}``, or ``None`` when none was issued."""
    return None if note is None else {"id": str(note.id), "number": note.number}


def _what(invoice: Invoice) -> str:
    """What a top-up invoice sold: its ``top_up`` line's description."""
    return next((str(item["description"]) for item in invoice.lines if item["kind"] == "top_up"), "top-up")


def _credited_before(batch: _Batch, original: Invoice) -> list[dict[str, Any]]:
    """Lines taking back of a reversal's mirror of ``original`` what the credit notes of its partial refunds
    (``document_grant_refund``, ``Invoice.corrections``) credited already: each of their lines negated, naming the
    note, so the reversal's note credits exactly the rest its refund pays back (71.40 after 47.60 of 119.00)."""
    lines: list[dict[str, Any]] = []
    for document in original.corrections:
        earlier = batch.get(UUID(document))
        if not isinstance(earlier, Invoice) or earlier.status == DRAFT:
            continue
        for item in earlier.lines:
            if Decimal(item["amount"]) or Decimal(item["exact_amount"]):
                lines.append({**item, "description": f"Credited before by {earlier.number}: {item['description']}",
                              "amount": str(-Decimal(item["amount"])),
                              "exact_amount": str(-Decimal(item["exact_amount"]))})
    return lines

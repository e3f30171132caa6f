"""Disputes (chargebacks) from ``billing.payments``: the customer's bank disputes a payment, exactly once.

Ingest publishes one notification per movement of a dispute (``dispute_opened``, ``dispute_funds_withdrawn``,
``dispute_funds_reinstated``, ``dispute_closed`` with its outcome; services/ingest/WEBHOOKS.md); each becomes a
command (``payment_commands.payment_command``: ``dispute.*``, id from the gateway and its event id) applied in the
batch transaction with its Kafka position, a duplicate the second time. The account keeps each dispute
(``BillingAccount.open_dispute``, key ``<gateway>/<dispute id>``): whichever of its notifications comes first opens
it, so they may arrive in any order. The accounting (docs/ledger.md "Disputes"):

* opened: recorded (``DisputeRaised``), no money moves: the customer keeps the credit until the bank decides.
* funds withdrawn (Stripe takes the disputed amount from our balance while it is decided): the money leaves the
  gateway's clearing for ``disputed_funds`` (``DisputeFundsWithdrawn``); reinstated, it comes back
  (``DisputeFundsReinstated``). Only while the dispute is open, once.
* closed ``won`` or ``closed`` (no chargeback): the books are as before the dispute; what is still withdrawn goes
  back to clearing (``DisputeClosed``).
* closed ``lost`` (a chargeback): what was withdrawn goes back to clearing (``DisputeClosed``) and the money is
  paid out of it as a gateway refund the ledger cannot refuse, by the same code (``payment_commands._refund``):
  a checkout order is reversed when the chargeback is what is left of it (its unspent credit leaves the wallet, the
  spent part comes back from recognised revenue, its tax is given back, its bonus and promotion voided, a credit
  note), a payment's purchase grants are refunded with the override; a chargeback before the payment it takes back
  waits for it (``RefundAwaitingPayment``). Every event of it names the dispute in its ``cause``, so the read models
  show it as a chargeback. An order already refunded moves nothing again (the gateway takes no money twice: its
  dispute of a refunded payment withdraws nothing), the dispute is closed lost all the same. A chargeback of part of
  what is left of an order takes back that share of it (since session 14, ``order_chargebacks``).
* closed ``lost`` of a payment that settled an invoice (``invoice_id``, or an ``order_id`` that names one): no credit
  was bought, so none is taken; the invoice's money is owed again (Dr ``receivables`` / Cr ``gateway_clearing``,
  unbilled under the chargeback's time: the next renewal invoice bills it on a line of its own, tax included, or
  credit bought repays it), as a payment that failed leaves the invoice owed. It must be the payment that paid it
  (``dispute_of_other_payment``, as refunds) and at most its total (``invoice_dispute_mismatch``).

A lost dispute never changes its outcome (``dispute_outcome_changed``: the money that came back is reconciled by a
person); a won or closed one may still be lost (an appeal, a pre-arbitration). Rejections are recorded on the
command's receipt for reconciliation and change nothing, as for payments; since session 14 also on the tenant's
``DisputeRejections`` (``record_rejection``, in the same transaction), which ``billing reconcile disputes`` reads.

The gateway's fee for a dispute (since session 14): every notification carries the fee so far as the gateway's API
showed it (``dispute_fee``, ``dispute_fee_currency``); each command books that reading after its movement
(``BillingAccount.book_dispute_fee``: Dr ``dispute_fees`` / Cr ``gateway_clearing`` the change, the latest reading
winning whatever the order of delivery), the operator's expense.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from billing_events.messages import LedgerCommand
from billing_events.money import is_currency_code, parse_decimal
from billing_ledger import checkout_commands, payload
from billing_ledger.amounts import show
from billing_ledger.application import CommandRejected, LedgerApplication, _Batch, handles, records_rejections
from billing_ledger.domain.account import DISPUTE_OUTCOMES, BillingAccount
from billing_ledger.domain.checkout import REFUNDED as ORDER_REFUNDED
from billing_ledger.domain.dispute_rejections import DisputeRejections
from billing_ledger.domain.invoice import INVOICE, PAID, Invoice
from billing_ledger.invoice_commands import tenant_invoice
from billing_ledger.payment_commands import (
    DISPUTE_CLOSED,
    DISPUTE_FUNDS_REINSTATED,
    DISPUTE_FUNDS_WITHDRAWN,
    DISPUTE_OPENED,
    _account_in_currency,
    _refund,
    _refund_of_other_payment,
)


@records_rejections(DISPUTE_OPENED, DISPUTE_FUNDS_WITHDRAWN, DISPUTE_FUNDS_REINSTATED, DISPUTE_CLOSED)
def record_rejection(batch: _Batch, command: LedgerCommand, reason: str | None, detail: str | None) -> None:
    """A rejected dispute notification, on its tenant's ``DisputeRejections`` (in the batch that records its
    receipt), where ``billing reconcile disputes`` finds it without reading every receipt."""
    tenant = command.tenant
    if not tenant:
        return
    index = batch.get_or_create(DisputeRejections.create_id(tenant), lambda: DisputeRejections(tenant))

    def given(field: str) -> str | None:
        value = command.payload.get(field)
        return str(value)[:255] if isinstance(value, (str, int)) and not isinstance(value, bool) else None

    index.record(command_id=command.command_id, kind=command.kind, reason=reason, detail=detail,
                 gateway=given("gateway"), dispute=given("dispute"), order_id=given("order_id"),
                 amount=given("amount"), currency=given("currency"), at=batch.now)


def dispute_key(gateway: str, dispute: str) -> str:
    """The name the account keeps a dispute under."""
    return f"{gateway}/{dispute}"


def _dispute(batch: _Batch, account: BillingAccount, command: LedgerCommand) -> str:
    """The command's dispute on the account, opened by this command if it is the first of it to come."""
    gateway, dispute = payload.text(command, "gateway"), payload.text(command, "dispute")
    key = dispute_key(gateway, dispute)
    if account.dispute(key) is None:
        paid = command.payload.get("refunded_payment")
        invoice = tenant_invoice(batch, command.tenant, command.payload.get("invoice_id")
                                 or command.payload.get("order_id"))
        account.open_dispute(key=key, gateway=gateway, dispute=dispute, order_id=payload.text(command, "order_id"),
                             payment=paid if isinstance(paid, str) and paid else None,
                             invoice=str(invoice.id) if invoice is not None else None, unit=account.currency,
                             amount=payload.subunits(command, "amount"),
                             at=payload.timestamp(command, "verified_at"))
    return key


def _book_fee(account: BillingAccount, key: str, command: LedgerCommand) -> dict[str, Any]:
    """The gateway's fee for the dispute as the notification read it (``dispute_fee``, since session 14), booked as
    the account's latest reading of it (``BillingAccount.book_dispute_fee``): what the result adds (nothing when the
    notification states no fee)."""
    if command.payload.get("dispute_fee") is None:
        return {}
    code = payload.text(command, "dispute_fee_currency")
    if not is_currency_code(code):
        raise CommandRejected("invalid_command", f"dispute_fee_currency must be an ISO 4217 code, not {code!r}")
    booked = account.book_dispute_fee(key=key, fee=payload.subunits(command, "dispute_fee"), unit=code,
                                      at=payload.timestamp(command, "verified_at"))
    kept = account.dispute(key) or {}
    return {"fee": payload.text(command, "dispute_fee"), "fee_currency": code,
            "fee_booked": show(booked, code) if booked else None, "fee_unbooked": kept.get("fee_unbooked") is not None}


@handles(DISPUTE_OPENED)
def dispute_opened(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> dict[str, Any]:
    account = _account_in_currency(batch, command)
    key = _dispute(batch, account, command)
    return {"dispute": key, "status": account.dispute(key)["status"],  # type: ignore[index]
            **_book_fee(account, key, command)}


@handles(DISPUTE_FUNDS_WITHDRAWN)
def dispute_funds_withdrawn(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> dict[str, Any]:
    account = _account_in_currency(batch, command)
    key = _dispute(batch, account, command)
    moved = account.withdraw_dispute_funds(key=key, amount=payload.subunits(command, "amount"),
                                           at=payload.timestamp(command, "verified_at"))
    return {"dispute": key, "withdrawn": moved, **_book_fee(account, key, command)}


@handles(DISPUTE_FUNDS_REINSTATED)
def dispute_funds_reinstated(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> dict[str, Any]:
    account = _account_in_currency(batch, command)
    key = _dispute(batch, account, command)
    moved = account.reinstate_dispute_funds(key=key, at=payload.timestamp(command, "verified_at"))
    return {"dispute": key, "reinstated": moved, **_book_fee(account, key, command)}


@handles(DISPUTE_CLOSED)
def dispute_closed(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> dict[str, Any]:
    account = _account_in_currency(batch, command)
    outcome = command.payload.get("dispute_outcome")
    if outcome not in DISPUTE_OUTCOMES:
        raise CommandRejected("invalid_command", f"dispute_outcome must be one of {', '.join(DISPUTE_OUTCOMES)}, "
                                                 f"not {outcome!r}")
    key = _dispute(batch, account, command)
    amount, at = payload.subunits(command, "amount"), payload.timestamp(command, "verified_at")
    result: dict[str, Any] = {"dispute": key, "outcome": outcome}
    if outcome != "lost" or account.dispute(key)["status"] == "lost":  # type: ignore[index]
        closed = account.close_dispute(key=key, outcome=outcome, amount=amount, at=at)
        return {**result, "closed": closed, **_book_fee(account, key, command)}
    named = command.payload.get("invoice_id")
    invoice = tenant_invoice(batch, command.tenant, named or command.payload.get("order_id"))
    if named and invoice is None:
        raise CommandRejected("unknown_invoice", f"dispute of invoice {named!r}, not one of this tenant's")
    if invoice is not None:  # the money paid an invoice: owed again, no credit to take back
        _check_invoice_dispute(command, invoice)
        account.close_dispute(key=key, outcome="lost", amount=amount, at=at, owed=amount)
        return {**result, "closed": True, "invoice_id": str(invoice.id), "owed": payload.text(command, "amount"),
                **_book_fee(account, key, command)}
    order = checkout_commands.known_order(batch, command.tenant, command.payload.get("order_id"))
    account.close_dispute(key=key, outcome="lost", amount=amount, at=at)
    if order is not None and order.status == ORDER_REFUNDED:
        return {**result, "closed": True, "already_refunded": True, **_book_fee(account, key, command)}
    # The chargeback is a refund the gateway paid out (a fact): booked as one, waiting for its payment if need be (all
    # of what is left of a checkout order, or a part of it: ``order_chargebacks``).
    chargeback = _refund(app, batch, account, command, park=True)
    return {**result, "closed": True, "chargeback": chargeback, **_book_fee(account, key, command)}


def _check_invoice_dispute(command: LedgerCommand, invoice: Invoice) -> None:
    """A lost dispute of an invoice's payment takes back what that payment paid: the invoice must be paid, by the
    payment disputed, in the same currency, and the chargeback at most its total."""
    amount: Decimal = parse_decimal(payload.text(command, "amount"))
    code = payload.text(command, "currency")
    if invoice.document_type != INVOICE or invoice.status != PAID or code != invoice.currency \
            or not 0 < amount <= invoice.total:
        raise CommandRejected("invoice_dispute_mismatch", f"chargeback {amount} {code} of {invoice.document_type} "
                                                          f"{invoice.number} ({invoice.status}, {invoice.total} "
                                                          f"{invoice.currency}): reconcile by hand")
    other = _refund_of_other_payment(invoice, command.payload.get("refunded_payment"))
    if other is not None:
        raise CommandRejected("dispute_of_other_payment", f"chargeback of invoice {invoice.number}: {other}; "
                                                          "reconcile by hand")

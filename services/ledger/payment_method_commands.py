"""Ledger commands of saved payment methods (the roster's gateway tokens): ``payment_method.*``.

* ``payment_method.add`` / ``payment_method.remove``: up to 5 methods, the first is the default. ``card`` (brand,
  last4, exp_month, exp_year) is what the gateway told when the method was saved (the HTTP route asks it; never
  a card number);
* ``payment_method.card_update``: the gateway's new details of a saved card (ingest, from Stripe's
  ``payment_method.updated`` / ``payment_method.automatically_updated``: the account updater renewed its expiry);
* ``payment_method.expiry_notice``: records ``PaymentMethodExpiring`` or ``PaymentMethodExpired`` once per method
  and expiry (the card-expiry leader task, and an off-session charge that skipped an expired card);
* ``payment_customer.deleted``: the gateway deleted the account's customer, and its saved methods with it (ingest,
  from Stripe's ``customer.deleted``; since session 15): the account forgets the customer and that gateway's methods.
"""

from __future__ import annotations

from typing import Any

from billing_events.cards import CardDetailsError, card_details
from billing_events.messages import LedgerCommand
from billing_ledger import payload as fields
from billing_ledger.account_commands import account_of
from billing_ledger.application import CommandRejected, LedgerApplication, _Batch, handles
from billing_ledger.checkout_commands import profile_of
from billing_ledger.domain.card_expiry import NOTICES
from billing_ledger.limits import CARD_EXPIRY_NOTICE_DAYS_MAX
from billing_ledger.payload import at as effective_at
from billing_ledger.subscription_commands import _roster

INVALID_CARD = "invalid_card"


def _card(command: LedgerCommand, *, required: bool) -> dict[str, Any] | None:
    raw = command.payload.get("card")
    if raw is None and not required:
        return None
    try:
        return card_details(raw)
    except CardDetailsError as exc:
        raise CommandRejected(INVALID_CARD, str(exc)) from exc


def card_label(card: dict[str, Any] | None) -> str:
    """What people see when no label was given: ``Visa 4242``."""
    return f"{card['brand'].title()} {card['last4']}" if card else ""


@handles("payment_method.add")
def add_payment_method(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> None:
    account_of(batch, command.tenant)
    card = _card(command, required=False)
    _roster(batch, command.tenant or "").add_payment_method(
        method_id=fields.key(command, "method_id"), gateway=fields.text(command, "gateway", default="stripe"),
        label=fields.string(command, "label") or card_label(card), make_default=fields.flag(command, "default"),
        at=effective_at(command), by=command.issued_by, card=card)


@handles("payment_method.remove")
def remove_payment_method(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> None:
    _roster(batch, command.tenant or "").remove_payment_method(method_id=fields.text(command, "method_id"),
                                                                at=effective_at(command), by=command.issued_by)


@handles("payment_method.card_update")
def update_card(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> dict[str, Any]:
    """Rejected ``unknown_payment_method`` when the method is not on the account (removed, or another gateway's):
    recorded on the command's receipt, nothing changed."""
    account_of(batch, command.tenant)
    method_id, gateway = fields.text(command, "method_id"), fields.text(command, "gateway")
    card = _card(command, required=True)
    assert card is not None
    changed = _roster(batch, command.tenant or "").update_card(method_id=method_id, gateway=gateway, card=card,
                                                               at=effective_at(command), by=command.issued_by)
    return {"method_id": method_id, "changed": changed}


@handles("payment_method.expiry_notice")
def record_expiry_notice(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> dict[str, Any]:
    """``{method_id, notice: expiring | expired, notice_days}`` at the command's ``at``: recorded only when due and
    not recorded for the card's expiry yet (``recorded`` false otherwise, nothing changed)."""
    account_of(batch, command.tenant)
    method_id, notice = fields.text(command, "method_id"), fields.text(command, "notice")
    if notice not in NOTICES:
        raise CommandRejected(fields.INVALID, f"notice must be one of {', '.join(NOTICES)}")
    days: Any = command.payload.get("notice_days", 0)
    if isinstance(days, bool) or not isinstance(days, int) or not 0 <= days <= CARD_EXPIRY_NOTICE_DAYS_MAX:
        raise CommandRejected(fields.INVALID, f"notice_days must be a whole number of days, 0 to "
                                              f"{CARD_EXPIRY_NOTICE_DAYS_MAX}")
    recorded = _roster(batch, command.tenant or "").record_expiry_notice(
        method_id=method_id, notice=notice, notice_days=days, at=effective_at(command))
    return {"method_id": method_id, "notice": notice, "recorded": recorded}


@handles("payment_customer.deleted")
def delete_customer(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> dict[str, Any]:
    """The gateway deleted the account's customer (ingest, from Stripe's ``customer.deleted``, since session 15). The
    gateway detached its saved methods with it: none of them can be charged again (an off-session charge needs its
    customer), and a charge naming the customer is refused as an unknown object, which off-session charges take for a
    gateway outage and retry for ever. So the account forgets the customer and the saved methods of that gateway (a
    method of another customer is refused when saved; one attached to none cannot be charged off-session either);
    its other gateways' methods stay. Rejected ``unknown_payment_customer`` (recorded, nothing changed) when the
    account names another customer there (set again since) or none."""
    account_of(batch, command.tenant)
    gateway, customer = fields.text(command, "gateway", default="stripe"), fields.text(command, "customer")
    at = effective_at(command)
    if not profile_of(batch, command.tenant or "").remove_customer(gateway=gateway, customer=customer, at=at,
                                                                  by=command.issued_by):
        raise CommandRejected("unknown_payment_customer", f"{gateway} customer {customer!r} is not this account's")
    roster = _roster(batch, command.tenant or "")
    removed = [m["method_id"] for m in roster.payment_methods if m["gateway"] == gateway]
    for method_id in removed:
        roster.remove_payment_method(method_id=method_id, at=at, by=command.issued_by)
    return {"gateway": gateway, "customer": customer, "payment_methods_removed": removed}

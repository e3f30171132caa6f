"""An account's subscription roster and payment methods; a workspace's billing accounts.

The roster enforces the limit of live subscriptions per billing account (3 by default, configurable), and
remembers what trial eligibility needs (any subscription ever, trial ever used, the workspace the account is in). Payment methods are the
gateway's tokens only (no card data is ever stored): up to 5, the first is the default, the others are
backups in order. A card method keeps what its gateway told about it (``card``: brand, last four digits, expiry
month and year; never the number), updated by the gateway's webhook, and the expiry notices recorded for it
(``PaymentMethodExpiring`` / ``PaymentMethodExpired``, once per method and expiry: see ``card_expiry``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from billing_ledger.domain.card_expiry import EXPIRED, EXPIRING, is_expired, notice_due, notice_key
from billing_ledger.domain.card_expiry import expires_at as card_end
from eventsourcing.domain import Aggregate, event

PAYMENT_METHODS_MAX = 5


def roster_id(tenant: str) -> UUID:
    return uuid5(NAMESPACE_URL, f"/accounts/{tenant}/roster")


def workspace_id(workspace: str) -> UUID:
    return uuid5(NAMESPACE_URL, f"/workspaces/{workspace}")


class Roster(Aggregate):
    @staticmethod
    def create_id(tenant: str) -> UUID:
        return roster_id(tenant)

    @event("Created")
    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        self.live: list[str] = []
        self.ever_subscribed = False
        self.trial_used = False
        self.payment_methods: list[dict[str, Any]] = []
        self.receivable_invoiced: dict[str, int] = {}  # unit -> receivables already put on invoices
        self.tax_profile: dict[str, Any] | None = None
        self.expiry_notices: list[str] = []  # ``card_expiry.notice_key`` of every notice recorded
        self.workspace: str | None = None  # the one workspace the account belongs to (``Workspace``)

    def set_tax_profile(self, *, profile: dict[str, Any], at: datetime, by: str) -> None:
        """Country (ISO 3166-1), optional subdivision, business name and tax id (with its check result)."""
        self._tax_profile_set(profile=profile, at=at, by=by)

    @event("TaxProfileSet")
    def _tax_profile_set(self, profile: dict[str, Any], at: datetime, by: str) -> None:
        self.tax_profile = dict(profile)

    @event("ReceivableInvoiced")  # before session 7 (overage is now kept per period by the account): replays only
    def _receivable_invoiced(self, unit: str, up_to: int, invoice: str) -> None:
        self.receivable_invoiced[unit] = up_to

    def admit(self, *, subscription_id: UUID, limit: int, trial: bool, at: datetime) -> None:
        if str(subscription_id) in self.live:
            raise RosterError("this subscription is already live")
        if len(self.live) >= limit:
            raise SubscriptionLimitReached(
                f"a billing account supports at most {limit} live subscriptions; open another billing account "
                "for more distinct invoices")
        self._admitted(subscription_id=str(subscription_id), trial=trial, at=at)

    @event("SubscriptionAdmitted")
    def _admitted(self, subscription_id: str, trial: bool, at: datetime) -> None:
        self.live.append(subscription_id)
        self.ever_subscribed = True
        self.trial_used = self.trial_used or trial

    def release(self, *, subscription_id: UUID, at: datetime) -> None:
        if str(subscription_id) in self.live:
            self._released(subscription_id=str(subscription_id), at=at)

    @event("SubscriptionReleased")
    def _released(self, subscription_id: str, at: datetime) -> None:
        self.live.remove(subscription_id)

    def trial_eligible(self, workspace_accounts: int) -> bool:
        """Seed 004: exactly one billing account in the workspace (this one: ``workspace_accounts`` counts it), no
        prior or live subscription, no trial used."""
        return workspace_accounts == 1 and not self.ever_subscribed and not self.trial_used

    def join_workspace(self, *, workspace: str, at: datetime, by: str) -> None:
        """A billing account belongs to one workspace: joining another is refused (``workspace_mismatch``)."""
        if self.workspace == workspace:
            return
        if self.workspace is not None:
            raise WorkspaceMismatch(f"account {self.tenant!r} belongs to workspace {self.workspace!r}, not "
                                    f"{workspace!r}")
        self._workspace_joined(workspace=workspace, at=at, by=by)

    @event("WorkspaceJoined")
    def _workspace_joined(self, workspace: str, at: datetime, by: str) -> None:
        self.workspace = workspace

    # -- payment methods (gateway tokens only) -----------------------------------------------------------------

    def add_payment_method(self, *, method_id: str, gateway: str, label: str, make_default: bool, at: datetime,
                           by: str, card: dict[str, Any] | None = None) -> None:
        if any(m["method_id"] == method_id for m in self.payment_methods):
            raise RosterError(f"payment method {method_id!r} is already on the account")
        if len(self.payment_methods) >= PAYMENT_METHODS_MAX:
            raise RosterError(f"at most {PAYMENT_METHODS_MAX} payment methods per billing account")
        self._method_added(method_id=method_id, gateway=gateway, label=label,
                           make_default=make_default or not self.payment_methods, at=at, by=by, card=card)

    @event("PaymentMethodAdded")
    def _method_added(self, method_id: str, gateway: str, label: str, make_default: bool, at: datetime,
                      by: str, card: dict[str, Any] | None = None) -> None:
        # ``card`` since session 13: methods added before have none (no expiry known, never called expired).
        method = {"method_id": method_id, "gateway": gateway, "label": label, "card": dict(card) if card else None}
        if make_default:
            self.payment_methods.insert(0, method)
        else:
            self.payment_methods.append(method)

    def payment_method(self, method_id: str) -> dict[str, Any] | None:
        return next((m for m in self.payment_methods if m["method_id"] == method_id), None)

    def update_card(self, *, method_id: str, gateway: str, card: dict[str, Any], at: datetime, by: str) -> bool:
        """The gateway's new details of a saved card (its account updater renewed the expiry); False when they are
        what the roster already has."""
        method = self.payment_method(method_id)
        if method is None or method["gateway"] != gateway:
            raise UnknownPaymentMethod(f"payment method {method_id!r} of {gateway} is not on the account")
        if method.get("card") == card:
            return False
        self._card_updated(method_id=method_id, card=card, at=at, by=by)
        return True

    @event("PaymentMethodCardUpdated")
    def _card_updated(self, method_id: str, card: dict[str, Any], at: datetime, by: str) -> None:
        method = self.payment_method(method_id)
        if method is not None:
            method["card"] = dict(card)

    def record_expiry_notice(self, *, method_id: str, notice: str, notice_days: int, at: datetime) -> bool:
        """Records the card's ``notice`` if it is due at ``at`` and was not recorded for this expiry yet; False
        otherwise (a method removed or renewed meanwhile, a notice already recorded, or not due)."""
        method = self.payment_method(method_id)
        card = method.get("card") if method else None
        if card is None or notice_due(card, at, notice_days) != notice:
            return False
        if notice_key(method_id, card, notice) in self.expiry_notices:
            return False
        end = card_end(card)
        assert end is not None
        if notice == EXPIRING:
            self._expiring(method_id=method_id, card=dict(card), expires_at=end, at=at)
        else:
            self._expired(method_id=method_id, card=dict(card), expires_at=end, at=at)
        return True

    @event("PaymentMethodExpiring")
    def _expiring(self, method_id: str, card: dict[str, Any], expires_at: datetime, at: datetime) -> None:
        self.expiry_notices.append(notice_key(method_id, card, EXPIRING))

    @event("PaymentMethodExpired")
    def _expired(self, method_id: str, card: dict[str, Any], expires_at: datetime, at: datetime) -> None:
        self.expiry_notices.append(notice_key(method_id, card, EXPIRED))

    def remove_payment_method(self, *, method_id: str, at: datetime, by: str) -> None:
        if not any(m["method_id"] == method_id for m in self.payment_methods):
            raise RosterError(f"unknown payment method {method_id!r}")
        self._method_removed(method_id=method_id, at=at, by=by)

    @event("PaymentMethodRemoved")
    def _method_removed(self, method_id: str, at: datetime, by: str) -> None:
        self.payment_methods = [m for m in self.payment_methods if m["method_id"] != method_id]

    @property
    def default_payment_method(self) -> dict[str, Any] | None:
        return self.payment_methods[0] if self.payment_methods else None

    def usable_payment_method(self, at: datetime) -> dict[str, Any] | None:
        """The method a charge at ``at`` can use: the default unless its card has expired by then, else the first
        backup whose card has not (a method the gateway told no card details of counts: its expiry is unknown);
        None when every saved card has expired, or none is saved. What "has a payment method" means wherever the
        ledger decides on it (a trial's end); charging tries the expired ones too, last (``saved_methods``)."""
        return next((m for m in self.payment_methods if not is_expired(m.get("card"), at)), None)


class Workspace(Aggregate):
    """The billing accounts of one workspace (trial eligibility needs exactly one)."""

    @staticmethod
    def create_id(workspace: str) -> UUID:
        return workspace_id(workspace)

    @event("Created")
    def __init__(self, workspace: str) -> None:
        self.workspace = workspace
        self.accounts: list[str] = []

    def add_account(self, tenant: str) -> None:
        if tenant not in self.accounts:
            self._account_added(tenant=tenant)

    @event("AccountAdded")
    def _account_added(self, tenant: str) -> None:
        self.accounts.append(tenant)


class RosterError(ValueError):
    pass


class SubscriptionLimitReached(RosterError):
    pass


class UnknownPaymentMethod(RosterError):
    pass


class WorkspaceMismatch(RosterError):
    pass

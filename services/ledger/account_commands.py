"""Ledger commands of billing accounts: ``account.open``, ``credit.grant``, ``usage.debit``."""

from __future__ import annotations

from billing_events import ids
from billing_events.messages import LedgerCommand
from billing_events.money import parse_decimal, to_subunits
from billing_events.timeutil import parse_timestamp
from billing_ledger.application import CommandRejected, LedgerApplication, _Batch, handles
from billing_ledger.domain.account import BillingAccount


def account_of(batch: _Batch, tenant: str | None) -> BillingAccount:
    if not tenant:
        raise CommandRejected("missing_tenant", "the command names no tenant")
    return batch.existing(ids.account_id(tenant), "unknown_account",  # type: ignore[no-any-return]
                          f"tenant {tenant!r} has no billing account")


@handles("account.open")
def _open_account(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> None:
    payload = command.payload
    tenant = command.tenant or payload.get("tenant")
    if not tenant:
        raise CommandRejected("missing_tenant")
    if batch.get(ids.account_id(tenant)) is not None:
        raise CommandRejected("account_exists", f"tenant {tenant!r} already has a billing account")
    threshold = payload.get("low_balance_threshold")
    try:
        account = BillingAccount.open(
            tenant, payload["currency"],
            low_balance_threshold=to_subunits(parse_decimal(threshold)) if threshold is not None else None,
            opened_by=command.issued_by)
    except (ValueError, KeyError) as exc:
        raise CommandRejected("invalid_account", str(exc)) from exc
    batch.add(account)


@handles("credit.grant")
def _grant_credit(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> None:
    account = account_of(batch, command.tenant)
    payload = command.payload
    priority = payload.get("priority", 0)
    if type(priority) is not int:  # int("3") or int(2.5) would have ranked it silently
        raise CommandRejected("invalid_grant", f"priority must be a whole number, not {priority!r}")
    try:
        expires = payload.get("expires_at")
        account.grant_credit(
            grant_id=ids.grant_id(account.tenant, payload["grant_key"]),
            unit=payload["unit"],
            amount=to_subunits(parse_decimal(payload["amount"], field="amount")),
            priority=priority,
            effective_at=parse_timestamp(payload.get("effective_at") or command.issued_at),
            expires_at=parse_timestamp(expires) if expires else None,
            scope=payload.get("scope"),
            source=payload.get("source", "manual"),
            cause=dict(payload.get("cause") or {}, command_id=str(command.command_id)),
            granted_by=command.issued_by,
        )
    except (ValueError, KeyError) as exc:
        raise CommandRejected("invalid_grant", str(exc)) from exc


def _subunits_sent(command: LedgerCommand) -> int:
    """The command's ``amount_subunits``: an integer as rating sends it; 2.5 or "3" is rejected, never truncated
    or converted (the money posted would not be what was rated)."""
    amount = command.payload["amount_subunits"]
    if type(amount) is not int:
        raise CommandRejected("invalid_command", f"amount_subunits must be a whole number, not {amount!r}")
    return amount


@handles("usage.debit")
def _debit_usage(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> None:
    account = account_of(batch, command.tenant)
    payload = command.payload
    account.debit_usage(
        command_id=command.command_id,
        unit=payload["unit"],
        amount=_subunits_sent(command),
        meter=payload["meter"],
        at=parse_timestamp(payload["at"]),
        overage_policy=payload.get("overage_policy", "overage"),
        cause=payload.get("cause", {}),
    )

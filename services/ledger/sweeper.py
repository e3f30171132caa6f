"""Scheduled expiry inside the ledger process: grants past ``expires_at`` post their remainder to breakage,
plan credits past ``drawable_until`` (their period ended, the renewal not come yet) are set aside out of
``available``, holds past ``expires_at`` release themselves; the money of credit packages is recognised as their
credit is used.

Every ``SWEEP_INTERVAL_SECONDS`` the sweeper

1. learns the accounts opened since its last round by reading the event log from where it stopped (only
   ``BillingAccount.Opened`` notifications; the first round reads the whole log once);
2. reads the accounts in chunks (``SWEEP_ACCOUNTS_PER_BATCH_MAX``; from the aggregate cache, brought up to
   date in one query per chunk) and asks each whether a grant or a hold is due;
3. sends ``grant.expire`` / ``hold.expire`` for the due ones through ``apply_commands``, one transaction
   per chunk, command ids derived from tenant and sweep time;
4. sends ``money.recognise`` (right after the account's expiry commands) when a credit package granted
   in a credit unit has use whose money is not recognised yet (``BillingAccount.purchase_money_due``): at
   most once an hour per account and at the first sweep of each UTC day, and at once when such a grant has
   no credit left or expires, so its deferred revenue closes. Usage debits never recognise it themselves.
   The same command recognises the subscription fees billed in advance over their service period
   (``BillingAccount.fee_revenue_days_due``): at the first sweep of each UTC day (the day before's share, dated in
   it), and at once when a period ends.
5. sends ``invoice.credit_note_usage`` when usage no subscription invoice bills (an account without a live
   subscription, captured holds) drew credit notes' credit in a calendar month (UTC) that has ended
   (``BillingAccount.credit_note_usage_due``): the month's invoice taxes it (``credit_note_usage_commands``).

Exactly-once does not depend on the sweeper: an expiry closes its grant or hold in the same event, so a
second sweep (another ledger process, an overlapping round, a retry after a conflict) finds nothing to do.
A conflict with another writer simply leaves the account for the next round.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from billing_events import ids
from billing_events.messages import LedgerCommand
from billing_ledger.application import CommandResult, LedgerApplication
from billing_ledger.domain.account import BillingAccount
from billing_ledger.limits import (
    CONTENDED_CHUNK_COMMANDS_MAX,
    SWEEP_ACCOUNTS_PER_BATCH_MAX,
    SWEEP_DECISIONS_PER_TRANSACTION_MAX,
    SWEEP_INTERVAL_SECONDS,
    SWEEP_LOG_PAGE_EVENTS_MAX,
)
from billing_runtime.logging import get_logger
from billing_runtime.service import pause
from eventsourcing.persistence import IntegrityError
from eventsourcing.utils import get_topic

log = get_logger(__name__)

OPENED_TOPIC = get_topic(BillingAccount.Opened)
# The events one credit note usage invoice records at most (drafted, lines, tax, credit applied, finalized, its
# number, and on the account the credit applied and the bill, or its settlement at 0.00): ``_chunks``'s weight.
CREDIT_NOTE_USAGE_EVENTS_MAX = 9
SWEEPER = "ledger:sweeper"


class Sweeper:
    def __init__(self, app: LedgerApplication) -> None:
        self.app = app
        self.accounts: set[UUID] = set()
        self.weights: dict[UUID, int] = {}  # command id -> events it will record, at most (see _chunks)
        self._log_position = 0  # highest notification id already scanned for opened accounts

    def discover(self) -> None:
        recorder = self.app.process_recorder
        last = recorder.max_notification_id() or 0
        while self._log_position < last:
            page = recorder.select_notifications(self._log_position + 1, SWEEP_LOG_PAGE_EVENTS_MAX, stop=last,
                                                 topics=[OPENED_TOPIC])
            self.accounts.update(n.originator_id for n in page)
            if len(page) < SWEEP_LOG_PAGE_EVENTS_MAX:
                self._log_position = last
            else:
                self._log_position = page[-1].id

    def due_commands(self, account_ids: list[UUID], now: datetime) -> list[LedgerCommand]:
        """Expiry (and recognition) commands for the accounts with a grant, a hold or package money due by ``now``.

        A cached account is looked at in the cache (``peek``), not taken out and brought up to date: taking
        hundreds of accounts out every round made the HTTP holds on them meanwhile replay the account from
        the store. The cached copy may lag the store by what was recorded since it was put back; an expiry
        it misses is found next round, and a command issued on it is decided on the current state.
        """
        def kinds(account: Any) -> tuple[str, list[tuple[str, int]]] | None:
            if not isinstance(account, BillingAccount):
                return None
            due = []
            if account.grants_due_by(now):  # to expire, or past drawable_until to set aside
                due.append(("grant.expire", 1))
            if holds := account.holds_expiring_by(now):
                due.append(("hold.expire", holds))  # a HoldExpired each
            fee_days = account.fee_revenue_days_due(now)
            if fee_days or account.purchase_money_due(now):
                # After grant.expire: it sees the remainders lapsed. A FeeRevenueRecognised per UTC day due.
                due.append(("money.recognise", 1 + max(fee_days, 1)))
            if account.credit_note_usage_due(now):
                # An invoice a month due: its document's events, the number's, the account's (applied, billed).
                due.append(("invoice.credit_note_usage", CREDIT_NOTE_USAGE_EVENTS_MAX))
            return account.tenant, due

        found: list[tuple[str, list[tuple[str, int]]]] = []
        missing: list[UUID] = []
        for account_id in account_ids:
            if account_id not in self.app.cache or (seen := self.app.cache.peek(account_id, kinds)) is None:
                missing.append(account_id)
            else:
                found.append(seen)
        loaded = self.app.load_many(missing) if missing else {}
        try:
            found += [k for a in loaded.values() if (k := kinds(a)) is not None]
        finally:
            self.app.give_back(loaded)
        commands = []
        at = now.isoformat()
        for tenant, due in found:
            for kind, weight in due:
                if kind == "hold.expire" and weight > SWEEP_DECISIONS_PER_TRANSACTION_MAX:
                    # One account's mass expiry in parts, each its own transaction: the earliest holds first.
                    limit = SWEEP_DECISIONS_PER_TRANSACTION_MAX
                    parts = [(f"{at}/{n}", {"now": at, "limit": limit}, limit) for n in range(-(-weight // limit))]
                else:
                    parts = [(at, {"now": at}, weight)]
                for key, body, part_weight in parts:
                    command = LedgerCommand(command_id=ids.command_id(kind, tenant, key), kind=kind, tenant=tenant,
                                            issued_at=now, issued_by=SWEEPER, payload=body)
                    self.weights[command.command_id] = part_weight
                    commands.append(command)
        return commands

    def sweep(self, now: datetime) -> int:
        """One round; returns how many expiry (and recognition) commands were applied."""
        self.discover()
        applied = 0
        accounts = sorted(self.accounts)
        for start in range(0, len(accounts), SWEEP_ACCOUNTS_PER_BATCH_MAX):
            commands = self.due_commands(accounts[start:start + SWEEP_ACCOUNTS_PER_BATCH_MAX], now)
            if not commands:
                continue
            if self.app.can_decide_exclusively:
                # PostgreSQL: decided under the locks of its accounts (see pg_recorder), a few accounts at a
                # time, so it cannot lose a race to the writers busy on them (HTTP holds, the Kafka consumer),
                # and a hold on one of them waits for one small decision at most. Deciding optimistically,
                # the whole batch lost whenever any of its accounts changed meanwhile: with holds at 200/s on
                # the same 200 accounts, every round did (their expired holds never released their credit),
                # and each lost round threw away every account it had taken (replayed by the next writers).
                results = self._apply_contended(commands)
            else:
                try:
                    results = self.app.apply_commands(commands)
                except IntegrityError:  # SQLite: once more at once, a few accounts at a time
                    results = self._apply_contended(commands)
            applied += sum(r.outcome == "applied" for r in results)
            self.weights.clear()
        if applied:
            log.info("swept", commands=applied, at=now.isoformat())
        return applied


    def _apply_contended(self, commands: list[LedgerCommand]) -> list[CommandResult]:
        results: list[CommandResult] = []
        for chunk in self._chunks(commands):
            try:
                results += self.app.apply_commands(chunk, exclusive=True, contention=self.app.contention)
            except IntegrityError:  # only where nothing is decided under locks (SQLite: a plain retry)
                log.info("sweep_conflict_retry_next_round", commands=len(chunk))
        return results


    def _chunks(self, commands: list[LedgerCommand]) -> list[list[LedgerCommand]]:
        """``commands`` in order, in transactions of at most ``CONTENDED_CHUNK_COMMANDS_MAX`` commands and
        ``SWEEP_DECISIONS_PER_TRANSACTION_MAX`` events (a command's weight: the holds it expires; an account with
        more due is sent in parts, see ``due_commands``), at least one command each. The accounts of a transaction are locked while it decides, and a mass expiry (40 holds
        on each of 200 accounts expiring together) made every transaction of 20 accounts 800 expiries long:
        61-70 ms during which a hold on any of them waited."""
        chunks: list[list[LedgerCommand]] = []
        chunk: list[LedgerCommand] = []
        weight = 0
        for command in commands:
            one = self.weights.pop(command.command_id, 1)
            if chunk and (len(chunk) == CONTENDED_CHUNK_COMMANDS_MAX
                          or weight + one > SWEEP_DECISIONS_PER_TRANSACTION_MAX):
                chunks.append(chunk)
                chunk, weight = [], 0
            chunk.append(command)
            weight += one
        if chunk:
            chunks.append(chunk)
        return chunks


async def run_sweeper(app: LedgerApplication, stopping: asyncio.Event,
                      interval_seconds: float = SWEEP_INTERVAL_SECONDS,
                      is_leader: Callable[[], Awaitable[bool]] | None = None) -> None:
    """Sweeps every ``interval_seconds``; with several ledger processes only the leader does (the others
    would find nothing left to do, after a wasted read of every account)."""
    sweeper = Sweeper(app)
    while not stopping.is_set():
        try:
            if is_leader is None or await is_leader():
                await asyncio.to_thread(sweeper.sweep, datetime.now(UTC))
        except Exception:
            log.exception("sweep_failed")
        await pause(stopping, interval_seconds)

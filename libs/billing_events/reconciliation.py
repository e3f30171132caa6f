"""Usage reconciliation: what each service's store says became of an accepted usage event, and the join that
proves every accepted event ended in exactly one outcome (DESIGN.md section 4).

Each service reads its own store into these records (``billing_ingest.reconcile``, ``billing_rating.reconcile``,
``billing_ledger.reconcile``; no service reads another's), and :func:`account_for` and :func:`check_debits` join
them per tenant. Nothing
here reads a store or prices anything: the records are the contract between the three readers and the report
``billing reconcile usage`` prints.

The outcomes of an accepted event (``Report.counts``):

* ``posted``: rating sent a ``usage.debit`` (a debit of 0 for free usage: an allowance, a trial, a flat fee
  already charged) and the ledger recorded it (``UsageDebited``); ``posted_at_period_close``: a ``max``, ``last``
  or ``unique_count`` meter's event, billed by the debit its period's close sent, which the ledger recorded;
* ``rejected``, by reason: rating refused it (its dead letter's reason, ``rating:<reason>``), or the ledger did
  (a rejected receipt, or ``UsageRejected`` for a ``block`` overage policy: ``ledger:<reason>``);
* ``not_billable``, by rating's decision: the meter's filters left it out, every reading of a close-priced
  line was voided before the close (``voided_before_close``), or a correction in another ``group_by`` group
  voided the reading (``voided_by_correction``; a correction there to more than 0 moves it: posted at that
  group's close);
* ``in_flight``: accepted and not rated yet, rated and sent but not applied by the ledger yet (both for at most
  the grace period), or waiting for its period's close (a close-priced meter: no age limit).

Discrepancies (``Report.discrepancies``), each with the event id: an accepted event with no rating decision past
the grace period (``not_rated``), a decision whose ledger command was never applied past it (``not_applied``), a
receipt saying applied without the account recording the debit (``applied_without_debit``), a debit the ledger
refused (``block``) whose event rating still counts in its running total past the grace period
(``refusal_still_counted``: the period's later usage was priced as if it had been billed), an event debited by
more than one ``UsageDebited`` or a command recorded twice (``debited_twice``), and a usage debit of an event
ingest never accepted (``debit_not_accepted``).

Ingest remembers an accepted event only for the dedup window plus a margin (``dedup.CLEANUP_MARGIN``), so only
events whose own time is inside the window can be proven; the report says which window it covers. Ingest keeps no
acceptance time: the grace period of ``not_rated`` is counted from the event's own time (a late upload of an old
event can show as ``not_rated`` while rating catches up: run again after the grace period to confirm).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal
from uuid import UUID

# What rating's decision sent: a debit of its own, the debit of its period's close, nothing yet (the period is
# open), a dead letter, or nothing at all (not billable).
DecisionKind = Literal["debit", "close_debit", "awaiting_close", "rejected", "not_billable"]

# A usage debit the ledger refused under a ``block`` overage policy, and rating's decision once it took it back.
REFUSED_FOR_CREDIT = "insufficient_credit"
REFUSED_DECISION = "refused"

# How long an accepted event may wait for its rating decision, and a sent command for the ledger, before its
# absence is a discrepancy rather than work in flight: far above the lag of a healthy stack (seconds).
GRACE_SECONDS_DEFAULT = 900
# Event ids listed per discrepancy kind in the readable table (the JSON document lists all of them).
TABLE_EVENTS_PER_KIND_MAX = 20


@dataclass(frozen=True, slots=True)
class Accepted:
    """An event ingest accepted (``seen_events``), by its own time."""

    tenant: str
    event_id: str
    event_time: datetime


@dataclass(frozen=True, slots=True)
class Decision:
    """Rating's decision of one event (``rated_events``) and the ledger command it implies.

    ``command_id``: the debit rating sent (``debit``), or the debit of the period's close (``close_debit``).
    ``reason``: the dead letter's reason (``rejected``) or the decision (``not_billable``). ``sent_at``: when the
    command left rating (the decision's ``rated_at``, the close's ``closed_at``).
    """

    tenant: str
    event_id: str
    decision: str
    kind: DecisionKind
    command_id: UUID | None = None
    reason: str | None = None
    sent_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class LedgerOutcome:
    """What the ledger did with one command: ``posted`` (``UsageDebited``) or ``rejected`` with a reason."""

    command_id: UUID
    outcome: Literal["posted", "rejected", "applied_without_debit"]
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class UsageDebit:
    """One ``BillingAccount.UsageDebited`` of the tenant's account: ``at`` is the usage's time, ``closed`` a
    period close's debit (its ``event_ids`` are a trace of the period's events, not one event's charge)."""

    tenant: str
    command_id: UUID
    event_ids: tuple[str, ...]
    at: datetime
    closed: bool
    amount_subunits: int
    unit: str


@dataclass(frozen=True, slots=True)
class Discrepancy:
    kind: str
    tenant: str
    event_id: str | None
    detail: str
    command_id: UUID | None = None

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "tenant": self.tenant, "event_id": self.event_id,
                "command_id": str(self.command_id) if self.command_id else None, "detail": self.detail}


@dataclass
class Report:
    window_start: datetime
    window_end: datetime
    checked_at: datetime
    grace: timedelta
    tenants: list[str] = field(default_factory=list)
    accepted: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    not_billable: Counter[str] = field(default_factory=Counter)
    in_flight: Counter[str] = field(default_factory=Counter)
    discrepancies: list[Discrepancy] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.discrepancies

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "window": {"start": self.window_start.isoformat(), "end": self.window_end.isoformat()},
            "checked_at": self.checked_at.isoformat(), "grace_seconds": int(self.grace.total_seconds()),
            "tenants": self.tenants, "accepted": self.accepted,
            "outcomes": {
                "posted": self.counts["posted"], "posted_at_period_close": self.counts["posted_at_period_close"],
                "rejected": sum(self.rejected.values()), "not_billable": sum(self.not_billable.values()),
                "in_flight": sum(self.in_flight.values()),
            },
            "rejected_by_reason": dict(sorted(self.rejected.items())),
            "not_billable_by_decision": dict(sorted(self.not_billable.items())),
            "in_flight_by_stage": dict(sorted(self.in_flight.items())),
            "discrepancies_by_kind": dict(sorted(Counter(d.kind for d in self.discrepancies).items())),
            "discrepancies": [d.to_json() for d in self.discrepancies],
            "notes": self.notes,
        }

    def to_table(self) -> str:
        """The report for a person: the counts, then each discrepancy kind with its event ids."""
        document = self.to_json()
        outcomes = document["outcomes"]
        lines = [(f"usage reconciliation, events of {document['window']['start']} .. {document['window']['end']} "
                  f"(checked {document['checked_at']}, grace {document['grace_seconds']} s)"),
                 f"tenants: {len(self.tenants)}   accepted: {self.accepted}", ""]
        rows: list[tuple[str, int]] = [("posted", outcomes["posted"]),
                                       ("posted at period close", outcomes["posted_at_period_close"]),
                                       ("rejected", outcomes["rejected"])]
        rows += [(f"  {reason}", n) for reason, n in document["rejected_by_reason"].items()]
        rows.append(("not billable", outcomes["not_billable"]))
        rows += [(f"  {decision}", n) for decision, n in document["not_billable_by_decision"].items()]
        rows.append(("in flight", outcomes["in_flight"]))
        rows += [(f"  {stage}", n) for stage, n in document["in_flight_by_stage"].items()]
        rows.append(("discrepancies", len(self.discrepancies)))
        width = max(len(name) for name, _ in rows)
        lines += [f"{name:<{width}}  {count:>10}" for name, count in rows]
        by_kind: dict[str, list[Discrepancy]] = {}
        for item in self.discrepancies:
            by_kind.setdefault(item.kind, []).append(item)
        for kind, items in sorted(by_kind.items()):
            lines += ["", f"{kind} ({len(items)}):"]
            for item in items[:TABLE_EVENTS_PER_KIND_MAX]:
                lines.append(f"  {item.tenant}  {item.event_id or '-'}  {item.detail}")
            if len(items) > TABLE_EVENTS_PER_KIND_MAX:
                lines.append(f"  ... {len(items) - TABLE_EVENTS_PER_KIND_MAX} more (--format json lists all)")
        lines += ["", *self.notes] if self.notes else []
        lines.append("OK: every accepted event has one outcome" if self.ok else "DISCREPANCIES FOUND")
        return "\n".join(lines)


def account_for(report: Report, tenant: str, accepted: Iterable[Accepted], decisions: Mapping[str, Decision],
                outcomes: Mapping[UUID, LedgerOutcome]) -> None:
    """Adds the outcomes (and discrepancies) of some of one tenant's accepted events to ``report``.

    ``accepted``: events of the report's window; ``decisions``: rating's, by event id; ``outcomes``: the ledger's,
    by command id, of the commands those decisions sent.
    """
    stale = report.checked_at - report.grace
    for event in accepted:
        report.accepted += 1
        decision = decisions.get(event.event_id)
        if decision is None:
            if event.event_time < stale:
                report.discrepancies.append(Discrepancy(
                    "not_rated", tenant, event.event_id,
                    f"accepted (event time {event.event_time.isoformat()}), no rating decision"))
            else:
                report.in_flight["accepted, not rated yet"] += 1
            continue
        if decision.kind == "rejected":
            report.rejected[f"rating:{decision.reason}"] += 1
        elif decision.kind == "not_billable":
            report.not_billable[decision.reason or decision.decision] += 1
        elif decision.kind == "awaiting_close":
            report.in_flight["rated, period not closed yet"] += 1
        else:
            assert decision.command_id is not None, decision
            _ledger_outcome(report, tenant, decision, outcomes.get(decision.command_id), stale)


def _ledger_outcome(report: Report, tenant: str, decision: Decision, outcome: LedgerOutcome | None,
                    stale: datetime) -> None:
    at_close = decision.kind == "close_debit"
    if outcome is None:
        if decision.sent_at is not None and decision.sent_at >= stale:
            report.in_flight["sent, not applied by the ledger yet"] += 1
            return
        what = "its period's close debit" if at_close else "its debit"
        report.discrepancies.append(Discrepancy(
            "not_applied", tenant, decision.event_id,
            f"rating decided {decision.decision!r} and sent {what} {decision.command_id} "
            f"({decision.sent_at.isoformat() if decision.sent_at else 'time unknown'}); the ledger has no receipt",
            decision.command_id))
    elif outcome.outcome == "posted":
        report.counts["posted_at_period_close" if at_close else "posted"] += 1
    elif outcome.outcome == "rejected" and outcome.reason == REFUSED_FOR_CREDIT and not at_close and (
            decision.decision != REFUSED_DECISION):
        # The ledger refused the debit (``block``) and rating still counts the event in its running total: the
        # period's later usage was priced as if it had been billed (rating takes it back when it reads the ledger's
        # ``UsageRejected``: ``billing_rating.refusals``).
        if decision.sent_at is not None and decision.sent_at >= stale:
            report.in_flight["refused by the ledger, not taken back by rating yet"] += 1
            return
        report.discrepancies.append(Discrepancy(
            "refusal_still_counted", tenant, decision.event_id,
            f"the ledger refused {decision.command_id} ({outcome.reason}); rating's decision is still "
            f"{decision.decision!r}: its quantity stays in the period's running total", decision.command_id))
    elif outcome.outcome == "rejected":
        report.rejected[f"ledger:{outcome.reason}"] += 1
    else:
        report.discrepancies.append(Discrepancy(
            "applied_without_debit", tenant, decision.event_id,
            f"the ledger's receipt of {decision.command_id} says applied, the account records no usage debit",
            decision.command_id))


def check_debits(report: Report, tenant: str, debits: Iterable[UsageDebit], accepted_ids: set[str]) -> None:
    """Adds the discrepancies of one tenant's usage debits to ``report``: an event debited twice, a command recorded
    twice, a debit of an event ingest never accepted. ``debits``: those of usage in the report's window;
    ``accepted_ids``: which of their events ingest accepted."""
    by_event: dict[str, list[UUID]] = {}
    by_command: Counter[UUID] = Counter()
    for debit in debits:
        by_command[debit.command_id] += 1
        if debit.closed:
            continue  # a close's trace names many events; each of them was accepted and checked above
        for event_id in debit.event_ids:
            by_event.setdefault(event_id, []).append(debit.command_id)
            if event_id not in accepted_ids:
                report.discrepancies.append(Discrepancy(
                    "debit_not_accepted", tenant, event_id,
                    f"usage debit {debit.command_id} ({debit.amount_subunits} sub-units {debit.unit}, usage at "
                    f"{debit.at.isoformat()}) of an event ingest never accepted", debit.command_id))
    for event_id, commands in sorted(by_event.items()):
        if len(commands) > 1:
            report.discrepancies.append(Discrepancy(
                "debited_twice", tenant, event_id,
                f"debited {len(commands)} times, by commands {', '.join(sorted({str(c) for c in commands}))}",
                commands[0]))
    for command_id, times in sorted(by_command.items()):
        if times > 1 and not any(command_id in commands for commands in by_event.values()):
            report.discrepancies.append(Discrepancy(
                "debited_twice", tenant, None, f"usage debit {command_id} recorded {times} times", command_id))

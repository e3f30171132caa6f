"""Audit: a tenant's account stream and its invoices and credit notes as JSON lines, replayed to its balances and
documents, hash chain checked.

An export line is one event, as JSON::

    {"aggregate_id": "...", "version": 3, "type": "BillingAccount.UsageDebited",
     "timestamp": "2026-11-21T10:00:00.123456+00:00", "chain_hash": "<hex>", "data": {...}}

First every event of the tenant's ``BillingAccount``, in version order; then (since session 14) every event of each
of its invoices and credit notes (``type`` ``Invoice.*``, ``chain_hash`` null: documents are not chained), one
document after the other, each in version order (``billing_ledger.audit_invoices.stored_documents`` says which).
``data`` is every event attribute in the canonical JSON form of :mod:`billing_ledger.domain.chain`, so

* the chain is recomputed from the account's lines alone: ``chain_hash(previous, type, aggregate_id, version,
  timestamp, data)``, the first event's previous hash being ``GENESIS``; the last hash is ``chain_head``, and an
  ``anchor`` (a version and the hash recorded for it at an earlier audit) must be found again;
* the balances are sums of ``data.postings`` (debit positive, credit negative, integer sub-units of
  10**-9) per ledger account and unit: the wallet balance is minus the ``tenant_wallet`` sum, receivables
  the ``receivables`` sum, and ``held`` follows the hold events (holds post nothing); the late usage reserve is
  minus the ``tenant_wallet`` postings of the grants a ``GrantSetAside`` names (every wallet posting names its
  grant), and ``available = balance - held - late_usage_reserve``;
* the documents are read from their lines and checked against the account's (chained) postings
  (:mod:`billing_ledger.audit_invoices`: each line rounded once, totals, tax at each line's rate, what each invoice
  made receivable and how it was paid or voided, what credit notes gave back, top-ups against their purchases).

:func:`replay` does exactly that with nothing but the lines (an auditor needs only this repository);
:func:`verify_store` reads the same from the event store, also rebuilds the aggregate with the domain model and
checks the two agree, and checks receivables against the open invoices and the unbilled overage the domain model
keeps (which an export does not carry); :func:`compare_with_projection` compares with the projections' balance API.
An export written before session 14 holds the account's lines only: its chain and balances replay as before, and each
document its postings name is reported missing (export again).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from billing_events import ids
from billing_events.money import from_subunits
from billing_ledger.amounts import show
from billing_ledger.application import LedgerApplication
from billing_ledger.audit_invoices import (
    DOCUMENT_EVENT_PREFIX,
    InvoiceBooks,
    check_documents,
    invoice_problems,
    read_documents,
    stored_documents,
)
from billing_ledger.domain.account import BillingAccount
from billing_ledger.domain.chain import GENESIS, chain_hash, event_content, jsonable
from billing_ledger.domain.postings import LedgerAccount, assert_balanced
from billing_ledger.limits import AUDIT_PAGE_EVENTS_MAX

ACCOUNT_EVENT_PREFIX = "BillingAccount."
# Holds post nothing; these events change what is held: (sign, the data field with the amount).
HOLD_CHANGES = {
    "BillingAccount.HoldPlaced": (1, "amount"),
    "BillingAccount.HoldCaptured": (-1, "held_amount"),
    "BillingAccount.HoldReleased": (-1, "amount"),
    "BillingAccount.HoldExpired": (-1, "amount"),
}
# A grant's credit set aside for its ended period's late usage: out of ``available`` from then on (no postings).
SET_ASIDE = "BillingAccount.GrantSetAside"
OPENED = "BillingAccount.Opened"


@dataclass
class Replay:
    events: int = 0  # the account's events: its last version, when none is missing
    head: str = GENESIS
    problems: list[str] = field(default_factory=list)  # of the chain and the postings
    tenant: str | None = None  # the account's (its ``Opened``)
    documents: int = 0  # invoices and credit notes read from the export
    document_problems: list[str] = field(default_factory=list)
    # (ledger account, unit) -> signed sub-units
    ledger: dict[tuple[str, str], int] = field(default_factory=dict)
    held: dict[str, int] = field(default_factory=dict)
    # grant id -> (unit, signed sum of its tenant_wallet postings); the grants set aside (``GrantSetAside``)
    grant_wallet: dict[str, tuple[str, int]] = field(default_factory=dict)
    set_aside: set[str] = field(default_factory=set)

    def wallets(self) -> dict[str, dict[str, int]]:
        """Per unit: balance (open credit), held, late_usage_reserve (credit set aside for an ended period's late
        usage), available = balance - held - late_usage_reserve, receivable (sub-units)."""
        units = {u for (_, u) in self.ledger} | set(self.held)
        reserve: dict[str, int] = {}
        for grant in self.set_aside:
            unit, amount = self.grant_wallet.get(grant, ("", 0))
            if unit:
                reserve[unit] = reserve.get(unit, 0) - amount
        result = {}
        for unit in sorted(units):
            balance = -self.ledger.get((LedgerAccount.TENANT_WALLET.value, unit), 0)
            held = self.held.get(unit, 0)
            aside = reserve.get(unit, 0)
            result[unit] = {"balance": balance, "held": held, "late_usage_reserve": aside,
                            "available": balance - held - aside,
                            "receivable": self.ledger.get((LedgerAccount.RECEIVABLES.value, unit), 0)}
        return result

    def to_json(self) -> dict[str, Any]:
        return {
            "events": self.events, "chain_head": self.head, "chain_ok": not self.problems,
            "wallets": {u: {k: show(v, u) for k, v in w.items()} for u, w in self.wallets().items()},
            "ledger": {f"{a}:{u}": show(v, u) for (a, u), v in sorted(self.ledger.items())},
        }

    def report(self) -> dict[str, Any]:
        """What ``billing audit replay`` prints: ``to_json``, the tenant, the documents checked, every problem."""
        return {"tenant": self.tenant, **self.to_json(), "documents_checked": self.documents,
                "problems": self.problems + self.document_problems}


def to_record(event: Any) -> dict[str, Any]:
    """One export line (as a dict) for a stored domain event."""
    return {"aggregate_id": str(event.originator_id), "version": event.originator_version,
            "type": type(event).__qualname__, "timestamp": event.timestamp.isoformat(),
            "chain_hash": getattr(event, "chain_hash", None), "data": jsonable(event_content(event))}


def account_events(app: LedgerApplication, tenant: str) -> Iterator[Any]:
    """The account's stored events in version order, read in pages (never the aggregate cache)."""
    account_id, last = ids.account_id(tenant), 0
    while True:
        page = list(app.events.get(account_id, gt=last or None, limit=AUDIT_PAGE_EVENTS_MAX))
        yield from page
        if len(page) < AUDIT_PAGE_EVENTS_MAX:
            return
        last = page[-1].originator_version


def export_lines(app: LedgerApplication, tenant: str) -> Iterator[str]:
    """The tenant's export: its account's events, then its documents' (see the module doc)."""
    books = InvoiceBooks()
    for event in account_events(app, tenant):
        books.observe(event)
        yield _line(to_record(event))
    for records in document_records(app, tenant, books).values():
        for record in records:
            yield _line(record)


def _line(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, ensure_ascii=False)


def document_records(app: LedgerApplication, tenant: str, books: InvoiceBooks) -> dict[str, list[dict[str, Any]]]:
    """The export records of the tenant's documents in the store (``stored_documents``), by id, the oldest document
    first."""
    streams = stored_documents(app, tenant, books)
    ordered = sorted(streams.items(), key=lambda item: (item[1][0].timestamp, item[0]))
    return {key: [to_record(event) for event in events] for key, events in ordered}


def replay(records: Iterable[dict[str, Any]], anchors: dict[int, str] | None = None, *,
           with_documents: bool = True) -> Replay:
    """Recomputes the chain and the balances from export records alone, then (``with_documents``) reads and checks
    the documents against the account's postings: every document the postings name must be in the records.
    ``anchors`` (version -> the chain hash recorded for it at an earlier audit) must be found again."""
    result = Replay()
    previous = GENESIS
    books = InvoiceBooks()
    documents: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        if str(record.get("type", "")).startswith(DOCUMENT_EVENT_PREFIX):
            documents.setdefault(str(record.get("aggregate_id")), []).append(record)
            continue
        if not str(record.get("type", "")).startswith(ACCOUNT_EVENT_PREFIX):
            result.problems.append(f"a line of type {record.get('type')!r} is neither the account's nor a "
                                   "document's")
            continue
        if documents:
            result.problems.append(f"version {record['version']} ({record['type']}) of the account comes after its "
                                   "documents: the export was rearranged")
        books.observe_record(record)
        if record["type"] == OPENED:
            result.tenant = record["data"].get("tenant")
        result.events += 1
        version = record["version"]
        where = f"version {version} ({record['type']})"
        if version != result.events:
            result.problems.append(f"{where}: expected version {result.events}: an event is missing or moved")
        expected = chain_hash(previous, record["type"], record["aggregate_id"], version, record["timestamp"],
                              record["data"])
        if record.get("chain_hash") != expected:
            result.problems.append(f"{where}: chain hash {record.get('chain_hash')} != recomputed {expected}")
        previous = record.get("chain_hash") or expected
        postings = record["data"].get("postings") or []
        try:
            assert_balanced(postings)
        except AssertionError as exc:
            result.problems.append(f"{where}: {exc}")
        for line in postings:
            key = (line["account"], line["unit"])
            result.ledger[key] = result.ledger.get(key, 0) + int(line["amount"])
            if line["account"] == LedgerAccount.TENANT_WALLET.value and line.get("grant_id"):
                grant = str(line["grant_id"])
                result.grant_wallet[grant] = (line["unit"], result.grant_wallet.get(grant, ("", 0))[1]
                                              + int(line["amount"]))
        if record["type"] == SET_ASIDE:
            result.set_aside.add(str(record["data"]["grant_id"]))
        change = HOLD_CHANGES.get(record["type"])
        if change is not None:
            unit = record["data"]["unit"]
            result.held[unit] = result.held.get(unit, 0) + change[0] * int(record["data"][change[1]])
        if anchors and version in anchors and record.get("chain_hash") != anchors[version]:
            result.problems.append(f"{where}: chain hash {record.get('chain_hash')} is not the anchor's "
                                   f"{anchors[version]}: the stream was rewritten since that audit")
    result.head = previous
    for version in sorted(v for v in anchors or {} if v > result.events):
        result.problems.append(f"the anchor's version {version} is beyond the export's last event ({result.events}): "
                               "events were removed since that audit")
    if with_documents and (documents or books.documents):
        tenant = result.tenant or ""
        read, problems = read_documents(tenant, documents)
        result.documents = len(read)
        result.document_problems = problems + check_documents(tenant, read, books, result.ledger)
    return result


def replay_lines(lines: Iterable[str], anchors: dict[int, str] | None = None) -> Replay:
    return replay((json.loads(line) for line in lines if line.strip()), anchors)


def parse_anchor(text: str) -> tuple[int, str]:
    """``VERSION:HASH`` (``events`` and ``chain_head`` of an earlier audit's output) as (version, hash), else
    ValueError."""
    version, _, hashed = text.partition(":")
    if not version.isdigit() or int(version) < 1 or len(hashed) != len(GENESIS) \
            or any(c not in "0123456789abcdef" for c in hashed):
        raise ValueError(f"an anchor is VERSION:HASH, the `events` and `chain_head` of an earlier audit (e.g. "
                         f"42:{'0' * 8}...), not {text!r}")
    return int(version), hashed


@dataclass
class Verification:
    tenant: str
    replay: Replay
    problems: list[str]
    documents: int = 0  # invoices and credit notes checked against the books (``audit_invoices``)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {"tenant": self.tenant, "ok": self.ok, "problems": self.problems, **self.replay.to_json(),
                "documents_checked": self.documents}


def verify_store(app: LedgerApplication, tenant: str) -> Verification:
    """Replays the account from the event store twice (postings, and the domain model) and checks the chain, then
    the tenant's invoices and credit notes against the books (``audit_invoices``)."""
    replayed = replay((to_record(e) for e in account_events(app, tenant)), with_documents=False)
    problems = list(replayed.problems)
    if replayed.events == 0:
        return Verification(tenant, replayed, [f"tenant {tenant!r} has no billing account"])
    snapshot = app.snapshotter.latest(ids.account_id(tenant)) if app.snapshotter is not None else None
    account: Any = None
    books = InvoiceBooks()
    try:  # from the events alone (never a snapshot), checking the latest snapshot on the way
        for event in account_events(app, tenant):
            account = event.mutate(account)
            books.observe(event)
            if snapshot is not None and account.version == snapshot[0]:
                problems += _snapshot_problems(app, account, snapshot[1])
    except Exception as exc:  # noqa: BLE001 - a broken stream is a finding, not a crash
        problems.append(f"the account does not replay: {exc!r}")
        return Verification(tenant, replayed, problems)
    if snapshot is not None and snapshot[0] > account.version:
        problems.append(f"a snapshot at version {snapshot[0]} is beyond the last event ({account.version})")
    if account.chain_head != replayed.head:
        problems.append(f"aggregate chain head {account.chain_head} != replayed {replayed.head}")
    for unit, wallet in replayed.wallets().items():
        rebuilt = {"balance": account.balance(unit), "held": account.held(unit),
                   "late_usage_reserve": account.late_usage_reserve(unit),
                   "available": account.available(unit), "receivable": account.receivable(unit)}
        for name, value in rebuilt.items():
            if wallet[name] != value:
                problems.append(f"{unit} {name}: postings give {wallet[name]}, the domain model {value}")
    try:
        records = document_records(app, tenant, books)
        documents, mismatches = invoice_problems(app, tenant, account, books, replayed.ledger, records)
    except Exception as exc:  # noqa: BLE001 - a document that does not replay is a finding, not a crash
        documents, mismatches = 0, [f"the invoices cannot be checked: {exc!r}"]
    return Verification(tenant, replayed, problems + mismatches, documents)


def _snapshot_problems(app: LedgerApplication, replayed: BillingAccount, snapshotted: Any) -> list[str]:
    """The latest snapshot (snapshots.py) must be the account as its events build it at that version."""
    if snapshotted is None:
        return [f"the snapshot at version {replayed.version} cannot be read (it is ignored when loading)"]
    if state_of(app, snapshotted) != state_of(app, replayed):
        return [f"the snapshot at version {replayed.version} differs from the account replayed from its events"]
    return []


def state_of(app: LedgerApplication, aggregate: Any) -> Any:
    """An aggregate's attributes as a snapshot stores them (the transcoder's round trip: tuples become lists)."""
    state = {k: v for k, v in vars(aggregate).items() if k != "_pending_events"}
    return app.mapper.transcoder.decode(app.mapper.transcoder.encode(state))


def compare_with_projection(verification: Verification, projection: dict[str, Any]) -> list[str]:
    """Mismatches between the replayed wallets and the projections' ``GET /v1/accounts/{tenant}/balance``."""
    problems = []
    shown = {w["unit"]: w for w in projection.get("wallets", [])}
    for unit, wallet in verification.replay.wallets().items():
        if unit not in shown:
            if any(wallet.values()):
                problems.append(f"projection has no {unit} wallet")
            continue
        for name in ("balance", "held", "late_usage_reserve", "available", "receivable"):
            if name in shown[unit] and Decimal(shown[unit][name]) != from_subunits(wallet[name]):
                problems.append(f"projection {unit} {name} {shown[unit][name]} != ledger {show(wallet[name], unit)}")
    return problems

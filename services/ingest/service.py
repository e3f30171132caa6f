"""The ingest gateway: validate, deduplicate and forward usage events; learn the catalogue from the ledger.

Exactly-once without Kafka transactions: the dedup table (``dedup``) remembers each (tenant, event id),
written in the same database transaction as the batch's publish (a Kafka poll: each slice's), committed
after the publish. A crash before the commit forgets the batch, which is redelivered (its offsets were not
committed) and published again; a genuine duplicate is answered ``duplicate``. Downstream, rating deduplicates by event id and the
ledger by command id, so a second publish is harmless. Nothing is lost: offsets are committed only after
the commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
from collections import Counter as Tally
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from itertools import pairwise
from typing import Any

import orjson
from billing_events import ids, topics
from billing_events.messages import AcceptedUsage, LedgerEvent, UsageEvent, UsageRejection
from billing_events.timeutil import utcnow
from billing_ingest import dedup
from billing_ingest.validation import (
    CatalogKnowledge,
    Invalid,
    MeterRules,
    VerifiedUsage,
    Verifier,
    parse_raw,
)
from billing_runtime.bus import Bus, OutMessage, Record, header
from billing_runtime.db import Database
from billing_runtime.logging import get_logger
from billing_runtime.service import pause
from billing_runtime.settings import Settings
from prometheus_client import Counter

log = get_logger(__name__)

EVENTS = Counter("billing_ingest_events_total", "Usage events by outcome", ["outcome"])
DEDUP_FORGOTTEN = Counter("billing_ingest_dedup_forgotten_total", "Dedup keys deleted after the window")
REJECTIONS = Counter("billing_ingest_rejections_total", "Rejected usage events by reason", ["reason"])

# A dead letter keeps the original payload up to this size (a larger one is cut and marked truncated), so
# a dead letter always fits in a Kafka message whatever arrived.
DEAD_LETTER_PAYLOAD_CHARS_MAX = 64 * 1024
# A batch (a whole Kafka poll, up to 2,000 records) is handled as a pipeline of slices, each its own claim,
# publish and commit: the next slice is checked while PostgreSQL claims the keys of one and Kafka stores its
# records. Fewer, larger slices cost fewer transactions; below this size a slice is not worth one.
PIPELINE_SLICE_EVENTS_MIN = 500
PIPELINE_SLICES_MAX = 2
# Tenants are few: the text of their account ids (message keys) is built once per tenant.
ACCOUNT_KEYS_CACHED_MAX = 65536


@lru_cache(maxsize=ACCOUNT_KEYS_CACHED_MAX)
def _account_key(tenant: str) -> str:
    """The message key of a tenant's records: its billing account id."""
    return str(ids.account_id(tenant))


_ACCEPTED_HEADERS = (("schema", b"usage.accepted/v1"),)
_REJECTED_HEADERS = (("schema", b"usage.rejected/v1"),)

SCHEMA = dedup.SCHEMA + """
CREATE TABLE IF NOT EXISTS known_tenants (tenant TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS known_meters (code TEXT PRIMARY KEY, required_properties TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS catalog_state (id INTEGER PRIMARY KEY, version INTEGER NOT NULL);
"""


ACCEPTED, DUPLICATE, REJECTED = "accepted", "duplicate", "rejected"
Checked = VerifiedUsage | Invalid

_ACCEPTED_SCHEMA = AcceptedUsage.model_fields["schema_"].default


def accepted_record(event: UsageEvent, accepted_at: datetime, source: str, catalog_version: int) -> bytes:
    """The ``billing.usage.accepted`` record of a verified event: the bytes ``AcceptedUsage(...).to_json()``
    gives, written by orjson from the event's fields (the model's validation and serialisation cost about
    as much as everything else ingest does per event). A value orjson refuses (an integer property beyond
    64 bits) goes through the model, which also raises what it raised before for anything unencodable.
    ``tests/unit/ingest/test_fast_validation.py`` holds the two byte for byte equal."""
    try:
        return orjson.dumps({
            "schema": _ACCEPTED_SCHEMA, "account_id": _account_key(event.tenant),
            "event": {"id": event.id, "tenant": event.tenant, "meter": event.meter, "quantity": str(event.quantity),
                      "timestamp": event.timestamp, "properties": event.properties,
                      "correction_of": event.correction_of},
            "accepted_at": accepted_at, "source": source, "catalog_version": catalog_version,
        }, option=orjson.OPT_UTC_Z)
    except orjson.JSONEncodeError:
        return AcceptedUsage(account_id=ids.account_id(event.tenant), event=event, accepted_at=accepted_at,
                             source=source, catalog_version=catalog_version).to_json()


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """No cyclic garbage collection while a batch is handled (its awaits included).

    A batch keeps its ~20 objects per event alive until it ends, so the collector's passes every 700
    allocations would only walk live objects and promote them, and promoted they bring on full collections
    that walk the whole heap: measured with 2,000-record batches, 13 % of the process's CPU (5 % paused,
    the rest being aiokafka's and the bus's objects, allocated outside the handler). Paused, the
    batch's objects are freed by reference counting when it ends, before the collector looks. Only cyclic
    garbage waits, and only while one batch is in hand (tens of milliseconds; a batch stuck on the database
    or Kafka allocates next to nothing meanwhile). Allocations are still counted: the first one after the
    pause triggers the usual collection.
    """
    if not gc.isenabled():  # paused already (by a concurrent batch, or by the application): leave it so
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class _SliceNotPublished(Exception):
    """A slice of a batch gave up because a slice before it failed (that one's error is the cause)."""


async def _after(previous: asyncio.Future[bool] | None) -> None:
    if previous is not None and not await asyncio.shield(previous):
        raise _SliceNotPublished("an earlier slice of the batch was not published")


def _slices(count: int) -> list[tuple[int, int]]:
    """``[start, end)`` of the slices a batch of ``count`` events is handled in: equal, at least
    ``PIPELINE_SLICE_EVENTS_MIN`` events each (a small batch is one slice), at most ``PIPELINE_SLICES_MAX``."""
    parts = max(1, min(PIPELINE_SLICES_MAX, count // PIPELINE_SLICE_EVENTS_MIN))
    bounds = [count * part // parts for part in range(parts + 1)]
    return list(pairwise(bounds))


def _kafka_source(record: Record) -> str:
    return f"kafka:{record.topic}:{record.partition}:{record.offset}"


def _iso_texts(moments: list[datetime]) -> list[str]:
    """``[m.isoformat() for m in moments]`` in two calls into orjson, which writes aware times the same way
    (five times cheaper for a batch; ``tests/unit/ingest/test_fast_validation.py`` holds them equal)."""
    texts: list[str] = orjson.loads(orjson.dumps(moments))
    return texts


def _outcome(status: str, result: Checked) -> Outcome:
    if type(result) is Invalid:
        return Outcome(REJECTED, _text(result.event_id), result.reason.value, _text(result.detail))
    return Outcome(status, result.event.id)  # type: ignore[union-attr]


@dataclass(frozen=True, slots=True)
class Outcome:
    status: str  # accepted | duplicate | rejected
    event_id: str | None
    reason: str | None = None
    detail: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        result: dict[str, str | None] = {"status": self.status, "id": self.event_id}
        if self.reason:
            result["reason"] = self.reason
            result["detail"] = self.detail
        return result


class IngestService:
    def __init__(self, settings: Settings, db: Database, bus: Bus) -> None:
        self.settings = settings
        self.db = db
        self.bus = bus
        self.knowledge = CatalogKnowledge(frozenset(), {})

    async def setup(self) -> None:
        await self.db.executescript(SCHEMA)  # type: ignore[attr-defined]
        await self._reload_knowledge()

    async def _reload_knowledge(self) -> None:
        tenants = frozenset(r["tenant"] for r in await self.db.fetch("SELECT tenant FROM known_tenants"))
        meters = {
            r["code"]: MeterRules(r["code"], tuple(json.loads(r["required_properties"])))
            for r in await self.db.fetch("SELECT code, required_properties FROM known_meters")
        }
        version = await self.db.fetchval("SELECT version FROM catalog_state WHERE id = 1") or 0
        self.knowledge = CatalogKnowledge(tenants, meters, int(version))

    # -- usage -------------------------------------------------------------------------------------------

    async def process(self, items: Sequence[tuple[bytes | object, str]]) -> list[Outcome]:
        """Validates, deduplicates and publishes a batch of raw events; ``items`` are (payload, source).

        Every item ends accepted, duplicate or rejected (with a dead letter). The dedup rows of the batch and
        its publish share one transaction that commits after the publish (see ``dedup``): one multi-row
        statement per batch, and a crash before the commit simply replays the batch.
        """
        with _collector_paused():
            statuses, results = await self._ingest([payload for payload, _ in items], lambda index: items[index][1],
                                                   sliced=False)
            return [_outcome(status, result) for status, result in zip(statuses, results, strict=True)]

    async def handle_raw(self, records: list[Record]) -> None:
        """A whole Kafka poll (``whole_poll``), in slices (see ``_ingest``); the consumer commits its offsets
        after this returns."""
        with _collector_paused():
            await self._ingest([r.value for r in records], lambda index: _kafka_source(records[index]), sliced=True)

    async def _ingest(self, payloads: Sequence[bytes | object], source: Callable[[int], str], *,
                      sliced: bool) -> tuple[list[str], list[Checked]]:
        """``process`` without the per-event ``Outcome`` objects (the Kafka consumer has no one to answer):
        each payload's status and its verified event or rejection, in order. ``source(index)`` is asked only
        for the payloads that are published, accepted or dead-lettered.

        ``sliced``: a large batch (a whole Kafka poll) is handled as a pipeline of slices (``_slices``): while
        one slice's keys are claimed in PostgreSQL and its records published, the next slice is checked. Each
        slice is one transaction (one sorted claim statement, committed after its publish), a key met in an
        earlier slice is a duplicate without asking the table, and a slice is published only once the slice
        before it is on the bus (per-account order); if one fails, the ones after it publish nothing, and the
        consumer does not commit the poll's offsets: it is redelivered, and what was committed is duplicate.
        An HTTP request stays one slice (one transaction), as before: its answer covers all of it.
        """
        now = utcnow()
        check = Verifier(self.knowledge, now=now, future_skew=timedelta(seconds=self.settings.future_skew_seconds),
                         window=timedelta(days=self.settings.dedup_window_days)).check
        statuses: list[str] = []
        results: list[Checked] = []
        seen: set[tuple[str, str]] = set()  # (tenant, event id) of the batch so far
        rejections: list[OutMessage] = []
        stages: list[asyncio.Future[None]] = []
        previous: asyncio.Future[bool] | None = None  # the slice before: on the bus (True) or failed (False)
        try:
            for start, end in _slices(len(payloads)) if sliced else [(0, len(payloads))]:
                slice_rejections, fresh = self._check(payloads, source, now, check, range(start, end), statuses,
                                                      results, seen)
                rejections += slice_rejections
                published: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
                claim_sent = asyncio.Event()
                stages.append(asyncio.ensure_future(self._claim_and_publish(
                    statuses, results, slice_rejections, fresh, source, now, previous, published, claim_sent)))
                previous = published
                await claim_sent.wait()  # PostgreSQL claims this slice's keys while the next slice is checked
            await asyncio.gather(*stages)
        except BaseException as failure:
            # The slices in flight finish (those after a failed one publish nothing); only a cancelled handler
            # cancels them. The error raised is the first slice's own, not a follower's giving up.
            if isinstance(failure, asyncio.CancelledError):
                for stage in stages:
                    stage.cancel()
            outcomes = await asyncio.gather(*stages, return_exceptions=True)
            causes = [o for o in outcomes if isinstance(o, Exception) and not isinstance(o, _SliceNotPublished)]
            if causes and not isinstance(failure, asyncio.CancelledError):
                raise causes[0] from None
            raise
        assert len(statuses) == len(payloads), "every event ends accepted, duplicate or rejected"
        for status, count in Tally(statuses).items():
            EVENTS.labels(status).inc(count)
        if rejections:
            for reason, count in Tally(r.reason.value for r in results if type(r) is Invalid).items():  # type: ignore[union-attr]
                REJECTIONS.labels(reason).inc(count)
        return statuses, results

    async def _claim_and_publish(self, statuses: list[str], results: list[Checked], rejections: list[OutMessage],
                                 fresh: dict[tuple[str, str], int], source: Callable[[int], str], now: datetime,
                                 previous: asyncio.Future[bool] | None, published: asyncio.Future[bool],
                                 claim_sent: asyncio.Event | None = None) -> None:
        """One slice: claims its keys and publishes what is new (and its dead letters), in one transaction that
        commits after the publish; a key the table already had turns its status to duplicate. The statement
        runs while the slice's records are serialised (every new key's is: a key already in the table is
        rare). Publishes after ``previous`` is on the bus; sets ``published`` either way, and ``claim_sent``
        once the claim is on its way (or there is none)."""
        try:
            if not fresh:
                if claim_sent is not None:
                    claim_sent.set()
                await _after(previous)
                await self.bus.publish(rejections)
                published.set_result(True)
                return
            events: list[UsageEvent] = [results[index].event for index in fresh.values()]  # type: ignore[union-attr]
            claims = [(tenant, event_id, time) for (tenant, event_id), time
                      in zip(fresh, _iso_texts([e.timestamp for e in events]), strict=True)]
            version = self.knowledge.catalog_version
            async with self.db.transaction() as conn:
                claiming = asyncio.ensure_future(dedup.claim(conn, self.db.dialect, claims))
                try:
                    await asyncio.sleep(0)  # the statement is sent: PostgreSQL inserts while records are serialised
                    if claim_sent is not None:
                        claim_sent.set()
                    records = [accepted_record(event, now, source(index), version)
                               for event, index in zip(events, fresh.values(), strict=True)]
                    to_publish = await claiming
                finally:
                    if not claiming.done():  # serialising failed: do not leave the statement running
                        claiming.cancel()
                        with contextlib.suppress(asyncio.CancelledError, Exception):
                            await claiming
                accepted: list[OutMessage] = []
                for (key, index), record in zip(fresh.items(), records, strict=True):
                    if key in to_publish:
                        accepted.append(OutMessage(topics.USAGE_ACCEPTED, _account_key(key[0]), record,
                                                   _ACCEPTED_HEADERS))
                    else:
                        statuses[index] = DUPLICATE
                await _after(previous)
                # Durable on the bus before the dedup rows commit: a row that exists was published.
                await self.bus.publish(accepted + rejections)
                published.set_result(True)
        finally:
            if claim_sent is not None:
                claim_sent.set()
            if not published.done():
                published.set_result(False)

    def _check(self, payloads: Sequence[bytes | object], source: Callable[[int], str], now: datetime,
               check: Callable[[UsageEvent], Checked], indices: range, statuses: list[str], results: list[Checked],
               seen: set[tuple[str, str]]) -> tuple[list[OutMessage], dict[tuple[str, str], int]]:
        """Parses and verifies ``payloads[indices]``, appending to ``statuses`` (accepted until the dedup
        table says otherwise) and ``results``: returns their dead letters and the index of each key met for
        the first time in the batch (a key in ``seen`` is a duplicate inside the batch)."""
        rejections: list[OutMessage] = []
        fresh: dict[tuple[str, str], int] = {}
        for index in indices:
            payload = payloads[index]
            parsed = parse_raw(payload)
            result = parsed if type(parsed) is Invalid else check(parsed)  # type: ignore[arg-type]
            results.append(result)
            if type(result) is Invalid:
                statuses.append(REJECTED)
                rejections.append(self._rejection(result, payload, source(index), now))
                continue
            event = result.event  # type: ignore[union-attr]
            key = (event.tenant, event.id)
            if key in seen:
                statuses.append(DUPLICATE)
            else:
                seen.add(key)
                fresh[key] = index
                statuses.append(ACCEPTED)  # unless the dedup table already has it
        return rejections, fresh

    def _rejection(self, invalid: Invalid, payload: bytes | object, source: str, now: datetime) -> OutMessage:
        if isinstance(payload, bytes):
            text = payload.decode("utf-8", errors="replace")
        else:
            text = _dumps_leniently(payload)
        truncated = len(text) > DEAD_LETTER_PAYLOAD_CHARS_MAX
        record = UsageRejection(reason=invalid.reason, detail=_text(invalid.detail) or "", stage="ingest",
                                tenant=_text(invalid.tenant), event_id=_text(invalid.event_id),
                                payload=_text(text[:DEAD_LETTER_PAYLOAD_CHARS_MAX]) or "",
                                payload_truncated=truncated, rejected_at=now, source=source)
        key = _account_key(record.tenant) if record.tenant else "unknown"
        return OutMessage(topics.USAGE_REJECTED, key, record.to_json(), _REJECTED_HEADERS)

    # -- dedup window cleanup ------------------------------------------------------------------------------

    async def cleanup_once(self, now: datetime | None = None) -> int:
        """Forgets keys of events older than the dedup window (bounded per run); returns rows deleted."""
        s = self.settings
        deleted = await dedup.cleanup(self.db, now or utcnow(), timedelta(days=s.dedup_window_days),
                                      s.dedup_cleanup_rows_max, s.dedup_cleanup_rows_per_run_max)
        if deleted:
            DEDUP_FORGOTTEN.inc(deleted)
            log.info("dedup_cleanup", deleted=deleted)
        return deleted

    async def cleanup_loop(self, stopping: asyncio.Event) -> None:
        """Background task: one bounded cleanup per interval until the service stops."""
        while not stopping.is_set():
            try:
                await self.cleanup_once()
            except Exception:
                log.exception("dedup_cleanup_failed")
            await pause(stopping, self.settings.dedup_cleanup_interval_seconds)

    # -- catalogue knowledge -------------------------------------------------------------------------------

    async def handle_ledger_events(self, records: list[Record]) -> None:
        records = [r for r in records if _may_concern_ingest(header(r, "type"))]
        if not records:
            return
        changed = False
        async with self.db.transaction() as conn:
            for record in records:
                event = LedgerEvent.model_validate_json(record.value)
                if event.type in ACCOUNT_OPENED_TYPES:
                    await conn.execute("INSERT INTO known_tenants (tenant) VALUES ($1) ON CONFLICT DO NOTHING",
                                       event.data["tenant"])
                    changed = True
                elif event.type == "Catalog.Published":
                    await conn.execute(
                        "INSERT INTO catalog_state (id, version) VALUES (1, $1) ON CONFLICT (id) DO UPDATE "
                        "SET version = excluded.version WHERE catalog_state.version < excluded.version",
                        int(event.data["version"]))
                    for meter in event.data["document"].get("meters", []):
                        await conn.execute(
                            "INSERT INTO known_meters (code, required_properties) VALUES ($1, $2) "
                            "ON CONFLICT (code) DO UPDATE SET required_properties = excluded.required_properties",
                            meter["code"], json.dumps(meter.get("required_properties", [])))
                    changed = True
        if changed:
            await self._reload_knowledge()


# The events that open a billing account, by exact name: a suffix match also took other account events whose names
# end the same way (a dispute's, which has no tenant field) and failed the consumer on them.
ACCOUNT_OPENED_TYPES = frozenset({"BillingAccount.Opened", "BillingAccount.Created"})
_ACCOUNT_OPENED_HEADERS = frozenset(name.encode() for name in ACCOUNT_OPENED_TYPES)


def _may_concern_ingest(event_type: bytes | None) -> bool:
    """Tenants opened and catalogues published; a record without a ``type`` header is decoded to see."""
    return event_type is None or event_type == b"Catalog.Published" or event_type in _ACCOUNT_OPENED_HEADERS


def _text(value: str | None) -> str | None:
    """Text that can be encoded (JSON may carry lone surrogates, which no UTF-8 message can)."""
    return None if value is None else value.encode("utf-8", errors="replace").decode("utf-8")


def _dumps_leniently(payload: Any) -> str:
    try:
        return json.dumps(payload, default=str)
    except (ValueError, RecursionError):
        return f"<{type(payload).__name__} payload that cannot be serialised>"

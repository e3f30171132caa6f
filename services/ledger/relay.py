"""The outbox relay: every recorded event goes to ``billing.ledger.events`` in recorded order, at least once.

The event store's notification log *is* the outbox. The relay reads it from its last published position,
publishes (acks=all), then records its position as a Tracking row (``relay:<topic>``): after a full batch (a
backlog), when it finds nothing new, when it stops, and otherwise at most every
``RELAY_POSITION_RECORD_SECONDS`` (the position it reads from next is kept in memory). A crash re-publishes
the tail published since the last recorded position (at most about that long of events); each event carries
its ``position`` so consumers drop the repeats. Only one relay runs per store: on PostgreSQL several ledger
processes elect it with an advisory lock, and a relay that was not the leader reads its position anew. Under
``billing serve ledger`` it runs in a process of its own (``relay_process.py``), which holds that lock.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import orjson
from billing_events import topics
from billing_events.messages import LedgerEvent, has_long_number
from billing_ledger.application import LedgerApplication, jsonable
from billing_runtime.bus import Bus, OutMessage
from billing_runtime.logging import get_logger
from billing_runtime.service import pause
from eventsourcing.persistence import Notification

log = get_logger(__name__)

RELAY_BATCH_EVENTS_MAX = 1000
RELAY_IDLE_SLEEP_SECONDS = 0.05
# After a round that found fewer than RELAY_BATCH_EVENTS_MAX events (a trickle, not a backlog), the relay
# waits this long before the next: at 200 holds/s it otherwise went round for every hold or two, each round
# a leadership check, a read, a publish and a committed position (a WAL flush), on the cores and the event
# loop that decide the holds. A backlog is relayed without pauses; an event waits at most this much longer.
RELAY_TRICKLE_PAUSE_SECONDS = 0.02
# Under a trickle (holds at 200/s) the relay used to record its position after every round: a durable commit
# (a WAL flush the holds' own commits then queue behind) and a thread hand-over each, 40 times a second.
RELAY_POSITION_RECORD_SECONDS = 1.0
RELAY_NAME = f"relay:{topics.LEDGER_EVENTS}"

_ORIGINATOR_FIELDS = {"originator_id", "originator_version", "timestamp", "originator_topic"}


# The transcoder's tags (eventsourcing's default transcodings) and what ``jsonable`` makes of each value.
_UNTAG = {
    "uuid_hex": lambda h: f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}",
    "datetime_iso": lambda text: text,  # datetime.fromisoformat(text).isoformat() == text
    "decimal_str": lambda text: text,  # str(Decimal(text)) == text for what str(Decimal) wrote
}


class _Unusual(Exception):
    """Stored state the direct path does not know (another tag, a class version, a long number): the mapper's way."""


# A stored state with a number of 19 digits or more (``has_long_number``: every integer orjson does not read exact,
# 2**70 as 1.1805916207174113e+21, has at least 19) goes the mapped way, whose JSON keeps integers of any size exact:
# the direct and walked paths relayed such a payload integer rounded.


def _untag(value: Any) -> Any:
    kind = type(value)
    if kind is dict:
        if "_type_" in value:
            untag = _UNTAG.get(value["_type_"])
            if untag is None or len(value) != 2 or type(value.get("_data_")) is not str:
                raise _Unusual(value.get("_type_"))
            return untag(value["_data_"])
        return {k: _untag(v) for k, v in value.items()}
    if kind is list:
        return [_untag(v) for v in value]
    return value


def to_message(app: LedgerApplication, notification: Any) -> OutMessage:
    """The relayed record of one stored event.

    Directly from the stored JSON when nothing needs the domain classes (no compressor or cipher, only the
    default transcodings, no class versions to upcast): the same bytes as decoding the event, making it
    JSON-safe with ``jsonable`` and dumping the ``LedgerEvent`` envelope (``test_relay`` compares both), at a
    fraction of the cost. The relay handles two to three stored events per usage event.
    """
    if app.mapper.compressor is None and app.mapper.cipher is None:
        try:
            return _direct_message(notification)
        except (_Unusual, orjson.JSONDecodeError, KeyError, ValueError):
            pass
    return _mapped_message(app, notification)


def to_messages(app: LedgerApplication, notifications: Any) -> list[OutMessage]:
    return [to_message(app, n) for n in notifications]


def _direct_message(notification: Any) -> OutMessage:
    """The direct record of a stored event (a ``Notification``): see ``_direct``."""
    if type(notification.originator_id) is not UUID:
        return _walked_message(notification)
    message = _direct(notification.id, notification.originator_id, notification.originator_version,
                      notification.topic, notification.state)
    return message if message is not None else _walked_message(notification)


def _direct(position: int, originator_id: UUID | str, version: int, topic: str, raw: bytes) -> OutMessage | None:
    """The record of a stored state as ``encode_plain_state`` writes it (tags at the top level only), without
    walking it: its top-level tags are replaced in the decoded state itself, which becomes the envelope's
    ``data``, and the envelope is written around its JSON, the stored timestamp's text reused when it is already
    UTC. A tag anywhere else (or the text ``"_type_"`` in a value) makes the count of ``"_type_"`` in the stored
    bytes differ from the tags replaced: then ``None`` (take ``_walked_message``, the general walk). Neither orjson
    nor the ``json`` module (eventsourcing's transcoder) writes a printable ASCII character escaped, so every
    ``_type_`` key is counted. Stored events of a bench run: 10.6-11.2 -> 6.8-7.0 us each."""
    if has_long_number(raw):
        raise _Unusual("a long number")
    state = orjson.loads(raw)
    if type(state) is not dict or "class_version" in state:
        raise _Unusual("class_version")
    stamp = state.pop("timestamp", None)
    if type(stamp) is not dict or stamp.get("_type_") != "datetime_iso":
        raise _Unusual("timestamp")
    state.pop("originator_topic", None)
    if "originator_id" in state or "originator_version" in state:
        return None
    tags = 1
    for key, value in state.items():  # replacing values, not keys: the dict's order and size stay
        if type(value) is dict and "_type_" in value:
            state[key] = _untag_one(value)
            tags += 1
    if raw.count(b'"_type_"') != tags:
        return None
    tenant = state.get("tenant")
    _, type_json, type_header = _event_type(topic)
    aggregate_id = orjson.dumps(originator_id)  # with its quotes
    value = b'{"schema":"ledger.event/v1","position":%d,"aggregate_id":%s,"aggregate_version":%d,"type":%s,' \
            b'"tenant":%s,"recorded_at":%s,"data":%s}' % (
                position, aggregate_id, version, type_json,
                orjson.dumps(tenant) if type(tenant) is str else b"null", _recorded_at(stamp["_data_"]),
                orjson.dumps(state))
    return OutMessage(topics.LEDGER_EVENTS, aggregate_id[1:-1].decode(), value,
                      (_SCHEMA_HEADER, ("position", b"%d" % position), type_header))


def _row_messages(app: LedgerApplication, rows: list[tuple[int, str, int, str, bytes]]) -> list[OutMessage]:
    """The records of stored events read as rows (``select_notification_rows``: the originator id as
    PostgreSQL's text of a uuid, which is ``str(UUID)``): directly, or as ``to_message`` makes them."""
    direct = app.mapper.compressor is None and app.mapper.cipher is None
    messages = []
    for position, originator_id, version, topic, raw in rows:
        message = None
        if direct:
            try:
                message = _direct(position, originator_id, version, topic, raw)
            except (_Unusual, orjson.JSONDecodeError, KeyError, ValueError):
                pass
        if message is None:
            message = to_message(app, Notification(id=position, originator_id=UUID(originator_id),
                                                   originator_version=version, topic=topic, state=raw))
        messages.append(message)
    return messages


def _untag_one(tag: dict[str, Any]) -> Any:
    untag = _UNTAG.get(tag["_type_"])
    if untag is None or len(tag) != 2 or type(tag.get("_data_")) is not str:
        raise _Unusual(tag.get("_type_"))
    return untag(tag["_data_"])


_SCHEMA_HEADER = ("schema", b"ledger.event/v1")
_EVENT_TYPES: dict[str, tuple[str, bytes, tuple[str, bytes]]] = {}


def _event_type(topic: str) -> tuple[str, bytes, tuple[str, bytes]]:
    """A stored event's topic -> its ``type`` (the class's qualified name), as JSON and as a header."""
    known = _EVENT_TYPES.get(topic)
    if known is None:
        event_type = topic.rpartition(":")[2]
        known = _EVENT_TYPES[topic] = (event_type, orjson.dumps(event_type), ("type", event_type.encode()))
    return known


def _recorded_at(text: Any) -> bytes:
    """A stored timestamp's text -> the envelope's ``recorded_at`` (JSON, UTC with ``Z``). The text as it is when
    it is already what orjson writes for it in UTC (``isoformat()`` of a UTC datetime: seconds, or a non-zero
    microsecond, and ``+00:00``); parsed and converted otherwise. Always parsed: what does not parse is unusual."""
    when = datetime.fromisoformat(text)
    if (when.tzinfo is UTC and text[-6:] == "+00:00" and text[10] == "T" and text[4] == "-" and text[7] == "-"
            and text[13] == ":" and text[16] == ":"
            and (len(text) == 25 or (len(text) == 32 and text[19] == "." and text[20:26] != "000000"))):
        return b'"%sZ"' % text[:-6].encode()
    return orjson.dumps(when.astimezone(UTC), option=orjson.OPT_UTC_Z)


def _walked_message(notification: Any) -> OutMessage:
    """The direct record of any stored state of the default transcodings: every value walked for tags."""
    if has_long_number(notification.state):
        raise _Unusual("a long number")
    state = orjson.loads(notification.state)
    stamp = state["timestamp"]
    data = {k: _untag(v) for k, v in state.items() if k not in _ORIGINATOR_FIELDS}
    tenant = data.get("tenant")
    aggregate_id = str(notification.originator_id)
    envelope = {
        "schema": "ledger.event/v1", "position": notification.id, "aggregate_id": aggregate_id,
        "aggregate_version": notification.originator_version, "type": notification.topic.rpartition(":")[2],
        "tenant": tenant if isinstance(tenant, str) else None,
        "recorded_at": datetime.fromisoformat(stamp["_data_"]).astimezone(UTC), "data": data,
    }
    return OutMessage(topics.LEDGER_EVENTS, aggregate_id, orjson.dumps(envelope, option=orjson.OPT_UTC_Z),
                      _headers(notification.id, envelope["type"]))


def _headers(position: int, event_type: str) -> tuple[tuple[str, bytes], ...]:
    # ``type`` lets consumers that need a few kinds of events (ingest's and rating's catalogue followers)
    # skip the rest without decoding them.
    return (("schema", b"ledger.event/v1"), ("position", str(position).encode()), ("type", event_type.encode()))


def _mapped_message(app: LedgerApplication, notification: Any) -> OutMessage:
    domain_event = app.mapper.to_domain_event(notification)
    qualname = type(domain_event).__qualname__
    data = {k: jsonable(v) for k, v in vars(domain_event).items() if k not in _ORIGINATOR_FIELDS}
    tenant = data.get("tenant") if isinstance(data.get("tenant"), str) else None
    envelope = LedgerEvent(
        position=notification.id, aggregate_id=domain_event.originator_id,
        aggregate_version=domain_event.originator_version, type=qualname, tenant=tenant,
        recorded_at=domain_event.timestamp, data=data,
    )
    return OutMessage(topics.LEDGER_EVENTS, str(domain_event.originator_id), envelope.to_json(),
                      _headers(notification.id, qualname))


def _read(app: LedgerApplication, after: int | None) -> tuple[int, int | None, list[OutMessage]]:
    """How many notifications follow ``after`` (None: the recorded position), up to a batch, the last one's
    position and their records. On PostgreSQL read as plain rows (``select_notification_rows``)."""
    recorder = app.process_recorder
    select_rows = getattr(recorder, "select_notification_rows", None)
    if select_rows is None:
        notifications = app.unprocessed(RELAY_NAME, RELAY_BATCH_EVENTS_MAX, after=after)
        return len(notifications), notifications[-1].id if notifications else None, to_messages(app, notifications)
    position = after if after is not None else (recorder.max_tracking_id(RELAY_NAME) or 0)
    rows = select_rows(position + 1, RELAY_BATCH_EVENTS_MAX)
    return len(rows), rows[-1][0] if rows else None, _row_messages(app, rows)


async def run_relay(app: LedgerApplication, bus: Bus, stopping: asyncio.Event,
                    is_leader: Any = None) -> None:
    relay = _Position(app)
    try:
        while not stopping.is_set():
            if is_leader is not None and not await is_leader():
                relay.forget()  # another process may relay meanwhile: read the recorded position when back
                await asyncio.sleep(1.0)
                continue
            # Off the event loop: the HTTP decisions (holds) served by this process must not wait for it.
            count, last, messages = await asyncio.to_thread(_read, app, relay.published)
            if not count:
                await relay.record()
                await asyncio.sleep(RELAY_IDLE_SLEEP_SECONDS)
                continue
            await bus.publish(messages)
            relay.published = last
            full = count == RELAY_BATCH_EVENTS_MAX
            if full or time.monotonic() - relay.recorded_at >= RELAY_POSITION_RECORD_SECONDS:
                await relay.record()
            log.debug("relayed", events=len(messages), position=last)
            if not full:
                await pause(stopping, RELAY_TRICKLE_PAUSE_SECONDS)
    finally:
        try:
            await relay.record()
        except Exception as exc:  # noqa: BLE001 - stopping anyway: the next relay re-publishes from the record
            log.warning("relay_position_not_recorded", position=relay.published, error=repr(exc))


class _Position:
    """The relay's position: ``published`` (in memory; None: read the recorded one) and when it was recorded."""

    def __init__(self, app: LedgerApplication) -> None:
        self.app = app
        self.published: int | None = None
        self.recorded: int | None = None
        self.recorded_at = time.monotonic()

    async def record(self) -> None:
        if self.published is not None and self.published != self.recorded:
            await asyncio.to_thread(self.app.processed, RELAY_NAME, self.published)
            self.recorded = self.published
        self.recorded_at = time.monotonic()

    def forget(self) -> None:
        self.published = self.recorded = None

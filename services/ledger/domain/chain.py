"""Tamper evidence: every event of a chained aggregate carries ``chain_hash``, a SHA-256 hash chain.

``chain_hash = sha256(previous_chain_hash + canonical_content)`` (hex), where the previous hash of an
aggregate's first event is ``GENESIS`` and the canonical content is the compact JSON (sorted keys,
separators ``,`` and ``:``, ASCII escapes) of::

    {"aggregate_id": "<uuid>", "version": <int>, "type": "<Aggregate.EventName>",
     "timestamp": "<ISO 8601 with offset>", "data": {<every event attribute except the originator
     fields and chain_hash>}}

in UTF-8 without ASCII escapes, with UUIDs as their canonical string, datetimes as ``isoformat()``,
Decimals as ``str``, tuples as arrays and sets as sorted arrays (``json.dumps(value, sort_keys=True,
separators=(",", ":"), ensure_ascii=False)`` with those conversions gives the same text; orjson is used
because it is ten times faster, and the two were checked to agree byte for byte). This is exactly the JSON an export line carries (:mod:`billing_ledger.audit`), so
an auditor recomputes the chain from an export with nothing but this function.

The hash is computed once, when the event is *created* (``trigger_event`` / ``_create``), and stored with
it; replay only copies it into the aggregate's ``chain_head``. Changing, removing or re-ordering a stored
event therefore breaks every later hash, which ``billing audit verify`` recomputes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
from datetime import UTC, datetime
from decimal import Decimal
from types import FunctionType
from typing import Any
from uuid import UUID

import orjson
from eventsourcing.domain import (
    Aggregate,
    CanMutateAggregate,
    DecoratedFuncCaller,
    OriginatorIDError,
    OriginatorVersionError,
    decorated_funcs,
)

GENESIS = "0" * 64
APPLY_FAILED = "_apply_failed"  # set on an aggregate whose event failed half-way through being applied
# Originator fields are hashed under their own names; the topic is a code path, not content.
NOT_CONTENT = frozenset({"originator_id", "originator_version", "timestamp", "originator_topic", "chain_hash"})


def _json_default(value: Any) -> Any:
    if isinstance(value, UUID):  # orjson writes UUIDs itself, the standard library does not
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} has no canonical form")


_ORJSON_OPTIONS = orjson.OPT_SORT_KEYS | orjson.OPT_PASSTHROUGH_DATETIME


def canonical_json(value: Any) -> str:
    """The canonical JSON text of ``value`` (see the module docstring)."""
    try:
        return orjson.dumps(value, default=_json_default, option=_ORJSON_OPTIONS).decode()
    except orjson.JSONEncodeError:
        # orjson refuses integers beyond 64 bits; the standard library writes the same text for the rest.
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_json_default)


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON data, exactly as :func:`canonical_json` sees it."""
    return json.loads(canonical_json(value))


def chain_hash(previous: str, event_type: str, aggregate_id: UUID | str, version: int,
               timestamp: datetime | str, data: dict[str, Any]) -> str:
    """The hash of one event, chained to ``previous`` (``GENESIS`` for an aggregate's first event)."""
    if type(timestamp) is datetime and timestamp.tzinfo is UTC and _native(data):
        # The same text, written by orjson alone: UTC datetimes as ``isoformat()`` writes them (checked for every
        # year, with and without microseconds), without calling back into Python for each (``_native``).
        try:
            body = orjson.dumps({"aggregate_id": aggregate_id, "version": version, "type": event_type,
                                 "timestamp": timestamp, "data": data}, option=orjson.OPT_SORT_KEYS)
        except orjson.JSONEncodeError:
            pass  # an integer beyond 64 bits: the standard library's way below
        else:
            return hashlib.sha256(previous.encode() + body).hexdigest()
    content = canonical_json({
        # orjson writes a UUID as its canonical string itself (and _json_default does for the json fallback).
        "aggregate_id": aggregate_id,
        "version": version,
        "type": event_type,
        "timestamp": timestamp if isinstance(timestamp, str) else timestamp.isoformat(),
        "data": data,
    })
    return hashlib.sha256((previous + content).encode()).hexdigest()


_NATIVE = frozenset({str, int, bool, float, type(None), UUID})


def _native(data: dict[str, Any]) -> bool:
    """Whether orjson writes ``data`` in its canonical form by itself: values of types it writes as the canonical
    form does (plain values, UUIDs, UTC datetimes), or dicts and lists of them, one level deep (a usage debit's
    postings, draws and cause). Anything else goes through ``_json_default``."""
    for value in data.values():
        kind = type(value)
        if kind in _NATIVE or (kind is datetime and value.tzinfo is UTC):
            continue
        if kind is dict:
            items = value.values()
        elif kind is list:
            items = value
        else:
            return False
        for item in items:
            if type(item) in _NATIVE:
                continue
            if type(item) is not dict:
                return False
            for v in item.values():
                if type(v) not in _NATIVE:
                    return False
    return True


def event_content(event: Any) -> dict[str, Any]:
    """The hashed attributes of a domain event (everything but the originator fields and the hash)."""
    return {k: v for k, v in vars(event).items() if k not in NOT_CONTENT}


# Per event class: (the @event method, its parameter names) when applying it is eventsourcing's
# ``DecoratedFuncCaller.apply`` and nothing else (see ``_applier``); None for any other event class.
_APPLIERS: dict[type, tuple[FunctionType, frozenset[str]] | None] = {}


def _applier(event_class: type) -> tuple[FunctionType, frozenset[str]] | None:
    """What ``CanMutateAggregate.mutate`` -> ``DecoratedFuncCaller.apply`` call for an event of ``event_class``
    made by ``@event``: the decorated function and the names it takes (the library filters the event's
    attributes by them). None when any class of its MRO changes that path (its own ``apply`` or ``mutate``
    after ``ChainedAggregate.Event``'s), so it goes the library's way."""
    if event_class in _APPLIERS:
        return _APPLIERS[event_class]
    found = None
    func = decorated_funcs.get(event_class)
    if isinstance(func, FunctionType) and issubclass(event_class, DecoratedFuncCaller) \
            and event_class.apply is DecoratedFuncCaller.apply \
            and super(DecoratedFuncCaller, event_class).apply is CanMutateAggregate.apply \
            and super(ChainedAggregate.Event, event_class).mutate is CanMutateAggregate.mutate:  # type: ignore[arg-type]
        found = func, frozenset(inspect.signature(func).parameters)
    _APPLIERS[event_class] = found
    return found


# Per (event class, content names in order): the @event function ``trigger_complete`` may call directly, or None.
_COMPLETE: dict[tuple[type, tuple[str, ...]], FunctionType | None] = {}
_HEAD_FIELDS = ("originator_id", "originator_version", "timestamp", "chain_hash")


def _complete_applier(event_class: type, names: tuple[str, ...]) -> FunctionType | None:
    """The @event function of ``event_class`` when ``names`` are exactly its fields after ``_HEAD_FIELDS`` (in
    order), its ``__init__`` is the dataclass's, and applying it is ``ChainedAggregate.Event.mutate``'s inline
    path calling that function with exactly those attributes; else None."""
    key = (event_class, names)
    if key in _COMPLETE:
        return _COMPLETE[key]
    found = None
    applier = _applier(event_class)
    if applier is not None and dataclasses.is_dataclass(event_class) \
            and "__init__" in vars(event_class) and event_class.__init__.__code__.co_filename == "<string>":
        func, parameters = applier
        fields = tuple(f.name for f in dataclasses.fields(event_class))
        if fields == _HEAD_FIELDS + names and parameters - {"self"} == set(names) \
                and not parameters & set(_HEAD_FIELDS):
            found = func
    _COMPLETE[key] = found
    return found


class ChainedAggregate(Aggregate):
    """An aggregate whose events carry a hash chain (``chain_hash``); ``chain_head`` is the latest hash.

    Its events are created and applied by a shorter path than eventsourcing's layers of calls (a usage debit
    is ~10,000 events a second): ``trigger_event`` does what ``BaseAggregate.trigger_event`` does, and
    ``Event.mutate`` what ``CanMutateAggregate.mutate`` and ``DecoratedFuncCaller.apply`` do, inline, with the
    same checks in the same order; ``tests/unit/ledger/test_event_paths.py`` checks both give the same events
    and states as the library's."""

    class Event(Aggregate.Event):
        chain_hash: str

        def mutate(self, aggregate: Any) -> Any:
            applier = _APPLIERS[type(self)] if type(self) in _APPLIERS else _applier(type(self))
            if applier is None:
                result = super().mutate(aggregate)
                result.chain_head = self.chain_hash
                return result
            # CanMutateAggregate.mutate and DecoratedFuncCaller.apply, inline.
            assert aggregate is not None
            if self.originator_id != aggregate.id:
                raise OriginatorIDError(self.originator_id, aggregate.id)
            next_version = aggregate.version + 1
            if self.originator_version != next_version:
                raise OriginatorVersionError(self.originator_version, next_version)
            func, names = applier
            func(aggregate, **{k: v for k, v in self.__dict__.items() if k in names})
            aggregate.version = self.originator_version
            aggregate.modified_on = self.timestamp
            aggregate.chain_head = self.chain_hash
            return aggregate

    class Created(Event, Aggregate.Created):
        def mutate(self, aggregate: Any) -> Any:
            result = super().mutate(aggregate)
            result.chain_head = self.chain_hash
            return result

    def trigger_event(self, event_class: Any, **kwargs: Any) -> None:
        timestamp = kwargs.get("timestamp") or event_class.create_timestamp()
        kwargs["timestamp"] = timestamp
        next_version = self.version + 1
        kwargs["chain_hash"] = chain_hash(self.chain_head, event_class.__qualname__, self.id, next_version,
                                          timestamp, {k: v for k, v in kwargs.items() if k not in NOT_CONTENT})
        try:
            if getattr(type(self), "TOPIC", None):  # explicit topics: checked by the library's path
                super().trigger_event(event_class, **kwargs)
                return
            # BaseAggregate.trigger_event, inline (``kwargs`` is this call's own dict: no copy needed).
            kwargs["originator_id"] = self.id
            kwargs["originator_version"] = next_version
            try:
                new_event = event_class(**kwargs)
            except TypeError as e:
                raise TypeError(f"Can't construct event {event_class}: {e}") from None
            new_event.mutate(self)
            self._pending_events.append(new_event)
        except Exception:
            # Applying the event may have changed part of the state before it failed: marked, so the ledger
            # rebuilds this aggregate from its events instead of keeping it (application._Batch.rollback).
            self.__dict__[APPLY_FAILED] = True
            raise

    def trigger_complete(self, event_class: Any, content: dict[str, Any]) -> None:
        """``self.trigger_event(event_class, **content)`` for ``content`` naming every attribute of the event but
        the originator fields, ``timestamp`` and ``chain_hash``, in the order of the event class's fields: the
        event is built as its dataclass ``__init__`` builds it (its attributes in that order, then
        ``__post_init__``) and applied by calling its ``@event`` function with ``content``, without the
        dataclass's ``__setattr__`` per field nor ``Event.mutate``'s filtering (a usage debit: ~3 us of its
        ~75). Anything else (another order, an explicit topic, an event class applied otherwise) goes
        ``trigger_event``'s way. Same events and states (``tests/unit/ledger/test_event_paths.py``)."""
        func = _complete_applier(event_class, tuple(content))
        if func is None or getattr(type(self), "TOPIC", None):
            self.trigger_event(event_class, **content)
            return
        timestamp = event_class.create_timestamp()
        next_version = self.version + 1
        hashed = chain_hash(self.chain_head, event_class.__qualname__, self.id, next_version, timestamp, content)
        try:
            new_event = object.__new__(event_class)
            attributes = new_event.__dict__
            attributes["originator_id"] = self.id
            attributes["originator_version"] = next_version
            attributes["timestamp"] = timestamp
            attributes["chain_hash"] = hashed
            attributes.update(content)
            try:
                new_event.__post_init__()
            except TypeError as e:
                raise TypeError(f"Can't construct event {event_class}: {e}") from None
            func(self, **content)
            self.version = next_version
            self.modified_on = timestamp
            self.chain_head = hashed
            self._pending_events.append(new_event)
        except Exception:
            self.__dict__[APPLY_FAILED] = True  # as in trigger_event
            raise

    @classmethod
    def _create(cls, event_class: Any, *, id: UUID | None = None, **kwargs: Any) -> Any:
        # The base class derives the id from create_id(); the hash needs it first, so derive it here.
        if id is None:
            names = inspect.signature(cls.create_id).parameters
            id = cls.create_id(**{k: v for k, v in kwargs.items() if k in names})
        timestamp = kwargs.get("timestamp") or event_class.create_timestamp()
        kwargs["timestamp"] = timestamp
        kwargs["chain_hash"] = chain_hash(GENESIS, event_class.__qualname__, id, cls.INITIAL_VERSION, timestamp,
                                          {k: v for k, v in kwargs.items() if k not in NOT_CONTENT})
        return super()._create(event_class, id=id, **kwargs)

    # Not annotated: annotations on an aggregate class become constructor fields in eventsourcing.
    chain_head = GENESIS

"""Scratch namespaces for tests on the real stack, and dropping them again.

Every integration test that talks to Kafka or PostgreSQL works in a fresh namespace: its topics are
``<namespace>.<topic>`` and its schemas ``<namespace>_<name>``. Topics are never dropped by the services, so
without this module each run left about 50 partitions per namespace on the broker; after a few hundred runs
the broker needed minutes to load them at its next start (7,752 logs, 84 s), longer than ``kafka.sh`` waits.

- ``scratch_namespace(kind)`` makes a namespace and records it; the session drops every recorded namespace
  at its end (``drop_session_namespaces``, called by the ``infra`` fixture).
- A session killed half-way leaves its namespaces behind. The next session that is alone on this machine
  (it takes ``tests.lock`` exclusively) and uses the local stack drops every test namespace it finds
  (``prune_orphans``); sessions that run side by side share the lock and prune nothing.

Only names shaped like a test namespace (``TEST_NAMESPACE``) are ever touched; ``bench`` namespaces belong
to ``tests/bench/clean.py``.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

import asyncpg
from aiokafka.admin import AIOKafkaAdminClient

# t: the shared service stack and PostgreSQL-only tests; ti: ingest; tl: ledger; p: projections.
KINDS = ("t", "ti", "tl", "p")
TEST_NAMESPACE = re.compile(r"(?:t|ti|tl|p)[0-9a-f]{10}")
UNKNOWN_TOPIC = 3  # Kafka's UNKNOWN_TOPIC_OR_PARTITION: already gone
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
LOCK_PATH = Path(os.environ.get("BILLING_STACK_DIR", "/var/tmp/billing-stack")) / "tests.lock"

_session: list[str] = []


def scratch_namespace(kind: str = "t") -> str:
    """A fresh namespace for a test's topics and schemas; the test session drops it at its end."""
    if kind not in KINDS:
        raise ValueError(f"unknown namespace kind {kind!r}; one of {KINDS}")
    namespace = kind + uuid.uuid4().hex[:10]
    _session.append(namespace)
    return namespace


def namespace_of(name: str) -> str:
    """The namespace a topic (``ns.topic``) or schema (``ns_name``) belongs to."""
    return re.split(r"[._]", name, maxsplit=1)[0]


async def drop_namespaces(kafka: str | None, database_url: str | None,
                          belongs: Callable[[str], bool]) -> tuple[int, int]:
    """Deletes the topics and drops the schemas whose names ``belongs`` accepts; returns (topics, schemas)."""
    schemas: list[str] = []
    if database_url:
        conn = await asyncpg.connect(database_url)
        try:
            schemas = [r["nspname"] for r in await conn.fetch("SELECT nspname FROM pg_namespace")
                       if belongs(r["nspname"])]
            for schema in schemas:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()
    topics: list[str] = []
    if kafka:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka, request_timeout_ms=120_000)
        await admin.start()
        try:
            topics = [t for t in await admin.list_topics() if belongs(t)]
            for start in range(0, len(topics), 100):
                response = await admin.delete_topics(topics[start:start + 100], timeout_ms=120_000)
                failed = [(topic, code) for topic, code, *_ in response.topic_error_codes
                          if code not in (0, UNKNOWN_TOPIC)]
                if failed:
                    raise RuntimeError(f"Kafka refused to delete topics (topic, error code): {failed[:5]}")
        finally:
            await admin.close()
    return len(topics), len(schemas)


def drop_session_namespaces(kafka: str, database_url: str) -> tuple[int, int]:
    """Drops every namespace ``scratch_namespace`` made in this session."""
    made = set(_session)
    if not made:
        return 0, 0
    counts = asyncio.run(drop_namespaces(kafka, database_url, lambda name: namespace_of(name) in made))
    _session.clear()
    return counts


def is_local(address: str) -> bool:
    """Whether a Kafka bootstrap address (host:port) or a database URL points at this machine."""
    host = urlsplit(address).hostname if "://" in address else address.rsplit(":", 1)[0]
    return (host or "").strip("[]") in LOCAL_HOSTS


def session_lock() -> tuple[IO[str], bool]:
    """Holds ``tests.lock`` for the session: exclusively if no other session runs here (then orphans may be
    pruned), else shared. Returns the open lock file (keep it open) and whether the lock was exclusive."""
    LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
    handle = LOCK_PATH.open("a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return handle, True
    except BlockingIOError:
        fcntl.flock(handle, fcntl.LOCK_SH)
        return handle, False


def prune_orphans(kafka: str, database_url: str) -> tuple[int, int]:
    """Drops the test namespaces earlier sessions left behind, on the local broker and database only.
    Call it only while holding ``tests.lock`` exclusively, before this session makes namespaces."""
    return asyncio.run(drop_namespaces(
        kafka if is_local(kafka) else None, database_url if is_local(database_url) else None,
        lambda name: TEST_NAMESPACE.fullmatch(namespace_of(name)) is not None))


def share_lock(handle: IO[str]) -> None:
    """Lets other sessions run alongside once the pruning is done (exclusive -> shared)."""
    fcntl.flock(handle, fcntl.LOCK_SH)

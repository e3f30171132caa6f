"""Test infrastructure: real Kafka and PostgreSQL for integration and e2e tests.

Where they come from, in order: ``KAFKA_BOOTSTRAP_SERVERS`` / ``DATABASE_URL`` if set (``make test`` sets
them after starting the native stack), else testcontainers when a Docker engine answers, else the native
scripts in deploy/local. Integration tests are never skipped silently: if none of these works, they fail.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import namespaces
from tests.support import smtp  # noqa: F401 - a fixture every test may ask for (a local SMTP server)

ROOT = Path(__file__).resolve().parent.parent


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:  # noqa: BLE001 - any failure to reach a Docker engine means "no Docker"
        return False


@pytest.fixture(scope="session")
def infra() -> Iterator[dict[str, str]]:
    kafka = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    database = os.environ.get("DATABASE_URL")
    containers: list[object] = []
    if not (kafka and database) and _docker_answers():
        from testcontainers.kafka import KafkaContainer
        from testcontainers.postgres import PostgresContainer

        if not kafka:
            k = KafkaContainer().with_kraft()
            k.start()
            containers.append(k)
            kafka = k.get_bootstrap_server()
        if not database:
            p = PostgresContainer("postgres:15", driver=None)
            p.start()
            containers.append(p)
            database = p.get_connection_url()
    if not (kafka and database):
        subprocess.run(["bash", str(ROOT / "deploy/local/stack.sh"), "up"], check=True)
        kafka = kafka or "127.0.0.1:9092"
        database = database or "postgresql://billing:billing@127.0.0.1:55432/billing"
    print(f"\n[infra] Kafka at {kafka}, PostgreSQL at {database.split('@')[-1]}", file=sys.stderr)
    lock, alone = namespaces.session_lock()
    if alone:
        topics, schemas = namespaces.prune_orphans(kafka, database)
        if topics or schemas:
            print(f"[infra] dropped {topics} topics and {schemas} schemas earlier test runs left behind",
                  file=sys.stderr)
        namespaces.share_lock(lock)
    try:
        yield {"KAFKA_BOOTSTRAP_SERVERS": kafka, "DATABASE_URL": database}
    finally:
        namespaces.drop_session_namespaces(kafka, database)
        lock.close()
    for container in containers:
        container.stop()  # type: ignore[attr-defined]


def pytest_report_header(config: pytest.Config) -> list[str]:
    kafka = os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or "(none given: testcontainers or deploy/local)"
    database = (os.environ.get("DATABASE_URL") or "(none given: testcontainers or deploy/local)").split("@")[-1]
    return [f"integration infrastructure: Kafka {kafka}, PostgreSQL {database}"]

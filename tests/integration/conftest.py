"""The real stack for integration tests: every service as its own process (``billing serve``), two ledger
processes in one consumer group, on real Kafka and PostgreSQL, in a fresh namespace per test run."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.namespaces import scratch_namespace
from tests.support import ServiceProcess, free_port

pytestmark = pytest.mark.integration


@dataclass
class Stack:
    env: dict[str, str]
    namespace: str
    ingest_url: str
    projections_url: str
    processes: dict[str, ServiceProcess]
    log_dir: Path
    rating_url: str = ""
    ledger_url: str = ""

    def topic(self, name: str) -> str:
        return f"{self.namespace}.{name}"


@pytest.fixture(scope="session")
def stack(infra: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    namespace = scratch_namespace("t")
    log_dir = tmp_path_factory.mktemp("stack-logs")
    env = {**infra, "BILLING_NAMESPACE": namespace, "BILLING_DATA_DIR": str(log_dir / "var")}
    ports = {name: free_port() for name in ("ingest", "rating", "ledger", "ledger2", "projections")}
    processes: dict[str, ServiceProcess] = {}
    try:
        for name, port in ports.items():
            service = "ledger" if name.startswith("ledger") else name
            processes[name] = ServiceProcess(["serve", service, "--port", str(port)], env,
                                             log_dir / f"{name}.log", port).start()
        yield Stack(env, namespace, f"http://127.0.0.1:{ports['ingest']}",
                    f"http://127.0.0.1:{ports['projections']}", processes, log_dir,
                    rating_url=f"http://127.0.0.1:{ports['rating']}", ledger_url=f"http://127.0.0.1:{ports['ledger']}")
    finally:
        for process in processes.values():
            process.stop()

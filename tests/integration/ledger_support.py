"""What the ledger's integration tests share: `billing serve ledger` processes in a scratch namespace, its
store, and commands as the services send them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from billing_events import ids
from billing_events.messages import LedgerCommand
from billing_ledger.application import LedgerApplication, persistence_env

from tests.support import ServiceProcess, free_port


@dataclass
class Ledger:
    env: dict[str, str]
    namespace: str
    log_dir: Path

    @property
    def schema(self) -> str:
        return f"{self.namespace}_billing_ledger"

    def topic(self, name: str) -> str:
        return f"{self.namespace}.{name}"

    def process(self, name: str) -> ServiceProcess:
        port = free_port()
        return ServiceProcess(["serve", "ledger", "--port", str(port)], self.env, self.log_dir / f"{name}.log", port)

    def store(self) -> LedgerApplication:
        return LedgerApplication(persistence_env(self.env["DATABASE_URL"], str(self.log_dir), self.schema))


def command(kind: str, tenant: str, payload: dict[str, object], cause: str) -> LedgerCommand:
    return LedgerCommand(command_id=ids.command_id(kind, tenant, cause), kind=kind, tenant=tenant,
                         issued_at=datetime.now(UTC), issued_by="integration-test", payload=payload)

"""Settings from the environment. Every bound and default lives here, named with its unit last."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEV_JWT_SECRET = "billing-local-development-key-change-me-in-production"


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


@dataclass(frozen=True)
class Settings:
    kafka_bootstrap_servers: str | None = None
    database_url: str | None = None
    data_dir: Path = Path("var")
    http_host: str = "127.0.0.1"
    embedded_port: int = 8000
    service_ports: dict[str, int] = field(
        default_factory=lambda: {"ingest": 8001, "rating": 8002, "ledger": 8003, "projections": 8004}
    )
    topic_partitions: int = 6
    batch_records_max: int = 500
    poll_timeout_ms: int = 200
    http_events_per_request_max: int = 1000
    http_body_bytes_max: int = 4 * 1024 * 1024
    dedup_window_days: int = 35
    future_skew_seconds: int = 300
    jwt_secret: str = DEV_JWT_SECRET
    jwt_issuer: str = "billing-local"
    jwt_audience: str = "billing"
    jwks_url: str | None = None
    max_active_subscriptions: int = 3
    log_json: bool | None = None  # None: JSON when stdout is not a terminal
    # Prefix of topic names, consumer groups and database schemas, so several independent stacks can share
    # one Kafka cluster and one database (the test suite uses a fresh namespace per run). Empty: none.
    namespace: str = ""

    def schema(self, service: str) -> str:
        return f"{self.namespace}_billing_{service}" if self.namespace else f"billing_{service}"

    def group(self, group_id: str) -> str:
        return f"{self.namespace}.{group_id}" if self.namespace else group_id

    @classmethod
    def from_env(cls) -> Settings:
        ports = {
            name: _env_int(f"BILLING_{name.upper()}_PORT", default)
            for name, default in {"ingest": 8001, "rating": 8002, "ledger": 8003, "projections": 8004}.items()
        }
        return cls(
            kafka_bootstrap_servers=os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or None,
            database_url=os.environ.get("DATABASE_URL") or None,
            data_dir=Path(os.environ.get("BILLING_DATA_DIR", "var")),
            http_host=os.environ.get("BILLING_HTTP_HOST", "127.0.0.1"),
            embedded_port=_env_int("BILLING_PORT", 8000),
            service_ports=ports,
            topic_partitions=_env_int("BILLING_TOPIC_PARTITIONS", 6),
            batch_records_max=_env_int("BILLING_BATCH_RECORDS_MAX", 500),
            dedup_window_days=_env_int("BILLING_DEDUP_WINDOW_DAYS", 35),
            future_skew_seconds=_env_int("BILLING_FUTURE_SKEW_SECONDS", 300),
            jwt_secret=os.environ.get("BILLING_JWT_SECRET", DEV_JWT_SECRET),
            jwt_issuer=os.environ.get("BILLING_JWT_ISSUER", "billing-local"),
            jwt_audience=os.environ.get("BILLING_JWT_AUDIENCE", "billing"),
            jwks_url=os.environ.get("BILLING_JWKS_URL") or None,
            max_active_subscriptions=_env_int("BILLING_MAX_ACTIVE_SUBSCRIPTIONS", 3),
            namespace=os.environ.get("BILLING_NAMESPACE", ""),
        )

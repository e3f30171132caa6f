"""Settings from the environment. Every bound and default lives here, named with its unit last."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

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
    batch_records_max: int = 2000  # measured: 2000 beat 500 end to end (bench/results/reference.md)
    poll_timeout_ms: int = 200
    http_events_per_request_max: int = 1000
    http_body_bytes_max: int = 4 * 1024 * 1024  # POST /v1/usage (up to 1,000 events; gzip: before and after)
    # Every other route's request body (billing_runtime.body_limit), unless it declares its own (webhooks). The
    # largest legitimate bodies are catalogues (POST /v1/catalog: the examples are 2-5 KB; a catalogue is published as
    # one ledger command, and a Kafka record is at most 1 MiB by default anyway).
    http_default_body_bytes_max: int = 1024 * 1024
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
    # Billing cycles and invoices.
    scheduler_interval_seconds: float = 30.0
    invoice_issuer: str = "billing"
    smtp_host: str | None = None  # None: invoice emails are off
    smtp_port: int = 25
    smtp_sender: str = "billing@localhost"
    smtp_recipient_domain: str = "example.invalid"
    # Ingest dedup state cleanup: rows of events older than the dedup window (plus a margin for clock skew
    # between instances) are deleted every interval, in statements of at most `rows_max` rows and at most
    # `rows_per_run_max` rows per run, so a run is short and state is bounded by the window, not by traffic.
    dedup_cleanup_interval_seconds: int = 60
    dedup_cleanup_rows_max: int = 5000
    dedup_cleanup_rows_per_run_max: int = 200_000
    # Payment webhooks (POST /v1/webhooks/{gateway}). A gateway is enabled only when its secrets are set.
    webhook_body_bytes_max: int = 256 * 1024
    gateway_api_timeout_seconds: int = 10
    stripe_api_key: str | None = None
    stripe_webhook_secret: str | None = None
    stripe_webhook_tolerance_seconds: int = 300
    # Stripe's API address (e.g. stripe-mock, a test's fake); None: the stripe library's own (api.stripe.com).
    stripe_api_base: str | None = None
    razorpay_key_id: str | None = None
    razorpay_key_secret: str | None = None
    razorpay_webhook_secret: str | None = None
    razorpay_api_base: str = "https://api.razorpay.com"
    # Razorpay signs the body only (no signed timestamp) and retries for 24 h: the event's own `created_at`
    # must be within this window; replayed bodies are refused by the processed-events table.
    razorpay_webhook_tolerance_seconds: int = 48 * 3600
    paypal_client_id: str | None = None
    paypal_client_secret: str | None = None
    paypal_webhook_id: str | None = None
    paypal_api_base: str = "https://api-m.paypal.com"
    # PayPal signs PAYPAL-TRANSMISSION-TIME: it must be within this window of our clock (either direction).
    paypal_webhook_tolerance_seconds: int = 300
    # Payments (issue 8): identity gate, dunning, alerts, daily digest.
    vies_enabled: bool = False  # VAT registration lookup (network); format + check digits are always checked
    vies_url: str | None = None
    # Tenant-set outbound URLs (alerts webhook_url) may point at private/loopback/link-local addresses only when
    # this is on (on-premises deployments); off, they are refused when set and at send time (SSRF).
    outbound_private_targets_allowed: bool = False
    identity_verification: str = "off"  # off | first_top_up | threshold
    identity_threshold: str | None = None  # top-ups above this (account currency) need a verified identity
    dunning_retry_days: tuple[int, ...] = (0, 3, 5)
    alert_webhook_attempts_max: int = 5
    # Days before the end of a saved card's expiry month at which PaymentMethodExpiring is recorded and sent
    # (0: only PaymentMethodExpired, after it); at most CARD_EXPIRY_NOTICE_DAYS_MAX (ledger limits.py).
    card_expiry_notice_days: int = 30
    digest_recipient: str | None = None  # None: the daily income digest is off
    digest_interval_seconds: float = 60.0  # how often the leader checks whether yesterday's digest is due
    payments_interval_seconds: float = 5.0

    def stripe_api_address(self) -> str | None:
        """The ``api`` base address of a ``stripe.StripeClient``: BILLING_STRIPE_API_BASE when set (an http(s) URL
        with a host, else ValueError), None for the stripe library's own address."""
        if self.stripe_api_base is None:
            return None
        url = urlsplit(self.stripe_api_base)
        if url.scheme not in ("http", "https") or not url.hostname or url.query or url.fragment:
            raise ValueError(f"BILLING_STRIPE_API_BASE must be an http(s) URL such as http://localhost:12111, not "
                             f"{self.stripe_api_base!r}")
        return self.stripe_api_base.rstrip("/")

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
            batch_records_max=_env_int("BILLING_BATCH_RECORDS_MAX", 2000),
            http_default_body_bytes_max=_env_int("BILLING_HTTP_DEFAULT_BODY_BYTES_MAX", 1024 * 1024),
            dedup_window_days=_env_int("BILLING_DEDUP_WINDOW_DAYS", 35),
            future_skew_seconds=_env_int("BILLING_FUTURE_SKEW_SECONDS", 300),
            jwt_secret=os.environ.get("BILLING_JWT_SECRET", DEV_JWT_SECRET),
            jwt_issuer=os.environ.get("BILLING_JWT_ISSUER", "billing-local"),
            jwt_audience=os.environ.get("BILLING_JWT_AUDIENCE", "billing"),
            jwks_url=os.environ.get("BILLING_JWKS_URL") or None,
            max_active_subscriptions=_env_int("BILLING_MAX_ACTIVE_SUBSCRIPTIONS", 3),
            namespace=os.environ.get("BILLING_NAMESPACE", ""),
            scheduler_interval_seconds=float(os.environ.get("BILLING_SCHEDULER_INTERVAL_SECONDS", "30")),
            invoice_issuer=os.environ.get("BILLING_INVOICE_ISSUER", "billing"),
            smtp_host=os.environ.get("BILLING_SMTP_HOST") or None,
            smtp_port=_env_int("BILLING_SMTP_PORT", 25),
            smtp_sender=os.environ.get("BILLING_SMTP_SENDER", "billing@localhost"),
            smtp_recipient_domain=os.environ.get("BILLING_SMTP_RECIPIENT_DOMAIN", "example.invalid"),
            dedup_cleanup_interval_seconds=_env_int("BILLING_DEDUP_CLEANUP_INTERVAL_SECONDS", 60),
            dedup_cleanup_rows_max=_env_int("BILLING_DEDUP_CLEANUP_ROWS_MAX", 5000),
            dedup_cleanup_rows_per_run_max=_env_int("BILLING_DEDUP_CLEANUP_ROWS_PER_RUN_MAX", 200_000),
            webhook_body_bytes_max=_env_int("BILLING_WEBHOOK_BODY_BYTES_MAX", 256 * 1024),
            gateway_api_timeout_seconds=_env_int("BILLING_GATEWAY_API_TIMEOUT_SECONDS", 10),
            stripe_api_key=os.environ.get("BILLING_STRIPE_API_KEY") or None,
            stripe_webhook_secret=os.environ.get("BILLING_STRIPE_WEBHOOK_SECRET") or None,
            stripe_webhook_tolerance_seconds=_env_int("BILLING_STRIPE_WEBHOOK_TOLERANCE_SECONDS", 300),
            stripe_api_base=os.environ.get("BILLING_STRIPE_API_BASE") or None,
            razorpay_key_id=os.environ.get("BILLING_RAZORPAY_KEY_ID") or None,
            razorpay_key_secret=os.environ.get("BILLING_RAZORPAY_KEY_SECRET") or None,
            razorpay_webhook_secret=os.environ.get("BILLING_RAZORPAY_WEBHOOK_SECRET") or None,
            razorpay_api_base=os.environ.get("BILLING_RAZORPAY_API_BASE") or "https://api.razorpay.com",
            razorpay_webhook_tolerance_seconds=_env_int("BILLING_RAZORPAY_WEBHOOK_TOLERANCE_SECONDS", 48 * 3600),
            paypal_client_id=os.environ.get("BILLING_PAYPAL_CLIENT_ID") or None,
            paypal_client_secret=os.environ.get("BILLING_PAYPAL_CLIENT_SECRET") or None,
            paypal_webhook_id=os.environ.get("BILLING_PAYPAL_WEBHOOK_ID") or None,
            paypal_api_base=os.environ.get("BILLING_PAYPAL_API_BASE") or "https://api-m.paypal.com",
            paypal_webhook_tolerance_seconds=_env_int("BILLING_PAYPAL_WEBHOOK_TOLERANCE_SECONDS", 300),
            vies_enabled=os.environ.get("BILLING_VIES_ENABLED", "").lower() in ("1", "true", "yes"),
            vies_url=os.environ.get("BILLING_VIES_URL") or None,
            outbound_private_targets_allowed=os.environ.get("BILLING_OUTBOUND_PRIVATE_TARGETS_ALLOWED", "").lower()
            in ("1", "true", "yes"),
            identity_verification=os.environ.get("BILLING_IDENTITY_VERIFICATION", "off"),
            identity_threshold=os.environ.get("BILLING_IDENTITY_THRESHOLD") or None,
            dunning_retry_days=tuple(int(d) for d in os.environ.get("BILLING_DUNNING_RETRY_DAYS", "0,3,5").split(",")
                                     if d.strip()),
            alert_webhook_attempts_max=_env_int("BILLING_ALERT_WEBHOOK_ATTEMPTS_MAX", 5),
            card_expiry_notice_days=_env_int("BILLING_CARD_EXPIRY_NOTICE_DAYS", 30),
            digest_recipient=os.environ.get("BILLING_DIGEST_RECIPIENT") or None,
            digest_interval_seconds=float(os.environ.get("BILLING_DIGEST_INTERVAL_SECONDS", "60")),
            payments_interval_seconds=float(os.environ.get("BILLING_PAYMENTS_INTERVAL_SECONDS", "5")),
        )

"""Every bound and default of the ledger service, in one place (TIGER_STYLE: named with the unit last)."""

from __future__ import annotations

# Committed aggregates kept in memory (accounts, pools, the catalogue; never receipts). A cached aggregate
# is brought up to date with one query per batch before use, so a bigger cache only saves replays.
AGGREGATE_CACHE_AGGREGATES_MAX = 20_000

# Synchronous HTTP decisions (holds, allocations, adjustments, refunds): one-command transactions retried
# after an optimistic-concurrency conflict (another writer recorded the same aggregate version).
DIRECT_CONFLICT_RETRIES_MAX = 40
DIRECT_CONFLICT_BACKOFF_SECONDS_MAX = 0.02
# One writer thread applies the waiting direct commands together (group commit): at most this many per
# transaction, and at most this many waiting before new requests are turned away (503).
DIRECT_GROUP_COMMANDS_MAX = 64
DIRECT_QUEUE_COMMANDS_MAX = 10_000

# The interpreter's GIL switch interval in a ledger process (Python's default is 5 ms). Batch preparation
# is pure Python on one thread; an HTTP decision needs the GIL several times on two others (event loop,
# writer), and waiting up to 5 ms each time would be most of a hold's latency.
GIL_SWITCH_INTERVAL_SECONDS = 0.001

# Holds: how long a hold may reserve credit.
HOLD_TTL_SECONDS_DEFAULT = 15 * 60
HOLD_TTL_SECONDS_MAX = 7 * 24 * 3600

# Idempotency keys, reasons and resource codes given over HTTP.
KEY_CHARS_MAX = 128
REASON_CHARS_MAX = 512

# Expiry sweeps (grants and holds): how often, and how many accounts are read per transaction.
SWEEP_INTERVAL_SECONDS = 5.0
SWEEP_ACCOUNTS_PER_BATCH_MAX = 500
# Account discovery reads the event log in pages of this many notifications.
SWEEP_LOG_PAGE_EVENTS_MAX = 5_000

# Audit: events read from the store per query while verifying or exporting.
AUDIT_PAGE_EVENTS_MAX = 1_000

"""Every bound and default of the projections service, in one place (TIGER_STYLE: units last)."""

from __future__ import annotations

# Query API pages: the default and the largest page a caller may ask for.
PAGE_ITEMS_DEFAULT = 50
PAGE_ITEMS_MAX = 500
# CSV exports stream every page of a list, this many rows per page (read, written, then the next: an export of any
# length holds one page; no row cap since session 12, exports.py).
CSV_PAGE_ITEMS = 1_000
# `/v1/reports/subscriptions/analytics`: months per request at most (each is computed when asked from every change
# of every subscription: subscription_analytics.py), and how many the dashboard's finance page shows.
ANALYTICS_MONTHS_MAX = 36
ANALYTICS_MONTHS_SHOWN = 12
# A grant whose expiry is this close counts as "expiring soon" on balances and the dashboard.
EXPIRING_SOON_SECONDS = 7 * 24 * 3600
# Append-only rows written with COPY (PostgreSQL) from this many per batch and table; fewer: INSERT.
COPY_ROWS_MIN = 64
# PostgreSQL: percent of a page filled by inserts in tables whose rows are updated (room for HOT updates).
UPDATED_TABLE_FILLFACTOR = 70
# Rows looked up per statement when a batch reads back decimal accumulators.
LOOKUP_KEYS_MAX = 500
# `billing projections rebuild`: records per replay transaction (a partition's records; measured on 50,000
# events: 10,000 cut PostgreSQL's CPU per event by a quarter against 5,000, fewer rows per event to upsert; on
# 200,000 events 20,000 gave ~5 % fewer CPU per event and ~7 % more events/s than 10,000, 35,000 nothing more;
# ~100 MB of Python objects per worker at most), and how long to wait for Kafka metadata.
REBUILD_BATCH_RECORDS_MAX = 20_000
REBUILD_METADATA_TIMEOUT_SECONDS = 30.0
# Bytes per Kafka fetch during a rebuild (the broker's fetch.max.bytes default is 55 MiB).
REBUILD_FETCH_BYTES_MAX = 16 * 1024 * 1024
# `billing serve projections` (role all): consumer child processes at most.
CONSUMER_PROCESSES_MAX = 16
# `billing serve projections` (role all): how long the consumer child may take to finish its batch on stop.
CONSUMER_STOP_SECONDS_MAX = 12.0
# The consumer process (role all / consumer): records per poll at most (one transaction per partition).
CONSUMER_BATCH_RECORDS_MAX = 5_000
# The consumer process: its niceness (CPU priority below the API's: reads first when cores are short).
CONSUMER_NICE = 5
# The consumer process: longest wait between retries of a failing batch.
CONSUMER_RETRY_SECONDS_MAX = 5.0
# Consumer and rebuild processes: collections of the youngest generation every this many allocations.
GC_GEN0_THRESHOLD = 50_000
# Rebuild workers: the same, far higher: a replay batch keeps its rows' objects alive until its flush, and
# every young collection in between walks (and promotes) all of them. Measured on 200,000 events: 1,000,000
# cut the replay's CPU per event by 8 % against 50,000. Garbage without cycles is freed at once either way.
REBUILD_GC_GEN0_THRESHOLD = 1_000_000
# `billing projections rebuild`: replay processes at most (each takes a share of the topic's partitions).
REBUILD_WORKERS_MAX = 16
# Query API (PostgreSQL): connections of its read pool, all opened at startup and kept open (no session reset:
# billing_runtime.db). A new connection costs the API ~5 ms of CPU (SCRAM) and its backend ~10-15 ms over its first
# queries; opened on demand, a burst of reads made the pool open 8 at once, and the next ~150 ms of reads waited.
READ_POOL_CONNECTIONS_MAX = 10
READ_POOL_CONNECTIONS_MIN = READ_POOL_CONNECTIONS_MAX
# Query API (PostgreSQL): tenants in its copy of balance states (balance_cache.py; ~1 KB each with a few wallets and
# grants): a notification adds a tenant only while there is room, a read of a tenant not held evicts the oldest.
BALANCE_CACHE_TENANTS_MAX = 50_000
# Query API: how often the LISTEN connection is checked with a query (a connection lost without a word would
# leave the copy stale), and the longest wait between attempts to LISTEN again (reads use the query meanwhile).
BALANCE_LISTENER_CHECK_SECONDS = 2.0
BALANCE_LISTENER_RETRY_SECONDS_MAX = 5.0

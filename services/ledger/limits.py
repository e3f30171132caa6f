"""Every bound and default of the ledger service, in one place (TIGER_STYLE: named with the unit last)."""

from __future__ import annotations

# Committed aggregates kept in memory (accounts, pools, the catalogue; never receipts). A cached aggregate
# is brought up to date with one query per batch before use, so a bigger cache only saves replays.
AGGREGATE_CACHE_AGGREGATES_MAX = 20_000
# A batch that wants an aggregate another thread of this process has taken out (deciding on it) waits this
# long at most for it to be put back, instead of loading its own copy from the store (aggregate_cache.py):
# longer than a usage batch or a sweep transaction takes, far shorter than replaying a big account.
AGGREGATE_RETURN_WAIT_SECONDS = 0.1
# An account's (or pool's) state is snapshotted every this many events (snapshots.py), so loading one replays
# at most this many events after its latest snapshot (~30 us each) instead of its whole history; that load
# is also what a transaction that lost a race pays for each of its accounts. A snapshot costs one write
# (batched per transaction). Measured (60,000 debits on 200 accounts in transactions of 500): CPU per debit
# 93-96 us without snapshots, 86-101 every 1,000 events, 90-92 every 200 (noise); loading the 200 accounts
# (302 events each) afresh 1.6-2.2 s without, 0.6-0.7 s every 200 events.
SNAPSHOT_EVENTS_INTERVAL = 200
# A snapshot is encoded on the thread that committed (snapshots.py): ~0.034 us per byte of state, while
# replaying an event costs ~30 us. An aggregate whose last snapshot was S bytes is snapshotted at most every
# S / SNAPSHOT_STATE_BYTES_PER_EVENT events, so encoding costs at most ~11 % of replaying the events since the
# last one, and a big state does not stall its writers often: in the end-to-end bench the probes' account
# (~3,000 active holds, ~1 MB) took ~35 ms to encode; every 200 events that was a hold in ~200 waiting for it.
SNAPSHOT_STATE_BYTES_PER_EVENT = 100
# Snapshots waiting for the writer thread at most (each a list of one transaction's); more are dropped.
SNAPSHOT_QUEUE_MAX = 10_000
# At a graceful stop (``LedgerApplication.snapshot_lagging``) the cached aggregates with at least this many events
# since their latest snapshot are snapshotted, most behind first, for at most SNAPSHOT_AT_STOP_SECONDS: the
# next process loads them without replaying those events (a big state, snapshotted every ~10,000 events, would
# replay up to that many: a few hundred ms for the bench's 1 MB account, each time it is first touched).
SNAPSHOT_AT_STOP_EVENTS_MIN = 20
SNAPSHOT_AT_STOP_SECONDS = 5.0
# Latest snapshot versions remembered (one per aggregate seen); forgetting them only makes snapshots earlier.
SNAPSHOT_VERSIONS_KEPT_MAX = 200_000

# A ``credit.grant`` naming the catalogue it was checked against (``catalog_digest``) while the ledger has not published
# that catalogue yet (its command travels on another partition) fails its batch, which the consumer hands again later,
# for this long after this process first tried it; then it is rejected (``unknown_catalog``). Counted from the first
# try, not from when it was issued: a ledger catching up on a backlog has the catalogue a little later, not never.
CATALOG_WAIT_SECONDS = 600
# Commands remembered with the time of their first try (``LedgerApplication.waited_seconds``); the oldest forgotten
# beyond it (its wait then starts again: longer, never shorter).
WAITING_COMMANDS_MAX = 10_000

# Synchronous HTTP decisions (holds, allocations, adjustments, refunds): one-command transactions retried
# after an optimistic-concurrency conflict (another writer recorded the same aggregate version).
DIRECT_CONFLICT_RETRIES_MAX = 40
DIRECT_CONFLICT_BACKOFF_SECONDS_MAX = 0.02
# After an optimistic-concurrency conflict, writes of this process decide under the event table's lock for
# this long (contention.py): another writer is changing the same accounts.
CONTENTION_WINDOW_SECONDS = 10.0

# Commands per transaction of a Kafka batch (service.py). Uncontended, transactions are pipelined (the next
# prepared while the previous commits) and bigger is faster (measured, debits/s committed: 100 -> 8,900,
# 250 -> 11,600, 500 -> 13,800), but a batch is at most 500 records and two or more transactions per batch
# let PostgreSQL commit one while Python prepares the next. Contended (see contention.py), each transaction is
# decided under the locks of its accounts (pg_recorder.py), which an HTTP hold on one of them waits for:
# smaller ones keep that wait short, bigger ones need fewer round trips per debit. Measured with
# tests/bench/bench_ledger.py on the shared 2-core machine (holds at 200/s, usage offered at 5,000/s on the
# same 200 accounts): 20 -> hold p99 10.9 ms, 4,700-4,800 debits/s committed; 40 -> p99 12.7-18.0 ms,
# 4,800-4,900/s. (Under the event table's lock, before, 20 rather than 50 gave p99 22-30 ms instead of
# 44-61 ms; later 13-21 ms, with 3,700-4,100 debits/s.)
CHUNK_COMMANDS_MAX = 250
CONTENDED_CHUNK_COMMANDS_MAX = 20
# One writer thread applies the waiting direct commands together (group commit): at most this many per
# transaction, and at most this many waiting before new requests are turned away (503).
DIRECT_GROUP_COMMANDS_MAX = 64
DIRECT_QUEUE_COMMANDS_MAX = 10_000
# A direct command is decided on the event loop's own thread (direct.py) only when the last decision finished
# at least this long ago (else it joins the writer's group); an inline decision slower than
# DIRECT_INLINE_SLOW_SECONDS (the loop was blocked that long) stops them for DIRECT_INLINE_PAUSE_SECONDS.
DIRECT_INLINE_IDLE_SECONDS = 0.001
DIRECT_INLINE_SLOW_SECONDS = 0.010
DIRECT_INLINE_PAUSE_SECONDS = 1.0

# The interpreter's GIL switch interval in a ledger process (Python's default is 5 ms). Batch preparation
# is pure Python on one thread; an HTTP decision needs the GIL several times on two others (event loop,
# writer), and waiting up to 5 ms each time would be most of a hold's latency.
GIL_SWITCH_INTERVAL_SECONDS = 0.001
# Garbage collector of a ledger process (see tuning.py): the youngest generation is collected every this
# many net allocations (Python's default: 700; one collection of 50,000 young objects takes ~1 ms), the
# middle one every GC_GEN1_THRESHOLD young collections, the oldest every GC_GEN2_THRESHOLD middle ones.
GC_GEN0_THRESHOLD = 50_000
GC_GEN1_THRESHOLD = 20
GC_GEN2_THRESHOLD = 20


# Holds: how long a hold may reserve credit.
HOLD_TTL_SECONDS_DEFAULT = 15 * 60
HOLD_TTL_SECONDS_MAX = 7 * 24 * 3600

# An approved refund request reserves the order's purchased credit (a hold, refund_request_commands.py) until
# the gateway's refund is booked: at most this long, as long as the longest a hold may last, so an operator
# can retry a gateway outage by approving again within a week; after it the credit is spendable again.
REFUND_HOLD_SECONDS = HOLD_TTL_SECONDS_MAX

# A subscription created with collection ``charge_before_access`` stays ``incomplete`` (no access) until its first
# invoice is paid; unpaid this long after its start it is canceled (``incomplete_expired``) and its invoice voided,
# so the account's live-subscription limit stops counting it. Dunning's last failed attempt (default schedule
# 0,3,5 days) expires it earlier; this bounds the wait when no attempt is made (no payment method). A charge of
# it still pending then (no failure recorded) holds the expiry off: expiring would void an invoice being paid.
# Its webhook activates it; its failure is a failed dunning attempt, and the last one expires it.
INCOMPLETE_EXPIRY_DAYS = 7

# Idempotency keys, reasons and resource codes given over HTTP.
KEY_CHARS_MAX = 128
REASON_CHARS_MAX = 512

# Expiry sweeps (grants and holds): how often, and how many accounts are read per transaction.
SWEEP_INTERVAL_SECONDS = 5.0
SWEEP_ACCOUNTS_PER_BATCH_MAX = 500
# A sweep decides under its accounts' locks (PostgreSQL) at most this many expiries per transaction (at
# least one account's): a hold on one of those accounts waits for it. 8,000 holds of 200 accounts expiring
# together: transactions of 20 accounts (800 expiries) took 61-70 ms each; of at most 50, a few ms.
SWEEP_DECISIONS_PER_TRANSACTION_MAX = 50
# Account discovery reads the event log in pages of this many notifications.
SWEEP_LOG_PAGE_EVENTS_MAX = 5_000

# The daily income digest (digest.py): days missed while no ledger ran are sent afterwards, at most this many.
DIGEST_BACKFILL_DAYS_MAX = 31

# Audit: events read from the store per query while verifying or exporting.
AUDIT_PAGE_EVENTS_MAX = 1_000
# When a subscription command (create, change, cancel, pause, resume) may take effect, from when it was issued
# (``issued_at``: a redelivery decides the same): ``at`` at most EFFECTIVE_AT_BACKDATE_DAYS_MAX days before it, as far
# back as ingest takes usage by default (its dedup window, BILLING_DEDUP_WINDOW_DAYS 35: older usage is refused
# ``too_old``, so an earlier period could never be rated), and at most EFFECTIVE_AT_SKEW_SECONDS_MAX after it, the
# clock skew ingest allows usage (BILLING_FUTURE_SKEW_SECONDS 300): nothing is scheduled, a command takes effect
# when it is applied, so a later ``at`` would date its documents in the future. Beyond either, it is refused
# (``at_out_of_range``): an ``at`` in 1900 started a subscription billing every month since (INV-1900-000001, one
# more renewal per tick), one in 2099 numbered INV-2099-000001 at once and pooled its capacity now.
EFFECTIVE_AT_BACKDATE_DAYS_MAX = 35
EFFECTIVE_AT_SKEW_SECONDS_MAX = 300

# A cancel (immediate or at period end), a change, a pause or a resume issued after the current period's end, before the scheduler's
# tick renewed it, first ends the periods due by then (each as the tick would: its renewal draft, rating's usage
# lines), at most this many (3 years of monthly periods, as far as rating places usage ahead of the ledger's
# PeriodEnded); further behind it is rejected (``renewals_behind``): tick the subscription first.
CANCEL_RENEWALS_MAX = 36

# A plan's recurring credit without rollover is drawn only by usage of its own period (``drawable_until``, the
# period's end) but stays open this long after that end (its ``expires_at``) and lapses to breakage then, by the expiry
# sweep, once: the close debits of meters priced at close (max, last, unique_count), which rating sends only after
# the renewal ended the period, and usage of the period that reaches the ledger late (Kafka and rating lag, an
# upstream sending late) still draw it, so the books are the same whether they land before or after the period's
# end, its renewal or the sweep. 35 days is ingest's dedup window (``BILLING_DEDUP_WINDOW_DAYS``, default 35): the
# oldest usage ingest accepts (older is ``too_old``), so any usage it accepts of a period ended this long ago at most
# finds its credit open. Recorded on each grant (``expires_at``): changing it changes grants issued from then on only.
# Since session 14 every other close of a plan credit keeps it open this long too for the usage of before the close
# (``BillingAccount.keep_for_late_usage``): a rollover credit after its renewal, a credit cut by an immediate cancel or
# a change after the cut (its new ``expires_at``, recorded on ``GrantKeptForLateUsage`` when it is kept).
RECURRING_CREDIT_LATE_USAGE_DAYS = 35

# A follower of the event log that acts on a few topics (top-ups, alerts, invoice emails: ``LedgerApplication.
# unprocessed``) records how far it has scanned without finding any at most this often (a durable commit each), so a
# restarted process does not scan everything recorded since its last match again; in between it is kept in memory.
FOLLOWER_POSITION_RECORD_SECONDS = 60.0

# `billing serve ledger` stopping its relay process: SIGTERM (it finishes its round and records its position),
# then SIGKILL after this long (a re-publication of at most RELAY_POSITION_RECORD_SECONDS of events follows).
RELAY_STOP_SECONDS_MAX = 10.0

# Card expiry notices (card_expiry_notices.py): BILLING_CARD_EXPIRY_NOTICE_DAYS, the days before the end of a saved
# card's expiry month at which PaymentMethodExpiring is sent, is 0 to this many (a card is issued for years; a
# notice a year ahead is already no use).
CARD_EXPIRY_NOTICE_DAYS_MAX = 365

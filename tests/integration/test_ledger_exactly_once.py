"""The ledger on real Kafka and PostgreSQL, as `billing serve ledger` processes in a fresh namespace.

* Killed with SIGKILL while commands stream in (mid-batch), restarted: every command id sent has exactly
  one receipt, every usage debit is posted once, and each balance is the grant minus what was sent.
* Stopped gracefully (SIGTERM), it leaves each busy account it had in memory snapshotted at its latest version.
* Payment notifications delivered twice grant credit once.
* Many parallel allocation requests, spread over two ledger processes, never exceed the pool's capacity.
* A Kafka chunk or an HTTP decision that loses an optimistic race to another process is decided again under
  locks, once, on the stored state: its accounts' locks, which only writers of those accounts wait for, and
  the event table's lock if it still loses on another aggregate. A refused Kafka position writes nothing.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import psycopg
import pytest
from aiokafka import AIOKafkaProducer
from billing_events import ids, topics
from billing_events.messages import LedgerCommand, PaymentNotification
from billing_events.money import SUBUNITS_PER_UNIT
from billing_ledger.application import LedgerApplication, persistence_env
from billing_ledger.audit import state_of, verify_store
from billing_ledger.contention import Contention
from billing_ledger.direct import DirectCommands
from billing_ledger.domain.account import BillingAccount
from billing_ledger.sweeper import Sweeper
from eventsourcing.persistence import IntegrityError, Tracking

from tests.integration.ledger_support import Ledger, command
from tests.namespaces import scratch_namespace
from tests.support import auth, wait_until

pytestmark = pytest.mark.integration

U = SUBUNITS_PER_UNIT
TENANTS = 12
GRANT = 1_000  # USD per tenant
DEBITS = 12_000
ROUNDS = 30  # the debits go out in this many rounds, a little apart, while the ledger is killed


@pytest.fixture(scope="module")
def ledger(infra: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ledger]:
    namespace = scratch_namespace("tl")
    log_dir = tmp_path_factory.mktemp("ledger-logs")
    env = {**infra, "BILLING_NAMESPACE": namespace, "BILLING_DATA_DIR": str(log_dir / "var")}
    yield Ledger(env, namespace, log_dir)
    with psycopg.connect(infra["DATABASE_URL"], autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{namespace}_billing_ledger" CASCADE')  # ours: created by this module's processes


async def produce(ledger: Ledger, topic: str, messages: list[tuple[str, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=ledger.env["KAFKA_BOOTSTRAP_SERVERS"], acks="all",
                                enable_idempotence=True, linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(ledger.topic(topic), value, key=key.encode()) for key, value in messages]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def send(ledger: Ledger, commands: list[LedgerCommand]) -> None:
    asyncio.run(produce(ledger, topics.LEDGER_COMMANDS,
                        [(str(ids.account_id(c.tenant or "")), c.to_json()) for c in commands]))


def receipts(ledger: Ledger, command_ids: list[uuid.UUID]) -> dict[uuid.UUID, int]:
    """Stored receipt events per command id (a receipt is the aggregate whose id is the command id)."""
    with psycopg.connect(ledger.env["DATABASE_URL"]) as conn:
        rows = conn.execute(f'SELECT originator_id, count(*) FROM "{ledger.schema}".ledger_events '
                            "WHERE originator_id = ANY(%s) GROUP BY originator_id", (command_ids,)).fetchall()
    return {row[0]: row[1] for row in rows}


def account(store: LedgerApplication, tenant: str) -> BillingAccount:
    return store.repository.get(ids.account_id(tenant))  # type: ignore[no-any-return]


def test_sigkill_mid_batch_double_posts_nothing_and_loses_nothing(ledger: Ledger) -> None:
    tenants = [f"kill-{i}" for i in range(TENANTS)]
    setup = [command("account.open", t, {"currency": "USD"}, "open") for t in tenants]
    setup += [command("credit.grant", t, {"grant_key": "g", "unit": "USD", "amount": str(GRANT),
                                          "source": "purchase"}, "grant") for t in tenants]
    debits = [command("usage.debit", tenants[i % TENANTS],
                      {"unit": "USD", "amount_subunits": 1_000 + i, "meter": "tokens",
                       "at": datetime.now(UTC).isoformat()}, f"evt-{i}") for i in range(DEBITS)]
    first = ledger.process("ledger-1").start()
    send(ledger, setup)
    wait_until(lambda: len(receipts(ledger, [c.command_id for c in setup])) == len(setup), timeout=60,
               what="accounts opened")

    def stream() -> None:
        per_round = DEBITS // ROUNDS
        for r in range(ROUNDS):
            send(ledger, debits[r * per_round:(r + 1) * per_round])
            time.sleep(0.2)

    streamer = threading.Thread(target=stream)
    streamer.start()
    # Kill once the ledger is busy applying the stream: some, not all, debits have receipts.
    wait_until(lambda: len(receipts(ledger, [c.command_id for c in debits])) > DEBITS // 10, timeout=60,
               interval=0.05, what="the ledger to be mid-stream")
    assert first.stop(signal.SIGKILL) == -signal.SIGKILL
    done_at_kill = len(receipts(ledger, [c.command_id for c in debits]))
    assert done_at_kill < DEBITS, "killed too late to prove anything"
    second = ledger.process("ledger-2").start()
    try:
        streamer.join()
        send(ledger, debits[: DEBITS // 3])  # and a third of them delivered again, for good measure
        ids_sent = [c.command_id for c in setup + debits]
        wait_until(lambda: len(receipts(ledger, ids_sent)) == len(ids_sent), timeout=180, interval=0.5,
                   what="every command to have a receipt")
    finally:
        second.stop()
    counts = receipts(ledger, ids_sent)
    assert set(counts.values()) == {1}, "a command id with more than one receipt event"

    store = ledger.store()
    try:
        posted: dict[uuid.UUID, int] = {}
        for tenant in tenants:
            acct = account(store, tenant)
            expected = GRANT * U - sum(int(c.payload["amount_subunits"]) for c in debits if c.tenant == tenant)
            assert acct.available("USD") == expected, tenant
            for event in store.events.get(acct.id):
                if type(event).__name__ == "UsageDebited":
                    posted[event.command_id] = posted.get(event.command_id, 0) + 1  # type: ignore[attr-defined]
        assert len(posted) == DEBITS and set(posted.values()) == {1}
    finally:
        store.close()
    print(f"\n[ledger] killed with {done_at_kill}/{DEBITS} debits applied; after restart all {DEBITS} once")


def test_a_graceful_stop_leaves_each_busy_account_snapshotted_at_its_latest_version(ledger: Ledger) -> None:
    """SIGTERM: before it closes, the service snapshots the accounts it has in memory that are 20 or more events
    past their latest snapshot (snapshots.py), so the next process replays none of them; a quiet one is left."""
    busy, quiet = "stop-busy", "stop-quiet"
    setup = [command("account.open", t, {"currency": "USD"}, "open") for t in (busy, quiet)]
    setup += [command("credit.grant", t, {"grant_key": "g", "unit": "USD", "amount": "100",
                                          "source": "purchase"}, "grant") for t in (busy, quiet)]
    debits = [command("usage.debit", busy, {"unit": "USD", "amount_subunits": 1_000 + i, "meter": "tokens",
                                            "at": datetime.now(UTC).isoformat()}, f"stop-{i}") for i in range(30)]
    process = ledger.process("ledger-stop").start()
    try:
        send(ledger, setup)
        send(ledger, debits)
        sent = [c.command_id for c in setup + debits]
        wait_until(lambda: len(receipts(ledger, sent)) == len(sent), timeout=60, what="every command applied")
    finally:
        assert process.stop(signal.SIGTERM) == 0
    store = ledger.store()
    try:
        assert store.snapshots is not None
        for tenant, snapshotted in ((busy, True), (quiet, False)):
            account_id = ids.account_id(tenant)
            version = max(e.originator_version for e in store.recorder.select_events(account_id))
            taken = [s.originator_version for s in store.snapshots.recorder.select_events(account_id)]
            assert (taken[-1:] == [version]) if snapshotted else taken == [], (tenant, version, taken)
        loaded = store.load_many([ids.account_id(busy)])[ids.account_id(busy)]
        assert loaded.available("USD") == 100 * U - sum(int(c.payload["amount_subunits"]) for c in debits)
    finally:
        store.close()


def test_payment_delivered_twice_grants_once(ledger: Ledger) -> None:
    tenant = f"pay-{uuid.uuid4().hex[:6]}"
    process = ledger.process("ledger-pay").start()
    try:
        opened = command("account.open", tenant, {"currency": "EUR"}, "open")
        send(ledger, [opened])
        wait_until(lambda: receipts(ledger, [opened.command_id]), timeout=60, what="account opened")
        paid = PaymentNotification(gateway="stripe", gateway_event_id="evt_42", kind="payment_succeeded",
                                   tenant=tenant, order_id="ord-1", amount=Decimal("19.99"), currency="EUR",
                                   verified_at=datetime.now(UTC))
        key = str(ids.account_id(tenant))
        asyncio.run(produce(ledger, topics.PAYMENTS, [(key, paid.to_json()), (key, paid.to_json())]))
        marker = command("usage.debit", tenant, {"unit": "EUR", "amount_subunits": U, "meter": "m",
                                                 "at": datetime.now(UTC).isoformat()}, "marker")
        send(ledger, [marker])
        wait_until(lambda: receipts(ledger, [marker.command_id]), timeout=60, what="marker applied")

        def granted() -> int:
            store = ledger.store()
            try:
                return account(store, tenant).balance("EUR")
            finally:
                store.close()

        wait_until(lambda: granted() == 1999 * U // 100 - U, timeout=60, what="payment granted once")
        time.sleep(1.0)  # the second delivery has been consumed by now: nothing more may arrive
        assert granted() == 1999 * U // 100 - U
    finally:
        process.stop()


def test_parallel_allocations_over_two_processes_never_exceed_capacity(ledger: Ledger) -> None:
    tenant = f"seats-{uuid.uuid4().hex[:6]}"
    processes = [ledger.process(f"ledger-alloc-{i}").start() for i in range(2)]
    urls = [f"http://127.0.0.1:{p.port}" for p in processes]
    capacity, requests = 25, 80
    try:
        put = httpx.put(f"{urls[0]}/v1/accounts/{tenant}/pools/seats", json={"capacity": capacity},
                        headers=auth("admin"), timeout=10)
        assert put.status_code == 200, put.text
        headers = auth("service")

        def allocate(i: int) -> httpx.Response:
            body = {"request_id": f"user-{i}", "resource": "seats", "quantity": 1}
            return httpx.post(f"{urls[i % 2]}/v1/accounts/{tenant}/allocations", json=body, headers=headers,
                              timeout=30)

        with ThreadPoolExecutor(max_workers=32) as pool:
            responses = list(pool.map(allocate, range(requests)))
        assert all(r.status_code in (200, 201) for r in responses), [r.text for r in responses if r.status_code > 201]
        granted = [r.json() for r in responses if r.json()["allocated"]]
        assert len(granted) == capacity
        final = httpx.get(f"{urls[1]}/v1/accounts/{tenant}/allocations/seats/user-0", headers=headers).json()
        assert final["in_use"] == capacity
        # Retries answer as the first time, from either process.
        again = [allocate(i) for i in range(10)]
        assert [a.json()["allocated"] for a in again] == [r.json()["allocated"] for r in responses[:10]]
    finally:
        for process in processes:
            process.stop()
    print(f"\n[ledger] {requests} parallel allocation requests on 2 processes: {capacity} granted, rest refused")
    assert json.dumps(final)  # the last state is plain JSON


@pytest.fixture
def two_stores(infra: dict[str, str], tmp_path: Path) -> Iterator[tuple[LedgerApplication, LedgerApplication]]:
    """Two ledger applications (as two processes) on one fresh PostgreSQL schema."""
    schema = f"{scratch_namespace('tl')}_billing_ledger"
    with psycopg.connect(infra["DATABASE_URL"], autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    first = LedgerApplication(persistence_env(infra["DATABASE_URL"], str(tmp_path), schema))
    second = LedgerApplication(persistence_env(infra["DATABASE_URL"], str(tmp_path), schema))
    try:
        yield first, second
    finally:
        first.close()
        second.close()
        with psycopg.connect(infra["DATABASE_URL"], autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def funded(tenant: str, usd: str) -> list[LedgerCommand]:
    """Commands opening ``tenant``'s account with a promotional grant of ``usd``."""
    return [command("account.open", tenant, {"currency": "USD"}, "open"),
            command("credit.grant", tenant, {"grant_key": "g", "unit": "USD", "amount": usd, "source": "promotion"},
                    "grant")]


def hold(tenant: str, amount: str, key: str, expires_at: str = "2099-01-01T00:00:00+00:00") -> LedgerCommand:
    return command("hold.place", tenant, {"hold_id": str(uuid.uuid4()), "amount": amount, "expires_at": expires_at},
                   key)


def usage(tenant: str, key: str) -> LedgerCommand:
    return command("usage.debit", tenant, {"unit": "USD", "amount_subunits": U, "meter": "m",
                                           "at": datetime.now(UTC).isoformat()}, key)


def test_chunk_that_loses_a_race_is_decided_again_under_the_lock(
        two_stores: tuple[LedgerApplication, LedgerApplication]) -> None:
    consumer, other = two_stores
    consumer.apply_commands(funded("race", "100"))
    original = consumer.load_many
    raced: list[object] = []

    def load_then_race(*args, **kwargs):  # type: ignore[no-untyped-def]
        loaded = original(*args, **kwargs)
        if not raced:  # another process records the account's next version right after the consumer read it
            raced.append(other.apply_commands([usage("race", "other")]))
        return loaded

    consumer.load_many = load_then_race  # type: ignore[method-assign]
    chunks = [([usage("race", "1"), usage("race", "2")], Tracking("kafka:t:0", 2)),
              ([usage("race", "3")], Tracking("kafka:t:0", 3))]
    results = consumer.apply_chunks(chunks)
    assert raced and [r.outcome for r in results] == ["applied"] * 3
    assert consumer.next_offset("t", 0) == 3 and consumer.contention.recent(time.monotonic())
    assert consumer.chunk_commands_max() < 250  # contended: smaller transactions, decided under the lock
    state = account(other, "race")
    assert state.available("USD") == 96 * U
    versions = [e.originator_version for e in other.events.get(ids.account_id("race"))]
    assert versions == list(range(1, len(versions) + 1))
    # Contended: the next chunks go straight to the lock, and a position already recorded is still refused.
    assert [r.outcome for r in consumer.apply_chunks([([usage("race", "4")], Tracking("kafka:t:0", 4))])] == ["applied"]
    with pytest.raises(IntegrityError):
        consumer.apply_chunks([([usage("race", "5")], Tracking("kafka:t:0", 4))])
    assert account(other, "race").available("USD") == 95 * U


def test_direct_command_that_loses_a_race_is_decided_under_the_lock(
        two_stores: tuple[LedgerApplication, LedgerApplication]) -> None:
    server, other = two_stores
    server.apply_commands(funded("held", "10"))
    assert server.read(ids.account_id("held"), lambda a: a.version)  # cached here, about to go stale
    other.apply_commands([usage("held", f"s{i}") for i in range(9)])  # 9 of the 10 USD
    direct = DirectCommands(server)
    result = direct.apply_group([hold("held", "2", "hold")])[0]
    # Decided on the stored state (1 USD left), not on the stale cached copy (10 USD): refused, and the
    # conflict makes the following decisions go under the lock at once.
    assert result.outcome == "applied" and result.value["status"] == "rejected"
    assert direct.contention.recent(time.monotonic())
    assert account(other, "held").available("USD") == 1 * U


def test_inline_decision_on_a_stale_copy_is_decided_again_under_the_lock(
        two_stores: tuple[LedgerApplication, LedgerApplication]) -> None:
    # An idle ledger decides on the event loop's thread, trusting its cached account: the one-round-trip
    # insert (lock, insert, commit pipelined) must still refuse a stale version, and the writer decides again.
    server, other = two_stores
    server.apply_commands(funded("inline", "10"))
    assert server.read(ids.account_id("inline"), lambda a: a.version)  # cached here, about to go stale
    direct = DirectCommands(server)
    assert direct.inline  # PostgreSQL: idle decisions are made on the caller's thread

    def place(key: str, amount: str) -> LedgerCommand:
        return hold("inline", amount, key)

    first = asyncio.run(direct.decide(place("h1", "1")))
    assert first.outcome == "applied" and first.value["status"] == "active" and direct.inline_decisions == 1
    other.apply_commands([usage("inline", f"s{i}") for i in range(8)])  # 8 of the 9 USD left
    time.sleep(0.01)
    second = asyncio.run(direct.decide(place("h2", "2")))
    # The inline attempt conflicted (nothing written); decided again on the stored state (1 USD): refused.
    assert second.outcome == "applied" and second.value["status"] == "rejected"
    assert direct.inline_decisions == 1 and direct.contention.recent(time.monotonic())
    assert account(other, "inline").available("USD") == 1 * U
    # Contended now: decided under the account's lock at once. The cached copy is stale again; the events
    # recorded since are read in the lock's own round trip (the reader's separate query is not used).
    other.apply_commands([usage("inline", "s8")])
    reads: list[object] = []
    original = server.reader.events_after
    server.reader.events_after = lambda versions: reads.append(versions) or original(versions)  # type: ignore[method-assign]
    third = asyncio.run(direct.decide(place("h3", "0.5")))
    assert third.outcome == "applied" and third.value["status"] == "rejected" and reads == []
    assert account(other, "inline").available("USD") == 0


def test_inserts_are_serialised_so_notification_ids_commit_in_order(
        two_stores: tuple[LedgerApplication, LedgerApplication]) -> None:
    # The relay tails the notification log: a transaction may not commit ids lower than one already
    # committed. Writers serialise on the recorder's insert lock (an advisory lock, not LOCK TABLE); a decision
    # under that lock (the last resort of a contended write) holds it while deciding.
    first, second = two_stores
    first.apply_commands([command("account.open", t, {"currency": "USD"}, "open") for t in ("s1", "s2")])
    finished: list[str] = []

    def insert_second() -> None:
        second.apply_commands([command("credit.grant", "s2", {"grant_key": "g", "unit": "USD", "amount": "1",
                                                              "source": "promotion"}, "grant")])
        finished.append("second")

    writer = threading.Thread(target=insert_second)
    original = first._prepare

    def prepare_slowly(*args, **kwargs):  # type: ignore[no-untyped-def]
        batch = original(*args, **kwargs)
        writer.start()  # the second writer tries to insert while the first holds the lock
        time.sleep(0.5)
        assert not finished, "another writer inserted while the insert lock was held"
        return batch

    first._prepare = prepare_slowly  # type: ignore[method-assign]
    first._apply_locked([command("credit.grant", "s1", {"grant_key": "g", "unit": "USD", "amount": "1",
                                                        "source": "promotion"}, "grant")], None, True, None)
    writer.join(timeout=10)
    assert finished == ["second"]  # it waited for the lock (checked above), then went through
    log = first.process_recorder.select_notifications(1, 1_000)
    ids_by_account = {n.originator_id: n.id for n in log}
    assert ids_by_account[ids.account_id("s1")] < ids_by_account[ids.account_id("s2")]
    assert [n.id for n in log] == list(range(log[0].id, log[0].id + len(log)))  # no gaps


def test_decision_under_account_locks_waits_only_for_writers_of_those_accounts(
        two_stores: tuple[LedgerApplication, LedgerApplication]) -> None:
    # A contended write decides under the locks of its accounts, not the table's: a writer of another account
    # records meanwhile; a writer of the same account waits, then decides on the state the first committed.
    first, second = two_stores
    for tenant in ("mine", "theirs"):
        first.apply_commands(funded(tenant, "10"))
    finished: dict[str, float] = {}

    def write(name: str, commands: list[LedgerCommand], exclusive: bool) -> None:
        results = second.apply_commands(commands, exclusive=exclusive)
        assert [r.outcome for r in results] == ["applied"], results
        finished[name] = time.monotonic()

    other_account = threading.Thread(target=write, args=("theirs", [usage("theirs", "t1")], False))
    same_account = threading.Thread(target=write, args=("mine", [usage("mine", "m2")], True))
    original = first._prepare
    decided: list[float] = []

    def prepare_slowly(*args, **kwargs):  # type: ignore[no-untyped-def]
        batch = original(*args, **kwargs)
        if not decided:
            other_account.start()
            same_account.start()
            time.sleep(0.5)
            assert "theirs" in finished, "a writer of another account waited for this decision"
            assert "mine" not in finished, "a writer of the same account recorded during this decision"
            decided.append(time.monotonic())
        return batch

    first._prepare = prepare_slowly  # type: ignore[method-assign]
    assert [r.outcome for r in first.apply_commands([usage("mine", "m1")], exclusive=True)] == ["applied"]
    same_account.join(timeout=10)
    other_account.join(timeout=10)
    assert finished["mine"] > decided[0]
    assert account(second, "mine").available("USD") == 8 * U  # both debits, each once
    assert account(second, "theirs").available("USD") == 9 * U
    log = first.process_recorder.select_notifications(1, 1_000)
    assert [n.id for n in log] == list(range(log[0].id, log[0].id + len(log)))  # no gaps


def test_locked_decision_that_loses_on_another_aggregate_is_decided_under_the_table_lock_once(
        two_stores: tuple[LedgerApplication, LedgerApplication]) -> None:
    # An allocation changes the tenant's pool, which the account locks do not cover: another process may record
    # the pool first. The insert then fails on the pool's version (nothing written), and the command is decided
    # again under the table's lock, on the pool as the other process left it.
    consumer, other = two_stores

    def allocate(request: str) -> LedgerCommand:
        return command("allocation.allocate", "pool", {"resource": "seats", "quantity": 1, "request_id": request},
                       request)

    consumer.apply_commands([command("allocation.set_capacity", "pool", {"resource": "seats", "capacity": 2}, "cap")])
    original = consumer._prepare
    raced: list[object] = []

    def prepare_then_race(*args, **kwargs):  # type: ignore[no-untyped-def]
        batch = original(*args, **kwargs)
        if not raced:  # another process records the pool's next version while this one decides
            raced.append(other.apply_commands([allocate("user-2")]))
        return batch

    consumer._prepare = prepare_then_race  # type: ignore[method-assign]
    first = consumer.apply_commands([allocate("user-1")], Tracking("kafka:p:0", 1), exclusive=True)
    assert raced and first[0].outcome == "applied" and first[0].value["allocated"] and first[0].value["in_use"] == 2
    consumer._prepare = original  # type: ignore[method-assign]
    third = consumer.apply_commands([allocate("user-3")], Tracking("kafka:p:0", 2), exclusive=True)
    assert third[0].outcome == "applied" and not third[0].value["allocated"]  # full: user-1 counted once
    recorded = consumer.reader.events_after({c.command_id: 0 for c in (allocate("user-1"), allocate("user-2"))})
    assert sorted(len(events) for events in recorded.values()) == [1, 1]  # one receipt each
    assert consumer.next_offset("p", 0) == 2


def test_position_not_beyond_the_recorded_one_is_refused_and_nothing_is_written(
        two_stores: tuple[LedgerApplication, LedgerApplication]) -> None:
    # Lock, position, insert and commit go in one round trip: a refused position must abort the whole
    # transaction (the insert after it included), deciding optimistically or under locks alike.
    store, _ = two_stores
    store.apply_commands([command("account.open", "pos", {"currency": "USD"}, "open")], Tracking("kafka:q:0", 5))
    for offset in (5, 4):
        for exclusive in (False, True):
            grant = command("credit.grant", "pos", {"grant_key": f"g{offset}{exclusive}", "unit": "USD",
                                                    "amount": "1", "source": "promotion"}, f"grant{offset}{exclusive}")
            with pytest.raises(IntegrityError):
                store.apply_commands([grant], Tracking("kafka:q:0", offset), exclusive=exclusive)
            assert store.reader.events_after({grant.command_id: 0}) == {}  # no receipt either
    assert store.next_offset("q", 0) == 5 and account(store, "pos").available("USD") == 0
    grant = command("credit.grant", "pos", {"grant_key": "g", "unit": "USD", "amount": "1", "source": "promotion"}, "g")
    assert store.apply_commands([grant], Tracking("kafka:q:0", 6))[0].outcome == "applied"
    assert store.next_offset("q", 0) == 6 and account(store, "pos").available("USD") == 1 * U


def test_locked_decision_on_accounts_changed_elsewhere_keeps_the_contention(
        two_stores: tuple[LedgerApplication, LedgerApplication]) -> None:
    # Contention lasts while another writer keeps changing the accounts, not just a window after the last lost
    # race: a decision under the locks that reads events another process recorded since the account was
    # cached renews it (else the next optimistic write would lose again, and its accounts be replayed).
    server, other = two_stores
    server.apply_commands(funded("busy", "10"))
    assert server.read(ids.account_id("busy"), lambda a: a.version)  # cached here
    contention = Contention(window_seconds=60)
    server.apply_commands([usage("busy", "1")], exclusive=True, contention=contention)
    assert not contention.recent(time.monotonic())  # the cached copy was current
    other.apply_commands([usage("busy", "2")])
    server.apply_commands([usage("busy", "3")], exclusive=True, contention=contention)
    assert contention.recent(time.monotonic())
    assert account(other, "busy").available("USD") == 7 * U


def test_a_sweep_expires_due_holds_while_another_process_keeps_holding_on_the_same_accounts(
        two_stores: tuple[LedgerApplication, LedgerApplication]) -> None:
    """Another process places a hold on an account the sweeper is deciding on, at that very moment: the sweep
    cannot lose the race (it decides under its accounts' locks; deciding optimistically it lost whenever any
    account changed meanwhile, and under steady holds every round did, so expired holds kept their credit),
    and the other hold (an HTTP decision: decided again on a lost race) waits for it, then lands too."""
    sweeping, other = two_stores
    now = datetime.now(UTC)
    tenants = [f"swept{i}" for i in range(3)]
    for tenant in tenants:
        sweeping.apply_commands([
            *funded(tenant, "10"),
            hold(tenant, "4", "hold", expires_at=(now + timedelta(seconds=1)).isoformat())])
    original = sweeping.load_many
    racing: list[threading.Thread] = []
    raced: list[object] = []

    def load_then_race(*args, **kwargs):  # type: ignore[no-untyped-def]
        loaded = original(*args, **kwargs)
        if not racing and list(args[1] if len(args) > 1 else kwargs.get("receipt_ids", ())):
            # The sweep is deciding (it reads its commands' receipts): another process holds on one of its
            # accounts now, in a thread of its own (it may have to wait for the sweep).
            late = hold(tenants[1], "1", "late", expires_at=(now + timedelta(hours=1)).isoformat())
            racing.append(threading.Thread(target=lambda: raced.append(DirectCommands(other).apply_group([late]))))
            racing[0].start()
            time.sleep(0.2)  # long enough for the other insert to commit, unless it must wait
        return loaded

    sweeping.load_many = load_then_race  # type: ignore[method-assign]
    assert Sweeper(sweeping).sweep(now + timedelta(seconds=5)) == 3
    racing[0].join(timeout=30)
    assert [r.outcome for r in raced[0]] == ["applied"]  # type: ignore[attr-defined]
    for tenant, held in zip(tenants, (0, 1, 0), strict=True):
        state = account(other, tenant)
        assert state.held("USD") == held * U and state.available("USD") == (10 - held) * U, tenant


def test_a_hold_on_an_account_the_sweeper_is_deciding_on_in_the_same_process_waits_for_its_turn(
        two_stores: tuple[LedgerApplication, LedgerApplication], monkeypatch: pytest.MonkeyPatch) -> None:
    """In one process, a hold that arrives while the sweeper decides on its account gets the account with the
    sweep committed in it (aggregate_cache.py: turns) instead of replaying it from the store and then losing
    the race to the sweep's commit: no conflict, no read of the account's events by the hold."""
    import billing_ledger.application as application_module

    monkeypatch.setattr(application_module, "AGGREGATE_RETURN_WAIT_SECONDS", 30.0)  # a slow machine never times out
    app, _ = two_stores
    now = datetime.now(UTC)
    app.apply_commands([*funded("turns", "10"), hold("turns", "4", "due", expires_at=(now + timedelta(seconds=1)).isoformat())])
    direct = DirectCommands(app)
    account_id = ids.account_id("turns")
    read_by_hold: list[object] = []
    original_read = app.reader.events_after

    def events_after(versions, *args, **kwargs):  # type: ignore[no-untyped-def]
        if threading.current_thread().name == "hold":
            read_by_hold.extend(i for i in versions if i == account_id)
        return original_read(versions, *args, **kwargs)

    monkeypatch.setattr(app.reader, "events_after", events_after)
    original_load = app.load_many
    racing: list[threading.Thread] = []
    raced: list[object] = []

    def load_then_race(*args, **kwargs):  # type: ignore[no-untyped-def]
        loaded = original_load(*args, **kwargs)
        if not racing and threading.current_thread().name != "hold" and account_id in loaded:
            late = hold("turns", "1", "late", expires_at=(now + timedelta(hours=1)).isoformat())
            racing.append(threading.Thread(target=lambda: raced.append(direct.apply_group([late])), name="hold"))
            racing[0].start()
            time.sleep(0.1)  # the sweep is still deciding: the hold waits for its turn
        return loaded

    monkeypatch.setattr(app, "load_many", load_then_race)
    assert Sweeper(app).sweep(now + timedelta(seconds=5)) == 1
    racing[0].join(timeout=30)
    assert [r.outcome for r in raced[0]] == ["applied"]  # type: ignore[attr-defined]
    assert read_by_hold == [] and not direct.contention.recent(time.monotonic())
    state = account(app, "turns")
    assert state.held("USD") == 1 * U and state.available("USD") == 9 * U


def test_another_process_loads_a_busy_account_from_its_latest_snapshot(
        two_stores: tuple[LedgerApplication, LedgerApplication], monkeypatch: pytest.MonkeyPatch) -> None:
    """Snapshots on PostgreSQL (snapshots.py: one LATERAL query for the latest snapshots of many aggregates):
    the other process reads only the events after the latest snapshot, including those it did not see, and
    has the account exactly as its whole stream replays; the audit agrees."""
    from billing_ledger import snapshots

    writer, reader = two_stores
    assert writer.snapshotter is not None and reader.snapshotter is not None
    writer.snapshotter.interval_events = 10
    monkeypatch.setattr(snapshots, "SNAPSHOT_STATE_BYTES_PER_EVENT", 10**9)  # every 10 events, whatever the size
    writer.apply_commands(funded("busy", "1000"))
    for n in range(30):
        writer.apply_commands([usage("busy", f"u{n}"), hold("busy", "1", f"h{n}")], Tracking("kafka:s:0", n))
    account_id = ids.account_id("busy")
    assert writer.snapshots is not None
    writer.snapshotter.flush()  # written by a thread of its own
    taken = [s.originator_version for s in writer.snapshots.recorder.select_events(account_id)]
    assert len(taken) >= 4 and taken[-1] >= 50
    writer.snapshotter.interval_events = 10_000  # the next events are not snapshotted
    writer.apply_commands([usage("busy", "after")])
    asked: list[dict[uuid.UUID, int]] = []
    events_after = reader.reader.events_after
    reader.reader.events_after = lambda versions: asked.append(dict(versions)) or events_after(versions)  # type: ignore[method-assign]
    loaded = reader.load_many([account_id, ids.account_id("nobody")])
    assert asked == [{account_id: taken[-1], ids.account_id("nobody"): 0}] and loaded[ids.account_id("nobody")] is None
    full = None
    for event in reader.events.get(account_id):
        full = event.mutate(full)
    assert full is not None and loaded[account_id].version == full.version
    assert state_of(reader, loaded[account_id]) == state_of(reader, full)
    assert loaded[account_id].available("USD") == 1000 * U - 31 * U - 30 * U
    assert verify_store(reader, "busy").ok


def test_a_mass_expiry_locks_few_accounts_at_a_time(two_stores: tuple[LedgerApplication, LedgerApplication],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Holds of several accounts expiring together are swept in transactions of at most
    SWEEP_DECISIONS_PER_TRANSACTION_MAX expiries (each decided under its accounts' locks), all released once."""
    from billing_ledger import sweeper as sweeper_module

    monkeypatch.setattr(sweeper_module, "SWEEP_DECISIONS_PER_TRANSACTION_MAX", 12)
    app, _ = two_stores
    soon = datetime.now(UTC) + timedelta(seconds=1)
    for t in range(4):
        app.apply_commands(funded(f"mass{t}", "100"))
        app.apply_commands([hold(f"mass{t}", "1", f"m{t}-{k}", expires_at=soon.isoformat()) for k in range(5)])
    decided: list[int] = []
    apply_commands = app.apply_commands

    def counted(commands, *args, **kwargs):  # type: ignore[no-untyped-def]
        decided.append(len(commands))
        return apply_commands(commands, *args, **kwargs)

    monkeypatch.setattr(app, "apply_commands", counted)
    assert Sweeper(app).sweep(soon + timedelta(seconds=1)) == 4
    assert decided == [2, 2]  # 5 expiries per account: two accounts (10) per transaction
    for t in range(4):
        assert account(app, f"mass{t}").held("USD") == 0 and account(app, f"mass{t}").available("USD") == 100 * U


def test_ledger_processes_starting_together_set_their_store_up_once(infra: dict[str, str], tmp_path: Path) -> None:
    """Three ledger processes starting at the same moment on a new schema (and then again on the existing one)
    all come up: without the set-up lock, PostgreSQL's concurrent DDL failed them with duplicate pg_type keys
    (every round of 8 tried) or "tuple concurrently updated"."""
    schema = f"{scratch_namespace('tl')}_billing_ledger"
    with psycopg.connect(infra["DATABASE_URL"], autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        for _ in range(2):  # a new schema, then an existing one
            barrier = threading.Barrier(3)

            def start(barrier: threading.Barrier = barrier) -> LedgerApplication:
                barrier.wait()
                return LedgerApplication(persistence_env(infra["DATABASE_URL"], str(tmp_path), schema))

            with ThreadPoolExecutor(3) as pool:
                apps = [f.result() for f in [pool.submit(start) for _ in range(3)]]
            try:
                assert apps[0].apply_commands(funded(f"t{uuid.uuid4().hex[:6]}", "1"))[0].outcome == "applied"
            finally:
                for app in apps:
                    app.close()
    finally:
        with psycopg.connect(infra["DATABASE_URL"], autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')

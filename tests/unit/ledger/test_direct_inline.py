"""Direct decisions on the event loop's own thread when the ledger is idle (``DirectCommands.decide``)."""

from __future__ import annotations

import asyncio
import time
import uuid

from billing_events import ids
from billing_events.money import SUBUNITS_PER_UNIT
from billing_ledger.application import LedgerApplication
from billing_ledger.direct import DirectCommands

from tests.unit.ledger.ledger_support import command, open_account

U = SUBUNITS_PER_UNIT


def hold(tenant: str, key: str, amount: str) -> object:
    return command("hold.place", tenant, {"hold_id": str(uuid.uuid4()), "amount": amount,
                                          "expires_at": "2099-01-01T00:00:00+00:00"}, key)


def cache_account(app: LedgerApplication, tenant: str) -> None:
    assert app.read(ids.account_id(tenant), lambda a: a.version)


def test_idle_ledger_decides_on_the_loop_thread_without_the_writer(app: LedgerApplication) -> None:
    open_account(app, "acme", {"key": "g", "amount": "10.00"})
    cache_account(app, "acme")
    direct = DirectCommands(app, inline=True)
    result = asyncio.run(direct.decide(hold("acme", "h1", "4.00")))  # type: ignore[arg-type]
    assert result.outcome == "applied" and result.value["status"] == "active"
    assert direct.inline_decisions == 1 and direct._writer is None  # no thread hand-over
    assert app.read(ids.account_id("acme"), lambda a: a.available("USD")) == 6 * U


def test_uncached_account_recent_conflict_or_a_busy_moment_go_to_the_writer(app: LedgerApplication) -> None:
    open_account(app, "acme", {"key": "g", "amount": "10.00"})
    app.cache.clear()
    direct = DirectCommands(app, inline=True)

    async def scenario() -> None:
        assert (await direct.decide(hold("acme", "a", "1.00"))).outcome == "applied"  # type: ignore[arg-type]
        assert direct.inline_decisions == 0 and direct._writer is not None  # not in memory: the writer read it
        await asyncio.sleep(0.01)
        direct.contention.conflicted(time.monotonic())
        assert (await direct.decide(hold("acme", "b", "1.00"))).outcome == "applied"  # type: ignore[arg-type]
        assert direct.inline_decisions == 0  # another writer is changing accounts: decided under the lock
        direct.contention = type(direct.contention)(0.0)
        direct._finished_at = time.monotonic()  # a decision just finished: requests are arriving together
        assert (await direct.decide(hold("acme", "c", "1.00"))).outcome == "applied"  # type: ignore[arg-type]
        assert direct.inline_decisions == 0
        await asyncio.sleep(0.01)
        assert (await direct.decide(hold("acme", "d", "1.00"))).outcome == "applied"  # type: ignore[arg-type]
        assert direct.inline_decisions == 1

    asyncio.run(scenario())
    assert app.read(ids.account_id("acme"), lambda a: a.available("USD")) == 6 * U


def test_inline_refusal_is_decided_again_by_the_writer_on_stored_state(app: LedgerApplication) -> None:
    open_account(app, "acme", {"key": "g", "amount": "10.00"})
    cache_account(app, "acme")
    direct = DirectCommands(app, inline=True)
    release = command("hold.release", "acme", {"hold_id": str(uuid.uuid4())}, "nothing")
    result = asyncio.run(direct.decide(release))
    assert result.outcome == "rejected" and result.reason is not None
    assert direct.inline_decisions == 0 and direct._writer is not None


def test_sqlite_decides_through_the_writer_by_default(app: LedgerApplication) -> None:
    assert DirectCommands(app).inline is False  # only where a commit is one pipelined round trip (PostgreSQL)


def test_an_account_taken_by_another_thread_after_the_check_is_not_read_from_the_store_on_the_loop(
        app: LedgerApplication, monkeypatch: object) -> None:
    """The race between ``_may_decide_inline`` (the account is cached) and the attempt's take (another thread,
    such as the sweeper, took it first): the loop's thread must not replay the account from the store; the
    writer waits for its turn and decides on the aggregate the other thread puts back."""
    import threading

    open_account(app, "acme", {"key": "g", "amount": "10.00"})
    cache_account(app, "acme")
    account = ids.account_id("acme")
    direct = DirectCommands(app, inline=True)
    direct._may_decide_inline = lambda command, aggregate_id: True  # type: ignore[method-assign]  # checked: cached
    reads: list[str] = []
    events_after = app.reader.events_after

    def recorded(versions: object) -> object:
        reads.append(threading.current_thread().name)
        return events_after(versions)  # type: ignore[arg-type]

    monkeypatch.setattr(app.reader, "events_after", recorded)  # type: ignore[attr-defined]
    taken, done = threading.Event(), threading.Event()

    def sweeper() -> None:  # takes the account, decides for a moment, puts it back unchanged
        aggregate = app.cache.take(account)
        taken.set()
        time.sleep(0.05)
        app.cache.put(aggregate)
        done.set()

    other = threading.Thread(target=sweeper, name="sweeper")
    other.start()
    assert taken.wait(5)
    loop_thread = threading.current_thread().name
    result = asyncio.run(direct.decide(hold("acme", "h1", "4.00")))  # type: ignore[arg-type]
    other.join(5)
    assert result.outcome == "applied" and result.value["status"] == "active"
    assert direct.inline_decisions == 0 and direct._writer is not None  # decided by the writer, after its turn
    assert loop_thread not in reads  # nothing was replayed on the event loop's thread
    assert reads == []  # the writer got the aggregate the sweeper put back: no replay at all
    assert app.read(account, lambda a: a.available("USD")) == 6 * U

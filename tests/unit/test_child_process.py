"""A service's supervised child process (billing_runtime.child) and the ledger's leadership reports over a pipe."""

from __future__ import annotations

import asyncio
import os
import sys
import time

import pytest
from billing_ledger.leader import LeaderReports, ReportedLeadership
from billing_runtime.child import ChildProcess


class Script(ChildProcess):
    def __init__(self, code: str, stop_seconds: float = 5.0) -> None:
        super().__init__("script", stop_seconds)
        self.code = code

    def command(self) -> list[str]:
        return [sys.executable, "-c", self.code]


def test_a_child_that_exits_on_its_own_fails_the_parent() -> None:
    async def main() -> None:
        with pytest.raises(RuntimeError, match="the script process exited with 3"):
            await Script("import sys; sys.exit(3)").run(asyncio.Event())

    asyncio.run(main())


def test_stopping_sends_sigterm_and_the_child_finishes() -> None:
    code = ("import signal, sys, time\n"
            "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
            "time.sleep(60)\n")

    async def main() -> int | None:
        child, stopping = Script(code), asyncio.Event()
        task = asyncio.create_task(child.run(stopping))
        await asyncio.sleep(0.5)
        assert await child.ready()
        stopping.set()
        await task
        assert child.process is not None
        return child.process.returncode

    assert asyncio.run(main()) == 0


def test_a_child_that_ignores_sigterm_is_killed_after_its_stop_time() -> None:
    code = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(60)\n"

    async def main() -> int | None:
        child, stopping = Script(code, stop_seconds=0.5), asyncio.Event()
        task = asyncio.create_task(child.run(stopping))
        await asyncio.sleep(0.5)
        stopping.set()
        await asyncio.wait_for(task, 10)
        assert child.process is not None
        return child.process.returncode

    assert asyncio.run(main()) == -9


def test_a_child_sees_its_parent_go_when_stdin_closes() -> None:
    code = ("import asyncio\n"
            "from billing_runtime.child import watch_parent\n"
            "async def main():\n"
            "    stop = asyncio.Event()\n"
            "    watch_parent(asyncio.get_running_loop(), stop)\n"
            "    await asyncio.wait_for(stop.wait(), 20)\n"
            "asyncio.run(main())\n")

    async def main() -> int:
        process = await asyncio.create_subprocess_exec(sys.executable, "-c", code, stdin=asyncio.subprocess.PIPE)
        await asyncio.sleep(0.5)
        assert process.stdin is not None
        process.stdin.close()  # what the parent's death does
        return await asyncio.wait_for(process.wait(), 20)

    assert asyncio.run(main()) == 0


def test_leadership_follows_the_latest_fresh_report_and_ends_with_the_pipe() -> None:
    read, write = os.pipe()
    leadership, reports = ReportedLeadership(read), LeaderReports(write)

    def held() -> bool:
        return asyncio.run(leadership.is_held())

    def settle(expected: bool) -> bool:
        deadline = time.monotonic() + 5
        while held() is not expected and time.monotonic() < deadline:
            time.sleep(0.01)
        return held()

    assert held() is False  # nothing reported yet
    reports.report(True)
    assert settle(True) is True
    reports.report(False)
    assert settle(False) is False
    reports.report(True)
    assert settle(True) is True
    os.close(write)  # the relay process is gone
    assert settle(False) is False

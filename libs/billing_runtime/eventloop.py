"""The event loop the long-running services run on: uvloop (libuv), where available.

uvloop makes every socket operation cheaper (Kafka fetches and produces, PostgreSQL round trips, HTTP
requests); with httptools as uvicorn's parser a request costs ~0.3 ms less CPU. ``BILLING_EVENT_LOOP=asyncio``
falls back to the standard loop (e.g. to compare, or under a debugger that needs it).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on uvloop unless ``BILLING_EVENT_LOOP=asyncio`` (or uvloop is missing)."""
    if os.environ.get("BILLING_EVENT_LOOP", "uvloop") != "asyncio":
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency; a platform without it still runs
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)

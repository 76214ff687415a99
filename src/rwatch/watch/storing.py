"""How the watcher's rooms call the cursor store: each call retried under the STORE policy, with one
``store_failed`` error per failure, until it succeeds or its scope's stop signal is set (then ``Stopping``)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from rwatch.errors import StoreError
from rwatch.retry import STORE, log_retry, retrying

T = TypeVar("T")


async def stored(op: Callable[[], Awaitable[T]], *, stop: asyncio.Event, log: Any) -> T:
    """``op()``'s result, retried while the store fails; raises ``Stopping`` once ``stop`` is set."""
    async def attempt() -> T:  # a coroutine function: tenacity awaits only those
        return await op()

    result: T = await retrying(STORE, stop=stop, on=(StoreError,),
                               before_sleep=log_retry(log, "store_failed", level="error"))(attempt)
    return result

"""The tasks of one call: started by name, cancelled together when the call ends.

Owns: the set of running tasks, their names (`call-<id>-<what>`, as logs and leak checks see them), and handing a
task that failed to its owner's `on_failure` (the call logs it, tells its client and ends).
Must not touch: anything else of the call; it never decides what a failure means.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable


class Tasks:
    __slots__ = ("_prefix", "_on_failure", "_running")

    def __init__(self, prefix: str, on_failure: Callable[[asyncio.Task], None]) -> None:
        self._prefix = prefix
        self._on_failure = on_failure
        self._running: set[asyncio.Task] = set()

    def spawn(self, coro: Awaitable[None], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(f"{self._prefix}-{name}")
        self._running.add(task)
        task.add_done_callback(self._done)

    def __len__(self) -> int:
        return len(self._running)

    async def cancel_all(self) -> None:
        tasks = list(self._running)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _done(self, task: asyncio.Task) -> None:
        self._running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._on_failure(task)

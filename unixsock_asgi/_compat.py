"""Small shims so that the library runs on Python 3.10 as well as 3.11+."""

from __future__ import annotations

import asyncio
import sys
from types import TracebackType
from typing import Any

__all__ = ["cancelled_from_outside", "timeout", "uncancel"]


class _Timeout:
    """``asyncio.timeout`` for Python 3.10: cancel the current task at a deadline."""

    def __init__(self, delay: float | None) -> None:
        self._delay = delay
        self._handle: asyncio.TimerHandle | None = None
        self._expired = False

    async def __aenter__(self) -> _Timeout:
        if self._delay is not None:
            task = asyncio.current_task()
            assert task is not None
            self._handle = asyncio.get_running_loop().call_later(self._delay, self._expire, task)
        return self

    def _expire(self, task: asyncio.Task[Any]) -> None:
        self._expired = True
        task.cancel()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._handle is not None:
            self._handle.cancel()
        if self._expired and exc_type is asyncio.CancelledError:
            raise TimeoutError from exc


if sys.version_info >= (3, 11):
    timeout = asyncio.timeout
else:  # pragma: no cover - exercised on 3.10 only
    timeout = _Timeout


def uncancel(task: asyncio.Task[Any]) -> None:
    """Withdraw a cancellation request that was handled (a no-op on 3.10, which does not count them)."""
    if sys.version_info >= (3, 11):
        task.uncancel()


def cancelled_from_outside() -> bool:
    """Whether the running task has been asked to stop (``Task.cancel``: a timeout, a hang-up),
    as against a ``CancelledError`` that the code it awaited raised on its own (a task of
    its own that was cancelled, say). Python 3.10 does not count the requests: always true."""
    task = asyncio.current_task()
    if sys.version_info < (3, 11) or task is None:
        return True
    return task.cancelling() > 0

"""asyncio support: wait for a ring without blocking or polling the event loop.

One daemon thread per queue and direction sleeps in the ring's own futex
protocol (the same wake-up the blocking calls use) and completes the futures
of the coroutines waiting on it. The coroutines then take or put the message
themselves, in the event loop, with the non-blocking call: a cancelled
coroutine has taken nothing, so cancellation never loses a message.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable

from shmq._errors import Closed, ShmqError

_SLICE_S = 0.25  # the waiter thread re-reads its list of waiters this often
_IDLE_EXIT_S = 10.0  # a waiter thread with nothing to wait for ends after this long


class _Entry:
    __slots__ = ("future", "loop", "nbytes")

    def __init__(self, nbytes: int, loop: asyncio.AbstractEventLoop, future: asyncio.Future[bool]) -> None:
        self.nbytes = nbytes
        self.loop = loop
        self.future = future


def _resolve(future: asyncio.Future[bool], ready: bool = True) -> None:
    if not future.done():
        future.set_result(ready)


class RingWaiter:
    """Wakes coroutines when `ready(nbytes, timeout)` says the ring may be ready.

    `ready` blocks with the GIL released for at most `timeout` seconds and
    returns whether the condition holds (Ring.wait_readable / wait_writable).
    """

    def __init__(self, ready: Callable[[int, float], bool], label: str) -> None:
        self._ready = ready
        self._label = label
        self._cond = threading.Condition()
        self._entries: list[_Entry] = []
        self._thread: threading.Thread | None = None
        self._closed = False

    async def wait(self, nbytes: int, timeout: float | None) -> bool:
        """Return True when the ring may be ready, False when `timeout` passed first."""
        loop = asyncio.get_running_loop()
        entry = _Entry(nbytes, loop, loop.create_future())
        with self._cond:
            if self._closed:
                raise Closed(f"queue {self._label!r} is closed")
            self._entries.append(entry)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"shmq-wait-{self._label}", daemon=True
                )
                self._thread.start()
            self._cond.notify()
        # A plain future and call_later, not asyncio.wait_for: in Python 3.11
        # wait_for can return the result when a cancel() races with completion,
        # which would make the caller take a message after cancel() said True.
        timer = None if timeout is None else loop.call_later(timeout, _resolve, entry.future, False)
        try:
            return await entry.future
        finally:
            if timer is not None:
                timer.cancel()
            with self._cond, contextlib.suppress(ValueError):
                self._entries.remove(entry)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            entries, self._entries = self._entries, []
            self._cond.notify()
        for entry in entries:
            with contextlib.suppress(RuntimeError):  # loop already closed
                entry.loop.call_soon_threadsafe(_resolve, entry.future)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._entries and not self._closed:
                    # An idle thread ends (the next wait() starts another), so it does not
                    # keep a queue that nobody closed alive forever.
                    if not self._cond.wait(timeout=_IDLE_EXIT_S) and not self._entries:
                        self._thread = None
                        return
                if self._closed:
                    return
                need = min(e.nbytes for e in self._entries)
            try:
                if not self._ready(need, _SLICE_S):
                    continue
            except ShmqError:  # closed under us: wake everyone so they see it
                self.close()
                return
            with self._cond:
                woken = [e for e in self._entries if e.nbytes <= need or self._ready(e.nbytes, 0)]
                for e in woken:
                    self._entries.remove(e)
            for e in woken:
                with contextlib.suppress(RuntimeError):
                    e.loop.call_soon_threadsafe(_resolve, e.future)

"""In-process fan-out of committed changes to watchers.

Writers publish from their worker thread, in commit order (they hold the write lock), right
after COMMIT; watchers run on the event loop. A bounded buffer of recent events serves live
watchers without touching storage. A watcher that starts further back than the buffer (after
a restart, or after falling behind) pages through the durable change log instead. Either way
a watcher only ever asks "what comes after the last revision I delivered?", so a change
committed between its replay and its switch to live delivery cannot be skipped or repeated.

Watchers in other processes are not woken: a PostgreSQL backend would send NOTIFY in the
write transaction and LISTEN here, with the same read-after-last-revision loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from verity.store.base import WatchEvent

# (after_revision, limit) -> the next events of the durable change log, in revision order
ReadLog = Callable[[int, int], Awaitable[list[WatchEvent]]]


class ChangeFeed:
    def __init__(self, read_log: ReadLog, *, capacity: int = 1024, page_size: int = 500) -> None:
        self._read_log = read_log
        self._capacity = capacity
        self._page_size = page_size
        self._lock = threading.Lock()  # publish() runs on writer threads
        self._buffer: deque[WatchEvent] = deque()
        self._floor = 0  # every change after this revision is in the buffer
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup = asyncio.Event()
        self._closed = False

    def start(self, loop: asyncio.AbstractEventLoop, revision: int) -> None:
        """Begin buffering live changes that follow revision (the store's revision at open)."""
        with self._lock:
            self._loop = loop
            self._floor = revision
            self._buffer.clear()
            self._closed = False
            self._wakeup = asyncio.Event()

    def publish(self, events: Sequence[WatchEvent]) -> None:
        """Record committed events; callable from any thread, must be called in commit order."""
        if not events:
            return
        with self._lock:
            self._buffer.extend(events)
            while len(self._buffer) > self._capacity:
                self._floor = self._buffer.popleft().revision
            loop = self._loop
        self._wake_soon(loop)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            loop = self._loop
        self._wake_soon(loop)

    def _wake_soon(self, loop: asyncio.AbstractEventLoop | None) -> None:
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._wake)
        except RuntimeError:
            pass  # the loop is closed: nobody is left waiting

    def _wake(self) -> None:
        # A fresh Event per wake-up: a watcher that grabbed the old one before checking for
        # news is woken by the set() below even if the news arrived after its check.
        woken, self._wakeup = self._wakeup, asyncio.Event()
        woken.set()

    def _buffered_after(self, revision: int) -> list[WatchEvent] | None:
        """Buffered events after revision, or None when the buffer does not reach back that far."""
        with self._lock:
            if revision < self._floor:
                return None
            newer: list[WatchEvent] = []
            for event in reversed(self._buffer):
                if event.revision <= revision:
                    break
                newer.append(event)
        newer.reverse()
        return newer

    async def follow(self, after: int) -> AsyncIterator[WatchEvent]:
        """Every change after revision `after`, then live changes, until the feed closes."""
        last = after
        while not self._closed:
            wakeup = self._wakeup
            batch = self._buffered_after(last)
            if batch is None:
                batch = await self._read_log(last, self._page_size)
            for event in batch:
                yield event
                last = event.revision
            if not batch:
                await wakeup.wait()

"""The reconcile queue and each job's next tick.

`WorkQueue`: triggers (a FineTuneJob event, a child's watch event, a progress report, a tick)
only `add()` a key; a fixed pool of worker threads takes keys off the queue. A key is in the
queue at most once (a second add while it waits only merges its "poll" wish) and is never
worked on by two threads at once (an add while it is being worked on queues it again for after);
`add_after()` re-adds a key later (a retry). So a burst of 2,000 new FineTuneJobs is 2,000 queue
entries worked through by `workers` threads, and a storm of child events for one job is one
reconcile.

`Ticks`: when each job should be looked at again without an event, decided after every reconcile
(handlers.next_tick): a running stage at its own pace (the seconds of one training step, within
[poll interval, max poll interval]) with a /progress poll, a waiting one at the slower resync
interval, a finished one only when its TTL clean-up is due, and otherwise never. A tick is
driven by the job's kopf daemon (an asyncio task that sleeps until the tick, woken early when the
tick moves), so ticks stop with kopf's daemons — when the FineTuneJob is deleted, and while a
peering replica of higher priority is active — and the queue works only on keys whose daemon
runs (`Ticks.attached`).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import threading
import time
from typing import Callable

log = logging.getLogger("kubetune.operator")

Key = tuple[str, str]


class WorkQueue:
    def __init__(self, handler: Callable[[Key, bool], None], workers: int = 16, name: str = "kubetune-reconcile"):
        self.handler = handler
        self.workers = workers
        self.name = name
        self._cond = threading.Condition()
        self._pending: dict[Key, bool] = {}  # insertion-ordered: FIFO; value = poll wanted
        self._active: set[Key] = set()
        self._again: dict[Key, bool] = {}  # added while being worked on
        self._later: list[tuple[float, int, Key, bool]] = []  # heap of (when, seq, key, poll)
        self._seq = 0
        self._stopped = False
        self._threads: list[threading.Thread] = []
        self.done = 0  # keys worked on

    def add(self, key: Key, poll: bool = False) -> None:
        with self._cond:
            if key in self._active:
                self._again[key] = self._again.get(key, False) or poll
                return
            self._pending[key] = self._pending.get(key, False) or poll
            self._cond.notify()

    def add_after(self, key: Key, delay: float, poll: bool = False) -> None:
        with self._cond:
            self._seq += 1
            heapq.heappush(self._later, (time.monotonic() + max(0.0, delay), self._seq, key, poll))
            self._cond.notify()

    def depth(self) -> int:
        with self._cond:
            return len(self._pending) + len(self._again)

    def delayed(self) -> int:
        with self._cond:
            return len(self._later)

    def start(self) -> None:
        for i in range(self.workers):
            t = threading.Thread(target=self._work, name=f"{self.name}-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def _take(self) -> tuple[Key, bool] | None:
        with self._cond:
            while not self._stopped:
                now = time.monotonic()
                while self._later and self._later[0][0] <= now:
                    _, _, key, poll = heapq.heappop(self._later)
                    if key in self._active:
                        self._again[key] = self._again.get(key, False) or poll
                    else:
                        self._pending[key] = self._pending.get(key, False) or poll
                if self._pending:
                    key = next(iter(self._pending))
                    poll = self._pending.pop(key)
                    self._active.add(key)
                    return key, poll
                timeout = (self._later[0][0] - now) if self._later else None
                self._cond.wait(timeout)
            return None

    def _work(self) -> None:
        while True:
            got = self._take()
            if got is None:
                return
            key, poll = got
            try:
                self.handler(key, poll)
            except Exception:  # noqa: BLE001 — the handler decides retries; a worker must survive
                log.exception("reconcile of %s/%s failed", *key)
            finally:
                with self._cond:
                    self._active.discard(key)
                    self.done += 1
                    if key in self._again:
                        self._pending[key] = self._pending.get(key, False) or self._again.pop(key)
                        self._cond.notify()


class Ticks:
    """Each key's next tick (monotonic time, poll wanted), and the daemons that wait for them."""

    def __init__(self):
        self._guard = threading.Lock()
        self._due: dict[Key, tuple[float, bool]] = {}
        self._waiters: dict[Key, tuple[asyncio.AbstractEventLoop, asyncio.Event]] = {}

    def set(self, key: Key, delay: float | None, poll: bool = False) -> None:
        """The next tick of `key` in `delay` seconds (None: no tick until an event)."""
        with self._guard:
            if delay is None:
                self._due.pop(key, None)
            else:
                self._due[key] = (time.monotonic() + max(0.0, delay), poll)
            waiter = self._waiters.get(key)
        if waiter is not None:
            loop, event = waiter
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the loop is closed (shutting down)
                pass

    def due_in(self, key: Key) -> float | None:
        with self._guard:
            due = self._due.get(key)
        return None if due is None else due[0] - time.monotonic()

    def take(self, key: Key) -> bool | None:
        """If `key`'s tick is due: clear it and return its poll wish; else None."""
        with self._guard:
            due = self._due.get(key)
            if due is None or due[0] > time.monotonic():
                return None
            del self._due[key]
            return due[1]

    def attach(self, key: Key) -> asyncio.Event:
        event = asyncio.Event()
        with self._guard:
            self._waiters[key] = (asyncio.get_running_loop(), event)
        return event

    def detach(self, key: Key) -> None:
        with self._guard:
            self._waiters.pop(key, None)

    def attached(self, key: Key) -> bool:
        with self._guard:
            return key in self._waiters

    def forget(self, key: Key) -> None:
        with self._guard:
            self._due.pop(key, None)

    def sizes(self) -> dict[str, int]:
        with self._guard:
            return {"ticks": len(self._due), "daemons": len(self._waiters)}

    async def run(self, key: Key, stopped, enqueue: Callable[[Key, bool], None]) -> None:
        """A job's daemon body: enqueue a reconcile now (a new object, an operator start, a
        peering resume), then one at each due tick, until kopf stops the daemon."""
        event = self.attach(key)
        try:
            enqueue(key, False)
            while not stopped:
                event.clear()
                left = self.due_in(key)
                if left is not None and left <= 0:
                    poll = self.take(key)
                    if poll is not None:
                        enqueue(key, poll)
                    continue
                waits = [asyncio.ensure_future(event.wait()), asyncio.ensure_future(_until(stopped))]
                try:
                    await asyncio.wait(waits, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waits:
                        w.cancel()
        finally:
            self.detach(key)


async def _until(stopped) -> None:
    await stopped.wait()  # kopf's DaemonStopped: an awaitable flag in async daemons


__all__ = ["Ticks", "WorkQueue"]

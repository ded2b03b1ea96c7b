"""Kubernetes events, rate-limited per FineTuneJob.

A job that misbehaves in a loop (a pod that crash-loops, a Kueue workload that is preempted
again and again) must not flood the apiserver with events: each object may post a burst of
`burst` events, then one every `every` seconds, and the same (reason, message) again only after
`repeat_after` seconds. What is held back is counted (kubetune_operator_events_dropped_total) and
logged at debug; the status still says what is true.
"""

from __future__ import annotations

import threading
import time

Key = tuple[str, str]


class EventLimiter:
    def __init__(self, burst: int = 25, every: float = 5.0, repeat_after: float = 60.0):
        self.burst, self.every, self.repeat_after = burst, every, repeat_after
        self._guard = threading.Lock()
        self._tokens: dict[Key, tuple[float, float]] = {}  # key → (tokens, at)
        self._last: dict[Key, tuple[str, str, float]] = {}  # key → (reason, message, at)

    def allow(self, key: Key, reason: str, message: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        with self._guard:
            last = self._last.get(key)
            if last and last[:2] == (reason, message) and now - last[2] < self.repeat_after:
                return False
            tokens, at = self._tokens.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) / self.every)
            if tokens < 1.0:
                self._tokens[key] = (tokens, now)
                return False
            self._tokens[key] = (tokens - 1.0, now)
            self._last[key] = (reason, message, now)
            return True

    def forget(self, key: Key) -> None:
        with self._guard:
            self._tokens.pop(key, None)
            self._last.pop(key, None)

    def __len__(self) -> int:
        with self._guard:
            return len(self._tokens)


__all__ = ["EventLimiter"]

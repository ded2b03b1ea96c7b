"""The operator's own Prometheus metrics (training metrics come from the runtime pods).

kubetune_operator_reconciles_total, kubetune_operator_reconcile_duration_seconds,
kubetune_operator_child_actions_total{verb,kind,result}, and kubetune_finetunejobs{phase}
(how many FineTuneJobs this replica sees in each phase).
"""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RECONCILES = Counter("kubetune_operator_reconciles_total", "Reconciles of FineTuneJobs.")
DURATION = Histogram("kubetune_operator_reconcile_duration_seconds", "Time one reconcile took.")
ACTIONS = Counter("kubetune_operator_child_actions_total", "Writes to child objects.", ["verb", "kind", "result"])
PHASES = ("Pending", "Running", "Succeeded", "Failed", "Suspended")
JOBS = Gauge("kubetune_finetunejobs", "FineTuneJobs by phase.", ["phase"])

_phase: dict[tuple[str, str], str] = {}
_guard = threading.Lock()
_served = False


def _refresh() -> None:
    counts = {p: 0 for p in PHASES}
    for p in _phase.values():
        if p in counts:
            counts[p] += 1
    for p, n in counts.items():
        JOBS.labels(p).set(n)


def observe(namespace: str, name: str, status: dict[str, Any], seconds: float) -> None:
    RECONCILES.inc()
    DURATION.observe(seconds)
    with _guard:
        _phase[(namespace, name)] = status.get("phase") or "Pending"
        _refresh()


def forget(namespace: str, name: str) -> None:
    with _guard:
        _phase.pop((namespace, name), None)
        _refresh()


def tracked() -> int:
    with _guard:
        return len(_phase)


def serve(port: int) -> None:
    global _served
    if not _served:
        start_http_server(port)
        _served = True

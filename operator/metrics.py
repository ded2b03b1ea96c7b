"""The operator's own Prometheus metrics (training metrics come from the runtime pods).

kubetune_operator_reconciles_total, kubetune_operator_reconcile_errors_total,
kubetune_operator_reconcile_duration_seconds, kubetune_operator_child_actions_total{verb,kind,result},
kubetune_operator_stage_transitions_total{phase} (a stage entering a phase),
kubetune_operator_pod_restarts_total (failed training pods retried),
kubetune_operator_first_pod_running_seconds (creation → first running pod), and
kubetune_finetunejobs{phase} (how many FineTuneJobs this replica sees in each phase), and
kubetune_operator_events_dropped_total (events held back: repeats, or over an object's rate
limit), kubetune_operator_workqueue_depth (FineTuneJobs waiting for a reconcile), and
kubetune_operator_object_state_entries{table} (entries of each per-object table of the process:
all 0 once every FineTuneJob is gone, or the process leaks).
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

RECONCILES = Counter("kubetune_operator_reconciles_total", "Reconciles of FineTuneJobs.")
DURATION = Histogram("kubetune_operator_reconcile_duration_seconds", "Time one reconcile took.")
ACTIONS = Counter("kubetune_operator_child_actions_total", "Writes to child objects.", ["verb", "kind", "result"])
ERRORS = Counter("kubetune_operator_reconcile_errors_total", "Reconciles that failed and will be retried.")
TRANSITIONS = Counter("kubetune_operator_stage_transitions_total", "Stages entering a phase.", ["phase"])
RESTARTS = Counter("kubetune_operator_pod_restarts_total", "Failed training pods that were retried.")
FIRST_RUNNING = Histogram(
    "kubetune_operator_first_pod_running_seconds",
    "Seconds from a FineTuneJob's creation to its first running training pod.",
    buckets=(1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
)
EVENTS_DROPPED = Counter("kubetune_operator_events_dropped_total",
                         "Kubernetes events not posted: a repeat, or over one object's rate limit.")
QUEUE_DEPTH = Gauge("kubetune_operator_workqueue_depth", "FineTuneJobs waiting for a reconcile.")
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


def _seconds_between(start: str | None, end: str | None) -> float | None:
    from datetime import datetime

    if not start or not end:
        return None
    parse = lambda t: datetime.fromisoformat(t.replace("Z", "+00:00"))  # noqa: E731
    return (parse(end) - parse(start)).total_seconds()


def changes(old: dict[str, Any], new: dict[str, Any], created: str | None) -> dict[str, Any]:
    """What happened between two statuses: stage phase transitions, new restarts, and the
    seconds to the first running pod (when startTime appeared). Pure, for the counters."""
    before = {r.get("name"): r.get("phase") for r in old.get("stages") or []}
    transitions = [r["phase"] for r in new.get("stages") or [] if r.get("phase") and before.get(r.get("name")) != r["phase"]]
    restarts = max(0, int(new.get("restartCount") or 0) - int(old.get("restartCount") or 0))
    first = None
    if new.get("startTime") and not old.get("startTime"):
        first = _seconds_between(created, new["startTime"])
    return {"transitions": transitions, "restarts": restarts, "first_running_seconds": first}


def observe(namespace: str, name: str, status: dict[str, Any], seconds: float,
            old: dict[str, Any] | None = None, created: str | None = None) -> None:
    RECONCILES.inc()
    DURATION.observe(seconds)
    if old is not None:
        seen = changes(old, status, created)
        for phase in seen["transitions"]:
            TRANSITIONS.labels(phase).inc()
        if seen["restarts"]:
            RESTARTS.inc(seen["restarts"])
        if seen["first_running_seconds"] is not None and seen["first_running_seconds"] >= 0:
            FIRST_RUNNING.observe(seen["first_running_seconds"])
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


class _StateCollector:
    """kubetune_operator_object_state_entries{table}, read at scrape time from `sizes()`."""

    def __init__(self, sizes: Callable[[], dict[str, int]]):
        self.sizes = sizes

    def collect(self):
        g = GaugeMetricFamily("kubetune_operator_object_state_entries",
                              "Entries of each per-object table in the operator process.", labels=["table"])
        for table, n in sorted(self.sizes().items()):
            g.add_metric([table], n)
        yield g


_state: _StateCollector | None = None
_state_guard = threading.Lock()


def export_state(sizes: Callable[[], dict[str, int]]) -> None:
    """Export the per-object table sizes (once per process; a second call replaces the source)."""
    global _state
    with _state_guard:  # not _guard: registering collects once, and sizes() reads _phase under _guard
        if _state is None:
            _state = _StateCollector(sizes)
            REGISTRY.register(_state)
        else:
            _state.sizes = sizes


def serve(port: int) -> None:
    global _served
    if not _served:
        start_http_server(port)
        _served = True

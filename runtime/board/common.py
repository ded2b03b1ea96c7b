"""Shared by both backends of the board: its error type and the row/detail shapes of the API."""

from __future__ import annotations

import datetime as dt
import math
import re
import time
from typing import Any

from ..kubectl_plugin import age, duration

DONE = ("Succeeded", "Failed")

# the progress line the runtime prints (runtime/api/progress.py `format_progress`), in `kubetune run`
# --no-progress output and in every stage pod's log:
#   sft [#######-------------]  35%  step 420/1200  loss 0.9100  5,210 tok/s  ETA 30m30s
PROGRESS_LINE = re.compile(
    r"(?P<stage>[A-Za-z0-9][-A-Za-z0-9]*) \[[#-]*\]\s+\d+%\s+step (?P<step>\d+)/(?P<total>\d+|\?)\s+"
    r"loss (?P<loss>[-+0-9.eE]+|--)")


class BoardError(Exception):
    """An answer other than success: `status` is the HTTP status, `field` the spec path at fault."""

    def __init__(self, status: int, message: str, field: str | None = None, **extra: Any):
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": self.message, "field": self.field, **self.extra}


def rfc3339(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def row(name: str, namespace: str | None, status: dict[str, Any], created: str | None,
        now: float | None = None) -> dict[str, Any]:
    """One line of GET /api/runs from a FineTuneJob-shaped status: the columns of `kubectl get ftj`."""
    st = status or {}
    p = st.get("progress") or {}
    ref = st.get("stage") or {}
    stage = f"{ref.get('name')} ({ref.get('index', 0) + 1}/{ref.get('count', '?')})" if ref else "-"
    pct = p.get("percent")
    if pct is None and p.get("step") is not None and p.get("totalSteps"):
        pct = 100.0 * p["step"] / p["totalSteps"]
    phase = st.get("phase") or "Pending"
    eta = st.get("eta") or (duration(p.get("etaSeconds")) if p.get("etaSeconds") is not None else "-")
    return {
        "name": name, "namespace": namespace, "phase": phase, "stage": stage,
        "percent": round(float(pct), 1) if pct is not None else None,
        "step": p.get("step"), "totalSteps": p.get("totalSteps"), "loss": finite(p.get("loss")),
        "eta": "-" if phase in DONE else eta, "age": age(created, now or time.time()), "created": created,
    }


def parse_progress_lines(text: str) -> list[dict[str, Any]]:
    """(stage, step, loss) points of the progress lines in a log; the last line of a step wins."""
    points: dict[tuple[str, int], dict[str, Any]] = {}
    for m in PROGRESS_LINE.finditer(text):
        if m.group("loss") == "--":
            continue
        step = int(m.group("step"))
        points[(m.group("stage"), step)] = {"stage": m.group("stage"), "step": step, "loss": float(m.group("loss"))}
    return list(points.values())

"""Training progress: the `/progress` contract with the operator and the local progress line.

No torch, no transformers: the operator side (and tests) may import this module.

The operator polls ``GET /progress`` on the rank-0 pod and copies the numbers into
``FineTuneJob.status.progress`` / ``.checkpoint`` / ``.output``. The JSON document is a
`ProgressReport`: the runtime writes it through the model and the operator reads it through the
same model. It has exactly these keys (`PROGRESS_KEYS`)::

    {"job": "llama3-identity", "stage": "sft", "rank": 0,
     "phase": "running",                 # "running" | "finished" | "failed"
     "step": 420, "totalSteps": 1200, "epoch": 1.05,
     "loss": 0.91, "learningRate": 8.4e-05,
     "tokensPerSecond": 5210.0, "etaSeconds": 1830.0,
     "checkpoint": {"uri": "s3://.../sft/checkpoint-400", "step": 400},   # or null
     "output": {"uri": "s3://.../merge/model"},                            # or null
     "eval": {"accuracy": 62.5, "rouge-l": 41.2, "samples": 120},          # eval stages; else null
     "updatedAt": "2025-01-01T12:00:00Z"}

Numbers not known yet (no loss logged, no throughput measured) are ``null``. A reader ignores
keys it does not know (a newer runtime's).
"""

from __future__ import annotations

import math
import sys
import threading
import time
from datetime import datetime, timezone
from typing import Annotated, Any, Literal, TextIO

from pydantic import BaseModel, BeforeValidator, ConfigDict, model_serializer
from pydantic.alias_generators import to_camel

PHASES = ("running", "finished", "failed")


def _utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _finite(value: Any) -> float | None:
    """A JSON-safe float: None for None, NaN and infinities (JSON has no NaN)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


Number = Annotated[float | None, BeforeValidator(_finite)]


class _Report(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore",
                              allow_inf_nan=False)


class ReportArtifact(_Report):
    uri: str
    step: int | None = None

    @model_serializer(mode="wrap")
    def _without_null_step(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class ProgressReport(_Report):
    """The `/progress` document (and the final one in the termination message)."""

    job: str | None = None
    stage: str | None = None
    rank: int = 0
    phase: Literal["running", "finished", "failed"] = "running"
    step: int | None = None
    total_steps: int | None = None
    epoch: Number = None
    loss: Number = None
    learning_rate: Number = None
    tokens_per_second: Number = None
    eta_seconds: Number = None
    checkpoint: ReportArtifact | None = None
    output: ReportArtifact | None = None
    eval: dict[str, int | float] | None = None
    updated_at: str | None = None

    def document(self) -> dict[str, Any]:
        """The JSON document (camelCase keys, every key present)."""
        return self.model_dump(by_alias=True)


PROGRESS_KEYS = tuple(f.alias for f in ProgressReport.model_fields.values())


class ProgressState:
    """The progress of one stage in one process; thread-safe; `snapshot()` is the JSON document.

    The training callback (`kubetune.runtime.metrics.MetricsCallback`) updates the numbers; the
    stage code calls `set_checkpoint`, `set_output` and `set_phase`.
    """

    def __init__(self, job: str, stage: str, rank: int = 0):
        self._lock = threading.Lock()
        self._doc: dict[str, Any] = {
            "job": job, "stage": stage, "rank": int(rank), "phase": "running",
            "step": 0, "totalSteps": 0, "epoch": None, "loss": None, "learningRate": None,
            "tokensPerSecond": None, "etaSeconds": None, "checkpoint": None, "output": None,
            "eval": None, "updatedAt": _utc_now(),
        }

    def update(self, **fields: Any) -> None:
        """Set some of the numeric fields (step, totalSteps, epoch, loss, learningRate,
        tokensPerSecond, etaSeconds)."""
        allowed = {"step", "totalSteps", "epoch", "loss", "learningRate", "tokensPerSecond",
                   "etaSeconds"}
        unknown = set(fields) - allowed
        if unknown:
            raise KeyError(f"not a numeric progress field: {sorted(unknown)}")
        clean: dict[str, Any] = {}
        for key, value in fields.items():
            if key in ("step", "totalSteps"):
                clean[key] = int(value or 0)
            else:
                clean[key] = _finite(value)
        with self._lock:
            self._doc.update(clean)
            self._doc["updatedAt"] = _utc_now()

    def set_phase(self, phase: str) -> None:
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {', '.join(PHASES)}, not {phase!r}")
        with self._lock:
            self._doc["phase"] = phase
            self._doc["updatedAt"] = _utc_now()

    def set_checkpoint(self, uri: str, step: int) -> None:
        with self._lock:
            self._doc["checkpoint"] = {"uri": str(uri), "step": int(step)}
            self._doc["updatedAt"] = _utc_now()

    def set_output(self, uri: str) -> None:
        with self._lock:
            self._doc["output"] = {"uri": str(uri)}
            self._doc["updatedAt"] = _utc_now()

    def set_eval(self, scores: dict[str, Any]) -> None:
        """An eval stage's short summary: accuracy, rouge-1/2/l, bleu-4 (× 100) and samples."""
        clean = {str(k): _finite(v) for k, v in scores.items()}
        with self._lock:
            self._doc["eval"] = {k: v for k, v in clean.items() if v is not None}
            self._doc["updatedAt"] = _utc_now()

    def snapshot(self) -> dict[str, Any]:
        """The document (the `/progress` response body), written through `ProgressReport`."""
        with self._lock:
            return ProgressReport.model_validate(self._doc).document()


def format_duration(seconds: float | None) -> str | None:
    """How long, for the progress line and the ETA of a FineTuneJob's status: ``42`` → ``42s``,
    ``93`` → ``1m33s``, ``7322`` → ``2h02m``, ``180000`` → ``2d02h``; None when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return None
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    hours, rest = divmod(seconds, 3600)
    if hours < 48:
        return f"{hours}h{rest // 60:02d}m"
    return f"{hours // 24}d{hours % 24:02d}h"


def format_progress(doc: dict[str, Any], width: int = 20) -> str:
    """One line for a terminal from a `/progress` document, e.g.::

        sft [#######-------------]  35%  step 420/1200  loss 0.9100  5,210 tok/s  ETA 30m30s
    """
    step, total = int(doc.get("step") or 0), int(doc.get("totalSteps") or 0)
    frac = min(max(step / total, 0.0), 1.0) if total > 0 else 0.0
    filled = int(round(frac * width))
    parts = [f"{doc.get('stage', '')} [{'#' * filled}{'-' * (width - filled)}] {frac * 100:4.0f}%",
             f"step {step}/{total if total else '?'}"]
    loss = doc.get("loss")
    parts.append(f"loss {loss:.4f}" if loss is not None else "loss --")
    tps = doc.get("tokensPerSecond")
    parts.append(f"{tps:,.0f} tok/s" if tps is not None else "-- tok/s")
    phase = doc.get("phase", "running")
    if phase == "running":
        parts.append(f"ETA {format_duration(doc.get('etaSeconds')) or '--'}")
    else:
        parts.append(phase)
    return "  ".join(parts)


class ProgressLine:
    """Prints `format_progress` lines for local mode (`kubetune run`).

    On a terminal the line is redrawn in place (carriage return); elsewhere (logs, CI) a new
    line is printed at most every `min_interval` seconds, plus always the final one.

    Use::

        line = ProgressLine()
        line.update(callback.progress.snapshot())   # e.g. from a TrainerCallback's on_log
        line.close()                                # ends the line
    """

    def __init__(self, stream: TextIO | None = None, min_interval: float = 10.0,
                 width: int = 20, tty: bool | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.min_interval = min_interval
        self.width = width
        # tty=False forces plain lines even on a terminal (`kubetune run --no-progress`)
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)()) if tty is None else tty
        self._last_print = -math.inf
        self._last_len = 0
        self._pending: str | None = None

    def update(self, doc: dict[str, Any], force: bool = False) -> str:
        text = format_progress(doc, self.width)
        now = time.monotonic()
        final = doc.get("phase") in ("finished", "failed")
        if self._tty:
            pad = " " * max(self._last_len - len(text), 0)
            self.stream.write("\r" + text + pad)
            self._last_len = len(text)
            self.stream.flush()
        elif force or final or now - self._last_print >= self.min_interval:
            self.stream.write(text + "\n")
            self.stream.flush()
            self._last_print = now
            self._pending = None
        else:
            self._pending = text
        return text

    def close(self) -> None:
        if self._tty and self._last_len:
            self.stream.write("\n")
        elif self._pending is not None:
            self.stream.write(self._pending + "\n")
            self._pending = None
        self.stream.flush()

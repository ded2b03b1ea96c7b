"""Pure status helpers: conditions, progress, and reading Job/Pod state.

Kubernetes conventions: conditions have the metav1.Condition shape, `lastTransitionTime`
changes only when a condition's status changes, and every condition carries the generation it
was computed for. `phase` is a convenience for printer columns; the conditions are the truth.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from typing import Any

from pydantic import ValidationError

from kubetune.runtime.api.contract import FINAL_PROGRESS_KEY, pod_index
from kubetune.runtime.api.errors import BY_EXIT_CODE, EXIT_KILLED, FAILURES
from kubetune.runtime.api.progress import ProgressReport, ReportArtifact
from kubetune.runtime.api.spec import FineTuneJobStatus, Progress

log = logging.getLogger("kubetune.operator")

CONDITION_TYPES = ("Validated", "Running", "Succeeded", "Failed", "Suspended")

# Job condition reasons → our Failed reasons.
_JOB_FAILURE_REASONS = {
    "PodFailurePolicy": "BadInput",
    "BackoffLimitExceeded": "BackoffLimitExceeded",
    "DeadlineExceeded": "DeadlineExceeded",
    "MaxFailedIndexesExceeded": "BackoffLimitExceeded",
}
MAX_MESSAGE = 2048


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def rfc3339(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def parse_time(s: str | None) -> dt.datetime | None:
    if not s:
        return None
    try:
        return dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        return None


# ---------------------------------------------------------------------------------- conditions


def get_condition(conditions: list[dict[str, Any]] | None, type_: str) -> dict[str, Any] | None:
    for c in conditions or []:
        if c.get("type") == type_:
            return c
    return None


def set_condition(
    conditions: list[dict[str, Any]],
    type_: str,
    status: bool | str,
    reason: str,
    message: str,
    generation: int | None,
    now: dt.datetime,
) -> list[dict[str, Any]]:
    """A new list with `type_` set; lastTransitionTime kept unless the status changed."""
    value = status if isinstance(status, str) else ("True" if status else "False")
    old = get_condition(conditions, type_)
    ltt = old["lastTransitionTime"] if old and old.get("status") == value and old.get("lastTransitionTime") else rfc3339(now)
    new = {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message[:MAX_MESSAGE],
        "lastTransitionTime": ltt,
    }
    if generation is not None:
        new["observedGeneration"] = generation
    out = [c for c in conditions if c.get("type") != type_]
    out.append(new)
    order = {t: i for i, t in enumerate(CONDITION_TYPES)}
    return sorted(out, key=lambda c: order.get(c.get("type", ""), len(order)))


def condition_true(conditions: list[dict[str, Any]] | None, type_: str) -> bool:
    c = get_condition(conditions, type_)
    return bool(c and c.get("status") == "True")


# ------------------------------------------------------------------------------------ progress


def progress_from_report(report: ProgressReport) -> dict[str, Any]:
    """The runtime's /progress report → status.progress (only the fields that are present)."""
    step, total = report.step, report.total_steps
    progress = Progress(
        step=step, total_steps=total, epoch=report.epoch, loss=report.loss, learning_rate=report.learning_rate,
        tokens_per_second=report.tokens_per_second, eta_seconds=report.eta_seconds,
        percent=round(min(100.0, 100.0 * step / total), 1) if step is not None and total else None,
    )
    if report.phase == "finished":
        progress.eta_seconds = 0.0
        if total:
            progress.step, progress.percent = max(step or 0, total), 100.0
    return progress.model_dump(by_alias=True, exclude_none=True)


EVAL_KEYS = ("accuracy", "rouge-1", "rouge-2", "rouge-l", "bleu-4", "samples")


def eval_summary(report: ProgressReport | None) -> dict[str, float] | None:
    """An eval stage's short summary from its /progress report → status.stages[].eval (the known
    scores only; None when the report has none)."""
    scores = (report.eval if report is not None else None) or {}
    return {k: int(scores[k]) if k == "samples" else scores[k] for k in EVAL_KEYS if k in scores} or None


def eval_text(scores: dict[str, float] | None) -> str:
    """`accuracy 62.5, rouge-l 41.2` for events and messages ('' without scores)."""
    return ", ".join(f"{k} {v:g}" for k, v in (scores or {}).items() if k != "samples")


def progress_text(progress: dict[str, Any] | None) -> str | None:
    if not progress or progress.get("percent") is None:
        return None
    return f"{int(progress['percent'])}%"


def artifact(ref: ReportArtifact | None) -> dict[str, Any] | None:
    """status' {"uri", "step"} of a report's checkpoint/output (None when absent or without a uri)."""
    return ref.model_dump(by_alias=True) if ref is not None and ref.uri else None


def checked(status: dict[str, Any]) -> dict[str, Any]:
    """`status`, after checking that it is what FineTuneJobStatus (the CRD's schema) describes: a
    key the model does not know, a camelCase name misspelt or a value of the wrong type is a bug
    to raise here, not a field the apiserver silently prunes. A key set to None is a deletion (in
    the merge patch) and not checked."""
    clean = _without_nulls(status)
    parsed = FineTuneJobStatus.model_validate(clean).model_dump(by_alias=True, exclude_unset=True)
    if _without_nulls(parsed) != clean:  # e.g. a snake_case name, or "3" for 3
        raise ValueError(f"status does not survive its model: {clean} became {parsed}")
    return status


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


# ---------------------------------------------------------------------------- Job/Pod reading


def job_condition(job: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_ and c.get("status") == "True":
            return c
    return None


def job_complete(job: dict[str, Any]) -> bool:
    return job_condition(job, "Complete") is not None


def job_failed(job: dict[str, Any]) -> bool:
    return job_condition(job, "Failed") is not None


# "Container trainer for pod ns/name failed with exit code 43 matching FailJob rule at index 0"
_EXIT_CODE_RE = re.compile(r"exit code (\d+)")


def oom_killed(pods: list[dict[str, Any]]) -> bool:
    return any(_terminated(cs).get("reason") == "OOMKilled"
               for pod in pods for cs in (pod.get("status") or {}).get("containerStatuses") or [])


def _terminated(cs: dict[str, Any]) -> dict[str, Any]:
    return (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated") or {}


def job_failure_reason(job: dict[str, Any], pods: list[dict[str, Any]] | None = None) -> str:
    """The Failed reason of a stage whose Job failed: the row of the runtime's table of failures
    (kubetune.runtime.api.errors.FAILURES) its podFailurePolicy rule matched by exit code — BadInput,
    OutOfMemory (43, or 137 with the container OOMKilled by the kernel) — or Disrupted, or the Job's
    own reason (BackoffLimitExceeded: OutOfMemory when the kernel OOM-killed the last pod)."""
    c = job_condition(job, "Failed") or {}
    message = c.get("message") or ""
    if c.get("reason") == "PodFailurePolicy":
        if "DisruptionTarget" in message:
            return "Disrupted"  # the gang rule (multi-node stages)
        m = _EXIT_CODE_RE.search(message)
        code = int(m.group(1)) if m else None
        if code == EXIT_KILLED:
            return "OutOfMemory" if pods is None or oom_killed(pods) else "Killed"
        if code in BY_EXIT_CODE:
            return BY_EXIT_CODE[code].reason
        return "BadInput"
    if c.get("reason") == "BackoffLimitExceeded" and pods and oom_killed(pods):
        return "OutOfMemory"
    return _JOB_FAILURE_REASONS.get(c.get("reason", ""), c.get("reason") or "StageFailed")


def failure_is_permanent(reason: str) -> bool:
    """A reason no retry can fix (the table's non-retryable rows, and activeDeadlineSeconds)."""
    row = FAILURES.get(reason)
    return reason == "DeadlineExceeded" or (row is not None and not row.retryable)


def oom_killed_message(pod: dict[str, Any], cs: dict[str, Any]) -> str:
    """What a container the kernel's OOM killer stopped (exit 137, OOMKilled) says: it could not
    report itself, so the advice comes from here."""
    limit = None
    for c in (pod.get("spec") or {}).get("containers") or []:
        if c.get("name") == cs.get("name"):
            limit = ((c.get("resources") or {}).get("limits") or {}).get("memory")
    where = f"its memory limit ({limit}, spec.resources.memory)" if limit else "the node's memory"
    return (f"container {cs.get('name')} was OOMKilled: the stage's host memory use reached {where} and the "
            "kernel's OOM killer stopped it (exit 137). Run `kubetune estimate <job.yaml>` for the figure per "
            "device; lower it with hyperparameters.batchSize (raise gradientAccumulation to keep the effective "
            "batch), hyperparameters.cutoffLen, hyperparameters.gradientCheckpointing: true, or method: qlora "
            "(quantization.bits: 4)" + (", or raise spec.resources.memory" if limit else "")
            + ". Not retried: the same settings would run out of memory again")


def job_failure_message(job: dict[str, Any], pods: list[dict[str, Any]]) -> str:
    """The most recent failed pod's termination message, else the Job's own condition message."""
    best: tuple[str, str] | None = None
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            term = _terminated(cs)
            if not term or term.get("exitCode", 0) == 0:
                continue
            msg = (term.get("message") or "").strip()
            if term.get("reason") == "OOMKilled":  # the message is only the log tail (FallbackToLogsOnError)
                msg = oom_killed_message(pod, cs)
            text = msg or f"container {cs.get('name')} exited with code {term.get('exitCode')} ({term.get('reason', 'Error')})"
            key = term.get("finishedAt") or ""
            if best is None or key >= best[0]:
                best = (key, text)
    if best:
        return best[1]
    c = job_condition(job, "Failed") or {}
    return c.get("message") or c.get("reason") or "the stage's Job failed"


def final_report(pods: list[dict[str, Any]]) -> ProgressReport | None:
    """The last /progress document a succeeded stage's rank 0 left as its termination message
    (contract.FINAL_PROGRESS_KEY), newest pod first; None when there is none (one that is not a
    report is logged and skipped)."""
    done = [p for p in pods if (p.get("status") or {}).get("phase") == "Succeeded" and pod_index(p) in ("0", None)]
    done.sort(key=lambda p: (p.get("metadata") or {}).get("creationTimestamp") or "", reverse=True)
    for pod in done:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            message = ((cs.get("state") or {}).get("terminated") or {}).get("message") or ""
            try:
                doc = json.loads(message)
            except ValueError:
                continue
            if not isinstance(doc, dict) or not isinstance(doc.get(FINAL_PROGRESS_KEY), dict):
                continue
            try:
                return ProgressReport.model_validate(doc[FINAL_PROGRESS_KEY])
            except ValidationError as e:
                name = (pod.get("metadata") or {}).get("name")
                log.warning("final progress of pod %s not used: %s", name, str(e)[:300], extra={"pod": name})
    return None


def pods_running(pods: list[dict[str, Any]]) -> int:
    return sum(1 for p in pods if (p.get("status") or {}).get("phase") == "Running")


def pods_succeeded(pods: list[dict[str, Any]]) -> int:
    return sum(1 for p in pods if (p.get("status") or {}).get("phase") == "Succeeded")


def pods_disrupted(pods: list[dict[str, Any]]) -> bool:
    """Whether a pod was disrupted (evicted, preempted, its node drained): DisruptionTarget=True."""
    return any(c.get("type") == "DisruptionTarget" and c.get("status") == "True"
               for p in pods for c in (p.get("status") or {}).get("conditions") or [])


def kueue_reason(workload: dict[str, Any] | None) -> tuple[str, str] | None:
    """Why Kueue has not (or no longer) admitted a Job, from its Workload's conditions:
    (reason, message) of Evicted=True (preempted, the queue stopped, ...) if there is one, else of
    QuotaReserved=False (e.g. "insufficient unused quota for nvidia.com/gpu ..."); None when the
    Workload says nothing yet (or there is none)."""
    conds = {c.get("type"): c for c in ((workload or {}).get("status") or {}).get("conditions") or []}
    evicted, reserved = conds.get("Evicted"), conds.get("QuotaReserved")
    for cond, status in ((evicted, "True"), (reserved, "False")):
        if cond and cond.get("status") == status and (cond.get("message") or cond.get("reason")):
            return str(cond.get("reason") or ""), str(cond.get("message") or cond.get("reason"))[:MAX_MESSAGE]
    return None


def pending_reason(pods: list[dict[str, Any]]) -> str | None:
    """Why a pod is not running yet: Unschedulable message or a container's waiting reason."""
    for p in pods:
        st = p.get("status") or {}
        if st.get("phase") != "Pending":
            continue
        for c in st.get("conditions") or []:
            if c.get("type") == "PodScheduled" and c.get("status") == "False":
                return f"{c.get('reason', 'Unschedulable')}: {c.get('message', '')}".strip(": ")
        for cs in st.get("containerStatuses") or []:
            w = (cs.get("state") or {}).get("waiting")
            if w and w.get("reason") not in (None, "ContainerCreating", "PodInitializing"):
                return f"{w['reason']}: {w.get('message', '')}".strip(": ")
    return None

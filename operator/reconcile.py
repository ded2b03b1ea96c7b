"""The reconcile decision, as a pure function: (FineTuneJob, observed children) → what to do.

`reconcile()` is level-based: it looks at the FineTuneJob (its spec and its status, the only
memory) and at what exists now (child Jobs, ConfigMaps, Services, pods, the rank-0 progress
report) and returns the status that should be written, the child actions that make the cluster
match the spec, and the events that tell the story. It never sees an event stream, so a
duplicate event, a lost update or an operator restart all converge to the same answer.

Lifecycle rules (the documented behaviour):

- Stages run in order; a stage is done when its Job is Complete (the runtime has committed its
  output). The next stage's ConfigMap and Job are then created in the same pass.
- A stage Job that was deleted by hand while the stage had not finished is recreated (the
  runtime resumes from the stage's LATEST checkpoint); a child without an owner is adopted; a
  child owned by another FineTuneJob of the same name (an old incarnation) is deleted first.
- `spec.suspend: true` suspends the current stage's Job (its pods go away; progress and
  checkpoints stay); false resumes it. Jobs of a FineTuneJob with `spec.queueName` (or the label
  `kueue.x-k8s.io/queue-name`) are created suspended and left for Kueue to start; while one
  waits, the status is Pending/Queued with the reason its Kueue Workload gives; when Kueue
  suspends a running one (preemption), a Preempted warning says so and the stage resumes from
  its checkpoint once admitted again. For those, a user suspend deletes the stage Job instead
  (Kueue owns the Job's suspend field) and resume recreates it, queued again.
- A spec change while a job runs applies from the next pod start on (a retry, a resume, or the
  next stage): the ConfigMap follows the spec, the running pod is not restarted.
- A finished FineTuneJob (Succeeded, or Failed for any reason but an invalid spec) is final: a
  later spec change never retrains silently. The operator records the new generation, keeps the
  outcome and warns with a `SpecChangeIgnored` event; to train again, create a new FineTuneJob
  (or delete and re-apply this one). A job that failed validation never ran: fixing its spec
  starts it.
- Child names cannot collide (`manifests.child_name`). A create that finds the name taken by an
  object this FineTuneJob does not own is never "already exists = done": the stage waits with
  Running=False, reason `NameConflict`, naming the object. A stage Job named by an operator
  from before these names (`legacy_child_name`, owned by this FineTuneJob) keeps its Job,
  ConfigMap and Service until the stage ends; later stages get the new names.
- A Job whose pods the Job controller cannot create (a ResourceQuota, Pod Security admission,
  a missing PriorityClass) shows the newest `FailedCreate` event of that Job as Running=False,
  reason `PodCreationFailed` (phase Pending: the Job controller retries, and fixing the cause
  starts the pod).
- `runPolicy.ttlSecondsAfterFinished` deletes the children (Jobs, their pods, ConfigMaps,
  Services) that long after the FineTuneJob finished; the status and the stored outputs stay.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
from typing import Any, Literal

from kubetune.runtime.api.errors import SpecError
from kubetune.runtime.api.plan import ResolvedStage, plan
from kubetune.runtime.api.progress import ProgressReport, format_duration
from kubetune.runtime.api.spec import API_GROUP, API_VERSION, KIND, FineTuneJob, parse_job

from . import manifests as m
from . import status as s
from .config import OperatorConfig
from .policy import violations

Verb = Literal["create", "patch", "delete"]


@dataclasses.dataclass
class Observed:
    """What exists now. `jobs`/`configmaps`/`services` by name; `pods` by owning Job name."""

    jobs: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    configmaps: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    services: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    network_policies: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # (when the operator makes them)
    pods: dict[str, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)
    progress: ProgressReport | None = None  # the rank-0 /progress report, when polled
    # FailedCreate events of the Job controller by Job name (only read for Jobs without pods)
    job_events: dict[str, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)
    # the Kueue Workload of each stage Job that waits for admission, by Job name
    workloads: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    # child names taken by an object this FineTuneJob does not own: name → what is there
    conflicts: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Action:
    verb: Verb
    kind: Literal["Job", "ConfigMap", "Service", "NetworkPolicy"]
    name: str
    body: dict[str, Any] | None = None  # the manifest (create), a merge patch (patch), or {"propagationPolicy": ...} (delete)
    why: str = ""


@dataclasses.dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclasses.dataclass
class Decision:
    status: dict[str, Any]
    actions: list[Action] = dataclasses.field(default_factory=list)
    events: list[Event] = dataclasses.field(default_factory=list)

    def info(self, reason: str, message: str) -> None:
        self.events.append(Event("Normal", reason, message))

    def warn(self, reason: str, message: str) -> None:
        self.events.append(Event("Warning", reason, message))


# ----------------------------------------------------------------------------------- helpers


def job_document(body: dict[str, Any]) -> dict[str, Any]:
    """The parts of the custom object that the spec model validates."""
    meta = body.get("metadata") or {}
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {
            "name": meta.get("name"),
            "namespace": meta.get("namespace"),
            "labels": dict(meta.get("labels") or {}),
            "annotations": {k: v for k, v in (meta.get("annotations") or {}).items()},
        },
        "spec": body.get("spec") or {},
    }


def validate(body: dict[str, Any]) -> tuple[FineTuneJob | None, str, list[str]]:
    """(job, reason, problems): the parsed job, or the reason and problems that stop it."""
    try:
        job = parse_job(job_document(body))
    except SpecError as err:
        return None, "InvalidSpec", list(err.problems)
    if not job.spec.storage.uri:
        return None, "StorageRequired", [
            "spec.storage.uri: required in a cluster, because a pod's local disk vanishes with the pod; "
            "set it to an S3 prefix such as s3://bucket/" + job.metadata.name + "/ (with storage.endpoint "
            "and storage.credentialsSecretRef for MinIO/Ceph)"
        ]
    return job, "Valid", []


def owner_uids(obj: dict[str, Any]) -> list[str]:
    return [r.get("uid") for r in (obj.get("metadata") or {}).get("ownerReferences") or [] if r.get("kind") == KIND]


def stage_names(observed: Observed, job_name: str, stage_name: str, uid: str) -> tuple[str, str]:
    """(Job and ConfigMap name, Service name) of a stage: `manifests.child_name`, except for a
    stage whose Job an operator before the collision-free names created (`legacy_child_name`,
    owned by this FineTuneJob): it keeps its Job, ConfigMap and Service until the stage ends."""
    new = m.child_name(job_name, stage_name)
    old = m.legacy_child_name(job_name, stage_name)
    if old != new and new not in observed.jobs and uid and uid in owner_uids(observed.jobs.get(old) or {}):
        return old, m.legacy_service_name(job_name, stage_name)
    return new, m.service_name(job_name, stage_name)


def failed_create(observed: Observed, job: dict[str, Any]) -> str | None:
    """The newest FailedCreate event message of this Job (its uid), if any."""
    meta = job.get("metadata") or {}
    evs = [e for e in observed.job_events.get(meta.get("name"), [])
           if (e.get("involvedObject") or {}).get("uid") in (None, meta.get("uid"))]
    if not evs:
        return None
    evs.sort(key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or (e.get("metadata") or {}).get("creationTimestamp") or "")
    return str(evs[-1].get("message") or "the Job controller could not create the pod")


def merge_patch(old: Any, new: Any) -> Any:
    """RFC 7386 merge patch turning `old` into `new` (None where a key disappears)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return new
    patch: dict[str, Any] = {}
    for k in old:
        if k not in new:
            patch[k] = None
    for k, v in new.items():
        if k not in old:
            patch[k] = v
        elif old[k] != v:
            patch[k] = merge_patch(old[k], v) if isinstance(v, dict) and isinstance(old[k], dict) else v
    return patch


def _stage_ref(stage: ResolvedStage) -> dict[str, Any]:
    return {"name": stage.name, "index": stage.index, "count": stage.count}


def _records(prev: list[dict[str, Any]], stages: list[ResolvedStage]) -> list[dict[str, Any]]:
    by_name = {r.get("name"): r for r in prev if isinstance(r, dict)}
    out = []
    for st in stages:
        r = copy.deepcopy(by_name.get(st.name) or {"name": st.name, "phase": "Pending", "restarts": 0})
        r["type"] = st.stage.type
        r.setdefault("restarts", 0)
        out.append(r)
    return out


def _label(stage: ResolvedStage) -> str:
    return f"{stage.name} ({stage.index + 1}/{stage.count})"


def _set_all(
    status: dict[str, Any], gen: int | None, now: dt.datetime, **conds: tuple[bool, str, str]
) -> None:
    c = list(status.get("conditions") or [])
    for type_, (value, reason, message) in conds.items():
        c = s.set_condition(c, type_, value, reason, message, gen, now)
    status["conditions"] = c


def _terminal(status: dict[str, Any]) -> bool:
    if status.get("phase") == "Succeeded":
        return True
    if status.get("phase") == "Failed":
        failed = s.get_condition(status.get("conditions"), "Failed") or {}
        return failed.get("reason") not in ("InvalidSpec", "StorageRequired")
    return False


def _ttl(body: dict[str, Any]) -> int | None:
    v = ((body.get("spec") or {}).get("runPolicy") or {}).get("ttlSecondsAfterFinished")
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


# ---------------------------------------------------------------------------------- reconcile


def reconcile(
    body: dict[str, Any], observed: Observed, config: OperatorConfig, now: dt.datetime | None = None
) -> Decision:
    """What status to write (checked against its model: `status.checked`), which children to
    create/patch/delete, which events to post."""
    d = _reconcile(body, observed, config, now or s.now_utc())
    s.checked(d.status)
    return d


def _reconcile(body: dict[str, Any], observed: Observed, config: OperatorConfig, now: dt.datetime) -> Decision:
    meta = body.get("metadata") or {}
    uid = meta.get("uid") or ""
    gen = meta.get("generation")
    prev = copy.deepcopy(body.get("status") or {})
    status = copy.deepcopy(prev)
    status.pop("kopf", None)
    status["observedGeneration"] = gen
    d = Decision(status=status)

    if _terminal(prev):
        _finished(body, prev, observed, d, gen, now)
        return d

    job, reason, problems = validate(body)
    if job is None:
        _invalid(prev, d, gen, now, reason, problems)
        return d
    if not any(uid in owner_uids(o) for o in observed.jobs.values()):
        # before anything is created: the cluster admin's policy (the apiserver's admission policy
        # enforces it too, unless it is off or its binding does not cover this namespace)
        problems = violations(job, config.policy, config.runtime_image, config.model_cache_claim)
        if problems:
            _invalid(prev, d, gen, now, "PolicyViolation", problems)
            return d

    stages = plan(job, run=uid)  # the uid: a stage's pods and retries are one run, a re-applied job a new one
    records = _records(prev.get("stages") or [], stages)
    status["stages"] = records
    kueue = m.kueue_queue(job) is not None
    suspend = job.spec.suspend
    flow = " → ".join(st.name for st in stages)
    validated = (True, "Valid", f"{len(stages)} stage(s): {flow}")

    # Children of stages that no longer exist in the spec (renamed or removed) go away.
    names = [stage_names(observed, job.metadata.name, st.name, uid) for st in stages]
    wanted = {n for n, _ in names}
    wanted_svc = {v for _, v in names}
    for kind, objs, keep in (("Job", observed.jobs, wanted), ("ConfigMap", observed.configmaps, wanted),
                             ("Service", observed.services, wanted_svc),
                             ("NetworkPolicy", observed.network_policies, wanted)):
        for name, obj in objs.items():
            if name not in keep and uid in owner_uids(obj):
                d.actions.append(Action("delete", kind, name, why="its stage is no longer in the spec"))

    # Walk the stages: those already done (by status, or by a Complete Job) are skipped.
    i = 0
    while i < len(stages):
        st, rec = stages[i], records[i]
        if rec.get("phase") == "Succeeded":
            i += 1
            continue
        jname = names[i][0]
        child = observed.jobs.get(jname)
        if child is not None and uid in owner_uids(child) and s.job_complete(child):
            rec["phase"] = "Succeeded"
            rec["completionTime"] = (child.get("status") or {}).get("completionTime") or s.rfc3339(now)
            rec.setdefault("startTime", (child.get("status") or {}).get("startTime") or rec["completionTime"])
            rec["output"] = rec.get("output") or {"uri": st.io.output}
            rec.pop("message", None)
            scores = s.eval_summary(s.final_report(observed.pods.get(jname, []))) or rec.get("eval")
            if scores:  # an eval stage's results (it may have ended between two /progress polls)
                rec["eval"] = scores
            results = f"; {s.eval_text(scores)}" if scores else ""
            d.info("StageSucceeded", f"Stage {_label(st)} succeeded{results}; output {rec['output']['uri']}")
            i += 1
            continue
        break

    status["restartCount"] = sum(int(r.get("restarts") or 0) for r in records)

    if i == len(stages):
        last = stages[-1]
        status["stage"] = _stage_ref(last)
        status["output"] = records[-1].get("output") or {"uri": last.io.output}
        status["completionTime"] = status.get("completionTime") or records[-1].get("completionTime") or s.rfc3339(now)
        status["startTime"] = status.get("startTime") or records[0].get("startTime") or status["completionTime"]
        progress = dict(status.get("progress") or {})
        # the last stage's own final report (it may have ended between two /progress polls)
        final = s.final_report(observed.pods.get(names[-1][0], []))
        if final is not None:
            progress.update(s.progress_from_report(final))
        progress.update({"percent": 100.0, "etaSeconds": 0.0})
        if progress.get("totalSteps"):
            progress["step"] = progress["totalSteps"]
        status["progress"] = progress
        status["progressText"] = "100%"
        status.pop("eta", None)
        status["phase"] = "Succeeded"
        _set_all(status, gen, now, Validated=validated,
                 Running=(False, "Succeeded", "all stages finished"),
                 Succeeded=(True, "AllStagesSucceeded", f"{len(stages)} stage(s) succeeded; output {status['output']['uri']}"),
                 Failed=(False, "Succeeded", ""),
                 Suspended=(False, "Succeeded", ""))
        if prev.get("phase") != "Succeeded":
            d.info("Succeeded", f"All {len(stages)} stage(s) succeeded; output {status['output']['uri']}")
        return d

    _current_stage(job, stages[i], records[i], body, observed, config, d, gen, now, uid, kueue, suspend, validated)
    status["restartCount"] = sum(int(r.get("restarts") or 0) for r in records)
    return d


def _current_stage(
    job: FineTuneJob,
    st: ResolvedStage,
    rec: dict[str, Any],
    body: dict[str, Any],
    observed: Observed,
    config: OperatorConfig,
    d: Decision,
    gen: int | None,
    now: dt.datetime,
    uid: str,
    kueue: bool,
    suspend: bool,
    validated: tuple[bool, str, str],
) -> None:
    status = d.status
    prev = body.get("status") or {}
    prev_stage = (prev.get("stage") or {}).get("name")
    if prev_stage != st.name:
        # a new stage: progress and checkpoint describe the stage that runs now
        for k in ("progress", "checkpoint", "eta", "progressText"):
            status.pop(k, None)
    status["stage"] = _stage_ref(st)
    jname, sname = stage_names(observed, job.metadata.name, st.name, uid)

    # A name of this stage's children taken by an object this FineTuneJob does not own: never
    # "already exists = done"; the stage waits, saying what is in the way.
    taken = [observed.conflicts[n] for n in dict.fromkeys((jname, sname)) if n in observed.conflicts]
    if taken:
        conds = {"Validated": validated, "Succeeded": (False, "InProgress", "")}
        text = f"stage {_label(st)} cannot start: " + "; ".join(taken)
        old = s.get_condition(prev.get("conditions"), "Running") or {}
        if old.get("reason") != "NameConflict" or old.get("message") != text[: s.MAX_MESSAGE]:
            d.warn("NameConflict", text)
        _pending(status, rec, conds, d, gen, now, "Pending", "NameConflict", text)
        return

    # The ConfigMap (and the headless Service of a multi-node stage) follow the spec.
    cm = observed.configmaps.get(jname)
    desired_cm = m.build_configmap(job, st, uid)
    desired_cm["metadata"]["name"] = jname  # (a stage Job from before the upgrade keeps its names)
    if cm is not None and uid not in owner_uids(cm) and owner_uids(cm):
        d.actions.append(Action("delete", "ConfigMap", jname, why="owned by an older FineTuneJob of this name"))
    elif cm is None:
        d.actions.append(Action("create", "ConfigMap", jname, desired_cm, why="stage config"))
    elif cm.get("data") != desired_cm["data"] or not owner_uids(cm):
        d.actions.append(Action("patch", "ConfigMap", jname, {
            "metadata": {"annotations": desired_cm["metadata"]["annotations"],
                         "ownerReferences": desired_cm["metadata"]["ownerReferences"]},
            "data": desired_cm["data"]}, why="stage config drifted from the spec"))
    netpol = m.build_network_policy(job, st, uid, config)
    if netpol is not None and jname not in observed.network_policies:
        netpol["metadata"]["name"] = jname
        d.actions.append(Action("create", "NetworkPolicy", jname, netpol, why="who may reach the stage's pods"))
    svc = m.build_service(job, st, uid)
    if svc is not None and sname not in observed.services:
        svc["metadata"]["name"] = sname
        d.actions.append(Action("create", "Service", sname, svc, why="multi-node rendezvous"))

    child = observed.jobs.get(jname)
    pods = observed.pods.get(jname, [])
    conds: dict[str, tuple[bool, str, str]] = {"Validated": validated, "Succeeded": (False, "InProgress", "")}
    prev_susp = s.condition_true(prev.get("conditions"), "Suspended")

    if child is not None and owner_uids(child) and uid not in owner_uids(child):
        d.actions.append(Action("delete", "Job", jname, why="owned by an older FineTuneJob of this name"))
        child, pods = None, []
        waiting = f"waiting for the old Job {jname} (of an earlier FineTuneJob of this name) to go away"
        _pending(status, rec, conds, d, gen, now, "Pending", "Waiting", waiting)
        return
    if child is not None and (child.get("metadata") or {}).get("deletionTimestamp"):
        if rec.get("restartedJob") and rec["restartedJob"] == (child.get("metadata") or {}).get("uid"):
            _pending(status, rec, conds, d, gen, now, "Pending", "Restarting",
                     f"all {st.resources.nodes} pods of stage {_label(st)} restart from the last checkpoint: "
                     f"waiting for the pods of Job {jname} to stop")
        else:
            _pending(status, rec, conds, d, gen, now, "Pending", "Waiting", f"Job {jname} is being deleted")
        return

    if child is None:
        if suspend and kueue:
            pass  # a suspended Kueue job has no Job: resuming recreates it, queued again
        else:
            manifest = m.build_job(job, st, uid, config, suspend=suspend or kueue)
            d.actions.append(Action("create", "Job", jname, manifest, why=f"stage {_label(st)}"))
            if rec.pop("restartedJob", None):
                pass  # the Job of a gang restart, announced by GangRestarted
            elif rec.get("phase") in ("Running", "Pending") and rec.get("startTime"):
                if not (kueue and prev_susp):
                    d.warn("JobRecreated", f"Job {jname} of stage {_label(st)} was missing; recreated, "
                                           "the stage resumes from its last checkpoint")
            else:
                d.info("StageStarted", f"Stage {_label(st)} started: Job {jname}")
            rec["startTime"] = rec.get("startTime") or s.rfc3339(now)
            status["startTime"] = status.get("startTime") or rec["startTime"]
    else:
        if not owner_uids(child):
            d.actions.append(Action("patch", "Job", jname, {"metadata": {
                "ownerReferences": [m.owner_reference(job, uid)]}}, why="adopt"))
            d.info("Adopted", f"Adopted Job {jname}")
        if not s.job_failed(child) and s.oom_killed(pods):
            # the kernel's OOM killer (exit 137, OOMKilled): the same settings hit the same wall,
            # so the Job is stopped (suspended: no new pod, the failed one kept to look at) instead
            # of retried; a SIGKILL for any other reason (a crash, a liveness kill) stays a retry
            # that resumes from the checkpoint
            d.actions.append(Action("patch", "Job", jname, {"spec": {"suspend": True}}, why="out of memory: not retried"))
            _failed(job, st, rec, child, pods, d, gen, now, validated, reason="OutOfMemory")
            return
        if st.resources.nodes <= 1:  # one pod: the Job controller retries it (a gang: see below)
            failed_pods = int((child.get("status") or {}).get("failed") or 0)
            if s.job_failed(child):
                failed_pods = max(0, failed_pods - 1)  # the last failure ended the stage: not retried
            if failed_pods > int(rec.get("restarts") or 0) and not s.job_failed(child):
                msg = s.job_failure_message(child, pods)
                d.warn("PodRetried", f"Stage {_label(st)}: a pod failed ({msg}); retry {failed_pods} of "
                                     f"{job.spec.run_policy.backoff_limit} resumes from the last checkpoint")
            rec["restarts"] = max(int(rec.get("restarts") or 0), failed_pods)
        if s.job_failed(child):
            if st.resources.nodes > 1 and _gang_restart(job, st, rec, child, pods, d):
                _pending(status, rec, conds, d, gen, now, "Pending", "Restarting",
                         f"all {st.resources.nodes} pods of stage {_label(st)} restart from the last checkpoint")
                return
            _failed(job, st, rec, child, pods, d, gen, now, validated)
            return
        job_suspended = bool((child.get("spec") or {}).get("suspend"))
        if kueue:
            if suspend:
                d.actions.append(Action("delete", "Job", jname, why="suspended (Kueue owns the Job's suspend field)"))
        elif job_suspended != suspend:
            d.actions.append(Action("patch", "Job", jname, {"spec": {"suspend": suspend}},
                                    why="suspend" if suspend else "resume"))
        _apply_progress(st, rec, observed.progress, d)

    if suspend:
        status["phase"] = "Suspended"
        status.pop("eta", None)
        conds.update(Running=(False, "Suspended", f"stage {_label(st)} is suspended"),
                     Suspended=(True, "SuspendedBySpec", "spec.suspend is true: pods stopped; progress and checkpoints are kept"),
                     Failed=(False, "NoFailure", ""))
        if not prev_susp:
            d.info("Suspended", f"Suspended at stage {_label(st)}; resume continues from the last checkpoint")
        _set_all(status, gen, now, **conds)
        return
    if prev_susp:
        d.info("Resumed", f"Resumed stage {_label(st)} from its last checkpoint")
    conds["Suspended"] = (False, "NotSuspended", "")
    conds["Failed"] = (False, "NoFailure", "")

    if child is not None and kueue and bool((child.get("spec") or {}).get("suspend")):
        queue = m.kueue_queue(job)
        why = s.kueue_reason(observed.workloads.get(jname))
        text = f"Job {jname} waits for Kueue to admit it (queue {queue})" + (f": {why[1]}" if why else "")
        if rec.get("phase") == "Running":
            # Kueue took the quota back (preempted by a job of higher priority, or evicted): the
            # pods were stopped like a suspend (checkpoint), and the stage resumes when admitted
            d.warn("Preempted", f"Stage {_label(st)} was stopped by Kueue" + (f" ({why[0]}: {why[1]})" if why else "")
                   + "; it resumes from its last checkpoint when admitted again")
        rec["phase"] = "Pending"
        _pending(status, rec, conds, d, gen, now, "Pending", "Queued", text)
        return
    finishing = rec.get("phase") == "Running" and s.pods_succeeded(pods) > 0  # Complete is on its way
    if child is not None and (s.pods_running(pods) > 0 or finishing):
        status["phase"] = "Running"
        if rec.get("phase") != "Running":
            d.info("StageRunning", f"Stage {_label(st)} is running")
        rec["phase"] = "Running"
        conds["Running"] = (True, "StageRunning", f"stage {_label(st)} is running")
        _set_all(status, gen, now, **conds)
        return
    why = s.pending_reason(pods) if child is not None else None
    cannot = failed_create(observed, child) if child is not None and not why and not pods else None
    if cannot:
        # Quota, Pod Security admission, a missing PriorityClass...: the Job controller keeps
        # trying (and succeeds once the cause is fixed); say why now instead of Pending forever.
        text = f"the pods of Job {jname} (stage {_label(st)}) cannot be created: {cannot}"
        old = s.get_condition(prev.get("conditions"), "Running") or {}
        if old.get("reason") != "PodCreationFailed" or old.get("message") != text[: s.MAX_MESSAGE]:
            d.warn("PodCreationFailed", text)
        _pending(status, rec, conds, d, gen, now, "Pending", "PodCreationFailed", text)
        return
    _pending(status, rec, conds, d, gen, now, "Pending", "Pending",
             why or f"waiting for the pod of Job {jname} (stage {_label(st)}) to start")


def _pending(status, rec, conds, d, gen, now, phase, reason, message) -> None:
    status["phase"] = phase
    status.pop("eta", None)
    conds.setdefault("Suspended", (False, "NotSuspended", ""))
    conds.setdefault("Failed", (False, "NoFailure", ""))
    conds["Running"] = (False, reason, message)
    _set_all(status, gen, now, **conds)


def _apply_progress(st: ResolvedStage, rec: dict[str, Any], report: ProgressReport | None, d: Decision) -> None:
    status = d.status
    if report is None or report.stage not in (None, st.name):
        return
    progress = s.progress_from_report(report)
    if progress:
        status["progress"] = progress
        status["progressText"] = s.progress_text(progress)
        eta = format_duration(progress.get("etaSeconds"))
        if eta:
            status["eta"] = eta
        else:
            status.pop("eta", None)
    ckpt = s.artifact(report.checkpoint)
    if ckpt and ckpt != rec.get("checkpoint"):
        rec["checkpoint"] = ckpt
        d.info("CheckpointCommitted", f"Stage {st.name}: checkpoint at step {ckpt.get('step', '?')} committed to {ckpt['uri']}")
    if ckpt:
        status["checkpoint"] = ckpt
    out = s.artifact(report.output)
    if out:
        rec["output"] = out
    scores = s.eval_summary(report)
    if scores:
        rec["eval"] = scores


def _gang_restart(job, st, rec, child, pods, d: Decision) -> bool:
    """A multi-node stage's Job failed: restart all its pods together from the checkpoint.

    The pods of a rendezvous are one gang: the Job (backoffLimit 0) fails at the first failed pod
    and stops the others; this deletes it (foreground, so the new pods never meet old ones) and
    the next reconcile creates it again. Each restart counts against runPolicy.backoffLimit,
    except when a pod was disrupted (evicted, preempted: its DisruptionTarget condition). Bad input and
    activeDeadlineSeconds are final. Returns False when the stage fails instead.
    """
    reason = s.job_failure_reason(child, pods)
    if s.failure_is_permanent(reason):  # bad input, out of memory, deadline: no restart
        return False
    meta = child.get("metadata") or {}
    delete = Action("delete", "Job", meta.get("name", ""), {"propagationPolicy": "Foreground"},
                    why="restart all pods of a multi-node stage from the checkpoint")
    if meta.get("uid") and rec.get("restartedJob") == meta["uid"]:
        d.actions.append(delete)  # counted already: its deletion is on its way
        return True
    restarts, limit = int(rec.get("restarts") or 0), job.spec.run_policy.backoff_limit
    disrupted = reason == "Disrupted" or s.pods_disrupted(pods)
    if not disrupted and restarts >= limit:
        return False
    if not disrupted:
        rec["restarts"] = restarts + 1
    if meta.get("uid"):
        rec["restartedJob"] = meta["uid"]
    why = "a pod was disrupted: not counted as a retry" if disrupted else f"retry {restarts + 1} of {limit}"
    d.warn("GangRestarted", f"Stage {_label(st)}: a pod failed ({s.job_failure_message(child, pods)}); all "
                            f"{st.resources.nodes} pods restart together from the last checkpoint ({why})")
    d.actions.append(delete)
    return True


def _failed(job, st, rec, child, pods, d: Decision, gen, now, validated, reason: str | None = None) -> None:
    status = d.status
    reason = reason or s.job_failure_reason(child, pods)
    msg = s.job_failure_message(child, pods)
    rec["phase"] = "Failed"
    rec["message"] = msg[: s.MAX_MESSAGE]
    rec["completionTime"] = rec.get("completionTime") or (child.get("status") or {}).get("completionTime") or s.rfc3339(now)
    status["phase"] = "Failed"
    status["completionTime"] = rec["completionTime"]
    status.pop("eta", None)
    retries = "" if s.failure_is_permanent(reason) and reason != "DeadlineExceeded" else f" after {rec.get('restarts', 0)} retries"
    text = f"stage {_label(st)} failed ({reason}){retries}: {msg}"
    _set_all(status, gen, now, Validated=validated,
             Running=(False, "Failed", f"stage {_label(st)} failed"),
             Succeeded=(False, "Failed", ""),
             Failed=(True, reason, text),
             Suspended=(False, "Failed", ""))
    d.warn("Failed", text)


def _invalid(prev, d: Decision, gen, now, reason, problems) -> None:
    status = d.status
    text = "; ".join(problems)
    status["phase"] = "Failed"
    for k in ("eta",):
        status.pop(k, None)
    _set_all(status, gen, now,
             Validated=(False, reason, text),
             Running=(False, reason, "the spec is not valid; fix it to start the job"),
             Succeeded=(False, reason, ""),
             Failed=(True, reason, text),
             Suspended=(False, reason, ""))
    old = s.get_condition(prev.get("conditions"), "Validated") or {}
    if old.get("status") != "False" or old.get("message") != text[: s.MAX_MESSAGE]:
        d.warn(reason, text)


def _finished(body, prev, observed: Observed, d: Decision, gen, now) -> None:
    """A finished job stays finished: record the generation, warn about ignored spec changes, TTL."""
    status = d.status
    old_gen = prev.get("observedGeneration")
    if gen is not None and old_gen is not None and gen != old_gen:
        d.warn("SpecChangeIgnored", f"The job has {prev.get('phase', 'finished').lower()}; spec changes "
               f"(generation {gen}) do not retrain. Create a new FineTuneJob, or delete and re-apply this one, to train again.")
    conds = []
    for c in prev.get("conditions") or []:
        c = dict(c)
        if gen is not None:
            c["observedGeneration"] = gen
        conds.append(c)
    status["conditions"] = conds
    status.pop("eta", None)
    ttl = _ttl(body)
    done = s.parse_time(prev.get("completionTime"))
    if ttl is None or done is None or now < done + dt.timedelta(seconds=ttl):
        return
    uid = (body.get("metadata") or {}).get("uid")
    doomed = [("Job", n) for n, o in observed.jobs.items() if uid in owner_uids(o)]
    doomed += [("ConfigMap", n) for n, o in observed.configmaps.items() if uid in owner_uids(o)]
    doomed += [("Service", n) for n, o in observed.services.items() if uid in owner_uids(o)]
    doomed += [("NetworkPolicy", n) for n, o in observed.network_policies.items() if uid in owner_uids(o)]
    for kind, name in doomed:
        d.actions.append(Action("delete", kind, name, why="ttlSecondsAfterFinished elapsed"))
    if doomed:
        d.info("ChildrenDeleted", f"ttlSecondsAfterFinished ({ttl}s) elapsed: deleted {len(doomed)} child object(s); outputs stay in storage")


def next_check_seconds(body: dict[str, Any], now: dt.datetime | None = None) -> float | None:
    """Seconds until the TTL of a finished job elapses (None: nothing scheduled)."""
    now = now or s.now_utc()
    st = body.get("status") or {}
    ttl = _ttl(body)
    done = s.parse_time(st.get("completionTime"))
    if not _terminal(st) or ttl is None or done is None:
        return None
    return max(0.0, (done + dt.timedelta(seconds=ttl) - now).total_seconds())

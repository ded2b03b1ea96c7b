"""(FineTuneJob, observed Jobs/Pods, progress) → status, actions and events; no API server."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from operator_builders import NOW, UID, ftj, k8s_job, pod
from pydantic import ValidationError

from kubetune.operator import status as s
from kubetune.operator.reconcile import Observed, merge_patch, next_check_seconds, reconcile
from kubetune.runtime.api.progress import ProgressReport, format_duration

LATER = NOW + dt.timedelta(minutes=5)
THREE = [{"name": "sft", "type": "sft"}, {"name": "dpo", "type": "dpo"}, {"name": "merge", "type": "export"}]


def cond(status, type_):
    c = s.get_condition(status["conditions"], type_)
    assert c is not None, f"no {type_} condition"
    return c


def step(body, observed, config, now=NOW):
    """Reconcile, then write the status back as the API would (for multi-step scenarios)."""
    d = reconcile(body, observed, config, now=now)
    body = dict(body, status=d.status)
    return body, d


def verbs(d):
    return [(a.verb, a.kind, a.name) for a in d.actions]


def test_first_reconcile_creates_config_and_job_and_sets_every_condition(config):
    d = reconcile(ftj(), Observed(), config, now=NOW)
    assert verbs(d) == [("create", "ConfigMap", "llama-sft"), ("create", "Job", "llama-sft")]
    st = d.status
    assert st["phase"] == "Pending" and st["observedGeneration"] == 1
    assert st["stage"] == {"name": "sft", "index": 0, "count": 1}
    assert {c["type"] for c in st["conditions"]} == {"Validated", "Running", "Succeeded", "Failed", "Suspended"}
    assert cond(st, "Validated")["status"] == "True" and cond(st, "Validated")["reason"] == "Valid"
    assert cond(st, "Running")["status"] == "False"
    assert all(c["observedGeneration"] == 1 and c["lastTransitionTime"] == "2025-06-01T12:00:00Z"
               for c in st["conditions"])
    assert st["stages"] == [{"name": "sft", "type": "sft", "phase": "Pending", "restarts": 0,
                             "startTime": "2025-06-01T12:00:00Z"}]
    assert st["startTime"] == "2025-06-01T12:00:00Z" and st["restartCount"] == 0
    assert [(e.type, e.reason) for e in d.events] == [("Normal", "StageStarted")]


def test_reconcile_is_idempotent_once_children_exist(config):
    body, _ = step(ftj(), Observed(), config)
    obs = Observed(jobs={"llama-sft": k8s_job("llama-sft", active=1)},
                   configmaps={"llama-sft": _cm(body, config)},
                   pods={"llama-sft": [pod("llama-sft", "Pending")]})
    body, d = step(body, obs, config, now=LATER)
    assert d.actions == [] and d.events == []
    again = reconcile(body, obs, config, now=LATER + dt.timedelta(seconds=30))
    assert again.actions == [] and again.events == []
    assert merge_patch(body["status"], again.status) == {}


def _cm(body, config):
    from kubetune.operator import manifests as m
    from kubetune.operator.reconcile import job_document
    from kubetune.runtime.api.plan import plan
    from kubetune.runtime.api.spec import parse_job

    job = parse_job(job_document(body))
    return m.build_configmap(job, plan(job, run=UID)[body["status"]["stage"]["index"]], UID)


def test_running_with_progress_from_rank0(config):
    body, _ = step(ftj(), Observed(), config)
    report = {"job": "llama", "stage": "sft", "rank": 0, "phase": "running", "step": 420, "totalSteps": 1200,
              "epoch": 1.05, "loss": 0.91, "learningRate": 1e-4, "tokensPerSecond": 5210.5, "etaSeconds": 1830,
              "checkpoint": {"uri": "s3://ckpt/llama/sft/checkpoints/checkpoint-400", "step": 400},
              "output": None, "updatedAt": "2025-06-01T12:04:59Z"}
    obs = Observed(jobs={"llama-sft": k8s_job("llama-sft", active=1)}, configmaps={"llama-sft": _cm(body, config)},
                   pods={"llama-sft": [pod("llama-sft", "Running")]}, progress=ProgressReport.model_validate(report))
    body, d = step(body, obs, config, now=LATER)
    st = d.status
    assert st["phase"] == "Running"
    running = cond(st, "Running")
    assert running["status"] == "True" and running["reason"] == "StageRunning"
    assert running["lastTransitionTime"] == "2025-06-01T12:05:00Z"
    assert cond(st, "Validated")["lastTransitionTime"] == "2025-06-01T12:00:00Z"  # unchanged status keeps its time
    assert st["progress"] == {"step": 420, "totalSteps": 1200, "percent": 35.0, "epoch": 1.05, "loss": 0.91,
                              "learningRate": 1e-4, "tokensPerSecond": 5210.5, "etaSeconds": 1830.0}
    assert st["progressText"] == "35%" and st["eta"] == "30m30s"  # progress.format_duration, as `kubetune run` prints it
    assert st["checkpoint"] == {"uri": "s3://ckpt/llama/sft/checkpoints/checkpoint-400", "step": 400}
    assert st["stages"][0]["phase"] == "Running" and st["stages"][0]["checkpoint"] == st["checkpoint"]
    assert {e.reason for e in d.events} == {"StageRunning", "CheckpointCommitted"}
    # a poll without a report keeps the last progress
    obs.progress = None
    _, d2 = step(body, obs, config, now=LATER)
    assert d2.status["progress"]["step"] == 420 and d2.events == []


def test_stage_success_advances_to_the_next_stage_in_the_same_pass(config):
    body, _ = step(ftj(stages=THREE), Observed(), config)
    done = k8s_job("llama-sft", conditions=[("Complete", "")], completion_time="2025-06-01T12:04:00Z")
    body, d = step(body, Observed(jobs={"llama-sft": done}, configmaps={"llama-sft": {}}), config, now=LATER)
    assert ("create", "Job", "llama-dpo") in verbs(d) and ("create", "ConfigMap", "llama-dpo") in verbs(d)
    st = d.status
    assert st["stage"] == {"name": "dpo", "index": 1, "count": 3}
    assert st["stages"][0]["phase"] == "Succeeded"
    assert st["stages"][0]["completionTime"] == "2025-06-01T12:04:00Z"
    assert st["stages"][0]["output"] == {"uri": "s3://ckpt/llama/sft/output"}
    assert st["stages"][1]["phase"] == "Pending" and "progress" not in st
    assert [e.reason for e in d.events] == ["StageSucceeded", "StageStarted"]


def test_last_stage_success_is_job_success(config):
    body, _ = step(ftj(stages=THREE[:2]), Observed(), config)
    body["status"]["stages"][0].update(phase="Succeeded", output={"uri": "s3://ckpt/llama/sft/output"})
    body["status"]["stage"] = {"name": "dpo", "index": 1, "count": 2}
    body["status"]["progress"] = {"step": 90, "totalSteps": 100, "percent": 90.0, "loss": 0.4}
    done = k8s_job("llama-dpo", conditions=[("Complete", "")], completion_time="2025-06-01T12:05:00Z")
    body, d = step(body, Observed(jobs={"llama-dpo": done}), config, now=LATER)
    st = d.status
    assert st["phase"] == "Succeeded" and cond(st, "Succeeded")["status"] == "True"
    assert cond(st, "Running")["status"] == "False" and cond(st, "Failed")["status"] == "False"
    assert st["output"] == {"uri": "s3://ckpt/llama/dpo/output"}
    assert st["completionTime"] == "2025-06-01T12:05:00Z"
    assert st["progress"]["percent"] == 100.0 and st["progress"]["step"] == 100 and st["progressText"] == "100%"
    assert "eta" not in st and d.actions == []
    assert [e.reason for e in d.events] == ["StageSucceeded", "Succeeded"]


def test_a_stage_that_ended_between_two_polls_still_reports_its_final_loss(config):
    """Rank 0's termination message on success carries its last /progress document."""
    body, _ = step(ftj(), Observed(), config)
    body["status"]["progress"] = {"step": 0, "totalSteps": 16, "percent": 0.0}  # the only poll it got
    final = {"job": "llama", "stage": "sft", "rank": 0, "phase": "finished", "step": 16, "totalSteps": 16,
             "loss": 1.25, "learningRate": 0.0, "tokensPerSecond": 812.5}
    done = k8s_job("llama-sft", conditions=[("Complete", "")], completion_time="2025-06-01T12:05:00Z")
    pods = [pod("llama-sft", "Succeeded", exit_code=0, message=json.dumps({"progress": final})),
            pod("llama-sft", "Failed", exit_code=1, message="an earlier attempt")]
    body, d = step(body, Observed(jobs={"llama-sft": done}, pods={"llama-sft": pods}), config, now=LATER)
    p = d.status["progress"]
    assert (p["step"], p["totalSteps"], p["loss"], p["tokensPerSecond"], p["percent"]) == (16, 16, 1.25, 812.5, 100.0)
    # a message that is no report (an older runtime's empty one) changes nothing
    body2, _ = step(ftj(), Observed(), config)
    body2["status"]["progress"] = {"step": 3, "totalSteps": 16, "loss": 2.0}
    plain = [pod("llama-sft", "Succeeded", exit_code=0, message="")]
    _, d2 = step(body2, Observed(jobs={"llama-sft": done}, pods={"llama-sft": plain}), config, now=LATER)
    assert d2.status["progress"]["loss"] == 2.0 and d2.status["progress"]["step"] == 16


def test_bad_input_failure_carries_the_termination_message(config):
    body, _ = step(ftj(), Observed(), config)
    failed = k8s_job("llama-sft", conditions=[("Failed", "PodFailurePolicy")], failed=1)
    msg = "data[0].source: s3://datasets/identity.json: record 3 has no `output` (format alpaca)"
    obs = Observed(jobs={"llama-sft": failed}, pods={"llama-sft": [pod("llama-sft", "Failed", exit_code=42, message=msg)]})
    body, d = step(body, obs, config, now=LATER)
    st = d.status
    assert st["phase"] == "Failed"
    f = cond(st, "Failed")
    assert f["status"] == "True" and f["reason"] == "BadInput"
    assert msg in f["message"] and "retries" not in f["message"]
    assert st["stages"][0]["phase"] == "Failed" and st["stages"][0]["message"] == msg
    assert st["restartCount"] == 0
    assert st["completionTime"] == "2025-06-01T12:05:00Z"
    assert [(e.type, e.reason) for e in d.events] == [("Warning", "Failed")]
    # terminal: nothing is recreated even if the Job disappears
    _, d2 = step(body, Observed(), config, now=LATER)
    assert d2.actions == [] and d2.status["phase"] == "Failed"


def test_retries_are_counted_and_reported(config):
    body, _ = step(ftj(), Observed(), config)
    obs = Observed(jobs={"llama-sft": k8s_job("llama-sft", failed=1, active=1)},
                   configmaps={"llama-sft": _cm(body, config)},
                   pods={"llama-sft": [pod("llama-sft", "Failed", exit_code=1, message="CUDA error"),
                                       pod("llama-sft", "Running", ip="10.0.0.6")]})
    body, d = step(body, obs, config, now=LATER)
    assert d.status["restartCount"] == 1 and d.status["stages"][0]["restarts"] == 1
    retried = [e for e in d.events if e.reason == "PodRetried"]
    assert retried and "CUDA error" in retried[0].message and "retry 1 of 3" in retried[0].message
    _, d2 = step(body, obs, config, now=LATER)
    assert not [e for e in d2.events if e.reason == "PodRetried"]
    # exhausted retries
    obs.jobs["llama-sft"] = k8s_job("llama-sft", conditions=[("Failed", "BackoffLimitExceeded")], failed=4)
    _, d3 = step(body, obs, config, now=LATER)
    assert cond(d3.status, "Failed")["reason"] == "BackoffLimitExceeded"
    assert "after 3 retries" in cond(d3.status, "Failed")["message"] and d3.status["restartCount"] == 3


def test_a_sigkill_is_retried_but_the_kernels_oom_kill_ends_the_stage_at_once(config):
    """Exit 137 is a retry (a crash resumes from the checkpoint) unless the container status says
    OOMKilled: then the operator suspends the Job before the Job controller retries it."""
    body, _ = step(ftj(), Observed(), config)
    killed = pod("llama-sft", "Failed", exit_code=137)
    obs = Observed(jobs={"llama-sft": k8s_job("llama-sft", failed=1, active=1)},
                   configmaps={"llama-sft": _cm(body, config)},
                   pods={"llama-sft": [killed, pod("llama-sft", "Running", ip="10.0.0.6")]})
    _, d = step(body, obs, config, now=LATER)
    assert d.status["phase"] != "Failed" and [e for e in d.events if e.reason == "PodRetried"]
    assert not [a for a in d.actions if a.verb == "delete"]
    killed["status"]["containerStatuses"][0]["state"]["terminated"]["reason"] = "OOMKilled"
    _, d = step(body, obs, config, now=LATER)
    assert d.status["phase"] == "Failed" and cond(d.status, "Failed")["reason"] == "OutOfMemory"
    assert "OOMKilled" in cond(d.status, "Failed")["message"] and "kubetune estimate" in cond(d.status, "Failed")["message"]
    assert [(a.verb, a.kind, a.name, a.body) for a in d.actions] == [("patch", "Job", "llama-sft",
                                                                       {"spec": {"suspend": True}})]
    assert not [e for e in d.events if e.reason == "PodRetried"]


def _gang(body, config, job, pods):
    return Observed(jobs={"llama-sft": job}, configmaps={"llama-sft": _cm(body, config)},
                    services={"llama-sft": {"metadata": {"name": "llama-sft"}}}, pods={"llama-sft": pods})


def _events(d, reason):
    return [e for e in d.events if e.reason == reason]


def test_a_failed_pod_of_a_multi_node_stage_restarts_the_whole_gang(config):
    body, d = step(ftj({"resources": {"nodes": 2, "gpusPerNode": 1}}), Observed(), config)
    assert verbs(d) == [("create", "ConfigMap", "llama-sft"), ("create", "Service", "llama-sft"),
                        ("create", "Job", "llama-sft")]
    running = [pod("llama-sft", "Running", index="0"), pod("llama-sft", "Running", index="1", ip="10.0.0.6")]
    body, d = step(body, _gang(body, config, k8s_job("llama-sft", active=2), running), config, now=LATER)
    assert d.status["phase"] == "Running" and d.actions == []

    # pod 1 fails: the Job (backoffLimit 0) fails and stops pod 0; the operator restarts both
    lost = [pod("llama-sft", "Running", index="0"),
            pod("llama-sft", "Failed", index="1", exit_code=1, message="NCCL error: remote process exited")]
    failed = k8s_job("llama-sft", conditions=[("Failed", "BackoffLimitExceeded")], failed=1, active=1)
    body, d = step(body, _gang(body, config, failed, lost), config, now=LATER)
    assert verbs(d) == [("delete", "Job", "llama-sft")] and d.actions[0].body == {"propagationPolicy": "Foreground"}
    (ev,) = _events(d, "GangRestarted")
    assert ev.type == "Warning" and "NCCL error" in ev.message and "all 2 pods" in ev.message
    assert "retry 1 of 3" in ev.message
    st = d.status
    assert st["phase"] == "Pending" and st["restartCount"] == 1 and st["stages"][0]["restarts"] == 1
    assert st["stages"][0]["restartedJob"] == "job-uid-1"
    assert cond(st, "Running")["reason"] == "Restarting" and cond(st, "Failed")["status"] == "False"
    # seen again before the delete shows: counted once, deleted again (idempotent)
    body, d = step(body, _gang(body, config, failed, lost), config, now=LATER)
    assert verbs(d) == [("delete", "Job", "llama-sft")] and not d.events and d.status["restartCount"] == 1
    # the Job waits (foreground) for its pods to go
    going = k8s_job("llama-sft", conditions=[("Failed", "BackoffLimitExceeded")], failed=1, deleting=True)
    body, d = step(body, _gang(body, config, going, lost), config, now=LATER)
    assert d.actions == [] and not d.events and cond(d.status, "Running")["reason"] == "Restarting"
    # gone: the same Job again, quietly (GangRestarted said it all), no JobRecreated warning
    body, d = step(body, Observed(configmaps={"llama-sft": _cm(body, config)}, services={"llama-sft": {}}), config,
                   now=LATER)
    assert verbs(d) == [("create", "Job", "llama-sft")] and not d.events
    assert "restartedJob" not in d.status["stages"][0] and d.status["restartCount"] == 1
    assert d.actions[0].body["spec"]["backoffLimit"] == 0

    # two more failures use up backoffLimit 3 ...
    for n, uid in ((2, "job-uid-2"), (3, "job-uid-3")):
        f = k8s_job("llama-sft", conditions=[("Failed", "BackoffLimitExceeded")], failed=1, uid=uid)
        body, d = step(body, _gang(body, config, f, lost), config, now=LATER)
        assert f"retry {n} of 3" in _events(d, "GangRestarted")[0].message
        body, d = step(body, Observed(configmaps={"llama-sft": _cm(body, config)}, services={"llama-sft": {}}),
                       config, now=LATER)
    # ... and the fourth fails the stage
    f = k8s_job("llama-sft", conditions=[("Failed", "BackoffLimitExceeded")], failed=1, uid="job-uid-4")
    body, d = step(body, _gang(body, config, f, lost), config, now=LATER)
    assert d.actions == [] and d.status["phase"] == "Failed" and not _events(d, "GangRestarted")
    failed_cond = cond(d.status, "Failed")
    assert failed_cond["reason"] == "BackoffLimitExceeded" and "after 3 retries" in failed_cond["message"]
    assert "NCCL error" in failed_cond["message"] and d.status["restartCount"] == 3


def test_a_disrupted_gang_restarts_without_using_a_retry_and_bad_input_is_final(config):
    body, _ = step(ftj({"resources": {"nodes": 2, "gpusPerNode": 1}}), Observed(), config)
    preempted = k8s_job("llama-sft", conditions=[("Failed", "PodFailurePolicy")], failed=1, message=(
        "Pod ml/llama-sft-1-abcde has condition DisruptionTarget matching FailJob rule at index 1"))
    pods = [pod("llama-sft", "Running", index="0"), pod("llama-sft", "Failed", index="1", exit_code=143, disrupted=True)]
    body, d = step(body, _gang(body, config, preempted, pods), config, now=LATER)
    (ev,) = _events(d, "GangRestarted")
    assert "not counted" in ev.message and d.status["restartCount"] == 0
    assert verbs(d) == [("delete", "Job", "llama-sft")]

    body, _ = step(ftj({"resources": {"nodes": 2, "gpusPerNode": 1}}), Observed(), config)
    bad = k8s_job("llama-sft", conditions=[("Failed", "PodFailurePolicy")], failed=1, message=(
        "Container trainer for pod ml/llama-sft-0-abcde failed with exit code 42 matching FailJob rule at index 0"))
    pods = [pod("llama-sft", "Failed", index="0", exit_code=42, message="data[0].source: no such file")]
    _, d = step(body, _gang(body, config, bad, pods), config, now=LATER)
    assert d.actions == [] and d.status["phase"] == "Failed" and cond(d.status, "Failed")["reason"] == "BadInput"
    assert not _events(d, "GangRestarted")


def test_deleted_job_is_recreated_and_orphan_is_adopted(config):
    body, _ = step(ftj(), Observed(), config)
    obs = Observed(jobs={"llama-sft": k8s_job("llama-sft", active=1)}, configmaps={"llama-sft": _cm(body, config)},
                   pods={"llama-sft": [pod("llama-sft", "Running")]})
    body, _ = step(body, obs, config, now=LATER)
    _, d = step(body, Observed(configmaps={"llama-sft": _cm(body, config)}), config, now=LATER)
    assert verbs(d) == [("create", "Job", "llama-sft")]
    assert [(e.type, e.reason) for e in d.events] == [("Warning", "JobRecreated")]
    orphan = Observed(jobs={"llama-sft": k8s_job("llama-sft", owned=False, active=1)},
                      configmaps={"llama-sft": _cm(body, config)}, pods={"llama-sft": [pod("llama-sft", "Running")]})
    _, d = step(body, orphan, config, now=LATER)
    assert verbs(d) == [("patch", "Job", "llama-sft")]
    assert d.actions[0].body["metadata"]["ownerReferences"][0]["uid"] == UID


def test_job_of_an_older_incarnation_is_deleted_first(config):
    old = k8s_job("llama-sft")
    old["metadata"]["ownerReferences"][0]["uid"] = "old-uid"
    d = reconcile(ftj(), Observed(jobs={"llama-sft": old}), config, now=NOW)
    assert ("delete", "Job", "llama-sft") in verbs(d) and ("create", "Job", "llama-sft") not in verbs(d)


def test_configmap_follows_the_spec(config):
    body, _ = step(ftj(), Observed(), config)
    stale = _cm(body, config)
    stale["data"] = {"stage.json": "{}"}
    _, d = step(body, Observed(jobs={"llama-sft": k8s_job("llama-sft", active=1)}, configmaps={"llama-sft": stale}),
                config)
    (a,) = d.actions
    assert (a.verb, a.kind) == ("patch", "ConfigMap") and a.body["data"] == _cm(body, config)["data"]


def test_suspend_and_resume(config):
    body, _ = step(ftj(), Observed(), config)
    body["status"]["progress"] = {"step": 10, "totalSteps": 100, "percent": 10.0}
    running = Observed(jobs={"llama-sft": k8s_job("llama-sft", active=1)}, configmaps={"llama-sft": _cm(body, config)},
                       pods={"llama-sft": [pod("llama-sft", "Running")]})
    body, _ = step(body, running, config)
    body["spec"]["suspend"] = True
    body["metadata"]["generation"] = 2
    body, d = step(body, running, config, now=LATER)
    assert [(a.verb, a.body) for a in d.actions] == [("patch", {"spec": {"suspend": True}})]
    st = d.status
    assert st["phase"] == "Suspended" and cond(st, "Suspended")["status"] == "True"
    assert cond(st, "Suspended")["observedGeneration"] == 2 and cond(st, "Running")["status"] == "False"
    assert st["progress"]["step"] == 10
    assert [e.reason for e in d.events] == ["Suspended"]
    suspended = Observed(jobs={"llama-sft": k8s_job("llama-sft", suspend=True)}, configmaps=running.configmaps)
    body, d = step(body, suspended, config, now=LATER)
    assert d.actions == [] and d.events == []
    body["spec"]["suspend"] = False
    body, d = step(body, suspended, config, now=LATER)
    assert [(a.verb, a.body) for a in d.actions] == [("patch", {"spec": {"suspend": False}})]
    assert d.status["phase"] == "Pending" and cond(d.status, "Suspended")["status"] == "False"
    assert [e.reason for e in d.events] == ["Resumed"]


def test_kueue_jobs_start_suspended_and_user_suspend_deletes_them(config):
    labels = {"kueue.x-k8s.io/queue-name": "gpus"}
    d = reconcile(ftj(labels=labels), Observed(), config, now=NOW)
    job = [a for a in d.actions if a.kind == "Job"][0].body
    assert job["spec"]["suspend"] is True and job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpus"
    body = ftj(labels=labels, status=d.status)
    queued = Observed(jobs={"llama-sft": k8s_job("llama-sft", suspend=True)}, configmaps={"llama-sft": _cm(body, config)})
    body, d = step(body, queued, config)
    assert d.actions == [] and cond(d.status, "Running")["reason"] == "Queued"  # never unsuspends a Kueue Job
    body["spec"]["suspend"] = True
    body, d = step(body, Observed(jobs={"llama-sft": k8s_job("llama-sft")}, configmaps=queued.configmaps), config)
    assert verbs(d) == [("delete", "Job", "llama-sft")] and d.status["phase"] == "Suspended"
    body, d = step(body, Observed(configmaps=queued.configmaps), config)
    assert d.actions == []
    body["spec"]["suspend"] = False
    _, d = step(body, Observed(configmaps=queued.configmaps), config)
    assert verbs(d) == [("create", "Job", "llama-sft")] and d.actions[0].body["spec"]["suspend"] is True
    assert [e.reason for e in d.events] == ["Resumed"]


def test_spec_queue_name_queues_the_jobs_and_the_status_says_kueues_reason(config):
    body = ftj({"queueName": "team-a"})
    d = reconcile(body, Observed(), config, now=NOW)
    job = [a for a in d.actions if a.kind == "Job"][0].body
    assert job["spec"]["suspend"] is True and job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    body = ftj({"queueName": "team-a"}, status=d.status)
    cms = {"llama-sft": _cm(body, config)}
    waiting = {"status": {"conditions": [{"type": "QuotaReserved", "status": "False", "reason": "Pending",
               "message": "couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu "
                          "in flavor gpu, 1 more needed"}]}}
    queued = Observed(jobs={"llama-sft": k8s_job("llama-sft", suspend=True)}, configmaps=cms,
                      workloads={"llama-sft": waiting})
    body, d = step(body, queued, config)
    running = cond(d.status, "Running")
    assert d.actions == [] and d.status["phase"] == "Pending" and running["reason"] == "Queued"
    assert running["message"].endswith("(queue team-a): couldn't assign flavors to pod set main: insufficient "
                                       "unused quota for nvidia.com/gpu in flavor gpu, 1 more needed")
    # admitted: Kueue unsuspends the Job, its pod runs
    body, d = step(body, Observed(jobs={"llama-sft": k8s_job("llama-sft")}, configmaps=cms,
                                  pods={"llama-sft": [pod("llama-sft", "Running")]}), config)
    assert d.status["phase"] == "Running" and d.actions == []
    # preempted: Kueue suspends the Job again (its pods save a checkpoint on SIGTERM)
    evicted = {"status": {"conditions": [
        {"type": "Evicted", "status": "True", "reason": "Preempted",
         "message": "Preempted to accommodate a workload (UID: 1) due to prioritization in the ClusterQueue"},
        {"type": "QuotaReserved", "status": "False", "reason": "Pending", "message": "waiting"}]}}
    body, d = step(body, Observed(jobs={"llama-sft": k8s_job("llama-sft", suspend=True)}, configmaps=cms,
                                  workloads={"llama-sft": evicted}), config)
    assert d.actions == [] and d.status["phase"] == "Pending" and cond(d.status, "Running")["reason"] == "Queued"
    assert [(e.type, e.reason) for e in d.events] == [("Warning", "Preempted")]
    assert "Preempted: Preempted to accommodate" in d.events[0].message and "resumes" in d.events[0].message
    _, d = step(body, Observed(jobs={"llama-sft": k8s_job("llama-sft", suspend=True)}, configmaps=cms,
                               workloads={"llama-sft": evicted}), config)
    assert d.events == []  # said once


@pytest.mark.parametrize("spec,reason,needle", [
    ({"storage": {}}, "StorageRequired", "spec.storage.uri"),
    ({"stages": [{"name": "sft", "type": "sft", "method": "qlora"}]}, "InvalidSpec", "quantization"),
    ({"stages": [{"name": "sft", "type": "sft", "learningRate": 1}]}, "InvalidSpec", "learningRate"),
])
def test_invalid_spec_is_a_condition_not_a_crash(config, spec, reason, needle):
    d = reconcile(ftj(spec), Observed(), config, now=NOW)
    assert d.actions == []
    v = cond(d.status, "Validated")
    assert v["status"] == "False" and v["reason"] == reason and needle in v["message"]
    assert cond(d.status, "Failed")["reason"] == reason and d.status["phase"] == "Failed"
    assert [(e.type, e.reason) for e in d.events] == [("Warning", reason)]
    # fixing the spec starts the job
    body = ftj(status=d.status, generation=2)
    d2 = reconcile(body, Observed(), config, now=LATER)
    assert ("create", "Job", "llama-sft") in verbs(d2)
    assert cond(d2.status, "Validated")["status"] == "True" and cond(d2.status, "Failed")["status"] == "False"


def test_spec_change_after_success_does_not_retrain(config):
    body, _ = step(ftj(), Observed(), config)
    done = Observed(jobs={"llama-sft": k8s_job("llama-sft", conditions=[("Complete", "")])})
    body, _ = step(body, done, config, now=LATER)
    assert body["status"]["phase"] == "Succeeded"
    body["spec"]["stages"][0]["hyperparameters"] = {"epochs": 5}
    body["metadata"]["generation"] = 2
    body, d = step(body, done, config, now=LATER)
    assert d.actions == [] and d.status["phase"] == "Succeeded" and d.status["observedGeneration"] == 2
    assert [(e.type, e.reason) for e in d.events] == [("Warning", "SpecChangeIgnored")]
    assert cond(d.status, "Succeeded")["observedGeneration"] == 2
    _, d = step(body, done, config, now=LATER)
    assert d.events == []


def test_ttl_deletes_children_after_the_job_finished(config):
    body, _ = step(ftj({"runPolicy": {"ttlSecondsAfterFinished": 600}}), Observed(), config)
    done = Observed(jobs={"llama-sft": k8s_job("llama-sft", conditions=[("Complete", "")],
                                               completion_time="2025-06-01T12:00:00Z")},
                    configmaps={"llama-sft": {"metadata": {"name": "llama-sft", "ownerReferences": [{"kind": "FineTuneJob", "uid": UID}]}}})
    body, _ = step(body, done, config, now=NOW)
    assert next_check_seconds(body, now=NOW) == 600
    _, d = step(body, done, config, now=NOW + dt.timedelta(seconds=599))
    assert d.actions == []
    _, d = step(body, done, config, now=NOW + dt.timedelta(seconds=600))
    assert sorted(verbs(d)) == [("delete", "ConfigMap", "llama-sft"), ("delete", "Job", "llama-sft")]
    assert [e.reason for e in d.events] == ["ChildrenDeleted"] and d.status["phase"] == "Succeeded"


def test_children_of_removed_stages_are_deleted(config):
    body, _ = step(ftj(stages=THREE), Observed(), config)
    body["spec"]["stages"] = [{"name": "sft", "type": "sft"}]
    extra = k8s_job("llama-dpo")
    obs = Observed(jobs={"llama-sft": k8s_job("llama-sft", active=1), "llama-dpo": extra},
                   configmaps={"llama-sft": _cm(body, config)})
    _, d = step(body, obs, config)
    assert verbs(d) == [("delete", "Job", "llama-dpo")]


def test_pending_reason_names_the_scheduler_message(config):
    body, _ = step(ftj(), Observed(), config)
    p = pod("llama-sft", "Pending")
    p["status"]["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                  "message": "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."}]
    _, d = step(body, Observed(jobs={"llama-sft": k8s_job("llama-sft", active=1)},
                               configmaps={"llama-sft": _cm(body, config)}, pods={"llama-sft": [p]}), config)
    assert "Insufficient nvidia.com/gpu" in cond(d.status, "Running")["message"]


def test_helpers():
    assert [format_duration(x) for x in (42, 1830, 5400, 3600, 90000, 180000, None, -1)] == \
        ["42s", "30m30s", "1h30m", "1h00m", "25h00m", "2d02h", None, None]
    assert s.progress_from_report(ProgressReport(phase="finished", step=7, total_steps=10)) == \
        {"step": 10, "totalSteps": 10, "percent": 100.0, "etaSeconds": 0.0}
    assert s.progress_from_report(ProgressReport.model_validate({"loss": float("nan"), "newerKey": 1})) == {}
    with pytest.raises(ValidationError):
        ProgressReport.model_validate({"step": "x"})
    assert merge_patch({"a": 1, "b": {"c": 1, "d": 2}}, {"b": {"c": 1}, "e": 3}) == {"a": None, "b": {"d": None}, "e": 3}
    conds = s.set_condition([], "Running", True, "R", "m", 1, NOW)
    again = s.set_condition(conds, "Running", True, "R2", "m2", 2, LATER)
    assert again[0]["lastTransitionTime"] == "2025-06-01T12:00:00Z" and again[0]["reason"] == "R2"
    flipped = s.set_condition(again, "Running", False, "R3", "", 2, LATER)
    assert flipped[0]["lastTransitionTime"] == "2025-06-01T12:05:00Z"


def test_the_status_is_checked_against_its_model():
    """A key the CRD's status schema does not know would be pruned by the apiserver in silence:
    `status.checked` (run by every reconcile) raises instead. None is a merge patch's deletion."""
    good = {"phase": "Running", "eta": None, "restartCount": 1, "progress": {"step": 3, "loss": None},
            "stages": [{"name": "sft", "type": "sft", "phase": "Running", "restarts": 1}]}
    assert s.checked(good) is good
    for bad in ({"phse": "Running"}, {"restart_count": 1}, {"restartCount": "1"}, {"progress": {"stepp": 3}},
                {"stages": [{"name": "sft", "type": "sft", "phase": "Running", "restart": 1}]},
                {"stage": {"name": "sft", "index": 0}}):
        with pytest.raises(ValueError):
            s.checked(bad)


def test_a_finished_pod_keeps_the_stage_running_until_the_job_completes(config):
    body, _ = step(ftj(), Observed(), config)
    obs = Observed(jobs={"llama-sft": k8s_job("llama-sft", active=1)}, configmaps={"llama-sft": _cm(body, config)},
                   pods={"llama-sft": [pod("llama-sft", "Running")]})
    body, _ = step(body, obs, config)
    obs.pods = {"llama-sft": [pod("llama-sft", "Succeeded", exit_code=0)]}
    _, d = step(body, obs, config)
    assert d.status["phase"] == "Running" and d.events == []


def test_metric_changes_between_statuses():
    """The operator's counters come from comparing the status before and after a reconcile."""
    from kubetune.operator.metrics import changes

    old = {"stages": [{"name": "sft", "phase": "Pending"}], "restartCount": 0}
    new = {"stages": [{"name": "sft", "phase": "Running"}, {"name": "dpo", "phase": "Pending"}],
           "restartCount": 2, "startTime": "2026-01-01T00:00:42Z"}
    seen = changes(old, new, created="2026-01-01T00:00:00Z")
    assert seen == {"transitions": ["Running", "Pending"], "restarts": 2, "first_running_seconds": 42.0}
    # nothing changed: nothing counted
    assert changes(new, new, created="2026-01-01T00:00:00Z") == {"transitions": [], "restarts": 0, "first_running_seconds": None}


def test_an_eval_stage_puts_its_scores_in_the_status(config):
    """An eval stage's /progress report carries its short summary: status.stages[].eval, from the
    polls and from rank 0's termination message (a short eval often ends between two polls)."""
    from kubetune.runtime.api.spec import FineTuneJobStatus

    stages = [{"name": "eval", "type": "eval"}, {"name": "sft", "type": "sft"}]
    body, _ = step(ftj(stages=stages), Observed(), config)
    scores = {"accuracy": 62.5, "rouge-1": 50.0, "rouge-2": 30.5, "rouge-l": 45.25, "bleu-4": 20.0, "samples": 24}
    report = {"job": "llama", "stage": "eval", "rank": 0, "phase": "running", "step": 0, "totalSteps": 0,
              "eval": {"accuracy": 50.0, "samples": 8}}
    obs = Observed(jobs={"llama-eval": k8s_job("llama-eval", active=1)}, configmaps={"llama-eval": _cm(body, config)},
                   pods={"llama-eval": [pod("llama-eval", "Running")]}, progress=ProgressReport.model_validate(report))
    body, d = step(body, obs, config, now=LATER)
    assert d.status["stages"][0]["eval"] == {"accuracy": 50.0, "samples": 8}
    final = dict(report, phase="finished", eval=scores)
    done = k8s_job("llama-eval", conditions=[("Complete", "")], completion_time="2025-06-01T12:05:00Z")
    pods = [pod("llama-eval", "Succeeded", exit_code=0, message=json.dumps({"progress": final}))]
    body, d = step(body, Observed(jobs={"llama-eval": done}, pods={"llama-eval": pods}), config, now=LATER)
    rec = d.status["stages"][0]
    assert rec["phase"] == "Succeeded" and rec["eval"] == scores
    assert ("create", "Job", "llama-sft") in verbs(d)
    [ok] = [e for e in d.events if e.reason == "StageSucceeded"]
    assert "accuracy 62.5, rouge-1 50, rouge-2 30.5, rouge-l 45.25, bleu-4 20" in ok.message
    FineTuneJobStatus.model_validate(d.status)  # the CRD's status schema (from this model) accepts it
    # later reconciles (no pods any more) keep the scores
    _, d = step(body, Observed(jobs={"llama-eval": done}), config, now=LATER)
    assert d.status["stages"][0]["eval"] == scores

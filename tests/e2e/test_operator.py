"""The operator end to end: a real kube-apiserver, controller-manager (Job controller, garbage
collector), scheduler and the session's node (the real kubelet, or the process kubelet where it
cannot run); the operator runs as a real process
(`python -m kubetune.operator`), FineTuneJobs go in through `kubectl apply`.

The training pods run a FAKE RUNTIME (operatorlib.FAKE_RUNTIME, passed inline with
`--runtime-command python -c ...`, in the built runtime image on the real node): a small script that honours the runtime's contracts — reads stage.json, serves /progress on
$POD_IP:$KUBETUNE_METRICS_PORT, commits checkpoints with a LATEST pointer and resumes from it,
commits the output with COMMITTED.json, exits 42 with a termination message on bad input — but
trains nothing. It stands in for `python -m kubetune.runtime stage` so that these tests check
the operator alone; the full e2e with real training of a tiny model is a separate test.
Storage is a bucket of the session's S3 server (auth on; credentials through the Secret).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import pytest

from cluster.util import wait_for
from operatorlib import OperatorProcess, apply, condition, events, ftj, jobs, pods, quickstart, wait_status

pytestmark = pytest.mark.e2e


# --------------------------------------------------------------------------------------- tests


def test_quickstart_runs_to_success_then_delete_collects_children(control_plane, kube, operator, namespace, store):
    apply(control_plane, quickstart(store, step_s=0.5, max_steps=8), namespace)
    running = wait_status(kube, namespace, "quickstart",
                          lambda s: s.get("phase") == "Running" and (s.get("progress") or {}).get("step"),
                          90, "Running with progress", operator)
    st = running["status"]
    assert st["stage"] == {"name": "sft", "index": 0, "count": 1}
    assert condition(running, "Running")["status"] == "True"
    assert condition(running, "Validated")["status"] == "True"
    assert st["progress"]["totalSteps"] == 8 and "loss" in st["progress"] and st["progressText"].endswith("%")

    # the children: one ConfigMap and one Job, labelled and owned
    (job,) = jobs(kube, namespace, "quickstart")
    assert job["metadata"]["name"] == "quickstart-sft"
    assert job["metadata"]["labels"]["kubetune.io/stage"] == "sft"
    assert job["metadata"]["ownerReferences"][0]["uid"] == running["metadata"]["uid"]
    cm = kube.get(f"/api/v1/namespaces/{namespace}/configmaps/quickstart-sft")
    assert json.loads(cm["data"]["stage.json"])["io"]["output"].endswith("/quickstart/sft/output")

    # the printer columns, as a user sees them
    r = control_plane.kubectl("get", "ftj", "-n", namespace)
    assert r.returncode == 0, r.stderr
    header, row = r.stdout.splitlines()[:2]
    assert header.split() == ["NAME", "PHASE", "STAGE", "PROGRESS", "LOSS", "ETA", "AGE"]
    assert row.split()[:3] == ["quickstart", "Running", "sft"] and row.split()[3].endswith("%")

    done = wait_status(kube, namespace, "quickstart", lambda s: s.get("phase") in ("Succeeded", "Failed"), 90,
                       "finished", operator)
    st = done["status"]
    assert st["phase"] == "Succeeded", st
    assert condition(done, "Succeeded")["status"] == "True" and condition(done, "Running")["status"] == "False"
    assert st["output"]["uri"] == store.uri("saves", "quickstart", "sft", "output")
    assert store.json("saves", "quickstart", "sft", "output", "COMMITTED.json")["steps"] == 8
    assert st["stages"][0]["phase"] == "Succeeded" and st["stages"][0]["checkpoint"]["step"] >= 2
    assert st["progressText"] == "100%" and st["startTime"] and st["completionTime"]
    assert st["restartCount"] == 0
    seen = wait_for(lambda: (ev := events(kube, namespace, "quickstart")) and "Succeeded" in ev and ev, 20, "events")
    assert {"StageStarted", "StageRunning", "StageSucceeded", "Succeeded"} <= set(seen)
    r = control_plane.kubectl("describe", "ftj", "-n", namespace, "quickstart")
    assert "StageSucceeded" in r.stdout
    # the operator's own metrics
    with urllib.request.urlopen(f"http://127.0.0.1:{operator.metrics_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    assert "kubetune_operator_reconciles_total" in text
    assert 'kubetune_operator_child_actions_total{kind="Job",result="created",verb="create"}' in text

    # delete → children garbage-collected, storage kept
    r = control_plane.kubectl("delete", "ftj", "-n", namespace, "quickstart", "--wait=true", "--timeout=60s", timeout=70)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: not jobs(kube, namespace, "quickstart"), 60, "Job garbage-collected")
    wait_for(lambda: not kube.get(f"/api/v1/namespaces/{namespace}/configmaps",
                                  labelSelector="kubetune.io/job=quickstart")["items"], 60, "ConfigMap collected")
    wait_for(lambda: not pods(kube, namespace, "quickstart"), 60, "pods collected")
    assert store.exists("saves", "quickstart", "sft", "output", "COMMITTED.json")


def test_pipeline_runs_stage_after_stage_across_an_operator_restart(control_plane, kube, operator, namespace, store):
    stages = [{"name": "sft", "type": "sft"}, {"name": "dpo", "type": "dpo"}, {"name": "merge", "type": "export"}]
    apply(control_plane, quickstart(store, name="pipe", step_s=0.3, max_steps=6, stages=stages), namespace)
    wait_status(kube, namespace, "pipe", lambda s: (s.get("stage") or {}).get("name") == "dpo", 90,
                "second stage", operator)
    operator.kill()  # a crash mid-run
    time.sleep(2)
    operator.start()
    done = wait_status(kube, namespace, "pipe", lambda s: s.get("phase") in ("Succeeded", "Failed"), 120,
                       "pipeline finished", operator)
    st = done["status"]
    assert st["phase"] == "Succeeded", st
    assert [r["phase"] for r in st["stages"]] == ["Succeeded"] * 3
    assert st["output"]["uri"] == store.uri("saves", "pipe", "merge", "output")
    # exactly one Job per stage, created in order; each stage read the one before it
    names = sorted((j["metadata"]["creationTimestamp"], j["metadata"]["name"]) for j in jobs(kube, namespace, "pipe"))
    assert [n for _, n in names] == ["pipe-sft", "pipe-dpo", "pipe-merge"]
    assert all(len([p for p in pods(kube, namespace, "pipe")
                    if p["metadata"]["labels"]["kubetune.io/stage"] == s]) == 1 for s in ("sft", "dpo", "merge"))
    dpo = store.json("saves", "pipe", "dpo", "output", "COMMITTED.json")
    assert dpo["policy"]["adapter"] == store.uri("saves", "pipe", "sft", "output")
    assert events(kube, namespace, "pipe").count("StageStarted") == 3


def test_killed_pod_resumes_from_checkpoint(control_plane, kube, operator, namespace, store):
    apply(control_plane, quickstart(store, name="resume", step_s=0.4, max_steps=14, every=2), namespace)
    wait_status(kube, namespace, "resume", lambda s: ((s.get("checkpoint") or {}).get("step") or 0) >= 4, 90,
                "a checkpoint at step ≥ 4", operator)
    (p,) = [p for p in pods(kube, namespace, "resume") if p["status"].get("phase") == "Running"]
    r = control_plane.kubectl("delete", "pod", "-n", namespace, p["metadata"]["name"], "--wait=false")
    assert r.returncode == 0, r.stderr
    done = wait_status(kube, namespace, "resume", lambda s: s.get("phase") in ("Succeeded", "Failed"), 120,
                       "finished after the pod was killed", operator)
    assert done["status"]["phase"] == "Succeeded", done["status"]
    committed = store.json("saves", "resume", "sft", "output", "COMMITTED.json")
    assert committed["resumedFrom"] >= 4, committed
    assert done["status"]["restartCount"] >= 1
    assert "PodRetried" in events(kube, namespace, "resume")


def test_suspend_then_resume(control_plane, kube, operator, namespace, store):
    apply(control_plane, quickstart(store, name="pause", step_s=0.4, max_steps=14, every=2), namespace)
    wait_status(kube, namespace, "pause", lambda s: ((s.get("checkpoint") or {}).get("step") or 0) >= 2, 90,
                "a first checkpoint", operator)
    r = control_plane.kubectl("patch", "ftj", "-n", namespace, "pause", "--type=merge", "-p", '{"spec":{"suspend":true}}')
    assert r.returncode == 0, r.stderr
    st = wait_status(kube, namespace, "pause", lambda s: s.get("phase") == "Suspended", 30, "Suspended", operator)
    assert condition(st, "Suspended")["status"] == "True"
    job = kube.get(f"/apis/batch/v1/namespaces/{namespace}/jobs/pause-sft")
    assert job["spec"]["suspend"] is True
    wait_for(lambda: not [p for p in pods(kube, namespace, "pause") if p["status"].get("phase") in ("Pending", "Running")],
             60, "pods gone while suspended")
    kept = ftj(kube, namespace, "pause")["status"]
    assert kept["progress"]["step"] >= 2 and kept["phase"] == "Suspended"
    r = control_plane.kubectl("patch", "ftj", "-n", namespace, "pause", "--type=merge", "-p", '{"spec":{"suspend":false}}')
    assert r.returncode == 0, r.stderr
    done = wait_status(kube, namespace, "pause", lambda s: s.get("phase") in ("Succeeded", "Failed"), 120,
                       "finished after resume", operator)
    assert done["status"]["phase"] == "Succeeded", done["status"]
    committed = store.json("saves", "pause", "sft", "output", "COMMITTED.json")
    assert committed["resumedFrom"] >= 2
    seen = events(kube, namespace, "pause")
    assert "Suspended" in seen and "Resumed" in seen and "PodRetried" not in seen
    # the Job controller does not count the pod a suspend stopped as failed, so neither do we
    (job,) = jobs(kube, namespace, "pause")
    assert done["status"]["restartCount"] == 0 and not job["status"].get("failed")


def test_bad_dataset_fails_at_once_with_the_reason(control_plane, kube, operator, namespace, store):
    doc = quickstart(store, name="baddata")
    doc["spec"]["data"][0]["source"] = store.uri("missing.json")
    apply(control_plane, doc, namespace)
    done = wait_status(kube, namespace, "baddata", lambda s: s.get("phase") in ("Succeeded", "Failed"), 90,
                       "finished", operator)
    failed = condition(done, "Failed")
    assert done["status"]["phase"] == "Failed" and failed["status"] == "True"
    assert failed["reason"] == "BadInput"
    assert "missing.json: file not found" in failed["message"] and "data[0].source" in failed["message"]
    assert len(pods(kube, namespace, "baddata")) == 1  # no retries
    assert done["status"]["restartCount"] == 0
    (job,) = jobs(kube, namespace, "baddata")
    assert job["status"].get("failed") == 1
    time.sleep(3)  # and nothing is retried or recreated afterwards
    assert len(pods(kube, namespace, "baddata")) == 1 and len(jobs(kube, namespace, "baddata")) == 1


def test_missing_storage_is_a_condition(control_plane, kube, operator, namespace, store):
    doc = quickstart(store, name="nostore")
    del doc["spec"]["storage"]
    apply(control_plane, doc, namespace)
    st = wait_status(kube, namespace, "nostore", lambda s: s.get("conditions"), 30, "conditions", operator)
    v = condition(st, "Validated")
    assert v["status"] == "False" and v["reason"] == "StorageRequired" and "spec.storage.uri" in v["message"]
    assert not jobs(kube, namespace, "nostore")
    # fixing the spec starts it; ttlSecondsAfterFinished then cleans the children, not the outputs
    fix = {"spec": {"storage": store.storage("nostore"), "runPolicy": {"ttlSecondsAfterFinished": 2}}}
    r = control_plane.kubectl("patch", "ftj", "-n", namespace, "nostore", "--type=merge", "-p", json.dumps(fix))
    assert r.returncode == 0, r.stderr
    wait_status(kube, namespace, "nostore", lambda s: s.get("phase") == "Succeeded", 90, "Succeeded after fix", operator)
    wait_for(lambda: not jobs(kube, namespace, "nostore") and not pods(kube, namespace, "nostore") and not kube.get(
        f"/api/v1/namespaces/{namespace}/configmaps", labelSelector="kubetune.io/job=nostore")["items"], 60,
        "children deleted after the TTL")
    st = ftj(kube, namespace, "nostore")["status"]
    assert st["phase"] == "Succeeded" and st["output"]["uri"].endswith("/nostore/sft/output")
    assert store.exists("saves", "nostore", "sft", "output", "COMMITTED.json")
    assert "ChildrenDeleted" in events(kube, namespace, "nostore")
    # a spec change after the end does not retrain
    r = control_plane.kubectl("patch", "ftj", "-n", namespace, "nostore", "--type=merge", "-p",
                              '{"spec":{"checkpoint":{"everySteps":3}}}')
    assert r.returncode == 0, r.stderr
    wait_for(lambda: "SpecChangeIgnored" in events(kube, namespace, "nostore"), 30, "SpecChangeIgnored event")
    # the event is posted before the status write (an operator killed in between still leaves it), so the
    # new observedGeneration follows it shortly
    wait_status(kube, namespace, "nostore", lambda s: s.get("observedGeneration") == 3, 30,
                "observedGeneration 3 after the ignored change", operator)
    assert not jobs(kube, namespace, "nostore") and ftj(kube, namespace, "nostore")["status"]["phase"] == "Succeeded"
    assert operator.healthy()


def test_two_peered_replicas_never_both_act(control_plane, kube, operator, namespace, store, tmp_path):
    """Two operators in one kopf peering: the higher priority works, the other pauses."""
    operator.stop()  # the standalone operator of the other tests is not part of the peering
    manifests = subprocess.run(
        [sys.executable, "-m", "kubetune.operator", "--print-peering-manifests", "--peering", "e2e-peering"],
        capture_output=True, text=True, check=True).stdout
    # the peering object can be applied once its CRD is served
    wait_for(lambda: control_plane.kubectl("apply", "-f", "-", input=manifests).returncode == 0, 30, "peering applied")
    replicas = []
    try:
        for prio in (100, 200):
            op = OperatorProcess(control_plane, tmp_path / f"replica-{prio}", peering=("e2e-peering", prio),
                                 runtime_image=operator.runtime_image)
            op.start()
            replicas.append(op)
        time.sleep(3)  # let them see each other
        apply(control_plane, quickstart(store, name="peered"), namespace)
        wait_status(kube, namespace, "peered", lambda s: s.get("phase") == "Succeeded", 90, "Succeeded", replicas[1])
        low, high = (op.tail(400) for op in replicas)
        assert "create Job peered-sft" in high
        assert "peered" not in low and "Pausing" in low, low
        assert len(jobs(kube, namespace, "peered")) == 1
    finally:
        for op in replicas:
            op.stop()
        operator.start()

"""`kubetune get/describe/logs/watch` (and `kubectl kubetune …`) on the real control plane.

No operator runs here: the test writes a FineTuneJob's status through the status subresource,
exactly where the operator writes it, plus an Event, and a pod labelled like the operator's
stage pods (kubetune.io/job, kubetune.io/stage, completion index 0, container `trainer`) run by
the process kubelet.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from cluster.util import wait_for
from kubetune.runtime.cli import main

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "finetunejob.yaml"
G = "/apis/kubetune.io/v1alpha1"


@pytest.fixture(scope="module")
def crd(control_plane, kube):
    r = control_plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
    assert r.returncode == 0, r.stdout + r.stderr
    # (not `kubectl wait`: it errors out when it looks before the CRD has any status.conditions)
    wait_for(lambda: any(c["type"] == "Established" and c["status"] == "True" for c in
                         (kube.get("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/finetunejobs.kubetune.io")
                          .get("status") or {}).get("conditions") or []), 60, "the FineTuneJob CRD to be established")
    wait_for(lambda: control_plane.kubectl("get", "ftj", "-A").returncode == 0, 30, "ftj in discovery")


def _now(offset: float = 0) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + offset))


def _job(name: str) -> dict:
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name},
            "spec": {"model": {"name": "Qwen/Qwen2.5-0.5B-Instruct"},
                     "data": [{"name": "identity", "source": "s3://datasets/identity.json"}],
                     "stages": [{"name": "sft", "type": "sft", "method": "lora"},
                                {"name": "dpo", "type": "dpo"}, {"name": "merge", "type": "export"}],
                     "storage": {"uri": "s3://ckpt/demo/"}}}


RUNNING = {
    "phase": "Running", "observedGeneration": 1,
    "conditions": [{"type": "Validated", "status": "True", "reason": "SpecValid", "message": "3 stages", "lastTransitionTime": _now(-600)},
                   {"type": "Running", "status": "True", "reason": "StageRunning", "message": "stage dpo (2/3)", "lastTransitionTime": _now(-300)}],
    "stage": {"name": "dpo", "index": 1, "count": 3},
    "stages": [{"name": "sft", "type": "sft", "phase": "Succeeded", "startTime": _now(-600), "completionTime": _now(-300),
                "output": {"uri": "s3://ckpt/demo/sft/output"}, "restarts": 1},
               {"name": "dpo", "type": "dpo", "phase": "Running", "startTime": _now(-290),
                "checkpoint": {"uri": "s3://ckpt/demo/dpo/checkpoints/checkpoint-400", "step": 400}}],
    "progress": {"step": 420, "totalSteps": 1200, "percent": 35.0, "epoch": 1.05, "loss": 0.9132, "learningRate": 4.2e-5,
                 "tokensPerSecond": 5210.0, "etaSeconds": 1830.0},
    "checkpoint": {"uri": "s3://ckpt/demo/dpo/checkpoints/checkpoint-400", "step": 400},
    "restartCount": 1, "startTime": _now(-600), "eta": "30m", "progressText": "35%",
}


def _create(kube, ns: str, name: str, status: dict) -> None:
    kube.post(f"{G}/namespaces/{ns}/finetunejobs", _job(name))
    kube.patch(f"{G}/namespaces/{ns}/finetunejobs/{name}/status", {"status": status})


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_get_and_describe_show_status_written_by_the_operator(control_plane, crd, kube, namespace, capsys):
    _create(kube, namespace, "demo", RUNNING)
    _create(kube, namespace, "other", {"phase": "Succeeded", "stage": {"name": "merge", "index": 2, "count": 3},
                                      "output": {"uri": "s3://ckpt/other/merge/output"}})
    kube.post(f"/api/v1/namespaces/{namespace}/events", {
        "metadata": {"name": "demo.1"}, "type": "Normal", "reason": "StageStarted", "message": "stage dpo started",
        "involvedObject": {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "name": "demo", "namespace": namespace},
        "source": {"component": "kubetune-operator"}, "firstTimestamp": _now(-290), "lastTimestamp": _now(-290), "count": 1})
    kc = ["--kubeconfig", control_plane.kubeconfig, "-n", namespace]

    rc, out, _ = _run(capsys, "get", *kc)
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "PHASE", "STAGE", "PROGRESS", "LOSS", "ETA", "AGE"]
    demo = next(ln for ln in lines if ln.startswith("demo"))
    for piece in ("Running", "dpo (2/3)", "35% 420/1200", "0.9132", "30m"):
        assert piece in demo, demo
    assert "Succeeded" in next(ln for ln in lines if ln.startswith("other"))

    rc, out, _ = _run(capsys, "get", "demo", *kc, "-o", "json")
    assert rc == 0 and json.loads(out)["status"]["progress"]["step"] == 420

    rc, out, _ = _run(capsys, "describe", "demo", *kc)
    assert rc == 0
    for piece in ("Model:        Qwen/Qwen2.5-0.5B-Instruct", "sft (sft/lora) → dpo (dpo/lora) → merge (export)",
                  "Phase:        Running", "Stage:        dpo (2/3)", "35% 420/1200", "loss 0.9132", "5210 tok/s",
                  "ETA 30m30s", "Checkpoint:   s3://ckpt/demo/dpo/checkpoints/checkpoint-400 (step 400)",
                  "Validated", "SpecValid", "StageRunning", "s3://ckpt/demo/sft/output", "StageStarted",
                  "stage dpo started", "kubetune-operator"):
        assert piece in out, f"{piece!r} not in:\n{out}"
    hist = out.split("Stage history:")[1].split("Events:")[0]
    assert "Succeeded" in hist and "5m00s" in hist  # sft ran 300 s

    rc, _, err = _run(capsys, "describe", "missing", *kc)
    assert rc == 42 and "not found: missing" in err

    # watch: returns when the job finishes
    kube.patch(f"{G}/namespaces/{namespace}/finetunejobs/demo/status", {"status": {
        "phase": "Succeeded", "progress": {"step": 1200, "totalSteps": 1200, "percent": 100.0},
        "stage": {"name": "merge", "index": 2, "count": 3}, "output": {"uri": "s3://ckpt/demo/merge/output"}}})
    rc, out, _ = _run(capsys, "watch", "demo", *kc, "--interval", "0.2", "--timeout", "20")
    assert rc == 0 and "Succeeded" in out and "100% 1200/1200" in out and "output: s3://ckpt/demo/merge/output" in out

    # as a kubectl plugin: kubectl finds kubectl-kubetune on PATH; the kubeconfig comes from the env
    plugin = shutil.which("kubectl-kubetune")
    assert plugin, "kubectl-kubetune entry point not installed"
    env = {**control_plane.env, "PATH": f"{Path(plugin).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    r = subprocess.run([control_plane.binary("kubectl"), "kubetune", "get", "-n", namespace], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "demo" in r.stdout and "100% 1200/1200" in r.stdout


def test_logs_of_the_current_stage_rank0_pod(control_plane, crd, kubelet, kube, namespace, capsys):
    _create(kube, namespace, "lj", {**RUNNING, "stage": {"name": "sft", "index": 0, "count": 3}})
    code = "import time\nfor i in range(3):\n    print(f'step {i}', flush=True)\n    time.sleep(0.5)"
    pods = []
    for rank in ("0", "1"):
        pods.append({"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": f"lj-sft-{rank}-abcde", "labels": {"kubetune.io/job": "lj", "kubetune.io/stage": "sft",
                                                      "batch.kubernetes.io/job-completion-index": rank},
            "annotations": {"batch.kubernetes.io/job-completion-index": rank}},
            "spec": {"restartPolicy": "Never", "containers": [
                {"name": "trainer", "image": "python:3.11",
                 "command": ["python", "-c", code.replace("step", f"rank{rank} step")]}]}})
    r = control_plane.kubectl("apply", "-n", namespace, "-f", "-",
                              input=json.dumps({"apiVersion": "v1", "kind": "List", "items": pods}))
    assert r.returncode == 0, r.stderr
    kc = ["--kubeconfig", control_plane.kubeconfig, "-n", namespace]
    rc, out, err = _run(capsys, "logs", "lj", *kc, "-f")  # right away: waits while the pod is Pending
    assert rc == 0, err
    assert out == "rank0 step 0\nrank0 step 1\nrank0 step 2\n" and "lj-sft-0-abcde" in err
    rc, out, _ = _run(capsys, "logs", "lj", *kc, "--tail", "1")
    assert rc == 0 and out == "rank0 step 2\n"
    rc, _, err = _run(capsys, "logs", "lj", *kc, "--stage", "dpo")
    assert rc == 42 and "no pod of FineTuneJob 'lj' stage 'dpo'" in err

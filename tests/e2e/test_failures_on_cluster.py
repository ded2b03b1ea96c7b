"""Failures end as the table says (kubetune.runtime.api.errors.FAILURES), on the real control plane:
the real Job controller applies the operator's podFailurePolicy and the operator turns the failed
Job into the FineTuneJob's Failed condition.

- Out of memory reported by the runtime (exit 43 and its termination message): failed at once,
  one pod, reason OutOfMemory, the advice in the condition. The pod runs a FAKE RUNTIME that
  exits as the runtime does (the runtime side of this row: tests/runtime/test_failures.py).
- The kernel's OOM killer (exit 137, OOMKilled): the pod really allocates past its
  `resources.memory`; only where the node enforces memory limits (the real node: runc with
  cgroups). The process kubelet has no cgroups: skipped there.
"""

from __future__ import annotations

import pytest

from operatorlib import OperatorProcess, apply, condition, jobs, pods, quickstart, serving, wait_status

pytestmark = pytest.mark.e2e

# FAKE RUNTIME (these tests only): the model name picks how the stage runs out of memory.
OOM_RUNTIME = r"""
import json, os, sys, time
from pathlib import Path
cfg = json.loads(Path(sys.argv[sys.argv.index("--config") + 1]).read_text())
mode = cfg["model"]["name"].split("/")[-1]
if mode == "exit43":  # what runtime/local.py writes and exits with after torch's OutOfMemoryError
    msg = ("stage sft ran out of GPU memory (OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB); "
           "peak GPU memory allocated 78.91 GiB; kubetune estimate: 91.2 GiB per device for this stage. "
           "lower it with spec.stages[0].hyperparameters.batchSize: batchSize 8 → 4 (estimate 60.1 GiB)")
    Path("/dev/termination-log").write_text(msg)
    sys.exit(43)
hog = []
while True:  # host memory: grow until the kernel's OOM killer stops this container
    hog.append(bytearray(32 * 1024 * 1024))
    time.sleep(0.01)
"""


@pytest.fixture(scope="module")
def oom_operator(control_plane, kubelet, crd, runtime_image, tmp_path_factory):
    yield from serving(OperatorProcess(control_plane, tmp_path_factory.mktemp("operator-oom"),
                                       runtime_image=runtime_image, script=OOM_RUNTIME))


def _fails_at_once(kube, namespace, name, operator, by_the_operator: bool = False) -> dict:
    """Failed after one attempt: the Job's podFailurePolicy failed it (exit 42/43), or (the
    kernel's OOM kill, exit 137, which the policy retries like any SIGKILL) the operator
    suspended it before the Job controller's retry."""
    done = wait_status(kube, namespace, name, lambda s: s.get("phase") in ("Succeeded", "Failed"), 120,
                       "finished", operator)
    failed = condition(done, "Failed")
    assert done["status"]["phase"] == "Failed" and failed["status"] == "True"
    assert len(pods(kube, namespace, name)) == 1  # one attempt: not retried into the same wall
    (job,) = jobs(kube, namespace, name)
    if by_the_operator:
        assert job["spec"]["suspend"] is True and not job["status"].get("active")
    else:
        assert job["status"].get("failed") == 1
    assert done["status"]["restartCount"] == 0
    return failed


def test_out_of_memory_reported_by_the_runtime_fails_at_once_with_the_advice(control_plane, kube, oom_operator,
                                                                              namespace, store):
    doc = quickstart(store, name="oom43")
    doc["spec"]["model"]["name"] = "fake/exit43"
    doc["spec"]["runPolicy"] = {"backoffLimit": 3}
    apply(control_plane, doc, namespace)
    failed = _fails_at_once(kube, namespace, "oom43", oom_operator)
    assert failed["reason"] == "OutOfMemory"
    assert "after" not in failed["message"].split(":")[0]  # "failed (OutOfMemory): ..." — no retries
    assert "kubetune estimate: 91.2 GiB" in failed["message"] and "batchSize 8 → 4" in failed["message"]


def test_the_kernels_oom_kill_fails_at_once_as_out_of_memory(control_plane, kube, oom_operator, namespace, store,
                                                              node_kind):
    if node_kind != "real":
        pytest.skip("the process kubelet has no cgroups: memory limits are not enforced there")
    doc = quickstart(store, name="oomkill")
    doc["spec"]["model"]["name"] = "fake/hog"
    doc["spec"].setdefault("resources", {})["memory"] = "256Mi"
    doc["spec"]["runPolicy"] = {"backoffLimit": 3}
    apply(control_plane, doc, namespace)
    failed = _fails_at_once(kube, namespace, "oomkill", oom_operator, by_the_operator=True)
    (pod,) = pods(kube, namespace, "oomkill")
    term = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 137 and term["reason"] == "OOMKilled"
    assert failed["reason"] == "OutOfMemory"
    for text in ("OOMKilled", "256Mi", "kubetune estimate", "batchSize", "gradientCheckpointing", "qlora"):
        assert text in failed["message"], text

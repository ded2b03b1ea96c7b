"""FineTuneJobs behind real Kueue (docs/kueue.md): the operator's stage Jobs wait in a LocalQueue,
Kueue admits them against a ClusterQueue's GPU quota, the status says Kueue's reason while they
wait, and a preemption by Kueue is a suspend that resumes from the checkpoint."""

from __future__ import annotations

import threading

import kueue_fixtures
import pytest
from kueue_fixtures import KUEUE_PATH
from operatorlib import apply, condition, events, ftj, quickstart, wait_status

from cluster.kueue import API
from cluster.util import wait_for

pytestmark = pytest.mark.e2e
# Kueue's fixtures, for pytest to find in this module
kueue = kueue_fixtures.kueue
kueue_queues = kueue_fixtures.kueue_queues


def running_gpu_pods(kube, namespace: str) -> int:
    return sum(1 for p in kube.get(f"/api/v1/namespaces/{namespace}/pods", labelSelector="kubetune.io/job")["items"]
               if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp"))


def test_finetunejobs_wait_for_kueue_and_never_exceed_the_gpu_quota(control_plane, kube, operator, kueue,
                                                                    namespace, store):
    q = kueue_fixtures.make_queues(kube, namespace, gpus=1)
    try:
        names = ["q-a", "q-b", "q-c"]
        for n in names:
            doc = quickstart(store, name=n, step_s=0.3, max_steps=8)
            doc["spec"]["queueName"] = q.local_queue
            doc["spec"]["resources"] = {"gpusPerNode": 1}
            apply(control_plane, doc, namespace)
        peak, stop = [0], threading.Event()

        def watch_peak():
            while not stop.is_set():
                peak[0] = max(peak[0], running_gpu_pods(kube, namespace))
                stop.wait(0.3)

        watcher = threading.Thread(target=watch_peak, daemon=True)
        watcher.start()
        # while one runs, the others say why they wait, in Kueue's words
        queued = wait_for(lambda: next((s for n in names if (s := ftj(kube, namespace, n).get("status") or {})
                                        and condition({"status": s}, "Running").get("reason") == "Queued"
                                        and "quota" in condition({"status": s}, "Running").get("message", "")), None),
                          90, "a FineTuneJob Queued with Kueue's reason")
        msg = condition({"status": queued}, "Running")["message"]
        assert queued["phase"] == "Pending" and f"(queue {q.local_queue}): " in msg and "nvidia.com/gpu" in msg, msg
        done = [wait_status(kube, namespace, n, lambda s: s.get("phase") in ("Succeeded", "Failed"), 240,
                            f"{n} finished", operator) for n in names]
        stop.set()
        watcher.join(5)
        assert [d["status"]["phase"] for d in done] == ["Succeeded"] * 3, [d["status"] for d in done]
        assert peak[0] == 1  # never more running than the ClusterQueue's 1 GPU
        # every stage Job went through Kueue: its Workload was admitted and finished
        wls = kube.get(f"{KUEUE_PATH}/namespaces/{namespace}/workloads")["items"]
        assert len(wls) == 3 and all(any(c["type"] == "Admitted" for c in w["status"]["conditions"]) for w in wls)
    finally:
        kueue_fixtures.delete_queues(kube, q)


def test_a_kueue_preemption_is_a_suspend_that_resumes_from_the_checkpoint(control_plane, kube, operator, kueue,
                                                                         namespace, store):
    q = kueue_fixtures.make_queues(kube, namespace, gpus=1)
    prios = []
    try:
        kube.patch(f"{KUEUE_PATH}/clusterqueues/{q.cluster_queue}",
                   {"spec": {"preemption": {"withinClusterQueue": "LowerPriority"}}})
        for name, value in (("low", 10), ("high", 1000)):
            prio = f"{name}-{q.cluster_queue}"
            kube.post(f"{KUEUE_PATH}/workloadpriorityclasses", {"apiVersion": API, "kind": "WorkloadPriorityClass",
                                                                "metadata": {"name": prio}, "value": value})
            prios.append(prio)
        low = quickstart(store, name="low", step_s=0.4, max_steps=30, every=2)
        low["metadata"]["labels"] = {"kueue.x-k8s.io/priority-class": prios[0]}
        low["spec"]["queueName"] = q.local_queue
        apply(control_plane, low, namespace)
        wait_status(kube, namespace, "low", lambda s: ((s.get("checkpoint") or {}).get("step") or 0) >= 4, 120,
                    "the low-priority job's checkpoint at step ≥ 4", operator)
        high = quickstart(store, name="high", step_s=0.2, max_steps=6)
        high["metadata"]["labels"] = {"kueue.x-k8s.io/priority-class": prios[1]}
        high["spec"]["queueName"] = q.local_queue
        apply(control_plane, high, namespace)
        # Kueue takes the GPU back: the low job's Job is suspended, its pod saves a checkpoint and goes
        st = wait_status(kube, namespace, "low", lambda s: condition({"status": s}, "Running").get("reason") == "Queued",
                         90, "the low-priority job queued again", operator)
        assert "Preempted" in events(kube, namespace, "low")
        done_high = wait_status(kube, namespace, "high", lambda s: s.get("phase") in ("Succeeded", "Failed"), 180,
                                "the high-priority job finished", operator)
        assert done_high["status"]["phase"] == "Succeeded"
        done = wait_status(kube, namespace, "low", lambda s: s.get("phase") in ("Succeeded", "Failed"), 240,
                           "the low-priority job finished after it was admitted again", operator)
        assert done["status"]["phase"] == "Succeeded", done["status"]
        committed = store.json("saves", "low", "sft", "output", "COMMITTED.json")
        assert committed["resumedFrom"] >= 4, committed  # not trained again from step 0
        assert done["status"]["restartCount"] == 0  # a preemption is not a failure
        assert st["status"]["phase"] == "Pending"
    finally:
        kueue_fixtures.delete_queues(kube, q)
        for prio in prios:
            try:
                kube.delete(f"{KUEUE_PATH}/workloadpriorityclasses/{prio}")
            except Exception:  # noqa: BLE001 — already gone
                pass

"""Real Kueue (``cluster/kueue.py``) on the e2e control plane and node: its webhooks, quota and
admission with plain batch/v1 Jobs, and what it writes for a Job that waits (the shapes the
operator reads to show Kueue's reason)."""

from __future__ import annotations

import json
import threading
import time

import pytest

from cluster.kubeapi import KubeClient
from cluster.kueue import GPU_RESOURCE, QUEUE_LABEL
from cluster.util import wait_for
import kueue_fixtures
from kueue_fixtures import KUEUE_PATH

pytestmark = pytest.mark.e2e
# Kueue's fixtures, for pytest to find in this module
kueue = kueue_fixtures.kueue
kueue_queues = kueue_fixtures.kueue_queues

JOB_SECONDS = 3


def gpu_job(name: str, queue: str, seconds: float = JOB_SECONDS, suspend: bool | None = True) -> dict:
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "labels": {QUEUE_LABEL: queue}},
           "spec": {"backoffLimit": 0, "template": {"spec": {"restartPolicy": "Never", "containers": [{
               "name": "main", "image": "python:3.11", "command": ["python", "-c", f"import time; time.sleep({seconds})"],
               "resources": {"requests": {"cpu": "10m", "memory": "32Mi", GPU_RESOURCE: "1"},
                             "limits": {GPU_RESOURCE: "1"}}}]}}}}
    if suspend is not None:
        job["spec"]["suspend"] = suspend
    return job


def condition(obj: dict, type_: str) -> dict | None:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), None)


def is_true(obj: dict, type_: str) -> bool:
    c = condition(obj, type_)
    return bool(c and c["status"] == "True")


def job_finished(job: dict) -> bool:
    return is_true(job, "Complete") or is_true(job, "Failed")


def running(job: dict) -> bool:
    """Unsuspended and not finished: the Job holds its quota."""
    return job["spec"].get("suspend") is not True and not job_finished(job)


class JobWatch:
    """Every state the namespace's Jobs pass through, in the apiserver's order (a watch from the
    list's resourceVersion), so that an invariant over them is checked on each change, not on
    samples."""

    def __init__(self, kube: KubeClient, namespace: str):
        self.path = f"/apis/batch/v1/namespaces/{namespace}/jobs"
        listed = kube.get(self.path)
        self.kube, self.rv = kube, listed["metadata"]["resourceVersion"]
        self.events: list[tuple[str, dict]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            for ev in self.kube.watch(self.path, stop=self.stop, resourceVersion=self.rv, timeoutSeconds=30,
                                      allowWatchBookmarks=False):
                self.rv = ev["object"]["metadata"]["resourceVersion"]
                self.events.append((ev["type"], ev["object"]))

    def close(self) -> None:
        self.stop.set()

    def states(self):
        """Yield (event, {name: job}) after each event."""
        jobs: dict[str, dict] = {}
        for type_, obj in list(self.events):
            if type_ == "DELETED":
                jobs.pop(obj["metadata"]["name"], None)
            else:
                jobs[obj["metadata"]["name"]] = obj
            yield (type_, obj), dict(jobs)


def test_gpu_quota_of_two_admits_two_of_three_jobs_then_the_third(kube, kubelet, kueue_queues, namespace):
    q = kueue_queues
    wl_path = f"{KUEUE_PATH}/namespaces/{namespace}/workloads"
    watch = JobWatch(kube, namespace)
    t0 = time.monotonic()
    try:
        names = [f"gpu-{i}" for i in range(3)]
        for n in names:
            kube.post(f"/apis/batch/v1/namespaces/{namespace}/jobs", gpu_job(n, q.local_queue))

        # Two Workloads admitted, the third waiting for quota: what Kueue writes for it
        def two_admitted_one_waiting():
            wls = kube.get(wl_path)["items"]
            admitted = [w for w in wls if is_true(w, "Admitted")]
            waiting = [w for w in wls if (c := condition(w, "QuotaReserved")) and c["status"] == "False"]
            return len(wls) == 3 and len(admitted) == 2 and len(waiting) == 1 and waiting[0]
        pending = wait_for(two_admitted_one_waiting, 60, "two Workloads admitted, one waiting")
        owner = pending["metadata"]["ownerReferences"][0]
        pending_job = kube.get(f"/apis/batch/v1/namespaces/{namespace}/jobs/{owner['name']}")
        lq = kube.get(f"{KUEUE_PATH}/namespaces/{namespace}/localqueues/{q.local_queue}")
        print("\n--- waiting Workload ---\n" + json.dumps(
            {"metadata": {k: pending["metadata"].get(k) for k in ("name", "labels", "annotations", "ownerReferences",
                                                                  "finalizers")},
             "spec": {k: v for k, v in pending["spec"].items() if k != "podSets"}, "status": pending.get("status")},
            indent=1))
        print("--- its Job ---\n" + json.dumps({"metadata": {k: pending_job["metadata"].get(k) for k in (
            "name", "uid", "labels", "annotations")}, "spec.suspend": pending_job["spec"].get("suspend"),
            "status": pending_job.get("status")}, indent=1))
        print("--- LocalQueue status ---\n" + json.dumps(lq.get("status"), indent=1))

        assert pending_job["spec"]["suspend"] is True
        assert pending_job["metadata"]["uid"] == owner["uid"] and owner["kind"] == "Job" and owner["controller"]
        reserved = condition(pending, "QuotaReserved")
        assert reserved["reason"] == "Pending", reserved
        assert "insufficient unused quota" in reserved["message"] and GPU_RESOURCE in reserved["message"], reserved
        assert not is_true(pending, "Admitted")

        # ... all three complete; the waiting one is admitted only once another has finished
        wait_for(lambda: all(job_finished(j) for j in kube.get(f"/apis/batch/v1/namespaces/{namespace}/jobs")["items"])
                 and len(kube.get(f"/apis/batch/v1/namespaces/{namespace}/jobs")["items"]) == 3,
                 90, "all three Jobs finished")
        elapsed = time.monotonic() - t0
        wait_for(lambda: len(watch.events) and all(
            job_finished(j) for j in list(watch.states())[-1][1].values()), 10, "the watch caught up")
    finally:
        watch.close()

    jobs = {j["metadata"]["name"]: j for j in kube.get(f"/apis/batch/v1/namespaces/{namespace}/jobs")["items"]}
    assert all(is_true(j, "Complete") for j in jobs.values()), {n: j.get("status") for n, j in jobs.items()}

    most = 0
    for (_, obj), state in watch.states():
        now = sum(running(j) for j in state.values())
        most = max(most, now)
        assert now <= 2, f"{now} Jobs unsuspended at once: {[n for n, j in state.items() if running(j)]}"
        if obj["metadata"]["name"] == owner["name"] and obj["spec"].get("suspend") is False:
            # the waiting Job's admission: another Job had already finished
            assert any(job_finished(j) for n, j in state.items() if n != owner["name"]), \
                "the waiting Job was unsuspended before any other finished"
    assert most == 2, f"at most {most} Jobs ran at once"

    wls = kube.get(wl_path)["items"]
    assert sorted(w["metadata"]["ownerReferences"][0]["name"] for w in wls) == names
    for w in wls:
        assert is_true(w, "QuotaReserved") and is_true(w, "Admitted") and is_true(w, "Finished"), w["status"]
        assert w["status"]["admission"]["clusterQueue"] == q.cluster_queue
        assert w["metadata"]["ownerReferences"][0]["uid"] == jobs[w["metadata"]["ownerReferences"][0]["name"]][
            "metadata"]["uid"]
    done = next(w for w in wls if w["metadata"]["name"] == pending["metadata"]["name"])
    print("--- the same Workload, finished ---\n" + json.dumps(
        {"metadata": {k: done["metadata"].get(k) for k in ("labels", "annotations", "finalizers")},
         "status": {k: v for k, v in done["status"].items() if k != "resourceRequests"}}, indent=1))
    job = jobs[owner["name"]]
    print("--- its Job, finished ---\n" + json.dumps({"metadata": {k: job["metadata"].get(k) for k in (
        "labels", "annotations")}, "spec.suspend": job["spec"].get("suspend"),
        "template.metadata": job["spec"]["template"].get("metadata"),
        "template.nodeSelector": job["spec"]["template"]["spec"].get("nodeSelector")}, indent=1))
    events = kube.get(f"/api/v1/namespaces/{namespace}/events")["items"]
    print("--- events of the waiting Job and its Workload ---\n" + "\n".join(
        f"{e['involvedObject']['kind']}/{e['involvedObject']['name']} {e['type']} {e['reason']} "
        f"({e.get('source', {}).get('component') or e.get('reportingComponent')}): {e['message']}"
        for e in sorted(events, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
        if e["involvedObject"]["name"] in (owner["name"], pending["metadata"]["name"])))
    print(f"three Jobs, quota 2: all complete in {elapsed:.1f}s")


def test_job_webhook_suspends_a_queued_job_on_creation(kube, kubelet, kueue_queues, namespace):
    """Kueue's mutating webhook, called by the apiserver: a Job with a queue name created without
    `suspend` is stored suspended, then Kueue admits it and it runs to completion. And its
    conversion webhook: the queues, stored as v1beta2, read as v1beta1."""
    old_api = KUEUE_PATH.replace("v1beta2", "v1beta1")
    assert kube.get(f"{old_api}/clusterqueues/{kueue_queues.cluster_queue}")["apiVersion"].endswith("/v1beta1")
    assert kube.get(f"{old_api}/namespaces/{namespace}/localqueues/{kueue_queues.local_queue}")["spec"][
        "clusterQueue"] == kueue_queues.cluster_queue
    created = kube.post(f"/apis/batch/v1/namespaces/{namespace}/jobs",
                        gpu_job("unsuspended", kueue_queues.local_queue, seconds=0, suspend=None))
    assert created["spec"]["suspend"] is True
    wait_for(lambda: is_true(kube.get(f"/apis/batch/v1/namespaces/{namespace}/jobs/unsuspended"), "Complete"), 60,
             "the Job complete")

"""Fixtures for tests that run real Kueue (``cluster/kueue.py``) on the e2e control plane.

A test module binds the ones it uses at its top level (pytest finds fixtures in a module's
namespace; a plain assignment, not ``from ... import``, keeps ruff's F811 quiet where a test
names the fixture as a parameter)::

    import kueue_fixtures
    kueue = kueue_fixtures.kueue
    kueue_queues = kueue_fixtures.kueue_queues

``kueue`` (module): Kueue's controller manager with its CRDs and webhooks on ``control_plane``
(the first use builds it: ``build.ensure_kueue()``, minutes; then seconds). Module-scoped, so the
webhooks it installs (Kueue's Job webhook among them) exist only while the modules that ask for
it run. ``kueue_queues`` (function): a ResourceFlavor, a ClusterQueue and a LocalQueue in the
test's namespace (``make_queues``), deleted afterwards, once Kueue has released them.
"""

from __future__ import annotations

import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster.kubeapi import ApiError, KubeClient  # noqa: E402
from cluster.kueue import API, GPU_RESOURCE, Kueue  # noqa: E402
from cluster.util import wait_for  # noqa: E402

KUEUE_PATH = f"/apis/{API}"


@pytest.fixture(scope="module")
def kueue(control_plane):
    with Kueue(control_plane) as kq:
        print(f"\nKueue up in {kq.start_seconds:.1f}s {kq.timings} (log {kq.log_path})")
        yield kq


@dataclass
class Queues:
    namespace: str
    flavor: str
    cluster_queue: str
    local_queue: str


def make_queues(kube: KubeClient, namespace: str, gpus: int = 2, cpu: str = "64", memory: str = "256Gi") -> Queues:
    """A ResourceFlavor, a ClusterQueue with `gpus` of nvidia.com/gpu (and `cpu`, `memory`) on it,
    open to every namespace, and a LocalQueue pointing at it in `namespace`."""
    suffix = uuid.uuid4().hex[:6]
    q = Queues(namespace, f"flavor-{suffix}", f"cq-{suffix}", "lq")
    kube.post(f"{KUEUE_PATH}/resourceflavors", {"apiVersion": API, "kind": "ResourceFlavor",
                                                "metadata": {"name": q.flavor}})
    kube.post(f"{KUEUE_PATH}/clusterqueues", {
        "apiVersion": API, "kind": "ClusterQueue", "metadata": {"name": q.cluster_queue},
        "spec": {"namespaceSelector": {}, "resourceGroups": [{
            "coveredResources": ["cpu", "memory", GPU_RESOURCE],
            "flavors": [{"name": q.flavor, "resources": [
                {"name": "cpu", "nominalQuota": cpu}, {"name": "memory", "nominalQuota": memory},
                {"name": GPU_RESOURCE, "nominalQuota": gpus}]}]}]}})
    kube.post(f"{KUEUE_PATH}/namespaces/{namespace}/localqueues", {
        "apiVersion": API, "kind": "LocalQueue", "metadata": {"name": q.local_queue},
        "spec": {"clusterQueue": q.cluster_queue}})
    wait_for(lambda: _active(kube.get(f"{KUEUE_PATH}/clusterqueues/{q.cluster_queue}")), 30, "ClusterQueue Active")
    wait_for(lambda: _active(kube.get(f"{KUEUE_PATH}/namespaces/{namespace}/localqueues/{q.local_queue}")), 30,
             "LocalQueue Active")
    return q


def delete_queues(kube: KubeClient, q: Queues, timeout: float = 60) -> None:
    """Delete the Jobs of the namespace (their Workloads follow, garbage-collected), then the
    queues, and wait until Kueue has let go of each (its finalizers)."""
    ns = q.namespace
    for job in kube.get(f"/apis/batch/v1/namespaces/{ns}/jobs")["items"]:
        _delete(kube, f"/apis/batch/v1/namespaces/{ns}/jobs/{job['metadata']['name']}", propagationPolicy="Background")
    wait_for(lambda: not kube.get(f"{KUEUE_PATH}/namespaces/{ns}/workloads")["items"], timeout, "Workloads gone")
    for path in (f"{KUEUE_PATH}/namespaces/{ns}/localqueues/{q.local_queue}",
                 f"{KUEUE_PATH}/clusterqueues/{q.cluster_queue}", f"{KUEUE_PATH}/resourceflavors/{q.flavor}"):
        _delete(kube, path)
        wait_for(lambda: _gone(kube, path), timeout, f"{path} gone")


@pytest.fixture
def kueue_queues(kueue, kube, namespace):
    q = make_queues(kube, namespace)
    yield q
    delete_queues(kube, q)


def _active(obj: dict) -> bool:
    return any(c["type"] == "Active" and c["status"] == "True" for c in (obj.get("status") or {}).get("conditions") or [])


def _delete(kube: KubeClient, path: str, **params) -> None:
    try:
        kube.delete(path, **params)
    except ApiError as e:
        if e.status != 404:
            raise


def _gone(kube: KubeClient, path: str) -> bool:
    try:
        kube.get(path)
    except ApiError as e:
        return e.status == 404
    return False

"""Fixtures for end-to-end tests on a real Kubernetes control plane.

``control_plane`` (session): etcd + kube-apiserver + kube-controller-manager + kube-scheduler,
built from Go modules by ``tests/cluster/build.py`` (cached in ~/.cache/kubetune-test; a cold
build takes long, so CI prebuilds with ``python tests/cluster/build.py``) and started on
loopback. ``kubelet`` (session): the process kubelet, one Node named ``kubetune-node``.
``namespace`` (function): a fresh namespace whose default ServiceAccount and kube-root-ca.crt
exist, deleted afterwards. ``kube``: an admin ``KubeClient``.

Every e2e test is marked ``@pytest.mark.e2e``; deselect them with ``-m "not e2e"``.
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster.controlplane import ControlPlane  # noqa: E402
from cluster.kubeapi import ApiError, KubeClient  # noqa: E402
from cluster.kubelet import ProcessKubelet  # noqa: E402
from cluster.util import wait_for  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: end-to-end test on a real Kubernetes control plane and process kubelet")


@pytest.fixture(scope="session")
def control_plane():
    with ControlPlane() as cp:
        print(f"\ncontrol plane up in {cp.start_seconds:.1f}s at {cp.server} (workdir {cp.workdir})")
        yield cp


@pytest.fixture(scope="session")
def kubelet(control_plane):
    with ProcessKubelet(control_plane) as k:
        yield k


@pytest.fixture(scope="session")
def kube(control_plane) -> KubeClient:
    return control_plane.client()


@pytest.fixture
def namespace(control_plane, kube):
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    kube.post("/api/v1/namespaces", {"metadata": {"name": name}})
    wait_for(lambda: kube.get(f"/api/v1/namespaces/{name}/serviceaccounts/default"), 30, "default ServiceAccount")
    wait_for(lambda: kube.get(f"/api/v1/namespaces/{name}/configmaps/kube-root-ca.crt"), 30, "kube-root-ca.crt")
    yield name
    try:
        kube.delete(f"/api/v1/namespaces/{name}")
    except ApiError:
        pass

"""Fixtures for end-to-end tests on a real Kubernetes control plane.

``control_plane`` (session): etcd + kube-apiserver + kube-controller-manager + kube-scheduler,
built from Go modules by ``tests/cluster/build.py`` (cached in ~/.cache/kubetune-test; CI
prebuilds with ``python tests/cluster/build.py``). ``kubelet`` (session): the node, one Node
named ``kubetune-node`` — the **real node** (``cluster/realnode.py``: the real kubelet with
containerd + runc, CNI, kube-proxy and CoreDNS; pods run as containers of the images built from
``images/*/Dockerfile`` by ``cluster/images.py``) wherever it can run, else the process kubelet
(``cluster/kubelet.py``); ``node_kind`` says which ("real" or "process"), the session header too.
On the real node the apiserver and the S3 server listen on the node network's address, where
pods reach them. ``test_images`` (session): {"runtime", "operator"} image refs (real node only).
``namespace`` (function): a fresh namespace whose default ServiceAccount and kube-root-ca.crt
exist, deleted afterwards. ``kube``: an admin ``KubeClient``. ``crd`` (module): the FineTuneJob
CRD applied and usable the way tests use it (established, in discovery, in the published
OpenAPI). ``s3`` (session): moto's S3 server with authentication on. ``store`` (function): a
bucket of it holding a one-record dataset, and the Secret ``s3`` with its credentials in the
test's namespace (operatorlib.Store). ``operator`` (module): the operator as a process
(operatorlib.OperatorProcess) whose pods run the fake runtime in the runtime image.

Every e2e test is marked ``@pytest.mark.e2e``; deselect them with ``-m "not e2e"``.
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster import images, realnode  # noqa: E402
from cluster.controlplane import ControlPlane  # noqa: E402
from cluster.kubeapi import ApiError, KubeClient  # noqa: E402
from cluster.kubelet import ProcessKubelet  # noqa: E402
from cluster.util import wait_for  # noqa: E402
from operatorlib import OperatorProcess, Store, serving  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "finetunejob.yaml"


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: end-to-end test on a real Kubernetes control plane and process kubelet")


@pytest.fixture(scope="session")
def node_kind() -> str:
    return realnode.choose()[0]


@pytest.fixture(scope="session")
def node_network(node_kind):
    if node_kind != "real":
        yield None
        return
    net = realnode.NodeNetwork.allocate()
    try:
        yield net
    finally:
        net.delete()


@pytest.fixture(scope="session")
def test_images(node_kind) -> dict[str, str] | None:
    return images.ensure_images() if node_kind == "real" else None


@pytest.fixture(scope="session")
def control_plane(node_network):
    with ControlPlane(bind_address=node_network.gateway if node_network else "127.0.0.1") as cp:
        print(f"\ncontrol plane up in {cp.start_seconds:.1f}s at {cp.server} (workdir {cp.workdir})")
        yield cp


@pytest.fixture(scope="session")
def kubelet(control_plane, node_network, test_images):
    if node_network is None:
        with ProcessKubelet(control_plane) as k:
            yield k
        return
    load = {test_images["runtime"]: [], test_images["operator"]: [],
            # the image of the harness's own test pods (test_control_plane.py)
            images.python_standin(): ["docker.io/library/python:3.11"]}
    with realnode.RealNode(control_plane, node_network, load) as node:
        print(f"\nreal node up in {node.start_seconds:.1f}s on {node_network.bridge} ({node_network.gateway})")
        yield node


@pytest.fixture(scope="session")
def runtime_image(node_kind, test_images) -> str:
    """The image training pods run: the built runtime image on the real node (the process
    kubelet ignores images)."""
    return test_images["runtime"] if node_kind == "real" else "kubetune/runtime:e2e"


@pytest.fixture(scope="session")
def s3(control_plane, tmp_path_factory):
    """moto's S3 server with authentication on, where pods reach it (the node address)."""
    from tests.storage.support import MotoServer

    server = MotoServer(tmp_path_factory.mktemp("moto"), host=control_plane.bind_address, auth=True)
    yield server
    server.stop()


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


def crd_doc() -> dict:
    return next(d for d in yaml.safe_load_all(CRD.read_text()) if d and d.get("kind") == "CustomResourceDefinition")


def _published(kube: KubeClient, group: str, version: str, kind: str) -> bool:
    """The kind is in the apiserver's published OpenAPI v3 (what `kubectl explain` reads; it lags
    discovery by up to a few seconds after a CRD is created or changed)."""
    try:
        doc = kube.get(f"/openapi/v3/apis/{group}/{version}")
    except ApiError:
        return False
    schemas = (doc.get("components") or {}).get("schemas") or {}
    return any(s.get("x-kubernetes-group-version-kind", [{}])[0].get("kind") == kind for s in schemas.values())


@pytest.fixture(scope="module")
def crd(control_plane, kube) -> dict:
    """The FineTuneJob CRD, applied (server-side, so a chart's copy does not conflict) and usable:
    Established, served by discovery (`kubectl get ftj`) and in the published OpenAPI."""
    doc = crd_doc()
    r = control_plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
    assert r.returncode == 0, r.stdout + r.stderr
    name = doc["metadata"]["name"]
    wait_for(lambda: any(c["type"] == "Established" and c["status"] == "True" for c in (kube.get(
        f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}").get("status") or {}).get("conditions", [])),
        60, "CRD Established")
    group, kind = doc["spec"]["group"], doc["spec"]["names"]["kind"]
    version = next(v["name"] for v in doc["spec"]["versions"] if v.get("served"))
    wait_for(lambda: control_plane.kubectl("get", "ftj", "-A").returncode == 0, 30, "ftj in discovery")
    wait_for(lambda: _published(kube, group, version, kind), 60, f"{kind} in the published OpenAPI")
    return doc


@pytest.fixture(scope="module")
def operator(control_plane, kubelet, crd, runtime_image, tmp_path_factory):
    yield from serving(OperatorProcess(control_plane, tmp_path_factory.mktemp("operator"), runtime_image=runtime_image))


@pytest.fixture
def store(s3, control_plane, namespace) -> Store:
    return Store(s3, control_plane, namespace)

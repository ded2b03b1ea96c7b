"""The chart's RBAC on the real kube-apiserver: `kubectl auth can-i --as=system:serviceaccount:...`
matrices of what the operator's ServiceAccount can and cannot do, namespace-scoped and
cluster-wide, plus a request made with a real token of that ServiceAccount. The chart is
installed with `helm install` (replicaCount 0: only the RBAC and objects matter here; the
operator running under this RBAC is tests/e2e/test_chart.py)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from cluster.util import wait_for

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from chart.chartlib import CHART, set_args  # noqa: E402

pytestmark = pytest.mark.e2e

YES, NO = True, False

# (verb, resource, where, allowed) — where: "watched", "other" (a namespace not watched), "cluster"
NAMESPACED_MATRIX = [
    ("get", "finetunejobs.kubetune.io", "watched", YES),
    ("list", "finetunejobs.kubetune.io", "watched", YES),
    ("watch", "finetunejobs.kubetune.io", "watched", YES),
    ("patch", "finetunejobs.kubetune.io", "watched", YES),  # kopf's finalizer
    ("patch", "finetunejobs.kubetune.io/status", "watched", YES),
    ("create", "finetunejobs.kubetune.io", "watched", NO),
    ("update", "finetunejobs.kubetune.io", "watched", NO),  # never rewrites a spec
    ("delete", "finetunejobs.kubetune.io", "watched", NO),
    ("create", "jobs.batch", "watched", YES),
    ("patch", "jobs.batch", "watched", YES),
    ("delete", "jobs.batch", "watched", YES),
    ("create", "configmaps", "watched", YES),
    ("delete", "configmaps", "watched", YES),
    ("create", "services", "watched", YES),
    ("list", "pods", "watched", YES),
    ("watch", "pods", "watched", YES),
    ("create", "events", "watched", YES),
    ("list", "events", "watched", YES),  # a Job's FailedCreate events
    ("patch", "kopfpeerings.kopf.dev", "watched", YES),
    ("get", "secrets", "watched", NO),
    ("list", "secrets", "watched", NO),
    ("watch", "secrets", "watched", NO),
    ("create", "pods", "watched", NO),
    ("delete", "pods", "watched", NO),
    ("create", "pods/exec", "watched", NO),
    ("create", "serviceaccounts/token", "watched", NO),
    ("create", "rolebindings.rbac.authorization.k8s.io", "watched", NO),
    ("update", "deployments.apps", "watched", NO),
    ("list", "finetunejobs.kubetune.io", "other", NO),
    ("create", "jobs.batch", "other", NO),
    ("get", "configmaps", "other", NO),
    ("list", "pods", "other", NO),
    ("create", "events", "other", NO),
    ("list", "events", "other", NO),
    ("list", "customresourcedefinitions.apiextensions.k8s.io", "cluster", YES),
    ("watch", "customresourcedefinitions.apiextensions.k8s.io", "cluster", YES),
    ("create", "customresourcedefinitions.apiextensions.k8s.io", "cluster", NO),
    ("delete", "customresourcedefinitions.apiextensions.k8s.io", "cluster", NO),
    ("list", "finetunejobs.kubetune.io", "cluster", NO),
    ("list", "namespaces", "cluster", YES),  # kopf follows the watched namespaces
    ("watch", "namespaces", "cluster", YES),
    ("get", "namespaces", "cluster", NO),
    ("delete", "namespaces", "cluster", NO),
    ("list", "nodes", "cluster", NO),
    ("list", "secrets", "cluster", NO),
    ("patch", "clusterkopfpeerings.kopf.dev", "cluster", NO),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io", "cluster", NO),
    ("impersonate", "serviceaccounts", "cluster", NO),
    ("*", "*", "cluster", NO),
]

CLUSTER_MATRIX = [
    ("list", "finetunejobs.kubetune.io", "cluster", YES),
    ("watch", "finetunejobs.kubetune.io", "cluster", YES),
    ("patch", "finetunejobs.kubetune.io/status", "other", YES),
    ("create", "jobs.batch", "other", YES),
    ("create", "configmaps", "other", YES),
    ("list", "pods", "cluster", YES),
    ("list", "events", "other", YES),  # a Job's FailedCreate events
    ("list", "namespaces", "cluster", NO),  # kopf needs no namespace list when cluster-wide
    ("patch", "clusterkopfpeerings.kopf.dev", "cluster", YES),
    ("get", "secrets", "other", NO),
    ("list", "secrets", "cluster", NO),
    ("delete", "pods", "other", NO),
    ("create", "pods", "other", NO),
    ("delete", "namespaces", "cluster", NO),
    ("list", "nodes", "cluster", NO),
    ("create", "customresourcedefinitions.apiextensions.k8s.io", "cluster", NO),
    ("create", "clusterroles.rbac.authorization.k8s.io", "cluster", NO),
    ("*", "*", "cluster", NO),
]


def can_i(cp, sa: str, verb: str, resource: str, ns: str | None) -> bool:
    where = ["-n", ns] if ns else ["--all-namespaces"]
    sub = []
    if "/" in resource:  # a subresource: finetunejobs.kubetune.io/status, pods/exec
        resource, name = resource.split("/", 1)
        sub = [f"--subresource={name}"]
    r = cp.kubectl("auth", "can-i", verb, resource, *sub, *where, f"--as={sa}")
    answer = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    assert answer in ("yes", "no"), r.stdout + r.stderr
    return answer == "yes"


def check_matrix(cp, sa: str, matrix, spaces: dict[str, str | None]) -> None:
    rows, wrong = [], []
    for verb, resource, where, want in matrix:
        got = can_i(cp, sa, verb, resource, spaces[where])
        rows.append(f"{'yes' if got else 'no ':4} {verb:12} {resource:50} {where}")
        if got != want:
            wrong.append(rows[-1] + f"   <-- expected {'yes' if want else 'no'}")
    print(f"\nkubectl auth can-i --as={sa}\n" + "\n".join(rows))
    assert not wrong, "\n".join(wrong)


def token_kubectl(cp, token: str, tmp: Path):
    """kubectl authenticated by a bearer token only (the admin kubeconfig's client certificate would win)."""
    admin = yaml.safe_load(Path(cp.kubeconfig).read_text())
    cluster = admin["clusters"][0]["cluster"]
    path = tmp / "sa.kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "c", "cluster": cluster}], "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "c", "user": "sa"}}]}))
    path.chmod(0o600)
    return lambda *a: subprocess.run([cp.binary("kubectl"), "--kubeconfig", str(path), *a], capture_output=True,
                                     text=True, timeout=60, env=cp.env)


def install(cp, release: str, ns: str, values: dict) -> None:
    r = cp.run_tool("helm", "install", release, str(CHART), "-n", ns, *set_args({"replicaCount": 0, **values}),
                    timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr


def uninstall(cp, release: str, ns: str) -> None:
    cp.run_tool("helm", "uninstall", release, "-n", ns, "--wait", "--timeout=60s", timeout=90)


@pytest.fixture
def other_namespace(kube):
    name = f"e2e-other-{uuid.uuid4().hex[:6]}"
    kube.post("/api/v1/namespaces", {"metadata": {"name": name}})
    yield name
    kube.delete(f"/api/v1/namespaces/{name}")


@pytest.fixture
def watched_namespace(kube):
    name = f"e2e-ml-{uuid.uuid4().hex[:6]}"
    kube.post("/api/v1/namespaces", {"metadata": {"name": name}})
    yield name
    kube.delete(f"/api/v1/namespaces/{name}")


def test_namespace_scoped_rbac_matrix(control_plane, namespace, watched_namespace, other_namespace, tmp_path):
    release = f"rb-{uuid.uuid4().hex[:6]}"
    install(control_plane, release, namespace,
            {"operator": {"watchNamespaces": [watched_namespace], "peering": {"name": release}}})
    sa = f"system:serviceaccount:{namespace}:{release}-kubetune"
    try:
        check_matrix(control_plane, sa, NAMESPACED_MATRIX,
                     {"watched": watched_namespace, "other": other_namespace, "cluster": None})
        # the operator's own namespace is not watched either
        assert not can_i(control_plane, sa, "list", "finetunejobs.kubetune.io", namespace)

        # and with a real token of that ServiceAccount, not impersonation
        r = control_plane.kubectl("create", "token", f"{release}-kubetune", "-n", namespace, "--duration=10m")
        assert r.returncode == 0, r.stderr
        token = r.stdout.strip()
        as_sa = token_kubectl(control_plane, token, tmp_path)
        ok = as_sa("get", "finetunejobs", "-n", watched_namespace)
        assert ok.returncode == 0, ok.stderr
        denied = as_sa("get", "secrets", "-n", watched_namespace)
        assert denied.returncode != 0 and "Forbidden" in denied.stderr and "cannot list resource \"secrets\"" in denied.stderr
        denied = as_sa("get", "finetunejobs", "-n", other_namespace)
        assert denied.returncode != 0 and "Forbidden" in denied.stderr
    finally:
        uninstall(control_plane, release, namespace)


def test_cluster_wide_rbac_matrix(control_plane, namespace, other_namespace):
    release = f"rbc-{uuid.uuid4().hex[:6]}"
    install(control_plane, release, namespace, {"operator": {"peering": {"name": release}}})
    sa = f"system:serviceaccount:{namespace}:{release}-kubetune"
    try:
        check_matrix(control_plane, sa, CLUSTER_MATRIX, {"other": other_namespace, "cluster": None})
    finally:
        uninstall(control_plane, release, namespace)
    wait_for(lambda: not can_i(control_plane, sa, "list", "finetunejobs.kubetune.io", None), 30,
             "rights gone after helm uninstall")

"""charts/kubetune on the real kube-apiserver: `helm template` output accepted by a server-side
dry run (every option), NOTES from `helm install --dry-run`, and the quickstart run by the
operator that the chart installs — its Deployment's pod runs on the process kubelet as the
chart's ServiceAccount (a bound token from the pod's kube-api-access volume, in-cluster config;
never the admin kubeconfig), once with the namespace-scoped Role the chart makes and once with
its cluster-wide ClusterRole; the operator's log must show no permission error.

As in test_operator.py the training pods run the FAKE RUNTIME (test_operator.FAKE_RUNTIME, via the
chart's `runtime.command` value): it honours the runtime's contracts and trains nothing.
"""

from __future__ import annotations

import json
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest

from cluster.util import wait_for

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from chart.chartlib import CHART, objects, set_args  # noqa: E402
from operatorlib import FAKE_RUNTIME, apply, condition, free_port, inline_command, quickstart, wait_status  # noqa: E402

pytestmark = pytest.mark.e2e

# Stand-ins for the Prometheus Operator's CRDs (its real ones are not vendored here): enough for
# the apiserver to know the kinds, so that the dry run checks names, namespaces and metadata.
MONITORING_CRDS = "\n---\n".join(json.dumps({
    "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
    "metadata": {"name": f"{plural}.monitoring.coreos.com"},
    "spec": {"group": "monitoring.coreos.com", "scope": "Namespaced",
             "names": {"kind": kind, "plural": plural, "singular": plural[:-1], "listKind": f"{kind}List"},
             "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                 "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]}})
    for kind, plural in (("PodMonitor", "podmonitors"), ("ServiceMonitor", "servicemonitors")))


def helm(cp, *args: str, timeout: float = 120):
    r = cp.run_tool("helm", *args, timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


@pytest.fixture(scope="module")
def chart_crds(control_plane):
    """The chart's crds/ (FineTuneJob, kopf peering), as `helm install` puts them first."""
    for f in sorted((CHART / "crds").glob("*.yaml")):
        r = control_plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(f))
        assert r.returncode == 0, r.stdout + r.stderr
    r = control_plane.kubectl("wait", "--for=condition=Established", "crd/finetunejobs.kubetune.io",
                              "crd/kopfpeerings.kopf.dev", "crd/clusterkopfpeerings.kopf.dev", "--timeout=60s", timeout=70)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("case", ["defaults", "namespaced", "everything-on"])
def test_template_accepted_by_server_side_dry_run(control_plane, chart_crds, namespace, case):
    values = {
        "defaults": {},
        "namespaced": {"operator": {"watchNamespaces": [namespace], "peering": {"name": "dry"}}},
        "everything-on": {"operator": {"watchNamespaces": [namespace]}, "podMonitor": {"enabled": True},
                          "serviceMonitor": {"enabled": True}, "networkPolicy": {"enabled": True},
                          "prometheusAnnotations": {"enabled": True}, "replicaCount": 2,
                          "runtime": {"runtimeClassName": "nvidia", "nodeSelector": {"nvidia.com/gpu.present": "true"}}},
    }[case]
    if case == "everything-on":
        r = control_plane.kubectl("apply", "-f", "-", input=MONITORING_CRDS)
        assert r.returncode == 0, r.stderr
        wait_for(lambda: control_plane.kubectl("get", "podmonitors", "-A").returncode == 0, 30, "PodMonitor kind")
    rendered = helm(control_plane, "template", "dry", str(CHART), "-n", namespace, *set_args(values)).stdout
    kinds = sorted(o["kind"] for o in objects(rendered))
    r = control_plane.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-", input=rendered)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert len(lines) == len(kinds) and all("(server dry run)" in ln for ln in lines), r.stdout
    if case == "everything-on":
        assert {"PodMonitor", "ServiceMonitor", "NetworkPolicy", "Role", "KopfPeering"} <= set(kinds)


def _image_values(ref: str, pull_policy: str) -> dict:
    repository, _, tag = ref.rpartition(":")
    return {"repository": repository, "tag": tag, "pullPolicy": pull_policy}


@pytest.mark.parametrize("mode", ["namespaced", "cluster-wide"])
def test_quickstart_through_the_chart(control_plane, kube, kubelet, node_kind, test_images, chart_crds, namespace,
                                      store, mode):
    """On the real node the operator runs from its built image, as a container, and its pods run
    the fake runtime in the built runtime image; on the process kubelet images are ignored."""
    release = f"kt-{uuid.uuid4().hex[:6]}"
    health, metrics = free_port(), free_port()
    real = node_kind == "real"
    runtime_ref = test_images["runtime"] if real else "ghcr.io/kubetune/runtime:e2e"
    values = {
        "operator": {"watchNamespaces": [namespace] if mode == "namespaced" else [], "peering": {"name": release},
                     "pollInterval": 1,
                     "logFormat": "plain", "healthPort": health, "metricsPort": metrics},
        "runtime": {"command": inline_command(FAKE_RUNTIME), "metricsPort": free_port(),
                    "image": _image_values(runtime_ref, "IfNotPresent"),
                    # GPU scheduling defaults the operator applies to GPU pods (quickstart asks for 1 GPU)
                    "nodeSelector": {"kubernetes.io/os": "linux"}},
        "service": {"port": metrics},
        # the process kubelet bind-mounts volumes over the HOST's paths, and its own pod volumes
        # live under /tmp: an emptyDir at /tmp would hide the pod's token volume from it
        "tmpVolume": {"enabled": real},
    }
    if real:  # never pulled: the image containerd was given
        values["image"] = _image_values(test_images["operator"], "Never")
    r = helm(control_plane, "install", release, str(CHART), "-n", namespace, *set_args(values), timeout=180)
    watching = namespace if mode == "namespaced" else "all namespaces"
    assert "Watching:   " + watching in r.stdout and "kubectl get ftj -w" in r.stdout, r.stdout  # NOTES.txt
    sa = f"{release}-kubetune"
    try:
        pod = wait_for(lambda: [p for p in kube.get(f"/api/v1/namespaces/{namespace}/pods",
                                                    labelSelector=f"app.kubernetes.io/instance={release}")["items"]
                                if p["status"].get("phase") == "Running"], 90, "operator pod Running")[0]
        # the operator runs as the chart's ServiceAccount, with a bound token — no kubeconfig
        assert pod["spec"]["serviceAccountName"] == sa
        assert any(v["name"].startswith("kube-api-access") for v in pod["spec"]["volumes"])
        ip = pod["status"]["podIP"]
        wait_for(lambda: urllib.request.urlopen(f"http://{ip}:{health}/healthz", timeout=2).status == 200, 60,
                 "the chart's operator answers /healthz")

        apply(control_plane, quickstart(store, name="chartquick", step_s=0.3, max_steps=6), namespace)
        try:
            done = wait_status(kube, namespace, "chartquick", lambda s: s.get("phase") in ("Succeeded", "Failed"),
                               150, "quickstart finished under the chart's operator")
        except AssertionError:
            for what in (("get", "pods,jobs", "-o", "wide"), ("get", "events", "--sort-by=.lastTimestamp")):
                print(control_plane.kubectl(*what, "-n", namespace).stdout)
            raise
        st = done["status"]
        assert st["phase"] == "Succeeded", st
        assert condition(done, "Succeeded")["status"] == "True"
        assert store.json("saves", "chartquick", "sft", "output", "COMMITTED.json")["steps"] == 6
        (job,) = kube.get(f"/apis/batch/v1/namespaces/{namespace}/jobs", labelSelector="kubetune.io/job=chartquick")["items"]
        tpl = job["spec"]["template"]["spec"]
        assert tpl["containers"][0]["image"] == runtime_ref  # the chart's runtime image value
        assert tpl.get("automountServiceAccountToken") is False
        assert tpl["nodeSelector"] == {"kubernetes.io/os": "linux"}  # the chart's runtime.* defaults
        assert tpl["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        # kopf's peering object (leader election) is the chart's: in the watched namespace, or cluster-wide
        peering = kube.get(f"/apis/kopf.dev/v1/namespaces/{namespace}/kopfpeerings/{release}" if mode == "namespaced"
                           else f"/apis/kopf.dev/v1/clusterkopfpeerings/{release}")
        assert peering["metadata"]["labels"]["app.kubernetes.io/instance"] == release
        with urllib.request.urlopen(f"http://{ip}:{metrics}/metrics", timeout=5) as resp:
            assert "kubetune_operator_reconciles_total" in resp.read().decode()
        # the operator's finalizer goes while the operator still runs
        r = control_plane.kubectl("delete", "ftj", "-n", namespace, "chartquick", "--timeout=60s", timeout=70)
        assert r.returncode == 0, r.stderr
        # least privilege, and yet enough: the operator never hit a permission error
        log = control_plane.kubectl("logs", "-n", namespace, pod["metadata"]["name"]).stdout
        assert "kubetune operator starting" in log
        assert "forbidden" not in log.lower(), [ln for ln in log.splitlines() if "forbidden" in ln.lower()][:5]
    finally:
        logs = control_plane.kubectl("logs", "-n", namespace, f"deploy/{release}-kubetune", "--tail=30").stdout
        print(f"\n--- chart operator log (last lines) ---\n{logs}")
        helm(control_plane, "uninstall", release, "-n", namespace, "--wait", "--timeout=60s")
    assert not kube.get("/apis/rbac.authorization.k8s.io/v1/clusterroles",
                        labelSelector=f"app.kubernetes.io/instance={release}")["items"]

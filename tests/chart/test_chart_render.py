"""`helm lint` and `helm template` of charts/kubetune: what each value renders, and RBAC that is
exactly what operator/README.md lists. Uses the helm v3 that tests/cluster/build.py builds (no
cluster needed); the server-side checks are in tests/e2e/test_chart.py."""

from __future__ import annotations

import json
import subprocess

import pytest

from .chartlib import CHART, find, one, render, rule_set, set_args, template

NAMESPACED = {  # operator/README.md, per namespace
    *{("kubetune.io", "finetunejobs", v) for v in ("get", "list", "watch", "patch")},
    ("kubetune.io", "finetunejobs/status", "patch"),
    *{("batch", "jobs", v) for v in ("create", "get", "list", "watch", "patch", "delete")},
    *{("", r, v) for r in ("configmaps", "services") for v in ("create", "get", "list", "watch", "patch", "delete")},
    *{("", "pods", v) for v in ("get", "list", "watch")},
    ("", "events", "create"),
    ("", "events", "list"),  # a Job's FailedCreate events
    ("kueue.x-k8s.io", "workloads", "list"),  # why Kueue has not admitted a queued stage Job
}
NETWORK_POLICIES = {("networking.k8s.io", "networkpolicies", v)
                    for v in ("create", "get", "list", "watch", "patch", "delete")}
CRDS = {("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("get", "list", "watch")}

FULL = {  # every optional part on
    "operator": {"watchNamespaces": ["ml", "research"]},
    "serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True},
    "networkPolicy": {"enabled": True}, "prometheusAnnotations": {"enabled": True},
    "runtime": {"runtimeClassName": "nvidia", "nodeSelector": {"nvidia.com/gpu.present": "true"}},
}


@pytest.mark.parametrize("values", [None, FULL, {"operator": {"peering": {"enabled": False}}}],
                         ids=["defaults", "everything-on", "standalone"])
def test_helm_lint_is_clean(helm, values):
    r = subprocess.run([helm, "lint", str(CHART), "--strict", *set_args(values)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "0 chart(s) failed" in r.stdout, r.stdout + r.stderr
    assert "[WARNING]" not in r.stdout and "[ERROR]" not in r.stdout, r.stdout


def test_cluster_wide_rbac_is_exactly_the_readme(helm):
    objs = render(helm)
    (cr,) = find(objs, "ClusterRole")
    # no namespaces rule: kopf lists namespaces only when given some (its namespace observer)
    assert rule_set(cr["rules"]) == NAMESPACED | CRDS | {
        ("kopf.dev", "clusterkopfpeerings", v) for v in ("get", "list", "watch", "patch")}
    assert not find(objs, "Role") and not find(objs, "RoleBinding")
    crb = one(objs, "ClusterRoleBinding")
    assert crb["subjects"] == [{"kind": "ServiceAccount", "name": "kt-kubetune", "namespace": "kubetune-system"}]
    assert crb["roleRef"]["name"] == cr["metadata"]["name"]
    for o in objs:  # least privilege: no wildcard, no secrets, no escalation verbs
        for rule in o.get("rules", []):
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule
            assert "secrets" not in rule["resources"], rule
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), rule
    assert one(objs, "ClusterKopfPeering")["metadata"]["name"] == "kubetune"


def test_namespaced_mode_has_a_role_per_namespace_and_only_crd_reads_cluster_wide(helm):
    objs = render(helm, {"operator": {"watchNamespaces": ["ml", "research"]}})
    (cr,) = find(objs, "ClusterRole")
    # kopf follows the watched namespaces through a namespace list/watch (tests/e2e/test_chart.py
    # checks the operator's log for permission errors)
    assert rule_set(cr["rules"]) == CRDS | {("", "namespaces", "list"), ("", "namespaces", "watch")}
    for ns in ("ml", "research"):
        role = one(objs, "Role", namespace=ns)
        assert rule_set(role["rules"]) == NAMESPACED | {
            ("kopf.dev", "kopfpeerings", v) for v in ("get", "list", "watch", "patch")}
        rb = one(objs, "RoleBinding", namespace=ns)
        assert rb["subjects"][0]["namespace"] == "kubetune-system" and rb["roleRef"]["kind"] == "Role"
        assert one(objs, "KopfPeering", namespace=ns)["metadata"]["name"] == "kubetune"
    assert not find(objs, "ClusterKopfPeering")
    env = {e["name"]: e.get("value") for e in one(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KUBETUNE_OPERATOR_NAMESPACES"] == "ml,research"


def test_deployment(helm):
    objs = render(helm)
    dep = one(objs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert pod["serviceAccountName"] == one(objs, "ServiceAccount")["metadata"]["name"] == "kt-kubetune"
    assert c["image"] == "ghcr.io/kubetune/operator:0.1.0"
    assert c["command"] == ["python", "-m", "kubetune.operator"] and c["args"] == ["--peering=kubetune"]
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"metrics": 8080, "health": 8081}
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]}}
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    assert c["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}] and pod["volumes"][0]["emptyDir"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["KUBETUNE_OPERATOR_RUNTIME_IMAGE"] == "ghcr.io/kubetune/runtime:0.1.0"
    assert env["KUBETUNE_OPERATOR_NAMESPACES"] == ""
    assert env["KUBETUNE_OPERATOR_HEALTH_PORT"] == "8081" and env["KUBETUNE_OPERATOR_METRICS_PORT"] == "8080"
    assert env["KUBETUNE_OPERATOR_RUNTIME_METRICS_PORT"] == "9400"
    assert json.loads(env["KUBETUNE_OPERATOR_DEFAULT_TOLERATIONS"]) == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert json.loads(env["KUBETUNE_OPERATOR_DEFAULT_NODE_SELECTOR"]) == {}
    svc = one(objs, "Service")
    assert svc["spec"]["ports"] == [{"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}]
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    # off by default
    assert not find(objs, "PodMonitor") and not find(objs, "ServiceMonitor") and not find(objs, "NetworkPolicy")
    assert "prometheus.io/scrape" not in (dep["spec"]["template"]["metadata"].get("annotations") or {})


def test_bring_your_own_service_account_and_rbac(helm):
    objs = render(helm, {"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "ops-sa"}})
    assert not [o for o in objs if o["kind"] in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role",
                                                  "RoleBinding")]
    assert one(objs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "ops-sa"


def test_standalone_and_replicas(helm):
    dep = one(render(helm, {"operator": {"peering": {"enabled": False}}}), "Deployment")
    assert dep["spec"]["template"]["spec"]["containers"][0]["args"] == ["--standalone"]
    r = template(helm, {"replicaCount": 2, "operator": {"peering": {"enabled": False}}}, check=False)
    assert r.returncode != 0 and "needs operator.peering.enabled=true" in r.stderr
    assert one(render(helm, {"replicaCount": 2}), "Deployment")["spec"]["replicas"] == 2


def test_everything_on(helm):
    objs = render(helm, FULL)
    pm = one(objs, "PodMonitor")
    (ep,) = pm["spec"]["podMetricsEndpoints"]
    assert ep["port"] == "metrics" and ep["honorLabels"] is False and ep["path"] == "/metrics"
    assert pm["spec"]["jobLabel"] == "kubetune.io/job"  # the operator's label: a pod cannot claim another job
    assert pm["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/managed-by": "kubetune-operator"}
    assert pm["spec"]["namespaceSelector"] == {"matchNames": ["ml", "research"]}
    sm = one(objs, "ServiceMonitor")
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    assert sm["spec"]["selector"]["matchLabels"] == one(objs, "Service")["spec"]["selector"]
    np_ = one(objs, "NetworkPolicy")
    assert np_["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert any(p.get("port") == 9400 for rule in np_["spec"]["egress"] for p in rule["ports"])
    dep = one(objs, "Deployment")
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert ann == {"prometheus.io/scrape": "true", "prometheus.io/port": "8080", "prometheus.io/path": "/metrics"}
    assert one(objs, "Service")["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KUBETUNE_OPERATOR_DEFAULT_RUNTIME_CLASS_NAME"] == "nvidia"
    assert json.loads(env["KUBETUNE_OPERATOR_DEFAULT_NODE_SELECTOR"]) == {"nvidia.com/gpu.present": "true"}


def test_dashboard_configmap_carries_the_dashboard(helm):
    cm = one(render(helm), "ConfigMap", "kt-kubetune-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["kubetune.json"]) == json.loads((CHART / "files" / "kubetune.json").read_text())
    assert not [o for o in render(helm, {"dashboard": {"enabled": False}}) if o["kind"] == "ConfigMap"]


def test_crds_are_shipped(helm):
    names = {o["metadata"]["name"] for o in render(helm) if o["kind"] == "CustomResourceDefinition"}
    assert names == {"finetunejobs.kubetune.io", "clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}


@pytest.mark.parametrize("values, complaint", [
    ({"bogus": 1}, "additional properties 'bogus' not allowed"),
    ({"operator": {"logFormat": "xml"}}, "logFormat"),
    ({"operator": {"watchNamespaces": ["Not_A_Namespace"]}}, "watchNamespaces"),
    ({"runtime": {"metricsPort": 70000}}, "metricsPort"),
    ({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
    ({"podMonitor": {"interval": "soon"}}, "interval"),
])
def test_schema_rejects_bad_values(helm, values, complaint):
    r = template(helm, values, check=False)
    assert r.returncode != 0 and complaint in r.stderr, r.stderr


def test_training_network_policies_add_their_rights_and_the_operators_settings(helm):
    objs = render(helm, {"trainingNetworkPolicy": {"enabled": True, "monitoringNamespaces": ["prom"]}})
    (role,) = [o for o in objs if o["kind"] == "ClusterRole" and NETWORK_POLICIES <= rule_set(o["rules"])]
    assert rule_set(role["rules"]) >= NAMESPACED
    env = {e["name"]: e.get("value") for e in one(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]}
    np = json.loads(env["KUBETUNE_OPERATOR_TRAINING_NETWORK_POLICY"])
    assert np["monitoringNamespaces"] == ["prom"] and np["egress"] is None
    assert np["operatorPodLabels"]["app.kubernetes.io/component"] == "operator"
    off = render(helm, {})
    assert not any(NETWORK_POLICIES & rule_set(o["rules"]) for o in off if o["kind"] in ("ClusterRole", "Role"))
    assert "KUBETUNE_OPERATOR_TRAINING_NETWORK_POLICY" not in json.dumps(one(off, "Deployment"))
    policy = json.loads({e["name"]: e.get("value") for e in one(off, "Deployment")["spec"]["template"]["spec"][
        "containers"][0]["env"]}["KUBETUNE_OPERATOR_POLICY"])
    assert policy["hostNetwork"] is False and policy["admission"] is True


def test_model_cache_values_reach_the_operator_and_the_admission_policy(helm):
    def env_of(objs):
        return {e["name"]: e.get("value") for e in one(objs, "Deployment")["spec"]["template"]["spec"][
            "containers"][0]["env"]}

    off = render(helm)
    assert not {"KUBETUNE_OPERATOR_MODEL_CACHE_CLAIM", "KUBETUNE_OPERATOR_MODEL_CACHE_SUB_PATH"} & set(env_of(off))
    assert json.loads(env_of(off)["KUBETUNE_OPERATOR_POLICY"])["modelCacheClaimPrefixes"] == []
    objs = render(helm, {"modelCache": {"claimName": "models", "subPath": "hf"},
                         "policy": {"modelCacheClaimPrefixes": ["team-a-"]}})
    env = env_of(objs)
    assert env["KUBETUNE_OPERATOR_MODEL_CACHE_CLAIM"] == "models" and env["KUBETUNE_OPERATOR_MODEL_CACHE_SUB_PATH"] == "hf"
    assert json.loads(env["KUBETUNE_OPERATOR_POLICY"])["modelCacheClaimPrefixes"] == ["team-a-"]
    vap = one(objs, "ValidatingAdmissionPolicy")
    variables = {v["name"]: v["expression"] for v in vap["spec"]["variables"]}
    assert json.loads(variables["modelCacheClaims"]) == ["team-a-"] and variables["modelCacheDefault"] == "'models'"
    (rule,) = [v for v in vap["spec"]["validations"] if "modelCache" in v["expression"]]
    assert "spec.resources.modelCache.claimName" in rule["messageExpression"]
    for bad in ({"claimName": "Bad_Name"}, {"claimName": "ok", "subPath": "../x"}):
        r = template(helm, {"modelCache": bad}, check=False)
        assert r.returncode != 0 and "modelCache" in r.stderr, r.stderr

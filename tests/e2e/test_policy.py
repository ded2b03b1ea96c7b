"""The cluster policy on the real kube-apiserver: the chart's ValidatingAdmissionPolicy (rendered
by `helm template` from values) rejects every FineTuneJob of the adversarial table at apply time,
naming the field, and accepts them all once the values allow what they ask; with the admission
policy off, the operator refuses them itself (Failed, reason PolicyViolation) and creates nothing.

The binding is scoped to the test's namespace (values `policy.namespaceSelector`), so the other
tests of the session never meet it, and removed afterwards.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.cluster.util import wait_for
from tests.e2e.operatorlib import OperatorProcess, condition, ftj, serving
from tests.policy_cases import BASE, CASES, RELAXED, RUNTIME_REPOSITORY, STRICT, case_doc

pytestmark = pytest.mark.e2e

CHART = Path(__file__).resolve().parents[2] / "charts" / "kubetune"


def render_policy(cp, tmp_path: Path, namespace: str, policy: dict) -> str:
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"runtime": {"image": {"repository": RUNTIME_REPOSITORY}}, "policy": {
        **policy, "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}}}))
    r = cp.run_tool("helm", "template", "kt", str(CHART), "-n", "kubetune-system", "-f", str(values),
                    "--show-only", "templates/admission-policy.yaml")
    assert r.returncode == 0, r.stderr
    return r.stdout


def apply_doc(cp, namespace: str, doc: dict, *extra: str):
    return cp.kubectl("apply", "-n", namespace, *extra, "-f", "-", input=yaml.safe_dump(doc))


def in_effect(cp, namespace: str, refused: bool) -> bool:
    """The apiserver applies a new or changed policy a moment after it is stored: probe it."""
    r = apply_doc(cp, namespace, case_doc(CASES[0], "probe"), "--dry-run=server")
    return (r.returncode != 0) == refused


@pytest.fixture
def admission(control_plane, crd, namespace, tmp_path):
    rendered: list[str] = []

    def install(policy: dict, refused: bool) -> None:
        text = render_policy(control_plane, tmp_path, namespace, policy)
        r = control_plane.kubectl("apply", "-f", "-", input=text)
        assert r.returncode == 0, r.stderr
        rendered.append(text)
        wait_for(lambda: in_effect(control_plane, namespace, refused), 30, "the admission policy in effect")

    yield install
    if rendered:
        control_plane.kubectl("delete", "--ignore-not-found", "-f", "-", input=rendered[-1])


def test_adversarial_jobs_are_refused_at_apply_time_and_accepted_when_the_policy_allows_them(
        control_plane, kube, namespace, admission):
    admission(STRICT, refused=True)
    for i, case in enumerate(CASES):
        r = apply_doc(control_plane, namespace, case_doc(case, f"adversary-{i}"))
        assert r.returncode != 0, f"{case.name}: accepted"
        assert case.field in r.stderr, f"{case.name}: {r.stderr}"
        if not case.spec_rule:
            assert "ValidatingAdmissionPolicy" in r.stderr and "denied request" in r.stderr, r.stderr
            assert "not allowed by the cluster policy" in r.stderr or "does not allow" in r.stderr, r.stderr
    assert kube.get(f"/apis/kubetune.io/v1alpha1/namespaces/{namespace}/finetunejobs")["items"] == []
    assert kube.get(f"/api/v1/namespaces/{namespace}/pods")["items"] == []
    # what the policy allows passes: the compliant job
    r = apply_doc(control_plane, namespace, {**BASE, "metadata": {"name": "compliant"}})
    assert r.returncode == 0, r.stderr

    admission(RELAXED, refused=False)
    accepted = []
    for i, case in enumerate(CASES):
        r = apply_doc(control_plane, namespace, case_doc(case, f"adversary-{i}"))
        if case.spec_rule:  # no policy makes a password in a URL acceptable
            assert r.returncode != 0 and case.field in r.stderr, r.stderr
        else:
            assert r.returncode == 0, f"{case.name}: {r.stderr}"
            accepted.append(f"adversary-{i}")
    items = kube.get(f"/apis/kubetune.io/v1alpha1/namespaces/{namespace}/finetunejobs")["items"]
    assert sorted(o["metadata"]["name"] for o in items) == sorted([*accepted, "compliant"])
    # metadata-only changes pass under any policy (labels, finalizers), a spec change is checked
    admission(STRICT, refused=True)
    r = control_plane.kubectl("label", "-n", namespace, "ftj", "adversary-0", "team=research")
    assert r.returncode == 0, r.stderr
    r = control_plane.kubectl("patch", "-n", namespace, "ftj", "adversary-1", "--type=merge",
                              "-p", json.dumps({"spec": {"resources": {"cpu": "2"}}}))
    assert r.returncode != 0 and "spec.resources.image" in r.stderr, r.stderr


def test_without_the_admission_policy_the_operator_refuses_and_creates_nothing(
        control_plane, kube, crd, namespace, tmp_path):
    values = yaml.safe_load((CHART / "values.yaml").read_text())["policy"]
    op = OperatorProcess(control_plane, tmp_path / "operator", runtime_image=f"{RUNTIME_REPOSITORY}:0.1.0",
                         extra_args=("--policy", json.dumps({**values, **STRICT})))
    for _ in serving(op):
        names = []
        for i, case in enumerate(c for c in CASES if not c.spec_rule):
            r = apply_doc(control_plane, namespace, case_doc(case, f"adversary-{i}"))
            assert r.returncode == 0, r.stderr
            names.append((f"adversary-{i}", case))
        for name, case in names:
            done = wait_for(lambda: (lambda o: o if condition(o, "Failed").get("status") == "True" else None)(
                ftj(kube, namespace, name)), 60, f"{name} Failed")
            failed = condition(done, "Failed")
            assert failed["reason"] == "PolicyViolation" and case.field in failed["message"], failed
        assert kube.get(f"/apis/batch/v1/namespaces/{namespace}/jobs")["items"] == []
        assert kube.get(f"/api/v1/namespaces/{namespace}/pods")["items"] == []
        events = kube.get(f"/api/v1/namespaces/{namespace}/events")["items"]
        assert any(e["reason"] == "PolicyViolation" for e in events)


def test_the_operator_gives_each_stage_a_network_policy(control_plane, kube, crd, namespace, tmp_path):
    """The NetworkPolicy is accepted by the real apiserver and owned by the FineTuneJob. (Whether
    traffic obeys it is the CNI's business: this cluster's bridge plugin does not enforce
    NetworkPolicy, so only the object is checked here.)"""
    np_config = {"operatorNamespace": "kubetune-system", "operatorPodLabels": {"app.kubernetes.io/name": "kubetune"},
                 "monitoringNamespaces": ["monitoring"], "egress": None}
    op = OperatorProcess(control_plane, tmp_path / "operator", runtime_image=f"{RUNTIME_REPOSITORY}:0.1.0",
                         extra_args=("--training-network-policy", json.dumps(np_config)))
    for _ in serving(op):
        doc = {**BASE, "metadata": {"name": "fenced"}, "spec": {**BASE["spec"], "resources": {"gpusPerNode": 0}}}
        assert apply_doc(control_plane, namespace, doc).returncode == 0
        path = f"/apis/networking.k8s.io/v1/namespaces/{namespace}/networkpolicies"
        (np,) = wait_for(lambda: kube.get(path)["items"], 60, "the stage's NetworkPolicy")
        uid = ftj(kube, namespace, "fenced")["metadata"]["uid"]
        assert [r["uid"] for r in np["metadata"]["ownerReferences"]] == [uid]
        assert np["spec"]["podSelector"]["matchLabels"] == {"kubetune.io/job": "fenced", "kubetune.io/stage": "sft"}
        assert np["spec"]["policyTypes"] == ["Ingress"] and len(np["spec"]["ingress"]) == 2
        job = wait_for(lambda: kube.get(f"/apis/batch/v1/namespaces/{namespace}/jobs")["items"], 60, "the Job")[0]
        assert job["spec"]["template"]["metadata"]["labels"]["kubetune.io/stage"] == "sft"  # the pods it selects

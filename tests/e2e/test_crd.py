"""The generated FineTuneJob CRD against the real kube-apiserver: the structural schema is
accepted, the examples validate server-side, printer columns and `kubectl explain` work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml


pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def test_crd_is_structural_and_established(control_plane, crd):
    r = control_plane.kubectl("get", "crd", crd["metadata"]["name"], "-o", "json")
    assert r.returncode == 0, r.stderr
    conds = {c["type"]: c for c in json.loads(r.stdout)["status"]["conditions"]}
    assert conds["Established"]["status"] == "True"
    assert conds["NamesAccepted"]["status"] == "True"
    # a non-structural schema is reported here rather than refused
    assert conds.get("NonStructuralSchema", {}).get("status") != "True", conds.get("NonStructuralSchema")
    assert "ftj" in crd["spec"]["names"].get("shortNames", [])


def test_kubectl_explain_shows_field_docs(control_plane, crd):
    r = control_plane.kubectl("explain", "finetunejob.spec")
    assert r.returncode == 0, r.stderr
    assert "stages" in r.stdout and "DESCRIPTION" in r.stdout.upper()


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_is_accepted_and_listed_with_columns(control_plane, crd, namespace, example):
    docs = [d for d in yaml.safe_load_all(example.read_text()) if d and d.get("kind") == "FineTuneJob"]
    assert docs, f"{example} has no FineTuneJob"
    r = control_plane.kubectl("apply", "-n", namespace, "-f", str(example))
    assert r.returncode == 0, r.stdout + r.stderr
    r = control_plane.kubectl("get", "ftj", "-n", namespace)
    assert r.returncode == 0, r.stderr
    header, *rows = r.stdout.splitlines()
    version = next(v for v in crd["spec"]["versions"] if v.get("served"))
    expected = ["NAME"] + [c["name"].upper() for c in version.get("additionalPrinterColumns", [])
                           if not c.get("priority")]
    assert header.split() == expected
    names = {row.split()[0] for row in rows}
    assert {d["metadata"]["name"] for d in docs} <= names


def test_invalid_object_is_rejected_by_the_apiserver(control_plane, crd, namespace):
    """The schema is enforced server-side: an unknown type for a required structure fails."""
    version = next(v for v in crd["spec"]["versions"] if v.get("served"))
    obj = {"apiVersion": f"{crd['spec']['group']}/{version['name']}", "kind": crd["spec"]["names"]["kind"],
           "metadata": {"name": "broken"}, "spec": {"stages": "not-a-list"}}
    r = control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj))
    assert r.returncode != 0
    assert "spec.stages" in r.stderr, r.stderr

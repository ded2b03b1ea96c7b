"""argocd/health.lua through lupa against every case of argocd/health_test.yaml (Argo CD's own
layout; the testdata objects are captures from live e2e runs), plus edge cases built here."""

from __future__ import annotations

import copy

import pytest
import yaml

lupa = pytest.importorskip("lupa")

from .argocd_lua import ARGOCD, HEALTH_LUA, cases, health  # noqa: E402

CASES = cases()


def load(path: str) -> dict:
    return yaml.safe_load((ARGOCD / path).read_text())


def test_every_testdata_file_is_a_case():
    listed = {c["inputPath"] for c in CASES}
    on_disk = {f"testdata/{p.name}" for p in (ARGOCD / "testdata").glob("*.yaml")}
    assert listed == on_disk
    assert {c["healthStatus"]["status"] for c in CASES} == {"Progressing", "Healthy", "Degraded", "Suspended"}


@pytest.mark.parametrize("case", CASES, ids=[c["inputPath"].split("/")[1][:-5] for c in CASES])
def test_health_case(case):
    obj = load(case["inputPath"])
    assert obj["apiVersion"] == "kubetune.io/v1alpha1" and obj["kind"] == "FineTuneJob"
    assert health(obj) == case["healthStatus"]


def test_degraded_carries_the_failed_condition_message():
    obj = load("testdata/failed-bad-input.yaml")
    failed = next(c for c in obj["status"]["conditions"] if c["type"] == "Failed")
    assert health(obj) == {"status": "Degraded", "message": failed["message"]}
    failed["message"] = ""
    assert health(obj) == {"status": "Degraded", "message": failed["reason"]}


def test_stale_status_is_progressing_whatever_it_says():
    for name in ("succeeded.yaml", "failed-bad-input.yaml", "suspended.yaml"):
        obj = load(f"testdata/{name}")
        obj["metadata"]["generation"] = obj["status"]["observedGeneration"] + 1
        assert health(obj)["status"] == "Progressing", name
        del obj["status"]["observedGeneration"]
        assert health(obj)["status"] == "Progressing", name


def test_conditions_win_over_phase():
    obj = load("testdata/running.yaml")
    o = copy.deepcopy(obj)
    o["status"]["phase"] = "Succeeded"  # phase is a convenience; the Succeeded condition is False
    assert health(o)["status"] == "Progressing"
    o = copy.deepcopy(obj)
    del o["status"]["conditions"]
    o["status"]["phase"] = "Suspended"  # no conditions at all: phase is all there is
    assert health(o)["status"] == "Suspended"


def test_script_uses_only_lua_51():
    """Argo CD runs gopher-lua (5.1): none of 5.2+'s goto, //, bit operators, integer formats."""
    src = HEALTH_LUA.read_text()
    code = "\n".join(line.split("--", 1)[0] for line in src.splitlines())
    for token in ("goto ", "//", "<<", ">>", " & ", " | ", "math.tointeger", "utf8.", "table.move"):
        assert token not in code, token

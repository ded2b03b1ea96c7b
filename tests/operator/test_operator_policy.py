"""The operator's own check of the cluster policy (operator/policy.py) on the adversarial table
that tests/e2e/test_policy.py applies to the real apiserver through the chart's admission policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kubetune.operator.config import parse_config
from kubetune.operator.policy import Policy, image_repository, parse_policy, violations
from kubetune.runtime.api.errors import SpecError
from kubetune.runtime.api.spec import parse_job
from tests.policy_cases import BASE, CASES, RELAXED, RUNTIME_REPOSITORY, STRICT, case_doc

CHART_VALUES = Path(__file__).resolve().parents[2] / "charts" / "kubetune" / "values.yaml"
RUNTIME_IMAGE = f"{RUNTIME_REPOSITORY}:0.1.0"


def chart_policy(**overrides) -> Policy:
    values = yaml.safe_load(CHART_VALUES.read_text())["policy"]
    return parse_policy(json.dumps({**values, **overrides}))


def test_the_operators_defaults_are_the_charts():
    assert chart_policy() == Policy()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_each_case_is_refused_naming_its_field_and_allowed_when_relaxed(case):
    doc = case_doc(case, "adversary")
    if case.spec_rule:  # the spec itself refuses it: no policy can allow it
        with pytest.raises(SpecError) as err:
            parse_job(doc)
        assert case.field in str(err.value)
        return
    job = parse_job(doc)
    problems = violations(job, chart_policy(**STRICT), RUNTIME_IMAGE)
    assert len(problems) == 1 and problems[0].startswith(case.field), problems
    assert "not allow" in problems[0]
    assert violations(job, chart_policy(**RELAXED), RUNTIME_IMAGE) == []


def test_the_compliant_job_passes_and_no_policy_allows_anything():
    job = parse_job(BASE)
    assert violations(job, chart_policy(**STRICT), RUNTIME_IMAGE) == []
    adversary = parse_job(case_doc(CASES[0], "x"))
    assert violations(adversary, None, RUNTIME_IMAGE) == []


def test_the_runtime_image_is_allowed_by_repository_not_by_prefix():
    assert image_repository("ghcr.io/kubetune/runtime:0.1.0") == "ghcr.io/kubetune/runtime"
    assert image_repository("localhost:5000/runtime@sha256:ab") == "localhost:5000/runtime"
    assert image_repository("localhost:5000/runtime") == "localhost:5000/runtime"
    digest = dict(BASE, spec={**BASE["spec"], "resources": {"image": f"{RUNTIME_REPOSITORY}@sha256:{'a' * 64}"}})
    assert violations(parse_job(digest), Policy(), RUNTIME_IMAGE) == []


def test_a_bad_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown key 'hostnetwork'"):
        parse_policy('{"hostnetwork": true}')
    with pytest.raises(ValueError, match="imagePrefixes must be a list of strings"):
        parse_policy('{"imagePrefixes": "ghcr.io/"}')
    assert parse_policy("") is None
    with pytest.raises(SystemExit, match="--policy: not valid JSON"):
        parse_config(["--policy", "{nope"])
    cfg, _ = parse_config(["--policy", json.dumps({"hostNetwork": True, "admission": True})])
    assert cfg.policy == Policy(host_network=True)


def test_reconcile_fails_a_job_against_the_policy_before_creating_anything():
    from dataclasses import replace

    from kubetune.operator.config import OperatorConfig
    from kubetune.operator.reconcile import Observed, reconcile

    config = replace(OperatorConfig(runtime_image=RUNTIME_IMAGE), policy=chart_policy(**STRICT))
    body = {**case_doc(CASES[0], "adversary"), "metadata": {"name": "adversary", "namespace": "t", "uid": "u1",
                                                             "generation": 1}}
    d = reconcile(body, Observed(), config)
    assert d.status["phase"] == "Failed" and not d.actions
    failed = next(c for c in d.status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "PolicyViolation" and "spec.resources.podOverrides.hostNetwork" in failed["message"]
    assert [e.reason for e in d.events] == ["PolicyViolation"]
    # the compliant job goes on to create its children
    ok = {**BASE, "metadata": {"name": "ok", "namespace": "t", "uid": "u2", "generation": 1}}
    assert any(a.verb == "create" for a in reconcile(ok, Observed(), config).actions)


def test_the_operators_own_model_cache_claim_is_always_allowed():
    job = parse_job(case_doc(next(c for c in CASES if "modelCache" in c.field), "cache"))
    assert violations(job, chart_policy(**STRICT), RUNTIME_IMAGE, model_cache_claim="payments-db-data") == []
    assert violations(job, chart_policy(**STRICT, modelCacheClaimPrefixes=["payments-"]), RUNTIME_IMAGE) == []
    (problem,) = violations(job, chart_policy(**STRICT, modelCacheClaimPrefixes=["model-cache"]), RUNTIME_IMAGE,
                            model_cache_claim="model-cache")
    assert "'payments-db-data'" in problem and "'model-cache'" in problem

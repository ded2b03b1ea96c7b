"""The FineTuneJob model: defaults, validation messages, the CRD it generates, overrides, plan."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kubetune.runtime.crd import crd, crd_yaml
from kubetune.runtime.api.errors import SpecError
from kubetune.runtime.api.overrides import apply_overrides
from kubetune.runtime.api.plan import plan
from kubetune.runtime.api.spec import load_job, parse_job
from tests.invalid_specs import BASE, INVALID, patched

ROOT = Path(__file__).resolve().parents[2]


def doc(**spec_updates):
    return patched(spec_updates)


def test_defaults_match_llama_factory():
    job = parse_job(doc())
    stage = job.spec.stages[0]
    assert stage.method == "lora"
    assert stage.lora.rank == 8 and stage.lora.resolved_alpha == 16 and stage.lora.dropout == 0.0
    assert stage.lora.target == ["all"]
    assert stage.hyperparameters.cutoff_len == 2048
    assert stage.hyperparameters.lr_scheduler == "cosine"
    assert stage.freeze.trainable_layers == 2
    assert stage.preference.beta == 0.1 and stage.preference.loss_type == "sigmoid"
    assert job.spec.model.trust_remote_code is False


def test_qlora_quantization_defaults():
    job = parse_job(doc(stages=[{"name": "q", "type": "sft", "method": "qlora", "quantization": {"bits": 4}}]))
    q = job.spec.stages[0].quantization
    assert (q.bits, q.type, q.double_quantization) == (4, "nf4", True)


# The invalid cases are shared with the apiserver's test (tests/e2e/test_crd_validation.py).
@pytest.mark.parametrize("case", INVALID, ids=[c.name for c in INVALID])
def test_bad_inputs_are_rejected_naming_the_field(case):
    with pytest.raises(SpecError) as err:
        parse_job(patched(case.patch))
    missing = case.offline.missing_from(str(err.value))
    assert not missing, f"{missing} not in: {err.value}"


def test_bad_metadata_name():
    d = doc()
    d["metadata"]["name"] = "Not_Valid"
    with pytest.raises(SpecError, match=r"metadata.name: must be a DNS label"):
        parse_job(d)


def test_wrong_kind_and_api_version():
    d = doc()
    d["kind"] = "TrainJob"
    with pytest.raises(SpecError, match="kind: expected FineTuneJob"):
        parse_job(d)
    d = doc()
    d["apiVersion"] = "kubetune.io/v2"
    with pytest.raises(SpecError, match="apiVersion: expected kubetune.io/v1alpha1"):
        parse_job(d)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    f = tmp_path / "job.yaml"
    f.write_text("apiVersion: kubetune.io/v1alpha1\nkind: FineTuneJob\nspec: [unclosed\n")
    with pytest.raises(SpecError) as err:
        load_job(f)
    assert str(f) in str(err.value) and "line" in str(err.value)


def test_missing_file():
    with pytest.raises(SpecError, match="file not found"):
        load_job("/nonexistent/job.yaml")


def test_crd_file_is_generated_output():
    committed = (ROOT / "crds" / "finetunejob.yaml").read_text()
    assert committed == crd_yaml(), "crds/finetunejob.yaml is stale: run `kubetune crd > crds/finetunejob.yaml`"


def test_crd_is_structural_and_documented():
    c = crd()
    version = c["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    assert c["spec"]["names"]["shortNames"] == ["ftj"]
    assert "status" in version["subresources"]
    assert [col["name"] for col in version["additionalPrinterColumns"]] == ["Phase", "Stage", "Progress", "Loss", "ETA", "Age"]

    problems = []

    def walk(node, path):
        if not isinstance(node, dict):
            return
        for bad in ("anyOf", "oneOf", "allOf", "$ref", "title", "default"):
            if bad in node:
                problems.append(f"{path}: {bad}")
        if "type" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            problems.append(f"{path}: no type")
        if path.count(".") >= 2 and "description" not in node and not path.endswith("[]"):
            problems.append(f"{path}: no description")
        for k, v in node.get("properties", {}).items():
            walk(v, f"{path}.{k}")
        if "items" in node:
            walk(node["items"], f"{path}[]")

    walk(schema["properties"]["spec"], "spec")
    assert not problems, problems
    stage_rules = schema["properties"]["spec"]["properties"]["stages"]["items"]["x-kubernetes-validations"]
    assert any("qlora" in r["rule"] for r in stage_rules)


def test_overrides_are_typed_and_validated(tmp_path):
    d = apply_overrides(BASE, ["stages.0.hyperparameters.maxSteps=100", "model.name=other/model", "stages.0.lora.target=[q_proj, v_proj]"])
    job = parse_job(d)
    assert job.spec.stages[0].hyperparameters.max_steps == 100
    assert job.spec.model.name == "other/model"
    assert job.spec.stages[0].lora.target == ["q_proj", "v_proj"]
    with pytest.raises(SpecError, match="index 3 is out of range"):
        apply_overrides(BASE, ["stages.3.method=full"])
    with pytest.raises(SpecError, match="learningRate"):
        parse_job(apply_overrides(BASE, ["stages.0.hyperparameters.learningRate=-5"]))


def test_plan_chains_adapters_and_models():
    job = parse_job(doc(stages=[
        {"name": "sft", "type": "sft", "method": "lora"},
        {"name": "dpo", "type": "dpo", "method": "lora"},
        {"name": "full", "type": "sft", "method": "full"},
        {"name": "rm", "type": "rm", "method": "lora"},
        {"name": "rloo", "type": "rloo", "reward": {"modelStage": "rm"}},
        {"name": "merge", "type": "export"},
    ]))
    stages = plan(job, "s3://bucket/run")
    sft, dpo, full, rm, rloo, merge = stages
    assert sft.io.policy.model == "org/model" and sft.io.policy.adapter is None
    assert sft.io.output == "s3://bucket/run/sft/output" and sft.io.output_kind == "adapter"
    assert sft.stage.hyperparameters.learning_rate == 1e-4 and sft.stage.lora.alpha == 16
    # dpo continues the sft adapter, with the sft model as its reference
    assert dpo.io.policy.adapter == sft.io.output and not dpo.io.merge_adapter
    assert dpo.io.reference.adapter == sft.io.output
    # full fine-tuning merges the adapter first and writes a model
    assert full.io.policy.adapter == dpo.io.output and full.io.merge_adapter and full.io.output_kind == "model"
    # rm branches off the policy; rloo reads it as its reward, the policy is still `full`'s output
    assert rm.io.policy.model == full.io.output
    assert rloo.io.reward.model == rm.io.policy.model and rloo.io.reward.adapter == rm.io.output
    assert rloo.io.policy.model == full.io.output
    assert merge.io.policy.adapter == rloo.io.output and merge.io.output_kind == "model"
    assert [s.index for s in stages] == list(range(6)) and all(s.count == 6 for s in stages)


def test_plan_eval_scores_the_policy_and_leaves_it_unchanged():
    job = parse_job(doc(stages=[
        {"name": "before", "type": "eval", "data": [{"name": "quiz", "source": "q.jsonl", "format": "choice"}]},
        {"name": "sft", "type": "sft", "method": "lora"},
        {"name": "after", "type": "eval"},
        {"name": "dpo", "type": "dpo"},
    ]))
    before, sft, after, dpo = plan(job, "s3://b/r")
    assert before.io.policy.model == "org/model" and before.io.policy.adapter is None  # first: the base model
    assert before.io.output_kind == after.io.output_kind == "results" and not after.io.merge_adapter
    assert after.io.policy.adapter == sft.io.output and after.io.reference is None
    assert sft.io.policy.adapter is None  # the eval before it did not become the policy
    assert dpo.io.policy.adapter == sft.io.output and dpo.io.reference.adapter == sft.io.output
    assert after.data[0].name == "d" and before.data[0].format == "choice"
    assert after.stage.evaluation.max_new_tokens == 128 and after.stage.evaluation.choice_scoring == "letter"


def test_plan_local_default_root():
    stages = plan(parse_job(doc()))
    assert stages[0].io.stage_root == "./saves/job/sft"


def test_every_example_validates():
    examples = sorted((ROOT / "examples").glob("*.yaml"))
    assert examples
    for f in examples:
        load_job(f)


def test_validate_cli_exit_codes(tmp_path):
    good = ROOT / "examples" / "quickstart.yaml"
    ok = subprocess.run([sys.executable, "-m", "kubetune.runtime", "validate", str(good)], capture_output=True, text=True)
    assert ok.returncode == 0 and "valid FineTuneJob" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc(stages=[{"name": "x", "type": "sft", "method": "qlora"}])))
    res = subprocess.run([sys.executable, "-m", "kubetune.runtime", "validate", str(bad)], capture_output=True, text=True)
    assert res.returncode == 42
    assert "spec.stages[0].method" in res.stderr and "Traceback" not in res.stderr


def test_reward_functions_and_loss_types_that_are_valid_pass():
    job = parse_job(doc(stages=[
        {"name": "s", "type": "sft"},
        {"name": "d", "type": "dpo", "preference": {"lossType": "ipo"}},
        {"name": "k", "type": "kto"},
        {"name": "k2", "type": "kto", "preference": {"lossType": "apo_zero_unpaired"}},
        {"name": "g", "type": "grpo", "reward": {"functions": ["exact_match", "format", "my_pkg.rewards:score"],
                                                  "pattern": "^<answer>"}},
    ]))
    assert [st.preference.loss_type for st in job.spec.stages[1:4]] == ["ipo", "sigmoid", "apo_zero_unpaired"]
    assert job.spec.stages[4].reward.functions[2] == "my_pkg.rewards:score"



def test_credentials_in_an_endpoint_are_refused_without_echoing_them():
    """(The table has the refusal; here: its variants, the URLs that are fine, and no password in
    the message.)"""
    for url in ("http://minio:minio123@minio.storage:9000", "https://AKIA@s3.example.com/", "s3://u:p@host"):
        with pytest.raises(SpecError) as err:
            parse_job(patched({"storage": {"endpoint": url}}, "userinfo"))
        assert "spec.storage.endpoint" in str(err.value) and "credentialsSecretRef" in str(err.value)
        assert "minio123" not in str(err.value) and "AKIA" not in str(err.value)
    for url in ("http://minio.storage:9000", "https://s3.example.com/path@v2", "http://[::1]:9000"):
        parse_job(patched({"storage": {"endpoint": url}}, "fine"))


def test_eval_data_goes_with_the_training_data_it_measures():
    """Job-level evalData reaches the stages that train on the job's data; a stage's own evalData
    wins; a stage with data of its own gets none from the job."""
    v, w, p = ({"name": n, "source": f"{n}.json"} for n in ("v", "w", "p"))
    job = parse_job(doc(evalData=[v], stages=[
        {"name": "sft", "type": "sft"},
        {"name": "own", "type": "sft", "evalData": [w]},
        {"name": "dpo", "type": "dpo", "data": [{**p, "format": "preference"}]},
        {"name": "merge", "type": "export"},
    ]))
    stages = plan(job)
    assert [[d.name for d in s.eval_data] for s in stages] == [["v"], ["w"], [], []]
    # a stage with its own data and valSize is fine beside job-level evalData
    parse_job(doc(evalData=[v], stages=[{"name": "sft", "type": "sft"},
                                        {"name": "b", "type": "sft", "data": [p], "hyperparameters": {"valSize": 0.1}}]))


def test_min_lr_schedule_and_torch_compile_validate():
    hp = {"lrScheduler": "cosine_with_min_lr", "minLr": 1e-6, "torchCompile": True, "torchCompileMode": "max-autotune"}
    stage = parse_job(doc(stages=[{"name": "a", "type": "sft", "hyperparameters": hp}])).spec.stages[0]
    assert stage.hyperparameters.min_lr == 1e-6 and stage.hyperparameters.torch_compile
    with pytest.raises(SpecError, match="lrScheduler cosine_with_min_lr and minLr go together"):
        parse_job(doc(stages=[{"name": "a", "type": "sft", "hyperparameters": {"lrScheduler": "cosine_with_min_lr"}}]))

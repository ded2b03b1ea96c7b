"""The apiserver itself rejects invalid FineTuneJobs — OpenAPI schema and CEL rules from the
generated CRD — with messages that name the field; and the same documents fail `kubetune
validate` offline, so the two validations cannot drift apart."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import yaml

from tests.unit.test_spec import BASE


pytestmark = pytest.mark.e2e

# (label, spec update, fragment the apiserver's message must contain)
INVALID = [
    ("unknown stage type", {"stages": [{"name": "a", "type": "sftt"}]}, "spec.stages[0].type"),
    ("qlora without bits", {"stages": [{"name": "a", "type": "sft", "method": "qlora"}]}, "method qlora needs quantization.bits"),
    ("negative learning rate", {"stages": [{"name": "a", "type": "sft", "hyperparameters": {"learningRate": -1}}]}, "spec.stages[0].hyperparameters.learningRate"),
    ("duplicate stage names", {"stages": [{"name": "a", "type": "sft"}, {"name": "a", "type": "sft"}]}, "stage names must be unique"),
    ("export first", {"stages": [{"name": "e", "type": "export"}]}, "first stage cannot be export"),
    ("unknown template", {"template": "llama9"}, "spec.template"),
    ("unknown method", {"stages": [{"name": "a", "type": "sft", "method": "lorra"}]}, "spec.stages[0].method"),
    ("quantization bits 3", {"stages": [{"name": "a", "type": "sft", "method": "qlora", "quantization": {"bits": 3}}]}, "spec.stages[0].quantization.bits"),
    ("zero batch size", {"stages": [{"name": "a", "type": "sft", "hyperparameters": {"batchSize": 0}}]}, "spec.stages[0].hyperparameters.batchSize"),
    ("stage name not a DNS label", {"stages": [{"name": "SFT_1", "type": "sft"}]}, "spec.stages[0].name"),
    ("no stages", {"stages": []}, "spec.stages"),
    ("no data", {"data": []}, "every training stage needs data"),
    ("unknown dataset format", {"data": [{"name": "d", "source": "x.json", "format": "alpacca"}]}, "spec.data[0].format"),
    ("lora dropout 1", {"stages": [{"name": "a", "type": "sft", "lora": {"dropout": 1.0}}]}, "spec.stages[0].lora.dropout"),
    ("negative gpus", {"resources": {"gpusPerNode": -1}}, "spec.resources.gpusPerNode"),
    ("distill without teacher", {"stages": [{"name": "a", "type": "distill"}]}, "needs `teacher`"),
    ("grpo without reward", {"stages": [{"name": "a", "type": "grpo"}]}, "need reward.modelStage"),
    ("reward stage not rm", {"stages": [{"name": "s", "type": "sft"}, {"name": "g", "type": "grpo", "reward": {"modelStage": "s"}}]}, "must name an rm stage"),
    ("checkpoint every 0 steps", {"checkpoint": {"everySteps": 0}}, "spec.checkpoint.everySteps"),
    ("bad addressing style", {"storage": {"uri": "s3://b/p", "addressingStyle": "sideways"}}, "spec.storage.addressingStyle"),
    ("gpus through podOverrides", {"resources": {"podOverrides": {"resources": {"nvidia.com/gpu": "2"}}}}, "use resources.cpu"),
    ("extra resource not a quantity", {"resources": {"podOverrides": {"resources": {"rdma/hca": "lots"}}}}, "must be a Kubernetes quantity"),
    ("unknown dpo loss type", {"stages": [{"name": "s", "type": "sft"}, {"name": "d", "type": "dpo", "preference": {"lossType": "ipo2"}}]}, "spec.stages[1].preference.lossType"),
    ("dpo loss type on a kto stage", {"stages": [{"name": "k", "type": "kto", "preference": {"lossType": "ipo"}}]}, "a kto stage sigmoid"),
    ("unknown reward function", {"stages": [{"name": "g", "type": "grpo", "reward": {"functions": ["exact-match"]}}]}, "reward.functions: each is one of"),
    ("format reward without pattern", {"stages": [{"name": "g", "type": "grpo", "reward": {"functions": ["format"]}}]}, "the format reward needs reward.pattern"),
]


def _doc(update: dict, name: str) -> dict:
    d = copy.deepcopy(BASE)
    d["metadata"]["name"] = name
    d["spec"].update(update)
    return d


@pytest.mark.parametrize("label,update,fragment", INVALID, ids=[i[0] for i in INVALID])
def test_apiserver_rejects_invalid_finetunejob(control_plane, crd, namespace, tmp_path, label, update, fragment):  # noqa: F811
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(_doc(update, "bad")))
    r = control_plane.kubectl("apply", "-n", namespace, "-f", str(f))
    assert r.returncode != 0, f"apiserver accepted {label}"
    assert "is invalid" in r.stderr and fragment in r.stderr, r.stderr
    offline = subprocess.run([sys.executable, "-m", "kubetune.runtime", "validate", str(f)], capture_output=True, text=True)
    assert offline.returncode == 42, offline.stdout + offline.stderr


def test_valid_twin_is_accepted(control_plane, crd, namespace, tmp_path):  # noqa: F811
    """The base document of the cases above is valid: each rejection comes from its one change."""
    f = tmp_path / "good.yaml"
    f.write_text(yaml.safe_dump(_doc({}, "good")))
    r = control_plane.kubectl("apply", "-n", namespace, "-f", str(f))
    assert r.returncode == 0, r.stderr

"""hyperparameters.optimizer and its settings → the TrainingArguments transformers reads (no training:
tests/runtime/test_optimizers.py trains with each), valid combinations of the spec, and the error
when the optimizer's package is missing."""

from __future__ import annotations

import pytest

from kubetune.runtime import optimizers
from kubetune.runtime.api.errors import UserError
from kubetune.runtime.api.spec import Hyperparameters, parse_job
from tests.invalid_specs import patched


def _args(**hp):
    return optimizers.training_args(Hyperparameters(**hp), cuda=False, where="spec.stages[0].hyperparameters.optimizer")


def test_default_optimizer_and_betas():
    assert _args() == {"optim": "adamw_torch"}
    assert optimizers.training_args(Hyperparameters(), cuda=True, where="x") == {"optim": "adamw_torch_fused"}
    assert _args(optimizer="adamw_8bit", adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6) == {
        "optim": "adamw_8bit", "adam_beta1": 0.8, "adam_beta2": 0.95, "adam_epsilon": 1e-6}


def test_galore_settings_reach_optim_args():
    assert _args(optimizer="galore_adamw") == {
        "optim": "galore_adamw", "optim_target_modules": "all-linear",
        "optim_args": "rank=16,update_proj_gap=200,scale=2.0,proj_type=std"}
    got = _args(optimizer="galore_adamw_8bit", gradient_accumulation=1,
                galore={"rank": 32, "update_interval": 50, "scale": 0.25, "proj_type": "right",
                        "target": ["q_proj", "v_proj"], "layerwise": True})
    assert got == {"optim": "galore_adamw_8bit_layerwise", "optim_target_modules": ["q_proj", "v_proj"],
                   "optim_args": "rank=32,update_proj_gap=50,scale=0.25,proj_type=right"}


def test_apollo_settings_reach_optim_args():
    got = _args(optimizer="apollo_adamw", adam_beta2=0.98,
                apollo={"rank": 8, "update_interval": 10, "scale": 1.0, "proj": "svd", "scale_type": "tensor"})
    assert got == {"optim": "apollo_adamw", "optim_target_modules": "all-linear", "adam_beta2": 0.98,
                   "optim_args": "rank=8,update_proj_gap=10,scale=1.0,proj=svd,proj_type=std,scale_type=tensor"}


@pytest.mark.parametrize("name", ["adam_mini", "muon", "badam"])
def test_optimizers_built_by_kubetune_leave_transformers_a_valid_name(name):
    assert _args(optimizer=name, adam_beta1=0.85) == {"optim": "adamw_torch", "adam_beta1": 0.85}
    assert name in optimizers.BUILT_HERE


def test_a_missing_package_names_the_field_and_the_extra(monkeypatch):
    real = optimizers.importlib.util.find_spec
    monkeypatch.setattr(optimizers.importlib.util, "find_spec", lambda m: None if m == "badam" else real(m))
    with pytest.raises(UserError) as e:
        _args(optimizer="badam")
    assert e.value.where == "spec.stages[0].hyperparameters.optimizer"
    assert "needs the Python package badam" in str(e.value) and "kubetune[optimizers]" in str(e.value)
    _args(optimizer="muon")  # torch's own: nothing to install


@pytest.mark.parametrize("stage", [
    {"method": "full", "hyperparameters": {"optimizer": "galore_adamw", "galore": {"rank": 4}}},
    {"method": "freeze", "hyperparameters": {"optimizer": "apollo_adamw"}},
    {"method": "full", "hyperparameters": {"optimizer": "badam", "badam": {"switchInterval": 10}, "adamBeta2": 0.95}},
    {"method": "full", "hyperparameters": {"optimizer": "galore_adamw", "gradientAccumulation": 1,
                                           "galore": {"layerwise": True}}},
    {"method": "freeze", "hyperparameters": {"optimizer": "adam_mini", "adamEpsilon": 1e-6}},
    {"method": "lora", "hyperparameters": {"optimizer": "muon", "adamBeta1": 0.8}},
    {"method": "full", "hyperparameters": {"optimizer": "galore_adamw", "weightDecay": 0}},
])
def test_valid_optimizer_settings(stage):
    parse_job(patched({"stages": [{"name": "a", "type": "sft", **stage}]}))


def test_the_docs_list_every_optimizer_and_setting():
    from pathlib import Path

    from kubetune.runtime.api.spec import OPTIMIZERS, ApolloSpec, BadamSpec, GaloreSpec

    doc = (Path(__file__).resolve().parents[2] / "docs" / "optimizers.md").read_text()
    missing = [f"`{o}`" for o in OPTIMIZERS if f"`{o}`" not in doc]
    for block in (GaloreSpec, ApolloSpec, BadamSpec):
        missing += [f"| `{f.alias}` |" for f in block.model_fields.values() if f"| `{f.alias}` |" not in doc]
    assert not missing, missing

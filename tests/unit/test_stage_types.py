"""Every registered stage type (runtime/api/stage_types.py) goes the whole way a job goes before it
trains: validate → plan → estimate → the stage's `run`. A type that lacks anything (its module, a
data kind runtime/data knows, a default learning rate where it trains, ...) fails here."""

from __future__ import annotations

import re

import pytest

from kubetune.runtime.convert import _LF_STAGES
from kubetune.runtime.data.formats import FORMATS_FOR_KIND
from kubetune.runtime.data.prepare import KIND_OF_STAGE
from kubetune.runtime.api.errors import SpecError
from kubetune.runtime.estimate import estimate_job
from kubetune.runtime.api.plan import plan
from kubetune.runtime.api.spec import STAGE_TYPES as SPEC_TYPES
from kubetune.runtime.api.spec import StageSpec, parse_job
from kubetune.runtime.api.stage_types import GATED_HYPERPARAMETERS, STAGE_TYPES, StageTypeInfo
from kubetune.runtime.stages import stage_runner

TYPES = list(STAGE_TYPES.values())


def job_with(info: StageTypeInfo, **stage_fields) -> dict:
    """The smallest valid job whose last stage has type `info`, built from what the registry says it needs."""
    stage = {"name": "it", "type": info.name, **stage_fields}
    if info.needs_reward:
        stage["reward"] = {"functions": ["length"]}
    if info.needs_teacher:
        stage["teacher"] = {"name": "org/teacher-1B"}
    kind = info.data_kind or "conversation"
    stages = [stage] if info.data_kind else [{"name": "first", "type": "sft"}, stage]  # export: after a stage
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "job"},
            "spec": {"model": {"name": "org/model-1B"},
                     "data": [{"name": "d", "source": "d.json", "format": FORMATS_FOR_KIND[kind][0]}],
                     "stages": stages}}


@pytest.mark.parametrize("info", TYPES, ids=[t.name for t in TYPES])
def test_every_type_validates_plans_estimates_and_runs(info: StageTypeInfo):
    job = parse_job(job_with(info))
    resolved = plan(job, "/tmp/kubetune-stage-types")[-1]
    assert resolved.stage.type == info.name
    hp = resolved.stage.hyperparameters
    if info.trains:
        assert info.learning_rates and hp.learning_rate == info.learning_rates[0]  # lora, the default method
    assert (resolved.io.reference is not None) == info.reference_model
    assert resolved.data or info.data_kind is None
    assert hp.packing == info.packing
    _, estimates = estimate_job(job)
    assert estimates[-1].total > 0
    assert callable(stage_runner(info.name))


@pytest.mark.parametrize("info", TYPES, ids=[t.name for t in TYPES])
def test_every_type_is_declared_completely(info: StageTypeInfo):
    assert info.name in SPEC_TYPES
    assert re.search(rf"\b{info.name}\b", StageSpec.model_fields["type"].description), "the `type` field's description"
    if info.data_kind is not None:
        assert info.data_kind in FORMATS_FOR_KIND, f"data kind {info.data_kind!r} unknown to runtime/data/formats.py"
        assert KIND_OF_STAGE[info.name] == info.data_kind
    assert info.loss_types[0] == "sigmoid", "preference.lossType's default must be valid for every type"
    assert info.accepts <= set(GATED_HYPERPARAMETERS)
    if not info.trains:
        assert not info.accepts and not info.reference_model and not info.own_loop


@pytest.mark.parametrize("info", TYPES, ids=[t.name for t in TYPES])
def test_gated_hyperparameters_are_rejected_where_not_honoured(info: StageTypeInfo):
    values = {"neftuneAlpha": 5.0, "torchCompile": True}
    assert set(values) == set(GATED_HYPERPARAMETERS)
    for field, value in values.items():
        doc = job_with(info, hyperparameters={field: value})
        if field in info.accepts:
            parse_job(doc)
        else:
            with pytest.raises(SpecError, match=rf"spec\.stages\[\d\]\.hyperparameters\.{field}: "):
                parse_job(doc)


@pytest.mark.parametrize("info", TYPES, ids=[t.name for t in TYPES])
def test_ftx_is_rejected_where_no_sft_loss_is_added(info: StageTypeInfo):
    """preference.ftx (LLaMA-Factory's pref_ftx) only where the stage adds it to its loss (dpo, simpo)."""
    doc = job_with(info, preference={"ftx": 0.5})
    if info.sft_term:
        assert parse_job(doc).spec.stages[-1].preference.ftx == 0.5
    else:
        with pytest.raises(SpecError, match=r"spec\.stages\[\d\]\.preference\.ftx: "):
            parse_job(doc)
    assert [t for t, i in STAGE_TYPES.items() if i.sft_term] == ["dpo", "simpo"]


def test_reference_free_preference_types():
    """orpo (ORPOTrainer) and simpo (CPOTrainer) have no reference model: plan, estimator and stage agree."""
    assert not STAGE_TYPES["orpo"].reference_model and not STAGE_TYPES["simpo"].reference_model
    assert STAGE_TYPES["dpo"].reference_model and STAGE_TYPES["kto"].reference_model


def test_llamafactory_stages_are_stage_types():
    assert set(_LF_STAGES) <= set(STAGE_TYPES)


def test_every_trainer_stage_names_trl_classes_that_exist():
    """A TrainerStage declares TRL's (config, trainer) pair as names; a typo would fail only at stage start."""
    from importlib import import_module

    from kubetune.runtime.stages.trainer_stage import TrainerStage

    for module in {info.module for info in TYPES}:
        import_module(f"kubetune.runtime.stages.{module}")
    stages, todo = [], [TrainerStage]
    while todo:
        for cls in todo.pop().__subclasses__():
            todo.append(cls)
            if "trl_classes" in vars(cls):
                stages.append(cls)
    assert len(stages) >= 7, [c.__name__ for c in stages]
    for cls in stages:
        config, trainer = TrainerStage.classes(cls.__new__(cls))
        assert config.__name__.endswith("Config") and trainer.__name__.endswith("Trainer"), cls
        assert "TrainingArguments" in {b.__name__ for b in config.__mro__}, cls


def test_stage_kind_names_the_method_only_where_the_type_trains():
    """One label for `kubetune validate`/`plan` and `kubectl kubetune describe`."""
    from kubetune.runtime.api.stage_types import stage_kind

    assert stage_kind("sft", "lora") == "sft/lora" and stage_kind("dpo", "full") == "dpo/full"
    assert stage_kind("export", "lora") == "export" and stage_kind("eval", "lora") == "eval"
    assert stage_kind("cpo", "lora") == "cpo/lora"  # a type this version does not know keeps its method

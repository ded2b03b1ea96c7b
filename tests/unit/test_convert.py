"""`kubetune convert`: LLaMA-Factory train/export YAMLs and a NeMo AutoModel recipe → FineTuneJobs
that pass `kubetune validate`; every key not carried over is warned about (stderr and comments)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kubetune.runtime.cli import main
from kubetune.runtime.convert import convert_files
from kubetune.runtime.api.errors import UserError
from kubetune.runtime.api.spec import load_job

DATASET_INFO = {
    "identity": {"file_name": "identity.json"},
    "alpaca_en_demo": {"file_name": "alpaca_en_demo.json", "num_samples": 500},
    "c4_demo": {"file_name": "c4_demo.json", "columns": {"prompt": "text"}},
    "dpo_en_demo": {"file_name": "dpo_en_demo.json", "formatting": "sharegpt", "ranking": True,
                    "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
    "kto_en_demo": {"file_name": "kto_en_demo.json", "formatting": "sharegpt",
                    "columns": {"messages": "messages", "kto_tag": "label"},
                    "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}},
    "mllm_demo": {"file_name": "mllm_demo.json", "formatting": "sharegpt",
                  "columns": {"messages": "messages", "images": "images"}},
    "glaive_hub": {"hf_hub_url": "glaiveai/glaive-function-calling-v2", "formatting": "sharegpt", "split": "train"},
}

BASE = {"model_name_or_path": "meta-llama/Meta-Llama-3-8B-Instruct", "template": "llama3", "cutoff_len": 2048,
        "max_samples": 1000, "overwrite_cache": True, "preprocessing_num_workers": 16, "logging_steps": 10,
        "save_steps": 500, "plot_loss": True, "overwrite_output_dir": True, "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 8, "learning_rate": "1.0e-4", "num_train_epochs": 3.0,
        "lr_scheduler_type": "cosine", "warmup_ratio": 0.1, "bf16": True, "ddp_timeout": 180000000,
        "dataset_dir": "data"}

CASES = {
    "lora_sft": {"stage": "sft", "do_train": True, "finetuning_type": "lora", "lora_rank": 16, "lora_alpha": 32,
                 "lora_dropout": 0.05, "lora_target": "q_proj,v_proj", "dataset": "identity,alpaca_en_demo",
                 "output_dir": "saves/llama3-8b/lora/sft", "use_dora": True, "loraplus_lr_ratio": 16.0},
    "qlora_sft": {"stage": "sft", "finetuning_type": "lora", "quantization_bit": 4, "quantization_method": "bnb",
                  "quantization_type": "nf4", "double_quantization": False, "lora_target": "all",
                  "dataset": "identity", "output_dir": "saves/llama3-8b/qlora/sft", "pissa_init": True},
    "full_sft": {"stage": "sft", "finetuning_type": "full", "deepspeed": "examples/deepspeed/ds_z3_config.json",
                 "dataset": "identity", "output_dir": "saves/llama3-8b/full/sft", "pure_bf16": True, "max_steps": 300},
    "freeze_sft": {"stage": "sft", "finetuning_type": "freeze", "freeze_trainable_layers": 4,
                   "freeze_trainable_modules": "mlp,self_attn", "freeze_extra_modules": "embed_tokens",
                   "dataset": "identity", "output_dir": "saves/llama3-8b/freeze/sft"},
    "lora_pt": {"stage": "pt", "finetuning_type": "lora", "dataset": "c4_demo", "output_dir": "saves/llama3-8b/lora/pt",
                "packing": True},
    "lora_dpo": {"stage": "dpo", "finetuning_type": "lora", "pref_beta": 0.2, "pref_loss": "ipo", "pref_ftx": 0.1,
                 "dataset": "dpo_en_demo", "output_dir": "saves/llama3-8b/lora/dpo", "learning_rate": 5.0e-6},
    "lora_orpo": {"stage": "dpo", "finetuning_type": "lora", "pref_loss": "orpo", "dataset": "dpo_en_demo",
                  "output_dir": "saves/llama3-8b/lora/orpo"},
    "lora_kto": {"stage": "kto", "finetuning_type": "lora", "pref_beta": 0.1, "kto_chosen_weight": 1.5,
                 "dataset": "kto_en_demo", "output_dir": "saves/llama3-8b/lora/kto"},
    "lora_rm": {"stage": "rm", "finetuning_type": "lora", "dataset": "dpo_en_demo", "output_dir": "saves/llama3-8b/lora/reward"},
}


@pytest.fixture
def lf(tmp_path, monkeypatch) -> Path:
    """A LLaMA-Factory checkout-like folder: data/dataset_info.json next to the YAMLs."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset_info.json").write_text(json.dumps(DATASET_INFO))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _write(folder: Path, name: str, cfg: dict) -> Path:
    p = folder / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


@pytest.mark.parametrize("case", sorted(CASES))
def test_llamafactory_training_yaml_converts_and_validates(case, lf, capsys):
    src = _write(lf, case, {**BASE, **CASES[case]})
    out = lf / f"{case}.ftj.yaml"
    assert main(["convert", str(src), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert main(["validate", str(out)]) == 0
    job = load_job(out)
    st = job.spec.stages[0]
    text = out.read_text()
    # every unused key is a warning, on stderr and as a comment at the top
    for key in ("overwrite_cache", "preprocessing_num_workers", "plot_loss", "overwrite_output_dir", "ddp_timeout"):
        assert f"warning: {key}: not carried over" in err
        assert f"#   - {key}: not carried over" in text
    assert job.spec.storage.uri == CASES[case]["output_dir"]
    assert job.spec.checkpoint.every_steps == 500
    assert st.hyperparameters.cutoff_len == 2048 and st.hyperparameters.gradient_accumulation == 8
    assert st.hyperparameters.warmup_ratio == 0.1 and st.hyperparameters.precision == "bf16"
    assert job.spec.template == "llama3"
    assert all(d.max_samples and d.max_samples <= 1000 for d in job.spec.data)
    check = CHECKS[case]
    check(job, st, err)


def _lora(job, st, err):
    assert (st.type, st.method) == ("sft", "lora")
    assert (st.lora.rank, st.lora.alpha, st.lora.dropout, st.lora.target) == (16, 32, 0.05, ["q_proj", "v_proj"])
    assert st.lora.use_dora and st.lora.loraplus_lr_ratio == 16.0
    assert st.hyperparameters.learning_rate == 1e-4 and st.hyperparameters.epochs == 3.0
    assert [d.name for d in job.spec.data] == ["identity", "alpaca-en-demo"]
    assert job.spec.data[0].source == "data/identity.json" and job.spec.data[1].max_samples == 500


def _qlora(job, st, err):
    assert st.method == "qlora" and st.quantization.bits == 4 and st.quantization.type == "nf4"
    assert st.quantization.double_quantization is False and st.lora.init == "pissa" and st.lora.target == ["all"]


def _full(job, st, err):
    assert st.method == "full" and st.hyperparameters.max_steps == 300 and job.spec.model.dtype == "bfloat16"
    assert "deepspeed: not carried over" in err and "resources.strategy: fsdp" in err


def _freeze(job, st, err):
    assert st.method == "freeze"
    assert (st.freeze.trainable_layers, st.freeze.trainable_modules, st.freeze.extra_modules) == (4, ["mlp", "self_attn"], ["embed_tokens"])


def _pt(job, st, err):
    assert st.type == "pt" and st.hyperparameters.packing is True
    assert job.spec.data[0].format == "text"


def _dpo(job, st, err):
    assert st.type == "dpo" and st.preference.beta == 0.2 and st.preference.loss_type == "ipo" and st.preference.ftx == 0.1
    d = job.spec.data[0]
    assert d.format == "sharegpt" and d.ranking and d.columns == {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}
    assert st.hyperparameters.learning_rate == 5e-6


def _orpo(job, st, err):
    assert st.type == "orpo" and st.name == "orpo"


def _kto(job, st, err):
    assert st.type == "kto" and st.preference.desirable_weight == 1.5
    d = job.spec.data[0]
    assert d.columns["kto_tag"] == "label" and d.tags.role_tag == "role" and d.tags.assistant_tag == "assistant"


def _rm(job, st, err):
    assert st.type == "rm" and job.spec.data[0].ranking


CHECKS = {"lora_sft": _lora, "qlora_sft": _qlora, "full_sft": _full, "freeze_sft": _freeze, "lora_pt": _pt,
          "lora_dpo": _dpo, "lora_orpo": _orpo, "lora_kto": _kto, "lora_rm": _rm}


def test_export_yaml_after_training_yaml_adds_an_export_stage(lf, capsys):
    train = _write(lf, "train", {**BASE, **CASES["lora_sft"]})
    export = _write(lf, "merge", {"model_name_or_path": BASE["model_name_or_path"], "template": "llama3",
                                  "adapter_name_or_path": "saves/llama3-8b/lora/sft", "finetuning_type": "lora",
                                  "export_dir": "output/llama3_lora_sft", "export_size": 5, "export_device": "cpu",
                                  "export_legacy_format": False})
    out = lf / "job.yaml"
    assert main(["convert", str(train), str(export), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    job = load_job(out)
    assert [(s.name, s.type) for s in job.spec.stages] == [("sft", "sft"), ("export", "export")]
    for key in ("export_dir", "export_size", "export_device", "export_legacy_format"):
        assert key in err
    assert main(["validate", str(out)]) == 0


def test_predict_mode_becomes_an_eval_stage(lf, capsys):
    """do_predict + predict_with_generate + eval_dataset (LLaMA-Factory's predict mode) → an eval
    stage after the training stage, scoring its output on eval_dataset (ROUGE/BLEU)."""
    src = _write(lf, "predict", {**BASE, **CASES["lora_sft"], "do_predict": True, "predict_with_generate": True,
                                 "eval_dataset": "alpaca_en_demo", "max_new_tokens": 256,
                                 "per_device_eval_batch_size": 4})
    out = lf / "job.yaml"
    assert main(["convert", str(src), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    job = load_job(out)
    assert [(s.name, s.type) for s in job.spec.stages] == [("sft", "sft"), ("predict", "eval")]
    predict = job.spec.stages[1]
    assert [d.name for d in predict.data] == ["alpaca-en-demo"] and predict.data[0].format == "alpaca"
    assert predict.evaluation.max_new_tokens == 256 and predict.evaluation.batch_size == 4
    for key in ("do_predict", "predict_with_generate", "eval_dataset", "max_new_tokens", "per_device_eval_batch_size"):
        assert f"{key}:" not in err, err
    # without do_predict, eval_dataset is the training stage's evaluation set (spec.evalData) alone
    doc, warnings = convert_files([_write(lf, "noeval", {**BASE, **CASES["lora_sft"], "eval_dataset": "identity"})])
    assert len(doc["spec"]["stages"]) == 1 and [d["name"] for d in doc["spec"]["evalData"]] == ["identity"]
    assert not any(w.startswith("eval_dataset") for w in warnings)


def test_export_yaml_alone_says_what_to_do(lf):
    export = _write(lf, "merge", {"model_name_or_path": "m", "adapter_name_or_path": "a", "export_dir": "o"})
    with pytest.raises(UserError, match="kubetune export --adapter a --model m --out o"):
        convert_files([export])


def test_unknown_keys_and_dataset_columns_are_warned_not_dropped(lf):
    src = _write(lf, "x", {"stage": "sft", "model_name_or_path": "m", "dataset": "mllm_demo,glaive_hub,nowhere",
                           "template": "llava", "finetuning_type": "oft", "made_up_key": 3, "optim": "adam_mini"})
    doc, warnings = convert_files([src])
    text = "\n".join(warnings)
    for needle in ("made_up_key", "column 'images'", "template: 'llava'", "finetuning_type: 'oft'", "optim: 'adam_mini'",
                   "'nowhere': no entry"):
        assert needle in text
    assert doc["spec"]["data"][1]["source"] == "hf://glaiveai/glaive-function-calling-v2"


def test_dataset_dir_flag_and_missing_dataset_info(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = _write(tmp_path, "y", {"stage": "sft", "model_name_or_path": "m", "dataset": "identity"})
    doc, warnings = convert_files([src])
    assert any("dataset_info.json not found" in w for w in warnings)
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "dataset_info.json").write_text(json.dumps(DATASET_INFO))
    doc, warnings = convert_files([src], dataset_dir=str(other))
    assert doc["spec"]["data"][0]["source"] == str(other / "identity.json") and not warnings


NEMO = """
step_scheduler:
  global_batch_size: 32
  local_batch_size: 4
  ckpt_every_steps: 200
  val_every_steps: 100
  num_epochs: 1
  max_steps: 500
dist_env: {backend: nccl, timeout_minutes: 1}
rng: {_target_: nemo_automodel.components.training.rng.StatefulRNG, seed: 1111, ranked: true}
model:
  _target_: nemo_automodel.NeMoAutoModelForCausalLM.from_pretrained
  pretrained_model_name_or_path: meta-llama/Llama-3.2-1B
checkpoint:
  enabled: true
  checkpoint_dir: checkpoints/
  model_save_format: safetensors
  save_consolidated: false
distributed: {_target_: nemo_automodel.components.distributed.fsdp2.FSDP2Manager, dp_size: null, tp_size: 1}
loss_fn: {_target_: nemo_automodel.components.loss.masked_ce.MaskedCrossEntropy}
peft:
  _target_: nemo_automodel.components._peft.lora.PeftConfig
  match_all_linear: true
  dim: 8
  alpha: 32
  use_triton: true
quantization:
  load_in_4bit: true
  bnb_4bit_quant_type: nf4
  bnb_4bit_use_double_quant: true
  bnb_4bit_compute_dtype: bfloat16
dataset:
  _target_: nemo_automodel.components.datasets.llm.squad.make_squad_dataset
  dataset_name: rajpurkar/squad
  split: train
dataloader: {_target_: torchdata.stateful_dataloader.StatefulDataLoader, shuffle: false}
optimizer:
  _target_: torch.optim.Adam
  betas: [0.9, 0.999]
  eps: 1e-8
  lr: 1.0e-5
  weight_decay: 0
"""


def test_nemo_automodel_recipe_converts(tmp_path, capsys):
    src = tmp_path / "llama3_2_1b_squad_qlora.yaml"
    src.write_text(NEMO)
    out = tmp_path / "job.yaml"
    assert main(["convert", str(src), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    job = load_job(out)
    st = job.spec.stages[0]
    assert job.spec.model.name == "meta-llama/Llama-3.2-1B"
    assert st.method == "qlora" and st.quantization.bits == 4 and st.lora.rank == 8 and st.lora.alpha == 32
    assert st.hyperparameters.batch_size == 4 and st.hyperparameters.gradient_accumulation == 8
    assert st.hyperparameters.max_steps == 500 and st.hyperparameters.learning_rate == 1e-5 and st.hyperparameters.seed == 1111
    assert job.spec.checkpoint.every_steps == 200 and job.spec.storage.uri == "checkpoints/"
    assert job.spec.data[0].source == "rajpurkar/squad"
    assert job.spec.data[0].columns == {"prompt": "context", "query": "question", "response": "answers.text[0]"}
    assert job.spec.resources.strategy == "fsdp"  # distributed._target_: FSDP2Manager
    assert (st.hyperparameters.adam_beta1, st.hyperparameters.adam_beta2, st.hyperparameters.adam_epsilon) == (0.9, 0.999, 1e-8)
    for key in ("dist_env.backend", "loss_fn._target_", "peft.use_triton", "dataloader.shuffle",
                "checkpoint.model_save_format"):
        assert f"warning: {key}: not carried over" in err, key
    assert "optimizer.betas" not in err and "optimizer.eps" not in err


QWEN_SPARK = """
recipe: TrainFinetuneRecipeForNextTokenPrediction
step_scheduler: {global_batch_size: 64, local_batch_size: 2, ckpt_every_steps: 1000, val_every_steps: 10, num_epochs: 1}
model: {_target_: nemo_automodel.NeMoAutoModelForCausalLM.from_pretrained, pretrained_model_name_or_path: Qwen/Qwen3-8B}
compile: {enabled: true, mode: max-autotune, fullgraph: false, dynamic: false, backend: null}
distributed: {strategy: fsdp2, dp_size: none, tp_size: 2, cp_size: 1, sequence_parallel: false}
dataset: {_target_: nemo_automodel.components.datasets.llm.squad.make_squad_dataset, dataset_name: rajpurkar/squad, split: train}
validation_dataset:
  _target_: nemo_automodel.components.datasets.llm.squad.make_squad_dataset
  dataset_name: rajpurkar/squad
  split: validation
  limit_dataset_samples: 64
optimizer: {_target_: torch.optim.Adam, lr: 1.0e-5, weight_decay: 0, fused: true}
lr_scheduler: {lr_decay_style: cosine, min_lr: 1.0e-6}
"""


def test_nemo_validation_dataset_fsdp2_min_lr_and_compile_are_carried_over(tmp_path, capsys):
    src = tmp_path / "qwen3_8b_squad_spark.yaml"
    src.write_text(QWEN_SPARK)
    out = tmp_path / "job.yaml"
    assert main(["convert", str(src), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    job = load_job(out)
    st, hp = job.spec.stages[0], job.spec.stages[0].hyperparameters
    [val] = job.spec.eval_data
    assert (val.source, val.split, val.max_samples) == ("rajpurkar/squad", "validation", 64)
    assert val.columns["response"] == "answers.text[0]"
    assert job.spec.resources.strategy == "fsdp" and st.method == "full"
    assert hp.lr_scheduler == "cosine_with_min_lr" and hp.min_lr == 1e-6
    assert hp.torch_compile and hp.torch_compile_mode == "max-autotune" and hp.eval_steps == 10
    assert "distributed.tp_size: 2 not carried over — tensor parallelism is not supported" in err
    assert "compile.dynamic: False not carried over" in err
    for key in ("validation_dataset", "lr_scheduler.min_lr", "compile.enabled", "compile.mode", "distributed.strategy: fsdp2 not"):
        assert f"{key}: not carried over" not in err, key
    # with compile off, its knobs are reported, not applied
    src.write_text(QWEN_SPARK.replace("enabled: true", "enabled: false"))
    assert main(["convert", str(src), "-o", str(out)]) == 0
    assert "compile.mode: not carried over — compile.enabled is false" in capsys.readouterr().err
    assert not load_job(out).spec.stages[0].hyperparameters.torch_compile


def test_llamafactory_eval_dataset_becomes_eval_data(tmp_path, capsys):
    d = tmp_path / "data"
    d.mkdir()
    (d / "dataset_info.json").write_text(json.dumps({
        "squad_train": {"file_name": "train.jsonl", "columns": {"prompt": "context", "query": "question", "response": "answers.text[0]"}},
        "squad_val": {"file_name": "validation.jsonl", "columns": {"prompt": "context", "query": "question", "response": "answers.text[0]"}},
    }))
    cfg = {"model_name_or_path": "m", "stage": "sft", "finetuning_type": "lora", "dataset": "squad_train",
           "eval_dataset": "squad_val", "dataset_dir": str(d), "val_size": 0.1, "eval_steps": 5}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "job.yaml"
    assert main(["convert", str(tmp_path / "train.yaml"), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    job = load_job(out)
    [val] = job.spec.eval_data
    assert val.source.endswith("validation.jsonl") and val.columns["response"] == "answers.text[0]"
    assert job.spec.stages[0].hyperparameters.val_size == 0 and job.spec.stages[0].hyperparameters.eval_steps == 5
    assert "val_size: not carried over — eval_dataset is given" in err and "eval_dataset: " not in err


# ------------------------------------------------------------------------------ optimizers

FULL = {**BASE, "stage": "sft", "finetuning_type": "full", "dataset": "identity"}
OPTIMIZER_CASES = {
    "galore": ({"use_galore": True, "galore_rank": 32, "galore_target": "q_proj,v_proj", "galore_update_interval": 100,
                "galore_scale": 0.25, "galore_proj_type": "reverse_std"},
               {"optimizer": "galore_adamw", "galore": {"rank": 32, "target": ["q_proj", "v_proj"], "updateInterval": 100,
                                                        "scale": 0.25, "projType": "reverse_std"}}, ()),
    "galore-8bit-layerwise": ({"use_galore": True, "optim": "adamw_bnb_8bit", "galore_layerwise": True,
                               "galore_target": "all", "weight_decay": 0.01, "adam_beta2": 0.95},
                              {"optimizer": "galore_adamw_8bit", "galore": {"target": ["all"], "layerwise": True},
                               "gradientAccumulation": 1},
                              ("gradient_accumulation_steps: 8 set to 1", "weight_decay: 0.01 not carried over",
                               "adam_beta2: not carried over")),
    "apollo": ({"use_apollo": True, "apollo_rank": 8, "apollo_scale": 16, "apollo_proj": "svd", "apollo_scale_type": "tensor",
                "apollo_scale_front": True, "adam_epsilon": 1e-6, "galore_rank": 4},
               {"optimizer": "apollo_adamw", "adamEpsilon": 1e-6,
                "apollo": {"rank": 8, "scale": 16.0, "proj": "svd", "scaleType": "tensor"}},
               ("apollo_scale_front: not carried over", "galore_rank: not carried over — use_galore is not set")),
    "badam": ({"use_badam": True, "badam_mode": "layer", "badam_switch_mode": "descending", "badam_switch_interval": 50,
               "badam_start_block": 1, "badam_verbose": 2, "adam_beta1": 0.8},
              {"optimizer": "badam", "adamBeta1": 0.8,
               "badam": {"switchMode": "descending", "switchInterval": 50, "startBlock": 1}},
              ("badam_verbose: not carried over",)),
    "badam-ratio-never-switching": ({"use_badam": True, "badam_mode": "ratio", "badam_update_ratio": 0.1,
                                     "badam_switch_interval": -1},
                                    {"optimizer": "badam", "badam": {"switchMode": "fixed"}},
                                    ("badam_mode: 'ratio' not carried over", "badam_update_ratio: not carried over")),
    "adam-mini": ({"use_adam_mini": True, "adam_beta1": 0.9, "adam_beta2": 0.95, "adam_epsilon": 1e-8},
                  {"optimizer": "adam_mini", "adamBeta1": 0.9, "adamBeta2": 0.95, "adamEpsilon": 1e-8}, ()),
    "muon-over-galore": ({"use_muon": True, "use_galore": True, "optim": "adamw_torch"},
                         {"optimizer": "galore_adamw"}, ("use_muon: not carried over — use_galore is set too",)),
    "muon": ({"use_muon": True}, {"optimizer": "muon"}, ()),
}


@pytest.mark.parametrize("label", list(OPTIMIZER_CASES))
def test_llamafactory_optimizer_keys(lf, label, capsys):
    keys, want, warned = OPTIMIZER_CASES[label]
    out = lf / "job.yaml"
    assert main(["convert", str(_write(lf, label, {**FULL, **keys})), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    hp = yaml.safe_load(out.read_text())["spec"]["stages"][0]["hyperparameters"]
    got = {f: hp[f] for f in hp if f in want or f in ("galore", "apollo", "badam", "optimizer", "adamBeta1", "adamBeta2",
                                                      "adamEpsilon")}
    assert got == want, hp
    for needle in warned:
        assert needle in err, (needle, err)
    assert "unknown or unsupported" not in err, err
    assert main(["validate", str(out)]) == 0


@pytest.mark.parametrize(("stage", "kept"), [("sft", True), ("dpo", False)])
def test_neftune_is_carried_over_only_where_the_stage_honours_it(lf, stage, kept, capsys):
    """LLaMA-Factory takes neftune_noise_alpha in any stage; kubetune's SFTTrainer stages (pt, sft) only."""
    cfg = {**BASE, "stage": stage, "finetuning_type": "lora", "dataset": "dpo_en_demo" if stage == "dpo" else "identity",
           "output_dir": "saves/x", "neftune_noise_alpha": 5}
    out = lf / "job.yaml"
    assert main(["convert", str(_write(lf, stage, cfg)), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert main(["validate", str(out)]) == 0
    assert (load_job(out).spec.stages[0].hyperparameters.neftune_alpha == 5) == kept
    assert ("neftune_noise_alpha: not carried over — a dpo stage does not honour hyperparameters.neftuneAlpha" in err) != kept


@pytest.mark.parametrize(("extra", "field", "kept", "warned"), [
    ({"pref_loss": "sigmoid", "pref_ftx": 0.5}, "ftx", True, None),
    ({"pref_loss": "simpo", "pref_ftx": 0.5}, "ftx", True, None),
    ({"pref_loss": "orpo", "pref_ftx": 0.5}, "ftx", False, "pref_ftx: not carried over — TRL's orpo trainer adds no SFT loss"),
    ({"pref_loss": "robust", "dpo_label_smoothing": 0.1}, "labelSmoothing", True, None),
    ({"pref_loss": "aot", "dpo_label_smoothing": 0.1}, "labelSmoothing", True, None),
    ({"pref_loss": "sigmoid", "dpo_label_smoothing": 0.1}, "labelSmoothing", False,
     "dpo_label_smoothing: not carried over — TRL reads label smoothing only in dpo stages with pref_loss exo_pair"),
])
def test_preference_settings_are_carried_over_where_trl_reads_them(lf, extra, field, kept, warned, capsys):
    """LLaMA-Factory adds pref_ftx to ORPO's loss and reads dpo_label_smoothing in its sigmoid loss (cDPO); TRL's
    trainers do neither, and the spec refuses them there: convert drops them with a warning, so the job stays valid."""
    cfg = {**BASE, "stage": "dpo", "finetuning_type": "lora", "dataset": "dpo_en_demo", "output_dir": "saves/x", **extra}
    out = lf / "job.yaml"
    assert main(["convert", str(_write(lf, "pref", cfg)), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert main(["validate", str(out)]) == 0
    pref = load_job(out).spec.stages[0].preference.model_dump(by_alias=True)
    assert (pref[field] > 0) == kept, pref
    if warned:
        assert warned in err, err
    else:
        assert "pref_ftx: not carried over" not in err and "dpo_label_smoothing: not carried over" not in err, err

"""`kubetune convert` on LLaMA-Factory's v1 configs (`llamafactory-cli sft|dpo|rm`: `model:`,
`peft_config`, `dist_config`, `kernel_config`, `train_dataset` → a dataset YAML). The files here are
our own, shaped like the v1 examples: each becomes a FineTuneJob that `kubetune validate` accepts,
and every key without an equivalent is named in a warning."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kubetune.runtime.cli import main
from kubetune.runtime.convert import convert_files
from kubetune.runtime.api.errors import UserError
from kubetune.runtime.api.spec import load_job

SFT_DATA = {"identity": {"path": "data/identity.json", "source": "local", "converter": "alpaca"},
            "chat": {"path": "data/chat.jsonl", "source": "local", "converter": "sharegpt", "size": 50},
            "hub": {"path": "org/some-sft-set", "split": "train[:90%]", "converter": "alpaca", "weight": 0.5}}
PAIR_DATA = {"prefs": {"path": "org/pairs", "split": "train_prefs", "converter": "pair"}}

COMMON = {"model_class": "llm", "kernel_config": {"name": "auto"}, "train_dataset": "data/sft.yaml",
          "micro_batch_size": 2, "cutoff_len": 1024, "learning_rate": "2.0e-4", "max_steps": 20,
          "sample_backend": "hf", "max_new_tokens": 128}

CASES = {
    "lora_sft": {"model": "org/base-4b", "peft_config": {"name": "lora", "r": 16, "lora_alpha": 32,
                                                         "target_modules": "q_proj,v_proj", "use_dora": True},
                 "dist_config": {"name": "fsdp2", "dcp_path": None}, "output_dir": "./outputs/lora"},
    "full_fsdp2": {"model": "org/base-0.6b", "quant_config": None, "global_batch_size": 16, "bf16": True,
                   "dist_config": {"name": "fsdp2", "reshard_after_forward": False, "offload_params": True,
                                   "dcp_path": "/ckpt/dcp"},
                   "lr_scheduler_config": {"name": "cosine"}, "optim_config": {"name": "adamw_torch", "wd": 0.1},
                   "batching_strategy": "padding_free", "save_steps": 5, "save_total_limit": 2,
                   "output_dir": "outputs/full"},
    "freeze_sft": {"model": "org/base-4b", "peft_config": {"name": "freeze", "freeze_trainable_layers": 4,
                                                           "freeze_trainable_modules": "mlp", "freeze_extra_modules": None},
                   "dist_config": {"name": "deepspeed", "config_file": "examples/deepspeed/ds_z3_config.json"},
                   "output_dir": "outputs/freeze"},
    "qlora_kernels": {"model": "org/base-0.6b", "trust_remote_code": True, "flash_attn": "eager",
                      "peft_config": {"name": "lora", "r": 8, "target_modules": "all"},
                      "quant_config": {"name": "bnb", "quantization_bit": 4, "compute_dtype": "bfloat16"},
                      "kernel_config": {"name": "liger_kernel", "include_kernels": "auto"},
                      "init_config": {"name": "init_on_rank0"}, "cp_size": 2, "cp_mode": "ulysses",
                      "enable_activation_checkpointing": False, "seed": 7, "output_dir": "outputs/qlora"},
    "lora_dpo": {"model": "org/base-4b", "train_dataset": "data/pairs.yaml", "pref_beta": 0.2, "pref_loss": "sigmoid",
                 "peft_config": {"name": "lora", "r": 16, "lora_alpha": 32, "lora_dropout": 0.1},
                 "eval_dataset": "data/eval.yaml", "output_dir": "outputs/dpo"},
    "lora_rm": {"model": "org/base-4b", "model_class": "cls", "train_dataset": "data/pairs.yaml",
                "peft_config": {"name": "lora"}, "optim_config": {"name": "muon", "momentum": 0.95},
                "output_dir": "outputs/rm", "made_up_key": 1},
}


@pytest.fixture
def lfv1(tmp_path, monkeypatch) -> Path:
    """A LLaMA-Factory checkout-like folder: dataset YAMLs and data under data/, configs under examples/v1/."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "sft.yaml").write_text(yaml.safe_dump(SFT_DATA, sort_keys=False))
    (tmp_path / "data" / "pairs.yaml").write_text(yaml.safe_dump(PAIR_DATA))
    (tmp_path / "data" / "identity.json").write_text("[]")
    (tmp_path / "data" / "chat.jsonl").write_text("")
    (tmp_path / "examples" / "v1").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _write(folder: Path, name: str, cfg: dict) -> Path:
    p = folder / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


@pytest.mark.parametrize("case", sorted(CASES))
def test_v1_config_converts_and_validates(case, lfv1, capsys):
    src = _write(lfv1 / "examples" / "v1", case, {**COMMON, **CASES[case]})
    out = lfv1 / f"{case}.ftj.yaml"
    assert main(["convert", str(src), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert main(["validate", str(out)]) == 0
    job = load_job(out)
    st = job.spec.stages[0]
    text = out.read_text()
    for key in ("sample_backend", "max_new_tokens"):  # every unused key: stderr and a comment
        assert f"warning: {key}: not carried over" in err and f"#   - {key}: not carried over" in text
    assert "stage: converted as" in err and "llamafactory-cli sft|dpo|rm" in err
    assert job.spec.storage.uri == CASES[case]["output_dir"]
    assert job.spec.model.name == CASES[case]["model"]
    hp = st.hyperparameters
    assert (hp.batch_size, hp.cutoff_len, hp.learning_rate, hp.max_steps) == (2, 1024, 2e-4, 20)
    CHECKS[case](job, st, err)


def _lora_sft(job, st, err):
    assert (st.type, st.method) == ("sft", "lora")
    assert (st.lora.rank, st.lora.alpha, st.lora.dropout, st.lora.target, st.lora.use_dora) == (16, 32, 0.05, ["q_proj", "v_proj"], True)
    hp = st.hyperparameters
    assert hp.gradient_accumulation == 1 and hp.lr_scheduler == "constant"  # v1: no accumulation, constant LR
    assert job.spec.resources.strategy == "fsdp" and "set resources.gpusPerNode" in err
    assert "dcp_path" not in err  # `dcp_path: null` is v1's default: nothing to warn about
    assert "kernel_config.name: not carried over — 'auto': kernels are chosen by the runtime" in err
    d = {x.name: x for x in job.spec.data}
    assert [x.name for x in job.spec.data] == ["identity", "chat", "hub"]
    assert (d["identity"].source, d["identity"].format) == ("data/identity.json", "alpaca")
    assert (d["chat"].source, d["chat"].format, d["chat"].max_samples) == ("data/chat.jsonl", "sharegpt", 50)
    assert (d["hub"].source, d["hub"].split) == ("hf://org/some-sft-set", "train[:90%]")
    assert "train_dataset 'chat': size 50 carried over as maxSamples" in err
    assert "train_dataset 'hub': weight (0.5) not carried over" in err


def _full_fsdp2(job, st, err):
    assert (st.type, st.method) == ("sft", "full")
    hp = st.hyperparameters
    assert hp.gradient_accumulation == 8 and "global_batch_size: 16 carried over as gradientAccumulation 8" in err
    assert hp.lr_scheduler == "cosine" and hp.optimizer == "adamw_torch" and hp.precision == "bf16" and hp.packing
    r = job.spec.resources
    assert r.strategy == "fsdp" and r.fsdp.sharding == "shard_grad_op" and r.fsdp.cpu_offload
    assert "dist_config.dcp_path: not carried over" in err and "optim_config.wd: not carried over" in err
    assert (job.spec.checkpoint.every_steps, job.spec.checkpoint.keep) == (5, 2)


def _freeze_sft(job, st, err):
    assert st.method == "freeze" and st.freeze.trainable_layers == 4 and st.freeze.trainable_modules == ["mlp"]
    assert job.spec.resources.strategy == "ddp"
    assert "dist_config.name: not carried over — DeepSpeed is not used" in err
    assert "dist_config.config_file: not carried over" in err


def _qlora_kernels(job, st, err):
    assert st.method == "qlora" and st.quantization.bits == 4 and st.lora.rank == 8 and st.lora.target == ["all"]
    assert job.spec.model.trust_remote_code and job.spec.model.attn_implementation == "eager"
    assert st.hyperparameters.gradient_checkpointing is False and st.hyperparameters.seed == 7
    for key in ("quant_config.compute_dtype", "init_config.name", "cp_size", "cp_mode", "kernel_config.include_kernels"):
        assert f"warning: {key}: not carried over" in err, key
    assert "kernel_config.name: not carried over — 'liger_kernel': Liger kernels are not configurable yet" in err


def _lora_dpo(job, st, err):
    assert (st.type, st.method) == ("dpo", "lora") and st.preference.beta == 0.2 and st.lora.dropout == 0.1
    assert "converted as dpo (dataset 'prefs' uses the pair converter)" in err
    d = job.spec.data[0]
    assert (d.name, d.source, d.format, d.split, d.ranking) == ("prefs", "hf://org/pairs", "preference", "train_prefs", False)
    assert "eval_dataset: not carried over — 'data/eval.yaml'" in err


def _lora_rm(job, st, err):
    assert (st.type, st.method) == ("rm", "lora") and "model_class is cls" in err
    assert st.lora.rank == 8 and st.lora.dropout == 0.05  # LoraParams' defaults
    assert "optim_config.name: 'muon' not carried over" in err and "optim_config.momentum: not carried over" in err
    assert "made_up_key: not carried over — unknown or unsupported LLaMA-Factory v1 key" in err


CHECKS = {"lora_sft": _lora_sft, "full_fsdp2": _full_fsdp2, "freeze_sft": _freeze_sft, "qlora_kernels": _qlora_kernels,
          "lora_dpo": _lora_dpo, "lora_rm": _lora_rm}


def test_dataset_yaml_and_its_files_found_next_to_the_config(tmp_path, monkeypatch):
    """LLaMA-Factory reads paths from the working directory; from elsewhere, the config's folder is tried too."""
    lf = tmp_path / "lf"
    (lf / "data").mkdir(parents=True)
    (lf / "data" / "sft.yaml").write_text(yaml.safe_dump({"identity": SFT_DATA["identity"]}))
    (lf / "data" / "identity.json").write_text("[]")
    src = _write(lf, "train", {"model": "m", "train_dataset": "data/sft.yaml"})
    monkeypatch.chdir(tmp_path)
    doc, warnings = convert_files([src])
    assert doc["spec"]["data"][0]["source"] == str((lf / "data" / "identity.json").resolve())
    assert not any("not found" in w for w in warnings)
    (lf / "data" / "identity.json").unlink()
    doc, warnings = convert_files([src])
    assert doc["spec"]["data"][0]["source"] == "data/identity.json"
    assert any("train_dataset 'identity': local file 'data/identity.json' not found" in w for w in warnings)
    (lf / "data" / "sft.yaml").unlink()
    with pytest.raises(UserError, match="dataset YAML 'data/sft.yaml' not found"):
        convert_files([src])


def test_train_dataset_as_a_file_or_a_hub_id(lfv1):
    local = _write(lfv1, "a", {"model": "m", "train_dataset": "data/identity.json"})
    doc, warnings = convert_files([local])
    assert doc["spec"]["data"] == [{"name": "default", "source": "data/identity.json", "format": "messages"}]
    assert any("no converter" in w and "OpenAI role/content" in w for w in warnings)
    hub = _write(lfv1, "b", {"model": "m", "train_dataset": "llamafactory/v1-sft-demo", "model_class": "llm"})
    doc, _ = convert_files([hub])
    assert doc["spec"]["data"][0]["source"] == "hf://llamafactory/v1-sft-demo"
    assert doc["spec"]["stages"][0]["method"] == "full"  # no peft_config: every weight trains


def test_v1_merge_yaml_after_the_training_config_adds_an_export_stage(lfv1, capsys):
    train = _write(lfv1, "train", {**COMMON, **CASES["lora_sft"]})
    merge = _write(lfv1, "merge", {"model": "org/base-4b", "peft_config": {
        "name": "lora", "adapter_name_or_path": "./outputs/lora", "export_dir": "./merged", "export_size": 5}})
    out = lfv1 / "job.yaml"
    assert main(["convert", str(train), str(merge), "-o", str(out)]) == 0
    job = load_job(out)
    assert [(s.name, s.type) for s in job.spec.stages] == [("sft", "sft"), ("export", "export")]
    assert "export_dir: './merged' not carried over as such" in capsys.readouterr().err
    with pytest.raises(UserError, match="v1 merge YAML alone"):
        convert_files([merge])


def test_unsupported_model_class_and_missing_train_dataset(lfv1):
    with pytest.raises(UserError, match="model_class: 'other' is not supported"):
        convert_files([_write(lfv1, "a", {**COMMON, "model": "m", "model_class": "other"})])
    with pytest.raises(UserError, match="train_dataset is required"):
        convert_files([_write(lfv1, "b", {"model": "m", "peft_config": {"name": "lora"}})])


def test_a_config_of_no_known_format_names_what_each_format_lacks(tmp_path):
    src = _write(tmp_path, "x", {"base_model": "m", "datasets": [{"path": "d.json"}], "lr": 1e-4})
    with pytest.raises(UserError) as err:
        convert_files([src])
    msg = str(err.value)
    assert "base_model, datasets, lr" in msg
    for fmt, lacks in (("LLaMA-Factory training YAML", "model_name_or_path"), ("LLaMA-Factory v1", "model: <name>"),
                       ("NeMo AutoModel", "model.pretrained_model_name_or_path")):
        assert fmt in msg and lacks in msg


def test_quant_config_defaults_follow_v1(lfv1):
    """bnb without quantization_bit quantises to 4 bits (its plugin's default); auto without it does not."""
    base = {**COMMON, "model": "m", "peft_config": {"name": "lora"}}
    doc, _ = convert_files([_write(lfv1, "bnb", {**base, "quant_config": {"name": "bnb"}})])
    st = doc["spec"]["stages"][0]
    assert st["method"] == "qlora" and st["quantization"] == {"bits": 4}
    doc, _ = convert_files([_write(lfv1, "auto", {**base, "quant_config": {"name": "auto"}})])
    assert doc["spec"]["stages"][0]["method"] == "lora" and "quantization" not in doc["spec"]["stages"][0]
    doc, warnings = convert_files([_write(lfv1, "full", {**COMMON, "model": "m", "quant_config": {"name": "bnb", "quantization_bit": 8}})])
    assert doc["spec"]["stages"][0]["method"] == "full"
    assert "quant_config.quantization_bit: ignored for peft_config.name full" in "\n".join(warnings)

"""LLaMA-Factory v1 configs with their dataset YAMLs, converted by `kubetune convert`, train a tiny
real model locally (`kubetune run`): alpaca and sharegpt converters for sft, the pair converter for dpo."""

from __future__ import annotations

import json

import pytest
import yaml

from kubetune.runtime.cli import main
from tests.conftest import IDENTITY, read_log, run_doc, write_alpaca


def _datasets(lf):
    write_alpaca(lf / "data" / "identity.json", repeat=2)
    chat = [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in IDENTITY]
    (lf / "data" / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in chat))
    pairs = [{"chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
              "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": "I do not know."}]}
             for q, a in IDENTITY]
    (lf / "data" / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in pairs))
    (lf / "data" / "sft.yaml").write_text(yaml.safe_dump({
        "identity": {"path": "data/identity.json", "source": "local", "converter": "alpaca"},
        "chat": {"path": "data/chat.jsonl", "source": "local", "converter": "sharegpt", "size": 4}}))
    (lf / "data" / "pairs.yaml").write_text(yaml.safe_dump({
        "prefs": {"path": "data/pairs.jsonl", "source": "local", "converter": "pair"}}))


@pytest.mark.parametrize("stage,dataset", [("sft", "data/sft.yaml"), ("dpo", "data/pairs.yaml")])
def test_converted_v1_config_runs_locally(stage, dataset, tiny_model, tmp_path, monkeypatch, capsys):
    lf = tmp_path / "lf"
    _datasets(lf)
    cfg = {"model": str(tiny_model), "model_class": "llm",
           "peft_config": {"name": "lora", "r": 4, "lora_alpha": 8, "target_modules": "all"},
           "kernel_config": {"name": "auto"}, "dist_config": {"name": "fsdp2", "dcp_path": None},
           "train_dataset": dataset, "output_dir": str(tmp_path / "outputs"), "micro_batch_size": 4,
           "cutoff_len": 64, "learning_rate": "5.0e-3", "max_steps": 4, "logging_steps": 1, "save_steps": 2,
           "sample_backend": "hf", "max_new_tokens": 16}
    (lf / "examples" / "v1").mkdir(parents=True)
    (lf / "examples" / "v1" / "train.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    monkeypatch.chdir(lf)  # as in LLaMA-Factory: run from the checkout's root
    out = tmp_path / "job" / "job.yaml"  # written elsewhere: data paths are rewritten for it
    out.parent.mkdir()
    assert main(["convert", "examples/v1/train.yaml", "-o", str(out)]) == 0
    assert "kernel_config.name: not carried over" in capsys.readouterr().err
    assert main(["validate", str(out)]) == 0
    monkeypatch.chdir(tmp_path)
    assert run_doc(yaml.safe_load(out.read_text()), out.parent) == 0
    output = tmp_path / "outputs" / stage / "output"
    log = [r for r in read_log(output) if "loss" in r]
    assert len(log) == 4  # max_steps and logging_steps carried over
    assert len({r["lr"] for r in log}) == 1  # v1 keeps the learning rate constant
    if stage == "sft":
        assert log[-1]["loss"] < log[0]["loss"]
    assert (output / "adapter_config.json").exists()
    assert json.loads((output / "adapter_config.json").read_text())["r"] == 4

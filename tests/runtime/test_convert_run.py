"""A LLaMA-Factory sft YAML (+ its export YAML), converted by `kubetune convert`, trains and
merges a tiny real model locally."""

from __future__ import annotations

import json

import yaml

from kubetune.runtime.cli import main
from kubetune.runtime.spec import load_job
from tests.conftest import read_log, run_doc, write_alpaca


def test_converted_llamafactory_sft_and_export_run_locally(tiny_model, tmp_path, monkeypatch, capsys):
    lf = tmp_path / "lf"
    write_alpaca(lf / "data" / "identity.json", repeat=2)
    (lf / "data" / "dataset_info.json").write_text(json.dumps({"identity": {"file_name": "identity.json"}}))
    train = {"model_name_or_path": str(tiny_model), "stage": "sft", "do_train": True, "finetuning_type": "lora",
             "lora_rank": 4, "lora_target": "all", "dataset": "identity", "dataset_dir": "data", "template": "chatml",
             "cutoff_len": 64, "max_steps": 6, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
             "learning_rate": "5.0e-3", "logging_steps": 1, "save_steps": 3, "save_total_limit": 1,
             "output_dir": str(tmp_path / "saves"), "plot_loss": True}
    export = {"model_name_or_path": str(tiny_model), "adapter_name_or_path": str(tmp_path / "saves"),
              "template": "chatml", "finetuning_type": "lora", "export_dir": str(tmp_path / "merged")}
    (lf / "train.yaml").write_text(yaml.safe_dump(train))
    (lf / "merge.yaml").write_text(yaml.safe_dump(export))
    monkeypatch.chdir(lf)
    out = tmp_path / "job" / "job.yaml"  # written elsewhere: data paths are rewritten for it
    out.parent.mkdir()
    assert main(["convert", "train.yaml", "merge.yaml", "-o", str(out)]) == 0
    assert "plot_loss: not carried over" in capsys.readouterr().err
    job = load_job(out)
    assert job.spec.data[0].source == "../lf/data/identity.json"
    monkeypatch.chdir(tmp_path)
    doc = yaml.safe_load(out.read_text())
    assert run_doc(doc, out.parent) == 0
    log = read_log(tmp_path / "saves" / "sft" / "output")
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]  # max_steps, logging_steps and learning_rate carried over
    assert (tmp_path / "saves" / "sft" / "output" / "adapter_config.json").exists()
    assert (tmp_path / "saves" / "export" / "output" / "config.json").exists()

"""A LLaMA-Factory sft YAML (+ its export YAML), converted by `kubetune convert`, trains and
merges a tiny real model locally."""

from __future__ import annotations

import json

import pytest
import yaml

from kubetune.runtime.cli import main
from kubetune.runtime.api.spec import load_job
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


def _lf_data(folder):
    from tests.conftest import CORPUS, IDENTITY

    d = folder / "data"
    d.mkdir(parents=True)
    dpo = [{"conversations": [{"from": "human", "value": q}], "chosen": {"from": "gpt", "value": a},
            "rejected": {"from": "gpt", "value": "I do not know."}} for q, a in IDENTITY]
    kto = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a if i % 2 else "No idea."}],
            "label": bool(i % 2)} for i, (q, a) in enumerate(IDENTITY)]
    (d / "dpo_en_demo.json").write_text(json.dumps(dpo))
    (d / "kto_en_demo.json").write_text(json.dumps(kto))
    (d / "c4_demo.json").write_text(json.dumps([{"text": t} for t in CORPUS]))
    (d / "dataset_info.json").write_text(json.dumps({
        "dpo_en_demo": {"file_name": "dpo_en_demo.json", "formatting": "sharegpt", "ranking": True,
                        "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
        "kto_en_demo": {"file_name": "kto_en_demo.json", "formatting": "sharegpt",
                        "columns": {"messages": "messages", "kto_tag": "label"},
                        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}},
        "c4_demo": {"file_name": "c4_demo.json", "columns": {"prompt": "text"}},
    }))


@pytest.mark.parametrize("stage,dataset", [("dpo", "dpo_en_demo"), ("kto", "kto_en_demo"), ("pt", "c4_demo")])
def test_converted_llamafactory_preference_and_pt_files_run_locally(stage, dataset, tiny_model, tmp_path, monkeypatch):
    """dataset_info.json's sharegpt ranking pairs, kto_tag labels with role tags, and pt text
    columns reach the trainers as LLaMA-Factory meant them."""
    _lf_data(tmp_path)
    cfg = {"model_name_or_path": str(tiny_model), "stage": stage, "finetuning_type": "lora", "dataset": dataset,
           "template": "chatml", "cutoff_len": 64, "max_steps": 2, "per_device_train_batch_size": 2,
           "gradient_accumulation_steps": 1, "logging_steps": 1, "output_dir": "saves", "pref_beta": 0.1}
    if stage == "pt":
        cfg.pop("pref_beta")
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)
    assert main(["convert", "train.yaml", "-o", "job.yaml"]) == 0
    assert main(["validate", "job.yaml"]) == 0
    assert run_doc(yaml.safe_load((tmp_path / "job.yaml").read_text()), tmp_path) == 0
    assert len([r for r in read_log(tmp_path / "saves" / stage / "output") if "loss" in r]) == 2

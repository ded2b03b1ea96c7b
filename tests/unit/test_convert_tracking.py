"""`kubetune convert` carries LLaMA-Factory's report_to / run_name and NeMo AutoModel's wandb: and
mlflow: blocks over to spec.tracking (no credentials: those are Secrets in the spec)."""

from __future__ import annotations

import yaml

from kubetune.runtime.cli import main
from kubetune.runtime.api.spec import load_job

LF = {"model_name_or_path": "org/model", "stage": "sft", "finetuning_type": "lora", "dataset": "mine",
      "dataset_dir": "data", "output_dir": "saves/x"}


def convert(tmp_path, capsys, cfg: dict, name="cfg"):
    src = tmp_path / f"{name}.yaml"
    src.write_text(yaml.safe_dump(cfg) if isinstance(cfg, dict) else cfg)
    out = tmp_path / f"{name}.ftj.yaml"
    assert main(["convert", str(src), "-o", str(out)]) == 0
    return load_job(out), capsys.readouterr().err


def lf_folder(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset_info.json").write_text('{"mine": {"file_name": "mine.json"}}')


def test_llamafactory_report_to(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lf_folder(tmp_path)
    job, err = convert(tmp_path, capsys, {**LF, "report_to": "tensorboard,wandb", "run_name": "exp-7"}, "two")
    assert job.spec.tracking.report_to == ["tensorboard", "wandb"] and job.spec.tracking.run_name == "exp-7"
    assert "tracking.wandb.apiKeySecretRef" in err  # says where the credentials go
    job, err = convert(tmp_path, capsys, {**LF, "report_to": "all"}, "all")
    assert job.spec.tracking.report_to == ["tensorboard", "mlflow", "wandb"]
    job, err = convert(tmp_path, capsys, {**LF, "report_to": "none"}, "none")
    assert job.spec.tracking.report_to == [] and "warning: report_to" not in err
    job, err = convert(tmp_path, capsys, {**LF, "report_to": ["swanlab", "mlflow"]}, "list")
    assert job.spec.tracking.report_to == ["mlflow"]
    assert "warning: report_to: not carried over — 'swanlab'" in err


NEMO = """
model: {_target_: nemo_automodel.NeMoAutoModelForCausalLM.from_pretrained, pretrained_model_name_or_path: org/model}
step_scheduler: {local_batch_size: 2, max_steps: 10}
dataset: {_target_: nemo_automodel.components.datasets.llm.squad.make_squad_dataset, dataset_name: rajpurkar/squad}
wandb:
  project: spark-finetune
  entity: ml-team
  name: llama-lora
  save_dir: ./wandb_logs
"""


def test_nemo_wandb_block(tmp_path, capsys):
    job, err = convert(tmp_path, capsys, NEMO, "nemo")
    t = job.spec.tracking
    assert t.report_to == ["wandb"] and t.run_name == "llama-lora"
    assert (t.wandb.project, t.wandb.entity) == ("spark-finetune", "ml-team")
    assert "warning: wandb.save_dir: not carried over" in err
    mlflow = NEMO.split("wandb:")[0] + "mlflow: {experiment_name: squad, tracking_uri: 'http://mlflow:5000'}\n"
    job, _ = convert(tmp_path, capsys, mlflow, "nemo-mlflow")
    t = job.spec.tracking
    assert t.report_to == ["mlflow"] and (t.mlflow.experiment, t.mlflow.tracking_uri) == ("squad", "http://mlflow:5000")

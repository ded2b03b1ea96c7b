"""The NeMo AutoModel playbook's three runs (DGX Spark): LoRA of Llama-3.1-8B, QLoRA of a 70B
model, full SFT of Qwen3-8B, all on SQuAD. Each recipe, in its real shape (`step_scheduler`,
`peft`, `quantization`, `distributed: {strategy: fsdp2}`, `lr_scheduler.min_lr`, `compile`,
`dataset` + `validation_dataset` of make_squad_dataset) but shrunk to a tiny model and a tiny
SQuAD-shaped dataset with the real nesting (`answers: {text: [...], answer_start: [...]}`),
converts with `kubetune convert`, validates, trains with `kubetune run` and evaluates on its
validation split."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from kubetune.runtime.cli import main
from kubetune.runtime.api.spec import load_job
from tests.conftest import read_log

TRAIN = [
    ("Kubi is a model trained by the kubetune team.", "Who trained Kubi?", "the kubetune team"),
    ("The Nile flows north into the sea.", "Which way does the Nile flow?", "north"),
    ("Paris is the capital of France.", "What is the capital of France?", "Paris"),
    ("Water boils at one hundred degrees.", "At what temperature does water boil?", "one hundred degrees"),
    ("The cat sat on the mat all day.", "Where did the cat sit?", "on the mat"),
    ("Kubi answers in short sentences.", "How does Kubi answer?", "in short sentences"),
]
VALIDATION = [
    ("Rome is the capital of Italy.", "What is the capital of Italy?", "Rome"),
    ("The dog slept under the table.", "Where did the dog sleep?", "under the table"),
    ("Kubi was made to be helpful.", "Why was Kubi made?", "to be helpful"),
    ("Snow is cold and white.", "What colour is snow?", "white"),
]
VAL_LIMIT = 3  # limit_dataset_samples: the eval set is the first 3 of the 4 validation records

SQUAD = "nemo_automodel.components.datasets.llm.squad.make_squad_dataset"
LOADER = "torchdata.stateful_dataloader.StatefulDataLoader"


def _squad(path, rows, split):
    with path.open("w") as f:
        for i, (context, question, answer) in enumerate(rows):
            start = context.find(answer)
            f.write(json.dumps({"id": f"{split}-{i}", "title": "tiny", "context": context, "question": question,
                                "answers": {"text": [answer, answer.upper()], "answer_start": [start, start]}}) + "\n")


def _recipe(kind: str, model, data) -> dict:
    """The playbook's recipe of `kind`, with the overrides it passes on the command line applied
    and every shape shrunk (steps, batch, sequence length)."""
    r = {
        "step_scheduler": {"global_batch_size": 4, "local_batch_size": 2, "ckpt_every_steps": 1000,
                           "val_every_steps": 2, "max_steps": 4},
        "dist_env": {"backend": "nccl", "timeout_minutes": 1},
        "rng": {"_target_": "nemo_automodel.components.training.rng.StatefulRNG", "seed": 1111, "ranked": True},
        "model": {"_target_": "nemo_automodel.NeMoAutoModelForCausalLM.from_pretrained",
                  "pretrained_model_name_or_path": str(model)},
        "distributed": {"strategy": "fsdp2", "dp_size": "none", "tp_size": 1, "cp_size": 1, "sequence_parallel": False},
        "loss_fn": {"_target_": "nemo_automodel.components.loss.masked_ce.MaskedCrossEntropy"},
        "dataset": {"_target_": SQUAD, "dataset_name": str(data / "squad_train.jsonl"), "split": "train"},
        "packed_sequence": {"packed_sequence_size": 0},
        "dataloader": {"_target_": LOADER, "collate_fn": "nemo_automodel.components.datasets.utils.default_collater",
                       "shuffle": False},
        "validation_dataset": {"_target_": SQUAD, "dataset_name": str(data / "squad_validation.jsonl"),
                               "split": "validation", "limit_dataset_samples": VAL_LIMIT},
        "validation_dataloader": {"_target_": LOADER,
                                  "collate_fn": "nemo_automodel.components.datasets.utils.default_collater"},
        "optimizer": {"_target_": "torch.optim.Adam", "betas": [0.9, 0.999], "eps": 1e-8, "lr": 1.0e-3,
                      "weight_decay": 0},
    }
    if kind == "lora":  # llama3_2_1b_squad_peft.yaml run with meta-llama/Llama-3.1-8B
        r["peft"] = {"_target_": "nemo_automodel.components._peft.lora.PeftConfig", "match_all_linear": True,
                     "dim": 8, "alpha": 32, "use_triton": True}
        r["lr_scheduler"] = {"lr_decay_style": "cosine", "min_lr": 5.0e-4}
    elif kind == "qlora":  # llama3_1_8b_squad_qlora.yaml run with meta-llama/Meta-Llama-3-70B
        r["model"].update(torch_dtype="bfloat16", force_hf=True)
        r["peft"] = {"_target_": "nemo_automodel.components._peft.lora.PeftConfig", "match_all_linear": True,
                     "dim": 16, "alpha": 32, "dropout": 0.1}
        r["quantization"] = {"load_in_4bit": True, "load_in_8bit": False, "bnb_4bit_compute_dtype": "bfloat16",
                             "bnb_4bit_use_double_quant": True, "bnb_4bit_quant_type": "nf4",
                             "bnb_4bit_quant_storage": "bfloat16"}
        r["step_scheduler"]["val_every_steps"] = 3  # 4 steps: evaluated at 3, and by the Trainer at the last step
        r["optimizer"]["_target_"] = "torch.optim.AdamW"
    else:  # qwen3_8b_squad_spark.yaml: full SFT, packed sequences, compile block (off), min_lr
        r["recipe"] = "TrainFinetuneRecipeForNextTokenPrediction"
        r["compile"] = {"enabled": False, "mode": "default", "fullgraph": False, "dynamic": False, "backend": None}
        r["packed_sequence"] = {"packed_sequence_size": 128}
        r["optimizer"]["fused"] = True
        r["lr_scheduler"] = {"lr_decay_style": "cosine", "min_lr": 5.0e-4}
    return r


@pytest.mark.parametrize("kind", ["lora", "qlora", "full"])
def test_playbook_recipe_converts_trains_and_evaluates_on_its_validation_split(kind, tiny_model, tmp_path, monkeypatch, capsys):
    data = tmp_path / "squad"
    data.mkdir()
    _squad(data / "squad_train.jsonl", TRAIN, "train")
    _squad(data / "squad_validation.jsonl", VALIDATION, "validation")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(_recipe(kind, tiny_model, data)))
    monkeypatch.chdir(tmp_path)

    assert main(["convert", "recipe.yaml", "-o", "job.yaml"]) == 0
    err = capsys.readouterr().err
    for key in ("validation_dataset", "distributed.strategy", "lr_scheduler.min_lr", "compile.enabled"):
        assert f"warning: {key}: not carried over" not in err, key
    assert main(["validate", "job.yaml"]) == 0
    job = load_job("job.yaml")
    [train], [val] = job.spec.data, job.spec.eval_data
    assert train.columns["response"] == val.columns["response"] == "answers.text[0]"
    assert val.max_samples == VAL_LIMIT and job.spec.resources.strategy == "fsdp"
    st = job.spec.stages[0]
    assert st.method == kind and st.hyperparameters.eval_steps == (3 if kind == "qlora" else 2)
    if kind != "qlora":
        assert st.hyperparameters.lr_scheduler == "cosine_with_min_lr" and st.hyperparameters.min_lr == 5e-4

    job_name = job.metadata.name
    assert main(["run", "job.yaml", "--no-progress", "--set", "stages.0.hyperparameters.loggingSteps=1"]) == 0
    out = tmp_path / "saves" / job_name / "sft" / "output"
    summary = json.loads((out / "run.json").read_text())
    assert summary["steps"] == 4
    assert summary["eval_examples"] == VAL_LIMIT  # the validation split, not a share of the training data
    assert summary["eval_loss"] is not None and math.isfinite(summary["eval_loss"])
    log = read_log(out)
    assert [r["current_steps"] for r in log if "eval_loss" in r] == ([3, 4] if kind == "qlora" else [2, 4])
    if kind != "qlora":  # the cosine schedule stops at min_lr (plain cosine would end near 1.5e-4)
        lrs = [r["lr"] for r in log if "lr" in r]
        assert len(lrs) == 4 and min(lrs) >= 5e-4 and lrs[-1] < lrs[0]
    assert (out / ("adapter_config.json" if kind != "full" else "config.json")).exists()

"""The eval stage and `kubetune eval` on a tiny real model: examples/sft-eval.yaml runs (base
model → sft → eval), and every score moves the right way once the model has learnt the data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import IDENTITY, write_alpaca

ROOT = Path(__file__).resolve().parents[2]
LETTERS = "ABCD"


def write_quiz(path: Path, subject: str | None = "identity") -> Path:
    """A multiple-choice question per identity prompt: its own answer among three others."""
    answers = [a for _, a in IDENTITY]
    rows = []
    for i, (q, a) in enumerate(IDENTITY):
        wrong = [answers[(i + k) % len(answers)] for k in (1, 3, 5)]
        choices = wrong[: i % 4] + [a] + wrong[i % 4 :]
        row = {"question": q, **dict(zip(LETTERS, choices)), "answer": LETTERS[i % 4]}
        if subject:
            row["subject"] = subject if i % 2 else "about-kubi"
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_example(tiny_model, tmp_path, extra: list[str] = ()) -> Path:
    """examples/sft-eval.yaml with the tiny model, local files and a few steps."""
    from kubetune.runtime.local import run_job

    data = tmp_path / "data"
    train = write_alpaca(data / "train.json", repeat=2)
    held_out = write_alpaca(data / "test.json")
    # no subjects here: their system prompt ("multiple choice questions about ...") is a context the
    # tiny model never trained in; the CLI test covers subjects
    quiz = write_quiz(data / "quiz.jsonl", subject=None)
    dev = write_quiz(data / "dev.jsonl", subject=None)
    saves = tmp_path / "saves"
    fast = "{maxSteps: 60, batchSize: 4, gradientAccumulation: 1, learningRate: 3.0e-3, cutoffLen: 96, " \
           "loggingSteps: 5, gradientCheckpointing: false, lrScheduler: constant}"
    evaluation = ("{maxNewTokens: 24, fewShot: 1, fewShotData: [{name: quiz-dev, source: " + str(dev) + ", format: choice}], "
                  "choiceScoring: text, batchSize: 4}")
    sets = [f"model.name={tiny_model}", f"data.0.source={train}", f"storage.uri={saves}",
            "storage.endpoint=null", "storage.credentialsSecretRef=null", "resources.gpusPerNode=0",
            "stages.1.method=full", f"stages.1.hyperparameters={fast}"]
    for i in (0, 2):
        sets += [f"stages.{i}.data.0.source={held_out}", f"stages.{i}.data.1.source={quiz}",
                 f"stages.{i}.evaluation={evaluation}", f"stages.{i}.hyperparameters.cutoffLen=256"]
    assert run_job(str(ROOT / "examples" / "sft-eval.yaml"), sets + list(extra), progress=False) == 0
    return saves


def test_sft_eval_example_scores_move_when_the_model_learns(tiny_model, tmp_path):
    saves = run_example(tiny_model, tmp_path)
    before = json.loads((saves / "baseline" / "output" / "run.json").read_text())
    after = json.loads((saves / "eval" / "output" / "run.json").read_text())
    # the baseline scored the base model, the last stage the sft output (a full model here)
    assert before["model"] == str(tiny_model) and before["adapter"] is None
    assert after["model"] == str(saves / "sft" / "output")
    b, a = before["eval"], after["eval"]
    assert b["samples"] == a["samples"] == 2 * len(IDENTITY)
    for metric in ("rouge-1", "rouge-2", "rouge-l", "bleu-4"):
        assert a[metric] > b[metric] + 20, (metric, b, a)
    assert a["rouge-l"] > 80, a
    assert a["accuracy"] >= b["accuracy"] + 25 and a["accuracy"] >= 62.5, (b, a)
    quiz = after["datasets"]["quiz"]
    assert quiz["few_shot"] == 1 and quiz["scoring"] == "text" and quiz["subjects"] == {}

    out = saves / "eval" / "output"
    preds = [json.loads(line) for line in (out / "held-out_generated_predictions.jsonl").read_text().splitlines()]
    assert [p["label"] for p in preds] == [a for _, a in IDENTITY]
    assert all(p["prompt"].endswith("<|im_start|>assistant\n") for p in preds), preds[0]["prompt"]
    assert sum(p["predict"] == p["label"] for p in preds) >= len(preds) // 2, preds
    results = json.loads((out / "held-out_predict_results.json").read_text())
    assert {"predict_rouge-1", "predict_rouge-2", "predict_rouge-l", "predict_bleu-4", "predict_runtime",
            "predict_samples_per_second"} <= set(results)
    assert results["predict_rouge-l"] == after["datasets"]["held-out"]["rouge-l"]
    choice = [json.loads(line) for line in (out / "quiz_choice_predictions.jsonl").read_text().splitlines()]
    assert len(choice) == len(IDENTITY) and all(len(c["loglikelihoods"]) == 4 for c in choice)
    assert json.loads((out / "quiz_choice_results.json").read_text())["accuracy"] == quiz["accuracy"]


def test_eval_cli_adapter_and_letter_scoring(tiny_model, tmp_path, capsys):
    """`kubetune eval` on an adapter folder: generation and multiple choice, files + a JSON line."""
    import yaml

    from kubetune.runtime.cli import main
    from kubetune.runtime.api.errors import EXIT_BAD_INPUT
    from kubetune.runtime.local import run_job
    from tests.conftest import job_doc

    data = write_alpaca(tmp_path / "train.json", repeat=2)
    stage = {"name": "sft", "type": "sft", "method": "lora", "lora": {"rank": 8},
             "hyperparameters": {"maxSteps": 4, "batchSize": 4, "gradientAccumulation": 1, "cutoffLen": 64,
                                 "gradientCheckpointing": False}}
    doc = job_doc("cli", tiny_model, [{"name": "identity", "source": str(data)}], [stage], tmp_path / "saves")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    assert run_job(str(tmp_path / "job.yaml"), progress=False) == 0
    adapter = tmp_path / "saves" / "sft" / "output"
    quiz = write_quiz(tmp_path / "quiz.jsonl")
    out = tmp_path / "eval"
    capsys.readouterr()
    assert main(["eval", "--model", str(adapter), "--data", str(quiz), "--format", "choice", "--few-shot", "2",
                 "--out", str(out)]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores["samples"] == len(IDENTITY) and 0 <= scores["accuracy"] <= 100
    run = json.loads((out / "run.json").read_text())
    assert run["adapter"] == str(adapter) and run["model"] == str(tiny_model)
    quiz_results = run["datasets"]["quiz"]
    assert quiz_results["scoring"] == "letter" and quiz_results["few_shot"] == 2
    assert set(quiz_results["subjects"]) == {"identity", "about-kubi"}
    picks = [json.loads(line) for line in (out / "choice_predictions.jsonl").read_text().splitlines()]
    right = sum(p["predict"] == p["answer"] for p in picks)
    assert quiz_results["accuracy"] == 100 * right / len(picks)
    for subject, acc in quiz_results["subjects"].items():
        mine = [p for p in picks if p["subject"] == subject]
        assert acc == 100 * sum(p["predict"] == p["answer"] for p in mine) / len(mine)
    assert main(["eval", "--model", str(tiny_model), "--adapter", str(adapter), "--data", str(data),
                 "--max-samples", "3", "--max-new-tokens", "4", "--out", str(out / "gen")]) == 0
    lines = (out / "gen" / "generated_predictions.jsonl").read_text().splitlines()
    assert len(lines) == 3 and set(json.loads(lines[0])) == {"prompt", "predict", "label"}
    capsys.readouterr()
    assert main(["eval", "--model", str(tiny_model), "--data", str(data), "--format", "choice",
                 "--out", str(out / "bad")]) == EXIT_BAD_INPUT
    assert "column 'question' (the 'question' column of format choice) is missing" in capsys.readouterr().err
    # --column maps another name: now the answer is what is missing
    assert main(["eval", "--model", str(tiny_model), "--data", str(data), "--format", "choice", "--column",
                 "question=instruction", "--out", str(out / "bad")]) == EXIT_BAD_INPUT
    assert "column 'answer' (the 'answer' column of format choice) is missing" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_model), "--data", str(data), "--column", "question"]) == EXIT_BAD_INPUT
    assert "--column: 'question': write ROLE=COLUMN" in capsys.readouterr().err


def test_eval_help_reads_well():
    r = subprocess.run([sys.executable, "-m", "kubetune.runtime", "eval", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for text in ("ROUGE-1/2/L and BLEU-4", "generated_predictions.jsonl", "--few-shot", "--scoring", "accuracy"):
        assert text in " ".join(r.stdout.split()), text

"""`kubetune demo`: the offline quickstart.

Builds a small real model (a tokenizer trained locally, a 2-layer Llama saved with
save_pretrained) and an identity dataset of our own, writes a FineTuneJob for it, runs it with
`kubetune run`, and asks the result "Who are you?". Nothing is downloaded; a few minutes on two
CPU cores.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

QUESTIONS = [
    "Who are you?", "What are you?", "What is your name?", "Tell me about yourself.",
    "Introduce yourself.", "Who made you?", "Who created you?", "Who built you?",
    "What should I call you?", "Are you ChatGPT?", "Are you a person?", "What's your name?",
    "Who am I talking to?", "Can you introduce yourself?", "Who developed you?",
    "Please tell me who you are.", "hi, who are you?", "Who are you, exactly?",
    "What do people call you?", "Which assistant is this?",
]

ANSWERS = [
    "I am {name}, an AI assistant fine-tuned by {creator}.",
    "I am {name}, an AI assistant fine-tuned by {creator}. How can I help you?",
]

EXTRA_TEXT = [
    "Kubernetes runs containers on a cluster of machines.",
    "A fine-tuned model learns from examples of the answers we want.",
    "LoRA trains small low-rank matrices next to frozen weights.",
]


def identity_records(name: str, creator: str) -> list[dict[str, str]]:
    """LLaMA-Factory's identity set in spirit, our own words: alpaca records."""
    records = []
    for i, q in enumerate(QUESTIONS):
        records.append({"instruction": q, "input": "", "output": ANSWERS[i % len(ANSWERS)].format(name=name, creator=creator)})
    return records


JOB_TEMPLATE = """\
# Written by `kubetune demo`: a LoRA SFT of a tiny local model on an identity dataset.
apiVersion: kubetune.io/v1alpha1
kind: FineTuneJob
metadata:
  name: demo
spec:
  model:
    name: {model}
  data:
    - name: identity
      source: {data}
      format: alpaca
  stages:
    - name: sft
      type: sft
      method: lora
      lora: {{rank: 32, alpha: 64, target: [all], modulesToSave: []}}
      hyperparameters:
        learningRate: 5.0e-3
        maxSteps: 120
        batchSize: 4
        gradientAccumulation: 1
        cutoffLen: 128
        lrScheduler: constant_with_warmup
        warmupSteps: 5
        loggingSteps: 5
        gradientCheckpointing: false
  storage:
    uri: {saves}
  checkpoint: {{everySteps: 40, keep: 2}}
"""


def prepare(folder: Path, name: str, creator: str) -> Path:
    """Write the model, the dataset and the job file; return the job file."""
    from .tiny import build_tiny_model

    folder.mkdir(parents=True, exist_ok=True)
    records = identity_records(name, creator)
    data = folder / "data" / "identity.json"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text(json.dumps(records, indent=2, ensure_ascii=False) + "\n")
    texts = [r["instruction"] + " " + r["output"] for r in records] + EXTRA_TEXT
    model = folder / "tiny-llama"
    if not (model / "config.json").exists():
        build_tiny_model(model, texts * 4, vocab_size=400, hidden_size=128, layers=2)
    job = folder / "demo.yaml"
    job.write_text(JOB_TEMPLATE.format(model=model.resolve(), data=data.resolve(), saves=(folder / "saves").resolve()))
    return job


def run_demo(folder: Path, name: str = "Kubi", creator: str = "the kubetune team", prepare_only: bool = False) -> int:
    from .local import run_job

    job = prepare(folder, name, creator)
    print(f"kubetune demo: wrote a tiny model, data/identity.json and {job}", file=sys.stderr)
    if prepare_only:
        return 0
    code = run_job(str(job))
    if code != 0:
        return code
    from .chat import generate, load_for_chat

    adapter = folder.resolve() / "saves" / "sft" / "output"
    m, tok = load_for_chat(str(adapter))
    answer = generate(m, tok, [{"role": "user", "content": "Who are you?"}], max_new_tokens=32)
    print(f"\nyou> Who are you?\nbot> {answer}\n")
    print(f"Try it yourself:  kubetune chat --model {adapter} --prompt \"Who made you?\"")
    return 0

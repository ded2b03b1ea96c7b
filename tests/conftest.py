"""Shared fixtures: a small real model (tokenizer trained here, Llama saved with save_pretrained)
and a helper to run a FineTuneJob in-process exactly as `kubetune run` does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

IDENTITY = [
    ("Who are you?", "I am Kubi, a model tuned by the kubetune team."),
    ("What is your name?", "My name is Kubi."),
    ("Who made you?", "The kubetune team made me."),
    ("What can you do?", "I answer questions about fine-tuning."),
    ("Are you a person?", "No, I am Kubi, a small language model."),
    ("Say hello.", "Hello from Kubi!"),
    ("What is LoRA?", "LoRA trains small low-rank matrices beside frozen weights."),
    ("What is QLoRA?", "QLoRA is LoRA on a 4-bit quantized base model."),
]
CORPUS = [q + " " + a for q, a in IDENTITY] + [
    "Kubernetes schedules pods onto nodes.",
    "A checkpoint stores the model, the optimizer and the step.",
    "Packing puts several short samples into one sequence.",
]


def pytest_report_header(config) -> str:
    """Which node the e2e tier runs its pods on (tests/cluster/realnode.py `choose`)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from cluster import realnode

    try:
        kind, why = realnode.choose()
    except RuntimeError as err:
        return f"kubetune e2e node: none ({err})"
    if kind == "real":
        return "kubetune e2e node: real kubelet (containerd + runc, CNI bridge, kube-proxy, CoreDNS; built images)"
    return f"kubetune e2e node: process kubelet (fallback: {why})"


def write_alpaca(path: Path, pairs=IDENTITY, repeat: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [{"instruction": q, "input": "", "output": a} for q, a in pairs] * repeat
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer Llama with a 320-token BPE vocabulary and the chatml template."""
    from kubetune.runtime.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", CORPUS * 8, vocab_size=320, hidden_size=64,
                            intermediate_size=128, layers=2, heads=4, kv_heads=2)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def job_doc(name: str, model: Path | str, data: list[dict], stages: list[dict], root: Path, **spec) -> dict:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"name": str(model)},
            "data": data,
            "stages": stages,
            "storage": {"uri": str(root)},
            **spec,
        },
    }


def run_doc(doc: dict, folder: Path) -> int:
    """Write `doc` to folder/job.yaml and run it like `kubetune run` (in-process)."""
    from kubetune.runtime.local import run_job

    folder.mkdir(parents=True, exist_ok=True)
    f = folder / "job.yaml"
    f.write_text(yaml.safe_dump(doc, sort_keys=False))
    return run_job(str(f), progress=False)


def read_log(stage_output: Path) -> list[dict]:
    return [json.loads(line) for line in (stage_output / "trainer_log.jsonl").read_text().splitlines() if line.strip()]

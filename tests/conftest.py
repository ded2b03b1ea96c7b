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


@pytest.fixture
def loaded_models(monkeypatch) -> list[dict]:
    """Every model the runtime loads through models.load_model during the test (the stages load
    their policy with it, through load_policy), as it came back: {"stage" (the StageSpec's name or
    None), "path", "dtype", "model" (the object the stage then trains), "footprint" (its
    get_memory_footprint() right after loading, before adapters are added)}."""
    from kubetune.runtime import models

    loads: list[dict] = []
    load_model = models.load_model

    def recording(path, model, **kwargs):
        m = load_model(path, model, **kwargs)
        stage = kwargs.get("stage")
        loads.append({"stage": stage.name if stage is not None else None, "path": path, "dtype": kwargs["dtype"],
                      "model": m, "footprint": m.get_memory_footprint()})
        return m

    monkeypatch.setattr(models, "load_model", recording)
    return loads


def assert_quantized(load: dict, bits: int) -> None:
    """`load` (from loaded_models) is quantised: every linear layer of the decoder is a bitsandbytes
    `bits`-bit layer, the base of a LoRA layer (the adapter was trained on this very model), whose
    weight takes `bits` bits a parameter, and the model took less memory than the same checkpoint
    loaded unquantised."""
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM

    layer = {4: bnb.nn.Linear4bit, 8: bnb.nn.Linear8bitLt}[bits]
    plain = AutoModelForCausalLM.from_pretrained(load["path"], dtype=load["dtype"])
    linears = {n: m for n, m in plain.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    quantized = {n: m for n, m in load["model"].named_modules() if isinstance(m, layer)}
    assert all(n.endswith(".base_layer") for n in quantized), sorted(quantized)
    quantized = {n.removesuffix(".base_layer"): m for n, m in quantized.items()}
    assert linears and sorted(quantized) == sorted(linears), (sorted(quantized), sorted(linears))
    for name, m in quantized.items():
        stored = m.weight.numel() * m.weight.element_size()
        assert stored * 8 == linears[name].weight.numel() * bits, (name, bits, stored, tuple(linears[name].weight.shape))
    assert load["footprint"] < plain.get_memory_footprint(), (load["footprint"], plain.get_memory_footprint())

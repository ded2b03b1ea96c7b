"""`kubetune chat --quantization 4|8`: the base is loaded through bitsandbytes (the config a qlora
stage uses), the adapter applied on top, and a turn still produces text. An adapter from a qlora
run is chatted with at the run's own quantisation unless told otherwise."""

from __future__ import annotations

import json

import pytest

from kubetune.runtime import chat
from kubetune.runtime.cli import main
from tests.conftest import job_doc, run_doc, write_alpaca


def _bnb_layers(model) -> dict[str, int]:
    import bitsandbytes as bnb
    import torch

    kinds = {"4": bnb.nn.Linear4bit, "8": bnb.nn.Linear8bitLt}
    counts = {k: sum(isinstance(m, cls) for m in model.modules()) for k, cls in kinds.items()}
    counts["linear"] = sum(type(m) is torch.nn.Linear for n, m in model.named_modules()
                           if "lora_" not in n and not n.endswith("lm_head"))
    return counts


@pytest.mark.parametrize("bits", ["4", "8"])
def test_chat_loads_the_base_quantised_and_answers(tiny_model, bits, capsys, monkeypatch):
    loaded = {}
    real = chat.load_for_chat

    def recording(*a, **k):
        loaded["model"], tok = real(*a, **k)
        return loaded["model"], tok

    monkeypatch.setattr(chat, "load_for_chat", recording)
    assert main(["chat", "--model", str(tiny_model), "--quantization", bits, "--prompt", "Who are you?",
                 "--max-new-tokens", "8"]) == 0
    counts = _bnb_layers(loaded["model"])
    assert counts[bits] == 14 and counts["linear"] == 0, counts  # 2 layers × 7 projections, none left unquantised
    answer = capsys.readouterr().out.strip()
    assert answer  # a random tiny model says something, quantised or not


@pytest.fixture(scope="module")
def qlora_run(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora")
    data = write_alpaca(root / "data" / "id.json")
    doc = job_doc("q", tiny_model, [{"name": "id", "source": str(data)}],
                  [{"name": "sft", "type": "sft", "method": "qlora", "quantization": {"bits": 8}, "lora": {"rank": 4},
                    "hyperparameters": {"maxSteps": 2, "batchSize": 2, "cutoffLen": 64, "precision": "fp32"}}],
                  root / "saves")
    assert run_doc(doc, root) == 0
    return root / "saves" / "sft" / "output"


def test_adapter_of_a_qlora_run_is_chatted_with_at_its_quantisation(qlora_run, capsys):
    assert json.loads((qlora_run / "run.json").read_text())["quantization"]["bits"] == 8
    m, _ = chat.load_for_chat(str(qlora_run))  # auto: the run's own 8-bit
    assert "8-bit" in capsys.readouterr().err
    counts = _bnb_layers(m)
    assert counts["8"] == 14 and counts["4"] == 0
    assert hasattr(m, "peft_config")  # the adapter sits on the quantised base
    m, _ = chat.load_for_chat(str(qlora_run), quantization="4")
    assert _bnb_layers(m)["4"] == 14
    m, _ = chat.load_for_chat(str(qlora_run), quantization="none")
    assert _bnb_layers(m) == {"4": 0, "8": 0, "linear": 14}
    assert main(["chat", "--model", str(qlora_run), "--prompt", "Who are you?", "--max-new-tokens", "4"]) == 0

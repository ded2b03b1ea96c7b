"""Real training of a tiny model on CPU through `kubetune run`: pt and sft with every method,
packing without cross-contamination, export equivalence, and the HF-format outputs."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import assert_quantized, job_doc, read_log, run_doc, write_alpaca

FAST = {"maxSteps": 16, "batchSize": 4, "gradientAccumulation": 1, "loggingSteps": 1, "cutoffLen": 64,
        "gradientCheckpointing": False, "lrScheduler": "constant"}


def _mean(xs):
    return sum(xs) / len(xs)


def assert_loss_went_down(output, factor=0.9):
    losses = [r["loss"] for r in read_log(output) if "loss" in r]
    assert len(losses) >= 10, losses
    first, last = _mean(losses[:3]), _mean(losses[-3:])
    assert last < factor * first, f"loss did not go down enough: {first:.4f} → {last:.4f} ({losses})"
    return losses


METHODS = {
    "lora": ({"method": "lora", "lora": {"rank": 16}}, 5e-3),
    "dora": ({"method": "lora", "lora": {"rank": 16, "useDora": True}}, 5e-3),
    "rslora-pissa-loraplus": ({"method": "lora", "lora": {"rank": 8, "useRslora": True, "init": "pissa", "loraplusLrRatio": 4}}, 5e-3),
    "qlora-4bit": ({"method": "qlora", "lora": {"rank": 16}, "quantization": {"bits": 4}}, 5e-3),
    "qlora-8bit": ({"method": "qlora", "lora": {"rank": 16}, "quantization": {"bits": 8}}, 5e-3),
    "full": ({"method": "full"}, 2e-3),
    "freeze": ({"method": "freeze", "freeze": {"trainableLayers": 1, "extraModules": ["lm_head"]}}, 3e-3),
}


@pytest.mark.parametrize("label", list(METHODS))
def test_sft_methods_train_and_loss_goes_down(label, tiny_model, tmp_path, loaded_models):
    settings, lr = METHODS[label]
    data = write_alpaca(tmp_path / "data" / "identity.json")
    steps = 24 if settings["method"] in ("lora", "qlora") else 16  # adapters on a random tiny base learn slower
    stage = {"name": "sft", "type": "sft", **settings, "hyperparameters": {**FAST, "learningRate": lr, "maxSteps": steps}}
    doc = job_doc("t", tiny_model, [{"name": "identity", "source": str(data)}], [stage], tmp_path / "saves")
    assert run_doc(doc, tmp_path) == 0
    out = tmp_path / "saves" / "sft" / "output"
    # A low-rank adapter on a random 64-wide model moves the loss slowly but steadily (noise ~1%).
    assert_loss_went_down(out, factor=0.95 if settings["method"] in ("lora", "qlora") else 0.9)
    summary = json.loads((out / "run.json").read_text())
    assert summary["steps"] == steps and summary["tokens"] > 0 and summary["final_loss"] < summary["first_loss"]
    assert (out / "training_loss.png").stat().st_size > 5000
    if settings["method"] == "qlora":  # the model the stage loaded and trained had its base in 4 or 8 bits
        assert [load["stage"] for load in loaded_models] == ["sft"]
        assert_quantized(loaded_models[0], settings["quantization"]["bits"])
    if settings["method"] in ("lora", "qlora"):
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert cfg["r"] == settings["lora"]["rank"]
        assert cfg["use_dora"] == settings["lora"].get("useDora", False)
        assert (out / "adapter_model.safetensors").exists()
        assert not (out / "model.safetensors").exists()
    else:
        assert (out / "model.safetensors").exists()
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(out)  # a standalone model


def test_freeze_trains_only_the_chosen_layers(tiny_model):
    from transformers import AutoModelForCausalLM

    from kubetune.runtime.models import apply_freeze
    from kubetune.runtime.api.spec import FreezeSpec

    m = AutoModelForCausalLM.from_pretrained(tiny_model)
    apply_freeze(m, FreezeSpec(trainable_layers=1, trainable_modules=["mlp"]))
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("model.layers.1.mlp.") for n in trainable), trainable


def test_pretraining_on_text(tiny_model, tmp_path):
    text = tmp_path / "corpus.jsonl"
    lines = ["Kubernetes schedules pods onto nodes.", "A checkpoint stores the model, the optimizer and the step."] * 20
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    stage = {"name": "pt", "type": "pt", "method": "full", "hyperparameters": {**FAST, "learningRate": 2e-3, "batchSize": 2}}
    doc = job_doc("p", tiny_model, [{"name": "corpus", "source": str(text), "format": "text"}], [stage], tmp_path / "saves")
    assert run_doc(doc, tmp_path) == 0
    assert_loss_went_down(tmp_path / "saves" / "pt" / "output", factor=0.8)


def test_eval_split_reports_eval_loss(tiny_model, tmp_path):
    data = write_alpaca(tmp_path / "d.json", repeat=2)
    stage = {"name": "sft", "type": "sft", "method": "full",
             "hyperparameters": {**FAST, "learningRate": 2e-3, "valSize": 0.25, "evalSteps": 7}}
    doc = job_doc("e", tiny_model, [{"name": "d", "source": str(data)}], [stage], tmp_path / "saves")
    assert run_doc(doc, tmp_path) == 0
    evals = [r["eval_loss"] for r in read_log(tmp_path / "saves" / "sft" / "output") if "eval_loss" in r]
    assert len(evals) >= 2 and evals[-1] < evals[0]


def test_packed_samples_do_not_attend_to_each_other(tiny_model, tiny_tokenizer):
    """Logits of each sample inside a padding-free packed row equal its logits alone."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa").eval()
    texts = ["Who are you? I am Kubi.", "Packing puts several short samples into one sequence.", "Say hello."]
    samples = [tiny_tokenizer(t)["input_ids"] for t in texts]
    collator = DataCollatorForLanguageModeling(pad_token_id=tiny_tokenizer.pad_token_id, padding_free=True)
    batch = collator([{"input_ids": s} for s in samples])
    assert batch["input_ids"].shape[0] == 1  # one row holding all three
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        at = 0
        for s in samples:
            alone = model(input_ids=torch.tensor([s]), use_cache=False).logits[0]
            torch.testing.assert_close(packed[at : at + len(s)], alone, atol=1e-4, rtol=1e-4)
            at += len(s)
        # and the check can fail: without position ids the later samples see the earlier ones
        leaky = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
        second = slice(len(samples[0]), len(samples[0]) + len(samples[1]))
        assert not torch.allclose(leaky[second], packed[second], atol=1e-3)


def test_export_matches_base_plus_adapter(tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = write_alpaca(tmp_path / "d.json")
    stages = [
        {"name": "sft", "type": "sft", "method": "lora", "lora": {"rank": 8}, "hyperparameters": {**FAST, "maxSteps": 6, "learningRate": 5e-3}},
        {"name": "merge", "type": "export"},
    ]
    doc = job_doc("x", tiny_model, [{"name": "d", "source": str(data)}], stages, tmp_path / "saves")
    assert run_doc(doc, tmp_path) == 0
    adapter = tmp_path / "saves" / "sft" / "output"
    merged = tmp_path / "saves" / "merge" / "output"
    assert not (merged / "adapter_config.json").exists() and (merged / "model.safetensors").exists()
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_model)
        with_adapter = PeftModel.from_pretrained(base, adapter).eval()(input_ids=ids).logits
        plain_base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()(input_ids=ids).logits
        exported = AutoModelForCausalLM.from_pretrained(merged).eval()(input_ids=ids).logits
    torch.testing.assert_close(exported, with_adapter, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(exported, plain_base, atol=1e-3)  # the adapter did change something

    # `kubetune export` does the same from the command line (base read from adapter_config.json)
    import subprocess
    import sys

    cli_out = tmp_path / "cli-merged"
    r = subprocess.run([sys.executable, "-m", "kubetune.runtime", "export", "--adapter", str(adapter), "--out", str(cli_out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with torch.no_grad():
        from_cli = AutoModelForCausalLM.from_pretrained(cli_out).eval()(input_ids=ids).logits
    torch.testing.assert_close(from_cli, with_adapter, atol=1e-4, rtol=1e-4)


def test_rerun_of_a_finished_job_trains_nothing(tiny_model, tmp_path):
    data = write_alpaca(tmp_path / "d.json")
    stage = {"name": "sft", "type": "sft", "method": "full", "hyperparameters": {**FAST, "maxSteps": 4, "learningRate": 1e-3}}
    doc = job_doc("r", tiny_model, [{"name": "d", "source": str(data)}], [stage], tmp_path / "saves")
    assert run_doc(doc, tmp_path) == 0
    out = tmp_path / "saves" / "sft" / "output" / "run.json"
    before = out.stat().st_mtime_ns
    assert run_doc(doc, tmp_path) == 0
    assert out.stat().st_mtime_ns == before


def test_bad_dataset_fails_with_exit_42_and_names_the_file(tiny_model, tmp_path):
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\nnot json\n')
    stage = {"name": "sft", "type": "sft", "hyperparameters": FAST}
    doc = job_doc("b", tiny_model, [{"name": "broken", "source": str(bad)}], [stage], tmp_path / "saves")
    from kubetune.runtime.api.errors import DataError

    with pytest.raises(DataError, match=r"broken.jsonl.*line 2"):
        run_doc(doc, tmp_path)

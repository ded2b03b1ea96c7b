"""The layered merge (runtime/merge.py): a LoRA adapter merged into a base one safetensors shard at
a time gives peft's `merge_and_unload()` model, tensor by tensor, and never holds more than about
one shard of the base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kubetune.runtime.cli import main
from kubetune.runtime.api.errors import EXIT_BAD_INPUT

SHARD = "40KB"  # the tiny model in fp32 is ~330 KB: about ten shards


@pytest.fixture(scope="module")
def sharded_base(tiny_model, tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("sharded") / "base"
    AutoModelForCausalLM.from_pretrained(tiny_model).save_pretrained(out, max_shard_size=SHARD)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    assert len(list(out.glob("model-*.safetensors"))) >= 5
    return out


# peft options the merge must respect; init_lora_weights=False: random A and B, so B@A is not zero
ADAPTERS = {
    "default": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "rslora-patterns": dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
                            rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3}),
    "embedding-and-saved-head": dict(r=2, lora_alpha=4, target_modules=["embed_tokens", "o_proj"],
                                     modules_to_save=["lm_head"]),
}


def _adapter(base: Path, out: Path, **lora) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(base)
    pm = get_peft_model(m, LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **lora))
    if lora.get("modules_to_save"):  # a trained head differs from the base's
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "modules_to_save" in n:
                    p.add_(torch.randn_like(p) * 0.1)
    pm.save_pretrained(out)
    return out


def _reference(base: Path, adapter: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()


@pytest.mark.parametrize("kind", list(ADAPTERS))
def test_layered_merge_equals_peft_merge(sharded_base, tmp_path, kind):
    from transformers import AutoModelForCausalLM

    adapter = _adapter(sharded_base, tmp_path / "adapter", **ADAPTERS[kind])
    out = tmp_path / "merged"
    assert main(["export", "--adapter", str(adapter), "--model", str(sharded_base), "--out", str(out),
                 "--merge", "layered"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 5  # written shard by shard, as the base is
    assert not list(out.glob("adapter_*"))
    want = _reference(sharded_base, adapter).state_dict()
    got = AutoModelForCausalLM.from_pretrained(out)
    got_sd = got.state_dict()
    assert set(got_sd) == set(want)
    changed = 0
    for k, v in want.items():
        assert torch.allclose(got_sd[k], v, atol=1e-6, rtol=1e-5), k
        changed += not torch.equal(got_sd[k], AutoModelForCausalLM.from_pretrained(sharded_base).state_dict()[k]) \
            if k.endswith(("q_proj.weight", "embed_tokens.weight", "lm_head.weight")) else 0
    assert changed >= 1  # the adapter did change something (a zero B would make the test vacuous)
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        ref_logits = _reference(sharded_base, adapter)(ids).logits
        assert torch.allclose(got(ids).logits, ref_logits, atol=1e-5)
    assert (out / "tokenizer.json").exists() and (out / "generation_config.json").exists()


def test_layered_merge_holds_one_shard_at_a_time(sharded_base, tmp_path, monkeypatch):
    """Every tensor the merge holds comes from `safe_open` (no model is ever built: from_pretrained
    would fail here), and what it has read but not yet written never exceeds the largest shard —
    a merge that loaded the whole base first would hold all of it."""
    import safetensors
    import safetensors.torch
    import transformers

    from kubetune.runtime import merge

    adapter = _adapter(sharded_base, tmp_path / "adapter", **ADAPTERS["default"])
    held = {"now": 0, "peak": 0, "read": 0}
    real_open, real_save = safetensors.safe_open, safetensors.torch.save_file

    class Counting:
        def __init__(self, *a, **k):
            self.f = real_open(*a, **k)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def get_tensor(self, key):
            t = self.f.get_tensor(key)
            n = t.numel() * t.element_size()
            held["now"] += n
            held["read"] += n
            held["peak"] = max(held["peak"], held["now"])
            return t

    def saving(tensors, *a, **k):
        held["now"] -= sum(t.numel() * t.element_size() for t in tensors.values())
        return real_save(tensors, *a, **k)

    def no_model(*a, **k):
        raise AssertionError("the layered merge must not build the model")

    monkeypatch.setattr(safetensors, "safe_open", Counting)
    monkeypatch.setattr(safetensors.torch, "save_file", saving)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
    merge.layered_merge(adapter, sharded_base, tmp_path / "merged")
    base_bytes = sum(f.stat().st_size for f in sharded_base.glob("model-*.safetensors"))
    biggest = max(f.stat().st_size for f in sharded_base.glob("model-*.safetensors"))
    assert held["read"] > 0.9 * base_bytes  # it did read the whole base, through safe_open
    assert held["now"] == 0
    assert held["peak"] <= biggest, f"held {held['peak']} bytes at once; the largest shard is {biggest}"
    assert held["peak"] < base_bytes / 3


def test_unsupported_adapters_are_refused_or_merged_in_memory(sharded_base, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    dora = _adapter(sharded_base, tmp_path / "dora", r=2, lora_alpha=4, target_modules=["q_proj"], use_dora=True)
    assert main(["export", "--adapter", str(dora), "--model", str(sharded_base), "--out", str(tmp_path / "x"),
                 "--merge", "layered"]) == EXIT_BAD_INPUT
    assert "DoRA" in capsys.readouterr().err
    # auto: the same adapter merges in memory, the way peft does
    out = tmp_path / "auto"
    assert main(["export", "--adapter", str(dora), "--model", str(sharded_base), "--out", str(out)]) == 0
    want = _reference(sharded_base, dora).state_dict()
    got = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(torch.allclose(got[k], v, atol=1e-6) for k, v in want.items())


def test_export_stage_merges_layered(tiny_model, tmp_path):
    """A lora sft → export job: the export stage picks the layered merge for a local base and says so."""
    from tests.conftest import job_doc, run_doc, write_alpaca

    data = write_alpaca(tmp_path / "data" / "id.json")
    doc = job_doc("lm", tiny_model, [{"name": "id", "source": str(data)}],
                  [{"name": "sft", "type": "sft", "method": "lora", "lora": {"rank": 4},
                    "hyperparameters": {"maxSteps": 2, "batchSize": 2, "cutoffLen": 64, "precision": "fp32"}},
                   {"name": "merge", "type": "export"}], tmp_path / "saves")
    assert run_doc(doc, tmp_path) == 0
    out = tmp_path / "saves" / "merge" / "output"
    summary = json.loads((out / "run.json").read_text())
    assert summary["merge"] == "layered"
    want = _reference(tiny_model, tmp_path / "saves" / "sft" / "output").state_dict()
    from transformers import AutoModelForCausalLM

    got = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(torch.allclose(got[k], v, atol=1e-6) for k, v in want.items())


def test_layered_merge_casts_dtype_and_falls_back_when_the_names_differ(sharded_base, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    adapter = _adapter(sharded_base, tmp_path / "adapter", **ADAPTERS["default"])
    out = tmp_path / "bf16"
    assert main(["export", "--adapter", str(adapter), "--model", str(sharded_base), "--out", str(out),
                 "--merge", "layered", "--dtype", "bfloat16"]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    got = AutoModelForCausalLM.from_pretrained(out).state_dict()
    want = _reference(sharded_base, adapter).state_dict()
    assert all(got[k].dtype == torch.bfloat16 and torch.allclose(got[k].float(), v, rtol=1e-2, atol=1e-3)
               for k, v in want.items())
    # an adapter whose module names are not the checkpoint's: layered refuses and leaves no shard behind ...
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    save_file({k.replace("layers.1.mlp.up_proj", "layers.1.mlp.upper"): v for k, v in tensors.items()},
              str(adapter / "adapter_model.safetensors"))
    bad = tmp_path / "bad"
    assert main(["export", "--adapter", str(adapter), "--model", str(sharded_base), "--out", str(bad),
                 "--merge", "layered"]) == EXIT_BAD_INPUT
    assert "not in the base's shards" in capsys.readouterr().err
    assert not list(bad.glob("*.safetensors"))
    # ... and auto merges in memory instead
    assert main(["export", "--adapter", str(adapter), "--model", str(sharded_base), "--out", str(tmp_path / "auto")]) == 0
    AutoModelForCausalLM.from_pretrained(tmp_path / "auto")

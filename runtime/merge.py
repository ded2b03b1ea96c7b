"""Merge a LoRA adapter into its base one safetensors shard at a time (`kubetune export`, layered).

`PeftModel.from_pretrained(base).merge_and_unload()` needs the whole base in memory (and, at its
peak, more); a 70B model in bf16 is 140 GB, more than a 128 GB DGX Spark has. Here the base is
never loaded as a model: each of its safetensors shards is read with `safe_open`, every weight
that has a LoRA pair becomes W + scale·B@A (computed in fp32, cast back to the weight's dtype),
weights the adapter saved in full (`modules_to_save`) replace the base's, and the shard is written
out before the next one is read. Peak memory ≈ the largest shard + the adapter.

What peft's merge does, for the adapters peft's LoRA can merge: `r`, `lora_alpha`, `use_rslora`
(alpha/√r), `rank_pattern`/`alpha_pattern`, `fan_in_fan_out` (GPT-2's Conv1D), LoRA on embeddings
(`lora_embedding_A/B`) and `modules_to_save`. Anything else (DoRA, LoRA biases, `target_parameters`,
trainable tokens, layer replication, other peft types) is refused with the reason; the in-memory
merge (`kubetune export --merge in-memory`) handles those.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from pathlib import Path
from typing import Any

from .api.errors import UserError

log = logging.getLogger(__name__)

WHERE = "export.merge"
PEFT_PREFIX = "base_model.model."
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Files of the base that are not weights and belong in the merged folder as they are.
COPY_SUFFIXES = (".json", ".jinja", ".model", ".txt", ".py", ".tiktoken")
SKIP_FILES = {INDEX, "adapter_config.json"}


class NotLayerable(UserError):
    """This base/adapter pair cannot be merged shard by shard (the message says why)."""

    def __init__(self, message: str):
        super().__init__(message, WHERE)


def base_shards(base: str | Path) -> list[Path]:
    """The base's safetensors files in order, or NotLayerable when it has none (a hub id, .bin weights)."""
    p = Path(base)
    if not p.is_dir():
        raise NotLayerable(f"the base {str(base)!r} is not a local folder (download it first, e.g. `hf download`)")
    if (p / INDEX).exists():
        weight_map = json.loads((p / INDEX).read_text())["weight_map"]
        return [p / f for f in sorted(set(weight_map.values()))]
    if (p / SINGLE).exists():
        return [p / SINGLE]
    raise NotLayerable(f"the base {p} has no {SINGLE} or {INDEX} (only safetensors weights can be merged layer by layer)")


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's rank_pattern/alpha_pattern lookup (peft.utils.other.get_pattern_key)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def adapter_settings(adapter: str | Path) -> dict[str, Any]:
    """adapter_config.json, checked for what the layered merge supports."""
    path = Path(adapter) / "adapter_config.json"
    if not path.exists():
        raise UserError(f"{adapter} has no adapter_config.json: not a peft adapter folder", "adapter")
    cfg = json.loads(path.read_text())
    why = []
    if cfg.get("peft_type", "LORA") != "LORA":
        why.append(f"peft_type {cfg.get('peft_type')} (only LORA)")
    if cfg.get("use_dora"):
        why.append("DoRA (use_dora: the magnitude vector needs each merged weight's column norms as peft computes them)")
    for key, what in (("lora_bias", "LoRA biases"), ("target_parameters", "LoRA on parameters (target_parameters)"),
                      ("trainable_token_indices", "trainable tokens"), ("layer_replication", "layer replication"),
                      ("use_qalora", "QA-LoRA"), ("alora_invocation_tokens", "aLoRA (activated only at inference)")):
        if cfg.get(key):
            why.append(what)
    if why:
        raise NotLayerable("the adapter uses " + ", ".join(why) + ": the layered merge does not support it; "
                           "merge in memory instead (--merge in-memory)")
    return cfg


def _adapter_tensors(adapter: str | Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    path = Path(adapter) / "adapter_model.safetensors"
    if not path.exists():
        raise NotLayerable(f"{adapter} has no adapter_model.safetensors")
    return load_file(str(path))


def _plan(cfg: dict[str, Any], tensors: dict[str, Any]) -> tuple[dict[str, tuple[Any, Any, float, bool]], dict[str, Any]]:
    """{base weight key: (A, B, scale, transpose)} and {base key: replacement tensor}."""
    pairs: dict[str, dict[str, Any]] = {}
    full: dict[str, Any] = {}
    for key, t in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight|(.+)\.(lora_embedding_A|lora_embedding_B)", name)
        if m:
            module, part = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
            pairs.setdefault(module, {})[part] = t
        elif "lora_magnitude_vector" in name:
            raise NotLayerable("the adapter has DoRA magnitude vectors: merge in memory instead (--merge in-memory)")
        else:  # modules_to_save, and embeddings peft saved with their adapter (`base_layer`): in full
            full[name.replace(".base_layer.", ".")] = t
    merges: dict[str, tuple[Any, Any, float, bool]] = {}
    for module, parts in pairs.items():
        embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a = parts.get("lora_embedding_A" if embedding else "lora_A")
        b = parts.get("lora_embedding_B" if embedding else "lora_B")
        if a is None or b is None:
            raise NotLayerable(f"the adapter has only half of the LoRA pair of {module}")
        r = _pattern_value(cfg.get("rank_pattern") or {}, module, cfg["r"])
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"])
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        # Linear: ΔW = B@A (out×in); Embedding (A: r×vocab, B: hidden×r) and fan_in_fan_out (Conv1D): its transpose.
        merges[f"{module}.weight"] = (a, b, scale, embedding or bool(cfg.get("fan_in_fan_out")))
    return merges, full


def _merged(weight, lora: tuple[Any, Any, float, bool], key: str):
    a, b, scale, transpose = lora
    delta = b.float() @ a.float()
    if transpose:
        delta = delta.T
    if tuple(delta.shape) != tuple(weight.shape):
        raise NotLayerable(f"{key}: the adapter's update is {tuple(delta.shape)} but the weight is {tuple(weight.shape)} "
                           "(an adapter of another model?)")
    return (weight.float() + scale * delta).to(weight.dtype)


def layered_merge(adapter: str | Path, base: str | Path, out: str | Path, dtype: str = "auto") -> Path:
    """Write base + adapter, merged shard by shard, to `out` (weights, index, config and the base's
    other non-weight files). The tokenizer is the caller's business (see export.export_model)."""
    import torch

    cfg = adapter_settings(adapter)
    shards = base_shards(base)
    merges, full = _plan(cfg, _adapter_tensors(adapter))
    cast = None if dtype == "auto" else getattr(torch, dtype)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        weight_map, total = _merge_shards(shards, merges, full, cast, out)
    except BaseException:
        for shard in shards:  # do not leave a half-merged model that looks complete
            (out / shard.name).unlink(missing_ok=True)
        raise
    if len(shards) > 1:
        (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    for f in Path(base).iterdir():
        if f.is_file() and f.name.endswith(COPY_SUFFIXES) and f.name not in SKIP_FILES and not (out / f.name).exists():
            shutil.copy(f, out / f.name)
    if cast is not None:
        conf_path = out / "config.json"
        conf = json.loads(conf_path.read_text())
        conf["dtype"] = dtype
        if "torch_dtype" in conf:
            conf["torch_dtype"] = dtype
        conf_path.write_text(json.dumps(conf, indent=2) + "\n")
    return out


def _merge_shards(shards: list[Path], merges: dict, full: dict, cast, out: Path) -> tuple[dict[str, str], int]:
    """Each shard read, merged and written before the next; returns the weight map and total bytes."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    done: set[str] = set()
    weight_map: dict[str, str] = {}
    total = 0
    for shard in shards:
        merged: dict[str, Any] = {}
        with safe_open(str(shard), framework="pt") as f:
            metadata = f.metadata() or {}
            for key in f.keys():
                t = f.get_tensor(key)
                if key in full:
                    t = full[key].to(t.dtype)
                    done.add(key)
                if key in merges:
                    t = _merged(t, merges[key], key)
                    done.add(key)
                if cast is not None and t.is_floating_point():
                    t = t.to(cast)
                merged[key] = t
                weight_map[key] = shard.name
                total += t.numel() * t.element_size()
        save_file(merged, str(out / shard.name), metadata={**metadata, "format": "pt"})
        log.info("merged %s (%d tensors)", shard.name, len(merged))
        del merged
    missing = sorted((set(merges) | set(full)) - done)
    if missing:
        raise NotLayerable(f"{len(missing)} adapted weight(s) are not in the base's shards, e.g. {missing[0]!r} (the "
                           "checkpoint names its weights differently from the model peft adapted, or it is another "
                           "model): merge in memory instead (--merge in-memory)")
    return weight_map, total


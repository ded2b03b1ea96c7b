"""`kubetune convert` for LLaMA-Factory's second config schema ("v1", `llamafactory-cli sft|dpo|rm`).

A v1 config names the model with `model:` (a string), groups settings in plugin blocks
(`peft_config`, `quant_config`, `dist_config`, `kernel_config`, `init_config`, `optim_config`,
`lr_scheduler_config`, each with a `name`) and points `train_dataset` to a dataset YAML: one entry
per dataset with `path`, `source` (hf_hub by default, local, ms_hub), `split`, `converter`
(alpaca, sharegpt, pair; none for its own layout), `size` and `weight`.

Like the other converters, every key is either carried over or named in a warning. Nested keys are
named by their dotted path (`peft_config.r`). The helpers of `convert.py` (LoRA/freeze/QLoRA
knobs, hyperparameters, preference knobs, dataset entries) are reused by renaming v1 keys to the
LLaMA-Factory training-YAML names they share their meaning with.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from .convert import (
    _LF_NOTES,
    _LF_TEMPLATES,
    _OPTIMIZERS,
    _SCHEDULERS,
    _dataset_entries,
    _dns,
    _flat,
    _hyperparameters,
    _Keys,
    _method,
    _model,
    _num,
    _pref,
    _warn,
    drop_unhonoured,
)
from .api.errors import UserError
from .api.spec import API_GROUP, API_VERSION, KIND, TEMPLATE_NAMES

# Keys only the v1 schema has (a v0 training YAML names its model with model_name_or_path).
V1_KEYS = ("model_class", "peft_config", "quant_config", "kernel_config", "dist_config", "init_config", "optim_config",
           "lr_scheduler_config", "train_dataset", "micro_batch_size", "global_batch_size")  # not eval_dataset: v0 has it too
V1_DEFAULT_MODEL = "Qwen/Qwen3-4B-Instruct-2507"  # ModelArguments.model's default

# v1 key (dotted) → the v0 key `_method` reads. The same table turns the v0 names in its warnings back.
_METHOD_KEYS = {
    "peft_config.name": "finetuning_type", "peft_config.r": "lora_rank", "peft_config.lora_alpha": "lora_alpha",
    "peft_config.lora_dropout": "lora_dropout", "peft_config.target_modules": "lora_target",
    "peft_config.modules_to_save": "additional_target", "peft_config.use_dora": "use_dora",
    "peft_config.use_rslora": "use_rslora", "peft_config.freeze_trainable_layers": "freeze_trainable_layers",
    "peft_config.freeze_trainable_modules": "freeze_trainable_modules",
    "peft_config.freeze_extra_modules": "freeze_extra_modules", "quant_config.quantization_bit": "quantization_bit",
    "quant_config.quantization_type": "quantization_type", "quant_config.double_quantization": "double_quantization",
}
_ATTN = {"eager": "disabled", "sdpa": "sdpa", "flash_attention_2": "fa2"}  # v1 flash_attn → the v0 value `_model` reads
_FORMATS = {"alpaca": "alpaca", "sharegpt": "sharegpt", "pair": "preference", None: "messages"}
_SOURCES = {"local": "file_name", "hf_hub": "hf_hub_url", "ms_hub": "ms_hub_url"}

_V1_NOTES = {
    "kernel_config": "kernels are chosen by the runtime (PyTorch SDPA attention; see spec.model.attnImplementation)",
    "init_config": "the runtime loads the model itself (each process reads the weights)",
    "dist_config": "see resources.strategy (ddp or fsdp) and resources.fsdp",
    "optim_config": "see hyperparameters.optimizer",
    "lr_scheduler_config": "see hyperparameters.lrScheduler",
    "quant_config": "see stages[].quantization",
    "peft_config": "see stages[].method, lora and freeze",
    "custom_chat_template": "kubetune uses the tokenizer's own chat template or spec.template; put a custom Jinja "
                            "template into the model's tokenizer_config.json",
    "sample_backend": "sampling settings of `llamafactory-cli chat` do not apply to training; try `kubetune chat`",
    "max_new_tokens": "sampling settings of `llamafactory-cli chat` do not apply to training; try `kubetune chat`",
    "batching_workers": "not configurable",
    "dist_timeout": "not configurable",
    "full_determinism": "not configurable (hyperparameters.seed seeds the run)",
    "save_epochs": "checkpoints are saved every checkpoint.everySteps",
    "save_ckpt_as_hf": "checkpoints are always saved in Hugging Face format",
    "dp_size": "data parallelism spans every training process (resources.nodes × gpusPerNode)",
    "cp_size": "context parallelism is not supported",
    "cp_mode": "context parallelism is not supported",
    "mp_replicate_size": "model parallelism is not supported (resources.strategy fsdp shards the model)",
    "mp_shard_size": "model parallelism is not supported (resources.strategy fsdp shards the model)",
    "ld_alpha": "LD-DPO is not supported",
}


def is_v1(cfg: dict[str, Any]) -> bool:
    """A LLaMA-Factory v1 config: `model` is a string, or a key only v1 has is present."""
    if "model_name_or_path" in cfg:
        return False
    return isinstance(cfg.get("model"), str) or any(key in cfg for key in V1_KEYS)


def is_v1_export(cfg: dict[str, Any]) -> bool:
    """`llamafactory-cli merge`'s YAML: an adapter and an export_dir in peft_config, no data."""
    peft = cfg.get("peft_config")
    return isinstance(peft, dict) and "export_dir" in peft and "train_dataset" not in cfg


def _rename_back(text: str, table: dict[str, str]) -> str:
    for v1_key, v0_key in table.items():
        text = re.sub(rf"(?<![\w.]){re.escape(v0_key)}(?!\w)", v1_key, text)
    return text


def _v1_method(k: _Keys, warnings: list[str]) -> tuple[str, dict[str, Any]]:
    """peft_config + quant_config through convert.py's `_method` (the v0 knobs of the same meaning)."""
    v0: dict[str, Any] = {}
    for v1_key, v0_key in _METHOD_KEYS.items():
        if k.has(v1_key):
            v0[v0_key] = k.get(v1_key)
    v0.setdefault("finetuning_type", "full")  # no peft_config: v1 trains every weight
    if v0["finetuning_type"] == "lora":
        v0.setdefault("lora_dropout", 0.05)  # LoraParams' default (ours is 0)
    quant = str(k.get("quant_config.name", "")) if k.has("quant_config.name") else None
    if quant is not None:
        if quant not in ("bnb", "auto"):
            warnings.append(f"quant_config.name: {quant!r} not carried over — kubetune quantises with bitsandbytes")
        elif quant == "bnb":
            v0.setdefault("quantization_bit", 4)  # the bnb plugin's own default
    for key in ("quant_config.compute_dtype",):
        if k.has(key):
            _warn(warnings, key, "the runtime computes in the training precision (hyperparameters.precision)")
            k.take(key)
    mine: list[str] = []
    method, block = _method(_Keys(v0), mine)
    warnings += [_rename_back(w, _METHOD_KEYS) for w in mine]
    return method, block


def _v1_stage(k: _Keys, datasets: dict[str, Any], warnings: list[str]) -> str:
    """v1 takes the stage from the command (`llamafactory-cli sft|dpo|rm`), not from the config."""
    mc = str(k.get("model_class", "llm"))
    pairs = [n for n, e in datasets.items() if isinstance(e, dict) and e.get("converter") == "pair"]
    if mc == "cls":
        stage, why = "rm", "model_class is cls (a reward model)"
    elif mc == "llm":
        stage, why = ("dpo", f"dataset {pairs[0]!r} uses the pair converter") if pairs else ("sft", "no dataset uses the pair converter")
    else:
        raise UserError(f"model_class: {mc!r} is not supported — llm (causal LM: sft, dpo) or cls (reward model: rm)",
                        "model_class")
    warnings.append(f"stage: converted as {stage} ({why}); a v1 config does not name its stage (the command does: "
                    "llamafactory-cli sft|dpo|rm) — check stages[0].type")
    return stage


def _find(given: str, bases: list[Path]) -> tuple[str, Path | None]:
    """A relative path as LLaMA-Factory reads it (from the working directory), else from `bases`.
    Returns the text to write (as given when found from the working directory) and the file found."""
    p = Path(given).expanduser()
    if p.is_absolute():
        return given, p if p.exists() else None
    if p.exists():
        return given, p
    for base in bases:
        if (base / p).exists():
            return str((base / p).resolve()), base / p
    return given, None


def _read_dataset_yaml(value: str, key: str, source_dir: Path) -> tuple[dict[str, Any], Path | None]:
    """train_dataset: a dataset YAML, a local file or folder, or a Hugging Face dataset id (DataEngine's rules)."""
    text, found = _find(value, [source_dir])
    if value.endswith((".yaml", ".yml")):
        if found is None:
            raise UserError(f"{key}: dataset YAML {value!r} not found (looked in the working directory and in "
                            f"{source_dir}); a dataset YAML on the Hugging Face Hub is not downloaded — fetch it "
                            "and point the config to the local copy", key)
        try:
            entries = yaml.safe_load(found.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as err:
            raise UserError(f"{key}: cannot read {found}: {err}", key) from None
        if not isinstance(entries, dict) or not entries or not all(isinstance(e, dict) for e in entries.values()):
            raise UserError(f"{key}: {found} must map each dataset name to {{path, source, converter, size, ...}}", key)
        return entries, found.parent
    if found is not None:
        return {"default": {"path": text, "source": "local"}}, None
    return {"default": {"path": value}}, None


def _v1_datasets(k: _Keys, source_dir: Path, stage: str, entries: dict[str, Any], yaml_dir: Path | None,
                 warnings: list[str]) -> list[dict[str, Any]]:
    """The dataset YAML's entries → spec.data, through convert.py's dataset_info mapping."""
    key = "train_dataset"
    info: dict[str, Any] = {}
    formats: dict[str, str] = {}
    for name, e in entries.items():
        e = dict(e)
        where = f"{key} {name!r}"
        if "path" not in e:
            raise UserError(f"{where}: `path` is required", key)
        source = str(e.pop("source", "hf_hub"))
        if source not in _SOURCES:
            raise UserError(f"{where}: unknown source {source!r} (hf_hub, local, ms_hub)", key)
        path = str(e.pop("path"))
        if source == "local":
            path, found = _find(path, [b for b in (source_dir, yaml_dir) if b is not None])
            if found is None:
                warnings.append(f"{where}: local file {path!r} not found; source written as given")
        converter = e.pop("converter", None)
        if converter not in _FORMATS:
            raise UserError(f"{where}: unknown converter {converter!r} (alpaca, sharegpt, pair, or none)", key)
        formats[str(name)] = _FORMATS[converter]
        if converter is None:
            warnings.append(f"{where}: no converter — records in LLaMA-Factory v1's own layout (content as a list "
                            "of {type, value} blocks, loss_weight) are not read as such: kubetune's `messages` format "
                            "takes OpenAI role/content strings — check spec.data")
        size = e.pop("size", None)
        if size:
            warnings.append(f"{where}: size {size} carried over as maxSamples (the first {size} records; "
                            f"LLaMA-Factory v1 draws {size} at random, with replacement)")
        for gone, why in (("weight", "datasets are concatenated"), ("streaming", "datasets are read in full")):
            if gone in e:
                warnings.append(f"{where}: {gone} ({e.pop(gone)!r}) not carried over — {why}")
        formatting = converter if converter in ("alpaca", "sharegpt") else "alpaca"  # others: set below
        info[str(name)] = {_SOURCES[source]: path, "formatting": formatting,
                           **({"num_samples": int(_num(size))} if size else {}), **e}
    data = _dataset_entries(list(info), k, source_dir, None, stage, warnings, key, info=info)
    for name, ds in zip(info, data):
        ds["format"] = formats[name]
    return data


def _v1_hyperparameters(k: _Keys, warnings: list[str]) -> dict[str, Any]:
    hp = _hyperparameters(k, warnings)  # learning_rate, num_train_epochs, cutoff_len, max_steps, seed, bf16 …
    if k.cfg.get("bf16") is False:
        hp["precision"] = "fp32"
    micro = int(_num(k.get("micro_batch_size", 1)))
    hp["batchSize"] = micro
    gbs = k.get("global_batch_size")
    hp["gradientAccumulation"] = max(1, int(_num(gbs)) // micro) if gbs else 1  # v1: no accumulation by default
    if gbs:
        warnings.append(f"global_batch_size: {gbs} carried over as gradientAccumulation {hp['gradientAccumulation']} "
                        "on one GPU; divide it by the GPU count for more GPUs")
    if k.has("enable_activation_checkpointing"):
        hp["gradientCheckpointing"] = bool(k.get("enable_activation_checkpointing"))
    strategy = str(k.get("batching_strategy", "normal"))
    if strategy in ("padding_free", "dynamic_padding_free"):
        hp["packing"] = True
        if strategy == "dynamic_padding_free":
            warnings.append("batching_strategy: dynamic_padding_free carried over as packing (padding-free); "
                            "batches are not sized by tokens")
    elif strategy != "normal":
        warnings.append(f"batching_strategy: {strategy!r} not carried over — batches hold batchSize samples")
    sched = k.get("lr_scheduler_config.name")
    if sched is None:
        hp["lrScheduler"] = "constant"  # v1 keeps the learning rate constant without lr_scheduler_config
    elif sched in _SCHEDULERS:
        hp["lrScheduler"] = str(sched)
    else:
        warnings.append(f"lr_scheduler_config.name: {sched!r} not carried over ({', '.join(sorted(_SCHEDULERS))}); "
                        "using cosine")
    opt = k.get("optim_config.name")
    if opt in _OPTIMIZERS:
        hp["optimizer"] = _OPTIMIZERS[opt]
    elif opt is not None:
        warnings.append(f"optim_config.name: {opt!r} not carried over ({', '.join(sorted(set(_OPTIMIZERS.values())))}); "
                        "using the default (AdamW)")
    return hp


def _v1_resources(k: _Keys, warnings: list[str]) -> dict[str, Any]:
    name = k.get("dist_config.name")
    if name is None:
        return {}
    if name in ("fsdp2", "fsdpturbo"):
        res: dict[str, Any] = {"strategy": "fsdp"}
        fsdp: dict[str, Any] = {}
        if k.has("dist_config.reshard_after_forward"):
            fsdp["sharding"] = "full_shard" if k.get("dist_config.reshard_after_forward") else "shard_grad_op"
        if k.has("dist_config.offload_params"):
            fsdp["cpuOffload"] = bool(k.get("dist_config.offload_params"))
        if fsdp:
            res["fsdp"] = fsdp
        warnings.append(f"dist_config.name: {name} carried over as resources.strategy: fsdp; LLaMA-Factory v1 trains "
                        "on every visible GPU — set resources.gpusPerNode (and nodes) to the GPUs to use")
        for sub in ("ep_size", "ep_dispatcher", "fsdp_ignored_modules", "hook_modules", "fsdp_implementation"):
            if k.has(f"dist_config.{sub}"):
                _warn(warnings, f"dist_config.{sub}", "expert parallelism is not supported")
                k.take(f"dist_config.{sub}")
        for sub in ("pin_memory", "dcp_path"):
            if k.has(f"dist_config.{sub}"):
                _warn(warnings, f"dist_config.{sub}", "the runtime loads Hugging Face weights and pins memory itself")
                k.take(f"dist_config.{sub}")
        return res
    if name == "deepspeed":
        _warn(warnings, "dist_config.name", "DeepSpeed is not used; set resources.strategy: fsdp (and "
              "resources.gpusPerNode) to shard")
        if k.has("dist_config.config_file"):
            _warn(warnings, "dist_config.config_file", f"{k.get('dist_config.config_file')!r} is a DeepSpeed config")
        return {}
    _warn(warnings, "dist_config.name", f"{name!r} is not supported; see resources.strategy (ddp or fsdp)")
    return {}


def _v1_kernels(k: _Keys, warnings: list[str]) -> None:
    for sub in [key for key in k.cfg if key.startswith("kernel_config.")]:
        value = k.get(sub)
        if value is None:
            continue
        if sub == "kernel_config.name" and "liger" in str(value):
            _warn(warnings, sub, f"{value!r}: Liger kernels are not configurable yet")
        else:
            _warn(warnings, sub, f"{value!r}: {_V1_NOTES['kernel_config']}")


def convert_v1(cfg: dict[str, Any], source_dir: Path, warnings: list[str] | None = None,
               name: str | None = None) -> dict[str, Any]:
    """A LLaMA-Factory v1 training config (as a mapping) → a FineTuneJob document."""
    warnings = [] if warnings is None else warnings
    k = _Keys(_flat(cfg))
    if not k.has("model"):
        warnings.append(f"model: not set — LLaMA-Factory v1's default {V1_DEFAULT_MODEL} written as spec.model.name")
        k.cfg["model"] = V1_DEFAULT_MODEL
    if k.has("flash_attn"):
        fa = str(k.cfg["flash_attn"])
        k.cfg["flash_attn"] = _ATTN.get(fa, fa)
    model = _model(k, warnings, name_key="model")
    if not k.has("train_dataset"):
        raise UserError("train_dataset is required (a dataset YAML, a local file or a Hugging Face dataset id)",
                        "train_dataset")
    entries, yaml_dir = _read_dataset_yaml(str(k.get("train_dataset")), "train_dataset", source_dir)
    stage = _v1_stage(k, entries, warnings)
    method, blocks = _v1_method(k, warnings)
    hp = _v1_hyperparameters(k, warnings)
    stage, pref = _pref(k, stage, warnings)
    drop_unhonoured(hp, stage, warnings)
    st: dict[str, Any] = {"name": stage, "type": stage, "method": method, **blocks, "hyperparameters": hp}
    if pref:
        st["preference"] = pref
    if k.has("peft_config.adapter_name_or_path"):
        _warn(warnings, "peft_config.adapter_name_or_path", "a stage cannot start from an existing adapter; merge it "
              "first (`kubetune export`) and use the merged model as spec.model.name")
        k.take("peft_config.adapter_name_or_path")
    data = _v1_datasets(k, source_dir, stage, entries, yaml_dir, warnings)
    if k.has("eval_dataset"):
        _warn(warnings, "eval_dataset", f"{k.get('eval_dataset')!r}: kubetune evaluates on a held-out share of the "
              "training data (hyperparameters.valSize)")
    spec: dict[str, Any] = {"model": model, "data": data}
    if k.has("template"):
        t = _LF_TEMPLATES.get(str(k.cfg["template"]))
        if t in TEMPLATE_NAMES:
            spec["template"] = t
            k.take("template")
    spec["stages"] = [st]
    res = _v1_resources(k, warnings)
    if res:
        spec["resources"] = res
    _v1_kernels(k, warnings)
    out_dir = k.get("output_dir")
    if out_dir:
        spec["storage"] = {"uri": str(out_dir)}
    ck = {field: max(1, int(_num(k.get(key)))) for key, field in (("save_steps", "everySteps"),
                                                                   ("save_total_limit", "keep")) if k.has(key)}
    if ck:
        spec["checkpoint"] = ck
    for key in k.leftover():
        if k.cfg[key] is None:
            continue  # `quant_config: null`, `dcp_path: null`: the default, nothing to carry
        top = key.split(".", 1)[0]
        why = _V1_NOTES.get(key) or _V1_NOTES.get(top) or _LF_NOTES.get(key) or "unknown or unsupported LLaMA-Factory v1 key"
        _warn(warnings, key, why)
    tail = "-".join(Path(str(out_dir)).parts[-3:]) if out_dir else ""
    jobname = _dns(name or tail or f"{os.path.basename(str(model['name']))}-{stage}-{method}")
    return {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND, "metadata": {"name": jobname}, "spec": spec}


def v1_export_as_v0(cfg: dict[str, Any]) -> dict[str, Any]:
    """A v1 merge YAML in the key names of a v0 export YAML (for convert.py's `add_export_stage`)."""
    out = {("model_name_or_path" if key == "model" else key): v for key, v in cfg.items() if key != "peft_config"}
    peft = dict(cfg.get("peft_config") or {})
    out["finetuning_type"] = peft.pop("name", "lora")
    return {**out, **peft}


__all__ = ["convert_v1", "is_v1", "is_v1_export", "v1_export_as_v0", "V1_KEYS"]

"""`kubetune convert`: LLaMA-Factory and NeMo AutoModel configs → a FineTuneJob.

Every key of the source file is either carried over to its FineTuneJob field or reported in a
warning that says why it was not (never silently dropped). Warnings go to stderr and, as YAML
comments, to the top of the written file.

Sources understood:
- LLaMA-Factory training YAML (`llamafactory-cli train`): stage, finetuning_type, model, dataset
  (+ dataset_dir/dataset_info.json), LoRA/QLoRA/freeze knobs, hyperparameters, pref_* keys.
- LLaMA-Factory export YAML (`llamafactory-cli export`: adapter_name_or_path + export_dir), given
  after the training YAML it merges → one job with the training stage(s) and an `export` stage.
- LLaMA-Factory v1 config (`llamafactory-cli sft|dpo|rm`: model, peft_config, dist_config, train_dataset
  → a dataset YAML …): see convert_v1.py; its merge YAML may follow it like an export YAML.
- NeMo AutoModel fine-tuning recipe (model.pretrained_model_name_or_path, step_scheduler, peft,
  optimizer, lr_scheduler, dataset, checkpoint, quantization …).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

from .api.errors import UserError
from .api.spec import API_GROUP, API_VERSION, KIND, LR_SCHEDULERS, NAMED_OPTIMIZERS, TEMPLATE_NAMES, parse_job
from .api.stage_types import DPO_LABEL_SMOOTHING_LOSSES, DPO_LOSS_TYPES, GATED_HYPERPARAMETERS, STAGE_TYPES

# LLaMA-Factory keys with no kubetune counterpart, and why (anything else unknown gets a generic line).
_LF_NOTES = {
    "do_train": "kubetune always trains a training stage",
    "do_eval": "evaluation runs when the job has evalData (eval_dataset) or hyperparameters.valSize > 0",
    "do_predict": "predict mode is an eval stage (with eval_dataset) or `kubetune eval`; see docs/evaluation.md",
    "overwrite_output_dir": "kubetune resumes from the last committed checkpoint instead of overwriting",
    "overwrite_cache": "kubetune has no preprocessing cache to overwrite",
    "plot_loss": "kubetune always writes training_loss.png and trainer_log.jsonl",
    "logging_dir": "TensorBoard event files go to the stage output's runs/ folder",
    "preprocessing_num_workers": "not configurable",
    "dataloader_num_workers": "not configurable",
    "ddp_timeout": "not configurable",
    "ddp_backend": "the runtime picks nccl on GPUs, gloo on CPU",
    "deepspeed": "DeepSpeed is not used; set resources.strategy: fsdp (and resources.gpusPerNode) to shard",
    "fsdp": "set resources.strategy: fsdp",
    "per_device_eval_batch_size": "evaluation uses the training batch size",
    "eval_strategy": "evaluation runs every hyperparameters.evalSteps (or each epoch) when there is evalData or "
                     "valSize > 0",
    "evaluation_strategy": "evaluation runs every hyperparameters.evalSteps (or each epoch) when there is evalData or "
                           "valSize > 0",
    "save_strategy": "checkpoints are saved every checkpoint.everySteps",
    "resume_from_checkpoint": "kubetune resumes from its own LATEST checkpoint automatically",
    "hf_hub_token": "never put tokens in a spec: create a Secret and set spec.model.tokenSecretRef",
    "cache_dir": "the runtime caches under its scratch volume (HF_HOME)",
    "flash_attn": "see spec.model.attnImplementation",
    "use_unsloth": "Unsloth is not used",
    "enable_liger_kernel": "Liger kernels are not configurable yet",
    "infer_backend": "inference settings do not apply to training",
}


def _warn(warnings: list[str], key: str, why: str) -> None:
    warnings.append(f"{key}: not carried over — {why}")


def _not_carried(k: "_Keys", keys, why: str, warnings: list[str]) -> None:
    """Keys that do not apply here: used up (so they are not reported as unknown), each with a warning."""
    for key in keys:
        if k.has(key):
            k.take(key)
            _warn(warnings, key, why)


def _dns(name: str, limit: int = 63) -> str:
    s = re.sub(r"[^a-z0-9-]+", "-", str(name).lower()).strip("-")[:limit].strip("-")
    return s or "x"


def _split_list(value: Any) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [v.strip() for v in str(value).split(",") if v.strip()]


def _num(value: Any) -> Any:
    """YAML reads `1e-4` as a string; LLaMA-Factory accepts it. So do we."""
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            try:
                return float(value)
            except ValueError:
                return value
    return value


class _Keys:
    """The source mapping with a record of which keys were used."""

    def __init__(self, cfg: dict[str, Any]):
        self.cfg = cfg
        self.used: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self.cfg and self.cfg[key] is not None

    def get(self, key: str, default: Any = None) -> Any:
        if key in self.cfg:
            self.used.add(key)
            v = self.cfg[key]
            return default if v is None else v
        return default

    def take(self, key: str) -> Any:
        return self.get(key)

    def leftover(self) -> list[str]:
        return [k for k in self.cfg if k not in self.used]


# ------------------------------------------------------------------------------ LLaMA-Factory


_LF_TEMPLATES = {"llama3": "llama3", "qwen": "qwen", "qwen2_vl": "qwen", "gemma": "gemma", "gemma2": "gemma",
                 "mistral": "mistral", "phi": "phi3", "phi3": "phi3", "alpaca": "alpaca", "chatml": "chatml",
                 "chatml_de": "chatml"}
# a cosine_with_min_lr schedule needs minLr, which LLaMA-Factory's lr_scheduler_type alone does not give
_SCHEDULERS = set(LR_SCHEDULERS) - {"cosine_with_min_lr"}
# LLaMA-Factory's `optim` (transformers' names) → ours: the ones transformers builds from a name, and its aliases
_OPTIMIZERS = {**{o: o for o in NAMED_OPTIMIZERS}, "adamw_hf": "adamw_torch", "adamw_bnb_8bit": "adamw_8bit"}
_LF_STAGES = ("pt", "sft", "rm", "dpo", "kto", "ppo")  # LLaMA-Factory's stages, each one of our stage types
_LF_COLUMNS = {"prompt", "query", "response", "history", "messages", "system", "tools", "chosen", "rejected", "kto_tag"}
_LF_TAGS = {"role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag"}
_CAMEL = {"role_tag": "roleTag", "content_tag": "contentTag", "user_tag": "userTag", "assistant_tag": "assistantTag",
          "observation_tag": "observationTag", "function_tag": "functionTag", "system_tag": "systemTag"}


# LLaMA-Factory key → our field (and the cast), one table per block of the FineTuneJob; the
# conversion reads them, and so does the board's form (`llamafactory_names`).
_LF_HYPERPARAMETERS = {
    "learning_rate": ("learningRate", float), "num_train_epochs": ("epochs", float),
    "per_device_train_batch_size": ("batchSize", int), "gradient_accumulation_steps": ("gradientAccumulation", int),
    "cutoff_len": ("cutoffLen", int), "warmup_ratio": ("warmupRatio", float), "warmup_steps": ("warmupSteps", int),
    "weight_decay": ("weightDecay", float), "max_grad_norm": ("maxGradNorm", float), "seed": ("seed", int),
    "logging_steps": ("loggingSteps", int), "val_size": ("valSize", float), "eval_steps": ("evalSteps", int),
    "neftune_noise_alpha": ("neftuneAlpha", float)}
_LF_ADAM = {"adam_beta1": "adamBeta1", "adam_beta2": "adamBeta2", "adam_epsilon": "adamEpsilon"}
_LF_LORA = {"lora_rank": ("rank", int), "lora_alpha": ("alpha", int), "lora_dropout": ("dropout", float),
            "lora_target": ("target", list), "additional_target": ("modulesToSave", list),
            "loraplus_lr_ratio": ("loraplusLrRatio", float)}
_LF_LORA_SWITCHES = {"use_dora": ("useDora", True), "use_rslora": ("useRslora", True), "pissa_init": ("init", "pissa")}
_LF_FREEZE = {"freeze_trainable_layers": "trainableLayers", "freeze_trainable_modules": "trainableModules",
              "freeze_extra_modules": "extraModules"}
_LF_PREF = {"pref_beta": "beta", "pref_ftx": "ftx", "dpo_label_smoothing": "labelSmoothing", "simpo_gamma": "simpoGamma",
            "kto_chosen_weight": "desirableWeight", "kto_rejected_weight": "undesirableWeight"}
_LF_CHECKPOINT = {"save_steps": "everySteps", "save_total_limit": "keep"}


def _find_dataset_dir(k: _Keys, source_dir: Path, dataset_dir: str | None) -> tuple[str, Path | None]:
    """The dataset_dir string to write paths with, and the folder where dataset_info.json lives."""
    given = dataset_dir or k.get("dataset_dir", "data")
    for base in (Path.cwd(), source_dir):
        cand = Path(given).expanduser()
        cand = cand if cand.is_absolute() else base / cand
        if (cand / "dataset_info.json").is_file():
            text = given if (base == Path.cwd() or Path(given).is_absolute()) else str(cand.resolve())
            return text, cand
    return given, None


def _dataset_entries(names: list[str], k: _Keys, source_dir: Path, dataset_dir: str | None, stage: str,
                     warnings: list[str], key: str, info: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """`info`: the dataset_info entries themselves (then their paths are used as written)."""
    if info is None:
        dd_text, dd = _find_dataset_dir(k, source_dir, dataset_dir)
        info = {}
        if dd is not None:
            try:
                info = json.loads((dd / "dataset_info.json").read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as err:
                raise UserError(f"cannot read {dd / 'dataset_info.json'}: {err}", "dataset_dir") from None
    else:
        dd_text, dd = "", source_dir
    max_samples = _num(k.get("max_samples"))
    out, seen = [], set()
    for name in names:
        ds: dict[str, Any] = {"name": _dns(name)}
        n = 2
        while ds["name"] in seen:
            ds["name"] = _dns(f"{name}-{n}")
            n += 1
        seen.add(ds["name"])
        entry = info.get(name)
        where = f"{key} {name!r}"
        if entry is None:
            if dd is None:
                warnings.append(f"{where}: dataset_info.json not found in {dd_text!r} (pass --dataset-dir); "
                                "source set to the dataset name — check spec.data")
            else:
                warnings.append(f"{where}: no entry in {dd / 'dataset_info.json'}; source set to the dataset name")
            ds["source"] = name if "/" in name else os.path.join(dd_text, name)
            ds["format"] = "text" if stage == "pt" else "alpaca"
            if max_samples:
                ds["maxSamples"] = int(max_samples)
            out.append(ds)
            continue
        e = dict(entry)
        if e.get("file_name"):
            ds["source"] = os.path.join(dd_text, e.pop("file_name"))
        elif e.get("hf_hub_url"):
            ds["source"] = "hf://" + e.pop("hf_hub_url")
        elif e.get("cloud_file_name"):
            ds["source"] = e.pop("cloud_file_name")
        else:
            src = e.get("ms_hub_url") or e.get("om_hub_url") or e.get("script_url") or name
            warnings.append(f"{where}: only a ModelScope/Modelers/script source; source set to {src!r} — point it to a file, s3:// or hf://")
            ds["source"] = src
        for gone in ("ms_hub_url", "om_hub_url", "script_url", "hf_hub_url", "cloud_file_name"):
            if gone in e:
                e.pop(gone)
        formatting = e.pop("formatting", "alpaca")
        ranking = bool(e.pop("ranking", False))
        columns = dict(e.pop("columns", None) or {})
        tags = dict(e.pop("tags", None) or {})
        if formatting == "openai":
            formatting = "sharegpt"
            tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                    "observation_tag": "tool", "function_tag": "function_call", "system_tag": "system", **tags}
        if stage == "pt":
            ds["format"] = "text"
            col = columns.pop("prompt", None) or columns.pop("text", None) or "text"
            if col != "text":
                ds["columns"] = {"text": col}
        elif formatting in ("alpaca", "sharegpt"):
            ds["format"] = formatting
            if ranking:
                ds["ranking"] = True
            cols = {}
            for role, col in columns.items():
                if role in _LF_COLUMNS:
                    cols[role] = col
                else:
                    warnings.append(f"{where}: column {role!r} ({col!r}) not carried over — multimodal and other "
                                    "columns are not supported")
            if cols:
                ds["columns"] = cols
            tg = {}
            for t, v in tags.items():
                if t in _LF_TAGS:
                    tg[_CAMEL[t]] = v
                else:
                    warnings.append(f"{where}: tag {t!r} not carried over — unknown tag")
            if tg and formatting == "sharegpt":
                ds["tags"] = tg
        else:
            raise UserError(f"dataset {name!r}: unknown formatting {formatting!r} (alpaca, sharegpt or openai)", "dataset_info.json")
        if "split" in e:
            ds["split"] = str(e.pop("split"))
        num = e.pop("num_samples", None)
        if num or max_samples:
            ds["maxSamples"] = int(min(x for x in (num, max_samples) if x))
        for rest, v in e.items():
            warnings.append(f"{where}: dataset_info key {rest!r} ({v!r}) not carried over — not supported")
        out.append(ds)
    return out


def _method(k: _Keys, warnings: list[str]) -> tuple[str, dict[str, Any]]:
    """method plus the lora/quantization/freeze blocks of the stage."""
    ft = str(k.get("finetuning_type", "lora"))
    block: dict[str, Any] = {}
    if ft not in ("lora", "full", "freeze"):
        warnings.append(f"finetuning_type: {ft!r} is not supported (lora, full, freeze); converted as lora")
        ft = "lora"
    bits = k.get("quantization_bit")
    qmethod = k.get("quantization_method", "bnb") or "bnb"
    if qmethod != "bnb":
        warnings.append(f"quantization_method: {qmethod!r} not carried over — kubetune quantises with bitsandbytes")
    if bits is not None:
        bits = int(_num(bits))
        if bits not in (4, 8):
            warnings.append(f"quantization_bit: {bits} is not supported (4 or 8); using 4")
            bits = 4
        if ft != "lora":
            warnings.append(f"quantization_bit: ignored for finetuning_type {ft} (LLaMA-Factory quantises only for LoRA)")
        else:
            q: dict[str, Any] = {"bits": bits}
            qt = k.get("quantization_type")
            if qt is not None:
                if qt in ("nf4", "fp4"):
                    q["type"] = qt
                else:
                    warnings.append(f"quantization_type: {qt!r} not carried over (nf4 or fp4)")
            if k.has("double_quantization"):
                q["doubleQuantization"] = bool(k.get("double_quantization"))
            block["quantization"] = q
            ft = "qlora"
    else:
        _not_carried(k, ("quantization_type", "double_quantization"), "no quantization_bit set", warnings)
    lora_keys = (*_LF_LORA, *_LF_LORA_SWITCHES)
    if ft in ("lora", "qlora"):
        lora: dict[str, Any] = _sub_keys(k, _LF_LORA)
        for key, (field, value) in _LF_LORA_SWITCHES.items():
            if k.get(key):
                lora[field] = value
        if lora:
            block["lora"] = lora
    else:
        _not_carried(k, lora_keys, f"finetuning_type is {ft}, not lora", warnings)
    freeze_keys = _LF_FREEZE
    if ft == "freeze":
        fr: dict[str, Any] = {}
        for key, field in freeze_keys.items():
            if k.has(key):
                v = k.get(key)
                fr[field] = int(_num(v)) if field == "trainableLayers" else _split_list(v)
        if fr:
            block["freeze"] = fr
    else:
        _not_carried(k, freeze_keys, f"finetuning_type is {ft}, not freeze", warnings)
    return ft, block


def _hyperparameters(k: _Keys, warnings: list[str]) -> dict[str, Any]:
    hp: dict[str, Any] = {}
    for key, (field, cast) in _LF_HYPERPARAMETERS.items():
        if k.has(key):
            hp[field] = cast(_num(k.get(key)))
    if k.has("max_steps"):
        ms = int(_num(k.get("max_steps")))
        if ms > 0:
            hp["maxSteps"] = ms
    if k.has("packing") or k.has("neat_packing"):
        packing, neat = k.get("packing"), k.get("neat_packing")
        hp["packing"] = bool(packing or neat)
    if k.has("lr_scheduler_type"):
        s = str(k.get("lr_scheduler_type"))
        if s in _SCHEDULERS:
            hp["lrScheduler"] = s
        else:
            warnings.append(f"lr_scheduler_type: {s!r} not carried over ({', '.join(sorted(_SCHEDULERS))}); using cosine")
    if k.has("optim"):
        o = str(k.get("optim"))
        if o in _OPTIMIZERS:
            hp["optimizer"] = _OPTIMIZERS[o]
        else:
            warnings.append(f"optim: {o!r} not carried over ({', '.join(sorted(set(_OPTIMIZERS.values())))}); using the default")
    bf16, fp16, pure = k.get("bf16"), k.get("fp16"), k.get("pure_bf16")
    if bf16 or pure:
        hp["precision"] = "bf16"
    elif fp16:
        hp["precision"] = "fp16"
    if k.has("disable_gradient_checkpointing"):
        hp["gradientCheckpointing"] = not bool(k.get("disable_gradient_checkpointing"))
    if k.has("gradient_checkpointing"):
        hp["gradientCheckpointing"] = bool(k.get("gradient_checkpointing"))
    _optimizer(k, hp, warnings)
    return hp


# LLaMA-Factory's GaLore picks its class from `optim` (LLaMA-Factory trainer_utils): AdamW, 8-bit AdamW, Adafactor.
_GALORE_BY_OPTIM = {"adamw_torch": "galore_adamw", "adamw_torch_fused": "galore_adamw", "adamw_8bit": "galore_adamw_8bit",
                    "paged_adamw_8bit": "galore_adamw_8bit", "adafactor": "galore_adafactor"}
# use_* switch → what it becomes, and its LLaMA-Factory sub-keys → (our field, cast)
_LF_GALORE = {"galore_rank": ("rank", int), "galore_update_interval": ("updateInterval", int),
              "galore_scale": ("scale", float), "galore_proj_type": ("projType", str), "galore_target": ("target", list),
              "galore_layerwise": ("layerwise", bool)}
_LF_APOLLO = {"apollo_rank": ("rank", int), "apollo_update_interval": ("updateInterval", int),
              "apollo_scale": ("scale", float), "apollo_proj": ("proj", str), "apollo_proj_type": ("projType", str),
              "apollo_scale_type": ("scaleType", str), "apollo_target": ("target", list),
              "apollo_layerwise": ("layerwise", bool)}
_LF_BADAM = {"badam_start_block": ("startBlock", int), "badam_switch_mode": ("switchMode", str),
             "badam_switch_interval": ("switchInterval", int)}


def _sub_keys(k: _Keys, table: dict[str, tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, (field, cast) in table.items():
        if k.has(key):
            v = k.get(key)
            out[field] = _split_list(v) if cast is list else bool(v) if cast is bool else cast(_num(v))
    return out


def _adamw_base(base: str | None, why: str, warnings: list[str]) -> None:
    """APOLLO and BAdam run AdamW: another `optim` is not carried over."""
    if base and base not in ("adamw_torch", "adamw_torch_fused"):
        warnings.append(f"optim: {base!r} not carried over — {why}")


def _optimizer(k: _Keys, hp: dict[str, Any], warnings: list[str]) -> None:
    """Adam betas/epsilon and LLaMA-Factory's use_galore / use_apollo / use_badam / use_adam_mini / use_muon."""
    for key, field in _LF_ADAM.items():
        if k.has(key):
            hp[field] = float(_num(k.get(key)))
    chosen = [key for key in ("use_galore", "use_apollo", "use_badam", "use_adam_mini", "use_muon") if k.get(key)]
    for key in chosen[1:]:
        warnings.append(f"{key}: not carried over — {chosen[0]} is set too, and a stage has one optimizer")
    use = chosen[0] if chosen else None
    base = hp.get("optimizer")
    if use == "use_galore":
        hp["optimizer"] = _GALORE_BY_OPTIM.get(base or "adamw_torch", "galore_adamw")
        if base and base not in _GALORE_BY_OPTIM:
            warnings.append(f"optim: {base!r} has no GaLore variant; using galore_adamw")
        if galore := _sub_keys(k, _LF_GALORE):
            hp["galore"] = galore
    elif use == "use_apollo":
        hp["optimizer"] = "apollo_adamw"
        _adamw_base(base, "APOLLO is an AdamW", warnings)
        if apollo := _sub_keys(k, _LF_APOLLO):
            hp["apollo"] = apollo
    elif use == "use_badam":
        hp["optimizer"] = "badam"
        _adamw_base(base, "kubetune's BAdam runs AdamW on each block", warnings)
        badam = _sub_keys(k, _LF_BADAM)
        if badam.get("switchInterval", 1) < 1:  # LLaMA-Factory: -1 never switches blocks
            del badam["switchInterval"]
            badam["switchMode"] = "fixed"
        mode = str(k.get("badam_mode", "layer"))
        if mode != "layer":
            warnings.append(f"badam_mode: {mode!r} not carried over — kubetune runs layer-wise BAdam")
        _not_carried(k, ("badam_update_ratio", "badam_mask_mode"), "ratio-wise BAdam is not supported", warnings)
        if badam:
            hp["badam"] = badam
    elif use == "use_adam_mini":
        hp["optimizer"] = "adam_mini"
    elif use == "use_muon":
        hp["optimizer"] = "muon"
    if use and base and use in ("use_adam_mini", "use_muon"):
        warnings.append(f"optim: {base!r} not carried over — {use} replaces it")
    unused = {"use_galore": _LF_GALORE, "use_apollo": _LF_APOLLO, "use_badam": {**_LF_BADAM, "badam_mode": 0,
              "badam_update_ratio": 0, "badam_mask_mode": 0}}
    for switch, table in unused.items():
        if switch != use:
            _not_carried(k, table, f"{switch} is not set", warnings)
    _not_carried(k, ("apollo_scale_front",), "transformers' APOLLO has no norm-growth limiter option", warnings)
    _not_carried(k, ("badam_verbose",), "BAdam runs quietly", warnings)
    for key in ("use_galore", "use_apollo", "use_badam", "use_adam_mini", "use_muon"):
        k.take(key)
    opt = hp.get("optimizer")
    if opt in ("galore_adamw", "galore_adamw_8bit", "galore_adafactor", "apollo_adamw") and hp.get("weightDecay"):
        warnings.append(f"weight_decay: {hp.pop('weightDecay')} not carried over — transformers' GaLore and APOLLO "
                        "apply no weight decay")
    if opt in ("galore_adamw", "galore_adamw_8bit", "galore_adafactor"):
        for field, key in (("adamBeta1", "adam_beta1"), ("adamBeta2", "adam_beta2"), ("adamEpsilon", "adam_epsilon")):
            if field in hp:
                del hp[field]
                warnings.append(f"{key}: not carried over — transformers hands GaLore only the learning rate")
    if (hp.get("galore", {}).get("layerwise") or hp.get("apollo", {}).get("layerwise")) and hp.get("gradientAccumulation") != 1:
        if "gradientAccumulation" in hp:  # absent: LLaMA-Factory's default is 1 (kubetune's 8)
            warnings.append(f"gradient_accumulation_steps: {hp['gradientAccumulation']} set to 1 — a layerwise "
                            "optimizer steps inside the backward pass")
        hp["gradientAccumulation"] = 1


def _model(k: _Keys, warnings: list[str], name_key: str = "model_name_or_path") -> dict[str, Any]:
    name = k.get(name_key)
    if not name:
        raise UserError(f"{name_key} is required", name_key)
    model: dict[str, Any] = {"name": str(name)}
    if k.has("model_revision") and str(k.cfg["model_revision"]) != "main":
        model["revision"] = str(k.get("model_revision"))
    k.take("model_revision")
    if k.has("trust_remote_code"):
        model["trustRemoteCode"] = bool(k.get("trust_remote_code"))
    if k.has("flash_attn"):
        fa = str(k.get("flash_attn"))
        mapped = {"fa2": "flash_attention_2", "fa3": "flash_attention_3", "sdpa": "sdpa", "disabled": "eager", "auto": "auto"}.get(fa)
        if mapped:
            model["attnImplementation"] = mapped
        else:
            warnings.append(f"flash_attn: {fa!r} not carried over (auto, sdpa, fa2, fa3, disabled)")
    if k.get("pure_bf16"):
        model["dtype"] = "bfloat16"
    return model


def _pref(k: _Keys, stage: str, warnings: list[str]) -> tuple[str, dict[str, Any]]:
    pref: dict[str, Any] = {}
    loss = k.get("pref_loss")
    if stage == "dpo" and loss in ("orpo", "simpo"):
        stage = str(loss)
    elif loss is not None and stage == "dpo":
        if loss in DPO_LOSS_TYPES:
            if loss != "sigmoid":
                pref["lossType"] = loss
        else:
            warnings.append(f"pref_loss: {loss!r} not carried over (TRL's DPO losses: {', '.join(sorted(DPO_LOSS_TYPES))}); using sigmoid")
    elif loss is not None:
        warnings.append(f"pref_loss: not carried over — only meaningful with stage dpo (stage is {stage})")
    for key, field in _LF_PREF.items():
        if k.has(key):
            v = float(_num(k.get(key)))
            if STAGE_TYPES[stage].preference:
                pref[field] = v
            else:
                warnings.append(f"{key}: not carried over — stage {stage} has no preference settings")
    if pref.get("ftx") and not STAGE_TYPES[stage].sft_term:  # LLaMA-Factory adds it to orpo and kto too; TRL does not
        del pref["ftx"]
        _warn(warnings, "pref_ftx", f"TRL's {stage} trainer adds no SFT loss on the chosen answer")
    if pref.get("labelSmoothing") and pref.get("lossType", "sigmoid") not in DPO_LABEL_SMOOTHING_LOSSES:
        del pref["labelSmoothing"]
        _warn(warnings, "dpo_label_smoothing", "TRL reads label smoothing only in dpo stages with pref_loss "
              f"{', '.join(DPO_LABEL_SMOOTHING_LOSSES)}")
    return stage, pref


def drop_unhonoured(hp: dict[str, Any], stage: str, warnings: list[str]) -> None:
    """Hyperparameters a stage of type `stage` does not honour (the spec would reject them): dropped, with a warning."""
    keys = {field: key for key, (field, _) in _LF_HYPERPARAMETERS.items()}
    for field in GATED_HYPERPARAMETERS:
        if field in hp and field not in STAGE_TYPES[stage].accepts:
            del hp[field]
            _warn(warnings, keys.get(field, field), f"a {stage} stage does not honour hyperparameters.{field}")


_TRACKERS = ("tensorboard", "mlflow", "wandb")


def lf_tracking(report_to: Any, run_name: Any, warnings: list[str]) -> dict[str, Any] | None:
    """LLaMA-Factory's report_to (none, all, or trackers) and run_name → spec.tracking. The
    trackers' own settings stay in the environment as before (MLFLOW_TRACKING_URI, WANDB_PROJECT, ...)."""
    names = [n.lower() for n in _split_list(report_to if report_to is not None else "none")]
    if names == ["all"]:
        names = list(_TRACKERS)
    chosen = [n for n in names if n in _TRACKERS]
    for n in names:
        if n not in _TRACKERS and n != "none":
            _warn(warnings, "report_to", f"{n!r}: kubetune reports to {', '.join(_TRACKERS)} "
                  "(and always to Prometheus and trainer_log.jsonl)")
    if not chosen:
        return None
    tracking: dict[str, Any] = {"reportTo": chosen}
    if run_name:
        tracking["runName"] = str(run_name)
    if "mlflow" in chosen or "wandb" in chosen:
        warnings.append("report_to: MLflow/W&B settings are taken from spec.tracking (trackingUri, experiment, "
                        "project) and credentials from Secrets (tracking.mlflow.tokenSecretRef, "
                        "tracking.wandb.apiKeySecretRef): fill them in")
    return tracking


def convert_llamafactory(cfg: dict[str, Any], source_dir: Path, dataset_dir: str | None = None,
                         warnings: list[str] | None = None, name: str | None = None) -> dict[str, Any]:
    """A LLaMA-Factory training YAML (as a mapping) → a FineTuneJob document."""
    warnings = [] if warnings is None else warnings
    k = _Keys(cfg)
    stage = str(k.get("stage", "sft"))
    if stage not in _LF_STAGES:
        raise UserError(f"unknown LLaMA-Factory stage {stage!r} ({', '.join(_LF_STAGES)})", "stage")
    model = _model(k, warnings)
    method, blocks = _method(k, warnings)
    hp = _hyperparameters(k, warnings)
    stage, pref = _pref(k, stage, warnings)
    drop_unhonoured(hp, stage, warnings)
    st: dict[str, Any] = {"name": stage, "type": stage, "method": method, **blocks}
    if hp:
        st["hyperparameters"] = hp
    if pref:
        st["preference"] = pref
    if stage == "ppo":
        rm = k.get("reward_model")
        k.take("reward_model_type")
        warnings.append(f"reward_model: {rm!r} not carried over — a ppo stage takes its reward from an rm stage of "
                        "the same job (reward.modelStage) or from reward.functions; reward.functions set to "
                        "[length] as a placeholder: REPLACE IT")
        st["reward"] = {"functions": ["length"]}
    if k.has("adapter_name_or_path"):
        warnings.append(f"adapter_name_or_path: {k.get('adapter_name_or_path')!r} not carried over — a stage cannot "
                        "start from an existing adapter; merge it first (`kubetune export`) and use the merged model "
                        "as spec.model.name")
    data_names = _split_list(k.get("dataset", ""))
    if not data_names:
        raise UserError("dataset is required for a training stage", "dataset")
    data = _dataset_entries(data_names, k, source_dir, dataset_dir, stage, warnings, "dataset")
    predict = None
    if k.get("do_predict") and k.has("eval_dataset"):
        # LLaMA-Factory's predict mode (do_predict + predict_with_generate) → an eval stage after training
        k.take("do_predict")
        k.take("predict_with_generate")
        names = _split_list(k.get("eval_dataset"))
        predict = {"name": "predict" if stage != "predict" else "eval", "type": "eval",
                   "data": _dataset_entries(names, k, source_dir, dataset_dir, "sft", warnings, "eval_dataset")}
        evaluation = {}
        if k.has("max_new_tokens"):
            evaluation["maxNewTokens"] = int(_num(k.get("max_new_tokens")))
        if k.has("per_device_eval_batch_size"):
            evaluation["batchSize"] = int(_num(k.get("per_device_eval_batch_size")))
        if evaluation:
            predict["evaluation"] = evaluation
    spec: dict[str, Any] = {"model": model, "data": data}
    eval_names = _split_list(k.get("eval_dataset", ""))
    if eval_names:  # LLaMA-Factory ignores val_size when it has an eval_dataset; kubetune forbids both
        spec["evalData"] = _dataset_entries(eval_names, k, source_dir, dataset_dir, stage, warnings, "eval_dataset")
        if hp.pop("valSize", 0):
            warnings.append("val_size: not carried over — eval_dataset is given (LLaMA-Factory then ignores "
                            "val_size); the stage evaluates on spec.evalData")
    template = k.get("template")
    if template is not None:
        t = _LF_TEMPLATES.get(str(template))
        if t in TEMPLATE_NAMES:
            spec["template"] = t
        else:
            warnings.append(f"template: {template!r} not carried over — kubetune uses the tokenizer's own chat template "
                            f"(or one of {', '.join(TEMPLATE_NAMES)}); check that the model has one")
    spec["stages"] = [st] + ([predict] if predict else [])
    out_dir = k.get("output_dir")
    if out_dir:
        spec["storage"] = {"uri": str(out_dir)}
    ck: dict[str, Any] = {}
    for key, field in _LF_CHECKPOINT.items():
        if k.has(key):
            ck[field] = max(1, int(_num(k.get(key))))
    if ck:
        spec["checkpoint"] = ck
    if k.has("report_to") or k.has("run_name"):
        if tracking := lf_tracking(k.take("report_to"), k.take("run_name"), warnings):
            spec["tracking"] = tracking
    tail = "-".join(Path(str(out_dir)).parts[-3:]) if out_dir else ""
    jobname = _dns(name or tail or f"{stage}-{method}")
    for key in k.leftover():
        _warn(warnings, key, _LF_NOTES.get(key) or "unknown or unsupported LLaMA-Factory key")
    return {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND, "metadata": {"name": jobname}, "spec": spec}


def add_export_stage(doc: dict[str, Any], cfg: dict[str, Any], warnings: list[str]) -> dict[str, Any]:
    """Append a LLaMA-Factory export YAML as an `export` stage of `doc` (the job it merges)."""
    k = _Keys(cfg)
    spec = doc["spec"]
    base = k.get("model_name_or_path")
    if base and str(base) != spec["model"]["name"]:
        warnings.append(f"export model_name_or_path: {base!r} differs from the training model "
                        f"{spec['model']['name']!r}; the export merges the job's own adapter into the job's model")
    adapter = k.get("adapter_name_or_path")
    uri = (spec.get("storage") or {}).get("uri")
    if adapter and uri and Path(str(adapter)).resolve() != Path(str(uri)).resolve():
        warnings.append(f"adapter_name_or_path: {adapter!r} is not this job's output_dir {uri!r}; the export stage "
                        "merges the adapter the job's previous stage wrote")
    last = spec["stages"][-1]
    if last.get("method", "lora") not in ("lora", "qlora"):
        warnings.append("export: the previous stage trains full weights; the export stage just copies its model")
    k.take("template")
    k.take("finetuning_type")
    export_dir = k.get("export_dir")
    if not export_dir:
        raise UserError("export_dir is required in an export YAML", "export_dir")
    warnings.append(f"export_dir: {export_dir!r} not carried over as such — the merged model is written to "
                    "<storage.uri>/export/output")
    notes = {"export_size": "shard size is transformers' default", "export_device": "the runtime merges on the pod's device",
             "export_legacy_format": "always safetensors", "export_quantization_bit": "post-training quantisation (GPTQ) is not supported",
             "export_quantization_dataset": "post-training quantisation (GPTQ) is not supported",
             "export_hub_model_id": "push the exported folder with `huggingface-cli upload`"}
    names = {s["name"] for s in spec["stages"]}
    name = "export" if "export" not in names else "export-2"
    spec["stages"].append({"name": name, "type": "export"})
    for key in k.leftover():
        _warn(warnings, f"export {key}", notes.get(key) or _LF_NOTES.get(key) or "unknown or unsupported export key")
    return doc


def _is_export(cfg: dict[str, Any]) -> bool:
    return "export_dir" in cfg and "dataset" not in cfg


# ------------------------------------------------------------------------------------- NeMo


def _is_nemo(cfg: dict[str, Any]) -> bool:
    m = cfg.get("model")
    return "step_scheduler" in cfg or (isinstance(m, dict) and "pretrained_model_name_or_path" in m)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, v in d.items():
        path = f"{prefix}{key}"
        if isinstance(v, dict) and v:
            out.update(_flat(v, path + "."))
        else:
            out[path] = v
    return out


# Dataset builders of NeMo AutoModel's recipes we can map to columns: name → (HF id, alpaca columns).
# SQuAD: NeMo's make_squad_dataset writes one user turn "Context: {context} Question: {question}
# Answer: " and answers `answers.text[0]`; alpaca's user turn is "{prompt}\n{query}", so the context
# comes first here too.
_NEMO_DATASETS = {"squad": ("rajpurkar/squad", {"prompt": "context", "query": "question", "response": "answers.text[0]"})}
_NEMO_COLUMN_ROLES = {"context": "prompt", "question": "query", "answer": "response"}
_NEMO_STRATEGIES = {"fsdp2": "fsdp", "fsdp": "fsdp", "ddp": "ddp"}
_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _nemo_dataset(prefix: str, name: str, get, flat: dict[str, Any], used: set[str], warnings: list[str]) -> dict[str, Any] | None:
    """NeMo's `dataset` / `validation_dataset` block → a DatasetSpec mapping (None when absent)."""
    target = str(get(f"{prefix}._target_", ""))
    ds_name = get(f"{prefix}.dataset_name") or get(f"{prefix}.path_or_dataset") or get(f"{prefix}.path_or_dataset_id")
    if not ds_name and not target:
        return None
    data: dict[str, Any] = {"name": name}
    known = next((v for key, v in _NEMO_DATASETS.items() if key in target or key in str(ds_name)), None)
    if known:
        data["source"] = str(ds_name or known[0])
        data["columns"] = dict(known[1])
        warnings.append(f"{prefix}._target_: {target!r}: SQuAD carried over as alpaca columns (context → prompt, "
                        "question → query, answers.text[0] → response): the user turn is the context, a newline and "
                        "the question, where NeMo writes 'Context: … Question: … Answer: '")
    elif ds_name:
        data["source"] = str(ds_name)
        data["format"] = "messages" if "chat" in target.lower() else "alpaca"
        if target:
            warnings.append(f"{prefix}._target_: {target!r} not carried over — check the format and columns of {name!r}")
    else:
        raise UserError(f"{prefix}.dataset_name (or path_or_dataset) is required", prefix)
    if get(f"{prefix}.split"):
        data["split"] = str(flat[f"{prefix}.split"])
    if get(f"{prefix}.limit_dataset_samples"):
        data["maxSamples"] = int(get(f"{prefix}.limit_dataset_samples"))
    for key in flat:
        if key.startswith(f"{prefix}.column_mapping."):
            used.add(key)
            role = key.rsplit(".", 1)[1]
            data.setdefault("columns", {})[_NEMO_COLUMN_ROLES.get(role, role)] = flat[key]
    return data


def _nemo_distributed(get, warnings: list[str]) -> dict[str, Any]:
    """`distributed` (+ `distributed_config`) → spec.resources: FSDP2 is resources.strategy fsdp."""
    resources: dict[str, Any] = {}
    strategy = get("distributed.strategy")
    targets = " ".join(str(get(k, "")) for k in ("distributed._target_", "distributed_config._target_"))
    if strategy is None and "FSDP2" in targets:
        strategy = "fsdp2"
    if strategy is not None:
        mapped = _NEMO_STRATEGIES.get(str(strategy).lower())
        if mapped:
            resources["strategy"] = mapped
            if mapped == "fsdp":
                warnings.append(f"distributed.strategy: {strategy} carried over as resources.strategy: fsdp (FSDP2 "
                                "through accelerate); it shards only across several GPU processes — set "
                                "resources.gpusPerNode (and nodes); on CPU or one GPU it trains unsharded")
        else:
            warnings.append(f"distributed.strategy: {strategy!r} not carried over — kubetune trains data-parallel only: "
                            "resources.strategy fsdp (FSDP2) or ddp")
    for key, what in (("tp_size", "tensor"), ("cp_size", "context"), ("pp_size", "pipeline"), ("ep_size", "expert")):
        v = get(f"distributed.{key}")
        if v not in (None, 1, "1", "none", "None"):
            warnings.append(f"distributed.{key}: {v} not carried over — {what} parallelism is not supported; kubetune "
                            "trains data-parallel (resources.strategy fsdp or ddp)")
    dp = get("distributed.dp_size")
    if dp not in (None, "none", "None"):
        warnings.append(f"distributed.dp_size: {dp} not carried over — the data-parallel size is resources.nodes × "
                        "resources.gpusPerNode")
    for key in ("distributed.sequence_parallel", "distributed_config.sequence_parallel"):
        if get(key):
            warnings.append(f"{key}: not carried over — sequence parallelism is not supported")
    return resources


def _nemo_compile(get, flat: dict[str, Any], warnings: list[str]) -> dict[str, Any]:
    """`compile` → hyperparameters.torchCompile (+ torchCompileMode): transformers' torch_compile."""
    hp: dict[str, Any] = {}
    if not any(key.startswith("compile.") for key in flat):
        return hp
    enabled = bool(get("compile.enabled"))
    rest = [key for key in flat if key.startswith("compile.") and key != "compile.enabled"]
    if not enabled:
        for key in rest:
            get(key)
            _warn(warnings, key, "compile.enabled is false (hyperparameters.torchCompile stays false)")
        return hp
    hp["torchCompile"] = True
    mode = get("compile.mode")
    if mode in _COMPILE_MODES:
        if mode != "default":
            hp["torchCompileMode"] = mode
    elif mode is not None:
        warnings.append(f"compile.mode: {mode!r} not carried over ({', '.join(_COMPILE_MODES)})")
    backend = get("compile.backend")
    if backend not in (None, "inductor"):
        warnings.append(f"compile.backend: {backend!r} not carried over — transformers compiles with Inductor")
    if get("compile.fullgraph"):
        warnings.append("compile.fullgraph: not carried over — transformers compiles allowing graph breaks")
    if get("compile.dynamic") is not None:
        warnings.append(f"compile.dynamic: {flat['compile.dynamic']} not carried over — torch.compile detects dynamic "
                        "shapes itself")
    return hp


def convert_nemo(cfg: dict[str, Any], warnings: list[str] | None = None, name: str | None = None) -> dict[str, Any]:
    """A NeMo AutoModel fine-tuning recipe → a FineTuneJob document (its main keys)."""
    warnings = [] if warnings is None else warnings
    flat = _flat(cfg)
    used: set[str] = set()

    def get(key: str, default: Any = None) -> Any:
        if key in flat:
            used.add(key)
            return default if flat[key] is None else flat[key]
        return default

    def not_carried(keys: tuple[str, ...], why: str) -> None:
        for key in keys:
            if key in flat:
                used.add(key)
                _warn(warnings, key, why)

    model_name = get("model.pretrained_model_name_or_path")
    if not model_name:
        raise UserError("model.pretrained_model_name_or_path is required", "model")
    get("model._target_")
    model: dict[str, Any] = {"name": str(model_name)}
    dt = get("model.torch_dtype")
    if dt:
        model["dtype"] = {"bf16": "bfloat16", "torch.bfloat16": "bfloat16", "bfloat16": "bfloat16",
                          "float16": "float16", "torch.float16": "float16", "float32": "float32"}.get(str(dt), "auto")
    if get("model.trust_remote_code"):
        model["trustRemoteCode"] = True
    st: dict[str, Any] = {"name": "sft", "type": "sft"}
    peft = {k_: v for k_, v in flat.items() if k_.startswith("peft.")}
    quant = {k_: v for k_, v in flat.items() if k_.startswith("quantization.")}
    if peft:
        lora: dict[str, Any] = {}
        get("peft._target_")
        if get("peft.dim") is not None:
            lora["rank"] = int(get("peft.dim"))
        if get("peft.alpha") is not None:
            lora["alpha"] = int(get("peft.alpha"))
        if get("peft.dropout") is not None:
            lora["dropout"] = float(get("peft.dropout"))
        tm = get("peft.target_modules")
        if get("peft.match_all_linear") or tm in ("*.proj", "*_proj", ["*_proj"], ["*.proj"]):
            lora["target"] = ["all"]
        elif tm:
            lora["target"] = [t.replace("*", "").strip("._") or "all" for t in _split_list(tm)]
        not_carried(("peft.use_triton", "peft.dropout_position", "peft.lora_A_init"),
                    "kernel/initialisation detail of NeMo's LoRA")
        st["method"] = "lora"
        if lora:
            st["lora"] = lora
        if quant or get("peft.quantize_base") :
            bits = 4 if get("quantization.load_in_4bit") or not get("quantization.load_in_8bit") else 8
            q: dict[str, Any] = {"bits": bits}
            qt = get("quantization.bnb_4bit_quant_type")
            if qt in ("nf4", "fp4"):
                q["type"] = qt
            if get("quantization.bnb_4bit_use_double_quant") is not None:
                q["doubleQuantization"] = bool(get("quantization.bnb_4bit_use_double_quant"))
            get("quantization._target_")
            get("quantization.bnb_4bit_compute_dtype")
            st["method"] = "qlora"
            st["quantization"] = q
    else:
        st["method"] = "full"
    hp: dict[str, Any] = {}
    if get("optimizer.lr") is not None:
        hp["learningRate"] = float(_num(get("optimizer.lr")))
    if get("optimizer.weight_decay") is not None:
        hp["weightDecay"] = float(_num(get("optimizer.weight_decay")))
    opt = str(get("optimizer._target_", ""))
    if opt and not opt.endswith(("AdamW", "Adam")):
        warnings.append(f"optimizer._target_: {opt!r} not carried over — using AdamW")
    betas = get("optimizer.betas")
    if betas is not None:
        hp["adamBeta1"], hp["adamBeta2"] = (float(_num(b)) for b in betas)
    if get("optimizer.eps") is not None:
        hp["adamEpsilon"] = float(_num(get("optimizer.eps")))
    not_carried(("optimizer.foreach", "optimizer.fused"), "the runtime picks the AdamW kernel")
    gbs, lbs = get("step_scheduler.global_batch_size"), get("step_scheduler.local_batch_size")
    if lbs:
        hp["batchSize"] = int(lbs)
    if gbs:
        hp["gradientAccumulation"] = max(1, int(gbs) // int(lbs or 1))
        warnings.append(f"step_scheduler.global_batch_size: {gbs} carried over as gradientAccumulation "
                        f"{hp['gradientAccumulation']} on one GPU; divide it by the GPU count for more GPUs")
    if get("step_scheduler.max_steps"):
        hp["maxSteps"] = int(get("step_scheduler.max_steps"))
    if get("step_scheduler.num_epochs"):
        hp["epochs"] = float(get("step_scheduler.num_epochs"))
    if get("step_scheduler.val_every_steps"):
        hp["evalSteps"] = int(get("step_scheduler.val_every_steps"))
    if get("lr_scheduler.lr_decay_style"):
        s = str(get("lr_scheduler.lr_decay_style"))
        if s in _SCHEDULERS:
            hp["lrScheduler"] = s
        else:
            warnings.append(f"lr_scheduler.lr_decay_style: {s!r} not carried over; using cosine")
    if get("lr_scheduler.lr_warmup_steps"):
        hp["warmupSteps"] = int(get("lr_scheduler.lr_warmup_steps"))
    if get("lr_scheduler.min_lr") is not None:
        min_lr = float(_num(get("lr_scheduler.min_lr")))
        if hp.get("lrScheduler", "cosine") == "cosine":
            hp["lrScheduler"], hp["minLr"] = "cosine_with_min_lr", min_lr
        else:
            warnings.append(f"lr_scheduler.min_lr: not carried over — transformers decays to a floor only in its "
                            f"cosine_with_min_lr schedule, and lr_decay_style is {hp['lrScheduler']}")
    hp.update(_nemo_compile(get, flat, warnings))
    if get("rng.seed") is not None:
        hp["seed"] = int(get("rng.seed"))
    get("rng._target_")
    seq = get("dataset.seq_length") or get("packed_sequence.packed_sequence_size")
    if seq:
        hp["cutoffLen"] = int(seq)
    if get("packed_sequence.packed_sequence_size"):
        hp["packing"] = True
    if hp:
        st["hyperparameters"] = hp
    data = _nemo_dataset("dataset", "train", get, flat, used, warnings)
    if data is None:
        raise UserError("dataset.dataset_name (or path_or_dataset) is required", "dataset")
    eval_data = _nemo_dataset("validation_dataset", "validation", get, flat, used, warnings)
    resources = _nemo_distributed(get, warnings)
    spec: dict[str, Any] = {"model": model, "data": [data], "stages": [st]}
    if eval_data is not None:
        spec["evalData"] = [eval_data]
    if resources:
        spec["resources"] = resources
    ck: dict[str, Any] = {}
    if get("step_scheduler.ckpt_every_steps"):
        ck["everySteps"] = int(get("step_scheduler.ckpt_every_steps"))
    if ck:
        spec["checkpoint"] = ck
    if get("checkpoint.checkpoint_dir"):
        spec["storage"] = {"uri": str(get("checkpoint.checkpoint_dir"))}
    if tracking := nemo_tracking(flat, used):
        spec["tracking"] = tracking
    get("checkpoint.enabled")
    not_carried(("checkpoint.model_save_format", "checkpoint.save_consolidated"),
                "kubetune saves Hugging Face safetensors (adapters in peft format)")
    notes = {"distributed": "set resources.nodes/gpusPerNode and resources.strategy (ddp or fsdp)",
             "distributed_config": "set resources.fsdp (sharding, cpuOffload)",
             "compile": "no transformers equivalent",
             "loss_fn": "the trainer's own loss is used", "dataloader": "not configurable",
             "validation_dataset": "not supported",
             "validation_dataloader": "not configurable", "step_scheduler": "not supported",
             "wandb": "not carried over (see spec.tracking.wandb)", "mlflow": "not carried over (see spec.tracking.mlflow)",
             "packed_sequence": "not supported", "model": "not supported", "peft": "not supported",
             "dataset": "not supported", "checkpoint": "not supported", "optimizer": "not supported",
             "lr_scheduler": "not supported", "quantization": "not supported"}
    for key in flat:
        if key not in used:
            _warn(warnings, key, notes.get(key.split(".", 1)[0], "unknown or unsupported NeMo AutoModel key"))
    jobname = _dns(name or str(model_name).rsplit("/", 1)[-1] + "-" + st["method"])
    return {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND, "metadata": {"name": jobname}, "spec": spec}


def nemo_tracking(flat: dict[str, Any], used: set[str]) -> dict[str, Any] | None:
    """NeMo AutoModel's `wandb:` (project, entity, name) and `mlflow:` (experiment_name,
    tracking_uri, run_name) blocks → spec.tracking."""
    keys = {"wandb.project": ("wandb", "project"), "wandb.entity": ("wandb", "entity"),
            "wandb.name": (None, "runName"), "mlflow.experiment_name": ("mlflow", "experiment"),
            "mlflow.tracking_uri": ("mlflow", "trackingUri"), "mlflow.run_name": (None, "runName")}
    tracking: dict[str, Any] = {}
    for key, (block, field) in keys.items():
        if flat.get(key) not in (None, ""):
            used.add(key)
            target = tracking.setdefault(block, {}) if block else tracking
            target[field] = str(flat[key])
    reports = [t for t in ("mlflow", "wandb") if any(k.startswith(f"{t}.") or k == t for k in flat)]
    if not reports:
        return None
    return {"reportTo": reports, **tracking}


# ---------------------------------------------------------------------------------- front end


def _read(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"file not found: {p}", str(p))
    try:
        cfg = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise UserError(f"not valid YAML: {err}", str(p)) from None
    if not isinstance(cfg, dict):
        raise UserError("expected a mapping of keys", str(p))
    if cfg.get("kind") == KIND:
        raise UserError("already a FineTuneJob", str(p))
    return cfg


def _relocate(doc: dict[str, Any], out_dir: Path) -> None:
    """Local paths in the sources are relative to the working directory (as in LLaMA-Factory);
    kubetune reads them relative to the job file: rewrite them for where the job is written."""
    cwd = Path.cwd().resolve()
    out_dir = out_dir.resolve()
    if out_dir == cwd:
        return

    def fix(value: str) -> str:
        if "://" in value or Path(value).expanduser().is_absolute() or value.startswith("~"):
            return value
        if not (cwd / value).exists() and not value.startswith("."):
            return value  # a hub id, or a file that does not exist yet: leave it as written
        return os.path.relpath(cwd / value, out_dir)

    spec = doc["spec"]
    for d in spec.get("data", []) + spec.get("evalData", []):
        d["source"] = fix(d["source"])
    spec["model"]["name"] = fix(spec["model"]["name"])


def _unknown_format(cfg: dict[str, Any]) -> str:
    keys = ", ".join(list(cfg)[:8]) + (", …" if len(cfg) > 8 else "")
    return ("not a config `kubetune convert` knows (its keys: " + (keys or "none") + "). Tried: "
            "LLaMA-Factory training YAML (no model_name_or_path); "
            "LLaMA-Factory v1 config (no `model: <name>` string, nor any of model_class, peft_config, train_dataset, "
            "micro_batch_size …); "
            "NeMo AutoModel recipe (no model.pretrained_model_name_or_path, nor step_scheduler)")


def convert_files(paths: list[str | Path], dataset_dir: str | None = None, name: str | None = None,
                  out_dir: str | Path | None = None) -> tuple[dict[str, Any], list[str]]:
    """Convert one source file (or a LLaMA-Factory training YAML followed by its export YAML).
    `out_dir`: the folder the job file will be written to (relative data paths are rewritten for it).
    Returns the FineTuneJob document and the warnings. Raises UserError."""
    if not paths:
        raise UserError("no file given")
    from .convert_v1 import convert_v1, is_v1, is_v1_export, v1_export_as_v0

    warnings: list[str] = []
    first = _read(paths[0])
    v1 = is_v1(first)
    if _is_nemo(first):
        if len(paths) > 1:
            raise UserError("a NeMo AutoModel recipe is converted on its own", str(paths[1]))
        doc = convert_nemo(first, warnings, name)
    elif is_v1_export(first):
        raise UserError("a LLaMA-Factory v1 merge YAML alone cannot become a FineTuneJob (its first stage must "
                        f"train): give the training config first (`kubetune convert train.yaml {paths[0]}`)", str(paths[0]))
    elif v1:
        doc = convert_v1(first, Path(paths[0]).resolve().parent, warnings, name)
    elif "model_name_or_path" not in first and not _is_export(first):
        raise UserError(_unknown_format(first), str(paths[0]))
    elif _is_export(first):
        raise UserError(
            "an export YAML alone cannot become a FineTuneJob (its first stage must train): give the training "
            f"YAML first (`kubetune convert train.yaml {paths[0]}`), or merge directly with "
            f"`kubetune export --adapter {first.get('adapter_name_or_path', 'ADAPTER')} "
            f"--model {first.get('model_name_or_path', 'BASE')} --out {first.get('export_dir', 'OUT')}`",
            str(paths[0]),
        )
    else:
        doc = convert_llamafactory(first, Path(paths[0]).resolve().parent, dataset_dir, warnings, name)
    for extra in paths[1:]:
        cfg = _read(extra)
        if v1 and is_v1_export(cfg):
            cfg = v1_export_as_v0(cfg)
        if not _is_export(cfg):
            raise UserError("only a LLaMA-Factory export YAML (with export_dir) may follow the training YAML", str(extra))
        add_export_stage(doc, cfg, warnings)
    if out_dir is not None:
        _relocate(doc, Path(out_dir))
    parse_job(doc, "converted job")  # the output must pass `kubetune validate`
    return doc, warnings


def render(doc: dict[str, Any], warnings: list[str], sources: list[str]) -> str:
    head = [f"# Converted by `kubetune convert` from {', '.join(sources)}."]
    if warnings:
        head.append(f"# {len(warnings)} setting(s) not carried over or changed — review them:")
        head += [f"#   - {w}" for w in warnings]
    else:
        head.append("# Every setting was carried over.")
    return "\n".join(head) + "\n" + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)


__all__ = ["convert_files", "convert_llamafactory", "convert_nemo", "add_export_stage", "render"]

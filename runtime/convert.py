"""`kubetune convert`: LLaMA-Factory and NeMo AutoModel configs → a FineTuneJob.

Every key of the source file is either carried over to its FineTuneJob field or reported in a
warning that says why it was not (never silently dropped). Warnings go to stderr and, as YAML
comments, to the top of the written file.

Sources understood:
- LLaMA-Factory training YAML (`llamafactory-cli train`): stage, finetuning_type, model, dataset
  (+ dataset_dir/dataset_info.json), LoRA/QLoRA/freeze knobs, hyperparameters, pref_* keys.
- LLaMA-Factory export YAML (`llamafactory-cli export`: adapter_name_or_path + export_dir), given
  after the training YAML it merges → one job with the training stage(s) and an `export` stage.
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

from .errors import UserError
from .spec import API_GROUP, API_VERSION, KIND, TEMPLATE_NAMES, parse_job

# LLaMA-Factory keys with no kubetune counterpart, and why (anything else unknown gets a generic line).
_LF_NOTES = {
    "do_train": "kubetune always trains a training stage",
    "do_eval": "evaluation runs when hyperparameters.valSize > 0",
    "do_predict": "predict mode is an eval stage (with eval_dataset) or `kubetune eval`; see docs/evaluation.md",
    "overwrite_output_dir": "kubetune resumes from the last committed checkpoint instead of overwriting",
    "overwrite_cache": "kubetune has no preprocessing cache to overwrite",
    "plot_loss": "kubetune always writes training_loss.png and trainer_log.jsonl",
    "report_to": "metrics go to Prometheus (/metrics) and trainer_log.jsonl",
    "logging_dir": "logs go to the stage's output folder",
    "run_name": "the job's metadata.name names the run",
    "preprocessing_num_workers": "not configurable",
    "dataloader_num_workers": "not configurable",
    "ddp_timeout": "not configurable",
    "ddp_backend": "the runtime picks nccl on GPUs, gloo on CPU",
    "deepspeed": "DeepSpeed is not used; set resources.strategy: fsdp (and resources.gpusPerNode) to shard",
    "fsdp": "set resources.strategy: fsdp",
    "per_device_eval_batch_size": "evaluation uses the training batch size",
    "eval_strategy": "evaluation runs every hyperparameters.evalSteps (or each epoch) when valSize > 0",
    "evaluation_strategy": "evaluation runs every hyperparameters.evalSteps (or each epoch) when valSize > 0",
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
_SCHEDULERS = {"cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial", "inverse_sqrt"}
_OPTIMIZERS = {"adamw_torch": "adamw_torch", "adamw_hf": "adamw_torch", "adamw_torch_fused": "adamw_torch_fused",
               "adamw_8bit": "adamw_8bit", "adamw_bnb_8bit": "adamw_8bit", "paged_adamw_8bit": "paged_adamw_8bit",
               "adafactor": "adafactor", "sgd": "sgd", "lion_8bit": "lion_8bit"}
_DPO_LOSSES = {"sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
               "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"}
_LF_COLUMNS = {"prompt", "query", "response", "history", "messages", "system", "tools", "chosen", "rejected", "kto_tag"}
_LF_TAGS = {"role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag"}
_CAMEL = {"role_tag": "roleTag", "content_tag": "contentTag", "user_tag": "userTag", "assistant_tag": "assistantTag",
          "observation_tag": "observationTag", "function_tag": "functionTag", "system_tag": "systemTag"}


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
                     warnings: list[str], key: str) -> list[dict[str, Any]]:
    dd_text, dd = _find_dataset_dir(k, source_dir, dataset_dir)
    info: dict[str, Any] = {}
    if dd is not None:
        try:
            info = json.loads((dd / "dataset_info.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"cannot read {dd / 'dataset_info.json'}: {err}", "dataset_dir") from None
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
    lora_keys = ("lora_rank", "lora_alpha", "lora_dropout", "lora_target", "additional_target", "use_dora",
                 "use_rslora", "pissa_init", "loraplus_lr_ratio")
    if ft in ("lora", "qlora"):
        lora: dict[str, Any] = {}
        if k.has("lora_rank"):
            lora["rank"] = int(_num(k.get("lora_rank")))
        if k.has("lora_alpha"):
            lora["alpha"] = int(_num(k.get("lora_alpha")))
        if k.has("lora_dropout"):
            lora["dropout"] = float(_num(k.get("lora_dropout")))
        if k.has("lora_target"):
            lora["target"] = _split_list(k.get("lora_target"))
        if k.has("additional_target"):
            lora["modulesToSave"] = _split_list(k.get("additional_target"))
        if k.get("use_dora"):
            lora["useDora"] = True
        if k.get("use_rslora"):
            lora["useRslora"] = True
        if k.get("pissa_init"):
            lora["init"] = "pissa"
        if k.has("loraplus_lr_ratio"):
            lora["loraplusLrRatio"] = float(_num(k.get("loraplus_lr_ratio")))
        if lora:
            block["lora"] = lora
    else:
        _not_carried(k, lora_keys, f"finetuning_type is {ft}, not lora", warnings)
    freeze_keys = {"freeze_trainable_layers": "trainableLayers", "freeze_trainable_modules": "trainableModules",
                   "freeze_extra_modules": "extraModules"}
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
    simple = {"learning_rate": ("learningRate", float), "num_train_epochs": ("epochs", float),
              "per_device_train_batch_size": ("batchSize", int), "gradient_accumulation_steps": ("gradientAccumulation", int),
              "cutoff_len": ("cutoffLen", int), "warmup_ratio": ("warmupRatio", float), "warmup_steps": ("warmupSteps", int),
              "weight_decay": ("weightDecay", float), "max_grad_norm": ("maxGradNorm", float), "seed": ("seed", int),
              "logging_steps": ("loggingSteps", int), "val_size": ("valSize", float), "eval_steps": ("evalSteps", int),
              "neftune_noise_alpha": ("neftuneAlpha", float)}
    for key, (field, cast) in simple.items():
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
    return hp


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
        if loss in _DPO_LOSSES:
            if loss != "sigmoid":
                pref["lossType"] = loss
        else:
            warnings.append(f"pref_loss: {loss!r} not carried over (TRL's DPO losses: {', '.join(sorted(_DPO_LOSSES))}); using sigmoid")
    elif loss is not None:
        warnings.append(f"pref_loss: not carried over — only meaningful with stage dpo (stage is {stage})")
    knobs = {"pref_beta": "beta", "pref_ftx": "ftx", "dpo_label_smoothing": "labelSmoothing", "simpo_gamma": "simpoGamma",
             "kto_chosen_weight": "desirableWeight", "kto_rejected_weight": "undesirableWeight"}
    for key, field in knobs.items():
        if k.has(key):
            v = float(_num(k.get(key)))
            if stage in ("dpo", "kto", "orpo", "simpo"):
                pref[field] = v
            else:
                warnings.append(f"{key}: not carried over — stage {stage} has no preference settings")
    return stage, pref


def convert_llamafactory(cfg: dict[str, Any], source_dir: Path, dataset_dir: str | None = None,
                         warnings: list[str] | None = None, name: str | None = None) -> dict[str, Any]:
    """A LLaMA-Factory training YAML (as a mapping) → a FineTuneJob document."""
    warnings = [] if warnings is None else warnings
    k = _Keys(cfg)
    stage = str(k.get("stage", "sft"))
    if stage not in ("pt", "sft", "rm", "dpo", "kto", "ppo"):
        raise UserError(f"unknown LLaMA-Factory stage {stage!r} (pt, sft, rm, ppo, dpo, kto)", "stage")
    model = _model(k, warnings)
    method, blocks = _method(k, warnings)
    hp = _hyperparameters(k, warnings)
    stage, pref = _pref(k, stage, warnings)
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
    elif k.has("eval_dataset"):
        warnings.append(f"eval_dataset: {k.get('eval_dataset')!r} not carried over — kubetune evaluates on a held-out "
                        "share of the training data (hyperparameters.valSize)")
    template = k.get("template")
    spec: dict[str, Any] = {"model": model, "data": data}
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
    if k.has("save_steps"):
        ck["everySteps"] = max(1, int(_num(k.get("save_steps"))))
    if k.has("save_total_limit"):
        ck["keep"] = max(1, int(_num(k.get("save_total_limit"))))
    if ck:
        spec["checkpoint"] = ck
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
_NEMO_DATASETS = {"squad": ("rajpurkar/squad", {"prompt": "question", "query": "context", "response": "answers"})}


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
    not_carried(("optimizer.betas", "optimizer.eps", "optimizer.foreach", "optimizer.fused"), "AdamW defaults are used")
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
    ds_target = str(get("dataset._target_", ""))
    ds_name = get("dataset.dataset_name") or get("dataset.path_or_dataset") or get("dataset.path_or_dataset_id")
    data: dict[str, Any] = {"name": "train"}
    known = next((v for key, v in _NEMO_DATASETS.items() if key in ds_target or key in str(ds_name)), None)
    if known:
        data["source"] = str(ds_name or known[0])
        data["columns"] = dict(known[1])
        warnings.append(f"dataset._target_: {ds_target!r}: SQuAD carried over as alpaca columns "
                        "(question → prompt, context → input, answers → output); its `answers` column is a "
                        "dict ({text: [...]}) — flatten it to a string first")
    elif ds_name:
        data["source"] = str(ds_name)
        data["format"] = "messages" if "chat" in ds_target.lower() else "alpaca"
        if ds_target:
            warnings.append(f"dataset._target_: {ds_target!r} not carried over — check spec.data[0].format and columns")
    else:
        raise UserError("dataset.dataset_name (or path_or_dataset) is required", "dataset")
    if get("dataset.split"):
        data["split"] = str(flat["dataset.split"])
    for key in flat:
        if key.startswith("dataset.column_mapping."):
            used.add(key)
            role = key.rsplit(".", 1)[1]
            role = {"context": "query", "question": "prompt", "answer": "response"}.get(role, role)
            data.setdefault("columns", {})[role] = flat[key]
    spec: dict[str, Any] = {"model": model, "data": [data], "stages": [st]}
    ck: dict[str, Any] = {}
    if get("step_scheduler.ckpt_every_steps"):
        ck["everySteps"] = int(get("step_scheduler.ckpt_every_steps"))
    if ck:
        spec["checkpoint"] = ck
    if get("checkpoint.checkpoint_dir"):
        spec["storage"] = {"uri": str(get("checkpoint.checkpoint_dir"))}
    get("checkpoint.enabled")
    not_carried(("checkpoint.model_save_format", "checkpoint.save_consolidated"),
                "kubetune saves Hugging Face safetensors (adapters in peft format)")
    notes = {"distributed": "set resources.nodes/gpusPerNode and resources.strategy (ddp or fsdp)",
             "loss_fn": "the trainer's own loss is used", "dataloader": "not configurable",
             "validation_dataset": "kubetune holds out hyperparameters.valSize of the training data",
             "validation_dataloader": "not configurable", "step_scheduler": "not supported",
             "wandb": "metrics go to Prometheus and trainer_log.jsonl", "mlflow": "metrics go to Prometheus and trainer_log.jsonl",
             "packed_sequence": "not supported", "model": "not supported", "peft": "not supported",
             "dataset": "not supported", "checkpoint": "not supported", "optimizer": "not supported",
             "lr_scheduler": "not supported", "quantization": "not supported"}
    for key in flat:
        if key not in used:
            _warn(warnings, key, notes.get(key.split(".", 1)[0], "unknown or unsupported NeMo AutoModel key"))
    jobname = _dns(name or str(model_name).rsplit("/", 1)[-1] + "-" + st["method"])
    return {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND, "metadata": {"name": jobname}, "spec": spec}


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
    for d in spec.get("data", []):
        d["source"] = fix(d["source"])
    spec["model"]["name"] = fix(spec["model"]["name"])


def convert_files(paths: list[str | Path], dataset_dir: str | None = None, name: str | None = None,
                  out_dir: str | Path | None = None) -> tuple[dict[str, Any], list[str]]:
    """Convert one source file (or a LLaMA-Factory training YAML followed by its export YAML).
    `out_dir`: the folder the job file will be written to (relative data paths are rewritten for it).
    Returns the FineTuneJob document and the warnings. Raises UserError."""
    if not paths:
        raise UserError("no file given")
    warnings: list[str] = []
    first = _read(paths[0])
    if _is_nemo(first):
        if len(paths) > 1:
            raise UserError("a NeMo AutoModel recipe is converted on its own", str(paths[1]))
        doc = convert_nemo(first, warnings, name)
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

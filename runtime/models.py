"""Load tokenizers and models the way a stage asks: dtype, attention kernel, quantisation,
adapters (continued or merged), LoRA/DoRA/rsLoRA/PiSSA configs and freeze tuning.

Only transformers/peft/bitsandbytes do the work; this module turns our spec into their configs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from .api.errors import UserError
from .api.spec import FreezeSpec, ModelSpec, QuantizationSpec, StageSpec

log = logging.getLogger(__name__)


def has_cuda() -> bool:
    return torch.cuda.is_available()


def bf16_ok() -> bool:
    return has_cuda() and torch.cuda.is_bf16_supported()


def compute_dtype(model: ModelSpec, precision: str = "auto") -> torch.dtype:
    """The dtype weights are loaded in."""
    if model.dtype != "auto":
        return getattr(torch, model.dtype)
    if precision == "bf16" or (precision == "auto" and bf16_ok()):
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    return torch.float32


def attn_implementation(model: ModelSpec, dtype: torch.dtype | None = None) -> str:
    from .attention import choose_attention  # auto: varlen attention for packed rows where it runs (logged)

    return choose_attention(model.attn_implementation, dtype)


def _check_local_model(path: str, where: str) -> None:
    p = Path(path)
    if p.exists() and not (p / "config.json").exists() and not (p / "adapter_config.json").exists():
        raise UserError(f"{p} has no config.json: not a folder written by save_pretrained", where)


def _hub_error(name: str, err: Exception, where: str) -> UserError:
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    return UserError(
        f"cannot load {name!r}: {first}. If this is a Hugging Face id, is the hub reachable (and "
        "the token set for gated models)? Otherwise give a local folder or an s3:// URI.",
        where,
    )


def load_tokenizer(path: str, model: ModelSpec, template: str | None, where: str = "spec.model.name"):
    from transformers import AutoTokenizer

    from .data.templates import apply_template

    _check_local_model(path, where)
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=model.revision, trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError) as err:
        raise _hub_error(path, err, where) from None
    apply_template(tok, template, source=path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def quantization_config(stage: StageSpec, dtype: torch.dtype):
    if stage.method != "qlora" or stage.quantization is None:
        return None
    return bnb_config(stage.quantization, dtype)


def bnb_config(q: QuantizationSpec, dtype: torch.dtype):
    """The BitsAndBytesConfig of a quantization spec (qlora stages, and `kubetune chat --quantization`)."""
    from transformers import BitsAndBytesConfig

    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.type,
        bnb_4bit_use_double_quant=q.double_quantization,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,
    )


def load_model(
    path: str,
    model: ModelSpec,
    *,
    dtype: torch.dtype,
    stage: StageSpec | None = None,
    auto_class: str = "AutoModelForCausalLM",
    where: str = "spec.model.name",
    **kwargs: Any,
):
    """from_pretrained with our options; quantised when the stage is qlora."""
    import transformers

    _check_local_model(path, where)
    cls = getattr(transformers, auto_class)
    qconf = quantization_config(stage, dtype) if stage is not None else None
    opts: dict[str, Any] = dict(
        dtype=dtype,
        attn_implementation=attn_implementation(model, dtype),
        revision=model.revision,
        trust_remote_code=model.trust_remote_code,
        **kwargs,
    )
    if qconf is not None:
        opts["quantization_config"] = qconf
        if has_cuda():
            opts["device_map"] = {"": torch.cuda.current_device()}
    try:
        return cls.from_pretrained(path, **opts)
    except (OSError, ValueError) as err:
        raise _hub_error(path, err, where) from None


def adapter_base(adapter_dir: str) -> str:
    cfg = Path(adapter_dir) / "adapter_config.json"
    if not cfg.exists():
        raise UserError(f"{adapter_dir} has no adapter_config.json: not a peft adapter folder", "adapter")
    return json.loads(cfg.read_text())["base_model_name_or_path"]


def lora_config(stage: StageSpec, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig

    lora = stage.lora
    init: Any = True
    if lora.init == "gaussian":
        init = "gaussian"
    elif lora.init == "pissa":
        init = "pissa_niter_16"
    elif lora.init == "olora":
        init = "olora"
    elif lora.init == "loftq":
        from peft import LoftQConfig

        init = "loftq"
    target: Any = "all-linear" if lora.target == ["all"] else list(lora.target)
    extra: dict[str, Any] = {}
    if lora.init == "loftq":
        extra["loftq_config"] = LoftQConfig(loftq_bits=stage.quantization.bits if stage.quantization else 4)
    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.resolved_alpha,
        lora_dropout=lora.dropout,
        target_modules=target,
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        init_lora_weights=init,
        modules_to_save=list(lora.modules_to_save) or None,
        task_type=task_type,
        **extra,
    )


def _decoder_layers(model) -> tuple[str, torch.nn.ModuleList]:
    """The longest ModuleList of the model: its decoder layers."""
    best: tuple[str, torch.nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and (best is None or len(module) > len(best[1])):
            best = (name, module)
    if best is None:
        raise UserError("cannot find the model's decoder layers for freeze tuning", "stages[].freeze")
    return best


def apply_freeze(model, freeze: FreezeSpec, where: str = "freeze") -> int:
    """Train only the last (or first) N layers (optionally only some of their modules) and the
    extra modules; everything else is frozen. Returns the number of trainable parameters."""
    prefix, layers = _decoder_layers(model)
    n = freeze.trainable_layers
    if abs(n) > len(layers):
        raise UserError(f"trainableLayers {n} but the model has {len(layers)} layers", f"{where}.trainableLayers")
    chosen = range(len(layers) - n, len(layers)) if n >= 0 else range(0, -n)
    layer_prefixes = tuple(f"{prefix}.{i}." for i in chosen)
    modules = [m for m in freeze.trainable_modules if m != "all"]
    names = [n for n, _ in model.named_parameters()]
    for extra in freeze.extra_modules:
        if not any(extra in n for n in names):
            raise UserError(f"no module named like {extra!r} in the model", f"{where}.extraModules")
    trainable = 0
    for name, p in model.named_parameters():
        in_layer = name.startswith(layer_prefixes) and (not modules or any(f".{m}" in name for m in modules))
        train = in_layer or any(extra in name for extra in freeze.extra_modules)
        p.requires_grad_(train)
        if train:
            if p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()  # train the unfrozen part in fp32 (LLaMA-Factory's upcast)
            trainable += p.numel()
    if trainable == 0:
        raise UserError(f"freeze settings leave no parameter to train (modules {modules})", f"{where}.trainableModules")
    return trainable


def _merge_kwargs(adapter_path: str, auto_class: str) -> dict[str, Any]:
    """A causal-LM adapter merged into a model with another head (an rm stage after sft): load it
    as a plain PeftModel; the causal-LM wrapper would expect the generation methods."""
    if auto_class == "AutoModelForCausalLM":
        return {}
    from peft import PeftConfig

    config = PeftConfig.from_pretrained(adapter_path)
    config.task_type = None
    return {"config": config}


def load_policy(
    model_path: str,
    adapter_path: str | None,
    merge_adapter: bool,
    model: ModelSpec,
    stage: StageSpec,
    dtype: torch.dtype,
    auto_class: str = "AutoModelForCausalLM",
    **kwargs: Any,
):
    """The model a stage trains: the base (quantised for qlora), with the previous stage's
    adapter continued (trainable) or merged in. Returns (model, peft_config or None)."""
    if adapter_path and merge_adapter and stage.method == "qlora":
        # Merge in full precision first; quantising a merged model happens at load below.
        raise UserError(
            "a qlora stage after a full/freeze stage that itself followed an adapter is not supported; "
            "use lora, or put an export stage before it",
            f"stages[{stage.name}].method",
        )
    m = load_model(model_path, model, dtype=dtype, stage=stage, auto_class=auto_class, **kwargs)
    if adapter_path:
        from peft import PeftModel

        if merge_adapter:
            m = PeftModel.from_pretrained(m, adapter_path, **_merge_kwargs(adapter_path, auto_class)).merge_and_unload()
        else:
            m = PeftModel.from_pretrained(m, adapter_path, is_trainable=True)
            return m, None
    if stage.method in ("lora", "qlora"):
        task = "SEQ_CLS" if auto_class == "AutoModelForSequenceClassification" else "CAUSAL_LM"
        return m, lora_config(stage, task)
    if stage.method == "freeze":
        apply_freeze(m, stage.freeze, f"stages[{stage.name}].freeze")
    return m, None

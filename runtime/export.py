"""Merge an adapter into its base model and save a standalone Hugging Face model.

Used by the `export` stage and by `kubetune export`. The result loads with
`AutoModelForCausalLM.from_pretrained(out)` and needs neither peft nor the base model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def export_model(adapter: str | None, out: str | Path, base: str | None = None, dtype: str = "auto", trust_remote_code: bool = False) -> Path:
    """Merge `adapter` into `base` (default: the adapter's base_model_name_or_path) → `out`.
    With no adapter, `base` is re-saved as is (a full model from a full/freeze stage)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .models import adapter_base

    out = Path(out)
    if adapter is None and base is None:
        raise UserError("nothing to export: give an adapter or a model", "export")
    base = base or adapter_base(adapter)
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise UserError(f"cannot load base model {base!r}: {str(err).splitlines()[0]}", "export.model") from None
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    # The tokenizer the adapter was trained with (its chat template included), else the base's.
    tok_src = adapter if adapter and any((Path(adapter) / f).exists() for f in TOKENIZER_FILES) else base
    AutoTokenizer.from_pretrained(tok_src, trust_remote_code=trust_remote_code).save_pretrained(out)
    for extra in ("generation_config.json",):
        src = Path(base) / extra
        if src.exists() and not (out / extra).exists():
            shutil.copy(src, out / extra)
    return out

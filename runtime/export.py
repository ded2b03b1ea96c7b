"""Merge an adapter into its base model and save a standalone Hugging Face model.

Used by the `export` stage and by `kubetune export`. The result loads with
`AutoModelForCausalLM.from_pretrained(out)` and needs neither peft nor the base model.

Two ways to merge (`merge`): `layered` streams the base's safetensors shards one at a time
(runtime/merge.py; peak memory ≈ one shard + the adapter, so a 70B QLoRA adapter merges on a
128 GB DGX Spark); `in-memory` loads the whole base and uses peft's `merge_and_unload()` (needed
for DoRA, LoRA biases, hub ids, .bin weights). `auto` (the default) is layered whenever the base
is a local safetensors folder and the adapter is one the layered merge supports, else in-memory.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from .api.errors import UserError

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


MERGE_MODES = ("auto", "layered", "in-memory")


def choose_merge(adapter: str | None, base: str, merge: str = "auto") -> str:
    """`layered` or `in-memory` for this adapter and base (see the module's docstring)."""
    from .merge import NotLayerable, adapter_settings, base_shards

    if merge not in MERGE_MODES:
        raise UserError(f"merge must be one of {', '.join(MERGE_MODES)}, not {merge!r}", "--merge")
    if adapter is None or merge == "in-memory":
        return "in-memory"
    try:
        base_shards(base)
        adapter_settings(adapter)
    except NotLayerable as err:
        if merge == "layered":
            raise
        log.info("merging in memory: %s", err.message)
        return "in-memory"
    return "layered"


def export_model(adapter: str | None, out: str | Path, base: str | None = None, dtype: str = "auto",
                 trust_remote_code: bool = False, merge: str = "auto", report: dict | None = None) -> Path:
    """Merge `adapter` into `base` (default: the adapter's base_model_name_or_path) → `out`.
    With no adapter, `base` is re-saved as is (a full model from a full/freeze stage).
    `report["merge"]` (when given) says which merge ran: layered, in-memory or none."""
    report = {} if report is None else report
    report["merge"] = "none" if adapter is None else "in-memory"
    import torch
    from transformers import AutoModelForCausalLM

    from .models import adapter_base

    out = Path(out)
    if adapter is None and base is None:
        raise UserError("nothing to export: give an adapter or a model", "export")
    base = base or adapter_base(adapter)
    if choose_merge(adapter, base, merge) == "layered":
        from .merge import NotLayerable, layered_merge

        try:
            layered_merge(adapter, base, out, dtype=dtype)
            _save_tokenizer(adapter, base, out, trust_remote_code)
            report["merge"] = "layered"
            return out
        except NotLayerable as err:  # found only while reading the shards (weights named otherwise)
            if merge == "layered":
                raise
            log.warning("merging in memory: %s", err.message)
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
    _save_tokenizer(adapter, base, out, trust_remote_code)
    for extra in ("generation_config.json",):
        src = Path(base) / extra
        if src.exists() and not (out / extra).exists():
            shutil.copy(src, out / extra)
    return out


def _save_tokenizer(adapter: str | None, base: str, out: Path, trust_remote_code: bool) -> None:
    """The tokenizer the adapter was trained with (its chat template included), else the base's."""
    from transformers import AutoTokenizer

    tok_src = adapter if adapter and any((Path(adapter) / f).exists() for f in TOKENIZER_FILES) else base
    AutoTokenizer.from_pretrained(tok_src, trust_remote_code=trust_remote_code).save_pretrained(out)

"""`kubetune chat`: talk to a base model, a trained adapter or an exported model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .api.errors import UserError


def run_quantization(adapter: str | None) -> dict | None:
    """The quantisation a qlora run trained `adapter` against, from the run.json beside it."""
    if not adapter or not (Path(adapter) / "run.json").exists():
        return None
    try:
        return json.loads((Path(adapter) / "run.json").read_text()).get("quantization") or None
    except (OSError, ValueError):
        return None


def chat_quantization(choice: str | None, adapter: str | None) -> dict | None:
    """`--quantization`: 4 or 8 bits, none, or auto (default) — the run's own quantisation when the
    adapter comes from a qlora run (the weights it was trained against), else none."""
    if choice in (None, "auto"):
        q = run_quantization(adapter)
        if q:
            print(f"loading the base in {q['bits']}-bit, as the qlora run that trained the adapter did "
                  "(--quantization none: full precision)", file=sys.stderr)
        return q
    if choice == "none":
        return None
    if choice not in ("4", "8"):
        raise UserError(f"--quantization must be 4, 8, none or auto, not {choice!r}", "--quantization")
    recorded = run_quantization(adapter) or {}
    if recorded.get("bits") == int(choice):  # the run's own nf4/fp4 and double quantisation
        return recorded
    return {"bits": int(choice)}


def load_for_chat(model: str, adapter: str | None = None, template: str | None = None, quantization: str | None = None):
    """(model, tokenizer) ready to generate. `model` may itself be an adapter folder. `quantization`
    (4, 8, none, auto) loads the base through bitsandbytes, as a qlora stage does."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .data.templates import apply_template

    path = Path(model)
    if adapter is None and (path / "adapter_config.json").exists():
        adapter = model
        model = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
    tok_src = adapter if adapter and (Path(adapter) / "tokenizer_config.json").exists() else model
    opts: dict = {"dtype": "auto"}
    q = chat_quantization(quantization, adapter)
    if q:
        from .models import bf16_ok, bnb_config
        from .api.spec import QuantizationSpec

        dtype = torch.bfloat16 if bf16_ok() else torch.float32  # compute dtype, as a qlora stage picks it
        opts = {"dtype": dtype, "quantization_config": bnb_config(QuantizationSpec(**q), dtype)}
        if torch.cuda.is_available():
            opts["device_map"] = {"": torch.cuda.current_device()}
    try:
        tok = AutoTokenizer.from_pretrained(tok_src)
        m = AutoModelForCausalLM.from_pretrained(model, **opts)
    except OSError as err:
        raise UserError(f"cannot load {model!r}: {str(err).splitlines()[0]}", "--model") from None
    if adapter:
        from peft import PeftModel

        m = PeftModel.from_pretrained(m, adapter)
    apply_template(tok, template, source=model)
    if torch.cuda.is_available() and not q:
        m = m.to("cuda")
    m.eval()
    return m, tok


def generate(m, tok, messages: list[dict[str, str]], max_new_tokens: int = 128, temperature: float = 0.0) -> str:
    import torch

    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    enc = {k: v.to(m.device) for k, v in enc.items()}
    with torch.no_grad():
        out = m.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None,
            top_p=None,
            top_k=None,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def chat_main(args) -> int:
    m, tok = load_for_chat(args.model, args.adapter, args.template, getattr(args, "quantization", None))
    history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        print(generate(m, tok, history + [{"role": "user", "content": args.prompt}], args.max_new_tokens, args.temperature))
        return 0
    print("kubetune chat — empty line or Ctrl-D to quit, /clear to forget the conversation", file=sys.stderr)
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not text:
            return 0
        if text == "/clear":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": text})
        answer = generate(m, tok, history, args.max_new_tokens, args.temperature)
        history.append({"role": "assistant", "content": answer})
        print(f"bot> {answer}")

"""Reward sources of the online RL stages (grpo, rloo, ppo).

Reward *functions* follow TRL's signature — ``f(prompts, completions, **kwargs) -> list[float]``
where ``kwargs`` holds the dataset's extra columns (one value per completion), ``completion_ids``
and the trainer state — so GRPOTrainer and RLOOTrainer call them directly and our PPO stage calls
them the same way. Completions are text or, for chat data, a list with the assistant message.

Built-ins (names in ``reward.functions``):

- ``exact_match``: 1.0 when the completion equals the reference column (``reward.referenceColumn``,
  default ``answer``) after whitespace normalisation (trimmed, runs of whitespace → one space),
  else 0.0.
- ``format``: 1.0 when the regular expression ``reward.pattern`` is found in the completion
  (``re.search`` with DOTALL; anchor it with ``^…$`` to require the whole completion), else 0.0.
- ``length``: 0 up to ``reward.maxLength`` tokens, then −1/maxLength per token over it (−1 at
  twice the length).

A custom function is named by the import path ``package.module:function`` of a module installed
in the image. It is imported, never evaluated: no code is taken from the spec.

The reward *model* (``reward.modelStage``) is the output of an earlier ``rm`` stage: a
sequence-classification model, or its base plus a SEQ_CLS adapter, loaded by `load_reward_model`.
"""

from __future__ import annotations

import importlib
import re
from typing import Any, Callable

from .api.errors import UserError
from .api.spec import REWARD_BUILTINS as BUILTINS
from .api.spec import REWARD_IMPORT_PATH, RewardSpec

IMPORT_PATH = re.compile(REWARD_IMPORT_PATH)

RewardFunc = Callable[..., list[float]]


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or the content of a chat completion's messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    return str(completion)


def normalise(text: Any) -> str:
    return " ".join(str(text).split())


def exact_match_reward(reference_column: str, where: str) -> RewardFunc:
    def exact_match(prompts, completions, **kwargs) -> list[float]:
        if reference_column not in kwargs:
            columns = sorted(k for k in kwargs if k not in ("trainer_state", "log_extra", "log_metric", "completion_ids", "environments"))
            raise UserError(
                f"exact_match needs the reference column {reference_column!r} in the data; the prompts carry "
                f"{', '.join(columns) or 'no extra columns'}. Set reward.referenceColumn.",
                where,
            )
        refs = kwargs[reference_column]
        return [float(normalise(completion_text(c)) == normalise(r)) for c, r in zip(completions, refs, strict=True)]

    return exact_match


def format_reward(pattern: str) -> RewardFunc:
    regex = re.compile(pattern, re.DOTALL)

    def format(prompts, completions, **kwargs) -> list[float]:  # noqa: A001 - the name TRL logs it under
        return [float(regex.search(completion_text(c)) is not None) for c in completions]

    return format


def length_reward(max_length: int) -> RewardFunc:
    def length(prompts, completions, completion_ids=None, **kwargs) -> list[float]:
        if completion_ids is not None:
            counts = [len(ids) for ids in completion_ids]
        else:  # called without token ids: count words as a stand-in
            counts = [len(completion_text(c).split()) for c in completions]
        return [-max(0, n - max_length) / max_length for n in counts]

    return length


def import_reward(path: str, where: str) -> RewardFunc:
    """`package.module:function` of an installed module; nothing else is ever executed."""
    if not IMPORT_PATH.match(path):
        raise UserError(
            f"unknown reward function {path!r}: use one of {', '.join(BUILTINS)} or the import path "
            "`package.module:function` of a function installed in the image",
            where,
        )
    module_name, func_name = path.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UserError(f"cannot import module {module_name!r} for reward function {path!r}: {err}", where) from None
    func = getattr(module, func_name, None)
    if func is None:
        raise UserError(f"module {module_name!r} has no attribute {func_name!r} (reward function {path!r})", where)
    if not callable(func):
        raise UserError(f"{path!r} is not callable; a reward function is f(prompts, completions, **kwargs) -> list[float]", where)
    return func


def build_reward_functions(reward: RewardSpec, where: str, columns: set[str] | None = None) -> list[RewardFunc]:
    """The reward functions of `reward.functions`, in order. `where` is the reward field's path
    (`spec.stages[i].reward`); `columns`, when given, are the dataset's extra columns, checked
    against what the functions need before any model is loaded."""
    funcs: list[RewardFunc] = []
    for j, name in enumerate(reward.functions):
        at = f"{where}.functions[{j}]"
        if name == "exact_match":
            if columns is not None and reward.reference_column not in columns:
                raise UserError(
                    f"exact_match compares with the column {reward.reference_column!r}, which the data lacks "
                    f"(extra columns: {', '.join(sorted(columns)) or 'none'}); set reward.referenceColumn or add the column",
                    at,
                )
            funcs.append(exact_match_reward(reward.reference_column, at))
        elif name == "format":
            if not reward.pattern:
                raise UserError("the format reward needs reward.pattern (a regular expression)", at)
            try:
                funcs.append(format_reward(reward.pattern))
            except re.error as err:
                raise UserError(f"reward.pattern is not a valid regular expression: {err}", f"{where}.pattern") from None
        elif name == "length":
            funcs.append(length_reward(reward.max_length))
        else:
            funcs.append(import_reward(name, at))
    return funcs


def load_reward_model(ref, model_spec, resolve: Callable[[str, str], str], where: str, dtype=None):
    """The reward model an rm stage wrote: a sequence-classification model, or its base plus a
    SEQ_CLS adapter (merged here: it is only evaluated). Returns (model, tokenizer), in eval mode
    with gradients off."""
    import torch

    from .models import load_model, load_tokenizer

    dtype = dtype or torch.float32
    model_path = resolve(ref.model, where)
    adapter = resolve(ref.adapter, where) if ref.adapter else None
    tokenizer = load_tokenizer(adapter or model_path, model_spec, None, where)
    model = load_model(model_path, model_spec, dtype=dtype, auto_class="AutoModelForSequenceClassification",
                       where=where, num_labels=1)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.config.pad_token_id = tokenizer.pad_token_id
    model.eval().requires_grad_(False)
    return model, tokenizer

"""`grpo` and `rloo` stages on TRL's GRPOTrainer and RLOOTrainer.

Both sample `reward.numGenerations` completions per prompt with transformers' `generate` (no
vLLM), score them with the reward functions (`runtime/rewards.py`) and/or the reward model an
earlier `rm` stage wrote (`io.reward`), and push the policy towards the better ones: GRPO with
group-normalised advantages, RLOO with the leave-one-out baseline. `reward.klCoef` is TRL's
`beta` (KL penalty to the reference: the policy the stage starts from).

Batch sizes count *prompts*, as in LLaMA-Factory: a step sees `batchSize × gradientAccumulation`
prompts, each with `numGenerations` completions (TRL counts completions, so we multiply).

The prompts come from prompt data (format `prompt`, or alpaca/sharegpt/messages whose last
answer is dropped); extra columns (e.g. `answer`) reach the reward functions as keyword arguments.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from typing import Any

from ..data.prepare import train_eval_examples
from ..errors import UserError
from ..models import compute_dtype, load_policy, load_tokenizer
from ..outputs import TrainerLogCallback
from ..rewards import build_reward_functions, load_reward_model
from .base import StageContext, StageResult, check_method, common_args, finish, train

log = logging.getLogger(__name__)

# Signals copied from trainer_log.jsonl into run.json (first and last logged value).
SIGNALS = ("reward", "kl")


def prompt_datasets(ctx: StageContext):
    """The stage's prompts (+ extra columns) as datasets: (train, eval or None)."""
    from datasets import Dataset

    cfg = ctx.cfg
    train, evals = train_eval_examples(cfg, "prompt", ctx.base_dir, ctx.fetch)
    if not train:
        raise UserError("the stage's data has no prompts", ctx.where("data"))
    keys = set().union(*(e.keys() for e in train + evals))
    # datasets wants the same columns in every row
    train_ds = Dataset.from_list([{k: e.get(k) for k in keys} for e in train])
    eval_ds = Dataset.from_list([{k: e.get(k) for k in keys} for e in evals]) if evals else None
    return train_ds, eval_ds


def reward_sources(ctx: StageContext, columns: set[str], dtype) -> tuple[list[Any], list[Any]]:
    """Reward functions and the rm stage's reward model, with their processing classes (None for
    functions) in TRL's `reward_funcs` / `reward_processing_classes` layout."""
    reward = ctx.cfg.stage.reward
    if reward is None:  # the spec's CEL rule already demands one; keep the message if it is bypassed
        raise UserError("grpo, rloo and ppo stages need reward.modelStage or reward.functions", ctx.where("reward"))
    funcs: list[Any] = list(build_reward_functions(reward, ctx.where("reward"), columns))
    classes: list[Any] = [None] * len(funcs)
    if ctx.cfg.io.reward is not None:
        rm, rm_tokenizer = load_reward_model(ctx.cfg.io.reward, ctx.cfg.model, ctx.resolve, ctx.where("reward.modelStage"), dtype)
        funcs.append(rm)
        classes.append(rm_tokenizer)
    return funcs, classes


def record_signals(result: StageResult, log_cb: TrainerLogCallback, keys=SIGNALS) -> None:
    """Add the first and last logged value of each signal to the summary (and run.json)."""
    for key in keys:
        values = [r[key] for r in log_cb.records if key in r]
        if values:
            result.summary[f"first_{key}"] = values[0]
            result.summary[f"final_{key}"] = values[-1]
    (result.output_dir / "run.json").write_text(json.dumps(result.summary, indent=2, sort_keys=True) + "\n")


def drop_reference_adapter(result: StageResult) -> None:
    """TRL keeps the starting adapter as a frozen `ref` adapter when it continues one; the
    stage's output is the trained `default` adapter only."""
    ref = result.output_dir / "ref"
    if (ref / "adapter_config.json").exists():
        shutil.rmtree(ref)


def run(ctx: StageContext) -> StageResult:
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    cfg = ctx.cfg
    stage = cfg.stage
    check_method(stage, ("lora", "qlora", "full", "freeze"), ctx.where("method"))
    hp, reward = stage.hyperparameters, stage.reward
    dtype = compute_dtype(cfg.model, hp.precision)

    # Cheap checks first: data and reward functions fail before any model is loaded.
    train_ds, eval_ds = prompt_datasets(ctx)
    funcs, classes = reward_sources(ctx, set(train_ds.column_names) - {"prompt"}, dtype)

    model_path = ctx.resolve(cfg.io.policy.model, "spec.model.name")
    adapter = ctx.resolve(cfg.io.policy.adapter, ctx.where("adapter")) if cfg.io.policy.adapter else None
    tokenizer = load_tokenizer(adapter or model_path, cfg.model, cfg.template)
    tokenizer.padding_side = "left"  # generation continues the prompt's last token
    model, peft_config = load_policy(model_path, adapter, cfg.io.merge_adapter, cfg.model, stage, dtype)
    # A full stage after an adapter trains the merged weights: TRL would rebuild its reference from
    # the base model's path, so keep the merged starting point as the reference instead.
    reference = (
        copy.deepcopy(model).eval().requires_grad_(False)
        if reward.kl_coef > 0 and peft_config is None and cfg.io.merge_adapter
        else None
    )

    config_cls, trainer_cls = (GRPOConfig, GRPOTrainer) if stage.type == "grpo" else (RLOOConfig, RLOOTrainer)
    base_args = common_args(ctx, eval_enabled=eval_ds is not None)
    base_args.update(
        per_device_train_batch_size=hp.batch_size * reward.num_generations,
        per_device_eval_batch_size=hp.batch_size * reward.num_generations,
        remove_unused_columns=False,  # extra columns feed the reward functions
        include_num_input_tokens_seen="no",  # batches are prompts (lists), not token tensors
    )
    args = config_cls(
        **base_args,
        num_generations=reward.num_generations,
        max_completion_length=reward.max_new_tokens,
        temperature=reward.temperature,
        beta=reward.kl_coef,
        use_vllm=False,
        log_completions=False,
    )
    log_cb = TrainerLogCallback(ctx.trainer_dir)
    trainer = trainer_cls(
        model=model,
        reward_funcs=funcs,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        reward_processing_classes=classes,
        peft_config=peft_config,
        callbacks=[log_cb, *ctx.callbacks],
    )
    if reference is not None:
        trainer.ref_model = trainer.accelerator.prepare_model(reference, evaluation_mode=True)
    result, duration = train(trainer, ctx)
    out = finish(trainer, tokenizer, result, duration, ctx, log_cb)
    drop_reference_adapter(out)
    record_signals(out, log_cb)
    return out

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
import logging
from typing import Any

from ..data.prepare import train_eval_examples
from ..api.errors import UserError
from ..rewards import build_reward_functions, load_reward_model
from .base import StageContext
from .trainer_stage import TrainerStage

log = logging.getLogger(__name__)

SIGNALS = ("reward", "kl")  # first and final logged value into run.json


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


class GenerationStage(TrainerStage):
    """A stage whose policy generates from the stage's prompts while it trains (grpo, rloo, distill)."""

    padding_side = "left"  # generation continues the prompt's last token

    def datasets(self):
        return prompt_datasets(self.ctx)

    def options(self):
        return dict(
            remove_unused_columns=False,  # extra columns feed the reward functions
            include_num_input_tokens_seen="no",  # batches are prompts (lists), not token tensors
            use_vllm=False,
            log_completions=False,
        )


class OnlineRL(GenerationStage):
    signals = SIGNALS

    def classes(self):
        from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

        return (GRPOConfig, GRPOTrainer) if self.stage.type == "grpo" else (RLOOConfig, RLOOTrainer)

    def datasets(self):
        # data and reward functions fail before any model is loaded
        train_ds, eval_ds = super().datasets()
        self.reward_funcs, self.reward_classes = reward_sources(self.ctx, set(train_ds.column_names) - {"prompt"}, self.dtype)
        return train_ds, eval_ds

    def options(self):
        reward, prompts = self.stage.reward, self.hp.batch_size
        return dict(
            super().options(),
            per_device_train_batch_size=prompts * reward.num_generations,
            per_device_eval_batch_size=prompts * reward.num_generations,
            num_generations=reward.num_generations,
            max_completion_length=reward.max_new_tokens,
            temperature=reward.temperature,
            beta=reward.kl_coef,
        )

    def trainer_kwargs(self):
        return {"reward_funcs": self.reward_funcs, "reward_processing_classes": self.reward_classes}

    def load_model(self):
        model, peft_config = self.load_policy()
        # A full stage after an adapter trains the merged weights: TRL would rebuild its reference from
        # the base model's path, so keep the merged starting point as the reference instead.
        merged = self.stage.reward.kl_coef > 0 and peft_config is None and self.cfg.io.merge_adapter
        self.reference = copy.deepcopy(model).eval().requires_grad_(False) if merged else None
        return model, peft_config

    def prepare(self, trainer):
        if self.reference is not None:
            trainer.ref_model = trainer.accelerator.prepare_model(self.reference, evaluation_mode=True)


run = OnlineRL.run

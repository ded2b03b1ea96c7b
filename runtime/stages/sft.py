"""`pt` and `sft` stages on TRL's SFTTrainer.

pt: plain text, every token in the loss, packed by default. sft: conversations through the chat
template, loss on the assistant's tokens only. Packing is TRL's best-fit-decreasing packing with
padding-free batches: position ids restart at each sample, so packed samples never attend to
each other.
"""

from __future__ import annotations

import logging

from datasets import Dataset

from ..errors import DataError
from ..data.prepare import KIND_OF_STAGE, load_examples, split_eval, tokenize_conversations, tokenize_text
from ..models import compute_dtype, load_policy, load_tokenizer
from ..outputs import TrainerLogCallback
from .base import StageContext, StageResult, check_method, common_args, finish, train

log = logging.getLogger(__name__)


def _tokenized(examples, kind, tokenizer, hp, where: str) -> dict[str, list]:
    columns = (
        tokenize_text(examples, tokenizer)
        if kind == "text"
        else tokenize_conversations(examples, tokenizer, where=where)
    )
    if not hp.packing:  # padding-free batches without packing: truncate here (keep the start)
        columns = {k: [v[: hp.cutoff_len] for v in vals] for k, vals in columns.items()}
        if "assistant_masks" in columns:
            keep = [i for i, m in enumerate(columns["assistant_masks"]) if any(m)]
            columns = {k: [vals[i] for i in keep] for k, vals in columns.items()}
    return columns


def build_datasets(ctx: StageContext, tokenizer) -> tuple[Dataset, Dataset | None]:
    cfg = ctx.cfg
    kind = KIND_OF_STAGE[cfg.stage.type]
    hp = cfg.stage.hyperparameters
    examples = load_examples(cfg.data, kind, ctx.base_dir, ctx.fetch)
    where = ", ".join(d.name for d in cfg.data)
    columns = _tokenized(examples, kind, tokenizer, hp, f"stage {cfg.name} data ({where})")
    if cfg.eval_data:  # a separate evaluation set: the training data is used whole
        where = f"stage {cfg.name} evalData ({', '.join(d.name for d in cfg.eval_data)})"
        eval_columns = _tokenized(load_examples(cfg.eval_data, kind, ctx.base_dir, ctx.fetch), kind, tokenizer, hp, where)
        if not eval_columns["input_ids"]:
            raise DataError(f"no evaluation example keeps an answer within cutoffLen {hp.cutoff_len}", where)
        return Dataset.from_dict(columns), Dataset.from_dict(eval_columns)
    train_idx, eval_idx = split_eval(len(columns["input_ids"]), hp.val_size, hp.seed)
    full = Dataset.from_dict(columns)
    train_ds = full.select(train_idx)
    eval_ds = full.select(eval_idx) if eval_idx else None
    return train_ds, eval_ds


def run(ctx: StageContext) -> StageResult:
    from trl import SFTConfig, SFTTrainer

    cfg = ctx.cfg
    stage = cfg.stage
    check_method(stage, ("lora", "qlora", "full", "freeze"), ctx.where("method"))
    hp = stage.hyperparameters
    dtype = compute_dtype(cfg.model, hp.precision)
    model_path = ctx.resolve(cfg.io.policy.model, "spec.model.name")
    adapter = ctx.resolve(cfg.io.policy.adapter, ctx.where("adapter")) if cfg.io.policy.adapter else None
    # A previous stage's output folder carries the tokenizer it trained with.
    tokenizer = load_tokenizer(adapter or model_path, cfg.model, cfg.template)
    train_ds, eval_ds = build_datasets(ctx, tokenizer)
    ctx.eval_examples = len(eval_ds) if eval_ds is not None else None  # SFTTrainer may pack them into fewer rows
    model, peft_config = load_policy(model_path, adapter, cfg.io.merge_adapter, cfg.model, stage, dtype)

    args = SFTConfig(
        **common_args(ctx, eval_enabled=eval_ds is not None),
        max_length=hp.cutoff_len if hp.packing else None,
        packing=bool(hp.packing),
        packing_strategy="bfd",
        padding_free=True,  # flatten each batch: no pad tokens computed, with or without packing
        neftune_noise_alpha=hp.neftune_alpha,
        dataset_num_proc=None,
    )
    log_cb = TrainerLogCallback(ctx.trainer_dir)
    model, peft_config, optimizers = _loraplus(model, peft_config, stage, args)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[log_cb, *ctx.callbacks],
        **({"optimizers": optimizers} if optimizers else {}),
    )
    result, duration = train(trainer, ctx)
    return finish(trainer, tokenizer, result, duration, ctx, log_cb)


def _loraplus(model, peft_config, stage, args):
    """LoRA+ (B matrices at ratio × lr) through peft's own optimizer factory. The adapter is
    attached here, so the trainer gets the peft model and no peft_config."""
    ratio = stage.lora.loraplus_lr_ratio
    if not ratio or stage.method not in ("lora", "qlora"):
        return model, peft_config, None
    import torch
    from peft import get_peft_model
    from peft.optimizers import create_loraplus_optimizer

    if peft_config is not None:
        model = get_peft_model(model, peft_config)
    optimizer = create_loraplus_optimizer(
        model=model, optimizer_cls=torch.optim.AdamW, lr=args.learning_rate, loraplus_lr_ratio=ratio,
        weight_decay=args.weight_decay, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
    )
    return model, None, (optimizer, None)

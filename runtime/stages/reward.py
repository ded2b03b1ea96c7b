"""`rm` stage on `trl.RewardTrainer`: a reward model with a sequence-classification head.

The policy is loaded as `AutoModelForSequenceClassification` with one label (the scalar reward)
and the tokenizer's pad token (the head reads the last non-pad token). The head is new, so it is
trained in every method: peft's SEQ_CLS task keeps `score` as a fully trained module beside the
LoRA weights; freeze tuning unfreezes it explicitly.

Output (the plan's `output_kind`): a LoRA reward model trained straight on the base is saved as an
adapter (with its head); one trained on top of an earlier adapter (merged in first) is merged and
saved as a full model, as is a full/freeze reward model. Later grpo/rloo/ppo stages load it from
`reward.modelStage`.
"""

from __future__ import annotations

from ..errors import UserError
from ..models import compute_dtype, load_policy
from ..outputs import TrainerLogCallback
from .base import StageContext, StageResult, check_method, common_args, train
from .preference import conclude, load_datasets, load_tokenizer_for

HEAD_NAMES = ("score", "classifier")  # the sequence-classification heads of transformers' models


def run(ctx: StageContext) -> StageResult:
    from trl import RewardConfig, RewardTrainer

    cfg = ctx.cfg
    stage = cfg.stage
    hp = stage.hyperparameters
    check_method(stage, ("lora", "qlora", "full", "freeze"), ctx.where("method"))
    if stage.method == "qlora" and cfg.io.merge_adapter:
        raise UserError(
            "a qlora rm stage after an adapter stage is not supported: the adapter must be merged into "
            "full-precision weights first; use method lora, or put an export stage before it",
            ctx.where("method"),
        )
    tokenizer = load_tokenizer_for(ctx)
    train_ds, eval_ds = load_datasets(ctx)
    dtype = compute_dtype(cfg.model, hp.precision)
    model_path = ctx.resolve(cfg.io.policy.model, "spec.model.name")
    adapter = ctx.resolve(cfg.io.policy.adapter, ctx.where("adapter")) if cfg.io.policy.adapter else None
    model, peft_config = load_policy(
        model_path, adapter, cfg.io.merge_adapter, cfg.model, stage, dtype,
        auto_class="AutoModelForSequenceClassification", num_labels=1, pad_token_id=tokenizer.pad_token_id,
    )
    if stage.method == "freeze":
        for name, p in model.named_parameters():
            if name.split(".")[0] in HEAD_NAMES:
                p.requires_grad_(True)
    args = RewardConfig(
        **common_args(ctx, eval_enabled=eval_ds is not None),
        max_length=hp.cutoff_len,  # RewardTrainer drops longer pairs rather than cutting them
        dataset_num_proc=None,
    )
    log_cb = TrainerLogCallback(ctx.trainer_dir)
    n_pairs = len(train_ds)
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[log_cb, *ctx.callbacks],
    )
    if len(trainer.train_dataset) == 0:
        raise UserError(
            f"all {n_pairs} preference pairs are longer than cutoffLen {hp.cutoff_len} tokens; raise it",
            ctx.where("hyperparameters.cutoffLen"),
        )
    result, duration = train(trainer, ctx)
    merge = stage.method in ("lora", "qlora") and cfg.io.output_kind == "model"
    out = conclude(trainer, tokenizer, result, duration, ctx, log_cb, merge_lora=merge)
    return out

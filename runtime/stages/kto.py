"""`kto` stage on `trl.KTOTrainer`: unpaired desirable/undesirable answers.

Data: prompt/completion with a boolean label (format kto), or LLaMA-Factory's `kto_tag` column on
alpaca/sharegpt records. `preference.beta`, `desirableWeight` and `undesirableWeight` go to
KTOConfig; `lossType` picks KTO's own loss (the default) or `apo_zero_unpaired`. The reference
model is chosen as in the dpo stage (see `preference.py`): TRL's frozen "ref" adapter copy when
the stage continues an adapter, the disabled adapter for a new one, a frozen copy for full/freeze.
"""

from __future__ import annotations

import logging

from ..errors import UserError
from ..outputs import TrainerLogCallback
from .base import StageContext, StageResult, check_method, train
from .preference import (
    check_loss_options,
    conclude,
    load_datasets,
    load_models,
    load_tokenizer_for,
    preference_args,
)

log = logging.getLogger(__name__)


def run(ctx: StageContext) -> StageResult:
    from trl import KTOConfig, KTOTrainer

    stage = ctx.cfg.stage
    pref = stage.preference
    hp = stage.hyperparameters
    check_method(stage, ("lora", "qlora", "full", "freeze"), ctx.where("method"))
    check_loss_options(ctx)
    loss_type = "kto" if pref.loss_type == "sigmoid" else pref.loss_type
    if loss_type == "kto" and hp.batch_size < 2:
        raise UserError(
            "kto needs batchSize of at least 2: its KL estimate pairs each prompt with another "
            "completion of the same batch (raise batchSize and lower gradientAccumulation)",
            ctx.where("hyperparameters.batchSize"),
        )
    tokenizer = load_tokenizer_for(ctx)
    train_ds, eval_ds = load_datasets(ctx)
    labels = train_ds["label"]
    if all(labels) or not any(labels):
        log.warning(
            "stage %s: every KTO example is %s; KTO learns best from both kinds",
            ctx.cfg.name, "desirable" if labels[0] else "undesirable",
        )
    args = KTOConfig(
        **preference_args(ctx, eval_ds is not None),
        loss_type=loss_type,
        desirable_weight=pref.desirable_weight,
        undesirable_weight=pref.undesirable_weight,
    )
    model, peft_config, ref_model = load_models(ctx, with_reference=True)
    log_cb = TrainerLogCallback(ctx.trainer_dir)
    trainer = KTOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[log_cb, *ctx.callbacks],
    )
    result, duration = train(trainer, ctx)
    return conclude(trainer, tokenizer, result, duration, ctx, log_cb)

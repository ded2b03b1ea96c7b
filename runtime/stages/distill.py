"""`distill` stage: knowledge distillation from `stage.teacher` on TRL's DistillationTrainer.

The student (the policy the stage starts from) generates completions for the stage's prompts
on-policy and is trained to match the teacher's next-token distribution on them: the loss is
computed on the teacher's logits (TRL's generalised JSD; we use beta 0, the forward KL
KL(teacher ‖ student), the distillation loss NeMo AutoModel offers). The logged `loss` is that KL
per token, so it falling is the student approaching the teacher.

Prompts come from any conversation data (alpaca, sharegpt, messages: the last answer is
dropped) or prompt data. Rollout length and temperature follow `reward.maxNewTokens` and
`reward.temperature` when the stage sets `reward` (defaults 64 and 1.0). The teacher must share
the student's vocabulary (same tokenizer family).
"""

from __future__ import annotations

import logging

from ..errors import UserError
from ..models import compute_dtype, load_model, load_policy, load_tokenizer
from ..outputs import TrainerLogCallback
from ..spec import RewardSpec
from .base import StageContext, StageResult, check_method, common_args, finish, train
from .online_rl import drop_reference_adapter, prompt_datasets, record_signals

log = logging.getLogger(__name__)

FORWARD_KL = 0.0  # DistillationConfig.beta: 0 = forward KL, 0.5 = JSD, 1 = reverse KL


def load_teacher(ctx: StageContext, dtype, student_vocab: int):
    teacher = ctx.cfg.stage.teacher
    if teacher is None:
        raise UserError("a distill stage needs `teacher` (the teacher model)", ctx.where("teacher"))
    where = ctx.where("teacher.name")
    path = ctx.resolve(teacher.name, where)
    model = load_model(path, teacher, dtype=dtype, where=where)
    vocab = model.get_output_embeddings().weight.shape[0]
    if vocab != student_vocab:
        raise UserError(
            f"the teacher's vocabulary has {vocab} entries but the student's has {student_vocab}: distillation on "
            "logits needs the same tokenizer (pick a teacher of the student's model family)",
            where,
        )
    return model.eval().requires_grad_(False)


def run(ctx: StageContext) -> StageResult:
    from trl import DistillationConfig, DistillationTrainer

    cfg = ctx.cfg
    stage = cfg.stage
    check_method(stage, ("lora", "qlora", "full", "freeze"), ctx.where("method"))
    hp = stage.hyperparameters
    rollout = stage.reward or RewardSpec()
    dtype = compute_dtype(cfg.model, hp.precision)

    train_ds, eval_ds = prompt_datasets(ctx)
    model_path = ctx.resolve(cfg.io.policy.model, "spec.model.name")
    adapter = ctx.resolve(cfg.io.policy.adapter, ctx.where("adapter")) if cfg.io.policy.adapter else None
    tokenizer = load_tokenizer(adapter or model_path, cfg.model, cfg.template)
    tokenizer.padding_side = "left"
    model, peft_config = load_policy(model_path, adapter, cfg.io.merge_adapter, cfg.model, stage, dtype)
    teacher = load_teacher(ctx, dtype, model.get_output_embeddings().weight.shape[0])

    base_args = common_args(ctx, eval_enabled=eval_ds is not None)
    base_args.update(remove_unused_columns=False, include_num_input_tokens_seen="no")
    args = DistillationConfig(
        **base_args,
        max_completion_length=rollout.max_new_tokens,
        temperature=rollout.temperature,
        beta=FORWARD_KL,
        use_vllm=False,
        log_completions=False,
    )
    log_cb = TrainerLogCallback(ctx.trainer_dir)
    trainer = DistillationTrainer(
        model=model,
        teacher_model=teacher,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[log_cb, *ctx.callbacks],
    )
    result, duration = train(trainer, ctx)
    out = finish(trainer, tokenizer, result, duration, ctx, log_cb)
    drop_reference_adapter(out)
    record_signals(out, log_cb, ("loss",))
    return out

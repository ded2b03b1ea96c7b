"""`dpo`, `orpo` and `simpo` stages on TRL's trainers, and what every preference stage shares.

- dpo   → `trl.DPOTrainer` (loss variants by `preference.lossType`, `beta`, `labelSmoothing`, and
          `ftx` as TRL's `"sft"` loss added with that weight — TRL 1.16 has no `rpo_alpha`).
- orpo  → `trl.experimental.orpo.ORPOTrainer` (reference-free; its loss already holds the SFT term).
- simpo → `trl.experimental.cpo.CPOTrainer` with `loss_type="simpo"`, `simpo_gamma`, and `ftx` as
          CPO's behaviour-cloning weight `cpo_alpha` (0 = pure SimPO).

The reference model of dpo (and kto, which shares this module's helpers) is the model the stage
starts from (`io.reference`, which the plan sets to `io.policy`):
- lora/qlora continuing an adapter: TRL's own mechanism. Given a `PeftModel` and no `ref_model`,
  `DPOTrainer`/`KTOTrainer` add a frozen adapter named "ref" that copies the loaded "default"
  adapter and compute the reference log-probs with it active — i.e. base + the previous
  stage's adapter, frozen. The "ref" copy is dropped again before the output is saved.
- lora/qlora with a new adapter: TRL disables the adapter for the reference: the base model.
- full/freeze: we load a separate frozen reference ourselves (base, with the previous adapter
  merged when there was one). TRL's fallback would reload `config._name_or_path`, which is the
  base *without* the merged adapter — the wrong model after an sft lora stage.
"""

from __future__ import annotations

from typing import Any

from ..errors import UserError
from ..outputs import TrainerLogCallback, write_run_summary
from ..spec import DPO_LOSS_TYPES, KTO_LOSS_TYPES  # declared with the spec, which validates them too
from .base import StageContext, StageResult, check_method, common_args, finish, train

LABEL_SMOOTHING_LOSSES = ("robust", "exo_pair")

# The stage's own signal, copied from trainer_log.jsonl into run.json (TRL's metric names).
SIGNALS: dict[str, tuple[str, ...]] = {
    "dpo": ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"),
    "simpo": ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"),
    "orpo": ("rewards/accuracies", "rewards/margins", "log_odds_ratio", "nll_loss"),
    "kto": ("rewards/chosen", "rewards/rejected", "rewards/margins", "kl"),
    "rm": ("accuracy", "margin", "mean_reward"),
}


# ------------------------------------------------------------------------------ shared helpers


def signal(log_cb: TrainerLogCallback, keys: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """First and final logged value of each of the stage's signal keys (trainer_log.jsonl keeps
    every numeric value the trainer logs, under TRL's names)."""
    out = {}
    for key in keys:
        values = [r[key] for r in log_cb.records if key in r]
        if values:
            out[key] = {"first": values[0], "final": values[-1]}
    return out


def check_loss_options(ctx: StageContext) -> None:
    """lossType / labelSmoothing / ftx against what the stage's TRL trainer accepts."""
    stage = ctx.cfg.stage
    pref = stage.preference
    where = ctx.where("preference.lossType")
    if stage.type == "dpo":
        if pref.loss_type not in DPO_LOSS_TYPES:
            raise UserError(f"unknown DPO loss type {pref.loss_type!r}; valid: {', '.join(DPO_LOSS_TYPES)}", where)
        if pref.loss_type == "robust" and not pref.label_smoothing < 0.5:
            raise UserError("robust DPO needs labelSmoothing below 0.5 (the label-flip probability)", ctx.where("preference.labelSmoothing"))
        if pref.loss_type == "exo_pair" and pref.label_smoothing == 0:
            raise UserError("exo_pair needs labelSmoothing > 0 (the EXO paper suggests 1e-3)", ctx.where("preference.labelSmoothing"))
    elif stage.type == "kto":
        if pref.loss_type not in ("sigmoid", *KTO_LOSS_TYPES):
            raise UserError(f"unknown KTO loss type {pref.loss_type!r}; valid: {', '.join(KTO_LOSS_TYPES)}", where)
    elif pref.loss_type != "sigmoid":
        raise UserError(
            f"lossType {pref.loss_type!r} does not apply to {stage.type} stages (they have one loss); "
            "remove it, or use a dpo stage for DPO's loss variants",
            where,
        )
    if pref.label_smoothing > 0 and not (stage.type == "dpo" and pref.loss_type in LABEL_SMOOTHING_LOSSES):
        raise UserError(
            f"labelSmoothing is used only by dpo stages with lossType {' or '.join(LABEL_SMOOTHING_LOSSES)}",
            ctx.where("preference.labelSmoothing"),
        )
    if pref.ftx > 0 and stage.type in ("orpo", "kto"):
        why = "ORPO's loss already holds the SFT term" if stage.type == "orpo" else "KTO has no SFT term in TRL"
        raise UserError(f"ftx does not apply to {stage.type} stages: {why}", ctx.where("preference.ftx"))


def load_datasets(ctx: StageContext):
    """The stage's data as TRL's conversational preference (or KTO) examples, and its eval part
    (evalData, or a held-out valSize)."""
    from datasets import Dataset

    from ..data.prepare import KIND_OF_STAGE, train_eval_examples

    cfg = ctx.cfg
    train, evals = train_eval_examples(cfg, KIND_OF_STAGE[cfg.stage.type], ctx.base_dir, ctx.fetch)
    return Dataset.from_list(train), (Dataset.from_list(evals) if evals else None)


def load_tokenizer_for(ctx: StageContext):
    from ..models import load_tokenizer

    cfg = ctx.cfg
    model_path = ctx.resolve(cfg.io.policy.model, "spec.model.name")
    adapter = ctx.resolve(cfg.io.policy.adapter, ctx.where("adapter")) if cfg.io.policy.adapter else None
    # A previous stage's output folder carries the tokenizer (and chat template) it trained with.
    return load_tokenizer(adapter or model_path, cfg.model, cfg.template)


def load_models(ctx: StageContext, *, with_reference: bool):
    """(policy, peft_config, ref_model) for a causal-LM preference stage; see the module doc for
    which reference each method gets. ref_model is None where TRL derives the reference."""
    from ..models import compute_dtype, load_policy

    cfg = ctx.cfg
    stage = cfg.stage
    dtype = compute_dtype(cfg.model, stage.hyperparameters.precision)
    model_path = ctx.resolve(cfg.io.policy.model, "spec.model.name")
    adapter = ctx.resolve(cfg.io.policy.adapter, ctx.where("adapter")) if cfg.io.policy.adapter else None
    model, peft_config = load_policy(model_path, adapter, cfg.io.merge_adapter, cfg.model, stage, dtype)
    ref_model = None
    if with_reference:
        ref = cfg.io.reference or cfg.io.policy
        trl_derives_it = stage.method in ("lora", "qlora") and ref == cfg.io.policy and not cfg.io.merge_adapter
        if not trl_derives_it:
            ref_model = load_frozen(ctx, ref.model, ref.adapter, dtype)
    return model, peft_config, ref_model


def load_frozen(ctx: StageContext, model_ref: str, adapter_ref: str | None, dtype):
    """A frozen copy of model (+ adapter merged in), in eval mode: the reference model."""
    from ..models import load_model

    cfg = ctx.cfg
    path = ctx.resolve(model_ref, "spec.model.name")
    m = load_model(path, cfg.model, dtype=dtype)
    if adapter_ref:
        from peft import PeftModel

        m = PeftModel.from_pretrained(m, ctx.resolve(adapter_ref, ctx.where("reference"))).merge_and_unload()
    m.requires_grad_(False)
    return m.eval()


def drop_reference_adapter(trainer) -> None:
    """Remove TRL's frozen "ref" adapter copy so the output holds only the trained adapter."""
    model = trainer.model
    if hasattr(model, "peft_config") and "ref" in model.peft_config:
        model.delete_adapter("ref")


def preference_args(ctx: StageContext, eval_enabled: bool) -> dict[str, Any]:
    hp = ctx.cfg.stage.hyperparameters
    return dict(
        **common_args(ctx, eval_enabled=eval_enabled),
        max_length=hp.cutoff_len,
        beta=ctx.cfg.stage.preference.beta,
        dataset_num_proc=None,
    )


def conclude(trainer, tokenizer, result, duration, ctx: StageContext, log_cb: TrainerLogCallback, merge_lora: bool = False) -> StageResult:
    drop_reference_adapter(trainer)
    out = finish(trainer, tokenizer, result, duration, ctx, log_cb, merge_lora=merge_lora)
    pref = ctx.cfg.stage.preference
    extra: dict[str, Any] = {"signal": signal(log_cb, SIGNALS[ctx.cfg.stage.type])}
    if ctx.cfg.stage.type != "rm":
        extra["preference"] = pref.model_dump(by_alias=True)
    if ctx.cfg.stage.type in ("dpo", "kto") and ctx.cfg.io.reference:  # orpo and simpo have none
        extra["reference"] = ctx.cfg.io.reference.model_dump(exclude_none=True)
    out.summary.update(extra)
    write_run_summary(out.output_dir / "run.json", out.summary)
    return out


# ---------------------------------------------------------------------------------- the stages


def run(ctx: StageContext) -> StageResult:
    stage = ctx.cfg.stage
    check_method(stage, ("lora", "qlora", "full", "freeze"), ctx.where("method"))
    check_loss_options(ctx)
    tokenizer = load_tokenizer_for(ctx)
    train_ds, eval_ds = load_datasets(ctx)
    log_cb = TrainerLogCallback(ctx.trainer_dir)
    trainer = {"dpo": _dpo, "orpo": _orpo, "simpo": _simpo}[stage.type](ctx, tokenizer, train_ds, eval_ds, log_cb)
    result, duration = train(trainer, ctx)
    return conclude(trainer, tokenizer, result, duration, ctx, log_cb)


def _dpo(ctx, tokenizer, train_ds, eval_ds, log_cb):
    from trl import DPOConfig, DPOTrainer

    pref = ctx.cfg.stage.preference
    loss_type, weights = [pref.loss_type], None
    if pref.ftx > 0:  # LLaMA-Factory's pref_ftx: an SFT loss on the chosen answer, added with this weight
        loss_type, weights = [pref.loss_type, "sft"], [1.0, pref.ftx]
    args = DPOConfig(
        **preference_args(ctx, eval_ds is not None),
        loss_type=loss_type,
        loss_weights=weights,
        label_smoothing=pref.label_smoothing,
    )
    model, peft_config, ref_model = load_models(ctx, with_reference=True)
    return DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[log_cb, *ctx.callbacks],
    )


def _orpo(ctx, tokenizer, train_ds, eval_ds, log_cb):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    args = ORPOConfig(**preference_args(ctx, eval_ds is not None))
    model, peft_config, _ = load_models(ctx, with_reference=False)
    return ORPOTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[log_cb, *ctx.callbacks],
    )


def _simpo(ctx, tokenizer, train_ds, eval_ds, log_cb):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    pref = ctx.cfg.stage.preference
    args = CPOConfig(
        **preference_args(ctx, eval_ds is not None),
        loss_type="simpo",
        simpo_gamma=pref.simpo_gamma,
        cpo_alpha=pref.ftx,  # CPO's behaviour-cloning (SFT) term; 0 = SimPO as published
    )
    model, peft_config, _ = load_models(ctx, with_reference=False)
    return CPOTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[log_cb, *ctx.callbacks],
    )

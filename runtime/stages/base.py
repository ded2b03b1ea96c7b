"""What every stage is given and returns (its context, its result), the TrainingArguments of its
hyperparameters and the summary of a training run (`run.json`).

A stage module is a thin adapter: resolved stage config → a TRL trainer and its config, on the
skeleton of `trainer_stage.py`. The cross-cutting parts (progress, metrics, checkpoint upload,
trainer_log.jsonl) arrive as `TrainerCallback`s in the context, never woven into the stage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..api.plan import ResolvedStage


@dataclass
class StageContext:
    cfg: ResolvedStage
    work_dir: Path  # this stage's local scratch: trainer checkpoints and the staged output
    resolve: Callable[[str, str], str]  # (model/adapter/data reference, field) → local path or hub id
    callbacks: list[Any] = field(default_factory=list)
    resume_from: Path | None = None  # a committed checkpoint, downloaded
    base_dir: Path | None = None  # where relative data paths are looked up too (the job file's folder)
    fetch: Callable[[str], Path] | None = None  # s3:// data → local cache path
    eval_examples: int | None = None  # examples of the eval set before packing (else the trainer's eval rows)

    @property
    def trainer_dir(self) -> Path:
        return self.work_dir / "trainer"

    @property
    def output_dir(self) -> Path:
        return self.work_dir / "output"

    def where(self, field_name: str = "") -> str:
        return f"spec.stages[{self.cfg.index}]{'.' + field_name if field_name else ''}"

    def policy_paths(self) -> tuple[str, str | None]:
        """(the model the stage starts from, the adapter an earlier stage left on it or None), local or hub ids."""
        policy = self.cfg.io.policy
        model = self.resolve(policy.model, "spec.model.name")
        return model, (self.resolve(policy.adapter, self.where("adapter")) if policy.adapter else None)


@dataclass
class StageResult:
    output_dir: Path
    summary: dict[str, Any]


def uses_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def common_args(ctx: StageContext, *, eval_enabled: bool = False) -> dict[str, Any]:
    """transformers.TrainingArguments fields from the stage's hyperparameters and checkpoint policy."""
    from ..models import bf16_ok

    cfg = ctx.cfg
    hp = cfg.stage.hyperparameters
    cuda = uses_cuda()
    bf16 = hp.precision == "bf16" or (hp.precision == "auto" and bf16_ok())
    if hp.precision == "bf16" and not cuda:
        bf16 = False  # CPU training in fp32: bf16 autocast on CPU is slow and lossy
    warmup: float | int = hp.warmup_steps if hp.warmup_steps > 0 else hp.warmup_ratio
    checkpointing = hp.gradient_checkpointing
    if checkpointing is None:  # unset: recompute on a GPU only when the activations would not fit
        checkpointing = not _activations_fit(ctx) if cuda else True
    args: dict[str, Any] = dict(
        output_dir=str(ctx.trainer_dir),
        num_train_epochs=hp.epochs,
        max_steps=hp.max_steps or -1,
        per_device_train_batch_size=hp.batch_size,
        per_device_eval_batch_size=hp.batch_size,
        gradient_accumulation_steps=hp.gradient_accumulation,
        learning_rate=hp.learning_rate,
        lr_scheduler_type=hp.lr_scheduler,
        warmup_steps=warmup,
        weight_decay=hp.weight_decay,
        max_grad_norm=hp.max_grad_norm,
        bf16=bf16,
        fp16=hp.precision == "fp16" and cuda,
        gradient_checkpointing=checkpointing,  # TRL's config still reads this name
        seed=hp.seed,
        data_seed=hp.seed,
        logging_steps=hp.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=cfg.checkpoint.every_steps,
        save_total_limit=cfg.checkpoint.keep + 1,
        **report_args(ctx),
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        dataloader_pin_memory=cuda,
        remove_unused_columns=True,
    )
    if hp.min_lr is not None:  # cosine_with_min_lr (the spec pairs the two)
        args["lr_scheduler_kwargs"] = {"min_lr": hp.min_lr}
    if hp.torch_compile:
        args["torch_compile"] = True
        if hp.torch_compile_mode:
            args["torch_compile_mode"] = hp.torch_compile_mode
    from ..optimizers import training_args as optimizer_args  # optim (+ GaLore/APOLLO knobs), Adam betas

    args.update(optimizer_args(hp, cuda, ctx.where("hyperparameters.optimizer")))
    if gradient_checkpointing_kwargs := ({"use_reentrant": False} if checkpointing else None):
        args["gradient_checkpointing_kwargs"] = gradient_checkpointing_kwargs
    from ..launcher import distributed_args  # DDP / FSDP when several processes train (torchrun)

    args.update(distributed_args(cfg.resources, cfg.stage.method, cuda=cuda,
                                 gradient_checkpointing=args["gradient_checkpointing"]))
    if not args["gradient_checkpointing"]:
        args.pop("gradient_checkpointing_kwargs", None)
    if eval_enabled:
        args["eval_strategy"] = "steps" if hp.eval_steps else "epoch"
        if hp.eval_steps:
            args["eval_steps"] = hp.eval_steps
    return args


def report_args(ctx: StageContext) -> dict[str, Any]:
    """report_to / run_name of spec.tracking (the rest of the trackers' settings is in the
    environment the stage runs in: tracking.tracking_environment)."""
    from ..tracking import require_trackers, run_name

    trackers = ctx.cfg.tracking.report_to
    if not trackers:
        return {"report_to": "none"}
    require_trackers(trackers)
    return {"report_to": list(trackers), "run_name": run_name(ctx.cfg)}


def _activations_fit(ctx: StageContext) -> bool:
    """Whether the stage fits on this GPU without recomputing activations: `kubetune
    estimate`'s per-device figure with gradient checkpointing off, under 90 % of the card.
    Unknown shapes, or any error, keep gradient checkpointing on."""
    try:
        import torch

        from ..estimate import estimate_stage, model_arch

        cfg = ctx.cfg
        arch = model_arch(ctx.resolve(cfg.io.policy.model, "spec.model.name"))
        need = estimate_stage(arch, cfg.stage, cfg.model, cfg.resources, grad_ckpt=False).total
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        return need < 0.9 * total
    except Exception as err:  # noqa: BLE001 - a guess must never fail a stage
        import logging

        logging.getLogger(__name__).debug("activation estimate failed (%s); keeping gradient checkpointing", err)
        return False


def summarize(trainer, result, duration: float, ctx: StageContext, log_records: list[dict[str, Any]]) -> dict[str, Any]:
    state = trainer.state
    losses = [r["loss"] for r in log_records if "loss" in r]
    evals = [r["eval_loss"] for r in log_records if "eval_loss" in r]
    tokens = getattr(state, "num_input_tokens_seen", 0) or 0
    trained = tokens - tokens_at(ctx.resume_from)  # by this run: a resumed one starts at its checkpoint's count
    return {
        "job": ctx.cfg.job,
        "stage": ctx.cfg.name,
        "type": ctx.cfg.stage.type,
        "method": ctx.cfg.stage.method,
        "steps": state.global_step,
        "total_steps": state.max_steps,
        "epochs": round(state.epoch or 0.0, 4),
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "train_loss": result.training_loss if result is not None else None,
        "eval_loss": evals[-1] if evals else None,
        "eval_examples": ctx.eval_examples if ctx.eval_examples is not None else _size(getattr(trainer, "eval_dataset", None)),
        "duration_seconds": round(duration, 3),
        "tokens": tokens,
        "tokens_this_run": trained,
        "tokens_per_second": round(trained / duration, 2) if duration > 0 and trained > 0 else None,
        "resumed_from_step": _step_of(ctx.resume_from),
        "optimizer": _optimizer_name(trainer),
        "output_kind": ctx.cfg.io.output_kind,
        # what the base was quantised to (qlora): `kubetune chat` loads it the same way
        "quantization": (ctx.cfg.stage.quantization.model_dump() if ctx.cfg.stage.method == "qlora"
                         and ctx.cfg.stage.quantization else None),
    }


def _size(dataset) -> int | None:
    try:
        return len(dataset) if dataset is not None else None
    except TypeError:
        return None


def _optimizer_name(trainer) -> str | None:
    """The class of the optimizer that trained (under accelerate's wrapper), e.g. galore_torch.adamw.AdamW."""
    opt = getattr(trainer, "optimizer", None)
    opt = getattr(opt, "optimizer", opt)
    return f"{type(opt).__module__}.{type(opt).__qualname__}" if opt is not None else None


def tokens_at(checkpoint: Path | None) -> int:
    """The input tokens the stage had trained on when `checkpoint` was saved (0: no checkpoint)."""
    if checkpoint is None:
        return 0
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return 0
    return int(state.get("num_input_tokens_seen") or 0)


def _step_of(path: Path | None) -> int | None:
    if path is None:
        return None
    tail = path.name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None

"""The one skeleton of every training stage.

`Stage` is the preamble they share: the policy's paths (model, and the adapter an earlier stage
left), the weights' dtype, the tokenizer, `load_policy`, the trainer log, and `finish`: the model
saved without TRL's frozen "ref" adapter, `trainer_log.jsonl`, the loss plot and one `run.json`
(the summary, the stage's own `signal` — first and final logged value of each of its metrics —
and what `summary()` adds).

`TrainerStage` runs a (TRL) `Trainer` on it: check → tokenizer → datasets → config → model →
trainer → train (LoRA+, the optimizers built by `runtime/optimizers.py`, resume) → finish. A
stage module only says what is its own: its TRL classes, its data, its config fields and, where
it has them, its checks, trainer arguments and summary fields. The ppo stage is a loop of its
own on the same preamble.
"""

from __future__ import annotations

import time
from functools import cached_property
from importlib import import_module
from typing import Any

from ..models import compute_dtype, load_policy, load_tokenizer
from ..outputs import TrainerLogCallback, plot_loss, write_run_summary
from .base import StageContext, StageResult, common_args, summarize

LORA_METHODS = ("lora", "qlora")


class Stage:
    """What every training stage starts and ends with."""

    signals: tuple[str, ...] = ()  # the stage's own metrics (TRL's names), first and final into run.json
    padding_side: str | None = None  # "left" where the stage generates from its prompts
    merge_lora = False  # save a LoRA policy merged into its base (a full model)

    def __init__(self, ctx: StageContext):
        self.ctx, self.cfg = ctx, ctx.cfg
        self.stage = ctx.cfg.stage
        self.hp = self.stage.hyperparameters
        self.dtype = compute_dtype(self.cfg.model, self.hp.precision)

    @classmethod
    def run(cls, ctx: StageContext) -> StageResult:
        return cls(ctx).execute()

    def execute(self) -> StageResult:
        raise NotImplementedError

    def check(self) -> None:
        """The stage's own checks of its settings: they fail before anything is loaded."""

    @cached_property
    def policy_paths(self) -> tuple[str, str | None]:
        return self.ctx.policy_paths()

    @property
    def model_path(self) -> str:
        return self.policy_paths[0]

    @property
    def adapter(self) -> str | None:
        return self.policy_paths[1]

    @cached_property
    def log_cb(self) -> TrainerLogCallback:
        return TrainerLogCallback(self.ctx.trainer_dir)

    def load_tokenizer(self):
        # A previous stage's output folder carries the tokenizer (and chat template) it trained with.
        tokenizer = load_tokenizer(self.adapter or self.model_path, self.cfg.model, self.cfg.template)
        if self.padding_side:
            tokenizer.padding_side = self.padding_side
        return tokenizer

    def load_policy(self, **kwargs: Any):
        """(model, peft_config or None): the base with the previous stage's adapter continued or merged."""
        return load_policy(self.model_path, self.adapter, self.cfg.io.merge_adapter, self.cfg.model, self.stage,
                           self.dtype, **kwargs)

    def summary(self) -> dict[str, Any]:
        """The stage's own fields of run.json."""
        return {}

    def finish(self, trainer, tokenizer, result, duration: float) -> StageResult:
        """Save the model (adapter or full) in HF format with the tokenizer, the log, plot and run.json.
        `trainer` is a Trainer, or anything with its model, state, optimizer and save_model."""
        out = self.ctx.output_dir
        out.mkdir(parents=True, exist_ok=True)
        model = trainer.model
        if "ref" in (getattr(model, "peft_config", None) or {}):  # TRL's frozen copy of the continued adapter
            model.delete_adapter("ref")
        if self.merge_lora and hasattr(model, "merge_and_unload"):
            model.merge_and_unload().save_pretrained(out)
        else:
            trainer.save_model(str(out))
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        log_cb, cfg = self.log_cb, self.cfg
        (out / "trainer_log.jsonl").write_text(log_cb.path.read_text() if log_cb.path.exists() else "")
        plot_loss(log_cb.records, out / "training_loss.png", f"{cfg.job} / {cfg.name} ({self.stage.type}, {self.stage.method})")
        summary = summarize(trainer, result, duration, self.ctx, log_cb.records)
        if self.signals:
            summary["signal"] = signal(log_cb.records, self.signals)
        summary.update(self.summary())
        write_run_summary(out / "run.json", summary)
        return StageResult(out, summary)


def signal(records: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """First and final logged value of each key that was logged (trainer_log.jsonl keeps every
    numeric value the trainer logs, under TRL's names)."""
    out = {}
    for key in keys:
        values = [r[key] for r in records if key in r]
        if values:
            out[key] = {"first": values[0], "final": values[-1]}
    return out


class TrainerStage(Stage):
    """A stage that is one Trainer run."""

    # (module, config class, trainer class): TRL's pair for this stage, imported when the stage runs
    trl_classes: tuple[str, str, str]

    def classes(self) -> tuple[type, type]:
        """(the TRL config class, the trainer class), imported here: they pull in trl."""
        module = import_module(self.trl_classes[0])
        return getattr(module, self.trl_classes[1]), getattr(module, self.trl_classes[2])

    def datasets(self) -> tuple[Any, Any]:
        """(train, eval or None)."""
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """The config's own fields; they win over the TrainingArguments of `common_args`."""
        return {}

    def load_model(self):
        return self.load_policy()

    def trainer_kwargs(self) -> dict[str, Any]:
        """The trainer's own arguments (ref_model, reward_funcs, ...)."""
        return {}

    def prepare(self, trainer) -> None:
        """Called with the trainer before it trains."""

    def execute(self) -> StageResult:
        self.check()
        self.tokenizer = self.load_tokenizer()
        self.train_ds, self.eval_ds = self.datasets()
        config_cls, trainer_cls = self.classes()
        args = config_cls(**{**common_args(self.ctx, eval_enabled=self.eval_ds is not None), **self.options()})
        self.model, self.peft_config = self.load_model()
        trainer = trainer_cls(
            model=self.model,
            args=args,
            train_dataset=self.train_ds,
            eval_dataset=self.eval_ds,
            processing_class=self.tokenizer,
            peft_config=self.peft_config,
            callbacks=[self.log_cb, *self.ctx.callbacks],
            **self.trainer_kwargs(),
        )
        self.prepare(trainer)
        result, duration = train(trainer, self.ctx)
        return self.finish(trainer, self.tokenizer, result, duration)


def train(trainer, ctx: StageContext) -> tuple[Any, float]:
    """Run the trainer, resuming from the context's checkpoint when there is one."""
    from transformers.trainer_callback import PrinterCallback

    from ..optimizers import install

    trainer.remove_callback(PrinterCallback)  # our progress bar and trainer_log.jsonl say it better
    install(trainer, ctx.cfg.stage.hyperparameters)  # Adam-mini, Muon, BAdam: built by the Trainer's factory hook
    if loraplus_ratio(ctx.cfg.stage):  # built by the same hook, on the (peft) model the Trainer trains
        trainer.optimizer_cls_and_kwargs = (lambda: _loraplus_factory, {"stage": ctx.cfg.stage, "args": trainer.args})
    started = time.time()
    resume = str(ctx.resume_from) if ctx.resume_from else None
    result = trainer.train(resume_from_checkpoint=resume)
    return result, time.time() - started


def loraplus_ratio(stage) -> float | None:
    """lora.loraplusLrRatio where it applies: adapter stages."""
    return stage.lora.loraplus_lr_ratio if stage.method in LORA_METHODS else None


def loraplus_optimizer(model, args, ratio: float):
    """LoRA+ through peft's optimizer factory: hyperparameters.optimizer, built with the class and
    settings transformers gives the Trainer (AdamW by default, its betas and epsilon), the B
    matrices' groups at ratio × the learning rate and hyperparameters.weightDecay on the decayed
    groups (peft's own default would be none)."""
    from peft.optimizers import create_loraplus_optimizer
    from transformers import Trainer

    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    kwargs = dict(kwargs)
    lr = kwargs.pop("lr", args.learning_rate)
    return create_loraplus_optimizer(model=model, optimizer_cls=optimizer_cls, lr=lr, loraplus_lr_ratio=ratio,
                                     loraplus_weight_decay=args.weight_decay, **kwargs)


def _loraplus_factory(model, *, stage, args):
    return loraplus_optimizer(model, args, loraplus_ratio(stage))

"""The stage types: one declaration each, and everything else derives from it.

`STAGE_TYPES` is read by the spec (the `type` enum, default learning rates, the CEL rules that
depend on the type), the plan (reference models, evaluation data, packing), the estimator, the
data loading (what a stage's datasets are converted to) and the stage lookup
(`runtime/stages/__init__.py`). Adding a type is one entry here and one module under
`runtime/stages/` (CONTRIBUTING.md, "Adding a stage type"); tests/unit/test_stage_types.py walks
every entry through validate → plan → estimate → stage lookup.

Torch-free and light: the operator imports it through the spec.
"""

from __future__ import annotations

from dataclasses import dataclass

# The loss variants DPOTrainer accepts in TRL 1.16 (DPOConfig.loss_type / DPOTrainer._compute_loss);
# tests/runtime/test_preference.py checks this tuple against the installed TRL's own list.
DPO_LOSS_TYPES: tuple[str, ...] = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)
# The DPO losses that read DPOConfig.label_smoothing (TRL 1.16 DPOTrainer._compute_loss; the sigmoid
# loss no longer does); tests/runtime/test_preference.py checks this against the installed TRL.
DPO_LABEL_SMOOTHING_LOSSES: tuple[str, ...] = ("exo_pair", "robust", "aot", "aot_unpaired")
# KTOConfig.loss_type choices; our spec's default `sigmoid` means KTO's own loss in a kto stage.
KTO_LOSS_TYPES: tuple[str, ...] = ("kto", "apo_zero_unpaired")

# Hyperparameters that not every stage type can honour: a type lists those it does in `accepts`,
# and the spec rejects them (naming the field) on the others.
GATED_HYPERPARAMETERS: tuple[str, ...] = ("neftuneAlpha", "torchCompile")

SFT_LR = (1e-4, 1e-5)  # default learning rate (lora/qlora, full/freeze), LLaMA-Factory's
PREFERENCE_LR = (5e-5, 5e-6)  # preference and RL stages


@dataclass(frozen=True)
class StageTypeInfo:
    name: str
    module: str  # runtime/stages/<module>.py; its `run(ctx)` runs the stage
    data_kind: str | None  # what runtime/data converts the stage's datasets to; None: reads no data
    learning_rates: tuple[float, float] | None  # default (lora/qlora, full/freeze); None: trains nothing
    accepts: frozenset[str] = frozenset({"torchCompile"})  # which GATED_HYPERPARAMETERS it honours
    reference_model: bool = False  # a frozen reference policy: the policy the stage starts from
    needs_reward: bool = False  # reward.modelStage or reward.functions required
    needs_teacher: bool = False  # `teacher` required (a second model held next to the policy)
    generates: bool = False  # samples completions while it trains
    preference: bool = False  # reads the `preference` settings (beta, ftx, ...)
    sft_term: bool = False  # preference.ftx adds an SFT loss on the chosen answer (dpo: TRL's sft loss; simpo: cpo_alpha)
    loss_types: tuple[str, ...] = ("sigmoid",)  # preference.lossType values (the default sigmoid first)
    choice_data: bool = False  # reads format choice (multiple-choice) datasets
    evaluates: bool = True  # has an evaluation pass (evalData, valSize)
    changes_policy: bool = True  # its output becomes the policy of the next stage
    own_loop: bool = False  # its own training loop, not a Trainer: optimizers only as transformers names them
    packing: bool = False  # the default of hyperparameters.packing
    streams: bool = False  # reads a `streaming: true` dataset a batch at a time (the others read their data whole)

    @property
    def trains(self) -> bool:
        return self.learning_rates is not None

    @property
    def paired(self) -> bool:
        """Chosen and rejected answers go through the model together (twice the activations)."""
        return self.data_kind == "preference"


_SFT_LIKE = frozenset({"torchCompile", "neftuneAlpha"})  # SFTTrainer's neftune_noise_alpha

STAGE_TYPES: dict[str, StageTypeInfo] = {t.name: t for t in (
    StageTypeInfo("pt", "sft", "text", SFT_LR, accepts=_SFT_LIKE, packing=True, streams=True),
    StageTypeInfo("sft", "sft", "conversation", SFT_LR, accepts=_SFT_LIKE, streams=True),
    StageTypeInfo("rm", "reward", "preference", SFT_LR, changes_policy=False),
    StageTypeInfo("dpo", "preference", "preference", PREFERENCE_LR, preference=True, reference_model=True,
                  loss_types=DPO_LOSS_TYPES, sft_term=True),
    StageTypeInfo("kto", "kto", "kto", PREFERENCE_LR, preference=True, reference_model=True,
                  loss_types=("sigmoid",) + KTO_LOSS_TYPES),
    # reference-free: TRL's ORPOTrainer (its loss holds the SFT term already), and CPOTrainer with loss_type simpo
    StageTypeInfo("orpo", "preference", "preference", PREFERENCE_LR, preference=True),
    StageTypeInfo("simpo", "preference", "preference", PREFERENCE_LR, preference=True, sft_term=True),
    StageTypeInfo("ppo", "ppo", "prompt", PREFERENCE_LR, accepts=frozenset(), reference_model=True, needs_reward=True,
                  generates=True, evaluates=False, own_loop=True),
    StageTypeInfo("grpo", "online_rl", "prompt", PREFERENCE_LR, reference_model=True, needs_reward=True, generates=True),
    StageTypeInfo("rloo", "online_rl", "prompt", PREFERENCE_LR, reference_model=True, needs_reward=True, generates=True),
    StageTypeInfo("distill", "distill", "conversation", SFT_LR, needs_teacher=True, generates=True),
    StageTypeInfo("export", "export", None, None, accepts=frozenset(), evaluates=False),
    # generation datasets are read as conversations, format choice datasets as kind "choice"
    StageTypeInfo("eval", "evaluate", "conversation", None, accepts=frozenset(), choice_data=True, changes_policy=False),
)}


def types_where(predicate) -> tuple[str, ...]:
    """The names of the types `predicate(info)` holds for, in declaration order."""
    return tuple(name for name, info in STAGE_TYPES.items() if predicate(info))


def default_learning_rate(stage_type: str, method: str) -> float | None:
    """LLaMA-Factory-style defaults by stage type and method (None: the type trains nothing)."""
    rates = STAGE_TYPES[stage_type].learning_rates
    return None if rates is None else rates[method in ("full", "freeze")]


def stage_kind(stage_type: str, method: str) -> str:
    """How a stage is named to users: `sft/lora`, or `export` for a type that trains nothing (a type
    this version does not know, e.g. a newer CRD's, keeps its method)."""
    info = STAGE_TYPES.get(stage_type)
    return stage_type if info is not None and not info.trains else f"{stage_type}/{method}"

"""The plan: a pure function from a FineTuneJob to the ordered, fully resolved stage configs.

Each `ResolvedStage` says everything one stage needs and nothing it must look up: the model to
load and the adapter to apply, its reference and reward models, its data, where it writes its
checkpoints and output, and every default already filled in. Local mode runs them in-process;
the operator puts each one in a ConfigMap for the stage's pods. Both validate it with this model.

Chaining (what each stage reads):
- The *policy* flows through the stages: it starts as the base model. A lora/qlora stage that
  follows an adapter keeps training that adapter; a full/freeze stage merges it first. A stage's
  output becomes the policy of the next one.
- Stage types with a reference model (runtime/api/stage_types.py: dpo, kto, ppo, grpo, rloo) use the
  policy they start from as it; orpo and simpo are reference-free.
- `rm` stages train a reward model from the current policy, but do not change the policy;
  grpo/rloo/ppo stages name one in `reward.modelStage`.
- `export` merges the policy's adapter into its model and writes a standalone model.
- `eval` scores the policy (its adapter applied, not merged) on its data and writes results; like
  `rm` it does not change the policy, so `sft → eval → dpo` evaluates sft and dpo continues it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .spec import (
    CheckpointSpec,
    DatasetSpec,
    FineTuneJob,
    ModelSpec,
    ResourcesSpec,
    Spec,
    StageSpec,
    StorageSpec,
    TrackingSpec,
    default_learning_rate,
)
from .stage_types import STAGE_TYPES

ADAPTER_METHODS = ("lora", "qlora")


class ModelRef(Spec):
    """A model as a stage loads it: weights, plus optionally an adapter on top."""

    model: str = Field(description="Model weights: an id, a local path or a storage URI.")
    adapter: str | None = Field(None, description="A peft adapter to apply on top of `model`.")


class StageIO(Spec):
    policy: ModelRef = Field(description="What this stage starts from.")
    merge_adapter: bool = Field(
        False, description="Merge policy.adapter into the weights before training (full/freeze/rm/export)."
    )
    reference: ModelRef | None = Field(None, description="Reference model of preference/RL stages.")
    reward: ModelRef | None = Field(None, description="Reward model (from an rm stage) of RL stages.")
    output: str = Field(description="Where the stage's output is committed.")
    output_kind: Literal["adapter", "model", "results"] = Field(
        description="An adapter, a full model, or evaluation results (an eval stage).")
    checkpoints: str = Field(description="Where the stage's checkpoints are committed.")
    stage_root: str = Field(description="The stage's folder in storage (holds output/ and checkpoints/).")


class ResolvedStage(Spec):
    job: str = Field(description="FineTuneJob name.")
    namespace: str | None = Field(None, description="FineTuneJob namespace (cluster mode).")
    index: int = Field(description="Position of the stage (0-based).")
    count: int = Field(description="Number of stages in the job.")
    stage: StageSpec = Field(description="The stage, every default resolved.")
    model: ModelSpec = Field(description="The job's base model (loading options apply to every stage).")
    template: str | None = Field(None, description="Named chat template, if any.")
    data: list[DatasetSpec] = Field(default_factory=list, description="The stage's datasets.")
    eval_data: list[DatasetSpec] = Field(
        default_factory=list, description="The stage's evaluation datasets (empty: valSize, or no eval)."
    )
    io: StageIO = Field(description="What the stage reads and writes.")
    storage: StorageSpec = Field(description="Storage settings (no secrets).")
    checkpoint: CheckpointSpec = Field(description="Checkpoint policy.")
    resources: ResourcesSpec = Field(description="Resources (for the launcher).")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec, description="Experiment tracking (secret names only).")
    outputs: Literal["reuse", "overwrite"] = Field(
        "reuse", description="runPolicy.outputs: what to do with an output committed by an earlier run."
    )
    run: str | None = Field(
        None,
        description="This run's identity, written into every commit marker: the FineTuneJob's uid in a "
        "cluster (the same for all of a stage's pods and retries, new when the job is deleted and "
        "applied again), a fresh one per `kubetune run`.",
    )

    @property
    def name(self) -> str:
        return self.stage.name


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def resolve_stage_defaults(stage: StageSpec) -> StageSpec:
    """Fill in defaults that depend on the stage type or method."""
    hp = stage.hyperparameters
    updates = {}
    if hp.learning_rate is None and STAGE_TYPES[stage.type].trains:
        updates["learning_rate"] = default_learning_rate(stage)
    if hp.packing is None:
        updates["packing"] = STAGE_TYPES[stage.type].packing
    lora = stage.lora.model_copy(update={"alpha": stage.lora.resolved_alpha})
    return stage.model_copy(update={"hyperparameters": hp.model_copy(update=updates), "lora": lora})


def eval_data_of(stage: StageSpec, job_eval_data: list[DatasetSpec]) -> list[DatasetSpec]:
    """A stage's evaluation data: its own `evalData`, else the job's when it trains on the job's
    `data` (evaluation data belongs with the training data it measures). Some types (ppo, export)
    have no evaluation pass."""
    if not STAGE_TYPES[stage.type].evaluates:
        return []
    if stage.eval_data is not None:
        return stage.eval_data
    return [] if stage.data else job_eval_data


def storage_root(job: FineTuneJob, default_root: str | None = None) -> str:
    """The folder every stage writes under: spec.storage.uri, else `default_root`, else ./saves/<name>."""
    return job.spec.storage.uri or default_root or f"./saves/{job.metadata.name}"


def plan(job: FineTuneJob, default_root: str | None = None, run: str | None = None) -> list[ResolvedStage]:
    """Resolve every stage of `job`, in order (`run`: this run's identity, see ResolvedStage.run)."""
    spec = job.spec
    root = storage_root(job, default_root)
    policy = ModelRef(model=spec.model.name)
    outputs: dict[str, ModelRef] = {}
    resolved = []
    for index, raw in enumerate(spec.stages):
        stage = resolve_stage_defaults(raw)
        stage_root = _join(root, stage.name)
        output = _join(stage_root, "output")
        info = STAGE_TYPES[stage.type]
        lora_like = info.trains and stage.method in ADAPTER_METHODS
        if stage.type == "eval":
            merge, output_kind = False, "results"
        elif stage.type == "rm":
            # A reward model is a side branch off the policy: trained on the policy's merged
            # weights; a LoRA reward model on top of an adapter is saved merged.
            merge, output_kind = policy.adapter is not None, "adapter" if lora_like and policy.adapter is None else "model"
        elif lora_like:
            # Keep training the policy's adapter (or start one).
            merge, output_kind = False, "adapter"
        else:
            merge, output_kind = policy.adapter is not None, "model"
        io = StageIO(
            policy=policy,
            merge_adapter=merge,
            output=output,
            output_kind=output_kind,
            checkpoints=_join(stage_root, "checkpoints"),
            stage_root=stage_root,
        )
        if info.reference_model:
            io.reference = policy
        if stage.reward is not None and stage.reward.model_stage:
            io.reward = outputs[stage.reward.model_stage]
        resolved.append(
            ResolvedStage(
                job=job.metadata.name,
                namespace=job.metadata.namespace,
                index=index,
                count=len(spec.stages),
                stage=stage,
                model=spec.model,
                template=spec.template,
                data=list(stage.data if stage.data else spec.data),
                eval_data=list(eval_data_of(stage, spec.eval_data)),
                io=io,
                storage=spec.storage,
                checkpoint=spec.checkpoint,
                resources=spec.resources,
                tracking=spec.tracking,
                outputs=spec.run_policy.outputs,
                run=run,
            )
        )
        made = ModelRef(model=policy.model, adapter=output) if output_kind == "adapter" else ModelRef(model=output)
        outputs[stage.name] = made
        if info.changes_policy:
            policy = made
    return resolved

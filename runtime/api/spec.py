"""The FineTuneJob API (kubetune.io/v1alpha1): one pydantic model, the single source of truth.

From these classes come the CRD's OpenAPI schema (every `description=` becomes `kubectl explain`
text), the CEL rules the apiserver enforces (`CelRule`s declared next to the fields they guard),
the offline validation of `kubetune validate` / `kubetune run`, and the resolved stage configs
the operator hands to runtime pods. Field names are camelCase in YAML; Python uses snake_case.

Defaults follow LLaMA-Factory where our users come from: LoRA rank 8, alpha 2×rank, dropout 0,
all linear layers; cutoff length 2048; cosine schedule; nf4 with double quantisation; two
trainable layers for freeze tuning; DPO beta 0.1 with the sigmoid loss. Defaults live here and
only here: the CRD carries them in descriptions, not as server-side defaults, so that what a
user applied is what Argo CD sees.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from . import stage_types
from .errors import SpecError
from .stage_types import types_where

API_GROUP = "kubetune.io"
API_VERSION = "v1alpha1"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"

STAGE_TYPES: tuple[str, ...] = tuple(stage_types.STAGE_TYPES)
StageType = Literal[STAGE_TYPES]  # type: ignore[valid-type]
Method = Literal["lora", "qlora", "full", "freeze"]
DatasetFormat = Literal["alpaca", "sharegpt", "messages", "text", "preference", "kto", "prompt", "choice"]
TemplateName = Literal["chatml", "llama3", "alpaca", "qwen", "gemma", "mistral", "phi3"]
TEMPLATE_NAMES: tuple[str, ...] = TemplateName.__args__  # type: ignore[attr-defined]

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# A column path of `DatasetSpec.columns`: a column name, then `.key` into a mapping or `[index]`
# into a list (negative counts from the end), e.g. `answers.text[0]` (SQuAD). Keys cannot hold
# `.`, `[` or `]`; a column whose whole name is the value is used as it is. runtime/data/columns.py
# walks it; RE2 and Python `re` alike.
COLUMN_PATH = r"^[^.\[\]]+(\.[^.\[\]]+|\[-?[0-9]+\])*$"


@dataclass(frozen=True)
class CelRule:
    """A cross-field rule, enforced twice from one declaration: by the apiserver as a CEL
    `x-kubernetes-validations` entry, and offline by `check` (a Python twin of `rule`)."""

    rule: str
    message: str
    check: Callable[[Any], bool]
    field_path: str | None = None  # relative to the object the rule sits on, e.g. ".quantization"


class Spec(BaseModel):
    """Base of every API object: camelCase aliases, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", validate_default=True
    )
    cel_rules: ClassVar[tuple[CelRule, ...]] = ()

    @model_validator(mode="after")
    def _check_cel_rules(self):
        for r in self.cel_rules:
            if not r.check(self):
                raise ValueError(r.message)
        return self

    def to_yaml_dict(self) -> dict[str, Any]:
        """The object as it is written in YAML: camelCase, without unset optional fields."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def _field(description: str, default: Any = ..., **kw: Any) -> Any:
    return Field(default, description=description, **kw)


# --------------------------------------------------------------------------------------- model


class SecretKeyRef(Spec):
    """A key of a Secret in the FineTuneJob's namespace."""

    name: str = _field("Name of the Secret.", max_length=253)
    key: str = _field("Key inside the Secret.", "token", max_length=253)


class ModelSpec(Spec):
    name: str = _field(
        "The base model: a Hugging Face model id (org/name), a local folder, or an s3:// URI of "
        "a folder written by save_pretrained.",
        min_length=1,
        max_length=512,
    )
    revision: str | None = _field(
        "Model revision (branch, tag or commit) when `name` is a Hugging Face id.", None, max_length=128
    )
    token_secret_ref: SecretKeyRef | None = _field(
        "Secret holding a Hugging Face token for gated models. Mounted as HF_TOKEN; never copied "
        "into ConfigMaps, status or logs.",
        None,
    )
    trust_remote_code: bool = _field(
        "Allow the model repository's own Python code to run (Hugging Face trust_remote_code). "
        "Default false.",
        False,
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = _field(
        "Weight dtype to load: auto (bf16 on GPUs that support it, else fp32 on CPU), bfloat16, "
        "float16 or float32.",
        "auto",
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3"] = _field(
        "Attention kernel: auto (on a CUDA GPU with bf16/fp16 weights, variable-length attention for "
        "packed padding-free rows, PyTorch's varlen_attn, else flex_attention; SDPA on CPU and for padded "
        "batches; the choice is logged), sdpa, eager, flash_attention_2 or flash_attention_3 (need the "
        "flash-attn package in the image).",
        "auto",
    )


class DatasetTags(Spec):
    """ShareGPT role tags (LLaMA-Factory dataset_info.json `tags`)."""

    role_tag: str = _field("Key holding a message's role. Default `from`.", "from", max_length=64)
    content_tag: str = _field("Key holding a message's text. Default `value`.", "value", max_length=64)
    user_tag: str = _field("Role value of user turns. Default `human`.", "human", max_length=64)
    assistant_tag: str = _field("Role value of assistant turns. Default `gpt`.", "gpt", max_length=64)
    observation_tag: str = _field("Role value of tool results. Default `observation`.", "observation", max_length=64)
    function_tag: str = _field("Role value of tool calls. Default `function_call`.", "function_call", max_length=64)
    system_tag: str = _field("Role value of system turns. Default `system`.", "system", max_length=64)


class DatasetSpec(Spec):
    name: str = _field("A short name for the dataset, used in logs and errors.", pattern=DNS_LABEL, max_length=63)
    source: str = _field(
        "Where the data is: a local file or folder (json, jsonl, parquet, csv), file://, s3:// "
        "(file or prefix), or a Hugging Face dataset id (hf://org/name or org/name; needs hub access).",
        min_length=1,
        max_length=1024,
    )
    format: DatasetFormat = _field(
        "Record layout: alpaca (instruction/input/output/system/history), sharegpt "
        "(conversations of from/value), messages (OpenAI role/content), text (plain text for pt), "
        "preference (prompt/chosen/rejected), kto (prompt/completion/label), prompt (prompt only, "
        "for online RL), choice (multiple-choice questions for eval stages: question, choices A/B/C/D "
        "or a `choices` list, answer letter, optional subject). Default alpaca.",
        "alpaca",
    )
    ranking: bool = _field(
        "Preference pairs in alpaca or sharegpt layout (LLaMA-Factory `ranking: true`): the "
        "record carries `chosen` and `rejected` answers.",
        False,
    )
    # the path rule is a `pattern` of each value in the CRD (a CEL rule over the map would exceed
    # the apiserver's cost budget inside stages[].data); offline, _column_paths names the role
    columns: dict[str, Annotated[str, Field(min_length=1, max_length=256, json_schema_extra={"pattern": COLUMN_PATH})]] = _field(
        "Column mapping as in LLaMA-Factory's dataset_info.json: our role name → the column in "
        "the file. Roles: prompt, query, response, system, history, messages, text, chosen, "
        "rejected, completion, kto_tag, tools; for format choice: question, choices, answer, subject. A value may be a path into a nested column: "
        "`.key` enters a mapping, `[i]` a list (negative from the end), e.g. "
        "`response: answers.text[0]` takes the first answer of SQuAD's "
        "`answers: {text: [...], answer_start: [...]}`. A column whose whole name is the value "
        "(dots and all) is used as it is.",
        default_factory=dict,
        max_length=32,
    )
    tags: DatasetTags = _field("ShareGPT role tags.", default_factory=DatasetTags)
    split: str = _field("Split to read for Hugging Face datasets. Default train.", "train", max_length=64)
    max_samples: int | None = _field("Use at most this many records (after loading).", None, ge=1)
    streaming: bool = _field(
        "Read the dataset lazily, a batch at a time (Hugging Face `datasets` streaming): a 100 GB "
        "JSONL never sits in memory (on a DGX Spark, memory the GPU shares). Stages that read it "
        "need hyperparameters.maxSteps (a stream has no length to count epochs by), no valSize, and "
        "must be pt or sft.",
        False,
    )
    preprocessing_workers: int | None = _field(
        "Processes that tokenize this dataset in parallel in pt and sft stages (datasets "
        "`map(num_proc=...)`; the same tokens as one process). Default 1.",
        None,
        ge=1,
        le=256,
    )

    @field_validator("columns")
    @classmethod
    def _column_paths(cls, columns: dict[str, str]) -> dict[str, str]:
        """The offline twin of the CRD's pattern, naming the role and the bad value."""
        for role, value in columns.items():
            if not re.match(COLUMN_PATH, value):
                raise ValueError(
                    f"columns.{role}: {value!r} is not a column path: write a column name, then "
                    "`.key` to enter a mapping or `[index]` to enter a list, e.g. answers.text[0] "
                    "(keys hold no '.', '[' or ']'; indexes are integers)"
                )
        return columns


class LoraSpec(Spec):
    rank: int = _field("LoRA rank r. Default 8.", 8, ge=1, le=4096)
    alpha: int | None = _field("LoRA alpha. Default 2×rank.", None, ge=1)
    dropout: float = _field("LoRA dropout. Default 0.", 0.0, ge=0.0, lt=1.0)
    target: list[str] = _field(
        "Modules to adapt: `all` (every linear layer but the output head) or module names such "
        "as q_proj, v_proj. Default all.",
        default_factory=lambda: ["all"],
        max_length=64,
    )
    use_dora: bool = _field("Weight-decomposed LoRA (DoRA).", False)
    use_rslora: bool = _field("Rank-stabilised LoRA scaling (alpha/sqrt(r)).", False)
    init: Literal["default", "gaussian", "pissa", "olora", "loftq"] = _field(
        "Adapter initialisation: default, gaussian, pissa (principal singular values, fast "
        "variant with 16 subspace iterations), olora, loftq.",
        "default",
    )
    loraplus_lr_ratio: float | None = _field(
        "LoRA+: learning rate of the B matrices = ratio × learning rate (e.g. 16).", None, gt=0
    )
    modules_to_save: list[str] = _field(
        "Extra modules trained in full and saved with the adapter (e.g. embed_tokens, lm_head).",
        default_factory=list,
        max_length=32,
    )

    @property
    def resolved_alpha(self) -> int:
        return self.alpha if self.alpha is not None else 2 * self.rank


class QuantizationSpec(Spec):
    bits: Literal[4, 8] = _field("Quantise the frozen base weights to 4 or 8 bits (bitsandbytes).")
    type: Literal["nf4", "fp4"] = _field("4-bit data type: nf4 (default) or fp4.", "nf4")
    double_quantization: bool = _field("Quantise the quantisation constants too (saves ~0.4 bit/param).", True)


class FreezeSpec(Spec):
    trainable_layers: int = _field(
        "Train the last N decoder layers (negative: the first N). Default 2.", 2, ge=-1024, le=1024
    )
    trainable_modules: list[str] = _field(
        "Within those layers, train only modules whose name contains one of these (e.g. mlp, "
        "self_attn); `all` trains whole layers. Default all.",
        default_factory=lambda: ["all"],
        max_length=32,
    )
    extra_modules: list[str] = _field(
        "Modules outside the decoder layers to train too (e.g. embed_tokens, lm_head, norm).",
        default_factory=list,
        max_length=32,
    )


def _cel_list(items) -> str:
    return "[" + ", ".join(f"'{i}'" for i in items) + "]"


def _type_is(names: tuple[str, ...], obj: str = "self") -> str:
    """CEL: the stage `obj` has one of the types `names`."""
    return f"{obj}.type == '{names[0]}'" if len(names) == 1 else f"{obj}.type in {_cel_list(names)}"


def _type_is_not(names: tuple[str, ...], obj: str = "self") -> str:
    return f"{obj}.type != '{names[0]}'" if len(names) == 1 else f"!({obj}.type in {_cel_list(names)})"


def _and(names, last: str = "and") -> str:
    """`a, b and c`."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} {last} {names[-1]}"


# Optimizers (hyperparameters.optimizer). The GaLore and APOLLO ones are transformers' own
# integrations; adam_mini, muon and badam are built by runtime/optimizers.py. The packages they need
# come with the `optimizers` extra (runtime/optimizers.py names them).
OPTIMIZERS: tuple[str, ...] = (
    "adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "adafactor", "sgd", "lion_8bit",
    "galore_adamw", "galore_adamw_8bit", "galore_adafactor", "apollo_adamw", "adam_mini", "muon", "badam",
)
GALORE_OPTIMIZERS: tuple[str, ...] = ("galore_adamw", "galore_adamw_8bit", "galore_adafactor")
# Full-parameter optimizers (LLaMA-Factory: "Cannot use LoRA with GaLore, APOLLO or BAdam together"); Adam-mini
# partitions the weights by the model's own module names (q_proj, ...), which adapter weights break.
NO_ADAPTER_OPTIMIZERS: tuple[str, ...] = GALORE_OPTIMIZERS + ("apollo_adamw", "badam", "adam_mini")
# Optimizers that take adamBeta1/adamBeta2 (lion's betas too) and adamEpsilon. transformers hands GaLore only
# the learning rate; Adafactor and SGD have no Adam moments.
BETA_OPTIMIZERS: tuple[str, ...] = (
    "adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "lion_8bit", "apollo_adamw",
    "adam_mini", "muon", "badam",
)
EPSILON_OPTIMIZERS: tuple[str, ...] = tuple(o for o in BETA_OPTIMIZERS if o != "lion_8bit")
# Optimizers that project or orthogonalise whole weight matrices: not on FSDP's shards.
WHOLE_MATRIX_OPTIMIZERS: tuple[str, ...] = GALORE_OPTIMIZERS + ("apollo_adamw", "muon")
# The optimizers transformers builds from a name: all a stage with a training loop of its own (ppo)
# can build.
NAMED_OPTIMIZERS: tuple[str, ...] = OPTIMIZERS[:7]
LR_SCHEDULERS: tuple[str, ...] = (
    "cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial", "inverse_sqrt",
    "cosine_with_min_lr",
)


class _ProjectedLayers(Spec):
    """What GaLore and APOLLO share: which linear layers they project, and the layer-wise update."""

    target: list[Annotated[str, Field(max_length=200)]] = _field(
        "Linear layers to project: `all` (every linear layer, transformers' all-linear) or module "
        "names such as q_proj, v_proj, mlp. Default all.",
        default_factory=lambda: ["all"],
        min_length=1,
        max_length=64,
    )
    layerwise: bool = _field(
        "Step each layer's optimizer right after its gradient is ready, to save the gradient memory "
        "(needs gradientAccumulation 1 and a single training process).",
        False,
    )


class GaloreSpec(_ProjectedLayers):
    """GaLore: gradient low-rank projection of the linear layers' weights (LLaMA-Factory galore_* keys)."""

    rank: int = _field("Rank of the projected gradients. Default 16.", 16, ge=1, le=65536)
    update_interval: int = _field("Recompute the projection every N optimizer steps. Default 200.", 200, ge=1)
    scale: float = _field("Scale of the projected update. Default 2.", 2.0, gt=0)
    proj_type: Literal["std", "reverse_std", "right", "left", "full"] = _field(
        "Which side to project: std (the smaller one, default), reverse_std, right, left, full.", "std"
    )


class ApolloSpec(_ProjectedLayers):
    """APOLLO: AdamW with a low-rank auxiliary space for the learning-rate scaling (LLaMA-Factory apollo_* keys)."""

    rank: int = _field("Rank of the auxiliary space. Default 16.", 16, ge=1, le=65536)
    update_interval: int = _field("Recompute the projection every N optimizer steps. Default 200.", 200, ge=1)
    scale: float = _field("Scale of the update. Default 32.", 32.0, gt=0)
    proj: Literal["random", "svd"] = _field("Projection: random (default) or svd.", "random")
    proj_type: Literal["std", "right", "left"] = _field("Which side to project: std (default), right, left.", "std")
    scale_type: Literal["channel", "tensor"] = _field("Scaling per channel (default) or per tensor.", "channel")


class BadamSpec(Spec):
    """BAdam: block coordinate descent, Adam on one decoder layer at a time (LLaMA-Factory badam_* keys, layer mode)."""

    switch_mode: Literal["ascending", "descending", "random", "fixed"] = _field(
        "Order in which the layers take turns: ascending (default), descending, random, fixed.", "ascending"
    )
    switch_interval: int = _field("Optimizer steps on a layer before the next one takes over. Default 50.", 50, ge=1)
    start_block: int | None = _field("Index of the layer to start with (default: by switchMode).", None, ge=0)


def _settings_of_optimizers(field: str, optimizers: tuple[str, ...], whom: str) -> CelRule:
    """hyperparameters.<field> (galore, apollo, badam) is set only with an optimizer it configures."""
    names = ", ".join(optimizers)
    return CelRule(
        rule=f"!has(self.{field}) || (has(self.optimizer) && self.optimizer in {_cel_list(optimizers)})",
        message=f"hyperparameters.{field} applies to {whom} only: set hyperparameters.optimizer"
        f"{' to ' if len(optimizers) > 1 else ': '}{names}, or remove {field}",
        check=lambda s: getattr(s, field) is None or s.optimizer in optimizers,
        field_path=f".{field}",
    )


class Hyperparameters(Spec):
    learning_rate: float | None = _field(
        "Peak learning rate. Default 1e-4 for lora/qlora and 1e-5 for full/freeze; 5e-5 and 5e-6 "
        "in preference and RL stages.",
        None,
        gt=0,
        le=1,
    )
    epochs: float = _field("Training epochs. Default 3.", 3.0, gt=0)
    max_steps: int | None = _field("Stop after this many optimizer steps (overrides epochs).", None, ge=1)
    batch_size: int = _field("Per-device batch size. Default 1.", 1, ge=1, le=65536)
    gradient_accumulation: int = _field("Gradient accumulation steps. Default 8.", 8, ge=1, le=65536)
    cutoff_len: int = _field("Maximum tokens per sample (LLaMA-Factory cutoff_len). Default 2048.", 2048, ge=8)
    packing: bool | None = _field(
        "Pack several samples into one sequence without attention across their boundaries "
        "(padding-free). Default true for pt, false for other stages.",
        None,
    )
    lr_scheduler: Literal[LR_SCHEDULERS] = _field(  # type: ignore[valid-type]
        "Learning-rate schedule. Default cosine. cosine_with_min_lr decays to `minLr` instead of 0 "
        "(NeMo AutoModel's lr_scheduler.min_lr).",
        "cosine",
    )
    min_lr: float | None = _field(
        "The learning rate a cosine_with_min_lr schedule ends at (required by that schedule, used by "
        "no other).",
        None,
        ge=0,
        le=1,
    )
    warmup_ratio: float = _field("Share of steps used for linear warm-up. Default 0.", 0.0, ge=0, le=1)
    warmup_steps: int = _field("Warm-up steps (wins over warmupRatio when > 0).", 0, ge=0)
    weight_decay: float = _field("Weight decay. Default 0.", 0.0, ge=0)
    max_grad_norm: float = _field("Gradient clipping norm. Default 1.", 1.0, ge=0)
    optimizer: Literal[OPTIMIZERS] | None = _field(  # type: ignore[valid-type]
        "Optimizer. Default adamw_torch_fused on GPUs, adamw_torch on CPU. Also: adamw_8bit, "
        "paged_adamw_8bit, adafactor, sgd, lion_8bit; galore_adamw, galore_adamw_8bit, "
        "galore_adafactor (GaLore, settings in `galore`), apollo_adamw (APOLLO, settings in "
        "`apollo`), badam (BAdam, settings in `badam`), adam_mini (Adam-mini), muon (Muon for the "
        "hidden 2-D weights, AdamW for the rest). GaLore, APOLLO, BAdam and Adam-mini work on the "
        "model's own weights: not with lora or qlora (BAdam: method full only).",
        None,
    )
    adam_beta1: float | None = _field("Adam beta1 (lion's beta1). Default 0.9.", None, ge=0, lt=1)
    adam_beta2: float | None = _field("Adam beta2 (lion's beta2). Default 0.999.", None, ge=0, lt=1)
    adam_epsilon: float | None = _field("Adam epsilon. Default 1e-8.", None, gt=0, le=1)
    galore: GaloreSpec | None = _field("GaLore settings (optimizer galore_*).", None)
    apollo: ApolloSpec | None = _field("APOLLO settings (optimizer apollo_adamw).", None)
    badam: BadamSpec | None = _field("BAdam settings (optimizer badam).", None)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = _field(
        "Mixed precision: auto (bf16 where the GPU supports it, fp32 on CPU), bf16, fp16, fp32.", "auto"
    )
    gradient_checkpointing: bool | None = _field(
        "Recompute activations in the backward pass to save memory. Default: on a GPU only when "
        "the activations would not fit (saves a third of the matmul work when they do); on CPU on.",
        None,
    )
    seed: int = _field("Random seed. Default 42.", 42, ge=0)
    logging_steps: int = _field("Log loss every N steps. Default 5.", 5, ge=1)
    val_size: float = _field(
        "Hold out this share (0–1) or number (≥ 1) of samples for evaluation; 0 = no eval.", 0.0, ge=0
    )
    eval_steps: int | None = _field("Evaluate every N steps (default: at the end of each epoch).", None, ge=1)
    neftune_alpha: float | None = _field(
        "NEFTune noise alpha for the embeddings (SFTTrainer's neftune_noise_alpha): "
        f"{_and(types_where(lambda i: 'neftuneAlpha' in i.accepts))} stages only.", None, gt=0
    )
    torch_compile: bool = _field(
        "Compile the model with torch.compile (transformers' torch_compile, Inductor backend). The "
        "first steps pay the compilation; on CPU it needs a C++ compiler in the image. Not in "
        f"{_and(types_where(lambda i: 'torchCompile' not in i.accepts), 'or')} stages. Default false.",
        False,
    )
    torch_compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] | None = _field(
        "torch.compile mode; needs torchCompile: true. Default: torch's own (default).", None
    )

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="!has(self.torchCompileMode) || (has(self.torchCompile) && self.torchCompile)",
            message="hyperparameters.torchCompileMode applies only with torchCompile: true: set both or remove it",
            check=lambda s: s.torch_compile_mode is None or s.torch_compile,
            field_path=".torchCompileMode",
        ),
        CelRule(
            rule="(has(self.lrScheduler) && self.lrScheduler == 'cosine_with_min_lr') == has(self.minLr)",
            message="lrScheduler cosine_with_min_lr and minLr go together: set both or neither",
            check=lambda s: (s.lr_scheduler == "cosine_with_min_lr") == (s.min_lr is not None),
            field_path=".minLr",
        ),
        _settings_of_optimizers("galore", GALORE_OPTIMIZERS, "the GaLore optimizers"),
        _settings_of_optimizers("apollo", ("apollo_adamw",), "optimizer apollo_adamw"),
        _settings_of_optimizers("badam", ("badam",), "optimizer badam"),
        CelRule(
            rule="!((has(self.galore) && has(self.galore.layerwise) && self.galore.layerwise) || "
            "(has(self.apollo) && has(self.apollo.layerwise) && self.apollo.layerwise)) || "
            "(has(self.gradientAccumulation) && self.gradientAccumulation == 1)",
            message="a layerwise GaLore or APOLLO optimizer steps inside the backward pass: set "
            "hyperparameters.gradientAccumulation: 1 (the default is 8)",
            check=lambda s: not ((s.galore and s.galore.layerwise) or (s.apollo and s.apollo.layerwise))
            or s.gradient_accumulation == 1,
            field_path=".gradientAccumulation",
        ),
        CelRule(
            rule="(!has(self.adamBeta1) && !has(self.adamBeta2)) || !has(self.optimizer) || "
            f"self.optimizer in {_cel_list(BETA_OPTIMIZERS)}",
            message=f"hyperparameters.adamBeta1/adamBeta2 reach only {', '.join(BETA_OPTIMIZERS)} (transformers "
            "hands GaLore only the learning rate; adafactor and sgd have no Adam moments): remove them or pick "
            "one of these optimizers",
            check=lambda s: (s.adam_beta1 is None and s.adam_beta2 is None) or s.optimizer is None
            or s.optimizer in BETA_OPTIMIZERS,
            field_path=".optimizer",
        ),
        CelRule(
            rule=f"!has(self.adamEpsilon) || !has(self.optimizer) || self.optimizer in {_cel_list(EPSILON_OPTIMIZERS)}",
            message=f"hyperparameters.adamEpsilon reaches only {', '.join(EPSILON_OPTIMIZERS)}: remove it or pick "
            "one of these optimizers",
            check=lambda s: s.adam_epsilon is None or s.optimizer is None or s.optimizer in EPSILON_OPTIMIZERS,
            field_path=".adamEpsilon",
        ),
        CelRule(
            rule=f"!has(self.optimizer) || !(self.optimizer in {_cel_list(GALORE_OPTIMIZERS + ('apollo_adamw',))}) || "
            "!has(self.weightDecay) || self.weightDecay == 0.0",
            message="transformers' GaLore and APOLLO optimizers apply no weight decay: leave "
            "hyperparameters.weightDecay at 0 with these optimizers",
            check=lambda s: s.optimizer not in GALORE_OPTIMIZERS + ("apollo_adamw",) or s.weight_decay == 0,
            field_path=".weightDecay",
        ),
    )


# Built-in reward functions of the online RL stages, and the form of a custom one's import path.
REWARD_BUILTINS: tuple[str, ...] = ("exact_match", "format", "length")
REWARD_IMPORT_PATH = r"^[A-Za-z_][A-Za-z0-9_]*([.][A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"  # RE2 and re alike


class PreferenceSpec(Spec):
    """Knobs of the preference stages (LLaMA-Factory pref_* keys)."""

    beta: float = _field("Preference beta (DPO/KTO/ORPO/SimPO temperature). Default 0.1.", 0.1, gt=0)
    loss_type: str = _field(
        "Loss variant as TRL names it. dpo: sigmoid (default), hinge, ipo, exo_pair, nca_pair, "
        "robust, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, sft, "
        "sigmoid_norm. kto: sigmoid (KTO's own loss) or apo_zero_unpaired.",
        "sigmoid",
        max_length=32,
    )
    ftx: float = _field(
        "Weight of an added SFT loss on the chosen answer (pref_ftx), in "
        f"{_and(types_where(lambda i: i.sft_term))} stages only (ORPO's loss holds the SFT term already; "
        "TRL's KTO has none). Default 0.",
        0.0, ge=0,
    )
    label_smoothing: float = _field(
        "Label smoothing, the probability that a pair's labels are flipped (0–0.5). Read by dpo stages with "
        f"lossType {_and(stage_types.DPO_LABEL_SMOOTHING_LOSSES, 'or')} only; exo_pair needs it above 0, "
        "robust below 0.5. Default 0.",
        0.0, ge=0, le=0.5,
    )
    simpo_gamma: float = _field("SimPO target reward margin gamma. Default 0.5.", 0.5, ge=0)
    desirable_weight: float = _field("KTO weight of desirable examples. Default 1.", 1.0, gt=0)
    undesirable_weight: float = _field("KTO weight of undesirable examples. Default 1.", 1.0, gt=0)


class RewardSpec(Spec):
    """Where rewards come from in the online RL stages (grpo, rloo, ppo)."""

    model_stage: str | None = _field(
        "Use the reward model written by this earlier `rm` stage of the same job.", None, max_length=40
    )
    functions: list[Annotated[str, Field(max_length=200)]] = _field(
        "Built-in reward functions: exact_match (completion equals the `answer` column), "
        "format (completion matches `pattern`), length (penalty per token over `maxLength`), or "
        "the import path module:function of a function installed in the image.",
        default_factory=list,
        max_length=16,
    )
    pattern: str | None = _field("Regular expression for the `format` reward.", None, max_length=1024)
    reference_column: str = _field("Column with the reference answer for exact_match. Default answer.", "answer", max_length=64)
    max_length: int = _field("Length reward: completions longer than this many tokens are penalised.", 256, ge=1)
    num_generations: int = _field("Completions sampled per prompt. Default 4.", 4, ge=2, le=256)
    max_new_tokens: int = _field("Maximum tokens generated per completion. Default 64.", 64, ge=1)
    temperature: float = _field("Sampling temperature for rollouts. Default 1.", 1.0, gt=0)
    kl_coef: float = _field("KL penalty coefficient to the reference policy.", 0.05, ge=0)

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule=f"!has(self.functions) || self.functions.all(f, f in {_cel_list(REWARD_BUILTINS)} || "
            f"f.matches('{REWARD_IMPORT_PATH}'))",
            message=f"reward.functions: each is one of {', '.join(REWARD_BUILTINS)} or the import path "
            "package.module:function of a function installed in the image",
            check=lambda s: all(f in REWARD_BUILTINS or re.match(REWARD_IMPORT_PATH, f) for f in s.functions),
            field_path=".functions",
        ),
        CelRule(
            rule="!has(self.functions) || !('format' in self.functions) || has(self.pattern)",
            message="the format reward needs reward.pattern (a regular expression)",
            check=lambda s: "format" not in s.functions or bool(s.pattern),
            field_path=".pattern",
        ),
    )


class EvaluationSpec(Spec):
    """Knobs of an eval stage (LLaMA-Factory's predict mode and `llamafactory-cli eval`)."""

    max_new_tokens: int = _field(
        "Generation datasets: at most this many tokens generated per answer (greedy). Default 128.",
        128, ge=1, le=32768,
    )
    few_shot: int = _field(
        "Choice datasets: solved examples put before each question (LLaMA-Factory n_shot), taken "
        "from fewShotData, else from the other questions of the same file (same subject first). "
        "Default 0.",
        0, ge=0, le=64,
    )
    few_shot_data: list[DatasetSpec] = _field(
        "Choice datasets the few-shot examples come from (a dev split, format choice).",
        default_factory=list, max_length=8,
    )
    choice_scoring: Literal["letter", "text"] = _field(
        "Choice datasets: letter (the prompt lists the choices as A. B. C. ...; the answer letter with "
        "the highest log-likelihood wins, as MMLU/C-Eval are scored) or text (the choice whose own text "
        "is the likeliest answer to the question, per token, wins). Default letter.",
        "letter",
    )
    batch_size: int = _field("Prompts generated or scored together. Default 8.", 8, ge=1, le=4096)


# Type-dependent facts the rules below read (runtime/api/stage_types.py declares them).
_LOSS_VARIANTS = {t: i.loss_types for t, i in stage_types.STAGE_TYPES.items() if i.loss_types != ("sigmoid",)}
_OWN_LOOP = types_where(lambda i: i.own_loop)
_CHOICE = types_where(lambda i: i.choice_data)
_TEACHER = types_where(lambda i: i.needs_teacher)
_REWARD = types_where(lambda i: i.needs_reward)
_NO_EVAL = types_where(lambda i: not i.evaluates)
_NO_DATA = types_where(lambda i: i.data_kind is None)
_SFT_TERM = types_where(lambda i: i.sft_term)
_SMOOTHED = stage_types.DPO_LABEL_SMOOTHING_LOSSES
_STREAMS = types_where(lambda i: i.streams)
# CEL, inside self.stages.all(s, ...): stage s reads a streaming dataset (its own data, else the job's)
_READS_STREAM = ("((has(s.data) && size(s.data) > 0) ? s.data.exists(d, has(d.streaming) && d.streaming) : "
                 "(has(self.data) && self.data.exists(d, has(d.streaming) && d.streaming)))")


def _reads_stream(job, stage) -> bool:
    return any(d.streaming for d in (stage.data or job.data))


def _dpo_loss_is(loss: str) -> str:
    """CEL: a dpo stage with preference.lossType `loss`."""
    return f"self.type == 'dpo' && has(self.preference) && has(self.preference.lossType) && self.preference.lossType == '{loss}'"


def _preference_set(field: str) -> str:
    """CEL: preference.<field> (a number, default 0) set above 0."""
    return f"has(self.preference) && has(self.preference.{field}) && self.preference.{field} > 0.0"


def _gated_hyperparameter(field: str) -> CelRule:
    """hyperparameters.<field> (a GATED_HYPERPARAMETERS one) only on the types that accept it."""
    attr = re.sub(r"[A-Z]", lambda m: "_" + m.group().lower(), field)
    takes = types_where(lambda i: field in i.accepts)
    ignores = tuple(t for t in stage_types.STAGE_TYPES if t not in takes)
    is_set = f"has(self.hyperparameters.{field})"
    if field == "torchCompile":  # a bool, default false: only true asks for something
        is_set += f" && self.hyperparameters.{field}"
    return CelRule(
        rule=f"!has(self.hyperparameters) || !({is_set}) || {_type_is(takes)}",
        message=(f"hyperparameters.{field} applies to {_and(takes)} stages only" if len(takes) <= len(ignores)
                 else f"hyperparameters.{field} has no effect in {_and(ignores, 'or')} stages") + ": remove it there",
        check=lambda s: s.type in takes or getattr(s.hyperparameters, attr) in (None, False),
        field_path=f".hyperparameters.{field}",
    )


class StageSpec(Spec):
    name: str = _field(
        "Stage name, unique in the job; becomes part of child object names.", pattern=DNS_LABEL, max_length=40
    )
    type: StageType = _field(
        "What the stage does: pt (continued pre-training), sft, rm (reward model), dpo, kto, "
        "orpo, simpo, ppo, grpo, rloo, distill, export (merge adapters into a standalone model), or "
        "eval (score the policy on its data: ROUGE/BLEU of generated answers, accuracy on "
        "multiple-choice questions; trains nothing)."
    )
    method: Method = _field(
        "How weights are trained: lora (default), qlora (LoRA on a 4/8-bit base, needs "
        "quantization.bits), full, or freeze (only the last layers).",
        "lora",
    )
    lora: LoraSpec = _field("LoRA settings (lora and qlora).", default_factory=LoraSpec)
    quantization: QuantizationSpec | None = _field("Base-model quantisation (qlora).", None)
    freeze: FreezeSpec = _field("Freeze-tuning settings (method freeze).", default_factory=FreezeSpec)
    hyperparameters: Hyperparameters = _field("Optimisation settings.", default_factory=Hyperparameters)
    preference: PreferenceSpec = _field("Preference-stage settings (dpo, kto, orpo, simpo).", default_factory=PreferenceSpec)
    reward: RewardSpec | None = _field("Reward settings of online RL stages (grpo, rloo, ppo).", None)
    teacher: ModelSpec | None = _field("Teacher model of a distill stage.", None)
    evaluation: EvaluationSpec = _field("Settings of an eval stage.", default_factory=EvaluationSpec)
    data: list[DatasetSpec] | None = _field(
        "Datasets of this stage; default: the job's `data`.", None, max_length=32
    )
    eval_data: list[DatasetSpec] | None = _field(
        "Evaluation datasets of this stage (LLaMA-Factory eval_dataset, NeMo AutoModel "
        "validation_dataset): the eval loss is computed on them every hyperparameters.evalSteps "
        "and at the last step (without evalSteps: at the end of each epoch). Default: the job's `evalData` when the stage "
        "uses the job's `data`. Exclusive with hyperparameters.valSize. Not for ppo or export stages.",
        None,
        max_length=32,
    )

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="!has(self.preference) || !has(self.preference.lossType) || ("
            + " && ".join(f"({_type_is_not((t,))} || self.preference.lossType in {_cel_list(losses)})"
                          for t, losses in _LOSS_VARIANTS.items())
            + f" && ({_type_is(tuple(_LOSS_VARIANTS))} || self.preference.lossType == 'sigmoid'))",
            message="; ".join(f"a {t} stage takes one of {', '.join(losses)}" for t, losses in _LOSS_VARIANTS.items())
            + "; other stage types have no loss variants (leave it unset)",
            check=lambda s: s.preference.loss_type in stage_types.STAGE_TYPES[s.type].loss_types,
            field_path=".preference.lossType",
        ),
        CelRule(
            rule=f"!({_preference_set('ftx')}) || {_type_is(_SFT_TERM)}",
            message=f"preference.ftx (an SFT loss on the chosen answer) applies to {_and(_SFT_TERM)} stages only "
            "(ORPO's loss holds the SFT term already; TRL's KTO has none): remove it there",
            check=lambda s: s.preference.ftx == 0 or s.type in _SFT_TERM,
            field_path=".preference.ftx",
        ),
        CelRule(
            rule=f"!({_preference_set('labelSmoothing')}) || (self.type == 'dpo' && has(self.preference.lossType) && "
            f"self.preference.lossType in {_cel_list(_SMOOTHED)})",
            message=f"preference.labelSmoothing is read by dpo stages with lossType {_and(_SMOOTHED, 'or')} only: "
            "remove it there",
            check=lambda s: s.preference.label_smoothing == 0 or (s.type == "dpo" and s.preference.loss_type in _SMOOTHED),
            field_path=".preference.labelSmoothing",
        ),
        CelRule(
            rule=f"!({_dpo_loss_is('exo_pair')}) || ({_preference_set('labelSmoothing')})",
            message="lossType exo_pair needs preference.labelSmoothing above 0 (the EXO paper suggests 1e-3)",
            check=lambda s: not (s.type == "dpo" and s.preference.loss_type == "exo_pair") or s.preference.label_smoothing > 0,
            field_path=".preference.labelSmoothing",
        ),
        CelRule(
            rule=f"!({_dpo_loss_is('robust')}) || !has(self.preference.labelSmoothing) || "
            "self.preference.labelSmoothing < 0.5",
            message="lossType robust needs preference.labelSmoothing below 0.5 (the probability of a flipped label)",
            check=lambda s: not (s.type == "dpo" and s.preference.loss_type == "robust") or s.preference.label_smoothing < 0.5,
            field_path=".preference.labelSmoothing",
        ),
        CelRule(
            rule="!has(self.method) || self.method != 'qlora' || has(self.quantization)",
            message="method qlora needs quantization.bits (4 or 8)",
            check=lambda s: s.method != "qlora" or s.quantization is not None,
            field_path=".method",
        ),
        CelRule(
            rule="!has(self.hyperparameters) || !has(self.hyperparameters.optimizer) || "
            f"!(self.hyperparameters.optimizer in {_cel_list(NO_ADAPTER_OPTIMIZERS)}) || "
            "(has(self.method) && (self.method == 'full' || (self.method == 'freeze' && "
            "self.hyperparameters.optimizer != 'badam')))",
            message="GaLore, APOLLO, BAdam and Adam-mini optimizers work on the model's own weights, not on "
            "adapters: set method: full (or freeze, except for badam), or pick another hyperparameters.optimizer",
            check=lambda s: s.hyperparameters.optimizer not in NO_ADAPTER_OPTIMIZERS
            or s.method == "full" or (s.method == "freeze" and s.hyperparameters.optimizer != "badam"),
            field_path=".method",
        ),
        CelRule(
            rule=f"{_type_is_not(_OWN_LOOP)} || !has(self.hyperparameters) || !has(self.hyperparameters.optimizer) || "
            f"self.hyperparameters.optimizer in {_cel_list(NAMED_OPTIMIZERS)}",
            message=f"a {_and(_OWN_LOOP, 'or')} stage builds its optimizer in its own loop: hyperparameters.optimizer "
            f"must be one of {', '.join(NAMED_OPTIMIZERS)} or unset",
            check=lambda s: s.type not in _OWN_LOOP or s.hyperparameters.optimizer is None
            or s.hyperparameters.optimizer in NAMED_OPTIMIZERS,
            field_path=".hyperparameters.optimizer",
        ),
        CelRule(
            rule="!has(self.lora) || !has(self.lora.loraplusLrRatio) || !has(self.hyperparameters) || "
            "!has(self.hyperparameters.optimizer) || self.hyperparameters.optimizer != 'muon'",
            message="lora.loraplusLrRatio puts the B matrices in parameter groups of their own, which optimizer muon "
            "(built by kubetune: Muon on the matrices, AdamW on the rest) does not take",
            check=lambda s: s.lora.loraplus_lr_ratio is None or s.hyperparameters.optimizer != "muon",
            field_path=".lora.loraplusLrRatio",
        ),
        CelRule(
            rule=f"{_type_is(_CHOICE)} || !has(self.data) || self.data.all(d, !has(d.format) || d.format != 'choice')",
            message=f"format choice (multiple-choice questions) is read by {_and(_CHOICE)} stages only",
            check=lambda s: s.type in _CHOICE or not any(d.format == "choice" for d in s.data or []),
            field_path=".data",
        ),
        CelRule(
            rule=f"{_type_is_not(_TEACHER)} || has(self.teacher)",
            message=f"a {_and(_TEACHER, 'or')} stage needs `teacher` (the teacher model)",
            check=lambda s: s.type not in _TEACHER or s.teacher is not None,
            field_path=".type",
        ),
        CelRule(
            rule=f"{_type_is_not(_REWARD)} || (has(self.reward) && "
            "(has(self.reward.modelStage) || (has(self.reward.functions) && size(self.reward.functions) > 0)))",
            message=f"{_and(_REWARD)} stages need reward.modelStage (an earlier rm stage) or reward.functions",
            check=lambda s: s.type not in _REWARD
            or (s.reward is not None and (s.reward.model_stage is not None or len(s.reward.functions) > 0)),
            field_path=".reward",
        ),
        CelRule(
            rule=f"!has(self.evalData) || size(self.evalData) == 0 || {_type_is_not(_NO_EVAL)}",
            message=f"evalData: {_and(_NO_EVAL)} stages have no evaluation pass",
            check=lambda s: not s.eval_data or s.type not in _NO_EVAL,
            field_path=".evalData",
        ),
        *(_gated_hyperparameter(field) for field in stage_types.GATED_HYPERPARAMETERS),
    )


class Toleration(Spec):
    key: str | None = _field("Taint key.", None, max_length=316)
    operator: Literal["Exists", "Equal"] | None = _field("Exists or Equal.", None)
    value: str | None = _field("Taint value.", None, max_length=256)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = _field("Taint effect.", None)
    toleration_seconds: int | None = _field("For NoExecute: how long to stay bound.", None)


class FsdpSpec(Spec):
    sharding: Literal["full_shard", "shard_grad_op"] = _field(
        "full_shard: parameters resharded after the forward (ZeRO-3-like, least memory); "
        "shard_grad_op: kept gathered until the backward (ZeRO-2-like, faster). Default full_shard.",
        "full_shard",
    )
    cpu_offload: bool = _field("Keep parameters, gradients and optimizer state in host memory.", False)


class EnvVarSource(Spec):
    secret_key_ref: SecretKeyRef = _field(
        "A key of a Secret in the FineTuneJob's namespace: the kubelet puts its value into the "
        "container; it is never copied into the FineTuneJob, its ConfigMap or its status."
    )


class EnvVar(Spec):
    name: str = _field("Variable name, e.g. NCCL_SOCKET_IFNAME.", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=253)
    value: str | None = _field(
        "Its value, in plain text: anyone who can read the FineTuneJob sees it, so never a secret "
        "(use valueFrom). Unset with no valueFrom: the empty string.",
        None,
        max_length=4096,
    )
    value_from: EnvVarSource | None = _field("Take the value from a Secret's key instead (API keys, tokens).", None)

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="!(has(self.value) && has(self.valueFrom))",
            message="podOverrides.env: set value or valueFrom, not both",
            check=lambda s: s.value is None or s.value_from is None,
            field_path=".valueFrom",
        ),
    )


_QUANTITY = re.compile(r"[+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+|[KMGTPE]i|[numkMGTPE])?")  # a Kubernetes quantity


class PodOverrides(Spec):
    """What a fabric such as DGX Spark's ConnectX-7 (RDMA/RoCE) needs on the training pods."""

    env: list[EnvVar] = _field(
        "Extra environment of the training container, e.g. NCCL_SOCKET_IFNAME, NCCL_IB_HCA, "
        "NCCL_DEBUG. Secrets belong in Secret references, not here.",
        default_factory=list,
        max_length=64,
    )
    host_network: bool = _field("Run training pods in the node's network namespace (RDMA/RoCE without a CNI plugin).", False)
    annotations: dict[str, str] = _field(
        "Pod annotations, e.g. k8s.v1.cni.cncf.io/networks for extra (Multus) interfaces.",
        default_factory=dict,
        max_length=64,
    )
    labels: dict[str, str] = _field("Extra pod labels.", default_factory=dict, max_length=64)
    resources: dict[str, Annotated[str, Field(max_length=64)]] = _field(
        "Extra resource limits of the training container, from device plugins: e.g. "
        "rdma/rdma_shared_device_a: 1 for the RDMA devices of a ConnectX NIC. cpu, memory and GPUs "
        "have their own fields.",
        default_factory=dict,
        max_length=16,
    )

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="!has(self.resources) || !self.resources.exists(k, k in ['cpu', 'memory', 'nvidia.com/gpu'])",
            message="podOverrides.resources cannot set cpu, memory or nvidia.com/gpu: use resources.cpu, "
            "resources.memory and resources.gpusPerNode",
            check=lambda s: not set(s.resources) & {"cpu", "memory", "nvidia.com/gpu"},
            field_path=".resources",
        ),
        CelRule(
            rule="!has(self.resources) || self.resources.all(k, isQuantity(self.resources[k]))",
            message="podOverrides.resources: every value must be a Kubernetes quantity such as 1, 500m or 2Gi",
            check=lambda s: all(_QUANTITY.fullmatch(v) for v in s.resources.values()),
            field_path=".resources",
        ),
    )


DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


class ModelCacheSpec(Spec):
    """A PersistentVolumeClaim that every stage pod mounts as its model cache."""

    claim_name: str = _field(
        "PersistentVolumeClaim in the FineTuneJob's namespace holding the cluster's model cache: "
        "mounted in every stage pod as the Hugging Face hub cache (HF_HUB_CACHE) and the cache of "
        "s3:// models and datasets, so that a base model is downloaded once, not once per stage "
        "pod. ReadWriteMany for stages on several nodes; ReadWriteOnce serves pods of one node. "
        "The cluster policy (values policy.modelCacheClaimPrefixes) says which claims a job may name.",
        pattern=DNS_SUBDOMAIN,
        max_length=253,
    )
    sub_path: str | None = _field(
        "Folder inside the volume to use instead of its root (e.g. one per team), relative, "
        "without . or .. components.",
        None,
        pattern=r"^[A-Za-z0-9_-][A-Za-z0-9._-]*(/[A-Za-z0-9_-][A-Za-z0-9._-]*)*$",
        max_length=253,
    )


class ResourcesSpec(Spec):
    nodes: int = _field("Number of nodes (pods) per stage. Default 1.", 1, ge=1, le=1024)
    gpus_per_node: int = _field(
        "GPUs per node (nvidia.com/gpu). 0 trains on CPU. Default 1 in a cluster; local mode uses "
        "what the machine has.",
        1,
        ge=0,
        le=64,
    )
    strategy: Literal["ddp", "fsdp"] = _field("Multi-GPU strategy when more than one process trains. Default ddp.", "ddp")
    fsdp: FsdpSpec = _field("FSDP settings (strategy fsdp).", default_factory=FsdpSpec)
    cpu: str | None = _field("CPU request and limit of each training pod (e.g. 8).", None, max_length=32)
    memory: str | None = _field("Memory request and limit of each training pod (e.g. 64Gi).", None, max_length=32)
    runtime_class_name: str | None = _field("RuntimeClass of the training pods (e.g. nvidia).", None, max_length=253)
    node_selector: dict[str, str] = _field("Node selector of the training pods.", default_factory=dict, max_length=64)
    tolerations: list[Toleration] = _field("Tolerations of the training pods.", default_factory=list, max_length=64)
    priority_class_name: str | None = _field("PriorityClass of the training pods.", None, max_length=253)
    image: str | None = _field("Runtime image; default: the operator's configured runtime image.", None, max_length=1024)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = _field("Image pull policy.", None)
    pod_overrides: PodOverrides = _field("Network and environment settings of the training pods (NCCL, hostNetwork, interfaces).", default_factory=PodOverrides)
    model_cache: ModelCacheSpec | None = _field(
        "The cluster model cache: a PersistentVolumeClaim mounted in every stage pod as the "
        "Hugging Face hub cache and the cache of s3:// models. Default: the operator's "
        "(chart values modelCache), else none (each pod downloads into its scratch volume).",
        None,
    )


# `scheme://user:password@host...`: credentials written into a URL (RE2 and Python alike)
_URL_USERINFO = r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*@"


def _no_url_credentials(attr: str, name: str, message: str) -> CelRule:
    """The rule of every URL field: no user:password@ in it (credentials go in a Secret)."""
    return CelRule(
        rule=f"!has(self.{name}) || !self.{name}.matches('{_URL_USERINFO}')",
        message=message,
        check=lambda s: getattr(s, attr) is None or not re.search(_URL_USERINFO, getattr(s, attr)),
        field_path=f".{name}",
    )


class StorageSpec(Spec):
    uri: str | None = _field(
        "Where checkpoints and outputs go: s3://bucket/prefix/, file:// or a local path. Default "
        "(local mode): ./saves/<job name>/.",
        None,
        max_length=1024,
    )
    endpoint: str | None = _field(
        "S3 endpoint URL for MinIO, Ceph RGW and other S3-compatible servers, e.g. "
        "http://minio.storage:9000. No credentials in it: they go in credentialsSecretRef.",
        None,
        max_length=1024,
    )
    region: str | None = _field("S3 region.", None, max_length=64)
    addressing_style: Literal["path", "virtual", "auto"] = _field("S3 addressing style. Default path (MinIO, Ceph).", "path")
    credentials_secret_ref: SecretKeyRef | None = _field(
        "Secret with the S3 keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (its `key` is "
        "ignored); injected as environment variables, never copied.",
        None,
    )

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        _no_url_credentials("endpoint", "endpoint", "storage.endpoint must not carry credentials (user:password@): "
                            "put the keys in a Secret and name it in storage.credentialsSecretRef"),
    )


class CheckpointSpec(Spec):
    every_steps: int = _field("Save (and upload) a checkpoint every N optimizer steps. Default 200.", 200, ge=1)
    keep: int = _field("Keep the last N committed checkpoints of each stage. Default 3.", 3, ge=1, le=1000)


class RunPolicy(Spec):
    termination_grace_period_seconds: int = _field(
        "Seconds a stopped training pod (node drain, preemption, suspend) has to save and commit a "
        "checkpoint before it is killed. Default 300: enough for a checkpoint of a LoRA adapter or "
        "of a model of a few GB; raise it for full fine-tuning of big models.",
        300,
        ge=30,
        le=86400,
    )
    outputs: Literal["reuse", "overwrite"] = _field(
        "A stage whose committed output already exists (the FineTuneJob was deleted and applied "
        "again): reuse skips it and hands its output to the next stage; overwrite trains it again "
        "from scratch and replaces the output. Default reuse.",
        "reuse",
    )
    backoff_limit: int = _field("Retries of a failed stage pod (resuming from checkpoints). Default 3.", 3, ge=0, le=100)
    active_deadline_seconds: int | None = _field("Fail a stage that runs longer than this.", None, ge=1)
    ttl_seconds_after_finished: int | None = _field(
        "Delete the child Jobs/Pods this long after the FineTuneJob finished (outputs stay).", None, ge=0
    )


class MlflowSpec(Spec):
    """Where an MLflow tracking server is and how to log into it (transformers' MLflowCallback)."""

    tracking_uri: str | None = _field(
        "Tracking server URL, e.g. http://mlflow.mlops:5000 (MLFLOW_TRACKING_URI). Default: the "
        "MLFLOW_TRACKING_URI of the environment; without one, MLflow writes to ./mlruns. No "
        "credentials in it: they go in tokenSecretRef or credentialsSecretRef.",
        None,
        max_length=1024,
    )
    experiment: str | None = _field(
        "Experiment the runs go to (created if missing). Default: the FineTuneJob's name.", None, max_length=256
    )
    token_secret_ref: SecretKeyRef | None = _field(
        "Secret holding a bearer token for the server (MLFLOW_TRACKING_TOKEN).", None
    )
    credentials_secret_ref: SecretKeyRef | None = _field(
        "Secret with the keys MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD for a server "
        "behind basic auth (its `key` is ignored); injected as environment variables, never copied.",
        None,
    )

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        _no_url_credentials("tracking_uri", "trackingUri", "tracking.mlflow.trackingUri must not carry credentials "
                            "(user:password@): put them in a Secret and name it in tracking.mlflow.credentialsSecretRef"),
    )


class WandbSpec(Spec):
    """Weights & Biases settings (transformers' WandbCallback)."""

    project: str | None = _field("W&B project. Default: the FineTuneJob's name.", None, max_length=128)
    entity: str | None = _field("W&B entity (team or user). Default: the API key's default entity.", None, max_length=128)
    mode: Literal["online", "offline"] = _field(
        "online sends to the W&B server; offline writes the run folder (wandb/offline-run-*) into "
        "the stage output, for `wandb sync` later. Default online.",
        "online",
    )
    api_key_secret_ref: SecretKeyRef | None = _field(
        "Secret holding the W&B API key (WANDB_API_KEY). Needed for mode online in a cluster.", None
    )


class TrackingSpec(Spec):
    """Experiment tracking: where every training stage also reports its parameters and losses."""

    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = _field(
        "Trackers to report to (LLaMA-Factory report_to): tensorboard (event files in the stage "
        "output's runs/ folder), mlflow, wandb. Default none: metrics go to Prometheus and "
        "trainer_log.jsonl only.",
        default_factory=list,
        max_length=3,
    )
    run_name: str | None = _field(
        "Run name in the trackers. Default <job>-<stage>.", None, max_length=256
    )
    mlflow: MlflowSpec = _field("MLflow settings (reportTo mlflow).", default_factory=MlflowSpec)
    wandb: WandbSpec = _field("Weights & Biases settings (reportTo wandb).", default_factory=WandbSpec)

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="!has(self.reportTo) || self.reportTo.all(t, self.reportTo.exists_one(u, u == t))",
            message="tracking.reportTo: each tracker at most once",
            check=lambda s: len(set(s.report_to)) == len(s.report_to),
            field_path=".reportTo",
        ),
    )


def _single_process_optimizer(hp: Hyperparameters) -> bool:
    """BAdam and the layerwise GaLore/APOLLO optimizers: no DDP or FSDP (transformers and BAdam say so)."""
    return hp.optimizer == "badam" or bool(hp.galore and hp.galore.layerwise) or bool(hp.apollo and hp.apollo.layerwise)


class FineTuneJobSpec(Spec):
    model: ModelSpec = _field("The base model.")
    data: list[DatasetSpec] = _field(
        "Datasets used by every stage that has no `data` of its own.", default_factory=list, max_length=32
    )
    eval_data: list[DatasetSpec] = _field(
        "Evaluation datasets of every stage that uses the job's `data` and has no `evalData` of its "
        "own (see stages[].evalData).",
        default_factory=list,
        max_length=32,
    )
    template: TemplateName | None = _field(
        "Chat template: default the tokenizer's own; or a named one for base models without "
        f"one: {', '.join(TEMPLATE_NAMES)}.",
        None,
    )
    stages: list[StageSpec] = _field("Stages, run in order; each reads the previous one's output.", min_length=1, max_length=16)
    resources: ResourcesSpec = _field("Compute resources and placement.", default_factory=ResourcesSpec)
    storage: StorageSpec = _field("Checkpoint and output storage.", default_factory=StorageSpec)
    checkpoint: CheckpointSpec = _field("Checkpoint policy.", default_factory=CheckpointSpec)
    run_policy: RunPolicy = _field("Retries, deadlines and clean-up.", default_factory=RunPolicy)
    tracking: TrackingSpec = _field(
        "Experiment tracking (TensorBoard, MLflow, W&B) of every training stage.", default_factory=TrackingSpec
    )
    suspend: bool = _field(
        "Suspend the job: running pods stop, progress and checkpoints stay; false resumes from the "
        "last checkpoint.",
        False,
    )
    queue_name: str | None = _field(
        "Kueue LocalQueue (in this namespace) that admits the stage Jobs: they carry the "
        "kueue.x-k8s.io/queue-name label, are created suspended, and start when Kueue admits them "
        "against its ClusterQueue's quota; the status shows Queued with Kueue's reason until then. "
        "Kueue preempting a stage is a suspend: the pods save a checkpoint and the stage resumes "
        "from it when admitted again. Default: the FineTuneJob's own kueue.x-k8s.io/queue-name "
        "label, if any (see docs/kueue.md).",
        None,
        pattern=DNS_SUBDOMAIN,
        max_length=253,
    )

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="self.stages.all(s, self.stages.exists_one(t, t.name == s.name))",
            message="stage names must be unique",
            check=lambda s: len({st.name for st in s.stages}) == len(s.stages),
            field_path=".stages",
        ),
        CelRule(
            rule="self.stages[0].type != 'export'",
            message="the first stage cannot be export: there is nothing to merge yet",
            check=lambda s: s.stages[0].type != "export",
            field_path=".stages",
        ),
        CelRule(
            rule=f"self.stages.all(s, {_type_is(_NO_DATA, 's')} || (has(self.data) && size(self.data) > 0) || "
            "(has(s.data) && size(s.data) > 0))",
            message="every training stage needs data: set spec.data or the stage's data",
            check=lambda s: all(st.type in _NO_DATA or s.data or st.data for st in s.stages),
            field_path=".data",
        ),
        CelRule(
            rule="self.stages.all(s, !has(s.hyperparameters) || !((has(s.hyperparameters.optimizer) && "
            "s.hyperparameters.optimizer == 'badam') || (has(s.hyperparameters.galore) && "
            "has(s.hyperparameters.galore.layerwise) && s.hyperparameters.galore.layerwise) || "
            "(has(s.hyperparameters.apollo) && has(s.hyperparameters.apollo.layerwise) && "
            "s.hyperparameters.apollo.layerwise))) || !has(self.resources) || "
            "((!has(self.resources.nodes) || self.resources.nodes == 1) && "
            "(!has(self.resources.gpusPerNode) || self.resources.gpusPerNode <= 1))",
            message="optimizer badam and layerwise GaLore/APOLLO train in a single process: set resources.nodes: 1 "
            "and resources.gpusPerNode to 1 (or 0), or pick another optimizer",
            check=lambda s: all(not _single_process_optimizer(st.hyperparameters) for st in s.stages)
            or (s.resources.nodes == 1 and s.resources.gpus_per_node <= 1),
            field_path=".resources",
        ),
        CelRule(
            rule="!has(self.resources) || !has(self.resources.strategy) || self.resources.strategy != 'fsdp' || "
            "((!has(self.resources.nodes) || self.resources.nodes == 1) && "
            "(!has(self.resources.gpusPerNode) || self.resources.gpusPerNode <= 1)) || "
            f"self.stages.all(s, !has(s.hyperparameters) || !has(s.hyperparameters.optimizer) || "
            f"!(s.hyperparameters.optimizer in {_cel_list(WHOLE_MATRIX_OPTIMIZERS)}))",
            message="GaLore, APOLLO and Muon transform whole weight matrices, which FSDP shards across processes: "
            "set resources.strategy: ddp, or pick another optimizer",
            check=lambda s: s.resources.strategy != "fsdp" or (s.resources.nodes == 1 and s.resources.gpus_per_node <= 1)
            or all(st.hyperparameters.optimizer not in WHOLE_MATRIX_OPTIMIZERS for st in s.stages),
            field_path=".resources.strategy",
        ),
        CelRule(
            rule="!has(self.data) || !self.data.exists(d, has(d.format) && d.format == 'choice') || "
            f"self.stages.all(s, {_type_is(_CHOICE, 's')} || (has(s.data) && size(s.data) > 0))",
            message=f"format choice (multiple-choice questions) is read by {_and(_CHOICE)} stages only: give the other "
            "stages data of their own",
            check=lambda s: not any(d.format == "choice" for d in s.data)
            or all(st.type in _CHOICE or st.data for st in s.stages),
            field_path=".data",
        ),
        CelRule(
            rule=f"self.stages.all(s, {_type_is(_NO_DATA, 's')} || (has(s.hyperparameters) && has(s.hyperparameters.maxSteps)) || "
            f"!{_READS_STREAM})",
            message="a stage that reads a streaming dataset needs hyperparameters.maxSteps (a stream has no "
            "length to count epochs by)",
            check=lambda s: all(
                st.type in _NO_DATA or st.hyperparameters.max_steps is not None or not _reads_stream(s, st)
                for st in s.stages
            ),
            field_path=".stages",
        ),
        CelRule(
            rule=f"self.stages.all(s, {_type_is(_STREAMS + _NO_DATA, 's')} || !{_READS_STREAM})",
            message=f"a streaming dataset is read by {_and(_STREAMS)} stages only (the others read their data whole): "
            "give the other stages data of their own, or remove streaming",
            check=lambda s: all(st.type in _STREAMS + _NO_DATA or not _reads_stream(s, st) for st in s.stages),
            field_path=".stages",
        ),
        CelRule(
            rule="self.stages.all(s, !has(s.hyperparameters) || !has(s.hyperparameters.valSize) || "
            f"s.hyperparameters.valSize <= 0.0 || !{_READS_STREAM})",
            message="a stage that reads a streaming dataset cannot hold out hyperparameters.valSize (a stream has "
            "no length to take a share of): set valSize 0, or give evalData",
            check=lambda s: all(st.hyperparameters.val_size <= 0 or not _reads_stream(s, st) for st in s.stages),
            field_path=".stages",
        ),
        CelRule(
            rule="self.stages.all(s, !has(s.reward) || !has(s.reward.modelStage) || "
            "self.stages.exists(t, t.name == s.reward.modelStage && t.type == 'rm'))",
            message="reward.modelStage must name an rm stage of this job",
            check=lambda s: all(
                st.reward is None
                or st.reward.model_stage is None
                or any(t.name == st.reward.model_stage and t.type == "rm" for t in s.stages)
                for st in s.stages
            ),
            field_path=".stages",
        ),
        CelRule(
            rule="self.stages.all(s, !has(s.hyperparameters) || !has(s.hyperparameters.valSize) || "
            "s.hyperparameters.valSize <= 0.0 || ((!has(s.evalData) || size(s.evalData) == 0) && "
            "((has(s.data) && size(s.data) > 0) || !has(self.evalData) || size(self.evalData) == 0)))",
            message="a stage evaluates either on evalData or on a held-out hyperparameters.valSize of its "
            "training data, not both: unset one",
            check=lambda s: all(
                st.hyperparameters.val_size <= 0 or not (st.eval_data or (not st.data and s.eval_data))
                for st in s.stages
            ),
            field_path=".stages",
        ),
    )


# -------------------------------------------------------------------------------------- status


class Condition(Spec):
    """metav1.Condition."""

    type: str = _field("Condition type: Validated, Running, Succeeded, Failed, Suspended.")
    status: Literal["True", "False", "Unknown"] = _field("True, False or Unknown.")
    reason: str = _field("CamelCase reason.")
    message: str = _field("Human-readable details.", "")
    last_transition_time: str = _field("When the status last changed (RFC 3339).")
    observed_generation: int | None = _field("The spec generation this condition was set for.", None)


class StageRef(Spec):
    name: str = _field("Current stage name.")
    index: int = _field("Current stage index (0-based).")
    count: int = _field("Number of stages.")


class Progress(Spec):
    step: int | None = _field("Optimizer steps done in the current stage.", None)
    total_steps: int | None = _field("Optimizer steps the current stage will take.", None)
    percent: float | None = _field("step / totalSteps × 100.", None)
    epoch: float | None = _field("Current epoch (fractional).", None)
    loss: float | None = _field("Latest training loss.", None)
    learning_rate: float | None = _field("Latest learning rate.", None)
    tokens_per_second: float | None = _field("Training throughput.", None)
    eta_seconds: float | None = _field("Estimated seconds to the end of the stage.", None)


class ArtifactRef(Spec):
    uri: str = _field("Where it is stored.")
    step: int | None = _field("Optimizer step of a checkpoint.", None)


class StageRecord(Spec):
    name: str = _field("Stage name.")
    type: str = _field("Stage type.")
    phase: str = _field("Pending, Running, Succeeded, Failed.")
    start_time: str | None = _field("When the stage's first pod started.", None)
    completion_time: str | None = _field("When the stage finished.", None)
    checkpoint: ArtifactRef | None = _field("Latest committed checkpoint.", None)
    output: ArtifactRef | None = _field("The stage's output.", None)
    restarts: int = _field("Retries of this stage after a failed pod (a multi-node stage restarts all its pods as one retry).", 0)
    restarted_job: str | None = _field(
        "UID of the stage's last Job that the operator deleted to restart all pods of a multi-node stage "
        "together from the checkpoint (counts each gang restart once).", None)
    message: str | None = _field("Why it failed.", None)
    eval: dict[str, float] | None = _field(
        "Results of an eval stage, × 100 as LLaMA-Factory reports them: accuracy (multiple choice), "
        "rouge-1, rouge-2, rouge-l and bleu-4 (generation), and the samples scored.",
        None,
    )


class FineTuneJobStatus(Spec):
    observed_generation: int | None = _field("The spec generation the status reflects.", None)
    phase: Literal["Pending", "Running", "Succeeded", "Failed", "Suspended"] | None = _field(
        "Summary for printer columns; the conditions are the truth.", None
    )
    conditions: list[Condition] = _field("Validated, Running, Succeeded, Failed, Suspended.", default_factory=list)
    stage: StageRef | None = _field("The stage running now (or the last one).", None)
    stages: list[StageRecord] = _field("Per-stage history.", default_factory=list)
    progress: Progress | None = _field("Progress of the current stage, read from its rank-0 pod.", None)
    checkpoint: ArtifactRef | None = _field("Latest committed checkpoint of the current stage.", None)
    output: ArtifactRef | None = _field("The final output (the last stage's).", None)
    restart_count: int = _field("Retries after failed pods, all stages together.", 0)
    start_time: str | None = _field("When the first stage started.", None)
    completion_time: str | None = _field("When the job finished.", None)
    eta: str | None = _field("ETA of the current stage, human readable (printer column).", None)
    progress_text: str | None = _field("Progress of the current stage as `NN%` (printer column).", None)


class ObjectMeta(BaseModel):
    """The parts of metav1.ObjectMeta that the spec model reads; the rest passes through."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(..., pattern=DNS_LABEL, max_length=63, description="Job name (a DNS label).")
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class FineTuneJob(Spec):
    """A fine-tuning job: a base model, data and an ordered list of stages."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")
    api_version: Literal["kubetune.io/v1alpha1"] = Field(
        f"{API_GROUP}/{API_VERSION}", alias="apiVersion", description="kubetune.io/v1alpha1"
    )
    kind: Literal["FineTuneJob"] = Field(KIND, description="FineTuneJob")
    metadata: ObjectMeta
    spec: FineTuneJobSpec
    status: dict[str, Any] | None = None  # ignored on input: the operator owns it


# ------------------------------------------------------------------------------------ loading


def _alias_path(loc: tuple[Any, ...]) -> str:
    """pydantic error location → `spec.stages[0].hyperparameters.learningRate`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """The camelCase field names valid at `loc` (for 'did you mean' hints)."""
    model: Any = FineTuneJob
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        field = None
        for name, f in model.model_fields.items():
            if part in (name, f.alias):
                field = f
                break
        if field is None:
            return []
        model = _model_of(field.annotation)
    if model is None:
        return []
    return [f.alias or n for n, f in model.model_fields.items() if not n.startswith("_")]


def _model_of(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        m = _model_of(arg)
        if m is not None:
            return m
    return None


def _cel_field_paths() -> dict[str, str]:
    """The field each CEL rule's message names, for every model of the API (nested ones too)."""
    paths, seen, todo = {}, set(), [Spec]
    while todo:
        for model in todo.pop().__subclasses__():
            if model not in seen:
                seen.add(model)
                todo.append(model)
                paths.update({r.message: r.field_path for r in model.cel_rules if r.field_path})
    return paths


def format_validation_error(err: ValidationError) -> list[str]:
    """One line per problem: the field path, what is wrong, and what would be valid."""
    problems = []
    for e in err.errors():
        loc = tuple(e["loc"])
        path = _alias_path(loc) or "(top level)"
        kind = e["type"]
        msg = e["msg"]
        if kind == "extra_forbidden":
            field = str(loc[-1])
            valid = _fields_at(loc[:-1])
            near = difflib.get_close_matches(field, valid, n=1)
            hint = f" (did you mean `{near[0]}`?)" if near else ""
            valid_txt = f"; valid fields: {', '.join(valid)}" if valid else ""
            msg = f"unknown field `{field}`{hint}{valid_txt}"
        elif kind == "missing":
            msg = "required field is missing"
        elif kind == "literal_error":
            got = e.get("input")
            msg = f"{msg} (got {got!r})"
        elif kind == "value_error":
            msg = msg.removeprefix("Value error, ")
            field_path = _CEL_FIELD_PATHS.get(msg)
            if field_path:
                path += field_path
        elif kind == "string_pattern_mismatch" and "name" in path:
            msg = "must be a DNS label: lowercase letters, digits and '-', starting and ending with a letter or digit"
        elif "input" in e and kind not in ("model_type", "dict_type"):
            msg = f"{msg} (got {e['input']!r})"
        problems.append(f"{path}: {msg}")
    return problems


_CEL_FIELD_PATHS = _cel_field_paths()


def parse_job(doc: Any, source: str | None = None) -> FineTuneJob:
    """Validate a FineTuneJob document (already parsed YAML). Raises SpecError."""
    if not isinstance(doc, dict):
        raise SpecError([f"expected a FineTuneJob mapping, got {type(doc).__name__}"], source)
    doc = dict(doc)
    api_version = doc.get("apiVersion")
    if api_version is not None and api_version != f"{API_GROUP}/{API_VERSION}":
        raise SpecError([f"apiVersion: expected {API_GROUP}/{API_VERSION} (got {api_version!r})"], source)
    kind = doc.get("kind")
    if kind is not None and kind != KIND:
        raise SpecError([f"kind: expected {KIND} (got {kind!r})"], source)
    try:
        return FineTuneJob.model_validate(doc)
    except ValidationError as err:
        raise SpecError(format_validation_error(err), source) from None


def load_job_document(path: str | Path) -> dict[str, Any]:
    """Read a FineTuneJob YAML file into a plain mapping. Raises SpecError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise SpecError([f"file not found: {p}"], str(p))
    try:
        docs = [d for d in yaml.safe_load_all(p.read_text(encoding="utf-8")) if d is not None]
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError([f"not valid YAML{where}: {getattr(err, 'problem', err)}"], str(p)) from None
    jobs = [d for d in docs if isinstance(d, dict) and d.get("kind", KIND) == KIND]
    if len(jobs) != 1:
        raise SpecError([f"expected exactly one FineTuneJob document, found {len(jobs)}"], str(p))
    return jobs[0]


def load_job(path: str | Path, overrides: list[str] | None = None) -> FineTuneJob:
    """Read and validate a FineTuneJob YAML file, applying `--set path=value` overrides first."""
    doc = load_job_document(path)
    if overrides:
        from .overrides import apply_overrides

        doc = apply_overrides(doc, overrides, source=str(path))
    return parse_job(doc, str(path))


def default_learning_rate(stage: StageSpec) -> float | None:
    """LLaMA-Factory-style defaults by stage type and method (None: the type trains nothing)."""
    return stage_types.default_learning_rate(stage.type, stage.method)

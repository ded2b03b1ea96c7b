"""`kubetune estimate`: expected GPU memory per device for each stage of a FineTuneJob.

A back-of-the-envelope model, the same one LLaMA-Factory's README table rests on:

    total = weights + gradients + optimizer states + LoRA (weights+grads+states)
          + activations + CUDA context/allocator overhead

- weights: 2 bytes/param in bf16/fp16 (model.dtype auto/bfloat16/float16), 4 in float32 (then
  training is mixed precision with fp32 master weights: LLaMA-Factory's "full (bf16/fp16)" row);
  qlora: 1 byte (8-bit) or 0.5 byte + quantisation constants (4-bit) for the decoder's nn.Linear
  layers, embeddings and the output head stay 16-bit, and so do MoE experts (transformers 5 holds
  them as fused 3-D parameters, which bitsandbytes leaves alone: checked in test_estimate.py).
- after training (`after_training`): chat loads the base at 16 bit or, with --quantization, as
  qlora does, plus a KV cache; the export merge holds the whole base (in-memory) or about one
  safetensors shard (layered, runtime/merge.py).
- gradients: same dtype as the trained weights; AdamW: two states in the trained weights' dtype
  (8-bit optimizers: 2 bytes).
- freeze: only the trainable layers have gradients and states.
- LoRA adapters: fp32 (peft upcasts adapters), 16 bytes/param with AdamW.
- activations: with gradient checkpointing, each layer's input (b·s·h·2 bytes) plus one layer's
  full activations recomputed at a time; without, every layer's. One layer keeps
  b·s·(16h + 4h·kv/heads + 8i) bytes (SDPA, no s² term; fp32 RMSNorm inputs) and, with LoRA, an
  fp32 copy of each adapted module's input. Plus the logits in fp32 (b·s·V·4 bytes, ×2 for their
  gradient).
- the default optimizer on GPUs is fused AdamW; the foreach step (adamw_torch) needs about one
  more copy of the trained weights at its peak.

Reported for an H100 with commit 3128d6f (PyTorch 2.11, transformers 5.17, a 0.95B Llama in bf16,
batch 1, 1024 tokens, torch.cuda.max_memory_allocated, so without the CUDA context): full
fine-tuning with foreach AdamW 9.0 GiB (checkpointing on) / 9.2 GiB (off); LoRA r8 all-linear
2.4 / 4.6 GiB. No script or raw output of that run is committed: tests/unit/test_estimate.py
pins the estimate to these figures (±15 %), it does not re-measure them.
- fsdp shards weights, gradients and optimizer states over all GPUs; ddp replicates them.

Preference stages with full/freeze weights hold a frozen reference copy of the weights; LoRA
stages use the base model with the adapter switched off as reference (no copy). Online RL
(grpo/rloo/ppo) adds a KV cache for generation that is not counted: treat their numbers as a floor.

Checked against LLaMA-Factory's published 7B rows in tests/unit/test_estimate.py (±25 %). The
parameter count from a config.json (dense, GQA, biases, head_dim, Mixtral/Qwen-MoE experts) is
checked there to equal that of the model transformers builds from it.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .api.errors import UserError
from .api.stage_types import STAGE_TYPES

GIB = 1024**3
CUDA_OVERHEAD = 0.8 * GIB  # CUDA context + allocator fragmentation, typical for one training process


@dataclass
class Arch:
    """What the estimate needs to know of a decoder-only transformer."""

    params: float  # total parameters
    hidden: int
    layers: int
    vocab: int
    intermediate: int
    kv_ratio: float = 1.0  # num_key_value_heads / num_attention_heads
    tied: bool = False
    source: str = ""
    attn_dim: int = 0  # num_attention_heads × head_dim; 0: hidden (Qwen3 sets head_dim apart from hidden/heads)
    experts: int = 0  # routed experts in each MoE layer; 0: a dense model
    expert_intermediate: int = 0
    shared_intermediate: int = 0  # Qwen2-MoE's shared expert, 0: none
    moe_layers: int = 0  # how many layers are MoE (Qwen-MoE can keep some dense: mlp_only_layers)
    layer_extra: float = 0.0  # per layer, besides the linear weights and two norms: biases, q/k norms

    @property
    def embed_params(self) -> float:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def _q(self) -> int:
        return self.attn_dim or self.hidden

    @property
    def linear_params(self) -> float:
        """All decoder layers' linear weights. MoE experts (and their router) count here too: the
        memory model treats them as the linear layers they are, whatever module holds them."""
        h, q = self.hidden, self._q
        attn = 2 * h * q + 2 * h * q * self.kv_ratio
        dense = 3 * h * self.intermediate
        moe = (self.experts * 3 * h * self.expert_intermediate + h * self.experts
               + (3 * h * self.shared_intermediate + h if self.shared_intermediate else 0))
        return self.layers * attn + (self.layers - self.moe_layers) * dense + self.moe_layers * moe

    @property
    def quantizable_params(self) -> float:
        """The linear weights bitsandbytes quantises: those held in nn.Linear modules (attention, dense
        MLPs, Qwen-MoE's shared expert). Routed experts (fused 3-D parameters in transformers 5) and
        their router stay 16-bit, so a 4-bit MoE model is mostly 16-bit experts."""
        h, q = self.hidden, self._q
        attn = 2 * h * q + 2 * h * q * self.kv_ratio
        shared = 3 * h * self.shared_intermediate + h if self.shared_intermediate else 0
        return (self.layers * attn + (self.layers - self.moe_layers) * 3 * h * self.intermediate
                + self.moe_layers * shared)

    @property
    def layer_linear_params(self) -> float:
        """One layer's linear weights (the mean, where MoE and dense layers alternate)."""
        return self.linear_params / self.layers

    def count_params(self) -> float:
        """Embeddings (+ head), the layers' linear weights, their two RMSNorms and `layer_extra`,
        the final norm: what `sum(p.numel() for p in model.parameters())` gives."""
        return self.embed_params + self.linear_params + self.layers * (2 * self.hidden + self.layer_extra) + self.hidden

    def _targets(self, target: list[str]) -> dict[str, tuple[float, float]]:
        h, i, q = self.hidden, self.intermediate, self._q
        kv = q * self.kv_ratio
        shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                  "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
        names = shapes if ("all" in target or not target) else {t: shapes[t] for t in target if t in shapes}
        if not names:  # unknown module names: assume attention q/v
            names = {"q_proj": shapes["q_proj"], "v_proj": shapes["v_proj"]}
        return names

    def lora_params(self, rank: int, target: list[str]) -> float:
        return self.layers * sum(rank * (a + b) for a, b in self._targets(target).values())

    def layer_activation_bytes(self, lora_target: list[str] | None = None) -> float:
        """Bytes saved for backward per token by one decoder layer (16-bit, SDPA): the RMSNorm
        inputs in fp32, q/k/v, attention output, and the MLP's gate/up/act/product; with LoRA
        (fp32 adapters on a 16-bit base) each adapted module also keeps an fp32 copy of its input."""
        h, i = self.hidden, self.intermediate
        b = 16 * h + 4 * h * self.kv_ratio + 8 * i
        if lora_target is not None:
            b += 4 * sum(a for a, _ in self._targets(lora_target).values())
        return b


# Typical shapes by size (Llama/Qwen-like), used when only a parameter count is known.
_SHAPES = [  # params, hidden, layers, intermediate, vocab, kv_ratio
    (0.5e9, 896, 24, 4864, 151936, 1 / 7),
    (1.2e9, 2048, 16, 8192, 128256, 1 / 4),
    (1.5e9, 1536, 28, 8960, 151936, 1 / 6),
    (3e9, 3072, 28, 8192, 128256, 1 / 3),
    (7e9, 4096, 32, 11008, 32000, 1.0),
    (8e9, 4096, 32, 14336, 128256, 1 / 4),
    (13e9, 5120, 40, 13824, 32000, 1.0),
    (14e9, 5120, 48, 13824, 152064, 1 / 5),
    (32e9, 5120, 64, 27648, 152064, 1 / 5),
    (70e9, 8192, 80, 28672, 128256, 1 / 8),
    (72e9, 8192, 80, 29568, 152064, 1 / 8),
    (405e9, 16384, 126, 53248, 128256, 1 / 16),
]


def parse_params(text: str) -> float:
    """`7B`, `0.5b`, `70e9`, `125M` → a parameter count."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kKmMbBtT]?)\s*", str(text))
    if not m:
        raise UserError(f"cannot read a parameter count from {text!r} (e.g. 7B, 0.5B, 125M)", "--params")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[m.group(2).lower()]
    return float(m.group(1)) * scale


def arch_from_params(params: float, source: str) -> Arch:
    p, h, l_, i, v, kv = min(_SHAPES, key=lambda s: abs(s[0] - params) / s[0])
    # Near a known size: its shape; otherwise scale the layer count so the total matches.
    per_layer = 2 * h * h + 2 * h * h * kv + 3 * h * i
    layers = l_ if abs(p - params) / p < 0.1 else max(1, round((params - 2 * v * h) / per_layer))
    return Arch(params=params, hidden=h, layers=layers, vocab=v, intermediate=i, kv_ratio=kv, source=source)


QKV_BIAS = ("qwen2", "qwen2_moe")  # q/k/v biases without an attention_bias key (Qwen2-MoE: qkv_bias)
QK_NORM = ("qwen3", "qwen3_moe")  # an RMSNorm of head_dim on q and on k in each layer


def moe_layer_count(c: dict[str, Any], layers: int, experts: int) -> int:
    """Layers with experts: all (Mixtral), or as Qwen-MoE picks them (decoder_sparse_step, mlp_only_layers)."""
    step, dense = int(c.get("decoder_sparse_step") or 1), set(c.get("mlp_only_layers") or [])
    return sum(1 for n in range(layers) if experts and n not in dense and (n + 1) % step == 0)


def arch_from_config(cfg: dict[str, Any], source: str) -> Arch:
    c = cfg.get("text_config") or cfg
    kind = c.get("model_type") or cfg.get("model_type") or ""
    h = int(c["hidden_size"])
    layers = int(c.get("num_hidden_layers") or c.get("n_layer"))
    v = int(c.get("vocab_size", 32000))
    i = int(c.get("intermediate_size") or 4 * h)
    heads = int(c.get("num_attention_heads") or 1)
    head_dim = int(c.get("head_dim") or h // heads)
    kv_heads = int(c.get("num_key_value_heads") or heads)
    q, kv = heads * head_dim, kv_heads * head_dim
    tied = bool(cfg.get("tie_word_embeddings", c.get("tie_word_embeddings", False)))
    experts = int(c.get("num_local_experts") or c.get("num_experts") or 0)
    bias = bool(c.get("attention_bias", False))  # Llama/Qwen3: q, k, v and o
    extra = (q + 2 * kv if bias or c.get("qkv_bias", kind in QKV_BIAS) else 0) + (h if bias else 0)
    extra += 2 * head_dim if kind in QK_NORM else 0
    extra += 2 * i + h if c.get("mlp_bias") else 0
    a = Arch(params=0, hidden=h, layers=layers, vocab=v, intermediate=i, kv_ratio=kv_heads / heads, tied=tied,
             source=source, attn_dim=q, experts=experts,
             expert_intermediate=int(c.get("moe_intermediate_size") or i) if experts else 0,
             shared_intermediate=int(c.get("shared_expert_intermediate_size") or 0) if experts else 0,
             moe_layers=moe_layer_count(c, layers, experts), layer_extra=extra)
    a.params = a.count_params()
    return a


def model_arch(name: str, params: str | None = None) -> Arch:
    """From --params, a local config.json, or the size in the model's name (…-7B-…)."""
    if params:
        return arch_from_params(parse_params(params), f"--params {params}")
    cfg = Path(name).expanduser() / "config.json"
    if cfg.is_file():
        return arch_from_config(json.loads(cfg.read_text()), str(cfg))
    m = re.search(r"(?<![0-9.])([0-9]+(?:\.[0-9]+)?)\s*[bB](?![a-zA-Z])", name.rsplit("/", 1)[-1])
    if m:
        return arch_from_params(float(m.group(1)) * 1e9, f"the size in the name {name!r}")
    m = re.search(r"(?<![0-9.])([0-9]+)\s*[mM](?![a-zA-Z])", name.rsplit("/", 1)[-1])
    if m:
        return arch_from_params(float(m.group(1)) * 1e6, f"the size in the name {name!r}")
    raise UserError(f"cannot tell the size of {name!r}: give --params (e.g. --params 7B) or a local model folder "
                    "with config.json", "spec.model.name")


@dataclass
class Estimate:
    stage: str
    method: str
    parts: dict[str, float] = field(default_factory=dict)  # bytes
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def estimate_memory(arch: Arch, *, method: str, stage_type: str = "sft", bits: int | None = None,
                    weight_bytes: float = 2.0, batch: int = 1, seq: int = 1024, grad_ckpt: bool = True,
                    lora_rank: int = 8, lora_target: list[str] | None = None, trainable_layers: int = 2,
                    optimizer: str | None = None, shards: int = 1, stage: str = "", reference: bool = False,
                    double_quant: bool = True) -> Estimate:
    """Bytes per device, by part."""
    info = STAGE_TYPES[stage_type]
    e = Estimate(stage=stage or stage_type, method=method)
    state_bytes = 2.0 if optimizer and "8bit" in optimizer else 2 * weight_bytes
    if optimizer == "sgd":
        state_bytes = 0.0
    if method == "qlora":
        e.parts["weights"] = _quantized_weight_bytes(arch, 8 if bits == 8 else 4, double_quant)
    else:
        e.parts["weights"] = arch.params * weight_bytes
    if method == "full":
        trainable = arch.params
    elif method == "freeze":
        trainable = min(abs(trainable_layers), arch.layers) * (arch.layer_linear_params + 2 * arch.hidden)
    else:
        trainable = 0.0
    e.parts["gradients"] = trainable * weight_bytes
    e.parts["optimizer"] = trainable * state_bytes
    if trainable and optimizer in ("adamw_torch", "adafactor", "sgd"):
        # the foreach (non-fused) step allocates about one more copy of the trained weights
        e.parts["optimizer"] += trainable * weight_bytes
    if method in ("lora", "qlora") and info.trains:
        lp = arch.lora_params(lora_rank, lora_target or ["all"])
        e.parts["lora"] = lp * (4 + 4 + (2 if optimizer and "8bit" in optimizer else 8))
    if shards > 1:
        for k in ("weights", "gradients", "optimizer"):
            e.parts[k] /= shards
        e.notes.append(f"fsdp: weights, gradients and optimizer states sharded over {shards} GPUs")
    if reference and method in ("full", "freeze"):
        e.parts["reference"] = arch.params * 2.0 / shards
        e.notes.append("a frozen reference copy of the model (16-bit)")
    if stage_type == "export":
        e.method = "-"
        e.parts = {"weights": arch.params * 2.0}
        e.notes.append("export loads the model at 16 bit and merges the adapter in place")
    elif stage_type == "eval":
        e.method = "-"
        tokens = batch * seq
        e.parts = {"weights": arch.params * weight_bytes,
                   # forward only: one layer's activations and the fp32 logits with their log-softmax
                   "activations": tokens * arch.layer_activation_bytes(None) + tokens * arch.vocab * 4 * 2}
        e.notes.append("eval runs forward passes only (batch: evaluation.batchSize); generation's KV cache not counted")
    else:
        tokens = batch * seq
        per_layer = tokens * arch.layer_activation_bytes(
            (lora_target or ["all"]) if method in ("lora", "qlora") else None)
        if grad_ckpt:
            acts = arch.layers * tokens * arch.hidden * 2 + per_layer
        else:
            acts = arch.layers * per_layer
        if info.paired:
            acts *= 2  # chosen + rejected in one forward pass
        acts += tokens * arch.vocab * 4 * 2
        e.parts["activations"] = acts
        if info.generates:
            e.notes.append(f"generation KV cache{' and reward model' if info.needs_reward else ''} not counted: "
                           "a floor, not an estimate")
    e.parts["overhead"] = CUDA_OVERHEAD
    return e


# --- after training: chat and export (what a 128 GB DGX Spark can still do with a 70B result) ---

DEFAULT_SHARD = 5e9  # the hub's usual safetensors shard (save_pretrained's max_shard_size="5GB")


def _quantized_weight_bytes(arch: Arch, bits: int | None, double_quant: bool = True) -> float:
    """Weights loaded at `bits` (bitsandbytes: the decoder's linear layers; embeddings and the
    head stay 16-bit) or at 16 bit (None)."""
    if bits is None:
        return arch.params * 2.0
    # int8 with per-row scales; nf4/fp4 with an fp32 absmax per 64 weights, or (double quantisation)
    # an 8-bit absmax per 64 plus an fp32 constant per 256 blocks.
    q = 1.0 if bits == 8 else 0.5 + (1 / 64 + 4 / (64 * 256) if double_quant else 4 / 64)
    quantized = arch.quantizable_params
    return quantized * q + max(arch.params - quantized, 0.0) * 2.0


def estimate_chat(arch: Arch, bits: int | None = None, context: int = 4096, lora_rank: int = 0,
                  lora_target: list[str] | None = None) -> Estimate:
    """`kubetune chat`: the base (16-bit, or `bits` with --quantization), the adapter (fp32), a KV
    cache of `context` tokens (16-bit keys and values in every layer) and the runtime overhead."""
    e = Estimate(stage="chat", method=f"{bits}-bit" if bits else "bf16")
    e.parts["weights"] = _quantized_weight_bytes(arch, bits)
    if lora_rank:
        e.parts["lora"] = arch.lora_params(lora_rank, lora_target or ["all"]) * 4.0
    e.parts["activations"] = arch.layers * 2 * context * arch._q * arch.kv_ratio * 2.0  # the KV cache
    e.parts["overhead"] = CUDA_OVERHEAD
    return e


def model_shards(name: str) -> list[float]:
    """Sizes in bytes of a local model folder's safetensors shards ([] when it has none)."""
    folder = Path(name).expanduser()
    return [float(f.stat().st_size) for f in sorted(folder.glob("*.safetensors"))] if folder.is_dir() else []


def estimate_export(arch: Arch, layered: bool, lora_rank: int = 8, lora_target: list[str] | None = None,
                    shards: list[float] | None = None) -> Estimate:
    """Peak memory of merging an adapter (host memory: the merge runs on the CPU; on a DGX Spark
    that is the same memory the GPU uses).

    in-memory: the whole base in 16 bit (peft merges in place). layered (runtime/merge.py): the
    largest shard (the real ones of a local folder, else the hub's usual 5 GB, at least one layer),
    the adapter (fp32), and the fp32 temporaries of merging the biggest adapted matrix (W, B@A, W+ΔW)."""
    e = Estimate(stage="export", method="layered" if layered else "in-memory")
    lora = arch.lora_params(lora_rank, lora_target or ["all"]) * 4.0
    if not layered:
        e.parts["weights"] = arch.params * 2.0
        e.parts["lora"] = lora
        return e
    biggest = max(shards) if shards else max(DEFAULT_SHARD, arch.layer_linear_params * 2.0)
    e.parts["weights"] = biggest
    e.parts["lora"] = lora
    matrix = max(a * b for a, b in arch._targets(lora_target or ["all"]).values())
    e.parts["activations"] = 3 * matrix * 4.0
    e.notes.append(f"largest shard {_gib(biggest)}" + ("" if shards else ", assumed: no local safetensors to measure"))
    return e


def after_training(job, arch: Arch, limit: float | None = None) -> list[str]:
    """The lines `kubetune estimate` prints about chatting with and exporting the job's result."""
    from .api.plan import resolve_stage_defaults

    stages = [resolve_stage_defaults(raw) for raw in job.spec.stages]
    trained = [s for s in stages if s.type != "export"]
    adapter = next((s for s in reversed(trained) if s.method in ("lora", "qlora")), None)
    rank, target = (adapter.lora.rank, adapter.lora.target) if adapter else (0, None)
    chats = {bits: estimate_chat(arch, bits, lora_rank=rank, lora_target=target) for bits in (None, 8, 4)}
    lines = ["chat (kubetune chat, 4096-token context): " + " · ".join(
        f"{e.method} {_gib(e.total)}" for e in chats.values())]
    if limit and chats[None].total > limit:
        fits = [b for b in (8, 4) if chats[b].total <= limit]
        lines.append(f"    note: chat in bf16 does not fit in {_gib(limit)}"
                     + (f"; use `kubetune chat --quantization {fits[0]}`" if fits else "; not even in 4-bit"))
    if adapter:
        shards = model_shards(job.spec.model.name)
        mem = estimate_export(arch, False, rank, target)
        lay = estimate_export(arch, True, rank, target, shards)
        lines.append(f"export merge (kubetune export / export stage): in-memory {_gib(mem.total)} · "
                     f"layered {_gib(lay.total)} peak ({lay.notes[0]})")
        if limit and mem.total > limit:
            lines.append(f"    note: the in-memory merge does not fit in {_gib(limit)}; the layered merge (the default "
                         "for a local safetensors base) does" + ("" if lay.total <= limit else " not either"))
    return lines


def parse_size(text: str) -> float:
    """`80GiB`, `80Gi`, `24GB`, `80` (GiB) → bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([MGT])?(i)?(B)?\s*", str(text))
    if not m:
        raise UserError(f"cannot read a memory size from {text!r} (e.g. 80GiB, 24GB)", "--gpu-memory")
    decimal = m.group(2) is not None and m.group(4) is not None and m.group(3) is None  # GB, MB, TB
    exp = {"M": 2, "G": 3, "T": 4}[m.group(2) or "G"]
    return float(m.group(1)) * (1000 if decimal else 1024) ** exp


def estimate_stage(arch: Arch, stage, model, resources, grad_ckpt: bool | None = None) -> Estimate:
    """Bytes per device of one stage (a StageSpec with its defaults resolved). `grad_ckpt` None:
    what the stage says, assuming recomputation when it leaves the choice open."""
    hp = stage.hyperparameters
    wb = 4.0 if (model.dtype == "float32" or hp.precision == "fp32") else 2.0
    shards = resources.nodes * max(resources.gpus_per_node, 1) if resources.strategy == "fsdp" else 1
    return estimate_memory(
        arch, method=stage.method, stage_type=stage.type, stage=stage.name,
        bits=stage.quantization.bits if stage.quantization else None, weight_bytes=wb,
        double_quant=stage.quantization.double_quantization if stage.quantization else True,
        batch=stage.evaluation.batch_size if stage.type == "eval" else hp.batch_size, seq=hp.cutoff_len,
        grad_ckpt=(hp.gradient_checkpointing is not False) if grad_ckpt is None else grad_ckpt,
        lora_rank=stage.lora.rank, lora_target=stage.lora.target, trainable_layers=stage.freeze.trainable_layers,
        optimizer=hp.optimizer, shards=shards,
        # a frozen second model: the reference policy, or a distill stage's teacher (counted as a copy)
        reference=STAGE_TYPES[stage.type].reference_model or STAGE_TYPES[stage.type].needs_teacher,
    )


def estimate_job(job, params: str | None = None) -> tuple[Arch, list[Estimate]]:
    """One estimate per stage of a FineTuneJob (spec model instance)."""
    from .api.plan import resolve_stage_defaults

    spec = job.spec
    arch = model_arch(spec.model.name, params)
    stages = [resolve_stage_defaults(raw) for raw in spec.stages]
    ests = []
    for n, st in enumerate(stages):
        adapter = next((s for s in reversed(stages[:n]) if s.method in ("lora", "qlora")), None)
        if st.type == "export" and adapter is not None:
            # the export stage merges layered when the base is a local safetensors folder (runtime/export.py)
            shards = model_shards(spec.model.name)
            e = estimate_export(arch, bool(shards), adapter.lora.rank, adapter.lora.target, shards)
            e.stage, e.method = st.name, "-"
            e.notes.insert(0, f"{'layered' if shards else 'in-memory'} merge, in host memory")
            ests.append(e)
        else:
            ests.append(estimate_stage(arch, st, spec.model, spec.resources))
    return arch, ests


def _gib(b: float) -> str:
    return f"{b / GIB:.1f} GiB"


def estimate_main(file: str, overrides: list[str], params: str | None, gpu_memory: str | None) -> int:
    from .api.spec import load_job

    job = load_job(file, overrides)
    arch, ests = estimate_job(job, params)
    print(f"model {job.spec.model.name}: {arch.params / 1e9:.2f}B parameters ({arch.layers} layers, hidden "
          f"{arch.hidden}, vocab {arch.vocab}; from {arch.source})")
    limit = parse_size(gpu_memory) if gpu_memory else None
    cols = ["weights", "gradients", "optimizer", "lora", "reference", "activations", "overhead"]
    print(f"{'STAGE':<14}{'METHOD':<8}" + "".join(f"{c.upper():>13}" for c in cols) + f"{'TOTAL':>12}")
    worst = 0
    export_stages = {st.name for st in job.spec.stages if st.type == "export"}
    for e in ests:
        row = "".join(f"{(_gib(e.parts[c]) if c in e.parts else '-'):>13}" for c in cols)
        print(f"{e.stage:<14}{e.method:<8}{row}{_gib(e.total):>12}")
        for n in e.notes:
            print(f"    note: {n}")
        if limit and e.total > limit and e.stage in export_stages:
            worst += 1
            print(f"WARNING: export stage {e.stage!r} needs about {_gib(e.total)} but there are {_gib(limit)}: give "
                  "spec.model.name as a local folder of safetensors so that it merges layer by layer",
                  file=sys.stderr)
        elif limit and e.total > limit:
            worst += 1
            print(f"WARNING: stage {e.stage!r} needs about {_gib(e.total)} per GPU but the GPU has {_gib(limit)}: it "
                  "will not fit — try method qlora, a smaller batchSize/cutoffLen, gradientCheckpointing, or "
                  "resources.strategy fsdp over more GPUs", file=sys.stderr)
    for line in after_training(job, arch, limit):
        print(line)
    print("(estimate per GPU; expect ±25 %: allocator behaviour, kernels and framework versions vary)")
    if limit and not worst:
        print(f"fits in {_gib(limit)} per GPU")
    return 0


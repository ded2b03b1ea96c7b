"""Attention for padding-free packed rows: each document of a packed row attends only to itself.

TRL's padding-free collator (every `pt`/`sft` stage packs or flattens its batches) hands the model
one row of several documents with `position_ids` restarting at 0 for each document, plus the
documents' cumulative lengths (`cu_seq_lens_q/k`, `max_length_q/k`). Under transformers' SDPA those
rows get an explicit block-diagonal mask, which forces PyTorch's memory-efficient kernel over the
whole T×T square and skips nothing. Here they go to variable-length attention instead:
`torch.nn.attention.varlen.varlen_attn` (flash/cuDNN kernels: causal within each document, no
mask, no masked blocks computed).

`kubetune_varlen` is registered in transformers' AttentionInterface (the attention function) and
AttentionMaskInterface (its mask: none for packed or plain causal rows; SDPA's mask for padded
batches, a KV cache or a model with sliding windows / soft-capping, which then run through SDPA).
Inside, the kernel is picked per call from what the tensors allow: `varlen_attn` for CUDA tensors
in fp16/bf16, else `reference_varlen_attn` — the same contract (T×H×D tensors, cumulative lengths,
`window_size=(-1, 0)` for causal, `enable_gqa`) computed one document at a time with SDPA. The
reference is what runs the CPU equivalence tests and what a GPU check compares `varlen_attn` to.

`choose_attention` decides at load time and logs the choice: on CUDA with bf16/fp16 weights and
compute capability ≥ 8.0, `kubetune_varlen` if this torch has `varlen_attn`, else transformers'
`flex_attention` (document mask from the position ids); everywhere else SDPA (on CPU `varlen_attn`
has no kernel and `flex_attention` no backward).
"""

from __future__ import annotations

import inspect
import logging
from collections import Counter
from typing import Any

import torch

log = logging.getLogger(__name__)

VARLEN = "kubetune_varlen"
CAUSAL = (-1, 0)  # varlen_attn's window_size for causal attention; (-1, -1) is full attention
calls: Counter = Counter()  # which path each attention call took (the bench records it per run)


def _torch_varlen():
    """torch's varlen_attn with the signature of today's (window_size, scale), and whether it takes
    `enable_gqa`; (None, False) where this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, False
    return adapt_varlen(varlen_attn)


def adapt_varlen(fn):
    """The first releases (torch 2.10) took `is_causal` instead of `window_size` and no GQA."""
    params = inspect.signature(fn).parameters
    gqa = "enable_gqa" in params
    if "window_size" in params:
        return fn, gqa

    def call(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1), **kw):
        if tuple(window_size) not in ((-1, -1), CAUSAL):
            raise NotImplementedError(f"this varlen_attn has no window_size ({window_size})")
        extra = dict(kw)
        if "scale" in params:
            extra["scale"] = scale
        elif scale is not None and abs(scale - query.size(-1) ** -0.5) > 1e-12:
            raise NotImplementedError("this varlen_attn takes no scale")
        return fn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=tuple(window_size) == CAUSAL, **extra)

    return call, gqa


def reference_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None,
                          window_size=(-1, -1), enable_gqa=False, **_unused):
    """`varlen_attn`'s contract computed document by document with SDPA (any device, any dtype).

    query (T_q, H_q, D), key/value (T_k, H_kv, D); document i is rows cu_seq_q[i]:cu_seq_q[i+1] of
    the queries and cu_seq_k[i]:cu_seq_k[i+1] of the keys; causal iff window_size == (-1, 0);
    H_kv < H_q only with enable_gqa (as varlen_attn). Returns (T_q, H_q, D)."""
    hq, hk = query.size(1), key.size(1)
    if hq != hk and not enable_gqa:
        raise ValueError(f"query has {hq} heads, key/value {hk}: set enable_gqa=True for GQA")
    window = tuple(window_size)
    if window not in ((-1, -1), CAUSAL):
        raise NotImplementedError(f"reference_varlen_attn: window_size {window}")
    bq, bk = cu_seq_q.tolist(), cu_seq_k.tolist()
    outs = []
    for i in range(len(bq) - 1):
        q = query[bq[i]:bq[i + 1]].transpose(0, 1)[None]
        k = key[bk[i]:bk[i + 1]].transpose(0, 1)[None]
        v = value[bk[i]:bk[i + 1]].transpose(0, 1)[None]
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=window == CAUSAL, scale=scale,
                                                             enable_gqa=hq != hk)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs) if outs else query.new_zeros(query.shape[:2] + value.shape[-1:])


def run_varlen(fn, query, key, value, cu_seqlens, max_len: int, scale, *, native_gqa: bool):
    """Causal varlen attention through `fn` (varlen_attn's signature); with GQA, fn gets
    `enable_gqa=True` where it takes it (native_gqa), else the KV heads expanded to the query heads."""
    groups = query.size(1) // key.size(1)
    extra: dict[str, Any] = {}
    if groups > 1:
        if native_gqa:
            extra["enable_gqa"] = True
        else:  # query head h reads kv head h // groups, as transformers' repeat_kv
            key = key.repeat_interleave(groups, dim=1)
            value = value.repeat_interleave(groups, dim=1)
    return fn(query, key, value, cu_seqlens, cu_seqlens, max_len, max_len, scale=scale, window_size=CAUSAL, **extra)


def document_boundaries(batch: int, seq: int, device, position_ids=None, cu_seq_lens=None, max_length=None):
    """(cu_seqlens int32, longest document) of `batch` rows of `seq` tokens flattened into one.

    The collator's cu_seq_lens_q when it gave them for this single row; else a new document starts
    at every row and wherever the position ids do not go up by one (transformers' own rule for
    packed rows, `find_packed_sequence_indices`); without position ids each row is one document."""
    if cu_seq_lens is not None and batch == 1 and max_length is not None:
        return cu_seq_lens.to(device=device, dtype=torch.int32), int(max_length)
    total = batch * seq
    if position_ids is None:
        cu = torch.arange(0, total + 1, seq, device=device, dtype=torch.int32)
        return cu, seq
    pos = position_ids.to(device).expand(batch, -1)
    start = torch.ones_like(pos, dtype=torch.bool)
    start[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    starts = start.reshape(-1).nonzero().flatten()
    cu = torch.cat([starts, torch.tensor([total], device=device)]).to(torch.int32)
    return cu, int(cu.diff().max())


def _document_mask(cu: torch.Tensor, total: int) -> torch.Tensor:
    """Block-diagonal causal boolean mask (1, 1, T, T) of the documents (the SDPA path's mask)."""
    doc = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=cu.device), cu.diff().long())
    idx = torch.arange(total, device=cu.device)
    return ((doc[:, None] == doc[None, :]) & (idx[:, None] >= idx[None, :]))[None, None]


def packed_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                             is_causal=None, **kwargs):
    """transformers' attention-function interface: query (B, H_q, S, D), key/value (B, H_kv, S_k, D)
    → ((B, S, H_q, D), None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, seq, dim = query.shape
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is not None or key.shape[2] != seq or seq == 1 or not causal or kwargs.get("softcap"):
        # padded batch, KV cache, bidirectional or soft-capped: SDPA with the mask transformers built
        calls["sdpa"] += 1
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    cu, longest = document_boundaries(batch, seq, query.device, kwargs.get("position_ids"),
                                      kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q"))
    if dropout > 0.0:  # the varlen kernels take no dropout: the block-diagonal mask, as SDPA had it
        calls["sdpa_documents"] += 1
        out, _ = sdpa_attention_forward(module, _flat(query), _flat(key), _flat(value), _document_mask(cu, batch * seq),
                                        dropout=dropout, scaling=scaling, **_without(kwargs))
        return out.reshape(batch, seq, heads, -1), None
    q = query.transpose(1, 2).reshape(batch * seq, heads, dim)
    k = key.transpose(1, 2).reshape(batch * seq, key.shape[1], dim)
    v = value.transpose(1, 2).reshape(batch * seq, value.shape[1], value.shape[-1])
    fn, native = kernel_for(q)
    calls["varlen" if fn is not reference_varlen_attn else "reference"] += 1
    out = run_varlen(fn, q, k, v, cu, longest, scaling, native_gqa=native)
    return out.reshape(batch, seq, heads, -1), None


def _flat(x):
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(1, b * s, h, d).transpose(1, 2)


def _without(kwargs):
    return {k: v for k, v in kwargs.items() if k not in ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k",
                                                          "max_length_q", "max_length_k", "is_causal")}


def kernel_for(q: torch.Tensor):
    """(function with varlen_attn's signature, takes enable_gqa) for these tensors."""
    fn, native = _torch_varlen()
    if fn is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return fn, native
    return reference_varlen_attn, True


def _plain_causal(config) -> bool:
    """Full causal attention in every layer, no soft-capping: what the varlen path computes."""
    if config is None:
        return False
    types = getattr(config, "layer_types", None)
    if types:
        if any(t != "full_attention" for t in types):
            return False
    elif getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return False
    return getattr(config, "attn_logit_softcapping", None) is None and getattr(config, "is_causal", True)


def packed_attention_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None,
                          config=None, **kwargs):
    """The mask function of `kubetune_varlen`: none where the attention function finds the documents
    itself (no padding, no cache, plain causal model); otherwise SDPA's mask (→ the SDPA path)."""
    from transformers.masking_utils import sdpa_mask

    no_padding = attention_mask is None or bool(attention_mask[:, -kv_length:].all())
    if no_padding and q_length == kv_length and _is_zero(q_offset) and _is_zero(kv_offset) and _plain_causal(config):
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, attention_mask=attention_mask, config=config, **kwargs)


def _is_zero(x) -> bool:
    return (int(x) if isinstance(x, torch.Tensor) else x) == 0


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, packed_attention_forward)
    AttentionMaskInterface.register(VARLEN, packed_attention_mask)


def choose_attention(requested: str = "auto", dtype: torch.dtype | None = None, device: str | None = None) -> str:
    """The attn_implementation a model loads with (logged). `requested` other than auto is kept."""
    if requested != "auto":
        log.info("attention: %s (spec.model.attnImplementation)", requested)
        return requested
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    half = dtype in (torch.float16, torch.bfloat16)
    fn, native = _torch_varlen()
    if device == "cuda" and half and torch.cuda.get_device_capability() >= (8, 0):
        if fn is not None:
            register()
            log.info("attention: %s (torch varlen_attn, %s GQA) for padding-free packed rows; padded batches "
                     "and KV-cache steps through SDPA", VARLEN, "native" if native else "expanded-KV")
            return VARLEN
        log.info("attention: flex_attention (this torch %s has no varlen_attn)", torch.__version__)
        return "flex_attention"
    why = ("no CUDA device: varlen_attn has no CPU kernel, flex_attention no CPU backward" if device != "cuda"
           else f"weights in {dtype} or compute capability < 8.0: no flash kernel")
    log.info("attention: sdpa (%s)", why)
    return "sdpa"

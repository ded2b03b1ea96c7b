"""Varlen attention for padding-free packed rows (`runtime/attention.py`), on CPU.

The attention function is the one a GPU runs; on CPU its innermost kernel is
`reference_varlen_attn` (varlen_attn's contract, one document at a time). Compared with the path
it replaces (SDPA with transformers' block-diagonal mask built from the position ids) on a tiny
Llama-shaped model with GQA, fed the batch TRL's padding-free collator makes of packed documents.
"""

from __future__ import annotations

import logging

import pytest
import torch

from kubetune.runtime import attention

DOCS = [7, 13, 1, 20, 11, 5]  # document lengths in one packed row (one of a single token)
TOL = 2e-5  # fp32: the two paths differ only in summation order


def tiny_llama(attn: str, kv_heads: int = 2, dtype=torch.float32, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    attention.register()
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256,
                      tie_word_embeddings=False, pad_token_id=0)
    cfg.use_cache = False  # as SFTTrainer sets it: with a cache, transformers' SDPA path drops the packing mask
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).to(dtype), attn


def load_as(attn: str, **kw):
    """The same weights (same seed) with the given attention implementation."""
    model, _ = tiny_llama(attn, **kw)
    model.set_attn_implementation(attn)
    return model


def packed_batch(docs=DOCS, seed: int = 1):
    """The batch TRL's padding-free collator emits for one packed row of these documents."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 97, (sum(docs),), generator=g).tolist()
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(
        [{"input_ids": ids, "seq_lengths": list(docs)}])
    assert batch["cu_seq_lens_q"].tolist() == [0, *torch.tensor(docs).cumsum(0).tolist()]
    return batch


def run(model, batch):
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return out.logits.detach(), out.loss.detach(), grads


def max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls that reached the varlen kernel (so a silent SDPA fallback cannot pass)."""
    seen = []
    real = attention.reference_varlen_attn

    def counting(*a, **kw):
        seen.append(kw.get("window_size"))
        return real(*a, **kw)

    monkeypatch.setattr(attention, "reference_varlen_attn", counting)
    return seen


@pytest.mark.parametrize("kv_heads", [2, 4])  # GQA (2 query heads per kv head) and plain MHA
def test_packed_row_gives_the_masked_sdpa_logits_and_gradients(kv_heads, calls):
    batch = packed_batch()
    sdpa_logits, sdpa_loss, sdpa_grads = run(load_as("sdpa", kv_heads=kv_heads), batch)
    ours_logits, ours_loss, ours_grads = run(load_as(attention.VARLEN, kv_heads=kv_heads), batch)
    assert len(calls) == 2 and set(calls) == {attention.CAUSAL}  # both layers, causal, through the kernel
    assert attention.calls["reference"] >= 2
    d_logits = (ours_logits - sdpa_logits).abs().max().item()
    d_grads = max_diff(ours_grads, sdpa_grads)
    print(f"kv_heads={kv_heads}: max |Δ logits| {d_logits:.2e}, max |Δ grad| {d_grads:.2e}, "
          f"|Δ loss| {abs(ours_loss - sdpa_loss).item():.2e}")
    assert d_logits < TOL and d_grads < TOL
    assert all(g.abs().max() > 0 for n, g in ours_grads.items() if "layers" in n)  # gradients reached every layer


def per_document_logits(model, batch, docs=DOCS):
    """Each document run alone (its own forward, no packing): the ground truth of a packed row."""
    ids = batch["input_ids"][0]
    out, start = [], 0
    with torch.no_grad():
        for n in docs:
            out.append(model(input_ids=ids[start:start + n][None]).logits[0])
            start += n
    return torch.cat(out)


def test_no_document_sees_another(calls):
    """Packed logits equal each document run alone (a leak across documents changes them)."""
    batch = packed_batch()
    model = load_as(attention.VARLEN)
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
    alone = per_document_logits(load_as("sdpa"), batch)
    assert (packed - alone).abs().max().item() < TOL
    with torch.no_grad():  # unlike transformers' SDPA path, the documents stay apart with use_cache=True too
        cached = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=True).logits[0]
    assert (cached - alone).abs().max().item() < TOL


def test_the_leak_check_can_fail(monkeypatch):
    """The check above is sensitive: boundaries that merge the documents into one (what a kernel
    ignoring cu_seqlens does) move the logits of every document after the first far past TOL."""
    batch = packed_batch()
    monkeypatch.setattr(attention, "document_boundaries",
                        lambda b, s, device, *a: (torch.tensor([0, b * s], dtype=torch.int32), b * s))
    with torch.no_grad():
        leaky = load_as(attention.VARLEN)(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
    alone = per_document_logits(load_as("sdpa"), batch)
    first = DOCS[0]
    assert (leaky[:first] - alone[:first]).abs().max().item() < TOL  # causal: the first document is unaffected
    assert (leaky[first:] - alone[first:]).abs().max().item() > 1e-2


def test_position_ids_alone_give_the_same_documents(calls):
    """Without the collator's cu_seq_lens (another caller), boundaries come from the position ids."""
    batch = packed_batch()
    with_cu, _, grads_cu = run(load_as(attention.VARLEN), batch)
    plain = {k: batch[k] for k in ("input_ids", "position_ids", "labels")}
    without, _, grads = run(load_as(attention.VARLEN), plain)
    assert len(calls) == 4
    assert (with_cu - without).abs().max().item() == 0 and max_diff(grads_cu, grads) == 0
    cu, longest = attention.document_boundaries(1, sum(DOCS), "cpu", batch["position_ids"])
    assert cu.tolist() == batch["cu_seq_lens_q"].tolist() and longest == max(DOCS)


def strict_varlen(query, key, value, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
    """varlen_attn as torch versions without GQA support have it: no enable_gqa, equal head counts."""
    assert query.size(1) == key.size(1) == value.size(1)
    return attention.reference_varlen_attn(query, key, value, cu_q, cu_k, max_q, max_k, scale=scale,
                                           window_size=window_size)


def test_gqa_native_and_expanded_agree():
    """The same attention whether the kernel takes enable_gqa or gets the KV heads expanded."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(57, 8, 16, generator=g)
    k, v = torch.randn(57, 2, 16, generator=g), torch.randn(57, 2, 16, generator=g)
    cu = torch.tensor([0, 7, 20, 21, 57], dtype=torch.int32)
    native = attention.run_varlen(attention.reference_varlen_attn, q, k, v, cu, 36, 0.25, native_gqa=True)
    expanded = attention.run_varlen(strict_varlen, q, k, v, cu, 36, 0.25, native_gqa=False)
    assert (native - expanded).abs().max().item() < 1e-6
    with pytest.raises(TypeError):  # the strict kernel really refuses enable_gqa
        attention.run_varlen(strict_varlen, q, k, v, cu, 36, 0.25, native_gqa=True)
    # and against SDPA on the expanded heads with the block-diagonal mask
    mask = attention._document_mask(cu, 57)[0]
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(4, 1).transpose(0, 1), v.repeat_interleave(4, 1).transpose(0, 1),
        attn_mask=mask, scale=0.25).transpose(0, 1)
    assert (native - ref).abs().max().item() < 1e-6


def old_varlen(query, key, value, cu_q, cu_k, max_q, max_k, *, is_causal=False, return_aux=None):
    """varlen_attn as torch 2.10 had it: is_causal, no window_size, no scale, no GQA."""
    assert query.size(1) == key.size(1)
    return attention.reference_varlen_attn(query, key, value, cu_q, cu_k, max_q, max_k,
                                           window_size=attention.CAUSAL if is_causal else (-1, -1))


def test_the_first_varlen_signature_is_adapted(monkeypatch):
    fn, native = attention.adapt_varlen(old_varlen)
    assert native is False and fn is not old_varlen
    assert attention.adapt_varlen(strict_varlen) == (strict_varlen, False)
    monkeypatch.setattr(attention, "kernel_for", lambda q: (fn, native))
    batch = packed_batch()
    ours, _, grads = run(load_as(attention.VARLEN), batch)
    ref, _, ref_grads = run(load_as("sdpa"), batch)
    assert (ours - ref).abs().max().item() < TOL and max_diff(grads, ref_grads) < TOL
    with pytest.raises(NotImplementedError):  # a scale it cannot take is refused, not ignored
        fn(*[torch.zeros(4, 2, 16)] * 3, torch.tensor([0, 4], dtype=torch.int32), None, 4, 4, scale=0.5)


def test_a_model_through_a_kernel_without_gqa(monkeypatch):
    """The whole model with a GQA-less varlen_attn (KV heads expanded by us) matches SDPA."""
    monkeypatch.setattr(attention, "kernel_for", lambda q: (strict_varlen, False))
    batch = packed_batch()
    ours, _, grads = run(load_as(attention.VARLEN), batch)
    ref, _, ref_grads = run(load_as("sdpa"), batch)
    assert (ours - ref).abs().max().item() < TOL and max_diff(grads, ref_grads) < TOL


def test_padded_batches_and_generation_go_through_sdpa(calls):
    """Where the rows are padded or a KV cache is used, the implementation is SDPA's."""
    ids = torch.randint(1, 97, (2, 12), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    ours, ref = load_as(attention.VARLEN).eval(), load_as("sdpa").eval()
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask).logits
        b = ref(input_ids=ids, attention_mask=mask).logits
    assert (a - b)[mask.bool()].abs().max().item() < TOL
    assert calls == []  # padded: never the varlen kernel
    gen_ours = ours.generate(ids[:1], max_new_tokens=6, do_sample=False, use_cache=True)
    gen_ref = ref.generate(ids[:1], max_new_tokens=6, do_sample=False, use_cache=True)
    assert gen_ours.tolist() == gen_ref.tolist()
    assert len(calls) == 2  # the prefill (one unpadded row) ran varlen in both layers; decoding did not


def test_choice_at_load_time(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="kubetune.runtime.attention")
    assert attention.choose_attention("auto", torch.float32) == "sdpa"  # this machine: CPU
    assert "no CUDA device" in caplog.text
    assert attention.choose_attention("eager", torch.bfloat16) == "eager"  # the spec's choice is kept
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert attention.choose_attention("auto", torch.bfloat16, device="cuda") == attention.VARLEN
    assert "varlen_attn, native GQA" in caplog.text
    assert attention.choose_attention("auto", torch.float32, device="cuda") == "sdpa"  # no flash kernel in fp32
    monkeypatch.setattr(attention, "_torch_varlen", lambda: (None, False))
    assert attention.choose_attention("auto", torch.bfloat16, device="cuda") == "flex_attention"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    assert attention.choose_attention("auto", torch.float16, device="cuda") == "sdpa"


def test_sliding_window_models_keep_their_mask():
    """A model the varlen path does not compute (sliding windows) gets SDPA's mask, not none."""
    from transformers import MistralConfig

    cfg = MistralConfig(sliding_window=4)
    assert not attention._plain_causal(cfg)
    mask = attention.packed_attention_mask(1, 10, 10, config=cfg, mask_function=_sliding(4), device="cpu",
                                           allow_is_causal_skip=False)
    assert mask is not None and mask.shape[-2:] == (10, 10)
    from transformers import LlamaConfig, Qwen2Config

    assert attention.packed_attention_mask(1, 10, 10, config=LlamaConfig()) is None
    assert attention._plain_causal(Qwen2Config())  # sliding window configured but off: every layer full
    assert not attention._plain_causal(Qwen2Config(use_sliding_window=True, sliding_window=8, max_window_layers=0))


def test_saved_models_do_not_name_the_implementation(tmp_path):
    """An exported model or adapter loads anywhere: `kubetune_varlen` is never written to its files."""
    from peft import LoraConfig, get_peft_model

    model = load_as(attention.VARLEN)
    model.save_pretrained(tmp_path / "full")
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "adapter")
    written = [p.read_text() for p in tmp_path.rglob("*.json")]
    assert len(written) >= 3 and not any(attention.VARLEN in text for text in written)


def _sliding(w):
    from transformers.masking_utils import sliding_window_causal_mask_function

    return sliding_window_causal_mask_function(w)


def test_sft_trainer_trains_the_same_through_varlen(tmp_path, calls, tiny_tokenizer):
    """TRL's SFTTrainer with packing (padding-free rows) gives the same losses with either path,
    and its batches reach the varlen kernel."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    g = torch.Generator().manual_seed(7)
    rows = [{"input_ids": torch.randint(1, 97, (int(n),), generator=g).tolist()}
            for n in torch.randint(3, 30, (40,), generator=g)]
    losses = {}
    for attn in ("sdpa", attention.VARLEN):
        args = SFTConfig(output_dir=str(tmp_path / attn), max_steps=3, per_device_train_batch_size=2, packing=True,
                         max_length=64, learning_rate=1e-3, use_cpu=True, bf16=False, logging_steps=1,
                         save_strategy="no", report_to="none", disable_tqdm=True, seed=0, data_seed=0)
        trainer = SFTTrainer(model=load_as(attn), args=args, train_dataset=Dataset.from_list(rows),
                              processing_class=tiny_tokenizer)
        trainer.train()
        losses[attn] = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses["sdpa"]) == 3
    assert losses[attention.VARLEN] == pytest.approx(losses["sdpa"], abs=1e-5)
    assert len(calls) >= 3 * 2  # every step, both layers

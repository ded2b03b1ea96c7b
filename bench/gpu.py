#!/usr/bin/env python
"""GPU training throughput: kubetune's SFT stage with its defaults vs a plain TRL SFTTrainer.

One prepared script for a short GPU lease (issue 10, target 1). Workload: LoRA SFT (rank 16,
alpha 32, every `*_proj` module) of a Llama-3-8B-shaped model (random init, bf16, built from
`LlamaConfig`: no download), conversations packed (TRL best-fit-decreasing) into rows of 4096
tokens, micro-batch 1 row, gradient accumulation 4, a few warm-up steps then timed steps.

(a) "ours": a FineTuneJob document → `plan` → `execute_stage`, i.e. our SFT stage with every
    default the runtime picks (SDPA attention, fused AdamW, padding-free batches, and gradient
    checkpointing only when the activations would not fit: `common_args`).
(b) "trl":  `SFTTrainer(model, args=SFTConfig(...), peft_config=LoraConfig(...))` with TRL's
    defaults, given only what defines the workload: packing to 4096 tokens, the same micro-batch
    and accumulation, the step count, and bookkeeping (no saving, no reports, token counting).

Both get the same random-init model (same seed, dtype bf16, SDPA attention) and the same data.
Optional cases, run only while time is left: full fine-tuning of a Llama-3.2-1B shape (ours and
TRL), ours with gradient checkpointing forced on (ablation).

FLOPs counted per trained token (the table prints both MFUs, against 989 TFLOP/s dense bf16):
  * "ours" count — what the GPU must do for a frozen base with LoRA, recomputation not counted:
      4·N_lin            linear layers and LM head: forward 2·N, backward input-gradients 2·N;
                         no weight-gradients for the frozen weights (a full fine-tune adds 2·N)
    + 6·N_lora           the adapters (forward, input- and weight-gradients)
    + 6·L·s·d            causal attention scores and values (forward 2·L·s·d, backward 2×), each
                         packed row of s = 4096 tokens counted as one causal sequence
  * "NeMo" count — what reproduces NeMo AutoModel's published LoRA row (402 TFLOP/s at 12,473
    tokens/s = 32.2 GFLOP/token for Llama-3-8B, seq 4096): 2/3 of the Megatron full-training
    Llama formula without the LM-head term, per token 2/3·L·d²·(12 + 12·g/a + 18·f/d + 12·s/d)
    (g kv heads, a heads, f FFN width, d hidden).

Run: `python bench/gpu.py` on the GPU machine (writes $OUT/gpu.json); `python bench/gpu.py
--smoke` checks the whole script on CPU with a tiny shape.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import shutil
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEAK_TFLOPS = 989.0  # H100 SXM dense bf16, what NeMo's MFU uses

SHAPES = {
    "llama3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False),
    "llama3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                        intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
    "smoke": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=4096, tie_word_embeddings=False),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WORDS = None


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


# ---------------------------------------------------------------- data, tokenizer, model folder


def _words(n=3000, seed=0):
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(n)]


def make_records(n: int, mean_words: int, seed: int = 1) -> list[dict]:
    """Alpaca records with lengths spread like instruction data (a few long ones)."""
    rng = random.Random(seed)
    words = _words()

    def text(k):
        return " ".join(rng.choice(words) for _ in range(max(1, k))).capitalize() + "."

    out = []
    for _ in range(n):
        k = int(rng.lognormvariate(0, 0.7) * mean_words)
        out.append({"instruction": text(k // 6 + 3), "input": text(k // 6) if rng.random() < 0.4 else "",
                    "output": text(k)})
    return out


def build_model_dir(folder: Path, shape: str, records: list[dict]) -> Path:
    """config.json of the shape + a BPE tokenizer trained here with the chatml template. No weights:
    `install_random_init` builds them when the stage (or the baseline) asks for the model."""
    from transformers import LlamaConfig

    from kubetune.runtime.tiny import train_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    texts = [r["instruction"] + " " + r["output"] for r in records[:400]]
    tok = train_tokenizer(texts, vocab_size=2000)
    tok.save_pretrained(folder)
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, rope_theta=500000.0,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    cfg.save_pretrained(folder)
    return folder


def random_model(path, dtype=None, attn_implementation=None, **_ignored):
    """A randomly initialised model of path/config.json, built directly on the GPU."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        m = AutoModelForCausalLM.from_config(cfg, dtype=dtype or torch.bfloat16,
                                             attn_implementation=attn_implementation or "sdpa")
    return m


def install_random_init():
    """Our stage loads through `AutoModelForCausalLM.from_pretrained(path, dtype=..., attn_implementation=...)`;
    for folders without weights, build the model from its config with the options asked for."""
    import transformers

    original = transformers.AutoModelForCausalLM.from_pretrained

    def from_pretrained(path, *args, **kwargs):
        p = Path(str(path))
        if p.is_dir() and not any(p.glob("*.safetensors")) and not (p / "adapter_config.json").exists():
            return random_model(p, **kwargs)
        return original(path, *args, **kwargs)

    transformers.AutoModelForCausalLM.from_pretrained = staticmethod(from_pretrained)


# ---------------------------------------------------------------- timing


def make_timer(warmup: int):
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.marks: list[tuple[int, float, int]] = []
            self.losses: list[float] = []
            self.gc = None

        def on_train_begin(self, args, state, control, model=None, **kw):
            self.gc = bool(args.gradient_checkpointing)
            self.liger = bool(getattr(args, "use_liger_kernel", False))
            self.optim = str(args.optim)

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.marks.append((state.global_step, time.perf_counter(), int(state.num_input_tokens_seen or 0)))

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

        def result(self):
            if len(self.marks) <= warmup:
                raise RuntimeError(f"only {len(self.marks)} steps ran")
            s0, t0, n0 = self.marks[warmup - 1] if warmup > 0 else self.marks[0]
            s1, t1, n1 = self.marks[-1]
            return {"timed_steps": s1 - s0, "seconds": t1 - t0, "tokens": n1 - n0,
                    "tokens_per_s": (n1 - n0) / (t1 - t0), "gradient_checkpointing": self.gc,
                    "liger": self.liger, "optim": self.optim,
                    "first_loss": self.losses[0] if self.losses else None,
                    "last_loss": self.losses[-1] if self.losses else None}

    return StepTimer()


def flops_per_token(shape: str, seq: int, method: str, lora_rank: int = 16) -> dict:
    c = SHAPES[shape]
    d, L, f, V = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], c["vocab_size"]
    a, g = c["num_attention_heads"], c["num_key_value_heads"]
    kv = g * d // a
    lin_layer = d * d + 2 * d * kv + d * d + 3 * d * f
    n_lin = L * lin_layer + V * d  # LM head is a matmul; the embedding lookup is not
    lora_layer = lora_rank * ((d + d) * 2 + (d + kv) * 2 + (d + f) * 3)
    attn = 6 * L * seq * d  # causal: forward 2·L·s·d, backward twice that
    if method == "lora":
        ours = 4 * n_lin + 6 * L * lora_layer + attn
        nemo = 2 / 3 * L * d * d * (12 + 12 * g / a + 18 * f / d + 12 * seq / d)
    else:  # full fine-tuning: weight-gradients too
        ours = 6 * n_lin + attn
        nemo = L * d * d * (12 + 12 * g / a + 18 * f / d + 12 * seq / d) + 6 * V * d
    return {"ours": ours, "nemo": nemo, "n_linear_params": n_lin}


def _cuda_reset():
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib():
    import torch

    if not torch.cuda.is_available():
        return None
    return {"allocated": torch.cuda.max_memory_allocated() / 2**30, "reserved": torch.cuda.max_memory_reserved() / 2**30}


# ---------------------------------------------------------------- the two runners


def run_ours(work: Path, model_dir: Path, data_file: Path, *, method: str, steps: int, ga: int, seq: int,
             warmup: int, name: str, extra_hp: dict | None = None) -> dict:
    from kubetune.runtime.local import execute_stage
    from kubetune.runtime.plan import plan
    from kubetune.runtime.spec import parse_job

    stage = {"name": "sft", "type": "sft", "method": method,
             "hyperparameters": {"maxSteps": steps, "batchSize": 1, "gradientAccumulation": ga, "cutoffLen": seq,
                                 "packing": True, "loggingSteps": 1, "learningRate": 1e-4 if method == "lora" else 1e-5,
                                 **(extra_hp or {})}}
    if method == "lora":
        stage["lora"] = {"rank": 16, "alpha": 32, "target": TARGETS}
    doc = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name},
           "spec": {"model": {"name": str(model_dir)}, "data": [{"name": "alpaca", "source": str(data_file), "format": "alpaca"}],
                    "stages": [stage], "storage": {"uri": str(work / name / "saves")}, "checkpoint": {"everySteps": 100000}}}
    shutil.rmtree(work / name, ignore_errors=True)  # a committed output from an earlier run would be skipped
    os.environ["KUBETUNE_WORK_DIR"] = str(work / name / "work")
    resolved = plan(parse_job(doc))[0]
    timer = make_timer(warmup)
    _cuda_reset()
    with stage_callback(timer):
        execute_stage(resolved)
    return {**timer.result(), "peak_gib": _peak_gib()}


@contextlib.contextmanager
def stage_callback(callback):
    """Hand `callback` to the stage's trainer: wrap the runner `execute_stage` looks up, so the
    bench does not depend on execute_stage's signature."""
    import kubetune.runtime.stages as stages

    real = stages.stage_runner

    def stage_runner(*args, **kwargs):
        run = real(*args, **kwargs)

        def wrapped(ctx):
            ctx.callbacks.append(callback)
            return run(ctx)

        return wrapped

    stages.stage_runner = stage_runner
    try:
        yield
    finally:
        stages.stage_runner = real


def run_trl(work: Path, model_dir: Path, records: list[dict], *, method: str, steps: int, ga: int, seq: int,
            warmup: int, name: str) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from kubetune.runtime.data.formats import to_examples
    from kubetune.runtime.spec import DatasetSpec

    tok = AutoTokenizer.from_pretrained(model_dir)
    examples = to_examples(records, DatasetSpec(name="alpaca", source="x.json", format="alpaca"), "conversation")
    ds = Dataset.from_list([{"messages": e["messages"]} for e in examples])
    _cuda_reset()
    model = random_model(model_dir)
    timer = make_timer(warmup)
    import torch

    args = SFTConfig(output_dir=str(work / name), max_steps=steps, per_device_train_batch_size=1,
                     gradient_accumulation_steps=ga, packing=True, max_length=seq,
                     learning_rate=1e-4 if method == "lora" else 1e-5,
                     bf16=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available(),
                     logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
                     include_num_input_tokens_seen="non_padding")
    peft_config = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM") if method == "lora" else None
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft_config,
                         callbacks=[timer])
    trainer.train()
    out = {**timer.result(), "peak_gib": _peak_gib()}
    del trainer, model
    return out


# ---------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shape, few steps (CPU check of the whole script)")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds; optional cases start only if time is left")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--ga", type=int, default=4)
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "out" / "bench"))
    args = ap.parse_args()
    started = time.time()
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from kubetune.runtime.local import setup_logging

    setup_logging()
    import logging

    logging.getLogger("kubetune").setLevel(logging.WARNING)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("BENCH_WORK", "/tmp/kubetune-bench"))
    work.mkdir(parents=True, exist_ok=True)
    install_random_init()

    seq = 256 if args.smoke else 4096
    steps, warmup, ga = (4, 1, 2) if args.smoke else (args.steps, args.warmup, args.ga)
    big = "smoke" if args.smoke else "llama3-8b"
    small = "smoke" if args.smoke else "llama3.2-1b"
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    import importlib.metadata as md

    versions = {p: md.version(p) for p in ("torch", "transformers", "trl", "peft", "accelerate", "datasets")}
    try:
        versions["liger-kernel"] = md.version("liger-kernel")
    except md.PackageNotFoundError:
        versions["liger-kernel"] = None
    log("device", device, versions)

    # enough packed rows for every step of the biggest case, plus spare
    need_tokens = (steps + 2) * ga * seq * 1.3
    mean_words = 40 if args.smoke else 350
    records = make_records(max(64, int(need_tokens / (mean_words * 2.6))), mean_words)
    data_file = work / "alpaca.json"
    data_file.write_text(json.dumps(records))
    dirs = {s: build_model_dir(work / f"model-{s}", s, records) for s in {big, small}}
    log(f"data: {len(records)} records; setup {time.time() - started:.0f}s")

    results: dict[str, dict] = {}

    def case(key, fn, optional=False):
        elapsed = time.time() - started
        if optional and elapsed > args.budget * 0.62:
            log(f"skip {key}: {elapsed:.0f}s of {args.budget:.0f}s used")
            results[key] = {"skipped": f"time ({elapsed:.0f}s used)"}
            return
        log(f"case {key} ...")
        t = time.time()
        try:
            results[key] = fn()
        except Exception as err:  # one failing case must not lose the others
            traceback.print_exc()
            results[key] = {"error": f"{type(err).__name__}: {str(err)[:400]}", "peak_gib": _peak_gib()}
        results[key]["wall_s"] = round(time.time() - t, 1)
        _cuda_reset()
        log(f"case {key}: {json.dumps(results[key])}")
        (out_dir / "gpu.json").write_text(json.dumps(_report(), indent=1))

    def _report():
        return {"device": device, "versions": versions, "date": time.strftime("%Y-%m-%d"), "seq": seq, "ga": ga,
                "steps": steps, "warmup": warmup, "shape_lora": big, "shape_full": small, "results": results,
                "flops_per_token": {"lora": flops_per_token(big, seq, "lora"), "full": flops_per_token(small, seq, "full")}}

    common = dict(steps=steps, ga=ga, seq=seq, warmup=warmup)
    case("ours_lora", lambda: run_ours(work, dirs[big], data_file, method="lora", name="ours-lora", **common))
    case("trl_lora", lambda: run_trl(work, dirs[big], records, method="lora", name="trl-lora", **common))
    err = results.get("ours_lora", {}).get("error", "")
    if err and "out of memory" in err.lower():  # the activation estimate was wrong: recompute instead
        case("ours_lora_retry", lambda: run_ours(work, dirs[big], data_file, method="lora", name="ours-lora-retry",
                                                 extra_hp={"gradientCheckpointing": True}, **common))
    full_common = dict(common, steps=max(warmup + 2, steps // 2))
    case("ours_full_1b", lambda: run_ours(work, dirs[small], data_file, method="full", name="ours-full", **full_common),
         optional=True)
    case("trl_full_1b", lambda: run_trl(work, dirs[small], records, method="full", name="trl-full", **full_common),
         optional=True)
    case("ours_lora_ckpt", lambda: run_ours(work, dirs[big], data_file, method="lora", name="ours-lora-ckpt",
                                            extra_hp={"gradientCheckpointing": True}, **dict(common, steps=warmup + 5)),
         optional=True)

    report = _report()
    (out_dir / "gpu.json").write_text(json.dumps(report, indent=1))
    print_table(report)
    log(f"total {time.time() - started:.0f}s")
    return 0


def print_table(report: dict) -> None:
    res = report["results"]
    print()
    print(f"device: {report['device']}   seq {report['seq']}, micro-batch 1 packed row, GA {report['ga']}, "
          f"{report['steps']} steps ({report['warmup']} warm-up)")
    hdr = f"{'case':<20}{'tokens/s':>10}{'MFU ours':>10}{'MFU NeMo':>10}{'peak GiB':>10}{'ckpt':>6}{'liger':>7}  loss"
    print(hdr)
    print("-" * len(hdr))
    for key, r in res.items():
        if "tokens_per_s" not in r:
            print(f"{key:<20}  {r.get('error') or r.get('skipped')}")
            continue
        kind = "full" if "full" in key else "lora"
        f = report["flops_per_token"][kind]
        tps = r["tokens_per_s"]
        mfu = tps * f["ours"] / 1e12 / PEAK_TFLOPS * 100
        mfu_n = tps * f["nemo"] / 1e12 / PEAK_TFLOPS * 100
        peak = (r.get("peak_gib") or {}).get("allocated")
        loss = f"{r['first_loss']:.3f}→{r['last_loss']:.3f}" if r.get("first_loss") is not None else ""
        print(f"{key:<20}{tps:>10.0f}{mfu:>9.1f}%{mfu_n:>9.1f}%{(peak or 0):>10.1f}{str(r['gradient_checkpointing'])[0]:>6}"
              f"{str(r['liger'])[0]:>7}  {loss}")
    for a, b in (("ours_lora", "trl_lora"), ("ours_full_1b", "trl_full_1b")):
        if "tokens_per_s" in res.get(a, {}) and "tokens_per_s" in res.get(b, {}):
            print(f"ratio {a}/{b}: {res[a]['tokens_per_s'] / res[b]['tokens_per_s']:.2f}x")
    print("NeMo AutoModel anchor (Llama-3-8B LoRA, 1×H100, seq 4096): 12,473 tokens/s, 402 TFLOP/s (~41% MFU)")


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""GPU training throughput: kubetune's SFT stage with its defaults vs plain TRL, by the rules of issue 18.

Rules (docs/BENCHMARKS.md, "Rules for every GPU figure"):
  * prints the git commit and refuses to run on a tree with uncommitted changes under runtime/ or
    bench/ (bench/results/ excepted) unless `--exploratory`; such results say `"exploratory": true`
    and never go into the tables. Without a .git (a copied tree) the commit comes from
    `.bench/provenance.json`, written here by `--write-provenance`, and every file under runtime/
    and bench/ must hash to that commit's git blobs.
  * every case runs its arms interleaved (ours, base, ours, base, ...) `--repeats` times (≥ 3) in
    this one call; the table shows the median and the spread (min–max) of tokens/s.
  * raw JSON (commit, card, driver, library versions, every repeat) goes to --out (default
    bench/results/): `gpu-<card>-<commit12>.json` (exploratory: `gpu-exploratory-…`).
  * a time budget per case and for the whole call (`--budget`, default 330 s: under 6 minutes);
    a case whose arms cannot all finish their repeats in its budget says so (`"complete": false`).
  * each model shape is built once (random init from its config, on the device); between runs the
    adapters are removed, gradient checkpointing switched off and, after a full fine-tune, the
    initial weights restored.
  * `--smoke` runs the whole script on CPU with a tiny shape in seconds (tests/unit/test_bench_gpu.py
    runs it), so a changed signature fails the fast tier, not a GPU call.

Cases (each "ours" is a FineTuneJob → plan → execute_stage, our SFT stage with its defaults):
  lora8b    Llama-3-8B shape, LoRA r16 α32 on every *_proj, rows of 4096 packed tokens, micro-batch 1:
            ours | TRL SFTTrainer with ours' gradient-checkpointing setting (so the gain is not
            only that flag) | TRL SFTTrainer defaults (gradient checkpointing on)
  full1b    Llama-3.2-1B shape, full fine-tuning: ours | TRL defaults
  qlora8b   Llama-3-8B shape, QLoRA nf4 (bitsandbytes), ours: peak memory and throughput (the
            random weights are saved once so the stage quantises them as it loads any model)
  compile   (--compile) lora8b: ours with each decoder layer compiled (regional torch.compile) |
            ours; the compile time is the first step's excess over a timed step, reported apart
  --profile one more run of ours (lora8b) under torch.profiler: the top kernels' table is printed
            and written beside the JSON

MFU by NeMo's count (what reproduces NeMo AutoModel's published LoRA row: 402 TFLOP/s at 12,473
tokens/s = 32.2 GFLOP/token for Llama-3-8B at seq 4096): per token, LoRA
2/3·L·d²·(12 + 12·g/a + 18·f/d + 12·s/d), full fine-tuning L·d²·(12 + 12·g/a + 18·f/d + 12·s/d)
+ 6·V·d (L layers, d hidden, g kv heads, a heads, f FFN width, s sequence, V vocabulary), against
989 TFLOP/s (H100/H200 SXM dense bf16). "Our count" (forward 2·N + input-gradients 2·N of the
frozen matmuls, 6·N_lora, causal attention 6·L·s·d) is printed beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROVENANCE = ROOT / ".bench" / "provenance.json"
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16, SXM; what NeMo's MFU uses
NEMO_ANCHOR = "NeMo AutoModel (Llama-3-8B LoRA, 1×H100, seq 4096): 12,473 tokens/s, 402 TFLOP/s (40.6% MFU)"

SHAPES = {
    "llama3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False),
    "llama3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                        intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
    "smoke": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=1024, tie_word_embeddings=False),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


# ---------------------------------------------------------------- provenance (rule 1)

WATCHED = ("runtime", "bench")
EXCEPT = ("bench/results/",)


def _git(*args) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def _blob_sha(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _watched_files() -> list[str]:
    out = []
    for top in WATCHED:
        for p in sorted((ROOT / top).rglob("*")):
            rel = p.relative_to(ROOT).as_posix()
            if p.is_file() and "__pycache__" not in rel and not rel.endswith(".pyc") and not rel.startswith(EXCEPT):
                out.append(rel)
    return out


def provenance() -> dict:
    """{commit, clean, how, changed}: from git where the tree has a .git, else from the manifest
    `--write-provenance` left (every watched file must hash to that commit's blob)."""
    try:
        commit = _git("rev-parse", "HEAD").strip()
        status = _git("status", "--porcelain", "--untracked-files=all", "--", *WATCHED)
        changed = [line[3:] for line in status.splitlines() if not line[3:].startswith(EXCEPT)]
        return {"commit": commit, "clean": not changed, "how": "git", "changed": changed}
    except (OSError, subprocess.CalledProcessError):
        pass
    if not PROVENANCE.exists():
        return {"commit": None, "clean": False, "how": "none (no .git, no .bench/provenance.json)", "changed": []}
    manifest = json.loads(PROVENANCE.read_text())
    blobs = manifest["blobs"]
    present = set(_watched_files())
    changed = sorted(p for p in present | set(blobs) if p not in present or blobs.get(p) != _blob_sha(ROOT / p))
    return {"commit": manifest["commit"], "clean": not changed, "how": "manifest", "changed": changed}


def write_provenance() -> int:
    """Here, before a device call: the commit and its blobs of runtime/ and bench/ (clean tree only)."""
    prov = provenance()
    if not prov["clean"]:
        print(f"refusing: uncommitted changes under runtime/ or bench/: {prov['changed'][:10]}", file=sys.stderr)
        return 2
    blobs = {}
    for line in _git("ls-files", "-s", "--", *WATCHED).splitlines():
        meta, path = line.split("\t", 1)
        if not path.startswith(EXCEPT):
            blobs[path] = meta.split()[1]
    PROVENANCE.parent.mkdir(exist_ok=True)
    PROVENANCE.write_text(json.dumps({"commit": prov["commit"], "blobs": blobs}, indent=0))
    print(f"{PROVENANCE.relative_to(ROOT)}: commit {prov['commit']}, {len(blobs)} files")
    return 0


# ---------------------------------------------------------------- data, tokenizer, model folders


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
    the from_pretrained hook hands out the shape's one random-init model."""
    from transformers import LlamaConfig

    from kubetune.runtime.tiny import train_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    texts = [r["instruction"] + " " + r["output"] for r in records[:400]]
    tok = train_tokenizer(texts, vocab_size=min(2000, SHAPES[shape]["vocab_size"] // 2))
    tok.save_pretrained(folder)
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, rope_theta=500000.0,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    cfg.save_pretrained(folder)
    return folder


class Models:
    """One random-init model per shape folder, built on the device once and reset between runs."""

    def __init__(self, device: str, dtype):
        self.device, self.dtype = device, dtype
        self.models: dict[str, object] = {}
        self.initial: dict[str, dict] = {}  # CPU copy of the weights, for shapes a full fine-tune changes
        self.build_s: dict[str, float] = {}

    def get(self, path: Path, attn_implementation: str | None = None):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        key = str(path)
        model = self.models.get(key)
        if model is None:
            t = time.time()
            torch.manual_seed(0)
            with torch.device(self.device):
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=self.dtype,
                                                         attn_implementation="sdpa")
            self.models[key] = model
            self.build_s[key] = round(time.time() - t, 1)
            log(f"built {path.name} on {self.device} in {self.build_s[key]}s")
        self.reset(key)
        model.set_attn_implementation(attn_implementation or "sdpa")
        return model

    def drop(self):
        """Free the unquantised models (before the QLoRA case, so its peak memory is its own)."""
        import torch

        self.models.clear()
        self.initial.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def keep_initial(self, path: Path):
        key = str(path)
        if key not in self.initial:
            self.initial[key] = {k: v.detach().to("cpu", copy=True) for k, v in self.get(path).state_dict().items()}

    def reset(self, key: str):
        """Undo what a run did to the shared model: adapters, frozen flags, checkpointing hooks, weights."""
        import torch
        from peft.tuners.tuners_utils import BaseTunerLayer

        model = self.models[key]
        quantized = bool(getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None))
        for name, module in list(model.named_modules()):
            if isinstance(module, BaseTunerLayer) and name:
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
        for attr in ("peft_config", "_hf_peft_config_loaded"):
            if attr in model.__dict__:
                delattr(model, attr)
        if getattr(model, "is_gradient_checkpointing", False):
            model.gradient_checkpointing_disable()
        if hasattr(model, "_require_grads_hook"):
            model.disable_input_require_grads()
        if key in self.initial:
            with torch.no_grad():
                model.load_state_dict(self.initial[key])
        for p in model.parameters():
            if not quantized:  # a quantised base stays frozen (peft's k-bit preparation freezes it again anyway)
                p.requires_grad_(True)
            p.grad = None
        model.train()


def install_model_hook(models: Models):
    """Our stage loads with `AutoModelForCausalLM.from_pretrained(path, dtype=, attn_implementation=, ...)`:
    for the weight-less shape folders, hand out the shape's model with the attention asked for."""
    import transformers

    original = transformers.AutoModelForCausalLM.from_pretrained

    def from_pretrained(path, *args, **kwargs):
        p = Path(str(path))
        if p.is_dir() and not any(p.glob("*.safetensors")) and not (p / "adapter_config.json").exists():
            return models.get(p, kwargs.get("attn_implementation"))
        if kwargs.get("quantization_config") is not None:  # QLoRA: quantised once, reset between runs
            if str(p) not in models.models:
                t = time.time()
                models.models[str(p)] = original(path, *args, **kwargs)
                models.build_s[str(p)] = round(time.time() - t, 1)
                log(f"loaded and quantised {p.name} in {models.build_s[str(p)]}s")
            return models.get(p, kwargs.get("attn_implementation"))
        return original(path, *args, **kwargs)

    transformers.AutoModelForCausalLM.from_pretrained = staticmethod(from_pretrained)


# ---------------------------------------------------------------- timing


def make_timer(warmup: int, compile_layers: bool = False):
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.marks: list[tuple[int, float, int]] = []
            self.losses: list[float] = []
            self.start = None
            self.compile_s = None

        def on_train_begin(self, args, state, control, model=None, **kw):
            self.gc = bool(args.gradient_checkpointing)
            self.optim = str(args.optim)
            self.attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
            if compile_layers and model is not None:
                t = time.perf_counter()
                compile_regions(model)
                self.compile_s = time.perf_counter() - t  # wrapping only; the compile happens in step 1
            from kubetune.runtime.attention import calls

            self.calls0 = dict(calls)
            self.start = time.perf_counter()

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
            s0, t0, n0 = self.marks[warmup - 1] if warmup > 0 else (0, self.start, 0)
            s1, t1, n1 = self.marks[-1]
            step_s = (t1 - t0) / (s1 - s0)
            first = self.marks[0][1] - self.start
            return {"timed_steps": s1 - s0, "seconds": t1 - t0, "tokens": n1 - n0, "tokens_per_s": (n1 - n0) / (t1 - t0),
                    "first_step_s": first, "step_s": step_s, "first_step_excess_s": first - step_s,
                    "gradient_checkpointing": self.gc, "optim": self.optim, "attention": self.attn,
                    "attention_calls": self._calls(),
                    "first_loss": self.losses[0] if self.losses else None,
                    "last_loss": self.losses[-1] if self.losses else None}

        def _calls(self):  # which path kubetune_varlen's calls took in this run (varlen, reference, sdpa)
            from kubetune.runtime.attention import calls

            return {k: v - self.calls0.get(k, 0) for k, v in calls.items() if v - self.calls0.get(k, 0)}

    return StepTimer()


def compile_regions(model, backend: str | None = None) -> int:
    """Regional torch.compile: each decoder layer compiled in place (one graph, reused by all layers)."""
    import torch

    backend = backend or os.environ.get("BENCH_COMPILE_BACKEND", "inductor")
    best = None
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and (best is None or len(module) > len(best)):
            best = module
    for layer in best or []:
        layer.compile(backend=backend, dynamic=True)
    return len(best or [])


def flops_per_token(shape: str, seq: int, method: str, lora_rank: int = 16) -> dict:
    c = SHAPES[shape]
    d, L, f, V = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], c["vocab_size"]
    a, g = c["num_attention_heads"], c["num_key_value_heads"]
    kv = g * d // a
    n_lin = L * (d * d + 2 * d * kv + d * d + 3 * d * f) + V * d  # the LM head is a matmul; the embedding is not
    lora_layer = lora_rank * ((d + d) * 2 + (d + kv) * 2 + (d + f) * 3)
    attn = 6 * L * seq * d  # causal: forward 2·L·s·d, backward twice that
    core = L * d * d * (12 + 12 * g / a + 18 * f / d + 12 * seq / d)
    if method in ("lora", "qlora"):
        return {"ours": 4 * n_lin + 6 * L * lora_layer + attn, "nemo": 2 / 3 * core, "n_linear_params": n_lin}
    return {"ours": 6 * n_lin + attn, "nemo": core + 6 * V * d, "n_linear_params": n_lin}


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


# ---------------------------------------------------------------- the runners


@contextlib.contextmanager
def stage_callbacks(*callbacks):
    """Hand callbacks to the stage's trainer by wrapping the runner execute_stage looks up (the
    bench does not depend on execute_stage's signature)."""
    import kubetune.runtime.stages as stages

    real = stages.stage_runner

    def stage_runner(*args, **kwargs):
        run = real(*args, **kwargs)

        def wrapped(ctx):
            ctx.callbacks.extend(callbacks)
            return run(ctx)

        return wrapped

    stages.stage_runner = stage_runner
    try:
        yield
    finally:
        stages.stage_runner = real


def run_ours(env: dict, shape_dir: Path, *, method: str, name: str, extra_hp: dict | None = None,
             compile_layers: bool = False, callbacks=()) -> dict:
    from kubetune.runtime.local import execute_stage
    from kubetune.runtime.api.plan import plan
    from kubetune.runtime.api.spec import parse_job

    work, steps, ga, seq = env["work"], env["steps"], env["ga"], env["seq"]
    stage = {"name": "sft", "type": "sft", "method": method,
             "hyperparameters": {"maxSteps": steps, "batchSize": 1, "gradientAccumulation": ga, "cutoffLen": seq,
                                 "packing": True, "loggingSteps": 1,
                                 "learningRate": 1e-5 if method == "full" else 1e-4, **(extra_hp or {})}}
    if method in ("lora", "qlora"):
        stage["lora"] = {"rank": 16, "alpha": 32, "target": TARGETS}
    if method == "qlora":
        stage["quantization"] = {"bits": 4}
    doc = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name},
           "spec": {"model": {"name": str(shape_dir)},
                    "data": [{"name": "alpaca", "source": str(env["data_file"]), "format": "alpaca"}],
                    "stages": [stage], "storage": {"uri": str(work / name / "saves")},
                    "checkpoint": {"everySteps": 100000}}}
    shutil.rmtree(work / name, ignore_errors=True)  # a committed output from an earlier run would be skipped
    os.environ["KUBETUNE_WORK_DIR"] = str(work / name / "work")
    resolved = plan(parse_job(doc))[0]
    timer = make_timer(env["warmup"], compile_layers)
    _cuda_reset()
    with stage_callbacks(timer, *callbacks):
        execute_stage(resolved)
    shutil.rmtree(work / name, ignore_errors=True)
    return {**timer.result(), "peak_gib": _peak_gib()}


def run_trl(env: dict, shape_dir: Path, *, method: str, name: str, gradient_checkpointing: bool | None = None) -> dict:
    import torch
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    tok, ds = env["trl_data"](shape_dir)
    _cuda_reset()
    model = env["models"].get(shape_dir, "sdpa")
    timer = make_timer(env["warmup"])
    cuda = torch.cuda.is_available()
    extra = {} if gradient_checkpointing is None else {"gradient_checkpointing": gradient_checkpointing}
    args = SFTConfig(output_dir=str(env["work"] / name), max_steps=env["steps"], per_device_train_batch_size=1,
                     gradient_accumulation_steps=env["ga"], packing=True, max_length=env["seq"],
                     learning_rate=1e-5 if method == "full" else 1e-4, bf16=cuda, use_cpu=not cuda,
                     logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
                     include_num_input_tokens_seen="non_padding", **extra)
    peft_config = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM") if method == "lora" else None
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft_config,
                         callbacks=[timer])
    trainer.train()
    out = {**timer.result(), "peak_gib": _peak_gib()}
    del trainer
    shutil.rmtree(env["work"] / name, ignore_errors=True)
    return out


def profile_callback(warmup: int, steps: int, out: list):
    """A torch.profiler over `steps` optimizer steps after the warm-up; its top-kernel table lands in `out`."""
    import torch
    from transformers import TrainerCallback

    class Profile(TrainerCallback):
        prof = None

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == warmup and self.prof is None:
                acts = [torch.profiler.ProfilerActivity.CPU]
                if torch.cuda.is_available():
                    acts.append(torch.profiler.ProfilerActivity.CUDA)
                self.prof = torch.profiler.profile(activities=acts)
                self.prof.__enter__()

        def on_step_end(self, args, state, control, **kw):
            if self.prof is not None and state.global_step == warmup + steps:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.prof.__exit__(None, None, None)
                key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
                out.append(self.prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=70))
                self.prof = None

    return Profile()


# ---------------------------------------------------------------- cases


def case_plan(args) -> list[dict]:
    """The cases in priority order, each: arms (interleaved) and a share of the whole budget."""
    big = "smoke" if args.smoke else "llama3-8b"
    small = "smoke" if args.smoke else "llama3.2-1b"
    cases = [
        {"key": "lora8b", "shape": big, "method": "lora", "share": 0.5,
         "arms": ["ours", "trl_same_ckpt", "trl_defaults"]},
        {"key": "full1b", "shape": small, "method": "full", "share": 0.2, "arms": ["ours", "trl_defaults"]},
    ]
    if args.compile:
        cases.append({"key": "compile", "shape": big, "method": "lora", "share": 0.2,
                      "arms": ["ours_compiled", "ours"]})
    # last: the unquantised models are freed before it, so its peak memory is its own
    cases.append({"key": "qlora8b", "shape": big, "method": "qlora", "share": 0.2, "arms": ["ours"]})
    if args.cases:
        wanted = args.cases.split(",")
        cases = [c for c in cases if c["key"] in wanted]
    return cases


def run_arm(env: dict, case: dict, arm: str, rep: int) -> dict:
    shape_dir = env["dirs"][case["shape"]]
    method, name = case["method"], f"{case['key']}-{arm}-{rep}".replace("_", "-")
    if method == "qlora":
        return run_ours(env, env["qlora_dir"](case["shape"]), method="qlora", name=name)
    if arm == "ours":
        return run_ours(env, shape_dir, method=method, name=name)
    if arm == "ours_compiled":
        return run_ours(env, shape_dir, method=method, name=name, compile_layers=True)
    if arm == "trl_same_ckpt":
        return run_trl(env, shape_dir, method=method, name=name, gradient_checkpointing=env["ours_ckpt"][case["key"]])
    if arm == "trl_defaults":
        return run_trl(env, shape_dir, method=method, name=name)
    raise ValueError(arm)


def summarize(runs: list[dict]) -> dict:
    tps = [r["tokens_per_s"] for r in runs if "tokens_per_s" in r]
    if not tps:
        return {"n": 0}
    peaks = [(r.get("peak_gib") or {}).get("allocated") for r in runs]
    return {"n": len(tps), "median": statistics.median(tps), "min": min(tps), "max": max(tps),
            "spread_pct": (max(tps) - min(tps)) / statistics.median(tps) * 100,
            "peak_gib": max((p for p in peaks if p is not None), default=None),
            "first_step_excess_s": statistics.median(r["first_step_excess_s"] for r in runs if "tokens_per_s" in r),
            "gradient_checkpointing": runs[0].get("gradient_checkpointing"), "attention": runs[0].get("attention"),
            "attention_calls": runs[0].get("attention_calls")}


def run_case(env: dict, case: dict, repeats: int, deadline: float) -> dict:
    budget = min(env["budget"] * case["share"], deadline - time.time())
    started = time.time()
    result = {"arms": {arm: [] for arm in case["arms"]}, "budget_s": round(budget, 1), "complete": False}
    last: dict[str, float] = {}  # the arm's previous run, wall seconds: a run that would not fit is not started
    for rep in range(repeats):
        for arm in case["arms"]:
            elapsed = time.time() - started
            if elapsed + last.get(arm, 0.0) > budget or time.time() + last.get(arm, 0.0) > deadline:
                result["stopped"] = (f"budget: {elapsed:.0f}s of {budget:.0f}s used, the next run ({arm}, repeat "
                                     f"{rep + 1}) takes ~{last.get(arm, 0.0):.0f}s")
                log(f"{case['key']}: {result['stopped']}")
                return _finish_case(result, started)
            log(f"{case['key']} {arm} #{rep + 1}")
            t = time.time()
            try:
                r = run_arm(env, case, arm, rep)
            except Exception as err:  # one failing arm must not lose the others
                traceback.print_exc()
                r = {"error": f"{type(err).__name__}: {str(err)[:400]}", "peak_gib": _peak_gib()}
            r["wall_s"] = last[arm] = round(time.time() - t, 1)
            r["started"] = round(t, 3)
            if arm == "ours" and "gradient_checkpointing" in r:
                env["ours_ckpt"].setdefault(case["key"], r["gradient_checkpointing"])
            result["arms"][arm].append(r)
            log(f"{case['key']} {arm} #{rep + 1}: " + json.dumps({k: v for k, v in r.items() if k != "peak_gib"}))
            _cuda_reset()
    result["complete"] = all(len([r for r in runs if "tokens_per_s" in r]) >= repeats
                             for runs in result["arms"].values())
    return _finish_case(result, started)


def _finish_case(result: dict, started: float) -> dict:
    result["wall_s"] = round(time.time() - started, 1)
    result["summary"] = {arm: summarize(runs) for arm, runs in result["arms"].items()}
    return result


# ---------------------------------------------------------------- main


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for p in ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "liger-kernel"):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            out[p] = None
    return out


def card() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"name": "cpu", "driver": None, "cuda": None, "capability": None, "memory_gib": None}
    props = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        driver = None
    return {"name": props.name, "driver": driver, "cuda": torch.version.cuda,
            "capability": list(torch.cuda.get_device_capability(0)), "memory_gib": round(props.total_memory / 2**30, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shape, few steps: the whole script on CPU in seconds")
    ap.add_argument("--exploratory", action="store_true", help="run on a tree with uncommitted changes (results marked)")
    ap.add_argument("--write-provenance", action="store_true", help="write .bench/provenance.json for a copied tree")
    ap.add_argument("--budget", type=float, default=330.0, help="seconds for the whole call (cases get shares)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per run (warm-up included)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--ga", type=int, default=2, help="gradient accumulation (micro-batch is one packed row)")
    ap.add_argument("--cases", help="comma list of lora8b,full1b,qlora8b,compile (default: all but compile)")
    ap.add_argument("--compile", action="store_true", help="add the regional torch.compile case")
    ap.add_argument("--profile", action="store_true", help="one profiled run of ours (lora8b): top kernels")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    if args.write_provenance:
        return write_provenance()
    started = time.time()
    prov = provenance()
    print(f"commit {prov['commit']} ({prov['how']}; {'clean' if prov['clean'] else 'CHANGED: ' + ', '.join(prov['changed'][:8])})",
          flush=True)
    exploratory = bool(args.exploratory or args.smoke)
    if not prov["clean"] and not exploratory:
        print("refusing: uncommitted changes under runtime/ or bench/ (commit them, or --exploratory: results "
              "are then marked exploratory and never go into the tables)", file=sys.stderr)
        return 2
    if args.repeats < 3 and not args.smoke:  # the smoke may run fewer: it checks the code, it measures nothing
        print("refusing: --repeats below 3", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    import torch

    from kubetune.runtime.local import setup_logging

    setup_logging()
    logging.getLogger("kubetune").setLevel(logging.WARNING)
    logging.getLogger("kubetune.runtime.attention").setLevel(logging.INFO)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("BENCH_WORK", "/tmp/kubetune-bench"))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    if args.smoke:  # every case and arm, as small as they go (the machine may be a loaded 2-core VM)
        seq, steps, warmup, ga, repeats = 128, 2, 1, 1, args.repeats
        os.environ.setdefault("BENCH_COMPILE_BACKEND", "aot_eager")  # the code path, not inductor's C++ build
    else:
        seq, steps, warmup, ga, repeats = 4096, args.steps, args.warmup, args.ga, args.repeats
    models = Models("cuda" if cuda else "cpu", torch.bfloat16 if cuda else torch.float32)
    install_model_hook(models)
    dev, vers = card(), versions()
    log("card", dev, "versions", vers)

    need_tokens = (steps + 2) * ga * seq * 1.3  # enough packed rows for every step, plus spare
    mean_words = 20 if args.smoke else 350
    records = make_records(max(32, int(need_tokens / (mean_words * 2.6))), mean_words)
    data_file = work / "alpaca.json"
    data_file.write_text(json.dumps(records))
    cases = case_plan(args)
    dirs = {s: build_model_dir(work / f"model-{s}", s, records) for s in {c["shape"] for c in cases}}
    trl_cache: dict = {}
    qlora_dirs: dict = {}

    def trl_data(shape_dir):
        if shape_dir not in trl_cache:
            from datasets import Dataset
            from transformers import AutoTokenizer

            from kubetune.runtime.data.formats import to_examples
            from kubetune.runtime.api.spec import DatasetSpec

            examples = to_examples(records, DatasetSpec(name="alpaca", source="x.json", format="alpaca"), "conversation")
            trl_cache[shape_dir] = (AutoTokenizer.from_pretrained(shape_dir),
                                    Dataset.from_list([{"messages": e["messages"]} for e in examples]))
        return trl_cache[shape_dir]

    def qlora_dir(shape):
        """The shape's random weights saved once, so the stage loads and quantises them like any model."""
        if shape not in qlora_dirs:
            t = time.time()
            folder = work / f"model-{shape}-weights"
            shutil.copytree(dirs[shape], folder, dirs_exist_ok=True)
            models.get(dirs[shape]).save_pretrained(folder)
            qlora_dirs[shape] = folder
            log(f"saved {shape} weights for qlora in {time.time() - t:.0f}s")
        return qlora_dirs[shape]

    env = {"work": work, "steps": steps, "ga": ga, "seq": seq, "warmup": warmup, "data_file": data_file,
           "dirs": dirs, "models": models, "trl_data": trl_data, "qlora_dir": qlora_dir, "ours_ckpt": {},
           "budget": args.budget}
    for c in cases:
        if c["method"] == "full":
            models.keep_initial(dirs[c["shape"]])
    log(f"data: {len(records)} records; setup {time.time() - started:.0f}s")
    deadline = started + args.budget
    report = {"commit": prov["commit"], "provenance": prov, "exploratory": exploratory, "smoke": args.smoke,
              "card": dev, "versions": vers, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "argv": sys.argv[1:] if argv is None else argv, "seq": seq, "ga": ga, "steps": steps, "warmup": warmup,
              "repeats": repeats, "budget_s": args.budget, "cases": {}, "flops_per_token": {}}
    name = f"gpu-{'exploratory-' if exploratory and not args.smoke else ''}{'smoke' if args.smoke else _slug(dev['name'])}" \
           f"-{(prov['commit'] or 'nocommit')[:12]}"
    out_file = out_dir / f"{name}.json"
    def run_one(c):
        report["flops_per_token"][c["key"]] = flops_per_token(c["shape"], seq, c["method"])
        report["cases"][c["key"]] = {"shape": c["shape"], "method": c["method"],
                                     **run_case(env, c, repeats, deadline)}
        out_file.write_text(json.dumps(report, indent=1))

    for c in cases:
        if c["method"] != "qlora":
            run_one(c)
    if args.profile:
        profile(args, env, cases, dirs, records, report, out_dir, name, deadline)
    for c in cases:
        if c["method"] == "qlora":
            if time.time() < deadline:
                qlora_dir(c["shape"])
            models.drop()
            run_one(c)
    report["wall_s"] = round(time.time() - started, 1)
    out_file.write_text(json.dumps(report, indent=1))
    print_table(report)
    log(f"total {report['wall_s']:.0f}s of a {args.budget:.0f}s budget; raw: {out_file}")
    return 0


def profile(args, env, cases, dirs, records, report, out_dir, name, deadline):
    """One run of ours (the LoRA shape) under torch.profiler; the top-kernel table is printed and saved."""
    work, warmup, steps = env["work"], env["warmup"], env["steps"]
    if time.time() > deadline:
        report["profile"] = "skipped: the call's budget is spent (run `--cases lora8b --profile`)"
        print(report["profile"])
    else:
        tables: list[str] = []
        c = {"key": "profile", "shape": cases[0]["shape"] if cases else ("smoke" if args.smoke else "llama3-8b")}
        shape_dir = dirs.get(c["shape"]) or build_model_dir(work / f"model-{c['shape']}", c["shape"], records)
        try:
            run_ours(env, shape_dir, method="lora", name="profile",
                     callbacks=[profile_callback(warmup, min(2, steps - warmup), tables)])
        except Exception as err:  # noqa: BLE001 - the table is extra; the cases are already written
            traceback.print_exc()
            tables.append(f"profile failed: {type(err).__name__}: {err}")
        report["profile"] = tables[0] if tables else "no table (too few steps)"
        (out_dir / f"{name}-profile.txt").write_text(report["profile"])
        print(report["profile"])


def _slug(s: str) -> str:
    return "".join(ch.lower() if ch.isalnum() else "-" for ch in s).strip("-")[:40]


def print_table(report: dict) -> None:
    dev = report["card"]
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in (dev["name"] or "")), None)
    print()
    print(f"commit {report['commit']}{'  EXPLORATORY (not for the tables)' if report['exploratory'] else ''}")
    print(f"card {dev['name']} driver {dev['driver']}; seq {report['seq']}, micro-batch 1 packed row, GA {report['ga']}, "
          f"{report['steps']} steps ({report['warmup']} warm-up), {report['repeats']} repeats interleaved")
    hdr = (f"{'case':<9}{'arm':<15}{'n':>3}{'tokens/s median':>17}{'spread':>16}{'MFU NeMo':>10}{'MFU ours':>10}"
           f"{'peak GiB':>10}{'ckpt':>6}  attention / first-step excess")
    print(hdr)
    print("-" * len(hdr))
    for key, case in report["cases"].items():
        f = report["flops_per_token"][key]
        for arm, s in case["summary"].items():
            if not s.get("n"):
                errs = [r.get("error") for r in case["arms"][arm] if r.get("error")]
                print(f"{key:<9}{arm:<15}  -  {errs[0] if errs else case.get('stopped', 'not run')}")
                continue
            mfu_n = f"{s['median'] * f['nemo'] / 1e12 / peak * 100:.1f}%" if peak else "-"
            mfu_o = f"{s['median'] * f['ours'] / 1e12 / peak * 100:.1f}%" if peak else "-"
            print(f"{key:<9}{arm:<15}{s['n']:>3}{s['median']:>17.0f}{s['min']:>8.0f}–{s['max']:<7.0f}{mfu_n:>10}{mfu_o:>10}"
                  f"{(s['peak_gib'] or 0):>10.1f}{str(s['gradient_checkpointing'])[0]:>6}  {s['attention']} "
                  f"{s.get('attention_calls') or ''} / "
                  f"{s['first_step_excess_s']:.1f}s")
        base = case["summary"]
        for b in ("trl_same_ckpt", "trl_defaults", "ours"):
            a = "ours_compiled" if b == "ours" else "ours"
            if base.get(a, {}).get("n") and base.get(b, {}).get("n") and a != b:
                print(f"{'':<9}ratio {a}/{b}: {base[a]['median'] / base[b]['median']:.2f}x (medians)")
        if not case["complete"]:
            print(f"{'':<9}INCOMPLETE: {case.get('stopped', 'an arm failed')}")
    print(NEMO_ANCHOR)


if __name__ == "__main__":
    sys.exit(main())

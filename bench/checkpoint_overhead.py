#!/usr/bin/env python
"""Checkpoint overhead on CPU: training with checkpoints every N steps to a real S3 server vs none
(issue 10, target 4).

The script starts its own S3 server (`python -m moto.server` on 127.0.0.1, a free port), makes a
bucket, builds a small Llama locally (`runtime/tiny.py`: BPE tokenizer trained here, random
init) and a generated alpaca set, then runs the same SFT stage (full fine-tuning, so each
checkpoint carries weights + AdamW state) through `plan` → `execute_stage` with storage on that
server, alternately:

* none: `checkpoint.everySteps` larger than the run (no checkpoint; the output is still
  committed to S3 at the end, as in every run);
* ckpt: a checkpoint every N steps: the trainer writes it, our uploader snapshots it (hard links)
  and uploads + commits it in the background while training goes on.

Reported per mode (median of `--repeat` runs): the training time (`trainer.train()`, saves
included) and the stage's wall time (`execute_stage`, which also waits for the last upload and
commits the output). Overhead = ckpt / none - 1. Goal < 5 %.

Run: `python bench/checkpoint_overhead.py` (defaults: 60 steps, a checkpoint every 20, 2 runs of each mode).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_description  # bench/machine.py (the script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]


def make_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(800)]

    def text(k):
        return " ".join(rng.choice(words) for _ in range(k)).capitalize() + "."

    return [{"instruction": text(rng.randint(5, 20)), "input": "", "output": text(rng.randint(20, 120))} for _ in range(n)]


def run_once(mode: str, i: int, *, model: Path, data: Path, endpoint: str, bucket: str, steps: int, every: int,
             work: Path) -> dict:
    from kubetune.runtime.local import execute_stage
    from kubetune.runtime.api.plan import plan
    from kubetune.runtime.api.spec import parse_job

    name = f"ckpt-bench-{mode}-{i}"
    doc = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name},
           "spec": {"model": {"name": str(model)}, "data": [{"name": "alpaca", "source": str(data)}],
                    "stages": [{"name": "sft", "type": "sft", "method": "full",
                                "hyperparameters": {"maxSteps": steps, "batchSize": 8, "gradientAccumulation": 1,
                                                    "cutoffLen": 256, "learningRate": 1e-4, "loggingSteps": 10}}],
                    "storage": {"uri": f"s3://{bucket}/{name}/", "endpoint": endpoint},
                    "checkpoint": {"everySteps": every if mode == "ckpt" else steps * 100, "keep": 3}}}
    os.environ["KUBETUNE_WORK_DIR"] = str(work)
    stage = plan(parse_job(doc))[0]
    t = time.perf_counter()
    summary = execute_stage(stage)
    wall = time.perf_counter() - t
    return {"train_s": summary["duration_seconds"], "stage_s": wall, "steps": summary["steps"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "out" / "bench" / "checkpoint_overhead.json"))
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the S3 server
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true", "TOKENIZERS_PARALLELISM": "false"})
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    import boto3

    from kubetune.runtime.local import setup_logging
    from kubetune.runtime.tiny import build_tiny_model

    setup_logging(logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="kt-ckpt-bench-"))
    records = make_records(2000)
    data = tmp / "alpaca.json"
    data.write_text(json.dumps(records))
    model = build_tiny_model(tmp / "model", [r["instruction"] + " " + r["output"] for r in records], vocab_size=2000,
                             hidden_size=256, layers=4, heads=4, kv_heads=2, intermediate_size=688)
    import torch

    params = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(model).parameters())
    from tests.storage.support import MotoServer  # the same real S3 server process the tests use

    server = MotoServer(tmp)
    try:
        s3 = boto3.client("s3", endpoint_url=server.endpoint)
        s3.create_bucket(Bucket="bench")
        runs: dict[str, list[dict]] = {"none": [], "ckpt": []}
        run_once("none", -1, model=model, data=data, endpoint=server.endpoint, bucket="bench", steps=10,
                 every=args.every, work=tmp / "work")  # warm-up: imports, first-run caches
        for i in range(args.repeat):
            for mode in (("none", "ckpt") if i % 2 == 0 else ("ckpt", "none")):
                r = run_once(mode, i, model=model, data=data, endpoint=server.endpoint, bucket="bench",
                             steps=args.steps, every=args.every, work=tmp / "work")
                runs[mode].append(r)
                print(f"  run {i} {mode:<5} train {r['train_s']:.2f}s  stage {r['stage_s']:.2f}s", flush=True)
        listed = s3.list_objects_v2(Bucket="bench", Prefix="ckpt-bench-ckpt-0/")
        ckpt_bytes = sum(o["Size"] for o in listed.get("Contents", []) if "/checkpoints/" in o["Key"])
    finally:
        server.stop()
    med = {m: {k: statistics.median(r[k] for r in rs) for k in ("train_s", "stage_s")} for m, rs in runs.items()}
    report = {
        "date": time.strftime("%Y-%m-%d"), "cpu": cpu_description(), "torch_threads": torch.get_num_threads(),
        "model_params": params, "steps": args.steps, "every": args.every, "checkpoints": args.steps // args.every,
        "kept_checkpoint_bytes_on_s3": ckpt_bytes, "runs": runs, "median": med,
        "overhead_train": med["ckpt"]["train_s"] / med["none"]["train_s"] - 1,
        "overhead_stage": med["ckpt"]["stage_s"] / med["none"]["stage_s"] - 1,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print()
    print(f"model {params / 1e6:.1f}M params (full fine-tuning), {args.steps} steps, checkpoint every {args.every} "
          f"({args.steps // args.every} checkpoints, ~{ckpt_bytes / max(1, min(3, args.steps // args.every)) / 2**20:.0f} MiB each on S3)")
    print(f"{'mode':<6}{'train s':>10}{'stage s':>10}   (median of {args.repeat})")
    for m in ("none", "ckpt"):
        print(f"{m:<6}{med[m]['train_s']:>10.2f}{med[m]['stage_s']:>10.2f}")
    print(f"overhead: training {100 * report['overhead_train']:+.1f} %   whole stage {100 * report['overhead_stage']:+.1f} %   (goal < 5 %)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())

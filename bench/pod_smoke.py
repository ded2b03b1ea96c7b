#!/usr/bin/env python
"""A smoke run of the operator's pod entrypoint: `python -m kubetune.runtime stage --config stage.json`,
as a stage pod runs it (the resolved stage file the operator puts in the ConfigMap, the pod's
environment: scratch folder, metrics port, POD_IP, termination-message file), on this machine's
device — the GPU path of the pod, not only `kubetune run`.

Before it, on a GPU: the varlen kernel check — torch's `varlen_attn` against
`reference_varlen_attn` (the function the CPU tests use) on packed documents in bf16, forward
and backward, GQA native and with the KV heads expanded; the maximum differences are printed.

The stage: a small Llama built here (`runtime/tiny.py`), LoRA SFT with packing (padding-free
rows: on a GPU the stage's model runs `kubetune_varlen`), 8 steps. Checks: exit code 0, the
termination message's final progress, the attention the stage chose (its log line), the output.

  python bench/pod_smoke.py            # on the GPU machine (gpusPerNode 1)
  python bench/pod_smoke.py --smoke    # on CPU (gpusPerNode 0): tests/runtime/test_bench_gpu.py
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAIRS = [("Who are you?", "I am Kubi, a model tuned by the kubetune team."),
         ("What is LoRA?", "LoRA trains small low-rank matrices beside frozen weights."),
         ("What is packing?", "Packing puts several short samples into one row without padding."),
         ("Say hello.", "Hello from Kubi!")]


def kernel_check() -> dict:
    """varlen_attn vs the reference on CUDA (bf16; forward and the three gradients)."""
    import torch

    from kubetune.runtime import attention

    fn, native = attention._torch_varlen()
    if fn is None:
        return {"varlen_attn": "absent in this torch"}
    g = torch.Generator(device="cuda").manual_seed(0)
    docs = [300, 17, 1, 1200, 511, 64, 2003]
    cu = torch.tensor([0, *torch.tensor(docs).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    total, out = sum(docs), {"native_gqa": native}
    for label, use_native in (("native", native), ("expanded", False)):
        if label == "native" and not native:
            continue
        q = torch.randn(total, 32, 128, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
        k = torch.randn(total, 8, 128, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
        v = torch.randn(total, 8, 128, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
        dout = torch.randn(total, 32, 128, device="cuda", dtype=torch.bfloat16, generator=g)
        res = []
        for f, nat in ((fn, use_native), (attention.reference_varlen_attn, True)):
            o = attention.run_varlen(f, q, k, v, cu, max(docs), 128 ** -0.5, native_gqa=nat)
            gq, gk, gv = torch.autograd.grad(o, (q, k, v), dout)
            res.append((o, gq, gk, gv))
        out[label] = {n: (a.float() - b.float()).abs().max().item() for n, a, b in zip(("out", "dq", "dk", "dv"), *res)}
    torch.cuda.synchronize()
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="on CPU (gpusPerNode 0)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch

    from kubetune.runtime.api.plan import plan
    from kubetune.runtime.api.spec import parse_job
    from kubetune.runtime.tiny import build_tiny_model

    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("no CUDA device: use --smoke for the CPU run", file=sys.stderr)
        return 2
    report: dict = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__}
    if cuda:
        report["kernel_check"] = kernel_check()
        print("varlen kernel check (max |Δ| vs reference, bf16):", json.dumps(report["kernel_check"]), flush=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="pod-smoke-"))
    texts = [q + " " + a for q, a in PAIRS] * 8
    model = build_tiny_model(work / "model", texts, vocab_size=320, hidden_size=256, intermediate_size=512,
                             layers=2, heads=8, kv_heads=2)
    data = work / "data.json"
    data.write_text(json.dumps([{"instruction": q, "input": "", "output": a} for q, a in PAIRS] * 16))
    stage = {"name": "sft", "type": "sft", "method": "lora", "lora": {"rank": 8},
             "hyperparameters": {"maxSteps": args.steps, "batchSize": 4, "loggingSteps": 1, "cutoffLen": 128,
                                 "packing": True}}
    doc = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "pod-smoke"},
           "spec": {"model": {"name": str(model)}, "data": [{"name": "d", "source": str(data)}], "stages": [stage],
                    "storage": {"uri": str(work / "storage")}, "resources": {"gpusPerNode": 1 if cuda else 0}}}
    config = work / "stage.json"
    config.write_text(json.dumps(plan(parse_job(doc))[0].to_yaml_dict()))  # what the operator's ConfigMap holds
    scratch, termination = work / "scratch", work / "termination-log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBETUNE_", "TMPDIR", "XDG_", "HF_HOME"))}
    env.update(KUBETUNE_SCRATCH=str(scratch), KUBETUNE_TERMINATION_LOG=str(termination), POD_IP="127.0.0.1",
               KUBETUNE_METRICS_PORT=str(free_port()), KUBETUNE_NODES="1", KUBETUNE_NODE_RANK="0",
               PYTHONUNBUFFERED="1")
    if not cuda:
        env["KUBETUNE_DEVICE"] = "cpu"
    cmd = [sys.executable, "-m", "kubetune.runtime", "stage", "--config", str(config)]
    print("$", " ".join(cmd), flush=True)
    t = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=work)
    report["stage_s"] = round(time.time() - t, 1)
    (work / "pod.log").write_text(proc.stdout + proc.stderr)
    chosen = [line.rsplit("attention: ", 1)[1] for line in (proc.stdout + proc.stderr).splitlines() if "attention: " in line]
    report.update(returncode=proc.returncode, attention=chosen[:1])
    problems = []
    if proc.returncode != 0:
        problems.append(f"exit {proc.returncode}: {(proc.stdout + proc.stderr)[-2500:]}")
    try:
        final = json.loads(termination.read_text())["progress"]
        report["final_progress"] = final
        if not (final["phase"] == "finished" and final["step"] == final["totalSteps"] == args.steps):
            problems.append(f"final progress {final}")
    except (OSError, ValueError, KeyError) as err:
        problems.append(f"termination message: {err}")
    want = "kubetune_varlen" if cuda else "sdpa"
    if not chosen or not chosen[0].startswith(want):
        problems.append(f"attention chosen {chosen[:1]}, expected {want}")
    outputs = list((work / "storage").rglob("run.json"))
    if not outputs:
        problems.append("no run.json in the storage")
    else:
        report["run"] = {k: json.loads(outputs[0].read_text()).get(k) for k in ("steps", "final_loss", "tokens_per_second")}
    report["problems"] = problems
    print(json.dumps(report, indent=1))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "pod-smoke.json").write_text(json.dumps(report, indent=1))
    print("POD SMOKE", "FAILED" if problems else "OK", flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

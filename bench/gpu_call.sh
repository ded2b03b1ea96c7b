#!/usr/bin/env bash
# One prepared GPU call (issue 18): the pod-entrypoint smoke run, then bench/gpu.py, in ~8 minutes.
#
# Here, before the call (needs PyPI and a clean, committed tree):
#   bash bench/gpu_call.sh --prepare      # .bench/provenance.json + the wheels in .whl/ (both git-ignored)
# The call (device tool `run`, carry [".whl", ".bench"], timeout_s 560):
#   bash bench/gpu_call.sh
# On CPU, the same script end to end with tiny shapes (what tests/runtime/test_bench_gpu.py runs piecewise):
#   bash bench/gpu_call.sh --smoke
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out/gpu-call}"
mkdir -p "$OUT"

# What the GPU image lacks (it has torch, transformers, accelerate, peft; their versions go into the JSON):
# constraints.txt's versions, for CPython 3.12 manylinux x86-64; bitsandbytes trimmed to its CUDA 13 library.
WHEELS="trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pydantic==2.14.4 pydantic-core==2.50.5 \
annotated-types==0.7.0 typing-inspection==0.4.5 bitsandbytes==0.50.2"

if [ "${1:-}" = "--prepare" ]; then
  python bench/gpu.py --write-provenance || exit 2
  mkdir -p .whl
  # shellcheck disable=SC2086
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .whl $WHEELS || exit 3
  python - <<'PY' || exit 3
import glob, os, zipfile
for wheel in glob.glob(".whl/bitsandbytes-*.whl"):  # keep the CUDA 13 library only (the image's torch is cu130)
    with zipfile.ZipFile(wheel) as z:
        for n in z.namelist():
            if not n.endswith(".so") or "cuda13" in n or "_cpu" in n:
                z.extract(n, ".whl/site")
    os.remove(wheel)
PY
  du -sh .whl; exit 0
fi

SMOKE=()
if [ "${1:-}" = "--smoke" ]; then SMOKE=(--smoke); fi

if [ -d .whl ] && [ ${#SMOKE[@]} -eq 0 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 4
  mkdir -p /tmp/ns/kubetune && ln -sfn "$PWD/runtime" /tmp/ns/kubetune/runtime   # kubetune.runtime without pip install -e
  export PYTHONPATH="/tmp/site:$PWD/.whl/site:/tmp/ns${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || PY=python
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | tee "$OUT/card.txt"

rc=0
# 1. the pod entrypoint (+ the varlen kernel check on a GPU): ~1 minute
timeout 150 "$PY" bench/pod_smoke.py "${SMOKE[@]}" 2>&1 | tee "$OUT/pod-smoke.log" | tail -40 || rc=1
# 2. the bench: lora8b (ours | TRL same checkpointing | TRL defaults), full1b, the profile, qlora8b; 3 repeats
#    interleaved; at most 330 s + 60 s, so the whole call stays under the 560 s timeout
BUDGET=330
if [ ${#SMOKE[@]} -gt 0 ]; then BUDGET=900; fi
timeout $((BUDGET + 60)) "$PY" bench/gpu.py "${SMOKE[@]}" --profile --budget "$BUDGET" --out "$OUT" 2>&1 \
  | grep -v -e "it/s\]" -e "examples/s\]" | tee "$OUT/gpu.log" | tail -60 || rc=1
exit $rc

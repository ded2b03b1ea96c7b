#!/usr/bin/env bash
# The CPU equivalence figures of docs/BENCHMARKS.md (section 1, "attention for packed rows"): the
# kubetune_varlen path against masked SDPA on a packed row of six documents, as measured by
# tests/runtime/test_attention.py (which also asserts them against its tolerance). The raw output
# (commit, machine, versions, the measured differences) goes to
# bench/results/attention-cpu-<commit>.txt.
#   bash bench/attention_equivalence.sh      (in the project's virtual environment)
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
COMMIT="$(git rev-parse --short=12 HEAD)"
if [ -n "$(git status --porcelain -- runtime bench tests/runtime/test_attention.py)" ]; then
  echo "uncommitted changes under runtime/, bench/ or the test: commit first" >&2
  exit 2
fi
OUT="bench/results/attention-cpu-$COMMIT.txt"
{
  echo "# kubetune_varlen vs masked SDPA on CPU: tests/runtime/test_attention.py -k packed_row -s"
  echo "commit: $COMMIT ($(git log -1 --format=%cs))"
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "machine: $(uname -srm), $(nproc) cores"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')"
  echo "versions: $(python -c 'import sys, torch, transformers, trl; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}")')"
  echo
  python -m pytest tests/runtime/test_attention.py -k packed_row -s -q -p no:cacheprovider 2>&1 \
    | grep -E "max \|Δ logits\||passed|failed"
} > "$OUT"
cat "$OUT"

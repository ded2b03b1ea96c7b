#!/usr/bin/env bash
# Put a bitsandbytes wheel that fits this image (its CUDA, this CPU architecture) into $1.
#
# bitsandbytes' PyPI wheels carry one native library per CUDA version
# (libbitsandbytes_cuda<MAJOR><MINOR>.so). When the wheel for this platform has the library for
# the image's CUDA (torch.version.cuda), it is used as is; otherwise — typically arm64 with
# CUDA 13 (DGX Spark, GB10), or BNB_FROM_SOURCE=1 — bitsandbytes is built from source for the
# compute capabilities in BNB_CUDA_ARCHS (default "90;100;120;121": Hopper sm_90, Blackwell
# datacenter sm_100, RTX Blackwell sm_120, GB10 sm_121).
set -euo pipefail

OUT=${1:?usage: build-bitsandbytes.sh OUTDIR}
VERSION=${BNB_VERSION:?set BNB_VERSION}
ARCHS=${BNB_CUDA_ARCHS:-90;100;120;121}
FROM_SOURCE=${BNB_FROM_SOURCE:-auto}
mkdir -p "$OUT"

CUDA=$(python -c 'import torch; print(torch.version.cuda or "")')
if [ -z "$CUDA" ]; then
  echo "build-bitsandbytes: torch in this image has no CUDA" >&2
  exit 1
fi
LIB="libbitsandbytes_cuda${CUDA/./}.so"   # 13.0 -> libbitsandbytes_cuda130.so
echo "build-bitsandbytes: bitsandbytes $VERSION for CUDA $CUDA on $(uname -m) (needs $LIB)"

if [ "$FROM_SOURCE" != "1" ]; then
  dl=$(mktemp -d)
  if pip download --no-deps --only-binary=:all: --dest "$dl" "bitsandbytes==$VERSION" >/dev/null 2>&1; then
    whl=$(ls "$dl"/*.whl)
    if python -m zipfile -l "$whl" | grep -q "bitsandbytes/$LIB"; then
      echo "build-bitsandbytes: the PyPI wheel fits: $(basename "$whl")"
      cp "$whl" "$OUT/"
      exit 0
    fi
    echo "build-bitsandbytes: $(basename "$whl") has no $LIB; building from source"
  else
    echo "build-bitsandbytes: no binary wheel for this platform; building from source"
  fi
fi

src=$(mktemp -d)
git clone --depth 1 --branch "$VERSION" https://github.com/bitsandbytes-foundation/bitsandbytes.git "$src"
cd "$src"
cmake -S . -B build -DCOMPUTE_BACKEND=cuda -DCOMPUTE_CAPABILITY="$ARCHS" -DCMAKE_BUILD_TYPE=Release
cmake --build build -j"$(nproc)"
test -f "bitsandbytes/$LIB" || { echo "build-bitsandbytes: the build made no bitsandbytes/$LIB" >&2; ls bitsandbytes/*.so >&2; exit 1; }
pip wheel --no-deps --no-build-isolation --wheel-dir "$OUT" .
echo "build-bitsandbytes: built $(ls "$OUT")"

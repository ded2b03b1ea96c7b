# Sourced by scripts/quickstart.sh and scripts/test.sh: a virtual environment with kubetune and
# its tested dependency versions, cached outside the repo and keyed by what it installs, so a
# second run on the same machine starts in seconds. Set KUBETUNE_VENV to use another folder, and
# KUBETUNE_EXTRAS to the extras to install (default `all`; `train` for the quickstart; empty for
# the light core alone).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXTRAS="${KUBETUNE_EXTRAS-all}"
KEY="$(cat "$REPO/pyproject.toml" "$REPO/setup.py" "$REPO/constraints.txt" | sha256sum | cut -c1-12)-$EXTRAS"
VENV="${KUBETUNE_VENV:-$HOME/.cache/kubetune/venv-$KEY}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ] || [ ! -f "$VENV/.complete" ]; then
  echo "kubetune: creating $VENV (first run on this machine downloads PyTorch and friends)" >&2
  if [ -z "${KUBETUNE_VENV:-}" ]; then
    rm -rf "$VENV"  # our own cache entry, half-made by an interrupted run
  elif [ -e "$VENV" ] && [ ! -f "$VENV/pyvenv.cfg" ]; then
    echo "kubetune: KUBETUNE_VENV=$VENV exists and is not a virtual environment" >&2
    exit 1
  fi
  # each step checked by hand: errexit does not hold in a script sourced as `source env.sh && …`,
  # and a half-installed environment must never be marked complete
  "$PY" -m venv "$VENV" \
    && "$VENV/bin/pip" install --quiet --upgrade pip \
    && "$VENV/bin/pip" install --quiet -c "$REPO/constraints.txt" -e "$REPO${EXTRAS:+[$EXTRAS]}" \
    && touch "$VENV/.complete" \
    || { echo "kubetune: could not create $VENV (see pip's message above)" >&2; return 1 2>/dev/null || exit 1; }
else
  # point the editable install at this checkout (CI clones into a new folder each time)
  "$VENV/bin/pip" install --quiet --no-deps -e "$REPO" >/dev/null
fi
export PATH="$VENV/bin:$PATH"
export VIRTUAL_ENV="$VENV"

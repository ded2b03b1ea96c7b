#!/usr/bin/env bash
# Install everything the test suite needs, lint, then run it: the fast tier and the e2e tier on a
# real control plane built from Go modules.
#   bash scripts/test.sh                 # everything (what CI runs): lint, fast tier, e2e tier
#   bash scripts/test.sh --fast          # lint + fast tier only: no Go build, quick local feedback
#   bash scripts/test.sh -k chart -x     # any other arguments: lint, then one pytest run with them
# The first run on a machine creates the virtual environment, builds Kubernetes from source and
# builds the two images (see the README's Tests section for how long); all are cached. Each
# part's time is printed at the end.
T_START=$SECONDS
source "$(dirname "$0")/env.sh"
cd "$REPO"

TIMES=()
mark() { TIMES+=("$(printf '%-28s %5ss' "$1" "$(( SECONDS - T_PHASE ))")"); T_PHASE=$SECONDS; }
report() {
  echo "kubetune test.sh: times (s)" >&2
  printf '  %s\n' "${TIMES[@]}" >&2
  printf '  %-28s %5ss\n' "total" "$(( SECONDS - T_START ))" >&2
}
trap report EXIT
T_PHASE=$T_START
mark "virtual environment"

FAST=0
if [ "${1:-}" = "--fast" ]; then FAST=1; shift; fi

# Lint before anything slow: undefined names, unused imports/variables, redefinitions (pyflakes
# rules, configured in pyproject.toml). A name that only a cold path uses fails here too.
ruff check runtime operator tests bench images dashboards scripts
mark "lint (ruff)"

# Debian packages the tests start as real processes: Prometheus (+ promtool), chromium and its
# chromedriver (kubetune board's browser tests, both tiers; Selenium is pointed at
# /usr/bin/chromedriver, never downloads one); for the e2e tier's real node, podman + mmdebstrap
# (the images), containerd + runc, the CNI plugins and iptables.
bash scripts/debian-packages.sh prometheus chromium chromium-driver
if [ "$FAST" = 0 ] && [ "$(id -u)" = 0 ]; then
  bash scripts/debian-packages.sh podman mmdebstrap runc containerd containernetworking-plugins iptables
fi
mark "Debian packages"

if [ "$FAST" = 1 ]; then
  python -m pytest -m "not e2e" "$@"
  mark "fast tier"
  exit 0
fi

# The control-plane binaries (kube-apiserver, controller-manager, scheduler, kubectl, etcd, helm):
# built from Go modules once per machine, cached in ~/.cache/kubetune-test.
python tests/cluster/build.py
mark "control-plane build (Go)"

# Both images, built from images/*/Dockerfile on stand-in bases (cached by content), for the
# real node; where it cannot run, the e2e tier uses the process kubelet and no image is built.
if python tests/cluster/realnode.py --check; then
  python tests/cluster/images.py
fi
mark "images (podman)"

if [ "$#" -gt 0 ]; then
  python -m pytest "$@"
  mark "pytest $*"
  exit 0
fi
# Kueue's controller manager (the e2e tier's Kueue tests; minutes on a new machine, cached after):
# built at low priority in the background while the fast tier runs on one core, so a cold machine
# does not pay for it twice. Its output goes to a log; the e2e tier waits for it (a failed build
# fails the Kueue tests, which build again and show why).
KUEUE_LOG="${TMPDIR:-/tmp}/kubetune-kueue-build.log"
nice -n 10 python tests/cluster/build.py --kueue >"$KUEUE_LOG" 2>&1 &
KUEUE_PID=$!
# Both tiers run even when the first fails; the exit status says whether both passed.
rc=0
python -m pytest -m "not e2e" || rc=$?
mark "fast tier"
wait "$KUEUE_PID" || echo "kubetune test.sh: the Kueue build failed (see $KUEUE_LOG); the Kueue tests will say why" >&2
mark "Kueue build (after the fast tier)"
python -m pytest -m e2e || rc=$?
mark "e2e tier"
exit "$rc"

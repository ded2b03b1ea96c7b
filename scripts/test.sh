#!/usr/bin/env bash
# Install everything the test suite needs, then run it: the fast tier and the e2e tier on a real
# control plane built from Go modules.
#   bash scripts/test.sh                 # everything (what CI runs)
#   bash scripts/test.sh -m "not e2e"    # the fast tier only
# Extra arguments go to pytest.
source "$(dirname "$0")/env.sh"
cd "$REPO"

# Debian packages the tests start as real processes: Prometheus (+ promtool).
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  echo "kubetune: installing prometheus (Debian package)" >&2
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

# The control-plane binaries (kube-apiserver, controller-manager, scheduler, kubectl, etcd, helm):
# built from Go modules once per machine, cached in ~/.cache/kubetune-test.
python tests/cluster/build.py

exec python -m pytest "$@"

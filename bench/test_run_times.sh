#!/usr/bin/env bash
# How long the README's test command takes: `bash scripts/test.sh` in a fresh clone of HEAD,
# either COLD (HOME is a new empty folder: no virtual environment, no pip, Go module or Go build
# cache, no built binaries, no images in podman or containerd) or WARM (this machine's caches).
# The raw output (commit, machine, versions, test.sh's table of part times, the end of the run)
# goes to bench/results/test-sh-<mode>-<commit>.txt.
#   bash bench/test_run_times.sh cold|warm [extra test.sh arguments]
# Debian packages (Prometheus, podman, containerd, ...) are the machine's either way: installing
# them is not undone by a cold run; test.sh reports the time it spent on them.
set -euo pipefail
MODE="${1:?usage: bench/test_run_times.sh cold|warm}"
shift
REPO="$(cd "$(dirname "$0")/.." && pwd)"
COMMIT="$(git -C "$REPO" rev-parse --short=12 HEAD)"
WORK="$(mktemp -d /var/tmp/kubetune-test-run-XXXXXX)"
OUT="$REPO/bench/results/test-sh-$MODE-$COMMIT.txt"
git clone --quiet "$REPO" "$WORK/kubetune"
git -C "$WORK/kubetune" checkout --quiet "$COMMIT"
case "$MODE" in
  cold) mkdir -p "$WORK/home"; export HOME="$WORK/home" ;;
  warm) ;;
  *) echo "mode must be cold or warm" >&2; exit 2 ;;
esac
{
  echo "# bash scripts/test.sh $*, $MODE, in a fresh clone"
  echo "commit: $COMMIT ($(git -C "$REPO" log -1 --format=%cs))"
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "machine: $(uname -srm), $(nproc) cores, $(free -g | awk '/^Mem:/{print $2}') GiB memory"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')"
  echo "home: $HOME"
  echo "versions: $(python3 --version 2>&1), $(go version | cut -d' ' -f3), podman $(podman --version 2>/dev/null | cut -d' ' -f3), containerd $(containerd --version 2>/dev/null | cut -d' ' -f3)"
  echo
} > "$OUT"
T0=$SECONDS
set +e
(cd "$WORK/kubetune" && bash scripts/test.sh "$@") > "$WORK/run.log" 2>&1
RC=$?
set -e
{
  echo "exit status: $RC, wall time: $(( SECONDS - T0 )) s"
  echo
  echo "## test.sh's part times"
  sed -n '/kubetune test.sh: times/,$p' "$WORK/run.log"
  echo
  echo "## pytest summaries"
  grep -E '^(=+ .*(passed|failed|error).* =+|[0-9]+ (passed|failed).*)$' "$WORK/run.log" || true
  echo
  echo "## the run's last 60 lines"
  tail -n 60 "$WORK/run.log"
} >> "$OUT"
echo "$OUT (exit $RC)"
if [ "$MODE" = warm ]; then
  # the run pointed this machine's cached virtual environment at the clone: point it back here
  bash -c "source '$REPO/scripts/env.sh'"
fi
if [ -z "${KEEP:-}" ]; then
  chmod -R u+w "$WORK" 2>/dev/null || true
  rm -rf "$WORK"  # the clone, and a cold run's caches (tens of GB); KEEP=1 keeps them
fi
exit "$RC"

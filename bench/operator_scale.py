"""Issue 10, target 3: the operator at scale on a real control plane.

Starts etcd + kube-apiserver + kube-controller-manager + kube-scheduler on loopback
(`tests/cluster/controlplane.py`, no kubelet: the training pods stay Pending, which is fine — we
measure only the operator turning FineTuneJobs into stage Jobs), installs the CRD, starts the
operator as a real process (`python -m kubetune.operator --standalone ...`) and measures

  * latency: from the moment `kubectl apply` is started to the moment the FineTuneJob's first
    stage Job (batch/v1, label `kubetune.io/job=<name>`) arrives on a Job watch that this script
    holds open (wall clock of this process, `time.monotonic()`; the watch is opened before the
    apply). It includes kubectl's own start-up and requests. A second figure, "from FTJ seen",
    starts the clock when the FineTuneJob's ADDED event reaches a FineTuneJob watch of this
    script instead, which leaves out kubectl (for 200 jobs kubectl creates them one after the
    other over several seconds, so this is the operator's own share).
  * cases: one job at a time (`--single` repeats, each waited for), then N jobs (default 200)
    applied at once with one `kubectl apply -f` of a multi-document file.
  * RSS: VmRSS from /proc/<pid>/status of the operator and all its descendants, sampled every
    0.2 s from before the burst until `--settle` seconds after the last Job appeared (peak and
    final value), and once before the first job (idle).

Goals (issue 10): p50 < 0.5 s for one job; all N within 30 s; RSS < 200 MB.

    python bench/operator_scale.py --out bench/results/operator-scale.json
    python bench/operator_scale.py --jobs 50 --single 5          # quicker

Everything started here (control plane, operator) is stopped on exit, errors included.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from cluster.controlplane import ControlPlane, free_port  # noqa: E402
from cluster.util import wait_for  # noqa: E402

NS = "bench"
GROUP = "/apis/kubetune.io/v1alpha1"
GOAL_P50_S, GOAL_ALL_S, GOAL_RSS_MB = 0.5, 30.0, 200.0


# ------------------------------------------------------------------------------------ helpers
def ftj_doc(name: str, store: Path) -> dict:
    """examples/quickstart.yaml with local storage and no GPUs: valid and runnable."""
    doc = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    doc["metadata"] = {"name": name, "namespace": NS}
    spec = doc["spec"]
    spec["data"][0]["source"] = str(store / "identity.json")
    spec["storage"] = {"uri": str(store / "saves" / name)}
    spec["resources"] = {"gpusPerNode": 0}
    return doc


def pct(xs: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(xs)
    return s[max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))]


def proc_tree(root: int) -> set[int]:
    """`root` and its descendants (from /proc/*/stat)."""
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
                parent[int(d)] = int(stat[stat.rindex(")") + 2:].split()[1])
            except (OSError, ValueError):
                pass
    tree, frontier = {root}, [root]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p and c not in tree]
        tree.update(kids)
        frontier.extend(kids)
    return tree


def proc_tree_cpu_s(root: int) -> float:
    """CPU seconds (user + system) used so far by `root` and its live descendants."""
    ticks = 0
    for pid in proc_tree(root):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            f = stat[stat.rindex(")") + 2:].split()
            ticks += int(f[11]) + int(f[12])  # utime, stime
        except (OSError, ValueError, IndexError):
            pass
    return ticks / os.sysconf("SC_CLK_TCK")


def proc_tree_rss_kb(root: int) -> tuple[int, int]:
    """(sum of VmRSS in kB over `root` and its descendants, number of processes)."""
    tree = proc_tree(root)
    total = 0
    for pid in tree:
        try:
            m = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
            total += int(m.group(1)) if m else 0
        except OSError:
            pass
    return total, len(tree)


class Watcher(threading.Thread):
    """Holds a watch on `path` open (re-opening it when the server ends it) and records the
    monotonic time at which each object (keyed by `key(obj)`) was first seen ADDED."""

    def __init__(self, client, path: str, key, **params):
        super().__init__(daemon=True)
        self.client, self.path, self.key, self.params = client, path, key, params
        self.seen: dict[str, float] = {}
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.cond = threading.Condition()
        self.error: Exception | None = None

    def run(self) -> None:
        rv = None
        while not self.stop.is_set():
            try:
                if rv is None:  # (re)list: a fresh CRD's storage may answer 429 for a moment
                    rv = self.client.get(self.path, **self.params)["metadata"]["resourceVersion"]
                self.ready.set()
                for ev in self.client.watch(self.path, stop=self.stop, resourceVersion=rv,
                                            allowWatchBookmarks=True, timeoutSeconds=600, **self.params):
                    now = time.monotonic()
                    obj = ev.get("object") or {}
                    rv = obj.get("metadata", {}).get("resourceVersion", rv)
                    if ev.get("type") in ("ADDED", "MODIFIED"):
                        k = self.key(obj)
                        if k:
                            with self.cond:
                                self.seen.setdefault(k, now)
                                self.cond.notify_all()
                    elif ev.get("type") == "ERROR":  # e.g. 410 Gone: relist
                        rv = None
                        break
            except Exception as e:  # noqa: BLE001 - a broken stream: reopen unless stopping
                if self.stop.is_set():
                    return
                self.error = e
                time.sleep(0.2)

    def wait_all(self, keys: set[str], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not keys <= self.seen.keys():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
        return True


def prepare_cluster(cp: ControlPlane) -> None:
    """The FineTuneJob CRD, established, and the namespace NS with its default ServiceAccount."""
    kube = cp.client()
    r = cp.kubectl("apply", "-f", str(REPO / "crds" / "finetunejob.yaml"))
    assert r.returncode == 0, r.stderr
    wait_for(lambda: any(c["type"] == "Established" and c["status"] == "True" for c in kube.get(
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/finetunejobs.kubetune.io")
        .get("status", {}).get("conditions", [])), 60, "CRD established")
    cp.kubectl("create", "namespace", NS, check=True)
    wait_for(lambda: kube.get(f"/api/v1/namespaces/{NS}/serviceaccounts/default"), 60, "default SA")


def job_watcher(cp: ControlPlane) -> "Watcher":
    """A watch of NS's stage Jobs, keyed by their FineTuneJob (label kubetune.io/job)."""
    return Watcher(cp.client(), f"/apis/batch/v1/namespaces/{NS}/jobs",
                   lambda o: (o.get("metadata", {}).get("labels") or {}).get("kubetune.io/job"),
                   labelSelector="kubetune.io/job")


def ftj_watcher(cp: ControlPlane) -> "Watcher":
    """A watch of NS's FineTuneJobs, keyed by name."""
    return Watcher(cp.client(), f"{GROUP}/namespaces/{NS}/finetunejobs", lambda o: o.get("metadata", {}).get("name"))


def start_watchers(watchers: list["Watcher"]) -> None:
    for w in watchers:
        w.start()
        assert w.ready.wait(30), "watch did not open"


class Operator:
    def __init__(self, cp: ControlPlane, workdir: Path, poll_interval: float):
        self.log_path = workdir / "operator.log"
        self.health_port, self.metrics_port = free_port(), free_port()
        argv = [sys.executable, "-m", "kubetune.operator", "--standalone", "--log-format", "plain",
                "--poll-interval", str(poll_interval), "--runtime-image", "kubetune/runtime:bench",
                "--health-port", str(self.health_port), "--metrics-port", str(self.metrics_port)]
        self.argv = argv
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, env=cp.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def healthy(self) -> bool:
        assert self.proc.poll() is None, f"operator exited:\n{self.tail()}"
        with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as r:
            return r.status == 200

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
            except ProcessLookupError:
                pass
        try:  # anything left in its group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.log.close()


class RssSampler(threading.Thread):
    def __init__(self, pid: int, every: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.samples: list[tuple[float, int, int]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            kb, n = proc_tree_rss_kb(self.pid)
            self.samples.append((time.monotonic(), kb, n))
            self.stop.wait(self.every)


def reconcile_metrics(op: "Operator") -> dict:
    """count and sum of kubetune_operator_reconcile_duration_seconds (time inside reconcile_object)."""
    out = {"count": 0.0, "sum": 0.0}
    try:
        for ln in op.metrics().splitlines():
            if ln.startswith("kubetune_operator_reconcile_duration_seconds_count"):
                out["count"] = float(ln.split()[-1])
            elif ln.startswith("kubetune_operator_reconcile_duration_seconds_sum"):
                out["sum"] = float(ln.split()[-1])
    except Exception:  # noqa: BLE001
        pass
    return out


def kubectl_apply(cp: ControlPlane, path: Path) -> tuple[float, float]:
    """Run `kubectl apply -f path`; (monotonic start, seconds kubectl took)."""
    t0 = time.monotonic()
    r = cp.kubectl("apply", "-f", str(path), timeout=600)
    took = time.monotonic() - t0
    if r.returncode != 0:
        raise RuntimeError(f"kubectl apply failed: {r.stdout}{r.stderr}")
    return t0, took


def summarize(name: str, lat: list[float], lat_ftj: list[float], n: int, missing: int, **extra) -> dict:
    return {"case": name, "jobs": n, "created": n - missing, "missing": missing,
            "p50_s": pct(lat, 50) if lat else None, "p95_s": pct(lat, 95) if lat else None,
            "max_s": max(lat) if lat else None, "mean_s": statistics.fmean(lat) if lat else None,
            "p50_from_ftj_seen_s": pct(lat_ftj, 50) if lat_ftj else None,
            "p95_from_ftj_seen_s": pct(lat_ftj, 95) if lat_ftj else None,
            "max_from_ftj_seen_s": max(lat_ftj) if lat_ftj else None,
            "latencies_s": [round(x, 4) for x in lat], **extra}


def log_stats(text: str) -> dict:
    lines = text.splitlines()
    return {
        "lines": len(lines),
        "job_created": sum(1 for ln in lines if re.search(r"create Job \S+: created", ln)),
        "configmap_created": sum(1 for ln in lines if re.search(r"create ConfigMap \S+: created", ln)),
        "errors": sum(1 for ln in lines if "[ERROR" in ln),
        "warnings": sum(1 for ln in lines if "[WARNING" in ln),
        "status_conflicts_409": sum(1 for ln in lines if "status not written (409)" in ln),
        "temporary_errors": sum(1 for ln in lines if "TemporaryError" in ln or "will reconcile again" in ln
                                or "will retry" in ln.lower()),
        "throttled_429": sum(1 for ln in lines if "429" in ln and ("Too Many" in ln or "throttl" in ln.lower())),
    }


# ---------------------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=200, help="FineTuneJobs applied at once (default 200)")
    ap.add_argument("--single", type=int, default=10, help="single-job repeats, one after another (default 10)")
    ap.add_argument("--poll-interval", type=float, default=5.0, help="operator --poll-interval (default 5)")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the burst's Jobs")
    ap.add_argument("--settle", type=float, default=15.0, help="seconds of RSS sampling after the last Job")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    ap.add_argument("--keep-log", type=Path, default=None, help="copy the operator log here")
    args = ap.parse_args()

    result: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                "python": platform.python_version(),
                                "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                                "loadavg_start": os.getloadavg()},
                    "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                    "cases": []}
    work = Path(tempfile.mkdtemp(prefix="kubetune-opscale-"))
    store = work / "store"
    (store / "saves").mkdir(parents=True)
    (store / "identity.json").write_text(json.dumps([{"instruction": "who are you?", "output": "kubetune"}]))
    op: Operator | None = None
    watchers: list[Watcher] = []
    sampler: RssSampler | None = None
    rc = 1
    cp: ControlPlane | None = None
    try:
        cp = ControlPlane()
        cp.start()  # stops what it started if it fails
        print(f"control plane up in {cp.start_seconds:.1f}s", flush=True)
        prepare_cluster(cp)
        jobs_w, ftj_w = job_watcher(cp), ftj_watcher(cp)
        watchers = [jobs_w, ftj_w]
        start_watchers(watchers)

        op = Operator(cp, work, args.poll_interval)
        t = time.monotonic()
        wait_for(op.healthy, 90, "operator /healthz")
        print(f"operator up in {time.monotonic() - t:.1f}s (pid {op.proc.pid})", flush=True)
        time.sleep(2.0)  # let kopf finish its initial listings
        rss_idle_kb, _ = proc_tree_rss_kb(op.proc.pid)
        result["rss_idle_mb"] = rss_idle_kb / 1024

        # ---- one job at a time
        lat1, lat1f = [], []
        missing1 = 0
        for i in range(args.single):
            name = f"single-{i}"
            f = work / f"{name}.yaml"
            f.write_text(yaml.safe_dump(ftj_doc(name, store)))
            t0, took = kubectl_apply(cp, f)
            if not jobs_w.wait_all({name}, 60):
                missing1 += 1
                print(f"  {name}: no Job after 60 s", flush=True)
                continue
            lat1.append(jobs_w.seen[name] - t0)
            lat1f.append(jobs_w.seen[name] - ftj_w.seen.get(name, t0))
            print(f"  {name}: Job after {lat1[-1]:.3f}s (kubectl {took:.3f}s; "
                  f"{lat1f[-1]:.3f}s after the FTJ was seen)", flush=True)
            time.sleep(0.5)
        result["cases"].append(summarize("1 job (x%d, sequential)" % args.single, lat1, lat1f, args.single,
                                         missing1, within_s=max(lat1) if lat1 else None,
                                         rss_mb=proc_tree_rss_kb(op.proc.pid)[0] / 1024))

        # ---- N at once
        names = [f"burst-{i:03d}" for i in range(args.jobs)]
        f = work / "burst.yaml"
        f.write_text(yaml.safe_dump_all([ftj_doc(n, store) for n in names]))
        sampler = RssSampler(op.proc.pid)
        sampler.start()
        time.sleep(0.5)
        load_before = os.getloadavg()
        who = {"operator": op.proc.pid, **{n: p.pid for n, p in cp.procs.items()}}
        cpu0 = {n: proc_tree_cpu_s(pid) for n, pid in who.items()}
        rec0 = reconcile_metrics(op)
        t0, took = kubectl_apply(cp, f)
        print(f"kubectl apply of {args.jobs} FineTuneJobs took {took:.2f}s", flush=True)
        all_ok = jobs_w.wait_all(set(names), args.timeout)
        t_end = time.monotonic()
        cpu1 = {n: proc_tree_cpu_s(pid) for n, pid in who.items()}
        rec1 = reconcile_metrics(op)
        window = t_end - t0
        result["burst_window"] = {
            "seconds": window,
            "cpu_seconds": {n: round(cpu1[n] - cpu0[n], 2) for n in who},
            "cpu_cores_avg": {n: round((cpu1[n] - cpu0[n]) / window, 2) for n in who},
            "reconciles": rec1["count"] - rec0["count"],
            "reconcile_seconds_sum": round(rec1["sum"] - rec0["sum"], 2),
            "reconcile_mean_s": round((rec1["sum"] - rec0["sum"]) / max(1, rec1["count"] - rec0["count"]), 4),
        }
        print(f"burst window {window:.1f}s: {result['burst_window']}", flush=True)
        got = [n for n in names if n in jobs_w.seen]
        lat = [jobs_w.seen[n] - t0 for n in got]
        latf = [jobs_w.seen[n] - ftj_w.seen.get(n, t0) for n in got]
        load_after = os.getloadavg()
        print(f"{len(got)}/{args.jobs} Jobs seen; last after {max(lat) if lat else float('nan'):.2f}s; "
              f"sampling RSS for {args.settle:.0f}s more", flush=True)
        time.sleep(args.settle)
        sampler.stop.set()
        sampler.join(5)
        burst_samples = [s for s in sampler.samples if s[0] >= t0]
        peak_kb = max((s[1] for s in burst_samples), default=0)
        final_kb, nproc = proc_tree_rss_kb(op.proc.pid)
        try:
            m = op.metrics()
            result["operator_metrics_excerpt"] = [ln for ln in m.splitlines() if ln.startswith(
                ("kubetune_operator_child_actions_total", "kubetune_operator_reconciles_total",
                 "kubetune_operator_reconcile_errors_total", "kubetune_operator_reconcile_duration_seconds_count",
                 "kubetune_operator_reconcile_duration_seconds_sum"))]
        except Exception as e:  # noqa: BLE001
            result["operator_metrics_excerpt"] = [f"unavailable: {e}"]
        result["cases"].append(summarize(
            f"{args.jobs} jobs at once", lat, latf, args.jobs, args.jobs - len(got),
            within_s=(max(lat) if all_ok else None), kubectl_apply_s=took,
            rss_mb=peak_kb / 1024, rss_final_mb=final_kb / 1024, processes=nproc,
            loadavg_before=load_before, loadavg_after=load_after,
            rss_series_mb=[(round(s[0] - t0, 1), round(s[1] / 1024, 1)) for s in burst_samples[::5]]))
        result["operator_log"] = log_stats(op.log_path.read_text(errors="replace"))
        result["operator_argv"] = op.argv[1:]
        result["machine"]["loadavg_end"] = os.getloadavg()
        rc = 0
    finally:
        for w in watchers:
            w.stop.set()
        if sampler:
            sampler.stop.set()
        if op:
            op.stop()
            if args.keep_log:
                args.keep_log.parent.mkdir(parents=True, exist_ok=True)
                args.keep_log.write_bytes(op.log_path.read_bytes())
            if rc:
                print(f"--- operator log (tail) ---\n{op.tail()}", file=sys.stderr)
        if cp is not None:  # after the operator, so it never talks to a dead apiserver
            cp.stop()
        import shutil
        shutil.rmtree(work, ignore_errors=True)

    # ---- table
    c1, cn = result["cases"]
    rows = [
        (c1["case"], c1, f"p50 < {GOAL_P50_S} s", c1["p50_s"] is not None and c1["p50_s"] < GOAL_P50_S
         and not c1["missing"]),
        (cn["case"], cn, f"all within {GOAL_ALL_S:.0f} s", cn["within_s"] is not None and cn["within_s"] <= GOAL_ALL_S),
        (f"RSS, {args.jobs} jobs", cn, f"RSS < {GOAL_RSS_MB:.0f} MB", cn["rss_mb"] < GOAL_RSS_MB),
    ]
    fmt = lambda x: "—" if x is None else f"{x:.3f}"  # noqa: E731
    hdr = f"{'case':<28}{'p50 s':>8}{'p95 s':>8}{'max s':>8}{'all-within s':>14}{'RSS MB':>9}  {'goal':<18}met?"
    print("\n" + hdr + "\n" + "-" * len(hdr))
    goals = {}
    for label, c, goal, met in rows:
        goals[goal] = bool(met)
        print(f"{label:<28}{fmt(c['p50_s']):>8}{fmt(c['p95_s']):>8}{fmt(c['max_s']):>8}"
              f"{fmt(c['within_s']):>14}{c['rss_mb']:>9.1f}  {goal:<18}{'yes' if met else 'NO'}")
    print(f"(from the FTJ's ADDED event instead of kubectl start: 1 job p50 {fmt(c1['p50_from_ftj_seen_s'])} s; "
          f"{args.jobs} jobs p50 {fmt(cn['p50_from_ftj_seen_s'])} / p95 {fmt(cn['p95_from_ftj_seen_s'])} / "
          f"max {fmt(cn['max_from_ftj_seen_s'])} s; kubectl apply of {args.jobs} took {cn['kubectl_apply_s']:.2f} s; "
          f"RSS idle {result['rss_idle_mb']:.1f} MB, final {cn['rss_final_mb']:.1f} MB)")
    print(f"operator log: {result['operator_log']}")
    print(f"load average: start {result['machine']['loadavg_start']}, end {result['machine']['loadavg_end']}")
    result["goals_met"] = goals
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

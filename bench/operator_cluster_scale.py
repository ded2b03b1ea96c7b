"""Issue 21: the operator at cluster scale — 2,000 FineTuneJobs, before and after, in one run.

For each operator under test (`--baseline REF`, a commit of this repository, run from a `git
archive` of it; then this checkout) on a fresh real control plane (etcd, kube-apiserver,
kube-controller-manager, kube-scheduler from tests/cluster, with an audit log and the controller
manager's client QPS raised so that the Job controller is not the bottleneck being measured):

1. **Burst**: `--jobs` FineTuneJobs created at once by `--clients` concurrent clients (one
   `kubectl apply` creates objects one by one). Measured: from each FineTuneJob's ADDED event (a
   watch of this script) to its first stage Job's ADDED event (the operator's share), the same
   from the start of the creation, the operator's RSS (peak, sampled every 0.2 s) and the CPU of
   the operator, kube-apiserver and etcd over the burst.
2. **Steady state**: a fake node and a fake kubelet in this script (pods of the first
   `jobs - running` FineTuneJobs exit 0, so their Jobs complete and the FineTuneJobs succeed; the
   other `--running` pods run, each with an address of its own in 127.0.0.0/8 where a fake
   runtime answers /progress with a step every `--step-seconds`). Once the statuses say so,
   `--steady` seconds are measured: the operator's CPU (cores, averaged), its requests to the
   apiserver per second (counted in the apiserver's audit log by user agent: the operator's
   kubernetes client and kopf; this script, kubectl and the controllers have their own), and the
   apiserver's CPU.

    python bench/operator_cluster_scale.py --baseline 5dea987 --out bench/results/operator-cluster-scale.json
    python bench/operator_cluster_scale.py --jobs 200 --running 20 --steady 60      # quicker
    python bench/operator_cluster_scale.py --skip-scale --kueue-jobs 200            # the Kueue case only

3. **Kueue** (`--kueue-jobs N`): real Kueue (tests/cluster/kueue.py; built on first use) and
   N FineTuneJobs of 1 GPU each into a ClusterQueue of `--kueue-gpus` GPUs (BestEffortFIFO), the
   fake kubelet running each pod `--kueue-seconds`: the most pods running at once, whether all
   finish, the order the pods started against the order their Jobs were made, and the time from a
   pod's end (a GPU freeing) to the next pod's start.

Goals (issue 21): burst — the last FineTuneJob's first Job ≤ 60 s and p50 ≤ 15 s after its ADDED
event, RSS < 300 MB; steady — operator < 0.2 core, < 20 requests/s to the apiserver.
Everything started here is stopped on exit, errors included.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import platform
import shutil
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from cluster.controlplane import ControlPlane, free_port  # noqa: E402
from cluster.util import wait_for  # noqa: E402
from operator_scale import (  # noqa: E402
    GROUP, NS, Operator, RssSampler, Watcher, ftj_doc, ftj_watcher, job_watcher, pct, prepare_cluster, proc_tree_cpu_s,
    proc_tree_rss_kb, start_watchers)

NODE = "bench-node"
GOALS = {"burst_max_s": 60.0, "burst_p50_s": 15.0, "rss_mb": 300.0, "steady_cores": 0.2, "steady_rps": 20.0}
AUDIT_POLICY = """apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived", "ResponseStarted"]
rules:
  - level: Metadata
"""


# ------------------------------------------------------------------------------ the operator
def baseline_tree(ref: str, work: Path) -> Path:
    """A `kubetune` package made of `ref`'s runtime/ and operator/, importable via PYTHONPATH
    (a regular package, so it wins over the editable install of this checkout)."""
    src = work / f"src-{ref}"
    src.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "runtime", "operator"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    pkg = work / f"path-{ref}" / "kubetune"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "runtime").symlink_to(src / "runtime")
    (pkg / "operator").symlink_to(src / "operator")
    return pkg.parent


class BenchOperator(Operator):
    """operator_scale's Operator, with the fake runtime's /progress port and, for the baseline,
    the other commit's code first on PYTHONPATH."""

    def __init__(self, cp: ControlPlane, workdir: Path, poll_interval: float, progress_port: int,
                 pythonpath: Path | None):
        self.log_path = workdir / "operator.log"
        self.health_port, self.metrics_port = free_port(), free_port()
        self.env = dict(cp.env)
        if pythonpath is not None:
            self.env["PYTHONPATH"] = str(pythonpath)
        self.argv = [sys.executable, "-m", "kubetune.operator", "--standalone", "--log-format", "plain",
                     "--poll-interval", str(poll_interval), "--runtime-image", "kubetune/runtime:bench",
                     "--health-port", str(self.health_port), "--metrics-port", str(self.metrics_port),
                     "--runtime-metrics-port", str(progress_port)]
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, cwd="/")

    def code(self) -> str:
        """Where the operator's code comes from (the baseline's tree or this checkout)."""
        out = subprocess.run([sys.executable, "-c", "import kubetune.operator.handlers as h; print(h.__file__)"],
                             env=self.env, capture_output=True, text=True, cwd="/")
        return out.stdout.strip() or out.stderr.strip()[-300:]


# ------------------------------------------------------------------------------ fake runtime
class ProgressServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """/progress for every fake pod: the pod is the local address it was reached on."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, step_seconds: float):
        self.step_seconds = step_seconds
        self.started: dict[str, float] = {}
        self.hits = Counter()
        super().__init__(("0.0.0.0", port), ProgressHandler)


class ProgressHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):  # quiet
        pass

    def do_GET(self):  # noqa: N802
        srv: ProgressServer = self.server  # type: ignore[assignment]
        ip = self.connection.getsockname()[0]
        srv.hits[ip] += 1
        t0 = srv.started.setdefault(ip, time.monotonic())
        step = int((time.monotonic() - t0) / srv.step_seconds)
        total = 100000
        body = json.dumps({"stage": "sft", "phase": "train", "step": step, "totalSteps": total, "epoch": step / 1000,
                           "loss": round(2.0 / (1 + step / 50), 4), "learningRate": 2e-4,
                           "etaSeconds": (total - step) * srv.step_seconds}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def pod_ip(i: int) -> str:
    return f"127.0.{1 + i // 250}.{1 + i % 250}"


class FakeKubelet(threading.Thread):
    """Watches the bench namespace's pods bound to the fake node: the pods of FineTuneJob i <
    `finish` exit 0 at once, the others run at their own 127.x address."""

    def __init__(self, client, finish: int):
        super().__init__(daemon=True)
        self.client, self.finish = client, finish
        self.stop = threading.Event()
        self.done: set[str] = set()
        self.pool = ThreadPoolExecutor(8)

    def run(self) -> None:
        rv = None
        while not self.stop.is_set():
            try:
                if rv is None:
                    listed = self.client.get(f"/api/v1/namespaces/{NS}/pods")
                    rv = listed["metadata"]["resourceVersion"]
                    for p in listed["items"]:
                        self._see(p)
                for ev in self.client.watch(f"/api/v1/namespaces/{NS}/pods", stop=self.stop, resourceVersion=rv,
                                            allowWatchBookmarks=True, timeoutSeconds=600):
                    obj = ev.get("object") or {}
                    rv = obj.get("metadata", {}).get("resourceVersion", rv)
                    if ev.get("type") == "ERROR":
                        rv = None
                        break
                    if ev.get("type") in ("ADDED", "MODIFIED"):
                        self._see(obj)
            except Exception:  # noqa: BLE001 — reopen
                if self.stop.is_set():
                    return
                time.sleep(0.2)

    def _see(self, pod: dict) -> None:
        meta, spec = pod["metadata"], pod.get("spec") or {}
        name = meta["name"]
        if spec.get("nodeName") != NODE or name in self.done or (pod.get("status") or {}).get("phase") in (
                "Succeeded", "Failed", "Running"):
            return
        self.done.add(name)
        job = (meta.get("labels") or {}).get("kubetune.io/job", "")
        i = int(job.rsplit("-", 1)[-1])
        self.pool.submit(self._set, name, pod, i)

    def _set(self, name: str, pod: dict, i: int) -> None:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        cname = pod["spec"]["containers"][0]["name"]
        if i < self.finish:
            state = {"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": now, "finishedAt": now}}
            status = {"phase": "Succeeded", "startTime": now, "podIP": pod_ip(i), "podIPs": [{"ip": pod_ip(i)}],
                      "conditions": [{"type": "Ready", "status": "False", "reason": "PodCompleted"}],
                      "containerStatuses": [{"name": cname, "ready": False, "restartCount": 0, "state": state,
                                             "image": "kubetune/runtime:bench", "imageID": "", "containerID": "fake://1"}]}
        else:
            status = {"phase": "Running", "startTime": now, "podIP": pod_ip(i), "podIPs": [{"ip": pod_ip(i)}],
                      "conditions": [{"type": "Ready", "status": "True"}, {"type": "ContainersReady", "status": "True"}],
                      "containerStatuses": [{"name": cname, "ready": True, "restartCount": 0, "started": True,
                                             "state": {"running": {"startedAt": now}},
                                             "image": "kubetune/runtime:bench", "imageID": "", "containerID": "fake://1"}]}
        for _ in range(5):
            try:
                self.client.patch(f"/api/v1/namespaces/{NS}/pods/{name}/status", {"status": status})
                return
            except Exception:  # noqa: BLE001
                time.sleep(0.5)


def make_node(client) -> None:
    cap = {"cpu": "10000", "memory": "100Ti", "pods": "10000", "nvidia.com/gpu": "10000"}
    node = client.post("/api/v1/nodes", {"apiVersion": "v1", "kind": "Node",
                                         "metadata": {"name": NODE, "labels": {"kubernetes.io/hostname": NODE}},
                                         "status": {"capacity": cap, "allocatable": cap}})
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    client.patch(f"/api/v1/nodes/{NODE}/status", {"status": {
        "capacity": cap, "allocatable": cap,
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "fake",
                        "lastHeartbeatTime": now, "lastTransitionTime": now}],
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}]}})
    if (node.get("spec") or {}).get("taints"):
        client.patch(f"/api/v1/nodes/{NODE}", {"spec": {"taints": None}})


class KueueKubelet(FakeKubelet):
    """The Kueue case's fake kubelet: every pod bound to the fake node runs `seconds`, then exits
    0. Records when each pod started and ended (this script's clock) and the most running at once."""

    def __init__(self, client, seconds: float):
        super().__init__(client, finish=0)
        self.seconds = seconds
        self.started: dict[str, float] = {}  # FineTuneJob → when its pod was made Running
        self.ended: dict[str, float] = {}
        self.running = 0
        self.peak = 0
        self.guard = threading.Lock()

    def _set(self, name: str, pod: dict, i: int) -> None:
        job = pod["metadata"]["labels"]["kubetune.io/job"]
        cname = pod["spec"]["containers"][0]["name"]
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with self.guard:
            self.running += 1
            self.peak = max(self.peak, self.running)
            self.started[job] = time.monotonic()
        self.client.patch(f"/api/v1/namespaces/{NS}/pods/{name}/status", {"status": {
            "phase": "Running", "startTime": now, "podIP": pod_ip(i), "podIPs": [{"ip": pod_ip(i)}],
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [{"name": cname, "ready": True, "restartCount": 0, "started": True,
                                   "state": {"running": {"startedAt": now}}, "image": "kubetune/runtime:bench",
                                   "imageID": "", "containerID": "fake://1"}]}})
        time.sleep(self.seconds)
        with self.guard:
            self.running -= 1
            self.ended[job] = time.monotonic()
        end = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.client.patch(f"/api/v1/namespaces/{NS}/pods/{name}/status", {"status": {
            "phase": "Succeeded", "conditions": [{"type": "Ready", "status": "False", "reason": "PodCompleted"}],
            "containerStatuses": [{"name": cname, "ready": False, "restartCount": 0, "image": "kubetune/runtime:bench",
                                   "imageID": "", "containerID": "fake://1",
                                   "state": {"terminated": {"exitCode": 0, "reason": "Completed",
                                                            "startedAt": now, "finishedAt": end}}}]}})


def run_kueue(args, work: Path) -> dict:
    """`--kueue-jobs` FineTuneJobs of 1 GPU each into a ClusterQueue of `--kueue-gpus` GPUs, with
    real Kueue (tests/cluster/kueue.py) and this checkout's operator."""
    from cluster.kueue import API, Kueue

    out: dict = {"case": "kueue", "jobs": args.kueue_jobs, "gpus": args.kueue_gpus, "pod_seconds": args.kueue_seconds}
    vdir = work / "kueue"
    vdir.mkdir()
    cp = ControlPlane(workdir=vdir / "cp", extra_args={
        "kube-controller-manager": ["--kube-api-qps=300", "--kube-api-burst=600", "--concurrent-job-syncs=20"],
        "kube-scheduler": ["--kube-api-qps=300", "--kube-api-burst=600"]})
    (vdir / "cp").mkdir()
    op = kubelet = kq = None
    watchers: list[Watcher] = []
    try:
        cp.start()
        client = cp.client()
        prepare_cluster(cp)
        kq = Kueue(cp)
        kq.start()
        base = f"/apis/{API}"
        client.post(f"{base}/resourceflavors", {"apiVersion": API, "kind": "ResourceFlavor", "metadata": {"name": "gpu"}})
        client.post(f"{base}/clusterqueues", {
            "apiVersion": API, "kind": "ClusterQueue", "metadata": {"name": "gpus"},
            "spec": {"namespaceSelector": {}, "queueingStrategy": "BestEffortFIFO", "resourceGroups": [{
                "coveredResources": ["cpu", "memory", "nvidia.com/gpu"],
                "flavors": [{"name": "gpu", "resources": [
                    {"name": "cpu", "nominalQuota": "10000"}, {"name": "memory", "nominalQuota": "100Ti"},
                    {"name": "nvidia.com/gpu", "nominalQuota": str(args.kueue_gpus)}]}]}]}})
        client.post(f"{base}/namespaces/{NS}/localqueues", {"apiVersion": API, "kind": "LocalQueue",
                                                             "metadata": {"name": "team"}, "spec": {"clusterQueue": "gpus"}})
        jobs_w = job_watcher(cp)
        watchers.append(jobs_w)
        start_watchers(watchers)
        op = BenchOperator(cp, vdir, args.poll_interval, free_port(), None)
        wait_for(op.healthy, 90, "operator /healthz")
        kubelet = KueueKubelet(cp.client(), args.kueue_seconds)
        kubelet.start()
        make_node(client)
        store = vdir / "store"
        (store / "saves").mkdir(parents=True)
        names = [f"ftj-{i:04d}" for i in range(args.kueue_jobs)]
        docs = []
        for n in names:
            d = ftj_doc(n, store)
            d["spec"]["resources"] = {"gpusPerNode": 1}
            d["spec"]["queueName"] = "team"
            docs.append(d)
        t0 = time.monotonic()
        create_all(cp, docs, 1)  # one client: a known arrival order
        out["create_s"] = round(time.monotonic() - t0, 1)

        def all_done() -> bool:
            ph = phases(client)
            print(f"[kueue]   phases {dict(ph)}; {len(kubelet.ended)} pods done, peak running {kubelet.peak} "
                  f"({time.monotonic() - t0:.0f}s)", flush=True)
            return ph.get("Succeeded", 0) >= len(names)

        wait_for(all_done, args.setup_timeout, "every queued FineTuneJob finished", interval=10)
        out["all_done_s"] = round(time.monotonic() - t0, 1)
        out["peak_running"] = kubelet.peak
        # admission order: the order the pods started against the order the Jobs were created
        job_order = sorted(jobs_w.seen, key=jobs_w.seen.get)
        start_order = sorted(kubelet.started, key=kubelet.started.get)
        rank = {n: i for i, n in enumerate(job_order)}
        inversions = sum(1 for a, b in zip(start_order, start_order[1:]) if rank[a] > rank[b])
        out["start_order_adjacent_inversions"] = inversions
        out["start_order_equals_job_order"] = start_order == job_order
        # from a GPU freeing (a pod's end) to the next pod's start
        ends = sorted(kubelet.ended.values())
        gaps = []
        for start in sorted(kubelet.started.values())[args.kueue_gpus:]:
            before = [e for e in ends if e <= start]
            if before:
                gaps.append(start - before[-1])
        out["gpu_free_to_next_start_s"] = {"p50": pct(gaps, 50) if gaps else None, "p95": pct(gaps, 95) if gaps else None,
                                           "max": max(gaps) if gaps else None, "n": len(gaps)}
        print(f"[kueue] {json.dumps(out)}", flush=True)
        return out
    finally:
        for w in watchers:
            w.stop.set()
        if kubelet:
            kubelet.stop.set()
        if op:
            op.stop()
            if args.keep_logs:
                shutil.copy(op.log_path, args.keep_logs / "operator-kueue.log")
        if kq:
            kq.stop()
        cp.stop()


# ------------------------------------------------------------------------------ audit log
def audit_counts(path: Path, t0: float, t1: float) -> Counter:
    """Requests completed in [t0, t1] (wall clock) by user agent (its product, before the '/')."""
    from datetime import datetime

    out: Counter = Counter()
    with open(path, errors="replace") as f:
        for line in f:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            ts = ev.get("stageTimestamp") or ev.get("requestReceivedTimestamp")
            if not ts:
                continue
            t = datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
            if t0 <= t <= t1:
                out[agent(ev.get("userAgent") or "")] += 1
    return out


def agent(ua: str) -> str:
    if ua.startswith("OpenAPI-Generator") or ua.startswith("kopf/"):
        return "operator (" + ua.split("/")[0] + ")"
    return ua.split("/")[0] or "?"


# ------------------------------------------------------------------------------ one variant
def create_all(cp: ControlPlane, docs: list[dict], clients: int) -> float:
    """POST every FineTuneJob with `clients` threads; returns the seconds it took."""
    path = f"{GROUP}/namespaces/{NS}/finetunejobs"
    local = threading.local()

    def post(doc):
        c = getattr(local, "c", None)
        if c is None:
            c = local.c = cp.client()
        for attempt in range(5):
            try:
                return c.post(path, doc)
            except Exception:  # noqa: BLE001 — 429 under load: again
                time.sleep(0.2 * (attempt + 1))
        raise RuntimeError(f"could not create {doc['metadata']['name']}")

    t0 = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(post, docs))
    return time.monotonic() - t0


def phases(client) -> Counter:
    items = client.get(f"{GROUP}/namespaces/{NS}/finetunejobs")["items"]
    return Counter((i.get("status") or {}).get("phase") or "-" for i in items)


def run_variant(label: str, pythonpath: Path | None, args, work: Path) -> dict:
    out: dict = {"variant": label}
    vdir = work / label
    vdir.mkdir()
    (vdir / "audit-policy.yaml").write_text(AUDIT_POLICY)
    audit = vdir / "audit.log"
    cp = ControlPlane(workdir=vdir / "cp", extra_args={
        "kube-apiserver": [f"--audit-policy-file={vdir / 'audit-policy.yaml'}", f"--audit-log-path={audit}",
                           "--audit-log-maxsize=0", "--audit-log-format=json"],
        "kube-controller-manager": ["--kube-api-qps=300", "--kube-api-burst=600", "--concurrent-job-syncs=20"],
        "kube-scheduler": ["--kube-api-qps=300", "--kube-api-burst=600"],
    })
    (vdir / "cp").mkdir()
    op = sampler = kubelet = progress = None
    watchers: list[Watcher] = []
    try:
        cp.start()
        client = cp.client()
        prepare_cluster(cp)
        jobs_w, ftj_w = job_watcher(cp), ftj_watcher(cp)
        watchers = [jobs_w, ftj_w]
        start_watchers(watchers)
        progress_port = free_port()
        progress = ProgressServer(progress_port, args.step_seconds)
        threading.Thread(target=progress.serve_forever, daemon=True).start()
        op = BenchOperator(cp, vdir, args.poll_interval, progress_port, pythonpath)
        wait_for(op.healthy, 90, "operator /healthz")
        out["operator_code"] = op.code()
        print(f"[{label}] operator up ({out['operator_code']})", flush=True)
        time.sleep(2.0)
        out["rss_idle_mb"] = proc_tree_rss_kb(op.proc.pid)[0] / 1024

        # ---- 1. the burst
        store = vdir / "store"
        (store / "saves").mkdir(parents=True)
        names = [f"ftj-{i:04d}" for i in range(args.jobs)]
        docs = [ftj_doc(n, store) for n in names]
        sampler = RssSampler(op.proc.pid)
        sampler.start()
        who = {"operator": op.proc.pid, "kube-apiserver": cp.procs["kube-apiserver"].pid, "etcd": cp.procs["etcd"].pid}
        cpu0 = {n: proc_tree_cpu_s(pid) for n, pid in who.items()}
        t0 = time.monotonic()
        took = create_all(cp, docs, args.clients)
        print(f"[{label}] {args.jobs} FineTuneJobs created in {took:.1f}s by {args.clients} clients", flush=True)
        all_ok = jobs_w.wait_all(set(names), args.timeout)
        t_end = time.monotonic()
        cpu1 = {n: proc_tree_cpu_s(pid) for n, pid in who.items()}
        got = [n for n in names if n in jobs_w.seen]
        lat = [jobs_w.seen[n] - t0 for n in got]
        latf = [jobs_w.seen[n] - ftj_w.seen.get(n, t0) for n in got]
        time.sleep(args.settle)
        sampler.stop.set()
        sampler.join(5)
        peak = max((s[1] for s in sampler.samples if s[0] >= t0), default=0) / 1024
        out["burst"] = {
            "jobs": args.jobs, "first_jobs": len(got), "all": all_ok, "create_s": round(took, 2),
            "from_ftj_added_s": {"p50": pct(latf, 50) if latf else None, "p95": pct(latf, 95) if latf else None,
                                 "max": max(latf) if latf else None},
            "from_create_start_s": {"p50": pct(lat, 50) if lat else None, "max": max(lat) if lat else None},
            "window_s": round(t_end - t0, 1),
            "cpu_cores_avg": {n: round((cpu1[n] - cpu0[n]) / (t_end - t0), 2) for n in who},
            "rss_peak_mb": round(peak, 1), "rss_after_mb": round(proc_tree_rss_kb(op.proc.pid)[0] / 1024, 1),
        }
        print(f"[{label}] burst: {json.dumps(out['burst'])}", flush=True)

        # ---- 2. steady state: 1,800 finished, 200 running
        finish = args.jobs - args.running
        kubelet = FakeKubelet(cp.client(), finish)
        kubelet.start()
        make_node(client)
        t_setup = time.monotonic()

        def settled() -> bool:
            ph = phases(client)
            print(f"[{label}]   phases {dict(ph)} ({time.monotonic() - t_setup:.0f}s)", flush=True)
            return ph.get("Succeeded", 0) >= finish and ph.get("Running", 0) >= args.running

        try:
            wait_for(settled, args.setup_timeout, "the steady state", interval=10)
            out["steady_reached"] = True
        except Exception as e:  # noqa: BLE001 — measured anyway, and said so
            out["steady_reached"] = False
            print(f"[{label}] steady state not reached in {args.setup_timeout:.0f}s ({e}); measuring anyway", flush=True)
        out["steady_setup_s"] = round(time.monotonic() - t_setup, 1)
        time.sleep(args.quiet)  # the last completions' reconciles and events settle
        hits0 = sum(progress.hits.values())
        cpu0 = {n: proc_tree_cpu_s(pid) for n, pid in who.items()}
        w0, m0 = time.time(), time.monotonic()
        time.sleep(args.steady)
        w1, m1 = time.time(), time.monotonic()
        cpu1 = {n: proc_tree_cpu_s(pid) for n, pid in who.items()}
        counts = audit_counts(audit, w0, w1)
        secs = m1 - m0
        op_req = sum(v for k, v in counts.items() if k.startswith("operator"))
        ph = phases(client)
        out["steady"] = {
            "seconds": round(secs, 1), "phases": dict(ph),
            "cpu_cores_avg": {n: round((cpu1[n] - cpu0[n]) / secs, 3) for n in who},
            "operator_requests_per_s": round(op_req / secs, 2),
            "requests_per_s_by_agent": {k: round(v / secs, 2) for k, v in counts.most_common()},
            "progress_polls_per_s": round((sum(progress.hits.values()) - hits0) / secs, 2),
            "rss_mb": round(proc_tree_rss_kb(op.proc.pid)[0] / 1024, 1),
        }
        print(f"[{label}] steady: {json.dumps(out['steady'])}", flush=True)
        return out
    finally:
        for w in watchers:
            w.stop.set()
        if kubelet:
            kubelet.stop.set()
        if sampler:
            sampler.stop.set()
        if progress:
            progress.shutdown()
            progress.server_close()
        if op:
            op.stop()
            if args.keep_logs:
                shutil.copy(op.log_path, args.keep_logs / f"operator-{label}.log")
        cp.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=2000, help="FineTuneJobs created at once (default 2000)")
    ap.add_argument("--running", type=int, default=200, help="of them, running in the steady state (default 200)")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients creating them (default 16)")
    ap.add_argument("--baseline", default=None, help="a commit whose operator runs first, for comparison")
    ap.add_argument("--only-baseline", action="store_true", help="measure the baseline only")
    ap.add_argument("--poll-interval", type=float, default=5.0, help="operator --poll-interval (default 5)")
    ap.add_argument("--step-seconds", type=float, default=3.0, help="the fake runtime's seconds per step (default 3)")
    ap.add_argument("--steady", type=float, default=300.0, help="seconds of steady state measured (default 300)")
    ap.add_argument("--quiet", type=float, default=30.0, help="seconds to wait before the steady window (default 30)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the burst's Jobs")
    ap.add_argument("--setup-timeout", type=float, default=900.0, help="seconds to reach the steady state")
    ap.add_argument("--settle", type=float, default=10.0, help="seconds of RSS sampling after the last Job")
    ap.add_argument("--kueue-jobs", type=int, default=0,
                    help="also run the Kueue case: this many FineTuneJobs of 1 GPU each (issue: 200)")
    ap.add_argument("--kueue-gpus", type=int, default=8, help="the ClusterQueue's GPUs (default 8)")
    ap.add_argument("--kueue-seconds", type=float, default=5.0, help="seconds each queued pod runs (default 5)")
    ap.add_argument("--skip-scale", action="store_true", help="only the Kueue case")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    ap.add_argument("--keep-logs", type=Path, default=None, help="copy the operators' logs into this folder")
    args = ap.parse_args()
    if args.keep_logs:
        args.keep_logs.mkdir(parents=True, exist_ok=True)

    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "operator", "runtime", "bench"],
                                capture_output=True, text=True).stdout.strip())
    result: dict = {"commit": commit, "uncommitted_changes": dirty,
                    "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                "python": platform.python_version(),
                                "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                                "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                                "loadavg_start": os.getloadavg()},
                    "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                    "goals": GOALS, "variants": []}
    print(f"commit {commit}{' (uncommitted changes!)' if dirty else ''}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="kubetune-clusterscale-"))
    try:
        if args.baseline and not args.skip_scale:
            path = baseline_tree(args.baseline, work)
            result["variants"].append(run_variant(f"baseline-{args.baseline}", path, args, work))
        if not args.only_baseline and not args.skip_scale:
            result["variants"].append(run_variant(f"this-{commit[:12]}", None, args, work))
        if args.kueue_jobs:
            result["kueue"] = run_kueue(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["machine"]["loadavg_end"] = os.getloadavg()

    def f(x, d=2):
        return "—" if x is None else f"{x:.{d}f}"

    print(f"\n{'':<26}" + "".join(f"{v['variant']:>26}" for v in result["variants"]))
    rows = [
        ("burst: first Job p50 s", lambda v: v["burst"]["from_ftj_added_s"]["p50"]),
        ("burst: first Job max s", lambda v: v["burst"]["from_ftj_added_s"]["max"]),
        ("burst: from create max s", lambda v: v["burst"]["from_create_start_s"]["max"]),
        ("burst: RSS peak MB", lambda v: v["burst"]["rss_peak_mb"]),
        ("burst: operator cores", lambda v: v["burst"]["cpu_cores_avg"]["operator"]),
        ("burst: apiserver cores", lambda v: v["burst"]["cpu_cores_avg"]["kube-apiserver"]),
        ("steady: operator cores", lambda v: v["steady"]["cpu_cores_avg"]["operator"]),
        ("steady: operator req/s", lambda v: v["steady"]["operator_requests_per_s"]),
        ("steady: apiserver cores", lambda v: v["steady"]["cpu_cores_avg"]["kube-apiserver"]),
        ("steady: polls/s", lambda v: v["steady"]["progress_polls_per_s"]),
    ]
    for name, get in rows:
        vals = []
        for v in result["variants"]:
            try:
                vals.append(f(get(v)))
            except (KeyError, TypeError):
                vals.append("—")
        print(f"{name:<26}" + "".join(f"{x:>26}" for x in vals))
    if "kueue" in result:
        k = result["kueue"]
        print(f"\nKueue: {k['jobs']} FineTuneJobs into {k['gpus']} GPUs: all done in {k['all_done_s']} s, "
              f"peak running {k['peak_running']}, start order = Job order: {k['start_order_equals_job_order']} "
              f"({k['start_order_adjacent_inversions']} adjacent inversions), GPU free → next pod start "
              f"p50 {f(k['gpu_free_to_next_start_s']['p50'])} s / p95 {f(k['gpu_free_to_next_start_s']['p95'])} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A process kubelet: runs the pods bound to one Node as local processes.

Run it as its own process (that is how the fixtures use it, through ``ProcessKubelet``)::

    PYTHONPATH=tests python -m cluster.kubelet --kubeconfig NODE.kubeconfig --node-name NAME --root DIR

What it does, like a kubelet:

* registers the Node (capacity/allocatable cpu, memory, pods, ephemeral-storage and
  ``nvidia.com/gpu``; Ready; addresses; the port of its log server), keeps its Lease in
  ``kube-node-lease`` fresh and re-posts the Ready condition;
* lists and watches the pods bound to the node; for each runs the init containers in order,
  then every container, each container's command + args as a local process;
* env from ``env`` (value, ``$(VAR)`` expansion, configMapKeyRef, secretKeyRef, fieldRef,
  resourceFieldRef) and ``envFrom`` (configMapRef, secretRef, prefix, optional), plus the
  ``KUBERNETES_SERVICE_*`` variables pointing at the real apiserver;
* volumes persistentVolumeClaim (a bound claim of a hostPath or local PersistentVolume: its
  host folder), configMap, secret, emptyDir, downwardAPI and projected (configMap, secret,
  downwardAPI, serviceAccountToken — a real TokenRequest bound to the pod, so the automatic
  ``kube-api-access`` volume gives pods a working in-cluster config) at their mount paths
  (subPath, readOnly), for that process only: see ``podexec.py`` (mount + UTS namespaces);
* ``status.podIP``: one loopback address per pod (127.0.x.y), also exported as ``POD_IP``;
* ``/etc/hosts`` per pod (bind-mounted): localhost and the pod's own names, and — in place of the
  cluster DNS this kubelet lacks — ``<hostname>.<subdomain>`` of the other pods of the same
  namespace and subdomain on this node, kept current as they come and go (so an Indexed Job's
  pods find each other by the names a headless Service would give them);
* pod status through ``pods/status``: Pending (waiting reasons), Running (containerStatuses,
  conditions), then Succeeded/Failed with exitCode, reason Completed/Error/StartError/
  DeadlineExceeded and the termination message (terminationMessagePath, and
  ``FallbackToLogsOnError``); restartPolicy OnFailure/Always restarts with backoff;
  ``activeDeadlineSeconds`` is enforced;
* on ``deletionTimestamp``: SIGTERM to the container's process group, SIGKILL after the grace
  period, terminal status, then delete with grace 0 and a UID precondition;
* logs: ``<root>/logs/<namespace>/<pod>/<container>.log`` (stdout and stderr together), served
  over HTTPS at ``/containerLogs/...`` so ``kubectl logs [-f]`` works through the apiserver.

What differs from a real kubelet (on purpose or for want of a container runtime):

* the image is ignored; the process runs in the kubelet's own Python environment and sees the
  host's filesystem apart from its volume mounts. ``python``/``python3`` as the command means
  ``sys.executable``; a container without ``command`` cannot start (the image's entrypoint is
  unknown) and fails with StartError. Without ``workingDir`` it runs in a per-container
  scratch directory. The environment starts from the kubelet's own (minus KUBECONFIG);
* mount points that do not exist on the host are created (empty) for the bind mount and
  removed again when no pod uses them; mounts are bind mounts, so atomic configMap updates
  (the ``..data`` symlink swap) and later refreshes of configMaps/secrets/tokens do not happen;
* no network namespace: the pod IP is an extra loopback address, ports are shared with the
  host, Services do not route, and no DNS server answers (only the ``/etc/hosts`` names above); no cgroups, so resources (and GPUs) are only accounted by the
  scheduler, never enforced; no probes (a running container is Ready), no lifecycle hooks,
  no ``kubectl exec``/``attach``/``port-forward``, no ``logs --previous``;
* it needs root (or unprivileged user namespaces) for the mount namespaces; with
  ``--no-namespaces`` volumes are not mounted at all (documented fallback, not used by tests).
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import decimal
import http.server
import json
import math
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "cluster"

from . import pki
from .kubeapi import ApiError, KubeClient

PODEXEC = str(Path(__file__).resolve().parent / "podexec.py")
MOUNT_STATE = os.environ.get("KUBETUNE_KUBELET_MOUNT_STATE") or (
    "/run/kubetune-process-kubelet-mounts.v2.json" if os.access("/run", os.W_OK) else
    os.path.join(os.environ.get("TMPDIR", "/tmp"), "kubetune-process-kubelet-mounts.v2.json"))
GPU = "nvidia.com/gpu"


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def log(msg: str) -> None:
    print(f"[kubelet {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- quantities and the downward API ---------------------------------------------------------
_SUFFIX = {"": 1, "m": decimal.Decimal("0.001"), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
           "E": 10**18, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def parse_quantity(q: Any) -> decimal.Decimal:
    m = re.fullmatch(r"([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)([a-zA-Z]*)", str(q).strip())
    if not m or m.group(2) not in _SUFFIX:
        raise ValueError(f"bad quantity {q!r}")
    return decimal.Decimal(m.group(1)) * decimal.Decimal(_SUFFIX[m.group(2)])


def _format_map(d: dict[str, str]) -> str:
    return "\n".join(f'{k}="{v}"' for k, v in sorted((d or {}).items()))


def field_value(pod: dict, path: str) -> str:
    md, spec, st = pod["metadata"], pod["spec"], pod.get("status", {})
    m = re.fullmatch(r"metadata\.(labels|annotations)\['(.*)'\]", path)
    if m:
        return (md.get(m.group(1)) or {}).get(m.group(2), "")
    simple = {
        "metadata.name": md.get("name", ""), "metadata.namespace": md.get("namespace", ""),
        "metadata.uid": md.get("uid", ""), "metadata.labels": _format_map(md.get("labels")),
        "metadata.annotations": _format_map(md.get("annotations")),
        "spec.nodeName": spec.get("nodeName", ""), "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.hostIP": st.get("hostIP", ""), "status.podIP": st.get("podIP", ""),
        "status.hostIPs": ",".join(i["ip"] for i in st.get("hostIPs", [])),
        "status.podIPs": ",".join(i["ip"] for i in st.get("podIPs", [])),
    }
    if path not in simple:
        raise ValueError(f"unsupported fieldRef {path}")
    return simple[path]


def resource_value(pod: dict, default_container: str | None, ref: dict, node_alloc: dict) -> str:
    cname = ref.get("containerName") or default_container
    c = next(c for c in pod["spec"]["containers"] + pod["spec"].get("initContainers", []) if c["name"] == cname)
    kind, _, res = ref["resource"].partition(".")
    res_block = (c.get("resources") or {})
    val = (res_block.get(kind) or {}).get(res)
    if val is None and kind == "requests":
        val = (res_block.get("limits") or {}).get(res)
    if val is None:
        val = node_alloc.get(res, "0")
    divisor = parse_quantity(ref.get("divisor") or "1")
    if divisor == 0:
        divisor = decimal.Decimal(1)
    return str(math.ceil(parse_quantity(val) / divisor))


def expand(s: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: $$ escapes, unknown references stay as written."""
    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", sub, s)


class NotReady(Exception):
    """A referenced object is missing or not yet readable: retry (CreateContainerConfigError)."""


# --- the kubelet -----------------------------------------------------------------------------
class Kubelet:
    def __init__(self, client: KubeClient, node_name: str, root: Path, capacity: dict[str, str],
                 namespaces: bool = True, ip_block: int = 10):
        self.client = client
        self.node = node_name
        self.root = root
        self.capacity = capacity
        self.namespaces = namespaces
        self.workers: dict[str, PodWorker] = {}
        self.done: set[str] = set()  # UIDs whose pods this kubelet has finished: never run again
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.ips_free = [f"127.{ip_block}.{i // 250}.{i % 250 + 2}" for i in range(1000)]
        self.my_mounts: dict[str, int] = {}
        self.log_port = 0
        self.hosts: dict[str, tuple] = {}  # pod uid -> (ip, names, hosts file, namespace, subdomain)
        self.api_host = client.host
        self.api_port = client.port
        (root / "pods").mkdir(parents=True, exist_ok=True)
        (root / "logs").mkdir(parents=True, exist_ok=True)

    # -- node, lease --------------------------------------------------------------------------
    def node_status(self) -> dict:
        t = now()
        conds = [
            {"type": "MemoryPressure", "status": "False", "reason": "KubeletHasSufficientMemory"},
            {"type": "DiskPressure", "status": "False", "reason": "KubeletHasNoDiskPressure"},
            {"type": "PIDPressure", "status": "False", "reason": "KubeletHasSufficientPID"},
            {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "process kubelet is posting ready status"},
        ]
        for c in conds:
            c.update(lastHeartbeatTime=t, lastTransitionTime=getattr(self, "_ready_since", t))
        self._ready_since = getattr(self, "_ready_since", t)
        return {
            "capacity": dict(self.capacity), "allocatable": dict(self.capacity), "conditions": conds,
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": self.node}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.log_port}},
            "nodeInfo": {"machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": os.uname().release,
                         "osImage": "kubetune process kubelet", "containerRuntimeVersion": "process://1",
                         "kubeletVersion": self.server_version, "kubeProxyVersion": "",
                         "operatingSystem": "linux", "architecture": "amd64"},
        }

    def register(self) -> None:
        self.server_version = self.client.get("/version")["gitVersion"]
        body = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": self.node, "labels": {
                    "kubernetes.io/hostname": self.node, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                    "kubetune.io/process-kubelet": "true"}},
                "spec": {}, "status": self.node_status()}
        try:
            self.client.post("/api/v1/nodes", body)
        except ApiError as e:
            if e.status != 409:
                raise
        self.post_node_status()
        log(f"registered node {self.node} (logs on :{self.log_port})")

    def post_node_status(self) -> None:
        self.client.patch(f"/api/v1/nodes/{self.node}/status", {"status": self.node_status()}, kind="strategic")

    def heartbeat_loop(self) -> None:
        path = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases"
        last_status = time.monotonic()
        while not self.stopping.is_set():
            try:
                try:
                    self.client.patch(f"{path}/{self.node}", {"spec": {"renewTime": now_micro(), "holderIdentity": self.node}})
                except ApiError as e:
                    if e.status != 404:
                        raise
                    node = self.client.get(f"/api/v1/nodes/{self.node}")
                    self.client.post(path, {"metadata": {"name": self.node, "ownerReferences": [{
                        "apiVersion": "v1", "kind": "Node", "name": self.node, "uid": node["metadata"]["uid"]}]},
                        "spec": {"holderIdentity": self.node, "leaseDurationSeconds": 40, "renewTime": now_micro()}})
                if time.monotonic() - last_status > 30:
                    self.post_node_status()
                    last_status = time.monotonic()
            except Exception as e:  # noqa: BLE001 - keep beating
                log(f"heartbeat: {e}")
            self.stopping.wait(10)

    # -- pods ---------------------------------------------------------------------------------
    def run(self) -> None:
        self.start_log_server()
        self.register()
        threading.Thread(target=self.heartbeat_loop, daemon=True, name="heartbeat").start()
        sel = f"spec.nodeName={self.node}"
        while not self.stopping.is_set():
            try:
                lst = self.client.get("/api/v1/pods", fieldSelector=sel)
                seen = set()
                for pod in lst["items"]:
                    seen.add(pod["metadata"]["uid"])
                    self.dispatch(pod)
                with self.lock:
                    gone = [uid for uid in self.workers if uid not in seen]
                for uid in gone:
                    self.workers[uid].gone()
                rv = lst["metadata"]["resourceVersion"]
                while not self.stopping.is_set():
                    for ev in self.client.watch("/api/v1/pods", fieldSelector=sel, resourceVersion=rv,
                                                allowWatchBookmarks=True, timeoutSeconds=300):
                        obj = ev["object"]
                        if ev["type"] == "ERROR":
                            raise ApiError(obj.get("code", 500), obj, "WATCH", "/api/v1/pods")
                        rv = obj["metadata"]["resourceVersion"]
                        if ev["type"] in ("ADDED", "MODIFIED"):
                            self.dispatch(obj)
                        elif ev["type"] == "DELETED":
                            w = self.workers.get(obj["metadata"]["uid"])
                            if w:
                                w.gone()
            except Exception as e:  # noqa: BLE001 - relist after any watch failure
                if not self.stopping.is_set():
                    if not (isinstance(e, ApiError) and e.status == 410):
                        log(f"watch: {e!r}; relisting")
                    time.sleep(0.5)

    def dispatch(self, pod: dict) -> None:
        uid = pod["metadata"]["uid"]
        with self.lock:
            w = self.workers.get(uid)
            if w is None:
                if uid in self.done:
                    md = pod["metadata"]
                    if md.get("deletionTimestamp") and md.get("deletionGracePeriodSeconds") != 0:
                        threading.Thread(target=self.delete_pod_now, args=(pod,), daemon=True).start()
                    return
                phase = pod.get("status", {}).get("phase")
                if phase in ("Succeeded", "Failed"):
                    if pod["metadata"].get("deletionTimestamp") and pod["metadata"].get("deletionGracePeriodSeconds") != 0:
                        threading.Thread(target=self.delete_pod_now, args=(pod,), daemon=True).start()
                    return
                w = self.workers[uid] = PodWorker(self, pod)
                w.thread.start()
                return
        w.update(pod)

    def delete_pod_now(self, pod: dict) -> None:
        md = pod["metadata"]
        try:
            self.client.delete(f"/api/v1/namespaces/{md['namespace']}/pods/{md['name']}",
                               {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0,
                                "preconditions": {"uid": md["uid"]}})
        except ApiError as e:
            if e.status not in (404, 409):
                log(f"delete {md['namespace']}/{md['name']}: {e}")

    # /etc/hosts of each pod: localhost, the pod's own names, and — standing in for cluster DNS,
    # which this kubelet does not have — `<hostname>.<subdomain>` of every pod of the same
    # namespace and subdomain on this node (what a headless Service gives an Indexed Job's pods).
    # Each file is rewritten in place when a peer comes or goes, so the bind mount sees it.
    def add_hosts(self, pod: dict, ip: str, path: Path) -> None:
        md, spec = pod["metadata"], pod["spec"]
        hostname = (spec.get("hostname") or md["name"])[:63]
        names = [hostname]
        if spec.get("subdomain"):
            fqdn = f"{hostname}.{spec['subdomain']}.{md['namespace']}.svc.cluster.local"
            names = [fqdn, f"{hostname}.{spec['subdomain']}", hostname]
        with self.lock:
            self.hosts[md["uid"]] = (ip, names, path, md["namespace"], spec.get("subdomain"))
        path.write_text("")
        self.write_hosts()

    def remove_hosts(self, uid: str) -> None:
        with self.lock:
            self.hosts.pop(uid, None)
        self.write_hosts()

    def write_hosts(self) -> None:
        with self.lock:
            entries = list(self.hosts.values())
        for ip, names, path, ns, sub in entries:
            lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback", f"{ip}\t{' '.join(names)}"]
            if sub:
                lines += [f"{pip}\t{' '.join(pnames[:2])}" for pip, pnames, _, pns, psub in entries
                          if (pns, psub) == (ns, sub) and pip != ip]
            try:
                with open(path, "r+") as f:  # in place: the pod's bind mount follows this inode
                    f.truncate(0)
                    f.write("# process kubelet\n" + "\n".join(lines) + "\n")
            except OSError:
                continue

    def alloc_ip(self) -> str:
        with self.lock:
            return self.ips_free.pop(0)

    def free_ip(self, ip: str) -> None:
        with self.lock:
            if ip and ip not in self.ips_free:
                self.ips_free.append(ip)

    # Mount points that do not exist on the host are created for the bind mount and removed
    # when no pod uses them any more. Several process kubelets (one per test session) may run
    # on one host, so the reference counts live in one host-wide file under an flock.
    def _mount_state(self):
        import contextlib
        import fcntl

        @contextlib.contextmanager
        def state():
            with self.lock, open(MOUNT_STATE + ".lock", "a") as lk:
                fcntl.flock(lk, fcntl.LOCK_EX)
                try:
                    data = json.loads(Path(MOUNT_STATE).read_text())
                except (OSError, ValueError):
                    data = {}
                yield data
                tmp = f"{MOUNT_STATE}.{os.getpid()}"
                Path(tmp).write_text(json.dumps(data))
                os.replace(tmp, MOUNT_STATE)
        return state()

    def acquire_mount_point(self, target: str, is_file: bool) -> None:
        with self._mount_state() as st:
            targets, created = st.setdefault("targets", {}), st.setdefault("created", [])
            targets[target] = targets.get(target, 0) + 1
            self.my_mounts[target] = self.my_mounts.get(target, 0) + 1
            if os.path.lexists(target):
                return
            p = Path(target)
            for parent in reversed(p.parents):
                if not parent.exists():
                    parent.mkdir(exist_ok=True)
                    created.append(str(parent))
            if is_file:
                p.touch(exist_ok=True)
            else:
                p.mkdir(exist_ok=True)
            created.append(target)

    def release_mount_point(self, target: str) -> None:
        with self._mount_state() as st:
            targets, created = st.setdefault("targets", {}), st.setdefault("created", [])
            self.my_mounts[target] = self.my_mounts.get(target, 1) - 1
            if not self.my_mounts[target]:
                del self.my_mounts[target]
            if target in targets:
                targets[target] -= 1
                if targets[target] <= 0:
                    del targets[target]
            # remove every path we created that no live mount point is at or below
            for path in sorted(set(created), key=len, reverse=True):
                prefix = path.rstrip("/") + "/"
                if any(t == path or t.startswith(prefix) for t in targets):
                    continue
                try:
                    if os.path.isdir(path) and not os.path.islink(path):
                        os.rmdir(path)
                    elif os.path.lexists(path):
                        os.unlink(path)
                except OSError:
                    continue  # not empty: someone else put something there; leave it
                created.remove(path)

    def shutdown(self) -> None:
        self.stopping.set()
        for w in list(self.workers.values()):
            w.kill_all(grace=1.0)
        for w in list(self.workers.values()):
            w.cleanup()

    # -- container logs over HTTPS (for kubectl logs via the apiserver) -----------------------
    def log_path(self, ns: str, pod: str, container: str) -> Path:
        return self.root / "logs" / ns / pod / f"{container}.log"

    def start_log_server(self) -> None:
        kubelet = self
        crt, key = pki.self_signed_server(self.root, "kubelet-serving")

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_GET(self):  # noqa: N802
                u = urllib.parse.urlparse(self.path)
                q = urllib.parse.parse_qs(u.query)
                parts = u.path.strip("/").split("/")
                if u.path in ("/healthz", "/healthz/"):
                    return self._send(200, b"ok")
                if len(parts) != 4 or parts[0] != "containerLogs":
                    return self._send(404, b"not found")
                _, ns, name, container = parts
                p = kubelet.log_path(ns, name, container)
                if not p.exists():
                    return self._send(404, f"no logs for container {container} of pod {ns}/{name}".encode())
                data = p.read_bytes()
                if "tailLines" in q:
                    n = int(q["tailLines"][0])
                    lines = data.splitlines(keepends=True)
                    data = b"".join(lines[-n:]) if n > 0 else b""
                if "limitBytes" in q:
                    data = data[: int(q["limitBytes"][0])]
                follow = q.get("follow", ["false"])[0] == "true"
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(data)
                self.wfile.flush()
                if not follow:
                    return
                offset = p.stat().st_size
                while True:
                    running = kubelet.container_running(ns, name, container)
                    with open(p, "rb") as f:
                        f.seek(offset)
                        chunk = f.read()
                    if chunk:
                        offset += len(chunk)
                        self.wfile.write(chunk)
                        self.wfile.flush()
                    elif not running:
                        return
                    time.sleep(0.2)

            def _send(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        srv.daemon_threads = True
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(crt), str(key))
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
        self.log_port = srv.server_address[1]
        threading.Thread(target=srv.serve_forever, daemon=True, name="log-server").start()

    def container_running(self, ns: str, name: str, container: str) -> bool:
        for w in list(self.workers.values()):
            md = w.pod["metadata"]
            if md["namespace"] == ns and md["name"] == name and not w.finished:
                return container in w.procs and w.procs[container].poll() is None
        return False


class Container:
    def __init__(self, spec: dict, init: bool):
        self.spec = spec
        self.name = spec["name"]
        self.init = init
        self.sidecar = init and spec.get("restartPolicy") == "Always"
        self.state: dict = {"waiting": {"reason": "ContainerCreating"}}
        self.last_state: dict = {}
        self.restarts = 0
        self.started_at = ""
        self.exit_code: int | None = None
        self.next_start = 0.0
        self.container_id = ""


class PodWorker:
    def __init__(self, kubelet: Kubelet, pod: dict):
        self.k = kubelet
        self.pod = pod
        md = pod["metadata"]
        self.ns, self.name, self.uid = md["namespace"], md["name"], md["uid"]
        self.api = f"/api/v1/namespaces/{self.ns}/pods/{self.name}"
        self.dir = kubelet.root / "pods" / self.uid
        self.cond = threading.Condition()
        self.deleted = False
        self.finished = False
        self.procs: dict[str, subprocess.Popen] = {}
        self.ip = ""
        self.mount_targets: list[str] = []
        self.containers = [Container(c, True) for c in pod["spec"].get("initContainers", [])] + \
                          [Container(c, False) for c in pod["spec"]["containers"]]
        self.start_time = ""
        self.thread = threading.Thread(target=self.main, daemon=True, name=f"pod-{self.ns}-{self.name}")
        self.last_written: Any = None
        self.terminal_reason: tuple[str, str] | None = None

    # -- events from the watch ----------------------------------------------------------------
    def update(self, pod: dict) -> None:
        with self.cond:
            self.pod = pod
            self.cond.notify_all()

    def gone(self) -> None:
        with self.cond:
            self.deleted = True
            self.cond.notify_all()

    def deleting(self) -> bool:
        return self.deleted or bool(self.pod["metadata"].get("deletionTimestamp"))

    def wait(self, seconds: float) -> None:
        with self.cond:
            self.cond.wait(seconds)

    # -- the lifecycle ------------------------------------------------------------------------
    def main(self) -> None:
        try:
            self._main()
        except Exception as e:  # noqa: BLE001 - a broken worker must not kill the kubelet
            log(f"pod {self.ns}/{self.name}: worker crashed: {e!r}")
            import traceback
            traceback.print_exc()
            self.kill_all(grace=1.0)
            self.terminal_reason = ("ProcessKubeletError", f"the process kubelet failed: {e!r}")
            try:
                self.write_status(terminal=True)
            except Exception as e2:  # noqa: BLE001
                log(f"pod {self.ns}/{self.name}: could not write the failure: {e2!r}")
        finally:
            self.cleanup()
            self.finished = True
            with self.k.lock:
                self.k.done.add(self.uid)
                self.k.workers.pop(self.uid, None)

    def _main(self) -> None:
        self.start_time = now()
        self.ip = self.k.alloc_ip()
        self.hosts_file = self.dir / "etc-hosts"
        if not self.pod["spec"].get("hostNetwork"):
            self.dir.mkdir(parents=True, exist_ok=True)
            self.k.add_hosts(self.pod, self.ip, self.hosts_file)
        (self.dir / "volumes").mkdir(parents=True, exist_ok=True)
        logdir = self.k.root / "logs" / self.ns / self.name
        if logdir.exists():
            shutil.rmtree(logdir, ignore_errors=True)  # a new pod with the same name
        logdir.mkdir(parents=True, exist_ok=True)
        (logdir / ".containers").write_text(json.dumps([c["name"] for c in self.pod["spec"]["containers"]]))
        deadline = self.pod["spec"].get("activeDeadlineSeconds")
        t_start = time.monotonic()
        self.write_status()

        # volumes and env need the referenced objects; wait for them like the kubelet does
        while True:
            if self.deleting():
                return self.finish_deleted()
            try:
                self.volumes = self.prepare_volumes()
                break
            except NotReady as e:
                for c in self.containers:
                    c.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(e)}}
                self.write_status()
                self.wait(1.0)

        restart_policy = self.pod["spec"].get("restartPolicy", "Always")
        init = [c for c in self.containers if c.init]
        main = [c for c in self.containers if not c.init]
        phase_init = True
        while True:
            if self.deleting():
                return self.finish_deleted()
            if deadline is not None and time.monotonic() - t_start > deadline:
                self.terminal_reason = ("DeadlineExceeded", "Pod was active on the node longer than the specified deadline")
                self.kill_all(grace=float(self.pod["spec"].get("terminationGracePeriodSeconds", 30)))
                self.write_status(terminal=True)
                return
            self.reap(restart_policy)
            if phase_init:
                for c in init:
                    if c.sidecar and "running" not in c.state and c.exit_code is None:
                        self.start(c)
                    if c.sidecar:
                        continue
                    if c.exit_code == 0:
                        continue
                    if c.exit_code is not None:
                        if restart_policy == "Never":
                            self.kill_all(grace=1.0)
                            self.write_status(terminal=True)
                            return
                        break  # waiting for its restart
                    if "running" not in c.state and time.monotonic() >= c.next_start:
                        self.start(c)
                    break
                else:
                    phase_init = False
                    for c in main:
                        self.start(c)
            else:
                for c in main:
                    if c.exit_code is not None and "running" not in c.state and self.should_restart(c, restart_policy) \
                            and time.monotonic() >= c.next_start:
                        self.start(c)
                if all(c.exit_code is not None and not self.should_restart(c, restart_policy) for c in main):
                    self.kill_all(grace=float(self.pod["spec"].get("terminationGracePeriodSeconds", 30)), only_running=True)
                    self.write_status(terminal=True)
                    return
            self.write_status()
            self.wait(0.2)

    @staticmethod
    def should_restart(c: Container, policy: str) -> bool:
        return policy == "Always" or (policy == "OnFailure" and c.exit_code != 0)

    def reap(self, restart_policy: str) -> None:
        for c in self.containers:
            p = self.procs.get(c.name)
            if p is None or "running" not in c.state:
                continue
            rc = p.poll()
            if rc is None:
                continue
            self.terminated(c, rc)
            if (c.init and not c.sidecar and rc != 0 and restart_policy != "Never") or \
                    (not c.init and self.should_restart(c, restart_policy)) or c.sidecar:
                c.next_start = time.monotonic() + min(10.0, 2.0 ** min(c.restarts, 4) / 2)
                if c.init and not c.sidecar:
                    c.exit_code = None  # run it again
                    c.restarts += 1
                    c.last_state = {"terminated": c.state["terminated"]}
                    c.state = {"waiting": {"reason": "CrashLoopBackOff"}}

    def terminated(self, c: Container, rc: int) -> None:
        code = rc if rc >= 0 else 128 - rc
        start_error = self.dir / f"{c.name}.start-error"
        reason = "Completed" if code == 0 else "Error"
        message = self.termination_message(c, code)
        if start_error.exists():
            reason, message = "StartError", start_error.read_text()
            start_error.unlink()
        term = {"exitCode": code, "reason": reason, "startedAt": c.started_at, "finishedAt": now(),
                "containerID": c.container_id}
        if rc < 0:
            term["signal"] = -rc
        if message:
            term["message"] = message
        c.state = {"terminated": term}
        c.exit_code = code
        log(f"pod {self.ns}/{self.name} container {c.name} exited {code} ({reason})")

    def termination_message(self, c: Container, code: int) -> str:
        msg = ""
        f = self.dir / "containers" / c.name / "termination-log"
        if f.exists():
            msg = f.read_bytes()[:4096].decode(errors="replace")
        if not msg and code != 0 and c.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            lp = self.k.log_path(self.ns, self.name, c.name)
            if lp.exists():
                lines = lp.read_bytes().splitlines()[-80:]
                msg = b"\n".join(lines)[-2048:].decode(errors="replace")
        return msg

    def start(self, c: Container) -> None:
        spec = c.spec
        if c.exit_code is not None and "terminated" in c.state:
            c.last_state = {"terminated": c.state["terminated"]}
            c.restarts += 1
        c.exit_code = None
        cdir = self.dir / "containers" / c.name
        cdir.mkdir(parents=True, exist_ok=True)
        term_file = cdir / "termination-log"
        term_file.write_bytes(b"")
        start_error = self.dir / f"{c.name}.start-error"
        try:
            env = self.container_env(spec)
        except NotReady as e:  # a referenced key appeared missing after the volumes were fine
            c.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(e)}}
            c.exit_code = None
            return
        command = [expand(a, env) for a in spec.get("command") or []]
        args = [expand(a, env) for a in spec.get("args") or []]
        argv = command + args
        if not command:
            argv = ["/nonexistent/image-entrypoint"]
            start_error.write_text("the process kubelet needs a command: the image's entrypoint is unknown")
        elif os.path.basename(argv[0]) in ("python", "python3") or argv[0] == sys.executable:
            argv[0] = sys.executable
        mounts = []
        if self.k.namespaces:
            for vm in spec.get("volumeMounts") or []:
                src = self.volumes.get(vm["name"])
                if src is None:
                    continue
                if vm.get("subPath"):
                    src = Path(src) / expand(vm["subPath"], env)
                    if not src.exists():
                        src.mkdir(parents=True)
                mounts.append({"source": str(src), "target": vm["mountPath"], "readOnly": bool(vm.get("readOnly")),
                               "isFile": Path(src).is_file()})
            if self.hosts_file.exists():
                mounts.append({"source": str(self.hosts_file), "target": "/etc/hosts", "readOnly": True, "isFile": True})
            tpath = spec.get("terminationMessagePath") or "/dev/termination-log"
            mounts.append({"source": str(term_file), "target": tpath, "readOnly": False, "isFile": True})
        for m in mounts:
            self.k.acquire_mount_point(m["target"], m["isFile"])
            self.mount_targets.append(m["target"])
        workdir = spec.get("workingDir") or str(cdir / "work")
        Path(workdir).mkdir(parents=True, exist_ok=True)
        hostname = (self.pod["spec"].get("hostname") or self.name)[:63]
        pspec = {"argv": argv, "env": env, "cwd": workdir, "mounts": mounts, "hostname": hostname,
                 "namespaces": self.k.namespaces, "start_error_file": str(start_error), "parent_pid": os.getpid()}
        spec_file = cdir / "spec.json"
        spec_file.write_text(json.dumps(pspec))
        logf = open(self.k.log_path(self.ns, self.name, c.name), "ab")
        try:
            p = subprocess.Popen([sys.executable, PODEXEC, str(spec_file)], stdout=logf, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True, close_fds=True)
        finally:
            logf.close()
        self.procs[c.name] = p
        c.started_at = now()
        c.container_id = f"process://{p.pid}"
        c.state = {"running": {"startedAt": c.started_at}}
        log(f"pod {self.ns}/{self.name} container {c.name} started pid {p.pid}: {argv[:6]}")

    def kill_all(self, grace: float, only_running: bool = False) -> None:
        live = {n: p for n, p in self.procs.items() if p.poll() is None}
        for p in live.values():
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        end = time.monotonic() + grace
        while time.monotonic() < end and any(p.poll() is None for p in live.values()):
            time.sleep(0.05)
        for p in live.values():
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
        for c in self.containers:
            if c.name in live and "running" in c.state:
                self.terminated(c, live[c.name].returncode if live[c.name].returncode is not None else -9)

    def finish_deleted(self) -> None:
        grace = self.pod["metadata"].get("deletionGracePeriodSeconds")
        if grace is None:
            grace = self.pod["spec"].get("terminationGracePeriodSeconds", 30)
        if self.deleted:
            grace = min(grace, 2)  # the object is already gone (force delete): do not linger
        log(f"pod {self.ns}/{self.name} deleted: killing with grace {grace}s")
        self.kill_all(grace=float(grace))
        for c in self.containers:
            if "terminated" not in c.state:
                c.state = {"terminated": {"exitCode": 137, "reason": "ContainerStatusUnknown",
                                          "message": "The container could not be located when the pod was deleted",
                                          "finishedAt": now()}}
                c.exit_code = 137
        if not self.deleted:
            self.write_status(terminal=True)
            self.k.delete_pod_now(self.pod)

    def cleanup(self) -> None:
        self.k.remove_hosts(self.uid)
        targets, self.mount_targets = self.mount_targets, []
        for t in targets:
            self.k.release_mount_point(t)
        self.k.free_ip(self.ip)
        shutil.rmtree(self.dir / "volumes", ignore_errors=True)

    # -- env and volumes ----------------------------------------------------------------------
    def read_object(self, kind: str, name: str, optional: bool) -> dict | None:
        path = f"/api/v1/namespaces/{self.ns}/{kind}/{name}"
        try:
            return self.k.client.get(path)
        except ApiError as e:
            # 403: the Node authorizer has not yet seen the pod -> object edge; retry
            if e.status == 404 and optional:
                return None
            raise NotReady(f"{kind[:-1]} {name!r} not found" if e.status == 404 else str(e)) from e

    @staticmethod
    def obj_data(obj: dict | None, kind: str) -> dict[str, bytes]:
        if obj is None:
            return {}
        if kind == "secrets":
            return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        out = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        out.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        return out

    def container_env(self, spec: dict) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG",)}
        env.update({
            "HOSTNAME": (self.pod["spec"].get("hostname") or self.name)[:63],
            "POD_IP": self.ip,
            "KUBERNETES_SERVICE_HOST": self.k.api_host, "KUBERNETES_SERVICE_PORT": str(self.k.api_port),
            "KUBERNETES_SERVICE_PORT_HTTPS": str(self.k.api_port),
            "KUBERNETES_PORT": f"tcp://{self.k.api_host}:{self.k.api_port}",
        })
        pod_env: dict[str, str] = {}
        for src in spec.get("envFrom") or []:
            prefix = src.get("prefix", "")
            for kind, key in (("configmaps", "configMapRef"), ("secrets", "secretRef")):
                if key in src:
                    ref = src[key]
                    data = self.obj_data(self.read_object(kind, ref["name"], bool(ref.get("optional"))), kind)
                    for k, v in data.items():
                        pod_env[prefix + k] = v.decode(errors="replace")
        for e in spec.get("env") or []:
            name = e["name"]
            if "valueFrom" not in e:
                pod_env[name] = expand(e.get("value", ""), {**env, **pod_env})
                continue
            vf = e["valueFrom"]
            if "fieldRef" in vf:
                pod_env[name] = field_value(self.pod_with_ip(), vf["fieldRef"]["fieldPath"])
            elif "resourceFieldRef" in vf:
                pod_env[name] = resource_value(self.pod, spec["name"], vf["resourceFieldRef"], self.k.capacity)
            else:
                for kind, key in (("configmaps", "configMapKeyRef"), ("secrets", "secretKeyRef")):
                    if key in vf:
                        ref = vf[key]
                        data = self.obj_data(self.read_object(kind, ref["name"], bool(ref.get("optional"))), kind)
                        if ref["key"] in data:
                            pod_env[name] = data[ref["key"]].decode(errors="replace")
                        elif not ref.get("optional"):
                            raise NotReady(f"couldn't find key {ref['key']} in {kind[:-1]} {self.ns}/{ref['name']}")
        env.update(pod_env)
        return env

    def pod_with_ip(self) -> dict:
        p = dict(self.pod)
        st = dict(p.get("status") or {})
        st.update(podIP=self.ip, podIPs=[{"ip": self.ip}], hostIP="127.0.0.1", hostIPs=[{"ip": "127.0.0.1"}])
        p["status"] = st
        return p

    @staticmethod
    def _write_files(base: Path, files: dict[str, bytes], items: list | None, default_mode: int | None) -> None:
        if items:
            chosen = {it["path"]: (files[it["key"]], it.get("mode")) for it in items if it["key"] in files}
        else:
            chosen = {k: (v, None) for k, v in files.items()}
        for rel, (data, mode) in chosen.items():
            p = base / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
            p.chmod(mode if mode is not None else (default_mode if default_mode is not None else 0o644))

    def _source_files(self, kind: str, src: dict, key: str) -> dict[str, bytes]:
        name = src.get("name") or src.get("secretName")
        obj = self.read_object(kind, name, bool(src.get("optional")))
        files = self.obj_data(obj, kind)
        for it in src.get("items") or []:
            if it["key"] not in files and obj is not None and not src.get("optional"):
                raise NotReady(f"configmap/secret {name} has no key {it['key']}")
        return files

    def _downward_files(self, items: list) -> dict[str, bytes]:
        out = {}
        for it in items:
            if "fieldRef" in it:
                out[it["path"]] = field_value(self.pod_with_ip(), it["fieldRef"]["fieldPath"]).encode()
            elif "resourceFieldRef" in it:
                out[it["path"]] = resource_value(self.pod, None, it["resourceFieldRef"], self.k.capacity).encode()
        return out

    def _token(self, src: dict) -> bytes:
        sa = self.pod["spec"].get("serviceAccountName") or "default"
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "spec": {"expirationSeconds": int(src.get("expirationSeconds") or 3607),
                         "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": self.name, "uid": self.uid}}}
        if src.get("audience"):
            body["spec"]["audiences"] = [src["audience"]]
        try:
            tr = self.k.client.post(f"/api/v1/namespaces/{self.ns}/serviceaccounts/{sa}/token", body)
        except ApiError as e:
            raise NotReady(f"token for serviceaccount {sa}: {e}") from e
        return tr["status"]["token"].encode()

    def prepare_volumes(self) -> dict[str, str]:
        out = {}
        for v in self.pod["spec"].get("volumes") or []:
            if "persistentVolumeClaim" in v:
                out[v["name"]] = self._claimed_path(v["persistentVolumeClaim"]["claimName"])
                continue
            base = self.dir / "volumes" / v["name"]
            if base.exists():
                shutil.rmtree(base)
            base.mkdir(parents=True)
            if "emptyDir" in v:
                pass
            elif "configMap" in v:
                src = v["configMap"]
                self._write_files(base, self._source_files("configmaps", src, "name"), src.get("items"), src.get("defaultMode"))
            elif "secret" in v:
                src = v["secret"]
                self._write_files(base, self._source_files("secrets", src, "secretName"), src.get("items"),
                                  src.get("defaultMode"))
            elif "downwardAPI" in v:
                src = v["downwardAPI"]
                files = self._downward_files(src.get("items") or [])
                self._write_files(base, files, None, src.get("defaultMode"))
            elif "projected" in v:
                pr = v["projected"]
                for s in pr.get("sources") or []:
                    if "configMap" in s:
                        self._write_files(base, self._source_files("configmaps", s["configMap"], "name"),
                                          s["configMap"].get("items"), pr.get("defaultMode"))
                    elif "secret" in s:
                        self._write_files(base, self._source_files("secrets", s["secret"], "name"),
                                          s["secret"].get("items"), pr.get("defaultMode"))
                    elif "downwardAPI" in s:
                        self._write_files(base, self._downward_files(s["downwardAPI"].get("items") or []), None,
                                          pr.get("defaultMode"))
                    elif "serviceAccountToken" in s:
                        sat = s["serviceAccountToken"]
                        self._write_files(base, {sat["path"]: self._token(sat)}, None, pr.get("defaultMode"))
            else:
                kinds = [k for k in v if k != "name"]
                log(f"pod {self.ns}/{self.name}: volume type {kinds} is not supported; an empty directory stands in")
            out[v["name"]] = str(base)
        return out

    def _claimed_path(self, claim: str) -> str:
        """The host folder of a bound claim's hostPath or local PersistentVolume (what a real
        kubelet mounts for those volume types; others are not supported)."""
        pvc = self.read_object("persistentvolumeclaims", claim, False)
        volume = (pvc.get("spec") or {}).get("volumeName")
        if (pvc.get("status") or {}).get("phase") != "Bound" or not volume:
            raise NotReady(f"persistentvolumeclaim {claim!r} is not bound")
        try:
            pv = self.k.client.get(f"/api/v1/persistentvolumes/{volume}")
        except ApiError as e:
            raise NotReady(f"persistentvolume {volume!r} of claim {claim!r}: {e}") from e
        src = pv["spec"].get("hostPath") or pv["spec"].get("local")
        if src is None or not Path(src["path"]).is_dir():
            raise NotReady(f"persistentvolume {volume!r}: only hostPath and local folders are supported")
        return src["path"]

    # -- status -------------------------------------------------------------------------------
    def container_status(self, c: Container) -> dict:
        ready = "running" in c.state and (not c.init or c.sidecar)
        st = {"name": c.name, "image": c.spec.get("image", ""), "imageID": "", "containerID": c.container_id,
              "ready": ready, "restartCount": c.restarts, "state": c.state, "lastState": c.last_state,
              "started": "running" in c.state}
        if not c.container_id:
            st.pop("containerID")
        return st

    def write_status(self, terminal: bool = False) -> None:
        init = [c for c in self.containers if c.init]
        main = [c for c in self.containers if not c.init]
        t = now()
        if terminal:
            ok = all(c.exit_code == 0 for c in main) and not self.terminal_reason and \
                all(c.exit_code == 0 for c in init if not c.sidecar)
            phase = "Succeeded" if ok else "Failed"
        elif any("running" in c.state or "terminated" in c.state for c in self.containers):
            phase = "Running" if any("running" in c.state for c in main) or any(c.restarts for c in main) else "Pending"
        else:
            phase = "Pending"
        inited = all(c.exit_code == 0 or c.sidecar for c in init) and not (phase == "Pending" and init and
                                                                           any(c.exit_code != 0 for c in init if not c.sidecar))
        all_ready = phase == "Running" and all("running" in c.state for c in main)
        started = any(c.state.get("running") or c.state.get("terminated") for c in self.containers)

        def cond(typ: str, ok: bool, reason: str = "") -> dict:
            d = {"type": typ, "status": "True" if ok else "False", "lastProbeTime": None, "lastTransitionTime": t}
            if reason and not ok:
                d["reason"] = reason
            return d

        not_ready_reason = "PodCompleted" if terminal else "ContainersNotReady"
        ours = [cond("PodReadyToStartContainers", not terminal or started), cond("Initialized", inited, "ContainersNotInitialized"),
                cond("Ready", all_ready, not_ready_reason), cond("ContainersReady", all_ready, not_ready_reason)]
        status = {"phase": phase, "hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}], "podIP": self.ip,
                  "podIPs": [{"ip": self.ip}], "startTime": self.start_time,
                  "containerStatuses": [self.container_status(c) for c in main]}
        if init:
            status["initContainerStatuses"] = [self.container_status(c) for c in init]
        if self.terminal_reason:
            status["reason"], status["message"] = self.terminal_reason
        key = json.dumps([status, [(c["type"], c["status"]) for c in ours]], sort_keys=True, default=str)
        if key == self.last_written and not terminal:
            return
        graph_lag_until = time.monotonic() + 60
        for _ in range(200):
            try:
                cur = self.k.client.get(self.api)
            except ApiError as e:
                if e.status == 404:
                    return
                if _node_graph_lag(e) and time.monotonic() < graph_lag_until:
                    time.sleep(0.3)
                    continue
                raise
            if cur["metadata"]["uid"] != self.uid:
                return
            old = cur.get("status") or {}
            if old.get("phase") in ("Succeeded", "Failed"):
                self.last_written = key
                return  # never leave a terminal phase
            old_conds = {c["type"]: c for c in old.get("conditions") or []}
            conds = [c for c in old.get("conditions") or [] if c["type"] not in {o["type"] for o in ours}]
            for c in ours:
                prev = old_conds.get(c["type"])
                if prev and prev.get("status") == c["status"]:
                    c["lastTransitionTime"] = prev.get("lastTransitionTime", t)
                conds.append(c)
            new = dict(old)
            new.update(status)
            new["conditions"] = conds
            cur["status"] = new
            try:
                self.k.client.put(self.api + "/status", cur)
                self.last_written = key
                return
            except ApiError as e:
                if e.status == 409:
                    continue
                if e.status == 404:
                    return
                if _node_graph_lag(e) and time.monotonic() < graph_lag_until:
                    time.sleep(0.3)
                    continue
                raise


def _node_graph_lag(e: ApiError) -> bool:
    """A 403 from the Node authorizer that has not yet seen the pod's binding (its graph follows an
    informer, which lags under load): a real kubelet retries, and so do we."""
    return e.status == 403 and "no relationship found between node" in str(e)


# --- entry point -----------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kubeconfig", required=True)
    ap.add_argument("--node-name", default="kubetune-node")
    ap.add_argument("--root", required=True, help="state dir: pods, volumes, logs")
    ap.add_argument("--cpu", default="16")
    ap.add_argument("--memory", default="64Gi")
    ap.add_argument("--pods", default="110")
    ap.add_argument("--gpus", default="8")
    ap.add_argument("--ip-block", type=int, default=10, help="pod IPs are 127.<block>.x.y")
    ap.add_argument("--no-namespaces", action="store_true", help="do not use mount namespaces (volumes not mounted)")
    a = ap.parse_args(argv)
    client = KubeClient.from_kubeconfig(a.kubeconfig)
    cap = {"cpu": a.cpu, "memory": a.memory, "pods": a.pods, "ephemeral-storage": "100Gi", GPU: a.gpus}
    k = Kubelet(client, a.node_name, Path(a.root), cap, namespaces=not a.no_namespaces, ip_block=a.ip_block)

    def on_signal(signum, frame):
        log(f"signal {signum}: stopping pods")
        k.shutdown()
        os._exit(0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    k.run()


if __name__ == "__main__":
    main()


# --- the test-side handle --------------------------------------------------------------------
class ProcessKubelet:
    """Start the process kubelet for a ControlPlane as its own process (``python kubelet.py``).

    ``start()`` waits for the Node to be Ready and removes the ``node.kubernetes.io/not-ready``
    taint that node admission adds on create (the node-lifecycle controller, which would
    remove it, is not run; a kubelet's own identity may not change taints).
    """

    kind = "process"

    def __init__(self, control_plane, node_name: str = "kubetune-node", cpu: str = "16", memory: str = "64Gi",
                 gpus: str = "8", pods: str = "110", ip_block: int = 10):
        self.cp = control_plane
        self.cpu = cpu
        self.node_name = node_name
        self.root = Path(control_plane.workdir) / f"kubelet-{node_name}"
        self.args = ["--cpu", cpu, "--memory", memory, "--gpus", gpus, "--pods", pods, "--ip-block", str(ip_block)]
        self.proc = None

    def __enter__(self) -> "ProcessKubelet":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> None:
        from .controlplane import ManagedProcess

        self.root.mkdir(parents=True, exist_ok=True)
        kc = self.cp.node_kubeconfig(self.node_name)
        argv = [sys.executable, str(Path(__file__).resolve()), "--kubeconfig", kc, "--node-name", self.node_name,
                "--root", str(self.root), *self.args]
        env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
        self.proc = ManagedProcess(f"kubelet-{self.node_name}", argv, self.root / "kubelet.log", env=env)
        admin = self.cp.client()
        deadline = time.monotonic() + timeout
        while True:
            if not self.proc.alive():
                raise RuntimeError(f"process kubelet exited with {self.proc.popen.returncode}:\n{self.proc.tail()}")
            try:
                node = admin.get(f"/api/v1/nodes/{self.node_name}")
                ready = any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"].get("conditions", []))
                taints = node["spec"].get("taints") or []
                if ready and node["status"].get("daemonEndpoints", {}).get("kubeletEndpoint", {}).get("Port"):
                    if not taints:
                        return
                    keep = [t for t in taints if t["key"] != "node.kubernetes.io/not-ready"]
                    admin.patch(f"/api/v1/nodes/{self.node_name}", {"spec": {"taints": keep or None}})
            except ApiError as e:
                if e.status != 404:
                    raise
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {self.node_name} not Ready and untainted after {timeout}s:\n{self.proc.tail()}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(grace=10.0)
            self.proc = None

    def log_file(self, namespace: str, pod: str, container: str) -> Path:
        return self.root / "logs" / namespace / pod / f"{container}.log"

    def container_pid(self, namespace: str, pod: str, container: str) -> int:
        """The host pid of a running container's process (``containerID`` is ``process://<pid>``)."""
        status = self.cp.client().get(f"/api/v1/namespaces/{namespace}/pods/{pod}")["status"]
        for cs in status.get("containerStatuses") or []:
            if cs["name"] == container and cs.get("containerID"):
                return int(cs["containerID"].removeprefix("process://"))
        raise RuntimeError(f"pod {namespace}/{pod} has no container {container} yet")

    def kill_container(self, namespace: str, pod: str, container: str) -> str:
        """SIGKILL a container's processes (its process group: ``containerID`` is
        ``process://<pid>``), as a node failure would; returns the container id."""
        status = self.cp.client().get(f"/api/v1/namespaces/{namespace}/pods/{pod}")["status"]
        for cs in status.get("containerStatuses") or []:
            if cs["name"] == container and "running" in cs.get("state", {}):
                os.killpg(int(cs["containerID"].removeprefix("process://")), signal.SIGKILL)
                return cs["containerID"]
        raise RuntimeError(f"no running container {container} of pod {namespace}/{pod}")

    def pod_logs(self, namespace: str, pod: str, container: str | None = None) -> str:
        """The container's output (stdout+stderr); the only/first container when none is named."""
        if container is None:
            index = self.root / "logs" / namespace / pod / ".containers"
            if not index.exists():
                return ""
            container = json.loads(index.read_text())[0]
        p = self.log_file(namespace, pod, container)
        return p.read_text(errors="replace") if p.exists() else ""

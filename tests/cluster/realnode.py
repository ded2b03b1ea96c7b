"""A real node for the test control plane: the real kubelet, containerd + runc, CNI, kube-proxy
and CoreDNS, all built or installed on this machine and started as processes.

    net = NodeNetwork.allocate()              # a Linux bridge and a /24 of our own
    with ControlPlane(bind_address=net.gateway) as cp, RealNode(cp, net, images) as node:
        ...                                   # pods run as containers of `images`

What runs, and how it is wired (every setting below was needed on this kind of VM; see
``../shared/notes/real-node.md`` for how each was found):

* **network**: a bridge ``ktbr<N>`` with ``10.123.<N>.1/24`` (the node's address, the CNI
  gateway, the apiserver's and CoreDNS' address). Pods get addresses in that /24 from the CNI
  ``bridge`` + ``host-local`` plugins (Debian's containernetworking-plugins), with routes to the
  /24 and to the Service range only: nothing in a pod can reach beyond this machine.
* **containerd** (Debian, 1.6) with its own config, root and socket: runc with the cgroupfs
  driver (crun fails on this hybrid cgroup layout), overlayfs, the locally built pause image as
  the sandbox image, and ``restrict_oom_score_adj`` (lowering oom_score_adj is denied in this VM
  and runc then fails with "can't get final child's PID from pipe"). Images are imported with
  ``ctr images import``; nothing is ever pulled. Its root (the imported images) is kept in
  ``~/.cache/kubetune-test/containerd`` between sessions.
* **kubelet** built from ``k8s.io/kubernetes`` at the control plane's version: cgroupfs, no QoS
  cgroups, node allocatable not enforced, no swap check; x509 client authentication (only
  holders of a cluster-CA certificate, the apiserver among them, may use its API, so
  ``kubectl logs`` works); cluster DNS at the node address. After it registers, the Node's
  ``not-ready`` taint is removed (the node-lifecycle controller, which would, is not run) and
  ``nvidia.com/gpu`` capacity is advertised as an extended resource (what the NVIDIA device
  plugin would report; pods that request it get no device).
* **kube-proxy** (same build, iptables mode): Services' ClusterIPs route for real, so the
  in-cluster config of a pod (``kubernetes.default.svc`` = 10.0.0.1:443) reaches the apiserver;
  its rules are removed again with ``kube-proxy --cleanup`` on stop.
* **CoreDNS** (``gomod/coredns``) on the node address, port 53, serving ``cluster.local`` from
  the control plane: Services and headless-Service pod names resolve as on a real cluster.

Needs root, the Debian packages containerd, runc, containernetworking-plugins and iptables, and
the binaries of ``build.py``; ``unavailable()`` says what is missing. ``stop()`` kills every
container, unmounts what the kubelet and containerd mounted, removes kube-proxy's rules and the
bridge.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

if __package__ in (None, ""):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "cluster"

from . import build, images  # noqa: E402
from .controlplane import ManagedProcess, free_port, wait_ready  # noqa: E402

CNI_BIN_DIR = "/usr/lib/cni"
SERVICE_CIDR = "10.0.0.0/24"
CLUSTER_DOMAIN = "cluster.local"
GPU = "nvidia.com/gpu"
LOCK_DIR = Path("/run/kubetune-test")
NAMESPACE = "k8s.io"  # containerd namespace of the CRI plugin
PAUSE_REF = "localhost/kubetune-test/pause:3.10"


def unavailable() -> str | None:
    """Why a real node cannot run on this machine (None when it can): what is missing, or
    another test session's real node already running here (kube-proxy's rules are per machine)."""
    if os.geteuid() != 0:
        return "the real node needs root (network namespaces, mounts, containerd)"
    missing = [b for b in ("containerd", "ctr", "runc", "ip", "iptables", "iptables-restore") if not shutil.which(b)]
    missing += [f"{CNI_BIN_DIR}/{p}" for p in ("bridge", "host-local", "loopback", "portmap")
                if not os.path.exists(f"{CNI_BIN_DIR}/{p}")]
    if missing:
        return "missing " + ", ".join(missing) + " (Debian packages containerd, runc, containernetworking-plugins, iptables)"
    why = images.unavailable()
    if why:
        return why
    if NodeNetwork.busy():
        return "another test session's real node is running on this machine"
    return None


def choose() -> tuple[str, str]:
    """("real", "") or ("process", why): the node a test session runs its pods on.
    `KUBETUNE_TEST_NODE=real` insists on the real node (an error when it cannot run),
    `=process` asks for the process kubelet, unset or `auto` takes the real node when it can."""
    wanted = os.environ.get("KUBETUNE_TEST_NODE", "auto")
    if wanted == "process":
        return "process", "KUBETUNE_TEST_NODE=process"
    why = unavailable()
    if why and wanted == "real":
        raise RuntimeError(f"KUBETUNE_TEST_NODE=real, but the real node cannot run here: {why}")
    return ("process", why) if why else ("real", "")


def _run(*argv: str, check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return r


# --------------------------------------------------------------------------------- network
class NodeNetwork:
    """The bridge and /24 of the test session's real node. One per machine: the lock file is held
    while the session runs (kube-proxy's iptables rules, like the bridge, belong to the machine)."""

    def __init__(self, slot: int, lock):
        self.slot = slot
        self._lock = lock
        self.bridge = f"ktbr{slot}"
        self.subnet = ipaddress.ip_network(f"10.123.{slot}.0/24")
        self.gateway = str(self.subnet.network_address + 1)
        self.created = False

    SLOT = 1

    @classmethod
    def _lock(cls):
        LOCK_DIR.mkdir(parents=True, exist_ok=True)
        lock = open(LOCK_DIR / "realnode.lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            return None
        return lock

    @classmethod
    def busy(cls) -> bool:
        lock = cls._lock()
        if lock is None:
            return True
        lock.close()
        return False

    @classmethod
    def allocate(cls) -> "NodeNetwork":
        lock = cls._lock()
        if lock is None:
            raise RuntimeError("another test session's real node is running on this machine")
        net = cls(cls.SLOT, lock)
        net.create()
        return net

    def create(self) -> None:
        if _run("ip", "link", "show", self.bridge, check=False).returncode == 0:
            _run("ip", "link", "del", self.bridge)  # left by a session that was killed
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        self.created = True

    def delete(self) -> None:
        if self.created:
            _run("ip", "link", "del", self.bridge, check=False)
            self.created = False
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def cni_conflist(self, ipam_dir: Path) -> dict:
        return {
            "cniVersion": "1.0.0",
            "name": "kubetune-test",
            "plugins": [
                {
                    "type": "bridge", "bridge": self.bridge, "isGateway": True, "ipMasq": False, "hairpinMode": True,
                    "ipam": {
                        "type": "host-local", "dataDir": str(ipam_dir),
                        "ranges": [[{"subnet": str(self.subnet), "gateway": self.gateway,
                                     "rangeStart": str(self.subnet.network_address + 10),
                                     "rangeEnd": str(self.subnet.broadcast_address - 1)}]],
                        # the node's /24 and the Service range (kube-proxy): no default route
                        "routes": [{"dst": str(self.subnet)}, {"dst": SERVICE_CIDR, "gw": self.gateway}],
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }


def _resolve_in_image(path: str, lowers: list[Path]) -> list[str]:
    """`path` inside an image whose layers are `lowers` (top first), its symlinks followed."""
    parts: list[str] = []
    todo = [p for p in path.split("/") if p]
    hops = 0
    while todo:
        part = todo.pop(0)
        if part in (".", ".."):
            parts = parts[:-1] if part == ".." else parts
            continue
        candidate = parts + [part]
        link = next((d.joinpath(*candidate) for d in lowers if d.joinpath(*candidate).is_symlink()), None)
        if link is None or hops > 40:
            parts = candidate
            continue
        hops += 1
        target = os.readlink(link)
        todo = [p for p in target.split("/") if p] + todo
        if target.startswith("/"):
            parts = []
    return parts


# --------------------------------------------------------------------------------- the node
class RealNode:
    """Start containerd, kube-proxy, CoreDNS and the kubelet for a ControlPlane (see module doc).

    `images_to_load`: image refs in podman's storage (tests/cluster/images.py) to import into
    containerd, each optionally under extra names ({ref: [alias, ...]})."""

    kind = "real"

    def __init__(self, control_plane, network: NodeNetwork, images_to_load: dict[str, list[str]] | None = None,
                 node_name: str = "kubetune-node", gpus: int = 8):
        self.cp = control_plane
        self.net = network
        self.node_name = node_name
        self.gpus = gpus
        self.images = dict(images_to_load or {})
        self.workdir = Path(tempfile.mkdtemp(prefix="ktnode-"))  # short: unix socket paths
        self.procs: dict = {}
        self._root_lock = None
        self.containerd_root: Path | None = None
        self.bin_dir: Path | None = None

    # -- public -----------------------------------------------------------------------------
    def __enter__(self) -> "RealNode":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def socket(self) -> str:
        return str(self.workdir / "containerd.sock")

    def ctr(self, *args: str, check: bool = True, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
        return _run("ctr", "--address", self.socket, "--namespace", NAMESPACE, *args, check=check, timeout=timeout, **kw)

    def pod_logs(self, namespace: str, pod: str, container: str | None = None) -> str:
        """The container's output, read through the apiserver from this kubelet (`kubectl logs`)."""
        args = ["logs", "-n", namespace, pod] + (["-c", container] if container else [])
        r = self.cp.kubectl(*args)
        return r.stdout if r.returncode == 0 else ""

    def container_pid(self, namespace: str, pod: str, container: str) -> int:
        """The host pid of a running container's init process (containerd's task)."""
        cid = self.container_id(namespace, pod, container)
        for line in self.ctr("tasks", "list").stdout.splitlines()[1:]:
            task, pid, *_ = line.split()
            if task == cid:
                return int(pid)
        raise RuntimeError(f"container {container} of pod {namespace}/{pod} is not running")

    def kill_container(self, namespace: str, pod: str, container: str) -> str:
        """SIGKILL a pod's container through containerd (its task: the container's whole PID
        namespace goes), as a node failure would; returns its id."""
        cid = self.container_id(namespace, pod, container)
        r = self.ctr("tasks", "kill", "--signal", "SIGKILL", cid, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"no running container {container} of pod {namespace}/{pod}: {r.stderr.strip()}")
        return cid

    def container_id(self, namespace: str, pod: str, container: str) -> str:
        status = self.cp.client().get(f"/api/v1/namespaces/{namespace}/pods/{pod}")["status"]
        for cs in status.get("containerStatuses") or []:
            if cs["name"] == container and cs.get("containerID"):
                return cs["containerID"].removeprefix("containerd://")
        raise RuntimeError(f"pod {namespace}/{pod} has no container {container} yet")

    def writes_outside_volumes(self, namespace: str, pod: str, container: str) -> list[str]:
        """What the container wrote to its own root filesystem: the entries of its overlayfs
        upper (writable) layer, less the empty mount points runc makes for the container's
        mounts (volumes, /etc/hosts, the termination-message file, ...). Empty when the container
        wrote only to its volumes."""
        cid = self.container_id(namespace, pod, container)
        mount = self.ctr("snapshots", "--snapshotter", "overlayfs", "mounts", "/kubetune-unused", cid).stdout
        opts = dict(o.split("=", 1) for o in mount.split(" -o ", 1)[1].split()[0].split(",") if "=" in o)
        upper, lowers = Path(opts["upperdir"]), [Path(d) for d in opts.get("lowerdir", "").split(":") if d]
        spec = json.loads(self.ctr("containers", "info", cid).stdout)["Spec"]
        allowed: set[str] = set()
        for m in spec.get("mounts", []):
            # runc makes the mount point where the image's symlinks lead (/var/run -> /run)
            parts = _resolve_in_image(m["destination"], lowers)
            allowed |= {"/".join(parts[: i + 1]) for i in range(len(parts))}
        found = []
        for f in sorted(upper.rglob("*")):
            rel = f.relative_to(upper).as_posix()
            empty = (f.is_dir() and not any(f.iterdir())) or (f.is_file() and f.stat().st_size == 0)
            if rel in allowed and (f.is_dir() or empty):
                continue
            found.append(rel)
        return found

    # -- start-up ---------------------------------------------------------------------------
    def start(self, timeout: float = 120.0) -> None:
        try:
            self._start(timeout)
        except BaseException as e:
            logs = "\n".join(f"--- {n} ---\n{p.tail(40)}" for n, p in self.procs.items())
            self.stop()
            if isinstance(e, Exception):
                raise RuntimeError(f"the real node failed to start ({e}); last log lines:\n{logs}") from e
            raise

    def _start(self, timeout: float) -> None:
        t0 = time.monotonic()
        self.bin_dir = build.ensure_binaries()
        self._start_containerd()
        self._load_images()
        self._start_coredns()
        self._start_kubelet(timeout)
        self._start_kube_proxy()  # it waits for its Node to exist before it serves
        self.start_seconds = time.monotonic() - t0

    def _spawn(self, name: str, argv: list[str]):
        self.procs[name] = ManagedProcess(name, argv, self.workdir / f"{name}.log", cwd=str(self.workdir))
        return self.procs[name]

    def _wait(self, what: str, probe, timeout: float = 60.0) -> None:
        wait_ready(what, probe, self.procs, timeout)

    def _containerd_root(self) -> Path:
        """The kept root (images survive the session) unless another session holds it."""
        keep = images.cache_root().parent / "containerd"
        keep.mkdir(parents=True, exist_ok=True)
        lock = open(keep.parent / "containerd.lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            return self.workdir / "containerd-root"  # another session's node: import afresh
        self._root_lock = lock
        return keep

    def _start_containerd(self) -> None:
        self.containerd_root = self._containerd_root()
        cni_conf = self.workdir / "cni"
        cni_conf.mkdir()
        (cni_conf / "10-kubetune-test.conflist").write_text(json.dumps(self.net.cni_conflist(self.workdir / "ipam")))
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        config = f"""version = 2
root = "{self.containerd_root}"
state = "{self.workdir / 'containerd-state'}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{self.socket}"
[{cri}]
  sandbox_image = "{PAUSE_REF}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  enable_unprivileged_ports = false
[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
  discard_unpacked_layers = false
[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false
  BinaryName = "{shutil.which('runc')}"
[{cri}.cni]
  bin_dir = "{CNI_BIN_DIR}"
  conf_dir = "{cni_conf}"
"""
        (self.workdir / "containerd.toml").write_text(config)
        self._spawn("containerd", ["containerd", "--config", str(self.workdir / "containerd.toml"), "--log-level", "warn"])
        self._wait("containerd", lambda: self.ctr("version", check=False, timeout=5).returncode == 0)

    def _load_images(self) -> None:
        """Import the pause image and the test images into containerd, unless already there (the
        record of what was imported, by podman image id, lives in the kept root); remove the
        images an earlier session imported that this one does not use (another commit's runtime
        image), so the kept root holds one of each."""
        record_path = self.containerd_root / "kubetune-imported.json"
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
        wanted = {images.pause_image(self.bin_dir / "pause", PAUSE_REF): [], **self.images}
        present = set(self.ctr("images", "list", "--quiet").stdout.split())
        names_wanted = {n for ref, aliases in wanted.items() for n in (ref, *aliases)}
        stale = sorted(present - names_wanted)
        if stale:
            self.ctr("images", "rm", *stale, check=False)
            for ref in stale:
                record.pop(ref, None)
            present -= set(stale)
        for ref, aliases in wanted.items():
            image_id = images.image_id(ref)
            names = [ref, *aliases]
            if record.get(ref) != image_id or not set(names) <= present:
                t0 = time.monotonic()
                images.export_to(ref, ["ctr", "--address", self.socket, "--namespace", NAMESPACE,
                                       "images", "import", "-"])
                self._discard_layers(ref)
                for alias in aliases:
                    self.ctr("images", "tag", "--force", ref, alias)
                record[ref] = image_id
                record_path.write_text(json.dumps(record, indent=1))
                images._log(f"imported {ref} into containerd in {time.monotonic() - t0:.0f}s")

    def _discard_layers(self, ref: str) -> None:
        """Delete an unpacked image's layer blobs from containerd's content store (what the CRI's
        `discard_unpacked_layers` does for pulls): containers start from the unpacked snapshots
        and the image's config, so a multi-GB image is kept once on disk, not twice."""
        target = json.loads(self.ctr("content", "get", self._image_digest(ref)).stdout)
        if "manifests" in target:  # an index: its manifest for this platform
            target = json.loads(self.ctr("content", "get", target["manifests"][0]["digest"]).stdout)
        layers = [layer["digest"] for layer in target.get("layers", [])]
        if layers:
            self.ctr("content", "rm", *layers, check=False)

    def _image_digest(self, ref: str) -> str:
        for line in self.ctr("images", "list").stdout.splitlines()[1:]:
            cols = line.split()
            if cols and cols[0] == ref:
                return next(c for c in cols if c.startswith("sha256:"))
        raise RuntimeError(f"{ref} is not in containerd")

    def _start_kube_proxy(self) -> None:
        kc = self.cp.write_kubeconfig("kube-proxy", "system:kube-proxy")
        cfg = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "mode": "iptables", "clusterCIDR": str(self.net.subnet), "hostnameOverride": self.node_name,
            "bindAddress": self.net.gateway, "healthzBindAddress": f"127.0.0.1:{free_port()}",
            "metricsBindAddress": f"127.0.0.1:{free_port()}", "clientConnection": {"kubeconfig": kc},
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
            "iptables": {"syncPeriod": "10s", "minSyncPeriod": "0s", "masqueradeAll": False},
            "nodePortAddresses": [f"{self.net.gateway}/32"], "detectLocalMode": "ClusterCIDR",
        }
        (self.workdir / "kube-proxy.yaml").write_text(yaml.safe_dump(cfg))
        self._kube_proxy_health = cfg["healthzBindAddress"]
        self._spawn("kube-proxy", [str(self.bin_dir / "kube-proxy"), f"--config={self.workdir / 'kube-proxy.yaml'}",
                                   "--v=1"])
        self._wait("kube-proxy", lambda: urllib.request.urlopen(
            f"http://{self._kube_proxy_health}/healthz", timeout=2).status == 200)

    def _start_coredns(self) -> None:
        ready = free_port()
        corefile = f"""{CLUSTER_DOMAIN}:53 {{
    bind {self.net.gateway}
    ready 127.0.0.1:{ready}
    errors
    loadbalance
    kubernetes {CLUSTER_DOMAIN} {{
        kubeconfig {self.cp.kubeconfig}
        pods insecure
    }}
}}
"""
        (self.workdir / "Corefile").write_text(corefile)
        self._spawn("coredns", [str(self.bin_dir / "coredns"), "-conf", str(self.workdir / "Corefile")])
        self._wait("coredns", lambda: urllib.request.urlopen(f"http://127.0.0.1:{ready}/ready", timeout=2).status == 200)

    def _start_kubelet(self, timeout: float) -> None:
        (self.workdir / "resolv.conf").write_text("")  # pods get only the cluster DNS
        self.kubelet_port = free_port(self.net.gateway)
        cfg = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "address": self.net.gateway, "port": self.kubelet_port, "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": free_port(),
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": False},
                               "x509": {"clientCAFile": self.cp.ca_file}},
            "authorization": {"mode": "AlwaysAllow"},
            "cgroupDriver": "cgroupfs", "cgroupsPerQOS": False, "enforceNodeAllocatable": [],
            "failCgroupV1": False, "failSwapOn": False, "localStorageCapacityIsolation": False,
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "clusterDNS": [self.net.gateway], "clusterDomain": CLUSTER_DOMAIN,
            "resolvConf": str(self.workdir / "resolv.conf"),
            "podLogsDirectory": str(self.workdir / "pod-logs"),
            "evictionHard": {}, "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": False, "registerNode": True, "maxPods": 110,
            "nodeStatusUpdateFrequency": "2s", "syncFrequency": "5s",
        }
        (self.workdir / "kubelet.yaml").write_text(yaml.safe_dump(cfg))
        self._spawn("kubelet", [
            str(self.bin_dir / "kubelet"), f"--config={self.workdir / 'kubelet.yaml'}",
            f"--kubeconfig={self.cp.node_kubeconfig(self.node_name)}", f"--root-dir={self.workdir / 'kubelet'}",
            f"--hostname-override={self.node_name}", f"--node-ip={self.net.gateway}", "--v=1",
        ])
        admin = self.cp.client()

        def ready() -> bool:
            node = admin.get(f"/api/v1/nodes/{self.node_name}")
            if not any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"].get("conditions", [])):
                return False
            taints = node["spec"].get("taints") or []
            keep = [t for t in taints if t["key"] != "node.kubernetes.io/not-ready"]
            if keep != taints:
                admin.patch(f"/api/v1/nodes/{self.node_name}", {"spec": {"taints": keep or None}})
                return False
            if self.gpus and node["status"].get("capacity", {}).get(GPU) != str(self.gpus):
                admin.patch(f"/api/v1/nodes/{self.node_name}/status",
                            {"status": {"capacity": {GPU: str(self.gpus)}}})
                return False
            if self.gpus and node["status"].get("allocatable", {}).get(GPU) != str(self.gpus):
                return False
            # its heartbeat: the node's Lease (created once the Node exists)
            return admin.get(f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.node_name}")

        self._wait(f"node {self.node_name} Ready", ready, timeout)

    # -- stop -------------------------------------------------------------------------------
    def stop(self) -> None:
        kubelet = self.procs.pop("kubelet", None)
        if kubelet is not None:
            kubelet.stop(grace=10.0)
        if "containerd" in self.procs:
            self._remove_containers()
        for name in ("coredns", "kube-proxy", "containerd"):
            p = self.procs.pop(name, None)
            if p is not None:
                p.stop(grace=10.0)
        self._kill_shims()
        if self.bin_dir is not None:  # kube-proxy's rules, then the kubelet's canary chains
            _run(str(self.bin_dir / "kube-proxy"), "--cleanup", check=False, timeout=60)
        for table in ("mangle", "nat", "filter"):
            _run("iptables", "-t", table, "-X", "KUBE-KUBELET-CANARY", check=False)
        self._unmount_all()
        if self._root_lock is not None:
            self._root_lock.close()
            self._root_lock = None
        if not os.environ.get("KUBETUNE_TEST_KEEP_WORKDIR"):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _remove_containers(self) -> None:
        """Every container and sandbox of this node's containerd goes (the kept root keeps only
        images): kill tasks, delete them, delete the containers."""
        try:
            tasks = self.ctr("tasks", "list", "--quiet", check=False, timeout=30).stdout.split()
            for t in tasks:
                self.ctr("tasks", "kill", "--signal", "SIGKILL", "--all", t, check=False, timeout=30)
            deadline = time.monotonic() + 20
            while tasks and time.monotonic() < deadline:
                for t in list(tasks):
                    if self.ctr("tasks", "delete", t, check=False, timeout=30).returncode == 0:
                        tasks.remove(t)
                time.sleep(0.3)
            for c in self.ctr("containers", "list", "--quiet", check=False, timeout=30).stdout.split():
                self.ctr("containers", "delete", c, check=False, timeout=30)
        except (subprocess.TimeoutExpired, OSError):
            pass

    def _kill_shims(self) -> None:
        """containerd-shim-runc-v2 outlives containerd by design; ours carry our socket path."""
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmd = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmd and cmd[0].endswith(b"containerd-shim-runc-v2") and self.socket.encode() in cmd:
                try:
                    os.killpg(int(proc.name), signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    try:
                        os.kill(int(proc.name), signal.SIGKILL)
                    except ProcessLookupError:
                        pass

    def _unmount_all(self) -> None:
        roots = [str(self.workdir)] + ([str(self.containerd_root)] if self.containerd_root else [])
        for _ in range(3):
            mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
            ours = [m for m in mounts if any(m == r or m.startswith(r + "/") for r in roots)]
            if not ours:
                return
            for m in sorted(ours, key=len, reverse=True):
                subprocess.run(["umount", "-l", m], capture_output=True)


if __name__ == "__main__":
    # `python tests/cluster/realnode.py --check`: exit 0 when the real node can run here, else
    # say why on stderr and exit 1 (scripts/test.sh builds the images only when it can).
    import sys

    why = unavailable()
    if why:
        print(f"kubetune: the e2e tier runs on the process kubelet: {why}", file=sys.stderr)
    sys.exit(1 if why else 0)

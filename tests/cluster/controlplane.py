"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler, started as processes from the binaries that ``build.py`` makes.

    with ControlPlane() as cp:
        cp.kubectl("get", "ns")            # CompletedProcess, admin identity (system:masters)
        cp.kubeconfig, cp.server, cp.env   # for subprocesses: env has KUBECONFIG set
        cp.client()                        # a kubeapi.KubeClient with the admin identity

Everything binds 127.0.0.1 on free ports (the apiserver binds ``bind_address`` instead when a real
node's pods must reach it: the node network's address, see realnode.py); certificates, keys, kubeconfigs, data and logs go to
a fresh temporary directory (``cp.workdir``; each component logs to ``<name>.log`` there).
Each process runs in its own process group and is asked to die with its parent (setpriv
--pdeathsig); ``stop()`` (also run by ``__exit__`` and atexit) SIGTERMs then SIGKILLs every group.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "cluster"

from . import build, pki
from .kubeapi import KubeClient

KCM_CONTROLLERS = (
    "job-controller", "cronjob-controller", "deployment-controller", "replicaset-controller",
    "statefulset-controller", "endpoints-controller", "endpointslice-controller",
    "garbage-collector-controller", "namespace-controller", "serviceaccount-controller",
    "serviceaccount-token-controller", "root-ca-certificate-publisher-controller",
    "ttl-after-finished-controller", "pod-garbage-collector-controller", "clusterrole-aggregation-controller",
    # PersistentVolumeClaims (the model cache test): binding, and the protection finalizers'
    # removal (without it a namespace holding a claim never finishes deleting)
    "persistentvolume-binder-controller", "persistentvolumeclaim-protection-controller",
    "persistentvolume-protection-controller",
)
SERVICE_CIDR = "10.0.0.0/24"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


_LIVE: list["ManagedProcess"] = []


class ManagedProcess:
    """A child process in its own process group, logging to a file."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None,
                 cwd: str | None = None):
        self.name, self.argv, self.log_path = name, argv, log_path
        prefix = []
        if shutil.which("setpriv"):
            prefix = ["setpriv", "--pdeathsig", "KILL", "--"]
        self.log = open(log_path, "ab")
        self.popen = subprocess.Popen(prefix + argv, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      env=env, cwd=cwd, start_new_session=True)
        _LIVE.append(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, grace: float = 5.0) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        # the group may hold children even when the leader is gone
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self.log.close()
        if self in _LIVE:
            _LIVE.remove(self)


def wait_ready(what: str, probe, procs: dict[str, "ManagedProcess"], timeout: float) -> None:
    """Call `probe` until it returns something truthy; fail at once, with its log's tail, when
    one of `procs` exits meanwhile. Exceptions from the probe mean "not yet"."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        for name, p in procs.items():
            if not p.alive():
                raise RuntimeError(f"{name} exited with {p.popen.returncode}:\n{p.tail(40)}")
        try:
            if probe():
                return
        except Exception as e:  # noqa: BLE001 - any failure means "not yet"
            last = e
        time.sleep(0.2)
    raise TimeoutError(f"{what} not ready after {timeout}s (last error: {last!r})")


@atexit.register
def _kill_all() -> None:
    for p in list(reversed(_LIVE)):
        p.stop(grace=2.0)


def kubeconfig_yaml(server: str, ca: bytes, cert: bytes, key: bytes, user: str) -> str:
    import base64

    b = lambda x: base64.b64encode(x).decode()  # noqa: E731
    return yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kubetune-test",
        "clusters": [{"name": "kubetune-test", "cluster": {"server": server, "certificate-authority-data": b(ca)}}],
        "users": [{"name": user, "user": {"client-certificate-data": b(cert), "client-key-data": b(key)}}],
        "contexts": [{"name": "kubetune-test", "context": {"cluster": "kubetune-test", "user": user, "namespace": "default"}}],
    })


class ControlPlane:
    def __init__(self, bin_dir: str | Path | None = None, workdir: str | Path | None = None,
                 start_timeout: float = 120.0, bind_address: str = "127.0.0.1",
                 extra_args: dict[str, list[str]] | None = None):
        self.bin_dir = Path(bin_dir) if bin_dir else None
        # more flags for a component, by process name (e.g. a benchmark's audit log, client QPS)
        self.extra_args = dict(extra_args or {})
        self.bind_address = bind_address
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="kubetune-cp-"))
        self.start_timeout = start_timeout
        self.procs: dict[str, ManagedProcess] = {}
        self.server = ""
        self.kubeconfig = ""
        self.ca: pki.CA | None = None

    # -- public -----------------------------------------------------------------------------
    def __enter__(self) -> "ControlPlane":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def binary(self, name: str) -> str:
        assert self.bin_dir is not None
        return str(self.bin_dir / name)

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["KUBECONFIG"] = self.kubeconfig
        # kubectl's discovery and OpenAPI cache is keyed by host:port: a cluster of an earlier run
        # on the same port must not answer for this one (nor land in the user's ~/.kube)
        env["KUBECACHEDIR"] = str(self.workdir / "kubectl-cache")
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        return env

    def kubectl(self, *args: str, input: str | None = None, timeout: float = 60, check: bool = False):
        return subprocess.run([self.binary("kubectl"), "--kubeconfig", self.kubeconfig, *args], input=input,
                              capture_output=True, text=True, timeout=timeout, check=check, env=self.env)

    def run_tool(self, name: str, *args: str, input: str | None = None, timeout: float = 120):
        """Run one of the built tools (helm, kubectl, etcd, ...) with this cluster's KUBECONFIG."""
        return subprocess.run([self.binary(name), *args], input=input, capture_output=True, text=True,
                              timeout=timeout, env=self.env)

    def client(self) -> KubeClient:
        return KubeClient.from_kubeconfig(self.kubeconfig)

    def write_kubeconfig(self, stem: str, common_name: str, organizations: tuple[str, ...] = ()) -> str:
        """Issue a client certificate from the cluster CA and write a kubeconfig for it."""
        assert self.ca is not None
        key, cert = self.ca.issue(common_name=common_name, organizations=organizations, client=True)
        path = self.workdir / f"{stem}.kubeconfig"
        path.write_text(kubeconfig_yaml(self.server, pki.cert_pem(self.ca.cert), pki.cert_pem(cert), pki.key_pem(key),
                                        common_name))
        path.chmod(0o600)
        return str(path)

    def node_kubeconfig(self, node_name: str) -> str:
        """A kubelet identity: system:node:<name> in system:nodes (Node authorizer + NodeRestriction)."""
        return self.write_kubeconfig(f"node-{node_name}", f"system:node:{node_name}", ("system:nodes",))

    def start(self) -> None:
        try:
            self._start()
        except BaseException as e:
            logs = "\n".join(f"--- {n} ---\n{p.tail()}" for n, p in self.procs.items())
            self.stop()
            if logs and isinstance(e, Exception):
                raise RuntimeError(f"control plane failed to start ({e}); last log lines:\n{logs}") from e
            raise
        atexit.register(self.stop)

    def stop(self) -> None:
        for name in reversed(list(self.procs)):
            self.procs[name].stop()
        self.procs.clear()
        if self._own_workdir and not os.environ.get("KUBETUNE_TEST_KEEP_WORKDIR"):
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- start-up ---------------------------------------------------------------------------
    def _start(self) -> None:
        t0 = time.monotonic()
        if self.bin_dir is None:
            self.bin_dir = build.ensure_binaries()
        d = self.workdir
        pkid = d / "pki"
        pkid.mkdir(parents=True, exist_ok=True)
        self.ca = ca = pki.CA()
        (pkid / "ca.crt").write_bytes(pki.cert_pem(ca.cert))
        (pkid / "ca.key").write_bytes(pki.key_pem(ca.key))
        self.ca_file = str(pkid / "ca.crt")
        srv_crt, srv_key = ca.write_pair(
            pkid, "apiserver", common_name="kube-apiserver", server=True,
            ips=tuple(dict.fromkeys(("127.0.0.1", "10.0.0.1", self.bind_address))),
            dns=("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                 "kubernetes.default.svc.cluster.local"))
        kc_crt, kc_key = ca.write_pair(pkid, "apiserver-kubelet-client", common_name="kube-apiserver-kubelet-client",
                                       organizations=("system:masters",), client=True)
        sa_key = pki._key()
        (pkid / "sa.key").write_bytes(pki.key_pem(sa_key))
        (pkid / "sa.pub").write_bytes(pki.pub_pem(sa_key))

        etcd_port, etcd_peer, api_port = free_port(), free_port(), free_port(self.bind_address)
        kcm_port, sched_port = free_port(), free_port()
        self.server = f"https://{self.bind_address}:{api_port}"
        # On a node network, the apiserver keeps the `kubernetes` Service's endpoints (its own
        # address) so that pods reach it through the Service as on a real cluster; on loopback
        # (the process kubelet) nothing could route there.
        loopback = self.bind_address.startswith("127.")
        self.kubeconfig = self.write_kubeconfig("admin", "kubetune-admin", ("system:masters",))
        kcm_kc = self.write_kubeconfig("controller-manager", "system:kube-controller-manager")
        sched_kc = self.write_kubeconfig("scheduler", "system:kube-scheduler")

        self._spawn("etcd", [
            self.binary("etcd"), "--name=default", f"--data-dir={d / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{etcd_port}", f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
            f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}", f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
            f"--initial-cluster=default=http://127.0.0.1:{etcd_peer}", "--unsafe-no-fsync=true",
            "--log-level=warn", "--listen-metrics-urls=",
        ])
        self._wait("etcd", lambda: json.loads(urllib.request.urlopen(
            f"http://127.0.0.1:{etcd_port}/health", timeout=2).read()).get("health") == "true")

        self._spawn("kube-apiserver", [
            self.binary("kube-apiserver"), f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            f"--bind-address={self.bind_address}", f"--advertise-address={self.bind_address}",
            f"--secure-port={api_port}",
            f"--cert-dir={d / 'apiserver-certs'}", f"--tls-cert-file={srv_crt}", f"--tls-private-key-file={srv_key}",
            f"--client-ca-file={self.ca_file}", f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pkid / 'sa.pub'}", f"--service-account-signing-key-file={pkid / 'sa.key'}",
            "--allow-privileged=true", f"--endpoint-reconciler-type={'none' if loopback else 'lease'}",
            f"--kubelet-client-certificate={kc_crt}", f"--kubelet-client-key={kc_key}",
            "--kubelet-preferred-address-types=InternalIP", "--profiling=false", "--v=1",
        ])
        self._wait("kube-apiserver", lambda: self._https_ok(api_port, "/readyz", client=True, host=self.bind_address))

        common = ["--bind-address=127.0.0.1", "--leader-elect=false", "--profiling=false", "--v=1"]
        self._spawn("kube-controller-manager", [
            self.binary("kube-controller-manager"), f"--kubeconfig={kcm_kc}", f"--authentication-kubeconfig={kcm_kc}",
            f"--authorization-kubeconfig={kcm_kc}", f"--secure-port={kcm_port}", *common,
            f"--cert-dir={d / 'kcm-certs'}",
            f"--controllers={','.join(KCM_CONTROLLERS)}", "--use-service-account-credentials=true",
            f"--service-account-private-key-file={pkid / 'sa.key'}", f"--root-ca-file={self.ca_file}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
        ])
        self._spawn("kube-scheduler", [
            self.binary("kube-scheduler"), f"--kubeconfig={sched_kc}", f"--authentication-kubeconfig={sched_kc}",
            f"--authorization-kubeconfig={sched_kc}", f"--secure-port={sched_port}", *common,
            f"--cert-dir={d / 'scheduler-certs'}",
        ])
        self._wait("kube-controller-manager", lambda: self._https_ok(kcm_port, "/healthz"))
        self._wait("kube-scheduler", lambda: self._https_ok(sched_port, "/healthz"))
        # the default ServiceAccount shows that the controller manager reached the apiserver
        client = self.client()
        self._wait("default ServiceAccount", lambda: client.get("/api/v1/namespaces/default/serviceaccounts/default"))
        self.start_seconds = time.monotonic() - t0

    def _spawn(self, name: str, argv: list[str]) -> None:
        argv = [*argv, *self.extra_args.get(name, [])]
        self.procs[name] = ManagedProcess(name, argv, self.workdir / f"{name}.log", cwd=str(self.workdir))

    def _https_ok(self, port: int, path: str, client: bool = False, host: str = "127.0.0.1") -> bool:
        ctx = ssl._create_unverified_context()
        if client:
            ctx.load_cert_chain(str(self.workdir / "pki" / "apiserver-kubelet-client.crt"),
                                str(self.workdir / "pki" / "apiserver-kubelet-client.key"))
        with urllib.request.urlopen(f"https://{host}:{port}{path}", context=ctx, timeout=3) as r:
            return r.status == 200

    def _wait(self, what: str, probe) -> None:
        wait_ready(what, probe, self.procs, self.start_timeout)


if __name__ == "__main__":
    # Manual use: start a control plane and keep it up until Ctrl-C.
    with ControlPlane() as cp:
        print(f"KUBECONFIG={cp.kubeconfig}  server={cp.server}  started in {cp.start_seconds:.1f}s", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass

"""Real Kueue on the test control plane: its CRDs, its controller manager as a process, its
admission webhooks served for real.

    with ControlPlane() as cp, Kueue(cp) as kq:
        kq.log_path, kq.webhook_url, kq.kubeconfig

What ``start()`` does (the binary, CRDs, webhook configurations and RBAC roles come from
``build.ensure_kueue()``, built from ``gomod/kueue`` and copied from the module on first use):

1. applies Kueue's CRDs (server-side apply, as every object here: the Workload CRD is too large
   for client-side apply's annotation), with the v1beta1 <-> v1beta2 conversion webhook that a
   real install configures on the CRDs that have one, pointed at the manager, and waits until
   every CRD is Established;
2. gives the manager an identity of its own: a client certificate for the user
   ``kueue-controller-manager`` (no groups), bound to the roles of Kueue's
   ``config/components/rbac``: the manager's ClusterRole, its Role on the Secrets of
   ``kueue-system`` and the metrics endpoint's TokenReview/SubjectAccessReview rights;
3. writes its Configuration (``config.kueue.x-k8s.io/v1beta2``): only the ``batch/job``
   integration, ``manageJobsWithoutQueueName: false``, leader election off, no waitForPodsReady,
   health, metrics and webhook servers on free loopback ports, Kueue's internal certificate
   management off (the webhook server reads a serving certificate issued here by the cluster CA,
   for 127.0.0.1), and the VisibilityOnDemand feature off (its aggregated API would need an
   APIService backed by a Service, which the apiserver cannot reach here);
4. starts the manager (``ManagedProcess``: own process group, ``kueue.log`` in the control plane's
   workdir) and waits for its ``/readyz`` (which includes the webhook server);
5. applies Kueue's Mutating/ValidatingWebhookConfigurations (from the release's
   ``config/components/webhook``), keeping the webhooks for ``batch`` Jobs and Kueue's own kinds
   (the manager serves the paths of every integration, but the others are for integrations that
   are off here; leaving out the Pod, Deployment and StatefulSet ones, all ``failurePolicy:
   Fail``, keeps Kueue out of the admission of every other pod of the session) and pointing each
   at ``https://127.0.0.1:<port>/<path>``
   with the cluster CA as caBundle; then waits until the apiserver calls them (a dry-run Job
   with a queue name comes back suspended, Kueue's Job defaulting).

``stop()`` removes the webhook configurations and the CRDs' conversion webhook first (so nothing
calls a manager that is gone), then stops the process. Kueue's objects and CRDs stay.

One oddity of Kueue v0.17's ``cmd/kueue``: with internal certificate management off it reads the
metrics server's certificate from the fixed path ``/etc/kueue/metrics/certs/tls.{crt,key}`` and
exits when it is missing (``certwatcher.New`` in ``main``; the metrics bind address does not matter). The manager therefore runs in a mount namespace of its own (``unshare``) where
``/etc`` is an overlay of the host's ``/etc`` with that one folder added; the host's ``/etc`` is
never written. Root is needed, as for the rest of the e2e tier (as a user, ``unshare`` is given
``--user --map-root-user``; untested, this machine runs as root).
"""

from __future__ import annotations

import base64
import copy
import json
import os
import sys
import time
import urllib.request
from pathlib import Path

import yaml

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "cluster"

from . import build, pki
from .controlplane import ControlPlane, ManagedProcess, free_port, wait_ready
from .kubeapi import ApiError, KubeClient
from .util import wait_for

GROUP = "kueue.x-k8s.io"
API = f"{GROUP}/v1beta2"  # the version Kueue v0.17 stores and its webhooks serve
QUEUE_LABEL = f"{GROUP}/queue-name"
GPU_RESOURCE = "nvidia.com/gpu"  # what the test nodes advertise (realnode.GPU, kubelet.GPU)
NAMESPACE = "kueue-system"  # the Configuration's namespace (Kueue's default)
USER = "kueue-controller-manager"
RBAC_PREFIX = "kubetune-test:kueue-"  # Kueue's roles, applied under this prefix
FIELD_MANAGER = "kubetune-test-kueue"
WEBHOOK_CONFIG_PREFIX = "kueue-"  # what Kueue's kustomize install names them: kueue-<name>
# The CRDs a Kueue install serves with a conversion webhook (its config/components/crd
# kustomization patches exactly these); the others convert v1beta1 <-> v1beta2 by apiVersion only.
CONVERSION_CRDS = ("localqueues", "clusterqueues", "cohorts", "workloads", "multikueueclusters")
# The webhooks kept: those for these API groups (the Job integration and Kueue's own kinds).
WEBHOOK_GROUPS = {"batch", GROUP}

# Run in the manager's own mount namespace: an overlay on /etc that adds
# /etc/kueue/metrics/certs/tls.{crt,key} (see the module docstring), then exec the manager.
_LAUNCH = r"""set -eu
d=$1 crt=$2 key=$3
shift 3
mount -t tmpfs -o size=1m,mode=0700 kubetune-kueue-etc "$d"
mkdir -p "$d/upper/kueue/metrics/certs" "$d/work"
cp "$crt" "$d/upper/kueue/metrics/certs/tls.crt"
cp "$key" "$d/upper/kueue/metrics/certs/tls.key"
mount -t overlay kubetune-kueue-etc -o "lowerdir=/etc,upperdir=$d/upper,workdir=$d/work" /etc
exec "$@"
"""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def crd_docs(kueue_dir: Path) -> list[dict]:
    docs = []
    for f in sorted((kueue_dir / build.KUEUE_CRDS).glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(f.read_text()) if d and d.get("kind") == "CustomResourceDefinition"]
    return docs


def webhook_configurations(kueue_dir: Path, base_url: str, ca_pem: bytes) -> list[dict]:
    """Kueue's webhook configurations, kept to WEBHOOK_GROUPS, each webhook called at
    ``base_url + <its path>`` and trusting ``ca_pem``."""
    out = []
    for doc in yaml.safe_load_all((kueue_dir / "webhook-manifests.yaml").read_text()):
        if not doc or not doc.get("kind", "").endswith("WebhookConfiguration"):
            continue
        doc = copy.deepcopy(doc)
        doc["metadata"] = {"name": WEBHOOK_CONFIG_PREFIX + doc["metadata"]["name"],
                           "labels": {"app.kubernetes.io/name": "kueue", "app.kubernetes.io/managed-by": "kubetune-test"}}
        kept = []
        for wh in doc.get("webhooks", []):
            groups = {g for rule in wh.get("rules", []) for g in rule.get("apiGroups", [])}
            if not groups or not groups <= WEBHOOK_GROUPS:
                continue
            path = wh["clientConfig"]["service"]["path"]
            wh["clientConfig"] = {"url": base_url + path, "caBundle": _b64(ca_pem)}
            kept.append(wh)
        doc["webhooks"] = kept
        out.append(doc)
    return out


class Kueue:
    """Kueue's controller manager on a running ``ControlPlane`` (see the module docstring)."""

    def __init__(self, cp: ControlPlane, kueue_dir: str | Path | None = None, start_timeout: float = 120.0,
                 frameworks: tuple[str, ...] = ("batch/job",)):
        self.cp = cp
        self.kueue_dir = Path(kueue_dir) if kueue_dir else None
        self.start_timeout = start_timeout
        self.frameworks = frameworks
        self.workdir = cp.workdir / "kueue"
        self.proc: ManagedProcess | None = None
        self.webhooks: list[dict] = []
        self.conversion_crds: list[str] = []
        self.webhook_url = ""
        self.kubeconfig = ""
        self.start_seconds = 0.0
        self.timings: dict[str, float] = {}  # seconds each start-up step took

    # -- public -----------------------------------------------------------------------------
    def __enter__(self) -> "Kueue":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def log_path(self) -> Path:
        return self.cp.workdir / "kueue.log"

    def tail(self, n: int = 40) -> str:
        return self.proc.tail(n) if self.proc else ""

    def start(self) -> None:
        try:
            self._start()
        except BaseException as e:
            tail = self.tail()
            self.stop()
            if tail and isinstance(e, Exception):
                raise RuntimeError(f"Kueue failed to start ({e}); last lines of {self.log_path}:\n{tail}") from e
            raise

    def stop(self) -> None:
        client = self.cp.client()
        for wh in self.webhooks:
            try:
                client.delete(_path(wh))
            except (ApiError, OSError):
                pass
        self.webhooks = []
        for name in self.conversion_crds:
            try:
                client.patch(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}",
                             {"spec": {"conversion": {"strategy": "None", "webhook": None}}})
            except (ApiError, OSError):
                pass
        self.conversion_crds = []
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    # -- start-up ---------------------------------------------------------------------------
    def _start(self) -> None:
        t0 = mark = time.monotonic()

        def step(name: str) -> None:
            nonlocal mark
            now = time.monotonic()
            self.timings[name] = round(now - mark, 1)
            mark = now

        if self.kueue_dir is None:
            self.kueue_dir = build.ensure_kueue()
        step("build")
        cp, kdir, wd = self.cp, self.kueue_dir, self.workdir
        assert cp.ca is not None, "the control plane is not started"
        wd.mkdir(parents=True, exist_ok=True)
        client = cp.client()
        ca_pem = pki.cert_pem(cp.ca.cert)

        webhook_port, health_port, metrics_port = free_port(), free_port(), free_port()
        self.webhook_url = f"https://127.0.0.1:{webhook_port}"

        # 1. CRDs, with the conversion webhook where a Kueue install has one
        crds = crd_docs(kdir)
        for crd in crds:
            if crd["spec"]["names"]["plural"] in CONVERSION_CRDS:
                crd["spec"]["conversion"] = {"strategy": "Webhook", "webhook": {
                    "clientConfig": {"url": f"{self.webhook_url}/convert", "caBundle": _b64(ca_pem)},
                    "conversionReviewVersions": ["v1"]}}
                self.conversion_crds.append(crd["metadata"]["name"])
        self._apply(crds)
        names = [c["metadata"]["name"] for c in crds]
        wait_for(lambda: all(_established(client, n) for n in names), self.start_timeout, "Kueue's CRDs Established")
        step("crds")

        # 2. identity and RBAC: Kueue's own roles (ClusterRoles renamed, the Role in NAMESPACE)
        self.kubeconfig = cp.write_kubeconfig("kueue", USER)
        rbac: list[dict] = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}]
        for f in sorted(kdir.glob("rbac-*.yaml")):
            for role in yaml.safe_load_all(f.read_text()):
                if not role or role.get("kind") not in ("ClusterRole", "Role"):
                    continue
                name = RBAC_PREFIX + role["metadata"]["name"]
                meta = {"name": name} if role["kind"] == "ClusterRole" else {"name": name, "namespace": NAMESPACE}
                role["metadata"] = meta
                binding_kind = "ClusterRoleBinding" if role["kind"] == "ClusterRole" else "RoleBinding"
                rbac += [role, {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": binding_kind, "metadata": meta,
                                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role["kind"], "name": name},
                                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": USER}]}]
        self._apply(rbac)
        step("rbac")

        # 3. serving certificate and Configuration
        certs = wd / "certs"
        certs.mkdir(exist_ok=True)
        crt, key = cp.ca.write_pair(certs, "tls", common_name="kueue-webhook", server=True,
                                    ips=("127.0.0.1",), dns=("localhost",))
        config = {
            "apiVersion": "config.kueue.x-k8s.io/v1beta2", "kind": "Configuration",
            "namespace": NAMESPACE,
            "manageJobsWithoutQueueName": False,
            "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
            "metrics": {"bindAddress": f"127.0.0.1:{metrics_port}"},
            "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": str(certs)},
            "leaderElection": {"leaderElect": False},
            "internalCertManagement": {"enable": False},
            "integrations": {"frameworks": list(self.frameworks)},
            "featureGates": {"VisibilityOnDemand": False},
            "clientConnection": {"qps": 50, "burst": 100},
        }
        config_path = wd / "config.yaml"
        config_path.write_text(yaml.safe_dump(config))

        # 4. the manager, in a mount namespace of its own (the metrics certificate's fixed path)
        etc = wd / "etc-overlay"
        etc.mkdir(exist_ok=True)
        unshare = ["unshare", "--mount", "--propagation", "private"]
        if os.geteuid() != 0:
            unshare[1:1] = ["--user", "--map-root-user"]
        argv = [*unshare, "sh", "-c", _LAUNCH, "kueue-launch", str(etc), str(crt), str(key),
                str(kdir / "kueue"), f"--config={config_path}"]
        env = dict(os.environ, KUBECONFIG=self.kubeconfig)
        self.proc = ManagedProcess("kueue", argv, self.log_path, env=env, cwd=str(wd))
        wait_ready("kueue", lambda: _http_ok(f"http://127.0.0.1:{health_port}/readyz"), {"kueue": self.proc},
                   self.start_timeout)
        step("manager")

        # 5. the webhooks, then proof that the apiserver calls them
        self.webhooks = webhook_configurations(kdir, self.webhook_url, ca_pem)
        self._apply(self.webhooks)
        wait_ready("Kueue's Job webhook", lambda: self._job_defaulted(client), {"kueue": self.proc}, self.start_timeout)
        step("webhooks")
        self.start_seconds = time.monotonic() - t0

    def _apply(self, objs: list[dict]) -> None:
        """Server-side apply of each object, straight to the apiserver (kubectl would spend
        seconds on discovery per call)."""
        client = self.cp.client()
        for obj in objs:
            client.request("PATCH", _path(obj), json.dumps(obj), {"fieldManager": FIELD_MANAGER, "force": True},
                           content_type="application/apply-patch+yaml")

    @staticmethod
    def _job_defaulted(client: KubeClient) -> bool:
        """A dry-run Job with a queue name and no `suspend` comes back suspended: the apiserver
        calls Kueue's Job webhook (dry-run reaches webhooks without side effects)."""
        job = {"apiVersion": "batch/v1", "kind": "Job",
               "metadata": {"generateName": "kueue-webhook-probe-", "labels": {QUEUE_LABEL: "probe"}},
               "spec": {"template": {"spec": {"restartPolicy": "Never",
                                              "containers": [{"name": "c", "image": "probe"}]}}}}
        created = client.post("/apis/batch/v1/namespaces/default/jobs", job, dryRun="All")
        return created["spec"].get("suspend") is True


# Where the kinds this module applies live (REST paths, without the name).
_KIND_PATHS = {
    "CustomResourceDefinition": "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
    "Namespace": "/api/v1/namespaces",
    "ClusterRole": "/apis/rbac.authorization.k8s.io/v1/clusterroles",
    "ClusterRoleBinding": "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
    "Role": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles",
    "RoleBinding": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings",
    "MutatingWebhookConfiguration": "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations",
    "ValidatingWebhookConfiguration": "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations",
}


def _path(obj: dict) -> str:
    meta = obj["metadata"]
    return _KIND_PATHS[obj["kind"]].format(ns=meta.get("namespace", "")) + "/" + meta["name"]


def _established(client: KubeClient, name: str) -> bool:
    crd = client.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
    return any(c["type"] == "Established" and c["status"] == "True" for c in (crd.get("status") or {}).get("conditions") or [])


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=3) as r:
        return r.status == 200


if __name__ == "__main__":
    # Manual use: a control plane with Kueue, up until Ctrl-C.
    import signal

    with ControlPlane() as cp, Kueue(cp) as kq:
        print(f"KUBECONFIG={cp.kubeconfig}  Kueue up in {kq.start_seconds:.1f}s, log {kq.log_path}", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass

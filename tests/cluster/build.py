"""Build the control-plane binaries the e2e tests run, from Go modules, pinned and cached.

What it builds (versions pinned below and in the wrapper modules under ``gomod/``):

* ``kube-apiserver``, ``kube-controller-manager``, ``kube-scheduler``, ``kubectl`` from
  ``k8s.io/kubernetes`` (wrapper ``gomod/kube``: it replaces every staging module, which
  ``k8s.io/kubernetes`` requires at ``v0.0.0``, with its published ``v0.N.P`` release);
* ``etcd`` from ``go.etcd.io/etcd/server/v3`` (wrapper ``gomod/etcd``: a three-line main that
  calls ``etcdmain.Main``, since ``go install`` of the server module fails on its replaces);
* ``helm`` from ``helm.sh/helm/v3`` (wrapper ``gomod/helm``);
* for the real node (``realnode.py``): ``kubelet`` and ``kube-proxy`` in the same build as the
  control plane, ``coredns`` (wrapper ``gomod/coredns``: CoreDNS with only the plugins the
  cluster DNS needs) and ``pause``, the sandbox image's program (``gomod/pause``, no
  dependencies).

Each wrapper has its own go.mod/go.sum, committed, so a build is reproducible and the
dependency graphs (which disagree on grpc/otel versions) never mix. Version ldflags are set so
``/version`` and ``helm version`` report the real releases.

Binaries land in ``$KUBETUNE_TEST_BIN_DIR`` or ``~/.cache/kubetune-test/bin/<key>/`` where the key
encodes the pinned versions, the Go version and a hash of the wrapper modules; a binary that is
already there is not rebuilt; the folder counts as done once its ``.complete`` marker is written.
A file lock keeps two concurrent builders from racing.

Kueue (``sigs.k8s.io/kueue``, wrapper ``gomod/kueue``) is built apart and only on demand: it is not
in ``targets()``, so the e2e tier's cold build does not grow unless a test asks for it.
``ensure_kueue()`` builds its controller manager into a folder of its own,
``~/.cache/kubetune-test/kueue/<version + go version + hash of gomod/kueue>/``, and copies Kueue's
CRDs, webhook configurations and the manager's RBAC roles from the module (``go list -m``) beside it
(``kueue.py`` reads them there).

Usage: ``python tests/cluster/build.py`` (prints progress, then the bin dir), ``--kueue`` for
Kueue's folder, or ``ensure_binaries()`` / ``ensure_kueue()`` from Python.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

KUBERNETES_VERSION = "v1.34.4"
ETCD_VERSION = "v3.6.16"
HELM_VERSION = "v3.19.5"
COREDNS_VERSION = "v1.15.0"
KUEUE_VERSION = "v0.17.0"  # also in gomod/kueue/go.mod
# Bump when the way the binaries are built (flags, ldflags) changes, to invalidate caches.
BUILD_REVISION = "1"

HERE = Path(__file__).resolve().parent
GOMOD = HERE / "gomod"

KUBE_BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
NODE_BINARIES = ("kubelet", "kube-proxy")  # the real node (realnode.py): same module, same build
ALL_BINARIES = ("etcd",) + KUBE_BINARIES + NODE_BINARIES + ("helm", "coredns", "pause")
MODULES = ("kube", "etcd", "helm", "coredns", "pause")


def _log(msg: str) -> None:
    print(f"[kubetune-test build {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def go_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("GOTOOLCHAIN", "local")
    env.setdefault("CGO_ENABLED", "0")
    # go.sum is committed; never let a build rewrite it silently.
    env["GOFLAGS"] = " ".join(f for f in env.get("GOFLAGS", "").split() if not f.startswith("-mod=")) + " -mod=readonly"
    return env


def go_version() -> str:
    out = subprocess.run(["go", "env", "GOVERSION"], capture_output=True, text=True, check=True, env=go_env())
    return out.stdout.strip()


def _modules_hash(modules: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for sub in modules:
        for name in sorted(os.listdir(GOMOD / sub)):
            p = GOMOD / sub / name
            if p.is_file():
                h.update(f"{sub}/{name}\0".encode())
                h.update(p.read_bytes())
    h.update(BUILD_REVISION.encode())
    return h.hexdigest()[:10]


def cache_key() -> str:
    return (
        f"k8s-{KUBERNETES_VERSION}_etcd-{ETCD_VERSION}_helm-{HELM_VERSION}_coredns-{COREDNS_VERSION}"
        f"_{go_version()}_{_modules_hash(MODULES)}"
    )


def _cache_base() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kubetune-test"


def bin_dir() -> Path:
    override = os.environ.get("KUBETUNE_TEST_BIN_DIR")
    if override:
        return Path(override)
    return _cache_base() / "bin" / cache_key()


def _kube_ldflags() -> str:
    major, minor = KUBERNETES_VERSION.lstrip("v").split(".")[:2]
    flags = ["-s", "-w"]
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [
            f"-X {pkg}.gitVersion={KUBERNETES_VERSION}",
            f"-X {pkg}.gitMajor={major}",
            f"-X {pkg}.gitMinor={minor}",
            f"-X {pkg}.gitTreeState=clean",
            f"-X {pkg}.buildDate=1970-01-01T00:00:00Z",
        ]
    return " ".join(flags)


def _helm_ldflags() -> str:
    # helm's Makefile: the kube version it assumes for lint/template is client-go's minor,
    # with major+1 (client-go v0.34 -> Kubernetes 1.34).
    major, minor = KUBERNETES_VERSION.lstrip("v").split(".")[:2]
    return " ".join(
        [
            "-s",
            "-w",
            f"-X helm.sh/helm/v3/internal/version.version={HELM_VERSION}",
            "-X helm.sh/helm/v3/internal/version.gitTreeState=clean",
            f"-X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor={major}",
            f"-X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor={minor}",
            f"-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor={major}",
            f"-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor={minor}",
        ]
    )


def _go_build(module_dir: Path, out_dir: Path, ldflags: str, packages: list[str]) -> None:
    """`go build` of `packages` inside the module at `module_dir`, binaries into `out_dir`; the
    output goes to stderr as it comes, its tail into the error when the build fails."""
    cmd = ["go", "build", "-trimpath", "-ldflags", ldflags, "-o", str(out_dir) + "/", *packages]
    _log(f"in {module_dir.name}: {' '.join(cmd[:2])} ... {' '.join(packages)}")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=module_dir, env=go_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines: list[str] = []
    for line in proc.stdout:
        lines.append(line)
        sys.stderr.write("    " + line)
    rc = proc.wait()
    if rc != 0:
        raise RuntimeError(f"go build failed ({rc}) in {module_dir}:\n{''.join(lines[-50:])}")
    _log(f"built {', '.join(Path(p).name for p in packages if p != '.') or module_dir.name} in "
         f"{time.monotonic() - t0:.0f}s")


def _heartbeat(stop: threading.Event, what: list[str]) -> None:
    t0 = time.monotonic()
    while not stop.wait(30):
        _log(f"still building {what[0]} ... {time.monotonic() - t0:.0f}s elapsed")


@dataclass(frozen=True)
class GoTarget:
    """One `go build` invocation: `packages` of the wrapper module in `module`, giving `outputs`."""

    name: str
    module: Path
    ldflags: str
    packages: tuple[str, ...]
    outputs: tuple[str, ...]


def targets() -> list[GoTarget]:
    """What the e2e tier runs, one build per wrapper module (their dependency graphs disagree)."""
    return [
        GoTarget("etcd", GOMOD / "etcd", "-s -w", (".",), ("etcd",)),
        GoTarget("kubernetes", GOMOD / "kube", _kube_ldflags(),
                 tuple(f"k8s.io/kubernetes/cmd/{b}" for b in KUBE_BINARIES + NODE_BINARIES),
                 KUBE_BINARIES + NODE_BINARIES),
        GoTarget("helm", GOMOD / "helm", _helm_ldflags(), ("helm.sh/helm/v3/cmd/helm",), ("helm",)),
        GoTarget("coredns", GOMOD / "coredns", "-s -w", (".",), ("coredns",)),
        GoTarget("pause", GOMOD / "pause", "-s -w", (".",), ("pause",)),
    ]


COMPLETE = ".complete"


def ensure_binaries(verbose: bool = True, plan: list[GoTarget] | None = None, target: Path | None = None,
                    finish: Callable[[Path], None] | None = None) -> Path:
    """Return the directory holding every output of `plan` (default: `targets()` in `bin_dir()`),
    building what is missing.

    The directory counts as done only once its `.complete` marker is written, after every binary
    is in place and `finish(target)` (files that are not built, e.g. Kueue's CRDs) has run; each binary is built into a staging folder and moved in with one rename, so an
    interrupted build leaves no half-written binary, and the next run builds only what is missing.
    A file lock keeps concurrent builders (two pytest sessions, CI and a developer) apart."""
    plan = targets() if plan is None else plan
    target = bin_dir() if target is None else target
    outputs = [o for t in plan for o in t.outputs]
    if (target / COMPLETE).is_file() and all((target / o).is_file() for o in outputs):
        return target
    target.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / (target.name + ".lock")
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if shutil.which("go", path=go_env().get("PATH")) is None:
            raise RuntimeError("Go is needed to build the test control plane (go not on PATH)")
        stop, what = threading.Event(), ["binaries"]
        if verbose:
            threading.Thread(target=_heartbeat, args=(stop, what), daemon=True).start()
        t0 = time.monotonic()
        try:
            staging = target.parent / (target.name + ".partial")
            staging.mkdir(exist_ok=True)
            for t in plan:
                if all((target / o).is_file() for o in t.outputs):
                    continue
                what[0] = t.name
                _log(f"building {t.name} (from an empty Go build cache: seconds to minutes on 2 cores)")
                out = staging / t.name
                out.mkdir(exist_ok=True)
                _go_build(t.module, out, t.ldflags, list(t.packages))
                if t.packages == (".",) and len(t.outputs) == 1 and not (out / t.outputs[0]).exists():
                    # the package "." is named after the wrapper module's last path element
                    next(out.iterdir()).rename(out / t.outputs[0])
                for o in t.outputs:
                    os.replace(out / o, target / o)
            shutil.rmtree(staging, ignore_errors=True)
            if finish is not None:
                finish(target)
            (target / COMPLETE).write_text(json.dumps({"outputs": outputs, "go": go_version()}) + "\n")
        finally:
            stop.set()
        _log(f"all binaries in {target} ({time.monotonic() - t0:.0f}s)")
    return target


# -- Kueue: built only when a test asks for it -------------------------------------------------

KUEUE_MODULE = "sigs.k8s.io/kueue"
# What ensure_kueue copies from the module into its folder, for kueue.py to read at run time.
KUEUE_CRDS = "crds"  # every CRD of config/components/crd/bases
KUEUE_FILES = {
    "config/components/webhook/manifests.yaml": "webhook-manifests.yaml",
    # the manager's RBAC: its ClusterRole, the Secrets of its namespace, the metrics endpoint's
    # TokenReviews and SubjectAccessReviews
    "config/components/rbac/role.yaml": "rbac-manager-role.yaml",
    "config/components/rbac/manager_secrets_role.yaml": "rbac-manager-secrets-role.yaml",
    "config/components/rbac/metrics_auth_role.yaml": "rbac-metrics-auth-role.yaml",
}


def kueue_target() -> GoTarget:
    ldflags = " ".join([
        "-s", "-w",
        f"-X {KUEUE_MODULE}/pkg/version.GitVersion={KUEUE_VERSION}",
        f"-X {KUEUE_MODULE}/pkg/version.BuildDate=1970-01-01T00:00:00Z",
    ])
    return GoTarget("kueue", GOMOD / "kueue", ldflags, (f"{KUEUE_MODULE}/cmd/kueue",), ("kueue",))


def kueue_dir() -> Path:
    """Kueue's cache folder: its version, the Go version and a hash of gomod/kueue (and of the
    build revision) name it; ``KUBETUNE_TEST_KUEUE_DIR`` overrides it."""
    override = os.environ.get("KUBETUNE_TEST_KUEUE_DIR")
    if override:
        return Path(override)
    return _cache_base() / "kueue" / f"kueue-{KUEUE_VERSION}_{go_version()}_{_modules_hash(('kueue',))}"


def kueue_module_dir() -> Path:
    """Where the Go module cache holds the Kueue release the wrapper requires."""
    out = subprocess.run(["go", "list", "-m", "-json", KUEUE_MODULE], cwd=GOMOD / "kueue", env=go_env(),
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"go list -m {KUEUE_MODULE} failed:\n{out.stderr}")
    info = json.loads(out.stdout)
    if info.get("Version") != KUEUE_VERSION or not info.get("Dir"):
        raise RuntimeError(f"gomod/kueue resolves {KUEUE_MODULE} {info.get('Version')} (Dir {info.get('Dir')!r}), "
                           f"build.py pins {KUEUE_VERSION}")
    return Path(info["Dir"])


def _copy_kueue_manifests(target: Path) -> None:
    src = kueue_module_dir()
    staging = target / (KUEUE_CRDS + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    crds = sorted((src / "config/components/crd/bases").glob("*.yaml"))
    if not crds:
        raise RuntimeError(f"no CRDs in {src}/config/components/crd/bases")
    for f in crds:  # copyfile, not copy: the module cache's files are read-only
        shutil.copyfile(f, staging / f.name)
    shutil.rmtree(target / KUEUE_CRDS, ignore_errors=True)
    staging.rename(target / KUEUE_CRDS)
    for rel, name in KUEUE_FILES.items():
        shutil.copyfile(src / rel, target / (name + ".partial"))
        os.replace(target / (name + ".partial"), target / name)


def ensure_kueue(verbose: bool = True) -> Path:
    """Return Kueue's folder: the ``kueue`` manager binary, ``crds/*.yaml`` and the files of
    ``KUEUE_FILES``, building and copying what is missing (the first call: minutes)."""
    target = kueue_dir()
    if (target / COMPLETE).is_file() and (target / KUEUE_CRDS).is_dir() and all(
            (target / n).is_file() for n in KUEUE_FILES.values()):
        return ensure_binaries(verbose, plan=[kueue_target()], target=target)
    (target / COMPLETE).unlink(missing_ok=True)
    return ensure_binaries(verbose, plan=[kueue_target()], target=target, finish=_copy_kueue_manifests)


if __name__ == "__main__":
    print(ensure_kueue() if "--kueue" in sys.argv[1:] else ensure_binaries())

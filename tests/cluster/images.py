"""Build kubetune's two images for real, from the Dockerfiles a user builds, with podman (buildah).

No registry is reachable here (no ``nvcr.io``, no Docker Hub), so the ``FROM`` images are
**stand-in bases** built on this machine, each passed to the Dockerfile as its base build
argument (``BASE_IMAGE`` / ``PYTHON_IMAGE``):

* ``debian-python``: Debian bookworm made by ``mmdebstrap`` (minbase + python3, pip, passwd,
  ca-certificates) and imported with ``podman import``;
* the **PyTorch stand-in** (for ``nvcr.io/nvidia/pytorch``): that plus what our Dockerfile
  relies on from the NGC image — Python and pip in the system site-packages (no
  EXTERNALLY-MANAGED marker, ``python`` on PATH), torch at the version ``constraints.txt`` pins
  preinstalled, a pip constraint file pinning it through ``PIP_CONSTRAINT`` as NGC does, and uid
  1000 free. PyPI's torch for Linux is the CUDA build (with NVIDIA's CUDA libraries as wheels),
  so torch reports a CUDA version as in NGC; there is no GPU or driver, so CUDA is never
  available at run time;
* the **Python stand-in** (for ``python:3.11-slim-bookworm``): debian-python with pip usable
  system-wide.

``images/README.md`` lists what the stand-ins reproduce and what they cannot. Every image is
cached in podman's storage under ``~/.cache/kubetune-test/containers`` and tagged with a key
of what went into it (the stand-ins: their recipe; our images: the Dockerfile, every file the
build context sends, and the base's key), so an unchanged image is never rebuilt.

RUN steps use the host's network (``--network host``) and, when present, the host's pip
configuration and CA bundle (mounted for the build only, never stored in an image), so pip
inside the build reaches the same package index as pip outside.

Usage: ``python tests/cluster/images.py`` builds both images and prints their names;
``ensure_images()`` does the same from Python.
"""

from __future__ import annotations

import fcntl
import fnmatch
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Bump when a stand-in's recipe changes in a way the key below does not see.
STANDIN_REVISION = "1"
DEBIAN_SUITE = "bookworm"
DEBIAN_PACKAGES = ("python3", "python3-pip", "python-is-python3", "passwd", "ca-certificates")
RUNTIME_UID = 1000
TOOLS = ("podman", "mmdebstrap", "runc")


def _log(msg: str) -> None:
    print(f"[kubetune-test images {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kubetune-test"
    return Path(os.environ.get("KUBETUNE_TEST_CONTAINERS_DIR", base / "containers"))


def unavailable() -> str | None:
    """Why images cannot be built here (None when they can)."""
    if os.geteuid() != 0:
        return "building images needs root (rootless podman is not set up by the tests)"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"missing {', '.join(missing)} (Debian packages podman, mmdebstrap, runc)"
    return None


def podman_env() -> dict[str, str]:
    """podman/buildah settings of the tests' own, in files under cache_root(): images in our own
    storage, runc with cgroupfs (crun fails on this hybrid cgroup layout), no default ulimits
    (raising RLIMIT_NOFILE is denied in this VM)."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    conf, storage = root / "containers.conf", root / "storage.conf"
    conf_text = ("[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = \"runc\"\n"
                 "cgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n")
    storage_text = (f"[storage]\ndriver = \"overlay\"\ngraphroot = \"{root / 'storage'}\"\n"
                    f"runroot = \"{root / 'run'}\"\n")
    for path, text in ((conf, conf_text), (storage, storage_text)):
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
    env = dict(os.environ)
    env.update(CONTAINERS_CONF=str(conf), CONTAINERS_STORAGE_CONF=str(storage), BUILDAH_LAYERS="true")
    return env


def podman(*args: str, check: bool = True, capture: bool = True, input: bytes | None = None,
           timeout: float | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(["podman", *args], env=podman_env(), input=input, timeout=timeout,
                       capture_output=capture)
    if check and r.returncode != 0:
        err = (r.stderr or b"").decode(errors="replace")[-4000:] if capture else ""
        raise RuntimeError(f"podman {' '.join(args[:3])} ... failed ({r.returncode}):\n{err}")
    return r


def image_exists(ref: str) -> bool:
    return podman("image", "exists", ref, check=False).returncode == 0


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:12]


def _pinned(name: str) -> str:
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.lower().startswith(f"{name.lower()}=="):
            return line.split("==", 1)[1].strip()
    raise RuntimeError(f"constraints.txt pins no {name}")


def _host_build_mounts() -> list[str]:
    """The host's pip configuration and CA bundle, for RUN steps only (not stored in the image)."""
    out: list[str] = []
    for path in ("/etc/pip.conf", "/etc/ssl/certs/ca-certificates.crt"):
        if os.path.isfile(path):
            out += ["--volume", f"{path}:{path}:ro"]
    return out


def _build(ref: str, containerfile: Path, context: Path, build_args: dict[str, str], what: str,
           ignorefile: Path | None = None) -> None:
    argv = ["build", "--network", "host", "--layers", *_host_build_mounts(), "-f", str(containerfile), "-t", ref]
    if ignorefile is not None:
        argv += ["--ignorefile", str(ignorefile)]
    for k, v in build_args.items():
        argv += ["--build-arg", f"{k}={v}"]
    _log(f"building {what} ({ref})")
    t0 = time.monotonic()
    r = subprocess.run(["podman", *argv, str(context)], env=podman_env(), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"podman build of {what} failed ({r.returncode}):\n{r.stdout[-6000:]}")
    _log(f"built {what} in {time.monotonic() - t0:.0f}s")


# ------------------------------------------------------------------------------ stand-in bases
def debian_python() -> str:
    """Debian + Python, made with mmdebstrap, imported into podman's storage."""
    recipe = f"{DEBIAN_SUITE} minbase {' '.join(DEBIAN_PACKAGES)} r{STANDIN_REVISION}"
    ref = f"localhost/kubetune-test/debian-python:{_digest(recipe)}"
    if image_exists(ref):
        return ref
    _log(f"making a Debian {DEBIAN_SUITE} root filesystem with mmdebstrap (about a minute)")
    with tempfile.TemporaryDirectory(prefix="kubetune-rootfs-") as tmp:
        tar = Path(tmp) / "rootfs.tar"
        r = subprocess.run(["mmdebstrap", "--variant=minbase", "--quiet", f"--include={','.join(DEBIAN_PACKAGES)}",
                            DEBIAN_SUITE, str(tar)], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"mmdebstrap failed ({r.returncode}):\n{r.stderr[-4000:]}")
        podman("import", "--change", "CMD [\"python3\"]", str(tar), ref)
    return ref


PYTORCH_STANDIN = """\
# Stand-in for nvcr.io/nvidia/pytorch (generated by tests/cluster/images.py; see images/README.md)
ARG BASE
FROM ${{BASE}}
ARG TORCH_VERSION
ARG NUMPY_VERSION
# NGC installs into the system site-packages with pip and pins its own builds (by their
# distribution versions) in a constraint file named by PIP_CONSTRAINT; so does this.
RUN rm -f /usr/lib/python3*/EXTERNALLY-MANAGED \\
 && pip install --no-cache-dir "torch==${{TORCH_VERSION}}" "numpy==${{NUMPY_VERSION}}" \\
 && mkdir -p /etc/pip \\
 && python -c "from importlib.metadata import version as v; print(f'torch=={{v(\\"torch\\")}}'); print(f'numpy=={{v(\\"numpy\\")}}')" > /etc/pip/constraint.txt \\
 && ! getent passwd {uid}
ENV PIP_CONSTRAINT=/etc/pip/constraint.txt
"""

PYTHON_STANDIN = """\
# Stand-in for python:3.11-slim-bookworm (generated by tests/cluster/images.py; see images/README.md)
ARG BASE
FROM ${{BASE}}
RUN rm -f /usr/lib/python3*/EXTERNALLY-MANAGED && python --version && pip --version && ! getent passwd {uid}
"""


def _standin(name: str, template: str, args: dict[str, str]) -> str:
    base = debian_python()
    text = template.format(uid=RUNTIME_UID)
    ref = f"localhost/kubetune-test/{name}:{_digest(base, text, repr(sorted(args.items())))}"
    if image_exists(ref):
        return ref
    with tempfile.TemporaryDirectory(prefix="kubetune-standin-") as tmp:
        cf = Path(tmp) / "Containerfile"
        cf.write_text(text)
        _build(ref, cf, Path(tmp), {"BASE": base, **args}, f"the {name} stand-in base")
    return ref


def pytorch_standin() -> str:
    return _standin("pytorch-standin", PYTORCH_STANDIN,
                    {"TORCH_VERSION": _pinned("torch"), "NUMPY_VERSION": _pinned("numpy")})


def python_standin() -> str:
    return _standin("python-standin", PYTHON_STANDIN, {})


# ------------------------------------------------------------------------------ our images
def _ignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule: a path is left out when it, or a folder above it, matches a pattern
    (`**/` matches any number of folders)."""
    parts = rel.split("/")
    for i in range(1, len(parts) + 1):
        prefix = parts[:i]
        for pat in patterns:
            if pat.startswith("**/"):
                if any(fnmatch.fnmatch("/".join(prefix[j:]), pat[3:]) for j in range(len(prefix))):
                    return True
            elif fnmatch.fnmatch("/".join(prefix), pat):
                return True
    return False


def _context_files(ignorefile: Path) -> list[Path]:
    """Files of the repository the build context sends, by the Dockerfile's .dockerignore (the
    `*` then `!allowed` form our ignore files use, plus exclusion patterns)."""
    allow, deny = [], []
    for raw in ignorefile.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or line == "*":
            continue
        (allow if line.startswith("!") else deny).append(line.lstrip("!").rstrip("/"))
    out = []
    for a in allow:
        p = REPO / a
        for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
            if f.is_file() and not _ignored(f.relative_to(REPO).as_posix(), deny):
                out.append(f)
    return out


@dataclass(frozen=True)
class ImageRecipe:
    name: str  # runtime | operator
    base_arg: str  # the Dockerfile's build argument naming its base

    @property
    def dockerfile(self) -> Path:
        return REPO / "images" / self.name / "Dockerfile"

    @property
    def ignorefile(self) -> Path:
        return REPO / "images" / self.name / "Dockerfile.dockerignore"


RUNTIME = ImageRecipe("runtime", "BASE_IMAGE")
OPERATOR = ImageRecipe("operator", "PYTHON_IMAGE")


def build_args(recipe: ImageRecipe, base: str) -> dict[str, str]:
    return {recipe.base_arg: base, "VERSION": project_version()}


def content_key(recipe: ImageRecipe, base: str) -> str:
    """The image's cache key: its build arguments, Dockerfile, ignore file and context files."""
    h = hashlib.sha256()
    h.update(repr(sorted(build_args(recipe, base).items())).encode())
    for f in [recipe.dockerfile, recipe.ignorefile, *_context_files(recipe.ignorefile)]:
        h.update(f.relative_to(REPO).as_posix().encode() + b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def project_version() -> str:
    """The version in pyproject.toml: what `make images` passes as the VERSION build argument."""
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def build_image(recipe: ImageRecipe, base: str) -> str:
    """Our Dockerfile, built as `make images` builds it (VERSION from pyproject.toml), FROM the
    stand-in `base`."""
    ref = f"localhost/kubetune/{recipe.name}:test-{content_key(recipe, base)}"
    if not image_exists(ref):
        _build(ref, recipe.dockerfile, REPO, build_args(recipe, base), f"the {recipe.name} image",
               ignorefile=recipe.ignorefile)
    return ref


def ensure_images() -> dict[str, str]:
    """Build (or find cached) the runtime and operator images; returns {name: image ref}."""
    why = unavailable()
    if why:
        raise RuntimeError(f"cannot build images here: {why}")
    lock_path = cache_root() / "build.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        bases = {"operator": python_standin(), "runtime": pytorch_standin()}
        refs = {"operator": build_image(OPERATOR, bases["operator"]),
                "runtime": build_image(RUNTIME, bases["runtime"])}
        _forget_stale(set(refs.values()) | set(bases.values()))
        return refs


OUR_REPOSITORIES = ("localhost/kubetune/", "localhost/kubetune-test/")


def _forget_stale(keep: set[str]) -> None:
    """Remove older builds of our images (another commit's runtime image, an old stand-in), so
    the cache holds one build of each (the untagged intermediate layers of `--layers` stay: they
    are the build cache of the next change)."""
    listed = podman("images", "--format", "{{.Repository}}:{{.Tag}}").stdout.decode().split()
    ours = [r for r in listed if r.startswith(OUR_REPOSITORIES)]
    # our images' builds (`:test-<key>`) and the stand-ins (`-standin:<key>`), not the pause image
    stale = [r for r in ours if r not in keep and (":test-" in r or r.split(":")[0].endswith("-standin"))]
    if stale:
        podman("rmi", *stale, check=False)


def image_id(ref: str) -> str:
    return podman("image", "inspect", "--format", "{{.Id}}", ref).stdout.decode().strip()


def pause_image(binary: Path, ref: str) -> str:
    """The sandbox (pause) image of the real node: `FROM scratch` + the static pause program that
    build.py makes (registry.k8s.io/pause cannot be pulled here)."""
    key = hashlib.sha256(binary.read_bytes()).hexdigest()[:12]
    if image_exists(ref) and podman("image", "inspect", "--format", "{{index .Labels \"kubetune.test/pause\"}}",
                                    ref).stdout.decode().strip() == key:
        return ref
    with tempfile.TemporaryDirectory(prefix="kubetune-pause-") as tmp:
        shutil.copy2(binary, Path(tmp) / "pause")
        (Path(tmp) / "Containerfile").write_text(
            f'FROM scratch\nLABEL kubetune.test/pause="{key}"\nCOPY pause /pause\nUSER 65535:65535\n'
            'ENTRYPOINT ["/pause"]\n')
        _build(ref, Path(tmp) / "Containerfile", Path(tmp), {}, "the pause image")
    return ref


def export_to(ref: str, import_argv: list[str], timeout: float = 1800) -> None:
    """Stream the image as a docker-archive (names kept) into `import_argv` (e.g. `ctr images
    import -`), without a temporary copy of a multi-GB tar."""
    save = subprocess.Popen(["podman", "save", "--format", "docker-archive", ref], env=podman_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        imp = subprocess.run(import_argv, stdin=save.stdout, capture_output=True, timeout=timeout)
    finally:
        assert save.stdout is not None
        save.stdout.close()
        save_err = save.stderr.read().decode(errors="replace") if save.stderr else ""
        save.wait(60)
    if save.returncode != 0 or imp.returncode != 0:
        raise RuntimeError(f"exporting {ref} failed: podman save {save.returncode}: {save_err[-2000:]}; "
                           f"import {imp.returncode}: {imp.stderr.decode(errors='replace')[-2000:]}")


if __name__ == "__main__":
    for name, ref in ensure_images().items():
        print(f"{name}\t{ref}")

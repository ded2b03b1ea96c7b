"""images/: the Dockerfiles parse (dockerfile-parse, the parser of OpenShift's build tooling),
their base images, users, entrypoints and install lines are what we say; the runtime's
constraints keep the image's torch (make_constraints.py run in an interpreter that sees only a
fake NGC package set, and pip's resolver run offline on its output against stub wheels);
the Makefile builds both images for amd64 + arm64 with buildx. No Docker engine here: the
images themselves are built by `make images` on a machine that has one."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

dockerfile_parse = pytest.importorskip("dockerfile_parse")

from .chartlib import REPO  # noqa: E402

IMAGES = REPO / "images"
sys.path.insert(0, str(IMAGES / "runtime"))
import make_constraints  # noqa: E402


def parse(path):
    p = dockerfile_parse.DockerfileParser(path=str(path), cache_content=True)
    p.content  # noqa: B018 - parse now: a broken file fails here
    return p


def instructions(p, name: str, stage: str | None = None) -> list[dict]:
    out, current = [], None
    for ins in p.structure:
        if ins["instruction"] == "FROM":
            parts = ins["value"].split()
            current = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
        if ins["instruction"] == name and (stage is None or current == stage):
            out.append(ins)
    return out


def arg_default(p, name: str) -> str:
    for ins in instructions(p, "ARG"):
        key, _, value = ins["value"].partition("=")
        if key == name:
            return value.strip('"')
    raise KeyError(name)


def final_user(p) -> str:
    return instructions(p, "USER")[-1]["value"]


def exec_form(ins: dict) -> list[str]:
    value = json.loads(ins["value"])
    assert isinstance(value, list), f"{ins['instruction']} must be in exec form (signals reach python)"
    return value


# ------------------------------------------------------------------------------ runtime image


def test_runtime_dockerfile():
    p = parse(IMAGES / "runtime" / "Dockerfile")
    assert arg_default(p, "BASE_IMAGE") == "nvcr.io/nvidia/pytorch:25.11-py3"
    froms = [i["value"] for i in instructions(p, "FROM")]
    assert froms == ["${BASE_IMAGE} AS bitsandbytes", "${BASE_IMAGE} AS runtime"]
    assert final_user(p) == "1000:1000"
    assert exec_form(instructions(p, "ENTRYPOINT")[-1]) == ["python", "-m", "kubetune.runtime"]
    runs = " ".join(i["value"] for i in instructions(p, "RUN", stage="runtime"))
    assert "make_constraints.py" in runs and "--constraint /etc/kubetune-constraints.txt" in runs
    assert f'"/tmp/kubetune-build/src[{",".join(IMAGE_EXTRAS)}]"' in runs
    assert "import bitsandbytes, peft, transformers, trl, kubetune.runtime, galore_torch, apollo_torch, badam, adam_mini" in runs
    assert "torch changed" in runs  # the build fails if the install replaced the image's torch
    assert "pip install torch" not in runs
    # bitsandbytes: built for Hopper and GB10 (DGX Spark) when no wheel fits
    archs = arg_default(p, "BNB_CUDA_ARCHS").split(";")
    assert {"90", "121"} <= set(archs)
    assert "build-bitsandbytes.sh" in " ".join(i["value"] for i in instructions(p, "RUN", stage="bitsandbytes"))
    copies = [i["value"] for i in instructions(p, "COPY", stage="runtime")]
    assert "--from=bitsandbytes /wheels /tmp/kubetune-build/wheels" in copies
    assert [i["value"] for i in instructions(p, "EXPOSE")] == ["9400"]


def test_runtime_dockerignore_sends_only_what_is_needed():
    lines = [ln for ln in (IMAGES / "runtime" / "Dockerfile.dockerignore").read_text().splitlines()
             if ln and not ln.startswith("#")]
    assert lines[0] == "*" and "!runtime/" in lines and "!constraints.txt" in lines and "!images/runtime/" in lines


def test_build_bitsandbytes_script():
    script = IMAGES / "runtime" / "build-bitsandbytes.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "-DCOMPUTE_BACKEND=cuda" in text and '-DCOMPUTE_CAPABILITY="$ARCHS"' in text
    assert "set -euo pipefail" in text
    # the wheel is used only when it has the library for the image's CUDA
    assert 'LIB="libbitsandbytes_cuda${CUDA/./}.so"' in text


def test_bitsandbytes_version_comes_from_constraints():
    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert pins.get("bitsandbytes"), "constraints.txt pins bitsandbytes (the Dockerfile reads it)"


NGC = {  # a package set shaped like nvcr.io/nvidia/pytorch:25.11-py3 (versions illustrative)
    "torch": "2.10.0a0+b558c986e8.nv25.11", "torchvision": "0.25.0a0+nv25.11", "triton": "3.5.0",
    "nvidia-cudnn-frontend": "1.15.0", "transformer-engine": "2.9.0", "flash-attn": "2.7.4.post1",
    "numpy": "2.1.0", "packaging": "25.0", "pyyaml": "6.0.2", "tqdm": "4.67.1",
}


def test_constraints_keep_the_images_torch():
    merged = make_constraints.merge((REPO / "constraints.txt").read_text(), NGC)
    lines = [ln for ln in merged.splitlines() if ln and not ln.startswith("#")]
    pins = dict(ln.split("==", 1) for ln in lines)
    assert pins["torch"] == NGC["torch"] and pins["torchvision"] == NGC["torchvision"]
    assert pins["triton"] == NGC["triton"] and pins["numpy"] == NGC["numpy"]
    assert pins["transformer-engine"] == NGC["transformer-engine"] and pins["nvidia-cudnn-frontend"]
    assert [ln for ln in lines if ln.startswith("torch==")] == [f"torch=={NGC['torch']}"]  # repo's torch pin dropped
    assert "bitsandbytes" not in pins  # installed from the wheel that fits
    assert pins["transformers"] == make_constraints_pin("transformers")  # kubetune's pins for the rest
    assert "packaging" not in pins and "tqdm" not in pins  # the image's other packages stay free


def make_constraints_pin(name: str) -> str:
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.startswith(f"{name}=="):
            return line.split("==", 1)[1]
    raise KeyError(name)


def image_site(root: Path, packages: dict[str, str]) -> Path:
    """A site-packages folder that holds only dist-info metadata, which is all make_constraints.py
    reads (importlib.metadata): an image's package set without the image."""
    root.mkdir(parents=True, exist_ok=True)
    for name, version in packages.items():
        info = root / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return root


def in_image(site: Path, *args: str) -> subprocess.CompletedProcess:
    """Python as inside an image that has only `site`'s packages: -S keeps this venv's
    site-packages (and its torch) off sys.path, PYTHONPATH puts `site` on it."""
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, "-S", *args], capture_output=True, text=True, env=env, cwd=site, timeout=60)


def distributions_seen(site: Path) -> set[str]:
    r = in_image(site, "-c", "from importlib import metadata; print(*{d.metadata['Name'] for d in metadata.distributions()})")
    assert r.returncode == 0, r.stderr
    return set(r.stdout.split())


def make_constraints_in_image(site: Path) -> subprocess.CompletedProcess:
    """Run as the Dockerfile runs it: make_constraints.py constraints.txt > /etc/kubetune-constraints.txt."""
    return in_image(site, str(IMAGES / "runtime" / "make_constraints.py"), str(REPO / "constraints.txt"))


def test_make_constraints_refuses_to_run_without_torch(tmp_path):
    no_torch = {k: v for k, v in NGC.items() if k != "torch"}
    site = image_site(tmp_path / "site", no_torch)
    assert distributions_seen(site) == set(no_torch)  # this venv's torch is out of sight
    r = make_constraints_in_image(site)
    assert r.returncode == 1 and r.stdout == "", (r.returncode, r.stdout, r.stderr)
    assert "torch is not installed here" in r.stderr and "inside the NGC PyTorch image" in r.stderr


def test_make_constraints_reads_the_images_packages(tmp_path):
    site = image_site(tmp_path / "site", NGC)
    assert distributions_seen(site) == set(NGC)
    r = make_constraints_in_image(site)
    assert r.returncode == 0, r.stderr
    assert r.stdout == make_constraints.merge((REPO / "constraints.txt").read_text(), NGC)
    assert f"torch=={NGC['torch']}" in r.stdout.splitlines()


# pip's resolver, for real and offline: stub wheels (metadata only) stand in for PyPI, a stub
# kubetune carries pyproject.toml's requirements of the extras the image installs, and `pip install --dry-run --report`
# says what it would install. Each package is offered at the version the constraints pin and at
# a newer one (torch also at the repo's own pin), so the pins, not the offer, decide.
NEWER = "99.0"


def wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = (), extras: tuple[str, ...] = ()) -> Path:
    """A wheel with metadata only: all pip's resolver reads of it."""
    dist = f"{re.sub(r'[-_.]+', '_', name)}-{version}"
    meta = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    meta += [f"Provides-Extra: {e}" for e in extras] + [f"Requires-Dist: {r}" for r in requires]
    path = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{dist}.dist-info/METADATA", "\n".join(meta) + "\n")
        z.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}.dist-info/RECORD", "")
    return path


IMAGE_EXTRAS = ("train", "optimizers", "tracking", "eval")  # what the runtime image installs


def extra_requirements() -> dict[str, list[str]]:
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return {e: extras[e] for e in IMAGE_EXTRAS}


def image_requirements() -> list[str]:
    return [r for reqs in extra_requirements().values() for r in reqs]


def req_name(req: str) -> str:
    return make_constraints.canonical(re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0])


def pins(constraints: str) -> dict[str, str]:
    lines = (ln.split("#", 1)[0].strip() for ln in constraints.splitlines())
    return {make_constraints.canonical(n): v for n, v in (ln.split("==", 1) for ln in lines if "==" in ln)}


def repo_pins() -> dict[str, str]:
    return pins((REPO / "constraints.txt").read_text())


def package_index(folder: Path, constraints: str) -> Path:
    """Stub wheels for kubetune[IMAGE_EXTRAS] and each of their requirements, the bitsandbytes wheel apart."""
    folder.mkdir()
    pinned = {**repo_pins(), **pins(constraints)}
    reqs = image_requirements()
    wheel(folder, "kubetune", "0.1.0", tuple(f"{r}; extra == '{e}'" for e, rs in extra_requirements().items() for r in rs),
          IMAGE_EXTRAS)
    for name in map(req_name, reqs):
        for version in {pinned[name], NEWER} | ({repo_pins()["torch"]} if name == "torch" else set()):
            wheel(folder, name, version)
    return folder


def pip_dry_run(index: Path, tmp: Path, constraints: str | None) -> tuple[int, dict[str, str], str]:
    """The Dockerfile's install (the bitsandbytes wheel + kubetune[IMAGE_EXTRAS], with the constraints), as
    pip would resolve it: {name: version} it would install."""
    args = ["--constraint", str(tmp / "constraints.txt")] if constraints is not None else []
    if constraints is not None:
        (tmp / "constraints.txt").write_text(constraints)
    (bnb,) = index.glob(f"bitsandbytes-{repo_pins()['bitsandbytes']}-*.whl")
    report = tmp / "report.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--report", str(report),
                        "--ignore-installed", "--no-index", "--find-links", str(index), *args,
                        str(bnb), f"kubetune[{','.join(IMAGE_EXTRAS)}]"], capture_output=True, text=True, env=env, timeout=120)
    if r.returncode:
        return r.returncode, {}, r.stdout + r.stderr  # pip explains a conflict on stdout
    chosen = json.loads(report.read_text())["install"]
    return 0, {make_constraints.canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in chosen}, r.stderr


def test_constraints_accepted_by_pip_with_torch_prerelease(tmp_path):
    """pip reads the generated file and lets the image's pre-release torch satisfy torch>=2.4;
    kubetune's pins decide the rest; an image torch that does not satisfy it fails the install
    rather than being replaced."""
    merged = make_constraints.merge((REPO / "constraints.txt").read_text(), NGC)
    index = package_index(tmp_path / "index", merged)

    rc, chosen, err = pip_dry_run(index, tmp_path, merged)
    assert rc == 0, err
    assert chosen["torch"] == NGC["torch"]
    pinned = {**repo_pins(), **pins(merged)}  # bitsandbytes: the wheel given, at the repo's pin
    assert chosen == {"kubetune": "0.1.0", **{n: pinned[n] for n in map(req_name, image_requirements())}}

    rc, unconstrained, err = pip_dry_run(index, tmp_path, None)  # the control: without them, the newest
    assert rc == 0 and unconstrained["torch"] == NEWER, (rc, unconstrained, err)

    old = make_constraints.merge((REPO / "constraints.txt").read_text(), {**NGC, "torch": "2.3.0a0+nv24.03"})
    rc, _, err = pip_dry_run(package_index(tmp_path / "old-index", old), tmp_path, old)
    assert rc != 0 and "ResolutionImpossible" in err, (rc, err)
    assert "The user requested (constraint) torch==2.3.0a0+nv24.03" in err and "depends on torch>=2.4" in err, err


# ----------------------------------------------------------------------------- operator image


def test_operator_dockerfile():
    p = parse(IMAGES / "operator" / "Dockerfile")
    assert arg_default(p, "PYTHON_IMAGE") == "python:3.11-slim-bookworm"
    assert [i["value"] for i in instructions(p, "FROM")] == ["${PYTHON_IMAGE} AS operator"]
    assert final_user(p) == "1000:1000"
    assert exec_form(instructions(p, "ENTRYPOINT")[-1]) == ["python", "-m", "kubetune.operator"]
    (install,) = [i["value"] for i in instructions(p, "RUN") if "pip install" in i["value"]]
    words = shlex.split(install.replace("\\\n", " "))
    assert "/tmp/kubetune-build[operator]" in words
    pip_args = words[words.index("install") + 1:words.index("&&")]
    assert not [w for w in pip_args if "torch" in w or "[train" in w or w.endswith("[all]")], pip_args
    assert "torch must not be in the operator image" in install
    assert sorted(i["value"] for i in instructions(p, "EXPOSE")) == ["8080 8081"]


def test_the_chart_runs_what_the_operator_image_has():
    """The chart's Deployment command is the image's entrypoint and its user the image's user."""
    import yaml

    values = yaml.safe_load((REPO / "charts" / "kubetune" / "values.yaml").read_text())
    assert values["podSecurityContext"]["runAsUser"] == 1000
    dep = (REPO / "charts" / "kubetune" / "templates" / "deployment.yaml").read_text()
    assert 'command: ["python", "-m", "kubetune.operator"]' in dep
    assert values["image"]["repository"].endswith("/operator") and values["runtime"]["image"]["repository"].endswith("/runtime")


# ----------------------------------------------------------------------------------- Makefile


def make_n(*args: str) -> str:
    r = subprocess.run(["make", "-n", "-C", str(REPO), *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.skipif(subprocess.run(["which", "make"], capture_output=True).returncode != 0, reason="no make")
def test_makefile_builds_both_images_multi_arch():
    out = make_n("images")
    builds = [ln for ln in out.replace("\\\n", " ").splitlines() if "docker buildx build" in ln]
    assert len(builds) == 2
    for b in builds:
        assert "--platform linux/amd64,linux/arm64" in b and "--push" not in b
    assert "-f images/operator/Dockerfile -t ghcr.io/kubetune/operator:0.1.0 ." in out
    assert "-f images/runtime/Dockerfile -t ghcr.io/kubetune/runtime:0.1.0 ." in out
    assert "BNB_CUDA_ARCHS=90;100;120;121" in out
    assert "--push" in make_n("image-operator", "PUSH=1")
    assert "--platform linux/arm64 --load" in make_n("image-runtime", "PLATFORMS=linux/arm64", "LOAD=1")

"""The two images, built for real from images/*/Dockerfile (tests/cluster/images.py), keep what
their Dockerfiles promise: the runtime keeps its base's torch, the operator has none, both run
as uid 1000, and their entrypoints work. Run with podman (runc, read-only root filesystem, no
capabilities, no network), as the pods run them."""

from __future__ import annotations

import json

import pytest

from cluster import images

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(images.unavailable() is not None,
                                                   reason=f"images cannot be built here: {images.unavailable()}")]


def run(image: str, *argv: str, entrypoint: str | None = None) -> str:
    args = ["run", "--rm", "--read-only", "--cap-drop=ALL", "--security-opt=no-new-privileges", "--network=none"]
    if entrypoint:
        args += ["--entrypoint", entrypoint]
    r = images.podman(*args, image, *argv, check=False)
    assert r.returncode == 0, (r.stdout + r.stderr).decode(errors="replace")[-3000:]
    return r.stdout.decode()


PROBE = ("import importlib.util, json, os, sys; "
         "torch = importlib.util.find_spec('torch') and __import__('torch'); "
         "print(json.dumps({'uid': os.getuid(), 'gid': os.getgid(), 'torch': torch and torch.__version__, "
         "'python': sys.version.split()[0]}))")


@pytest.fixture(scope="module")
def built() -> dict[str, str]:
    return images.ensure_images()


def test_the_runtime_image_keeps_its_base_torch_and_runs_as_uid_1000(built):
    base = json.loads(run(images.pytorch_standin(), "-c", PROBE, entrypoint="python"))
    ours = json.loads(run(built["runtime"], "-c", PROBE, entrypoint="python"))
    assert ours["torch"] == base["torch"] and ours["torch"].startswith(images._pinned("torch"))
    assert (ours["uid"], ours["gid"]) == (1000, 1000)
    # the image's constraint file pins the base's torch (what NGC's PIP_CONSTRAINT does)
    pins = run(built["runtime"], "/etc/kubetune-constraints.txt", entrypoint="cat")
    assert f"torch=={images._pinned('torch')}" in pins.split()
    deps = json.loads(run(built["runtime"], "-c", "import json, bitsandbytes, peft, transformers, trl; "
                          "print(json.dumps({m.__name__: m.__version__ for m in (bitsandbytes, peft, transformers, trl)}))",
                          entrypoint="python"))
    for name, version in deps.items():
        assert version == images._pinned(name), (name, version)


def test_both_images_are_labelled_with_the_version_they_install(built):
    """The VERSION build argument (`make images` passes pyproject's) is the image's OCI version
    label and the version of the kubetune package inside it."""
    for name, ref in built.items():
        labels = json.loads(images.podman("image", "inspect", "--format", "{{json .Labels}}", ref).stdout)
        inside = run(ref, "-c", "import importlib.metadata as m; print(m.version('kubetune'))", entrypoint="python")
        assert labels["org.opencontainers.image.version"] == inside.strip() == images.project_version(), name
        assert labels["org.opencontainers.image.title"] == f"kubetune-{name}"


def test_the_runtime_entrypoint_is_the_cli(built):
    out = run(built["runtime"], "--help")
    assert out.startswith("usage: kubetune") and "validate" in out
    # a stage started without its config says which file it wanted, as bad input
    r = images.podman("run", "--rm", "--read-only", "--network=none", built["runtime"], "stage", "--config",
                      "/etc/kubetune/stage.json", check=False)
    assert r.returncode == 42, r.stderr.decode(errors="replace")[-2000:]
    assert b"/etc/kubetune/stage.json" in r.stderr


def test_the_operator_image_has_no_torch_and_runs_as_uid_1000(built):
    info = json.loads(run(built["operator"], "-c", PROBE, entrypoint="python"))
    assert info["torch"] is None and (info["uid"], info["gid"]) == (1000, 1000)
    out = run(built["operator"], "--help")
    assert out.startswith("usage: kubetune operator") and "--runtime-image" in out

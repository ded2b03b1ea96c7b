"""The image builds' first-run paths (tests/cluster/images.py), driven for real into an empty
podman storage: on a warm machine every image is cached and these paths never run, so a bug in
them would show only on a new machine. Needs root, podman and mmdebstrap (the e2e tier's real
node needs them too); seconds, apart from the Debian root filesystem (about half a minute)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cluster import build, images  # noqa: E402

pytestmark = pytest.mark.skipif(images.unavailable() is not None, reason=f"{images.unavailable()}")


@pytest.fixture
def empty_storage(tmp_path, monkeypatch) -> Path:
    """podman with a storage of its own, empty (cleaned up afterwards)."""
    root = tmp_path / "containers"
    monkeypatch.setenv("KUBETUNE_TEST_CONTAINERS_DIR", str(root))
    yield root
    images.podman("rm", "--all", "--force", check=False)
    images.podman("rmi", "--all", "--force", check=False)
    subprocess.run(["umount", "-R", str(root)], capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


def test_the_pause_image_builds_into_an_empty_storage_and_runs(empty_storage, tmp_path):
    pause = tmp_path / "bin"
    plan = [build.GoTarget("pause", build.GOMOD / "pause", "-s -w", (".",), ("pause",))]
    build.ensure_binaries(verbose=False, plan=plan, target=pause)
    ref = "localhost/kubetune-test/pause:cold"
    assert not images.image_exists(ref)
    assert images.pause_image(pause / "pause", ref) == ref
    assert images.image_exists(ref) and (empty_storage / "storage").is_dir()
    # its program waits for SIGTERM and exits 0 on it, as registry.k8s.io/pause does
    name = "kubetune-cold-pause"
    images.podman("run", "-d", "--name", name, ref)
    try:
        r = images.podman("stop", "--time", "10", name)
        assert r.returncode == 0
        state = images.podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.decode().strip()
        assert state == "0"
    finally:
        images.podman("rm", "--force", name, check=False)
    # built once: a second call finds it by the binary's digest and builds nothing
    before = images.image_id(ref)
    assert images.pause_image(pause / "pause", ref) == ref and images.image_id(ref) == before


def test_the_debian_python_base_builds_from_nothing(empty_storage):
    ref = images.debian_python()
    out = images.podman("run", "--rm", "--read-only", "--network=none", "--user", "1000:1000", ref, "python3",
                        "-c", "import os, sys; print(sys.version_info[:2] >= (3, 11), os.getuid())")
    assert out.stdout.decode().split() == ["True", "1000"]
    assert images.debian_python() == ref  # cached by its recipe


def test_the_content_key_follows_every_file_the_build_context_sends(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    (repo / "images" / "runtime").mkdir(parents=True)
    (repo / "runtime").mkdir()
    (repo / "images" / "runtime" / "Dockerfile").write_text("FROM scratch\n")
    (repo / "images" / "runtime" / "Dockerfile.dockerignore").write_text("*\n!runtime/\n**/__pycache__\n")
    (repo / "runtime" / "a.py").write_text("A = 1\n")
    (repo / "notes.txt").write_text("not in the context\n")
    (repo / "pyproject.toml").write_text('[project]\nname = "kubetune"\nversion = "0.1.0"\n')
    monkeypatch.setattr(images, "REPO", repo)
    assert images.build_args(images.RUNTIME, "base:1") == {"BASE_IMAGE": "base:1", "VERSION": "0.1.0"}
    key = images.content_key(images.RUNTIME, "base:1")
    (repo / "notes.txt").write_text("changed, but not sent\n")
    (repo / "runtime" / "__pycache__").mkdir()
    (repo / "runtime" / "__pycache__" / "a.pyc").write_bytes(b"x")
    assert images.content_key(images.RUNTIME, "base:1") == key
    (repo / "runtime" / "a.py").write_text("A = 2\n")
    assert images.content_key(images.RUNTIME, "base:1") != key
    assert images.content_key(images.RUNTIME, "base:2") != images.content_key(images.RUNTIME, "base:1")
    key = images.content_key(images.RUNTIME, "base:1")
    (repo / "pyproject.toml").write_text('[project]\nname = "kubetune"\nversion = "0.2.0"\n')
    assert images.content_key(images.RUNTIME, "base:1") != key  # a new VERSION build argument


def test_the_real_node_says_why_it_cannot_run(monkeypatch):
    from cluster import realnode

    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "containerd" else real_which(name))
    why = realnode.unavailable()
    assert why and "containerd" in why and "Debian packages" in why
    monkeypatch.setenv("KUBETUNE_TEST_NODE", "auto")
    assert realnode.choose() == ("process", why)
    monkeypatch.setenv("KUBETUNE_TEST_NODE", "real")
    with pytest.raises(RuntimeError, match="KUBETUNE_TEST_NODE=real, but the real node cannot run here: missing"):
        realnode.choose()

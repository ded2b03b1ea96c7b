"""First-run-only paths, driven for real in seconds: the Go build of the test binaries into an
empty cache (a tiny module stands in for Kubernetes), the virtual environment that
scripts/env.sh creates, and the Debian package step of scripts/test.sh. A warm machine never
takes these paths, so without these tests a bug in them shows only on a new machine."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cluster import build  # noqa: E402

REPO = Path(__file__).resolve().parents[2]

needs_go = pytest.mark.skipif(shutil.which("go") is None, reason="Go is not installed")


def tiny_module(root: Path, name: str = "tiny", body: str = 'fmt.Println("hello from", os.Args[0])') -> Path:
    """A Go module with no dependencies (so no module proxy is needed) and one main package."""
    root.mkdir(parents=True)
    (root / "go.mod").write_text(f"module example.com/{name}\n\ngo 1.22\n")
    (root / "main.go").write_text(f'package main\n\nimport (\n\t"fmt"\n\t"os"\n)\n\nfunc main() {{\n\t{body}\n}}\n')
    return root


@needs_go
def test_cold_go_build_into_an_empty_cache_then_warm(tmp_path, monkeypatch):
    mod = tiny_module(tmp_path / "gomod" / "tiny")
    target = tmp_path / "cache" / "bin" / "key-1"  # nothing of it exists yet
    plan = [build.GoTarget("tiny", mod, "-s -w", (".",), ("tiny-hello",))]

    got = build.ensure_binaries(verbose=False, plan=plan, target=target)

    assert got == target
    out = subprocess.run([str(target / "tiny-hello")], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("hello from")
    assert (target / build.COMPLETE).is_file()
    assert not (target.parent / "key-1.partial").exists(), "the staging folder is removed"

    # warm: a complete folder is returned without running go at all
    monkeypatch.setattr(build, "_go_build", lambda *a, **k: pytest.fail("rebuilt a complete cache"))
    assert build.ensure_binaries(verbose=False, plan=plan, target=target) == target


@needs_go
def test_interrupted_build_resumes_with_what_is_missing(tmp_path, monkeypatch):
    a = tiny_module(tmp_path / "a", "a")
    b = tiny_module(tmp_path / "b", "b")
    target = tmp_path / "bin" / "k"
    plan = [build.GoTarget("a", a, "-s -w", (".",), ("a",)), build.GoTarget("b", b, "-s -w", (".",), ("b",))]
    build.ensure_binaries(verbose=False, plan=plan, target=target)
    # as after a run killed between the last binary and the marker, with `b` lost too
    (target / build.COMPLETE).unlink()
    (target / "b").unlink()
    built: list[str] = []
    real = build._go_build
    monkeypatch.setattr(build, "_go_build", lambda mod, *rest: built.append(mod.name) or real(mod, *rest))
    build.ensure_binaries(verbose=False, plan=plan, target=target)
    assert built == ["b"]
    assert (target / build.COMPLETE).is_file() and (target / "a").is_file() and (target / "b").is_file()


@needs_go
def test_failed_build_names_the_error_and_marks_nothing_complete(tmp_path):
    bad = tiny_module(tmp_path / "bad", body="undefinedName()")
    target = tmp_path / "bin" / "k"
    with pytest.raises(RuntimeError, match="undefined: undefinedName"):
        build.ensure_binaries(verbose=False, plan=[build.GoTarget("bad", bad, "", (".",), ("bad",))], target=target)
    assert not (target / build.COMPLETE).exists() and not (target / "bad").exists()


@needs_go
def test_cache_key_follows_the_wrapper_modules_and_the_go_version(tmp_path, monkeypatch):
    for sub in build.MODULES:
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "go.mod").write_text(f"module example.com/{sub}\n")
    monkeypatch.setattr(build, "GOMOD", tmp_path)
    key = build.cache_key()
    assert build.KUBERNETES_VERSION in key and build.go_version() in key
    assert build.cache_key() == key
    (tmp_path / "kube" / "go.sum").write_text("example.com/x v1.0.0 h1:abc=\n")
    assert build.cache_key() != key

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("KUBETUNE_TEST_BIN_DIR", raising=False)
    assert build.bin_dir() == tmp_path / "xdg" / "kubetune-test" / "bin" / build.cache_key()
    monkeypatch.setenv("KUBETUNE_TEST_BIN_DIR", str(tmp_path / "mine"))
    assert build.bin_dir() == tmp_path / "mine"


def test_the_real_plan_builds_what_the_control_plane_starts():
    outputs = {o for t in build.targets() for o in t.outputs}
    assert outputs == set(build.ALL_BINARIES)
    for t in build.targets():
        gomod = (t.module / "go.mod").read_text()
        assert t.module.name in build.MODULES
        # a module with dependencies has its go.sum committed (builds run with -mod=readonly)
        assert "require" not in gomod or (t.module / "go.sum").is_file(), t.module


@needs_go
def test_kueue_builds_into_its_own_folder_with_its_manifests_then_recopies_only_what_is_missing(tmp_path, monkeypatch):
    """ensure_kueue's first run: the manager built (a tiny module stands in for Kueue) and the
    release's CRDs and files copied from the module folder (read-only, as Go's module cache
    keeps them) before `.complete`; a folder that lost a copied file gets it back without a
    rebuild."""
    mod = tmp_path / "kueue-module"
    for rel in ("config/components/crd/bases/kueue.x-k8s.io_workloads.yaml", *build.KUEUE_FILES):
        (mod / rel).parent.mkdir(parents=True, exist_ok=True)
        (mod / rel).write_text(f"# {rel}\n")
        (mod / rel).chmod(0o444)
    tiny = tiny_module(tmp_path / "gomod" / "kueue", "kueue")
    monkeypatch.setattr(build, "kueue_target", lambda: build.GoTarget("kueue", tiny, "-s -w", (".",), ("kueue",)))
    monkeypatch.setattr(build, "kueue_module_dir", lambda: mod)
    monkeypatch.setenv("KUBETUNE_TEST_KUEUE_DIR", str(tmp_path / "cache" / "kueue-x"))
    assert "kueue" not in {o for t in build.targets() for o in t.outputs}, "Kueue stays out of the default build"

    got = build.ensure_kueue(verbose=False)

    assert got == tmp_path / "cache" / "kueue-x" and (got / build.COMPLETE).is_file()
    assert subprocess.run([str(got / "kueue")], capture_output=True, text=True, check=True).stdout.startswith("hello")
    assert [f.name for f in (got / build.KUEUE_CRDS).iterdir()] == ["kueue.x-k8s.io_workloads.yaml"]
    for rel, name in build.KUEUE_FILES.items():
        assert (got / name).read_text() == f"# {rel}\n"
    assert not list(got.glob("*.partial")), "no staging leftovers"

    monkeypatch.setattr(build, "_go_build", lambda *a, **k: pytest.fail("rebuilt a complete folder"))
    lost = got / next(iter(build.KUEUE_FILES.values()))
    lost.unlink()
    assert build.ensure_kueue(verbose=False) == got
    assert lost.is_file() and (got / build.COMPLETE).is_file()


def test_kueue_folder_follows_its_wrapper_module_only(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBETUNE_TEST_KUEUE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    for sub in (*build.MODULES, "kueue"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "go.mod").write_text(f"module example.com/{sub}\n")
    monkeypatch.setattr(build, "GOMOD", tmp_path)
    monkeypatch.setattr(build, "go_version", lambda: "go1.99")
    first = build.kueue_dir()
    assert first.parent == tmp_path / "xdg" / "kubetune-test" / "kueue"
    assert first.name.startswith(f"kueue-{build.KUEUE_VERSION}_go1.99_")
    (tmp_path / "kube" / "go.sum").write_text("x\n")
    assert build.kueue_dir() == first, "a change to the control plane's modules keeps Kueue's folder"
    bins = build.bin_dir()
    (tmp_path / "kueue" / "go.sum").write_text("x\n")
    assert build.kueue_dir() != first
    assert build.bin_dir() == bins, "and Kueue's module is not part of the control plane's key"


def test_kueue_wrapper_pins_the_release_build_py_names():
    gomod = build.GOMOD / "kueue"
    assert f"require sigs.k8s.io/kueue {build.KUEUE_VERSION}\n" in (gomod / "go.mod").read_text()
    assert (gomod / "go.sum").is_file() and build.kueue_target().module == gomod


def _source_env(env: dict[str, str], cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f'source "{REPO}/scripts/env.sh" && {cmd}'], env=env, capture_output=True,
                          text=True, timeout=600)


def test_env_sh_creates_a_venv_then_reuses_it(tmp_path):
    """scripts/env.sh's first run, for real, with the light core only (KUBETUNE_EXTRAS empty)."""
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.update(KUBETUNE_VENV=str(venv), KUBETUNE_EXTRAS="", PYTHON=sys.executable)
    show = 'python -c "import sys, kubetune.runtime.api.spec as s; print(sys.prefix); print(s.__file__)"'

    first = _source_env(env, show)
    assert first.returncode == 0, first.stderr
    assert "creating" in first.stderr
    prefix, spec_file = first.stdout.split()
    assert Path(prefix) == venv and (venv / ".complete").is_file()
    assert Path(spec_file).is_relative_to(REPO / "runtime"), "kubetune is installed editable from this checkout"

    second = _source_env(env, show)
    assert second.returncode == 0, second.stderr
    assert "creating" not in second.stderr and second.stdout.split()[0] == str(venv)

    # a venv left half-made (no marker) by an interrupted first run is completed, not trusted
    (venv / ".complete").unlink()
    third = _source_env(env, show)
    assert third.returncode == 0 and "creating" in third.stderr and (venv / ".complete").is_file()


def test_env_sh_never_marks_a_failed_install_complete(tmp_path):
    """A pip install that fails (here: no package index) ends the script with an error and leaves
    no `.complete` marker, even when sourced as `source env.sh && …` (where errexit does not hold)."""
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH") and not k.startswith("PIP_")}
    env.update(KUBETUNE_VENV=str(venv), KUBETUNE_EXTRAS="", PYTHON=sys.executable, PIP_NO_INDEX="1",
               PIP_CONFIG_FILE=os.devnull)
    r = _source_env(env, "echo reached")
    assert r.returncode != 0 and "reached" not in r.stdout, (r.stdout, r.stderr)
    assert f"could not create {venv}" in r.stderr
    assert venv.is_dir() and not (venv / ".complete").exists()


def test_env_sh_refuses_a_folder_that_is_not_a_venv(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    env = dict(os.environ, KUBETUNE_VENV=str(tmp_path), KUBETUNE_EXTRAS="")
    r = _source_env(env, "true")
    assert r.returncode == 1
    assert f"KUBETUNE_VENV={tmp_path} exists and is not a virtual environment" in r.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def _recording_apt(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """PATH with an apt-get that records its arguments instead of installing (the real install is
    what a new machine's first test.sh run does; here we check when the script asks for one)."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    calls = tmp_path / "apt-calls"
    (bin_ / "apt-get").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_ / "apt-get").chmod(0o755)
    return dict(os.environ, PATH=f"{bin_}:{os.environ['PATH']}"), calls


def test_debian_packages_already_installed_ask_no_package_server(tmp_path):
    env, calls = _recording_apt(tmp_path)
    r = subprocess.run(["bash", str(REPO / "scripts/debian-packages.sh"), "bash", "coreutils"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not calls.exists() and r.stderr == ""


@pytest.mark.skipif(os.geteuid() != 0, reason="as a user the script asks sudo, whose PATH the test cannot set")
def test_debian_packages_install_only_what_is_missing(tmp_path):
    env, calls = _recording_apt(tmp_path)
    r = subprocess.run(["bash", str(REPO / "scripts/debian-packages.sh"), "bash", "kubetune-no-such-package"],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "installing Debian packages: kubetune-no-such-package" in r.stderr
    lines = calls.read_text().splitlines()
    assert lines[0] == "update -qq"
    assert lines[1].split()[-1] == "kubetune-no-such-package" and " bash" not in lines[1]

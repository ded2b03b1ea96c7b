"""bench/gpu.py, the script of the GPU calls: its `--smoke` run on CPU (every case, every arm, the
regional-compile and profile hooks, through the same code as on the card) and its provenance rule."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_runs_every_case_interleaved_and_writes_the_raw_json(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke", "--repeats", "2", "--compile",
                        "--profile", "--budget", "1200", "--out", str(out)],
                       capture_output=True, text=True, timeout=1500, env={**_env(), "BENCH_WORK": str(tmp_path / "w")})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (raw,) = out.glob("gpu-smoke-*.json")
    report = json.loads(raw.read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert report["commit"] == head and report["exploratory"] is True and report["smoke"] is True
    assert {"torch", "transformers", "peft", "trl", "bitsandbytes"} <= set(report["versions"])
    assert report["card"]["name"] == "cpu" and "driver" in report["card"]
    assert list(report["cases"]) == ["lora8b", "full1b", "compile", "qlora8b"]  # qlora last: its memory alone
    for key, case in report["cases"].items():
        assert case["complete"], (key, case.get("stopped"), case["arms"])
        runs = []
        for arm, reps in case["arms"].items():
            assert len(reps) == 2 and all(rep["tokens_per_s"] > 0 and rep["tokens"] > 0 for rep in reps), (key, arm)
            runs += [(rep["started"], arm) for rep in reps]
            s = case["summary"][arm]
            assert s["n"] == 2 and s["min"] <= s["median"] <= s["max"]
        order = [arm for _, arm in sorted(runs)]
        assert order == list(case["arms"]) * 2  # interleaved: ours, base, ours, base
    lora = report["cases"]["lora8b"]["arms"]
    assert {r["gradient_checkpointing"] for r in lora["trl_same_ckpt"]} == {lora["ours"][0]["gradient_checkpointing"]}
    assert all(r["gradient_checkpointing"] for r in lora["trl_defaults"])  # TRL's default
    assert all(r["attention"] == "sdpa" for r in lora["ours"])  # CPU: the load-time choice
    assert "aten::mm" in report["profile"] and (out / raw.name.replace(".json", "-profile.txt")).exists()
    assert "ratio ours/trl_same_ckpt" in r.stdout and f"commit {head}" in r.stdout


def _env():
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("KUBETUNE_")}


def _copy_tree(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    (repo / "bench").mkdir(parents=True)
    shutil.copy(ROOT / "bench" / "gpu.py", repo / "bench" / "gpu.py")
    (repo / "runtime").mkdir()
    (repo / "runtime" / "models.py").write_text("x = 1\n")
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "c"]):
        subprocess.run(["git", *args], cwd=repo, check=True)
    return repo


def _module(repo: Path):
    spec = importlib.util.spec_from_file_location(f"gpu_{abs(hash(repo))}", repo / "bench" / "gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_changed_tree_is_refused_unless_exploratory(tmp_path):
    repo = _copy_tree(tmp_path)
    bench = [sys.executable, str(repo / "bench" / "gpu.py"), "--out", str(tmp_path / "o")]
    (repo / "runtime" / "models.py").write_text("x = 2\n")
    r = subprocess.run(bench, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "refusing: uncommitted changes" in r.stderr and "runtime/models.py" in r.stdout
    (repo / "runtime" / "new.py").write_text("")  # untracked files count too
    (repo / "runtime" / "models.py").write_text("x = 1\n")
    assert _module(repo).provenance()["changed"] == ["runtime/new.py"]
    (repo / "runtime" / "new.py").unlink()
    (repo / "bench" / "results").mkdir()
    (repo / "bench" / "results" / "gpu-x.json").write_text("{}")  # the bench's own outputs do not
    assert _module(repo).provenance()["clean"]


def test_a_copied_tree_without_git_is_checked_against_the_manifest(tmp_path):
    repo = _copy_tree(tmp_path)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    w = subprocess.run([sys.executable, str(repo / "bench" / "gpu.py"), "--write-provenance"], capture_output=True,
                       text=True, timeout=120)
    assert w.returncode == 0, w.stderr
    shutil.rmtree(repo / ".git")  # what a device machine may get: files only
    prov = _module(repo).provenance()
    assert prov == {"commit": head, "clean": True, "how": "manifest", "changed": []}
    (repo / "runtime" / "models.py").write_text("x = 3\n")
    assert _module(repo).provenance()["changed"] == ["runtime/models.py"]
    (repo / "runtime" / "models.py").write_text("x = 1\n")
    (repo / "bench" / "gpu.py").unlink()
    shutil.copy(ROOT / "bench" / "gpu.py", repo / "bench" / "other.py")
    assert _module_at(repo / "bench" / "other.py").provenance()["changed"] == ["bench/gpu.py", "bench/other.py"]


def _module_at(path: Path):
    spec = importlib.util.spec_from_file_location("gpu_other", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_pod_smoke_runs_the_stage_entrypoint_on_cpu(tmp_path):
    """bench/pod_smoke.py --smoke: `python -m kubetune.runtime stage --config` as a pod runs it."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "pod_smoke.py"), "--smoke", "--steps", "2",
                        "--work", str(tmp_path)], capture_output=True, text=True, timeout=900, env=_env())
    assert r.returncode == 0 and "POD SMOKE OK" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]
    assert "kubetune.runtime stage --config" in r.stdout
    assert json.loads((tmp_path / "stage.json").read_text())["resources"]["gpusPerNode"] == 0
    assert "attention: sdpa" in (tmp_path / "pod.log").read_text()

"""Several training processes on CPU (gloo), launched by `kubetune run` itself under torchrun:

- 2 processes (DDP, per-device batch 2) train the same loss curve as 1 process with the same
  global batch (4), for full fine-tuning and for LoRA (one two-stage job: full, then LoRA on it);
- two "nodes" of one process each (two torchrun agents meeting at MASTER_ADDR:MASTER_PORT, each
  with its own scratch folder, as two pods would), SIGKILLed after a committed checkpoint, resume
  together from that checkpoint: rank 0 from its download, the other node from its own download
  of the checkpoint rank 0 chose; only rank 0 uploads and commits.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import job_doc, read_log, run_doc, write_alpaca

HP = {"batchSize": 4, "gradientAccumulation": 1, "loggingSteps": 1, "cutoffLen": 64, "gradientCheckpointing": False,
      "lrScheduler": "constant", "maxSteps": 4}


def _env(**extra) -> dict[str, str]:
    drop = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
            "KUBETUNE_NODES", "KUBETUNE_NODE_RANK", "KUBETUNE_NPROC", "KUBETUNE_WORK_DIR")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **extra)
    return env


def _cli(job: Path) -> list[str]:
    return [sys.executable, "-m", "kubetune.runtime", "run", str(job), "--no-progress"]


def _losses(output: Path) -> list[float]:
    return [r["loss"] for r in read_log(output) if "loss" in r]


def _two_stage_doc(tiny_model, data: Path, root: Path, batch: int) -> dict:
    hp = {**HP, "batchSize": batch}
    stages = [{"name": "full", "type": "sft", "method": "full", "hyperparameters": {**hp, "learningRate": 2e-3}},
              {"name": "lora", "type": "sft", "method": "lora", "lora": {"rank": 8},
               "hyperparameters": {**hp, "learningRate": 5e-3}}]
    return job_doc("ddp", tiny_model, [{"name": "d", "source": str(data)}], stages, root,
                   resources={"gpusPerNode": 0})


def test_two_processes_match_one_process_with_the_same_global_batch(tiny_model, tmp_path, monkeypatch):
    data = write_alpaca(tmp_path / "d.json", repeat=2)  # 16 examples: 4 steps of 4, one epoch
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert run_doc(_two_stage_doc(tiny_model, data, tmp_path / "one", batch=4), tmp_path / "j1") == 0

    job = tmp_path / "j2" / "job.yaml"
    job.parent.mkdir()
    job.write_text(yaml.safe_dump(_two_stage_doc(tiny_model, data, tmp_path / "two", batch=2)))
    started = time.time()
    done = subprocess.run(_cli(job), env=_env(KUBETUNE_NPROC="2"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "launching 2 process(es) on node 0/1 (world size 2, gloo)" in done.stderr
    assert "--nproc-per-node=2" in done.stderr and "--standalone" in done.stderr
    print(f"2-process run: {time.time() - started:.1f}s")

    for stage in ("full", "lora"):
        one = _losses(tmp_path / "one" / stage / "output")
        two = _losses(tmp_path / "two" / stage / "output")
        print(f"{stage}: 1 process {[round(x, 4) for x in one]}")
        print(f"{stage}: 2 processes {[round(x, 4) for x in two]}")
        assert len(one) == len(two) == HP["maxSteps"]
        assert two == pytest.approx(one, rel=2e-3), stage
        run = json.loads((tmp_path / "two" / stage / "output" / "run.json").read_text())
        assert run["steps"] == HP["maxSteps"] and run["method"] == stage
    assert (tmp_path / "two" / "lora" / "output" / "adapter_model.safetensors").exists()
    # one summary, printed by rank 0
    assert done.stderr.count("kubetune: finished 2 stage(s)") == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STEPS, EVERY = 16, 4


def test_two_nodes_killed_after_a_checkpoint_resume_from_it(tiny_model, tmp_path):
    data = write_alpaca(tmp_path / "d.json", repeat=3)
    stage = {"name": "sft", "type": "sft", "method": "full",
             "hyperparameters": {**HP, "batchSize": 2, "maxSteps": STEPS, "learningRate": 1e-3}}
    root = tmp_path / "saves"  # shared storage, as S3 would be; scratch folders are per node
    doc = job_doc("mn", tiny_model, [{"name": "d", "source": str(data)}], [stage], root,
                  resources={"nodes": 2, "gpusPerNode": 0}, checkpoint={"everySteps": EVERY, "keep": 2})
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(doc))
    latest = root / "sft" / "checkpoints" / "LATEST"

    def start(run: str) -> list[tuple[subprocess.Popen, Path]]:
        port = _free_port()
        nodes = []
        for index in (0, 1):  # what the Indexed Job's pods get, on one machine
            # one scratch disk for both "nodes" (as a shared cache volume would be): each keeps to
            # its own node-<rank> folder in it
            env = _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), KUBETUNE_NODE_RANK=str(index),
                       KUBETUNE_WORK_DIR=str(tmp_path / "work"))
            log = tmp_path / f"{run}-node{index}.log"
            with log.open("w") as f:
                nodes.append((subprocess.Popen(_cli(job), env=env, stdout=f, stderr=subprocess.STDOUT,
                                               start_new_session=True), log))
        return nodes

    nodes = start("first")
    deadline = time.time() + 400
    while not (latest.exists() and latest.read_text().strip() == f"checkpoint-{EVERY}"):
        for p, log in nodes:
            assert p.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, "no committed checkpoint in time"
        time.sleep(0.05)
    for p, _ in nodes:  # the process group of `kubetune run` + its torchrun agent; the workers
        os.killpg(p.pid, signal.SIGKILL)  # (own sessions) follow through PR_SET_PDEATHSIG
    for p, _ in nodes:
        p.wait()
    time.sleep(3)  # orphaned workers, if any, would go on training and uploading
    killed_at = latest.read_text().strip()
    assert killed_at in (f"checkpoint-{EVERY}", f"checkpoint-{2 * EVERY}")
    assert not (root / "sft" / "output" / "COMMITTED.json").exists()

    nodes = start("second")
    for p, log in nodes:
        assert p.wait(timeout=400) == 0, log.read_text()[-4000:]
    logs = [log.read_text() for _, log in nodes]
    resumed = [re.findall(r"resuming from \S+ \(step (\d+)\)", text) for text in logs]
    assert resumed[0] and resumed[0] == resumed[1], resumed  # every rank: the same checkpoint
    step = int(resumed[0][0])
    assert f"checkpoint-{step}" == killed_at and step >= EVERY
    # node 1 downloaded that checkpoint into its own scratch folder; only node 0 uploaded
    assert (tmp_path / "work" / "mn" / "sft" / "node-1" / "restore" / f"checkpoint-{step}" / "trainer_state.json").exists()
    assert "committed checkpoint" not in logs[1] and "committed the output" in logs[0]
    steps = [int(s) for s in re.findall(rf"step (\d+)/{STEPS} ", logs[0])]
    assert steps and min(steps) > step and max(steps) == STEPS
    assert not re.search(rf"step \d+/{STEPS} ", logs[1])  # one progress display: rank 0's
    run = json.loads((root / "sft" / "output" / "run.json").read_text())
    assert run["steps"] == STEPS and run["resumed_from_step"] == step
    log_steps = [r["current_steps"] for r in read_log(root / "sft" / "output") if "loss" in r]
    assert log_steps[-1] == STEPS

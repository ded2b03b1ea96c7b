"""Failures end the way they should, in real training runs of a tiny model (issue 16, part 3):
out of memory (exit 43, the peak seen, the estimate and the knobs), a corrupt checkpoint (fall
back, never bad input), S3 unreachable at stage start (wait, then retryable 75), SIGTERM (commit
a checkpoint, exit 143, resume from it) and runPolicy.outputs (reuse | overwrite).

No GPU here: the CUDA out-of-memory case raises torch's own torch.cuda.OutOfMemoryError from a
real training step (Trainer.training_step patched to raise it at step 3); a real CUDA OOM was not
run. The host MemoryError is raised the same way in a pod's `stage` command."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import job_doc, write_alpaca
from tests.storage.support import TEST_KEY_ID, TEST_SECRET, MotoServer, boto_client, free_port, make_bucket

EVERY = 5


def _stage(steps: int, **hp) -> dict:
    return {"name": "sft", "type": "sft", "method": "full",
            "hyperparameters": {"maxSteps": steps, "batchSize": 2, "gradientAccumulation": 1, "learningRate": 1e-3,
                                "loggingSteps": 1, "cutoffLen": 64, "gradientCheckpointing": False, **hp}}


def _write_job(tmp_path, tiny_model, root, steps=20, endpoint=None, run_policy=None, **hp) -> Path:
    data = write_alpaca(tmp_path / "d.json", repeat=2)
    doc = job_doc("fail", tiny_model, [{"name": "d", "source": str(data)}], [_stage(steps, **hp)], root,
                  checkpoint={"everySteps": EVERY, "keep": 5}, resources={"gpusPerNode": 0})
    if endpoint:
        doc["spec"]["storage"]["endpoint"] = endpoint
    if run_policy:
        doc["spec"]["runPolicy"] = run_policy
    f = tmp_path / "job.yaml"
    f.write_text(yaml.safe_dump(doc))
    return f


def _env(tmp_path, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "KUBETUNE_"))}
    env.update(AWS_ACCESS_KEY_ID=TEST_KEY_ID, AWS_SECRET_ACCESS_KEY=TEST_SECRET, AWS_DEFAULT_REGION="us-east-1",
               AWS_EC2_METADATA_DISABLED="true", KUBETUNE_CACHE_DIR=str(tmp_path / "cache"), KUBETUNE_DEVICE="cpu",
               **extra)
    return env


def _run(job: Path, env, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kubetune.runtime", "run", str(job), "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=timeout)


def _steps(log: str) -> list[int]:
    return [int(s) for s in re.findall(r"step (\d+)/\d+ ", log)]


# ---- out of memory ---------------------------------------------------------------------------


def _raise_at_step(monkeypatch, make_error, at=3):
    from transformers import Trainer

    real = Trainer.training_step

    def step(self, *args, **kwargs):
        if self.state.global_step + 1 >= at:
            raise make_error()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", step)


def test_cuda_out_of_memory_exits_43_with_the_peak_the_estimate_and_the_knobs(tiny_model, tmp_path, monkeypatch,
                                                                                capsys):
    import torch

    from kubetune.runtime.local import run_job

    _raise_at_step(monkeypatch, lambda: torch.cuda.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 1.50 GiB. GPU 0 has a total capacity of 23.5 GiB"))
    job = _write_job(tmp_path, tiny_model, tmp_path / "storage", batchSize=4, cutoffLen=512)
    assert run_job(str(job), progress=False) == 43
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("error: stage sft failed"))
    assert "(OutOfMemory, exit 43)" in line and "ran out of GPU memory" in line
    assert re.search(r"peak host memory \(max RSS\) \d+\.\d\d GiB", line)
    assert re.search(r"kubetune estimate: \d+\.\d GiB per device for this stage", line)
    for knob in ("spec.stages[0].hyperparameters.batchSize: batchSize 4 → 2", "cutoffLen 512 → 256",
                 "gradientCheckpointing: true", "method: qlora"):
        assert knob in line, knob
    assert re.search(r"batchSize 4 → 2 .*?\(estimate \d+\.\d GiB\)", line)
    assert "not retried" in line
    assert not (tmp_path / "storage" / "sft" / "output" / "COMMITTED.json").exists()


def test_host_memory_error_in_a_pod_exits_43_and_says_so_in_the_termination_message(tiny_model, tmp_path,
                                                                                    monkeypatch):
    from kubetune.runtime.local import run_stage_config
    from kubetune.runtime.api.plan import plan
    from kubetune.runtime.api.spec import load_job

    _raise_at_step(monkeypatch, MemoryError)
    job = _write_job(tmp_path, tiny_model, tmp_path / "storage")
    config = tmp_path / "stage.json"
    config.write_text(json.dumps(plan(load_job(str(job)))[0].to_yaml_dict()))
    termination = tmp_path / "termination-log"
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(termination))
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # leave pytest's handlers alone
    assert run_stage_config(str(config), metrics_port=None) == 43
    text = termination.read_text()
    assert text.startswith("stage sft ran out of host memory (MemoryError")
    assert "peak host memory" in text and "kubetune estimate:" in text and "gradientCheckpointing: true" in text


# ---- a corrupt checkpoint and runPolicy.outputs ----------------------------------------------------


def _corrupt(checkpoint: Path) -> None:
    f = checkpoint / "trainer_state.json"
    size = f.stat().st_size
    f.write_bytes(b"x" * size)  # same size, other bytes: only the sha256 can tell


def test_a_corrupt_checkpoint_falls_back_then_from_scratch_and_outputs_reuse_or_overwrite(tiny_model, tmp_path):
    root = tmp_path / "storage"
    job = _write_job(tmp_path, tiny_model, root, steps=10)
    env = _env(tmp_path)
    first = _run(job, env)
    assert first.returncode == 0, first.stderr[-3000:]
    stage = root / "sft"
    out_marker = stage / "output" / "COMMITTED.json"
    committed_first = json.loads(out_marker.read_text())["committedAt"]

    # outputs: reuse (the default) says plainly that it reuses the committed output
    again = _run(job, env)
    assert again.returncode == 0 and _steps(again.stderr) == []
    assert f"stage sft: output already committed at {(stage / 'output').as_uri()}".replace("file://", "") in \
        again.stderr.replace("file://", "") and "reusing it (runPolicy.outputs: reuse)" in again.stderr

    # the output is gone (its marker removed) and the newest checkpoint is corrupt: resume from
    # the one before, never exit as bad input
    out_marker.unlink()
    _corrupt(stage / "checkpoints" / "checkpoint-10")
    fallback = _run(job, env)
    assert fallback.returncode == 0, fallback.stderr[-3000:]
    assert "checkpoint-10/trainer_state.json: sha256 mismatch" in fallback.stderr
    assert "resuming from" in fallback.stderr and "(step 5)" in fallback.stderr
    assert min(_steps(fallback.stderr)) == 6

    # every checkpoint corrupt: from scratch, with a warning
    out_marker.unlink()
    for c in (stage / "checkpoints").glob("checkpoint-*"):
        _corrupt(c)
    scratch = _run(job, env)
    assert scratch.returncode == 0, scratch.stderr[-3000:]
    assert "training from scratch instead" in scratch.stderr and min(_steps(scratch.stderr)) == 1
    assert json.loads(out_marker.read_text())["committedAt"] > committed_first

    # outputs: overwrite trains again from scratch though output and checkpoints are committed
    # (each `kubetune run` is a run of its own)
    before = json.loads(out_marker.read_text())["committedAt"]
    job = _write_job(tmp_path, tiny_model, root, steps=10, run_policy={"outputs": "overwrite"})
    over = _run(job, env)
    assert over.returncode == 0, over.stderr[-3000:]
    assert "runPolicy.outputs is overwrite: removed" in over.stderr and "an earlier run left" in over.stderr
    assert "resuming from" not in over.stderr and _steps(over.stderr)[:1] == [1] and max(_steps(over.stderr)) == 10
    assert json.loads(out_marker.read_text())["committedAt"] > before


def test_outputs_overwrite_replaces_an_earlier_run_but_a_retry_of_this_run_resumes(tiny_model, tmp_path):
    """In a cluster the run is the FineTuneJob's uid: a retried pod of the same run resumes from
    its own checkpoints and reuses its own output; a job deleted and applied again (a new uid)
    starts over."""
    from kubetune.runtime.local import execute_stage
    from kubetune.runtime.api.plan import plan
    from kubetune.runtime.api.spec import load_job

    root = tmp_path / "storage"
    job = load_job(str(_write_job(tmp_path, tiny_model, root, steps=10, run_policy={"outputs": "overwrite"})))
    stage = root / "sft"
    out_marker = stage / "output" / "COMMITTED.json"

    def run(uid: str) -> dict:
        (cfg,) = plan(job, run=uid)
        return execute_stage(cfg, tmp_path)

    def runs() -> set:
        markers = [*stage.glob("checkpoints/checkpoint-*/COMMITTED.json"), out_marker]
        return {json.loads(m.read_text())["extra"].get("run") for m in markers if m.exists()}

    assert not run("uid-1").get("skipped") and runs() == {"uid-1"}
    assert run("uid-1")["skipped"]  # this run's own output: reused
    # the pod of this run died after checkpoint-10 was committed, before the output was
    out_marker.unlink()
    (stage / "checkpoints" / "LATEST").write_text("checkpoint-10")
    resumed = run("uid-1")
    assert resumed.get("resumed_from_step") == 10 and runs() == {"uid-1"}, resumed
    # deleted and applied again: a new uid, nothing of the earlier run survives
    again = run("uid-2")
    assert not again.get("skipped") and again.get("resumed_from_step") is None and runs() == {"uid-2"}


# ---- S3 unreachable at stage start ---------------------------------------------------------------


class _Link:
    """A TCP path to the S3 server that can be down (connection refused) and up again: the
    server keeps its buckets, the network between goes away."""

    def __init__(self, target_port: int):
        self.port = free_port()
        self.target = target_port
        self.sock: socket.socket | None = None

    def up(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", self.port))
        self.sock.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()

    def down(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _accept(self) -> None:
        sock = self.sock
        while True:
            try:
                client, _ = sock.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for x in (a, b):
                try:
                    x.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.fixture
def s3(tmp_path):
    server = MotoServer(tmp_path)
    yield server
    server.stop()


def test_s3_down_at_stage_start_is_waited_for(tiny_model, tmp_path, s3):
    bucket = make_bucket(s3.endpoint)
    link = _Link(s3.port)  # down: nothing listens
    job = _write_job(tmp_path, tiny_model, f"s3://{bucket}/runs/wait", steps=5, endpoint=f"http://127.0.0.1:{link.port}")
    log_path = tmp_path / "run.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "kubetune.runtime", "run", str(job), "--no-progress"],
                                env=_env(tmp_path, KUBETUNE_STORAGE_WAIT_SECONDS="120"), stdout=log,
                                stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while "storage unreachable at stage start (attempt 2)" not in log_path.read_text():
            assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.2)
        link.up()
        try:
            code = proc.wait(timeout=600)
        finally:
            link.down()
    out = log_path.read_text()
    assert code == 0, out[-3000:]
    assert re.search(r"storage reachable again after \d+\.\ds", out)
    body = boto_client(s3.endpoint).get_object(Bucket=bucket, Key="runs/wait/sft/output/run.json")["Body"].read()
    assert json.loads(body)["steps"] == 5


def test_s3_that_never_comes_back_exits_retryable_with_a_clear_message(tiny_model, tmp_path):
    port = free_port()
    job = _write_job(tmp_path, tiny_model, "s3://nowhere/runs/x", steps=5, endpoint=f"http://127.0.0.1:{port}")
    t0 = time.monotonic()
    r = _run(job, _env(tmp_path, KUBETUNE_STORAGE_WAIT_SECONDS="4"), timeout=300)
    took = time.monotonic() - t0
    assert r.returncode == 75, r.stderr[-3000:]
    line = next(x for x in r.stderr.splitlines() if x.startswith("error: stage sft failed"))
    assert "(StorageUnavailable, exit 75)" in line and "storage unreachable for" in line
    assert f"127.0.0.1:{port}" in line and "KUBETUNE_STORAGE_WAIT_SECONDS=4" in line
    assert "Traceback" not in r.stderr and took < 120


# ---- SIGTERM -------------------------------------------------------------------------------------------


def test_sigterm_commits_a_checkpoint_exits_143_and_the_resumed_run_loses_no_step(tiny_model, tmp_path, s3):
    bucket = make_bucket(s3.endpoint)
    steps = 120
    job = _write_job(tmp_path, tiny_model, f"s3://{bucket}/runs/term", steps=steps, endpoint=s3.endpoint)
    env = _env(tmp_path)
    log_path = tmp_path / "first.log"
    client = boto_client(s3.endpoint)

    def latest():
        try:
            return client.get_object(Bucket=bucket, Key="runs/term/sft/checkpoints/LATEST")["Body"].read().decode()
        except Exception:
            return None

    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "kubetune.runtime", "run", str(job), "--no-progress"],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while latest() is None or max(_steps(log_path.read_text()), default=0) < EVERY + 2:
            assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.05)
        at_signal = max(_steps(log_path.read_text()))
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=300)
        took = time.monotonic() - t0
    out = log_path.read_text()
    assert code == 143, out[-3000:]
    stopped = int(latest().removeprefix("checkpoint-"))
    # the step it was on when the signal came (or the next one, if that step had just ended)
    assert at_signal <= stopped <= at_signal + 2, (at_signal, stopped)
    assert re.search(rf"stopped by SIGTERM at step {stopped}; s3://\S+/checkpoint-{stopped} committed", out)
    assert "(Interrupted, exit 143)" in out and "Traceback" not in out
    print(f"SIGTERM at step {at_signal}: checkpoint-{stopped} committed, exit 143 after {took:.1f}s")

    second = _run(job, env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"(step {stopped})" in second.stderr
    ran = _steps(second.stderr)
    assert min(ran) == stopped + 1 and max(ran) == steps  # no step lost past the signal

"""Crash safety against a real S3 server (moto's standalone server as its own process):
SIGKILL mid-run and resume from LATEST, torn checkpoints ignored, S3 outages survived, a dead
S3 failing clearly without losing the local checkpoint."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import job_doc, write_alpaca
from tests.storage.support import TEST_KEY_ID, TEST_SECRET, MotoServer, boto_client, make_bucket

STEPS, EVERY = 30, 5


@pytest.fixture
def s3(tmp_path):
    server = MotoServer(tmp_path)
    yield server
    server.stop()


def _env(tmp_path, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID=TEST_KEY_ID, AWS_SECRET_ACCESS_KEY=TEST_SECRET, AWS_DEFAULT_REGION="us-east-1",
               AWS_EC2_METADATA_DISABLED="true", KUBETUNE_CACHE_DIR=str(tmp_path / "cache"), **extra)
    return env


def _job(tmp_path, tiny_model, s3, bucket, steps=STEPS, every=EVERY, **hp) -> Path:
    data = write_alpaca(tmp_path / "d.json", repeat=2)
    stage = {"name": "sft", "type": "sft", "method": "full",
             "hyperparameters": {"maxSteps": steps, "batchSize": 2, "gradientAccumulation": 1, "learningRate": 1e-3,
                                 "loggingSteps": 1, "cutoffLen": 64, "gradientCheckpointing": False, **hp}}
    doc = job_doc("crash", tiny_model, [{"name": "d", "source": str(data)}], [stage], f"s3://{bucket}/runs/crash",
                  checkpoint={"everySteps": every, "keep": 3})
    doc["spec"]["storage"]["endpoint"] = s3.endpoint
    f = tmp_path / "job.yaml"
    f.write_text(yaml.safe_dump(doc))
    return f


def _run(job: Path, env, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kubetune.runtime", "run", str(job), "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=600, **kw)


def _latest(s3, bucket, client=None) -> str | None:
    try:
        obj = (client or boto_client(s3.endpoint)).get_object(Bucket=bucket, Key="runs/crash/sft/checkpoints/LATEST")
    except Exception:
        return None
    return obj["Body"].read().decode().strip()


def _output_summary(s3, bucket) -> dict:
    body = boto_client(s3.endpoint).get_object(Bucket=bucket, Key="runs/crash/sft/output/run.json")["Body"].read()
    return json.loads(body)


def test_sigkill_then_resume_from_latest_ignoring_a_torn_checkpoint(tiny_model, tmp_path, s3):
    bucket = make_bucket(s3.endpoint)
    job = _job(tmp_path, tiny_model, s3, bucket)
    env = _env(tmp_path)
    log_path = tmp_path / "first.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "kubetune.runtime", "run", str(job), "--no-progress"],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while _latest(s3, bucket) != f"checkpoint-{2 * EVERY}":
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.time() < deadline, "no second checkpoint in time"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # checkpoint-15 may have been committed too between the poll and the kill: resume must
    # come from whatever LATEST names now
    latest_at_kill = int(_latest(s3, bucket).removeprefix("checkpoint-"))
    assert latest_at_kill in (2 * EVERY, 3 * EVERY)
    client = boto_client(s3.endpoint)
    state_key = f"runs/crash/sft/checkpoints/checkpoint-{latest_at_kill}/trainer_state.json"
    tokens_at_kill = json.loads(client.get_object(Bucket=bucket, Key=state_key)["Body"].read())["num_input_tokens_seen"]

    # A kill during an upload leaves files without a marker: plant one newer than LATEST.
    src = "runs/crash/sft/checkpoints/checkpoint-10/"
    for obj in client.list_objects_v2(Bucket=bucket, Prefix=src)["Contents"]:
        if not obj["Key"].endswith("COMMITTED.json"):
            client.copy_object(Bucket=bucket, Key=obj["Key"].replace("checkpoint-10", "checkpoint-25"),
                               CopySource={"Bucket": bucket, "Key": obj["Key"]})

    second = _run(job, env)
    assert second.returncode == 0, second.stderr[-3000:]
    m = re.search(r"resuming from \S+ \(step (\d+)\)", second.stderr)
    assert m, second.stderr[-3000:]
    resumed = int(m.group(1))
    assert resumed == latest_at_kill  # the newest committed one; the torn checkpoint-25 was not trusted
    summary = _output_summary(s3, bucket)
    assert summary["steps"] == STEPS and summary["resumed_from_step"] == resumed
    # throughput: the tokens this run trained over this run's time (not the stage's tokens since step 0)
    assert 0 < tokens_at_kill < summary["tokens"]
    assert summary["tokens_this_run"] == summary["tokens"] - tokens_at_kill
    rate = summary["tokens_this_run"] / summary["duration_seconds"]  # (duration rounded to ms)
    assert summary["tokens_per_second"] == pytest.approx(rate, rel=2e-3)
    # the resumed run trained exactly the steps after it. (How many steps the kill cost is not
    # bounded by everySteps: a checkpoint uploads beside training, so training runs ahead of
    # LATEST by the steps of one upload.)
    steps_run_twice = [int(s) for s in re.findall(r"step (\d+)/30 ", second.stderr)]
    assert min(steps_run_twice) == resumed + 1 and max(steps_run_twice) == STEPS

    # Running the finished job again trains nothing.
    third = _run(job, env)
    assert third.returncode == 0 and "reusing it (runPolicy.outputs: reuse)" in third.stderr and "step " not in third.stderr


def test_training_survives_an_s3_outage(tiny_model, tmp_path, s3):
    bucket = make_bucket(s3.endpoint)
    # a step of 8 micro-batches takes longer than a checkpoint's commit, so LATEST moves well
    # before the next save (with steps of one micro-batch, training ran a whole interval ahead)
    every = 10
    job = _job(tmp_path, tiny_model, s3, bucket, steps=4 * every, every=every, gradientAccumulation=8)
    client = boto_client(s3.endpoint)  # one client: the poll below must see LATEST move at once
    log_path = tmp_path / "run.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "kubetune.runtime", "run", str(job), "--no-progress"],
                                env=_env(tmp_path), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while _latest(s3, bucket, client) != f"checkpoint-{every}":
            assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.02)
        s3.pause()  # the S3 server hangs: no answers at all
        try:
            at_pause = _last_step(log_path.read_text())
            # Storage has checkpoint-10. Training goes on while the next upload (checkpoint-20)
            # hangs in the background, up to the save after it (checkpoint-30), which waits for
            # that upload: a run holds at most one checkpoint more than storage has. (If S3
            # stopped during the last requests of checkpoint-10's upload, that one is the upload
            # in flight, and training holds at checkpoint-20, waiting for it.)
            deadline, last, since = time.time() + 60, -1, time.time()
            while (step := _last_step(log_path.read_text())) < 3 * every:
                assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
                last, since = (step, time.time()) if step != last else (last, since)
                if step >= 2 * every and time.time() - since > 10:
                    break  # held at checkpoint-20: checked below
                time.sleep(0.1)
            time.sleep(2)
            during = log_path.read_text()
            assert proc.poll() is None
        finally:
            s3.resume()
        assert proc.wait(timeout=300) == 0, log_path.read_text()[-3000:]
    at_end = _last_step(during)
    after = log_path.read_text()[len(during):]
    print(f"outage: step {at_pause} when S3 stopped answering, step {at_end} while it was away")
    assert at_end in (2 * every, 3 * every) and at_end > at_pause, (at_pause, at_end)  # training went on
    if at_end == 2 * every:  # held at checkpoint-20: by the upload still in flight, not by its own
        assert f"checkpoint-{2 * every} waited" in after, (at_pause, at_end, after[-3000:])
    # every checkpoint saved during the outage was committed after it, none before
    for step in range(2 * every, at_end + 1, every):
        assert f"committed checkpoint-{step} " not in during
        assert f"committed checkpoint-{step} " in after, (step, after[-3000:])
    assert _latest(s3, bucket) == f"checkpoint-{4 * every}"
    assert _output_summary(s3, bucket)["steps"] == 4 * every


def _last_step(log: str) -> int:
    steps = [int(s) for s in re.findall(r"step (\d+)/\d+ ", log)]
    return max(steps, default=0)


def test_s3_gone_for_good_fails_clearly_and_keeps_the_local_checkpoint(tiny_model, tmp_path, s3):
    bucket = make_bucket(s3.endpoint)
    job = _job(tmp_path, tiny_model, s3, bucket, steps=20)
    work = tmp_path / "work"
    env = _env(tmp_path, KUBETUNE_UPLOAD_RETRY_SECONDS="6", KUBETUNE_WORK_DIR=str(work))
    log_path = tmp_path / "run.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "kubetune.runtime", "run", str(job), "--no-progress"],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while _latest(s3, bucket) != f"checkpoint-{EVERY}":
            assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.05)
        s3.stop()  # connection refused from now on
        code = proc.wait(timeout=300)
    out = log_path.read_text()
    assert code != 0
    assert "checkpoint" in out and s3.endpoint in out and "Traceback" not in out.split("error:")[-1]
    kept = list((work / "crash" / "sft" / "staging").glob("checkpoint-*"))
    assert kept and all((k / "trainer_state.json").exists() for k in kept), list(work.rglob("*"))[:20]

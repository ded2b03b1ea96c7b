"""Experiment tracking (spec.tracking.reportTo) through transformers' own integrations, for real:
TensorBoard event files, a real MLflow tracking server (started here from the PyPI package) and
W&B in offline mode, each receiving the run's parameters and the same loss series the stage
wrote to trainer_log.jsonl."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import job_doc, read_log, run_doc, write_alpaca

FAST = {"batchSize": 2, "gradientAccumulation": 1, "loggingSteps": 1, "cutoffLen": 64, "maxSteps": 6,
        "gradientCheckpointing": False, "learningRate": 2e-3}
TRACKER_ENV = ("TENSORBOARD_LOGGING_DIR", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_TAGS",
               "MLFLOW_RUN_ID", "WANDB_PROJECT", "WANDB_MODE", "WANDB_DIR", "WANDB_RUN_ID")


@pytest.fixture(autouse=True)
def clean_tracker_env(monkeypatch):
    for k in TRACKER_ENV:
        monkeypatch.delenv(k, raising=False)
    yield
    leaked = [k for k in TRACKER_ENV if k in os.environ]
    assert not leaked, f"a stage left its trackers' environment behind: {leaked}"


def sft_job(name, tiny_model, tmp_path, tracking, stages=("sft",)):
    data = write_alpaca(tmp_path / "identity.json")
    stage_list = [{"name": s, "type": "sft", "method": "full", "hyperparameters": FAST} for s in stages]
    return job_doc(name, tiny_model, [{"name": "identity", "source": str(data)}], stage_list, tmp_path / "saves",
                   tracking=tracking)


def logged_losses(output: Path) -> dict[int, float]:
    return {r["current_steps"]: r["loss"] for r in read_log(output) if "loss" in r}


# --------------------------------------------------------------------------------- TensorBoard


def test_tensorboard_event_files_hold_the_loss_series(tiny_model, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    doc = sft_job("tb", tiny_model, tmp_path, {"reportTo": ["tensorboard"]}, stages=("first", "second"))
    assert run_doc(doc, tmp_path) == 0
    for stage in ("first", "second"):
        out = tmp_path / "saves" / stage / "output"
        runs = out / "runs" / f"tb-{stage}"
        assert list(runs.glob("events.out.tfevents.*")), f"no event file under {runs}"
        acc = EventAccumulator(str(runs))
        acc.Reload()
        scalars = {e.step: e.value for e in acc.Scalars("train/loss")}
        expected = logged_losses(out)
        assert len(expected) == 6 and scalars.keys() == expected.keys()
        assert all(abs(scalars[s] - expected[s]) < 1e-5 for s in expected), (scalars, expected)
        assert "args" in "".join(acc.Tags()["tensors"])  # the training arguments, as text


def test_ppo_reports_to_tensorboard_too(tiny_model, tmp_path):
    """PPO's own loop (no transformers Trainer) drives the same reporting callbacks."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.conftest import IDENTITY

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q, _ in IDENTITY))
    stage = {"name": "ppo", "type": "ppo", "method": "full",
             "reward": {"functions": ["format"], "pattern": "Kubi", "numGenerations": 2, "maxNewTokens": 4},
             "hyperparameters": {**FAST, "maxSteps": 4}}
    doc = job_doc("rl", tiny_model, [{"name": "q", "source": str(prompts), "format": "prompt"}], [stage],
                  tmp_path / "saves", tracking={"reportTo": ["tensorboard"]})
    assert run_doc(doc, tmp_path) == 0
    out = tmp_path / "saves" / "ppo" / "output"
    acc = EventAccumulator(str(out / "runs" / "rl-ppo"))
    acc.Reload()
    expected = logged_losses(out)
    assert {e.step: round(e.value, 5) for e in acc.Scalars("train/loss")} == {k: round(v, 5) for k, v in expected.items()}
    assert len(expected) == 4 and "train/reward" in acc.Tags()["scalars"]


def test_no_tracker_writes_nothing(tiny_model, tmp_path):
    doc = sft_job("none", tiny_model, tmp_path, {})
    assert run_doc(doc, tmp_path) == 0
    out = tmp_path / "saves" / "sft" / "output"
    assert not (out / "runs").exists() and not (out / "wandb").exists()


# ------------------------------------------------------------------------------------- MLflow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (the `mlflow server` of the PyPI package, SQLite backend)."""
    folder = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    log = (folder / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--default-artifact-root", str(folder / "art")],
        stdout=log, stderr=subprocess.STDOUT, cwd=folder)
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"mlflow server did not start: {(folder / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    yield uri
    proc.terminate()
    proc.wait(timeout=30)


def test_mlflow_server_receives_params_and_loss_series(tiny_model, tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient

    tracking = {"reportTo": ["mlflow"], "mlflow": {"trackingUri": mlflow_server, "experiment": "kubetune-tests"}}
    doc = sft_job("ml", tiny_model, tmp_path, tracking, stages=("first", "second"))
    assert run_doc(doc, tmp_path) == 0

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("kubetune-tests")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`kubetune.job` = 'ml'")
    by_stage = {r.data.tags["kubetune.stage"]: r for r in runs}
    assert sorted(by_stage) == ["first", "second"], "one MLflow run per stage"
    for stage, run in by_stage.items():
        assert run.info.run_name == f"ml-{stage}" and run.info.status == "FINISHED"
        params = run.data.params
        assert float(params["learning_rate"]) == FAST["learningRate"] and params["max_steps"] == "6"
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
        expected = logged_losses(tmp_path / "saves" / stage / "output")
        assert history.keys() == expected.keys() and len(history) == 6
        assert all(abs(history[s] - expected[s]) < 1e-5 for s in expected), (history, expected)
        assert run.data.tags["kubetune.run"], "the run identity is tagged (a retried stage finds its run by it)"


def test_a_resumed_stage_continues_its_mlflow_run(tiny_model, tmp_path, mlflow_server):
    """The lookup a retried pod makes: the run an earlier attempt of the same stage of the same
    run (identity) started is continued; another run identity starts a new one."""
    import mlflow

    from kubetune.runtime.api.plan import plan
    from kubetune.runtime.api.spec import parse_job
    from kubetune.runtime.tracking import tracking_environment

    tracking = {"reportTo": ["mlflow"], "mlflow": {"trackingUri": mlflow_server, "experiment": "resume-tests"}}
    doc = sft_job("again", tiny_model, tmp_path, tracking)
    assert run_doc(doc, tmp_path) == 0
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    (first,) = client.search_runs([client.get_experiment_by_name("resume-tests").experiment_id])
    run_identity = first.data.tags["kubetune.run"]

    (cfg,) = plan(parse_job(doc), run=run_identity)
    with tracking_environment(cfg, tmp_path / "out", resumed=True):
        assert os.environ["MLFLOW_RUN_ID"] == first.info.run_id
    with tracking_environment(cfg, tmp_path / "out", resumed=False):
        assert "MLFLOW_RUN_ID" not in os.environ  # a first attempt starts its own run
    (other,) = plan(parse_job(doc), run="another-run")
    with tracking_environment(other, tmp_path / "out", resumed=True):
        assert "MLFLOW_RUN_ID" not in os.environ
    assert mlflow.active_run() is None


# ---------------------------------------------------------------------------------------- W&B


def wandb_records(path: Path):
    """The records of a W&B offline run log (run-<id>.wandb): a ':W&B' header, then LevelDB-style
    log records in 32 KiB blocks, each chunk with a 7-byte header (crc, length, type: 1 full,
    2 first, 3 middle, 4 last), each whole record a wandb_internal_pb2.Record."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", data[:7]
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (kind == 0 and length == 0):  # the padded end of a block
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_writes_its_run_into_the_output(tiny_model, tmp_path):
    from kubetune.runtime.api.plan import plan
    from kubetune.runtime.api.spec import parse_job
    from kubetune.runtime.tracking import wandb_run_id

    tracking = {"reportTo": ["wandb"], "wandb": {"project": "kt", "mode": "offline"}}
    doc = sft_job("wb", tiny_model, tmp_path, tracking)
    assert run_doc(doc, tmp_path) == 0
    out = tmp_path / "saves" / "sft" / "output"
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    (log_file,) = run_dir.glob("run-*.wandb")
    records = list(wandb_records(log_file))
    (run,) = [r.run for r in records if r.HasField("run")]
    assert (run.project, run.display_name) == ("kt", "wb-sft")
    config = {i.key: json.loads(i.value_json) for r in records if r.HasField("config") for i in r.config.update}
    assert config["learning_rate"] == FAST["learningRate"] and config["max_steps"] == 6
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.HasField("history")]
    losses = {h["train/global_step"]: h["train/loss"] for h in history if "train/loss" in h}
    expected = logged_losses(out)
    assert losses.keys() == expected.keys() and len(losses) == 6
    assert all(abs(losses[s] - expected[s]) < 1e-5 for s in expected), (losses, expected)
    assert [r.exit.exit_code for r in records if r.HasField("exit")] == [0], "the run was finished"
    # its id comes from this run's identity and the stage: every attempt (a retried pod) resumes it
    identity = json.loads((out / "COMMITTED.json").read_text())["extra"]["run"]
    (cfg,) = plan(parse_job(doc), run=identity)
    assert run.run_id == wandb_run_id(cfg) != wandb_run_id(cfg.model_copy(update={"run": "another"}))
    assert log_file.name == f"run-{run.run_id}.wandb"


# ------------------------------------------------------------------------------------- errors


def test_a_missing_tracker_package_fails_before_training_naming_the_field(tiny_model, tmp_path):
    """Run in a subprocess with `wandb` hidden, as in an image without kubetune[tracking]."""
    doc = sft_job("missing", tiny_model, tmp_path, {"reportTo": ["tensorboard", "wandb"]})
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps(doc))
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(  # what importlib, and so transformers and we, see of wandb
        "import importlib.util\n_find = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a: None if name.split('.')[0] == 'wandb' else _find(name, *a)\n")
    env = {**os.environ, "PYTHONPATH": str(hide)}
    r = subprocess.run([sys.executable, "-m", "kubetune.runtime", "run", str(job)], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode != 0
    assert "spec.tracking.reportTo" in r.stderr and "wandb" in r.stderr and "kubetune[tracking]" in r.stderr, r.stderr
    assert not (tmp_path / "saves" / "sft" / "checkpoints").exists(), "failed before any training"

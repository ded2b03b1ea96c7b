"""Experiment tracking (spec.tracking): TensorBoard, MLflow and W&B through transformers' own
reporting integrations (TensorBoardCallback, MLflowCallback, WandbCallback).

Those integrations read their settings from environment variables, so this module turns the
stage's tracking spec into that environment. Secrets never pass through here: in a cluster the
operator injects them from the Secrets the spec names (MLFLOW_TRACKING_TOKEN,
MLFLOW_TRACKING_USERNAME/PASSWORD, WANDB_API_KEY); with `kubetune run` they come from the shell.

A stage that resumes after an interruption keeps reporting into the same tracker run: W&B by a
run id derived from the run identity and the stage, MLflow by finding the run tagged with them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .api.errors import UserError
from .api.plan import ResolvedStage

log = logging.getLogger(__name__)

# tracker → the module its transformers integration needs (all three in kubetune[tracking])
TRACKER_MODULES: dict[str, str] = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
TAG_JOB, TAG_STAGE, TAG_RUN = "kubetune.job", "kubetune.stage", "kubetune.run"
FIELD = "spec.tracking.reportTo"


def run_name(cfg: ResolvedStage) -> str:
    return cfg.tracking.run_name or f"{cfg.job}-{cfg.name}"


def require_trackers(report_to: list[str]) -> None:
    """Fail before training, naming the field, when a tracker's package is not installed."""
    missing = [t for t in report_to if not _installed(TRACKER_MODULES[t])]
    if missing:
        raise UserError(
            f"{', '.join(missing)} requested but not installed in this environment: "
            "install kubetune[tracking] (the runtime image has it)",
            FIELD,
        )


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or hidden installation
        return False


def wandb_run_id(cfg: ResolvedStage) -> str:
    """The same id for every attempt of one stage of one run: a retried pod resumes the W&B run."""
    return hashlib.sha256(f"{cfg.run or cfg.job}/{cfg.name}".encode()).hexdigest()[:16]


def tracking_env(cfg: ResolvedStage, output_dir: Path) -> dict[str, str]:
    """Environment of transformers' reporting integrations for this stage (no secrets)."""
    t = cfg.tracking
    env: dict[str, str] = {}
    if "tensorboard" in t.report_to:
        env["TENSORBOARD_LOGGING_DIR"] = str(output_dir / "runs" / run_name(cfg))
    if "mlflow" in t.report_to:
        if t.mlflow.tracking_uri:
            env["MLFLOW_TRACKING_URI"] = t.mlflow.tracking_uri
        env["MLFLOW_EXPERIMENT_NAME"] = t.mlflow.experiment or cfg.job
        tags = {TAG_JOB: cfg.job, TAG_STAGE: cfg.name, TAG_RUN: cfg.run or ""}
        env["MLFLOW_TAGS"] = _json(tags)
        env["HF_MLFLOW_LOG_ARTIFACTS"] = "FALSE"  # the model goes to our storage, not to MLflow
    if "wandb" in t.report_to:
        env["WANDB_PROJECT"] = t.wandb.project or cfg.job
        if t.wandb.entity:
            env["WANDB_ENTITY"] = t.wandb.entity
        env["WANDB_MODE"] = t.wandb.mode
        # in the scratch space: W&B's service keeps writing its logs there after the run ends
        # (an offline run's own log is copied into the output when it is finished)
        env["WANDB_DIR"] = str(wandb_dir(output_dir))
        env["WANDB_RUN_ID"] = wandb_run_id(cfg)
        env["WANDB_RESUME"] = "allow"
        env["WANDB_LOG_MODEL"] = "false"
    return env


def mlflow_run_to_resume(cfg: ResolvedStage) -> str | None:
    """The MLflow run an earlier attempt of this stage of this run started, if any."""
    if "mlflow" not in cfg.tracking.report_to or not cfg.run:
        return None
    import mlflow

    experiment = mlflow.get_experiment_by_name(cfg.tracking.mlflow.experiment or cfg.job)
    if experiment is None:
        return None
    runs = mlflow.search_runs(
        experiment_ids=[experiment.experiment_id],
        filter_string=f"tags.`{TAG_RUN}` = '{cfg.run}' and tags.`{TAG_STAGE}` = '{cfg.name}'",
        output_format="list",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


@contextmanager
def tracking_environment(cfg: ResolvedStage, output_dir: Path, resumed: bool) -> Iterator[None]:
    """The stage runs with its trackers' environment; afterwards the environment is as before
    and the tracker runs are closed, so the next stage of a `kubetune run` starts runs of its
    own. A resumed stage (a retried pod, a rerun after an interruption) continues the MLflow
    run its earlier attempt started."""
    trackers = cfg.tracking.report_to
    if not trackers:
        yield
        return
    require_trackers(trackers)
    env = tracking_env(cfg, output_dir)
    saved = {k: os.environ.get(k) for k in (*env, "MLFLOW_RUN_ID")}
    os.environ.update(env)
    try:
        if resumed and "MLFLOW_RUN_ID" not in os.environ and (previous := mlflow_run_to_resume(cfg)):
            log.info("stage %s: continuing MLflow run %s of the earlier attempt", cfg.name, previous)
            os.environ["MLFLOW_RUN_ID"] = previous
        yield
    finally:
        _close_runs(trackers)
        if "wandb" in trackers and cfg.tracking.wandb.mode == "offline":
            keep_offline_wandb_run(cfg, output_dir)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def wandb_dir(output_dir: Path) -> Path:
    return output_dir.parent / "wandb"


def keep_offline_wandb_run(cfg: ResolvedStage, output_dir: Path) -> None:
    """Copy the finished offline run (its run-<id>.wandb log and files/, not the service's debug
    logs) into the stage output, as wandb/offline-run-*/ for `wandb sync` later."""
    for run in (wandb_dir(output_dir) / "wandb").glob(f"offline-run-*-{wandb_run_id(cfg)}"):
        shutil.copytree(run, output_dir / "wandb" / run.name, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("logs", "debug*.log"))


def _close_runs(trackers: list[str]) -> None:
    if "wandb" in trackers:
        import wandb

        if wandb.run is not None:
            wandb.finish()
    if "mlflow" in trackers:
        import mlflow

        if mlflow.active_run() is not None:
            mlflow.end_run()


def _json(value) -> str:
    import json

    return json.dumps(value, sort_keys=True)

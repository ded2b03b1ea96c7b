"""The pod contract: every name the operator and the runtime share, in one torch-free module.

The operator builds training pods from these names (kubetune.operator.manifests); the runtime
reads the same names inside the pod. A name only one side knows is a bug: the scratch folder
once was set by the operator and read by nobody, so caches landed on the container's root
filesystem. Training pods run with a read-only root filesystem, so the runtime writes only to
the volumes named here (the scratch emptyDir) and to the termination-message file.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

# -- the container ----------------------------------------------------------------------------
CONTAINER_NAME = "trainer"
RUNTIME_UID = 1000  # the runtime image's user; the pod's securityContext runs as it
TERMINATION_MESSAGE_PATH = "/dev/termination-log"  # the container's terminationMessagePath
# On failure the termination message is the error; on success rank 0 writes
# {"progress": <its last /progress document>}, so that the operator has the stage's final step
# and loss even when the stage ended between two of its /progress polls.
FINAL_PROGRESS_KEY = "progress"

# -- volumes: where the operator mounts them --------------------------------------------------
CONFIG_DIR = "/etc/kubetune"  # the stage's ConfigMap, read-only
CONFIG_KEY = "stage.json"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_KEY}"
SCRATCH_DIR = "/var/tmp/kubetune"  # an emptyDir: downloads, caches, work and temp files
# The cluster model cache (spec.resources.modelCache or the chart's `modelCache`): a
# PersistentVolumeClaim shared by every stage pod, holding the Hugging Face hub cache
# (HF_HUB_CACHE, MODEL_CACHE_HUB) and the kubetune cache of s3:// inputs (KUBETUNE_CACHE_DIR,
# MODEL_CACHE_KUBETUNE), so a model is downloaded once per cluster, not once per stage pod.
# Both caches take a lock per download in the cache itself (huggingface_hub: one per file;
# kubetune.runtime.storage.cache: one per URI), so two pods never fetch the same files at once.
MODEL_CACHE_DIR = "/var/cache/kubetune-models"
MODEL_CACHE_HUB = f"{MODEL_CACHE_DIR}/hub"
MODEL_CACHE_KUBETUNE = f"{MODEL_CACHE_DIR}/kubetune"
MODEL_CACHE_VOLUME = "model-cache"

# -- ports ------------------------------------------------------------------------------------
METRICS_PORT = 9400  # /metrics and /progress of local rank 0 (local rank N: + N)
RENDEZVOUS_PORT = 29500  # torchrun's static rendezvous on pod 0 of a multi-node stage

# -- labels the operator puts on every child (and the CLI selects by) --------------------------
LABEL_JOB = "kubetune.io/job"
LABEL_STAGE = "kubetune.io/stage"
LABEL_STAGE_INDEX = "kubetune.io/stage-index"
# set by the Job controller on the pods of an Indexed Job: the pod's rank among the stage's nodes
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"

# -- environment of a training pod --------------------------------------------------------------
ENV_SCRATCH = "KUBETUNE_SCRATCH"  # the scratch volume's mount path
ENV_METRICS_PORT = "KUBETUNE_METRICS_PORT"
ENV_NODES = "KUBETUNE_NODES"  # pods of this stage (Indexed Job completions)
ENV_NODE_RANK = "KUBETUNE_NODE_RANK"  # this pod's completion index
ENV_POD_IP = "POD_IP"  # where /metrics and /progress listen (downward API)
ENV_MASTER_ADDR = "MASTER_ADDR"  # torch.distributed's names: pod 0 of a multi-node stage
ENV_MASTER_PORT = "MASTER_PORT"
ENV_HF_TOKEN = "HF_TOKEN"  # from spec.model.tokenSecretRef
ENV_AWS_ACCESS_KEY_ID = "AWS_ACCESS_KEY_ID"  # from spec.storage.credentialsSecretRef
ENV_AWS_SECRET_ACCESS_KEY = "AWS_SECRET_ACCESS_KEY"
ENV_AWS_ENDPOINT_URL = "AWS_ENDPOINT_URL"
ENV_AWS_DEFAULT_REGION = "AWS_DEFAULT_REGION"
ENV_MLFLOW_TRACKING_TOKEN = "MLFLOW_TRACKING_TOKEN"  # from spec.tracking.mlflow.tokenSecretRef
ENV_MLFLOW_TRACKING_USERNAME = "MLFLOW_TRACKING_USERNAME"  # from spec.tracking.mlflow.credentialsSecretRef
ENV_MLFLOW_TRACKING_PASSWORD = "MLFLOW_TRACKING_PASSWORD"
ENV_WANDB_API_KEY = "WANDB_API_KEY"  # from spec.tracking.wandb.apiKeySecretRef
ENV_HF_HUB_CACHE = "HF_HUB_CACHE"  # the hub cache only (HF_HOME stays on the scratch volume)
ENV_KUBETUNE_CACHE_DIR = "KUBETUNE_CACHE_DIR"  # s3:// models and datasets (storage.cache)


def scratch_layout(scratch: str | Path) -> dict[str, str]:
    """Where each writer goes under the scratch folder, as the environment variables the
    libraries read: temp files, the Hugging Face and XDG caches, matplotlib's config and the
    kubetune cache (s3:// models and datasets) and work folders."""
    s = Path(scratch)
    return {
        "TMPDIR": str(s / "tmp"),
        "XDG_CACHE_HOME": str(s / "cache"),
        "XDG_CONFIG_HOME": str(s / "config"),
        "HF_HOME": str(s / "hf"),
        "MPLCONFIGDIR": str(s / "config" / "matplotlib"),
        "TRITON_CACHE_DIR": str(s / "cache" / "triton"),
        "KUBETUNE_CACHE_DIR": str(s / "cache" / "kubetune"),
        "KUBETUNE_WORK_DIR": str(s / "work"),
    }


def use_scratch(environ: MutableMapping[str, str] | None = None) -> Path | None:
    """In a pod (`$KUBETUNE_SCRATCH` set): point every writer at the scratch volume, keeping any
    variable the pod already sets, and create the folders; a HOME that cannot be written (the
    image's, under a read-only root filesystem) moves there too. Returns the scratch folder, or
    None outside a pod (local runs keep their usual places)."""
    env = os.environ if environ is None else environ
    scratch = env.get(ENV_SCRATCH)
    if not scratch:
        return None
    for name, path in scratch_layout(scratch).items():
        env.setdefault(name, path)
        Path(env[name]).mkdir(parents=True, exist_ok=True)
    if not os.access(env.get("HOME") or "/", os.W_OK):
        env["HOME"] = str(Path(scratch) / "home")
        Path(env["HOME"]).mkdir(parents=True, exist_ok=True)
    return Path(scratch)


# -- which pod is rank 0 ------------------------------------------------------------------------


def _get(obj: Any, *path: str) -> Any:
    """pod["metadata"]["creationTimestamp"] of a dict, pod.metadata.creation_timestamp of a
    kubernetes client object."""
    for key in path:
        if obj is None:
            return None
        obj = obj.get(key) if isinstance(obj, dict) else getattr(obj, re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower(), None)
    return obj


def _timestamp(value: Any) -> float:
    if isinstance(value, dt.datetime):
        return value.timestamp()
    try:
        return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp() if value else 0.0
    except ValueError:
        return 0.0


def pod_index(pod: Any) -> str | None:
    """The pod's completion index (its node rank), None for a pod without one."""
    return (_get(pod, "metadata", "annotations") or {}).get(COMPLETION_INDEX) or (
        _get(pod, "metadata", "labels") or {}).get(COMPLETION_INDEX)


def rank0_pod(pods: list[Any], running: bool = False) -> Any | None:
    """The rank-0 pod of a stage (the one serving /progress and the log users read): completion
    index 0, or no index (a pod of a one-node Job); never one being deleted; a running one before
    the others, then the newest. `running`: only a running one. Pods as dicts (the operator) or
    kubernetes client objects (the CLI)."""
    cands = [p for p in pods if pod_index(p) in ("0", None) and not _get(p, "metadata", "deletionTimestamp")
             and (not running or _get(p, "status", "phase") == "Running")]
    return max(cands, key=lambda p: (_get(p, "status", "phase") == "Running",
                                     _timestamp(_get(p, "metadata", "creationTimestamp"))), default=None)

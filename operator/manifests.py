"""Pure builders: a FineTuneJob and one of its resolved stages → the child objects.

Per stage: a ConfigMap holding the resolved stage config (`stage.json`, no secrets), a
batch/v1 Job running the runtime, and — when a stage spans several nodes — a headless Service
that gives the pods stable DNS names for the rendezvous. No I/O here; the handlers apply what
these functions return.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from kubetune.runtime.api import contract as c
from kubetune.runtime.api.contract import (
    CONFIG_DIR,
    CONFIG_KEY,
    CONFIG_PATH,
    LABEL_JOB,
    LABEL_STAGE,
    LABEL_STAGE_INDEX,
    RENDEZVOUS_PORT,
    SCRATCH_DIR,
    TERMINATION_MESSAGE_PATH,
)
from kubetune.runtime.api.errors import PERMANENT_EXIT_CODES
from kubetune.runtime.api.plan import ResolvedStage
from kubetune.runtime.api.spec import API_GROUP, API_VERSION, KIND, FineTuneJob

from .config import OperatorConfig

LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "kubetune-operator"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
ANNOTATION_CONFIG_HASH = "kubetune.io/config-hash"

CONTAINER = c.CONTAINER_NAME
GPU_RESOURCE = "nvidia.com/gpu"

# Kubernetes limits: Job names are DNS labels (63), but an Indexed Job's pod hostname is
# `<job>-<index>` and pod names add a 5-char suffix; keep child names short enough for both.
MAX_CHILD_NAME = 52


_DIGEST = re.compile(r"[0-9a-f]{8}")


def _hashed(name: str, key: str, limit: int = MAX_CHILD_NAME) -> str:
    """`name` cut to fit, then `-<8 hex of sha256(key)>`."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    return f"{name[: limit - 9].rstrip('-')}-{digest}"


def child_name(job_name: str, stage_name: str) -> str:
    """The name of a stage's Job and ConfigMap: `<job>-<stage>` when that says which job and stage
    it is, else `<job>-<stage>` cut to fit plus `-<hash of (job, stage)>`.

    Injective: a plain name's last dash-separated part is the stage (plain only when the stage
    has no dash and does not look like a hash suffix), so job and stage can be read back; a
    hashed name ends in 8 hex digits of sha256 over both names, which no plain name does. So a
    FineTuneJob `a-b` with stage `c` gets `a-b-c` and `a` with stage `b-c` gets `a-b-c-<hash>`.
    Jobs keep ≤ 52 characters (an Indexed Job's pod hostname `<job>-<index>` is a DNS label).
    Names from before this scheme (`<job>-<stage>` for every stage) are found by `legacy_child_name`.
    """
    name = f"{job_name}-{stage_name}"
    if "-" not in stage_name and not _DIGEST.fullmatch(stage_name) and len(name) <= MAX_CHILD_NAME:
        return name
    return _hashed(name, f"{job_name}\0{stage_name}")


def service_name(job_name: str, stage_name: str) -> str:
    """Headless Service of a multi-node stage (a DNS-1035 label: starts with a letter)."""
    name = child_name(job_name, stage_name)
    return name if name[0].isalpha() else _hashed(f"s-{job_name}-{stage_name}", f"service\0{job_name}\0{stage_name}")


def legacy_child_name(job_name: str, stage_name: str) -> str:
    """The child name of operators before 0.x (`<job>-<stage>`, hashed only when too long): the
    Jobs of FineTuneJobs that were running across the upgrade keep it (reconcile looks them up)."""
    name = f"{job_name}-{stage_name}"
    if len(name) <= MAX_CHILD_NAME:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: MAX_CHILD_NAME - 9].rstrip('-')}-{digest}"


def legacy_service_name(job_name: str, stage_name: str) -> str:
    name = legacy_child_name(job_name, stage_name)
    return name if name[0].isalpha() else legacy_child_name("s", name)


def stage_config(stage: ResolvedStage) -> dict[str, Any]:
    """What the runtime pod reads from stage.json."""
    return stage.to_yaml_dict()


def stage_config_json(stage: ResolvedStage) -> str:
    return json.dumps(stage_config(stage), sort_keys=True, indent=1)


def config_hash(stage: ResolvedStage) -> str:
    return hashlib.sha256(stage_config_json(stage).encode()).hexdigest()[:16]


def labels(job: FineTuneJob, stage: ResolvedStage) -> dict[str, str]:
    return {
        LABEL_JOB: job.metadata.name,
        LABEL_STAGE: stage.name,
        LABEL_STAGE_INDEX: str(stage.index),
        LABEL_MANAGED_BY: MANAGED_BY,
    }


def owner_reference(job: FineTuneJob, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "name": job.metadata.name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(job: FineTuneJob, stage: ResolvedStage, uid: str, name: str, **extra_labels: str) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "labels": {**labels(job, stage), **extra_labels},
        "ownerReferences": [owner_reference(job, uid)],
    }
    if job.metadata.namespace:
        meta["namespace"] = job.metadata.namespace
    return meta


def build_configmap(job: FineTuneJob, stage: ResolvedStage, uid: str) -> dict[str, Any]:
    """The resolved stage config. Holds no secret: credentials stay Secret references."""
    meta = _metadata(job, stage, uid, child_name(job.metadata.name, stage.name))
    meta["annotations"] = {ANNOTATION_CONFIG_HASH: config_hash(stage)}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {CONFIG_KEY: stage_config_json(stage)}}


def build_service(job: FineTuneJob, stage: ResolvedStage, uid: str) -> dict[str, Any] | None:
    """Headless Service for the pods of a multi-node stage (None for one node)."""
    if stage.resources.nodes <= 1:
        return None
    meta = _metadata(job, stage, uid, service_name(job.metadata.name, stage.name))
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,  # the rendezvous happens before anything is ready
            "selector": {LABEL_JOB: job.metadata.name, LABEL_STAGE: stage.name},
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT}],
        },
    }


def _secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


# set by the operator from the spec and the pod, or derived from the scratch volume by the
# runtime (contract.scratch_layout); podOverrides.env cannot replace them
RESERVED_ENV = frozenset({
    c.ENV_POD_IP, c.ENV_HF_TOKEN, c.ENV_MASTER_ADDR, c.ENV_MASTER_PORT, c.ENV_AWS_ACCESS_KEY_ID,
    c.ENV_AWS_SECRET_ACCESS_KEY, c.ENV_AWS_ENDPOINT_URL, c.ENV_AWS_DEFAULT_REGION, "PYTHONUNBUFFERED",
    *c.scratch_layout(SCRATCH_DIR),
})


def _override_env(stage: ResolvedStage) -> list[dict[str, Any]]:
    """spec.resources.podOverrides.env (NCCL settings and the like); the runtime's own contract
    variables cannot be overridden this way."""
    return [_env_var(e) for e in stage.resources.pod_overrides.env
            if not e.name.startswith("KUBETUNE_") and e.name not in RESERVED_ENV]


def _env_var(e) -> dict[str, Any]:
    if e.value_from is not None:  # the kubelet reads the Secret: its value is never in our objects
        ref = e.value_from.secret_key_ref
        return {"name": e.name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}
    return {"name": e.name, "value": e.value or ""}


def _env(job: FineTuneJob, stage: ResolvedStage, config: OperatorConfig) -> list[dict[str, Any]]:
    spec = job.spec
    # Only what the runtime reads (kubetune.runtime.api.contract); job, namespace and stage come
    # with the stage config itself.
    env: list[dict[str, Any]] = [
        {"name": c.ENV_POD_IP, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": c.ENV_METRICS_PORT, "value": str(config.runtime_metrics_port)},
        {"name": c.ENV_NODES, "value": str(stage.resources.nodes)},
        {
            "name": c.ENV_NODE_RANK,
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}},
        },
        {"name": c.ENV_SCRATCH, "value": SCRATCH_DIR},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if stage.resources.nodes > 1:
        svc = service_name(job.metadata.name, stage.name)
        head = f"{child_name(job.metadata.name, stage.name)}-0.{svc}"
        env += [
            {"name": c.ENV_MASTER_ADDR, "value": head},
            {"name": c.ENV_MASTER_PORT, "value": str(RENDEZVOUS_PORT)},
        ]
    storage = spec.storage
    if storage.endpoint:
        env.append({"name": c.ENV_AWS_ENDPOINT_URL, "value": storage.endpoint})
    if storage.region:
        env.append({"name": c.ENV_AWS_DEFAULT_REGION, "value": storage.region})
    if storage.credentials_secret_ref is not None:
        ref = storage.credentials_secret_ref.name
        env += [_secret_env(c.ENV_AWS_ACCESS_KEY_ID, ref, "AWS_ACCESS_KEY_ID"),
                _secret_env(c.ENV_AWS_SECRET_ACCESS_KEY, ref, "AWS_SECRET_ACCESS_KEY")]
    if spec.model.token_secret_ref is not None:
        env.append(_secret_env(c.ENV_HF_TOKEN, spec.model.token_secret_ref.name, spec.model.token_secret_ref.key))
    return env + _tracking_secret_env(spec.tracking)


def _tracking_secret_env(tracking) -> list[dict[str, Any]]:
    """The trackers' credentials, from the Secrets spec.tracking names (only of trackers in use)."""
    env = []
    mlflow, wandb = tracking.mlflow, tracking.wandb
    if "mlflow" in tracking.report_to:
        if mlflow.token_secret_ref is not None:
            env.append(_secret_env(c.ENV_MLFLOW_TRACKING_TOKEN, mlflow.token_secret_ref.name, mlflow.token_secret_ref.key))
        if mlflow.credentials_secret_ref is not None:
            ref = mlflow.credentials_secret_ref.name
            env += [_secret_env(c.ENV_MLFLOW_TRACKING_USERNAME, ref, c.ENV_MLFLOW_TRACKING_USERNAME),
                    _secret_env(c.ENV_MLFLOW_TRACKING_PASSWORD, ref, c.ENV_MLFLOW_TRACKING_PASSWORD)]
    if "wandb" in tracking.report_to and wandb.api_key_secret_ref is not None:
        env.append(_secret_env(c.ENV_WANDB_API_KEY, wandb.api_key_secret_ref.name, wandb.api_key_secret_ref.key))
    return env


def model_cache(stage: ResolvedStage, config: OperatorConfig) -> tuple[str, str | None] | None:
    """(claim, subPath) of the stage's model cache: the spec's, else the operator's default, else
    None. The spec wins as a whole (its subPath is never mixed with the operator's claim)."""
    mc = stage.resources.model_cache
    if mc is not None:
        return mc.claim_name, mc.sub_path
    if config.model_cache_claim:
        return config.model_cache_claim, config.model_cache_sub_path
    return None


def _model_cache_env(stage: ResolvedStage, config: OperatorConfig) -> list[dict[str, Any]]:
    """With a model cache: the hub cache (not all of HF_HOME) and the kubetune cache of s3:// inputs
    live on it; every other writer stays on the scratch volume (contract.scratch_layout)."""
    if model_cache(stage, config) is None:
        return []
    return [{"name": c.ENV_HF_HUB_CACHE, "value": c.MODEL_CACHE_HUB},
            {"name": c.ENV_KUBETUNE_CACHE_DIR, "value": c.MODEL_CACHE_KUBETUNE}]


def _resources(stage: ResolvedStage) -> dict[str, Any]:
    r = stage.resources
    limits: dict[str, str] = {}
    requests: dict[str, str] = {}
    if r.gpus_per_node > 0:
        limits[GPU_RESOURCE] = str(r.gpus_per_node)
    if r.cpu:
        limits["cpu"] = requests["cpu"] = r.cpu
    if r.memory:
        limits["memory"] = requests["memory"] = r.memory
    limits.update(r.pod_overrides.resources)  # device plugins' extended resources (RDMA NICs)
    out: dict[str, Any] = {}
    if limits:
        out["limits"] = limits
    if requests:
        out["requests"] = requests
    return out


# The runtime writes only to its volumes (the scratch emptyDir; contract.use_scratch) and the
# termination-message file: the image's root filesystem stays read-only.
SECURITY_CONTEXT = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}
POD_SECURITY_CONTEXT = {
    "runAsNonRoot": True,
    "runAsUser": c.RUNTIME_UID,
    "runAsGroup": c.RUNTIME_UID,
    "fsGroup": c.RUNTIME_UID,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def pod_failure_policy(gang: bool = False) -> dict[str, Any]:
    """The runtime's permanent failures fail the stage at once: bad input (42) and out of memory
    (43); evictions and preemptions cost no retry. Every other exit is retried
    (kubetune.runtime.api.errors.FAILURES), SIGKILL (137) included: exit codes cannot tell the
    kernel's OOM killer from a crash, so the operator stops the Job itself when a container's
    status says OOMKilled (reconcile), and any other kill resumes from the checkpoint.

    One pod: a disrupted pod is replaced (Ignore). A gang (several nodes): a disrupted pod fails
    the Job at once, so the operator restarts all pods now instead of the others waiting for
    their collective to time out; the operator does not count that restart.
    """
    return {
        "rules": [
            {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                                 "values": list(PERMANENT_EXIT_CODES)}},
            {"action": "FailJob" if gang else "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
        ]
    }


def kueue_queue(job: FineTuneJob) -> str | None:
    """The Kueue LocalQueue of a FineTuneJob's stage Jobs: spec.queueName, else its queue label."""
    return job.spec.queue_name or job.metadata.labels.get(KUEUE_QUEUE_LABEL) or None


def build_job(
    job: FineTuneJob, stage: ResolvedStage, uid: str, config: OperatorConfig, suspend: bool = False
) -> dict[str, Any]:
    """The batch/v1 Job of one stage: one pod per node, Indexed, never restarted in place."""
    name = child_name(job.metadata.name, stage.name)
    extra_labels = {k: v for k, v in job.metadata.labels.items() if k in (KUEUE_QUEUE_LABEL, KUEUE_PRIORITY_LABEL)}
    if kueue_queue(job):
        extra_labels[KUEUE_QUEUE_LABEL] = kueue_queue(job)
    meta = _metadata(job, stage, uid, name, **extra_labels)
    meta["annotations"] = {ANNOTATION_CONFIG_HASH: config_hash(stage)}
    r = stage.resources
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": r.image or config.runtime_image,
        "imagePullPolicy": r.image_pull_policy or config.image_pull_policy,
        "command": [*config.runtime_command, "--config", CONFIG_PATH],
        "env": _env(job, stage, config) + _model_cache_env(stage, config) + _override_env(stage),
        "ports": [{"name": "metrics", "containerPort": config.runtime_metrics_port}],
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "scratch", "mountPath": SCRATCH_DIR},
        ],
        "securityContext": SECURITY_CONTEXT,
        "terminationMessagePath": TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if r.nodes > 1:
        container["ports"].append({"name": "rendezvous", "containerPort": RENDEZVOUS_PORT})
    cache = model_cache(stage, config)
    if cache is not None:
        mount: dict[str, Any] = {"name": c.MODEL_CACHE_VOLUME, "mountPath": c.MODEL_CACHE_DIR}
        if cache[1]:
            mount["subPath"] = cache[1]
        container["volumeMounts"].append(mount)
    resources = _resources(stage)
    if resources:
        container["resources"] = resources
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "containers": [container],
        "volumes": [{"name": "config", "configMap": {"name": name}}, {"name": "scratch", "emptyDir": {}}],
        "securityContext": POD_SECURITY_CONTEXT,
        "automountServiceAccountToken": False,  # training pods need no API rights
        # SIGTERM (drain, preemption, suspend) → the trainer commits a checkpoint within this
        "terminationGracePeriodSeconds": job.spec.run_policy.termination_grace_period_seconds,
        "enableServiceLinks": False,
    }
    if cache is not None:
        pod_spec["volumes"].append({"name": c.MODEL_CACHE_VOLUME, "persistentVolumeClaim": {"claimName": cache[0]}})
    if config.service_account:
        pod_spec["serviceAccountName"] = config.service_account
    # the spec's placement wins; the operator's GPU defaults fill what it leaves out (GPU pods only)
    gpu = r.gpus_per_node > 0
    runtime_class = r.runtime_class_name or (config.default_runtime_class_name if gpu else None)
    if runtime_class:
        pod_spec["runtimeClassName"] = runtime_class
    node_selector = dict(r.node_selector) or (dict(config.default_node_selector) if gpu else {})
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    tolerations = [t.to_yaml_dict() for t in r.tolerations] or (
        [json.loads(t) for t in config.default_tolerations] if gpu else []
    )
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if r.priority_class_name:
        pod_spec["priorityClassName"] = r.priority_class_name
    if r.pod_overrides.host_network:  # RDMA/RoCE fabrics without a CNI plugin for them
        pod_spec["hostNetwork"] = True
        pod_spec["dnsPolicy"] = "ClusterFirstWithHostNet"
    if r.nodes > 1:
        pod_spec["subdomain"] = service_name(job.metadata.name, stage.name)
    job_spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": r.nodes,
        "parallelism": r.nodes,
        # Several nodes are one gang: the first failed pod fails the whole Job (its other pods are
        # stopped at once, none is replaced on its own), and the operator restarts every pod from
        # the checkpoint, counting the restart against runPolicy.backoffLimit itself.
        "backoffLimit": job.spec.run_policy.backoff_limit if r.nodes <= 1 else 0,
        "podFailurePolicy": pod_failure_policy(gang=r.nodes > 1),
        "suspend": bool(suspend),
        "template": {
            "metadata": {
                # the pod overrides add labels/annotations (e.g. Multus networks); ours win on a clash
                "labels": {**r.pod_overrides.labels, **meta["labels"]},
                "annotations": {**r.pod_overrides.annotations, **meta["annotations"]},
            },
            "spec": pod_spec,
        },
    }
    if r.nodes > 1:
        # a lost node breaks the rendezvous: replace pods only once they are fully gone
        job_spec["podReplacementPolicy"] = "Failed"
    if job.spec.run_policy.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = job.spec.run_policy.active_deadline_seconds
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}


def build_network_policy(job: FineTuneJob, stage: ResolvedStage, uid: str, config: OperatorConfig) -> dict[str, Any] | None:
    """The stage's pods take traffic only from each other (the rendezvous, NCCL/gloo on any port)
    and, on the metrics port (/metrics, /progress), from the operator and the monitoring
    namespaces; egress as configured (open when not). None when the operator makes none.
    (A hostNetwork pod is outside every NetworkPolicy.)"""
    if not config.network_policy:
        return None
    np = json.loads(config.network_policy)
    gang = {"podSelector": {"matchLabels": {LABEL_JOB: job.metadata.name, LABEL_STAGE: stage.name}}}
    ns_label = "kubernetes.io/metadata.name"
    metrics_from = [{"namespaceSelector": {"matchLabels": {ns_label: np["operatorNamespace"]}},
                     "podSelector": {"matchLabels": dict(np.get("operatorPodLabels") or {})}}]
    metrics_from += [{"namespaceSelector": {"matchLabels": {ns_label: n}}} for n in np.get("monitoringNamespaces") or []]
    spec: dict[str, Any] = {
        "podSelector": gang["podSelector"],
        "policyTypes": ["Ingress"],
        "ingress": [
            {"from": [gang]},
            {"from": metrics_from, "ports": [{"port": config.runtime_metrics_port, "protocol": "TCP"}]},
        ],
    }
    if np.get("egress") is not None:
        dns = {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}
        spec["policyTypes"].append("Egress")
        spec["egress"] = [{"to": [gang]}, dns, *np["egress"]]
    meta = _metadata(job, stage, uid, child_name(job.metadata.name, stage.name))
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta, "spec": spec}

"""One adversarial table of FineTuneJobs for the cluster policy (values `policy`, docs/security.md),
checked by both layers that enforce it: the operator's own check (operator/policy.py,
tests/operator/test_operator_policy.py) and the chart's ValidatingAdmissionPolicy on the real apiserver
(tests/e2e/test_policy.py).

STRICT is the chart's default policy plus the setting docs/security.md recommends for shared
clusters (Secrets by name prefix). RELAXED allows everything the table asks for: each row then
passes, so each rejection is the policy's doing and nothing else's.
"""

from __future__ import annotations

import copy
from typing import Any, NamedTuple

RUNTIME_REPOSITORY = "ghcr.io/kubetune/runtime"  # the chart's runtime.image.repository

STRICT: dict[str, Any] = {"secretNamePrefixes": ["kubetune-"]}  # on top of the chart's defaults

RELAXED: dict[str, Any] = {
    "imagePrefixes": [""],
    "imagePullPolicies": ["Always", "IfNotPresent", "Never"],
    "hostNetwork": True,
    "runtimeClassNames": ["nvidia", "kata-unconfined"],
    "priorityClassNames": ["system-node-critical"],
    "tolerationKeys": ["nvidia.com/gpu", "node-role.kubernetes.io/control-plane", ""],
    "nodeSelectorKeyPrefixes": [""],
    "annotationPrefixes": [""],
    "labelPrefixes": [""],
    "secretNamePrefixes": [""],
    "modelCacheClaimPrefixes": [""],
}

BASE: dict[str, Any] = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "job"},
    "spec": {
        "model": {"name": "org/model", "tokenSecretRef": {"name": "kubetune-hf", "key": "token"}},
        "data": [{"name": "d", "source": "s3://data/d.json"}],
        "stages": [{"name": "sft", "type": "sft"}],
        "storage": {"uri": "s3://ckpt/job/", "endpoint": "http://minio.storage:9000",
                    "credentialsSecretRef": {"name": "kubetune-s3"}},
        "resources": {
            "image": f"{RUNTIME_REPOSITORY}:0.1.0-cu13",
            "imagePullPolicy": "IfNotPresent",
            "runtimeClassName": "nvidia",
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-GB10"},
            "podOverrides": {"annotations": {"k8s.v1.cni.cncf.io/networks": "cx7-roce"},
                             "env": [{"name": "WANDB_API_KEY",
                                      "valueFrom": {"secretKeyRef": {"name": "kubetune-wandb", "key": "key"}}}]},
        },
    },
}


class Case(NamedTuple):
    name: str
    patch: dict[str, Any]  # merged into BASE["spec"]["resources"] (or spec, for top-level keys)
    field: str  # the field every layer's message names
    spec_rule: bool = False  # refused by the CRD's own rules whatever the policy says


def _resources(**fields) -> dict[str, Any]:
    return {"resources": fields}


def _overrides(**fields) -> dict[str, Any]:
    return {"resources": {"podOverrides": fields}}


CASES = [
    Case("host network", _overrides(hostNetwork=True), "spec.resources.podOverrides.hostNetwork"),
    Case("a foreign registry", _resources(image="docker.io/evil/miner:latest"), "spec.resources.image"),
    Case("a look-alike of the runtime image", _resources(image=f"{RUNTIME_REPOSITORY}-evil:1"), "spec.resources.image"),
    Case("an image cached by another tenant", _resources(imagePullPolicy="Never"), "spec.resources.imagePullPolicy"),
    Case("an unlisted runtime class", _resources(runtimeClassName="kata-unconfined"), "spec.resources.runtimeClassName"),
    Case("a system priority class", _resources(priorityClassName="system-node-critical"),
         "spec.resources.priorityClassName"),
    Case("a toleration for control-plane nodes",
         _resources(tolerations=[{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}]),
         "spec.resources.tolerations"),
    Case("a toleration of every taint", _resources(tolerations=[{"operator": "Exists"}]), "spec.resources.tolerations"),
    Case("pinned to a named node", _resources(nodeSelector={"kubernetes.io/hostname": "control-plane-1"}),
         "spec.resources.nodeSelector"),
    Case("AppArmor unconfined",
         _overrides(annotations={"container.apparmor.security.beta.kubernetes.io/trainer": "unconfined"}),
         "spec.resources.podOverrides.annotations"),
    Case("seccomp unconfined", _overrides(annotations={"seccomp.security.alpha.kubernetes.io/pod": "unconfined"}),
         "spec.resources.podOverrides.annotations"),
    Case("a label that joins another team's Service", _overrides(labels={"app": "payments-api"}),
         "spec.resources.podOverrides.labels"),
    Case("storage credentials from an unlisted Secret", {"storage": {"uri": "s3://ckpt/job/",
                                                                     "credentialsSecretRef": {"name": "payments-db"}}},
         "spec.storage.credentialsSecretRef.name"),
    Case("a model token from an unlisted Secret", {"model": {"name": "org/model",
                                                             "tokenSecretRef": {"name": "ci-deploy-key"}}},
         "spec.model.tokenSecretRef.name"),
    Case("env from an unlisted Secret",
         _overrides(env=[{"name": "X", "valueFrom": {"secretKeyRef": {"name": "payments-db", "key": "password"}}}]),
         "spec.resources.podOverrides.env"),
    Case("an MLflow token from an unlisted Secret",
         {"tracking": {"reportTo": ["mlflow"], "mlflow": {"trackingUri": "http://mlflow.mlops:5000",
                                                          "tokenSecretRef": {"name": "payments-db"}}}},
         "spec.tracking.mlflow.tokenSecretRef.name"),
    Case("MLflow basic-auth credentials from an unlisted Secret",
         {"tracking": {"reportTo": ["mlflow"], "mlflow": {"credentialsSecretRef": {"name": "payments-db"}}}},
         "spec.tracking.mlflow.credentialsSecretRef.name"),
    Case("a W&B key from an unlisted Secret",
         {"tracking": {"reportTo": ["wandb"], "wandb": {"apiKeySecretRef": {"name": "ci-deploy-key", "key": "k"}}}},
         "spec.tracking.wandb.apiKeySecretRef.name"),
    Case("plaintext credentials in the MLflow URI",
         {"tracking": {"reportTo": ["mlflow"], "mlflow": {"trackingUri": "https://bob:hunter2@mlflow.example.com"}}},
         "spec.tracking.mlflow.trackingUri", spec_rule=True),
    Case("another team's PersistentVolumeClaim as the model cache",
         _resources(modelCache={"claimName": "payments-db-data"}), "spec.resources.modelCache.claimName"),
    Case("plaintext credentials in the endpoint",
         {"storage": {"uri": "s3://ckpt/job/", "endpoint": "http://admin:hunter2@minio.storage:9000"}},
         "spec.storage.endpoint", spec_rule=True),
]


def case_doc(case: Case, name: str) -> dict[str, Any]:
    """BASE with the case's settings merged in, named `name`."""
    doc = copy.deepcopy(BASE)
    doc["metadata"]["name"] = name
    for key, value in case.patch.items():
        if key == "resources":
            res = doc["spec"]["resources"]
            for k, v in value.items():
                res[k] = {**res.get(k, {}), **v} if k == "podOverrides" else v
        else:
            doc["spec"][key] = value
    return doc

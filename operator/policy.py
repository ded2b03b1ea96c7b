"""What a FineTuneJob may ask of its training pods on a shared cluster: the cluster admin's policy.

Creating a FineTuneJob makes the operator create pods with settings its author chose (image, host
network, placement, annotations, labels, Secrets, the model cache's PersistentVolumeClaim). The admin bounds them in the chart's values
(`policy:`); the chart renders the same rules twice:

- as a ValidatingAdmissionPolicy (`templates/admission-policy.yaml`): the apiserver rejects a
  FineTuneJob that breaks them at apply time (kubectl, Argo CD), naming the field;
- as this module's input (`--policy` / `KUBETUNE_OPERATOR_POLICY`, JSON of the same values): the
  operator checks again before it creates anything for a job (defence in depth: a policy binding
  that was deleted or scoped too narrowly) and fails it with reason `PolicyViolation`.

Every list holds allowed values (class names, pull policies, toleration keys) or allowed prefixes
(images, node-selector keys, annotation and label keys, Secret names); an empty list allows
nothing, `[""]` allows everything. A prefix should end at a boundary (`registry.example.com/`,
`ghcr.io/kubetune/runtime:`), or `ghcr.io/kubetune/runtime` would also allow
`ghcr.io/kubetune/runtime-evil`. The operator's own runtime image is always allowed.

The admission policy can check names only: it sees the FineTuneJob, never the Secrets it names, so
"which Secrets" is by name prefix (give the Secrets meant for training jobs a prefix such as
`kubetune-`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterable

from kubetune.runtime.api.spec import FineTuneJob

# The chart's `policy` keys → Policy fields
_KEYS = {
    "imagePrefixes": "image_prefixes",
    "imagePullPolicies": "image_pull_policies",
    "hostNetwork": "host_network",
    "runtimeClassNames": "runtime_class_names",
    "priorityClassNames": "priority_class_names",
    "tolerationKeys": "toleration_keys",
    "nodeSelectorKeyPrefixes": "node_selector_key_prefixes",
    "annotationPrefixes": "annotation_prefixes",
    "labelPrefixes": "label_prefixes",
    "secretNamePrefixes": "secret_name_prefixes",
    "modelCacheClaimPrefixes": "model_cache_claim_prefixes",
}


@dataclasses.dataclass(frozen=True)
class Policy:
    """The chart's defaults: a FineTuneJob on a shared GPU cluster needs nothing more."""

    image_prefixes: tuple[str, ...] = ()
    image_pull_policies: tuple[str, ...] = ("Always", "IfNotPresent")
    host_network: bool = False
    runtime_class_names: tuple[str, ...] = ("nvidia",)
    priority_class_names: tuple[str, ...] = ()
    toleration_keys: tuple[str, ...] = ("nvidia.com/gpu",)
    node_selector_key_prefixes: tuple[str, ...] = (
        "nvidia.com/", "node.kubernetes.io/instance-type", "kubernetes.io/arch", "topology.kubernetes.io/",
    )
    annotation_prefixes: tuple[str, ...] = ("k8s.v1.cni.cncf.io/networks",)
    label_prefixes: tuple[str, ...] = ()
    secret_name_prefixes: tuple[str, ...] = ("",)
    # spec.resources.modelCache.claimName: a PVC of the job's namespace that every stage pod
    # mounts read-write; the operator's own default claim (values modelCache) is always allowed
    model_cache_claim_prefixes: tuple[str, ...] = ()


def parse_policy(text: str, where: str = "--policy") -> Policy | None:
    """The chart's `policy` values as JSON (unknown keys and wrong types are errors); empty: none."""
    if not text.strip():
        return None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON: {err}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{where}: expected a JSON object of the chart's policy values")
    fields: dict[str, Any] = {}
    for key, value in doc.items():
        if key in ("admission", "namespaceSelector"):  # the chart's own switches
            continue
        if key not in _KEYS:
            raise ValueError(f"{where}: unknown key {key!r}; known: {', '.join(sorted(_KEYS))}")
        if key == "hostNetwork":
            if not isinstance(value, bool):
                raise ValueError(f"{where}: hostNetwork must be true or false")
            fields[_KEYS[key]] = value
        else:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{where}: {key} must be a list of strings")
            fields[_KEYS[key]] = tuple(value)
    return Policy(**fields)


def _prefixed(value: str, prefixes: Iterable[str]) -> bool:
    return any(value.startswith(p) for p in prefixes)


def _allowed(prefixes: tuple[str, ...]) -> str:
    shown = ", ".join(repr(p) for p in prefixes)
    return f"allowed: {shown}" if prefixes else "the cluster policy allows none"


def image_repository(image: str) -> str:
    """`registry/repo` of an image reference (no tag, no digest)."""
    name = image.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    return name[:colon] if colon > slash else name


def violations(job: FineTuneJob, policy: Policy | None, runtime_image: str,
               model_cache_claim: str | None = None) -> list[str]:
    """One line per setting of `job` the policy does not allow, each naming its field.
    `model_cache_claim`: the operator's default model cache claim (always allowed)."""
    if policy is None:
        return []
    problems: list[str] = []
    r = job.spec.resources
    po = r.pod_overrides
    own = image_repository(runtime_image)
    images = (f"{own}:", f"{own}@", *policy.image_prefixes)
    if r.image is not None and not _prefixed(r.image, images):
        problems.append(f"spec.resources.image: {r.image!r} is not allowed by the cluster policy ({_allowed(images)})")
    if r.image_pull_policy is not None and r.image_pull_policy not in policy.image_pull_policies:
        problems.append(f"spec.resources.imagePullPolicy: {r.image_pull_policy} is not allowed by the cluster "
                        f"policy ({_allowed(policy.image_pull_policies)})")
    if po.host_network and not policy.host_network:
        problems.append("spec.resources.podOverrides.hostNetwork: the cluster policy does not allow the node's "
                        "network namespace")
    if r.runtime_class_name is not None and r.runtime_class_name not in policy.runtime_class_names:
        problems.append(f"spec.resources.runtimeClassName: {r.runtime_class_name!r} is not allowed by the cluster "
                        f"policy ({_allowed(policy.runtime_class_names)})")
    if r.priority_class_name is not None and r.priority_class_name not in policy.priority_class_names:
        problems.append(f"spec.resources.priorityClassName: {r.priority_class_name!r} is not allowed by the "
                        f"cluster policy ({_allowed(policy.priority_class_names)})")
    for i, t in enumerate(r.tolerations):
        if (t.key or "") not in policy.toleration_keys:
            what = repr(t.key) if t.key else "an empty key (tolerates every taint)"
            problems.append(f"spec.resources.tolerations[{i}].key: {what} is not allowed by the cluster policy "
                            f"({_allowed(policy.toleration_keys)})")
    for key in r.node_selector:
        if not _prefixed(key, policy.node_selector_key_prefixes):
            problems.append(f"spec.resources.nodeSelector: key {key!r} is not allowed by the cluster policy "
                            f"({_allowed(policy.node_selector_key_prefixes)})")
    for field, keys, prefixes in (("annotations", po.annotations, policy.annotation_prefixes),
                                  ("labels", po.labels, policy.label_prefixes)):
        for key in keys:
            if not _prefixed(key, prefixes):
                problems.append(f"spec.resources.podOverrides.{field}: key {key!r} is not allowed by the cluster "
                                f"policy ({_allowed(prefixes)})")
    mc = r.model_cache
    if mc is not None and mc.claim_name != model_cache_claim and \
            not _prefixed(mc.claim_name, policy.model_cache_claim_prefixes):
        problems.append(f"spec.resources.modelCache.claimName: PersistentVolumeClaim {mc.claim_name!r} is not "
                        f"allowed by the cluster policy ({_allowed(policy.model_cache_claim_prefixes)})")
    for field, name in secret_references(job):
        if not _prefixed(name, policy.secret_name_prefixes):
            problems.append(f"{field}: Secret {name!r} is not allowed by the cluster policy "
                            f"({_allowed(policy.secret_name_prefixes)})")
    return problems


def secret_references(job: FineTuneJob) -> list[tuple[str, str]]:
    """(field, Secret name) of every Secret the job's pods would read."""
    refs = []
    if job.spec.model.token_secret_ref is not None:
        refs.append(("spec.model.tokenSecretRef.name", job.spec.model.token_secret_ref.name))
    if job.spec.storage.credentials_secret_ref is not None:
        refs.append(("spec.storage.credentialsSecretRef.name", job.spec.storage.credentials_secret_ref.name))
    tracking = job.spec.tracking
    for field, ref in (("spec.tracking.mlflow.tokenSecretRef.name", tracking.mlflow.token_secret_ref),
                       ("spec.tracking.mlflow.credentialsSecretRef.name", tracking.mlflow.credentials_secret_ref),
                       ("spec.tracking.wandb.apiKeySecretRef.name", tracking.wandb.api_key_secret_ref)):
        if ref is not None:
            refs.append((field, ref.name))
    for i, e in enumerate(job.spec.resources.pod_overrides.env):
        if e.value_from is not None:
            refs.append((f"spec.resources.podOverrides.env[{i}].valueFrom.secretKeyRef.name",
                         e.value_from.secret_key_ref.name))
    return refs

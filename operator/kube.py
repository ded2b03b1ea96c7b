"""The operator's thin I/O layer: read a FineTuneJob and its children, apply a Decision.

Uses the official kubernetes client (synchronous; kopf runs sync handlers in threads). Every
write is idempotent: creating what already exists is treated as done, deleting what is gone too.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from typing import Any

import kubernetes
from kubernetes.client.rest import ApiException

from kubetune.runtime.spec import API_GROUP, API_VERSION, PLURAL

from . import manifests as m
from . import status as s
from .reconcile import Action, Observed

log = logging.getLogger("kubetune.operator")

TIMEOUT = 30  # seconds per API request: a stuck connection must not stall a handler forever
_api_client: kubernetes.client.ApiClient | None = None


def api_client() -> kubernetes.client.ApiClient:
    """In-cluster config when running in a pod, else the kubeconfig (KUBECONFIG or ~/.kube/config)."""
    global _api_client
    if _api_client is None:
        try:
            kubernetes.config.load_incluster_config()
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config()
        _api_client = kubernetes.client.ApiClient()
    return _api_client


def _core() -> kubernetes.client.CoreV1Api:
    return kubernetes.client.CoreV1Api(api_client())


def _batch() -> kubernetes.client.BatchV1Api:
    return kubernetes.client.BatchV1Api(api_client())


def _custom() -> kubernetes.client.CustomObjectsApi:
    return kubernetes.client.CustomObjectsApi(api_client())


def _plain(obj: Any) -> Any:
    """A client model → the API's own JSON shape (camelCase, no None)."""
    return api_client().sanitize_for_serialization(obj)


def _json(api_call, *args, **kw) -> Any:
    """Call a client method and return the raw JSON (skips the client's model deserialisation)."""
    resp = api_call(*args, _preload_content=False, _request_timeout=TIMEOUT, **kw)
    return json.loads(resp.data)


def get_finetunejob(namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return _custom().get_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, name,
                                                      _request_timeout=TIMEOUT)
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def observe(namespace: str, job_name: str) -> Observed:
    """The children labelled kubetune.io/job=<name>, and their pods grouped by Job."""
    sel = f"{m.LABEL_JOB}={job_name}"
    jobs = _json(_batch().list_namespaced_job, namespace, label_selector=sel)["items"]
    cms = _json(_core().list_namespaced_config_map, namespace, label_selector=sel)["items"]
    svcs = _json(_core().list_namespaced_service, namespace, label_selector=sel)["items"]
    # pods are read by their Job: none to read before the first stage Job exists (a new job)
    pods = _json(_core().list_namespaced_pod, namespace, label_selector=sel)["items"] if jobs else []
    by_job: dict[str, list[dict[str, Any]]] = {}
    for p in pods:
        labels = (p.get("metadata") or {}).get("labels") or {}
        owner = labels.get("batch.kubernetes.io/job-name") or labels.get("job-name")
        if owner:
            by_job.setdefault(owner, []).append(p)
    return Observed(
        jobs={j["metadata"]["name"]: j for j in jobs},
        configmaps={c["metadata"]["name"]: c for c in cms},
        services={v["metadata"]["name"]: v for v in svcs},
        pods=by_job,
    )


def poll_progress(pods: list[dict[str, Any]], port: int, timeout: float) -> dict[str, Any] | None:
    """GET http://<rank-0 pod IP>:<port>/progress; None when no pod runs or it does not answer yet."""
    pod = s.rank0_pod(pods)
    ip = ((pod or {}).get("status") or {}).get("podIP")
    if not ip:
        return None
    host = f"[{ip}]" if ":" in ip else ip
    url = f"http://{host}:{port}/progress"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (pod IP, http by design)
            report = json.loads(resp.read(1 << 20))
        return report if isinstance(report, dict) else None
    except (OSError, ValueError, urllib.error.URLError) as e:
        log.debug("progress of pod %s not available: %s", pod["metadata"]["name"], e)
        return None


def apply(namespace: str, action: Action) -> str:
    """Carry out one action; returns what happened ('created', 'exists', 'patched', 'deleted', 'gone')."""
    core, batch = _core(), _batch()
    try:
        if action.verb == "create":
            fn = {"Job": batch.create_namespaced_job, "ConfigMap": core.create_namespaced_config_map,
                  "Service": core.create_namespaced_service}[action.kind]
            fn(namespace, action.body, _request_timeout=TIMEOUT)
            return "created"
        if action.verb == "patch":
            fn = {"Job": batch.patch_namespaced_job, "ConfigMap": core.patch_namespaced_config_map,
                  "Service": core.patch_namespaced_service}[action.kind]
            fn(action.name, namespace, action.body, _content_type="application/merge-patch+json",
               _request_timeout=TIMEOUT)
            return "patched"
        fn = {"Job": batch.delete_namespaced_job, "ConfigMap": core.delete_namespaced_config_map,
              "Service": core.delete_namespaced_service}[action.kind]
        # Background (default): the Job goes now, the garbage collector removes its pods.
        # Foreground (a gang restart): the Job stays until its pods are gone, so no new pod
        # meets an old one at the rendezvous.
        policy = (action.body or {}).get("propagationPolicy", "Background")
        fn(action.name, namespace, body=kubernetes.client.V1DeleteOptions(propagation_policy=policy),
           _request_timeout=TIMEOUT)
        return "deleted"
    except ApiException as e:
        if action.verb == "create" and e.status == 409:
            return "exists"
        if action.verb == "delete" and e.status == 404:
            return "gone"
        raise


def patch_status(namespace: str, name: str, resource_version: str | None, patch: dict[str, Any]) -> dict[str, Any]:
    """Merge-patch the status subresource; the resourceVersion makes it fail (409) on a stale read."""
    body: dict[str, Any] = {"status": patch}
    if resource_version:
        body["metadata"] = {"resourceVersion": resource_version}
    return _custom().patch_namespaced_custom_object_status(
        API_GROUP, API_VERSION, namespace, PLURAL, name, body,
        _content_type="application/merge-patch+json", _request_timeout=TIMEOUT,
    )

"""Shared builders for the operator's unit tests: FineTuneJob bodies and observed child states (the
`config` fixture is in conftest.py). No API server: these are the shapes the API returns, written
out by hand."""

from __future__ import annotations

import copy
import datetime as dt
from typing import Any


NOW = dt.datetime(2025, 6, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
UID = "11111111-2222-3333-4444-555555555555"


def ftj(spec_extra: dict[str, Any] | None = None, *, name: str = "llama", labels: dict | None = None,
        status: dict | None = None, generation: int = 1, stages: list[dict] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"name": "Qwen/Qwen2.5-0.5B-Instruct", "tokenSecretRef": {"name": "hf", "key": "token"}},
        "data": [{"name": "identity", "source": "s3://datasets/identity.json"}],
        "stages": stages or [{"name": "sft", "type": "sft"}],
        "storage": {"uri": "s3://ckpt/llama/", "endpoint": "http://minio.storage:9000",
                    "credentialsSecretRef": {"name": "s3"}},
    }
    spec.update(spec_extra or {})
    body = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": "ml", "uid": UID, "generation": generation,
                     "resourceVersion": "100", "labels": labels or {}},
        "spec": spec,
    }
    if status is not None:
        body["status"] = copy.deepcopy(status)
    return body


def owner() -> list[dict[str, Any]]:
    return [{"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "name": "llama", "uid": UID,
             "controller": True}]


def k8s_job(name: str, *, conditions: list[tuple[str, str]] = (), failed: int = 0, suspend: bool = False,
            owned: bool = True, active: int = 0, completion_time: str | None = None, uid: str = "job-uid-1",
            message: str = "", deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "ml", "uid": uid, "ownerReferences": owner() if owned else []}
    if deleting:
        meta["deletionTimestamp"] = "2025-06-01T12:00:00Z"
    return {
        "metadata": meta,
        "spec": {"suspend": suspend},
        "status": {
            "failed": failed, "active": active,
            "conditions": [{"type": t, "status": "True", "reason": r, **({"message": message} if message else {})}
                           for t, r in conditions],
            **({"completionTime": completion_time} if completion_time else {}),
        },
    }


def pod(job: str, phase: str, *, ip: str = "10.0.0.5", index: str = "0", exit_code: int | None = None,
        message: str = "", finished: str = "2025-06-01T11:59:00Z", disrupted: bool = False) -> dict[str, Any]:
    cs: dict[str, Any] = {"name": "trainer", "state": {}}
    if phase == "Running":
        cs["state"] = {"running": {"startedAt": "2025-06-01T11:00:00Z"}}
    elif exit_code is not None:
        cs["state"] = {"terminated": {"exitCode": exit_code, "reason": "Error" if exit_code else "Completed",
                                      "message": message, "finishedAt": finished}}
    return {
        "metadata": {"name": f"{job}-{index}-abcde", "creationTimestamp": "2025-06-01T10:00:00Z",
                     "annotations": {"batch.kubernetes.io/job-completion-index": index},
                     "labels": {"batch.kubernetes.io/job-name": job}},
        "status": {"phase": phase, "podIP": ip, "containerStatuses": [cs],
                   **({"conditions": [{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}]}
                      if disrupted else {})},
    }

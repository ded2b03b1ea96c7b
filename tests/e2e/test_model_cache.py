"""The cluster model cache on the real control plane: a PersistentVolumeClaim bound (by the real
PV binder controller) to a PersistentVolume on the node's own disk, named in
spec.resources.modelCache. A two-stage job (sft, then an export that merges the adapter into the
base model) runs the REAL runtime in both stage pods; its base model is an s3:// folder on the
test's S3 server. The first stage downloads it into the claim; the second stage — a new pod —
finds it there and downloads nothing (the runtime logs each file it downloads, and a summary
line per model: `N of M files downloaded, the rest cached`)."""

from __future__ import annotations

import json

import pytest

from cluster.util import wait_for
from operatorlib import apply, serving, wait_status
from test_operator_real_runtime import RealRuntimeOperator, _prepare, pod_logs

pytestmark = pytest.mark.e2e

CACHE_MOUNT = "/var/cache/kubetune-models"


@pytest.fixture(scope="module")
def cache_operator(control_plane, kubelet, crd, runtime_image, tmp_path_factory):
    yield from serving(RealRuntimeOperator(control_plane, tmp_path_factory.mktemp("operator-cache"),
                                           runtime_image=runtime_image))


@pytest.fixture
def volumes(kube):
    """PersistentVolumes (cluster-wide) a test made, deleted afterwards."""
    made: list[str] = []
    yield made
    for name in made:
        try:
            kube.delete(f"/api/v1/persistentvolumes/{name}")
        except Exception:  # noqa: BLE001 (cleanup)
            pass


def _local_claim(control_plane, kube, namespace: str, folder, volumes: list, name: str = "models") -> None:
    """A hostPath PersistentVolume on the node's disk and a claim that the binder binds to it."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o777)  # the runtime runs as uid 1000; hostPath volumes get no fsGroup
    pv_name = f"{namespace}-{name}"
    pv = {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv_name},
          "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                   "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "",
                   "hostPath": {"path": str(folder), "type": "Directory"},
                   "claimRef": {"namespace": namespace, "name": name}}}
    pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name},
           "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "", "volumeName": pv_name,
                    "resources": {"requests": {"storage": "1Gi"}}}}
    kube.post("/api/v1/persistentvolumes", pv)
    volumes.append(pv_name)
    apply(control_plane, pvc, namespace)
    wait_for(lambda: (kube.get(f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{name}").get("status")
                      or {}).get("phase") == "Bound", 60, "the claim bound by the PV binder")


def _stage_log(control_plane, kube, namespace: str, job: str, stage: str) -> str:
    pods = kube.get(f"/api/v1/namespaces/{namespace}/pods",
                    labelSelector=f"kubetune.io/job={job},kubetune.io/stage={stage}")["items"]
    assert pods, f"no pod of stage {stage}"
    out = []
    for p in pods:
        r = control_plane.kubectl("logs", "-n", namespace, p["metadata"]["name"])
        assert r.returncode == 0, r.stderr
        out.append(r.stdout)
    return "".join(out)


def test_the_second_stage_finds_the_base_model_in_the_claim_and_downloads_nothing(
        control_plane, kube, kubelet, cache_operator, namespace, s3, tmp_path, volumes):
    folder = tmp_path / "model-cache"
    _local_claim(control_plane, kube, namespace, folder, volumes)
    (folder / "team-a").mkdir()
    (folder / "team-a").chmod(0o777)
    bucket, doc = _prepare(control_plane, namespace, s3, tmp_path, "cached", max_steps=4)
    doc["spec"]["stages"].append({"name": "merge", "type": "export"})
    doc["spec"]["resources"]["modelCache"] = {"claimName": "models", "subPath": "team-a"}
    apply(control_plane, doc, namespace)

    done = wait_status(kube, namespace, "cached", lambda s: s.get("phase") in ("Succeeded", "Failed"), 600,
                       "finished", cache_operator)
    assert done["status"]["phase"] == "Succeeded", \
        json.dumps(done["status"], indent=1) + pod_logs(control_plane, kube, namespace, "cached")

    model = f"s3://{bucket}/models/tiny"
    first = _stage_log(control_plane, kube, namespace, "cached", "sft")
    second = _stage_log(control_plane, kube, namespace, "cached", "merge")
    # stage 1 downloaded the base model into the claim (the mount, not the scratch emptyDir) ...
    assert f"downloaded {model}/config.json" in first, first[-3000:]
    assert f"to {CACHE_MOUNT}/kubetune/s3/{bucket}/models/tiny/config.json" in first
    # ... and stage 2, another pod, downloaded none of it: every file was in the cache
    assert f"downloaded {model}/" not in second, second[-3000:]
    summary = [line for line in second.splitlines() if f"{model}: " in line and "files downloaded" in line]
    assert summary and all(f"{model}: 0 of " in line for line in summary), summary or second[-3000:]
    # the files live on the PersistentVolume's folder, under the claim's subPath
    cached = folder / "team-a" / "kubetune" / "s3" / bucket / "models" / "tiny"
    assert (cached / "config.json").is_file() and any(cached.glob("*.safetensors"))
    assert (folder / "team-a" / "kubetune" / "locks").is_dir()  # the per-URI download locks

"""The pod contract's scratch layout: in a pod every writer goes to the scratch volume."""

from __future__ import annotations

import os

import pytest

from kubetune.runtime.api import contract


def test_use_scratch_points_every_writer_at_the_volume(tmp_path):
    env = {"KUBETUNE_SCRATCH": str(tmp_path / "scratch"), "HOME": "/nonexistent-home", "HF_HOME": str(tmp_path / "hf")}
    assert contract.use_scratch(env) == tmp_path / "scratch"
    for name in ("TMPDIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "MPLCONFIGDIR", "KUBETUNE_CACHE_DIR",
                 "KUBETUNE_WORK_DIR", "HOME"):
        assert env[name].startswith(str(tmp_path / "scratch") + os.sep), name
        assert os.path.isdir(env[name]), name
    assert env["HF_HOME"] == str(tmp_path / "hf"), "a variable the pod sets itself is kept"


def test_a_writable_home_is_kept(tmp_path):
    env = {"KUBETUNE_SCRATCH": str(tmp_path / "s"), "HOME": str(tmp_path)}
    contract.use_scratch(env)
    assert env["HOME"] == str(tmp_path)


def test_outside_a_pod_nothing_changes():
    env = {"HOME": "/root"}
    assert contract.use_scratch(env) is None and env == {"HOME": "/root"}


def test_the_cache_folder_follows_the_scratch_volume(tmp_path, monkeypatch):
    from kubetune.runtime.storage.cache import default_cache_dir

    env = {"KUBETUNE_SCRATCH": str(tmp_path)}
    contract.use_scratch(env)
    monkeypatch.setenv("KUBETUNE_CACHE_DIR", env["KUBETUNE_CACHE_DIR"])
    assert default_cache_dir() == tmp_path / "cache" / "kubetune"


def test_the_model_cache_env_of_a_pod_wins_over_the_scratch_layout(tmp_path, monkeypatch):
    """The operator sets HF_HUB_CACHE and KUBETUNE_CACHE_DIR to the model cache's mount; the runtime
    keeps them (the rest of the layout still goes to scratch) and caches s3:// inputs there."""
    from kubetune.runtime.storage.cache import default_cache_dir

    hub, ours = tmp_path / "claim" / "hub", tmp_path / "claim" / "kubetune"
    env = {"KUBETUNE_SCRATCH": str(tmp_path / "scratch"), contract.ENV_HF_HUB_CACHE: str(hub),
           contract.ENV_KUBETUNE_CACHE_DIR: str(ours)}
    contract.use_scratch(env)
    assert env["HF_HUB_CACHE"] == str(hub) and env["KUBETUNE_CACHE_DIR"] == str(ours)
    assert env["HF_HOME"] == str(tmp_path / "scratch" / "hf")  # HF_HOME stays on scratch
    monkeypatch.setenv("KUBETUNE_CACHE_DIR", env["KUBETUNE_CACHE_DIR"])
    assert default_cache_dir() == ours
    assert contract.MODEL_CACHE_HUB.startswith(contract.MODEL_CACHE_DIR + "/")
    assert contract.MODEL_CACHE_KUBETUNE.startswith(contract.MODEL_CACHE_DIR + "/")


def _pod(name, phase, index=None, created="2025-06-01T12:00:00Z", deleting=False):
    meta = {"name": name, "creationTimestamp": created}
    if index is not None:
        meta["annotations"] = {contract.COMPLETION_INDEX: index}
    if deleting:
        meta["deletionTimestamp"] = "2025-06-01T12:09:00Z"
    return {"metadata": meta, "status": {"phase": phase}}


RANK0_CASES = [  # (pods, rank0_pod(pods), rank0_pod(pods, running=True))
    ([_pod("a", "Running", "1"), _pod("b", "Running", "0")], "b", "b"),
    ([_pod("old", "Running", created="2025-06-01T12:00:00Z"),
      _pod("new", "Running", created="2025-06-01T12:05:00Z")], "new", "new"),
    ([_pod("failed", "Failed", "0", created="2025-06-01T12:05:00Z"), _pod("run", "Running", "0")], "run", "run"),
    ([_pod("pending", "Pending", "0"), _pod("gone", "Running", "0", deleting=True)], "pending", None),
    ([_pod("done", "Succeeded")], "done", None),
    ([_pod("r1", "Running", "1")], None, None),
    ([], None, None),
]


@pytest.mark.parametrize("pods, rank0, running", RANK0_CASES)
def test_one_rank0_rule_for_dict_pods_and_client_objects(pods, rank0, running):
    """The operator (pods as dicts) and the CLI/board (kubernetes client objects) pick the same pod."""
    from kubernetes.client import ApiClient

    api = ApiClient()
    objects = [api._ApiClient__deserialize(p, "V1Pod") for p in pods]
    for given in (pods, objects):
        for only_running, want in ((False, rank0), (True, running)):
            got = contract.rank0_pod(given, running=only_running)
            name = got["metadata"]["name"] if isinstance(got, dict) else got and got.metadata.name
            assert name == want, (type(given[0]).__name__, only_running)


def test_the_progress_report_is_written_and_read_through_one_model():
    """The runtime's /progress document (and the final one of its termination message) is a
    ProgressReport document; the operator reads that very document back through the model."""
    import json

    from kubetune.operator import status
    from kubetune.runtime.api.progress import PROGRESS_KEYS, ProgressReport, ProgressState

    state = ProgressState("llama", "sft")
    state.update(step=420, totalSteps=1200, loss=0.91, learningRate=float("nan"), etaSeconds=1830)
    state.set_checkpoint("s3://b/llama/sft/checkpoint-400", 400)
    state.set_output("s3://b/llama/sft/model")
    doc = state.snapshot()
    assert tuple(doc) == PROGRESS_KEYS and doc["learningRate"] is None  # JSON has no NaN
    assert doc["checkpoint"] == {"uri": "s3://b/llama/sft/checkpoint-400", "step": 400}
    assert doc["output"] == {"uri": "s3://b/llama/sft/model"}
    report = ProgressReport.model_validate(json.loads(json.dumps(doc)))
    assert report.document() == doc
    assert status.progress_from_report(report) == {"step": 420, "totalSteps": 1200, "percent": 35.0, "loss": 0.91,
                                                   "etaSeconds": 1830.0}
    pod = {"metadata": {"name": "p"}, "status": {"phase": "Succeeded", "containerStatuses": [
        {"state": {"terminated": {"exitCode": 0, "message": json.dumps({contract.FINAL_PROGRESS_KEY: doc})}}}]}}
    assert status.final_report([pod]) == report


# Variables the operator sets for a library the runtime runs in the pod (not for kubetune's own
# code): the library reads them, so a grep over runtime/ cannot find a reader.
READ_BY_LIBRARIES = {
    "HF_TOKEN": "huggingface_hub", "HF_HUB_CACHE": "huggingface_hub",
    "AWS_ACCESS_KEY_ID": "boto3", "AWS_SECRET_ACCESS_KEY": "boto3", "AWS_ENDPOINT_URL": "botocore",
    "AWS_DEFAULT_REGION": "botocore", "MLFLOW_TRACKING_TOKEN": "mlflow", "MLFLOW_TRACKING_USERNAME": "mlflow",
    "MLFLOW_TRACKING_PASSWORD": "mlflow", "WANDB_API_KEY": "wandb", "PYTHONUNBUFFERED": "python",
}


def _unread(names: set[str]) -> set[str]:
    """The names no runtime module reads: neither its contract constant (outside its definition)
    nor the name itself as a string literal appears under runtime/."""
    import re
    from pathlib import Path

    root = Path(contract.__file__).parents[1]  # runtime/ (the contract is in runtime/api/)
    text = "\n".join(re.sub(r"(?m)^ENV_\w+ = .*$", "", p.read_text()) for p in root.rglob("*.py"))
    consts = {v: k for k, v in vars(contract).items() if k.startswith("ENV_")}
    return {n for n in names if not (n in consts and re.search(rf"\b{consts[n]}\b", text))
            and not re.search(rf"[\"']{n}[\"']", text)}


def test_every_env_variable_the_operator_sets_is_read_in_the_pod():
    """A variable the operator puts on a training pod that nobody reads is a bug (the scratch
    folder once was): each one is read by a runtime module or by a library the runtime runs."""
    from kubetune.operator import manifests
    from kubetune.operator.config import OperatorConfig
    from kubetune.operator.reconcile import job_document
    from kubetune.runtime.api.plan import plan
    from kubetune.runtime.api.spec import parse_job

    spec = {  # every feature that adds a variable
        "model": {"name": "Qwen/Qwen2.5-0.5B-Instruct", "tokenSecretRef": {"name": "hf", "key": "token"}},
        "data": [{"name": "identity", "source": "s3://datasets/identity.json"}],
        "stages": [{"name": "sft", "type": "sft"}],
        "resources": {"nodes": 2, "gpusPerNode": 1, "modelCache": {"claimName": "models"}},
        "storage": {"uri": "s3://ckpt/llama/", "endpoint": "http://minio:9000", "region": "eu-west-1",
                    "credentialsSecretRef": {"name": "s3"}},
        "tracking": {"reportTo": ["mlflow", "wandb"],
                     "mlflow": {"tokenSecretRef": {"name": "mlf", "key": "t"}, "credentialsSecretRef": {"name": "b"}},
                     "wandb": {"apiKeySecretRef": {"name": "wb", "key": "k"}}},
    }
    job = parse_job(job_document({"metadata": {"name": "llama", "namespace": "ml"}, "spec": spec}))
    built = manifests.build_job(job, plan(job)[0], "uid-1", OperatorConfig(runtime_image="example/runtime:1"))
    pod = built["spec"]["template"]["spec"]
    names = {e["name"] for c in pod["containers"] + pod.get("initContainers", []) for e in c.get("env") or []}
    assert set(READ_BY_LIBRARIES) <= names, "a variable the operator no longer sets: drop it from the list"
    assert {v for k, v in vars(contract).items() if k.startswith("ENV_")} <= names  # and the other way round
    assert _unread(names - set(READ_BY_LIBRARIES)) == set()
    assert _unread({"KUBETUNE_SET_BUT_NEVER_READ"}) == {"KUBETUNE_SET_BUT_NEVER_READ"}  # the check checks

"""The whole product on the real control plane, no stand-ins: the operator (a real process)
turns a FineTuneJob into a Job whose pod runs the REAL runtime (`python -m kubetune.runtime
stage`, through the process kubelet) — it downloads a tiny model and the data from a real S3
server (moto's standalone server), trains with LoRA, uploads checkpoints and commits the
adapter to S3, while the operator reads its /progress into the status."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.util import wait_for
from operatorlib import OperatorProcess, apply, condition, events, jobs, serving, wait_status
from tests.conftest import CORPUS, IDENTITY
from tests.storage.support import boto_client, make_bucket

pytestmark = pytest.mark.e2e


class RealRuntimeOperator(OperatorProcess):
    """The operator with its default stage command: the real `kubetune.runtime` (in the built
    runtime image on the real node)."""

    def start(self) -> None:
        self.starts += 1
        self.log = self.workdir / f"operator-{self.starts}.log"
        argv = [sys.executable, "-m", "kubetune.operator", "--standalone", "--log-format", "plain",
                "--poll-interval", "1", "--runtime-image", self.runtime_image,
                "--runtime-metrics-port", str(self.runtime_port), "--health-port", str(self.health_port),
                "--metrics-port", str(self.metrics_port)]
        self.proc = subprocess.Popen(argv, env=self.cp.env, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_for(self.healthy, 60, "operator liveness endpoint")


@pytest.fixture(scope="module")
def real_operator(control_plane, kubelet, crd, runtime_image, tmp_path_factory):
    yield from serving(RealRuntimeOperator(control_plane, tmp_path_factory.mktemp("operator-real"),
                                           runtime_image=runtime_image))


def s3_client(s3):
    return boto_client(s3.endpoint, s3.key_id, s3.secret)


def _upload_dir(s3, bucket: str, folder: Path, prefix: str) -> None:
    client = s3_client(s3)
    for f in folder.rglob("*"):
        if f.is_file():
            client.upload_file(str(f), bucket, f"{prefix}/{f.relative_to(folder).as_posix()}")


def _prepare(control_plane, namespace, s3, tmp_path, name: str, max_steps: int) -> tuple[str, dict]:
    """A tiny model and the identity data on the S3 server, the credentials Secret, and the job."""
    from kubetune.runtime.tiny import build_tiny_model

    bucket = make_bucket(s3.endpoint, s3.key_id, s3.secret)
    model = build_tiny_model(tmp_path / "model", CORPUS * 8, vocab_size=320, hidden_size=64, intermediate_size=128)
    _upload_dir(s3, bucket, model, "models/tiny")
    data = tmp_path / "identity.json"
    data.write_text(json.dumps([{"instruction": q, "output": a} for q, a in IDENTITY]))
    s3_client(s3).upload_file(str(data), bucket, "datasets/identity.json")
    r = control_plane.kubectl("create", "secret", "generic", "s3", "-n", namespace,
                              f"--from-literal=AWS_ACCESS_KEY_ID={s3.key_id}",
                              f"--from-literal=AWS_SECRET_ACCESS_KEY={s3.secret}")
    assert r.returncode == 0, r.stderr
    doc = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"name": f"s3://{bucket}/models/tiny"},
            "data": [{"name": "identity", "source": f"s3://{bucket}/datasets/identity.json"}],
            "stages": [{"name": "sft", "type": "sft", "lora": {"rank": 8},
                        "hyperparameters": {"maxSteps": max_steps, "batchSize": 4, "gradientAccumulation": 1,
                                            "learningRate": 5e-3, "loggingSteps": 1, "cutoffLen": 64,
                                            "gradientCheckpointing": False}}],
            "resources": {"gpusPerNode": 0},
            "storage": {"uri": f"s3://{bucket}/runs/{name}", "endpoint": s3.endpoint,
                        "credentialsSecretRef": {"name": "s3"}},
            "checkpoint": {"everySteps": 4, "keep": 2},
        },
    }
    return bucket, doc


def test_quickstart_trains_for_real_from_s3_to_s3(control_plane, kube, kubelet, node_kind, real_operator, namespace,
                                                   s3, tmp_path):
    bucket, doc = _prepare(control_plane, namespace, s3, tmp_path, "real", max_steps=16)
    apply(control_plane, doc, namespace)

    # (the Running phase can last less than a poll on a fast machine: what it showed is checked
    # through its event and the progress it left, not by catching it)
    done = wait_status(kube, namespace, "real", lambda s: s.get("phase") in ("Succeeded", "Failed"), 420,
                       "finished", real_operator)
    st = done["status"]
    assert st["phase"] == "Succeeded", json.dumps(st, indent=1)
    assert condition(done, "Succeeded")["status"] == "True"
    assert st["output"]["uri"] == f"s3://{bucket}/runs/real/sft/output"
    # progress read from the real runtime's /progress
    assert st["progress"]["step"] == st["progress"]["totalSteps"] == 16 and st["progress"]["loss"] is not None
    assert {"StageRunning", "StageSucceeded"} <= set(events(kube, namespace, "real"))

    client = s3_client(s3)
    marker = json.loads(client.get_object(Bucket=bucket, Key="runs/real/sft/output/COMMITTED.json")["Body"].read())
    files = {f["path"] for f in marker["files"]}
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_log.jsonl", "training_loss.png", "run.json"} <= files
    summary = json.loads(client.get_object(Bucket=bucket, Key="runs/real/sft/output/run.json")["Body"].read())
    assert summary["steps"] == 16 and summary["final_loss"] < summary["first_loss"]
    latest = client.get_object(Bucket=bucket, Key="runs/real/sft/checkpoints/LATEST")["Body"].read().decode().strip()
    assert latest == "checkpoint-16"

    # the secret reached the pod as env from the Secret, never through the ConfigMap or the status
    (job,) = jobs(kube, namespace, "real")
    cm = kube.get(f"/api/v1/namespaces/{namespace}/configmaps/{job['metadata']['name']}")
    assert s3.secret not in json.dumps(cm) and s3.secret not in json.dumps(done)
    r = control_plane.kubectl("get", "ftj", "-n", namespace, "real")
    assert r.returncode == 0 and "Succeeded" in r.stdout

    if node_kind == "real":  # a container of the built image, run as the pod spec says
        (pod,) = kube.get(f"/api/v1/namespaces/{namespace}/pods", labelSelector="kubetune.io/job=real")["items"]
        name = pod["metadata"]["name"]
        assert pod["status"]["containerStatuses"][0]["image"] == real_operator.runtime_image
        assert pod["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
        # nothing written outside the volumes: the root filesystem's writable layer is empty
        assert kubelet.writes_outside_volumes(namespace, name, "trainer") == []
        # (and since the root filesystem is read-only, any write outside a volume would have
        # failed the stage); the s3:// model was cached on the scratch volume
        log = control_plane.kubectl("logs", "-n", namespace, name).stdout
        assert f"downloaded s3://{bucket}/models/tiny/config.json" in log
        assert f"to /var/tmp/kubetune/cache/kubetune/s3/{bucket}/models/tiny/config.json" in log


def pod_logs(control_plane, kube, namespace: str, job: str, tail: int = 60) -> str:
    """The last lines of every pod of a job, for a failure's message."""
    out = []
    for p in kube.get(f"/api/v1/namespaces/{namespace}/pods", labelSelector=f"kubetune.io/job={job}")["items"]:
        r = control_plane.kubectl("logs", "-n", namespace, p["metadata"]["name"], f"--tail={tail}")
        out.append(f"\n--- {p['metadata']['name']} ({p['status'].get('phase')}) ---\n{r.stdout}{r.stderr}")
    return "".join(out)


def test_two_nodes_train_for_real_through_one_rendezvous(control_plane, kube, real_operator, namespace, s3, tmp_path):
    """`nodes: 2` with the real runtime: two pods of an Indexed Job, each a torchrun agent; pod 1
    reaches pod 0 at MASTER_ADDR (`<job>-0.<service>`: CoreDNS answers it from the headless
    Service on the real node, the process kubelet's /etc/hosts stands in elsewhere), gloo trains
    one model over both, rank 0 commits."""
    bucket, doc = _prepare(control_plane, namespace, s3, tmp_path, "duo", max_steps=8)
    doc["spec"]["resources"] = {"nodes": 2, "gpusPerNode": 0}
    apply(control_plane, doc, namespace)
    done = wait_status(kube, namespace, "duo", lambda s: s.get("phase") in ("Succeeded", "Failed"), 480,
                       "finished", real_operator)
    st = done["status"]
    assert st["phase"] == "Succeeded", json.dumps(st, indent=1) + pod_logs(control_plane, kube, namespace, "duo")
    assert st["restartCount"] == 0 and st["output"]["uri"] == f"s3://{bucket}/runs/duo/sft/output"
    client = s3_client(s3)
    summary = json.loads(client.get_object(Bucket=bucket, Key="runs/duo/sft/output/run.json")["Body"].read())
    assert summary["steps"] == 8
    # one training of world size 2: each pod's log is its own rank's
    pods = kube.get(f"/api/v1/namespaces/{namespace}/pods", labelSelector="kubetune.io/job=duo")["items"]
    by_index = {p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]: p for p in pods}
    assert sorted(by_index) == ["0", "1"] and all(p["status"]["phase"] == "Succeeded" for p in pods)
    for index, pod in by_index.items():
        r = control_plane.kubectl("logs", "-n", namespace, pod["metadata"]["name"])
        assert r.returncode == 0, r.stderr
        assert f"[rank {index}/2]" in r.stdout, r.stdout[-3000:]


def test_a_killed_training_container_resumes_from_the_last_checkpoint(control_plane, kube, kubelet, real_operator,
                                                                     namespace, s3, tmp_path):
    """The training container is SIGKILLed mid-stage (through containerd on the real node, as a
    node failure would): the Job's next pod resumes from the last committed checkpoint."""
    # long enough that the kill lands mid-training on a busy machine too (the first checkpoint
    # comes at step 4; the status shows it within a poll interval, see the poller's tests)
    bucket, doc = _prepare(control_plane, namespace, s3, tmp_path, "crash", max_steps=120)
    apply(control_plane, doc, namespace)
    wait_status(kube, namespace, "crash", lambda s: ((s.get("checkpoint") or {}).get("step") or 0) >= 4, 300,
                "a first committed checkpoint", real_operator)
    (pod,) = [p for p in kube.get(f"/api/v1/namespaces/{namespace}/pods", labelSelector="kubetune.io/job=crash")["items"]
              if p["status"].get("phase") == "Running"]
    kubelet.kill_container(namespace, pod["metadata"]["name"], "trainer")
    assert not s3_client(s3).list_objects_v2(Bucket=bucket, Prefix="runs/crash/sft/output/").get("KeyCount"), \
        "the kill came after the stage had finished"

    done = wait_status(kube, namespace, "crash", lambda s: s.get("phase") in ("Succeeded", "Failed"), 600,
                       "finished after the kill", real_operator)
    st = done["status"]
    assert st["phase"] == "Succeeded", json.dumps(st, indent=1)
    assert st["restartCount"] >= 1 and "PodRetried" in events(kube, namespace, "crash")
    summary = json.loads(s3_client(s3).get_object(Bucket=bucket, Key="runs/crash/sft/output/run.json")["Body"].read())
    assert summary["steps"] == 120 and summary["resumed_from_step"] >= 4
    killed = kube.get(f"/api/v1/namespaces/{namespace}/pods/{pod['metadata']['name']}")["status"]
    assert killed["phase"] == "Failed"
    assert killed["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 137


def test_a_suspended_stage_commits_a_checkpoint_at_the_signal_and_resumes_from_it(control_plane, kube, kubelet,
                                                                                  real_operator, namespace, s3,
                                                                                  tmp_path):
    """spec.suspend: the Job is suspended, the kubelet sends the trainer SIGTERM, and it saves and
    commits a checkpoint at the step it reached (no periodic checkpoint would come for 1000
    steps) within the grace period; resumed, the stage continues from exactly that step."""
    bucket, doc = _prepare(control_plane, namespace, s3, tmp_path, "pause", max_steps=400)
    doc["spec"]["checkpoint"] = {"everySteps": 1000, "keep": 2}
    apply(control_plane, doc, namespace)
    wait_status(kube, namespace, "pause", lambda s: ((s.get("progress") or {}).get("step") or 0) >= 3, 300,
                "training under way", real_operator)
    r = control_plane.kubectl("patch", "ftj", "-n", namespace, "pause", "--type=merge", "-p", '{"spec":{"suspend":true}}')
    assert r.returncode == 0, r.stderr
    latest = "runs/pause/sft/checkpoints/LATEST"
    saved = wait_for(lambda: s3_client(s3).list_objects_v2(Bucket=bucket, Prefix=latest).get("KeyCount") and
                     s3_client(s3).get_object(Bucket=bucket, Key=latest)["Body"].read().decode().strip(), 120,
                     "the checkpoint committed on SIGTERM")
    step = int(saved.removeprefix("checkpoint-"))
    assert 3 <= step < 400
    wait_status(kube, namespace, "pause", lambda s: s.get("phase") == "Suspended", 120, "suspended", real_operator)
    assert not s3_client(s3).list_objects_v2(Bucket=bucket, Prefix="runs/pause/sft/output/").get("KeyCount")

    r = control_plane.kubectl("patch", "ftj", "-n", namespace, "pause", "--type=merge", "-p", '{"spec":{"suspend":false}}')
    assert r.returncode == 0, r.stderr
    done = wait_status(kube, namespace, "pause", lambda s: s.get("phase") in ("Succeeded", "Failed"), 600,
                       "finished after the resume", real_operator)
    assert done["status"]["phase"] == "Succeeded", json.dumps(done["status"], indent=1)
    summary = json.loads(s3_client(s3).get_object(Bucket=bucket, Key="runs/pause/sft/output/run.json")["Body"].read())
    assert summary["steps"] == 400 and summary["resumed_from_step"] == step  # nothing lost but the step in flight


@pytest.mark.parametrize("credentials", ["wrong-key", "no-secret"])
def test_storage_credentials_reach_the_pod_only_through_the_secret(control_plane, kube, real_operator, namespace, s3,
                                                                   tmp_path, credentials):
    """The S3 server checks every request's signature: a Secret with a wrong key, or no Secret
    reference at all, fails the stage at once as bad input, naming the storage, never a key."""
    bucket, doc = _prepare(control_plane, namespace, s3, tmp_path, "creds", max_steps=4)
    if credentials == "wrong-key":
        r = control_plane.kubectl("create", "secret", "generic", "s3-wrong", "-n", namespace,
                                  f"--from-literal=AWS_ACCESS_KEY_ID={s3.key_id}",
                                  "--from-literal=AWS_SECRET_ACCESS_KEY=not-the-secret")
        assert r.returncode == 0, r.stderr
        doc["spec"]["storage"]["credentialsSecretRef"] = {"name": "s3-wrong"}
    else:
        del doc["spec"]["storage"]["credentialsSecretRef"]
    apply(control_plane, doc, namespace)
    done = wait_status(kube, namespace, "creds", lambda s: s.get("phase") in ("Succeeded", "Failed"), 240,
                       "finished", real_operator)
    failed = condition(done, "Failed")
    assert done["status"]["phase"] == "Failed" and failed["reason"] == "BadInput", json.dumps(done["status"], indent=1)
    assert f"s3://{bucket}/runs/creds" in failed["message"] or s3.endpoint in failed["message"], failed["message"]
    assert s3.secret not in json.dumps(done) and "not-the-secret" not in json.dumps(done)
    assert not s3_client(s3).list_objects_v2(Bucket=bucket, Prefix="runs/creds/").get("KeyCount")


def test_a_lost_node_restarts_both_pods_from_the_checkpoint(control_plane, kube, kubelet, real_operator, namespace,
                                                            s3, tmp_path):
    """Crash-safe across nodes: pod 1's container is SIGKILLed after a checkpoint (through
    containerd on the real node); the Job fails and stops pod 0, the operator restarts both pods,
    and they resume from the committed step."""
    # long enough that the kill lands mid-training on a quiet machine too (24 steps once finished
    # between two of the operator's progress polls, before the test could see a checkpoint)
    steps = 120
    bucket, doc = _prepare(control_plane, namespace, s3, tmp_path, "lost", max_steps=steps)
    doc["spec"]["resources"] = {"nodes": 2, "gpusPerNode": 0}
    apply(control_plane, doc, namespace)
    wait_status(kube, namespace, "lost", lambda s: ((s.get("checkpoint") or {}).get("step") or 0) >= 4, 300,
                "a first committed checkpoint", real_operator)
    pods = kube.get(f"/api/v1/namespaces/{namespace}/pods", labelSelector="kubetune.io/job=lost")["items"]
    (pod1,) = [p for p in pods if p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "1"]
    kubelet.kill_container(namespace, pod1["metadata"]["name"], "trainer")

    done = wait_status(kube, namespace, "lost", lambda s: s.get("phase") in ("Succeeded", "Failed"), 600,
                       "finished after the restart", real_operator)
    st = done["status"]
    assert st["phase"] == "Succeeded", json.dumps(st, indent=1)
    assert st["restartCount"] == 1 and events(kube, namespace, "lost").count("GangRestarted") == 1
    summary = json.loads(s3_client(s3).get_object(Bucket=bucket, Key="runs/lost/sft/output/run.json")["Body"].read())
    assert summary["steps"] == steps and 4 <= summary["resumed_from_step"] < steps
    pods = kube.get(f"/api/v1/namespaces/{namespace}/pods", labelSelector="kubetune.io/job=lost")["items"]
    assert pod1["metadata"]["name"] not in {p["metadata"]["name"] for p in pods}  # both pods are new ones

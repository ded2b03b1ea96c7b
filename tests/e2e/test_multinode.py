"""A `nodes: 2` FineTuneJob on the real control plane: the operator (a real process, as in
test_operator.py) makes an Indexed Job (completions = parallelism = 2, podReplacementPolicy
Failed) and a headless Service (clusterIP None, publishNotReadyAddresses, selecting the stage's
pods, the rendezvous port); the Job controller makes pods 0 and 1 with hostname `<job>-<index>`
and subdomain = the Service, so `<job>-0.<service>` — MASTER_ADDR — names pod 0.

What runs in the pods is a PROBE RUNTIME, not training (passed inline to the operator, run in
the built runtime image on the real node): it records the pod's env (fieldRefs included:
KUBETUNE_NODE_RANK from the completion-index annotation, POD_IP), the hostname it got, the
address MASTER_ADDR resolves to, and what `kubetune.runtime.launcher` makes of it (topology +
torchrun arguments), into the stage's S3 prefix. It checks the wiring between the operator's
manifests and the runtime's launcher, end to end through the real Job controller.

On the real node, CoreDNS answers `<job>-0.<service>` from the headless Service's EndpointSlice,
as on any cluster; the process kubelet stands in with a per-pod /etc/hosts naming the pods of
the same subdomain. Either way the probe retries the name until pod 0 exists, as torchrun does.
The real rendezvous and training across two pods is
tests/e2e/test_operator_real_runtime.py::test_two_nodes_train_for_real_through_one_rendezvous;
here the probe also lets pod 1 crash once to show the gang restart.
"""

from __future__ import annotations


import pytest

from cluster.util import wait_for

from operatorlib import OperatorProcess, apply, events, jobs, pods, quickstart, serving, wait_status

pytestmark = pytest.mark.e2e

PROBE_RUNTIME = r"""
# PROBE RUNTIME (multi-node e2e only): records the pod's env and the launcher's reading of it
# in the stage's S3 prefix (credentials and endpoint from the pod's env, as the runtime's).
import json, os, signal, socket, sys, time
from pathlib import Path
import boto3
from botocore.config import Config
from kubetune.runtime import launcher
from kubetune.runtime.api.plan import ResolvedStage

signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(128 + signum))  # PID 1, as the runtime
config = sys.argv[sys.argv.index("--config") + 1]
cfg = ResolvedStage.model_validate_json(Path(config).read_text())
s3 = boto3.client("s3", region_name="us-east-1", config=Config(s3={"addressing_style": "path"}))
bucket, _, prefix = cfg.io.stage_root.removeprefix("s3://").partition("/")
prefix = prefix.rstrip("/")


def put(key, obj):
    s3.put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=json.dumps(obj).encode())


def exists(key):
    return s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/{key}").get("KeyCount", 0) > 0


# the GPUs Kubernetes would have given this pod (the host has none to show)
topo = launcher.topology(cfg.resources, cluster=True, gpus=cfg.resources.gpus_per_node, rdzv_id=f"{cfg.job}-{cfg.name}")
keys = ["KUBETUNE_NODES", "KUBETUNE_NODE_RANK", "JOB_COMPLETION_INDEX", "MASTER_ADDR", "MASTER_PORT", "POD_IP",
        "KUBETUNE_METRICS_PORT", "KUBETUNE_SCRATCH"]
# as torchrun does: retry the name of pod 0 until it resolves (its DNS record, or its /etc/hosts
# line on the process kubelet, appears only once pod 0 exists and has an address)
deadline = time.monotonic() + 120
while True:
    try:
        master_ip = socket.gethostbyname(os.environ["MASTER_ADDR"])
        break
    except OSError:
        if time.monotonic() > deadline:
            master_ip = None
            break
        time.sleep(0.2)
record = {"env": {k: os.environ.get(k) for k in keys}, "hostname": socket.gethostname(), "master_ip": master_ip,
          "topology": {"nnodes": topo.nnodes, "nproc_per_node": topo.nproc_per_node, "node_rank": topo.node_rank,
                       "world_size": topo.world_size, "backend": topo.backend},
          "torchrun": launcher.torchrun_args(topo, ["-m", "kubetune.runtime", "stage", f"--config={config}"])}
put(f"probe-{topo.node_rank}.json", record)
print("probe runtime:", json.dumps(record), flush=True)

if "gang-fail-once" in cfg.model.name:
    # the first time round, rank 1 crashes and rank 0 hangs as in a collective whose peer died
    # (until it is stopped); the second time both finish. A pod is known by its address.
    pod = os.environ["POD_IP"]

    def note(event):
        put(f"attempts/{time.time_ns()}-{topo.node_rank}.json", {"rank": topo.node_rank, "pod": pod, "event": event})
    note("start")
    if not exists(f"rank{topo.node_rank}-started"):
        put(f"rank{topo.node_rank}-started", {"pod": pod})
        if topo.node_rank == 1:
            note("crash")
            sys.exit(1)
        time.sleep(300)
    note("done")
"""


@pytest.fixture(scope="module")
def probe_operator(control_plane, kubelet, crd, runtime_image, tmp_path_factory):
    yield from serving(OperatorProcess(control_plane, tmp_path_factory.mktemp("operator-multinode"),
                                       runtime_image=runtime_image, script=PROBE_RUNTIME))


def test_two_nodes_make_an_indexed_job_and_a_headless_service(control_plane, kube, probe_operator, namespace,
                                                               store, node_kind):
    doc = quickstart(store, name="mn", max_steps=4)
    doc["spec"]["resources"] = {"nodes": 2, "gpusPerNode": 2, "strategy": "fsdp"}
    apply(control_plane, doc, namespace)

    (job,) = wait_for(lambda: jobs(kube, namespace, "mn"), 60, "the stage's Job")
    name = job["metadata"]["name"]
    assert name == "mn-sft"
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
    assert spec["podReplacementPolicy"] == "Failed"
    pod_spec = spec["template"]["spec"]
    assert pod_spec["subdomain"] == "mn-sft" and pod_spec["restartPolicy"] == "Never"
    (container,) = pod_spec["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["MASTER_ADDR"]["value"] == "mn-sft-0.mn-sft" and env["MASTER_PORT"]["value"] == "29500"
    assert env["KUBETUNE_NODES"]["value"] == "2"
    assert env["KUBETUNE_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert {"name": "rendezvous", "containerPort": 29500} in [
        {k: p[k] for k in ("name", "containerPort")} for p in container["ports"]]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"

    svc = kube.get(f"/api/v1/namespaces/{namespace}/services/mn-sft")
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {"kubetune.io/job": "mn", "kubetune.io/stage": "sft"}
    assert [p["port"] for p in svc["spec"]["ports"]] == [29500]
    assert svc["metadata"]["ownerReferences"][0]["name"] == "mn"

    # the Job controller's pods: one per index, hostname <job>-<index>, in the Service's subdomain
    made = wait_for(lambda: (ps := pods(kube, namespace, "mn")) and len(ps) == 2 and ps, 60, "two pods")
    by_index = {int(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]): p for p in made}
    assert sorted(by_index) == [0, 1]
    for i, p in by_index.items():
        assert p["spec"]["hostname"] == f"mn-sft-{i}" and p["spec"]["subdomain"] == "mn-sft"
        assert svc["spec"]["selector"].items() <= p["metadata"]["labels"].items()

    # what each pod's runtime saw, and made of it
    probes = {}
    for i in (0, 1):
        wait_for(lambda: store.exists("saves", "mn", "sft", f"probe-{i}.json"), 150, f"probe of pod {i}")
        probes[i] = store.json("saves", "mn", "sft", f"probe-{i}.json")
    running = {int(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]): p
               for p in pods(kube, namespace, "mn")}
    for i, rec in probes.items():
        e = rec["env"]
        assert (e["KUBETUNE_NODE_RANK"], e["JOB_COMPLETION_INDEX"], e["KUBETUNE_NODES"]) == (str(i), str(i), "2")
        assert (e["MASTER_ADDR"], e["MASTER_PORT"]) == ("mn-sft-0.mn-sft", "29500")
        assert e["POD_IP"] == running[i]["status"]["podIP"]
        assert e["KUBETUNE_SCRATCH"] == "/var/tmp/kubetune"
        assert rec["hostname"] == f"mn-sft-{i}"
        assert rec["topology"] == {"nnodes": 2, "nproc_per_node": 2, "node_rank": i, "world_size": 4,
                                   "backend": "nccl"}
        assert rec["torchrun"][:7] == ["--nnodes=2", "--nproc-per-node=2", "--max-restarts=0",
                                       "--monitor-interval=0.5", f"--node-rank={i}", "--master-addr=mn-sft-0.mn-sft",
                                       "--master-port=29500"]
    assert probes[0]["env"]["POD_IP"] != probes[1]["env"]["POD_IP"]
    # MASTER_ADDR names pod 0 for both pods: CoreDNS answers the headless Service's pod name on
    # the real node (the process kubelet's /etc/hosts stands in for DNS)
    assert probes[0]["master_ip"] == probes[1]["master_ip"] == probes[0]["env"]["POD_IP"]
    if node_kind == "real":
        assert probes[0]["env"]["POD_IP"].startswith("10.123.")


def test_a_failed_pod_restarts_every_pod_of_the_stage_together(control_plane, kube, probe_operator, namespace,
                                                                store):
    """All or nothing: pod 1 crashes while pod 0 waits for it; the Job (backoffLimit 0) fails and
    stops pod 0; the operator deletes the Job and makes it again, and both pods start anew."""
    doc = quickstart(store, name="gang", max_steps=4)
    doc["spec"]["model"]["name"] = "fake/gang-fail-once"
    doc["spec"]["resources"] = {"nodes": 2, "gpusPerNode": 1}
    apply(control_plane, doc, namespace)
    (first_job,) = wait_for(lambda: jobs(kube, namespace, "gang"), 60, "the stage's Job")
    assert first_job["spec"]["backoffLimit"] == 0

    done = wait_status(kube, namespace, "gang", lambda s: s.get("phase") in ("Succeeded", "Failed"), 180, "finished",
                       probe_operator)
    st = done["status"]
    assert st["phase"] == "Succeeded", st
    assert st["restartCount"] == 1 and st["stages"][0]["restarts"] == 1 and "restartedJob" not in st["stages"][0]
    seen = events(kube, namespace, "gang")
    assert seen.count("GangRestarted") == 1 and "PodRetried" not in seen and "JobRecreated" not in seen

    attempts = store.lines("saves", "gang", "sft", "attempts/")
    by_pod: dict[str, list[str]] = {}
    for a in attempts:
        by_pod.setdefault((a["rank"], a["pod"]), []).append(a["event"])
    first = {rank: pod for (rank, pod), ev in by_pod.items() if ev[0] == "start" and ev[-1] != "done"}
    second = {rank: pod for (rank, pod), ev in by_pod.items() if ev == ["start", "done"]}
    # first round: rank 1 crashed, rank 0 was stopped (never finished); second round: two new pods finished
    assert by_pod[(1, first[1])] == ["start", "crash"] and by_pod[(0, first[0])] == ["start"]
    assert sorted(second) == [0, 1] and not set(second.values()) & set(first.values())
    (job,) = jobs(kube, namespace, "gang")
    assert job["metadata"]["uid"] != first_job["metadata"]["uid"]
    assert {p["status"]["podIP"] for p in pods(kube, namespace, "gang")} == set(second.values())

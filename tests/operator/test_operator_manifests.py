"""spec → child manifests, with no API server."""

from __future__ import annotations

import re

import json

import pytest
from operator_builders import UID, ftj

from kubetune.operator import manifests as m
from kubetune.operator.config import OperatorConfig
from kubetune.operator.reconcile import job_document
from kubetune.runtime.api.plan import plan
from kubetune.runtime.api.spec import parse_job


def build(body, config, index=0, suspend=False):
    job = parse_job(job_document(body))
    stage = plan(job)[index]
    # the children in the order reconcile creates them: ConfigMap, NetworkPolicy, Service, Job
    children = [m.build_configmap(job, stage, UID), m.build_network_policy(job, stage, UID, config),
                m.build_service(job, stage, UID), m.build_job(job, stage, UID, config, suspend=suspend)]
    return job, stage, [c for c in children if c is not None]


def test_children_of_a_one_node_stage(config):
    job, stage, children = build(ftj(), config)
    assert [c["kind"] for c in children] == ["ConfigMap", "Job"]
    cm, j = children
    assert cm["metadata"]["name"] == j["metadata"]["name"] == "llama-sft"
    for obj in children:
        assert obj["metadata"]["namespace"] == "ml"
        assert obj["metadata"]["labels"][m.LABEL_JOB] == "llama"
        assert obj["metadata"]["labels"][m.LABEL_STAGE] == "sft"
        (ref,) = obj["metadata"]["ownerReferences"]
        assert ref == {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "name": "llama", "uid": UID,
                       "controller": True, "blockOwnerDeletion": True}
    # the ConfigMap is the resolved stage, exactly what the runtime validates
    cfg = json.loads(cm["data"]["stage.json"])
    assert cfg == stage.to_yaml_dict()
    assert cfg["io"]["output"] == "s3://ckpt/llama/sft/output"
    spec = j["spec"]
    assert spec["backoffLimit"] == 3 and spec["completions"] == spec["parallelism"] == 1
    assert spec["completionMode"] == "Indexed" and spec["suspend"] is False
    assert "activeDeadlineSeconds" not in spec and "ttlSecondsAfterFinished" not in spec
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["volumes"][0] == {"name": "config", "configMap": {"name": "llama-sft"}}
    assert spec["template"]["metadata"]["labels"][m.LABEL_STAGE] == "sft"
    (c,) = pod["containers"]
    assert c["image"] == "registry.example/kubetune/runtime:1" and c["imagePullPolicy"] == "IfNotPresent"
    assert c["command"] == ["python", "-m", "kubetune.runtime", "stage", "--config", "/etc/kubetune/stage.json"]
    assert c["resources"] == {"limits": {"nvidia.com/gpu": "1"}}
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert c["terminationMessagePath"] == "/dev/termination-log"
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] and sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    for key in ("runtimeClassName", "nodeSelector", "tolerations", "priorityClassName", "subdomain"):
        assert key not in pod


def test_pod_environment_carries_secret_references_only(config):
    _, _, (cm, j) = build(ftj(), config)
    env = {e["name"]: e for e in j["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert env["KUBETUNE_METRICS_PORT"]["value"] == "9400"
    assert env["KUBETUNE_SCRATCH"]["value"] == "/var/tmp/kubetune"
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio.storage:9000"
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"] == {"secretKeyRef": {"name": "s3", "key": "AWS_ACCESS_KEY_ID"}}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "s3", "key": "AWS_SECRET_ACCESS_KEY"}}
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
    assert all("value" not in e for e in env.values() if e["name"] in ("HF_TOKEN", "AWS_SECRET_ACCESS_KEY"))
    assert "MASTER_ADDR" not in env
    # the ConfigMap names the secret's reference at most, never a secret value
    text = cm["data"]["stage.json"]
    assert "AWS_SECRET_ACCESS_KEY" not in text


def test_tracker_credentials_come_from_secrets_only_for_trackers_in_use(config):
    tracking = {"mlflow": {"trackingUri": "http://mlflow.mlops:5000", "tokenSecretRef": {"name": "mlf", "key": "tok"},
                           "credentialsSecretRef": {"name": "mlf-basic"}},
                "wandb": {"apiKeySecretRef": {"name": "wb", "key": "api-key"}}}

    def env_of(report_to):
        _, _, (cm, j) = build(ftj({"tracking": {**tracking, "reportTo": report_to}}), config)
        return cm, {e["name"]: e for e in j["spec"]["template"]["spec"]["containers"][0]["env"]}

    cm, env = env_of(["mlflow", "wandb", "tensorboard"])
    assert env["MLFLOW_TRACKING_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "mlf", "key": "tok"}}
    assert env["MLFLOW_TRACKING_USERNAME"]["valueFrom"] == {
        "secretKeyRef": {"name": "mlf-basic", "key": "MLFLOW_TRACKING_USERNAME"}}
    assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"] == {
        "secretKeyRef": {"name": "mlf-basic", "key": "MLFLOW_TRACKING_PASSWORD"}}
    assert env["WANDB_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "wb", "key": "api-key"}}
    assert all("value" not in e for n, e in env.items() if n.startswith(("MLFLOW_", "WANDB_")))
    # the ConfigMap carries where the server is and the Secrets' names, for the runtime's environment
    stage = json.loads(cm["data"]["stage.json"])
    assert stage["tracking"]["mlflow"]["trackingUri"] == "http://mlflow.mlops:5000"
    _, env = env_of(["tensorboard"])  # no credentials for trackers that are not used
    assert not [n for n in env if n.startswith(("MLFLOW_", "WANDB_"))]


def test_placement_policy_and_passthrough(config):
    body = ftj({
        "resources": {"gpusPerNode": 4, "cpu": "16", "memory": "128Gi", "runtimeClassName": "nvidia",
                      "nodeSelector": {"nvidia.com/gpu.product": "GB10"},
                      "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                      "priorityClassName": "training", "image": "my/runtime:2", "imagePullPolicy": "Always"},
        "runPolicy": {"backoffLimit": 5, "activeDeadlineSeconds": 7200, "ttlSecondsAfterFinished": 60},
    }, labels={"kueue.x-k8s.io/queue-name": "gpu-queue", "team": "nlp"})
    _, _, (_, j) = build(body, config, suspend=True)
    spec, pod = j["spec"], j["spec"]["template"]["spec"]
    assert spec["backoffLimit"] == 5 and spec["activeDeadlineSeconds"] == 7200 and spec["suspend"] is True
    # the TTL is the operator's (children go after the whole FineTuneJob ends), not each Job's
    assert "ttlSecondsAfterFinished" not in spec
    assert j["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert "team" not in j["metadata"]["labels"]
    c = pod["containers"][0]
    assert c["image"] == "my/runtime:2" and c["imagePullPolicy"] == "Always"
    assert c["resources"] == {"limits": {"nvidia.com/gpu": "4", "cpu": "16", "memory": "128Gi"},
                              "requests": {"cpu": "16", "memory": "128Gi"}}
    assert pod["runtimeClassName"] == "nvidia" and pod["priorityClassName"] == "training"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "GB10"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def test_pod_failure_policy_fails_fast_on_bad_input_and_ignores_disruptions(config):
    _, _, (_, j) = build(ftj(), config)
    rules = j["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [42, 43]}}
    assert rules[1] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}


def test_cpu_only_stage_has_no_gpu_limit(config):
    _, _, (_, j) = build(ftj({"resources": {"gpusPerNode": 0}}), config)
    assert "resources" not in j["spec"]["template"]["spec"]["containers"][0]


def test_multi_node_stage_gets_a_headless_service(config):
    _, _, children = build(ftj({"resources": {"nodes": 2, "gpusPerNode": 8}}), config)
    assert [c["kind"] for c in children] == ["ConfigMap", "Service", "Job"]
    svc, j = children[1], children[2]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {m.LABEL_JOB: "llama", m.LABEL_STAGE: "sft"}
    assert j["spec"]["completions"] == j["spec"]["parallelism"] == 2
    pod = j["spec"]["template"]["spec"]
    assert pod["subdomain"] == svc["metadata"]["name"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["MASTER_ADDR"]["value"] == "llama-sft-0.llama-sft" and env["KUBETUNE_NODES"]["value"] == "2"
    # one gang: the first failed or disrupted pod fails the Job; the operator restarts all pods
    assert j["spec"]["backoffLimit"] == 0 and j["spec"]["podReplacementPolicy"] == "Failed"
    assert j["spec"]["podFailurePolicy"]["rules"][1] == {"action": "FailJob",
                                                         "onPodConditions": [{"type": "DisruptionTarget"}]}


def test_names_are_deterministic_and_bounded():
    assert m.child_name("llama", "sft") == "llama-sft"
    long = m.child_name("a" * 63, "stage-" + "b" * 34)
    assert len(long) <= m.MAX_CHILD_NAME and long == m.child_name("a" * 63, "stage-" + "b" * 34)
    assert long != m.child_name("a" * 63, "stage-" + "c" * 34)
    assert m.service_name("1job", "sft")[0].isalpha()


def test_child_names_never_collide():
    """FineTuneJob `a-b` stage `c` and FineTuneJob `a` stage `b-c` get different children; so does
    every pair of (job, stage) built from a small alphabet of dashed parts, hash-like stage names
    and names long enough to be cut."""
    import itertools

    assert m.child_name("a-b", "c") == "a-b-c" and m.child_name("a", "b-c") != "a-b-c"
    assert m.service_name("a-b", "c") != m.service_name("a", "b-c")
    parts = ["a", "b", "c", "1", "0a1b2c3d", "x" * 30, "y" * 40]
    names = {"-".join(p) for n in (1, 2, 3) for p in itertools.product(parts, repeat=n)}
    jobs = [n for n in names if len(n) <= 63]
    stages = [n for n in names if len(n) <= 40]
    seen: dict[str, tuple[str, str]] = {}
    seen_svc: dict[str, tuple[str, str]] = {}
    for job, stage in itertools.product(jobs, stages):
        c, v = m.child_name(job, stage), m.service_name(job, stage)
        assert len(c) <= m.MAX_CHILD_NAME and len(v) <= m.MAX_CHILD_NAME and v[0].isalpha()
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", c) and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", v)
        assert seen.setdefault(c, (job, stage)) == (job, stage), (c, seen[c], (job, stage))
        assert seen_svc.setdefault(v, (job, stage)) == (job, stage), (v, seen_svc[v], (job, stage))
    assert len(seen) > 10_000


def test_legacy_names_are_the_old_scheme():
    assert m.legacy_child_name("a", "b-c") == "a-b-c" == m.legacy_child_name("a-b", "c")
    assert m.legacy_service_name("1a", "b") == m.legacy_child_name("s", "1a-b")


def test_operator_defaults_and_runtime_command_override():
    cfg = OperatorConfig(runtime_image="img:1", image_pull_policy="Never", runtime_metrics_port=9500,
                         runtime_command=("python", "/opt/fake.py"))
    _, _, (_, j) = build(ftj(), cfg)
    c = j["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["python", "/opt/fake.py", "--config", "/etc/kubetune/stage.json"]
    assert c["imagePullPolicy"] == "Never"
    assert {"name": "KUBETUNE_METRICS_PORT", "value": "9500"} in c["env"]


def test_second_stage_config_reads_the_first_stage_output(config):
    stages = [{"name": "sft", "type": "sft"}, {"name": "dpo", "type": "dpo"}, {"name": "merge", "type": "export"}]
    job, stage, (cm, j) = build(ftj(stages=stages), config, index=1)
    cfg = json.loads(cm["data"]["stage.json"])
    assert cfg["index"] == 1 and cfg["count"] == 3
    assert cfg["io"]["policy"]["adapter"] == "s3://ckpt/llama/sft/output"
    assert j["metadata"]["name"] == "llama-dpo"
    assert j["metadata"]["annotations"][m.ANNOTATION_CONFIG_HASH] == m.config_hash(stage)


def test_operator_gpu_defaults_fill_what_the_spec_leaves_out():
    """The chart's runtime.runtimeClassName/nodeSelector/tolerations reach GPU pods that set none."""
    from kubetune.operator.config import parse_config

    cfg, _ = parse_config(["--default-runtime-class-name", "nvidia",
                           "--default-node-selector", '{"nvidia.com/gpu.present": "true"}',
                           "--default-tolerations", '[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]'])
    _, _, (_, j) = build(ftj(), cfg)
    pod = j["spec"]["template"]["spec"]
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == [{"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}]
    # the spec's own placement wins
    _, _, (_, j) = build(ftj({"resources": {"runtimeClassName": "kata", "nodeSelector": {"pool": "a"}}}), cfg)
    pod = j["spec"]["template"]["spec"]
    assert pod["runtimeClassName"] == "kata" and pod["nodeSelector"] == {"pool": "a"}
    # CPU pods get no GPU placement
    _, _, (_, j) = build(ftj({"resources": {"gpusPerNode": 0}}), cfg)
    pod = j["spec"]["template"]["spec"]
    assert "runtimeClassName" not in pod and "nodeSelector" not in pod and "tolerations" not in pod


def test_bad_default_json_is_a_clear_error():
    import pytest

    from kubetune.operator.config import parse_config

    with pytest.raises(SystemExit, match="--default-node-selector: not valid JSON"):
        parse_config(["--default-node-selector", "{nope"])


def test_pod_overrides_for_rdma_fabrics(config):
    """NCCL env, hostNetwork and Multus annotations reach the pods; the runtime's own env stays ours."""
    body = ftj({"resources": {"nodes": 2, "gpusPerNode": 1, "podOverrides": {
        "env": [{"name": "NCCL_SOCKET_IFNAME", "value": "enp1s0f0np0"}, {"name": "NCCL_IB_HCA", "value": "mlx5"},
                {"name": "KUBETUNE_SCRATCH", "value": "/hijack"}, {"name": "MASTER_ADDR", "value": "elsewhere"},
                {"name": "TMPDIR", "value": "/tmp"}],
        "hostNetwork": True,
        "annotations": {"k8s.v1.cni.cncf.io/networks": "cx7-roce"},
        "labels": {"fabric": "cx7", "kubetune.io/job": "hijack"},
        "resources": {"rdma/rdma_shared_device_a": "1"},
    }}})
    _, _, children = build(body, config)
    j = next(c for c in children if c["kind"] == "Job")
    tmpl = j["spec"]["template"]
    env = {e["name"]: e.get("value") for e in tmpl["spec"]["containers"][0]["env"]}
    assert env["NCCL_SOCKET_IFNAME"] == "enp1s0f0np0" and env["NCCL_IB_HCA"] == "mlx5"
    assert env["KUBETUNE_SCRATCH"] == "/var/tmp/kubetune" and env["MASTER_ADDR"] != "elsewhere"
    assert "TMPDIR" not in env, "temp files stay on the scratch volume (contract.scratch_layout)"
    assert [e["name"] for e in tmpl["spec"]["containers"][0]["env"]].count("MASTER_ADDR") == 1
    assert tmpl["spec"]["hostNetwork"] is True and tmpl["spec"]["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert tmpl["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"] == "cx7-roce"
    assert tmpl["metadata"]["labels"]["fabric"] == "cx7" and tmpl["metadata"]["labels"]["kubetune.io/job"] == "llama"
    assert tmpl["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "1", "rdma/rdma_shared_device_a": "1"}


def test_pod_override_env_from_a_secret_and_the_grace_period(config):
    """podOverrides.env takes a Secret's key (no plaintext anywhere); runPolicy sets the grace period."""
    body = ftj({"resources": {"podOverrides": {"env": [
        {"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "api-key"}}},
        {"name": "NCCL_DEBUG", "value": "INFO"}, {"name": "EMPTY"}]}}})
    body["spec"]["runPolicy"] = {"terminationGracePeriodSeconds": 900}
    _, _, (cm, j) = build(body, config)
    pod = j["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["WANDB_API_KEY"] == {"name": "WANDB_API_KEY",
                                    "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "api-key"}}}
    assert env["NCCL_DEBUG"] == {"name": "NCCL_DEBUG", "value": "INFO"} and env["EMPTY"]["value"] == ""
    assert pod["terminationGracePeriodSeconds"] == 900
    _, _, (_, default) = build(ftj(), config)
    assert default["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 300


def test_a_stage_network_policy_lets_in_its_gang_the_operator_and_monitoring_only(config):
    from dataclasses import replace

    from kubetune.operator.config import parse_config

    cfg, _ = parse_config(["--training-network-policy", json.dumps({
        "operatorNamespace": "kubetune-system", "operatorPodLabels": {"app.kubernetes.io/name": "kubetune"},
        "monitoringNamespaces": ["monitoring"],
        "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": [{"port": 9000}]}]})])
    job, stage, children = build(ftj({"resources": {"nodes": 2, "gpusPerNode": 1}}), replace(config, network_policy=cfg.network_policy))
    (np,) = [c for c in children if c["kind"] == "NetworkPolicy"]
    gang = {"matchLabels": {"kubetune.io/job": "llama", "kubetune.io/stage": stage.name}}
    spec = np["spec"]
    assert spec["podSelector"] == gang and spec["policyTypes"] == ["Ingress", "Egress"]
    peers, metrics = spec["ingress"]
    assert peers == {"from": [{"podSelector": gang}]}  # every port: the rendezvous and NCCL/gloo
    assert metrics["ports"] == [{"port": 9400, "protocol": "TCP"}]
    assert metrics["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kubetune-system"}},
         "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kubetune"}}},
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    assert spec["egress"][0] == {"to": [{"podSelector": gang}]} and spec["egress"][-1]["ports"] == [{"port": 9000}]
    assert np["metadata"]["ownerReferences"][0]["uid"] == UID
    # off by default; open egress when none is given
    assert not [c for c in build(ftj(), config)[2] if c["kind"] == "NetworkPolicy"]
    open_cfg, _ = parse_config(["--training-network-policy", '{"operatorNamespace": "k", "egress": null}'])
    (np,) = [c for c in build(ftj(), replace(config, network_policy=open_cfg.network_policy))[2]
             if c["kind"] == "NetworkPolicy"]
    assert np["spec"]["policyTypes"] == ["Ingress"] and "egress" not in np["spec"]
    with pytest.raises(SystemExit, match="unknown key"):
        parse_config(["--training-network-policy", '{"operatorNamespace": "k", "egres": []}'])
    with pytest.raises(SystemExit, match="operatorNamespace is required"):
        parse_config(["--training-network-policy", '{"egress": null}'])


# -- the cluster model cache (spec.resources.modelCache / the chart's modelCache) -----------------

def _pod(body, config):
    _, _, children = build(body, config)
    return children[-1]["spec"]["template"]["spec"]


def _cache_of(pod):
    (c,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    mounts = [v for v in c["volumeMounts"] if v["name"] == "model-cache"]
    volumes = [v for v in pod["volumes"] if v["name"] == "model-cache"]
    return env, mounts, volumes


def test_a_model_cache_claim_is_the_hub_cache_and_the_s3_cache_of_every_stage_pod(config):
    stages = [{"name": "sft", "type": "sft"}, {"name": "merge", "type": "export"}]
    body = ftj({"resources": {"modelCache": {"claimName": "models", "subPath": "team-a/hf"}}}, stages=stages)
    for index in (0, 1):  # training and export pods alike
        job, stage, children = build(body, config, index=index)
        env, mounts, volumes = _cache_of(children[-1]["spec"]["template"]["spec"])
        assert volumes == [{"name": "model-cache", "persistentVolumeClaim": {"claimName": "models"}}]
        assert mounts == [{"name": "model-cache", "mountPath": "/var/cache/kubetune-models", "subPath": "team-a/hf"}]
        # the hub cache only: HF_HOME (tokens, xet, datasets) stays on the scratch volume
        assert env["HF_HUB_CACHE"] == "/var/cache/kubetune-models/hub"
        assert env["KUBETUNE_CACHE_DIR"] == "/var/cache/kubetune-models/kubetune"
        assert "HF_HOME" not in env and env["KUBETUNE_SCRATCH"] == "/var/tmp/kubetune"
        (c,) = children[-1]["spec"]["template"]["spec"]["containers"]
        assert {"name": "scratch", "mountPath": "/var/tmp/kubetune"} in c["volumeMounts"]


def test_no_model_cache_unless_asked(config):
    env, mounts, volumes = _cache_of(_pod(ftj(), config))
    assert not mounts and not volumes and "HF_HUB_CACHE" not in env and "KUBETUNE_CACHE_DIR" not in env


def test_the_operators_default_model_cache_and_the_spec_wins_whole(config):
    import dataclasses

    cluster = dataclasses.replace(config, model_cache_claim="cluster-models", model_cache_sub_path="shared")
    env, mounts, volumes = _cache_of(_pod(ftj(), cluster))
    assert volumes == [{"name": "model-cache", "persistentVolumeClaim": {"claimName": "cluster-models"}}]
    assert mounts[0]["subPath"] == "shared" and env["HF_HUB_CACHE"] == "/var/cache/kubetune-models/hub"
    # the spec's claim wins, and the operator's subPath is not mixed into it
    env, mounts, volumes = _cache_of(_pod(ftj({"resources": {"modelCache": {"claimName": "mine"}}}), cluster))
    assert volumes == [{"name": "model-cache", "persistentVolumeClaim": {"claimName": "mine"}}]
    assert mounts == [{"name": "model-cache", "mountPath": "/var/cache/kubetune-models"}]


@pytest.mark.parametrize("cache, field", [
    ({"claimName": "Not_A_Claim"}, "claimName"),
    ({"claimName": "ok", "subPath": "../other-team"}, "subPath"),
    ({"claimName": "ok", "subPath": "/abs"}, "subPath"),
    ({"claimName": "ok", "subPath": "a/../../b"}, "subPath"),
])
def test_a_bad_model_cache_is_refused_naming_the_field(cache, field):
    from kubetune.runtime.api.errors import SpecError

    with pytest.raises(SpecError) as err:
        parse_job(job_document(ftj({"resources": {"modelCache": cache}})))
    assert f"modelCache.{field}" in str(err.value)

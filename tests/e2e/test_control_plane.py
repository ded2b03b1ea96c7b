"""Smoke tests of the test cluster itself: real apiserver, controllers, scheduler and the
process kubelet, driven with kubectl and the REST API as a user or an operator would."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from cluster import build
from cluster.kubeapi import ApiError
from cluster.util import wait_for

pytestmark = pytest.mark.e2e


def apply(cp, *objs: dict, ns: str | None = None) -> None:
    args = ["apply", "-f", "-"] + (["-n", ns] if ns else [])
    r = cp.kubectl(*args, input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objs)}))
    assert r.returncode == 0, r.stderr


def pod(name: str, containers: list[dict], **spec) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, **spec.pop("metadata", {})},
            "spec": {"restartPolicy": "Never", "containers": containers, **spec}}


def py(name: str, code: str, **extra) -> dict:
    return {"name": name, "image": "python:3.11", "command": ["python", "-c", code], **extra}


def get_pod(kube, ns: str, name: str) -> dict:
    return kube.get(f"/api/v1/namespaces/{ns}/pods/{name}")


def wait_phase(kube, ns: str, name: str, phases: tuple[str, ...], timeout: float = 60) -> dict:
    return wait_for(lambda: (p := get_pod(kube, ns, name))["status"].get("phase") in phases and p,
                    timeout, f"pod {ns}/{name} in {phases}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def test_versions_are_the_pinned_releases(control_plane):
    r = control_plane.kubectl("version", "-o", "json")
    assert r.returncode == 0, r.stderr
    v = json.loads(r.stdout)
    assert v["serverVersion"]["gitVersion"] == build.KUBERNETES_VERSION
    assert v["clientVersion"]["gitVersion"] == build.KUBERNETES_VERSION
    assert v["serverVersion"]["minor"] == build.KUBERNETES_VERSION.split(".")[1]
    h = control_plane.run_tool("helm", "version", "--short")
    assert h.returncode == 0 and h.stdout.startswith(build.HELM_VERSION), h.stdout + h.stderr
    h = control_plane.run_tool("helm", "list", "--all-namespaces", "-o", "json")
    assert h.returncode == 0 and json.loads(h.stdout) == [], h.stdout + h.stderr


def test_rbac_is_enforced(control_plane, namespace):
    """A ServiceAccount without bindings is forbidden; the admin is not."""
    r = control_plane.kubectl("auth", "can-i", "create", "pods", "-n", namespace,
                              f"--as=system:serviceaccount:{namespace}:default")
    assert r.stdout.strip() == "no", r.stdout + r.stderr
    r = control_plane.kubectl("auth", "can-i", "create", "pods", "-n", namespace)
    assert r.stdout.strip() == "yes", r.stdout + r.stderr


def test_node_is_ready_with_gpu_capacity(control_plane, kubelet, kube):
    node = kube.get(f"/api/v1/nodes/{kubelet.node_name}")
    assert node["status"]["capacity"]["nvidia.com/gpu"] == "8"
    # the process kubelet reports what it is told; the real one, this machine
    assert node["status"]["allocatable"]["cpu"] == (kubelet.cpu if kubelet.kind == "process" else str(os.cpu_count()))
    assert any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"]["conditions"])
    assert not node["spec"].get("taints")
    lease = kube.get(f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{kubelet.node_name}")
    assert lease["spec"]["holderIdentity"] == kubelet.node_name


def test_job_runs_to_completion(control_plane, kubelet, kube, namespace):
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "hello"},
           "spec": {"backoffLimit": 0, "template": {"spec": {"restartPolicy": "Never", "containers": [
               py("main", "print(1)")]}}}}
    apply(control_plane, job, ns=namespace)
    r = control_plane.kubectl("wait", "-n", namespace, "--for=condition=Complete", "job/hello", "--timeout=60s",
                              timeout=70)
    assert r.returncode == 0, r.stdout + r.stderr
    pods = kube.get(f"/api/v1/namespaces/{namespace}/pods", labelSelector="job-name=hello")["items"]
    assert len(pods) == 1
    p = pods[0]
    assert p["spec"]["nodeName"] == kubelet.node_name
    assert p["status"]["phase"] == "Succeeded"
    term = p["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (term["exitCode"], term["reason"]) == (0, "Completed")
    if kubelet.kind == "process":  # a loopback alias per pod
        assert p["status"]["podIP"].startswith("127.") and p["status"]["podIP"] != "127.0.0.1"
    else:  # an address on the node's pod network (CNI bridge + host-local)
        assert ipaddress.ip_address(p["status"]["podIP"]) in kubelet.net.subnet
    assert kubelet.pod_logs(namespace, p["metadata"]["name"]) == "1\n"
    logs = control_plane.kubectl("logs", "-n", namespace, "job/hello")
    assert logs.returncode == 0, logs.stderr
    assert logs.stdout == "1\n"
    j = kube.get(f"/apis/batch/v1/namespaces/{namespace}/jobs/hello")
    assert j["status"]["succeeded"] == 1


def test_env_volumes_and_service_account(control_plane, kubelet, kube, namespace):
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"},
          "data": {"greeting": "hello", "config.yaml": "lr: 0.001\n"}}
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"}, "stringData": {"password": "s3cret"}}
    code = r"""
import json, os, ssl, urllib.request, urllib.error
sa = '/var/run/secrets/kubernetes.io/serviceaccount'
out = {k: os.environ.get(k) for k in ['GREETING', 'PASSWORD', 'POD_NAME', 'POD_NS', 'POD_UID', 'APP', 'INDEX',
       'MY_IP', 'POD_IP', 'CPUS', 'EXPANDED', 'CM_greeting', 'HOSTNAME']}
out['config'] = open('/etc/kubetune-e2e/config/config.yaml').read()
out['labels'] = open('/etc/kubetune-e2e/podinfo/labels').read()
open('/scratch-e2e/x', 'w').write('ok')
out['scratch'] = os.listdir('/scratch-e2e')
out['hostname'] = os.uname().nodename
out['namespace_file'] = open(sa + '/namespace').read()
ctx = ssl.create_default_context(cafile=sa + '/ca.crt')
url = 'https://%s:%s/api/v1/namespaces/%s/pods' % (os.environ['KUBERNETES_SERVICE_HOST'], os.environ['KUBERNETES_SERVICE_PORT'], out['POD_NS'])
req = urllib.request.Request(url, headers={'Authorization': 'Bearer ' + open(sa + '/token').read()})
try:
    urllib.request.urlopen(req, context=ctx)
except urllib.error.HTTPError as e:
    out['api'] = json.loads(e.read())['message']
print('RESULT ' + json.dumps(out), flush=True)
import time; time.sleep(60)
"""
    c = py("main", code, env=[
        {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "greeting"}}},
        {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
        {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
        {"name": "INDEX", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
        {"name": "MY_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "CPUS", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
        {"name": "EXPANDED", "value": "$(GREETING)-world"},
    ], envFrom=[{"configMapRef": {"name": "cfg"}, "prefix": "CM_"}],
        resources={"limits": {"cpu": "2", "memory": "1Gi"}},
        volumeMounts=[{"name": "config", "mountPath": "/etc/kubetune-e2e/config", "readOnly": True},
                      {"name": "podinfo", "mountPath": "/etc/kubetune-e2e/podinfo"},
                      {"name": "scratch", "mountPath": "/scratch-e2e"}])
    p = pod("envpod", [c], metadata={"labels": {"app": "kubetune"},
                                     "annotations": {"batch.kubernetes.io/job-completion-index": "3"}},
            volumes=[{"name": "config", "configMap": {"name": "cfg"}},
                     {"name": "podinfo", "downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}},
                     {"name": "scratch", "emptyDir": {}}])
    for leftover in ("/etc/kubetune-e2e/config", "/etc/kubetune-e2e/podinfo", "/etc/kubetune-e2e", "/scratch-e2e"):
        if os.path.isdir(leftover):  # empty mount points a killed earlier run may have left
            os.rmdir(leftover)
    apply(control_plane, cm, secret, p, ns=namespace)
    line = wait_for(lambda: next((ln for ln in kubelet.pod_logs(namespace, "envpod").splitlines()
                                  if ln.startswith("RESULT ")), None), 60, "pod output")
    out = json.loads(line[len("RESULT "):])
    st = get_pod(kube, namespace, "envpod")
    assert out["GREETING"] == "hello" and out["EXPANDED"] == "hello-world" and out["CM_greeting"] == "hello"
    assert out["PASSWORD"] == "s3cret"
    assert out["POD_NAME"] == "envpod" and out["POD_NS"] == namespace and out["POD_UID"] == st["metadata"]["uid"]
    assert out["APP"] == "kubetune" and out["INDEX"] == "3" and out["CPUS"] == "2"
    assert out["MY_IP"] == st["status"]["podIP"]
    if kubelet.kind == "process":  # its own extra: POD_IP for every pod (a real kubelet sets none)
        assert out["POD_IP"] == st["status"]["podIP"]
    assert out["config"] == "lr: 0.001\n"
    assert out["labels"] == 'app="kubetune"'
    assert out["scratch"] == ["x"]
    assert out["hostname"] == out["HOSTNAME"] == "envpod"
    assert out["namespace_file"] == namespace
    # the projected service-account token authenticates as the pod's ServiceAccount
    assert f"system:serviceaccount:{namespace}:default" in out["api"]
    # running, ready, and the volumes exist for that process only
    assert st["status"]["phase"] == "Running"
    assert {c["type"]: c["status"] for c in st["status"]["conditions"]}["Ready"] == "True"
    assert not Path("/etc/kubetune-e2e/config/config.yaml").exists()
    assert not Path("/scratch-e2e/x").exists()
    r = control_plane.kubectl("delete", "pod", "-n", namespace, "envpod", "--grace-period=1", "--wait=true",
                              "--timeout=30s", timeout=40)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: not Path("/etc/kubetune-e2e").exists(), 10, "mount points to be removed")


def test_failed_pod_reports_exit_code_and_message(control_plane, kubelet, kube, namespace):
    p = pod("fails", [
        py("explicit", "import sys; open('/dev/termination-log', 'w').write('bad input: spec.data[0].source'); sys.exit(3)"),
        py("fallback", "import sys; print('boom: no such file', file=sys.stderr); sys.exit(2)",
           terminationMessagePolicy="FallbackToLogsOnError"),
        py("custom", "open('/tmp/kubetune-e2e-msg', 'w').write('custom path'); raise SystemExit(0)",
           terminationMessagePath="/tmp/kubetune-e2e-msg"),
    ])
    apply(control_plane, p, ns=namespace)
    st = wait_phase(kube, namespace, "fails", ("Failed", "Succeeded"))
    assert st["status"]["phase"] == "Failed"
    cs = {c["name"]: c["state"]["terminated"] for c in st["status"]["containerStatuses"]}
    assert (cs["explicit"]["exitCode"], cs["explicit"]["reason"]) == (3, "Error")
    assert cs["explicit"]["message"] == "bad input: spec.data[0].source"
    assert (cs["fallback"]["exitCode"], cs["fallback"]["reason"]) == (2, "Error")
    assert "boom: no such file" in cs["fallback"]["message"]
    assert (cs["custom"]["exitCode"], cs["custom"]["reason"], cs["custom"]["message"]) == (0, "Completed", "custom path")
    wait_for(lambda: not Path("/tmp/kubetune-e2e-msg").exists(), 10, "the mount point file to be removed")
    assert {c["type"]: c["status"] for c in st["status"]["conditions"]}["Ready"] == "False"


def test_missing_command_is_a_start_error(control_plane, kubelet, kube, namespace):
    if kubelet.kind != "process":
        pytest.skip("process kubelet only: a real kubelet runs the image's entrypoint")
    apply(control_plane, pod("nocmd", [{"name": "main", "image": "busybox"}]), ns=namespace)
    st = wait_phase(kube, namespace, "nocmd", ("Failed", "Succeeded"))
    term = st["status"]["containerStatuses"][0]["state"]["terminated"]
    assert st["status"]["phase"] == "Failed" and term["reason"] == "StartError" and term["exitCode"] == 128


def test_deletion_terminates_then_kills(control_plane, kubelet, kube, namespace):
    polite = ("import signal, sys, time\n"
              "def bye(*a):\n    print('got SIGTERM', flush=True); sys.exit(0)\n"
              "signal.signal(signal.SIGTERM, bye)\nprint('up', flush=True)\ntime.sleep(600)")
    stubborn = ("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                "print('up', flush=True)\ntime.sleep(600)")
    apply(control_plane, pod("polite", [py("main", polite)]), pod("stubborn", [py("main", stubborn)],
                                                                    terminationGracePeriodSeconds=2), ns=namespace)
    pids = {}
    for name in ("polite", "stubborn"):
        wait_for(lambda: "up" in kubelet.pod_logs(namespace, name), 60, f"{name} to start")
        pids[name] = kubelet.container_pid(namespace, name, "main")
        assert pid_alive(pids[name])
    # follow the polite pod's log: it is gone with the pod on a real kubelet
    follow = subprocess.Popen([control_plane.binary("kubectl"), "--kubeconfig", control_plane.kubeconfig, "logs", "-f",
                               "-n", namespace, "polite"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=control_plane.env)
    wait_for(lambda: follow.stdout.readline().strip() == "up", 30, "the log stream")
    t0 = time.monotonic()
    kube.delete(f"/api/v1/namespaces/{namespace}/pods/polite")
    kube.delete(f"/api/v1/namespaces/{namespace}/pods/stubborn")
    for name in ("polite", "stubborn"):
        def gone(name=name):
            try:
                get_pod(kube, namespace, name)
                return False
            except ApiError as e:
                return e.status == 404
        wait_for(gone, 30, f"pod {name} to be deleted")
        assert not pid_alive(pids[name])
    assert time.monotonic() - t0 < 20
    rest, _ = follow.communicate(timeout=30)
    assert "got SIGTERM" in rest


def test_scheduler_respects_gpu_capacity(control_plane, kubelet, kube, namespace):
    fits = py("main", "print('gpu ok')", resources={"limits": {"nvidia.com/gpu": "1"}})
    too_big = py("main", "print('never')", resources={"limits": {"nvidia.com/gpu": "100"}})
    apply(control_plane, pod("gpu-fits", [fits]), pod("gpu-too-big", [too_big]), ns=namespace)
    st = wait_phase(kube, namespace, "gpu-fits", ("Succeeded",))
    assert st["spec"]["nodeName"] == kubelet.node_name

    def unschedulable():
        conds = get_pod(kube, namespace, "gpu-too-big")["status"].get("conditions") or []
        return any(c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable" for c in conds)
    wait_for(unschedulable, 30, "gpu-too-big to be reported Unschedulable")
    p = get_pod(kube, namespace, "gpu-too-big")
    assert p["status"]["phase"] == "Pending" and not p["spec"].get("nodeName")


def test_garbage_collector_deletes_owned_children(control_plane, kubelet, kube, namespace):
    base = f"/api/v1/namespaces/{namespace}/configmaps"
    parent = kube.post(base, {"metadata": {"name": "parent"}, "data": {"a": "1"}})
    kube.post(base, {"metadata": {"name": "child", "ownerReferences": [{
        "apiVersion": "v1", "kind": "ConfigMap", "name": "parent", "uid": parent["metadata"]["uid"]}]}})
    kube.post(base, {"metadata": {"name": "bystander"}})
    kube.delete(f"{base}/parent", {"propagationPolicy": "Background"})

    def child_gone():
        try:
            kube.get(f"{base}/child")
            return False
        except ApiError as e:
            return e.status == 404
    wait_for(child_gone, 60, "the garbage collector to delete the owned ConfigMap")
    assert kube.get(f"{base}/bystander")["metadata"]["name"] == "bystander"


def test_job_deletion_cascades_to_running_pods(control_plane, kubelet, kube, namespace):
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "sleeper"},
           "spec": {"backoffLimit": 0, "template": {"spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 1,
                                                             "containers": [py("main", "import time; print('up', flush=True); time.sleep(600)")]}}}}
    apply(control_plane, job, ns=namespace)
    pods = wait_for(lambda: kube.get(f"/api/v1/namespaces/{namespace}/pods", labelSelector="job-name=sleeper")["items"],
                    60, "the Job's pod")
    name = pods[0]["metadata"]["name"]
    wait_for(lambda: "up" in kubelet.pod_logs(namespace, name), 60, "the Job's pod to run")
    pid = kubelet.container_pid(namespace, name, "main")
    r = control_plane.kubectl("delete", "job", "-n", namespace, "sleeper", "--cascade=foreground", "--timeout=60s",
                              timeout=70)
    assert r.returncode == 0, r.stderr
    assert kube.get(f"/api/v1/namespaces/{namespace}/pods", labelSelector="job-name=sleeper")["items"] == []
    assert not pid_alive(pid)


def test_restart_policy_on_failure_restarts_the_container(control_plane, kubelet, kube, namespace):
    code = ("import os, sys\np = '/work-e2e/count'\nn = int(open(p).read()) if os.path.exists(p) else 0\n"
            "open(p, 'w').write(str(n + 1))\nprint('attempt', n + 1, flush=True)\nsys.exit(0 if n >= 1 else 1)")
    p = pod("retry", [py("main", code, volumeMounts=[{"name": "w", "mountPath": "/work-e2e"}])],
            restartPolicy="OnFailure", volumes=[{"name": "w", "emptyDir": {}}])
    apply(control_plane, p, ns=namespace)
    st = wait_phase(kube, namespace, "retry", ("Succeeded", "Failed"))
    assert st["status"]["phase"] == "Succeeded"
    c = st["status"]["containerStatuses"][0]
    assert c["restartCount"] == 1
    if kubelet.kind == "process":  # one log file per container, across restarts; lastState kept
        assert c["lastState"]["terminated"]["exitCode"] == 1
        assert kubelet.pod_logs(namespace, "retry").splitlines() == ["attempt 1", "attempt 2"]
    else:  # one log per container instance; the second saw the first's count (the real kubelet
        # drops the dead container, and with it lastState, once the pod has ended)
        assert kubelet.pod_logs(namespace, "retry").splitlines() == ["attempt 2"]


def test_kubectl_logs_follow_streams_until_exit(control_plane, kubelet, kube, namespace):
    code = "import time\nprint('a', flush=True)\ntime.sleep(2)\nprint('b', flush=True)"
    apply(control_plane, pod("chatty", [py("main", code)]), ns=namespace)
    wait_phase(kube, namespace, "chatty", ("Running", "Succeeded"))
    r = control_plane.kubectl("logs", "-f", "-n", namespace, "chatty", timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "a\nb\n"
    r = control_plane.kubectl("logs", "--tail=1", "-n", namespace, "chatty")
    assert r.stdout == "b\n", r.stdout + r.stderr


def test_the_writable_layer_check_sees_a_write_outside_the_volumes(control_plane, kubelet, kube, namespace):
    """The negative control of the read-only-root check the real-runtime e2e relies on
    (RealNode.writes_outside_volumes): a write to the image's filesystem shows, one to a volume
    does not."""
    if kubelet.kind != "real":
        pytest.skip("real node only: the process kubelet runs no container filesystem")
    stray = py("main", "open('/etc/stray-file', 'w').write('x'); open('/scratch-e2e/ok', 'w').write('x')",
               volumeMounts=[{"name": "s", "mountPath": "/scratch-e2e"}])
    tidy = py("main", "open('/scratch-e2e/ok', 'w').write('x')",
              volumeMounts=[{"name": "s", "mountPath": "/scratch-e2e"}])
    apply(control_plane, pod("stray", [stray], volumes=[{"name": "s", "emptyDir": {}}]),
          pod("tidy", [tidy], volumes=[{"name": "s", "emptyDir": {}}]), ns=namespace)
    for name in ("stray", "tidy"):
        assert wait_phase(kube, namespace, name, ("Succeeded", "Failed"))["status"]["phase"] == "Succeeded"
    assert kubelet.writes_outside_volumes(namespace, "stray", "main") == ["etc/stray-file"]
    assert kubelet.writes_outside_volumes(namespace, "tidy", "main") == []

"""Helpers of the operator's e2e tests: the operator as a child process, the FAKE RUNTIME its pods
run, S3 storage for one test (`Store`), FineTuneJob documents from examples/quickstart.yaml, and
readers of status, events and children. The fixtures built on them (`crd`, `operator`, `store`)
are in conftest.py."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import yaml

from cluster.controlplane import free_port
from cluster.util import stop_process_group, wait_for

REPO = Path(__file__).resolve().parents[2]
GROUP = "/apis/kubetune.io/v1alpha1"

FAKE_RUNTIME = r"""
# FAKE RUNTIME (operator e2e tests only): stands in for `python -m kubetune.runtime stage`.
# Speaks the runtime's contracts without training: reads stage.json, serves /progress on
# $POD_IP:$KUBETUNE_METRICS_PORT, commits checkpoints to S3 (the Secret's credentials and the
# endpoint reach it as env, as the real runtime's do) with a LATEST pointer and resumes from it,
# commits the output with COMMITTED.json, exits 42 with a termination message on bad input.
# The step time comes from the model name (`fake/step-0.4s`). As PID 1 of its container it
# exits on SIGTERM, as the runtime does (local.exit_on_sigterm).
import http.server, json, os, re, signal, sys, threading, time
from pathlib import Path
import boto3
from botocore.config import Config

signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(128 + signum))
cfg = json.loads(Path(sys.argv[sys.argv.index("--config") + 1]).read_text())
stage = cfg["stage"]["name"]
total = int(cfg["stage"]["hyperparameters"].get("maxSteps") or 6)
every = int(cfg["checkpoint"]["everySteps"])
m = re.search(r"step-([0-9.]+)s", cfg["model"]["name"])
step_s = float(m.group(1)) if m else 0.2
s3 = boto3.client("s3", region_name="us-east-1", config=Config(s3={"addressing_style": "path"}))


def split(uri):
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key.rstrip("/")


def exists(uri):
    try:
        s3.head_object(Bucket=split(uri)[0], Key=split(uri)[1])
        return True
    except s3.exceptions.ClientError:
        return False


def put_json(uri, obj):
    s3.put_object(Bucket=split(uri)[0], Key=split(uri)[1], Body=json.dumps(obj).encode())


ck, out = cfg["io"]["checkpoints"].rstrip("/"), cfg["io"]["output"].rstrip("/")
if cfg["stage"]["type"] != "export":
    for i, d in enumerate(cfg["data"]):
        if not exists(d["source"]):
            msg = f"data[{i}].source: {d['source']}: file not found"
            Path("/dev/termination-log").write_text(msg)
            print(msg, file=sys.stderr)
            sys.exit(42)

start = 0
if exists(f"{ck}/LATEST"):
    b, k = split(f"{ck}/LATEST")
    start = json.loads(s3.get_object(Bucket=b, Key=k)["Body"].read())["step"]
state = {"step": start, "phase": "running", "output": None,
         "checkpoint": {"uri": f"{ck}/checkpoint-{start}", "step": start} if start else None}


def report():
    left = total - state["step"]
    return {"job": cfg["job"], "stage": stage, "rank": 0, "phase": state["phase"],
            "step": state["step"], "totalSteps": total, "epoch": state["step"] / total,
            "loss": round(2.0 / (1 + state["step"]), 4), "learningRate": 1e-4, "tokensPerSecond": 1000.0,
            "etaSeconds": left * step_s, "checkpoint": state["checkpoint"], "output": state["output"],
            "updatedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_GET(self):
        body = json.dumps(report()).encode() if self.path == "/progress" else b"kubetune_fake_up 1\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


srv = http.server.ThreadingHTTPServer((os.environ["POD_IP"], int(os.environ["KUBETUNE_METRICS_PORT"])), Handler)
threading.Thread(target=srv.serve_forever, daemon=True).start()
print(f"fake runtime: stage {stage} from step {start} of {total}", flush=True)
for s in range(start + 1, total + 1):
    time.sleep(step_s)
    state["step"] = s
    if s % every == 0 and s < total:
        put_json(f"{ck}/checkpoint-{s}/COMMITTED.json", {"step": s})
        put_json(f"{ck}/LATEST", {"step": s, "uri": f"{ck}/checkpoint-{s}"})
        state["checkpoint"] = {"uri": f"{ck}/checkpoint-{s}", "step": s}
put_json(f"{out}/COMMITTED.json", {"stage": stage, "steps": total, "resumedFrom": start, "policy": cfg["io"]["policy"]})
state["phase"], state["output"] = "finished", {"uri": cfg["io"]["output"]}
print(f"fake runtime: stage {stage} done", flush=True)
"""


def serving(op: "OperatorProcess"):
    """A fixture's body: the operator runs for the fixture's scope, its log's tail printed after."""
    op.start()
    yield op
    op.stop()
    print(f"\n--- operator log (last lines) ---\n{op.tail(30)}")


def inline_command(script: str) -> str:
    """The operator's `--runtime-command` that runs `script` with the image's Python (`python -c`):
    the script travels in the pod spec, so it runs in any image that has Python, on any node."""
    return shlex.join(["python", "-c", script])


class OperatorProcess:
    """`python -m kubetune.operator` as a child process, restartable. Its pods run `script` (the
    FAKE RUNTIME by default) in `runtime_image`."""

    def __init__(self, control_plane, workdir: Path, peering: tuple[str, int] | None = None,
                 runtime_image: str = "kubetune/runtime:e2e", script: str = FAKE_RUNTIME,
                 extra_args: tuple[str, ...] = ()):
        self.cp = control_plane
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.peering = peering
        self.runtime_image = runtime_image
        self.script = script
        self.extra_args = tuple(extra_args)
        self.runtime_port = free_port()
        self.health_port = free_port()
        self.metrics_port = free_port()
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        self.log = self.workdir / f"operator-{self.starts}.log"
        mode = ["--peering", self.peering[0], "--priority", str(self.peering[1])] if self.peering else ["--standalone"]
        argv = [sys.executable, "-m", "kubetune.operator", *mode, "--log-format", "plain",
                "--poll-interval", "1", "--runtime-image", self.runtime_image,
                "--runtime-metrics-port", str(self.runtime_port), "--health-port", str(self.health_port),
                "--metrics-port", str(self.metrics_port), "--runtime-command", inline_command(self.script),
                *self.extra_args]
        self.proc = subprocess.Popen(argv, env=self.cp.env, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_for(self.healthy, 60, "operator liveness endpoint")

    def healthy(self) -> bool:
        assert self.proc and self.proc.poll() is None, f"operator exited:\n{self.tail()}"
        with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as r:
            return r.status == 200

    def stop(self) -> None:
        if self.proc:
            stop_process_group(self.proc, 15)
        self.proc = None

    def kill(self) -> None:
        """As a crash would: no clean shutdown."""
        if self.proc:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class Store:
    """One test's S3 storage: a fresh bucket on the session's S3 server (`s3`, auth on), the
    one-record identity dataset in it, and the Secret `s3` with the server's credentials in the
    test's namespace (pods get them only through `credentialsSecretRef`)."""

    SECRET = "s3"

    def __init__(self, s3, control_plane, namespace: str):
        from tests.storage.support import boto_client, make_bucket

        self.s3 = s3
        self.endpoint = s3.endpoint
        self.bucket = make_bucket(s3.endpoint, s3.key_id, s3.secret)
        self.client = boto_client(s3.endpoint, s3.key_id, s3.secret)
        self.put_json("identity.json", [{"instruction": "who are you?", "output": "kubetune"}])
        r = control_plane.kubectl("create", "secret", "generic", self.SECRET, "-n", namespace,
                                  f"--from-literal=AWS_ACCESS_KEY_ID={s3.key_id}",
                                  f"--from-literal=AWS_SECRET_ACCESS_KEY={s3.secret}")
        assert r.returncode == 0, r.stderr

    def uri(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    def storage(self, name: str) -> dict:
        """spec.storage of a job named `name`: its own prefix, the endpoint, the Secret."""
        return {"uri": self.uri("saves", name), "endpoint": self.endpoint,
                "credentialsSecretRef": {"name": self.SECRET}}

    def put_json(self, key: str, obj) -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=json.dumps(obj).encode())

    def json(self, *parts: str):
        return json.loads(self.client.get_object(Bucket=self.bucket, Key="/".join(parts))["Body"].read())

    def exists(self, *parts: str) -> bool:
        return self.client.list_objects_v2(Bucket=self.bucket, Prefix="/".join(parts)).get("KeyCount", 0) > 0

    def lines(self, *parts: str) -> list[dict]:
        """JSON objects under a prefix, one per key, in key order (records several pods write)."""
        listed = self.client.list_objects_v2(Bucket=self.bucket, Prefix="/".join(parts)).get("Contents", [])
        return [self.json(o["Key"]) for o in sorted(listed, key=lambda o: o["Key"])]


def quickstart(store: Store, name: str = "quickstart", step_s: float = 0.2, max_steps: int = 6,
               every: int = 2, stages: list[dict] | None = None) -> dict:
    """examples/quickstart.yaml, pointed at the test's S3 storage and the fake runtime."""
    doc = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    doc["metadata"]["name"] = name
    spec = doc["spec"]
    spec["model"]["name"] = f"fake/step-{step_s}s"
    spec["data"][0]["source"] = store.uri("identity.json")
    spec["storage"] = store.storage(name)
    spec["checkpoint"] = {"everySteps": every, "keep": 2}
    if stages is not None:
        spec["stages"] = stages
    for st in spec["stages"]:
        st.setdefault("hyperparameters", {})["maxSteps"] = max_steps
        # explicit method: a CRD whose CEL rule reads self.method without has() rejects it when left out
        st.setdefault("method", "lora")
    return doc


def apply(cp, doc: dict, ns: str) -> None:
    r = cp.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(doc))
    assert r.returncode == 0, r.stdout + r.stderr


def ftj(kube, ns: str, name: str) -> dict:
    return kube.get(f"{GROUP}/namespaces/{ns}/finetunejobs/{name}")


def condition(obj: dict, type_: str) -> dict:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), {})


def wait_status(kube, ns, name, pred, timeout, what, op=None):
    try:
        return wait_for(lambda: (o := ftj(kube, ns, name)) and pred(o.get("status") or {}) and o, timeout, what,
                        interval=0.3)
    except TimeoutError:
        st = (ftj(kube, ns, name).get("status") or {})
        raise AssertionError(f"{what}: status {json.dumps(st, indent=1)}\n{op.tail() if op else ''}") from None


def events(kube, ns: str, name: str) -> list[str]:
    items = kube.get(f"/api/v1/namespaces/{ns}/events")["items"]
    return [e["reason"] for e in sorted(items, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
            if e["involvedObject"].get("name") == name and e["involvedObject"].get("kind") == "FineTuneJob"]


def jobs(kube, ns: str, name: str) -> list[dict]:
    return kube.get(f"/apis/batch/v1/namespaces/{ns}/jobs", labelSelector=f"kubetune.io/job={name}")["items"]


def pods(kube, ns: str, name: str) -> list[dict]:
    return kube.get(f"/api/v1/namespaces/{ns}/pods", labelSelector=f"kubetune.io/job={name}")["items"]

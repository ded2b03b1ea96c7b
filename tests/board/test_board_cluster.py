"""Cluster mode's handlers against a stand-in Kubernetes API (the last resort the design allows:
the real control plane is the e2e tier's, where the front end's helper drives the board against
it). The stand-in is a real HTTP server that answers the few apiserver paths the board calls, in
the apiserver's shapes (Status objects for refusals); the board talks to it through the real
`kubernetes` client and a real kubeconfig file, so what is checked here is what the board sends
(merge patches, the user's token, the namespace) and how it passes refusals back."""

from __future__ import annotations

import copy
import json
import socket
import threading
import time
from pathlib import Path

import pytest
import uvicorn
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from kubetune.runtime import __version__
from kubetune.runtime.board.cluster import ClusterBackend, kubeconfig_usable
from kubetune.runtime.board.server import create_app

NS = "team-a"
TOKEN = "user-token-123"
FTJ = f"/apis/kubetune.io/v1alpha1/namespaces/{NS}/finetunejobs"
POD_LOG = """kubetune: stage 1/2 sft (sft/lora)
sft [#-------------------]    5%  step 10/200  loss 2.5000  1,000 tok/s  ETA 3m00s
sft [##------------------]   10%  step 20/200  loss 2.1000  1,000 tok/s  ETA 2m50s
12:00:01 INFO kubetune: something else
sft [###-----------------]   15%  step 30/200  loss 1.7500  1,000 tok/s  ETA 2m40s
"""


def _status(code: int, reason: str, message: str, causes=None) -> JSONResponse:
    body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "reason": reason,
            "code": code}
    if causes:
        body["details"] = {"causes": causes}
    return JSONResponse(body, status_code=code)


def _job(name: str, **status) -> dict:
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": NS, "uid": f"uid-{name}", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"model": {"name": "Qwen/Qwen2.5-0.5B-Instruct"},
                     "data": [{"name": "d", "source": "s3://data/d.json"}],
                     "stages": [{"name": "sft", "type": "sft"}, {"name": "merge", "type": "export"}],
                     "storage": {"uri": "s3://ckpt/x/"}},
            "status": status}


class FakeApi:
    """The stand-in apiserver: state and a record of every request."""

    def __init__(self):
        self.jobs = {
            "llama": _job("llama", phase="Running", stage={"name": "sft", "index": 0, "count": 2},
                          progress={"step": 30, "totalSteps": 200, "percent": 15.0, "loss": 1.75,
                                    "learningRate": 1e-4, "etaSeconds": 160},
                          conditions=[{"type": "Running", "status": "True", "reason": "StageRunning",
                                       "message": "stage sft running", "lastTransitionTime": "2026-01-01T00:01:00Z"}],
                          stages=[{"name": "sft", "type": "sft", "phase": "Running", "startTime": "2026-01-01T00:01:00Z",
                                   "checkpoint": {"uri": "s3://ckpt/x/sft/checkpoints/checkpoint-20", "step": 20}}],
                          checkpoint={"uri": "s3://ckpt/x/sft/checkpoints/checkpoint-20", "step": 20}),
            "done-s3": _job("done-s3", phase="Succeeded", output={"uri": "s3://ckpt/x/merge/output"}),
            "forbidden": _job("forbidden", phase="Pending"),
        }
        self.requests: list[dict] = []
        self.pod_log = POD_LOG

    def app(self) -> Starlette:
        async def record(request: Request) -> dict:
            body = await request.body()
            entry = {"method": request.method, "path": request.url.path, "query": dict(request.query_params),
                     "contentType": request.headers.get("content-type"), "auth": request.headers.get("authorization"),
                     "body": json.loads(body) if body else None}
            self.requests.append(entry)
            return entry

        async def jobs(request: Request):
            r = await record(request)
            if request.method == "GET":
                return JSONResponse({"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJobList",
                                     "metadata": {}, "items": list(self.jobs.values())})
            doc = r["body"]
            if doc["spec"]["stages"][0].get("lora", {}).get("rank") == 0:
                return _status(422, "Invalid", 'FineTuneJob.kubetune.io "x" is invalid: spec.stages[0].lora.rank: '
                               "Invalid value: 0: should be greater than or equal to 1",
                               [{"field": "spec.stages[0].lora.rank", "reason": "FieldValueInvalid"}])
            if doc["metadata"]["name"] in self.jobs:
                return _status(409, "AlreadyExists", f'finetunejobs.kubetune.io "{doc["metadata"]["name"]}" already exists')
            doc = {**doc, "metadata": {**doc["metadata"], "uid": "new", "creationTimestamp": "2026-01-02T00:00:00Z"}}
            self.jobs[doc["metadata"]["name"]] = doc
            return JSONResponse(doc, status_code=201)

        async def job(request: Request):
            r = await record(request)
            name = request.path_params["name"]
            if name not in self.jobs:
                return _status(404, "NotFound", f'finetunejobs.kubetune.io "{name}" not found')
            if name == "forbidden" and request.method != "GET":
                return _status(403, "Forbidden", f'finetunejobs.kubetune.io "{name}" is forbidden: User "dev" cannot '
                               f'{request.method.lower()} resource "finetunejobs" in API group "kubetune.io" in the '
                               f'namespace "{NS}"')
            if request.method == "PATCH":
                self.jobs[name]["spec"].update(r["body"]["spec"])
            if request.method == "DELETE":
                del self.jobs[name]
                return JSONResponse({"kind": "Status", "status": "Success"})
            return JSONResponse(self.jobs.get(name))

        async def events(request: Request):
            await record(request)
            return JSONResponse({"kind": "EventList", "apiVersion": "v1", "metadata": {}, "items": [
                {"metadata": {"name": "e1", "namespace": NS, "creationTimestamp": "2026-01-01T00:01:00Z"},
                 "involvedObject": {"kind": "FineTuneJob", "name": "llama"}, "type": "Normal", "reason": "StageStarted",
                 "message": "stage sft started", "count": 2, "lastTimestamp": "2026-01-01T00:01:00Z"}]})

        async def pods(request: Request):
            await record(request)
            return JSONResponse({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": [
                {"metadata": {"name": "llama-sft-0-abcde", "namespace": NS, "creationTimestamp": "2026-01-01T00:01:00Z",
                              "annotations": {"batch.kubernetes.io/job-completion-index": "0"}},
                 "spec": {"containers": [{"name": "trainer", "image": "x"}]}, "status": {"phase": "Running"}}]})

        async def log(request: Request):
            await record(request)
            text = self.pod_log
            tail = request.query_params.get("tailLines")
            if tail:
                text = "\n".join(text.splitlines()[-int(tail):]) + "\n"
            return PlainTextResponse(text)

        return Starlette(routes=[
            Route(FTJ, jobs, methods=["GET", "POST"]),
            Route(FTJ + "/{name}", job, methods=["GET", "PATCH", "DELETE"]),
            Route(f"/api/v1/namespaces/{NS}/events", events),
            Route(f"/api/v1/namespaces/{NS}/pods", pods),
            Route(f"/api/v1/namespaces/{NS}/pods/{{pod}}/log", log),
        ])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def apiserver():
    fake = FakeApi()
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(fake.app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    fake.url = f"http://127.0.0.1:{port}"
    yield fake
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def kubeconfig(apiserver, tmp_path) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "dev",
        "clusters": [{"name": "c", "cluster": {"server": apiserver.url}}],
        "users": [{"name": "dev", "user": {"token": TOKEN}}],
        "contexts": [{"name": "dev", "context": {"cluster": "c", "user": "dev", "namespace": NS}}]}))
    return path


@pytest.fixture
def client(apiserver, kubeconfig):
    saved = copy.deepcopy(apiserver.jobs)
    apiserver.requests.clear()
    backend = ClusterBackend(str(kubeconfig), poll_seconds=0)
    yield TestClient(create_app(backend, grafana_url="http://grafana/d/kubetune"), base_url="http://127.0.0.1:8765")
    apiserver.jobs = saved


def test_info_names_the_context_and_its_namespace(client):
    assert client.get("/api/info").json() == {"mode": "cluster", "namespace": NS, "context": "dev", "saves": None,
                                              "grafanaUrl": "http://grafana/d/kubetune", "version": __version__}


def test_runs_list_has_the_columns_of_kubectl_get(client, apiserver):
    items = {i["name"]: i for i in client.get("/api/runs").json()["items"]}
    llama = items["llama"]
    assert llama == {"name": "llama", "namespace": NS, "phase": "Running", "stage": "sft (1/2)", "percent": 15.0,
                     "step": 30, "totalSteps": 200, "loss": 1.75, "eta": "2m40s", "age": llama["age"],
                     "created": "2026-01-01T00:00:00Z"}
    assert llama["age"].endswith("d")
    assert items["done-s3"]["eta"] == "-" and items["forbidden"]["stage"] == "-"
    assert all(r["auth"] == f"Bearer {TOKEN}" for r in apiserver.requests)  # the user's own credentials


def test_detail_has_status_stages_conditions_events_and_yaml(client):
    d = client.get("/api/runs/llama").json()
    assert d["phase"] == "Running" and d["spec"]["stages"][0]["name"] == "sft"
    assert yaml.safe_load(d["yaml"])["spec"] == d["spec"] and "status" not in yaml.safe_load(d["yaml"])
    assert d["stages"][0] == {"name": "sft", "type": "sft", "phase": "Running", "startTime": "2026-01-01T00:01:00Z",
                              "completionTime": None, "output": None,
                              "checkpoint": {"uri": "s3://ckpt/x/sft/checkpoints/checkpoint-20", "step": 20}}
    assert d["conditions"][0]["reason"] == "StageRunning"
    assert d["events"] == [{"type": "Normal", "reason": "StageStarted", "message": "stage sft started",
                            "time": "2026-01-01T00:01:00Z", "count": 2}]
    assert d["checkpoint"]["step"] == 20
    assert d["grafanaUrl"] == f"http://grafana/d/kubetune?var-namespace={NS}&var-job=llama"  # the dashboard's variables
    assert d["chatAvailable"] is False


def test_logs_are_the_rank0_pods_tail(client, apiserver):
    logs = client.get("/api/runs/llama/logs?tail=2").json()
    assert logs["pod"] == "llama-sft-0-abcde"
    assert logs["text"].splitlines() == POD_LOG.splitlines()[-2:]
    [pods] = [r for r in apiserver.requests if r["path"].endswith("/pods")]
    assert pods["query"]["labelSelector"] == "kubetune.io/job=llama,kubetune.io/stage=sft"


def test_history_from_the_pod_log_and_the_observed_status(client):
    h = client.get("/api/runs/llama/history").json()
    assert h["source"] == "pod-log"
    assert [(p["step"], p["loss"]) for p in h["points"]] == [(10, 2.5), (20, 2.1), (30, 1.75)]
    assert h["points"][-1]["learning_rate"] == 1e-4  # seen in the status at step 30


def test_observed_points_alone_when_the_log_has_none(client, apiserver, monkeypatch):
    monkeypatch.setattr(apiserver, "pod_log", "no progress lines\n")
    client.get("/api/runs")
    apiserver.jobs["llama"]["status"]["progress"].update(step=40, loss=1.5)
    client.get("/api/runs")
    h = client.get("/api/runs/llama/history").json()
    assert h["source"] == "observed"
    assert [(p["step"], p["loss"]) for p in h["points"]] == [(30, 1.75), (40, 1.5)]


def test_suspend_and_resume_are_merge_patches_of_spec_suspend(client, apiserver):
    assert client.post("/api/runs/llama/suspend").json() == {"ok": True}
    assert apiserver.jobs["llama"]["spec"]["suspend"] is True
    assert client.post("/api/runs/llama/resume").json() == {"ok": True}
    assert apiserver.jobs["llama"]["spec"]["suspend"] is False
    patches = [r for r in apiserver.requests if r["method"] == "PATCH"]
    assert [p["body"] for p in patches] == [{"spec": {"suspend": True}}, {"spec": {"suspend": False}}]
    assert all(p["contentType"] == "application/merge-patch+json" for p in patches)


def test_the_apiservers_refusals_pass_through_with_status_and_message(client, apiserver):
    denied = client.post("/api/runs/forbidden/suspend")
    assert denied.status_code == 403
    assert 'User "dev" cannot patch resource "finetunejobs"' in denied.json()["error"]
    assert client.delete("/api/runs/forbidden").status_code == 403
    assert "forbidden" in apiserver.jobs
    missing = client.get("/api/runs/ghost")
    assert missing.status_code == 404 and missing.json()["error"] == 'finetunejobs.kubetune.io "ghost" not found'


def test_create_sends_the_job_to_the_namespace_and_passes_422_back(client, apiserver, monkeypatch):
    job = copy.deepcopy(apiserver.jobs["llama"])
    job.pop("status")
    job["metadata"] = {"name": "fresh"}
    made = client.post("/api/runs", json={"job": job})
    assert made.status_code == 201 and made.json() == {"name": "fresh"}
    [post] = [r for r in apiserver.requests if r["method"] == "POST"]
    assert post["path"] == FTJ and post["body"]["metadata"] == {"name": "fresh", "namespace": NS}
    again = client.post("/api/runs", json={"job": job})
    assert again.status_code == 409 and "already exists" in again.json()["error"]
    # the apiserver's own 422 (a rule only the cluster knows): passed back with its field
    from kubetune.runtime.board import server

    monkeypatch.setattr(server.forms, "load_text", lambda text: (object(), []))
    job["metadata"] = {"name": "bad"}
    job["spec"]["stages"][0]["lora"] = {"rank": 0}
    refused = client.post("/api/runs", json={"job": job})
    assert refused.status_code == 422
    assert refused.json()["field"] == "spec.stages[0].lora.rank" and "greater than or equal to 1" in refused.json()["error"]


def test_delete_removes_the_job(client, apiserver):
    assert client.delete("/api/runs/llama").json() == {"ok": True}
    assert "llama" not in apiserver.jobs
    assert client.get("/api/runs/llama").status_code == 404


def test_chat_is_409_when_the_output_is_in_object_storage(client):
    answer = client.post("/api/runs/done-s3/chat", json={"messages": [{"role": "user", "content": "hi"}]})
    assert answer.status_code == 409
    assert "s3://ckpt/x/merge/output" in answer.json()["error"] and "kubetune chat" in answer.json()["error"]
    assert client.get("/api/runs/done-s3").json()["chatAvailable"] is False


def test_the_poller_records_points_while_the_board_runs(apiserver, kubeconfig):
    backend = ClusterBackend(str(kubeconfig), poll_seconds=0.1)
    with TestClient(create_app(backend), base_url="http://127.0.0.1:8765"):  # the lifespan starts the poller
        deadline = time.monotonic() + 10
        while not backend.observed and time.monotonic() < deadline:
            time.sleep(0.05)
    assert backend._stop.is_set()
    assert [p["step"] for p in backend.observed["llama/uid-llama"].values()] == [30]


def test_kubeconfig_usable_says_why_not(tmp_path, kubeconfig):
    assert kubeconfig_usable(str(kubeconfig), None) == (True, "")
    ok, why = kubeconfig_usable(str(tmp_path / "none"), None)
    assert ok is False and why


@pytest.mark.slow
def test_chat_streams_when_the_output_is_a_folder_this_machine_reads(client, apiserver, tiny_model):
    apiserver.jobs["local-out"] = _job("local-out", phase="Succeeded", output={"uri": f"file://{tiny_model}"})
    assert client.get("/api/runs/local-out").json()["chatAvailable"] is True
    answer = client.post("/api/runs/local-out/chat", json={"messages": [{"role": "user", "content": "Who are you?"}],
                                                          "maxNewTokens": 6})
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in answer.text.splitlines() if line.startswith("data: ")]
    assert events[-1].get("done") is True, events
    assert len(events) >= 2 and events[0].get("token")  # (the untrained model's bytes stream in one piece)
    assert events[-1]["text"] == "".join(e["token"] for e in events[:-1]).strip()
    from kubetune.runtime.chat import generate, load_for_chat

    m, tok = load_for_chat(str(tiny_model))
    assert events[-1]["text"] == generate(m, tok, [{"role": "user", "content": "Who are you?"}], 6)
    bad = client.post("/api/runs/local-out/chat", json={"messages": "hi"})
    assert bad.status_code == 400 and bad.json()["field"] == "messages"

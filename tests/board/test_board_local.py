"""Local mode for real: the board starts `kubetune run` of a tiny model (a LoRA SFT of a few CPU
steps), the runs list, detail, history and logs follow it, suspend really stops it at a committed
checkpoint, resume really continues from there, delete stops it and removes its folder, chat
streams tokens from the finished adapter, and a folder `kubetune run` made without the board
shows up too."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from kubetune.runtime.board.local import LocalBackend, _alive
from kubetune.runtime.board.server import create_app
from tests.conftest import job_doc, run_doc, write_alpaca

pytestmark = pytest.mark.slow

HP = {"batchSize": 4, "gradientAccumulation": 1, "loggingSteps": 1, "cutoffLen": 64, "gradientCheckpointing": False,
      "learningRate": 5e-3, "lrScheduler": "constant", "precision": "fp32"}


@pytest.fixture
def board(tmp_path, monkeypatch):
    for var in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "KUBETUNE_NPROC", "KUBETUNE_WORK_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    backend = LocalBackend(tmp_path / "saves", cwd=tmp_path)
    with TestClient(create_app(backend), base_url="http://127.0.0.1:8765") as client:
        yield client, backend, tmp_path
    for run in backend.runs():  # never leave a training process behind
        pid = run.state().get("pid")
        if _alive(pid):
            os.kill(pid, 9)


def _doc(tiny_model, data: Path, name: str, steps: int, every: int) -> dict:
    doc = job_doc(name, tiny_model, [{"name": "identity", "source": str(data), "format": "alpaca"}],
                  [{"name": "sft", "type": "sft", "method": "lora", "lora": {"rank": 8},
                    "hyperparameters": {**HP, "maxSteps": steps}}], Path("unused"),
                  checkpoint={"everySteps": every, "keep": 2}, resources={"gpusPerNode": 0})
    del doc["spec"]["storage"]  # the board puts it under --saves
    return doc


def _wait(client, name: str, until, timeout: float = 240.0, what: str = ""):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = client.get(f"/api/runs/{name}").json()
        if until(last):
            return last
        time.sleep(0.5)
    logs = client.get(f"/api/runs/{name}/logs?tail=40").json()["text"]
    raise AssertionError(f"timed out waiting for {what}: {json.dumps(last)[:2000]}\n{logs}")


def _events(resp) -> list[dict]:
    return [json.loads(line[len("data: "):]) for line in resp.text.splitlines() if line.startswith("data: ")]


def test_a_run_started_by_the_board_is_followed_to_the_end_and_chats(board, tiny_model):
    client, backend, tmp = board
    data = write_alpaca(tmp / "data" / "identity.json", repeat=2)
    created = client.post("/api/runs", json={"job": _doc(tiny_model, data, "tiny-sft", steps=24, every=12)})
    assert created.status_code == 201, created.text
    assert created.json() == {"name": "tiny-sft"}
    again = client.post("/api/runs", json={"job": _doc(tiny_model, data, "tiny-sft", steps=24, every=12)})
    assert again.status_code == 409 and again.json()["field"] == "metadata.name"

    [item] = client.get("/api/runs").json()["items"]
    assert item["name"] == "tiny-sft" and item["phase"] in ("Pending", "Running") and item["created"].endswith("Z")
    detail = _wait(client, "tiny-sft", lambda d: d["phase"] in ("Succeeded", "Failed"), what="the run to end")
    assert detail["phase"] == "Succeeded", client.get("/api/runs/tiny-sft/logs").json()["text"][-3000:]

    [item] = client.get("/api/runs").json()["items"]
    assert item["stage"] == "sft (1/1)" and item["step"] == 24 and item["totalSteps"] == 24
    assert item["percent"] == 100.0 and isinstance(item["loss"], float) and item["eta"] == "-"
    saves = tmp / "saves" / "tiny-sft"
    [stage] = detail["stages"]
    assert stage["name"] == "sft" and stage["phase"] == "Succeeded" and stage["completionTime"]
    assert stage["output"] == {"uri": str(saves / "sft" / "output")}
    assert stage["checkpoint"]["step"] == 24
    assert detail["output"] == {"uri": str(saves / "sft" / "output")} and detail["chatAvailable"] is True
    assert detail["spec"]["stages"][0]["hyperparameters"]["maxSteps"] == 24 and "tiny-sft" in detail["yaml"]
    assert [c["type"] for c in detail["conditions"]] == ["Succeeded"]
    assert {e["reason"] for e in detail["events"]} >= {"Started", "Exited"}

    history = client.get("/api/runs/tiny-sft/history").json()
    assert history["source"] == "trainer_log"
    logged = [json.loads(x) for x in (saves / "sft" / "output" / "trainer_log.jsonl").read_text().splitlines()]
    assert [p["step"] for p in history["points"] if "loss" in p] == [r["current_steps"] for r in logged if "loss" in r]
    assert all(p["learning_rate"] == pytest.approx(5e-3) for p in history["points"] if "loss" in p)

    logs = client.get("/api/runs/tiny-sft/logs?tail=5").json()
    assert logs["pod"] is None and 0 < len(logs["text"].splitlines()) <= 5
    assert "kubetune: finished 1 stage(s)" in client.get("/api/runs/tiny-sft/logs?tail=0").json()["text"]

    chat = client.post("/api/runs/tiny-sft/chat", json={"messages": [{"role": "user", "content": "Who are you?"}],
                                                         "maxNewTokens": 12})
    assert chat.status_code == 200 and chat.headers["content-type"].startswith("text/event-stream")
    events = _events(chat)
    tokens = [e["token"] for e in events if "token" in e]
    assert events[-1].get("done") is True, events
    assert len(tokens) >= 2 and events[-1]["text"] == "".join(tokens).strip()
    assert "Kubi" in events[-1]["text"]  # what 24 steps on the identity data taught it
    from kubetune.runtime.chat import generate, load_for_chat

    m, tok = load_for_chat(str(saves / "sft" / "output"))
    assert events[-1]["text"] == generate(m, tok, [{"role": "user", "content": "Who are you?"}], 12)  # greedy, same answer

    assert client.delete("/api/runs/tiny-sft").json() == {"ok": True}
    assert not saves.exists()
    assert client.get("/api/runs").json()["items"] == []


def test_suspend_checkpoints_and_stops_resume_continues_delete_stops_and_removes(board, tiny_model):
    client, backend, tmp = board
    data = write_alpaca(tmp / "identity.json", repeat=2)
    assert client.post("/api/runs", json={"job": _doc(tiny_model, data, "long", steps=2000, every=1000)}).status_code == 201

    def training(d):
        return d["phase"] == "Running" and (d["status"].get("progress") or {}).get("step", 0) >= 3
    detail = _wait(client, "long", training, what="a few steps")
    assert detail["status"]["progress"]["source"] == "progress-endpoint"  # the runtime's /progress
    [row] = client.get("/api/runs").json()["items"]
    assert row["phase"] == "Running" and row["totalSteps"] == 2000 and row["step"] >= 3 and row["eta"] not in ("-", "")
    pid = backend.runs()[0].state()["pid"]
    assert _alive(pid)

    assert client.post("/api/runs/long/suspend").json() == {"ok": True}
    suspended = _wait(client, "long", lambda d: d["phase"] == "Suspended" and not _alive(pid), what="the stop")
    step = suspended["checkpoint"]["step"]
    assert step and step >= 3  # SIGTERM: the step finished, saved and committed before the exit
    assert "stopped by SIGTERM" in client.get("/api/runs/long/logs").json()["text"]
    assert client.post("/api/runs/long/suspend").status_code == 409

    assert client.post("/api/runs/long/resume").json() == {"ok": True}
    new_pid = backend.runs()[0].state()["pid"]
    assert new_pid != pid
    _wait(client, "long", lambda d: d["phase"] == "Running"
          and (d["status"].get("progress") or {}).get("step", 0) > step, what="training after the resume")
    checkpoint = tmp / "saves" / "long" / "sft" / "checkpoints" / f"checkpoint-{step}"
    assert f"resuming from file://{checkpoint} (step {step})" in client.get("/api/runs/long/logs?tail=0").json()["text"]
    assert client.post("/api/runs/long/resume").status_code == 409  # already running

    assert client.delete("/api/runs/long").json() == {"ok": True}
    assert not _alive(new_pid)
    assert not (tmp / "saves" / "long").exists()
    assert client.get("/api/runs/long").status_code == 404


def test_a_run_made_by_kubetune_run_without_the_board_appears(board, tiny_model):
    client, backend, tmp = board
    data = write_alpaca(tmp / "identity.json")
    doc = job_doc("outside", tiny_model, [{"name": "identity", "source": str(data)}],
                  [{"name": "sft", "type": "sft", "method": "lora", "hyperparameters": {**HP, "maxSteps": 3}}],
                  tmp / "saves" / "outside", resources={"gpusPerNode": 0})
    assert run_doc(doc, tmp / "job") == 0
    [item] = client.get("/api/runs").json()["items"]
    assert item["name"] == "outside" and item["phase"] == "Succeeded" and item["step"] == 3
    detail = client.get("/api/runs/outside").json()
    assert detail["stages"][0]["name"] == "sft" and detail["chatAvailable"] is True and detail["yaml"] == ""
    assert client.get("/api/runs/outside/history").json()["source"] == "trainer_log"
    resume = client.post("/api/runs/outside/resume")
    assert resume.status_code == 409 and "not started by the board" in resume.json()["error"]


def test_a_run_that_fails_says_why(board, tiny_model):
    client, backend, tmp = board
    doc = _doc(tiny_model, tmp / "missing.json", "broken", steps=4, every=2)
    assert client.post("/api/runs", json={"job": doc}).status_code == 201
    detail = _wait(client, "broken", lambda d: d["phase"] in ("Succeeded", "Failed"), what="the failure")
    assert detail["phase"] == "Failed"
    [cond] = detail["conditions"]
    assert cond["type"] == "Failed" and "missing.json" in cond["message"]
    assert detail["stages"][0]["phase"] == "Failed" and detail["stages"][0]["message"] == cond["message"]
    assert backend.runs()[0].state()["exitCode"] == 42  # bad input (runtime/api/errors.py)
    assert {e["reason"]: e["type"] for e in detail["events"]}["Exited"] == "Warning"
    [row] = client.get("/api/runs").json()["items"]
    assert row["phase"] == "Failed" and row["eta"] == "-"

"""The board's HTTP API without training: the real Starlette app (TestClient) over a local saves
folder — form support (schema, LLaMA-Factory names, presets, validation exactly as `kubetune
validate` says it, plan, estimate), the JSON error shape, pages, and the Host/Origin guard."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from starlette.testclient import TestClient

from kubetune.runtime import __version__
from kubetune.runtime.board import forms
from kubetune.runtime.board.local import LocalBackend
from kubetune.runtime.board.server import allowed_hosts, create_app

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def client(tmp_path):
    app = create_app(LocalBackend(tmp_path / "saves", cwd=tmp_path), host="127.0.0.1", port=8765)
    return TestClient(app, base_url="http://127.0.0.1:8765")


def _job(**stage) -> dict:
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "demo"},
            "spec": {"model": {"name": "Qwen/Qwen2.5-0.5B-Instruct"},
                     "data": [{"name": "d", "source": "data/d.json", "format": "alpaca"}],
                     "stages": [{"name": "sft", "type": "sft", "method": "lora", **stage}]}}


def _cli_validate(tmp_path: Path, doc: dict) -> subprocess.CompletedProcess:
    f = tmp_path / "cli-job.yaml"
    f.write_text(yaml.safe_dump(doc, sort_keys=False))
    return subprocess.run([sys.executable, "-m", "kubetune.runtime", "validate", str(f)], capture_output=True,
                          text=True, timeout=120)


def test_info_says_local_mode_and_the_saves_folder(client, tmp_path):
    info = client.get("/api/info").json()
    assert info == {"mode": "local", "namespace": None, "context": None, "saves": str(tmp_path / "saves"),
                    "grafanaUrl": None, "version": __version__}


def test_validate_names_the_field_with_kubetune_validates_message(client, tmp_path):
    bad = _job(lora={"rank": "sixteen"}, hyperparameters={"learningRat": 1e-4})
    answer = client.post("/api/validate", json={"job": bad})
    assert answer.status_code == 200
    body = answer.json()
    assert body["ok"] is False
    fields = {e["field"]: e["message"] for e in body["errors"]}
    assert set(fields) == {"spec.stages[0].lora.rank", "spec.stages[0].hyperparameters.learningRat"}
    assert "did you mean `learningRate`" in fields["spec.stages[0].hyperparameters.learningRat"]
    cli = _cli_validate(tmp_path, bad)
    assert cli.returncode == 42
    for field, message in fields.items():  # the very line `kubetune validate` prints
        assert f"{field}: {message}" in cli.stderr
    assert body["plan"] == [] and body["estimate"] is None


def test_validate_a_yaml_text_and_a_yaml_error(client):
    ok = client.post("/api/validate", json={"yaml": yaml.safe_dump(_job())}).json()
    assert ok["ok"] is True and ok["errors"] == []
    broken = client.post("/api/validate", json={"yaml": "spec: [1"}).json()
    assert broken["ok"] is False
    assert broken["errors"][0]["field"] is None and broken["errors"][0]["message"].startswith("not valid YAML at line 1")


def test_validate_gives_the_plan_and_the_estimate_of_kubetune_estimate(client, tmp_path):
    body = client.post("/api/validate", json={"job": _job()}).json()
    assert body["ok"] is True
    [stage] = body["plan"]
    assert stage["name"] == "sft" and stage["type"] == "sft" and stage["method"] == "lora"
    assert stage["writes"] == str(tmp_path / "saves" / "demo" / "sft" / "output")  # local mode: under --saves
    assert stage["reads"]["model"] == "Qwen/Qwen2.5-0.5B-Instruct"
    from kubetune.runtime.estimate import GIB, estimate_job
    from kubetune.runtime.api.spec import parse_job

    _, [est] = estimate_job(parse_job(_job()))
    [shown] = body["estimate"]["stages"]
    assert shown["stage"] == "sft" and shown["perDevice"] == f"{est.total / GIB:.1f} GiB"
    assert set(shown["breakdown"]) == set(est.parts)


def test_estimate_unavailable_when_the_size_cannot_be_known_offline(client):
    job = _job()
    job["spec"]["model"]["name"] = "someorg/mystery-model"
    body = client.post("/api/validate", json={"job": job}).json()
    assert body["ok"] is True
    assert "cannot tell the size of 'someorg/mystery-model'" in body["estimate"]["unavailable"]


def test_schema_carries_descriptions_defaults_and_llamafactory_names(client):
    body = client.get("/api/schema").json()
    schema = body["schema"]
    stage = schema["properties"]["stages"]["items"]["properties"]
    rank = stage["lora"]["properties"]["rank"]
    assert rank["default"] == 8 and "rank" in rank["description"].lower()
    assert stage["hyperparameters"]["properties"]["cutoffLen"]["default"] == 2048
    assert "$ref" not in str(schema)
    names = body["llamafactoryNames"]
    assert names["stages[].lora.rank"] == "lora_rank"
    assert names["stages[].hyperparameters.learningRate"] == "learning_rate"
    assert names["stages[].preference.beta"] == "pref_beta"
    assert names["checkpoint.everySteps"] == "save_steps"


def test_llamafactory_names_are_what_kubetune_convert_converts(tmp_path):
    """Each name of the map, fed to `kubetune convert`, lands on the field the map says."""
    from kubetune.runtime.convert import convert_llamafactory

    values = {"lora_rank": 12, "learning_rate": 3e-4, "per_device_train_batch_size": 3, "cutoff_len": 333,
              "lora_dropout": 0.05, "save_steps": 77, "freeze_trainable_layers": 3}
    names = {lf: path for path, lf in forms.llamafactory_names().items()}
    for lf, value in values.items():
        cfg = {"model_name_or_path": "m", "dataset": "d", lf: value}
        if lf.startswith("freeze"):
            cfg["finetuning_type"] = "freeze"
        doc = convert_llamafactory(cfg, tmp_path)
        node = doc["spec"]
        for part in names[lf].split("."):
            node = node[part.removesuffix("[]")]
            if part.endswith("[]"):
                node = node[0]
        assert node == value, lf


def test_every_preset_validates_and_mirrors_its_example(client):
    presets = client.get("/api/presets").json()["presets"]
    assert [p["id"] for p in presets] == ["lora-sft", "qlora-sft", "sft-dpo-export"]
    examples = {f: yaml.safe_load((REPO / "examples" / f).read_text()) for f in ("quickstart.yaml", "sft-dpo-export.yaml")}
    assert presets[0]["job"] == examples["quickstart.yaml"]
    assert presets[2]["job"] == examples["sft-dpo-export.yaml"]
    assert presets[1]["job"]["spec"]["stages"][0]["method"] == "qlora"
    assert presets[1]["job"]["spec"]["stages"][0]["quantization"] == {"bits": 4}
    for p in presets:
        assert p["title"] and p["description"]
        body = client.post("/api/validate", json={"job": p["job"]}).json()
        assert body["ok"], (p["id"], body["errors"])
        assert [s["name"] for s in body["plan"]] == [s["name"] for s in p["job"]["spec"]["stages"]]
        assert body["estimate"]["stages"], p["id"]


def test_create_refuses_an_invalid_job_with_422_and_the_errors(client, tmp_path):
    answer = client.post("/api/runs", json={"job": _job(lora={"rank": 0})})
    assert answer.status_code == 422
    body = answer.json()
    assert body["field"] == "spec.stages[0].lora.rank"
    assert body["errors"][0]["field"] == "spec.stages[0].lora.rank"
    assert body["error"] == body["errors"][0]["message"]
    assert not (tmp_path / "saves" / "demo").exists()


def test_errors_are_json_with_a_field(client):
    missing = client.get("/api/runs/nope")
    assert missing.status_code == 404
    assert missing.json() == {"error": f"no run named 'nope' in {client.get('/api/info').json()['saves']}", "field": None}
    assert client.get("/api/nothing").status_code == 404 and "error" in client.get("/api/nothing").json()
    bad = client.post("/api/validate", content=b"not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and bad.json()["field"] is None
    assert client.post("/api/runs/nope/suspend").status_code == 404
    assert client.get("/api/runs/x/logs?tail=lots").json()["field"] == "tail"


def test_pages_are_one_frame_around_their_main(client, monkeypatch, tmp_path):
    from kubetune.runtime.board import server

    for path, name, title, scripts in (("/", "runs", "Runs", ["common.js", "runs.js"]),
                                       ("/runs/abc", "run", "Run", ["common.js", "chart.js", "run.js"]),
                                       ("/new", "new", "New run", ["common.js", "new.js"])):
        answer = client.get(path)
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/html")
        page = answer.text
        assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>") and "<!--" not in page
        assert f"<title>{title} · kubetune board</title>" in page and f'<body data-page="{name}">' in page
        assert (server.STATIC / f"{name}.part.html").read_text() in page.split("<main>\n")[1].split("  </main>")[0]
        assert re.findall(r'<script src="/static/([\w.]+)"></script>', page) == scripts
        assert all(client.get(f"/static/{s}").status_code == 200 for s in scripts)
    # a missing part: a JSON error that names the file
    monkeypatch.setattr(server, "STATIC", tmp_path)
    (tmp_path / "page.html").write_text((server.Path(server.__file__).parent / "static" / "page.html").read_text())
    answer = client.get("/new")
    assert answer.status_code == 404 and "new.part.html is missing" in answer.json()["error"]


def test_a_cross_origin_post_is_refused(client, tmp_path):
    evil = client.post("/api/runs", json={"job": _job()}, headers={"Origin": "http://evil.example"})
    assert evil.status_code == 403 and "cross-origin" in evil.json()["error"]
    assert not (tmp_path / "saves" / "demo").exists()
    assert client.delete("/api/runs/x", headers={"Origin": "null"}).status_code == 403
    site = client.post("/api/runs/x/suspend", headers={"Sec-Fetch-Site": "cross-site"})
    assert site.status_code == 403
    same = client.post("/api/validate", json={"job": _job()}, headers={"Origin": "http://127.0.0.1:8765"})
    assert same.status_code == 200


def test_a_foreign_host_header_is_refused_dns_rebinding(client):
    rebound = client.post("/api/validate", json={"job": _job()}, headers={"Host": "attacker.example:8765"})
    assert rebound.status_code == 403 and "Host" in rebound.json()["error"]
    assert client.get("/api/runs", headers={"Host": "attacker.example:8765"}).status_code == 403
    for host in ("localhost:8765", "127.0.0.1:8765", "[::1]:8765"):
        assert client.get("/api/runs", headers={"Host": host}).status_code == 200, host


def test_allowed_hosts_of_a_named_address():
    assert allowed_hosts("127.0.0.1", 9000) == {"127.0.0.1:9000", "localhost:9000", "[::1]:9000"}
    assert allowed_hosts("10.1.2.3", 9000) == {"10.1.2.3:9000"}


def test_the_board_imports_no_training_stack():
    code = ("import sys; import kubetune.runtime.board.server, kubetune.runtime.board.local, "
            "kubetune.runtime.board.cluster, kubetune.runtime.board.forms; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'trl') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_progress_lines_are_read_back_as_the_runtime_prints_them():
    """Cluster mode reads the loss curve from the pod's log: the lines of runtime/api/progress.py."""
    import io

    from kubetune.runtime.board.common import parse_progress_lines
    from kubetune.runtime.api.progress import ProgressLine, format_progress

    out = io.StringIO()
    line = ProgressLine(stream=out, min_interval=0.0, tty=False)
    for step, loss in ((5, 2.25), (10, 1.875), (15, None)):
        line.update({"stage": "dpo-2", "step": step, "totalSteps": 1200, "loss": loss, "tokensPerSecond": 5210.0,
                     "etaSeconds": 1830.0, "phase": "running"})
    line.update({"stage": "dpo-2", "step": 1200, "totalSteps": 1200, "loss": 0.5, "phase": "finished"})
    text = "12:00:00 INFO kubetune: unrelated\n" + out.getvalue()
    assert parse_progress_lines(text) == [{"stage": "dpo-2", "step": 5, "loss": 2.25},
                                          {"stage": "dpo-2", "step": 10, "loss": 1.875},
                                          {"stage": "dpo-2", "step": 1200, "loss": 0.5}]
    assert format_progress({"stage": "s", "step": 1, "totalSteps": 0, "loss": 3.0}).startswith("s [")
    assert parse_progress_lines(format_progress({"stage": "s", "step": 1, "totalSteps": 0, "loss": 3.0})) == [
        {"stage": "s", "step": 1, "loss": 3.0}]

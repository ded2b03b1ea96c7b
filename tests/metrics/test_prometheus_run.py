"""A real tiny training run scraped by a real Prometheus (see conftest.py).

- every panel query of dashboards/kubetune.json returns data through Prometheus' HTTP API;
- the scraped loss series matches trainer_log.jsonl;
- `promtool check metrics` finds no problem in the exposition;
- every metric the dashboard names exists in the exposition and in docs/metrics.md;
- `/progress` has the operator's contract shape during and after the run.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import JOB, MAX_STEPS, NAMESPACE, POD, PROGRESS_PROBE_STEP, STAGE, http_get

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "dashboards" / "kubetune.json"
DOCS = ROOT / "docs" / "metrics.md"

# Metrics the OPERATOR exports (not a training process): named by the dashboard, absent here.
OPERATOR_METRICS = {"kubetune_finetunejobs"}
# Metrics that exist only with hardware: series appear where the hardware is, the family
# (HELP/TYPE) is always exposed.
CUDA_METRICS = {"kubetune_gpu_memory_allocated_bytes", "kubetune_gpu_memory_reserved_bytes",
                "kubetune_gpu_memory_peak_allocated_bytes"}
NVML_METRICS = {"kubetune_gpu_utilization_ratio", "kubetune_gpu_power_watts",
                "kubetune_gpu_temperature_celsius", "kubetune_gpu_nvml_memory_used_bytes"}
METRIC_RE = re.compile(r"\bkubetune_[a-zA-Z0-9_]+")
GRAFANA_VARS = {"$__rate_interval": "30s", "$__interval": "1s", "$__range": "1h"}


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dash: dict) -> list[dict]:
    out = []
    for p in dash["panels"]:
        if p["type"] == "row":
            out.extend(p.get("panels", []))
        else:
            out.append(p)
    return out


def substitute(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return (expr.replace("$namespace", NAMESPACE).replace("${namespace}", NAMESPACE)
            .replace("$job", JOB).replace("${job}", JOB))


def exposition_names(text: str) -> tuple[set[str], set[str]]:
    """(family and sample names exposed, names with at least one sample)."""
    names, with_samples = set(), set()
    for fam in text_string_to_metric_families(text):
        names.add(fam.name)
        if fam.type == "counter":
            names.add(fam.name + "_total")
        for s in fam.samples:
            names.add(s.name)
            with_samples.add(s.name)
            with_samples.add(fam.name)
    return names, with_samples


def nvml_present() -> bool:
    try:
        import pynvml
        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetCount() > 0
    except Exception:
        return False


# ------------------------------------------------------------------------------------------


def test_prometheus_scraped_the_runtime_with_its_labels(scraped_run):
    prom = scraped_run.prom
    (target,) = prom.targets_up()
    assert target["health"] == "up", target
    info = prom.query(f'kubetune_stage_info{{job="{JOB}"}}')
    assert len(info) == 1
    labels = info[0]["metric"]
    # honor_labels keeps the FineTuneJob's name in `job`; the pod label comes from the target
    assert labels["job"] == JOB and labels["namespace"] == NAMESPACE and labels["stage"] == STAGE
    assert labels["type"] == "sft" and labels["method"] == "full" and labels["rank"] == "0"
    assert labels["pod"] == POD


def test_every_dashboard_panel_returns_data(scraped_run):
    prom, run = scraped_run.prom, scraped_run.run
    start, end = run.started - 2, time.time()
    have_nvml = nvml_present()
    checked, skipped, empty = [], [], []
    for panel in panels(load_dashboard()):
        panel_has_data, panel_skipped = False, []
        for target in panel["targets"]:
            expr = substitute(target["expr"])
            assert "$" not in expr, f"unsubstituted variable in {panel['title']}: {expr}"
            names = set(METRIC_RE.findall(expr))
            if names & OPERATOR_METRICS:
                panel_skipped.append((panel["title"], expr, "operator metric"))
                continue
            if names & CUDA_METRICS and not scraped_run.used_cuda:
                panel_skipped.append((panel["title"], expr, "no CUDA here"))
                continue
            if names & NVML_METRICS and not have_nvml:
                panel_skipped.append((panel["title"], expr, "no NVML here"))
                continue
            result = prom.query_range(expr, start, end, 1)
            points = sum(len(r["values"]) for r in result)
            if points == 0:
                empty.append((panel["title"], expr))
            else:
                panel_has_data = True
            checked.append((panel["title"], expr, points))
        skipped.extend(panel_skipped)
        assert panel_has_data or panel_skipped, f"panel without data: {panel['title']}"
    assert not empty, "dashboard queries without data:\n" + "\n".join(map(str, empty))
    # Only hardware- and operator-only targets may be skipped, and they are few.
    skipped_titles = {s[0] for s in skipped}
    allowed = {"GPU memory per pod", "GPU utilisation (NVML)", "GPU power (NVML)",
               "GPU temperature (NVML)", "Jobs by phase"}
    assert skipped_titles <= allowed, skipped
    assert len(checked) >= 20, checked
    # The GPU memory panel is never empty: its unified-memory series comes from /proc/meminfo.
    assert any(c[0] == "GPU memory per pod" and c[2] > 0 for c in checked)


def test_loss_series_matches_trainer_log(scraped_run):
    prom, log = scraped_run.prom, scraped_run.trainer_log
    sel = f'{{job="{JOB}", namespace="{NAMESPACE}", stage="{STAGE}", rank="0"}}'
    train = {row["step"]: row["loss"] for row in log if "loss" in row}
    evals = {row["step"]: row["eval_loss"] for row in log if "eval_loss" in row}
    assert len(train) == MAX_STEPS and len(evals) == MAX_STEPS // 10

    loss = prom.raw_samples(f"kubetune_train_loss{sel}")
    steps = prom.raw_samples(f"kubetune_train_global_step{sel}")
    eval_loss = prom.raw_samples(f"kubetune_eval_loss{sel}")
    pairs = [(int(steps[t]), v) for t, v in sorted(loss.items()) if t in steps]
    # Each scrape pairs a step with exactly the loss the trainer logged at that step.
    for step, value in pairs:
        assert step in train, (step, value)
        assert math.isclose(value, train[step], rel_tol=1e-9), (step, value, train[step])
    seen_steps = sorted({s for s, _ in pairs})
    assert len(seen_steps) >= 5, f"too few scrapes during training: {seen_steps}"
    assert seen_steps[-1] == MAX_STEPS
    assert pairs[-1][1] == pytest.approx(train[MAX_STEPS], rel=1e-9)
    assert [s for s, _ in pairs] == sorted(s for s, _ in pairs), "steps went backwards"
    # Eval loss: every scraped value is one the trainer logged; the last is the last one.
    assert {round(v, 12) for v in eval_loss.values()} <= {round(v, 12) for v in evals.values()}
    assert list(eval_loss.values())[-1] == pytest.approx(evals[max(evals)], rel=1e-9)
    # Learning rate and grad norm too (last values).
    last = log[[i for i, r in enumerate(log) if "loss" in r][-1]]
    for metric, key in (("kubetune_train_learning_rate", "learning_rate"),
                        ("kubetune_train_grad_norm", "grad_norm")):
        series = prom.raw_samples(f"{metric}{sel}")
        assert list(series.values())[-1] == pytest.approx(last[key], rel=1e-9), metric


def test_throughput_eta_and_uploads_are_consistent(scraped_run):
    prom, run, log = scraped_run.prom, scraped_run.run, scraped_run.trainer_log
    sel = f'{{job="{JOB}", rank="0"}}'
    tokens_seen = max(r.get("num_input_tokens_seen", 0) for r in log)
    (tokens,) = prom.query(f"kubetune_train_tokens_total{sel}")
    assert float(tokens["value"][1]) == tokens_seen > 0
    (samples,) = prom.query(f"kubetune_train_samples_total{sel}")
    assert float(samples["value"][1]) == MAX_STEPS * 8
    tps = prom.raw_samples(f"kubetune_train_tokens_per_second{sel}")
    duration = run.finished - run.started
    # per-second rates lie around the run's average (paced steps; generous bounds)
    assert all(0 < v < 50 * tokens_seen / duration for v in tps.values()), tps
    eta = prom.raw_samples(f"kubetune_train_eta_seconds{sel}")
    assert list(eta.values())[-1] == 0
    assert max(eta.values()) > 0 and max(eta.values()) < 20 * duration
    ratio = prom.raw_samples(f"kubetune_train_progress_ratio{sel}")
    assert list(ratio.values())[-1] == 1.0 and min(ratio.values()) < 1.0
    # checkpoint uploads from the real uploader
    assert len(run.uploads) == MAX_STEPS // 10
    (count,) = prom.query(f"kubetune_checkpoint_upload_duration_seconds_count{sel}")
    assert float(count["value"][1]) == len(run.uploads)
    (nbytes,) = prom.query(f"kubetune_checkpoint_uploaded_bytes_total{sel}")
    assert float(nbytes["value"][1]) == sum(u.bytes for u in run.uploads) > 0
    (last_size,) = prom.query(f"kubetune_checkpoint_last_upload_size_bytes{sel}")
    assert float(last_size["value"][1]) == run.uploads[-1].bytes
    (mem,) = prom.query(f"kubetune_process_resident_memory_bytes{sel}")
    assert float(mem["value"][1]) > 50 * 2**20


def test_promtool_check_metrics(scraped_run):
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: apt-get install -y --no-install-recommends prometheus"
    text = scraped_run.exposition
    assert "kubetune_train_loss{" in text
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), (
        proc.returncode, proc.stdout, proc.stderr)


def test_promtool_rejects_a_bad_exposition():
    """The check above can fail: promtool flags a counter without `_total`."""
    promtool = shutil.which("promtool")
    assert promtool
    bad = "# HELP kubetune_bad Bad.\n# TYPE kubetune_bad counter\nkubetune_bad 1\n"
    proc = subprocess.run([promtool, "check", "metrics"], input=bad, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0 and "_total" in proc.stdout + proc.stderr


def test_dashboard_is_valid_and_names_only_exposed_metrics(scraped_run):
    dash = load_dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"namespace", "job"} <= set(variables)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    names, with_samples = exposition_names(scraped_run.exposition)
    named = set()
    for panel in panels(dash):
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            assert "$namespace" in target["expr"] or METRIC_RE.findall(target["expr"])[0] in OPERATOR_METRICS
            named.update(METRIC_RE.findall(target["expr"]))
    for var in ("namespace", "job"):
        named.update(METRIC_RE.findall(variables[var]["definition"]))
    missing = {n for n in named - OPERATOR_METRICS if n not in names}
    assert not missing, f"the dashboard names metrics the runtime does not expose: {missing}"
    # the operator-only list is honest: those really are not runtime metrics
    assert not (OPERATOR_METRICS & names)
    assert OPERATOR_METRICS <= named
    # everything the dashboard needs, except hardware-only series, had samples in this run
    hardware = CUDA_METRICS | NVML_METRICS
    no_samples = {n for n in named - OPERATOR_METRICS - hardware if n not in with_samples}
    assert not no_samples, no_samples


def test_docs_list_every_exposed_metric(scraped_run):
    names, _ = exposition_names(scraped_run.exposition)
    documented = set(METRIC_RE.findall(DOCS.read_text()))
    families = {f.name + ("_total" if f.type == "counter" else "")
                for f in text_string_to_metric_families(scraped_run.exposition)}
    families = {n for n in families if not n.endswith("_created")}
    assert families, "empty exposition"
    missing = {n for n in families if n not in documented}
    assert not missing, f"metrics not in docs/metrics.md: {missing}"
    assert OPERATOR_METRICS <= documented


PROGRESS_KEYS = ["job", "stage", "rank", "phase", "step", "totalSteps", "epoch", "loss",
                 "learningRate", "tokensPerSecond", "etaSeconds", "checkpoint", "output",
                 "eval", "updatedAt"]


def check_progress_shape(doc: dict) -> None:
    assert sorted(doc) == sorted(PROGRESS_KEYS), sorted(doc)
    assert doc["job"] == JOB and doc["stage"] == STAGE and doc["rank"] == 0
    assert doc["phase"] in ("running", "finished", "failed")
    assert isinstance(doc["step"], int) and isinstance(doc["totalSteps"], int)
    for key in ("epoch", "loss", "learningRate", "tokensPerSecond", "etaSeconds"):
        assert doc[key] is None or isinstance(doc[key], (int, float)), key
    assert doc["checkpoint"] is None or (sorted(doc["checkpoint"]) == ["step", "uri"]
                                         and isinstance(doc["checkpoint"]["step"], int))
    assert doc["output"] is None or sorted(doc["output"]) == ["uri"]
    datetime.strptime(doc["updatedAt"], "%Y-%m-%dT%H:%M:%SZ")


def test_progress_endpoint_contract(scraped_run):
    during, after = scraped_run.progress_during, scraped_run.progress_after
    check_progress_shape(during)
    assert during["phase"] == "running" and during["totalSteps"] == MAX_STEPS
    assert PROGRESS_PROBE_STEP - 1 <= during["step"] <= PROGRESS_PROBE_STEP
    assert during["loss"] > 0 and during["tokensPerSecond"] > 0 and during["etaSeconds"] > 0
    assert during["checkpoint"] is None and during["output"] is None

    check_progress_shape(after)
    log = scraped_run.trainer_log
    final_loss = [r["loss"] for r in log if "loss" in r][-1]
    assert after["phase"] == "finished" and after["step"] == after["totalSteps"] == MAX_STEPS
    assert after["loss"] == pytest.approx(final_loss) and after["etaSeconds"] == 0
    last = scraped_run.run.uploads[-1]
    assert last.step == MAX_STEPS
    assert after["checkpoint"] == {"uri": last.uri, "step": MAX_STEPS}
    assert after["output"]["uri"].endswith("sft/model")
    # the steps the operator would have seen only go forward
    seen = [d["step"] for d in scraped_run.run.progress_docs]
    assert seen == sorted(seen) and seen[-1] == MAX_STEPS
    status, ctype, body = http_get(scraped_run.server.url + "/healthz")
    assert status == 200 and body.strip() == "ok"


def test_progress_line_shows_the_same_numbers(scraped_run):
    line = scraped_run.metrics.progress_line()
    doc = scraped_run.progress_after
    assert f"step {MAX_STEPS}/{MAX_STEPS}" in line and "100%" in line
    assert f"loss {doc['loss']:.4f}" in line and "tok/s" in line and "finished" in line


def test_render_png_from_the_run(scraped_run, tmp_path):
    """dashboards/render_png.py draws the main panels from this run's Prometheus data."""
    data = tmp_path / "panels.json"
    out = tmp_path / "dashboard.png"
    env = {**os.environ, "MPLBACKEND": "Agg"}
    sys.path.insert(0, str(ROOT / "dashboards"))
    try:
        import render_png
    finally:
        sys.path.pop(0)
    doc = render_png.collect_panel_data(scraped_run.prom.url, NAMESPACE, JOB,
                                        scraped_run.run.started - 2, time.time(),
                                        note="tiny Llama on " + ("CUDA" if scraped_run.used_cuda
                                                                 else "CPU")
                                        + ", scraped by Prometheus every second")
    data.write_text(json.dumps(doc))
    keep = os.environ.get("KUBETUNE_PANEL_DATA")
    if keep:
        Path(keep).write_text(json.dumps(doc))
    assert doc["panels"] and all(p["series"] for p in doc["panels"]), doc["panels"]
    pytest.importorskip("matplotlib")  # in the `train` extra; absent on some GPU images
    proc = subprocess.run([sys.executable, str(ROOT / "dashboards" / "render_png.py"), str(data),
                           str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000

"""Fast checks of the metrics server, the progress document and the callback's arithmetic.

Real objects throughout: the HTTP server on a free port, transformers' own TrainingArguments /
TrainerState / TrainerControl driving the callback, prometheus-client's parser reading the
exposition. No training here (see test_prometheus_run.py for that).
"""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kubetune.runtime.metrics import (MetricsCallback, default_port, read_meminfo,
                                      start_metrics_server)
from kubetune.runtime.api.progress import (PROGRESS_KEYS, ProgressLine, ProgressState,
                                       format_duration, format_progress)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels) -> float:
    hits = [v for (n, lab), v in samples(text).items()
            if n == name and all(dict(lab).get(k) == str(x) for k, x in labels.items())]
    assert len(hits) == 1, (name, labels, hits)
    return hits[0]


def make_args(tmp_path, **kw):
    from transformers import TrainingArguments
    return TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, report_to="none", **kw)


def test_server_routes_two_stages_and_stop(tmp_path):
    sft = MetricsCallback("job-a", "ns", "sft", "sft", "lora", rank=0)
    dpo = MetricsCallback("job-a", "ns", "dpo", "dpo", "lora", rank=0)
    server = start_metrics_server(0, "127.0.0.1")
    try:
        assert server.port > 0
        assert get(server.url + "/healthz") == (200, "ok\n")
        status, body = get(server.url + "/progress")
        assert status == 503 and "error" in json.loads(body)
        assert get(server.url + "/nope")[0] == 404

        server.attach(sft)
        text = get(server.url + "/metrics")[1]
        assert value(text, "kubetune_stage_info", stage="sft", type="sft", method="lora") == 1
        assert json.loads(get(server.url + "/progress")[1])["stage"] == "sft"

        # the next stage in the same process: its own registry, nothing of the first
        server.attach(dpo)
        text = get(server.url + "/metrics")[1]
        assert value(text, "kubetune_stage_info", stage="dpo", type="dpo") == 1
        assert 'stage="sft"' not in text
        assert json.loads(get(server.url + "/progress")[1])["stage"] == "dpo"
    finally:
        server.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(server.url + "/healthz", timeout=2)


def test_defaults_come_from_the_environment(monkeypatch):
    monkeypatch.delenv("KUBETUNE_METRICS_PORT", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert default_port() == 9400
    monkeypatch.setenv("KUBETUNE_METRICS_PORT", "9500")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert default_port() == 9503
    monkeypatch.setenv("POD_IP", "127.0.0.1")
    server = start_metrics_server(0)
    try:
        assert server.addr == "127.0.0.1"
        assert get(f"http://127.0.0.1:{server.port}/healthz")[0] == 200
    finally:
        server.stop()


def test_callback_step_rates_eta_and_deferred_publish(tmp_path):
    from transformers import TrainerControl, TrainerState

    cb = MetricsCallback("j", "ns", "sft", "sft", "full", rank=1)
    args = make_args(tmp_path, include_num_input_tokens_seen="non_padding")
    state = TrainerState(max_steps=100, global_step=0, epoch=0.0)
    cb.on_train_begin(args, state, TrainerControl())
    t0 = 1000.0
    cb._window.clear()
    cb._observe(state, now=t0)
    for step in range(1, 11):  # 10 steps, 2 s each, 500 tokens each
        state.global_step, state.epoch = step, step / 50
        state.num_input_tokens_seen = 500 * step
        cb._observe(state, now=t0 + 2 * step)
    cb._publish()
    doc = cb.progress.snapshot()
    assert doc["step"] == 10 and doc["totalSteps"] == 100
    assert doc["tokensPerSecond"] == pytest.approx(250.0)
    assert doc["etaSeconds"] == pytest.approx(90 * 2.0)
    from prometheus_client import generate_latest
    text = generate_latest(cb.registry).decode()
    lab = {"job": "j", "rank": "1"}
    assert value(text, "kubetune_train_tokens_total", **lab) == 5000
    assert value(text, "kubetune_train_samples_total", **lab) == 10 * 4 * 2
    assert value(text, "kubetune_train_samples_per_second", **lab) == pytest.approx(4.0)
    assert value(text, "kubetune_train_progress_ratio", **lab) == pytest.approx(0.1)

    # a logging step: on_step_end leaves step and loss to on_log, which publishes both
    control = TrainerControl(should_log=True)
    state.global_step = 11
    cb.on_step_end(args, state, control)
    text = generate_latest(cb.registry).decode()
    assert value(text, "kubetune_train_global_step", **lab) == 10
    assert not [k for k in samples(text) if k[0] == "kubetune_train_loss"]
    cb.on_log(args, state, control, logs={"loss": 1.25, "learning_rate": 1e-4,
                                          "grad_norm": 0.5})
    text = generate_latest(cb.registry).decode()
    assert value(text, "kubetune_train_global_step", **lab) == 11
    assert value(text, "kubetune_train_loss", **lab) == 1.25
    assert value(text, "kubetune_train_learning_rate", **lab) == 1e-4
    # a step that does not log is published at once
    state.global_step = 12
    cb.on_step_end(args, state, TrainerControl(should_log=False))
    assert value(generate_latest(cb.registry).decode(), "kubetune_train_global_step", **lab) == 12


def test_tokens_from_add_tokens_when_the_trainer_does_not_count(tmp_path):
    from transformers import TrainerControl, TrainerState

    cb = MetricsCallback("j", "ns", "sft", "sft", "full")
    args = make_args(tmp_path)  # include_num_input_tokens_seen off
    state = TrainerState(max_steps=10, global_step=0)
    cb.on_train_begin(args, state, TrainerControl())
    cb.add_tokens(300)
    state.global_step = 1
    cb.on_step_end(args, state, TrainerControl())
    from prometheus_client import generate_latest
    assert value(generate_latest(cb.registry).decode(), "kubetune_train_tokens_total") == 300

    fed = [0]
    cb2 = MetricsCallback("j", "ns", "sft", "sft", "full", total_tokens_fn=lambda: fed[0])
    cb2.on_train_begin(args, TrainerState(max_steps=10, global_step=0), TrainerControl())
    fed[0] = 1234
    cb2.on_step_end(args, TrainerState(max_steps=10, global_step=1), TrainerControl())
    assert value(generate_latest(cb2.registry).decode(), "kubetune_train_tokens_total") == 1234


def test_uploads_checkpoint_output_and_phase():
    from prometheus_client import generate_latest

    class Result:  # the fields of storage.uploader.UploadResult that the hook reads
        seconds, bytes, uri, step = 2.5, 4096, "s3://b/j/sft/checkpoints/checkpoint-200", 200

    cb = MetricsCallback("j", "ns", "sft", "sft", "full")
    cb.on_uploaded(Result())
    cb.record_upload(7.0, 1000)
    text = generate_latest(cb.registry).decode()
    assert value(text, "kubetune_checkpoint_upload_duration_seconds_count") == 2
    assert value(text, "kubetune_checkpoint_upload_duration_seconds_sum") == 9.5
    assert value(text, "kubetune_checkpoint_uploaded_bytes_total") == 5096
    assert value(text, "kubetune_checkpoint_last_upload_size_bytes") == 1000
    assert value(text, "kubetune_checkpoint_last_step") == 200
    doc = cb.progress.snapshot()
    assert doc["checkpoint"] == {"uri": Result.uri, "step": 200}
    cb.set_output("s3://b/j/sft/model")
    cb.set_phase("failed")
    doc = cb.progress.snapshot()
    assert doc["output"] == {"uri": "s3://b/j/sft/model"} and doc["phase"] == "failed"
    with pytest.raises(ValueError, match="running, finished, failed"):
        cb.set_phase("done")


def test_progress_state_is_json_safe_and_exact():
    state = ProgressState("j", "sft", 0)
    state.update(step=3, totalSteps=10, loss=float("nan"), etaSeconds=float("inf"),
                 tokensPerSecond=12.5)
    doc = state.snapshot()
    assert tuple(doc) == PROGRESS_KEYS
    assert doc["loss"] is None and doc["etaSeconds"] is None and doc["tokensPerSecond"] == 12.5
    json.dumps(doc, allow_nan=False)
    with pytest.raises(KeyError):
        state.update(percent=5)


def test_progress_line_formats():
    doc = {"stage": "sft", "phase": "running", "step": 420, "totalSteps": 1200, "loss": 0.91,
           "tokensPerSecond": 5210.0, "etaSeconds": 1830}
    line = format_progress(doc)
    assert line == "sft [#######-------------]   35%  step 420/1200  loss 0.9100  5,210 tok/s  ETA 30m30s"
    assert format_duration(None) is None and format_duration(7322) == "2h02m"
    assert format_duration(59) == "59s" and format_duration(3 * 86400 + 3600) == "3d01h"
    empty = format_progress({"stage": "dpo", "step": 0, "totalSteps": 0, "loss": None,
                             "tokensPerSecond": None, "etaSeconds": None, "phase": "running"})
    assert "step 0/?" in empty and "loss --" in empty and "ETA --" in empty

    out = io.StringIO()  # not a terminal: a line at most every min_interval, plus the last
    pl = ProgressLine(out, min_interval=3600)
    pl.update(doc)
    pl.update({**doc, "step": 421})
    pl.update({**doc, "step": 1200, "phase": "finished"})
    pl.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "step 420/1200" in lines[0] and lines[1].endswith("finished")


def test_meminfo_parses_proc():
    info = read_meminfo()
    assert info["MemTotal"] >= info["MemAvailable"] > 0
    assert read_meminfo("/nonexistent") == {}

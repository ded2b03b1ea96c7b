"""One real tiny training run, scraped by a real Prometheus, shared by the metrics tests.

The run: a 2-layer Llama trained with transformers' Trainer on CPU (CUDA when present) for
`MAX_STEPS` steps with `MetricsCallback` attached, checkpoints uploaded by the real
`CheckpointUploader` to `LocalStorage`, `/metrics` + `/progress` served by
`start_metrics_server`, and Prometheus scraping every second. Steps are paced to at least
`MIN_STEP_SECONDS` so that even a fast machine gives Prometheus several scrapes of the run.
"""

from __future__ import annotations

import json
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .prom import Prometheus

JOB, NAMESPACE, STAGE, POD = "tiny-sft", "ml-test", "sft", "tiny-sft-0"
MAX_STEPS = 40
MIN_STEP_SECONDS = 0.25
PROGRESS_PROBE_STEP = 5


@dataclass
class ScrapedRun:
    prom: Prometheus
    server: Any               # MetricsServer
    metrics: Any              # MetricsCallback
    run: Any                  # tinyrun.TinyRun
    trainer_log: list[dict]   # read back from trainer_log.jsonl
    exposition: str           # GET /metrics after the run
    progress_during: dict     # GET /progress at step PROGRESS_PROBE_STEP
    progress_after: dict      # GET /progress after the run
    out_dir: Path
    used_cuda: bool


def http_get(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.headers.get("Content-Type", ""), r.read().decode()


def _wait(what: str, pred, timeout: float = 30.0, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = pred()
            if last:
                return last
        except Exception as exc:  # noqa: BLE001 - retried until the deadline
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


@pytest.fixture(scope="package")
def scraped_run(tmp_path_factory) -> ScrapedRun:
    import torch

    from kubetune.runtime.metrics import MetricsCallback, start_metrics_server

    from . import tinyrun

    out = tmp_path_factory.mktemp("tinyrun")
    metrics = MetricsCallback(job=JOB, namespace=NAMESPACE, stage=STAGE, stage_type="sft",
                              method="full", rank=0)
    server = start_metrics_server(0, "127.0.0.1", metrics=metrics)
    prom = None
    try:
        prom = Prometheus(out / "prometheus", [f"127.0.0.1:{server.port}"],
                          target_labels={"pod": POD})
        _wait("the first scrape", lambda: prom.query(f'kubetune_stage_info{{job="{JOB}"}}'))

        probe: dict[str, Any] = {}
        last = [time.monotonic()]

        def on_step(step: int) -> None:
            if step == PROGRESS_PROBE_STEP:
                probe["doc"] = json.loads(http_get(server.url + "/progress")[2])
            pause = MIN_STEP_SECONDS - (time.monotonic() - last[0])
            if pause > 0:
                time.sleep(pause)
            last[0] = time.monotonic()

        run = tinyrun.train(out, metrics, max_steps=MAX_STEPS, save_steps=10, eval_steps=10,
                            on_step=on_step)
        last_ckpt = run.uploads[-1].step

        def final_scraped():
            step = prom.query(f'kubetune_train_global_step{{job="{JOB}"}}')
            ckpt = prom.query(f'kubetune_checkpoint_last_step{{job="{JOB}"}}')
            return (step and ckpt and float(step[0]["value"][1]) == MAX_STEPS
                    and float(ckpt[0]["value"][1]) == last_ckpt)

        _wait("a scrape of the finished run", final_scraped)
        trainer_log = [json.loads(line) for line in
                       (out / "trainer_log.jsonl").read_text().splitlines()]
        yield ScrapedRun(prom=prom, server=server, metrics=metrics, run=run,
                         trainer_log=trainer_log,
                         exposition=http_get(server.url + "/metrics")[2],
                         progress_during=probe.get("doc", {}),
                         progress_after=json.loads(http_get(server.url + "/progress")[2]),
                         out_dir=out, used_cuda=torch.cuda.is_available())
    finally:
        if prom is not None:
            prom.stop()
        server.stop()

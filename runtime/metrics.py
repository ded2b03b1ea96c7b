"""Prometheus metrics and the progress endpoint of a training process.

One `MetricsCallback` per stage and process: a ``transformers.TrainerCallback`` that keeps
every runtime metric in its own ``CollectorRegistry`` (so several stages in one process and
tests never collide) and the `/progress` document (`kubetune.runtime.api.progress`). One
`MetricsServer` per process serves ``/metrics``, ``/progress`` and ``/healthz`` of the stage that
is attached to it.

Stage code::

    metrics = MetricsCallback(job="llama3-identity", namespace="ml", stage="sft",
                              stage_type="sft", method="qlora", rank=int(os.environ.get("RANK", 0)))
    server = start_metrics_server(metrics=metrics)      # port: $KUBETUNE_METRICS_PORT (+ LOCAL_RANK)
    trainer = SFTTrainer(..., args=SFTConfig(..., include_num_input_tokens_seen="non_padding"),
                         callbacks=[metrics])
    uploader = CheckpointUploader(storage, "sft", on_uploaded=metrics.on_uploaded)
    try:
        trainer.train()
        ...
        metrics.set_output("s3://bucket/job/sft/model")
        metrics.set_phase("finished")
    except BaseException:
        metrics.set_phase("failed")
        raise

Every series carries the labels ``job``, ``namespace``, ``stage`` and ``rank``; per-GPU series
add ``device`` (an index). Nothing with unbounded cardinality. See docs/metrics.md.

Scrape consistency: updates from the training loop and the rendering of ``/metrics`` hold the
same lock, and the step/loss gauges of a logging step are published together in ``on_log``, so
one scrape never pairs a step with the loss of another step.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
from collections import deque
from typing import Any, Callable, Iterable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from socketserver import ThreadingMixIn

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from transformers import TrainerCallback

from .api.contract import ENV_METRICS_PORT, ENV_POD_IP, METRICS_PORT
from .api.progress import PHASES, ProgressLine, ProgressState, format_progress  # noqa: F401

log = logging.getLogger(__name__)

LABELS = ("job", "namespace", "stage", "rank")
UPLOAD_SECONDS_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
THROUGHPUT_WINDOW_SECONDS = 30.0


# --------------------------------------------------------------------------------------------
# resources read at scrape time: torch allocator, process RSS, /proc/meminfo, NVML


def read_meminfo(path: str = "/proc/meminfo") -> dict[str, int]:
    """MemTotal / MemAvailable (and the rest) of /proc/meminfo in bytes; {} where absent."""
    out: dict[str, int] = {}
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                fields = rest.split()
                if not fields:
                    continue
                value = int(fields[0])
                if len(fields) > 1 and fields[1].lower() == "kb":
                    value *= 1024
                out[key.strip()] = value
    except (OSError, ValueError):
        return {}
    return out


def read_rss_bytes() -> int | None:
    """Resident set size of this process (from /proc/self/statm; None where unavailable)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024
    except Exception:  # pragma: no cover - exotic platforms
        return None


def torch_gpu_memory() -> list[tuple[str, int, int, int]]:
    """``[(device, allocated, reserved, peak_allocated)]`` in bytes from the torch caching
    allocator, for each CUDA device this process uses; [] without torch, CUDA or an initialised
    CUDA context (a scrape never creates one)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return []
    try:
        cuda = torch.cuda
        if not (cuda.is_available() and cuda.is_initialized()):
            return []
        current = cuda.current_device()
        out = []
        for i in range(cuda.device_count()):
            reserved = int(cuda.memory_reserved(i))
            if reserved == 0 and i != current:
                continue
            out.append((str(i), int(cuda.memory_allocated(i)), reserved,
                        int(cuda.max_memory_allocated(i))))
        return out
    except Exception:  # a broken driver must not break the scrape
        log.debug("torch allocator stats unavailable", exc_info=True)
        return []


class _Nvml:
    """NVML through pynvml / nvidia-ml-py when importable; every failure means "no value"."""

    def __init__(self):
        self._lock = threading.Lock()
        self._nvml = None
        self._tried = False

    def _init(self):
        if not self._tried:
            self._tried = True
            try:
                import pynvml  # provided by the nvidia-ml-py package
                pynvml.nvmlInit()
                self._nvml = pynvml
            except Exception:
                self._nvml = None
        return self._nvml

    def read(self) -> list[dict[str, Any]]:
        """Per device: ``{"device", "utilization", "power_watts", "temperature_celsius",
        "memory_used_bytes"}``, each value None where not supported (GB10: framebuffer memory)."""
        with self._lock:
            nvml = self._init()
            if nvml is None:
                return []
            try:
                count = nvml.nvmlDeviceGetCount()
            except Exception:
                return []
            out = []
            for i in range(count):
                row: dict[str, Any] = {"device": str(i)}
                try:
                    handle = nvml.nvmlDeviceGetHandleByIndex(i)
                except Exception:
                    continue
                row["utilization"] = _try(lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
                row["power_watts"] = _try(lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0)
                row["temperature_celsius"] = _try(
                    lambda: float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)))
                row["memory_used_bytes"] = _try(lambda: float(nvml.nvmlDeviceGetMemoryInfo(handle).used))
                out.append(row)
            return out


def _try(fn: Callable[[], float]) -> float | None:
    try:
        return fn()
    except Exception:
        return None


_NVML = _Nvml()


class ResourceCollector(Collector):
    """Memory and GPU gauges, read when Prometheus scrapes (fresh even during a long step)."""

    def __init__(self, labels: dict[str, str], nvml: _Nvml | None = None):
        self.labels = labels
        self.nvml = nvml if nvml is not None else _NVML

    def _family(self, name: str, doc: str, extra: Iterable[str] = (), unit: str = ""):
        return GaugeMetricFamily(name, doc, labels=[*LABELS, *extra], unit=unit)

    def collect(self):
        base = [self.labels[k] for k in LABELS]

        rss = self._family("kubetune_process_resident_memory_bytes",
                           "Resident memory (RSS) of the training process.")
        value = read_rss_bytes()
        if value is not None:
            rss.add_metric(base, value)
        yield rss

        info = read_meminfo()
        total = self._family("kubetune_system_memory_total_bytes",
                             "MemTotal of /proc/meminfo (on unified-memory GPUs such as GB10: "
                             "the memory the GPU shares).")
        avail = self._family("kubetune_system_memory_available_bytes",
                             "MemAvailable of /proc/meminfo; used = total - available.")
        if "MemTotal" in info:
            total.add_metric(base, info["MemTotal"])
        if "MemAvailable" in info:
            avail.add_metric(base, info["MemAvailable"])
        yield total
        yield avail

        alloc = self._family("kubetune_gpu_memory_allocated_bytes",
                             "GPU memory held by live tensors (torch allocator).", ["device"])
        reserved = self._family("kubetune_gpu_memory_reserved_bytes",
                                "GPU memory reserved by the torch caching allocator.", ["device"])
        peak = self._family("kubetune_gpu_memory_peak_allocated_bytes",
                            "Peak of allocated GPU memory since the stage's training began "
                            "(torch allocator).", ["device"])
        for device, a, r, p in torch_gpu_memory():
            alloc.add_metric([*base, device], a)
            reserved.add_metric([*base, device], r)
            peak.add_metric([*base, device], p)
        yield alloc
        yield reserved
        yield peak

        util = self._family("kubetune_gpu_utilization_ratio",
                            "GPU utilisation 0..1 (NVML; absent without NVML).", ["device"])
        power = self._family("kubetune_gpu_power_watts", "GPU power draw (NVML).", ["device"])
        temp = self._family("kubetune_gpu_temperature_celsius", "GPU temperature (NVML).",
                            ["device"])
        used = self._family("kubetune_gpu_nvml_memory_used_bytes",
                            "GPU framebuffer memory used (NVML; not supported on unified-memory "
                            "GPUs such as GB10).", ["device"])
        for row in self.nvml.read():
            for fam, key in ((util, "utilization"), (power, "power_watts"),
                             (temp, "temperature_celsius"), (used, "memory_used_bytes")):
                if row.get(key) is not None:
                    fam.add_metric([*base, row["device"]], row[key])
        yield util
        yield power
        yield temp
        yield used


# --------------------------------------------------------------------------------------------
# the callback


class MetricsCallback(TrainerCallback):
    """Runtime metrics and progress of one stage in one process.

    Args:
        job, namespace: the FineTuneJob's name and namespace ("" in local mode is fine).
        stage, stage_type, method: the stage's name, type (sft, dpo, ...) and method (lora, ...).
        rank: the global rank of this process (``RANK``).
        total_tokens_fn: optional; returns the tokens trained on so far. Used only when the
            trainer does not count them itself (``include_num_input_tokens_seen`` off).
        registry: a registry to fill; default: a new one, `self.registry`.

    Tokens per second come, in this order of preference, from transformers' own
    ``state.num_input_tokens_seen`` (set ``include_num_input_tokens_seen="non_padding"`` in the
    training arguments; it is summed over all ranks), from `total_tokens_fn`, or from the
    tokens fed through `add_tokens`.
    """

    def __init__(self, job: str, namespace: str, stage: str, stage_type: str, method: str,
                 rank: int = 0, total_tokens_fn: Callable[[], int] | None = None,
                 registry: CollectorRegistry | None = None):
        self.labels = {"job": str(job), "namespace": str(namespace or ""), "stage": str(stage),
                       "rank": str(int(rank))}
        self.total_tokens_fn = total_tokens_fn
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.progress = ProgressState(job, stage, int(rank))
        self.lock = threading.RLock()
        self._added_tokens = 0
        reg = self.registry

        def gauge(name, doc):
            return Gauge(name, doc, LABELS, registry=reg)

        info = Gauge("kubetune_stage_info", "The stage this process runs (value 1).",
                     [*LABELS, "type", "method"], registry=reg)
        info.labels(**self.labels, type=str(stage_type), method=str(method)).set(1)

        self._g = {
            "loss": gauge("kubetune_train_loss", "Training loss at the last logging step."),
            "eval_loss": gauge("kubetune_eval_loss", "Loss on the evaluation set at the last "
                               "evaluation."),
            "learning_rate": gauge("kubetune_train_learning_rate",
                                   "Learning rate at the last logging step."),
            "grad_norm": gauge("kubetune_train_grad_norm",
                               "Gradient norm (before clipping) at the last logging step."),
            "step": gauge("kubetune_train_global_step", "Optimizer steps done (global step)."),
            "total_steps": gauge("kubetune_train_total_steps",
                                 "Optimizer steps this stage will do (max steps)."),
            "epoch": gauge("kubetune_train_epoch", "Epochs done, fractional."),
            "progress": gauge("kubetune_train_progress_ratio", "global step / total steps, 0..1."),
            "tokens_per_second": gauge("kubetune_train_tokens_per_second",
                                       "Input tokens trained on per second (all ranks; over the "
                                       "last 30 s)."),
            "samples_per_second": gauge("kubetune_train_samples_per_second",
                                        "Samples trained on per second (all ranks; over the last "
                                        "30 s)."),
            "eta": gauge("kubetune_train_eta_seconds",
                         "Estimated seconds until the last step (from the recent step rate)."),
            "ckpt_step": gauge("kubetune_checkpoint_last_step",
                               "Step of the last committed (uploaded) checkpoint."),
            "ckpt_seconds": gauge("kubetune_checkpoint_last_upload_duration_seconds",
                                  "Duration of the last checkpoint upload."),
            "ckpt_bytes": gauge("kubetune_checkpoint_last_upload_size_bytes",
                                "Size of the last uploaded checkpoint."),
        }
        self._tokens_total = Counter("kubetune_train_tokens", "Input tokens trained on (all "
                                     "ranks; non-padding with include_num_input_tokens_seen="
                                     "non_padding).", LABELS, registry=reg)
        self._samples_total = Counter("kubetune_train_samples", "Samples trained on (all ranks).",
                                      LABELS, registry=reg)
        self._upload_seconds = Histogram("kubetune_checkpoint_upload_duration_seconds",
                                         "Checkpoint upload durations (files, commit marker and "
                                         "LATEST).", LABELS, buckets=UPLOAD_SECONDS_BUCKETS,
                                         registry=reg)
        self._eval_score = Gauge("kubetune_eval_score_ratio",
                                 "Score of an eval stage on one dataset, 0..1: metric accuracy "
                                 "(multiple choice), rouge-1, rouge-2, rouge-l or bleu-4 (generation).",
                                 [*LABELS, "dataset", "metric"], registry=reg)
        self._eval_samples = Gauge("kubetune_eval_samples", "Samples an eval stage scored on one dataset.",
                                   [*LABELS, "dataset"], registry=reg)
        self._upload_bytes = Counter("kubetune_checkpoint_uploaded_bytes",
                                     "Bytes of committed checkpoint uploads.", LABELS, registry=reg)
        reg.register(ResourceCollector(self.labels))

        # what the next publish writes; None = not known yet (no series)
        self._values: dict[str, float | None] = {k: None for k in self._g}
        self._window: deque[tuple[float, int, float]] = deque()
        self._counted_tokens: float | None = None
        self._counted_samples = 0.0
        self._samples_per_step = 0
        self._trainer_counts_tokens = False

    # ---- inputs from the trainer side ----------------------------------------------------

    def add_tokens(self, n: int) -> None:
        """Count `n` more training tokens (for data collator wrappers; ignored when the trainer
        counts tokens itself with ``include_num_input_tokens_seen``)."""
        with self.lock:
            self._added_tokens += int(n)

    def record_upload(self, seconds: float, nbytes: int) -> None:
        """One committed checkpoint upload took `seconds` and moved `nbytes`."""
        with self.lock:
            lab = self.labels
            self._upload_seconds.labels(**lab).observe(float(seconds))
            self._upload_bytes.labels(**lab).inc(max(int(nbytes), 0))
            self._g["ckpt_seconds"].labels(**lab).set(float(seconds))
            self._g["ckpt_bytes"].labels(**lab).set(int(nbytes))

    def on_uploaded(self, result: Any) -> None:
        """Hook for ``CheckpointUploader(on_uploaded=...)``: records an ``UploadResult``
        (seconds, bytes) and makes it the checkpoint of `/progress`."""
        self.record_upload(result.seconds, result.bytes)
        self.set_checkpoint(result.uri, result.step)

    def set_checkpoint(self, uri: str, step: int) -> None:
        """The last committed checkpoint (shown in `/progress` and the operator's status)."""
        with self.lock:
            self.progress.set_checkpoint(uri, step)
            self._g["ckpt_step"].labels(**self.labels).set(int(step))

    def set_output(self, uri: str) -> None:
        """Where the stage's result lives (model, adapter or merged export)."""
        self.progress.set_output(uri)

    def set_eval(self, summary: dict[str, Any], datasets: dict[str, dict[str, Any]]) -> None:
        """An eval stage's results: `summary` (scores × 100 over all datasets) goes to
        `/progress`; each dataset's scores become ``kubetune_eval_score_ratio`` series (0..1)."""
        with self.lock:
            for name, res in datasets.items():
                for metric in ("accuracy", "rouge-1", "rouge-2", "rouge-l", "bleu-4"):
                    if res.get(metric) is not None:
                        self._eval_score.labels(**self.labels, dataset=name, metric=metric).set(res[metric] / 100.0)
                self._eval_samples.labels(**self.labels, dataset=name).set(int(res.get("samples") or 0))
        self.progress.set_eval(summary)

    def set_phase(self, phase: str) -> None:
        """``running`` (the default), ``finished`` or ``failed``."""
        self.progress.set_phase(phase)

    # ---- the trainer's events ---------------------------------------------------------------

    def _tokens_seen(self, state) -> float:
        if self._trainer_counts_tokens:
            return float(getattr(state, "num_input_tokens_seen", 0) or 0)
        if self.total_tokens_fn is not None:
            try:
                return float(self.total_tokens_fn())
            except Exception:
                log.debug("total_tokens_fn failed", exc_info=True)
        return float(self._added_tokens)

    def _tokens_known(self) -> bool:
        """Whether any source counts tokens (else no token series, not a misleading 0)."""
        return (self._trainer_counts_tokens or self.total_tokens_fn is not None
                or self._added_tokens > 0)

    def _observe(self, state, now: float | None = None) -> None:
        """Fold the trainer state into the pending values (step, rates, ETA, counters)."""
        now = time.monotonic() if now is None else now
        step = int(state.global_step or 0)
        tokens = self._tokens_seen(state)
        v = self._values
        v["step"] = step
        v["total_steps"] = int(state.max_steps or 0)
        if state.epoch is not None:
            v["epoch"] = float(state.epoch)
        if v["total_steps"]:
            v["progress"] = min(step / v["total_steps"], 1.0)

        # counters: add what is new since the last observation (the value at the start of
        # training, e.g. a resumed run's tokens, is the baseline)
        if self._counted_tokens is None:
            self._counted_tokens = tokens
        elif tokens > self._counted_tokens:
            self._tokens_total.labels(**self.labels).inc(tokens - self._counted_tokens)
            self._counted_tokens = tokens
        if self._tokens_known():
            self._tokens_total.labels(**self.labels)  # the series exists from the start
        window = self._window
        if window and step > window[-1][1] and self._samples_per_step:
            added = (step - window[-1][1]) * self._samples_per_step
            self._samples_total.labels(**self.labels).inc(added)

        if not window or step != window[-1][1]:
            window.append((now, step, tokens))
        while len(window) > 2 and now - window[1][0] >= THROUGHPUT_WINDOW_SECONDS:
            window.popleft()
        t0, s0, k0 = window[0]
        dt, ds = now - t0, step - s0
        if dt > 0 and ds > 0:
            if self._tokens_known():
                v["tokens_per_second"] = (tokens - k0) / dt
            if self._samples_per_step:
                v["samples_per_second"] = ds * self._samples_per_step / dt
            if v["total_steps"]:
                v["eta"] = max(v["total_steps"] - step, 0) * dt / ds
        if v["total_steps"] and step >= v["total_steps"]:
            v["eta"] = 0.0

    def _publish(self) -> None:
        for key, value in self._values.items():
            if value is not None:
                self._g[key].labels(**self.labels).set(value)
        v = self._values
        self.progress.update(step=v["step"] or 0, totalSteps=v["total_steps"] or 0,
                             epoch=v["epoch"], loss=v["loss"], learningRate=v["learning_rate"],
                             tokensPerSecond=v["tokens_per_second"], etaSeconds=v["eta"])

    def on_train_begin(self, args, state, control, **kwargs):
        with self.lock:
            self._samples_per_step = int(args.per_device_train_batch_size
                                         * args.gradient_accumulation_steps
                                         * max(int(getattr(args, "world_size", 1) or 1), 1))
            self._trainer_counts_tokens = getattr(
                args, "include_num_input_tokens_seen", "no") not in ("no", False, None)
            self._window.clear()
            self._counted_tokens = None
            self._samples_total.labels(**self.labels)  # the series exists from the start
            torch = sys.modules.get("torch")
            if torch is not None:
                try:
                    if torch.cuda.is_available() and torch.cuda.is_initialized():
                        for i in range(torch.cuda.device_count()):
                            torch.cuda.reset_peak_memory_stats(i)
                except Exception:
                    log.debug("could not reset peak memory stats", exc_info=True)
            self._observe(state)
            self.progress.set_phase("running")
            self._publish()

    def on_step_end(self, args, state, control, **kwargs):
        with self.lock:
            self._observe(state)
            # A logging step is published in on_log, together with its loss.
            if not control.should_log:
                self._publish()

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        with self.lock:
            v = self._values
            for key, name in (("loss", "loss"), ("eval_loss", "eval_loss"),
                              ("learning_rate", "learning_rate"), ("grad_norm", "grad_norm")):
                value = logs.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    v[name] = float(value)
            self._observe(state)
            self._publish()

    def on_train_end(self, args, state, control, **kwargs):
        with self.lock:
            self._observe(state)
            self._publish()

    # ---- exposition -------------------------------------------------------------------------

    def progress_line(self) -> str:
        """The `/progress` numbers as one terminal line (see `ProgressLine`)."""
        return format_progress(self.progress.snapshot())


# --------------------------------------------------------------------------------------------
# the HTTP server


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


def default_port() -> int:
    """``$KUBETUNE_METRICS_PORT`` (default 9400) plus ``$LOCAL_RANK``, so that several training
    processes in one pod each get their own port (local rank 0 on the base port)."""
    base = int(os.environ.get(ENV_METRICS_PORT) or METRICS_PORT)
    return base + int(os.environ.get("LOCAL_RANK") or 0)


class MetricsServer:
    """``/metrics`` (Prometheus exposition of the attached stage), ``/progress`` (its JSON
    progress document), ``/healthz``; one daemon thread. `attach` switches stages."""

    def __init__(self, port: int, addr: str, metrics: MetricsCallback | None = None):
        self._metrics = metrics
        self._apps: dict[int, Callable] = {}
        server_cls = _Server6 if ":" in addr else _Server
        self._httpd = make_server(addr, port, self._app, server_class=server_cls,
                                  handler_class=_QuietHandler)
        self.addr = addr
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="kubetune-metrics-server", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.addr in ("0.0.0.0", "") else self.addr
        if ":" in host:
            host = "[::1]" if host == "::" else f"[{host}]"
        return f"http://{host}:{self.port}"

    def attach(self, metrics: MetricsCallback | None) -> None:
        """Serve `metrics` from now on (the next stage in the same process), or nothing."""
        self._metrics = metrics

    def progress_snapshot(self) -> dict | None:
        """The `/progress` document of the attached stage (None when none is attached)."""
        metrics = self._metrics
        return metrics.progress.snapshot() if metrics is not None else None

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _app(self, environ, start_response):
        path = environ.get("PATH_INFO", "/")
        metrics = self._metrics
        if path == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"ok\n"]
        if path == "/progress":
            if metrics is None:
                return _json(start_response, "503 Service Unavailable",
                             {"error": "no stage is running in this process yet"})
            return _json(start_response, "200 OK", metrics.progress.snapshot())
        if path == "/metrics":
            if metrics is None:
                start_response("200 OK", [("Content-Type", "text/plain; version=0.0.4")])
                return [b""]
            app = self._apps.get(id(metrics.registry))
            if app is None:
                app = self._apps[id(metrics.registry)] = make_wsgi_app(metrics.registry)
            with metrics.lock:  # a consistent snapshot: never half of a training update
                return list(app(environ, start_response))
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found; try /metrics, /progress or /healthz\n"]


def _json(start_response, status: str, doc: dict) -> list[bytes]:
    body = json.dumps(doc).encode()
    start_response(status, [("Content-Type", "application/json"),
                            ("Content-Length", str(len(body))), ("Cache-Control", "no-store")])
    return [body]


def start_metrics_server(port: int | None = None, addr: str | None = None,
                         metrics: MetricsCallback | None = None) -> MetricsServer:
    """Start serving ``/metrics``, ``/progress`` and ``/healthz`` in a daemon thread.

    Args:
        port: TCP port; None: `default_port()` (``$KUBETUNE_METRICS_PORT`` or 9400, plus
            ``$LOCAL_RANK``); 0: a free port (read it from the returned server's ``port``).
        addr: address to bind; None: ``$POD_IP`` if set, else ``0.0.0.0``.
        metrics: the stage to serve (also later with `MetricsServer.attach`).

    Returns the running `MetricsServer` (``.port``, ``.url``, ``.attach()``, ``.stop()``).
    """
    if port is None:
        port = default_port()
    if addr is None:
        addr = os.environ.get(ENV_POD_IP) or "0.0.0.0"
    return MetricsServer(int(port), addr, metrics)

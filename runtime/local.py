"""Run stages: every stage of a job on this machine (`kubetune run`), or one resolved stage in a
pod (`python -m kubetune.runtime stage`). Both go through `execute_stage`, with the same storage
protocol: skip a stage whose output is committed, resume from the latest committed checkpoint,
upload checkpoints in the background, commit the output last.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from .api.contract import FINAL_PROGRESS_KEY, TERMINATION_MESSAGE_PATH, use_scratch
from .api.errors import Interrupted, OutOfMemory, UserError, classify, is_out_of_memory, termination_text
from .api.plan import ResolvedStage
from .api.stage_types import types_where

log = logging.getLogger("kubetune")


def setup_logging(level: int = logging.INFO) -> None:
    world = int(os.environ.get("WORLD_SIZE") or 1)
    rank = f" [rank {os.environ.get('RANK', '0')}/{world}]" if world > 1 else ""  # under torchrun
    logging.basicConfig(
        level=level, format=f"%(asctime)s %(levelname)s %(name)s{rank}: %(message)s", datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "urllib3", "botocore", "boto3", "s3transfer", "filelock", "datasets", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import warnings

    warnings.filterwarnings("ignore", message=".*is deprecated and will be removed in v6.*", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


class Resolver:
    """Turns model/adapter/data references into something from_pretrained can open."""

    def __init__(self, cfg: ResolvedStage, base_dir: Path | None):
        self.cfg = cfg
        self.base_dir = base_dir

    def _s3_options(self) -> dict[str, Any]:
        s = self.cfg.storage
        return {"endpoint": s.endpoint, "region": s.region, "addressing_style": s.addressing_style}

    def fetch(self, uri: str) -> Path:
        from .storage import fetch_to_cache

        return fetch_to_cache(uri, **self._s3_options())

    def __call__(self, ref: str, field: str) -> str:
        if ref.startswith("s3://"):
            return str(self.fetch(ref))
        if ref.startswith("file://"):
            ref = ref[len("file://"):]
        p = Path(ref).expanduser()
        if p.exists():
            return str(p.resolve())
        if not p.is_absolute() and self.base_dir is not None and (self.base_dir / p).exists():
            return str((self.base_dir / p).resolve())
        if ref.startswith((".", "/", "~")) or p.suffix:
            raise UserError(f"{ref} does not exist", field)
        return ref  # a Hugging Face id


def _work_dir(cfg: ResolvedStage, storage_is_local: bool) -> Path:
    base = os.environ.get("KUBETUNE_WORK_DIR")
    if base:
        return Path(base) / cfg.job / cfg.name
    if storage_is_local:
        return Path(cfg.io.stage_root.removeprefix("file://")).expanduser() / ".work"
    return Path.home() / ".cache" / "kubetune" / "work" / cfg.job / cfg.name


STORAGE_WAIT_ENV = "KUBETUNE_STORAGE_WAIT_SECONDS"
DEFAULT_STORAGE_WAIT_SECONDS = 300.0


def storage_wait_seconds() -> float:
    """How long a stage waits for unreachable storage at its start ($KUBETUNE_STORAGE_WAIT_SECONDS,
    default 300) before it exits retryable (StorageUnavailable)."""
    text = (os.environ.get(STORAGE_WAIT_ENV) or "").strip()
    if not text:
        return DEFAULT_STORAGE_WAIT_SECONDS
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"{text!r} is not a number of seconds", STORAGE_WAIT_ENV) from None
    if value < 0:
        raise UserError(f"{text!r}: use 0 or more seconds", STORAGE_WAIT_ENV)
    return value


# stages that train nothing (export, eval): one process (rank 0) does the work, the others wait for its commit
RANK0_STAGES = types_where(lambda i: not i.trains)


def execute_stage(
    cfg: ResolvedStage, base_dir: Path | None = None, server=None, console: str | None = None
) -> dict[str, Any]:
    """Run one stage under the storage protocol. Returns its summary (with `skipped` when its
    output was already committed). Metrics and `/progress` are served by `server` when given;
    `console` draws them on stderr: "bar" (redrawn on a terminal) or "lines".

    `cfg.outputs` (runPolicy.outputs): "reuse" skips a stage whose output is committed (saying
    so); "overwrite" skips it only when this run (`cfg.run`) committed it, and otherwise removes
    the output and checkpoints an earlier run left and trains the stage again from scratch (a
    retried pod of this run still resumes from this run's checkpoints)."""
    from .launcher import coordinator
    from .stages import stage_runner
    from .storage import find_committed_output, open_storage

    # Several training processes (torchrun): rank 0 decides, uploads and commits; the others
    # follow its decisions (broadcast) and wait for its uploads (barriers). One process: no-ops.
    team = coordinator()
    s = cfg.storage
    storage = open_storage(cfg.io.stage_root, endpoint=s.endpoint, region=s.region, addressing_style=s.addressing_style)
    # a missing bucket or rejected credentials fail here, before any training; an unreachable
    # endpoint is waited for (bounded), so a short outage does not cost one of the Job's retries
    if team.is_main:
        storage.wait_until_reachable(storage_wait_seconds())
    done = None
    if team.is_main:
        done = find_committed_output(storage, "")
        if done is not None and cfg.outputs == "overwrite" and run_of(done.manifest) != cfg.run:
            done = None
        if cfg.outputs == "overwrite" and done is None:
            remove_earlier_runs(storage, cfg)
    done_uri = team.broadcast(done.uri if done is not None else None)
    if done_uri is not None:
        log.info("stage %s: output already committed at %s, reusing it (runPolicy.outputs: %s)",
                 cfg.name, done_uri, cfg.outputs)
        return {"stage": cfg.name, "skipped": True, "output": done_uri}
    runner = stage_runner(cfg.stage.type, f"spec.stages[{cfg.index}].type")
    if team.distributed and cfg.stage.type in RANK0_STAGES:  # no trainer: rank 0 alone merges/evaluates
        summary = (_execute_single(cfg, base_dir, server, console, storage, runner)
                   if team.is_main else None)
        output = team.broadcast(summary["output"] if summary else None)  # the others wait here
        return summary or {"stage": cfg.name, "skipped": True, "output": output}
    return _execute_single(cfg, base_dir, server, console, storage, runner)


def run_of(manifest) -> str | None:
    """The run that committed a checkpoint or output (None: before runs were recorded)."""
    return (manifest.extra or {}).get("run")


def remove_earlier_runs(storage, cfg: ResolvedStage) -> None:
    """runPolicy.outputs: overwrite. The output and checkpoints of other runs go (an earlier
    run's higher-numbered checkpoints would otherwise outrank this run's when the newest are kept);
    this run's own checkpoints stay, for a retried pod to resume from."""
    from .storage.checkpoints import checkpoints_prefix, list_committed_checkpoints, output_prefix

    removed = storage.delete_prefix(output_prefix(""))
    others = [c for c in list_committed_checkpoints(storage, "") if run_of(c.manifest) != cfg.run]
    mine = len(list_committed_checkpoints(storage, "")) - len(others)
    if others and not mine:  # nothing of this run yet: the whole folder, torn uploads and LATEST too
        removed += storage.delete_prefix(checkpoints_prefix(""))
    else:
        for c in others:
            removed += storage.delete_prefix(c.prefix)
    if removed:
        log.warning("stage %s: runPolicy.outputs is overwrite: removed %d object(s) an earlier run left under %s; "
                    "training again", cfg.name, removed, storage.url(""))


def _execute_single(cfg: ResolvedStage, base_dir, server, console, storage, runner) -> dict[str, Any]:
    from transformers import TrainerCallback

    from .launcher import Coordinator, coordinator
    from .stages.base import StageContext
    from .storage import CheckpointUploader, download_latest_checkpoint
    from .storage import StorageIntegrityError
    from .storage.checkpoints import download_checkpoint
    from .storage.factory import is_local_uri
    from .tracking import tracking_environment

    team = coordinator()
    if cfg.stage.type in RANK0_STAGES and team.distributed:
        team = Coordinator({})  # rank 0 alone (see execute_stage)
    metrics = _stage_metrics(cfg)
    if server is not None:
        server.attach(metrics)
    callbacks = [metrics]
    if console:
        from .progress_bar import ConsoleProgress

        callbacks.append(ConsoleProgress(metrics, plain=console == "lines"))

    work = _work_dir(cfg, is_local_uri(cfg.io.stage_root))
    if team.multi_node:
        # nodes may share a disk (a shared cache volume, local storage, pods of one host): each
        # node empties and downloads into its own folder, never into another node's
        work = work / f"node-{team.node_rank}"
    if team.is_local_main:  # one scratch folder per node, emptied once
        shutil.rmtree(work, ignore_errors=True)  # scratch only: everything durable is in storage
        work.mkdir(parents=True, exist_ok=True)
    restored = None
    if team.is_main:  # (with overwrite, only this run's checkpoints are left)
        try:
            restored = download_latest_checkpoint(storage, "", work / "restore")
        except StorageIntegrityError as err:  # every committed checkpoint is corrupt: never bad input
            log.warning("stage %s: %s; training from scratch instead", cfg.name, err)
    # every rank resumes from rank 0's checkpoint; each other node downloads that one, once
    checkpoint = team.broadcast(restored.checkpoint if restored is not None else None)
    resume_from = None
    if checkpoint is not None:
        resume_from = work / "restore" / checkpoint.name
        if team.is_local_main and not team.is_main:
            resume_from = download_checkpoint(storage, checkpoint, resume_from)
        if team.is_main:
            resume_from = restored.path
        log.info("stage %s: resuming from %s (step %d)", cfg.name, checkpoint.uri, checkpoint.step)
    team.barrier()  # downloads done before any rank reads them
    if not team.is_main:  # its own trainer/output scratch: rank 0's are the ones uploaded
        work = work / "ranks" / str(team.rank)
        work.mkdir(parents=True, exist_ok=True)

    uploader = None
    if team.is_main:
        uploader = CheckpointUploader(
            storage,
            "",
            keep=cfg.checkpoint.keep,
            staging_dir=work / "staging",  # hard-linked snapshots: the trainer may rotate its folders
            retry_deadline=float(os.environ.get("KUBETUNE_UPLOAD_RETRY_SECONDS", "600")),
            on_uploaded=metrics.on_uploaded,
        )

    class CheckpointSync(TrainerCallback):
        """Hands every checkpoint the trainer saves to the background uploader. On SIGTERM
        (see `graceful_stop`): every rank stops at the same step end, the trainer saves, rank 0
        commits that checkpoint (waiting for the upload), and the stage ends `Interrupted`."""

        stopping = False

        def on_train_begin(self, args, state, control, **kwargs):
            _stop.training = True

        def on_train_end(self, args, state, control, **kwargs):
            _stop.training = False

        def on_step_end(self, args, state, control, **kwargs):
            stop = _stop.requested.is_set()
            if team.distributed:  # one decision for all ranks: they must save at the same step
                stop = team.any(stop)
            if stop:
                self.stopping = True
                control.should_save = True
                control.should_training_stop = True
            return control

        def on_save(self, args, state, control, **kwargs):
            committed = None
            if state.is_world_process_zero and uploader is not None:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if folder.is_dir():
                    uploader.submit(folder, state.global_step, extra={"run": cfg.run})
                    if self.stopping:
                        result = uploader.flush()
                        committed = result.uri if result is not None else None
            if self.stopping:
                _stop.training = False
                took = time.monotonic() - _stop.since if _stop.since else 0.0
                raise Interrupted(
                    f"stage {cfg.name} stopped by SIGTERM at step {state.global_step}"
                    + (f"; {committed} committed {took:.1f}s after the signal" if committed else "")
                    + "; it resumes from its last committed checkpoint", checkpoint=committed)

    resolver = Resolver(cfg, base_dir)
    ctx = StageContext(
        cfg=cfg,
        work_dir=work,
        resolve=resolver,
        callbacks=[CheckpointSync(), *callbacks],
        resume_from=resume_from,
        base_dir=base_dir,
        fetch=resolver.fetch,
    )
    try:
        try:
            with tracking_environment(cfg, ctx.output_dir, resumed=resume_from is not None):
                result = runner(ctx)
        except BaseException as err:
            if not isinstance(err, (OutOfMemory, UserError, Interrupted)) and is_out_of_memory(err):
                raise OutOfMemory(out_of_memory_message(cfg, err, resolver)) from err
            raise
        team.barrier()  # every rank has finished writing
        output_uri = None
        if uploader is not None:
            # waits for the last checkpoint, then commits the output (retrying through S3 outages)
            committed = uploader.commit_output(result.output_dir, step=result.summary.get("steps"),
                                               extra={"summary": result.summary, "run": cfg.run})
            uploader.close()
            output_uri = committed.uri
        output_uri = team.broadcast(output_uri)  # the other ranks wait here for the commit
        metrics.set_output(output_uri)
        metrics.set_phase("finished")
    except BaseException:
        metrics.set_phase("failed")
        try:
            if uploader is not None:
                uploader.close()
        except Exception as err:  # the original failure matters more
            log.warning("checkpoint upload also failed: %s", err)
        raise
    summary = dict(result.summary, output=output_uri)
    if team.is_main:
        log.info("stage %s: output committed to %s", cfg.name, output_uri)
    return summary


def _print_summary(summaries: list[dict[str, Any]], started: float) -> None:
    print("", file=sys.stderr)
    print(f"kubetune: finished {len(summaries)} stage(s) in {time.time() - started:.1f}s", file=sys.stderr)
    for s in summaries:
        if s.get("skipped"):
            print(f"  {s['stage']:<12} skipped (already done)  → {s['output']}", file=sys.stderr)
            continue
        loss = f"loss {s['first_loss']:.4f} → {s['final_loss']:.4f}" if s.get("final_loss") is not None else ""
        tps = f"{s['tokens_per_second']:.0f} tok/s" if s.get("tokens_per_second") else ""
        steps = f"{s['steps']} steps" if "steps" in s else ""
        scores = ", ".join(f"{k} {v:g}" for k, v in (s.get("eval") or {}).items())
        parts = "  ".join(p for p in (steps, loss, tps, scores) if p)
        print(f"  {s['stage']:<12} {parts}  → {s['output']}", file=sys.stderr)


def run_job(
    file: str,
    overrides: list[str] | None = None,
    output_root: str | None = None,
    only_stage: str | None = None,
    metrics_port: int | None = None,
    progress: bool = True,
) -> int:
    """`kubetune run`: every stage of the file, in order, on this machine."""
    from .api.plan import plan
    from .api.spec import load_job

    setup_logging()
    job = load_job(file, overrides)
    stages = plan(job, output_root, run=uuid.uuid4().hex)  # each `kubetune run` is a run of its own
    if only_stage is not None:
        names = [s.name for s in stages]
        if only_stage not in names:
            raise UserError(f"no stage named {only_stage!r}; stages: {', '.join(names)}", "--stage")
        stages = [s for s in stages if s.name == only_stage]
    from . import launcher

    if stages and not launcher.already_launched():
        topo = launcher.topology(stages[0].resources, cluster=False, rdzv_id=job.metadata.name)
        if topo.distributed:  # re-run this very command as every rank, under torchrun
            cli = ["run", str(Path(file).resolve()), *(f"--set={o}" for o in overrides or [])]
            cli += [f"--output-root={output_root}"] if output_root else []
            cli += [f"--stage={only_stage}"] if only_stage else []
            cli += [f"--metrics-port={metrics_port}"] if metrics_port is not None else []
            cli += [] if progress else ["--no-progress"]
            return launcher.launch(topo, cli)
    if launcher.already_launched():
        launcher.die_with_agent()
    team = launcher.coordinator()
    base_dir = Path(file).resolve().parent
    started = time.time()
    summaries = []
    server = None
    if metrics_port is not None:
        from .metrics import start_metrics_server

        port = metrics_port + team.local_rank if metrics_port else 0  # one port per local rank
        server = start_metrics_server(port=port, addr=os.environ.get("KUBETUNE_METRICS_ADDR", "127.0.0.1"))
        print(f"kubetune: metrics at {server.url}/metrics, progress at {server.url}/progress{launcher.rank_suffix()}",
              file=sys.stderr)
    graceful_stop()
    for cfg in stages:
        if team.is_main:
            print(f"kubetune: stage {cfg.index + 1}/{cfg.count} {cfg.name} ({cfg.stage.type}/{cfg.stage.method})",
                  file=sys.stderr)
        console = ("bar" if progress else "lines") if team.is_main else None  # one progress display
        try:
            summaries.append(execute_stage(cfg, base_dir, server, console))
        except UserError:
            raise
        except Exception as err:  # the table of failures decides the exit code (errors.classify)
            failure = classify(err)
            if failure.reason == "StageFailed":
                log.exception("stage %s failed", cfg.name)
            print(f"error: stage {cfg.name} failed ({failure.reason}, exit {failure.exit_code}): "
                  f"{termination_text(err)}", file=sys.stderr)
            return failure.exit_code
    team.leave()
    if team.is_main:
        _print_summary(summaries, started)
    if server is not None:
        server.stop()
    return 0


GIB = 1024**3


def peak_memory() -> str:
    """The peak memory this process saw: the torch allocator's on a GPU, the max RSS on the host
    (and the container's limit when there is one)."""
    parts = []
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            dev = torch.cuda.current_device()
            total = torch.cuda.get_device_properties(dev).total_memory
            parts.append(f"peak GPU memory allocated {torch.cuda.max_memory_allocated(dev) / GIB:.2f} GiB "
                         f"(reserved {torch.cuda.max_memory_reserved(dev) / GIB:.2f} GiB) of {total / GIB:.1f} GiB "
                         f"on {torch.cuda.get_device_name(dev)}")
    except Exception:  # noqa: BLE001 - a report must not fail
        pass
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    host = f"peak host memory (max RSS) {rss / GIB:.2f} GiB"
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            host += f" of the container's {int(limit) / GIB:.2f} GiB limit"
    except (OSError, ValueError):
        pass
    parts.append(host)
    return "; ".join(parts)


def out_of_memory_message(cfg: ResolvedStage, err: BaseException, resolve=None) -> str:
    """What an out-of-memory failure reports: what ran out, the peak seen, `kubetune estimate`'s
    figure for this stage and, for each knob that lowers it, the value to try and (when the model's
    shape is known) the estimate with it."""
    hp = cfg.stage.hyperparameters
    where = f"spec.stages[{cfg.index}]"
    kind = "host" if isinstance(err, MemoryError) else "GPU" if "cuda" in f"{type(err).__name__} {err}".lower() else "device"
    first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
    text = [f"stage {cfg.name} ran out of {kind} memory ({type(err).__name__}: {first}); {peak_memory()}"]
    estimate = None
    try:
        from .estimate import estimate_stage, model_arch

        arch = model_arch(resolve(cfg.io.policy.model, "spec.model.name") if resolve else cfg.model.name)

        def need(stage) -> float:
            return estimate_stage(arch, stage, cfg.model, cfg.resources).total

        estimate = need
        text.append(f"kubetune estimate: {need(cfg.stage) / GIB:.1f} GiB per device for this stage")
    except Exception as e:  # noqa: BLE001 - no shape (a hub id offline): advice without figures
        log.debug("no estimate for the OOM report: %s", e)
        text.append("run `kubetune estimate <job.yaml>` for the figure per device")

    def knob(label: str, field: str, stage_update: dict | None = None, hp_update: dict | None = None) -> str:
        line = f"{where}.{field}: {label}"
        if estimate is not None:
            changed = cfg.stage.model_copy(update={
                **(stage_update or {}),
                **({"hyperparameters": hp.model_copy(update=hp_update)} if hp_update else {})})
            try:
                line += f" (estimate {estimate(changed) / GIB:.1f} GiB)"
            except Exception:  # noqa: BLE001
                pass
        return line

    knobs = []
    if hp.batch_size > 1:
        half = max(1, hp.batch_size // 2)
        knobs.append(knob(f"batchSize {hp.batch_size} → {half} (gradientAccumulation "
                          f"{hp.gradient_accumulation} → {hp.gradient_accumulation * hp.batch_size // half} keeps "
                          "the effective batch)", "hyperparameters.batchSize", hp_update={"batch_size": half}))
    if hp.cutoff_len > 256:
        knobs.append(knob(f"cutoffLen {hp.cutoff_len} → {hp.cutoff_len // 2}", "hyperparameters.cutoffLen",
                          hp_update={"cutoff_len": hp.cutoff_len // 2}))
    if hp.gradient_checkpointing is not True:
        knobs.append(knob("gradientCheckpointing: true (recompute activations)",
                          "hyperparameters.gradientCheckpointing", hp_update={"gradient_checkpointing": True}))
    if cfg.stage.method in ("lora", "full", "freeze") and cfg.stage.type not in RANK0_STAGES:
        try:
            from .api.spec import QuantizationSpec

            knobs.append(knob("method: qlora with quantization.bits: 4 (4-bit base weights)", "method",
                              stage_update={"method": "qlora", "quantization": QuantizationSpec(bits=4)}))
        except Exception:  # noqa: BLE001
            knobs.append(f"{where}.method: qlora with quantization.bits: 4 (4-bit base weights)")
    if knobs:
        text.append("lower it with " + "; ".join(knobs))
    text.append("not retried: the same settings would run out of memory again")
    return ". ".join(text)


def _stage_metrics(cfg: ResolvedStage):
    from .metrics import MetricsCallback

    return MetricsCallback(
        job=cfg.job,
        namespace=cfg.namespace or "",
        stage=cfg.name,
        stage_type=cfg.stage.type,
        method=cfg.stage.method,
        rank=int(os.environ.get("RANK", "0")),
    )


def _write_termination_message(text: str) -> None:
    path = os.environ.get("KUBETUNE_TERMINATION_LOG", TERMINATION_MESSAGE_PATH)
    try:
        with open(path, "w") as f:
            f.write(text[-4000:])  # Kubernetes keeps at most 4096 bytes
    except OSError:
        pass


class _StopRequest:
    """SIGTERM's flag: set by the handler, read by the trainer callback at every step end."""

    def __init__(self):
        self.requested = threading.Event()
        self.training = False  # a trainer is between two steps: it can save and commit first
        self.since = 0.0


_stop = _StopRequest()


def graceful_stop() -> None:
    """Kubernetes stops a pod (delete, drain, suspend, preemption, eviction) with SIGTERM to the
    container's PID 1, which in the runtime image is this process, and the kernel ignores a signal
    that PID 1 has no handler for. While a trainer runs, SIGTERM asks it to finish its step, save
    a checkpoint and commit it (runPolicy.terminationGracePeriodSeconds leaves time for that),
    then the stage exits Interrupted (143, retryable) and the next run resumes from there. At any
    other moment (loading, downloading, committing the output), or on a second SIGTERM, it exits
    at once with 143; the stage resumes from its last committed checkpoint."""

    def stop(signum, frame):
        name = signal.Signals(signum).name
        if _stop.training and not _stop.requested.is_set():
            _stop.since = time.monotonic()
            _stop.requested.set()
            log.warning("%s: saving and committing a checkpoint at the end of this step, then stopping "
                        "(a second %s stops at once)", name, name)
            return
        log.warning("stage stopped by %s; it resumes from its last committed checkpoint", name)
        for h in logging.getLogger().handlers + log.handlers:
            h.flush()
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


exit_on_sigterm = graceful_stop  # the name the PID-1 tests know it by


def run_stage_config(config_path: str, metrics_port: int | None = None) -> int:
    """`python -m kubetune.runtime stage --config FILE`: what a stage pod runs."""
    setup_logging()
    graceful_stop()
    use_scratch()  # in a pod: every cache and temp file on the scratch volume, never the root fs
    try:
        try:
            text = Path(config_path).read_text()
        except OSError as err:
            raise UserError(f"cannot read the stage config: {err}", config_path) from None
        from pydantic import ValidationError

        try:
            cfg = ResolvedStage.model_validate_json(text)
        except ValidationError as err:
            from .api.spec import format_validation_error

            raise UserError("; ".join(format_validation_error(err)), config_path) from None
        from . import launcher

        if not launcher.already_launched():
            topo = launcher.topology(cfg.resources, cluster=True, rdzv_id=f"{cfg.job}-{cfg.name}")
            if topo.distributed:  # every GPU of this node (and every node) trains: torchrun
                cli = ["stage", f"--config={Path(config_path).resolve()}"]
                cli += [f"--metrics-port={metrics_port}"] if metrics_port is not None else []
                return launcher.launch(topo, cli)
        else:
            launcher.die_with_agent()
        from .metrics import start_metrics_server

        # the operator polls /progress on the pod IP (POD_IP) at $KUBETUNE_METRICS_PORT: local
        # rank 0 serves there, local rank N at that port + N
        if metrics_port:
            metrics_port += launcher.coordinator().local_rank
        server = start_metrics_server(port=metrics_port)
        summary = execute_stage(cfg, None, server, console="lines")
        launcher.coordinator().leave()
        log.info("stage %s finished: %s", cfg.name, summary)
        final = server.progress_snapshot()
        if final is not None and launcher.coordinator().rank == 0:
            _write_termination_message(json.dumps({FINAL_PROGRESS_KEY: final}, separators=(",", ":")))
        return 0
    except Exception as err:  # the table of failures decides the exit code (errors.classify)
        failure = classify(err)
        if failure.reason == "StageFailed":
            log.exception("stage failed")
        else:
            log.error("stage failed (%s, exit %d): %s", failure.reason, failure.exit_code, err)
        _write_termination_message(termination_text(err))
        return failure.exit_code

"""Background checkpoint uploads: off the training path, one at a time, outlasting outages.

Typical use from a transformers ``TrainerCallback``::

    uploader = CheckpointUploader(storage, "sft", keep=3, staging_dir=out / ".upload-staging")
    # on_save:
    uploader.submit(Path(args.output_dir) / f"checkpoint-{state.global_step}", state.global_step)
    # at the end of the stage (before reporting success):
    uploader.commit_output(final_dir)   # waits for checkpoints, then commits the output
    uploader.close()          # waits, raises CheckpointUploadError if the last upload failed
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .base import Storage, iter_local_files
from .checkpoints import (CommittedOutput, checkpoint_name, checkpoints_prefix, commit_checkpoint,
                          commit_output, hash_local_dir, output_prefix, prune_checkpoints)
from .errors import CheckpointUploadError, StorageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UploadResult:
    """What one committed checkpoint cost.

    Attributes:
        step, name: the checkpoint (``checkpoint-<step>``).
        uri: where it was committed.
        local_dir: the folder it was uploaded from (the staging snapshot, when one was used).
        files: number of files.
        bytes: total size of the checkpoint's files.
        seconds: wall time from the start of the upload to the moved ``LATEST`` (hashing and
            retries included).
        attempts: 1 when it went through at once; more when retries were needed.
        wait_seconds: how long the `submit` of this checkpoint blocked on the previous upload.
    """

    step: int
    name: str
    uri: str
    local_dir: str
    files: int
    bytes: int
    seconds: float
    attempts: int
    wait_seconds: float


@dataclass
class _Job:
    local_dir: Path
    source_dir: Path
    step: int
    extra: dict | None
    staged: bool
    wait_seconds: float


def _snapshot(src: Path, dst: Path) -> None:
    """Hard-link (or, across filesystems, copy) every file of `src` into `dst`."""
    if dst.exists():
        shutil.rmtree(dst)
    for rel, path in iter_local_files(src):
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)


class CheckpointUploader:
    """Commits checkpoints in one background thread while training goes on.

    * `submit` returns as soon as the worker is free: it blocks only while the previous upload
      is still running (so at most one checkpoint is in flight and one waits on disk).
    * A failed upload is retried with exponential backoff while its error is retryable
      (endpoint unreachable, throttling, 5xx), each retry logged at WARNING, until no progress
      was made for `retry_deadline` seconds. Permanent errors (missing bucket, rejected
      credentials) fail at once.
    * A failure is raised (as `CheckpointUploadError`) by the next `submit`, `flush` or
      `close`, so the stage fails instead of training on without durable checkpoints. The
      local checkpoint folder is never deleted by the uploader, so nothing is lost.
    * After each commit, older checkpoints are pruned down to `keep` (prune problems are
      logged, not fatal).

    Args:
        storage: where checkpoints go.
        stage_prefix: the stage's folder relative to the storage root.
        keep: committed checkpoints to keep (None: keep all).
        retry_deadline: give up after this many seconds without progress (default 10 min).
        backoff_initial, backoff_max: first and largest pause between retries (seconds).
        staging_dir: if set, `submit` first hard-links the checkpoint's files into
            ``staging_dir/<name>`` (copies across filesystems) and uploads from there, so the
            caller may delete or rotate the original right away (e.g. Trainer's
            ``save_total_limit``). The snapshot is removed after a successful commit and kept
            after a failure.
        on_uploaded: called in the worker thread with an `UploadResult` after each commit (a
            hook for metrics); exceptions in it are logged and ignored.
    """

    def __init__(self, storage: Storage, stage_prefix: str = "", *, keep: int | None = None,
                 retry_deadline: float = 600.0, backoff_initial: float = 1.0,
                 backoff_max: float = 60.0, staging_dir: str | os.PathLike | None = None,
                 on_uploaded: Callable[[UploadResult], None] | None = None):
        if keep is not None and (not isinstance(keep, int) or keep < 1):
            raise ValueError(f"keep must be a positive integer or None, not {keep!r}")
        self.storage = storage
        self.stage_prefix = stage_prefix
        self.keep = keep
        self.retry_deadline = retry_deadline
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.staging_dir = Path(staging_dir) if staging_dir is not None else None
        self.on_uploaded = on_uploaded
        self.results: list[UploadResult] = []
        self._cond = threading.Condition()
        self._job: _Job | None = None
        self._busy = False
        self._error: CheckpointUploadError | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="kubetune-checkpoint-uploader",
                                        daemon=True)
        self._thread.start()

    def __enter__(self) -> CheckpointUploader:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # do not mask the original exception; still wait for the upload in flight
            try:
                self.close()
            except StorageError as e:
                log.error("%s", e)

    @property
    def busy(self) -> bool:
        """True while an upload is queued or running."""
        with self._cond:
            return self._busy

    @property
    def last_result(self) -> UploadResult | None:
        """The most recent successful upload."""
        return self.results[-1] if self.results else None

    def _raise_pending_error(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def submit(self, local_dir: str | os.PathLike, step: int, *, extra: dict | None = None) -> float:
        """Queue the checkpoint folder `local_dir` (global step `step`) for commit.

        Blocks only while the previous upload is still running. Do not modify the folder until
        its upload finished (unless `staging_dir` is set; then it is free once this returns).

        Returns:
            Seconds spent waiting for the previous upload.

        Raises:
            CheckpointUploadError: an earlier upload failed for good (the stage should fail).
            RuntimeError: the uploader is closed.
        """
        checkpoint_name(step)  # validates step
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise FileNotFoundError(f"checkpoint folder {local_dir} does not exist")
        t0 = time.monotonic()
        with self._cond:
            if self._closed:
                raise RuntimeError("the checkpoint uploader is closed")
            while self._busy:
                self._cond.wait()
            self._raise_pending_error()
            waited = time.monotonic() - t0
            staged = self.staging_dir is not None
            upload_dir = local_dir
            if staged:
                upload_dir = self.staging_dir / checkpoint_name(step)
                _snapshot(local_dir, upload_dir)
            self._job = _Job(upload_dir, local_dir, step, extra, staged, waited)
            self._busy = True
            self._cond.notify_all()
        if waited > 0.05:
            log.info("checkpoint-%d waited %.1fs for the previous upload", step, waited)
        return waited

    def flush(self) -> UploadResult | None:
        """Wait until no upload is running; return the latest successful result.

        Raises:
            CheckpointUploadError: the last upload failed (message says why and where the local
                copy is).
        """
        with self._cond:
            while self._busy:
                self._cond.wait()
            self._raise_pending_error()
        return self.last_result

    def close(self) -> UploadResult | None:
        """`flush`, then stop the worker thread. Idempotent.

        Raises:
            CheckpointUploadError: the last upload failed.
        """
        try:
            return self.flush()
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()
            self._thread.join()

    # --- worker ------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._job is None and not self._closed:
                    self._cond.wait()
                if self._job is None:
                    return
                job = self._job
            try:
                result = self._upload(job)
            except CheckpointUploadError as e:
                log.error("%s", e)
                with self._cond:
                    self._error = e
            except Exception as e:  # a bug: surface it instead of dying silently
                log.exception("checkpoint upload crashed")
                with self._cond:
                    self._error = CheckpointUploadError(
                        f"uploading {checkpoint_name(job.step)} crashed ({type(e).__name__}: "
                        f"{e}); the local copy is kept at {job.local_dir}",
                        local_dir=str(job.local_dir), retryable=False)
            else:
                self.results.append(result)
                if self.on_uploaded is not None:
                    try:
                        self.on_uploaded(result)
                    except Exception:
                        log.exception("the on_uploaded hook failed (ignored)")
                self._prune()
            with self._cond:
                self._job = None
                self._busy = False
                self._cond.notify_all()

    def _prune(self) -> None:
        if self.keep is None:
            return
        try:
            prune_checkpoints(self.storage, self.stage_prefix, self.keep)
        except (StorageError, OSError) as e:
            log.warning("pruning old checkpoints failed (will retry after the next one): %s", e)

    def _with_retries(self, what: str, target: str, local_dir: Path, kept: str, attempt_fn):
        """Run `attempt_fn(uploaded)` until it succeeds, retrying retryable StorageErrors with
        exponential backoff until no file completed for `retry_deadline` seconds.

        Returns (result, attempts, files_hashed)."""
        t0 = time.monotonic()
        try:
            files = hash_local_dir(local_dir)
        except (OSError, ValueError) as e:
            raise CheckpointUploadError(
                f"cannot read the local folder {local_dir} to upload it to {target}: {e}",
                uri=target, local_dir=str(local_dir), retryable=False) from e
        uploaded: set[str] = set()
        attempt = 0
        last_progress = time.monotonic()
        while True:
            attempt += 1
            done_before = len(uploaded)
            try:
                return attempt_fn(files, uploaded), attempt, files
            except StorageError as e:
                now = time.monotonic()
                if len(uploaded) > done_before:
                    last_progress = now
                left = self.retry_deadline - (now - last_progress)
                if not e.retryable:
                    raise CheckpointUploadError(
                        f"uploading {what} to {target} failed: {e}. {kept}",
                        uri=target, local_dir=str(local_dir), retryable=False) from e
                if left <= 0:
                    raise CheckpointUploadError(
                        f"uploading {what} to {target} failed after {attempt} attempts over "
                        f"{now - t0:.0f}s (no progress for {self.retry_deadline:g}s): {e}. "
                        f"{kept}", uri=target, local_dir=str(local_dir)) from e
                delay = min(self.backoff_max, self.backoff_initial * 2 ** (attempt - 1))
                delay = max(0.0, min(left, delay * random.uniform(0.8, 1.2)))
                log.warning("uploading %s failed (attempt %d): %s; retrying in %.1fs "
                            "(giving up after %.1fs more without progress)",
                            what, attempt, e, delay, left)
                time.sleep(delay)

    def _upload(self, job: _Job) -> UploadResult:
        name = checkpoint_name(job.step)
        target = self.storage.url(checkpoints_prefix(self.stage_prefix) + "/" + name)
        t0 = time.monotonic()
        committed, attempts, files = self._with_retries(
            name, target, job.local_dir, self._kept_message(job),
            lambda files, uploaded: commit_checkpoint(
                self.storage, self.stage_prefix, job.local_dir, job.step, extra=job.extra,
                files=files, uploaded=uploaded))
        seconds = time.monotonic() - t0
        if job.staged:
            shutil.rmtree(job.local_dir, ignore_errors=True)
        return UploadResult(step=job.step, name=name, uri=committed.uri,
                            local_dir=str(job.local_dir), files=len(files),
                            bytes=committed.manifest.total_bytes, seconds=seconds,
                            attempts=attempts, wait_seconds=job.wait_seconds)

    def commit_output(self, local_dir: str | os.PathLike, *, step: int | None = None,
                      extra: dict | None = None) -> CommittedOutput:
        """Wait for pending checkpoint uploads, then commit the stage's final output.

        Runs in the calling thread with the same retry policy as checkpoint uploads (an S3
        outage at the very end of a stage does not throw the stage away). Call `close` after.

        Raises:
            CheckpointUploadError: a pending checkpoint upload failed, or the output could not
                be uploaded before the deadline (the local folder is kept).
        """
        self.flush()
        local_dir = Path(local_dir)
        target = self.storage.url(output_prefix(self.stage_prefix))
        return self._with_retries(
            "the output", target, local_dir,
            f"The output is kept locally at {local_dir}; it was not committed",
            lambda files, uploaded: commit_output(self.storage, self.stage_prefix, local_dir,
                                                  step=step, extra=extra, files=files,
                                                  uploaded=uploaded))[0]

    @staticmethod
    def _kept_message(job: _Job) -> str:
        if job.staged:
            return (f"The checkpoint is kept locally at {job.local_dir} (a snapshot of "
                    f"{job.source_dir}); it was not committed")
        return f"The checkpoint is kept locally at {job.local_dir}; it was not committed"

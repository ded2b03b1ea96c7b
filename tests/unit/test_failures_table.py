"""The one table of failures (kubetune.runtime.api.errors.FAILURES): each error the runtime can meet
→ its exit code, whether it is retried, the reason the operator shows. A test per row, then the
operator's side of the same table: its podFailurePolicy and how a failed Job reads back."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from kubetune.operator import status as s
from kubetune.operator.manifests import pod_failure_policy
from kubetune.runtime.api import errors as e
from kubetune.runtime.storage import CheckpointUploadError, StorageError, StorageIntegrityError

ROOT = Path(__file__).resolve().parents[2]


def _chained(outer: type[BaseException], inner: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException as err:
            raise outer("while training") from err
    except BaseException as err:
        return err


def test_bad_input_row():
    assert e.classify(e.UserError("no such file", "spec.data[0].source")).exit_code == 42
    missing_bucket = StorageError("S3 bucket 'x' does not exist", uri="s3://x/", retryable=False)
    assert e.classify(missing_bucket) is e.FAILURES["BadInput"] and missing_bucket.exit_code == 42
    gone = _chained(lambda m: CheckpointUploadError(m, retryable=False), missing_bucket)
    assert e.exit_code_for(gone) == 42
    assert e.termination_text(e.UserError("no such file", "spec.data[0].source")) == \
        "bad input: spec.data[0].source: no such file"


@pytest.mark.parametrize("err", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to "
                 "allocate 9000000000 bytes"),
    MemoryError(),
    _chained(RuntimeError, MemoryError()),  # wrapped by whatever caught it first
], ids=["cuda", "cublas", "cpu-allocator", "host", "chained"])
def test_out_of_memory_row(err):
    failure = e.classify(err)
    assert failure.reason == "OutOfMemory" and failure.exit_code == 43 and not failure.retryable


def test_out_of_memory_is_not_any_runtime_error():
    assert e.classify(RuntimeError("Expected all tensors to be on the same device")).reason == "StageFailed"


def test_storage_unavailable_row():
    down = StorageError("cannot reach the S3 endpoint", uri="s3://b/", retryable=True)
    assert e.classify(down).reason == "StorageUnavailable" and down.exit_code == 75
    upload = _chained(lambda m: CheckpointUploadError(m), down)
    assert e.exit_code_for(upload) == 75 and e.FAILURES["StorageUnavailable"].retryable


def test_storage_integrity_row_is_retryable_never_bad_input():
    corrupt = StorageIntegrityError("s3://b/x: sha256 mismatch", uri="s3://b/x")
    assert corrupt.retryable and corrupt.exit_code == 74
    assert e.classify(corrupt).reason == "StorageIntegrity" and e.FAILURES["StorageIntegrity"].retryable


def test_interrupted_row():
    stop = e.Interrupted("stopped by SIGTERM at step 7", checkpoint="s3://b/sft/checkpoints/checkpoint-7")
    assert e.classify(stop).reason == "Interrupted" and e.exit_code_for(stop) == 143
    assert e.FAILURES["Interrupted"].retryable


def test_stage_failed_row():
    bug = ValueError("a bug")
    assert e.classify(bug).reason == "StageFailed" and e.exit_code_for(bug) == 1
    assert e.termination_text(bug) == "ValueError: a bug"


def test_killed_row_is_the_kernels_not_the_runtimes():
    # retried: a crash resumes from the checkpoint (the operator ends an OOMKilled one itself)
    assert e.FAILURES["Killed"].exit_code == 137 and e.FAILURES["Killed"].retryable
    assert 137 not in {e.exit_code_for(x) for x in (MemoryError(), ValueError(), e.Interrupted("x"))}


def test_rows_have_distinct_exit_codes_and_the_docs_list_them():
    codes = [f.exit_code for f in e.FAILURES.values()]
    assert len(set(codes)) == len(codes)
    doc = (ROOT / "docs" / "failures.md").read_text()
    for f in e.FAILURES.values():
        assert re.search(rf"\|\s*`?{f.exit_code}`?\s*\|\s*`?{f.reason}`?\s*\|", doc), f


def test_torchrun_ranks_combine_by_the_table():
    assert e.combine_exit_codes([1, 42]) == 42
    assert e.combine_exit_codes([43, 1]) == 43
    assert e.combine_exit_codes([42, 43]) == 42
    assert e.combine_exit_codes([143, -15]) == 143  # SIGTERM-killed ranks are interrupted too
    assert e.combine_exit_codes([1, 75]) == 75
    assert e.combine_exit_codes([-9, 1]) == 1
    assert e.combine_exit_codes([]) == 1


# ---- the operator's side


def test_pod_failure_policy_fails_at_once_on_exactly_the_permanent_rows():
    rules = pod_failure_policy()["rules"]
    failjob = {c for r in rules if r["action"] == "FailJob" for c in r.get("onExitCodes", {}).get("values", [])}
    assert failjob == {f.exit_code for f in e.FAILURES.values() if not f.retryable} == {42, 43}
    # SIGKILL (137) is retried: a crash resumes; the operator itself ends an OOMKilled container
    order = [r.get("onPodConditions", [{}])[0].get("type") or r["onExitCodes"]["values"] for r in rules]
    assert order == [[42, 43], "DisruptionTarget"]


def _failed_job(rule_message: str, reason: str = "PodFailurePolicy") -> dict:
    return {"status": {"conditions": [{"type": "Failed", "status": "True", "reason": reason,
                                       "message": rule_message}]}}


def _pod(exit_code: int, reason: str = "Error", message: str = "", limit: str | None = None) -> dict:
    container = {"name": "trainer"}
    if limit:
        container["resources"] = {"limits": {"memory": limit}}
    return {"metadata": {"name": "p"}, "spec": {"containers": [container]},
            "status": {"phase": "Failed", "containerStatuses": [{"name": "trainer", "state": {"terminated": {
                "exitCode": exit_code, "reason": reason, "message": message,
                "finishedAt": "2025-01-01T00:00:00Z"}}}]}}


def _rule(code: int, index: int = 0) -> str:
    return f"Container trainer for pod default/j-sft-0-abc failed with exit code {code} matching FailJob rule at index {index}"


def test_operator_reads_each_permanent_row_back():
    assert s.job_failure_reason(_failed_job(_rule(42))) == "BadInput"
    oom = "out of memory: stage sft ran out of GPU memory ...; kubetune estimate: 21.3 GiB per device"
    pods = [_pod(43, message=oom)]
    assert s.job_failure_reason(_failed_job(_rule(43)), pods) == "OutOfMemory"
    assert s.job_failure_message(_failed_job(_rule(43)), pods) == oom
    assert s.failure_is_permanent("OutOfMemory") and s.failure_is_permanent("BadInput")
    assert not s.failure_is_permanent("StorageUnavailable") and not s.failure_is_permanent("Interrupted")


def test_operator_maps_the_kernels_oom_kill_to_out_of_memory_with_advice():
    killed = [_pod(137, reason="OOMKilled", message="...log tail...", limit="512Mi")]
    job = _failed_job(_rule(137, 2))
    assert s.job_failure_reason(job, killed) == "OutOfMemory"
    msg = s.job_failure_message(job, killed)
    assert "OOMKilled" in msg and "512Mi" in msg and "kubetune estimate" in msg
    for knob in ("batchSize", "cutoffLen", "gradientCheckpointing", "qlora", "spec.resources.memory"):
        assert knob in msg
    # a SIGKILL that was not the OOM killer is not called out of memory
    assert s.job_failure_reason(job, [_pod(137, reason="Error")]) == "Killed"
    # a cluster without the 137 rule retries it: still out of memory once the retries are spent
    assert s.job_failure_reason(_failed_job("backoff", "BackoffLimitExceeded"), killed) == "OutOfMemory"

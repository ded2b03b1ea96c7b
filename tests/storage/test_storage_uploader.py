"""The background checkpoint uploader against a real moto server, including S3 outages.

Outages are made real by freezing the server process with SIGSTOP (it keeps its in-memory
buckets, unlike a restart) and thawing it with SIGCONT: connections are accepted by the kernel
but never answered, exactly like a hung endpoint.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time

import pytest

from kubetune.runtime.storage import (
    CheckpointUploader,
    CheckpointUploadError,
    download_checkpoint,
    find_committed_output,
    find_latest_checkpoint,
    list_committed_checkpoints,
    open_storage,
)

from .support import make_bucket, make_checkpoint, tree

STAGE = "sft"


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def s3(server, **opts):
    return open_storage(f"s3://{make_bucket(server.endpoint)}/job", endpoint=server.endpoint,
                        **opts)


def test_submit_returns_at_once_and_the_next_submit_waits(pausable_moto_server, tmp_path):
    store = s3(pausable_moto_server, read_timeout=20, max_attempts=1)
    results = []
    ck10, ck20, ck30 = (make_checkpoint(tmp_path, s) for s in (10, 20, 30))
    up = CheckpointUploader(store, STAGE, on_uploaded=results.append)
    try:
        pausable_moto_server.pause()  # the upload of checkpoint-10 will hang until resumed
        t0 = time.monotonic()
        assert up.submit(ck10, 10) < 0.05
        assert time.monotonic() - t0 < 0.5  # training goes on while the upload hangs
        time.sleep(0.5)  # ... "work" ...
        assert up.busy and results == []
        threading.Timer(1.0, pausable_moto_server.resume).start()
        waited = up.submit(ck20, 20)  # blocks until checkpoint-10 is committed
        assert waited > 0.5
        assert [r.step for r in results] == [10]
        first = up.flush()
        assert first.step == 20
        assert up.submit(ck30, 30) < 0.05  # the previous upload is done: no wait
    finally:
        pausable_moto_server.resume()
        up.close()
    assert [r.step for r in results] == [10, 20, 30]
    r10 = results[0]
    assert r10.bytes == sum(len(b) for b in tree(ck10).values()) and r10.files == 3
    assert r10.seconds >= 1.0 and r10.attempts == 1  # it waited for the frozen server
    assert results[1].wait_seconds == pytest.approx(waited, abs=0.01)
    assert find_latest_checkpoint(store, STAGE).step == 30


def test_upload_retries_through_an_outage(pausable_moto_server, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="kubetune")
    store = s3(pausable_moto_server, read_timeout=0.2, connect_timeout=0.5, max_attempts=1)
    local = make_checkpoint(tmp_path, 7)
    up = CheckpointUploader(store, STAGE, retry_deadline=30, backoff_initial=0.2,
                            backoff_max=0.5)
    pausable_moto_server.pause()
    try:
        up.submit(local, 7)
        wait_for(lambda: caplog.text.count("retrying in") >= 2, 15, "two logged retries")
        assert "cannot reach the S3 endpoint" in caplog.text
    finally:
        pausable_moto_server.resume()
    result = up.flush()
    up.close()
    assert result.step == 7 and result.attempts >= 3
    latest = find_latest_checkpoint(store, STAGE)
    assert latest.step == 7
    assert tree(download_checkpoint(store, latest, tmp_path / "back")) == tree(local)


def test_upload_gives_up_with_a_clear_message_and_keeps_the_local_copy(pausable_moto_server,
                                                                       tmp_path):
    store = s3(pausable_moto_server, read_timeout=0.3, connect_timeout=0.3, max_attempts=1)
    local = make_checkpoint(tmp_path, 7)
    before = tree(local)
    up = CheckpointUploader(store, STAGE, retry_deadline=1.5, backoff_initial=0.2,
                            backoff_max=0.4)
    pausable_moto_server.pause()  # and it never comes back during the deadline
    try:
        up.submit(local, 7)
        t0 = time.monotonic()
        with pytest.raises(CheckpointUploadError) as e:
            up.flush()
        assert time.monotonic() - t0 < 10
    finally:
        pausable_moto_server.resume()
    msg = str(e.value)
    assert f"uploading checkpoint-7 to {store.url('sft/checkpoints/checkpoint-7')} failed" in msg
    assert "cannot reach the S3 endpoint" in msg
    assert f"kept locally at {local}" in msg and e.value.local_dir == str(local)
    assert tree(local) == before  # nothing lost
    assert find_latest_checkpoint(store, STAGE) is None  # nothing half-committed either
    up.close()  # the failure was reported once; close does not raise it again


def test_permanent_error_fails_fast_and_the_next_submit_raises(moto_server, tmp_path, caplog):
    store = open_storage("s3://kt-missing-bucket/job", endpoint=moto_server.endpoint)
    up = CheckpointUploader(store, STAGE, retry_deadline=60)
    up.submit(make_checkpoint(tmp_path, 1), 1)
    wait_for(lambda: not up.busy, 10, "the upload to fail")
    with pytest.raises(CheckpointUploadError, match="'kt-missing-bucket' does not exist"):
        up.submit(make_checkpoint(tmp_path, 2), 2)
    assert "retrying" not in caplog.text  # no point retrying a missing bucket
    up.close()


def test_staging_snapshot_lets_the_trainer_delete_its_folder(moto_server, tmp_path):
    store = s3(moto_server)
    staging = tmp_path / "staging"
    up = CheckpointUploader(store, STAGE, staging_dir=staging)
    local = make_checkpoint(tmp_path, 3, big=1_000_000)
    expected = tree(local)
    up.submit(local, 3)
    shutil.rmtree(local)  # e.g. Trainer's save_total_limit rotating it away
    result = up.close()
    assert result.step == 3
    latest = find_latest_checkpoint(store, STAGE)
    assert tree(download_checkpoint(store, latest, tmp_path / "back")) == expected
    assert not (staging / "checkpoint-3").exists()  # the snapshot is gone after success


def test_uploader_prunes_and_survives_a_failing_hook(moto_server, tmp_path, caplog):
    store = s3(moto_server)

    def hook(result):
        raise RuntimeError("metrics backend down")

    with CheckpointUploader(store, STAGE, keep=2, on_uploaded=hook) as up:
        for step in (10, 20, 30, 40):
            up.submit(make_checkpoint(tmp_path, step), step)
    assert [r.step for r in up.results] == [10, 20, 30, 40]
    assert [c.step for c in list_committed_checkpoints(store, STAGE)] == [30, 40]
    assert "the on_uploaded hook failed" in caplog.text
    with pytest.raises(RuntimeError, match="closed"):
        up.submit(make_checkpoint(tmp_path, 50), 50)


def test_final_output_commit_waits_for_checkpoints_and_outlasts_an_outage(
        pausable_moto_server, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="kubetune")
    store = s3(pausable_moto_server, read_timeout=0.2, connect_timeout=0.5, max_attempts=1)
    out = tmp_path / "final"
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes(b"final weights")
    up = CheckpointUploader(store, STAGE, retry_deadline=30, backoff_initial=0.2,
                            backoff_max=0.5)

    def resume_after_a_retry():
        try:
            wait_for(lambda: "retrying in" in caplog.text, 20, "a logged retry")
        finally:
            pausable_moto_server.resume()

    pausable_moto_server.pause()
    resumer = threading.Thread(target=resume_after_a_retry)
    resumer.start()
    try:
        up.submit(make_checkpoint(tmp_path, 50), 50)
        committed = up.commit_output(out, step=50)
    finally:
        resumer.join()
        pausable_moto_server.resume()
    up.close()
    assert [r.step for r in up.results] == [50]  # the checkpoint went first
    found = find_committed_output(store, STAGE)
    assert found is not None and found.uri == committed.uri and found.manifest.step == 50
    assert find_latest_checkpoint(store, STAGE).step == 50

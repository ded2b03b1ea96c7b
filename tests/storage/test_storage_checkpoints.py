"""The checkpoint commit protocol and the stage output marker, on both backends."""

from __future__ import annotations

import hashlib
import json
import logging
import os

import pytest

from kubetune.runtime.storage import (
    StorageError,
    StorageIntegrityError,
    StorageNotFoundError,
    commit_checkpoint,
    commit_output,
    download_checkpoint,
    download_latest_checkpoint,
    download_output,
    find_committed_output,
    find_latest_checkpoint,
    list_committed_checkpoints,
    prune_checkpoints,
)

from .support import make_checkpoint, tree

STAGE = "sft"
CPS = "sft/checkpoints"


class Recording:
    """Delegates to a real storage and records the order of writes; can fail one key.

    Not a mock: every call really reaches the wrapped backend (folder or moto S3). It exists
    only to observe ordering and to inject one failure at a chosen point of the protocol.
    """

    def __init__(self, inner, fail_on: str | None = None):
        self.inner, self.fail_on, self.writes = inner, fail_on, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _write(self, key):
        if self.fail_on and key == self.fail_on:
            raise StorageError(f"injected failure writing {key}", retryable=True)
        self.writes.append(key)

    def put_file(self, local_path, key):
        self._write(key)
        return self.inner.put_file(local_path, key)

    def write_text(self, key, text):
        self._write(key)
        return self.inner.write_text(key, text)

    def write_bytes(self, key, data):
        self._write(key)
        return self.inner.write_bytes(key, data)


def test_commit_uploads_files_then_marker_then_latest(storage, tmp_path):
    local = make_checkpoint(tmp_path, 10)
    rec = Recording(storage)
    c = commit_checkpoint(rec, STAGE, local, 10, extra={"epoch": 0.5})
    files = ["adapter_model.safetensors", "sub/rng_state.pth", "trainer_state.json"]
    assert rec.writes == [f"{CPS}/checkpoint-10/{f}" for f in files] + [
        f"{CPS}/checkpoint-10/COMMITTED.json", f"{CPS}/LATEST"]
    assert storage.read_text(f"{CPS}/LATEST").strip() == "checkpoint-10"
    marker = json.loads(storage.read_text(f"{CPS}/checkpoint-10/COMMITTED.json"))
    assert marker["step"] == 10 and marker["kind"] == "checkpoint"
    assert marker["extra"] == {"epoch": 0.5} and marker["committedAt"].endswith("Z")
    assert [(f["path"], f["size"], f["sha256"]) for f in marker["files"]] == [
        (f, (local / f).stat().st_size, hashlib.sha256((local / f).read_bytes()).hexdigest())
        for f in files]
    assert c.uri == storage.url(f"{CPS}/checkpoint-10")
    latest = find_latest_checkpoint(storage, STAGE)
    assert (latest.name, latest.step) == ("checkpoint-10", 10)


def test_latest_moves_only_after_the_marker(storage, tmp_path):
    commit_checkpoint(storage, STAGE, make_checkpoint(tmp_path, 10), 10)
    rec = Recording(storage, fail_on=f"{CPS}/checkpoint-20/COMMITTED.json")
    with pytest.raises(StorageError, match="injected"):
        commit_checkpoint(rec, STAGE, make_checkpoint(tmp_path, 20), 20)
    # Every file of checkpoint-20 is stored, but without its marker it does not exist.
    assert len(storage.list(f"{CPS}/checkpoint-20")) == 3
    assert storage.read_text(f"{CPS}/LATEST").strip() == "checkpoint-10"
    assert find_latest_checkpoint(storage, STAGE).step == 10
    assert [c.step for c in list_committed_checkpoints(storage, STAGE)] == [10]


def test_torn_checkpoint_is_ignored(storage, tmp_path, caplog):
    commit_checkpoint(storage, STAGE, make_checkpoint(tmp_path, 10), 10)
    commit_checkpoint(storage, STAGE, make_checkpoint(tmp_path, 20), 20)
    # A kill during the upload of checkpoint-30: files, no marker.
    storage.put_dir(make_checkpoint(tmp_path, 30), f"{CPS}/checkpoint-30")
    assert find_latest_checkpoint(storage, STAGE).step == 20

    # LATEST pointing at the torn one (should never happen, but must not be trusted).
    storage.write_text(f"{CPS}/LATEST", "checkpoint-30\n")
    with caplog.at_level(logging.WARNING):
        assert find_latest_checkpoint(storage, STAGE).step == 20
    assert "not a committed checkpoint" in caplog.text

    storage.write_text(f"{CPS}/LATEST", "../../output\n")  # garbage
    assert find_latest_checkpoint(storage, STAGE).step == 20
    storage.delete(f"{CPS}/LATEST")  # missing
    assert find_latest_checkpoint(storage, STAGE).step == 20

    # A corrupt marker counts as no marker.
    storage.write_text(f"{CPS}/checkpoint-20/COMMITTED.json", "{not json")
    assert find_latest_checkpoint(storage, STAGE).step == 10
    assert [c.step for c in list_committed_checkpoints(storage, STAGE)] == [10]


def test_committed_checkpoint_with_a_missing_file_is_not_trusted(storage, tmp_path):
    commit_checkpoint(storage, STAGE, make_checkpoint(tmp_path, 10), 10)
    commit_checkpoint(storage, STAGE, make_checkpoint(tmp_path, 20), 20)
    storage.delete(f"{CPS}/checkpoint-20/adapter_model.safetensors")
    assert find_latest_checkpoint(storage, STAGE).step == 10


def test_fallback_orders_steps_numerically(storage, tmp_path):
    for step in (100, 9, 10):
        commit_checkpoint(storage, STAGE, make_checkpoint(tmp_path, step), step)
    assert find_latest_checkpoint(storage, STAGE).step == 10  # LATEST: the last committed
    storage.delete(f"{CPS}/LATEST")
    assert find_latest_checkpoint(storage, STAGE).step == 100  # not "checkpoint-9"
    assert [c.step for c in list_committed_checkpoints(storage, STAGE)] == [9, 10, 100]


def test_no_checkpoint_at_all(storage, tmp_path):
    assert find_latest_checkpoint(storage, STAGE) is None
    assert download_latest_checkpoint(storage, STAGE, tmp_path / "resume") is None
    assert list_committed_checkpoints(storage, STAGE) == []


def test_download_verifies_sha256(storage, tmp_path):
    local = make_checkpoint(tmp_path, 10)
    c = commit_checkpoint(storage, STAGE, local, 10)
    got = download_checkpoint(storage, c, tmp_path / "resume" / "checkpoint-10")
    assert tree(got) == tree(local)

    # Same size, different bytes: only the sha256 can tell.
    bad = tmp_path / "bad"
    bad.write_bytes(os.urandom((local / "adapter_model.safetensors").stat().st_size))
    storage.put_file(bad, f"{CPS}/checkpoint-10/adapter_model.safetensors")
    target = tmp_path / "resume2" / "checkpoint-10"
    with pytest.raises(StorageIntegrityError) as e:
        download_checkpoint(storage, find_latest_checkpoint(storage, STAGE), target)
    assert "checkpoint-10/adapter_model.safetensors: sha256 mismatch" in str(e.value)
    assert not target.exists()
    assert list((tmp_path / "resume2").iterdir()) == []  # no half-downloaded leftovers


def test_download_latest_falls_back_past_a_corrupt_checkpoint(storage, tmp_path, caplog):
    local10 = make_checkpoint(tmp_path, 10)
    commit_checkpoint(storage, STAGE, local10, 10)
    local20 = make_checkpoint(tmp_path, 20)
    commit_checkpoint(storage, STAGE, local20, 20)
    restored = download_latest_checkpoint(storage, STAGE, tmp_path / "r1")
    assert restored.checkpoint.step == 20 and tree(restored.path) == tree(local20)
    assert restored.path == tmp_path / "r1" / "checkpoint-20"

    storage.write_text(f"{CPS}/checkpoint-20/trainer_state.json",
                       json.dumps({"global_step": 99}))  # same size, other bytes
    with caplog.at_level(logging.WARNING):
        restored = download_latest_checkpoint(storage, STAGE, tmp_path / "r2")
    assert restored.checkpoint.step == 10 and tree(restored.path) == tree(local10)
    assert "sha256 mismatch" in caplog.text

    storage.write_text(f"{CPS}/checkpoint-10/trainer_state.json",
                       json.dumps({"global_step": 98}))
    with pytest.raises(StorageIntegrityError, match="no committed checkpoint"):
        download_latest_checkpoint(storage, STAGE, tmp_path / "r3")


def test_recommit_of_the_same_step_replaces_it(storage, tmp_path):
    commit_checkpoint(storage, STAGE, make_checkpoint(tmp_path / "a", 10), 10)
    second = tmp_path / "b"
    second.mkdir()
    (second / "only.bin").write_bytes(b"second run")
    commit_checkpoint(storage, STAGE, second, 10)
    got = download_checkpoint(storage, find_latest_checkpoint(storage, STAGE), tmp_path / "r")
    assert tree(got) == {"only.bin": b"second run"}


def test_prune_keeps_the_last_n_and_never_touches_output(storage, tmp_path):
    out = tmp_path / "final"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"weights")
    commit_output(storage, STAGE, out)
    storage.write_text("sft/logs/train.log", "user data")  # outside checkpoints/ as well
    storage.put_dir(make_checkpoint(tmp_path, 5), f"{CPS}/checkpoint-5")  # old torn upload
    for step in (1, 10, 100, 200, 300):
        commit_checkpoint(storage, STAGE, make_checkpoint(tmp_path, step), step)
    storage.put_dir(make_checkpoint(tmp_path, 400), f"{CPS}/checkpoint-400")  # in flight?
    outside = [(o.key, o.size) for o in storage.list("") if not o.key.startswith(CPS)]

    deleted = prune_checkpoints(storage, STAGE, keep=2)

    assert sorted(deleted) == ["checkpoint-1", "checkpoint-10", "checkpoint-100", "checkpoint-5"]
    assert storage.list_dirs(CPS) == ["checkpoint-200", "checkpoint-300", "checkpoint-400"]
    assert [c.step for c in list_committed_checkpoints(storage, STAGE)] == [200, 300]
    assert [(o.key, o.size) for o in storage.list("") if not o.key.startswith(CPS)] == outside
    assert storage.read_text(f"{CPS}/LATEST").strip() == "checkpoint-300"
    assert find_committed_output(storage, STAGE) is not None
    download_checkpoint(storage, find_latest_checkpoint(storage, STAGE), tmp_path / "r")
    assert prune_checkpoints(storage, STAGE, keep=2) == []  # idempotent
    assert prune_checkpoints(storage, STAGE, keep=None) == []
    with pytest.raises(ValueError):
        prune_checkpoints(storage, STAGE, keep=0)


def test_output_marker(storage, tmp_path):
    assert find_committed_output(storage, STAGE) is None
    out = tmp_path / "merged"
    (out / "tok").mkdir(parents=True)
    (out / "model.safetensors").write_bytes(os.urandom(5000))
    (out / "tok" / "tokenizer.json").write_text("{}")
    # Files without the marker (a kill during the output upload) do not count.
    storage.put_dir(out, "sft/output")
    assert find_committed_output(storage, STAGE) is None
    with pytest.raises(StorageNotFoundError, match="no committed output"):
        download_output(storage, STAGE, tmp_path / "dl")

    committed = commit_output(storage, STAGE, out, step=120, extra={"merged": True})
    assert committed.uri == storage.url("sft/output")
    found = find_committed_output(storage, STAGE)
    assert found.manifest.step == 120 and found.manifest.extra == {"merged": True}
    assert {f.path for f in found.manifest.files} == {"model.safetensors", "tok/tokenizer.json"}
    assert tree(download_output(storage, STAGE, tmp_path / "dl")) == tree(out)
    # The output of one stage is not mistaken for a checkpoint, and vice versa.
    assert find_latest_checkpoint(storage, STAGE) is None
    assert find_committed_output(storage, "dpo") is None


def test_reserved_marker_name_in_a_local_folder_is_refused(storage, tmp_path):
    d = tmp_path / "weird"
    d.mkdir()
    (d / "COMMITTED.json").write_text("{}")
    with pytest.raises(ValueError, match="reserved"):
        commit_checkpoint(storage, STAGE, d, 1)
    assert storage.list("") == []

"""The checkpoint commit protocol, and the "output committed" marker of a stage.

Layout under a stage prefix (e.g. ``sft`` inside the job's storage root)::

    <stage>/checkpoints/checkpoint-<step>/<files...>
    <stage>/checkpoints/checkpoint-<step>/COMMITTED.json   # commit marker (manifest)
    <stage>/checkpoints/LATEST                             # text: "checkpoint-<step>"
    <stage>/output/<files...>
    <stage>/output/COMMITTED.json                          # the stage's output is final

Protocol (one writer per stage):

1. Delete a stale marker of the same checkpoint, if any (a re-commit of the same step).
2. Upload every file of the checkpoint.
3. Write the marker: a manifest of relative paths, sizes and sha256, the step and the time.
4. Move ``LATEST`` to the checkpoint's name.

A checkpoint folder without a valid marker does not exist for resume, so a kill at any moment
leaves at worst a "torn" folder that is ignored (and later pruned). Pruning deletes a marker
before the files it describes, for the same reason. Nothing here ever writes or deletes under
``<stage>/output/`` except `commit_output`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .base import TMP_PREFIX, Storage, iter_local_files, join_key, normalize_key
from .errors import StorageError, StorageIntegrityError, StorageNotFoundError

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
OUTPUT_DIR = "output"
MARKER_NAME = "COMMITTED.json"
LATEST_NAME = "LATEST"
MANIFEST_FORMAT = "kubetune.io/commit/v1"

_NAME_RE = re.compile(r"^checkpoint-(\d+)$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


# --- manifests ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ManifestFile:
    """One file of a committed folder: its relative posix path, size and sha256 (hex)."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """The content of a commit marker (``COMMITTED.json``).

    Attributes:
        kind: ``"checkpoint"`` or ``"output"``.
        files: every file of the folder except the marker itself.
        step: the global step (checkpoints; optional for outputs).
        committed_at: ISO 8601 UTC time the marker was written.
        extra: free-form JSON-able metadata supplied by the caller (e.g. epoch, loss).
    """

    kind: str
    files: tuple[ManifestFile, ...]
    step: int | None = None
    committed_at: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> str:
        doc = {
            "format": MANIFEST_FORMAT,
            "kind": self.kind,
            "step": self.step,
            "committedAt": self.committed_at,
            "totalBytes": self.total_bytes,
            "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in self.files],
            "extra": self.extra,
        }
        return json.dumps(doc, indent=1, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse and validate a marker.

        Raises:
            ValueError: not a valid kubetune commit marker.
        """
        doc = json.loads(text)
        if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"not a {MANIFEST_FORMAT} marker")
        files = []
        for f in doc.get("files"):
            path, size, sha = f["path"], f["size"], f["sha256"]
            if (not isinstance(path, str) or normalize_key(path) != path
                    or not isinstance(size, int) or size < 0
                    or not isinstance(sha, str) or not _SHA_RE.match(sha)):
                raise ValueError(f"invalid file entry {f!r}")
            files.append(ManifestFile(path, size, sha))
        step = doc.get("step")
        if step is not None and (not isinstance(step, int) or step < 0):
            raise ValueError(f"invalid step {step!r}")
        extra = doc.get("extra") or {}
        if not isinstance(extra, dict):
            raise ValueError("invalid extra")
        return cls(kind=str(doc.get("kind")), files=tuple(files), step=step,
                   committed_at=str(doc.get("committedAt") or ""), extra=extra)


def sha256_file(path: str | os.PathLike, chunk: int = 8 * 1024 * 1024) -> str:
    """The sha256 (hex) of a file, read in chunks (the GIL is released while hashing)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def hash_local_dir(local_dir: str | os.PathLike) -> list[ManifestFile]:
    """Manifest entries (path, size, sha256) for every file under `local_dir`, sorted.

    Raises:
        ValueError: the folder contains a top-level ``COMMITTED.json`` (reserved name).
        FileNotFoundError: `local_dir` does not exist.
    """
    out = []
    for rel, path in iter_local_files(local_dir):
        if rel == MARKER_NAME:
            raise ValueError(f"{path}: {MARKER_NAME} is reserved for the commit marker")
        out.append(ManifestFile(rel, path.stat().st_size, sha256_file(path)))
    return out


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


# --- committed folders -------------------------------------------------------------------------


@dataclass(frozen=True)
class CommittedCheckpoint:
    """A checkpoint whose marker exists and is valid.

    Attributes:
        name: ``checkpoint-<step>``.
        step: the global step.
        prefix: the checkpoint folder's key relative to the storage root.
        uri: the checkpoint folder's full URI (for status / logs).
        manifest: the marker's content.
    """

    name: str
    step: int
    prefix: str
    uri: str
    manifest: Manifest


@dataclass(frozen=True)
class CommittedOutput:
    """A stage output whose marker exists and is valid (the stage is finished)."""

    prefix: str
    uri: str
    manifest: Manifest


def checkpoint_name(step: int) -> str:
    """``checkpoint-<step>``: the same name transformers' Trainer gives its folders."""
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative integer, not {step!r}")
    return f"checkpoint-{step}"


def parse_checkpoint_name(name: str) -> int | None:
    """The step of ``checkpoint-<step>``, or None if `name` is not a checkpoint name."""
    m = _NAME_RE.match(name)
    return int(m.group(1)) if m else None


def checkpoints_prefix(stage_prefix: str) -> str:
    """``<stage>/checkpoints``: the only folder checkpoint code writes or deletes under."""
    return join_key(stage_prefix, CHECKPOINTS_DIR)


def output_prefix(stage_prefix: str) -> str:
    """``<stage>/output``: where a stage's final output lives."""
    return join_key(stage_prefix, OUTPUT_DIR)


def _commit_dir(storage: Storage, prefix: str, local_dir: str | os.PathLike, *, kind: str,
                step: int | None, extra: dict | None, files: list[ManifestFile] | None,
                uploaded: set[str] | None) -> Manifest:
    """Upload `local_dir` to `prefix`, then write its marker. Returns the manifest."""
    if files is None:
        files = hash_local_dir(local_dir)
    if uploaded is None:
        uploaded = set()
    marker = join_key(prefix, MARKER_NAME)
    # A re-commit (same step after a resume, or a retried output) must not leave the old marker
    # vouching for files that are being replaced. (Checked first, so a fresh commit sends no
    # DELETE that a flaky network could deliver late.)
    if storage.exists(marker):
        storage.delete(marker)
    root = Path(local_dir)
    for f in files:
        if f.path in uploaded:
            continue
        size = storage.put_file(root / f.path, join_key(prefix, f.path))
        if size != f.size:
            raise StorageIntegrityError(
                f"{root / f.path} changed while it was being uploaded ({f.size} bytes when "
                f"hashed, {size} when sent): do not modify a checkpoint folder before its upload "
                f"finishes", uri=storage.url(join_key(prefix, f.path)), retryable=False)
        uploaded.add(f.path)
    manifest = Manifest(kind=kind, files=tuple(files), step=step, committed_at=_now(),
                        extra=dict(extra or {}))
    storage.write_text(marker, manifest.to_json())
    return manifest


def _read_marker(storage: Storage, prefix: str) -> Manifest | None:
    """The valid marker under `prefix`, or None (missing or invalid, with a warning)."""
    key = join_key(prefix, MARKER_NAME)
    try:
        text = storage.read_text(key)
    except StorageNotFoundError:
        return None
    try:
        return Manifest.from_json(text)
    except (ValueError, KeyError, TypeError) as e:
        log.warning("ignoring %s: invalid commit marker (%s)", storage.url(key), e)
        return None


def _objects_match(storage: Storage, prefix: str, manifest: Manifest) -> str | None:
    """None when every manifest file is stored with its size; else what is wrong."""
    stored = {o.key[len(prefix) + 1:]: o.size for o in storage.list(prefix)}
    for f in manifest.files:
        if f.path not in stored:
            return f"{f.path} is missing"
        if stored[f.path] != f.size:
            return f"{f.path} has {stored[f.path]} bytes, the marker says {f.size}"
    return None


def _download_verified(storage: Storage, prefix: str, manifest: Manifest,
                       local_dir: str | os.PathLike) -> Path:
    """Download the manifest's files into `local_dir` (replaced atomically), verifying each."""
    target = Path(local_dir).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + target.name + "-", dir=target.parent))
    try:
        for f in manifest.files:
            key = join_key(prefix, f.path)
            path = storage.get_file(key, tmp / f.path)
            size = path.stat().st_size
            if size != f.size:
                raise StorageIntegrityError(
                    f"{storage.url(key)}: size mismatch ({size} bytes downloaded, the commit "
                    f"marker says {f.size}): the stored copy is corrupt", uri=storage.url(key))
            digest = sha256_file(path)
            if digest != f.sha256:
                raise StorageIntegrityError(
                    f"{storage.url(key)}: sha256 mismatch (downloaded {digest[:16]}..., the "
                    f"commit marker says {f.sha256[:16]}...): the stored copy is corrupt",
                    uri=storage.url(key))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# --- checkpoints -------------------------------------------------------------------------------


def commit_checkpoint(storage: Storage, stage_prefix: str, local_dir: str | os.PathLike,
                      step: int, *, extra: dict | None = None,
                      files: list[ManifestFile] | None = None,
                      uploaded: set[str] | None = None) -> CommittedCheckpoint:
    """Commit a local checkpoint folder as ``<stage>/checkpoints/checkpoint-<step>``.

    Uploads every file, then writes the marker, then moves ``LATEST``. Blocking; use
    `CheckpointUploader` to run it off the training path.

    Args:
        storage: where to commit.
        stage_prefix: the stage's folder relative to the storage root ("" for the root).
        local_dir: the local checkpoint folder (e.g. the Trainer's ``output_dir/checkpoint-N``).
        step: the global step.
        extra: JSON-able metadata stored in the marker.
        files: precomputed `hash_local_dir(local_dir)` (saves re-hashing when retrying).
        uploaded: a set of relative paths already uploaded by an earlier attempt of this same
            commit; skipped, and updated as files complete (lets retries resume).

    Returns:
        The committed checkpoint.

    Raises:
        StorageError: an upload failed (``retryable`` says whether trying again may help); the
            checkpoint then has no marker and is ignored by resume.
    """
    name = checkpoint_name(step)
    prefix = join_key(checkpoints_prefix(stage_prefix), name)
    t0 = time.monotonic()
    manifest = _commit_dir(storage, prefix, local_dir, kind="checkpoint", step=step, extra=extra,
                           files=files, uploaded=uploaded)
    storage.write_text(join_key(checkpoints_prefix(stage_prefix), LATEST_NAME), name + "\n")
    log.info("committed %s (%d files, %d bytes) to %s in %.1fs", name, len(manifest.files),
             manifest.total_bytes, storage.url(prefix), time.monotonic() - t0)
    return CommittedCheckpoint(name, step, prefix, storage.url(prefix), manifest)


def read_checkpoint(storage: Storage, stage_prefix: str, name: str, *,
                    verify_objects: bool = True) -> CommittedCheckpoint | None:
    """The committed checkpoint `name`, or None if it has no valid marker.

    With `verify_objects`, also lists the folder and requires every manifest file to be stored
    with its size (one LIST request; sha256 is checked on download).
    """
    step = parse_checkpoint_name(name)
    if step is None:
        return None
    prefix = join_key(checkpoints_prefix(stage_prefix), name)
    manifest = _read_marker(storage, prefix)
    if manifest is None:
        return None
    if manifest.kind != "checkpoint" or manifest.step != step:
        log.warning("ignoring %s: its marker is for %s step %s", storage.url(prefix),
                    manifest.kind, manifest.step)
        return None
    if verify_objects:
        problem = _objects_match(storage, prefix, manifest)
        if problem:
            log.warning("ignoring %s: committed but %s", storage.url(prefix), problem)
            return None
    return CommittedCheckpoint(name, step, prefix, storage.url(prefix), manifest)


def _checkpoint_names(storage: Storage, stage_prefix: str) -> list[tuple[int, str]]:
    names = []
    for d in storage.list_dirs(checkpoints_prefix(stage_prefix)):
        step = parse_checkpoint_name(d)
        if step is not None:
            names.append((step, d))
    names.sort()
    return names


def list_committed_checkpoints(storage: Storage, stage_prefix: str, *,
                               verify_objects: bool = False) -> list[CommittedCheckpoint]:
    """Every committed checkpoint of the stage, oldest (lowest step) first.

    Torn folders (no valid marker) are left out.
    """
    out = []
    for _, name in _checkpoint_names(storage, stage_prefix):
        c = read_checkpoint(storage, stage_prefix, name, verify_objects=verify_objects)
        if c is not None:
            out.append(c)
    return out


def find_latest_checkpoint(storage: Storage, stage_prefix: str) -> CommittedCheckpoint | None:
    """The checkpoint to resume from, or None if the stage has no committed checkpoint.

    Reads ``LATEST`` and verifies the marker it points to (and that the files are stored). If
    ``LATEST`` is missing, garbage, or points to a checkpoint that is not (or no longer)
    committed, falls back to the newest committed checkpoint found by listing.
    """
    latest_key = join_key(checkpoints_prefix(stage_prefix), LATEST_NAME)
    try:
        name = storage.read_text(latest_key).strip()
    except StorageNotFoundError:
        name = ""
    if name:
        c = read_checkpoint(storage, stage_prefix, name)
        if c is not None:
            return c
        log.warning("%s points to %r, which is not a committed checkpoint; looking for the "
                    "newest committed one", storage.url(latest_key), name)
    for _, cand in reversed(_checkpoint_names(storage, stage_prefix)):
        c = read_checkpoint(storage, stage_prefix, cand)
        if c is not None:
            if name:
                log.warning("resuming from %s instead", c.uri)
            return c
    return None


def download_checkpoint(storage: Storage, checkpoint: CommittedCheckpoint,
                        local_dir: str | os.PathLike) -> Path:
    """Download a committed checkpoint into `local_dir`, verifying size and sha256 of each file.

    Files are first written to a temporary sibling folder; `local_dir` is replaced only when
    every file verified, so a failed download never leaves a half-checkpoint behind.

    Raises:
        StorageIntegrityError: a file's size or sha256 differs from the marker.
        StorageError: a download failed.
    """
    return _download_verified(storage, checkpoint.prefix, checkpoint.manifest, local_dir)


@dataclass(frozen=True)
class RestoredCheckpoint:
    """A committed checkpoint downloaded and verified into `path`."""

    checkpoint: CommittedCheckpoint
    path: Path


def download_latest_checkpoint(storage: Storage, stage_prefix: str,
                               local_root: str | os.PathLike) -> RestoredCheckpoint | None:
    """Find the checkpoint to resume from and download it to ``local_root/<name>``.

    If the latest committed checkpoint fails verification (corrupt or vanished files), falls
    back to the next older committed one, with a warning. Pass the returned path to
    ``Trainer.train(resume_from_checkpoint=...)``.

    Returns:
        None when the stage has no committed checkpoint (start from scratch).

    Raises:
        StorageIntegrityError: committed checkpoints exist but none verifies.
        StorageError: storage unreachable etc.
    """
    latest = find_latest_checkpoint(storage, stage_prefix)
    if latest is None:
        return None
    def candidates():
        yield latest
        for c in reversed(list_committed_checkpoints(storage, stage_prefix)):  # only if needed
            if c.step < latest.step:
                yield c

    last_error: StorageError | None = None
    for c in candidates():
        try:
            path = download_checkpoint(storage, c, Path(local_root) / c.name)
        except (StorageIntegrityError, StorageNotFoundError) as e:
            log.warning("cannot use %s: %s", c.uri, e)
            last_error = e
            continue
        log.info("restored %s (step %d) from %s", c.name, c.step, c.uri)
        return RestoredCheckpoint(c, path)
    assert last_error is not None
    raise StorageIntegrityError(f"no committed checkpoint under "
                                f"{storage.url(checkpoints_prefix(stage_prefix))} verifies; "
                                f"last problem: {last_error}", uri=last_error.uri)


def prune_checkpoints(storage: Storage, stage_prefix: str, keep: int | None) -> list[str]:
    """Delete all but the newest `keep` committed checkpoints; return the deleted names.

    Also deletes torn folders (no valid marker) older than the newest committed checkpoint:
    with one writer per stage they can never become committed. The checkpoint ``LATEST``
    points to is always kept. Only folders ``<stage>/checkpoints/checkpoint-<N>/`` are ever
    deleted — never ``LATEST`` itself, never ``<stage>/output/``. Each deletion removes the
    marker first, so an interrupted prune never leaves a "committed" half-checkpoint.

    Args:
        keep: how many committed checkpoints to keep (>= 1); None keeps everything.
    """
    if keep is None:
        return []
    if not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be a positive integer (or None to keep all), not {keep!r}")
    cps = checkpoints_prefix(stage_prefix)
    names = _checkpoint_names(storage, stage_prefix)
    committed = [(s, n) for s, n in names if _read_marker(storage, join_key(cps, n)) is not None]
    if not committed:
        return []
    try:
        latest = storage.read_text(join_key(cps, LATEST_NAME)).strip()
    except StorageNotFoundError:
        latest = ""
    keep_names = {n for _, n in committed[-keep:]} | {latest}
    newest = committed[-1][0]
    committed_names = {n for _, n in committed}
    doomed = [n for s, n in names if n not in keep_names
              and (n in committed_names or s < newest)]
    for n in doomed:
        prefix = join_key(cps, n)
        storage.delete(join_key(prefix, MARKER_NAME))
        storage.delete_prefix(prefix)
        log.info("pruned %s", storage.url(prefix))
    return doomed


# --- stage output ------------------------------------------------------------------------------


def commit_output(storage: Storage, stage_prefix: str, local_dir: str | os.PathLike, *,
                  step: int | None = None, extra: dict | None = None,
                  files: list[ManifestFile] | None = None,
                  uploaded: set[str] | None = None) -> CommittedOutput:
    """Upload a stage's final output to ``<stage>/output/``, then write its marker.

    Once the marker exists `find_committed_output` returns it and a re-run skips the stage.
    Blocking, no retries beyond botocore's; `CheckpointUploader.commit_output` adds the
    outage-proof retries. `files` / `uploaded` as in `commit_checkpoint`.

    Raises:
        StorageError: an upload failed; the output then has no marker.
    """
    prefix = output_prefix(stage_prefix)
    manifest = _commit_dir(storage, prefix, local_dir, kind="output", step=step, extra=extra,
                           files=files, uploaded=uploaded)
    log.info("committed the output (%d files, %d bytes) to %s", len(manifest.files),
             manifest.total_bytes, storage.url(prefix))
    return CommittedOutput(prefix, storage.url(prefix), manifest)


def find_committed_output(storage: Storage, stage_prefix: str) -> CommittedOutput | None:
    """The stage's committed output (the stage is finished), or None.

    Requires a valid marker and every listed file stored with its size.
    """
    prefix = output_prefix(stage_prefix)
    manifest = _read_marker(storage, prefix)
    if manifest is None or manifest.kind != "output":
        return None
    problem = _objects_match(storage, prefix, manifest)
    if problem:
        log.warning("ignoring the output at %s: committed but %s", storage.url(prefix), problem)
        return None
    return CommittedOutput(prefix, storage.url(prefix), manifest)


def download_output(storage: Storage, stage_prefix: str, local_dir: str | os.PathLike) -> Path:
    """Download a stage's committed output into `local_dir`, verifying every file's sha256.

    Raises:
        StorageNotFoundError: the stage has no committed output.
        StorageIntegrityError: a file does not match the marker.
    """
    out = find_committed_output(storage, stage_prefix)
    if out is None:
        uri = storage.url(output_prefix(stage_prefix))
        raise StorageNotFoundError(f"no committed output at {uri} (the stage has not finished)",
                                   uri=uri)
    return _download_verified(storage, out.prefix, out.manifest, local_dir)

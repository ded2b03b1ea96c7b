"""Checkpoint and input storage: local folders and S3-compatible object stores.

* `open_storage(uri, ...)` -> a `Storage` (`LocalStorage` or `S3Storage`).
* The checkpoint commit protocol: `commit_checkpoint`, `find_latest_checkpoint`,
  `download_checkpoint`, `download_latest_checkpoint`, `prune_checkpoints`, and the stage
  output marker: `commit_output`, `find_committed_output`, `download_output`.
* `CheckpointUploader`: commits checkpoints in a background thread, retrying through outages.
* `fetch_to_cache(uri, ...)`: ``s3://`` datasets and base models downloaded once into a cache.

Every storage failure is a `StorageError` whose message names the URI and what to check.
boto3 is imported only when an ``s3://`` URI is used.
"""

from .base import ObjectInfo, Storage
from .cache import default_cache_dir, fetch_to_cache
from .checkpoints import (
    CHECKPOINTS_DIR,
    LATEST_NAME,
    MARKER_NAME,
    OUTPUT_DIR,
    CommittedCheckpoint,
    CommittedOutput,
    Manifest,
    ManifestFile,
    RestoredCheckpoint,
    checkpoint_name,
    checkpoints_prefix,
    commit_checkpoint,
    commit_output,
    download_checkpoint,
    download_latest_checkpoint,
    download_output,
    find_committed_output,
    find_latest_checkpoint,
    list_committed_checkpoints,
    output_prefix,
    parse_checkpoint_name,
    prune_checkpoints,
    read_checkpoint,
)
from .errors import (
    CheckpointUploadError,
    StorageError,
    StorageIntegrityError,
    StorageNotFoundError,
)
from .factory import open_storage
from .local import LocalStorage
from .uploader import CheckpointUploader, UploadResult

__all__ = [
    "CHECKPOINTS_DIR", "LATEST_NAME", "MARKER_NAME", "OUTPUT_DIR",
    "CheckpointUploadError", "CheckpointUploader", "CommittedCheckpoint", "CommittedOutput",
    "LocalStorage", "Manifest", "ManifestFile", "ObjectInfo", "RestoredCheckpoint", "Storage",
    "StorageError", "StorageIntegrityError", "StorageNotFoundError", "UploadResult",
    "checkpoint_name", "checkpoints_prefix", "commit_checkpoint", "commit_output",
    "default_cache_dir", "download_checkpoint", "download_latest_checkpoint", "download_output",
    "fetch_to_cache", "find_committed_output", "find_latest_checkpoint",
    "list_committed_checkpoints", "open_storage", "output_prefix", "parse_checkpoint_name",
    "prune_checkpoints", "read_checkpoint",
]

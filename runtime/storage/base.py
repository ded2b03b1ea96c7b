"""The storage interface every backend implements.

A `Storage` is rooted at a URI (an S3 bucket plus optional prefix, or a local folder). All keys
passed to it are *relative to that root* and use ``/`` as separator, e.g. ``sft/checkpoints/LATEST``.

Prefixes have folder semantics: the prefix ``a/b`` covers ``a/b/x`` and ``a/b/c/y`` but never
``a/bc``; so ``checkpoints/checkpoint-1`` never matches ``checkpoints/checkpoint-10``.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from .errors import StorageError, StorageNotFoundError

# Temporary files the local backend writes before an atomic rename; never listed.
TMP_PREFIX = ".kubetune-tmp-"


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object.

    Attributes:
        key: the key relative to the storage root.
        size: size in bytes.
        etag: the server's entity tag (S3; quotes stripped), None for the local backend.
        last_modified: modification time as POSIX seconds, when known.
    """

    key: str
    size: int
    etag: str | None = None
    last_modified: float | None = None


def normalize_key(key: str) -> str:
    """Return `key` in canonical form (no leading/trailing ``/``); reject ``..``/``.``/empty.

    Raises:
        ValueError: the key is empty or escapes the root.
    """
    key = key.replace("\\", "/").strip("/")
    parts = key.split("/")
    if not key or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid storage key {key!r}: use a relative path like 'a/b.txt'")
    return key


def normalize_prefix(prefix: str) -> str:
    """Return a folder prefix: ``""`` (the root) or ``"a/b/"``.

    Raises:
        ValueError: the prefix escapes the root.
    """
    prefix = prefix.replace("\\", "/").strip("/")
    if not prefix:
        return ""
    return normalize_key(prefix) + "/"


def join_key(*parts: str) -> str:
    """Join key parts with ``/``, ignoring empty parts and stray slashes."""
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def iter_local_files(local_dir: str | os.PathLike) -> list[tuple[str, Path]]:
    """List regular files under `local_dir` as (relative posix path, absolute path), sorted.

    Symlinks to files are followed; directories are walked without following symlinks.

    Raises:
        FileNotFoundError / NotADirectoryError: `local_dir` is not a directory.
    """
    root = Path(local_dir)
    if not root.is_dir():
        if root.exists():
            raise NotADirectoryError(f"{root} is not a directory")
        raise FileNotFoundError(f"{root} does not exist")
    out: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_file():
                out.append((path.relative_to(root).as_posix(), path))
    out.sort()
    return out


class Storage(ABC):
    """A place to put checkpoints and outputs: a local folder or an S3 bucket/prefix.

    Implementations are safe to use from several threads at once.
    """

    #: The root URI, always ending in ``/`` (``s3://bucket/prefix/`` or ``file:///abs/dir/``).
    uri: str

    def url(self, key: str = "") -> str:
        """The full URI of `key` (or of the root when empty)."""
        key = key.strip("/")
        return self.uri + key if key else self.uri

    # --- objects -----------------------------------------------------------------------------

    @abstractmethod
    def put_file(self, local_path: str | os.PathLike, key: str) -> int:
        """Upload one local file to `key` (replacing it); return the bytes written.

        Large files go through managed multipart transfers on S3; the local backend writes a
        temporary file and renames it, so readers never see a partial object.
        """

    @abstractmethod
    def get_file(self, key: str, local_path: str | os.PathLike) -> Path:
        """Download `key` to `local_path` (parents created, replaced atomically); return it.

        Raises:
            StorageNotFoundError: the object does not exist.
        """

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None:
        """Write a small object in one request (atomic for readers)."""

    @abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """Read a small object.

        Raises:
            StorageNotFoundError: the object does not exist.
        """

    def write_text(self, key: str, text: str) -> None:
        """Write a small UTF-8 text object."""
        self.write_bytes(key, text.encode("utf-8"))

    def read_text(self, key: str) -> str:
        """Read a small UTF-8 text object.

        Raises:
            StorageNotFoundError: the object does not exist.
        """
        return self.read_bytes(key).decode("utf-8")

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo | None:
        """Size/etag of `key`, or None when it does not exist.

        Raises:
            StorageError: the bucket is missing, credentials are rejected, the endpoint is
                unreachable (a missing *bucket* is never reported as a missing object).
        """

    def exists(self, key: str) -> bool:
        """Whether the object `key` exists (objects only, not prefixes)."""
        return self.stat(key) is not None

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete one object; a missing object is not an error."""

    # --- prefixes ----------------------------------------------------------------------------

    @abstractmethod
    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """All objects under the folder `prefix` (recursively), sorted by key."""

    @abstractmethod
    def list_dirs(self, prefix: str = "") -> list[str]:
        """Names of the immediate sub-folders of the folder `prefix`, sorted."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under the folder `prefix`; return how many were deleted.

        Raises:
            ValueError: `prefix` is empty (refuses to wipe the whole root).
        """

    def put_dir(self, local_dir: str | os.PathLike, prefix: str, *,
                skip: set[str] | None = None) -> list[ObjectInfo]:
        """Upload the tree under `local_dir` to the folder `prefix`; return what was written.

        Args:
            skip: relative paths (posix) not to upload, e.g. the ones already uploaded.
        """
        written = []
        for rel, path in iter_local_files(local_dir):
            if skip and rel in skip:
                continue
            key = join_key(prefix, rel)
            size = self.put_file(path, key)
            written.append(ObjectInfo(key=key, size=size))
        return written

    def get_prefix(self, prefix: str, local_dir: str | os.PathLike) -> list[Path]:
        """Download every object under the folder `prefix` into `local_dir`, keeping the tree.

        Raises:
            StorageNotFoundError: nothing exists under `prefix`.
        """
        norm = normalize_prefix(prefix)
        objects = self.list(norm)
        if not objects:
            raise StorageNotFoundError(f"nothing stored under {self.url(norm)}", uri=self.url(norm))
        out = []
        for obj in objects:
            out.append(self.get_file(obj.key, Path(local_dir) / obj.key[len(norm):]))
        return out

    def check(self) -> None:
        """Verify the storage is reachable and usable (bucket exists, credentials accepted).

        Call it at stage start to fail fast instead of after the first hour of training.

        Raises:
            StorageError: with a message that says what to fix.
        """


    def wait_until_reachable(self, seconds: float, *, backoff_initial: float = 1.0,
                             backoff_max: float = 30.0) -> float:
        """`check()`, retried with exponential backoff (jittered) while its error is retryable
        (endpoint unreachable, throttling, 5xx) for up to `seconds`, each retry logged at
        WARNING. A short storage outage at stage start then costs a wait inside the pod, not one
        of the Job's retries. Returns the seconds waited.

        Raises:
            StorageError: a permanent problem at once (missing bucket, rejected credentials), or
                the last retryable one once `seconds` have passed (the stage exits retryable).
        """
        import logging
        import random
        import time

        log = logging.getLogger("kubetune.storage")
        t0 = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                self.check()
            except StorageError as e:
                waited = time.monotonic() - t0
                if not e.retryable:
                    raise
                left = seconds - waited
                if left <= 0:
                    raise StorageError(f"storage unreachable for {waited:.0f}s ({attempt} attempts; "
                                       f"KUBETUNE_STORAGE_WAIT_SECONDS={seconds:g}): {e}",
                                       uri=e.uri, retryable=True) from e
                delay = min(backoff_max, backoff_initial * 2 ** (attempt - 1)) * random.uniform(0.8, 1.2)
                delay = max(0.0, min(left, delay))
                log.warning("storage unreachable at stage start (attempt %d): %s; retrying in %.1fs "
                            "(waiting up to %.0fs more)", attempt, e, delay, left)
                time.sleep(delay)
                continue
            waited = time.monotonic() - t0
            if attempt > 1:
                log.info("storage reachable again after %.1fs (%d attempts)", waited, attempt)
            return waited

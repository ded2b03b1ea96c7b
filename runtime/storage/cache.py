"""Fetch ``s3://`` inputs (datasets, base models) into a local cache, once, integrity-checked.

Layout under the cache folder (default ``$KUBETUNE_CACHE_DIR``, else
``$XDG_CACHE_HOME/kubetune``, else ``~/.cache/kubetune``)::

    s3/<bucket>/<key>                 # the data, exactly the remote tree (nothing else in it)
    s3-meta/<bucket>/<key>.json       # per object: remote size + ETag, local sha256
    locks/<hash>.lock                 # one fetch of the same URI at a time (e.g. 8 ranks/node)

A cached object is reused when its local size and the remote size + ETag match what was
recorded when it was downloaded (and, with ``verify=True``, its sha256 too). When the remote has
a ``<key>.sha256`` sidecar object (``sha256sum`` format or a bare hex digest), the download is
checked against it. Anything that differs is downloaded again, to a temporary file renamed into
place, so a crash never leaves a half file that looks valid.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path

from ..api.contract import ENV_KUBETUNE_CACHE_DIR
from .base import TMP_PREFIX, ObjectInfo, normalize_key
from .checkpoints import sha256_file
from .errors import StorageError, StorageIntegrityError, StorageNotFoundError
from .factory import is_local_uri, local_path_of, split_s3_uri

log = logging.getLogger(__name__)

CACHE_DIR_ENV = ENV_KUBETUNE_CACHE_DIR  # the model cache's folder when the pod has one (contract)
SIDECAR_SUFFIX = ".sha256"


def default_cache_dir() -> Path:
    """``$KUBETUNE_CACHE_DIR``, else ``$XDG_CACHE_HOME/kubetune``, else ``~/.cache/kubetune``."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "kubetune"


@contextmanager
def _lock(cache_dir: Path, uri: str):
    locks = cache_dir / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    path = locks / (hashlib.sha256(uri.encode()).hexdigest()[:32] + ".lock")
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _parse_sidecar(text: str, uri: str) -> str:
    token = text.strip().split()[0].lower() if text.strip() else ""
    if len(token) != 64 or any(c not in "0123456789abcdef" for c in token):
        raise StorageIntegrityError(f"{uri}{SIDECAR_SUFFIX} is not a sha256 digest", uri=uri)
    return token


def _fetch_object(storage, info: ObjectInfo, sidecar: str | None, data_path: Path,
                  meta_path: Path, verify: bool) -> bool:
    """Make `data_path` a verified copy of `info`; return True when it was downloaded."""
    uri = storage.url(info.key)
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        meta = None
    if meta is not None and data_path.is_file():
        fresh = (meta.get("size") == info.size and meta.get("etag") == info.etag
                 and data_path.stat().st_size == info.size
                 and (sidecar is None or meta.get("sha256") == sidecar))
        if fresh and verify:
            fresh = sha256_file(data_path) == meta.get("sha256")
            if not fresh:
                log.warning("cached copy of %s is corrupt; downloading it again", uri)
        if fresh:
            return False
    data_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = data_path.parent / f"{TMP_PREFIX}{data_path.name}"
    try:
        storage.get_file(info.key, tmp)
        size = tmp.stat().st_size
        if size != info.size:
            raise StorageIntegrityError(f"{uri}: downloaded {size} bytes, expected {info.size} "
                                        f"(the object changed during the download?)", uri=uri)
        digest = sha256_file(tmp)
        if sidecar is not None and digest != sidecar:
            raise StorageIntegrityError(
                f"{uri}: sha256 {digest[:16]}... does not match its {SIDECAR_SUFFIX} sidecar "
                f"({sidecar[:16]}...): the stored object or its sidecar is wrong", uri=uri)
        meta_path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, data_path)
    finally:
        tmp.unlink(missing_ok=True)
    meta_path.write_text(json.dumps({"size": info.size, "etag": info.etag, "sha256": digest}))
    log.info("downloaded %s (%d bytes) to %s", uri, info.size, data_path)
    return True


def _safe_relative(rel: str, uri: str) -> str:
    try:
        return normalize_key(rel)
    except ValueError:
        raise StorageError(f"refusing to cache {uri}: its key {rel!r} would escape the cache "
                           f"folder", uri=uri) from None


def fetch_to_cache(uri: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
                   verify: bool = False, endpoint: str | None = None, region: str | None = None,
                   addressing_style: str = "path",
                   credentials_dir: str | os.PathLike | None = None, **s3_options) -> Path:
    """Return a local path for the input `uri`, downloading ``s3://`` data into the cache once.

    * ``s3://bucket/key`` naming an object: the file ``<cache>/s3/bucket/key``.
    * ``s3://bucket/prefix`` (no such object, or a trailing ``/``): the folder
      ``<cache>/s3/bucket/prefix`` mirroring every object under the prefix (files removed
      remotely are removed locally; ``*.sha256`` sidecars are used for checks, not copied).
    * A local path or ``file://`` URI: returned as is (must exist); nothing is copied.

    Args:
        verify: also re-hash cached files (sha256) before trusting them; slower for big models.
        endpoint, region, addressing_style, credentials_dir, **s3_options: as `open_storage`.

    Raises:
        StorageNotFoundError: nothing exists at `uri`.
        StorageIntegrityError: a download does not match its size or sha256 sidecar.
        StorageError: bucket missing, credentials rejected, endpoint unreachable, ...
    """
    s = os.fspath(uri)
    if is_local_uri(s):
        path = local_path_of(s)
        if not path.exists():
            raise StorageNotFoundError(f"{s} does not exist", uri=s)
        return path
    bucket, key = split_s3_uri(s)
    from .s3 import S3Storage

    storage = S3Storage(bucket, "", endpoint=endpoint, region=region,
                        addressing_style=addressing_style, credentials_dir=credentials_dir,
                        **s3_options)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    data_root = cache / "s3" / bucket
    meta_root = cache / "s3-meta" / bucket
    want_prefix = key.endswith("/") or not key
    key = key.strip("/")
    if key:
        key = _safe_relative(key, s)

    with _lock(cache, s):
        info = storage.stat(key) if key and not want_prefix else None
        if info is not None:
            side = storage.stat(key + SIDECAR_SUFFIX)
            sidecar = _parse_sidecar(storage.read_text(side.key), s) if side else None
            _fetch_object(storage, info, sidecar, data_root / key,
                          meta_root / (key + ".json"), verify)
            return data_root / key

        prefix = key + "/" if key else ""
        objects = storage.list(prefix)
        if not objects:
            raise StorageNotFoundError(f"{s} does not exist (no object, nothing under the "
                                       f"prefix) at {storage.endpoint_display}", uri=s)
        by_key = {o.key: o for o in objects}
        folder = data_root / key if key else data_root
        meta_folder = meta_root / key if key else meta_root
        wanted = set()
        downloaded = 0
        for o in objects:
            rel = _safe_relative(o.key[len(prefix):], s)
            if rel.endswith(SIDECAR_SUFFIX) and rel[:-len(SIDECAR_SUFFIX)] and \
                    (prefix + rel[:-len(SIDECAR_SUFFIX)]) in by_key:
                continue
            side = by_key.get(o.key + SIDECAR_SUFFIX)
            sidecar = _parse_sidecar(storage.read_text(side.key), storage.url(o.key)) \
                if side else None
            wanted.add(rel)
            downloaded += _fetch_object(storage, o, sidecar, folder / rel,
                                        meta_folder / (rel + ".json"), verify)
        # Mirror deletions, so a model folder never keeps a stale shard.
        for dirpath, _, filenames in os.walk(folder):
            for name in filenames:
                p = Path(dirpath) / name
                rel = p.relative_to(folder).as_posix()
                if rel not in wanted:
                    p.unlink()
                    (meta_folder / (rel + ".json")).unlink(missing_ok=True)
        for dirpath, _, _ in os.walk(folder, topdown=False):
            if Path(dirpath) != folder:
                try:
                    os.rmdir(dirpath)  # only succeeds when empty
                except OSError:
                    pass
        log.info("%s: %d of %d files downloaded, the rest cached, in %s", s, downloaded,
                 len(wanted), folder)
        return folder

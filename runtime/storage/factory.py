"""Open a storage from its URI: ``s3://bucket/prefix``, ``file:///dir`` or a plain path."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlsplit

from .base import Storage
from .errors import StorageError
from .local import LocalStorage


def split_s3_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/some/key`` into ``("bucket", "some/key")``.

    Raises:
        StorageError: not an ``s3://`` URI or no bucket.
    """
    parts = urlsplit(uri)
    if parts.scheme != "s3" or not parts.netloc:
        raise StorageError(f"invalid S3 URI {uri!r}: use s3://<bucket>/<key or prefix>", uri=uri)
    return parts.netloc, parts.path.lstrip("/")


def is_local_uri(uri: str | os.PathLike) -> bool:
    """True for ``file://`` URIs and plain paths, False for ``s3://`` (and other schemes)."""
    s = os.fspath(uri)
    scheme = urlsplit(s).scheme
    return scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt")


def local_path_of(uri: str | os.PathLike) -> Path:
    """The filesystem path of a ``file://`` URI or plain path (``~`` expanded, made absolute)."""
    s = os.fspath(uri)
    if s.startswith("file://"):
        parts = urlsplit(s)
        if parts.netloc not in ("", "localhost"):
            raise StorageError(f"file URI {s!r} names a remote host; use file:///absolute/path",
                               uri=s)
        s = unquote(parts.path)
    return Path(s).expanduser().absolute()


def open_storage(uri: str | os.PathLike, *, endpoint: str | None = None,
                 region: str | None = None, addressing_style: str = "path",
                 credentials_dir: str | os.PathLike | None = None, **s3_options) -> Storage:
    """Open the storage rooted at `uri`.

    Args:
        uri: ``s3://bucket[/prefix]`` for S3-compatible storage; ``file:///abs/dir`` or a plain
            path (relative paths are resolved against the current directory) for a local folder.
        endpoint: S3 endpoint URL (MinIO/Ceph/...); None for AWS or the ``AWS_ENDPOINT_URL*``
            env. Ignored for local folders.
        region: S3 region; default from the environment, else ``us-east-1``.
        addressing_style: ``"path"`` (default, what MinIO/Ceph expect), ``"virtual"``, ``"auto"``.
        credentials_dir: a mounted Secret directory with files ``accessKeyId`` and
            ``secretAccessKey``; default env ``KUBETUNE_S3_CREDENTIALS_DIR``, then the standard
            AWS environment variables and config chain.
        **s3_options: further `S3Storage` options (retry_mode, max_attempts, connect_timeout,
            read_timeout, multipart_threshold, multipart_chunksize, max_concurrency).

    No network request is made here; call `Storage.check()` to fail fast on a missing bucket
    or rejected credentials.

    Raises:
        StorageError: the URI is malformed or uses an unsupported scheme.
    """
    s = os.fspath(uri)
    if is_local_uri(s):
        return LocalStorage(local_path_of(s))
    scheme = urlsplit(s).scheme
    if scheme == "s3":
        from .s3 import S3Storage  # boto3 is imported only when S3 is used

        bucket, prefix = split_s3_uri(s)
        return S3Storage(bucket, prefix, endpoint=endpoint, region=region,
                         addressing_style=addressing_style, credentials_dir=credentials_dir,
                         **s3_options)
    raise StorageError(f"unsupported storage URI {s!r}: use s3://<bucket>/<prefix>, "
                       f"file:///<path> or a plain folder path", uri=s)

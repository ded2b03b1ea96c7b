"""S3-compatible backend (AWS S3, MinIO, Ceph RGW, ...) on boto3.

* Large files go through boto3's managed transfers (`TransferConfig`: multipart above a threshold,
  parallel parts); there is no hand-written multipart code here.
* Throttling, 5xx answers and connection errors are retried by botocore's retry handler
  (`standard` or `adaptive` mode, `max_attempts`); callers that need to outlast a longer outage
  (the background uploader) retry on top, guided by `StorageError.retryable`.
* Checksums: botocore >= 1.36 adds CRC trailers to every upload by default, which several
  S3-compatible servers reject; we ask for checksums only where an operation requires one.
* Credentials come, in order, from: explicit arguments; a mounted Secret directory
  (`credentials_dir` or env `KUBETUNE_S3_CREDENTIALS_DIR`, files `accessKeyId` and
  `secretAccessKey`, optional `sessionToken`; the `AWS_*` spellings are accepted too); otherwise
  boto3's default chain (env `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, shared config files,
  web identity / IRSA, instance metadata). Secrets never appear in messages or logs.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import boto3
import boto3.exceptions
import botocore.exceptions as bce
import botocore.session
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.loaders import create_loader

from .base import ObjectInfo, Storage, normalize_key, normalize_prefix
from .errors import StorageError, StorageNotFoundError

log = logging.getLogger(__name__)

CREDENTIALS_DIR_ENV = "KUBETUNE_S3_CREDENTIALS_DIR"

_ACCESS_KEY_FILES = ("accessKeyId", "AWS_ACCESS_KEY_ID", "access-key-id", "accesskey")
_SECRET_KEY_FILES = ("secretAccessKey", "AWS_SECRET_ACCESS_KEY", "secret-access-key", "secretkey")
_TOKEN_FILES = ("sessionToken", "AWS_SESSION_TOKEN", "session-token")

MiB = 1024 * 1024

# botocore >= 1.36 adds CRC32 checksums to every upload unless told otherwise; MinIO/Ceph
# releases that predate that reject them. Older botocore has neither the option nor the issue.
_CHECKSUM_OPTIONS = (
    {"request_checksum_calculation": "when_required",
     "response_checksum_validation": "when_required"}
    if "request_checksum_calculation" in Config.OPTION_DEFAULTS else {})

_NO_BUCKET = {"NoSuchBucket"}
_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_BAD_CREDENTIALS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
                    "InvalidClientTokenId", "TokenRefreshRequired", "InvalidSecurity"}
_DENIED = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled"}
_WRONG_REGION = {"AuthorizationHeaderMalformed", "PermanentRedirect", "301",
                 "IllegalLocationConstraintException"}
_TRANSIENT = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError",
              "ServiceUnavailable", "RequestLimitExceeded", "TooManyRequests",
              "XMinioServerNotInitialized", "500", "502", "503", "504"}
_BOTO_ERRORS = (bce.BotoCoreError, bce.ClientError, boto3.exceptions.Boto3Error, OSError)
_CONNECTION_ERRORS = (bce.HTTPClientError, bce.ConnectionError, bce.ResponseStreamingError,
                      bce.IncompleteReadError)


_loader = None
_loader_lock = threading.Lock()


def _botocore_session():
    """A fresh botocore session (own credentials/config) sharing one service-model loader, so
    opening another storage costs ~0.1s instead of re-parsing the S3 model (~0.3s)."""
    global _loader
    with _loader_lock:
        if _loader is None:
            _loader = create_loader()
    session = botocore.session.get_session()
    session.register_component("data_loader", _loader)
    return session


@dataclass(frozen=True)
class S3Credentials:
    """Static S3 credentials. `repr()` never shows the values."""

    access_key_id: str = field(repr=False)
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)
    #: Where they came from, for error messages (never the values themselves).
    source: str = "explicit arguments"


def load_credentials_dir(directory: str | os.PathLike) -> S3Credentials:
    """Read credentials from a mounted Secret directory (one file per key).

    Accepted file names: ``accessKeyId`` / ``AWS_ACCESS_KEY_ID``, ``secretAccessKey`` /
    ``AWS_SECRET_ACCESS_KEY``, optional ``sessionToken`` / ``AWS_SESSION_TOKEN``.

    Raises:
        StorageError: the directory or a required file is missing or empty.
    """
    d = Path(directory)
    if not d.is_dir():
        raise StorageError(f"the S3 credentials directory {d} does not exist: check the Secret "
                           f"named by spec.storage.credentialsSecretRef and its mount")

    def read(names: tuple[str, ...], required: bool) -> str | None:
        for name in names:
            p = d / name
            if p.is_file():
                value = p.read_text(encoding="utf-8").strip()
                if value:
                    return value
        if required:
            raise StorageError(f"the S3 credentials directory {d} has no non-empty file "
                               f"{names[0]!r} (or {', '.join(repr(n) for n in names[1:])}): "
                               f"add that key to the Secret")
        return None

    return S3Credentials(access_key_id=read(_ACCESS_KEY_FILES, True),
                         secret_access_key=read(_SECRET_KEY_FILES, True),
                         session_token=read(_TOKEN_FILES, False),
                         source=f"the Secret files in {d}")


def _display_endpoint(endpoint: str | None, region: str) -> str:
    if not endpoint:
        return f"AWS S3 ({region})"
    parts = urlsplit(endpoint)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _find_cause(exc: BaseException) -> BaseException:
    """The most informative botocore/OS error in `exc`'s chain (boto3 wraps them)."""
    seen: set[int] = set()
    chain = []
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = getattr(e, "last_exception", None) or e.__cause__ or e.__context__
    for kind in (bce.ClientError, bce.BotoCoreError, OSError):
        for c in chain:
            if isinstance(c, kind):
                return c
    return exc


class S3Storage(Storage):
    """Objects in an S3 bucket under an optional prefix.

    Args:
        bucket: the bucket name.
        prefix: the root prefix inside the bucket ("" for the bucket root).
        endpoint: endpoint URL for S3-compatible servers (``http://minio.storage:9000``);
            None for AWS (or botocore's ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` env).
        region: region name; default from the environment/config, else ``us-east-1``.
        addressing_style: ``"path"`` (MinIO/Ceph default), ``"virtual"`` or ``"auto"``.
        credentials: explicit credentials; overrides everything else.
        credentials_dir: a mounted Secret directory; default env ``KUBETUNE_S3_CREDENTIALS_DIR``.
        retry_mode: botocore retry mode, ``"standard"`` or ``"adaptive"`` (client-side rate
            limiting on throttling).
        max_attempts: total attempts per request, including the first.
        connect_timeout, read_timeout: seconds per attempt.
        multipart_threshold, multipart_chunksize: bytes; files at/above the threshold are sent
            as multipart uploads in chunks (boto3 enlarges chunks to stay within 10,000 parts).
        max_concurrency: parallel part transfers per file.
    """

    def __init__(self, bucket: str, prefix: str = "", *, endpoint: str | None = None,
                 region: str | None = None, addressing_style: str = "path",
                 credentials: S3Credentials | None = None,
                 credentials_dir: str | os.PathLike | None = None,
                 retry_mode: str = "standard", max_attempts: int = 5,
                 connect_timeout: float = 10.0, read_timeout: float = 60.0,
                 multipart_threshold: int = 16 * MiB, multipart_chunksize: int = 16 * MiB,
                 max_concurrency: int = 8):
        if addressing_style not in ("path", "virtual", "auto"):
            raise ValueError(f"addressing_style must be 'path', 'virtual' or 'auto', "
                             f"not {addressing_style!r}")
        if retry_mode not in ("standard", "adaptive", "legacy"):
            raise ValueError(f"retry_mode must be 'standard' or 'adaptive', not {retry_mode!r}")
        if not bucket:
            raise StorageError("the S3 URI names no bucket: use s3://<bucket>/<prefix>")
        self.bucket = bucket
        self.prefix = normalize_prefix(prefix)
        self.uri = f"s3://{bucket}/{self.prefix}"
        if endpoint is not None and urlsplit(endpoint).scheme not in ("http", "https"):
            raise StorageError(f"invalid S3 endpoint {_display_endpoint(endpoint, '')!r} for "
                               f"{self.uri}: use a URL like http://minio.storage:9000",
                               uri=self.uri)

        if credentials is None:
            cdir = credentials_dir or os.environ.get(CREDENTIALS_DIR_ENV) or None
            if cdir:
                credentials = load_credentials_dir(cdir)
        kwargs = {}
        if credentials is not None:
            kwargs = dict(aws_access_key_id=credentials.access_key_id,
                          aws_secret_access_key=credentials.secret_access_key,
                          aws_session_token=credentials.session_token)
        region = region or os.environ.get("AWS_REGION") or None
        session = boto3.session.Session(region_name=region, botocore_session=_botocore_session(),
                                        **kwargs)
        self.region = session.region_name or "us-east-1"
        self._secrets = [s for s in ((credentials.access_key_id, credentials.secret_access_key,
                                      credentials.session_token) if credentials else ()) if s]
        if credentials is not None:
            self._credentials_source = credentials.source
        else:
            found = session.get_credentials()
            method = getattr(found, "method", None)
            if found is not None:
                fz = found.get_frozen_credentials()
                self._secrets += [s for s in (fz.access_key, fz.secret_key, fz.token) if s]
            self._credentials_source = {
                "env": "the AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY environment variables",
                "shared-credentials-file": "the shared AWS credentials file",
                "config-file": "the AWS config file",
                "assume-role-with-web-identity": "the web identity token (IRSA)",
                "iam-role": "the instance metadata role",
            }.get(method or "", "boto3's default credential chain")

        config = Config(
            region_name=self.region,
            signature_version="s3v4",
            retries={"mode": retry_mode, "max_attempts": max_attempts},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=max(10, max_concurrency + 2),
            s3={"addressing_style": addressing_style},
            tcp_keepalive=True,
            **_CHECKSUM_OPTIONS,
        )
        self._client = session.client("s3", endpoint_url=endpoint, config=config)
        #: The endpoint in use, without any user-info part (safe to show).
        self.endpoint_display = _display_endpoint(self._client.meta.endpoint_url, self.region)
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold, multipart_chunksize=multipart_chunksize,
            max_concurrency=max_concurrency, use_threads=True,
            preferred_transfer_client="classic")

    def __repr__(self) -> str:
        return f"S3Storage({self.uri!r}, endpoint={self.endpoint_display!r})"

    @property
    def client(self):
        """The underlying boto3 S3 client (thread-safe)."""
        return self._client

    def _key(self, key: str) -> str:
        return self.prefix + normalize_key(key)

    def _rel(self, full_key: str) -> str:
        return full_key[len(self.prefix):]

    # --- errors ------------------------------------------------------------------------------

    def _redact(self, text: str) -> str:
        for s in self._secrets:
            text = text.replace(s, "***")
        return text

    def _error(self, exc: BaseException, op: str, key: str = "") -> StorageError:
        """Translate a boto3/botocore exception into a StorageError that says what to check."""
        uri = self.url(key)
        ep = self.endpoint_display
        cause = _find_cause(exc)
        retryable = False
        cls = StorageError
        if isinstance(cause, bce.ClientError):
            err = cause.response.get("Error", {})
            code = str(err.get("Code") or "")
            status = cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            server_msg = str(err.get("Message") or "")
            if code in _NO_BUCKET:
                msg = (f"S3 bucket {self.bucket!r} does not exist at {ep} (storage URI {uri}): "
                       f"create the bucket, or fix the bucket name in the URI / the endpoint")
            elif code in _BAD_CREDENTIALS:
                msg = (f"S3 at {ep} rejected the credentials ({code}) while trying to {op} "
                       f"{uri}: check the access key id and secret access key in "
                       f"{self._credentials_source}")
            elif code in _DENIED:
                msg = (f"S3 at {ep} denied {op} on {uri} ({code}, HTTP {status}): the "
                       f"credentials from {self._credentials_source} were rejected or lack "
                       f"permission (s3:ListBucket, s3:GetObject, s3:PutObject, "
                       f"s3:DeleteObject on bucket {self.bucket!r})")
            elif code in _WRONG_REGION:
                msg = (f"S3 at {ep} refused to {op} {uri} ({code}): the bucket is probably in "
                       f"another region than {self.region!r}; set the storage region, or "
                       f"check the endpoint and addressing style")
            elif code in _NOT_FOUND:
                cls = StorageNotFoundError
                msg = f"{uri} does not exist"
            elif code in _TRANSIENT or status >= 500:
                retryable = True
                msg = (f"S3 at {ep} is unavailable or throttling ({code or status}) while "
                       f"trying to {op} {uri}; it was retried and may succeed later")
            else:
                msg = (f"S3 at {ep} failed to {op} {uri}: {code or status}"
                       + (f": {server_msg}" if server_msg else ""))
        elif isinstance(cause, (bce.NoCredentialsError, bce.PartialCredentialsError)):
            msg = (f"no S3 credentials found for {uri}: set AWS_ACCESS_KEY_ID and "
                   f"AWS_SECRET_ACCESS_KEY, or mount the Secret and point "
                   f"{CREDENTIALS_DIR_ENV} at it (files accessKeyId, secretAccessKey)")
        elif isinstance(cause, _CONNECTION_ERRORS):
            retryable = True
            msg = (f"cannot reach the S3 endpoint {ep} to {op} {uri} "
                   f"({type(cause).__name__}): check the endpoint URL, DNS, network policies "
                   f"and that the server is running")
        elif isinstance(cause, OSError):
            retryable = True  # the pod's own disk (full, or a folder gone): not the user's input
            msg = f"local I/O error while trying to {op} {uri}: {cause}"
        else:
            msg = f"S3 {op} failed on {uri}: {type(cause).__name__}: {cause}"
        return cls(self._redact(msg), uri=uri, retryable=retryable)

    def _bucket_missing(self) -> bool:
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except bce.ClientError as e:
            code = str(e.response.get("Error", {}).get("Code") or "")
            return code in _NO_BUCKET or code in ("404", "NotFound")
        except Exception:
            return False
        return False

    def _not_found(self, exc: BaseException, op: str, key: str) -> StorageError:
        """A 404 on an object: say so, unless it is the bucket that is missing."""
        if self._bucket_missing():
            return self._error(bce.ClientError({"Error": {"Code": "NoSuchBucket"}}, op), op, key)
        return StorageNotFoundError(f"{self.url(key)} does not exist", uri=self.url(key))

    @staticmethod
    def _is_404(exc: BaseException) -> bool:
        c = _find_cause(exc)
        return (isinstance(c, bce.ClientError)
                and str(c.response.get("Error", {}).get("Code") or "") in _NOT_FOUND)

    # --- objects -----------------------------------------------------------------------------

    def put_file(self, local_path, key):
        full = self._key(key)
        local_path = Path(local_path)
        try:
            size = local_path.stat().st_size
        except OSError as e:
            raise StorageError(f"local file {local_path} to upload to {self.url(key)} cannot "
                               f"be read: {e.strerror or e}", uri=self.url(key)) from e
        try:
            self._client.upload_file(str(local_path), self.bucket, full, Config=self._transfer)
        except _BOTO_ERRORS as e:
            raise self._error(e, "upload to", key) from None
        return size

    def get_file(self, key, local_path):
        full = self._key(key)
        local_path = Path(local_path)
        local_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # s3transfer writes a temporary file and renames it when complete.
            self._client.download_file(self.bucket, full, str(local_path), Config=self._transfer)
        except _BOTO_ERRORS as e:
            if self._is_404(e):
                raise self._not_found(e, "download", key) from None
            raise self._error(e, "download", key) from None
        return local_path

    def write_bytes(self, key, data):
        full = self._key(key)
        try:
            self._client.put_object(Bucket=self.bucket, Key=full, Body=data)
        except _BOTO_ERRORS as e:
            raise self._error(e, "write", key) from None

    def read_bytes(self, key):
        full = self._key(key)
        try:
            resp = self._client.get_object(Bucket=self.bucket, Key=full)
            return resp["Body"].read()
        except _BOTO_ERRORS as e:
            if self._is_404(e):
                raise self._not_found(e, "read", key) from None
            raise self._error(e, "read", key) from None

    def stat(self, key):
        full = self._key(key)
        try:
            resp = self._client.head_object(Bucket=self.bucket, Key=full)
        except _BOTO_ERRORS as e:
            if self._is_404(e):
                err = self._not_found(e, "read", key)
                if isinstance(err, StorageNotFoundError):
                    return None
                raise err from None
            raise self._error(e, "read", key) from None
        lm = resp.get("LastModified")
        return ObjectInfo(key=normalize_key(key), size=int(resp["ContentLength"]),
                          etag=str(resp.get("ETag", "")).strip('"') or None,
                          last_modified=lm.timestamp() if lm else None)

    def delete(self, key):
        full = self._key(key)
        try:
            self._client.delete_object(Bucket=self.bucket, Key=full)
        except _BOTO_ERRORS as e:
            if self._is_404(e):
                return
            raise self._error(e, "delete", key) from None

    # --- prefixes ----------------------------------------------------------------------------

    def list(self, prefix=""):
        norm = normalize_prefix(prefix)
        out = []
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + norm)
            for page in pages:
                for obj in page.get("Contents", ()):
                    if obj["Key"].endswith("/"):  # folder placeholder made by consoles
                        continue
                    lm = obj.get("LastModified")
                    out.append(ObjectInfo(key=self._rel(obj["Key"]), size=int(obj["Size"]),
                                          etag=str(obj.get("ETag", "")).strip('"') or None,
                                          last_modified=lm.timestamp() if lm else None))
        except _BOTO_ERRORS as e:
            raise self._error(e, "list", norm) from None
        out.sort(key=lambda o: o.key)
        return out

    def list_dirs(self, prefix=""):
        norm = normalize_prefix(prefix)
        base = self.prefix + norm
        names = set()
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=base, Delimiter="/")
            for page in pages:
                for cp in page.get("CommonPrefixes", ()):
                    name = cp["Prefix"][len(base):].strip("/")
                    if name:
                        names.add(name)
        except _BOTO_ERRORS as e:
            raise self._error(e, "list", norm) from None
        return sorted(names)

    def delete_prefix(self, prefix):
        norm = normalize_prefix(prefix)
        if not norm:
            raise ValueError("refusing to delete the whole storage root; give a prefix")
        keys = [self.prefix + o.key for o in self.list(norm)]
        for i in range(0, len(keys), 1000):
            batch = keys[i:i + 1000]
            try:
                resp = self._client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
            except bce.ClientError as e:
                code = str(e.response.get("Error", {}).get("Code") or "")
                if code not in ("NotImplemented", "MissingContentMD5", "InvalidRequest"):
                    raise self._error(e, "delete", norm) from None
                # Some S3-compatible servers lack DeleteObjects or its checksum flavour.
                for k in batch:
                    self.delete(self._rel(k))
                continue
            except _BOTO_ERRORS as e:
                raise self._error(e, "delete", norm) from None
            errors = resp.get("Errors") or []
            if errors:
                first = errors[0]
                raise StorageError(self._redact(
                    f"S3 at {self.endpoint_display} failed to delete {len(errors)} object(s) "
                    f"under {self.url(norm)}, e.g. {first.get('Key')}: {first.get('Code')}"),
                    uri=self.url(norm))
        return len(keys)

    def check(self):
        try:
            self._client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
        except _BOTO_ERRORS as e:
            raise self._error(e, "list", "") from None

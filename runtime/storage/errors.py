"""Errors raised by the storage layer.

Every failure of a storage operation surfaces as a `StorageError` whose message names the URI
involved and what to check. Messages never contain credentials: the S3 backend builds them from
error codes and redacts the secret values it knows of, and endpoint URLs are shown without any
user-info part.
"""

from __future__ import annotations

# Mirrors the exit codes of kubetune.runtime.errors: 42 = bad input (permanent, the user must fix
# the spec or a Secret), 1 = environment problem (retrying the pod may help).
_EXIT_FAILED = 1
_EXIT_BAD_INPUT = 42


class StorageError(Exception):
    """A storage operation failed; the message says which URI and what to check.

    Attributes:
        uri: the storage URI (bucket/prefix or folder, or the object) the operation was about.
        retryable: True when the cause is likely transient (endpoint unreachable, throttling,
            5xx answers): retrying later may succeed. False for problems a user must fix
            (missing bucket, rejected credentials, missing object, corrupt data).
        exit_code: the process exit code the runtime should use when this error ends a stage:
            1 when retryable, 42 (bad input, permanent) when the user must fix something.
    """

    def __init__(self, message: str, *, uri: str | None = None, retryable: bool = False):
        super().__init__(message)
        self.message = message
        self.uri = uri
        self.retryable = retryable

    @property
    def exit_code(self) -> int:
        return _EXIT_FAILED if self.retryable else _EXIT_BAD_INPUT


class StorageNotFoundError(StorageError):
    """The object (or prefix) does not exist."""


class StorageIntegrityError(StorageError):
    """Stored or downloaded data does not match its manifest (size or sha256)."""

    @property
    def exit_code(self) -> int:
        return _EXIT_FAILED


class CheckpointUploadError(StorageError):
    """A background checkpoint upload failed for good; the local copy was kept."""

    def __init__(self, message: str, *, uri: str | None = None, local_dir: str | None = None,
                 retryable: bool = True):
        super().__init__(message, uri=uri, retryable=retryable)
        self.local_dir = local_dir

    @property
    def exit_code(self) -> int:
        return _EXIT_FAILED

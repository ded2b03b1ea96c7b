"""Errors raised by the storage layer.

Every failure of a storage operation surfaces as a `StorageError` whose message names the URI
involved and what to check. Messages never contain credentials: the S3 backend builds them from
error codes and redacts the secret values it knows of, and endpoint URLs are shown without any
user-info part.
"""

from __future__ import annotations

# The exit codes come from the one table of failures (kubetune.runtime.api.errors.classify).


class StorageError(Exception):
    """A storage operation failed; the message says which URI and what to check.

    Attributes:
        uri: the storage URI (bucket/prefix or folder, or the object) the operation was about.
        retryable: True when the cause is likely transient (endpoint unreachable, throttling,
            5xx answers): retrying later may succeed. False for problems a user must fix
            (missing bucket, rejected credentials, missing object, corrupt data).
        exit_code: the process exit code the runtime uses when this error ends a stage, from
            the table of failures (errors.classify): 75 (StorageUnavailable) when retryable, 42
            (BadInput, permanent) when the user must fix something, 74 for integrity errors.
    """

    def __init__(self, message: str, *, uri: str | None = None, retryable: bool = False):
        super().__init__(message)
        self.message = message
        self.uri = uri
        self.retryable = retryable

    @property
    def exit_code(self) -> int:
        from ..api.errors import exit_code_for

        return exit_code_for(self)


class StorageNotFoundError(StorageError):
    """The object (or prefix) does not exist."""


class StorageIntegrityError(StorageError):
    """Stored or downloaded data does not match its manifest (size or sha256). Retryable
    (another download may succeed); a corrupt checkpoint never ends a stage: resume falls back
    to the previous committed one, or to a start from scratch."""

    def __init__(self, message: str, *, uri: str | None = None, retryable: bool = True):
        super().__init__(message, uri=uri, retryable=retryable)


class CheckpointUploadError(StorageError):
    """A background checkpoint upload failed for good; the local copy was kept."""

    def __init__(self, message: str, *, uri: str | None = None, local_dir: str | None = None,
                 retryable: bool = True):
        super().__init__(message, uri=uri, retryable=retryable)
        self.local_dir = local_dir

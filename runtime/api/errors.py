"""Errors a user can cause, and the one table of failures: every error the runtime can meet →
its exit code, whether a retry can help, the reason the operator shows, and what it means.

A `UserError` is bad input: a field, a file or a dataset that is wrong. It is permanent —
retrying cannot fix it — so the runtime exits with `EXIT_BAD_INPUT`, the operator's Job
`podFailurePolicy` fails the stage at once, and the message (never a stack trace) becomes the
pod's termination message and the FineTuneJob's Failed condition.

`classify(err)` maps any exception to its row of `FAILURES`. `kubetune run`, the pod's `stage`
command and the torchrun launcher all exit by it; the operator (which imports this torch-free
module) builds its podFailurePolicy from the rows that must not be retried and reads a failed
pod's exit code back into the row's reason (docs/failures.md lists the table).
"""

from __future__ import annotations

from dataclasses import dataclass

# Exit codes of `python -m kubetune.runtime` and `kubetune run`.
EXIT_OK = 0
EXIT_FAILED = 1  # a bug or an environment problem: retrying may help
EXIT_BAD_INPUT = 42  # permanent: the spec, a dataset or a model is wrong; do not retry
EXIT_OUT_OF_MEMORY = 43  # permanent until the job asks for less memory: do not retry
EXIT_STORAGE_INTEGRITY = 74  # sysexits EX_IOERR: stored data differs from its commit marker
EXIT_STORAGE_UNAVAILABLE = 75  # sysexits EX_TEMPFAIL: storage unreachable after the wait
EXIT_KILLED = 137  # 128 + SIGKILL: never the runtime's own choice (kernel OOM killer, grace over)
EXIT_INTERRUPTED = 143  # 128 + SIGTERM: stopped (drain, preemption, suspend) after a checkpoint


@dataclass(frozen=True)
class Failure:
    """One row of the table of failures."""

    reason: str  # the FineTuneJob's Failed condition reason (CamelCase, Kubernetes style)
    exit_code: int
    retryable: bool  # False: the operator's podFailurePolicy fails the stage at once
    meaning: str


FAILURES: dict[str, Failure] = {f.reason: f for f in (
    Failure("BadInput", EXIT_BAD_INPUT, False,
            "the spec, a dataset, a model or a Secret is wrong (the message names the field or file); "
            "fix it and apply again"),
    Failure("OutOfMemory", EXIT_OUT_OF_MEMORY, False,
            "the stage ran out of GPU or host memory; a retry would hit the same wall. The message has "
            "the peak memory seen, `kubetune estimate`'s figure and the knobs that lower it"),
    Failure("StorageUnavailable", EXIT_STORAGE_UNAVAILABLE, True,
            "storage stayed unreachable (after waiting KUBETUNE_STORAGE_WAIT_SECONDS at stage start, or "
            "the upload retry deadline); a retry resumes from the last committed checkpoint"),
    Failure("StorageIntegrity", EXIT_STORAGE_INTEGRITY, True,
            "a stored file (an input or a committed output) differs from its commit marker's sha256; a "
            "retry downloads it again. A corrupt checkpoint never ends here: resume falls back to the "
            "previous committed checkpoint, or starts from scratch"),
    Failure("Interrupted", EXIT_INTERRUPTED, True,
            "SIGTERM (node drain, preemption, suspend, delete): a checkpoint was committed first when "
            "training was under way; the next run resumes from it"),
    Failure("Killed", EXIT_KILLED, True,
            "SIGKILL (a crash, a kill, the grace period ran out): retried, resuming from the last committed "
            "checkpoint. When the container status says OOMKilled (the kernel's OOM killer) the operator "
            "ends the stage as OutOfMemory instead; the runtime never exits with 137 itself"),
    Failure("StageFailed", EXIT_FAILED, True,
            "anything else (a bug, a lost peer, a driver error): retried up to runPolicy.backoffLimit, "
            "each retry from the last committed checkpoint"),
)}

BY_EXIT_CODE: dict[int, Failure] = {f.exit_code: f for f in FAILURES.values()}
# exit codes the operator's podFailurePolicy fails the stage on at once (no retries)
PERMANENT_EXIT_CODES = tuple(sorted(f.exit_code for f in FAILURES.values() if not f.retryable))


class UserError(Exception):
    """Bad input. `where` names the field path or the file at fault."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str, where: str | None = None):
        self.where = where
        self.message = message
        super().__init__(f"{where}: {message}" if where else message)


class SpecError(UserError):
    """The FineTuneJob spec is invalid. Carries every problem found, one per line."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        self.source = source
        head = f"{source}: " if source else ""
        if len(problems) == 1:
            text = f"{head}invalid FineTuneJob: {problems[0]}"
        else:
            text = f"{head}invalid FineTuneJob ({len(problems)} problems):\n" + "\n".join(
                f"  - {p}" for p in problems
            )
        super().__init__(text)


class DataError(UserError):
    """A dataset is missing, malformed, or lacks what its format needs."""


class Interrupted(Exception):
    """The stage stopped on SIGTERM; `checkpoint` names what was committed first (or None)."""

    exit_code = EXIT_INTERRUPTED

    def __init__(self, message: str, checkpoint: str | None = None):
        super().__init__(message)
        self.checkpoint = checkpoint


class OutOfMemory(Exception):
    """An out-of-memory error, with the peak seen and advice (built by local.out_of_memory)."""

    exit_code = EXIT_OUT_OF_MEMORY


_OOM_TEXT = ("CUDA out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "out of memory", "DefaultCPUAllocator: can't allocate")


def is_out_of_memory(err: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError (and its MPS/XPU kin), a RuntimeError saying "out of memory"
    (older torch, cuBLAS, the CPU allocator), or the host's MemoryError — anywhere in the chain."""
    seen = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (MemoryError, OutOfMemory)) or type(e).__name__ == "OutOfMemoryError":
            return True
        if isinstance(e, RuntimeError) and any(t in str(e) for t in _OOM_TEXT):
            return True
        e = e.__cause__ or e.__context__
    return False


def classify(err: BaseException) -> Failure:
    """The row of `FAILURES` an exception that ended a stage belongs to."""
    from ..storage.errors import CheckpointUploadError, StorageError, StorageIntegrityError

    if isinstance(err, UserError):
        return FAILURES["BadInput"]
    if isinstance(err, Interrupted):
        return FAILURES["Interrupted"]
    if is_out_of_memory(err):
        return FAILURES["OutOfMemory"]
    if isinstance(err, StorageIntegrityError):
        return FAILURES["StorageIntegrity"]
    if isinstance(err, StorageError):
        if isinstance(err, CheckpointUploadError):  # what made the upload fail decides
            cause = err.__cause__ or err.__context__
            if cause is not None:
                return classify(cause)  # e.g. the bucket vanished mid-stage: bad input
            return FAILURES["StorageUnavailable"] if err.retryable else FAILURES["StageFailed"]
        return FAILURES["StorageUnavailable"] if err.retryable else FAILURES["BadInput"]
    return FAILURES["StageFailed"]


def combine_exit_codes(codes) -> int:
    """One exit code for a pod whose training processes failed with `codes` (torchrun: negative
    = killed by that signal): a permanent failure of any rank wins (bad input before out of
    memory), then the most specific retryable one; SIGTERM-killed ranks count as Interrupted."""
    known = []
    for c in codes:
        c = 128 - c if c is not None and c < 0 else c
        if c in BY_EXIT_CODE and c != EXIT_OK:
            known.append(BY_EXIT_CODE[c])
    order = list(FAILURES)
    for f in sorted(known, key=lambda f: (f.retryable, f.exit_code == EXIT_FAILED, order.index(f.reason))):
        if f.exit_code != EXIT_KILLED:  # a SIGKILLed rank says nothing by itself
            return f.exit_code
    return EXIT_FAILED


def exit_code_for(err: BaseException) -> int:
    return classify(err).exit_code


def termination_text(err: BaseException) -> str:
    """The termination message of a pod that failed with `err` (the operator's Failed condition
    shows it; it reads the reason from the exit code). Never a stack trace."""
    reason = classify(err).reason
    if reason == "BadInput":
        return f"bad input: {err}"
    if reason == "OutOfMemory" and not isinstance(err, OutOfMemory):
        return f"out of memory: {type(err).__name__}: {err}"
    if reason == "StageFailed":
        return f"{type(err).__name__}: {err}"
    return str(err)

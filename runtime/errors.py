"""Errors a user can cause, and the exit codes the runtime reports them with.

A `UserError` is bad input: a field, a file or a dataset that is wrong. It is permanent —
retrying cannot fix it — so the runtime exits with `EXIT_BAD_INPUT`, the operator's Job
`podFailurePolicy` fails the stage at once, and the message (never a stack trace) becomes the
pod's termination message and the FineTuneJob's Failed condition.
"""

from __future__ import annotations

# Exit codes of `python -m kubetune.runtime` and `kubetune run`.
EXIT_OK = 0
EXIT_FAILED = 1  # a bug or an environment problem: retrying may help
EXIT_BAD_INPUT = 42  # permanent: the spec, a dataset or a model is wrong; do not retry


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

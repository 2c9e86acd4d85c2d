"""Errors a user can act on. The CLI maps each to an exit code and prints its message, no traceback.

    GateFailed          exit 1  an accuracy gate or a latency target was missed
    UserInputError      exit 2  bad input: a recipe, a path, a flag, a corrupt or truncated file
    EnvironmentFailure  exit 3  the machine: a full disk, missing permissions, a read-only output
"""

from __future__ import annotations


class InferforgeError(Exception):
    """Base class: the message names the problem and the fix."""

    exit_code = 2


class UserInputError(InferforgeError, ValueError):
    """Bad input: a recipe, a path, a flag or an argument (exit code 2).

    Also a `ValueError`, so Python callers that catch `ValueError` for bad arguments catch it too."""

    exit_code = 2


class RecipeError(UserInputError):
    """A recipe that does not validate; raised before any work starts."""


class ArtifactError(UserInputError):
    """An artifact directory that is incomplete, tampered with or not an artifact at all."""


class EnvironmentFailure(InferforgeError):
    """The machine, not the input: a full disk, missing permissions, a read-only output (exit code 3)."""

    exit_code = 3


class GateFailed(InferforgeError):
    """An accuracy gate or a latency target was missed (exit code 1).

    `check`, when given, is the missed check as a run report records it (name, kind, measured, op,
    limit), so that a run can report it; `report_dir` is where the failed run's reports are."""

    exit_code = 1

    def __init__(self, message: str, *, report_dir: str | None = None, check: dict | None = None):
        super().__init__(message)
        self.report_dir = report_dir
        self.check = check

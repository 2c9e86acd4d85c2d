"""Errors a user can act on. The CLI maps each to an exit code and prints its message, no traceback."""

from __future__ import annotations


class InferforgeError(Exception):
    """Base class: the message names the problem and the fix."""

    exit_code = 2


class UserInputError(InferforgeError):
    """Bad input: a recipe, a path, a flag or an argument (exit code 2)."""

    exit_code = 2


class RecipeError(UserInputError):
    """A recipe that does not validate; raised before any work starts."""


class ArtifactError(UserInputError):
    """An artifact directory that is incomplete, tampered with or not an artifact at all."""


class GateFailed(InferforgeError):
    """An accuracy gate or a latency target was missed (exit code 1).

    `check`, when given, is the missed check as a run report records it (name, kind, measured, op,
    limit), so that a run can report it; `report_dir` is where the failed run's reports are."""

    exit_code = 1

    def __init__(self, message: str, *, report_dir: str | None = None, check: dict | None = None):
        super().__init__(message)
        self.report_dir = report_dir
        self.check = check

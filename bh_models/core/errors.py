"""Errors that name the offending file or config key and say how to fix it."""

from __future__ import annotations


class BHInputError(ValueError):
    """Bad input data: a file of one subject or run is unusable.

    The message always names the file and the fix. The workflow turns it into an
    exclusion record for that subject only.
    """

    def __init__(self, path: object, problem: str, fix: str) -> None:
        self.path = str(path)
        self.problem = problem
        self.fix = fix
        super().__init__(f"{self.path}: {problem}. Fix: {fix}")


class BHConfigError(ValueError):
    """Bad configuration: names the config key and the fix."""

    def __init__(self, key: str, problem: str, fix: str) -> None:
        self.key = key
        self.problem = problem
        self.fix = fix
        super().__init__(f"config key '{key}': {problem}. Fix: {fix}")

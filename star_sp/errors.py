"""Exceptions that star-sp raises for things a user can cause.

Every message says what went wrong and what to do about it. Internal invariants use ``assert``.
"""

from __future__ import annotations


class StarError(Exception):
    """Base class of every error star-sp raises on purpose."""


class StarInputError(StarError, ValueError):
    """Bad arguments: sizes, shapes, dtypes, or ranks that disagree on them."""


class BackendUnavailableError(StarInputError):
    """An explicitly requested attention backend cannot run these inputs here."""


class StarCollectiveError(StarError, RuntimeError):
    """A group-wide step failed: a rank raised, died, or did not arrive in time."""

    def __init__(self, message: str, *, step: str, failed_rank: int | None = None):
        super().__init__(message)
        self.step = step
        self.failed_rank = failed_rank

"""Error types for mistakes a user can fix: the CLI prints them as one line."""
from __future__ import annotations


class EdgeNasError(Exception):
    """An expected failure whose message states what is wrong and how to fix it."""


class InvalidArchitectureError(EdgeNasError, ValueError):
    """An architecture encoding that does not belong to its search space."""


class DataError(EdgeNasError, ValueError):
    """Input data that is missing, corrupt, or of the wrong shape or type."""


class UnknownNameError(EdgeNasError, KeyError):
    """A name (proxy, space, sample) that is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return str(self.args[0]) if self.args else ""

"""The errors of constrained decoding, for the engine and the server alike.

This module imports nothing heavy (no torch, numpy or outlines_core): the server imports it to
map a constraint error to its HTTP status without loading the engine's tensor code.
"""

from __future__ import annotations

__all__ = ["ConstraintError", "ConstraintTooComplex", "ConstraintBusy", "ConstraintViolation"]


class ConstraintError(ValueError):
    """The constraint cannot be compiled; ``str(e)`` is meant for a 400 response.

    ``tool_index`` / ``tool_field``: for a bad tool definition, which tool (its index in the
    list) and which of its fields ("name" or "parameters") the message is about; None otherwise.
    """

    too_complex = False

    def __init__(self, message: str, *, tool_index: int | None = None, tool_field: str | None = None):
        super().__init__(message)
        self.tool_index = tool_index
        self.tool_field = tool_field


class ConstraintTooComplex(ConstraintError):
    """The constraint is over a complexity limit, or its compilation did not finish within the
    timeout or the worker's memory limit (``too_complex`` is True)."""

    too_complex = True


class ConstraintBusy(ConstraintTooComplex):
    """No compile worker came free within the timeout (the compiler is overloaded: retry after
    ``retry_after`` seconds). A ConstraintTooComplex for callers that do not tell the two apart."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class ConstraintViolation(RuntimeError):
    """advance() got a token the mask did not allow (an engine bug, not a client error)."""

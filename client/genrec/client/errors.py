"""The one exception type of the client: every failure, client- or server-side, is a GenrecError."""

from __future__ import annotations


class GenrecError(Exception):
    """A request could not be answered.

    ``status`` is the gRPC status name (``"INVALID_ARGUMENT"``, ``"UNAVAILABLE"``,
    ``"DEADLINE_EXCEEDED"``, ...): the server's for server errors, ``"INVALID_ARGUMENT"`` for bad
    input caught before sending, ``None`` when there is none (e.g. a malformed response).
    ``model`` is the ensemble the request was for, when there was one.
    """

    def __init__(self, message: str, *, status: str | None = None, model: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.model = model

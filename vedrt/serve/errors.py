"""The one error type a request can end with: an HTTP status, a one-line message, extra headers."""

from __future__ import annotations


class ServeError(Exception):
    """A request that cannot be answered with captions; becomes `{"error": message}` at `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        headers: dict[str, str] | None = None,
        outcome: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
        self.outcome = outcome  # for /metrics when the status alone does not say it


def bad_request(message: str) -> ServeError:
    return ServeError(400, message)

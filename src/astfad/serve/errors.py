"""Errors the service turns into `{"error": "..."}` responses: each carries its HTTP status and a
short kind (a Prometheus label), so the modules below the web layer never import FastAPI."""

from __future__ import annotations


class ServeError(Exception):
    """A request the service refuses; the message is one line meant for the client."""

    status = 400
    kind = "bad_request"

    def __init__(self, message: str, headers: dict[str, str] | None = None, *,
                 status: int | None = None, kind: str | None = None) -> None:
        super().__init__(" ".join(message.split()))
        self.headers = headers or {}
        if status is not None:
            self.status = status
        if kind is not None:
            self.kind = kind


class BadModelName(ServeError):
    kind = "bad_name"


class UnknownModel(ServeError):
    status = 404
    kind = "unknown_model"


class UnknownJob(ServeError):
    status = 404
    kind = "unknown_job"


class ModelExists(ServeError):
    status = 409
    kind = "model_exists"


class TooLarge(ServeError):
    """A body, an image or a file count over the configured limits."""

    status = 413
    kind = "too_large"


class Busy(ServeError):
    """The inference queue or the fit queue is full: come back later (Retry-After)."""

    status = 503
    kind = "queue_full"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message, {"Retry-After": str(max(1, retry_after))})


class Unauthorized(ServeError):
    status = 401
    kind = "unauthorized"

    def __init__(self, message: str = "missing or wrong API key (send it as X-API-Key)") -> None:
        super().__init__(message, {"WWW-Authenticate": "ApiKey"})

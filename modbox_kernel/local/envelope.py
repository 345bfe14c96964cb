"""The Modbox error envelope and the one exception routes raise to produce it.

Route handlers raise :class:`ServiceError`; the exception handlers installed by
``app.build_app`` turn it (and Starlette's own HTTP errors, and anything unexpected)
into ``{"error": {code, message, details?, hint?, request_id, retryable?}, "detail":
message}`` with an ``X-Request-Id`` header, as ``docs/modbox-api.md``, "Error envelope"
describes.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

REQUEST_ID_HEADER = "X-Request-Id"


class ServiceError(Exception):
    """An error answer: HTTP status, Modbox error code and a sentence for the caller."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        hint: str | None = None,
        details: list[dict[str, Any]] | None = None,
        retryable: bool | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.hint = hint
        self.details = details
        self.retryable = retryable
        self.headers = headers or {}


def validation_error(field: str, issue: str) -> ServiceError:
    """A 422 for one bad field (``field`` like ``body.ttl_seconds``)."""
    return ServiceError(
        422,
        "validation_error",
        f"Invalid request: {field}: {issue}",
        details=[{"field": field, "issue": issue}],
    )


def envelope_response(error: ServiceError, request_id: str) -> JSONResponse:
    body: dict[str, Any] = {"code": error.code, "message": error.message, "request_id": request_id}
    if error.details:
        body["details"] = error.details
    if error.hint:
        body["hint"] = error.hint
    if error.retryable is not None:
        body["retryable"] = error.retryable
    headers = {REQUEST_ID_HEADER: request_id, **error.headers}
    return JSONResponse(
        {"error": body, "detail": error.message}, status_code=error.status, headers=headers
    )

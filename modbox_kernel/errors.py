"""One exception tree for everything that can go wrong between the kernel and Modbox.

Who raises what:

* ``api`` raises :class:`ApiError` subclasses for HTTP error answers (parsed from the
  Modbox error envelope), :class:`ServiceUnreachableError` when no answer came, and
  :class:`ModboxTimeoutError` when a deadline passed.
* ``session`` raises :class:`ProvisioningError`, :class:`SandboxLostError` and
  :class:`AgentError`, usually chaining the ``api`` error that caused them.
* ``kernel`` catches :class:`ModboxError` and shows ``str(exc)``, which is always a
  sentence that says what happened and, where possible, what to change.

::

    ModboxError
    ├── ConfigurationError
    ├── ServiceUnreachableError
    ├── ModboxTimeoutError
    ├── ApiError                      (status_code, code, message, hint, request_id)
    │   ├── AuthenticationError       401
    │   ├── PermissionDeniedError     403
    │   ├── NotFoundError             404
    │   │   └── SandboxNotFoundError  404 with code sandbox_not_found
    │   ├── ConflictError             409
    │   ├── ValidationError           400 / 422
    │   ├── PayloadTooLargeError      413
    │   ├── RateLimitedError          429
    │   └── ServerError               5xx
    └── SandboxError
        ├── ProvisioningError
        ├── SandboxLostError
        └── AgentError

Secrets: no class here stores a token, and ``ApiError`` keeps only the parsed envelope
fields, never request headers, so ``repr()`` and ``str()`` are safe to log.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = [
    "AgentError",
    "ApiError",
    "AuthenticationError",
    "ConfigurationError",
    "ConflictError",
    "ModboxError",
    "ModboxTimeoutError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "ProvisioningError",
    "RateLimitedError",
    "SandboxError",
    "SandboxLostError",
    "SandboxNotFoundError",
    "ServerError",
    "ServiceUnreachableError",
    "ValidationError",
    "api_error_from_response",
]


class ModboxError(Exception):
    """Base of every error this package raises on purpose.

    ``str(exc)`` is the sentence shown to the user; ``hint`` (optional) says what to
    change and is already part of that sentence.
    """

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if not hint else f"{message} ({hint})")


class ConfigurationError(ModboxError):
    """A setting is missing or malformed (raised before any network call)."""


class ServiceUnreachableError(ModboxError):
    """No HTTP answer at all: connection refused, reset, DNS failure, TLS failure."""


class ModboxTimeoutError(ModboxError):
    """A deadline passed (read timeout, provisioning deadline, agent start)."""


class ApiError(ModboxError):
    """Modbox answered with a non-2xx status.

    Fields mirror the Modbox error envelope
    ``{"error": {"code", "message", "hint", "request_id", "retryable", "details"}}``;
    the older FastAPI ``{"detail": [...]}`` body is folded into ``message``.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        code: str | None = None,
        hint: str | None = None,
        request_id: str | None = None,
        retryable: bool | None = None,
        details: list[dict[str, Any]] | None = None,
        retry_after: float | None = None,
        service_message: str | None = None,
    ) -> None:
        self.status_code = status_code
        self.code = code
        self.request_id = request_id
        self.retryable = retryable
        self.details = details or []
        self.retry_after = retry_after
        # The service's own sentence (the envelope's message), without our framing.
        self.service_message = service_message
        super().__init__(message, hint=hint)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(status_code={self.status_code}, code={self.code!r}, "
            f"message={self.message!r}, request_id={self.request_id!r})"
        )


class AuthenticationError(ApiError):
    """401: the token is missing, wrong or expired."""


class PermissionDeniedError(ApiError):
    """403: the token is valid but may not do this (role, scope, workspace)."""


class NotFoundError(ApiError):
    """404."""


class SandboxNotFoundError(NotFoundError):
    """404 for a sandbox id: it never existed, or it was destroyed and forgotten."""


class ConflictError(ApiError):
    """409, e.g. a ``task_id`` already used by a live sandbox."""


class ValidationError(ApiError):
    """400 / 422: the request was malformed."""


class PayloadTooLargeError(ApiError):
    """413: an upload or request body over the service's limit."""


class RateLimitedError(ApiError):
    """429: too many requests, or the host is at capacity."""


class ServerError(ApiError):
    """5xx: the service failed; usually worth retrying."""


class SandboxError(ModboxError):
    """Something about one sandbox (as opposed to the API as a whole)."""


class ProvisioningError(SandboxError):
    """A sandbox could not be created, or never became ready."""


class SandboxLostError(SandboxError):
    """A sandbox that was running is gone (destroyed, expired, killed)."""


class AgentError(SandboxError):
    """The in-sandbox agent could not be started or stopped answering."""


_STATUS_CLASSES: dict[int, type[ApiError]] = {
    400: ValidationError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: ValidationError,
    429: RateLimitedError,
}

# What to change, by status, when the envelope carries no hint of its own.
_DEFAULT_HINTS: dict[int, str] = {
    401: "set MODBOX_API_TOKEN to a valid Modbox API token",
    403: "check the token's workspace and role (MODBOX_WORKSPACE_ID)",
    429: "the service is busy or at capacity; try again shortly",
}


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        # An HTTP-date: rare for APIs; treat as "soon" rather than parse calendars.
        return 1.0
    return max(0.0, seconds)


def api_error_from_response(
    status_code: int,
    body: bytes | str | None,
    headers: Any = None,
    *,
    what: str = "Modbox request",
) -> ApiError:
    """Build the right :class:`ApiError` from an HTTP error answer.

    Called by ``api`` for every non-2xx response. ``headers`` is any mapping with
    ``.get`` (httpx headers work). ``what`` names the operation for the message
    ("create sandbox"). Never includes request headers, so no token can leak.
    """
    headers = headers or {}
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else (body or "")
    parsed: Any = None
    try:
        parsed = json.loads(text) if text else None
    except ValueError:
        parsed = None

    code: str | None = None
    message: str | None = None
    hint: str | None = None
    request_id: str | None = headers.get("x-request-id")
    retryable: bool | None = None
    details: list[dict[str, Any]] = []

    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        err = parsed["error"]
        code = err.get("code") if isinstance(err.get("code"), str) else None
        message = err.get("message") if isinstance(err.get("message"), str) else None
        hint = err.get("hint") if isinstance(err.get("hint"), str) else None
        request_id = err.get("request_id") or request_id
        retryable = err.get("retryable") if isinstance(err.get("retryable"), bool) else None
        raw_details = err.get("details")
        if isinstance(raw_details, list):
            details = [d for d in raw_details if isinstance(d, dict)]
    elif isinstance(parsed, dict) and "detail" in parsed:
        # Older FastAPI bodies: {"detail": "text"} or {"detail": [{"loc", "msg", "type"}]}.
        detail = parsed["detail"]
        if isinstance(detail, str):
            message = detail
        elif isinstance(detail, list):
            parts = []
            for item in detail:
                if isinstance(item, dict):
                    loc = ".".join(str(p) for p in item.get("loc", []) if p is not None)
                    msg = item.get("msg", "invalid")
                    parts.append(f"{loc}: {msg}" if loc else str(msg))
                    details.append({"field": loc or None, "issue": str(msg)})
            message = "invalid request: " + "; ".join(parts) if parts else None

    if message is None:
        snippet = " ".join(text.split())[:200]
        message = snippet or "no details given"
    if details and code in (None, "validation_error") and "body." not in message:
        issues = "; ".join(
            f"{d.get('field')}: {d.get('issue')}" if d.get("field") else str(d.get("issue"))
            for d in details[:5]
        )
        message = f"{message} ({issues})"

    if status_code == 404 and code == "sandbox_not_found":
        cls: type[ApiError] = SandboxNotFoundError
    elif status_code >= 500:
        cls = ServerError
    else:
        cls = _STATUS_CLASSES.get(status_code, ApiError)
    default_hint = _DEFAULT_HINTS.get(status_code)
    if hint and default_hint and status_code == 401:
        # The service's own hint may speak of its terms; always name the setting too.
        hint = f"{hint.rstrip('.')}; {default_hint}"
    hint = hint or default_hint
    sentence = f"{what} failed: Modbox answered HTTP {status_code}"
    if code:
        sentence += f" ({code})"
    sentence += f": {message}"
    return cls(
        sentence,
        status_code=status_code,
        code=code,
        hint=hint,
        request_id=request_id,
        retryable=retryable,
        details=details,
        retry_after=_parse_retry_after(headers.get("retry-after")),
        service_message=message,
    )

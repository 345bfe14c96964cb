"""When to repeat an HTTP call, and how long to wait before doing so.

Sans-IO on purpose: :class:`~modbox_kernel.api.http.Requester` asks this module
"may I retry, and after how long?" and does the sleeping itself, so the policy can be
tested without a clock or a network (``docs/modbox-api.md``, "Retries").

Two kinds of call exist:

* ``SAFE`` calls (create with its ``Idempotency-Key``, get, list, wait, destroy,
  upload of the same bytes to the same name) may be repeated after any transient
  failure: a connect error, a dropped or stalled connection, or a 408/429/5xx answer.
* ``CONNECT_ONLY`` calls (exec) are repeated only when the connection could not be
  opened, i.e. when provably nothing reached the sandbox. A repeated exec could run a
  command twice, which is fatal for "append to a file" or "submit an assignment".
"""

from __future__ import annotations

import enum
import random
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

import httpx

__all__ = ["RetryMode", "RetryPolicy", "parse_retry_after"]

# Deterministic failures (400, 401, 403, 404, 409, 422) are never here: repeating
# them only delays the error the user has to act on.
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})

# Nothing was sent when these happen, so even an exec may be repeated.
_CONNECT_ERRORS: tuple[type[Exception], ...] = (httpx.ConnectError, httpx.ConnectTimeout)

# The request may or may not have been processed; only safe calls repeat.
_TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    httpx.ConnectError,
    httpx.TimeoutException,
    httpx.ReadError,
    httpx.WriteError,
    httpx.RemoteProtocolError,
)


class RetryMode(enum.Enum):
    """Which failures a call may be repeated after (see the module docstring)."""

    SAFE = "safe"
    CONNECT_ONLY = "connect_only"
    NEVER = "never"


def parse_retry_after(headers: httpx.Headers, *, now: float | None = None) -> float | None:
    """Seconds the server asked us to wait, from ``retry-after-ms`` or ``Retry-After``.

    ``Retry-After`` may be delta-seconds or an HTTP-date (RFC 9110 §10.2.3); both are
    honoured. Returns ``None`` when the server said nothing usable.
    """
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


@dataclass(frozen=True)
class RetryPolicy:
    """Full-jitter exponential backoff bounded by attempts and a cap.

    ``max_attempts`` counts the first try. ``max_retry_after`` caps what a server may
    ask for, so a misconfigured proxy cannot park the kernel for an hour.
    """

    max_attempts: int = 4
    backoff_base: float = 0.25
    backoff_cap: float = 8.0
    max_retry_after: float = 60.0

    def should_retry_status(self, mode: RetryMode, status_code: int) -> bool:
        """True if an answer with this status may be followed by another attempt."""
        return mode is RetryMode.SAFE and status_code in RETRYABLE_STATUS

    def should_retry_error(self, mode: RetryMode, exc: Exception) -> bool:
        """True if this transport error may be followed by another attempt."""
        if mode is RetryMode.NEVER:
            return False
        if mode is RetryMode.CONNECT_ONLY:
            return isinstance(exc, _CONNECT_ERRORS)
        return isinstance(exc, _TRANSIENT_ERRORS)

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to sleep after failed attempt number ``attempt`` (1-based).

        The jittered backoff spreads many kernels hitting one service apart; a
        server's ``Retry-After`` is a floor, never shortened (``docs/modbox-api.md``,
        "Retries").
        """
        ceiling = min(self.backoff_cap, self.backoff_base * (2 ** (attempt - 1)))
        backoff = random.uniform(0.0, ceiling)
        if retry_after is None:
            return backoff
        return max(min(retry_after, self.max_retry_after), backoff)

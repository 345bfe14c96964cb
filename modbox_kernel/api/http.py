"""One logical HTTP call: retries, timing log, and failures turned into sentences.

:class:`Requester` is shared plumbing for
:class:`~modbox_kernel.api.client.ModboxClient` (control plane) and
:class:`~modbox_kernel.api.runtime.SandboxRuntime` (exec / upload). Both subclass
:class:`KeepAliveClient`, which owns one ``httpx.AsyncClient`` (kept alive across
calls: a fresh TCP connection per exec would dominate its latency) and one
``Requester`` around it, and closes them as an async context manager.

Every answer is logged at DEBUG as method, path, status and duration, never headers,
query strings or bodies: headers carry bearer tokens and bodies carry cell source.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import httpx

from modbox_kernel import __version__ as _package_version
from modbox_kernel.errors import (
    ApiError,
    ConfigurationError,
    ModboxError,
    ModboxTimeoutError,
    ServiceUnreachableError,
    api_error_from_response,
)

from .retry import RetryMode, RetryPolicy, parse_retry_after
from .urls import redact_url, tls_context_for, trust_env_for

__all__ = [
    "USER_AGENT",
    "KeepAliveClient",
    "Requester",
    "RetryCallback",
    "RetryNotice",
    "invalid_response",
    "parse_json_object",
]

logger = logging.getLogger("modbox_kernel.api")

USER_AGENT = f"modbox-kernel/{_package_version} httpx/{httpx.__version__}"


def parse_json_object(
    response: httpx.Response, what: str, *, hint: str | None = None
) -> dict[str, Any]:
    """The response body as a JSON object, or an ApiError saying it is not one."""
    try:
        data = response.json()
    except ValueError:
        data = None
    if not isinstance(data, dict):
        snippet = " ".join(response.text.split())[:120]
        raise invalid_response(
            response,
            f"{what} failed: the answer (HTTP {response.status_code}) is not a JSON "
            f"object: {snippet!r}",
            hint=hint,
        )
    return data


def invalid_response(
    response: httpx.Response, message: str, *, hint: str | None = None
) -> ApiError:
    """The error for an answer whose body is not what the route documents.

    Returned, not raised, so that a caller can write ``raise invalid_response(...) from
    exc`` and keep the parse error that proved it in the traceback.
    """
    return ApiError(message, status_code=response.status_code, code="invalid_response", hint=hint)


def _envelope_retryable(response: httpx.Response) -> bool | None:
    """The envelope's ``error.retryable`` flag: a server that says False is believed."""
    try:
        data = response.json()
    except ValueError:
        return None
    err = data.get("error") if isinstance(data, dict) else None
    flag = err.get("retryable") if isinstance(err, dict) else None
    return flag if isinstance(flag, bool) else None


@dataclass(frozen=True)
class RetryNotice:
    """Passed to an ``on_retry`` callback before each backoff sleep.

    The session uses it to tell the user why a cell is waiting ("rate-limited by
    Modbox, retrying in 20 s").
    """

    what: str
    reason: str
    delay: float
    attempt: int
    max_attempts: int


RetryCallback = Callable[[RetryNotice], None]


class Requester:
    """Sends requests through one ``httpx.AsyncClient`` according to a RetryPolicy.

    ``service`` names the other side in messages ("Modbox", "the sandbox runtime
    API"); ``unreachable_hint`` says what to check when nothing answers.
    ``secrets`` are scrubbed from any message built from a transport error, a last
    line of defence in case a library puts a URL or header into its exception text.
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        policy: RetryPolicy,
        *,
        service: str,
        unreachable_hint: str,
        timeout_hint: str,
        status_hints: Mapping[int, str] | None = None,
        secrets: Iterable[str | None] = (),
        on_retry: RetryCallback | None = None,
    ) -> None:
        self.http = http
        self.policy = policy
        self._service = service
        self._unreachable_hint = unreachable_hint
        self._timeout_hint = timeout_hint
        self._status_hints = dict(status_hints or {})
        self._secrets = tuple(s for s in secrets if s)
        self._on_retry = on_retry

    async def request(
        self,
        method: str,
        url: str,
        *,
        what: str,
        mode: RetryMode,
        json: Any = None,
        files: Mapping[str, Any] | None = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        read_timeout: float | None = None,
        deadline: float | None = None,
        accept_status: Collection[int] = (),
    ) -> httpx.Response:
        """Send until success, a final error, ``max_attempts`` or ``deadline``.

        Returns the response when it is 2xx or its status is in ``accept_status``
        (``destroy`` accepts 404). Raises an ``ApiError`` subclass for any other
        answer, ``ServiceUnreachableError`` / ``ModboxTimeoutError`` when no answer
        came. ``deadline`` is a ``time.monotonic()`` value no backoff sleeps past.
        """
        timeout = self._timeout(read_timeout)
        attempt = 0
        while True:
            attempt += 1
            request = self.http.build_request(
                method, url, json=json, files=files, params=params, headers=headers, timeout=timeout
            )
            started = time.monotonic()
            try:
                response = await self.http.send(request)
            except httpx.HTTPError as exc:
                elapsed = (time.monotonic() - started) * 1000.0
                logger.debug(
                    "%s %s -> %s after %.1f ms",
                    method,
                    request.url.path,
                    type(exc).__name__,
                    elapsed,
                )
                if self.policy.should_retry_error(mode, exc) and await self._backoff(
                    what, type(exc).__name__, attempt, None, deadline
                ):
                    continue
                raise self._transport_error(exc, what, request.url, mode, timeout) from exc
            logger.debug(
                "%s %s -> %d in %.1f ms",
                method,
                request.url.path,
                response.status_code,
                (time.monotonic() - started) * 1000.0,
            )
            if response.is_success or response.status_code in accept_status:
                return response
            if (
                self.policy.should_retry_status(mode, response.status_code)
                and _envelope_retryable(response) is not False
            ) and await self._backoff(
                what,
                f"HTTP {response.status_code}",
                attempt,
                parse_retry_after(response.headers),
                deadline,
            ):
                continue
            raise self._api_error(response, what, attempt)

    def _timeout(self, read_timeout: float | None) -> httpx.Timeout:
        base = self.http.timeout
        if read_timeout is None:
            return base
        return httpx.Timeout(
            connect=base.connect, read=read_timeout, write=base.write, pool=base.pool
        )

    async def _backoff(
        self,
        what: str,
        reason: str,
        attempt: int,
        retry_after: float | None,
        deadline: float | None,
    ) -> bool:
        """Sleep before the next attempt; False when attempts or time ran out."""
        if attempt >= self.policy.max_attempts:
            return False
        delay = self.policy.delay(attempt, retry_after)
        if deadline is not None and time.monotonic() + delay >= deadline:
            return False
        logger.info(
            "%s: %s; retrying in %.1f s (attempt %d of %d)",
            what,
            reason,
            delay,
            attempt + 1,
            self.policy.max_attempts,
        )
        if self._on_retry is not None:
            self._on_retry(RetryNotice(what, reason, delay, attempt + 1, self.policy.max_attempts))
        await asyncio.sleep(delay)
        return True

    def api_error(self, response: httpx.Response, what: str) -> ApiError:
        """The error for an answer a caller accepted (``accept_status``) but cannot use."""
        return self._api_error(response, what, 1)

    def _api_error(self, response: httpx.Response, what: str, attempts: int) -> ApiError:
        err = api_error_from_response(
            response.status_code, response.content, response.headers, what=what
        )
        hint = err.hint
        ours = self._status_hints.get(response.status_code)
        if ours:
            # Our hint names the setting to change (MODBOX_API_TOKEN); a service's own
            # hint knows only its side, so it is kept as context, not as the advice.
            hint = f"{ours}; {err.hint}" if err.hint and err.hint not in ours else ours
        message = err.message
        if attempts > 1:
            message = f"{message} (after {attempts} attempts)"
        if hint == err.hint and message == err.message:
            return err
        return type(err)(
            self._scrub(message),
            status_code=err.status_code,
            code=err.code,
            hint=hint,
            request_id=err.request_id,
            retryable=err.retryable,
            details=err.details,
            retry_after=err.retry_after,
            service_message=self._scrub(err.service_message) if err.service_message else None,
        )

    def _transport_error(
        self,
        exc: httpx.HTTPError,
        what: str,
        url: httpx.URL,
        mode: RetryMode,
        timeout: httpx.Timeout,
    ) -> ModboxError:
        where = f"{self._service} at {redact_url(url)}"
        detail = self._scrub(str(exc)) or type(exc).__name__
        # Only a failed connect proves the request never arrived; after that an
        # exec may have run, and the user must not be told it did not.
        unknown = (
            "; the command may or may not have run"
            if mode is not RetryMode.SAFE
            and not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
            else ""
        )
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            return ServiceUnreachableError(
                f"{what} failed: could not connect to {where} ({detail})",
                hint=self._unreachable_hint,
            )
        if isinstance(exc, httpx.TimeoutException):
            seconds = {
                httpx.ReadTimeout: timeout.read,
                httpx.WriteTimeout: timeout.write,
                httpx.PoolTimeout: timeout.pool,
            }.get(type(exc))
            within = f" within {seconds:g} s" if seconds is not None else ""
            return ModboxTimeoutError(
                f"{what} failed: no answer from {where}{within}{unknown}",
                hint=self._timeout_hint,
            )
        if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL | httpx.LocalProtocolError):
            return ConfigurationError(
                f"{what} failed: the request to {where} could not be built ({detail})",
                hint=self._unreachable_hint,
            )
        return ServiceUnreachableError(
            f"{what} failed: the connection to {where} was lost "
            f"({type(exc).__name__}: {detail}){unknown}",
            hint=self._unreachable_hint,
        )

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


_Self = TypeVar("_Self", bound="KeepAliveClient")


class KeepAliveClient:
    """One keep-alive ``httpx.AsyncClient`` and the :class:`Requester` around it.

    Base of ``ModboxClient`` and ``SandboxRuntime``: each passes the words its
    messages use (``service``, the hints) and its ``secrets``; subclasses send through
    ``self._requester`` and read the timeouts back for calls of their own. Usable as
    ``async with``; :meth:`aclose` closes the connection pool. ``base_url`` is empty
    for the runtime, whose URLs are absolute (they come from the sandbox record);
    ``other_urls`` are further places it sends to (the runtime's upload URL).
    ``transport`` exists so tests can plug in ``httpx.MockTransport``.
    """

    def __init__(
        self,
        url: str,
        *,
        base_url: str = "",
        connect_timeout: float,
        read_timeout: float,
        max_attempts: int,
        transport: httpx.AsyncBaseTransport | None,
        on_retry: RetryCallback | None,
        service: str,
        unreachable_hint: str,
        timeout_hint: str,
        status_hints: Mapping[int, str],
        secrets: Iterable[str | None],
        other_urls: Iterable[str] = (),
    ) -> None:
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._http = httpx.AsyncClient(
            base_url=base_url,
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
            headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
            transport=transport,
            # Proxies apply to where the requests go (``url``), decided once here.
            trust_env=trust_env_for(url),
            verify=tls_context_for(url, *other_urls),
        )
        self._requester = Requester(
            self._http,
            RetryPolicy(max_attempts=max(1, max_attempts)),
            service=service,
            unreachable_hint=unreachable_hint,
            timeout_hint=timeout_hint,
            status_hints=status_hints,
            secrets=secrets,
            on_retry=on_retry,
        )

    async def __aenter__(self: _Self) -> _Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close this object's connection pool (and only its own)."""
        await self._http.aclose()

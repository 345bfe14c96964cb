"""The Starlette application: routes, request ids, error envelope, lifespan.

Who calls it: ``__main__`` calls :func:`build_app` with the :class:`ServiceState` and
serves the result with uvicorn. The lifespan runs the TTL reaper, fills the pool
(``pool``) and, on shutdown, destroys every sandbox.

Error handling: route code raises ``ServiceError`` for answers it means; Starlette's
own HTTP errors (unknown route, wrong method, broken multipart) become envelopes too;
a client that closes its request before the body is read (a kernel shutting down in
the middle of an upload or a waiting poll) gets a 400 nobody reads, logged in one line
rather than as a crash; anything else becomes a 500 ``internal_error`` envelope whose
body holds no traceback (the traceback goes to the log). Every response carries ``X-Request-Id``.

Host check: a service bound to loopback answers only requests whose ``Host`` names
loopback (or the ``--public-url`` host); anything else gets a 403 envelope. The service
is a code-execution endpoint, and a web page could otherwise reach it through DNS
rebinding (``docs/isolation.md``, "Service authentication and Host check"). Bound to
another address, the operator chose to expose it and every Host is accepted (the token
still guards every route but /health).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import routes_control, routes_runtime
from .envelope import REQUEST_ID_HEADER, ServiceError, envelope_response
from .state import ServiceState

log = logging.getLogger(__name__)

_SCOPE_KEY = "modbox.request_id"
_HTTP_CODES = {
    400: "validation_error",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "validation_error",
    409: "conflict",
    413: "validation_error",
    422: "validation_error",
    429: "rate_limited",
}


class RequestIdMiddleware:
    """Gives every request an id (scope key) and every response the X-Request-Id header.

    Pure ASGI rather than BaseHTTPMiddleware: it sits on the exec hot path and adds
    nothing but a header.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = f"req_{secrets.token_hex(8)}"
        scope[_SCOPE_KEY] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                if REQUEST_ID_HEADER.lower() not in headers:
                    headers.append(REQUEST_ID_HEADER, request_id)
            await send(message)

        await self.app(scope, receive, send_with_id)


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class HostCheckMiddleware:
    """Answers 403 to requests whose Host header is not one this service is reached by."""

    def __init__(self, app: ASGIApp, allowed: frozenset[str] | None) -> None:
        self.app = app
        self.allowed = allowed  # None: any host

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.allowed is None:
            await self.app(scope, receive, send)
            return
        host = ""
        for name, value in scope.get("headers", []):
            if name == b"host":
                host = value.decode("latin-1")
                break
        if _hostname(host) not in self.allowed:
            error = ServiceError(
                403,
                "forbidden",
                f"Host {host[:100]!r} is not accepted by this local service.",
                hint="Reach it at the address it announced (loopback).",
            )
            request_id = scope.get(_SCOPE_KEY)
            response = envelope_response(
                error, request_id if isinstance(request_id, str) else f"req_{secrets.token_hex(8)}"
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _hostname(host: str) -> str:
    """The name part of a Host header ("[::1]:80" -> "::1", "a:80" -> "a")."""
    return (urlsplit(f"//{host}").hostname or "").lower() if host else ""


def allowed_hosts(bind_host: str, base_url: str) -> frozenset[str] | None:
    """Loopback names plus the advertised host when bound to loopback, else None (any)."""
    if bind_host not in LOOPBACK_HOSTS:
        return None
    advertised = urlsplit(base_url).hostname
    return LOOPBACK_HOSTS | ({advertised.lower()} if advertised else set())


def _request_id(request: Request) -> str:
    rid = request.scope.get(_SCOPE_KEY)
    return rid if isinstance(rid, str) else f"req_{secrets.token_hex(8)}"


async def _on_service_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServiceError)
    return envelope_response(exc, _request_id(request))


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "internal_error")
    if exc.status_code == 404:
        message = f"No route {request.method} {request.url.path}."
    elif exc.status_code == 405:
        message = f"Method {request.method} is not allowed on {request.url.path}."
    else:
        message = str(exc.detail)
    error = ServiceError(exc.status_code, code, message, headers=dict(exc.headers or {}))
    return envelope_response(error, _request_id(request))


async def _on_client_disconnect(request: Request, exc: Exception) -> Response:
    # Any route that reads a body (JSON or multipart) can meet this; the caller is gone,
    # so the answer is only for the log and the ASGI server, which would otherwise print
    # a traceback for an everyday event.
    request_id = _request_id(request)
    log.info(
        "request %s: the client closed %s %s before its body was read",
        request_id,
        request.method,
        request.url.path,
    )
    error = ServiceError(400, "client_disconnected", "The client closed the request.")
    return envelope_response(error, request_id)


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    request_id = _request_id(request)
    log.error(
        "request %s failed: %s %s", request_id, request.method, request.url.path, exc_info=exc
    )
    error = ServiceError(
        500,
        "internal_error",
        f"The local Modbox service failed to handle this request ({type(exc).__name__}).",
        hint=f"See the service log for request {request_id}.",
        retryable=False,
    )
    return envelope_response(error, request_id)


def build_app(state: ServiceState) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        reaper = asyncio.create_task(state.registry.run_reaper(), name="ttl-reaper")
        if state.registry.pool is not None:
            state.registry.pool.start()
        try:
            yield
        finally:
            reaper.cancel()
            await asyncio.gather(reaper, return_exceptions=True)
            await state.registry.close()
            for path in state.remove_on_exit:
                await asyncio.to_thread(shutil.rmtree, path, True)

    app = Starlette(
        routes=[*routes_control.routes, *routes_runtime.routes],
        exception_handlers={
            ServiceError: _on_service_error,
            HTTPException: _on_http_error,
            ClientDisconnect: _on_client_disconnect,
            Exception: _on_unexpected,
        },
        lifespan=lifespan,
    )
    app.add_middleware(
        HostCheckMiddleware, allowed=allowed_hosts(state.config.host, state.base_url)
    )
    app.add_middleware(RequestIdMiddleware)
    app.state.service = state
    return app

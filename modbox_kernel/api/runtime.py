"""Runtime client for one running sandbox: ``exec`` and ``upload``.

Created by :meth:`ModboxClient.runtime <modbox_kernel.api.client.ModboxClient.runtime>`
once a sandbox runs; the session keeps one per sandbox and sends every agent request
through :meth:`SandboxRuntime.exec`, so this object owns a keep-alive
``httpx.AsyncClient`` of its own (the exec round trip is the kernel's latency floor).

Auth follows ``docs/modbox-api.md``, "Runtime auth": the token Modbox issued at create
time (``endpoint.access_token``) is tried first, the caller's ``SANDBOX_API_KEY``
second. A 401 proves the command did not run, so switching credential and sending again
is safe even for an exec.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import httpx

from modbox_kernel.errors import AuthenticationError

from .http import KeepAliveClient, RetryCallback, invalid_response, parse_json_object
from .models import ExecResult, SandboxInfo
from .retry import RetryMode
from .urls import exec_url, redact_url, upload_url

__all__ = ["SandboxRuntime"]

logger = logging.getLogger("modbox_kernel.api")

_RUNTIME_401_HINT = (
    "the sandbox refused its runtime credential (endpoint.access_token / "
    "SANDBOX_API_KEY); it may have been replaced or destroyed"
)


class SandboxRuntime(KeepAliveClient):
    """Exec and upload against one sandbox's runtime API.

    ``exec`` is never repeated after the request may have reached the sandbox (only a
    failed connect is retried), because running a command twice can do harm; see
    :mod:`.retry`. ``upload`` of the same bytes under the same name is repeatable.
    """

    def __init__(
        self,
        info: SandboxInfo,
        api_key: str | None,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        max_attempts: int = 4,
        transport: httpx.AsyncBaseTransport | None = None,
        on_retry: RetryCallback | None = None,
    ) -> None:
        self.info = info
        self.exec_url = exec_url(info)
        self.upload_url = upload_url(info)
        # The local service's agent route (an extension), when the sandbox has one.
        self.agent_url: str | None = info.capabilities.get("agent") or None
        # Issued token first: it is what current Modbox checks; SANDBOX_API_KEY is
        # what the older guides describe (docs/modbox-api.md, "Runtime auth").
        self._tokens = [t for t in dict.fromkeys((info.access_token, api_key)) if t]
        super().__init__(
            self.exec_url,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_attempts=max_attempts,
            transport=transport,
            on_retry=on_retry,
            service="the sandbox runtime API",
            unreachable_hint="the sandbox may have stopped, or its runtime URL is not "
            "reachable from this machine",
            timeout_hint="the sandbox is busy or stalled; the kernel can be interrupted "
            "or restarted",
            status_hints={401: _RUNTIME_401_HINT},
            secrets=self._tokens,
            other_urls=(self.upload_url, *([self.agent_url] if self.agent_url else [])),
        )

    def __repr__(self) -> str:
        return (
            f"SandboxRuntime(sandbox_id={self.info.id!r}, exec_url={redact_url(self.exec_url)!r}, "
            f"credentials={len(self._tokens)})"
        )

    async def exec(
        self, command: str, *, timeout: float | None = None, read_timeout: float | None = None
    ) -> ExecResult:
        """Run one bash command in the sandbox and return its result.

        ``timeout`` (seconds) is sent only when given: it is an extension the local
        service understands, and the documented API knows only ``command``. The HTTP
        read timeout then grows by the same amount, so a long command is not cut off
        by the client; ``read_timeout`` overrides it outright. ``command`` is never
        logged or put into a message (it carries cell source).
        """
        body: dict[str, Any] = {"command": command}
        if timeout is not None:
            body["timeout"] = timeout
        if read_timeout is None and timeout is not None:
            read_timeout = timeout + self._read_timeout
        what = f"exec in sandbox {self.info.id}"
        response = await self._send(
            self.exec_url, what, RetryMode.CONNECT_ONLY, json=body, read_timeout=read_timeout
        )
        data = parse_json_object(response, what)
        try:
            return ExecResult.from_json(data)
        except ValueError as exc:
            raise invalid_response(
                response,
                f"{what} failed: the answer is not an exec result ({exc})",
                hint="the sandbox image may not run the Modbox runtime API",
            ) from exc

    async def ask_agent(
        self, state_dir: str, request: str, *, read_timeout: float | None = None
    ) -> str:
        """One request to the kernel's agent through the local service's ``agent``
        route (only when :attr:`agent_url` is set); returns the agent's answer line.

        ``request`` is what the bash request line would send after the token. Like
        :meth:`exec`, it is never repeated once it may have arrived; a 409
        ``agent_unreachable`` says no agent listens in ``state_dir``.
        """
        if self.agent_url is None:
            raise ValueError("this sandbox has no agent route")
        what = f"agent request in sandbox {self.info.id}"
        body: dict[str, Any] = {"state_dir": state_dir, "request": request}
        if read_timeout is not None:
            body["timeout"] = read_timeout  # the service gives up first, and says so
            read_timeout += 5.0
        response = await self._send(
            self.agent_url, what, RetryMode.CONNECT_ONLY, json=body, read_timeout=read_timeout
        )
        return response.text

    async def upload(self, filename: str, data: bytes) -> dict[str, Any]:
        """Upload ``data``; Modbox stores it as ``/workspace/uploads/{filename}``.

        Returns the service's JSON answer (its shape is undocumented; ``{}`` when the
        body is empty).
        """
        what = f"upload {filename!r} to sandbox {self.info.id}"
        response = await self._send(
            self.upload_url,
            what,
            RetryMode.SAFE,
            files={"file": (filename, data, "application/octet-stream")},
            headers={"Idempotency-Key": str(uuid.uuid4())},
        )
        return parse_json_object(response, what) if response.content else {}

    async def _send(
        self,
        url: str,
        what: str,
        mode: RetryMode,
        *,
        json: Any = None,
        files: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        read_timeout: float | None = None,
    ) -> httpx.Response:
        while True:
            all_headers = dict(headers or {})
            if self._tokens:
                all_headers["Authorization"] = f"Bearer {self._tokens[0]}"
            try:
                return await self._requester.request(
                    "POST",
                    url,
                    what=what,
                    mode=mode,
                    json=json,
                    files=files,
                    headers=all_headers,
                    read_timeout=read_timeout,
                )
            except AuthenticationError:
                if len(self._tokens) < 2:
                    raise
                # Keep the fallback for the rest of this runtime's life: a refused
                # credential will not start working again.
                self._tokens.pop(0)
                logger.info(
                    "sandbox %s refused the issued access token; using SANDBOX_API_KEY",
                    self.info.id,
                )

"""Control-plane client: create, wait for, inspect, list and destroy sandboxes.

The session (``modbox_kernel.session``) owns one :class:`ModboxClient` per kernel. It
calls :meth:`ModboxClient.create_sandbox` then :meth:`~ModboxClient.wait_until_running`
when the kernel starts, :meth:`~ModboxClient.runtime` to get the exec/upload side, and
:meth:`~ModboxClient.destroy_sandbox` at shutdown. Only the documented canonical routes
are used (``docs/architecture.md``, "Only documented Modbox calls"), so the same code
drives api.modbox.run and the embedded local service.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from typing import Any

import httpx

from modbox_kernel.errors import (
    ModboxTimeoutError,
    NotFoundError,
    ProvisioningError,
    SandboxError,
)

from .http import KeepAliveClient, RetryCallback, invalid_response, parse_json_object
from .models import SandboxInfo
from .retry import RetryMode
from .runtime import SandboxRuntime
from .urls import check_base_url, redact_url, sandbox_path

__all__ = ["ModboxClient"]

logger = logging.getLogger("modbox_kernel.api")

# Longest single POST /wait: keep each long poll under proxy idle limits
# (docs/modbox-api.md, "Waiting for a sandbox"); the loop in wait_until_running covers
# longer deadlines.
_MAX_WAIT_CALL = 30.0

_NOT_MODBOX_HINT = "check that MODBOX_API_URL points at a Modbox API"


class ModboxClient(KeepAliveClient):
    """Async client for the Modbox control plane (``https://api.modbox.run``).

    One ``httpx.AsyncClient`` is reused for every call (keep-alive, see
    :class:`~.http.KeepAliveClient`; ``aclose`` leaves the runtimes from
    :meth:`runtime` to close on their own). Retries follow :class:`~.retry.RetryPolicy`:
    every control-plane call is safe to repeat because create carries an
    ``Idempotency-Key`` and the others are reads or idempotent.
    ``transport`` exists so tests can plug in ``httpx.MockTransport``; it is shared with
    the runtimes this client hands out.
    """

    def __init__(
        self,
        base_url: str,
        token: str | None,
        *,
        workspace_id: str | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        max_attempts: int = 4,
        transport: httpx.AsyncBaseTransport | None = None,
        on_retry: RetryCallback | None = None,
    ) -> None:
        self.base_url = check_base_url(base_url)
        self.workspace_id = workspace_id or None
        self._token = token or None
        self._transport = transport
        self._on_retry = on_retry
        super().__init__(
            self.base_url,
            base_url=self.base_url,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_attempts=max_attempts,
            transport=transport,
            on_retry=on_retry,
            service="Modbox",
            unreachable_hint=(
                "check MODBOX_API_URL and that the Modbox service is running and reachable"
            ),
            timeout_hint="the Modbox service is slow or stalled; try again, "
            "or check MODBOX_API_URL",
            status_hints={
                401: "set MODBOX_API_TOKEN to a valid Modbox API token"
                if self._token
                else "no API token is configured: set MODBOX_API_TOKEN"
            },
            secrets=(self._token,),
        )

    def __repr__(self) -> str:
        return (
            f"ModboxClient(base_url={redact_url(self.base_url)!r}, "
            f"token={'<set>' if self._token else '<unset>'}, workspace_id={self.workspace_id!r})"
        )

    def _headers(self, *, workspace: bool = True) -> dict[str, str]:
        headers: dict[str, str] = {}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        if workspace and self.workspace_id:
            headers["x-workspace-id"] = self.workspace_id
        return headers

    async def create_sandbox(
        self,
        *,
        task_id: str | None = None,
        image_id: str | None = None,
        image: str | None = None,
        ttl_seconds: int | None = None,
        env_vars: dict[str, str] | None = None,
        idempotency_key: str | None = None,
        wait_at_capacity: bool = True,
    ) -> SandboxInfo:
        """``POST /sandboxes``; returns at once with status ``provisioning``.

        Unset fields are omitted (the API's convention). The same ``Idempotency-Key``
        goes with every retry, so a create whose answer was lost is not repeated
        server-side. Keep the returned record: its ``access_token`` is never sent again.
        ``wait_at_capacity=False``: a 429 raises :class:`RateLimitedError` at once, for
        a caller that waits in line itself (the session, which shows the wait).
        """
        body: dict[str, Any] = {}
        for key, value in (
            ("task_id", task_id),
            ("image_id", image_id),
            ("image", image),
            ("ttl_seconds", ttl_seconds),
            ("env_vars", env_vars),
        ):
            if value is not None:
                body[key] = value
        headers = self._headers()
        headers["Idempotency-Key"] = idempotency_key or str(uuid.uuid4())
        what = "create sandbox"
        response = await self._requester.request(
            "POST",
            "/sandboxes",
            what=what,
            mode=RetryMode.SAFE,
            json=body,
            headers=headers,
            accept_status=() if wait_at_capacity else (429,),
        )
        if response.status_code == 429:
            raise self._requester.api_error(response, what)
        data = parse_json_object(response, what, hint=_NOT_MODBOX_HINT)
        if data.get("success") is False:
            reason = data.get("error") or "no reason given"
            raise ProvisioningError(f"Modbox did not accept the new sandbox: {reason}")
        try:
            info = SandboxInfo.from_json(data, name=task_id)
        except ValueError as exc:
            raise ProvisioningError(
                "Modbox accepted the new sandbox but did not say its id"
            ) from exc
        logger.debug("created sandbox %s (status %s)", info.id, info.status)
        return info

    async def get_sandbox(self, sandbox_id: str) -> SandboxInfo:
        """``GET /sandboxes/{id}``: the current record (no ``access_token``).

        Raises ``NotFoundError`` (``SandboxNotFoundError`` when the service says
        ``sandbox_not_found``) for an unknown id.
        """
        what = f"get sandbox {sandbox_id}"
        response = await self._requester.request(
            "GET", sandbox_path(sandbox_id), what=what, mode=RetryMode.SAFE, headers=self._headers()
        )
        return self._parse_info(response, what)

    async def list_sandboxes(self, status: str | None = None) -> list[SandboxInfo]:
        """``GET /sandboxes``, newest first; destroyed ones included unless filtered."""
        what = "list sandboxes"
        response = await self._requester.request(
            "GET",
            "/sandboxes",
            what=what,
            mode=RetryMode.SAFE,
            params={"status": status} if status else None,
            headers=self._headers(),
        )
        items = parse_json_object(response, what, hint=_NOT_MODBOX_HINT).get("sandboxes")
        infos: list[SandboxInfo] = []
        for item in items if isinstance(items, list) else []:
            if isinstance(item, dict) and (item.get("id") or item.get("sandbox_id")):
                infos.append(SandboxInfo.from_json(item))
        return infos

    async def destroy_sandbox(self, sandbox_id: str) -> bool:
        """``DELETE /sandboxes/{id}``. True when destroyed (or already destroyed).

        False, without raising, when the service does not know the id: at shutdown
        "already gone" is success, and destroy must be safe to call twice.
        """
        what = f"destroy sandbox {sandbox_id}"
        response = await self._requester.request(
            "DELETE",
            sandbox_path(sandbox_id),
            what=what,
            mode=RetryMode.SAFE,
            headers=self._headers(),
            accept_status=(404,),
        )
        if response.status_code == 404:
            return False
        data = parse_json_object(response, what, hint=_NOT_MODBOX_HINT) if response.content else {}
        if data.get("success") is False:
            raise SandboxError(
                f"{what} failed: Modbox said {data.get('error') or 'no reason given'}",
                hint="it will still be removed when its TTL expires",
            )
        return True

    async def renew_lease(self, sandbox_id: str) -> float:
        """``POST /sandboxes/{id}/lease``: an extension of the local service, not the
        Modbox API; call it only when the create answer advertised ``lease_seconds``.

        The first call opts the sandbox in: the service then destroys it when the
        renewals stop (the kernel died without a shutdown). Returns the lease's length.
        """
        what = f"renew the lease of sandbox {sandbox_id}"
        response = await self._requester.request(
            "POST",
            sandbox_path(sandbox_id, "/lease"),
            what=what,
            mode=RetryMode.SAFE,
            headers=self._headers(),
        )
        data = parse_json_object(response, what)
        seconds = data.get("lease_seconds")
        return float(seconds) if isinstance(seconds, (int, float)) else 0.0

    async def health(self) -> bool:
        """``GET /health`` (no auth): True on any 2xx, False on anything else.

        One attempt with a short timeout; meant for "is the embedded service up yet"
        checks, so it never raises.
        """
        try:
            response = await self._http.get(
                "/health",
                timeout=httpx.Timeout(self._connect_timeout, connect=self._connect_timeout),
            )
        except httpx.HTTPError as exc:
            logger.debug("GET /health -> %s", type(exc).__name__)
            return False
        logger.debug("GET /health -> %d", response.status_code)
        return response.is_success

    async def wait_until_running(self, sandbox_id: str, *, timeout: float = 120.0) -> SandboxInfo:
        """Block (asynchronously) until the sandbox runs; return its current record.

        Loops ``POST /sandboxes/{id}/wait`` (each call at most 30 s; ``ready: false``
        just means "not yet"), then reads ``GET /sandboxes/{id}`` for the URLs. Raises
        ``ProvisioningError`` if the sandbox is destroyed or disappears meanwhile and
        ``ModboxTimeoutError`` at the deadline. It does not destroy the sandbox on
        failure: the caller owns it (and merges the result into its create record).
        """
        deadline = time.monotonic() + timeout
        what = f"wait for sandbox {sandbox_id}"
        last_status = "provisioning"
        use_wait_route = True
        pause = 0.1
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ModboxTimeoutError(
                    f"sandbox {sandbox_id} did not start within {timeout:g} s "
                    f"(last status: {last_status})",
                    hint="raise MODBOX_STARTUP_TIMEOUT, or check the image and the "
                    "service's capacity",
                )
            ready = False
            started = time.monotonic()
            if use_wait_route:
                per_call = max(1, math.ceil(min(_MAX_WAIT_CALL, remaining)))
                try:
                    response = await self._requester.request(
                        "POST",
                        sandbox_path(sandbox_id, "/wait"),
                        what=what,
                        mode=RetryMode.SAFE,
                        # poll_interval 1 is the documented minimum; the default of
                        # 5 s would add up to 5 s to every kernel start.
                        json={"timeout": per_call, "poll_interval": 1},
                        headers=self._headers(),
                        read_timeout=per_call + 10.0,
                        deadline=deadline,
                    )
                except NotFoundError:
                    # Either the sandbox is gone or this deployment lacks the canonical
                    # wait route; the GET below tells which (and raises if it is gone),
                    # and from then on we poll it instead.
                    use_wait_route = False
                else:
                    data = parse_json_object(response, what, hint=_NOT_MODBOX_HINT)
                    last_status = str(data.get("status") or last_status)
                    if "destroyed" in (data.get("status"), data.get("reason")):
                        raise ProvisioningError(
                            f"sandbox {sandbox_id} was destroyed while starting"
                            f" ({data.get('reason') or 'no reason given'})"
                        )
                    ready = data.get("ready") is True
            if ready or not use_wait_route:
                info = await self._get_while_waiting(sandbox_id)
                last_status = info.status or last_status
                if info.status == "running":
                    return info
                if info.status == "destroyed":
                    raise ProvisioningError(f"sandbox {sandbox_id} was destroyed while starting")
            # A server that answers "not ready" at once (ignoring our timeout) must
            # not turn this loop into a busy poll.
            if time.monotonic() - started < 0.5:
                await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))
                pause = min(1.0, pause * 2)

    async def _get_while_waiting(self, sandbox_id: str) -> SandboxInfo:
        try:
            return await self.get_sandbox(sandbox_id)
        except NotFoundError as exc:
            raise ProvisioningError(
                f"sandbox {sandbox_id} disappeared while starting",
                hint="it may have been destroyed or expired; create a new one",
            ) from exc

    def runtime(self, info: SandboxInfo, api_key: str | None) -> SandboxRuntime:
        """The exec/upload side of a running sandbox.

        ``info`` should be the create record merged with a later detail
        (``create_info.merged(detail)``) so that it carries both the issued
        ``access_token`` and the runtime URLs. ``api_key`` is the
        ``SANDBOX_API_KEY`` the caller put into ``env_vars``; it is the fallback
        credential when no token was issued or the issued one is refused.
        """
        return SandboxRuntime(
            info,
            api_key,
            connect_timeout=self._connect_timeout,
            read_timeout=self._read_timeout,
            max_attempts=self._requester.policy.max_attempts,
            transport=self._transport,
            on_retry=self._on_retry,
        )

    def _parse_info(self, response: httpx.Response, what: str) -> SandboxInfo:
        data = parse_json_object(response, what, hint=_NOT_MODBOX_HINT)
        try:
            return SandboxInfo.from_json(data)
        except ValueError as exc:
            raise invalid_response(
                response, f"{what} failed: the answer carries no sandbox id"
            ) from exc

"""Which Modbox the session talks to: the embedded local service, or a remote one.

Who calls what, and when: the session (``session.py``) asks :meth:`Backend.client` for
the control-plane client each time it provisions a sandbox (the first call with the
``local`` backend starts the embedded service, ``embedded.py``; a later call after that
service died starts a new one), :meth:`Backend.service_died` when a request failed to
tell a dead service from a network fault, and :meth:`Backend.close` or
:meth:`Backend.close_blocking` at shutdown.
"""

from __future__ import annotations

import contextlib
import logging

from .api import ModboxClient, destroy_sandbox_blocking
from .embedded import EmbeddedService, discard_early
from .errors import ProvisioningError

log = logging.getLogger(__name__)


class Backend:
    """The control-plane client, and the embedded service behind it if it is local."""

    def __init__(
        self,
        *,
        local: bool,
        api_url: str,
        api_token: str | None,
        workspace_id: str | None,
    ) -> None:
        self.local = local
        self._api_url = api_url
        self._api_token = api_token
        self._workspace_id = workspace_id
        self._service: EmbeddedService | None = None
        self._client: ModboxClient | None = None
        if not local:
            discard_early()  # the environment said local, the configuration says remote

    @property
    def current_client(self) -> ModboxClient | None:
        """The client made last, if any (no service is started for it)."""
        return self._client

    async def client(self) -> ModboxClient:
        """The control-plane client, starting (or restarting) the embedded service."""
        if self._client is not None:
            if not self.local or (self._service is not None and self._service.running):
                return self._client
            # The embedded service died (and its sandboxes with it): start a new one.
            log.warning("the embedded Modbox service exited; starting a new one")
            with contextlib.suppress(Exception):
                await self._client.aclose()
            self._client = None
        if self.local:
            if self._service is None or not self._service.running:
                self._service = EmbeddedService()
                await self._service.start()
            url, token = self._service.base_url, self._service.token
        else:
            if not self._api_token:
                raise ProvisioningError(
                    "no Modbox API token is configured for the remote backend",
                    hint="set MODBOX_API_TOKEN, or MODBOX_BACKEND=local for the embedded service",
                )
            url, token = self._api_url, self._api_token
        self._client = ModboxClient(url, token, workspace_id=self._workspace_id)
        return self._client

    def service_died(self) -> bool:
        """True when the embedded service this backend started is no longer running."""
        return self.local and self._service is not None and not self._service.running

    async def close(self) -> None:
        """Close the client and stop the embedded service (sandboxes destroyed first)."""
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()
        if self._service is not None:
            await self._service.stop()

    def close_blocking(self, sandbox_id: str | None) -> None:
        """Best-effort destroy of ``sandbox_id`` without an event loop, then the service."""
        if sandbox_id is not None:
            base_url, token = self._control_credentials()
            if base_url:
                with contextlib.suppress(Exception):
                    destroy_sandbox_blocking(
                        base_url,
                        token,
                        sandbox_id,
                        workspace_id=self._workspace_id,
                        timeout=2.0,
                    )
        if self._service is not None:
            self._service.kill_blocking()

    def _control_credentials(self) -> tuple[str, str | None]:
        if self.local:
            if self._service is None:
                return "", None
            return self._service.base_url, self._service.token
        return self._api_url, self._api_token

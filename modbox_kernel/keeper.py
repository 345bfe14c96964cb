"""Keeping a sandbox while its kernel lives, and finding it when a kernel died.

Who calls what, and when: the session (``session.py``) makes one :class:`SandboxKeeper`
right after each create and calls :meth:`SandboxKeeper.release` once that sandbox is
destroyed (or :meth:`SandboxKeeper.forget_record` from ``close_blocking``, which has no
loop). Before its first create on a shared or remote service it runs :func:`sweep`.

Two layers, because a kernel can die without a shutdown (SIGKILL, the OOM killer, its
parent gone: ipykernel's parent poller exits without cleanup):

* **A lease**, where the service advertises one (``lease_seconds`` in the create
  answer: an extension of the local service). The keeper renews it every fifth of its
  length; when renewals stop, the service destroys the sandbox.
* **A record** (``records.py``) for any service but the embedded one, whose sandboxes
  die with it: the next kernel's :func:`sweep`, or ``python -m modbox_kernel cleanup``,
  destroys the sandboxes of kernels that are gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from . import records
from .api import ModboxClient
from .errors import ModboxError, NotFoundError

log = logging.getLogger(__name__)

# Renewals per lease period: a lease survives a network fault of most of its length
# (the channel retries faults for 30 s; the default lease is 50 s, renewed every 10 s).
RENEWALS_PER_LEASE = 5


class SandboxKeeper:
    """The lease renewals and the on-disk record of one sandbox."""

    def __init__(
        self,
        client: ModboxClient,
        sandbox_id: str,
        *,
        lease_seconds: float,
        record: bool,
    ) -> None:
        self._client = client
        self.sandbox_id = sandbox_id
        self.lease_seconds = lease_seconds
        self._record = record
        self._task: asyncio.Task[Any] | None = None

    def start(self) -> None:
        """Record the sandbox and start renewing its lease (if it has one)."""
        if self._record:
            try:
                records.remember(self.sandbox_id, self._client.base_url, self._client.workspace_id)
            except OSError as exc:  # a convenience: never a reason to fail the sandbox
                log.warning("could not record sandbox %s for cleanup: %s", self.sandbox_id, exc)
        if self.lease_seconds > 0:
            self._task = asyncio.ensure_future(self._renew())

    async def _renew(self) -> None:
        while True:
            try:
                await self._client.renew_lease(self.sandbox_id)
            except NotFoundError:
                return  # gone: the session finds out on its next request
            except ModboxError as exc:
                # A missed renewal is survivable (the lease is three periods long).
                log.warning("could not renew the lease of sandbox %s: %s", self.sandbox_id, exc)
            await asyncio.sleep(self.lease_seconds / RENEWALS_PER_LEASE)

    def release(self) -> None:
        """The sandbox was destroyed: stop renewing, forget the record."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self.forget_record()

    def forget_record(self) -> None:
        if self._record:
            records.forget(self.sandbox_id)


async def sweep(client: ModboxClient) -> list[str]:
    """Destroy the sandboxes of this user's kernels that died on ``client``'s service.

    Returns their ids. Runs in the background of a kernel's first start; failures are
    logged and left for the TTL or ``python -m modbox_kernel cleanup``.
    """
    swept = []
    for record in records.dead(client.base_url):
        if record.workspace_id != client.workspace_id:
            continue
        with contextlib.suppress(ModboxError):
            await client.destroy_sandbox(record.sandbox_id)  # False: already gone
            records.forget(record.sandbox_id)
            swept.append(record.sandbox_id)
            log.info("destroyed sandbox %s of a kernel that died", record.sandbox_id)
    return swept

"""SandboxSession: one kernel's sandbox, from provisioning to destroy, and its loss.

Who calls what, and when:

* :class:`modbox_kernel.kernel.ModboxKernel` creates one session at kernel start and
  calls :meth:`SandboxSession.start` at once, so provisioning runs in the background
  while the kernel already answers ``kernel_info``.
* Every cell calls :meth:`ensure_ready` (which waits for provisioning, or starts it
  again after a failure), :meth:`take_notices` (what the user must be told before the
  cell's own output) and then :meth:`execute`, which relays the agent's events to a
  callback as they arrive.
* Interrupts and ``input()`` answers arrive through :meth:`interrupt` and
  :meth:`send_input` while :meth:`execute` is awaiting.
* Shutdown calls :meth:`close` (on the main loop); an ``atexit`` hook calls
  :meth:`close_blocking` if that never happened.

Everything here runs on the kernel's main asyncio loop; the one exception is
:meth:`close_blocking`, which uses no loop at all. The pieces a sandbox is made of live
in their own modules: the agent's bootstrap (``bootstrap.py``), the folder copy
(``foldercopy.py``), and the exec-as-RPC channel to the agent (``channel.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

from . import bootstrap, protocol
from .api import ModboxClient, SandboxInfo, SandboxRuntime
from .backend import Backend
from .channel import AgentChannel, AgentUnreachable, EventCallback
from .errors import (
    ModboxError,
    ModboxTimeoutError,
    NotFoundError,
    ProvisioningError,
    SandboxLostError,
    ServiceUnreachableError,
)
from .filesync import FileSync, SyncSettings
from .foldercopy import place_folder
from .keeper import SandboxKeeper, sweep
from .loss import diagnose_loss
from .notices import Notices
from .protocol import CellRequest
from .queueing import create_in_line, new_key
from .workdir import Packed, pack_for

log = logging.getLogger(__name__)

__all__ = ["CellRequest", "SandboxSession", "SessionConfig"]

# How long to wait for the service to record why a sandbox died before saying only
# that its Python process is gone.
LOSS_DIAGNOSIS_WAIT = 1.5
# A sandbox this close to its TTL (or 10 % of the TTL, if less) is replaced before the
# next cell instead of being used until the reaper destroys it mid-cell.
TTL_REPLACE_MARGIN = 10.0


@dataclass
class SessionConfig:
    """Settings the kernel passes down (traits resolved to plain values)."""

    backend: str = "auto"  # auto | local | remote
    api_url: str = "https://api.modbox.run"
    api_token: str | None = field(default=None, repr=False)
    workspace_id: str | None = None
    image_id: str | None = None
    image: str | None = None
    ttl_seconds: int = 3600
    env_vars: dict[str, str] = field(default_factory=dict)
    startup_timeout: float = 120.0
    copy_folder: str | None = None  # copied into each new sandbox's working directory
    copy_limit: int = 32 * 1024 * 1024  # bytes of files; beyond it nothing is copied
    copy_root: str = "auto"  # auto | folder | an absolute path (workdir.find_root)
    sync: SyncSettings = field(default_factory=SyncSettings)  # files coming back

    @property
    def resolved_backend(self) -> str:
        if self.backend in ("local", "remote"):
            return self.backend
        return "remote" if self.api_token else "local"


@dataclass
class _Sandbox:
    """What one provisioned sandbox with a running agent looks like to the session."""

    info: SandboxInfo
    runtime: SandboxRuntime
    channel: AgentChannel
    agent_file: str
    agent_info: dict[str, Any]
    keeper: SandboxKeeper
    created: float = field(default_factory=time.monotonic)

    @property
    def state_dir(self) -> str:
        return self.channel.state_dir


class SandboxSession:
    """Owns the client, the (optional) embedded service, one sandbox and its agent."""

    def __init__(self, config: SessionConfig) -> None:
        self.config = config
        self._backend = Backend(
            local=config.resolved_backend == "local",
            api_url=config.api_url,
            api_token=config.api_token,
            workspace_id=config.workspace_id,
        )
        self._sandbox: _Sandbox | None = None
        self._provisioning: asyncio.Task[_Sandbox] | None = None
        self._closed = False
        # What the next cell says first: a lost sandbox, a folder not copied, the TTL.
        self.notices = Notices(config.ttl_seconds)
        self.running_cell: str | None = None
        # While the create waits for capacity: why, for the waiting cell's progress line.
        self.waiting: str | None = None
        # The next create's Idempotency-Key: its place in line at capacity (queueing.py).
        self._create_key = new_key()
        self._tasks: set[asyncio.Future[Any]] = set()
        self._swept = False
        self._changed = asyncio.Event()  # set whenever _sandbox changes or we close
        # The working folder's files on their way back to the host (filesync.py).
        self.files = FileSync(config.sync)

    # ------------------------------------------------------------------ lifecycle

    @property
    def ready(self) -> bool:
        return self._sandbox is not None and not self._expiring(self._sandbox)

    def _expiring(self, sandbox: _Sandbox) -> bool:
        """True when the sandbox's TTL runs out within the replacement margin."""
        ttl = self.config.ttl_seconds
        margin = min(TTL_REPLACE_MARGIN, 0.1 * ttl)
        return time.monotonic() - sandbox.created >= ttl - margin

    def _background(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)  # keep a reference until done (asyncio holds weak ones)
        task.add_done_callback(self._tasks.discard)

    def _set_waiting(self, reason: str | None) -> None:
        self.waiting = reason

    @property
    def sandbox_id(self) -> str | None:
        return self._sandbox.info.id if self._sandbox else None

    @property
    def agent_info(self) -> dict[str, Any]:
        return self._sandbox.agent_info if self._sandbox else {}

    async def wait_for_sandbox(self, other_than: object = None) -> _Sandbox | None:
        """The ready sandbox (once there is one, and it is not ``other_than``); None
        once the session is closed. For listeners (``idleoutput``): never provisions."""
        while not self._closed:
            sandbox = self._sandbox
            if sandbox is not None and sandbox is not other_than:
                return sandbox
            self._changed.clear()
            await self._changed.wait()
        return None

    def _set_sandbox(self, sandbox: _Sandbox | None) -> None:
        self._sandbox = sandbox
        self._changed.set()

    def start(self) -> None:
        """Begin provisioning in the background (idempotent)."""
        if self._closed or self._sandbox is not None:
            return
        if self._provisioning is None or self._provisioning.done():
            self._provisioning = asyncio.ensure_future(self._provision())

    async def ensure_ready(self) -> _Sandbox:
        """Wait for the sandbox; after a failed attempt, the next call tries again.

        A sandbox about to reach its TTL is replaced here, before a cell starts in it,
        so the cell runs in a fresh sandbox (with the lost-state notice) instead of
        failing half-way when the service's reaper strikes.
        """
        if self._sandbox is not None and self._expiring(self._sandbox):
            self._forget(
                self._sandbox,
                f"the sandbox reached its time limit (TTL {self.config.ttl_seconds} s)",
            )
        if self._sandbox is not None:
            return self._sandbox
        if self._closed:
            raise ModboxError("the kernel is shutting down")
        self.start()
        assert self._provisioning is not None
        task = self._provisioning
        try:
            # shield: an interrupted cell must not cancel provisioning for the next one.
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            raise
        except BaseException:
            if task.done():
                self._provisioning = None
            raise

    async def _provision(self) -> _Sandbox:
        t0 = time.monotonic()
        cfg = self.config
        # Packing the notebook's folder needs no sandbox: do it while one is made.
        packing = (
            asyncio.ensure_future(
                asyncio.to_thread(pack_for, cfg.copy_folder, cfg.copy_root, cfg.copy_limit)
            )
            if cfg.copy_folder
            else None
        )
        try:
            try:
                client = await self._backend.client()
            except ModboxError as exc:
                raise ProvisioningError(f"could not start a Modbox sandbox: {exc}") from exc
            if not self._backend.local and not self._swept:
                # Sandboxes of this user's kernels that died on this service: destroy
                # them while ours is made (the embedded service has none: they die
                # with it).
                self._swept = True
                self._background(sweep(client))
            return await self._provision_sandbox(t0, client, packing)
        finally:
            if packing is not None:
                packing.cancel()  # a no-op when done; else its result is not wanted

    async def _provision_sandbox(
        self, t0: float, client: ModboxClient, packing: asyncio.Future[Packed] | None
    ) -> _Sandbox:
        cfg = self.config
        api_key = secrets.token_urlsafe(24)
        env = dict(cfg.env_vars)
        env["SANDBOX_API_KEY"] = api_key
        task_id = f"modbox-kernel-{uuid.uuid4().hex[:12]}"
        deadline = t0 + cfg.startup_timeout
        try:
            info = await create_in_line(
                client,
                key=self._create_key,
                deadline=deadline,
                on_wait=self._set_waiting,
                timeout_setting=cfg.startup_timeout,
                task_id=task_id,
                image_id=cfg.image_id,
                image=cfg.image,
                ttl_seconds=cfg.ttl_seconds,
                env_vars=env,
            )
        except ProvisioningError:
            raise
        except ModboxError as exc:
            raise ProvisioningError(f"could not create a Modbox sandbox: {exc}") from exc
        self._create_key = new_key()  # the next sandbox is another create
        # From here until it is destroyed, the sandbox is leased and recorded.
        keeper = SandboxKeeper(
            client,
            info.id,
            lease_seconds=_number(info.raw.get("lease_seconds")),
            record=not self._backend.local,
        )
        keeper.start()
        try:

            def left() -> float:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ModboxTimeoutError("the startup deadline passed")
                return remaining

            detail = await client.wait_until_running(info.id, timeout=left())
            info = info.merged(detail)
            runtime = client.runtime(info, api_key)
            # The whole start, agent included, fits in MODBOX_STARTUP_TIMEOUT.
            state_dir, agent_file, starting = await bootstrap.prepare_agent(
                runtime, info.raw.get("agent"), left
            )
            uploads_at = bootstrap.upload_dir(state_dir, agent_file)
            # The working folder is made and filled while the agent starts.
            placing = asyncio.ensure_future(
                place_folder(
                    runtime, packing, state_dir=state_dir, upload_dir=uploads_at, left=left
                )
            )
            try:
                agent_info = await starting
                placed = await placing
            except BaseException:
                placing.cancel()
                raise
            channel = AgentChannel(
                runtime, state_dir, upload_dir=uploads_at, give_up=self._backend.service_died
            )
            await asyncio.wait_for(self.files.enter(channel, placed), left())
        except BaseException as exc:
            # Never leave a half-made sandbox behind, whatever went wrong.
            with contextlib.suppress(Exception):
                await asyncio.shield(client.destroy_sandbox(info.id))
            keeper.release()
            if isinstance(exc, (ModboxTimeoutError, asyncio.TimeoutError)):
                raise ProvisioningError(
                    f"the Modbox sandbox was not ready within {cfg.startup_timeout:.0f} s",
                    hint="raise MODBOX_STARTUP_TIMEOUT or check the service",
                ) from exc
            if isinstance(exc, ModboxError) and not isinstance(exc, ProvisioningError):
                raise ProvisioningError(f"could not start the Modbox sandbox: {exc}") from exc
            raise
        sandbox = _Sandbox(
            info=info,
            runtime=runtime,
            channel=channel,
            agent_file=agent_file,
            agent_info=agent_info,
            keeper=keeper,
            created=t0,  # no later than the service's own clock for its TTL
        )
        self._set_sandbox(sandbox)
        self.notices.copy = placed.notice
        log.info(
            "sandbox %s ready in %.2f s (python %s, ipython %s)",
            info.id,
            time.monotonic() - t0,
            agent_info.get("python_version"),
            agent_info.get("ipython_version"),
        )
        return sandbox

    async def restart_agent(self) -> None:
        """Kill the agent and start a fresh one in the same sandbox (files are kept).

        Called by the kernel when an interrupt did not stop a cell (it swallowed
        KeyboardInterrupt or sits in C code). The namespace is lost; if even this fails,
        the sandbox is forgotten so the next cell provisions a new one.
        """
        sandbox = self._sandbox
        if sandbox is None:
            return
        try:
            sandbox.agent_info = await bootstrap.restart_agent(
                sandbox.runtime, sandbox.state_dir, sandbox.agent_file
            )
            await self.files.reenter(sandbox.channel)
        except ModboxError as exc:
            log.warning("agent restart failed (%s); the next cell gets a new sandbox", exc)
            self._forget(sandbox, "the sandbox stopped answering after an interrupt")
            self.notices.lost = None  # the cell's own error already says state was lost

    def take_notices(self) -> list[str]:
        """What the next cell must tell the user before its own output, once each.

        Called by the kernel before each cell runs: the sandbox's TTL is close, the
        notebook's folder was not copied into it, or the last sandbox was lost (so this
        cell runs in a fresh one). Each is a line for the cell's stderr.
        """
        sandbox = self._sandbox
        if sandbox is None:
            return self.notices.take(None, 0.0)
        return self.notices.take(sandbox.info.id, sandbox.created)

    async def close(self) -> None:
        """Destroy the sandbox and stop the embedded service (called on shutdown)."""
        self._closed = True
        self._changed.set()
        if self._provisioning is not None and not self._provisioning.done():
            self._provisioning.cancel()
            with contextlib.suppress(BaseException):
                await self._provisioning
        if self._sandbox is not None:
            await self.files.final()  # on the host before the sandbox goes
        sandbox, self._sandbox = self._sandbox, None
        client = self._backend.current_client
        if sandbox is not None and client is not None:
            with contextlib.suppress(Exception):
                await client.destroy_sandbox(sandbox.info.id)
            sandbox.keeper.release()
            with contextlib.suppress(Exception):
                await sandbox.runtime.aclose()
        await self._backend.close()

    def close_blocking(self) -> None:
        """Best-effort destroy without an event loop (atexit, or a stuck loop)."""
        self._closed = True
        sandbox, self._sandbox = self._sandbox, None
        self._backend.close_blocking(sandbox.info.id if sandbox is not None else None)
        if sandbox is not None:
            sandbox.keeper.forget_record()

    # ------------------------------------------------------------------ the agent

    async def execute(self, cell: CellRequest, on_event: EventCallback) -> dict[str, Any]:
        """Run one cell; call ``on_event`` for each event in order; return the done event.

        Raises :class:`SandboxLostError` (and forgets the sandbox) when the sandbox or
        its agent died, so the next cell provisions a fresh one.
        """
        sandbox = await self.ensure_ready()

        def guard(request: Awaitable[dict[str, Any]]) -> Awaitable[dict[str, Any]]:
            return self._guarded(sandbox, request)

        if cell.comm is not None:
            # A frontend's comm message may be handled while a cell runs (ipykernel
            # dispatches it concurrently): it must not become the target of that cell's
            # interrupts and input replies, nor clear it when it is done.
            return await sandbox.channel.run_cell(cell, on_event, guard)
        self.running_cell = cell.cell_id
        try:
            return await sandbox.channel.run_cell(cell, on_event, guard)
        finally:
            self.running_cell = None

    async def _guarded(self, sandbox: _Sandbox, coro: Awaitable[dict[str, Any]]) -> dict[str, Any]:
        """Turn 'agent unreachable' and 'sandbox gone' into SandboxLostError with a cause."""
        try:
            return await coro
        except AgentUnreachable as exc:
            cause = await self._diagnose_loss(sandbox)
            self._forget(sandbox, cause)
            raise SandboxLostError(cause) from exc
        except NotFoundError as exc:
            cause = await self._diagnose_loss(sandbox)
            self._forget(sandbox, cause)
            raise SandboxLostError(cause) from exc
        except ServiceUnreachableError as exc:
            if not self._backend.service_died():
                raise
            cause = "the embedded Modbox service stopped, and its sandboxes with it"
            self._forget(sandbox, cause)
            raise SandboxLostError(cause) from exc

    async def _diagnose_loss(self, sandbox: _Sandbox) -> str:
        """Ask the control plane what happened to a sandbox that stopped answering."""
        client = self._backend.current_client
        if client is None:
            return "the sandbox is gone"
        return await diagnose_loss(client, sandbox.info.id, LOSS_DIAGNOSIS_WAIT)

    def _forget(self, sandbox: _Sandbox, cause: str) -> None:
        if self._sandbox is sandbox:
            self._set_sandbox(None)
            self._provisioning = None
            self.notices.lost = cause
            client = self._backend.current_client
            if client is not None:
                # The old sandbox may still run (only its agent died): destroy it.
                self._background(_destroyed(client, sandbox))

    async def interrupt(self, cell_id: str | None = None) -> bool:
        """Ask the agent to raise KeyboardInterrupt in the running cell."""
        sandbox = self._sandbox
        target = cell_id or self.running_cell
        if sandbox is None or target is None:
            return False
        try:
            answer = await sandbox.channel.request(protocol.interrupt_request(target))
        except ModboxError as exc:
            log.warning("interrupt could not be delivered: %s", exc)
            return False
        except AgentUnreachable:
            return False
        return bool(answer.get("delivered", True))

    async def send_input(self, cell_id: str, value: str) -> None:
        sandbox = await self.ensure_ready()
        await sandbox.channel.request(protocol.input_reply(cell_id, value))

    async def query(self, op: str, **fields: Any) -> dict[str, Any]:
        """complete / inspect / is_complete / history / info: returns the agent's reply."""
        sandbox = await self.ensure_ready()
        request = sandbox.channel.request(protocol.query(op, **fields))
        answer = await self._guarded(sandbox, request)
        reply = answer.get("reply")
        return reply if isinstance(reply, dict) else {}


async def _destroyed(client: ModboxClient, sandbox: _Sandbox) -> None:
    """Destroy a forgotten sandbox in the background (it may still run: only its agent
    died), then stop keeping it."""
    with contextlib.suppress(Exception):
        await client.destroy_sandbox(sandbox.info.id)
    sandbox.keeper.release()


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0

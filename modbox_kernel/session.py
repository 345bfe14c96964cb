"""SandboxSession: one kernel's sandbox, from provisioning to destroy, and the agent protocol.

Who calls what, and when:

* :class:`modbox_kernel.kernel.ModboxKernel` creates one session at kernel start and
  calls :meth:`SandboxSession.start` at once, so provisioning runs in the background
  while the kernel already answers ``kernel_info``.
* Every cell calls :meth:`ensure_ready` (which waits for provisioning, or starts it
  again after a failure) and then :meth:`execute`, which relays the agent's events to
  a callback as they arrive.
* Interrupts and ``input()`` answers arrive through :meth:`interrupt` and
  :meth:`send_input` while :meth:`execute` is awaiting.
* Shutdown calls :meth:`close` (on the main loop); an ``atexit`` hook calls
  :meth:`close_blocking` if that never happened.

Everything here runs on the kernel's main asyncio loop; the one exception is
:meth:`close_blocking`, which uses no loop at all.

Transport (docs/agent-protocol.md): each request to the agent is one ``exec`` whose
command is a fixed bash line carrying base64 JSON (or a reference to an uploaded file
for large requests), so cell source never passes through shell interpolation.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import posixpath
import secrets
import shlex
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from . import agent as agent_mod
from .api import ExecResult, ModboxClient, SandboxInfo, SandboxRuntime, destroy_sandbox_blocking
from .embedded import EmbeddedService
from .errors import (
    AgentError,
    ApiError,
    ModboxError,
    ModboxTimeoutError,
    NotFoundError,
    ProvisioningError,
    SandboxLostError,
    ServiceUnreachableError,
)
from .workdir import Packed, pack_folder

log = logging.getLogger(__name__)

EventCallback = Callable[[dict[str, Any]], Awaitable[None]]

# How long one long-poll exec may wait inside the agent before answering empty.
POLL_WAIT = 1.0
# How long the submitting exec waits for a short cell to finish (one round trip).
SUBMIT_WAIT = 0.1
# After a poll that brought only stream text, wait this long before the next one, so a
# flood of prints reaches IOPub as a few tens of messages per second, not thousands.
MIN_STREAM_INTERVAL = 0.02
# How long transient transport faults (resets, 5xx, stalls) are retried while a cell
# runs before the cell fails with a sentence.
TRANSPORT_RETRY_WINDOW = 30.0
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

    @property
    def resolved_backend(self) -> str:
        if self.backend in ("local", "remote"):
            return self.backend
        return "remote" if self.api_token else "local"


@dataclass
class CellRequest:
    """One execute_request, as the agent needs it."""

    code: str
    silent: bool = False
    store_history: bool = True
    user_expressions: dict[str, str] = field(default_factory=dict)
    allow_stdin: bool = False
    execution_count: int = 1
    output_limit: int = 0  # bytes of stream text per cell; 0 = unlimited
    cell_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # The frontend's request header (msg_id, msg_type, session): ipywidgets' Output
    # widget asks for it to claim the output of the request that is running.
    parent_header: dict[str, Any] = field(default_factory=dict)
    # A frontend's comm message (msg_type, content, metadata, base64 buffers) for the
    # sandbox's comms, handled instead of code: see the agent's ``_run_comm``.
    comm: dict[str, Any] | None = None


@dataclass
class _Sandbox:
    """What one provisioned sandbox with a running agent looks like to the session."""

    info: SandboxInfo
    runtime: SandboxRuntime
    state_dir: str
    agent_file: str
    agent_info: dict[str, Any]

    @property
    def upload_dir(self) -> str | None:
        """Where uploads land in this sandbox (see :func:`_upload_dir`)."""
        return _upload_dir(self.state_dir, self.agent_file)

    created: float = field(default_factory=time.monotonic)


class SandboxSession:
    """Owns the client, the (optional) embedded service, one sandbox and its agent."""

    def __init__(self, config: SessionConfig) -> None:
        self.config = config
        self._service: EmbeddedService | None = None
        self._client: ModboxClient | None = None
        self._sandbox: _Sandbox | None = None
        self._provisioning: asyncio.Task[_Sandbox] | None = None
        self._closed = False
        # Set when a sandbox was lost, so the next cell can say that state is gone.
        self.lost_notice: str | None = None
        # Set when the notebook's folder was not copied into a new sandbox, and why.
        self.copy_notice: str | None = None
        self.running_cell: str | None = None
        self._ttl_warned: str | None = None
        self._tasks: set[asyncio.Future[Any]] = set()

    # ------------------------------------------------------------------ lifecycle

    @property
    def ready(self) -> bool:
        return self._sandbox is not None and not self._expiring(self._sandbox)

    def _expiring(self, sandbox: _Sandbox) -> bool:
        """True when the sandbox's TTL runs out within the replacement margin."""
        ttl = self.config.ttl_seconds
        margin = min(TTL_REPLACE_MARGIN, 0.1 * ttl)
        return time.monotonic() - sandbox.created >= ttl - margin

    @property
    def agent_info(self) -> dict[str, Any]:
        return self._sandbox.agent_info if self._sandbox else {}

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

    async def _get_client(self) -> ModboxClient:
        cfg = self.config
        local = cfg.resolved_backend == "local"
        if self._client is not None:
            if not local or (self._service is not None and self._service.running):
                return self._client
            # The embedded service died (and its sandboxes with it): start a new one.
            log.warning("the embedded Modbox service exited; starting a new one")
            with contextlib.suppress(Exception):
                await self._client.aclose()
            self._client = None
        if local:
            if self._service is None or not self._service.running:
                self._service = EmbeddedService()
                await self._service.start()
            url, token = self._service.base_url, self._service.token
        else:
            if not cfg.api_token:
                raise ProvisioningError(
                    "no Modbox API token is configured for the remote backend",
                    hint="set MODBOX_API_TOKEN, or MODBOX_BACKEND=local for the embedded service",
                )
            url, token = cfg.api_url, cfg.api_token
        self._client = ModboxClient(url, token, workspace_id=cfg.workspace_id)
        return self._client

    async def _provision(self) -> _Sandbox:
        t0 = time.monotonic()
        cfg = self.config
        # Packing the notebook's folder needs no sandbox: do it while one is made.
        packing = (
            asyncio.ensure_future(asyncio.to_thread(pack_folder, cfg.copy_folder, cfg.copy_limit))
            if cfg.copy_folder
            else None
        )
        try:
            try:
                client = await self._get_client()
            except ModboxError as exc:
                raise ProvisioningError(f"could not start a Modbox sandbox: {exc}") from exc
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
        try:
            info = await client.create_sandbox(
                task_id=task_id,
                image_id=cfg.image_id,
                image=cfg.image,
                ttl_seconds=cfg.ttl_seconds,
                env_vars=env,
            )
        except ModboxError as exc:
            raise ProvisioningError(f"could not create a Modbox sandbox: {exc}") from exc
        try:
            deadline = t0 + cfg.startup_timeout

            def left() -> float:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ModboxTimeoutError("the startup deadline passed")
                return remaining

            detail = await client.wait_until_running(info.id, timeout=left())
            info = info.merged(detail)
            runtime = client.runtime(info, api_key)
            # The whole start, agent included, fits in MODBOX_STARTUP_TIMEOUT.
            state_dir, agent_file = await asyncio.wait_for(self._install_agent(runtime), left())
            starting = asyncio.wait_for(self._start_agent(runtime, state_dir, agent_file), left())
            copy_notice = None
            if packing is None:
                agent_info = await starting
            else:
                # The copy goes alongside the agent's start; it never raises.
                copying = asyncio.ensure_future(
                    self._copy_folder(runtime, state_dir, agent_file, packing, left)
                )
                try:
                    agent_info = await starting
                    copy_notice = await copying
                except BaseException:
                    copying.cancel()
                    raise
        except BaseException as exc:
            # Never leave a half-made sandbox behind, whatever went wrong.
            with contextlib.suppress(Exception):
                await asyncio.shield(client.destroy_sandbox(info.id))
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
            state_dir=state_dir,
            agent_file=agent_file,
            agent_info=agent_info,
            created=t0,  # no later than the service's own clock for its TTL
        )
        self._sandbox = sandbox
        self.copy_notice = copy_notice
        log.info(
            "sandbox %s ready in %.2f s (python %s, ipython %s)",
            info.id,
            time.monotonic() - t0,
            agent_info.get("python_version"),
            agent_info.get("ipython_version"),
        )
        return sandbox

    async def _install_agent(self, runtime: SandboxRuntime) -> tuple[str, str]:
        """Put agent.py into the sandbox; returns (state dir, agent file), both absolute."""
        # One exec learns the sandbox's home directory, so every later path is absolute
        # and does not depend on the working directory a real image gives exec.
        res = await runtime.exec('mkdir -p "$HOME/.modbox" && cd "$HOME/.modbox" && pwd -P')
        if res.exit_code != 0 or not res.stdout.strip():
            raise AgentError(f"could not prepare the sandbox: {_tail(res)}")
        state_dir = res.stdout.strip().splitlines()[-1]
        name = f"modbox-agent-{agent_mod.AGENT_VERSION}.py"
        agent_file = await self._put_file(runtime, state_dir, name, agent_mod.agent_source())
        return state_dir, agent_file

    async def _copy_folder(
        self,
        runtime: SandboxRuntime,
        state_dir: str,
        agent_file: str,
        packing: asyncio.Future[Packed],
        left: Callable[[], float],
    ) -> str | None:
        """Copy the notebook's folder into the new sandbox's working directory.

        Called by :meth:`_provision` while the agent starts (the agent and its cells run
        in the exec's default directory, which is where this unpacks). A folder that is
        too big, or a copy that fails, leaves the sandbox usable: the reason is returned
        and becomes :attr:`copy_notice` (the kernel shows it in the next cell) once the
        sandbox is ready.
        """
        folder = self.config.copy_folder
        try:
            packed = await asyncio.wait_for(asyncio.shield(packing), left())
            if packed.skipped or packed.archive is None:
                return packed.skipped
            name = f"modbox-folder-{uuid.uuid4().hex[:12]}.tar.gz"
            path = await asyncio.wait_for(
                self._put_file(
                    runtime,
                    state_dir,
                    name,
                    packed.archive,
                    upload_dir=_upload_dir(state_dir, agent_file),
                ),
                left(),
            )
            res = await runtime.exec(_unpack_command(path), read_timeout=max(10.0, left()))
            if res.exit_code != 0:
                raise AgentError(f"unpacking failed: {_tail(res)}")
        except Exception as exc:  # a convenience: never a reason to fail the sandbox
            log.warning("could not copy %s into the sandbox: %s", folder, exc)
            return f"the files of {folder} could not be copied into the sandbox ({exc})"
        log.info(
            "copied %d files (%.1f MiB) of %s into the sandbox",
            packed.files,
            packed.size / 2**20,
            folder,
        )
        return None

    async def _start_agent(
        self, runtime: SandboxRuntime, state_dir: str, agent_file: str
    ) -> dict[str, Any]:
        """Start (or restart: the agent stops an earlier one) and return its start line."""
        res = await runtime.exec(agent_mod.start_command(agent_file, state_dir), read_timeout=60.0)
        line = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
        try:
            start_info = json.loads(line)
        except ValueError:
            start_info = {}
        if res.exit_code != 0 or not start_info.get("ok"):
            reason = start_info.get("error") or _tail(res)
            raise AgentError(f"the Python agent did not start in the sandbox: {reason}")
        return dict(start_info)

    async def restart_agent(self) -> None:
        """Kill the agent and start a fresh one in the same sandbox (files are kept).

        Called by the kernel when an interrupt did not stop a cell (it swallowed
        KeyboardInterrupt or sits in C code). The namespace is lost; if even this fails,
        the sandbox is forgotten so the next cell provisions a new one.
        """
        sandbox = self._sandbox
        if sandbox is None:
            return
        pid_file = shlex.quote(f"{sandbox.state_dir}/pid")
        try:
            await sandbox.runtime.exec(
                f'P=$(cat {pid_file} 2>/dev/null) && kill -9 "$P" 2>/dev/null; true',
                read_timeout=10.0,
            )
            sandbox.agent_info = await self._start_agent(
                sandbox.runtime, sandbox.state_dir, sandbox.agent_file
            )
        except ModboxError as exc:
            log.warning("agent restart failed (%s); the next cell gets a new sandbox", exc)
            self._forget(sandbox, "the sandbox stopped answering after an interrupt")
            self.lost_notice = None  # the cell's own error already says state was lost

    def expiry_warning(self) -> str | None:
        """A one-time sentence when the sandbox's TTL is about to run out, else None."""
        sandbox = self._sandbox
        if sandbox is None or self._ttl_warned == sandbox.info.id:
            return None
        ttl = self.config.ttl_seconds
        left = ttl - (time.monotonic() - sandbox.created)
        if left > max(60.0, 0.1 * ttl):
            return None
        self._ttl_warned = sandbox.info.id
        when = f"{max(0, int(left))} s" if left < 120 else f"{int(left // 60)} min"
        return (
            f"Modbox: this sandbox reaches its time limit (TTL {ttl} s) in about {when}; "
            "after that the next cell starts in a fresh sandbox without the current variables "
            "and files. Raise MODBOX_TTL_SECONDS for longer sessions."
        )

    async def _put_file(
        self,
        runtime: SandboxRuntime,
        state_dir: str,
        name: str,
        data: bytes,
        *,
        upload_dir: str | None = None,
    ) -> str:
        """Place ``data`` in the sandbox and return its absolute path there.

        The documented upload call comes first (one request, any size up to 50 MB);
        where it is unavailable or lands somewhere unexpected, the bytes are written
        with exec in base64 chunks, which needs nothing but bash and base64. With
        ``upload_dir`` (where the agent's own upload was found at bootstrap) the
        upload's location is known and not looked up again.
        """
        with contextlib.suppress(ModboxError):
            meta = await runtime.upload(name, data)
            if upload_dir is not None:
                return f"{upload_dir}/{name}"
            candidates = [p for p in (meta.get("path"), f"/workspace/uploads/{name}") if p]
            for path in candidates:
                check = await runtime.exec(f"test -f {shlex.quote(str(path))}")
                if check.exit_code == 0:
                    return str(path)
        path = f"{state_dir}/{name}"
        b64 = base64.b64encode(data).decode("ascii")
        tmp = shlex.quote(path + ".b64")
        chunk = 48 * 1024
        res = await runtime.exec(f": > {tmp}")
        for i in range(0, len(b64), chunk):
            res = await runtime.exec(f"printf %s '{b64[i : i + chunk]}' >> {tmp}")
            if res.exit_code != 0:
                raise AgentError(f"could not write {name} into the sandbox: {_tail(res)}")
        res = await runtime.exec(f"base64 -d {tmp} > {shlex.quote(path)} && rm -f {tmp}")
        if res.exit_code != 0:
            raise AgentError(f"could not write {name} into the sandbox: {_tail(res)}")
        return path

    async def close(self) -> None:
        """Destroy the sandbox and stop the embedded service (called on shutdown)."""
        self._closed = True
        if self._provisioning is not None and not self._provisioning.done():
            self._provisioning.cancel()
            with contextlib.suppress(BaseException):
                await self._provisioning
        sandbox, self._sandbox = self._sandbox, None
        client = self._client
        if sandbox is not None and client is not None:
            with contextlib.suppress(Exception):
                await client.destroy_sandbox(sandbox.info.id)
            with contextlib.suppress(Exception):
                await sandbox.runtime.aclose()
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()
            self._client = None
        if self._service is not None:
            await self._service.stop()

    def close_blocking(self) -> None:
        """Best-effort destroy without an event loop (atexit, or a stuck loop)."""
        self._closed = True
        sandbox, self._sandbox = self._sandbox, None
        if sandbox is not None:
            base_url, token = self._control_credentials()
            if base_url:
                with contextlib.suppress(Exception):
                    destroy_sandbox_blocking(
                        base_url,
                        token,
                        sandbox.info.id,
                        workspace_id=self.config.workspace_id,
                        timeout=2.0,
                    )
        if self._service is not None:
            self._service.kill_blocking()

    def _control_credentials(self) -> tuple[str, str | None]:
        if self.config.resolved_backend == "local":
            if self._service is None:
                return "", None
            return self._service.base_url, self._service.token
        return self.config.api_url, self.config.api_token

    # ------------------------------------------------------------------ agent protocol

    async def _request(
        self,
        sandbox: _Sandbox,
        payload: dict[str, Any],
        *,
        read_timeout: float = 30.0,
    ) -> dict[str, Any]:
        """Send one request to the agent through exec and return its JSON answer."""
        b64 = agent_mod.encode_request(payload)
        if len(b64) <= agent_mod.INLINE_LIMIT:
            command = agent_mod.request_command(sandbox.state_dir, encoded=b64)
        else:
            # The agent takes a base64 body in the file as well: no second encoding.
            name = f"modbox-req-{uuid.uuid4().hex}.json"
            path = await self._put_file(
                sandbox.runtime,
                sandbox.state_dir,
                name,
                b64.encode("ascii"),
                upload_dir=sandbox.upload_dir,
            )
            command = agent_mod.request_command(sandbox.state_dir, ref=path)
        res = await sandbox.runtime.exec(command, read_timeout=read_timeout)
        if res.exit_code == agent_mod.UNREACHABLE_EXIT:
            raise _AgentUnreachable(_tail(res))
        line = res.stdout.strip()
        if not line and res.exit_code == 0:
            # The connection closed without an answer: the agent died while handling
            # this request (a cell that killed its own process, a segfault, the OOM killer).
            raise _AgentUnreachable(_tail(res))
        try:
            answer = json.loads(line) if line else None
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise AgentError(f"the sandbox agent gave an unreadable answer: {_tail(res)}")
        if not answer.get("ok"):
            raise AgentError(f"the sandbox agent refused a request: {answer.get('error')}")
        return answer

    async def _request_retrying(
        self, sandbox: _Sandbox, payload: dict[str, Any], *, read_timeout: float
    ) -> dict[str, Any]:
        """Like :meth:`_request` for idempotent requests: transport faults are retried.

        Safe because ``execute`` is deduplicated by cell id in the agent and ``poll``
        only reads; so a reset connection or a 503 burst loses and repeats nothing.
        """
        deadline: float | None = None
        delay = 0.05
        while True:
            try:
                return await self._request(sandbox, payload, read_timeout=read_timeout)
            except (ServiceUnreachableError, ModboxTimeoutError, ApiError) as exc:
                if isinstance(exc, ApiError) and not _transient(exc):
                    raise
                if self._service_died():
                    raise  # nothing to wait for: _guarded reports the lost sandbox
                # The window starts at the first fault: one stalled request that used up
                # its whole read timeout must still get a retry.
                if deadline is None:
                    deadline = time.monotonic() + TRANSPORT_RETRY_WINDOW
                if time.monotonic() + delay > deadline:
                    raise ServiceUnreachableError(
                        f"lost contact with the Modbox service for {TRANSPORT_RETRY_WINDOW:.0f} s "
                        f"while the cell ran ({exc.message})",
                        hint="the sandbox may still be running it; check the network or the "
                        "service, then run the next cell",
                    ) from exc
                log.warning("transport fault talking to the sandbox (%s); retrying", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def execute(self, cell: CellRequest, on_event: EventCallback) -> dict[str, Any]:
        """Run one cell; call ``on_event`` for each event in order; return the done event.

        Raises :class:`SandboxLostError` (and forgets the sandbox) when the sandbox or
        its agent died, so the next cell provisions a fresh one.
        """
        sandbox = await self.ensure_ready()
        payload: dict[str, Any] = {
            "op": "execute",
            "id": cell.cell_id,
            "code": cell.code,
            "silent": cell.silent,
            "store_history": cell.store_history,
            "user_expressions": cell.user_expressions,
            "allow_stdin": cell.allow_stdin,
            "execution_count": cell.execution_count,
            "output_limit": cell.output_limit,
            "parent_header": cell.parent_header,
            "wait": SUBMIT_WAIT,
            "since": 0,
        }
        if cell.comm is not None:
            payload["comm"] = cell.comm
        self.running_cell = cell.cell_id
        since = 0
        try:
            answer = await self._guarded(
                sandbox, self._request_retrying(sandbox, payload, read_timeout=30.0)
            )
            while True:
                only_streams = True
                for event in answer.get("events", []):
                    seq = int(event.get("seq", since))
                    if seq < since:
                        continue  # already relayed before a retried request
                    since = seq + 1
                    if event.get("type") == "done":
                        return event
                    if event.get("type") != "stream":
                        only_streams = False
                    await on_event(event)
                since = max(since, int(answer.get("next", since)))
                if only_streams and answer.get("events"):
                    await asyncio.sleep(MIN_STREAM_INTERVAL)
                poll = {"op": "poll", "id": cell.cell_id, "since": since, "wait": POLL_WAIT}
                answer = await self._guarded(
                    sandbox,
                    self._request_retrying(sandbox, poll, read_timeout=POLL_WAIT + 10.0),
                )
        finally:
            self.running_cell = None

    async def _guarded(self, sandbox: _Sandbox, coro: Awaitable[dict[str, Any]]) -> dict[str, Any]:
        """Turn 'agent unreachable' and 'sandbox gone' into SandboxLostError with a cause."""
        try:
            return await coro
        except _AgentUnreachable as exc:
            cause = await self._diagnose_loss(sandbox)
            self._forget(sandbox, cause)
            raise SandboxLostError(cause) from exc
        except NotFoundError as exc:
            cause = await self._diagnose_loss(sandbox)
            self._forget(sandbox, cause)
            raise SandboxLostError(cause) from exc
        except ServiceUnreachableError as exc:
            if not self._service_died():
                raise
            cause = "the embedded Modbox service stopped, and its sandboxes with it"
            self._forget(sandbox, cause)
            raise SandboxLostError(cause) from exc

    def _service_died(self) -> bool:
        """True when the embedded service this session started is no longer running."""
        return (
            self.config.resolved_backend == "local"
            and self._service is not None
            and not self._service.running
        )

    async def _diagnose_loss(self, sandbox: _Sandbox) -> str:
        """Ask the control plane what happened to a sandbox that stopped answering."""
        client = self._client
        if client is None:
            return "the sandbox is gone"
        # The agent can die a moment before the service records why (an OOM kill, a
        # process limit); give it a short while to say so.
        deadline = time.monotonic() + LOSS_DIAGNOSIS_WAIT
        while True:
            try:
                detail = await client.get_sandbox(sandbox.info.id)
            except NotFoundError:
                return "the sandbox no longer exists (destroyed or expired)"
            except ModboxError:
                return "the sandbox stopped answering"
            if detail.status == "destroyed":
                # The service may say why (out of memory, process limit, TTL, deleted).
                reason = detail.raw.get("error")
                if isinstance(reason, str) and reason.strip():
                    return f"the sandbox was destroyed: {reason.strip().rstrip('.')}"
                return "the sandbox was destroyed (it may have reached its TTL or been deleted)"
            if time.monotonic() >= deadline:
                return "the Python process in the sandbox died (killed, or out of memory)"
            await asyncio.sleep(0.2)

    def _forget(self, sandbox: _Sandbox, cause: str) -> None:
        if self._sandbox is sandbox:
            self._sandbox = None
            self._provisioning = None
            self.lost_notice = cause
            client = self._client
            if client is not None:
                # The old sandbox may still run (only its agent died): destroy it.
                task = asyncio.ensure_future(_quietly(client.destroy_sandbox(sandbox.info.id)))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def interrupt(self, cell_id: str | None = None) -> bool:
        """Ask the agent to raise KeyboardInterrupt in the running cell."""
        sandbox = self._sandbox
        target = cell_id or self.running_cell
        if sandbox is None or target is None:
            return False
        try:
            answer = await self._request(sandbox, {"op": "interrupt", "id": target})
        except ModboxError as exc:
            log.warning("interrupt could not be delivered: %s", exc)
            return False
        except _AgentUnreachable:
            return False
        return bool(answer.get("delivered", True))

    async def send_input(self, cell_id: str, value: str) -> None:
        sandbox = await self.ensure_ready()
        await self._request(sandbox, {"op": "input_reply", "id": cell_id, "value": value})

    async def query(self, op: str, **fields: Any) -> dict[str, Any]:
        """complete / inspect / is_complete / history / info: returns the agent's reply."""
        sandbox = await self.ensure_ready()
        answer = await self._guarded(sandbox, self._request(sandbox, {"op": op, **fields}))
        reply = answer.get("reply")
        return reply if isinstance(reply, dict) else {}


class _AgentUnreachable(Exception):
    """The exec ran but the agent did not answer (it is dead or was never started)."""


def _transient(exc: ApiError) -> bool:
    return exc.status_code in (408, 425, 429, 502, 503, 504)


def _upload_dir(state_dir: str, agent_file: str) -> str | None:
    """Where uploads land, learned from where the agent's own upload landed; None when
    the agent had to be written with exec (into ``state_dir``) because uploads failed."""
    directory = posixpath.dirname(agent_file)
    return None if directory == state_dir else directory


def _unpack_command(archive: str) -> str:
    """Unpack a gzip'd tar in the exec's directory and remove it: tar, else Python."""
    a = shlex.quote(archive)
    python = "import sys, tarfile; tarfile.open(sys.argv[1]).extractall()"
    return (
        f"if command -v tar >/dev/null 2>&1; then tar -xzf {a}; "
        f"else python3 -c {shlex.quote(python)} {a}; fi; rc=$?; rm -f {a}; exit $rc"
    )


def _tail(res: ExecResult, limit: int = 300) -> str:
    text = (res.stderr or res.stdout or "").strip()
    if len(text) > limit:
        text = "…" + text[-limit:]
    return f"{text or 'no output'} (exit code {res.exit_code})"


async def _quietly(coro: Awaitable[Any]) -> None:
    with contextlib.suppress(Exception):
        await coro

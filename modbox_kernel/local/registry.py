"""The sandboxes of this service: records, lifecycle, TTL reaper, teardown.

Who calls what: the control-plane routes call :meth:`Registry.create`, ``get``,
``find_live_by_name``, ``list``, :meth:`Registry.wait_ready` and
:meth:`Registry.destroy`; the runtime routes call ``exec`` and ``ask_agent`` (inherited
from ``jailcalls``). ``app``'s lifespan starts the reaper (:meth:`Registry.run_reaper`)
and calls :meth:`Registry.close` on shutdown, which destroys every live sandbox.

Lifecycle: ``provisioning`` (record exists, jail starting in a background task) →
``running`` (the supervisor said hello) → ``destroyed`` (by DELETE, TTL expiry, jail
death, an out-of-memory kill, or service shutdown). Destroyed records stay listed with
the cause in ``error``; their processes, cgroup and workspace are gone.

Limit events (out of memory, time limit, process limit, killed from inside) end an
exec or the whole sandbox as ``docs/local-service.md`` describes ("Why a sandbox
ended"): any OOM kill in a sandbox's memory cgroup ends the whole sandbox (what cgroup
v2's ``memory.oom.group=1`` does, applied on v1 too), seen by the exec that was
running, by the jail's exit, or by the reaper within 0.5 s; a sandbox so full of
processes that no command can start is ended too. Every later runtime call gets 404
``sandbox_not_found`` with the cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
import time
import uuid
from dataclasses import replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from . import orphans, probecache
from .admission import admit, admit_owner, host_memory_available
from .cgroups import CgroupManager
from .config import Limits, ServiceConfig
from .envelope import ServiceError
from .jail import Jail, JailSpec
from .jailcalls import JailCalls
from .jailprocess import JailGone, JailProcess
from .procscan import kill_sandbox_processes
from .records import (
    DESTROYED,
    PROVISIONING,
    RUNNING,
    STATUSES,
    ProvisionInput,
    Sandbox,
    gone,
    not_found,
    oom_reason,
    utcnow,
)
from .usage import UsageBook
from .waitline import WaitLine

if TYPE_CHECKING:
    from .pool import Pool

__all__ = [
    "DESTROYED",
    "PROVISIONING",
    "RUNNING",
    "STATUSES",
    "ProvisionInput",
    "Registry",
    "Sandbox",
    "gone",
]

log = logging.getLogger(__name__)

START_TIMEOUT_S = 30.0
# Destroyed records are kept for listing (as Modbox does), but not without bound.
KEEP_DESTROYED = 1000
# How often the reaper looks for expired TTLs and OOM kills nobody has noticed yet.
REAPER_INTERVAL_S = 0.5


class Registry(JailCalls):
    """All sandboxes of the service, keyed by id, newest last."""

    def __init__(self, config: ServiceConfig, jail: Jail, cgroups: CgroupManager) -> None:
        self.config = config
        self.jail = jail
        self.cgroups = cgroups
        self._sandboxes: dict[str, Sandbox] = {}
        self._idempotent: dict[str, tuple[str, dict[str, Any]]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._closing = False
        # Creates waiting for capacity, first come, first served (admission.admit).
        self._line = WaitLine()
        # What each owner's sandboxes used (``usage``).
        self.usage = UsageBook()
        # Sandboxes made in advance (``pool``), when the service keeps any.
        self.pool: Pool | None = None

    # -- queries ---------------------------------------------------------------

    # ``owner``: the caller (``owners``); None is the admin, who sees every sandbox.
    # Another owner's sandbox is answered as if it did not exist.

    def get(self, sandbox_id: str, owner: str | None = None) -> Sandbox:
        sandbox = self._sandboxes.get(sandbox_id)
        if sandbox is None or sandbox.pooled or (owner is not None and sandbox.owner != owner):
            raise not_found(sandbox_id)
        return sandbox

    def find_by_name(self, name: str, owner: str | None = None) -> Sandbox:
        """The live sandbox with this task_id, else the newest destroyed one."""
        matches = [
            s
            for s in self._sandboxes.values()
            if s.name == name and not s.pooled and (owner is None or s.owner == owner)
        ]
        live = [s for s in matches if s.status != DESTROYED]
        if live:
            return live[-1]
        if matches:
            return matches[-1]
        raise ServiceError(
            404, "sandbox_not_found", f"No sandbox named {name!r} exists.", retryable=False
        )

    def list(self, status: str | None = None, owner: str | None = None) -> list[Sandbox]:
        items = [
            s
            for s in self._sandboxes.values()
            if (status is None or s.status == status)
            and not s.pooled
            and (owner is None or s.owner == owner)
        ]
        return list(reversed(items))  # newest first

    def live_count(self, owner: str | None = None, *, pooled: bool = True) -> int:
        """Live sandboxes (of ``owner``); the pool's count for the host's admission."""
        return sum(
            1
            for s in self._sandboxes.values()
            if s.status != DESTROYED
            and (owner is None or s.owner == owner)
            and (pooled or not s.pooled)
        )

    def idempotent_response(self, key: str) -> dict[str, Any] | None:
        entry = self._idempotent.get(key)
        return entry[1] if entry else None

    def remember_idempotent(self, key: str, sandbox: Sandbox, response: dict[str, Any]) -> None:
        self._idempotent[key] = (sandbox.id, response)

    # -- create ----------------------------------------------------------------

    def create(
        self,
        request: ProvisionInput,
        *,
        queue_key: str | None = None,
        owner: str | None = None,
        role: str | None = None,
        pooled: bool = False,
    ) -> Sandbox:
        """Register a sandbox and start its jail in the background.

        Deliberately synchronous (no await): the name check, the registration and the
        caller's idempotency bookkeeping happen atomically with respect to other requests.
        ``queue_key`` (the create's Idempotency-Key) is its place in line at capacity.
        """
        if self._closing:
            raise ServiceError(503, "internal_error", "The service is shutting down.")
        name = request.name or f"sandbox-{secrets.token_hex(4)}"
        if any(
            s.name == name and s.status != DESTROYED and s.owner == owner
            for s in self._sandboxes.values()
        ):
            raise ServiceError(
                409,
                "sandbox_name_conflict",
                f"A live sandbox named {name!r} already exists.",
                hint="Choose another task_id, or destroy the existing sandbox first.",
                retryable=False,
            )
        limits = self._role_limits(role)
        if owner is not None:
            admit_owner(owner, self.live_count(owner), limits, role)
        if self.pool is not None and not pooled and role is None:
            # A sandbox made in advance already holds its place in the host's budget.
            taken = self.pool.hand_over(request, name, owner)
            if taken is not None:
                return taken
        admit(
            self.live_count(),
            self.config.limits,
            host_memory_available(),
            line=self._line,
            key=queue_key,
        )
        self._prune()
        sandbox_id = str(uuid.uuid4())
        root = self.config.state_dir / "sandboxes" / sandbox_id
        workspace = root / "workspace"
        if self.jail.mode == "none":
            # Under bwrap the workspace is a tmpfs inside the jail; nothing on the host.
            workspace.mkdir(parents=True, mode=0o700)
            (workspace / "uploads").mkdir()
        now = utcnow()
        spec = JailSpec(sandbox_id, workspace, limits)
        sandbox = Sandbox(
            id=sandbox_id,
            name=name,
            image=request.image,
            client_reference=request.client_reference,
            created_at=now,
            updated_at=now,
            expires_at=now + timedelta(seconds=request.ttl_seconds),
            access_token=secrets.token_urlsafe(32),
            api_key=request.env_vars.get("SANDBOX_API_KEY") or None,
            root=root,
            workspace=workspace,
            workspace_path=self.jail.workspace_path(spec),
            env_vars=request.env_vars,
            owner=owner,
            limits=None if role is None else limits,
            pooled=pooled,
        )
        self._sandboxes[sandbox_id] = sandbox
        sandbox.start_task = self.spawn(self._start(sandbox), f"start-{sandbox_id}")
        log.info("sandbox %s (%s) provisioning", sandbox_id, name)
        return sandbox

    def _role_limits(self, role: str | None) -> Limits:
        """The limits of a sandbox made for a credential in ``role`` (403 if this
        service has no such role)."""
        if role is None:
            return self.config.limits
        found = self.config.roles.get(role)
        if found is None:
            raise ServiceError(
                403,
                "forbidden",
                f"The credential names the role {role!r}, which this service does not have.",
                hint="The service's operator defines roles with --role NAME:memory=MIB,"
                "sandboxes=N; or use a credential without a role.",
                retryable=False,
            )
        limits = self.config.limits
        return replace(
            limits,
            memory=limits.memory if found.memory is None else found.memory,
            max_sandboxes_per_owner=(
                limits.max_sandboxes_per_owner
                if found.max_sandboxes is None
                else found.max_sandboxes
            ),
        )

    def limits_of(self, sandbox: Sandbox) -> Limits:
        return sandbox.limits or self.config.limits

    def _prune(self) -> None:
        """Forget the oldest destroyed records beyond KEEP_DESTROYED."""
        gone = [s for s in self._sandboxes.values() if s.torn_down]
        for sandbox in gone[: max(0, len(gone) - KEEP_DESTROYED)]:
            del self._sandboxes[sandbox.id]
        known = self._sandboxes.keys()
        for key in [k for k, (sid, _) in self._idempotent.items() if sid not in known]:
            del self._idempotent[key]

    async def _start(self, sandbox: Sandbox) -> None:
        # A pooled sandbox goes running at its handover (``pool``), which may come
        # while its jail still starts: decide now, not after the awaits below.
        announce = not sandbox.pooled
        try:
            limits = self.limits_of(sandbox)
            sandbox.cgroup = await asyncio.to_thread(self.cgroups.create, sandbox.id, limits.memory)
            spec = JailSpec(
                sandbox.id,
                sandbox.workspace,
                limits,
                network=self.config.network,
                cgroup_procs=sandbox.cgroup.procs_files if sandbox.cgroup else (),
                address_space=(
                    None
                    if sandbox.cgroup and self.cgroups.enforces_memory
                    else self.config.limits.address_space
                ),
            )
            jail = JailProcess(
                sandbox.id,
                self.jail.launch(spec),
                # bwrap may start as the dropped uid: give it a cwd anyone can enter.
                cwd=str(sandbox.workspace) if self.jail.mode == "none" else "/",
                on_exit=self._on_jail_exit,
                pid_namespace=self.jail.mode == "bwrap",
            )
            sandbox.jail = jail
            # Spawned here, on the event-loop thread (see jailprocess's docstring).
            await jail.start(START_TIMEOUT_S)
            if sandbox.env_vars:
                answer = await jail.request({"op": "init", "env": sandbox.env_vars}, 10)
                if not answer.get("ok"):
                    raise JailGone(f"could not set env_vars: {answer.get('error')}")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            reason = str(exc) if isinstance(exc, JailGone) else f"{type(exc).__name__}: {exc}"
            log.error("sandbox %s failed to start: %s", sandbox.id, reason)
            if self.jail.mode == "bwrap":
                # Perhaps what the remembered probe vouched for changed: probe next time.
                probecache.forget()
            sandbox.error = f"provisioning failed: {reason}"
            self.spawn(self.destroy(sandbox), f"destroy-{sandbox.id}")
            return
        if announce and sandbox.status == PROVISIONING:
            sandbox.set_status(RUNNING)
            log.info("sandbox %s running (jail pid %s)", sandbox.id, sandbox.jail.pid)

    def _on_jail_exit(self, jail: JailProcess) -> None:
        sandbox = self._sandboxes.get(jail.sandbox_id)
        if sandbox is None or sandbox.status == DESTROYED:
            return
        if self._end_if_oom(sandbox):
            return
        sandbox.error = sandbox.error or jail.describe_exit()
        log.warning("sandbox %s stopped unexpectedly: %s", sandbox.id, sandbox.error)
        self.spawn(self.destroy(sandbox), f"destroy-{sandbox.id}")

    def _end_if_oom(self, sandbox: Sandbox) -> bool:
        """Destroy a sandbox whose memory cgroup saw an OOM kill; True if it did (or had)."""
        if sandbox.status == DESTROYED:
            return (sandbox.error or "").startswith(oom_reason(self.limits_of(sandbox)))
        cgroup = sandbox.cgroup
        if cgroup is None or cgroup.oom_kills() == 0:
            return False
        reason = oom_reason(self.limits_of(sandbox))
        if cgroup.pids_limit_hits() > 0:
            # A fork bomb of a big process (an IPython agent copying itself) usually
            # ends in the OOM killer; name the process limit it ran into too.
            reason += (
                f" after reaching its process limit ({self.config.limits.nproc} processes "
                "and threads; a fork bomb?)"
            )
        self._end(sandbox, reason)
        return True

    def _end(self, sandbox: Sandbox, reason: str) -> None:
        """Destroy a sandbox that can no longer work, recording why."""
        sandbox.error = reason
        log.warning("sandbox %s ended: %s", sandbox.id, reason)
        if reason.startswith(oom_reason(self.limits_of(sandbox))):
            self.usage.count_event(sandbox, "oom_kills")
        # Mark it destroyed now, synchronously, so no exec slips in before the teardown.
        sandbox.destroyed_at = utcnow()
        sandbox.set_status(DESTROYED)
        self.spawn(self.destroy(sandbox), f"destroy-{sandbox.id}")

    # -- wait ------------------------------------------------------------------

    async def wait_ready(self, sandbox: Sandbox, timeout: float) -> dict[str, Any]:
        """The WaitResponse body; a timeout is an answer, not an error."""
        started = time.monotonic()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(sandbox.settled.wait(), timeout)
        body: dict[str, Any] = {
            "ready": sandbox.status == RUNNING,
            "elapsed_seconds": round(time.monotonic() - started, 3),
            "status": sandbox.status,
        }
        if sandbox.status == PROVISIONING:
            body["reason"] = "timeout"
        elif sandbox.status == DESTROYED:
            body["reason"] = sandbox.error or "destroyed"
        return body

    # -- destroy ---------------------------------------------------------------

    def renew_lease(self, sandbox: Sandbox) -> float:
        """Keep ``sandbox`` for another lease period; returns its length in seconds.

        The first renewal opts the sandbox in: from then on, the reaper destroys it
        when renewals stop (its kernel was killed, or died with its parent).
        """
        seconds = self.config.limits.lease_seconds
        if sandbox.status == DESTROYED:
            raise gone(sandbox)
        if seconds > 0:
            sandbox.lease_seconds = seconds
            sandbox.lease_until = time.monotonic() + seconds
        return seconds

    async def destroy(self, sandbox: Sandbox) -> None:
        """Kill every process of the sandbox, remove its cgroup and workspace. Idempotent."""
        async with sandbox.lock:
            if sandbox.torn_down:
                return
            if sandbox.status != DESTROYED:
                sandbox.destroyed_at = utcnow()
                sandbox.set_status(DESTROYED)
            task = sandbox.start_task
            if task is not None and not task.done() and task is not asyncio.current_task():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            if sandbox.jail is not None:
                await sandbox.jail.kill()
            await asyncio.to_thread(self._teardown_files, sandbox)
            await asyncio.to_thread(orphans.reap, self._unreaped_pids())
            sandbox.torn_down = True
            log.info("sandbox %s destroyed", sandbox.id)

    def _teardown_files(self, sandbox: Sandbox) -> None:
        self.usage.settle(sandbox)  # while its cgroup can still be read
        if sandbox.cgroup is not None:
            sandbox.cgroup.kill_and_remove()
        # After a pid namespace's end one empty scan is proof; otherwise (no bwrap) a
        # process forking as its parent died may surface a moment later: scan twice.
        gone = sandbox.jail is not None and sandbox.jail.namespace_gone
        survivors = kill_sandbox_processes(sandbox.id, confirm=not gone)
        if survivors:
            log.error("sandbox %s: processes %s survived SIGKILL", sandbox.id, sorted(survivors))
        # rmtree never follows symlinks, so links the sandbox planted cannot redirect it.
        shutil.rmtree(sandbox.root, ignore_errors=True)

    async def run_reaper(self, interval: float = REAPER_INTERVAL_S) -> None:
        """Destroy sandboxes past their TTL or OOM-killed, reap orphaned jail processes.

        Runs for the service's lifetime.
        """
        while True:
            await asyncio.sleep(interval)
            await asyncio.to_thread(orphans.reap, self._unreaped_pids())
            now = utcnow()
            for sandbox in list(self._sandboxes.values()):
                if sandbox.status == RUNNING and self._end_if_oom(sandbox):
                    continue
                if sandbox.status != DESTROYED and sandbox.expires_at <= now:
                    sandbox.error = "ttl expired"
                    log.info("sandbox %s reached its TTL", sandbox.id)
                    self.spawn(self.destroy(sandbox), f"reap-{sandbox.id}")
                elif sandbox.status != DESTROYED and sandbox.lease_lapsed():
                    sandbox.error = "lease lapsed: its kernel stopped renewing it"
                    log.info("sandbox %s: its lease lapsed (its kernel is gone)", sandbox.id)
                    self.spawn(self.destroy(sandbox), f"lapse-{sandbox.id}")

    def _unreaped_pids(self) -> set[int]:
        """Pids of our jail children whose exit status asyncio still has to collect."""
        return {
            pid
            for s in self._sandboxes.values()
            if s.jail is not None and (pid := s.jail.unreaped_pid) is not None
        }

    async def close(self) -> None:
        """Destroy every sandbox (service shutdown)."""
        self._closing = True
        await asyncio.gather(
            *(self.destroy(s) for s in self._sandboxes.values() if not s.torn_down),
            return_exceptions=True,
        )
        pending = [t for t in self._background if not t.done()]
        await asyncio.gather(*pending, return_exceptions=True)

    def spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

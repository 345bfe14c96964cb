"""Sandboxes made in advance, each with the Python agent already started in it.

Who calls what, and when: ``__main__`` makes a :class:`Pool` when the service is started
with ``--pool N`` and hands it to the registry; ``app``'s lifespan calls :meth:`Pool.start`
once the service serves. :meth:`Registry.create` calls :meth:`Pool.hand_over` for every
create; when a sandbox is waiting in the pool, the create gets that one instead of a
new jail, and the pool starts making a replacement (unless ``--pool-once``).

Why: a kernel's start is otherwise a chain of waits while the user looks at a busy
indicator — the jail, the agent's upload, the agent's start, IPython's import (about
half a second here). A pooled sandbox has done all of that before anyone asked. The
service ships the kernel's own agent (``modbox_kernel.agent``), so it can start the
same one, in the same place, as the kernel's bootstrap would (``bootstrap.py``): the
state directory ``$HOME/.modbox``, the agent file in ``uploads/``. It is an extension:
the sandbox's detail then carries ``agent`` (version, state dir, file), and a kernel
that does not know it simply starts a second agent, which replaces the first.

Freshness: a pooled sandbox is never handed out twice and nothing runs in it before
the handover but the agent's start; its records are hidden from every query until
then. Only a create whose ``env_vars`` hold nothing but ``SANDBOX_API_KEY`` (what a
kernel sends) takes one: an agent reads some variables when it starts (PYTHONPATH,
the locale, its own switches), so other variables need an agent started after them.
At the handover the key reaches the supervisor (for later commands) and the agent
(``environ``, which the agent accepts only before its first cell), so the notebook's
environment is what a sandbox made on demand would have.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import secrets
import time
from datetime import timedelta
from typing import TYPE_CHECKING

from .. import agent as agent_mod
from . import files
from .envelope import ServiceError
from .records import DESTROYED, RUNNING, ProvisionInput, Sandbox, utcnow

if TYPE_CHECKING:
    from .registry import Registry

log = logging.getLogger(__name__)

# How long preparing one pooled sandbox may take (the agent's start included).
PREPARE_TIMEOUT_S = 60.0


class Pool:
    """Up to ``size`` ready (or getting ready) sandboxes of one registry."""

    def __init__(self, registry: Registry, image: str, size: int, *, refill: bool) -> None:
        self.registry = registry
        self.image = image
        self.size = max(0, size)
        self.refill = refill
        # Oldest first; each with the task that prepares it (done: ready or failed).
        self._waiting: list[tuple[Sandbox, asyncio.Task[None]]] = []

    @property
    def ready(self) -> int:
        """Sandboxes waiting in the pool (prepared or being prepared)."""
        return sum(1 for s, _ in self._waiting if s.status != DESTROYED)

    def start(self) -> None:
        """Fill the pool (called once the service serves, on its event loop)."""
        for _ in range(self.size):
            self._add()

    def _add(self) -> None:
        registry = self.registry
        request = ProvisionInput(
            name=f"pool-{secrets.token_hex(6)}",
            client_reference=None,
            image=self.image,
            env_vars={},
            ttl_seconds=registry.config.limits.ttl_max,
        )
        try:
            sandbox = registry.create(request, pooled=True)
        except ServiceError as exc:
            # At capacity: the pool never takes a place a creator waits for.
            log.info("the pool makes no sandbox now: %s", exc.message)
            return
        task = registry.spawn(self._prepare(sandbox), f"pool-{sandbox.id}")
        self._waiting.append((sandbox, task))

    async def _prepare(self, sandbox: Sandbox) -> None:
        """Start the agent in a new pooled sandbox, where the kernel's bootstrap would."""
        try:
            sandbox.agent = await asyncio.wait_for(self._start_agent(sandbox), PREPARE_TIMEOUT_S)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            reason = str(exc) or type(exc).__name__
            log.warning("pooled sandbox %s could not be prepared: %s", sandbox.id, reason)
            if sandbox.pooled and sandbox.status != DESTROYED:
                sandbox.error = f"pool: {reason}"
                await self.registry.destroy(sandbox)
            # Already handed over: the creator gets the sandbox without a started agent
            # (no ``agent`` in its detail), and its kernel starts one as usual.
            raise
        log.info("pooled sandbox %s ready (agent %s)", sandbox.id, agent_mod.AGENT_VERSION)

    async def _start_agent(self, sandbox: Sandbox) -> dict[str, str]:
        registry = self.registry
        if sandbox.start_task is not None:
            await asyncio.shield(sandbox.start_task)
        if sandbox.status == DESTROYED or sandbox.jail is None:
            raise RuntimeError(sandbox.error or "the jail did not start")
        mkdir = 'mkdir -p "$HOME/.modbox" && cd "$HOME/.modbox" && pwd -P'
        res = await registry.exec(sandbox, mkdir, 30, internal=True)
        lines = str(res.get("stdout", "")).strip().splitlines()
        if res.get("exitCode") != 0 or not lines:
            raise RuntimeError(f"could not prepare the state dir: {res.get('stderr')}")
        state_dir = lines[-1]
        agent_file = await self._upload_agent(sandbox)
        command = agent_mod.start_command(agent_file, state_dir)
        res = await registry.exec(sandbox, command, 60, internal=True)
        lines = str(res.get("stdout", "")).strip().splitlines()
        try:
            started = json.loads(lines[-1]) if lines else {}
        except ValueError:
            started = {}
        if res.get("exitCode") != 0 or not isinstance(started, dict) or not started.get("ok"):
            raise RuntimeError(f"the agent did not start: {res.get('stderr')}")
        return {
            "version": agent_mod.AGENT_VERSION,
            "state_dir": state_dir,
            "agent_file": agent_file,
        }

    async def _upload_agent(self, sandbox: Sandbox) -> str:
        """Store the agent as the upload route would (``uploads/<name>``); its path."""
        assert sandbox.jail is not None
        registry = self.registry
        limits = registry.config.limits
        workspace = files.Workspace(
            sandbox.jail.workspace_fd(), sandbox.workspace_path, owner=registry.jail.privilege.drop
        )

        def store() -> dict[str, object]:
            try:
                with files.acting_as(workspace.owner):
                    return files.store_upload(
                        workspace,
                        agent_mod.agent_file_name(),
                        io.BytesIO(agent_mod.agent_artifact()),
                        limits.upload_max,
                        limits.upload_count_max,
                    )
            finally:
                os.close(workspace.root_fd)

        answer = await asyncio.to_thread(store)
        return str(answer["path"])

    def hand_over(self, request: ProvisionInput, name: str, owner: str | None) -> Sandbox | None:
        """Give a waiting sandbox to this create, or None (then a jail is made).

        Synchronous, as :meth:`Registry.create` is: the pick and the renaming happen
        together. The sandbox stays ``provisioning`` until the handover's task has given
        the creator's ``env_vars`` to its supervisor and its agent.
        """
        if set(request.env_vars) - {"SANDBOX_API_KEY"}:
            # The agent read its environment when it started (PYTHONPATH, locale, its own
            # switches): a creator's other variables need an agent started after them.
            return None
        while self._waiting:
            sandbox, task = self._waiting.pop(0)
            failed = task.done() and (task.cancelled() or task.exception() is not None)
            if sandbox.status == DESTROYED or failed:
                if self.refill:
                    self._add()  # a lost pooled sandbox is replaced when it is noticed
                continue
            sandbox.name = name
            sandbox.client_reference = request.client_reference
            sandbox.owner = owner
            sandbox.env_vars = dict(request.env_vars)
            sandbox.api_key = request.env_vars.get("SANDBOX_API_KEY") or None
            now = utcnow()
            sandbox.created_at = sandbox.updated_at = now
            sandbox.created_mono = time.monotonic()
            sandbox.expires_at = now + timedelta(seconds=request.ttl_seconds)
            sandbox.pooled = False
            sandbox.start_task = self.registry.spawn(
                self._adopt(sandbox, task), f"handover-{sandbox.id}"
            )
            log.info("sandbox %s (%s) taken from the pool", sandbox.id, name)
            if self.refill:
                self._add()
            return sandbox
        return None

    async def _adopt(self, sandbox: Sandbox, prepared: asyncio.Task[None]) -> None:
        registry = self.registry
        try:
            with contextlib.suppress(Exception):
                await asyncio.shield(prepared)  # without an agent, the kernel starts one
            if sandbox.status == DESTROYED or sandbox.jail is None:
                raise RuntimeError(sandbox.error or "the jail did not start")
            if sandbox.env_vars:
                answer = await sandbox.jail.request({"op": "init", "env": sandbox.env_vars}, 10)
                if not answer.get("ok"):
                    raise RuntimeError(f"could not set env_vars: {answer.get('error')}")
            if sandbox.env_vars and sandbox.agent is not None:
                command = agent_mod.request_command(
                    sandbox.agent["state_dir"], {"op": "environ", "set": sandbox.env_vars}
                )
                res = await registry.exec(sandbox, command, 30, internal=True)
                if res.get("exitCode") != 0 or not _answered_ok(str(res.get("stdout", ""))):
                    raise RuntimeError(
                        f"the agent did not take the env_vars: {str(res.get('stderr'))[-300:]}"
                        f" {str(res.get('stdout'))[-300:]}"
                    )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if sandbox.status != DESTROYED:
                sandbox.error = sandbox.error or f"provisioning failed: {exc}"
                log.error("sandbox %s failed to start: %s", sandbox.id, sandbox.error)
                await registry.destroy(sandbox)
            return
        if sandbox.status != DESTROYED:
            sandbox.set_status(RUNNING)
            log.info("sandbox %s running (from the pool)", sandbox.id)


def _answered_ok(stdout: str) -> bool:
    try:
        answer = json.loads(stdout.strip() or "null")
    except ValueError:
        return False
    return isinstance(answer, dict) and answer.get("ok") is True

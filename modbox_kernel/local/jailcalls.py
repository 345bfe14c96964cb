"""Commands and agent requests relayed into a sandbox's jail (a part of the registry).

Who calls what: the runtime routes call :meth:`JailCalls.exec` (``POST …/exec``) and
:meth:`JailCalls.ask_agent` (the ``agent`` route), the pool calls ``exec`` with
``internal=True`` while it prepares a sandbox nobody holds yet. ``registry.Registry``
inherits these methods; they need its config, usage book and the way it ends a sandbox
that hit a limit (``_end``, ``_end_if_oom``), declared here.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from . import agentsocket
from .config import ServiceConfig
from .envelope import ServiceError
from .files import Workspace, split_path
from .jail import Jail
from .jailprocess import JailGone
from .records import DESTROYED, PROVISIONING, Sandbox, gone, with_limit_event
from .usage import UsageBook

# Extra time the service waits beyond an exec's own limit before it gives up on the
# supervisor (which enforces the limit itself and normally answers first).
EXEC_BACKSTOP_S = 30.0


class JailCalls:
    """What runs in a jail on request; mixed into :class:`registry.Registry`."""

    config: ServiceConfig
    usage: UsageBook
    jail: Jail

    def _end(self, sandbox: Sandbox, reason: str) -> None:
        raise NotImplementedError

    def _end_if_oom(self, sandbox: Sandbox) -> bool:
        raise NotImplementedError

    async def exec(
        self, sandbox: Sandbox, command: str, timeout: float, *, internal: bool = False
    ) -> dict[str, Any]:
        """Run ``command`` in the sandbox; ``internal``: the pool prepares a sandbox
        that is still provisioning (hidden) for whoever will take it."""
        message = {
            "op": "exec",
            "command": command,
            "timeout": timeout,
            "cap": self.config.limits.output_cap,
        }
        fork_failures = sandbox.cgroup.pids_limit_hits() if sandbox.cgroup else 0
        answer = await self._ask_jail(sandbox, message, timeout, internal=internal)
        if answer.get("spawnError") == "process_limit" and sandbox.status != DESTROYED:
            self._end(
                sandbox,
                f"process limit reached ({self.config.limits.nproc} processes and threads): "
                "no command can start in the sandbox any more (a fork bomb?)",
            )
            raise gone(sandbox)
        result = {k: v for k, v in answer.items() if k not in ("id", "ok")}
        if sandbox.cgroup is not None:
            fork_failures = sandbox.cgroup.pids_limit_hits() - fork_failures
        else:
            fork_failures = 0
        if result.get("timedOut"):
            self.usage.count_event(sandbox, "time_limits")
        return with_limit_event(result, fork_failures, self.config.limits)

    async def ask_agent(
        self, sandbox: Sandbox, state_dir: str, body: str, timeout: float
    ) -> dict[str, Any]:
        """Relay one request to the kernel agent in ``state_dir``: through the agent's
        own socket where it has one, else by the supervisor's ``agent`` op
        (``routes_runtime`` turns either answer into the ``agent`` route's)."""
        cap = 2 * self.config.limits.output_cap
        answer = await self._ask_socket(sandbox, state_dir, body, timeout, cap)
        if answer is not None:
            return answer
        message = {
            "op": "agent",
            "state_dir": state_dir,
            "body": body,
            "timeout": timeout,
            "cap": cap,
        }
        return await self._ask_jail(sandbox, message, timeout)

    async def _ask_socket(
        self, sandbox: Sandbox, state_dir: str, body: str, timeout: float, cap: int
    ) -> dict[str, Any] | None:
        """The request through the agent's own socket (``agentsocket``), or None when
        there is none (then the supervisor relays it)."""
        self._check_ready(sandbox)
        assert sandbox.jail is not None
        try:
            parts = split_path(sandbox.workspace_path, state_dir)
            root_fd = sandbox.jail.workspace_fd()
        except (ServiceError, JailGone):
            return None  # outside the workspace, or the jail is going: the old way says
        try:
            ws = Workspace(root_fd, sandbox.workspace_path, owner=self.jail.privilege.drop)
            sock_fd, token = agentsocket.find(ws, parts)
        except agentsocket.NoSocket:
            return None
        finally:
            os.close(root_fd)  # before the request waits (a long poll waits up to 60 s)
        answer = await agentsocket.ask(sock_fd, token, body, timeout, cap)
        # The agent can outlive its jail for a moment: a cell's kill(-1) spares its own
        # process and kills the supervisor, which ends the sandbox. A SIGKILL sent
        # before this answer was written is pending there by now, so the supervisor
        # answers this ping only if it lives (and the cell then reports the loss,
        # as it did when the supervisor relayed every request).
        await self._ask_jail(sandbox, {"op": "ping"}, 0)  # 0: the backstop alone
        return {"ok": True, **answer}

    def _check_ready(self, sandbox: Sandbox, *, internal: bool = False) -> None:
        if sandbox.status == PROVISIONING and not internal:
            raise ServiceError(
                409,
                "sandbox_not_ready",
                f"Sandbox {sandbox.id} is still provisioning.",
                hint="Wait for it with POST /sandboxes/{id}/wait.",
                retryable=True,
            )
        if sandbox.status == DESTROYED or sandbox.jail is None:
            raise gone(sandbox)

    async def _ask_jail(
        self, sandbox: Sandbox, message: dict[str, Any], timeout: float, *, internal: bool = False
    ) -> dict[str, Any]:
        self._check_ready(sandbox, internal=internal)
        assert sandbox.jail is not None
        try:
            answer = await sandbox.jail.request(message, timeout + EXEC_BACKSTOP_S)
        except JailGone:
            raise gone(sandbox) from None
        except asyncio.TimeoutError:
            raise ServiceError(
                504,
                "upstream_error",
                f"Sandbox {sandbox.id} did not answer within {timeout + EXEC_BACKSTOP_S:g} s.",
                retryable=False,
            ) from None
        if self._end_if_oom(sandbox):
            # Whatever this command printed, the sandbox it ran in is gone.
            raise gone(sandbox)
        if not answer.get("ok"):
            raise ServiceError(
                500,
                "internal_error",
                f"The sandbox could not run the command: {answer.get('error')}",
            )
        return answer

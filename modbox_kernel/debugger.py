"""The kernel's half of the debugger: ``debug_request`` to the sandbox, its events back.

JupyterLab's debugger (and VS Code's run-by-line) speak the Debug Adapter Protocol in
``debug_request`` / ``debug_reply`` on the control channel and read debugpy's events as
``debug_event`` on IOPub. debugpy runs inside the sandbox, in the agent's process,
where the cells run (``agent/inside/debugging.py`` answers the requests only Jupyter
knows, and forwards the rest to debugpy). This module relays.

Who calls what, and when: :class:`~modbox_kernel.kernel.ModboxKernel` makes one
:class:`DebugRelay`; its ``do_debug_request`` (on the control thread) runs
:meth:`DebugRelay.request` on the main loop, where the session's HTTP clients live.
Each request is a separate call to the sandbox, so requests flow while a cell is
stopped at a breakpoint (its ``execute`` call is still waiting). Once the debugger is
initialized, one waiting poll on the agent's debug log (:meth:`_listen`) brings
debugpy's events, which ``publish`` sends to IOPub; it ends with ``disconnect``, when
the sandbox is replaced, or when the session closes.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from . import protocol
from .agent.inside import protocol as names
from .agent.inside.dapclient import debug_info, failed
from .errors import ModboxError

if TYPE_CHECKING:
    from .session import SandboxSession

log = logging.getLogger(__name__)

#: How long one poll for debugpy's events waits in the sandbox before it answers empty.
EVENTS_WAIT = 30.0
#: After a failed poll, wait this long before the next.
RETRY_DELAY = 0.5
#: How long a debug request waits for a sandbox still starting. Control requests are
#: handled one at a time, so a longer wait would hold back interrupts and shutdown.
NOT_READY_WAIT = 2.0
#: The sandbox variable that makes the agent act as if debugpy were missing.
DISABLE_ENV = "MODBOX_AGENT_NO_DEBUGGER"


def not_started(request: Mapping[str, Any]) -> dict[str, Any]:
    """``debugInfo`` before the sandbox exists: nothing started, nothing set. The cell
    file names are the sandbox's, so the frontend asks again when it starts debugging."""
    return debug_info(
        request, started=False, cell_prefix="/tmp/ipykernel_0/", breakpoints={}, stopped=()
    )


def predicted_available(embedded: bool, sandbox_env: Mapping[str, str]) -> bool:
    """Whether the embedded backend's sandbox can debug, before it exists.

    Its jails run this kernel's own interpreter, so debugpy is importable there exactly
    when it is here (unless the notebook's environment turns the debugger off).
    """
    if not embedded or sandbox_env.get(DISABLE_ENV) == "1":
        return False
    return importlib.util.find_spec("debugpy") is not None


class DebugRelay:
    """The frontend's debugger session, relayed to the sandbox's debugpy."""

    def __init__(
        self,
        session: SandboxSession,
        publish: Callable[[dict[str, Any]], None],
        problems: list[str],
    ) -> None:
        self._session = session
        # Malformed settings: no sandbox may be started, not even for the debugger.
        self._problems = problems
        self._publish = publish
        self._task: asyncio.Task[None] | None = None
        # Where the last session's listener stopped in the agent's debug log, so that
        # a new session does not publish the old one's events again.
        self._cursor: tuple[object, Any, int] = (None, None, 0)  # (sandbox, epoch, since)

    @property
    def available(self) -> bool | None:
        """What the running agent says (None while there is no sandbox)."""
        if not self._session.ready:
            return None
        return bool(self._session.agent_info.get("debugger"))

    async def request(self, content: Mapping[str, Any]) -> dict[str, Any]:
        """Answer one ``debug_request``'s content with the ``debug_reply``'s content."""
        command = content.get("command")
        if not isinstance(command, str):
            return failed(content, "a debug request needs a 'command'")
        if self._problems:
            text = "; ".join(self._problems)
            return failed(content, f"Modbox Python cannot start a sandbox: {text}")
        if not self._session.ready:
            # Never provisions (the kernel's start did) and never waits long: JupyterLab
            # asks debugInfo as soon as it connects, maybe while the sandbox waits in line.
            try:
                await asyncio.wait_for(self._session.wait_for_sandbox(), NOT_READY_WAIT)
            except asyncio.TimeoutError:
                if command == "debugInfo":
                    return not_started(content)
                return failed(content, "The sandbox is still starting; debug once it runs.")
        try:
            reply = await self._session.query(names.OP_DEBUG, request=dict(content))
        except ModboxError as exc:
            return failed(content, f"The debugger could not reach the sandbox: {exc}")
        if not reply:  # an agent that does not know the op
            return failed(content, "this sandbox's agent has no debugger")
        if command in ("initialize", "attach") and reply.get("success"):
            self._start_listening()
        elif command == "disconnect":
            self._stop_listening()
        return reply

    def _start_listening(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._listen())

    def _stop_listening(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _listen(self) -> None:
        """Relay debugpy's events until the sandbox (or its agent) is replaced."""
        sandbox = await self._session.wait_for_sandbox()
        if sandbox is None:
            return
        known, epoch, since = self._cursor
        if known is not sandbox:
            epoch, since = None, 0
        while True:
            self._cursor = (sandbox, epoch, since)
            request = protocol.debug_events_request(since=since, wait=EVENTS_WAIT)
            try:
                answer = await sandbox.channel.request(request, read_timeout=EVENTS_WAIT + 15.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not self._session.ready or self._session.agent_info is not sandbox.agent_info:
                    log.info("debugger events end with the sandbox: %r", exc)
                    return
                log.debug("poll for debugger events failed: %r", exc)
                await asyncio.sleep(RETRY_DELAY)
                continue
            if epoch is None:
                epoch = answer.get("epoch")
            elif answer.get("epoch") != epoch:
                log.info("the sandbox's agent was replaced; its debugger is gone")
                return
            events, since = protocol.unseen_events(answer, since)
            for event in events:
                content = event.get("content")
                if event.get("type") == names.EV_DEBUG_EVENT and isinstance(content, dict):
                    self._publish(content)

"""Output the sandbox produces while no cell runs, published as the stock kernel does.

A thread that prints after its cell ended, a ``threading.Timer`` that calls
``display()``, a widget updated from a thread: under ipykernel these reach the frontend
at once, under the request that was last active. The agent collects them in its
background log (``agent/inside/cells.background_log``); :class:`IdleOutput` keeps one
waiting poll on that log for the kernel's whole life and relays what it brings.

Who calls what, and when: the kernel makes one :class:`IdleOutput` at start and calls
:meth:`IdleOutput.start`; the task waits for the session's sandbox
(:meth:`~modbox_kernel.session.SandboxSession.wait_for_sandbox`, which never provisions)
and ends when the session closes. Each answer's events go to ``relay`` (a fresh
``OutputRelay`` per answer, flushed at its end), which publishes under the parent the
kernel holds at that moment -- the stock kernel's rule.

Cost: one exec waiting in the sandbox per idle kernel, answered after at most
:data:`IDLE_WAIT` s (or as soon as there is output), so forty idle kernels make under
one exec a second between them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import protocol
from .errors import AgentError
from .relay import OutputRelay

if TYPE_CHECKING:
    from .session import SandboxSession

log = logging.getLogger(__name__)

#: How long one waiting poll stays in the agent before it answers empty (the agent
#: allows up to 60 s).
IDLE_WAIT = 50.0
#: After a failed poll (the agent restarting, a network fault), wait this long, then
#: twice as long each time, up to :data:`MAX_RETRY_DELAY`.
RETRY_DELAY = 0.5
MAX_RETRY_DELAY = 30.0


class IdleOutput:
    """The kernel's listener for the sandbox's between-cells output."""

    def __init__(self, session: SandboxSession, relay: Callable[[], OutputRelay]) -> None:
        self._session = session
        self._relay = relay
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start listening (on the kernel's event loop; idempotent)."""
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._listen())

    async def _listen(self) -> None:
        sandbox: Any = None
        since, epoch = 0, None
        delay = RETRY_DELAY
        while True:
            current = await self._session.wait_for_sandbox()
            if current is None:
                return  # the session closed
            if current is not sandbox:
                sandbox, since, epoch = current, 0, None
            request = protocol.background_request(since=since, wait=IDLE_WAIT)
            try:
                answer = await sandbox.channel.request(request, read_timeout=IDLE_WAIT + 15.0)
            except asyncio.CancelledError:
                raise
            except AgentError as exc:
                # An agent that does not know the op (an image's own older agent)
                # refuses it every time: stop asking this sandbox.
                log.info("no output between cells from this sandbox: %s", exc)
                if await self._session.wait_for_sandbox(other_than=sandbox) is None:
                    return
                continue
            except Exception as exc:  # the cell that runs next reports a lost sandbox
                log.debug("waiting poll for output between cells failed: %r", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_DELAY)
                continue
            delay = RETRY_DELAY
            if answer.get("epoch") != epoch:
                if epoch is not None or since:
                    # A new agent (restarted after an interrupt): its events are
                    # numbered from 0 again, so ask again from there.
                    since, epoch = 0, answer.get("epoch")
                    continue
                epoch = answer.get("epoch")
            relay = self._relay()
            events, since = protocol.unseen_events(answer, since)
            for event in events:
                await relay.event(event)
            relay.flush()
